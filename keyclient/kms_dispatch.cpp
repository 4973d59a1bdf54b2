#include "keyclient/kms_dispatch.h"

#include <functional>
#include <map>
#include <stdexcept>
#include <type_traits>

#include "keyclient/kms_json.h"

namespace kmsfs::keyclient {

namespace {

using json = nlohmann::json;
using Handler = std::function<KmsResult<json>(KmsCore&, const CallerIdentity&, const json&)>;

// Parses Req from the body, calls the core, renders Resp (an empty object
// for operations that return nothing). A body that does not parse is the
// caller's error, named as AWS would name it.
template <class Req, class Resp>
Handler typed(KmsResult<Resp> (KmsCore::*op)(const CallerIdentity&, const Req&)) {
  return [op](KmsCore& core, const CallerIdentity& caller, const json& body) -> KmsResult<json> {
    Req req;
    try {
      req = body.get<Req>();
    } catch (const std::exception& e) {
      return kms_error(KmsErrorCode::ValidationException, std::string("malformed request: ") + e.what());
    }
    auto res = (core.*op)(caller, req);
    if (!res) return unexpected(std::move(res).error());
    if constexpr (std::is_void_v<Resp>) {
      return json::object();
    } else {
      return json(*res);
    }
  };
}

// Operations whose core method already takes and returns the AWS JSON body.
Handler raw(KmsResult<json> (KmsCore::*op)(const CallerIdentity&, const json&)) {
  return [op](KmsCore& core, const CallerIdentity& caller, const json& body) -> KmsResult<json> {
    return (core.*op)(caller, body);
  };
}

const std::map<std::string, Handler, std::less<>>& table() {
  static const std::map<std::string, Handler, std::less<>> t = {
      {"CreateKey", typed(&KmsCore::create_key)},
      {"DescribeKey", typed(&KmsCore::describe_key)},
      {"ListKeys", typed(&KmsCore::list_keys)},
      {"CreateAlias", typed(&KmsCore::create_alias)},
      {"ListAliases", typed(&KmsCore::list_aliases)},
      {"GenerateDataKey", typed(&KmsCore::generate_data_key)},
      {"Decrypt", typed(&KmsCore::decrypt)},
      {"Encrypt", typed(&KmsCore::encrypt)},
      {"GenerateRandom", typed(&KmsCore::generate_random)},
      {"GenerateDataKeyWithoutPlaintext", raw(&KmsCore::generate_data_key_without_plaintext)},
      {"ReEncrypt", raw(&KmsCore::re_encrypt)},
      {"UpdateKeyDescription", raw(&KmsCore::update_key_description)},
      {"UpdateAlias", raw(&KmsCore::update_alias)},
      {"DeleteAlias", raw(&KmsCore::delete_alias)},
      {"EnableKey", raw(&KmsCore::enable_key)},
      {"DisableKey", raw(&KmsCore::disable_key)},
      {"ScheduleKeyDeletion", raw(&KmsCore::schedule_key_deletion)},
      {"CancelKeyDeletion", raw(&KmsCore::cancel_key_deletion)},
      {"EnableKeyRotation", raw(&KmsCore::enable_key_rotation)},
      {"DisableKeyRotation", raw(&KmsCore::disable_key_rotation)},
      {"GetKeyRotationStatus", raw(&KmsCore::get_key_rotation_status)},
      {"RotateKeyOnDemand", raw(&KmsCore::rotate_key_on_demand)},
      {"ListKeyRotations", raw(&KmsCore::list_key_rotations)},
      {"GetKeyPolicy", raw(&KmsCore::get_key_policy)},
      {"PutKeyPolicy", raw(&KmsCore::put_key_policy)},
      {"ListKeyPolicies", raw(&KmsCore::list_key_policies)},
      {"GetParametersForImport", raw(&KmsCore::get_parameters_for_import)},
      {"ImportKeyMaterial", raw(&KmsCore::import_key_material)},
      {"DeleteImportedKeyMaterial", raw(&KmsCore::delete_imported_key_material)},
      {"TagResource", raw(&KmsCore::tag_resource)},
      {"UntagResource", raw(&KmsCore::untag_resource)},
      {"ListResourceTags", raw(&KmsCore::list_resource_tags)},
      {"CreateGrant", raw(&KmsCore::create_grant)},
      {"ListGrants", raw(&KmsCore::list_grants)},
      {"RetireGrant", raw(&KmsCore::retire_grant)},
      {"RevokeGrant", raw(&KmsCore::revoke_grant)},
      // Not AWS operations: kmsfs's audit trail, served the same way.
      {"VerifyAuditLog", raw(&KmsCore::verify_audit_log)},
      {"SearchAuditLog", raw(&KmsCore::search_audit_log)},
  };
  return t;
}

}  // namespace

KmsResult<json> dispatch_kms_request(KmsCore& core, const CallerIdentity& caller,
                                     std::string_view operation, const json& request) {
  const auto& t = table();
  auto it = t.find(operation);
  if (it == t.end()) {
    return kms_error(KmsErrorCode::UnsupportedOperationException,
                     "operation " + std::string(operation) + " is not supported");
  }
  if (!request.is_object()) {
    return kms_error(KmsErrorCode::ValidationException, "the request body must be a JSON object");
  }
  return it->second(core, caller, request);
}

std::vector<std::string_view> kms_operations() {
  std::vector<std::string_view> out;
  for (const auto& [name, handler] : table()) out.push_back(name);
  return out;
}

}  // namespace kmsfs::keyclient
