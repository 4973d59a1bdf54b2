#include "keyclient/key_policy.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace kmsfs::keyclient {
namespace {

using nlohmann::json;

constexpr const char* kArn = "arn:aws:kms:local:000000000000:key/11111111-2222-4333-8444-555555555555";

Principal alice() {
  Principal p;
  p.uid = 1000;
  p.gid = 100;
  p.groups = {100, 27};
  p.user_name = "alice";
  p.group_names = {"users", "backup"};
  return p;
}

std::string doc(json statements) { return json{{"Version", "2012-10-17"}, {"Statement", statements}}.dump(); }

json allow(json principal, json action, json extra = json::object()) {
  json s{{"Effect", "Allow"}, {"Principal", principal}, {"Action", action}, {"Resource", "*"}};
  for (auto& [k, v] : extra.items()) s[k] = v;
  return s;
}

PolicyDecision eval(const std::string& policy, const std::string& action, const Principal& p,
                    const EncryptionContext* ctx = nullptr) {
  return evaluate_key_policy(policy, PolicyRequest{action, kArn, &p, ctx});
}

struct Case {
  const char* name;
  json statements;
  const char* action;
  EncryptionContext ctx;
  bool with_ctx;
  PolicyDecision expected;
};

TEST(KeyPolicy, EvaluationTable) {
  const json local_alice{{"Local", "uid:1000"}};
  const EncryptionContext fs_ctx{{"kmsfs:fs", "abc"}, {"kmsfs:file", "01"}};
  const std::vector<Case> cases = {
      {"exact allow", json::array({allow(local_alice, "kms:Decrypt")}), "kms:Decrypt", {}, false, PolicyDecision::Allow},
      {"no matching action", json::array({allow(local_alice, "kms:Encrypt")}), "kms:Decrypt", {}, false,
       PolicyDecision::ImplicitDeny},
      {"other principal", json::array({allow({{"Local", "uid:1001"}}, "kms:*")}), "kms:Decrypt", {}, false,
       PolicyDecision::ImplicitDeny},
      {"user name", json::array({allow({{"Local", "user:alice"}}, "kms:*")}), "kms:Decrypt", {}, false,
       PolicyDecision::Allow},
      {"supplementary group", json::array({allow({{"Local", {"group:backup"}}}, "kms:*")}), "kms:Decrypt", {}, false,
       PolicyDecision::Allow},
      {"gid", json::array({allow({{"Local", "gid:27"}}, "kms:*")}), "kms:Decrypt", {}, false, PolicyDecision::Allow},
      {"everyone", json::array({allow("*", "kms:Describe*")}), "kms:DescribeKey", {}, false, PolicyDecision::Allow},
      {"wildcard prefix", json::array({allow(local_alice, "kms:Generate*")}), "kms:GenerateDataKeyWithoutPlaintext",
       {}, false, PolicyDecision::Allow},
      {"wildcard does not reach further", json::array({allow(local_alice, "kms:Generate*")}), "kms:Encrypt", {},
       false, PolicyDecision::ImplicitDeny},
      {"actions are case-insensitive", json::array({allow(local_alice, "KMS:decrypt")}), "kms:Decrypt", {}, false,
       PolicyDecision::Allow},
      {"explicit deny wins", json::array({allow(local_alice, "kms:*"),
                                          {{"Effect", "Deny"}, {"Principal", local_alice}, {"Action", "kms:Decrypt"},
                                           {"Resource", "*"}}}),
       "kms:Decrypt", {}, false, PolicyDecision::ExplicitDeny},
      {"NotAction", json::array({{{"Effect", "Allow"}, {"Principal", local_alice}, {"NotAction", "kms:Schedule*"},
                                  {"Resource", "*"}}}),
       "kms:ScheduleKeyDeletion", {}, false, PolicyDecision::ImplicitDeny},
      {"NotAction allows the rest", json::array({{{"Effect", "Allow"}, {"Principal", local_alice},
                                                  {"NotAction", "kms:Schedule*"}, {"Resource", "*"}}}),
       "kms:Encrypt", {}, false, PolicyDecision::Allow},
      {"resource must match", json::array({{{"Effect", "Allow"}, {"Principal", local_alice}, {"Action", "kms:*"},
                                            {"Resource", "arn:aws:kms:local:000000000000:key/other"}}}),
       "kms:Decrypt", {}, false, PolicyDecision::ImplicitDeny},
      {"context StringEquals holds",
       json::array({allow(local_alice, "kms:Decrypt",
                          {{"Condition", {{"StringEquals", {{"kms:EncryptionContext:kmsfs:fs", "abc"}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::Allow},
      {"context StringEquals fails",
       json::array({allow(local_alice, "kms:Decrypt",
                          {{"Condition", {{"StringEquals", {{"kms:EncryptionContext:kmsfs:fs", "xyz"}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::ImplicitDeny},
      {"context key absent", json::array({allow(local_alice, "kms:Decrypt",
                                                {{"Condition", {{"StringEquals", {{"kms:EncryptionContext:x", "1"}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::ImplicitDeny},
      {"StringLike", json::array({allow(local_alice, "kms:Decrypt",
                                        {{"Condition", {{"StringLike", {{"kms:EncryptionContext:kmsfs:file", "0*"}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::Allow},
      {"EncryptionContextKeys ForAllValues",
       json::array({allow(local_alice, "kms:Decrypt",
                          {{"Condition",
                            {{"ForAllValues:StringEquals", {{"kms:EncryptionContextKeys", {"kmsfs:fs", "kmsfs:file"}}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::Allow},
      {"EncryptionContextKeys ForAllValues refuses an extra key",
       json::array({allow(local_alice, "kms:Decrypt",
                          {{"Condition", {{"ForAllValues:StringEquals", {{"kms:EncryptionContextKeys", {"kmsfs:fs"}}}}}}})}),
       "kms:Decrypt", fs_ctx, true, PolicyDecision::ImplicitDeny},
      {"CallerUid", json::array({allow("*", "kms:Decrypt", {{"Condition", {{"StringEquals", {{"kms:CallerUid", "1000"}}}}}})}),
       "kms:Decrypt", {}, false, PolicyDecision::Allow},
      {"CallerUid other", json::array({allow("*", "kms:Decrypt", {{"Condition", {{"StringEquals", {{"kms:CallerUid", "0"}}}}}})}),
       "kms:Decrypt", {}, false, PolicyDecision::ImplicitDeny},
      {"deny unless context", json::array({allow(local_alice, "kms:*"),
                                           {{"Effect", "Deny"}, {"Principal", "*"}, {"Action", "kms:Decrypt"},
                                            {"Resource", "*"},
                                            {"Condition", {{"StringNotEquals", {{"kms:EncryptionContext:kmsfs:fs", "abc"}}}}}}}),
       "kms:Decrypt", EncryptionContext{{"kmsfs:fs", "zzz"}}, true, PolicyDecision::ExplicitDeny},
  };
  const Principal p = alice();
  for (const auto& c : cases) {
    const std::string policy = doc(c.statements);
    ASSERT_TRUE(validate_key_policy(policy)) << c.name << ": " << validate_key_policy(policy).error();
    EXPECT_EQ(eval(policy, c.action, p, c.with_ctx ? &c.ctx : nullptr), c.expected) << c.name;
  }
}

// Parsed documents are kept per thread: a changed document (PutKeyPolicy)
// must decide at once, also after more documents than the cache holds.
TEST(KeyPolicy, EachDocumentDecidesForItselfAcrossTheParsedCache) {
  const Principal a = alice();
  std::vector<std::string> docs;
  std::vector<PolicyDecision> expected;
  for (int i = 0; i < 7; ++i) {
    const bool allowed = i % 2 == 0;
    json st = allowed ? allow(json{{"Local", "uid:1000"}}, "kms:Decrypt")
                      : allow(json{{"Local", "uid:" + std::to_string(2000 + i)}}, "kms:Decrypt");
    st["Sid"] = "s" + std::to_string(i);  // every document differs
    docs.push_back(doc(json::array({st})));
    expected.push_back(allowed ? PolicyDecision::Allow : PolicyDecision::ImplicitDeny);
  }
  docs.push_back(doc(json::array({allow("*", "kms:*"), json{{"Effect", "Deny"},
                                                            {"Principal", "*"},
                                                            {"Action", "kms:Decrypt"},
                                                            {"Resource", "*"}}})));
  expected.push_back(PolicyDecision::ExplicitDeny);
  docs.push_back("{\"Statement\": 5}");  // does not validate: denies
  expected.push_back(PolicyDecision::ImplicitDeny);
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < docs.size(); ++i) {
      EXPECT_EQ(eval(docs[i], "kms:Decrypt", a), expected[i]) << "round " << round << ", document " << i;
      EXPECT_EQ(eval(docs[i], "kms:Decrypt", a), expected[i]) << "again, round " << round << ", document " << i;
    }
  }
}

TEST(KeyPolicy, MalformedDocumentsNameTheProblem) {
  struct Bad {
    std::string doc;
    std::string says;
  };
  const std::vector<Bad> bad = {
      {"not json", "not valid JSON"},
      {"[]", "not a JSON object"},
      {R"({"Version":"2012-10-17"})", "no Statement"},
      {R"({"Version":"2099-01-01","Statement":[]})", "Version"},
      {R"({"Statement":[{"Effect":"Maybe","Principal":"*","Action":"kms:*","Resource":"*"}]})",
       "Statement[0].Effect must be"},
      {R"({"Statement":[{"Effect":"Allow","Principal":{"Local":"root"},"Action":"kms:*","Resource":"*"}]})",
       "\"root\" is not uid:N"},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"*"}]})",
       "is not a kms: action"},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","NotAction":"kms:X","Resource":"*"}]})",
       "exactly one of Action and NotAction"},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*"}]})", "has no Resource"},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericLessThan":{"kms:CallerUid":"5"}}}]})",
       "operator \"NumericLessThan\" is not supported"},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"aws:SourceIp":"1"}}}]})",
       "condition key \"aws:SourceIp\""},
      {R"({"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Colour":"red"}]})",
       "unknown element \"Colour\""},
  };
  for (const auto& b : bad) {
    auto r = validate_key_policy(b.doc);
    ASSERT_FALSE(r) << b.doc;
    EXPECT_NE(r.error().find(b.says), std::string::npos) << b.doc << " -> " << r.error();
    // An invalid document never allows anything.
    const Principal p = alice();
    EXPECT_EQ(eval(b.doc, "kms:Decrypt", p), PolicyDecision::ImplicitDeny);
  }
}

TEST(KeyPolicy, WildcardMatch) {
  EXPECT_TRUE(wildcard_match("kms:Generate*", "kms:GenerateDataKey", false));
  EXPECT_TRUE(wildcard_match("a?c", "abc", false));
  EXPECT_FALSE(wildcard_match("a?c", "abbc", false));
  EXPECT_TRUE(wildcard_match("*", "", false));
  EXPECT_TRUE(wildcard_match("KMS:*", "kms:x", true));
  EXPECT_FALSE(wildcard_match("KMS:*", "kms:x", false));
}

}  // namespace
}  // namespace kmsfs::keyclient
