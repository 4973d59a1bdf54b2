// kmsd: the KMS core as a daemon on a Unix socket, speaking the AWS KMS wire
// protocol. Argument parsing and wiring only; the server is
// keyclient/kmsd_server, the core keyclient/kms_core.
//
// Never forks: it runs in the foreground under systemd (Type=notify) or from
// a shell. Signals are taken synchronously (sigwait in main) so no handler
// ever runs inside the core or the HSM library.

#include <grp.h>
#include <signal.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>

#include "crypto/dontdump_heap.h"
#include "keyclient/kms_dispatch.h"
#include "keyclient/kms_home.h"
#include "keyclient/kms_options.h"
#include "keyclient/kmsd_server.h"
#include "keyclient/logger.h"
#include "tools/cli_common.h"

namespace po = boost::program_options;
using namespace kmsfs::keyclient;

namespace {

constexpr const char* kDefaultConfig = "/etc/kmsfs/kmsd.conf";
constexpr const char* kDefaultSocket = "/run/kmsfs/kmsd.sock";

// Exit codes (as every kmsfs tool): 0 ok, 1 failed, 2 usage, 4 the KMS/HSM
// could not start.
enum Exit : int { kOk = 0, kFailed = 1, kUsage = 2, kKmsUnavailable = 4 };

const char* const kDescription = R"(kmsd - the kmsfs KMS core as a daemon

Usage: kmsd [--config FILE] [options]

Serves the KMS API (AWS KMS operation names, JSON bodies and errors over
HTTP/1.1, X-Amz-Target: TrentService.<Operation>) on a Unix socket. The
caller's uid/gid/pid (SO_PEERCRED) is the identity that key policies judge.
Clients: `kmsfs --kms unix:SOCKET`, `kmsctl --kms unix:SOCKET`, any AWS SDK
with an HTTP agent that connects to the socket, curl --unix-socket.

kmsd never forks. Under systemd (Type=notify) it reports READY=1 once the HSM
token is logged in and the socket listens; it takes a socket passed by
socket activation (kmsd.socket) and binds SOCKET itself otherwise (a stale
socket file is replaced). SIGTERM finishes the requests in flight, then exits 0.

The configuration file holds "key = value" lines ('#' starts a comment):
  state_dir, socket, socket_mode, socket_group, pkcs11_module, token_label,
  pin_file, audit_log, threads, request_timeout, log_level
with the meaning of the options below; options on the command line win.
The PIN comes from --pin-file, else $CREDENTIALS_DIRECTORY/pin (systemd
LoadCredential=pin:...), else STATE_DIR/pin (created with the token at first
use, as in embedded mode).

Options)";

struct Settings {
  std::string config;
  std::string state_dir;
  std::string socket = kDefaultSocket;
  std::string socket_mode = "0660";
  std::string socket_group;
  std::string pkcs11_module;
  std::string token_label = "kmsfs";
  std::string pin_file;
  std::string audit_log;
  unsigned threads = 8;
  double request_timeout = 10.0;
  std::string log_level = "info";
};

// Reads "key = value" lines into `out` (only keys not already set on the
// command line, which `given` lists).
std::optional<std::string> read_config(const std::string& path, Settings& s,
                                       const po::variables_map& given) {
  std::ifstream in(path);
  if (!in) return "cannot read the configuration file " + path;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
    auto trim = [](std::string t) {
      const auto b = t.find_first_not_of(" \t\r");
      if (b == std::string::npos) return std::string();
      const auto e = t.find_last_not_of(" \t\r");
      return t.substr(b, e - b + 1);
    };
    line = trim(line);
    if (line.empty()) continue;
    const auto eq = line.find('=');
    const std::string where = path + ":" + std::to_string(lineno);
    if (eq == std::string::npos) return where + ": expected \"key = value\"";
    const std::string key = trim(line.substr(0, eq));
    const std::string value = trim(line.substr(eq + 1));
    std::string flag = key;
    for (char& c : flag) {
      if (c == '_') c = '-';
    }
    std::map<std::string, std::string*> strings{
        {"state_dir", &s.state_dir},       {"socket", &s.socket},
        {"socket_mode", &s.socket_mode},   {"socket_group", &s.socket_group},
        {"pkcs11_module", &s.pkcs11_module}, {"token_label", &s.token_label},
        {"pin_file", &s.pin_file},         {"audit_log", &s.audit_log},
        {"log_level", &s.log_level}};
    if (given.count(flag) != 0 && !given[flag].defaulted()) continue;
    try {
      if (auto it = strings.find(key); it != strings.end()) {
        *it->second = value;
      } else if (key == "threads") {
        s.threads = static_cast<unsigned>(std::stoul(value));
      } else if (key == "request_timeout") {
        s.request_timeout = std::stod(value);
      } else {
        return where + ": unknown key \"" + key + "\"";
      }
    } catch (const std::exception&) {
      return where + ": \"" + value + "\" is not a valid value for " + key;
    }
  }
  return std::nullopt;
}

void setup_logging(const std::string& level) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto main_logger = std::make_shared<spdlog::logger>("kmsd", sink);
  spdlog::set_default_logger(main_logger);
  for (const char* name : {"kmsfs.kmsd", "kmsfs.kms", "kmsfs.p11"}) {
    if (!spdlog::get(name)) spdlog::register_logger(std::make_shared<spdlog::logger>(name, sink));
  }
  spdlog::set_level(spdlog::level::from_str(level));
  // Under systemd the journal stamps time and unit itself.
  if (std::getenv("JOURNAL_STREAM") != nullptr) {
    spdlog::set_pattern("%n %l: %v");
  } else {
    spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %n %l: %v");
  }
}

int fail(int code, const std::string& message) {
  spdlog::error("{}", message);
  (void)sd_notifyf(0, "STATUS=failed: %s", message.c_str());
  return code;
}

int run(int argc, char** argv) {
  Settings s;
  po::options_description desc(kDescription);
  bool verbose = false;
  desc.add_options()
      ("config", po::value<std::string>(&s.config),
       "configuration file (default /etc/kmsfs/kmsd.conf when it exists)")
      ("state-dir", po::value<std::string>(&s.state_dir),
       "KMS state: key records, token dir, PINs; the layout of an embedded KMSFS_HOME "
       "(default /var/lib/kmsfs as root, else ~/.local/share/kmsfs)")
      ("socket", po::value<std::string>(&s.socket)->default_value(s.socket), "Unix socket to serve on")
      ("socket-mode", po::value<std::string>(&s.socket_mode)->default_value(s.socket_mode),
       "permissions of the socket (octal); who may connect is who may ask (policies still decide)")
      ("socket-group", po::value<std::string>(&s.socket_group), "group owning the socket (name or gid)")
      ("pkcs11-module", po::value<std::string>(&s.pkcs11_module), "PKCS#11 module (default SoftHSM2)")
      ("token-label", po::value<std::string>(&s.token_label)->default_value(s.token_label),
       "HSM token label")
      ("pin-file", po::value<std::string>(&s.pin_file), "HSM user PIN file (mode 0600)")
      ("audit-log", po::value<std::string>(&s.audit_log),
       "directory of the audit trail (audit.log, audit.head), mode 0700; default: the state dir")
      ("threads", po::value<unsigned>(&s.threads)->default_value(s.threads), "worker threads")
      ("request-timeout", po::value<double>(&s.request_timeout)->default_value(s.request_timeout),
       "seconds a client may take to send one request")
      ("log-level", po::value<std::string>(&s.log_level)->default_value(s.log_level),
       "trace|debug|info|warn|error")
      ("verbose,v", po::bool_switch(&verbose), "same as --log-level debug")
      ("list-operations", "print the KMS operations served, one per line, and exit")
      ("version", "print the version and exit")
      ("help,h", "this help");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "kmsd: " << e.what() << " (see kmsd --help)\n";
    return kUsage;
  }
  if (vm.count("help") != 0) {
    std::cout << desc << "\nExit codes: 0 stopped cleanly, 1 failed, 2 usage error, "
                         "4 the KMS or HSM could not start.\n";
    return kOk;
  }
  if (vm.count("version") != 0) {
    std::cout << "kmsd 0.1.0\n";
    return kOk;
  }
  if (vm.count("list-operations") != 0) {
    for (auto op : kms_operations()) std::cout << op << "\n";
    return kOk;
  }
  std::string config = s.config;
  if (config.empty() && ::access(kDefaultConfig, F_OK) == 0) config = kDefaultConfig;
  if (!config.empty()) {
    if (auto err = read_config(config, s, vm)) {
      std::cerr << "kmsd: " << *err << "\n";
      return kUsage;
    }
  }
  if (verbose) s.log_level = "debug";
  setup_logging(s.log_level);
  auto log = named_logger("kmsfs.kmsd");

  mode_t mode = 0;
  try {
    std::size_t used = 0;
    unsigned long m = std::stoul(s.socket_mode, &used, 8);
    if (used != s.socket_mode.size() || m > 0777) throw std::invalid_argument(s.socket_mode);
    mode = static_cast<mode_t>(m);
  } catch (const std::exception&) {
    std::cerr << "kmsd: socket mode \"" << s.socket_mode << "\" is not an octal mode such as 0660\n";
    return kUsage;
  }
  std::optional<gid_t> socket_gid;
  if (!s.socket_group.empty()) {
    if (s.socket_group.find_first_not_of("0123456789") == std::string::npos) {
      socket_gid = static_cast<gid_t>(std::stoul(s.socket_group));
    } else if (const struct group* g = ::getgrnam(s.socket_group.c_str())) {
      socket_gid = g->gr_gid;
    } else {
      std::cerr << "kmsd: socket group \"" << s.socket_group << "\" does not exist\n";
      return kUsage;
    }
  }
  if (s.threads == 0 || s.threads > 256 || !(s.request_timeout > 0)) {
    std::cerr << "kmsd: --threads must be 1..256 and --request-timeout positive\n";
    return kUsage;
  }

  // Signals are handled by sigwait below; block them before any thread
  // exists so that every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // No core dumps of a process holding data keys and the PIN.
  kmsfs::cli::refuse_core_dumps();
  // Soft open-file limit up to the hard one (systemd's default soft limit
  // is 1,024, as many as kmsd's default connection limit).
  const unsigned long fd_limit = kmsfs::cli::raise_open_file_limit();

  KmsOptions ko;
  ko.spec = "embedded";
  ko.home = s.state_dir;
  ko.pkcs11_module = s.pkcs11_module;
  ko.token_label = s.token_label;
  ko.pin_file = s.pin_file;
  if (ko.pin_file.empty()) {
    // systemd's LoadCredential=pin:/etc/kmsfs/pin lands here, readable by
    // this service only.
    if (const char* creds = std::getenv("CREDENTIALS_DIRECTORY"); creds != nullptr && *creds != '\0') {
      const std::string p = std::string(creds) + "/pin";
      if (::access(p.c_str(), R_OK) == 0) ko.pin_file = p;
    }
  }
  ko.audit_dir = s.audit_log;
  ko = resolve_kms_options(ko);
  // Socket activation (kmsd.socket) or our own socket, bound before the HSM
  // opens (a second kmsd on a live socket stops here); clients that connect
  // meanwhile wait in the backlog, as with socket activation.
  UniqueFd listen_fd;
  bool own_socket = false;
  const int n = sd_listen_fds(1);
  if (n < 0) return fail(kFailed, std::string("sd_listen_fds: ") + std::strerror(-n));
  if (n > 1) return fail(kFailed, "systemd passed " + std::to_string(n) + " sockets; kmsd takes one");
  if (n == 1) {
    if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, nullptr, 0) <= 0) {
      return fail(kFailed, "the socket systemd passed is not a listening Unix stream socket");
    }
    listen_fd = UniqueFd(SD_LISTEN_FDS_START);
    log->info("using the socket passed by systemd");
  } else {
    auto bound = bind_unix_socket(UnixSocketOptions{s.socket, mode, socket_gid});
    if (!bound) return fail(kFailed, bound.error());
    listen_fd = std::move(*bound);
    own_socket = true;
  }

  log->info("opening the KMS state in {} (PKCS#11 module {}, token '{}')", ko.home, ko.pkcs11_module,
            ko.token_label);
  auto core = make_kms_core(ko);
  if (!core) {
    if (own_socket) (void)::unlink(s.socket.c_str());
    return fail(kKmsUnavailable, "cannot start the KMS: " + core.error().to_string());
  }

  KmsCore& kms = **core;
  KmsdServerOptions so;
  so.worker_threads = s.threads;
  // Each client connection holds a descriptor. The rest of the open-file
  // limit stays free for the KMS: SoftHSM2 opens its object files on every
  // call and treats a key (or its whole token) as gone for the rest of the
  // process when such an open fails, so a flood of connections must meet
  // the connection limit (503 ThrottlingException), never EMFILE there.
  if (fd_limit > 0) {
    const unsigned long reserve = std::max(256UL, fd_limit / 8);
    const unsigned long room = fd_limit > reserve + 16 ? fd_limit - reserve : 16;
    if (so.max_connections > room) {
      log->warn("open-file limit {}: at most {} client connections (raise LimitNOFILE= for more)", fd_limit,
                room);
      so.max_connections = room;
    }
  }
  so.request_timeout = std::chrono::milliseconds(static_cast<long long>(s.request_timeout * 1000));
  KmsdServer server(
      [&kms](const CallerIdentity& caller, std::string_view op, const nlohmann::json& body) {
        return dispatch_kms_request(kms, caller, op, body);
      },
      so);
  server.start(std::move(listen_fd));
  log->info("serving the KMS API on {} with {} workers", n == 1 ? "the activated socket" : s.socket,
            s.threads);
  (void)sd_notifyf(0, "READY=1\nSTATUS=serving on %s", s.socket.c_str());

  while (true) {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) continue;
    if (sig == SIGHUP) {
      log->info("SIGHUP: nothing to reload (restart kmsd to apply a new configuration)");
      continue;
    }
    log->info("{}: finishing the requests in flight", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    break;
  }
  (void)sd_notify(0, "STOPPING=1");
  server.stop();
  server.wait();
  if (own_socket) (void)::unlink(s.socket.c_str());
  const auto st = server.stats();
  log->info("stopped: {} connections, {} requests served, {} refused", st.connections_accepted,
            st.requests_served, st.requests_refused);
  return kOk;
}

}  // namespace

int main(int argc, char** argv) noexcept {
  // Before anything touches OpenSSL: its copies of keys (cipher contexts'
  // key schedules) stay out of core dumps (crypto/dontdump_heap.h).
  (void)kmsfs::crypto::install_openssl_dontdump_heap();
  try {
    return kmsfs::cli::finish(run(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "kmsd: internal error: " << e.what() << "\n";
    return kFailed;
  } catch (...) {
    std::cerr << "kmsd: internal error\n";
    return kFailed;
  }
}
