#pragma once
// Per-file data keys through the KeyService: a new file's header costs one
// GenerateDataKey, opening an existing file one Decrypt. The encryption
// context is {"kmsfs:fs": filesystem id, "kmsfs:file": file id} — never a
// path, so renames rewrap nothing.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "crypto/file_header.h"
#include "crypto/result.h"
#include "fs/encrypted_file.h"
#include "fs/key_readahead.h"
#include "keyclient/data_key_cache.h"
#include "keyclient/key_service.h"

namespace kmsfs::fs {

// Mount options -o key_cache=on|off, key_cache_ttl=SECONDS.
struct FileKeyOptions {
  // Decrypt results (and generated data keys) cached by (wrapped DEK,
  // context) and new files served from a pool of pre-generated data keys
  // (keyclient/data_key_cache.h). Off: every open and create asks the KMS.
  bool cache = true;
  double cache_ttl = 300;          // seconds a cached or prefetched data key stays usable
  std::size_t cache_entries = 65536;
  std::size_t prefetch = 8;        // pre-generated data keys kept ready at first, up to 8x under load (0 = none)
};

// While the KMS is unreachable, files already open keep their DEK (it lives
// in the inode); opens and creates fail with EIO and one log line per 30 s
// says so; the first success afterwards logs the recovery.
class FileKeys {
 public:
  FileKeys(keyclient::KeyService& kms, std::string filesystem_id_hex, std::string key_id,
           FileKeyOptions options = FileKeyOptions{.cache = false});
  ~FileKeys();
  FileKeys(const FileKeys&) = delete;
  FileKeys& operator=(const FileKeys&) = delete;

  struct NewFile {
    crypto::FileHeader header;
    FileKey key;
    std::uint64_t generation = 0;  // key_generation() when it was made
  };
  // Errors are -errno values (EACCES for a refused key, EIO otherwise),
  // logged once naming `label` and the KMS's reason.
  Result<NewFile, int> create(const std::string& label);
  Result<FileKey, int> open(const crypto::FileHeader& header, const std::string& label);

  keyclient::EncryptionContext context_for(const crypto::FileId& id) const;

  // Key read-ahead (fs/key_readahead.h): unwraps `header`'s key into the
  // DEK cache, logging nothing (the file's own open reports failures).
  // kStop for a refusal or an unavailable KMS; without a cache, kStop.
  KeyReadahead::Warmed warm(const crypto::FileHeader& header);
  bool caches_keys() const { return cache_ != nullptr; }

  // The volume's key can change under a live mount (`kmsfs rewrap --to-key`
  // rewrites kmsfs.json): `source` returns the key kmsfs.json names now (or
  // nullopt: unchanged or unreadable), asked at most once per `interval`
  // from create(). When it differs, new files use it, the prefetched pool
  // is dropped and the generation moves on, so that a key made earlier
  // (NewFile::generation) is not used for a new file any more.
  using KeySource = std::function<std::optional<std::string>()>;
  void set_key_source(KeySource source, std::chrono::milliseconds interval);
  std::uint64_t key_generation() const { return generation_.load(std::memory_order_acquire); }
  bool is_current(const NewFile& nf) const { return nf.generation == key_generation(); }

 private:
  keyclient::KeyService& service() { return cache_ ? *cache_ : kms_; }
  keyclient::DecryptRequest decrypt_request(const crypto::FileHeader& header) const;
  // Logs a KMS failure: unavailability rate-limited, refusals per file.
  void log_failure(const std::string& what, const keyclient::KmsError& e);
  void note_success();

  void maybe_refresh_key();
  std::shared_ptr<keyclient::DataKeyPrefetcher> make_prefetcher(const std::string& key_id);

  keyclient::KeyService& kms_;
  std::string fs_id_;
  FileKeyOptions options_;
  std::unique_ptr<keyclient::CachingKeyService> cache_;      // null when key_cache=off

  mutable std::mutex key_mu_;  // guards the four below
  std::string key_id_;
  std::shared_ptr<keyclient::DataKeyPrefetcher> prefetch_;   // null when off; uses cache_
  KeySource key_source_;
  std::chrono::milliseconds key_check_interval_{1000};
  std::chrono::steady_clock::time_point next_key_check_{};
  std::atomic<std::uint64_t> generation_{1};

  std::mutex log_mu_;  // guards the three below
  std::chrono::steady_clock::time_point last_unavailable_log_{};
  std::uint64_t suppressed_ = 0;
  std::uint64_t failures_since_ok_ = 0;
};

}  // namespace kmsfs::fs
