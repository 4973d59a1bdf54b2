#include "crypto/aes_gcm.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <climits>

#include "crypto/openssl_handles.h"

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

EVP_CIPHER_CTX* thread_ctx() noexcept {
  thread_local EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  return ctx.get();
}

bool fits_int(std::size_t n) { return n <= static_cast<std::size_t>(INT_MAX); }

}  // namespace

bool AesGcm::encrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                     std::span<const std::uint8_t> aad, std::span<const std::uint8_t> pt,
                     std::uint8_t* ct_out, std::uint8_t* tag_out) noexcept {
  const EVP_CIPHER* cipher = cipher_for(key.size());
  EVP_CIPHER_CTX* ctx = thread_ctx();
  if (cipher == nullptr || ctx == nullptr || iv.size() != kIvSize || !fits_int(pt.size()) ||
      !fits_int(aad.size())) {
    return false;
  }
  int len = 0;
  if (EVP_EncryptInit_ex2(ctx, cipher, key.data(), iv.data(), nullptr) != 1) return false;
  if (!aad.empty() &&
      EVP_EncryptUpdate(ctx, nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1) {
    return false;
  }
  if (!pt.empty() &&
      EVP_EncryptUpdate(ctx, ct_out, &len, pt.data(), static_cast<int>(pt.size())) != 1) {
    return false;
  }
  if (EVP_EncryptFinal_ex(ctx, ct_out + pt.size(), &len) != 1) return false;
  return EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagSize), tag_out) == 1;
}

bool AesGcm::decrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                     std::span<const std::uint8_t> aad, std::span<const std::uint8_t> ct,
                     std::span<const std::uint8_t> tag, std::uint8_t* pt_out) noexcept {
  const EVP_CIPHER* cipher = cipher_for(key.size());
  EVP_CIPHER_CTX* ctx = thread_ctx();
  if (cipher == nullptr || ctx == nullptr || iv.size() != kIvSize || tag.size() != kTagSize ||
      !fits_int(ct.size()) || !fits_int(aad.size())) {
    return false;
  }
  int len = 0;
  bool ok = EVP_DecryptInit_ex2(ctx, cipher, key.data(), iv.data(), nullptr) == 1;
  ok = ok && (aad.empty() || EVP_DecryptUpdate(ctx, nullptr, &len, aad.data(),
                                               static_cast<int>(aad.size())) == 1);
  ok = ok && (ct.empty() ||
              EVP_DecryptUpdate(ctx, pt_out, &len, ct.data(), static_cast<int>(ct.size())) == 1);
  ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagSize),
                                 const_cast<std::uint8_t*>(tag.data())) == 1;
  ok = ok && EVP_DecryptFinal_ex(ctx, pt_out + ct.size(), &len) == 1;
  if (!ok && !ct.empty()) OPENSSL_cleanse(pt_out, ct.size());
  return ok;
}

}  // namespace kmsfs::crypto
