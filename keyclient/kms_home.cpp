#include "keyclient/kms_home.h"

#include <dirent.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <memory>
#include <vector>

#include "crypto/random.h"
#include "keyclient/logger.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

namespace {
Unexpected<KmsError> startup_error(std::string msg) {
  named_logger("kmsfs.kms")->error("{}", msg);
  return kms_error(KmsErrorCode::KMSInternalException, std::move(msg));
}

// The subdirectories of `dir` (SoftHSM2 token directories are named by
// UUID); a missing `dir` has none.
KmsResult<std::vector<std::string>> subdirectories(const std::string& dir) {
  std::vector<std::string> out;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
  if (!d) {
    if (errno == ENOENT) return out;
    return startup_error("cannot list " + dir + ": " + errno_text(errno));
  }
  while (const dirent* e = ::readdir(d.get())) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat st {};
    const std::string path = dir + "/" + name;
    if (::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) out.push_back(path);
  }
  std::sort(out.begin(), out.end());
  return out;
}

constexpr const char* kTokenObject = "/token.object";
constexpr const char* kTokenObjectBackup = "/token.object.kmsfs-backup";
}  // namespace

KmsResult<int> restore_softhsm_token_objects(const KmsHomePaths& paths) {
  auto dirs = subdirectories(paths.tokens);
  if (!dirs) return Unexpected<KmsError>(std::move(dirs).error());
  int restored = 0;
  for (const auto& dir : *dirs) {
    auto backup = read_file_if_exists(dir + kTokenObjectBackup);
    if (!backup) return startup_error(backup.error());
    if (!*backup || (*backup)->empty()) continue;
    auto live = read_file_if_exists(dir + kTokenObject);
    if (!live) return startup_error(live.error());
    if (*live && (*live)->size() >= (*backup)->size()) continue;
    auto w = atomic_write_file(dir + kTokenObject, **backup, 0600);
    if (!w) return startup_error("cannot restore " + dir + kTokenObject + ": " + w.error());
    named_logger("kmsfs.kms")
        ->warn("restored {}{} from its backup: it was {} (SoftHSM2 was stopped while rewriting it)", dir,
               kTokenObject, *live ? "cut short" : "missing");
    ++restored;
  }
  return restored;
}

KmsResult<int> backup_softhsm_token_objects(const KmsHomePaths& paths, const std::string& token_label) {
  // SoftHSM2 stores the label as a 32-byte, blank-padded string.
  std::string padded = token_label.substr(0, 32);
  padded.resize(32, ' ');
  auto dirs = subdirectories(paths.tokens);
  if (!dirs) return Unexpected<KmsError>(std::move(dirs).error());
  int written = 0;
  for (const auto& dir : *dirs) {
    auto live = read_file_if_exists(dir + kTokenObject);
    if (!live) return startup_error(live.error());
    if (!*live || (*live)->find(padded) == std::string::npos) continue;
    auto backup = read_file_if_exists(dir + kTokenObjectBackup);
    if (!backup) return startup_error(backup.error());
    if (*backup && **backup == **live) continue;
    // Never replace a copy with a shorter file: that is the damage the copy
    // is there to undo.
    if (*backup && (*live)->size() < (*backup)->size()) continue;
    auto w = atomic_write_file(dir + kTokenObjectBackup, **live, 0600);
    if (!w) return startup_error("cannot back up " + dir + kTokenObject + ": " + w.error());
    ++written;
  }
  return written;
}

std::size_t count_key_records(const KmsHomePaths& paths) {
  std::size_t n = 0;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir((paths.home + "/keys").c_str()), ::closedir);
  if (!d) return 0;
  while (const dirent* e = ::readdir(d.get())) {
    const std::string name = e->d_name;
    // KEYID.json (36-character key id); temp files of interrupted writers
    // carry a longer suffix.
    if (name.size() == 41 && name.compare(36, 5, ".json") == 0) ++n;
  }
  return n;
}

KmsHomePaths kms_home_paths(const std::string& home) {
  std::string h = home;
  while (h.size() > 1 && h.back() == '/') h.pop_back();
  return KmsHomePaths{h, h + "/lock", h + "/softhsm2.conf", h + "/tokens", h + "/pin", h + "/so-pin"};
}

std::string default_kms_home() {
  if (const char* e = std::getenv("KMSFS_HOME"); e != nullptr && *e != '\0') return e;
  if (::geteuid() == 0) return "/var/lib/kmsfs";
  std::string home;
  if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') {
    home = h;
  } else {
    std::vector<char> buf(16384);
    struct passwd pw {};
    struct passwd* res = nullptr;
    if (::getpwuid_r(::geteuid(), &pw, buf.data(), buf.size(), &res) == 0 && res != nullptr) home = pw.pw_dir;
  }
  if (home.empty()) home = "/tmp";  // no home at all: still per-user via the uid check
  return home + "/.local/share/kmsfs";
}

KmsResult<void> ensure_kms_home_dir(const KmsHomePaths& paths) {
  auto r = ensure_private_dir(paths.home, "KMS home", 0700);
  if (!r) return startup_error(r.error());
  return {};
}

KmsResult<void> write_softhsm_conf(const KmsHomePaths& paths) {
  auto t = ensure_private_dir(paths.tokens, "SoftHSM token directory", 0700);
  if (!t) return startup_error(t.error());
  auto existing = read_file_if_exists(paths.softhsm_conf);
  if (!existing) return startup_error(existing.error());
  const std::string marker = "# Written by kmsfs for its embedded KMS";
  const std::string tokendir_line = "directories.tokendir = " + paths.tokens + "\n";
  if (*existing) {
    // The operator may have tuned it: keep it — unless it is ours and names
    // another token directory because the state dir was moved or copied
    // (a state dir moves between embedded mode and kmsd, and to backups).
    const std::string& text = **existing;
    if (text.rfind(marker, 0) != 0 || text.find(tokendir_line) != std::string::npos) return {};
  }
  const std::string conf =
      "# Written by kmsfs for its embedded KMS; SoftHSM2 reads it via SOFTHSM2_CONF.\n"
      "directories.tokendir = " +
      paths.tokens +
      "\n"
      "objectstore.backend = file\n"
      "log.level = ERROR\n"
      "slots.removable = false\n";
  auto w = atomic_write_file(paths.softhsm_conf, conf, 0600);
  if (!w) return startup_error(w.error());
  return {};
}

KmsResult<void> create_pin_file_if_missing(const std::string& path) {
  constexpr char kHex[] = "0123456789abcdef";
  crypto::SecureBuffer raw(16);
  crypto::random_bytes(raw.span());
  crypto::SecureBuffer hex(32);
  for (std::size_t i = 0; i < raw.size(); ++i) {
    hex.data()[2 * i] = static_cast<std::uint8_t>(kHex[raw.data()[i] >> 4]);
    hex.data()[2 * i + 1] = static_cast<std::uint8_t>(kHex[raw.data()[i] & 0xf]);
  }
  auto c = create_secret_file_if_missing(path, hex.span());
  if (!c) return startup_error(c.error());
  if (*c) named_logger("kmsfs.kms")->info("created PIN file {}", path);
  return {};
}

KmsResult<crypto::SecureBuffer> load_pin(const std::string& path) {
  auto p = read_pin_file(path);
  if (!p) return startup_error(p.error());
  return std::move(*p);
}

}  // namespace kmsfs::keyclient
