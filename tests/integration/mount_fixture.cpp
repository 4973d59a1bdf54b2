#include "tests/integration/mount_fixture.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

extern char** environ;

namespace kmsfs::test {

std::string bin(const std::string& tool) { return std::string(KMSFS_BIN_DIR) + "/" + tool; }

std::string cannot_run_as_nobody(const std::vector<std::string>& program_and_args) {
  if (::geteuid() != 0) return "needs root to switch to uid 65534";
  if (::access("/usr/bin/setpriv", X_OK) != 0) return "needs /usr/bin/setpriv";
  std::vector<std::string> argv{"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"};
  argv.insert(argv.end(), program_and_args.begin(), program_and_args.end());
  auto r = run_command(argv);
  if (r.exit_code == 0) return "";
  return "uid 65534 cannot run " + program_and_args.front() + " here: " + r.err;
}

CommandResult run_command(const std::vector<std::string>& argv) {
  int out_pipe[2];
  int err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) {
    throw std::runtime_error("pipe failed");
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], STDERR_FILENO);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    throw std::runtime_error("cannot run " + argv[0] + ": " + std::strerror(rc));
  }
  CommandResult r;
  // A daemonizing child keeps no copy of these pipes open once it is
  // ready (it redirects stdio to /dev/null), so EOF arrives.
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      } else {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
      }
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

std::string make_temp_dir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp != nullptr ? tmp : "/tmp") + "/" + prefix + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return buf.data();
}

void remove_tree(const std::string& path) {
  // Refuse to descend into a mount that is still there.
  if (path.empty() || path == "/") return;
  run_command({"/bin/rm", "-rf", "--one-file-system", path});
}

std::vector<std::uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  std::vector<std::uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("cannot read " + path);
  return data;
}

void write_file(const std::string& path, const std::vector<std::uint8_t>& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw std::runtime_error("cannot write " + path + ": " + std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) throw std::runtime_error("close " + path + ": " + std::strerror(errno));
}

std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng());
  return v;
}

std::vector<std::string> list_files(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    std::string p = dir + "/" + name;
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      auto sub = list_files(p);
      out.insert(out.end(), sub.begin(), sub.end());
    } else if (S_ISREG(st.st_mode)) {
      out.push_back(p);
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool contains(const std::vector<std::uint8_t>& hay, const std::string& needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

bool is_mountpoint(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string id, parent, devno, root, mp;
    ss >> id >> parent >> devno >> root >> mp;
    if (mp == path) return true;
  }
  return false;
}

TempKms::TempKms() {
  root_ = make_temp_dir("kmsfs-it");
  home_ = root_ + "/kms-home";
  ::setenv("KMSFS_HOME", home_.c_str(), 1);
  ::setenv("KMSFS_KMS", "embedded", 1);
  ::unsetenv("SOFTHSM2_CONF");
}

TempKms::~TempKms() {
  // Any mount still below root_ is detached before the tree goes.
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::vector<std::string> mps;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string id, parent, devno, root, mp;
    ss >> id >> parent >> devno >> root >> mp;
    if (mp.rfind(root_ + "/", 0) == 0) mps.push_back(mp);
  }
  for (auto it = mps.rbegin(); it != mps.rend(); ++it) ::umount2(it->c_str(), MNT_DETACH);
  remove_tree(root_);
}

Mount::Mount(const std::string& root, const std::string& name, const std::string& key,
             const std::vector<std::string>& init_args) {
  cipher_ = root + "/" + name + ".cipher";
  mnt_ = root + "/" + name + ".mnt";
  ::mkdir(mnt_.c_str(), 0755);
  std::vector<std::string> argv{bin("kmsfs"), "init", cipher_};
  if (!key.empty()) {
    argv.push_back("--key");
    argv.push_back(key);
  }
  argv.insert(argv.end(), init_args.begin(), init_args.end());
  auto r = run_command(argv);
  if (r.exit_code != 0) throw std::runtime_error("kmsfs init failed: " + r.err);
}

Mount::~Mount() {
  if (mounted_) {
    auto r = run_command({bin("kmsfs"), "umount", mnt_});
    if (r.exit_code != 0) ::umount2(mnt_.c_str(), MNT_DETACH);
  }
}

void Mount::mount(const std::vector<std::string>& extra_args) {
  std::vector<std::string> argv{bin("kmsfs"), "mount", cipher_, mnt_};
  argv.insert(argv.end(), extra_args.begin(), extra_args.end());
  auto r = run_command(argv);
  if (r.exit_code != 0) throw std::runtime_error("kmsfs mount failed (" + std::to_string(r.exit_code) + "): " + r.err);
  if (!is_mountpoint(mnt_)) throw std::runtime_error("kmsfs mount returned 0 but " + mnt_ + " is not mounted");
  mounted_ = true;
}

void Mount::unmount() {
  if (!mounted_) return;
  auto r = run_command({bin("kmsfs"), "umount", mnt_});
  if (r.exit_code != 0) throw std::runtime_error("kmsfs umount failed: " + r.err);
  mounted_ = false;
}

}  // namespace kmsfs::test
