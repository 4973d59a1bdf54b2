// libFuzzer target: key metadata records as stored under the KMS state
// directory (keyclient/key_store.h, key_record_from_json): a damaged or
// hostile record file must be refused with a reason, and a record that
// loads must serialise and load back to the same JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "keyclient/key_store.h"

namespace kc = kmsfs::keyclient;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto rec = kc::key_record_from_json(text);
  if (!rec) {
    if (rec.error().empty()) std::abort();
    return 0;
  }
  const std::string once = kc::key_record_to_json(*rec);
  auto back = kc::key_record_from_json(once);
  if (!back) std::abort();  // what we write, we read
  if (kc::key_record_to_json(*back) != once) std::abort();
  return 0;
}
