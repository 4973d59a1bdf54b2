// Encrypted names (the default of `kmsfs init`): every plaintext name of 1 to
// 255 bytes works, nothing of it shows in the backing directory.

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.insert(n);
  }
  ::closedir(d);
  return names;
}

// All backing names below `dir`, recursively.
void backing_names(const std::string& dir, std::vector<std::string>& out) {
  for (const auto& n : entries(dir)) {
    out.push_back(n);
    struct stat st {};
    std::string p = dir + "/" + n;
    if (::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) backing_names(p, out);
  }
}

// Every "kmsfs.longname.X.name" side file has its entry "kmsfs.longname.X"
// in the same directory, and the other way round.
void expect_side_files_paired(const std::string& dir) {
  auto names = entries(dir);
  const std::string prefix = "kmsfs.longname.";
  for (const auto& n : names) {
    if (n.rfind(prefix, 0) != 0) {
      struct stat st {};
      std::string sub = dir + "/" + n;
      if (::lstat(sub.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) expect_side_files_paired(sub);
      continue;
    }
    const bool side = n.size() > 5 && n.substr(n.size() - 5) == ".name";
    if (side) {
      EXPECT_EQ(names.count(n.substr(0, n.size() - 5)), 1U) << "orphan side file " << dir << "/" << n;
    } else {
      EXPECT_EQ(names.count(n + ".name"), 1U) << "long entry without side file " << dir << "/" << n;
      struct stat st {};
      std::string sub = dir + "/" + n;
      if (::lstat(sub.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) expect_side_files_paired(sub);
    }
  }
}

class NamesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    kms_ = new TempKms();
    vol_ = new Mount(kms_->root(), "names");
    vol_->mount();
  }
  static void TearDownTestSuite() {
    delete vol_;
    delete kms_;
  }
  void SetUp() override {
    dir_ = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    ASSERT_EQ(::mkdir(vol_->path(dir_).c_str(), 0755), 0) << std::strerror(errno);
  }
  std::string p(const std::string& rel) const { return vol_->path(dir_ + "/" + rel); }
  static TempKms* kms_;
  static Mount* vol_;
  std::string dir_;
};
TempKms* NamesTest::kms_ = nullptr;
Mount* NamesTest::vol_ = nullptr;

TEST_F(NamesTest, EveryLengthFrom1To255RoundTrips) {
  std::set<std::string> want;
  for (size_t len = 1; len <= 255; ++len) {
    std::string name(len, 'a' + static_cast<char>(len % 26));
    write_file(p(name), {static_cast<std::uint8_t>(len)});
    want.insert(name);
  }
  EXPECT_EQ(entries(p("")), want);
  for (size_t len = 1; len <= 255; ++len) {
    std::string name(len, 'a' + static_cast<char>(len % 26));
    EXPECT_EQ(read_file(p(name)), std::vector<std::uint8_t>{static_cast<std::uint8_t>(len)}) << len;
  }
  std::string too_long(256, 'z');
  EXPECT_EQ(::open(p(too_long).c_str(), O_CREAT | O_WRONLY, 0644), -1);
  EXPECT_EQ(errno, ENAMETOOLONG);
}

TEST_F(NamesTest, AwkwardBytesRoundTrip) {
  std::set<std::string> want = {"with space", "new\nline", ".hidden", "..dots", "ünïcödé ✓",
                                "tab\there", "kmsfs.json", "kmsfs.diriv", "-dash", "#hash"};
  for (const auto& n : want) write_file(p(n), {'x'});
  EXPECT_EQ(entries(p("")), want);
  for (const auto& n : want) EXPECT_EQ(read_file(p(n)), std::vector<std::uint8_t>{'x'}) << n;
}

TEST_F(NamesTest, NothingOfThePlaintextNameIsInTheBackingDir) {
  write_file(p("confidential-report.pdf"), {'x'});
  ASSERT_EQ(::mkdir(p("secret-project").c_str(), 0755), 0);
  ASSERT_EQ(::symlink("/home/alice/private-target", p("secret-link").c_str()), 0);
  std::vector<std::string> all;
  backing_names(vol_->cipher(), all);
  for (const auto& n : all) {
    EXPECT_EQ(n.find("confidential"), std::string::npos) << n;
    EXPECT_EQ(n.find("secret"), std::string::npos) << n;
    EXPECT_NE(n, dir_) << "directory names are encrypted too";
  }
  // Symlink targets are encrypted, and readlink/lstat show the plaintext.
  char buf[256] = {};
  ASSERT_EQ(::readlink(p("secret-link").c_str(), buf, sizeof buf - 1), 26);
  EXPECT_STREQ(buf, "/home/alice/private-target");
  struct stat st {};
  ASSERT_EQ(::lstat(p("secret-link").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 26);
  auto r = run_command({"/usr/bin/grep", "-r", "private-target", vol_->cipher()});
  EXPECT_NE(r.exit_code, 0) << r.out;
}

TEST_F(NamesTest, SameNameInTwoDirectoriesGivesDifferentBackingNames) {
  ASSERT_EQ(::mkdir(p("one").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(p("two").c_str(), 0755), 0);
  write_file(p("one/same"), {'1'});
  write_file(p("two/same"), {'2'});
  // Find the two backing directories: the only subdirectories of this test's one.
  std::vector<std::string> all;
  backing_names(vol_->cipher(), all);
  std::multiset<std::string> counts(all.begin(), all.end());
  for (const auto& n : all) {
    if (n.rfind("kmsfs.", 0) == 0) continue;
    EXPECT_EQ(counts.count(n), 1U) << "backing name " << n << " repeats";
  }
}

TEST_F(NamesTest, RenameAcrossDirectoriesAndLongNames) {
  ASSERT_EQ(::mkdir(p("src").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(p("dst").c_str(), 0755), 0);
  std::string long1(250, 'L');
  std::string long2(240, 'M');
  write_file(p("src/" + long1), {'a', 'b'});
  ASSERT_EQ(::rename(p("src/" + long1).c_str(), p("dst/" + long2).c_str()), 0) << std::strerror(errno);
  EXPECT_EQ(entries(p("src")), std::set<std::string>{});
  EXPECT_EQ(entries(p("dst")), std::set<std::string>{long2});
  EXPECT_EQ(read_file(p("dst/" + long2)), (std::vector<std::uint8_t>{'a', 'b'}));
  // Long name -> short name and back.
  ASSERT_EQ(::rename(p("dst/" + long2).c_str(), p("dst/short").c_str()), 0);
  ASSERT_EQ(::rename(p("dst/short").c_str(), p("src/" + long1).c_str()), 0);
  EXPECT_EQ(entries(p("src")), std::set<std::string>{long1});
  // Hard link under a long name, then unlink both.
  ASSERT_EQ(::link(p("src/" + long1).c_str(), p("dst/" + long2).c_str()), 0);
  EXPECT_EQ(read_file(p("dst/" + long2)), (std::vector<std::uint8_t>{'a', 'b'}));
  ASSERT_EQ(::unlink(p("src/" + long1).c_str()), 0);
  ASSERT_EQ(::unlink(p("dst/" + long2).c_str()), 0);
  EXPECT_TRUE(entries(p("src")).empty());
  EXPECT_TRUE(entries(p("dst")).empty());
  // No orphan side files stay behind, and no long entry lacks its side file.
  expect_side_files_paired(vol_->cipher());
  // Directories with long names, and rmdir of them.
  ASSERT_EQ(::mkdir(p(long1).c_str(), 0755), 0);
  write_file(p(long1 + "/inner"), {'i'});
  EXPECT_EQ(::rmdir(p(long1).c_str()), -1);
  EXPECT_EQ(errno, ENOTEMPTY);
  ASSERT_EQ(::unlink(p(long1 + "/inner").c_str()), 0);
  ASSERT_EQ(::rmdir(p(long1).c_str()), 0) << std::strerror(errno);
  EXPECT_TRUE(entries(p("")).count(long1) == 0);
}

// rename(2) over an empty directory replaces it, as on any filesystem,
// although the backing directory holds its kmsfs.diriv; over a non-empty one
// it fails with ENOTEMPTY and both stay intact.
TEST_F(NamesTest, RenameOverAnEmptyDirectoryReplacesIt) {
  ASSERT_EQ(::mkdir(p("a").c_str(), 0755), 0);
  write_file(p("a/inside"), {'x', 'y'});
  ASSERT_EQ(::mkdir(p("empty").c_str(), 0755), 0);
  ASSERT_EQ(::rename(p("a").c_str(), p("empty").c_str()), 0) << std::strerror(errno);
  EXPECT_EQ(entries(p("")), std::set<std::string>{"empty"});
  EXPECT_EQ(read_file(p("empty/inside")), (std::vector<std::uint8_t>{'x', 'y'}));
  // The parked IV is gone again: the backing dir holds only the entry and
  // the parent's diriv.
  for (const auto& n : entries(vol_->cipher())) EXPECT_EQ(n.rfind("kmsfs.rmdir.", 0), std::string::npos) << n;

  ASSERT_EQ(::mkdir(p("b").c_str(), 0755), 0);
  errno = 0;
  EXPECT_EQ(::rename(p("b").c_str(), p("empty").c_str()), -1);
  EXPECT_EQ(errno, ENOTEMPTY);
  EXPECT_EQ(read_file(p("empty/inside")), (std::vector<std::uint8_t>{'x', 'y'}));
  // The failed rename put the IV back: names in "empty" still resolve, and
  // new ones can be made.
  write_file(p("empty/second"), {'2'});
  EXPECT_EQ(entries(p("empty")), (std::set<std::string>{"inside", "second"}));
  // Into another directory, over an empty one there, under a long name.
  const std::string long_name(230, 'D');
  ASSERT_EQ(::mkdir(p(long_name).c_str(), 0755), 0);
  ASSERT_EQ(::mkdir(p(long_name + "/target").c_str(), 0755), 0);
  ASSERT_EQ(::rename(p("b").c_str(), p(long_name + "/target").c_str()), 0) << std::strerror(errno);
  ASSERT_EQ(::rename(p(long_name).c_str(), p("b").c_str()), 0) << std::strerror(errno);  // b is gone: plain rename
  EXPECT_EQ(entries(p("b")), std::set<std::string>{"target"});
  // A file over an empty directory is EISDIR, a directory over a file ENOTDIR.
  write_file(p("file"), {'f'});
  errno = 0;
  EXPECT_EQ(::rename(p("file").c_str(), p("b/target").c_str()), -1);
  EXPECT_EQ(errno, EISDIR);
  errno = 0;
  EXPECT_EQ(::rename(p("b/target").c_str(), p("file").c_str()), -1);
  EXPECT_EQ(errno, ENOTDIR);
  expect_side_files_paired(vol_->cipher());
}

TEST_F(NamesTest, RenameExchangeWithLongNames) {
  std::string a(200, 'A');
  std::string b(210, 'B');
  write_file(p(a), {'a'});
  write_file(p(b), {'b'});
  ASSERT_EQ(::renameat2(AT_FDCWD, p(a).c_str(), AT_FDCWD, p(b).c_str(), RENAME_EXCHANGE), 0);
  EXPECT_EQ(read_file(p(a)), std::vector<std::uint8_t>{'b'});
  EXPECT_EQ(read_file(p(b)), std::vector<std::uint8_t>{'a'});
  EXPECT_EQ(entries(p("")), (std::set<std::string>{a, b}));
}

TEST_F(NamesTest, XattrNamesAndValuesAreEncrypted) {
  write_file(p("x"), {'x'});
  ASSERT_EQ(::setxattr(p("x").c_str(), "user.mime_type", "text/secret", 11, 0), 0) << std::strerror(errno);
  char buf[64] = {};
  ASSERT_EQ(::getxattr(p("x").c_str(), "user.mime_type", buf, sizeof buf), 11);
  EXPECT_EQ(std::string(buf, 11), "text/secret");
  EXPECT_EQ(::getxattr(p("x").c_str(), "user.mime_type", nullptr, 0), 11);
  char list[256] = {};
  ASSERT_GT(::listxattr(p("x").c_str(), list, sizeof list), 0);
  EXPECT_STREQ(list, "user.mime_type");
  // In the backing store neither the name nor the value is readable.
  auto r = run_command({"/usr/bin/grep", "-r", "-l", "mime_type", vol_->cipher()});
  EXPECT_NE(r.exit_code, 0);
  bool found_plain = false;
  std::vector<std::string> all;
  for (const auto& f : list_files(vol_->cipher())) {
    char names[1024] = {};
    ssize_t n = ::llistxattr(f.c_str(), names, sizeof names);
    for (ssize_t i = 0; i < n; i += static_cast<ssize_t>(std::strlen(names + i)) + 1) {
      if (std::string(names + i).find("mime") != std::string::npos) found_plain = true;
    }
  }
  EXPECT_FALSE(found_plain);
}

TEST_F(NamesTest, NamesSurviveRemount) {
  std::string long1(230, 'R');
  ASSERT_EQ(::mkdir(p("d").c_str(), 0755), 0);
  write_file(p("d/" + long1), {'r'});
  write_file(p("d/short"), {'s'});
  vol_->unmount();
  vol_->mount();
  EXPECT_EQ(entries(p("d")), (std::set<std::string>{long1, "short"}));
  EXPECT_EQ(read_file(p("d/" + long1)), std::vector<std::uint8_t>{'r'});
}

TEST(NamesOptions, PlaintextNamesAndLongNameMax) {
  TempKms kms;
  Mount plain(kms.root(), "plain", "", {"--plaintext-names"});
  plain.mount();
  write_file(plain.path("visible.txt"), {'v'});
  EXPECT_EQ(entries(plain.cipher()), (std::set<std::string>{"kmsfs.json", "visible.txt"}));
  plain.unmount();

  Mount shortnames(kms.root(), "short", "", {"--long-name-max", "63"});
  shortnames.mount();
  std::string name(60, 'n');
  write_file(shortnames.path(name), {'n'});
  for (const auto& n : entries(shortnames.cipher())) EXPECT_LE(n.size(), 63U) << n;
  EXPECT_EQ(read_file(shortnames.path(name)), std::vector<std::uint8_t>{'n'});
  shortnames.unmount();
}

}  // namespace
}  // namespace kmsfs::test
