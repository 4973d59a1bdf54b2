// kmsctl: the KMS API on the command line, shaped like `aws kms`.
// Argument parsing and wiring only; the work happens in keyclient/.

#include <openssl/crypto.h>

#include <boost/program_options.hpp>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "crypto/encoding.h"
#include "keyclient/key_service.h"
#include "keyclient/kms_json.h"
#include "tools/cli_common.h"

namespace {

namespace po = boost::program_options;
using kmsfs::cli::ExitCode;
using kmsfs::keyclient::KeyService;
using kmsfs::keyclient::KmsError;
using kmsfs::keyclient::KmsErrorCode;

constexpr const char* kTool = "kmsctl";

// A usage problem found while turning arguments into a request.
struct UsageError {
  std::string message;
};

int usage_error(const std::string& message) {
  std::cerr << kTool << ": " << message << "\n";
  return static_cast<int>(ExitCode::Usage);
}

int kms_failure(const KmsError& e) {
  kmsfs::cli::print_kms_error(kTool, e);
  return static_cast<int>(kmsfs::cli::exit_code_for(e));
}

void print_json(const nlohmann::json& j) { std::cout << j.dump(4) << "\n"; }

// "fileb://PATH" (raw bytes) or base64, as `aws kms` takes blob arguments.
std::vector<std::uint8_t> blob_argument(const std::string& option, const std::string& value) {
  if (value.rfind("fileb://", 0) == 0) {
    const std::string path = value.substr(8);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw UsageError{option + ": cannot read " + path};
    return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto bytes = kmsfs::crypto::from_base64(value);
  if (!bytes) throw UsageError{option + ": not base64 (use fileb://PATH for a file)"};
  return std::move(*bytes);
}

// k=v pairs (several per option, option repeatable) or one JSON object.
kmsfs::keyclient::EncryptionContext context_argument(const std::vector<std::string>& items) {
  kmsfs::keyclient::EncryptionContext ctx;
  for (const auto& item : items) {
    if (!item.empty() && item.front() == '{') {
      auto j = nlohmann::json::parse(item, nullptr, false);
      if (j.is_discarded() || !j.is_object()) throw UsageError{"--encryption-context: invalid JSON object"};
      for (const auto& [k, v] : j.items()) {
        if (!v.is_string()) throw UsageError{"--encryption-context: value of '" + k + "' is not a string"};
        ctx[k] = v.get<std::string>();
      }
      continue;
    }
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw UsageError{"--encryption-context: expected KEY=VALUE, got '" + item + "'"};
    }
    ctx[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return ctx;
}

// "Key=V" or the aws form "TagKey=K,TagValue=V".
std::vector<kmsfs::keyclient::Tag> tags_argument(const std::vector<std::string>& items) {
  std::vector<kmsfs::keyclient::Tag> tags;
  for (const auto& item : items) {
    if (item.rfind("TagKey=", 0) == 0) {
      auto comma = item.find(",TagValue=");
      if (comma == std::string::npos) throw UsageError{"--tags: expected TagKey=K,TagValue=V, got '" + item + "'"};
      tags.push_back({item.substr(7, comma - 7), item.substr(comma + 10)});
      continue;
    }
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) throw UsageError{"--tags: expected KEY=VALUE, got '" + item + "'"};
    tags.push_back({item.substr(0, eq), item.substr(eq + 1)});
  }
  return tags;
}

template <class T>
std::optional<T> opt(const po::variables_map& vm, const char* name) {
  if (vm.count(name) == 0) return std::nullopt;
  return vm[name].as<T>();
}

struct Command {
  const char* name;
  const char* synopsis;
  const char* summary;
  std::function<void(po::options_description&)> options;
  std::function<int(KeyService&, const po::variables_map&)> run;
};

int cmd_create_key(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::CreateKeyRequest req;
  if (auto d = opt<std::string>(vm, "description")) req.description = *d;
  if (auto t = opt<std::vector<std::string>>(vm, "tags")) req.tags = tags_argument(*t);
  if (auto p = opt<std::string>(vm, "policy")) {
    if (p->rfind("file://", 0) == 0) {
      std::ifstream in(p->substr(7));
      if (!in) throw UsageError{"--policy: cannot read " + p->substr(7)};
      req.policy = std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } else {
      req.policy = *p;
    }
  }
  auto alias = opt<std::string>(vm, "alias");
  if (alias) {
    // Refuse before creating anything, so a taken or reserved name leaves no
    // stray key (and describing the managed alias would create its key).
    if (*alias == kmsfs::keyclient::kDefaultManagedAlias) {
      return kms_failure({KmsErrorCode::InvalidAliasNameException,
                          *alias + " is reserved for the managed kmsfs key"});
    }
    auto existing = kms.describe_key({*alias});
    if (existing) {
      return kms_failure({KmsErrorCode::AlreadyExistsException, "An alias with the name " + *alias + " already exists"});
    }
    if (existing.error().code != KmsErrorCode::NotFoundException) return kms_failure(existing.error());
  }
  auto r = kms.create_key(req);
  if (!r) return kms_failure(r.error());
  print_json(*r);
  if (alias) {
    auto a = kms.create_alias({*alias, r->key_metadata.key_id});
    if (!a) return kms_failure(a.error());
  }
  return 0;
}

int cmd_list_keys(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::ListKeysRequest req;
  req.limit = opt<int>(vm, "limit");
  req.marker = opt<std::string>(vm, "marker");
  const bool one_page = req.limit.has_value() || req.marker.has_value();
  kmsfs::keyclient::ListKeysResponse all;
  for (;;) {
    auto r = kms.list_keys(req);
    if (!r) return kms_failure(r.error());
    all.keys.insert(all.keys.end(), r->keys.begin(), r->keys.end());
    all.truncated = r->truncated;
    all.next_marker = r->next_marker;
    if (one_page || !r->truncated) break;
    req.marker = r->next_marker;
  }
  print_json(all);
  return 0;
}

int cmd_describe_key(KeyService& kms, const po::variables_map& vm) {
  auto r = kms.describe_key({vm["key-id"].as<std::string>()});
  if (!r) return kms_failure(r.error());
  print_json(*r);
  return 0;
}

int cmd_create_alias(KeyService& kms, const po::variables_map& vm) {
  auto r = kms.create_alias({vm["alias-name"].as<std::string>(), vm["target-key-id"].as<std::string>()});
  if (!r) return kms_failure(r.error());
  return 0;  // like `aws kms create-alias`: no output
}

int cmd_list_aliases(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::ListAliasesRequest req;
  req.key_id = opt<std::string>(vm, "key-id");
  kmsfs::keyclient::ListAliasesResponse all;
  for (;;) {
    auto r = kms.list_aliases(req);
    if (!r) return kms_failure(r.error());
    all.aliases.insert(all.aliases.end(), r->aliases.begin(), r->aliases.end());
    if (!r->truncated) break;
    req.marker = r->next_marker;
  }
  print_json(all);
  return 0;
}

int cmd_generate_data_key(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::GenerateDataKeyRequest req;
  req.key_id = vm["key-id"].as<std::string>();
  if (auto c = opt<std::vector<std::string>>(vm, "encryption-context")) req.encryption_context = context_argument(*c);
  req.key_spec = opt<std::string>(vm, "key-spec");
  req.number_of_bytes = opt<int>(vm, "number-of-bytes");
  if (!req.key_spec && !req.number_of_bytes) req.key_spec = "AES_256";
  auto r = kms.generate_data_key(req);
  if (!r) return kms_failure(r.error());
  print_json(*r);
  return 0;
}

int cmd_decrypt(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::DecryptRequest req;
  req.ciphertext_blob = blob_argument("--ciphertext-blob", vm["ciphertext-blob"].as<std::string>());
  if (auto c = opt<std::vector<std::string>>(vm, "encryption-context")) req.encryption_context = context_argument(*c);
  req.key_id = opt<std::string>(vm, "key-id");
  if (auto a = opt<std::string>(vm, "encryption-algorithm")) req.encryption_algorithm = *a;
  auto r = kms.decrypt(req);
  if (!r) return kms_failure(r.error());
  print_json(*r);
  return 0;
}

int cmd_encrypt(KeyService& kms, const po::variables_map& vm) {
  kmsfs::keyclient::EncryptRequest req;
  req.key_id = vm["key-id"].as<std::string>();
  auto pt = blob_argument("--plaintext", vm["plaintext"].as<std::string>());
  req.plaintext = kmsfs::crypto::SecureBuffer::from(pt);
  OPENSSL_cleanse(pt.data(), pt.size());
  if (auto c = opt<std::vector<std::string>>(vm, "encryption-context")) req.encryption_context = context_argument(*c);
  if (auto a = opt<std::string>(vm, "encryption-algorithm")) req.encryption_algorithm = *a;
  auto r = kms.encrypt(req);
  if (!r) return kms_failure(r.error());
  print_json(*r);
  return 0;
}

int cmd_generate_random(KeyService& kms, const po::variables_map& vm) {
  auto r = kms.generate_random({vm["number-of-bytes"].as<int>()});
  if (!r) return kms_failure(r.error());
  print_json(*r);
  return 0;
}

void ctx_option(po::options_description& d) {
  d.add_options()("encryption-context", po::value<std::vector<std::string>>()->multitoken()->composing(),
                  "KEY=VALUE ... (or a JSON object); must match at decrypt");
}

std::vector<Command> commands() {
  return {
      {"create-key", "[--description TEXT] [--alias alias/NAME] [--tags KEY=VALUE ...] [--policy JSON|file://PATH]",
       "Creates a customer managed AES-256 key in the HSM.",
       [](po::options_description& d) {
         d.add_options()("description", po::value<std::string>(), "description of the key")(
             "alias", po::value<std::string>(), "also create this alias (alias/NAME) for the key")(
             "tags", po::value<std::vector<std::string>>()->multitoken()->composing(),
             "KEY=VALUE or TagKey=K,TagValue=V ...")("policy", po::value<std::string>(),
                                                       "key policy document (JSON or file://PATH)");
       },
       cmd_create_key},
      {"list-keys", "[--limit N] [--marker M]", "Lists the keys (all pages unless --limit or --marker).",
       [](po::options_description& d) {
         d.add_options()("limit", po::value<int>(), "page size (1-1000)")("marker", po::value<std::string>(),
                                                                         "NextMarker of the previous page");
       },
       cmd_list_keys},
      {"describe-key", "--key-id KEY", "Shows a key's metadata.",
       [](po::options_description& d) {
         d.add_options()("key-id", po::value<std::string>()->required(), "key id, key ARN, alias name or alias ARN");
       },
       cmd_describe_key},
      {"create-alias", "--alias-name alias/NAME --target-key-id KEY", "Creates an alias for a key.",
       [](po::options_description& d) {
         d.add_options()("alias-name", po::value<std::string>()->required(), "alias/NAME")(
             "target-key-id", po::value<std::string>()->required(), "key id or key ARN");
       },
       cmd_create_alias},
      {"list-aliases", "[--key-id KEY]", "Lists aliases, optionally only those of one key.",
       [](po::options_description& d) {
         d.add_options()("key-id", po::value<std::string>(), "only aliases of this key");
       },
       cmd_list_aliases},
      {"generate-data-key",
       "--key-id KEY [--encryption-context K=V ...] [--key-spec AES_256|AES_128 | --number-of-bytes N]",
       "Returns a new data key in plaintext and wrapped under KEY (default AES_256).",
       [](po::options_description& d) {
         d.add_options()("key-id", po::value<std::string>()->required(), "key id, ARN or alias")(
             "key-spec", po::value<std::string>(), "AES_256 or AES_128")("number-of-bytes", po::value<int>(),
                                                                          "1-1024");
         ctx_option(d);
       },
       cmd_generate_data_key},
      {"decrypt", "--ciphertext-blob fileb://PATH|BASE64 [--encryption-context K=V ...] [--key-id KEY]",
       "Decrypts a ciphertext blob (the key is named in the blob).",
       [](po::options_description& d) {
         d.add_options()("ciphertext-blob", po::value<std::string>()->required(), "fileb://PATH or base64")(
             "key-id", po::value<std::string>(), "refuse unless the blob was encrypted under this key")(
             "encryption-algorithm", po::value<std::string>(), "SYMMETRIC_DEFAULT");
         ctx_option(d);
       },
       cmd_decrypt},
      {"encrypt", "--key-id KEY --plaintext fileb://PATH|BASE64 [--encryption-context K=V ...]",
       "Encrypts up to 4096 bytes under KEY.",
       [](po::options_description& d) {
         d.add_options()("key-id", po::value<std::string>()->required(), "key id, ARN or alias")(
             "plaintext", po::value<std::string>()->required(), "fileb://PATH or base64 (1-4096 bytes)")(
             "encryption-algorithm", po::value<std::string>(), "SYMMETRIC_DEFAULT");
         ctx_option(d);
       },
       cmd_encrypt},
      {"generate-random", "--number-of-bytes N", "Random bytes from the HSM.",
       [](po::options_description& d) {
         d.add_options()("number-of-bytes", po::value<int>()->required(), "1-1024");
       },
       cmd_generate_random},
  };
}

void general_help(std::ostream& os) {
  os << "Usage: kmsctl [GLOBAL OPTIONS] COMMAND [OPTIONS]\n\n"
        "The kmsfs KMS on the command line, shaped like `aws kms`: JSON output, the same\n"
        "operation, field and error names. KEY is a key id, key ARN, alias name\n"
        "(alias/NAME) or alias ARN.\n\nCommands:\n";
  for (const auto& c : commands()) {
    std::string n = c.name;
    n.resize(20, ' ');
    os << "  " << n << c.summary << "\n";
  }
  os << "\n'kmsctl COMMAND --help' shows a command's options.\n\n"
     << kmsfs::cli::kGlobalOptionsHelp << "\n"
     << kmsfs::cli::kEnvironmentHelp << "\n"
     << kmsfs::cli::kExitCodesHelp;
}

int run(int argc, char** argv) {
  kmsfs::cli::GlobalOptions g = kmsfs::cli::parse_global_options(argc, argv);
  kmsfs::cli::setup_logging(g.verbose);
  if (!g.error.empty()) return usage_error(g.error);
  if (g.rest.empty() || g.rest[0] == "help") {
    if (g.help || !g.rest.empty()) {
      general_help(std::cout);
      return 0;
    }
    general_help(std::cerr);
    return static_cast<int>(ExitCode::Usage);
  }
  const std::string name = g.rest[0];
  const auto all = commands();
  const Command* cmd = nullptr;
  for (const auto& c : all) {
    if (name == c.name) cmd = &c;
  }
  if (cmd == nullptr) return usage_error("unknown command '" + name + "' (see kmsctl --help)");

  po::options_description desc("Options");
  cmd->options(desc);
  if (g.help) {
    std::cout << "Usage: kmsctl " << cmd->name << " " << cmd->synopsis << "\n\n"
              << cmd->summary << "\n\n"
              << desc << "\n"
              << kmsfs::cli::kGlobalOptionsHelp << "\n"
              << kmsfs::cli::kExitCodesHelp;
    return 0;
  }
  std::vector<std::string> args(g.rest.begin() + 1, g.rest.end());
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    return usage_error(name + ": " + e.what() + " (see kmsctl " + name + " --help)");
  }

  auto kms = kmsfs::keyclient::make_key_service(g.kms);
  if (!kms) {
    kmsfs::cli::print_kms_error(kTool, kms.error());
    // A malformed --kms spec is a usage error; start-up failures (module,
    // token, PIN file, state dir) come back as KMSInternal/KeyUnavailable,
    // i.e. exit code 4.
    if (kms.error().code == KmsErrorCode::ValidationException) return static_cast<int>(ExitCode::Usage);
    return static_cast<int>(kmsfs::cli::exit_code_for(kms.error()));
  }
  try {
    return cmd->run(**kms, vm);
  } catch (const UsageError& e) {
    return usage_error(name + ": " + e.message);
  }
}

}  // namespace

int main(int argc, char** argv) noexcept {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << kTool << ": internal error: " << e.what() << "\n";
  } catch (...) {
    std::cerr << kTool << ": internal error\n";
  }
  return static_cast<int>(ExitCode::Failed);
}
