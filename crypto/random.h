#pragma once
// CSPRNG: OpenSSL's RAND_bytes (DRBG seeded from the kernel).

#include <cstdint>
#include <span>
#include <stdexcept>
#include <vector>

namespace kmsfs::crypto {

// Fills `out`. Throws std::runtime_error only if the DRBG is broken, which is
// a broken invariant: nothing may continue without randomness.
void random_bytes(std::span<std::uint8_t> out);

inline std::vector<std::uint8_t> random_vector(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  random_bytes(v);
  return v;
}

}  // namespace kmsfs::crypto
