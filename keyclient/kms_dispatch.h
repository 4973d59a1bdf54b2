#pragma once
// The KMS API by operation name: AWS JSON request in, AWS JSON response out.
// One table serves the embedded KeyService::call (kmsctl) and kmsd's wire
// protocol, so both speak exactly the same API. Malformed requests (missing
// or mistyped fields, bad base64) are ValidationException / 
// SerializationException-style errors naming the field, never exceptions.

#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/kms_core.h"

namespace kmsfs::keyclient {

KmsResult<nlohmann::json> dispatch_kms_request(KmsCore& core, const CallerIdentity& caller,
                                               std::string_view operation,
                                               const nlohmann::json& request);

// Operation names the table knows ("CreateKey", ...), for help and tests.
std::vector<std::string_view> kms_operations();

}  // namespace kmsfs::keyclient
