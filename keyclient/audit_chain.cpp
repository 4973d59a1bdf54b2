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
  json j = json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.contains("seq") || !j.contains("hash")) return std::nullopt;
  return AuditChainPoint{j["seq"].get<std::uint64_t>(), j["hash"].get<std::string>()};
}

std::optional<AuditHead> parse_audit_head(std::string_view text) {
  json h = json::parse(text, nullptr, false);
  if (h.is_discarded() || !h.contains("seq") || !h.contains("hash") || !h.contains("mac")) return std::nullopt;
  return AuditHead{h["seq"].get<std::uint64_t>(), h["hash"].get<std::string>(), h["mac"].get<std::string>()};
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
    json j = json::parse(lines[i], nullptr, false);
    if (!j.is_discarded() && j.contains("seq") && j["seq"].is_number_unsigned()) {
      line_of_seq.emplace(j["seq"].get<std::uint64_t>(), i + 1);
    }
  }
  std::string prev = kAuditZeroHash;
  std::uint64_t expected = 1;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::uint64_t ln = i + 1;
    if (partial && i + 1 == lines.size()) {
      return fail(ln, std::nullopt, "the last record is truncated (no end of line)");
    }
    json j = json::parse(lines[i], nullptr, false);
    if (j.is_discarded() || !j.is_object()) return fail(ln, std::nullopt, "not a JSON record (edited or truncated)");
    if (!j.contains("seq") || !j["seq"].is_number_unsigned() || !j.contains("prevHash") || !j.contains("hash")) {
      return fail(ln, std::nullopt, "has no seq/prevHash/hash (edited)");
    }
    const std::uint64_t seq = j["seq"].get<std::uint64_t>();
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
    if (j["prevHash"] != prev) return fail(ln, seq, "prevHash does not match the previous record (edited, removed or reordered)");
    if (audit_chain_hash(prev, body) != hash) return fail(ln, seq, "edited: the record's hash does not match its content");
    if (j.value("eventType", std::string()) == "AuditCheckpoint") {
      auto m = mac_hex(audit_checkpoint_mac_input(seq, prev));
      if (!m) return Unexpected<KmsError>(m.error());
      if (j.value("mac", std::string()) != *m) {
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

std::vector<json> search_audit_text(std::string_view log, const AuditSearch& q) {
  std::vector<json> out;
  std::size_t pos = 0;
  while (pos < log.size() && out.size() < q.limit) {
    auto nl = log.find('\n', pos);
    if (nl == std::string_view::npos) break;
    json j = json::parse(log.substr(pos, nl - pos), nullptr, false);
    pos = nl + 1;
    if (j.is_discarded() || j.value("eventType", std::string()) == "AuditCheckpoint") continue;
    if (q.event_name && j.value("eventName", std::string()) != *q.event_name) continue;
    if (q.since && j.value("eventTime", std::string()) < *q.since) continue;
    if (q.key_id) {
      bool hit = false;
      const std::string& k = *q.key_id;
      if (j.contains("resources")) {
        for (const auto& r : j["resources"]) {
          const std::string arn = r.value("ARN", std::string());
          hit = hit || arn == k || (arn.size() >= k.size() && arn.compare(arn.size() - k.size(), k.size(), k) == 0);
        }
      }
      if (j.contains("requestParameters") && j["requestParameters"].is_object()) {
        hit = hit || j["requestParameters"].value("keyId", std::string()) == k;
      }
      if (!hit) continue;
    }
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace kmsfs::keyclient
