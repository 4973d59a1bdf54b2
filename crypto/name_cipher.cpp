#include "crypto/name_cipher.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <stdexcept>

#include "crypto/encoding.h"
#include "crypto/openssl_handles.h"

namespace kmsfs::crypto {

namespace {

using Block = std::array<std::uint8_t, 16>;

EVP_CIPHER* fetched(const char* name) {
  EVP_CIPHER* c = EVP_CIPHER_fetch(nullptr, name, nullptr);
  if (c == nullptr) throw std::runtime_error(std::string("OpenSSL lacks ") + name);
  return c;
}
const EVP_CIPHER* aes256_ecb() {
  static const EvpCipherPtr c(fetched("AES-256-ECB"));
  return c.get();
}
const EVP_CIPHER* aes256_ctr() {
  static const EvpCipherPtr c(fetched("AES-256-CTR"));
  return c.get();
}

std::span<const std::uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

// Doubling in GF(2^128) (RFC 5297 section 2.3; RFC 4493's subkey step).
void dbl(Block& b) {
  const std::uint8_t carry = b[0] >> 7;
  for (std::size_t i = 0; i < 15; ++i) b[i] = static_cast<std::uint8_t>((b[i] << 1) | (b[i + 1] >> 7));
  b[15] = static_cast<std::uint8_t>((b[15] << 1) ^ (carry != 0 ? 0x87 : 0));
}

std::atomic<std::uint64_t> next_cipher_id{1};

// One thread's AES contexts under one NameCipher's key: the key schedules
// are made once per thread instead of per name (a fresh AES-SIV context per
// name fetched and keyed CMAC and CTR each time: a third of the mount's CPU
// in rm -rf). One slot per thread: another cipher's state is freed (and
// cleansed) when a thread moves to it.
struct SivState {
  std::uint64_t owner = 0;
  EvpCipherCtxPtr ecb;  // AES-256 under K1 (S2V's CMAC)
  EvpCipherCtxPtr ctr;  // AES-256-CTR under K2
  Block sub1{}, sub2{};  // CMAC subkeys of K1
  Block d0{};            // CMAC(K1, 0^128), S2V's start

  SivState() = default;
  SivState(const SivState&) = delete;
  SivState& operator=(const SivState&) = delete;
  ~SivState() { clear(); }
  void clear() {
    ecb.reset();  // EVP_CIPHER_CTX_free cleanses the key schedule
    ctr.reset();
    OPENSSL_cleanse(sub1.data(), sub1.size());
    OPENSSL_cleanse(sub2.data(), sub2.size());
    OPENSSL_cleanse(d0.data(), d0.size());
    owner = 0;
  }

  void encrypt_block(const std::uint8_t* in, std::uint8_t* out) {
    int len = 0;
    if (EVP_EncryptUpdate(ecb.get(), out, &len, in, 16) != 1 || len != 16) {
      throw std::runtime_error("AES block encryption failed");
    }
  }

  // CMAC(K1, m) (RFC 4493); with `xorend`, of m with it XORed into m's
  // last 16 bytes (S2V's "xorend", without a copy of m).
  Block cmac(std::span<const std::uint8_t> m, const Block* xorend = nullptr) {
    const std::size_t tail = xorend != nullptr ? m.size() - 16 : m.size();
    auto at = [&](std::size_t i) -> std::uint8_t {
      return i < tail ? m[i] : static_cast<std::uint8_t>(m[i] ^ (*xorend)[i - tail]);
    };
    Block x{};
    std::size_t n = (m.size() + 15) / 16;
    const bool complete = n > 0 && m.size() % 16 == 0;
    if (n == 0) n = 1;
    for (std::size_t i = 0; i + 1 < n; ++i) {
      for (std::size_t j = 0; j < 16; ++j) x[j] ^= at(16 * i + j);
      encrypt_block(x.data(), x.data());
    }
    const std::size_t last = 16 * (n - 1);
    const std::size_t rest = m.size() - last;
    for (std::size_t j = 0; j < 16; ++j) {
      std::uint8_t b = j < rest ? at(last + j) : (j == rest ? 0x80 : 0);
      x[j] ^= b ^ (complete ? sub1[j] : sub2[j]);
    }
    encrypt_block(x.data(), x.data());
    return x;
  }

  // S2V(K1, ad, p) (RFC 5297 section 2.4) with one associated-data string.
  Block s2v(std::span<const std::uint8_t> ad, std::span<const std::uint8_t> p) {
    Block d = d0;
    dbl(d);
    const Block a = cmac(ad);
    for (std::size_t j = 0; j < 16; ++j) d[j] ^= a[j];
    if (p.size() >= 16) return cmac(p, &d);  // CMAC(p xorend d)
    dbl(d);
    for (std::size_t j = 0; j < 16; ++j) d[j] ^= j < p.size() ? p[j] : (j == p.size() ? 0x80 : 0);
    return cmac(d);
  }

  // AES-CTR(K2) from the synthetic IV with its two counter bits cleared.
  void ctr_xor(const Block& v, std::span<const std::uint8_t> in, std::uint8_t* out) {
    Block q = v;
    q[8] &= 0x7f;
    q[12] &= 0x7f;
    int len = 0;
    if (EVP_EncryptInit_ex2(ctr.get(), nullptr, nullptr, q.data(), nullptr) != 1 ||
        (!in.empty() && (EVP_EncryptUpdate(ctr.get(), out, &len, in.data(), static_cast<int>(in.size())) != 1 ||
                         static_cast<std::size_t>(len) != in.size()))) {
      throw std::runtime_error("AES-CTR failed");
    }
  }
};

SivState& siv_state(std::uint64_t id, const SecureBuffer& key) {
  thread_local SivState st;
  if (st.owner == id) return st;
  st.clear();
  st.ecb.reset(EVP_CIPHER_CTX_new());
  st.ctr.reset(EVP_CIPHER_CTX_new());
  if (!st.ecb || !st.ctr || EVP_EncryptInit_ex2(st.ecb.get(), aes256_ecb(), key.data(), nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(st.ecb.get(), 0) != 1 ||
      EVP_EncryptInit_ex2(st.ctr.get(), aes256_ctr(), key.data() + 32, nullptr, nullptr) != 1) {
    st.clear();
    throw std::runtime_error("cannot key AES for the name cipher");
  }
  Block l{};
  st.encrypt_block(l.data(), l.data());  // L = AES(K1, 0^128)
  dbl(l);
  st.sub1 = l;
  dbl(l);
  st.sub2 = l;
  OPENSSL_cleanse(l.data(), l.size());
  const Block zero{};
  st.d0 = st.cmac(zero);
  st.owner = id;
  scrub_stack();  // the key expansion's temporaries
  return st;
}

}  // namespace

NameCipher::NameCipher(SecureBuffer key) : key_(std::move(key)), id_(next_cipher_id.fetch_add(1)) {
  if (key_.size() != kKeySize) throw std::invalid_argument("AES-256-SIV needs a 64-byte key");
  (void)aes256_ecb();
  (void)aes256_ctr();
}

// AES-256-SIV (RFC 5297): S2V with CMAC under the key's first half, CTR
// under its second half; the same bytes as OpenSSL's "AES-256-SIV" with the
// associated data as one component (tested against it).
std::vector<std::uint8_t> NameCipher::siv_encrypt(std::span<const std::uint8_t> plain,
                                                  std::span<const std::uint8_t> ad) const {
  if (plain.size() > INT_MAX || ad.size() > INT_MAX) throw std::runtime_error("AES-SIV input too large");
  SivState& st = siv_state(id_, key_);
  const Block v = st.s2v(ad, plain);
  std::vector<std::uint8_t> out(kTagSize + plain.size());
  std::copy(v.begin(), v.end(), out.begin());
  st.ctr_xor(v, plain, out.data() + kTagSize);
  return out;
}

std::optional<std::vector<std::uint8_t>> NameCipher::siv_decrypt(
    std::span<const std::uint8_t> sealed, std::span<const std::uint8_t> ad) const {
  if (sealed.size() < kTagSize || sealed.size() > INT_MAX || ad.size() > INT_MAX) return std::nullopt;
  SivState& st = siv_state(id_, key_);
  Block v{};
  std::copy(sealed.begin(), sealed.begin() + kTagSize, v.begin());
  std::vector<std::uint8_t> out(sealed.size() - kTagSize);
  st.ctr_xor(v, sealed.subspan(kTagSize), out.data());
  const Block t = st.s2v(ad, out);
  if (CRYPTO_memcmp(t.data(), v.data(), kTagSize) != 0) {
    OPENSSL_cleanse(out.data(), out.size());
    return std::nullopt;
  }
  return out;
}

std::string NameCipher::encrypt_name(std::string_view name, DirIv dir_iv) const {
  return to_base64url(siv_encrypt(bytes_of(name), dir_iv));
}

std::optional<std::string> NameCipher::decrypt_name(std::string_view encrypted, DirIv dir_iv) const {
  auto raw = from_base64url(encrypted);
  if (!raw) return std::nullopt;
  auto plain = siv_decrypt(*raw, dir_iv);
  if (!plain) return std::nullopt;
  return std::string(plain->begin(), plain->end());
}

std::vector<std::uint8_t> NameCipher::seal(std::span<const std::uint8_t> plain, std::string_view ad) const {
  return siv_encrypt(plain, bytes_of(ad));
}

std::optional<std::vector<std::uint8_t>> NameCipher::open(std::span<const std::uint8_t> sealed,
                                                          std::string_view ad) const {
  return siv_decrypt(sealed, bytes_of(ad));
}

}  // namespace kmsfs::crypto
