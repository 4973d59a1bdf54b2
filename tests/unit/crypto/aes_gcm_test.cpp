#include "crypto/aes_gcm.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstdint>
#include <string>
#include <vector>

#include "crypto/encoding.h"
#include "tests/unit/crypto/test_bytes.h"

namespace kmsfs::crypto {
namespace {

using test::hex;
using Bytes = std::vector<std::uint8_t>;

// The GCM test vectors of McGrew and Viega, "The Galois/Counter Mode of
// Operation (GCM)", appendix B (also NIST's gcmEncryptExtIV vectors).
// Cases 1-4 are AES-128, 13-16 AES-256; all use a 96-bit IV. Each was
// cross-checked against OpenSSL through an independent binding.
struct KnownAnswer {
  const char* name;
  const char* key;
  const char* iv;
  const char* aad;
  const char* pt;
  const char* ct;
  const char* tag;
};

constexpr const char* kP64 =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
constexpr const char* kP60 =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
constexpr const char* kAad = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
constexpr const char* kIv = "cafebabefacedbaddecaf888";
constexpr const char* kKey128 = "feffe9928665731c6d6a8f9467308308";
constexpr const char* kKey256 =
    "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
constexpr const char* kZero128 = "00000000000000000000000000000000";
constexpr const char* kZero256 =
    "0000000000000000000000000000000000000000000000000000000000000000";
constexpr const char* kZeroIv = "000000000000000000000000";

const KnownAnswer kVectors[] = {
    {"Case1Aes128Empty", kZero128, kZeroIv, "", "", "", "58e2fccefa7e3061367f1d57a4e7455a"},
    {"Case2Aes128OneBlock", kZero128, kZeroIv, "", kZero128, "0388dace60b6a392f328c2b971b2fe78",
     "ab6e47d42cec13bdf53a67b21257bddf"},
    {"Case3Aes128", kKey128, kIv, "", kP64,
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
     "4d5c2af327cd64a62cf35abd2ba6fab4"},
    {"Case4Aes128WithAad", kKey128, kIv, kAad, kP60,
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
     "5bc94fbc3221a5db94fae95ae7121a47"},
    {"Case13Aes256Empty", kZero256, kZeroIv, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
    {"Case14Aes256OneBlock", kZero256, kZeroIv, "", kZero128, "cea7403d4d606b6e074ec5d3baf39d18",
     "d0d1c8a799996bf0265b98b5d48ab919"},
    {"Case15Aes256", kKey256, kIv, "", kP64,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
     "b094dac5d93471bdec1a502270e3cc6c"},
    {"Case16Aes256WithAad", kKey256, kIv, kAad, kP60,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"},
};

class AesGcmKnownAnswer : public ::testing::TestWithParam<KnownAnswer> {};

TEST_P(AesGcmKnownAnswer, EncryptMatchesVector) {
  const KnownAnswer& v = GetParam();
  Bytes key = hex(v.key), iv = hex(v.iv), aad = hex(v.aad), pt = hex(v.pt);
  Bytes ct(pt.size()), tag(AesGcm::kTagSize);
  ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, pt, ct.data(), tag.data()));
  EXPECT_EQ(to_hex(ct), v.ct);
  EXPECT_EQ(to_hex(tag), v.tag);
}

TEST_P(AesGcmKnownAnswer, DecryptMatchesVector) {
  const KnownAnswer& v = GetParam();
  Bytes key = hex(v.key), iv = hex(v.iv), aad = hex(v.aad), ct = hex(v.ct), tag = hex(v.tag);
  Bytes pt(ct.size());
  ASSERT_TRUE(AesGcm::decrypt(key, iv, aad, ct, tag, pt.data()));
  EXPECT_EQ(to_hex(pt), v.pt);
}

TEST_P(AesGcmKnownAnswer, EncryptsInPlace) {
  const KnownAnswer& v = GetParam();
  Bytes key = hex(v.key), iv = hex(v.iv), aad = hex(v.aad), buf = hex(v.pt);
  Bytes tag(AesGcm::kTagSize);
  ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, buf, buf.data(), tag.data()));
  EXPECT_EQ(to_hex(buf), v.ct);
  ASSERT_TRUE(AesGcm::decrypt(key, iv, aad, buf, tag, buf.data()));
  EXPECT_EQ(to_hex(buf), v.pt);
}

INSTANTIATE_TEST_SUITE_P(McGrewViega, AesGcmKnownAnswer, ::testing::ValuesIn(kVectors),
                         [](const ::testing::TestParamInfo<KnownAnswer>& param_info) {
                           return std::string(param_info.param.name);
                         });

// A fixture holding one encrypted 4 KiB block shaped like a kmsfs block:
// AES-256, 12-byte IV, AAD = 16-byte file id ‖ 8-byte block number.
class AesGcmTamper : public ::testing::Test {
 protected:
  void SetUp() override {
    key = hex(kKey256);
    iv = hex(kIv);
    aad = hex("00112233445566778899aabbccddeeff0000000000000007");
    pt.resize(4096);
    for (std::size_t i = 0; i < pt.size(); ++i) pt[i] = static_cast<std::uint8_t>(i * 7 + 3);
    ct.resize(pt.size());
    tag.resize(AesGcm::kTagSize);
    ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, pt, ct.data(), tag.data()));
  }
  bool opens() {
    out.assign(ct.size(), 0xAA);
    return AesGcm::decrypt(key, iv, aad, ct, tag, out.data());
  }
  Bytes key, iv, aad, pt, ct, tag, out;
};

TEST_F(AesGcmTamper, UntouchedBlockOpens) {
  ASSERT_TRUE(opens());
  EXPECT_EQ(out, pt);
}

TEST_F(AesGcmTamper, RejectsFlippedTagBit) {
  for (std::size_t i = 0; i < tag.size(); ++i) {
    tag[i] ^= 0x01;
    EXPECT_FALSE(opens()) << "tag byte " << i;
    tag[i] ^= 0x01;
  }
  tag[15] ^= 0x80;
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, RejectsFlippedCiphertextBit) {
  for (std::size_t i : {std::size_t{0}, std::size_t{1}, std::size_t{2047}, std::size_t{4095}}) {
    ct[i] ^= 0x40;
    EXPECT_FALSE(opens()) << "ciphertext byte " << i;
    ct[i] ^= 0x40;
  }
}

TEST_F(AesGcmTamper, RejectsChangedAad) {
  aad.back() ^= 0x01;  // another block number: a moved block
  EXPECT_FALSE(opens());
  aad.back() ^= 0x01;
  aad.front() ^= 0x01;  // another file id: a block from another file
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, RejectsMissingOrExtraAad) {
  Bytes saved = aad;
  aad.clear();
  EXPECT_FALSE(opens());
  aad = saved;
  aad.push_back(0);
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, RejectsChangedIv) {
  iv[0] ^= 0x01;
  EXPECT_FALSE(opens());
  iv[0] ^= 0x01;
  iv[11] ^= 0x80;
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, RejectsWrongKey) {
  key[31] ^= 0x01;
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, RejectsTruncatedCiphertext) {
  ct.pop_back();
  EXPECT_FALSE(opens());
}

TEST_F(AesGcmTamper, FailedDecryptCleansOutput) {
  tag[0] ^= 0x01;
  ASSERT_FALSE(opens());
  EXPECT_EQ(out, Bytes(out.size(), 0)) << "unauthenticated plaintext must not be left behind";
}

TEST(AesGcm, RejectsBadKeySize) {
  Bytes iv(12), pt(16), ct(16), tag(16);
  for (std::size_t n : {0, 1, 15, 17, 24, 31, 33, 64}) {
    Bytes key(n, 0x11);
    EXPECT_FALSE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data())) << n;
    EXPECT_FALSE(AesGcm::decrypt(key, iv, {}, ct, tag, pt.data())) << n;
  }
}

TEST(AesGcm, RejectsBadIvSize) {
  Bytes key(32), pt(16), ct(16), tag(16);
  for (std::size_t n : {0, 8, 11, 13, 16}) {
    Bytes iv(n);
    EXPECT_FALSE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data())) << n;
    EXPECT_FALSE(AesGcm::decrypt(key, iv, {}, ct, tag, pt.data())) << n;
  }
}

TEST(AesGcm, RejectsBadTagSize) {
  Bytes key(32), iv(12), pt(16), ct(16), tag(16);
  ASSERT_TRUE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data()));
  Bytes short_tag(tag.begin(), tag.begin() + 12);
  EXPECT_FALSE(AesGcm::decrypt(key, iv, {}, ct, short_tag, pt.data()));
  Bytes empty_tag;
  EXPECT_FALSE(AesGcm::decrypt(key, iv, {}, ct, empty_tag, pt.data()));
}

TEST(AesGcm, EmptyPlaintextAuthenticatesAadOnly) {
  Bytes key(32, 0x5c), iv(12, 0x01), aad = hex("0102030405"), tag(16);
  ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, {}, nullptr, tag.data()));
  EXPECT_TRUE(AesGcm::decrypt(key, iv, aad, {}, tag, nullptr));
  aad[0] ^= 1;
  EXPECT_FALSE(AesGcm::decrypt(key, iv, aad, {}, tag, nullptr));
}

TEST(AesGcm, SwitchesBetweenKeySizesOnOneThread) {
  // The EVP context is per thread and reused: alternating ciphers must not
  // leak state from one call into the next.
  for (int round = 0; round < 3; ++round) {
    for (const KnownAnswer& v : kVectors) {
      Bytes key = hex(v.key), iv = hex(v.iv), aad = hex(v.aad), pt = hex(v.pt);
      Bytes ct(pt.size()), tag(16);
      ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, pt, ct.data(), tag.data()));
      EXPECT_EQ(to_hex(tag), v.tag) << v.name;
    }
  }
}

// Reference: a fresh EVP context per call (what AesGcm did before it kept
// the key schedule per thread).
void reference_encrypt(const Bytes& key, const Bytes& iv, const Bytes& aad, const Bytes& pt, Bytes& ct, Bytes& tag) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ASSERT_NE(ctx, nullptr);
  const EVP_CIPHER* c = key.size() == 16 ? EVP_aes_128_gcm() : EVP_aes_256_gcm();
  int len = 0;
  ct.assign(pt.size(), 0);
  tag.assign(16, 0);
  ASSERT_EQ(EVP_EncryptInit_ex(ctx, c, nullptr, key.data(), iv.data()), 1);
  if (!aad.empty()) {
    ASSERT_EQ(EVP_EncryptUpdate(ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())), 1);
  }
  if (!pt.empty()) {
    ASSERT_EQ(EVP_EncryptUpdate(ctx, ct.data(), &len, pt.data(), static_cast<int>(pt.size())), 1);
  }
  ASSERT_EQ(EVP_EncryptFinal_ex(ctx, ct.data() + pt.size(), &len), 1);
  ASSERT_EQ(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag.data()), 1);
  EVP_CIPHER_CTX_free(ctx);
}

TEST(AesGcm, ReusedKeyScheduleGivesTheSameBytesAsAFreshContext) {
  // Interleaves keys, IVs, directions and failures on one thread, the way
  // the block paths do, and compares every result with a fresh context.
  Bytes k1(32, 0x11), k2(32, 0x22), k3(16, 0x33);
  const Bytes* keys[] = {&k1, &k1, &k2, &k1, &k3, &k3, &k2, &k2};
  for (int round = 0; round < 40; ++round) {
    const Bytes& key = *keys[round % 8];
    Bytes iv(12), aad(24), pt(round % 3 == 0 ? 4096 : 100 + round);
    for (std::size_t i = 0; i < iv.size(); ++i) iv[i] = static_cast<std::uint8_t>(round * 7 + i);
    for (std::size_t i = 0; i < aad.size(); ++i) aad[i] = static_cast<std::uint8_t>(round + i);
    for (std::size_t i = 0; i < pt.size(); ++i) pt[i] = static_cast<std::uint8_t>(i * 31 + round);
    Bytes want_ct, want_tag;
    reference_encrypt(key, iv, aad, pt, want_ct, want_tag);
    Bytes ct(pt.size()), tag(16);
    ASSERT_TRUE(AesGcm::encrypt(key, iv, aad, pt, ct.data(), tag.data()));
    EXPECT_EQ(ct, want_ct) << "round " << round;
    EXPECT_EQ(tag, want_tag) << "round " << round;
    Bytes back(pt.size());
    ASSERT_TRUE(AesGcm::decrypt(key, iv, aad, ct, tag, back.data()));
    EXPECT_EQ(back, pt);
    if (round % 5 == 0) {
      Bytes bad = tag;
      bad[0] ^= 1;
      EXPECT_FALSE(AesGcm::decrypt(key, iv, aad, ct, bad, back.data()));
    }
  }
}

TEST(AesGcm, KeyChangedInPlaceIsNotServedFromTheThreadCache) {
  // Same buffer (same address), new content: the cache compares bytes, not
  // pointers, so a DEK buffer reused for another file's key is never
  // encrypted under the old schedule.
  Bytes key(32, 0x44), iv(12, 0x05), pt(64, 0x77), ct(64), tag(16), want_ct, want_tag;
  ASSERT_TRUE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data()));
  key[31] ^= 0x80;
  ASSERT_TRUE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data()));
  reference_encrypt(key, iv, {}, pt, want_ct, want_tag);
  EXPECT_EQ(ct, want_ct);
  EXPECT_EQ(tag, want_tag);
}

TEST(AesGcm, ForgetThreadKeyKeepsWorking) {
  Bytes key(32, 0x66), iv(12, 0x07), pt(32, 0x01), ct(32), tag(16), want_ct, want_tag;
  ASSERT_TRUE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data()));
  AesGcm::forget_thread_key();
  ASSERT_TRUE(AesGcm::encrypt(key, iv, {}, pt, ct.data(), tag.data()));
  reference_encrypt(key, iv, {}, pt, want_ct, want_tag);
  EXPECT_EQ(ct, want_ct);
  EXPECT_EQ(tag, want_tag);
}

}  // namespace
}  // namespace kmsfs::crypto
