#include "keyclient/kms_core.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>

#include "crypto/encoding.h"
#include "crypto/random.h"
#include "crypto/sha256.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/kms_core_impl.h"
#include "keyclient/kms_dispatch.h"
#include "keyclient/kms_json.h"

namespace kmsfs::keyclient {

namespace {

constexpr const char* kDefaultKeyDescription = "Default key that protects kmsfs volumes when no other key is defined";
constexpr std::size_t kMaxContextBytes = 8192;

std::string new_key_id() {
  std::array<std::uint8_t, 16> u{};
  crypto::random_bytes(u);
  u[6] = static_cast<std::uint8_t>((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = static_cast<std::uint8_t>((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return uuid_to_string(u);
}

std::string default_policy(uid_t creator) {
  json principals = json::array({"uid:0"});
  if (creator != 0) principals.push_back("uid:" + std::to_string(creator));
  json p{{"Version", "2012-10-17"},
         {"Id", "key-default-1"},
         {"Statement",
          {{{"Sid", "Enable root and key creator permissions"},
            {"Effect", "Allow"},
            {"Principal", {{"Local", principals}}},
            {"Action", "kms:*"},
            {"Resource", "*"}}}}};
  return p.dump();
}

// The fixed policy of a managed key (KeyManager AWS). As an AWS managed key
// serves every principal of its account, this one serves every local user:
// any uid may use it and read about it (a data key it wraps is still bound
// to its file by the encryption context, and the backing files' own
// permissions decide who gets a header to unwrap). Grants stay with root
// and the uid that first used it; nobody may administer it.
std::string managed_policy(uid_t creator) {
  json owners = json::array({"uid:0"});
  if (creator != 0) owners.push_back("uid:" + std::to_string(creator));
  json p{{"Version", "2012-10-17"},
         {"Id", "auto-kmsfs-2"},
         {"Statement",
          {{{"Sid", "Allow use of the key by every local user"},
            {"Effect", "Allow"},
            {"Principal", {{"Local", "*"}}},
            {"Action",
             {"kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"}},
            {"Resource", "*"}},
           {{"Sid", "Allow reading the key's metadata"},
            {"Effect", "Allow"},
            {"Principal", {{"Local", "*"}}},
            {"Action", {"kms:Describe*", "kms:Get*", "kms:List*"}},
            {"Resource", "*"}},
           {{"Sid", "Allow grants by root and the first user"},
            {"Effect", "Allow"},
            {"Principal", {{"Local", owners}}},
            {"Action", {"kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant", "kms:RetireGrant"}},
            {"Resource", "*"}}}}};
  return p.dump();
}

KmsResult<void> validate_context(const EncryptionContext& ctx) {
  std::size_t total = 0;
  for (const auto& [k, v] : ctx) {
    if (k.empty()) return err(KmsErrorCode::ValidationException, "encryption context keys must not be empty");
    total += k.size() + v.size();
  }
  if (total > kMaxContextBytes) return err(KmsErrorCode::ValidationException, "encryption context exceeds 8192 bytes");
  return {};
}

KmsResult<void> validate_algorithm(const std::string& alg) {
  if (alg != "SYMMETRIC_DEFAULT") {
    return err(KmsErrorCode::InvalidKeyUsageException,
               "encryption algorithm " + alg + " is not supported by a SYMMETRIC_DEFAULT key");
  }
  return {};
}

json context_json(const EncryptionContext& ctx) {
  json j = json::object();
  for (const auto& [k, v] : ctx) j[k] = v;
  return j;
}

// Grant constraints match context keys without regard to case and values
// exactly (AWS: "the key in each key-value pair is not case sensitive, but
// the value is case sensitive").
bool same_key(const std::string& a, const std::string& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

bool context_has(const EncryptionContext& ctx, const std::string& key, const std::string& value) {
  return std::any_of(ctx.begin(), ctx.end(), [&](const auto& kv) { return same_key(kv.first, key) && kv.second == value; });
}

}  // namespace

bool grant_context_includes(const EncryptionContext& ctx, const EncryptionContext& required) {
  return std::all_of(required.begin(), required.end(), [&](const auto& kv) { return context_has(ctx, kv.first, kv.second); });
}

namespace {

bool is_grant_op_match(const Grant& g, const std::string& op, const EncryptionContext* ctx) {
  if (std::find(g.operations.begin(), g.operations.end(), op) == g.operations.end()) return false;
  // Operations without an encryption context are not constrained (AWS:
  // DescribeKey, RetireGrant; CreateGrant's constraint binds the grants it
  // creates instead, checked by create_grant).
  if (op == "DescribeKey" || op == "RetireGrant" || op == "CreateGrant") return true;
  if (g.context_equals) {
    if (ctx == nullptr || ctx->size() != g.context_equals->size() || !grant_context_includes(*ctx, *g.context_equals)) {
      return false;
    }
  }
  if (g.context_subset) {
    if (ctx == nullptr || !grant_context_includes(*ctx, *g.context_subset)) return false;
  }
  return true;
}

}  // namespace

CallerIdentity CallerIdentity::of_this_process() {
  return CallerIdentity{::geteuid(), ::getegid(), ::getpid()};
}

double system_clock_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------
// Helpers shared with kms_core_admin.cpp

std::string hsm_label(const std::string& key_id, std::uint32_t version) {
  return "kmsfs/" + key_id + "/v" + std::to_string(version);
}

std::string random_hex(std::size_t bytes) {
  std::vector<std::uint8_t> b(bytes);
  crypto::random_public_bytes(b);  // request and event ids are public
  return crypto::to_hex(b);
}

std::string req_str(const json& j, const char* f) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " is required"};
  if (!it->is_string()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be a string"};
  return it->get<std::string>();
}
std::optional<std::string> opt_str(const json& j, const char* f) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be a string"};
  return it->get<std::string>();
}
std::optional<long long> opt_int(const json& j, const char* f) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be an integer"};
  return it->get<long long>();
}
std::optional<double> opt_num(const json& j, const char* f) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be a number"};
  return it->get<double>();
}
bool opt_bool(const json& j, const char* f, bool def) {
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be a boolean"};
  return it->get<bool>();
}
std::vector<std::uint8_t> req_b64(const json& j, const char* f) {
  auto s = req_str(j, f);
  auto v = crypto::from_base64(s);
  if (!v) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " is not valid base64"};
  return std::move(*v);
}
EncryptionContext opt_ctx(const json& j, const char* f) {
  EncryptionContext ctx;
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return ctx;
  if (!it->is_object()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be an object"};
  for (const auto& [k, v] : it->items()) {
    if (!v.is_string()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + "." + k + " must be a string"};
    ctx[k] = v.get<std::string>();
  }
  return ctx;
}
std::vector<std::string> opt_str_list(const json& j, const char* f) {
  std::vector<std::string> out;
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be an array"};
  for (const auto& v : *it) {
    if (!v.is_string()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must hold strings"};
    out.push_back(v.get<std::string>());
  }
  return out;
}
std::vector<Tag> opt_tags(const json& j, const char* f) {
  std::vector<Tag> out;
  auto it = j.find(f);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must be an array"};
  for (const auto& t : *it) {
    if (!t.is_object()) throw RequestError{KmsErrorCode::ValidationException, std::string(f) + " must hold {TagKey, TagValue}"};
    out.push_back(Tag{req_str(t, "TagKey"), req_str(t, "TagValue")});
  }
  return out;
}

KmsResult<void> validate_alias_name(const std::string& name) {
  if (!starts_with(name, "alias/") || name.size() == 6) {
    return err(KmsErrorCode::InvalidAliasNameException, "alias name '" + name + "' must begin with alias/");
  }
  if (starts_with(name, "alias/aws/")) {
    return err(KmsErrorCode::InvalidAliasNameException, "alias names beginning with alias/aws/ are reserved");
  }
  if (name == kDefaultManagedAlias) {
    return err(KmsErrorCode::InvalidAliasNameException,
               std::string(kDefaultManagedAlias) + " is reserved for the managed kmsfs key");
  }
  if (name.size() > 256) return err(KmsErrorCode::ValidationException, "alias name is longer than 256 characters");
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '/' || c == '_' ||
              c == '-';
    if (!ok) {
      return err(KmsErrorCode::ValidationException, "alias name '" + name + "' may contain only a-z A-Z 0-9 / _ -");
    }
  }
  return {};
}

KmsResult<void> validate_tags(const std::vector<Tag>& tags) {
  for (std::size_t i = 0; i < tags.size(); ++i) {
    if (tags[i].tag_key.empty() || tags[i].tag_key.size() > 128) {
      return err(KmsErrorCode::TagException, "tag keys must be 1 to 128 characters");
    }
    if (starts_with(tags[i].tag_key, "aws:")) {
      return err(KmsErrorCode::TagException, "tag keys beginning with aws: are reserved");
    }
    if (tags[i].tag_value.size() > 256) {
      return err(KmsErrorCode::TagException, "tag values must be at most 256 characters");
    }
    for (std::size_t k = 0; k < i; ++k) {
      if (tags[k].tag_key == tags[i].tag_key) {
        return err(KmsErrorCode::TagException, "duplicate tag key '" + tags[i].tag_key + "'");
      }
    }
  }
  return {};
}

void Call::add_resource(const std::string& arn) {
  for (const auto& r : resources) {
    if (r["ARN"] == arn) return;
  }
  resources.push_back({{"ARN", arn}, {"accountId", kAccount}, {"type", "AWS::KMS::Key"}});
}

// ---------------------------------------------------------------------------
// Impl: plumbing

KmsCore::Impl::Impl(std::string dir, std::unique_ptr<Hsm> h, Clock c, KmsCoreOptions o)
    : store(dir),
      hsm(std::move(h)),
      clock(std::move(c)),
      opts(o),
      audit(o.audit_dir.empty() ? dir : o.audit_dir, *hsm, AuditLogOptions{o.audit_checkpoint_every, o.audit_sync_interval}),
      log(named_logger("kmsfs.kms")),
      state_dir(dir),
      self_pid(::getpid()) {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) self_exe.assign(buf, static_cast<std::size_t>(n));
}

Principal KmsCore::Impl::principal_of(const CallerIdentity& c) {
  const double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = principals.find(c.uid);
    if (it != principals.end() && now - it->second.first < 30 && it->second.second.gid == c.gid) {
      return it->second.second;
    }
  }
  Principal p = Principal::resolve(c.uid, c.gid);  // NSS lookups: no lock held
  std::lock_guard<std::mutex> lock(mu);
  principals[c.uid] = {now, p};
  return p;
}

void KmsCore::Impl::maybe_maintain() {
  const double now = clock();
  {
    std::lock_guard<std::mutex> lock(mu);
    if (now - last_maintenance < opts.maintenance_interval_seconds && now >= last_maintenance) return;
    last_maintenance = now;
  }
  auto m = maintain();
  if (!m) log->error("scheduled KMS maintenance failed (retried later): {}", m.error().to_string());
}

json KmsCore::Impl::audit_params(const json& req) {
  static const std::array<const char*, 32> kFields = {
      "KeyId", "EncryptionContext", "KeySpec", "NumberOfBytes", "AliasName", "TargetKeyId", "Description", "Origin",
      "PendingWindowInDays", "RotationPeriodInDays", "DestinationKeyId", "SourceKeyId", "SourceEncryptionContext",
      "DestinationEncryptionContext", "GrantId", "GranteePrincipal", "RetiringPrincipal", "Operations", "Name",
      "TagKeys", "Limit", "Marker", "PolicyName", "ExpirationModel", "ValidTo", "WrappingAlgorithm",
      "WrappingKeySpec", "Constraints", "BypassPolicyLockoutSafetyCheck", "KeyUsage", "EventName", "Since"};
  json out = json::object();
  if (!req.is_object()) return out;
  for (const char* f : kFields) {
    auto it = req.find(f);
    if (it == req.end()) continue;
    std::string name(f);
    name[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(name[0])));
    out[name] = *it;
  }
  return out;
}

AuditFields KmsCore::Impl::audit_event(const Call& call, const KmsError* error) const {
  const double now = clock();
  std::string exe;
  if (call.caller.pid > 0 && call.caller.pid == self_pid) {
    exe = self_exe;  // embedded mode: this process's executable, read once
  } else {
    char buf[4096];
    const std::string link = "/proc/" + std::to_string(call.caller.pid) + "/exe";
    ssize_t n = call.caller.pid > 0 ? ::readlink(link.c_str(), buf, sizeof buf - 1) : -1;
    if (n > 0) exe.assign(buf, static_cast<std::size_t>(n));
  }
  // userIdentity's keys in byte order, as a JSON object dumps them.
  std::string ident = "{\"accountId\":" + audit_json_string(kAccount) + ",\"exe\":" + audit_json_string(exe) +
                      ",\"gid\":" + std::to_string(call.caller.gid) + ",\"pid\":" + std::to_string(call.caller.pid) +
                      ",\"type\":\"LocalUser\",\"uid\":" + std::to_string(call.caller.uid);
  if (!call.principal.user_name.empty()) ident += ",\"userName\":" + audit_json_string(call.principal.user_name);
  ident.push_back('}');
  AuditFields e;
  e.add_string("eventVersion", "1.08");
  e.add_string("eventTime", iso8601_utc(now));
  e.add_string("eventSource", "kms.amazonaws.com");
  e.add_string("eventName", call.operation);
  e.add_string("eventType", "AwsApiCall");
  e.add_string("awsRegion", "local");
  e.add_string("sourceIPAddress", "local");
  e.add("userIdentity", std::move(ident));
  e.add("requestParameters", call.params.dump());
  e.add("responseElements", "null");
  e.add_string("requestID", random_hex(16));
  e.add_string("eventID", random_hex(16));
  e.add("readOnly", call.read_only ? "true" : "false");
  e.add("resources", call.resources.dump());
  e.add_string("recipientAccountId", kAccount);
  e.add("managementEvent", "true");
  e.add_string("eventCategory", "Management");
  if (error != nullptr) {
    e.add_string("errorCode", error->name());
    e.add_string("errorMessage", error->message);
  }
  return e;
}

KmsResult<json> KmsCore::Impl::run_json(const CallerIdentity& caller, const char* operation, bool read_only,
                                        const json& req, const std::function<KmsResult<json>(Call&)>& fn) {
  return run<json>(caller, operation, read_only, [&](Call& call) -> KmsResult<json> {
    call.params = audit_params(req);
    if (!req.is_object()) return err(KmsErrorCode::ValidationException, "the request body must be a JSON object");
    if (auto t = set_grant_tokens(call, opt_str_list(req, "GrantTokens")); !t) return Unexpected<KmsError>(t.error());
    return fn(call);
  });
}

KmsError KmsCore::Impl::from_hsm(const HsmError& e, const std::string& what) const {
  switch (e.kind) {
    case HsmError::Kind::AuthenticationFailed:
      return KmsError{KmsErrorCode::InvalidCiphertextException,
                      "the ciphertext is invalid or the encryption context does not match"};
    case HsmError::Kind::KeyNotFound:
      log->error("{}: key material missing from the HSM: {}", what, e.message);
      return KmsError{KmsErrorCode::KMSInternalException,
                      what + ": key material is missing from the HSM (" + e.message + ")"};
    case HsmError::Kind::DeviceError:
    case HsmError::Kind::NotLoggedIn:
      log->error("{}: HSM failure: {}", what, e.message);
      return KmsError{KmsErrorCode::KeyUnavailableException, what + ": the HSM is unavailable (" + e.message + ")"};
    case HsmError::Kind::InvalidArgument:
      break;
  }
  log->error("{}: HSM refused the request: {}", what, e.message);
  return KmsError{KmsErrorCode::KMSInternalException, what + ": " + e.message};
}

// ---------------------------------------------------------------------------
// Impl: keys

KmsResult<void> KmsCore::Impl::generate_fresh(const std::string& label) {
  // A crash between C_GenerateKey and the record write can leave an object
  // under a label no record names yet: it is unreferenced, so remove it.
  auto d = hsm->destroy_objects(label);
  if (!d) return Unexpected<KmsError>(from_hsm(d.error(), "generating " + label));
  auto g = hsm->generate_aes_key(label, 32);
  if (!g) return Unexpected<KmsError>(from_hsm(g.error(), "generating " + label));
  return {};
}

KmsResult<KeyRecord> KmsCore::Impl::new_key(const CallerIdentity& caller, std::string description,
                                            std::string key_manager, std::optional<std::string> policy,
                                            std::vector<Tag> tags, std::string origin) {
  KeyRecord rec;
  const std::string id = new_key_id();
  const double now = clock();
  const bool external = origin == "EXTERNAL";
  rec.metadata.aws_account_id = kAccount;
  rec.metadata.key_id = id;
  rec.metadata.arn = key_arn(id);
  rec.metadata.creation_date = now;
  rec.metadata.enabled = !external;
  rec.metadata.description = std::move(description);
  rec.metadata.key_state = external ? "PendingImport" : "Enabled";
  rec.metadata.key_manager = key_manager;
  rec.metadata.origin = origin;
  rec.creator_uid = caller.uid;
  if (key_manager == "AWS") {
    rec.policy = managed_policy(caller.uid);
    rec.rotation.enabled = true;
    rec.rotation.period_days = 365;
    rec.rotation.next_rotation_date = now + 365 * kDay;
  } else {
    rec.policy = policy ? *policy : default_policy(caller.uid);
  }
  rec.tags = std::move(tags);
  rec.versions.push_back(KeyVersion{1, hsm_label(id, 1), now, "", 0, !external});
  if (!external) {
    auto g = hsm->generate_aes_key(rec.versions[0].hsm_label, 32);
    if (!g) return Unexpected<KmsError>(from_hsm(g.error(), "CreateKey"));
  }
  auto w = store.write_key(rec);
  if (!w) {
    if (!external) {
      auto d = hsm->destroy_objects(rec.versions[0].hsm_label);  // best effort: no orphan material
      if (!d) log->warn("could not destroy orphaned HSM key {}: {}", rec.versions[0].hsm_label, d.error().message);
    }
    return Unexpected<KmsError>(w.error());
  }
  return rec;
}

KmsResult<KeyRecord> KmsCore::Impl::ensure_default_key(const CallerIdentity& caller) {
  auto lock = store.lock();
  if (!lock) return Unexpected<KmsError>(lock.error());
  auto aliases = store.load_aliases();
  if (!aliases) return Unexpected<KmsError>(aliases.error());
  for (const auto& a : *aliases) {
    if (a.alias_name != kDefaultManagedAlias) continue;
    auto existing = load_existing(a.target_key_id, a.alias_name);
    if (!existing) return existing;
    // A managed key made before every local user could use it: its fixed
    // policy follows this version (the policy is the core's, never a user's).
    if (existing->policy.find("\"auto-kmsfs-1\"") != std::string::npos) {
      existing->policy = managed_policy(existing->creator_uid);
      if (auto w = store.write_key(*existing); !w) return Unexpected<KmsError>(w.error());
      log->info("updated the fixed policy of the managed key {} ({})", kDefaultManagedAlias, existing->metadata.key_id);
    }
    return existing;
  }
  auto rec = new_key(caller, kDefaultKeyDescription, "AWS", std::nullopt, {}, "AWS_KMS");
  if (!rec) return rec;
  aliases->push_back(AliasRecord{kDefaultManagedAlias, rec->metadata.key_id, clock(), clock()});
  auto w = store.write_aliases(*aliases);
  if (!w) return Unexpected<KmsError>(w.error());
  log->info("created the managed key {} ({})", kDefaultManagedAlias, rec->metadata.key_id);
  return rec;
}

KmsResult<KeyRecord> KmsCore::Impl::load_existing(const std::string& key_id, const std::string& ref) {
  auto r = store.load_key(key_id);
  if (!r) return Unexpected<KmsError>(r.error());
  if (!*r) return err(KmsErrorCode::NotFoundException, "Key '" + ref + "' does not exist");
  return std::move(**r);
}

KmsResult<KeyRecord> KmsCore::Impl::resolve(const CallerIdentity& caller, const std::string& ref) {
  if (ref.empty()) return err(KmsErrorCode::ValidationException, "KeyId must not be empty");
  std::string alias;
  std::string key_id;
  if (starts_with(ref, kAliasArnPrefix)) {
    alias = ref.substr(std::string(kArnPrefix).size());
  } else if (starts_with(ref, kKeyArnPrefix)) {
    key_id = ref.substr(std::string(kKeyArnPrefix).size());
  } else if (starts_with(ref, "arn:")) {
    return err(KmsErrorCode::InvalidArnException,
               "ARN '" + ref + "' is not a key or alias ARN of this KMS (" + kArnPrefix + "...)");
  } else if (starts_with(ref, "alias/")) {
    alias = ref;
  } else {
    key_id = ref;
  }
  if (!alias.empty()) {
    auto aliases = store.load_aliases();
    if (!aliases) return Unexpected<KmsError>(aliases.error());
    for (const auto& a : *aliases) {
      if (a.alias_name == alias) return load_existing(a.target_key_id, ref);
    }
    if (alias == kDefaultManagedAlias) return ensure_default_key(caller);
    return err(KmsErrorCode::NotFoundException, "Alias " + alias + " is not found.");
  }
  if (!uuid_from_string(key_id)) return err(KmsErrorCode::NotFoundException, "Key '" + ref + "' does not exist");
  return load_existing(key_id, ref);
}

KmsResult<KeyRecord> KmsCore::Impl::modify(const std::string& key_id,
                                           const std::function<KmsResult<void>(KeyRecord&)>& fn) {
  auto lock = store.lock();
  if (!lock) return Unexpected<KmsError>(lock.error());
  auto rec = load_existing(key_id, key_id);
  if (!rec) return rec;
  if (auto f = fn(*rec); !f) return Unexpected<KmsError>(f.error());
  if (auto w = store.write_key(*rec); !w) return Unexpected<KmsError>(w.error());
  return rec;
}

KmsResult<void> KmsCore::Impl::add_version(KeyRecord& rec, const char* rotation_type) {
  const std::uint32_t v = rec.newest().version + 1;
  const std::string label = hsm_label(rec.metadata.key_id, v);
  if (auto g = generate_fresh(label); !g) return g;
  const double now = clock();
  rec.versions.push_back(KeyVersion{v, label, now, rotation_type, 0, true});
  if (rec.rotation.enabled) rec.rotation.next_rotation_date = now + rec.rotation.period_days * kDay;
  if (std::string(rotation_type) == "ON_DEMAND") rec.rotation.on_demand_start = now;
  log->info("key {} rotated to version {} ({})", rec.metadata.key_id, v, rotation_type);
  return {};
}

// ---------------------------------------------------------------------------
// Impl: authorisation and key states

KmsResult<void> KmsCore::Impl::set_grant_tokens(Call& call, std::vector<std::string> tokens) {
  if (tokens.size() > 10) return err(KmsErrorCode::ValidationException, "GrantTokens may hold at most 10 tokens");
  for (const auto& t : tokens) {
    if (t.empty() || t.size() > 8192) {
      return err(KmsErrorCode::ValidationException, "each of GrantTokens must be 1 to 8192 characters");
    }
  }
  call.grant_tokens = std::move(tokens);
  return {};
}

bool KmsCore::Impl::grant_token_exists(const std::string& token) {
  auto ids = store.list_key_ids();
  if (!ids) return false;
  for (const auto& id : *ids) {
    auto r = store.load_key(id);
    if (!r || !*r) continue;
    for (const auto& g : (*r)->grants) {
      if (g.grant_token == token) return true;
    }
  }
  return false;
}

KmsResult<void> KmsCore::Impl::authorize(Call& call, const KeyRecord& rec, const std::string& action,
                                         const EncryptionContext* ctx) {
  call.add_resource(rec.metadata.arn);
  // Grants act at once here, so a token only has to be genuine: one that
  // names a grant of this key, or (ReEncrypt's other key) of another key.
  for (const auto& t : call.grant_tokens) {
    const bool here = std::any_of(rec.grants.begin(), rec.grants.end(),
                                  [&](const Grant& g) { return g.grant_token == t; });
    if (!here && !grant_token_exists(t)) {
      return err(KmsErrorCode::InvalidGrantTokenException,
                 "a grant token of the request names no grant (retired, revoked or never issued)");
    }
  }
  PolicyRequest pr{action, rec.metadata.arn, &call.principal, ctx};
  const PolicyDecision d = evaluate_key_policy(rec.policy, pr);
  const std::string who = "uid:" + std::to_string(call.caller.uid) +
                          (call.principal.user_name.empty() ? "" : " (" + call.principal.user_name + ")");
  if (d == PolicyDecision::ExplicitDeny) {
    return err(KmsErrorCode::AccessDeniedException, "User: " + who + " is not authorized to perform: " + action +
                                                        " on resource: " + rec.metadata.arn +
                                                        " with an explicit deny in a resource-based policy");
  }
  if (d == PolicyDecision::Allow) return {};
  const std::string op = action.substr(4);  // "kms:Decrypt" -> "Decrypt"
  bool allowed = false;
  for (const auto& g : rec.grants) {
    if (local_principal_matches(g.grantee_principal, call.principal) && is_grant_op_match(g, op, ctx)) {
      if (op != "CreateGrant") return {};
      // The grants this one may create are bounded by it: create_grant
      // checks the new grant against every grant that allowed the call.
      call.create_grant_parents.push_back(g);
      allowed = true;
    }
  }
  if (allowed) return {};
  return err(KmsErrorCode::AccessDeniedException, "User: " + who + " is not authorized to perform: " + action +
                                                      " on resource: " + rec.metadata.arn +
                                                      " because no resource-based policy or grant allows the " +
                                                      action + " action");
}

// What each operation does in each key state, as AWS documents it ("Key
// states of AWS KMS keys": Enabled / Disabled / PendingDeletion /
// PendingImport).
StateRule KmsCore::Impl::state_rule(const std::string& op, const std::string& state) {
  using R = StateRule;
  struct Row {
    const char* op;
    R enabled, disabled, pending_deletion, pending_import;
  };
  static const Row kTable[] = {
      {"Encrypt", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"Decrypt", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"GenerateDataKey", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"GenerateDataKeyWithoutPlaintext", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"ReEncrypt", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"DescribeKey", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"ListAliases", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"CreateAlias", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"UpdateAlias", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"DeleteAlias", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"UpdateKeyDescription", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"EnableKey", R::Allowed, R::Allowed, R::InvalidState, R::InvalidState},
      {"DisableKey", R::Allowed, R::Allowed, R::InvalidState, R::InvalidState},
      {"ScheduleKeyDeletion", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"CancelKeyDeletion", R::InvalidState, R::InvalidState, R::Allowed, R::InvalidState},
      {"EnableKeyRotation", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"DisableKeyRotation", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"GetKeyRotationStatus", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"RotateKeyOnDemand", R::Allowed, R::Disabled, R::InvalidState, R::InvalidState},
      {"ListKeyRotations", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"GetKeyPolicy", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"PutKeyPolicy", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"ListKeyPolicies", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"GetParametersForImport", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"ImportKeyMaterial", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"DeleteImportedKeyMaterial", R::Allowed, R::Allowed, R::Allowed, R::InvalidState},
      {"TagResource", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"UntagResource", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"ListResourceTags", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"CreateGrant", R::Allowed, R::Allowed, R::InvalidState, R::Allowed},
      {"ListGrants", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"RetireGrant", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
      {"RevokeGrant", R::Allowed, R::Allowed, R::Allowed, R::Allowed},
  };
  for (const auto& row : kTable) {
    if (op != row.op) continue;
    if (state == "Enabled") return row.enabled;
    if (state == "Disabled") return row.disabled;
    if (state == "PendingDeletion") return row.pending_deletion;
    if (state == "PendingImport") return row.pending_import;
    return R::InvalidState;
  }
  return R::Allowed;
}

KmsResult<void> KmsCore::Impl::check_state(const KeyRecord& r, const std::string& op) {
  const auto& m = r.metadata;
  switch (state_rule(op, m.key_state)) {
    case StateRule::Allowed:
      return {};
    case StateRule::Disabled:
      return err(KmsErrorCode::DisabledException, m.arn + " is disabled.");
    case StateRule::Unsupported:
      return err(KmsErrorCode::UnsupportedOperationException, op + " is not supported for " + m.arn);
    case StateRule::InvalidState:
      break;
  }
  if (m.key_state == "PendingDeletion") return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is pending deletion.");
  if (m.key_state == "PendingImport") return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is pending import.");
  return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is " + m.key_state + ", which does not allow " + op + ".");
}

KmsResult<void> KmsCore::Impl::check_not_managed(const KeyRecord& rec, const std::string& op) const {
  if (rec.metadata.key_manager != "AWS") return {};
  return err(KmsErrorCode::AccessDeniedException,
             rec.metadata.arn + " is a managed key (KeyManager AWS): its policy is fixed and " + op +
                 " is not permitted on it");
}

// ---------------------------------------------------------------------------
// Impl: the envelope

KmsResult<KeyVersion> KmsCore::Impl::reserve_wrap(const KeyRecord& rec) {
  const KeyVersion& newest = rec.newest();
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = wrap_left.find(newest.hsm_label);
    if (it != wrap_left.end() && it->second > 0) {
      --it->second;
      return newest;
    }
  }
  // Reserve a block of wraps in the record (under the store lock), rotating
  // first when the block would pass the per-version limit.
  KeyVersion reserved;
  auto updated = modify(rec.metadata.key_id, [&](KeyRecord& r) -> KmsResult<void> {
    if (r.newest().wrap_count + opts.wrap_reservation > opts.wrap_limit_per_version) {
      if (r.metadata.origin == "EXTERNAL") {
        return err(KmsErrorCode::LimitExceededException,
                   r.metadata.arn + " has used its imported material for the maximum number of wraps; "
                                    "create a new key and re-encrypt");
      }
      if (auto a = add_version(r, "AUTOMATIC"); !a) return a;
      log->warn("key {} reached its wrap limit: rotated to version {}", r.metadata.key_id, r.newest().version);
    }
    r.versions.back().wrap_count += opts.wrap_reservation;
    reserved = r.versions.back();
    return {};
  });
  if (!updated) return Unexpected<KmsError>(updated.error());
  std::lock_guard<std::mutex> lock(mu);
  wrap_left[reserved.hsm_label] += opts.wrap_reservation - 1;
  return reserved;
}

KmsResult<KmsCore::Impl::PreparedWrap> KmsCore::Impl::prepare_wrap(const KeyRecord& rec, std::size_t plaintext_size,
                                                                  const EncryptionContext& ctx) {
  auto version = reserve_wrap(rec);
  if (!version) return Unexpected<KmsError>(version.error());
  PreparedWrap w;
  auto uuid = uuid_from_string(rec.metadata.key_id);
  if (!uuid) return err(KmsErrorCode::KMSInternalException, "key record has an invalid key id");
  w.blob.key_uuid = *uuid;
  w.blob.key_version = version->version;
  crypto::random_public_bytes(w.blob.iv);  // the IV is stored in the clear in the blob
  w.blob.ciphertext_and_tag.resize(plaintext_size + CiphertextBlob::kTagSize);  // header_bytes() reads the size
  auto header = w.blob.header_bytes();
  auto context = canonical_encryption_context(ctx);
  w.aad.assign(header.begin(), header.end());
  w.aad.insert(w.aad.end(), context.begin(), context.end());
  w.hsm_label = version->hsm_label;
  return w;
}

KmsResult<Bytes> KmsCore::Impl::finish_wrap(PreparedWrap& w, HsmResult<std::vector<std::uint8_t>> ct,
                                            std::size_t plaintext_size, const KeyRecord& rec, const char* op) {
  if (!ct) return Unexpected<KmsError>(from_hsm(ct.error(), std::string(op) + " with " + rec.metadata.arn));
  if (ct->size() != plaintext_size + CiphertextBlob::kTagSize) {
    return err(KmsErrorCode::KMSInternalException, "the HSM returned a ciphertext of unexpected length");
  }
  w.blob.ciphertext_and_tag = std::move(*ct);
  return w.blob.encode();
}

KmsResult<Bytes> KmsCore::Impl::wrap(const KeyRecord& rec, std::span<const std::uint8_t> plaintext,
                                     const EncryptionContext& ctx, const char* op) {
  auto w = prepare_wrap(rec, plaintext.size(), ctx);
  if (!w) return Unexpected<KmsError>(std::move(w).error());
  return finish_wrap(*w, hsm->encrypt_gcm(w->hsm_label, w->blob.iv, w->aad, plaintext), plaintext.size(), rec, op);
}

KmsResult<crypto::SecureBuffer> KmsCore::Impl::unwrap(Call& call, const Bytes& blob_bytes, const EncryptionContext& ctx,
                                                      const std::optional<std::string>& expected_key,
                                                      const char* action, const char* operation,
                                                      KeyRecord* source_out) {
  auto blob = CiphertextBlob::decode(blob_bytes);
  if (!blob) return err(KmsErrorCode::InvalidCiphertextException, "the ciphertext blob is invalid: " + blob.error());
  const std::string key_id = uuid_to_string(blob->key_uuid);
  if (expected_key) {
    auto named = resolve(call.caller, *expected_key);
    if (!named) return Unexpected<KmsError>(std::move(named).error());
    if (named->metadata.key_id != key_id) {
      return err(KmsErrorCode::IncorrectKeyException,
                 "the key " + *expected_key + " did not encrypt this ciphertext (it names " + key_arn(key_id) + ")");
    }
  }
  auto rec = load_existing(key_id, key_id);
  if (!rec) {
    // A blob of a deleted key: AWS answers as for any unusable ciphertext.
    if (rec.error().code == KmsErrorCode::NotFoundException) {
      call.add_resource(key_arn(key_id));
      return err(KmsErrorCode::InvalidCiphertextException,
                 "the ciphertext names " + key_arn(key_id) + ", which does not exist (deleted?)");
    }
    return Unexpected<KmsError>(std::move(rec).error());
  }
  if (auto a = authorize(call, *rec, action, &ctx); !a) return Unexpected<KmsError>(a.error());
  if (auto s = check_state(*rec, operation); !s) return Unexpected<KmsError>(s.error());
  const KeyVersion* v = rec->find_version(blob->key_version);
  if (v == nullptr) {
    return err(KmsErrorCode::InvalidCiphertextException, "the ciphertext names version " +
                                                             std::to_string(blob->key_version) + " of " +
                                                             rec->metadata.arn + ", which does not exist");
  }
  if (!v->material) {
    return err(KmsErrorCode::KMSInvalidStateException,
               "the key material of " + rec->metadata.arn + " version " + std::to_string(v->version) + " was deleted");
  }
  auto header = blob->header_bytes();
  auto context = canonical_encryption_context(ctx);
  std::vector<std::uint8_t> aad(header.begin(), header.end());
  aad.insert(aad.end(), context.begin(), context.end());
  auto pt = hsm->decrypt_gcm(v->hsm_label, blob->iv, aad, blob->ciphertext_and_tag);
  if (!pt) {
    log->debug("{} {} v{} refused: {}", operation, key_id, v->version, pt.error().message);
    return Unexpected<KmsError>(from_hsm(pt.error(), std::string(operation) + " with " + rec->metadata.arn));
  }
  if (source_out != nullptr) *source_out = std::move(*rec);
  return std::move(*pt);
}

KmsResult<std::string> KmsCore::Impl::key_check_value(const std::string& label) {
  const std::array<std::uint8_t, 12> iv{};
  const std::array<std::uint8_t, 32> zeros{};
  static const std::string kAad = "kmsfs:key-check-value";
  auto ct = hsm->encrypt_gcm(label, iv, std::span(reinterpret_cast<const std::uint8_t*>(kAad.data()), kAad.size()),
                             zeros);
  if (!ct) return Unexpected<KmsError>(from_hsm(ct.error(), "computing the key check value"));
  return crypto::to_hex(crypto::sha256(*ct));
}

// ---------------------------------------------------------------------------
// Impl: maintenance

void KmsCore::Impl::audit_service_event(const std::string& event_name, const KeyRecord& rec, const std::string& note) {
  json e{{"eventVersion", "1.08"},
         {"eventTime", iso8601_utc(clock())},
         {"eventSource", "kms.amazonaws.com"},
         {"eventName", event_name},
         {"eventType", "AwsServiceEvent"},
         {"awsRegion", "local"},
         {"userIdentity", {{"type", "KmsCore"}, {"invokedBy", "kms.amazonaws.com"}, {"pid", ::getpid()}}},
         {"requestParameters", {{"keyId", rec.metadata.arn}}},
         {"serviceEventDetails", {{"note", note}}},
         {"requestID", random_hex(16)},
         {"eventID", random_hex(16)},
         {"readOnly", false},
         {"resources", {{{"ARN", rec.metadata.arn}, {"accountId", kAccount}, {"type", "AWS::KMS::Key"}}}},
         {"recipientAccountId", kAccount},
         {"managementEvent", true},
         {"eventCategory", "Management"}};
  auto a = audit.append(e, AuditDurability::Durable);
  if (!a) log->error("{}: the audit record could not be written: {}", event_name, a.error().message);
}

KmsResult<void> KmsCore::Impl::destroy_material(KeyRecord& rec) {
  for (auto& v : rec.versions) {
    auto d = hsm->destroy_objects(v.hsm_label);
    if (!d) return Unexpected<KmsError>(from_hsm(d.error(), "destroying " + v.hsm_label));
    v.material = false;
  }
  return {};
}

// Crash-safe in this order: material destroyed (idempotent), aliases
// removed, record removed. A crash leaves a record that the next pass
// finishes deleting.
KmsResult<void> KmsCore::Impl::delete_key_now(const std::string& key_id) {
  KeyRecord rec;
  {
    auto lock = store.lock();
    if (!lock) return Unexpected<KmsError>(lock.error());
    auto r = store.load_key(key_id);
    if (!r) return Unexpected<KmsError>(r.error());
    if (!*r) return {};
    rec = std::move(**r);
    if (rec.metadata.key_state != "PendingDeletion" || !rec.metadata.deletion_date ||
        *rec.metadata.deletion_date > clock()) {
      return {};  // cancelled meanwhile
    }
    auto done = delete_locked(rec);
    if (!done) return done;
  }  // the store lock is released before auditing
  log->info("deleted key {}: its material is destroyed in the HSM", key_id);
  audit_service_event("DeleteKey", rec, "the waiting period ended; every version's key material was destroyed");
  return {};
}

KmsResult<void> KmsCore::Impl::delete_locked(KeyRecord& rec) {
  const std::string key_id = rec.metadata.key_id;
  if (auto d = destroy_material(rec); !d) return d;
  if (!rec.import.wrapping_label.empty()) {
    auto d = hsm->destroy_objects(rec.import.wrapping_label);
    if (!d) return Unexpected<KmsError>(from_hsm(d.error(), "destroying " + rec.import.wrapping_label));
  }
  auto aliases = store.load_aliases();
  if (!aliases) return Unexpected<KmsError>(aliases.error());
  const auto before = aliases->size();
  std::erase_if(*aliases, [&](const AliasRecord& a) { return a.target_key_id == key_id; });
  if (aliases->size() != before) {
    if (auto w = store.write_aliases(*aliases); !w) return w;
  }
  return store.delete_key(key_id);
}

KmsResult<void> KmsCore::Impl::maintain() {
  auto ids = store.list_key_ids();
  if (!ids) return Unexpected<KmsError>(ids.error());
  KmsResult<void> first_error;
  auto note = [&](KmsResult<void> r) {
    if (!r && first_error) first_error = std::move(r);
  };
  for (const auto& id : *ids) {
    auto loaded = store.load_key(id);
    if (!loaded || !*loaded) continue;
    const KeyRecord& rec = **loaded;
    const double now = clock();
    const auto& m = rec.metadata;
    if (m.key_state == "PendingDeletion" && m.deletion_date && *m.deletion_date <= now) {
      note(delete_key_now(id));
      continue;
    }
    if (m.valid_to && *m.valid_to <= now && m.origin == "EXTERNAL" && rec.newest().material) {
      KeyRecord changed;
      auto r = modify(id, [&](KeyRecord& k) -> KmsResult<void> {
        if (!k.metadata.valid_to || *k.metadata.valid_to > clock() || !k.newest().material) return {};
        if (auto d = destroy_material(k); !d) return d;
        if (k.metadata.key_state != "PendingDeletion") {
          k.metadata.key_state = "PendingImport";
          k.metadata.enabled = false;
        }
        k.metadata.valid_to.reset();
        changed = k;
        return {};
      });
      if (r && !changed.metadata.key_id.empty()) {
        log->info("imported key material of {} expired and was deleted", id);
        audit_service_event("DeleteExpiredKeyMaterial", changed, "the imported key material reached its ValidTo");
      }
      note(r ? KmsResult<void>{} : KmsResult<void>(Unexpected<KmsError>(r.error())));
      continue;
    }
    if (m.key_state == "Enabled" && rec.rotation.enabled && rec.rotation.next_rotation_date &&
        *rec.rotation.next_rotation_date <= now && m.origin != "EXTERNAL") {
      KeyRecord rotated;
      auto r = modify(id, [&](KeyRecord& k) -> KmsResult<void> {
        if (!k.rotation.enabled || !k.rotation.next_rotation_date || *k.rotation.next_rotation_date > clock()) {
          return {};
        }
        if (auto a = add_version(k, "AUTOMATIC"); !a) return a;
        rotated = k;
        return {};
      });
      if (r && !rotated.metadata.key_id.empty()) {
        audit_service_event("RotateKey", rotated,
                            "automatic rotation to version " + std::to_string(rotated.newest().version));
      }
      note(r ? KmsResult<void>{} : KmsResult<void>(Unexpected<KmsError>(r.error())));
    }
  }
  return first_error;
}

// ---------------------------------------------------------------------------
// KmsCore

namespace {
// Test builds (KMSFS_BUILD_TESTS) honour KMSFS_TEST_CLOCK_OFFSET (seconds
// added to the clock) so that integration tests can let a deletion window
// or rotation period pass; other builds ignore it.
Clock with_test_offset(Clock clock) {
#ifdef KMSFS_TEST_HOOKS
  if (const char* v = std::getenv("KMSFS_TEST_CLOCK_OFFSET"); v != nullptr && *v != '\0') {
    const double offset = std::strtod(v, nullptr);
    named_logger("kmsfs.kms")->warn("KMSFS_TEST_CLOCK_OFFSET: the KMS clock runs {} s ahead", offset);
    return [clock, offset] { return clock() + offset; };
  }
#endif
  return clock;
}
}  // namespace

KmsCore::KmsCore(std::string state_dir, std::unique_ptr<Hsm> hsm, Clock clock, KmsCoreOptions options)
    : impl_(std::make_unique<Impl>(std::move(state_dir), std::move(hsm), with_test_offset(std::move(clock)),
                                   options)) {
  impl_->maybe_maintain();  // deletions and rotations that fell due while no core ran
  if (impl_->opts.background_maintenance && impl_->opts.maintenance_interval_seconds > 0) {
    impl_->maintainer = std::thread([impl = impl_.get()] {
      const auto period = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::duration<double>(impl->opts.maintenance_interval_seconds));
      std::unique_lock<std::mutex> lock(impl->maintainer_mu);
      while (!impl->maintainer_cv.wait_for(lock, period, [impl] { return impl->maintainer_stop; })) {
        lock.unlock();
        impl->maybe_maintain();  // logs its own failures; retried next period
        lock.lock();
      }
    });
  }
}

KmsCore::~KmsCore() {
  if (impl_->maintainer.joinable()) {
    {
      std::lock_guard<std::mutex> lock(impl_->maintainer_mu);
      impl_->maintainer_stop = true;
    }
    impl_->maintainer_cv.notify_all();
    impl_->maintainer.join();
  }
}

KmsResult<void> KmsCore::run_maintenance() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->last_maintenance = impl_->clock();
  }
  return impl_->maintain();
}

KmsCore::AuditSyncState KmsCore::audit_sync_state() const {
  const auto c = impl_->audit.counters();
  return AuditSyncState{c.appended, c.synced};
}

KmsResult<CreateKeyResponse> KmsCore::create_key(const CallerIdentity& caller, const CreateKeyRequest& req) {
  return impl_->run<CreateKeyResponse>(caller, "CreateKey", false, [&](Call& call) -> KmsResult<CreateKeyResponse> {
    call.params = Impl::audit_params(json(req));
    if (req.key_usage != "ENCRYPT_DECRYPT") {
      return err(KmsErrorCode::UnsupportedOperationException, "KeyUsage " + req.key_usage + " is not supported");
    }
    if (req.key_spec != "SYMMETRIC_DEFAULT") {
      return err(KmsErrorCode::UnsupportedOperationException, "KeySpec " + req.key_spec + " is not supported");
    }
    if (req.origin != "AWS_KMS" && req.origin != "EXTERNAL") {
      return err(KmsErrorCode::UnsupportedOperationException, "Origin must be AWS_KMS or EXTERNAL, not " + req.origin);
    }
    if (req.description.size() > 8192) {
      return err(KmsErrorCode::ValidationException, "Description is longer than 8192 characters");
    }
    if (auto t = validate_tags(req.tags); !t) return Unexpected<KmsError>(t.error());
    if (req.policy) {
      if (req.policy->size() > 32768) return err(KmsErrorCode::LimitExceededException, "the key policy exceeds 32768 bytes");
      auto v = validate_key_policy(*req.policy);
      if (!v) return err(KmsErrorCode::MalformedPolicyDocumentException, "the key policy is malformed: " + v.error());
      if (!req.bypass_policy_lockout_safety_check) {
        PolicyRequest pr{"kms:PutKeyPolicy", std::string(kKeyArnPrefix) + "*", &call.principal, nullptr};
        if (evaluate_key_policy(*req.policy, pr) != PolicyDecision::Allow) {
          return err(KmsErrorCode::MalformedPolicyDocumentException,
                     "The new key policy will not allow you to update the key policy in the future "
                     "(use BypassPolicyLockoutSafetyCheck to create it anyway)");
        }
      }
    }
    auto rec = impl_->new_key(caller, req.description, "CUSTOMER", req.policy, req.tags, req.origin);
    if (!rec) return Unexpected<KmsError>(std::move(rec).error());
    call.add_resource(rec->metadata.arn);
    call.params["keyId"] = rec->metadata.key_id;
    impl_->log->debug("CreateKey {} by uid {}", rec->metadata.key_id, caller.uid);
    return CreateKeyResponse{std::move(rec->metadata)};
  });
}

KmsResult<DescribeKeyResponse> KmsCore::describe_key(const CallerIdentity& caller, const DescribeKeyRequest& req) {
  return impl_->run<DescribeKeyResponse>(caller, "DescribeKey", true, [&](Call& call) -> KmsResult<DescribeKeyResponse> {
    call.params = {{"keyId", req.key_id}};
    auto rec = impl_->resolve(caller, req.key_id);
    if (!rec) return Unexpected<KmsError>(std::move(rec).error());
    if (auto a = impl_->authorize(call, *rec, "kms:DescribeKey", nullptr); !a) return Unexpected<KmsError>(a.error());
    return DescribeKeyResponse{std::move(rec->metadata)};
  });
}

KmsResult<ListKeysResponse> KmsCore::list_keys(const CallerIdentity& caller, const ListKeysRequest& req) {
  return impl_->run<ListKeysResponse>(caller, "ListKeys", true, [&](Call& call) -> KmsResult<ListKeysResponse> {
    call.params = Impl::audit_params(json(req));
    const int limit = req.limit.value_or(100);
    if (limit < 1 || limit > 1000) return err(KmsErrorCode::ValidationException, "Limit must be between 1 and 1000");
    auto ids = impl_->store.list_key_ids();
    if (!ids) return Unexpected<KmsError>(std::move(ids).error());
    auto it = ids->begin();
    if (req.marker) {
      if (!uuid_from_string(*req.marker)) return err(KmsErrorCode::InvalidMarkerException, "Marker is invalid");
      it = std::lower_bound(ids->begin(), ids->end(), *req.marker);
    }
    ListKeysResponse out;
    for (; it != ids->end() && out.keys.size() < static_cast<std::size_t>(limit); ++it) {
      out.keys.push_back(KeyListEntry{*it, key_arn(*it)});
    }
    if (it != ids->end()) {
      out.truncated = true;
      out.next_marker = *it;
    }
    return out;
  });
}

KmsResult<void> KmsCore::create_alias(const CallerIdentity& caller, const CreateAliasRequest& req) {
  auto r = impl_->run<bool>(caller, "CreateAlias", false, [&](Call& call) -> KmsResult<bool> {
    call.params = Impl::audit_params(json(req));
    if (auto v = validate_alias_name(req.alias_name); !v) return Unexpected<KmsError>(v.error());
    const std::string& target = req.target_key_id;
    if (starts_with(target, "alias/") || starts_with(target, kAliasArnPrefix)) {
      return err(KmsErrorCode::ValidationException, "TargetKeyId must be a key id or key ARN, not an alias");
    }
    auto rec = impl_->resolve(caller, target);
    if (!rec) return Unexpected<KmsError>(std::move(rec).error());
    if (auto a = impl_->authorize(call, *rec, "kms:CreateAlias", nullptr); !a) return Unexpected<KmsError>(a.error());
    if (auto m = impl_->check_not_managed(*rec, "CreateAlias"); !m) return Unexpected<KmsError>(m.error());
    if (auto s = Impl::check_state(*rec, "CreateAlias"); !s) return Unexpected<KmsError>(s.error());
    auto lock = impl_->store.lock();
    if (!lock) return Unexpected<KmsError>(std::move(lock).error());
    auto aliases = impl_->store.load_aliases();  // re-read under the lock
    if (!aliases) return Unexpected<KmsError>(std::move(aliases).error());
    for (const auto& a : *aliases) {
      if (a.alias_name == req.alias_name) {
        return err(KmsErrorCode::AlreadyExistsException,
                   "An alias with the name " + std::string(kArnPrefix) + req.alias_name + " already exists");
      }
    }
    aliases->push_back(AliasRecord{req.alias_name, rec->metadata.key_id, impl_->clock(), impl_->clock()});
    if (auto w = impl_->store.write_aliases(*aliases); !w) return Unexpected<KmsError>(w.error());
    return true;
  });
  if (!r) return Unexpected<KmsError>(std::move(r).error());
  return {};
}

KmsResult<ListAliasesResponse> KmsCore::list_aliases(const CallerIdentity& caller, const ListAliasesRequest& req) {
  return impl_->run<ListAliasesResponse>(caller, "ListAliases", true, [&](Call& call) -> KmsResult<ListAliasesResponse> {
    call.params = Impl::audit_params(json(req));
    const int limit = req.limit.value_or(50);
    if (limit < 1 || limit > 100) return err(KmsErrorCode::ValidationException, "Limit must be between 1 and 100");
    std::optional<std::string> filter;
    if (req.key_id) {
      auto rec = impl_->resolve(caller, *req.key_id);
      if (!rec) return Unexpected<KmsError>(std::move(rec).error());
      filter = rec->metadata.key_id;
      call.add_resource(rec->metadata.arn);
    }
    auto aliases = impl_->store.load_aliases();
    if (!aliases) return Unexpected<KmsError>(std::move(aliases).error());
    ListAliasesResponse out;
    for (const auto& a : *aliases) {
      if (filter && a.target_key_id != *filter) continue;
      if (req.marker && a.alias_name < *req.marker) continue;
      if (out.aliases.size() == static_cast<std::size_t>(limit)) {
        out.truncated = true;
        out.next_marker = a.alias_name;
        break;
      }
      out.aliases.push_back(AliasListEntry{a.alias_name, kArnPrefix + a.alias_name, a.target_key_id, a.creation_date,
                                           a.last_updated_date});
    }
    return out;
  });
}

namespace {
KmsResult<std::size_t> data_key_size(const std::optional<std::string>& key_spec, const std::optional<int>& number_of_bytes) {
  if (key_spec.has_value() == number_of_bytes.has_value()) {
    return err(KmsErrorCode::ValidationException, "specify exactly one of KeySpec and NumberOfBytes");
  }
  if (key_spec) {
    if (*key_spec == "AES_256") return std::size_t{32};
    if (*key_spec == "AES_128") return std::size_t{16};
    return err(KmsErrorCode::ValidationException, "KeySpec must be AES_256 or AES_128, not '" + *key_spec + "'");
  }
  if (*number_of_bytes < 1 || *number_of_bytes > 1024) {
    return err(KmsErrorCode::ValidationException, "NumberOfBytes must be between 1 and 1024");
  }
  return static_cast<std::size_t>(*number_of_bytes);
}
}  // namespace

// GenerateDataKey and GenerateDataKeyWithoutPlaintext.
static KmsResult<GenerateDataKeyResponse> generate_data_key_in(KmsCore::Impl& impl, Call& call,
                                                               const GenerateDataKeyRequest& req, const char* op) {
  auto n = data_key_size(req.key_spec, req.number_of_bytes);
  if (!n) return Unexpected<KmsError>(n.error());
  if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
  auto rec = impl.resolve(call.caller, req.key_id);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  if (auto a = impl.authorize(call, *rec, std::string("kms:") + op, &req.encryption_context); !a) {
    return Unexpected<KmsError>(a.error());
  }
  if (auto s = KmsCore::Impl::check_state(*rec, op); !s) return Unexpected<KmsError>(s.error());
  // The key from the HSM's generator and its wrap in one HSM call.
  auto w = impl.prepare_wrap(*rec, *n, req.encryption_context);
  if (!w) return Unexpected<KmsError>(std::move(w).error());
  crypto::SecureBuffer plaintext(*n);
  auto blob = impl.finish_wrap(*w, impl.hsm->generate_and_encrypt_gcm(w->hsm_label, w->blob.iv, w->aad, plaintext.span()),
                               *n, *rec, op);
  if (!blob) return Unexpected<KmsError>(std::move(blob).error());
  return GenerateDataKeyResponse{rec->metadata.arn, std::move(plaintext), std::move(*blob)};
}

KmsResult<GenerateDataKeyResponse> KmsCore::generate_data_key(const CallerIdentity& caller,
                                                              const GenerateDataKeyRequest& req) {
  return impl_->run<GenerateDataKeyResponse>(caller, "GenerateDataKey", true,
                                             [&](Call& call) -> KmsResult<GenerateDataKeyResponse> {
                                               call.params = Impl::audit_params(json(req));
                                               call.plaintext = true;
                                               if (auto t = Impl::set_grant_tokens(call, req.grant_tokens); !t) {
                                                 return Unexpected<KmsError>(t.error());
                                               }
                                               return generate_data_key_in(*impl_, call, req, "GenerateDataKey");
                                             });
}

KmsResult<json> KmsCore::generate_data_key_without_plaintext(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "GenerateDataKeyWithoutPlaintext", true, body, [&](Call& call) -> KmsResult<json> {
    GenerateDataKeyRequest req;
    req.key_id = req_str(body, "KeyId");
    req.encryption_context = opt_ctx(body, "EncryptionContext");
    req.key_spec = opt_str(body, "KeySpec");
    if (auto n = opt_int(body, "NumberOfBytes")) req.number_of_bytes = static_cast<int>(*n);
    auto r = generate_data_key_in(*impl_, call, req, "GenerateDataKeyWithoutPlaintext");
    if (!r) return Unexpected<KmsError>(std::move(r).error());
    return json{{"CiphertextBlob", crypto::to_base64(r->ciphertext_blob)}, {"KeyId", r->key_id}};
  });
}

KmsResult<DecryptResponse> KmsCore::decrypt(const CallerIdentity& caller, const DecryptRequest& req) {
  return impl_->run<DecryptResponse>(caller, "Decrypt", true, [&](Call& call) -> KmsResult<DecryptResponse> {
    call.params = {{"encryptionContext", context_json(req.encryption_context)},
                   {"encryptionAlgorithm", req.encryption_algorithm}};
    if (req.key_id) call.params["keyId"] = *req.key_id;
    call.plaintext = true;
    if (auto t = Impl::set_grant_tokens(call, req.grant_tokens); !t) return Unexpected<KmsError>(t.error());
    if (auto a = validate_algorithm(req.encryption_algorithm); !a) return Unexpected<KmsError>(a.error());
    if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
    KeyRecord rec;
    auto pt = impl_->unwrap(call, req.ciphertext_blob, req.encryption_context, req.key_id, "kms:Decrypt", "Decrypt", &rec);
    if (!pt) return Unexpected<KmsError>(std::move(pt).error());
    if (!req.key_id) call.params["keyId"] = rec.metadata.arn;
    return DecryptResponse{rec.metadata.arn, std::move(*pt), "SYMMETRIC_DEFAULT"};
  });
}

KmsResult<EncryptResponse> KmsCore::encrypt(const CallerIdentity& caller, const EncryptRequest& req) {
  return impl_->run<EncryptResponse>(caller, "Encrypt", true, [&](Call& call) -> KmsResult<EncryptResponse> {
    call.params = {{"keyId", req.key_id},
                   {"encryptionContext", context_json(req.encryption_context)},
                   {"encryptionAlgorithm", req.encryption_algorithm}};
    if (auto t = Impl::set_grant_tokens(call, req.grant_tokens); !t) return Unexpected<KmsError>(t.error());
    if (auto a = validate_algorithm(req.encryption_algorithm); !a) return Unexpected<KmsError>(a.error());
    if (req.plaintext.empty() || req.plaintext.size() > CiphertextBlob::kMaxPlaintext) {
      return err(KmsErrorCode::ValidationException, "Plaintext must be 1 to 4096 bytes");
    }
    if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
    auto rec = impl_->resolve(caller, req.key_id);
    if (!rec) return Unexpected<KmsError>(std::move(rec).error());
    if (auto a = impl_->authorize(call, *rec, "kms:Encrypt", &req.encryption_context); !a) {
      return Unexpected<KmsError>(a.error());
    }
    if (auto s = Impl::check_state(*rec, "Encrypt"); !s) return Unexpected<KmsError>(s.error());
    auto blob = impl_->wrap(*rec, req.plaintext.span(), req.encryption_context, "Encrypt");
    if (!blob) return Unexpected<KmsError>(std::move(blob).error());
    return EncryptResponse{rec->metadata.arn, std::move(*blob), "SYMMETRIC_DEFAULT"};
  });
}

KmsResult<json> KmsCore::re_encrypt(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ReEncrypt", true, body, [&](Call& call) -> KmsResult<json> {
    const Bytes blob = req_b64(body, "CiphertextBlob");
    const EncryptionContext src_ctx = opt_ctx(body, "SourceEncryptionContext");
    const EncryptionContext dst_ctx = opt_ctx(body, "DestinationEncryptionContext");
    const std::string dst_ref = req_str(body, "DestinationKeyId");
    const auto src_ref = opt_str(body, "SourceKeyId");
    for (const char* f : {"SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm"}) {
      if (auto a = opt_str(body, f)) {
        if (auto v = validate_algorithm(*a); !v) return Unexpected<KmsError>(v.error());
      }
    }
    if (auto c = validate_context(src_ctx); !c) return Unexpected<KmsError>(c.error());
    if (auto c = validate_context(dst_ctx); !c) return Unexpected<KmsError>(c.error());
    // The destination is resolved (and authorised) before anything is
    // decrypted; the plaintext exists only in secure memory in this scope.
    auto dst = impl_->resolve(caller, dst_ref);
    if (!dst) return Unexpected<KmsError>(std::move(dst).error());
    KeyRecord src;
    auto pt = impl_->unwrap(call, blob, src_ctx, src_ref, "kms:ReEncryptFrom", "ReEncrypt", &src);
    if (!pt) return Unexpected<KmsError>(std::move(pt).error());
    if (auto a = impl_->authorize(call, *dst, "kms:ReEncryptTo", &dst_ctx); !a) return Unexpected<KmsError>(a.error());
    if (auto s = Impl::check_state(*dst, "ReEncrypt"); !s) return Unexpected<KmsError>(s.error());
    auto out = impl_->wrap(*dst, pt->span(), dst_ctx, "ReEncrypt");
    if (!out) return Unexpected<KmsError>(std::move(out).error());
    return json{{"CiphertextBlob", crypto::to_base64(*out)},
                {"SourceKeyId", src.metadata.arn},
                {"KeyId", dst->metadata.arn},
                {"SourceEncryptionAlgorithm", "SYMMETRIC_DEFAULT"},
                {"DestinationEncryptionAlgorithm", "SYMMETRIC_DEFAULT"}};
  });
}

KmsResult<GenerateRandomResponse> KmsCore::generate_random(const CallerIdentity& caller,
                                                           const GenerateRandomRequest& req) {
  return impl_->run<GenerateRandomResponse>(caller, "GenerateRandom", true,
                                            [&](Call& call) -> KmsResult<GenerateRandomResponse> {
                                              call.params = {{"numberOfBytes", req.number_of_bytes}};
                                              call.plaintext = true;
                                              if (req.number_of_bytes < 1 || req.number_of_bytes > 1024) {
                                                return err(KmsErrorCode::ValidationException,
                                                           "NumberOfBytes must be between 1 and 1024");
                                              }
                                              crypto::SecureBuffer out(static_cast<std::size_t>(req.number_of_bytes));
                                              auto r = impl_->hsm->generate_random(out.span());
                                              if (!r) return Unexpected<KmsError>(impl_->from_hsm(r.error(), "GenerateRandom"));
                                              return GenerateRandomResponse{std::move(out)};
                                            });
}

// ---------------------------------------------------------------------------
// EmbeddedKeyService

EmbeddedKeyService::EmbeddedKeyService(std::unique_ptr<KmsCore> core, CallerIdentity caller)
    : core_(std::move(core)), caller_(caller) {}

KmsResult<CreateKeyResponse> EmbeddedKeyService::create_key(const CreateKeyRequest& req) {
  return core_->create_key(caller_, req);
}
KmsResult<DescribeKeyResponse> EmbeddedKeyService::describe_key(const DescribeKeyRequest& req) {
  return core_->describe_key(caller_, req);
}
KmsResult<ListKeysResponse> EmbeddedKeyService::list_keys(const ListKeysRequest& req) {
  return core_->list_keys(caller_, req);
}
KmsResult<void> EmbeddedKeyService::create_alias(const CreateAliasRequest& req) {
  return core_->create_alias(caller_, req);
}
KmsResult<ListAliasesResponse> EmbeddedKeyService::list_aliases(const ListAliasesRequest& req) {
  return core_->list_aliases(caller_, req);
}
KmsResult<GenerateDataKeyResponse> EmbeddedKeyService::generate_data_key(const GenerateDataKeyRequest& req) {
  return core_->generate_data_key(caller_, req);
}
KmsResult<DecryptResponse> EmbeddedKeyService::decrypt(const DecryptRequest& req) {
  return core_->decrypt(caller_, req);
}
KmsResult<EncryptResponse> EmbeddedKeyService::encrypt(const EncryptRequest& req) {
  return core_->encrypt(caller_, req);
}
KmsResult<GenerateRandomResponse> EmbeddedKeyService::generate_random(const GenerateRandomRequest& req) {
  return core_->generate_random(caller_, req);
}

KmsResult<nlohmann::json> EmbeddedKeyService::call(std::string_view operation, const nlohmann::json& request) {
  return dispatch_kms_request(*core_, caller_, operation, request);
}

}  // namespace kmsfs::keyclient
