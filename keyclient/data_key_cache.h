#pragma once
// Keeping KMS latency off the filesystem's hot path, modelled on the AWS
// Encryption SDK's caching cryptographic materials manager:
//
// - DataKeyCache: plaintext data keys by (ciphertext blob, encryption
//   context), each entry bounded by a maximum age, a maximum number of uses
//   and the cache by a maximum number of entries (least recently used goes
//   first). Entries live in SecureBuffers (mlocked, cleansed on eviction).
// - CachingKeyService: a KeyService decorator answering Decrypt from the
//   cache. A data key it generates is cached too, so reopening a file just
//   created costs no KMS call. Every other operation passes through.
//   The trade-off, as in the AWS SDK: a key disabled or a policy changed in
//   the KMS takes effect for cached data keys only when they expire.
// - DataKeyPrefetcher: a small pool of pre-generated (file id, DEK, wrapped
//   DEK) triples for one filesystem, refilled by background threads, so a
//   file create does not wait for the KMS (the HSM call and the audit
//   record's disk flush). Refills come in bursts (from half the target
//   back to full) with several calls at once, so that their audit flushes
//   are shared (group commit). The encryption context binds the
//   file id, so the prefetcher makes the file id too. An idle pool is not
//   topped up: keys that age out while nobody creates files are dropped and
//   made again only when files are created again, so an idle mount adds no
//   GenerateDataKey records to the audit trail.
//
// Thread safety: all public methods may be called concurrently.

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "crypto/secure_buffer.h"
#include "keyclient/key_service.h"

namespace kmsfs::keyclient {

struct DataKeyCacheOptions {
  std::chrono::duration<double> max_age{300.0};
  std::size_t max_entries = 4096;
  std::uint64_t max_uses = 1u << 20;  // per entry, then it is fetched again
};

class DataKeyCache {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;
  explicit DataKeyCache(DataKeyCacheOptions options, Clock clock = std::chrono::steady_clock::now);
  ~DataKeyCache();  // every entry cleansed
  DataKeyCache(const DataKeyCache&) = delete;
  DataKeyCache& operator=(const DataKeyCache&) = delete;

  struct Hit {
    crypto::SecureBuffer plaintext;  // a copy: the caller owns it
    std::string key_id;
  };
  // Counts one use; expired or used-up entries are evicted and miss.
  std::optional<Hit> get(const Bytes& blob, const EncryptionContext& context);
  // The entry id of (blob, context): SHA-256 over both, length-prefixed.
  using Digest = std::array<std::uint8_t, 32>;
  static Digest digest(const Bytes& blob, const EncryptionContext& context);
  void put(const Bytes& blob, const EncryptionContext& context, const crypto::SecureBuffer& plaintext,
           const std::string& key_id);
  void clear();
  std::size_t size() const;

  struct Stats {
    std::uint64_t hits = 0;
    std::uint64_t misses = 0;
    std::uint64_t evictions = 0;
  };
  Stats stats() const;

 private:

 public:
  struct DigestHash {
    std::size_t operator()(const Digest& d) const noexcept;
  };

 private:
  struct Entry {
    Digest id;
    crypto::SecureBuffer plaintext;
    std::string key_id;
    std::chrono::steady_clock::time_point created;
    std::uint64_t uses = 0;
  };
  void evict_locked(std::list<Entry>::iterator it);

  DataKeyCacheOptions opts_;
  Clock clock_;
  mutable std::mutex mu_;  // guards lru_, index_, stats_
  std::list<Entry> lru_;   // most recently used first
  std::unordered_map<Digest, std::list<Entry>::iterator, DigestHash> index_;
  Stats stats_;
};

// KeyService decorator: Decrypt answered from a DataKeyCache. Concurrent
// Decrypts of the same (blob, context) that miss make one KMS call: the
// others wait for it and take its result from the cache ("single flight"),
// so a key read ahead (fs/key_readahead.h) and the open that needs it at
// the same moment cost one Decrypt and one audit record.
class CachingKeyService final : public KeyService {
 public:
  CachingKeyService(KeyService& inner, DataKeyCacheOptions options);

  KmsResult<CreateKeyResponse> create_key(const CreateKeyRequest& req) override;
  KmsResult<DescribeKeyResponse> describe_key(const DescribeKeyRequest& req) override;
  KmsResult<ListKeysResponse> list_keys(const ListKeysRequest& req) override;
  KmsResult<void> create_alias(const CreateAliasRequest& req) override;
  KmsResult<ListAliasesResponse> list_aliases(const ListAliasesRequest& req) override;
  KmsResult<GenerateDataKeyResponse> generate_data_key(const GenerateDataKeyRequest& req) override;
  KmsResult<DecryptResponse> decrypt(const DecryptRequest& req) override;
  KmsResult<EncryptResponse> encrypt(const EncryptRequest& req) override;
  KmsResult<GenerateRandomResponse> generate_random(const GenerateRandomRequest& req) override;
  KmsResult<nlohmann::json> call(std::string_view operation, const nlohmann::json& request) override;

  DataKeyCache& cache() { return cache_; }

 private:
  struct Flight {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;  // guarded by mu
  };
  KeyService& inner_;
  DataKeyCache cache_;
  std::mutex flights_mu_;  // guards flights_
  std::unordered_map<DataKeyCache::Digest, std::shared_ptr<Flight>, DataKeyCache::DigestHash> flights_;
};

struct PrefetchedDataKey {
  std::array<std::uint8_t, 16> file_id{};
  crypto::SecureBuffer plaintext;
  Bytes ciphertext_blob;
  std::string key_id;  // ARN of the wrapping key
};

struct DataKeyPrefetcherOptions {
  // Keys kept ready. A take() that finds the pool empty doubles the target
  // (files are being created faster than the pool refills), up to
  // max_pool_size; an idle pool falls back to pool_size.
  std::size_t pool_size = 8;
  std::size_t max_pool_size = 64;
  // GenerateDataKey calls in flight at once while refilling (threads).
  std::size_t refillers = 8;
  // A pre-generated key older than this is discarded (a key rotated in the
  // meantime then wraps new files under its newest version soon enough).
  std::chrono::duration<double> max_age{300.0};
  std::chrono::milliseconds initial_backoff{500};
  std::chrono::milliseconds max_backoff{30'000};
};

class DataKeyPrefetcher {
 public:
  // `context_for(file_id)` is the encryption context of a file; `key_id`
  // the key that wraps; `key_spec` e.g. "AES_256".
  using ContextFn = std::function<EncryptionContext(const std::array<std::uint8_t, 16>&)>;
  DataKeyPrefetcher(KeyService& kms, std::string key_id, std::string key_spec, ContextFn context_for,
                    DataKeyPrefetcherOptions options = {});
  ~DataKeyPrefetcher();  // stops the thread; every pooled key cleansed
  DataKeyPrefetcher(const DataKeyPrefetcher&) = delete;
  DataKeyPrefetcher& operator=(const DataKeyPrefetcher&) = delete;

  // A fresh triple if the pool has one (never blocks); wakes the refiller.
  std::optional<PrefetchedDataKey> take();
  std::size_t available() const;
  std::size_t target() const;       // keys the refillers keep ready now
  std::uint64_t generated() const;  // GenerateDataKey calls that succeeded

 private:
  using Clock = std::chrono::steady_clock;
  struct Pooled {
    PrefetchedDataKey key;
    Clock::time_point made;
  };
  void run();
  // Moves aged-out keys to `out` (to be cleansed outside the lock).
  void drop_stale_locked(Clock::time_point now, std::list<Pooled>& out);
  // drop_stale_locked(), then true when a refiller should make a key.
  bool want_refill_locked(Clock::time_point now, std::list<Pooled>& out);

  KeyService& kms_;
  std::string key_id_;
  std::string key_spec_;
  ContextFn context_for_;
  DataKeyPrefetcherOptions opts_;

  mutable std::mutex mu_;  // guards everything below but threads_
  std::condition_variable cv_;
  std::list<Pooled> pool_;
  std::size_t in_flight_ = 0;
  std::size_t target_;
  // Refills come in bursts: they start when the pool (with the calls in
  // flight) falls to half the target and go on until it is full, so that
  // several GenerateDataKey calls run at once and share their audit flush
  // (a refill per take would flush once per key).
  bool refilling_ = false;
  std::size_t low_water_locked() const { return target_ / 2; }
  Clock::time_point last_take_;   // demand: refill only within max_age of a take
  Clock::time_point retry_at_{};  // while the KMS fails: next attempt
  std::chrono::milliseconds backoff_;
  bool failing_ = false;
  std::uint64_t generated_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;  // last: started after everything above exists
};

}  // namespace kmsfs::keyclient
