#pragma once
// A kmsfs volume: a cipher directory with its kmsfs.json, opened through a
// KeyService and served over FUSE.

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "crypto/result.h"
#include "keyclient/key_service.h"

namespace kmsfs::fs {

class NameMapper;

// CIPHERDIR/kmsfs.json (docs/format.md).
struct VolumeConfig {
  static constexpr const char* kFileName = "kmsfs.json";
  static constexpr int kFormatVersion = 1;

  int format_version = kFormatVersion;
  std::array<std::uint8_t, 16> filesystem_id{};
  std::string key_id;  // ARN of the KMS key that wraps every DEK
  std::uint32_t block_size = 4096;
  std::vector<std::string> features;  // feature flags; unknown ones refuse the mount
  double creation_date = 0;
  // Feature "encrypted_names": the 64-byte name key wrapped by the KMS
  // (GenerateDataKey, context {"kmsfs:fs": id, "kmsfs:purpose": "filenames"})
  // and the longest encrypted name stored as a plain directory entry.
  std::vector<std::uint8_t> wrapped_name_key;
  std::uint32_t long_name_max = 255;

  static constexpr const char* kFeatureEncryptedNames = "encrypted_names";
  bool has_feature(const std::string& f) const;

  std::string filesystem_id_hex() const;
  // Reads and validates; errors name the file and the reason.
  static Result<VolumeConfig, std::string> load(const std::string& cipherdir);
  // Atomic replace (temp file, fsync, rename, fsync dir).
  Result<void, std::string> save(const std::string& cipherdir) const;
};

// How often a live mount re-reads kmsfs.json for its key (at most; only
// when files are created). `kmsfs rewrap --to-key` waits twice this after
// switching kmsfs.json, so that no mount creates files under the old key
// once it starts.
inline constexpr int kConfigRecheckMilliseconds = 1000;

struct InitOptions {
  bool plaintext_names = false;
  std::uint32_t long_name_max = 255;  // 63..255
};

struct MountOptions {
  bool read_only = false;
  bool allow_other = false;
  bool debug = false;               // FUSE request tracing
  std::string fsname;               // default "kmsfs:CIPHERDIR"
  double entry_timeout = 1.0;       // seconds
  double attr_timeout = 1.0;        // seconds
  bool writeback_cache = true;
  bool kernel_cache = false;
  // FUSE worker threads; 0 = default_max_threads(). Writes to one file take
  // its lock in turn, so threads beyond what the CPUs run at once only add
  // wake-ups; the ones above the CPUs serve requests that wait (fsync, KMS).
  unsigned max_threads = 0;
  bool key_cache = true;            // key_cache=on|off: DEK cache and data-key prefetch
  double key_cache_ttl = 300;       // key_cache_ttl=SECONDS
  std::size_t key_cache_entries = 65536;  // key_cache_entries=N: data keys cached at most
  // key_readahead=N: when a program walks a directory, unwrap the keys of up
  // to N of its files at a time ahead of their opens (fs/key_readahead.h);
  // 0 = off. Needs the key cache.
  std::size_t key_readahead = 256;
  // max_inodes=N: inodes (one descriptor each) kept before the mount asks
  // the kernel to forget unused entries; unset = a third of the open-file limit
  // at mount time, 0 = no bound.
  std::optional<std::size_t> max_inodes;
  double idle_timeout = 0;          // idle_timeout=SECONDS: unmount when unused (0 = never)
  // read_ahead_kb=N: the kernel's read-ahead window for this mount (the
  // FUSE device's read_ahead_kb, which the kernel sets to 128 KiB); 0 =
  // leave the kernel's. Sequential reads overlap decryption with the
  // reader's copies only when several requests are in flight: 1 GiB cold
  // reads measured 1,100-1,380 MB/s at 128 KiB and 1,615-1,680 at 4 MiB.
  // Needs root (a write to /sys/class/bdi): otherwise the kernel's stays.
  // The price: the kernel reads a whole window around each page fault of
  // a mapped file (until it has missed 100 times), which slows sparse
  // random mmap access to large files (docs/operations.md).
  std::size_t read_ahead_kb = 4096;
  // shared_storage: several mounts share the backing dir (NFS): no kernel
  // attribute, entry or page caching and no writeback cache.
  bool shared_storage = false;
};

// Two per CPU, at least 4, at most 10 (libfuse's own default).
unsigned default_max_threads();

// Parses a comma-separated "-o" string into `base`. Unknown options are an
// error naming the option.
Result<MountOptions, std::string> parse_mount_options(const std::string& opts, MountOptions base);

// Creates CIPHERDIR/kmsfs.json for a new volume whose DEKs `key_id` wraps.
// CIPHERDIR must exist and be empty (or not exist: it is created 0700).
Result<VolumeConfig, std::string> init_volume(keyclient::KeyService& kms, const std::string& cipherdir,
                                              const std::string& key_id, const InitOptions& options = {});

class Volume {
 public:
  // Loads kmsfs.json and checks that its key exists and is Enabled, so that
  // a mount with a missing or disabled key fails at once.
  static Result<std::unique_ptr<Volume>, std::string> open(keyclient::KeyService& kms,
                                                           const std::string& cipherdir);
  ~Volume();

  const VolumeConfig& config() const;
  const NameMapper& names() const;

  // Mounts at `mountpoint` and serves until unmounted or SIGINT/SIGTERM/
  // SIGHUP. `on_ready` runs once the kernel mount exists, before the first
  // request is served. Returns an error if the mount could not be made.
  Result<void, std::string> serve(const std::string& mountpoint, const MountOptions& opts,
                                  const std::function<void()>& on_ready);

 private:
  struct Impl;
  explicit Volume(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsfs::fs
