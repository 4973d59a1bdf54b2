#include "keyclient/encryption_context.h"

#include <gtest/gtest.h>

namespace kmsfs::keyclient {
namespace {

TEST(EncryptionContext, EmptyIsAZeroCount) {
  EXPECT_EQ(canonical_encryption_context({}), (std::vector<std::uint8_t>{0, 0, 0, 0}));
}

TEST(EncryptionContext, GoldenBytes) {
  EncryptionContext ctx{{"b", "xy"}, {"a", ""}};
  std::vector<std::uint8_t> want{
      0, 0, 0, 2,                         // two pairs
      0, 0, 0, 1, 'a', 0, 0, 0, 0,        // "a" -> ""
      0, 0, 0, 1, 'b', 0, 0, 0, 2, 'x', 'y',  // "b" -> "xy"
  };
  EXPECT_EQ(canonical_encryption_context(ctx), want);
}

TEST(EncryptionContext, LengthPrefixesKeepShiftedSplitsApart) {
  EXPECT_NE(canonical_encryption_context({{"ab", "c"}}), canonical_encryption_context({{"a", "bc"}}));
}

TEST(EncryptionContext, InsertionOrderDoesNotMatter) {
  EncryptionContext a;
  a["kmsfs:fs"] = "1";
  a["kmsfs:file"] = "2";
  EncryptionContext b;
  b["kmsfs:file"] = "2";
  b["kmsfs:fs"] = "1";
  EXPECT_EQ(canonical_encryption_context(a), canonical_encryption_context(b));
}

TEST(EncryptionContext, KeysAreCaseSensitiveAndSortedBytewise) {
  EXPECT_NE(canonical_encryption_context({{"A", "x"}}), canonical_encryption_context({{"a", "x"}}));
  auto bytes = canonical_encryption_context({{"a", "1"}, {"B", "2"}});
  // 'B' (0x42) sorts before 'a' (0x61).
  EXPECT_EQ(bytes[8], 'B');
}

}  // namespace
}  // namespace kmsfs::keyclient
