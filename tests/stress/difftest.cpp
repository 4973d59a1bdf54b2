// kmsfs_difftest: differential tester. A seeded generator makes a sequence
// of file-system operations; each is applied to a real kmsfs mount and to a
// plain directory on the backing filesystem, and every result (return value,
// errno, bytes read, attributes) must be equal. At the end (and after a
// remount, so that data comes back from the ciphertext) the two trees must be
// equal in names, types, sizes, contents, modes, link counts, symlink targets
// and extended attributes.
//
//   --seed S --ops N        the sequence (default seed 1, 2000 ops)
//   --threads T             T workers, each in its own subtree (results stay
//                           comparable), plus T writers and a reader on one
//                           shared file, checking what is defined there: no
//                           torn 4 KiB block, the final size
//   --soak SECONDS          repeat rounds with new seeds for that long and fail
//                           when the kmsfs server's RSS or fd count grows
//                           beyond a bound (--max-rss-growth-mib, --max-fd-growth)
//   --mount-opts O          passed as `kmsfs mount -o O`
//   --plaintext-names       volume made with `kmsfs init --plaintext-names`
//   --replay FILE           run an op file (as written on failure) instead
//   --shrink-seconds S      time budget of the delta-debugging shrinker (0: off)
//   --keep-logs             keep the kmsfs servers' logs in /tmp (paths printed)
//   --strict                also report the known, documented differences
//                           (see known_difference())
//
// On a mismatch it prints the seed, the mismatch, and a minimal reproduction
// found by delta debugging (ddmin) over the operation sequence, each trial on
// a fresh volume and mount; the reproduction is also written to an op file
// for --replay. Exit 0 = no difference, 1 = a difference, 2 = usage, 3 = the
// harness itself failed (e.g. the mount did not come up, a hang).

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

namespace kt = kmsfs::test;

namespace {

constexpr int kSlots = 6;

// --strict: also report the known differences (see known_difference()).
bool g_strict = false;

// ---------------------------------------------------------------------------
// Operations

enum class OpType {
  Create, Open, Close, Write, WritePath, Read, ReadPath, Truncate, Ftruncate, Rename, Link,
  Unlink, Mkdir, Rmdir, Symlink, Readlink, Chmod, Fchmod, Utimens, SetXattr, GetXattr,
  RemoveXattr, ListXattr, Fsync, Stat, Fstat, Readdir, Fallocate, Mkfifo, Remount,
  Count_
};

const char* const kOpNames[] = {
    "create", "open", "close", "write", "writepath", "read", "readpath", "truncate",
    "ftruncate", "rename", "link", "unlink", "mkdir", "rmdir", "symlink", "readlink", "chmod",
    "fchmod", "utimens", "setxattr", "getxattr", "removexattr", "listxattr", "fsync", "stat",
    "fstat", "readdir", "fallocate", "mkfifo", "remount"};
static_assert(sizeof kOpNames / sizeof kOpNames[0] == static_cast<size_t>(OpType::Count_));

struct Op {
  OpType type = OpType::Stat;
  std::string a;  // path relative to the side's root
  std::string b;  // second path, symlink target, or xattr name
  int slot = 0;
  int flags = 0;
  unsigned mode = 0;
  std::uint64_t off = 0;
  std::uint64_t len = 0;
  std::uint32_t seed = 0;  // data of writes and xattr values
};

// One op per line, tab-separated, for --replay.
std::string serialize(const Op& op) {
  std::ostringstream s;
  s << kOpNames[static_cast<int>(op.type)] << '\t' << op.a << '\t' << op.b << '\t' << op.slot
    << '\t' << op.flags << '\t' << op.mode << '\t' << op.off << '\t' << op.len << '\t' << op.seed;
  return s.str();
}

std::optional<Op> deserialize(const std::string& line) {
  std::vector<std::string> f;
  std::string cur;
  for (char c : line) {
    if (c == '\t') {
      f.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  f.push_back(cur);
  if (f.size() != 9) return std::nullopt;
  Op op;
  auto it = std::find(std::begin(kOpNames), std::end(kOpNames), f[0]);
  if (it == std::end(kOpNames)) return std::nullopt;
  op.type = static_cast<OpType>(it - std::begin(kOpNames));
  op.a = f[1];
  op.b = f[2];
  op.slot = std::stoi(f[3]);
  op.flags = std::stoi(f[4]);
  op.mode = static_cast<unsigned>(std::stoul(f[5]));
  op.off = std::stoull(f[6]);
  op.len = std::stoull(f[7]);
  op.seed = static_cast<std::uint32_t>(std::stoul(f[8]));
  return op;
}

std::string open_flags_str(int fl) {
  std::string s;
  switch (fl & O_ACCMODE) {
    case O_RDONLY: s = "O_RDONLY"; break;
    case O_WRONLY: s = "O_WRONLY"; break;
    default: s = "O_RDWR"; break;
  }
  const std::pair<int, const char*> bits[] = {{O_CREAT, "O_CREAT"},   {O_EXCL, "O_EXCL"},
                                              {O_TRUNC, "O_TRUNC"},   {O_APPEND, "O_APPEND"},
                                              {O_DIRECTORY, "O_DIRECTORY"}, {O_NOFOLLOW, "O_NOFOLLOW"}};
  for (auto [b, n] : bits) {
    if ((fl & b) != 0) s += std::string("|") + n;
  }
  return s;
}

std::string short_name(const std::string& p) {
  // Long names are long: show them shortened in reports.
  std::string out;
  std::size_t run = 0;
  for (std::size_t i = 0; i <= p.size(); ++i) {
    if (i < p.size() && p[i] == 'L') {
      ++run;
      continue;
    }
    if (run > 8) {
      out += "L{" + std::to_string(run) + "}";
    } else {
      out.append(run, 'L');
    }
    run = 0;
    if (i < p.size()) out += p[i];
  }
  return "\"" + out + "\"";
}

// A C-like line, for humans.
std::string describe(const Op& op) {
  std::ostringstream s;
  const std::string a = short_name(op.a);
  const std::string b = short_name(op.b);
  char mode[16];
  std::snprintf(mode, sizeof mode, "0%o", op.mode);
  switch (op.type) {
    case OpType::Create: s << "create(" << a << ", " << open_flags_str(op.flags) << ", " << mode << ") + close"; break;
    case OpType::Open: s << "fd[" << op.slot << "] = open(" << a << ", " << open_flags_str(op.flags) << ", " << mode << ")"; break;
    case OpType::Close: s << "close(fd[" << op.slot << "])"; break;
    case OpType::Write: s << "pwrite(fd[" << op.slot << "], data#" << op.seed << ", " << op.len << ", " << op.off << ")"; break;
    case OpType::WritePath: s << "open(" << a << ", O_WRONLY) + pwrite(data#" << op.seed << ", " << op.len << ", " << op.off << ") + close"; break;
    case OpType::Read: s << "pread(fd[" << op.slot << "], " << op.len << ", " << op.off << ")"; break;
    case OpType::ReadPath: s << "open(" << a << ", O_RDONLY) + pread(" << op.len << ", " << op.off << ") + close"; break;
    case OpType::Truncate: s << "truncate(" << a << ", " << op.len << ")"; break;
    case OpType::Ftruncate: s << "ftruncate(fd[" << op.slot << "], " << op.len << ")"; break;
    case OpType::Rename:
      s << "renameat2(" << a << ", " << b << ", "
        << (op.flags == 0 ? "0" : op.flags == RENAME_NOREPLACE ? "RENAME_NOREPLACE" : "RENAME_EXCHANGE") << ")";
      break;
    case OpType::Link: s << "link(" << a << ", " << b << ")"; break;
    case OpType::Unlink: s << "unlink(" << a << ")"; break;
    case OpType::Mkdir: s << "mkdir(" << a << ", " << mode << ")"; break;
    case OpType::Rmdir: s << "rmdir(" << a << ")"; break;
    case OpType::Symlink: s << "symlink(" << b << ", " << a << ")"; break;
    case OpType::Readlink: s << "readlink(" << a << ")"; break;
    case OpType::Chmod: s << "chmod(" << a << ", " << mode << ")"; break;
    case OpType::Fchmod: s << "fchmod(fd[" << op.slot << "], " << mode << ")"; break;
    case OpType::Utimens:
      s << "utimensat(" << a << ", {" << op.off << "." << op.seed << ", " << op.len << "." << op.seed
        << "}" << ((op.flags & AT_SYMLINK_NOFOLLOW) != 0 ? ", AT_SYMLINK_NOFOLLOW" : "") << ")";
      break;
    case OpType::SetXattr:
      s << (op.mode != 0 ? "lsetxattr(" : "setxattr(") << a << ", " << b << ", data#" << op.seed << ", " << op.len
        << ", " << (op.flags == XATTR_CREATE ? "XATTR_CREATE" : op.flags == XATTR_REPLACE ? "XATTR_REPLACE" : "0") << ")";
      break;
    case OpType::GetXattr: s << (op.mode != 0 ? "lgetxattr(" : "getxattr(") << a << ", " << b << ", size " << op.len << ")"; break;
    case OpType::RemoveXattr: s << "removexattr(" << a << ", " << b << ")"; break;
    case OpType::ListXattr: s << "listxattr(" << a << ", size " << op.len << ")"; break;
    case OpType::Fsync: s << (op.flags != 0 ? "fdatasync" : "fsync") << "(fd[" << op.slot << "])"; break;
    case OpType::Stat: s << (op.flags != 0 ? "lstat(" : "stat(") << a << ")"; break;
    case OpType::Fstat: s << "fstat(fd[" << op.slot << "])"; break;
    case OpType::Readdir: s << "readdir(" << a << ")"; break;
    case OpType::Fallocate: s << "fallocate(fd[" << op.slot << "], 0, " << op.off << ", " << op.len << ")"; break;
    case OpType::Mkfifo: s << "mkfifo(" << a << ", " << mode << ")"; break;
    case OpType::Remount: s << "close all fds; unmount; mount"; break;
    case OpType::Count_: break;
  }
  return s.str();
}

// Deterministic data for a write: random bytes, or runs of zeros (so that
// zero plaintext blocks, which must not be mistaken for holes, occur).
std::vector<std::uint8_t> make_data(std::uint32_t seed, std::size_t len) {
  std::vector<std::uint8_t> v(len);
  std::uint64_t x = 0x9e3779b97f4a7c15ULL ^ seed;
  const int kind = static_cast<int>(seed % 5);
  for (std::size_t i = 0; i < len; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    if (kind == 0) {
      v[i] = 0;
    } else if (kind == 1) {
      v[i] = ((i / 4096) % 2 == 0) ? 0 : static_cast<std::uint8_t>(x);
    } else {
      v[i] = static_cast<std::uint8_t>(x);
    }
  }
  return v;
}

// ---------------------------------------------------------------------------
// The generator. It does not look at the state: ops come from a small pool
// of paths and names, so that most ops meet existing entries, and the
// sequence depends on the seed alone (which makes shrinking simple).

class Generator {
 public:
  Generator(std::uint64_t seed, std::string prefix, bool allow_remount)
      : rng_(seed), prefix_(std::move(prefix)), allow_remount_(allow_remount) {}

  Op next() {
    // Weights per op type (per mille), in OpType order.
    static const int kWeights[] = {
        60,  // create
        60,  // open
        45,  // close
        120, // write
        40,  // writepath
        90,  // read
        35,  // readpath
        35,  // truncate
        30,  // ftruncate
        60,  // rename
        20,  // link
        35,  // unlink
        30,  // mkdir
        20,  // rmdir
        20,  // symlink
        10,  // readlink
        15,  // chmod
        10,  // fchmod
        15,  // utimens
        20,  // setxattr
        20,  // getxattr
        10,  // removexattr
        10,  // listxattr
        20,  // fsync
        40,  // stat
        25,  // fstat
        20,  // readdir
        10,  // fallocate
        5,   // mkfifo
        2,   // remount
    };
    static_assert(sizeof kWeights / sizeof kWeights[0] == static_cast<size_t>(OpType::Count_));
    int total = 0;
    for (int i = 0; i < static_cast<int>(OpType::Count_); ++i) {
      if (static_cast<OpType>(i) == OpType::Remount && !allow_remount_) continue;
      total += kWeights[i];
    }
    int pick = uniform(0, total - 1);
    OpType t = OpType::Stat;
    for (int i = 0; i < static_cast<int>(OpType::Count_); ++i) {
      if (static_cast<OpType>(i) == OpType::Remount && !allow_remount_) continue;
      if (pick < kWeights[i]) {
        t = static_cast<OpType>(i);
        break;
      }
      pick -= kWeights[i];
    }
    Op op;
    op.type = t;
    op.slot = uniform(0, kSlots - 1);
    op.seed = static_cast<std::uint32_t>(rng_());
    switch (t) {
      case OpType::Create:
        op.a = file_path();
        op.flags = O_CREAT | (chance(50) ? O_WRONLY : O_RDWR) | (chance(15) ? O_EXCL : 0) |
                   (chance(20) ? O_TRUNC : 0);
        op.mode = mode();
        break;
      case OpType::Open: {
        op.a = chance(90) ? file_path() : any_path();
        int acc = uniform(0, 9);
        op.flags = acc < 3 ? O_RDONLY : acc < 5 ? O_WRONLY : O_RDWR;
        if (chance(40)) op.flags |= O_CREAT;
        if ((op.flags & O_CREAT) != 0 && chance(20)) op.flags |= O_EXCL;
        if (chance(10)) op.flags |= O_TRUNC;
        if (chance(10)) op.flags |= O_APPEND;
        if (chance(3)) op.flags |= O_DIRECTORY;
        if (chance(5)) op.flags |= O_NOFOLLOW;
        op.mode = mode();
        break;
      }
      case OpType::Write:
      case OpType::WritePath:
      case OpType::Read:
      case OpType::ReadPath:
      case OpType::Fallocate:
        op.a = file_path();
        op.off = offset();
        op.len = length();
        if (t == OpType::Fallocate && op.len == 0) op.len = 1;
        break;
      case OpType::Truncate:
      case OpType::Ftruncate:
        op.a = file_path();
        op.len = chance(15) ? 0 : offset();
        break;
      case OpType::Rename:
        op.a = any_path();
        op.b = any_path();
        op.flags = chance(70) ? 0 : chance(50) ? RENAME_NOREPLACE : RENAME_EXCHANGE;
        break;
      case OpType::Link:
        op.a = chance(85) ? file_path() : any_path();
        op.b = file_path();
        break;
      case OpType::Unlink:
        op.a = chance(90) ? file_path() : any_path();
        break;
      case OpType::Mkdir:
      case OpType::Rmdir:
        op.a = chance(90) ? dir_path() : any_path();
        op.mode = chance(80) ? 0755 : 0700;
        break;
      case OpType::Symlink: {
        op.a = chance(80) ? file_path() : any_path();
        // Targets never contain ".." and are never absolute paths that exist,
        // so a symlink resolves inside the tree wherever it is moved.
        static const char* const kTargets[] = {"f0", "f1", "a/f2", "a/c/f3", "a", "b/f0",
                                               "/nonexistent-kmsfs-difftest/x", "dangling",
                                               "a//./f1"};
        op.b = kTargets[uniform(0, 8)];
        if (chance(10)) op.b = std::string(static_cast<size_t>(uniform(100, 1000)), 'T');
        break;
      }
      case OpType::Readlink:
        op.a = chance(80) ? file_path() : any_path();
        break;
      case OpType::Chmod:
        op.a = any_path();
        op.mode = mode();
        break;
      case OpType::Fchmod:
        op.mode = mode();
        break;
      case OpType::Utimens:
        op.a = any_path();
        op.off = 1000000000ULL + static_cast<std::uint64_t>(uniform(0, 99999999));  // atime sec
        op.len = 1000000000ULL + static_cast<std::uint64_t>(uniform(0, 99999999));  // mtime sec
        op.seed %= 1000000000U;                                                     // nsec
        op.flags = chance(20) ? AT_SYMLINK_NOFOLLOW : 0;
        break;
      case OpType::SetXattr:
        op.a = any_path();
        op.b = xattr_name();
        op.len = chance(10) ? static_cast<std::uint64_t>(uniform(200, 900)) : static_cast<std::uint64_t>(uniform(0, 64));
        op.flags = chance(70) ? 0 : chance(50) ? XATTR_CREATE : XATTR_REPLACE;
        op.mode = chance(15) ? 1 : 0;  // lsetxattr
        break;
      case OpType::GetXattr:
        op.a = any_path();
        op.b = xattr_name();
        op.len = chance(15) ? 0 : chance(10) ? 3 : 65536;
        op.mode = chance(15) ? 1 : 0;
        break;
      case OpType::RemoveXattr:
        op.a = any_path();
        op.b = xattr_name();
        break;
      case OpType::ListXattr:
        op.a = any_path();
        op.len = chance(15) ? 0 : 65536;
        break;
      case OpType::Fsync:
        op.flags = chance(30) ? 1 : 0;
        break;
      case OpType::Stat:
        op.a = any_path();
        op.flags = chance(70) ? 1 : 0;  // 1 = lstat
        break;
      case OpType::Readdir:
        op.a = chance(80) ? dir_prefix_path() : any_path();
        break;
      case OpType::Mkfifo:
        op.a = file_path();
        op.mode = 0644;
        break;
      default:
        break;
    }
    return op;
  }

 private:
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool chance(int percent) { return uniform(0, 99) < percent; }

  std::string dir_prefix() {
    static const char* const kDirs[] = {"", "", "a/", "b/", "a/c/", "b/a/"};
    return prefix_ + kDirs[uniform(0, 5)];
  }
  std::string dir_prefix_path() {
    std::string d = dir_prefix();
    if (d.empty()) return ".";
    return d.substr(0, d.size() - 1);
  }
  std::string file_name() {
    // Two long names: with encrypted names they go through side files.
    if (chance(8)) return std::string(200, 'L') + (chance(50) ? "1" : "2");
    static const char* const kNames[] = {"f0", "f1", "f2", "f3", "f4"};
    return kNames[uniform(0, 4)];
  }
  std::string file_path() { return dir_prefix() + file_name(); }
  std::string dir_path() {
    static const char* const kNames[] = {"a", "b", "c", "d"};
    return dir_prefix() + kNames[uniform(0, 3)];
  }
  std::string any_path() { return chance(65) ? file_path() : dir_path(); }
  unsigned mode() {
    static const unsigned kModes[] = {0644, 0644, 0600, 0755, 0444, 0000, 0640, 04755, 01777};
    return kModes[uniform(0, 8)];
  }
  std::string xattr_name() {
    static const char* const kNames[] = {"user.a", "user.bb", "user.ccccccccccccccccccccccccccc",
                                         "user.d", "trusted.x", "security.y"};
    // trusted.* and security.* are refused by design (fs/filesystem.cpp:
    // they would be interpreted by the backing filesystem): --strict only.
    return kNames[uniform(0, chance(95) || !g_strict ? 3 : 5)];
  }
  std::uint64_t offset() {
    switch (uniform(0, 9)) {
      case 0: return 0;
      case 1:
      case 2: return static_cast<std::uint64_t>(uniform(0, 20000));
      case 3:
      case 4: return static_cast<std::uint64_t>(uniform(0, 12)) * 4096 + static_cast<std::uint64_t>(uniform(-3, 3) + 3) - 3;
      case 5:
      case 6: return static_cast<std::uint64_t>(uniform(0, 120000));
      case 7: return static_cast<std::uint64_t>(uniform(0, 4)) * 4096;
      case 8: return static_cast<std::uint64_t>(uniform(0, 300000));
      default: return static_cast<std::uint64_t>(uniform(1 << 20, 3 << 20));  // sparse
    }
  }
  std::uint64_t length() {
    switch (uniform(0, 9)) {
      case 0:
      case 1:
      case 2: return static_cast<std::uint64_t>(uniform(1, 64));
      case 3:
      case 4: return static_cast<std::uint64_t>(uniform(4090, 4100));
      case 5:
      case 6: return static_cast<std::uint64_t>(uniform(1, 3 * 4096));
      case 7: return static_cast<std::uint64_t>(uniform(1, 65536));
      case 8: return static_cast<std::uint64_t>(uniform(65536, 300000));
      default: return chance(50) ? 0 : 8192;
    }
  }

  std::mt19937_64 rng_;
  std::string prefix_;
  bool allow_remount_;
};

// ---------------------------------------------------------------------------
// Applying an op to one side

struct Outcome {
  long ret = 0;
  int err = 0;
  std::string data;  // bytes read, names listed, attributes (as text)
  bool operator==(const Outcome&) const = default;
};

std::string errname(int e) {
  if (e == 0) return "0";
  const char* n = strerrorname_np(e);
  return n != nullptr ? n : std::to_string(e);
}

std::string stat_text(const struct stat& st, bool with_size) {
  std::ostringstream s;
  s << "mode=0" << std::oct << st.st_mode << std::dec << " nlink=" << st.st_nlink;
  if (with_size) s << " size=" << st.st_size;
  // Times set explicitly by utimens (years 2001–2004) are compared; others
  // are "now" on each side and differ by the run time.
  // (Not for symlinks unless --strict: see known_difference().)
  if (st.st_mtim.tv_sec < 1104537600 && (g_strict || !S_ISLNK(st.st_mode))) s << " mtime=" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
  return s.str();
}

class Side {
 public:
  explicit Side(std::string root) : root_path_(std::move(root)) { open_root(); }
  ~Side() {
    close_all();
    if (root_ >= 0) ::close(root_);
  }
  Side(const Side&) = delete;
  Side& operator=(const Side&) = delete;

  void close_all() {
    for (auto& fd : fds_) {
      if (fd >= 0) ::close(fd);
      fd = -1;
    }
  }
  void reopen_root() {
    if (root_ >= 0) ::close(root_);
    open_root();
  }
  const std::string& root_path() const { return root_path_; }

  Outcome run(const Op& op) {
    Outcome o;
    errno = 0;
    auto done = [&](long r) {
      o.ret = r < 0 ? -1 : r;
      o.err = r < 0 ? errno : 0;
      return o;
    };
    const char* a = op.a.c_str();
    int& fd = fds_[static_cast<size_t>(op.slot)];
    switch (op.type) {
      case OpType::Create: {
        int f = ::openat(root_, a, op.flags | O_CLOEXEC | O_NONBLOCK, op.mode);
        if (f < 0) return done(-1);
        return done(::close(f));
      }
      case OpType::Open: {
        if (fd >= 0) ::close(fd);
        fd = ::openat(root_, a, op.flags | O_CLOEXEC | O_NONBLOCK, op.mode);
        return done(fd < 0 ? -1 : 0);
      }
      case OpType::Close: {
        if (fd < 0) return done(0);
        int r = ::close(fd);
        fd = -1;
        return done(r);
      }
      case OpType::Write: {
        if (fd < 0) return done(0);
        auto data = make_data(op.seed, op.len);
        return done(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(op.off)));
      }
      case OpType::WritePath: {
        int f = ::openat(root_, a, O_WRONLY | O_CLOEXEC | O_NONBLOCK);
        if (f < 0) return done(-1);
        auto data = make_data(op.seed, op.len);
        long r = ::pwrite(f, data.data(), data.size(), static_cast<off_t>(op.off));
        int e = errno;
        if (::close(f) != 0 && r >= 0) return done(-1);
        errno = e;
        return done(r);
      }
      case OpType::Read:
      case OpType::ReadPath: {
        int f = fd;
        if (op.type == OpType::ReadPath) {
          f = ::openat(root_, a, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
          if (f < 0) return done(-1);
        } else if (f < 0) {
          return done(0);
        }
        std::string buf(op.len, '\0');
        long r = ::pread(f, buf.data(), buf.size(), static_cast<off_t>(op.off));
        int e = errno;
        if (op.type == OpType::ReadPath) ::close(f);
        if (r > 0) o.data.assign(buf.data(), static_cast<size_t>(r));
        errno = e;
        return done(r);
      }
      case OpType::Truncate: {
        // truncate(2) follows symlinks relative to the process cwd: use the
        // full path.
        return done(::truncate((root_path_ + "/" + op.a).c_str(), static_cast<off_t>(op.len)));
      }
      case OpType::Ftruncate:
        if (fd < 0) return done(0);
        return done(::ftruncate(fd, static_cast<off_t>(op.len)));
      case OpType::Rename:
        return done(::renameat2(root_, a, root_, op.b.c_str(), static_cast<unsigned>(op.flags)));
      case OpType::Link:
        return done(::linkat(root_, a, root_, op.b.c_str(), 0));
      case OpType::Unlink:
        return done(::unlinkat(root_, a, 0));
      case OpType::Mkdir:
        return done(::mkdirat(root_, a, op.mode));
      case OpType::Rmdir:
        return done(::unlinkat(root_, a, AT_REMOVEDIR));
      case OpType::Symlink:
        return done(::symlinkat(op.b.c_str(), root_, a));
      case OpType::Readlink: {
        char buf[4096];
        long r = ::readlinkat(root_, a, buf, sizeof buf);
        if (r > 0) o.data.assign(buf, static_cast<size_t>(r));
        return done(r);
      }
      case OpType::Chmod:
        return done(::fchmodat(root_, a, op.mode, 0));
      case OpType::Fchmod:
        if (fd < 0) return done(0);
        return done(::fchmod(fd, op.mode));
      case OpType::Utimens: {
        struct timespec ts[2];
        ts[0].tv_sec = static_cast<time_t>(op.off);
        ts[0].tv_nsec = op.seed;
        ts[1].tv_sec = static_cast<time_t>(op.len);
        ts[1].tv_nsec = op.seed;
        return done(::utimensat(root_, a, ts, op.flags));
      }
      case OpType::SetXattr: {
        auto v = make_data(op.seed, op.len);
        const std::string p = root_path_ + "/" + op.a;
        return done(op.mode != 0 ? ::lsetxattr(p.c_str(), op.b.c_str(), v.data(), v.size(), op.flags)
                                 : ::setxattr(p.c_str(), op.b.c_str(), v.data(), v.size(), op.flags));
      }
      case OpType::GetXattr: {
        std::string buf(op.len, '\0');
        const std::string p = root_path_ + "/" + op.a;
        long r = op.mode != 0 ? ::lgetxattr(p.c_str(), op.b.c_str(), buf.data(), buf.size())
                              : ::getxattr(p.c_str(), op.b.c_str(), buf.data(), buf.size());
        if (r > 0 && op.len > 0) o.data.assign(buf.data(), static_cast<size_t>(r));
        return done(r);
      }
      case OpType::RemoveXattr:
        return done(::removexattr((root_path_ + "/" + op.a).c_str(), op.b.c_str()));
      case OpType::ListXattr: {
        std::string buf(op.len, '\0');
        long r = ::listxattr((root_path_ + "/" + op.a).c_str(), buf.data(), buf.size());
        if (r > 0 && op.len > 0) {
          // Order is the backing filesystem's business: compare as a set.
          std::vector<std::string> names;
          for (size_t i = 0; i < static_cast<size_t>(r);) {
            names.emplace_back(buf.c_str() + i);
            i += names.back().size() + 1;
          }
          std::sort(names.begin(), names.end());
          for (auto& n : names) o.data += n + ",";
        }
        return done(r);
      }
      case OpType::Fsync:
        if (fd < 0) return done(0);
        return done(op.flags != 0 ? ::fdatasync(fd) : ::fsync(fd));
      case OpType::Stat:
      case OpType::Fstat: {
        struct stat st {};
        int r = 0;
        if (op.type == OpType::Fstat) {
          if (fd < 0) return done(0);
          r = ::fstat(fd, &st);
        } else {
          r = ::fstatat(root_, a, &st, op.flags != 0 ? AT_SYMLINK_NOFOLLOW : 0);
        }
        if (r == 0) o.data = stat_text(st, !S_ISDIR(st.st_mode));
        return done(r);
      }
      case OpType::Readdir: {
        int dfd = ::openat(root_, a, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0) return done(-1);
        DIR* d = ::fdopendir(dfd);
        if (d == nullptr) {
          ::close(dfd);
          return done(-1);
        }
        std::vector<std::string> names;
        while (dirent* e = ::readdir(d)) {
          names.push_back(std::string(e->d_name) + ":" + std::to_string(e->d_type));
        }
        ::closedir(d);
        std::sort(names.begin(), names.end());
        for (auto& n : names) o.data += n + ",";
        return done(0);
      }
      case OpType::Fallocate:
        if (fd < 0) return done(0);
        return done(::fallocate(fd, 0, static_cast<off_t>(op.off), static_cast<off_t>(op.len)));
      case OpType::Mkfifo:
        return done(::mknodat(root_, a, S_IFIFO | op.mode, 0));
      case OpType::Remount:  // handled by the runner
      case OpType::Count_:
        break;
    }
    return o;
  }

 private:
  void open_root() {
    root_ = ::open(root_path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_ < 0) throw std::runtime_error("cannot open " + root_path_ + ": " + std::strerror(errno));
  }
  std::string root_path_;
  int root_ = -1;
  std::array<int, kSlots> fds_{-1, -1, -1, -1, -1, -1};
};

std::string outcome_text(const Outcome& o) {
  std::string s = "ret=" + std::to_string(o.ret) + " errno=" + errname(o.err);
  if (!o.data.empty()) {
    bool printable = std::all_of(o.data.begin(), o.data.end(), [](char c) { return c >= 32 && c < 127; });
    if (printable && o.data.size() <= 300) {
      s += " data=\"" + o.data + "\"";
    } else {
      s += " data=" + std::to_string(o.data.size()) + " bytes";
    }
  }
  return s;
}

std::string outcome_diff(const Outcome& k, const Outcome& p) {
  std::string s = "kmsfs: " + outcome_text(k) + "\n    plain: " + outcome_text(p);
  if (k.ret == p.ret && k.err == p.err && k.data.size() == p.data.size()) {
    for (size_t i = 0; i < k.data.size(); ++i) {
      if (k.data[i] != p.data[i]) {
        s += "\n    first differing byte at +" + std::to_string(i);
        break;
      }
    }
  }
  return s;
}

// Differences that are known and documented limits of kmsfs, not bugs to
// hunt again on every run; --strict reports them too. Returns the name of
// the limit, or nullptr.
std::atomic<std::uint64_t> g_known_hits{0};

const char* known_difference(const Op& op, const Outcome& k, const Outcome& p, const std::string& plain_root) {
  if (g_strict) return nullptr;
  struct stat st {};
  const bool plain_is_symlink =
      ::fstatat(AT_FDCWD, (plain_root + "/" + op.a).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
  // fs/filesystem.cpp setattr: "no race-free way to set a symlink's own
  // times by fd" -- lutimes on a symlink is EPERM in kmsfs.
  if (op.type == OpType::Utimens && (op.flags & AT_SYMLINK_NOFOLLOW) != 0 && k.err == EPERM &&
      p.ret == 0 && plain_is_symlink) {
    return "utimens-on-symlink";
  }
  return nullptr;
}

// ---------------------------------------------------------------------------
// Tree comparison

struct TreeEntry {
  std::string desc;     // type, mode, nlink, size, target
  std::string content;  // file bytes
  bool operator==(const TreeEntry&) const = default;
};

void walk(const std::string& root, const std::string& rel, std::map<std::string, TreeEntry>& out) {
  const std::string dir = rel.empty() ? root : root + "/" + rel;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    out[rel + "/"] = {std::string("opendir failed: ") + errname(errno), ""};
    return;
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.emplace_back(e->d_name);
  }
  ::closedir(d);
  for (const auto& n : names) {
    const std::string r = rel.empty() ? n : rel + "/" + n;
    const std::string p = root + "/" + r;
    struct stat st {};
    TreeEntry te;
    if (::lstat(p.c_str(), &st) != 0) {
      out[r] = {std::string("lstat failed: ") + errname(errno), ""};
      continue;
    }
    te.desc = stat_text(st, !S_ISDIR(st.st_mode));
    if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t k = ::readlink(p.c_str(), buf, sizeof buf);
      te.desc += " -> " + (k >= 0 ? std::string(buf, static_cast<size_t>(k)) : "readlink failed: " + errname(errno));
    }
    if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)) {
      char names_buf[65536];
      ssize_t k = ::llistxattr(p.c_str(), names_buf, sizeof names_buf);
      std::vector<std::string> xs;
      for (ssize_t i = 0; i < k;) {
        xs.emplace_back(names_buf + i);
        i += static_cast<ssize_t>(xs.back().size()) + 1;
      }
      std::sort(xs.begin(), xs.end());
      for (const auto& x : xs) {
        char v[65536];
        ssize_t vl = ::lgetxattr(p.c_str(), x.c_str(), v, sizeof v);
        te.desc += " xattr " + x + "=" + (vl >= 0 ? std::to_string(std::hash<std::string>{}(std::string(v, static_cast<size_t>(vl))))
                                                  : errname(errno));
      }
    }
    if (S_ISREG(st.st_mode)) {
      int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
      if (fd < 0) {
        te.content = "open failed: " + errname(errno);
      } else {
        char buf[65536];
        while (true) {
          ssize_t k = ::read(fd, buf, sizeof buf);
          if (k < 0) {
            te.content += "<read failed: " + errname(errno) + ">";
            break;
          }
          if (k == 0) break;
          te.content.append(buf, static_cast<size_t>(k));
        }
        ::close(fd);
      }
    }
    out[r] = te;
    if (S_ISDIR(st.st_mode)) walk(root, r, out);
  }
}

// "" when equal, else a description of the first differences.
std::string compare_trees(const std::string& kroot, const std::string& proot, const std::string& sub) {
  std::map<std::string, TreeEntry> k, p;
  walk(kroot, sub, k);
  walk(proot, sub, p);
  std::string diff;
  int shown = 0;
  std::set<std::string> all;
  for (auto& [n, e] : k) all.insert(n);
  for (auto& [n, e] : p) all.insert(n);
  for (const auto& n : all) {
    auto ki = k.find(n);
    auto pi = p.find(n);
    std::string line;
    if (ki == k.end()) {
      line = "only in plain: " + short_name(n) + " " + pi->second.desc;
    } else if (pi == p.end()) {
      line = "only in kmsfs: " + short_name(n) + " " + ki->second.desc;
    } else if (ki->second.desc != pi->second.desc) {
      line = short_name(n) + ": kmsfs " + ki->second.desc + " / plain " + pi->second.desc;
    } else if (ki->second.content != pi->second.content) {
      const auto& kc = ki->second.content;
      const auto& pc = pi->second.content;
      size_t i = 0;
      while (i < kc.size() && i < pc.size() && kc[i] == pc[i]) ++i;
      line = short_name(n) + ": contents differ from byte " + std::to_string(i) + " (sizes " +
             std::to_string(kc.size()) + " / " + std::to_string(pc.size()) + ")";
    }
    if (!line.empty() && shown++ < 10) diff += "    " + line + "\n";
  }
  return diff;
}

// ---------------------------------------------------------------------------
// One environment: a TempKms home, volumes made on demand.

struct Config {
  std::uint64_t seed = 1;
  std::size_t ops = 2000;
  int threads = 0;
  int soak_seconds = 0;
  long max_rss_growth_mib = 64;
  long max_fd_growth = 16;
  std::string mount_opts;
  bool plaintext_names = false;
  std::string replay;
  int shrink_seconds = 300;
  bool verbose = false;
  bool keep_logs = false;  // --keep-logs: the servers' logs stay (paths printed)
};

std::atomic<std::uint64_t> g_progress{0};
std::atomic<bool> g_stop_watchdog{false};

// The last lines of a server log, indented, for a failure message: CI keeps
// only the test's output, not the log file.
std::string log_tail(const std::string& path, std::size_t max_lines = 80) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  std::string out;
  for (std::size_t i = lines.size() > max_lines ? lines.size() - max_lines : 0; i < lines.size(); ++i) {
    out += "  | " + lines[i] + "\n";
  }
  return out;
}

class Env {
 public:
  explicit Env(const Config& c) : cfg_(c) {}

  struct Volume {
    std::string cipher, mnt, plain, log;
    std::unique_ptr<kt::ForegroundMount> mount;
  };

  std::unique_ptr<Volume> make_volume() {
    auto v = std::make_unique<Volume>();
    const std::string base = kms_.root() + "/v" + std::to_string(++count_);
    v->cipher = base + ".cipher";
    v->mnt = base + ".mnt";
    v->plain = base + ".plain";
    v->log = base + ".log";
    ::mkdir(v->mnt.c_str(), 0755);
    ::mkdir(v->plain.c_str(), 0755);
    std::vector<std::string> argv{kt::bin("kmsfs"), "init", v->cipher};
    if (cfg_.plaintext_names) argv.push_back("--plaintext-names");
    auto r = kt::run_command(argv);
    if (r.exit_code != 0) throw std::runtime_error("kmsfs init failed: " + r.err);
    std::vector<std::string> margs;
    if (!cfg_.mount_opts.empty()) margs = {"-o", cfg_.mount_opts};
    v->mount = std::make_unique<kt::ForegroundMount>(v->cipher, v->mnt, margs, v->log);
    v->mount->start();
    return v;
  }

  // Unmounts and removes the volume; the server's exit status (a sanitizer
  // report makes it non-zero), with its log printed when it is not 0.
  int drop_volume(std::unique_ptr<Volume> v) {
    if (!v) return 0;
    const int code = v->mount->stop();
    if (code != 0) {
      std::cerr << "kmsfs server exited with " << code << " at unmount; its log (" << v->log << "):\n"
                << log_tail(v->log);
    }
    kt::remove_tree(v->cipher);
    kt::remove_tree(v->plain);
    if (cfg_.keep_logs) {
      const std::string kept = "/tmp/kmsfs-difftest-" + std::to_string(::getpid()) + "-" +
                               v->log.substr(v->log.rfind('/') + 1);
      if (std::rename(v->log.c_str(), kept.c_str()) == 0 || kt::run_command({"/bin/cp", v->log, kept}).exit_code == 0) {
        std::cerr << "kmsfs server log kept: " << kept << "\n";
      }
    }
    ::unlink(v->log.c_str());
    ::rmdir(v->mnt.c_str());
    return code;
  }

 private:
  const Config& cfg_;
  kt::TempKms kms_;
  int count_ = 0;
};

struct Failure {
  std::size_t index = 0;  // op index (== ops.size() for a final-tree difference)
  OpType type = OpType::Stat;
  std::string message;
};

// Runs `ops` on both sides in `v`. Stops at the first difference. With
// `final_check`, compares the trees under `sub` at the end, and again after a
// remount (data read back from ciphertext).
std::optional<Failure> run_ops(Env::Volume& v, const std::vector<Op>& ops, const std::string& sub,
                               bool final_check, std::atomic<bool>* stop = nullptr,
                               bool remount_check = true) {
  auto ks = std::make_unique<Side>(v.mnt);
  auto ps = std::make_unique<Side>(v.plain);
  for (std::size_t i = 0; i < ops.size(); ++i) {
    if (stop != nullptr && stop->load()) return std::nullopt;
    g_progress.fetch_add(1, std::memory_order_relaxed);
    const Op& op = ops[i];
    if (op.type == OpType::Remount) {
      ks->close_all();
      ps->close_all();
      ks.reset();
      int code = v.mount->stop();
      if (code != 0) {
        return Failure{i, op.type, "kmsfs exited with " + std::to_string(code) + " at unmount; its log:\n" + log_tail(v.log)};
      }
      v.mount->start();
      ks = std::make_unique<Side>(v.mnt);
      continue;
    }
    // truncate(2) to the size a file already has: POSIX updates st_mtime only
    // "if the file size is changed"; ext4 updates it anyway, tmpfs does not,
    // and under the FUSE writeback cache the kernel keeps its own mtime (no
    // ATTR_MTIME for truncate(2), unlike ftruncate(2)). Unspecified, so the
    // kmsfs file gets the plain file's mtime afterwards (not with --strict).
    struct stat before {};
    const bool same_size_truncate =
        !g_strict && op.type == OpType::Truncate && ::stat((v.plain + "/" + op.a).c_str(), &before) == 0 &&
        S_ISREG(before.st_mode) && static_cast<std::uint64_t>(before.st_size) == op.len;
    Outcome k = ks->run(op);
    Outcome p = ps->run(op);
    if (same_size_truncate && k == p && p.ret == 0) {
      struct stat ps_st {};
      struct stat ks_st {};
      if (::stat((v.plain + "/" + op.a).c_str(), &ps_st) == 0 && ::stat((v.mnt + "/" + op.a).c_str(), &ks_st) == 0 &&
          (ps_st.st_mtim.tv_sec != ks_st.st_mtim.tv_sec || ps_st.st_mtim.tv_nsec != ks_st.st_mtim.tv_nsec)) {
        const struct timespec t[2] = {{0, UTIME_OMIT}, ps_st.st_mtim};
        (void)::utimensat(AT_FDCWD, (v.mnt + "/" + op.a).c_str(), t, 0);
        g_known_hits++;
      }
    }
    if (!(k == p)) {
      if (const char* known = known_difference(op, k, p, v.plain); known != nullptr) {
        g_known_hits++;
        continue;
      }
      return Failure{i, op.type, outcome_diff(k, p)};
    }
  }
  if (!final_check) return std::nullopt;
  ks->close_all();
  ps->close_all();
  if (auto d = compare_trees(v.mnt, v.plain, sub); !d.empty()) {
    return Failure{ops.size(), OpType::Count_, "final trees differ:\n" + d};
  }
  // The soak keeps one server for its whole run (its RSS and fds are what
  // it watches): no remount there.
  if (!remount_check) return std::nullopt;
  ks.reset();
  int code = v.mount->stop();
  if (code != 0) {
    return Failure{ops.size(), OpType::Count_, "kmsfs exited with " + std::to_string(code) + " at unmount; its log:\n" + log_tail(v.log)};
  }
  v.mount->start();
  if (auto d = compare_trees(v.mnt, v.plain, sub); !d.empty()) {
    return Failure{ops.size(), OpType::Count_, "trees differ after remount:\n" + d};
  }
  return std::nullopt;
}

std::vector<Op> generate(std::uint64_t seed, std::size_t n, const std::string& prefix, bool remount) {
  Generator g(seed, prefix, remount);
  std::vector<Op> ops;
  ops.reserve(n);
  for (std::size_t i = 0; i < n; ++i) ops.push_back(g.next());
  return ops;
}

void print_ops(const std::vector<Op>& ops, std::ostream& out) {
  for (std::size_t i = 0; i < ops.size(); ++i) out << "    " << i << ": " << describe(ops[i]) << "\n";
}

// Delta debugging (Zeller's ddmin) over the op sequence: the smallest subset
// that still fails in the same way (same op type at the failing op, or a
// final-tree difference), each trial on a fresh volume.
std::vector<Op> shrink(Env& env, std::vector<Op> ops, const Failure& original, const Config& cfg) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(cfg.shrink_seconds);
  int trials = 0;
  auto fails = [&](const std::vector<Op>& cand) -> bool {
    ++trials;
    auto v = env.make_volume();
    auto f = run_ops(*v, cand, "", true);
    env.drop_volume(std::move(v));
    if (!f) return false;
    if (original.type == OpType::Count_) return true;
    return f->type == original.type && f->index + 1 == cand.size();
  };
  // The failing op last; what follows it never matters.
  if (original.index < ops.size()) ops.resize(original.index + 1);
  std::size_t n = 2;
  while (ops.size() >= 2 && std::chrono::steady_clock::now() < deadline) {
    // Keep the last op (the failing one) in every candidate.
    const std::size_t body = original.type == OpType::Count_ ? ops.size() : ops.size() - 1;
    if (body == 0) break;
    n = std::min(n, body);
    const std::size_t chunk = (body + n - 1) / n;
    bool reduced = false;
    for (std::size_t start = 0; start < body && std::chrono::steady_clock::now() < deadline; start += chunk) {
      std::vector<Op> cand;
      for (std::size_t i = 0; i < ops.size(); ++i) {
        if (i < start || i >= std::min(body, start + chunk)) cand.push_back(ops[i]);
      }
      if (fails(cand)) {
        ops = std::move(cand);
        n = std::max<std::size_t>(n - 1, 2);
        reduced = true;
        break;
      }
    }
    if (!reduced) {
      if (n >= body) break;
      n = std::min(body, n * 2);
    }
  }
  std::cerr << "  (shrinker: " << trials << " trials)\n";
  return ops;
}

void report_failure(Env& env, const Config& cfg, std::uint64_t seed, const std::vector<Op>& ops,
                    const Failure& f, bool can_shrink) {
  std::cerr << "\nDIFFERENCE (seed " << seed << ")";
  if (f.index < ops.size()) {
    std::cerr << " at op " << f.index << ": " << describe(ops[f.index]) << "\n    " << f.message << "\n";
  } else {
    std::cerr << " after " << ops.size() << " ops: " << f.message << "\n";
  }
  if (!can_shrink || cfg.shrink_seconds <= 0) {
    std::cerr << "(not shrunk) re-run: kmsfs_difftest --seed " << seed << " --ops " << cfg.ops << "\n";
    return;
  }
  std::cerr << "shrinking (up to " << cfg.shrink_seconds << " s)...\n";
  auto small = shrink(env, ops, f, cfg);
  const std::string file = "difftest-seed" + std::to_string(seed) + ".ops";
  {
    std::ofstream out(file);
    for (const auto& op : small) out << serialize(op) << "\n";
  }
  // Show the result of the minimal sequence.
  auto v = env.make_volume();
  auto again = run_ops(*v, small, "", true);
  env.drop_volume(std::move(v));
  std::cerr << "minimal reproduction (" << small.size() << " ops; op file " << file
            << ", run with --replay " << file << "):\n";
  print_ops(small, std::cerr);
  if (again) std::cerr << "  -> " << again->message << "\n";
}

// ---------------------------------------------------------------------------
// Shared-file mode: writers put whole, tagged 4 KiB blocks at aligned
// offsets of one file while a reader reads (and must never get an error).
// At the end every written block holds one intact version written to it
// (no torn block), unwritten blocks are holes, and the size is the largest
// end written.

constexpr std::size_t kBlk = 4096;
constexpr std::size_t kSharedBlocks = 64;

void fill_block(std::uint8_t* p, std::uint64_t tag) {
  std::uint64_t x = tag * 0x9e3779b97f4a7c15ULL + 1;
  std::memcpy(p, &tag, 8);
  for (std::size_t i = 8; i < kBlk; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
}

// 0 = hole, a tag = an intact block, nullopt = torn.
std::optional<std::uint64_t> check_block(const std::uint8_t* p) {
  if (std::all_of(p, p + kBlk, [](std::uint8_t c) { return c == 0; })) return 0;
  std::uint64_t tag = 0;
  std::memcpy(&tag, p, 8);
  std::uint8_t want[kBlk];
  fill_block(want, tag);
  if (std::memcmp(want, p, kBlk) != 0) return std::nullopt;
  return tag;
}

// `final_bytes`: the file's content at the end, for a check after remount.
std::string shared_file_test(const std::string& path, int writers, std::size_t writes_each, std::uint64_t seed,
                             std::vector<std::uint8_t>* final_bytes) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return "cannot create the shared file: " + errname(errno);
  std::mutex m;
  std::map<std::size_t, std::set<std::uint64_t>> written;  // block -> tags
  std::uint64_t max_end = 0;
  std::string error;
  std::atomic<bool> done{false};
  std::vector<std::thread> ts;
  for (int w = 0; w < writers; ++w) {
    ts.emplace_back([&, w] {
      std::mt19937_64 rng(seed * 7919 + static_cast<std::uint64_t>(w));
      std::vector<std::uint8_t> buf(4 * kBlk);
      for (std::size_t i = 0; i < writes_each; ++i) {
        const std::size_t first = rng() % kSharedBlocks;
        const std::size_t count = std::min<std::size_t>(1 + rng() % 4, kSharedBlocks - first);
        std::vector<std::uint64_t> tags;
        for (std::size_t b = 0; b < count; ++b) {
          std::uint64_t tag = (static_cast<std::uint64_t>(w + 1) << 48) | (i << 8) | b;
          tags.push_back(tag);
          fill_block(buf.data() + b * kBlk, tag);
        }
        {
          // Record before writing: a reader may see the block before pwrite returns.
          std::lock_guard l(m);
          for (std::size_t b = 0; b < count; ++b) written[first + b].insert(tags[b]);
        }
        ssize_t n = ::pwrite(fd, buf.data(), count * kBlk, static_cast<off_t>(first * kBlk));
        std::lock_guard l(m);
        if (n != static_cast<ssize_t>(count * kBlk)) {
          error = "shared pwrite returned " + std::to_string(n) + " errno " + errname(errno);
          return;
        }
        max_end = std::max<std::uint64_t>(max_end, (first + count) * kBlk);
      }
    });
  }
  std::thread reader([&] {
    std::vector<std::uint8_t> buf(8 * kBlk);
    std::mt19937_64 rng(seed);
    while (!done.load()) {
      const std::size_t first = rng() % kSharedBlocks;
      ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(first * kBlk));
      if (n < 0) {
        std::lock_guard l(m);
        error = "shared pread failed: " + errname(errno);
        return;
      }
      // Linux does not make a buffered read atomic against a concurrent
      // write of the same page (a plain ext4 file can show a half-copied
      // page too), so only a failing read (EIO: a ciphertext block that does
      // not verify) is an error here; intact blocks are checked at the end.
    }
  });
  for (auto& t : ts) t.join();
  done = true;
  reader.join();
  if (!error.empty()) {
    ::close(fd);
    return error;
  }
  struct stat st {};
  ::fstat(fd, &st);
  ::close(fd);
  if (static_cast<std::uint64_t>(st.st_size) != max_end) {
    return "shared file: size " + std::to_string(st.st_size) + ", expected " + std::to_string(max_end);
  }
  // Read back through a fresh open.
  std::vector<std::uint8_t> all(max_end);
  fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ssize_t n = fd >= 0 ? ::pread(fd, all.data(), all.size(), 0) : -1;
  if (fd >= 0) ::close(fd);
  if (n != static_cast<ssize_t>(max_end)) return "shared file: final read returned " + std::to_string(n);
  for (std::size_t b = 0; b < max_end / kBlk; ++b) {
    auto tag = check_block(all.data() + b * kBlk);
    const bool was_written = written.count(b) != 0;
    if (!tag || (*tag == 0 && was_written) || (*tag != 0 && (!was_written || written[b].count(*tag) == 0))) {
      return "shared file: block " + std::to_string(b) + " is torn, lost or foreign at the end";
    }
  }
  *final_bytes = std::move(all);
  return "";
}

// After a remount the shared file reads back exactly as it ended.
std::string shared_file_recheck(const std::string& path, const std::vector<std::uint8_t>& expected) {
  std::vector<std::uint8_t> all(expected.size() + 1);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "cannot open the shared file: " + errname(errno);
  const ssize_t n = ::pread(fd, all.data(), all.size(), 0);
  const int err = errno;
  ::close(fd);
  if (n < 0) return "shared file: read failed: " + errname(err);
  all.resize(static_cast<std::size_t>(n));
  if (all != expected) return "shared file differs from its content before the remount (" + std::to_string(n) + " bytes)";
  return "";
}

// ---------------------------------------------------------------------------

struct RoundResult {
  bool ok = true;
  std::size_t ops_run = 0;
};

// One round on `v`: single-threaded over the whole tree (with remounts), or
// `threads` workers in subtrees plus the shared-file test.
RoundResult run_round(Env& env, Env::Volume& v, const Config& cfg, std::uint64_t seed,
                      const std::string& round_prefix, bool final_check) {
  RoundResult rr;
  if (cfg.threads <= 0) {
    auto ops = generate(seed, cfg.ops, round_prefix, round_prefix.empty());
    if (!round_prefix.empty()) {
      ::mkdir((v.mnt + "/" + round_prefix).c_str(), 0755);
      ::mkdir((v.plain + "/" + round_prefix).c_str(), 0755);
    }
    auto sub = round_prefix.empty() ? "" : round_prefix.substr(0, round_prefix.size() - 1);
    auto f = run_ops(v, ops, sub, final_check, nullptr, round_prefix.empty());
    rr.ops_run = f ? f->index + 1 : ops.size();
    if (f) {
      rr.ok = false;
      report_failure(env, cfg, seed, ops, *f, round_prefix.empty());
    }
    return rr;
  }
  // Concurrent: each worker in t<i>/ with its own sequence.
  std::vector<std::vector<Op>> seqs;
  for (int t = 0; t < cfg.threads; ++t) {
    const std::string pre = round_prefix + "t" + std::to_string(t) + "/";
    ::mkdir((v.mnt + "/" + round_prefix).c_str(), 0755);
    ::mkdir((v.plain + "/" + round_prefix).c_str(), 0755);
    ::mkdir((v.mnt + "/" + pre).c_str(), 0755);
    ::mkdir((v.plain + "/" + pre).c_str(), 0755);
    seqs.push_back(generate(seed * 1000 + static_cast<std::uint64_t>(t), cfg.ops, pre, false));
  }
  std::vector<std::optional<Failure>> fails(static_cast<size_t>(cfg.threads));
  std::atomic<bool> stop{false};
  std::string shared_error;
  std::vector<std::uint8_t> shared_bytes;
  std::vector<std::thread> ws;
  for (int t = 0; t < cfg.threads; ++t) {
    ws.emplace_back([&, t] {
      auto& f = fails[static_cast<size_t>(t)];
      f = run_ops(v, seqs[static_cast<size_t>(t)], "", false, &stop);
      if (f) stop = true;
    });
  }
  std::thread shared([&] {
    shared_error = shared_file_test(v.mnt + "/" + round_prefix + "shared", cfg.threads,
                                    std::max<std::size_t>(cfg.ops / 8, 50), seed, &shared_bytes);
  });
  for (auto& w : ws) w.join();
  shared.join();
  for (int t = 0; t < cfg.threads; ++t) {
    const auto& f = fails[static_cast<size_t>(t)];
    const auto& ops = seqs[static_cast<size_t>(t)];
    rr.ops_run += f ? f->index + 1 : ops.size();
    if (f) {
      rr.ok = false;
      std::cerr << "\nDIFFERENCE in thread " << t << " (seed " << seed << ", thread seed "
                << seed * 1000 + static_cast<std::uint64_t>(t) << ") at op " << f->index << ": "
                << describe(ops[f->index]) << "\n    " << f->message << "\n";
      // If it reproduces alone, shrink it there.
      auto sv = env.make_volume();
      ::mkdir((sv->mnt + "/" + round_prefix).c_str(), 0755);
      ::mkdir((sv->plain + "/" + round_prefix).c_str(), 0755);
      ::mkdir((sv->mnt + "/" + round_prefix + "t" + std::to_string(t)).c_str(), 0755);
      ::mkdir((sv->plain + "/" + round_prefix + "t" + std::to_string(t)).c_str(), 0755);
      auto alone = run_ops(*sv, std::vector<Op>(ops.begin(), ops.begin() + static_cast<long>(f->index) + 1), "", false);
      env.drop_volume(std::move(sv));
      std::cerr << (alone ? "  reproduces single-threaded (ops run in subtree "
                          : "  does NOT reproduce single-threaded (a concurrency bug); ops of subtree ")
                << round_prefix << "t" << t << "/:\n";
      std::vector<Op> head(ops.begin(), ops.begin() + static_cast<long>(f->index) + 1);
      if (head.size() > 60) {
        std::cerr << "    (" << head.size() - 60 << " earlier ops not shown)\n";
        head.erase(head.begin(), head.end() - 60);
      }
      print_ops(head, std::cerr);
    }
  }
  if (!shared_error.empty()) {
    rr.ok = false;
    std::cerr << "\nSHARED-FILE FAILURE (seed " << seed << ", " << cfg.threads << " writers): " << shared_error << "\n";
  }
  if (rr.ok && final_check) {
    if (auto d = compare_trees(v.mnt, v.plain, round_prefix.empty() ? "" : round_prefix.substr(0, round_prefix.size() - 1));
        !d.empty()) {
      // The shared file exists only in the mount.
      std::string filtered;
      std::istringstream in(d);
      for (std::string line; std::getline(in, line);) {
        if (line.find("\"shared\"") == std::string::npos && line.find("/shared\"") == std::string::npos) filtered += line + "\n";
      }
      if (!filtered.empty()) {
        rr.ok = false;
        std::cerr << "\nDIFFERENCE (seed " << seed << ", threads): final trees differ:\n" << filtered;
      }
    }
  }
  // What the threads left on disk, not only in the server's memory: remount
  // and compare again, the shared file included (not in the soak, which
  // keeps one server to watch its RSS and fds).
  if (rr.ok && final_check && cfg.soak_seconds == 0) {
    const int code = v.mount->stop();
    if (code != 0) {
      rr.ok = false;
      std::cerr << "\nkmsfs exited with " << code << " at unmount after the threads (seed " << seed << "); its log:\n"
                << log_tail(v.log);
      return rr;
    }
    v.mount->start();
    const std::string sub = round_prefix.empty() ? "" : round_prefix.substr(0, round_prefix.size() - 1);
    std::string filtered;
    std::istringstream in(compare_trees(v.mnt, v.plain, sub));
    for (std::string line; std::getline(in, line);) {
      if (line.find("\"shared\"") == std::string::npos && line.find("/shared\"") == std::string::npos) filtered += line + "\n";
    }
    if (!filtered.empty()) {
      rr.ok = false;
      std::cerr << "\nDIFFERENCE (seed " << seed << ", threads): trees differ after remount:\n" << filtered;
    }
    if (auto e = shared_file_recheck(v.mnt + "/" + round_prefix + "shared", shared_bytes); !e.empty()) {
      rr.ok = false;
      std::cerr << "\nSHARED-FILE FAILURE after remount (seed " << seed << "): " << e << "\n";
    }
  }
  return rr;
}

int usage(const char* msg) {
  if (msg != nullptr) std::cerr << "kmsfs_difftest: " << msg << "\n";
  std::cerr << "usage: kmsfs_difftest [--seed S] [--ops N] [--threads T] [--soak SECONDS]\n"
               "       [--max-rss-growth-mib M] [--max-fd-growth N] [--mount-opts O]\n"
               "       [--plaintext-names] [--replay FILE] [--shrink-seconds S] [--strict] [-v]\n";
  return 2;
}

int run(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--seed") cfg.seed = std::stoull(val());
    else if (a == "--ops") cfg.ops = std::stoull(val());
    else if (a == "--threads") cfg.threads = std::stoi(val());
    else if (a == "--soak") cfg.soak_seconds = std::stoi(val());
    else if (a == "--max-rss-growth-mib") cfg.max_rss_growth_mib = std::stol(val());
    else if (a == "--max-fd-growth") cfg.max_fd_growth = std::stol(val());
    else if (a == "--mount-opts") cfg.mount_opts = val();
    else if (a == "--plaintext-names") cfg.plaintext_names = true;
    else if (a == "--replay") cfg.replay = val();
    else if (a == "--shrink-seconds") cfg.shrink_seconds = std::stoi(val());
    else if (a == "-v") cfg.verbose = true;
    else if (a == "--strict") g_strict = true;
    else if (a == "--keep-logs") cfg.keep_logs = true;
    else if (a == "-h" || a == "--help") return usage(nullptr), 0;
    else return usage(("unknown option " + a).c_str());
  }
  ::signal(SIGPIPE, SIG_IGN);

  // A hang (a deadlock in the server) must fail the run, not the CI job.
  std::thread watchdog([] {
    std::uint64_t last = g_progress.load();
    int still = 0;
    while (!g_stop_watchdog.load()) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      std::uint64_t now = g_progress.load();
      still = now == last ? still + 1 : 0;
      last = now;
      if (still >= 120) {
        std::cerr << "kmsfs_difftest: no progress for 120 s: the mount hangs (see the seed above)\n";
        std::_Exit(3);
      }
    }
  });
  struct JoinWatchdog {
    std::thread& t;
    ~JoinWatchdog() {
      g_stop_watchdog = true;
      t.join();
    }
  } join_watchdog{watchdog};

  Env env(cfg);
  const auto t0 = std::chrono::steady_clock::now();

  if (!cfg.replay.empty()) {
    std::ifstream in(cfg.replay);
    if (!in) return usage(("cannot read " + cfg.replay).c_str());
    std::vector<Op> ops;
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      auto op = deserialize(line);
      if (!op) return usage(("bad op line: " + line).c_str());
      ops.push_back(*op);
    }
    print_ops(ops, std::cout);
    auto v = env.make_volume();
    auto f = run_ops(*v, ops, "", true);
    env.drop_volume(std::move(v));
    if (f) {
      std::cout << "DIFFERENCE at op " << f->index << ": " << f->message << "\n";
      return 1;
    }
    std::cout << "no difference\n";
    return 0;
  }

  auto v = env.make_volume();
  std::size_t total_ops = 0;
  bool ok = true;
  if (cfg.soak_seconds <= 0) {
    auto rr = run_round(env, *v, cfg, cfg.seed, "", true);
    total_ops += rr.ops_run;
    ok = rr.ok;
  } else {
    // Rounds with fresh seeds in fresh subtrees, each removed afterwards;
    // the server's RSS and fds are sampled after every round. The baseline
    // is taken after a warm-up of 10 % of the time (caches filled).
    const auto end = t0 + std::chrono::seconds(cfg.soak_seconds);
    const auto warm = t0 + std::chrono::seconds(std::max(5, cfg.soak_seconds / 10));
    long base_rss = -1, base_fds = -1, peak_rss = 0, peak_fds = 0;
    for (std::uint64_t round = 0; std::chrono::steady_clock::now() < end; ++round) {
      const std::string pre = "r" + std::to_string(round) + "/";
      auto rr = run_round(env, *v, cfg, cfg.seed + round, pre, true);
      total_ops += rr.ops_run;
      kt::remove_tree(v->mnt + "/" + pre);
      kt::remove_tree(v->plain + "/" + pre);
      if (!rr.ok) {
        ok = false;
        break;
      }
      const pid_t pid = v->mount->pid();
      const long rss = kt::proc_rss_kib(pid);
      const long fds = kt::proc_fd_count(pid);
      if (rss < 0 || fds < 0) {
        std::cerr << "soak: the kmsfs server (pid " << pid << ") is gone\n";
        ok = false;
        break;
      }
      peak_rss = std::max(peak_rss, rss);
      peak_fds = std::max(peak_fds, fds);
      if (base_rss < 0 && std::chrono::steady_clock::now() >= warm) {
        base_rss = rss;
        base_fds = fds;
      }
      if (cfg.verbose) std::cerr << "soak round " << round << ": rss " << rss << " KiB, fds " << fds << "\n";
      if (base_rss >= 0 && (rss - base_rss > cfg.max_rss_growth_mib * 1024 || fds - base_fds > cfg.max_fd_growth)) {
        std::cerr << "soak: kmsfs grows: rss " << base_rss << " -> " << rss << " KiB, fds " << base_fds
                  << " -> " << fds << " after round " << round << " (seed " << cfg.seed + round << ")\n";
        ok = false;
        break;
      }
    }
    std::cout << "soak: rss baseline " << base_rss << " KiB, peak " << peak_rss << " KiB; fds baseline "
              << base_fds << ", peak " << peak_fds << "\n";
  }
  if (env.drop_volume(std::move(v)) != 0) ok = false;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "kmsfs_difftest: seed " << cfg.seed << ", " << total_ops << " ops"
            << (cfg.threads > 0 ? " in " + std::to_string(cfg.threads) + " threads (+ shared-file writers)" : "")
            << ", " << secs << " s: " << (ok ? "no difference" : "DIFFERENCE");
  if (g_known_hits > 0) std::cout << " (" << g_known_hits << " known differences skipped; --strict shows them)";
  std::cout << "\n";
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) noexcept {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kmsfs_difftest: " << e.what() << "\n";
    return 3;
  }
}
