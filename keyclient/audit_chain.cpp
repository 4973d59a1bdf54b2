#include "keyclient/audit_chain.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <utility>

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

// The position of the last '\n' before `pos`, or npos.
std::size_t newline_before(std::string_view text, std::size_t pos) {
  return pos == 0 ? std::string_view::npos : text.rfind('\n', pos - 1);
}

std::string short_hash(const std::string& h) { return h.size() > 16 ? h.substr(0, 16) + "..." : h; }

// What an AuditLogTampered record says, for `audit verify`. Its fields are
// read like any other untrusted ones: a field that is missing or of
// another type only makes the sentence vaguer.
std::string tamper_problem(const json& j) {
  static const json kNone = json::object();
  auto it = j.find("serviceEventDetails");
  const json& d = it != j.end() ? *it : kNone;
  const auto head_seq = unsigned_field(d, "headSeq");
  const auto tail_seq = unsigned_field(d, "tailSeq");
  if (!head_seq || !tail_seq) return "the log had been cut back or rewritten before this record (AuditLogTampered)";
  const std::string h = std::to_string(*head_seq);
  const std::string t = std::to_string(*tail_seq);
  if (*head_seq > *tail_seq) {
    const std::string removed = *head_seq - *tail_seq == 1
                                    ? "record " + h + " was removed and its seq reused"
                                    : "records " + std::to_string(*tail_seq + 1) + " to " + h +
                                          " were removed and their seqs reused";
    return "the log had been truncated before this record: cut back from seq " + h + " to seq " + t +
           " (audit.head said seq " + h + "); " + removed;
  }
  const std::string* head_hash = string_field(d, "headHash");
  const std::string* record_hash = string_field(d, "recordHash");
  std::string problem = "the log had been rewritten before this record: audit.head said seq " + h;
  if (head_hash != nullptr) problem += " has hash " + short_hash(*head_hash);
  if (record_hash != nullptr) problem += ", the log had " + short_hash(*record_hash) + " there";
  return problem + " (records up to seq " + h + " edited and rehashed, then chained onto)";
}

}  // namespace

std::string audit_chain_hash(std::string_view prev_hash, std::string_view body) {
  std::string input;
  input.reserve(prev_hash.size() + 1 + body.size());
  input.append(prev_hash).append("\n").append(body);
  return crypto::to_hex(crypto::sha256(crypto::as_bytes(input)));
}

std::string audit_json_string(std::string_view s) {
  bool plain = true;
  for (unsigned char c : s) {
    if (c < 0x20 || c == '"' || c == '\\' || c >= 0x80) {
      plain = false;
      break;
    }
  }
  if (!plain) return json(std::string(s)).dump();  // escapes, and refuses invalid UTF-8, as before
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  out.append(s);
  out.push_back('"');
  return out;
}

void AuditFields::add(std::string key, std::string json_value) {
  fields_.emplace_back(std::move(key), std::move(json_value));
}

void AuditFields::add_string(std::string key, std::string_view value) {
  add(std::move(key), audit_json_string(value));
}

AuditFields AuditFields::of(const json& event) {
  AuditFields f;
  if (!event.is_object()) throw std::invalid_argument("an audit event must be a JSON object");
  for (const auto& [k, v] : event.items()) f.add(k, v.dump());
  return f;
}

std::string AuditFields::string_value(std::string_view key) const {
  for (auto it = fields_.rbegin(); it != fields_.rend(); ++it) {
    if (it->first != key) continue;
    const std::string& text = it->second;
    // As audit_json_string writes a plain string; anything else is parsed.
    if (text.size() >= 2 && text.front() == '"' && text.back() == '"' &&
        text.find('\\') == std::string::npos) {
      return text.substr(1, text.size() - 2);
    }
    const json v = json::parse(text, nullptr, false);
    return v.is_string() ? v.get<std::string>() : std::string();
  }
  return {};
}

std::string AuditFields::text(std::vector<std::pair<std::string, std::string>> extra) const {
  // Sorted by key, stable: of equal keys the last added (extra last) wins.
  std::vector<const std::pair<std::string, std::string>*> all;
  all.reserve(fields_.size() + extra.size());
  for (const auto& f : fields_) all.push_back(&f);
  for (const auto& f : extra) all.push_back(&f);
  std::stable_sort(all.begin(), all.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
  std::string out = "{";
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (i + 1 < all.size() && all[i + 1]->first == all[i]->first) continue;  // a later one wins
    if (out.size() > 1) out.push_back(',');
    out += audit_json_string(all[i]->first);
    out.push_back(':');
    out += all[i]->second;
  }
  out.push_back('}');
  return out;
}

AuditRecordText audit_record_text(json event, std::uint64_t seq, const std::string& prev_hash) {
  return audit_record_text(AuditFields::of(event), seq, prev_hash);
}

AuditRecordText audit_record_text(const AuditFields& event, std::uint64_t seq, const std::string& prev_hash) {
  std::string body = event.text({{"seq", std::to_string(seq)}, {"prevHash", audit_json_string(prev_hash)}});
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
    // Written by an appender that found records the head vouched for
    // removed or rewritten: the chain may be whole again after it, so the
    // record itself is the evidence.
    if (string_field_is(j, "eventName", kAuditTamperEventName)) return fail(ln, seq, tamper_problem(j));
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

AuditHeadCheck check_audit_end_against_head(std::string_view window, bool whole_log, const AuditChainPoint& tail,
                                            const AuditChainPoint& head) {
  if (head.seq > tail.seq) return {AuditHeadMatch::Cut, {}};
  if (head.seq == tail.seq) {
    if (tail.hash == head.hash) return {AuditHeadMatch::Consistent, {}};
    return {AuditHeadMatch::Forked, tail.hash};
  }
  const AuditHeadMatch short_window = whole_log ? AuditHeadMatch::Unknown : AuditHeadMatch::NeedMore;
  // The '\n' that ends the tail line, then one line further back per seq:
  // records never contain a '\n' (JSON escapes it).
  std::size_t line_end = window.rfind('\n');
  if (line_end == std::string_view::npos) return {short_window, {}};
  for (std::uint64_t back = tail.seq - head.seq; back > 0; --back) {
    line_end = newline_before(window, line_end);
    if (line_end == std::string_view::npos) return {short_window, {}};
  }
  const std::size_t before = newline_before(window, line_end);
  if (before == std::string_view::npos && !whole_log) return {AuditHeadMatch::NeedMore, {}};
  const std::size_t start = before == std::string_view::npos ? 0 : before + 1;
  const auto point = parse_audit_tail_line(window.substr(start, line_end - start));
  if (!point || point->seq != head.seq) return {AuditHeadMatch::Unknown, {}};
  if (point->hash == head.hash) return {AuditHeadMatch::Consistent, {}};
  return {AuditHeadMatch::Forked, point->hash};
}

json audit_tamper_event(const AuditChainPoint& head, const AuditChainPoint& tail, const AuditHeadCheck& found,
                        std::string event_time) {
  json details{{"headSeq", head.seq}, {"headHash", head.hash}, {"tailSeq", tail.seq}, {"tailHash", tail.hash}};
  std::string message;
  if (found.match == AuditHeadMatch::Forked) {
    details["recordHash"] = found.found_hash;
    message = "the record with the seq of audit.head (" + std::to_string(head.seq) +
              ") has another hash than the head: the log was rewritten";
  } else {
    message = "the log ends at seq " + std::to_string(tail.seq) + " but audit.head names seq " +
              std::to_string(head.seq) + ": records were removed";
  }
  return json{{"eventVersion", "1.08"},
              {"eventTime", std::move(event_time)},
              {"eventSource", "kms.amazonaws.com"},
              {"eventName", kAuditTamperEventName},
              {"eventType", "AuditTamperDetected"},
              {"awsRegion", "local"},
              {"userIdentity", {{"type", "KmsCore"}, {"invokedBy", "kms.amazonaws.com"}}},
              {"readOnly", false},
              {"errorCode", kAuditTamperEventName},
              {"errorMessage", std::move(message)},
              {"serviceEventDetails", std::move(details)},
              {"managementEvent", true},
              {"eventCategory", "Management"}};
}

bool audit_tamper_recorded(std::string_view window, const AuditChainPoint& head) {
  std::size_t pos = 0;
  while (pos < window.size()) {
    auto nl = window.find('\n', pos);
    const std::string_view line = window.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? window.size() : nl + 1;
    // Only the rare candidate line is parsed.
    if (line.find(kAuditTamperEventName) == std::string_view::npos) continue;
    const json j = json::parse(line, nullptr, false);
    if (!string_field_is(j, "eventName", kAuditTamperEventName)) continue;
    auto d = j.find("serviceEventDetails");
    if (d == j.end()) continue;
    const auto seq = unsigned_field(*d, "headSeq");
    if (seq && *seq == head.seq && string_field_is(*d, "headHash", head.hash)) return true;
  }
  return false;
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
