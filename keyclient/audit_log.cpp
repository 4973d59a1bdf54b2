#include "keyclient/audit_log.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>

#include "crypto/encoding.h"
#include "keyclient/logger.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

using nlohmann::json;

namespace {

// Releases the flock open_locked() took on audit.lock.
struct FlockRelease {
  int fd;
  ~FlockRelease() { (void)::flock(fd, LOCK_UN); }
};

Unexpected<KmsError> internal(std::string msg) {
  named_logger("kmsfs.kms")->error("audit log: {}", msg);
  return kms_error(KmsErrorCode::KMSInternalException, "audit log: " + std::move(msg));
}

// How far back from the end an append looks for the record the head
// names, and for an AuditLogTampered record already naming the head. The
// head is rewritten every checkpoint, so it is normally a few dozen records
// back; further back, `audit verify` (which reads everything) has to do.
constexpr off_t kHeadCheckWindow = 1 << 20;

Result<std::string, std::string> read_all(const std::string& path) {
  auto t = read_file_if_exists(path);
  if (!t) return unexpected(t.error());
  return t->value_or(std::string());
}

}  // namespace

std::string iso8601_utc(double epoch_seconds) {
  std::time_t t = static_cast<std::time_t>(epoch_seconds);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

AuditLog::AuditLog(std::string state_dir, Hsm& hsm, AuditLogOptions options)
    : dir_(std::move(state_dir)),
      path_(dir_ + "/audit.log"),
      head_path_(dir_ + "/audit.head"),
      lock_path_(dir_ + "/audit.lock"),
      head_lock_path_(dir_ + "/audit.head.lock"),
      hsm_(hsm),
      opts_(options) {
  if (opts_.checkpoint_every == 0) opts_.checkpoint_every = 64;
  if (opts_.sync_interval.count() < 0) opts_.sync_interval = std::chrono::milliseconds(0);
}

AuditLog::~AuditLog() {
  try {
    {
      std::lock_guard<std::mutex> lock(flush_mu_);
      stop_ = true;
    }
    flush_cv_.notify_all();
    std::thread flusher;
    {
      std::lock_guard<std::mutex> lock(mu_);
      flusher = std::move(flusher_);
    }
    if (flusher.joinable()) flusher.join();
    bool wrote = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      wrote = appended_.load() > 0;
    }
    if (wrote) {
      // write_head() syncs the log first, so nothing appended here stays
      // only in the page cache.
      auto w = write_head();
      if (!w) named_logger("kmsfs.kms")->warn("could not write the audit head: {}", w.error().message);
    }
  } catch (...) {
    // A destructor never throws.
  }
}

KmsResult<void> AuditLog::ensure_hmac_key() {
  if (hmac_ready_.load()) return {};
  auto exists = hsm_.key_exists(kHmacLabel);
  if (!exists) return internal("cannot look up the audit HMAC key: " + exists.error().message);
  if (!*exists) {
    auto g = hsm_.generate_hmac_key(kHmacLabel);
    // Another process (or thread) may have created it at the same moment.
    if (!g) {
      auto again = hsm_.key_exists(kHmacLabel);
      if (!again || !*again) return internal("cannot create the audit HMAC key: " + g.error().message);
    }
  }
  hmac_ready_.store(true);
  return {};
}

KmsResult<std::vector<std::uint8_t>> AuditLog::mac(const std::string& text) {
  if (auto e = ensure_hmac_key(); !e) return Unexpected<KmsError>(e.error());
  auto m = hsm_.hmac_sha256(kHmacLabel, std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
  if (!m) return internal("HMAC in the HSM failed: " + m.error().message);
  return std::move(*m);
}

// Under mu_: opens audit.lock once; (re)opens the log when it is not open
// yet or the path now names another file (replaced or removed by an
// operator); then flocks audit.lock. Returns with the flock held only on
// success; the caller unlocks.
KmsResult<void> AuditLog::open_locked() {
  if (!lock_fd_.valid()) {
    UniqueFd fd(::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd.valid()) return internal("cannot open lock file " + lock_path_ + ": " + errno_text(errno));
    lock_fd_ = std::move(fd);
  }
  struct stat st {};
  bool reopen = !log_fd_;
  if (!reopen) {
    if (::stat(path_.c_str(), &st) != 0) {
      if (errno != ENOENT) return internal("cannot stat " + path_ + ": " + errno_text(errno));
      reopen = true;
    } else {
      reopen = st.st_ino != static_cast<ino_t>(log_ino_) || st.st_dev != log_dev_;
    }
  }
  if (reopen) {
    if (log_fd_ && log_fd_->valid()) {
      // Records written to the file being left behind are made durable
      // first: the flusher only follows the current descriptor.
      if (::fdatasync(log_fd_->get()) != 0) {
        named_logger("kmsfs.kms")->warn("audit log: fdatasync of the replaced {} failed: {}", path_, errno_text(errno));
      }
    }
    // O_RDWR, not O_WRONLY: the partial-line check preads the last byte.
    UniqueFd fd(::open(path_.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600));
    if (!fd.valid()) return internal("cannot open " + path_ + ": " + errno_text(errno));
    struct stat fst {};
    if (::fstat(fd.get(), &fst) != 0) return internal("cannot stat " + path_ + ": " + errno_text(errno));
    log_fd_ = std::make_shared<UniqueFd>(std::move(fd));
    log_ino_ = static_cast<std::uint64_t>(fst.st_ino);
    log_dev_ = fst.st_dev;
    tail_size_ = -1;  // re-read the tail of the file now open
  }
  // Last, so that no error path above returns with the flock held. (The
  // identity check needs no lock: a replacement between it and the flock
  // is an operator's doing and is caught by the next append.)
  while (::flock(lock_fd_.get(), LOCK_EX) != 0) {
    if (errno == EINTR) continue;
    return internal("cannot lock " + lock_path_ + ": " + errno_text(errno));
  }
  return {};
}

// Reads the last complete line of the open log into tail_seq_/tail_hash_
// unless this object wrote the tail itself (same file, same size).
KmsResult<void> AuditLog::load_tail(const struct stat& st) {
  if (static_cast<std::uint64_t>(st.st_ino) == tail_ino_ && st.st_size == tail_size_) return {};
  const int fd = log_fd_->get();
  off_t size = st.st_size;
  std::string tail;
  off_t chunk = 65536;
  for (;;) {
    off_t start = size > chunk ? size - chunk : 0;
    tail.resize(static_cast<std::size_t>(size - start));
    ssize_t n = ::pread(fd, tail.data(), tail.size(), start);
    if (n < 0) return internal("cannot read " + path_ + ": " + errno_text(errno));
    tail.resize(static_cast<std::size_t>(n));
    // The last complete line: between the last two '\n' (a partial last
    // line, left by a crash mid-write, is ignored and the next record
    // starts on a fresh line).
    auto end = tail.rfind('\n');
    if (end == std::string::npos) {
      if (start == 0) {
        tail_seq_ = 0;
        tail_hash_ = kAuditZeroHash;
        break;
      }
      chunk *= 4;
      continue;
    }
    auto begin = tail.rfind('\n', end == 0 ? std::string::npos : end - 1);
    if (begin == std::string::npos && start != 0) {
      chunk *= 4;
      continue;
    }
    std::string line = tail.substr(begin == std::string::npos ? 0 : begin + 1,
                                   end - (begin == std::string::npos ? 0 : begin + 1));
    auto point = parse_audit_tail_line(line);
    if (!point) {
      return internal("the last record of " + path_ + " is not a chained record; run `kmsctl audit verify`");
    }
    tail_seq_ = point->seq;
    tail_hash_ = std::move(point->hash);
    break;
  }
  tail_ino_ = static_cast<std::uint64_t>(st.st_ino);
  tail_size_ = st.st_size;
  return {};
}

KmsResult<std::string> AuditLog::read_back(off_t end, off_t max) {
  const off_t start = end > max ? end - max : 0;
  std::string buf(static_cast<std::size_t>(end - start), '\0');
  std::size_t got = 0;
  while (got < buf.size()) {
    const ssize_t n = ::pread(log_fd_->get(), buf.data() + got, buf.size() - got, start + static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return kms_error(KmsErrorCode::KMSInternalException, "cannot read " + path_ + ": " + errno_text(errno));
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  buf.resize(got);
  return buf;
}

std::optional<json> AuditLog::check_against_head(off_t log_size, const std::string& event_time) {
  auto log = named_logger("kmsfs.kms");
  // No head yet, or one that cannot be read or parsed: nothing to compare
  // with (`audit verify` names an unreadable or malformed head).
  auto text = read_file_if_exists(head_path_);
  if (!text || !*text) return std::nullopt;
  const auto head = parse_audit_head(**text);
  if (!head) return std::nullopt;
  const AuditChainPoint named{head->seq, head->hash};
  const AuditChainPoint tail{tail_seq_, tail_hash_};
  // A cut, or a tail at the head's seq, needs no read; otherwise the
  // window grows until it reaches the head's record or its limit.
  AuditHeadCheck found = check_audit_end_against_head({}, log_size == 0, tail, named);
  std::string window;
  for (off_t want = 64 * 1024; found.match == AuditHeadMatch::NeedMore; want *= 4) {
    auto w = read_back(log_size, std::min(want, kHeadCheckWindow));
    if (!w) {
      log->warn("audit log: cannot compare {} with {}: {}", path_, head_path_, w.error().message);
      return std::nullopt;
    }
    window = std::move(*w);
    found = check_audit_end_against_head(window, static_cast<off_t>(window.size()) >= log_size, tail, named);
    if (found.match == AuditHeadMatch::NeedMore && want >= kHeadCheckWindow) {
      log->debug("audit log: the record {} names (seq {}) is not within the last {} bytes of {}; not compared",
                 head_path_, head->seq, kHeadCheckWindow, path_);
      return std::nullopt;
    }
  }
  if (found.match != AuditHeadMatch::Cut && found.match != AuditHeadMatch::Forked) return std::nullopt;
  // Whoever can cut the log can write audit.head as well: only a head whose
  // HSM MAC verifies vouches for anything. (The HSM is asked only here, when
  // the log already looks damaged.)
  auto m = mac(audit_head_mac_input(head->seq, head->hash));
  if (!m) {
    log->warn("audit log: {} does not match {}, whose MAC cannot be checked now ({}); `kmsctl audit verify` compares them",
              path_, head_path_, m.error().message);
    return std::nullopt;
  }
  if (crypto::to_hex(*m) != head->mac) {
    log->warn("audit log: {} does not match {}, but the head's HSM MAC does not verify (the head was edited); "
              "`kmsctl audit verify` reports it",
              path_, head_path_);
    return std::nullopt;
  }
  // Recorded once: later processes find the record (until the head moves
  // past the damage) instead of adding one each.
  if (static_cast<off_t>(window.size()) < std::min(log_size, kHeadCheckWindow)) {
    auto w = read_back(log_size, kHeadCheckWindow);
    if (w) window = std::move(*w);
  }
  if (audit_tamper_recorded(window, named)) return std::nullopt;
  if (found.match == AuditHeadMatch::Cut) {
    log->warn("audit log: {} ends at seq {} but the HSM-MACed {} names seq {}: records were removed; recording "
              "an AuditLogTampered record and appending on (`kmsctl audit verify` names it)",
              path_, tail.seq, head_path_, head->seq);
  } else {
    log->warn("audit log: the record at seq {} of {} has another hash than the HSM-MACed {}: the log was rewritten; "
              "recording an AuditLogTampered record and appending on (`kmsctl audit verify` names it)",
              head->seq, path_, head_path_);
  }
  json event = audit_tamper_event(named, tail, found, event_time);
  event["userIdentity"]["pid"] = ::getpid();
  return event;
}

KmsResult<std::int64_t> AuditLog::cut_torn_tail(struct stat& st) {
  const int fd = log_fd_->get();
  char last = 0;
  if (::pread(fd, &last, 1, st.st_size - 1) != 1) return internal("cannot read " + path_ + ": " + errno_text(errno));
  if (last == '\n') return 0;
  // The last '\n', searching back at most one record's worth at a time.
  off_t end = st.st_size;
  off_t keep = 0;
  std::string buf;
  while (end > 0) {
    const off_t start = end > 65536 ? end - 65536 : 0;
    buf.resize(static_cast<std::size_t>(end - start));
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), start);
    if (n != static_cast<ssize_t>(buf.size())) return internal("cannot read " + path_ + ": " + errno_text(errno));
    const auto nl = buf.rfind('\n');
    if (nl != std::string::npos) {
      keep = start + static_cast<off_t>(nl) + 1;
      break;
    }
    end = start;
  }
  const std::int64_t torn = st.st_size - keep;
  if (::ftruncate(fd, keep) != 0) {
    named_logger("kmsfs.kms")->warn("{}: {} bytes of a record torn by a crash cannot be cut off ({}); the next record starts on a new line",
                path_, torn, errno_text(errno));
    return -1;
  }
  named_logger("kmsfs.kms")->warn("{}: cut off {} bytes of a record torn by a crash (its call never returned)", path_, torn);
  st.st_size = keep;
  return torn;
}

KmsResult<void> AuditLog::append(const json& event, AuditDurability durability) {
  return append(AuditFields::of(event), durability);
}

KmsResult<void> AuditLog::append(const AuditFields& event, AuditDurability durability) {
  std::shared_ptr<UniqueFd> fd;
  std::uint64_t number = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto opened = open_locked();
    if (!opened) return opened;
    const FlockRelease unlock{lock_fd_.get()};  // on every path out of this block

    struct stat st {};
    if (::fstat(log_fd_->get(), &st) != 0) return internal("cannot stat " + path_ + ": " + errno_text(errno));
    const bool own_tail = static_cast<std::uint64_t>(st.st_ino) == tail_ino_ && st.st_size == tail_size_;
    std::string out;
    if (st.st_size > 0 && !own_tail) {
      // A process killed inside its append's write(2) can leave part of a
      // record: the kernel copies a write page by page and stops at a page
      // boundary for a fatal signal. That call never returned, so the bytes
      // after the last '\n' are no record: cut them off (under the flock)
      // and chain on from the last complete record. Where the log cannot
      // be truncated (append-only attribute), start on a new line instead.
      auto cut = cut_torn_tail(st);
      if (!cut) return Unexpected<KmsError>(cut.error());
      if (*cut < 0) out.push_back('\n');
    }
    if (auto t = load_tail(st); !t) return t;
    const std::string event_time = event.string_value("eventTime");
    // Only a tail someone else wrote can have been cut or rewritten since
    // this object's last look: the check costs nothing per append of one
    // process, and reads the head once per change of writer.
    std::optional<json> tampered;
    if (!own_tail) tampered = check_against_head(st.st_size, event_time);
    std::uint64_t seq = tail_seq_;
    std::string hash = tail_hash_;
    bool checkpoint = false;
    auto add = [&](const AuditFields& rec) {
      auto r = audit_record_text(rec, ++seq, hash);
      out += r.line;
      hash = std::move(r.point.hash);
    };
    // A record, then the checkpoint when the next seq is due for one.
    auto add_record = [&](const AuditFields& rec) -> KmsResult<void> {
      add(rec);
      if ((seq + 1) % opts_.checkpoint_every != 0) return {};
      auto m = mac(audit_checkpoint_mac_input(seq + 1, hash));
      if (!m) return Unexpected<KmsError>(m.error());
      add(AuditFields::of(json{{"eventType", "AuditCheckpoint"},
                               {"eventName", "AuditCheckpoint"},
                               {"eventTime", event_time},
                               {"mac", crypto::to_hex(*m)}}));
      checkpoint = true;
      return {};
    };
    if (tampered) {
      if (auto r = add_record(AuditFields::of(*tampered)); !r) return r;
    }
    if (auto r = add_record(event); !r) return r;
    Tail head;
    if (checkpoint) {
      // The head for this checkpoint, MACed here so that the flusher that
      // writes it never touches the HSM. Best effort: the next checkpoint
      // or the close writes a head anyway.
      auto hm = mac(audit_head_mac_input(seq, hash));
      if (hm) head = Tail{seq, hash, crypto::to_hex(*hm)};
    }
    const char* p = out.data();
    std::size_t left = out.size();
    while (left > 0) {
      ssize_t n = ::write(log_fd_->get(), p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        tail_size_ = -1;  // unknown now: re-read next time
        return internal("cannot append to " + path_ + ": " + errno_text(errno));
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    tail_seq_ = seq;
    tail_hash_ = hash;
    tail_ino_ = static_cast<std::uint64_t>(st.st_ino);
    tail_size_ = st.st_size + static_cast<std::int64_t>(out.size());
    if (!head.mac.empty()) {
      pending_head_ = std::move(head);
      head_due_ = true;
    }
    number = appended_.fetch_add(1) + 1;
    fd = log_fd_;
    const bool sync_now = durability == AuditDurability::Durable || opts_.sync_interval.count() == 0;
    if (!sync_now || checkpoint) {
      start_flusher_locked();
      // Wake the flusher only when it is idle: while a flush is pending,
      // later appends ride along without a futex wake each.
      bool wake = false;
      {
        std::lock_guard<std::mutex> flock(flush_mu_);
        wake = !flush_wanted_;
        flush_wanted_ = true;
      }
      if (wake) flush_cv_.notify_one();
    }
    if (!sync_now) return {};
  }
  return sync_upto(fd, number);
}

KmsResult<void> AuditLog::sync_upto(const std::shared_ptr<UniqueFd>& fd, std::uint64_t upto) {
  std::lock_guard<std::mutex> lock(sync_mu_);
  if (synced_ >= upto) return {};  // another caller's fdatasync covered it (group commit)
  // Everything appended before this point is in the file: one fdatasync
  // covers all of it, also appends made by other threads meanwhile.
  const std::uint64_t covered = appended_.load();
  if (::fdatasync(fd->get()) != 0) return internal("cannot fsync " + path_ + ": " + errno_text(errno));
  ++fdatasyncs_;
  if (covered > synced_) synced_ = covered;
  return {};
}

KmsResult<void> AuditLog::sync() {
  std::shared_ptr<UniqueFd> fd;
  std::uint64_t upto = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    fd = log_fd_;
    upto = appended_.load();
  }
  if (!fd || upto == 0) return {};
  return sync_upto(fd, upto);
}

AuditLog::Counters AuditLog::counters() const {
  Counters c;
  c.appended = appended_.load();
  std::lock_guard<std::mutex> lock(sync_mu_);
  c.synced = synced_;
  c.fdatasyncs = fdatasyncs_;
  return c;
}

void AuditLog::start_flusher_locked() {
  if (flusher_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(flush_mu_);
    if (stop_) return;
  }
  flusher_ = std::thread([this] { flusher_main(); });
}

// Waits for an append, lets sync_interval pass (appends arriving meanwhile
// share the sync), fdatasyncs, then writes the head if a checkpoint is due.
void AuditLog::flusher_main() {
  auto log = named_logger("kmsfs.kms");
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(flush_mu_);
      flush_cv_.wait(lock, [&] { return stop_ || flush_wanted_; });
      if (stop_) return;  // the destructor syncs and writes the head
      flush_cv_.wait_for(lock, opts_.sync_interval, [&] { return stop_; });
      if (stop_) return;
      flush_wanted_ = false;
    }
    // The head to write is taken together with the sync's snapshot, so it
    // names a record that this sync makes durable.
    std::shared_ptr<UniqueFd> fd;
    std::uint64_t upto = 0;
    Tail head;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fd = log_fd_;
      upto = appended_.load();
      if (head_due_) {
        head = pending_head_;
        head_due_ = false;
      }
    }
    if (fd && upto > 0) {
      auto s = sync_upto(fd, upto);
      if (!s) {
        log->error("audit log: buffered records are not durable yet (retried): {}", s.error().message);
        if (head.seq != 0) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!head_due_) {
            pending_head_ = head;
            head_due_ = true;
          }
        }
        std::lock_guard<std::mutex> lock(flush_mu_);
        flush_wanted_ = true;
        continue;
      }
    }
    if (head.seq != 0) {
      auto w = write_head_for(head);
      if (!w) log->warn("could not write the audit head (retried at the next checkpoint): {}", w.error().message);
    }
  }
}

KmsResult<void> AuditLog::write_head() {
  Tail tail;
  std::shared_ptr<UniqueFd> fd;
  std::uint64_t upto = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!log_fd_) {
      // Nothing appended by this object: read the file's tail.
      auto opened = open_locked();
      if (!opened) return opened;
      const FlockRelease unlock{lock_fd_.get()};
      struct stat st {};
      if (::fstat(log_fd_->get(), &st) != 0) return internal("cannot stat " + path_ + ": " + errno_text(errno));
      if (auto t = load_tail(st); !t) return t;
    }
    tail = Tail{tail_seq_, tail_hash_, std::string()};
    fd = log_fd_;
    upto = appended_.load();
    head_due_ = false;
  }
  // The head may only name a record that is durable in the log.
  if (upto > 0) {
    if (auto s = sync_upto(fd, upto); !s) return s;
  } else if (::fdatasync(fd->get()) != 0) {
    return internal("cannot fsync " + path_ + ": " + errno_text(errno));
  }
  return write_head_for(tail);
}

KmsResult<void> AuditLog::write_head_for(const Tail& tail) {
  if (tail.seq == 0) return {};
  std::lock_guard<std::mutex> lock(head_mu_);
  // Head writers of all processes exclude each other, so that an older
  // head never replaces a newer one. Appenders do not wait for this lock.
  auto flock = FileLock::acquire(head_lock_path_);
  if (!flock) return internal(flock.error());
  // A malformed head is replaced (`audit verify` reports it until then).
  auto old = read_file_if_exists(head_path_);
  if (old && *old) {
    auto h = parse_audit_head(**old);
    if (h && h->seq >= tail.seq) return {};
  }
  std::string mac_hex = tail.mac;
  if (mac_hex.empty()) {
    auto m = mac(audit_head_mac_input(tail.seq, tail.hash));
    if (!m) return Unexpected<KmsError>(m.error());
    mac_hex = crypto::to_hex(*m);
  }
  json head{{"seq", tail.seq}, {"hash", tail.hash}, {"mac", mac_hex}};
  auto w = atomic_write_file(head_path_, head.dump() + "\n");
  if (!w) return internal("cannot write " + head_path_ + ": " + w.error());
  return {};
}

KmsResult<AuditVerifyReport> AuditLog::verify() {
  std::lock_guard<std::mutex> lock(mu_);
  auto flock = FileLock::acquire(lock_path_);
  if (!flock) return internal(flock.error());
  auto text = read_all(path_);
  if (!text) return internal(text.error());
  // An unreadable head is checked like a missing one.
  auto head_text = read_file_if_exists(head_path_);
  std::optional<std::string_view> head;
  if (head_text && *head_text) head = **head_text;
  return verify_audit_text(*text, head,
                           [&](const std::string& t) -> KmsResult<std::string> {
                             auto m = mac(t);
                             if (!m) return Unexpected<KmsError>(m.error());
                             return crypto::to_hex(*m);
                           },
                           head_path_);
}

KmsResult<std::vector<json>> AuditLog::search(const AuditSearch& q) {
  auto text = read_all(path_);
  if (!text) return internal(text.error());
  return search_audit_text(*text, q);
}

}  // namespace kmsfs::keyclient
