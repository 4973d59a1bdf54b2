#include "crypto/sha256.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <stdexcept>

#include "crypto/openssl_handles.h"

namespace kmsfs::crypto {

namespace {

// SHA-256 fetched once for the process (EVP_sha256() in a one-shot digest
// fetches it again on every call: a lock and a hash-table look-up that cost
// more than hashing an audit record), never freed: threads may hash until
// the process ends.
const EVP_MD* sha256_md() {
  static const EVP_MD* const md = [] {
    EVP_MD* m = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (m == nullptr) throw std::runtime_error("SHA-256 is not available from OpenSSL");
    return m;
  }();
  return md;
}

}  // namespace

Sha256Digest sha256(std::span<const std::uint8_t> data) {
  // One context per thread, kept between calls (no allocation per hash).
  thread_local const EvpMdCtxPtr ctx{EVP_MD_CTX_new()};
  if (!ctx) throw std::runtime_error("SHA-256 failed: out of memory");
  Sha256Digest out{};
  unsigned int len = 0;
  const bool ok = EVP_DigestInit_ex2(ctx.get(), sha256_md(), nullptr) == 1 &&
                  EVP_DigestUpdate(ctx.get(), data.data(), data.size()) == 1 &&
                  EVP_DigestFinal_ex(ctx.get(), out.data(), &len) == 1;
  // Back to the initial state: nothing of the input's hash stays behind
  // between calls (callers hash secrets too, e.g. OAEP masks).
  const bool reset = EVP_DigestInit_ex2(ctx.get(), sha256_md(), nullptr) == 1;
  if (!ok || !reset || len != out.size()) throw std::runtime_error("SHA-256 failed");
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
  if (HMAC(sha256_md(), key_ptr, static_cast<int>(key.size()), data_ptr, data.size(),
           out.data(), &len) == nullptr) {
    throw std::runtime_error("HMAC-SHA-256 failed");
  }
  return out;
}

}  // namespace kmsfs::crypto
