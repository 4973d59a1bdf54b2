#pragma once
// JSON forms of the KeyService types with the AWS KMS field names
// (KeyMetadata{AWSAccountId, KeyId, Arn, ...}, CiphertextBlob and Plaintext
// in base64). Used by kmsctl's output, the key records on disk and, with #4,
// the kmsd wire protocol.
//
// from_json throws nlohmann::json::exception for a missing or mistyped
// field and std::invalid_argument for bad base64; a boundary (kmsd request
// parser, record loader) catches them and answers with an error value.
//
// Plaintext fields are secrets: their JSON form (a std::string of base64)
// leaves secure memory. Only kmsctl's output and the kmsd response to the
// caller ever build one.

#include <nlohmann/json.hpp>

#include "keyclient/key_service.h"

namespace kmsfs::keyclient {

void to_json(nlohmann::json& j, const Tag& v);
void from_json(const nlohmann::json& j, Tag& v);
void to_json(nlohmann::json& j, const KeyMetadata& v);
void from_json(const nlohmann::json& j, KeyMetadata& v);
void to_json(nlohmann::json& j, const KeyListEntry& v);
void from_json(const nlohmann::json& j, KeyListEntry& v);
void to_json(nlohmann::json& j, const AliasListEntry& v);
void from_json(const nlohmann::json& j, AliasListEntry& v);

void to_json(nlohmann::json& j, const CreateKeyRequest& v);
void from_json(const nlohmann::json& j, CreateKeyRequest& v);
void to_json(nlohmann::json& j, const CreateKeyResponse& v);
void from_json(const nlohmann::json& j, CreateKeyResponse& v);
void to_json(nlohmann::json& j, const DescribeKeyRequest& v);
void from_json(const nlohmann::json& j, DescribeKeyRequest& v);
void to_json(nlohmann::json& j, const DescribeKeyResponse& v);
void from_json(const nlohmann::json& j, DescribeKeyResponse& v);
void to_json(nlohmann::json& j, const ListKeysRequest& v);
void from_json(const nlohmann::json& j, ListKeysRequest& v);
void to_json(nlohmann::json& j, const ListKeysResponse& v);
void from_json(const nlohmann::json& j, ListKeysResponse& v);
void to_json(nlohmann::json& j, const CreateAliasRequest& v);
void from_json(const nlohmann::json& j, CreateAliasRequest& v);
void to_json(nlohmann::json& j, const ListAliasesRequest& v);
void from_json(const nlohmann::json& j, ListAliasesRequest& v);
void to_json(nlohmann::json& j, const ListAliasesResponse& v);
void from_json(const nlohmann::json& j, ListAliasesResponse& v);
void to_json(nlohmann::json& j, const GenerateDataKeyRequest& v);
void from_json(const nlohmann::json& j, GenerateDataKeyRequest& v);
void to_json(nlohmann::json& j, const GenerateDataKeyResponse& v);
void from_json(const nlohmann::json& j, GenerateDataKeyResponse& v);
void to_json(nlohmann::json& j, const DecryptRequest& v);
void from_json(const nlohmann::json& j, DecryptRequest& v);
void to_json(nlohmann::json& j, const DecryptResponse& v);
void from_json(const nlohmann::json& j, DecryptResponse& v);
void to_json(nlohmann::json& j, const EncryptRequest& v);
void from_json(const nlohmann::json& j, EncryptRequest& v);
void to_json(nlohmann::json& j, const EncryptResponse& v);
void from_json(const nlohmann::json& j, EncryptResponse& v);
void to_json(nlohmann::json& j, const GenerateRandomRequest& v);
void from_json(const nlohmann::json& j, GenerateRandomRequest& v);
void to_json(nlohmann::json& j, const GenerateRandomResponse& v);
void from_json(const nlohmann::json& j, GenerateRandomResponse& v);

// An AWS error body: {"__type": "NotFoundException", "message": "..."}.
void to_json(nlohmann::json& j, const KmsError& v);
void from_json(const nlohmann::json& j, KmsError& v);

}  // namespace kmsfs::keyclient
