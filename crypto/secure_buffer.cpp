#include "crypto/secure_buffer.h"

#include <openssl/crypto.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kmsfs::crypto {

namespace {

// mlock/munlock do not nest: the kernel keeps one "locked" bit per page, and
// one munlock unlocks the whole page. Small buffers share heap pages with
// each other, so freeing one secret used to unlock the page under a
// neighbouring live secret. The lock is therefore counted per page: a page
// is locked (and excluded from core dumps) when its first secure buffer
// arrives and unlocked when its last one goes. This table is process-wide
// because page locks are process-wide; it is not a service locator.
class PageLocks {
 public:
  void acquire(std::uintptr_t addr, std::size_t n) {
    std::lock_guard<std::mutex> guard(mu_);
    for (std::uintptr_t page = first_page(addr); page < end_page(addr, n); page += page_size_) {
      if (count_[page]++ == 0) lock_page(page);
    }
  }
  void release(std::uintptr_t addr, std::size_t n) {
    std::lock_guard<std::mutex> guard(mu_);
    for (std::uintptr_t page = first_page(addr); page < end_page(addr, n); page += page_size_) {
      auto it = count_.find(page);
      if (it == count_.end()) continue;  // cannot happen: acquire counted it
      if (--it->second == 0) {
        count_.erase(it);
        unlock_page(page);
      }
    }
  }

 private:
  std::uintptr_t first_page(std::uintptr_t addr) const { return addr & ~(page_size_ - 1); }
  std::uintptr_t end_page(std::uintptr_t addr, std::size_t n) const {
    return (addr + n + page_size_ - 1) & ~(page_size_ - 1);
  }
  // The page's lock state must change together with its count, so these run
  // under mu_. mlock/munlock/madvise on resident heap pages do no I/O and
  // take no other lock of ours, so holding mu_ here cannot deadlock.
  void lock_page(std::uintptr_t page) const {
    // Best effort: an unprivileged process may exceed RLIMIT_MEMLOCK. The
    // buffer is still cleansed on free; the failure is not an error.
    (void)::mlock(reinterpret_cast<void*>(page), page_size_);
#ifdef MADV_DONTDUMP
    (void)::madvise(reinterpret_cast<void*>(page), page_size_, MADV_DONTDUMP);
#endif
  }
  void unlock_page(std::uintptr_t page) const {
    (void)::munlock(reinterpret_cast<void*>(page), page_size_);
#ifdef MADV_DODUMP
    (void)::madvise(reinterpret_cast<void*>(page), page_size_, MADV_DODUMP);
#endif
  }

  const std::uintptr_t page_size_ = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  std::mutex mu_;
  std::unordered_map<std::uintptr_t, std::size_t> count_;  // guarded by mu_
};

PageLocks& page_locks() {
  // Never destroyed: secure buffers with static storage duration may be
  // freed after this function's statics would have been.
  static PageLocks* const locks = new PageLocks();
  return *locks;
}

// Small secrets (DEKs, PINs, unwrapped keys: at most kSmallMax bytes) come
// from an arena of anonymous mappings that are mlock'd and excluded from
// core dumps once, when they are mapped, and stay so for the process's
// life: allocating and freeing a DEK then costs no system call (the
// mlock/madvise/munlock/madvise per buffer were ~9 % of a KMS
// GenerateDataKey). Slots are cleansed on free like every secure buffer;
// the arena only grows to the peak number of live small secrets.
class SmallArena {
 public:
  static constexpr std::size_t kClasses[] = {64, 256, 1024};
  static constexpr std::size_t kSmallMax = 1024;
  static constexpr std::size_t kChunk = 64 * 1024;

  static int class_of(std::size_t n) {
    for (int i = 0; i < 3; ++i) {
      if (n <= kClasses[i]) return i;
    }
    return -1;
  }
  std::uint8_t* take(int cls) {
    std::lock_guard<std::mutex> guard(mu_);
    auto& fl = free_[cls];
    if (fl.empty()) refill(cls);
    std::uint8_t* p = fl.back();
    fl.pop_back();
    return p;
  }
  void give(std::uint8_t* p, int cls) {
    std::lock_guard<std::mutex> guard(mu_);
    free_[cls].push_back(p);
  }

 private:
  void refill(int cls) {
    void* m = ::mmap(nullptr, kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    // Best effort, as for the page-counted path (RLIMIT_MEMLOCK).
    (void)::mlock(m, kChunk);
#ifdef MADV_DONTDUMP
    (void)::madvise(m, kChunk, MADV_DONTDUMP);
#endif
    auto* base = static_cast<std::uint8_t*>(m);
    const std::size_t slot = kClasses[cls];
    free_[cls].reserve(free_[cls].size() + kChunk / slot);
    for (std::size_t off = 0; off + slot <= kChunk; off += slot) free_[cls].push_back(base + off);
  }

  std::mutex mu_;
  std::vector<std::uint8_t*> free_[3];  // guarded by mu_
};

SmallArena& small_arena() {
  static SmallArena* const arena = new SmallArena();  // never destroyed, like page_locks()
  return *arena;
}

std::uint8_t* allocate(std::size_t n) {
  if (n == 0) return nullptr;
  if (int cls = SmallArena::class_of(n); cls >= 0) return small_arena().take(cls);
  void* p = std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  page_locks().acquire(reinterpret_cast<std::uintptr_t>(p), n);
  return static_cast<std::uint8_t*>(p);
}

// `n` is the size given to allocate() (SecureBuffer's capacity_).
void release(std::uint8_t* p, std::size_t n) {
  if (p == nullptr) return;
  cleanse(p, n);
  if (int cls = SmallArena::class_of(n); cls >= 0) {
    small_arena().give(p, cls);
    return;
  }
  page_locks().release(reinterpret_cast<std::uintptr_t>(p), n);
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
  cleanse(data_ + new_size, size_ - new_size);
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

void cleanse(void* p, std::size_t n) noexcept {
  if (n != 0) ::explicit_bzero(p, n);
}

__attribute__((noinline)) void scrub_stack() noexcept {
  volatile std::uint8_t area[16384];
  cleanse(const_cast<std::uint8_t*>(area), sizeof area);
  // Keep the compiler from treating `area` as dead.
  __asm__ __volatile__("" : : "r"(area) : "memory");
}

}  // namespace kmsfs::crypto
