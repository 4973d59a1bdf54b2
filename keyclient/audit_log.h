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
// {seq, hash, mac}, rewritten atomically after each checkpoint (by the
// flusher, below) and when a core closes. So an edited, removed, reordered
// or truncated record is detected, even by someone who recomputes the plain
// hashes after an edit. An append onto a tail this object did not write
// compares the log with the head first: when records the head vouched for
// are gone or different, it writes an AuditLogTampered record before the
// caller's (audit_chain.h), so the damage stays named after later records
// move the head on. The call itself is never refused for it.
//
// Several processes may append to one log: each append holds an exclusive
// flock on STATE/audit.lock, reads the chain's tail (unless it wrote the
// tail itself) and writes its whole line with one write(2) on an O_APPEND
// descriptor. The log and lock files stay open for the object's lifetime
// (reopened when the log is replaced).
//
// Durability (docs/kms-api.md, "Audit trail"): when append() returns, the
// record is in the file (the kernel's page cache), so killing the process
// loses nothing already returned. A `Durable` append is also fdatasynced
// before it returns (group commit: concurrent durable appends share one
// fdatasync). A `Buffered` append is made durable by a background flusher
// within `sync_interval` (started at the first buffered append, so after a
// daemon's fork); sync_interval 0 makes every append durable. The head is
// written by the flusher (and at close) only after the log is synced up to
// the record it names, so a power loss never leaves a head that is ahead of
// the log. The flusher never calls the HSM: an appender that writes a
// checkpoint also MACs the head for it.
//
// The record format and the readers of the files' text are in
// audit_chain.h; this class adds the files, their locks and the HSM.
//
// Thread safety: all methods may be called concurrently. Lock order:
// mu_ (this process's appenders), then the flock on audit.lock; sync_mu_
// and head_mu_ are taken with no other lock held, except that flush_mu_
// is taken briefly under mu_ to wake the flusher.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/audit_chain.h"
#include "keyclient/hsm.h"
#include "keyclient/kms_error.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

struct AuditLogOptions {
  std::uint64_t checkpoint_every = 64;  // 0 = 64
  // How long a Buffered record may stay in the page cache before the
  // flusher fdatasyncs it. 0 = fdatasync every append before it returns.
  std::chrono::milliseconds sync_interval{100};
};

enum class AuditDurability {
  Buffered,  // in the file when append() returns; fdatasynced within sync_interval
  Durable,   // fdatasynced before append() returns
};

class AuditLog {
 public:
  static constexpr const char* kHmacLabel = "kmsfs/audit-hmac";

  AuditLog(std::string state_dir, Hsm& hsm, AuditLogOptions options = {});
  ~AuditLog();  // stops the flusher, fdatasyncs, writes the head (best effort)
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  const std::string& path() const { return path_; }

  // Appends `event` (a JSON object without seq/prevHash/hash) and, when
  // due, a checkpoint, with one write(2).
  KmsResult<void> append(const nlohmann::json& event, AuditDurability durability);
  KmsResult<void> append(const AuditFields& event, AuditDurability durability);
  // fdatasyncs everything this object appended, then writes STATE/audit.head
  // for the current tail (MACed in the HSM).
  KmsResult<void> write_head();
  // fdatasyncs everything this object appended so far.
  KmsResult<void> sync();

  KmsResult<AuditVerifyReport> verify();
  KmsResult<std::vector<nlohmann::json>> search(const AuditSearch& query);

  // For tests and diagnostics: appends (write(2) calls) made by this object,
  // and how many of them an fdatasync has covered.
  struct Counters {
    std::uint64_t appended = 0;
    std::uint64_t synced = 0;
    std::uint64_t fdatasyncs = 0;
  };
  Counters counters() const;

 private:
  struct Tail {
    std::uint64_t seq = 0;
    std::string hash;
    std::string mac;  // hex HMAC of the head text; empty = compute it
  };

  KmsResult<void> ensure_hmac_key();
  KmsResult<std::vector<std::uint8_t>> mac(const std::string& text);
  // Under mu_: (re)opens the log when needed and takes the flock.
  KmsResult<void> open_locked();
  KmsResult<void> load_tail(const struct stat& st);
  // Under mu_ and the flock, after load_tail() of a tail this object did
  // not write: the AuditLogTampered record to write first when the log ends
  // before the head's seq or differs from the head there (the head's MAC
  // verified in the HSM), unless one naming that head is already there.
  // Never an error: a check that cannot be made is logged and skipped, so
  // that whoever can write the log cannot stop the KMS.
  std::optional<nlohmann::json> check_against_head(off_t log_size, const std::string& event_time);
  // Up to `max` bytes of the log ending at `end`.
  KmsResult<std::string> read_back(off_t end, off_t max);
  // Under mu_ and the flock, when the log does not end with '\n': cuts off
  // the partial record a killed appender left (st.st_size updated) and
  // returns how many bytes; -1 when the file cannot be truncated.
  KmsResult<std::int64_t> cut_torn_tail(struct stat& st);
  // fdatasyncs `fd` (a descriptor of the log) so that append number `upto`
  // and everything before it is durable; concurrent callers share syncs.
  KmsResult<void> sync_upto(const std::shared_ptr<UniqueFd>& fd, std::uint64_t upto);
  KmsResult<void> write_head_for(const Tail& tail);
  void start_flusher_locked();
  void flusher_main();

  std::string dir_;
  std::string path_;
  std::string head_path_;
  std::string lock_path_;
  std::string head_lock_path_;
  Hsm& hsm_;
  AuditLogOptions opts_;

  std::atomic<bool> hmac_ready_{false};

  std::mutex mu_;  // guards everything down to flusher_
  std::shared_ptr<UniqueFd> log_fd_;  // O_RDWR | O_APPEND, shared with syncs in flight
  std::uint64_t log_ino_ = 0;
  dev_t log_dev_ = 0;
  UniqueFd lock_fd_;  // audit.lock, flocked for each append
  // A checkpoint was appended since the last head write: pending_head_
  // (MACed by the appender, so that the flusher never calls the HSM) is
  // written by the flusher once the log is synced up to it.
  bool head_due_ = false;
  Tail pending_head_;
  // The tail as this process last wrote it, valid while the file's identity
  // and size are unchanged.
  std::uint64_t tail_seq_ = 0;
  std::string tail_hash_;
  std::uint64_t tail_ino_ = 0;
  std::int64_t tail_size_ = -1;
  std::thread flusher_;  // started at the first Buffered append

  std::atomic<std::uint64_t> appended_{0};  // written under mu_

  mutable std::mutex sync_mu_;  // serialises fdatasync; guards synced_, fdatasyncs_
  std::uint64_t synced_ = 0;
  std::uint64_t fdatasyncs_ = 0;

  std::mutex head_mu_;  // serialises head writes of this object

  std::mutex flush_mu_;  // guards stop_, flush_wanted_; with flush_cv_
  std::condition_variable flush_cv_;
  bool stop_ = false;
  bool flush_wanted_ = false;
};

// "2026-11-29T11:11:42Z"
std::string iso8601_utc(double epoch_seconds);

}  // namespace kmsfs::keyclient
