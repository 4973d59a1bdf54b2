#include "crypto/name_cipher.h"

#include <gtest/gtest.h>

#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <random>
#include <thread>
#include <vector>
#include <numeric>

#include "crypto/encoding.h"

namespace kmsfs::crypto {
namespace {

SecureBuffer counting_key() {
  SecureBuffer key(64);
  std::iota(key.data(), key.data() + 64, 0);
  return key;
}

std::array<std::uint8_t, 16> counting_iv() {
  std::array<std::uint8_t, 16> iv{};
  std::iota(iv.begin(), iv.end(), 0);
  return iv;
}

// Vectors cross-checked with an independent AES-SIV implementation
// (pyca/cryptography's AESSIV with the associated data as one component).
TEST(NameCipher, MatchesIndependentImplementation) {
  NameCipher c(counting_key());
  auto iv = counting_iv();
  EXPECT_EQ(c.encrypt_name("hello.txt", iv), "olCkprwYXHaqqfrmP2fFcWsuNRyFQFNohA");
  std::string target = "/etc/passwd";
  auto sealed = c.seal(as_bytes(target), "kmsfs:symlink");
  EXPECT_EQ(to_hex(sealed), "7b4a99f9ecf18b330e25b835db1619beacfee2641cb06cd49fdef8");
}

// OpenSSL's own AES-256-SIV, the reference for NameCipher's RFC 5297 code.
std::vector<std::uint8_t> openssl_siv(const SecureBuffer& key, std::span<const std::uint8_t> ad,
                                      std::span<const std::uint8_t> plain) {
  EVP_CIPHER* siv = EVP_CIPHER_fetch(nullptr, "AES-256-SIV", nullptr);
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  std::vector<std::uint8_t> out(16 + plain.size());
  int len = 0;
  bool ok = siv != nullptr && ctx != nullptr && EVP_EncryptInit_ex2(ctx, siv, key.data(), nullptr, nullptr) == 1 &&
            EVP_EncryptUpdate(ctx, nullptr, &len, ad.data(), static_cast<int>(ad.size())) == 1 &&
            EVP_EncryptUpdate(ctx, out.data() + 16, &len, plain.data(), static_cast<int>(plain.size())) == 1 &&
            EVP_EncryptFinal_ex(ctx, out.data() + 16 + plain.size(), &len) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, out.data()) == 1;
  EVP_CIPHER_CTX_free(ctx);
  EVP_CIPHER_free(siv);
  EXPECT_TRUE(ok);
  return out;
}

TEST(NameCipher, SameBytesAsOpenSslAesSivForEveryLength) {
  std::mt19937 rng(5297);
  auto fill = [&](std::vector<std::uint8_t>& v) {
    for (auto& b : v) b = static_cast<std::uint8_t>(rng());
  };
  for (int k = 0; k < 3; ++k) {
    SecureBuffer key(64);
    for (std::size_t i = 0; i < 64; ++i) key.data()[i] = static_cast<std::uint8_t>(rng());
    SecureBuffer copy(64);
    std::copy(key.data(), key.data() + 64, copy.data());
    NameCipher c(std::move(copy));
    // Lengths from 1: OpenSSL 3.0 drops an empty associated-data string
    // instead of taking it as a component, and cannot seal an empty
    // plaintext; kmsfs never seals either (format.md).
    for (std::size_t ad_len : {1u, 15u, 16u, 17u, 32u, 40u}) {
      for (std::size_t n = 1; n <= 300; n += (n < 70 ? 1 : 23)) {
        std::vector<std::uint8_t> ad(ad_len), plain(n);
        fill(ad);
        fill(plain);
        const std::string ad_str(ad.begin(), ad.end());
        const auto sealed = c.seal(plain, ad_str);
        ASSERT_EQ(sealed, openssl_siv(key, ad, plain)) << "key " << k << ", ad " << ad_len << ", length " << n;
        auto opened = c.open(sealed, ad_str);
        ASSERT_TRUE(opened.has_value()) << n;
        EXPECT_EQ(*opened, plain);
        // Any flipped bit, in the tag or the ciphertext, is refused.
        auto bad = sealed;
        bad[rng() % bad.size()] ^= static_cast<std::uint8_t>(1u << (rng() % 8));
        EXPECT_FALSE(c.open(bad, ad_str).has_value()) << n;
        if (!ad_str.empty()) {
          EXPECT_FALSE(c.open(sealed, ad_str.substr(1)).has_value()) << n;
        }
      }
    }
  }
}

// Ciphers used by turns on one thread (two volumes in one process) and by
// several threads at once keep to their own keys.
TEST(NameCipher, CiphersTakingTurnsAndThreadsKeepToTheirKeys) {
  SecureBuffer other_key(64);
  std::fill(other_key.data(), other_key.data() + 64, 0x5a);
  NameCipher a(counting_key());
  NameCipher b(std::move(other_key));
  auto iv = counting_iv();
  const std::string ea = a.encrypt_name("hello.txt", iv);
  const std::string eb = b.encrypt_name("hello.txt", iv);
  EXPECT_EQ(ea, "olCkprwYXHaqqfrmP2fFcWsuNRyFQFNohA");
  EXPECT_NE(ea, eb);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(a.encrypt_name("hello.txt", iv), ea);
    EXPECT_EQ(b.encrypt_name("hello.txt", iv), eb);
    EXPECT_FALSE(a.decrypt_name(eb, iv).has_value());
    EXPECT_EQ(b.decrypt_name(eb, iv), "hello.txt");
  }
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const NameCipher& c = t % 2 == 0 ? a : b;
      const std::string& expected = t % 2 == 0 ? ea : eb;
      for (int i = 0; i < 500; ++i) {
        if (c.encrypt_name("hello.txt", iv) != expected) wrong++;
        if (c.decrypt_name(expected, iv) != std::optional<std::string>("hello.txt")) wrong++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong, 0);
}

TEST(NameCipher, RoundTripsAwkwardNames) {
  NameCipher c(counting_key());
  auto iv = counting_iv();
  for (std::string name : {std::string("a"), std::string(".hidden"), std::string("with space"),
                           std::string("new\nline"), std::string("ünïcödé ✓"), std::string(255, 'x')}) {
    auto enc = c.encrypt_name(name, iv);
    EXPECT_EQ(enc.find('/'), std::string::npos);
    EXPECT_EQ(enc.find('.'), std::string::npos) << "backing names never contain a dot";
    auto dec = c.decrypt_name(enc, iv);
    ASSERT_TRUE(dec.has_value()) << name;
    EXPECT_EQ(*dec, name);
  }
}

TEST(NameCipher, SameNameDiffersBetweenDirectories) {
  NameCipher c(counting_key());
  auto iv1 = counting_iv();
  auto iv2 = iv1;
  iv2[0] ^= 1;
  EXPECT_EQ(c.encrypt_name("same", iv1), c.encrypt_name("same", iv1));
  EXPECT_NE(c.encrypt_name("same", iv1), c.encrypt_name("same", iv2));
  EXPECT_FALSE(c.decrypt_name(c.encrypt_name("same", iv1), iv2).has_value());
}

TEST(NameCipher, RejectsTamperedOrForeignNames) {
  NameCipher c(counting_key());
  auto iv = counting_iv();
  auto enc = c.encrypt_name("document", iv);
  std::string tampered = enc;
  tampered[3] = tampered[3] == 'A' ? 'B' : 'A';
  EXPECT_FALSE(c.decrypt_name(tampered, iv).has_value());
  EXPECT_FALSE(c.decrypt_name("not base64!", iv).has_value());
  EXPECT_FALSE(c.decrypt_name("", iv).has_value());
  SecureBuffer other_key = counting_key();
  other_key.data()[0] ^= 1;
  NameCipher other(std::move(other_key));
  EXPECT_FALSE(other.decrypt_name(enc, iv).has_value());
}

TEST(NameCipher, RejectsWrongKeySize) {
  EXPECT_THROW(NameCipher(SecureBuffer(32)), std::invalid_argument);
}

TEST(Base64Url, RoundTripWithoutPadding) {
  for (std::size_t n = 0; n < 40; ++n) {
    std::vector<std::uint8_t> v(n);
    std::iota(v.begin(), v.end(), static_cast<std::uint8_t>(250));
    auto s = to_base64url(v);
    EXPECT_EQ(s.find('='), std::string::npos);
    EXPECT_EQ(s.find('+'), std::string::npos);
    EXPECT_EQ(s.find('/'), std::string::npos);
    auto back = from_base64url(s);
    ASSERT_TRUE(back.has_value()) << n;
    EXPECT_EQ(*back, v);
  }
  EXPECT_FALSE(from_base64url("ab+c").has_value());
  EXPECT_FALSE(from_base64url("abcde").has_value());
}

}  // namespace
}  // namespace kmsfs::crypto
