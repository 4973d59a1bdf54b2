#include "fs/thread_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace kmsfs::fs {

void prefault(void* p, std::size_t n) {
  static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) & ~(page - 1);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
}

std::uint8_t* ThreadBuffer::get(std::size_t n) {
  if (n > n_) {
    // Whole 64 KiB steps: a file's requests vary a little in size.
    const std::size_t size = (n + 0xffff) & ~static_cast<std::size_t>(0xffff);
    p_.reset(new std::uint8_t[size]);  // not value-initialised: no zero fill
    n_ = size;
    prefault(p_.get(), n_);
  }
  return p_.get();
}

}  // namespace kmsfs::fs
