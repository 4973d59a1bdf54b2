#include "crypto/random.h"

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <vector>

namespace kmsfs::crypto {
namespace {

TEST(Random, FillsRequestedLength) {
  for (std::size_t n : {0u, 1u, 12u, 16u, 32u, 4096u}) EXPECT_EQ(random_vector(n).size(), n);
}

TEST(Random, SuccessiveFileIdsDiffer) {
  std::set<std::vector<std::uint8_t>> seen;
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(seen.insert(random_vector(16)).second);
}

TEST(Random, OutputIsNotConstant) {
  std::vector<std::uint8_t> v = random_vector(4096);
  std::set<std::uint8_t> distinct(v.begin(), v.end());
  // 4096 uniform bytes cover all 256 values with overwhelming probability;
  // a broken generator that repeats one byte would not.
  EXPECT_GT(distinct.size(), 200u);
}

TEST(Random, PublicBytesDoNotRepeat) {
  std::set<std::vector<std::uint8_t>> seen;
  for (int i = 0; i < 5000; ++i) {  // crosses several 4 KiB refills
    std::vector<std::uint8_t> iv(12);
    random_public_bytes(iv);
    EXPECT_TRUE(seen.insert(iv).second);
  }
  std::vector<std::uint8_t> big(1000);  // over the pooled size: straight from the DRBG
  random_public_bytes(big);
  EXPECT_NE(std::count(big.begin(), big.end(), 0), 1000);
}

// After fork() the child must not hand out the bytes the parent's buffer
// still holds (the parent would hand them out too: IV reuse).
TEST(Random, ForkedChildDoesNotRepeatTheParentsPublicBytes) {
  std::vector<std::uint8_t> warm(12);
  random_public_bytes(warm);  // the pool now holds unused bytes
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::vector<std::uint8_t> child(12 * 32);
    for (int i = 0; i < 32; ++i) random_public_bytes(std::span(child.data() + 12 * i, 12));
    (void)!::write(fds[1], child.data(), child.size());
    _exit(0);
  }
  ::close(fds[1]);
  std::vector<std::uint8_t> child(12 * 32);
  std::size_t got = 0;
  while (got < child.size()) {
    ssize_t n = ::read(fds[0], child.data() + got, child.size() - got);
    ASSERT_GT(n, 0);
    got += static_cast<std::size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  std::vector<std::uint8_t> parent(12 * 32);
  for (int i = 0; i < 32; ++i) random_public_bytes(std::span(parent.data() + 12 * i, 12));
  EXPECT_NE(parent, child);
  for (int i = 0; i < 32; ++i) {
    EXPECT_FALSE(std::equal(parent.begin() + 12 * i, parent.begin() + 12 * i + 12, child.begin() + 12 * i));
  }
}

}  // namespace
}  // namespace kmsfs::crypto
