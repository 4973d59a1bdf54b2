#include "fs/encrypted_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "crypto/aes_gcm.h"
#include "crypto/block_layout.h"
#include "crypto/random.h"
#include "fs/thread_buffer.h"

namespace kmsfs::fs {

namespace bl = crypto::block_layout;

namespace {

std::shared_ptr<spdlog::logger> logger() {
  static auto l = [] {
    auto existing = spdlog::get("kmsfs.fs");
    return existing ? existing : spdlog::default_logger()->clone("kmsfs.fs");
  }();
  return l;
}

// Per-thread scratch so that the hot paths do not allocate per request
// after warm-up. Grows to the largest request seen (1 MiB max_write).
std::uint8_t* scratch(std::size_t n) {
  thread_local ThreadBuffer buf;
  return buf.get(n);
}

bool all_zero(const std::uint8_t* p, std::size_t n) {
  // Compare in words; blocks are rarely holes so the first word usually ends it.
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    if (w != 0) return false;
    p += 8;
    n -= 8;
  }
  while (n-- > 0) {
    if (*p++ != 0) return false;
  }
  return true;
}

void block_aad(const crypto::FileId& id, std::uint64_t block, std::uint8_t* aad) {
  std::memcpy(aad, id.data(), id.size());
  for (int i = 0; i < 8; ++i) aad[16 + i] = static_cast<std::uint8_t>(block >> (56 - 8 * i));
}

}  // namespace

bool EncryptedFile::open_block(std::uint64_t block, std::span<const std::uint8_t> stored,
                               std::uint8_t* out) const {
  const std::size_t len = stored.size() - bl::kBlockOverhead;
  if (all_zero(stored.data(), stored.size())) {
    std::memset(out, 0, len);  // a hole
    return true;
  }
  std::uint8_t aad[bl::kBlockAadSize];
  block_aad(key_.file_id, block, aad);
  return crypto::AesGcm::decrypt(key_.dek.span(), stored.subspan(0, bl::kIvSize),
                                 std::span(aad, sizeof aad),
                                 stored.subspan(bl::kIvSize, len),
                                 stored.subspan(bl::kIvSize + len, bl::kTagSize), out);
}

bool EncryptedFile::check_block(std::uint64_t block, std::span<const std::uint8_t> stored) const {
  if (stored.size() <= bl::kBlockOverhead || stored.size() > bl::kStoredBlockSize) return false;
  std::uint8_t plain[bl::kBlockSize];
  const bool ok = open_block(block, stored, plain);
  crypto::cleanse(plain, sizeof plain);
  return ok;
}

void EncryptedFile::seal_block(std::uint64_t block, std::span<const std::uint8_t> plain,
                               std::uint8_t* stored_out) const {
  std::uint8_t aad[bl::kBlockAadSize];
  block_aad(key_.file_id, block, aad);
  crypto::random_public_bytes(std::span(stored_out, bl::kIvSize));  // an IV is public
  if (!crypto::AesGcm::encrypt(key_.dek.span(), std::span(stored_out, bl::kIvSize),
                               std::span(aad, sizeof aad), plain, stored_out + bl::kIvSize,
                               stored_out + bl::kIvSize + plain.size())) {
    // Only a broken OpenSSL gets here; never write unencrypted data.
    throw std::runtime_error("AES-GCM encryption failed");
  }
}

long EncryptedFile::read(std::uint64_t plain_size, std::uint64_t off,
                         std::span<std::uint8_t> out) const {
  if (off >= plain_size || out.empty()) return 0;
  const std::uint64_t end = std::min<std::uint64_t>(plain_size, off + out.size());
  const std::uint64_t first = bl::block_index(off);
  const std::uint64_t last = bl::block_index(end - 1);
  const std::uint64_t stored_begin = bl::stored_offset(first);
  const std::uint64_t stored_end =
      bl::stored_offset(last) + bl::block_plain_len(last, plain_size) + bl::kBlockOverhead;
  const std::size_t stored_len = stored_end - stored_begin;

  std::uint8_t* const buf = scratch(stored_len + bl::kBlockSize);
  std::uint8_t* stored = buf;
  std::uint8_t* plain_tmp = buf + stored_len;
  std::size_t got = 0;
  while (got < stored_len) {
    ssize_t n = ::pread(fd_, stored + got, stored_len - got, static_cast<off_t>(stored_begin + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  if (got != stored_len) {
    logger()->error("cannot read {}: backing file is shorter than its size implies (truncated "
                    "or changed outside the mount)", describe_());
    return -EIO;
  }

  std::size_t copied = 0;
  for (std::uint64_t b = first; b <= last; ++b) {
    const std::uint64_t len = bl::block_plain_len(b, plain_size);
    const std::uint8_t* sb = stored + (bl::stored_offset(b) - stored_begin);
    const std::uint64_t block_start = b * bl::kBlockSize;
    const std::uint64_t from = std::max(off, block_start) - block_start;
    const std::uint64_t to = std::min(end, block_start + len) - block_start;
    // Decrypt straight into the caller's buffer when the block is wanted whole.
    const bool whole = from == 0 && to == len;
    std::uint8_t* dst = whole ? out.data() + copied : plain_tmp;
    if (!open_block(b, std::span(sb, len + bl::kBlockOverhead), dst)) {
      logger()->error("cannot read {}: block {} failed authentication (corrupt or tampered "
                      "ciphertext)", describe_(), b);
      return -EIO;
    }
    if (!whole) std::memcpy(out.data() + copied, plain_tmp + from, to - from);
    copied += to - from;
  }
  return static_cast<long>(copied);
}

int EncryptedFile::read_block(std::uint64_t block, std::uint64_t len, std::uint8_t* out) const {
  std::uint8_t stored[bl::kStoredBlockSize];
  const std::size_t want = len + bl::kBlockOverhead;
  std::size_t got = 0;
  while (got < want) {
    ssize_t n = ::pread(fd_, stored + got, want - got,
                        static_cast<off_t>(bl::stored_offset(block) + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  if (got != want) {
    logger()->error("cannot update {}: backing file ends inside block {}", describe_(), block);
    return -EIO;
  }
  if (!open_block(block, std::span(stored, want), out)) {
    logger()->error("cannot update {}: block {} failed authentication (corrupt or tampered "
                    "ciphertext)", describe_(), block);
    return -EIO;
  }
  return 0;
}

int EncryptedFile::reseal_block(std::uint64_t block, std::uint64_t old_len, std::uint64_t new_len) const {
  std::uint8_t plain[bl::kBlockSize];
  std::uint8_t sealed[bl::kStoredBlockSize];
  int rc = read_block(block, old_len, plain);
  if (rc == 0) {
    if (new_len > old_len) std::memset(plain + old_len, 0, new_len - old_len);
    seal_block(block, std::span(plain, new_len), sealed);
    rc = write_all(sealed, new_len + bl::kBlockOverhead, bl::stored_offset(block));
  }
  crypto::cleanse(plain, sizeof plain);
  return rc;
}

int EncryptedFile::write_all(const std::uint8_t* data, std::size_t len, std::uint64_t off) const {
  std::size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd_, data + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

int EncryptedFile::preallocate(std::uint64_t off, std::uint64_t len) const {
  if (len == 0) return 0;
  if (::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), static_cast<off_t>(len)) == 0) {
    return 0;
  }
  // Filesystems without fallocate: write directly, as gocryptfs does.
  if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) return 0;
  return -errno;
}

long EncryptedFile::write(std::uint64_t plain_size, std::uint64_t off,
                          std::span<const std::uint8_t> data, std::uint64_t allocated_end) const {
  if (data.empty()) return 0;
  const std::uint64_t end = off + data.size();
  const std::uint64_t new_size = std::max(plain_size, end);
  const std::uint64_t first = bl::block_index(off);
  const std::uint64_t last = bl::block_index(end - 1);

  // A partial last block before the written range grows to a full block
  // first (zero padded): afterwards every block before `first` is full.
  const bool pad_tail = plain_size % bl::kBlockSize != 0 && bl::block_index(plain_size) < first;
  const std::uint64_t tail = bl::block_index(plain_size);

  const std::uint64_t begin_block = pad_tail && tail + 1 == first ? tail : first;
  const std::uint64_t stored_begin = bl::stored_offset(begin_block);
  const std::uint64_t stored_end =
      bl::stored_offset(last) + bl::block_plain_len(last, new_size) + bl::kBlockOverhead;
  const std::uint64_t reserve_from = std::max(stored_begin, std::min(allocated_end, stored_end));
  if (int rc = preallocate(reserve_from, stored_end - reserve_from); rc != 0) return rc;

  std::uint8_t* const buf = scratch((stored_end - stored_begin) + bl::kBlockSize);
  std::uint8_t* out = buf;
  std::uint8_t* plain = buf + (stored_end - stored_begin);

  if (pad_tail) {
    const std::uint64_t old_len = bl::block_plain_len(tail, plain_size);
    if (begin_block == tail) {
      if (int rc = read_block(tail, old_len, plain); rc != 0) return rc;
      std::memset(plain + old_len, 0, bl::kBlockSize - old_len);
      seal_block(tail, std::span(plain, bl::kBlockSize), out);
    } else if (int rc = reseal_block(tail, old_len, bl::kBlockSize); rc != 0) {
      // Not adjacent to the write: a separate write, done before the new
      // blocks so that a crash in between leaves a consistent file.
      return rc;
    }
  }

  for (std::uint64_t b = first; b <= last; ++b) {
    const std::uint64_t block_start = b * bl::kBlockSize;
    const std::uint64_t new_len = bl::block_plain_len(b, new_size);
    const std::uint64_t from = std::max(off, block_start) - block_start;
    const std::uint64_t to = std::min(end, block_start + new_len) - block_start;
    std::uint8_t* dst = out + (bl::stored_offset(b) - stored_begin);
    std::span<const std::uint8_t> src = data.subspan(block_start + from - off, to - from);
    if (from == 0 && to == new_len) {
      seal_block(b, src, dst);
      continue;
    }
    // Partial block: merge with what is stored (zeros past the old end).
    const std::uint64_t old_len = bl::block_plain_len(b, plain_size);
    if (old_len > 0) {
      if (int rc = read_block(b, old_len, plain); rc != 0) return rc;
    }
    std::memset(plain + old_len, 0, new_len - old_len);
    std::memcpy(plain + from, src.data(), src.size());
    seal_block(b, std::span(plain, new_len), dst);
  }
  if (int rc = write_all(out, stored_end - stored_begin, stored_begin); rc != 0) return rc;
  return static_cast<long>(data.size());
}

std::size_t EncryptedFile::sealed_size(std::size_t len) {
  if (len == 0) return 0;
  const std::uint64_t blocks = (len + bl::kBlockSize - 1) / bl::kBlockSize;
  return static_cast<std::size_t>(len + blocks * bl::kBlockOverhead);
}

void EncryptedFile::seal_ahead(std::uint64_t off, std::span<const std::uint8_t> data, std::uint8_t* out) const {
  const std::uint64_t first = bl::block_index(off);
  for (std::size_t done = 0; done < data.size();) {
    const std::size_t n = std::min<std::size_t>(bl::kBlockSize, data.size() - done);
    const std::uint64_t b = first + done / bl::kBlockSize;
    seal_block(b, data.subspan(done, n), out + (done / bl::kBlockSize) * bl::kStoredBlockSize);
    done += n;
  }
}

long EncryptedFile::write_sealed(std::uint64_t plain_size, std::uint64_t off, std::size_t len,
                                 const std::uint8_t* sealed, std::uint64_t allocated_end) const {
  if (len == 0) return 0;
  const std::uint64_t end = off + len;
  // Every block's stored form must be the one seal_ahead made: whole blocks
  // from a block boundary, the last one ending where the data ends, which
  // holds when it is full or when the file ends there after the write.
  if (bl::block_offset_in(off) != 0) return kNotSealable;
  if (end % bl::kBlockSize != 0 && plain_size > end) return kNotSealable;
  const std::uint64_t first = bl::block_index(off);
  const std::uint64_t stored_begin = bl::stored_offset(first);
  const std::uint64_t stored_end = stored_begin + sealed_size(len);

  // A partial last block before the written range grows to a full block
  // first (zero padded), written before the new blocks as in write().
  const bool pad_tail = plain_size % bl::kBlockSize != 0 && bl::block_index(plain_size) < first;
  const std::uint64_t tail = bl::block_index(plain_size);
  // Space for the tail block's growth and for the new blocks, not for a
  // gap between them: that stays a hole in the backing file.
  if (pad_tail) {
    const std::uint64_t tail_begin = bl::stored_offset(tail);
    const std::uint64_t tail_end = std::min(tail_begin + bl::kStoredBlockSize, stored_begin);
    const std::uint64_t from = std::max(tail_begin, std::min(allocated_end, tail_end));
    if (int rc = preallocate(from, tail_end - from); rc != 0) return rc;
  }
  const std::uint64_t reserve_from = std::max(stored_begin, std::min(allocated_end, stored_end));
  if (int rc = preallocate(reserve_from, stored_end - reserve_from); rc != 0) return rc;
  if (pad_tail) {
    if (int rc = reseal_block(tail, bl::block_plain_len(tail, plain_size), bl::kBlockSize); rc != 0) return rc;
  }
  if (int rc = write_all(sealed, stored_end - stored_begin, stored_begin); rc != 0) return rc;
  return static_cast<long>(len);
}

int EncryptedFile::truncate(std::uint64_t plain_size, std::uint64_t new_size) const {
  if (new_size == plain_size) return 0;
  if (new_size > plain_size) {
    // Grow the partial last block (to a full block, or to the new end if
    // that lies inside it); the rest of the extension is holes.
    if (plain_size % bl::kBlockSize != 0) {
      const std::uint64_t tail = bl::block_index(plain_size);
      const std::uint64_t old_len = bl::block_plain_len(tail, plain_size);
      const std::uint64_t grown = bl::block_plain_len(tail, new_size);
      if (int rc = preallocate(bl::stored_offset(tail), grown + bl::kBlockOverhead); rc != 0) return rc;
      if (int rc = reseal_block(tail, old_len, grown); rc != 0) return rc;
    }
  } else if (new_size % bl::kBlockSize != 0) {
    // Shrink into the middle of a block: re-seal its head.
    const std::uint64_t tail = bl::block_index(new_size);
    const std::uint64_t old_len = bl::block_plain_len(tail, plain_size);
    if (int rc = reseal_block(tail, old_len, bl::block_plain_len(tail, new_size)); rc != 0) return rc;
  }
  if (::ftruncate(fd_, static_cast<off_t>(bl::stored_size(new_size))) != 0) return -errno;
  return 0;
}

}  // namespace kmsfs::fs
