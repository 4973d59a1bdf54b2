#include "keyclient/audit_log.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>
#include <map>

#include "crypto/encoding.h"
#include "crypto/sha256.h"
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

const std::string kZeroHash(64, '0');
constexpr const char* kHashField = ",\"hash\":\"";

Unexpected<KmsError> internal(std::string msg) {
  named_logger("kmsfs.kms")->error("audit log: {}", msg);
  return kms_error(KmsErrorCode::KMSInternalException, "audit log: " + std::move(msg));
}

std::string hex(std::span<const std::uint8_t> b) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (auto c : b) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

std::string chain_hash(const std::string& prev_hash, const std::string& body) {
  std::string input = prev_hash + "\n" + body;
  return hex(crypto::sha256(std::span(reinterpret_cast<const std::uint8_t*>(input.data()), input.size())));
}

// Splits a line into the hashed body and the stored hash.
bool split_line(const std::string& line, std::string& body, std::string& hash) {
  auto pos = line.rfind(kHashField);
  if (pos == std::string::npos || line.size() < pos + 9 + 64 + 2) return false;
  body = line.substr(0, pos);
  hash = line.substr(pos + 9, 64);
  return line.compare(pos + 9 + 64, std::string::npos, "\"}") == 0;
}

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
        tail_hash_ = kZeroHash;
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
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("seq") || !j.contains("hash")) {
      return internal("the last record of " + path_ + " is not a chained record; run `kmsctl audit verify`");
    }
    tail_seq_ = j["seq"].get<std::uint64_t>();
    tail_hash_ = j["hash"].get<std::string>();
    break;
  }
  tail_ino_ = static_cast<std::uint64_t>(st.st_ino);
  tail_size_ = st.st_size;
  return {};
}

KmsResult<void> AuditLog::append(const json& event, AuditDurability durability) {
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
    if (auto t = load_tail(st); !t) return t;
    std::string out;
    // A crash mid-write may have left a partial line: start on a new one.
    // (A tail this object wrote itself ends with '\n'.)
    if (st.st_size > 0 && !own_tail) {
      char last = 0;
      if (::pread(log_fd_->get(), &last, 1, st.st_size - 1) == 1 && last != '\n') out.push_back('\n');
    }
    std::uint64_t seq = tail_seq_;
    std::string hash = tail_hash_;
    auto add = [&](json rec) {
      rec["seq"] = ++seq;
      rec["prevHash"] = hash;
      std::string body = rec.dump();
      body.pop_back();  // the closing brace
      const std::string h = chain_hash(hash, body);
      out += body;
      out += kHashField;
      out += h;
      out += "\"}\n";
      hash = h;
    };
    add(event);
    const bool checkpoint = (seq + 1) % opts_.checkpoint_every == 0;
    if (checkpoint) {
      auto m = mac("kmsfs-audit-checkpoint:" + std::to_string(seq + 1) + ":" + hash);
      if (!m) return Unexpected<KmsError>(m.error());
      add(json{{"eventType", "AuditCheckpoint"},
               {"eventName", "AuditCheckpoint"},
               {"eventTime", event.value("eventTime", std::string())},
               {"mac", hex(*m)}});
    }
    Tail head;
    if (checkpoint) {
      // The head for this checkpoint, MACed here so that the flusher that
      // writes it never touches the HSM. Best effort: the next checkpoint
      // or the close writes a head anyway.
      auto hm = mac("kmsfs-audit-head:" + std::to_string(seq) + ":" + hash);
      if (hm) head = Tail{seq, hash, hex(*hm)};
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
  auto old = read_file_if_exists(head_path_);
  if (old && *old) {
    json h = json::parse(**old, nullptr, false);
    if (!h.is_discarded() && h.value("seq", std::uint64_t{0}) >= tail.seq) return {};
  }
  std::string mac_hex = tail.mac;
  if (mac_hex.empty()) {
    auto m = mac("kmsfs-audit-head:" + std::to_string(tail.seq) + ":" + tail.hash);
    if (!m) return Unexpected<KmsError>(m.error());
    mac_hex = hex(*m);
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
  AuditVerifyReport rep;
  auto fail = [&](std::uint64_t line, std::optional<std::uint64_t> seq, std::string problem) {
    rep.ok = false;
    rep.line = line;
    rep.seq = seq;
    rep.problem = "line " + std::to_string(line) + (seq ? " (seq " + std::to_string(*seq) + ")" : std::string()) +
                  ": " + std::move(problem);
    return rep;
  };
  std::vector<std::string> lines;
  std::size_t pos = 0;
  bool partial = false;
  while (pos < text->size()) {
    auto nl = text->find('\n', pos);
    if (nl == std::string::npos) {
      lines.push_back(text->substr(pos));
      partial = true;
      break;
    }
    lines.push_back(text->substr(pos, nl - pos));
    pos = nl + 1;
  }
  // First pass: where each seq is, to tell a removal from a reordering.
  std::map<std::uint64_t, std::uint64_t> line_of_seq;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    json j = json::parse(lines[i], nullptr, false);
    if (!j.is_discarded() && j.contains("seq") && j["seq"].is_number_unsigned()) {
      line_of_seq.emplace(j["seq"].get<std::uint64_t>(), i + 1);
    }
  }
  std::string prev = kZeroHash;
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
    std::string body, hash;
    if (!split_line(lines[i], body, hash)) return fail(ln, seq, "the hash field is malformed (edited)");
    if (j["prevHash"] != prev) return fail(ln, seq, "prevHash does not match the previous record (edited, removed or reordered)");
    if (chain_hash(prev, body) != hash) return fail(ln, seq, "edited: the record's hash does not match its content");
    if (j.value("eventType", std::string()) == "AuditCheckpoint") {
      auto m = mac("kmsfs-audit-checkpoint:" + std::to_string(seq) + ":" + prev);
      if (!m) return Unexpected<KmsError>(m.error());
      if (j.value("mac", std::string()) != hex(*m)) {
        return fail(ln, seq, "the checkpoint's HSM MAC does not verify (the chain before it was rewritten)");
      }
      ++rep.checkpoints;
    }
    prev = hash;
    ++expected;
    ++rep.records;
    rep.last_seq = seq;
  }
  auto head_text = read_file_if_exists(head_path_);
  if (head_text && *head_text) {
    json h = json::parse(**head_text, nullptr, false);
    if (h.is_discarded() || !h.contains("seq") || !h.contains("hash") || !h.contains("mac")) {
      rep.ok = false;
      rep.problem = head_path_ + " is malformed";
      return rep;
    }
    const auto hseq = h["seq"].get<std::uint64_t>();
    const auto hhash = h["hash"].get<std::string>();
    auto m = mac("kmsfs-audit-head:" + std::to_string(hseq) + ":" + hhash);
    if (!m) return Unexpected<KmsError>(m.error());
    if (h["mac"] != hex(*m)) {
      rep.ok = false;
      rep.problem = head_path_ + ": the HSM MAC does not verify (the head was edited)";
      return rep;
    }
    ++rep.checkpoints;
    if (hseq > rep.last_seq) {
      return fail(lines.size() + 1, hseq,
                  "truncated: the log ends at seq " + std::to_string(rep.last_seq) + " but the HSM-MACed head names seq " +
                      std::to_string(hseq) + " (records " + std::to_string(rep.last_seq + 1) + " to " +
                      std::to_string(hseq) + " removed)");
    }
    auto it = line_of_seq.find(hseq);
    if (it != line_of_seq.end()) {
      std::string body, hash;
      if (split_line(lines[it->second - 1], body, hash) && hash != hhash) {
        return fail(it->second, hseq, "differs from the HSM-MACed head (the log was rewritten)");
      }
    }
  }
  return rep;
}

KmsResult<std::vector<json>> AuditLog::search(const AuditSearch& q) {
  auto text = read_all(path_);
  if (!text) return internal(text.error());
  std::vector<json> out;
  std::size_t pos = 0;
  while (pos < text->size() && out.size() < q.limit) {
    auto nl = text->find('\n', pos);
    if (nl == std::string::npos) break;
    json j = json::parse(text->substr(pos, nl - pos), nullptr, false);
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
