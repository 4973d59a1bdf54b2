#include "tools/volume_commands.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "crypto/block_layout.h"
#include "crypto/encoding.h"
#include "crypto/file_header.h"
#include "fs/fsck.h"
#include "fs/name_mapper.h"
#include "fs/volume.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/kms_options.h"

namespace kmsfs::cli {

namespace {

int fail(int code, const std::string& message) {
  std::cerr << "kmsfs: " << message << "\n";
  return code;
}

bool wants_help(const GlobalOptions& g, const std::vector<std::string>& args) {
  if (g.help) return true;
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

}  // namespace

int cmd_fsck(const GlobalOptions& g, const std::vector<std::string>& args) {
  if (wants_help(g, args)) {
    std::cout << R"(Usage: kmsfs fsck CIPHERDIR [--repair] [--json]

Checks kmsfs.json, every directory IV, every encrypted name and long-name
side file, every file header (it parses and the KMS unwraps its data key),
every block's authentication tag and every symlink target, and names each
damaged object with the reason. Progress goes to stderr.

  --repair  remove leftovers of interrupted operations and orphan side files,
            recreate the IV of an empty directory, and move unreadable objects
            into CIPHERDIR/kmsfs.quarantine/ (listed in its index.jsonl).
            Nothing readable is changed and nothing is deleted. The volume
            must not be mounted.
  --json    print the report as JSON

Exit codes: 0 the volume is sound; 6 damage found (and not all repaired);
7 damage found and all of it repaired; 1, 3, 4, 5 as for every command.
)";
    return 0;
  }
  bool repair = false;
  bool as_json = false;
  std::string cipherdir;
  for (const auto& a : args) {
    if (a == "--repair") {
      repair = true;
    } else if (a == "--json") {
      as_json = true;
    } else if (!a.empty() && a[0] == '-') {
      return fail(2, "fsck: unknown option " + a + " (see kmsfs fsck --help)");
    } else if (cipherdir.empty()) {
      cipherdir = a;
    } else {
      return fail(2, "fsck: expected one CIPHERDIR");
    }
  }
  if (cipherdir.empty()) return fail(2, "fsck: missing CIPHERDIR (see kmsfs fsck --help)");
  if (auto c = fs::VolumeConfig::load(cipherdir); !c) return fail(5, c.error());
  if (repair && fs::cipherdir_is_mounted(cipherdir)) {
    return fail(1, cipherdir + " is mounted; unmount it before fsck --repair");
  }
  auto kms = keyclient::make_key_service(g.kms);
  if (!kms) return fail(static_cast<int>(exit_code_for(kms.error())), "KMS: " + kms.error().to_string());

  const bool tty = ::isatty(STDERR_FILENO) != 0;
  fs::FsckOptions options;
  options.repair = repair;
  options.progress = [tty](const fs::FsckStats& s) {
    std::cerr << (tty ? "\r" : "") << "checked " << s.files << " files, " << s.directories
              << " directories, " << (s.bytes >> 20) << " MiB" << (tty ? "" : "\n") << std::flush;
  };
  auto report = fs::run_fsck(**kms, cipherdir, options);
  if (tty) std::cerr << "\r\033[K" << std::flush;
  if (!report) return fail(3, "cannot check " + cipherdir + ": " + report.error());

  const auto& r = *report;
  if (as_json) {
    nlohmann::json j;
    j["CipherDir"] = cipherdir;
    j["Directories"] = r.stats.directories;
    j["Files"] = r.stats.files;
    j["Symlinks"] = r.stats.symlinks;
    j["Blocks"] = r.stats.blocks;
    j["PlaintextBytes"] = r.stats.bytes;
    j["Problems"] = nlohmann::json::array();
    for (const auto& p : r.problems) {
      j["Problems"].push_back({{"BackingPath", p.backing_path}, {"PlainPath", p.plain_path},
                               {"Kind", p.kind}, {"Reason", p.reason}, {"Repaired", p.repaired},
                               {"Repair", p.repair}});
    }
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << "kmsfs fsck " << cipherdir << ": " << r.stats.files << " files, " << r.stats.directories
              << " directories, " << r.stats.symlinks << " symlinks, " << r.stats.blocks
              << " blocks checked\n";
    for (const auto& p : r.problems) {
      std::cout << "  " << (p.repaired ? "REPAIRED " : "DAMAGED  ") << p.backing_path;
      if (!p.plain_path.empty()) std::cout << " (" << p.plain_path << ")";
      std::cout << ": " << p.kind << ": " << p.reason;
      if (!p.repair.empty()) std::cout << " [" << p.repair << "]";
      std::cout << "\n";
    }
    if (r.clean()) std::cout << "The volume is sound.\n";
  }
  if (r.clean()) return 0;
  return r.all_repaired() ? kFsckDamageRepaired : kFsckDamageLeft;
}

int cmd_inspect(const GlobalOptions& g, const std::vector<std::string>& args) {
  if (wants_help(g, args)) {
    std::cout << "Usage: kmsfs inspect BACKINGFILE\n\nPrints a backing file's header as JSON: file "
                 "id, KMS key id and key version of its wrapped data key, sizes. Never key bytes; "
                 "needs no KMS.\n";
    return 0;
  }
  if (args.size() != 1) return fail(2, "inspect: expected one BACKINGFILE");
  const std::string& path = args[0];
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(1, path + ": " + std::strerror(errno));
  struct stat st {};
  std::uint8_t raw[crypto::FileHeader::kSize];
  ssize_t n = ::fstat(fd, &st) == 0 ? ::pread(fd, raw, sizeof raw, 0) : -1;
  ::close(fd);
  if (n < 0) return fail(1, path + ": " + std::strerror(errno));
  nlohmann::json j;
  j["File"] = path;
  j["StoredSize"] = st.st_size;
  j["PlaintextSize"] = crypto::block_layout::plain_size(static_cast<std::uint64_t>(st.st_size));
  if (st.st_size == 0) {
    j["Header"] = nullptr;  // an empty file has none
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  auto header = crypto::FileHeader::decode(std::span(raw, static_cast<std::size_t>(n)));
  if (!header) return fail(5, path + ": not a kmsfs file: " + header.error());
  j["FileId"] = crypto::file_id_hex(header->file_id);
  j["Blocks"] = crypto::block_layout::block_count(j["PlaintextSize"].get<std::uint64_t>());
  j["WrappedKeySize"] = header->wrapped_key.size();
  auto blob = keyclient::CiphertextBlob::decode(header->wrapped_key);
  if (blob) {
    j["KeyId"] = keyclient::uuid_to_string(blob->key_uuid);
    j["KeyVersion"] = blob->key_version;
  } else {
    j["WrappedKeyError"] = blob.error();
  }
  std::cout << j.dump(2) << "\n";
  return 0;
}

namespace {

int map_path_command(const GlobalOptions& g, const std::vector<std::string>& args, bool encrypt) {
  const char* name = encrypt ? "encrypt-path" : "decrypt-path";
  if (wants_help(g, args)) {
    std::cout << "Usage: kmsfs " << name << " CIPHERDIR PATH\n\n"
              << (encrypt ? "Prints the backing path (relative to CIPHERDIR) of PATH, a path relative "
                            "to the mount's root."
                          : "Prints the plaintext path (relative to the mount's root) of PATH, a path "
                            "relative to CIPHERDIR.")
              << "\nFor backups and debugging; the volume need not be mounted.\n";
    return 0;
  }
  if (args.size() != 2) return fail(2, std::string(name) + ": expected CIPHERDIR and PATH");
  if (auto c = fs::VolumeConfig::load(args[0]); !c) return fail(5, c.error());
  auto kms = keyclient::make_key_service(g.kms);
  if (!kms) return fail(static_cast<int>(exit_code_for(kms.error())), "KMS: " + kms.error().to_string());
  auto volume = fs::Volume::open(**kms, args[0]);
  if (!volume) return fail(3, volume.error());
  auto mapped = encrypt ? fs::encrypt_path((*volume)->names(), args[0], args[1])
                        : fs::decrypt_path((*volume)->names(), args[0], args[1]);
  if (!mapped) return fail(1, mapped.error());
  std::cout << *mapped << "\n";
  return 0;
}

}  // namespace

int cmd_encrypt_path(const GlobalOptions& g, const std::vector<std::string>& args) {
  return map_path_command(g, args, true);
}

int cmd_decrypt_path(const GlobalOptions& g, const std::vector<std::string>& args) {
  return map_path_command(g, args, false);
}

}  // namespace kmsfs::cli
