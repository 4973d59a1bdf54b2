#pragma once
// Key read-ahead: unwrapping the data keys of a directory's files before
// they are opened, so that a program reading a tree (tar, cp -r, grep -r,
// git fsck, a backup) does not wait for one KMS Decrypt per file in turn.
//
// Every cold open (the inode has no key and the DEK cache may not have it)
// costs a Decrypt, and by the audit rule of docs/kms-api.md that Decrypt
// returns only once its audit record is on disk: one flush per file when a
// program opens files one after another. The read-ahead runs several
// Decrypts at once on its own threads, so that their flushes are shared
// (group commit), and puts the keys into the DEK cache, where the program's
// opens find them.
//
// When it starts: at a cold open in a directory that was listed within the
// last few seconds (readdir, then open: a tree walk), or at the second cold
// open within a second in the same directory. It then reads the headers of
// up to `max_files` files of that directory in directory order, and a
// further chunk when cold opens continue there after the first chunk was
// read. A directory is read again only after `rescan_after`.
//
// A tree walk: when such listing-led read-aheads start in two different
// directories within `cold_open_window` (find -exec cat, git add, tar c:
// the program listed the tree, then opens its files directory after
// directory), the directories listed within `listed_window` and not yet
// read are read ahead too, up to `tree_directories` of them, in the order
// they were listed. Without this, the first open in every directory waited
// for its own Decrypt and its audit flush.
//
// The price: the KMS sees (and audits) a Decrypt for files that the
// program may never open, and their keys stay in the DEK cache (mlocked,
// bounded, aged out by key_cache_ttl) like any other cached key. Failures
// are not logged: the open of the file itself reports them; a refusal or an
// unavailable KMS stops the read-ahead of that directory.
//
// Thread safety: all public methods may be called concurrently.

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "crypto/file_header.h"
#include "fs/unique_fd.h"

namespace kmsfs::fs {

struct KeyReadaheadOptions {
  std::size_t max_files = 256;  // headers read per chunk of one directory (0 = off)
  std::size_t threads = 8;      // Decrypts in flight at once
  std::chrono::milliseconds listed_window{5000};      // readdir, then a cold open within this
  std::chrono::milliseconds cold_open_window{1000};   // two cold opens within this
  std::chrono::milliseconds rescan_after{150'000};    // a directory read again after this
  std::size_t max_directories = 4096;                 // remembered directories
  std::size_t tree_directories = 32;                  // read ahead at once in a tree walk (0 = off)
};

class KeyReadahead {
 public:
  enum class Warmed { kOk, kSkip, kStop };
  // Unwraps one header's key into the DEK cache. kStop: the KMS refused or
  // is unavailable; the directory's read-ahead ends.
  using WarmFn = std::function<Warmed(const crypto::FileHeader&)>;
  // True for the backing names that are not files of the volume (kmsfs.json,
  // kmsfs.diriv, long-name side files); `at_root` for the cipher dir itself.
  using InternalFn = std::function<bool(const char* name, bool at_root)>;
  using DirId = std::pair<dev_t, ino_t>;
  // Opens a listed directory by its id for a tree walk (an invalid
  // descriptor when it is gone) and says whether it is the cipher dir.
  using OpenDirFn = std::function<UniqueFd(DirId dir, bool& at_root)>;

  // Without `open_dir` there is no tree walk.
  KeyReadahead(WarmFn warm, InternalFn internal, KeyReadaheadOptions options, OpenDirFn open_dir = nullptr);
  ~KeyReadahead();  // stops and joins the threads; queued work is dropped
  KeyReadahead(const KeyReadahead&) = delete;
  KeyReadahead& operator=(const KeyReadahead&) = delete;

  bool enabled() const { return opts_.max_files > 0; }
  // The program listed `dir`.
  void listed(DirId dir);
  // A cold open of a file in `dir`. `open_dir` returns an O_RDONLY
  // descriptor of the directory (or an invalid one); it is called only when
  // a read-ahead starts, on the calling thread.
  void cold_open(DirId dir, bool at_root, const std::function<UniqueFd()>& open_dir);

  struct Stats {
    std::uint64_t chunks = 0;     // directory chunks read
    std::uint64_t headers = 0;    // headers read
    std::uint64_t warmed = 0;     // keys unwrapped (or found cached)
    std::uint64_t tree_walks = 0; // tree walks seen (each reads ahead more directories)
  };
  Stats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct DirState {
    Clock::time_point listed{};
    Clock::time_point last_cold_open{};
    Clock::time_point scanned{};      // a chunk started
    std::size_t next_index = 0;       // entries consumed by earlier chunks
    bool scanning = false;            // a chunk is queued or running
    bool more = false;                // the last chunk stopped at max_files
  };
  struct Job {
    DirId dir;
    bool at_root = false;
    std::size_t skip = 0;             // directory entries to pass over first
    bool urgent = false;              // see start_locked
    std::shared_ptr<UniqueFd> fd;
    std::vector<std::string> names;   // filled by the listing task
    std::size_t pending = 0;          // file tasks not finished (guarded by mu_)
    bool stop = false;                // guarded by mu_
  };
  struct Task {
    std::shared_ptr<Job> job;
    std::size_t index = SIZE_MAX;     // SIZE_MAX: list the directory
  };
  // Marks up to tree_directories listed, unread directories (not `walked`)
  // as being read, oldest listing first, and returns them.
  std::vector<DirId> pick_tree_locked(DirId walked, Clock::time_point now);
  // Queues the listing of a directory whose DirState is marked scanning.
  // `urgent`: the program opens files there now; its headers go first.
  void start_locked(DirId dir, bool at_root, UniqueFd fd, std::size_t skip, bool urgent);
  void run();
  void list(const std::shared_ptr<Job>& job);
  void read_one(const std::shared_ptr<Job>& job, std::size_t index);
  void finish_file_locked(const std::shared_ptr<Job>& job);
  void prune_locked(Clock::time_point now);

  WarmFn warm_;
  InternalFn internal_;
  KeyReadaheadOptions opts_;
  OpenDirFn open_dir_;

  mutable std::mutex mu_;  // guards everything below but threads_
  std::condition_variable cv_;
  std::map<DirId, DirState> dirs_;
  std::deque<Task> queue_;
  bool stop_ = false;
  DirId last_walk_dir_{};              // where the last listing-led read-ahead started
  Clock::time_point last_walk_{};
  Stats stats_;
  std::vector<std::thread> threads_;  // started at the first read-ahead
};

}  // namespace kmsfs::fs
