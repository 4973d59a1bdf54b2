#include "keyclient/state_files.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "crypto/encoding.h"
#include "crypto/random.h"

namespace kmsfs::keyclient {

namespace {

Result<void, std::string> write_all(int fd, std::span<const std::uint8_t> data,
                                    const std::string& path) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return unexpected("cannot write " + path + ": " + errno_text(errno));
    }
    done += static_cast<std::size_t>(n);
  }
  return {};
}

std::string mode_octal(mode_t m) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(m & 07777));
  return buf;
}

}  // namespace

void UniqueFd::reset() noexcept {
  if (fd_ >= 0) {
    (void)::close(fd_);
    fd_ = -1;
  }
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer (may not use buf).
  const char* msg = ::strerror_r(err, buf, sizeof buf);
  return msg;
}

std::string parent_dir(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

Result<FileLock, std::string> FileLock::acquire(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd.valid()) return unexpected("cannot open lock file " + path + ": " + errno_text(errno));
  while (::flock(fd.get(), LOCK_EX) != 0) {
    if (errno == EINTR) continue;
    return unexpected("cannot lock " + path + ": " + errno_text(errno));
  }
  return FileLock(std::move(fd));
}

FileLock::~FileLock() = default;

Result<void, std::string> fsync_dir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return unexpected("cannot open directory " + dir + ": " + errno_text(errno));
  if (::fsync(fd.get()) != 0) return unexpected("cannot fsync " + dir + ": " + errno_text(errno));
  return {};
}

Result<void, std::string> atomic_write_file(const std::string& path,
                                            std::span<const std::uint8_t> data, mode_t mode) {
  std::array<std::uint8_t, 6> rnd{};
  crypto::random_bytes(rnd);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + crypto::to_hex(rnd);
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode));
    if (!fd.valid()) return unexpected("cannot create " + tmp + ": " + errno_text(errno));
    auto w = write_all(fd.get(), data, tmp);
    if (!w) {
      (void)::unlink(tmp.c_str());
      return w;
    }
    if (::fsync(fd.get()) != 0) {
      int err = errno;
      (void)::unlink(tmp.c_str());
      return unexpected("cannot fsync " + tmp + ": " + errno_text(err));
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    (void)::unlink(tmp.c_str());
    return unexpected("cannot rename " + tmp + " to " + path + ": " + errno_text(err));
  }
  return fsync_dir(parent_dir(path));
}

Result<void, std::string> atomic_write_file(const std::string& path, const std::string& text,
                                            mode_t mode) {
  return atomic_write_file(path, crypto::as_bytes(text), mode);
}

Result<std::optional<std::string>, std::string> read_file_if_exists(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return std::optional<std::string>();
    return unexpected("cannot open " + path + ": " + errno_text(errno));
  }
  auto text = read_fd_text(fd.get(), path);
  if (!text) return unexpected(text.error());
  return std::optional<std::string>(std::move(*text));
}

Result<std::string, std::string> read_fd_text(int fd, const std::string& what) {
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return unexpected("cannot read " + what + ": " + errno_text(errno));
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

Result<void, std::string> ensure_private_dir(const std::string& path, const std::string& what,
                                             mode_t mode) {
  if (path.empty()) return unexpected(what + " path is empty");
  // Parents first (mkdir -p), with the default mode.
  for (std::size_t pos = path.find('/', 1); pos != std::string::npos; pos = path.find('/', pos + 1)) {
    std::string p = path.substr(0, pos);
    if (::mkdir(p.c_str(), 0755) != 0 && errno != EEXIST) {
      return unexpected("cannot create " + p + " (parent of " + what + " " + path +
                        "): " + errno_text(errno));
    }
  }
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST) {
    return unexpected("cannot create " + what + " " + path + ": " + errno_text(errno));
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return unexpected("cannot stat " + what + " " + path + ": " + errno_text(errno));
  }
  if (!S_ISDIR(st.st_mode)) return unexpected(what + " " + path + " is not a directory");
  if (st.st_uid != ::geteuid()) {
    return unexpected(what + " " + path + " is owned by uid " + std::to_string(st.st_uid) +
                      ", not by this user (uid " + std::to_string(::geteuid()) +
                      "); refusing to keep key state there");
  }
  // Group and others get nothing `mode` does not grant them: a key state
  // dir they could list or enter (0755) is refused like a writable one.
  if ((st.st_mode & ~mode & 077) != 0) {
    const char* how = (st.st_mode & ~mode & 022) != 0 ? "writable" : "readable";
    return unexpected(what + " " + path + " is " + how + " by group or others (mode " + mode_octal(st.st_mode) +
                      "); refusing to keep key state there: chmod it to " + mode_octal(mode));
  }
  return {};
}

Result<bool, std::string> create_secret_file_if_missing(const std::string& path,
                                                        std::span<const std::uint8_t> content) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd.valid()) {
    if (errno == EEXIST) return false;
    return unexpected("cannot create " + path + ": " + errno_text(errno));
  }
  auto w = write_all(fd.get(), content, path);
  if (!w || ::fsync(fd.get()) != 0) {
    std::string why = w ? "cannot fsync " + path + ": " + errno_text(errno) : w.error();
    fd.reset();
    (void)::unlink(path.c_str());  // never leave a half-written PIN behind
    return unexpected(why);
  }
  fd.reset();
  auto d = fsync_dir(parent_dir(path));
  if (!d) return unexpected(d.error());
  return true;
}

Result<crypto::SecureBuffer, std::string> read_pin_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return unexpected("cannot open PIN file " + path + ": " + errno_text(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return unexpected("cannot stat PIN file " + path + ": " + errno_text(errno));
  }
  if (!S_ISREG(st.st_mode)) return unexpected("PIN file " + path + " is not a regular file");
  if ((st.st_mode & 077) != 0) {
    return unexpected("PIN file " + path + " is readable by group or others (mode " +
                      mode_octal(st.st_mode) + "); chmod 600 it");
  }
  constexpr std::size_t kMax = 256;
  crypto::SecureBuffer buf(kMax + 1);
  std::size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = ::read(fd.get(), buf.data() + got, buf.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return unexpected("cannot read PIN file " + path + ": " + errno_text(errno));
    }
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  if (got > kMax) return unexpected("PIN file " + path + " is longer than 256 bytes");
  while (got > 0 && (buf.data()[got - 1] == '\n' || buf.data()[got - 1] == '\r' ||
                     buf.data()[got - 1] == ' ' || buf.data()[got - 1] == '\t')) {
    --got;
  }
  if (got == 0) return unexpected("PIN file " + path + " is empty");
  buf.shrink(got);
  return buf;
}

}  // namespace kmsfs::keyclient
