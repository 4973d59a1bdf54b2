#include "keyclient/ciphertext_blob.h"

#include <gtest/gtest.h>

namespace kmsfs::keyclient {
namespace {

CiphertextBlob sample(std::size_t n = 32) {
  CiphertextBlob b;
  for (std::size_t i = 0; i < 16; ++i) b.key_uuid[i] = static_cast<std::uint8_t>(i + 1);
  b.key_version = 7;
  for (std::size_t i = 0; i < 12; ++i) b.iv[i] = static_cast<std::uint8_t>(0xa0 + i);
  b.ciphertext_and_tag.resize(n + CiphertextBlob::kTagSize);
  for (std::size_t i = 0; i < b.ciphertext_and_tag.size(); ++i) b.ciphertext_and_tag[i] = static_cast<std::uint8_t>(i);
  return b;
}

TEST(CiphertextBlob, RoundTrip) {
  auto b = sample();
  auto bytes = b.encode();
  ASSERT_EQ(bytes.size(), 86u);  // a 32-byte data key gives an 86-byte blob
  auto d = CiphertextBlob::decode(bytes);
  ASSERT_TRUE(d) << d.error();
  EXPECT_EQ(d->key_uuid, b.key_uuid);
  EXPECT_EQ(d->key_version, 7u);
  EXPECT_EQ(d->iv, b.iv);
  EXPECT_EQ(d->ciphertext_and_tag, b.ciphertext_and_tag);
  EXPECT_EQ(d->encode(), bytes);
}

TEST(CiphertextBlob, HeaderLayout) {
  auto h = sample(32).header_bytes();
  EXPECT_EQ(h[0], 'K');
  EXPECT_EQ(h[3], 0x01);
  EXPECT_EQ(h[4], 1);
  EXPECT_EQ(h[23], 7);  // version, big-endian
  EXPECT_EQ(h[24], 0);
  EXPECT_EQ(h[25], 32);  // plaintext length
}

TEST(CiphertextBlob, RejectsBadMagic) {
  auto bytes = sample().encode();
  bytes[0] = 'X';
  EXPECT_FALSE(CiphertextBlob::decode(bytes));
  bytes = sample().encode();
  bytes[3] = 0x02;  // unknown format
  EXPECT_FALSE(CiphertextBlob::decode(bytes));
}

TEST(CiphertextBlob, RejectsVersionZero) {
  auto bytes = sample().encode();
  bytes[20] = bytes[21] = bytes[22] = bytes[23] = 0;
  EXPECT_FALSE(CiphertextBlob::decode(bytes));
}

TEST(CiphertextBlob, RejectsLengthFieldMismatch) {
  auto bytes = sample().encode();
  bytes[25] = 31;
  EXPECT_FALSE(CiphertextBlob::decode(bytes));
  bytes[25] = 0;
  bytes[24] = 0;
  EXPECT_FALSE(CiphertextBlob::decode(bytes));  // zero length
  bytes[24] = 0x10;
  bytes[25] = 0x01;  // 4097 > max
  EXPECT_FALSE(CiphertextBlob::decode(bytes));
}

TEST(CiphertextBlob, RejectsTruncatedAndExtended) {
  auto bytes = sample().encode();
  auto shorter = bytes;
  shorter.pop_back();
  EXPECT_FALSE(CiphertextBlob::decode(shorter));
  auto longer = bytes;
  longer.push_back(0);
  EXPECT_FALSE(CiphertextBlob::decode(longer));
  EXPECT_FALSE(CiphertextBlob::decode(std::vector<std::uint8_t>(10, 0)));
  EXPECT_FALSE(CiphertextBlob::decode({}));
}

TEST(CiphertextBlob, UuidStrings) {
  std::array<std::uint8_t, 16> u{};
  for (std::size_t i = 0; i < 16; ++i) u[i] = static_cast<std::uint8_t>(0x10 * i + i);
  auto s = uuid_to_string(u);
  EXPECT_EQ(s, "00112233-4455-6677-8899-aabbccddeeff");
  auto back = uuid_from_string(s);
  ASSERT_TRUE(back);
  EXPECT_EQ(*back, u);
  EXPECT_FALSE(uuid_from_string("00112233-4455-6677-8899-AABBCCDDEEFF"));
  EXPECT_FALSE(uuid_from_string("0011223344556677-8899-aabbccddeeff"));
  EXPECT_FALSE(uuid_from_string("alias/x"));
}

}  // namespace
}  // namespace kmsfs::keyclient
