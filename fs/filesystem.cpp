#include "fs/filesystem.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <linux/limits.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "crypto/block_layout.h"
#include "crypto/encoding.h"
#include "crypto/random.h"
#include "crypto/aes_gcm.h"
#include "fs/header_lock.h"
#include "fs/killpriv.h"
#include "fs/thread_buffer.h"
#include "fs/volume.h"

namespace kmsfs::fs {

namespace bl = crypto::block_layout;

namespace {

// Writes from this size on are sealed ahead of the content lock (write()):
// the kernel's write-back sends up to 1 MiB per request. Smaller ones,
// mostly one request per file or per page, gain nothing from it.
constexpr std::size_t kSealAheadMin = 64 * 1024;

// A file's key, shared by its inode and the requests in flight. When the
// last holder lets go, every worker thread's cached copy and key schedule
// of it are cleansed as well as the key itself (crypto/aes_gcm.h), so that
// a closed file's DEK lingers in no idle thread.
std::shared_ptr<const FileKey> share_key(FileKey&& key) {
  return std::shared_ptr<const FileKey>(new FileKey(std::move(key)), [](const FileKey* k) {
    crypto::AesGcm::forget_key_everywhere(std::span<const std::uint8_t>(k->dek.data(), k->dek.size()));
    delete k;
  });
}

std::shared_ptr<spdlog::logger> logger() {
  static auto l = [] {
    auto existing = spdlog::get("kmsfs.fs");
    return existing ? existing : spdlog::default_logger()->clone("kmsfs.fs");
  }();
  return l;
}

Filesystem& fs_of(fuse_req_t req) {
  auto* fs = static_cast<Filesystem*>(fuse_req_userdata(req));
  fs->touch();
  return *fs;
}

std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// Whether a request can leave key material on its thread's stack: a KMS
// call, a data key, block encryption (AES code spills round keys, and the
// first two of an AES-256 schedule are the raw key: a read of a file left
// its DEK there, which Hardening.ClosedFileLeavesItsDataKeyNowhereInMemory
// finds without the scrub). Requests on names and attributes only (the name
// cipher keeps its key schedules off the stack) need no scrub; scrubbing
// 16 KiB after each of them was 8 % of the mount's CPU in rm -rf.
enum class Scrub { kYes, kNo };

// The one place where failures of an operation become a FUSE reply: an
// exception escaping an operation is a bug, logged once, answered EIO.
template <class F>
void guarded(fuse_req_t req, const char* op, F&& f, Scrub scrub = Scrub::kYes) noexcept {
  try {
    f();
  } catch (const std::exception& e) {
    logger()->error("internal error in {}: {}", op, e.what());
    fuse_reply_err(req, EIO);
  } catch (...) {
    logger()->error("internal error in {}", op);
    fuse_reply_err(req, EIO);
  }
  // Zeroes what the request left below this frame: a KMS call's or a key
  // expansion's copies of a key on this thread's (dumpable) stack.
  if (scrub == Scrub::kYes) crypto::scrub_stack();
}

struct DirHandle {
  UniqueDir dir;
  off_t offset = 0;
  struct dirent* pending = nullptr;  // read but not yet delivered
  DirIvBytes iv{};                   // encrypted names: the directory's IV
};

DirHandle* dir_handle(fuse_file_info* fi) { return reinterpret_cast<DirHandle*>(fi->fh); }

// Backing open flags for a FUSE open: ciphertext is read-modify-written, so
// the backing fd is O_RDWR whenever possible; O_APPEND and O_TRUNC are
// handled in plaintext terms, never passed to the backing file. O_DIRECT
// stays with the kernel's view of the mount: the ciphertext offsets (a
// 128-byte header, 4124-byte blocks) are never aligned for it.
int backing_flags(int flags, bool read_only) {
  int f = flags & ~(O_ACCMODE | O_APPEND | O_TRUNC | O_CREAT | O_EXCL | O_NOCTTY | O_NOFOLLOW |
                    O_DIRECT | O_NOATIME);
  f |= read_only ? O_RDONLY : O_RDWR;
  return f | O_CLOEXEC;
}

bool is_user_xattr(const char* name) { return std::strncmp(name, "user.", 5) == 0; }


}  // namespace

Filesystem::Filesystem(UniqueFd root_fd, FileKeys& keys, const NameMapper& names,
                       FsSettings settings)
    : keys_(keys), names_(names), settings_(settings) {
  struct stat st {};
  if (::fstat(root_fd.get(), &st) != 0) throw std::runtime_error("cannot stat the cipher directory");
  root_.fd = std::move(root_fd);
  root_.dev = st.st_dev;
  root_.ino = st.st_ino;
  root_.type = S_IFDIR;
  root_.nlookup = 2;  // never forgotten
  root_.label = "/";
  if (settings_.key_readahead > 0 && keys_.caches_keys()) {
    KeyReadaheadOptions ro;
    ro.max_files = settings_.key_readahead;
    readahead_ = std::make_unique<KeyReadahead>(
        [this](const crypto::FileHeader& h) { return keys_.warm(h); },
        [this](const char* name, bool at_root) { return names_.is_internal(name, at_root); }, ro,
        [this](KeyReadahead::DirId dir, bool& at_root) {
          at_root = is_root(dir);
          return open_known_dir(dir);
        });
  }
}

Filesystem::~Filesystem() {
  stop_trimmer();
  for (std::uint64_t fh : dir_handles_) delete reinterpret_cast<DirHandle*>(fh);
}

void Filesystem::kick_trimmer() {
  {
    std::lock_guard lk(trim_mu_);
    trim_kick_ = true;
  }
  trim_cv_.notify_one();
}

void Filesystem::stop_trimmer() {
  {
    std::lock_guard lk(trim_mu_);
    trim_stop_ = true;
  }
  trim_cv_.notify_all();
  if (trimmer_.joinable()) trimmer_.join();
}

void Filesystem::trim_loop() {
  const std::size_t bound = settings_.max_inodes;
  const std::size_t keep = bound - bound / 4;
  std::unique_lock lk(trim_mu_);
  while (!trim_stop_) {
    trim_cv_.wait_for(lk, std::chrono::milliseconds(500),
                      [&] { return trim_stop_ || trim_kick_ || inode_total_.load() > bound; });
    trim_kick_ = false;
    if (trim_stop_) break;
    if (inode_total_.load() <= bound) continue;
    lk.unlock();
    // Entries to drop: files and other non-directories, continuing where
    // the last round stopped. (Not directories: dropping one leaves the
    // entries below it that are in use at that moment cached under a name
    // no notification reaches, and the kernel keeps their inodes.) The
    // kernel forgets an inode once no dentry and no open file use it; one it
    // keeps (open, another name) is simply asked again in a later round.
    std::vector<std::pair<fuse_ino_t, std::string>> victims;
    {
      std::lock_guard lock(table_mutex_);
      const std::size_t excess = inodes_.size() > keep ? inodes_.size() - keep : 0;
      victims.reserve(excess);
      auto it = inodes_.upper_bound(trim_cursor_);
      for (std::size_t seen = 0; seen < inodes_.size() && victims.size() < excess; ++seen, ++it) {
        if (it == inodes_.end()) it = inodes_.begin();
        const Inode& in = *it->second;
        if (in.type == S_IFDIR || in.plain_name.empty() || in.lookup_parent == 0) continue;
        victims.emplace_back(in.lookup_parent, in.plain_name);
        trim_cursor_ = it->first;
      }
    }
    // No lock held: the kernel locks the parent directory, which a request
    // in progress may hold until our reply.
    std::size_t dropped = 0;
    for (const auto& [parent, name] : victims) {
      if (fuse_lowlevel_notify_inval_entry(session_, parent, name.c_str(), name.size()) == 0) ++dropped;
    }
    logger()->debug("inode bound {}: asked the kernel to forget {} of {} entries", bound, dropped,
                    victims.size());
    lk.lock();
    // The FORGETs arrive as requests: a moment for them before counting
    // again, cut short when lookups go on past the bound.
    trim_kick_ = false;
    trim_cv_.wait_for(lk, std::chrono::milliseconds(dropped > 0 ? 2 : 100),
                      [&] { return trim_stop_ || trim_kick_; });
  }
}

double Filesystem::now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

Inode& Filesystem::inode_of(fuse_ino_t ino) {
  if (ino == FUSE_ROOT_ID) return root_;
  return *reinterpret_cast<Inode*>(ino);
}

fuse_ino_t Filesystem::ino_of(Inode& inode) {
  return &inode == &root_ ? FUSE_ROOT_ID : reinterpret_cast<fuse_ino_t>(&inode);
}

bool Filesystem::reserved_name(fuse_ino_t parent, const char* name) const {
  // With encrypted names every plaintext name is available: kmsfs's own
  // backing files have names no encrypted name can take.
  return !names_.encrypted() && names_.is_internal(name, parent == FUSE_ROOT_ID);
}

void Filesystem::to_plain_attr(int fd, struct stat* st) const {
  if (S_ISREG(st->st_mode)) {
    st->st_size = static_cast<off_t>(bl::plain_size(static_cast<std::uint64_t>(st->st_size)));
  } else if (S_ISLNK(st->st_mode) && names_.encrypted()) {
    char buf[PATH_MAX + 1];
    ssize_t n = ::readlinkat(fd, "", buf, sizeof buf - 1);
    if (n >= 0) {
      auto plain = names_.decrypt_symlink(std::string_view(buf, static_cast<size_t>(n)));
      if (plain) st->st_size = static_cast<off_t>(plain->size());
    }
  }
}

int Filesystem::dir_iv(Inode& dir, DirIvBytes& iv) {
  {
    std::lock_guard lock(dir.state_mutex);
    if (dir.dir_iv) {
      iv = *dir.dir_iv;
      return 0;
    }
  }
  int err = NameMapper::read_dir_iv(dir.fd.get(), iv);
  if (err != 0) {
    if (err == ENOENT || err == EIO) {
      logger()->error("directory (backing inode {}) has a {} kmsfs.diriv: its names cannot be "
                      "read; run kmsfs fsck", dir.ino, err == ENOENT ? "missing" : "damaged");
      return EIO;
    }
    return err;
  }
  std::lock_guard lock(dir.state_mutex);
  dir.dir_iv = iv;
  return 0;
}

int Filesystem::backing_name(Inode& dir, const char* name, NameMapper::Backing& out) {
  DirIvBytes iv{};
  if (names_.encrypted()) {
    if (int err = dir_iv(dir, iv); err != 0) return err;
  }
  auto b = names_.to_backing(name, iv);
  if (!b) return ENAMETOOLONG;
  out = std::move(*b);
  return 0;
}

int Filesystem::prepare_long_name(Inode& dir, const NameMapper::Backing& b) {
  return b.is_long() ? NameMapper::write_side_file(dir.fd.get(), b) : 0;
}

void Filesystem::undo_long_name(Inode& dir, const NameMapper::Backing& b) {
  if (!b.is_long()) return;
  struct stat st {};
  if (::fstatat(dir.fd.get(), b.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
    NameMapper::remove_side_file(dir.fd.get(), b);
  }
}

int Filesystem::stat_inode(Inode& inode, struct stat* st) {
  if (inode.type == S_IFREG) {
    // Shared content lock: never report a size in the middle of a write.
    std::shared_lock lock(inode.content);
    if (::fstatat(inode.fd.get(), "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno;
  } else if (::fstatat(inode.fd.get(), "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
    return errno;
  }
  to_plain_attr(inode.fd.get(), st);
  return 0;
}

int Filesystem::descriptor_room() {
  // Read each time: a limit lowered from outside (prlimit) counts at once.
  // One getrlimit is ~0.25 µs against the ~20 µs of the request.
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) return 0;
  const auto limit = static_cast<std::size_t>(lim.rlim_cur);
  const std::size_t reserve = descriptor_reserve(limit);
  const std::size_t held = inode_total_.load() + static_cast<std::size_t>(std::max(open_handles_.load(), 0));
  if (held + reserve < limit) return 0;
  return note_open_error(EMFILE);
}

int Filesystem::note_open_error(int err) {
  if (err != EMFILE && err != ENFILE) return err;
  if (settings_.max_inodes > 0) kick_trimmer();
  static std::atomic<std::int64_t> last_log{0};
  const auto now = static_cast<std::int64_t>(now_seconds());
  std::int64_t last = last_log.load();
  if (now - last >= 30 && last_log.compare_exchange_strong(last, now)) {
    struct rlimit lim {};
    (void)::getrlimit(RLIMIT_NOFILE, &lim);
    std::size_t inodes = 0;
    {
      std::lock_guard lock(table_mutex_);
      inodes = inodes_.size();
    }
    logger()->error(
        "cannot open a backing file: {} (descriptor limit {}, {} inodes known): kmsfs keeps a "
        "descriptor for every file and directory the kernel remembers; raise the limit "
        "(LimitNOFILE= in the unit, ulimit -n) or lower -o max_inodes (the mount asks the "
        "kernel to forget entries past it)",
        std::strerror(err), static_cast<unsigned long>(lim.rlim_cur), inodes);
  }
  return err;
}

int Filesystem::do_lookup(Inode& parent, const char* name, fuse_entry_param* e, const char* plain) {
  std::memset(e, 0, sizeof *e);
  e->attr_timeout = settings_.attr_timeout;
  e->entry_timeout = settings_.entry_timeout;

  // A stat by name first: an inode the table knows (READDIRPLUS, a second
  // lookup) needs no descriptor opened and closed again.
  struct stat st {};
  if (::fstatat(parent.fd.get(), name, &st, AT_SYMLINK_NOFOLLOW) != 0) return errno;

  Inode* inode = nullptr;
  bool fresh = false;
  auto find_locked = [&](const struct stat& s) -> Inode* {
    if (s.st_dev == root_.dev && s.st_ino == root_.ino) return &root_;
    auto it = inodes_.find(std::make_pair(s.st_dev, s.st_ino));
    return it != inodes_.end() ? it->second.get() : nullptr;
  };
  const fuse_ino_t parent_ino = ino_of(parent);
  auto note_name_locked = [&](Inode& in) {
    if (plain == nullptr || &in == &root_ || settings_.max_inodes == 0) return;  // only the trimmer reads it
    in.lookup_parent = parent_ino;
    in.plain_name = plain;
  };
  {
    std::lock_guard lock(table_mutex_);
    inode = find_locked(st);
    if (inode != nullptr) {
      inode->nlookup++;
      note_name_locked(*inode);
    }
  }
  if (inode == nullptr) {
    if (int err = descriptor_room(); err != 0) return err;
    UniqueFd fd(::openat(parent.fd.get(), name, O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (!fd.valid()) return note_open_error(errno);
    // The name may have moved on to another inode since the stat.
    if (::fstatat(fd.get(), "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno;
    std::lock_guard lock(table_mutex_);
    inode = find_locked(st);
    if (inode == nullptr) {
      auto made = std::make_unique<Inode>();
      made->fd = std::move(fd);
      made->dev = st.st_dev;
      made->ino = st.st_ino;
      made->type = st.st_mode & S_IFMT;
      inode = made.get();
      inodes_.emplace(std::make_pair(st.st_dev, st.st_ino), std::move(made));
      inode_total_.store(inodes_.size());
      fresh = true;
    }
    inode->nlookup++;
    note_name_locked(*inode);
  }
  if (fresh && settings_.max_inodes > 0 && inode_total_.load() > settings_.max_inodes) kick_trimmer();
  {
    std::lock_guard lock(inode->state_mutex);
    inode->label = name;
    inode->parent = {parent.dev, parent.ino};
  }
  if (inode->type == S_IFREG && !fresh) {
    // Another thread may be writing: take the size under the content lock.
    // (A fresh inode was stat'ed before any request could name it.)
    std::shared_lock lock(inode->content);
    if (::fstatat(inode->fd.get(), "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
      int err = errno;
      lock.unlock();
      forget(ino_of(*inode), 1);
      return err;
    }
  }
  to_plain_attr(inode->fd.get(), &st);
  e->attr = st;
  e->ino = ino_of(*inode);
  return 0;
}

void Filesystem::init(fuse_conn_info* conn) {
  if (settings_.writeback_cache && (conn->capable & FUSE_CAP_WRITEBACK_CACHE) != 0) {
    conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    writeback_cache_on_ = true;
  } else {
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  }
  if ((conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) != 0) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  if ((conn->capable & FUSE_CAP_PARALLEL_DIROPS) != 0) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  // Large requests: the kernel hands over up to 1 MiB per write.
  conn->max_write = 1U << 20;
  conn->max_readahead = settings_.read_ahead > 0 ? static_cast<unsigned>(settings_.read_ahead)
                                                : std::min<unsigned>(conn->max_readahead, 1U << 20);
  if (settings_.max_inodes > 0 && session_ != nullptr && !trimmer_.joinable()) {
    trimmer_ = std::thread([this] { trim_loop(); });
  }
}

void Filesystem::lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_entry_param e{};
  if (reserved_name(parent, name)) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  NameMapper::Backing b;
  int err = backing_name(inode_of(parent), name, b);
  if (err == 0) err = do_lookup(inode_of(parent), b.name.c_str(), &e, name);
  if (err == ENOENT) {
    // Negative entry, cached for entry_timeout.
    std::memset(&e, 0, sizeof e);
    e.entry_timeout = settings_.entry_timeout;
    fuse_reply_entry(req, &e);
  } else if (err != 0) {
    fuse_reply_err(req, err);
  } else {
    fuse_reply_entry(req, &e);
  }
}

void Filesystem::forget(fuse_ino_t ino, std::uint64_t n) {
  Inode& inode = inode_of(ino);
  if (&inode == &root_) return;
  std::unique_ptr<Inode> doomed;  // destroyed after the table lock is released
  std::lock_guard lock(table_mutex_);
  if (n > inode.nlookup) {
    logger()->error("forget of {} references on an inode holding {}", n, inode.nlookup);
    n = inode.nlookup;
  }
  inode.nlookup -= n;
  if (inode.nlookup == 0) {
    auto it = inodes_.find({inode.dev, inode.ino});
    if (it != inodes_.end()) {
      doomed = std::move(it->second);
      inodes_.erase(it);
      inode_total_.store(inodes_.size());
    }
  }
}

void Filesystem::getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  struct stat st {};
  int err = stat_inode(inode_of(ino), &st);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_attr(req, &st, settings_.attr_timeout);
}

bool Filesystem::times_already_set(Inode& inode, const struct stat* attr, int to_set, struct stat* cur) {
  // With the writeback cache the kernel keeps a regular file's times itself
  // and writes them back with a SETATTR when it drops the inode: after each
  // unlink, for one, times the backing file already has. Setting them again
  // would only move the backing ctime, which the kernel does not take from
  // us for such a file.
  if (!writeback_cache_on_ || inode.type != S_IFREG) return false;
  if ((to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) != 0) return false;
  if (stat_inode(inode, cur) != 0) return false;
  auto same = [](const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; };
  if ((to_set & FUSE_SET_ATTR_ATIME) != 0 && !same(attr->st_atim, cur->st_atim)) return false;
  if ((to_set & FUSE_SET_ATTR_MTIME) != 0 && !same(attr->st_mtim, cur->st_mtim)) return false;
  return true;
}

void Filesystem::setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
                         fuse_file_info* fi) {
  Inode& inode = inode_of(ino);
  const int ifd = inode.fd.get();
  const int fh = fi != nullptr ? static_cast<int>(fi->fh) : -1;

  if ((to_set & FUSE_SET_ATTR_MODE) != 0) {
    int rc = fh >= 0 ? ::fchmod(fh, attr->st_mode)
                     : ::fchmodat(AT_FDCWD, proc_path(ifd).c_str(), attr->st_mode, 0);
    if (rc != 0) return (void)fuse_reply_err(req, errno);
  }
  if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) != 0) {
    uid_t uid = (to_set & FUSE_SET_ATTR_UID) != 0 ? attr->st_uid : static_cast<uid_t>(-1);
    gid_t gid = (to_set & FUSE_SET_ATTR_GID) != 0 ? attr->st_gid : static_cast<gid_t>(-1);
    if (::fchownat(ifd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
      return (void)fuse_reply_err(req, errno);
    }
  }
  if ((to_set & FUSE_SET_ATTR_SIZE) != 0) {
    if (inode.type != S_IFREG) return (void)fuse_reply_err(req, inode.type == S_IFDIR ? EISDIR : EINVAL);
    if (attr->st_size < 0) return (void)fuse_reply_err(req, EINVAL);
    UniqueFd temp;
    int fd = fh;
    if (fd < 0) {
      temp.reset(::open(proc_path(ifd).c_str(), O_RDWR | O_CLOEXEC));
      if (!temp.valid()) return (void)fuse_reply_err(req, errno);
      fd = temp.get();
    }
    std::unique_lock<std::shared_mutex> lock;
    int err = 0;
    if (attr->st_size == 0) {
      // ftruncate(fd, 0) through a handle: writes are likely to follow, so
      // the next data key is made first (a KMS error truncates nothing).
      if (fh >= 0) {
        if (int kerr = prepare_new_key(inode); kerr != 0) return (void)fuse_reply_err(req, kerr);
      }
      lock = std::unique_lock(inode.content);
      err = truncate_locked(inode, fd, 0, nullptr, lock);
    } else {
      auto key = key_for_write(inode, fd, lock);
      err = key ? truncate_locked(inode, fd, static_cast<std::uint64_t>(attr->st_size), key->get(), lock)
                : key.error();
    }
    if (lock.owns_lock()) lock.unlock();
    drop_key_if_closed(inode);
    if (err == 0) err = kill_suid_sgid_if_asked(fd);
    if (err != 0) return (void)fuse_reply_err(req, err);
  }
  if ((to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) != 0) {
    struct stat cur {};
    if (times_already_set(inode, attr, to_set, &cur)) {
      // The attributes just read are the answer: they follow every change above.
      return (void)fuse_reply_attr(req, &cur, settings_.attr_timeout);
    }
    struct timespec tv[2];
    tv[0].tv_sec = 0;
    tv[1].tv_sec = 0;
    tv[0].tv_nsec = UTIME_OMIT;
    tv[1].tv_nsec = UTIME_OMIT;
    if ((to_set & FUSE_SET_ATTR_ATIME_NOW) != 0) {
      tv[0].tv_nsec = UTIME_NOW;
    } else if ((to_set & FUSE_SET_ATTR_ATIME) != 0) {
      tv[0] = attr->st_atim;
    }
    if ((to_set & FUSE_SET_ATTR_MTIME_NOW) != 0) {
      tv[1].tv_nsec = UTIME_NOW;
    } else if ((to_set & FUSE_SET_ATTR_MTIME) != 0) {
      tv[1] = attr->st_mtim;
    }
    int rc = 0;
    if (fh >= 0) {
      rc = ::futimens(fh, tv);
    } else if (inode.type == S_IFLNK) {
      // A symlink's own times, through its O_PATH fd (AT_EMPTY_PATH);
      // kernels without that support answer EINVAL: report EPERM then.
      rc = ::utimensat(ifd, "", tv, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
      if (rc != 0 && errno == EINVAL) errno = EPERM;
    } else {
      rc = ::utimensat(AT_FDCWD, proc_path(ifd).c_str(), tv, 0);
    }
    if (rc != 0) return (void)fuse_reply_err(req, errno);
  }
  getattr(req, ino, fi);
}

void Filesystem::readlink(fuse_req_t req, fuse_ino_t ino) {
  char buf[PATH_MAX + 1];
  ssize_t n = ::readlinkat(inode_of(ino).fd.get(), "", buf, sizeof buf);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  if (static_cast<size_t>(n) >= sizeof buf) return (void)fuse_reply_err(req, ENAMETOOLONG);
  auto plain = names_.decrypt_symlink(std::string_view(buf, static_cast<size_t>(n)));
  if (!plain) {
    logger()->error("symlink (backing inode {}) has a damaged target", inode_of(ino).ino);
    return (void)fuse_reply_err(req, EIO);
  }
  fuse_reply_readlink(req, plain->c_str());
}

void Filesystem::chown_to_caller(fuse_req_t req, int dirfd, const char* name) {
  // A daemon running as root creates files as root; give them to the
  // caller, as a kernel filesystem would.
  const fuse_ctx* ctx = fuse_req_ctx(req);
  if (::geteuid() != 0 || ctx == nullptr) return;
  if (ctx->uid == 0 && ctx->gid == ::getegid()) return;
  if (::fchownat(dirfd, name, ctx->uid, ctx->gid, AT_SYMLINK_NOFOLLOW) != 0) {
    logger()->warn("cannot give a new file to uid {}: {}", ctx->uid, std::strerror(errno));
  }
}

void Filesystem::reply_new_entry(fuse_req_t req, Inode& parent, const char* name, const char* plain) {
  fuse_entry_param e{};
  int err = do_lookup(parent, name, &e, plain);
  if (err != 0) return (void)fuse_reply_err(req, err);
  fuse_reply_entry(req, &e);
}

void Filesystem::mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                       dev_t rdev) {
  if (reserved_name(parent, name)) return (void)fuse_reply_err(req, EPERM);
  // Refused before the name exists rather than after (the new inode's descriptor).
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  Inode& p = inode_of(parent);
  NameMapper::Backing b;
  if (int err = backing_name(p, name, b); err != 0) return (void)fuse_reply_err(req, err);
  if (int err = prepare_long_name(p, b); err != 0) return (void)fuse_reply_err(req, err);
  const char* bn = b.name.c_str();
  int rc = S_ISDIR(mode) ? ::mkdirat(p.fd.get(), bn, mode & 07777) : ::mknodat(p.fd.get(), bn, mode, rdev);
  if (rc != 0) {
    int err = errno;
    if (err != EEXIST) undo_long_name(p, b);
    return (void)fuse_reply_err(req, err);
  }
  if (S_ISDIR(mode) && names_.encrypted()) {
    // A new directory gets its IV before anyone can create names in it.
    UniqueFd dfd(::openat(p.fd.get(), bn, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    int err = dfd.valid() ? NameMapper::create_dir_iv(dfd.get()) : errno;
    if (err != 0) {
      dfd.reset();
      ::unlinkat(p.fd.get(), bn, AT_REMOVEDIR);
      undo_long_name(p, b);
      return (void)fuse_reply_err(req, err);
    }
  }
  chown_to_caller(req, p.fd.get(), bn);
  reply_new_entry(req, p, bn, name);
}

void Filesystem::mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  mknod(req, parent, name, S_IFDIR | mode, 0);
}

void Filesystem::unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (reserved_name(parent, name)) return (void)fuse_reply_err(req, ENOENT);
  Inode& p = inode_of(parent);
  NameMapper::Backing b;
  if (int err = backing_name(p, name, b); err != 0) return (void)fuse_reply_err(req, err);
  if (::unlinkat(p.fd.get(), b.name.c_str(), 0) != 0) return (void)fuse_reply_err(req, errno);
  NameMapper::remove_side_file(p.fd.get(), b);
  fuse_reply_err(req, 0);
}

void Filesystem::rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (reserved_name(parent, name)) return (void)fuse_reply_err(req, ENOENT);
  Inode& p = inode_of(parent);
  NameMapper::Backing b;
  if (int err = backing_name(p, name, b); err != 0) return (void)fuse_reply_err(req, err);
  const char* bn = b.name.c_str();
  if (!names_.encrypted()) {
    return (void)fuse_reply_err(req, ::unlinkat(p.fd.get(), bn, AT_REMOVEDIR) == 0 ? 0 : errno);
  }
  // The backing directory holds its kmsfs.diriv: it is empty for the user
  // when nothing else is there. The IV moves out to the parent so that
  // rmdir(2) sees an empty directory, and moves back if rmdir fails.
  ParkedDirIv parked;
  if (int err = park_dir_iv(p.fd.get(), b.name, parked); err != 0) return (void)fuse_reply_err(req, err);
  if (::unlinkat(p.fd.get(), bn, AT_REMOVEDIR) != 0) {
    int err = errno;
    unpark_dir_iv(p.fd.get(), parked);
    return (void)fuse_reply_err(req, err);
  }
  drop_parked_dir_iv(p.fd.get(), parked);
  NameMapper::remove_side_file(p.fd.get(), b);
  fuse_reply_err(req, 0);
}

int Filesystem::park_dir_iv(int parent_fd, const std::string& backing_name, ParkedDirIv& parked) {
  parked = ParkedDirIv{};
  // O_NOATIME: the scan below must not set the access time (a failed rmdir
  // leaves the directory as it was); not allowed unless the owner or
  // CAP_FOWNER, then without.
  const int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
  UniqueFd dfd(::openat(parent_fd, backing_name.c_str(), flags | O_NOATIME));
  if (!dfd.valid() && errno == EPERM) dfd.reset(::openat(parent_fd, backing_name.c_str(), flags));
  if (!dfd.valid()) return errno;
  struct stat st {};  // before the scan below, which sets the access time
  if (::fstat(dfd.get(), &st) != 0) return errno;
  parked.times[0] = st.st_atim;
  parked.times[1] = st.st_mtim;
  {
    UniqueFd scan_fd(::dup(dfd.get()));
    UniqueDir scan(scan_fd.valid() ? ::fdopendir(scan_fd.get()) : nullptr);
    if (!scan) return errno;
    (void)scan_fd.release();
    while (dirent* e = ::readdir(scan.get())) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0 &&
          std::strcmp(e->d_name, NameMapper::kDirIvName) != 0) {
        return ENOTEMPTY;
      }
    }
  }
  std::array<std::uint8_t, 8> rnd{};
  crypto::random_bytes(rnd);
  parked.name = "kmsfs.rmdir." + crypto::to_hex(rnd);
  if (::renameat(dfd.get(), NameMapper::kDirIvName, parent_fd, parked.name.c_str()) == 0) {
    parked.dir = std::move(dfd);
  } else {
    parked.name.clear();  // no IV to park (a directory made outside kmsfs)
  }
  return 0;
}

void Filesystem::unpark_dir_iv(int parent_fd, ParkedDirIv& parked) {
  if (parked.dir.valid()) {
    (void)::renameat(parent_fd, parked.name.c_str(), parked.dir.get(), NameMapper::kDirIvName);
  }
  parked = ParkedDirIv{};
}

void Filesystem::drop_parked_dir_iv(int parent_fd, ParkedDirIv& parked) {
  if (parked.dir.valid()) {
    // The directory is gone (removed or replaced): nothing but the IV's
    // move changed its times since park_dir_iv, so they can go back. (After
    // a failed rmdir, unpark_dir_iv leaves them: another thread may have
    // changed the directory meanwhile.)
    (void)::futimens(parked.dir.get(), parked.times);
    (void)::unlinkat(parent_fd, parked.name.c_str(), 0);
  }
  parked = ParkedDirIv{};
}

void Filesystem::symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  if (reserved_name(parent, name)) return (void)fuse_reply_err(req, EPERM);
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  Inode& p = inode_of(parent);
  NameMapper::Backing b;
  if (int err = backing_name(p, name, b); err != 0) return (void)fuse_reply_err(req, err);
  if (int err = prepare_long_name(p, b); err != 0) return (void)fuse_reply_err(req, err);
  const std::string target = names_.encrypt_symlink(link);
  if (::symlinkat(target.c_str(), p.fd.get(), b.name.c_str()) != 0) {
    int err = errno;
    if (err != EEXIST) undo_long_name(p, b);
    return (void)fuse_reply_err(req, err);
  }
  chown_to_caller(req, p.fd.get(), b.name.c_str());
  reply_new_entry(req, p, b.name.c_str(), name);
}

void Filesystem::rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                        const char* newname, unsigned int flags) {
  if (reserved_name(parent, name) || reserved_name(newparent, newname)) {
    return (void)fuse_reply_err(req, EPERM);
  }
  if ((flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) != 0) return (void)fuse_reply_err(req, EINVAL);
  Inode& from = inode_of(parent);
  Inode& to = inode_of(newparent);
  NameMapper::Backing src;
  NameMapper::Backing dst;
  if (int err = backing_name(from, name, src); err != 0) return (void)fuse_reply_err(req, err);
  if (int err = backing_name(to, newname, dst); err != 0) return (void)fuse_reply_err(req, err);
  // A side file names a directory entry, not an object: the target's side
  // file must exist before the entry does, and the source's goes once the
  // entry has moved (with RENAME_EXCHANGE both names stay in use).
  if (int err = prepare_long_name(to, dst); err != 0) return (void)fuse_reply_err(req, err);
  int rc = ::renameat2(from.fd.get(), src.name.c_str(), to.fd.get(), dst.name.c_str(), flags);
  if (rc != 0 && (errno == ENOTEMPTY || errno == EEXIST) && names_.encrypted() && flags == 0) {
    // The target is a directory holding only its kmsfs.diriv (empty for the
    // user): park the IV as rmdir does and replace the directory.
    ParkedDirIv parked;
    if (int err = park_dir_iv(to.fd.get(), dst.name, parked); err != 0) {
      undo_long_name(to, dst);
      return (void)fuse_reply_err(req, err == ENOTDIR ? ENOTEMPTY : err);
    }
    rc = ::renameat2(from.fd.get(), src.name.c_str(), to.fd.get(), dst.name.c_str(), flags);
    if (rc != 0) {
      int err = errno;
      unpark_dir_iv(to.fd.get(), parked);
      errno = err;
    } else {
      drop_parked_dir_iv(to.fd.get(), parked);
    }
  }
  if (rc != 0) {
    int err = errno;
    undo_long_name(to, dst);
    return (void)fuse_reply_err(req, err);
  }
  if ((flags & RENAME_EXCHANGE) == 0 && src.is_long() &&
      !(&from == &to && src.name == dst.name)) {
    NameMapper::remove_side_file(from.fd.get(), src);
  }
  fuse_reply_err(req, 0);
}

void Filesystem::link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
  if (reserved_name(newparent, newname)) return (void)fuse_reply_err(req, EPERM);
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  Inode& inode = inode_of(ino);
  Inode& np = inode_of(newparent);
  NameMapper::Backing b;
  if (int err = backing_name(np, newname, b); err != 0) return (void)fuse_reply_err(req, err);
  if (int err = prepare_long_name(np, b); err != 0) return (void)fuse_reply_err(req, err);
  if (::linkat(AT_FDCWD, proc_path(inode.fd.get()).c_str(), np.fd.get(), b.name.c_str(),
               AT_SYMLINK_FOLLOW) != 0) {
    int err = errno;
    if (err != EEXIST) undo_long_name(np, b);
    return (void)fuse_reply_err(req, err);
  }
  reply_new_entry(req, np, b.name.c_str(), newname);
}

Result<std::shared_ptr<const FileKey>, int> Filesystem::load_key(Inode& inode, int fd) {
  {
    std::lock_guard lock(inode.state_mutex);
    if (inode.key) return inode.key;
  }
  const std::string label = describe(inode);
  std::uint8_t raw[crypto::FileHeader::kSize];
  ssize_t n = ::pread(fd, raw, sizeof raw, 0);
  if (n < 0) return unexpected(errno);
  if (n == 0) return std::shared_ptr<const FileKey>();  // empty file: no header yet
  auto header = crypto::FileHeader::decode(std::span(raw, static_cast<std::size_t>(n)));
  if (!header) {
    logger()->error("cannot open {}: corrupt header: {}", label, header.error());
    return unexpected(EIO);
  }
  note_cold_open(inode);
  auto key = keys_.open(*header, label);  // no lock held across the KMS call
  if (!key) return unexpected(key.error());
  auto shared = share_key(std::move(*key));
  std::lock_guard lock(inode.state_mutex);
  if (!inode.key) inode.key = shared;  // else another thread won the race
  return inode.key;
}

void Filesystem::note_cold_open(Inode& inode) {
  if (!readahead_) return;
  std::pair<dev_t, ino_t> dir;
  {
    std::lock_guard lock(inode.state_mutex);
    dir = inode.parent;
  }
  if (dir.second == 0) return;
  readahead_->cold_open(dir, is_root(dir), [this, dir] { return open_known_dir(dir); });
}

UniqueFd Filesystem::open_known_dir(std::pair<dev_t, ino_t> dir) {
  if (is_root(dir)) return UniqueFd(::openat(root_.fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  Inode* d = nullptr;
  {
    // A lookup reference keeps the inode (and its fd) alive across the
    // openat, which runs without the table mutex.
    std::lock_guard lock(table_mutex_);
    auto it = inodes_.find(dir);
    if (it == inodes_.end() || it->second->type != S_IFDIR) return UniqueFd();
    d = it->second.get();
    d->nlookup++;
  }
  UniqueFd fd(::openat(d->fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  forget(ino_of(*d), 1);
  return fd;
}

Result<std::shared_ptr<const FileKey>, int> Filesystem::key_for_write(
    Inode& inode, int fd, std::unique_lock<std::shared_mutex>& lock) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    auto existing = load_key(inode, fd);
    if (!existing) return existing;
    if (*existing) {
      lock = std::unique_lock(inode.content);
      {
        std::lock_guard sl(inode.state_mutex);
        if (inode.key) return inode.key;
      }
      lock.unlock();  // dropped meanwhile by a truncate to zero: start over
      continue;
    }
    // Empty backing file: the key made at open (or, for a file written
    // without an open handle, a new one made now, before taking the lock: no
    // lock across a KMS call) is installed only if the file is still empty.
    std::shared_ptr<FileKeys::NewFile> fresh;
    std::shared_ptr<FileKeys::NewFile> stale;  // made under the volume's previous key
    {
      std::lock_guard sl(inode.state_mutex);
      if (inode.pending && !keys_.is_current(*inode.pending)) stale = std::move(inode.pending);
      fresh = inode.pending;
    }
    if (!fresh) {
      if (int err = prepare_new_key(inode); err != 0) return unexpected(err);
      std::lock_guard sl(inode.state_mutex);
      fresh = inode.pending;
    }
    lock = std::unique_lock(inode.content);
    {
      std::lock_guard sl(inode.state_mutex);
      if (inode.key) return inode.key;
    }
    // Against `kmsfs rewrap` in another process (fs/header_lock.h).
    const HeaderLock header_lock(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) return unexpected(errno);
    if (st.st_size == 0 && fresh) {
      auto bytes = fresh->header.encode();
      // Preallocate the header so that ENOSPC fails here, not mid-header;
      // KEEP_SIZE, so that a concurrent load_key never reads 128 zero bytes.
      if (::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(bytes.size())) != 0 &&
          errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
        return unexpected(errno);
      }
      ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), 0);
      if (n != static_cast<ssize_t>(bytes.size())) {
        int err = n < 0 ? errno : EIO;
        (void)::ftruncate(fd, 0);
        return unexpected(err);
      }
      if (settings_.cache_sizes) {
        inode.stored_size.store(static_cast<std::int64_t>(bytes.size()));
        inode.dense = 1;
      }
      auto key = share_key(std::move(fresh->key));
      std::lock_guard sl(inode.state_mutex);
      inode.key = key;
      if (inode.pending == fresh) inode.pending.reset();
      return inode.key;
    }
    // Another writer created the header first: use its key.
    lock.unlock();
  }
  logger()->error("cannot prepare the data key of backing inode {}: the file keeps changing",
                  inode.ino);
  return unexpected(EIO);
}

void Filesystem::drop_key_if_closed(Inode& inode) {
  std::shared_ptr<const FileKey> doomed;  // zeroized outside the lock
  std::shared_ptr<FileKeys::NewFile> doomed_pending;
  std::lock_guard lock(inode.state_mutex);
  if (inode.open_count == 0) {
    doomed = std::move(inode.key);
    doomed_pending = std::move(inode.pending);
  }
}

int Filesystem::prepare_new_key(Inode& inode) {
  std::shared_ptr<FileKeys::NewFile> stale;  // made under the volume's previous key
  {
    std::lock_guard sl(inode.state_mutex);
    if (inode.pending && !keys_.is_current(*inode.pending)) stale = std::move(inode.pending);
    if (inode.pending) return 0;
  }
  const std::string label = describe(inode);
  auto nf = keys_.create(label);
  if (!nf) return nf.error();
  auto fresh = std::make_shared<FileKeys::NewFile>(std::move(*nf));
  std::lock_guard sl(inode.state_mutex);
  if (!inode.pending) inode.pending = std::move(fresh);  // else another thread won the race
  return 0;
}

int Filesystem::truncate_locked(Inode& inode, int fd, std::uint64_t new_size, const FileKey* key,
                                std::unique_lock<std::shared_mutex>&) {
  // Whatever happens below, the next read or write states the file again
  // (an extension leaves a hole; a failure may leave any size).
  inode.stored_size.store(-1);
  inode.dense = -1;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno;
  if (new_size == 0) {
    // An empty file has no header: the next write makes a new file id and
    // data key, so no old ciphertext is ever reused under a new key.
    if (::ftruncate(fd, 0) != 0) return errno;
    std::shared_ptr<const FileKey> doomed;
    std::lock_guard sl(inode.state_mutex);
    doomed = std::move(inode.key);
    return 0;
  }
  if (key == nullptr) {
    logger()->error("internal error: extending backing inode {} without its key", inode.ino);
    return EIO;
  }
  EncryptedFile file(fd, *key, [&inode] { return describe(inode); });
  return -file.truncate(bl::plain_size(static_cast<std::uint64_t>(st.st_size)), new_size);
}

void Filesystem::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& inode = inode_of(ino);
  if (inode.type != S_IFREG) {
    // Fifos and devices are opened by the kernel itself; anything else here
    // is a directory, handled by opendir.
    return (void)fuse_reply_err(req, inode.type == S_IFDIR ? EISDIR : EINVAL);
  }
  const bool wants_write = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC) != 0;
  if (settings_.read_only && wants_write) return (void)fuse_reply_err(req, EROFS);
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  const std::string path = proc_path(inode.fd.get());
  UniqueFd fd(::open(path.c_str(), backing_flags(fi->flags, settings_.read_only)));
  if (!fd.valid() && errno == EACCES && !wants_write) {
    fd.reset(::open(path.c_str(), backing_flags(fi->flags, true)));
  }
  if (!fd.valid()) return (void)fuse_reply_err(req, note_open_error(errno));

  {
    std::lock_guard lock(inode.state_mutex);
    inode.open_count++;
  }
  if (wants_write) {
    // An empty file opened for writing gets its data key now (see
    // Inode::pending); before the truncation, so that a KMS error truncates
    // nothing.
    struct stat st {};
    int err = ::fstat(fd.get(), &st) != 0 ? errno : 0;
    if (err == 0 && ((fi->flags & O_TRUNC) != 0 || st.st_size == 0)) err = prepare_new_key(inode);
    if (err != 0) {
      {
        std::lock_guard sl(inode.state_mutex);
        inode.open_count--;
      }
      drop_key_if_closed(inode);
      return (void)fuse_reply_err(req, err);
    }
  }
  if ((fi->flags & O_TRUNC) != 0) {
    std::unique_lock lock(inode.content);
    int err = truncate_locked(inode, fd.get(), 0, nullptr, lock);
    if (err == 0) err = kill_suid_sgid_if_asked(fd.get());
    if (err != 0) {
      lock.unlock();
      {
        std::lock_guard sl(inode.state_mutex);
        inode.open_count--;
      }
      drop_key_if_closed(inode);
      return (void)fuse_reply_err(req, err);
    }
  }
  auto key = load_key(inode, fd.get());
  if (!key) {
    {
      std::lock_guard sl(inode.state_mutex);
      inode.open_count--;
    }
    drop_key_if_closed(inode);
    return (void)fuse_reply_err(req, key.error());
  }
  fi->fh = static_cast<std::uint64_t>(fd.release());
  fi->keep_cache = settings_.kernel_cache ? 1 : 0;
  fi->noflush = 0;
  open_handles_++;
  if (fuse_reply_open(req, fi) == -ENOENT) {
    // The opener was interrupted: no release will come for this handle.
    release_handle(inode, fi);
  }
}

void Filesystem::create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                        fuse_file_info* fi) {
  if (reserved_name(parent, name)) return (void)fuse_reply_err(req, EPERM);
  if (settings_.read_only) return (void)fuse_reply_err(req, EROFS);
  Inode& p = inode_of(parent);
  NameMapper::Backing b;
  if (int err = backing_name(p, name, b); err != 0) return (void)fuse_reply_err(req, err);
  // The handle's descriptor and the new inode's.
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  if (int err = prepare_long_name(p, b); err != 0) return (void)fuse_reply_err(req, err);
  // Made here, or there already (a race with another creator)? Only a file
  // made here is owned by the caller and removed again if it cannot get a key.
  const int flags = backing_flags(fi->flags, false) | O_NOFOLLOW;
  UniqueFd fd;
  bool created = false;
  for (int attempt = 0; attempt < 8 && !fd.valid(); ++attempt) {
    fd.reset(::openat(p.fd.get(), b.name.c_str(), flags | O_CREAT | O_EXCL, mode & 07777));
    if (fd.valid()) {
      created = true;
    } else if (errno == EEXIST && (fi->flags & O_EXCL) == 0) {
      fd.reset(::openat(p.fd.get(), b.name.c_str(), flags));
      if (!fd.valid() && errno != ENOENT) break;  // ENOENT: gone again, retry
    } else {
      break;
    }
  }
  if (!fd.valid()) {
    int err = note_open_error(errno);
    if (err != EEXIST) undo_long_name(p, b);
    return (void)fuse_reply_err(req, err);
  }
  if (created) chown_to_caller(req, p.fd.get(), b.name.c_str());

  fuse_entry_param e{};
  if (int err = do_lookup(p, b.name.c_str(), &e, name); err != 0) return (void)fuse_reply_err(req, err);
  Inode& inode = inode_of(e.ino);
  {
    std::lock_guard lock(inode.state_mutex);
    inode.open_count++;
  }
  // A new (empty) file gets its data key now (see Inode::pending); a KMS
  // error fails creat(2) and removes the file it made.
  const bool wants_write = (fi->flags & O_ACCMODE) != O_RDONLY;
  int key_err = 0;
  if (wants_write) {
    struct stat st {};
    key_err = ::fstat(fd.get(), &st) != 0 ? errno : 0;
    if (key_err == 0 && (created || (fi->flags & O_TRUNC) != 0 || st.st_size == 0)) {
      key_err = prepare_new_key(inode);
    }
  }
  if (key_err != 0) {
    {
      std::lock_guard sl(inode.state_mutex);
      inode.open_count--;
    }
    drop_key_if_closed(inode);
    if (created) {
      (void)::unlinkat(p.fd.get(), b.name.c_str(), 0);
      undo_long_name(p, b);
    }
    forget(e.ino, 1);
    return (void)fuse_reply_err(req, key_err);
  }
  if ((fi->flags & O_TRUNC) != 0) {
    std::unique_lock lock(inode.content);
    if (truncate_locked(inode, fd.get(), 0, nullptr, lock) == 0) (void)kill_suid_sgid_if_asked(fd.get());
  }
  auto key = load_key(inode, fd.get());  // an existing file opened through create
  if (!key) {
    {
      std::lock_guard sl(inode.state_mutex);
      inode.open_count--;
    }
    drop_key_if_closed(inode);
    forget(e.ino, 1);
    return (void)fuse_reply_err(req, key.error());
  }
  fi->fh = static_cast<std::uint64_t>(fd.release());
  fi->keep_cache = settings_.kernel_cache ? 1 : 0;
  open_handles_++;
  if (fuse_reply_create(req, &e, fi) == -ENOENT) {
    release_handle(inode, fi);
    forget(e.ino, 1);
  }
}

Result<std::uint64_t, int> Filesystem::stored_size_of(Inode& inode, int fd) const {
  const std::int64_t known = inode.stored_size.load();
  if (known >= 0) return static_cast<std::uint64_t>(known);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return unexpected(errno);
  if (settings_.cache_sizes) inode.stored_size.store(static_cast<std::int64_t>(st.st_size));
  return static_cast<std::uint64_t>(st.st_size);
}

std::string Filesystem::describe(Inode& inode) {
  std::lock_guard sl(inode.state_mutex);
  return "'" + inode.label + "' (backing inode " + std::to_string(inode.ino) + ")";
}

void Filesystem::read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  Inode& inode = inode_of(ino);
  const int fd = static_cast<int>(fi->fh);
  thread_local ThreadBuffer out_buffer;
  std::uint8_t* const out = out_buffer.get(size);
  long n = 0;
  {
    std::shared_lock lock(inode.content);
    auto stored = stored_size_of(inode, fd);
    if (!stored) {
      lock.unlock();
      return (void)fuse_reply_err(req, stored.error());
    }
    const std::uint64_t plain = bl::plain_size(*stored);
    if (plain > static_cast<std::uint64_t>(off)) {
      std::shared_ptr<const FileKey> key;
      {
        std::lock_guard sl(inode.state_mutex);
        key = inode.key;
      }
      if (!key) {
        // The header appeared after open (another opener wrote first).
        auto loaded = load_key(inode, fd);
        if (!loaded || !*loaded) {
          lock.unlock();
          return (void)fuse_reply_err(req, loaded ? EIO : loaded.error());
        }
        key = *loaded;
      }
      EncryptedFile file(fd, *key, [&inode] { return describe(inode); });
      n = file.read(plain, static_cast<std::uint64_t>(off), std::span(out, size));
    }
  }
  if (n < 0) return (void)fuse_reply_err(req, static_cast<int>(-n));
  fuse_reply_buf(req, reinterpret_cast<const char*>(out), static_cast<size_t>(n));
}

void Filesystem::write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
                       fuse_file_info* fi) {
  Inode& inode = inode_of(ino);
  const int fd = static_cast<int>(fi->fh);
  if (off < 0) return (void)fuse_reply_err(req, EINVAL);
  const std::span data(reinterpret_cast<const std::uint8_t*>(buf), size);
  // A large block-aligned write into a file that has its key is encrypted
  // before the content lock (EncryptedFile::seal_ahead): the kernel sends a
  // file's write-back as several concurrent requests, which then encrypt
  // on every core instead of one after another under the lock.
  std::shared_ptr<const FileKey> sealed_with;
  std::uint8_t* sealed = nullptr;
  if (size >= kSealAheadMin && bl::block_offset_in(static_cast<std::uint64_t>(off)) == 0) {
    {
      std::lock_guard sl(inode.state_mutex);
      sealed_with = inode.key;
    }
    if (sealed_with) {
      thread_local ThreadBuffer seal_buffer;
      sealed = seal_buffer.get(EncryptedFile::sealed_size(size));
      EncryptedFile(fd, *sealed_with, std::string()).seal_ahead(static_cast<std::uint64_t>(off), data, sealed);
    }
  }
  long n = 0;
  {
    std::unique_lock<std::shared_mutex> lock;
    auto key = key_for_write(inode, fd, lock);
    if (!key) {
      if (lock.owns_lock()) lock.unlock();
      return (void)fuse_reply_err(req, key.error());
    }
    auto stored = stored_size_of(inode, fd);
    if (!stored) {
      lock.unlock();
      return (void)fuse_reply_err(req, stored.error());
    }
    if (int err = kill_suid_sgid_if_asked(fd); err != 0) {
      lock.unlock();
      return (void)fuse_reply_err(req, err);
    }
    const std::uint64_t plain = bl::plain_size(*stored);
    const std::uint64_t first = bl::block_index(static_cast<std::uint64_t>(off));
    const std::uint64_t blocks = (plain + bl::kBlockSize - 1) / bl::kBlockSize;
    if (settings_.cache_sizes && inode.dense < 0 && first < blocks) {
      // The first write into the file's blocks: whether it has holes.
      const off_t hole = ::lseek(fd, 0, SEEK_HOLE);
      inode.dense = hole >= 0 && static_cast<std::uint64_t>(hole) >= *stored ? 1 : 0;
    }
    EncryptedFile file(fd, **key, [&inode] { return describe(inode); });
    const std::uint64_t allocated_end = settings_.cache_sizes && inode.dense == 1 ? *stored : 0;
    n = EncryptedFile::kNotSealable;
    // Sealed under the key the file still has (a truncate to zero may have
    // given it a new one meanwhile): else sealed again here.
    if (sealed != nullptr && key->get() == sealed_with.get()) {
      n = file.write_sealed(plain, static_cast<std::uint64_t>(off), size, sealed, allocated_end);
    }
    if (n == EncryptedFile::kNotSealable) n = file.write(plain, static_cast<std::uint64_t>(off), data, allocated_end);
    if (n < 0) {
      inode.stored_size.store(-1);  // a failed write may have changed anything
      inode.dense = -1;
    } else if (settings_.cache_sizes) {
      const std::uint64_t end = static_cast<std::uint64_t>(off) + static_cast<std::uint64_t>(n);
      inode.stored_size.store(static_cast<std::int64_t>(bl::stored_size(std::max(plain, end))));
      if (first > blocks) inode.dense = 0;  // blocks skipped: a hole
    }
  }
  if (n < 0) return (void)fuse_reply_err(req, static_cast<int>(-n));
  fuse_reply_write(req, static_cast<size_t>(n));
}

void Filesystem::release_handle(Inode& inode, fuse_file_info* fi) {
  UniqueFd fd(static_cast<int>(fi->fh));
  fd.reset();
  {
    std::lock_guard lock(inode.state_mutex);
    inode.open_count--;
  }
  drop_key_if_closed(inode);
  open_handles_--;
}

void Filesystem::release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  release_handle(inode_of(ino), fi);
  fuse_reply_err(req, 0);
}

void Filesystem::fsync(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  int fd = static_cast<int>(fi->fh);
  int rc = datasync != 0 ? ::fdatasync(fd) : ::fsync(fd);
  fuse_reply_err(req, rc == 0 ? 0 : errno);
}

void Filesystem::opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& inode = inode_of(ino);
  if (int err = descriptor_room(); err != 0) return (void)fuse_reply_err(req, err);
  UniqueFd fd(::openat(inode.fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return (void)fuse_reply_err(req, note_open_error(errno));
  auto handle = std::make_unique<DirHandle>();
  if (names_.encrypted()) {
    if (int err = dir_iv(inode, handle->iv); err != 0) return (void)fuse_reply_err(req, err);
  }
  handle->dir.reset(::fdopendir(fd.get()));
  if (!handle->dir) return (void)fuse_reply_err(req, errno);
  (void)fd.release();  // owned by the DIR stream now
  fi->fh = reinterpret_cast<std::uint64_t>(handle.release());
  fi->cache_readdir = 0;
  if (readahead_) readahead_->listed({inode.dev, inode.ino});
  open_handles_++;
  {
    std::lock_guard lock(dir_handles_mu_);
    dir_handles_.insert(fi->fh);
  }
  if (fuse_reply_open(req, fi) == -ENOENT) {
    {
      std::lock_guard lock(dir_handles_mu_);
      dir_handles_.erase(fi->fh);
    }
    std::unique_ptr<DirHandle> d(dir_handle(fi));
    open_handles_--;
  }
}

void Filesystem::readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         fuse_file_info* fi, bool plus) {
  DirHandle* d = dir_handle(fi);
  Inode& dir_inode = inode_of(ino);
  std::vector<char> buf(size);
  size_t used = 0;
  if (off != d->offset) {
    ::seekdir(d->dir.get(), off);
    d->pending = nullptr;
    d->offset = off;
  }
  while (true) {
    struct dirent* entry = d->pending;
    if (entry == nullptr) {
      errno = 0;
      entry = ::readdir(d->dir.get());
      if (entry == nullptr) {
        if (errno != 0 && used == 0) return (void)fuse_reply_err(req, errno);
        break;
      }
    }
    d->pending = nullptr;
    const off_t next = entry->d_off;
    const bool dot = std::strcmp(entry->d_name, ".") == 0 || std::strcmp(entry->d_name, "..") == 0;
    std::optional<std::string> plain_name;
    if (dot) {
      plain_name = entry->d_name;
    } else if (!names_.is_internal(entry->d_name, ino == FUSE_ROOT_ID)) {
      plain_name = names_.to_plain(::dirfd(d->dir.get()), entry->d_name, d->iv);
      if (!plain_name) {
        logger()->warn("skipping backing entry '{}' (directory backing inode {}): its name does "
                       "not decrypt; run kmsfs fsck", entry->d_name, dir_inode.ino);
      }
    }
    if (!plain_name) {
      d->offset = next;
      continue;
    }
    size_t need = 0;
    if (plus) {
      fuse_entry_param e{};
      // Past the inode bound, entries go without attributes (ino 0: the
      // kernel makes no dentry and looks the name up when it is used), so
      // that listing a large directory adds no inodes at once.
      // So does an entry whose lookup finds no descriptor left (EMFILE).
      bool bare = dot || (settings_.max_inodes > 0 && inode_total_.load() >= settings_.max_inodes);
      if (!bare) {
        const int err = do_lookup(dir_inode, entry->d_name, &e, plain_name->c_str());
        if (err == ENOENT) {  // vanished meanwhile
          d->offset = next;
          continue;
        }
        if (err == EMFILE || err == ENFILE) {
          bare = true;
        } else if (err != 0) {
          if (used == 0) return (void)fuse_reply_err(req, err);
          break;
        }
      }
      if (bare) {
        e = fuse_entry_param{};
        e.attr.st_ino = entry->d_ino;
        e.attr.st_mode = static_cast<mode_t>(entry->d_type) << 12;
      }
      need = fuse_add_direntry_plus(req, buf.data() + used, size - used, plain_name->c_str(), &e, next);
      if (need > size - used) {
        if (!bare) forget(e.ino, 1);  // not delivered: give the reference back
        d->pending = entry;
        break;
      }
    } else {
      struct stat st {};
      st.st_ino = entry->d_ino;
      st.st_mode = static_cast<mode_t>(entry->d_type) << 12;
      need = fuse_add_direntry(req, buf.data() + used, size - used, plain_name->c_str(), &st, next);
      if (need > size - used) {
        d->pending = entry;
        break;
      }
    }
    used += need;
    d->offset = next;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void Filesystem::releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  {
    std::lock_guard lock(dir_handles_mu_);
    dir_handles_.erase(fi->fh);
  }
  std::unique_ptr<DirHandle> d(dir_handle(fi));
  d.reset();
  open_handles_--;
  fuse_reply_err(req, 0);
}

void Filesystem::fsyncdir(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  int fd = ::dirfd(dir_handle(fi)->dir.get());
  int rc = datasync != 0 ? ::fdatasync(fd) : ::fsync(fd);
  fuse_reply_err(req, rc == 0 ? 0 : errno);
}

void Filesystem::statfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs sv {};
  if (::fstatvfs(root_.fd.get(), &sv) != 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_statfs(req, &sv);
}

void Filesystem::setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value,
                          size_t size, int flags) {
  // Only the user namespace is stored; security.* and trusted.* would be
  // interpreted by the backing filesystem, not the mount. Names and values
  // are encrypted with encrypted names.
  if (!is_user_xattr(name)) return (void)fuse_reply_err(req, EOPNOTSUPP);
  Inode& inode = inode_of(ino);
  if (inode.type != S_IFREG && inode.type != S_IFDIR) return (void)fuse_reply_err(req, EPERM);
  const std::string stored = names_.encrypt_xattr_name(name);
  if (stored.size() > XATTR_NAME_MAX) return (void)fuse_reply_err(req, ERANGE);
  auto sealed = names_.encrypt_xattr_value(
      stored, std::span(reinterpret_cast<const std::uint8_t*>(value), size));
  const std::string path = proc_path(inode.fd.get());
  // listxattr(2) hands out at most XATTR_LIST_MAX (64 KiB) of names, and the
  // stored (encrypted) names are longer than the plaintext ones: a name
  // that would take the backing list past it is refused with ENOSPC, as a
  // full ext4 inode does, so that listxattr on the mount always works
  // (it would fail with E2BIG on every later call otherwise).
  std::lock_guard lock(xattr_mutex_);
  if (::getxattr(path.c_str(), stored.c_str(), nullptr, 0) < 0 && errno == ENODATA) {
    const ssize_t listed = ::listxattr(path.c_str(), nullptr, 0);
    if (listed < 0) return (void)fuse_reply_err(req, errno);
    if (static_cast<std::size_t>(listed) + stored.size() + 1 > XATTR_LIST_MAX) {
      return (void)fuse_reply_err(req, ENOSPC);
    }
  }
  int rc = ::setxattr(path.c_str(), stored.c_str(), sealed.data(), sealed.size(), flags);
  fuse_reply_err(req, rc == 0 ? 0 : errno);
}

void Filesystem::getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  // Other namespaces are not supported, as setxattr says: EOPNOTSUPP, not
  // ENODATA. It is also what lets ls -l and cp stop asking for
  // security.selinux and POSIX ACLs on every file: they remember a device
  // that answered "not supported", while the kernel sends every GETXATTR to
  // the server (two round trips per file of an ls -l otherwise).
  if (!is_user_xattr(name)) return (void)fuse_reply_err(req, EOPNOTSUPP);
  Inode& inode = inode_of(ino);
  if (inode.type != S_IFREG && inode.type != S_IFDIR) return (void)fuse_reply_err(req, ENODATA);
  const std::string path = proc_path(inode.fd.get());
  const std::string stored = names_.encrypt_xattr_name(name);
  ssize_t n = ::getxattr(path.c_str(), stored.c_str(), nullptr, 0);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  std::vector<std::uint8_t> raw(static_cast<size_t>(n));
  n = ::getxattr(path.c_str(), stored.c_str(), raw.data(), raw.size());
  if (n < 0) return (void)fuse_reply_err(req, errno);
  raw.resize(static_cast<size_t>(n));
  auto plain = names_.decrypt_xattr_value(stored, raw);
  if (!plain) {
    logger()->error("xattr of backing inode {} does not decrypt (damaged)", inode.ino);
    return (void)fuse_reply_err(req, EIO);
  }
  if (size == 0) return (void)fuse_reply_xattr(req, plain->size());
  if (plain->size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, reinterpret_cast<const char*>(plain->data()), plain->size());
}

void Filesystem::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Inode& inode = inode_of(ino);
  std::string names;
  if (inode.type == S_IFREG || inode.type == S_IFDIR) {
    const std::string path = proc_path(inode.fd.get());
    ssize_t n = ::listxattr(path.c_str(), nullptr, 0);
    if (n < 0) return (void)fuse_reply_err(req, errno);
    std::vector<char> all(static_cast<size_t>(n) + 1);
    n = ::listxattr(path.c_str(), all.data(), all.size());
    if (n < 0) return (void)fuse_reply_err(req, errno);
    for (ssize_t i = 0; i < n;) {
      const char* stored = all.data() + i;
      size_t len = std::strlen(stored);
      if (is_user_xattr(stored)) {
        if (auto plain = names_.decrypt_xattr_name(stored)) names.append(*plain).push_back('\0');
      }
      i += static_cast<ssize_t>(len) + 1;
    }
  }
  if (size == 0) return (void)fuse_reply_xattr(req, names.size());
  if (names.size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, names.data(), names.size());
}

void Filesystem::removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  if (!is_user_xattr(name)) return (void)fuse_reply_err(req, EOPNOTSUPP);
  Inode& inode = inode_of(ino);
  if (inode.type != S_IFREG && inode.type != S_IFDIR) return (void)fuse_reply_err(req, ENODATA);
  const std::string stored = names_.encrypt_xattr_name(name);
  int rc = ::removexattr(proc_path(inode.fd.get()).c_str(), stored.c_str());
  fuse_reply_err(req, rc == 0 ? 0 : errno);
}

void Filesystem::fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           fuse_file_info* fi) {
  // Mode 0 only (posix_fallocate): make sure the file is at least
  // offset + length long. Other modes (punch hole, collapse, ...) would
  // need ciphertext-aware handling.
  if (mode != 0) return (void)fuse_reply_err(req, EOPNOTSUPP);
  if (offset < 0 || length <= 0) return (void)fuse_reply_err(req, EINVAL);
  Inode& inode = inode_of(ino);
  const int fd = static_cast<int>(fi->fh);
  std::unique_lock<std::shared_mutex> lock;
  auto key = key_for_write(inode, fd, lock);
  if (!key) {
    if (lock.owns_lock()) lock.unlock();
    return (void)fuse_reply_err(req, key.error());
  }
  struct stat st {};
  int err = 0;
  if (::fstat(fd, &st) != 0) {
    err = errno;
  } else {
    const std::uint64_t plain = bl::plain_size(static_cast<std::uint64_t>(st.st_size));
    const std::uint64_t want = static_cast<std::uint64_t>(offset) + static_cast<std::uint64_t>(length);
    if (want > plain) err = truncate_locked(inode, fd, want, key->get(), lock);
  }
  lock.unlock();
  fuse_reply_err(req, err);
}

// ---------------------------------------------------------------------------
// noexcept trampolines: the C boundary.

namespace {

void op_init(void* userdata, fuse_conn_info* conn) noexcept {
  try {
    static_cast<Filesystem*>(userdata)->init(conn);
  } catch (const std::exception& e) {
    logger()->error("internal error in init: {}", e.what());
  }
}
void op_destroy(void* userdata) noexcept {
  try {
    static_cast<Filesystem*>(userdata)->stop_trimmer();
  } catch (const std::exception& e) {
    logger()->error("internal error in destroy: {}", e.what());
  }
}
void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  guarded(req, "lookup", [&] { fs_of(req).lookup(req, parent, name); }, Scrub::kNo);
}
void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) noexcept {
  try {
    fs_of(req).forget(ino, n);
  } catch (...) {
  }
  fuse_reply_none(req);
}
void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) noexcept {
  try {
    for (size_t i = 0; i < count; ++i) fs_of(req).forget(forgets[i].ino, forgets[i].nlookup);
  } catch (...) {
  }
  fuse_reply_none(req);
}
void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  guarded(req, "getattr", [&] { fs_of(req).getattr(req, ino, fi); }, Scrub::kNo);
}
void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set,
                fuse_file_info* fi) noexcept {
  guarded(req, "setattr", [&] { fs_of(req).setattr(req, ino, attr, to_set, fi); });
}
void op_readlink(fuse_req_t req, fuse_ino_t ino) noexcept {
  guarded(req, "readlink", [&] { fs_of(req).readlink(req, ino); }, Scrub::kNo);
}
void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) noexcept {
  guarded(req, "mknod", [&] { fs_of(req).mknod(req, parent, name, mode, rdev); });
}
void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) noexcept {
  guarded(req, "mkdir", [&] { fs_of(req).mkdir(req, parent, name, mode); }, Scrub::kNo);
}
void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  guarded(req, "unlink", [&] { fs_of(req).unlink(req, parent, name); }, Scrub::kNo);
}
void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  guarded(req, "rmdir", [&] { fs_of(req).rmdir(req, parent, name); }, Scrub::kNo);
}
void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) noexcept {
  guarded(req, "symlink", [&] { fs_of(req).symlink(req, link, parent, name); }, Scrub::kNo);
}
void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
               const char* newname, unsigned int flags) noexcept {
  guarded(req, "rename", [&] { fs_of(req).rename(req, parent, name, newparent, newname, flags); }, Scrub::kNo);
}
void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) noexcept {
  guarded(req, "link", [&] { fs_of(req).link(req, ino, newparent, newname); }, Scrub::kNo);
}
void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  guarded(req, "open", [&] { fs_of(req).open(req, ino, fi); });
}
void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
               fuse_file_info* fi) noexcept {
  guarded(req, "create", [&] { fs_of(req).create(req, parent, name, mode, fi); });
}
void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) noexcept {
  guarded(req, "read", [&] { fs_of(req).read(req, ino, size, off, fi); });
}
void op_write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
              fuse_file_info* fi) noexcept {
  guarded(req, "write", [&] { fs_of(req).write(req, ino, buf, size, off, fi); });
}
void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) noexcept { fuse_reply_err(req, 0); }
void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  guarded(req, "release", [&] { fs_of(req).release(req, ino, fi); });
}
void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) noexcept {
  guarded(req, "fsync", [&] { fs_of(req).fsync(req, ino, datasync, fi); });
}
void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  guarded(req, "opendir", [&] { fs_of(req).opendir(req, ino, fi); }, Scrub::kNo);
}
void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) noexcept {
  guarded(req, "readdir", [&] { fs_of(req).readdir(req, ino, size, off, fi, false); }, Scrub::kNo);
}
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    fuse_file_info* fi) noexcept {
  guarded(req, "readdirplus", [&] { fs_of(req).readdir(req, ino, size, off, fi, true); }, Scrub::kNo);
}
void op_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  guarded(req, "releasedir", [&] { fs_of(req).releasedir(req, ino, fi); }, Scrub::kNo);
}
void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) noexcept {
  guarded(req, "fsyncdir", [&] { fs_of(req).fsyncdir(req, ino, datasync, fi); }, Scrub::kNo);
}
void op_statfs(fuse_req_t req, fuse_ino_t ino) noexcept {
  guarded(req, "statfs", [&] { fs_of(req).statfs(req, ino); }, Scrub::kNo);
}
void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                 int flags) noexcept {
  guarded(req, "setxattr", [&] { fs_of(req).setxattr(req, ino, name, value, size, flags); }, Scrub::kNo);
}
void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) noexcept {
  guarded(req, "getxattr", [&] { fs_of(req).getxattr(req, ino, name, size); }, Scrub::kNo);
}
void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept {
  guarded(req, "listxattr", [&] { fs_of(req).listxattr(req, ino, size); }, Scrub::kNo);
}
void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) noexcept {
  guarded(req, "removexattr", [&] { fs_of(req).removexattr(req, ino, name); }, Scrub::kNo);
}
void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                  fuse_file_info* fi) noexcept {
  guarded(req, "fallocate", [&] { fs_of(req).fallocate(req, ino, mode, offset, length, fi); });
}

fuse_lowlevel_ops make_ops() {
  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.destroy = op_destroy;
  ops.lookup = op_lookup;
  ops.forget = op_forget;
  ops.forget_multi = op_forget_multi;
  ops.getattr = op_getattr;
  ops.setattr = op_setattr;
  ops.readlink = op_readlink;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.symlink = op_symlink;
  ops.rename = op_rename;
  ops.link = op_link;
  ops.open = op_open;
  ops.create = op_create;
  ops.read = op_read;
  ops.write = op_write;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.opendir = op_opendir;
  ops.readdir = op_readdir;
  ops.readdirplus = op_readdirplus;
  ops.releasedir = op_releasedir;
  ops.fsyncdir = op_fsyncdir;
  ops.statfs = op_statfs;
  ops.setxattr = op_setxattr;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  ops.removexattr = op_removexattr;
  ops.fallocate = op_fallocate;
  return ops;
}

}  // namespace

const fuse_lowlevel_ops& Filesystem::operations() {
  static const fuse_lowlevel_ops ops = make_ops();
  return ops;
}

}  // namespace kmsfs::fs
