#include "keyclient/data_key_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "crypto/random.h"

namespace kmsfs::keyclient {
namespace {

// A KeyService that counts calls and "wraps" by prefixing the plaintext.
class FakeKms final : public KeyService {
 public:
  std::atomic<int> generates{0};
  std::atomic<int> decrypts{0};
  std::atomic<bool> down{false};
  std::atomic<int> generate_delay_ms{0};  // set while refillers run: atomic
  std::atomic<int> decrypt_delay_ms{0};
  std::atomic<bool> refuse_decrypt{false};
  std::atomic<int> in_flight{0};
  std::atomic<int> max_in_flight{0};

  KmsResult<CreateKeyResponse> create_key(const CreateKeyRequest&) override { return unsupported(); }
  KmsResult<DescribeKeyResponse> describe_key(const DescribeKeyRequest&) override { return unsupported(); }
  KmsResult<ListKeysResponse> list_keys(const ListKeysRequest&) override { return unsupported(); }
  KmsResult<void> create_alias(const CreateAliasRequest&) override { return unsupported(); }
  KmsResult<ListAliasesResponse> list_aliases(const ListAliasesRequest&) override { return unsupported(); }
  KmsResult<EncryptResponse> encrypt(const EncryptRequest&) override { return unsupported(); }
  KmsResult<GenerateRandomResponse> generate_random(const GenerateRandomRequest&) override {
    return unsupported();
  }
  KmsResult<nlohmann::json> call(std::string_view, const nlohmann::json&) override { return unsupported(); }

  KmsResult<GenerateDataKeyResponse> generate_data_key(const GenerateDataKeyRequest& req) override {
    if (down) return kms_error(KmsErrorCode::KMSInternalException, "down");
    const int now = ++in_flight;
    for (int seen = max_in_flight.load(); now > seen && !max_in_flight.compare_exchange_weak(seen, now);) {
    }
    if (const int d = generate_delay_ms.load(); d > 0) std::this_thread::sleep_for(std::chrono::milliseconds(d));
    --in_flight;
    ++generates;
    GenerateDataKeyResponse r;
    r.key_id = "arn:test";
    r.plaintext = crypto::SecureBuffer(32);
    crypto::random_bytes(r.plaintext.span());
    r.ciphertext_blob.assign(r.plaintext.data(), r.plaintext.data() + 32);
    for (const auto& [k, v] : req.encryption_context) r.ciphertext_blob.insert(r.ciphertext_blob.end(), v.begin(), v.end());
    return r;
  }
  KmsResult<DecryptResponse> decrypt(const DecryptRequest& req) override {
    if (down) return kms_error(KmsErrorCode::KMSInternalException, "down");
    if (const int d = decrypt_delay_ms.load(); d > 0) std::this_thread::sleep_for(std::chrono::milliseconds(d));
    ++decrypts;
    if (refuse_decrypt) return kms_error(KmsErrorCode::AccessDeniedException, "refused");
    DecryptResponse r;
    r.key_id = "arn:test";
    r.plaintext = crypto::SecureBuffer(req.ciphertext_blob.data(), 32);
    return r;
  }

 private:
  static Unexpected<KmsError> unsupported() {
    return kms_error(KmsErrorCode::UnsupportedOperationException, "fake");
  }
};

DecryptRequest decrypt_of(const GenerateDataKeyResponse& g, const EncryptionContext& ctx) {
  DecryptRequest d;
  d.ciphertext_blob = g.ciphertext_blob;
  d.encryption_context = ctx;
  return d;
}

TEST(CachingKeyService, GeneratedKeyDecryptsWithoutAKmsCall) {
  FakeKms kms;
  CachingKeyService svc(kms, {});
  GenerateDataKeyRequest g;
  g.encryption_context = {{"f", "1"}};
  auto dk = svc.generate_data_key(g);
  ASSERT_TRUE(dk);
  auto p = svc.decrypt(decrypt_of(*dk, g.encryption_context));
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->plaintext == dk->plaintext);
  EXPECT_EQ(kms.decrypts, 0);
}

TEST(CachingKeyService, ContextIsPartOfTheCacheKey) {
  FakeKms kms;
  CachingKeyService svc(kms, {});
  GenerateDataKeyRequest g;
  g.encryption_context = {{"f", "1"}};
  auto dk = svc.generate_data_key(g);
  ASSERT_TRUE(dk);
  ASSERT_TRUE(svc.decrypt(decrypt_of(*dk, {{"f", "2"}})));
  EXPECT_EQ(kms.decrypts, 1);  // another context is a miss: the KMS judges it
}

TEST(CachingKeyService, DecryptWithKeyIdGoesToTheKms) {
  FakeKms kms;
  CachingKeyService svc(kms, {});
  auto dk = svc.generate_data_key({});
  DecryptRequest d = decrypt_of(*dk, {});
  d.key_id = "alias/other";
  ASSERT_TRUE(svc.decrypt(d));
  EXPECT_EQ(kms.decrypts, 1);
}

TEST(CachingKeyService, ConcurrentMissesOfOneKeyMakeOneKmsCall) {
  FakeKms kms;
  GenerateDataKeyRequest g;
  g.encryption_context = {{"f", "1"}};
  auto dk = kms.generate_data_key(g);  // not through the cache: a cold key
  ASSERT_TRUE(dk);
  CachingKeyService svc(kms, {});
  kms.decrypt_delay_ms = 100;  // the others arrive while the first is in the KMS
  std::vector<std::thread> threads;
  std::atomic<int> right{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      auto p = svc.decrypt(decrypt_of(*dk, g.encryption_context));
      if (p && p->plaintext == dk->plaintext) ++right;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(right, 8);
  EXPECT_EQ(kms.decrypts, 1);
  // Another key is another flight.
  auto other = kms.generate_data_key(g);
  ASSERT_TRUE(svc.decrypt(decrypt_of(*other, g.encryption_context)));
  EXPECT_EQ(kms.decrypts, 2);
}

TEST(CachingKeyService, WaitersOfAFailedFlightAskForThemselves) {
  FakeKms kms;
  GenerateDataKeyRequest g;
  auto dk = kms.generate_data_key(g);
  ASSERT_TRUE(dk);
  CachingKeyService svc(kms, {});
  kms.decrypt_delay_ms = 100;
  kms.refuse_decrypt = true;
  std::vector<std::thread> threads;
  std::atomic<int> refused{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto p = svc.decrypt(decrypt_of(*dk, {}));
      if (!p && p.error().code == KmsErrorCode::AccessDeniedException) ++refused;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(refused, 4);  // every caller gets the KMS's answer, none a stale one
  EXPECT_GE(kms.decrypts, 2);
  kms.refuse_decrypt = false;
  kms.decrypt_delay_ms = 0;
  ASSERT_TRUE(svc.decrypt(decrypt_of(*dk, {})));  // nothing was left waiting or cached
  EXPECT_EQ(svc.cache().size(), 1u);
}

TEST(DataKeyCache, EntriesExpireByAge) {
  auto now = std::chrono::steady_clock::now();
  DataKeyCacheOptions o;
  o.max_age = std::chrono::seconds(10);
  DataKeyCache cache(o, [&] { return now; });
  Bytes blob{1, 2, 3};
  cache.put(blob, {}, crypto::SecureBuffer::from_string("k"), "arn");
  EXPECT_TRUE(cache.get(blob, {}));
  now += std::chrono::seconds(11);
  EXPECT_FALSE(cache.get(blob, {}));
  EXPECT_EQ(cache.size(), 0u);
}

TEST(DataKeyCache, EntriesExpireByUses) {
  DataKeyCacheOptions o;
  o.max_uses = 2;
  DataKeyCache cache(o);
  Bytes blob{1};
  cache.put(blob, {}, crypto::SecureBuffer::from_string("k"), "arn");
  EXPECT_TRUE(cache.get(blob, {}));
  EXPECT_TRUE(cache.get(blob, {}));
  EXPECT_FALSE(cache.get(blob, {}));
}

TEST(DataKeyCache, EvictsLeastRecentlyUsed) {
  DataKeyCacheOptions o;
  o.max_entries = 2;
  DataKeyCache cache(o);
  cache.put({1}, {}, crypto::SecureBuffer::from_string("a"), "arn");
  cache.put({2}, {}, crypto::SecureBuffer::from_string("b"), "arn");
  EXPECT_TRUE(cache.get({1}, {}));  // 2 is now the oldest
  cache.put({3}, {}, crypto::SecureBuffer::from_string("c"), "arn");
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_TRUE(cache.get({1}, {}));
  EXPECT_FALSE(cache.get({2}, {}));
  EXPECT_TRUE(cache.get({3}, {}));
  EXPECT_GE(cache.stats().evictions, 1u);
}

TEST(DataKeyCache, ConcurrentUseIsSafe) {
  DataKeyCache cache({});
  std::vector<std::thread> ts;
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        Bytes b{static_cast<std::uint8_t>(t), static_cast<std::uint8_t>(i % 50)};
        cache.put(b, {}, crypto::SecureBuffer::from_string("x"), "arn");
        (void)cache.get(b, {});
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_LE(cache.size(), 400u);
}

TEST(DataKeyPrefetcher, FillsThePoolAndBindsTheFileId) {
  FakeKms kms;
  DataKeyPrefetcherOptions o;
  o.pool_size = 3;
  DataKeyPrefetcher pf(kms, "alias/k", "AES_256",
                       [](const std::array<std::uint8_t, 16>& id) {
                         return EncryptionContext{{"file", std::string(id.begin(), id.end())}};
                       },
                       o);
  for (int i = 0; i < 200 && pf.available() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(pf.available(), 3u);
  auto k = pf.take();
  ASSERT_TRUE(k);
  EXPECT_EQ(k->plaintext.size(), 32u);
  // The fake appends the context to the blob: the file id is in it.
  std::string tail(k->ciphertext_blob.begin() + 32, k->ciphertext_blob.end());
  EXPECT_EQ(tail, std::string(k->file_id.begin(), k->file_id.end()));
  auto k2 = pf.take();
  ASSERT_TRUE(k2);
  EXPECT_NE(k->file_id, k2->file_id);
}

TEST(DataKeyPrefetcher, EmptyPoolWhileTheKmsIsDown) {
  FakeKms kms;
  kms.down = true;
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; }, {});
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(pf.take());
  kms.down = false;
}

// A pool of 8 kept by 4 refillers, filled.
DataKeyPrefetcherOptions eight_keys_four_refillers() {
  DataKeyPrefetcherOptions o;
  o.pool_size = 8;
  o.refillers = 4;
  return o;
}
void wait_until_available(const DataKeyPrefetcher& pf, std::size_t n) {
  for (int i = 0; i < 500 && pf.available() < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

TEST(DataKeyPrefetcher, RefillsComeInBurstsFromHalfTheTarget) {
  FakeKms kms;
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; },
                       eight_keys_four_refillers());
  wait_until_available(pf, 8);
  ASSERT_EQ(pf.available(), 8u);
  ASSERT_EQ(kms.generates.load(), 8);
  // Down to 5 of 8: no refill yet (a refill per take would flush the audit
  // log once per key).
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(pf.take());
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(pf.available(), 5u);
  EXPECT_EQ(kms.generates.load(), 8);
  // Down to 4, half the target: one burst fills it again, with several
  // calls in flight at once.
  kms.generate_delay_ms = 100;
  kms.max_in_flight = 0;
  ASSERT_TRUE(pf.take());
  wait_until_available(pf, 8);
  EXPECT_EQ(pf.available(), 8u);
  EXPECT_EQ(kms.generates.load(), 12);
  EXPECT_GE(kms.max_in_flight.load(), 2);
}

// The refill of a drained pool runs several GenerateDataKey calls at once
// (so that the core's audit flushes are shared), never more than asked.
TEST(DataKeyPrefetcher, RefillsWithSeveralCallsInFlight) {
  FakeKms kms;
  kms.generate_delay_ms = 150;
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; },
                       eight_keys_four_refillers());
  wait_until_available(pf, 8);
  ASSERT_EQ(pf.available(), 8u);
  EXPECT_GE(kms.max_in_flight.load(), 2);
  EXPECT_LE(kms.max_in_flight.load(), 4);
  // Never more keys than the pool holds, however many refillers run.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_EQ(kms.generates.load(), 8);
  EXPECT_EQ(pf.generated(), 8u);
}

// Refillers whose calls fail together take one back-off step, not one
// each: a KMS back after a short outage refills the pool soon.
TEST(DataKeyPrefetcher, ConcurrentFailuresBackOffOnce) {
  FakeKms kms;
  kms.down = true;
  DataKeyPrefetcherOptions o;
  o.pool_size = 8;
  o.refillers = 8;
  o.initial_backoff = std::chrono::milliseconds(50);
  o.max_backoff = std::chrono::milliseconds(60'000);
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; }, o);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  kms.down = false;
  // Eight steps (one per failed call) would wait 50 ms × 2^7 = 6.4 s.
  for (int i = 0; i < 400 && pf.available() < 8; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(pf.available(), 8u);
}

// Keys that age out while nobody creates files are dropped and not made
// again (no GenerateDataKey records from an idle mount); the next take
// misses and starts the refill.
TEST(DataKeyPrefetcher, IdlePoolIsNotToppedUp) {
  FakeKms kms;
  DataKeyPrefetcherOptions o;
  o.pool_size = 2;
  o.max_pool_size = 2;
  o.max_age = std::chrono::milliseconds(200);
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; }, o);
  for (int i = 0; i < 500 && pf.generated() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(pf.generated(), 2u);
  // Four ages later: the stale keys are gone and none was made again.
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(pf.available(), 0u);
  EXPECT_EQ(kms.generates.load(), 2);
  EXPECT_FALSE(pf.take());  // a create now asks the KMS itself
  for (int i = 0; i < 500 && pf.available() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(pf.available(), 2u);
  EXPECT_EQ(kms.generates.load(), 4);
}

// A take that finds the pool empty doubles the number of keys kept ready,
// up to max_pool_size; after an idle max_age it is back to pool_size.
TEST(DataKeyPrefetcher, PoolGrowsWhileDrainedAndShrinksWhenIdle) {
  FakeKms kms;
  DataKeyPrefetcherOptions o;
  o.pool_size = 2;
  o.max_pool_size = 8;
  o.max_age = std::chrono::milliseconds(1500);
  DataKeyPrefetcher pf(kms, "k", "AES_256", [](const auto&) { return EncryptionContext{}; }, o);
  EXPECT_EQ(pf.target(), 2u);
  for (int i = 0; i < 500 && pf.available() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(pf.available(), 2u);
  kms.generate_delay_ms = 300;  // refills now lag the takes
  EXPECT_TRUE(pf.take());
  EXPECT_TRUE(pf.take());
  EXPECT_EQ(pf.target(), 2u);
  EXPECT_FALSE(pf.take());
  EXPECT_EQ(pf.target(), 4u);
  EXPECT_FALSE(pf.take());
  EXPECT_EQ(pf.target(), 8u);
  EXPECT_FALSE(pf.take());
  EXPECT_EQ(pf.target(), 8u);  // capped
  for (int i = 0; i < 1000 && pf.available() < 8; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(pf.available(), 8u);
  // Idle for over an age: back to the base size.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_EQ(pf.target(), 2u);
}

}  // namespace
}  // namespace kmsfs::keyclient
