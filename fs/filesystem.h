#pragma once
// The FUSE low-level filesystem (libfuse 3 API, inode based, after
// libfuse's passthrough_hp). Every inode holds an O_PATH fd on its backing
// object; everything else is reached with *at() calls relative to it.
// Regular files are encrypted (EncryptedFile); directories, symlinks, fifos
// and sockets pass through.
//
// Lock order: Inode::content (shared_mutex) before Inode::state_mutex;
// Filesystem::table_mutex_ is never held with either. No lock is held
// across a KMS call or a fuse_reply_*.

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>

#include "fs/encrypted_file.h"
#include "fs/file_keys.h"
#include "fs/key_readahead.h"
#include "fs/name_mapper.h"
#include "fs/unique_fd.h"

namespace kmsfs::fs {

// Descriptors of the open-file limit `limit` that the filesystem leaves
// free for everything else in the process (the KMS core, the HSM module,
// the FUSE session, logs): an eighth, at least 128 and at most 4096.
constexpr std::size_t descriptor_reserve(std::size_t limit) {
  return limit / 8 < 128 ? 128 : (limit / 8 > 4096 ? 4096 : limit / 8);
}

struct FsSettings {
  double entry_timeout = 1.0;
  double attr_timeout = 1.0;
  bool writeback_cache = true;
  bool kernel_cache = false;
  bool read_only = false;
  // Each regular file's backing size is kept per inode between requests
  // (Inode::stored_size). Off when other mounts change the same backing
  // files (-o shared_storage): every read and write states the file.
  bool cache_sizes = true;
  // Inodes (each holds an O_PATH descriptor) the mount keeps before it asks
  // the kernel to forget entries it does not use: past it, a background
  // thread invalidates entries until a quarter of the bound is free again;
  // 0 = no bound. Keeps a large tree walk within the open-file limit.
  std::size_t max_inodes = 0;
  // Key read-ahead (fs/key_readahead.h): headers read per directory chunk;
  // 0 = off. Needs the DEK cache.
  std::size_t key_readahead = 0;
  // The kernel's read-ahead window asked for in INIT, in bytes; 0 = what
  // the kernel offers (capped at 1 MiB). The kernel takes the smaller of
  // this and the device's read_ahead_kb, which Volume::mount raises first.
  std::size_t read_ahead = 0;
};

struct Inode {
  // Immutable after creation.
  UniqueFd fd;  // O_PATH | O_NOFOLLOW
  dev_t dev = 0;
  ino_t ino = 0;
  mode_t type = 0;  // S_IFMT bits

  // Guarded by Filesystem::table_mutex_.
  std::uint64_t nlookup = 0;
  // Guarded by Filesystem::table_mutex_: the directory and plaintext name of
  // the inode's last lookup (the kernel's dentry), to ask the kernel to
  // forget the entry when the mount holds too many inodes (max_inodes).
  fuse_ino_t lookup_parent = 0;
  std::string plain_name;

  // Serialises content changes of a regular file: shared for read and
  // getattr, exclusive for write, truncate and header creation.
  std::shared_mutex content;
  // Regular files: the backing file's size in bytes, -1 while not known.
  // Changed with `content` held exclusively (write, truncate, header
  // creation: every change of the size goes through them); a reader holding
  // it shared may fill in an unknown size from fstat (all such readers store
  // the same value). Saves an fstat per read and per write. Always -1 when
  // FsSettings::cache_sizes is off.
  std::atomic<std::int64_t> stored_size{-1};
  // Whether the backing file has no holes before its end: 1 yes, 0 maybe,
  // -1 not known yet. Only under `content` held exclusively. A write inside
  // a file without holes needs no space reserved first.
  int dense = -1;

  std::mutex state_mutex;
  // Guarded by state_mutex. The data key is present while the file is open
  // (or during one operation on a closed file) and zeroized when dropped.
  std::shared_ptr<const FileKey> key;
  // A data key made when an empty file was created or opened for writing,
  // not yet on disk: the first write stores its header. Made at open so that
  // a KMS that cannot give a key fails open(2) or creat(2), where the caller
  // sees it, and never a write-back the caller cannot see.
  std::shared_ptr<FileKeys::NewFile> pending;
  int open_count = 0;
  std::string label;  // last backing name looked up, for log lines
  std::pair<dev_t, ino_t> parent{};  // directory of that lookup (key read-ahead)
  std::optional<DirIvBytes> dir_iv;  // directories with encrypted names
};

class Filesystem {
 public:
  Filesystem(UniqueFd root_fd, FileKeys& keys, const NameMapper& names, FsSettings settings);
  ~Filesystem();

  static const fuse_lowlevel_ops& operations();

  // The session the mount serves: the inode trimmer (FsSettings::max_inodes)
  // tells the kernel through it. Set before the session loop starts.
  void set_session(fuse_session* se) { session_ = se; }
  // Stops the inode trimmer (at DESTROY, before the session goes away).
  void stop_trimmer();

  // Activity, for -o idle_timeout: every request touches; open file and
  // directory handles keep the mount busy.
  void touch() { last_activity_ = now_seconds(); }
  bool idle_for(double seconds) const {
    return open_handles_.load() == 0 && now_seconds() - last_activity_.load() >= seconds;
  }
  static double now_seconds();

  // Operation bodies, called by the noexcept trampolines in filesystem.cpp.
  void init(fuse_conn_info* conn);
  void lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  void forget(fuse_ino_t ino, std::uint64_t n);
  void getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi);
  void readlink(fuse_req_t req, fuse_ino_t ino);
  void mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev);
  void mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode);
  void unlink(fuse_req_t req, fuse_ino_t parent, const char* name);
  void rmdir(fuse_req_t req, fuse_ino_t parent, const char* name);
  void symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name);
  void rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
              const char* newname, unsigned int flags);
  void link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname);
  void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi);
  void read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
  void write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
             fuse_file_info* fi);
  void release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi);
  void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi,
               bool plus);
  void releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi);
  void statfs(fuse_req_t req, fuse_ino_t ino);
  void setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                int flags);
  void getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
  void listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
  void removexattr(fuse_req_t req, fuse_ino_t ino, const char* name);
  void fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                 fuse_file_info* fi);

 private:
  Inode& inode_of(fuse_ino_t ino);
  fuse_ino_t ino_of(Inode& inode);
  // Looks the backing entry `name` up under `parent`, taking one lookup
  // reference; 0 or errno.
  // `plain`: the name the kernel uses for it (nullptr: keep the one known).
  int do_lookup(Inode& parent, const char* name, fuse_entry_param* e, const char* plain);
  // A SETATTR of times the backing file has already (see setattr); `cur`
  // gets the inode's attributes (as stat_inode gives them) when it is.
  bool times_already_set(Inode& inode, const struct stat* attr, int to_set, struct stat* cur);
  int stat_inode(Inode& inode, struct stat* st);
  // Plaintext view of a backing stat: sizes of files and symlinks.
  void to_plain_attr(int fd, struct stat* st) const;
  // The directory's IV (cached); 0 or errno (EIO when it is missing).
  int dir_iv(Inode& dir, DirIvBytes& iv);
  // The backing name of `name` in `dir`; 0 or errno.
  int backing_name(Inode& dir, const char* name, NameMapper::Backing& out);
  // Writes a long name's side file before the entry is created.
  int prepare_long_name(Inode& dir, const NameMapper::Backing& b);
  // Removes a side file written by prepare_long_name if no entry uses it.
  void undo_long_name(Inode& dir, const NameMapper::Backing& b);
  bool reserved_name(fuse_ino_t parent, const char* name) const;
  void reply_new_entry(fuse_req_t req, Inode& parent, const char* name, const char* plain);
  void chown_to_caller(fuse_req_t req, int dirfd, const char* name);

  // rmdir and rename over a directory: a backing directory that holds
  // nothing but its kmsfs.diriv is empty for the user. Its IV is parked in
  // the parent (kmsfs.rmdir.<random>) while the directory goes, and is put
  // back if that fails. ENOTEMPTY when anything else is inside.
  struct ParkedDirIv {
    UniqueFd dir;      // the directory the IV came from (invalid: none parked)
    std::string name;  // its parked name in the parent
    // The directory's access and modification times before the IV moved
    // out (which set its mtime): put back once the directory is removed,
    // so that an fd still open on it shows what the program last set.
    timespec times[2]{};
  };
  static int park_dir_iv(int parent_fd, const std::string& backing_name, ParkedDirIv& parked);
  static void unpark_dir_iv(int parent_fd, ParkedDirIv& parked);
  static void drop_parked_dir_iv(int parent_fd, ParkedDirIv& parked);

  // Data keys of regular files.
  Result<std::shared_ptr<const FileKey>, int> load_key(Inode& inode, int fd);
  // For a write or a size change: the key, creating the header first when
  // the backing file is empty. Takes the exclusive content lock itself and
  // returns holding it in `lock`.
  Result<std::shared_ptr<const FileKey>, int> key_for_write(Inode& inode, int fd,
                                                            std::unique_lock<std::shared_mutex>& lock);
  void drop_key_if_closed(Inode& inode);
  // The backing file's size (Inode::stored_size), from fstat when not known.
  // Under inode.content, shared or exclusive.
  Result<std::uint64_t, int> stored_size_of(Inode& inode, int fd) const;
  // "'name' (backing inode N)", for log lines.
  static std::string describe(Inode& inode);
  // Returns `err`; for EMFILE/ENFILE first logs (at most every 30 s) what
  // to do about it.
  int note_open_error(int err);
  // 0, or EMFILE when the mount's own descriptors (an O_PATH one per inode,
  // one per open file and directory handle) have reached the open-file
  // limit less a reserve (descriptor_reserve): the rest stays free for the
  // KMS. SoftHSM2 opens its object files on every call and marks an object
  // (or the whole token) unusable for the rest of the process when such an
  // open fails, so a client holding thousands of descriptors open through
  // the mount must meet EMFILE here, not in the HSM.
  int descriptor_room();
  // A cold open of `inode`: tells the key read-ahead.
  void note_cold_open(Inode& inode);
  // An O_RDONLY descriptor of the directory (dev, ino) while an inode of the
  // mount knows it, else an invalid one.
  UniqueFd open_known_dir(std::pair<dev_t, ino_t> dir);
  bool is_root(std::pair<dev_t, ino_t> dir) const { return dir.first == root_.dev && dir.second == root_.ino; }
  // Makes inode.pending unless the inode has a key or a pending key already
  // (no lock held across the KMS call). 0 or an errno value.
  int prepare_new_key(Inode& inode);
  // Closes a file handle's backing fd and drops its open reference.
  void release_handle(Inode& inode, fuse_file_info* fi);
  // Truncates or extends under the content lock. Extending needs the file's
  // key as key_for_write returned it: inode.key itself may be dropped
  // meanwhile by the RELEASE of another handle (drop_key_if_closed takes
  // only the state mutex). Truncating to 0 needs no key (nullptr).
  int truncate_locked(Inode& inode, int fd, std::uint64_t new_size, const FileKey* key,
                      std::unique_lock<std::shared_mutex>& lock);

  std::atomic<double> last_activity_{now_seconds()};
  std::atomic<int> open_handles_{0};
  // Serialises setxattr's check of the backing name list's size with the
  // set itself (Filesystem::setxattr).
  std::mutex xattr_mutex_;
  // Directory handles not released yet: a RELEASEDIR still queued when the
  // session ends never arrives, so the destructor frees what is left.
  std::mutex dir_handles_mu_;
  std::unordered_set<std::uint64_t> dir_handles_;
  FileKeys& keys_;
  const NameMapper& names_;
  FsSettings settings_;
  Inode root_;
  std::mutex table_mutex_;
  std::atomic<bool> writeback_cache_on_{false};  // the kernel granted it at INIT
  // Guarded by table_mutex_. Keyed by the backing (st_dev, st_ino), so hard
  // links share one Inode.
  std::map<std::pair<dev_t, ino_t>, std::unique_ptr<Inode>> inodes_;
  // The inode trimmer (FsSettings::max_inodes): started at INIT, stopped at
  // DESTROY or by the destructor.
  void trim_loop();
  fuse_session* session_ = nullptr;
  std::atomic<std::size_t> inode_total_{0};  // inodes_.size(), read without the lock
  std::mutex trim_mu_;
  std::condition_variable trim_cv_;
  void kick_trimmer();
  bool trim_stop_ = false;  // guarded by trim_mu_
  bool trim_kick_ = false;  // guarded by trim_mu_: lookups went past the bound
  std::pair<dev_t, ino_t> trim_cursor_{};  // trimmer thread only: where the next round starts
  std::thread trimmer_;
  // Last: its threads stop before anything they use goes away.
  std::unique_ptr<KeyReadahead> readahead_;
};

}  // namespace kmsfs::fs
