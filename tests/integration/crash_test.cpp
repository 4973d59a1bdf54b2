// Crash tests: kill -9 of the serving kmsfs process at random moments while a
// worker writes, creates, renames, truncates and unlinks files; after the
// remount every file whose last change was fsynced (and not touched since)
// reads back byte for byte, nothing unknown appears, and only files that were
// in flight at the kill may differ. `kmsfs fsck` is run when the tool has it.
//
// KMSFS_CRASH_ITERATIONS sets the number of kills (default 20; the long mode
// is 200 or more: tests/stress/soak.sh runs it).

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

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
  std::vector<std::string> history;  // what the worker did, for a failure message
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
};

bool write_all_at(int fd, const std::vector<std::uint8_t>& d, off_t off) {
  size_t done = 0;
  while (done < d.size()) {
    ssize_t n = ::pwrite(fd, d.data() + done, d.size() - done, off + static_cast<off_t>(done));
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// Runs random operations until one fails (the server died) or `stop`.
void worker(const std::string& mnt, Model& model, std::uint32_t seed, std::atomic<bool>& stop,
            std::atomic<int>& ops_done) {
  // Every operation goes through a descriptor of the mount's root: once the
  // server is killed and the mount detached, a path would reach the
  // mountpoint directory underneath, and "durable" files would land there.
  const int dir = ::open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return;
  struct CloseDir {
    int fd;
    ~CloseDir() { ::close(fd); }
  } close_dir{dir};
  std::mt19937 rng(seed);
  auto pick = [&] { return "f" + std::to_string(rng() % 12); };
  auto mark = [&](const std::string& n) {
    std::lock_guard l(model.m);
    model.in_flight.insert(n);
  };
  while (!stop.load()) {
    const int kind = static_cast<int>(rng() % 10);
    const std::string name = pick();
    const char* path = name.c_str();  // relative to dir
    if (kind <= 3) {
      // Durable rewrite: create/truncate, write, fsync.
      mark(name);
      auto data = random_bytes(rng() % 70000, rng());
      int fd = ::openat(dir, path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) return;
      bool ok = write_all_at(fd, data, 0) && ::fsync(fd) == 0;
      ::close(fd);
      model.note("rewrite " + name + " size " + std::to_string(data.size()) + (ok ? " ok" : " failed"));
      if (!ok) return;
      std::lock_guard l(model.m);
      model.durable[name] = std::move(data);
      model.in_flight.erase(name);
    } else if (kind <= 5) {
      // Durable partial overwrite / extension of an existing file.
      std::vector<std::uint8_t> cur;
      {
        std::lock_guard l(model.m);
        auto it = model.durable.find(name);
        if (it == model.durable.end() || model.in_flight.count(name) != 0) continue;
        cur = it->second;
      }
      mark(name);
      const size_t off = cur.empty() ? 0 : rng() % (cur.size() + 5000);
      auto data = random_bytes(1 + rng() % 20000, rng());
      int fd = ::openat(dir, path, O_WRONLY | O_CLOEXEC);
      if (fd < 0) return;
      bool ok = write_all_at(fd, data, static_cast<off_t>(off)) && ::fdatasync(fd) == 0;
      ::close(fd);
      model.note("pwrite+fdatasync " + name + " at " + std::to_string(off) + " size " + std::to_string(data.size()) +
                 (ok ? " ok" : " failed"));
      if (!ok) return;
      if (cur.size() < off + data.size()) cur.resize(off + data.size(), 0);
      std::copy(data.begin(), data.end(), cur.begin() + static_cast<long>(off));
      std::lock_guard l(model.m);
      model.durable[name] = std::move(cur);
      model.in_flight.erase(name);
    } else if (kind == 6) {
      // Write without fsync: the file stays in flight until rewritten.
      mark(name);
      int fd = ::openat(dir, path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0) return;
      auto data = random_bytes(1 + rng() % 9000, rng());
      const auto off = rng() % 30000;
      bool ok = write_all_at(fd, data, static_cast<off_t>(off));
      ::close(fd);
      model.note("pwrite (no sync) " + name + " at " + std::to_string(off) + " size " + std::to_string(data.size()) +
                 (ok ? " ok" : " failed"));
      if (!ok) return;
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
        model.note("rename " + name + " -> " + to + " failed");
        return;
      }
      model.note("rename " + name + " -> " + to + (src_clean ? " (clean source)" : " (source in flight)"));
      std::lock_guard l(model.m);
      // The target is now what the source was; the source is gone. A source
      // that was in flight keeps the target in flight.
      auto it = model.durable.find(name);
      if (src_clean && it != model.durable.end()) {
        model.durable[to] = it->second;
        model.in_flight.erase(to);
      } else {
        model.durable.erase(to);
      }
      model.durable.erase(name);
      model.in_flight.erase(name);
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
      int fd = ::openat(dir, path, O_WRONLY | O_CLOEXEC);
      if (fd < 0) return;
      bool ok = ::ftruncate(fd, static_cast<off_t>(size)) == 0 && ::fsync(fd) == 0;
      ::close(fd);
      model.note("ftruncate+fsync " + name + " to " + std::to_string(size) + (ok ? " ok" : " failed"));
      if (!ok) return;
      cur.resize(size, 0);
      std::lock_guard l(model.m);
      model.durable[name] = std::move(cur);
      model.in_flight.erase(name);
    } else {
      mark(name);
      if (::unlinkat(dir, path, 0) != 0 && errno != ENOENT) {
        model.note("unlink " + name + " failed");
        return;
      }
      model.note("unlink " + name);
      std::lock_guard l(model.m);
      model.durable.erase(name);
      model.in_flight.erase(name);
    }
    ops_done++;
  }
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
  std::uint8_t buf[65536];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      err = errno;
      ::close(fd);
      return false;
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return true;
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
  int repaired = 0;  // fsck --repair runs (torn in-flight blocks)
  int total_ops = 0;
  const std::string log = kms.root() + "/kmsfs.log";

  for (int it = 0; it < n; ++it) {
    ForegroundMount m(cipher, mnt, {}, log);
    ASSERT_NO_THROW(m.start()) << "iteration " << it;

    // Verify what the previous kill left (the first round: empty volume).
    {
      std::lock_guard l(model.m);
      for (const auto& name : list_names(mnt)) {
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
    }
    if (::testing::Test::HasFailure()) break;

    model.note("--- mount " + std::to_string(it) + " (verified)");
    // Work, and kill -9 at a random moment.
    std::atomic<bool> stop{false};
    std::atomic<int> ops{0};
    std::thread w(worker, mnt, std::ref(model), static_cast<std::uint32_t>(rng()), std::ref(stop), std::ref(ops));
    std::this_thread::sleep_for(std::chrono::milliseconds(10 + rng() % 250));
    m.kill9();
    model.note("--- kill -9 after iteration " + std::to_string(it));
    stop = true;
    w.join();
    total_ops += ops.load();

    if (fsck) {
      // A kill -9 inside a pwrite(2) of the backing file can leave the block
      // being written half old, half new (the kernel stops a write at a page
      // boundary for a fatal signal): that block fails its tag. Only a file
      // in flight may be damaged so; `fsck --repair` then quarantines it and
      // the volume is clean again.
      auto r = run_command({bin("kmsfs"), "fsck", cipher});
      if (r.exit_code == 6) {
        std::lock_guard l(model.m);
        std::istringstream lines(r.out);
        for (std::string line; std::getline(lines, line);) {
          if (line.find("DAMAGED") == std::string::npos) continue;
          const auto open_paren = line.find(" (");
          const auto close_paren = line.find("):", open_paren);
          const std::string name = open_paren != std::string::npos && close_paren != std::string::npos
                                       ? line.substr(open_paren + 2, close_paren - open_paren - 2)
                                       : line;
          EXPECT_EQ(model.in_flight.count(name), 1U)
              << "iteration " << it << ": fsck after kill -9 found a damaged file that was not in flight: " << line
              << "\nits history:\n" << model.history_of(name);
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
  std::printf("crash test: %d kills, %d completed operations, %d in-flight files unreadable, fsck %s, %d repairs\n",
              n, total_ops, damaged_in_flight, fsck ? "run" : "not available", repaired);
}

}  // namespace
}  // namespace kmsfs::test
