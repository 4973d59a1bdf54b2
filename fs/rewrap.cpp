#include "fs/rewrap.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <nlohmann/json.hpp>

#include "crypto/encoding.h"
#include "crypto/file_header.h"
#include "fs/header_lock.h"
#include "fs/unique_fd.h"
#include "fs/volume.h"
#include "keyclient/ciphertext_blob.h"

namespace kmsfs::fs {

namespace {

using nlohmann::json;

std::string errno_str(int e) { return std::strerror(e); }

// The cipher directory's files that carry no header: the volume config,
// per-directory name IVs and long-name side files.
bool is_metadata_file(const std::string& name, bool at_root) {
  if (at_root && name == VolumeConfig::kFileName) return true;
  if (name == "kmsfs.diriv") return true;
  if (name.rfind("kmsfs.longname.", 0) == 0 && name.size() > 5 && name.compare(name.size() - 5, 5, ".name") == 0) {
    return true;
  }
  return name.find(".tmp") != std::string::npos && name.rfind(VolumeConfig::kFileName, 0) == 0;
}

void collect(const std::string& dir, bool at_root, std::vector<std::string>& out, std::vector<std::string>& errors) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    errors.push_back(dir + ": cannot read the directory: " + errno_str(errno));
    return;
  }
  std::vector<std::string> subdirs;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = dir + "/" + name;
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) continue;  // removed meanwhile (a live mount)
    if (S_ISDIR(st.st_mode)) {
      subdirs.push_back(path);
    } else if (S_ISREG(st.st_mode) && !is_metadata_file(name, at_root)) {
      out.push_back(path);
    }
  }
  ::closedir(d);
  for (const auto& s : subdirs) collect(s, false, out, errors);
}

struct Target {
  std::string arn;
  std::array<std::uint8_t, 16> uuid{};
  std::uint32_t version = 0;
};

// Which key and version the KMS encrypts under now: one wrap of one byte
// (GenerateDataKeyWithoutPlaintext) whose blob names both.
Result<Target, std::string> probe_target(keyclient::KeyService& kms, const std::string& key, const std::string& fs_id) {
  auto r = kms.call("GenerateDataKeyWithoutPlaintext",
                    {{"KeyId", key}, {"NumberOfBytes", 1}, {"EncryptionContext", {{"kmsfs:rewrap-probe", fs_id}}}});
  if (!r) return unexpected("the target key " + key + " is unusable: " + r.error().to_string());
  auto bytes = crypto::from_base64(r->at("CiphertextBlob").get<std::string>());
  if (!bytes) return unexpected(std::string("the KMS returned a malformed blob"));
  auto blob = keyclient::CiphertextBlob::decode(*bytes);
  if (!blob) return unexpected("the KMS returned a malformed blob: " + blob.error());
  return Target{r->at("KeyId").get<std::string>(), blob->key_uuid, blob->key_version};
}

bool under_target(const std::vector<std::uint8_t>& wrapped, const Target& t) {
  auto blob = keyclient::CiphertextBlob::decode(wrapped);
  return blob && blob->key_uuid == t.uuid && blob->key_version == t.version;
}

Result<std::vector<std::uint8_t>, std::string> re_encrypt(keyclient::KeyService& kms,
                                                          const std::vector<std::uint8_t>& blob,
                                                          const keyclient::EncryptionContext& ctx,
                                                          const std::string& target) {
  json c = json::object();
  for (const auto& [k, v] : ctx) c[k] = v;
  auto r = kms.call("ReEncrypt", {{"CiphertextBlob", crypto::to_base64(blob)},
                                  {"SourceEncryptionContext", c},
                                  {"DestinationKeyId", target},
                                  {"DestinationEncryptionContext", c}});
  if (!r) return unexpected(r.error().to_string());
  auto out = crypto::from_base64(r->at("CiphertextBlob").get<std::string>());
  if (!out) return unexpected(std::string("the KMS returned a malformed blob"));
  return std::move(*out);
}

enum class FileOutcome { Rewrapped, Current, Skipped };

Result<FileOutcome, std::string> rewrap_file(keyclient::KeyService& kms, const std::string& path,
                                             const std::string& fs_id, const Target& target) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) {
    if (errno == ENOENT) return FileOutcome::Skipped;  // removed through a live mount
    return unexpected("cannot open: " + errno_str(errno));
  }
  // A live mount may replace the file's header meanwhile (truncate to zero,
  // then a new DEK, under the current key): then the file is looked at
  // again, a few times, before it is reported.
  constexpr int kAttempts = 5;
  for (int attempt = 1;; ++attempt) {
    std::array<std::uint8_t, crypto::FileHeader::kSize> old_bytes{};
    ssize_t n = ::pread(fd.get(), old_bytes.data(), old_bytes.size(), 0);
    if (n < 0) return unexpected("cannot read the header: " + errno_str(errno));
    if (n == 0) return FileOutcome::Skipped;  // an empty file has no header yet
    if (static_cast<std::size_t>(n) != old_bytes.size()) return unexpected("the header is truncated");
    auto header = crypto::FileHeader::decode(old_bytes);
    if (!header) return unexpected("corrupt header: " + header.error());
    if (under_target(header->wrapped_key, target)) return FileOutcome::Current;
    const keyclient::EncryptionContext ctx{{"kmsfs:fs", fs_id}, {"kmsfs:file", crypto::file_id_hex(header->file_id)}};
    auto fresh = re_encrypt(kms, header->wrapped_key, ctx, target.arn);
    if (!fresh) return unexpected("ReEncrypt failed: " + fresh.error());
    if (fresh->empty() || fresh->size() > crypto::FileHeader::kMaxWrappedKeySize) {
      return unexpected("the re-encrypted data key does not fit the header");
    }
    crypto::FileHeader next = *header;
    next.wrapped_key = std::move(*fresh);
    const auto new_bytes = next.encode();
    // Never overwrite a header other than the one read: the mount writes a
    // new header only under the same lock (fs/header_lock.h).
    const HeaderLock header_lock(fd.get());
    std::array<std::uint8_t, crypto::FileHeader::kSize> again{};
    if (::pread(fd.get(), again.data(), again.size(), 0) != static_cast<ssize_t>(again.size()) || again != old_bytes) {
      if (attempt < kAttempts) continue;
      return unexpected("the header changed " + std::to_string(kAttempts) +
                        " times while it was being rewrapped (file in use); run rewrap again");
    }
    // One aligned 128-byte write inside the first sector and page: readers
    // see the old or the new header, and a crash leaves one of them.
    ssize_t w = ::pwrite(fd.get(), new_bytes.data(), new_bytes.size(), 0);
    if (w != static_cast<ssize_t>(new_bytes.size())) {
      return unexpected("cannot write the new header: " + (w < 0 ? errno_str(errno) : std::string("short write")));
    }
    break;
  }
  return FileOutcome::Rewrapped;
}

}  // namespace

Result<RewrapResult, std::string> rewrap_volume(keyclient::KeyService& kms, const std::string& cipherdir,
                                                const RewrapOptions& options) {
  auto config = VolumeConfig::load(cipherdir);
  if (!config) return unexpected(config.error());
  const std::string fs_id = config->filesystem_id_hex();
  const std::string target_ref = options.to_key.value_or(config->key_id);
  auto target = probe_target(kms, target_ref, fs_id);
  if (!target) return unexpected(target.error());

  RewrapResult result;
  result.target_key_arn = target->arn;
  result.target_version = target->version;
  // To another key: kmsfs.json names it first, so that files created from
  // now on (a live mount re-reads kmsfs.json, at most kConfigRecheck apart)
  // are made under it and the scan below finds every older file. An
  // interrupted run is resumed by `kmsfs rewrap CIPHERDIR`, which targets
  // the key kmsfs.json names.
  if (options.to_key && config->key_id != target->arn) {
    VolumeConfig next = *config;
    next.key_id = target->arn;
    auto s = next.save(cipherdir);
    if (!s) return unexpected(s.error());
    config->key_id = target->arn;
    result.config_updated = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2 * kConfigRecheckMilliseconds));
  }
  std::vector<std::string> files;
  collect(cipherdir, true, files, result.errors);
  result.counts.total = files.size();
  result.counts.failed = result.errors.size();
  for (const auto& path : files) {
    auto r = rewrap_file(kms, path, fs_id, *target);
    ++result.counts.done;
    if (!r) {
      ++result.counts.failed;
      result.errors.push_back(path + ": " + r.error());
    } else if (*r == FileOutcome::Rewrapped) {
      ++result.counts.rewrapped;
    } else if (*r == FileOutcome::Current) {
      ++result.counts.current;
    }
    if (options.progress) options.progress(result.counts);
  }

  // Everything on disk before kmsfs.json names the new key.
  {
    UniqueFd dirfd(::open(cipherdir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!dirfd.valid() || ::syncfs(dirfd.get()) != 0) {
      return unexpected(cipherdir + ": syncfs failed: " + errno_str(errno));
    }
  }
  if (result.counts.failed != 0) return result;  // the name key waits for a complete run

  // The name key's blob in kmsfs.json, last: the old key stays needed until
  // every file is done anyway.
  VolumeConfig next = *config;
  if (!next.wrapped_name_key.empty() && !under_target(next.wrapped_name_key, *target)) {
    const keyclient::EncryptionContext ctx{{"kmsfs:fs", fs_id}, {"kmsfs:purpose", "filenames"}};
    auto fresh = re_encrypt(kms, next.wrapped_name_key, ctx, target->arn);
    if (!fresh) return unexpected("cannot rewrap the volume's name key: " + fresh.error());
    next.wrapped_name_key = std::move(*fresh);
    auto s = next.save(cipherdir);
    if (!s) return unexpected(s.error());
  }
  return result;
}

}  // namespace kmsfs::fs
