#include "keyclient/kms_dispatch.h"

#include <functional>
#include <map>
#include <stdexcept>

#include "keyclient/kms_json.h"

namespace kmsfs::keyclient {

namespace {

using json = nlohmann::json;
using Handler = std::function<KmsResult<json>(KmsCore&, const CallerIdentity&, const json&)>;

// Parses Req from the body, calls the core, renders Resp. A body that does
// not parse is the caller's error, named as AWS would name it.
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
    return json(*res);
  };
}

template <class Req>
Handler typed_void(KmsResult<void> (KmsCore::*op)(const CallerIdentity&, const Req&)) {
  return [op](KmsCore& core, const CallerIdentity& caller, const json& body) -> KmsResult<json> {
    Req req;
    try {
      req = body.get<Req>();
    } catch (const std::exception& e) {
      return kms_error(KmsErrorCode::ValidationException, std::string("malformed request: ") + e.what());
    }
    auto res = (core.*op)(caller, req);
    if (!res) return unexpected(std::move(res).error());
    return json::object();
  };
}

const std::map<std::string, Handler, std::less<>>& table() {
  static const std::map<std::string, Handler, std::less<>> t = {
      {"CreateKey", typed(&KmsCore::create_key)},
      {"DescribeKey", typed(&KmsCore::describe_key)},
      {"ListKeys", typed(&KmsCore::list_keys)},
      {"CreateAlias", typed_void(&KmsCore::create_alias)},
      {"ListAliases", typed(&KmsCore::list_aliases)},
      {"GenerateDataKey", typed(&KmsCore::generate_data_key)},
      {"Decrypt", typed(&KmsCore::decrypt)},
      {"Encrypt", typed(&KmsCore::encrypt)},
      {"GenerateRandom", typed(&KmsCore::generate_random)},
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
