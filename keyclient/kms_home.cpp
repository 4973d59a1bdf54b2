#include "keyclient/kms_home.h"

#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
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
}  // namespace

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
