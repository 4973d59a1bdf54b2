#include "crypto/sha256.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <stdexcept>

namespace kmsfs::crypto {

Sha256Digest sha256(std::span<const std::uint8_t> data) {
  Sha256Digest out{};
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("SHA-256 failed");
  }
  return out;
}

Sha256Digest hmac_sha256(std::span<const std::uint8_t> key, std::span<const std::uint8_t> data) {
  Sha256Digest out{};
  unsigned int len = 0;
  // HMAC() fails for a null key pointer, which is what an empty span
  // carries; an empty key is valid HMAC (RFC 2104 pads it with zeros).
  static const std::uint8_t kNoKey = 0;
  const std::uint8_t* key_ptr = key.empty() ? &kNoKey : key.data();
  static const std::uint8_t kNoData = 0;
  const std::uint8_t* data_ptr = data.empty() ? &kNoData : data.data();
  if (HMAC(EVP_sha256(), key_ptr, static_cast<int>(key.size()), data_ptr, data.size(),
           out.data(), &len) == nullptr) {
    throw std::runtime_error("HMAC-SHA-256 failed");
  }
  return out;
}

}  // namespace kmsfs::crypto
