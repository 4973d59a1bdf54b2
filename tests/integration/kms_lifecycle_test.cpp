// The KMS lifecycle end to end (#3): crypto-shredding of a mounted volume,
// key policies refusing another uid (kmsctl under setpriv), and metadata
// that stays consistent when kmsctl is killed mid-operation.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::string json_field(const std::string& json_text, const std::string& field) {
  // A small extractor for "Field": "value" in kmsctl's pretty JSON.
  const std::string key = "\"" + field + "\": \"";
  auto p = json_text.find(key);
  if (p == std::string::npos) return "";
  p += key.size();
  return json_text.substr(p, json_text.find('"', p) - p);
}

CommandResult kmsctl(const std::vector<std::string>& args) {
  std::vector<std::string> argv{bin("kmsctl")};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv);
}

class ClockOffset {
 public:
  explicit ClockOffset(double seconds) { ::setenv("KMSFS_TEST_CLOCK_OFFSET", std::to_string(seconds).c_str(), 1); }
  ~ClockOffset() { ::unsetenv("KMSFS_TEST_CLOCK_OFFSET"); }
};

TEST(KmsLifecycle, CryptoShreddingMakesAMountedFileUnreadable) {
  TempKms kms;
  auto c = kmsctl({"create-key", "--description", "shred me", "--alias", "alias/shred"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  const std::string key_id = json_field(c.out, "KeyId");
  Mount m(kms.root(), "shred", "alias/shred");
  m.mount({"-o", "key_cache=off"});
  write_file(m.path("secret.txt"), std::vector<std::uint8_t>{'t', 'o', 'p', ' ', 's', 'e', 'c', 'r', 'e', 't'});
  ASSERT_EQ(read_file(m.path("secret.txt")).size(), 10u);

  auto s = kmsctl({"schedule-key-deletion", "--key-id", "alias/shred", "--pending-window-in-days", "7"});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_EQ(json_field(s.out, "KeyState"), "PendingDeletion");
  {
    ClockOffset six_days(6 * 86400.0);
    auto d = kmsctl({"describe-key", "--key-id", key_id});  // a core start processes what is due
    ASSERT_EQ(d.exit_code, 0) << d.err;
    EXPECT_EQ(json_field(d.out, "KeyState"), "PendingDeletion");
  }
  {
    ClockOffset eight_days(8 * 86400.0);
    auto l = kmsctl({"list-keys"});
    ASSERT_EQ(l.exit_code, 0) << l.err;
    EXPECT_EQ(l.out.find(key_id), std::string::npos) << "the key was not deleted";
  }
  auto gone = kmsctl({"describe-key", "--key-id", key_id});
  EXPECT_EQ(gone.exit_code, 3);
  EXPECT_NE(gone.err.find("NotFoundException"), std::string::npos) << gone.err;

  // A fresh open through the live mount cannot unwrap the data key.
  int fd = ::open(m.path("secret.txt").c_str(), O_RDONLY);
  if (fd >= 0) {
    char buf[16];
    ssize_t n = ::read(fd, buf, sizeof buf);
    const int e = errno;
    ::close(fd);
    EXPECT_LT(n, 0) << "read a crypto-shredded file";
    EXPECT_TRUE(e == EIO || e == EACCES) << std::strerror(e);
  } else {
    EXPECT_TRUE(errno == EIO || errno == EACCES) << std::strerror(errno);
  }
  m.unmount();
  // And after a remount: the volume's key is gone, nothing opens it again.
  auto again = run_command({bin("kmsfs"), "mount", m.cipher(), m.mnt()});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_FALSE(is_mountpoint(m.mnt()));
  // The audit trail recorded the deletion by the core itself.
  auto a = kmsctl({"audit", "search", "--event-name", "DeleteKey"});
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_NE(a.out.find(key_id), std::string::npos);
  auto v = kmsctl({"audit", "verify"});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
}

TEST(KmsLifecycle, PolicyRefusesAnotherUidRunningKmsctl) {
  if (auto why = cannot_run_as_nobody({bin("kmsctl"), "--help"}); !why.empty()) GTEST_SKIP() << why;
  TempKms kms;
  // Root and uid 65534 may describe the key; only root may use it.
  const std::string policy =
      R"({"Version":"2012-10-17","Statement":[)"
      R"({"Sid":"admin","Effect":"Allow","Principal":{"Local":"uid:0"},"Action":"kms:*","Resource":"*"},)"
      R"({"Sid":"read","Effect":"Allow","Principal":{"Local":["uid:65534"]},"Action":"kms:Describe*","Resource":"*"}]})";
  auto c = kmsctl({"create-key", "--alias", "alias/guarded", "--policy", policy});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  // Hand the state dir to uid 65534 (embedded mode refuses a home owned by
  // someone else); root keeps its rights through the key policy.
  ASSERT_EQ(::chmod(kms.root().c_str(), 0755), 0);
  for (const auto& e : std::filesystem::recursive_directory_iterator(kms.home())) {
    ASSERT_EQ(::lchown(e.path().c_str(), 65534, 65534), 0) << e.path();
  }
  ASSERT_EQ(::chown(kms.home().c_str(), 65534, 65534), 0);
  auto as_nobody = [&](std::vector<std::string> args) {
    std::vector<std::string> argv{"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                  bin("kmsctl")};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv);
  };
  auto d = as_nobody({"describe-key", "--key-id", "alias/guarded"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  auto e = as_nobody({"encrypt", "--key-id", "alias/guarded", "--plaintext", "aGVsbG8="});
  EXPECT_EQ(e.exit_code, 3) << e.out;
  EXPECT_NE(e.err.find("AccessDeniedException: User: uid:65534"), std::string::npos) << e.err;
  auto dis = as_nobody({"disable-key", "--key-id", "alias/guarded"});
  EXPECT_EQ(dis.exit_code, 3);
  EXPECT_NE(dis.err.find("AccessDeniedException"), std::string::npos) << dis.err;
  auto audit = as_nobody({"audit", "search", "--event-name", "Encrypt"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;  // the state dir's owner reads the trail
  EXPECT_NE(audit.out.find("\"uid\": 65534"), std::string::npos);
  EXPECT_NE(audit.out.find("AccessDeniedException"), std::string::npos);
}

TEST(KmsLifecycle, KillingKmsctlMidOperationLeavesConsistentMetadata) {
  TempKms kms;
  auto first = kmsctl({"create-key", "--alias", "alias/base"});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  std::mt19937 rng(1234);
  const std::vector<std::vector<std::string>> ops = {
      {"create-key", "--alias", "alias/k"},
      {"rotate-key-on-demand", "--key-id", "alias/base"},
      {"tag-resource", "--key-id", "alias/base", "--tags", "t=v"},
      {"create-grant", "--key-id", "alias/base", "--grantee-principal", "uid:1000", "--operations", "Decrypt"},
      {"generate-data-key", "--key-id", "alias/base"},
      {"update-key-description", "--key-id", "alias/base", "--description", "d"},
  };
  int killed = 0;
  for (int i = 0; i < 60; ++i) {
    auto args = ops[static_cast<std::size_t>(i) % ops.size()];
    if (args[0] == "create-key") args[2] += std::to_string(i);
    std::vector<std::string> argv{bin("kmsctl")};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_t pid = ::fork();
    if (pid == 0) {
      int devnull = ::open("/dev/null", O_WRONLY);
      ::dup2(devnull, 1);
      ::dup2(devnull, 2);
      std::vector<char*> cargv;
      for (auto& a : argv) cargv.push_back(a.data());
      cargv.push_back(nullptr);
      ::execv(cargv[0], cargv.data());
      ::_exit(127);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 60000));
    if (::kill(pid, SIGKILL) == 0) ++killed;
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  EXPECT_GT(killed, 0);
  // Every record parses and is complete; every alias names a key.
  std::set<std::string> keys;
  for (const auto& e : std::filesystem::directory_iterator(kms.home() + "/keys")) {
    const std::string name = e.path().filename();
    if (name.size() != 41 || name.substr(36) != ".json") continue;  // temp files of killed writers
    auto d = kmsctl({"describe-key", "--key-id", name.substr(0, 36)});
    ASSERT_EQ(d.exit_code, 0) << name << ": " << d.err;
    keys.insert(name.substr(0, 36));
  }
  auto aliases = kmsctl({"list-aliases"});
  ASSERT_EQ(aliases.exit_code, 0) << aliases.err;
  std::istringstream in(aliases.out);
  for (std::string line; std::getline(in, line);) {
    auto p = line.find("\"TargetKeyId\": \"");
    if (p == std::string::npos) continue;
    const std::string target = line.substr(p + 16, 36);
    EXPECT_TRUE(keys.count(target) != 0 || line.find("kmsfs/default") != std::string::npos) << "dangling alias to " << target;
  }
  // The key still works. (A kill inside C_Login used to cut SoftHSM2's
  // token.object short and lose the whole token; kmsfs now restores it
  // from its copy: see restore_softhsm_token_objects.)
  auto g = kmsctl({"generate-data-key", "--key-id", "alias/base"});
  EXPECT_EQ(g.exit_code, 0) << g.err;
  auto v = kmsctl({"audit", "verify"});
  EXPECT_EQ(v.exit_code, 0) << v.out << v.err;
  // One token, never a second one made over a damaged first.
  int tokens = 0;
  for (const auto& e : std::filesystem::directory_iterator(kms.home() + "/tokens")) tokens += e.is_directory();
  EXPECT_EQ(tokens, 1);
}

std::string only_token_dir(const std::string& home) {
  std::string dir;
  for (const auto& e : std::filesystem::directory_iterator(home + "/tokens")) {
    if (e.is_directory()) {
      EXPECT_TRUE(dir.empty()) << "a second token directory: " << e.path();
      dir = e.path();
    }
  }
  return dir;
}

// SoftHSM2 truncates and rewrites token.object at every C_Login; a kill in
// between used to lose the whole token. A cut-short token.object is
// restored from kmsfs's copy, and every key keeps working.
TEST(KmsLifecycle, TokenObjectCutShortByAKillIsRestored) {
  TempKms kms;
  auto c = kmsctl({"create-key", "--alias", "alias/t"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  auto g = kmsctl({"encrypt", "--key-id", "alias/t", "--plaintext", "aGVsbG8="});
  ASSERT_EQ(g.exit_code, 0) << g.err;
  const std::string blob = json_field(g.out, "CiphertextBlob");
  ASSERT_FALSE(blob.empty()) << g.out;
  const std::string dir = only_token_dir(kms.home());
  ASSERT_FALSE(dir.empty());
  ASSERT_TRUE(std::filesystem::exists(dir + "/token.object.kmsfs-backup"));
  for (std::uintmax_t cut : {std::uintmax_t{0}, std::uintmax_t{100}}) {
    std::filesystem::resize_file(dir + "/token.object", cut);
    auto d = kmsctl({"decrypt", "--ciphertext-blob", blob});
    EXPECT_EQ(d.exit_code, 0) << "cut to " << cut << ": " << d.err;
    EXPECT_NE(d.err.find("token.object from its backup"), std::string::npos) << d.err;
    EXPECT_NE(d.out.find("aGVsbG8="), std::string::npos) << d.out;
  }
  EXPECT_EQ(only_token_dir(kms.home()), dir);
}

// Without the copy, a home that holds keys is never given a new, empty
// token (which would orphan every key): the error says so.
TEST(KmsLifecycle, HomeWithKeysIsNeverGivenANewToken) {
  TempKms kms;
  auto c = kmsctl({"create-key", "--alias", "alias/t"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  const std::string dir = only_token_dir(kms.home());
  ASSERT_FALSE(dir.empty());
  std::filesystem::remove(dir + "/token.object.kmsfs-backup");
  std::filesystem::resize_file(dir + "/token.object", 0);
  auto l = kmsctl({"generate-data-key", "--key-id", "alias/t"});
  EXPECT_NE(l.exit_code, 0);
  EXPECT_NE(l.err.find("no new token is created"), std::string::npos) << l.err;
  EXPECT_EQ(only_token_dir(kms.home()), dir);
}

}  // namespace
}  // namespace kmsfs::test
