#pragma once
// Key policies in the AWS key-policy grammar, with local principals:
//
//   {"Version": "2012-10-17", "Id": "...", "Statement": [{
//      "Sid": "...", "Effect": "Allow" | "Deny",
//      "Principal": "*" | {"Local": "uid:1000" | ["uid:N","user:NAME","gid:N","group:NAME","*"]},
//      "Action" | "NotAction": "kms:Encrypt" | ["kms:Generate*", ...],
//      "Resource": "*" | key ARN (wildcards allowed),
//      "Condition": {"StringEquals" | "StringNotEquals" | "StringLike" | "StringNotLike"
//                    (optionally prefixed "ForAnyValue:" / "ForAllValues:"):
//                    {"kms:EncryptionContext:KEY" | "kms:EncryptionContextKeys" |
//                     "kms:CallerUid" | "kms:CallerGid": "value" | ["v1", ...]}}}]}
//
// Evaluation as AWS evaluates: an explicit Deny wins; otherwise an Allow
// that matches allows; otherwise the request is implicitly denied. Actions
// compare case-insensitively, with * and ? wildcards.

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "crypto/result.h"
#include "keyclient/encryption_context.h"

namespace kmsfs::keyclient {

// Who is asking, resolved once per call.
struct Principal {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // primary and supplementary groups (from the group database)
  std::string user_name;      // empty when the uid has no passwd entry
  std::vector<std::string> group_names;

  // Looks the uid up in the passwd and group databases.
  static Principal resolve(uid_t uid, gid_t gid);
};

struct PolicyRequest {
  std::string action;    // "kms:Decrypt"
  std::string resource;  // key ARN
  const Principal* principal = nullptr;
  const EncryptionContext* encryption_context = nullptr;  // null: the operation takes none
};

enum class PolicyDecision { Allow, ExplicitDeny, ImplicitDeny };

// Checks a document against the grammar above; the error names the
// offending element ("Statement[1].Effect must be \"Allow\" or \"Deny\"").
Result<void, std::string> validate_key_policy(const std::string& document);

// Evaluates a document (a document that does not validate denies).
PolicyDecision evaluate_key_policy(const std::string& document, const PolicyRequest& request);

// One local principal string ("uid:0", "user:alice", "gid:100",
// "group:backup", "*"): well-formed? does it name `p`?
bool is_local_principal(const std::string& s);
bool local_principal_matches(const std::string& s, const Principal& p);

// AWS-style wildcard match: * any run, ? one character.
bool wildcard_match(std::string_view pattern, std::string_view text, bool ignore_case);

}  // namespace kmsfs::keyclient
