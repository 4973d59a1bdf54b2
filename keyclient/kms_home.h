#pragma once
// The embedded KMS home (KMSFS_HOME): where the in-process core keeps its
// state. Layout:
//
//   HOME/               0700, owned by the user; refused otherwise
//   HOME/lock           flock(2): first-use initialisation and every
//                       read-modify-write of the key records
//   HOME/softhsm2.conf  written when the module is the default SoftHSM2 and
//                       SOFTHSM2_CONF is not set (tokendir = HOME/tokens)
//   HOME/tokens/        SoftHSM2's token directory; each token's
//                       token.object has a copy, token.object.kmsfs-backup
//                       (see restore_softhsm_token_objects)
//   HOME/pin, so-pin    0600, 32 random hex characters, created at first use
//   HOME/keys/, HOME/aliases.json   the KMS core's records (KeyStore)

#include <cstddef>
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

// SoftHSM2 rewrites TOKEN/token.object in place (truncate, then write) at
// every successful C_Login, without fsync. A process killed in that window
// leaves the file short or empty, and with it go the token's PIN blobs and
// the key that encrypts every object: the whole token, every master key.
// kmsfs therefore keeps a copy of each token.object that carries
// `token_label`, TOKEN/token.object.kmsfs-backup (SoftHSM2 ignores it),
// written atomically after each successful open when it differs
// (backup_softhsm_token_objects), and restores it before C_Initialize when
// the live file is missing or shorter than the copy: a rewrite changes the
// flags, never the length. Call both with HOME/lock held. They act only on
// HOME/tokens, the token directory of the softhsm2.conf kmsfs writes.
// Returns how many files it restored / wrote.
KmsResult<int> restore_softhsm_token_objects(const KmsHomePaths& paths);
KmsResult<int> backup_softhsm_token_objects(const KmsHomePaths& paths, const std::string& token_label);

// How many key records HOME/keys holds (a home that has keys must never be
// given a new, empty token).
std::size_t count_key_records(const KmsHomePaths& paths);

}  // namespace kmsfs::keyclient
