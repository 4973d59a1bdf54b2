#include "tools/cli_common.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <sys/prctl.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>

#include "keyclient/bounded_hsm.h"

namespace kmsfs::cli {

using keyclient::KmsErrorCode;

const char* const kGlobalOptionsHelp = R"(Global options (before or after the command):
  --kms SPEC            where the KMS runs: "embedded" (in this process, the
                        default) or "unix:PATH" (kmsd, not yet available)
  --pkcs11-module PATH  PKCS#11 module of the HSM (default: SoftHSM2)
  --pin-file PATH       file holding the HSM user PIN (mode 0600; default
                        KMSFS_HOME/pin, created at first use)
  -v, --verbose         log debug messages to stderr
  -h, --help            help (also after a command: help for that command)
)";

const char* const kEnvironmentHelp = R"(Environment:
  KMSFS_KMS        default for --kms
  KMSFS_HOME       state of the embedded KMS: softhsm2.conf, tokens/, pin,
                   key records (default /var/lib/kmsfs for root,
                   ~/.local/share/kmsfs otherwise)
  KMSFS_LOG_LEVEL  trace|debug|info|warn|error|off (default warn)
  KMSFS_HSM_TIMEOUT_MS  deadline of one HSM call in ms (default 30000; 0 = none)
  SOFTHSM2_CONF    when set, SoftHSM2 uses it instead of KMSFS_HOME/softhsm2.conf
)";

const char* const kExitCodesHelp = R"(Exit codes:
  0  success
  1  the operation failed
  2  usage error (unknown command or option, missing argument)
  3  the KMS refused the request (NotFoundException, DisabledException,
     KMSInvalidStateException, AccessDeniedException, IncorrectKeyException,
     InvalidCiphertextException, AlreadyExistsException, ValidationException, ...)
  4  the KMS or HSM is unavailable or could not start (KMSInternalException,
     KeyUnavailableException, DependencyTimeoutException; module missing, PIN
     file refused, state directory unusable)
)";

GlobalOptions parse_global_options(int argc, char** argv) {
  GlobalOptions g;
  keyclient::KmsOptions opts;
  opts.spec.clear();  // empty = take KMSFS_KMS or "embedded" in resolve
  bool passthrough = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (passthrough) {
      g.rest.push_back(a);
      continue;
    }
    if (a == "--") {
      passthrough = true;
      g.rest.push_back(a);
      continue;
    }
    if (a == "-h" || a == "--help") {
      g.help = true;
      continue;
    }
    if (a == "-v" || a == "--verbose") {
      g.verbose = true;
      continue;
    }
    std::string* target = nullptr;
    std::string name = a;
    std::optional<std::string> inline_value;
    if (auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = a.substr(0, eq);
      inline_value = a.substr(eq + 1);
    }
    if (name == "--kms") {
      target = &opts.spec;
    } else if (name == "--pkcs11-module") {
      target = &opts.pkcs11_module;
    } else if (name == "--pin-file") {
      target = &opts.pin_file;
    }
    if (target == nullptr) {
      g.rest.push_back(a);
      continue;
    }
    if (inline_value) {
      *target = *inline_value;
    } else if (i + 1 < argc) {
      *target = argv[++i];
    } else {
      g.error = name + " needs a value";
      continue;
    }
    if (target->empty() && g.error.empty()) g.error = name + " needs a non-empty value";
  }
  g.kms = keyclient::resolve_kms_options(std::move(opts));
  return g;
}

ExitCode exit_code_for(const keyclient::KmsError& e) {
  switch (e.code) {
    case KmsErrorCode::KMSInternalException:
    case KmsErrorCode::KeyUnavailableException:
    case KmsErrorCode::DependencyTimeoutException:
      return ExitCode::KmsUnavailable;
    case KmsErrorCode::NotFoundException:
    case KmsErrorCode::DisabledException:
    case KmsErrorCode::KMSInvalidStateException:
    case KmsErrorCode::InvalidCiphertextException:
    case KmsErrorCode::IncorrectKeyException:
    case KmsErrorCode::AccessDeniedException:
    case KmsErrorCode::AlreadyExistsException:
    case KmsErrorCode::ValidationException:
    case KmsErrorCode::InvalidKeyUsageException:
    case KmsErrorCode::InvalidAliasNameException:
    case KmsErrorCode::InvalidArnException:
    case KmsErrorCode::LimitExceededException:
    case KmsErrorCode::MalformedPolicyDocumentException:
    case KmsErrorCode::UnsupportedOperationException:
    case KmsErrorCode::IncorrectKeyMaterialException:
    case KmsErrorCode::InvalidImportTokenException:
    case KmsErrorCode::ExpiredImportTokenException:
    case KmsErrorCode::InvalidGrantIdException:
    case KmsErrorCode::InvalidGrantTokenException:
    case KmsErrorCode::InvalidMarkerException:
    case KmsErrorCode::TagException:
      return ExitCode::KmsRefused;
  }
  return ExitCode::Failed;
}

void print_kms_error(std::string_view tool, const keyclient::KmsError& e) {
  std::cerr << tool << ": " << e.name() << ": " << e.message << "\n";
}

void setup_logging(bool verbose) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto level = verbose ? spdlog::level::debug : spdlog::level::warn;
  if (const char* env = std::getenv("KMSFS_LOG_LEVEL"); env != nullptr && *env != '\0') {
    level = spdlog::level::from_str(env);
  }
  auto main_logger = std::make_shared<spdlog::logger>("kmsfs", sink);
  spdlog::set_default_logger(main_logger);
  for (const char* name : {"kmsfs.kms", "kmsfs.p11", "kmsfs.fs"}) {
    if (!spdlog::get(name)) spdlog::register_logger(std::make_shared<spdlog::logger>(name, sink));
  }
  spdlog::set_level(level);
  spdlog::set_pattern("%n %l: %v");
}

void refuse_core_dumps() {
  (void)::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_CORE, &lim) == 0) {
    // 1, not 0: for a pipe core_pattern the kernel ignores 0 but skips the
    // dump at 1; a file dump needs at least a page, so 1 stops it too.
    lim.rlim_cur = lim.rlim_max >= 1 ? 1 : 0;
    (void)::setrlimit(RLIMIT_CORE, &lim);
  }
}

unsigned long raise_open_file_limit() {
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
  rlim_t ceiling = 0;
  if (std::FILE* f = std::fopen("/proc/sys/fs/nr_open", "r"); f != nullptr) {
    unsigned long v = 0;
    if (std::fscanf(f, "%lu", &v) == 1) ceiling = static_cast<rlim_t>(v);
    std::fclose(f);
  }
  if (ceiling > lim.rlim_max) {
    struct rlimit raised {ceiling, ceiling};
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) return static_cast<unsigned long>(ceiling);
  }
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &lim);
  }
  (void)::getrlimit(RLIMIT_NOFILE, &lim);
  return static_cast<unsigned long>(lim.rlim_cur);
}

int finish(int code) {
  if (!keyclient::hsm_calls_left_hung()) return code;
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& l) { l->flush(); });
  std::fflush(nullptr);
  std::_Exit(code);
}

}  // namespace kmsfs::cli
