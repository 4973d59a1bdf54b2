#pragma once
// KmsdServer: the KMS API served over a Unix stream socket, speaking the AWS
// KMS wire protocol (HTTP/1.1 POST, X-Amz-Target: TrentService.<Operation>,
// application/x-amz-json-1.1 bodies; errors as {"__type", "message"}). The
// caller is whoever SO_PEERCRED names on the connection; SigV4 headers are
// ignored. tools/kmsd.cpp wires it to a KmsCore; tests run it in-process.
//
// Threads: one event loop (epoll) accepts connections and reads requests
// non-blockingly into per-connection parsers, so a slow or never-finished
// request costs a buffer, not a thread, and is dropped at its deadline. A
// complete request moves, with its connection, into a bounded queue served
// by a fixed pool of workers; the worker writes the response and hands a
// keep-alive connection back to the loop. When the queue is full the loop
// answers 503 ThrottlingException at once.
//
// stop() (SIGTERM in kmsd) drains: no new connections, partial requests are
// dropped, every request already read is answered, then wait() returns.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "keyclient/kms_core.h"
#include "keyclient/kms_http.h"
#include "keyclient/state_files.h"

namespace kmsfs::keyclient {

struct KmsdServerOptions {
  unsigned worker_threads = 8;
  std::size_t queue_capacity = 256;  // complete requests waiting for a worker
  std::size_t max_connections = 1024;
  // From a request's first byte to its last: a slower request is dropped
  // (408 and close).
  std::chrono::milliseconds request_timeout{10'000};
  // A keep-alive connection with no request in progress is closed after this.
  std::chrono::milliseconds idle_timeout{300'000};
  // Writing one response; a client that does not read is dropped.
  std::chrono::milliseconds write_timeout{10'000};
  http::Limits limits;
};

// One call of the API as caller; dispatch_kms_request on a KmsCore in kmsd.
using KmsRequestHandler = std::function<KmsResult<nlohmann::json>(
    const CallerIdentity& caller, std::string_view operation, const nlohmann::json& request)>;

class KmsdServer {
 public:
  KmsdServer(KmsRequestHandler handler, KmsdServerOptions options = {});
  ~KmsdServer();  // stop() and wait()
  KmsdServer(const KmsdServer&) = delete;
  KmsdServer& operator=(const KmsdServer&) = delete;

  // Serves the listening socket (bound by bind_unix_socket or passed by
  // systemd) on new threads. Throws std::system_error if a thread, the
  // epoll set or the wake-up eventfd cannot be created (start-up failure).
  void start(UniqueFd listen_fd);
  // Begins the drain. Thread-safe; returns at once.
  void stop();
  // Returns once stopped and drained.
  void wait();

  // Counters for logs and tests.
  struct Stats {
    std::uint64_t connections_accepted = 0;
    std::uint64_t requests_served = 0;
    std::uint64_t requests_refused = 0;  // protocol errors, timeouts, throttled
  };
  Stats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct UnixSocketOptions {
  std::string path;
  mode_t mode = 0660;
  std::optional<gid_t> group;  // chown the socket to this group
};

// Creates, binds and listens on a Unix stream socket at options.path with
// exactly options.mode (umask is set around bind(2): call before starting
// threads). A stale socket that nobody answers on is unlinked first; a path
// where a daemon answers, or that is not a socket, is refused with a message
// naming it. The parent directory is created (0755) if missing.
Result<UniqueFd, std::string> bind_unix_socket(const UnixSocketOptions& options);

// The HTTP status kmsd answers a KMS error with: 500 for the server-side
// errors (KMSInternalException, KeyUnavailableException,
// DependencyTimeoutException), 400 for the caller's.
int http_status_for(KmsErrorCode code);

}  // namespace kmsfs::keyclient
