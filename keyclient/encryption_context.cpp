#include "keyclient/encryption_context.h"

namespace kmsfs::keyclient {

namespace {
void put32(std::vector<std::uint8_t>& out, std::size_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}
}  // namespace

std::vector<std::uint8_t> canonical_encryption_context(const EncryptionContext& ctx) {
  std::vector<std::uint8_t> out;
  put32(out, ctx.size());
  for (const auto& [k, v] : ctx) {
    put32(out, k.size());
    out.insert(out.end(), k.begin(), k.end());
    put32(out, v.size());
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

}  // namespace kmsfs::keyclient
