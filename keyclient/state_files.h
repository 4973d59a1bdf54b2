#pragma once
// POSIX file helpers for the KMS state directory: RAII for file descriptors
// and flock(2) locks, atomic replacement of small files, private directories.
// Every function returns an error string naming the path and the reason;
// none throws for an expected failure (EACCES, ENOENT, ENOSPC...).

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>

#include "crypto/result.h"
#include "crypto/secure_buffer.h"

namespace kmsfs::keyclient {

// Owns one file descriptor; move-only; close(2) in the destructor (errors
// are ignored there: the callers that care fsync before).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() noexcept;

 private:
  int fd_ = -1;
};

// An exclusive flock(2) on a lock file, held for the object's lifetime.
// flock locks belong to the open file description, so two FileLocks on the
// same path exclude each other across processes AND across threads of one
// process (each lock opens the file itself). Never nest two on one path in
// one thread: that deadlocks.
class FileLock {
 public:
  static Result<FileLock, std::string> acquire(const std::string& path);
  FileLock(FileLock&&) noexcept = default;
  FileLock& operator=(FileLock&&) noexcept = default;
  ~FileLock();  // LOCK_UN happens with the close

 private:
  explicit FileLock(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

std::string errno_text(int err);

// Writes `data` to `path` atomically: a temp file in the same directory
// (mode `mode`), fsync, rename over `path`, fsync of the directory. A crash
// at any point leaves the old or the new content, never a mix.
Result<void, std::string> atomic_write_file(const std::string& path, std::span<const std::uint8_t> data,
                                            mode_t mode = 0600);
Result<void, std::string> atomic_write_file(const std::string& path, const std::string& text,
                                            mode_t mode = 0600);

// Reads a whole (small) file. A missing file gives std::nullopt, not an
// error.
Result<std::optional<std::string>, std::string> read_file_if_exists(const std::string& path);
// Reads `fd` from its offset to the end; errors name `what` (a path).
Result<std::string, std::string> read_fd_text(int fd, const std::string& what);

Result<void, std::string> fsync_dir(const std::string& dir);

// mkdir -p for the parents (umask applies), then the leaf with `mode`. Then
// refuses a leaf that is not a directory, is owned by another user or is
// writable by group or others; `what` names it in messages ("KMS home").
Result<void, std::string> ensure_private_dir(const std::string& path, const std::string& what,
                                             mode_t mode = 0700);

// Creates `path` with O_CREAT|O_EXCL, mode 0600, holding `content`, fsynced
// (file and directory). Returns false (not an error) when it already exists.
Result<bool, std::string> create_secret_file_if_missing(const std::string& path,
                                                        std::span<const std::uint8_t> content);

// Reads a PIN file into secure memory, trailing whitespace stripped.
// Refuses a file whose mode grants group or others any access, an empty
// file and a file over 256 bytes.
Result<crypto::SecureBuffer, std::string> read_pin_file(const std::string& path);

std::string parent_dir(const std::string& path);

}  // namespace kmsfs::keyclient
