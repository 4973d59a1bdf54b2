#pragma once
// `kmsfs rewrap CIPHERDIR [--to-key KEY]` (fs/rewrap.h does the work).

#include <string>
#include <vector>

#include "tools/cli_common.h"

namespace kmsfs::cli {

int cmd_rewrap(const GlobalOptions& g, const std::vector<std::string>& args);

}  // namespace kmsfs::cli
