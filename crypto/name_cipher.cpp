#include "crypto/name_cipher.h"

#include <openssl/evp.h>

#include <climits>
#include <stdexcept>

#include "crypto/encoding.h"
#include "crypto/openssl_handles.h"

namespace kmsfs::crypto {

namespace {

const EVP_CIPHER* siv_cipher() {
  static const EvpCipherPtr c(EVP_CIPHER_fetch(nullptr, "AES-256-SIV", nullptr));
  return c.get();
}

std::span<const std::uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

}  // namespace

NameCipher::NameCipher(SecureBuffer key) : key_(std::move(key)) {
  if (key_.size() != kKeySize) throw std::invalid_argument("AES-256-SIV needs a 64-byte key");
  if (siv_cipher() == nullptr) throw std::runtime_error("OpenSSL lacks AES-256-SIV");
}

std::vector<std::uint8_t> NameCipher::siv_encrypt(std::span<const std::uint8_t> plain,
                                                  std::span<const std::uint8_t> ad) const {
  // A fresh context per call: SIV contexts cannot be re-keyed for reuse
  // across AD sets in OpenSSL 3.0, and names are not the hot path.
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  std::vector<std::uint8_t> out(kTagSize + plain.size());
  int len = 0;
  if (!ctx || plain.size() > INT_MAX || ad.size() > INT_MAX ||
      EVP_EncryptInit_ex2(ctx.get(), siv_cipher(), key_.data(), nullptr, nullptr) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, ad.data(), static_cast<int>(ad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), out.data() + kTagSize, &len, plain.data(),
                        static_cast<int>(plain.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), out.data() + kTagSize + plain.size(), &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_GET_TAG, static_cast<int>(kTagSize), out.data()) != 1) {
    throw std::runtime_error("AES-SIV encryption failed");
  }
  return out;
}

std::optional<std::vector<std::uint8_t>> NameCipher::siv_decrypt(
    std::span<const std::uint8_t> sealed, std::span<const std::uint8_t> ad) const {
  if (sealed.size() < kTagSize || sealed.size() > INT_MAX) return std::nullopt;
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const std::size_t n = sealed.size() - kTagSize;
  std::vector<std::uint8_t> out(n);
  int len = 0;
  if (!ctx || EVP_DecryptInit_ex2(ctx.get(), siv_cipher(), key_.data(), nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_AEAD_SET_TAG, static_cast<int>(kTagSize),
                          const_cast<std::uint8_t*>(sealed.data())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, ad.data(), static_cast<int>(ad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), out.data(), &len, sealed.data() + kTagSize,
                        static_cast<int>(n)) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), out.data() + n, &len) != 1) {
    return std::nullopt;
  }
  return out;
}

std::string NameCipher::encrypt_name(std::string_view name, DirIv dir_iv) const {
  return to_base64url(siv_encrypt(bytes_of(name), dir_iv));
}

std::optional<std::string> NameCipher::decrypt_name(std::string_view encrypted, DirIv dir_iv) const {
  auto raw = from_base64url(encrypted);
  if (!raw) return std::nullopt;
  auto plain = siv_decrypt(*raw, dir_iv);
  if (!plain) return std::nullopt;
  return std::string(plain->begin(), plain->end());
}

std::vector<std::uint8_t> NameCipher::seal(std::span<const std::uint8_t> plain, std::string_view ad) const {
  return siv_encrypt(plain, bytes_of(ad));
}

std::optional<std::vector<std::uint8_t>> NameCipher::open(std::span<const std::uint8_t> sealed,
                                                          std::string_view ad) const {
  return siv_decrypt(sealed, bytes_of(ad));
}

}  // namespace kmsfs::crypto
