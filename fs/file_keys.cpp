#include "fs/file_keys.h"

#include <spdlog/spdlog.h>

#include <cerrno>

#include "crypto/random.h"

namespace kmsfs::fs {

namespace {
std::shared_ptr<spdlog::logger> logger() {
  static auto l = [] {
    auto existing = spdlog::get("kmsfs.fs");
    return existing ? existing : spdlog::default_logger()->clone("kmsfs.fs");
  }();
  return l;
}

int errno_for(const keyclient::KmsError& e) {
  return e.code == keyclient::KmsErrorCode::AccessDeniedException ? EACCES : EIO;
}

// The KMS itself is unreachable or failing (kmsd down, HSM gone), as
// opposed to refusing this one file's key.
bool is_unavailable(const keyclient::KmsError& e) {
  using keyclient::KmsErrorCode;
  return e.code == KmsErrorCode::KMSInternalException ||
         e.code == KmsErrorCode::DependencyTimeoutException ||
         e.code == KmsErrorCode::KeyUnavailableException;
}

constexpr auto kUnavailableLogInterval = std::chrono::seconds(30);
}  // namespace

FileKeys::FileKeys(keyclient::KeyService& kms, std::string filesystem_id_hex, std::string key_id,
                   FileKeyOptions options)
    : kms_(kms), fs_id_(std::move(filesystem_id_hex)), options_(options), key_id_(std::move(key_id)) {
  if (options.cache && options.cache_ttl > 0) {
    keyclient::DataKeyCacheOptions co;
    co.max_age = std::chrono::duration<double>(options.cache_ttl);
    co.max_entries = options.cache_entries;
    cache_ = std::make_unique<keyclient::CachingKeyService>(kms_, co);
    prefetch_ = make_prefetcher(key_id_);
  }
}

FileKeys::~FileKeys() = default;

std::shared_ptr<keyclient::DataKeyPrefetcher> FileKeys::make_prefetcher(const std::string& key_id) {
  if (!cache_ || options_.prefetch == 0) return nullptr;
  keyclient::DataKeyPrefetcherOptions po;
  po.pool_size = options_.prefetch;
  po.max_pool_size = options_.prefetch * 8;
  po.max_age = std::chrono::duration<double>(options_.cache_ttl);
  return std::make_shared<keyclient::DataKeyPrefetcher>(
      *cache_, key_id, "AES_256", [this](const crypto::FileId& id) { return context_for(id); }, po);
}

void FileKeys::set_key_source(KeySource source, std::chrono::milliseconds interval) {
  std::lock_guard<std::mutex> lock(key_mu_);
  key_source_ = std::move(source);
  key_check_interval_ = interval;
  next_key_check_ = std::chrono::steady_clock::now() + interval;
}

void FileKeys::maybe_refresh_key() {
  KeySource source;
  {
    std::lock_guard<std::mutex> lock(key_mu_);
    if (!key_source_) return;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_key_check_) return;
    next_key_check_ = now + key_check_interval_;
    source = key_source_;
  }
  auto now_named = source();  // file I/O: no lock held
  if (!now_named) return;
  std::shared_ptr<keyclient::DataKeyPrefetcher> old;  // stopped outside the lock
  std::string was;
  {
    std::lock_guard<std::mutex> lock(key_mu_);
    if (*now_named == key_id_) return;
    was = std::exchange(key_id_, *now_named);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    old = std::exchange(prefetch_, make_prefetcher(key_id_));
  }
  logger()->info("kmsfs.json names key {} now (was {}): new files use it", *now_named, was);
}

keyclient::EncryptionContext FileKeys::context_for(const crypto::FileId& id) const {
  return {{"kmsfs:fs", fs_id_}, {"kmsfs:file", crypto::file_id_hex(id)}};
}

void FileKeys::log_failure(const std::string& what, const keyclient::KmsError& e) {
  if (!is_unavailable(e)) {
    logger()->error("{}: {}", what, e.to_string());
    return;
  }
  std::uint64_t suppressed = 0;
  {
    std::lock_guard<std::mutex> lock(log_mu_);
    ++failures_since_ok_;
    const auto now = std::chrono::steady_clock::now();
    if (last_unavailable_log_ != std::chrono::steady_clock::time_point{} &&
        now - last_unavailable_log_ < kUnavailableLogInterval) {
      ++suppressed_;
      return;
    }
    last_unavailable_log_ = now;
    suppressed = std::exchange(suppressed_, 0);
  }
  logger()->error(
      "the KMS is unavailable: {}: {}; files already open keep working, new opens and creates fail "
      "with EIO until it is back{}",
      what, e.to_string(),
      suppressed > 0 ? " (" + std::to_string(suppressed) + " similar errors in the last 30 s not logged)"
                     : std::string());
}

void FileKeys::note_success() {
  std::uint64_t failures = 0;
  {
    std::lock_guard<std::mutex> lock(log_mu_);
    if (failures_since_ok_ == 0) return;
    failures = std::exchange(failures_since_ok_, 0);
    suppressed_ = 0;
    last_unavailable_log_ = {};
  }
  logger()->warn("the KMS answers again (after {} failed requests)", failures);
}

Result<FileKeys::NewFile, int> FileKeys::create(const std::string& label) {
  maybe_refresh_key();
  NewFile nf;
  std::shared_ptr<keyclient::DataKeyPrefetcher> prefetch;
  std::string key_id;
  {
    std::lock_guard<std::mutex> lock(key_mu_);
    prefetch = prefetch_;
    key_id = key_id_;
    nf.generation = key_generation();
  }
  // A pre-generated data key when one is ready: no KMS round trip.
  if (prefetch) {
    if (auto k = prefetch->take()) {
      if (k->plaintext.size() == 32 && !k->ciphertext_blob.empty() &&
          k->ciphertext_blob.size() <= crypto::FileHeader::kMaxWrappedKeySize) {
        nf.header.file_id = k->file_id;
        nf.header.wrapped_key = std::move(k->ciphertext_blob);
        nf.key.file_id = k->file_id;
        nf.key.dek = std::move(k->plaintext);
        return nf;
      }
    }
  }
  crypto::random_bytes(nf.header.file_id);
  keyclient::GenerateDataKeyRequest req;
  req.key_id = key_id;
  req.key_spec = "AES_256";
  req.encryption_context = context_for(nf.header.file_id);
  auto res = service().generate_data_key(req);
  if (!res) {
    log_failure("cannot create the data key of " + label, res.error());
    return unexpected(errno_for(res.error()));
  }
  note_success();
  if (res->plaintext.size() != 32 || res->ciphertext_blob.empty() ||
      res->ciphertext_blob.size() > crypto::FileHeader::kMaxWrappedKeySize) {
    logger()->error("cannot create the data key of {}: the KMS returned a malformed data key",
                    label);
    return unexpected(EIO);
  }
  nf.header.wrapped_key = std::move(res->ciphertext_blob);
  nf.key.file_id = nf.header.file_id;
  nf.key.dek = std::move(res->plaintext);
  return nf;
}

keyclient::DecryptRequest FileKeys::decrypt_request(const crypto::FileHeader& header) const {
  // No KeyId: the blob names its key, and a volume may hold files wrapped
  // under an older key while a rewrap to a new one is under way.
  keyclient::DecryptRequest req;
  req.ciphertext_blob = header.wrapped_key;
  req.encryption_context = context_for(header.file_id);
  return req;
}

KeyReadahead::Warmed FileKeys::warm(const crypto::FileHeader& header) {
  if (!cache_) return KeyReadahead::Warmed::kStop;
  auto res = cache_->decrypt(decrypt_request(header));  // the plaintext is cleansed with `res`
  if (res) return KeyReadahead::Warmed::kOk;
  // A damaged header concerns its file alone; anything else (a refusal, a
  // disabled key, an unavailable KMS) would likely repeat for every file.
  return res.error().code == keyclient::KmsErrorCode::InvalidCiphertextException
             ? KeyReadahead::Warmed::kSkip
             : KeyReadahead::Warmed::kStop;
}

Result<FileKey, int> FileKeys::open(const crypto::FileHeader& header, const std::string& label) {
  auto res = service().decrypt(decrypt_request(header));
  if (!res) {
    log_failure("cannot open " + label + ": the KMS refused its data key", res.error());
    return unexpected(errno_for(res.error()));
  }
  note_success();
  if (res->plaintext.size() != 32) {
    logger()->error("cannot open {}: its data key has {} bytes, expected 32", label,
                    res->plaintext.size());
    return unexpected(EIO);
  }
  FileKey key;
  key.file_id = header.file_id;
  key.dek = std::move(res->plaintext);
  return key;
}

}  // namespace kmsfs::fs
