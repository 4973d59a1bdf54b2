// kmsfs fsck finds each kind of injected damage, names it, and --repair
// quarantines the damaged objects without touching the healthy ones.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::string encrypt_path(const Mount& vol, const std::string& plain) {
  auto r = run_command({bin("kmsfs"), "encrypt-path", vol.cipher(), plain});
  if (r.exit_code != 0) throw std::runtime_error("encrypt-path " + plain + ": " + r.err);
  std::string out = r.out;
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return vol.cipher() + "/" + out;
}

void flip_byte(const std::string& path, long offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << path;
  f.seekg(offset);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x20);
  f.seekp(offset);
  f.write(&c, 1);
}

TEST(Fsck, CleanVolumeIsSound) {
  TempKms kms;
  Mount vol(kms.root(), "clean");
  vol.mount();
  ASSERT_EQ(::mkdir(vol.path("d").c_str(), 0755), 0);
  write_file(vol.path("d/" + std::string(240, 'x')), random_bytes(10000, 1));
  write_file(vol.path("a"), random_bytes(100000, 2));
  ASSERT_EQ(::symlink("target", vol.path("l").c_str()), 0);
  vol.unmount();
  auto r = run_command({bin("kmsfs"), "fsck", vol.cipher()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("sound"), std::string::npos) << r.out;
}

TEST(Fsck, FindsEachKindOfDamageAndRepairQuarantinesOnlyThose) {
  TempKms kms;
  Mount vol(kms.root(), "damaged");
  vol.mount();
  ASSERT_EQ(::mkdir(vol.path("dir").c_str(), 0755), 0);
  const std::string long_name(230, 'L');
  std::map<std::string, std::vector<std::uint8_t>> healthy = {
      {"healthy1", random_bytes(50000, 10)},
      {"dir/healthy2", random_bytes(4096, 11)},
      {"dir/" + std::string(200, 'H'), random_bytes(777, 12)},
  };
  for (const auto& [name, data] : healthy) write_file(vol.path(name), data);
  for (const char* name : {"bad-block", "bad-header", "bad-name", "truncated"}) {
    write_file(vol.path(std::string("dir/") + name), random_bytes(20000, 13));
  }
  write_file(vol.path("dir/" + long_name), random_bytes(3000, 14));
  vol.unmount();

  const std::string bad_block = encrypt_path(vol, "dir/bad-block");
  const std::string bad_header = encrypt_path(vol, "dir/bad-header");
  const std::string bad_name = encrypt_path(vol, "dir/bad-name");
  const std::string truncated = encrypt_path(vol, "dir/truncated");
  const std::string long_entry = encrypt_path(vol, "dir/" + long_name);
  const std::string backing_dir = encrypt_path(vol, "dir");

  flip_byte(bad_block, 128 + 4124 + 500);  // block 1's ciphertext
  flip_byte(bad_header, 50);               // inside the wrapped data key
  {                                        // a damaged encrypted name
    std::string base = bad_name.substr(bad_name.rfind('/') + 1);
    std::string mangled = base;
    mangled[5] = mangled[5] == 'A' ? 'B' : 'A';
    ASSERT_EQ(::rename(bad_name.c_str(), (backing_dir + "/" + mangled).c_str()), 0);
  }
  ASSERT_EQ(::truncate(truncated.c_str(), 128 + 4124 + 10), 0);  // a 10-byte fragment
  ASSERT_EQ(::unlink((long_entry + ".name").c_str()), 0);        // missing side file
  write_file(backing_dir + "/kmsfs.longname.orphanorphanorphanorphanorphanorphanorphanor.name", {'x'});

  auto r = run_command({bin("kmsfs"), "fsck", vol.cipher()});
  EXPECT_EQ(r.exit_code, 6) << r.out << r.err;
  for (const char* kind : {"corrupt block", "data key does not unwrap", "unreadable name", "truncated block",
                           "side file is missing", "orphan long-name side file"}) {
    EXPECT_NE(r.out.find(kind), std::string::npos) << kind << "\n" << r.out;
  }
  EXPECT_NE(r.out.find("dir/bad-block"), std::string::npos) << "plaintext path named\n" << r.out;

  r = run_command({bin("kmsfs"), "fsck", "--repair", vol.cipher()});
  EXPECT_EQ(r.exit_code, 7) << r.out << r.err;
  struct stat st {};
  EXPECT_EQ(::stat((vol.cipher() + "/kmsfs.quarantine/index.jsonl").c_str(), &st), 0);

  r = run_command({bin("kmsfs"), "fsck", vol.cipher()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;

  vol.mount();
  for (const auto& [name, data] : healthy) EXPECT_EQ(read_file(vol.path(name)), data) << name;
  EXPECT_NE(::access(vol.path("dir/bad-block").c_str(), F_OK), 0);
  vol.unmount();
}

// The side file of a quarantined long-name file goes with it: the repair
// must not then report it as an orphan it could not remove (seen after a
// kill -9 in the crash test).
TEST(Fsck, RepairQuarantinesALongNamedFileWithItsSideFile) {
  TempKms kms;
  Mount vol(kms.root(), "longbad");
  vol.mount();
  const std::string long_name(220, 'q');
  write_file(vol.path(long_name), random_bytes(20000, 21));
  write_file(vol.path("ok"), random_bytes(5000, 22));
  vol.unmount();
  const std::string entry = encrypt_path(vol, long_name);
  flip_byte(entry, 128 + 4124 + 700);  // block 1's ciphertext

  auto r = run_command({bin("kmsfs"), "fsck", "--repair", vol.cipher()});
  EXPECT_EQ(r.exit_code, 7) << r.out << r.err;
  EXPECT_EQ(r.out.find("DAMAGED"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("orphan"), std::string::npos) << r.out;
  struct stat st {};
  EXPECT_NE(::stat(entry.c_str(), &st), 0);
  EXPECT_NE(::stat((entry + ".name").c_str(), &st), 0);
  int side_files = 0;
  for (const auto& e : std::filesystem::directory_iterator(vol.cipher() + "/kmsfs.quarantine")) {
    if (e.path().extension() == ".name") side_files++;
  }
  EXPECT_EQ(side_files, 1);

  r = run_command({bin("kmsfs"), "fsck", vol.cipher()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  vol.mount();
  EXPECT_EQ(read_file(vol.path("ok")), random_bytes(5000, 22));
  vol.unmount();
}

TEST(MountModes, ReadOnlyRejectsWrites) {
  TempKms kms;
  Mount vol(kms.root(), "ro");
  vol.mount();
  write_file(vol.path("f"), {'r', 'o'});
  vol.unmount();
  vol.mount({"-o", "ro"});
  EXPECT_EQ(read_file(vol.path("f")), (std::vector<std::uint8_t>{'r', 'o'}));
  EXPECT_EQ(::open(vol.path("f").c_str(), O_WRONLY), -1);
  EXPECT_EQ(errno, EROFS);
  EXPECT_EQ(::mkdir(vol.path("d").c_str(), 0755), -1);
  EXPECT_EQ(errno, EROFS);
  EXPECT_EQ(::unlink(vol.path("f").c_str()), -1);
  EXPECT_EQ(errno, EROFS);
  vol.unmount();
}

TEST(MountModes, IdleTimeoutUnmountsOnlyWhenUnused) {
  TempKms kms;
  Mount vol(kms.root(), "idle");
  vol.mount({"-o", "idle_timeout=1"});
  {
    int fd = ::open(vol.path("held").c_str(), O_RDWR | O_CREAT, 0644);
    ASSERT_GE(fd, 0);
    std::this_thread::sleep_for(std::chrono::seconds(3));
    EXPECT_TRUE(is_mountpoint(vol.mnt())) << "unmounted while a file was open";
    ::close(fd);
  }
  bool gone = false;
  for (int i = 0; i < 60 && !gone; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    gone = !is_mountpoint(vol.mnt());
  }
  EXPECT_TRUE(gone) << "still mounted after the idle timeout";
  if (gone) vol.forget_mounted();
}

TEST(MountModes, SharedStorageSeesChangesMadeByAnotherMount) {
  TempKms kms;
  Mount a(kms.root(), "shared");
  a.mount({"-o", "shared_storage"});
  const std::string mnt2 = kms.root() + "/shared.mnt2";
  ASSERT_EQ(::mkdir(mnt2.c_str(), 0755), 0);
  auto r = run_command({bin("kmsfs"), "mount", a.cipher(), mnt2, "-o", "shared_storage"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  write_file(a.path("f"), {'1'});
  EXPECT_EQ(read_file(mnt2 + "/f"), std::vector<std::uint8_t>{'1'});
  write_file(mnt2 + "/f", {'2', '2'});
  EXPECT_EQ(read_file(a.path("f")), (std::vector<std::uint8_t>{'2', '2'}));
  r = run_command({bin("kmsfs"), "umount", mnt2});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  a.unmount();
}

}  // namespace
}  // namespace kmsfs::test
