// mount.kmsfs: the mount(8) helper, so that `mount -t kmsfs CIPHERDIR MNT -o
// kms=unix:/run/kmsfs/kmsd.sock` and /etc/fstab lines work (systemd's
// fstab generator then makes .mount units of them). Argument translation
// only: it runs `kmsfs mount`, which returns once the mount serves.
//
// mount(8) calls: mount.kmsfs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]
//
// Options it handles: kms=SPEC (--kms), kms_home=DIR (KMSFS_HOME),
// pkcs11_module=PATH, pin_file=PATH. Options it drops because mount(8) or
// systemd act on them: defaults, auto, noauto, nofail, _netdev, user, users,
// nouser, owner, group, comment=..., x-.... Everything else goes to kmsfs
// mount -o (ro, rw, allow_other, key_cache=..., ...).

#include <limits.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifndef KMSFS_INSTALL_BINDIR
#define KMSFS_INSTALL_BINDIR "/usr/bin"
#endif

namespace {

const char* const kUsage = R"(mount.kmsfs - mount(8) helper for kmsfs volumes

Usage: mount.kmsfs CIPHERDIR MOUNTPOINT [-sfnv] [-o OPTIONS]
       (normally run by: mount -t kmsfs CIPHERDIR MOUNTPOINT -o OPTIONS)

Options (-o, comma-separated):
  kms=SPEC            where the KMS runs: unix:/run/kmsfs/kmsd.sock (kmsd) or
                      embedded (default: $KMSFS_KMS, else embedded)
  kms_home=DIR        KMSFS_HOME of an embedded KMS
  pkcs11_module=PATH, pin_file=PATH   passed to kmsfs
  defaults, auto, noauto, nofail, _netdev, user, users, nouser, owner,
  group, comment=..., x-systemd.*, x-...     handled by mount(8)/systemd, ignored
  anything else (ro, rw, allow_other, key_cache=off, key_cache_ttl=S, ...)
                      is a kmsfs mount option (see kmsfs mount --help)

Flags: -f fake (print the command, mount nothing), -v verbose, -n and -s
accepted and ignored; -t TYPE ignored.

Example /etc/fstab line:
  /srv/data.cipher  /srv/data  kmsfs  kms=unix:/run/kmsfs/kmsd.sock,allow_other,nofail,x-systemd.requires=kmsd.socket,_netdev  0  0
)";

bool ignored(const std::string& name) {
  static const char* const names[] = {"defaults", "auto", "noauto", "nofail", "_netdev", "user",
                                      "users",    "nouser", "owner", "group", "comment"};
  for (const char* n : names) {
    if (name == n) return true;
  }
  return name.rfind("x-", 0) == 0;
}

// The kmsfs binary next to this helper's real path (a build tree or a
// symlink to one), else the installed one, else PATH.
std::string find_kmsfs() {
  char self[PATH_MAX];
  if (::realpath("/proc/self/exe", self) != nullptr) {
    std::string dir(self);
    dir.erase(dir.rfind('/'));
    for (const std::string& cand : {dir + "/kmsfs", dir + "/../bin/kmsfs"}) {
      if (::access(cand.c_str(), X_OK) == 0) return cand;
    }
  }
  const std::string installed = std::string(KMSFS_INSTALL_BINDIR) + "/kmsfs";
  if (::access(installed.c_str(), X_OK) == 0) return installed;
  return "kmsfs";
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  std::vector<std::string> option_strings;
  bool fake = false;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (a == "-o" || a == "-t" || a == "-N") {
      if (i + 1 >= argc) {
        std::cerr << "mount.kmsfs: " << a << " needs a value\n";
        return 1;
      }
      std::string v = argv[++i];
      if (a == "-o") option_strings.push_back(v);
      continue;
    }
    if (a.rfind("-o", 0) == 0 && a.size() > 2) {
      option_strings.push_back(a.substr(2));
      continue;
    }
    if (a.size() > 1 && a[0] == '-') {
      // Clustered single-letter flags: -sfnv.
      for (char c : a.substr(1)) {
        if (c == 'f') {
          fake = true;
        } else if (c == 'v') {
          verbose = true;
        } else if (c != 's' && c != 'n') {
          std::cerr << "mount.kmsfs: unknown flag -" << c << " (see mount.kmsfs --help)\n";
          return 1;
        }
      }
      continue;
    }
    positional.push_back(a);
  }
  if (positional.size() != 2) {
    std::cerr << "mount.kmsfs: expected CIPHERDIR and MOUNTPOINT (see mount.kmsfs --help)\n";
    return 1;
  }

  std::vector<std::string> global;  // kmsfs options before "mount"
  std::vector<std::string> passed;  // kmsfs mount -o items
  for (const auto& s : option_strings) {
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
      if (item.empty()) continue;
      const auto eq = item.find('=');
      const std::string name = item.substr(0, eq);
      const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (name == "kms" || name == "pkcs11_module" || name == "pin_file") {
        if (value.empty()) {
          std::cerr << "mount.kmsfs: option " << name << " needs a value\n";
          return 1;
        }
        std::string flag = "--" + name;
        for (char& c : flag) {
          if (c == '_') c = '-';
        }
        global.push_back(flag + "=" + value);
      } else if (name == "kms_home") {
        if (value.empty()) {
          std::cerr << "mount.kmsfs: option kms_home needs a value\n";
          return 1;
        }
        ::setenv("KMSFS_HOME", value.c_str(), 1);
      } else if (!ignored(name)) {
        passed.push_back(item);
      }
    }
  }

  std::vector<std::string> cmd{find_kmsfs()};
  cmd.insert(cmd.end(), global.begin(), global.end());
  cmd.push_back("mount");
  cmd.push_back(positional[0]);
  cmd.push_back(positional[1]);
  if (!passed.empty()) {
    std::string o;
    for (const auto& p : passed) o += (o.empty() ? "" : ",") + p;
    cmd.push_back("-o");
    cmd.push_back(o);
  }
  if (verbose || fake) {
    std::string line;
    for (const auto& c : cmd) line += (line.empty() ? "" : " ") + c;
    std::cerr << "mount.kmsfs: " << line << "\n";
  }
  if (fake) return 0;
  std::vector<char*> args;
  for (auto& c : cmd) args.push_back(c.data());
  args.push_back(nullptr);
  if (cmd[0].find('/') != std::string::npos) {
    ::execv(cmd[0].c_str(), args.data());
  } else {
    ::execvp(cmd[0].c_str(), args.data());
  }
  std::cerr << "mount.kmsfs: cannot run " << cmd[0] << ": " << std::strerror(errno) << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) noexcept {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "mount.kmsfs: internal error: " << e.what() << "\n";
    return 1;
  }
}
