#include "keyclient/ciphertext_blob.h"

#include <cstdio>
#include <cstring>

#include "crypto/encoding.h"

namespace kmsfs::keyclient {

namespace {
constexpr std::uint8_t kMagic[4] = {'K', 'M', 'B', 0x01};
}

std::array<std::uint8_t, CiphertextBlob::kHeaderSize> CiphertextBlob::header_bytes() const {
  std::array<std::uint8_t, kHeaderSize> h{};
  std::memcpy(h.data(), kMagic, 4);
  std::memcpy(h.data() + 4, key_uuid.data(), 16);
  h[20] = static_cast<std::uint8_t>(key_version >> 24);
  h[21] = static_cast<std::uint8_t>(key_version >> 16);
  h[22] = static_cast<std::uint8_t>(key_version >> 8);
  h[23] = static_cast<std::uint8_t>(key_version);
  std::size_t n = ciphertext_and_tag.size() >= kTagSize ? ciphertext_and_tag.size() - kTagSize : 0;
  h[24] = static_cast<std::uint8_t>(n >> 8);
  h[25] = static_cast<std::uint8_t>(n);
  return h;
}

std::vector<std::uint8_t> CiphertextBlob::encode() const {
  // Sized once and filled with memcpy (GCC 12 reports a false
  // -Warray-bounds for vector::insert from a std::array here).
  const auto h = header_bytes();
  std::vector<std::uint8_t> out(kHeaderSize + kIvSize + ciphertext_and_tag.size());
  std::memcpy(out.data(), h.data(), kHeaderSize);
  std::memcpy(out.data() + kHeaderSize, iv.data(), kIvSize);
  if (!ciphertext_and_tag.empty()) {
    std::memcpy(out.data() + kHeaderSize + kIvSize, ciphertext_and_tag.data(), ciphertext_and_tag.size());
  }
  return out;
}

Result<CiphertextBlob, std::string> CiphertextBlob::decode(std::span<const std::uint8_t> b) {
  if (b.size() < kOverhead + 1) return unexpected(std::string("ciphertext blob too short"));
  if (std::memcmp(b.data(), kMagic, 4) != 0) {
    return unexpected(std::string("not a kmsfs ciphertext blob (bad magic or format)"));
  }
  std::size_t n = (static_cast<std::size_t>(b[24]) << 8) | b[25];
  if (n == 0 || n > kMaxPlaintext) return unexpected(std::string("ciphertext length out of range"));
  if (b.size() != kOverhead + n) {
    return unexpected("ciphertext blob is " + std::to_string(b.size()) + " bytes, expected " +
                      std::to_string(kOverhead + n));
  }
  CiphertextBlob out;
  std::memcpy(out.key_uuid.data(), b.data() + 4, 16);
  out.key_version = (static_cast<std::uint32_t>(b[20]) << 24) |
                    (static_cast<std::uint32_t>(b[21]) << 16) |
                    (static_cast<std::uint32_t>(b[22]) << 8) | b[23];
  if (out.key_version == 0) return unexpected(std::string("key version 0 is invalid"));
  std::memcpy(out.iv.data(), b.data() + kHeaderSize, kIvSize);
  out.ciphertext_and_tag.assign(b.begin() + kHeaderSize + kIvSize, b.end());
  return out;
}

std::string uuid_to_string(const std::array<std::uint8_t, 16>& u) {
  std::string hex = crypto::to_hex(u);
  return hex.substr(0, 8) + "-" + hex.substr(8, 4) + "-" + hex.substr(12, 4) + "-" +
         hex.substr(16, 4) + "-" + hex.substr(20, 12);
}

std::optional<std::array<std::uint8_t, 16>> uuid_from_string(const std::string& s) {
  if (s.size() != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') {
    return std::nullopt;
  }
  std::string hex = s.substr(0, 8) + s.substr(9, 4) + s.substr(14, 4) + s.substr(19, 4) +
                    s.substr(24, 12);
  for (char c : hex) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return std::nullopt;  // lower case only
  }
  auto bytes = crypto::from_hex(hex);
  if (!bytes) return std::nullopt;
  std::array<std::uint8_t, 16> out{};
  std::memcpy(out.data(), bytes->data(), 16);
  return out;
}

}  // namespace kmsfs::keyclient
