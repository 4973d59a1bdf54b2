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
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

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

struct KmsCoreOptions {
  // A version's wraps are counted (in reserved blocks) and the key rotates
  // before this many: far below the 2^32 random-96-bit-IV bound of GCM.
  std::uint64_t wrap_limit_per_version = std::uint64_t{1} << 30;
  std::uint64_t wrap_reservation = 1024;
  // Scheduled deletions, expired imported material and automatic rotations
  // are processed at construction and then at most this often, on calls.
  double maintenance_interval_seconds = 60;
  // Also from a background thread every maintenance_interval_seconds (real
  // time), so that an idle kmsd or mount destroys material whose deletion
  // window ended without waiting for a call. make_kms_core turns it on;
  // off here so that a test driving an unsynchronised fake clock has no
  // second thread reading it.
  bool background_maintenance = false;
  std::uint64_t audit_checkpoint_every = 64;
  // Data-plane records (GenerateDataKey*, Encrypt, Decrypt, ReEncrypt,
  // GenerateRandom, reads) are written before the call returns and
  // fdatasynced within this interval; records of calls that change key
  // state are fdatasynced before the call returns. 0 = fdatasync every
  // record before its call returns. See docs/kms-api.md, "Audit trail".
  std::chrono::milliseconds audit_sync_interval{100};
  // Records of calls whose response carries plaintext (GenerateDataKey,
  // Decrypt, GenerateRandom) are fdatasynced before that response leaves
  // the core (concurrent calls share one flush). false: they are written
  // before the call returns but synced within audit_sync_interval, like the
  // other data-plane records (faster on a slow disk; a power failure can
  // lose up to that interval of them).
  bool audit_sync_plaintext = true;
  // Where the audit trail lives (audit.log, audit.head and their locks);
  // empty = the state dir. kmsd's `audit_log` setting.
  std::string audit_dir;
};

class KmsCore {
 public:
  KmsCore(std::string state_dir, std::unique_ptr<Hsm> hsm, Clock clock = system_clock_now,
          KmsCoreOptions options = {});
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

  // The rest of the API with AWS JSON request and response bodies (blobs
  // base64). kms_dispatch.cpp maps each AWS operation name to one of these.
  using Json = nlohmann::json;
  KmsResult<Json> update_key_description(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> update_alias(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> delete_alias(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> enable_key(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> disable_key(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> schedule_key_deletion(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> cancel_key_deletion(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> enable_key_rotation(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> disable_key_rotation(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> get_key_rotation_status(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> rotate_key_on_demand(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> list_key_rotations(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> generate_data_key_without_plaintext(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> re_encrypt(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> get_key_policy(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> put_key_policy(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> list_key_policies(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> get_parameters_for_import(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> import_key_material(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> delete_imported_key_material(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> tag_resource(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> untag_resource(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> list_resource_tags(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> create_grant(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> list_grants(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> retire_grant(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> revoke_grant(const CallerIdentity& caller, const Json& req);
  // Not AWS operations: the audit trail (root or the state dir's owner).
  KmsResult<Json> verify_audit_log(const CallerIdentity& caller, const Json& req);
  KmsResult<Json> search_audit_log(const CallerIdentity& caller, const Json& req);

  // Processes due scheduled deletions (C_DestroyObject of every version),
  // expired imported material and automatic rotations. Also runs at
  // construction and, on calls, every maintenance_interval_seconds.
  KmsResult<void> run_maintenance();

  // For tests and diagnostics: audit records this core appended, and how
  // many of them an fdatasync has covered.
  struct AuditSyncState {
    std::uint64_t appended = 0;
    std::uint64_t synced = 0;
  };
  AuditSyncState audit_sync_state() const;

  struct Impl;

 private:
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
