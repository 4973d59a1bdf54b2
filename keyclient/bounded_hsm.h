#pragma once
// BoundedHsm: an Hsm whose every call returns within a deadline. A PKCS#11
// call cannot be cancelled, so each call runs on a worker thread and the
// caller waits at most `timeout` for it; a call that does not answer in time
// fails with a DeviceError naming the operation and the deadline, and the
// worker is abandoned until the module returns (it owns copies of the call's
// inputs and outputs, so the caller's buffers are never touched late). The
// other calls go on, on other workers and sessions; when the HSM answers
// again everything works as before.

#include <chrono>
#include <cstddef>
#include <memory>

#include "keyclient/hsm.h"

namespace kmsfs::keyclient {

// Whether a BoundedHsm went away while calls were still hung in the module
// (their threads detached). Such a process must not run its exit handlers
// (OpenSSL's and the module's own): a hung call that returns then runs into
// torn-down state. The tools leave with _exit when it is true.
bool hsm_calls_left_hung() noexcept;

class BoundedHsm final : public Hsm {
 public:
  // `max_workers` bounds the threads (busy, idle and abandoned together);
  // a call finding all of them taken waits in the queue, inside its deadline.
  BoundedHsm(std::unique_ptr<Hsm> inner, std::chrono::milliseconds timeout, std::size_t max_workers = 32);
  ~BoundedHsm() override;
  BoundedHsm(const BoundedHsm&) = delete;
  BoundedHsm& operator=(const BoundedHsm&) = delete;

  HsmResult<void> generate_aes_key(const std::string& label, std::size_t key_bytes) override;
  HsmResult<bool> key_exists(const std::string& label) override;
  HsmResult<void> destroy_key(const std::string& label) override;
  HsmResult<std::vector<std::uint8_t>> encrypt_gcm(const std::string& label, std::span<const std::uint8_t> iv,
                                                   std::span<const std::uint8_t> aad,
                                                   std::span<const std::uint8_t> plaintext) override;
  HsmResult<crypto::SecureBuffer> decrypt_gcm(const std::string& label, std::span<const std::uint8_t> iv,
                                              std::span<const std::uint8_t> aad,
                                              std::span<const std::uint8_t> ciphertext_and_tag) override;
  HsmResult<void> generate_random(std::span<std::uint8_t> out) override;
  HsmResult<std::vector<std::uint8_t>> generate_and_encrypt_gcm(const std::string& label,
                                                                std::span<const std::uint8_t> iv,
                                                                std::span<const std::uint8_t> aad,
                                                                std::span<std::uint8_t> plaintext_out) override;
  HsmResult<void> generate_hmac_key(const std::string& label) override;
  HsmResult<std::vector<std::uint8_t>> hmac_sha256(const std::string& label,
                                                   std::span<const std::uint8_t> data) override;
  HsmResult<std::vector<std::uint8_t>> generate_rsa_wrapping_key_pair(const std::string& label,
                                                                      std::size_t modulus_bits) override;
  HsmResult<void> unwrap_aes_key_rsa_oaep_sha256(const std::string& wrapping_label,
                                                 std::span<const std::uint8_t> wrapped, const std::string& new_label,
                                                 std::size_t key_bytes) override;
  HsmResult<void> destroy_objects(const std::string& label) override;

  // Calls that missed their deadline and have not returned yet.
  std::size_t abandoned_calls() const;

  struct Pool;

 private:
  std::shared_ptr<Pool> pool_;
};

}  // namespace kmsfs::keyclient
