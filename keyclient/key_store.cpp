#include "keyclient/key_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>

#include "crypto/json_int.h"
#include "keyclient/ciphertext_blob.h"
#include "keyclient/kms_json.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

using nlohmann::json;

namespace {

constexpr int kFormatVersion = 1;

struct DirCloser {
  void operator()(DIR* d) const noexcept { (void)::closedir(d); }
};
using DirPtr = std::unique_ptr<DIR, DirCloser>;

Unexpected<KmsError> internal(std::string msg) {
  named_logger("kmsfs.kms")->error("{}", msg);
  return kms_error(KmsErrorCode::KMSInternalException, std::move(msg));
}

// The clock file timestamps come from (CLOCK_REALTIME).
std::int64_t realtime_ns() {
  struct timespec ts {};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

const KeyVersion* KeyRecord::find_version(std::uint32_t v) const {
  for (const auto& kv : versions) {
    if (kv.version == v) return &kv;
  }
  return nullptr;
}

std::string key_record_to_json(const KeyRecord& rec) {
  json versions = json::array();
  for (const auto& v : rec.versions) {
    json jv{{"Version", v.version}, {"HsmLabel", v.hsm_label}, {"CreationDate", v.creation_date},
            {"WrapCount", v.wrap_count}, {"Material", v.material}};
    if (!v.rotation_type.empty()) jv["RotationType"] = v.rotation_type;
    versions.push_back(std::move(jv));
  }
  json grants = json::array();
  for (const auto& g : rec.grants) {
    json jg{{"GrantId", g.grant_id},     {"GrantToken", g.grant_token}, {"Name", g.name},
            {"GranteePrincipal", g.grantee_principal}, {"Operations", g.operations},
            {"CreationDate", g.creation_date}, {"IssuingUid", g.issuing_uid}};
    if (!g.retiring_principal.empty()) jg["RetiringPrincipal"] = g.retiring_principal;
    if (g.context_equals) jg["Constraints"]["EncryptionContextEquals"] = *g.context_equals;
    if (g.context_subset) jg["Constraints"]["EncryptionContextSubset"] = *g.context_subset;
    grants.push_back(std::move(jg));
  }
  json rotation{{"Enabled", rec.rotation.enabled}, {"PeriodInDays", rec.rotation.period_days}};
  if (rec.rotation.next_rotation_date) rotation["NextRotationDate"] = *rec.rotation.next_rotation_date;
  if (rec.rotation.on_demand_start) rotation["OnDemandRotationStartDate"] = *rec.rotation.on_demand_start;
  json j{{"FormatVersion", kFormatVersion},
         {"KeyMetadata", rec.metadata},
         {"Policy", rec.policy},
         {"Tags", rec.tags},
         {"Versions", versions},
         {"Rotation", rotation},
         {"Grants", grants},
         {"CreatorUid", rec.creator_uid}};
  if (!rec.import.wrapping_label.empty() || !rec.import.material_commitment.empty()) {
    j["Import"] = {{"WrappingLabel", rec.import.wrapping_label},
                   {"TokenId", rec.import.token_id},
                   {"TokenValidTo", rec.import.token_valid_to},
                   {"WrappingKeySpec", rec.import.wrapping_key_spec},
                   {"MaterialCommitment", rec.import.material_commitment}};
  }
  return j.dump(2) + "\n";
}

Result<KeyRecord, std::string> key_record_from_json(const std::string& text) {
  try {
    json j = json::parse(text);
    if (!j.is_object()) return unexpected(std::string("not a JSON object"));
    if (crypto::json_int_or(j, "FormatVersion", 0) != kFormatVersion) {
      return unexpected("unsupported FormatVersion " + j.value("FormatVersion", json()).dump());
    }
    KeyRecord rec;
    j.at("KeyMetadata").get_to(rec.metadata);
    rec.policy = j.value("Policy", std::string());
    if (j.contains("Tags")) j.at("Tags").get_to(rec.tags);
    for (const auto& v : j.at("Versions")) {
      KeyVersion kv;
      kv.version = crypto::json_int<std::uint32_t>(v.at("Version"));
      v.at("HsmLabel").get_to(kv.hsm_label);
      kv.creation_date = v.value("CreationDate", 0.0);
      kv.rotation_type = v.value("RotationType", std::string());
      kv.wrap_count = crypto::json_int_or(v, "WrapCount", std::uint64_t{0});
      kv.material = v.value("Material", true);
      if (kv.version == 0 || kv.hsm_label.empty()) return unexpected(std::string("invalid version entry"));
      rec.versions.push_back(std::move(kv));
    }
    if (rec.versions.empty()) return unexpected(std::string("no key versions"));
    std::sort(rec.versions.begin(), rec.versions.end(),
              [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });
    if (j.contains("Rotation")) {
      const json& r = j["Rotation"];
      rec.rotation.enabled = r.value("Enabled", false);
      rec.rotation.period_days = crypto::json_int_or(r, "PeriodInDays", 365);
      if (r.contains("NextRotationDate")) rec.rotation.next_rotation_date = r["NextRotationDate"].get<double>();
      if (r.contains("OnDemandRotationStartDate")) {
        rec.rotation.on_demand_start = r["OnDemandRotationStartDate"].get<double>();
      }
    }
    if (j.contains("Grants")) {
      for (const auto& jg : j["Grants"]) {
        Grant g;
        jg.at("GrantId").get_to(g.grant_id);
        g.grant_token = jg.value("GrantToken", std::string());
        g.name = jg.value("Name", std::string());
        jg.at("GranteePrincipal").get_to(g.grantee_principal);
        g.retiring_principal = jg.value("RetiringPrincipal", std::string());
        jg.at("Operations").get_to(g.operations);
        g.creation_date = jg.value("CreationDate", 0.0);
        g.issuing_uid = crypto::json_int_or(jg, "IssuingUid", 0u);
        if (jg.contains("Constraints")) {
          const json& c = jg["Constraints"];
          if (c.contains("EncryptionContextEquals")) g.context_equals = c["EncryptionContextEquals"].get<EncryptionContext>();
          if (c.contains("EncryptionContextSubset")) g.context_subset = c["EncryptionContextSubset"].get<EncryptionContext>();
        }
        rec.grants.push_back(std::move(g));
      }
    }
    rec.creator_uid = crypto::json_int_or(j, "CreatorUid", 0u);
    if (j.contains("Import")) {
      const json& im = j["Import"];
      rec.import.wrapping_label = im.value("WrappingLabel", std::string());
      rec.import.token_id = im.value("TokenId", std::string());
      rec.import.token_valid_to = im.value("TokenValidTo", 0.0);
      rec.import.wrapping_key_spec = im.value("WrappingKeySpec", std::string());
      rec.import.material_commitment = im.value("MaterialCommitment", std::string());
    }
    if (!uuid_from_string(rec.metadata.key_id)) {
      return unexpected("KeyId '" + rec.metadata.key_id + "' is not a key id");
    }
    return rec;
  } catch (const std::exception& e) {
    return unexpected(std::string(e.what()));
  }
}

KeyStore::KeyStore(std::string state_dir) : dir_(std::move(state_dir)) {}

std::string KeyStore::key_path(const std::string& key_id) const { return dir_ + "/keys/" + key_id + ".json"; }

KmsResult<void> KeyStore::ensure_dirs() const {
  for (const std::string& d : {dir_, dir_ + "/keys"}) {
    if (::mkdir(d.c_str(), 0700) != 0 && errno != EEXIST) {
      return internal("cannot create KMS state directory " + d + ": " + errno_text(errno));
    }
  }
  return {};
}

KmsResult<FileLock> KeyStore::lock() const {
  auto d = ensure_dirs();
  if (!d) return Unexpected<KmsError>(d.error());
  auto l = FileLock::acquire(dir_ + "/lock");
  if (!l) return internal(l.error());
  return std::move(*l);
}

KeyStore::FileStamp KeyStore::stamp_of(const struct stat& st, std::int64_t read_started_ns) {
  FileStamp f;
  f.dev = st.st_dev;
  f.ino = st.st_ino;
  f.size = st.st_size;
  f.mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  f.ctime_ns = static_cast<std::int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  f.trusted = f.mtime_ns + kRacyWindowNs < read_started_ns && f.ctime_ns + kRacyWindowNs < read_started_ns;
  return f;
}

std::uint64_t KeyStore::parses() const {
  std::lock_guard<std::mutex> lock(cache_mu_);
  return parses_;
}

KmsResult<std::optional<KeyRecord>> KeyStore::load_key(const std::string& key_id) {
  const std::string path = key_path(key_id);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      cache_.erase(key_id);
      return std::optional<KeyRecord>();
    }
    return internal("cannot stat key record " + path + ": " + errno_text(errno));
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(key_id);
    if (it != cache_.end() && it->second.stamp.trusted && it->second.stamp.same_file(stamp_of(st, 0))) {
      return std::optional<KeyRecord>(it->second.record);
    }
  }
  const std::int64_t started = realtime_ns();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT || errno == ENOTDIR) return std::optional<KeyRecord>();
    return internal("cannot open key record " + path + ": " + errno_text(errno));
  }
  // The stamp of the file actually read (it may have been replaced since
  // the stat above).
  if (::fstat(fd.get(), &st) != 0) return internal("cannot stat " + path + ": " + errno_text(errno));
  auto read = read_fd_text(fd.get(), "key record " + path);
  if (!read) return internal(read.error());
  const std::string& text = *read;
  auto rec = key_record_from_json(text);
  if (!rec) return internal("key record " + path + " is malformed: " + rec.error());
  if (rec->metadata.key_id != key_id) {
    return internal("key record " + path + " is malformed: it holds key " + rec->metadata.key_id);
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    ++parses_;
    cache_[key_id] = Cached{stamp_of(st, started), *rec};
  }
  return std::optional<KeyRecord>(std::move(*rec));
}

KmsResult<std::vector<std::string>> KeyStore::list_key_ids() const {
  std::vector<std::string> ids;
  const std::string kdir = dir_ + "/keys";
  DirPtr d(::opendir(kdir.c_str()));
  if (!d) {
    if (errno == ENOENT) return ids;
    return internal("cannot read " + kdir + ": " + errno_text(errno));
  }
  errno = 0;
  while (dirent* e = ::readdir(d.get())) {
    std::string name = e->d_name;
    if (name.size() != 36 + 5 || name.compare(36, 5, ".json") != 0) continue;  // skips temp files
    std::string id = name.substr(0, 36);
    if (uuid_from_string(id)) ids.push_back(std::move(id));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

KmsResult<std::vector<AliasRecord>> KeyStore::load_aliases() const {
  const std::string path = aliases_path();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      aliases_cache_.reset();
      return std::vector<AliasRecord>();
    }
    return internal("cannot stat alias file " + path + ": " + errno_text(errno));
  }
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (aliases_cache_ && aliases_cache_->stamp.trusted && aliases_cache_->stamp.same_file(stamp_of(st, 0))) {
      return aliases_cache_->aliases;
    }
  }
  const std::int64_t started = realtime_ns();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return std::vector<AliasRecord>();
    return internal("cannot open alias file " + path + ": " + errno_text(errno));
  }
  if (::fstat(fd.get(), &st) != 0) return internal("cannot stat " + path + ": " + errno_text(errno));
  auto read = read_fd_text(fd.get(), "alias file " + path);
  if (!read) return internal(read.error());
  const std::string& text = *read;
  std::vector<AliasRecord> out;
  try {
    json j = json::parse(text);
    if (crypto::json_int_or(j, "FormatVersion", 0) != kFormatVersion) {
      return internal("alias file " + path + " is malformed: unsupported FormatVersion");
    }
    for (const auto& a : j.at("Aliases")) {
      AliasRecord r;
      a.at("AliasName").get_to(r.alias_name);
      a.at("TargetKeyId").get_to(r.target_key_id);
      r.creation_date = a.value("CreationDate", 0.0);
      r.last_updated_date = a.value("LastUpdatedDate", r.creation_date);
      out.push_back(std::move(r));
    }
  } catch (const std::exception& e) {
    return internal("alias file " + path + " is malformed: " + e.what());
  }
  std::sort(out.begin(), out.end(),
            [](const AliasRecord& a, const AliasRecord& b) { return a.alias_name < b.alias_name; });
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    ++parses_;
    aliases_cache_ = CachedAliases{stamp_of(st, started), out};
  }
  return out;
}

KmsResult<void> KeyStore::write_key(const KeyRecord& rec) {
  auto d = ensure_dirs();
  if (!d) return d;
  auto w = atomic_write_file(key_path(rec.metadata.key_id), key_record_to_json(rec));
  if (!w) return internal("cannot store key record: " + w.error());
  return {};
}

KmsResult<void> KeyStore::delete_key(const std::string& key_id) {
  const std::string path = key_path(key_id);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return internal("cannot remove key record " + path + ": " + errno_text(errno));
  }
  auto f = fsync_dir(dir_ + "/keys");
  if (!f) return internal("cannot fsync " + dir_ + "/keys: " + f.error());
  std::lock_guard<std::mutex> lock(cache_mu_);
  cache_.erase(key_id);
  return {};
}

KmsResult<void> KeyStore::write_aliases(const std::vector<AliasRecord>& aliases) const {
  auto d = ensure_dirs();
  if (!d) return d;
  json arr = json::array();
  for (const auto& a : aliases) {
    arr.push_back({{"AliasName", a.alias_name},
                   {"TargetKeyId", a.target_key_id},
                   {"CreationDate", a.creation_date},
                   {"LastUpdatedDate", a.last_updated_date}});
  }
  json j{{"FormatVersion", kFormatVersion}, {"Aliases", arr}};
  auto w = atomic_write_file(aliases_path(), j.dump(2) + "\n");
  if (!w) return internal("cannot store aliases: " + w.error());
  return {};
}

}  // namespace kmsfs::keyclient
