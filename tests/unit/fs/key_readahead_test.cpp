// KeyReadahead on a real directory of real headers: when it starts, what it
// reads, in which order, and what it leaves alone. The warm function
// records the file ids it is handed instead of calling a KMS.

#include "fs/key_readahead.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace kmsfs::fs {
namespace {

namespace stdfs = std::filesystem;
using namespace std::chrono_literals;

class KeyReadaheadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kmsfs-readahead-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { stdfs::remove_all(root_); }

  // A file whose header carries file id {n, 0, ...}.
  void make_file(const std::string& rel, std::uint8_t n, std::size_t payload = 100) {
    crypto::FileHeader h;
    h.file_id[0] = n;
    h.wrapped_key.assign(40, n);
    auto bytes = h.encode();
    std::string data(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    data.append(payload, 'x');
    int fd = ::open((root_ + "/" + rel).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0) << rel;
    ASSERT_EQ(::write(fd, data.data(), data.size()), static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  // Directory "d" holding files f1..fN (file ids 1..N).
  void make_dir_of_files(int n) {
    ASSERT_EQ(::mkdir((root_ + "/d").c_str(), 0700), 0);
    for (int i = 1; i <= n; ++i) make_file("d/f" + std::to_string(i), static_cast<std::uint8_t>(i));
  }
  KeyReadahead::DirId id_of(const std::string& rel) const {
    struct stat st {};
    EXPECT_EQ(::stat((root_ + "/" + rel).c_str(), &st), 0);
    return {st.st_dev, st.st_ino};
  }
  std::function<UniqueFd()> opener(const std::string& rel) {
    return [this, rel] {
      opened_++;
      return UniqueFd(::open((root_ + "/" + rel).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    };
  }
  KeyReadahead::WarmFn recorder(KeyReadahead::Warmed answer = KeyReadahead::Warmed::kOk) {
    return [this, answer](const crypto::FileHeader& h) {
      std::lock_guard lock(mu_);
      warmed_.push_back(h.file_id[0]);
      return answer;
    };
  }
  std::vector<std::uint8_t> warmed() {
    std::lock_guard lock(mu_);
    return warmed_;
  }
  // Waits until `n` headers were warmed (or 10 s passed).
  void wait_for(std::size_t n) {
    for (int i = 0; i < 1000 && warmed().size() < n; ++i) std::this_thread::sleep_for(10ms);
  }
  static KeyReadahead::InternalFn internal() {
    return [](const char* name, bool) { return std::strncmp(name, "kmsfs.", 6) == 0; };
  }

  std::string root_;
  std::mutex mu_;
  std::vector<std::uint8_t> warmed_;
  std::atomic<int> opened_{0};
};

TEST_F(KeyReadaheadTest, AColdOpenAfterAListingReadsTheDirectorysHeaders) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(20));
  make_file("d/kmsfs.diriv", 99);                       // internal: passed over
  make_file("d/.hidden", 98);                           // dot names: passed over
  ASSERT_EQ(::mkdir((root_ + "/d/sub").c_str(), 0700), 0);  // not a file
  make_file("d/sub/deeper", 97);                         // not this directory
  ASSERT_EQ(::mkfifo((root_ + "/d/fifo").c_str(), 0600), 0);  // must not block
  make_file("d/empty", 96, 0);
  ASSERT_EQ(::truncate((root_ + "/d/empty").c_str(), 10), 0);  // shorter than a header
  {
    int fd = ::open((root_ + "/d/garbage").c_str(), O_WRONLY | O_CREAT, 0600);
    std::string junk(300, 'j');
    ASSERT_EQ(::write(fd, junk.data(), junk.size()), 300);
    ::close(fd);
  }

  KeyReadahead ra(recorder(), internal(), {});
  const auto d = id_of("d");
  ra.listed(d);
  ra.cold_open(d, false, opener("d"));
  wait_for(20);
  std::this_thread::sleep_for(100ms);  // anything more would show up now
  auto got = warmed();
  std::set<std::uint8_t> ids(got.begin(), got.end());
  EXPECT_EQ(got.size(), 20u);
  EXPECT_EQ(ids.size(), 20u);
  EXPECT_EQ(*ids.begin(), 1);
  EXPECT_EQ(*ids.rbegin(), 20);
  EXPECT_EQ(opened_, 1);
  EXPECT_EQ(ra.stats().headers, 20u);
  EXPECT_EQ(ra.stats().warmed, 20u);

  // Further cold opens there start nothing: the directory was read.
  ra.listed(d);
  ra.cold_open(d, false, opener("d"));
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(warmed().size(), 20u);
  EXPECT_EQ(opened_, 1);
}

TEST_F(KeyReadaheadTest, OneColdOpenWithoutAListingStartsNothingTheSecondDoes) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(5));
  KeyReadahead ra(recorder(), internal(), {});
  const auto d = id_of("d");
  ra.cold_open(d, false, opener("d"));  // `cat one-file`: no read-ahead
  std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(warmed().empty());
  EXPECT_EQ(opened_, 0);
  ra.cold_open(d, false, opener("d"));  // a second one within a second: a walk
  wait_for(5);
  EXPECT_EQ(warmed().size(), 5u);
}

TEST_F(KeyReadaheadTest, ALongOrStaleWalkStartsNothing) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(3));
  KeyReadaheadOptions o;
  o.listed_window = 50ms;
  o.cold_open_window = 50ms;
  KeyReadahead ra(recorder(), internal(), o);
  const auto d = id_of("d");
  ra.listed(d);
  std::this_thread::sleep_for(120ms);
  ra.cold_open(d, false, opener("d"));
  std::this_thread::sleep_for(120ms);
  ra.cold_open(d, false, opener("d"));
  std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(warmed().empty());
  EXPECT_EQ(opened_, 0);
}

TEST_F(KeyReadaheadTest, BigDirectoriesAreReadInChunksAsTheWalkGoesOn) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(25));
  KeyReadaheadOptions o;
  o.max_files = 10;
  KeyReadahead ra(recorder(), internal(), o);
  const auto d = id_of("d");
  ra.listed(d);
  ra.cold_open(d, false, opener("d"));
  wait_for(10);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(warmed().size(), 10u);
  ra.cold_open(d, false, opener("d"));  // the walk reached the unread part
  wait_for(20);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(warmed().size(), 20u);
  ra.cold_open(d, false, opener("d"));
  wait_for(25);
  std::this_thread::sleep_for(100ms);
  ra.cold_open(d, false, opener("d"));  // nothing left
  std::this_thread::sleep_for(100ms);
  auto got = warmed();
  EXPECT_EQ(got.size(), 25u);
  EXPECT_EQ(std::set<std::uint8_t>(got.begin(), got.end()).size(), 25u) << "a file read twice";
  EXPECT_EQ(ra.stats().chunks, 3u);
}

TEST_F(KeyReadaheadTest, ARefusalStopsTheDirectory) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(200));
  KeyReadaheadOptions o;
  o.threads = 1;
  KeyReadahead ra(recorder(KeyReadahead::Warmed::kStop), internal(), o);
  const auto d = id_of("d");
  ra.listed(d);
  ra.cold_open(d, false, opener("d"));
  wait_for(1);
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(warmed().size(), 1u);
  // And it does not start over while the walk goes on.
  ra.cold_open(d, false, opener("d"));
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(warmed().size(), 1u);
}

TEST_F(KeyReadaheadTest, ReadingAheadLeavesAccessTimesAlone) {
  if (::geteuid() != 0) GTEST_SKIP() << "O_NOATIME on files of another owner needs root";
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(4));
  const timespec old_times[2] = {{1000000000, 0}, {1000000000, 0}};  // 2001: relatime would update
  for (int i = 1; i <= 4; ++i) {
    ASSERT_EQ(::utimensat(AT_FDCWD, (root_ + "/d/f" + std::to_string(i)).c_str(), old_times, 0), 0);
  }
  KeyReadahead ra(recorder(), internal(), {});
  const auto d = id_of("d");
  ra.listed(d);
  ra.cold_open(d, false, opener("d"));
  wait_for(4);
  ASSERT_EQ(warmed().size(), 4u);
  for (int i = 1; i <= 4; ++i) {
    struct stat st {};
    ASSERT_EQ(::stat((root_ + "/d/f" + std::to_string(i)).c_str(), &st), 0);
    EXPECT_EQ(st.st_atim.tv_sec, 1000000000) << "f" << i;
  }
}

TEST_F(KeyReadaheadTest, ZeroFilesIsOffAndStoppingWithQueuedWorkIsClean) {
  ASSERT_NO_FATAL_FAILURE(make_dir_of_files(50));
  {
    KeyReadaheadOptions off;
    off.max_files = 0;
    KeyReadahead ra(recorder(), internal(), off);
    EXPECT_FALSE(ra.enabled());
    ra.listed(id_of("d"));
    ra.cold_open(id_of("d"), false, opener("d"));
    std::this_thread::sleep_for(50ms);
    EXPECT_TRUE(warmed().empty());
  }
  {
    // A slow warm function: the destructor runs with most files queued.
    KeyReadaheadOptions o;
    o.threads = 2;
    KeyReadahead ra(
        [this](const crypto::FileHeader& h) {
          std::this_thread::sleep_for(20ms);
          std::lock_guard lock(mu_);
          warmed_.push_back(h.file_id[0]);
          return KeyReadahead::Warmed::kOk;
        },
        internal(), o);
    ra.listed(id_of("d"));
    ra.cold_open(id_of("d"), false, opener("d"));
    wait_for(1);
  }
  EXPECT_LT(warmed().size(), 50u);
}

// Directories t0..t(n-1), each holding files with ids 10*i+1..10*i+per_dir.
class KeyReadaheadTreeTest : public KeyReadaheadTest {
 protected:
  void make_tree(int n, int per_dir) {
    for (int i = 0; i < n; ++i) {
      const std::string d = "t" + std::to_string(i);
      ASSERT_EQ(::mkdir((root_ + "/" + d).c_str(), 0700), 0);
      for (int j = 1; j <= per_dir; ++j) {
        make_file(d + "/f" + std::to_string(j), static_cast<std::uint8_t>(10 * i + j));
      }
      dirs_[id_of(d)] = d;
    }
  }
  KeyReadahead::OpenDirFn by_id() {
    return [this](KeyReadahead::DirId id, bool& at_root) {
      at_root = false;
      by_id_opened_++;
      auto it = dirs_.find(id);
      if (it == dirs_.end()) return UniqueFd();
      return UniqueFd(::open((root_ + "/" + it->second).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    };
  }
  // The directory numbers (id / 10) of the headers warmed.
  std::set<int> dirs_warmed() {
    std::set<int> out;
    for (auto id : warmed()) out.insert(id / 10);
    return out;
  }
  std::map<KeyReadahead::DirId, std::string> dirs_;
  std::atomic<int> by_id_opened_{0};
};

TEST_F(KeyReadaheadTreeTest, ListingLedOpensInTwoDirectoriesReadAheadTheOtherListedOnes) {
  ASSERT_NO_FATAL_FAILURE(make_tree(6, 3));
  KeyReadaheadOptions o;
  o.tree_directories = 3;
  KeyReadahead ra(recorder(), internal(), o, by_id());
  // Listed in the order t0..t5, a little apart, as find lists a tree.
  for (int i = 0; i < 6; ++i) {
    ra.listed(id_of("t" + std::to_string(i)));
    std::this_thread::sleep_for(2ms);
  }
  ra.cold_open(id_of("t0"), false, opener("t0"));
  wait_for(3);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(dirs_warmed(), (std::set<int>{0})) << "one directory is no tree walk";
  EXPECT_EQ(by_id_opened_, 0);

  ra.cold_open(id_of("t1"), false, opener("t1"));  // the walk moved on: a tree walk
  wait_for(15);
  std::this_thread::sleep_for(100ms);
  // t1 itself, then the three listed earliest of the rest; t5 waits.
  EXPECT_EQ(dirs_warmed(), (std::set<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(warmed().size(), 15u);
  EXPECT_EQ(by_id_opened_, 3);
  EXPECT_EQ(ra.stats().tree_walks, 1u);
  EXPECT_EQ(ra.stats().chunks, 5u);

  // The program reaches t2..t4: read already, nothing starts; then t5.
  for (int i = 2; i <= 4; ++i) ra.cold_open(id_of("t" + std::to_string(i)), false, opener("t" + std::to_string(i)));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(warmed().size(), 15u);
  ra.cold_open(id_of("t5"), false, opener("t5"));
  wait_for(18);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(warmed().size(), 18u) << "each header once";
  const auto all = warmed();
  std::set<std::uint8_t> unique(all.begin(), all.end());
  EXPECT_EQ(unique.size(), 18u);
}

TEST_F(KeyReadaheadTreeTest, OpensFarApartOrUnlistedOrWithoutAnOpenerAreNoTreeWalk) {
  ASSERT_NO_FATAL_FAILURE(make_tree(4, 2));
  {
    // Cold opens in two listed directories, but not within the window.
    KeyReadaheadOptions o;
    o.cold_open_window = 30ms;
    KeyReadahead ra(recorder(), internal(), o, by_id());
    for (int i = 0; i < 4; ++i) ra.listed(id_of("t" + std::to_string(i)));
    ra.cold_open(id_of("t0"), false, opener("t0"));
    std::this_thread::sleep_for(80ms);
    ra.cold_open(id_of("t1"), false, opener("t1"));
    wait_for(4);
    std::this_thread::sleep_for(80ms);
    EXPECT_EQ(dirs_warmed(), (std::set<int>{0, 1}));
    EXPECT_EQ(ra.stats().tree_walks, 0u);
  }
  warmed_.clear();
  {
    // Only listed directories are read ahead: t2, t3 were never listed.
    KeyReadahead ra(recorder(), internal(), {}, by_id());
    ra.listed(id_of("t0"));
    ra.listed(id_of("t1"));
    ra.cold_open(id_of("t0"), false, opener("t0"));
    ra.cold_open(id_of("t1"), false, opener("t1"));
    wait_for(4);
    std::this_thread::sleep_for(80ms);
    EXPECT_EQ(dirs_warmed(), (std::set<int>{0, 1}));
    EXPECT_EQ(ra.stats().tree_walks, 1u);
  }
  warmed_.clear();
  {
    // No way to open other directories: no tree walk.
    KeyReadahead ra(recorder(), internal(), {});
    for (int i = 0; i < 4; ++i) ra.listed(id_of("t" + std::to_string(i)));
    ra.cold_open(id_of("t0"), false, opener("t0"));
    ra.cold_open(id_of("t1"), false, opener("t1"));
    wait_for(4);
    std::this_thread::sleep_for(80ms);
    EXPECT_EQ(dirs_warmed(), (std::set<int>{0, 1}));
    EXPECT_EQ(ra.stats().tree_walks, 0u);
  }
}

}  // namespace
}  // namespace kmsfs::fs
