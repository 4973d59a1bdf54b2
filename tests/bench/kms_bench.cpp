// kms_bench: throughput and latency of the KMS operations the filesystem
// depends on (issue #6), and of the HSM's own AES-GCM as their ceiling.
//
//   kms_bench --mode service --kms embedded   --home DIR --key KEY [--threads N] [--seconds S]
//   kms_bench --mode service --kms unix:SOCK  --home DIR --key KEY ...
//   kms_bench --mode hsm --home DIR ...
//
// "service" drives KeyService::generate_data_key and ::decrypt with the
// encryption context kmsfs uses ({"kmsfs:fs", "kmsfs:file"}); "hsm" drives
// Pkcs11Hsm::encrypt_gcm / decrypt_gcm directly on the token of the embedded
// home DIR with a 32-byte plaintext and an AAD as long as a real wrap's, so
// it is the rate no KMS built on that HSM can beat. Each (operation, thread
// count) prints one JSON line on stdout:
//
//   {"via":"embedded","op":"GenerateDataKey","threads":1,"ops":1234,"seconds":2.0,
//    "ops_per_s":617.0,"p50_us":1500.2,"p99_us":2900.1,"errors":0}
//
// A benchmark, not a test: never registered with ctest. Exit 0 on success,
// 1 when the service or the HSM cannot be reached or an operation fails
// before the measurement starts, 2 on a usage error.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "keyclient/hsm.h"
#include "keyclient/key_service.h"
#include "keyclient/kms_home.h"
#include "keyclient/kms_options.h"
#include "keyclient/pkcs11_hsm.h"

#ifndef KMSFS_DEFAULT_PKCS11_MODULE
#define KMSFS_DEFAULT_PKCS11_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#endif

namespace kmsfs::bench {
namespace {

using keyclient::Bytes;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string mode = "service";  // service | hsm
  std::string kms = "embedded";  // embedded | unix:PATH
  std::string home;
  std::string key = "alias/bench";
  std::string via;               // label in the output; default derived from kms/mode
  std::vector<unsigned> threads{1};
  double seconds = 2.0;
  std::string ops = "GenerateDataKey,Decrypt";
};

// One measured operation; returns false on failure. Called concurrently,
// with the worker's index (0..threads-1) and a per-worker counter.
using Operation = std::function<bool(unsigned worker, std::uint64_t i)>;

struct Measurement {
  std::uint64_t ops = 0;
  std::uint64_t errors = 0;
  double seconds = 0;
  double p50_us = 0;
  double p99_us = 0;
};

double percentile(std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const auto idx = static_cast<std::size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(idx, sorted.size() - 1)];
}

// Runs `op` on `threads` workers for `seconds` and gathers every latency.
Measurement measure(const Operation& op, unsigned threads, double seconds) {
  std::vector<std::vector<double>> lat(threads);
  std::vector<std::uint64_t> errors(threads, 0);
  std::atomic<bool> go{false};
  const auto budget = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  Clock::time_point start;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned w = 0; w < threads; ++w) {
    pool.emplace_back([&, w] {
      lat[w].reserve(1 << 16);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      const auto deadline = start + budget;
      for (std::uint64_t i = 0;; ++i) {
        const auto t0 = Clock::now();
        if (t0 >= deadline) break;
        const bool ok = op(w, i);
        const auto t1 = Clock::now();
        if (!ok) {
          ++errors[w];
          continue;
        }
        lat[w].push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
    });
  }
  start = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> all;
  Measurement m;
  for (unsigned w = 0; w < threads; ++w) {
    all.insert(all.end(), lat[w].begin(), lat[w].end());
    m.errors += errors[w];
  }
  std::sort(all.begin(), all.end());
  m.ops = all.size();
  m.seconds = elapsed;
  m.p50_us = percentile(all, 0.50);
  m.p99_us = percentile(all, 0.99);
  return m;
}

void print(const std::string& via, const std::string& op, unsigned threads, const Measurement& m) {
  std::printf(
      "{\"via\":\"%s\",\"op\":\"%s\",\"threads\":%u,\"ops\":%llu,\"seconds\":%.3f,"
      "\"ops_per_s\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"errors\":%llu}\n",
      via.c_str(), op.c_str(), threads, static_cast<unsigned long long>(m.ops), m.seconds,
      m.seconds > 0 ? static_cast<double>(m.ops) / m.seconds : 0.0, m.p50_us, m.p99_us,
      static_cast<unsigned long long>(m.errors));
  std::fflush(stdout);
}

bool wants(const Options& o, const std::string& op) {
  return ("," + o.ops + ",").find("," + op + ",") != std::string::npos;
}

// The context kmsfs sends: a fixed filesystem id, one file id per call.
keyclient::EncryptionContext file_context(unsigned worker, std::uint64_t i) {
  char file_id[40];
  std::snprintf(file_id, sizeof file_id, "%08x%024llx", worker, static_cast<unsigned long long>(i));
  return {{"kmsfs:fs", "00112233445566778899aabbccddeeff"}, {"kmsfs:file", file_id}};
}

int run_service(const Options& o) {
  keyclient::KmsOptions ko;
  ko.spec = o.kms;
  ko.home = o.home;
  auto svc = keyclient::make_key_service(ko);
  if (!svc) {
    std::cerr << "kms_bench: cannot reach the KMS '" << o.kms << "': " << svc.error().to_string() << "\n";
    return 1;
  }
  keyclient::KeyService& ks = **svc;
  const std::string via = o.via.empty() ? (o.kms == "embedded" ? "embedded" : "kmsd") : o.via;

  // Warm-up and a check that the key wraps at all, outside the measurement.
  keyclient::GenerateDataKeyRequest probe;
  probe.key_id = o.key;
  probe.key_spec = "AES_256";
  probe.encryption_context = file_context(999, 0);
  auto p = ks.generate_data_key(probe);
  if (!p) {
    std::cerr << "kms_bench: GenerateDataKey on " << o.key << " failed: " << p.error().to_string() << "\n";
    return 1;
  }

  // Blobs for Decrypt: one set per worker, reused round-robin (kmsfs's cold
  // opens decrypt a different blob each time; the core keeps no plaintext
  // cache, so reuse does not flatter it).
  constexpr std::uint64_t kBlobs = 32;
  const unsigned max_threads = *std::max_element(o.threads.begin(), o.threads.end());
  std::vector<std::vector<std::pair<Bytes, keyclient::EncryptionContext>>> blobs(max_threads);
  if (wants(o, "Decrypt")) {
    for (unsigned w = 0; w < max_threads; ++w) {
      for (std::uint64_t i = 0; i < kBlobs; ++i) {
        keyclient::GenerateDataKeyRequest r;
        r.key_id = o.key;
        r.key_spec = "AES_256";
        r.encryption_context = file_context(w + 1000, i);
        auto g = ks.generate_data_key(r);
        if (!g) {
          std::cerr << "kms_bench: GenerateDataKey failed: " << g.error().to_string() << "\n";
          return 1;
        }
        blobs[w].emplace_back(std::move(g->ciphertext_blob), r.encryption_context);
      }
    }
  }

  for (unsigned threads : o.threads) {
    if (wants(o, "GenerateDataKey")) {
      Operation gen = [&](unsigned w, std::uint64_t i) {
        keyclient::GenerateDataKeyRequest r;
        r.key_id = o.key;
        r.key_spec = "AES_256";
        r.encryption_context = file_context(w, i);
        return static_cast<bool>(ks.generate_data_key(r));
      };
      print(via, "GenerateDataKey", threads, measure(gen, threads, o.seconds));
    }
    if (wants(o, "Decrypt")) {
      Operation dec = [&](unsigned w, std::uint64_t i) {
        const auto& [blob, ctx] = blobs[w][i % kBlobs];
        keyclient::DecryptRequest r;
        r.ciphertext_blob = blob;
        r.encryption_context = ctx;
        return static_cast<bool>(ks.decrypt(r));
      };
      print(via, "Decrypt", threads, measure(dec, threads, o.seconds));
    }
  }
  return 0;
}

// Opens the embedded home's token the way the core does (its softhsm2.conf
// and PIN files), without the core.
keyclient::HsmResult<std::unique_ptr<keyclient::Pkcs11Hsm>> open_home_token(const std::string& home) {
  using keyclient::HsmError;
  auto fail = [](std::string m) {
    return keyclient::HsmResult<std::unique_ptr<keyclient::Pkcs11Hsm>>(
        Unexpected<HsmError>(HsmError{HsmError::Kind::DeviceError, 0, std::move(m)}));
  };
  const auto paths = keyclient::kms_home_paths(home.empty() ? keyclient::default_kms_home() : home);
  if (std::getenv("SOFTHSM2_CONF") == nullptr) {
    if (auto w = keyclient::write_softhsm_conf(paths); !w) return fail(w.error().to_string());
    ::setenv("SOFTHSM2_CONF", paths.softhsm_conf.c_str(), 1);
  }
  if (auto c = keyclient::create_pin_file_if_missing(paths.pin); !c) return fail(c.error().to_string());
  if (auto c = keyclient::create_pin_file_if_missing(paths.so_pin); !c) return fail(c.error().to_string());
  auto pin = keyclient::load_pin(paths.pin);
  if (!pin) return fail(pin.error().to_string());
  auto so = keyclient::load_pin(paths.so_pin);
  if (!so) return fail(so.error().to_string());
  keyclient::Pkcs11Config cfg;
  cfg.module_path = KMSFS_DEFAULT_PKCS11_MODULE;
  cfg.user_pin = std::move(*pin);
  cfg.so_pin_for_init = std::move(*so);
  cfg.init_token_if_missing = true;
  cfg.max_sessions = 16;
  return keyclient::Pkcs11Hsm::open(std::move(cfg));
}

int run_hsm(const Options& o) {
  auto opened = open_home_token(o.home);
  if (!opened) {
    std::cerr << "kms_bench: cannot open the HSM token: " << opened.error().message << "\n";
    return 1;
  }
  keyclient::Pkcs11Hsm& hsm = **opened;
  const std::string label = "kmsfs-bench/raw-gcm/" + std::to_string(::getpid());
  if (auto g = hsm.generate_aes_key(label, 32); !g) {
    std::cerr << "kms_bench: cannot create the raw benchmark key: " << g.error().message << "\n";
    return 1;
  }
  const std::string via = o.via.empty() ? "hsm-raw" : o.via;
  // What one DEK wrap hands the HSM: 32 bytes of plaintext, a 12-byte IV and
  // an AAD of blob header + canonical context (about 160 bytes).
  const Bytes iv(12, 0x42);
  const Bytes aad(160, 0x17);
  const Bytes dek(32, 0x5a);
  int rc = 0;
  auto sealed = hsm.encrypt_gcm(label, iv, aad, dek);
  if (!sealed) {
    std::cerr << "kms_bench: encrypt_gcm failed: " << sealed.error().message << "\n";
    rc = 1;
  } else {
    for (unsigned threads : o.threads) {
      if (wants(o, "GenerateDataKey")) {
        Operation enc = [&](unsigned, std::uint64_t) { return static_cast<bool>(hsm.encrypt_gcm(label, iv, aad, dek)); };
        print(via, "EncryptGCM", threads, measure(enc, threads, o.seconds));
      }
      if (wants(o, "Decrypt")) {
        Operation dec = [&](unsigned, std::uint64_t) {
          return static_cast<bool>(hsm.decrypt_gcm(label, iv, aad, *sealed));
        };
        print(via, "DecryptGCM", threads, measure(dec, threads, o.seconds));
      }
    }
  }
  if (auto d = hsm.destroy_objects(label); !d) {
    std::cerr << "kms_bench: could not remove the benchmark key " << label << ": " << d.error().message << "\n";
  }
  return rc;
}

int usage(const char* why) {
  if (why != nullptr) std::cerr << "kms_bench: " << why << "\n";
  std::cerr << "Usage: kms_bench [--mode service|hsm] [--kms embedded|unix:PATH] [--home DIR]\n"
               "                 [--key KEY] [--threads N[,N...]] [--seconds S]\n"
               "                 [--ops GenerateDataKey,Decrypt] [--via LABEL]\n";
  return 2;
}

}  // namespace
}  // namespace kmsfs::bench

int main(int argc, char** argv) noexcept {
  using namespace kmsfs::bench;
  try {
    Options o;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        usage(nullptr);
        return 0;
      }
      if (i + 1 >= argc) return usage(("missing value for " + a).c_str());
      const std::string v = argv[++i];
      if (a == "--mode") {
        o.mode = v;
      } else if (a == "--kms") {
        o.kms = v;
      } else if (a == "--home") {
        o.home = v;
      } else if (a == "--key") {
        o.key = v;
      } else if (a == "--via") {
        o.via = v;
      } else if (a == "--ops") {
        o.ops = v;
      } else if (a == "--seconds") {
        o.seconds = std::stod(v);
        if (!(o.seconds > 0)) return usage("--seconds must be positive");
      } else if (a == "--threads") {
        o.threads.clear();
        std::size_t pos = 0;
        while (pos <= v.size()) {
          const std::size_t comma = std::min(v.find(',', pos), v.size());
          const int n = std::stoi(v.substr(pos, comma - pos));
          if (n < 1 || n > 256) return usage("--threads takes numbers in 1..256");
          o.threads.push_back(static_cast<unsigned>(n));
          pos = comma + 1;
        }
      } else {
        return usage(("unknown option " + a).c_str());
      }
    }
    if (o.mode == "service") return run_service(o);
    if (o.mode == "hsm") return run_hsm(o);
    return usage("--mode is service or hsm");
  } catch (const std::exception& e) {
    std::cerr << "kms_bench: " << e.what() << "\n";
    return 1;
  }
}
