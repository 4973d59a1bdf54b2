#include "crypto/secure_buffer.h"

#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace kmsfs::crypto {

namespace {

std::uint8_t* allocate(std::size_t n) {
  if (n == 0) return nullptr;
  void* p = std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  // Best effort: an unprivileged process may exceed RLIMIT_MEMLOCK. The
  // buffer is still cleansed on free; the failure is not an error.
  (void)::mlock(p, n);
#ifdef MADV_DONTDUMP
  // madvise needs page alignment; only whole pages inside the block qualify.
  auto start = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t page = 4096;
  std::uintptr_t first = (start + page - 1) & ~(page - 1);
  std::uintptr_t last = (start + n) & ~(page - 1);
  if (last > first) (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTDUMP);
#endif
  return static_cast<std::uint8_t*>(p);
}

void release(std::uint8_t* p, std::size_t n) {
  if (p == nullptr) return;
  OPENSSL_cleanse(p, n);
  (void)::munlock(p, n);
  std::free(p);
}

}  // namespace

SecureBuffer::SecureBuffer(std::size_t size)
    : data_(allocate(size)), size_(size), capacity_(size) {
  if (data_ != nullptr) std::memset(data_, 0, size_);
}

SecureBuffer::SecureBuffer(const std::uint8_t* data, std::size_t size)
    : data_(allocate(size)), size_(size), capacity_(size) {
  if (size != 0) std::memcpy(data_, data, size);
}

SecureBuffer::~SecureBuffer() { release(data_, capacity_); }

SecureBuffer::SecureBuffer(SecureBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      capacity_(std::exchange(other.capacity_, 0)) {}

SecureBuffer& SecureBuffer::operator=(SecureBuffer&& other) noexcept {
  if (this != &other) {
    release(data_, capacity_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void SecureBuffer::shrink(std::size_t new_size) {
  if (new_size >= size_) return;
  OPENSSL_cleanse(data_ + new_size, size_ - new_size);
  size_ = new_size;
}

void SecureBuffer::clear() {
  release(data_, capacity_);
  data_ = nullptr;
  size_ = capacity_ = 0;
}

bool SecureBuffer::operator==(const SecureBuffer& o) const {
  return size_ == o.size_ && (size_ == 0 || CRYPTO_memcmp(data_, o.data_, size_) == 0);
}

}  // namespace kmsfs::crypto
