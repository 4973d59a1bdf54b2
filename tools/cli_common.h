#pragma once
// What every kmsfs tool shares: global options (accepted before or after the
// subcommand), exit codes, error printing and logging set-up.

#include <string>
#include <string_view>
#include <vector>

#include "keyclient/kms_error.h"
#include "keyclient/kms_options.h"

namespace kmsfs::cli {

// The documented exit codes of every tool.
enum class ExitCode : int {
  Ok = 0,
  Failed = 1,          // the operation failed (other reasons)
  Usage = 2,           // unknown command or option, missing argument
  KmsRefused = 3,      // the KMS refused: NotFound, Disabled, InvalidState, AccessDenied, ...
  KmsUnavailable = 4,  // the KMS or HSM is unavailable, or could not start
  Corrupt = 5,         // (kmsfs) the cipher directory is corrupt or unsupported
};

// Help text block listing the global options, environment and exit codes.
extern const char* const kGlobalOptionsHelp;
extern const char* const kEnvironmentHelp;
extern const char* const kExitCodesHelp;

struct GlobalOptions {
  keyclient::KmsOptions kms;  // resolved: spec, home, module, PIN file
  bool help = false;          // -h / --help anywhere
  bool verbose = false;       // -v / --verbose anywhere
  std::vector<std::string> rest;  // everything else, in order (subcommand first)
  std::string error;          // non-empty: a usage error (e.g. "--kms needs a value")
};

// Pulls --kms SPEC, --pkcs11-module PATH, --pin-file PATH (also as
// --opt=VALUE), -h/--help and -v/--verbose out of argv wherever they appear
// before a "--"; the rest is kept in order. KmsOptions are then resolved
// (KMSFS_KMS, KMSFS_HOME, defaults).
GlobalOptions parse_global_options(int argc, char** argv);

ExitCode exit_code_for(const keyclient::KmsError& e);

// "<tool>: <Name>: <message>" on stderr.
void print_kms_error(std::string_view tool, const keyclient::KmsError& e);

// stderr logging for the named loggers ("kmsfs", "kmsfs.kms", "kmsfs.p11",
// "kmsfs.fs"); level warn, debug when verbose; KMSFS_LOG_LEVEL
// (trace|debug|info|warn|error|critical|off) overrides both.
void setup_logging(bool verbose);

// For a process that holds data keys or the PIN (a mount, kmsd): not
// dumpable (no core file, no ptrace or /proc/PID/mem by other users), and
// RLIMIT_CORE 1, which the kernel honours as "no dump" also where
// core_pattern pipes dumps to a handler (systemd-coredump, apport) and
// fs.suid_dumpable=2 would dump a non-dumpable process there anyway.
void refuse_core_dumps();

// kmsfs keeps one descriptor per file or directory the kernel remembers (an
// O_PATH fd per inode), so a tree larger than the descriptor limit would
// fail lookups with EMFILE. Raises the soft limit to the hard one, and, with
// CAP_SYS_RESOURCE (root), both to fs.nr_open. Returns the soft limit now.
unsigned long raise_open_file_limit();

// The process's exit: `code`, through _exit (logs flushed first) when an
// HSM call is still hung in the PKCS#11 module (keyclient::hsm_calls_left_hung):
// exit handlers would tear down what that thread returns into.
int finish(int code);

}  // namespace kmsfs::cli
