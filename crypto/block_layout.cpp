#include "crypto/block_layout.h"

namespace kmsfs::crypto::block_layout {

static_assert(plain_size(0) == 0);
static_assert(plain_size(kHeaderSize) == 0);
static_assert(plain_size(stored_size(1)) == 1);
static_assert(plain_size(stored_size(kBlockSize)) == kBlockSize);
static_assert(plain_size(stored_size(kBlockSize + 1)) == kBlockSize + 1);
static_assert(stored_size(0, false) == 0);

}  // namespace kmsfs::crypto::block_layout
