#include "keyclient/bounded_hsm.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

using namespace std::chrono_literals;

// Real SoftHSM behind the deadline: the calls and their results pass through.
TEST(BoundedHsm, PassesCallsAndResultsThrough) {
  BoundedHsm hsm(test::open_test_hsm(test::unique_token_label()), 10s);
  ASSERT_TRUE(hsm.generate_aes_key("k1", 32));
  auto exists = hsm.key_exists("k1");
  ASSERT_TRUE(exists);
  EXPECT_TRUE(*exists);
  auto missing = hsm.key_exists("nope");
  ASSERT_TRUE(missing);
  EXPECT_FALSE(*missing);

  const std::vector<std::uint8_t> iv(12, 7), aad{1, 2, 3}, pt{'s', 'e', 'c', 'r', 'e', 't'};
  auto ct = hsm.encrypt_gcm("k1", iv, aad, pt);
  ASSERT_TRUE(ct) << ct.error().message;
  EXPECT_EQ(ct->size(), pt.size() + 16);
  auto back = hsm.decrypt_gcm("k1", iv, aad, *ct);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(std::vector<std::uint8_t>(back->data(), back->data() + back->size()), pt);
  // A wrong AAD keeps its error kind through the worker.
  auto bad = hsm.decrypt_gcm("k1", iv, std::vector<std::uint8_t>{9}, *ct);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().kind, HsmError::Kind::AuthenticationFailed);

  // A data key and its wrap in one call: the key decrypts back.
  std::vector<std::uint8_t> dek(32, 0);
  auto wrapped = hsm.generate_and_encrypt_gcm("k1", iv, aad, dek);
  ASSERT_TRUE(wrapped) << wrapped.error().message;
  EXPECT_NE(dek, std::vector<std::uint8_t>(32, 0));
  auto dek_back = hsm.decrypt_gcm("k1", iv, aad, *wrapped);
  ASSERT_TRUE(dek_back) << dek_back.error().message;
  EXPECT_EQ(std::vector<std::uint8_t>(dek_back->data(), dek_back->data() + dek_back->size()), dek);

  std::vector<std::uint8_t> rnd(64, 0);
  ASSERT_TRUE(hsm.generate_random(rnd));
  EXPECT_NE(rnd, std::vector<std::uint8_t>(64, 0));
  ASSERT_TRUE(hsm.destroy_key("k1"));
  EXPECT_FALSE(*hsm.key_exists("k1"));
  EXPECT_EQ(hsm.abandoned_calls(), 0u);
}

// A module that hangs in generate_random while `hang` is set, answers every
// other call at once, and says when it is destroyed.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool hang = false;
  int inside = 0;
  std::atomic<bool> destroyed{false};
  void release() {
    std::lock_guard<std::mutex> lock(mu);
    hang = false;
    cv.notify_all();
  }
};

class GateHsm final : public Hsm {
 public:
  explicit GateHsm(std::shared_ptr<Gate> g) : g_(std::move(g)) {}
  ~GateHsm() override { g_->destroyed = true; }
  HsmResult<void> generate_aes_key(const std::string&, std::size_t) override { return {}; }
  HsmResult<bool> key_exists(const std::string& label) override { return label == "present"; }
  HsmResult<void> destroy_key(const std::string&) override { return {}; }
  HsmResult<std::vector<std::uint8_t>> encrypt_gcm(const std::string&, std::span<const std::uint8_t>,
                                                   std::span<const std::uint8_t>,
                                                   std::span<const std::uint8_t> pt) override {
    return std::vector<std::uint8_t>(pt.begin(), pt.end());
  }
  HsmResult<crypto::SecureBuffer> decrypt_gcm(const std::string&, std::span<const std::uint8_t>,
                                              std::span<const std::uint8_t>,
                                              std::span<const std::uint8_t> ct) override {
    return crypto::SecureBuffer::from(ct);
  }
  HsmResult<void> generate_random(std::span<std::uint8_t> out) override {
    std::unique_lock<std::mutex> lock(g_->mu);
    ++g_->inside;
    g_->cv.notify_all();
    g_->cv.wait(lock, [&] { return !g_->hang; });
    --g_->inside;
    for (auto& b : out) b = 0xAB;
    return {};
  }

 private:
  std::shared_ptr<Gate> g_;
};

TEST(BoundedHsm, HungCallTimesOutWithAClearErrorAndOthersGoOn) {
  auto gate = std::make_shared<Gate>();
  BoundedHsm hsm(std::make_unique<GateHsm>(gate), 300ms);
  gate->hang = true;
  std::vector<std::uint8_t> out(16, 0);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = hsm.generate_random(out);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(r) << "a hanging call returned success";
  EXPECT_EQ(r.error().kind, HsmError::Kind::DeviceError);
  EXPECT_NE(r.error().message.find("did not answer generate_random within 300 ms"), std::string::npos)
      << r.error().message;
  EXPECT_GE(took, 300ms);
  EXPECT_LT(took, 5s);
  EXPECT_EQ(out, std::vector<std::uint8_t>(16, 0)) << "the caller's buffer was written after the deadline";
  EXPECT_EQ(hsm.abandoned_calls(), 1u);
  // A new data key hangs the same way (its random bytes come first).
  std::vector<std::uint8_t> dek(32, 0);
  auto w = hsm.generate_and_encrypt_gcm("k", std::vector<std::uint8_t>(12), {}, dek);
  ASSERT_FALSE(w);
  EXPECT_NE(w.error().message.find("did not answer generate_and_encrypt_gcm"), std::string::npos) << w.error().message;
  EXPECT_EQ(dek, std::vector<std::uint8_t>(32, 0)) << "the caller's key buffer was written after the deadline";
  EXPECT_EQ(hsm.abandoned_calls(), 2u);

  // The HSM hangs for one call; the others are answered meanwhile.
  auto e = hsm.key_exists("present");
  ASSERT_TRUE(e) << e.error().message;
  EXPECT_TRUE(*e);
  const std::vector<std::uint8_t> iv(12), pt{1, 2, 3};
  auto ct = hsm.encrypt_gcm("k", iv, {}, pt);
  ASSERT_TRUE(ct);
  EXPECT_EQ(*ct, pt);

  // When the module answers, the abandoned call ends and the next one works.
  gate->release();
  for (int i = 0; i < 500 && hsm.abandoned_calls() != 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(hsm.abandoned_calls(), 0u);
  ASSERT_TRUE(hsm.generate_random(out));
  EXPECT_EQ(out, std::vector<std::uint8_t>(16, 0xAB));
}

TEST(BoundedHsm, ManyHungCallsEachTimeOutAndTheLimitFailsFast) {
  auto gate = std::make_shared<Gate>();
  BoundedHsm hsm(std::make_unique<GateHsm>(gate), 200ms, /*max_workers=*/3);
  gate->hang = true;
  std::vector<std::thread> callers;
  std::atomic<int> failed{0};
  for (int i = 0; i < 3; ++i) {
    callers.emplace_back([&] {
      std::vector<std::uint8_t> out(8);
      if (!hsm.generate_random(out)) ++failed;
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(failed.load(), 3);
  EXPECT_EQ(hsm.abandoned_calls(), 3u);
  // Every worker is stuck: the next call fails at once and says why.
  const auto t0 = std::chrono::steady_clock::now();
  auto e = hsm.key_exists("present");
  ASSERT_FALSE(e);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 150ms);
  EXPECT_NE(e.error().message.find("3 calls are still waiting"), std::string::npos) << e.error().message;
  gate->release();
  for (int i = 0; i < 500 && hsm.abandoned_calls() != 0; ++i) std::this_thread::sleep_for(10ms);
  auto again = hsm.key_exists("present");
  ASSERT_TRUE(again) << again.error().message;
}

TEST(BoundedHsm, DestroyedWhileACallHangsTheModuleClosesWhenItReturns) {
  auto gate = std::make_shared<Gate>();
  auto hsm = std::make_unique<BoundedHsm>(std::make_unique<GateHsm>(gate), 200ms);
  gate->hang = true;
  std::vector<std::uint8_t> out(8);
  ASSERT_FALSE(hsm->generate_random(out));
  const auto t0 = std::chrono::steady_clock::now();
  hsm.reset();  // must not wait for the hung call
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  EXPECT_FALSE(gate->destroyed.load()) << "the module was closed under a call still inside it";
  gate->release();
  for (int i = 0; i < 500 && !gate->destroyed.load(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(gate->destroyed.load()) << "the module was never closed after the hung call returned";
}

TEST(BoundedHsm, DestructionClosesTheModuleAtOnceWhenNothingHangs) {
  auto gate = std::make_shared<Gate>();
  auto hsm = std::make_unique<BoundedHsm>(std::make_unique<GateHsm>(gate), 10s);
  std::vector<std::uint8_t> out(8);
  ASSERT_TRUE(hsm->generate_random(out));
  const auto t0 = std::chrono::steady_clock::now();
  hsm.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s) << "idle workers held up the shutdown";
  EXPECT_TRUE(gate->destroyed.load()) << "the module outlived its BoundedHsm";
}

}  // namespace
}  // namespace kmsfs::keyclient
