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
};

}  // namespace kmsfs::keyclient
