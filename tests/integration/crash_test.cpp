// Crash tests: kill -9 of the serving kmsfs process at random moments while a
// worker writes, creates, renames (also across directories), truncates and
// unlinks files, some with names too long for one backing name; after the
// remount every file whose last change was fsynced (and not touched since)
// reads back byte for byte, every block of an in-flight file that no
// in-flight write reached still holds its fsynced bytes, nothing unknown
// appears, and only files that were in flight at the kill may differ.
// `kmsfs fsck` is run after each kill: damage only in in-flight files, and
// `--repair` makes the volume clean again.
//
// KMSFS_CRASH_ITERATIONS sets the number of kills (default 200).
//
// The kmsd half (Crash.KillNineOfKmsdDuringWorkLosesNothing): the same
// worker on a mount that reaches its KMS through kmsd, while kmsd is killed
// with SIGKILL and restarted over and over; the mount is never killed. See
// the comment above that test.

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/integration/kmsd_fixture.h"
#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

int iterations() {
  const char* env = std::getenv("KMSFS_CRASH_ITERATIONS");
  return env != nullptr ? std::max(1, std::atoi(env)) : 200;
}

bool fsck_available() {
  auto r = run_command({bin("kmsfs"), "fsck", "--help"});
  return r.exit_code == 0;
}

// What the worker knows: the content of each file as last made durable by
// fsync, and which names were touched after that (in flight at the kill).
struct Model {
  std::mutex m;
  std::map<std::string, std::vector<std::uint8_t>> durable;  // name -> bytes
  std::set<std::string> in_flight;                           // unknown state
  // In-flight files whose fsynced bytes (durable) were changed after the
  // sync only by pwrites at these [offset, offset + length) ranges: every
  // block those ranges do not reach must still read back as fsynced.
  std::map<std::string, std::vector<std::pair<std::size_t, std::size_t>>> partial;
  // `name` is known again (the caller holds m).
  void settle(const std::string& name) {
    in_flight.erase(name);
    partial.erase(name);
  }
  std::vector<std::string> history;  // what the worker did, for a failure message
  // Failures that must not happen (a kmsd kill never fails an operation on
  // an open file, nor any read of a file's last fsynced bytes).
  std::vector<std::string> unexpected;
  int refused_opens = 0;  // opens and creates refused with EIO while kmsd was down
  void note(std::string line) {
    std::lock_guard l(m);
    history.push_back(std::move(line));
  }
  // The operations that touched `name` and the mount/kill markers, oldest
  // first (the caller holds m).
  std::string history_of(const std::string& name) const {
    std::string out;
    for (const auto& h : history) {
      bool hit = h.rfind("---", 0) == 0;
      for (std::size_t b = 0, e = 0; !hit && b < h.size(); b = e + 1) {
        e = h.find(' ', b);
        if (e == std::string::npos) e = h.size();
        hit = h.compare(b, e - b, name) == 0;
      }
      if (hit) out += "    " + h + "\n";
    }
    return out;
  }
  // The last `n` lines of the history (the caller holds m).
  std::string recent(std::size_t n) const {
    std::string out;
    for (std::size_t i = history.size() > n ? history.size() - n : 0; i < history.size(); ++i) {
      out += "    " + history[i] + "\n";
    }
    return out;
  }
};

constexpr const char* kSubdir = "sub";

bool write_all_at(int fd, const std::vector<std::uint8_t>& d, off_t off) {
  size_t done = 0;
  while (done < d.size()) {
    ssize_t n = ::pwrite(fd, d.data() + done, d.size() - done, off + static_cast<off_t>(done));
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

bool read_all_fd(int fd, std::vector<std::uint8_t>& out) {
  out.clear();
  std::uint8_t buf[65536];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) return false;
    if (n == 0) return true;
    out.insert(out.end(), buf, buf + n);
  }
}

// Which process the test kills, and so what a failed operation means.
enum class Victim {
  // The kmsfs server: the first failure means the mount is gone, and the
  // worker stops.
  Server,
  // kmsd: the mount stays. While kmsd is down, opening or creating a file
  // fails with EIO (its data key needs the KMS) and leaves the file as it
  // was (so does an ftruncate to 0, which makes the next data key first);
  // any other failure is a bug, recorded in Model::unexpected, and the
  // worker goes on.
  Kms,
};

struct WorkerOptions {
  Victim victim = Victim::Server;
  // The worker's file names are PREFIX0..PREFIX11: workers sharing a mount
  // take disjoint prefixes, so that the model of each name has one writer.
  std::string prefix = "f";
};

// Runs random operations until `stop` (or, killing the server, until one
// fails).
void worker(const std::string& mnt, Model& model, std::uint32_t seed, std::atomic<bool>& stop,
            std::atomic<int>& ops_done, WorkerOptions opts = {}) {
  // Every operation goes through a descriptor of the mount's root: once the
  // server is killed and the mount detached, a path would reach the
  // mountpoint directory underneath, and "durable" files would land there.
  const int dir = ::open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) {
    std::lock_guard l(model.m);
    model.unexpected.push_back("cannot open the mount " + mnt + ": " + std::strerror(errno));
    return;
  }
  struct CloseDir {
    int fd;
    ~CloseDir() { ::close(fd); }
  } close_dir{dir};
  const bool kms_victim = opts.victim == Victim::Kms;
  std::mt19937 rng(seed);
  // Names: twelve in the root, four in the subdirectory kSubdir (renames
  // cross directories), two too long for one backing name (their encrypted
  // names live in side files, which renames and unlinks rewrite too).
  auto pick = [&] {
    const unsigned r = rng() % 18;
    if (r < 12) return opts.prefix + std::to_string(r);
    if (r < 16) return std::string(kSubdir) + "/" + opts.prefix + "x" + std::to_string(r - 12);
    return opts.prefix + "L" + std::to_string(r - 16) + "-" + std::string(200, 'l');
  };
  // The subdirectory: made once (a mkdir that returned is on the backing
  // store, whatever happens to the server after).
  if (::mkdirat(dir, kSubdir, 0755) != 0 && errno != EEXIST) {
    const std::string line = std::string("mkdir ") + kSubdir + " failed: " + std::strerror(errno);
    model.note(line);
    if (kms_victim) {  // the mount is never killed then
      std::lock_guard l(model.m);
      model.unexpected.push_back(line);
    }
    return;
  }
  // Marks `n` in flight, its content unknown; returns whether it already was.
  auto mark = [&](const std::string& n) {
    std::lock_guard l(model.m);
    model.partial.erase(n);
    return !model.in_flight.insert(n).second;
  };
  // Marks `n` in flight for a pwrite at [off, off + len): a file with
  // fsynced bytes and no other change in flight keeps the rest of them.
  auto mark_write = [&](const std::string& n, std::size_t off, std::size_t len) {
    std::lock_guard l(model.m);
    const bool was = !model.in_flight.insert(n).second;
    if (model.durable.count(n) == 0) {
      model.partial.erase(n);
    } else if (!was) {
      model.partial[n] = {{off, len}};
    } else if (auto it = model.partial.find(n); it != model.partial.end()) {
      it->second.emplace_back(off, len);
    }
    return was;
  };
  // An open (or create, or ftruncate to 0) failed with errno set. Returns
  // whether the worker goes on. `untouched`: the name the operation had
  // marked in flight, to be unmarked when kmsd refused (empty: none).
  auto refused = [&](const std::string& what, const std::string& untouched) {
    const int err = errno;
    const std::string line = what + " " + std::strerror(err);
    model.note(line);
    if (!kms_victim) return false;
    {
      std::lock_guard l(model.m);
      if (err != EIO) {
        model.unexpected.push_back(line);
        return true;
      }
      // Refused while kmsd was down: the file is as it was.
      ++model.refused_opens;
      if (!untouched.empty()) model.settle(untouched);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // not to spin while kmsd is down
    return true;
  };
  // A step after a successful open failed (`line` says which): the server
  // died, or (kmsd killed) a bug; the file stays in flight.
  auto failed = [&](const std::string& line) {
    model.note(line);
    if (!kms_victim) return false;
    std::lock_guard l(model.m);
    model.unexpected.push_back(line);
    return true;
  };
  while (!stop.load()) {
    const int kind = static_cast<int>(rng() % 11);
    const std::string name = pick();
    const char* path = name.c_str();  // relative to dir
    if (kind <= 3) {
      // Durable rewrite: create/truncate, write, fsync.
      const bool was = mark(name);
      auto data = random_bytes(rng() % 70000, rng());
      int fd = ::openat(dir, path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) {
        if (!refused("rewrite " + name + " size " + std::to_string(data.size()) + ": open failed:", was ? "" : name)) {
          return;
        }
        continue;
      }
      bool ok = write_all_at(fd, data, 0) && ::fsync(fd) == 0;
      ::close(fd);
      const std::string line = "rewrite " + name + " size " + std::to_string(data.size()) + (ok ? " ok" : " failed");
      if (!ok) {
        if (!failed(line)) return;
        continue;
      }
      model.note(line);
      std::lock_guard l(model.m);
      model.durable[name] = std::move(data);
      model.settle(name);
    } else if (kind <= 5) {
      // Durable partial overwrite / extension of an existing file.
      std::vector<std::uint8_t> cur;
      {
        std::lock_guard l(model.m);
        auto it = model.durable.find(name);
        if (it == model.durable.end() || model.in_flight.count(name) != 0) continue;
        cur = it->second;
      }
      const size_t off = cur.empty() ? 0 : rng() % (cur.size() + 5000);
      auto data = random_bytes(1 + rng() % 20000, rng());
      mark_write(name, off, data.size());
      const std::string what = "pwrite+fdatasync " + name + " at " + std::to_string(off) + " size " +
                               std::to_string(data.size());
      int fd = ::openat(dir, path, O_WRONLY | O_CLOEXEC);
      if (fd < 0) {
        if (!refused(what + ": open failed:", name)) return;
        continue;
      }
      bool ok = write_all_at(fd, data, static_cast<off_t>(off)) && ::fdatasync(fd) == 0;
      ::close(fd);
      if (!ok) {
        if (!failed(what + " failed")) return;
        continue;
      }
      model.note(what + " ok");
      if (cur.size() < off + data.size()) cur.resize(off + data.size(), 0);
      std::copy(data.begin(), data.end(), cur.begin() + static_cast<long>(off));
      std::lock_guard l(model.m);
      model.durable[name] = std::move(cur);
      model.settle(name);
    } else if (kind == 6) {
      // Write without fsync: the file stays in flight until rewritten.
      auto data = random_bytes(1 + rng() % 9000, rng());
      const auto off = rng() % 30000;
      const bool was = mark_write(name, off, data.size());
      const std::string what = "pwrite (no sync) " + name + " at " + std::to_string(off) + " size " +
                               std::to_string(data.size());
      int fd = ::openat(dir, path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0) {
        if (!refused(what + ": open failed:", was ? "" : name)) return;
        continue;
      }
      bool ok = write_all_at(fd, data, static_cast<off_t>(off));
      ::close(fd);
      if (!ok) {
        if (!failed(what + " failed")) return;
        continue;
      }
      model.note(what + " ok");
    } else if (kind == 7) {
      // Rename (replacing the target): synchronous in the server, so a
      // returned rename is on the backing store.
      const std::string to = pick();
      if (to == name) continue;
      bool src_clean = false;
      {
        std::lock_guard l(model.m);
        if (model.durable.count(name) == 0 && model.in_flight.count(name) == 0) continue;
        src_clean = model.in_flight.count(name) == 0;
      }
      mark(name);
      mark(to);
      if (::renameat(dir, path, dir, to.c_str()) != 0) {
        if (!failed("rename " + name + " -> " + to + " failed: " + std::strerror(errno))) return;
        continue;
      }
      model.note("rename " + name + " -> " + to + (src_clean ? " (clean source)" : " (source in flight)"));
      std::lock_guard l(model.m);
      // The target is now what the source was; the source is gone. A source
      // that was in flight keeps the target in flight.
      auto it = model.durable.find(name);
      if (src_clean && it != model.durable.end()) {
        model.durable[to] = it->second;
        model.settle(to);
      } else {
        model.durable.erase(to);
      }
      model.durable.erase(name);
      model.settle(name);
    } else if (kind == 8) {
      // Truncate to a random size, then fsync through an fd.
      std::vector<std::uint8_t> cur;
      {
        std::lock_guard l(model.m);
        auto it = model.durable.find(name);
        if (it == model.durable.end() || model.in_flight.count(name) != 0) continue;
        cur = it->second;
      }
      mark(name);
      const size_t size = rng() % 50000;
      const std::string what = "ftruncate+fsync " + name + " to " + std::to_string(size);
      int fd = ::openat(dir, path, O_WRONLY | O_CLOEXEC);
      if (fd < 0) {
        if (!refused(what + ": open failed:", name)) return;
        continue;
      }
      if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
        // To 0 the next data key is made first: kmsd down refuses it.
        const int err = errno;
        ::close(fd);
        errno = err;
        if (size == 0 && err == EIO) {
          if (!refused(what + ": ftruncate failed:", name)) return;
        } else if (!failed(what + " failed: " + std::strerror(err))) {
          return;
        }
        continue;
      }
      bool ok = ::fsync(fd) == 0;
      ::close(fd);
      if (!ok) {
        if (!failed(what + " failed")) return;
        continue;
      }
      model.note(what + " ok");
      cur.resize(size, 0);
      std::lock_guard l(model.m);
      model.durable[name] = std::move(cur);
      model.settle(name);
    } else if (kind == 9) {
      mark(name);
      if (::unlinkat(dir, path, 0) != 0 && errno != ENOENT) {
        if (!failed("unlink " + name + " failed: " + std::strerror(errno))) return;
        continue;
      }
      model.note("unlink " + name);
      std::lock_guard l(model.m);
      model.durable.erase(name);
      model.settle(name);
    } else {
      // A cold open and a read of the whole file (its data key comes from
      // Decrypt when the key cache is off): a clean file reads back exactly.
      std::vector<std::uint8_t> expected;
      bool clean = false;
      {
        std::lock_guard l(model.m);
        auto it = model.durable.find(name);
        if (it == model.durable.end() && model.in_flight.count(name) == 0) continue;
        clean = it != model.durable.end() && model.in_flight.count(name) == 0;
        if (clean) expected = it->second;
      }
      int fd = ::openat(dir, path, O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        // Nothing changed: the name's in-flight state stays as it is.
        if (!refused("read " + name + ": open failed:", "")) return;
        continue;
      }
      std::vector<std::uint8_t> got;
      const bool ok = read_all_fd(fd, got);
      const int err = errno;
      ::close(fd);
      if (!ok) {
        if (!failed("read " + name + " failed: " + std::strerror(err))) return;
        continue;
      }
      if (clean && got != expected) {
        const std::string line = "read " + name + ": " + std::to_string(got.size()) + " bytes differ from the " +
                                 std::to_string(expected.size()) + " fsynced";
        model.note(line);
        std::lock_guard l(model.m);
        model.unexpected.push_back(line);
        continue;
      }
      model.note("read " + name + " size " + std::to_string(got.size()) + (clean ? " (clean, matches)" : " (in flight)"));
    }
    ops_done++;
  }
}

// Every name the workers can make, relative to the mount: the root's
// entries (but the subdirectory itself) and kSubdir's, as "sub/NAME".
std::set<std::string> list_names(const std::string& dir);
std::set<std::string> list_model_names(const std::string& mnt) {
  std::set<std::string> out;
  for (const auto& n : list_names(mnt)) {
    if (n != kSubdir) out.insert(n);
  }
  for (const auto& n : list_names(mnt + "/" + kSubdir)) out.insert(std::string(kSubdir) + "/" + n);
  return out;
}

std::set<std::string> list_names(const std::string& dir) {
  std::set<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.insert(e->d_name);
  }
  ::closedir(d);
  return out;
}

// Reads a whole file; false on any error (EIO = a block failed to verify).
bool read_whole(const std::string& path, std::vector<std::uint8_t>& out, int& err) {
  out.clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    err = errno;
    return false;
  }
  const bool ok = read_all_fd(fd, out);
  err = errno;
  ::close(fd);
  return ok;
}

// A file in flight only by pwrites since its last fsync (Model::partial):
// every block of its fsynced bytes that no in-flight write reached must read
// back exactly (a torn block is one the kill cut inside its write; only
// those may fail their tag). Blocks are the volume's 4 KiB, which are also
// the page cache's pages: the kernel writes back whole dirty pages, never a
// clean neighbour. Returns what is wrong (empty: nothing); counts the
// blocks checked.
std::string check_untouched_blocks(const std::string& path, const std::vector<std::uint8_t>& durable,
                                   const std::vector<std::pair<std::size_t, std::size_t>>& writes,
                                   std::size_t& blocks_checked) {
  constexpr std::size_t kBlock = 4096;
  const std::size_t size = durable.size();
  std::set<std::size_t> reached;
  bool grows = false;
  for (const auto& [off, len] : writes) {
    if (len == 0) continue;
    for (std::size_t b = off / kBlock; b <= (off + len - 1) / kBlock; ++b) reached.insert(b);
    grows = grows || off + len > size;
  }
  // A write past the end rewrites the old last block (its plaintext grows).
  if (grows && size > 0) reached.insert((size - 1) / kBlock);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::string("cannot open it: ") + std::strerror(errno);
  struct CloseFd {
    int fd;
    ~CloseFd() { ::close(fd); }
  } close_fd{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::string("cannot stat it: ") + std::strerror(errno);
  if (static_cast<std::size_t>(st.st_size) < size) {
    return "it shrank to " + std::to_string(st.st_size) + " bytes from " + std::to_string(size) +
           " fsynced (only pwrites were in flight)";
  }
  std::vector<std::uint8_t> buf(kBlock);
  for (std::size_t b = 0; b * kBlock < size; ++b) {
    if (reached.count(b) != 0) continue;
    const std::size_t want = std::min(kBlock, size - b * kBlock);
    const ssize_t n = ::pread(fd, buf.data(), want, static_cast<off_t>(b * kBlock));
    if (n < 0) {
      return "block " + std::to_string(b) + ", which no in-flight write reached, is unreadable: " +
             std::strerror(errno);
    }
    if (static_cast<std::size_t>(n) != want ||
        !std::equal(buf.begin(), buf.begin() + n, durable.begin() + static_cast<long>(b * kBlock))) {
      return "block " + std::to_string(b) + ", which no in-flight write reached, differs from its fsynced bytes";
    }
    ++blocks_checked;
  }
  return {};
}

TEST(Crash, KillNineDuringWritesLosesNothingFsynced) {
  TempKms kms;
  const std::string cipher = kms.root() + "/vol.cipher";
  const std::string mnt = kms.root() + "/vol.mnt";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  auto init = run_command({bin("kmsfs"), "init", cipher});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  const bool fsck = fsck_available();
  const int n = iterations();
  Model model;
  std::mt19937 rng(4242);
  int damaged_in_flight = 0;
  int repaired = 0;  // fsck --repair runs (torn in-flight blocks, leftovers)
  int leftovers = 0;  // temporary files of interrupted multi-step updates
  int total_ops = 0;
  const std::string log = kms.root() + "/kmsfs.log";

  std::size_t untouched_blocks = 0;  // blocks of in-flight files checked against their fsynced bytes
  // Checks what the last kill left, on a fresh mount: every fsynced file
  // not touched since reads back exactly, every block of a file in flight
  // only by pwrites that they did not reach too, nothing unknown appears.
  // `forget`: then drops the files in flight (so that the model is exact
  // again), counting the unreadable ones.
  auto verify = [&](int it, bool forget) {
    std::lock_guard l(model.m);
    for (const auto& name : list_model_names(mnt)) {
      const bool known = model.durable.count(name) != 0 || model.in_flight.count(name) != 0;
      EXPECT_TRUE(known) << "iteration " << it << ": unexpected file '" << name << "' after the crash";
    }
    for (const auto& [name, bytes] : model.durable) {
      if (model.in_flight.count(name) != 0) continue;
      std::vector<std::uint8_t> got;
      int err = 0;
      bool ok = read_whole(mnt + "/" + name, got, err);
      EXPECT_TRUE(ok) << "iteration " << it << ": fsynced file '" << name << "' unreadable: " << std::strerror(err);
      EXPECT_TRUE(ok && got == bytes) << "iteration " << it << ": fsynced file '" << name << "' differs ("
                                     << got.size() << " bytes read, " << bytes.size() << " expected); its history:\n"
                                     << model.history_of(name);
    }
    for (const auto& [name, writes] : model.partial) {
      const std::string problem =
          check_untouched_blocks(mnt + "/" + name, model.durable.at(name), writes, untouched_blocks);
      EXPECT_TRUE(problem.empty()) << "iteration " << it << ": '" << name
                                   << "' (in flight only by pwrites since its fsync): " << problem
                                   << "; its history:\n" << model.history_of(name);
    }
    if (!forget) return;
    // In-flight files may hold old or new data; count the unreadable ones
    // and remove them so that the model is exact again.
    for (const auto& name : model.in_flight) {
      std::vector<std::uint8_t> got;
      int err = 0;
      struct stat st {};
      if (::lstat((mnt + "/" + name).c_str(), &st) != 0) {
        model.durable.erase(name);  // gone (an unlink or rename in flight, or quarantined)
        continue;
      }
      if (!read_whole(mnt + "/" + name, got, err)) ++damaged_in_flight;
      ::unlink((mnt + "/" + name).c_str());
      model.durable.erase(name);
    }
    model.in_flight.clear();
    model.partial.clear();
  };

  for (int it = 0; it < n; ++it) {
    ForegroundMount m(cipher, mnt, {}, log);
    ASSERT_NO_THROW(m.start()) << "iteration " << it;
    verify(it, /*forget=*/true);
    if (::testing::Test::HasFailure()) break;

    model.note("--- mount " + std::to_string(it) + " (verified)");
    // Work, and kill -9 at a random moment.
    std::atomic<bool> stop{false};
    std::atomic<int> ops{0};
    std::thread w(worker, mnt, std::ref(model), static_cast<std::uint32_t>(rng()), std::ref(stop), std::ref(ops),
                  WorkerOptions{});
    std::this_thread::sleep_for(std::chrono::milliseconds(10 + rng() % 250));
    m.kill9();
    model.note("--- kill -9 after iteration " + std::to_string(it));
    stop = true;
    w.join();
    total_ops += ops.load();
    {
      std::lock_guard l(model.m);
      for (const auto& u : model.unexpected) ADD_FAILURE() << "iteration " << it << ": " << u;
      if (!model.unexpected.empty()) ADD_FAILURE() << "what the worker did last:\n" << model.recent(40);
      model.unexpected.clear();
    }

    if (fsck) {
      // A kill -9 inside a pwrite(2) of the backing file can leave the block
      // being written half old, half new (the kernel stops a write at a page
      // boundary for a fatal signal): that block fails its tag. Only a file
      // in flight may be damaged so; `fsck --repair` then quarantines it and
      // the volume is clean again.
      auto r = run_command({bin("kmsfs"), "fsck", cipher});
      if (r.exit_code == 6) {
        std::vector<std::string> damaged;
        {
          std::lock_guard l(model.m);
          std::istringstream lines(r.out);
          for (std::string line; std::getline(lines, line);) {
            if (line.find("DAMAGED") == std::string::npos) continue;
            // A kill inside a multi-step update (a long name's side file is
            // written to NAME.tmp, then renamed) leaves its temporary file:
            // no data, and `--repair` removes it.
            if (line.find("left behind by an interrupted operation") != std::string::npos) {
              ++leftovers;
              continue;
            }
            const auto open_paren = line.find(" (");
            const auto close_paren = line.find("):", open_paren);
            const std::string name = open_paren != std::string::npos && close_paren != std::string::npos
                                         ? line.substr(open_paren + 2, close_paren - open_paren - 2)
                                         : line;
            EXPECT_EQ(model.in_flight.count(name), 1U)
                << "iteration " << it << ": fsck after kill -9 found a damaged file that was not in flight: " << line
                << "\nits history:\n" << model.history_of(name);
            damaged.push_back(name);
          }
        }
        // The damaged files' other fsynced blocks still read back through a
        // mount, before the repair moves the files away.
        {
          ForegroundMount v(cipher, mnt, {}, log);
          EXPECT_NO_THROW(v.start());
          verify(it, /*forget=*/false);
          EXPECT_EQ(v.stop(), 0);
        }
        {
          std::lock_guard l(model.m);
          for (const auto& name : damaged) model.partial.erase(name);  // quarantined below
        }
        auto repair = run_command({bin("kmsfs"), "fsck", "--repair", cipher});
        EXPECT_EQ(repair.exit_code, 7) << "iteration " << it << ": fsck --repair:\n" << repair.out << repair.err;
        r = run_command({bin("kmsfs"), "fsck", cipher});
        ++repaired;
      }
      EXPECT_EQ(r.exit_code, 0) << "iteration " << it << ": kmsfs fsck after kill -9:\n" << r.out << r.err;
    }
  }
  // A last remount verifies the last kill.
  {
    ForegroundMount m(cipher, mnt, {}, log);
    ASSERT_NO_THROW(m.start());
    std::lock_guard l(model.m);
    for (const auto& [name, bytes] : model.durable) {
      if (model.in_flight.count(name) != 0) continue;
      std::vector<std::uint8_t> got;
      int err = 0;
      EXPECT_TRUE(read_whole(mnt + "/" + name, got, err) && got == bytes)
          << "fsynced file '" << name << "' (" << got.size() << " bytes read, " << bytes.size()
          << " expected); its history:\n" << model.history_of(name);
    }
  }
  RecordProperty("iterations", n);
  RecordProperty("operations", total_ops);
  RecordProperty("damaged_in_flight", damaged_in_flight);
  RecordProperty("fsck_repairs", repaired);
  RecordProperty("untouched_blocks_checked", static_cast<int>(untouched_blocks));
  RecordProperty("leftovers", leftovers);
  std::printf("crash test: %d kills, %d completed operations, %d in-flight files unreadable, fsck %s, %d repairs, "
              "%d leftover temporary files, %zu untouched blocks of in-flight files checked\n",
              n, total_ops, damaged_in_flight, fsck ? "run" : "not available", repaired, leftovers, untouched_blocks);
}

// ---- kill -9 of kmsd ---------------------------------------------------------
//
// A mount that reaches its KMS through kmsd (`--kms unix:SOCK`) serves two
// workers (the worker above, Victim::Kms, on disjoint names) while a third
// thread calls kmsctl through kmsd (GenerateDataKey on the volume's key,
// CreateKey with and without an alias, RotateKeyOnDemand of a spare key,
// UpdateAlias, DescribeKey), and kmsd is killed with SIGKILL at random
// moments and restarted on the same socket and state dir. The kmsfs process
// is never killed. (Kills during kmsd's start-up: the disabled test below.)
// Phases of 50 kills alternate `-o key_cache=off` (every open is a Decrypt
// and every create a GenerateDataKey, so kills land inside them) and the
// default key cache with its prefetch pool (kills land in the prefetcher's
// GenerateDataKey calls).
//
// Checked: the mount survives every kill; only opens and creates fail while
// kmsd is down (EIO, file untouched); after each phase every file reads back
// through the mount (fsynced bytes exactly), the unmount is clean and
// `kmsfs fsck` exits 0, and the next mount reads the same bytes; at the end
// `kmsctl audit verify` is clean (through kmsd, and embedded on its state
// dir after a SIGTERM), every listed key describes, every alias names an
// existing key, every key kmsctl reported created exists, and the volume's
// key still makes data keys.
//
// KMSFS_KMSD_CRASH_ITERATIONS sets the number of kills (default 200),
// KMSFS_KMSD_CRASH_SEED the seed (printed on failure).

int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? std::atoi(env) : fallback;
}

nlohmann::json parse_json(const std::string& text) { return nlohmann::json::parse(text, nullptr, false); }

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

std::string tail_of_file(const std::string& path, std::size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return all.size() > bytes ? all.substr(all.size() - bytes) : all;
}

// What the kmsctl thread did.
struct AdminLog {
  std::mutex m;
  std::vector<std::string> history;
  std::set<std::string> created;  // key ids that CreateKey returned
  std::vector<std::string> targets;  // keys UpdateAlias may point alias/moving at
  int ok = 0;
  int failed = 0;
  int cut = 0;  // failed because kmsd died with the call in flight
  void note(std::string line) {
    std::lock_guard l(m);
    history.push_back(std::move(line));
  }
  std::string recent(std::size_t n) {
    std::lock_guard l(m);
    std::string out;
    for (std::size_t i = history.size() > n ? history.size() - n : 0; i < history.size(); ++i) {
      out += "    " + history[i] + "\n";
    }
    return out;
  }
};

void admin_worker(const std::string& spec, AdminLog& log, std::uint32_t seed, std::atomic<bool>& stop) {
  std::mt19937 rng(seed);
  for (int n = 0; !stop.load(); ++n) {
    std::vector<std::string> args;
    const int kind = static_cast<int>(rng() % 8);
    if (kind <= 2) {
      args = {"generate-data-key", "--key-id", "alias/vol", "--encryption-context", "purpose=crash-test"};
    } else if (kind == 3) {
      args = {"create-key", "--description", "crash test"};
      if (rng() % 2 == 0) args.insert(args.end(), {"--alias", "alias/crash-" + std::to_string(seed) + "-" + std::to_string(n)});
    } else if (kind <= 5) {
      args = {"rotate-key-on-demand", "--key-id", "alias/spare"};
    } else if (kind == 6) {
      std::string target;
      {
        std::lock_guard l(log.m);
        target = log.targets[rng() % log.targets.size()];
      }
      args = {"update-alias", "--alias-name", "alias/moving", "--target-key-id", target};
    } else {
      args = {"describe-key", "--key-id", "alias/moving"};
    }
    std::vector<std::string> argv{bin("kmsctl"), "--kms", spec};
    argv.insert(argv.end(), args.begin(), args.end());
    const auto r = run_command(argv);
    std::string line = "kmsctl";
    for (std::size_t i = 0; i < args.size() && i < 3; ++i) line += " " + args[i];
    line += r.exit_code == 0 ? " ok" : " exit " + std::to_string(r.exit_code) + ": " + first_line(r.err);
    std::lock_guard l(log.m);
    log.history.push_back(line);
    (r.exit_code == 0 ? log.ok : log.failed)++;
    if (r.err.find("closed before a complete response") != std::string::npos) ++log.cut;
    if (r.exit_code == 0 && kind == 3) {
      auto j = parse_json(r.out);
      if (!j.is_discarded() && j.contains("KeyMetadata")) {
        const std::string id = j["KeyMetadata"].value("KeyId", std::string());
        log.created.insert(id);
        log.targets.push_back(id);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 20));
  }
}

// Reads every file of the mount after the workers stopped. kmsfs was never
// killed, so every file reads (no EIO) and the model is exact again: a clean
// fsynced file has its bytes, a file in flight adopts what it holds now
// (the next mount must read the same), a name the model does not know is a
// failure.
void check_and_settle(const std::string& mnt, Model& model, const std::string& when) {
  std::lock_guard l(model.m);
  const auto names = list_model_names(mnt);
  for (const auto& name : names) {
    const bool in_flight = model.in_flight.count(name) != 0;
    auto it = model.durable.find(name);
    if (it == model.durable.end() && !in_flight) {
      ADD_FAILURE() << when << ": unexpected file '" << name << "'; its history:\n" << model.history_of(name);
      continue;
    }
    std::vector<std::uint8_t> got;
    int err = 0;
    if (!read_whole(mnt + "/" + name, got, err)) {
      ADD_FAILURE() << when << ": '" << name << "' is unreadable: " << std::strerror(err) << "; its history:\n"
                    << model.history_of(name);
      continue;
    }
    if (!in_flight && got != it->second) {
      ADD_FAILURE() << when << ": fsynced file '" << name << "' differs (" << got.size() << " bytes read, "
                    << it->second.size() << " expected); its history:\n" << model.history_of(name);
    }
    model.durable[name] = std::move(got);
  }
  for (auto it = model.durable.begin(); it != model.durable.end();) {
    if (names.count(it->first) != 0) {
      ++it;
      continue;
    }
    if (model.in_flight.count(it->first) == 0) {
      ADD_FAILURE() << when << ": fsynced file '" << it->first << "' is missing; its history:\n"
                    << model.history_of(it->first);
    }
    it = model.durable.erase(it);
  }
  model.in_flight.clear();
  model.partial.clear();
}

TEST(Crash, KillNineOfKmsdDuringWorkLosesNothing) {
  const int n = std::max(1, env_int("KMSFS_KMSD_CRASH_ITERATIONS", 200));
  const auto seed = static_cast<std::uint32_t>(env_int("KMSFS_KMSD_CRASH_SEED", 7107));
  SCOPED_TRACE("seed " + std::to_string(seed) + " (KMSFS_KMSD_CRASH_SEED), " + std::to_string(n) +
               " kills (KMSFS_KMSD_CRASH_ITERATIONS)");
  constexpr int kKillsPerPhase = 50;
  const auto started = std::chrono::steady_clock::now();

  TempKms kms;  // the temp root, and the detach of any mount left below it; its embedded home stays unused
  KmsdProcess kmsd(kms.root());
  ASSERT_NO_THROW(kmsd.start());
  const std::string spec = kmsd.spec();
  auto kmsctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {bin("kmsctl"), "--kms", spec});
    return run_command(args);
  };
  auto vol = kmsctl({"create-key", "--description", "crash test volume", "--alias", "alias/vol"});
  ASSERT_EQ(vol.exit_code, 0) << vol.err;
  auto spare = kmsctl({"create-key", "--description", "crash test spare", "--alias", "alias/spare"});
  ASSERT_EQ(spare.exit_code, 0) << spare.err;
  const auto spare_json = parse_json(spare.out);
  ASSERT_FALSE(spare_json.is_discarded()) << spare.out;
  const std::string spare_id = spare_json["KeyMetadata"].value("KeyId", std::string());
  auto moving = kmsctl({"create-alias", "--alias-name", "alias/moving", "--target-key-id", spare_id});
  ASSERT_EQ(moving.exit_code, 0) << moving.err;

  const std::string cipher = kms.root() + "/vol.cipher";
  const std::string mnt = kms.root() + "/vol.mnt";
  const std::string log = kms.root() + "/kmsfs.log";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  auto init = run_command({bin("kmsfs"), "--kms", spec, "init", cipher, "--key", "alias/vol"});
  ASSERT_EQ(init.exit_code, 0) << init.err;

  Model model;
  AdminLog admin;
  admin.targets.push_back(spare_id);
  std::mt19937 rng(seed);
  int total_ops = 0;
  int it = 0;
  auto mount_args = [&](bool cache_off) {
    std::vector<std::string> a{"--kms", spec};
    if (cache_off) a.insert(a.end(), {"-o", "key_cache=off"});
    return a;
  };
  auto context = [&](const std::string& when) {
    std::lock_guard l(model.m);
    return when + "\nwhat the workers did last:\n" + model.recent(40) + "kmsctl calls last:\n" + admin.recent(10) +
           "kmsfs log (tail):\n" + tail_of_file(log, 3000);
  };

  for (int phase = 0; it < n && !::testing::Test::HasFailure(); ++phase) {
    const bool cache_off = phase % 2 == 0;
    const std::string phase_name = "phase " + std::to_string(phase) + (cache_off ? " (key_cache=off)" : " (key cache on)");
    ForegroundMount m(cipher, mnt, mount_args(cache_off), log);
    ASSERT_NO_THROW(m.start()) << phase_name;
    check_and_settle(mnt, model, phase_name + ", fresh mount");
    if (::testing::Test::HasFailure()) break;
    model.note("--- " + phase_name + ": mounted and verified");

    std::atomic<bool> stop{false};
    std::atomic<int> ops{0};
    std::atomic<int> finished{0};
    std::vector<std::thread> threads;
    for (const char* prefix : {"a", "b"}) {
      const auto wseed = static_cast<std::uint32_t>(rng());
      threads.emplace_back([&, prefix, wseed] {
        worker(mnt, model, wseed, stop, ops, WorkerOptions{Victim::Kms, prefix});
        ++finished;
      });
    }
    const auto aseed = static_cast<std::uint32_t>(rng());
    threads.emplace_back([&, aseed] {
      admin_worker(spec, admin, aseed, stop);
      ++finished;
    });

    bool mount_died = false;
    for (int k = 0; k < kKillsPerPhase && it < n; ++k, ++it) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5 + rng() % 200));
      // 128+SIGKILL, or kmsd had died by itself (a crash, a sanitizer report).
      if (const int code = kmsd.stop(SIGKILL); code != 128 + SIGKILL) {
        ADD_FAILURE() << context("kill " + std::to_string(it) + ": kmsd had exited by itself with " +
                                 std::to_string(code) + "; its log (tail):\n" +
                                 tail_of_file(kms.root() + "/kmsd.log", 3000));
        break;
      }
      model.note("--- kill -9 of kmsd (kill " + std::to_string(it) + ")");
      admin.note("--- kill -9 of kmsd (kill " + std::to_string(it) + ")");
      std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 60));
      try {
        kmsd.start();
      } catch (const std::exception& e) {
        ADD_FAILURE() << context("kill " + std::to_string(it) + ": kmsd does not start again: " + e.what());
        break;
      }
      int code = 0;
      if (!m.alive(code)) {
        ADD_FAILURE() << context("kill " + std::to_string(it) + ": the kmsfs server exited with " +
                                 std::to_string(code) + " (" + phase_name + ")");
        mount_died = true;
        break;
      }
    }

    // Stop the threads. One still inside the mount after a minute hangs (a
    // KMS call that never returns): say what it did, then kill kmsfs so
    // that its call fails and it can be joined.
    stop = true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (finished.load() < static_cast<int>(threads.size()) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (finished.load() < static_cast<int>(threads.size())) {
      ADD_FAILURE() << context(phase_name + ": a worker hangs 90 s after the last kill (kmsd is running)");
      m.kill9();
      mount_died = true;
    }
    for (auto& t : threads) t.join();
    total_ops += ops.load();
    {
      std::lock_guard l(model.m);
      for (const auto& u : model.unexpected) ADD_FAILURE() << phase_name << ": " << u;
    }
    if (!model.unexpected.empty()) ADD_FAILURE() << context(phase_name + ": operations failed that must not");
    model.unexpected.clear();
    if (mount_died || ::testing::Test::HasFailure()) break;

    check_and_settle(mnt, model, phase_name + ", after the last kill, same mount");
    // Files closed just now are released asynchronously: give FUSE a moment.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_EQ(m.stop(), 0) << context(phase_name + ": unmount");
    auto fsck = run_command({bin("kmsfs"), "--kms", spec, "fsck", cipher});
    EXPECT_EQ(fsck.exit_code, 0) << phase_name << ": kmsfs fsck after kmsd kills (kmsfs was never killed):\n"
                                 << fsck.out << fsck.err;
  }
  if (!::testing::Test::HasFailure()) {
    // The last phase's files once more from a fresh mount.
    ForegroundMount m(cipher, mnt, mount_args(false), log);
    ASSERT_NO_THROW(m.start());
    check_and_settle(mnt, model, "final mount");
    EXPECT_EQ(m.stop(), 0);
  }

  // kmsd's state: the audit trail, every key, every alias.
  auto audit = kmsctl({"audit", "verify"});
  EXPECT_EQ(audit.exit_code, 0) << "kmsctl audit verify through kmsd:\n" << audit.out << audit.err;
  const auto audit_json = parse_json(audit.out);
  const auto torn_records = audit_json.is_discarded() ? 0 : audit_json.value("TornTailBytes", 0);
  auto keys = kmsctl({"list-keys"});
  ASSERT_EQ(keys.exit_code, 0) << keys.err;
  const auto keys_json = parse_json(keys.out);
  ASSERT_FALSE(keys_json.is_discarded()) << keys.out;
  std::set<std::string> key_ids;
  std::vector<std::string> lost_material;
  for (const auto& k : keys_json.value("Keys", nlohmann::json::array())) {
    const std::string id = k.value("KeyId", std::string());
    key_ids.insert(id);
    auto d = kmsctl({"describe-key", "--key-id", id});
    EXPECT_EQ(d.exit_code, 0) << "describe-key " << id << ": " << d.err;
    const auto dj = parse_json(d.out);
    if (dj.is_discarded() || dj["KeyMetadata"].value("KeyState", std::string()) != "Enabled") continue;
    auto g = kmsctl({"generate-data-key", "--key-id", id});
    // No key loses its material to a kill (kmsfs restores SoftHSM2's
    // token.object and syncs the token before recording a version).
    EXPECT_EQ(g.exit_code, 0) << "generate-data-key " << id << ": " << g.err;
    if (g.exit_code != 0) lost_material.push_back(id + ": " + first_line(g.err));
  }
  for (const auto& id : admin.created) {
    EXPECT_EQ(key_ids.count(id), 1U) << "CreateKey returned " << id << " but list-keys does not list it";
  }
  auto aliases = kmsctl({"list-aliases"});
  ASSERT_EQ(aliases.exit_code, 0) << aliases.err;
  const auto aliases_json = parse_json(aliases.out);
  ASSERT_FALSE(aliases_json.is_discarded()) << aliases.out;
  for (const auto& a : aliases_json.value("Aliases", nlohmann::json::array())) {
    if (!a.contains("TargetKeyId")) continue;  // an AWS-managed alias whose key does not exist yet
    const std::string target = a.value("TargetKeyId", std::string());
    EXPECT_EQ(key_ids.count(target), 1U) << "alias " << a.value("AliasName", std::string()) << " names " << target
                                         << ", which list-keys does not list";
  }
  auto gdk = kmsctl({"generate-data-key", "--key-id", "alias/vol"});
  EXPECT_EQ(gdk.exit_code, 0) << "GenerateDataKey on the volume's key: " << gdk.err;

  // A clean stop writes the audit head; the trail verifies embedded too.
  EXPECT_EQ(kmsd.stop(SIGTERM), 0) << tail_of_file(kms.root() + "/kmsd.log", 3000);
  ::setenv("KMSFS_HOME", kmsd.state_dir().c_str(), 1);
  auto embedded = run_command({bin("kmsctl"), "--kms", "embedded", "audit", "verify"});
  ::setenv("KMSFS_HOME", kms.home().c_str(), 1);
  EXPECT_EQ(embedded.exit_code, 0) << "kmsctl audit verify on kmsd's state dir:\n" << embedded.out << embedded.err;

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  RecordProperty("kills", it);
  RecordProperty("operations", total_ops);
  RecordProperty("refused_opens", model.refused_opens);
  std::printf("kmsd crash test: seed %u, %d kills of kmsd, %d file operations, %d opens/creates refused while kmsd "
              "was down, kmsctl %d ok / %d failed (%d cut mid-call), %d bytes of a torn audit record at the end, %zu keys, %zu with lost "
              "HSM material, %.0f s\n",
              seed, it, total_ops, model.refused_opens, admin.ok, admin.failed, admin.cut, torn_records,
              key_ids.size(), lost_material.size(), secs);
  for (const auto& l : lost_material) std::printf("  lost material: %s\n", l.c_str());
}


// kill -9 of kmsd during its start-up. SoftHSM2's file object store
// rewrites the token's token.object in place (ftruncate, then write) at
// every C_Login, which kmsd does once at start; a kill between the two
// leaves it empty, and with it the token and every key's material. kmsfs
// keeps a copy of token.object and restores it before the next start
// (restore_softhsm_token_objects), so every kill here must leave the key
// usable. The same window is open in every embedded kmsctl and kmsfs start
// (KmsLifecycle.KillingKmsctlMidOperationLeavesConsistentMetadata).
TEST(Crash, KillNineOfKmsdDuringItsStartUpKeepsItsKeys) {
  const int n = std::max(1, env_int("KMSFS_KMSD_CRASH_ITERATIONS", 100));
  const auto seed = static_cast<std::uint32_t>(env_int("KMSFS_KMSD_CRASH_SEED", 7107));
  TempKms kms;
  KmsdProcess kmsd(kms.root());
  ASSERT_NO_THROW(kmsd.start());
  auto kmsctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {bin("kmsctl"), "--kms", kmsd.spec()});
    return run_command(args);
  };
  auto key = kmsctl({"create-key", "--alias", "alias/keep"});
  ASSERT_EQ(key.exit_code, 0) << key.err;
  std::mt19937 rng(seed);
  for (int it = 0; it < n; ++it) {
    kmsd.kill9();
    ASSERT_NO_THROW(kmsd.spawn());
    const auto wait = std::chrono::microseconds(rng() % 150000);
    std::this_thread::sleep_for(wait);
    kmsd.kill9();
    ASSERT_NO_THROW(kmsd.start()) << "seed " << seed << ", kill " << it << " (" << wait.count()
                                  << " us into the start-up)";
    auto g = kmsctl({"generate-data-key", "--key-id", "alias/keep"});
    ASSERT_EQ(g.exit_code, 0) << "seed " << seed << ", kill " << it << " (" << wait.count()
                              << " us into the start-up): " << g.err;
  }
}
}  // namespace
}  // namespace kmsfs::test
