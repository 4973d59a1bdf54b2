#pragma once
// KmsCore: the KMS itself. Key registry (metadata files under the state
// dir), aliases, key states, the wrap/unwrap envelope through the Hsm. Every
// operation takes the caller's identity (SO_PEERCRED in kmsd, the process's
// own ids in embedded mode) for policies and the audit trail (#3).
//
// State layout under the state dir (see docs/kms-api.md):
//   keys/<uuid>.json   one key record (metadata, policy, versions)
//   aliases.json       alias name -> key id
//   lock               flock(2) serialising writers across processes
// Every file is replaced atomically: write temp, fsync, rename, fsync dir.
//
// Thread safety: all public methods may be called concurrently.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "keyclient/hsm.h"
#include "keyclient/key_service.h"

namespace kmsfs::keyclient {

struct CallerIdentity {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
  static CallerIdentity of_this_process();
};

// Injectable clock (epoch seconds) so tests need not wait for days.
using Clock = std::function<double()>;
double system_clock_now();

class KmsCore {
 public:
  KmsCore(std::string state_dir, std::unique_ptr<Hsm> hsm, Clock clock = system_clock_now);
  ~KmsCore();
  KmsCore(const KmsCore&) = delete;
  KmsCore& operator=(const KmsCore&) = delete;

  KmsResult<CreateKeyResponse> create_key(const CallerIdentity& caller, const CreateKeyRequest& req);
  KmsResult<DescribeKeyResponse> describe_key(const CallerIdentity& caller,
                                              const DescribeKeyRequest& req);
  KmsResult<ListKeysResponse> list_keys(const CallerIdentity& caller, const ListKeysRequest& req);
  KmsResult<void> create_alias(const CallerIdentity& caller, const CreateAliasRequest& req);
  KmsResult<ListAliasesResponse> list_aliases(const CallerIdentity& caller,
                                              const ListAliasesRequest& req);
  KmsResult<GenerateDataKeyResponse> generate_data_key(const CallerIdentity& caller,
                                                       const GenerateDataKeyRequest& req);
  KmsResult<DecryptResponse> decrypt(const CallerIdentity& caller, const DecryptRequest& req);
  KmsResult<EncryptResponse> encrypt(const CallerIdentity& caller, const EncryptRequest& req);
  KmsResult<GenerateRandomResponse> generate_random(const CallerIdentity& caller,
                                                    const GenerateRandomRequest& req);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The core behind the KeyService interface, acting as this process.
class EmbeddedKeyService final : public KeyService {
 public:
  explicit EmbeddedKeyService(std::unique_ptr<KmsCore> core,
                              CallerIdentity caller = CallerIdentity::of_this_process());

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

  KmsCore& core() { return *core_; }

 private:
  std::unique_ptr<KmsCore> core_;
  CallerIdentity caller_;
};

}  // namespace kmsfs::keyclient
