#include "keyclient/kms_json.h"

#include <openssl/crypto.h>

#include <stdexcept>

#include "crypto/encoding.h"
#include "crypto/json_int.h"

namespace kmsfs::keyclient {

using nlohmann::json;

namespace {

// A field's value as T; integers only when they fit (no float-to-int
// conversion of untrusted input: crypto/json_int.h).
template <class T>
T value_as(const json& v) {
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    return crypto::json_int<T>(v);
  } else {
    return v.get<T>();
  }
}
template <class T>
void get_opt(const json& j, const char* name, T& out) {
  auto it = j.find(name);
  if (it != j.end() && !it->is_null()) out = value_as<T>(*it);
}
template <class T>
void get_opt(const json& j, const char* name, std::optional<T>& out) {
  auto it = j.find(name);
  if (it != j.end() && !it->is_null()) out = value_as<T>(*it);
}
template <class T>
void put_opt(json& j, const char* name, const std::optional<T>& v) {
  if (v) j[name] = *v;
}

// Lists AWS omits when empty.
void put_list(json& j, const char* name, const std::vector<std::string>& v) {
  if (!v.empty()) j[name] = v;
}

std::string b64(std::span<const std::uint8_t> b) { return crypto::to_base64(b); }

Bytes bytes_from_b64(const json& j, const char* name) {
  auto s = j.at(name).get<std::string>();
  auto v = crypto::from_base64(s);
  if (!v) throw std::invalid_argument(std::string(name) + " is not valid base64");
  return std::move(*v);
}

crypto::SecureBuffer secret_from_b64(const json& j, const char* name) {
  auto s = j.at(name).get<std::string>();
  auto v = crypto::from_base64(s);
  OPENSSL_cleanse(s.data(), s.size());
  if (!v) throw std::invalid_argument(std::string(name) + " is not valid base64");
  auto out = crypto::SecureBuffer::from(*v);
  OPENSSL_cleanse(v->data(), v->size());
  return out;
}

}  // namespace

void to_json(json& j, const Tag& v) { j = json{{"TagKey", v.tag_key}, {"TagValue", v.tag_value}}; }
void from_json(const json& j, Tag& v) {
  j.at("TagKey").get_to(v.tag_key);
  j.at("TagValue").get_to(v.tag_value);
}

void to_json(json& j, const KeyMetadata& v) {
  j = json{{"AWSAccountId", v.aws_account_id},
           {"KeyId", v.key_id},
           {"Arn", v.arn},
           {"CreationDate", v.creation_date},
           {"Enabled", v.enabled},
           {"Description", v.description},
           {"KeyUsage", v.key_usage},
           {"KeyState", v.key_state},
           {"Origin", v.origin},
           {"KeyManager", v.key_manager},
           {"CustomerMasterKeySpec", v.customer_master_key_spec},
           {"KeySpec", v.key_spec},
           {"EncryptionAlgorithms", v.encryption_algorithms},
           {"MultiRegion", v.multi_region}};
  put_opt(j, "DeletionDate", v.deletion_date);
  put_opt(j, "PendingDeletionWindowInDays", v.pending_deletion_window_in_days);
  put_opt(j, "ValidTo", v.valid_to);
  put_opt(j, "ExpirationModel", v.expiration_model);
}
void from_json(const json& j, KeyMetadata& v) {
  j.at("KeyId").get_to(v.key_id);
  j.at("Arn").get_to(v.arn);
  get_opt(j, "AWSAccountId", v.aws_account_id);
  get_opt(j, "CreationDate", v.creation_date);
  get_opt(j, "Enabled", v.enabled);
  get_opt(j, "Description", v.description);
  get_opt(j, "KeyUsage", v.key_usage);
  get_opt(j, "KeyState", v.key_state);
  get_opt(j, "Origin", v.origin);
  get_opt(j, "KeyManager", v.key_manager);
  get_opt(j, "CustomerMasterKeySpec", v.customer_master_key_spec);
  get_opt(j, "KeySpec", v.key_spec);
  get_opt(j, "EncryptionAlgorithms", v.encryption_algorithms);
  get_opt(j, "MultiRegion", v.multi_region);
  get_opt(j, "DeletionDate", v.deletion_date);
  get_opt(j, "PendingDeletionWindowInDays", v.pending_deletion_window_in_days);
  get_opt(j, "ValidTo", v.valid_to);
  get_opt(j, "ExpirationModel", v.expiration_model);
}

void to_json(json& j, const KeyListEntry& v) { j = json{{"KeyId", v.key_id}, {"KeyArn", v.key_arn}}; }
void from_json(const json& j, KeyListEntry& v) {
  j.at("KeyId").get_to(v.key_id);
  j.at("KeyArn").get_to(v.key_arn);
}

void to_json(json& j, const AliasListEntry& v) {
  j = json{{"AliasName", v.alias_name}, {"AliasArn", v.alias_arn}};
  put_opt(j, "TargetKeyId", v.target_key_id);
  put_opt(j, "CreationDate", v.creation_date);
  put_opt(j, "LastUpdatedDate", v.last_updated_date);
}
void from_json(const json& j, AliasListEntry& v) {
  j.at("AliasName").get_to(v.alias_name);
  get_opt(j, "AliasArn", v.alias_arn);
  get_opt(j, "TargetKeyId", v.target_key_id);
  get_opt(j, "CreationDate", v.creation_date);
  get_opt(j, "LastUpdatedDate", v.last_updated_date);
}

void to_json(json& j, const CreateKeyRequest& v) {
  j = json{{"Description", v.description}, {"KeyUsage", v.key_usage}, {"KeySpec", v.key_spec},
           {"Origin", v.origin},           {"Tags", v.tags},          {"BypassPolicyLockoutSafetyCheck",
                                                                        v.bypass_policy_lockout_safety_check}};
  put_opt(j, "Policy", v.policy);
}
void from_json(const json& j, CreateKeyRequest& v) {
  get_opt(j, "Description", v.description);
  get_opt(j, "KeyUsage", v.key_usage);
  get_opt(j, "KeySpec", v.key_spec);
  get_opt(j, "Origin", v.origin);
  get_opt(j, "Policy", v.policy);
  get_opt(j, "Tags", v.tags);
  get_opt(j, "BypassPolicyLockoutSafetyCheck", v.bypass_policy_lockout_safety_check);
}
void to_json(json& j, const CreateKeyResponse& v) { j = json{{"KeyMetadata", v.key_metadata}}; }
void from_json(const json& j, CreateKeyResponse& v) { j.at("KeyMetadata").get_to(v.key_metadata); }

void to_json(json& j, const DescribeKeyRequest& v) { j = json{{"KeyId", v.key_id}}; }
void from_json(const json& j, DescribeKeyRequest& v) { j.at("KeyId").get_to(v.key_id); }
void to_json(json& j, const DescribeKeyResponse& v) { j = json{{"KeyMetadata", v.key_metadata}}; }
void from_json(const json& j, DescribeKeyResponse& v) { j.at("KeyMetadata").get_to(v.key_metadata); }

void to_json(json& j, const ListKeysRequest& v) {
  j = json::object();
  put_opt(j, "Limit", v.limit);
  put_opt(j, "Marker", v.marker);
}
void from_json(const json& j, ListKeysRequest& v) {
  get_opt(j, "Limit", v.limit);
  get_opt(j, "Marker", v.marker);
}
void to_json(json& j, const ListKeysResponse& v) {
  j = json{{"Keys", v.keys}, {"Truncated", v.truncated}};
  put_opt(j, "NextMarker", v.next_marker);
}
void from_json(const json& j, ListKeysResponse& v) {
  j.at("Keys").get_to(v.keys);
  get_opt(j, "Truncated", v.truncated);
  get_opt(j, "NextMarker", v.next_marker);
}

void to_json(json& j, const CreateAliasRequest& v) {
  j = json{{"AliasName", v.alias_name}, {"TargetKeyId", v.target_key_id}};
}
void from_json(const json& j, CreateAliasRequest& v) {
  j.at("AliasName").get_to(v.alias_name);
  j.at("TargetKeyId").get_to(v.target_key_id);
}

void to_json(json& j, const ListAliasesRequest& v) {
  j = json::object();
  put_opt(j, "KeyId", v.key_id);
  put_opt(j, "Limit", v.limit);
  put_opt(j, "Marker", v.marker);
}
void from_json(const json& j, ListAliasesRequest& v) {
  get_opt(j, "KeyId", v.key_id);
  get_opt(j, "Limit", v.limit);
  get_opt(j, "Marker", v.marker);
}
void to_json(json& j, const ListAliasesResponse& v) {
  j = json{{"Aliases", v.aliases}, {"Truncated", v.truncated}};
  put_opt(j, "NextMarker", v.next_marker);
}
void from_json(const json& j, ListAliasesResponse& v) {
  j.at("Aliases").get_to(v.aliases);
  get_opt(j, "Truncated", v.truncated);
  get_opt(j, "NextMarker", v.next_marker);
}

void to_json(json& j, const GenerateDataKeyRequest& v) {
  j = json{{"KeyId", v.key_id}, {"EncryptionContext", v.encryption_context}};
  put_opt(j, "KeySpec", v.key_spec);
  put_opt(j, "NumberOfBytes", v.number_of_bytes);
  put_list(j, "GrantTokens", v.grant_tokens);
}
void from_json(const json& j, GenerateDataKeyRequest& v) {
  j.at("KeyId").get_to(v.key_id);
  get_opt(j, "EncryptionContext", v.encryption_context);
  get_opt(j, "KeySpec", v.key_spec);
  get_opt(j, "NumberOfBytes", v.number_of_bytes);
  get_opt(j, "GrantTokens", v.grant_tokens);
}
void to_json(json& j, const GenerateDataKeyResponse& v) {
  j = json{{"CiphertextBlob", b64(v.ciphertext_blob)}, {"Plaintext", b64(v.plaintext.span())},
           {"KeyId", v.key_id}};
}
void from_json(const json& j, GenerateDataKeyResponse& v) {
  j.at("KeyId").get_to(v.key_id);
  v.ciphertext_blob = bytes_from_b64(j, "CiphertextBlob");
  v.plaintext = secret_from_b64(j, "Plaintext");
}

void to_json(json& j, const DecryptRequest& v) {
  j = json{{"CiphertextBlob", b64(v.ciphertext_blob)},
           {"EncryptionContext", v.encryption_context},
           {"EncryptionAlgorithm", v.encryption_algorithm}};
  put_opt(j, "KeyId", v.key_id);
  put_list(j, "GrantTokens", v.grant_tokens);
}
void from_json(const json& j, DecryptRequest& v) {
  v.ciphertext_blob = bytes_from_b64(j, "CiphertextBlob");
  get_opt(j, "EncryptionContext", v.encryption_context);
  get_opt(j, "KeyId", v.key_id);
  get_opt(j, "EncryptionAlgorithm", v.encryption_algorithm);
  get_opt(j, "GrantTokens", v.grant_tokens);
}
void to_json(json& j, const DecryptResponse& v) {
  j = json{{"KeyId", v.key_id},
           {"Plaintext", b64(v.plaintext.span())},
           {"EncryptionAlgorithm", v.encryption_algorithm}};
}
void from_json(const json& j, DecryptResponse& v) {
  j.at("KeyId").get_to(v.key_id);
  v.plaintext = secret_from_b64(j, "Plaintext");
  get_opt(j, "EncryptionAlgorithm", v.encryption_algorithm);
}

void to_json(json& j, const EncryptRequest& v) {
  j = json{{"KeyId", v.key_id},
           {"Plaintext", b64(v.plaintext.span())},
           {"EncryptionContext", v.encryption_context},
           {"EncryptionAlgorithm", v.encryption_algorithm}};
  put_list(j, "GrantTokens", v.grant_tokens);
}
void from_json(const json& j, EncryptRequest& v) {
  j.at("KeyId").get_to(v.key_id);
  v.plaintext = secret_from_b64(j, "Plaintext");
  get_opt(j, "EncryptionContext", v.encryption_context);
  get_opt(j, "EncryptionAlgorithm", v.encryption_algorithm);
  get_opt(j, "GrantTokens", v.grant_tokens);
}
void to_json(json& j, const EncryptResponse& v) {
  j = json{{"CiphertextBlob", b64(v.ciphertext_blob)},
           {"KeyId", v.key_id},
           {"EncryptionAlgorithm", v.encryption_algorithm}};
}
void from_json(const json& j, EncryptResponse& v) {
  v.ciphertext_blob = bytes_from_b64(j, "CiphertextBlob");
  j.at("KeyId").get_to(v.key_id);
  get_opt(j, "EncryptionAlgorithm", v.encryption_algorithm);
}

void to_json(json& j, const GenerateRandomRequest& v) { j = json{{"NumberOfBytes", v.number_of_bytes}}; }
void from_json(const json& j, GenerateRandomRequest& v) { get_opt(j, "NumberOfBytes", v.number_of_bytes); }
void to_json(json& j, const GenerateRandomResponse& v) { j = json{{"Plaintext", b64(v.plaintext.span())}}; }
void from_json(const json& j, GenerateRandomResponse& v) { v.plaintext = secret_from_b64(j, "Plaintext"); }

void to_json(json& j, const KmsError& v) {
  j = json{{"__type", std::string(v.name())}, {"message", v.message}};
}
void from_json(const json& j, KmsError& v) {
  v.code = kms_error_from_name(j.at("__type").get<std::string>());
  get_opt(j, "message", v.message);
}

}  // namespace kmsfs::keyclient
