// libFuzzer target: the JSON request/response bodies of the KMS API
// (keyclient/kms_json.h), as kmsd reads them from clients and the client
// reads them from kmsd, and KeyMetadata as stored in key records. from_json
// may refuse with an exception derived from std::exception: besides
// nlohmann::json::exception it throws std::invalid_argument for bad base64
// (keyclient/kms_json.cpp bytes_from_b64), and both callers (kms_dispatch,
// kmsd_client) catch std::exception. Anything else escaping, a crash or a
// sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include <nlohmann/json.hpp>

#include "keyclient/kms_json.h"

namespace kc = kmsfs::keyclient;

namespace {

template <class T>
void try_as(const nlohmann::json& j) {
  try {
    T v = j.get<T>();
    nlohmann::json back = v;  // and back: must not throw
    (void)back.dump();
  } catch (const std::exception&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
  try_as<kc::KeyMetadata>(j);
  try_as<kc::CreateKeyRequest>(j);
  try_as<kc::DescribeKeyRequest>(j);
  try_as<kc::ListKeysRequest>(j);
  try_as<kc::CreateAliasRequest>(j);
  try_as<kc::ListAliasesRequest>(j);
  try_as<kc::GenerateDataKeyRequest>(j);
  try_as<kc::DecryptRequest>(j);
  try_as<kc::EncryptRequest>(j);
  try_as<kc::GenerateRandomRequest>(j);
  try_as<kc::GenerateDataKeyResponse>(j);
  try_as<kc::DecryptResponse>(j);
  try_as<kc::DescribeKeyResponse>(j);
  try_as<kc::ListKeysResponse>(j);
  return 0;
}
