// kmsfs: create, mount, unmount and describe encrypted directories.
// Argument parsing and wiring only; the work is in fs/ and keyclient/.

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/dist_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/syslog_sink.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "crypto/dontdump_heap.h"
#include "fs/volume.h"
#include "keyclient/kms_options.h"
#include "tools/cli_common.h"
#include "tools/rewrap_command.h"
#include "tools/volume_commands.h"

namespace po = boost::program_options;

namespace {

using kmsfs::cli::ExitCode;

constexpr const char* kUsage = R"(Usage: kmsfs [GLOBAL OPTIONS] COMMAND [ARGS]

Transparently encrypted directories whose per-file data keys are wrapped by
an HSM-backed KMS.

Commands:
  init CIPHERDIR [--key KEY] [--plaintext-names] [--long-name-max N]
                                     create a new encrypted volume in CIPHERDIR
                                     (KEY: key id, ARN or alias; default: the
                                     managed key alias/kmsfs/default)
  mount CIPHERDIR MOUNTPOINT [-f] [-o OPTS]
                                     mount it; returns once the mount serves
                                     (runs in the background unless -f)
  umount MOUNTPOINT                  unmount
  info CIPHERDIR                     show the volume's configuration and key
  rewrap CIPHERDIR [--to-key KEY]    rewrap every data key to the newest key
                                     version (or another key) via ReEncrypt
  fsck CIPHERDIR [--repair] [--json] check every header, block and name;
                                     repair what can be repaired
  inspect BACKINGFILE                show a backing file's header (no key bytes)
  encrypt-path CIPHERDIR PATH        backing path of a plaintext path
  decrypt-path CIPHERDIR PATH        plaintext path of a backing path

Run `kmsfs COMMAND --help` for a command's options.

Global options (before or after the command):
  --kms SPEC            where the KMS is: "embedded" (default; the KMS core in
                        this process, state under KMSFS_HOME) or unix:PATH
                        (kmsd). Environment: KMSFS_KMS.
  --pkcs11-module PATH  PKCS#11 module of the HSM (default: SoftHSM2)
  --pin-file PATH       file holding the HSM user PIN (mode 0600)
  -v, --verbose         log debug messages to stderr
  -h, --help            this help

Environment:
  KMSFS_HOME   state of the embedded KMS (default /var/lib/kmsfs for root,
               ~/.local/share/kmsfs otherwise)
  KMSFS_KMS    default for --kms
  KMSFS_LOG_LEVEL  trace|debug|info|warn|error
  KMSFS_HSM_TIMEOUT_MS  deadline of one HSM call (default 30000; 0 = none)

Exit codes:
  0  success
  1  the operation failed
  2  usage error
  3  the KMS refused the request (key not found, disabled, access denied, ...)
  4  the KMS or HSM is unavailable
  5  the cipher directory is corrupt or of an unsupported format
  6  (fsck) damage found and not all of it repaired
  7  (fsck --repair) damage found and all of it repaired
)";

constexpr const char* kMountHelp = R"(Usage: kmsfs mount CIPHERDIR MOUNTPOINT [-f] [-o OPTS]

Mounts the encrypted volume CIPHERDIR at MOUNTPOINT. Without -f, kmsfs returns
once the mount is ready and keeps serving it in the background; errors before
that point are printed and give a non-zero exit code.

Options:
  -f, --foreground   stay in the foreground, log to stderr
  -o OPTS            comma-separated mount options:
      ro                 read-only
      allow_other        let other users access the mount (default_permissions
                         is always on; needs user_allow_other for non-root)
      fsname=NAME        name shown in /proc/mounts
      kernel_cache       keep the page cache across opens
      no_writeback_cache disable the kernel's writeback cache
      entry_timeout=S, attr_timeout=S   kernel cache timeouts (default 1)
      max_threads=N      FUSE worker threads (default 2 per CPU, 4 to 10)
      max_inodes=N       inodes (one descriptor each) kept before the mount asks
                         the kernel to forget unused entries (default a third
                         of the open-file limit; 0 = no bound)
      key_cache=on|off   cache data keys after close and pre-generate keys for
                         new files (default on)
      key_cache_ttl=S    seconds a cached data key stays usable (default 300)
      key_cache_entries=N  data keys cached at most, least recently used
                         dropped first (default 65536, 1 to 1048576)
      key_readahead=N    when a program walks a directory, unwrap the data keys
                         of up to N of its files at a time before they are
                         opened (default 256; 0 = off; needs key_cache)
      read_ahead_kb=N    the kernel's read-ahead window for the mount, in KiB
                         (default 4096; 0 = the kernel's 128; set as root only;
                         128 suits sparse random mmap access to large files)
      debug              trace FUSE requests (implies -f)
)";

// Logging: every component logger shares one dist sink, so that a daemon
// can move all of them from stderr to syslog once it has detached.
std::shared_ptr<spdlog::sinks::dist_sink_mt> g_log_sink;

void setup_logging(bool verbose) {
  g_log_sink = std::make_shared<spdlog::sinks::dist_sink_mt>();
  g_log_sink->add_sink(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  auto level = verbose ? spdlog::level::debug : spdlog::level::warn;
  if (const char* env = std::getenv("KMSFS_LOG_LEVEL"); env != nullptr) {
    level = spdlog::level::from_str(env);
  }
  auto main_logger = std::make_shared<spdlog::logger>("kmsfs", g_log_sink);
  spdlog::set_default_logger(main_logger);
  for (const char* name : {"kmsfs.fs", "kmsfs.kms", "kmsfs.p11"}) {
    if (!spdlog::get(name)) spdlog::register_logger(std::make_shared<spdlog::logger>(name, g_log_sink));
  }
  spdlog::set_level(level);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %n %l: %v");
}

void log_to_syslog() {
  auto syslog = std::make_shared<spdlog::sinks::syslog_sink_mt>("kmsfs", LOG_PID, LOG_DAEMON, false);
  g_log_sink->set_sinks({syslog});
  spdlog::set_pattern("%n %l: %v");
}

int fail(ExitCode code, const std::string& message) {
  std::cerr << "kmsfs: " << message << "\n";
  return static_cast<int>(code);
}

std::string absolute_path(const std::string& p) {
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf) == nullptr) return {};
  return buf;
}

int cmd_init(const kmsfs::cli::GlobalOptions& g, const std::vector<std::string>& args) {
  po::options_description desc(
      "Usage: kmsfs init CIPHERDIR [--key KEY] [--plaintext-names] [--long-name-max N]\n\nOptions");
  std::string key;
  kmsfs::fs::InitOptions init_options;
  desc.add_options()("key", po::value<std::string>(&key)->default_value(kmsfs::keyclient::kDefaultManagedAlias),
                     "KMS key that wraps the volume's data keys (key id, ARN or alias)")(
      "plaintext-names", po::bool_switch(&init_options.plaintext_names),
      "store file names unencrypted (names are encrypted with AES-256-SIV by default)")(
      "long-name-max", po::value<std::uint32_t>(&init_options.long_name_max)->default_value(255),
      "longest encrypted name stored as is (63..255); longer ones go through a hashed name "
      "and a side file — lower it for sync services with shorter name limits")(
      "help,h", "this help");
  po::options_description hidden;
  std::string cipherdir;
  hidden.add_options()("cipherdir", po::value<std::string>(&cipherdir));
  po::options_description all;
  all.add(desc).add(hidden);
  po::positional_options_description pos;
  pos.add("cipherdir", 1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  po::notify(vm);
  if (vm.count("help") != 0 || g.help) {
    std::cout << desc << "\nCreates CIPHERDIR (or uses it if empty) and writes CIPHERDIR/kmsfs.json.\n";
    return 0;
  }
  if (cipherdir.empty()) return fail(ExitCode::Usage, "init: missing CIPHERDIR (see kmsfs init --help)");

  auto kms = kmsfs::keyclient::make_key_service(g.kms);
  if (!kms) return fail(kmsfs::cli::exit_code_for(kms.error()), "KMS: " + kms.error().to_string());
  auto config = kmsfs::fs::init_volume(**kms, cipherdir, key, init_options);
  if (!config) return fail(ExitCode::Failed, config.error());
  std::cout << "Created kmsfs volume in " << cipherdir << "\n"
            << "  filesystem id: " << config->filesystem_id_hex() << "\n"
            << "  key:           " << config->key_id << "\n"
            << "Mount it with: kmsfs mount " << cipherdir << " MOUNTPOINT\n";
  return 0;
}

int cmd_info(const kmsfs::cli::GlobalOptions& g, const std::vector<std::string>& args) {
  if (g.help || (!args.empty() && (args[0] == "--help" || args[0] == "-h"))) {
    std::cout << "Usage: kmsfs info CIPHERDIR\n\nPrints the volume's configuration as JSON, with the "
                 "state of its KMS key when the KMS is reachable.\n";
    return 0;
  }
  if (args.size() != 1) return fail(ExitCode::Usage, "info: expected exactly one CIPHERDIR");
  auto config = kmsfs::fs::VolumeConfig::load(args[0]);
  if (!config) return fail(ExitCode::Corrupt, config.error());
  nlohmann::json j = {
      {"CipherDir", args[0]},
      {"FormatVersion", config->format_version},
      {"FilesystemId", config->filesystem_id_hex()},
      {"KeyId", config->key_id},
      {"BlockSize", config->block_size},
      {"Features", config->features},
      {"CreationDate", config->creation_date},
  };
  auto kms = kmsfs::keyclient::make_key_service(g.kms);
  if (kms) {
    auto desc = (*kms)->describe_key({config->key_id});
    if (desc) {
      j["KeyState"] = desc->key_metadata.key_state;
      j["KeyDescription"] = desc->key_metadata.description;
      j["KeyManager"] = desc->key_metadata.key_manager;
    } else {
      j["KeyState"] = "unknown (" + desc.error().to_string() + ")";
    }
  } else {
    j["KeyState"] = "unknown (KMS unavailable: " + kms.error().to_string() + ")";
  }
  std::cout << j.dump(4) << "\n";
  return 0;
}

int cmd_umount(const kmsfs::cli::GlobalOptions& g, const std::vector<std::string>& args) {
  if (g.help || (!args.empty() && (args[0] == "--help" || args[0] == "-h"))) {
    std::cout << "Usage: kmsfs umount MOUNTPOINT\n\nUnmounts a kmsfs mount. Data written through "
                 "the mount is on the backing store when this returns.\n";
    return 0;
  }
  if (args.size() != 1) return fail(ExitCode::Usage, "umount: expected exactly one MOUNTPOINT");
  const std::string& mnt = args[0];
  if (::geteuid() == 0) {
    if (::umount2(mnt.c_str(), 0) != 0) {
      return fail(ExitCode::Failed, "cannot unmount " + mnt + ": " + std::strerror(errno));
    }
    return 0;
  }
  // Unprivileged: the setuid helper of libfuse does it.
  pid_t pid = 0;
  const char* argv[] = {"fusermount3", "-u", mnt.c_str(), nullptr};
  if (posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char* const*>(argv), environ) != 0) {
    return fail(ExitCode::Failed, "cannot run fusermount3 to unmount " + mnt);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return fail(ExitCode::Failed, "fusermount3 could not unmount " + mnt);
  }
  return 0;
}

int cmd_mount(const kmsfs::cli::GlobalOptions& g, const std::vector<std::string>& args) {
  po::options_description desc("Options");
  bool foreground = false;
  std::vector<std::string> option_strings;
  desc.add_options()("foreground,f", po::bool_switch(&foreground), "stay in the foreground")(
      "options,o", po::value<std::vector<std::string>>(&option_strings), "mount options")(
      "help,h", "this help");
  po::options_description hidden;
  std::vector<std::string> positional;
  hidden.add_options()("positional", po::value<std::vector<std::string>>(&positional));
  po::options_description all;
  all.add(desc).add(hidden);
  po::positional_options_description pos;
  pos.add("positional", -1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  po::notify(vm);
  if (vm.count("help") != 0 || g.help) {
    std::cout << kMountHelp;
    return 0;
  }
  if (positional.size() != 2) {
    return fail(ExitCode::Usage, "mount: expected CIPHERDIR and MOUNTPOINT (see kmsfs mount --help)");
  }
  kmsfs::fs::MountOptions opts;
  for (const auto& s : option_strings) {
    auto parsed = kmsfs::fs::parse_mount_options(s, opts);
    if (!parsed) return fail(ExitCode::Usage, parsed.error());
    opts = *parsed;
  }
  if (opts.debug) foreground = true;

  // Paths are made absolute before a daemon changes its directory.
  const std::string cipherdir = absolute_path(positional[0]);
  if (cipherdir.empty()) {
    return fail(ExitCode::Failed, "cipher directory " + positional[0] + ": " + std::strerror(errno));
  }
  const std::string mountpoint = absolute_path(positional[1]);
  struct stat st {};
  if (mountpoint.empty() || ::stat(mountpoint.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return fail(ExitCode::Failed, "mount point " + positional[1] + " is not an existing directory");
  }
  // A clear error before any fork when the directory is not a volume.
  if (auto config = kmsfs::fs::VolumeConfig::load(cipherdir); !config) {
    return fail(ExitCode::Corrupt, config.error());
  }

  // Daemonize before the KMS starts: the PKCS#11 module is initialised in
  // the process that serves, after the fork. The parent waits on a pipe for
  // the child's verdict: 0 = serving, else the exit code to return.
  int ready_pipe[2] = {-1, -1};
  if (!foreground) {
    if (::pipe2(ready_pipe, O_CLOEXEC) != 0) return fail(ExitCode::Failed, "pipe: " + std::string(std::strerror(errno)));
    pid_t pid = ::fork();
    if (pid < 0) return fail(ExitCode::Failed, "fork: " + std::string(std::strerror(errno)));
    if (pid > 0) {
      ::close(ready_pipe[1]);
      unsigned char verdict = static_cast<unsigned char>(ExitCode::Failed);
      ssize_t n = 0;
      do {
        n = ::read(ready_pipe[0], &verdict, 1);
      } while (n < 0 && errno == EINTR);
      if (n != 1) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        return WIFEXITED(status) && WEXITSTATUS(status) != 0 ? WEXITSTATUS(status)
                                                             : static_cast<int>(ExitCode::Failed);
      }
      if (verdict != 0) ::waitpid(pid, nullptr, 0);
      return verdict;
    }
    ::close(ready_pipe[0]);
    ::setsid();
    if (::chdir("/") != 0) {
      // Paths are absolute; nothing depends on the working directory.
    }
  }
  auto report = [&](int code) {
    if (ready_pipe[1] >= 0) {
      unsigned char c = static_cast<unsigned char>(code);
      (void)!::write(ready_pipe[1], &c, 1);
      ::close(ready_pipe[1]);
      ready_pipe[1] = -1;
    }
  };
  // No core dumps of a process holding data keys.
  kmsfs::cli::refuse_core_dumps();
  // One descriptor per inode the kernel remembers (fs/filesystem.h).
  const unsigned long fd_limit = kmsfs::cli::raise_open_file_limit();
  spdlog::info("open file limit: {}", fd_limit);

  // The audit record of every call whose response carries a data key is on
  // disk before the key is used (KMSFS_AUDIT_SYNC_PLAINTEXT=0 relaxes
  // that, docs/kms-api.md "Audit trail"); the prefetch pool keeps that
  // flush off the path of a file create.
  kmsfs::keyclient::KmsOptions kms_opts = g.kms;
  auto kms = kmsfs::keyclient::make_key_service(kms_opts);
  if (!kms) {
    int code = fail(kmsfs::cli::exit_code_for(kms.error()), "KMS: " + kms.error().to_string());
    report(code);
    return code;
  }
  auto volume = kmsfs::fs::Volume::open(**kms, cipherdir);
  if (!volume) {
    int code = fail(ExitCode::KmsRefused, volume.error());
    report(code);
    return code;
  }
  bool served = false;
  auto r = (*volume)->serve(mountpoint, opts, [&] {
    served = true;
    // systemd Type=notify (kmsfs@.service runs `kmsfs mount -f`): ready
    // once the kernel mount exists.
    if (std::getenv("NOTIFY_SOCKET") != nullptr) (void)sd_notify(0, "READY=1");
    if (!foreground) {
      report(0);
      log_to_syslog();
      int devnull = ::open("/dev/null", O_RDWR);
      if (devnull >= 0) {
        ::dup2(devnull, STDIN_FILENO);
        ::dup2(devnull, STDOUT_FILENO);
        ::dup2(devnull, STDERR_FILENO);
        if (devnull > STDERR_FILENO) ::close(devnull);
      }
    }
  });
  if (!r) {
    if (served) {
      spdlog::error("{}", r.error());
      return static_cast<int>(ExitCode::Failed);
    }
    int code = fail(ExitCode::Failed, r.error());
    report(code);
    return code;
  }
  return 0;
}

int run(int argc, char** argv) {
  kmsfs::cli::GlobalOptions g = kmsfs::cli::parse_global_options(argc, argv);
  setup_logging(g.verbose);
  if (!g.error.empty()) return fail(ExitCode::Usage, g.error);
  if (g.rest.empty()) {
    if (g.help) {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << kUsage;
    return static_cast<int>(ExitCode::Usage);
  }
  const std::string command = g.rest[0];
  std::vector<std::string> args(g.rest.begin() + 1, g.rest.end());
  try {
    if (command == "init") return cmd_init(g, args);
    if (command == "mount") return cmd_mount(g, args);
    if (command == "umount" || command == "unmount") return cmd_umount(g, args);
    if (command == "info") return cmd_info(g, args);
    if (command == "rewrap") return kmsfs::cli::cmd_rewrap(g, args);
    if (command == "fsck") return kmsfs::cli::cmd_fsck(g, args);
    if (command == "inspect") return kmsfs::cli::cmd_inspect(g, args);
    if (command == "encrypt-path") return kmsfs::cli::cmd_encrypt_path(g, args);
    if (command == "decrypt-path") return kmsfs::cli::cmd_decrypt_path(g, args);
    if (command == "help") {
      std::cout << kUsage;
      return 0;
    }
  } catch (const po::error& e) {
    return fail(ExitCode::Usage, command + ": " + e.what() + " (see kmsfs " + command + " --help)");
  }
  return fail(ExitCode::Usage, "unknown command \"" + command + "\" (see kmsfs --help)");
}

}  // namespace

int main(int argc, char** argv) noexcept {
  // Before anything touches OpenSSL: its copies of keys (cipher contexts'
  // key schedules) stay out of core dumps (crypto/dontdump_heap.h).
  (void)kmsfs::crypto::install_openssl_dontdump_heap();
  try {
    return kmsfs::cli::finish(run(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "kmsfs: internal error: " << e.what() << "\n";
    return static_cast<int>(ExitCode::Failed);
  } catch (...) {
    std::cerr << "kmsfs: internal error\n";
    return static_cast<int>(ExitCode::Failed);
  }
}
