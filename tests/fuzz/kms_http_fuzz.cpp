// libFuzzer target: kmsd's HTTP/1.1 wire parsers (keyclient/kms_http.h),
// request side (what kmsd reads from any local client) and response side.
// The input is fed in pieces whose sizes come from the first byte, so that
// the incremental paths are exercised; pipelined messages are taken in turn.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "keyclient/kms_http.h"

namespace http = kmsfs::keyclient::http;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t step = 1 + data[0] % 64;
  std::string_view in(reinterpret_cast<const char*>(data) + 1, size - 1);
  http::Limits limits;
  limits.max_header_bytes = 2048;
  limits.max_body_bytes = 4096;
  {
    http::RequestParser p(limits);
    int messages = 0;
    for (std::size_t off = 0; off < in.size(); off += step) {
      auto st = p.feed(in.substr(off, step));
      while (st == http::ParseState::Complete) {
        http::Request r = p.take();
        if (r.body.size() > limits.max_body_bytes) std::abort();
        (void)r.header("Content-Type");
        if (++messages > 10000) std::abort();
        st = p.parse();
      }
      if (st == http::ParseState::Error) {
        if (p.error().status < 400 || p.error().status > 599) std::abort();
        break;
      }
    }
  }
  {
    http::ResponseParser p(limits);
    for (std::size_t off = 0; off < in.size(); off += step) {
      auto st = p.feed(in.substr(off, step));
      if (st == http::ParseState::Complete) {
        http::Response r = p.take();
        if (r.body.size() > limits.max_body_bytes) std::abort();
      }
      if (st == http::ParseState::Error) break;
    }
  }
  return 0;
}
