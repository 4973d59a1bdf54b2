#include "fs/name_mapper.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "crypto/encoding.h"
#include "crypto/random.h"
#include "crypto/sha256.h"
#include "fs/unique_fd.h"
#include "fs/volume.h"

namespace kmsfs::fs {

namespace {

constexpr std::string_view kXattrPrefix = "user.";
constexpr std::string_view kSymlinkAd = "kmsfs:symlink";
constexpr std::string_view kXattrNameAd = "kmsfs:xattr-name";
constexpr std::string_view kXattrValueAd = "kmsfs:xattr-value:";

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

int write_all(int fd, const void* data, std::size_t len) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::size_t done = 0;
  while (done < len) {
    ssize_t n = ::write(fd, p + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

}  // namespace

NameMapper::NameMapper(std::unique_ptr<crypto::NameCipher> cipher, std::size_t long_name_max)
    : cipher_(std::move(cipher)), long_name_max_(long_name_max) {}

std::optional<NameMapper::Backing> NameMapper::to_backing(std::string_view plain,
                                                          const DirIvBytes& iv) const {
  if (plain.empty() || plain.size() > kMaxName) return std::nullopt;
  if (!encrypted()) return Backing{std::string(plain), {}};
  std::string enc = cipher_->encrypt_name(plain, iv);
  if (enc.size() <= long_name_max_) return Backing{std::move(enc), {}};
  auto digest = crypto::sha256(crypto::as_bytes(enc));
  return Backing{std::string(kLongPrefix) + crypto::to_base64url(digest), std::move(enc)};
}

std::optional<std::string> NameMapper::to_plain(int dirfd, std::string_view backing,
                                                const DirIvBytes& iv) const {
  if (!encrypted()) return std::string(backing);
  if (starts_with(backing, kLongPrefix)) {
    if (backing.size() > 5 && backing.substr(backing.size() - 5) == kLongSuffix) return std::nullopt;
    std::string side = std::string(backing) + kLongSuffix;
    UniqueFd fd(::openat(dirfd, side.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd.valid()) return std::nullopt;
    char buf[1024];
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n <= 0 || static_cast<std::size_t>(n) >= sizeof buf) return std::nullopt;
    std::string enc(buf, static_cast<std::size_t>(n));
    // The side file must belong to this entry: its hash is the entry's name.
    auto digest = crypto::sha256(crypto::as_bytes(enc));
    if (std::string(kLongPrefix) + crypto::to_base64url(digest) != backing) return std::nullopt;
    return cipher_->decrypt_name(enc, iv);
  }
  if (starts_with(backing, "kmsfs.")) return std::nullopt;
  return cipher_->decrypt_name(backing, iv);
}

bool NameMapper::is_internal(std::string_view backing, bool at_root) const {
  if (at_root && (backing == VolumeConfig::kFileName || backing == "kmsfs.quarantine")) return true;
  if (at_root && starts_with(backing, std::string(VolumeConfig::kFileName) + ".tmp")) return true;
  if (!encrypted() || !starts_with(backing, "kmsfs.")) return false;
  // A long name's entry is a user's file; its side file is not.
  return !starts_with(backing, kLongPrefix) ||
         (backing.size() > 5 && backing.substr(backing.size() - 5) == kLongSuffix);
}

int NameMapper::read_dir_iv(int dirfd, DirIvBytes& out) {
  UniqueFd fd(::openat(dirfd, kDirIvName, O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) return errno;
  std::uint8_t buf[17];
  ssize_t n = ::read(fd.get(), buf, sizeof buf);
  if (n < 0) return errno;
  if (n != 16) return EIO;  // a damaged IV file: fsck reports it
  std::memcpy(out.data(), buf, 16);
  return 0;
}

int NameMapper::create_dir_iv(int dirfd) {
  DirIvBytes iv{};
  crypto::random_bytes(iv);
  UniqueFd fd(::openat(dirfd, kDirIvName, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0400));
  if (!fd.valid()) return errno;
  if (int err = write_all(fd.get(), iv.data(), iv.size()); err != 0) {
    ::unlinkat(dirfd, kDirIvName, 0);
    return err;
  }
  if (::fsync(fd.get()) != 0) {
    int err = errno;
    ::unlinkat(dirfd, kDirIvName, 0);
    return err;
  }
  return 0;
}

int NameMapper::write_side_file(int dirfd, const Backing& b) {
  const std::string side = b.side_file();
  const std::string tmp = side + ".tmp";
  UniqueFd fd(::openat(dirfd, tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0400));
  if (!fd.valid()) return errno;
  int err = write_all(fd.get(), b.long_name.data(), b.long_name.size());
  if (err == 0 && ::fsync(fd.get()) != 0) err = errno;
  fd.reset();
  if (err == 0 && ::renameat(dirfd, tmp.c_str(), dirfd, side.c_str()) != 0) err = errno;
  if (err != 0) ::unlinkat(dirfd, tmp.c_str(), 0);
  return err;
}

void NameMapper::remove_side_file(int dirfd, const Backing& b) {
  if (b.is_long()) (void)::unlinkat(dirfd, b.side_file().c_str(), 0);
}

std::string NameMapper::encrypt_symlink(std::string_view target) const {
  if (!encrypted()) return std::string(target);
  return crypto::to_base64url(cipher_->seal(crypto::as_bytes(target), kSymlinkAd));
}

std::optional<std::string> NameMapper::decrypt_symlink(std::string_view stored) const {
  if (!encrypted()) return std::string(stored);
  auto raw = crypto::from_base64url(stored);
  if (!raw) return std::nullopt;
  auto plain = cipher_->open(*raw, kSymlinkAd);
  if (!plain) return std::nullopt;
  return std::string(plain->begin(), plain->end());
}

std::string NameMapper::encrypt_xattr_name(std::string_view name) const {
  if (!encrypted()) return std::string(name);
  std::string_view rest = name.substr(kXattrPrefix.size());
  return std::string(kXattrPrefix) +
         crypto::to_base64url(cipher_->seal(crypto::as_bytes(rest), kXattrNameAd));
}

std::optional<std::string> NameMapper::decrypt_xattr_name(std::string_view stored) const {
  if (!starts_with(stored, kXattrPrefix)) return std::nullopt;
  if (!encrypted()) return std::string(stored);
  auto raw = crypto::from_base64url(stored.substr(kXattrPrefix.size()));
  if (!raw) return std::nullopt;
  auto plain = cipher_->open(*raw, kXattrNameAd);
  if (!plain) return std::nullopt;
  return std::string(kXattrPrefix) + std::string(plain->begin(), plain->end());
}

std::vector<std::uint8_t> NameMapper::encrypt_xattr_value(std::string_view stored_name,
                                                          std::span<const std::uint8_t> value) const {
  if (!encrypted()) return {value.begin(), value.end()};
  // OpenSSL 3.0's AES-SIV cannot seal an empty plaintext (EncryptFinal
  // fails): an empty value is stored empty; its length was visible anyway.
  if (value.empty()) return {};
  return cipher_->seal(value, std::string(kXattrValueAd) + std::string(stored_name));
}

std::optional<std::vector<std::uint8_t>> NameMapper::decrypt_xattr_value(
    std::string_view stored_name, std::span<const std::uint8_t> value) const {
  if (!encrypted()) return std::vector<std::uint8_t>(value.begin(), value.end());
  if (value.empty()) return std::vector<std::uint8_t>();  // see encrypt_xattr_value
  return cipher_->open(value, std::string(kXattrValueAd) + std::string(stored_name));
}

namespace {

std::vector<std::string> split_path(const std::string& p) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : p) {
    if (c == '/') {
      if (!cur.empty() && cur != ".") out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty() && cur != ".") out.push_back(cur);
  return out;
}

template <class Map>
Result<std::string, std::string> map_path(const std::string& cipherdir, const std::string& path,
                                          Map&& map_component) {
  UniqueFd dir(::open(cipherdir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return unexpected(cipherdir + ": " + std::strerror(errno));
  std::string out;
  std::string so_far;
  const auto parts = split_path(path);
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (parts[i] == "..") return unexpected(std::string("\"..\" is not allowed in a path"));
    auto mapped = map_component(dir.get(), parts[i]);
    so_far += (so_far.empty() ? "" : "/") + parts[i];
    if (!mapped) return unexpected(so_far + ": " + mapped.error());
    out += (out.empty() ? "" : "/") + mapped->first;
    if (i + 1 < parts.size()) {
      UniqueFd next(::openat(dir.get(), mapped->second.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!next.valid()) return unexpected(so_far + ": " + std::strerror(errno));
      dir = std::move(next);
    }
  }
  return out;
}

}  // namespace

Result<std::string, std::string> encrypt_path(const NameMapper& names, const std::string& cipherdir,
                                              const std::string& plain_path) {
  // Each component maps to (output name, backing name to descend into).
  return map_path(cipherdir, plain_path,
                  [&](int dirfd, const std::string& plain) -> Result<std::pair<std::string, std::string>, std::string> {
                    DirIvBytes iv{};
                    if (names.encrypted()) {
                      if (int err = NameMapper::read_dir_iv(dirfd, iv); err != 0) {
                        return unexpected(std::string("cannot read the directory IV: ") + std::strerror(err));
                      }
                    }
                    auto b = names.to_backing(plain, iv);
                    if (!b) return unexpected(std::string("name too long"));
                    return std::make_pair(b->name, b->name);
                  });
}

Result<std::string, std::string> decrypt_path(const NameMapper& names, const std::string& cipherdir,
                                              const std::string& backing_path) {
  return map_path(cipherdir, backing_path,
                  [&](int dirfd, const std::string& backing) -> Result<std::pair<std::string, std::string>, std::string> {
                    DirIvBytes iv{};
                    if (names.encrypted()) {
                      if (int err = NameMapper::read_dir_iv(dirfd, iv); err != 0) {
                        return unexpected(std::string("cannot read the directory IV: ") + std::strerror(err));
                      }
                    }
                    auto plain = names.to_plain(dirfd, backing, iv);
                    if (!plain) return unexpected(std::string("not a kmsfs name, or it does not decrypt"));
                    return std::make_pair(*plain, backing);
                  });
}

}  // namespace kmsfs::fs
