#include "keyclient/data_key_cache.h"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "crypto/random.h"
#include "crypto/sha256.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

// ---- DataKeyCache -------------------------------------------------------------

DataKeyCache::DataKeyCache(DataKeyCacheOptions options, Clock clock)
    : opts_(options), clock_(std::move(clock)) {}

DataKeyCache::~DataKeyCache() { clear(); }

std::size_t DataKeyCache::DigestHash::operator()(const Digest& d) const noexcept {
  std::size_t h = 0;
  std::memcpy(&h, d.data(), sizeof h);
  return h;
}

DataKeyCache::Digest DataKeyCache::digest(const Bytes& blob, const EncryptionContext& context) {
  // Length-prefixed blob, then the canonical (itself length-prefixed)
  // context: no two (blob, context) pairs share an input.
  Bytes in;
  const auto ctx = canonical_encryption_context(context);
  in.reserve(8 + blob.size() + ctx.size());
  const std::uint64_t n = blob.size();
  for (int i = 7; i >= 0; --i) in.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  in.insert(in.end(), blob.begin(), blob.end());
  in.insert(in.end(), ctx.begin(), ctx.end());
  return crypto::sha256(in);
}

void DataKeyCache::evict_locked(std::list<Entry>::iterator it) {
  index_.erase(it->id);
  lru_.erase(it);  // the SecureBuffer cleanses itself
  ++stats_.evictions;
}

std::optional<DataKeyCache::Hit> DataKeyCache::get(const Bytes& blob, const EncryptionContext& context) {
  const Digest id = digest(blob, context);
  const auto now = clock_();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(id);
  if (it == index_.end()) {
    ++stats_.misses;
    return std::nullopt;
  }
  auto e = it->second;
  if (now - e->created > opts_.max_age || e->uses >= opts_.max_uses) {
    evict_locked(e);
    ++stats_.misses;
    return std::nullopt;
  }
  ++e->uses;
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, e);
  return Hit{e->plaintext.clone(), e->key_id};
}

void DataKeyCache::put(const Bytes& blob, const EncryptionContext& context,
                       const crypto::SecureBuffer& plaintext, const std::string& key_id) {
  if (opts_.max_entries == 0 || opts_.max_uses == 0) return;
  const Digest id = digest(blob, context);
  Entry fresh{id, plaintext.clone(), key_id, clock_(), 0};
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = index_.find(id); it != index_.end()) evict_locked(it->second);
  while (lru_.size() >= opts_.max_entries) evict_locked(std::prev(lru_.end()));
  lru_.push_front(std::move(fresh));
  index_.emplace(id, lru_.begin());
}

void DataKeyCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.clear();
  lru_.clear();
}

std::size_t DataKeyCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lru_.size();
}

DataKeyCache::Stats DataKeyCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

// ---- CachingKeyService ---------------------------------------------------------

CachingKeyService::CachingKeyService(KeyService& inner, DataKeyCacheOptions options)
    : inner_(inner), cache_(options) {}

KmsResult<CreateKeyResponse> CachingKeyService::create_key(const CreateKeyRequest& req) {
  return inner_.create_key(req);
}
KmsResult<DescribeKeyResponse> CachingKeyService::describe_key(const DescribeKeyRequest& req) {
  return inner_.describe_key(req);
}
KmsResult<ListKeysResponse> CachingKeyService::list_keys(const ListKeysRequest& req) {
  return inner_.list_keys(req);
}
KmsResult<void> CachingKeyService::create_alias(const CreateAliasRequest& req) {
  return inner_.create_alias(req);
}
KmsResult<ListAliasesResponse> CachingKeyService::list_aliases(const ListAliasesRequest& req) {
  return inner_.list_aliases(req);
}
KmsResult<EncryptResponse> CachingKeyService::encrypt(const EncryptRequest& req) {
  return inner_.encrypt(req);
}
KmsResult<GenerateRandomResponse> CachingKeyService::generate_random(const GenerateRandomRequest& req) {
  return inner_.generate_random(req);
}
KmsResult<nlohmann::json> CachingKeyService::call(std::string_view operation, const nlohmann::json& request) {
  return inner_.call(operation, request);
}

KmsResult<GenerateDataKeyResponse> CachingKeyService::generate_data_key(const GenerateDataKeyRequest& req) {
  auto res = inner_.generate_data_key(req);
  if (res) cache_.put(res->ciphertext_blob, req.encryption_context, res->plaintext, res->key_id);
  return res;
}

KmsResult<DecryptResponse> CachingKeyService::decrypt(const DecryptRequest& req) {
  // A request naming a key or another algorithm goes to the KMS, which
  // checks them (IncorrectKeyException); the cache answers the plain form.
  const bool plain = !req.key_id && req.encryption_algorithm == "SYMMETRIC_DEFAULT";
  if (!plain) return inner_.decrypt(req);
  auto from_cache = [&]() -> std::optional<DecryptResponse> {
    auto hit = cache_.get(req.ciphertext_blob, req.encryption_context);
    if (!hit) return std::nullopt;
    DecryptResponse r;
    r.key_id = std::move(hit->key_id);
    r.plaintext = std::move(hit->plaintext);
    return r;
  };
  if (auto r = from_cache()) return std::move(*r);
  const auto id = DataKeyCache::digest(req.ciphertext_blob, req.encryption_context);
  std::shared_ptr<Flight> mine;
  std::shared_ptr<Flight> theirs;
  {
    std::lock_guard<std::mutex> lock(flights_mu_);
    auto [it, fresh] = flights_.try_emplace(id, nullptr);
    if (fresh) {
      it->second = std::make_shared<Flight>();
      mine = it->second;
    } else {
      theirs = it->second;
    }
  }
  if (theirs) {
    {
      std::unique_lock<std::mutex> lock(theirs->mu);
      theirs->cv.wait(lock, [&] { return theirs->done; });
    }
    if (auto r = from_cache()) return std::move(*r);
    return inner_.decrypt(req);  // it failed (or its entry is gone): ask for ourselves
  }
  // Lands the flight however the call ends (an exception included), so
  // that no waiter waits for ever.
  struct Landing {
    CachingKeyService& self;
    const DataKeyCache::Digest& id;
    Flight& flight;
    ~Landing() {
      {
        std::lock_guard<std::mutex> lock(self.flights_mu_);
        self.flights_.erase(id);
      }
      {
        std::lock_guard<std::mutex> lock(flight.mu);
        flight.done = true;
      }
      flight.cv.notify_all();
    }
  } landing{*this, id, *mine};
  // A flight that landed between our miss and our take-off left its key.
  if (auto r = from_cache()) return std::move(*r);
  auto res = inner_.decrypt(req);
  if (res) cache_.put(req.ciphertext_blob, req.encryption_context, res->plaintext, res->key_id);
  return res;
}

// ---- DataKeyPrefetcher ---------------------------------------------------------

DataKeyPrefetcher::DataKeyPrefetcher(KeyService& kms, std::string key_id, std::string key_spec,
                                     ContextFn context_for, DataKeyPrefetcherOptions options)
    : kms_(kms),
      key_id_(std::move(key_id)),
      key_spec_(std::move(key_spec)),
      context_for_(std::move(context_for)),
      opts_(options),
      target_(opts_.pool_size),
      last_take_(Clock::now()),  // the first fill happens at once
      backoff_(opts_.initial_backoff) {
  if (opts_.pool_size == 0) return;
  opts_.max_pool_size = std::max(opts_.max_pool_size, opts_.pool_size);
  const std::size_t n = std::clamp<std::size_t>(opts_.refillers, 1, opts_.max_pool_size);
  threads_.reserve(n);
  for (std::size_t i = 0; i < n; ++i) threads_.emplace_back([this] { run(); });
}

DataKeyPrefetcher::~DataKeyPrefetcher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

std::optional<PrefetchedDataKey> DataKeyPrefetcher::take() {
  std::optional<PrefetchedDataKey> out;
  std::list<Pooled> stale;  // destroyed (cleansed) outside the lock
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Clock::now();
    last_take_ = now;
    drop_stale_locked(now, stale);
    if (!pool_.empty()) {
      out = std::move(pool_.front().key);
      pool_.pop_front();
    } else if (opts_.pool_size > 0) {
      // Files are made faster than the pool refills: keep more ready.
      target_ = std::min(target_ * 2, opts_.max_pool_size);
    }
    // A burst starts at half the target (want_refill_locked): wake the
    // refillers then, not at every take (a futex wake and a context switch
    // each, per file created).
    wake = !refilling_ && pool_.size() + in_flight_ <= low_water_locked();
  }
  if (wake) cv_.notify_all();
  return out;
}

std::size_t DataKeyPrefetcher::target() const {
  std::lock_guard<std::mutex> lock(mu_);
  return target_;
}

std::size_t DataKeyPrefetcher::available() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pool_.size();
}

std::uint64_t DataKeyPrefetcher::generated() const {
  std::lock_guard<std::mutex> lock(mu_);
  return generated_;
}

void DataKeyPrefetcher::drop_stale_locked(Clock::time_point now, std::list<Pooled>& out) {
  // Oldest first (keys are appended as made): the stale ones lead.
  while (!pool_.empty() && now - pool_.front().made > opts_.max_age) out.splice(out.end(), pool_, pool_.begin());
}

bool DataKeyPrefetcher::want_refill_locked(Clock::time_point now, std::list<Pooled>& out) {
  drop_stale_locked(now, out);
  if (now - last_take_ > opts_.max_age) {
    target_ = opts_.pool_size;  // idle: back to the base size, and no refill
    return false;
  }
  const std::size_t have = pool_.size() + in_flight_;
  if (have >= target_) {
    refilling_ = false;
  } else if (have <= low_water_locked()) {
    refilling_ = true;
  }
  return refilling_ && have < target_ && now >= retry_at_;
}

void DataKeyPrefetcher::run() {
  auto log = named_logger("kmsfs.kms");
  const auto tick = std::chrono::duration_cast<Clock::duration>(opts_.max_age) / 2;
  while (true) {
    std::list<Pooled> stale;  // cleansed outside the lock
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (true) {
        if (stop_) return;
        const auto now = Clock::now();
        if (want_refill_locked(now, stale)) break;
        // Wake at least every max_age / 2 to drop stale keys, and when a
        // back-off ends.
        auto until = now + tick;
        if (retry_at_ > now) until = std::min(until, retry_at_);
        cv_.wait_until(lock, until);
      }
      ++in_flight_;
    }
    stale.clear();
    // The KMS call happens without the lock, concurrently with the other
    // refillers' (their audit flushes are shared).
    PrefetchedDataKey k;
    crypto::random_bytes(k.file_id);
    GenerateDataKeyRequest req;
    req.key_id = key_id_;
    req.key_spec = key_spec_;
    req.encryption_context = context_for_(k.file_id);
    auto res = kms_.generate_data_key(req);
    crypto::scrub_stack();  // the call's copies of the key below this frame
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
    if (!res) {
      if (!failing_) {
        log->warn("data-key prefetch paused: {}; file creation asks the KMS directly until it answers",
                  res.error().to_string());
      }
      failing_ = true;
      // The calls in flight with this one fail together: one back-off step
      // for all of them, not one each.
      const auto now = Clock::now();
      if (now >= retry_at_) {
        retry_at_ = now + backoff_;
        backoff_ = std::min(backoff_ * 2, opts_.max_backoff);
      }
      continue;
    }
    if (failing_) log->info("data-key prefetch resumed");
    failing_ = false;
    backoff_ = opts_.initial_backoff;
    retry_at_ = {};
    ++generated_;
    if (stop_) return;
    k.plaintext = std::move(res->plaintext);
    k.ciphertext_blob = std::move(res->ciphertext_blob);
    k.key_id = std::move(res->key_id);
    pool_.push_back(Pooled{std::move(k), Clock::now()});
  }
}

}  // namespace kmsfs::keyclient
