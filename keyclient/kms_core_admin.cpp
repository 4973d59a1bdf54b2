// KmsCore: key administration — lifecycle, rotation, aliases, tags,
// policies, grants, imported key material and the audit trail operations.
// Each takes and returns AWS JSON bodies (kms_dispatch.cpp's table).

#include <sys/stat.h>

#include <algorithm>
#include <array>

#include "crypto/encoding.h"
#include "crypto/random.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/kms_core_impl.h"
#include "keyclient/kms_json.h"

namespace kmsfs::keyclient {

namespace {

const std::array<const char*, 9> kGrantOperations = {"Decrypt", "Encrypt", "GenerateDataKey",
                                                     "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
                                                     "ReEncryptTo", "CreateGrant", "RetireGrant", "DescribeKey"};

json grant_json(const Grant& g, const std::string& key_arn_value) {
  json j{{"KeyId", key_arn_value},
         {"GrantId", g.grant_id},
         {"Name", g.name},
         {"CreationDate", g.creation_date},
         {"GranteePrincipal", g.grantee_principal},
         {"IssuingAccount", "uid:" + std::to_string(g.issuing_uid)},
         {"Operations", g.operations}};
  if (!g.retiring_principal.empty()) j["RetiringPrincipal"] = g.retiring_principal;
  if (g.context_equals) j["Constraints"]["EncryptionContextEquals"] = *g.context_equals;
  if (g.context_subset) j["Constraints"]["EncryptionContextSubset"] = *g.context_subset;
  return j;
}

// The import token: "KMIT" ‖ key uuid (16) ‖ token id (16) ‖ valid-to (u64
// BE seconds). It is bound to the record by the token id, which only the
// newest GetParametersForImport stored.
Bytes make_import_token(const std::string& key_id, const std::string& token_id_hex, double valid_to) {
  Bytes t = {'K', 'M', 'I', 'T'};
  auto uuid = uuid_from_string(key_id);
  t.insert(t.end(), uuid->begin(), uuid->end());
  auto id = crypto::from_hex(token_id_hex);
  t.insert(t.end(), id->begin(), id->end());
  const auto v = static_cast<std::uint64_t>(valid_to);
  for (int i = 7; i >= 0; --i) t.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
  return t;
}

std::size_t page_limit(const json& body, std::size_t def, std::size_t max) {
  auto l = opt_int(body, "Limit");
  if (!l) return def;
  if (*l < 1 || static_cast<std::size_t>(*l) > max) {
    throw RequestError{KmsErrorCode::ValidationException, "Limit must be between 1 and " + std::to_string(max)};
  }
  return static_cast<std::size_t>(*l);
}

// Markers are decimal offsets into the listing.
std::size_t page_start(const json& body) {
  auto m = opt_str(body, "Marker");
  if (!m) return 0;
  if (m->empty() || m->size() > 9 || !std::all_of(m->begin(), m->end(), ::isdigit)) {
    throw RequestError{KmsErrorCode::InvalidMarkerException, "Marker '" + *m + "' is invalid"};
  }
  return static_cast<std::size_t>(std::stoul(*m));
}

template <class T, class F>
json page(const std::vector<T>& items, const json& body, std::size_t def, std::size_t max, const char* field, F render) {
  const std::size_t limit = page_limit(body, def, max);
  const std::size_t start = page_start(body);
  json out{{field, json::array()}, {"Truncated", false}};
  for (std::size_t i = start; i < items.size(); ++i) {
    if (out[field].size() == limit) {
      out["Truncated"] = true;
      out["NextMarker"] = std::to_string(i);
      break;
    }
    out[field].push_back(render(items[i]));
  }
  return out;
}

json key_id_only(const KeyRecord& rec) { return json{{"KeyId", rec.metadata.arn}}; }

}  // namespace

KmsResult<KeyRecord> KmsCore::Impl::key_for(Call& call, const json& body, const std::string& op, bool admin) {
  auto rec = resolve(call.caller, req_str(body, "KeyId"));
  if (!rec) return rec;
  if (auto a = authorize(call, *rec, "kms:" + op, nullptr); !a) return Unexpected<KmsError>(a.error());
  if (admin) {
    if (auto m = check_not_managed(*rec, op); !m) return Unexpected<KmsError>(m.error());
  }
  if (auto s = check_state(*rec, op); !s) return Unexpected<KmsError>(s.error());
  return rec;
}

// --- lifecycle -------------------------------------------------------------

KmsResult<json> KmsCore::update_key_description(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "UpdateKeyDescription", false, body, [&](Call& call) -> KmsResult<json> {
    const std::string description = req_str(body, "Description");
    if (description.size() > 8192) return err(KmsErrorCode::ValidationException, "Description is longer than 8192 characters");
    auto rec = impl_->key_for(call, body, "UpdateKeyDescription", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "UpdateKeyDescription"); !s) return s;
      k.metadata.description = description;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::enable_key(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "EnableKey", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "EnableKey", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "EnableKey"); !s) return s;
      k.metadata.key_state = "Enabled";
      k.metadata.enabled = true;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::disable_key(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "DisableKey", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "DisableKey", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "DisableKey"); !s) return s;
      k.metadata.key_state = "Disabled";
      k.metadata.enabled = false;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::schedule_key_deletion(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ScheduleKeyDeletion", false, body, [&](Call& call) -> KmsResult<json> {
    const long long days = opt_int(body, "PendingWindowInDays").value_or(30);
    if (days < 7 || days > 30) {
      return err(KmsErrorCode::ValidationException, "PendingWindowInDays must be between 7 and 30");
    }
    auto rec = impl_->key_for(call, body, "ScheduleKeyDeletion", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "ScheduleKeyDeletion"); !s) return s;
      k.metadata.key_state = "PendingDeletion";
      k.metadata.enabled = false;
      k.metadata.deletion_date = impl_->clock() + static_cast<double>(days) * kDay;
      k.metadata.pending_deletion_window_in_days = static_cast<int>(days);
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json{{"KeyId", w->metadata.arn},
                {"DeletionDate", *w->metadata.deletion_date},
                {"KeyState", "PendingDeletion"},
                {"PendingWindowInDays", days}};
  });
}

KmsResult<json> KmsCore::cancel_key_deletion(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "CancelKeyDeletion", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "CancelKeyDeletion", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "CancelKeyDeletion"); !s) return s;
      // AWS leaves a cancelled key Disabled (PendingImport without material).
      k.metadata.key_state = k.newest().material ? "Disabled" : "PendingImport";
      k.metadata.enabled = false;
      k.metadata.deletion_date.reset();
      k.metadata.pending_deletion_window_in_days.reset();
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return key_id_only(*w);
  });
}

// --- rotation --------------------------------------------------------------

namespace {
KmsResult<void> rotation_supported(const KeyRecord& k, const std::string& op) {
  if (k.metadata.origin == "EXTERNAL") {
    return err(KmsErrorCode::UnsupportedOperationException,
               op + " is not supported for " + k.metadata.arn + ": its key material is imported (Origin EXTERNAL)");
  }
  return {};
}
}  // namespace

KmsResult<json> KmsCore::enable_key_rotation(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "EnableKeyRotation", false, body, [&](Call& call) -> KmsResult<json> {
    const long long period = opt_int(body, "RotationPeriodInDays").value_or(365);
    if (period < 90 || period > 2560) {
      return err(KmsErrorCode::ValidationException, "RotationPeriodInDays must be between 90 and 2560");
    }
    auto rec = impl_->key_for(call, body, "EnableKeyRotation", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (auto u = rotation_supported(*rec, "EnableKeyRotation"); !u) return Unexpected<KmsError>(u.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "EnableKeyRotation"); !s) return s;
      k.rotation.enabled = true;
      k.rotation.period_days = static_cast<int>(period);
      k.rotation.next_rotation_date = impl_->clock() + static_cast<double>(period) * kDay;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::disable_key_rotation(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "DisableKeyRotation", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "DisableKeyRotation", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (auto u = rotation_supported(*rec, "DisableKeyRotation"); !u) return Unexpected<KmsError>(u.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "DisableKeyRotation"); !s) return s;
      k.rotation.enabled = false;
      k.rotation.next_rotation_date.reset();
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::get_key_rotation_status(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "GetKeyRotationStatus", true, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "GetKeyRotationStatus", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    json out{{"KeyId", rec->metadata.arn}, {"KeyRotationEnabled", rec->rotation.enabled}};
    if (rec->rotation.enabled) {
      out["RotationPeriodInDays"] = rec->rotation.period_days;
      if (rec->rotation.next_rotation_date) out["NextRotationDate"] = *rec->rotation.next_rotation_date;
    }
    if (rec->rotation.on_demand_start) out["OnDemandRotationStartDate"] = *rec->rotation.on_demand_start;
    return out;
  });
}

constexpr long kMaxOnDemandRotations = 25;

KmsResult<json> KmsCore::rotate_key_on_demand(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "RotateKeyOnDemand", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "RotateKeyOnDemand", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (rec->metadata.key_manager == "AWS") {
      return err(KmsErrorCode::UnsupportedOperationException,
                 rec->metadata.arn + " is a managed key: it rotates automatically and cannot be rotated on demand");
    }
    if (auto u = rotation_supported(*rec, "RotateKeyOnDemand"); !u) return Unexpected<KmsError>(u.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "RotateKeyOnDemand"); !s) return s;
      // AWS's on-demand rotation quota: 25 per key, not adjustable.
      const auto on_demand = std::count_if(k.versions.begin(), k.versions.end(),
                                           [](const KeyVersion& v) { return v.rotation_type == "ON_DEMAND"; });
      if (on_demand >= kMaxOnDemandRotations) {
        return err(KmsErrorCode::LimitExceededException,
                   k.metadata.arn + " has used all " + std::to_string(kMaxOnDemandRotations) +
                       " of its on-demand rotations (automatic rotation still applies)");
      }
      return impl_->add_version(k, "ON_DEMAND");
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return key_id_only(*w);
  });
}

KmsResult<json> KmsCore::list_key_rotations(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ListKeyRotations", true, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "ListKeyRotations", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    std::vector<KeyVersion> rotations;
    for (const auto& v : rec->versions) {
      if (!v.rotation_type.empty()) rotations.push_back(v);
    }
    const std::string arn = rec->metadata.arn;
    return page(rotations, body, 100, 1000, "Rotations", [&](const KeyVersion& v) {
      return json{{"KeyId", arn}, {"RotationDate", v.creation_date}, {"RotationType", v.rotation_type},
                  {"KeyMaterialVersion", v.version}};
    });
  });
}

// --- aliases ---------------------------------------------------------------

KmsResult<json> KmsCore::update_alias(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "UpdateAlias", false, body, [&](Call& call) -> KmsResult<json> {
    const std::string name = req_str(body, "AliasName");
    const std::string target = req_str(body, "TargetKeyId");
    if (auto v = validate_alias_name(name); !v) return Unexpected<KmsError>(v.error());
    if (starts_with(target, "alias/") || starts_with(target, kAliasArnPrefix)) {
      return err(KmsErrorCode::ValidationException, "TargetKeyId must be a key id or key ARN, not an alias");
    }
    auto current = impl_->resolve(caller, name);
    if (!current) return Unexpected<KmsError>(current.error());
    auto next = impl_->resolve(caller, target);
    if (!next) return Unexpected<KmsError>(next.error());
    for (KeyRecord* k : {&*current, &*next}) {
      if (auto a = impl_->authorize(call, *k, "kms:UpdateAlias", nullptr); !a) return Unexpected<KmsError>(a.error());
    }
    if (auto m = impl_->check_not_managed(*next, "UpdateAlias"); !m) return Unexpected<KmsError>(m.error());
    if (auto s = Impl::check_state(*next, "UpdateAlias"); !s) return Unexpected<KmsError>(s.error());
    auto lock = impl_->store.lock();
    if (!lock) return Unexpected<KmsError>(lock.error());
    auto aliases = impl_->store.load_aliases();
    if (!aliases) return Unexpected<KmsError>(aliases.error());
    bool found = false;
    for (auto& a : *aliases) {
      if (a.alias_name == name) {
        a.target_key_id = next->metadata.key_id;
        a.last_updated_date = impl_->clock();
        found = true;
      }
    }
    if (!found) return err(KmsErrorCode::NotFoundException, "Alias " + name + " is not found.");
    if (auto w = impl_->store.write_aliases(*aliases); !w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::delete_alias(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "DeleteAlias", false, body, [&](Call& call) -> KmsResult<json> {
    const std::string name = req_str(body, "AliasName");
    if (name == kDefaultManagedAlias) {
      return err(KmsErrorCode::InvalidAliasNameException, name + " is the managed kmsfs key's alias and cannot be deleted");
    }
    if (!starts_with(name, "alias/")) return err(KmsErrorCode::InvalidAliasNameException, "alias name '" + name + "' must begin with alias/");
    auto target = impl_->resolve(caller, name);
    if (!target) return Unexpected<KmsError>(target.error());
    if (auto a = impl_->authorize(call, *target, "kms:DeleteAlias", nullptr); !a) return Unexpected<KmsError>(a.error());
    auto lock = impl_->store.lock();
    if (!lock) return Unexpected<KmsError>(lock.error());
    auto aliases = impl_->store.load_aliases();
    if (!aliases) return Unexpected<KmsError>(aliases.error());
    const auto before = aliases->size();
    std::erase_if(*aliases, [&](const AliasRecord& a) { return a.alias_name == name; });
    if (aliases->size() == before) return err(KmsErrorCode::NotFoundException, "Alias " + name + " is not found.");
    if (auto w = impl_->store.write_aliases(*aliases); !w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

// --- tags ------------------------------------------------------------------

KmsResult<json> KmsCore::tag_resource(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "TagResource", false, body, [&](Call& call) -> KmsResult<json> {
    const auto tags = opt_tags(body, "Tags");
    if (tags.empty()) return err(KmsErrorCode::ValidationException, "Tags is required");
    if (auto t = validate_tags(tags); !t) return Unexpected<KmsError>(t.error());
    auto rec = impl_->key_for(call, body, "TagResource", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "TagResource"); !s) return s;
      for (const auto& t : tags) {
        auto it = std::find_if(k.tags.begin(), k.tags.end(), [&](const Tag& x) { return x.tag_key == t.tag_key; });
        if (it != k.tags.end()) {
          it->tag_value = t.tag_value;
        } else {
          k.tags.push_back(t);
        }
      }
      if (k.tags.size() > 50) return err(KmsErrorCode::LimitExceededException, "a key may have at most 50 tags");
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::untag_resource(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "UntagResource", false, body, [&](Call& call) -> KmsResult<json> {
    const auto keys = opt_str_list(body, "TagKeys");
    if (keys.empty()) return err(KmsErrorCode::ValidationException, "TagKeys is required");
    auto rec = impl_->key_for(call, body, "UntagResource", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "UntagResource"); !s) return s;
      std::erase_if(k.tags, [&](const Tag& t) { return std::find(keys.begin(), keys.end(), t.tag_key) != keys.end(); });
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::list_resource_tags(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ListResourceTags", true, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "ListResourceTags", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    return page(rec->tags, body, 50, 50, "Tags", [](const Tag& t) { return json(t); });
  });
}

// --- policies --------------------------------------------------------------

namespace {
void check_policy_name(const json& body) {
  auto n = opt_str(body, "PolicyName");
  if (n && *n != "default") {
    throw RequestError{KmsErrorCode::NotFoundException, "No such policy: " + *n + " (the only key policy is \"default\")"};
  }
}
}  // namespace

KmsResult<json> KmsCore::get_key_policy(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "GetKeyPolicy", true, body, [&](Call& call) -> KmsResult<json> {
    check_policy_name(body);
    auto rec = impl_->key_for(call, body, "GetKeyPolicy", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    return json{{"Policy", rec->policy}, {"PolicyName", "default"}};
  });
}

KmsResult<json> KmsCore::put_key_policy(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "PutKeyPolicy", false, body, [&](Call& call) -> KmsResult<json> {
    check_policy_name(body);
    const std::string policy = req_str(body, "Policy");
    const bool bypass = opt_bool(body, "BypassPolicyLockoutSafetyCheck", false);
    if (policy.size() > 32768) return err(KmsErrorCode::LimitExceededException, "the key policy exceeds 32768 bytes");
    auto rec = impl_->key_for(call, body, "PutKeyPolicy", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    auto v = validate_key_policy(policy);
    if (!v) return err(KmsErrorCode::MalformedPolicyDocumentException, "the key policy is malformed: " + v.error());
    if (!bypass) {
      PolicyRequest pr{"kms:PutKeyPolicy", rec->metadata.arn, &call.principal, nullptr};
      if (evaluate_key_policy(policy, pr) != PolicyDecision::Allow) {
        return err(KmsErrorCode::MalformedPolicyDocumentException,
                   "The new key policy will not allow you to update the key policy in the future "
                   "(use BypassPolicyLockoutSafetyCheck to set it anyway)");
      }
    }
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      k.policy = policy;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::list_key_policies(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ListKeyPolicies", true, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "ListKeyPolicies", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    return json{{"PolicyNames", {"default"}}, {"Truncated", false}};
  });
}

// --- grants ----------------------------------------------------------------

namespace {

// A grant created under a grant's CreateGrant permission: its operations a
// subset of the parent's, its encryption context constraint equally strict
// or stricter (AWS CreateGrant: "the constraint requires that any grants
// created with the CreateGrant permission have an equally strict or
// stricter encryption context constraint").
bool grant_within(const Grant& child, const Grant& parent) {
  for (const auto& op : child.operations) {
    if (std::find(parent.operations.begin(), parent.operations.end(), op) == parent.operations.end()) return false;
  }
  if (parent.context_equals) {
    // Only the same exact context is as strict as an Equals constraint.
    if (!child.context_equals || child.context_equals->size() != parent.context_equals->size() ||
        !grant_context_includes(*child.context_equals, *parent.context_equals)) {
      return false;
    }
  }
  if (parent.context_subset) {
    // Any context the child allows must hold the parent's pairs: its
    // Equals context (the only one it allows) or its Subset pairs.
    const EncryptionContext* c = child.context_equals ? &*child.context_equals
                                 : child.context_subset ? &*child.context_subset
                                                        : nullptr;
    if (c == nullptr || !grant_context_includes(*c, *parent.context_subset)) return false;
  }
  return true;
}

}  // namespace

KmsResult<json> KmsCore::create_grant(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "CreateGrant", false, body, [&](Call& call) -> KmsResult<json> {
    Grant g;
    g.grantee_principal = req_str(body, "GranteePrincipal");
    g.retiring_principal = opt_str(body, "RetiringPrincipal").value_or("");
    g.operations = opt_str_list(body, "Operations");
    g.name = opt_str(body, "Name").value_or("");
    for (const std::string* p : {&g.grantee_principal, &g.retiring_principal}) {
      if (p->empty() && p == &g.retiring_principal) continue;
      if (!is_local_principal(*p) || *p == "*") {
        return err(KmsErrorCode::ValidationException,
                   "principal '" + *p + "' must be uid:N, user:NAME, gid:N or group:NAME");
      }
    }
    if (g.operations.empty()) return err(KmsErrorCode::ValidationException, "Operations is required");
    for (const auto& op : g.operations) {
      if (std::find(kGrantOperations.begin(), kGrantOperations.end(), op) == kGrantOperations.end()) {
        return err(KmsErrorCode::ValidationException, "grant operation '" + op + "' is not supported for this key");
      }
    }
    if (body.contains("Constraints") && !body["Constraints"].is_null()) {
      const json& c = body["Constraints"];
      if (!c.is_object()) return err(KmsErrorCode::ValidationException, "Constraints must be an object");
      for (const auto& [k, v] : c.items()) {
        if (k != "EncryptionContextEquals" && k != "EncryptionContextSubset") {
          return err(KmsErrorCode::ValidationException, "Constraints." + k + " is not supported");
        }
      }
      if (c.contains("EncryptionContextEquals")) g.context_equals = opt_ctx(c, "EncryptionContextEquals");
      if (c.contains("EncryptionContextSubset")) g.context_subset = opt_ctx(c, "EncryptionContextSubset");
    }
    auto rec = impl_->key_for(call, body, "CreateGrant", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (!call.create_grant_parents.empty() &&
        std::none_of(call.create_grant_parents.begin(), call.create_grant_parents.end(),
                     [&](const Grant& parent) { return grant_within(g, parent); })) {
      return err(KmsErrorCode::AccessDeniedException,
                 "a grant that allows CreateGrant allows only grants with a subset of its operations and an "
                 "encryption context constraint at least as strict as its own; the requested grant exceeds every "
                 "such grant this caller holds on " + rec->metadata.arn);
    }
    g.creation_date = impl_->clock();
    g.issuing_uid = caller.uid;
    std::string grant_id;
    std::string grant_token;
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "CreateGrant"); !s) return s;
      // Same name and parameters: the existing grant (AWS's idempotency).
      for (const auto& e : k.grants) {
        if (!g.name.empty() && e.name == g.name && e.grantee_principal == g.grantee_principal &&
            e.operations == g.operations && e.context_equals == g.context_equals &&
            e.context_subset == g.context_subset && e.retiring_principal == g.retiring_principal) {
          grant_id = e.grant_id;
          grant_token = e.grant_token;
          return {};
        }
      }
      if (k.grants.size() >= 50000) return err(KmsErrorCode::LimitExceededException, "a key may have at most 50000 grants");
      g.grant_id = random_hex(32);
      g.grant_token = crypto::to_base64(crypto::from_hex(random_hex(48)).value());
      grant_id = g.grant_id;
      grant_token = g.grant_token;
      k.grants.push_back(g);
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    call.params["grantId"] = grant_id;
    return json{{"GrantId", grant_id}, {"GrantToken", grant_token}};
  });
}

KmsResult<json> KmsCore::list_grants(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ListGrants", true, body, [&](Call& call) -> KmsResult<json> {
    const auto grant_id = opt_str(body, "GrantId");
    const auto grantee = opt_str(body, "GranteePrincipal");
    auto rec = impl_->key_for(call, body, "ListGrants", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    std::vector<Grant> grants;
    for (const auto& g : rec->grants) {
      if (grant_id && g.grant_id != *grant_id) continue;
      if (grantee && g.grantee_principal != *grantee) continue;
      grants.push_back(g);
    }
    const std::string arn = rec->metadata.arn;
    return page(grants, body, 50, 100, "Grants", [&](const Grant& g) { return grant_json(g, arn); });
  });
}

KmsResult<json> KmsCore::retire_grant(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "RetireGrant", false, body, [&](Call& call) -> KmsResult<json> {
    const auto token = opt_str(body, "GrantToken");
    const auto grant_id = opt_str(body, "GrantId");
    const auto key_ref = opt_str(body, "KeyId");
    if (!token && !(grant_id && key_ref)) {
      return err(KmsErrorCode::ValidationException, "specify GrantToken, or KeyId and GrantId");
    }
    std::optional<KeyRecord> rec;
    if (key_ref) {
      auto r = impl_->resolve(caller, *key_ref);
      if (!r) return Unexpected<KmsError>(r.error());
      rec = std::move(*r);
    } else {
      auto ids = impl_->store.list_key_ids();
      if (!ids) return Unexpected<KmsError>(ids.error());
      for (const auto& id : *ids) {
        auto r = impl_->store.load_key(id);
        if (!r || !*r) continue;
        for (const auto& g : (*r)->grants) {
          if (g.grant_token == *token) rec = std::move(**r);
        }
        if (rec) break;
      }
      if (!rec) return err(KmsErrorCode::InvalidGrantTokenException, "the grant token is not valid");
    }
    const Grant* grant = nullptr;
    for (const auto& g : rec->grants) {
      if ((grant_id && g.grant_id == *grant_id) || (token && g.grant_token == *token)) grant = &g;
    }
    if (grant == nullptr) {
      call.add_resource(rec->metadata.arn);
      return token ? err(KmsErrorCode::InvalidGrantTokenException, "the grant token is not valid")
                   : err(KmsErrorCode::NotFoundException, "Grant " + *grant_id + " is not found.");
    }
    // The retiring principal, a grantee allowed RetireGrant, or a policy
    // allowing kms:RetireGrant may retire it.
    const bool retiring = !grant->retiring_principal.empty() &&
                          local_principal_matches(grant->retiring_principal, call.principal);
    const bool grantee =
        local_principal_matches(grant->grantee_principal, call.principal) &&
        std::find(grant->operations.begin(), grant->operations.end(), "RetireGrant") != grant->operations.end();
    if (!retiring && !grantee) {
      if (auto a = impl_->authorize(call, *rec, "kms:RetireGrant", nullptr); !a) return Unexpected<KmsError>(a.error());
    } else {
      call.add_resource(rec->metadata.arn);
    }
    const std::string id = grant->grant_id;
    call.params["grantId"] = id;
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      std::erase_if(k.grants, [&](const Grant& g) { return g.grant_id == id; });
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

KmsResult<json> KmsCore::revoke_grant(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "RevokeGrant", false, body, [&](Call& call) -> KmsResult<json> {
    const std::string id = req_str(body, "GrantId");
    auto rec = impl_->key_for(call, body, "RevokeGrant", false);
    if (!rec) return Unexpected<KmsError>(rec.error());
    bool found = false;
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      const auto before = k.grants.size();
      std::erase_if(k.grants, [&](const Grant& g) { return g.grant_id == id; });
      found = k.grants.size() != before;
      if (!found) return err(KmsErrorCode::NotFoundException, "Grant " + id + " is not found.");
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

// --- imported key material -------------------------------------------------

KmsResult<json> KmsCore::get_parameters_for_import(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "GetParametersForImport", true, body, [&](Call& call) -> KmsResult<json> {
    call.durable = true;  // stores an import token and a wrapping key pair
    const std::string alg = req_str(body, "WrappingAlgorithm");
    const std::string spec = req_str(body, "WrappingKeySpec");
    if (alg != "RSAES_OAEP_SHA_256") {
      return err(KmsErrorCode::UnsupportedOperationException,
                 "WrappingAlgorithm " + alg + " is not supported; use RSAES_OAEP_SHA_256");
    }
    std::size_t bits = 0;
    if (spec == "RSA_2048") bits = 2048;
    if (spec == "RSA_3072") bits = 3072;
    if (spec == "RSA_4096") bits = 4096;
    if (bits == 0) return err(KmsErrorCode::ValidationException, "WrappingKeySpec must be RSA_2048, RSA_3072 or RSA_4096");
    auto rec = impl_->key_for(call, body, "GetParametersForImport", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (rec->metadata.origin != "EXTERNAL") {
      return err(KmsErrorCode::UnsupportedOperationException,
                 rec->metadata.arn + " has Origin AWS_KMS: only keys created with Origin EXTERNAL take imported material");
    }
    const std::string token_id = random_hex(16);
    const std::string label = "kmsfs/" + rec->metadata.key_id + "/import-" + token_id.substr(0, 8);
    const double valid_to = impl_->clock() + 1 * kDay;
    std::vector<std::uint8_t> public_key;
    std::string old_label;
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "GetParametersForImport"); !s) return s;
      auto d = impl_->hsm->destroy_objects(label);  // leftovers of a crash, never referenced
      if (!d) return Unexpected<KmsError>(impl_->from_hsm(d.error(), "GetParametersForImport"));
      auto pk = impl_->hsm->generate_rsa_wrapping_key_pair(label, bits);
      if (!pk) return Unexpected<KmsError>(impl_->from_hsm(pk.error(), "GetParametersForImport"));
      public_key = std::move(*pk);
      old_label = k.import.wrapping_label;
      k.import.wrapping_label = label;
      k.import.token_id = token_id;
      k.import.token_valid_to = valid_to;
      k.import.wrapping_key_spec = spec;
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    if (!old_label.empty() && old_label != label) {
      auto d = impl_->hsm->destroy_objects(old_label);  // the previous token's pair is void now
      if (!d) impl_->log->warn("could not destroy the old wrapping key {}: {}", old_label, d.error().message);
    }
    return json{{"KeyId", w->metadata.arn},
                {"ImportToken", crypto::to_base64(make_import_token(w->metadata.key_id, token_id, valid_to))},
                {"PublicKey", crypto::to_base64(public_key)},
                {"ParametersValidTo", valid_to}};
  });
}

KmsResult<json> KmsCore::import_key_material(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "ImportKeyMaterial", false, body, [&](Call& call) -> KmsResult<json> {
    const Bytes token = req_b64(body, "ImportToken");
    const Bytes material = req_b64(body, "EncryptedKeyMaterial");
    auto model = opt_str(body, "ExpirationModel");
    const auto valid_to = opt_num(body, "ValidTo");
    if (!model) model = valid_to ? "KEY_MATERIAL_EXPIRES" : "KEY_MATERIAL_DOES_NOT_EXPIRE";
    if (*model != "KEY_MATERIAL_EXPIRES" && *model != "KEY_MATERIAL_DOES_NOT_EXPIRE") {
      return err(KmsErrorCode::ValidationException,
                 "ExpirationModel must be KEY_MATERIAL_EXPIRES or KEY_MATERIAL_DOES_NOT_EXPIRE");
    }
    if (*model == "KEY_MATERIAL_EXPIRES" && !valid_to) {
      return err(KmsErrorCode::ValidationException, "ValidTo is required with KEY_MATERIAL_EXPIRES");
    }
    if (*model == "KEY_MATERIAL_DOES_NOT_EXPIRE" && valid_to) {
      return err(KmsErrorCode::ValidationException, "ValidTo is not allowed with KEY_MATERIAL_DOES_NOT_EXPIRE");
    }
    if (valid_to && *valid_to <= impl_->clock()) return err(KmsErrorCode::ValidationException, "ValidTo is in the past");
    if (valid_to && *valid_to > impl_->clock() + 365 * kDay) {
      return err(KmsErrorCode::ValidationException, "ValidTo may be at most 365 days from now");
    }
    auto rec = impl_->key_for(call, body, "ImportKeyMaterial", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (rec->metadata.origin != "EXTERNAL") {
      return err(KmsErrorCode::UnsupportedOperationException, rec->metadata.arn + " has Origin AWS_KMS");
    }
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "ImportKeyMaterial"); !s) return s;
      // The token: ours, for this key, the newest, not expired.
      if (token.size() != 44 || !std::equal(token.begin(), token.begin() + 4, "KMIT") || k.import.token_id.empty()) {
        return err(KmsErrorCode::InvalidImportTokenException, "the import token is not valid for " + k.metadata.arn);
      }
      const Bytes expect = make_import_token(k.metadata.key_id, k.import.token_id, k.import.token_valid_to);
      if (token != expect) {
        return err(KmsErrorCode::InvalidImportTokenException,
                   "the import token is not valid for " + k.metadata.arn + " (not the newest GetParametersForImport)");
      }
      if (k.import.token_valid_to <= impl_->clock()) {
        return err(KmsErrorCode::ExpiredImportTokenException, "the import token expired; call GetParametersForImport again");
      }
      KeyVersion& v = k.versions.front();
      const bool present = v.material;
      // New material goes under the version's label; material already
      // present is compared through a scratch object.
      const std::string label = present ? "kmsfs/" + k.metadata.key_id + "/import-check" : v.hsm_label;
      if (auto d = impl_->hsm->destroy_objects(label); !d) {
        return Unexpected<KmsError>(impl_->from_hsm(d.error(), "ImportKeyMaterial"));
      }
      auto u = impl_->hsm->unwrap_aes_key_rsa_oaep_sha256(k.import.wrapping_label, material, label, 32);
      if (!u) {
        if (u.error().kind == HsmError::Kind::AuthenticationFailed || u.error().kind == HsmError::Kind::InvalidArgument) {
          return err(KmsErrorCode::InvalidCiphertextException,
                     "the encrypted key material did not decrypt under the wrapping key, or is not 256 bits: " +
                         u.error().message);
        }
        return Unexpected<KmsError>(impl_->from_hsm(u.error(), "ImportKeyMaterial"));
      }
      auto kcv = impl_->key_check_value(label);
      if (!kcv) {
        (void)impl_->hsm->destroy_objects(label);
        return Unexpected<KmsError>(kcv.error());
      }
      const bool mismatch = !k.import.material_commitment.empty() && *kcv != k.import.material_commitment;
      if (present || mismatch) {
        if (auto d = impl_->hsm->destroy_objects(label); !d) {
          impl_->log->warn("could not destroy {}: {}", label, d.error().message);
        }
      }
      if (mismatch) {
        return err(KmsErrorCode::IncorrectKeyMaterialException,
                   "the key material differs from the material previously imported into " + k.metadata.arn);
      }
      k.import.material_commitment = *kcv;
      v.material = true;
      if (k.metadata.key_state == "PendingImport") {
        k.metadata.key_state = "Enabled";
        k.metadata.enabled = true;
      }
      k.metadata.expiration_model = *model;
      if (valid_to) {
        k.metadata.valid_to = *valid_to;
      } else {
        k.metadata.valid_to.reset();
      }
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json{{"KeyId", w->metadata.arn}};
  });
}

KmsResult<json> KmsCore::delete_imported_key_material(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "DeleteImportedKeyMaterial", false, body, [&](Call& call) -> KmsResult<json> {
    auto rec = impl_->key_for(call, body, "DeleteImportedKeyMaterial", true);
    if (!rec) return Unexpected<KmsError>(rec.error());
    if (rec->metadata.origin != "EXTERNAL") {
      return err(KmsErrorCode::UnsupportedOperationException, rec->metadata.arn + " has Origin AWS_KMS");
    }
    auto w = impl_->modify(rec->metadata.key_id, [&](KeyRecord& k) -> KmsResult<void> {
      if (auto s = Impl::check_state(k, "DeleteImportedKeyMaterial"); !s) return s;
      if (auto d = impl_->destroy_material(k); !d) return d;
      if (k.metadata.key_state != "PendingDeletion") {
        k.metadata.key_state = "PendingImport";
        k.metadata.enabled = false;
      }
      k.metadata.valid_to.reset();
      return {};
    });
    if (!w) return Unexpected<KmsError>(w.error());
    return json::object();
  });
}

// --- audit trail -----------------------------------------------------------

namespace {
KmsResult<void> audit_reader(const Call& call, const std::string& state_dir) {
  struct stat st {};
  if (call.caller.uid == 0 || (::stat(state_dir.c_str(), &st) == 0 && st.st_uid == call.caller.uid)) return {};
  return err(KmsErrorCode::AccessDeniedException,
             "uid:" + std::to_string(call.caller.uid) + " may not read the audit trail (root or the KMS state owner only)");
}
}  // namespace

KmsResult<json> KmsCore::verify_audit_log(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "VerifyAuditLog", true, body, [&](Call& call) -> KmsResult<json> {
    if (auto a = audit_reader(call, impl_->state_dir); !a) return Unexpected<KmsError>(a.error());
    auto r = impl_->audit.verify();
    if (!r) return Unexpected<KmsError>(r.error());
    json out{{"Valid", r->ok}, {"Records", r->records}, {"Checkpoints", r->checkpoints}, {"LastSeq", r->last_seq},
             {"Path", impl_->audit.path()}};
    // A record a crash tore (its call never returned): not a record, and
    // cut off by the next append; worth seeing.
    if (r->torn_tail_bytes != 0) out["TornTailBytes"] = r->torn_tail_bytes;
    if (!r->ok) {
      out["Problem"] = r->problem;
      if (r->line) out["Line"] = *r->line;
      if (r->seq) out["Seq"] = *r->seq;
    }
    return out;
  });
}

KmsResult<json> KmsCore::search_audit_log(const CallerIdentity& caller, const json& body) {
  return impl_->run_json(caller, "SearchAuditLog", true, body, [&](Call& call) -> KmsResult<json> {
    if (auto a = audit_reader(call, impl_->state_dir); !a) return Unexpected<KmsError>(a.error());
    AuditSearch q;
    q.key_id = opt_str(body, "KeyId");
    q.event_name = opt_str(body, "EventName");
    q.since = opt_str(body, "Since");
    if (auto l = opt_int(body, "Limit")) q.limit = static_cast<std::size_t>(std::max<long long>(1, *l));
    if (q.key_id && !starts_with(*q.key_id, "arn:") && !uuid_from_string(*q.key_id)) {
      auto rec = impl_->resolve(caller, *q.key_id);  // an alias
      if (!rec) return Unexpected<KmsError>(rec.error());
      q.key_id = rec->metadata.arn;
    }
    auto r = impl_->audit.search(q);
    if (!r) return Unexpected<KmsError>(r.error());
    return json{{"Events", *r}};
  });
}

}  // namespace kmsfs::keyclient
