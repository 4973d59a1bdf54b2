#include "keyclient/kms_http.h"

#include <algorithm>
#include <cctype>
#include <charconv>

namespace kmsfs::keyclient::http {

namespace {

constexpr std::string_view kCrlf = "\r\n";

bool is_tchar(char c) {
  // RFC 9110 §5.6.2 token characters.
  if (std::isalnum(static_cast<unsigned char>(c)) != 0) return true;
  return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

bool is_token(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), is_tchar);
}

// Field values: visible characters, SP and HTAB, and obs-text (>= 0x80).
bool is_field_value(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u == '\t' || u >= 0x20 ? u != 0x7f : false;
  });
}

std::string_view trim_ows(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Does the comma-separated header list `value` contain `token`?
bool list_contains(std::string_view value, std::string_view token) {
  while (!value.empty()) {
    auto comma = value.find(',');
    std::string_view item = trim_ows(value.substr(0, comma));
    if (iequals(item, token)) return true;
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  return false;
}

struct Head {
  std::string_view first_line;
  Headers headers;
};

// Splits "line\r\nline\r\n...line" (without the final blank line) into the
// start line and the header fields. Returns a reason on malformed input.
std::optional<std::string> parse_head(std::string_view head, Head& out) {
  bool first = true;
  while (true) {
    auto eol = head.find(kCrlf);
    std::string_view line = head.substr(0, eol);
    if (line.find_first_of("\r\n") != std::string_view::npos) {
      return "bare CR or LF in the header section (lines must end with CRLF)";
    }
    if (first) {
      out.first_line = line;
      first = false;
    } else {
      if (line.empty()) return "empty header line";
      if (line.front() == ' ' || line.front() == '\t') return "obsolete header line folding";
      auto colon = line.find(':');
      if (colon == std::string_view::npos) return "header line without a colon";
      std::string_view name = line.substr(0, colon);
      if (!is_token(name)) return "malformed header name";
      std::string_view value = trim_ows(line.substr(colon + 1));
      if (!is_field_value(value)) return "control character in the value of header " + std::string(name);
      out.headers.emplace_back(std::string(name), std::string(value));
    }
    if (eol == std::string_view::npos) break;
    head.remove_prefix(eol + kCrlf.size());
  }
  return std::nullopt;
}

// Content-Length: every occurrence equal, digits only. Returns nullopt when
// absent; sets `bad` when malformed.
std::optional<std::size_t> content_length(const Headers& headers, bool& bad) {
  std::optional<std::size_t> found;
  for (const auto& [name, value] : headers) {
    if (!iequals(name, "Content-Length")) continue;
    std::size_t n = 0;
    const char* end = value.data() + value.size();
    if (value.empty() || value.size() > 18 ||
        !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        std::from_chars(value.data(), end, n).ptr != end || (found && *found != n)) {
      bad = true;
      return std::nullopt;
    }
    found = n;
  }
  return found;
}

// "HTTP/1.1" -> 1, "HTTP/1.0" -> 0; -1 = another HTTP version, -2 = not HTTP.
int parse_version(std::string_view v) {
  if (v == "HTTP/1.1") return 1;
  if (v == "HTTP/1.0") return 0;
  if (v.substr(0, 5) == "HTTP/" && v.size() == 8 && std::isdigit(static_cast<unsigned char>(v[5])) &&
      v[6] == '.' && std::isdigit(static_cast<unsigned char>(v[7]))) {
    return -1;
  }
  return -2;
}

bool keep_alive_for(int minor_version, const Headers& headers) {
  auto conn = find_header(headers, "Connection");
  if (minor_version >= 1) return !(conn && list_contains(*conn, "close"));
  return conn && list_contains(*conn, "keep-alive");
}

}  // namespace

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

std::optional<std::string_view> find_header(const Headers& headers, std::string_view name) {
  for (const auto& [n, v] : headers) {
    if (iequals(n, name)) return std::string_view(v);
  }
  return std::nullopt;
}

// ---- requests ---------------------------------------------------------------

ParseState RequestParser::fail(int status, std::string reason) {
  error_ = ProtocolError{status, std::move(reason)};
  state_ = ParseState::Error;
  return state_;
}

ParseState RequestParser::feed(std::string_view bytes) {
  if (state_ == ParseState::Error) return state_;
  buffer_.append(bytes);
  return parse();
}

ParseState RequestParser::parse() {
  if (state_ != ParseState::NeedMore) return state_;
  if (!headers_done_) {
    // RFC 9112 §2.2: a server SHOULD ignore at least one empty line
    // received before the request line.
    while (buffer_.size() >= 2 && buffer_.compare(0, 2, kCrlf) == 0) buffer_.erase(0, 2);
    const auto end = buffer_.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (buffer_.size() > limits_.max_header_bytes) {
        return fail(431, "the request header section exceeds " +
                             std::to_string(limits_.max_header_bytes) + " bytes");
      }
      return ParseState::NeedMore;
    }
    if (end + 4 > limits_.max_header_bytes) {
      return fail(431, "the request header section exceeds " +
                           std::to_string(limits_.max_header_bytes) + " bytes");
    }
    Head head;
    if (auto bad = parse_head(std::string_view(buffer_).substr(0, end), head)) {
      return fail(400, *bad);
    }
    // request-line = method SP request-target SP HTTP-version
    const std::string_view line = head.first_line;
    const auto sp1 = line.find(' ');
    const auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos) {
      return fail(400, "malformed request line");
    }
    const std::string_view method = line.substr(0, sp1);
    const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    const int minor = parse_version(line.substr(sp2 + 1));
    if (!is_token(method)) return fail(400, "malformed request method");
    if (target.empty() || !is_field_value(target) || target.find_first_of(" \t") != std::string_view::npos) {
      return fail(400, "malformed request target");
    }
    if (minor == -1) return fail(505, "only HTTP/1.1 and HTTP/1.0 are supported");
    if (minor < 0) return fail(400, "malformed HTTP version");

    if (find_header(head.headers, "Transfer-Encoding")) {
      return fail(501, "Transfer-Encoding is not supported; send a Content-Length body");
    }
    bool bad_length = false;
    auto length = content_length(head.headers, bad_length);
    if (bad_length) return fail(400, "malformed or conflicting Content-Length");
    if (!length && method == "POST") return fail(411, "a POST needs a Content-Length");
    if (length && *length > limits_.max_body_bytes) {
      return fail(413, "the request body of " + std::to_string(*length) + " bytes exceeds " +
                           std::to_string(limits_.max_body_bytes) + " bytes");
    }
    current_ = Request{};
    current_.method = std::string(method);
    current_.target = std::string(target);
    current_.minor_version = minor;
    current_.keep_alive = keep_alive_for(minor, head.headers);
    current_.headers = std::move(head.headers);
    auto expect = current_.header("Expect");
    expect_continue_ = minor >= 1 && expect && iequals(trim_ows(*expect), "100-continue");
    continue_sent_ = false;
    body_length_ = length.value_or(0);
    header_end_ = end + 4;
    headers_done_ = true;
  }
  if (buffer_.size() - header_end_ < body_length_) return ParseState::NeedMore;
  current_.body = buffer_.substr(header_end_, body_length_);
  buffer_.erase(0, header_end_ + body_length_);
  headers_done_ = false;
  expect_continue_ = false;
  state_ = ParseState::Complete;
  return state_;
}

Request RequestParser::take() {
  Request r = std::move(current_);
  current_ = Request{};
  if (state_ == ParseState::Complete) state_ = ParseState::NeedMore;
  return r;
}

// ---- responses --------------------------------------------------------------

ParseState ResponseParser::fail(std::string reason) {
  error_ = ProtocolError{502, std::move(reason)};
  state_ = ParseState::Error;
  return state_;
}

ParseState ResponseParser::feed(std::string_view bytes) {
  if (state_ == ParseState::Error) return state_;
  buffer_.append(bytes);
  return parse();
}

ParseState ResponseParser::parse() {
  while (true) {
    if (state_ != ParseState::NeedMore) return state_;
    const auto end = buffer_.find("\r\n\r\n");
    if (end == std::string::npos) {
      if (buffer_.size() > limits_.max_header_bytes) return fail("response header section too large");
      return ParseState::NeedMore;
    }
    if (end + 4 > limits_.max_header_bytes) return fail("response header section too large");
    Head head;
    if (auto bad = parse_head(std::string_view(buffer_).substr(0, end), head)) return fail(*bad);
    // status-line = HTTP-version SP status-code SP [reason-phrase]
    const std::string_view line = head.first_line;
    const auto sp1 = line.find(' ');
    if (sp1 == std::string_view::npos || line.size() < sp1 + 4) return fail("malformed status line");
    const int minor = parse_version(line.substr(0, sp1));
    if (minor < 0) return fail("not an HTTP/1.x response");
    const std::string_view code = line.substr(sp1 + 1, 3);
    int status = 0;
    if (std::from_chars(code.data(), code.data() + 3, status).ptr != code.data() + 3 || status < 100 ||
        (line.size() > sp1 + 4 && line[sp1 + 4] != ' ')) {
      return fail("malformed status code");
    }
    if (status < 200) {  // interim (100 Continue): no body, the real one follows
      buffer_.erase(0, end + 4);
      continue;
    }
    if (find_header(head.headers, "Transfer-Encoding")) return fail("chunked responses are not supported");
    bool bad_length = false;
    auto length = content_length(head.headers, bad_length);
    if (bad_length || !length) return fail("response without a valid Content-Length");
    if (*length > limits_.max_body_bytes) return fail("response body too large");
    if (buffer_.size() - (end + 4) < *length) return ParseState::NeedMore;
    current_ = Response{};
    current_.status = status;
    current_.reason = line.size() > sp1 + 5 ? std::string(line.substr(sp1 + 5)) : std::string();
    current_.minor_version = minor;
    current_.keep_alive = keep_alive_for(minor, head.headers);
    current_.headers = std::move(head.headers);
    current_.body = buffer_.substr(end + 4, *length);
    buffer_.erase(0, end + 4 + *length);
    state_ = ParseState::Complete;
  }
}

Response ResponseParser::take() {
  Response r = std::move(current_);
  current_ = Response{};
  if (state_ == ParseState::Complete) state_ = ParseState::NeedMore;
  return r;
}

// ---- writers ----------------------------------------------------------------

std::string_view reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

std::string format_response(int status, const Headers& headers, std::string_view body,
                            bool keep_alive) {
  std::string out;
  out.reserve(256 + body.size());
  out += "HTTP/1.1 ";
  out += std::to_string(status);
  out += ' ';
  out += reason_phrase(status);
  out += kCrlf;
  for (const auto& [n, v] : headers) {
    out += n;
    out += ": ";
    out += v;
    out += kCrlf;
  }
  out += "Content-Length: ";
  out += std::to_string(body.size());
  out += kCrlf;
  out += keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  out += kCrlf;
  out += body;
  return out;
}

std::string format_request(std::string_view method, std::string_view target,
                           const Headers& headers, std::string_view body) {
  std::string out;
  out.reserve(256 + body.size());
  out += method;
  out += ' ';
  out += target;
  out += " HTTP/1.1\r\n";
  if (!find_header(headers, "Host")) out += "Host: localhost\r\n";
  for (const auto& [n, v] : headers) {
    out += n;
    out += ": ";
    out += v;
    out += kCrlf;
  }
  out += "Content-Length: ";
  out += std::to_string(body.size());
  out += kCrlf;
  out += kCrlf;
  out += body;
  return out;
}

}  // namespace kmsfs::keyclient::http
