#pragma once
// The kmsd wire protocol's HTTP/1.1 layer: a small, strict, incremental
// message parser and the message writers. kmsd (server side) and the kmsd
// client both use it, so they agree byte for byte.
//
// What AWS KMS speaks, and so what this accepts: POST with a Content-Length
// body (AWS SDKs, curl and `aws kms` always send one), keep-alive by default
// (HTTP/1.1) or on request (HTTP/1.0 + "Connection: keep-alive"), an
// optional "Expect: 100-continue". What it refuses, with the status a client
// understands, and always followed by closing the connection:
//   400  malformed request line, header line, header name or Content-Length
//   411  a POST without Content-Length
//   413  a body above Limits::max_body_bytes
//   431  a header section above Limits::max_header_bytes
//   501  any Transfer-Encoding (chunked bodies are not supported)
//   505  an HTTP version other than 1.0 / 1.1
// Line endings must be CRLF; obsolete header folding is refused (RFC 9112
// §5.2 permits that), so no header can be smuggled past a proxy's reading.

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kmsfs::keyclient::http {

struct Limits {
  std::size_t max_header_bytes = 16 * 1024;  // request/status line + headers + blank line
  std::size_t max_body_bytes = 1024 * 1024;
};

using Headers = std::vector<std::pair<std::string, std::string>>;

// Case-insensitive lookup of the first header called `name`.
std::optional<std::string_view> find_header(const Headers& headers, std::string_view name);
bool iequals(std::string_view a, std::string_view b);

struct Request {
  std::string method;
  std::string target;
  int minor_version = 1;  // HTTP/1.<minor>
  Headers headers;
  std::string body;
  bool keep_alive = true;  // what the client asked for
  std::optional<std::string_view> header(std::string_view name) const {
    return find_header(headers, name);
  }
};

struct Response {
  int status = 0;
  std::string reason;
  int minor_version = 1;
  Headers headers;
  std::string body;
  bool keep_alive = true;  // the server keeps the connection open
  std::optional<std::string_view> header(std::string_view name) const {
    return find_header(headers, name);
  }
};

// A refused message: the status to answer with and why (for the log and
// the error body). The connection is closed after answering.
struct ProtocolError {
  int status = 400;
  std::string reason;
};

enum class ParseState {
  NeedMore,  // feed more bytes
  Complete,  // take() the message; bytes after it stay buffered (pipelining)
  Error,     // error() says why; the connection must be closed
};

// Incremental parser for one connection. feed() appends bytes and parses as
// far as it can; after Complete, take() hands out the message and the parser
// continues with the bytes that followed it.
class RequestParser {
 public:
  explicit RequestParser(Limits limits = {}) : limits_(limits) {}

  ParseState feed(std::string_view bytes);
  // Parses what is already buffered (after a take(), for a pipelined request).
  ParseState parse();
  Request take();
  const ProtocolError& error() const { return error_; }

  // True once some byte of the next request has arrived (a request is in
  // progress: its read deadline runs).
  bool has_partial() const { return !buffer_.empty(); }
  // True once the header section of the current request is complete and its
  // body is still missing, and the client sent "Expect: 100-continue". The
  // caller answers "100 Continue" once and calls continue_sent().
  bool wants_continue() const { return headers_done_ && expect_continue_ && !continue_sent_; }
  void continue_sent() { continue_sent_ = true; }

 private:
  ParseState fail(int status, std::string reason);

  Limits limits_;
  std::string buffer_;
  std::size_t header_end_ = 0;  // offset after the blank line, when headers_done_
  bool headers_done_ = false;
  bool expect_continue_ = false;
  bool continue_sent_ = false;
  std::size_t body_length_ = 0;
  Request current_;
  ParseState state_ = ParseState::NeedMore;
  ProtocolError error_;
};

// Parser for responses (the client side). Same rules; a response without
// Content-Length is refused (kmsd always sends one).
class ResponseParser {
 public:
  explicit ResponseParser(Limits limits = {}) : limits_(limits) {}
  ParseState feed(std::string_view bytes);
  Response take();
  const ProtocolError& error() const { return error_; }
  bool empty() const { return buffer_.empty(); }

 private:
  ParseState parse();
  ParseState fail(std::string reason);

  Limits limits_;
  std::string buffer_;
  Response current_;
  ParseState state_ = ParseState::NeedMore;
  ProtocolError error_;
};

std::string_view reason_phrase(int status);

// "HTTP/1.1 <status> <reason>", Content-Length, Connection and `headers`.
std::string format_response(int status, const Headers& headers, std::string_view body,
                            bool keep_alive);
// "POST <target> HTTP/1.1", Host, Content-Length and `headers`.
std::string format_request(std::string_view method, std::string_view target,
                           const Headers& headers, std::string_view body);

}  // namespace kmsfs::keyclient::http
