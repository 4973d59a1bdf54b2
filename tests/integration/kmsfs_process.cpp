#include "tests/integration/kmsfs_process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "tests/integration/mount_fixture.h"

extern char** environ;

namespace kmsfs::test {

namespace {

// waitpid with a deadline; returns the wait status or -1 on timeout.
int wait_for(pid_t pid, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return 0;  // not our child any more
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

int exit_code_of(int status) {
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

ForegroundMount::ForegroundMount(std::string cipher, std::string mnt,
                                 std::vector<std::string> mount_args, std::string log_path)
    : cipher_(std::move(cipher)),
      mnt_(std::move(mnt)),
      args_(std::move(mount_args)),
      log_path_(std::move(log_path)) {}

ForegroundMount::~ForegroundMount() {
  if (pid_ <= 0) return;
  try {
    if (stop(30) != 0) {
      // Logged by the caller's test through the exit status if it cares.
    }
  } catch (...) {
  }
}

void ForegroundMount::start() {
  if (pid_ > 0) throw std::runtime_error("ForegroundMount::start: already running");
  std::vector<std::string> argv{bin("kmsfs"), "mount", "-f", cipher_, mnt_};
  argv.insert(argv.end(), args_.begin(), args_.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  const std::string log = log_path_.empty() ? "/dev/null" : log_path_;
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot run kmsfs: " + std::string(std::strerror(rc)));

  // Up when the kernel mount exists (ASan builds start slowly).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!is_mountpoint(mnt_)) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      throw std::runtime_error("kmsfs mount -f " + cipher_ + " exited with " +
                               std::to_string(exit_code_of(status)) + " before mounting (log: " +
                               log + ")");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
      throw std::runtime_error("kmsfs mount -f " + cipher_ + " did not mount within 60 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_ = pid;
}

int ForegroundMount::stop(int timeout_s) {
  if (pid_ <= 0) return 0;
  // EBUSY while the kernel still holds a reference (a just-closed file):
  // retry briefly, then fall back to a lazy detach.
  bool unmounted = false;
  for (int i = 0; i < 200 && !unmounted; ++i) {
    if (::umount2(mnt_.c_str(), 0) == 0 || errno == EINVAL || errno == ENOENT) {
      unmounted = true;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  if (!unmounted) ::umount2(mnt_.c_str(), MNT_DETACH);
  int status = wait_for(pid_, timeout_s * 1000);
  int code = 0;
  if (status == -1) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    code = 128 + SIGKILL;
  } else {
    code = exit_code_of(status);
  }
  pid_ = -1;
  return code;
}

void ForegroundMount::kill9() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
  // The connection is dead ("Transport endpoint is not connected"): detach.
  ::umount2(mnt_.c_str(), MNT_DETACH);
}

bool ForegroundMount::alive(int& exit_code) {
  if (pid_ <= 0) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) != pid_) return true;
  last_status_ = status;
  exit_code = exit_code_of(status);
  pid_ = -1;
  ::umount2(mnt_.c_str(), MNT_DETACH);
  return false;
}

long proc_rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

long proc_fd_count(pid_t pid) {
  DIR* d = ::opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
  if (d == nullptr) return -1;
  long n = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n;
}

}  // namespace kmsfs::test
