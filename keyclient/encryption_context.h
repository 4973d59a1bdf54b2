#pragma once
// The encryption context and its canonical byte form, used as GCM AAD:
//
//   u32 pair count ‖ for each pair, sorted by key (bytewise):
//       u32 key length ‖ key bytes ‖ u32 value length ‖ value bytes
//
// (big-endian). Length prefixes keep {"ab":"c"} and {"a":"bc"} apart.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kmsfs::keyclient {

// std::map<std::string> orders keys bytewise (char_traits<char>::compare is
// memcmp-like), which is exactly the canonical order.
using EncryptionContext = std::map<std::string, std::string>;

std::vector<std::uint8_t> canonical_encryption_context(const EncryptionContext& ctx);

}  // namespace kmsfs::keyclient
