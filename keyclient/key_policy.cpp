#include "keyclient/key_policy.h"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <memory>
#include <set>

namespace kmsfs::keyclient {

using nlohmann::json;

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

bool all_digits(std::string_view s) {
  return !s.empty() && s.size() <= 10 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A string or an array of strings, as a vector; nullopt when neither.
std::optional<std::vector<std::string>> string_list(const json& v) {
  std::vector<std::string> out;
  if (v.is_string()) {
    out.push_back(v.get<std::string>());
    return out;
  }
  if (!v.is_array() || v.empty()) return std::nullopt;
  for (const auto& e : v) {
    if (!e.is_string()) return std::nullopt;
    out.push_back(e.get<std::string>());
  }
  return out;
}

// For documents already validated: the list, or empty.
std::vector<std::string> strings(const json& v) {
  auto l = string_list(v);
  return l ? std::move(*l) : std::vector<std::string>();
}

const std::set<std::string> kOperators = {"StringEquals", "StringNotEquals", "StringLike", "StringNotLike",
                                          "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"};

bool known_condition_key(const std::string& k) {
  const std::string l = lower(k);
  if (starts_with(l, "kms:encryptioncontext:")) return k.size() > std::string("kms:EncryptionContext:").size();
  return l == "kms:encryptioncontextkeys" || l == "kms:calleruid" || l == "kms:callergid";
}

Result<void, std::string> validate_statement(const json& st, const std::string& where) {
  if (!st.is_object()) return unexpected(where + " is not a JSON object");
  static const std::set<std::string> kFields = {"Sid", "Effect", "Principal", "Action", "NotAction", "Resource",
                                                "Condition"};
  for (const auto& [k, v] : st.items()) {
    if (kFields.count(k) == 0) {
      if (k == "NotPrincipal" || k == "NotResource") return unexpected(where + "." + k + " is not supported");
      return unexpected(where + " has an unknown element \"" + k + "\"");
    }
  }
  if (st.contains("Sid") && !st["Sid"].is_string()) return unexpected(where + ".Sid must be a string");
  if (!st.contains("Effect")) return unexpected(where + " has no Effect");
  if (st["Effect"] != "Allow" && st["Effect"] != "Deny") {
    return unexpected(where + ".Effect must be \"Allow\" or \"Deny\"");
  }
  if (!st.contains("Principal")) return unexpected(where + " has no Principal");
  const json& pr = st["Principal"];
  if (pr.is_string()) {
    if (pr != "*") return unexpected(where + ".Principal must be \"*\" or {\"Local\": [...]}");
  } else if (pr.is_object()) {
    if (pr.empty()) return unexpected(where + ".Principal is empty");
    for (const auto& [k, v] : pr.items()) {
      if (k == "AWS") {
        if (v != "*") return unexpected(where + ".Principal.AWS: only \"*\" is meaningful here; use \"Local\"");
        continue;
      }
      if (k != "Local") return unexpected(where + ".Principal has an unknown principal type \"" + k + "\"");
      auto list = string_list(v);
      if (!list) return unexpected(where + ".Principal.Local must be a string or a non-empty array of strings");
      for (const auto& p : *list) {
        if (!is_local_principal(p)) {
          return unexpected(where + ".Principal.Local: \"" + p +
                            "\" is not uid:N, user:NAME, gid:N, group:NAME or \"*\"");
        }
      }
    }
  } else {
    return unexpected(where + ".Principal must be \"*\" or an object");
  }
  const bool has_action = st.contains("Action");
  const bool has_not_action = st.contains("NotAction");
  if (has_action == has_not_action) return unexpected(where + " must have exactly one of Action and NotAction");
  const std::string aname = has_action ? "Action" : "NotAction";
  auto actions = string_list(st[aname]);
  if (!actions) return unexpected(where + "." + aname + " must be a string or a non-empty array of strings");
  for (const auto& a : *actions) {
    if (a != "*" && !starts_with(lower(a), "kms:")) {
      return unexpected(where + "." + aname + ": \"" + a + "\" is not a kms: action");
    }
  }
  if (!st.contains("Resource")) return unexpected(where + " has no Resource");
  auto resources = string_list(st["Resource"]);
  if (!resources) return unexpected(where + ".Resource must be a string or a non-empty array of strings");
  for (const auto& r : *resources) {
    if (r != "*" && !starts_with(r, "arn:")) return unexpected(where + ".Resource: \"" + r + "\" is not \"*\" or an ARN");
  }
  if (st.contains("Condition")) {
    const json& c = st["Condition"];
    if (!c.is_object()) return unexpected(where + ".Condition must be an object");
    for (const auto& [op, body] : c.items()) {
      std::string base = op;
      for (const char* prefix : {"ForAnyValue:", "ForAllValues:"}) {
        if (starts_with(base, prefix)) base = base.substr(std::string(prefix).size());
      }
      if (kOperators.count(base) == 0) {
        return unexpected(where + ".Condition: operator \"" + op + "\" is not supported");
      }
      if (!body.is_object() || body.empty()) return unexpected(where + ".Condition." + op + " must be a non-empty object");
      for (const auto& [key, values] : body.items()) {
        if (!known_condition_key(key)) {
          return unexpected(where + ".Condition." + op + ": condition key \"" + key + "\" is not supported");
        }
        if (!string_list(values)) {
          return unexpected(where + ".Condition." + op + "." + key + " must be a string or an array of strings");
        }
      }
    }
  }
  return {};
}

bool string_op(const std::string& base, const std::string& pattern, const std::string& value) {
  if (base == "StringEquals" || base == "StringNotEquals") return pattern == value;
  if (base == "StringEqualsIgnoreCase" || base == "StringNotEqualsIgnoreCase") return lower(pattern) == lower(value);
  return wildcard_match(pattern, value, false);  // StringLike / StringNotLike
}

// The request's values for a condition key; nullopt when the key is absent.
std::optional<std::vector<std::string>> request_values(const std::string& key, const PolicyRequest& r) {
  const std::string l = lower(key);
  if (l == "kms:calleruid") return std::vector<std::string>{std::to_string(r.principal->uid)};
  if (l == "kms:callergid") return std::vector<std::string>{std::to_string(r.principal->gid)};
  if (r.encryption_context == nullptr) return std::nullopt;
  if (l == "kms:encryptioncontextkeys") {
    std::vector<std::string> keys;
    for (const auto& [k, v] : *r.encryption_context) keys.push_back(k);
    return keys;
  }
  // kms:EncryptionContext:KEY: the key part is case-sensitive.
  const std::string ctx_key = key.substr(std::string("kms:EncryptionContext:").size());
  auto it = r.encryption_context->find(ctx_key);
  if (it == r.encryption_context->end()) return std::nullopt;
  return std::vector<std::string>{it->second};
}

bool condition_holds(const std::string& op, const json& body, const PolicyRequest& r) {
  std::string base = op;
  enum { Single, AnyValue, AllValues } set_op = Single;
  if (starts_with(base, "ForAnyValue:")) {
    set_op = AnyValue;
    base = base.substr(12);
  } else if (starts_with(base, "ForAllValues:")) {
    set_op = AllValues;
    base = base.substr(13);
  }
  const bool negated = base.find("Not") != std::string::npos;
  for (const auto& [key, v] : body.items()) {
    const std::vector<std::string> patterns = strings(v);
    auto values = request_values(key, r);
    auto matches_any_pattern = [&](const std::string& value) {
      for (const auto& p : patterns) {
        if (string_op(base, p, value)) return true;
      }
      return false;
    };
    bool ok = false;
    if (set_op == AllValues) {
      ok = true;  // vacuously true for an absent or empty set, as in AWS
      if (values) {
        for (const auto& value : *values) ok = ok && (negated ? !matches_any_pattern(value) : matches_any_pattern(value));
      }
    } else if (!values || values->empty()) {
      ok = negated;  // an absent key satisfies only the negated operators
    } else {
      bool any = false;
      for (const auto& value : *values) any = any || matches_any_pattern(value);
      ok = negated ? !any : any;
    }
    if (!ok) return false;  // every key of every operator must hold
  }
  return true;
}

bool statement_matches(const json& st, const PolicyRequest& r) {
  // Principal
  const json& pr = st["Principal"];
  bool principal_ok = false;
  if (pr.is_string()) {
    principal_ok = true;  // "*"
  } else {
    for (const auto& [k, v] : pr.items()) {
      if (k == "AWS") {
        principal_ok = true;
        continue;
      }
      for (const auto& p : strings(v)) principal_ok = principal_ok || local_principal_matches(p, *r.principal);
    }
  }
  if (!principal_ok) return false;
  // Action / NotAction
  const bool not_action = st.contains("NotAction");
  bool action_listed = false;
  for (const auto& a : strings(st[not_action ? "NotAction" : "Action"])) {
    action_listed = action_listed || a == "*" || wildcard_match(a, r.action, true);
  }
  if (action_listed == not_action) return false;
  // Resource
  bool resource_ok = false;
  for (const auto& res : strings(st["Resource"])) resource_ok = resource_ok || wildcard_match(res, r.resource, false);
  if (!resource_ok) return false;
  // Condition: every operator holds.
  if (st.contains("Condition")) {
    for (const auto& [op, body] : st["Condition"].items()) {
      if (!condition_holds(op, body, r)) return false;
    }
  }
  return true;
}

}  // namespace

Principal Principal::resolve(uid_t uid, gid_t gid) {
  Principal p;
  p.uid = uid;
  p.gid = gid;
  p.groups.push_back(gid);
  std::vector<char> buf(16384);
  passwd pw{};
  passwd* found = nullptr;
  if (::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) == 0 && found != nullptr) {
    p.user_name = pw.pw_name;
    int n = 64;
    std::vector<gid_t> groups(static_cast<std::size_t>(n));
    if (::getgrouplist(pw.pw_name, gid, groups.data(), &n) < 0) {
      groups.resize(static_cast<std::size_t>(n));
      (void)::getgrouplist(pw.pw_name, gid, groups.data(), &n);
    }
    groups.resize(static_cast<std::size_t>(std::max(n, 0)));
    for (gid_t g : groups) {
      if (std::find(p.groups.begin(), p.groups.end(), g) == p.groups.end()) p.groups.push_back(g);
    }
  }
  for (gid_t g : p.groups) {
    group gr{};
    group* gfound = nullptr;
    if (::getgrgid_r(g, &gr, buf.data(), buf.size(), &gfound) == 0 && gfound != nullptr) {
      p.group_names.emplace_back(gr.gr_name);
    }
  }
  return p;
}

bool is_local_principal(const std::string& s) {
  if (s == "*") return true;
  if (starts_with(s, "uid:")) return all_digits(std::string_view(s).substr(4));
  if (starts_with(s, "gid:")) return all_digits(std::string_view(s).substr(4));
  if (starts_with(s, "user:") || starts_with(s, "group:")) return s.size() > (s[0] == 'u' ? 5u : 6u);
  return false;
}

bool local_principal_matches(const std::string& s, const Principal& p) {
  if (s == "*") return true;
  if (starts_with(s, "uid:")) return s.substr(4) == std::to_string(p.uid);
  if (starts_with(s, "user:")) return !p.user_name.empty() && s.substr(5) == p.user_name;
  if (starts_with(s, "gid:")) {
    for (gid_t g : p.groups) {
      if (s.substr(4) == std::to_string(g)) return true;
    }
    return false;
  }
  if (starts_with(s, "group:")) {
    return std::find(p.group_names.begin(), p.group_names.end(), s.substr(6)) != p.group_names.end();
  }
  return false;
}

bool wildcard_match(std::string_view pattern, std::string_view text, bool ignore_case) {
  auto eq = [&](char a, char b) {
    return ignore_case ? std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b))
                       : a == b;
  };
  std::size_t p = 0, t = 0, star = std::string_view::npos, mark = 0;
  while (t < text.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || (pattern[p] != '*' && eq(pattern[p], text[t])))) {
      ++p;
      ++t;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

Result<void, std::string> validate_key_policy(const std::string& document) {
  if (document.size() > 32768) return unexpected(std::string("the policy exceeds 32768 bytes"));
  json j = json::parse(document, nullptr, false);
  if (j.is_discarded()) return unexpected(std::string("the policy is not valid JSON"));
  if (!j.is_object()) return unexpected(std::string("the policy is not a JSON object"));
  for (const auto& [k, v] : j.items()) {
    if (k != "Version" && k != "Id" && k != "Statement") return unexpected("unknown top-level element \"" + k + "\"");
  }
  if (j.contains("Version") && j["Version"] != "2012-10-17" && j["Version"] != "2008-10-17") {
    return unexpected(std::string("Version must be \"2012-10-17\" or \"2008-10-17\""));
  }
  if (j.contains("Id") && !j["Id"].is_string()) return unexpected(std::string("Id must be a string"));
  if (!j.contains("Statement")) return unexpected(std::string("the policy has no Statement"));
  const json& st = j["Statement"];
  if (st.is_object()) return validate_statement(st, "Statement");
  if (!st.is_array() || st.empty()) return unexpected(std::string("Statement must be an object or a non-empty array"));
  std::set<std::string> sids;
  for (std::size_t i = 0; i < st.size(); ++i) {
    auto v = validate_statement(st[i], "Statement[" + std::to_string(i) + "]");
    if (!v) return v;
    if (st[i].contains("Sid") && !sids.insert(st[i]["Sid"].get<std::string>()).second) {
      return unexpected("Statement[" + std::to_string(i) + "].Sid \"" + st[i]["Sid"].get<std::string>() +
                        "\" is not unique");
    }
  }
  return {};
}

namespace {

// A document checked and parsed once: every KMS call evaluates its key's
// policy, and parsing it twice per call (validate, then evaluate) was a
// tenth of an embedded Decrypt's CPU.
struct ParsedPolicy {
  std::string document;
  bool valid = false;
  std::vector<json> statements;
};

const ParsedPolicy& parsed_policy(const std::string& document) {
  // Per thread, the last few documents (a mount uses one key; kmsd's
  // workers serve a handful): no lock, and nothing to invalidate, since
  // the entry is the document itself.
  constexpr std::size_t kSlots = 4;
  thread_local std::array<std::unique_ptr<ParsedPolicy>, kSlots> cache;
  thread_local std::size_t next = 0;
  for (const auto& p : cache) {
    if (p && p->document == document) return *p;
  }
  auto p = std::make_unique<ParsedPolicy>();
  p->document = document;
  p->valid = validate_key_policy(document).has_value();
  if (p->valid) {
    json j = json::parse(document);
    if (j["Statement"].is_object()) {
      p->statements.push_back(std::move(j["Statement"]));
    } else {
      for (auto& st : j["Statement"]) p->statements.push_back(std::move(st));
    }
  }
  auto& slot = cache[next];
  next = (next + 1) % kSlots;
  slot = std::move(p);
  return *slot;
}

}  // namespace

PolicyDecision evaluate_key_policy(const std::string& document, const PolicyRequest& request) {
  const ParsedPolicy& policy = parsed_policy(document);
  if (!policy.valid) return PolicyDecision::ImplicitDeny;
  bool allowed = false;
  for (const auto& st : policy.statements) {
    if (!statement_matches(st, request)) continue;
    if (st["Effect"] == "Deny") return PolicyDecision::ExplicitDeny;
    allowed = true;
  }
  return allowed ? PolicyDecision::Allow : PolicyDecision::ImplicitDeny;
}

}  // namespace kmsfs::keyclient
