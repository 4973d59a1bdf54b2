#pragma once
// Hex and base64 (standard alphabet, padded: what AWS puts in JSON).

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kmsfs::crypto {

std::string to_hex(std::span<const std::uint8_t> bytes);
std::optional<std::vector<std::uint8_t>> from_hex(std::string_view hex);

std::string to_base64(std::span<const std::uint8_t> bytes);
// Rejects characters outside the alphabet and bad padding.
std::optional<std::vector<std::uint8_t>> from_base64(std::string_view b64);

// base64url (RFC 4648 §5: '-' and '_'), without padding: the form of
// encrypted file names. Decoding accepts only the canonical spelling.
std::string to_base64url(std::span<const std::uint8_t> bytes);
std::optional<std::vector<std::uint8_t>> from_base64url(std::string_view b64);

inline std::span<const std::uint8_t> as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

}  // namespace kmsfs::crypto
