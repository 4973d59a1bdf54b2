#include "crypto/dontdump_heap.h"

#include <openssl/crypto.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>

#include "crypto/secure_buffer.h"

namespace kmsfs::crypto {

namespace {

// Every block starts with this header; the caller's pointer follows it, so
// it keeps malloc's 16-byte alignment.
struct alignas(16) Header {
  std::uint64_t size;   // usable bytes (after the header)
  std::uint32_t cls;    // size class, or kLarge
  std::uint32_t magic;  // kMagic while allocated
};
static_assert(sizeof(Header) == 16);

constexpr std::uint32_t kMagic = 0x6b6d7366;  // "kmsf"
constexpr std::uint32_t kLarge = 0xffffffff;
constexpr std::size_t kMinShift = 5;                 // 32-byte blocks
constexpr std::size_t kMaxShift = 16;                // 64 KiB blocks
constexpr std::size_t kClasses = kMaxShift - kMinShift + 1;
constexpr std::size_t kChunk = std::size_t{1} << 20;  // carved into small blocks

struct FreeBlock {
  FreeBlock* next;
};

struct Heap {
  std::mutex mutex;
  std::array<FreeBlock*, kClasses> free_lists{};
  std::uint8_t* bump = nullptr;  // the unused rest of the current chunk
  std::size_t bump_left = 0;
  std::map<std::uintptr_t, std::size_t> mappings;  // base -> length
};

Heap& heap() {
  // Never destroyed: OpenSSL frees memory from atexit handlers.
  static Heap* h = new Heap();
  return *h;
}

std::size_t page_size() {
  static const std::size_t p = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return p;
}

// A private anonymous mapping kept out of core dumps, locked if allowed.
void* map_private(std::size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  (void)::madvise(p, len, MADV_DONTDUMP);
  (void)::mlock(p, len);  // best effort: RLIMIT_MEMLOCK may forbid it
  return p;
}

std::size_t class_of(std::size_t total) {
  std::size_t shift = kMinShift;
  while ((std::size_t{1} << shift) < total) ++shift;
  return shift - kMinShift;
}

void* allocate(std::size_t n, const char*, int) noexcept {
  if (n == 0) n = 1;
  if (n > (std::size_t{1} << 62)) return nullptr;
  const std::size_t total = n + sizeof(Header);
  Heap& h = heap();
  Header* hdr = nullptr;
  if (total > (std::size_t{1} << kMaxShift)) {
    const std::size_t len = (total + page_size() - 1) / page_size() * page_size();
    void* p = map_private(len);
    if (p == nullptr) return nullptr;
    hdr = static_cast<Header*>(p);
    hdr->size = len - sizeof(Header);
    hdr->cls = kLarge;
    std::lock_guard lock(h.mutex);
    h.mappings.emplace(reinterpret_cast<std::uintptr_t>(p), len);
  } else {
    const std::size_t cls = class_of(total);
    const std::size_t block = std::size_t{1} << (cls + kMinShift);
    std::lock_guard lock(h.mutex);
    if (FreeBlock* f = h.free_lists[cls]; f != nullptr) {
      h.free_lists[cls] = f->next;
      hdr = reinterpret_cast<Header*>(f);
    } else {
      if (h.bump_left < block) {
        // The rest of the old chunk is too small for this class: hand it to
        // the smaller classes' free lists, then map a new chunk.
        while (h.bump_left >= (std::size_t{1} << kMinShift)) {
          std::size_t c = class_of(h.bump_left + 1) - 1;  // largest class that fits
          const std::size_t b = std::size_t{1} << (c + kMinShift);
          auto* fb = reinterpret_cast<FreeBlock*>(h.bump);
          fb->next = h.free_lists[c];
          h.free_lists[c] = fb;
          h.bump += b;
          h.bump_left -= b;
        }
        void* chunk = map_private(kChunk);
        if (chunk == nullptr) return nullptr;
        h.mappings.emplace(reinterpret_cast<std::uintptr_t>(chunk), kChunk);
        h.bump = static_cast<std::uint8_t*>(chunk);
        h.bump_left = kChunk;
      }
      hdr = reinterpret_cast<Header*>(h.bump);
      h.bump += block;
      h.bump_left -= block;
    }
    hdr->size = block - sizeof(Header);
    hdr->cls = static_cast<std::uint32_t>(cls);
  }
  hdr->magic = kMagic;
  return hdr + 1;
}

void release(void* p, const char*, int) noexcept {
  if (p == nullptr) return;
  Header* hdr = static_cast<Header*>(p) - 1;
  if (hdr->magic != kMagic) {
    // Not ours: a library handed OpenSSL a block of malloc(3)'s.
    std::free(p);
    return;
  }
  hdr->magic = 0;
  cleanse(p, hdr->size);
  Heap& h = heap();
  if (hdr->cls == kLarge) {
    const std::size_t len = hdr->size + sizeof(Header);
    {
      std::lock_guard lock(h.mutex);
      h.mappings.erase(reinterpret_cast<std::uintptr_t>(hdr));
    }
    ::munmap(hdr, len);
    return;
  }
  std::lock_guard lock(h.mutex);
  auto* f = reinterpret_cast<FreeBlock*>(hdr);
  f->next = h.free_lists[hdr->cls];
  h.free_lists[hdr->cls] = f;
}

void* reallocate(void* p, std::size_t n, const char* file, int line) noexcept {
  if (p == nullptr) return allocate(n, file, line);
  if (n == 0) {
    release(p, file, line);
    return nullptr;
  }
  Header* hdr = static_cast<Header*>(p) - 1;
  if (hdr->magic != kMagic) return std::realloc(p, n);  // malloc(3)'s, as in release()
  if (n <= hdr->size) return p;
  void* q = allocate(n, file, line);
  if (q == nullptr) return nullptr;  // p stays valid, as realloc(3) promises
  std::memcpy(q, p, hdr->size);
  release(p, file, line);
  return q;
}

}  // namespace

bool install_openssl_dontdump_heap() noexcept {
  return CRYPTO_set_mem_functions(allocate, reallocate, release) == 1;
}

bool in_dontdump_heap(const void* p) noexcept {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  Heap& h = heap();
  std::lock_guard lock(h.mutex);
  auto it = h.mappings.upper_bound(a);
  if (it == h.mappings.begin()) return false;
  --it;
  return a < it->first + it->second;
}

}  // namespace kmsfs::crypto
