#pragma once
// CSPRNG: OpenSSL's RAND_bytes (DRBG seeded from the kernel).

#include <cstdint>
#include <span>
#include <stdexcept>
#include <vector>

namespace kmsfs::crypto {

// Fills `out`. Throws std::runtime_error only if the DRBG is broken, which is
// a broken invariant: nothing may continue without randomness. Use this for
// anything secret (keys, PINs).
void random_bytes(std::span<std::uint8_t> out);

// Random bytes for PUBLIC values only — IVs, nonces, file ids, request ids —
// served from a per-thread buffer that is refilled from RAND_bytes 4 KiB at
// a time, so that a caller needing 12 bytes per 4 KiB block does not pay a
// DRBG call (its lock and fork check) per block. The bytes are exactly as
// random as random_bytes' (they are RAND_bytes output, each handed out
// once and cleansed from the buffer as it is). Fork-safe: a child process
// discards the buffer it inherited (a pthread_atfork handler), so parent and
// child never hand out the same bytes. Never use it for secrets: unused
// bytes sit in ordinary memory until they are handed out. Requests over
// 256 bytes go straight to RAND_bytes.
void random_public_bytes(std::span<std::uint8_t> out);

inline std::vector<std::uint8_t> random_vector(std::size_t n) {
  std::vector<std::uint8_t> v(n);
  random_bytes(v);
  return v;
}

}  // namespace kmsfs::crypto
