#include "keyclient/logger.h"

#include <mutex>

namespace kmsfs::keyclient {

std::shared_ptr<spdlog::logger> named_logger(const std::string& name) {
  if (auto l = spdlog::get(name)) return l;
  // spdlog's registry is process-wide; this mutex only closes the window
  // between get() and register_logger() for two of our own callers.
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (auto l = spdlog::get(name)) return l;
  auto l = spdlog::default_logger()->clone(name);
  try {
    spdlog::register_logger(l);
  } catch (const spdlog::spdlog_ex&) {
    // Registered by someone else in the meantime: use theirs.
    if (auto other = spdlog::get(name)) return other;
  }
  return l;
}

}  // namespace kmsfs::keyclient
