#include "keyclient/kmsd_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "keyclient/kms_http.h"
#include "keyclient/kms_json.h"
#include "keyclient/logger.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

namespace {

using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;

void cleanse(std::string& s) { OPENSSL_cleanse(s.data(), s.size()); }

// Cleanses a "Plaintext" member (base64 of a secret) of a JSON object.
void cleanse_plaintext(json& j) {
  if (j.is_object()) {
    auto it = j.find("Plaintext");
    if (it != j.end() && it->is_string()) cleanse(it->get_ref<std::string&>());
  }
}

// Why one exchange failed.
struct TransportError {
  bool timeout = false;
  bool retryable = false;  // nothing of a response arrived on a reused connection
  std::string what;
};

}  // namespace

struct KmsdClient::Impl {
  KmsdClientOptions opts;
  std::string name;  // "unix:PATH", for messages

  std::mutex mu;  // guards idle
  std::vector<UniqueFd> idle;

  KmsError transport_error(const TransportError& e) const {
    if (e.timeout) {
      return KmsError{KmsErrorCode::DependencyTimeoutException, "kmsd at " + name + ": " + e.what};
    }
    return KmsError{KmsErrorCode::KMSInternalException, "kmsd at " + name + ": " + e.what};
  }

  // An idle pooled connection that the server has not closed, if any.
  UniqueFd take_idle() {
    std::lock_guard<std::mutex> lock(mu);
    while (!idle.empty()) {
      UniqueFd fd = std::move(idle.back());
      idle.pop_back();
      // A keep-alive connection that kmsd closed (idle timeout, restart)
      // reads as EOF: drop it here rather than fail a request on it.
      pollfd p{fd.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) == 0) return fd;
    }
    return UniqueFd();
  }

  void give_back(UniqueFd fd) {
    std::lock_guard<std::mutex> lock(mu);
    if (idle.size() < opts.max_idle_connections) idle.push_back(std::move(fd));
  }

  Result<UniqueFd, TransportError> connect_new() const {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (opts.socket_path.size() >= sizeof addr.sun_path) {
      return unexpected(TransportError{false, false, "the socket path is too long"});
    }
    std::memcpy(addr.sun_path, opts.socket_path.c_str(), opts.socket_path.size() + 1);
    const auto deadline = SteadyClock::now() + opts.connect_timeout;
    while (true) {
      UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
      if (!fd.valid()) return unexpected(TransportError{false, false, "socket: " + errno_text(errno)});
      if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) return fd;
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EINPROGRESS) {
        // The listen backlog is full (Unix sockets answer EAGAIN): kmsd is
        // busy; wait a little within the connect timeout.
        if (SteadyClock::now() >= deadline) {
          return unexpected(TransportError{true, false,
                                           "connect: timed out after " +
                                               std::to_string(opts.connect_timeout.count()) +
                                               " ms (kmsd is overloaded)"});
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        continue;
      }
      std::string hint = (err == ENOENT || err == ECONNREFUSED) ? " (is kmsd running?)" : "";
      return unexpected(TransportError{false, false, "cannot connect: " + errno_text(err) + hint});
    }
  }

  // One request/response on `fd`. `reused`: the connection came from the pool.
  Result<http::Response, TransportError> exchange(int fd, const std::string& request, bool reused) const {
    const auto deadline = SteadyClock::now() + opts.io_timeout;
    auto wait_for = [&](short events) -> Result<void, TransportError> {
      while (true) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now());
        if (left.count() <= 0) {
          return unexpected(TransportError{true, false,
                                           "no answer within " + std::to_string(opts.io_timeout.count()) + " ms"});
        }
        pollfd p{fd, events, 0};
        int n = ::poll(&p, 1, static_cast<int>(left.count()));
        if (n > 0) return {};
        if (n < 0 && errno != EINTR) {
          return unexpected(TransportError{false, false, "poll: " + errno_text(errno)});
        }
      }
    };
    std::string_view out = request;
    while (!out.empty()) {
      ssize_t n = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        out.remove_prefix(static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (auto w = wait_for(POLLOUT); !w) return unexpected(w.error());
        continue;
      }
      const int err = errno;
      return unexpected(TransportError{false, reused && out.size() == request.size(),
                                       "send: " + errno_text(err)});
    }
    http::ResponseParser parser(http::Limits{16 * 1024, 8 * 1024 * 1024});
    bool got_any = false;
    std::array<char, 16384> buf{};
    while (true) {
      ssize_t n = ::recv(fd, buf.data(), buf.size(), 0);
      if (n > 0) {
        got_any = true;
        auto st = parser.feed(std::string_view(buf.data(), static_cast<std::size_t>(n)));
        OPENSSL_cleanse(buf.data(), static_cast<std::size_t>(n));
        if (st == http::ParseState::Complete) return parser.take();
        if (st == http::ParseState::Error) {
          return unexpected(TransportError{false, false, "malformed response: " + parser.error().reason});
        }
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (auto w = wait_for(POLLIN); !w) return unexpected(w.error());
        continue;
      }
      const int err = n == 0 ? 0 : errno;
      std::string what = n == 0 ? "the connection closed before a complete response (did kmsd restart?)"
                                : "recv: " + errno_text(err);
      return unexpected(TransportError{false, reused && !got_any, std::move(what)});
    }
  }
};

KmsdClient::KmsdClient(KmsdClientOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->opts = std::move(options);
  impl_->name = "unix:" + impl_->opts.socket_path;
}

KmsdClient::~KmsdClient() = default;

const std::string& KmsdClient::socket_path() const { return impl_->opts.socket_path; }

KmsResult<json> KmsdClient::call(std::string_view operation, const json& request) {
  Impl& m = *impl_;
  std::string body = request.dump(-1, ' ', false, json::error_handler_t::replace);
  std::string wire = http::format_request(
      "POST", "/",
      {{"Content-Type", "application/x-amz-json-1.1"},
       {"X-Amz-Target", "TrentService." + std::string(operation)},
       {"User-Agent", "kmsfs-keyclient/0.1"}},
      body);
  cleanse(body);
  struct Cleanser {
    std::string& s;
    ~Cleanser() { OPENSSL_cleanse(s.data(), s.size()); }
  } wire_guard{wire};

  Result<http::Response, TransportError> res = unexpected(TransportError{});
  UniqueFd fd;
  for (int attempt = 0; attempt < 2; ++attempt) {
    fd = m.take_idle();
    const bool reused = fd.valid();
    if (!reused) {
      auto c = m.connect_new();
      if (!c) return Unexpected<KmsError>(m.transport_error(c.error()));
      fd = std::move(*c);
    }
    res = m.exchange(fd.get(), wire, reused);
    if (res || !res.error().retryable) break;
    named_logger("kmsfs.kms")->debug("kmsd at {}: pooled connection was closed; retrying on a new one",
                                     m.name);
  }
  if (!res) return Unexpected<KmsError>(m.transport_error(res.error()));
  http::Response resp = std::move(*res);
  if (resp.keep_alive) m.give_back(std::move(fd));

  struct BodyCleanser {
    std::string& s;
    ~BodyCleanser() { OPENSSL_cleanse(s.data(), s.size()); }
  } body_guard{resp.body};
  json j;
  try {
    j = resp.body.empty() ? json::object() : json::parse(resp.body);
  } catch (const json::exception&) {
    if (resp.status == 200) {
      return kms_error(KmsErrorCode::KMSInternalException, "kmsd at " + m.name + " sent a response that is not JSON");
    }
    return kms_error(resp.status >= 500 ? KmsErrorCode::KMSInternalException : KmsErrorCode::ValidationException,
                     "kmsd at " + m.name + " answered HTTP " + std::to_string(resp.status) + " " + resp.reason);
  }
  if (resp.status == 200) return j;
  KmsError err;
  err.code = resp.status >= 500 ? KmsErrorCode::KMSInternalException : KmsErrorCode::ValidationException;
  std::string type;
  if (j.is_object() && j.contains("__type") && j["__type"].is_string()) {
    type = j["__type"].get<std::string>();
  } else if (auto h = resp.header("x-amzn-ErrorType")) {
    type = std::string(h->substr(0, h->find(':')));
  }
  // AWS may qualify the name: "com.amazonaws.kms#NotFoundException".
  if (auto hash = type.rfind('#'); hash != std::string::npos) type = type.substr(hash + 1);
  if (!type.empty()) err.code = kms_error_from_name(type);
  if (j.is_object()) {
    for (const char* key : {"message", "Message"}) {
      if (j.contains(key) && j[key].is_string()) err.message = j[key].get<std::string>();
    }
  }
  if (err.message.empty()) err.message = type.empty() ? "HTTP " + std::to_string(resp.status) : type;
  if (!type.empty() && kms_error_name(err.code) != type) err.message = type + ": " + err.message;
  return Unexpected<KmsError>(std::move(err));
}

namespace {

template <class Resp, class Req>
KmsResult<Resp> typed_call(KeyService& svc, std::string_view op, const Req& req) {
  json j = req;
  auto r = svc.call(op, j);
  cleanse_plaintext(j);
  if (!r) return Unexpected<KmsError>(std::move(r).error());
  try {
    Resp resp = r->template get<Resp>();
    cleanse_plaintext(*r);
    return resp;
  } catch (const std::exception& e) {
    cleanse_plaintext(*r);
    return kms_error(KmsErrorCode::KMSInternalException,
                     "kmsd sent a malformed " + std::string(op) + " response: " + e.what());
  }
}

}  // namespace

KmsResult<CreateKeyResponse> KmsdClient::create_key(const CreateKeyRequest& req) {
  return typed_call<CreateKeyResponse>(*this, "CreateKey", req);
}
KmsResult<DescribeKeyResponse> KmsdClient::describe_key(const DescribeKeyRequest& req) {
  return typed_call<DescribeKeyResponse>(*this, "DescribeKey", req);
}
KmsResult<ListKeysResponse> KmsdClient::list_keys(const ListKeysRequest& req) {
  return typed_call<ListKeysResponse>(*this, "ListKeys", req);
}
KmsResult<void> KmsdClient::create_alias(const CreateAliasRequest& req) {
  json j = req;
  auto r = call("CreateAlias", j);
  if (!r) return Unexpected<KmsError>(std::move(r).error());
  return {};
}
KmsResult<ListAliasesResponse> KmsdClient::list_aliases(const ListAliasesRequest& req) {
  return typed_call<ListAliasesResponse>(*this, "ListAliases", req);
}
KmsResult<GenerateDataKeyResponse> KmsdClient::generate_data_key(const GenerateDataKeyRequest& req) {
  return typed_call<GenerateDataKeyResponse>(*this, "GenerateDataKey", req);
}
KmsResult<DecryptResponse> KmsdClient::decrypt(const DecryptRequest& req) {
  return typed_call<DecryptResponse>(*this, "Decrypt", req);
}
KmsResult<EncryptResponse> KmsdClient::encrypt(const EncryptRequest& req) {
  return typed_call<EncryptResponse>(*this, "Encrypt", req);
}
KmsResult<GenerateRandomResponse> KmsdClient::generate_random(const GenerateRandomRequest& req) {
  return typed_call<GenerateRandomResponse>(*this, "GenerateRandom", req);
}

}  // namespace kmsfs::keyclient
