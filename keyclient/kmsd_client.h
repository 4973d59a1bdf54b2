#pragma once
// KmsdClient: the KeyService of a kmsd reached over its Unix socket, speaking
// the AWS KMS wire protocol (keyclient/kms_http.h, the same bytes as any AWS
// SDK), so one client serves kmsd today and any AWS-KMS-compatible endpoint
// later.
//
// Connections are pooled (keep-alive), so concurrent FUSE threads do not
// serialize on one socket; each call takes an idle connection or opens a new
// one. When kmsd restarts, pooled connections die: a call that fails on a
// reused connection before any response byte arrived is retried once on a
// fresh one, and new connections simply find the new daemon. Transport
// failures come back as KmsErrors whose message names the socket:
// DependencyTimeoutException for a timeout, KMSInternalException otherwise.
//
// Thread safety: all methods may be called concurrently.

#include <chrono>
#include <memory>
#include <string>

#include "keyclient/key_service.h"

namespace kmsfs::keyclient {

struct KmsdClientOptions {
  std::string socket_path;
  std::chrono::milliseconds connect_timeout{5'000};
  std::chrono::milliseconds io_timeout{30'000};  // sending a request and receiving its response
  std::size_t max_idle_connections = 16;
};

class KmsdClient final : public KeyService {
 public:
  explicit KmsdClient(KmsdClientOptions options);
  ~KmsdClient() override;

  KmsResult<CreateKeyResponse> create_key(const CreateKeyRequest& req) override;
  KmsResult<DescribeKeyResponse> describe_key(const DescribeKeyRequest& req) override;
  KmsResult<ListKeysResponse> list_keys(const ListKeysRequest& req) override;
  KmsResult<void> create_alias(const CreateAliasRequest& req) override;
  KmsResult<ListAliasesResponse> list_aliases(const ListAliasesRequest& req) override;
  KmsResult<GenerateDataKeyResponse> generate_data_key(const GenerateDataKeyRequest& req) override;
  KmsResult<DecryptResponse> decrypt(const DecryptRequest& req) override;
  KmsResult<EncryptResponse> encrypt(const EncryptRequest& req) override;
  KmsResult<GenerateRandomResponse> generate_random(const GenerateRandomRequest& req) override;
  KmsResult<nlohmann::json> call(std::string_view operation, const nlohmann::json& request) override;

  const std::string& socket_path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsfs::keyclient
