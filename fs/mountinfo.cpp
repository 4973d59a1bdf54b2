#include "fs/mountinfo.h"

#include <fstream>
#include <sstream>

namespace kmsfs::fs {

namespace {

std::string unescape(const std::string& field) {
  auto octal = [](char c) { return c >= '0' && c <= '7'; };
  std::string out;
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() && octal(field[i + 1]) && octal(field[i + 2]) &&
        octal(field[i + 3])) {
      out.push_back(static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 + (field[i + 3] - '0')));
      i += 3;
    } else {
      out.push_back(field[i]);
    }
  }
  return out;
}

}  // namespace

std::optional<MountInfoEntry> parse_mountinfo_line(const std::string& line) {
  // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS
  const auto dash = line.find(" - ");
  if (dash == std::string::npos) return std::nullopt;
  std::istringstream head(line.substr(0, dash));
  std::string id, parent, root;
  MountInfoEntry e;
  if (!(head >> id >> parent >> e.device >> root >> e.mount_point)) return std::nullopt;
  std::istringstream tail(line.substr(dash + 3));
  if (!(tail >> e.fstype >> e.source)) return std::nullopt;
  e.mount_point = unescape(e.mount_point);
  e.source = unescape(e.source);
  return e;
}

std::vector<MountInfoEntry> read_mountinfo() {
  std::vector<MountInfoEntry> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (auto e = parse_mountinfo_line(line)) out.push_back(std::move(*e));
  }
  return out;
}

}  // namespace kmsfs::fs
