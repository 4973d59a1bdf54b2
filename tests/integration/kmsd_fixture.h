#pragma once
// A real kmsd process for tests: its own state dir (the layout of an
// embedded KMSFS_HOME, with its own SoftHSM2 token) and socket under a temp
// root. Killed (SIGKILL) in the destructor if still running, also when a
// test fails.

#include <sys/types.h>

#include <string>
#include <vector>

namespace kmsfs::test {

class KmsdProcess {
 public:
  // `root`: an existing directory; the state dir is root/kmsd-state, the
  // socket root/kmsd.sock, the log root/kmsd.log.
  // `launcher`: a command kmsd runs under, e.g. {"/usr/bin/prlimit",
  // "--nofile=400:400", "--"}; empty = none.
  explicit KmsdProcess(std::string root, std::vector<std::string> extra_args = {},
                       std::vector<std::string> launcher = {});
  ~KmsdProcess();
  KmsdProcess(const KmsdProcess&) = delete;
  KmsdProcess& operator=(const KmsdProcess&) = delete;

  // Starts kmsd and waits (up to 60 s) until its socket accepts; throws
  // with the log if it exits or never serves.
  void start() {
    spawn();
    wait_serving();
  }
  // The two halves of start(): a test that kills kmsd during its start-up
  // spawns it, waits a random moment, then kills it.
  void spawn();
  void wait_serving();
  // Sends `sig` and waits for the exit; returns the exit code, or 128+signal.
  int stop(int sig);
  void kill9() { (void)stop(9); }
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  const std::string& socket() const { return socket_; }
  std::string spec() const { return "unix:" + socket_; }
  const std::string& state_dir() const { return state_; }
  std::string log() const;

 private:
  std::string root_;
  std::string state_;
  std::string socket_;
  std::string log_;
  std::vector<std::string> extra_;
  std::vector<std::string> launcher_;
  pid_t pid_ = -1;
};

// connect(2) to a Unix socket: the fd, or -1.
int connect_unix(const std::string& path);

}  // namespace kmsfs::test
