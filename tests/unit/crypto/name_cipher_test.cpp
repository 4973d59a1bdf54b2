#include "crypto/name_cipher.h"

#include <gtest/gtest.h>

#include <array>
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
