// Real mounts, real syscalls: the filesystem as an application sees it.

#include <dirent.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

class FilesystemTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kms_ = new TempKms();
    vol_ = new Mount(kms_->root(), "main");
    vol_->mount();
  }
  static void TearDownTestSuite() {
    delete vol_;
    vol_ = nullptr;
    delete kms_;
    kms_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(vol_->mounted());
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::string(info->name());
    ASSERT_EQ(::mkdir(vol_->path(dir_).c_str(), 0755), 0) << std::strerror(errno);
  }
  std::string p(const std::string& rel) const { return vol_->path(dir_ + "/" + rel); }
  // The backing file of a file in the mount: names are encrypted, but the
  // mount reports the backing inode numbers, so the inode finds it.
  std::string backing(const std::string& rel) const {
    struct stat st {};
    if (::lstat(p(rel).c_str(), &st) != 0) throw std::runtime_error("no such file in the mount: " + rel);
    for (const auto& f : list_files(vol_->cipher())) {
      struct stat bst {};
      if (::lstat(f.c_str(), &bst) == 0 && bst.st_ino == st.st_ino) return f;
    }
    throw std::runtime_error("no backing file for " + rel);
  }

  static TempKms* kms_;
  static Mount* vol_;
  std::string dir_;
};
TempKms* FilesystemTest::kms_ = nullptr;
Mount* FilesystemTest::vol_ = nullptr;

struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

struct AlignedBlock {
  char* data = nullptr;
  explicit AlignedBlock(char fill) {
    if (::posix_memalign(reinterpret_cast<void**>(&data), 4096, 4096) != 0) throw std::bad_alloc();
    std::memset(data, fill, 4096);
  }
  ~AlignedBlock() { std::free(data); }
  AlignedBlock(const AlignedBlock&) = delete;
  AlignedBlock& operator=(const AlignedBlock&) = delete;
};

ssize_t pwrite_all(int fd, const void* buf, size_t n, off_t off) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::pwrite(fd, static_cast<const char*>(buf) + done, n - done, off + static_cast<off_t>(done));
    if (w < 0) return w;
    done += static_cast<size_t>(w);
  }
  return static_cast<ssize_t>(done);
}

TEST_F(FilesystemTest, RoundTripsEdgeSizes) {
  for (size_t size : {0UL, 1UL, 4095UL, 4096UL, 4097UL, 8192UL, 3 * 4096UL + 17, 1UL << 20}) {
    auto data = random_bytes(size, static_cast<std::uint32_t>(size));
    std::string f = p("f" + std::to_string(size));
    write_file(f, data);
    EXPECT_EQ(read_file(f), data) << "size " << size;
    struct stat st {};
    ASSERT_EQ(::stat(f.c_str(), &st), 0);
    EXPECT_EQ(static_cast<size_t>(st.st_size), size);
  }
}

TEST_F(FilesystemTest, RandomOffsetWritesMatchReference) {
  const size_t kSize = 10 << 20;
  std::vector<std::uint8_t> ref(kSize, 0);
  std::string f = p("random");
  Fd fd(::open(f.c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_GE(fd.fd, 0);
  std::mt19937 rng(42);
  size_t end = 0;
  for (int i = 0; i < 400; ++i) {
    size_t off = rng() % kSize;
    size_t len = std::min<size_t>(1 + rng() % 70000, kSize - off);
    auto chunk = random_bytes(len, static_cast<std::uint32_t>(i));
    ASSERT_EQ(pwrite_all(fd.fd, chunk.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    std::copy(chunk.begin(), chunk.end(), ref.begin() + static_cast<long>(off));
    end = std::max(end, off + len);
  }
  ref.resize(end);
  ASSERT_EQ(::fsync(fd.fd), 0);
  EXPECT_EQ(read_file(f), ref);
  // Also after the kernel's page cache is gone: read through a fresh open
  // with O_DIRECT-free path by dropping caches for this file.
  ASSERT_EQ(::posix_fadvise(fd.fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  std::vector<std::uint8_t> back(end);
  ASSERT_EQ(::pread(fd.fd, back.data(), end, 0), static_cast<ssize_t>(end));
  EXPECT_EQ(back, ref);
}

TEST_F(FilesystemTest, NoPlaintextInBackingDir) {
  std::string marker = "KMSFS-PLAINTEXT-MARKER-";
  std::string text;
  for (int i = 0; i < 2000; ++i) text += marker + std::to_string(i) + "\n";
  write_file(p("secret.txt"), std::vector<std::uint8_t>(text.begin(), text.end()));
  for (const auto& f : list_files(vol_->cipher())) {
    EXPECT_FALSE(contains(read_file(f), marker)) << f << " holds plaintext";
  }
  auto stored = read_file(backing("secret.txt"));
  EXPECT_GT(stored.size(), text.size());
  EXPECT_EQ(std::string(stored.begin(), stored.begin() + 8), "KMSFSHDR");
}

TEST_F(FilesystemTest, IdenticalFilesGiveDifferentCiphertext) {
  auto data = random_bytes(10000, 7);
  write_file(p("a"), data);
  write_file(p("b"), data);
  auto a = read_file(backing("a"));
  auto b = read_file(backing("b"));
  ASSERT_EQ(a.size(), b.size());
  EXPECT_NE(a, b);
  // Not even one 4 KiB block's ciphertext repeats.
  EXPECT_NE(std::vector<std::uint8_t>(a.begin() + 128, a.begin() + 128 + 4124),
            std::vector<std::uint8_t>(b.begin() + 128, b.begin() + 128 + 4124));
}

TEST_F(FilesystemTest, TruncateUpAndDownKeepsContentAndHolesReadZero) {
  auto data = random_bytes(10000, 3);
  std::string f = p("t");
  write_file(f, data);
  ASSERT_EQ(::truncate(f.c_str(), 5000), 0);
  data.resize(5000);
  EXPECT_EQ(read_file(f), data);
  ASSERT_EQ(::truncate(f.c_str(), 3 << 20), 0);
  data.resize(3 << 20, 0);
  EXPECT_EQ(read_file(f), data);
  ASSERT_EQ(::truncate(f.c_str(), 4096), 0);
  data.resize(4096);
  EXPECT_EQ(read_file(f), data);
  ASSERT_EQ(::truncate(f.c_str(), 0), 0);
  EXPECT_TRUE(read_file(f).empty());
  struct stat st {};
  ASSERT_EQ(::stat(backing("t").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 0) << "an empty file keeps no header";
}

TEST_F(FilesystemTest, WritePastEofLeavesSparseHole) {
  std::string f = p("sparse");
  Fd fd(::open(f.c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_GE(fd.fd, 0);
  ASSERT_EQ(pwrite_all(fd.fd, "head", 4, 0), 4);
  const off_t far = 64L << 20;
  ASSERT_EQ(pwrite_all(fd.fd, "tail", 4, far), 4);
  ASSERT_EQ(::fsync(fd.fd), 0);
  std::vector<char> buf(8192);
  ASSERT_EQ(::pread(fd.fd, buf.data(), buf.size(), 1 << 20), 8192);
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](char c) { return c == 0; }));
  ASSERT_EQ(::pread(fd.fd, buf.data(), 4, 0), 4);
  EXPECT_EQ(std::string(buf.data(), 4), "head");
  ASSERT_EQ(::pread(fd.fd, buf.data(), 4, far), 4);
  EXPECT_EQ(std::string(buf.data(), 4), "tail");
  struct stat st {};
  ASSERT_EQ(::stat(backing("sparse").c_str(), &st), 0);
  EXPECT_LT(st.st_blocks * 512, 1 << 20) << "the hole should stay sparse in the backing file";
  ASSERT_EQ(::fstat(fd.fd, &st), 0);
  EXPECT_EQ(st.st_size, far + 4);
}

TEST_F(FilesystemTest, DataSurvivesRemount) {
  auto data = random_bytes(123457, 11);
  write_file(p("persist"), data);
  ASSERT_EQ(::symlink("persist", p("link").c_str()), 0);
  vol_->unmount();
  vol_->mount();
  EXPECT_EQ(read_file(p("persist")), data);
  char target[64] = {};
  ASSERT_EQ(::readlink(p("link").c_str(), target, sizeof target - 1), 7);
  EXPECT_STREQ(target, "persist");
}

TEST_F(FilesystemTest, FlippedCiphertextBitGivesEioOnThatFileOnly) {
  auto data = random_bytes(20000, 5);
  write_file(p("victim"), data);
  write_file(p("healthy"), data);
  const std::string victim = backing("victim");
  vol_->unmount();
  {
    std::fstream f(victim, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(128 + 4124 + 100);  // inside block 1's ciphertext
    char c = 0;
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(128 + 4124 + 100);
    f.write(&c, 1);
  }
  vol_->mount();
  Fd fd(::open(p("victim").c_str(), O_RDONLY));
  ASSERT_GE(fd.fd, 0);
  std::vector<char> buf(4096);
  EXPECT_EQ(::pread(fd.fd, buf.data(), 4096, 0), 4096) << "block 0 is intact";
  errno = 0;
  EXPECT_EQ(::pread(fd.fd, buf.data(), 4096, 4096), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(read_file(p("healthy")), data);
}

TEST_F(FilesystemTest, CorruptHeaderFailsOpenOfThatFileOnly) {
  write_file(p("badheader"), random_bytes(5000, 1));
  write_file(p("goodheader"), random_bytes(5000, 2));
  const std::string bad = backing("badheader");
  vol_->unmount();
  {
    std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);  // inside the wrapped data key
    char c = 0x55;
    f.write(&c, 1);
  }
  vol_->mount();
  errno = 0;
  EXPECT_EQ(::open(p("badheader").c_str(), O_RDONLY), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(read_file(p("goodheader")), random_bytes(5000, 2));
}

TEST_F(FilesystemTest, TruncatedHeaderFailsOpen) {
  write_file(p("short"), random_bytes(5000, 9));
  const std::string short_file = backing("short");
  vol_->unmount();
  ASSERT_EQ(::truncate(short_file.c_str(), 60), 0);
  vol_->mount();
  errno = 0;
  EXPECT_EQ(::open(p("short").c_str(), O_RDONLY), -1);
  EXPECT_EQ(errno, EIO);
}

TEST_F(FilesystemTest, RenameVariants) {
  write_file(p("a"), {'a'});
  write_file(p("b"), {'b'});
  ASSERT_EQ(::rename(p("a").c_str(), p("b").c_str()), 0);
  EXPECT_EQ(read_file(p("b")), std::vector<std::uint8_t>{'a'});
  EXPECT_NE(::access(p("a").c_str(), F_OK), 0);

  write_file(p("c"), {'c'});
  EXPECT_EQ(::renameat2(AT_FDCWD, p("c").c_str(), AT_FDCWD, p("b").c_str(), RENAME_NOREPLACE), -1);
  EXPECT_EQ(errno, EEXIST);
  ASSERT_EQ(::renameat2(AT_FDCWD, p("c").c_str(), AT_FDCWD, p("b").c_str(), RENAME_EXCHANGE), 0);
  EXPECT_EQ(read_file(p("b")), std::vector<std::uint8_t>{'c'});
  EXPECT_EQ(read_file(p("c")), std::vector<std::uint8_t>{'a'});

  ASSERT_EQ(::mkdir(p("sub").c_str(), 0755), 0);
  ASSERT_EQ(::rename(p("c").c_str(), p("sub/moved").c_str()), 0);
  EXPECT_EQ(read_file(p("sub/moved")), std::vector<std::uint8_t>{'a'});
  ASSERT_EQ(::rename(p("sub").c_str(), p("sub2").c_str()), 0);
  EXPECT_EQ(read_file(p("sub2/moved")), std::vector<std::uint8_t>{'a'});
}

// rmdir, or a rename over an empty directory, moves the directory's
// kmsfs.diriv out first (fs/filesystem.cpp, park_dir_iv), which sets the
// directory's mtime; a program holding the directory open must still see
// the times it set, as on any filesystem (found by the differential tester,
// seed 255 with 4 threads).
TEST_F(FilesystemTest, RemovedDirectoryKeepsItsTimesForAnOpenFd) {
  const timespec set[2] = {{1200000000, 0}, {1300000000, 0}};
  for (const bool by_rename : {false, true}) {
    SCOPED_TRACE(by_rename ? "renamed over" : "rmdir");
    const std::string d = p(by_rename ? "victim2" : "victim");
    ASSERT_EQ(::mkdir(d.c_str(), 0755), 0);
    if (by_rename) {
      ASSERT_EQ(::mkdir(p("mover").c_str(), 0755), 0);
    }
    ASSERT_EQ(::utimensat(AT_FDCWD, d.c_str(), set, 0), 0);
    Fd fd(::open(d.c_str(), O_RDONLY | O_DIRECTORY));
    ASSERT_GE(fd.fd, 0);
    if (by_rename) {
      ASSERT_EQ(::rename(p("mover").c_str(), d.c_str()), 0) << std::strerror(errno);
    } else {
      ASSERT_EQ(::rmdir(d.c_str()), 0) << std::strerror(errno);
    }
    struct stat st {};
    ASSERT_EQ(::fstat(fd.fd, &st), 0);
    EXPECT_EQ(st.st_mtim.tv_sec, 1300000000);
    EXPECT_EQ(st.st_atim.tv_sec, 1200000000);
  }
}

TEST_F(FilesystemTest, RenameOfOpenFileKeepsWorking) {
  {
    Fd fd(::open(p("open").c_str(), O_RDWR | O_CREAT, 0644));
    ASSERT_GE(fd.fd, 0);
    ASSERT_EQ(pwrite_all(fd.fd, "before", 6, 0), 6);
    ASSERT_EQ(::rename(p("open").c_str(), p("renamed").c_str()), 0);
    ASSERT_EQ(pwrite_all(fd.fd, "after", 5, 6), 5);
    ASSERT_EQ(::fsync(fd.fd), 0);
    auto got = read_file(p("renamed"));
    EXPECT_EQ(std::string(got.begin(), got.end()), "beforeafter");
  }  // closed before the unmount
  vol_->unmount();
  vol_->mount();
  auto got = read_file(p("renamed"));
  EXPECT_EQ(std::string(got.begin(), got.end()), "beforeafter");
}

TEST_F(FilesystemTest, HardLinksShareContent) {
  write_file(p("orig"), {'1', '2', '3'});
  ASSERT_EQ(::link(p("orig").c_str(), p("hard").c_str()), 0);
  struct stat st {};
  ASSERT_EQ(::stat(p("orig").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2U);
  {
    Fd fd(::open(p("hard").c_str(), O_WRONLY | O_APPEND));
    ASSERT_GE(fd.fd, 0);
    ASSERT_EQ(::write(fd.fd, "45", 2), 2);
  }
  auto got = read_file(p("orig"));
  EXPECT_EQ(std::string(got.begin(), got.end()), "12345");
  ASSERT_EQ(::unlink(p("orig").c_str()), 0);
  got = read_file(p("hard"));
  EXPECT_EQ(std::string(got.begin(), got.end()), "12345");
}

TEST_F(FilesystemTest, AppendAndTruncFlags) {
  {
    Fd fd(::open(p("log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644));
    ASSERT_GE(fd.fd, 0);
    for (int i = 0; i < 100; ++i) ASSERT_EQ(::write(fd.fd, "0123456789", 10), 10);
  }
  struct stat st {};
  ASSERT_EQ(::stat(p("log").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 1000);
  {
    Fd fd(::open(p("log").c_str(), O_WRONLY | O_TRUNC));
    ASSERT_GE(fd.fd, 0);
    ASSERT_EQ(::write(fd.fd, "x", 1), 1);
  }
  EXPECT_EQ(read_file(p("log")), std::vector<std::uint8_t>{'x'});
}

TEST_F(FilesystemTest, DirectoriesSymlinksFifos) {
  ASSERT_EQ(::mkdir(p("d").c_str(), 0700), 0);
  ASSERT_EQ(::mkdir(p("d/e").c_str(), 0700), 0);
  EXPECT_EQ(::rmdir(p("d").c_str()), -1);
  EXPECT_EQ(errno, ENOTEMPTY);
  ASSERT_EQ(::rmdir(p("d/e").c_str()), 0);
  ASSERT_EQ(::rmdir(p("d").c_str()), 0);

  ASSERT_EQ(::symlink("/some/target path", p("sym").c_str()), 0);
  char buf[64] = {};
  ASSERT_EQ(::readlink(p("sym").c_str(), buf, sizeof buf - 1), 17);
  EXPECT_STREQ(buf, "/some/target path");
  struct stat st {};
  ASSERT_EQ(::lstat(p("sym").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));

  ASSERT_EQ(::mkfifo(p("fifo").c_str(), 0600), 0);
  ASSERT_EQ(::lstat(p("fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));

  std::set<std::string> names;
  DIR* d = ::opendir(p("").c_str());
  ASSERT_NE(d, nullptr);
  while (dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  EXPECT_EQ(names, (std::set<std::string>{".", "..", "sym", "fifo"}));
}

TEST_F(FilesystemTest, ManyEntriesInOneDirectory) {
  for (int i = 0; i < 1500; ++i) {
    write_file(p("n" + std::to_string(i)), {static_cast<std::uint8_t>(i)});
  }
  std::set<std::string> names;
  DIR* d = ::opendir(p("").c_str());
  ASSERT_NE(d, nullptr);
  while (dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  EXPECT_EQ(names.size(), 1502U);
  EXPECT_EQ(read_file(p("n1234")), std::vector<std::uint8_t>{static_cast<std::uint8_t>(1234 & 0xff)});
}

TEST_F(FilesystemTest, MetadataChanges) {
  write_file(p("m"), {'m'});
  ASSERT_EQ(::chmod(p("m").c_str(), 0640), 0);
  struct stat st {};
  ASSERT_EQ(::stat(p("m").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640U);
  ASSERT_EQ(::chown(p("m").c_str(), 1234, 5678), 0);
  ASSERT_EQ(::stat(p("m").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 1234U);
  EXPECT_EQ(st.st_gid, 5678U);
  struct timespec times[2] = {{1000000000, 0}, {1100000000, 500}};
  ASSERT_EQ(::utimensat(AT_FDCWD, p("m").c_str(), times, 0), 0);
  ASSERT_EQ(::stat(p("m").c_str(), &st), 0);
  EXPECT_EQ(st.st_mtim.tv_sec, 1100000000);
  EXPECT_EQ(st.st_atim.tv_sec, 1000000000);
  // A symlink's own times (touch -h, tar restoring a tree).
  ASSERT_EQ(::symlink("m", p("mlink").c_str()), 0);
  ASSERT_EQ(::utimensat(AT_FDCWD, p("mlink").c_str(), times, AT_SYMLINK_NOFOLLOW), 0) << std::strerror(errno);
  ASSERT_EQ(::lstat(p("mlink").c_str(), &st), 0);
  EXPECT_EQ(st.st_mtim.tv_sec, 1100000000);
  struct statvfs sv {};
  ASSERT_EQ(::statvfs(vol_->mnt().c_str(), &sv), 0);
  EXPECT_GT(sv.f_blocks, 0U);
}

// A SETATTR of times the backing file already has is answered without
// setting them again (the kernel sends one for every file it drops after an
// unlink); times that differ still reach the backing file.
TEST_F(FilesystemTest, SettingTimesReachesTheBackingFileAlsoWhenRepeated) {
  write_file(p("times"), {'t'});
  const std::string b = backing("times");
  struct timespec t1[2] = {{1200000000, 7}, {1300000000, 9}};
  struct timespec t2[2] = {{1400000000, 11}, {1500000000, 13}};
  struct stat st {};
  for (const auto* times : {t1, t1, t2, t2, t1}) {
    ASSERT_EQ(::utimensat(AT_FDCWD, p("times").c_str(), times, 0), 0) << std::strerror(errno);
    ASSERT_EQ(::stat(p("times").c_str(), &st), 0);
    EXPECT_EQ(st.st_mtim.tv_sec, times[1].tv_sec);
    EXPECT_EQ(st.st_mtim.tv_nsec, times[1].tv_nsec);
    ASSERT_EQ(::stat(b.c_str(), &st), 0);
    EXPECT_EQ(st.st_mtim.tv_sec, times[1].tv_sec) << "backing file";
    EXPECT_EQ(st.st_mtim.tv_nsec, times[1].tv_nsec) << "backing file";
    EXPECT_EQ(st.st_atim.tv_sec, times[0].tv_sec) << "backing file";
  }
  // Only the modification time, the access time left alone.
  struct timespec only_m[2] = {{0, UTIME_OMIT}, {1600000000, 0}};
  ASSERT_EQ(::utimensat(AT_FDCWD, p("times").c_str(), only_m, 0), 0);
  ASSERT_EQ(::stat(b.c_str(), &st), 0);
  EXPECT_EQ(st.st_mtim.tv_sec, 1600000000);
  EXPECT_EQ(st.st_atim.tv_sec, t1[0].tv_sec);
  // A write moves the time on, through the kernel's write-back of it.
  {
    int fd = ::open(p("times").c_str(), O_WRONLY | O_APPEND);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, "more", 4), 4);
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
  }
  ASSERT_EQ(::stat(p("times").c_str(), &st), 0);
  EXPECT_GT(st.st_mtim.tv_sec, 1600000000);
  ASSERT_EQ(::stat(b.c_str(), &st), 0);
  EXPECT_GT(st.st_mtim.tv_sec, 1600000000) << "backing file";
}

TEST_F(FilesystemTest, UserXattrsRoundTrip) {
  write_file(p("x"), {'x'});
  ASSERT_EQ(::setxattr(p("x").c_str(), "user.color", "blue", 4, 0), 0) << std::strerror(errno);
  char buf[16] = {};
  ASSERT_EQ(::getxattr(p("x").c_str(), "user.color", buf, sizeof buf), 4);
  EXPECT_EQ(std::string(buf, 4), "blue");
  char list[256] = {};
  ssize_t n = ::listxattr(p("x").c_str(), list, sizeof list);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(list), "user.color");
  ASSERT_EQ(::removexattr(p("x").c_str(), "user.color"), 0);
  EXPECT_EQ(::getxattr(p("x").c_str(), "user.color", buf, sizeof buf), -1);
  EXPECT_EQ(errno, ENODATA);
}

// Only user.* is stored; every other namespace answers "not supported" to
// set, get and remove alike, which is what ls -l, cp and exec(2) expect
// from a filesystem without SELinux labels or POSIX ACLs.
TEST_F(FilesystemTest, OtherXattrNamespacesAreNotSupported) {
  write_file(p("y"), {'y'});
  ASSERT_EQ(::mkdir(p("ydir").c_str(), 0755), 0);
  char buf[64] = {};
  for (const char* target : {"y", "ydir"}) {
    for (const char* name : {"security.selinux", "system.posix_acl_access", "system.posix_acl_default",
                             "trusted.x", "security.capability"}) {
      errno = 0;
      EXPECT_EQ(::lgetxattr(p(target).c_str(), name, buf, sizeof buf), -1) << target << " " << name;
      EXPECT_EQ(errno, EOPNOTSUPP) << target << " " << name;
      // (The kernel itself answers 0 to removing a regular file's default
      // ACL, which cannot exist.)
      if (std::string(target) == "y" && std::string(name) == "system.posix_acl_default") continue;
      errno = 0;
      EXPECT_EQ(::lremovexattr(p(target).c_str(), name), -1) << target << " " << name;
      EXPECT_EQ(errno, EOPNOTSUPP) << target << " " << name;
    }
    errno = 0;
    EXPECT_EQ(::lsetxattr(p(target).c_str(), "trusted.x", "v", 1, 0), -1);
    EXPECT_EQ(errno, EOPNOTSUPP);
  }
  // ls -l shows no ACL mark and no label, and says nothing on stderr.
  auto r = run_command({"/bin/ls", "-ld", p("y"), p("ydir")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  EXPECT_NE(r.out.find("-rw"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('+'), std::string::npos) << r.out;
  // exec(2) reads security.capability: "not supported" is "no capabilities".
  const std::string script = p("run.sh");
  const std::string text = "#!/bin/sh\necho ran\n";
  write_file(script, std::vector<std::uint8_t>(text.begin(), text.end()));
  ASSERT_EQ(::chmod(script.c_str(), 0755), 0);
  auto ran = run_command({script});
  EXPECT_EQ(ran.exit_code, 0) << ran.err;
  EXPECT_EQ(ran.out, "ran\n");
}

// A truncate(2) by path that extends a file takes the file's key while a
// RELEASE of the last handle, delivered asynchronously, drops the inode's
// key: the truncate must still use the key it took (it answered EIO now and
// then, found by the concurrent difftest under ASan).
TEST_F(FilesystemTest, TruncateByPathRacingTheLastCloseNeverFails) {
  const std::string f = p("trunc-race");
  write_file(f, std::vector<std::uint8_t>(100, 'a'));
  std::atomic<bool> stop{false};
  std::atomic<int> eio{0};
  std::thread closer([&] {
    while (!stop.load()) {
      const int fd = ::open(f.c_str(), O_WRONLY);
      if (fd >= 0) {
        (void)::pwrite(fd, "b", 1, 0);
        ::close(fd);
      }
    }
  });
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  int truncates = 0;
  int other_errors = 0;
  for (int i = 0; std::chrono::steady_clock::now() < end; ++i) {
    if (::truncate(f.c_str(), 5000 + (i % 3000)) != 0) {
      if (errno == EIO) {
        ++eio;
      } else {
        ++other_errors;
      }
    }
    ++truncates;
  }
  stop = true;
  closer.join();
  EXPECT_EQ(eio.load(), 0) << "of " << truncates << " truncates";
  EXPECT_EQ(other_errors, 0);
  EXPECT_EQ(read_file(f).size(), static_cast<std::size_t>(5000 + ((truncates - 1) % 3000)));
}

TEST_F(FilesystemTest, ConcurrentWritersNeverTearBlocks) {
  // Each writer fills whole 4 KiB blocks with its own byte; readers check
  // that every block they see holds one byte value only.
  const int kBlocks = 64;
  std::string f = p("shared");
  write_file(f, std::vector<std::uint8_t>(kBlocks * 4096, 0));
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0};
  std::vector<std::thread> threads;
  for (int w = 1; w <= 3; ++w) {
    threads.emplace_back([&, w] {
      // O_DIRECT: every write reaches the filesystem as it is issued, so
      // the test exercises kmsfs's locking, not the kernel's page cache.
      Fd fd(::open(f.c_str(), O_WRONLY | O_DIRECT));
      AlignedBlock block(static_cast<char>(w));
      std::mt19937 rng(w);
      for (int i = 0; i < 300; ++i) {
        off_t off = static_cast<off_t>(rng() % kBlocks) * 4096;
        if (pwrite_all(fd.fd, block.data, 4096, off) != 4096) torn++;
      }
    });
  }
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      Fd fd(::open(f.c_str(), O_RDONLY | O_DIRECT));
      AlignedBlock block(0);
      std::mt19937 rng(99);
      while (!stop) {
        off_t off = static_cast<off_t>(rng() % kBlocks) * 4096;
        ssize_t n = ::pread(fd.fd, block.data, 4096, off);
        if (n != 4096) {
          torn++;
          continue;
        }
        if (!std::all_of(block.data, block.data + 4096, [&](char c) { return c == block.data[0]; })) torn++;
      }
    });
  }
  for (int i = 0; i < 3; ++i) threads[static_cast<size_t>(i)].join();
  stop = true;
  for (size_t i = 3; i < threads.size(); ++i) threads[i].join();
  EXPECT_EQ(torn.load(), 0);
  auto all = read_file(f);
  ASSERT_EQ(all.size(), static_cast<size_t>(kBlocks * 4096));
  for (int b = 0; b < kBlocks; ++b) {
    auto first = all.begin() + b * 4096;
    EXPECT_TRUE(std::all_of(first, first + 4096, [&](std::uint8_t c) { return c == *first; }))
        << "block " << b;
  }
}

TEST_F(FilesystemTest, ConcurrentLargeWritesAndTruncatesKeepEveryBlockSound) {
  // Large block-aligned writes are encrypted before the content lock is
  // taken (EncryptedFile::seal_ahead), under the key the file had then,
  // while a truncate to zero through a handle drops the file's key and the
  // next write makes a new one. Three writers fill 256 KiB and 1 MiB runs
  // with their own byte, O_DIRECT so that each write is one request; a
  // fourth thread truncates to zero now and then; a reader looks for blocks
  // that fail authentication all the while. (The kernel itself orders a
  // truncate after the writes in flight to the inode, so a write sealed
  // under a key that a truncate dropped does not reach kmsfs this way;
  // kmsfs checks for it anyway and seals such a write again under the lock.)
  const std::size_t kRun = 1 << 20;
  std::string f = p("large-shared");
  write_file(f, std::vector<std::uint8_t>(4 * kRun, 0));
  std::atomic<int> failures{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int w = 1; w <= 3; ++w) {
    threads.emplace_back([&, w] {
      Fd fd(::open(f.c_str(), O_WRONLY | O_DIRECT));
      if (fd.fd < 0) {
        failures++;
        return;
      }
      char* buf = nullptr;
      if (::posix_memalign(reinterpret_cast<void**>(&buf), 4096, kRun) != 0) throw std::bad_alloc();
      std::memset(buf, w, kRun);
      std::mt19937 rng(static_cast<unsigned>(w));
      for (int i = 0; i < 100; ++i) {
        const std::size_t len = (rng() % 2 == 0) ? kRun : kRun / 4;
        const off_t off = static_cast<off_t>(rng() % 13) * static_cast<off_t>(kRun / 4);
        if (pwrite_all(fd.fd, buf, len, off) != static_cast<ssize_t>(len)) failures++;
      }
      std::free(buf);
    });
  }
  threads.emplace_back([&] {
    Fd fd(::open(f.c_str(), O_WRONLY));
    for (int n = 0; !stop && n < 40; ++n) {
      if (::ftruncate(fd.fd, 0) != 0) failures++;
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
    }
  });
  // A block stored under the old key fails authentication until the next
  // truncate wipes it: a reader looks all the while.
  std::atomic<int> eio{0};
  threads.emplace_back([&] {
    Fd fd(::open(f.c_str(), O_RDONLY | O_DIRECT));
    char* buf = nullptr;
    if (::posix_memalign(reinterpret_cast<void**>(&buf), 4096, kRun) != 0) throw std::bad_alloc();
    std::mt19937 rng(7);
    while (!stop) {
      const off_t off = static_cast<off_t>(rng() % 16) * static_cast<off_t>(kRun / 4);
      if (::pread(fd.fd, buf, kRun, off) < 0) (errno == EIO ? eio : failures)++;
    }
    std::free(buf);
  });
  for (int i = 0; i < 3; ++i) threads[static_cast<size_t>(i)].join();
  stop = true;
  for (std::size_t i = 3; i < threads.size(); ++i) threads[i].join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(eio.load(), 0);
  // After a remount (no page cache), and to fsck: every block opens, and
  // holds zeros (a hole or a truncated tail) or one writer's byte. (Other
  // tests of this volume leave damaged files on purpose: fsck must name none
  // of this one's.)
  vol_->unmount();
  auto fsck = run_command({bin("kmsfs"), "fsck", vol_->cipher()});
  EXPECT_TRUE(fsck.exit_code == 0 || fsck.exit_code == 6) << fsck.out << fsck.err;
  EXPECT_NE(fsck.out.find("files,"), std::string::npos) << fsck.out << fsck.err;
  EXPECT_EQ(fsck.out.find("large-shared"), std::string::npos) << fsck.out;
  vol_->mount();
  auto all = read_file(f);
  ASSERT_EQ(all.size() % 4096, 0U);
  for (std::size_t b = 0; b < all.size() / 4096; ++b) {
    auto first = all.begin() + static_cast<long>(b * 4096);
    EXPECT_TRUE(std::all_of(first, first + 4096, [&](std::uint8_t c) { return c == *first; })) << "block " << b;
  }
}

TEST_F(FilesystemTest, FsyncAndFdatasync) {
  Fd fd(::open(p("sync").c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_GE(fd.fd, 0);
  ASSERT_EQ(pwrite_all(fd.fd, "durable", 7, 0), 7);
  EXPECT_EQ(::fdatasync(fd.fd), 0);
  EXPECT_EQ(::fsync(fd.fd), 0);
  Fd dfd(::open(p("").c_str(), O_RDONLY | O_DIRECTORY));
  EXPECT_EQ(::fsync(dfd.fd), 0);
}

TEST_F(FilesystemTest, ConfigFileIsHiddenAndProtected) {
  std::set<std::string> names;
  DIR* d = ::opendir(vol_->mnt().c_str());
  ASSERT_NE(d, nullptr);
  while (dirent* e = ::readdir(d)) names.insert(e->d_name);
  ::closedir(d);
  EXPECT_EQ(names.count("kmsfs.json"), 0U);
  EXPECT_EQ(names.count("kmsfs.diriv"), 0U);
  EXPECT_EQ(::open(vol_->path("kmsfs.json").c_str(), O_RDONLY), -1);
  // With encrypted names a user's "kmsfs.json" is just another file and
  // never touches the volume's own.
  auto before = read_file(vol_->cipher() + "/kmsfs.json");
  write_file(vol_->path("kmsfs.json"), {'u', 's', 'e', 'r'});
  EXPECT_EQ(read_file(vol_->path("kmsfs.json")), (std::vector<std::uint8_t>{'u', 's', 'e', 'r'}));
  EXPECT_EQ(read_file(vol_->cipher() + "/kmsfs.json"), before);
  ASSERT_EQ(::unlink(vol_->path("kmsfs.json").c_str()), 0);
}

TEST_F(FilesystemTest, CopiedTreeSurvivesRemountByteForByte) {
  // A real source tree: the OpenSSL headers of this machine.
  auto r = run_command({"/bin/cp", "-a", "/usr/include/openssl", p("tree")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  vol_->unmount();
  vol_->mount();
  r = run_command({"/usr/bin/diff", "-r", "/usr/include/openssl", p("tree")});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// Set-user-ID and set-group-ID bits on writes, truncates and O_TRUNC opens
// by a user without CAP_FSETID: the mount clears them exactly as the kernel
// does on a plain directory (kmsfs negotiates FUSE_HANDLE_KILLPRIV_V2, so the
// kernel leaves this to the server: fs/killpriv.h). Each case runs on the
// mount and on a plain directory; the resulting modes must agree.
TEST(KillPriv, WritesByOtherUsersClearSuidAndSgidAsOnAPlainDirectory) {
  if (auto why = cannot_run_as_nobody({"/bin/sh", "-c", "true"}); !why.empty()) GTEST_SKIP() << why;
  TempKms kms;
  const std::string root = make_temp_dir("kmsfs-killpriv");
  ASSERT_EQ(::chmod(root.c_str(), 0755), 0);  // uid 65534 reaches the mount and the plain dir
  const std::string plain = root + "/plain";
  ASSERT_EQ(::mkdir(plain.c_str(), 0777), 0);
  ASSERT_EQ(::chmod(plain.c_str(), 0777), 0);
  Mount m(root, "v");
  ASSERT_NO_THROW(m.mount({"-o", "allow_other"}));
  ASSERT_EQ(::chmod(m.mnt().c_str(), 0777), 0);
  struct Case {
    const char* name;
    mode_t mode;
    bool as_nobody;
    const char* command;  // run in the directory, on the file "f"
  };
  const Case cases[] = {
      {"append by another user, suid+sgid, group may execute", 06775, true, "printf x >> f"},
      {"append by another user, sgid without group execute", 02764, true, "printf x >> f"},
      {"append by root (CAP_FSETID)", 06755, false, "printf x >> f"},
      {"truncate by another user", 04777, true, "truncate -s 1 f"},
      {"O_TRUNC open by another user", 06777, true, ": > f"},
      {"read by another user", 06775, true, "cat f > /dev/null"},
  };
  int n = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    mode_t got[2] = {0, 0};
    int i = 0;
    for (const std::string& dir : {plain, m.mnt()}) {
      const std::string d = dir + "/c" + std::to_string(n);
      ASSERT_EQ(::mkdir(d.c_str(), 0777), 0);
      ASSERT_EQ(::chmod(d.c_str(), 0777), 0);
      const std::string f = d + "/f";
      write_file(f, {'a', 'b', 'c'});
      ASSERT_EQ(::chown(f.c_str(), 65534, 65534), 0);
      ASSERT_EQ(::chmod(f.c_str(), c.mode), 0);
      std::vector<std::string> argv;
      if (c.as_nobody) argv = {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"};
      argv.insert(argv.end(), {"/bin/sh", "-c", std::string("cd '") + d + "' && " + c.command});
      auto r = run_command(argv);
      ASSERT_EQ(r.exit_code, 0) << dir << ": " << r.err;
      struct stat st {};
      ASSERT_EQ(::stat(f.c_str(), &st), 0);
      got[i++] = st.st_mode & 07777;
    }
    EXPECT_EQ(got[1], got[0]) << std::oct << "mount 0" << got[1] << ", plain directory 0" << got[0];
    ++n;
  }
  m.unmount();
  // And after a remount (nothing cached in the kernel): the backing modes.
  ASSERT_NO_THROW(m.mount());
  for (int i = 0; i < n; ++i) {
    struct stat a {}, b {};
    ASSERT_EQ(::stat((plain + "/c" + std::to_string(i) + "/f").c_str(), &a), 0);
    ASSERT_EQ(::stat((m.mnt() + "/c" + std::to_string(i) + "/f").c_str(), &b), 0);
    EXPECT_EQ(b.st_mode & 07777, a.st_mode & 07777) << cases[i].name;
  }
  m.unmount();
  remove_tree(root);
}

}  // namespace
}  // namespace kmsfs::test

namespace kmsfs::test {
namespace {

// Appends `chunk` to fd from `synced` on, fsyncing each, at most `chunks`
// times; `synced` ends at what was acknowledged. The first errno, or 0.
int fill_until_error(int fd, const std::vector<std::uint8_t>& chunk, int chunks, off_t& synced) {
  for (int i = 0; i < chunks; ++i) {
    if (pwrite_all(fd, chunk.data(), chunk.size(), synced) < 0 || ::fsync(fd) != 0) return errno;
    synced += static_cast<off_t>(chunk.size());
  }
  return 0;
}

// A tmpfs of `size` at `path` (made), detached again when the test ends.
struct SmallTmpfs {
  SmallTmpfs(std::string p, const std::string& size) : path(std::move(p)) {
    mounted = ::mkdir(path.c_str(), 0700) == 0 &&
              ::mount("tmpfs", path.c_str(), "tmpfs", 0, ("size=" + size).c_str()) == 0;
  }
  ~SmallTmpfs() {
    if (mounted) ::umount2(path.c_str(), MNT_DETACH);
  }
  SmallTmpfs(const SmallTmpfs&) = delete;
  SmallTmpfs& operator=(const SmallTmpfs&) = delete;
  std::string path;
  bool mounted = false;
};

// listxattr(2) hands out at most 64 KiB of names and the backing store's
// names are the encrypted, longer ones. On a backing tmpfs (which itself
// takes any number), user xattrs are added until the mount refuses one:
// it must refuse with ENOSPC, and listxattr must still list every name it
// took (it failed with E2BIG once the encrypted list passed 64 KiB).
TEST(XattrListLimit, NamesStopBeforeListxattrWouldFail) {
  TempKms kms;
  const std::string store_dir = kms.root() + "/xattrs";
  SmallTmpfs store(store_dir, "64m");
  ASSERT_TRUE(store.mounted) << std::strerror(errno);
  Mount vol(store_dir, "vol");
  vol.mount();
  const std::string f = vol.path("f");
  write_file(f, {'x'});
  std::set<std::string> taken;
  int err = 0;
  for (int i = 0; i < 5000 && err == 0; ++i) {
    const std::string name = "user.attribute_with_a_longish_name_" + std::to_string(i);
    if (::setxattr(f.c_str(), name.c_str(), "v", 1, 0) == 0) {
      taken.insert(name);
    } else {
      err = errno;
    }
  }
  EXPECT_EQ(err, ENOSPC) << std::strerror(err);
  EXPECT_GT(taken.size(), 100U);
  ssize_t n = ::listxattr(f.c_str(), nullptr, 0);
  ASSERT_GT(n, 0) << std::strerror(errno);
  std::vector<char> list(static_cast<size_t>(n));
  n = ::listxattr(f.c_str(), list.data(), list.size());
  ASSERT_GT(n, 0) << std::strerror(errno);
  std::set<std::string> listed;
  for (ssize_t i = 0; i < n; i += static_cast<ssize_t>(std::strlen(list.data() + i)) + 1) {
    listed.insert(list.data() + i);
  }
  EXPECT_EQ(listed, taken);
  // A name already there can still be replaced, and after a removal there
  // is room for a new one.
  const std::string first = *taken.begin();
  EXPECT_EQ(::setxattr(f.c_str(), first.c_str(), "w", 1, XATTR_REPLACE), 0) << std::strerror(errno);
  ASSERT_EQ(::removexattr(f.c_str(), first.c_str()), 0) << std::strerror(errno);
  EXPECT_EQ(::setxattr(f.c_str(), "user.x", "v", 1, 0), 0) << std::strerror(errno);
  vol.unmount();
}

// A backing filesystem that runs full: writes fail with ENOSPC, what was
// stored before stays intact, and the mount keeps serving.
TEST(FullBackingStore, EnospcFailsCleanlyAndKeepsServing) {
  TempKms kms;
  const std::string small = kms.root() + "/small";
  SmallTmpfs store(small, "4m");
  ASSERT_TRUE(store.mounted) << std::strerror(errno);
  {
    Mount vol(small, "vol");
    vol.mount();
    auto keep = random_bytes(300000, 77);
    write_file(vol.path("keep"), keep);

    // Fill up, fsyncing every 64 KiB; remember what was acknowledged.
    Fd fd(::open(vol.path("filler").c_str(), O_WRONLY | O_CREAT, 0644));
    ASSERT_GE(fd.fd, 0);
    auto chunk = random_bytes(65536, 78);
    off_t synced = 0;
    EXPECT_EQ(fill_until_error(fd.fd, chunk, 200, synced), ENOSPC);
    ::close(fd.fd);
    fd.fd = -1;

    EXPECT_EQ(read_file(vol.path("keep")), keep);
    // Every acknowledged byte of the filler reads back; nothing is torn.
    Fd rd(::open(vol.path("filler").c_str(), O_RDONLY));
    ASSERT_GE(rd.fd, 0);
    std::vector<std::uint8_t> buf(chunk.size());
    for (off_t off = 0; off < synced; off += static_cast<off_t>(chunk.size())) {
      ASSERT_EQ(::pread(rd.fd, buf.data(), buf.size(), off), static_cast<ssize_t>(buf.size())) << off;
      EXPECT_EQ(buf, chunk) << "at " << off;
    }
    // Reading past the acknowledged part may see zeros or data, never EIO.
    struct stat st {};
    ASSERT_EQ(::fstat(rd.fd, &st), 0);
    std::vector<std::uint8_t> rest(static_cast<size_t>(st.st_size - synced));
    EXPECT_EQ(::pread(rd.fd, rest.data(), rest.size(), synced), static_cast<ssize_t>(rest.size()))
        << std::strerror(errno);
    ::close(rd.fd);
    rd.fd = -1;

    // Still full: a new file (its header), a long name (its side file) and
    // a directory either work or fail with ENOSPC, never corrupt anything.
    for (const std::string& name : {std::string("new"), std::string(200, 'L')}) {
      const int nfd = ::open(vol.path(name).c_str(), O_WRONLY | O_CREAT, 0644);
      if (nfd < 0) {
        EXPECT_EQ(errno, ENOSPC) << name.size() << "-character name: " << std::strerror(errno);
        continue;
      }
      const ssize_t n = ::write(nfd, chunk.data(), chunk.size());
      const int werr = n < 0 ? errno : 0;
      const int serr = ::fsync(nfd) != 0 ? errno : 0;
      ::close(nfd);
      if (n < 0) {
        EXPECT_EQ(werr, ENOSPC) << std::strerror(werr);
      }
      if (serr != 0) {
        EXPECT_EQ(serr, ENOSPC) << std::strerror(serr);
      }
    }
    if (::mkdir(vol.path("dir").c_str(), 0755) != 0) {
      EXPECT_EQ(errno, ENOSPC) << std::strerror(errno);
    }

    // On disk: fsck finds nothing wrong, and after a remount everything
    // acknowledged reads back.
    vol.unmount();
    auto fsck = run_command({bin("kmsfs"), "fsck", vol.cipher()});
    EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;
    vol.mount();
    EXPECT_EQ(read_file(vol.path("keep")), keep);
    Fd again(::open(vol.path("filler").c_str(), O_RDONLY));
    ASSERT_GE(again.fd, 0);
    for (off_t off = 0; off < synced; off += static_cast<off_t>(chunk.size())) {
      ASSERT_EQ(::pread(again.fd, buf.data(), buf.size(), off), static_cast<ssize_t>(buf.size())) << off;
      EXPECT_EQ(buf, chunk) << "at " << off << " after remount";
    }
    ::close(again.fd);
    again.fd = -1;

    // Space freed: the mount serves new writes again.
    ASSERT_EQ(::unlink(vol.path("filler").c_str()), 0);
    write_file(vol.path("after"), {'o', 'k'});
    EXPECT_EQ(read_file(vol.path("after")), (std::vector<std::uint8_t>{'o', 'k'}));
    vol.unmount();
  }
}

// The mount reserves space before a write only where the backing file may
// lack it (Inode::dense): on a full store an overwrite of written blocks
// still succeeds, and a write into a hole fails with ENOSPC or succeeds
// whole, block by block, never leaving a torn block behind.
TEST(FullBackingStore, OverwritesSucceedAndWritesIntoHolesFailCleanly) {
  TempKms kms;
  const std::string small = kms.root() + "/small";
  SmallTmpfs store(small, "2m");
  ASSERT_TRUE(store.mounted) << std::strerror(errno);
  Mount vol(small, "vol");
  vol.mount();
  auto dense_data = random_bytes(262144, 91);
  Fd dense(::open(vol.path("dense").c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_GE(dense.fd, 0);
  ASSERT_EQ(pwrite_all(dense.fd, dense_data.data(), dense_data.size(), 0), static_cast<ssize_t>(dense_data.size()));
  ASSERT_EQ(::fsync(dense.fd), 0);
  // A first overwrite: the mount learns the file has no holes.
  auto patch = random_bytes(4096, 92);
  ASSERT_EQ(pwrite_all(dense.fd, patch.data(), patch.size(), 8192), static_cast<ssize_t>(patch.size()));
  ASSERT_EQ(::fsync(dense.fd), 0);
  std::copy(patch.begin(), patch.end(), dense_data.begin() + 8192);

  const off_t sparse_size = 1 << 20;
  auto head = random_bytes(4096, 93);
  Fd sparse(::open(vol.path("sparse").c_str(), O_RDWR | O_CREAT, 0644));
  ASSERT_GE(sparse.fd, 0);
  ASSERT_EQ(pwrite_all(sparse.fd, head.data(), head.size(), 0), static_cast<ssize_t>(head.size()));
  ASSERT_EQ(::ftruncate(sparse.fd, sparse_size), 0);
  ASSERT_EQ(pwrite_all(sparse.fd, head.data(), head.size(), 0), static_cast<ssize_t>(head.size()));  // an overwrite: holes seen
  ASSERT_EQ(::fsync(sparse.fd), 0);

  // Fill the store.
  {
    Fd filler(::open(vol.path("filler").c_str(), O_WRONLY | O_CREAT, 0644));
    ASSERT_GE(filler.fd, 0);
    off_t at = 0;
    ASSERT_EQ(fill_until_error(filler.fd, random_bytes(65536, 94), 100, at), ENOSPC);
  }

  // Overwriting written blocks needs no new space.
  auto over = random_bytes(65536, 95);
  EXPECT_EQ(pwrite_all(dense.fd, over.data(), over.size(), 100000), static_cast<ssize_t>(over.size())) << std::strerror(errno);
  EXPECT_EQ(::fsync(dense.fd), 0) << std::strerror(errno);
  std::copy(over.begin(), over.end(), dense_data.begin() + 100000);
  std::vector<std::uint8_t> got(dense_data.size());
  ASSERT_EQ(::pread(dense.fd, got.data(), got.size(), 0), static_cast<ssize_t>(got.size())) << std::strerror(errno);
  EXPECT_TRUE(got == dense_data) << "the overwritten file reads back wrong";

  // Into the hole: ENOSPC or success, each 4 KiB block either new or zeros.
  auto into_hole = random_bytes(65536, 96);
  const off_t hole_at = 524288;
  const bool wrote = pwrite_all(sparse.fd, into_hole.data(), into_hole.size(), hole_at) >= 0;
  const int werr = wrote ? 0 : errno;
  const bool synced = ::fsync(sparse.fd) == 0;
  const int serr = synced ? 0 : errno;
  if (!wrote) {
    EXPECT_EQ(werr, ENOSPC) << std::strerror(werr);
  }
  if (!synced) {
    EXPECT_EQ(serr, ENOSPC) << std::strerror(serr);
  }
  std::vector<std::uint8_t> all(static_cast<std::size_t>(sparse_size));
  ASSERT_EQ(::pread(sparse.fd, all.data(), all.size(), 0), static_cast<ssize_t>(all.size()))
      << "a block of the file does not read back: " << std::strerror(errno);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), all.begin()));
  const std::vector<std::uint8_t> zeros(4096, 0);
  for (std::size_t b = 0; b < into_hole.size(); b += 4096) {
    const auto* at = all.data() + hole_at + b;
    const bool is_new = std::equal(into_hole.begin() + static_cast<long>(b),
                                   into_hole.begin() + static_cast<long>(b + 4096), at);
    const bool is_zero = std::equal(zeros.begin(), zeros.end(), at);
    EXPECT_TRUE(is_new || is_zero) << "block at " << hole_at + static_cast<off_t>(b) << " is neither";
  }
  ::close(dense.fd);
  dense.fd = -1;
  ::close(sparse.fd);
  sparse.fd = -1;
  vol.unmount();
  auto fsck = run_command({bin("kmsfs"), "fsck", vol.cipher()});
  EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;
}

}  // namespace
}  // namespace kmsfs::test

namespace kmsfs::test {
namespace {

// Every inode the kernel remembers holds a descriptor in the server: past
// -o max_inodes the mount asks the kernel to forget entries, so a tree
// larger than the bound stays within the server's descriptors, and every
// file still reads back.
TEST(InodeBound, ATreeLargerThanTheBoundStaysWithinItsDescriptors) {
  TempKms kms;
  Mount vol(kms.root(), "bound");
  ForegroundMount m(vol.cipher(), vol.mnt(), {"-o", "max_inodes=100"});
  ASSERT_NO_THROW(m.start());
  const long base = proc_fd_count(m.pid());
  ASSERT_GT(base, 0);
  const int dirs = 3;
  const int files = 400;
  for (int d = 0; d < dirs; ++d) {
    const std::string dir = vol.path("d" + std::to_string(d));
    ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0) << std::strerror(errno);
    for (int f = 0; f < files; ++f) {
      const std::string name = "f" + std::to_string(f);
      write_file(dir + "/" + name, std::vector<std::uint8_t>(name.begin(), name.end()));
    }
  }
  long peak = 0;
  for (int d = 0; d < dirs; ++d) {
    const std::string dir = vol.path("d" + std::to_string(d));
    DIR* dh = ::opendir(dir.c_str());
    ASSERT_NE(dh, nullptr) << std::strerror(errno);
    int listed = 0;
    while (dirent* e = ::readdir(dh)) {
      if (e->d_name[0] != '.') ++listed;
    }
    ::closedir(dh);
    EXPECT_EQ(listed, files) << dir;
    for (int f = 0; f < files; ++f) {
      const std::string name = "f" + std::to_string(f);
      EXPECT_EQ(read_file(dir + "/" + name), std::vector<std::uint8_t>(name.begin(), name.end())) << dir << "/" << name;
    }
    peak = std::max(peak, proc_fd_count(m.pid()));
  }
  // 1200 files and 3 directories went through the kernel; once the
  // trimmer is done the server holds about max_inodes descriptors for them.
  long now = proc_fd_count(m.pid());
  for (int i = 0; i < 100 && now > base + 100 + 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    now = proc_fd_count(m.pid());
  }
  EXPECT_LE(now, base + 100 + 20) << "descriptors: " << base << " at start, " << now << " at the end, peak " << peak;
  EXPECT_EQ(m.stop(), 0);
}

}  // namespace
}  // namespace kmsfs::test

namespace kmsfs::test {
namespace {

// The kernel's read-ahead window of the mount: its FUSE device's
// read_ahead_kb in /sys/class/bdi ("" when it cannot be read).
std::string read_ahead_kb_path(const std::string& mnt) {
  struct stat st {};
  if (::stat(mnt.c_str(), &st) != 0) return "";
  return "/sys/class/bdi/" + std::to_string(major(st.st_dev)) + ":" + std::to_string(minor(st.st_dev)) +
         "/read_ahead_kb";
}

std::string read_ahead_kb_of(const std::string& mnt) {
  std::ifstream in(read_ahead_kb_path(mnt));
  std::string kb;
  in >> kb;
  return kb;
}

TEST(ReadAheadMount, TheMountRaisesTheWindowAndTheOptionSetsIt) {
  if (::geteuid() != 0) GTEST_SKIP() << "raising a device's read_ahead_kb needs root";
  TempKms kms;
  Mount m(kms.root(), "read-ahead");
  std::vector<std::uint8_t> data(8 << 20);
  std::mt19937 rng(3);
  for (auto& b : data) b = static_cast<std::uint8_t>(rng());
  m.mount();
  if (::access(read_ahead_kb_path(m.mnt()).c_str(), W_OK) != 0) {
    GTEST_SKIP() << "sysfs is read-only here: the mount keeps the kernel's window (by design)";
  }
  write_file(m.path("big"), data);
  // The default, 4 MiB, survives the INIT reply (the kernel takes the
  // smaller of the reply and the device's setting).
  EXPECT_EQ(read_ahead_kb_of(m.mnt()), "4096");
  m.unmount();
  m.mount({"-o", "read_ahead_kb=512"});
  EXPECT_EQ(read_ahead_kb_of(m.mnt()), "512");
  EXPECT_EQ(read_file(m.path("big")), data);  // read cold, in 512 KiB windows
  m.unmount();
  m.mount({"-o", "read_ahead_kb=0"});  // the kernel's own
  const std::string kernels = read_ahead_kb_of(m.mnt());
  EXPECT_FALSE(kernels.empty());
  EXPECT_NE(kernels, "4096");
  EXPECT_NE(kernels, "512");
  m.unmount();
  for (const std::string bad : {"read_ahead_kb=-1", "read_ahead_kb=70000", "read_ahead_kb=big", "read_ahead_kb="}) {
    auto r = run_command({bin("kmsfs"), "mount", "-o", bad, m.cipher(), m.mnt()});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find("read_ahead_kb"), std::string::npos) << r.err;
    EXPECT_FALSE(is_mountpoint(m.mnt()));
  }
}

}  // namespace
}  // namespace kmsfs::test
