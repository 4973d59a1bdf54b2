#pragma once
// kmsfs fsck: checks a cipher directory offline — kmsfs.json, every
// directory IV, every (encrypted) name and long-name side file, every file
// header (it parses, and the KMS unwraps its data key), every block's GCM
// tag, every symlink target — and names each damaged object with the reason.
//
// --repair fixes what can be fixed without guessing: orphan side files and
// leftovers of interrupted operations are removed, a missing IV of an empty
// directory is recreated, and objects that cannot be read are moved into
// CIPHERDIR/kmsfs.quarantine/ (never deleted), with a line in
// kmsfs.quarantine/index.jsonl saying what each was and why it moved.
// Nothing readable is touched.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "crypto/result.h"
#include "keyclient/key_service.h"

namespace kmsfs::fs {

struct FsckProblem {
  std::string backing_path;  // relative to CIPHERDIR
  std::string plain_path;    // relative to the mount root, when known
  std::string kind;          // "corrupt block", "missing side file", ...
  std::string reason;
  bool repaired = false;
  std::string repair;        // what --repair did
};

struct FsckStats {
  std::uint64_t directories = 0;
  std::uint64_t files = 0;
  std::uint64_t symlinks = 0;
  std::uint64_t other = 0;
  std::uint64_t blocks = 0;
  std::uint64_t bytes = 0;  // plaintext bytes verified
};

struct FsckReport {
  FsckStats stats;
  std::vector<FsckProblem> problems;
  bool clean() const { return problems.empty(); }
  bool all_repaired() const;
};

struct FsckOptions {
  bool repair = false;
  // Called now and then with the running totals (progress display).
  std::function<void(const FsckStats&)> progress;
};

// Errors (the volume cannot be checked at all: kmsfs.json unreadable, name
// key refused by the KMS, ...) come back as a message.
Result<FsckReport, std::string> run_fsck(keyclient::KeyService& kms, const std::string& cipherdir,
                                         const FsckOptions& options);

// True when CIPHERDIR is mounted (a repair must not race a live mount).
bool cipherdir_is_mounted(const std::string& cipherdir);

}  // namespace kmsfs::fs
