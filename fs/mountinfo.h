#pragma once
// The kernel's table of this process's mounts, /proc/self/mountinfo
// (proc(5)): the fields kmsfs needs from each line, with the kernel's
// octal escapes (space, tab, newline, backslash as \ooo) undone.

#include <optional>
#include <string>
#include <vector>

namespace kmsfs::fs {

struct MountInfoEntry {
  std::string device;       // "MAJOR:MINOR" of the mounted filesystem
  std::string mount_point;  // absolute path
  std::string fstype;       // "fuse.kmsfs", "ext4", ...
  std::string source;       // "kmsfs:/path/to/cipherdir", "/dev/vda1", ...
};

// One line of the table; nullopt when it is not one.
std::optional<MountInfoEntry> parse_mountinfo_line(const std::string& line);

// Every mount of this process's namespace, in the kernel's order (a mount
// on top of another comes after it); empty when the table cannot be read.
std::vector<MountInfoEntry> read_mountinfo();

}  // namespace kmsfs::fs
