#include "crypto/random.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>

#include <atomic>
#include <climits>
#include <cstring>

namespace kmsfs::crypto {

namespace {

// Bumped in every child after fork(); a thread buffer filled in another
// epoch is discarded before use.
std::atomic<std::uint64_t> g_fork_epoch{0};

void on_fork_child() { g_fork_epoch.fetch_add(1, std::memory_order_relaxed); }

std::uint64_t fork_epoch() {
  static const bool registered = [] {
    if (::pthread_atfork(nullptr, nullptr, on_fork_child) != 0) {
      throw std::runtime_error("pthread_atfork failed: cannot make buffered randomness fork-safe");
    }
    return true;
  }();
  (void)registered;
  return g_fork_epoch.load(std::memory_order_relaxed);
}

constexpr std::size_t kPoolSize = 4096;
constexpr std::size_t kMaxPooledRequest = 256;

struct PublicPool {
  std::uint8_t bytes[kPoolSize];
  std::size_t pos = kPoolSize;  // next unused byte; kPoolSize = empty
  std::uint64_t epoch = 0;
  ~PublicPool() { OPENSSL_cleanse(bytes, sizeof bytes); }
};

}  // namespace

void random_bytes(std::span<std::uint8_t> out) {
  std::size_t done = 0;
  while (done < out.size()) {
    std::size_t chunk = out.size() - done;
    if (chunk > INT_MAX) chunk = INT_MAX;
    if (RAND_bytes(out.data() + done, static_cast<int>(chunk)) != 1) {
      throw std::runtime_error("RAND_bytes failed: the random generator is unusable");
    }
    done += chunk;
  }
}

void random_public_bytes(std::span<std::uint8_t> out) {
  if (out.size() > kMaxPooledRequest) {
    random_bytes(out);
    return;
  }
  thread_local PublicPool pool;
  const std::uint64_t epoch = fork_epoch();
  if (pool.epoch != epoch) {
    OPENSSL_cleanse(pool.bytes, sizeof pool.bytes);
    pool.pos = kPoolSize;
    pool.epoch = epoch;
  }
  if (kPoolSize - pool.pos < out.size()) {
    random_bytes(std::span(pool.bytes, kPoolSize));
    pool.pos = 0;
  }
  std::memcpy(out.data(), pool.bytes + pool.pos, out.size());
  OPENSSL_cleanse(pool.bytes + pool.pos, out.size());
  pool.pos += out.size();
}

}  // namespace kmsfs::crypto
