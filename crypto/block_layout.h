#pragma once
// Offset math between plaintext and the stored (backing) file.
//
//   stored file = header (kHeaderSize) ‖ block 0 ‖ block 1 ‖ ...
//   stored block = iv (12) ‖ ciphertext (1..4096) ‖ tag (16)
//
// Every block but the last holds exactly kBlockSize plaintext bytes. An
// empty plaintext file is an empty backing file (no header yet). See
// docs/format.md.

#include <cstdint>

namespace kmsfs::crypto::block_layout {

inline constexpr std::uint64_t kHeaderSize = 128;
inline constexpr std::uint64_t kBlockSize = 4096;
inline constexpr std::uint64_t kIvSize = 12;
inline constexpr std::uint64_t kTagSize = 16;
inline constexpr std::uint64_t kBlockOverhead = kIvSize + kTagSize;
inline constexpr std::uint64_t kStoredBlockSize = kBlockSize + kBlockOverhead;

// Plaintext size of a backing file of `stored` bytes. A trailing fragment too
// short to hold iv and tag (1..28 bytes) is not a block: it counts as zero
// plaintext bytes (such a file is damaged; fsck reports it).
constexpr std::uint64_t plain_size(std::uint64_t stored) {
  if (stored <= kHeaderSize) return 0;
  std::uint64_t body = stored - kHeaderSize;
  std::uint64_t full = body / kStoredBlockSize;
  std::uint64_t rest = body % kStoredBlockSize;
  return full * kBlockSize + (rest > kBlockOverhead ? rest - kBlockOverhead : 0);
}

// Backing size for a plaintext size; 0 stays 0 only for a file without a
// header, so callers pass `has_header`.
constexpr std::uint64_t stored_size(std::uint64_t plain, bool has_header = true) {
  if (plain == 0) return has_header ? kHeaderSize : 0;
  std::uint64_t full = plain / kBlockSize;
  std::uint64_t rest = plain % kBlockSize;
  return kHeaderSize + full * kStoredBlockSize + (rest != 0 ? rest + kBlockOverhead : 0);
}

constexpr std::uint64_t block_index(std::uint64_t plain_offset) { return plain_offset / kBlockSize; }
constexpr std::uint64_t block_offset_in(std::uint64_t plain_offset) {
  return plain_offset % kBlockSize;
}
constexpr std::uint64_t stored_offset(std::uint64_t block) {
  return kHeaderSize + block * kStoredBlockSize;
}
// Number of blocks that hold `plain` bytes.
constexpr std::uint64_t block_count(std::uint64_t plain) {
  return (plain + kBlockSize - 1) / kBlockSize;
}
// Plaintext bytes held by block `block` of a file of `plain` bytes (0 past EOF).
constexpr std::uint64_t block_plain_len(std::uint64_t block, std::uint64_t plain) {
  std::uint64_t start = block * kBlockSize;
  if (start >= plain) return 0;
  std::uint64_t left = plain - start;
  return left < kBlockSize ? left : kBlockSize;
}

// AAD of a block: file id (16 bytes) ‖ block number (u64 big-endian).
inline constexpr std::uint64_t kBlockAadSize = 16 + 8;

}  // namespace kmsfs::crypto::block_layout
