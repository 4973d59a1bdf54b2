// libFuzzer target: what a kmsd client can send past the HTTP layer, through
// the real dispatch table into a real KMS core (keyclient/kms_dispatch.h,
// kms_core.cpp, kms_core_admin.cpp) on a temp state dir with its own
// SoftHSM2 token. Input: "Operation[ uid]\n" then the JSON body. Every
// request must come back as a response or a KmsError with a message (never
// an exception, a crash or a sanitizer report), and the core must keep
// answering: after each input it still lists its aliases.
//
// The state grows with what the inputs create; calls that create HSM
// objects (CreateKey, GetParametersForImport, RotateKeyOnDemand) are
// capped per process so that a long run stays fast, and the audit readers
// (VerifyAuditLog, SearchAuditLog: linear in the trail, which every input
// lengthens) run only in the first 5,000 inputs (a 30 min run once spent
// over 10 s in one VerifyAuditLog of a 300,000-record trail).
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "keyclient/kms_core.h"
#include "keyclient/kms_dispatch.h"
#include "keyclient/kms_options.h"

namespace kc = kmsfs::keyclient;

namespace {

struct Fixture {
  std::string dir;
  std::unique_ptr<kc::KmsCore> core;
  std::map<std::string, int> creations;  // per capped operation
  long inputs = 0;

  Fixture() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/kmsfs-fuzz-kms.XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    dir = pattern;
    kc::KmsOptions o;
    o.home = dir + "/home";
    o.audit_sync_interval_ms = 1000;  // the trail is not what is fuzzed here
    o.audit_sync_plaintext = 0;
    ::unsetenv("SOFTHSM2_CONF");  // the core writes its own, in its home
    auto c = kc::make_kms_core(o);
    if (!c) std::abort();
    core = std::move(*c);
    const kc::CallerIdentity root{0, 0, 1};
    auto k = kc::dispatch_kms_request(*core, root, "CreateKey", {{"Description", "fuzz seed key"}});
    if (!k) std::abort();
    auto a = kc::dispatch_kms_request(*core, root, "CreateAlias",
                                      {{"AliasName", "alias/fuzz"}, {"TargetKeyId", (*k)["KeyMetadata"]["KeyId"]}});
    if (!a) std::abort();
  }
  ~Fixture() {
    core.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto nl = text.find('\n');
  if (nl == std::string::npos || nl > 64) return 0;
  std::string op = text.substr(0, nl);
  kc::CallerIdentity caller{0, 0, 1};
  if (const auto sp = op.find(' '); sp != std::string::npos) {
    const std::string uid = op.substr(sp + 1);
    op.resize(sp);
    if (uid.empty() || uid.size() > 6 || uid.find_first_not_of("0123456789") != std::string::npos) return 0;
    caller.uid = static_cast<uid_t>(std::stoul(uid));
    caller.gid = caller.uid;
  }
  auto body = nlohmann::json::parse(text.begin() + static_cast<long>(nl) + 1, text.end(), nullptr, false);
  if (body.is_discarded()) return 0;

  Fixture& f = fixture();
  for (const char* capped : {"CreateKey", "GetParametersForImport", "RotateKeyOnDemand"}) {
    if (op == capped && ++f.creations[op] > 200) return 0;
  }
  if (++f.inputs > 5000 && (op == "VerifyAuditLog" || op == "SearchAuditLog")) return 0;
  auto r = kc::dispatch_kms_request(*f.core, caller, op, body);
  if (r) {
    (void)r->dump();  // the response serialises
  } else if (r.error().message.empty()) {
    std::abort();  // every refusal says why
  }
  // The core still answers.
  auto d = kc::dispatch_kms_request(*f.core, kc::CallerIdentity{0, 0, 1}, "ListAliases", nlohmann::json::object());
  if (!d) std::abort();
  return 0;
}
