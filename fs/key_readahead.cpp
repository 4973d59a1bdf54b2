#include "fs/key_readahead.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>

#include "crypto/secure_buffer.h"

namespace kmsfs::fs {

KeyReadahead::KeyReadahead(WarmFn warm, InternalFn internal, KeyReadaheadOptions options, OpenDirFn open_dir)
    : warm_(std::move(warm)), internal_(std::move(internal)), opts_(options), open_dir_(std::move(open_dir)) {
  if (opts_.threads == 0) opts_.threads = 1;
}

KeyReadahead::~KeyReadahead() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

KeyReadahead::Stats KeyReadahead::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

void KeyReadahead::prune_locked(Clock::time_point now) {
  if (dirs_.size() <= opts_.max_directories) return;
  // Forget directories with nothing recent to remember first, then any
  // that are not being read, until half the limit is left.
  const auto recent = std::max(opts_.listed_window, opts_.cold_open_window);
  for (auto it = dirs_.begin(); it != dirs_.end();) {
    const DirState& s = it->second;
    const bool idle = !s.scanning && now - s.listed > recent && now - s.last_cold_open > recent &&
                      now - s.scanned > opts_.rescan_after;
    it = idle ? dirs_.erase(it) : std::next(it);
  }
  for (auto it = dirs_.begin(); it != dirs_.end() && dirs_.size() > opts_.max_directories / 2;) {
    it = it->second.scanning ? std::next(it) : dirs_.erase(it);
  }
}

void KeyReadahead::listed(DirId dir) {
  if (!enabled()) return;
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  dirs_[dir].listed = now;
  prune_locked(now);
}

void KeyReadahead::cold_open(DirId dir, bool at_root, const std::function<UniqueFd()>& open_dir) {
  if (!enabled()) return;
  const auto now = Clock::now();
  std::size_t skip = 0;
  std::vector<DirId> tree;
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    DirState& s = dirs_[dir];
    const bool walk = s.listed != Clock::time_point{} && now - s.listed <= opts_.listed_window;
    const bool repeat = s.last_cold_open != Clock::time_point{} &&
                        now - s.last_cold_open <= opts_.cold_open_window;
    s.last_cold_open = now;
    if (s.scanning || !(walk || repeat)) return;
    const bool fresh = s.scanned == Clock::time_point{} || now - s.scanned >= opts_.rescan_after;
    if (!fresh && !s.more) return;
    skip = fresh ? 0 : s.next_index;
    s.scanning = true;
    s.scanned = now;
    if (walk && fresh && open_dir_ && opts_.tree_directories > 0) {
      const bool tree_walk = last_walk_ != Clock::time_point{} && last_walk_dir_ != dir &&
                             now - last_walk_ <= opts_.cold_open_window;
      last_walk_dir_ = dir;
      last_walk_ = now;
      if (tree_walk) {
        stats_.tree_walks++;
        tree = pick_tree_locked(dir, now);
      }
    }
  }
  UniqueFd fd = open_dir();  // no lock held across the syscall
  {
    std::lock_guard lock(mu_);
    start_locked(dir, at_root, std::move(fd), skip, true);
  }
  for (const DirId& other : tree) {
    bool other_root = false;
    UniqueFd other_fd = open_dir_(other, other_root);
    std::lock_guard lock(mu_);
    start_locked(other, other_root, std::move(other_fd), 0, false);
  }
}

std::vector<KeyReadahead::DirId> KeyReadahead::pick_tree_locked(DirId walked, Clock::time_point now) {
  std::vector<std::pair<Clock::time_point, std::map<DirId, DirState>::iterator>> listed;
  for (auto it = dirs_.begin(); it != dirs_.end(); ++it) {
    const DirState& s = it->second;
    if (it->first == walked || s.scanning || s.listed == Clock::time_point{}) continue;
    if (now - s.listed > opts_.listed_window) continue;
    if (s.scanned != Clock::time_point{} && now - s.scanned < opts_.rescan_after) continue;
    listed.emplace_back(s.listed, it);
  }
  std::stable_sort(listed.begin(), listed.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  if (listed.size() > opts_.tree_directories) listed.resize(opts_.tree_directories);
  std::vector<DirId> out;
  out.reserve(listed.size());
  for (auto& [when, it] : listed) {
    it->second.scanning = true;
    it->second.scanned = now;
    out.push_back(it->first);
  }
  return out;
}

void KeyReadahead::start_locked(DirId dir, bool at_root, UniqueFd fd, std::size_t skip, bool urgent) {
  auto it = dirs_.find(dir);
  if (!fd.valid() || stop_) {
    if (it != dirs_.end()) it->second.scanning = false;
    return;
  }
  if (it == dirs_.end()) return;  // cannot happen: a scanning entry is never pruned
  if (threads_.empty()) {
    threads_.reserve(opts_.threads);
    for (std::size_t i = 0; i < opts_.threads; ++i) threads_.emplace_back([this] { run(); });
  }
  auto job = std::make_shared<Job>();
  job->dir = dir;
  job->at_root = at_root;
  job->skip = skip;
  job->urgent = urgent;
  job->fd = std::make_shared<UniqueFd>(std::move(fd));
  queue_.push_back(Task{job, SIZE_MAX});
  cv_.notify_one();
}

void KeyReadahead::run() {
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Task task = std::move(queue_.front());
    queue_.pop_front();
    if (task.index == SIZE_MAX) {
      lock.unlock();
      list(task.job);
      lock.lock();
      continue;
    }
    if (task.job->stop) {
      finish_file_locked(task.job);
      continue;
    }
    lock.unlock();
    read_one(task.job, task.index);
    lock.lock();
    finish_file_locked(task.job);
  }
}

void KeyReadahead::list(const std::shared_ptr<Job>& job) {
  std::vector<std::string> names;
  bool more = false;
  std::size_t seen = 0;
  UniqueFd dup_fd(::fcntl(job->fd->get(), F_DUPFD_CLOEXEC, 0));
  UniqueDir dir(dup_fd.valid() ? ::fdopendir(dup_fd.get()) : nullptr);
  if (dir) {
    (void)dup_fd.release();  // owned by the DIR stream
    // The duplicate shares the file offset: start at the beginning.
    ::rewinddir(dir.get());
    while (struct dirent* e = ::readdir(dir.get())) {
      if (e->d_type != DT_REG && e->d_type != DT_UNKNOWN) continue;
      if (e->d_name[0] == '.' || internal_(e->d_name, job->at_root)) continue;
      if (seen++ < job->skip) continue;
      if (names.size() == opts_.max_files) {
        more = true;
        break;
      }
      names.emplace_back(e->d_name);
    }
  }
  std::lock_guard lock(mu_);
  stats_.chunks++;
  auto it = dirs_.find(job->dir);
  if (it != dirs_.end()) {
    it->second.next_index = job->skip + names.size();
    it->second.more = more;
    if (names.empty()) it->second.scanning = false;
  }
  if (stop_ || names.empty()) return;
  job->names = std::move(names);
  job->pending = job->names.size();
  if (job->urgent) {
    // The program is opening files here now: before other directories'.
    for (std::size_t i = job->names.size(); i-- > 0;) queue_.push_front(Task{job, i});
  } else {
    for (std::size_t i = 0; i < job->names.size(); ++i) queue_.push_back(Task{job, i});
  }
  cv_.notify_all();
}

void KeyReadahead::read_one(const std::shared_ptr<Job>& job, std::size_t index) {
  // O_NOATIME: reading ahead must not change what stat(2) shows of a file
  // nobody read. Where it is not allowed (not the owner, no CAP_FOWNER) the
  // file is passed over. O_NONBLOCK: a FIFO in a DT_UNKNOWN directory must
  // not block the thread.
  UniqueFd fd(::openat(job->fd->get(), job->names[index].c_str(),
                       O_RDONLY | O_NOFOLLOW | O_NOATIME | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd.valid()) return;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) ||
      st.st_size < static_cast<off_t>(crypto::FileHeader::kSize)) {
    return;
  }
  std::uint8_t raw[crypto::FileHeader::kSize];
  if (::pread(fd.get(), raw, sizeof raw, 0) != static_cast<ssize_t>(sizeof raw)) return;
  fd.reset();
  auto header = crypto::FileHeader::decode(std::span<const std::uint8_t>(raw, sizeof raw));
  if (!header) return;
  const Warmed w = warm_(*header);
  crypto::scrub_stack();  // the KMS call's copies of the key
  std::lock_guard lock(mu_);
  stats_.headers++;
  if (w == Warmed::kOk) stats_.warmed++;
  if (w == Warmed::kStop) job->stop = true;
}

void KeyReadahead::finish_file_locked(const std::shared_ptr<Job>& job) {
  if (--job->pending != 0) return;
  auto it = dirs_.find(job->dir);
  if (it == dirs_.end()) return;
  it->second.scanning = false;
  if (job->stop) it->second.more = false;
}

}  // namespace kmsfs::fs
