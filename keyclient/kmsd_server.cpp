#include "keyclient/kmsd_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "crypto/encoding.h"
#include "crypto/random.h"
#include "keyclient/kms_json.h"
#include "keyclient/logger.h"

namespace kmsfs::keyclient {

namespace {

using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;

constexpr std::string_view kTargetPrefix = "TrentService.";
constexpr std::string_view kContentType = "application/x-amz-json-1.1";

std::shared_ptr<spdlog::logger> logger() {
  static auto l = named_logger("kmsfs.kmsd");
  return l;
}

std::string request_id() {
  std::array<std::uint8_t, 16> b{};
  crypto::random_bytes(b);
  b[6] = static_cast<std::uint8_t>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<std::uint8_t>((b[8] & 0x3f) | 0x80);
  std::string h = crypto::to_hex(b);
  return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" +
         h.substr(20);
}

std::string error_body(std::string_view type, std::string_view message) {
  return json{{"__type", type}, {"message", message}}.dump(-1, ' ', false,
                                                           json::error_handler_t::replace);
}

std::string error_response(int status, std::string_view type, std::string_view message,
                           bool keep_alive, const std::string& rid) {
  http::Headers h{{"Content-Type", std::string(kContentType)},
                  {"x-amzn-RequestId", rid},
                  {"x-amzn-ErrorType", std::string(type)}};
  return http::format_response(status, h, error_body(type, message), keep_alive);
}

// Best effort on a non-blocking socket (error answers of the event loop:
// small, and the connection is closed right after).
void write_nonblocking(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
}

// Writes everything within `timeout`; false if the peer is gone or stuck.
bool write_all(int fd, std::string_view data, std::chrono::milliseconds timeout) {
  const auto deadline = SteadyClock::now() + timeout;
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) < 0 && errno != EINTR) return false;
      continue;
    }
    return false;
  }
  return true;
}

struct Connection {
  UniqueFd fd;
  CallerIdentity peer;
  http::RequestParser parser;
  SteadyClock::time_point deadline;
  bool in_request = false;  // bytes of a request have arrived: request_timeout runs
};

struct Job {
  std::unique_ptr<Connection> conn;
  http::Request request;
};

}  // namespace

int http_status_for(KmsErrorCode code) {
  switch (code) {
    case KmsErrorCode::KMSInternalException:
    case KmsErrorCode::KeyUnavailableException:
    case KmsErrorCode::DependencyTimeoutException:
      return 500;
    default:
      return 400;
  }
}

struct KmsdServer::Impl {
  KmsRequestHandler handler;
  KmsdServerOptions opts;

  UniqueFd listen_fd;
  UniqueFd epoll_fd;
  UniqueFd wake_fd;  // eventfd: stop() and returned connections
  std::thread loop_thread;
  std::vector<std::thread> workers;
  bool started = false;

  std::atomic<bool> stopping{false};

  // Loop thread only.
  std::unordered_map<int, std::unique_ptr<Connection>> conns;

  // Lock order: queue_mu and back_mu are never held together.
  std::mutex queue_mu;  // guards queue, queue_closed
  std::condition_variable queue_cv;
  std::deque<Job> queue;
  bool queue_closed = false;

  std::mutex back_mu;  // guards returned, busy
  std::vector<std::unique_ptr<Connection>> returned;
  std::size_t busy = 0;  // connections owned by the queue or a worker

  std::atomic<std::uint64_t> accepted{0};
  std::atomic<std::uint64_t> served{0};
  std::atomic<std::uint64_t> refused{0};

  std::mutex done_mu;  // guards done
  std::condition_variable done_cv;
  bool done = false;

  void wake() {
    std::uint64_t one = 1;
    (void)!::write(wake_fd.get(), &one, sizeof one);
  }

  // ---- event loop ----

  void loop() {
    std::array<epoll_event, 64> events{};
    bool listening = true;
    while (true) {
      if (stopping && listening) {
        (void)::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, listen_fd.get(), nullptr);
        listen_fd.reset();
        listening = false;
        // Partial and idle connections go now; requests already read finish.
        for (auto& [fd, c] : conns) {
          if (c->in_request) ++refused;
        }
        conns.clear();
        logger()->info("draining: no new connections; finishing requests in flight");
      }
      if (!listening) {
        std::lock_guard<std::mutex> lock(back_mu);
        if (busy == 0 && returned.empty()) break;
      }
      int n = ::epoll_wait(epoll_fd.get(), events.data(), static_cast<int>(events.size()), next_timeout_ms());
      if (n < 0 && errno != EINTR) {
        logger()->error("epoll_wait failed: {}; stopping", errno_text(errno));
        stopping = true;
        continue;
      }
      for (int i = 0; i < n; ++i) {
        const int fd = events[static_cast<std::size_t>(i)].data.fd;
        if (fd == wake_fd.get()) {
          std::uint64_t v = 0;
          (void)!::read(wake_fd.get(), &v, sizeof v);
          take_returned();
        } else if (listening && fd == listen_fd.get()) {
          accept_all();
        } else {
          on_readable(fd);
        }
      }
      expire(SteadyClock::now());
    }
    // Drained: workers may go.
    {
      std::lock_guard<std::mutex> lock(queue_mu);
      queue_closed = true;
    }
    queue_cv.notify_all();
  }

  int next_timeout_ms() const {
    auto soonest = SteadyClock::now() + std::chrono::seconds(1);
    for (const auto& [fd, c] : conns) soonest = std::min(soonest, c->deadline);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(soonest - SteadyClock::now()).count();
    return static_cast<int>(std::max<long long>(ms + 1, 0));
  }

  void accept_all() {
    while (true) {
      int cfd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (cfd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
          // EMFILE and friends: back off until a connection closes.
          logger()->warn("accept failed: {}", errno_text(errno));
        }
        return;
      }
      auto c = std::make_unique<Connection>();
      c->fd = UniqueFd(cfd);
      c->parser = http::RequestParser(opts.limits);
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        logger()->warn("SO_PEERCRED failed: {}; connection refused", errno_text(errno));
        continue;
      }
      std::size_t total = conns.size();
      {
        std::lock_guard<std::mutex> lock(back_mu);
        total += busy + returned.size();
      }
      if (total >= opts.max_connections) {
        ++refused;
        logger()->warn("refusing a connection from uid {} pid {}: {} connections already open",
                       cred.uid, cred.pid, total);
        write_nonblocking(cfd, error_response(503, "ThrottlingException",
                                              "kmsd has too many open connections", false, request_id()));
        continue;
      }
      c->peer = CallerIdentity{cred.uid, cred.gid, cred.pid};
      c->deadline = SteadyClock::now() + opts.idle_timeout;
      ++accepted;
      if (!watch(*c)) continue;
      logger()->debug("connection from uid {} gid {} pid {}", cred.uid, cred.gid, cred.pid);
      conns.emplace(cfd, std::move(c));
    }
  }

  bool watch(Connection& c) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = c.fd.get();
    if (::epoll_ctl(epoll_fd.get(), EPOLL_CTL_ADD, c.fd.get(), &ev) != 0) {
      logger()->warn("cannot watch a connection: {}", errno_text(errno));
      return false;
    }
    return true;
  }

  void close_conn(int fd) {
    (void)::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
    conns.erase(fd);
  }

  void on_readable(int fd) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Connection& c = *it->second;
    char buf[16384];
    // Read at most 64 KiB per wake-up so that one busy client cannot
    // starve the others; level-triggered epoll brings us back.
    for (int round = 0; round < 4; ++round) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (n <= 0) {
        if (c.in_request || c.parser.has_partial()) {
          ++refused;
          logger()->debug("uid {} pid {} closed the connection in the middle of a request",
                          c.peer.uid, c.peer.pid);
        }
        close_conn(fd);
        return;
      }
      http::ParseState st = c.parser.feed(std::string_view(buf, static_cast<std::size_t>(n)));
      if (!handle_parse_state(fd, st)) return;
      if (st == http::ParseState::Complete) return;
    }
  }

  // Acts on the parser's state; false if the connection is gone (closed or
  // handed to a worker).
  bool handle_parse_state(int fd, http::ParseState st) {
    Connection& c = *conns.at(fd);
    switch (st) {
      case http::ParseState::NeedMore:
        if (c.parser.has_partial() && !c.in_request) {
          c.in_request = true;
          c.deadline = SteadyClock::now() + opts.request_timeout;
        }
        if (c.parser.wants_continue()) {
          write_nonblocking(fd, "HTTP/1.1 100 Continue\r\n\r\n");
          c.parser.continue_sent();
        }
        return true;
      case http::ParseState::Error: {
        const auto& e = c.parser.error();
        ++refused;
        logger()->warn("malformed request from uid {} pid {}: {} ({}); connection closed", c.peer.uid,
                       c.peer.pid, e.reason, e.status);
        write_nonblocking(fd, error_response(e.status, "SerializationException", e.reason, false,
                                             request_id()));
        close_conn(fd);
        return false;
      }
      case http::ParseState::Complete:
        dispatch(fd);
        return false;
    }
    return false;
  }

  void dispatch(int fd) {
    auto it = conns.find(fd);
    std::unique_ptr<Connection> c = std::move(it->second);
    conns.erase(it);
    (void)::epoll_ctl(epoll_fd.get(), EPOLL_CTL_DEL, fd, nullptr);
    Job job{std::move(c), {}};
    job.request = job.conn->parser.take();
    bool queued = false;
    {
      std::lock_guard<std::mutex> lock(queue_mu);
      if (queue.size() < opts.queue_capacity) {
        {
          std::lock_guard<std::mutex> back(back_mu);
          ++busy;
        }
        queue.push_back(std::move(job));
        queued = true;
      }
    }
    if (queued) {
      queue_cv.notify_one();
      return;
    }
    ++refused;
    logger()->warn("request queue full ({} waiting): answering 503 to uid {} pid {}",
                   opts.queue_capacity, job.conn->peer.uid, job.conn->peer.pid);
    write_nonblocking(fd, error_response(503, "ThrottlingException",
                                         "kmsd is overloaded; retry later", false, request_id()));
  }

  void take_returned() {
    std::vector<std::unique_ptr<Connection>> back;
    {
      std::lock_guard<std::mutex> lock(back_mu);
      back.swap(returned);
    }
    for (auto& c : back) {
      if (stopping) continue;  // closed by the destructor
      const int fd = c->fd.get();
      c->in_request = false;
      c->deadline = SteadyClock::now() + opts.idle_timeout;
      if (!watch(*c)) continue;
      conns.emplace(fd, std::move(c));
      // A pipelined request may already be buffered.
      auto st = conns.at(fd)->parser.parse();
      if (st != http::ParseState::NeedMore || conns.at(fd)->parser.has_partial()) {
        handle_parse_state(fd, st);
      }
    }
  }

  void expire(SteadyClock::time_point now) {
    std::vector<int> doomed;
    for (const auto& [fd, c] : conns) {
      if (now >= c->deadline) doomed.push_back(fd);
    }
    for (int fd : doomed) {
      Connection& c = *conns.at(fd);
      if (c.in_request) {
        ++refused;
        logger()->warn("request from uid {} pid {} not complete after {} ms: connection dropped",
                       c.peer.uid, c.peer.pid, opts.request_timeout.count());
        write_nonblocking(fd, error_response(408, "RequestTimeoutException",
                                             "the request was not complete in time", false, request_id()));
      }
      close_conn(fd);
    }
  }

  // ---- workers ----

  void work() {
    while (true) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(queue_mu);
        queue_cv.wait(lock, [&] { return !queue.empty() || queue_closed; });
        if (queue.empty()) return;
        job = std::move(queue.front());
        queue.pop_front();
      }
      serve(job);
      std::unique_ptr<Connection> keep;
      if (job.conn) keep = std::move(job.conn);
      {
        std::lock_guard<std::mutex> lock(back_mu);
        if (keep) returned.push_back(std::move(keep));
        --busy;
      }
      wake();
    }
  }

  // Answers job.request; resets job.conn when the connection must close.
  void serve(Job& job) {
    Connection& c = *job.conn;
    const http::Request& req = job.request;
    const std::string rid = request_id();
    bool keep_alive = req.keep_alive && !stopping;
    std::string response;
    std::string operation;
    int status = 200;

    auto fail = [&](int st, std::string_view type, std::string_view message) {
      status = st;
      response = error_response(st, type, message, keep_alive, rid);
    };
    auto target = req.header("X-Amz-Target");
    auto content_type = req.header("Content-Type");
    if (req.method != "POST") {
      keep_alive = false;
      fail(405, "UnknownOperationException", "kmsd answers POST requests only");
    } else if (!target || target->substr(0, kTargetPrefix.size()) != kTargetPrefix ||
               target->size() == kTargetPrefix.size()) {
      fail(400, "UnknownOperationException",
           "missing or malformed X-Amz-Target (expected TrentService.<Operation>)");
    } else if (!content_type ||
               !http::iequals(content_type->substr(0, content_type->find(';')), kContentType)) {
      fail(400, "SerializationException", "Content-Type must be application/x-amz-json-1.1");
    } else {
      operation = std::string(target->substr(kTargetPrefix.size()));
      json body;
      bool parsed = true;
      try {
        body = req.body.empty() ? json::object() : json::parse(req.body);
      } catch (const json::exception& e) {
        parsed = false;
        fail(400, "SerializationException", std::string("the request body is not valid JSON: ") + e.what());
      }
      if (parsed) {
        KmsResult<json> res = kms_error(KmsErrorCode::KMSInternalException, "no result");
        try {
          res = handler(c.peer, operation, body);
        } catch (const std::exception& e) {
          logger()->error("{} from uid {} failed with an internal error: {}", operation, c.peer.uid, e.what());
          res = kms_error(KmsErrorCode::KMSInternalException, "internal error");
        }
        if (res) {
          std::string out = res->dump(-1, ' ', false, json::error_handler_t::replace);
          http::Headers h{{"Content-Type", std::string(kContentType)}, {"x-amzn-RequestId", rid}};
          response = http::format_response(200, h, out, keep_alive);
          // The body may carry a plaintext data key in base64.
          OPENSSL_cleanse(out.data(), out.size());
          if (res->is_object() && res->contains("Plaintext") && (*res)["Plaintext"].is_string()) {
            auto& s = (*res)["Plaintext"].get_ref<std::string&>();
            OPENSSL_cleanse(s.data(), s.size());
          }
        } else {
          const auto& e = res.error();
          fail(http_status_for(e.code), e.name(), e.message);
        }
      }
    }
    if (status == 200) {
      ++served;
    } else {
      ++refused;
    }
    logger()->debug("{} uid={} gid={} pid={} -> {} ({})", operation.empty() ? "-" : operation, c.peer.uid,
                    c.peer.gid, c.peer.pid, status, rid);
    const bool written = write_all(c.fd.get(), response, opts.write_timeout);
    OPENSSL_cleanse(response.data(), response.size());
    if (!written) {
      logger()->warn("could not write the response to uid {} pid {}: connection dropped", c.peer.uid,
                     c.peer.pid);
    }
    if (!written || !keep_alive) job.conn.reset();
  }
};

KmsdServer::KmsdServer(KmsRequestHandler handler, KmsdServerOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->handler = std::move(handler);
  impl_->opts = options;
  if (impl_->opts.worker_threads == 0) impl_->opts.worker_threads = 1;
}

KmsdServer::~KmsdServer() {
  stop();
  wait();
}

void KmsdServer::start(UniqueFd listen_fd) {
  Impl& m = *impl_;
  if (m.started) throw std::logic_error("KmsdServer::start called twice");
  const int flags = ::fcntl(listen_fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(listen_fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    throw std::system_error(errno, std::generic_category(), "fcntl on the listening socket");
  }
  m.listen_fd = std::move(listen_fd);
  m.epoll_fd = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!m.epoll_fd.valid()) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  m.wake_fd = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!m.wake_fd.valid()) throw std::system_error(errno, std::generic_category(), "eventfd");
  for (int fd : {m.listen_fd.get(), m.wake_fd.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(m.epoll_fd.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
      throw std::system_error(errno, std::generic_category(), "epoll_ctl");
    }
  }
  m.started = true;
  for (unsigned i = 0; i < m.opts.worker_threads; ++i) m.workers.emplace_back([&m] { m.work(); });
  m.loop_thread = std::thread([&m] {
    m.loop();
    for (auto& w : m.workers) w.join();
    {
      std::lock_guard<std::mutex> lock(m.done_mu);
      m.done = true;
    }
    m.done_cv.notify_all();
  });
}

void KmsdServer::stop() {
  if (!impl_->started) return;
  impl_->stopping = true;
  impl_->wake();
}

void KmsdServer::wait() {
  Impl& m = *impl_;
  if (!m.started) return;
  {
    std::unique_lock<std::mutex> lock(m.done_mu);
    m.done_cv.wait(lock, [&] { return m.done; });
  }
  if (m.loop_thread.joinable()) m.loop_thread.join();
}

KmsdServer::Stats KmsdServer::stats() const {
  return Stats{impl_->accepted.load(), impl_->served.load(), impl_->refused.load()};
}

Result<UniqueFd, std::string> bind_unix_socket(const UnixSocketOptions& o) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (o.path.empty() || o.path.size() >= sizeof addr.sun_path) {
    return unexpected("socket path '" + o.path + "' is empty or longer than " +
                      std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, o.path.c_str(), o.path.size() + 1);

  if (auto slash = o.path.rfind('/'); slash != std::string::npos && slash > 0) {
    const std::string dir = o.path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return unexpected("cannot create the socket directory " + dir + ": " + errno_text(errno));
    }
  }
  struct stat st {};
  if (::lstat(o.path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return unexpected(o.path + " exists and is not a socket; refusing to replace it");
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe.valid() &&
        ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
      return unexpected("another daemon is serving on " + o.path);
    }
    if (errno != ECONNREFUSED && errno != ENOENT) {
      return unexpected("cannot probe the existing socket " + o.path + ": " + errno_text(errno));
    }
    if (::unlink(o.path.c_str()) != 0 && errno != ENOENT) {
      return unexpected("cannot remove the stale socket " + o.path + ": " + errno_text(errno));
    }
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return unexpected("socket: " + errno_text(errno));
  // The socket file takes its mode from the umask at bind(2): set it so
  // that no one can connect in the window before a chmod.
  const mode_t old = ::umask(static_cast<mode_t>(~o.mode & 0777));
  const int rc = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  const int bind_errno = errno;
  ::umask(old);
  if (rc != 0) return unexpected("cannot bind " + o.path + ": " + errno_text(bind_errno));
  if (::chmod(o.path.c_str(), o.mode) != 0) {
    return unexpected("cannot chmod " + o.path + ": " + errno_text(errno));
  }
  if (o.group && ::chown(o.path.c_str(), static_cast<uid_t>(-1), *o.group) != 0) {
    return unexpected("cannot give " + o.path + " to group " + std::to_string(*o.group) + ": " +
                      errno_text(errno));
  }
  if (::listen(fd.get(), SOMAXCONN) != 0) return unexpected("listen on " + o.path + ": " + errno_text(errno));
  return fd;
}

}  // namespace kmsfs::keyclient
