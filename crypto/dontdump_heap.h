#pragma once

// A heap for OpenSSL that keeps its memory out of core dumps.
//
// OpenSSL keeps key material in memory it allocates itself: the AES key
// schedule of a cipher context (whose first round keys are the key), the
// GHASH table, HMAC states. SecureBuffer protects the keys kmsfs holds; this
// protects the copies OpenSSL makes. Installed first thing in main() of the
// processes that hold data keys (kmsfs, kmsd, kmsctl), it routes every
// OpenSSL allocation into anonymous mappings marked MADV_DONTDUMP (and
// mlock'd when RLIMIT_MEMLOCK allows), and zeroes every block when it is
// freed.
//
// Small blocks (up to 64 KiB with their header) come from power-of-two size
// classes carved out of 1 MiB chunks, kept on per-class free lists; larger
// ones are mapped one by one. Thread-safe. Memory of the small classes is
// reused, never returned to the system (OpenSSL's working set is small).

namespace kmsfs::crypto {

// Must run before OpenSSL allocates anything (CRYPTO_set_mem_functions
// refuses afterwards): returns false then, and OpenSSL keeps malloc.
bool install_openssl_dontdump_heap() noexcept;

// For tests: whether `p` (a pointer OpenSSL returned) lies in this heap.
bool in_dontdump_heap(const void* p) noexcept;

}  // namespace kmsfs::crypto
