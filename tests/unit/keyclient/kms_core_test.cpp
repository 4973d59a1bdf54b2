#include "keyclient/kms_core.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "keyclient/ciphertext_blob.h"
#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using test::open_test_hsm;

class KmsCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    state_ = test::make_temp_dir("state");
    token_ = test::unique_token_label();
    core_ = std::make_unique<KmsCore>(state_, open_test_hsm(token_), [this] { return now_; });
  }

  std::unique_ptr<KmsCore> another_core() { return std::make_unique<KmsCore>(state_, open_test_hsm(token_)); }

  KeyMetadata create(const std::string& description = "test key") {
    CreateKeyRequest req;
    req.description = description;
    auto r = core_->create_key(me_, req);
    if (!r) throw std::runtime_error(r.error().to_string());
    return r->key_metadata;
  }

  void set_state(const std::string& key_id, const std::string& state) {
    const std::string path = state_ + "/keys/" + key_id + ".json";
    auto j = nlohmann::json::parse(test::read_text(path));
    j["KeyMetadata"]["KeyState"] = state;
    j["KeyMetadata"]["Enabled"] = state == "Enabled";
    test::write_text(path, j.dump());
  }

  GenerateDataKeyRequest gdk(const std::string& key, EncryptionContext ctx = {}) {
    GenerateDataKeyRequest req;
    req.key_id = key;
    req.key_spec = "AES_256";
    req.encryption_context = std::move(ctx);
    return req;
  }

  std::string state_;
  std::string token_;
  double now_ = 1700000000.0;
  CallerIdentity me_ = CallerIdentity::of_this_process();
  std::unique_ptr<KmsCore> core_;
};

TEST_F(KmsCoreTest, CreateAndDescribeKey) {
  auto m = create("my key");
  EXPECT_EQ(m.aws_account_id, "000000000000");
  EXPECT_TRUE(uuid_from_string(m.key_id));
  EXPECT_EQ(m.key_id[14], '4');  // UUID version 4
  EXPECT_EQ(m.arn, "arn:aws:kms:local:000000000000:key/" + m.key_id);
  EXPECT_EQ(m.description, "my key");
  EXPECT_EQ(m.key_state, "Enabled");
  EXPECT_TRUE(m.enabled);
  EXPECT_EQ(m.key_manager, "CUSTOMER");
  EXPECT_EQ(m.creation_date, now_);

  for (const std::string& ref : {m.key_id, m.arn}) {
    auto d = core_->describe_key(me_, {ref});
    ASSERT_TRUE(d) << d.error().to_string();
    EXPECT_EQ(d->key_metadata.key_id, m.key_id);
    EXPECT_EQ(d->key_metadata.description, "my key");
  }
  // The record stores a default policy naming root.
  auto rec = nlohmann::json::parse(test::read_text(state_ + "/keys/" + m.key_id + ".json"));
  auto policy = nlohmann::json::parse(rec["Policy"].get<std::string>());
  EXPECT_EQ(policy["Statement"][0]["Principal"]["Local"][0], "uid:0");
  EXPECT_EQ(rec["Versions"][0]["HsmLabel"], "kmsfs/" + m.key_id + "/v1");
}

TEST_F(KmsCoreTest, UnknownKeysAndAliasesAreNotFound) {
  auto a = core_->describe_key(me_, {"00000000-0000-4000-8000-000000000000"});
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, KmsErrorCode::NotFoundException);
  EXPECT_EQ(a.error().message, "Key '00000000-0000-4000-8000-000000000000' does not exist");
  auto b = core_->describe_key(me_, {"alias/nothing"});
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, KmsErrorCode::NotFoundException);
  EXPECT_EQ(b.error().message, "Alias alias/nothing is not found.");
  auto c = core_->describe_key(me_, {"not-a-key"});
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, KmsErrorCode::NotFoundException);
  auto d = core_->describe_key(me_, {""});
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, KmsErrorCode::ValidationException);
}

TEST_F(KmsCoreTest, ListKeysPages) {
  std::set<std::string> created;
  for (int i = 0; i < 5; ++i) created.insert(create().key_id);
  std::set<std::string> seen;
  ListKeysRequest req;
  req.limit = 2;
  int pages = 0;
  for (;;) {
    auto r = core_->list_keys(me_, req);
    ASSERT_TRUE(r);
    ++pages;
    for (const auto& k : r->keys) {
      EXPECT_EQ(k.key_arn, "arn:aws:kms:local:000000000000:key/" + k.key_id);
      EXPECT_TRUE(seen.insert(k.key_id).second) << "listed twice: " << k.key_id;
    }
    if (!r->truncated) break;
    ASSERT_TRUE(r->next_marker);
    req.marker = r->next_marker;
  }
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(seen, created);
  req.limit = 0;
  EXPECT_FALSE(core_->list_keys(me_, req));
}

TEST_F(KmsCoreTest, AliasesResolveAndList) {
  auto m = create();
  ASSERT_TRUE(core_->create_alias(me_, {"alias/data", m.key_id}));
  for (const std::string& ref : {std::string("alias/data"), std::string("arn:aws:kms:local:000000000000:alias/data")}) {
    auto d = core_->describe_key(me_, {ref});
    ASSERT_TRUE(d) << ref << ": " << d.error().to_string();
    EXPECT_EQ(d->key_metadata.key_id, m.key_id);
  }
  auto dup = core_->create_alias(me_, {"alias/data", m.key_id});
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code, KmsErrorCode::AlreadyExistsException);

  auto other = create();
  ASSERT_TRUE(core_->create_alias(me_, {"alias/other", other.arn}));
  auto all = core_->list_aliases(me_, {});
  ASSERT_TRUE(all);
  ASSERT_EQ(all->aliases.size(), 2u);
  EXPECT_EQ(all->aliases[0].alias_name, "alias/data");
  EXPECT_EQ(all->aliases[0].alias_arn, "arn:aws:kms:local:000000000000:alias/data");
  EXPECT_EQ(all->aliases[0].target_key_id, m.key_id);
  ListAliasesRequest filtered;
  filtered.key_id = other.key_id;
  auto only = core_->list_aliases(me_, filtered);
  ASSERT_TRUE(only);
  ASSERT_EQ(only->aliases.size(), 1u);
  EXPECT_EQ(only->aliases[0].alias_name, "alias/other");
}

TEST_F(KmsCoreTest, AliasNamesAreValidated) {
  auto m = create();
  struct Case {
    std::string name;
    KmsErrorCode code;
  };
  for (const auto& c : {Case{"data", KmsErrorCode::InvalidAliasNameException},
                        Case{"alias/", KmsErrorCode::InvalidAliasNameException},
                        Case{"alias/aws/ebs", KmsErrorCode::InvalidAliasNameException},
                        Case{"alias/kmsfs/default", KmsErrorCode::InvalidAliasNameException},
                        Case{"alias/has space", KmsErrorCode::ValidationException},
                        Case{"alias/" + std::string(251, 'x'), KmsErrorCode::ValidationException}}) {
    auto r = core_->create_alias(me_, {c.name, m.key_id});
    ASSERT_FALSE(r) << c.name;
    EXPECT_EQ(r.error().code, c.code) << c.name << ": " << r.error().to_string();
  }
  auto missing = core_->create_alias(me_, {"alias/ok", "00000000-0000-4000-8000-000000000000"});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, KmsErrorCode::NotFoundException);
  EXPECT_TRUE(core_->create_alias(me_, {"alias/Ok_name-1/sub", m.key_id}));
}

TEST_F(KmsCoreTest, GenerateDataKeyThenDecryptWithContext) {
  auto m = create();
  ASSERT_TRUE(core_->create_alias(me_, {"alias/vol", m.key_id}));
  EncryptionContext ctx{{"kmsfs:fs", "abc"}, {"kmsfs:file", "123"}};
  auto g = core_->generate_data_key(me_, gdk("alias/vol", ctx));
  ASSERT_TRUE(g) << g.error().to_string();
  EXPECT_EQ(g->key_id, m.arn);
  EXPECT_EQ(g->plaintext.size(), 32u);
  EXPECT_EQ(g->ciphertext_blob.size(), 86u);

  DecryptRequest d;
  d.ciphertext_blob = g->ciphertext_blob;
  d.encryption_context = ctx;
  auto p = core_->decrypt(me_, d);
  ASSERT_TRUE(p) << p.error().to_string();
  EXPECT_EQ(p->key_id, m.arn);
  EXPECT_TRUE(p->plaintext == g->plaintext);

  d.key_id = "alias/vol";  // naming the right key is fine
  EXPECT_TRUE(core_->decrypt(me_, d));
}

TEST_F(KmsCoreTest, DataKeySizes) {
  auto m = create();
  auto req = gdk(m.key_id);
  req.key_spec = "AES_128";
  auto a = core_->generate_data_key(me_, req);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->plaintext.size(), 16u);
  req.key_spec.reset();
  req.number_of_bytes = 1024;
  auto b = core_->generate_data_key(me_, req);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->plaintext.size(), 1024u);
  for (int bad : {0, 1025}) {
    req.number_of_bytes = bad;
    auto r = core_->generate_data_key(me_, req);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, KmsErrorCode::ValidationException);
  }
  req.key_spec = "AES_256";
  req.number_of_bytes = 32;  // both
  EXPECT_EQ(core_->generate_data_key(me_, req).error().code, KmsErrorCode::ValidationException);
  req.key_spec.reset();
  req.number_of_bytes.reset();  // neither
  EXPECT_EQ(core_->generate_data_key(me_, req).error().code, KmsErrorCode::ValidationException);
  req.key_spec = "AES_512";
  EXPECT_EQ(core_->generate_data_key(me_, req).error().code, KmsErrorCode::ValidationException);
}

TEST_F(KmsCoreTest, WrongContextOrTamperedBlobIsInvalidCiphertext) {
  auto m = create();
  EncryptionContext ctx{{"a", "bc"}};
  auto g = core_->generate_data_key(me_, gdk(m.key_id, ctx));
  ASSERT_TRUE(g);

  auto expect_invalid = [&](const Bytes& blob, const EncryptionContext& c, const std::string& what) {
    DecryptRequest d;
    d.ciphertext_blob = blob;
    d.encryption_context = c;
    auto r = core_->decrypt(me_, d);
    ASSERT_FALSE(r) << what;
    EXPECT_EQ(r.error().code, KmsErrorCode::InvalidCiphertextException) << what << ": " << r.error().to_string();
  };
  expect_invalid(g->ciphertext_blob, {{"ab", "c"}}, "shifted context");
  expect_invalid(g->ciphertext_blob, {}, "missing context");
  expect_invalid(g->ciphertext_blob, {{"a", "bc"}, {"x", "y"}}, "extra context");
  for (std::size_t i : {std::size_t{0}, std::size_t{24}, std::size_t{30}, std::size_t{40}, std::size_t{85}}) {
    auto t = g->ciphertext_blob;
    t[i] ^= 0x01;
    expect_invalid(t, ctx, "flipped byte " + std::to_string(i));
  }
  auto truncated = g->ciphertext_blob;
  truncated.pop_back();
  expect_invalid(truncated, ctx, "truncated");
  // Version 2 of this key does not exist.
  auto v2 = g->ciphertext_blob;
  v2[23] = 2;
  expect_invalid(v2, ctx, "unknown version");
}

TEST_F(KmsCoreTest, BlobOfAnotherKeyIsIncorrectKey) {
  auto a = create();
  auto b = create();
  auto g = core_->generate_data_key(me_, gdk(a.key_id));
  ASSERT_TRUE(g);
  DecryptRequest d;
  d.ciphertext_blob = g->ciphertext_blob;
  d.key_id = b.key_id;
  auto r = core_->decrypt(me_, d);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, KmsErrorCode::IncorrectKeyException);
  // Swapping the key id inside the blob to b is caught by the AAD.
  auto swapped = g->ciphertext_blob;
  auto bu = *uuid_from_string(b.key_id);
  std::copy(bu.begin(), bu.end(), swapped.begin() + 4);
  d.ciphertext_blob = swapped;
  d.key_id.reset();
  auto s = core_->decrypt(me_, d);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, KmsErrorCode::InvalidCiphertextException);
}

TEST_F(KmsCoreTest, DisabledAndPendingDeletionKeysRefuseCrypto) {
  auto m = create();
  auto g = core_->generate_data_key(me_, gdk(m.key_id));
  ASSERT_TRUE(g);
  DecryptRequest d;
  d.ciphertext_blob = g->ciphertext_blob;

  set_state(m.key_id, "Disabled");
  auto desc = core_->describe_key(me_, {m.key_id});
  ASSERT_TRUE(desc);  // describe still works
  EXPECT_EQ(desc->key_metadata.key_state, "Disabled");
  auto r1 = core_->generate_data_key(me_, gdk(m.key_id));
  ASSERT_FALSE(r1);
  EXPECT_EQ(r1.error().code, KmsErrorCode::DisabledException);
  auto r2 = core_->decrypt(me_, d);
  ASSERT_FALSE(r2);
  EXPECT_EQ(r2.error().code, KmsErrorCode::DisabledException);

  set_state(m.key_id, "PendingDeletion");
  auto r3 = core_->decrypt(me_, d);
  ASSERT_FALSE(r3);
  EXPECT_EQ(r3.error().code, KmsErrorCode::KMSInvalidStateException);

  set_state(m.key_id, "Enabled");
  EXPECT_TRUE(core_->decrypt(me_, d));
}

TEST_F(KmsCoreTest, EncryptAndGenerateRandom) {
  auto m = create();
  EncryptRequest e;
  e.key_id = m.key_id;
  e.plaintext = crypto::SecureBuffer::from_string("hello");
  e.encryption_context = {{"k", "v"}};
  auto c = core_->encrypt(me_, e);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->ciphertext_blob.size(), CiphertextBlob::kOverhead + 5);
  DecryptRequest d;
  d.ciphertext_blob = c->ciphertext_blob;
  d.encryption_context = {{"k", "v"}};
  auto p = core_->decrypt(me_, d);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->plaintext.view(), "hello");

  e.plaintext = crypto::SecureBuffer(4097);
  EXPECT_EQ(core_->encrypt(me_, e).error().code, KmsErrorCode::ValidationException);
  e.plaintext = crypto::SecureBuffer();
  EXPECT_EQ(core_->encrypt(me_, e).error().code, KmsErrorCode::ValidationException);

  auto r = core_->generate_random(me_, {48});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->plaintext.size(), 48u);
  EXPECT_EQ(core_->generate_random(me_, {0}).error().code, KmsErrorCode::ValidationException);
  EXPECT_EQ(core_->generate_random(me_, {1025}).error().code, KmsErrorCode::ValidationException);
}

TEST_F(KmsCoreTest, MalformedRecordIsAnInternalErrorNamingTheFile) {
  auto m = create();
  const std::string path = state_ + "/keys/" + m.key_id + ".json";
  test::write_text(path, "{ this is not json");
  auto r = core_->describe_key(me_, {m.key_id});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, KmsErrorCode::KMSInternalException);
  EXPECT_NE(r.error().message.find(path), std::string::npos) << r.error().message;
  test::write_text(state_ + "/aliases.json", "[1,2");
  auto a = core_->list_aliases(me_, {});
  ASSERT_FALSE(a);
  EXPECT_NE(a.error().message.find("aliases.json"), std::string::npos);
}

TEST_F(KmsCoreTest, DefaultManagedKeyIsCreatedOnFirstUse) {
  auto g = core_->generate_data_key(me_, gdk(kDefaultManagedAlias));
  ASSERT_TRUE(g) << g.error().to_string();
  auto d = core_->describe_key(me_, {kDefaultManagedAlias});
  ASSERT_TRUE(d);
  EXPECT_EQ(d->key_metadata.key_manager, "AWS");
  EXPECT_EQ(d->key_metadata.description, "Default key that protects kmsfs volumes when no other key is defined");
  EXPECT_EQ(g->key_id, d->key_metadata.arn);
  EXPECT_EQ(core_->list_keys(me_, {})->keys.size(), 1u);
}

TEST_F(KmsCoreTest, DefaultManagedKeyIsCreatedOnceByTwoCores) {
  auto other = another_core();
  std::string id_a, id_b;
  std::thread ta([&] {
    auto r = core_->describe_key(me_, {kDefaultManagedAlias});
    if (r) id_a = r->key_metadata.key_id;
  });
  std::thread tb([&] {
    auto r = other->describe_key(me_, {kDefaultManagedAlias});
    if (r) id_b = r->key_metadata.key_id;
  });
  ta.join();
  tb.join();
  ASSERT_FALSE(id_a.empty());
  EXPECT_EQ(id_a, id_b);
  auto keys = core_->list_keys(me_, {});
  ASSERT_TRUE(keys);
  EXPECT_EQ(keys->keys.size(), 1u);
}

TEST_F(KmsCoreTest, TwoCoresCreatingConcurrentlyLoseNothing) {
  auto other = another_core();
  constexpr int kPerThread = 8;
  auto work = [&](KmsCore& core, const std::string& prefix) {
    for (int i = 0; i < kPerThread; ++i) {
      CreateKeyRequest req;
      auto k = core.create_key(me_, req);
      ASSERT_TRUE(k) << k.error().to_string();
      auto a = core.create_alias(me_, {"alias/" + prefix + std::to_string(i), k->key_metadata.key_id});
      ASSERT_TRUE(a) << a.error().to_string();
    }
  };
  std::thread t1([&] { work(*core_, "a"); });
  std::thread t2([&] { work(*other, "b"); });
  std::thread t3([&] { work(*core_, "c"); });
  t1.join();
  t2.join();
  t3.join();
  EXPECT_EQ(core_->list_keys(me_, {})->keys.size(), 3u * kPerThread);
  EXPECT_EQ(other->list_aliases(me_, {})->aliases.size(), 3u * kPerThread);
  // No temp files are left behind.
  for (const auto& e : std::filesystem::directory_iterator(state_ + "/keys")) {
    EXPECT_EQ(e.path().extension(), ".json") << e.path();
  }
}

TEST_F(KmsCoreTest, KeyCreatedByAnotherCoreIsVisibleAtOnce) {
  auto other = another_core();
  auto m = create();
  auto d = other->describe_key(me_, {m.key_id});
  ASSERT_TRUE(d);
  auto g = other->generate_data_key(me_, gdk(m.key_id));
  ASSERT_TRUE(g);
  DecryptRequest dr;
  dr.ciphertext_blob = g->ciphertext_blob;
  EXPECT_TRUE(core_->decrypt(me_, dr));
}

TEST_F(KmsCoreTest, CreateKeyValidatesItsRequest) {
  CreateKeyRequest req;
  req.origin = "AWS_CLOUDHSM";  // EXTERNAL is supported since #3; custom key stores are not
  EXPECT_EQ(core_->create_key(me_, req).error().code, KmsErrorCode::UnsupportedOperationException);
  req = {};
  req.policy = "not json";
  EXPECT_EQ(core_->create_key(me_, req).error().code, KmsErrorCode::MalformedPolicyDocumentException);
  req = {};
  req.tags = {{"k", "1"}, {"k", "2"}};
  EXPECT_EQ(core_->create_key(me_, req).error().code, KmsErrorCode::TagException);  // as AWS names it
  EXPECT_EQ(core_->list_keys(me_, {})->keys.size(), 0u);
}

}  // namespace
}  // namespace kmsfs::keyclient
