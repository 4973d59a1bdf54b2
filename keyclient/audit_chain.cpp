#include "keyclient/audit_chain.h"

#include <map>

#include "crypto/encoding.h"
#include "crypto/sha256.h"

namespace kmsfs::keyclient {

using nlohmann::json;

namespace {

constexpr std::string_view kHashField = ",\"hash\":\"";

// Splits a line into the hashed body and the stored hash.
bool split_line(std::string_view line, std::string_view& body, std::string_view& hash) {
  auto pos = line.rfind(kHashField);
  if (pos == std::string_view::npos || line.size() < pos + kHashField.size() + 64 + 2) return false;
  body = line.substr(0, pos);
  hash = line.substr(pos + kHashField.size(), 64);
  return line.substr(pos + kHashField.size() + 64) == "\"}";
}

// The log's lines; `partial` = the last one has no '\n' (torn by a crash).
std::vector<std::string_view> split_lines(std::string_view text, bool& partial) {
  std::vector<std::string_view> lines;
  partial = false;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto nl = text.find('\n', pos);
    if (nl == std::string_view::npos) {
      lines.push_back(text.substr(pos));
      partial = true;
      break;
    }
    lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

// The fields of a record as the writer writes them. A field that is absent
// or of another type is nullopt / nullptr: json::value() and get<>() would
// throw on it (or convert: get<std::uint64_t>() turns -1 into 2^64-1 and
// 1.5 into 1), and the content is untrusted.
std::optional<std::uint64_t> unsigned_field(const json& j, const char* name) {
  auto it = j.find(name);  // end() when j is not an object
  if (it == j.end() || !it->is_number_unsigned()) return std::nullopt;
  return it->get<std::uint64_t>();
}

const std::string* string_field(const json& j, const char* name) {
  auto it = j.find(name);
  return it == j.end() ? nullptr : it->get_ptr<const std::string*>();
}

bool string_field_is(const json& j, const char* name, std::string_view value) {
  const std::string* s = string_field(j, name);
  return s != nullptr && *s == value;
}

}  // namespace

std::string audit_chain_hash(std::string_view prev_hash, std::string_view body) {
  std::string input;
  input.reserve(prev_hash.size() + 1 + body.size());
  input.append(prev_hash).append("\n").append(body);
  return crypto::to_hex(crypto::sha256(crypto::as_bytes(input)));
}

AuditRecordText audit_record_text(json event, std::uint64_t seq, const std::string& prev_hash) {
  event["seq"] = seq;
  event["prevHash"] = prev_hash;
  std::string body = event.dump();
  body.pop_back();  // the closing brace
  AuditRecordText out;
  out.point = AuditChainPoint{seq, audit_chain_hash(prev_hash, body)};
  out.line = std::move(body);
  out.line.append(kHashField).append(out.point.hash).append("\"}\n");
  return out;
}

std::string audit_checkpoint_mac_input(std::uint64_t seq, std::string_view prev_hash) {
  return "kmsfs-audit-checkpoint:" + std::to_string(seq) + ":" + std::string(prev_hash);
}

std::string audit_head_mac_input(std::uint64_t seq, std::string_view hash) {
  return "kmsfs-audit-head:" + std::to_string(seq) + ":" + std::string(hash);
}

std::optional<AuditChainPoint> parse_audit_tail_line(std::string_view line) {
  const json j = json::parse(line, nullptr, false);
  const auto seq = unsigned_field(j, "seq");
  const std::string* hash = string_field(j, "hash");
  if (!seq || hash == nullptr) return std::nullopt;
  return AuditChainPoint{*seq, *hash};
}

std::optional<AuditHead> parse_audit_head(std::string_view text) {
  const json h = json::parse(text, nullptr, false);
  const auto seq = unsigned_field(h, "seq");
  const std::string* hash = string_field(h, "hash");
  const std::string* mac = string_field(h, "mac");
  if (!seq || hash == nullptr || mac == nullptr) return std::nullopt;
  return AuditHead{*seq, *hash, *mac};
}

KmsResult<AuditVerifyReport> verify_audit_text(std::string_view log, std::optional<std::string_view> head,
                                               const AuditMacFn& mac_hex, std::string_view head_name) {
  AuditVerifyReport rep;
  auto fail = [&](std::uint64_t line, std::optional<std::uint64_t> seq, std::string problem) {
    rep.ok = false;
    rep.line = line;
    rep.seq = seq;
    rep.problem = "line " + std::to_string(line) + (seq ? " (seq " + std::to_string(*seq) + ")" : std::string()) +
                  ": " + std::move(problem);
    return rep;
  };
  bool partial = false;
  const std::vector<std::string_view> lines = split_lines(log, partial);
  // First pass: where each seq is, to tell a removal from a reordering.
  std::map<std::uint64_t, std::uint64_t> line_of_seq;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const json j = json::parse(lines[i], nullptr, false);
    if (auto seq = unsigned_field(j, "seq")) line_of_seq.emplace(*seq, i + 1);
  }
  std::string prev = kAuditZeroHash;
  std::uint64_t expected = 1;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::uint64_t ln = i + 1;
    if (partial && i + 1 == lines.size()) {
      rep.torn_tail_bytes = lines[i].size();
      break;
    }
    const json j = json::parse(lines[i], nullptr, false);
    if (!j.is_object()) return fail(ln, std::nullopt, "not a JSON record (edited or truncated)");
    if (!j.contains("seq") || !j.contains("prevHash") || !j.contains("hash")) {
      return fail(ln, std::nullopt, "has no seq/prevHash/hash (edited)");
    }
    const auto seq_field = unsigned_field(j, "seq");
    if (!seq_field) return fail(ln, std::nullopt, "seq is not an unsigned 64-bit integer (edited)");
    const std::uint64_t seq = *seq_field;
    if (seq != expected) {
      auto it = line_of_seq.find(expected);
      if (it != line_of_seq.end() && it->second > ln) {
        return fail(ln, seq, "out of order: expected seq " + std::to_string(expected) + ", which appears later at line " +
                                 std::to_string(it->second) + " (records reordered)");
      }
      if (seq > expected) {
        return fail(ln, seq, "record seq " + std::to_string(expected) +
                                 (seq - expected > 1 ? " to " + std::to_string(seq - 1) : std::string()) +
                                 " missing before this line (removed)");
      }
      return fail(ln, seq, "expected seq " + std::to_string(expected) + " (duplicated or reordered)");
    }
    std::string_view body, hash;
    if (!split_line(lines[i], body, hash)) return fail(ln, seq, "the hash field is malformed (edited)");
    if (!string_field_is(j, "prevHash", prev)) return fail(ln, seq, "prevHash does not match the previous record (edited, removed or reordered)");
    if (audit_chain_hash(prev, body) != hash) return fail(ln, seq, "edited: the record's hash does not match its content");
    if (string_field_is(j, "eventType", "AuditCheckpoint")) {
      auto m = mac_hex(audit_checkpoint_mac_input(seq, prev));
      if (!m) return Unexpected<KmsError>(m.error());
      if (!string_field_is(j, "mac", *m)) {
        return fail(ln, seq, "the checkpoint's HSM MAC does not verify (the chain before it was rewritten)");
      }
      ++rep.checkpoints;
    }
    prev = hash;
    ++expected;
    ++rep.records;
    rep.last_seq = seq;
  }
  if (head) {
    auto h = parse_audit_head(*head);
    if (!h) {
      rep.ok = false;
      rep.problem = std::string(head_name) + " is malformed";
      return rep;
    }
    auto m = mac_hex(audit_head_mac_input(h->seq, h->hash));
    if (!m) return Unexpected<KmsError>(m.error());
    if (h->mac != *m) {
      rep.ok = false;
      rep.problem = std::string(head_name) + ": the HSM MAC does not verify (the head was edited)";
      return rep;
    }
    ++rep.checkpoints;
    if (h->seq > rep.last_seq) {
      return fail(lines.size() + 1, h->seq,
                  "truncated: the log ends at seq " + std::to_string(rep.last_seq) + " but the HSM-MACed head names seq " +
                      std::to_string(h->seq) + " (records " + std::to_string(rep.last_seq + 1) + " to " +
                      std::to_string(h->seq) + " removed)");
    }
    auto it = line_of_seq.find(h->seq);
    if (it != line_of_seq.end()) {
      std::string_view body, hash;
      if (split_line(lines[it->second - 1], body, hash) && hash != h->hash) {
        return fail(it->second, h->seq, "differs from the HSM-MACed head (the log was rewritten)");
      }
    }
  }
  return rep;
}

namespace {

// `arn` names the key `k`: the same ARN, or an ARN ending in the key id.
bool arn_names(std::string_view arn, std::string_view k) {
  return arn.size() >= k.size() && arn.substr(arn.size() - k.size()) == k;
}

bool names_key(const json& j, const std::string& k) {
  auto res = j.find("resources");
  if (res != j.end() && res->is_array()) {
    for (const auto& r : *res) {
      const std::string* arn = string_field(r, "ARN");
      if (arn != nullptr && arn_names(*arn, k)) return true;
    }
  }
  auto params = j.find("requestParameters");
  return params != j.end() && string_field_is(*params, "keyId", k);
}

}  // namespace

std::vector<json> search_audit_text(std::string_view log, const AuditSearch& q) {
  std::vector<json> out;
  std::size_t pos = 0;
  while (pos < log.size() && out.size() < q.limit) {
    auto nl = log.find('\n', pos);
    if (nl == std::string_view::npos) break;
    json j = json::parse(log.substr(pos, nl - pos), nullptr, false);
    pos = nl + 1;
    if (!j.is_object() || string_field_is(j, "eventType", "AuditCheckpoint")) continue;
    if (q.event_name && !string_field_is(j, "eventName", *q.event_name)) continue;
    if (q.since) {
      const std::string* t = string_field(j, "eventTime");
      if ((t != nullptr ? std::string_view(*t) : std::string_view()) < *q.since) continue;
    }
    if (q.key_id && !names_key(j, *q.key_id)) continue;
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace kmsfs::keyclient
