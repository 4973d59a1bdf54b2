#include "keyclient/pkcs11_hsm.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <p11-kit/pkcs11.h>

#include <cstring>
#include <thread>
#include <vector>

#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using test::open_test_hsm;
using test::unique_token_label;

std::vector<std::uint8_t> bytes(const char* s) { return {s, s + std::strlen(s)}; }

// A second, raw view of the module in this process, to check what
// Pkcs11Hsm did behind its interface. The module is already initialised by
// the Pkcs11Hsm under test, so this never calls C_Initialize/C_Finalize.
class RawModule {
 public:
  RawModule() {
    lib_ = ::dlopen(test::module_path().c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib_ == nullptr) throw std::runtime_error("dlopen");
    auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib_, "C_GetFunctionList"));
    if (get == nullptr || get(&f_) != CKR_OK) throw std::runtime_error("C_GetFunctionList");
  }
  ~RawModule() { ::dlclose(lib_); }
  RawModule(const RawModule&) = delete;
  RawModule& operator=(const RawModule&) = delete;

  CK_FUNCTION_LIST_PTR f() const { return f_; }

  CK_SLOT_ID slot_of(const std::string& label) const {
    CK_ULONG n = 0;
    f_->C_GetSlotList(CK_TRUE, nullptr, &n);
    std::vector<CK_SLOT_ID> slots(n);
    f_->C_GetSlotList(CK_TRUE, slots.data(), &n);
    std::string padded = label;
    padded.resize(32, ' ');
    for (CK_ULONG i = 0; i < n; ++i) {
      CK_TOKEN_INFO ti{};
      if (f_->C_GetTokenInfo(slots[i], &ti) == CKR_OK && std::memcmp(ti.label, padded.data(), 32) == 0) {
        return slots[i];
      }
    }
    throw std::runtime_error("token not found: " + label);
  }

 private:
  void* lib_ = nullptr;
  CK_FUNCTION_LIST_PTR f_ = nullptr;
};

TEST(Pkcs11Hsm, InitialisesTokenThroughTheApiAndReopensIt) {
  const auto label = unique_token_label();
  auto first = open_test_hsm(label);
  ASSERT_TRUE(first->generate_aes_key("kmsfs/persist/v1", 32));
  first.reset();  // last user in the process: C_Finalize
  auto second = open_test_hsm(label);  // finds the initialised token by label
  auto exists = second->key_exists("kmsfs/persist/v1");
  ASSERT_TRUE(exists) << exists.error().message;
  EXPECT_TRUE(*exists);
}

TEST(Pkcs11Hsm, WrongPinIsRefused) {
  const auto label = unique_token_label();
  { auto hsm = open_test_hsm(label); }
  Pkcs11Config cfg;
  cfg.module_path = test::module_path();
  cfg.token_label = label;
  cfg.user_pin = crypto::SecureBuffer::from_string("wrong-pin");
  auto r = Pkcs11Hsm::open(std::move(cfg));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, HsmError::Kind::NotLoggedIn);
  EXPECT_NE(r.error().message.find("CKR_PIN_INCORRECT"), std::string::npos) << r.error().message;
}

TEST(Pkcs11Hsm, MissingTokenWithoutInitIsAnError) {
  Pkcs11Config cfg;
  cfg.module_path = test::module_path();
  cfg.token_label = unique_token_label();
  cfg.user_pin = crypto::SecureBuffer::from_string("1234");
  auto r = Pkcs11Hsm::open(std::move(cfg));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find(cfg.token_label), std::string::npos) << r.error().message;
}

TEST(Pkcs11Hsm, MissingModuleIsAnError) {
  Pkcs11Config cfg;
  cfg.module_path = "/nonexistent/libnothing.so";
  cfg.user_pin = crypto::SecureBuffer::from_string("1234");
  auto r = Pkcs11Hsm::open(std::move(cfg));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, HsmError::Kind::DeviceError);
  EXPECT_NE(r.error().message.find("/nonexistent/libnothing.so"), std::string::npos);
}

TEST(Pkcs11Hsm, KeyAttributesAreSetExplicitly) {
  const auto label = unique_token_label();
  auto hsm = open_test_hsm(label);
  const std::string key = "kmsfs/attr/v1";
  ASSERT_TRUE(hsm->generate_aes_key(key, 32));

  RawModule raw;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  ASSERT_EQ(raw.f()->C_OpenSession(raw.slot_of(label), CKF_SERIAL_SESSION, nullptr, nullptr, &s), CKR_OK);
  // The token is logged in for the whole application, so private objects show.
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE find[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, const_cast<char*>(key.data()), key.size()}};
  ASSERT_EQ(raw.f()->C_FindObjectsInit(s, find, 2), CKR_OK);
  CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
  CK_ULONG count = 0;
  ASSERT_EQ(raw.f()->C_FindObjects(s, &obj, 1, &count), CKR_OK);
  raw.f()->C_FindObjectsFinal(s);
  ASSERT_EQ(count, 1u);

  CK_BBOOL token = 0, priv = 0, sensitive = 0, extractable = 1, modifiable = 1, enc = 0, dec = 0, wrap = 1,
           unwrap = 1, always_sensitive = 0, never_extractable = 0;
  CK_ULONG value_len = 0;
  CK_KEY_TYPE type = 0;
  char id[64] = {};
  CK_ATTRIBUTE attrs[] = {
      {CKA_TOKEN, &token, sizeof token},
      {CKA_PRIVATE, &priv, sizeof priv},
      {CKA_SENSITIVE, &sensitive, sizeof sensitive},
      {CKA_EXTRACTABLE, &extractable, sizeof extractable},
      {CKA_MODIFIABLE, &modifiable, sizeof modifiable},
      {CKA_ENCRYPT, &enc, sizeof enc},
      {CKA_DECRYPT, &dec, sizeof dec},
      {CKA_WRAP, &wrap, sizeof wrap},
      {CKA_UNWRAP, &unwrap, sizeof unwrap},
      {CKA_ALWAYS_SENSITIVE, &always_sensitive, sizeof always_sensitive},
      {CKA_NEVER_EXTRACTABLE, &never_extractable, sizeof never_extractable},
      {CKA_VALUE_LEN, &value_len, sizeof value_len},
      {CKA_KEY_TYPE, &type, sizeof type},
      {CKA_ID, id, sizeof id},
  };
  ASSERT_EQ(raw.f()->C_GetAttributeValue(s, obj, attrs, sizeof attrs / sizeof attrs[0]), CKR_OK);
  EXPECT_EQ(token, CK_TRUE);
  EXPECT_EQ(priv, CK_TRUE);
  EXPECT_EQ(sensitive, CK_TRUE);
  EXPECT_EQ(extractable, CK_FALSE);
  EXPECT_EQ(modifiable, CK_FALSE);
  EXPECT_EQ(enc, CK_TRUE);
  EXPECT_EQ(dec, CK_TRUE);
  EXPECT_EQ(wrap, CK_FALSE);
  EXPECT_EQ(unwrap, CK_FALSE);
  EXPECT_EQ(always_sensitive, CK_TRUE);
  EXPECT_EQ(never_extractable, CK_TRUE);
  EXPECT_EQ(value_len, 32u);
  EXPECT_EQ(type, CKK_AES);
  EXPECT_EQ(std::string(id, attrs[13].ulValueLen), key);

  // The key value itself never leaves the HSM.
  std::uint8_t value[32];
  CK_ATTRIBUTE v{CKA_VALUE, value, sizeof value};
  EXPECT_EQ(raw.f()->C_GetAttributeValue(s, obj, &v, 1), CKR_ATTRIBUTE_SENSITIVE);
  raw.f()->C_CloseSession(s);
}

TEST(Pkcs11Hsm, GenerateTwiceWithOneLabelFails) {
  auto hsm = open_test_hsm(unique_token_label());
  ASSERT_TRUE(hsm->generate_aes_key("kmsfs/dup/v1", 32));
  auto again = hsm->generate_aes_key("kmsfs/dup/v1", 32);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().kind, HsmError::Kind::InvalidArgument);
}

TEST(Pkcs11Hsm, GcmRoundTripAndRejections) {
  auto hsm = open_test_hsm(unique_token_label());
  const std::string key = "kmsfs/gcm/v1";
  ASSERT_TRUE(hsm->generate_aes_key(key, 32));
  std::vector<std::uint8_t> iv(12, 7);
  auto aad = bytes("header+context");
  auto pt = bytes("thirty-two bytes of data key....");
  auto ct = hsm->encrypt_gcm(key, iv, aad, pt);
  ASSERT_TRUE(ct) << ct.error().message;
  ASSERT_EQ(ct->size(), pt.size() + 16);
  EXPECT_NE(std::vector<std::uint8_t>(ct->begin(), ct->begin() + 32), pt);

  auto back = hsm->decrypt_gcm(key, iv, aad, *ct);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(std::vector<std::uint8_t>(back->span().begin(), back->span().end()), pt);

  auto wrong_aad = hsm->decrypt_gcm(key, iv, bytes("header+contexT"), *ct);
  ASSERT_FALSE(wrong_aad);
  EXPECT_EQ(wrong_aad.error().kind, HsmError::Kind::AuthenticationFailed) << wrong_aad.error().message;

  auto flipped = *ct;
  flipped[3] ^= 1;
  auto bad_ct = hsm->decrypt_gcm(key, iv, aad, flipped);
  ASSERT_FALSE(bad_ct);
  EXPECT_EQ(bad_ct.error().kind, HsmError::Kind::AuthenticationFailed);

  auto tag_flipped = *ct;
  tag_flipped.back() ^= 0x80;
  EXPECT_FALSE(hsm->decrypt_gcm(key, iv, aad, tag_flipped));

  std::vector<std::uint8_t> other_iv(12, 8);
  EXPECT_FALSE(hsm->decrypt_gcm(key, other_iv, aad, *ct));

  // The session survives failed decryptions.
  auto again = hsm->decrypt_gcm(key, iv, aad, *ct);
  EXPECT_TRUE(again);

  ASSERT_TRUE(hsm->generate_aes_key("kmsfs/gcm/v2", 32));
  auto other_key = hsm->decrypt_gcm("kmsfs/gcm/v2", iv, aad, *ct);
  ASSERT_FALSE(other_key);
  EXPECT_EQ(other_key.error().kind, HsmError::Kind::AuthenticationFailed);
}

TEST(Pkcs11Hsm, UnknownLabelIsKeyNotFound) {
  auto hsm = open_test_hsm(unique_token_label());
  std::vector<std::uint8_t> iv(12, 0);
  auto r = hsm->encrypt_gcm("kmsfs/none/v1", iv, {}, bytes("x"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, HsmError::Kind::KeyNotFound);
  auto e = hsm->key_exists("kmsfs/none/v1");
  ASSERT_TRUE(e);
  EXPECT_FALSE(*e);
}

TEST(Pkcs11Hsm, DestroyRemovesTheKeyAndItsCachedHandle) {
  auto hsm = open_test_hsm(unique_token_label());
  const std::string key = "kmsfs/destroy/v1";
  ASSERT_TRUE(hsm->generate_aes_key(key, 32));
  std::vector<std::uint8_t> iv(12, 1);
  ASSERT_TRUE(hsm->encrypt_gcm(key, iv, {}, bytes("abc")));  // caches the handle
  ASSERT_TRUE(hsm->destroy_key(key));
  EXPECT_FALSE(*hsm->key_exists(key));
  auto r = hsm->encrypt_gcm(key, iv, {}, bytes("abc"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, HsmError::Kind::KeyNotFound);
  EXPECT_FALSE(hsm->destroy_key(key));
}

TEST(Pkcs11Hsm, StaleCachedHandleIsFoundAgain) {
  const auto label = unique_token_label();
  auto a = open_test_hsm(label);
  auto b = open_test_hsm(label);  // a second object on the same token
  const std::string key = "kmsfs/stale/v1";
  ASSERT_TRUE(a->generate_aes_key(key, 32));
  std::vector<std::uint8_t> iv(12, 1);
  auto ct = a->encrypt_gcm(key, iv, {}, bytes("abc"));
  ASSERT_TRUE(ct);
  ASSERT_TRUE(b->decrypt_gcm(key, iv, {}, *ct));  // b caches the handle
  ASSERT_TRUE(a->destroy_key(key));
  ASSERT_TRUE(a->generate_aes_key(key, 32));  // same label, new object
  auto ct2 = a->encrypt_gcm(key, iv, {}, bytes("abc"));
  ASSERT_TRUE(ct2);
  auto r = b->decrypt_gcm(key, iv, {}, *ct2);
  ASSERT_TRUE(r) << r.error().message;
}

TEST(Pkcs11Hsm, RecoversWhenItsSessionsAreClosedUnderIt) {
  const auto label = unique_token_label();
  auto hsm = open_test_hsm(label);
  ASSERT_TRUE(hsm->generate_aes_key("kmsfs/s/v1", 32));
  RawModule raw;
  // Closes every session of this application on the token, logging it out.
  ASSERT_EQ(raw.f()->C_CloseAllSessions(raw.slot_of(label)), CKR_OK);
  std::vector<std::uint8_t> iv(12, 1);
  auto r = hsm->encrypt_gcm("kmsfs/s/v1", iv, {}, bytes("abc"));
  ASSERT_TRUE(r) << r.error().message;
}

TEST(Pkcs11Hsm, RandomFillsTheBuffer) {
  auto hsm = open_test_hsm(unique_token_label());
  std::vector<std::uint8_t> a(64, 0), b(64, 0);
  ASSERT_TRUE(hsm->generate_random(a));
  ASSERT_TRUE(hsm->generate_random(b));
  EXPECT_NE(a, std::vector<std::uint8_t>(64, 0));
  EXPECT_NE(a, b);
}

TEST(Pkcs11Hsm, ConcurrentCallersShareASmallPool) {
  auto hsm = open_test_hsm(unique_token_label(), /*max_sessions=*/2);
  ASSERT_TRUE(hsm->generate_aes_key("kmsfs/conc/v1", 32));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        std::vector<std::uint8_t> iv(12, static_cast<std::uint8_t>(t));
        iv[0] = static_cast<std::uint8_t>(i);
        std::vector<std::uint8_t> pt(32, static_cast<std::uint8_t>(i));
        auto ct = hsm->encrypt_gcm("kmsfs/conc/v1", iv, {}, pt);
        if (!ct) {
          ++failures;
          continue;
        }
        auto back = hsm->decrypt_gcm("kmsfs/conc/v1", iv, {}, *ct);
        if (!back || std::vector<std::uint8_t>(back->span().begin(), back->span().end()) != pt) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

}  // namespace
}  // namespace kmsfs::keyclient
