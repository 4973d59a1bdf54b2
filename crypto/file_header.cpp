#include "crypto/file_header.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "crypto/encoding.h"

namespace kmsfs::crypto {

namespace {
constexpr std::size_t kMagicLen = 8;
constexpr std::size_t kOffVersion = 8;
constexpr std::size_t kOffFlags = 10;
constexpr std::size_t kOffFileId = 12;
constexpr std::size_t kOffKeyLen = 28;
constexpr std::size_t kOffKey = 30;
constexpr std::size_t kOffReserved = kOffKey + FileHeader::kMaxWrappedKeySize;  // 126
static_assert(kOffReserved + 2 == FileHeader::kSize);

std::uint16_t get16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}
void put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}
}  // namespace

std::array<std::uint8_t, FileHeader::kSize> FileHeader::encode() const {
  if (wrapped_key.empty() || wrapped_key.size() > kMaxWrappedKeySize) {
    throw std::logic_error("FileHeader::encode: wrapped key size out of range");
  }
  std::array<std::uint8_t, kSize> out{};
  std::memcpy(out.data(), kMagic, kMagicLen);
  put16(out.data() + kOffVersion, kVersion);
  put16(out.data() + kOffFlags, 0);
  std::memcpy(out.data() + kOffFileId, file_id.data(), file_id.size());
  put16(out.data() + kOffKeyLen, static_cast<std::uint16_t>(wrapped_key.size()));
  std::memcpy(out.data() + kOffKey, wrapped_key.data(), wrapped_key.size());
  return out;
}

Result<FileHeader, std::string> FileHeader::decode(std::span<const std::uint8_t> b) {
  if (b.size() < kSize) {
    return unexpected("header truncated: " + std::to_string(b.size()) + " of " +
                      std::to_string(kSize) + " bytes");
  }
  if (std::memcmp(b.data(), kMagic, kMagicLen) != 0) return unexpected(std::string("bad header magic"));
  std::uint16_t version = get16(b.data() + kOffVersion);
  if (version != kVersion) {
    return unexpected("unsupported header version " + std::to_string(version));
  }
  std::uint16_t flags = get16(b.data() + kOffFlags);
  if (flags != 0) return unexpected("unknown header flags 0x" + to_hex(std::span(b.data() + kOffFlags, 2)));
  std::uint16_t key_len = get16(b.data() + kOffKeyLen);
  if (key_len == 0 || key_len > kMaxWrappedKeySize) {
    return unexpected("wrapped key length " + std::to_string(key_len) + " out of range");
  }
  const std::uint8_t* pad_begin = b.data() + kOffKey + key_len;
  const std::uint8_t* pad_end = b.data() + kSize;
  if (!std::all_of(pad_begin, pad_end, [](std::uint8_t c) { return c == 0; })) {
    return unexpected(std::string("non-zero padding or reserved bytes"));
  }
  FileHeader h;
  std::memcpy(h.file_id.data(), b.data() + kOffFileId, h.file_id.size());
  h.wrapped_key.assign(b.data() + kOffKey, b.data() + kOffKey + key_len);
  return h;
}

std::string file_id_hex(const FileId& id) { return to_hex(id); }

}  // namespace kmsfs::crypto
