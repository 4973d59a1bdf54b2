#pragma once
// KeyService: the KMS API, shaped like AWS KMS (operation, request and
// response field names; key states; error names). The filesystem sees only
// this interface. Implementations: EmbeddedKeyService (the KMS core in this
// process) and, with #4, the kmsd socket client. Every argument is a plain
// serialisable value, so the same call runs in-process or over a socket.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "crypto/secure_buffer.h"
#include "keyclient/encryption_context.h"
#include "keyclient/kms_error.h"

namespace kmsfs::keyclient {

using Bytes = std::vector<std::uint8_t>;

struct Tag {
  std::string tag_key;    // TagKey
  std::string tag_value;  // TagValue
};

// DescribeKey's KeyMetadata, field for field.
struct KeyMetadata {
  std::string aws_account_id;  // AWSAccountId
  std::string key_id;          // KeyId (UUID)
  std::string arn;             // Arn
  double creation_date = 0;    // CreationDate (epoch seconds)
  bool enabled = false;        // Enabled
  std::string description;     // Description
  std::string key_usage = "ENCRYPT_DECRYPT";
  std::string key_state = "Enabled";  // Enabled | Disabled | PendingDeletion | PendingImport
  std::optional<double> deletion_date;  // DeletionDate
  std::optional<int> pending_deletion_window_in_days;
  std::optional<double> valid_to;        // ValidTo (imported material)
  std::string origin = "AWS_KMS";        // AWS_KMS | EXTERNAL
  std::optional<std::string> expiration_model;  // KEY_MATERIAL_EXPIRES | KEY_MATERIAL_DOES_NOT_EXPIRE
  std::string key_manager = "CUSTOMER";  // CUSTOMER | AWS
  std::string customer_master_key_spec = "SYMMETRIC_DEFAULT";
  std::string key_spec = "SYMMETRIC_DEFAULT";
  std::vector<std::string> encryption_algorithms{"SYMMETRIC_DEFAULT"};
  bool multi_region = false;
};

struct CreateKeyRequest {
  std::string description;
  std::string key_usage = "ENCRYPT_DECRYPT";
  std::string key_spec = "SYMMETRIC_DEFAULT";
  std::string origin = "AWS_KMS";
  std::optional<std::string> policy;  // JSON key policy document
  std::vector<Tag> tags;
  bool bypass_policy_lockout_safety_check = false;
};
struct CreateKeyResponse {
  KeyMetadata key_metadata;
};

struct DescribeKeyRequest {
  std::string key_id;  // key id, key ARN, alias name or alias ARN
};
struct DescribeKeyResponse {
  KeyMetadata key_metadata;
};

struct KeyListEntry {
  std::string key_id;
  std::string key_arn;
};
struct ListKeysRequest {
  std::optional<int> limit;  // 1..1000, default 100
  std::optional<std::string> marker;
};
struct ListKeysResponse {
  std::vector<KeyListEntry> keys;
  bool truncated = false;
  std::optional<std::string> next_marker;
};

struct CreateAliasRequest {
  std::string alias_name;  // "alias/..."
  std::string target_key_id;
};

struct AliasListEntry {
  std::string alias_name;
  std::string alias_arn;
  std::optional<std::string> target_key_id;
  std::optional<double> creation_date;
  std::optional<double> last_updated_date;
};
struct ListAliasesRequest {
  std::optional<std::string> key_id;
  std::optional<int> limit;
  std::optional<std::string> marker;
};
struct ListAliasesResponse {
  std::vector<AliasListEntry> aliases;
  bool truncated = false;
  std::optional<std::string> next_marker;
};

struct GenerateDataKeyRequest {
  std::string key_id;
  EncryptionContext encryption_context;
  std::optional<std::string> key_spec;   // AES_256 | AES_128
  std::optional<int> number_of_bytes;    // 1..1024
  std::vector<std::string> grant_tokens;  // GrantTokens: each must name a grant
};
struct GenerateDataKeyResponse {
  std::string key_id;  // ARN of the key that wrapped it
  crypto::SecureBuffer plaintext;
  Bytes ciphertext_blob;
};

struct DecryptRequest {
  Bytes ciphertext_blob;
  EncryptionContext encryption_context;
  std::optional<std::string> key_id;  // if set, must name the blob's key
  std::string encryption_algorithm = "SYMMETRIC_DEFAULT";
  std::vector<std::string> grant_tokens;
};
struct DecryptResponse {
  std::string key_id;  // ARN
  crypto::SecureBuffer plaintext;
  std::string encryption_algorithm = "SYMMETRIC_DEFAULT";
};

struct EncryptRequest {
  std::string key_id;
  crypto::SecureBuffer plaintext;  // 1..4096 bytes
  EncryptionContext encryption_context;
  std::string encryption_algorithm = "SYMMETRIC_DEFAULT";
  std::vector<std::string> grant_tokens;
};
struct EncryptResponse {
  std::string key_id;  // ARN
  Bytes ciphertext_blob;
  std::string encryption_algorithm = "SYMMETRIC_DEFAULT";
};

struct GenerateRandomRequest {
  int number_of_bytes = 32;  // 1..1024
};
struct GenerateRandomResponse {
  crypto::SecureBuffer plaintext;
};

class KeyService {
 public:
  virtual ~KeyService() = default;

  virtual KmsResult<CreateKeyResponse> create_key(const CreateKeyRequest& req) = 0;
  virtual KmsResult<DescribeKeyResponse> describe_key(const DescribeKeyRequest& req) = 0;
  virtual KmsResult<ListKeysResponse> list_keys(const ListKeysRequest& req) = 0;
  virtual KmsResult<void> create_alias(const CreateAliasRequest& req) = 0;
  virtual KmsResult<ListAliasesResponse> list_aliases(const ListAliasesRequest& req) = 0;
  virtual KmsResult<GenerateDataKeyResponse> generate_data_key(const GenerateDataKeyRequest& req) = 0;
  virtual KmsResult<DecryptResponse> decrypt(const DecryptRequest& req) = 0;
  virtual KmsResult<EncryptResponse> encrypt(const EncryptRequest& req) = 0;
  virtual KmsResult<GenerateRandomResponse> generate_random(const GenerateRandomRequest& req) = 0;

  // The whole API by AWS operation name ("GenerateDataKey", "ScheduleKeyDeletion",
  // ...) with AWS JSON request and response bodies (base64 blobs), exactly
  // what `aws kms` and the AWS SDKs send and receive. kmsctl and the kmsd
  // wire protocol use this; the typed methods above are the filesystem's
  // hot path. An unknown operation is UnsupportedOperationException.
  virtual KmsResult<nlohmann::json> call(std::string_view operation, const nlohmann::json& request) = 0;
};

// The managed key that `kmsfs init` uses when no --key is given; the core
// creates it on first reference.
inline constexpr const char* kDefaultManagedAlias = "alias/kmsfs/default";

}  // namespace kmsfs::keyclient
