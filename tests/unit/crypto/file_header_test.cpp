#include "crypto/file_header.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace kmsfs::crypto {
namespace {

using Bytes = std::vector<std::uint8_t>;

// Field offsets from the layout in crypto/file_header.h (and docs/format.md).
constexpr std::size_t kOffVersion = 8;
constexpr std::size_t kOffFlags = 10;
constexpr std::size_t kOffFileId = 12;
constexpr std::size_t kOffKeyLen = 28;
constexpr std::size_t kOffKey = 30;
constexpr std::size_t kOffReserved = 126;

FileHeader sample(std::size_t key_len = 86) {
  FileHeader h;
  for (std::size_t i = 0; i < h.file_id.size(); ++i) h.file_id[i] = static_cast<std::uint8_t>(0xA0 + i);
  h.wrapped_key.resize(key_len);
  for (std::size_t i = 0; i < key_len; ++i) h.wrapped_key[i] = static_cast<std::uint8_t>(i + 1);
  return h;
}

Bytes encoded(const FileHeader& h) {
  auto a = h.encode();
  return Bytes(a.begin(), a.end());
}

std::string decode_error(const Bytes& b) {
  auto r = FileHeader::decode(b);
  if (r.has_value()) return "<decoded>";
  return r.error();
}

TEST(FileHeader, EncodesDocumentedLayout) {
  FileHeader h = sample(86);
  Bytes b = encoded(h);
  ASSERT_EQ(b.size(), 128u);
  EXPECT_EQ(std::string(b.begin(), b.begin() + 8), "KMSFSHDR");
  EXPECT_EQ(b[kOffVersion], 0x00);
  EXPECT_EQ(b[kOffVersion + 1], 0x01);
  EXPECT_EQ(b[kOffFlags], 0x00);
  EXPECT_EQ(b[kOffFlags + 1], 0x00);
  EXPECT_TRUE(std::equal(h.file_id.begin(), h.file_id.end(), b.begin() + kOffFileId));
  EXPECT_EQ(b[kOffKeyLen], 0x00);
  EXPECT_EQ(b[kOffKeyLen + 1], 86);
  EXPECT_TRUE(std::equal(h.wrapped_key.begin(), h.wrapped_key.end(), b.begin() + kOffKey));
  for (std::size_t i = kOffKey + 86; i < 128; ++i) EXPECT_EQ(b[i], 0) << "byte " << i;
}

TEST(FileHeader, RoundTrips) {
  for (std::size_t len : {1u, 32u, 86u, 95u, 96u}) {
    FileHeader h = sample(len);
    auto r = FileHeader::decode(encoded(h));
    ASSERT_TRUE(r.has_value()) << len << ": " << r.error();
    EXPECT_EQ(r->file_id, h.file_id);
    EXPECT_EQ(r->wrapped_key, h.wrapped_key);
  }
}

TEST(FileHeader, RoundTripsRandomLookingIds) {
  FileHeader h = sample();
  h.file_id.fill(0xFF);
  auto r = FileHeader::decode(encoded(h));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->file_id, h.file_id);
  h.file_id.fill(0x00);
  r = FileHeader::decode(encoded(h));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->file_id, h.file_id);
}

TEST(FileHeader, EncodeRefusesEmptyWrappedKey) {
  FileHeader h = sample();
  h.wrapped_key.clear();
  EXPECT_THROW((void)h.encode(), std::logic_error);
}

TEST(FileHeader, EncodeRefusesOversizedWrappedKey) {
  FileHeader h = sample(97);
  EXPECT_THROW((void)h.encode(), std::logic_error);
}

TEST(FileHeader, RejectsShortInput) {
  Bytes b = encoded(sample());
  for (std::size_t n : {0u, 1u, 8u, 29u, 127u}) {
    Bytes s(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(n));
    std::string err = decode_error(s);
    EXPECT_NE(err.find("truncated"), std::string::npos) << n << ": " << err;
  }
}

TEST(FileHeader, RejectsBadMagic) {
  Bytes good = encoded(sample());
  for (std::size_t i = 0; i < 8; ++i) {
    Bytes b = good;
    b[i] ^= 0x20;
    EXPECT_NE(decode_error(b).find("magic"), std::string::npos) << "byte " << i;
  }
}

TEST(FileHeader, RejectsUnsupportedVersion) {
  Bytes good = encoded(sample());
  for (std::uint16_t v : {0, 2, 0x0100, 0xFFFF}) {
    Bytes b = good;
    b[kOffVersion] = static_cast<std::uint8_t>(v >> 8);
    b[kOffVersion + 1] = static_cast<std::uint8_t>(v);
    EXPECT_NE(decode_error(b).find("version"), std::string::npos) << v;
  }
}

TEST(FileHeader, RejectsUnknownFlags) {
  Bytes good = encoded(sample());
  for (std::uint16_t f : {0x0001, 0x0080, 0x0100, 0x8000, 0xFFFF}) {
    Bytes b = good;
    b[kOffFlags] = static_cast<std::uint8_t>(f >> 8);
    b[kOffFlags + 1] = static_cast<std::uint8_t>(f);
    EXPECT_NE(decode_error(b).find("flags"), std::string::npos) << f;
  }
}

TEST(FileHeader, RejectsZeroKeyLength) {
  Bytes b = encoded(sample());
  // Zero the length and the key bytes, so only the length is wrong.
  std::fill(b.begin() + kOffKeyLen, b.begin() + kOffReserved, 0);
  EXPECT_NE(decode_error(b).find("wrapped key length 0"), std::string::npos);
}

TEST(FileHeader, RejectsKeyLengthAboveMaximum) {
  Bytes good = encoded(sample(96));
  for (std::uint16_t len : {97, 98, 0x0100, 0xFFFF}) {
    Bytes b = good;
    b[kOffKeyLen] = static_cast<std::uint8_t>(len >> 8);
    b[kOffKeyLen + 1] = static_cast<std::uint8_t>(len);
    EXPECT_NE(decode_error(b).find("out of range"), std::string::npos) << len;
  }
}

TEST(FileHeader, RejectsNonZeroPadding) {
  Bytes good = encoded(sample(40));
  for (std::size_t i = kOffKey + 40; i < kOffReserved; ++i) {
    Bytes b = good;
    b[i] = 0x01;
    EXPECT_NE(decode_error(b).find("padding"), std::string::npos) << "byte " << i;
  }
}

TEST(FileHeader, RejectsKeyLengthShorterThanStoredKey) {
  // A length that cuts the key short leaves key bytes in the padding.
  Bytes b = encoded(sample(86));
  b[kOffKeyLen + 1] = 85;
  EXPECT_NE(decode_error(b).find("padding"), std::string::npos);
}

TEST(FileHeader, RejectsNonZeroReserved) {
  for (std::size_t len : {86u, 96u}) {
    Bytes good = encoded(sample(len));
    for (std::size_t i = kOffReserved; i < 128; ++i) {
      Bytes b = good;
      b[i] = 0x80;
      EXPECT_NE(decode_error(b).find("reserved"), std::string::npos) << len << " byte " << i;
    }
  }
}

TEST(FileHeader, AcceptsExactlyOneValueOfEveryFixedByte) {
  // Flip every bit outside the file id, the key length and the wrapped key:
  // each must be rejected, since every other byte has exactly one valid value.
  Bytes good = encoded(sample(86));
  for (std::size_t i = 0; i < 128; ++i) {
    if (i >= kOffFileId && i < kOffFileId + 16) continue;
    if (i >= kOffKeyLen && i < kOffKey + 86) continue;
    for (int bit = 0; bit < 8; ++bit) {
      Bytes b = good;
      b[i] ^= static_cast<std::uint8_t>(1u << bit);
      EXPECT_FALSE(FileHeader::decode(b).has_value()) << "byte " << i << " bit " << bit;
    }
  }
}

TEST(FileHeader, LongerKeyLengthOverZeroPaddingChangesTheWrappedKey) {
  // The codec cannot tell a length grown over zero padding from a genuine
  // key that ends in zeros; the change still reaches the KMS as a different
  // ciphertext blob (wrong length for its own header), which Decrypt refuses.
  Bytes b = encoded(sample(86));
  b[kOffKeyLen + 1] = 87;
  auto r = FileHeader::decode(b);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->wrapped_key.size(), 87u);
  EXPECT_NE(r->wrapped_key, sample(86).wrapped_key);
}

TEST(FileHeader, FileIdHexIsLowerCase32Chars) {
  FileId id{};
  for (std::size_t i = 0; i < id.size(); ++i) id[i] = static_cast<std::uint8_t>(0xF0 | i);
  EXPECT_EQ(file_id_hex(id), "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
}

}  // namespace
}  // namespace kmsfs::crypto
