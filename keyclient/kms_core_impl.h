#pragma once
// KmsCore's insides, shared by kms_core.cpp (plumbing, cryptographic
// operations, maintenance) and kms_core_admin.cpp (key administration).
// Not part of the library's interface.
//
// Every operation runs through Impl::run(): resolve the caller, do the work
// (which authorises each key it touches through authorize() and checks the
// key state through check_state()), then append exactly one audit record —
// allowed, denied or failed — written before the response is returned
// (a response that carries plaintext is refused when it cannot be), and
// fdatasynced before it returns when the call changes key state
// (!read_only or Call::durable) or its response carries plaintext (unless
// KmsCoreOptions::audit_sync_plaintext is off), else by the audit log's
// flusher.
//
// Locks: Impl::mu guards wrap_left, last_maintenance and principals; it is
// never held across file I/O or an HSM call. The KeyStore's flock
// serialises read-modify-writes of records across processes; the audit
// log's own flock is taken only after the store lock is released.

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/audit_log.h"
#include "keyclient/key_policy.h"
#include "keyclient/key_store.h"
#include "keyclient/kms_core.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

using json = nlohmann::json;

inline constexpr const char* kAccount = "000000000000";
inline constexpr const char* kArnPrefix = "arn:aws:kms:local:000000000000:";
inline constexpr const char* kKeyArnPrefix = "arn:aws:kms:local:000000000000:key/";
inline constexpr const char* kAliasArnPrefix = "arn:aws:kms:local:000000000000:alias/";
inline constexpr double kDay = 86400.0;

// A malformed request field; run() turns it into ValidationException.
struct RequestError {
  KmsErrorCode code = KmsErrorCode::ValidationException;
  std::string message;
};

// Field readers for AWS JSON bodies; throw RequestError naming the field.
std::string req_str(const json& j, const char* field);
std::optional<std::string> opt_str(const json& j, const char* field);
std::optional<long long> opt_int(const json& j, const char* field);
std::optional<double> opt_num(const json& j, const char* field);
bool opt_bool(const json& j, const char* field, bool def);
std::vector<std::uint8_t> req_b64(const json& j, const char* field);
EncryptionContext opt_ctx(const json& j, const char* field);
std::vector<std::string> opt_str_list(const json& j, const char* field);
std::vector<Tag> opt_tags(const json& j, const char* field);

inline Unexpected<KmsError> err(KmsErrorCode c, std::string m) { return kms_error(c, std::move(m)); }
inline bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }
inline std::string key_arn(const std::string& key_id) { return kKeyArnPrefix + key_id; }
std::string hsm_label(const std::string& key_id, std::uint32_t version);
std::string random_hex(std::size_t bytes);
KmsResult<void> validate_alias_name(const std::string& name);
KmsResult<void> validate_tags(const std::vector<Tag>& tags);

// Every pair of `required` is in `ctx`: keys compared without regard to
// case, values exactly (grant constraints, as AWS matches them).
bool grant_context_includes(const EncryptionContext& ctx, const EncryptionContext& required);

// One call in progress: who, what, and what the audit record will say.
struct Call {
  const CallerIdentity& caller;
  Principal principal;
  std::string operation;
  json params = json::object();  // requestParameters (never plaintext, blobs, tokens or PINs)
  json resources = json::array();
  bool read_only = true;
  // The response carries plaintext: refused when its record cannot be written.
  bool plaintext = false;
  // fdatasync the record before returning even though read_only (a call
  // that changes state the AWS API calls read-only, e.g. an import token).
  bool durable = false;
  // GrantTokens of the request: each must name a grant on a key the call
  // uses (or, for a call using two keys, on either), checked by authorize().
  std::vector<std::string> grant_tokens{};
  // CreateGrant allowed by grants rather than by the key policy: those
  // grants (the new grant may not exceed all of them).
  std::vector<Grant> create_grant_parents{};
  void add_resource(const std::string& arn);
};

// The outcome of the operation × key state table.
enum class StateRule { Allowed, Disabled, InvalidState, Unsupported };

struct KmsCore::Impl {
  Impl(std::string dir, std::unique_ptr<Hsm> h, Clock c, KmsCoreOptions o);

  KeyStore store;
  std::unique_ptr<Hsm> hsm;
  Clock clock;
  KmsCoreOptions opts;
  AuditLog audit;  // declared after hsm: destroyed (writing its head) before it
  std::shared_ptr<spdlog::logger> log;
  std::string state_dir;
  // This process (the core is built after any daemonizing fork) and its
  // executable, for the audit records of embedded callers.
  pid_t self_pid;
  std::string self_exe;

  std::mutex mu;
  std::map<std::string, std::uint64_t> wrap_left;  // guarded by mu: HSM label -> reserved wraps left
  double last_maintenance = -1e300;                // guarded by mu
  // Background maintenance (KmsCoreOptions::background_maintenance).
  std::mutex maintainer_mu;  // guards maintainer_stop
  std::condition_variable maintainer_cv;
  bool maintainer_stop = false;
  std::thread maintainer;
  std::map<uid_t, std::pair<double, Principal>> principals;  // guarded by mu: uid -> (resolved at, principal)

  // --- plumbing
  Principal principal_of(const CallerIdentity& c);
  void maybe_maintain();
  AuditFields audit_event(const Call& call, const KmsError* error) const;
  template <class T, class Fn>
  KmsResult<T> run(const CallerIdentity& caller, const char* operation, bool read_only, Fn&& fn);
  KmsResult<json> run_json(const CallerIdentity& caller, const char* operation, bool read_only, const json& req,
                           const std::function<KmsResult<json>(Call&)>& fn);
  static json audit_params(const json& req);

  KmsError from_hsm(const HsmError& e, const std::string& what) const;

  // --- keys
  KmsResult<KeyRecord> new_key(const CallerIdentity& caller, std::string description, std::string key_manager,
                               std::optional<std::string> policy, std::vector<Tag> tags, std::string origin);
  KmsResult<KeyRecord> ensure_default_key(const CallerIdentity& caller);
  KmsResult<KeyRecord> load_existing(const std::string& key_id, const std::string& ref);
  KmsResult<KeyRecord> resolve(const CallerIdentity& caller, const std::string& ref);
  // Re-reads `key_id` under the store lock, lets `fn` change it, writes it.
  KmsResult<KeyRecord> modify(const std::string& key_id, const std::function<KmsResult<void>(KeyRecord&)>& fn);
  KmsResult<void> generate_fresh(const std::string& label);
  // Adds the next version (its material generated in the HSM) to `rec`.
  KmsResult<void> add_version(KeyRecord& rec, const char* rotation_type);

  // --- authorisation and state
  KmsResult<void> authorize(Call& call, const KeyRecord& rec, const std::string& action,
                            const EncryptionContext* ctx);
  // Sets call.grant_tokens after AWS's limits (at most 10, 1-8192 chars).
  static KmsResult<void> set_grant_tokens(Call& call, std::vector<std::string> tokens);
  // Whether any key's grants include `token`.
  bool grant_token_exists(const std::string& token);
  static StateRule state_rule(const std::string& operation, const std::string& state);
  static KmsResult<void> check_state(const KeyRecord& rec, const std::string& operation);
  KmsResult<void> check_not_managed(const KeyRecord& rec, const std::string& operation) const;
  // Resolves body.KeyId, authorises kms:<operation>, refuses managed keys
  // when `admin`, and applies the key-state table.
  KmsResult<KeyRecord> key_for(Call& call, const json& body, const std::string& operation, bool admin);

  // --- envelope
  KmsResult<KeyVersion> reserve_wrap(const KeyRecord& rec);
  // A wrap in two halves around the HSM call: the blob (key, reserved
  // version, IV) and its AAD first, then the HSM's ciphertext into it.
  struct PreparedWrap {
    CiphertextBlob blob;
    std::vector<std::uint8_t> aad;
    std::string hsm_label;
  };
  KmsResult<PreparedWrap> prepare_wrap(const KeyRecord& rec, std::size_t plaintext_size, const EncryptionContext& ctx);
  KmsResult<Bytes> finish_wrap(PreparedWrap& w, HsmResult<std::vector<std::uint8_t>> ct, std::size_t plaintext_size,
                               const KeyRecord& rec, const char* op);
  KmsResult<Bytes> wrap(const KeyRecord& rec, std::span<const std::uint8_t> plaintext, const EncryptionContext& ctx,
                        const char* op);
  KmsResult<crypto::SecureBuffer> unwrap(Call& call, const Bytes& blob_bytes, const EncryptionContext& ctx,
                                         const std::optional<std::string>& expected_key, const char* action,
                                         const char* operation, KeyRecord* source_out);
  KmsResult<std::string> key_check_value(const std::string& label);

  // --- maintenance
  void audit_service_event(const std::string& event_name, const KeyRecord& rec, const std::string& note);
  KmsResult<void> delete_key_now(const std::string& key_id);
  KmsResult<void> delete_locked(KeyRecord& rec);  // caller holds the store lock
  KmsResult<void> maintain();
  KmsResult<void> destroy_material(KeyRecord& rec);
};

template <class T, class Fn>
KmsResult<T> KmsCore::Impl::run(const CallerIdentity& caller, const char* operation, bool read_only, Fn&& fn) {
  maybe_maintain();
  Call call{caller, principal_of(caller), operation};
  call.read_only = read_only;
  KmsResult<T> result = [&]() -> KmsResult<T> {
    try {
      return fn(call);
    } catch (const RequestError& e) {
      return err(e.code, e.message);
    } catch (const nlohmann::json::exception& e) {
      return err(KmsErrorCode::ValidationException, std::string("malformed request: ") + e.what());
    }
  }();
  const KmsError* error = result ? nullptr : &result.error();
  const bool durable = !call.read_only || call.durable || (call.plaintext && opts.audit_sync_plaintext);
  auto a = audit.append(audit_event(call, error), durable ? AuditDurability::Durable : AuditDurability::Buffered);
  if (!a) {
    log->error("{}: the audit record could not be written: {}", operation, a.error().message);
    // Plaintext is never handed out without its audit record in the log.
    if (call.plaintext && result) {
      return err(KmsErrorCode::KMSInternalException, "the audit trail could not be written: " + a.error().message);
    }
  }
  return result;
}

}  // namespace kmsfs::keyclient
