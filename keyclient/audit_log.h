#pragma once
// The KMS audit trail: STATE/audit.log, one JSON line per call (allowed,
// denied or failed), shaped like a CloudTrail record, hash-chained:
//
//   {..., "seq": N, "prevHash": "<hash of record N-1>", "hash": "<hex>"}
//   hash = SHA-256(prevHash ‖ "\n" ‖ the line's bytes up to, not including,
//          ",\"hash\":...")   (record 1 has prevHash = 64 zeros)
//
// Every `checkpoint_every` records a checkpoint record carries
// "mac" = HMAC-SHA-256(prevHash) under an HMAC key that lives in the HSM
// (label kmsfs/audit-hmac); STATE/audit.head holds the newest checkpointed
// {seq, hash, mac}, rewritten atomically at each checkpoint and when a core
// closes. So an edited, removed, reordered or truncated record is detected,
// even by someone who recomputes the plain hashes after an edit.
//
// Several processes may append to one log: each append holds an exclusive
// flock on STATE/audit.lock, reads the chain's tail (unless it wrote the
// tail itself) and writes its whole line with one write(2) on an O_APPEND
// descriptor. A durable append fdatasyncs before returning.
//
// Thread safety: all methods may be called concurrently (mu_ serialises
// this process's appenders; the flock serialises processes).

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/hsm.h"
#include "keyclient/kms_error.h"

namespace kmsfs::keyclient {

struct AuditVerifyReport {
  bool ok = true;
  std::uint64_t records = 0;      // lines read
  std::uint64_t checkpoints = 0;  // MACs verified
  std::uint64_t last_seq = 0;
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

class AuditLog {
 public:
  static constexpr const char* kHmacLabel = "kmsfs/audit-hmac";

  AuditLog(std::string state_dir, Hsm& hsm, std::uint64_t checkpoint_every = 64);
  ~AuditLog();  // writes the head (best effort)
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  const std::string& path() const { return path_; }

  // Appends `event` (a JSON object without seq/prevHash/hash) and, when
  // due, a checkpoint. `durable`: fdatasync before returning.
  KmsResult<void> append(const nlohmann::json& event, bool durable);
  // Writes STATE/audit.head for the current tail (MACed in the HSM).
  KmsResult<void> write_head();

  KmsResult<AuditVerifyReport> verify();
  KmsResult<std::vector<nlohmann::json>> search(const AuditSearch& query);

 private:
  KmsResult<void> ensure_hmac_key();
  KmsResult<std::vector<std::uint8_t>> mac(const std::string& text);
  KmsResult<void> append_locked(const nlohmann::json& event, bool durable);
  KmsResult<void> write_head_locked();
  KmsResult<void> load_tail();

  std::string dir_;
  std::string path_;
  std::string head_path_;
  std::string lock_path_;
  Hsm& hsm_;
  std::uint64_t checkpoint_every_;

  std::mutex mu_;  // guards everything below
  bool hmac_ready_ = false;
  bool dirty_ = false;  // appended since the last head write
  // The tail as this process last wrote it, valid while the file's identity
  // and size are unchanged.
  std::uint64_t tail_seq_ = 0;
  std::string tail_hash_;
  std::uint64_t tail_ino_ = 0;
  std::int64_t tail_size_ = -1;
};

// "2026-11-29T11:11:42Z"
std::string iso8601_utc(double epoch_seconds);

}  // namespace kmsfs::keyclient
