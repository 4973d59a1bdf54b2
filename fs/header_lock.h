#pragma once
// Serialises the two writers of a backing file's header that live in
// different processes: a mount writing the first header of an empty file
// (a new data key) and `kmsfs rewrap` replacing a header by its rewrapped
// copy. Rewrap re-reads the header and writes the new one while holding the
// lock, so it never overwrites a header a live mount wrote after a truncate
// to zero (which would leave the file's data under a key no header names).
//
// An open-file-description (OFD) write lock on the header's bytes: the
// kernel drops it when the holder dies, it does not conflict with locks
// applications take on the mount (those stay in the FUSE kernel module),
// and threads sharing one descriptor share it. On a backing filesystem
// without byte-range locks (EINVAL, ENOLCK, EOPNOTSUPP) nothing is locked:
// rewrap's re-read then narrows the race to a few microseconds.

#include <fcntl.h>

#include <cerrno>

#include "crypto/file_header.h"

namespace kmsfs::fs {

class HeaderLock {
 public:
  // Blocks until held (retried on EINTR); `fd` must be open for writing.
  explicit HeaderLock(int fd) : fd_(fd) {
    struct flock fl = range(F_WRLCK);
    while (::fcntl(fd_, F_OFD_SETLKW, &fl) != 0) {
      if (errno != EINTR) return;
    }
    held_ = true;
  }
  ~HeaderLock() {
    if (!held_) return;
    struct flock fl = range(F_UNLCK);
    (void)::fcntl(fd_, F_OFD_SETLK, &fl);
  }
  HeaderLock(const HeaderLock&) = delete;
  HeaderLock& operator=(const HeaderLock&) = delete;
  bool held() const { return held_; }

 private:
  static struct flock range(short type) {
    struct flock fl {};
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = static_cast<off_t>(crypto::FileHeader::kSize);
    fl.l_pid = 0;  // required by OFD locks
    return fl;
  }
  int fd_;
  bool held_ = false;
};

}  // namespace kmsfs::fs
