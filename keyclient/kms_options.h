#pragma once
// How a tool reaches a KeyService: `--kms SPEC` (KMSFS_KMS), KMSFS_HOME,
// `--pkcs11-module`, `--pin-file`. One factory turns these into the service.

#include <memory>
#include <string>

#include "keyclient/key_service.h"

namespace kmsfs::keyclient {

struct KmsOptions {
  // "embedded" (the core in this process, state under `home`) or
  // "unix:PATH" (kmsd on that socket).
  std::string spec = "embedded";
  // Embedded state directory. Empty = default: $KMSFS_HOME, else
  // /var/lib/kmsfs for root, else ~/.local/share/kmsfs.
  std::string home;
  // PKCS#11 module; empty = the build's default (SoftHSM2). With SoftHSM2
  // and no SOFTHSM2_CONF in the environment, the core writes and uses
  // HOME/softhsm2.conf with its token directory HOME/tokens.
  std::string pkcs11_module;
  // User PIN file; empty = HOME/pin (created 0600 with a random PIN at first
  // use). A PIN file readable or writable by group or others is refused.
  std::string pin_file;
  // Token label; the token is found by label, never by slot number.
  std::string token_label = "kmsfs";
  // The core's audit_sync_interval (KmsCoreOptions), in milliseconds:
  // -1 = $KMSFS_AUDIT_SYNC_INTERVAL_MS, else the core's default (100 ms);
  // 0 = fdatasync every audit record before its call returns.
  long long audit_sync_interval_ms = -1;
  // KmsCoreOptions::audit_sync_plaintext: 1 (default) or 0; -1 =
  // $KMSFS_AUDIT_SYNC_PLAINTEXT, else 1.
  int audit_sync_plaintext = -1;
  // Deadline of one HSM call in milliseconds (BoundedHsm): a call the
  // module does not answer in time fails with a clear error instead of
  // blocking its caller for as long as the HSM hangs. -1 =
  // $KMSFS_HSM_TIMEOUT_MS, else 30000; 0 = no deadline (calls run on the
  // caller's thread).
  long long hsm_timeout_ms = -1;
  // Directory of the audit trail; empty = the state dir. Created 0700;
  // one open to group or others is refused.
  std::string audit_dir;
};

// Resolves the defaults described above (reads KMSFS_KMS and KMSFS_HOME when
// the fields are empty / at their defaults).
KmsOptions resolve_kms_options(KmsOptions opts);

// Builds the KeyService for `opts`. Start-up failures (module missing, token
// cannot be initialised, PIN file refused, state dir unusable) come back as a
// KmsError whose message names the thing and the reason.
KmsResult<std::unique_ptr<KeyService>> make_key_service(const KmsOptions& opts);

class KmsCore;
// The KMS core itself over the state dir `opts.home` (what make_key_service
// wraps for "embedded", and what kmsd serves); opts.spec is ignored.
KmsResult<std::unique_ptr<KmsCore>> make_kms_core(const KmsOptions& opts);

}  // namespace kmsfs::keyclient
