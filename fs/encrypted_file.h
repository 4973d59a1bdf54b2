#pragma once
// Block I/O on one backing file: plaintext offsets in, AES-256-GCM blocks
// out (crypto/block_layout.h has the layout). Stateless: the caller owns the
// backing fd, holds the inode's content lock (shared for read, exclusive for
// write and truncate) and passes the current plaintext size.
//
// Ordering for crash safety: a write that extends past a partial last block
// first re-encrypts that block to its new full length, then writes the new
// blocks, so an interrupted write leaves a file whose every block verifies.
// Before a write the range is preallocated (fallocate KEEP_SIZE) so that a
// full backing filesystem fails the write with ENOSPC before any byte of a
// block or header is changed.

#include <climits>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "crypto/file_header.h"
#include "crypto/secure_buffer.h"

namespace kmsfs::fs {

struct FileKey {
  crypto::FileId file_id{};
  crypto::SecureBuffer dek;  // 32 bytes
};

class EncryptedFile {
 public:
  // `describe` names the file in log lines (never contents or keys); it is
  // called only when a line is logged.
  using Describe = std::function<std::string()>;
  EncryptedFile(int fd, const FileKey& key, Describe describe)
      : fd_(fd), key_(key), describe_(std::move(describe)) {}
  EncryptedFile(int fd, const FileKey& key, std::string label)
      : EncryptedFile(fd, key, [label = std::move(label)] { return label; }) {}

  // Reads plaintext [off, off + out.size()) clipped to `plain_size`.
  // Returns bytes read, or -errno (-EIO for a block that fails
  // authentication, logged once with the block number).
  long read(std::uint64_t plain_size, std::uint64_t off, std::span<std::uint8_t> out) const;

  // Writes `data` at `off`; returns data.size() or -errno. The new plaintext
  // size is max(plain_size, off + data.size()). `allocated_end`: the caller
  // knows that stored bytes [0, allocated_end) have space on the backing
  // filesystem (no holes there), so only the range past it is reserved
  // before writing; 0 when it does not know.
  long write(std::uint64_t plain_size, std::uint64_t off, std::span<const std::uint8_t> data,
             std::uint64_t allocated_end = 0) const;

  // Sealing ahead of the lock. A large write's blocks can be encrypted
  // before the caller takes the content lock, so that the kernel's
  // concurrent write-back requests to one file encrypt on every core and
  // only the checks and the pwrite(2) stay serialised.
  //
  // seal_ahead seals `data`, to be written at the block-aligned `off`, as
  // the whole blocks it covers, the last one to the data's end, into `out`
  // (sealed_size(data.size()) bytes, laid out as stored). It needs only the
  // key: no lock, no I/O, the file is not touched.
  static std::size_t sealed_size(std::size_t len);
  void seal_ahead(std::uint64_t off, std::span<const std::uint8_t> data, std::uint8_t* out) const;

  // Under the content lock: writes the `len` bytes at `off` that seal_ahead
  // sealed into `sealed`, given the current `plain_size`, with the same
  // ordering and preallocation as write(); returns len or -errno. Returns
  // kNotSealable, having changed nothing, when those blocks are not what
  // write() would store: `off` not block-aligned, or a write that ends inside
  // a block while the file goes on past its end (that block must merge with
  // the stored bytes). Then the caller calls write().
  static constexpr long kNotSealable = LONG_MIN;
  long write_sealed(std::uint64_t plain_size, std::uint64_t off, std::size_t len, const std::uint8_t* sealed,
                    std::uint64_t allocated_end = 0) const;

  // Changes the plaintext size from `plain_size` to `new_size` (> 0; a
  // truncate to zero drops the header and is the caller's job). 0 or -errno.
  int truncate(std::uint64_t plain_size, std::uint64_t new_size) const;

  // fsck: whether stored block `block` (its len + 28 stored bytes) opens
  // under this file's key — a hole counts as sound.
  bool check_block(std::uint64_t block, std::span<const std::uint8_t> stored) const;

 private:
  // Decrypts block `block` holding `len` plaintext bytes from `stored`
  // (len + 28 bytes) into `out`; an all-zero stored block is a hole.
  bool open_block(std::uint64_t block, std::span<const std::uint8_t> stored,
                  std::uint8_t* out) const;
  void seal_block(std::uint64_t block, std::span<const std::uint8_t> plain,
                  std::uint8_t* stored_out) const;
  // Reads and decrypts one existing block (len > 0) into out; 0 or -errno.
  int read_block(std::uint64_t block, std::uint64_t len, std::uint8_t* out) const;
  // Re-seals existing block `block` from its `old_len` plaintext bytes to
  // `new_len` (zeros past old_len when it grows, cut when it shrinks) in
  // place, with a fresh IV; 0 or -errno.
  int reseal_block(std::uint64_t block, std::uint64_t old_len, std::uint64_t new_len) const;
  int write_all(const std::uint8_t* data, std::size_t len, std::uint64_t off) const;
  int preallocate(std::uint64_t off, std::uint64_t len) const;

  int fd_;
  const FileKey& key_;
  Describe describe_;
};

}  // namespace kmsfs::fs
