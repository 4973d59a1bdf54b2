// kmsfs rewrap on a live 1,000-file volume: interrupted by SIGKILL, resumed,
// then every file reads back and every header names the new key.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

std::string json_field(const std::string& text, const std::string& field) {
  const std::string key = "\"" + field + "\": \"";
  auto p = text.find(key);
  if (p == std::string::npos) return "";
  p += key.size();
  return text.substr(p, text.find('"', p) - p);
}

long json_number(const std::string& text, const std::string& field) {
  const std::string key = "\"" + field + "\": ";
  auto p = text.find(key);
  if (p == std::string::npos) return -1;
  return std::stol(text.substr(p + key.size()));
}

// The key id and version named by a backing file's header (docs/format.md:
// the wrapped DEK at offset 30 is a KMS blob: magic, key id, version).
struct HeaderKey {
  std::string uuid_hex;
  std::uint32_t version = 0;
};
std::optional<HeaderKey> header_key(const std::string& path) {
  // A file listed a moment ago may be gone: rewrap's kmsfs.json.tmp, renamed
  // over kmsfs.json while the test polls the directory.
  std::vector<std::uint8_t> bytes;
  try {
    bytes = read_file(path);
  } catch (const std::exception&) {
    if (::access(path.c_str(), F_OK) != 0) return std::nullopt;
    throw;
  }
  if (bytes.size() < 128 || std::memcmp(bytes.data(), "KMSFSHDR", 8) != 0) return std::nullopt;
  const std::uint8_t* blob = bytes.data() + 30;
  HeaderKey k;
  static const char* hex = "0123456789abcdef";
  for (int i = 4; i < 20; ++i) {
    k.uuid_hex.push_back(hex[blob[i] >> 4]);
    k.uuid_hex.push_back(hex[blob[i] & 15]);
  }
  k.version = (std::uint32_t{blob[20]} << 24) | (std::uint32_t{blob[21]} << 16) | (std::uint32_t{blob[22]} << 8) | blob[23];
  return k;
}

std::string uuid_hex(std::string uuid) {
  std::string out;
  for (char c : uuid) {
    if (c != '-') out.push_back(c);
  }
  return out;
}

TEST(Rewrap, ThousandFilesInterruptedAndResumedOnALiveMount) {
  TempKms kms;
  ASSERT_EQ(run_command({bin("kmsctl"), "create-key", "--alias", "alias/old"}).exit_code, 0);
  auto nk = run_command({bin("kmsctl"), "create-key", "--alias", "alias/new"});
  ASSERT_EQ(nk.exit_code, 0) << nk.err;
  const std::string new_key = json_field(nk.out, "KeyId");
  Mount m(kms.root(), "rw", "alias/old");
  m.mount();
  constexpr int kFiles = 1000;
  for (int d = 0; d < 10; ++d) ASSERT_EQ(::mkdir(m.path("d" + std::to_string(d)).c_str(), 0755), 0);
  auto name = [](int i) { return "d" + std::to_string(i % 10) + "/f" + std::to_string(i); };
  for (int i = 0; i < kFiles; ++i) write_file(m.path(name(i)), random_bytes(100 + static_cast<std::size_t>(i), static_cast<std::uint32_t>(i)));

  // Open for writing, still empty: the mount prepared its data key under
  // the old key.
  const int held = ::open(m.path("held").c_str(), O_CREAT | O_WRONLY, 0644);
  ASSERT_GE(held, 0) << std::strerror(errno);

  // First run: killed part way.
  pid_t pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 1);
    ::dup2(devnull, 2);
    std::string k = bin("kmsfs");
    std::string c = m.cipher();
    char* argv[] = {k.data(), const_cast<char*>("rewrap"), c.data(), const_cast<char*>("--to-key"),
                    const_cast<char*>("alias/new"), nullptr};
    ::execv(argv[0], argv);
    ::_exit(127);
  }
  // Kill once some, not all, headers name the new key.
  int under_new = 0;
  for (int tries = 0; tries < 2000; ++tries) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    under_new = 0;
    for (const auto& f : list_files(m.cipher())) {
      auto h = header_key(f);
      if (h && h->uuid_hex == uuid_hex(new_key)) ++under_new;
    }
    if (under_new >= 50) break;
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "rewrap finished before it could be interrupted";
  ASSERT_GT(under_new, 0);
  // Half-done: everything still reads (each file opens under either key).
  for (int i = 0; i < kFiles; i += 37) {
    EXPECT_EQ(read_file(m.path(name(i))), random_bytes(100 + static_cast<std::size_t>(i), static_cast<std::uint32_t>(i))) << name(i);
  }

  // Second run completes what is left and skips what is done.
  auto r = run_command({bin("kmsfs"), "rewrap", m.cipher(), "--to-key", "alias/new"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(json_number(r.out, "Files"), kFiles + 1);  // and "held", empty: no header to rewrap
  EXPECT_EQ(json_number(r.out, "Failed"), 0);
  EXPECT_GT(json_number(r.out, "AlreadyCurrent"), 0) << r.out;
  EXPECT_EQ(json_number(r.out, "Rewrapped") + json_number(r.out, "AlreadyCurrent"), kFiles);
  EXPECT_NE(r.err.find("rewrap: 1001/1001 files"), std::string::npos) << r.err;  // progress
  auto info = run_command({bin("kmsfs"), "info", m.cipher()});
  EXPECT_NE(info.out.find(new_key), std::string::npos) << info.out;  // kmsfs.json names the new key

  // The live mount follows kmsfs.json: a file created now (from the
  // prefetched pool, too) is wrapped under the new key, and so is a file
  // that was open for writing (its prepared data key is dropped).
  const int kNew = 8;
  for (int i = 0; i < kNew; ++i) write_file(m.path("after" + std::to_string(i)), random_bytes(10, 7u));
  ASSERT_EQ(::write(held, "held", 4), 4);
  ASSERT_EQ(::fsync(held), 0);
  ASSERT_EQ(::close(held), 0);

  // Every header names the new key; every file reads back, live and after a remount.
  int headers = 0;
  for (const auto& f : list_files(m.cipher())) {
    auto h = header_key(f);
    if (!h) continue;
    ++headers;
    EXPECT_EQ(h->uuid_hex, uuid_hex(new_key)) << f;
    EXPECT_EQ(h->version, 1u) << f;
  }
  EXPECT_EQ(headers, kFiles + kNew + 1);
  for (int i = 0; i < kFiles; ++i) {
    ASSERT_EQ(read_file(m.path(name(i))), random_bytes(100 + static_cast<std::size_t>(i), static_cast<std::uint32_t>(i))) << name(i);
  }
  m.unmount();
  // The old key can go: nothing needs it any more.
  ASSERT_EQ(run_command({bin("kmsctl"), "disable-key", "--key-id", "alias/old"}).exit_code, 0);
  m.mount();
  for (int i = 0; i < kFiles; i += 7) {
    ASSERT_EQ(read_file(m.path(name(i))), random_bytes(100 + static_cast<std::size_t>(i), static_cast<std::uint32_t>(i))) << name(i);
  }
  // Rotation, then rewrap to the newest version of the same key.
  ASSERT_EQ(run_command({bin("kmsctl"), "rotate-key-on-demand", "--key-id", "alias/new"}).exit_code, 0);
  auto r2 = run_command({bin("kmsfs"), "rewrap", m.cipher(), "--quiet"});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_EQ(json_number(r2.out, "Rewrapped"), kFiles + kNew + 1);
  for (const auto& f : list_files(m.cipher())) {
    auto h = header_key(f);
    if (h) {
      EXPECT_EQ(h->version, 2u) << f;
    }
  }
  for (int i = 0; i < kFiles; i += 11) {
    ASSERT_EQ(read_file(m.path(name(i))), random_bytes(100 + static_cast<std::size_t>(i), static_cast<std::uint32_t>(i)));
  }
}

// Rewrap replaces a header only while holding an OFD write lock on the
// header's bytes, and a live mount writes the first header of an emptied
// file only under the same lock: otherwise a rewrap that read the old
// header could write it back over the new one (truncate to zero, then a
// new data key), leaving the data under a key no header names. Here the
// test holds the lock as rewrap would: the mount's write must wait for it.
TEST(Rewrap, MountWaitsForTheHeaderLockARewrapHolds) {
  TempKms kms;
  Mount m(kms.root(), "lk");
  m.mount();
  const std::vector<std::uint8_t> first = random_bytes(5000, 1);
  const std::vector<std::uint8_t> second = random_bytes(7000, 2);
  write_file(m.path("f"), first);
  std::string backing;
  for (const auto& f : list_files(m.cipher())) {
    if (header_key(f)) backing = f;
  }
  ASSERT_FALSE(backing.empty());
  const int bfd = ::open(backing.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(bfd, 0) << std::strerror(errno);
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_len = 128;
  ASSERT_EQ(::fcntl(bfd, F_OFD_SETLK, &fl), 0) << std::strerror(errno);

  std::atomic<bool> done{false};
  std::atomic<int> error{0};
  std::thread writer([&] {
    const int fd = ::open(m.path("f").c_str(), O_WRONLY | O_TRUNC);
    if (fd < 0) {
      error = errno;
    } else {
      if (::write(fd, second.data(), second.size()) != static_cast<ssize_t>(second.size()) || ::fsync(fd) != 0) {
        error = errno;
      }
      ::close(fd);
    }
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const bool waited = !done.load();
  fl.l_type = F_UNLCK;
  EXPECT_EQ(::fcntl(bfd, F_OFD_SETLK, &fl), 0);
  writer.join();
  ::close(bfd);
  EXPECT_TRUE(waited) << "the mount wrote a new header while the header lock was held";
  EXPECT_EQ(error.load(), 0) << std::strerror(error.load());
  EXPECT_EQ(read_file(m.path("f")), second);
  m.unmount();
  auto r = run_command({bin("kmsfs"), "fsck", m.cipher()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  m.mount();
  EXPECT_EQ(read_file(m.path("f")), second);
}

}  // namespace
}  // namespace kmsfs::test
