#include "crypto/aes_gcm.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <vector>

#include "crypto/openssl_handles.h"
#include "crypto/secure_buffer.h"

namespace kmsfs::crypto {

namespace {

const EVP_CIPHER* cipher_for(std::size_t key_size) noexcept {
  // Fetched once per process (thread-safe static init); freed at exit.
  static const EvpCipherPtr aes128(EVP_CIPHER_fetch(nullptr, "AES-128-GCM", nullptr));
  static const EvpCipherPtr aes256(EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr));
  if (key_size == 16) return aes128.get();
  if (key_size == 32) return aes256.get();
  return nullptr;
}

// One context per thread, remembering which key its key schedule holds, so
// that consecutive blocks under the same DEK (the common case: a request's
// blocks, a file's requests) only set a new IV instead of expanding the key
// and rebuilding the GHASH table per block. The key copy lives exactly as
// long as the context's own key schedule (which begins with the raw key
// bytes anyway): until the thread uses another key or exits, when both are
// cleansed (EVP_CIPHER_CTX_free cleanses the schedule), or until the key
// is freed: forget_key_everywhere then cleanses it in every thread.
// The copy is a SecureBuffer (locked, out of core dumps) and the context
// comes from OpenSSL's heap, which the tools route into MADV_DONTDUMP maps
// (crypto/dontdump_heap.h): neither reaches a core dump.
struct ThreadCipher;

// Every thread's context, so that a freed key can be cleansed from all of
// them (forget_key_everywhere). Never destroyed: threads may outlive
// static destruction at exit.
struct Registry {
  std::mutex mu;  // guards all
  std::vector<ThreadCipher*> all;
};
Registry& registry() {
  static Registry* r = new Registry;
  return *r;
}

struct ThreadCipher {
  // Held by the owning thread for each operation and by
  // forget_key_everywhere while it inspects this context.
  std::mutex mu;
  EvpCipherCtxPtr ctx{EVP_CIPHER_CTX_new()};
  SecureBuffer key_copy{32};
  std::uint8_t* key = key_copy.data();
  std::size_t key_size = 0;  // 0 = no key loaded

  bool holds(std::span<const std::uint8_t> k) const noexcept {
    return key_size != 0 && key_size == k.size() && CRYPTO_memcmp(key, k.data(), k.size()) == 0;
  }
  // Loads `k` (full init) or, when it is loaded already, only the IV.
  bool init(bool encrypt, std::span<const std::uint8_t> k, const std::uint8_t* iv) noexcept {
    if (holds(k)) {
      return EVP_CipherInit_ex2(ctx.get(), nullptr, nullptr, iv, encrypt ? 1 : 0, nullptr) == 1;
    }
    const EVP_CIPHER* cipher = cipher_for(k.size());
    forget();
    if (cipher == nullptr ||
        EVP_CipherInit_ex2(ctx.get(), cipher, k.data(), iv, encrypt ? 1 : 0, nullptr) != 1) {
      return false;
    }
    std::memcpy(key, k.data(), k.size());
    key_size = k.size();
    scrub_stack();  // the key expansion's temporaries
    return true;
  }
  void forget() noexcept {
    if (key_size == 0) return;
    OPENSSL_cleanse(key, key_copy.size());
    key_size = 0;
  }
  // forget() and the key schedule too (freed, and so cleansed, by OpenSSL).
  void reset() noexcept {
    forget();
    (void)EVP_CIPHER_CTX_reset(ctx.get());
  }

  ThreadCipher() {
    std::lock_guard<std::mutex> lock(registry().mu);
    registry().all.push_back(this);
  }
  ~ThreadCipher() {
    std::lock_guard<std::mutex> lock(registry().mu);
    auto& v = registry().all;
    v.erase(std::remove(v.begin(), v.end(), this), v.end());
  }
  ThreadCipher(const ThreadCipher&) = delete;
  ThreadCipher& operator=(const ThreadCipher&) = delete;
};

ThreadCipher* thread_cipher() noexcept {
  thread_local ThreadCipher tc;
  return tc.ctx ? &tc : nullptr;
}

bool fits_int(std::size_t n) { return n <= static_cast<std::size_t>(INT_MAX); }

}  // namespace

bool AesGcm::encrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                     std::span<const std::uint8_t> aad, std::span<const std::uint8_t> pt,
                     std::uint8_t* ct_out, std::uint8_t* tag_out) noexcept {
  ThreadCipher* tc = thread_cipher();
  if (tc == nullptr || cipher_for(key.size()) == nullptr || iv.size() != kIvSize || !fits_int(pt.size()) ||
      !fits_int(aad.size())) {
    return false;
  }
  const std::lock_guard<std::mutex> lock(tc->mu);  // uncontended but for forget_key_everywhere
  EVP_CIPHER_CTX* ctx = tc->ctx.get();
  int len = 0;
  bool ok = tc->init(true, key, iv.data());
  ok = ok && (aad.empty() || EVP_EncryptUpdate(ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())) == 1);
  ok = ok && (pt.empty() || EVP_EncryptUpdate(ctx, ct_out, &len, pt.data(), static_cast<int>(pt.size())) == 1);
  ok = ok && EVP_EncryptFinal_ex(ctx, ct_out + pt.size(), &len) == 1;
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize), tag_out) == 1;
  if (!ok) tc->forget();  // the next call starts from a full init
  return ok;
}

bool AesGcm::decrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                     std::span<const std::uint8_t> aad, std::span<const std::uint8_t> ct,
                     std::span<const std::uint8_t> tag, std::uint8_t* pt_out) noexcept {
  ThreadCipher* tc = thread_cipher();
  if (tc == nullptr || cipher_for(key.size()) == nullptr || iv.size() != kIvSize || tag.size() != kTagSize ||
      !fits_int(ct.size()) || !fits_int(aad.size())) {
    return false;
  }
  const std::lock_guard<std::mutex> lock(tc->mu);
  EVP_CIPHER_CTX* ctx = tc->ctx.get();
  int len = 0;
  bool ok = tc->init(false, key, iv.data());
  ok = ok && (aad.empty() || EVP_DecryptUpdate(ctx, nullptr, &len, aad.data(),
                                               static_cast<int>(aad.size())) == 1);
  ok = ok && (ct.empty() ||
              EVP_DecryptUpdate(ctx, pt_out, &len, ct.data(), static_cast<int>(ct.size())) == 1);
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize),
                                 const_cast<std::uint8_t*>(tag.data())) == 1;
  const bool authentic = ok && EVP_DecryptFinal_ex(ctx, pt_out + ct.size(), &len) == 1;
  // A wrong tag leaves the context usable (the next IV resets it); any
  // other failure makes the next call start from a full init.
  if (!ok) tc->forget();
  if (!authentic && !ct.empty()) OPENSSL_cleanse(pt_out, ct.size());
  return authentic;
}

void AesGcm::forget_thread_key() noexcept {
  ThreadCipher* tc = thread_cipher();
  if (tc == nullptr) return;
  const std::lock_guard<std::mutex> lock(tc->mu);
  tc->reset();
}

void AesGcm::forget_key_everywhere(std::span<const std::uint8_t> key) noexcept {
  if (key.empty()) return;
  std::lock_guard<std::mutex> reg(registry().mu);
  for (ThreadCipher* tc : registry().all) {
    const std::lock_guard<std::mutex> lock(tc->mu);
    if (tc->holds(key)) tc->reset();
  }
}

}  // namespace kmsfs::crypto
