#pragma once
// Named spdlog loggers for the keyclient layer ("kmsfs.kms", "kmsfs.p11").
// The executable configures sinks and levels once (tools/cli_common); a
// logger first asked for here is a clone of the default logger, so it
// inherits those sinks and that level.

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace kmsfs::keyclient {

std::shared_ptr<spdlog::logger> named_logger(const std::string& name);

}  // namespace kmsfs::keyclient
