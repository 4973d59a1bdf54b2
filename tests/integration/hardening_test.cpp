// Process hardening: the serving kmsfs process writes no core dump
// (PR_SET_DUMPABLE 0), a forced dump of it (gcore, as root can) holds no data
// key, and trace-level logs of kmsfs and kmsctl hold neither a data key nor
// the HSM PIN. The known data key is the real one of a file on the volume,
// unwrapped through `kmsctl decrypt` exactly as docs/format.md §6 describes.

#include <fcntl.h>
#include <signal.h>
#include <grp.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "crypto/encoding.h"
#include "crypto/file_header.h"
#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Every form in which a key could end up in text or memory.
std::vector<std::string> forms(const std::vector<std::uint8_t>& key) {
  std::string raw(key.begin(), key.end());
  std::string hex = crypto::to_hex(key);
  std::string upper = hex;
  for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return {raw, hex, upper, crypto::to_base64(key)};
}

class Hardening : public ::testing::Test {
 protected:
  void SetUp() override {
    kms_ = std::make_unique<TempKms>();
    cipher_ = kms_->root() + "/v.cipher";
    mnt_ = kms_->root() + "/v.mnt";
    log_ = kms_->root() + "/kmsfs.log";
    ASSERT_EQ(::mkdir(mnt_.c_str(), 0755), 0);
    auto r = run_command({bin("kmsfs"), "init", cipher_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    pin_ = slurp(kms_->home() + "/pin");
    while (!pin_.empty() && (pin_.back() == '\n' || pin_.back() == '\r')) pin_.pop_back();
    ASSERT_FALSE(pin_.empty());
  }

  // The DEK of `backing` (a file in the cipher dir), unwrapped by the KMS.
  std::vector<std::uint8_t> dek_of(const std::string& backing) {
    auto bytes = read_file(backing);
    auto h = crypto::FileHeader::decode(std::span(bytes.data(), std::min<size_t>(bytes.size(), 128)));
    if (!h) throw std::runtime_error("no header in " + backing);
    const std::string blob = kms_->root() + "/blob";
    write_file(blob, h->wrapped_key);
    auto cfg = nlohmann::json::parse(slurp(cipher_ + "/kmsfs.json"));
    auto r = run_command({bin("kmsctl"), "decrypt", "--ciphertext-blob", "fileb://" + blob,
                          "--encryption-context",
                          "kmsfs:fs=" + cfg.at("filesystem_id").get<std::string>(),
                          "kmsfs:file=" + crypto::file_id_hex(h->file_id)});
    if (r.exit_code != 0) throw std::runtime_error("kmsctl decrypt: " + r.err);
    auto j = nlohmann::json::parse(r.out);
    auto dek = crypto::from_base64(j.at("Plaintext").get<std::string>());
    if (!dek || dek->size() != 32) throw std::runtime_error("no 32-byte Plaintext from kmsctl decrypt");
    return *dek;
  }

  std::string only_backing_file() {
    for (const auto& f : list_files(cipher_)) {
      if (f.find("kmsfs.json") == std::string::npos && f.find("kmsfs.diriv") == std::string::npos) return f;
    }
    throw std::runtime_error("no backing file");
  }

  std::unique_ptr<TempKms> kms_;
  std::string cipher_, mnt_, log_, pin_;
};

TEST_F(Hardening, TraceLogsHoldNoDataKeyAndNoPin) {
  ::setenv("KMSFS_LOG_LEVEL", "trace", 1);
  ForegroundMount m(cipher_, mnt_, {"-o", "key_cache=off"}, log_);
  ASSERT_NO_THROW(m.start());
  write_file(mnt_ + "/secret", random_bytes(10000, 5));
  EXPECT_EQ(read_file(mnt_ + "/secret"), random_bytes(10000, 5));
  // Unwrapping through kmsctl with trace logging: its log (stderr) must not
  // show the key either; only its JSON answer on stdout carries it.
  auto dek = dek_of(only_backing_file());
  auto r = run_command({bin("kmsctl"), "list-keys"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(m.stop(), 0);
  ::unsetenv("KMSFS_LOG_LEVEL");

  const std::string log = slurp(log_);
  EXPECT_FALSE(log.empty()) << "trace logging wrote nothing: the test would prove nothing";
  for (const auto& f : forms(dek)) EXPECT_EQ(log.find(f), std::string::npos) << "the kmsfs log holds the DEK";
  EXPECT_EQ(log.find(pin_), std::string::npos) << "the kmsfs log holds the PIN";
  EXPECT_EQ(r.err.find(pin_), std::string::npos) << "the kmsctl log holds the PIN";
}

// What a process of uid 65534 could do to another process of its own uid:
// ptrace-attach it and open its memory. Filled by probe_same_uid().
struct SameUidProbe {
  bool ready = false;          // the target came up (its `ready_path` appeared)
  int target_attach = -1;      // errno of PTRACE_ATTACH to the target (0 = attached)
  int target_mem = -1;         // errno of opening /proc/TARGET/mem (0 = opened)
  int control_attach = -1;     // errno of PTRACE_ATTACH to a plain process of that uid
};

// Runs `argv` as uid/gid 65534 and, from the same uid (the target's parent,
// so that even Yama's ptrace_scope=1 would allow it), tries to attach to it
// and to read its memory; a plain `sleep` of that uid is the control that
// shows such an attack works on a process that does not protect itself.
SameUidProbe probe_same_uid(const std::vector<std::string>& argv, const std::string& ready_path) {
  int fds[2];
  if (::pipe(fds) != 0) return {};
  const pid_t prober = ::fork();
  if (prober == 0) {
    ::close(fds[0]);
    int out[4] = {0, -1, -1, -1};
    if (::setgroups(0, nullptr) != 0 || ::setresgid(65534, 65534, 65534) != 0 ||
        ::setresuid(65534, 65534, 65534) != 0) {
      ::_exit(120);
    }
    const pid_t target = ::fork();
    if (target == 0) {
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    // exec makes the control dumpable again (the uid change above made
    // this process non-dumpable).
    const pid_t control = ::fork();
    if (control == 0) {
      ::execl("/bin/sleep", "sleep", "60", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    struct stat st {};
    for (int i = 0; i < 600 && ::stat(ready_path.c_str(), &st) != 0; ++i) ::usleep(100000);
    out[0] = ::stat(ready_path.c_str(), &st) == 0 ? 1 : 0;
    auto attach = [](pid_t pid) {
      if (::ptrace(PTRACE_ATTACH, pid, nullptr, nullptr) != 0) return errno;
      int status = 0;
      ::waitpid(pid, &status, __WALL);
      ::ptrace(PTRACE_DETACH, pid, nullptr, nullptr);
      return 0;
    };
    if (out[0] == 1) {
      out[1] = attach(target);
      const int mem = ::open(("/proc/" + std::to_string(target) + "/mem").c_str(), O_RDONLY);
      out[2] = mem >= 0 ? 0 : errno;
      if (mem >= 0) ::close(mem);
    }
    out[3] = attach(control);
    ::kill(target, SIGTERM);
    ::kill(control, SIGKILL);
    ::waitpid(target, nullptr, 0);
    ::waitpid(control, nullptr, 0);
    if (::write(fds[1], out, sizeof out) != static_cast<ssize_t>(sizeof out)) ::_exit(121);
    ::_exit(0);
  }
  ::close(fds[1]);
  int in[4] = {0, -1, -1, -1};
  const bool got = prober > 0 && ::read(fds[0], in, sizeof in) == static_cast<ssize_t>(sizeof in);
  ::close(fds[0]);
  if (prober > 0) ::waitpid(prober, nullptr, 0);
  SameUidProbe p;
  if (!got) return p;
  p.ready = in[0] == 1;
  p.target_attach = in[1];
  p.target_mem = in[2];
  p.control_attach = in[3];
  return p;
}

// kmsd run by an unprivileged user: another process of that same user (not
// only of another user, whom the kernel refuses anyway) can neither
// ptrace it nor read its memory, because kmsd made itself non-dumpable.
// (kmsfs calls the same cli::refuse_core_dumps(); a FUSE mount by uid
// 65534 needs /dev/fuse access that these machines do not give it.)
TEST_F(Hardening, KmsdIsNotPtraceableEvenByItsOwnUser) {
  if (auto why = cannot_run_as_nobody({bin("kmsd"), "--help"}); !why.empty()) GTEST_SKIP() << why;
  const std::string dir = make_temp_dir("kmsfs-ptrace");
  ASSERT_EQ(::chown(dir.c_str(), 65534, 65534), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0700), 0);
  const std::string sock = dir + "/kmsd.sock";
  // kmsd makes its own SoftHSM2 configuration in its state dir.
  const char* conf = std::getenv("SOFTHSM2_CONF");
  const std::string saved_conf = conf != nullptr ? conf : "";
  ::unsetenv("SOFTHSM2_CONF");
  auto p = probe_same_uid({bin("kmsd"), "--state-dir", dir + "/state", "--socket", sock}, sock);
  if (!saved_conf.empty()) ::setenv("SOFTHSM2_CONF", saved_conf.c_str(), 1);
  remove_tree(dir);
  ASSERT_TRUE(p.ready) << "kmsd did not come up as uid 65534";
  if (p.control_attach != 0) {
    GTEST_SKIP() << "ptrace between processes of one uid is restricted here (" << std::strerror(p.control_attach)
                 << "): nothing to show";
  }
  EXPECT_EQ(p.target_attach, EPERM) << "another process of kmsd's uid attached to it with ptrace";
  EXPECT_NE(p.target_mem, 0) << "another process of kmsd's uid opened its /proc/PID/mem";
}

TEST_F(Hardening, ServerWritesNoCoreDump) {
  // SIGABRT of the serving kmsfs (holding a DEK) with core dumps allowed by
  // the test's limit: the kernel must report no dump (!WCOREDUMP) whatever
  // core_pattern is (a file, or a pipe to systemd-coredump/apport, where
  // fs.suid_dumpable=2 would dump even a non-dumpable process: kmsfs's own
  // RLIMIT_CORE of 1 stops that). Where core_pattern is a relative file
  // name, a control process proves dumps work and no file may appear.
  const std::string dumps = kms_->root() + "/dumps";
  ASSERT_EQ(::mkdir(dumps.c_str(), 0700), 0);
  std::string pattern = slurp("/proc/sys/kernel/core_pattern");
  while (!pattern.empty() && pattern.back() == '\n') pattern.pop_back();
  const bool files_observable = !pattern.empty() && pattern[0] != '|' && pattern[0] != '/';
  struct rlimit old {};
  ::getrlimit(RLIMIT_CORE, &old);
  struct rlimit unlimited {RLIM_INFINITY, RLIM_INFINITY};
  const bool raised = ::setrlimit(RLIMIT_CORE, &unlimited) == 0;
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof cwd), nullptr);
  ASSERT_EQ(::chdir(dumps.c_str()), 0);
  auto count_files = [&] { return list_files(dumps).size(); };

  bool dumps_work = false;
  if (files_observable && raised) {
    // Control: a dumpable process aborts and dumps.
    pid_t control = ::fork();
    if (control == 0) {
      ::pause();
      std::_Exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ::kill(control, SIGABRT);
    int status = 0;
    ::waitpid(control, &status, 0);
    dumps_work = WIFSIGNALED(status) && WCOREDUMP(status) && count_files() > 0;
    for (const auto& f : list_files(dumps)) ::unlink(f.c_str());
  }

  ForegroundMount m(cipher_, mnt_, {}, log_);
  ASSERT_NO_THROW(m.start());
  write_file(mnt_ + "/secret", random_bytes(10000, 6));
  int fd = ::open((mnt_ + "/secret").c_str(), O_RDONLY);  // the DEK is held now
  ASSERT_GE(fd, 0);
  const pid_t pid = m.pid();
  // The server lowered its own core limit to 1 (no dump of any kind).
  const std::string limits = slurp("/proc/" + std::to_string(pid) + "/limits");
  std::string core_line;
  std::istringstream lines(limits);
  for (std::string l; std::getline(lines, l);) {
    if (l.rfind("Max core file size", 0) == 0) core_line = l;
  }
  std::istringstream fields(core_line.substr(std::string("Max core file size").size()));
  std::string soft;
  fields >> soft;
  EXPECT_EQ(soft, "1") << core_line;
  ::kill(pid, SIGABRT);
  int code = 0;
  bool dead = false;
  for (int i = 0; i < 200 && !(dead = !m.alive(code)); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(25));
  ::close(fd);
  ::chdir(cwd);
  ::setrlimit(RLIMIT_CORE, &old);
  ASSERT_TRUE(dead) << "kmsfs survived SIGABRT";
  const int st = m.last_wait_status();
  EXPECT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT) << "wait status " << st;
  EXPECT_FALSE(WCOREDUMP(st)) << "the kernel dumped kmsfs's memory (core_pattern '" << pattern << "')";
  if (dumps_work) {
    EXPECT_EQ(count_files(), 0U) << "kmsfs wrote a core dump: PR_SET_DUMPABLE is not in effect";
  }
}

// The memory a core dump of `pid` would contain, read through /proc/PID/mem
// (root may, even for a non-dumpable process, without stopping it: gcore
// would ptrace-stop the FUSE server and deadlock on its own mount). As the
// kernel does for a dump, mappings marked "dd" (MADV_DONTDUMP, where
// SecureBuffer keeps keys) are left out; they are returned in `excluded`.
// `where`, if given, gets (offset in the image, smaps line) per mapping.
std::string dumpable_memory(pid_t pid, std::string& excluded,
                            std::vector<std::pair<std::size_t, std::string>>* where = nullptr,
                            std::vector<std::pair<std::size_t, std::string>>* where_excluded = nullptr) {
  std::ifstream smaps("/proc/" + std::to_string(pid) + "/smaps");
  int mem = ::open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDONLY | O_CLOEXEC);
  excluded.clear();
  if (mem < 0) return {};
  std::string image;
  struct Range {
    unsigned long lo, hi;
    bool readable;
    std::string name;
  };
  std::vector<std::pair<Range, bool>> ranges;  // range, dont-dump
  std::string line;
  Range cur{0, 0, false, ""};
  bool have = false;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    char perms[8] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %7s", &lo, &hi, perms) == 3 && line.find(':') > line.find(' ')) {
      cur = Range{lo, hi, perms[0] == 'r', line};
      have = true;
    } else if (have && line.rfind("VmFlags:", 0) == 0) {
      const bool dd = line.find(" dd") != std::string::npos;
      ranges.push_back({cur, dd});
      have = false;
    }
  }
  std::string previous;
  for (auto& [r, dd] : ranges) {
    const std::string this_line = r.name;
    r.name += " [after: " + previous + "]";
    previous = this_line;
    // Skip what no dump contains: unreadable, the vsyscall page, device maps.
    if (!r.readable || r.name.find("[vvar]") != std::string::npos || r.name.find("[vsyscall]") != std::string::npos) continue;
    if (r.hi - r.lo > (1UL << 32)) continue;  // reservations, never touched whole
    std::string& out = dd ? excluded : image;
    if (!dd && where != nullptr) where->emplace_back(image.size(), r.name);
    if (dd && where_excluded != nullptr) where_excluded->emplace_back(excluded.size(), r.name);
    std::vector<char> buf(r.hi - r.lo);
    ssize_t n = ::pread(mem, buf.data(), buf.size(), static_cast<off_t>(r.lo));
    if (n > 0) out.append(buf.data(), static_cast<size_t>(n));
  }
  ::close(mem);
  return image;
}

// The raw DEK of an open file in use is nowhere in the server's dumpable
// memory: SecureBuffer holds it, and OpenSSL's own copies (the cipher
// context's key schedule) live in crypto/dontdump_heap's MADV_DONTDUMP maps.
TEST_F(Hardening, ForcedDumpHoldsNoDataKey) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // A sanitized server keeps locals in heap-allocated fake stacks and maps
  // terabytes of shadow memory: the property is the release binary's.
  GTEST_SKIP() << "meaningful only for an unsanitized kmsfs";
#endif
  ForegroundMount m(cipher_, mnt_, {"-o", "key_cache=off"}, log_);
  ASSERT_NO_THROW(m.start());
  write_file(mnt_ + "/secret", random_bytes(100000, 7));
  int fd = ::open((mnt_ + "/secret").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<std::uint8_t> buf(100000);
  ASSERT_EQ(::pread(fd, buf.data(), buf.size(), 0), 100000);  // decrypts: the key is in use
  auto dek = dek_of(only_backing_file());
  std::string excluded;
  std::vector<std::pair<std::size_t, std::string>> where;
  const std::string image = dumpable_memory(m.pid(), excluded, &where);
  auto mapping_of = [&](std::size_t off) {
    std::string name = "?";
    for (const auto& [start, line] : where) {
      if (start <= off) name = line + " (+" + std::to_string(off - start) + ")";
    }
    return name;
  };
  ::close(fd);
  EXPECT_EQ(m.stop(), 0);
  ASSERT_GT(image.size(), 100000U) << "could not read the server's memory";
  const auto f = forms(dek);
  // Control: the key is really held (in the excluded, page-locked memory).
  EXPECT_NE(excluded.find(f[0]), std::string::npos)
      << "the DEK is not in MADV_DONTDUMP memory: the test would prove nothing";
  EXPECT_EQ(image.find(f[0]), std::string::npos)
      << "the raw DEK is in dumpable memory (outside SecureBuffer: a cipher context, a stray copy), in "
      << mapping_of(image.find(f[0]));
  for (size_t i = 1; i < f.size(); ++i) {
    EXPECT_EQ(image.find(f[i]), std::string::npos) << "an encoded DEK is in dumpable memory";
  }
  EXPECT_EQ(image.find(pin_), std::string::npos) << "the PIN is in dumpable memory";
}

// Zeroize on free: once the file is closed (key cache off, so nothing
// keeps its key), the DEK is nowhere in the server's memory, locked
// (MADV_DONTDUMP) mappings included. Polled: RELEASE reaches the server
// after close(2) returns.
TEST_F(Hardening, ClosedFileLeavesItsDataKeyNowhereInMemory) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "meaningful only for an unsanitized kmsfs";
#endif
  ForegroundMount m(cipher_, mnt_, {"-o", "key_cache=off"}, log_);
  ASSERT_NO_THROW(m.start());
  write_file(mnt_ + "/secret", random_bytes(100000, 8));
  int fd = ::open((mnt_ + "/secret").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<std::uint8_t> buf(100000);
  ASSERT_EQ(::pread(fd, buf.data(), buf.size(), 0), 100000);
  const auto f = forms(dek_of(only_backing_file()));
  std::string excluded;
  std::string image = dumpable_memory(m.pid(), excluded);
  ASSERT_NE(excluded.find(f[0]), std::string::npos) << "control: the open file's DEK is not held at all";
  ::close(fd);
  bool gone = false;
  std::vector<std::pair<std::size_t, std::string>> where;
  std::vector<std::pair<std::size_t, std::string>> where_excluded;
  for (int i = 0; i < 20 && !gone; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    where.clear();
    where_excluded.clear();
    excluded.clear();
    image = dumpable_memory(m.pid(), excluded, &where, &where_excluded);
    gone = image.find(f[0]) == std::string::npos && excluded.find(f[0]) == std::string::npos;
  }
  auto mapping_of = [](const std::vector<std::pair<std::size_t, std::string>>& w, std::size_t off) {
    std::string name = "?";
    for (const auto& [start, line] : w) {
      if (start <= off) name = line + " (+" + std::to_string(off - start) + ")";
    }
    return name;
  };
  const auto in_image = image.find(f[0]);
  const auto in_locked = excluded.find(f[0]);
  EXPECT_TRUE(gone) << "the DEK of a closed file is still in the server's memory: "
                    << (in_image != std::string::npos ? "dumpable " + mapping_of(where, in_image) : "")
                    << (in_locked != std::string::npos ? "locked " + mapping_of(where_excluded, in_locked) : "");
  EXPECT_EQ(m.stop(), 0);
}

// A client that holds every descriptor the mount will give (the server's
// limit lowered to 1,000 with prlimit) meets EMFILE from the mount, while
// the KMS in the same process keeps a reserve: SoftHSM2 opens its object
// files on every call and, when such an open fails, treats the key (or the
// whole token) as gone for the rest of the process, so that every later
// file create failed with EIO ("key material missing from the HSM").
// Under that pressure new files still get keys from the pool as it refills,
// and afterwards everything works and nothing is lost.
TEST_F(Hardening, ClientHoldingEveryDescriptorLeavesTheKmsWorking) {
  ForegroundMount m(cipher_, mnt_, {}, log_);
  ASSERT_NO_THROW(m.start());
  const auto before = random_bytes(5000, 11);
  write_file(mnt_ + "/before", before);
  struct rlimit low {1000, 1000};
  ASSERT_EQ(::prlimit(m.pid(), RLIMIT_NOFILE, &low, nullptr), 0) << std::strerror(errno);
  std::vector<int> held;
  auto close_all = [&] {
    for (int fd : held) ::close(fd);
    held.clear();
  };
  int err = 0;
  for (int i = 0; i < 3000 && err == 0; ++i) {
    const int fd = ::open((mnt_ + "/before").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      held.push_back(fd);
    } else {
      err = errno;
    }
  }
  EXPECT_EQ(err, EMFILE) << std::strerror(err) << " after " << held.size() << " opens";
  EXPECT_GT(held.size(), 500U);
  // At the limit: free two handles, create a file (its key comes from the
  // pool, which refills with GenerateDataKey) and keep it open, so that the
  // refill runs while the client holds everything again.
  int created = 0;
  for (int round = 0; round < 40; ++round) {
    for (int k = 0; k < 2 && !held.empty(); ++k) {
      ::close(held.back());
      held.pop_back();
    }
    const std::string name = mnt_ + "/under-pressure-" + std::to_string(round);
    const int fd = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
      EXPECT_EQ(::write(fd, "p", 1), 1) << name << ": " << std::strerror(errno);
      held.push_back(fd);
      ++created;
    } else {
      EXPECT_EQ(errno, EMFILE) << name << ": " << std::strerror(errno);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GT(created, 0);
  close_all();
  // Releases are asynchronous: the first create may still meet EMFILE.
  int first = -1;
  for (int i = 0; i < 100 && first < 0; ++i) {
    first = ::open((mnt_ + "/after-0").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (first < 0 && errno != EMFILE) break;
    if (first < 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_GE(first, 0) << std::strerror(errno);
  ::close(first);
  for (int i = 1; i < 100; ++i) {
    write_file(mnt_ + "/after-" + std::to_string(i), random_bytes(3000, 100 + i));
  }
  for (int i = 1; i < 100; ++i) {
    EXPECT_EQ(read_file(mnt_ + "/after-" + std::to_string(i)), random_bytes(3000, 100 + i)) << i;
  }
  EXPECT_EQ(read_file(mnt_ + "/before"), before);
  int exit_code = 0;
  EXPECT_TRUE(m.alive(exit_code)) << exit_code;
  EXPECT_EQ(m.stop(), 0);
  const std::string log = slurp(log_);
  EXPECT_EQ(log.find("key material missing"), std::string::npos) << log.substr(0, 4000);
  EXPECT_EQ(log.find("no key labelled"), std::string::npos) << log.substr(0, 4000);
  // Everything acknowledged is there after a remount, with a cold key cache.
  ForegroundMount again(cipher_, mnt_, {}, log_);
  ASSERT_NO_THROW(again.start());
  EXPECT_EQ(read_file(mnt_ + "/before"), before);
  for (int round = 0; round < 40; ++round) {
    const std::string name = mnt_ + "/under-pressure-" + std::to_string(round);
    struct stat st {};
    if (::stat(name.c_str(), &st) == 0) {
      EXPECT_EQ(read_file(name), std::vector<std::uint8_t>{'p'}) << name;
    }
  }
  EXPECT_EQ(read_file(mnt_ + "/after-7"), random_bytes(3000, 107));
  EXPECT_EQ(again.stop(), 0);
}

TEST_F(Hardening, PinFileWithWideModeIsRefused) {
  const std::string pin = kms_->root() + "/wide.pin";
  write_file(pin, std::vector<std::uint8_t>(pin_.begin(), pin_.end()));
  ASSERT_EQ(::chmod(pin.c_str(), 0644), 0);
  auto r = run_command({bin("kmsctl"), "--pin-file", pin, "list-keys"});
  EXPECT_EQ(r.exit_code, 4) << r.out << r.err;
  EXPECT_NE(r.err.find(pin), std::string::npos) << "the message names the file: " << r.err;
  EXPECT_EQ(r.err.find(pin_), std::string::npos);
  ASSERT_EQ(::chmod(pin.c_str(), 0600), 0);
  r = run_command({bin("kmsctl"), "--pin-file", pin, "list-keys"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

// A KMS state dir others can list or enter (0755) is refused, naming it.
TEST_F(Hardening, StateDirWithWideModeIsRefused) {
  ASSERT_EQ(::chmod(kms_->home().c_str(), 0755), 0);
  auto r = run_command({bin("kmsctl"), "list-keys"});
  EXPECT_EQ(r.exit_code, 4) << r.out << r.err;
  EXPECT_NE(r.err.find(kms_->home()), std::string::npos) << "the message names the directory: " << r.err;
  ASSERT_EQ(::chmod(kms_->home().c_str(), 0700), 0);
  r = run_command({bin("kmsctl"), "list-keys"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(Hardening, MountAlwaysUsesDefaultPermissions) {
  Mount vol(kms_->root(), "dp");
  vol.mount();
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  bool found = false;
  while (std::getline(in, line)) {
    if (line.find(" " + vol.mnt() + " ") == std::string::npos) continue;
    found = true;
    EXPECT_NE(line.find("default_permissions"), std::string::npos) << line;
    EXPECT_EQ(line.find("allow_other"), std::string::npos) << "allow_other without being asked: " << line;
  }
  EXPECT_TRUE(found);
}

}  // namespace
}  // namespace kmsfs::test
