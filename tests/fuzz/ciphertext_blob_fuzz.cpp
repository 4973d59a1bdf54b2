// libFuzzer target: the KMS ciphertext blob parser
// (keyclient/ciphertext_blob.h, docs/format.md §4). A blob that parses must
// re-encode to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "keyclient/ciphertext_blob.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using kmsfs::keyclient::CiphertextBlob;
  auto b = CiphertextBlob::decode(std::span(data, size));
  if (!b) return 0;
  auto again = b->encode();
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) std::abort();
  if (b->ciphertext_and_tag.size() < CiphertextBlob::kTagSize + 1) std::abort();
  (void)b->header_bytes();
  (void)kmsfs::keyclient::uuid_to_string(b->key_uuid);
  return 0;
}
