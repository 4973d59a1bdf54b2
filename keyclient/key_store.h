#pragma once
// KeyStore: the KMS core's records on disk, under the state dir:
//
//   keys/<uuid>.json  one key: {"FormatVersion":1, "KeyMetadata":{...AWS names},
//                     "Policy":"<JSON document>", "Tags":[...],
//                     "Versions":[{"Version":1,"HsmLabel":"kmsfs/<uuid>/v1",
//                                  "CreationDate":<epoch s>}]}
//   aliases.json      {"FormatVersion":1, "Aliases":[{"AliasName","TargetKeyId","CreationDate"}]}
//   lock              flock(2): held by every read-modify-write
//
// Every file is replaced atomically (temp, fsync, rename, fsync dir), so a
// reader in another process sees the old or the new record, never a torn
// one. Reads check the files each time (a key created by kmsctl while a
// mount runs is visible at once), but cheaply: parsed key records and the
// alias list are cached in memory and revalidated with one stat(2) of the
// file — (dev, inode, size, mtime) changes with every replacement. A file
// modified less than kRacyWindow before it was read is not trusted from the
// cache ("racily clean", as git calls it): the kernel's file timestamps are
// coarse (one tick), so a later replacement in the same tick that reused
// the inode and had the same size would otherwise look unchanged; any
// replacement after the read gets a later mtime. Writers keep taking the
// store's flock (lock()) for read-modify-writes, so locking is unchanged.
//
// Thread safety: all methods may be called concurrently; cache_ and
// aliases_cache_ are guarded by cache_mu_, which is never held across file
// I/O.

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "keyclient/key_service.h"
#include "keyclient/kms_error.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

struct KeyVersion {
  std::uint32_t version = 1;
  std::string hsm_label;  // "kmsfs/<uuid>/v<version>"
  double creation_date = 0;
  std::string rotation_type;  // "" (original material) | "AUTOMATIC" | "ON_DEMAND"
  // Wraps reserved under this version (an upper bound of the wraps made:
  // processes reserve blocks of wraps, and a crash forfeits the rest of a
  // block). Rotation is forced before it reaches the core's limit.
  std::uint64_t wrap_count = 0;
  bool material = true;  // false: imported material not (or no longer) in the HSM
};

// A grant (CreateGrant), stored with its key.
struct Grant {
  std::string grant_id;  // 64 hex characters
  std::string grant_token;
  std::string name;
  std::string grantee_principal;  // local principal: uid:N, user:NAME, gid:N, group:NAME
  std::string retiring_principal;  // may be empty
  std::vector<std::string> operations;  // "Decrypt", "Encrypt", ...
  std::optional<EncryptionContext> context_equals;  // Constraints.EncryptionContextEquals
  std::optional<EncryptionContext> context_subset;  // Constraints.EncryptionContextSubset
  double creation_date = 0;
  std::uint32_t issuing_uid = 0;
};

struct RotationState {
  bool enabled = false;
  int period_days = 365;
  std::optional<double> next_rotation_date;
  std::optional<double> on_demand_start;  // the last on-demand rotation
};

// Imported key material (Origin EXTERNAL).
struct ImportState {
  std::string wrapping_label;  // the RSA pair of the newest GetParametersForImport
  std::string token_id;        // hex; the import token carries it
  double token_valid_to = 0;
  std::string wrapping_key_spec;
  // SHA-256 of a key check value computed by the HSM under the material
  // (AES-GCM of zeros with a fixed IV): only the same material may be
  // imported again.
  std::string material_commitment;
};

struct KeyRecord {
  KeyMetadata metadata;
  std::string policy;  // JSON key policy document, evaluated on every call
  std::vector<Tag> tags;
  std::vector<KeyVersion> versions;  // ascending, never empty
  RotationState rotation;
  std::vector<Grant> grants;
  ImportState import;
  std::uint32_t creator_uid = 0;

  const KeyVersion& newest() const { return versions.back(); }
  const KeyVersion* find_version(std::uint32_t v) const;
};

struct AliasRecord {
  std::string alias_name;  // "alias/..."
  std::string target_key_id;
  double creation_date = 0;
  double last_updated_date = 0;  // UpdateAlias moves it; older stores load it as CreationDate
};

class KeyStore {
 public:
  // Longer than one kernel timestamp tick (1-10 ms).
  static constexpr std::int64_t kRacyWindowNs = 20'000'000;

  explicit KeyStore(std::string state_dir);

  const std::string& dir() const { return dir_; }
  std::string key_path(const std::string& key_id) const;
  std::string aliases_path() const { return dir_ + "/aliases.json"; }

  // The cross-process writer lock (STATE/lock). Never taken twice by one
  // thread.
  KmsResult<FileLock> lock() const;

  // std::nullopt when no record exists. A malformed file is a
  // KMSInternalException naming it.
  KmsResult<std::optional<KeyRecord>> load_key(const std::string& key_id);
  KmsResult<std::vector<std::string>> list_key_ids() const;  // sorted
  KmsResult<std::vector<AliasRecord>> load_aliases() const;   // sorted by name

  // For tests: how many times a file was read and parsed (cache misses).
  std::uint64_t parses() const;

  // Writers: the caller holds lock() when the write depends on what it read.
  KmsResult<void> write_key(const KeyRecord& rec);
  KmsResult<void> write_aliases(const std::vector<AliasRecord>& aliases) const;
  // Removes a key record (unlink, fsync of the directory). Missing is fine.
  KmsResult<void> delete_key(const std::string& key_id);

 private:
  KmsResult<void> ensure_dirs() const;

  // What identifies one version of a file, and whether it may be trusted
  // from the cache (see the top of this file).
  struct FileStamp {
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    std::int64_t mtime_ns = 0;
    std::int64_t ctime_ns = 0;
    bool trusted = false;
    bool same_file(const FileStamp& o) const {
      return dev == o.dev && ino == o.ino && size == o.size && mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
    }
  };
  static FileStamp stamp_of(const struct stat& st, std::int64_t read_started_ns);

  struct Cached {
    FileStamp stamp;
    KeyRecord record;
  };
  struct CachedAliases {
    FileStamp stamp;
    std::vector<AliasRecord> aliases;
  };

  std::string dir_;
  mutable std::mutex cache_mu_;
  std::map<std::string, Cached> cache_;  // guarded by cache_mu_; key id -> record
  mutable std::optional<CachedAliases> aliases_cache_;  // guarded by cache_mu_
  mutable std::uint64_t parses_ = 0;  // guarded by cache_mu_
};

std::string key_record_to_json(const KeyRecord& rec);
// Throws nothing; the error names what is wrong.
Result<KeyRecord, std::string> key_record_from_json(const std::string& text);

}  // namespace kmsfs::keyclient
