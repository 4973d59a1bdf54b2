#pragma once
// SecureBuffer: the only home of secrets (DEKs, PINs, plaintext key
// material). Its pages are mlock'd (best effort: RLIMIT_MEMLOCK may refuse,
// which is logged once by the caller's choice, never fatal), excluded from
// core dumps (MADV_DONTDUMP) and cleansed with OPENSSL_cleanse before the
// memory is returned. It is move-only and prints as "<redacted>".

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <span>
#include <string_view>

namespace kmsfs::crypto {

class SecureBuffer {
 public:
  SecureBuffer() = default;
  explicit SecureBuffer(std::size_t size);
  SecureBuffer(const std::uint8_t* data, std::size_t size);
  static SecureBuffer from(std::span<const std::uint8_t> data) {
    return SecureBuffer(data.data(), data.size());
  }
  static SecureBuffer from_string(std::string_view s) {
    return SecureBuffer(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
  }
  ~SecureBuffer();

  SecureBuffer(const SecureBuffer&) = delete;
  SecureBuffer& operator=(const SecureBuffer&) = delete;
  SecureBuffer(SecureBuffer&& other) noexcept;
  SecureBuffer& operator=(SecureBuffer&& other) noexcept;

  // An explicit deep copy, so that copies of secrets are visible in review.
  SecureBuffer clone() const { return SecureBuffer(data_, size_); }

  std::uint8_t* data() { return data_; }
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<std::uint8_t> span() { return {data_, size_}; }
  std::span<const std::uint8_t> span() const { return {data_, size_}; }
  std::string_view view() const {
    return {reinterpret_cast<const char*>(data_), size_};
  }
  // Shrinks the logical size (the tail is cleansed); never grows.
  void shrink(std::size_t new_size);
  // Cleanses and frees now.
  void clear();

  bool operator==(const SecureBuffer& o) const;

 private:
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

// Zeroes `n` bytes at `p` in a way the compiler cannot drop (explicit_bzero:
// glibc's vectorised memset, ~7x faster than OPENSSL_cleanse's 8-byte loop
// on a 16 KiB area, which made scrub_stack 5 % of a write-heavy mount's CPU).
void cleanse(void* p, std::size_t n) noexcept;

// Zeroes the 16 KiB of stack below the caller's frame: what functions that
// returned meanwhile left there (OpenSSL's key set-up, a KMS call) is
// gone afterwards. Thread stacks are dumpable memory; called after the
// operations that handle a raw key.
void scrub_stack() noexcept;

inline std::ostream& operator<<(std::ostream& os, const SecureBuffer&) {
  return os << "<redacted>";
}

}  // namespace kmsfs::crypto
