#include "fs/fsck.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include "crypto/block_layout.h"
#include "crypto/encoding.h"
#include "crypto/file_header.h"
#include "crypto/random.h"
#include "fs/encrypted_file.h"
#include "fs/file_keys.h"
#include "fs/mountinfo.h"
#include "fs/name_mapper.h"
#include "fs/unique_fd.h"
#include "fs/volume.h"

namespace kmsfs::fs {

namespace bl = crypto::block_layout;
using keyclient::KmsErrorCode;

namespace {

constexpr const char* kQuarantine = "kmsfs.quarantine";

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}
std::string join(const std::string& a, const std::string& b) { return a.empty() ? b : a + "/" + b; }

std::vector<std::string> list_dir(int dirfd) {
  std::vector<std::string> out;
  UniqueFd fd(::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return out;
  UniqueDir d(::fdopendir(fd.get()));
  if (!d) return out;
  (void)fd.release();
  while (dirent* e = ::readdir(d.get())) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.emplace_back(e->d_name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Reads exactly n bytes at off; false on a short read or error.
bool pread_all(int fd, std::uint8_t* buf, std::size_t n, std::uint64_t off) {
  std::size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(off + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    got += static_cast<std::size_t>(r);
  }
  return true;
}

class Checker {
 public:
  Checker(keyclient::KeyService& kms, const std::string& cipherdir, const Volume& volume,
          const FsckOptions& options, FsckReport& report)
      : kms_(kms),
        cipherdir_(cipherdir),
        names_(volume.names()),
        keys_(kms, volume.config().filesystem_id_hex(), volume.config().key_id),
        options_(options),
        report_(report) {}

  Result<void, std::string> run() {
    UniqueFd root(::open(cipherdir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!root.valid()) return unexpected(cipherdir_ + ": " + std::strerror(errno));
    root_fd_ = root.get();
    walk_dir(root.get(), "", "", true);
    if (!fatal_.empty()) return unexpected(fatal_);
    return {};
  }

 private:
  void problem(const std::string& brel, const std::string& prel, const std::string& kind,
               const std::string& reason, bool repaired = false, const std::string& repair = "") {
    report_.problems.push_back(FsckProblem{brel, prel, kind, reason, repaired, repair});
  }

  void tick() {
    if (!options_.progress) return;
    auto now = std::chrono::steady_clock::now();
    if (now - last_progress_ >= std::chrono::milliseconds(500)) {
      last_progress_ = now;
      options_.progress(report_.stats);
    }
  }

  // Moves an unreadable object (and its side file) into the quarantine.
  std::string quarantine(int dirfd, const std::string& name, const std::string& brel,
                         const std::string& prel, const std::string& kind,
                         const std::string& reason, bool with_side_file) {
    if (::mkdirat(root_fd_, kQuarantine, 0700) != 0 && errno != EEXIST) {
      return std::string("could not create the quarantine: ") + std::strerror(errno);
    }
    UniqueFd qfd(::openat(root_fd_, kQuarantine, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!qfd.valid()) return std::string("could not open the quarantine: ") + std::strerror(errno);
    std::string dest = brel;
    std::replace(dest.begin(), dest.end(), '/', '%');
    std::array<std::uint8_t, 4> rnd{};
    crypto::random_bytes(rnd);
    dest += "." + crypto::to_hex(rnd);
    if (::renameat(dirfd, name.c_str(), qfd.get(), dest.c_str()) != 0) {
      return std::string("could not move it to the quarantine: ") + std::strerror(errno);
    }
    if (with_side_file) {
      (void)::renameat(dirfd, (name + NameMapper::kLongSuffix).c_str(), qfd.get(),
                       (dest + NameMapper::kLongSuffix).c_str());
    }
    nlohmann::json line = {{"backing_path", brel}, {"plain_path", prel},      {"kind", kind},
                           {"reason", reason},      {"quarantined_as", dest}};
    std::ofstream(cipherdir_ + "/" + kQuarantine + "/index.jsonl", std::ios::app) << line.dump() << "\n";
    return std::string("moved to ") + kQuarantine + "/" + dest;
  }

  // Reports a damaged object; with --repair moves it into the quarantine.
  void damaged(int dirfd, const std::string& name, const std::string& brel, const std::string& prel,
               const std::string& kind, const std::string& reason, bool with_side_file = false) {
    if (!options_.repair) return problem(brel, prel, kind, reason);
    std::string what = quarantine(dirfd, name, brel, prel, kind, reason, with_side_file);
    problem(brel, prel, kind, reason, starts_with(what, "moved"), what);
  }

  void remove_leftover(int dirfd, const std::string& name, const std::string& brel,
                       const std::string& kind) {
    if (!options_.repair) return problem(brel, "", kind, "left behind by an interrupted operation");
    bool ok = ::unlinkat(dirfd, name.c_str(), 0) == 0;
    problem(brel, "", kind, "left behind by an interrupted operation", ok,
            ok ? "removed" : std::string("could not remove: ") + std::strerror(errno));
  }

  void walk_dir(int dirfd, const std::string& brel_dir, const std::string& prel_dir, bool at_root) {
    report_.stats.directories++;
    DirIvBytes iv{};
    bool have_iv = true;
    auto entries = list_dir(dirfd);
    if (names_.encrypted()) {
      int err = NameMapper::read_dir_iv(dirfd, iv);
      if (err != 0) {
        have_iv = false;
        const std::string what = err == ENOENT ? "missing" : "damaged";
        const bool empty = std::none_of(entries.begin(), entries.end(), [&](const std::string& n) {
          return !names_.is_internal(n, at_root);
        });
        const std::string brel = join(brel_dir, NameMapper::kDirIvName);
        if (options_.repair && empty) {
          if (err != ENOENT) (void)::unlinkat(dirfd, NameMapper::kDirIvName, 0);
          bool ok = NameMapper::create_dir_iv(dirfd) == 0;
          have_iv = ok && NameMapper::read_dir_iv(dirfd, iv) == 0;
          problem(brel, prel_dir, what + " directory IV", "the directory is empty", ok,
                  ok ? "created a new IV" : "could not create a new IV");
        } else {
          problem(brel, prel_dir, what + " directory IV",
                  empty ? "the directory is empty" : "the names in this directory cannot be decrypted");
        }
      }
    }
    for (const auto& n : entries) {
      if (!fatal_.empty()) return;
      const std::string brel = join(brel_dir, n);
      if (at_root && (n == VolumeConfig::kFileName || n == kQuarantine)) continue;
      if (at_root && starts_with(n, std::string(VolumeConfig::kFileName) + ".tmp")) {
        remove_leftover(dirfd, n, brel, "temporary file of an interrupted kmsfs.json update");
        continue;
      }
      std::string plain;
      bool long_name = false;
      if (names_.encrypted()) {
        if (n == NameMapper::kDirIvName) continue;
        if (starts_with(n, "kmsfs.rmdir.")) {
          remove_leftover(dirfd, n, brel, "directory IV of an interrupted rmdir");
          continue;
        }
        if (starts_with(n, NameMapper::kLongPrefix) && ends_with(n, ".name.tmp")) {
          remove_leftover(dirfd, n, brel, "temporary side file");
          continue;
        }
        if (starts_with(n, NameMapper::kLongPrefix) && ends_with(n, NameMapper::kLongSuffix)) {
          const std::string entry = n.substr(0, n.size() - std::strlen(NameMapper::kLongSuffix));
          struct stat st {};
          // A side file listed before its entry was quarantined went along with it.
          if (::fstatat(dirfd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) continue;
          if (::fstatat(dirfd, entry.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
            remove_leftover(dirfd, n, brel, "orphan long-name side file");
          }
          continue;
        }
        if (starts_with(n, "kmsfs.") && !starts_with(n, NameMapper::kLongPrefix)) {
          problem(brel, "", "unknown kmsfs file", "not made by this version of kmsfs; left alone");
          continue;
        }
        long_name = starts_with(n, NameMapper::kLongPrefix);
        std::optional<std::string> dec;
        if (have_iv) dec = names_.to_plain(dirfd, n, iv);
        if (!dec) {
          std::string reason;
          if (!have_iv) {
            reason = "its directory has no usable IV";
          } else if (long_name) {
            struct stat st {};
            reason = ::fstatat(dirfd, (n + NameMapper::kLongSuffix).c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0
                         ? "its long-name side file is missing"
                         : "its long-name side file is damaged";
          } else {
            reason = "the name does not decrypt (damaged or from another volume)";
          }
          // Without a name the object is unreachable through the mount.
          if (have_iv) {
            damaged(dirfd, n, brel, "", "unreadable name", reason, long_name);
          } else {
            problem(brel, "", "unreadable name", reason);
          }
          continue;
        }
        plain = *dec;
      } else {
        if (at_root && n == kQuarantine) continue;
        plain = n;
      }
      const std::string prel = join(prel_dir, plain);
      struct stat st {};
      if (::fstatat(dirfd, n.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
        problem(brel, prel, "unreadable entry", std::strerror(errno));
        continue;
      }
      if (S_ISDIR(st.st_mode)) {
        UniqueFd sub(::openat(dirfd, n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (!sub.valid()) {
          problem(brel, prel, "unreadable directory", std::strerror(errno));
          continue;
        }
        walk_dir(sub.get(), brel, prel, false);
      } else if (S_ISREG(st.st_mode)) {
        check_file(dirfd, n, brel, prel, long_name);
      } else if (S_ISLNK(st.st_mode)) {
        report_.stats.symlinks++;
        char buf[PATH_MAX + 1];
        ssize_t len = ::readlinkat(dirfd, n.c_str(), buf, sizeof buf - 1);
        if (len < 0 || !names_.decrypt_symlink(std::string_view(buf, static_cast<std::size_t>(len)))) {
          damaged(dirfd, n, brel, prel, "damaged symlink", "its target does not decrypt", long_name);
        }
      } else {
        report_.stats.other++;
      }
      tick();
    }
  }

  void check_file(int dirfd, const std::string& n, const std::string& brel, const std::string& prel,
                  bool long_name) {
    report_.stats.files++;
    UniqueFd fd(::openat(dirfd, n.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    struct stat st {};
    if (!fd.valid() || ::fstat(fd.get(), &st) != 0) {
      problem(brel, prel, "unreadable file", std::strerror(errno));
      return;
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size == 0) return;  // an empty file has no header
    if (size < crypto::FileHeader::kSize) {
      damaged(dirfd, n, brel, prel, "truncated header",
              "the file is " + std::to_string(size) + " bytes, shorter than its 128-byte header",
              long_name);
      return;
    }
    std::uint8_t raw[crypto::FileHeader::kSize];
    if (!pread_all(fd.get(), raw, sizeof raw, 0)) {
      problem(brel, prel, "unreadable file", "cannot read the header");
      return;
    }
    auto header = crypto::FileHeader::decode(raw);
    if (!header) {
      damaged(dirfd, n, brel, prel, "corrupt header", header.error(), long_name);
      return;
    }
    keyclient::DecryptRequest req;
    req.ciphertext_blob = header->wrapped_key;
    req.encryption_context = keys_.context_for(header->file_id);
    auto dek = kms_.decrypt(req);
    if (!dek) {
      const auto& e = dek.error();
      switch (e.code) {
        case KmsErrorCode::InvalidCiphertextException:
          damaged(dirfd, n, brel, prel, "data key does not unwrap",
                  "the header is damaged or comes from another file or volume (" + e.message + ")",
                  long_name);
          return;
        case KmsErrorCode::NotFoundException:
          problem(brel, prel, "key gone", "its KMS key no longer exists: the file is unrecoverable (" +
                                              e.message + ")");
          return;
        case KmsErrorCode::DisabledException:
          problem(brel, prel, "key disabled", "its KMS key is disabled; enable it to read the file");
          return;
        case KmsErrorCode::KMSInvalidStateException:
          problem(brel, prel, "key unusable", "its KMS key is pending deletion or import (" + e.message + ")");
          return;
        case KmsErrorCode::AccessDeniedException:
          problem(brel, prel, "key access denied", e.message);
          return;
        default:
          fatal_ = "the KMS failed while checking " + brel + ": " + e.to_string();
          return;
      }
    }
    FileKey key;
    key.file_id = header->file_id;
    key.dek = std::move(dek->plaintext);
    EncryptedFile file(fd.get(), key, brel);

    const std::uint64_t body = size - bl::kHeaderSize;
    const std::uint64_t rest = body % bl::kStoredBlockSize;
    const std::uint64_t plain = bl::plain_size(size);
    std::vector<std::uint64_t> bad;
    std::vector<std::uint8_t> buf(bl::kStoredBlockSize * 64);
    const std::uint64_t blocks = bl::block_count(plain);
    for (std::uint64_t b = 0; b < blocks; b += 64) {
      const std::uint64_t last = std::min(blocks, b + 64);
      const std::uint64_t begin = bl::stored_offset(b);
      const std::uint64_t end = bl::stored_offset(last - 1) + bl::block_plain_len(last - 1, plain) +
                                bl::kBlockOverhead;
      if (!pread_all(fd.get(), buf.data(), end - begin, begin)) {
        problem(brel, prel, "unreadable file", "cannot read blocks");
        return;
      }
      for (std::uint64_t i = b; i < last; ++i) {
        const std::uint64_t len = bl::block_plain_len(i, plain) + bl::kBlockOverhead;
        if (!file.check_block(i, std::span(buf.data() + (bl::stored_offset(i) - begin), len))) {
          bad.push_back(i);
        }
        report_.stats.blocks++;
      }
      tick();
    }
    report_.stats.bytes += plain;
    std::string reasons;
    if (!bad.empty()) {
      std::ostringstream os;
      os << bad.size() << " block(s) fail authentication (first: block " << bad.front() << ")";
      reasons = os.str();
    }
    if (rest > 0 && rest <= bl::kBlockOverhead) {
      if (!reasons.empty()) reasons += "; ";
      reasons += "the file ends in a " + std::to_string(rest) + "-byte fragment (truncated block)";
    }
    if (!reasons.empty()) {
      damaged(dirfd, n, brel, prel, bad.empty() ? "truncated block" : "corrupt block", reasons, long_name);
    }
  }

  keyclient::KeyService& kms_;
  std::string cipherdir_;
  const NameMapper& names_;
  FileKeys keys_;
  const FsckOptions& options_;
  FsckReport& report_;
  int root_fd_ = -1;
  std::string fatal_;
  std::chrono::steady_clock::time_point last_progress_{};
};

}  // namespace

bool FsckReport::all_repaired() const {
  return std::all_of(problems.begin(), problems.end(), [](const FsckProblem& p) { return p.repaired; });
}

bool cipherdir_is_mounted(const std::string& cipherdir) {
  char abs[PATH_MAX];
  if (::realpath(cipherdir.c_str(), abs) == nullptr) return false;
  const std::string source = std::string("kmsfs:") + abs;
  for (const auto& m : read_mountinfo()) {
    if (m.fstype.find("kmsfs") != std::string::npos && m.source == source) return true;
  }
  return false;
}

Result<FsckReport, std::string> run_fsck(keyclient::KeyService& kms, const std::string& cipherdir,
                                         const FsckOptions& options) {
  auto volume = Volume::open(kms, cipherdir);
  if (!volume) return unexpected(volume.error());
  FsckReport report;
  Checker checker(kms, cipherdir, **volume, options, report);
  if (auto r = checker.run(); !r) return unexpected(r.error());
  return report;
}

}  // namespace kmsfs::fs
