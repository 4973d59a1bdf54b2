#pragma once
// The embedded KMS home (KMSFS_HOME): where the in-process core keeps its
// state. Layout:
//
//   HOME/               0700, owned by the user; refused otherwise
//   HOME/lock           flock(2): first-use initialisation and every
//                       read-modify-write of the key records
//   HOME/softhsm2.conf  written when the module is the default SoftHSM2 and
//                       SOFTHSM2_CONF is not set (tokendir = HOME/tokens)
//   HOME/tokens/        SoftHSM2's token directory
//   HOME/pin, so-pin    0600, 32 random hex characters, created at first use
//   HOME/keys/, HOME/aliases.json   the KMS core's records (KeyStore)

#include <string>

#include "crypto/secure_buffer.h"
#include "keyclient/kms_error.h"

namespace kmsfs::keyclient {

struct KmsHomePaths {
  std::string home;
  std::string lock;
  std::string softhsm_conf;
  std::string tokens;
  std::string pin;
  std::string so_pin;
};

KmsHomePaths kms_home_paths(const std::string& home);

// $KMSFS_HOME, else /var/lib/kmsfs for uid 0, else ~/.local/share/kmsfs.
std::string default_kms_home();

// Creates (or checks) HOME with mode 0700: refuses one owned by another
// user or writable by group or others, saying why.
KmsResult<void> ensure_kms_home_dir(const KmsHomePaths& paths);

// Writes HOME/softhsm2.conf (if missing) and creates HOME/tokens.
KmsResult<void> write_softhsm_conf(const KmsHomePaths& paths);

// Creates `path` (0600, O_EXCL, fsynced) holding a fresh random 32-hex-char
// PIN unless it exists.
KmsResult<void> create_pin_file_if_missing(const std::string& path);

// Reads a PIN file into secure memory; refuses group/other access.
KmsResult<crypto::SecureBuffer> load_pin(const std::string& path);

}  // namespace kmsfs::keyclient
