#include "fs/killpriv.h"

#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kmsfs::fs {

namespace {

thread_local bool t_kill_requested = false;
std::atomic<std::uint64_t> g_init_unique{0};  // the INIT request awaiting its reply (0: none)
std::atomic<bool> g_kernel_offers_v2{false};
std::atomic<bool> g_v2_active{false};

template <class T>
bool body(const void* buf, std::size_t n, T& out) {
  if (n < sizeof(fuse_in_header) + sizeof(T)) return false;
  std::memcpy(&out, static_cast<const char*>(buf) + sizeof(fuse_in_header), sizeof(T));
  return true;
}

// Notes whether the request's `field` carries the kernel's kill flag.
template <class T>
void note_kill(const void* buf, std::size_t n, std::uint32_t T::*field, std::uint32_t flag) {
  T in{};
  if (body(buf, n, in)) t_kill_requested = (in.*field & flag) != 0;
}

ssize_t read_request(int fd, void* buf, size_t len, void*) {
  const ssize_t n = ::read(fd, buf, len);
  if (n < 0 && errno == ECONNABORTED) {
    // An unmount racing this read: the kernel took a request off its input
    // queue, then found the connection shut down (fs/fuse/dev.c,
    // fuse_dev_do_read). The connection is gone, as with the ENODEV every
    // other reader gets; libfuse ends its loop cleanly only on ENODEV and
    // would report this one as an error (kmsfs exiting 1 after a normal
    // unmount).
    errno = ENODEV;
  }
  t_kill_requested = false;
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header))) return n;
  fuse_in_header h{};
  std::memcpy(&h, buf, sizeof h);
  const auto size = static_cast<std::size_t>(n);
  switch (h.opcode) {
    case FUSE_INIT: {
      // The kernel's flags end at offset 16; older kernels send a shorter
      // body (no flags2), which still holds `flags`.
      if (size >= sizeof(fuse_in_header) + 16) {
        std::uint32_t flags = 0;
        std::memcpy(&flags, static_cast<const char*>(buf) + sizeof(fuse_in_header) + 12, sizeof flags);
        g_kernel_offers_v2 = (flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
        g_init_unique = h.unique;
      }
      break;
    }
    case FUSE_WRITE:
      note_kill(buf, size, &fuse_write_in::write_flags, FUSE_WRITE_KILL_SUIDGID);
      break;
    case FUSE_SETATTR:
      note_kill(buf, size, &fuse_setattr_in::valid, FATTR_KILL_SUIDGID);
      break;
    case FUSE_OPEN:
      note_kill(buf, size, &fuse_open_in::open_flags, FUSE_OPEN_KILL_SUIDGID);
      break;
    case FUSE_CREATE:
      note_kill(buf, size, &fuse_create_in::open_flags, FUSE_OPEN_KILL_SUIDGID);
      break;
    default:
      break;
  }
  return n;
}

ssize_t write_reply(int fd, struct iovec* iov, int count, void*) {
  const std::uint64_t init = g_init_unique.load();
  if (init != 0 && count == 2 && iov[0].iov_len >= sizeof(fuse_out_header) && iov[1].iov_len >= 16) {
    fuse_out_header h{};
    std::memcpy(&h, iov[0].iov_base, sizeof h);
    if (h.unique == init) {
      g_init_unique = 0;
      if (h.error == 0 && g_kernel_offers_v2.load()) {
        // The INIT reply: add KILLPRIV_V2 to the flags (offset 12) of a copy.
        std::vector<char> out(static_cast<const char*>(iov[1].iov_base),
                              static_cast<const char*>(iov[1].iov_base) + iov[1].iov_len);
        std::uint32_t flags = 0;
        std::memcpy(&flags, out.data() + 12, sizeof flags);
        flags |= FUSE_HANDLE_KILLPRIV_V2;
        std::memcpy(out.data() + 12, &flags, sizeof flags);
        struct iovec patched[2] = {iov[0], {out.data(), out.size()}};
        const ssize_t n = ::writev(fd, patched, 2);
        if (n >= 0) g_v2_active = true;
        return n;
      }
    }
  }
  return ::writev(fd, iov, count);
}

}  // namespace

bool install_killpriv_io(fuse_session* se) {
  static const fuse_custom_io io = {write_reply, read_request, nullptr, nullptr};
  return fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0;
}

int kill_suid_sgid_if_asked(int fd) {
  if (!t_kill_requested) return 0;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno;
  mode_t kill = st.st_mode & S_ISUID;
  if ((st.st_mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP)) kill |= S_ISGID;
  if (kill == 0) return 0;
  return ::fchmod(fd, st.st_mode & ~kill & 07777) == 0 ? 0 : errno;
}

bool killpriv_v2_active() { return g_v2_active.load(); }

}  // namespace kmsfs::fs
