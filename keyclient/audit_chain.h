#pragma once
// The text of the audit trail (format in audit_log.h and docs/kms-api.md,
// "Audit trail"): how a record is chained, and the readers of the bytes of
// STATE/audit.log and STATE/audit.head. Pure functions of those bytes, so
// that they are tested and fuzzed without files or an HSM: the HSM's part
// (checkpoint and head MACs) is a callback. AuditLog does the locking and
// the reading around them.
//
// Both files are untrusted input: anyone who can write the state dir may
// have edited them, and a crash may have torn the last line. No reader
// throws on any content: a record that is not what the writer writes (not
// a JSON object, a field missing or of another type, a seq that is not an
// unsigned 64-bit integer) is reported with its line as edited, a head of
// another shape as malformed. tests/fuzz/audit_log_fuzz.cpp holds them to
// that.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/kms_error.h"

namespace kmsfs::keyclient {

struct AuditVerifyReport {
  bool ok = true;
  std::uint64_t records = 0;      // lines read
  std::uint64_t checkpoints = 0;  // MACs verified
  std::uint64_t last_seq = 0;
  // Bytes after the last '\n': a record torn by a crash (its call never
  // returned). Reported, not a failure; the next append cuts them off.
  std::uint64_t torn_tail_bytes = 0;
  std::optional<std::uint64_t> line;  // 1-based line of the first problem
  std::optional<std::uint64_t> seq;   // its seq, when known
  std::string problem;                // names the record and what is wrong
};

struct AuditSearch {
  std::optional<std::string> key_id;      // key id or ARN
  std::optional<std::string> event_name;  // "Decrypt"
  std::optional<std::string> since;       // ISO 8601 ("2026-01-01T00:00:00Z") or a date prefix
  std::size_t limit = 1000;
};

// A position in the chain: the seq of a record and its hash (64 hex digits
// when written by AuditLog).
struct AuditChainPoint {
  std::uint64_t seq = 0;
  std::string hash;
};

// STATE/audit.head: the newest checkpointed position and its MAC.
struct AuditHead {
  std::uint64_t seq = 0;
  std::string hash;
  std::string mac;  // hex HMAC-SHA-256 of audit_head_mac_input(seq, hash)
};

// The prevHash of record 1.
inline const std::string kAuditZeroHash(64, '0');

// hash = SHA-256(prev_hash ‖ "\n" ‖ body), lowercase hex.
std::string audit_chain_hash(std::string_view prev_hash, std::string_view body);

// One record as the appender writes it: `event` (a JSON object) with "seq"
// and "prevHash" added, then ",\"hash\":\"<hex>\"}\n". Returns the line and
// the new tail.
struct AuditRecordText {
  std::string line;  // ends with '\n'
  AuditChainPoint point;
};
AuditRecordText audit_record_text(nlohmann::json event, std::uint64_t seq, const std::string& prev_hash);

// An event as its top-level fields, each value already JSON text: what a
// KMS call's record is built from without a JSON tree (building and dumping
// the tree was a third of an embedded Decrypt's CPU). The record's text is
// the same as from the JSON object: keys in byte order, as nlohmann's
// objects dump them; a key given twice keeps its last value.
class AuditFields {
 public:
  // `json_value`: JSON text (a number, "\"quoted\"", an object's dump()).
  void add(std::string key, std::string json_value);
  void add_string(std::string key, std::string_view value);  // escapes like nlohmann's dump()
  static AuditFields of(const nlohmann::json& event);        // an object's fields
  // The value of a string field ("" when absent or not a string).
  std::string string_value(std::string_view key) const;
  // "{...}" with `extra` fields merged in (they win over same-named ones).
  std::string text(std::vector<std::pair<std::string, std::string>> extra = {}) const;

 private:
  std::vector<std::pair<std::string, std::string>> fields_;
};
AuditRecordText audit_record_text(const AuditFields& event, std::uint64_t seq, const std::string& prev_hash);
// A string as nlohmann's dump() writes it, quotes included.
std::string audit_json_string(std::string_view s);

// The texts the HSM MACs: a checkpoint record's "mac" covers its seq and
// prevHash; the head's covers its seq and hash.
std::string audit_checkpoint_mac_input(std::uint64_t seq, std::string_view prev_hash);
std::string audit_head_mac_input(std::uint64_t seq, std::string_view hash);

// The last complete line of the log as the appender chains onto it.
// nullopt when it is not a chained record: not a JSON object, or "seq" is
// not an unsigned integer, or "hash" is not a string.
std::optional<AuditChainPoint> parse_audit_tail_line(std::string_view line);

// The content of STATE/audit.head. nullopt when malformed: not a JSON
// object, or "seq" is not an unsigned integer, or "hash"/"mac" are not
// strings.
std::optional<AuditHead> parse_audit_head(std::string_view text);

// Computes the hex HMAC-SHA-256 of `text` (in the HSM, in production).
using AuditMacFn = std::function<KmsResult<std::string>(const std::string& text)>;

// Checks the chain of `log`, its checkpoint MACs and, when given, the head
// (whose problems are named with `head_name`). A damaged log is a report
// with ok = false naming the first bad record; an error is only what
// `mac_hex` returns (the HSM failed). An AuditLogTampered record (below) is
// such a problem, named with the cut or fork it records: the log stays
// invalid after later records moved the head past the damage.
KmsResult<AuditVerifyReport> verify_audit_text(std::string_view log, std::optional<std::string_view> head,
                                               const AuditMacFn& mac_hex, std::string_view head_name = "audit.head");

// --- the appender's check of the log against the head ----------------------
//
// The head only ever names a record that was complete and fdatasynced in
// the log (AuditLog writes it after the sync), and a kill can only tear the
// record being written after it. So when an appender finds the log ending
// before the head's seq, or a record with the head's seq but another hash,
// records the head vouched for were removed or rewritten. Left alone, the
// next appends would chain onto the shortened or forged tail, reuse the
// removed seqs, and once past the old head get a head MACed over them:
// `audit verify` would then find nothing. So the appender records what it
// found in the chain (an AuditLogTampered record, below) and verify names
// that record from then on.

enum class AuditHeadMatch {
  Consistent,  // the record with the head's seq has the head's hash
  Cut,         // the log ends before the head's seq: records were removed
  Forked,      // the record with the head's seq has another hash: rewritten
  NeedMore,    // that record lies before the start of the window
  Unknown,     // no record with the head's seq where a gap-free chain has it
               // (`audit verify` names such a log by itself)
};

struct AuditHeadCheck {
  AuditHeadMatch match = AuditHeadMatch::Unknown;
  std::string found_hash;  // Forked: the hash the log has at the head's seq
};

// Compares the log's end with `head`. `tail` is the last complete line of
// the log (as the appender chains onto it); `window` is the log's last
// bytes, ending with that line (bytes after the last '\n' are ignored),
// and `whole_log` says whether it starts at the beginning of the file.
// The record with the head's seq is looked up where a gap-free chain puts
// it, tail.seq - head.seq lines before the tail, and parsed alone.
AuditHeadCheck check_audit_end_against_head(std::string_view window, bool whole_log, const AuditChainPoint& tail,
                                            const AuditChainPoint& head);

inline constexpr std::string_view kAuditTamperEventName = "AuditLogTampered";

// The record the appender writes into the chain, before the caller's, when
// check_audit_end_against_head() found a cut or a fork: the head's seq and
// hash, the tail it found and, for a fork, the hash the log has at the
// head's seq (serviceEventDetails: headSeq, headHash, tailSeq, tailHash,
// recordHash).
nlohmann::json audit_tamper_event(const AuditChainPoint& head, const AuditChainPoint& tail, const AuditHeadCheck& found,
                                  std::string event_time);

// Whether `window` (lines of the log) holds an AuditLogTampered record
// that names `head`: a cut is recorded once, not again by every process
// that appends before the head has moved past it.
bool audit_tamper_recorded(std::string_view window, const AuditChainPoint& head);

// The event records of `log` that match `query` (checkpoints, lines that
// are not JSON objects and a partial last line are skipped), oldest first,
// at most query.limit. A field of another type than the writer writes does
// not match.
std::vector<nlohmann::json> search_audit_text(std::string_view log, const AuditSearch& query);

}  // namespace kmsfs::keyclient
