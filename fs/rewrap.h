#pragma once
// `kmsfs rewrap`: re-wraps every file's data key (and the volume's name
// key) to the newest version of the volume's KMS key, or to another key,
// through ReEncrypt: the KMS decrypts and re-encrypts inside itself, so no
// data key ever reaches this process and no file data is read or written.
//
// Each 128-byte header is replaced by one pwrite(2) of exactly 128 bytes at
// offset 0 (see docs/format.md, "Rewrapping"): old and new header wrap the
// same DEK, so every file opens under either, and a re-run skips files
// already under the target key version. Safe to interrupt; safe with the
// volume mounted (open files keep their DEK; the header's file id and the
// DEK never change). With --to-key, kmsfs.json names the new key only once
// every file was rewrapped, after a syncfs(2).

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "crypto/result.h"
#include "keyclient/key_service.h"

namespace kmsfs::fs {

struct RewrapProgress {
  std::size_t total = 0;      // data files found
  std::size_t done = 0;       // examined so far
  std::size_t rewrapped = 0;  // headers replaced
  std::size_t current = 0;    // already under the target key version
  std::size_t failed = 0;
};

struct RewrapOptions {
  std::optional<std::string> to_key;  // key id, ARN or alias; default: the volume's key
  // Called after each file (and once at the end); may print.
  std::function<void(const RewrapProgress&)> progress;
};

struct RewrapResult {
  RewrapProgress counts;
  std::string target_key_arn;
  std::uint32_t target_version = 0;
  bool config_updated = false;  // kmsfs.json now names the target key
  std::vector<std::string> errors;  // one per failed file: "<path>: <reason>"
};

// Errors that stop the whole run (no kmsfs.json, target key unusable) are
// the error value; per-file failures are listed in RewrapResult::errors and
// the run goes on (and does not switch kmsfs.json to a new key).
Result<RewrapResult, std::string> rewrap_volume(keyclient::KeyService& kms, const std::string& cipherdir,
                                                const RewrapOptions& options);

}  // namespace kmsfs::fs
