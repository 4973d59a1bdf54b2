#pragma once
// The fixed-size header at the start of every non-empty backing file.
// Byte layout (big-endian integers), see docs/format.md:
//
//   0   8  magic "KMSFSHDR"
//   8   2  format version (1)
//  10   2  flags (0; any other value is rejected)
//  12  16  file id (random, 128 bit)
//  28   2  wrapped-key length L (1..96)
//  30  96  wrapped DEK (KMS ciphertext blob), zero padded after L bytes
// 126   2  reserved, zero
//
// The file id is authenticated twice: it is part of the KMS encryption
// context of the wrapped DEK and of every block's AAD. The wrapped DEK
// authenticates itself. Every other byte has exactly one valid value.

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "crypto/result.h"

namespace kmsfs::crypto {

using FileId = std::array<std::uint8_t, 16>;

struct FileHeader {
  static constexpr std::size_t kSize = 128;
  static constexpr std::uint16_t kVersion = 1;
  static constexpr std::size_t kMaxWrappedKeySize = 96;
  static constexpr char kMagic[9] = "KMSFSHDR";

  FileId file_id{};
  std::vector<std::uint8_t> wrapped_key;

  // Precondition: 1 <= wrapped_key.size() <= kMaxWrappedKeySize.
  std::array<std::uint8_t, kSize> encode() const;
  // Rejects anything but an exact, well-formed header; the error says which
  // field is wrong.
  static Result<FileHeader, std::string> decode(std::span<const std::uint8_t> bytes);
};

std::string file_id_hex(const FileId& id);

}  // namespace kmsfs::crypto
