#pragma once
// A kmsfs mount served by a child process kept in the foreground
// (`kmsfs mount -f`), so that a test knows the serving process: to watch its
// memory and open fds (the differential tester's soak mode) or to kill -9 it
// at a random moment (the crash tests). The mount is always gone when the
// object is: unmounted, or lazily detached when the server is dead.

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kmsfs::test {

class ForegroundMount {
 public:
  // `log_path`: where the server's stderr goes (appended); empty = /dev/null.
  ForegroundMount(std::string cipher, std::string mnt, std::vector<std::string> mount_args = {},
                  std::string log_path = "");
  ~ForegroundMount();
  ForegroundMount(const ForegroundMount&) = delete;
  ForegroundMount& operator=(const ForegroundMount&) = delete;

  // Starts the server and waits until the mount exists; throws with the
  // server's exit status when it does not come up.
  void start();
  // Clean unmount; waits for the server to exit. Returns its exit status
  // (0 = clean); a server that does not exit within `timeout_s` is killed.
  int stop(int timeout_s = 60);
  // SIGKILL at once, reap, and detach the dead mount.
  void kill9();

  // Checks that the server still runs. One found dead (it crashed or
  // exited by itself) is reaped, its mount detached, and its exit status
  // (128+signal when killed) stored in `exit_code`.
  bool alive(int& exit_code);
  // The raw waitpid status of a server alive() found dead (WCOREDUMP etc.).
  int last_wait_status() const { return last_status_; }

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  const std::string& mnt() const { return mnt_; }
  const std::string& cipher() const { return cipher_; }

 private:
  int last_status_ = 0;
  std::string cipher_;
  std::string mnt_;
  std::vector<std::string> args_;
  std::string log_path_;
  pid_t pid_ = -1;
};

// From /proc/PID: resident set size in KiB and the number of open fds;
// -1 when the process is gone or /proc cannot be read.
long proc_rss_kib(pid_t pid);
long proc_fd_count(pid_t pid);

}  // namespace kmsfs::test
