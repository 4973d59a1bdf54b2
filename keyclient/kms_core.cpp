#include "keyclient/kms_core.h"
#include "keyclient/kms_dispatch.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>

#include "crypto/random.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/key_store.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

namespace {

constexpr const char* kAccount = "000000000000";
constexpr const char* kArnPrefix = "arn:aws:kms:local:000000000000:";
constexpr const char* kKeyArnPrefix = "arn:aws:kms:local:000000000000:key/";
constexpr const char* kAliasArnPrefix = "arn:aws:kms:local:000000000000:alias/";
constexpr const char* kDefaultKeyDescription = "Default key that protects kmsfs volumes when no other key is defined";
constexpr std::size_t kMaxContextBytes = 8192;

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

std::string key_arn(const std::string& key_id) { return kKeyArnPrefix + key_id; }

std::string new_key_id() {
  std::array<std::uint8_t, 16> u{};
  crypto::random_bytes(u);
  u[6] = static_cast<std::uint8_t>((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = static_cast<std::uint8_t>((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return uuid_to_string(u);
}

std::string hsm_label(const std::string& key_id, std::uint32_t version) {
  return "kmsfs/" + key_id + "/v" + std::to_string(version);
}

std::string default_policy(const CallerIdentity& creator) {
  nlohmann::json principals = nlohmann::json::array({"uid:0"});
  if (creator.uid != 0) principals.push_back("uid:" + std::to_string(creator.uid));
  nlohmann::json p{{"Version", "2012-10-17"},
                   {"Id", "key-default-1"},
                   {"Statement",
                    {{{"Sid", "Enable root and key creator permissions"},
                      {"Effect", "Allow"},
                      {"Principal", {{"Local", principals}}},
                      {"Action", "kms:*"},
                      {"Resource", "*"}}}}};
  return p.dump();
}

Unexpected<KmsError> err(KmsErrorCode c, std::string m) { return kms_error(c, std::move(m)); }

KmsResult<void> validate_context(const EncryptionContext& ctx) {
  std::size_t total = 0;
  for (const auto& [k, v] : ctx) {
    if (k.empty()) return err(KmsErrorCode::ValidationException, "encryption context keys must not be empty");
    total += k.size() + v.size();
  }
  if (total > kMaxContextBytes) {
    return err(KmsErrorCode::ValidationException, "encryption context exceeds 8192 bytes");
  }
  return {};
}

KmsResult<void> validate_algorithm(const std::string& alg) {
  if (alg != "SYMMETRIC_DEFAULT") {
    return err(KmsErrorCode::InvalidKeyUsageException,
               "encryption algorithm " + alg + " is not supported by a SYMMETRIC_DEFAULT key");
  }
  return {};
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
  if (name.size() > 256) {
    return err(KmsErrorCode::ValidationException, "alias name is longer than 256 characters");
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '/' ||
              c == '_' || c == '-';
    if (!ok) {
      return err(KmsErrorCode::ValidationException,
                 "alias name '" + name + "' may contain only a-z A-Z 0-9 / _ -");
    }
  }
  return {};
}

KmsResult<void> validate_tags(const std::vector<Tag>& tags) {
  for (std::size_t i = 0; i < tags.size(); ++i) {
    if (tags[i].tag_key.empty() || tags[i].tag_key.size() > 128) {
      return err(KmsErrorCode::ValidationException, "tag keys must be 1 to 128 characters");
    }
    if (tags[i].tag_value.size() > 256) {
      return err(KmsErrorCode::ValidationException, "tag values must be at most 256 characters");
    }
    for (std::size_t k = 0; k < i; ++k) {
      if (tags[k].tag_key == tags[i].tag_key) {
        return err(KmsErrorCode::ValidationException, "duplicate tag key '" + tags[i].tag_key + "'");
      }
    }
  }
  return {};
}

}  // namespace

CallerIdentity CallerIdentity::of_this_process() {
  return CallerIdentity{::geteuid(), ::getegid(), ::getpid()};
}

double system_clock_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

struct KmsCore::Impl {
  // No mutex of its own: KeyStore guards its cache, the Hsm is thread-safe
  // and cross-process read-modify-writes hold the KeyStore's flock.
  Impl(std::string dir, std::unique_ptr<Hsm> h, Clock c)
      : store(std::move(dir)), hsm(std::move(h)), clock(std::move(c)), log(named_logger("kmsfs.kms")) {}

  KeyStore store;
  std::unique_ptr<Hsm> hsm;
  Clock clock;
  std::shared_ptr<spdlog::logger> log;

  KmsError from_hsm(const HsmError& e, const std::string& what) const {
    switch (e.kind) {
      case HsmError::Kind::AuthenticationFailed:
        return KmsError{KmsErrorCode::InvalidCiphertextException,
                        "the ciphertext is invalid or the encryption context does not match"};
      case HsmError::Kind::KeyNotFound:
        log->error("{}: key material missing from the HSM: {}", what, e.message);
        return KmsError{KmsErrorCode::KMSInternalException, what + ": key material is missing from the HSM (" + e.message + ")"};
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

  // Generates version 1 in the HSM and stores the record. Does not take the
  // store lock (a new key is a new file); the caller may hold it.
  KmsResult<KeyRecord> new_key(const CallerIdentity& caller, std::string description, std::string key_manager,
                               std::optional<std::string> policy, std::vector<Tag> tags) {
    KeyRecord rec;
    const std::string id = new_key_id();
    const double now = clock();
    rec.metadata.aws_account_id = kAccount;
    rec.metadata.key_id = id;
    rec.metadata.arn = key_arn(id);
    rec.metadata.creation_date = now;
    rec.metadata.enabled = true;
    rec.metadata.description = std::move(description);
    rec.metadata.key_state = "Enabled";
    rec.metadata.key_manager = std::move(key_manager);
    rec.policy = policy ? *policy : default_policy(caller);
    rec.tags = std::move(tags);
    rec.versions.push_back(KeyVersion{1, hsm_label(id, 1), now});
    auto g = hsm->generate_aes_key(rec.versions[0].hsm_label, 32);
    if (!g) return Unexpected<KmsError>(from_hsm(g.error(), "CreateKey"));
    auto w = store.write_key(rec);
    if (!w) {
      auto d = hsm->destroy_key(rec.versions[0].hsm_label);  // best effort: no orphan material
      if (!d) log->warn("could not destroy orphaned HSM key {}: {}", rec.versions[0].hsm_label, d.error().message);
      return Unexpected<KmsError>(w.error());
    }
    return rec;
  }

  // alias/kmsfs/default: created on first reference, under the store lock,
  // so that two processes never create two.
  KmsResult<KeyRecord> ensure_default_key(const CallerIdentity& caller) {
    auto lock = store.lock();
    if (!lock) return Unexpected<KmsError>(lock.error());
    auto aliases = store.load_aliases();
    if (!aliases) return Unexpected<KmsError>(aliases.error());
    for (const auto& a : *aliases) {
      if (a.alias_name == kDefaultManagedAlias) return load_existing(a.target_key_id, a.alias_name);
    }
    auto rec = new_key(caller, kDefaultKeyDescription, "AWS", std::nullopt, {});
    if (!rec) return rec;
    aliases->push_back(AliasRecord{kDefaultManagedAlias, rec->metadata.key_id, clock()});
    auto w = store.write_aliases(*aliases);
    if (!w) return Unexpected<KmsError>(w.error());
    log->info("created the managed key {} ({})", kDefaultManagedAlias, rec->metadata.key_id);
    return rec;
  }

  KmsResult<KeyRecord> load_existing(const std::string& key_id, const std::string& ref) {
    auto r = store.load_key(key_id);
    if (!r) return Unexpected<KmsError>(r.error());
    if (!*r) return err(KmsErrorCode::NotFoundException, "Key '" + ref + "' does not exist");
    return std::move(**r);
  }

  // Accepts a key id, key ARN, alias name or alias ARN.
  KmsResult<KeyRecord> resolve(const CallerIdentity& caller, const std::string& ref) {
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

  static KmsResult<void> check_usable(const KeyRecord& r) {
    const auto& m = r.metadata;
    if (m.key_state == "Enabled") return {};
    if (m.key_state == "Disabled") return err(KmsErrorCode::DisabledException, m.arn + " is disabled.");
    if (m.key_state == "PendingDeletion") {
      return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is pending deletion.");
    }
    if (m.key_state == "PendingImport") {
      return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is pending import.");
    }
    return err(KmsErrorCode::KMSInvalidStateException, m.arn + " is in state " + m.key_state + ".");
  }

  KmsResult<Bytes> wrap(const KeyRecord& rec, std::span<const std::uint8_t> plaintext, const EncryptionContext& ctx,
                        const char* op) {
    const KeyVersion& v = rec.newest();
    CiphertextBlob blob;
    auto uuid = uuid_from_string(rec.metadata.key_id);
    if (!uuid) return err(KmsErrorCode::KMSInternalException, "key record has an invalid key id");
    blob.key_uuid = *uuid;
    blob.key_version = v.version;
    crypto::random_bytes(blob.iv);
    // header_bytes() derives the length field from this size.
    blob.ciphertext_and_tag.resize(plaintext.size() + CiphertextBlob::kTagSize);
    auto header = blob.header_bytes();
    auto context = canonical_encryption_context(ctx);
    std::vector<std::uint8_t> aad(header.begin(), header.end());
    aad.insert(aad.end(), context.begin(), context.end());
    auto ct = hsm->encrypt_gcm(v.hsm_label, blob.iv, aad, plaintext);
    if (!ct) return Unexpected<KmsError>(from_hsm(ct.error(), std::string(op) + " with " + rec.metadata.arn));
    if (ct->size() != plaintext.size() + CiphertextBlob::kTagSize) {
      return err(KmsErrorCode::KMSInternalException, "the HSM returned a ciphertext of unexpected length");
    }
    blob.ciphertext_and_tag = std::move(*ct);
    return blob.encode();
  }
};

KmsCore::KmsCore(std::string state_dir, std::unique_ptr<Hsm> hsm, Clock clock)
    : impl_(std::make_unique<Impl>(std::move(state_dir), std::move(hsm), std::move(clock))) {}
KmsCore::~KmsCore() = default;

KmsResult<CreateKeyResponse> KmsCore::create_key(const CallerIdentity& caller, const CreateKeyRequest& req) {
  if (req.key_usage != "ENCRYPT_DECRYPT") {
    return err(KmsErrorCode::UnsupportedOperationException, "KeyUsage " + req.key_usage + " is not supported");
  }
  if (req.key_spec != "SYMMETRIC_DEFAULT") {
    return err(KmsErrorCode::UnsupportedOperationException, "KeySpec " + req.key_spec + " is not supported");
  }
  if (req.origin == "EXTERNAL") {
    return err(KmsErrorCode::UnsupportedOperationException, "imported key material (Origin EXTERNAL) arrives with issue #3");
  }
  if (req.origin != "AWS_KMS") return err(KmsErrorCode::ValidationException, "Origin must be AWS_KMS or EXTERNAL");
  if (req.description.size() > 8192) {
    return err(KmsErrorCode::ValidationException, "Description is longer than 8192 characters");
  }
  if (auto t = validate_tags(req.tags); !t) return Unexpected<KmsError>(t.error());
  if (req.policy) {
    if (req.policy->size() > 32768) {
      return err(KmsErrorCode::LimitExceededException, "the key policy exceeds 32768 bytes");
    }
    auto parsed = nlohmann::json::parse(*req.policy, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded() || !parsed.is_object()) {
      return err(KmsErrorCode::MalformedPolicyDocumentException, "the key policy is not a JSON object");
    }
  }
  auto rec = impl_->new_key(caller, req.description, "CUSTOMER", req.policy, req.tags);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  impl_->log->debug("CreateKey {} by uid {}", rec->metadata.key_id, caller.uid);
  return CreateKeyResponse{std::move(rec->metadata)};
}

KmsResult<DescribeKeyResponse> KmsCore::describe_key(const CallerIdentity& caller, const DescribeKeyRequest& req) {
  auto rec = impl_->resolve(caller, req.key_id);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  impl_->log->debug("DescribeKey {} by uid {}", rec->metadata.key_id, caller.uid);
  return DescribeKeyResponse{std::move(rec->metadata)};
}

KmsResult<ListKeysResponse> KmsCore::list_keys(const CallerIdentity& caller, const ListKeysRequest& req) {
  const int limit = req.limit.value_or(100);
  if (limit < 1 || limit > 1000) return err(KmsErrorCode::ValidationException, "Limit must be between 1 and 1000");
  auto ids = impl_->store.list_key_ids();
  if (!ids) return Unexpected<KmsError>(std::move(ids).error());
  auto it = ids->begin();
  if (req.marker) {
    if (!uuid_from_string(*req.marker)) return err(KmsErrorCode::ValidationException, "Marker is invalid");
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
  impl_->log->debug("ListKeys by uid {}: {} keys", caller.uid, out.keys.size());
  return out;
}

KmsResult<void> KmsCore::create_alias(const CallerIdentity& caller, const CreateAliasRequest& req) {
  if (auto v = validate_alias_name(req.alias_name); !v) return v;
  const std::string& target = req.target_key_id;
  if (starts_with(target, "alias/") || starts_with(target, kAliasArnPrefix)) {
    return err(KmsErrorCode::ValidationException, "TargetKeyId must be a key id or key ARN, not an alias");
  }
  auto rec = impl_->resolve(caller, target);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  if (rec->metadata.key_state == "PendingDeletion") {
    return err(KmsErrorCode::KMSInvalidStateException, rec->metadata.arn + " is pending deletion.");
  }
  auto lock = impl_->store.lock();
  if (!lock) return Unexpected<KmsError>(std::move(lock).error());
  // Re-read under the lock: another process may have added aliases since.
  auto aliases = impl_->store.load_aliases();
  if (!aliases) return Unexpected<KmsError>(std::move(aliases).error());
  for (const auto& a : *aliases) {
    if (a.alias_name == req.alias_name) {
      return err(KmsErrorCode::AlreadyExistsException, "An alias with the name " + std::string(kArnPrefix) +
                                                            req.alias_name + " already exists");
    }
  }
  aliases->push_back(AliasRecord{req.alias_name, rec->metadata.key_id, impl_->clock()});
  auto w = impl_->store.write_aliases(*aliases);
  if (!w) return w;
  impl_->log->debug("CreateAlias {} -> {} by uid {}", req.alias_name, rec->metadata.key_id, caller.uid);
  return {};
}

KmsResult<ListAliasesResponse> KmsCore::list_aliases(const CallerIdentity& caller, const ListAliasesRequest& req) {
  const int limit = req.limit.value_or(50);
  if (limit < 1 || limit > 100) return err(KmsErrorCode::ValidationException, "Limit must be between 1 and 100");
  std::optional<std::string> filter;
  if (req.key_id) {
    auto rec = impl_->resolve(caller, *req.key_id);
    if (!rec) return Unexpected<KmsError>(std::move(rec).error());
    filter = rec->metadata.key_id;
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
    out.aliases.push_back(AliasListEntry{a.alias_name, kArnPrefix + a.alias_name, a.target_key_id, a.creation_date});
  }
  impl_->log->debug("ListAliases by uid {}: {} aliases", caller.uid, out.aliases.size());
  return out;
}

KmsResult<GenerateDataKeyResponse> KmsCore::generate_data_key(const CallerIdentity& caller,
                                                              const GenerateDataKeyRequest& req) {
  std::size_t n = 0;
  if (req.key_spec.has_value() == req.number_of_bytes.has_value()) {
    return err(KmsErrorCode::ValidationException, "specify exactly one of KeySpec and NumberOfBytes");
  }
  if (req.key_spec) {
    if (*req.key_spec == "AES_256") {
      n = 32;
    } else if (*req.key_spec == "AES_128") {
      n = 16;
    } else {
      return err(KmsErrorCode::ValidationException, "KeySpec must be AES_256 or AES_128, not '" + *req.key_spec + "'");
    }
  } else {
    if (*req.number_of_bytes < 1 || *req.number_of_bytes > 1024) {
      return err(KmsErrorCode::ValidationException, "NumberOfBytes must be between 1 and 1024");
    }
    n = static_cast<std::size_t>(*req.number_of_bytes);
  }
  if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
  auto rec = impl_->resolve(caller, req.key_id);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  if (auto u = Impl::check_usable(*rec); !u) return Unexpected<KmsError>(u.error());

  crypto::SecureBuffer plaintext(n);
  auto r = impl_->hsm->generate_random(plaintext.span());
  if (!r) return Unexpected<KmsError>(impl_->from_hsm(r.error(), "GenerateDataKey"));
  auto blob = impl_->wrap(*rec, plaintext.span(), req.encryption_context, "GenerateDataKey");
  if (!blob) return Unexpected<KmsError>(std::move(blob).error());
  impl_->log->debug("GenerateDataKey {} v{} ({} bytes) by uid {}", rec->metadata.key_id, rec->newest().version, n,
                    caller.uid);
  return GenerateDataKeyResponse{rec->metadata.arn, std::move(plaintext), std::move(*blob)};
}

KmsResult<DecryptResponse> KmsCore::decrypt(const CallerIdentity& caller, const DecryptRequest& req) {
  if (auto a = validate_algorithm(req.encryption_algorithm); !a) return Unexpected<KmsError>(a.error());
  if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
  auto blob = CiphertextBlob::decode(req.ciphertext_blob);
  if (!blob) return err(KmsErrorCode::InvalidCiphertextException, "the ciphertext blob is invalid: " + blob.error());
  const std::string key_id = uuid_to_string(blob->key_uuid);
  if (req.key_id) {
    auto named = impl_->resolve(caller, *req.key_id);
    if (!named) return Unexpected<KmsError>(std::move(named).error());
    if (named->metadata.key_id != key_id) {
      return err(KmsErrorCode::IncorrectKeyException,
                 "the key " + *req.key_id + " did not encrypt this ciphertext (it names " + key_arn(key_id) + ")");
    }
  }
  auto rec = impl_->load_existing(key_id, key_id);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  if (auto u = Impl::check_usable(*rec); !u) return Unexpected<KmsError>(u.error());
  const KeyVersion* v = rec->find_version(blob->key_version);
  if (v == nullptr) {
    return err(KmsErrorCode::InvalidCiphertextException,
               "the ciphertext names version " + std::to_string(blob->key_version) + " of " + rec->metadata.arn +
                   ", which does not exist");
  }
  auto header = blob->header_bytes();
  auto context = canonical_encryption_context(req.encryption_context);
  std::vector<std::uint8_t> aad(header.begin(), header.end());
  aad.insert(aad.end(), context.begin(), context.end());
  auto pt = impl_->hsm->decrypt_gcm(v->hsm_label, blob->iv, aad, blob->ciphertext_and_tag);
  if (!pt) {
    impl_->log->debug("Decrypt {} v{} refused: {}", key_id, v->version, pt.error().message);
    return Unexpected<KmsError>(impl_->from_hsm(pt.error(), "Decrypt with " + rec->metadata.arn));
  }
  impl_->log->debug("Decrypt {} v{} by uid {}", key_id, v->version, caller.uid);
  return DecryptResponse{rec->metadata.arn, std::move(*pt), "SYMMETRIC_DEFAULT"};
}

KmsResult<EncryptResponse> KmsCore::encrypt(const CallerIdentity& caller, const EncryptRequest& req) {
  if (auto a = validate_algorithm(req.encryption_algorithm); !a) return Unexpected<KmsError>(a.error());
  if (req.plaintext.empty() || req.plaintext.size() > CiphertextBlob::kMaxPlaintext) {
    return err(KmsErrorCode::ValidationException, "Plaintext must be 1 to 4096 bytes");
  }
  if (auto c = validate_context(req.encryption_context); !c) return Unexpected<KmsError>(c.error());
  auto rec = impl_->resolve(caller, req.key_id);
  if (!rec) return Unexpected<KmsError>(std::move(rec).error());
  if (auto u = Impl::check_usable(*rec); !u) return Unexpected<KmsError>(u.error());
  auto blob = impl_->wrap(*rec, req.plaintext.span(), req.encryption_context, "Encrypt");
  if (!blob) return Unexpected<KmsError>(std::move(blob).error());
  impl_->log->debug("Encrypt {} v{} by uid {}", rec->metadata.key_id, rec->newest().version, caller.uid);
  return EncryptResponse{rec->metadata.arn, std::move(*blob), "SYMMETRIC_DEFAULT"};
}

KmsResult<GenerateRandomResponse> KmsCore::generate_random(const CallerIdentity& caller,
                                                           const GenerateRandomRequest& req) {
  if (req.number_of_bytes < 1 || req.number_of_bytes > 1024) {
    return err(KmsErrorCode::ValidationException, "NumberOfBytes must be between 1 and 1024");
  }
  crypto::SecureBuffer out(static_cast<std::size_t>(req.number_of_bytes));
  auto r = impl_->hsm->generate_random(out.span());
  if (!r) return Unexpected<KmsError>(impl_->from_hsm(r.error(), "GenerateRandom"));
  impl_->log->debug("GenerateRandom {} bytes by uid {}", req.number_of_bytes, caller.uid);
  return GenerateRandomResponse{std::move(out)};
}

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

KmsResult<nlohmann::json> EmbeddedKeyService::call(std::string_view operation,
                                                   const nlohmann::json& request) {
  return dispatch_kms_request(*core_, caller_, operation, request);
}

}  // namespace kmsfs::keyclient
