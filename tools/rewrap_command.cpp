#include "tools/rewrap_command.h"

#include <unistd.h>

#include <boost/program_options.hpp>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>

#include "fs/rewrap.h"
#include "keyclient/kms_options.h"

namespace kmsfs::cli {

namespace po = boost::program_options;

namespace {
constexpr const char* kHelp = R"(Usage: kmsfs rewrap CIPHERDIR [--to-key KEY] [--quiet]

Re-wraps every file's data key (and the volume's name key) to the newest
version of the volume's KMS key, or with --to-key to another key, through the
KMS's ReEncrypt: no data key leaves the KMS and no file data is touched. Each
128-byte header is replaced in one write; safe to interrupt and run again
(files already under the target key version are skipped); the volume may be
mounted meanwhile. With --to-key, kmsfs.json names the new key first and
rewrap waits two seconds before it scans: a live mount re-reads kmsfs.json
at most a second apart and makes every new file under the new key from then
on, so after a complete run no file needs the old key, mounted or not. An
interrupted run is resumed by `kmsfs rewrap CIPHERDIR` (kmsfs.json already
names the target). The volume's name key is rewrapped last.

Options:
  --to-key KEY   key id, ARN or alias to rewrap to (default: the volume's key)
  --quiet        no progress on stderr

Prints a JSON summary. Exit codes: 0 done, 1 some files failed (listed),
3/4 the KMS refused or is unavailable, 5 the cipher directory is unusable.
)";
}  // namespace

int cmd_rewrap(const GlobalOptions& g, const std::vector<std::string>& args) {
  if (g.help) {
    std::cout << kHelp;
    return 0;
  }
  po::options_description desc("Options");
  desc.add_options()("to-key", po::value<std::string>(), "")("quiet", po::bool_switch(), "")(
      "cipherdir", po::value<std::string>(), "");
  po::positional_options_description pos;
  pos.add("cipherdir", 1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).positional(pos).run(), vm);
  po::notify(vm);
  if (vm.count("cipherdir") == 0) {
    std::cerr << "kmsfs: rewrap: missing CIPHERDIR (see kmsfs rewrap --help)\n";
    return static_cast<int>(ExitCode::Usage);
  }
  const std::string cipherdir = vm["cipherdir"].as<std::string>();
  auto kms = keyclient::make_key_service(g.kms);
  if (!kms) {
    print_kms_error("kmsfs", kms.error());
    return static_cast<int>(exit_code_for(kms.error()));
  }
  fs::RewrapOptions opts;
  if (vm.count("to-key") != 0) opts.to_key = vm["to-key"].as<std::string>();
  const bool quiet = vm["quiet"].as<bool>();
  auto last = std::chrono::steady_clock::now() - std::chrono::seconds(10);
  opts.progress = [&](const fs::RewrapProgress& p) {
    if (quiet) return;
    auto now = std::chrono::steady_clock::now();
    if (p.done != p.total && now - last < std::chrono::milliseconds(500)) return;
    last = now;
    std::cerr << "\rrewrap: " << p.done << "/" << p.total << " files (" << p.rewrapped << " rewrapped, " << p.current
              << " already current, " << p.failed << " failed)" << (p.done == p.total ? "\n" : "") << std::flush;
  };
  auto r = fs::rewrap_volume(**kms, cipherdir, opts);
  if (!r) {
    std::cerr << "kmsfs: rewrap: " << r.error() << "\n";
    const bool kms_side = r.error().find("is unusable") != std::string::npos;
    return static_cast<int>(kms_side ? ExitCode::KmsRefused : ExitCode::Corrupt);
  }
  nlohmann::json out{{"CipherDir", cipherdir},
                     {"KeyId", r->target_key_arn},
                     {"KeyVersion", r->target_version},
                     {"Files", r->counts.total},
                     {"Rewrapped", r->counts.rewrapped},
                     {"AlreadyCurrent", r->counts.current},
                     {"Failed", r->counts.failed},
                     {"ConfigUpdated", r->config_updated},
                     {"Errors", r->errors}};
  std::cout << out.dump(4) << "\n";
  for (const auto& e : r->errors) std::cerr << "kmsfs: rewrap: " << e << "\n";
  return r->counts.failed == 0 ? 0 : static_cast<int>(ExitCode::Failed);
}

}  // namespace kmsfs::cli
