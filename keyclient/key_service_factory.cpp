// Implements keyclient/kms_options.h: the one place that turns --kms,
// KMSFS_HOME, --pkcs11-module and --pin-file into a KeyService.

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "keyclient/bounded_hsm.h"
#include "keyclient/kms_core.h"
#include "keyclient/kmsd_client.h"
#include "keyclient/kms_home.h"
#include "keyclient/kms_options.h"
#include "keyclient/logger.h"
#include "keyclient/pkcs11_hsm.h"
#include "keyclient/state_files.h"

#ifndef KMSFS_DEFAULT_PKCS11_MODULE
#define KMSFS_DEFAULT_PKCS11_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#endif

namespace kmsfs::keyclient {

KmsOptions resolve_kms_options(KmsOptions opts) {
  if (opts.spec.empty()) {
    const char* e = std::getenv("KMSFS_KMS");
    opts.spec = (e != nullptr && *e != '\0') ? e : "embedded";
  }
  if (opts.home.empty()) opts.home = default_kms_home();
  opts.home = kms_home_paths(opts.home).home;
  if (opts.pkcs11_module.empty()) opts.pkcs11_module = KMSFS_DEFAULT_PKCS11_MODULE;
  if (opts.pin_file.empty()) opts.pin_file = kms_home_paths(opts.home).pin;
  if (opts.token_label.empty()) opts.token_label = "kmsfs";
  if (opts.audit_sync_interval_ms < 0) {
    const char* e = std::getenv("KMSFS_AUDIT_SYNC_INTERVAL_MS");
    if (e != nullptr && *e != '\0') {
      char* end = nullptr;
      errno = 0;
      const long long v = std::strtoll(e, &end, 10);
      // A malformed value is reported by make_kms_core (-2 marks it).
      opts.audit_sync_interval_ms = (errno != 0 || *end != '\0' || v < 0 || v > 3600000) ? -2 : v;
    }
  }
  if (opts.audit_sync_plaintext < 0) {
    const char* e = std::getenv("KMSFS_AUDIT_SYNC_PLAINTEXT");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "1") == 0) {
      opts.audit_sync_plaintext = 1;
    } else {
      opts.audit_sync_plaintext = std::strcmp(e, "0") == 0 ? 0 : -2;  // -2: reported by make_kms_core
    }
  }
  if (opts.hsm_timeout_ms < 0) {
    opts.hsm_timeout_ms = 30000;
    const char* e = std::getenv("KMSFS_HSM_TIMEOUT_MS");
    if (e != nullptr && *e != '\0') {
      char* end = nullptr;
      errno = 0;
      const long long v = std::strtoll(e, &end, 10);
      opts.hsm_timeout_ms = (errno != 0 || *end != '\0' || v < 0 || v > 3600000) ? -2 : v;  // -2: reported below
    }
  }
  return opts;
}

namespace {

// Pkcs11Hsm::open (module load, C_Initialize, session, login) within the
// HSM deadline: a token that hangs at start-up fails the start with a clear
// error instead of hanging the process. The opener thread is abandoned then
// (it owns its copy of the configuration).
HsmResult<std::unique_ptr<Pkcs11Hsm>> open_hsm_bounded(Pkcs11Config cfg, long long timeout_ms) {
  if (timeout_ms <= 0) return Pkcs11Hsm::open(std::move(cfg));
  struct Opening {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<HsmResult<std::unique_ptr<Pkcs11Hsm>>> result;
  };
  auto state = std::make_shared<Opening>();
  std::thread opener;
  try {
    opener = std::thread([state, c = std::move(cfg)]() mutable {
      auto r = Pkcs11Hsm::open(std::move(c));
      std::lock_guard<std::mutex> lock(state->mu);
      state->result.emplace(std::move(r));
      state->cv.notify_all();
    });
  } catch (const std::system_error& e) {
    return Unexpected<HsmError>(
        HsmError{HsmError::Kind::DeviceError, 0, std::string("cannot start a thread to open the HSM: ") + e.what()});
  }
  std::unique_lock<std::mutex> lock(state->mu);
  if (!state->cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return state->result.has_value(); })) {
    opener.detach();  // stuck in the module: the process goes on (or exits) without it
    return Unexpected<HsmError>(HsmError{HsmError::Kind::DeviceError, 0,
                                         "the HSM did not answer within " + std::to_string(timeout_ms) +
                                             " ms while opening it (KMSFS_HSM_TIMEOUT_MS)"});
  }
  auto result = std::move(*state->result);
  lock.unlock();
  opener.join();  // it only has to leave now; joined, its exit handlers never race the process's exit
  return result;
}

}  // namespace

KmsResult<std::unique_ptr<KmsCore>> make_kms_core(const KmsOptions& opts) {
  const KmsOptions o = resolve_kms_options(opts);
  auto log = named_logger("kmsfs.kms");
  if (o.audit_sync_interval_ms < -1) {
    return kms_error(KmsErrorCode::ValidationException,
                     "KMSFS_AUDIT_SYNC_INTERVAL_MS must be a number of milliseconds from 0 to 3600000");
  }
  if (o.audit_sync_plaintext < -1) {
    return kms_error(KmsErrorCode::ValidationException, "KMSFS_AUDIT_SYNC_PLAINTEXT must be 0 or 1");
  }
  if (o.hsm_timeout_ms < 0) {
    return kms_error(KmsErrorCode::ValidationException,
                     "KMSFS_HSM_TIMEOUT_MS must be a number of milliseconds from 0 (no deadline) to 3600000");
  }
  const KmsHomePaths paths = kms_home_paths(o.home);
  if (auto d = ensure_kms_home_dir(paths); !d) return Unexpected<KmsError>(d.error());

  const bool default_module = o.pkcs11_module == KMSFS_DEFAULT_PKCS11_MODULE;
  const bool default_pin = o.pin_file == paths.pin;
  // We own the token only when it is SoftHSM with our own PIN files; a
  // token of another HSM (or behind a PIN the operator supplies) is never
  // initialised by us.
  const bool own_token = default_module && default_pin;

  std::unique_ptr<Hsm> hsm;
  {
    // First-use initialisation (conf, PINs, C_InitToken) by one process at a time.
    auto lock = FileLock::acquire(paths.lock);
    if (!lock) return kms_error(KmsErrorCode::KMSInternalException, lock.error());

    if (default_module && std::getenv("SOFTHSM2_CONF") == nullptr) {
      if (auto w = write_softhsm_conf(paths); !w) return Unexpected<KmsError>(w.error());
      // Read by SoftHSM at C_Initialize, which happens below.
      if (::setenv("SOFTHSM2_CONF", paths.softhsm_conf.c_str(), 1) != 0) {
        return kms_error(KmsErrorCode::KMSInternalException, "cannot set SOFTHSM2_CONF: " + errno_text(errno));
      }
    }
    // SoftHSM2 keeps its tokens in HOME/tokens (the conf above): guard
    // their token.object files against a process killed mid-login.
    const char* conf_env = std::getenv("SOFTHSM2_CONF");
    const bool our_tokendir = default_module && conf_env != nullptr && paths.softhsm_conf == conf_env;
    if (our_tokendir) {
      if (auto r = restore_softhsm_token_objects(paths); !r) return Unexpected<KmsError>(r.error());
    }
    if (default_pin) {
      if (auto c = create_pin_file_if_missing(paths.pin); !c) return Unexpected<KmsError>(c.error());
    }
    if (own_token) {
      if (auto c = create_pin_file_if_missing(paths.so_pin); !c) return Unexpected<KmsError>(c.error());
    }
    const std::size_t records = count_key_records(paths);
    Pkcs11Config cfg;
    cfg.module_path = o.pkcs11_module;
    cfg.token_label = o.token_label;
    auto pin = load_pin(o.pin_file);
    if (!pin) return Unexpected<KmsError>(std::move(pin).error());
    cfg.user_pin = std::move(*pin);
    if (own_token) {
      auto so = load_pin(paths.so_pin);
      if (!so) return Unexpected<KmsError>(std::move(so).error());
      cfg.so_pin_for_init = std::move(*so);
      // A home that holds key records had its token: a new, empty one
      // would orphan every key, so it is never created over them.
      cfg.init_token_if_missing = records == 0;
    }
    if (our_tokendir) cfg.sync_dir = paths.tokens;
    auto opened = open_hsm_bounded(std::move(cfg), o.hsm_timeout_ms);
    if (!opened) {
      std::string msg = "cannot open the HSM token '" + o.token_label + "': " + opened.error().message;
      if (own_token && records != 0) {
        msg += " (" + paths.home + "/keys holds " + std::to_string(records) +
               " key records, so no new token is created: that would orphan every key; restore " + paths.tokens +
               " from a backup)";
      }
      log->error("{}", msg);
      return kms_error(KmsErrorCode::KeyUnavailableException, std::move(msg));
    }
    if (o.hsm_timeout_ms > 0) {
      hsm = std::make_unique<BoundedHsm>(std::move(*opened), std::chrono::milliseconds(o.hsm_timeout_ms));
    } else {
      hsm = std::move(*opened);
    }
    if (our_tokendir) {
      if (auto b = backup_softhsm_token_objects(paths, o.token_label); !b) return Unexpected<KmsError>(b.error());
    }
  }  // the init lock is released before the core takes it for its own writes

  KmsCoreOptions core_opts;
  core_opts.background_maintenance = true;  // an idle kmsd or mount still shreds on time
  if (o.audit_sync_interval_ms >= 0) core_opts.audit_sync_interval = std::chrono::milliseconds(o.audit_sync_interval_ms);
  core_opts.audit_sync_plaintext = o.audit_sync_plaintext != 0;
  if (!o.audit_dir.empty()) {
    auto d = ensure_private_dir(o.audit_dir, "audit log directory", 0700);
    if (!d) return kms_error(KmsErrorCode::KMSInternalException, d.error());
    core_opts.audit_dir = o.audit_dir;
  }
  auto core = std::make_unique<KmsCore>(paths.home, std::move(hsm), system_clock_now, core_opts);
  log->debug("KMS core ready in {}", paths.home);
  return core;
}

namespace {

KmsResult<std::unique_ptr<KeyService>> make_embedded(const KmsOptions& o) {
  auto core = make_kms_core(o);
  if (!core) return Unexpected<KmsError>(std::move(core).error());
  return std::unique_ptr<KeyService>(std::make_unique<EmbeddedKeyService>(std::move(*core)));
}

}  // namespace

KmsResult<std::unique_ptr<KeyService>> make_key_service(const KmsOptions& opts) {
  const KmsOptions o = resolve_kms_options(opts);
  if (o.spec == "embedded") return make_embedded(o);
  if (o.spec.rfind("unix:", 0) == 0) {
    KmsdClientOptions c;
    c.socket_path = o.spec.substr(5);
    if (c.socket_path.empty()) {
      return kms_error(KmsErrorCode::ValidationException, "--kms unix:PATH needs a socket path");
    }
    // No connection yet: kmsd may start later, and every call reconnects.
    return std::unique_ptr<KeyService>(std::make_unique<KmsdClient>(std::move(c)));
  }
  return kms_error(KmsErrorCode::ValidationException,
                   "unknown KMS spec '" + o.spec + "' (expected 'embedded' or 'unix:PATH')");
}

}  // namespace kmsfs::keyclient
