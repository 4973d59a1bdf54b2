#include "crypto/block_layout.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace kmsfs::crypto::block_layout {
namespace {

constexpr std::uint64_t kStoredFirstBlock = kHeaderSize + kStoredBlockSize;  // 128 + 4124

TEST(BlockLayout, ConstantsMatchFormat) {
  EXPECT_EQ(kHeaderSize, 128u);
  EXPECT_EQ(kBlockSize, 4096u);
  EXPECT_EQ(kIvSize, 12u);
  EXPECT_EQ(kTagSize, 16u);
  EXPECT_EQ(kBlockOverhead, 28u);
  EXPECT_EQ(kStoredBlockSize, 4124u);
  EXPECT_EQ(kBlockAadSize, 24u);
}

TEST(BlockLayout, EmptyFileHasNoHeader) {
  EXPECT_EQ(stored_size(0, false), 0u);
  EXPECT_EQ(plain_size(0), 0u);
}

TEST(BlockLayout, EmptyFileWithHeaderIsHeaderOnly) {
  EXPECT_EQ(stored_size(0), kHeaderSize);
  EXPECT_EQ(stored_size(0, true), 128u);
  EXPECT_EQ(plain_size(kHeaderSize), 0u);
}

TEST(BlockLayout, HeaderPresenceMattersOnlyForEmptyFiles) {
  for (std::uint64_t n : {1u, 4095u, 4096u, 4097u}) {
    EXPECT_EQ(stored_size(n, false), stored_size(n, true)) << n;
  }
}

TEST(BlockLayout, TruncatedHeaderIsZeroBytes) {
  for (std::uint64_t s = 1; s < kHeaderSize; ++s) EXPECT_EQ(plain_size(s), 0u) << s;
}

TEST(BlockLayout, OneByte) {
  EXPECT_EQ(stored_size(1), 128u + 12 + 1 + 16);
  EXPECT_EQ(plain_size(157), 1u);
  EXPECT_EQ(block_count(1), 1u);
  EXPECT_EQ(block_plain_len(0, 1), 1u);
  EXPECT_EQ(block_plain_len(1, 1), 0u);
}

TEST(BlockLayout, OneByteShortOfABlock) {
  EXPECT_EQ(stored_size(4095), 128u + 4095 + 28);
  EXPECT_EQ(plain_size(128 + 4095 + 28), 4095u);
  EXPECT_EQ(block_count(4095), 1u);
  EXPECT_EQ(block_plain_len(0, 4095), 4095u);
}

TEST(BlockLayout, ExactlyOneBlock) {
  EXPECT_EQ(stored_size(4096), kStoredFirstBlock);
  EXPECT_EQ(stored_size(4096), 4252u);
  EXPECT_EQ(plain_size(4252), 4096u);
  EXPECT_EQ(block_count(4096), 1u);
  EXPECT_EQ(block_plain_len(0, 4096), 4096u);
  EXPECT_EQ(block_plain_len(1, 4096), 0u);
}

TEST(BlockLayout, OneByteIntoSecondBlock) {
  EXPECT_EQ(stored_size(4097), kStoredFirstBlock + 1 + 28);
  EXPECT_EQ(plain_size(kStoredFirstBlock + 29), 4097u);
  EXPECT_EQ(block_count(4097), 2u);
  EXPECT_EQ(block_plain_len(0, 4097), 4096u);
  EXPECT_EQ(block_plain_len(1, 4097), 1u);
  EXPECT_EQ(block_plain_len(2, 4097), 0u);
}

TEST(BlockLayout, ManyBlocks) {
  constexpr std::uint64_t kTenMiB = 10u << 20;  // 2560 full blocks
  EXPECT_EQ(block_count(kTenMiB), 2560u);
  EXPECT_EQ(stored_size(kTenMiB), kHeaderSize + 2560 * kStoredBlockSize);
  EXPECT_EQ(plain_size(stored_size(kTenMiB)), kTenMiB);
  constexpr std::uint64_t kOdd = 3 * kBlockSize + 17;
  EXPECT_EQ(stored_size(kOdd), kHeaderSize + 3 * kStoredBlockSize + 17 + kBlockOverhead);
  EXPECT_EQ(block_plain_len(3, kOdd), 17u);
  EXPECT_EQ(block_plain_len(2, kOdd), kBlockSize);
}

TEST(BlockLayout, LargeFileDoesNotOverflow) {
  constexpr std::uint64_t kOneTiB = 1ull << 40;
  EXPECT_EQ(plain_size(stored_size(kOneTiB)), kOneTiB);
  EXPECT_EQ(plain_size(stored_size(kOneTiB + 5)), kOneTiB + 5);
}

TEST(BlockLayout, RoundTripsEverySizeAroundBlockEdges) {
  for (std::uint64_t blocks = 0; blocks < 4; ++blocks) {
    for (std::uint64_t delta = 0; delta < 64; ++delta) {
      for (std::uint64_t plain : {blocks * kBlockSize + delta, (blocks + 1) * kBlockSize - delta}) {
        if (plain == 0) continue;
        EXPECT_EQ(plain_size(stored_size(plain)), plain) << plain;
      }
    }
  }
}

TEST(BlockLayout, FragmentAfterHeaderTooShortForIvAndTagIsNoData) {
  // 1..28 bytes after the header cannot hold iv (12) + tag (16) + 1 byte.
  for (std::uint64_t frag = 1; frag <= kBlockOverhead; ++frag) {
    EXPECT_EQ(plain_size(kHeaderSize + frag), 0u) << frag;
  }
  EXPECT_EQ(plain_size(kHeaderSize + kBlockOverhead + 1), 1u);
}

TEST(BlockLayout, FragmentAfterFullBlockTooShortForIvAndTagIsNoData) {
  for (std::uint64_t frag = 1; frag <= kBlockOverhead; ++frag) {
    EXPECT_EQ(plain_size(kStoredFirstBlock + frag), kBlockSize) << frag;
    EXPECT_EQ(plain_size(kStoredFirstBlock + kStoredBlockSize + frag), 2 * kBlockSize) << frag;
  }
  EXPECT_EQ(plain_size(kStoredFirstBlock + kBlockOverhead + 1), kBlockSize + 1);
}

TEST(BlockLayout, PlainSizeIsMonotonic) {
  std::uint64_t prev = 0;
  for (std::uint64_t s = 0; s < kHeaderSize + 3 * kStoredBlockSize + 50; ++s) {
    std::uint64_t p = plain_size(s);
    ASSERT_GE(p, prev) << s;
    prev = p;
  }
}

TEST(BlockLayout, OffsetMath) {
  EXPECT_EQ(block_index(0), 0u);
  EXPECT_EQ(block_index(4095), 0u);
  EXPECT_EQ(block_index(4096), 1u);
  EXPECT_EQ(block_index(4097), 1u);
  EXPECT_EQ(block_offset_in(0), 0u);
  EXPECT_EQ(block_offset_in(4095), 4095u);
  EXPECT_EQ(block_offset_in(4096), 0u);
  EXPECT_EQ(block_offset_in(4097), 1u);
  EXPECT_EQ(stored_offset(0), 128u);
  EXPECT_EQ(stored_offset(1), 128u + 4124);
  EXPECT_EQ(stored_offset(2), 128u + 2 * 4124);
}

TEST(BlockLayout, BlockCountEdges) {
  EXPECT_EQ(block_count(0), 0u);
  EXPECT_EQ(block_count(1), 1u);
  EXPECT_EQ(block_count(4096), 1u);
  EXPECT_EQ(block_count(4097), 2u);
  EXPECT_EQ(block_count(8192), 2u);
  EXPECT_EQ(block_count(8193), 3u);
}

TEST(BlockLayout, StoredOffsetOfNextBlockIsStoredSizeOfFullBlocks) {
  for (std::uint64_t b = 1; b < 5; ++b) EXPECT_EQ(stored_offset(b), stored_size(b * kBlockSize));
}

TEST(BlockLayout, BlockPlainLenPastEofIsZero) {
  EXPECT_EQ(block_plain_len(0, 0), 0u);
  EXPECT_EQ(block_plain_len(5, 4096), 0u);
  EXPECT_EQ(block_plain_len(1, 8192), 4096u);
  EXPECT_EQ(block_plain_len(2, 8192), 0u);
}

}  // namespace
}  // namespace kmsfs::crypto::block_layout
