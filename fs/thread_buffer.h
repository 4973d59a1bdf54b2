#pragma once
// Scratch memory for the request paths, and page prefaulting.
//
// A new buffer's pages are faulted in with one madvise(MADV_POPULATE_WRITE)
// instead of one page fault per 4 KiB on first touch: on virtual machines
// (shadow or paravirtual paging) a fault costs microseconds, and the first
// large write after a mount used to spend more time faulting in the worker
// threads' 1 MiB buffers than encrypting. The memory is not zero-filled.

#include <cstddef>
#include <cstdint>
#include <memory>

namespace kmsfs::fs {

// Faults in the whole pages inside [p, p + n) for writing. Best effort:
// kernels before 5.14 refuse it, and the pages then fault on first touch.
void prefault(void* p, std::size_t n);

// One per thread and purpose: grows to the largest size asked for, never
// shrinks.
class ThreadBuffer {
 public:
  std::uint8_t* get(std::size_t n);

 private:
  std::unique_ptr<std::uint8_t[]> p_;
  std::size_t n_ = 0;
};

}  // namespace kmsfs::fs
