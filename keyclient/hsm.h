#pragma once
// Hsm: what the KMS core needs from a hardware security module. Master keys
// are named by a label ("kmsfs/<key uuid>/v<version>") and never leave the
// HSM; wrapping is AES-256-GCM performed inside it. The PKCS#11
// implementation is Pkcs11Hsm; the core never sees PKCS#11 itself.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "crypto/result.h"
#include "crypto/secure_buffer.h"

namespace kmsfs::keyclient {

struct HsmError {
  enum class Kind {
    KeyNotFound,           // no object with that label
    AuthenticationFailed,  // GCM tag or AAD did not verify
    InvalidArgument,
    DeviceError,           // the module, token or session failed
    NotLoggedIn,
  };
  Kind kind = Kind::DeviceError;
  unsigned long ckr = 0;  // the CKR_* value, 0 if none
  std::string message;    // never contains key material or PINs
};

template <class T>
using HsmResult = Result<T, HsmError>;

class Hsm {
 public:
  virtual ~Hsm() = default;

  // Creates a token AES key object (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
  // !CKA_EXTRACTABLE, !CKA_MODIFIABLE, ENCRYPT/DECRYPT) of `key_bytes` bytes
  // with CKA_LABEL = CKA_ID = label. Fails if the label exists.
  virtual HsmResult<void> generate_aes_key(const std::string& label, std::size_t key_bytes) = 0;
  virtual HsmResult<bool> key_exists(const std::string& label) = 0;
  virtual HsmResult<void> destroy_key(const std::string& label) = 0;

  // AES-GCM with a 96-bit IV and 128-bit tag inside the HSM. Returns
  // ciphertext ‖ tag.
  virtual HsmResult<std::vector<std::uint8_t>> encrypt_gcm(const std::string& label,
                                                           std::span<const std::uint8_t> iv,
                                                           std::span<const std::uint8_t> aad,
                                                           std::span<const std::uint8_t> plaintext) = 0;
  // Takes ciphertext ‖ tag. A wrong tag, AAD or key is AuthenticationFailed.
  virtual HsmResult<crypto::SecureBuffer> decrypt_gcm(const std::string& label,
                                                      std::span<const std::uint8_t> iv,
                                                      std::span<const std::uint8_t> aad,
                                                      std::span<const std::uint8_t> ciphertext_and_tag) = 0;

  virtual HsmResult<void> generate_random(std::span<std::uint8_t> out) = 0;

  // A new data key: `plaintext_out` filled from the HSM's generator, then
  // encrypted as encrypt_gcm does; returns ciphertext ‖ tag. One call, so
  // that an implementation may do both steps in one go (BoundedHsm: one
  // worker hand-off instead of two).
  virtual HsmResult<std::vector<std::uint8_t>> generate_and_encrypt_gcm(const std::string& label,
                                                                        std::span<const std::uint8_t> iv,
                                                                        std::span<const std::uint8_t> aad,
                                                                        std::span<std::uint8_t> plaintext_out);

  // --- #3: audit checkpoints and imported key material. Defaults refuse, so
  // that a minimal Hsm (a test double) need not implement them.

  // A token HMAC key (CKK_GENERIC_SECRET, 32 bytes, sensitive, not
  // extractable, CKA_SIGN/CKA_VERIFY only). Fails if the label exists.
  virtual HsmResult<void> generate_hmac_key(const std::string& label);
  // HMAC-SHA-256 (CKM_SHA256_HMAC) inside the HSM.
  virtual HsmResult<std::vector<std::uint8_t>> hmac_sha256(const std::string& label,
                                                           std::span<const std::uint8_t> data);
  // An RSA key pair for importing key material: the private key (label)
  // sensitive, not extractable, CKA_UNWRAP/CKA_DECRYPT only; the public key
  // (same label) CKA_WRAP/CKA_ENCRYPT. Returns the public key as DER
  // SubjectPublicKeyInfo. Fails if the label exists.
  virtual HsmResult<std::vector<std::uint8_t>> generate_rsa_wrapping_key_pair(const std::string& label,
                                                                              std::size_t modulus_bits);
  // Turns RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) encrypted AES key
  // material into a new token AES key `new_label` with the attributes of
  // generate_aes_key. A malformed ciphertext or a key of the wrong size is
  // AuthenticationFailed / InvalidArgument.
  virtual HsmResult<void> unwrap_aes_key_rsa_oaep_sha256(const std::string& wrapping_label,
                                                         std::span<const std::uint8_t> wrapped,
                                                         const std::string& new_label,
                                                         std::size_t key_bytes);
  // Destroys every object of any class labelled `label`; none is not an error.
  virtual HsmResult<void> destroy_objects(const std::string& label);
};

inline HsmResult<std::vector<std::uint8_t>> Hsm::generate_and_encrypt_gcm(const std::string& label,
                                                                          std::span<const std::uint8_t> iv,
                                                                          std::span<const std::uint8_t> aad,
                                                                          std::span<std::uint8_t> plaintext_out) {
  if (auto r = generate_random(plaintext_out); !r) return Unexpected<HsmError>(std::move(r).error());
  return encrypt_gcm(label, iv, aad, plaintext_out);
}
inline HsmResult<void> Hsm::generate_hmac_key(const std::string&) {
  return Unexpected<HsmError>(HsmError{HsmError::Kind::InvalidArgument, 0, "HMAC keys are not supported by this HSM"});
}
inline HsmResult<std::vector<std::uint8_t>> Hsm::hmac_sha256(const std::string&, std::span<const std::uint8_t>) {
  return Unexpected<HsmError>(HsmError{HsmError::Kind::InvalidArgument, 0, "HMAC is not supported by this HSM"});
}
inline HsmResult<std::vector<std::uint8_t>> Hsm::generate_rsa_wrapping_key_pair(const std::string&, std::size_t) {
  return Unexpected<HsmError>(HsmError{HsmError::Kind::InvalidArgument, 0, "RSA wrapping keys are not supported by this HSM"});
}
inline HsmResult<void> Hsm::unwrap_aes_key_rsa_oaep_sha256(const std::string&, std::span<const std::uint8_t>,
                                                           const std::string&, std::size_t) {
  return Unexpected<HsmError>(HsmError{HsmError::Kind::InvalidArgument, 0, "key import is not supported by this HSM"});
}
inline HsmResult<void> Hsm::destroy_objects(const std::string& label) {
  auto r = destroy_key(label);
  if (!r && r.error().kind == HsmError::Kind::KeyNotFound) return {};
  return r;
}

}  // namespace kmsfs::keyclient
