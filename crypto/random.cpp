#include "crypto/random.h"

#include <openssl/rand.h>

#include <climits>

namespace kmsfs::crypto {

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

}  // namespace kmsfs::crypto
