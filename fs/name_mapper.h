#pragma once
// Plaintext names <-> backing names (docs/format.md §6).
//
// With the volume feature "encrypted_names", every directory holds a file
// kmsfs.diriv with 16 random bytes; a name becomes
// base64url(AES-256-SIV(name key, AD = dir IV, name)). An encrypted name
// longer than the volume's long_name_max becomes
// "kmsfs.longname.<base64url(SHA-256(encrypted name))>" and the full
// encrypted name is kept in the side file "<that>.name" next to it.
// Backing names starting with "kmsfs." are kmsfs's own (base64url never
// contains '.') and never appear in the mount.
//
// Without the feature (plaintext names) names pass through unchanged and
// only the root's kmsfs.json is hidden.
//
// Thread safety: const methods only; safe to share.

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "crypto/name_cipher.h"
#include "crypto/result.h"

namespace kmsfs::fs {

using DirIvBytes = std::array<std::uint8_t, 16>;

class NameMapper {
 public:
  static constexpr const char* kDirIvName = "kmsfs.diriv";
  static constexpr const char* kLongPrefix = "kmsfs.longname.";
  static constexpr const char* kLongSuffix = ".name";
  static constexpr std::size_t kMinLongNameMax = 63;  // the hashed name plus ".name"
  static constexpr std::size_t kMaxName = 255;

  // Plaintext names.
  NameMapper() = default;
  // Encrypted names.
  NameMapper(std::unique_ptr<crypto::NameCipher> cipher, std::size_t long_name_max);

  bool encrypted() const { return cipher_ != nullptr; }

  struct Backing {
    std::string name;       // the backing directory entry
    std::string long_name;  // non-empty: the side file's content (the full encrypted name)
    bool is_long() const { return !long_name.empty(); }
    std::string side_file() const { return name + kLongSuffix; }
  };
  // nullopt (ENAMETOOLONG for the caller) when a plaintext name is empty or
  // longer than 255 bytes.
  std::optional<Backing> to_backing(std::string_view plain, const DirIvBytes& iv) const;

  // A backing entry of directory `dirfd` to its plaintext name; nullopt for
  // kmsfs's own files and for names that do not decrypt (damage).
  std::optional<std::string> to_plain(int dirfd, std::string_view backing,
                                      const DirIvBytes& iv) const;

  // True for backing names the mount never shows. `at_root` adds the root's
  // kmsfs.json and kmsfs.quarantine.
  bool is_internal(std::string_view backing, bool at_root) const;

  // Directory IVs. read: 0 or errno (ENOENT when the directory has none).
  static int read_dir_iv(int dirfd, DirIvBytes& out);
  // Creates kmsfs.diriv in `dirfd` (O_EXCL, fsync'd). 0 or errno.
  static int create_dir_iv(int dirfd);

  // Side files of long names: written atomically (temp, fsync, rename).
  static int write_side_file(int dirfd, const Backing& b);
  static void remove_side_file(int dirfd, const Backing& b);

  // Symlink targets and xattrs.
  std::string encrypt_symlink(std::string_view target) const;
  std::optional<std::string> decrypt_symlink(std::string_view stored) const;
  std::string encrypt_xattr_name(std::string_view name) const;  // "user.x" -> "user.<enc>"
  std::optional<std::string> decrypt_xattr_name(std::string_view stored) const;
  std::vector<std::uint8_t> encrypt_xattr_value(std::string_view stored_name,
                                                std::span<const std::uint8_t> value) const;
  std::optional<std::vector<std::uint8_t>> decrypt_xattr_value(std::string_view stored_name,
                                                               std::span<const std::uint8_t> value) const;

 private:
  std::unique_ptr<crypto::NameCipher> cipher_;
  std::size_t long_name_max_ = kMaxName;
};

// Whole paths (relative to the mount root / CIPHERDIR, '/'-separated) for
// `kmsfs encrypt-path` and `decrypt-path`: backups and debugging. Errors
// name the component that failed.
Result<std::string, std::string> encrypt_path(const NameMapper& names, const std::string& cipherdir,
                                              const std::string& plain_path);
Result<std::string, std::string> decrypt_path(const NameMapper& names, const std::string& cipherdir,
                                              const std::string& backing_path);

}  // namespace kmsfs::fs
