// libkmsfs_pkcs11_fault.so: a test-only PKCS#11 module. It forwards every
// call to a real module (KMSFS_FAULT_MODULE, default SoftHSM2) and, on
// command, injects faults into the calls a running KMS core makes:
//
//   KMSFS_FAULT_FILE=PATH   a file read before each call (missing or empty =
//                           no fault). One command on its first line:
//     error RV [COUNT [FUNCS]]
//                           return RV (e.g. CKR_DEVICE_ERROR,
//                           CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, or
//                           a number) instead of forwarding; with COUNT >= 0
//                           only for the next COUNT calls (-1 = every call);
//                           FUNCS: only these calls, comma-separated
//                           (e.g. C_Encrypt,C_Decrypt)
//     delay MS              sleep MS milliseconds, then forward
//     hang [FUNCS]          block until the file no longer says "hang", then
//                           forward; FUNCS: only these calls
//   KMSFS_FAULT_SPEC="..."  the same command, fixed for the process lifetime
//
// Faults apply to the operational calls (sessions, login, objects, crypto,
// random); C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList and the
// slot/token queries always pass, so that a process can start and the fault
// hits it while it serves. A COUNT is per process and is consumed by a
// counter file beside the fault file (PATH.used), so that "the next call
// fails once" means once across threads.
//
// Written for the tests of issue #7; never install it.

#include <dlfcn.h>
#include <fcntl.h>
#include <p11-kit/pkcs11.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

namespace {

struct Command {
  enum Kind { None, Error, Delay, Hang } kind = None;
  CK_RV rv = CKR_OK;
  long count = -1;  // -1 = unlimited
  long delay_ms = 0;
  std::string funcs;  // empty = every wrapped call
  bool applies_to(const char* func) const {
    return funcs.empty() || ("," + funcs + ",").find("," + std::string(func) + ",") != std::string::npos;
  }
};

CK_RV rv_from_name(const std::string& s) {
  static const std::pair<const char*, CK_RV> kNames[] = {
      {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
      {"CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED},
      {"CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY},
      {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
      {"CKR_SESSION_CLOSED", CKR_SESSION_CLOSED},
      {"CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT},
      {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
      {"CKR_GENERAL_ERROR", CKR_GENERAL_ERROR},
      {"CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED},
      {"CKR_HOST_MEMORY", CKR_HOST_MEMORY},
  };
  for (auto& [n, v] : kNames) {
    if (s == n) return v;
  }
  return static_cast<CK_RV>(std::strtoul(s.c_str(), nullptr, 0));
}

Command parse(const std::string& line) {
  std::istringstream in(line);
  std::string word;
  Command c;
  if (!(in >> word)) return c;
  if (word == "error") {
    std::string rv;
    in >> rv;
    c.kind = Command::Error;
    c.rv = rv_from_name(rv);
    if (!(in >> c.count)) c.count = -1;
    in >> c.funcs;
  } else if (word == "delay") {
    c.kind = Command::Delay;
    in >> c.delay_ms;
  } else if (word == "hang") {
    c.kind = Command::Hang;
    in >> c.funcs;
  }
  return c;
}

std::string first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Consumes one unit of a COUNT across threads and processes; true if this
// call gets the fault.
bool take_one(const std::string& path, long count) {
  const std::string used = path + ".used";
  int fd = ::open(used.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return true;
  ::flock(fd, LOCK_EX);
  char buf[32] = {};
  ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  long done = n > 0 ? std::strtol(buf, nullptr, 10) : 0;
  bool hit = done < count;
  if (hit) {
    std::string s = std::to_string(done + 1);
    (void)::ftruncate(fd, 0);
    (void)!::pwrite(fd, s.data(), s.size(), 0);
  }
  ::flock(fd, LOCK_UN);
  ::close(fd);
  return hit;
}

// CKR_OK = forward the call; anything else = return it.
CK_RV fault(const char* func) {
  const char* file = std::getenv("KMSFS_FAULT_FILE");
  const char* spec = std::getenv("KMSFS_FAULT_SPEC");
  Command c;
  if (spec != nullptr && *spec != '\0') {
    c = parse(spec);
  } else if (file != nullptr) {
    c = parse(first_line(file));
  }
  switch (c.kind) {
    case Command::None:
      return CKR_OK;
    case Command::Delay:
      std::this_thread::sleep_for(std::chrono::milliseconds(c.delay_ms));
      return CKR_OK;
    case Command::Hang:
      if (!c.applies_to(func)) return CKR_OK;
      while (file != nullptr && first_line(file).rfind("hang", 0) == 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      return CKR_OK;
    case Command::Error:
      if (!c.applies_to(func)) return CKR_OK;
      if (c.count >= 0 && (file == nullptr || !take_one(file, c.count))) return CKR_OK;
      return c.rv;
  }
  return CKR_OK;
}

CK_FUNCTION_LIST* g_real = nullptr;
CK_FUNCTION_LIST g_list;
std::once_flag g_once;
CK_RV g_load_rv = CKR_OK;

void load() {
  const char* path = std::getenv("KMSFS_FAULT_MODULE");
  if (path == nullptr || *path == '\0') path = "/usr/lib/softhsm/libsofthsm2.so";
  void* lib = ::dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    g_load_rv = CKR_GENERAL_ERROR;
    return;
  }
  auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  if (get == nullptr || get(&g_real) != CKR_OK || g_real == nullptr) {
    g_load_rv = CKR_GENERAL_ERROR;
    return;
  }
  g_list = *g_real;  // everything forwards unless wrapped below
  // Wrapped: the calls a serving core makes. Each checks the fault first.
#define KMSFS_WRAP(name, params, args)                    \
  g_list.name = [] params -> CK_RV {                      \
    if (CK_RV rv = fault(#name); rv != CKR_OK) return rv;      \
    return g_real->name args;                             \
  };
  KMSFS_WRAP(C_OpenSession,
             (CK_SLOT_ID slot, CK_FLAGS flags, void* app, CK_NOTIFY notify, CK_SESSION_HANDLE_PTR s),
             (slot, flags, app, notify, s))
  KMSFS_WRAP(C_Login, (CK_SESSION_HANDLE s, CK_USER_TYPE t, CK_UTF8CHAR_PTR pin, CK_ULONG len),
             (s, t, pin, len))
  KMSFS_WRAP(C_EncryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (s, m, k))
  KMSFS_WRAP(C_Encrypt,
             (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl),
             (s, in, inl, out, outl))
  KMSFS_WRAP(C_DecryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (s, m, k))
  KMSFS_WRAP(C_Decrypt,
             (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl),
             (s, in, inl, out, outl))
  KMSFS_WRAP(C_GenerateKey,
             (CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k),
             (s, m, t, n, k))
  KMSFS_WRAP(C_GenerateRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG n), (s, out, n))
  KMSFS_WRAP(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR t, CK_ULONG n), (s, t, n))
  KMSFS_WRAP(C_FindObjects, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR o, CK_ULONG max, CK_ULONG_PTR n),
             (s, o, max, n))
  KMSFS_WRAP(C_GetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n),
             (s, o, t, n))
  KMSFS_WRAP(C_SignInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (s, m, k))
  KMSFS_WRAP(C_Sign,
             (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG inl, CK_BYTE_PTR out, CK_ULONG_PTR outl),
             (s, in, inl, out, outl))
#undef KMSFS_WRAP
}

}  // namespace

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  std::call_once(g_once, load);
  if (g_load_rv != CKR_OK) return g_load_rv;
  *list = &g_list;
  return CKR_OK;
}
