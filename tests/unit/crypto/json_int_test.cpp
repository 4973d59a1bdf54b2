// Integers from untrusted JSON: only an integer that fits the target type
// is accepted; a float (1e300 made nlohmann's get<int>() undefined
// behaviour, found by fuzz_volume_config and fuzz_kms_json), a fraction, a
// negative for an unsigned type or an out-of-range value is a type_error.

#include "crypto/json_int.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace kmsfs::crypto {
namespace {

using nlohmann::json;

TEST(JsonInt, AcceptsOnlyIntegersThatFit) {
  EXPECT_EQ(json_int<int>(json(7)), 7);
  EXPECT_EQ(json_int<int>(json(-7)), -7);
  EXPECT_EQ(json_int<std::uint32_t>(json(4096)), 4096u);
  EXPECT_EQ(json_int<std::uint64_t>(json(std::uint64_t{1} << 63)), std::uint64_t{1} << 63);
  EXPECT_THROW(json_int<int>(json::parse("1e300")), json::type_error);
  EXPECT_THROW(json_int<int>(json(1.5)), json::type_error);
  EXPECT_THROW(json_int<int>(json(4.0)), json::type_error);  // a float, even a whole one
  EXPECT_THROW(json_int<std::uint32_t>(json(-1)), json::type_error);
  EXPECT_THROW(json_int<int>(json(std::int64_t{1} << 40)), json::type_error);
  EXPECT_THROW(json_int<std::int64_t>(json(std::uint64_t{1} << 63)), json::type_error);
  EXPECT_THROW(json_int<int>(json("7")), json::type_error);
  EXPECT_THROW(json_int<int>(json(true)), json::type_error);
}

TEST(JsonInt, OrFallsBackOnlyWhenAbsentOrNull) {
  const json j = json::parse(R"({"a": 3, "n": null, "f": 1e300})");
  EXPECT_EQ(json_int_or(j, "a", 9), 3);
  EXPECT_EQ(json_int_or(j, "n", 9), 9);
  EXPECT_EQ(json_int_or(j, "missing", 9), 9);
  EXPECT_THROW(json_int_or(j, "f", 9), json::type_error);
}

}  // namespace
}  // namespace kmsfs::crypto
