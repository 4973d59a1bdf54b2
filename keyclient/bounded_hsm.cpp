#include "keyclient/bounded_hsm.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "crypto/secure_buffer.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

namespace {

std::shared_ptr<spdlog::logger> log() { return named_logger("kmsfs.p11"); }

struct Job {
  virtual ~Job() = default;
  virtual void run(BoundedHsm::Pool& pool) = 0;
};

template <class T>
struct Slot {
  std::condition_variable cv;
  std::optional<HsmResult<T>> result;
  bool started = false;   // a worker took the job
  bool given_up = false;  // the caller's deadline passed
  std::chrono::steady_clock::time_point start_time;
};

HsmError timeout_error(const std::string& what, std::chrono::milliseconds timeout) {
  return HsmError{HsmError::Kind::DeviceError, 0,
                  "the HSM did not answer " + what + " within " + std::to_string(timeout.count()) +
                      " ms (KMSFS_HSM_TIMEOUT_MS); the call is abandoned"};
}

}  // namespace

struct BoundedHsm::Pool {
  std::unique_ptr<Hsm> inner;
  std::chrono::milliseconds timeout{0};
  std::size_t max_workers = 0;

  std::mutex mu;
  std::condition_variable work_cv;  // workers: a job or stop
  std::condition_variable exit_cv;  // destructor: workers leaving, calls finishing
  std::deque<std::unique_ptr<Job>> queue;
  // Every worker thread, with whether it has left its loop. Threads are
  // joined (a detached thread still running its exit handlers, OpenSSL's
  // among them, while the process exits can crash it); only a thread
  // stuck in the module is ever detached, at destruction.
  std::vector<std::pair<std::thread, std::shared_ptr<bool>>> threads;
  std::size_t workers = 0;  // threads alive
  std::size_t idle = 0;     // of those, waiting for a job
  std::size_t busy = 0;     // of those, running a job
  std::size_t abandoned = 0;  // of the busy, whose caller gave up
  bool stopping = false;

  static void worker(std::shared_ptr<Pool> self, std::shared_ptr<bool> exited) {
    Pool& p = *self;
    std::unique_lock<std::mutex> lock(p.mu);
    for (;;) {
      ++p.idle;
      p.work_cv.wait(lock, [&] { return p.stopping || !p.queue.empty(); });
      --p.idle;
      if (p.queue.empty()) break;  // stopping, nothing left
      std::unique_ptr<Job> job = std::move(p.queue.front());
      p.queue.pop_front();
      ++p.busy;
      lock.unlock();
      job->run(p);
      job.reset();  // its copies of inputs (key material too) are cleansed here
      crypto::scrub_stack();  // and what the module left on this stack
      lock.lock();
      --p.busy;
      p.exit_cv.notify_all();
    }
    --p.workers;
    *exited = true;
    p.exit_cv.notify_all();
    // `lock` unlocks before `self` is released (locals before parameters).
  }
  // Joins the threads that left their loop (the caller holds no lock).
  void join_exited() {
    std::vector<std::thread> done;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = threads.begin(); it != threads.end();) {
        if (*it->second) {
          done.push_back(std::move(it->first));
          it = threads.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& t : done) t.join();
  }
};

namespace {

template <class T, class Fn>
struct TypedJob final : Job {
  TypedJob(std::shared_ptr<Slot<T>> s, Fn f, std::string w) : slot(std::move(s)), fn(std::move(f)), what(std::move(w)) {}
  std::shared_ptr<Slot<T>> slot;
  Fn fn;
  std::string what;

  void run(BoundedHsm::Pool& p) override {
    {
      std::lock_guard<std::mutex> lock(p.mu);
      if (slot->given_up) return;  // the caller left before the job began
      slot->started = true;
      slot->start_time = std::chrono::steady_clock::now();
    }
    HsmResult<T> r = fn(*p.inner);
    std::lock_guard<std::mutex> lock(p.mu);
    if (slot->given_up) {
      --p.abandoned;
      // After shutdown this thread is detached and may return while the
      // process exits, when the logger registry is already destroyed: it
      // logs nothing then (a use after free that ASan found).
      if (!p.stopping) {
        const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                                slot->start_time);
        log()->warn("an abandoned HSM call ({}) returned after {} ms", what, took.count());
      }
      return;
    }
    slot->result.emplace(std::move(r));
    slot->cv.notify_all();
  }
};

}  // namespace

namespace {

// Runs fn(inner) on a worker; fn owns everything it reads or writes.
template <class T, class Fn>
HsmResult<T> run_bounded(const std::shared_ptr<BoundedHsm::Pool>& pool, std::string what, Fn fn) {
  BoundedHsm::Pool& p = *pool;
  const auto deadline = std::chrono::steady_clock::now() + p.timeout;
  auto slot = std::make_shared<Slot<T>>();
  std::unique_lock<std::mutex> lock(p.mu);
  if (p.abandoned >= p.max_workers) {
    return Unexpected<HsmError>(HsmError{HsmError::Kind::DeviceError, 0,
                                         "the HSM is not answering: " + std::to_string(p.abandoned) +
                                             " calls are still waiting for it (" + what + " not attempted)"});
  }
  p.queue.push_back(std::make_unique<TypedJob<T, Fn>>(slot, std::move(fn), what));
  if (p.idle < p.queue.size() && p.workers < p.max_workers) {
    try {
      auto exited = std::make_shared<bool>(false);
      p.threads.emplace_back(std::thread(&BoundedHsm::Pool::worker, pool, exited), exited);
      ++p.workers;
    } catch (const std::system_error& e) {
      if (p.workers == 0) {
        p.queue.pop_back();
        return Unexpected<HsmError>(HsmError{HsmError::Kind::DeviceError, 0,
                                             std::string("cannot start a thread for HSM calls: ") + e.what()});
      }
    }
  }
  p.work_cv.notify_one();
  if (!slot->cv.wait_until(lock, deadline, [&] { return slot->result.has_value(); })) {
    slot->given_up = true;
    if (slot->started) ++p.abandoned;
    log()->error("HSM call {} did not return within {} ms; abandoned ({} abandoned calls still running)", what,
                 p.timeout.count(), p.abandoned);
    return Unexpected<HsmError>(timeout_error(what, p.timeout));
  }
  return std::move(*slot->result);
}

std::vector<std::uint8_t> copy(std::span<const std::uint8_t> s) { return {s.begin(), s.end()}; }

}  // namespace

BoundedHsm::BoundedHsm(std::unique_ptr<Hsm> inner, std::chrono::milliseconds timeout, std::size_t max_workers)
    : pool_(std::make_shared<Pool>()) {
  pool_->inner = std::move(inner);
  pool_->timeout = timeout;
  pool_->max_workers = max_workers == 0 ? 1 : max_workers;
}

namespace {
std::atomic<bool> g_calls_left_hung{false};
}  // namespace

bool hsm_calls_left_hung() noexcept { return g_calls_left_hung.load(); }

BoundedHsm::~BoundedHsm() {
  Pool& p = *pool_;
  std::unique_lock<std::mutex> lock(p.mu);
  // Calls still in time get their deadline to finish; abandoned ones are not
  // waited for.
  (void)p.exit_cv.wait_for(lock, p.timeout, [&] { return p.busy == p.abandoned; });
  p.stopping = true;
  p.work_cv.notify_all();
  (void)p.exit_cv.wait_for(lock, p.timeout, [&] { return p.workers == p.busy; });
  const std::size_t hung = p.busy;
  lock.unlock();
  p.join_exited();
  if (hung == 0) {
    // Nobody can touch the module any more: close it here, in order.
    std::unique_ptr<Hsm> inner = std::move(p.inner);
    inner.reset();
    return;
  }
  // A hung call keeps the module (and the pool) alive until it returns.
  g_calls_left_hung.store(true);
  log()->warn("{} HSM calls are still hung at shutdown; the module is left open", hung);
  lock.lock();
  for (auto& t : p.threads) t.first.detach();
  p.threads.clear();
}

std::size_t BoundedHsm::abandoned_calls() const {
  std::lock_guard<std::mutex> lock(pool_->mu);
  return pool_->abandoned;
}

HsmResult<void> BoundedHsm::generate_aes_key(const std::string& label, std::size_t key_bytes) {
  return run_bounded<void>(pool_, "generate_aes_key '" + label + "'",
                           [label, key_bytes](Hsm& h) { return h.generate_aes_key(label, key_bytes); });
}

HsmResult<bool> BoundedHsm::key_exists(const std::string& label) {
  return run_bounded<bool>(pool_, "key_exists '" + label + "'", [label](Hsm& h) { return h.key_exists(label); });
}

HsmResult<void> BoundedHsm::destroy_key(const std::string& label) {
  return run_bounded<void>(pool_, "destroy_key '" + label + "'", [label](Hsm& h) { return h.destroy_key(label); });
}

HsmResult<std::vector<std::uint8_t>> BoundedHsm::encrypt_gcm(const std::string& label,
                                                             std::span<const std::uint8_t> iv,
                                                             std::span<const std::uint8_t> aad,
                                                             std::span<const std::uint8_t> plaintext) {
  return run_bounded<std::vector<std::uint8_t>>(
      pool_, "encrypt_gcm with '" + label + "'",
      [label, iv = copy(iv), aad = copy(aad), pt = crypto::SecureBuffer::from(plaintext)](Hsm& h) {
        return h.encrypt_gcm(label, iv, aad, pt.span());
      });
}

HsmResult<crypto::SecureBuffer> BoundedHsm::decrypt_gcm(const std::string& label, std::span<const std::uint8_t> iv,
                                                        std::span<const std::uint8_t> aad,
                                                        std::span<const std::uint8_t> ciphertext_and_tag) {
  return run_bounded<crypto::SecureBuffer>(
      pool_, "decrypt_gcm with '" + label + "'",
      [label, iv = copy(iv), aad = copy(aad), ct = copy(ciphertext_and_tag)](Hsm& h) {
        return h.decrypt_gcm(label, iv, aad, ct);
      });
}

HsmResult<void> BoundedHsm::generate_random(std::span<std::uint8_t> out) {
  // The worker fills a buffer of its own; the caller's span is written only
  // by the caller, after the call came back in time.
  auto buf = std::make_shared<crypto::SecureBuffer>(out.size());
  auto r = run_bounded<void>(pool_, "generate_random", [buf](Hsm& h) { return h.generate_random(buf->span()); });
  if (r) std::copy(buf->data(), buf->data() + buf->size(), out.data());
  return r;
}

HsmResult<std::vector<std::uint8_t>> BoundedHsm::generate_and_encrypt_gcm(const std::string& label,
                                                                          std::span<const std::uint8_t> iv,
                                                                          std::span<const std::uint8_t> aad,
                                                                          std::span<std::uint8_t> plaintext_out) {
  // Both steps on one worker; the key reaches the caller's buffer only if
  // the call came back in time.
  auto key = std::make_shared<crypto::SecureBuffer>(plaintext_out.size());
  auto r = run_bounded<std::vector<std::uint8_t>>(
      pool_, "generate_and_encrypt_gcm with '" + label + "'",
      [label, iv = copy(iv), aad = copy(aad), key](Hsm& h) {
        return h.generate_and_encrypt_gcm(label, iv, aad, key->span());
      });
  if (r) std::copy(key->data(), key->data() + key->size(), plaintext_out.data());
  return r;
}

HsmResult<void> BoundedHsm::generate_hmac_key(const std::string& label) {
  return run_bounded<void>(pool_, "generate_hmac_key '" + label + "'",
                           [label](Hsm& h) { return h.generate_hmac_key(label); });
}

HsmResult<std::vector<std::uint8_t>> BoundedHsm::hmac_sha256(const std::string& label,
                                                             std::span<const std::uint8_t> data) {
  return run_bounded<std::vector<std::uint8_t>>(pool_, "hmac_sha256 with '" + label + "'",
                                                [label, d = copy(data)](Hsm& h) { return h.hmac_sha256(label, d); });
}

HsmResult<std::vector<std::uint8_t>> BoundedHsm::generate_rsa_wrapping_key_pair(const std::string& label,
                                                                                std::size_t modulus_bits) {
  return run_bounded<std::vector<std::uint8_t>>(
      pool_, "generate_rsa_wrapping_key_pair '" + label + "'",
      [label, modulus_bits](Hsm& h) { return h.generate_rsa_wrapping_key_pair(label, modulus_bits); });
}

HsmResult<void> BoundedHsm::unwrap_aes_key_rsa_oaep_sha256(const std::string& wrapping_label,
                                                           std::span<const std::uint8_t> wrapped,
                                                           const std::string& new_label, std::size_t key_bytes) {
  return run_bounded<void>(pool_, "unwrap_aes_key_rsa_oaep_sha256 into '" + new_label + "'",
                           [wrapping_label, w = copy(wrapped), new_label, key_bytes](Hsm& h) {
                             return h.unwrap_aes_key_rsa_oaep_sha256(wrapping_label, w, new_label, key_bytes);
                           });
}

HsmResult<void> BoundedHsm::destroy_objects(const std::string& label) {
  return run_bounded<void>(pool_, "destroy_objects '" + label + "'",
                           [label](Hsm& h) { return h.destroy_objects(label); });
}

}  // namespace kmsfs::keyclient
