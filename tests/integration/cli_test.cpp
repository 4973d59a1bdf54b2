// The command-line contract: help, exit codes, clear errors.

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { kms_ = new TempKms(); }
  static void TearDownTestSuite() {
    delete kms_;
    kms_ = nullptr;
  }
  static TempKms* kms_;
};
TempKms* CliTest::kms_ = nullptr;

TEST_F(CliTest, HelpForEveryCommandExitsZero) {
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"init", "--help"}, {"mount", "--help"}, {"umount", "--help"}, {"info", "--help"}}) {
    std::vector<std::string> argv{bin("kmsfs")};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = run_command(argv);
    EXPECT_EQ(r.exit_code, 0) << args[0] << ": " << r.err;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << args[0];
  }
  auto r = run_command({bin("kmsctl"), "--help"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("create-key"), std::string::npos);
}

TEST_F(CliTest, UnknownCommandIsAUsageError) {
  auto r = run_command({bin("kmsfs"), "frobnicate"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("frobnicate"), std::string::npos);
  r = run_command({bin("kmsctl"), "frobnicate"});
  EXPECT_EQ(r.exit_code, 2);
}

TEST_F(CliTest, MountOfNonVolumeNamesTheProblem) {
  std::string dir = kms_->root() + "/not-a-volume";
  ::mkdir(dir.c_str(), 0700);
  std::string mnt = kms_->root() + "/mnt-nv";
  ::mkdir(mnt.c_str(), 0700);
  auto r = run_command({bin("kmsfs"), "mount", dir, mnt});
  EXPECT_EQ(r.exit_code, 5);
  EXPECT_NE(r.err.find("kmsfs.json"), std::string::npos) << r.err;
  EXPECT_FALSE(is_mountpoint(mnt));
}

TEST_F(CliTest, UnknownMountOptionIsRejected) {
  Mount vol(kms_->root(), "opts");
  auto r = run_command({bin("kmsfs"), "mount", vol.cipher(), vol.mnt(), "-o", "bogus_option"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("bogus_option"), std::string::npos) << r.err;
}

TEST_F(CliTest, InitRefusesNonEmptyDirectory) {
  std::string dir = kms_->root() + "/full";
  ::mkdir(dir.c_str(), 0700);
  write_file(dir + "/existing", {'x'});
  auto r = run_command({bin("kmsfs"), "init", dir});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("not empty"), std::string::npos) << r.err;
}

TEST_F(CliTest, MountWithMissingKeyFailsAtOnce) {
  Mount vol(kms_->root(), "nokey");
  // Point the volume at a key that does not exist.
  std::string cfg_path = vol.cipher() + "/kmsfs.json";
  auto cfg = read_file(cfg_path);
  std::string text(cfg.begin(), cfg.end());
  auto pos = text.find("key/");
  ASSERT_NE(pos, std::string::npos);
  text.replace(pos + 4, 36, "00000000-0000-4000-8000-000000000000");
  write_file(cfg_path, std::vector<std::uint8_t>(text.begin(), text.end()));
  auto r = run_command({bin("kmsfs"), "mount", vol.cipher(), vol.mnt()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("NotFoundException"), std::string::npos) << r.err;
  EXPECT_FALSE(is_mountpoint(vol.mnt()));
}

TEST_F(CliTest, InfoShowsVolumeAndKeyState) {
  Mount vol(kms_->root(), "info");
  auto r = run_command({bin("kmsfs"), "info", vol.cipher()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"FilesystemId\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"KeyState\": \"Enabled\""), std::string::npos) << r.out;
}

TEST_F(CliTest, KmsctlCreatesAndDescribesKeys) {
  auto r = run_command({bin("kmsctl"), "create-key", "--alias", "alias/cli-test", "--description", "cli test"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"KeyMetadata\""), std::string::npos) << r.out;
  r = run_command({bin("kmsctl"), "describe-key", "--key-id", "alias/cli-test"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"Description\": \"cli test\""), std::string::npos) << r.out;
  r = run_command({bin("kmsctl"), "list-keys"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"Keys\""), std::string::npos);
  r = run_command({bin("kmsctl"), "describe-key", "--key-id", "alias/does-not-exist"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_NE(r.err.find("NotFoundException"), std::string::npos) << r.err;
}

TEST_F(CliTest, VolumeOnCustomerKeyMounts) {
  auto r = run_command({bin("kmsctl"), "create-key", "--alias", "alias/vol-key"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Mount vol(kms_->root(), "custkey", "alias/vol-key");
  vol.mount();
  write_file(vol.path("f"), {'o', 'k'});
  EXPECT_EQ(read_file(vol.path("f")), (std::vector<std::uint8_t>{'o', 'k'}));
  vol.unmount();
}

// kmsfs keeps a descriptor per inode the kernel remembers: started with a
// soft limit of 256 (hard limit unchanged), it raises it, and a directory of
// 600 files the kernel keeps in its cache works.
TEST_F(CliTest, MountRaisesItsOpenFileLimit) {
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  if (saved.rlim_max < 2048) GTEST_SKIP() << "hard descriptor limit " << saved.rlim_max << " too low to show it";
  Mount m(kms_->root(), "fdlimit");
  struct rlimit low = saved;
  low.rlim_cur = 256;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  try {
    m.mount();  // inherits the soft limit of 256
  } catch (...) {
    (void)::setrlimit(RLIMIT_NOFILE, &saved);
    throw;
  }
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_EQ(::mkdir(m.path("d").c_str(), 0755), 0);
  for (int i = 0; i < 600; ++i) {
    const std::string f = m.path("d/f" + std::to_string(i));
    int fd = ::open(f.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    ASSERT_GE(fd, 0) << f << ": " << std::strerror(errno);
    ::close(fd);
  }
  for (int i = 0; i < 600; ++i) {
    struct stat st {};
    ASSERT_EQ(::stat(m.path("d/f" + std::to_string(i)).c_str(), &st), 0) << i << ": " << std::strerror(errno);
  }
  m.unmount();
}

TEST_F(CliTest, PinFileReadableByOthersIsRefused) {
  // First use creates the PIN file 0600.
  auto r = run_command({bin("kmsctl"), "list-keys"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string pin = kms_->home() + "/pin";
  struct stat st {};
  ASSERT_EQ(::stat(pin.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600U);
  ASSERT_EQ(::chmod(pin.c_str(), 0644), 0);
  r = run_command({bin("kmsctl"), "list-keys"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("pin"), std::string::npos) << r.err;
  ASSERT_EQ(::chmod(pin.c_str(), 0600), 0);
}

}  // namespace
}  // namespace kmsfs::test
