#include "tests/integration/kmsd_fixture.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "tests/integration/mount_fixture.h"

extern char** environ;

namespace kmsfs::test {

int connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return -1;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

KmsdProcess::KmsdProcess(std::string root, std::vector<std::string> extra_args, std::vector<std::string> launcher)
    : root_(std::move(root)),
      state_(root_ + "/kmsd-state"),
      socket_(root_ + "/kmsd.sock"),
      log_(root_ + "/kmsd.log"),
      extra_(std::move(extra_args)),
      launcher_(std::move(launcher)) {}

KmsdProcess::~KmsdProcess() {
  if (pid_ > 0) kill9();
}

std::string KmsdProcess::log() const {
  std::ifstream in(log_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void KmsdProcess::spawn() {
  if (pid_ > 0) throw std::logic_error("kmsd already running");
  std::vector<std::string> argv{bin("kmsd"), "--config", "/dev/null", "--state-dir", state_,
                                "--socket", socket_, "--log-level", "debug"};
  argv.insert(argv.end(), extra_.begin(), extra_.end());
  argv.insert(argv.begin(), launcher_.begin(), launcher_.end());  // execs kmsd: the same pid
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  // The daemon must not inherit the test process's SoftHSM configuration
  // (its state dir brings its own) nor a systemd socket.
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string v = *e;
    if (v.rfind("SOFTHSM2_CONF=", 0) == 0 || v.rfind("KMSFS_HOME=", 0) == 0 ||
        v.rfind("LISTEN_", 0) == 0 || v.rfind("NOTIFY_SOCKET=", 0) == 0) {
      continue;
    }
    env_s.push_back(v);
  }
  std::vector<char*> envp;
  for (auto& v : env_s) envp.push_back(v.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("cannot start kmsd: " + std::string(std::strerror(rc)));
  pid_ = pid;
}

void KmsdProcess::wait_serving() {
  if (pid_ <= 0) throw std::logic_error("kmsd is not running");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      throw std::runtime_error("kmsd exited during start-up:\n" + log());
    }
    // Ready = answers a request (the socket exists, and queues
    // connections, before the HSM is open).
    int fd = connect_unix(socket_);
    if (fd >= 0) {
      const std::string body = "{\"NumberOfBytes\": 8}";
      const std::string req =
          "POST / HTTP/1.1\r\nContent-Type: application/x-amz-json-1.1\r\n"
          "X-Amz-Target: TrentService.GenerateRandom\r\nContent-Length: " +
          std::to_string(body.size()) + "\r\n\r\n" + body;
      (void)!::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
      pollfd p{fd, POLLIN, 0};
      char buf[16] = {};
      const bool answered = ::poll(&p, 1, 1000) > 0 && ::recv(fd, buf, sizeof buf - 1, 0) > 0 &&
                            std::string(buf).rfind("HTTP/1.1", 0) == 0;
      ::close(fd);
      if (answered) return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill9();
  throw std::runtime_error("kmsd did not serve within 60 s:\n" + log());
}

int KmsdProcess::stop(int sig) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, sig);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace kmsfs::test
