// libFuzzer target: the readers of the audit trail (keyclient/audit_chain.h)
// over hostile STATE/audit.log and STATE/audit.head contents. The input is
// the log's text, optionally followed by a line "#audit.head" and the head
// file's text. No input may throw or crash; a damaged log is a report that
// names its problem; a log that verifies can be appended to (the way
// AuditLog chains onto its tail) and still verifies; the appender's check
// against the head never calls a log that verifies cut or rewritten, and
// the AuditLogTampered record it writes otherwise makes verify fail.
//
// The MAC callback is SHA-256 of the text (not the HSM's HMAC), so that
// inputs with valid checkpoints and heads can be written by hand and found
// by the fuzzer.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "crypto/encoding.h"
#include "crypto/sha256.h"
#include "keyclient/audit_chain.h"

namespace kc = kmsfs::keyclient;

namespace {

constexpr std::string_view kHeadMarker = "\n#audit.head\n";

kc::KmsResult<std::string> fake_mac(const std::string& text) {
  return kmsfs::crypto::to_hex(kmsfs::crypto::sha256(kmsfs::crypto::as_bytes(text)));
}

void check_report(const kc::AuditVerifyReport& r) {
  if (r.ok != r.problem.empty()) std::abort();
  if (r.line && r.problem.rfind("line " + std::to_string(*r.line), 0) != 0) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string_view log = input;
  std::optional<std::string_view> head;
  if (auto m = input.find(kHeadMarker); m != std::string_view::npos) {
    log = input.substr(0, m + 1);  // the log keeps the marker's '\n'
    head = input.substr(m + kHeadMarker.size());
  }

  auto rep = kc::verify_audit_text(log, head, fake_mac);
  if (!rep) std::abort();  // only a failing MAC callback is an error
  check_report(*rep);

  // What the appender reads: the last complete line.
  std::string_view last;
  if (!log.empty() && log.back() == '\n') {
    const auto body = log.substr(0, log.size() - 1);
    const auto nl = body.rfind('\n');
    last = nl == std::string_view::npos ? body : body.substr(nl + 1);
  }
  auto tail = kc::parse_audit_tail_line(last);
  (void)kc::parse_audit_tail_line(input);
  std::optional<kc::AuditHead> parsed_head;
  if (head) parsed_head = kc::parse_audit_head(*head);

  // What the appender reads before chaining onto a tail it did not write:
  // the head against the log's end (as the whole file, and as a window
  // that starts mid-file), and the AuditLogTampered records already there.
  if (tail && parsed_head) {
    const kc::AuditChainPoint named{parsed_head->seq, parsed_head->hash};
    const auto whole = kc::check_audit_end_against_head(log, true, *tail, named);
    if (whole.match == kc::AuditHeadMatch::NeedMore) std::abort();
    (void)kc::check_audit_end_against_head(log.substr(log.size() / 2), false, *tail, named);
    (void)kc::audit_tamper_recorded(log, named);
    // A log that verifies against its head is never taken for a cut or a
    // fork (that would be a false AuditLogTampered record).
    if (rep->ok && parsed_head->seq > 0 && whole.match != kc::AuditHeadMatch::Consistent) std::abort();
    // The record written when the check finds damage makes verify fail.
    if (whole.match == kc::AuditHeadMatch::Cut || whole.match == kc::AuditHeadMatch::Forked) {
      auto marked = kc::audit_record_text(kc::audit_tamper_event(named, *tail, whole, ""), tail->seq + 1, tail->hash);
      auto v = kc::verify_audit_text(std::string(log) + marked.line, head, fake_mac);
      if (!v || v->ok) std::abort();
    }
  }

  // A log that verifies ends with a record the appender chains onto, and
  // stays valid when it does.
  if (rep->ok && rep->records > 0 && log.back() == '\n') {
    if (!tail || tail->seq != rep->last_seq) std::abort();
    auto next = kc::audit_record_text(nlohmann::json{{"eventName", "Decrypt"}, {"eventType", "AwsApiCall"}},
                                      tail->seq + 1, tail->hash);
    std::string longer(log);
    longer += next.line;
    auto again = kc::verify_audit_text(longer, head, fake_mac);
    if (!again || !again->ok || again->records != rep->records + 1) std::abort();
  }

  // kmsctl audit search: a key by ARN or id, an event name, a date.
  const std::string key = "00000000-0000-4000-8000-000000000001";
  kc::AuditSearch queries[5];
  queries[1].key_id = "arn:aws:kms:local:000000000000:key/" + key;
  queries[2].key_id = key;
  queries[2].event_name = "Decrypt";
  queries[3].since = "2026-01-01";
  queries[3].limit = 1;
  queries[4].event_name = "AuditCheckpoint";
  for (const auto& q : queries) {
    auto found = kc::search_audit_text(log, q);
    if (found.size() > q.limit) std::abort();
    for (const auto& e : found) {
      if (!e.is_object()) std::abort();
      (void)e.dump();  // what kmsd sends back
    }
  }
  return 0;
}
