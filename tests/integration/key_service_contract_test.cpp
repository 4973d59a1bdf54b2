// The KeyService contract: the same typed suite runs against the embedded
// core (in this process) and against a real kmsd through KmsdClient, so
// that both homes of the core answer alike, errors included.

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "crypto/encoding.h"
#include "keyclient/kms_options.h"
#include "keyclient/kmsd_client.h"
#include "tests/integration/kmsd_fixture.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

using namespace kmsfs::keyclient;
using json = nlohmann::json;

struct Embedded {
  static inline std::string root;
  static inline std::unique_ptr<KeyService> svc;
  static void set_up() {
    root = make_temp_dir("kmsfs-contract");
    KmsOptions o;
    o.spec = "embedded";
    o.home = root + "/home";
    auto s = make_key_service(o);
    if (!s) throw std::runtime_error(s.error().to_string());
    svc = std::move(*s);
  }
  static void tear_down() {
    svc.reset();
    remove_tree(root);
  }
};

struct ThroughKmsd {
  static inline std::string root;
  static inline std::unique_ptr<KmsdProcess> kmsd;
  static inline std::unique_ptr<KeyService> svc;
  static void set_up() {
    root = make_temp_dir("kmsfs-contract-kmsd");
    kmsd = std::make_unique<KmsdProcess>(root);
    kmsd->start();
    KmsdClientOptions o;
    o.socket_path = kmsd->socket();
    svc = std::make_unique<KmsdClient>(o);
  }
  static void tear_down() {
    svc.reset();
    if (kmsd) {
      EXPECT_EQ(kmsd->stop(SIGTERM), 0) << kmsd->log();
    }
    kmsd.reset();
    remove_tree(root);
  }
};

template <class Impl>
class KeyServiceContract : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { Impl::set_up(); }
  static void TearDownTestSuite() { Impl::tear_down(); }
  KeyService& kms() { return *Impl::svc; }

  std::string new_key(const std::string& description = "contract") {
    CreateKeyRequest r;
    r.description = description;
    auto k = kms().create_key(r);
    EXPECT_TRUE(k) << k.error().to_string();
    return k ? k->key_metadata.key_id : std::string();
  }
};

using Implementations = ::testing::Types<Embedded, ThroughKmsd>;
class Names {
 public:
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, Embedded> ? "Embedded" : "Kmsd";
  }
};
TYPED_TEST_SUITE(KeyServiceContract, Implementations, Names);

TYPED_TEST(KeyServiceContract, CreateKeyThenDescribeIt) {
  const std::string id = this->new_key("described");
  auto d = this->kms().describe_key({id});
  ASSERT_TRUE(d) << d.error().to_string();
  EXPECT_EQ(d->key_metadata.key_id, id);
  EXPECT_EQ(d->key_metadata.description, "described");
  EXPECT_EQ(d->key_metadata.key_state, "Enabled");
  EXPECT_TRUE(d->key_metadata.enabled);
  EXPECT_NE(d->key_metadata.arn.find(id), std::string::npos);
}

TYPED_TEST(KeyServiceContract, UnknownKeyIsNotFound) {
  auto d = this->kms().describe_key({"alias/does-not-exist"});
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, KmsErrorCode::NotFoundException) << d.error().to_string();
}

TYPED_TEST(KeyServiceContract, AliasesAreCreatedListedAndUnique) {
  const std::string id = this->new_key();
  const std::string alias = "alias/contract-" + std::to_string(::getpid()) + "-" + id.substr(0, 8);
  ASSERT_TRUE(this->kms().create_alias({alias, id}));
  auto again = this->kms().create_alias({alias, id});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, KmsErrorCode::AlreadyExistsException);
  ListAliasesRequest lr;
  lr.key_id = id;
  auto l = this->kms().list_aliases(lr);
  ASSERT_TRUE(l) << l.error().to_string();
  bool found = false;
  for (const auto& a : l->aliases) found = found || a.alias_name == alias;
  EXPECT_TRUE(found);
  auto d = this->kms().describe_key({alias});
  ASSERT_TRUE(d);
  EXPECT_EQ(d->key_metadata.key_id, id);
}

TYPED_TEST(KeyServiceContract, DataKeyRoundTripWithContext) {
  GenerateDataKeyRequest g;
  g.key_id = this->new_key();
  g.key_spec = "AES_256";
  g.encryption_context = {{"kmsfs:fs", "f00d"}, {"kmsfs:file", "1"}};
  auto dk = this->kms().generate_data_key(g);
  ASSERT_TRUE(dk) << dk.error().to_string();
  EXPECT_EQ(dk->plaintext.size(), 32u);
  DecryptRequest d;
  d.ciphertext_blob = dk->ciphertext_blob;
  d.encryption_context = g.encryption_context;
  auto p = this->kms().decrypt(d);
  ASSERT_TRUE(p) << p.error().to_string();
  EXPECT_TRUE(p->plaintext == dk->plaintext);
  EXPECT_EQ(p->key_id, dk->key_id);
}

TYPED_TEST(KeyServiceContract, WrongContextOrTamperedBlobIsInvalidCiphertext) {
  GenerateDataKeyRequest g;
  g.key_id = this->new_key();
  g.number_of_bytes = 16;
  g.encryption_context = {{"a", "b"}};
  auto dk = this->kms().generate_data_key(g);
  ASSERT_TRUE(dk) << dk.error().to_string();
  DecryptRequest d;
  d.ciphertext_blob = dk->ciphertext_blob;
  d.encryption_context = {{"a", "c"}};
  auto p = this->kms().decrypt(d);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, KmsErrorCode::InvalidCiphertextException) << p.error().to_string();
  d.encryption_context = g.encryption_context;
  d.ciphertext_blob.back() ^= 1;
  p = this->kms().decrypt(d);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, KmsErrorCode::InvalidCiphertextException) << p.error().to_string();
}

TYPED_TEST(KeyServiceContract, DecryptNamingAnotherKeyIsIncorrectKey) {
  GenerateDataKeyRequest g;
  g.key_id = this->new_key();
  g.key_spec = "AES_256";
  auto dk = this->kms().generate_data_key(g);
  ASSERT_TRUE(dk);
  DecryptRequest d;
  d.ciphertext_blob = dk->ciphertext_blob;
  d.key_id = this->new_key("other");
  auto p = this->kms().decrypt(d);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, KmsErrorCode::IncorrectKeyException) << p.error().to_string();
}

TYPED_TEST(KeyServiceContract, EncryptDecryptRoundTrip) {
  EncryptRequest e;
  e.key_id = this->new_key();
  e.plaintext = crypto::SecureBuffer::from_string("attack at dawn");
  e.encryption_context = {{"purpose", "contract"}};
  auto c = this->kms().encrypt(e);
  ASSERT_TRUE(c) << c.error().to_string();
  DecryptRequest d;
  d.ciphertext_blob = c->ciphertext_blob;
  d.encryption_context = e.encryption_context;
  auto p = this->kms().decrypt(d);
  ASSERT_TRUE(p) << p.error().to_string();
  EXPECT_EQ(p->plaintext.view(), "attack at dawn");
}

TYPED_TEST(KeyServiceContract, GenerateRandomAndItsLimits) {
  auto r = this->kms().generate_random({64});
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(r->plaintext.size(), 64u);
  auto bad = this->kms().generate_random({0});
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, KmsErrorCode::ValidationException);
}

TYPED_TEST(KeyServiceContract, CallByOperationNameSpeaksAwsJson) {
  const std::string id = this->new_key();
  auto g = this->kms().call("GenerateDataKey",
                            json{{"KeyId", id}, {"KeySpec", "AES_256"}, {"EncryptionContext", {{"x", "y"}}}});
  ASSERT_TRUE(g) << g.error().to_string();
  ASSERT_TRUE((*g)["Plaintext"].is_string());
  ASSERT_TRUE((*g)["CiphertextBlob"].is_string());
  auto d = this->kms().call("Decrypt", json{{"CiphertextBlob", (*g)["CiphertextBlob"]},
                                            {"EncryptionContext", {{"x", "y"}}}});
  ASSERT_TRUE(d) << d.error().to_string();
  EXPECT_EQ((*d)["Plaintext"], (*g)["Plaintext"]);
  EXPECT_EQ((*d)["KeyId"], (*g)["KeyId"]);
}

TYPED_TEST(KeyServiceContract, UnknownOperationAndMalformedBodiesAreErrors) {
  auto u = this->kms().call("NoSuchOperation", json::object());
  ASSERT_FALSE(u);
  EXPECT_EQ(u.error().code, KmsErrorCode::UnsupportedOperationException);
  auto m = this->kms().call("Decrypt", json{{"CiphertextBlob", 5}});
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, KmsErrorCode::ValidationException) << m.error().to_string();
  auto b = this->kms().call("Decrypt", json{{"CiphertextBlob", "!!not base64!!"}});
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, KmsErrorCode::ValidationException) << b.error().to_string();
}

TYPED_TEST(KeyServiceContract, ConcurrentCallersGetTheirOwnKeys) {
  const std::string id = this->new_key();
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        GenerateDataKeyRequest g;
        g.key_id = id;
        g.key_spec = "AES_256";
        g.encryption_context = {{"t", std::to_string(t)}, {"i", std::to_string(i)}};
        auto dk = this->kms().generate_data_key(g);
        if (!dk) {
          ++bad;
          continue;
        }
        DecryptRequest d;
        d.ciphertext_blob = dk->ciphertext_blob;
        d.encryption_context = g.encryption_context;
        auto p = this->kms().decrypt(d);
        if (!p || !(p->plaintext == dk->plaintext)) ++bad;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace kmsfs::test
