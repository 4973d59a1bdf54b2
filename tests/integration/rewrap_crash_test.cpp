// kill -9 of `kmsfs rewrap` (issue #7, "header rewrites"): rewrap replaces
// each file's 128-byte header in place (docs/format.md, "Header lock") while
// a live mount keeps writing. Here it is killed with SIGKILL at random
// moments, in phases that alternate the target key between two KMS keys,
// while a writer rewrites files through the mount (each rewrite makes a new
// header under the same lock). Between the kills: every file reads back
// exactly through the mount (each open unwraps whatever header the file has
// now: the key cache is off), `kmsfs fsck` is clean, and every 50 kills a
// fresh mount reads the same. At the end a complete rewrap leaves nothing to
// do for another run, the other key can be disabled, and a remount reads
// every file.
//
// KMSFS_REWRAP_CRASH_ITERATIONS sets the number of kills (default 200).

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/kmsfs_process.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

int rewrap_iterations() {
  const char* env = std::getenv("KMSFS_REWRAP_CRASH_ITERATIONS");
  return env != nullptr ? std::max(1, std::atoi(env)) : 200;
}

std::string key_id_of(const std::string& create_key_output) {
  const std::string field = "\"KeyId\": \"";
  auto p = create_key_output.find(field);
  if (p == std::string::npos) return "";
  p += field.size();
  return create_key_output.substr(p, create_key_output.find('"', p) - p);
}

std::string slurp_text(const std::string& path) {
  auto b = read_file(path);
  return std::string(b.begin(), b.end());
}

// `kmsfs rewrap CIPHER --to-key KEY --quiet` as a child, its output to `log`.
pid_t spawn_rewrap(const std::string& cipher, const std::string& key, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (out >= 0) {
      ::dup2(out, 1);
      ::dup2(out, 2);
    }
    std::string k = bin("kmsfs");
    std::string c = cipher;
    std::string t = key;
    char* argv[] = {k.data(), const_cast<char*>("rewrap"), c.data(), const_cast<char*>("--to-key"), t.data(),
                    const_cast<char*>("--quiet"), nullptr};
    ::execv(argv[0], argv);
    ::_exit(127);
  }
  return pid;
}

struct Files {
  std::mutex m;
  std::map<std::string, std::vector<std::uint8_t>> content;  // relative path -> bytes
  std::vector<std::string> failures;
};

// Rewrites random files through the mount (O_TRUNC: a new data key and a
// new header each time) until `stop`. The mount is never killed, so every
// step must succeed.
void rewriter(const std::string& mnt, Files& files, std::uint32_t seed, std::atomic<bool>& stop,
              std::atomic<int>& rewrites) {
  std::mt19937 rng(seed);
  std::vector<std::string> names;
  {
    std::lock_guard l(files.m);
    for (const auto& [name, bytes] : files.content) names.push_back(name);
  }
  while (!stop.load()) {
    const std::string& name = names[rng() % names.size()];
    auto data = random_bytes(rng() % 30000, rng());
    const int fd = ::open((mnt + "/" + name).c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
    bool ok = fd >= 0;
    std::size_t done = 0;
    while (ok && done < data.size()) {
      const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
      ok = n > 0;
      if (ok) done += static_cast<std::size_t>(n);
    }
    ok = ok && ::fsync(fd) == 0;
    const int err = errno;
    if (fd >= 0) ::close(fd);
    std::lock_guard l(files.m);
    if (!ok) {
      files.failures.push_back("rewrite of " + name + " through the mount failed: " + std::strerror(err));
      return;
    }
    files.content[name] = std::move(data);
    ++rewrites;
    std::this_thread::sleep_for(std::chrono::milliseconds(1 + rng() % 4));
  }
}

// Every file reads back exactly through the mount; returns the failures.
std::vector<std::string> check_files(const std::string& mnt, Files& files) {
  std::vector<std::string> bad;
  std::lock_guard l(files.m);
  for (const auto& [name, bytes] : files.content) {
    const int fd = ::open((mnt + "/" + name).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      bad.push_back(name + ": open failed: " + std::strerror(errno));
      continue;
    }
    std::vector<std::uint8_t> got(bytes.size() + 1);
    std::size_t done = 0;
    ssize_t n = 0;
    while ((n = ::pread(fd, got.data() + done, got.size() - done, static_cast<off_t>(done))) > 0) {
      done += static_cast<std::size_t>(n);
    }
    const int err = errno;
    ::close(fd);
    if (n < 0) {
      bad.push_back(name + ": read failed: " + std::strerror(err));
    } else if (done != bytes.size() || !std::equal(bytes.begin(), bytes.end(), got.begin())) {
      bad.push_back(name + ": " + std::to_string(done) + " bytes read differ from the " +
                    std::to_string(bytes.size()) + " written");
    }
  }
  return bad;
}

TEST(Crash, KillNineOfRewrapDuringWritesLosesNothing) {
  TempKms kms;
  auto a = run_command({bin("kmsctl"), "create-key", "--alias", "alias/rewrap-a"});
  ASSERT_EQ(a.exit_code, 0) << a.err;
  auto b = run_command({bin("kmsctl"), "create-key", "--alias", "alias/rewrap-b"});
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const std::string keys[2] = {key_id_of(a.out), key_id_of(b.out)};
  ASSERT_FALSE(keys[0].empty());
  ASSERT_FALSE(keys[1].empty());

  const std::string cipher = kms.root() + "/vol.cipher";
  const std::string mnt = kms.root() + "/vol.mnt";
  const std::string log = kms.root() + "/kmsfs.log";
  const std::string rewrap_log = kms.root() + "/rewrap.log";
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  auto init = run_command({bin("kmsfs"), "init", cipher, "--key", "alias/rewrap-a"});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  const std::vector<std::string> mount_args{"-o", "key_cache=off"};
  auto m = std::make_unique<ForegroundMount>(cipher, mnt, mount_args, log);
  ASSERT_NO_THROW(m->start());

  // 96 files in three directories, a few with names too long for one
  // backing name (their side files are rewritten by nobody but must stay).
  Files files;
  std::mt19937 rng(777);
  for (int d = 0; d < 3; ++d) ASSERT_EQ(::mkdir((mnt + "/d" + std::to_string(d)).c_str(), 0755), 0);
  for (int i = 0; i < 96; ++i) {
    std::string name = "d" + std::to_string(i % 3) + "/f" + std::to_string(i);
    if (i % 8 == 0) name += "-" + std::string(200, static_cast<char>('a' + i % 26));
    auto data = random_bytes(rng() % 30000, rng());
    write_file(mnt + "/" + name, data);
    files.content[name] = std::move(data);
  }

  const int n = rewrap_iterations();
  int kills = 0, completed = 0, rotations = 0, key_changes = 0, remounts = 0, repaired_leftovers = 0;
  std::atomic<int> rewrites{0};
  int target = 0;  // the volume starts under key 0
  int rotations_of[2] = {0, 0};
  // Gives the next run work: a new version of the target key, four times,
  // then the other key (AWS allows 25 on-demand rotations per key).
  auto new_work = [&] {
    if (rotations_of[target] % 5 != 4 && rotations_of[target] < 24) {
      auto r = run_command({bin("kmsctl"), "rotate-key-on-demand", "--key-id", keys[target]});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      ++rotations_of[target];
      ++rotations;
    } else {
      ++rotations_of[target];  // counts the change away, too
      target = 1 - target;
      ++key_changes;
    }
  };
  new_work();
  auto run_length = std::chrono::milliseconds(400);  // of the last complete run
  for (int it = 0; it < n; ++it) {
    // A key change first waits 2 s (a live mount must see kmsfs.json name
    // the new key); then the run takes about as long as the last complete
    // one: kill at a random moment inside it. A run that finishes first
    // counts as complete and the next gets new work.
    const bool config_names_target = slurp_text(cipher + "/kmsfs.json").find(keys[target]) != std::string::npos;
    const auto delay = std::chrono::milliseconds((config_names_target ? 0 : 2000) +
                                                 rng() % static_cast<std::uint32_t>(run_length.count() + 1));
    std::atomic<bool> stop{false};
    std::thread w(rewriter, mnt, std::ref(files), static_cast<std::uint32_t>(rng()), std::ref(stop),
                  std::ref(rewrites));
    const auto t0 = std::chrono::steady_clock::now();
    const pid_t pid = spawn_rewrap(cipher, keys[target], rewrap_log);
    ASSERT_GT(pid, 0);
    std::this_thread::sleep_for(delay);
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    stop = true;
    w.join();
    if (WIFSIGNALED(status)) {
      ++kills;
    } else {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
          << "iteration " << it << ": rewrap failed (status " << status << "):\n" << slurp_text(rewrap_log);
      ++completed;
      if (config_names_target) {
        run_length = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
      }
      new_work();
    }
    {
      std::lock_guard l(files.m);
      for (const auto& f : files.failures) ADD_FAILURE() << "iteration " << it << ": " << f;
    }
    for (const auto& f : check_files(mnt, files)) ADD_FAILURE() << "iteration " << it << ": " << f;
    auto fsck = run_command({bin("kmsfs"), "fsck", cipher});
    if (fsck.exit_code == 6 && WIFSIGNALED(status)) {
      // A kill inside the kmsfs.json update (tmp file, fsync, rename)
      // leaves its tmp file: the only damage allowed, and `--repair`
      // removes it.
      std::istringstream lines(fsck.out);
      for (std::string line; std::getline(lines, line);) {
        if (line.find("DAMAGED") == std::string::npos) continue;
        EXPECT_NE(line.find("kmsfs.json.tmp"), std::string::npos)
            << "iteration " << it << ": the killed rewrap left damage:\n" << fsck.out;
      }
      // fsck --repair wants the volume unmounted.
      EXPECT_EQ(m->stop(), 0);
      auto repair = run_command({bin("kmsfs"), "fsck", "--repair", cipher});
      EXPECT_EQ(repair.exit_code, 7) << "iteration " << it << ":\n" << repair.out << repair.err;
      ++repaired_leftovers;
      fsck = run_command({bin("kmsfs"), "fsck", cipher});
      m = std::make_unique<ForegroundMount>(cipher, mnt, mount_args, log);
      ASSERT_NO_THROW(m->start());
      ++remounts;
      for (const auto& f : check_files(mnt, files)) ADD_FAILURE() << "iteration " << it << ", remounted: " << f;
    }
    EXPECT_EQ(fsck.exit_code, 0) << "iteration " << it << ": kmsfs fsck after the rewrap was "
                                 << (WIFSIGNALED(status) ? "killed" : "done") << ":\n" << fsck.out << fsck.err;
    if (it % 50 == 49) {
      EXPECT_EQ(m->stop(), 0);
      m = std::make_unique<ForegroundMount>(cipher, mnt, mount_args, log);
      ASSERT_NO_THROW(m->start());
      ++remounts;
      for (const auto& f : check_files(mnt, files)) ADD_FAILURE() << "iteration " << it << ", fresh mount: " << f;
    }
    if (::testing::Test::HasFailure()) break;
  }

  // A complete run, then nothing is left for another one.
  auto done = run_command({bin("kmsfs"), "rewrap", cipher, "--to-key", keys[target], "--quiet"});
  ASSERT_EQ(done.exit_code, 0) << done.out << done.err;
  auto again = run_command({bin("kmsfs"), "rewrap", cipher, "--quiet"});
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  EXPECT_NE(again.out.find("\"Rewrapped\": 0"), std::string::npos) << again.out;
  // Nothing needs the other key: disabled, every file still reads after a
  // remount.
  EXPECT_EQ(m->stop(), 0);
  auto dis = run_command({bin("kmsctl"), "disable-key", "--key-id", keys[1 - target]});
  ASSERT_EQ(dis.exit_code, 0) << dis.err;
  m = std::make_unique<ForegroundMount>(cipher, mnt, mount_args, log);
  ASSERT_NO_THROW(m->start());
  for (const auto& f : check_files(mnt, files)) ADD_FAILURE() << "after the last rewrap, other key disabled: " << f;
  EXPECT_EQ(m->stop(), 0);
  auto fsck = run_command({bin("kmsfs"), "fsck", cipher});
  EXPECT_EQ(fsck.exit_code, 0) << fsck.out << fsck.err;

  RecordProperty("rewrap_kills", kills);
  RecordProperty("rewrap_completed_runs", completed);
  RecordProperty("key_rotations", rotations);
  std::printf("rewrap crash test: %d iterations, %d kills of rewrap, %d runs completed, %d key rotations, "
              "%d key changes, %d rewrites through the mount, %d remounts, %d kmsfs.json.tmp leftovers repaired\n",
              n, kills, completed, rotations, key_changes, rewrites.load(), remounts, repaired_leftovers);
}

}  // namespace
}  // namespace kmsfs::test
