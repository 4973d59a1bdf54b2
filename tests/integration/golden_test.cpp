// Today's kmsfs reads every committed golden volume (tests/golden/vN) byte
// for byte: the on-disk format and the KMS state layout never break.

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "crypto/encoding.h"
#include "crypto/sha256.h"
#include "tests/integration/mount_fixture.h"

namespace kmsfs::test {
namespace {

struct ManifestEntry {
  char type;
  std::string value;  // sha256 or symlink target
  std::string path;
};

std::vector<ManifestEntry> read_manifest(const std::string& file) {
  std::vector<ManifestEntry> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    // "T VALUE ./path" — the path may contain spaces, the value never does.
    auto first = line.find(' ');
    auto second = line.find(' ', first + 1);
    out.push_back({line[0], line.substr(first + 1, second - first - 1), line.substr(second + 3)});
  }
  return out;
}

void check_version(const std::string& version) {
  const std::string src = std::string(KMSFS_SOURCE_DIR) + "/tests/golden/" + version;
  TempKms kms;  // a temp root; KMSFS_HOME is pointed at the golden copy below
  const std::string copy = kms.root() + "/" + version;
  auto r = run_command({"/bin/cp", "-a", src, copy});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // git keeps no modes: restore what the KMS insists on.
  ASSERT_EQ(::chmod((copy + "/home").c_str(), 0700), 0);
  for (const char* f : {"/home/pin", "/home/so-pin"}) ASSERT_EQ(::chmod((copy + f).c_str(), 0600), 0);
  r = run_command({"/bin/chmod", "-R", "go-rwx", copy + "/home"});
  ASSERT_EQ(r.exit_code, 0);
  ::setenv("KMSFS_HOME", (copy + "/home").c_str(), 1);

  for (const std::string kind : {"encrypted", "plaintext"}) {
    SCOPED_TRACE(version + " " + kind);
    const std::string cipher = copy + "/cipher-" + kind;
    const std::string mnt = copy + "/mnt-" + kind;
    ASSERT_EQ(::mkdir(mnt.c_str(), 0700), 0);
    r = run_command({bin("kmsfs"), "mount", cipher, mnt, "-o", "ro"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto manifest = read_manifest(copy + "/manifest-" + kind + ".txt");
    ASSERT_GT(manifest.size(), 10U);
    for (const auto& e : manifest) {
      const std::string p = mnt + "/" + e.path;
      struct stat st {};
      ASSERT_EQ(::lstat(p.c_str(), &st), 0) << e.path;
      if (e.type == 'D') {
        EXPECT_TRUE(S_ISDIR(st.st_mode)) << e.path;
      } else if (e.type == 'L') {
        char buf[4096] = {};
        ASSERT_GT(::readlink(p.c_str(), buf, sizeof buf - 1), 0) << e.path;
        EXPECT_EQ(std::string(buf), e.value) << e.path;
      } else {
        auto data = read_file(p);
        EXPECT_EQ(crypto::to_hex(crypto::sha256(data)), e.value) << e.path;
        EXPECT_EQ(static_cast<size_t>(st.st_size), data.size()) << e.path;
      }
    }
    r = run_command({bin("kmsfs"), "fsck", cipher});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    r = run_command({bin("kmsfs"), "umount", mnt});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
}

TEST(Golden, Version1StillReadsByteForByte) { check_version("v1"); }

}  // namespace
}  // namespace kmsfs::test
