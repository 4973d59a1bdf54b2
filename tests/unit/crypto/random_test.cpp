#include "crypto/random.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace kmsfs::crypto
