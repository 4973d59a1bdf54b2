#pragma once
// Integers read from untrusted JSON (kmsfs.json, key records, KMS requests
// off the wire). nlohmann's get<int>() converts a float with static_cast,
// which is undefined behaviour when the value does not fit (1e300 -> int),
// and silently truncates 1.5 or wraps an out-of-range integer. These accept
// only an integer that fits T and otherwise throw json::type_error, the
// exception every parser here already turns into "invalid ..." errors.
// (Here, not in keyclient/, because fs/ parses kmsfs.json too and depends
// on crypto/ but not on keyclient's internals.)

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

namespace kmsfs::crypto {

template <class T>
T json_int(const nlohmann::json& v) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
  bool fits = false;
  if (v.is_number_unsigned()) {
    fits = v.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<T>::max());
  } else if (v.is_number_integer()) {
    const auto s = v.get<std::int64_t>();
    if constexpr (std::is_signed_v<T>) {
      fits = s >= static_cast<std::int64_t>(std::numeric_limits<T>::min()) &&
             s <= static_cast<std::int64_t>(std::numeric_limits<T>::max());
    } else {
      fits = s >= 0 && static_cast<std::uint64_t>(s) <= static_cast<std::uint64_t>(std::numeric_limits<T>::max());
    }
  }
  if (!fits) {
    throw nlohmann::json::type_error::create(
        302, "type must be an integer that fits, but is " + (v.is_number() ? v.dump() : std::string(v.type_name())), &v);
  }
  if (v.is_number_unsigned()) return static_cast<T>(v.get<std::uint64_t>());
  return static_cast<T>(v.get<std::int64_t>());
}

// j[name] as T, or `fallback` when absent or null.
template <class T>
T json_int_or(const nlohmann::json& j, const char* name, T fallback) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return fallback;
  return json_int<T>(*it);
}

}  // namespace kmsfs::crypto
