#pragma once
// Encrypted names (format feature "encrypted_names", docs/format.md):
// AES-256-SIV (RFC 5297) under the volume's 64-byte name key. SIV is
// deterministic, so the same name in the same directory always maps to the
// same backing name (lookups need no directory scan), while the directory's
// random 16-byte IV, passed as associated data, makes the same name differ
// between directories.
//
//   backing name = base64url_nopad( SIV tag (16) ‖ ciphertext (len(name)) )
//
// Symlink targets and xattr names/values use the same cipher with a
// purpose string as associated data instead of a directory IV.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "crypto/secure_buffer.h"

namespace kmsfs::crypto {

using DirIv = std::span<const std::uint8_t, 16>;

class NameCipher {
 public:
  static constexpr std::size_t kKeySize = 64;
  static constexpr std::size_t kTagSize = 16;

  // key: 64 bytes (AES-256-SIV's two halves). Throws std::invalid_argument
  // on another size.
  explicit NameCipher(SecureBuffer key);

  std::string encrypt_name(std::string_view name, DirIv dir_iv) const;
  // nullopt when the name is not base64url or does not authenticate.
  std::optional<std::string> decrypt_name(std::string_view encrypted, DirIv dir_iv) const;

  // Generic SIV with an associated-data string (symlink targets, xattrs).
  std::vector<std::uint8_t> seal(std::span<const std::uint8_t> plain, std::string_view ad) const;
  std::optional<std::vector<std::uint8_t>> open(std::span<const std::uint8_t> sealed,
                                                std::string_view ad) const;

 private:
  std::vector<std::uint8_t> siv_encrypt(std::span<const std::uint8_t> plain,
                                        std::span<const std::uint8_t> ad) const;
  std::optional<std::vector<std::uint8_t>> siv_decrypt(std::span<const std::uint8_t> sealed,
                                                       std::span<const std::uint8_t> ad) const;
  SecureBuffer key_;
  std::uint64_t id_;  // names this key's per-thread AES state
};

}  // namespace kmsfs::crypto
