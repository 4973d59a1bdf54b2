// Key read-ahead on a real mount (fs/key_readahead.h): a program that lists
// a directory and reads its files gets their keys unwrapped ahead of the
// opens, each key once; the audit trail shows one Decrypt per file of that
// directory and none for other directories; the backing files' access times
// stay as they were; -o key_readahead=0 turns it off. A walk of a listed
// tree reads the other listed directories ahead too. -o key_cache_entries
// bounds the cache the read-ahead fills.

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

using namespace std::chrono_literals;

// Decrypt records of file keys in the audit trail (the volume's name key
// has another context).
int file_key_decrypts() {
  auto r = run_command({bin("kmsctl"), "audit", "search", "--event-name", "Decrypt", "--limit", "1000000"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  int n = 0;
  for (std::size_t at = r.out.find("\"kmsfs:file\""); at != std::string::npos;
       at = r.out.find("\"kmsfs:file\"", at + 1)) {
    ++n;
  }
  return n;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  EXPECT_NE(d, nullptr) << dir << ": " << std::strerror(errno);
  if (d == nullptr) return names;
  while (struct dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.emplace_back(e->d_name);
  }
  ::closedir(d);
  return names;
}

std::vector<std::uint8_t> content_of(int i) { return random_bytes(1000 + 37 * i, 7000 + i); }

constexpr time_t kOldTime = 1000000000;  // 2001: relatime would update it on a read

TEST(KeyReadaheadMount, AWalkUnwrapsADirectorysKeysOnceAheadOfTheOpens) {
  TempKms kms;
  Mount m(kms.root(), "ra");
  m.mount();
  constexpr int kFiles = 30;
  ASSERT_EQ(::mkdir(m.path("d").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(m.path("e").c_str(), 0755), 0);
  for (int i = 0; i < kFiles; ++i) write_file(m.path("d/f" + std::to_string(i)), content_of(i));
  for (int i = 0; i < 5; ++i) write_file(m.path("e/g" + std::to_string(i)), content_of(100 + i));
  m.unmount();
  const timespec old_times[2] = {{kOldTime, 0}, {kOldTime, 0}};
  for (const auto& f : list_files(m.cipher())) {
    ASSERT_EQ(::utimensat(AT_FDCWD, f.c_str(), old_times, AT_SYMLINK_NOFOLLOW), 0) << f;
  }

  m.mount();  // cold: the DEK cache is empty
  const int before = file_key_decrypts();
  auto names = list_dir(m.path("d"));
  ASSERT_EQ(names.size(), static_cast<std::size_t>(kFiles));
  const int first = std::stoi(names[0].substr(1));
  EXPECT_EQ(read_file(m.path("d/" + names[0])), content_of(first));
  int seen = 0;
  for (int i = 0; i < 1000 && (seen = file_key_decrypts() - before) < kFiles; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(seen, kFiles) << "one open after a listing should unwrap every key of the directory";

  // Only the file that was read shows a new access time.
  int touched = 0;
  for (const auto& f : list_files(m.cipher())) {
    if (f.find("/kmsfs.") != std::string::npos) continue;  // volume files, directory IVs
    struct stat st {};
    ASSERT_EQ(::lstat(f.c_str(), &st), 0);
    if (st.st_atim.tv_sec != kOldTime) ++touched;
  }
  EXPECT_EQ(touched, 1);

  for (const auto& n : names) EXPECT_EQ(read_file(m.path("d/" + n)), content_of(std::stoi(n.substr(1))));
  // Each key once (an open and the read-ahead of its key at the same moment
  // share one Decrypt); directory e was neither listed nor read: none of
  // its keys.
  EXPECT_EQ(file_key_decrypts() - before, kFiles);
  m.unmount();

  // Off: a listing and three reads cost three Decrypts.
  m.mount({"-o", "key_readahead=0"});
  const int before_off = file_key_decrypts();
  names = list_dir(m.path("d"));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(read_file(m.path("d/" + names[i])), content_of(std::stoi(names[i].substr(1))));
  }
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(file_key_decrypts() - before_off, 3);
  m.unmount();
}

// find DIR -type f -exec cat {} +: the whole tree is listed first, then
// read directory after directory. Once reads have moved from one listed
// directory to the next, the other listed directories' keys are unwrapped
// ahead too; a directory nobody listed is left alone.
TEST(KeyReadaheadMount, ATreeWalkUnwrapsTheOtherListedDirectoriesAhead) {
  TempKms kms;
  Mount m(kms.root(), "ra-tree");
  m.mount();
  constexpr int kDirs = 6;
  constexpr int kPerDir = 4;
  for (int d = 0; d < kDirs; ++d) {
    ASSERT_EQ(::mkdir(m.path("t" + std::to_string(d)).c_str(), 0755), 0);
    for (int i = 0; i < kPerDir; ++i) {
      write_file(m.path("t" + std::to_string(d) + "/f" + std::to_string(i)), content_of(10 * d + i));
    }
  }
  ASSERT_EQ(::mkdir(m.path("unlisted").c_str(), 0755), 0);
  for (int i = 0; i < 3; ++i) write_file(m.path("unlisted/u" + std::to_string(i)), content_of(90 + i));
  m.unmount();

  m.mount();
  const int before = file_key_decrypts();
  for (int d = 0; d < kDirs; ++d) ASSERT_EQ(list_dir(m.path("t" + std::to_string(d))).size(), 4u);
  // One file of t0, then one of t1: a tree walk.
  EXPECT_EQ(read_file(m.path("t0/f0")), content_of(0));
  EXPECT_EQ(read_file(m.path("t1/f0")), content_of(10));
  const int expected = kDirs * kPerDir;
  int seen = 0;
  for (int i = 0; i < 1000 && (seen = file_key_decrypts() - before) < expected; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(seen, expected) << "every listed directory's keys, each once";
  for (int d = 0; d < kDirs; ++d) {
    for (int i = 0; i < kPerDir; ++i) {
      EXPECT_EQ(read_file(m.path("t" + std::to_string(d) + "/f" + std::to_string(i))), content_of(10 * d + i));
    }
  }
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(file_key_decrypts() - before, expected) << "the reads found every key cached";
  EXPECT_EQ(read_file(m.path("unlisted/u0")), content_of(90));
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(file_key_decrypts() - before, expected + 1) << "the unlisted directory: only the file read";
  m.unmount();
}

// -o key_cache_entries bounds the DEK cache: with room for 4 keys, after
// reading 10 files of a fresh mount the first one read needs a Decrypt
// again, the last one does not; with the default bound neither does.
// (Files are read, not created, in the measured mounts: a create's
// prefetch refill adds keys to the cache too.) Bad values: see
// BadOptionValuesAreRefusedByName.
TEST(KeyReadaheadMount, KeyCacheEntriesBoundsTheCachedKeys) {
  TempKms kms;
  Mount m(kms.root(), "cache-bound");
  constexpr int kFiles = 10;
  m.mount();
  for (int i = 0; i < kFiles; ++i) write_file(m.path("f" + std::to_string(i)), content_of(i));
  m.unmount();
  auto read_all = [&] {
    for (int i = 0; i < kFiles; ++i) {
      EXPECT_EQ(read_file(m.path("f" + std::to_string(i))), content_of(i));
    }
    std::this_thread::sleep_for(300ms);  // RELEASE is asynchronous: the keys leave the inodes
  };

  m.mount({"-o", "key_readahead=0,key_cache_entries=4"});
  int before = file_key_decrypts();
  read_all();
  EXPECT_EQ(file_key_decrypts() - before, kFiles);
  before = file_key_decrypts();
  EXPECT_EQ(read_file(m.path("f" + std::to_string(kFiles - 1))), content_of(kFiles - 1));
  EXPECT_EQ(file_key_decrypts() - before, 0) << "the newest key should still be cached";
  EXPECT_EQ(read_file(m.path("f0")), content_of(0));
  EXPECT_EQ(file_key_decrypts() - before, 1) << "the oldest key should have been evicted";
  m.unmount();

  m.mount({"-o", "key_readahead=0"});
  read_all();
  before = file_key_decrypts();
  EXPECT_EQ(read_file(m.path("f0")), content_of(0));
  EXPECT_EQ(file_key_decrypts() - before, 0) << "the default bound keeps far more than 10 keys";
  m.unmount();
}

TEST(KeyReadaheadMount, BadOptionValuesAreRefusedByName) {
  TempKms kms;
  Mount m(kms.root(), "ra-opts");
  for (const std::string bad : {"key_readahead=-1", "key_readahead=lots", "key_readahead=70000", "key_readahead=5x",
                                 "key_cache_entries=0", "key_cache_entries=many", "key_cache_entries=2000000"}) {
    auto r = run_command({bin("kmsfs"), "mount", "-o", bad, m.cipher(), m.mnt()});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find(bad.substr(0, bad.find('='))), std::string::npos) << r.err;
    EXPECT_FALSE(is_mountpoint(m.mnt()));
  }
}

}  // namespace
}  // namespace kmsfs::test
