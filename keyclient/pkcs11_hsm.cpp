#include "keyclient/pkcs11_hsm.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>
#include <p11-kit/pkcs11.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <optional>
#include <utility>
#include <vector>

#include "crypto/sha256.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

// SoftHSM2 2.6.1 reads the 48-byte v3.0 layout (with ulIvBits); the 40-byte
// v2.40-text layout fails with CKR_ARGUMENTS_BAD.
static_assert(sizeof(CK_GCM_PARAMS) == 48, "CK_GCM_PARAMS must be the 48-byte struct with ulIvBits");

namespace {

constexpr std::size_t kTagBytes = 16;

std::shared_ptr<spdlog::logger> log() { return named_logger("kmsfs.p11"); }

std::string rv_name(CK_RV rv) {
  switch (rv) {
#define KMSFS_CKR(x) \
  case x:            \
    return #x;
    KMSFS_CKR(CKR_OK)
    KMSFS_CKR(CKR_CANCEL)
    KMSFS_CKR(CKR_HOST_MEMORY)
    KMSFS_CKR(CKR_SLOT_ID_INVALID)
    KMSFS_CKR(CKR_GENERAL_ERROR)
    KMSFS_CKR(CKR_FUNCTION_FAILED)
    KMSFS_CKR(CKR_ARGUMENTS_BAD)
    KMSFS_CKR(CKR_CANT_LOCK)
    KMSFS_CKR(CKR_ATTRIBUTE_READ_ONLY)
    KMSFS_CKR(CKR_ATTRIBUTE_SENSITIVE)
    KMSFS_CKR(CKR_ATTRIBUTE_TYPE_INVALID)
    KMSFS_CKR(CKR_ATTRIBUTE_VALUE_INVALID)
    KMSFS_CKR(CKR_DATA_INVALID)
    KMSFS_CKR(CKR_DATA_LEN_RANGE)
    KMSFS_CKR(CKR_DEVICE_ERROR)
    KMSFS_CKR(CKR_DEVICE_MEMORY)
    KMSFS_CKR(CKR_DEVICE_REMOVED)
    KMSFS_CKR(CKR_ENCRYPTED_DATA_INVALID)
    KMSFS_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE)
    KMSFS_CKR(CKR_FUNCTION_NOT_SUPPORTED)
    KMSFS_CKR(CKR_KEY_HANDLE_INVALID)
    KMSFS_CKR(CKR_KEY_SIZE_RANGE)
    KMSFS_CKR(CKR_KEY_TYPE_INCONSISTENT)
    KMSFS_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED)
    KMSFS_CKR(CKR_MECHANISM_INVALID)
    KMSFS_CKR(CKR_MECHANISM_PARAM_INVALID)
    KMSFS_CKR(CKR_OBJECT_HANDLE_INVALID)
    KMSFS_CKR(CKR_OPERATION_ACTIVE)
    KMSFS_CKR(CKR_OPERATION_NOT_INITIALIZED)
    KMSFS_CKR(CKR_PIN_INCORRECT)
    KMSFS_CKR(CKR_PIN_INVALID)
    KMSFS_CKR(CKR_PIN_LEN_RANGE)
    KMSFS_CKR(CKR_PIN_EXPIRED)
    KMSFS_CKR(CKR_PIN_LOCKED)
    KMSFS_CKR(CKR_SESSION_CLOSED)
    KMSFS_CKR(CKR_SESSION_COUNT)
    KMSFS_CKR(CKR_SESSION_HANDLE_INVALID)
    KMSFS_CKR(CKR_SESSION_READ_ONLY)
    KMSFS_CKR(CKR_SESSION_EXISTS)
    KMSFS_CKR(CKR_SESSION_READ_WRITE_SO_EXISTS)
    KMSFS_CKR(CKR_TEMPLATE_INCOMPLETE)
    KMSFS_CKR(CKR_TEMPLATE_INCONSISTENT)
    KMSFS_CKR(CKR_TOKEN_NOT_PRESENT)
    KMSFS_CKR(CKR_TOKEN_NOT_RECOGNIZED)
    KMSFS_CKR(CKR_TOKEN_WRITE_PROTECTED)
    KMSFS_CKR(CKR_USER_ALREADY_LOGGED_IN)
    KMSFS_CKR(CKR_USER_NOT_LOGGED_IN)
    KMSFS_CKR(CKR_USER_PIN_NOT_INITIALIZED)
    KMSFS_CKR(CKR_USER_TYPE_INVALID)
    KMSFS_CKR(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)
    KMSFS_CKR(CKR_BUFFER_TOO_SMALL)
    KMSFS_CKR(CKR_RANDOM_NO_RNG)
    KMSFS_CKR(CKR_CRYPTOKI_NOT_INITIALIZED)
    KMSFS_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED)
#undef KMSFS_CKR
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "CKR_0x%08lX", static_cast<unsigned long>(rv));
      return buf;
    }
  }
}

HsmError make_error(HsmError::Kind kind, CK_RV rv, std::string what) {
  if (rv != CKR_OK) what += ": " + rv_name(rv);
  return HsmError{kind, static_cast<unsigned long>(rv), std::move(what)};
}

Unexpected<HsmError> fail(HsmError::Kind kind, CK_RV rv, std::string what) {
  return Unexpected<HsmError>(make_error(kind, rv, std::move(what)));
}

// The session can no longer be used: discard it and open a new one.
bool session_is_broken(CK_RV rv) {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_DEVICE_REMOVED ||
         rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_USER_NOT_LOGGED_IN || rv == CKR_OPERATION_ACTIVE;
}

bool handle_is_stale(CK_RV rv) { return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID; }

HsmError::Kind kind_for(CK_RV rv) {
  switch (rv) {
    case CKR_ARGUMENTS_BAD:
    case CKR_DATA_LEN_RANGE:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_KEY_SIZE_RANGE:
      return HsmError::Kind::InvalidArgument;
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_PIN_INCORRECT:
    case CKR_PIN_LOCKED:
      return HsmError::Kind::NotLoggedIn;
    default:
      return HsmError::Kind::DeviceError;
  }
}

struct DlCloser {
  void operator()(void* h) const noexcept {
    if (h != nullptr) (void)::dlclose(h);
  }
};
using DlHandle = std::unique_ptr<void, DlCloser>;

// PKCS#11 initialisation is per process: a second C_Initialize answers
// CKR_CRYPTOKI_ALREADY_INITIALIZED, and C_Finalize ends the library for
// every user in the process. This table counts the Pkcs11Hsm objects of this
// process per module that WE initialised, so the last one finalises and a
// module initialised by someone else is never finalised. It is the one piece
// of process-wide state here, mirroring the module's own.
struct InitRegistry {
  std::mutex mu;
  std::map<CK_FUNCTION_LIST_PTR, int> ours;  // guarded by mu
};
InitRegistry& init_registry() {
  static InitRegistry r;
  return r;
}

std::array<CK_UTF8CHAR, 32> padded_label(const std::string& label) {
  std::array<CK_UTF8CHAR, 32> out{};
  out.fill(' ');
  std::memcpy(out.data(), label.data(), std::min<std::size_t>(label.size(), out.size()));
  return out;
}

}  // namespace

struct Pkcs11Hsm::Impl {
  // Lock order: pool_mu and cache_mu are never held together, and neither is
  // held across a PKCS#11 call except the short C_OpenSession/C_Login made
  // while no lock is held (see acquire()).
  DlHandle lib;
  CK_FUNCTION_LIST_PTR f = nullptr;
  bool registered = false;  // counted in init_registry()
  CK_SLOT_ID slot = 0;
  std::string token_label;
  crypto::SecureBuffer user_pin;
  std::size_t max_sessions = 4;
  std::string sync_dir;  // Pkcs11Config::sync_dir

  // Keeps the token logged in (closing a token's last session logs it out).
  // Written only by open() and the destructor.
  CK_SESSION_HANDLE anchor = CK_INVALID_HANDLE;

  std::mutex pool_mu;
  std::condition_variable pool_cv;
  std::vector<CK_SESSION_HANDLE> idle;  // guarded by pool_mu
  std::size_t open_sessions = 0;        // guarded by pool_mu; pool sessions, not the anchor

  std::mutex cache_mu;
  std::map<std::string, CK_OBJECT_HANDLE> handles;  // guarded by cache_mu; label -> object

  ~Impl();

  HsmResult<CK_SESSION_HANDLE> open_logged_in_session();
  HsmResult<CK_SESSION_HANDLE> acquire();
  void release(CK_SESSION_HANDLE s, bool broken);

  HsmResult<CK_OBJECT_HANDLE> find_key(CK_SESSION_HANDLE s, const std::string& label, bool use_cache);
  // syncfs(2) of sync_dir's filesystem (no-op when unset).
  HsmResult<void> sync_token_files();
  void forget(const std::string& label) {
    std::lock_guard<std::mutex> lock(cache_mu);
    handles.erase(label);
  }

  // Runs fn(session) with a pooled session; a session-level failure
  // (handle invalid, closed, device removed) discards that session and the
  // call is retried once on a fresh one.
  template <class Fn>
  // `changes_objects`: the call creates or destroys token objects. SoftHSM2
  // rewrites its token files then, and an operation in another session of
  // this process meanwhile can fail with CKR_GENERAL_ERROR (seen with two
  // cores creating keys at once): such calls run alone in the process,
  // every other call shares the lock.
  auto with_session(Fn&& fn, bool changes_objects = false) -> decltype(fn(CK_SESSION_HANDLE{}));
};

namespace {
// RAII lease of one pooled session.
class Lease {
 public:
  Lease(Pkcs11Hsm::Impl& impl, CK_SESSION_HANDLE s) : impl_(&impl), s_(s) {}
  ~Lease() { impl_->release(s_, broken_); }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  CK_SESSION_HANDLE get() const { return s_; }
  void mark_broken() { broken_ = true; }

 private:
  Pkcs11Hsm::Impl* impl_;
  CK_SESSION_HANDLE s_;
  bool broken_ = false;
};
}  // namespace

Pkcs11Hsm::Impl::~Impl() {
  try {
    std::vector<CK_SESSION_HANDLE> sessions;
    {
      std::lock_guard<std::mutex> lock(pool_mu);
      sessions.swap(idle);
    }
    if (f != nullptr) {
      for (auto s : sessions) (void)f->C_CloseSession(s);
      if (anchor != CK_INVALID_HANDLE) (void)f->C_CloseSession(anchor);
      if (registered) {
        auto& reg = init_registry();
        std::lock_guard<std::mutex> lock(reg.mu);
        if (--reg.ours[f] == 0) {
          reg.ours.erase(f);
          CK_RV rv = f->C_Finalize(nullptr);
          if (rv != CKR_OK) log()->warn("C_Finalize: {}", rv_name(rv));
        }
      }
    }
  } catch (...) {
    // A destructor never throws; nothing useful is left to do.
  }
}

HsmResult<CK_SESSION_HANDLE> Pkcs11Hsm::Impl::open_logged_in_session() {
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  CK_RV rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) {
    return fail(HsmError::Kind::DeviceError, rv, "C_OpenSession on token '" + token_label + "'");
  }
  // Login state is per token and application: a second login answers
  // CKR_USER_ALREADY_LOGGED_IN, which is success.
  rv = f->C_Login(s, CKU_USER, const_cast<CK_UTF8CHAR_PTR>(user_pin.data()),
                  static_cast<CK_ULONG>(user_pin.size()));
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
    (void)f->C_CloseSession(s);
    return fail(kind_for(rv) == HsmError::Kind::DeviceError ? HsmError::Kind::DeviceError
                                                            : HsmError::Kind::NotLoggedIn,
                rv, "C_Login as user on token '" + token_label + "'");
  }
  return s;
}

HsmResult<CK_SESSION_HANDLE> Pkcs11Hsm::Impl::acquire() {
  {
    std::unique_lock<std::mutex> lock(pool_mu);
    pool_cv.wait(lock, [&] { return !idle.empty() || open_sessions < max_sessions; });
    if (!idle.empty()) {
      CK_SESSION_HANDLE s = idle.back();
      idle.pop_back();
      return s;
    }
    ++open_sessions;  // reserve a slot; opened below without the lock held
  }
  auto s = open_logged_in_session();
  if (!s) {
    std::lock_guard<std::mutex> lock(pool_mu);
    --open_sessions;
    pool_cv.notify_one();
  }
  return s;
}

void Pkcs11Hsm::Impl::release(CK_SESSION_HANDLE s, bool broken) {
  if (broken) {
    (void)f->C_CloseSession(s);  // may fail: the handle is already dead
    std::lock_guard<std::mutex> lock(pool_mu);
    --open_sessions;
  } else {
    std::lock_guard<std::mutex> lock(pool_mu);
    idle.push_back(s);
  }
  pool_cv.notify_one();
}

template <class Fn>
auto Pkcs11Hsm::Impl::with_session(Fn&& fn, bool changes_objects) -> decltype(fn(CK_SESSION_HANDLE{})) {
  // One lock for the whole process: every Pkcs11Hsm of a module shares its
  // token files.
  static std::shared_mutex token_objects;
  for (int attempt = 0;; ++attempt) {
    auto s = acquire();
    if (!s) return Unexpected<HsmError>(std::move(s).error());
    Lease lease(*this, *s);
    std::shared_lock<std::shared_mutex> shared(token_objects, std::defer_lock);
    std::unique_lock<std::shared_mutex> exclusive(token_objects, std::defer_lock);
    if (changes_objects) {
      exclusive.lock();
    } else {
      shared.lock();
    }
    auto r = fn(lease.get());
    if (!r && session_is_broken(static_cast<CK_RV>(r.error().ckr))) {
      lease.mark_broken();
      if (attempt == 0) {
        log()->warn("PKCS#11 session failed ({}); reopening", r.error().message);
        continue;
      }
    }
    if (r && changes_objects) {
      if (auto synced = sync_token_files(); !synced) return Unexpected<HsmError>(std::move(synced).error());
    }
    return r;
  }
}

HsmResult<void> Pkcs11Hsm::Impl::sync_token_files() {
  if (sync_dir.empty()) return {};
  const int fd = ::open(sync_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || ::syncfs(fd) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    return fail(HsmError::Kind::DeviceError, CKR_OK,
                "cannot sync the token directory " + sync_dir + ": " + std::strerror(err));
  }
  ::close(fd);
  return {};
}

HsmResult<CK_OBJECT_HANDLE> Pkcs11Hsm::Impl::find_key(CK_SESSION_HANDLE s, const std::string& label,
                                                      bool use_cache) {
  if (use_cache) {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = handles.find(label);
    if (it != handles.end()) return it->second;
  }
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE tmpl[] = {
      {CKA_CLASS, &cls, sizeof cls},
      {CKA_LABEL, const_cast<char*>(label.data()), static_cast<CK_ULONG>(label.size())},
  };
  CK_RV rv = f->C_FindObjectsInit(s, tmpl, 2);
  if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_FindObjectsInit for key '" + label + "'");
  CK_OBJECT_HANDLE found[2];
  CK_ULONG count = 0;
  rv = f->C_FindObjects(s, found, 2, &count);
  CK_RV rv_final = f->C_FindObjectsFinal(s);
  if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_FindObjects for key '" + label + "'");
  if (rv_final != CKR_OK) return fail(kind_for(rv_final), rv_final, "C_FindObjectsFinal");
  if (count == 0) {
    return fail(HsmError::Kind::KeyNotFound, CKR_OK, "no key labelled '" + label + "' on token '" +
                                                         token_label + "'");
  }
  if (count > 1) log()->warn("more than one key labelled '{}'; using the first", label);
  std::lock_guard<std::mutex> lock(cache_mu);
  handles[label] = found[0];
  return found[0];
}

Pkcs11Hsm::Pkcs11Hsm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pkcs11Hsm::~Pkcs11Hsm() = default;

namespace {

struct SlotMatch {
  std::optional<CK_SLOT_ID> with_label;
  bool user_pin_initialized = false;
  std::optional<CK_SLOT_ID> uninitialized;
};

HsmResult<SlotMatch> scan_slots(CK_FUNCTION_LIST_PTR f, const std::string& label) {
  CK_ULONG n = 0;
  CK_RV rv = f->C_GetSlotList(CK_FALSE, nullptr, &n);
  if (rv != CKR_OK) return fail(HsmError::Kind::DeviceError, rv, "C_GetSlotList");
  std::vector<CK_SLOT_ID> slots(n);
  rv = f->C_GetSlotList(CK_FALSE, slots.data(), &n);
  if (rv != CKR_OK) return fail(HsmError::Kind::DeviceError, rv, "C_GetSlotList");
  slots.resize(n);
  auto want = padded_label(label);
  SlotMatch m;
  for (CK_SLOT_ID id : slots) {
    CK_TOKEN_INFO ti{};
    rv = f->C_GetTokenInfo(id, &ti);
    if (rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_TOKEN_NOT_RECOGNIZED) continue;
    if (rv != CKR_OK) return fail(HsmError::Kind::DeviceError, rv, "C_GetTokenInfo");
    if ((ti.flags & CKF_TOKEN_INITIALIZED) == 0) {
      if (!m.uninitialized) m.uninitialized = id;
      continue;
    }
    if (std::memcmp(ti.label, want.data(), want.size()) == 0 && !m.with_label) {
      m.with_label = id;
      m.user_pin_initialized = (ti.flags & CKF_USER_PIN_INITIALIZED) != 0;
    }
  }
  return m;
}

HsmResult<void> init_user_pin(CK_FUNCTION_LIST_PTR f, CK_SLOT_ID slot, const Pkcs11Config& c) {
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  CK_RV rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) return fail(HsmError::Kind::DeviceError, rv, "C_OpenSession for C_InitPIN");
  rv = f->C_Login(s, CKU_SO, const_cast<CK_UTF8CHAR_PTR>(c.so_pin_for_init.data()),
                  static_cast<CK_ULONG>(c.so_pin_for_init.size()));
  if (rv != CKR_OK) {
    (void)f->C_CloseSession(s);
    return fail(HsmError::Kind::NotLoggedIn, rv, "C_Login as SO on token '" + c.token_label + "'");
  }
  rv = f->C_InitPIN(s, const_cast<CK_UTF8CHAR_PTR>(c.user_pin.data()),
                    static_cast<CK_ULONG>(c.user_pin.size()));
  (void)f->C_Logout(s);
  (void)f->C_CloseSession(s);
  if (rv != CKR_OK) return fail(HsmError::Kind::DeviceError, rv, "C_InitPIN on token '" + c.token_label + "'");
  return {};
}

}  // namespace

HsmResult<std::unique_ptr<Pkcs11Hsm>> Pkcs11Hsm::open(Pkcs11Config config) {
  auto impl = std::make_unique<Impl>();
  if (config.token_label.empty() || config.token_label.size() > 32) {
    return fail(HsmError::Kind::InvalidArgument, CKR_OK,
                "token label must be 1..32 bytes: '" + config.token_label + "'");
  }
  if (config.user_pin.empty()) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "user PIN is empty");
  impl->token_label = config.token_label;
  impl->sync_dir = config.sync_dir;
  impl->max_sessions = config.max_sessions == 0 ? 1 : config.max_sessions;

  ::dlerror();
  impl->lib.reset(::dlopen(config.module_path.c_str(), RTLD_NOW | RTLD_LOCAL));
  if (!impl->lib) {
    const char* e = ::dlerror();
    return fail(HsmError::Kind::DeviceError, CKR_OK,
                "cannot load PKCS#11 module " + config.module_path + ": " + (e ? e : "dlopen failed"));
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(impl->lib.get(), "C_GetFunctionList"));
  if (get_list == nullptr) {
    return fail(HsmError::Kind::DeviceError, CKR_OK,
                config.module_path + " is not a PKCS#11 module (no C_GetFunctionList)");
  }
  CK_RV rv = get_list(&impl->f);
  if (rv != CKR_OK || impl->f == nullptr) {
    return fail(HsmError::Kind::DeviceError, rv, "C_GetFunctionList of " + config.module_path);
  }

  {
    // C_Initialize(NULL) would switch SoftHSM's locking off: ask for OS locks.
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    auto& reg = init_registry();
    std::lock_guard<std::mutex> lock(reg.mu);
    rv = impl->f->C_Initialize(&args);
    if (rv == CKR_OK) {
      reg.ours[impl->f] = 1;
      impl->registered = true;
    } else if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      auto it = reg.ours.find(impl->f);
      if (it != reg.ours.end()) {
        ++it->second;
        impl->registered = true;
      }  // else initialised by someone else in this process: never finalise it
    } else {
      return fail(HsmError::Kind::DeviceError, rv, "C_Initialize of " + config.module_path);
    }
  }

  auto m = scan_slots(impl->f, config.token_label);
  if (!m) return Unexpected<HsmError>(std::move(m).error());
  if (!m->with_label) {
    if (!config.init_token_if_missing) {
      return fail(HsmError::Kind::DeviceError, CKR_OK,
                  "no initialised token labelled '" + config.token_label + "' in " + config.module_path);
    }
    if (!m->uninitialized) {
      return fail(HsmError::Kind::DeviceError, CKR_OK,
                  "no token labelled '" + config.token_label + "' and no uninitialised slot in " +
                      config.module_path);
    }
    if (config.so_pin_for_init.empty()) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK, "token initialisation needs an SO PIN");
    }
    auto label = padded_label(config.token_label);
    rv = impl->f->C_InitToken(*m->uninitialized, const_cast<CK_UTF8CHAR_PTR>(config.so_pin_for_init.data()),
                              static_cast<CK_ULONG>(config.so_pin_for_init.size()), label.data());
    if (rv != CKR_OK) {
      return fail(HsmError::Kind::DeviceError, rv, "C_InitToken '" + config.token_label + "'");
    }
    log()->info("initialised PKCS#11 token '{}'", config.token_label);
    // SoftHSM renumbers its slots after C_InitToken: find the token again.
    m = scan_slots(impl->f, config.token_label);
    if (!m) return Unexpected<HsmError>(std::move(m).error());
    if (!m->with_label) {
      return fail(HsmError::Kind::DeviceError, CKR_OK,
                  "token '" + config.token_label + "' not found after C_InitToken");
    }
  }
  impl->slot = *m->with_label;
  if (!m->user_pin_initialized) {
    // Also repairs a token whose initialisation stopped between C_InitToken
    // and C_InitPIN.
    if (!config.init_token_if_missing || config.so_pin_for_init.empty()) {
      return fail(HsmError::Kind::NotLoggedIn, CKR_USER_PIN_NOT_INITIALIZED,
                  "token '" + config.token_label + "' has no user PIN");
    }
    auto r = init_user_pin(impl->f, impl->slot, config);
    if (!r) return Unexpected<HsmError>(std::move(r).error());
  }

  impl->user_pin = std::move(config.user_pin);
  auto anchor = impl->open_logged_in_session();
  if (!anchor) return Unexpected<HsmError>(std::move(anchor).error());
  impl->anchor = *anchor;
  log()->debug("PKCS#11 token '{}' open (slot {})", impl->token_label, impl->slot);
  return std::unique_ptr<Pkcs11Hsm>(new Pkcs11Hsm(std::move(impl)));
}

HsmResult<void> Pkcs11Hsm::generate_aes_key(const std::string& label, std::size_t key_bytes) {
  if (label.empty()) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "empty key label");
  if (key_bytes != 16 && key_bytes != 24 && key_bytes != 32) {
    return fail(HsmError::Kind::InvalidArgument, CKR_OK, "AES key size must be 16, 24 or 32 bytes");
  }
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    auto existing = impl_->find_key(s, label, /*use_cache=*/false);
    if (existing) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK, "a key labelled '" + label + "' already exists");
    }
    if (existing.error().kind != HsmError::Kind::KeyNotFound) return Unexpected<HsmError>(existing.error());

    // SoftHSM's defaults are TOKEN=false and SENSITIVE=false: every
    // attribute is spelt out.
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG len = static_cast<CK_ULONG>(key_bytes);
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    auto* lbl = const_cast<char*>(label.data());
    auto lbl_len = static_cast<CK_ULONG>(label.size());
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},        {CKA_KEY_TYPE, &type, sizeof type},
        {CKA_VALUE_LEN, &len, sizeof len},    {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},      {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},    {CKA_ENCRYPT, &yes, sizeof yes},
        {CKA_DECRYPT, &yes, sizeof yes},      {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},         {CKA_MODIFIABLE, &no, sizeof no},
        {CKA_LABEL, lbl, lbl_len},            {CKA_ID, lbl, lbl_len},
    };
    CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = impl_->f->C_GenerateKey(s, &mech, tmpl, sizeof tmpl / sizeof tmpl[0], &h);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_GenerateKey '" + label + "'");
    {
      std::lock_guard<std::mutex> lock(impl_->cache_mu);
      impl_->handles[label] = h;
    }
    log()->debug("generated AES-{} key '{}'", key_bytes * 8, label);
    return {};
  }, /*changes_objects=*/true);
}

HsmResult<bool> Pkcs11Hsm::key_exists(const std::string& label) {
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<bool> {
    auto h = impl_->find_key(s, label, /*use_cache=*/false);
    if (h) return true;
    if (h.error().kind == HsmError::Kind::KeyNotFound) {
      impl_->forget(label);
      return false;
    }
    return Unexpected<HsmError>(h.error());
  });
}

HsmResult<void> Pkcs11Hsm::destroy_key(const std::string& label) {
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    auto h = impl_->find_key(s, label, /*use_cache=*/false);
    if (!h) return Unexpected<HsmError>(h.error());
    impl_->forget(label);
    CK_RV rv = impl_->f->C_DestroyObject(s, *h);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_DestroyObject '" + label + "'");
    log()->debug("destroyed key '{}'", label);
    return {};
  }, /*changes_objects=*/true);
}

HsmResult<std::vector<std::uint8_t>> Pkcs11Hsm::encrypt_gcm(const std::string& label,
                                                           std::span<const std::uint8_t> iv,
                                                           std::span<const std::uint8_t> aad,
                                                           std::span<const std::uint8_t> plaintext) {
  if (iv.size() != 12) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "GCM IV must be 12 bytes");
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<std::vector<std::uint8_t>> {
    for (int attempt = 0;; ++attempt) {
      auto key = impl_->find_key(s, label, /*use_cache=*/true);
      if (!key) return Unexpected<HsmError>(key.error());
      CK_GCM_PARAMS p{};
      p.pIv = const_cast<CK_BYTE_PTR>(iv.data());
      p.ulIvLen = 12;
      p.ulIvBits = 96;
      p.pAAD = const_cast<CK_BYTE_PTR>(aad.data());
      p.ulAADLen = static_cast<CK_ULONG>(aad.size());
      p.ulTagBits = 128;
      CK_MECHANISM mech{CKM_AES_GCM, &p, sizeof p};
      CK_RV rv = impl_->f->C_EncryptInit(s, &mech, *key);
      if (handle_is_stale(rv) && attempt == 0) {
        impl_->forget(label);  // the object was destroyed or re-created elsewhere
        continue;
      }
      if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_EncryptInit (AES-GCM) with '" + label + "'");
      std::vector<std::uint8_t> out(plaintext.size() + kTagBytes);
      CK_ULONG out_len = static_cast<CK_ULONG>(out.size());
      rv = impl_->f->C_Encrypt(s, const_cast<CK_BYTE_PTR>(plaintext.data()),
                               static_cast<CK_ULONG>(plaintext.size()), out.data(), &out_len);
      if (rv == CKR_BUFFER_TOO_SMALL) {  // the operation stays active: retry with the size asked
        out.resize(out_len);
        rv = impl_->f->C_Encrypt(s, const_cast<CK_BYTE_PTR>(plaintext.data()),
                                 static_cast<CK_ULONG>(plaintext.size()), out.data(), &out_len);
      }
      if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_Encrypt (AES-GCM) with '" + label + "'");
      out.resize(out_len);
      return out;
    }
  });
}

HsmResult<crypto::SecureBuffer> Pkcs11Hsm::decrypt_gcm(const std::string& label,
                                                      std::span<const std::uint8_t> iv,
                                                      std::span<const std::uint8_t> aad,
                                                      std::span<const std::uint8_t> ct) {
  if (iv.size() != 12) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "GCM IV must be 12 bytes");
  if (ct.size() < kTagBytes) {
    return fail(HsmError::Kind::AuthenticationFailed, CKR_OK, "ciphertext shorter than the GCM tag");
  }
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<crypto::SecureBuffer> {
    for (int attempt = 0;; ++attempt) {
      auto key = impl_->find_key(s, label, /*use_cache=*/true);
      if (!key) return Unexpected<HsmError>(key.error());
      CK_GCM_PARAMS p{};
      p.pIv = const_cast<CK_BYTE_PTR>(iv.data());
      p.ulIvLen = 12;
      p.ulIvBits = 96;
      p.pAAD = const_cast<CK_BYTE_PTR>(aad.data());
      p.ulAADLen = static_cast<CK_ULONG>(aad.size());
      p.ulTagBits = 128;
      CK_MECHANISM mech{CKM_AES_GCM, &p, sizeof p};
      CK_RV rv = impl_->f->C_DecryptInit(s, &mech, *key);
      if (handle_is_stale(rv) && attempt == 0) {
        impl_->forget(label);
        continue;
      }
      if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_DecryptInit (AES-GCM) with '" + label + "'");
      // GCM decryption releases nothing before the tag verified; SoftHSM
      // wants room for the whole input.
      crypto::SecureBuffer out(ct.size());
      CK_ULONG out_len = static_cast<CK_ULONG>(out.size());
      rv = impl_->f->C_Decrypt(s, const_cast<CK_BYTE_PTR>(ct.data()), static_cast<CK_ULONG>(ct.size()),
                               out.data(), &out_len);
      if (rv == CKR_BUFFER_TOO_SMALL) {
        out = crypto::SecureBuffer(out_len);
        rv = impl_->f->C_Decrypt(s, const_cast<CK_BYTE_PTR>(ct.data()),
                                 static_cast<CK_ULONG>(ct.size()), out.data(), &out_len);
      }
      if (rv == CKR_GENERAL_ERROR || rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_FUNCTION_FAILED) {
        // SoftHSM 2.6.1 reports a wrong tag or AAD as CKR_GENERAL_ERROR.
        return fail(HsmError::Kind::AuthenticationFailed, rv,
                    "AES-GCM tag did not verify under '" + label + "'");
      }
      if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_Decrypt (AES-GCM) with '" + label + "'");
      out.shrink(out_len);
      return out;
    }
  });
}

HsmResult<void> Pkcs11Hsm::generate_random(std::span<std::uint8_t> out) {
  if (out.empty()) return {};
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    CK_RV rv = impl_->f->C_GenerateRandom(s, out.data(), static_cast<CK_ULONG>(out.size()));
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_GenerateRandom");
    return {};
  });
}


// ---------------------------------------------------------------------------
// #3: HMAC keys for the audit trail, RSA wrapping keys and imported material.

namespace {

// Every object labelled `label` (of class `cls` unless it is ~0UL).
HsmResult<std::vector<CK_OBJECT_HANDLE>> find_objects(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s,
                                                      const std::string& label, CK_OBJECT_CLASS cls) {
  std::vector<CK_ATTRIBUTE> tmpl;
  tmpl.push_back({CKA_LABEL, const_cast<char*>(label.data()), static_cast<CK_ULONG>(label.size())});
  if (cls != ~0UL) tmpl.push_back({CKA_CLASS, &cls, sizeof cls});
  CK_RV rv = f->C_FindObjectsInit(s, tmpl.data(), static_cast<CK_ULONG>(tmpl.size()));
  if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_FindObjectsInit for '" + label + "'");
  std::vector<CK_OBJECT_HANDLE> out;
  for (;;) {
    CK_OBJECT_HANDLE found[16];
    CK_ULONG count = 0;
    rv = f->C_FindObjects(s, found, 16, &count);
    if (rv != CKR_OK || count == 0) break;
    out.insert(out.end(), found, found + count);
  }
  CK_RV rv_final = f->C_FindObjectsFinal(s);
  if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_FindObjects for '" + label + "'");
  if (rv_final != CKR_OK) return fail(kind_for(rv_final), rv_final, "C_FindObjectsFinal");
  return out;
}

HsmResult<CK_OBJECT_HANDLE> find_one(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, const std::string& label,
                                     CK_OBJECT_CLASS cls) {
  auto v = find_objects(f, s, label, cls);
  if (!v) return Unexpected<HsmError>(v.error());
  if (v->empty()) return fail(HsmError::Kind::KeyNotFound, CKR_OK, "no object labelled '" + label + "'");
  return v->front();
}

// MGF1 with SHA-256 (RFC 8017 B.2.1), XORed into `out`.
void mgf1_sha256_xor(std::span<const std::uint8_t> seed, std::span<std::uint8_t> out) {
  std::vector<std::uint8_t> buf(seed.begin(), seed.end());
  buf.resize(seed.size() + 4);
  std::size_t done = 0;
  for (std::uint32_t counter = 0; done < out.size(); ++counter) {
    buf[seed.size()] = static_cast<std::uint8_t>(counter >> 24);
    buf[seed.size() + 1] = static_cast<std::uint8_t>(counter >> 16);
    buf[seed.size() + 2] = static_cast<std::uint8_t>(counter >> 8);
    buf[seed.size() + 3] = static_cast<std::uint8_t>(counter);
    auto d = crypto::sha256(buf);
    for (std::size_t i = 0; i < d.size() && done < out.size(); ++i) out[done++] ^= d[i];
  }
  OPENSSL_cleanse(buf.data(), buf.size());
}

// EME-OAEP decoding (RFC 8017 7.1.2 step 3) with SHA-256 and an empty
// label, over the raw RSA output `em` (k bytes). Checks are accumulated so
// that every malformed input takes the same path.
std::optional<crypto::SecureBuffer> oaep_sha256_decode(std::span<const std::uint8_t> em_in) {
  constexpr std::size_t h = 32;
  const std::size_t k = em_in.size();
  if (k < 2 * h + 2) return std::nullopt;
  crypto::SecureBuffer em = crypto::SecureBuffer::from(em_in);
  auto seed = em.span().subspan(1, h);
  auto db = em.span().subspan(1 + h);
  mgf1_sha256_xor(db, seed);
  mgf1_sha256_xor(seed, db);
  static const auto empty_hash = crypto::sha256({});
  unsigned bad = em.data()[0];
  for (std::size_t i = 0; i < h; ++i) bad |= static_cast<unsigned>(db[i] ^ empty_hash[i]);
  std::size_t one = 0;
  unsigned found = 0;
  for (std::size_t i = h; i < db.size(); ++i) {
    const unsigned is_one = (db[i] == 1) ? 1u : 0u;
    const unsigned is_zero = (db[i] == 0) ? 1u : 0u;
    if (!found && is_one) one = i;
    bad |= (!found && !is_one && !is_zero) ? 1u : 0u;
    found |= is_one;
  }
  if (bad != 0 || !found) return std::nullopt;
  return crypto::SecureBuffer::from(db.subspan(one + 1));
}

}  // namespace

HsmResult<void> Pkcs11Hsm::generate_hmac_key(const std::string& label) {
  if (label.empty()) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "empty key label");
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    auto existing = find_objects(impl_->f, s, label, ~0UL);
    if (!existing) return Unexpected<HsmError>(existing.error());
    if (!existing->empty()) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK, "an object labelled '" + label + "' already exists");
    }
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_GENERIC_SECRET;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    auto* lbl = const_cast<char*>(label.data());
    auto lbl_len = static_cast<CK_ULONG>(label.size());
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &type, sizeof type}, {CKA_VALUE_LEN, &len, sizeof len},
        {CKA_TOKEN, &yes, sizeof yes},     {CKA_PRIVATE, &yes, sizeof yes},    {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no}, {CKA_SIGN, &yes, sizeof yes},       {CKA_VERIFY, &yes, sizeof yes},
        {CKA_ENCRYPT, &no, sizeof no},     {CKA_DECRYPT, &no, sizeof no},      {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},      {CKA_MODIFIABLE, &no, sizeof no},   {CKA_LABEL, lbl, lbl_len},
        {CKA_ID, lbl, lbl_len},
    };
    CK_MECHANISM mech{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = impl_->f->C_GenerateKey(s, &mech, tmpl, sizeof tmpl / sizeof tmpl[0], &h);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_GenerateKey (generic secret) '" + label + "'");
    log()->debug("generated HMAC key '{}'", label);
    return {};
  }, /*changes_objects=*/true);
}

HsmResult<std::vector<std::uint8_t>> Pkcs11Hsm::hmac_sha256(const std::string& label,
                                                           std::span<const std::uint8_t> data) {
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<std::vector<std::uint8_t>> {
    auto key = impl_->find_key(s, label, /*use_cache=*/false);
    if (!key) return Unexpected<HsmError>(key.error());
    CK_MECHANISM mech{CKM_SHA256_HMAC, nullptr, 0};
    CK_RV rv = impl_->f->C_SignInit(s, &mech, *key);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_SignInit (HMAC-SHA-256) with '" + label + "'");
    std::vector<std::uint8_t> mac(32);
    CK_ULONG mac_len = static_cast<CK_ULONG>(mac.size());
    rv = impl_->f->C_Sign(s, const_cast<CK_BYTE_PTR>(data.data()), static_cast<CK_ULONG>(data.size()), mac.data(),
                          &mac_len);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_Sign (HMAC-SHA-256) with '" + label + "'");
    mac.resize(mac_len);
    return mac;
  });
}

HsmResult<std::vector<std::uint8_t>> Pkcs11Hsm::generate_rsa_wrapping_key_pair(const std::string& label,
                                                                              std::size_t modulus_bits) {
  if (label.empty()) return fail(HsmError::Kind::InvalidArgument, CKR_OK, "empty key label");
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<std::vector<std::uint8_t>> {
    auto existing = find_objects(impl_->f, s, label, ~0UL);
    if (!existing) return Unexpected<HsmError>(existing.error());
    if (!existing->empty()) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK, "an object labelled '" + label + "' already exists");
    }
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    CK_ULONG bits = static_cast<CK_ULONG>(modulus_bits);
    CK_BYTE exponent[] = {0x01, 0x00, 0x01};
    CK_OBJECT_CLASS pub_cls = CKO_PUBLIC_KEY;
    CK_OBJECT_CLASS priv_cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE type = CKK_RSA;
    auto* lbl = const_cast<char*>(label.data());
    auto lbl_len = static_cast<CK_ULONG>(label.size());
    CK_ATTRIBUTE pub[] = {
        {CKA_CLASS, &pub_cls, sizeof pub_cls}, {CKA_KEY_TYPE, &type, sizeof type},
        {CKA_TOKEN, &yes, sizeof yes},         {CKA_PRIVATE, &no, sizeof no},
        {CKA_ENCRYPT, &yes, sizeof yes},       {CKA_WRAP, &yes, sizeof yes},
        {CKA_VERIFY, &no, sizeof no},          {CKA_MODIFIABLE, &no, sizeof no},
        {CKA_MODULUS_BITS, &bits, sizeof bits}, {CKA_PUBLIC_EXPONENT, exponent, sizeof exponent},
        {CKA_LABEL, lbl, lbl_len},             {CKA_ID, lbl, lbl_len},
    };
    CK_ATTRIBUTE priv[] = {
        {CKA_CLASS, &priv_cls, sizeof priv_cls}, {CKA_KEY_TYPE, &type, sizeof type},
        {CKA_TOKEN, &yes, sizeof yes},           {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},       {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_DECRYPT, &yes, sizeof yes},         {CKA_UNWRAP, &yes, sizeof yes},
        {CKA_SIGN, &no, sizeof no},              {CKA_MODIFIABLE, &no, sizeof no},
        {CKA_LABEL, lbl, lbl_len},               {CKA_ID, lbl, lbl_len},
    };
    CK_MECHANISM mech{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
    CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE hpriv = CK_INVALID_HANDLE;
    CK_RV rv = impl_->f->C_GenerateKeyPair(s, &mech, pub, sizeof pub / sizeof pub[0], priv,
                                           sizeof priv / sizeof priv[0], &hpub, &hpriv);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_GenerateKeyPair (RSA) '" + label + "'");
    std::vector<std::uint8_t> n(bits / 8 + 8);
    std::vector<std::uint8_t> e(16);
    CK_ATTRIBUTE get[] = {{CKA_MODULUS, n.data(), static_cast<CK_ULONG>(n.size())},
                          {CKA_PUBLIC_EXPONENT, e.data(), static_cast<CK_ULONG>(e.size())}};
    rv = impl_->f->C_GetAttributeValue(s, hpub, get, 2);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_GetAttributeValue (RSA public key) '" + label + "'");
    n.resize(get[0].ulValueLen);
    e.resize(get[1].ulValueLen);
    // DER SubjectPublicKeyInfo through OpenSSL.
    BIGNUM* bn_n = BN_bin2bn(n.data(), static_cast<int>(n.size()), nullptr);
    BIGNUM* bn_e = BN_bin2bn(e.data(), static_cast<int>(e.size()), nullptr);
    OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM* params = nullptr;
    EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr);
    EVP_PKEY* pkey = nullptr;
    std::vector<std::uint8_t> der;
    if (bn_n && bn_e && bld && pctx && OSSL_PARAM_BLD_push_BN(bld, "n", bn_n) == 1 &&
        OSSL_PARAM_BLD_push_BN(bld, "e", bn_e) == 1 && (params = OSSL_PARAM_BLD_to_param(bld)) != nullptr &&
        EVP_PKEY_fromdata_init(pctx) == 1 && EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1) {
      int len = i2d_PUBKEY(pkey, nullptr);
      if (len > 0) {
        der.resize(static_cast<std::size_t>(len));
        unsigned char* p = der.data();
        if (i2d_PUBKEY(pkey, &p) != len) der.clear();
      }
    }
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn_n);
    BN_free(bn_e);
    if (der.empty()) return fail(HsmError::Kind::DeviceError, CKR_OK, "cannot encode the RSA public key as DER");
    log()->debug("generated RSA-{} wrapping key pair '{}'", modulus_bits, label);
    return der;
  }, /*changes_objects=*/true);
}

HsmResult<void> Pkcs11Hsm::unwrap_aes_key_rsa_oaep_sha256(const std::string& wrapping_label,
                                                         std::span<const std::uint8_t> wrapped,
                                                         const std::string& new_label, std::size_t key_bytes) {
  if (key_bytes != 16 && key_bytes != 24 && key_bytes != 32) {
    return fail(HsmError::Kind::InvalidArgument, CKR_OK, "AES key size must be 16, 24 or 32 bytes");
  }
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    auto priv = find_one(impl_->f, s, wrapping_label, CKO_PRIVATE_KEY);
    if (!priv) return Unexpected<HsmError>(priv.error());
    auto existing = find_objects(impl_->f, s, new_label, ~0UL);
    if (!existing) return Unexpected<HsmError>(existing.error());
    if (!existing->empty()) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK, "an object labelled '" + new_label + "' already exists");
    }
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG len = static_cast<CK_ULONG>(key_bytes);
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    auto* lbl = const_cast<char*>(new_label.data());
    auto lbl_len = static_cast<CK_ULONG>(new_label.size());
    // Every attribute explicit, as for generated keys. CKA_VALUE_LEN is
    // left out of the unwrap template (the length comes from the data) and
    // checked afterwards.
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &type, sizeof type}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},  {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_ENCRYPT, &yes, sizeof yes},   {CKA_DECRYPT, &yes, sizeof yes},    {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},      {CKA_MODIFIABLE, &no, sizeof no},   {CKA_LABEL, lbl, lbl_len},
        {CKA_ID, lbl, lbl_len},            {CKA_VALUE_LEN, &len, sizeof len},
    };
    constexpr CK_ULONG kUnwrapAttrs = sizeof tmpl / sizeof tmpl[0] - 1;
    CK_RSA_PKCS_OAEP_PARAMS oaep{CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, nullptr, 0};
    CK_MECHANISM mech{CKM_RSA_PKCS_OAEP, &oaep, sizeof oaep};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = impl_->f->C_UnwrapKey(s, &mech, *priv, const_cast<CK_BYTE_PTR>(wrapped.data()),
                                     static_cast<CK_ULONG>(wrapped.size()), tmpl, kUnwrapAttrs, &h);
    if (rv == CKR_OK) {
      CK_ULONG got = 0;
      CK_ATTRIBUTE q{CKA_VALUE_LEN, &got, sizeof got};
      CK_RV qrv = impl_->f->C_GetAttributeValue(s, h, &q, 1);
      if (qrv != CKR_OK || got != len) {
        (void)impl_->f->C_DestroyObject(s, h);
        return fail(HsmError::Kind::InvalidArgument, qrv, "the imported key material is not " +
                                                              std::to_string(key_bytes) + " bytes");
      }
      log()->debug("unwrapped imported key '{}' inside the HSM", new_label);
      return {};
    }
    if (rv != CKR_MECHANISM_PARAM_INVALID && rv != CKR_ARGUMENTS_BAD && rv != CKR_MECHANISM_INVALID) {
      if (rv == CKR_WRAPPED_KEY_INVALID || rv == CKR_WRAPPED_KEY_LEN_RANGE || rv == CKR_ENCRYPTED_DATA_INVALID ||
          rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED) {
        return fail(HsmError::Kind::AuthenticationFailed, rv, "the wrapped key material did not decrypt");
      }
      return fail(kind_for(rv), rv, "C_UnwrapKey (RSA-OAEP-SHA-256) with '" + wrapping_label + "'");
    }
    // SoftHSM 2.6.1 implements OAEP with SHA-1 only. Fall back to the raw
    // RSA operation inside the HSM (the private key never leaves it), OAEP
    // decoding here in secure memory, and C_CreateObject with every
    // attribute explicit; the material is cleansed at once.
    log()->debug("C_UnwrapKey with OAEP-SHA-256 unsupported ({}); decoding OAEP outside the token", rv_name(rv));
    CK_MECHANISM raw{CKM_RSA_X_509, nullptr, 0};
    rv = impl_->f->C_DecryptInit(s, &raw, *priv);
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_DecryptInit (RSA X.509) with '" + wrapping_label + "'");
    crypto::SecureBuffer em(wrapped.size() + 16);
    CK_ULONG em_len = static_cast<CK_ULONG>(em.size());
    rv = impl_->f->C_Decrypt(s, const_cast<CK_BYTE_PTR>(wrapped.data()), static_cast<CK_ULONG>(wrapped.size()),
                             em.data(), &em_len);
    if (rv != CKR_OK) {
      return fail(HsmError::Kind::AuthenticationFailed, rv, "the wrapped key material did not decrypt");
    }
    em.shrink(em_len);
    // X.509 raw decryption returns the modulus-sized block, left-padded.
    auto material = oaep_sha256_decode(em.span());
    if (!material) return fail(HsmError::Kind::AuthenticationFailed, CKR_OK, "the wrapped key material is not valid RSAES-OAEP-SHA-256");
    if (material->size() != key_bytes) {
      return fail(HsmError::Kind::InvalidArgument, CKR_OK,
                  "the imported key material is " + std::to_string(material->size()) + " bytes, expected " +
                      std::to_string(key_bytes));
    }
    CK_ATTRIBUTE create[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &type, sizeof type}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},  {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_ENCRYPT, &yes, sizeof yes},   {CKA_DECRYPT, &yes, sizeof yes},    {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},      {CKA_MODIFIABLE, &no, sizeof no},   {CKA_LABEL, lbl, lbl_len},
        {CKA_ID, lbl, lbl_len},            {CKA_VALUE, material->data(), static_cast<CK_ULONG>(material->size())},
    };
    rv = impl_->f->C_CreateObject(s, create, sizeof create / sizeof create[0], &h);
    material->clear();
    if (rv != CKR_OK) return fail(kind_for(rv), rv, "C_CreateObject (imported AES key) '" + new_label + "'");
    log()->debug("imported key '{}' (OAEP decoded outside the token)", new_label);
    return {};
  }, /*changes_objects=*/true);
}

HsmResult<void> Pkcs11Hsm::destroy_objects(const std::string& label) {
  return impl_->with_session([&](CK_SESSION_HANDLE s) -> HsmResult<void> {
    auto all = find_objects(impl_->f, s, label, ~0UL);
    if (!all) return Unexpected<HsmError>(all.error());
    impl_->forget(label);
    for (auto h : *all) {
      CK_RV rv = impl_->f->C_DestroyObject(s, h);
      if (rv != CKR_OK && !handle_is_stale(rv)) return fail(kind_for(rv), rv, "C_DestroyObject '" + label + "'");
    }
    if (!all->empty()) log()->debug("destroyed {} object(s) labelled '{}'", all->size(), label);
    return {};
  }, /*changes_objects=*/true);
}

}  // namespace kmsfs::keyclient
