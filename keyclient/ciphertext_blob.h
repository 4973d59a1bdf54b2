#pragma once
// The KMS ciphertext blob (what Encrypt and GenerateDataKey return and
// Decrypt takes). Self-describing, fixed size for a given plaintext size:
//
//   0   4  magic "KMB" 0x01 (format 1)
//   4  16  key id (the UUID's 16 bytes)
//  20   4  key version (u32 big-endian, 1 = original material)
//  24   2  plaintext / ciphertext length N (u16 big-endian, 1..4096)
//  26  12  GCM IV (random)
//  38   N  ciphertext
//  38+N 16 GCM tag
//
// GCM runs inside the HSM under the key version's master key, with
// AAD = bytes 0..25 of the blob ‖ canonical encryption context, so the blob
// opens only under its own key, version and context. A 32-byte data key
// gives an 86-byte blob.

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "crypto/result.h"

namespace kmsfs::keyclient {

struct CiphertextBlob {
  static constexpr std::size_t kHeaderSize = 26;  // authenticated prefix
  static constexpr std::size_t kIvSize = 12;
  static constexpr std::size_t kTagSize = 16;
  static constexpr std::size_t kOverhead = kHeaderSize + kIvSize + kTagSize;  // 54
  static constexpr std::size_t kMaxPlaintext = 4096;

  std::array<std::uint8_t, 16> key_uuid{};
  std::uint32_t key_version = 0;
  std::array<std::uint8_t, 12> iv{};
  std::vector<std::uint8_t> ciphertext_and_tag;  // N + 16 bytes

  // The 26 authenticated header bytes (magic, key id, version, length).
  std::array<std::uint8_t, kHeaderSize> header_bytes() const;
  std::vector<std::uint8_t> encode() const;
  static Result<CiphertextBlob, std::string> decode(std::span<const std::uint8_t> blob);
};

// "1234abcd-12ab-34cd-56ef-1234567890ab" <-> 16 bytes.
std::string uuid_to_string(const std::array<std::uint8_t, 16>& u);
std::optional<std::array<std::uint8_t, 16>> uuid_from_string(const std::string& s);

}  // namespace kmsfs::keyclient
