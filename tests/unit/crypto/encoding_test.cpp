#include "crypto/encoding.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kmsfs::crypto {
namespace {

using Bytes = std::vector<std::uint8_t>;

Bytes all_bytes() {
  Bytes b(256);
  for (int i = 0; i < 256; ++i) b[i] = static_cast<std::uint8_t>(i);
  return b;
}

TEST(Hex, EncodesLowerCase) {
  EXPECT_EQ(to_hex(Bytes{}), "");
  EXPECT_EQ(to_hex(Bytes{0x00, 0x01, 0xab, 0xff}), "0001abff");
}

TEST(Hex, RoundTripsEveryByte) {
  Bytes b = all_bytes();
  std::string h = to_hex(b);
  EXPECT_EQ(h.size(), 512u);
  auto back = from_hex(h);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, b);
}

TEST(Hex, AcceptsUpperCase) {
  auto v = from_hex("ABcdEF");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, (Bytes{0xab, 0xcd, 0xef}));
}

TEST(Hex, DecodesEmpty) {
  auto v = from_hex("");
  ASSERT_TRUE(v.has_value());
  EXPECT_TRUE(v->empty());
}

TEST(Hex, RejectsOddLength) {
  EXPECT_FALSE(from_hex("a").has_value());
  EXPECT_FALSE(from_hex("abc").has_value());
}

TEST(Hex, RejectsNonHexCharacters) {
  for (const char* s : {"0g", "g0", "zz", " 0", "0 ", "0x", "-1", "\n0"}) {
    EXPECT_FALSE(from_hex(s).has_value()) << s;
  }
  EXPECT_FALSE(from_hex(std::string("0\0", 2)).has_value());
}

// RFC 4648 section 10 test vectors.
TEST(Base64, Rfc4648Vectors) {
  const std::pair<const char*, const char*> vectors[] = {
      {"", ""},         {"f", "Zg=="},         {"fo", "Zm8="},         {"foo", "Zm9v"},
      {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="}, {"foobar", "Zm9vYmFy"},
  };
  for (const auto& [plain, encoded] : vectors) {
    EXPECT_EQ(to_base64(as_bytes(plain)), encoded) << plain;
    auto back = from_base64(encoded);
    ASSERT_TRUE(back.has_value()) << encoded;
    EXPECT_EQ(std::string(back->begin(), back->end()), plain);
  }
}

TEST(Base64, UsesStandardAlphabet) {
  EXPECT_EQ(to_base64(Bytes{0xfb, 0xff, 0xbf}), "+/+/");
  auto v = from_base64("+/+/");
  ASSERT_TRUE(v.has_value());
  EXPECT_EQ(*v, (Bytes{0xfb, 0xff, 0xbf}));
}

TEST(Base64, RoundTripsEveryLength) {
  Bytes all = all_bytes();
  for (std::size_t n = 0; n <= all.size(); ++n) {
    Bytes b(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n));
    std::string e = to_base64(b);
    EXPECT_EQ(e.size(), (n + 2) / 3 * 4);
    auto back = from_base64(e);
    ASSERT_TRUE(back.has_value()) << n;
    EXPECT_EQ(*back, b) << n;
  }
}

TEST(Base64, RejectsBadLength) {
  for (const char* s : {"Z", "Zg", "Zg=", "Zm9vY", "Zm9vYmFy="}) {
    EXPECT_FALSE(from_base64(s).has_value()) << s;
  }
}

TEST(Base64, RejectsCharactersOutsideAlphabet) {
  for (const char* s : {"Zm9*", "Zm9-", "Zm9_", "Zm 9", "Zm9\n", "Zm.v"}) {
    EXPECT_FALSE(from_base64(s).has_value()) << s;
  }
  EXPECT_FALSE(from_base64(std::string("Zm9\0", 4)).has_value());
}

TEST(Base64, RejectsMisplacedPadding) {
  for (const char* s : {"====", "Z===", "=Zg=", "Z=g=", "Zg=v", "Zg==Zm9v", "Zm8=Zm9v"}) {
    EXPECT_FALSE(from_base64(s).has_value()) << s;
  }
}

TEST(Base64, RejectsNonCanonicalTrailingBits) {
  // "Zg==" is the only encoding of "f"; "Zh==" carries stray low bits.
  // Accepting it would give one byte string two base64 spellings.
  EXPECT_FALSE(from_base64("Zh==").has_value());
  EXPECT_FALSE(from_base64("Zm9=").has_value());
  EXPECT_TRUE(from_base64("Zm8=").has_value());
}

TEST(Encoding, AsBytesViewsStringWithoutCopy) {
  std::string s = "abc";
  auto b = as_bytes(s);
  EXPECT_EQ(b.size(), 3u);
  EXPECT_EQ(static_cast<const void*>(b.data()), static_cast<const void*>(s.data()));
  EXPECT_EQ(b[0], 'a');
}

}  // namespace
}  // namespace kmsfs::crypto
