// libFuzzer target: the 128-byte file header codec (crypto/file_header.h).
// A header that decodes must re-encode to the same 128 bytes: every byte
// has exactly one valid value (docs/format.md §2).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "crypto/file_header.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto h = kmsfs::crypto::FileHeader::decode(std::span(data, size));
  if (!h) return 0;
  if (size < kmsfs::crypto::FileHeader::kSize) std::abort();  // accepted a short header
  if (h->wrapped_key.empty() || h->wrapped_key.size() > kmsfs::crypto::FileHeader::kMaxWrappedKeySize) std::abort();
  auto again = h->encode();
  if (std::memcmp(again.data(), data, again.size()) != 0) std::abort();  // not canonical
  return 0;
}
