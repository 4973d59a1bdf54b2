#pragma once
// FUSE_HANDLE_KILLPRIV_V2 for libfuse 3.14, which does not negotiate it.
//
// Without it the kernel asks the server for the "security.capability"
// xattr before every write(2) (file_remove_privs): a second FUSE round trip
// per write. With it the kernel marks the superblock SB_NOSEC, stops
// asking, and instead tells the server, in the request, when a write,
// truncate or O_TRUNC open by a caller without CAP_FSETID must clear the
// file's set-user-ID and set-group-ID bits (the Linux VFS rules); the
// server clears them.
//
// libfuse hides both ends, so a custom I/O (fuse_session_custom_io, same fd)
// looks at the raw messages: it sets the flag in the INIT reply when the
// kernel offered it, and notes per request (thread-local: libfuse handles a
// request on the thread that read it) whether the kernel asked for the
// bits to be cleared. Filesystem's write, setattr, open and create then
// call kill_suid_sgid_if_asked().
//
// The same read also turns the ECONNABORTED of an unmount that races a read
// into the ENODEV libfuse expects at unmount (see read_request).

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

namespace kmsfs::fs {

// Installs the custom I/O on a mounted session. Returns false (and the
// session keeps libfuse's own I/O) when libfuse refuses it.
bool install_killpriv_io(fuse_session* se);

// When the request being handled on this thread carries the kernel's
// "clear set-user-ID/set-group-ID" flag: clears S_ISUID, and S_ISGID when the group may execute,
// from the file open as `fd`. Returns 0 or an errno.
int kill_suid_sgid_if_asked(int fd);

// Whether the kernel accepted KILLPRIV_V2 on this process's mount.
bool killpriv_v2_active();

}  // namespace kmsfs::fs
