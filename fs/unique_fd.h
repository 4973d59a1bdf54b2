#pragma once
// RAII for POSIX file descriptors and DIR streams: the one place close(2)
// and closedir(3) are called for them.

#include <dirent.h>
#include <unistd.h>

#include <memory>
#include <utility>

namespace kmsfs::fs {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) (void)::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

struct DirDeleter {
  void operator()(DIR* d) const noexcept { (void)::closedir(d); }
};
using UniqueDir = std::unique_ptr<DIR, DirDeleter>;

}  // namespace kmsfs::fs
