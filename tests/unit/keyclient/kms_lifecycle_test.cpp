// The KMS core beyond the envelope (#3): key states per operation, deletion
// with crypto-shredding, rotation, policies and grants under other uids,
// imported key material, managed keys, tags and the audit trail.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <nlohmann/json.hpp>

#include "crypto/encoding.h"
#include "crypto/sha256.h"
#include "keyclient/audit_log.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/kms_core.h"
#include "keyclient/kms_dispatch.h"
#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using json = nlohmann::json;
constexpr double kDay = 86400;

class KmsLifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override { open_core(); }

  void open_core(KmsCoreOptions opts = {}) {
    if (state_.empty()) {
      state_ = test::make_temp_dir("life");
      token_ = test::unique_token_label();
      core_ = std::make_unique<KmsCore>(state_, test::open_test_hsm(token_), [this] { return now_; }, opts);
      return;
    }
    core_.reset();
    core_ = std::make_unique<KmsCore>(state_, test::open_test_hsm(token_), [this] { return now_; }, opts);
  }

  // AWS operation by name, as kmsctl and kmsd send it.
  KmsResult<json> call(const std::string& op, const json& body, const CallerIdentity& who) {
    return dispatch_kms_request(*core_, who, op, body);
  }
  KmsResult<json> call(const std::string& op, const json& body) { return call(op, body, me_); }
  json ok(const std::string& op, const json& body) {
    auto r = call(op, body);
    if (!r) throw std::runtime_error(op + ": " + r.error().to_string());
    return *r;
  }
  KmsErrorCode code(const std::string& op, const json& body, const CallerIdentity& who) {
    auto r = call(op, body, who);
    EXPECT_FALSE(r) << op << " unexpectedly succeeded";
    return r ? KmsErrorCode::KMSInternalException : r.error().code;
  }
  KmsErrorCode code(const std::string& op, const json& body) { return code(op, body, me_); }

  std::string create(json body = json::object()) { return ok("CreateKey", body)["KeyMetadata"]["KeyId"]; }
  std::string state_of(const std::string& key) { return ok("DescribeKey", {{"KeyId", key}})["KeyMetadata"]["KeyState"]; }
  std::string encrypt(const std::string& key, const json& ctx = json::object()) {
    return ok("Encrypt", {{"KeyId", key}, {"Plaintext", "aGVsbG8="}, {"EncryptionContext", ctx}})["CiphertextBlob"];
  }
  std::uint32_t blob_version(const std::string& b64) {
    auto blob = CiphertextBlob::decode(*crypto::from_base64(b64));
    return blob->key_version;
  }

  std::string state_;
  std::string token_;
  double now_ = 1700000000.0;
  CallerIdentity me_{0, 0, ::getpid()};
  CallerIdentity nobody_{65534, 65534, ::getpid()};
  std::unique_ptr<KmsCore> core_;
};

// --- operation x state -------------------------------------------------------

std::string run(const std::string& cmd);  // a shell command's stdout; throws on failure
void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b);

TEST_F(KmsLifecycleTest, OperationStateTableFollowsAws) {
  enum Want { Ok, Disabled, Invalid };
  // The state-sensitive outcomes of AWS's "Key states" table; Ok means "no
  // state error" (the call may still fail for other reasons, e.g. an
  // import call on an AWS_KMS key is UnsupportedOperationException).
  struct Row {
    const char* op;
    Want enabled, disabled, pending_deletion, pending_import;
  };
  const std::vector<Row> table = {
      {"Encrypt", Ok, Disabled, Invalid, Invalid},
      {"Decrypt", Ok, Disabled, Invalid, Invalid},
      {"GenerateDataKey", Ok, Disabled, Invalid, Invalid},
      {"GenerateDataKeyWithoutPlaintext", Ok, Disabled, Invalid, Invalid},
      {"ReEncrypt", Ok, Disabled, Invalid, Invalid},
      {"DescribeKey", Ok, Ok, Ok, Ok},
      {"CreateAlias", Ok, Ok, Invalid, Ok},
      {"UpdateKeyDescription", Ok, Ok, Invalid, Ok},
      {"EnableKey", Ok, Ok, Invalid, Invalid},
      {"DisableKey", Ok, Ok, Invalid, Invalid},
      {"ScheduleKeyDeletion", Ok, Ok, Invalid, Ok},
      {"CancelKeyDeletion", Invalid, Invalid, Ok, Invalid},
      {"EnableKeyRotation", Ok, Disabled, Invalid, Invalid},
      {"DisableKeyRotation", Ok, Disabled, Invalid, Invalid},
      {"GetKeyRotationStatus", Ok, Ok, Ok, Ok},
      {"RotateKeyOnDemand", Ok, Disabled, Invalid, Invalid},
      {"ListKeyRotations", Ok, Ok, Ok, Ok},
      {"GetKeyPolicy", Ok, Ok, Ok, Ok},
      {"PutKeyPolicy", Ok, Ok, Ok, Ok},
      {"ListKeyPolicies", Ok, Ok, Ok, Ok},
      {"GetParametersForImport", Ok, Ok, Invalid, Ok},
      {"ImportKeyMaterial", Ok, Ok, Invalid, Ok},
      {"DeleteImportedKeyMaterial", Ok, Ok, Ok, Invalid},
      {"TagResource", Ok, Ok, Invalid, Ok},
      {"UntagResource", Ok, Ok, Invalid, Ok},
      {"ListResourceTags", Ok, Ok, Ok, Ok},
      {"CreateGrant", Ok, Ok, Invalid, Ok},
      {"ListGrants", Ok, Ok, Ok, Ok},
      {"RevokeGrant", Ok, Ok, Ok, Ok},
      {"RetireGrant", Ok, Ok, Ok, Ok},
      {"UpdateAlias", Ok, Ok, Invalid, Ok},
      {"DeleteAlias", Ok, Ok, Ok, Ok},
  };
  const std::string other = create();
  const std::string dir = test::make_temp_dir("table");
  // An EXTERNAL key with material (the import operations' rows): their Ok
  // cells then show the operation working, not UnsupportedOperationException
  // as on an AWS_KMS key.
  auto external_with_material = [&]() {
    const std::string key = create({{"Origin", "EXTERNAL"}});
    auto p = ok("GetParametersForImport",
                {{"KeyId", key}, {"WrappingAlgorithm", "RSAES_OAEP_SHA_256"}, {"WrappingKeySpec", "RSA_2048"}});
    write_bytes(dir + "/pub.der", *crypto::from_base64(p["PublicKey"].get<std::string>()));
    run("openssl rand -out " + dir + "/m 32");
    run("openssl pkeyutl -encrypt -pubin -keyform DER -inkey " + dir + "/pub.der -in " + dir + "/m -out " + dir +
        "/m.wrapped -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256");
    std::ifstream in(dir + "/m.wrapped", std::ios::binary);
    std::vector<std::uint8_t> wrapped((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ok("ImportKeyMaterial", {{"KeyId", key}, {"ImportToken", p["ImportToken"]},
                             {"EncryptedKeyMaterial", crypto::to_base64(wrapped)}});
    return key;
  };
  int n = 0;
  for (const auto& row : table) {
    for (const std::string state : {"Enabled", "Disabled", "PendingDeletion", "PendingImport"}) {
      // A fresh key in that state, with a blob made while it was usable
      // (and the alias or grant its row needs, made before the state).
      std::string key;
      std::string blob;
      std::string grant;
      if (state == "PendingImport") {
        key = create({{"Origin", "EXTERNAL"}});
        if (std::string(row.op) == "DeleteAlias") {
          ok("CreateAlias", {{"AliasName", "alias/del" + std::to_string(n++)}, {"TargetKeyId", key}});
        }
        if (std::string(row.op) == "RetireGrant") {
          grant = ok("CreateGrant", {{"KeyId", key}, {"GranteePrincipal", "uid:1000"}, {"Operations", {"Decrypt"}}})["GrantId"];
        }
        CiphertextBlob b;  // a well-formed blob naming the key: the state decides first
        b.key_uuid = *uuid_from_string(key);
        b.key_version = 1;
        b.ciphertext_and_tag.resize(32 + 16);
        blob = crypto::to_base64(b.encode());
      } else {
        const std::string op = row.op;
        const bool import_op = op == "GetParametersForImport" || op == "ImportKeyMaterial" ||
                               op == "DeleteImportedKeyMaterial";
        key = import_op ? external_with_material() : create();
        blob = encrypt(key);
        if (op == "DeleteAlias") ok("CreateAlias", {{"AliasName", "alias/del" + std::to_string(n++)}, {"TargetKeyId", key}});
        if (op == "RetireGrant") {
          grant = ok("CreateGrant", {{"KeyId", key}, {"GranteePrincipal", "uid:1000"}, {"Operations", {"Decrypt"}}})["GrantId"];
        }
        if (state == "Disabled") ok("DisableKey", {{"KeyId", key}});
        if (state == "PendingDeletion") ok("ScheduleKeyDeletion", {{"KeyId", key}, {"PendingWindowInDays", 7}});
      }
      ASSERT_EQ(state_of(key), state);
      const std::string op = row.op;
      json body{{"KeyId", key}};
      if (op == "Encrypt") body["Plaintext"] = "aGVsbG8=";
      if (op == "Decrypt") body = {{"CiphertextBlob", blob}};
      if (op == "GenerateDataKey" || op == "GenerateDataKeyWithoutPlaintext") body["KeySpec"] = "AES_256";
      if (op == "ReEncrypt") body = {{"CiphertextBlob", blob}, {"DestinationKeyId", other}};
      if (op == "CreateAlias") body = {{"AliasName", "alias/t" + std::to_string(n++)}, {"TargetKeyId", key}};
      if (op == "UpdateKeyDescription") body["Description"] = "d";
      if (op == "PutKeyPolicy") body["Policy"] = R"({"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Local":"uid:0"},"Action":"kms:*","Resource":"*"}]})";
      if (op == "GetParametersForImport") {
        body["WrappingAlgorithm"] = "RSAES_OAEP_SHA_256";
        body["WrappingKeySpec"] = "RSA_2048";  // the state is what is tested: the faster key
      }
      if (op == "ImportKeyMaterial") {
        body["ImportToken"] = "AAAA";
        body["EncryptedKeyMaterial"] = "AAAA";
      }
      if (op == "TagResource") body["Tags"] = {{{"TagKey", "a"}, {"TagValue", "b"}}};
      if (op == "UntagResource") body["TagKeys"] = {"a"};
      if (op == "CreateGrant") {
        body["GranteePrincipal"] = "uid:1000";
        body["Operations"] = {"Decrypt"};
      }
      if (op == "RevokeGrant") body["GrantId"] = std::string(64, 'a');
      if (op == "RetireGrant") body["GrantId"] = grant;
      if (op == "UpdateAlias") {
        const std::string alias = "alias/up" + std::to_string(n++);
        ok("CreateAlias", {{"AliasName", alias}, {"TargetKeyId", other}});
        body = {{"AliasName", alias}, {"TargetKeyId", key}};
      }
      if (op == "DeleteAlias") body = {{"AliasName", "alias/del" + std::to_string(n - 1)}};
      auto r = call(op, body);
      const Want want = state == "Enabled" ? row.enabled
                        : state == "Disabled" ? row.disabled
                        : state == "PendingDeletion" ? row.pending_deletion
                                                     : row.pending_import;
      const std::string what = op + " on a " + state + " key";
      if (want == Ok) {
        if (!r) {
          EXPECT_NE(r.error().code, KmsErrorCode::DisabledException) << what << ": " << r.error().to_string();
          EXPECT_NE(r.error().code, KmsErrorCode::KMSInvalidStateException) << what << ": " << r.error().to_string();
          // Only the bogus import token and grant id of those rows may fail.
          const bool bogus_input = op == "ImportKeyMaterial" || op == "RevokeGrant";
          EXPECT_TRUE(bogus_input) << what << " failed: " << r.error().to_string();
        }
      } else {
        ASSERT_FALSE(r) << what << " succeeded";
        EXPECT_EQ(r.error().code,
                  want == Disabled ? KmsErrorCode::DisabledException : KmsErrorCode::KMSInvalidStateException)
            << what << ": " << r.error().to_string();
      }
    }
  }
}

// A number where an integer belongs (1e300 made the JSON library's float
// to int conversion undefined behaviour: found by fuzzing) is a
// ValidationException, from any client.
TEST_F(KmsLifecycleTest, FloatsWhereIntegersBelongAreValidationErrors) {
  const std::string k = create();
  for (const char* n : {"1e300", "1.5", "-1e300", "4.0"}) {
    SCOPED_TRACE(n);
    EXPECT_EQ(code("GenerateDataKey", {{"KeyId", k}, {"NumberOfBytes", json::parse(n)}}), KmsErrorCode::ValidationException);
    EXPECT_EQ(code("GenerateRandom", {{"NumberOfBytes", json::parse(n)}}), KmsErrorCode::ValidationException);
    EXPECT_EQ(code("ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", json::parse(n)}}),
              KmsErrorCode::ValidationException);
  }
  EXPECT_EQ(state_of(k), "Enabled");
}

TEST_F(KmsLifecycleTest, StateTransitions) {
  const std::string k = create();
  ok("DisableKey", {{"KeyId", k}});
  EXPECT_EQ(state_of(k), "Disabled");
  EXPECT_EQ(code("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}}), KmsErrorCode::DisabledException);
  ok("EnableKey", {{"KeyId", k}});
  EXPECT_EQ(state_of(k), "Enabled");
  EXPECT_EQ(code("ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 6}}), KmsErrorCode::ValidationException);
  EXPECT_EQ(code("ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 31}}), KmsErrorCode::ValidationException);
  auto s = ok("ScheduleKeyDeletion", {{"KeyId", k}});
  EXPECT_EQ(s["PendingWindowInDays"], 30);  // the default
  EXPECT_EQ(s["DeletionDate"], now_ + 30 * kDay);
  EXPECT_EQ(state_of(k), "PendingDeletion");
  ok("CancelKeyDeletion", {{"KeyId", k}});
  EXPECT_EQ(state_of(k), "Disabled");  // as AWS: cancelled keys stay disabled
  auto d = ok("DescribeKey", {{"KeyId", k}})["KeyMetadata"];
  EXPECT_FALSE(d.contains("DeletionDate"));
  ok("UpdateKeyDescription", {{"KeyId", k}, {"Description", "new words"}});
  EXPECT_EQ(ok("DescribeKey", {{"KeyId", k}})["KeyMetadata"]["Description"], "new words");
}

// --- deletion ----------------------------------------------------------------

TEST_F(KmsLifecycleTest, ScheduledDeletionDestroysEveryVersionInTheHsm) {
  const std::string k = create();
  ok("CreateAlias", {{"AliasName", "alias/doomed"}, {"TargetKeyId", k}});
  const std::string blob = encrypt(k);
  ok("RotateKeyOnDemand", {{"KeyId", k}});
  ok("ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 7}});
  now_ += 6 * kDay;
  ASSERT_TRUE(core_->run_maintenance());
  EXPECT_EQ(state_of(k), "PendingDeletion");  // the window has not ended
  now_ += 1 * kDay + 1;
  ASSERT_TRUE(core_->run_maintenance());
  EXPECT_EQ(code("DescribeKey", {{"KeyId", k}}), KmsErrorCode::NotFoundException);
  EXPECT_EQ(code("DescribeKey", {{"KeyId", "alias/doomed"}}), KmsErrorCode::NotFoundException);
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", blob}}), KmsErrorCode::InvalidCiphertextException);
  auto hsm = test::open_test_hsm(token_);
  EXPECT_FALSE(*hsm->key_exists("kmsfs/" + k + "/v1"));
  EXPECT_FALSE(*hsm->key_exists("kmsfs/" + k + "/v2"));
}

// "Processed when the core starts and periodically while it runs": an idle
// core (no call at all) still destroys the material when the window ends.
TEST(KmsCoreMaintenance, IdleCoreDestroysMaterialWhenTheWindowEnds) {
  const std::string state = test::make_temp_dir("idle");
  const std::string token = test::unique_token_label();
  std::atomic<double> now{1700000000.0};
  KmsCoreOptions opts;
  opts.background_maintenance = true;
  opts.maintenance_interval_seconds = 0.1;
  KmsCore core(state, test::open_test_hsm(token), [&now] { return now.load(); }, opts);
  const CallerIdentity me{0, 0, ::getpid()};
  auto created = dispatch_kms_request(core, me, "CreateKey", json::object());
  ASSERT_TRUE(created) << created.error().to_string();
  const std::string k = (*created)["KeyMetadata"]["KeyId"];
  ASSERT_TRUE(dispatch_kms_request(core, me, "ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 7}}));
  const std::string record = state + "/keys/" + k + ".json";
  ASSERT_TRUE(std::filesystem::exists(record));
  now = now.load() + 8 * kDay;  // from here on, no call reaches the core
  for (int i = 0; i < 1000 && std::filesystem::exists(record); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_FALSE(std::filesystem::exists(record));
  EXPECT_FALSE(*test::open_test_hsm(token)->key_exists("kmsfs/" + k + "/v1"));
}

TEST_F(KmsLifecycleTest, DeletionDueWhileNoCoreRanHappensAtStart) {
  const std::string k = create();
  ok("ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 7}});
  now_ += 8 * kDay;
  open_core();  // a new process: the constructor processes what fell due
  EXPECT_FALSE(std::filesystem::exists(state_ + "/keys/" + k + ".json"));
  EXPECT_FALSE(*test::open_test_hsm(token_)->key_exists("kmsfs/" + k + "/v1"));
}

// --- rotation ----------------------------------------------------------------

TEST_F(KmsLifecycleTest, OnDemandRotationStopsAtAwsQuotaOf25) {
  const std::string k = create();
  for (int i = 0; i < 25; ++i) ok("RotateKeyOnDemand", {{"KeyId", k}});
  auto r = call("RotateKeyOnDemand", {{"KeyId", k}});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, KmsErrorCode::LimitExceededException);
  EXPECT_NE(r.error().message.find("25"), std::string::npos) << r.error().message;
  EXPECT_EQ(ok("ListKeyRotations", {{"KeyId", k}, {"Limit", 100}})["Rotations"].size(), 25u);
  EXPECT_EQ(blob_version(encrypt(k)), 26u);
}

TEST_F(KmsLifecycleTest, RotationKeepsOldBlobsDecrypting) {
  const std::string k = create();
  const std::string v1 = encrypt(k, {{"a", "1"}});
  EXPECT_EQ(blob_version(v1), 1u);
  ok("RotateKeyOnDemand", {{"KeyId", k}});
  const std::string v2 = encrypt(k, {{"a", "1"}});
  EXPECT_EQ(blob_version(v2), 2u);  // encryption uses the newest version
  for (const auto& b : {v1, v2}) {
    auto d = ok("Decrypt", {{"CiphertextBlob", b}, {"EncryptionContext", {{"a", "1"}}}});
    EXPECT_EQ(d["Plaintext"], "aGVsbG8=");
  }
  auto rot = ok("ListKeyRotations", {{"KeyId", k}});
  ASSERT_EQ(rot["Rotations"].size(), 1u);
  EXPECT_EQ(rot["Rotations"][0]["RotationType"], "ON_DEMAND");
  EXPECT_EQ(ok("GetKeyRotationStatus", {{"KeyId", k}})["OnDemandRotationStartDate"], now_);
}

TEST_F(KmsLifecycleTest, AutomaticRotationWhenThePeriodElapsed) {
  const std::string k = create();
  EXPECT_EQ(code("EnableKeyRotation", {{"KeyId", k}, {"RotationPeriodInDays", 89}}), KmsErrorCode::ValidationException);
  EXPECT_EQ(code("EnableKeyRotation", {{"KeyId", k}, {"RotationPeriodInDays", 2561}}), KmsErrorCode::ValidationException);
  ok("EnableKeyRotation", {{"KeyId", k}, {"RotationPeriodInDays", 90}});
  auto st = ok("GetKeyRotationStatus", {{"KeyId", k}});
  EXPECT_TRUE(st["KeyRotationEnabled"]);
  EXPECT_EQ(st["RotationPeriodInDays"], 90);
  EXPECT_EQ(st["NextRotationDate"], now_ + 90 * kDay);
  now_ += 91 * kDay;
  ASSERT_TRUE(core_->run_maintenance());
  EXPECT_EQ(blob_version(encrypt(k)), 2u);
  EXPECT_EQ(ok("ListKeyRotations", {{"KeyId", k}})["Rotations"][0]["RotationType"], "AUTOMATIC");
  ok("DisableKeyRotation", {{"KeyId", k}});
  EXPECT_FALSE(ok("GetKeyRotationStatus", {{"KeyId", k}})["KeyRotationEnabled"]);
}

TEST_F(KmsLifecycleTest, WrapCounterForcesRotationBeforeTheLimit) {
  KmsCoreOptions opts;
  opts.wrap_limit_per_version = 10;
  opts.wrap_reservation = 4;
  open_core(opts);
  const std::string k = create();
  std::vector<std::string> blobs;
  for (int i = 0; i < 9; ++i) blobs.push_back(encrypt(k));
  // 4 + 4 reserved under v1; the third block would pass 10: v2.
  EXPECT_EQ(blob_version(blobs[7]), 1u);
  EXPECT_EQ(blob_version(blobs[8]), 2u);
  auto rec = json::parse(test::read_text(state_ + "/keys/" + k + ".json"));
  EXPECT_EQ(rec["Versions"][0]["WrapCount"], 8);  // persisted: survives restarts
  EXPECT_EQ(rec["Versions"][1]["WrapCount"], 4);
  for (const auto& b : blobs) EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", b}}));
}

// --- policies, grants and other callers --------------------------------------

TEST_F(KmsLifecycleTest, AnotherUidIsDeniedByTheDefaultPolicy) {
  const std::string k = create();
  const std::string blob = encrypt(k);
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", blob}}, nobody_), KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("DescribeKey", {{"KeyId", k}}, nobody_), KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("DisableKey", {{"KeyId", k}}, nobody_), KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(state_of(k), "Enabled");
}

TEST_F(KmsLifecycleTest, PolicyAllowsAndDeniesPerActionAndContext) {
  const std::string k = create();
  const json policy{
      {"Version", "2012-10-17"},
      {"Statement",
       {{{"Sid", "admin"}, {"Effect", "Allow"}, {"Principal", {{"Local", "uid:0"}}}, {"Action", "kms:*"}, {"Resource", "*"}},
        {{"Sid", "use"},
         {"Effect", "Allow"},
         {"Principal", {{"Local", {"uid:65534"}}}},
         {"Action", {"kms:Decrypt", "kms:Describe*"}},
         {"Resource", "*"},
         {"Condition", {{"StringEquals", {{"kms:EncryptionContext:team", "fs"}}}}}}}}};
  ok("PutKeyPolicy", {{"KeyId", k}, {"Policy", policy.dump()}});
  EXPECT_EQ(ok("GetKeyPolicy", {{"KeyId", k}})["Policy"], policy.dump());
  EXPECT_EQ(ok("ListKeyPolicies", {{"KeyId", k}})["PolicyNames"], json({"default"}));
  const std::string fs_blob = encrypt(k, {{"team", "fs"}});
  const std::string db_blob = encrypt(k, {{"team", "db"}});
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", fs_blob}, {"EncryptionContext", {{"team", "fs"}}}}, nobody_));
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", db_blob}, {"EncryptionContext", {{"team", "db"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}, {"EncryptionContext", {{"team", "fs"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
}

TEST_F(KmsLifecycleTest, PolicyLockoutSafetyCheckAndMalformedPolicies) {
  const std::string k = create();
  const std::string lockout =
      R"({"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Local":"uid:4242"},"Action":"kms:*","Resource":"*"}]})";
  auto r = call("PutKeyPolicy", {{"KeyId", k}, {"Policy", lockout}});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, KmsErrorCode::MalformedPolicyDocumentException);
  EXPECT_NE(r.error().message.find("will not allow you to update the key policy"), std::string::npos);
  auto bad = call("PutKeyPolicy", {{"KeyId", k}, {"Policy", R"({"Statement":[{"Effect":"Allow"}]})"}});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, KmsErrorCode::MalformedPolicyDocumentException);
  EXPECT_NE(bad.error().message.find("Statement[0] has no Principal"), std::string::npos) << bad.error().message;
  ok("PutKeyPolicy", {{"KeyId", k}, {"Policy", lockout}, {"BypassPolicyLockoutSafetyCheck", true}});
  EXPECT_EQ(code("PutKeyPolicy", {{"KeyId", k}, {"Policy", lockout}}), KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("CreateKey", {{"Policy", lockout}}), KmsErrorCode::MalformedPolicyDocumentException);
}

TEST_F(KmsLifecycleTest, GrantsAddPermissionsWithConstraints) {
  const std::string k = create();
  const std::string a = encrypt(k, {{"vol", "a"}, {"file", "1"}});
  const std::string b = encrypt(k, {{"vol", "b"}});
  auto g = ok("CreateGrant", {{"KeyId", k},
                              {"GranteePrincipal", "uid:65534"},
                              {"Operations", {"Decrypt", "RetireGrant"}},
                              {"Name", "reader"},
                              {"Constraints", {{"EncryptionContextSubset", {{"vol", "a"}}}}}});
  const std::string id = g["GrantId"];
  // Same name and parameters: the same grant.
  EXPECT_EQ(ok("CreateGrant", {{"KeyId", k},
                               {"GranteePrincipal", "uid:65534"},
                               {"Operations", {"Decrypt", "RetireGrant"}},
                               {"Name", "reader"},
                               {"Constraints", {{"EncryptionContextSubset", {{"vol", "a"}}}}}})["GrantId"],
            id);
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", a}, {"EncryptionContext", {{"vol", "a"}, {"file", "1"}}}}, nobody_));
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", b}, {"EncryptionContext", {{"vol", "b"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}, {"EncryptionContext", {{"vol", "a"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  auto list = ok("ListGrants", {{"KeyId", k}});
  ASSERT_EQ(list["Grants"].size(), 1u);
  EXPECT_EQ(list["Grants"][0]["GranteePrincipal"], "uid:65534");
  EXPECT_EQ(list["Grants"][0]["Constraints"]["EncryptionContextSubset"]["vol"], "a");
  // EncryptionContextEquals: exactly that context.
  auto eq = ok("CreateGrant", {{"KeyId", k},
                               {"GranteePrincipal", "uid:65534"},
                               {"Operations", {"Decrypt"}},
                               {"Constraints", {{"EncryptionContextEquals", {{"vol", "b"}}}}}});
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", b}, {"EncryptionContext", {{"vol", "b"}}}}, nobody_));
  ok("RevokeGrant", {{"KeyId", k}, {"GrantId", eq["GrantId"]}});
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", b}, {"EncryptionContext", {{"vol", "b"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  // The grantee retires its own grant (it holds RetireGrant) by token.
  ASSERT_TRUE(call("RetireGrant", {{"GrantToken", g["GrantToken"]}}, nobody_));
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", a}, {"EncryptionContext", {{"vol", "a"}, {"file", "1"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("RevokeGrant", {{"KeyId", k}, {"GrantId", id}}), KmsErrorCode::NotFoundException);
  // An explicit Deny in the policy beats a grant.
  ok("PutKeyPolicy",
     {{"KeyId", k},
      {"Policy", json{{"Version", "2012-10-17"},
                      {"Statement",
                       {{{"Effect", "Allow"}, {"Principal", {{"Local", "uid:0"}}}, {"Action", "kms:*"}, {"Resource", "*"}},
                        {{"Effect", "Deny"}, {"Principal", {{"Local", "uid:65534"}}}, {"Action", "kms:Decrypt"}, {"Resource", "*"}}}}}
                     .dump()}});
  ok("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:65534"}, {"Operations", {"Decrypt"}}});
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", b}, {"EncryptionContext", {{"vol", "b"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
}

// AWS GrantConstraints: a constraint binds only operations that take an
// encryption context (DescribeKey and RetireGrant are allowed regardless),
// constraint keys match without regard to case, and a grant's CreateGrant
// creates only grants within it: a subset of its operations and an equally
// strict or stricter constraint.
TEST_F(KmsLifecycleTest, GrantConstraintsBindOnlyContextOperationsAndSubGrants) {
  const std::string k = create();
  const std::string a = encrypt(k, {{"vol", "a"}, {"file", "1"}});
  ok("CreateGrant", {{"KeyId", k},
                     {"GranteePrincipal", "uid:65534"},
                     {"Operations", {"Decrypt", "DescribeKey", "CreateGrant", "RetireGrant"}},
                     {"Constraints", {{"EncryptionContextSubset", {{"VOL", "a"}}}}}});
  // DescribeKey takes no context: the constraint does not apply.
  EXPECT_TRUE(call("DescribeKey", {{"KeyId", k}}, nobody_));
  // Constraint keys ignore case, values do not.
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", a}, {"EncryptionContext", {{"vol", "a"}, {"file", "1"}}}}, nobody_));
  const std::string upper = encrypt(k, {{"vol", "A"}});
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", upper}, {"EncryptionContext", {{"vol", "A"}}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  // Sub-grants: within the parent is allowed ...
  auto sub = call("CreateGrant", {{"KeyId", k},
                                  {"GranteePrincipal", "uid:65533"},
                                  {"Operations", {"Decrypt"}},
                                  {"Constraints", {{"EncryptionContextSubset", {{"vol", "a"}, {"file", "1"}}}}}},
                  nobody_);
  EXPECT_TRUE(sub) << (sub ? "" : sub.error().to_string());
  auto eq = call("CreateGrant", {{"KeyId", k},
                                 {"GranteePrincipal", "uid:65533"},
                                 {"Operations", {"Decrypt"}},
                                 {"Constraints", {{"EncryptionContextEquals", {{"vol", "a"}}}}}},
                 nobody_);
  EXPECT_TRUE(eq) << (eq ? "" : eq.error().to_string());
  // ... more operations, a weaker constraint or none are not.
  EXPECT_EQ(code("CreateGrant", {{"KeyId", k},
                                 {"GranteePrincipal", "uid:65533"},
                                 {"Operations", {"Decrypt", "Encrypt"}},
                                 {"Constraints", {{"EncryptionContextSubset", {{"vol", "a"}}}}}},
                 nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("CreateGrant", {{"KeyId", k},
                                 {"GranteePrincipal", "uid:65533"},
                                 {"Operations", {"Decrypt"}},
                                 {"Constraints", {{"EncryptionContextSubset", {{"file", "1"}}}}}},
                 nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:65533"}, {"Operations", {"Decrypt"}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  // The key policy (root) is not bounded by any grant.
  ok("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:65533"}, {"Operations", {"Decrypt", "Encrypt"}}});
}

// GrantTokens (AWS: "use a grant before it is eventually consistent"):
// grants act at once here, so a token only has to be genuine.
TEST_F(KmsLifecycleTest, GrantTokensMustNameALiveGrant) {
  const std::string k = create();
  const std::string other = create();
  auto g = ok("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:65534"}, {"Operations", {"Decrypt", "Encrypt"}}});
  const std::string token = g["GrantToken"];
  const std::string blob = encrypt(k, {{"v", "1"}});
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", blob}, {"EncryptionContext", {{"v", "1"}}}, {"GrantTokens", {token}}},
                   nobody_));
  EXPECT_TRUE(call("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}, {"GrantTokens", {token}}}, nobody_));
  EXPECT_TRUE(call("GenerateDataKey", {{"KeyId", k}, {"KeySpec", "AES_256"}, {"GrantTokens", {token}}}));
  // ReEncrypt to another key: the token names a grant of the source key.
  EXPECT_TRUE(call("ReEncrypt", {{"CiphertextBlob", blob},
                                 {"SourceEncryptionContext", {{"v", "1"}}},
                                 {"DestinationKeyId", other},
                                 {"GrantTokens", {token}}}));
  EXPECT_EQ(code("GenerateDataKey", {{"KeyId", k}, {"KeySpec", "AES_256"}, {"GrantTokens", {"bm90IGEgdG9rZW4="}}}),
            KmsErrorCode::InvalidGrantTokenException);
  EXPECT_EQ(code("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}, {"GrantTokens", json::array({""})}}),
            KmsErrorCode::ValidationException);
  EXPECT_EQ(code("Encrypt", {{"KeyId", k}, {"Plaintext", "aGk="}, {"GrantTokens", std::vector<std::string>(11, token)}}),
            KmsErrorCode::ValidationException);
  EXPECT_EQ(code("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:1"}, {"Operations", {"Decrypt"}},
                                 {"GrantTokens", {"bm9wZQ=="}}}),
            KmsErrorCode::InvalidGrantTokenException);
  // Once revoked, its token is refused.
  ok("RevokeGrant", {{"KeyId", k}, {"GrantId", g["GrantId"]}});
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", blob}, {"EncryptionContext", {{"v", "1"}}}, {"GrantTokens", {token}}}),
            KmsErrorCode::InvalidGrantTokenException);
}

// --- managed keys, re-encrypt, tags, aliases ----------------------------------

TEST_F(KmsLifecycleTest, ManagedKeyIsUsableButNotAdministrable) {
  auto m = ok("DescribeKey", {{"KeyId", "alias/kmsfs/default"}})["KeyMetadata"];
  EXPECT_EQ(m["KeyManager"], "AWS");
  const std::string k = m["KeyId"];
  EXPECT_TRUE(call("GenerateDataKey", {{"KeyId", "alias/kmsfs/default"}, {"KeySpec", "AES_256"}}));
  EXPECT_TRUE(ok("GetKeyRotationStatus", {{"KeyId", k}})["KeyRotationEnabled"]);
  for (const auto& [op, body] : std::vector<std::pair<std::string, json>>{
           {"DisableKey", {{"KeyId", k}}},
           {"ScheduleKeyDeletion", {{"KeyId", k}, {"PendingWindowInDays", 7}}},
           {"PutKeyPolicy", {{"KeyId", k}, {"Policy", R"({"Statement":[]})"}}},
           {"DisableKeyRotation", {{"KeyId", k}}},
           {"UpdateKeyDescription", {{"KeyId", k}, {"Description", "x"}}},
           {"TagResource", {{"KeyId", k}, {"Tags", {{{"TagKey", "a"}, {"TagValue", "b"}}}}}}}) {
    EXPECT_EQ(code(op, body), KmsErrorCode::AccessDeniedException) << op;
  }
  // Its fixed policy does not grant on-demand rotation (it rotates yearly).
  EXPECT_EQ(code("RotateKeyOnDemand", {{"KeyId", k}}), KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("DeleteAlias", {{"AliasName", "alias/kmsfs/default"}}), KmsErrorCode::InvalidAliasNameException);
  EXPECT_EQ(state_of(k), "Enabled");
  // Like an AWS managed key for every principal of its account, it serves
  // every local user (a shared kmsd); grants and administration it does not.
  auto g = call("GenerateDataKey", {{"KeyId", "alias/kmsfs/default"}, {"KeySpec", "AES_256"}}, nobody_);
  ASSERT_TRUE(g) << g.error().to_string();
  EXPECT_TRUE(call("Decrypt", {{"CiphertextBlob", (*g)["CiphertextBlob"]}}, nobody_));
  EXPECT_TRUE(call("DescribeKey", {{"KeyId", "alias/kmsfs/default"}}, nobody_));
  EXPECT_EQ(code("CreateGrant", {{"KeyId", k}, {"GranteePrincipal", "uid:65534"}, {"Operations", {"Decrypt"}}}, nobody_),
            KmsErrorCode::AccessDeniedException);
  EXPECT_EQ(code("DisableKey", {{"KeyId", k}}, nobody_), KmsErrorCode::AccessDeniedException);
}

TEST_F(KmsLifecycleTest, ReEncryptMovesABlobToAnotherKeyAndContext) {
  const std::string a = create();
  const std::string b = create();
  const std::string blob = encrypt(a, {{"x", "1"}});
  EXPECT_EQ(code("ReEncrypt", {{"CiphertextBlob", blob}, {"SourceEncryptionContext", {{"x", "2"}}}, {"DestinationKeyId", b}}),
            KmsErrorCode::InvalidCiphertextException);
  EXPECT_EQ(code("ReEncrypt", {{"CiphertextBlob", blob}, {"SourceKeyId", b}, {"SourceEncryptionContext", {{"x", "1"}}},
                               {"DestinationKeyId", b}}),
            KmsErrorCode::IncorrectKeyException);
  auto r = ok("ReEncrypt", {{"CiphertextBlob", blob}, {"SourceEncryptionContext", {{"x", "1"}}},
                            {"DestinationKeyId", b}, {"DestinationEncryptionContext", {{"y", "2"}}}});
  EXPECT_FALSE(r.contains("Plaintext"));
  EXPECT_EQ(r["SourceKeyId"], "arn:aws:kms:local:000000000000:key/" + a);
  EXPECT_EQ(r["KeyId"], "arn:aws:kms:local:000000000000:key/" + b);
  auto d = ok("Decrypt", {{"CiphertextBlob", r["CiphertextBlob"]}, {"EncryptionContext", {{"y", "2"}}}});
  EXPECT_EQ(d["Plaintext"], "aGVsbG8=");
  auto w = ok("GenerateDataKeyWithoutPlaintext", {{"KeyId", b}, {"NumberOfBytes", 24}});
  EXPECT_FALSE(w.contains("Plaintext"));
  EXPECT_EQ(ok("Decrypt", {{"CiphertextBlob", w["CiphertextBlob"]}})["Plaintext"].get<std::string>().size(), 32u);
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", blob}, {"EncryptionContext", {{"x", "1"}}}, {"KeyId", b}}),
            KmsErrorCode::IncorrectKeyException);
}

TEST_F(KmsLifecycleTest, TagsAndAliases) {
  const std::string k = create({{"Tags", {{{"TagKey", "team"}, {"TagValue", "fs"}}}}});
  ok("TagResource", {{"KeyId", k}, {"Tags", {{{"TagKey", "env"}, {"TagValue", "prod"}}, {{"TagKey", "team"}, {"TagValue", "kms"}}}}});
  auto t = ok("ListResourceTags", {{"KeyId", k}});
  ASSERT_EQ(t["Tags"].size(), 2u);
  EXPECT_EQ(t["Tags"][0], json({{"TagKey", "team"}, {"TagValue", "kms"}}));
  ok("UntagResource", {{"KeyId", k}, {"TagKeys", {"team"}}});
  EXPECT_EQ(ok("ListResourceTags", {{"KeyId", k}})["Tags"].size(), 1u);
  EXPECT_EQ(code("TagResource", {{"KeyId", k}, {"Tags", {{{"TagKey", "aws:x"}, {"TagValue", "1"}}}}}), KmsErrorCode::TagException);

  const std::string k2 = create();
  ok("CreateAlias", {{"AliasName", "alias/moving"}, {"TargetKeyId", k}});
  const double created = now_;
  now_ += 100;
  ok("UpdateAlias", {{"AliasName", "alias/moving"}, {"TargetKeyId", k2}});
  EXPECT_EQ(ok("DescribeKey", {{"KeyId", "alias/moving"}})["KeyMetadata"]["KeyId"], k2);
  bool listed = false;
  const json all = ok("ListAliases", json::object());
  for (const auto& a : all["Aliases"]) {
    if (a["AliasName"] != "alias/moving") continue;
    listed = true;
    EXPECT_EQ(a["CreationDate"], created);
    EXPECT_EQ(a["LastUpdatedDate"], now_);  // AWS's field: when UpdateAlias last moved it
  }
  EXPECT_TRUE(listed) << all.dump();
  ok("DeleteAlias", {{"AliasName", "alias/moving"}});
  EXPECT_EQ(code("DescribeKey", {{"KeyId", "alias/moving"}}), KmsErrorCode::NotFoundException);
  EXPECT_EQ(code("DeleteAlias", {{"AliasName", "alias/moving"}}), KmsErrorCode::NotFoundException);
  EXPECT_EQ(code("UpdateAlias", {{"AliasName", "alias/none"}, {"TargetKeyId", k}}), KmsErrorCode::NotFoundException);
}

// --- imported key material ----------------------------------------------------

std::string run(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int rc = ::pclose(p);
  if (rc != 0) throw std::runtime_error(cmd + " failed: " + std::to_string(rc));
  return out;
}

void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

TEST_F(KmsLifecycleTest, ImportRoundTripWithOpensslWrappedMaterial) {
  const std::string dir = test::make_temp_dir("import");
  const std::string k = create({{"Origin", "EXTERNAL"}, {"Description", "byok"}});
  EXPECT_EQ(state_of(k), "PendingImport");
  EXPECT_EQ(ok("DescribeKey", {{"KeyId", k}})["KeyMetadata"]["Origin"], "EXTERNAL");
  auto p = ok("GetParametersForImport",
              {{"KeyId", k}, {"WrappingAlgorithm", "RSAES_OAEP_SHA_256"}, {"WrappingKeySpec", "RSA_3072"}});
  EXPECT_EQ(p["ParametersValidTo"], now_ + kDay);
  write_bytes(dir + "/pub.der", *crypto::from_base64(p["PublicKey"].get<std::string>()));
  EXPECT_NE(run("openssl pkey -pubin -inform DER -in " + dir + "/pub.der -noout -text").find("3072 bit"),
            std::string::npos);
  auto wrap = [&](const std::string& material) {
    run("openssl rand -out " + dir + "/" + material + " 32 2>/dev/null || true");
    run("openssl pkeyutl -encrypt -pubin -keyform DER -inkey " + dir + "/pub.der -in " + dir + "/" + material +
        " -out " + dir + "/" + material + ".wrapped -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256"
        " -pkeyopt rsa_mgf1_md:sha256");
    std::ifstream in(dir + "/" + material + ".wrapped", std::ios::binary);
    std::vector<std::uint8_t> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return crypto::to_base64(b);
  };
  const std::string m1 = wrap("m1");
  json imp{{"KeyId", k}, {"ImportToken", p["ImportToken"]}, {"EncryptedKeyMaterial", m1},
           {"ExpirationModel", "KEY_MATERIAL_EXPIRES"}, {"ValidTo", now_ + 10 * kDay}};
  ok("ImportKeyMaterial", imp);
  auto meta = ok("DescribeKey", {{"KeyId", k}})["KeyMetadata"];
  EXPECT_EQ(meta["KeyState"], "Enabled");
  EXPECT_EQ(meta["ExpirationModel"], "KEY_MATERIAL_EXPIRES");
  const std::string blob = encrypt(k);
  // ValidTo: in the future, at most 365 days ahead (AWS's limits).
  json late = imp;
  late["ValidTo"] = now_ + 366 * kDay;
  EXPECT_EQ(code("ImportKeyMaterial", late), KmsErrorCode::ValidationException);
  late["ValidTo"] = now_ - 1;
  EXPECT_EQ(code("ImportKeyMaterial", late), KmsErrorCode::ValidationException);
  // Other material is refused; the same material is accepted again.
  json other = imp;
  other["EncryptedKeyMaterial"] = wrap("m2");
  EXPECT_EQ(code("ImportKeyMaterial", other), KmsErrorCode::IncorrectKeyMaterialException);
  ok("DeleteImportedKeyMaterial", {{"KeyId", k}});
  EXPECT_EQ(state_of(k), "PendingImport");
  EXPECT_EQ(code("Decrypt", {{"CiphertextBlob", blob}}), KmsErrorCode::KMSInvalidStateException);
  EXPECT_EQ(code("ImportKeyMaterial", other), KmsErrorCode::IncorrectKeyMaterialException);
  ok("ImportKeyMaterial", imp);
  EXPECT_EQ(ok("Decrypt", {{"CiphertextBlob", blob}})["Plaintext"], "aGVsbG8=");
  // Tokens: garbage and expired ones.
  json forged = imp;
  forged["ImportToken"] = crypto::to_base64(std::vector<std::uint8_t>(44, 7));
  EXPECT_EQ(code("ImportKeyMaterial", forged), KmsErrorCode::InvalidImportTokenException);
  // Expiry: the material is deleted and the key is PendingImport again.
  now_ += 11 * kDay;
  ASSERT_TRUE(core_->run_maintenance());
  EXPECT_EQ(state_of(k), "PendingImport");
  imp["ValidTo"] = now_ + 30 * kDay;
  EXPECT_EQ(code("ImportKeyMaterial", imp), KmsErrorCode::ExpiredImportTokenException);  // the token lived 24 h
  EXPECT_EQ(code("GetParametersForImport", {{"KeyId", create()}, {"WrappingAlgorithm", "RSAES_OAEP_SHA_256"},
                                            {"WrappingKeySpec", "RSA_3072"}}),
            KmsErrorCode::UnsupportedOperationException);
}

// --- audit trail ---------------------------------------------------------------

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}
void write_lines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::trunc);
  for (const auto& l : lines) out << l << "\n";
}

TEST_F(KmsLifecycleTest, AuditRecordsEveryCallAllowedDeniedOrFailed) {
  const std::string k = create();
  const std::string blob = encrypt(k, {{"who", "me"}});
  ASSERT_TRUE(call("Decrypt", {{"CiphertextBlob", blob}, {"EncryptionContext", {{"who", "me"}}}}));
  EXPECT_FALSE(call("Decrypt", {{"CiphertextBlob", blob}}, nobody_));
  EXPECT_FALSE(call("DescribeKey", {{"KeyId", "alias/none"}}));
  const auto lines = lines_of(state_ + "/audit.log");
  std::vector<json> events;
  for (const auto& l : lines) events.push_back(json::parse(l));
  ASSERT_GE(events.size(), 5u);
  auto find = [&](const std::string& name, int uid) -> json {
    for (auto it = events.rbegin(); it != events.rend(); ++it) {
      if ((*it)["eventName"] == name && (*it)["userIdentity"]["uid"] == uid) return *it;
    }
    return json();
  };
  json dec = find("Decrypt", 0);
  ASSERT_FALSE(dec.is_null());
  EXPECT_EQ(dec["requestParameters"]["encryptionContext"]["who"], "me");
  EXPECT_EQ(dec["resources"][0]["ARN"], "arn:aws:kms:local:000000000000:key/" + k);
  EXPECT_FALSE(dec.contains("errorCode"));
  EXPECT_TRUE(dec["readOnly"]);
  EXPECT_EQ(dec["userIdentity"]["pid"], ::getpid());
  EXPECT_FALSE(dec["userIdentity"]["exe"].get<std::string>().empty());
  EXPECT_EQ(dec["eventTime"], iso8601_utc(now_));
  json denied = find("Decrypt", 65534);
  EXPECT_EQ(denied["errorCode"], "AccessDeniedException");
  EXPECT_EQ(find("DescribeKey", 0)["errorCode"], "NotFoundException");
  // Never plaintext, blobs or data keys.
  const std::string all = test::read_text(state_ + "/audit.log");
  EXPECT_EQ(all.find("aGVsbG8="), std::string::npos);
  EXPECT_EQ(all.find(blob), std::string::npos);
  auto v = ok("VerifyAuditLog", json::object());
  EXPECT_TRUE(v["Valid"]) << v.dump();
  // Every record is its JSON object as nlohmann dumps it (keys in byte
  // order, no spaces), then the hash field: the records built field by
  // field read exactly as those built as JSON trees.
  for (const auto& l : lines) {
    const auto at = l.rfind(",\"hash\":\"");
    ASSERT_NE(at, std::string::npos) << l;
    const std::string body = l.substr(0, at) + "}";
    EXPECT_EQ(json::parse(body).dump(), body);
  }
  auto s = ok("SearchAuditLog", {{"KeyId", k}, {"EventName", "Decrypt"}});
  EXPECT_EQ(s["Events"].size(), 2u);
  EXPECT_EQ(code("VerifyAuditLog", json::object(), nobody_), KmsErrorCode::AccessDeniedException);
}

class AuditTamperTest : public KmsLifecycleTest {
 protected:
  void SetUp() override {
    KmsCoreOptions opts;
    opts.audit_checkpoint_every = 8;
    open_core(opts);
    const std::string k = create();
    for (int i = 0; i < 20; ++i) encrypt(k);
    core_.reset();  // closing writes the HSM-MACed head
    open_core(opts);
    path_ = state_ + "/audit.log";
    lines_ = lines_of(path_);
    ASSERT_GE(lines_.size(), 20u);
  }
  json verify() { return ok("VerifyAuditLog", json::object()); }
  std::string path_;
  std::vector<std::string> lines_;
};

TEST_F(AuditTamperTest, IntactLogVerifies) {
  auto v = verify();
  EXPECT_TRUE(v["Valid"]) << v.dump();
  EXPECT_GE(v["Checkpoints"], 3);
}

TEST_F(AuditTamperTest, EditIsNamed) {
  auto l = lines_;
  auto pos = l[4].find("\"readOnly\":true");
  ASSERT_NE(pos, std::string::npos);
  l[4].replace(pos, 15, "\"readOnly\":fals");
  l[4].replace(pos, 15, "\"readOnly\":true");
  auto e = l[4].find("\"eventName\":\"Encrypt\"");
  ASSERT_NE(e, std::string::npos);
  l[4].replace(e, 21, "\"eventName\":\"Decrypt\"");
  write_lines(path_, l);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]);
  EXPECT_EQ(v["Line"], 5);
  EXPECT_NE(v["Problem"].get<std::string>().find("edited"), std::string::npos) << v.dump();
}

TEST_F(AuditTamperTest, RehashedEditIsCaughtByTheHsmMac) {
  // An attacker who recomputes every plain hash after an edit still cannot
  // forge the checkpoint MACs (the HMAC key never leaves the HSM).
  std::vector<json> recs;
  for (const auto& l : lines_) recs.push_back(json::parse(l));
  recs[2]["eventName"] = "Decrypt";
  std::string prev(64, '0');
  std::vector<std::string> out;
  for (auto& r : recs) {
    r.erase("hash");
    r["prevHash"] = prev;
    std::string body = r.dump();
    body.pop_back();
    std::string in = prev + "\n" + body;
    auto h = crypto::to_hex(crypto::sha256(std::span(reinterpret_cast<const std::uint8_t*>(in.data()), in.size())));
    out.push_back(body + ",\"hash\":\"" + h + "\"}");
    prev = h;
  }
  write_lines(path_, out);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]);
  EXPECT_NE(v["Problem"].get<std::string>().find("MAC does not verify"), std::string::npos) << v.dump();
}

TEST_F(AuditTamperTest, RemovalIsNamed) {
  auto l = lines_;
  l.erase(l.begin() + 6);
  write_lines(path_, l);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]);
  EXPECT_EQ(v["Line"], 7);
  EXPECT_NE(v["Problem"].get<std::string>().find("record seq 7 missing"), std::string::npos) << v.dump();
}

TEST_F(AuditTamperTest, ReorderIsNamed) {
  auto l = lines_;
  std::swap(l[9], l[10]);
  write_lines(path_, l);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]);
  EXPECT_EQ(v["Line"], 10);
  EXPECT_NE(v["Problem"].get<std::string>().find("reordered"), std::string::npos) << v.dump();
}

TEST_F(AuditTamperTest, TruncationIsNamed) {
  auto l = lines_;
  l.resize(l.size() - 3);
  write_lines(path_, l);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]);
  EXPECT_NE(v["Problem"].get<std::string>().find("truncated"), std::string::npos) << v.dump();
  // A record cut in the middle is named too.
  std::string text = test::read_text(path_);
  test::write_text(path_, text.substr(0, text.size() - 40));
  auto v2 = verify();
  EXPECT_FALSE(v2["Valid"]);
  EXPECT_NE(v2["Problem"].get<std::string>().find("truncated"), std::string::npos) << v2.dump();
}


// The gap review found: a truncated log was only caught until the next
// calls chained onto the shortened tail, reused the removed seqs and moved
// the HSM-MACed head past the cut; after that `audit verify` said Valid.
// Now the first append onto the cut records it (AuditLogTampered) and
// verify names that record for good. Each call runs in a fresh core, as
// each kmsctl invocation does: the cut is recorded once, not per process.
TEST_F(AuditTamperTest, TruncationStaysNamedAfterLaterCallsMoveTheHead) {
  KmsCoreOptions opts;
  opts.audit_checkpoint_every = 8;
  const auto head_before = json::parse(test::read_text(state_ + "/audit.head"));
  const std::uint64_t cut_from = head_before["seq"];
  ASSERT_EQ(cut_from, lines_.size()) << "the fixture's close wrote the head for its last record";
  auto l = lines_;
  l.resize(l.size() - 3);
  write_lines(path_, l);
  for (int i = 0; i < 12; ++i) {
    open_core(opts);
    ok("ListKeys", json::object());
  }
  core_.reset();  // closing writes the head: past the old one now
  const auto head_after = json::parse(test::read_text(state_ + "/audit.head"));
  ASSERT_GT(head_after["seq"].get<std::uint64_t>(), cut_from) << "the calls did not move the head past the cut";
  int tamper_records = 0;
  for (const auto& line : lines_of(path_)) {
    if (json::parse(line).value("eventName", std::string()) == "AuditLogTampered") ++tamper_records;
  }
  EXPECT_EQ(tamper_records, 1) << "the cut is recorded once, by the first append onto it";
  open_core(opts);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]) << v.dump();
  EXPECT_EQ(v["Line"], l.size() + 1) << v.dump();
  const std::string want = "cut back from seq " + std::to_string(cut_from) + " to seq " + std::to_string(l.size());
  EXPECT_NE(v.value("Problem", std::string()).find(want), std::string::npos) << v.dump();
}

// Rewrites the plain hashes of lines[from..] so the chain is consistent
// again, as an attacker who edited lines[from] would.
void rehash_from(std::vector<std::string>& lines, std::size_t from) {
  std::string prev = from == 0 ? std::string(64, '0') : json::parse(lines[from - 1])["hash"].get<std::string>();
  for (std::size_t i = from; i < lines.size(); ++i) {
    json r = json::parse(lines[i]);
    r.erase("hash");
    r["prevHash"] = prev;
    std::string body = r.dump();
    body.pop_back();
    const std::string in = prev + "\n" + body;
    prev = crypto::to_hex(crypto::sha256(std::span(reinterpret_cast<const std::uint8_t*>(in.data()), in.size())));
    lines[i] = body + ",\"hash\":\"" + prev + "\"}";
  }
}

// An edit below the head with the plain hashes recomputed and no checkpoint
// MAC in between: only the head's hash showed it, until later calls moved
// the head onto the forged chain. The first append onto it records the
// fork.
TEST_F(AuditTamperTest, RehashedEditBelowTheHeadStaysNamedAfterLaterCallsMoveTheHead) {
  KmsCoreOptions opts;
  opts.audit_checkpoint_every = 8;
  // Two records after the last checkpoint, named by the head at close.
  ok("ListKeys", json::object());
  ok("ListKeys", json::object());
  core_.reset();
  auto l = lines_of(path_);
  const std::uint64_t head_seq = json::parse(test::read_text(state_ + "/audit.head"))["seq"];
  ASSERT_EQ(head_seq, l.size());
  json edited = json::parse(l[l.size() - 2]);
  ASSERT_EQ(edited["eventName"], "ListKeys");
  ASSERT_NE(edited.value("eventType", std::string()), "AuditCheckpoint");
  edited["userIdentity"]["uid"] = 4242;
  l[l.size() - 2] = edited.dump();
  rehash_from(l, l.size() - 2);
  write_lines(path_, l);
  for (int i = 0; i < 12; ++i) {
    open_core(opts);
    ok("ListKeys", json::object());
  }
  core_.reset();
  ASSERT_GT(json::parse(test::read_text(state_ + "/audit.head"))["seq"].get<std::uint64_t>(), head_seq);
  open_core(opts);
  auto v = verify();
  EXPECT_FALSE(v["Valid"]) << v.dump();
  EXPECT_EQ(v["Line"], l.size() + 1) << v.dump();
  EXPECT_NE(v.value("Problem", std::string()).find("rewritten"), std::string::npos) << v.dump();
  EXPECT_NE(v.value("Problem", std::string()).find("seq " + std::to_string(head_seq)), std::string::npos) << v.dump();
}

}  // namespace
}  // namespace kmsfs::keyclient
