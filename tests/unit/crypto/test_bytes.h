#pragma once
// Small helpers shared by the crypto unit tests: hex literals to bytes.

#include <cstdint>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "crypto/encoding.h"

namespace kmsfs::crypto::test {

// Hex literal -> bytes; a malformed literal is a bug in the test itself.
inline std::vector<std::uint8_t> hex(std::string_view h) {
  auto v = from_hex(h);
  if (!v) throw std::invalid_argument("bad hex literal in test");
  return *v;
}

}  // namespace kmsfs::crypto::test
