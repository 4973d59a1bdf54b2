#pragma once
// Pkcs11Hsm: the Hsm over any PKCS#11 v2.40 module (SoftHSM2 in tests and by
// default). dlopen()s the module, C_Initialize with CKF_OS_LOCKING_OK, finds
// the token by label (initialising it with C_InitToken / C_InitPIN when the
// caller allows and no token has that label), logs in once and keeps a pool
// of sessions, one per concurrent caller; the pool's first session stays
// open for the object's lifetime so the token stays logged in.
//
// Must be created after any daemonizing fork.

#include <memory>
#include <string>

#include "crypto/secure_buffer.h"
#include "keyclient/hsm.h"

namespace kmsfs::keyclient {

struct Pkcs11Config {
  std::string module_path;
  std::string token_label = "kmsfs";
  crypto::SecureBuffer user_pin;
  // When set and no token carries `token_label`, the first uninitialised
  // slot's token is initialised with this SO PIN and `user_pin`.
  crypto::SecureBuffer so_pin_for_init;
  bool init_token_if_missing = false;
  std::size_t max_sessions = 4;
  // When set (the module's token directory, for a file-backed token such as
  // SoftHSM2's), the filesystem holding it is synced (syncfs) after every
  // call that creates or destroys a token object, before the call returns:
  // SoftHSM2 never fsyncs, and the KMS core records a new key version only
  // once the HSM returned, so the object must be durable first.
  std::string sync_dir;
};

class Pkcs11Hsm final : public Hsm {
 public:
  static HsmResult<std::unique_ptr<Pkcs11Hsm>> open(Pkcs11Config config);
  ~Pkcs11Hsm() override;

  HsmResult<void> generate_aes_key(const std::string& label, std::size_t key_bytes) override;
  HsmResult<bool> key_exists(const std::string& label) override;
  HsmResult<void> destroy_key(const std::string& label) override;
  HsmResult<std::vector<std::uint8_t>> encrypt_gcm(const std::string& label,
                                                   std::span<const std::uint8_t> iv,
                                                   std::span<const std::uint8_t> aad,
                                                   std::span<const std::uint8_t> plaintext) override;
  HsmResult<crypto::SecureBuffer> decrypt_gcm(const std::string& label,
                                              std::span<const std::uint8_t> iv,
                                              std::span<const std::uint8_t> aad,
                                              std::span<const std::uint8_t> ciphertext_and_tag) override;
  HsmResult<void> generate_random(std::span<std::uint8_t> out) override;
  HsmResult<void> generate_hmac_key(const std::string& label) override;
  HsmResult<std::vector<std::uint8_t>> hmac_sha256(const std::string& label,
                                                   std::span<const std::uint8_t> data) override;
  HsmResult<std::vector<std::uint8_t>> generate_rsa_wrapping_key_pair(const std::string& label,
                                                                      std::size_t modulus_bits) override;
  HsmResult<void> unwrap_aes_key_rsa_oaep_sha256(const std::string& wrapping_label,
                                                 std::span<const std::uint8_t> wrapped,
                                                 const std::string& new_label, std::size_t key_bytes) override;
  HsmResult<void> destroy_objects(const std::string& label) override;

  struct Impl;

 private:
  explicit Pkcs11Hsm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsfs::keyclient
