// libFuzzer target: key-policy documents (keyclient/key_policy.h), as
// PutKeyPolicy / CreateKey take them from any caller allowed to set a
// policy. validate must answer with a reason or accept; evaluate must not
// allow what does not validate, and must never crash.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "keyclient/key_policy.h"

namespace kc = kmsfs::keyclient;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string doc(reinterpret_cast<const char*>(data), size);
  auto valid = kc::validate_key_policy(doc);
  if (!valid && valid.error().empty()) std::abort();  // a refusal names the element
  static const kc::Principal root = [] {
    kc::Principal p;
    p.uid = 0;
    p.gid = 0;
    p.groups = {0};
    p.user_name = "root";
    p.group_names = {"root"};
    return p;
  }();
  static const kc::Principal other = [] {
    kc::Principal p;
    p.uid = 1000;
    p.gid = 1000;
    p.groups = {1000, 100};
    p.user_name = "alice";
    p.group_names = {"alice", "users"};
    return p;
  }();
  const kc::EncryptionContext ctx{{"kmsfs:fs", "00112233445566778899aabbccddeeff"},
                                  {"kmsfs:file", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"}};
  for (const auto* p : {&root, &other}) {
    for (const char* action : {"kms:Decrypt", "kms:GenerateDataKey", "kms:PutKeyPolicy"}) {
      kc::PolicyRequest req;
      req.action = action;
      req.resource = "arn:aws:kms:local:000000000000:key/1234abcd-12ab-34cd-56ef-1234567890ab";
      req.principal = p;
      req.encryption_context = &ctx;
      auto d = kc::evaluate_key_policy(doc, req);
      if (!valid && d == kc::PolicyDecision::Allow) std::abort();  // an invalid document allowed
    }
  }
  return 0;
}
