#pragma once
// AES-GCM through OpenSSL EVP. Each thread owns one EVP_CIPHER_CTX; the
// EVP_CIPHER objects are fetched once per process. Nothing here allocates
// per call, so the block paths can call it for every 4 KiB block. The
// thread's context keeps the key schedule of the last key it used: a call
// with the same key (compared in constant time) only sets the new IV, which
// saves the AES key expansion and GHASH table setup per block. The output
// is identical either way.

#include <cstddef>
#include <cstdint>
#include <span>

namespace kmsfs::crypto {

class AesGcm {
 public:
  static constexpr std::size_t kIvSize = 12;
  static constexpr std::size_t kTagSize = 16;

  // Key must be 16 or 32 bytes, iv 12 bytes. `ct_out` has room for
  // pt.size() bytes (it may alias pt), `tag_out` for 16. Returns false only
  // on an OpenSSL failure (bad key size included).
  static bool encrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                      std::span<const std::uint8_t> aad, std::span<const std::uint8_t> pt,
                      std::uint8_t* ct_out, std::uint8_t* tag_out) noexcept;

  // Returns false when the tag does not verify (or on an OpenSSL failure);
  // `pt_out` (room for ct.size(), may alias ct) is then cleansed.
  static bool decrypt(std::span<const std::uint8_t> key, std::span<const std::uint8_t> iv,
                      std::span<const std::uint8_t> aad, std::span<const std::uint8_t> ct,
                      std::span<const std::uint8_t> tag, std::uint8_t* pt_out) noexcept;

  // Cleanses the calling thread's cached key and key schedule now (they
  // are otherwise kept until the thread uses another key or exits).
  static void forget_thread_key() noexcept;

  // Cleanses every thread's cached copy and key schedule of `key`: call it
  // when the key is freed (a file closed), so that no idle thread keeps it.
  static void forget_key_everywhere(std::span<const std::uint8_t> key) noexcept;
};

}  // namespace kmsfs::crypto
