// KeyStore's in-memory cache (#6): records and aliases are parsed once and
// revalidated by a stat, and a change by another process — including an
// in-place rewrite of the same size in the same timestamp tick — is seen.

#include "keyclient/key_store.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using namespace std::chrono_literals;

constexpr const char* kKeyId = "0b7f3c2e-52c4-4a8e-9d55-4a2c1f7e9b10";

KeyRecord record(const std::string& description) {
  KeyRecord r;
  r.metadata.key_id = kKeyId;
  r.metadata.arn = std::string("arn:aws:kms:local:000000000000:key/") + kKeyId;
  r.metadata.description = description;
  r.metadata.enabled = true;
  r.versions.push_back(KeyVersion{1, std::string("kmsfs/") + kKeyId + "/v1", 1.0, "", 0, true});
  return r;
}

// Waits until a file written now is no longer "racily clean".
void settle() { std::this_thread::sleep_for(std::chrono::nanoseconds(KeyStore::kRacyWindowNs) + 10ms); }

TEST(KeyStore, SettledRecordIsParsedOnce) {
  const std::string dir = test::make_temp_dir("store");
  KeyStore store(dir);
  ASSERT_TRUE(store.write_key(record("aaaa")));
  settle();
  for (int i = 0; i < 10; ++i) {
    auto r = store.load_key(kKeyId);
    ASSERT_TRUE(r && *r);
    EXPECT_EQ((*r)->metadata.description, "aaaa");
  }
  EXPECT_EQ(store.parses(), 1u);
}

TEST(KeyStore, SeesARecordReplacedByAnotherProcess) {
  const std::string dir = test::make_temp_dir("store");
  KeyStore store(dir);
  ASSERT_TRUE(store.write_key(record("aaaa")));
  settle();
  ASSERT_EQ((*store.load_key(kKeyId))->metadata.description, "aaaa");
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    KeyStore other(dir);
    auto lock = other.lock();
    _exit(lock && other.write_key(record("bbbb")) ? 0 : 1);  // same size
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto r = store.load_key(kKeyId);
  ASSERT_TRUE(r && *r);
  EXPECT_EQ((*r)->metadata.description, "bbbb");
}

// An in-place rewrite (same inode, same size) right after a read may carry
// the same coarse mtime: a record read within the racy window is never
// served from the cache.
TEST(KeyStore, SameSizeRewriteInTheSameTickIsSeen) {
  const std::string dir = test::make_temp_dir("store");
  KeyStore store(dir);
  ASSERT_TRUE(store.write_key(record("aaaa")));
  ASSERT_EQ((*store.load_key(kKeyId))->metadata.description, "aaaa");
  const std::string path = store.key_path(kKeyId);
  std::string text = test::read_text(path);
  auto pos = text.find("aaaa");
  ASSERT_NE(pos, std::string::npos);
  text.replace(pos, 4, "cccc");
  test::write_text(path, text);
  EXPECT_EQ((*store.load_key(kKeyId))->metadata.description, "cccc");
}

TEST(KeyStore, RemovedRecordIsGone) {
  const std::string dir = test::make_temp_dir("store");
  KeyStore store(dir);
  ASSERT_TRUE(store.write_key(record("aaaa")));
  settle();
  ASSERT_TRUE(*store.load_key(kKeyId));
  ASSERT_EQ(::unlink(store.key_path(kKeyId).c_str()), 0);
  auto r = store.load_key(kKeyId);
  ASSERT_TRUE(r);
  EXPECT_FALSE(*r);
}

TEST(KeyStore, AliasesAreCachedAndRevalidated) {
  const std::string dir = test::make_temp_dir("store");
  KeyStore store(dir);
  ASSERT_TRUE(store.write_aliases({AliasRecord{"alias/a", kKeyId, 1.0}}));
  settle();
  for (int i = 0; i < 5; ++i) ASSERT_EQ(store.load_aliases()->size(), 1u);
  EXPECT_EQ(store.parses(), 1u);
  KeyStore other(dir);
  ASSERT_TRUE(other.write_aliases({AliasRecord{"alias/a", kKeyId, 1.0}, AliasRecord{"alias/b", kKeyId, 2.0}}));
  auto a = store.load_aliases();
  ASSERT_TRUE(a);
  ASSERT_EQ(a->size(), 2u);
  EXPECT_EQ((*a)[1].alias_name, "alias/b");
}

}  // namespace
}  // namespace kmsfs::keyclient
