#include "crypto/secure_buffer.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace kmsfs::crypto {
namespace {

TEST(SecureBuffer, DefaultIsEmpty) {
  SecureBuffer b;
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.size(), 0u);
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_TRUE(b.span().empty());
  EXPECT_EQ(b.view(), "");
}

TEST(SecureBuffer, SizedIsZeroFilled) {
  SecureBuffer b(32);
  ASSERT_EQ(b.size(), 32u);
  for (std::uint8_t c : b.span()) EXPECT_EQ(c, 0);
}

TEST(SecureBuffer, CopiesFromBytesAndString) {
  const std::uint8_t raw[] = {1, 2, 3, 4};
  SecureBuffer a(raw, sizeof raw);
  EXPECT_EQ(a.size(), 4u);
  EXPECT_EQ(a.data()[3], 4);
  SecureBuffer b = SecureBuffer::from(std::span<const std::uint8_t>(raw));
  EXPECT_EQ(a, b);
  SecureBuffer s = SecureBuffer::from_string("pin-1234");
  EXPECT_EQ(s.view(), "pin-1234");
  EXPECT_NE(static_cast<const void*>(s.data()), nullptr);
}

TEST(SecureBuffer, FromEmptyStringIsEmpty) {
  SecureBuffer s = SecureBuffer::from_string("");
  EXPECT_TRUE(s.empty());
}

TEST(SecureBuffer, MoveConstructionTransfersOwnership) {
  SecureBuffer a = SecureBuffer::from_string("secret");
  const std::uint8_t* p = a.data();
  SecureBuffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(b.view(), "secret");
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(a.data(), nullptr);
}

TEST(SecureBuffer, MoveAssignmentReleasesOldContents) {
  SecureBuffer a = SecureBuffer::from_string("first");
  SecureBuffer b = SecureBuffer::from_string("second secret");
  b = std::move(a);
  EXPECT_EQ(b.view(), "first");
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move)
}

TEST(SecureBuffer, SelfMoveAssignmentKeepsContents) {
  SecureBuffer a = SecureBuffer::from_string("keep");
  SecureBuffer& alias = a;
  a = std::move(alias);
  EXPECT_EQ(a.view(), "keep");
}

TEST(SecureBuffer, CloneIsDeepAndIndependent) {
  SecureBuffer a = SecureBuffer::from_string("abcdef");
  SecureBuffer c = a.clone();
  EXPECT_EQ(a, c);
  EXPECT_NE(a.data(), c.data());
  c.data()[0] = 'X';
  EXPECT_EQ(a.view(), "abcdef");
  EXPECT_EQ(c.view(), "Xbcdef");
  EXPECT_FALSE(a == c);
}

TEST(SecureBuffer, CloneOfEmptyIsEmpty) {
  SecureBuffer a;
  EXPECT_TRUE(a.clone().empty());
}

TEST(SecureBuffer, ShrinkCleansTail) {
  SecureBuffer a = SecureBuffer::from_string("0123456789");
  std::uint8_t* p = a.data();
  a.shrink(4);
  EXPECT_EQ(a.size(), 4u);
  EXPECT_EQ(a.view(), "0123");
  EXPECT_EQ(a.data(), p) << "shrink must not reallocate";
  // The tail is still owned by the buffer (capacity), so reading it is defined.
  for (std::size_t i = 4; i < 10; ++i) EXPECT_EQ(p[i], 0) << i;
}

TEST(SecureBuffer, ShrinkNeverGrows) {
  SecureBuffer a = SecureBuffer::from_string("abc");
  a.shrink(10);
  EXPECT_EQ(a.size(), 3u);
  a.shrink(3);
  EXPECT_EQ(a.view(), "abc");
  a.shrink(0);
  EXPECT_TRUE(a.empty());
}

TEST(SecureBuffer, ShrunkBufferClonesOnlyLogicalSize) {
  SecureBuffer a = SecureBuffer::from_string("abcdef");
  a.shrink(2);
  SecureBuffer c = a.clone();
  EXPECT_EQ(c.size(), 2u);
  EXPECT_EQ(c.view(), "ab");
}

TEST(SecureBuffer, ClearEmptiesAndIsRepeatable) {
  SecureBuffer a = SecureBuffer::from_string("gone");
  a.clear();
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(a.data(), nullptr);
  a.clear();
  EXPECT_TRUE(a.empty());
}

TEST(SecureBuffer, ComparesContentAndSize) {
  EXPECT_EQ(SecureBuffer::from_string("abc"), SecureBuffer::from_string("abc"));
  EXPECT_FALSE(SecureBuffer::from_string("abc") == SecureBuffer::from_string("abd"));
  EXPECT_FALSE(SecureBuffer::from_string("abc") == SecureBuffer::from_string("abcd"));
  EXPECT_FALSE(SecureBuffer::from_string("") == SecureBuffer::from_string("a"));
  EXPECT_EQ(SecureBuffer(), SecureBuffer::from_string(""));
  EXPECT_EQ(SecureBuffer(), SecureBuffer(0));
}

TEST(SecureBuffer, PrintsRedacted) {
  SecureBuffer a = SecureBuffer::from_string("hunter2");
  std::ostringstream os;
  os << a;
  EXPECT_EQ(os.str(), "<redacted>");
  EXPECT_EQ(os.str().find("hunter2"), std::string::npos);
  std::ostringstream empty;
  empty << SecureBuffer();
  EXPECT_EQ(empty.str(), "<redacted>");
}

// Locked memory of this process in KiB, from /proc/self/status (VmLck).
long locked_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

TEST(SecureBuffer, LocksItsMemory) {
  long before = locked_kib();
  if (before < 0) GTEST_SKIP() << "no VmLck in /proc/self/status";
  SecureBuffer a(2000);  // the heap path (small ones: SmallBuffersLiveInLockedMemory...)
  long during = locked_kib();
  if (during == before) GTEST_SKIP() << "mlock refused here (RLIMIT_MEMLOCK); best effort by design";
  EXPECT_GT(during, before);
}

TEST(SecureBuffer, FreeingOneBufferKeepsNeighbourOnSamePageLocked) {
  // mlock/munlock do not nest: one munlock unlocks the whole page. Two
  // heap secrets sharing a page must stay locked until the last one is
  // freed. (Buffers up to 1 KiB live in the always-locked arena; 1100 bytes
  // take the page-counted heap path.)
  constexpr std::size_t kSize = 1100;
  const long base = locked_kib();
  if (base < 0) GTEST_SKIP() << "no VmLck in /proc/self/status";
  {
    SecureBuffer probe(kSize);
    if (locked_kib() == base) GTEST_SKIP() << "mlock refused here; best effort by design";
  }
  const std::uintptr_t kPage = 4096;
  std::vector<std::unique_ptr<SecureBuffer>> pool;
  SecureBuffer* first = nullptr;
  SecureBuffer* second = nullptr;
  for (int i = 0; i < 512 && second == nullptr; ++i) {
    pool.push_back(std::make_unique<SecureBuffer>(kSize));
    auto page = reinterpret_cast<std::uintptr_t>(pool.back()->data()) / kPage;
    auto last = (reinterpret_cast<std::uintptr_t>(pool.back()->data()) + kSize - 1) / kPage;
    if (page != last) continue;
    for (auto& other : pool) {
      if (other.get() == pool.back().get()) continue;
      auto op = reinterpret_cast<std::uintptr_t>(other->data());
      if (op / kPage == page && (op + kSize - 1) / kPage == page) {
        first = other.get();
        second = pool.back().get();
        break;
      }
    }
  }
  if (second == nullptr) GTEST_SKIP() << "allocator never placed two buffers on one page";
  // Keep only the pair alive.
  std::unique_ptr<SecureBuffer> keep_first, keep_second;
  for (auto& p : pool) {
    if (p.get() == first) keep_first = std::move(p);
    if (p.get() == second) keep_second = std::move(p);
  }
  pool.clear();
  const long with_pair = locked_kib();
  ASSERT_GT(with_pair, base);
  keep_first.reset();
  EXPECT_GT(locked_kib(), base) << "freeing one buffer unlocked its neighbour's page";
  keep_second.reset();
  EXPECT_EQ(locked_kib(), base);
}

// "Locked:" of the mapping that holds `addr`, in KiB, from /proc/self/smaps.
long locked_kib_of_mapping(const void* addr) {
  std::ifstream in("/proc/self/smaps");
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find('-') < 17) {
      inside = a >= lo && a < hi;
      continue;
    }
    if (inside && line.rfind("Locked:", 0) == 0) return std::stol(line.substr(7));
  }
  return -1;
}

TEST(SecureBuffer, SmallBuffersLiveInLockedMemoryAndAreReused) {
  {
    SecureBuffer probe(32);
    const long locked = locked_kib_of_mapping(probe.data());
    if (locked < 0) GTEST_SKIP() << "no smaps here";
    if (locked == 0) GTEST_SKIP() << "mlock refused here (RLIMIT_MEMLOCK); best effort by design";
    EXPECT_GT(locked, 0);
  }
  // Across the size classes: zero-filled, independent, round-trips.
  for (std::size_t n : {1u, 32u, 64u, 65u, 256u, 257u, 1024u, 1025u}) {
    SecureBuffer a(n);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(a.data()[i], 0) << n;
    std::memset(a.data(), 0xab, n);
    SecureBuffer b = a.clone();
    EXPECT_TRUE(a == b);
    a.clear();
    SecureBuffer c(n);  // may take a's slot: cleansed, then zero-filled
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(c.data()[i], 0) << n;
    EXPECT_EQ(b.data()[n - 1], 0xab);
  }
}

// Two frames of one size called from one caller share their stack area:
// the second sees what the first left there.
constexpr std::uint8_t kMark = 0xa5;
__attribute__((noinline)) void leave_mark_on_stack() {
  volatile std::uint8_t area[4096];
  for (auto& b : area) b = kMark;
  __asm__ __volatile__("" : : "r"(area) : "memory");
}
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
__attribute__((noinline)) std::size_t marks_left_on_stack() {
  volatile std::uint8_t area[4096];
  __asm__ __volatile__("" : : "r"(area) : "memory");
  std::size_t n = 0;
  for (const auto& b : area) n += b == kMark ? 1 : 0;
  return n;
}
#pragma GCC diagnostic pop

TEST(ScrubStack, ZeroesWhatReturnedFramesLeftBelowTheCaller) {
  leave_mark_on_stack();
  if (marks_left_on_stack() < 4000) GTEST_SKIP() << "this build does not reuse stack frames (sanitizer fake stacks)";
  leave_mark_on_stack();
  scrub_stack();
  EXPECT_EQ(marks_left_on_stack(), 0u);
}

}  // namespace
}  // namespace kmsfs::crypto
