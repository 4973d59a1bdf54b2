#pragma once
// A small std::expected-style result (the project targets C++20, where
// std::expected is not yet available). Expected failures are values; only
// broken invariants throw.

#include <cassert>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>

namespace kmsfs {

template <class E>
class Unexpected {
 public:
  explicit Unexpected(E e) : error_(std::move(e)) {}
  E& error() & { return error_; }
  E&& error() && { return std::move(error_); }

 private:
  E error_;
};

template <class E>
Unexpected<std::decay_t<E>> unexpected(E&& e) {
  return Unexpected<std::decay_t<E>>(std::forward<E>(e));
}

template <class T, class E>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT
  template <class G>
  Result(Unexpected<G> u) : v_(std::in_place_index<1>, std::move(u).error()) {}  // NOLINT

  bool has_value() const { return v_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & { check(); return std::get<0>(v_); }
  const T& value() const& { check(); return std::get<0>(v_); }
  T&& value() && { check(); return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const E& error() const& {
    if (has_value()) throw std::logic_error("Result::error() on a value");
    return std::get<1>(v_);
  }
  E&& error() && {
    if (has_value()) throw std::logic_error("Result::error() on a value");
    return std::get<1>(std::move(v_));
  }

 private:
  void check() const {
    if (!has_value()) throw std::logic_error("Result::value() on an error");
  }
  std::variant<T, E> v_;
};

template <class E>
class [[nodiscard]] Result<void, E> {
 public:
  Result() = default;
  template <class G>
  Result(Unexpected<G> u) : err_(std::move(u).error()), has_err_(true) {}  // NOLINT

  bool has_value() const { return !has_err_; }
  explicit operator bool() const { return has_value(); }
  void value() const {
    if (has_err_) throw std::logic_error("Result::value() on an error");
  }
  const E& error() const& {
    if (!has_err_) throw std::logic_error("Result::error() on a value");
    return err_;
  }
  E&& error() && { return std::move(err_); }

 private:
  E err_{};
  bool has_err_ = false;
};

}  // namespace kmsfs
