// HSM faults: the KMS core runs on libkmsfs_pkcs11_fault.so (tests/
// pkcs11_fault/), which forwards to SoftHSM2 and injects CKR_DEVICE_ERROR,
// CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, slow calls and hangs on
// command. Each fault must give a clear error (never a crash, never key
// material or the PIN in the message), a lost session must be reopened, and
// the service must recover once the fault clears — in a short-lived kmsctl
// and in a long-lived kmsfs mount.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Clears the fault file after `limit` unless disarmed first: a missing
// timeout then fails the test's time check instead of hanging the test.
class FaultWatchdog {
 public:
  FaultWatchdog(std::string fault_file, std::chrono::seconds limit)
      : t_([this, f = std::move(fault_file), limit] {
          std::unique_lock<std::mutex> lock(mu_);
          if (!cv_.wait_for(lock, limit, [&] { return done_; })) std::ofstream(f, std::ios::trunc) << "\n";
        }) {}
  ~FaultWatchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }
  FaultWatchdog(const FaultWatchdog&) = delete;
  FaultWatchdog& operator=(const FaultWatchdog&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

class HsmFault : public ::testing::Test {
 protected:
  void SetUp() override {
    kms_ = std::make_unique<TempKms>();
    // The token, PIN and a key are made with the plain SoftHSM module first.
    auto r = run_command({bin("kmsctl"), "create-key", "--alias", "alias/fault"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ::setenv("SOFTHSM2_CONF", (kms_->home() + "/softhsm2.conf").c_str(), 1);
    fault_file_ = kms_->root() + "/fault";
    ::setenv("KMSFS_FAULT_FILE", fault_file_.c_str(), 1);
    set_fault("");
    pin_ = slurp(kms_->home() + "/pin");
    while (!pin_.empty() && (pin_.back() == '\n' || pin_.back() == '\r')) pin_.pop_back();
    ASSERT_FALSE(pin_.empty());
  }
  void TearDown() override {
    ::unsetenv("SOFTHSM2_CONF");
    ::unsetenv("KMSFS_FAULT_FILE");
    kms_.reset();
  }
  void set_fault(const std::string& cmd) {
    ::unlink((fault_file_ + ".used").c_str());
    std::ofstream(fault_file_, std::ios::trunc) << cmd << "\n";
  }
  CommandResult kmsctl(std::vector<std::string> args) {
    std::vector<std::string> argv{bin("kmsctl"), "--pkcs11-module", KMSFS_FAULT_MODULE};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv);
  }
  CommandResult gdk() {
    return kmsctl({"generate-data-key", "--key-id", "alias/fault", "--key-spec", "AES_256"});
  }
  void expect_no_secrets(const std::string& text, const std::string& what) {
    EXPECT_EQ(text.find(pin_), std::string::npos) << what << " contains the PIN";
    EXPECT_EQ(text.find("\"Plaintext\""), std::string::npos) << what << " contains a plaintext key";
  }

  std::unique_ptr<TempKms> kms_;
  std::string fault_file_;
  std::string pin_;
};

TEST_F(HsmFault, KmsctlWorksThroughTheFaultModuleWhenNoFault) {
  auto r = gdk();
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("CiphertextBlob"), std::string::npos);
}

TEST_F(HsmFault, EachFaultIsAClearErrorAndClears) {
  for (const char* rv : {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID", "CKR_DEVICE_REMOVED"}) {
    SCOPED_TRACE(rv);
    // Every wrap fails: the session is reopened once, then the error stands.
    set_fault(std::string("error ") + rv + " -1 C_Encrypt,C_GenerateRandom");
    auto r = gdk();
    EXPECT_TRUE(r.exit_code == 3 || r.exit_code == 4) << "exit " << r.exit_code << "\n" << r.err;
    EXPECT_NE(r.err.find(rv), std::string::npos) << "the error names the PKCS#11 return value: " << r.err;
    expect_no_secrets(r.out + r.err, "the error");
    // At start-up: the module cannot even open a session.
    set_fault(std::string("error ") + rv + " -1 C_OpenSession");
    r = gdk();
    EXPECT_EQ(r.exit_code, 4) << r.err;
    EXPECT_NE(r.err.find("HSM"), std::string::npos) << "the error names the HSM: " << r.err;
    expect_no_secrets(r.out + r.err, "the start-up error");
    set_fault("");
    r = gdk();
    EXPECT_EQ(r.exit_code, 0) << "after the fault cleared: " << r.err;
  }
}

TEST_F(HsmFault, HangingHsmTimesOutWithAClearErrorAndRecovers) {
  ::setenv("KMSFS_HSM_TIMEOUT_MS", "1000", 1);
  // The wrap hangs while the process serves: the call fails after the
  // deadline, naming it, instead of waiting for the HSM forever.
  set_fault("hang C_Encrypt");
  auto t0 = std::chrono::steady_clock::now();
  auto r = [&] {
    FaultWatchdog dog(fault_file_, std::chrono::seconds(30));
    return gdk();
  }();
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(r.exit_code == 3 || r.exit_code == 4) << "exit " << r.exit_code << "\n" << r.err;
  EXPECT_NE(r.err.find("did not answer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1000 ms"), std::string::npos) << r.err;
  EXPECT_GE(took, std::chrono::milliseconds(1000));
  EXPECT_LT(took, std::chrono::seconds(30));
  expect_no_secrets(r.out + r.err, "the timeout error");
  // At start-up: opening a session hangs.
  set_fault("hang C_OpenSession");
  t0 = std::chrono::steady_clock::now();
  r = [&] {
    FaultWatchdog dog(fault_file_, std::chrono::seconds(30));
    return gdk();
  }();
  took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("while opening"), std::string::npos) << r.err;
  EXPECT_LT(took, std::chrono::seconds(30));
  set_fault("");
  r = gdk();
  EXPECT_EQ(r.exit_code, 0) << "after the hang cleared: " << r.err;
  ::unsetenv("KMSFS_HSM_TIMEOUT_MS");
}

TEST_F(HsmFault, LostSessionIsReopened) {
  // One call fails as if the session had gone: the core reopens a session
  // and the request succeeds.
  for (const char* rv : {"CKR_SESSION_HANDLE_INVALID", "CKR_DEVICE_REMOVED"}) {
    SCOPED_TRACE(rv);
    set_fault(std::string("error ") + rv + " 1 C_Encrypt");
    auto r = gdk();
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(slurp(fault_file_ + ".used"), "1") << "the fault never fired: nothing was reopened";
  }
}

// A long-lived process: kmsfs serving a mount with the data-key cache off,
// so that every new file and every cold open reaches the HSM.
TEST_F(HsmFault, MountSurvivesFaultsAndRecovers) {
  const std::string cipher = kms_->root() + "/v.cipher";
  const std::string mnt = kms_->root() + "/v.mnt";
  const std::string log = kms_->root() + "/kmsfs.log";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  auto init = run_command({bin("kmsfs"), "init", cipher, "--key", "alias/fault"});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  ::setenv("KMSFS_LOG_LEVEL", "debug", 1);
  ::setenv("KMSFS_HSM_TIMEOUT_MS", "2000", 1);
  ForegroundMount m(cipher, mnt, {"--pkcs11-module", KMSFS_FAULT_MODULE, "-o", "key_cache=off"}, log);
  ASSERT_NO_THROW(m.start());
  ::unsetenv("KMSFS_LOG_LEVEL");
  ::unsetenv("KMSFS_HSM_TIMEOUT_MS");

  auto data = random_bytes(50000, 1);
  write_file(mnt + "/before", data);
  int open_fd = ::open((mnt + "/before").c_str(), O_RDONLY);
  ASSERT_GE(open_fd, 0);

  auto try_create = [&](const std::string& name) -> int {
    int fd = ::open((mnt + "/" + name).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return errno;
    int err = 0;
    if (::pwrite(fd, "hello", 5, 0) != 5 || ::fsync(fd) != 0) err = errno;
    ::close(fd);
    return err;
  };

  for (const char* rv : {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID", "CKR_DEVICE_REMOVED"}) {
    SCOPED_TRACE(rv);
    set_fault(std::string("error ") + rv + " -1 C_Encrypt,C_Decrypt,C_GenerateRandom");
    const int err = try_create(std::string("during-") + rv);
    EXPECT_TRUE(err == EIO || err == EACCES) << "a new file while the HSM fails: " << std::strerror(err);
    struct stat st {};
    EXPECT_NE(::lstat((mnt + "/during-" + rv).c_str(), &st), 0) << "the failed create left a file";
    // An open file keeps working: its data key is held.
    std::vector<std::uint8_t> back(data.size());
    EXPECT_EQ(::pread(open_fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
    EXPECT_EQ(back, data);
    set_fault("");
    EXPECT_EQ(try_create(std::string("after-") + rv), 0) << "after the fault cleared";
    EXPECT_TRUE(m.running());
  }

  // One lost session: reopened, the create succeeds.
  set_fault("error CKR_SESSION_HANDLE_INVALID 1 C_Encrypt");
  EXPECT_EQ(try_create("reopened"), 0);
  EXPECT_EQ(slurp(fault_file_ + ".used"), "1") << "the fault never fired: nothing was reopened";

  // A slow HSM: slower, not failing.
  set_fault("delay 300");
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(try_create("slow"), 0);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(300));

  // A hanging HSM: the create fails after the HSM deadline (2 s here) with
  // EIO instead of waiting for the HSM; the open file keeps serving
  // meanwhile; once the HSM answers again, creates work.
  set_fault("hang");
  std::atomic<int> hung_result{-1};
  auto h0 = std::chrono::steady_clock::now();
  FaultWatchdog dog(fault_file_, std::chrono::seconds(30));
  std::thread creator([&] { hung_result = try_create("hung"); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(hung_result.load(), -1) << "the create should wait for the HSM up to its deadline";
  {
    std::vector<std::uint8_t> back(data.size());
    auto r0 = std::chrono::steady_clock::now();
    EXPECT_EQ(::pread(open_fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
    EXPECT_LT(std::chrono::steady_clock::now() - r0, std::chrono::seconds(2));
  }
  creator.join();
  EXPECT_EQ(hung_result.load(), EIO) << std::strerror(hung_result.load());
  EXPECT_LT(std::chrono::steady_clock::now() - h0, std::chrono::seconds(30)) << "the hang was not cut short";
  {
    struct stat st {};
    EXPECT_NE(::lstat((mnt + "/hung").c_str(), &st), 0) << "the timed-out create left a file";
  }
  EXPECT_TRUE(m.running());
  set_fault("");
  EXPECT_EQ(try_create("after-hang"), 0);
  ::close(open_fd);

  // Everything written reads back after a remount without faults.
  {
    const int stopped = m.stop();
    const std::string text = slurp(log);
    EXPECT_EQ(stopped, 0) << "the server's log ends:\n" << text.substr(text.size() > 6000 ? text.size() - 6000 : 0);
  }
  ASSERT_NO_THROW(m.start());
  EXPECT_EQ(read_file(mnt + "/before"), data);
  for (const char* name : {"after-CKR_DEVICE_ERROR", "reopened", "slow", "after-hang"}) {
    auto b = read_file(mnt + "/" + name);
    EXPECT_EQ(std::string(b.begin(), b.end()), "hello") << name;
  }
  EXPECT_EQ(m.stop(), 0);
  // The server's log (debug level) names the failures but holds no PIN.
  const std::string text = slurp(log);
  EXPECT_EQ(text.find(pin_), std::string::npos) << "the kmsfs log contains the PIN";
  EXPECT_NE(text.find("did not return within 2000 ms"), std::string::npos) << "the log does not name the timeout";
}

}  // namespace
}  // namespace kmsfs::test
