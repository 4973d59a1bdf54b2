// The block engine on a plain temp file: offsets, holes, read-modify-write,
// truncation and tamper detection, checked against a reference buffer.

#include "fs/encrypted_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <vector>

#include "crypto/block_layout.h"
#include "crypto/random.h"

namespace kmsfs::fs {
namespace {

namespace bl = crypto::block_layout;

class EncryptedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kmsfs-ef.XXXXXX";
    fd_ = ::mkstemp(tmpl);
    ASSERT_GE(fd_, 0);
    path_ = tmpl;
    key_.dek = crypto::SecureBuffer(32);
    crypto::random_bytes(key_.dek.span());
    crypto::random_bytes(key_.file_id);
    // A header-sized prefix, as kmsfs writes before the first block.
    std::vector<std::uint8_t> header(bl::kHeaderSize, 0xAB);
    ASSERT_EQ(::pwrite(fd_, header.data(), header.size(), 0), static_cast<ssize_t>(header.size()));
  }
  void TearDown() override {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  std::uint64_t plain_size() const {
    struct stat st {};
    ::fstat(fd_, &st);
    return bl::plain_size(static_cast<std::uint64_t>(st.st_size));
  }
  void write(std::uint64_t off, const std::vector<std::uint8_t>& data) {
    EncryptedFile f(fd_, key_, "test");
    ASSERT_EQ(f.write(plain_size(), off, data), static_cast<long>(data.size()));
    if (ref_.size() < off + data.size()) ref_.resize(off + data.size(), 0);
    std::copy(data.begin(), data.end(), ref_.begin() + static_cast<long>(off));
  }
  // Seals `data` ahead (EncryptedFile::seal_ahead), then writes it with
  // write_sealed, which must take it, and updates the reference.
  void write_sealed(std::uint64_t off, const std::vector<std::uint8_t>& data) {
    EncryptedFile f(fd_, key_, "test");
    std::vector<std::uint8_t> out(EncryptedFile::sealed_size(data.size()));
    f.seal_ahead(off, data, out.data());
    ASSERT_EQ(f.write_sealed(plain_size(), off, data.size(), out.data()), static_cast<long>(data.size()));
    if (ref_.size() < off + data.size()) ref_.resize(off + data.size(), 0);
    std::copy(data.begin(), data.end(), ref_.begin() + static_cast<long>(off));
  }
  std::vector<std::uint8_t> read_all() {
    EncryptedFile f(fd_, key_, "test");
    std::vector<std::uint8_t> out(plain_size());
    long n = f.read(plain_size(), 0, out);
    EXPECT_EQ(n, static_cast<long>(out.size()));
    return out;
  }

  int fd_ = -1;
  std::string path_;
  FileKey key_;
  std::vector<std::uint8_t> ref_;
};

std::vector<std::uint8_t> bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng());
  return v;
}

TEST_F(EncryptedFileTest, StoredSizeFollowsLayout) {
  write(0, bytes(4097, 1));
  struct stat st {};
  ASSERT_EQ(::fstat(fd_, &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), bl::stored_size(4097));
  EXPECT_EQ(read_all(), ref_);
}

TEST_F(EncryptedFileTest, RandomWritesMatchReference) {
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::uint64_t off = rng() % 200000;
    std::size_t len = 1 + rng() % 20000;
    write(off, bytes(len, static_cast<std::uint32_t>(i)));
  }
  EXPECT_EQ(read_all(), ref_);
}

// A write sealed ahead of the lock (seal_ahead, then write_sealed) stores
// what write() would: checked against the reference over random sizes and
// offsets, where write_sealed refuses exactly the writes whose blocks it
// cannot know ahead (an unaligned start, or an end inside a block of a file
// that goes on past it) and changes nothing then.
TEST_F(EncryptedFileTest, SealedAheadWritesMatchReference) {
  std::mt19937 rng(11);
  int sealed = 0;
  int refused = 0;
  for (int i = 0; i < 400; ++i) {
    const std::uint64_t off = (rng() % 3 == 0) ? rng() % 300000 : (rng() % 70) * bl::kBlockSize;
    const std::size_t len = (rng() % 2 == 0) ? (1 + rng() % 24) * bl::kBlockSize : 1 + rng() % 100000;
    const auto data = bytes(len, static_cast<std::uint32_t>(1000 + i));
    EncryptedFile f(fd_, key_, "test");
    std::vector<std::uint8_t> out(EncryptedFile::sealed_size(len));
    f.seal_ahead(off, data, out.data());
    const std::uint64_t before = plain_size();
    struct stat st0 {};
    ASSERT_EQ(::fstat(fd_, &st0), 0);
    const long n = f.write_sealed(before, off, len, out.data());
    const bool expect_refused = off % bl::kBlockSize != 0 || ((off + len) % bl::kBlockSize != 0 && before > off + len);
    if (expect_refused) {
      ASSERT_EQ(n, EncryptedFile::kNotSealable) << "off " << off << " len " << len << " size " << before;
      struct stat st1 {};
      ASSERT_EQ(::fstat(fd_, &st1), 0);
      EXPECT_EQ(st1.st_size, st0.st_size);
      ++refused;
      write(off, data);  // what the caller does then
    } else {
      ASSERT_EQ(n, static_cast<long>(len)) << "off " << off << " len " << len << " size " << before;
      if (ref_.size() < off + len) ref_.resize(off + len, 0);
      std::copy(data.begin(), data.end(), ref_.begin() + static_cast<long>(off));
      ++sealed;
    }
    ASSERT_EQ(plain_size(), ref_.size());
  }
  EXPECT_EQ(read_all(), ref_);
  EXPECT_GT(sealed, 100);
  EXPECT_GT(refused, 50);
}

// The partial last block before a sealed write grows to a full block first,
// next to the write and far before it, as write() does it.
TEST_F(EncryptedFileTest, SealedAheadWritePadsThePartialTail) {
  for (std::uint64_t gap : {0, 5}) {
    SCOPED_TRACE(gap);
    ::ftruncate(fd_, static_cast<off_t>(bl::kHeaderSize));
    ref_.clear();
    write(0, bytes(6000, 21));  // block 1 holds 1904 bytes
    write_sealed((2 + gap) * bl::kBlockSize, bytes(3 * bl::kBlockSize + 17, 22));
    EXPECT_EQ(read_all(), ref_);
  }
}

// A sealed write far past a partial last block reserves space for that
// block and for its own blocks, not for the gap: the gap stays a hole.
TEST_F(EncryptedFileTest, SealedAheadWriteFarPastTheEndLeavesAHole) {
  write(0, bytes(100, 31));
  write_sealed(32ULL << 20, bytes(16 * bl::kBlockSize, 32));
  struct stat st {};
  ASSERT_EQ(::fstat(fd_, &st), 0);
  EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, 4ULL << 20) << "the 32 MiB gap was allocated";
  EXPECT_EQ(read_all(), ref_);
}

TEST_F(EncryptedFileTest, UnalignedReadsMatchReference) {
  write(0, bytes(50000, 3));
  EncryptedFile f(fd_, key_, "test");
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) {
    std::uint64_t off = rng() % 52000;
    std::vector<std::uint8_t> out(1 + rng() % 9000);
    long n = f.read(plain_size(), off, out);
    std::size_t expect = off >= ref_.size() ? 0 : std::min<std::size_t>(out.size(), ref_.size() - off);
    ASSERT_EQ(n, static_cast<long>(expect));
    EXPECT_TRUE(std::equal(out.begin(), out.begin() + n, ref_.begin() + static_cast<long>(off)));
  }
}

TEST_F(EncryptedFileTest, WriteFarPastEofLeavesHoles) {
  write(0, bytes(100, 1));  // partial last block, padded when the file grows
  write(10 * 4096 + 5, bytes(10, 2));
  EXPECT_EQ(read_all(), ref_);
  // Block 3 is a hole: all zero bytes on disk.
  std::vector<std::uint8_t> stored(bl::kStoredBlockSize);
  ASSERT_EQ(::pread(fd_, stored.data(), stored.size(), static_cast<off_t>(bl::stored_offset(3))),
            static_cast<ssize_t>(stored.size()));
  EXPECT_TRUE(std::all_of(stored.begin(), stored.end(), [](std::uint8_t b) { return b == 0; }));
}

TEST_F(EncryptedFileTest, TruncateShrinksAndGrows) {
  write(0, bytes(20000, 9));
  EncryptedFile f(fd_, key_, "test");
  ASSERT_EQ(f.truncate(plain_size(), 6000), 0);
  ref_.resize(6000);
  EXPECT_EQ(read_all(), ref_);
  ASSERT_EQ(f.truncate(plain_size(), 50001), 0);
  ref_.resize(50001, 0);
  EXPECT_EQ(read_all(), ref_);
  ASSERT_EQ(f.truncate(plain_size(), 8192), 0);
  ref_.resize(8192);
  EXPECT_EQ(read_all(), ref_);
}

TEST_F(EncryptedFileTest, RejectsFlippedBit) {
  write(0, bytes(9000, 4));
  std::uint8_t b = 0;
  off_t pos = static_cast<off_t>(bl::stored_offset(1) + 20);
  ASSERT_EQ(::pread(fd_, &b, 1, pos), 1);
  b ^= 0x80;
  ASSERT_EQ(::pwrite(fd_, &b, 1, pos), 1);
  EncryptedFile f(fd_, key_, "test");
  std::vector<std::uint8_t> out(4096);
  EXPECT_EQ(f.read(plain_size(), 0, out), 4096);
  EXPECT_EQ(f.read(plain_size(), 4096, out), -EIO);
  // A write into the damaged block cannot read-modify-write it either.
  EXPECT_EQ(f.write(plain_size(), 4100, std::vector<std::uint8_t>{1, 2}), -EIO);
}

TEST_F(EncryptedFileTest, RejectsBlockMovedWithinFile) {
  write(0, bytes(3 * 4096, 6));
  std::vector<std::uint8_t> b0(bl::kStoredBlockSize);
  ASSERT_EQ(::pread(fd_, b0.data(), b0.size(), static_cast<off_t>(bl::stored_offset(0))),
            static_cast<ssize_t>(b0.size()));
  ASSERT_EQ(::pwrite(fd_, b0.data(), b0.size(), static_cast<off_t>(bl::stored_offset(2))),
            static_cast<ssize_t>(b0.size()));
  EncryptedFile f(fd_, key_, "test");
  std::vector<std::uint8_t> out(4096);
  EXPECT_EQ(f.read(plain_size(), 2 * 4096, out), -EIO);
}

TEST_F(EncryptedFileTest, RejectsBlockOfOtherFile) {
  write(0, bytes(4096, 8));
  FileKey other;
  other.dek = key_.dek.clone();  // even under the same key, the file id differs
  crypto::random_bytes(other.file_id);
  EncryptedFile f(fd_, other, "other");
  std::vector<std::uint8_t> out(4096);
  EXPECT_EQ(f.read(plain_size(), 0, out), -EIO);
}

}  // namespace
}  // namespace kmsfs::fs
