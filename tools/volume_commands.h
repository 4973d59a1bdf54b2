#pragma once
// kmsfs subcommands that inspect and repair a cipher directory offline:
// fsck, inspect, encrypt-path, decrypt-path.

#include <string>
#include <vector>

#include "tools/cli_common.h"

namespace kmsfs::cli {

int cmd_fsck(const GlobalOptions& g, const std::vector<std::string>& args);
int cmd_inspect(const GlobalOptions& g, const std::vector<std::string>& args);
int cmd_encrypt_path(const GlobalOptions& g, const std::vector<std::string>& args);
int cmd_decrypt_path(const GlobalOptions& g, const std::vector<std::string>& args);

// fsck's exit codes beyond the common ones (documented in kmsfs --help).
inline constexpr int kFsckDamageLeft = 6;      // damage found, not (all) repaired
inline constexpr int kFsckDamageRepaired = 7;  // damage found and all of it repaired

}  // namespace kmsfs::cli
