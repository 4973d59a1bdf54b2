// kmsctl: the KMS API on the command line, shaped like `aws kms`.
// Argument parsing and wiring only: each subcommand (kebab-case) is one AWS
// operation (PascalCase) sent through KeyService::call with an AWS JSON
// request built from its options; the JSON response is printed as is.

#include <openssl/crypto.h>

#include <boost/program_options.hpp>
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "crypto/dontdump_heap.h"
#include "crypto/encoding.h"
#include "keyclient/key_service.h"
#include "keyclient/kms_json.h"
#include "tools/cli_common.h"

namespace {

namespace po = boost::program_options;
using json = nlohmann::json;
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

void print_json(const json& j) { std::cout << j.dump(4) << "\n"; }

// --query: a JMESPath subset (dotted fields and [N] indexes), enough for
// `--query Plaintext`, `--query KeyMetadata.KeyId`, `--query Aliases[0].AliasName`.
// Missing fields select null, as in JMESPath.
std::optional<json> select_query(const json& in, const std::string& query) {
  const json* cur = &in;
  static const json null_value;
  std::size_t i = 0;
  while (i < query.size()) {
    if (query[i] == '.') {
      if (i == 0) return std::nullopt;
      ++i;
    }
    if (i < query.size() && query[i] == '[') {
      const auto close = query.find(']', i);
      if (close == std::string::npos || close == i + 1) return std::nullopt;
      const std::string digits = query.substr(i + 1, close - i - 1);
      if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) return std::nullopt;
      const std::size_t n = std::stoul(digits);
      cur = cur->is_array() && n < cur->size() ? &(*cur)[n] : &null_value;
      i = close + 1;
      continue;
    }
    std::size_t end = i;
    while (end < query.size() && (std::isalnum(static_cast<unsigned char>(query[end])) || query[end] == '_' || query[end] == '-')) ++end;
    if (end == i) return std::nullopt;
    const std::string field = query.substr(i, end - i);
    cur = cur->is_object() && cur->contains(field) ? &(*cur)[field] : &null_value;
    i = end;
  }
  return *cur;
}

// --output text, like aws-cli's: scalars bare, a list or an object's values
// tab-separated on one line, a list of objects one line each.
std::string text_of(const json& j) {
  if (j.is_null()) return "None";
  if (j.is_string()) return j.get<std::string>();
  if (j.is_boolean()) return j.get<bool>() ? "True" : "False";
  if (j.is_number()) return j.dump();
  std::string out;
  const bool rows = j.is_array() && !j.empty() && std::all_of(j.begin(), j.end(), [](const json& e) { return e.is_structured(); });
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it != j.begin()) out += rows ? "\n" : "\t";
    out += text_of(*it);
  }
  return out;
}

// Prints a response as --query and --output ask; false on a bad --query.
bool print_response(const json& j, const po::variables_map& vm) {
  json shown = j;
  if (vm.count("query") != 0) {
    auto q = select_query(j, vm["query"].as<std::string>());
    if (!q) return false;
    shown = std::move(*q);
  }
  if (vm["output"].as<std::string>() == "text") {
    std::cout << text_of(shown) << "\n";
  } else {
    print_json(shown);
  }
  return true;
}

std::string read_whole_file(const std::string& option, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError{option + ": cannot read " + path};
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// "fileb://PATH" (raw bytes) or base64, as `aws kms` takes blob arguments;
// returned as base64 for the JSON request.
std::string blob_argument(const std::string& option, const std::string& value) {
  if (value.rfind("fileb://", 0) == 0) {
    std::string raw = read_whole_file(option, value.substr(8));
    std::string b64 = kmsfs::crypto::to_base64(std::span(reinterpret_cast<const std::uint8_t*>(raw.data()), raw.size()));
    OPENSSL_cleanse(raw.data(), raw.size());
    return b64;
  }
  if (!kmsfs::crypto::from_base64(value)) throw UsageError{option + ": not base64 (use fileb://PATH for a file)"};
  return value;
}

// "file://PATH" or the text itself.
std::string text_argument(const std::string& option, const std::string& value) {
  if (value.rfind("file://", 0) == 0) return read_whole_file(option, value.substr(7));
  return value;
}

// aws-cli's shorthand for a map of maps: `Name={k=v,k2=v2},Other={k=v}`
// (e.g. --constraints EncryptionContextSubset={Department=IT}). Values are
// strings; no quoting (use JSON for values holding , = { or }).
json shorthand_argument(const std::string& option, const std::string& text) {
  const std::string hint = option + ": neither JSON nor aws-cli shorthand Name={key=value,...}";
  json out = json::object();
  std::size_t i = 0;
  while (i < text.size()) {
    const auto eq = text.find('=', i);
    if (eq == std::string::npos || eq == i || eq + 1 >= text.size() || text[eq + 1] != '{') throw UsageError{hint};
    const auto close = text.find('}', eq);
    if (close == std::string::npos) throw UsageError{hint};
    const std::string name = text.substr(i, eq - i);
    const std::string body = text.substr(eq + 2, close - eq - 2);
    json inner = json::object();
    std::size_t p = 0;
    while (p < body.size()) {
      auto comma = body.find(',', p);
      if (comma == std::string::npos) comma = body.size();
      const std::string pair = body.substr(p, comma - p);
      const auto e = pair.find('=');
      if (e == std::string::npos || e == 0 || pair.find_first_of("{}") != std::string::npos) throw UsageError{hint};
      inner[pair.substr(0, e)] = pair.substr(e + 1);
      p = comma + 1;
    }
    out[name] = inner;
    i = close + 1;
    if (i < text.size()) {
      if (text[i] != ',') throw UsageError{hint};
      ++i;
    }
  }
  if (out.empty()) throw UsageError{hint};
  return out;
}

// k=v pairs (several per option, comma-separated or repeated) or one JSON object.
json context_argument(const std::string& option, const std::vector<std::string>& items) {
  json ctx = json::object();
  for (const auto& item : items) {
    if (!item.empty() && item.front() == '{') {
      auto j = json::parse(item, nullptr, false);
      if (j.is_discarded() || !j.is_object()) throw UsageError{option + ": invalid JSON object"};
      for (const auto& [k, v] : j.items()) {
        if (!v.is_string()) throw UsageError{option + ": value of '" + k + "' is not a string"};
        ctx[k] = v;
      }
      continue;
    }
    std::size_t start = 0;
    while (start <= item.size()) {
      auto comma = item.find(',', start);
      std::string pair = item.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      auto eq = pair.find('=');
      if (eq == std::string::npos || eq == 0) throw UsageError{option + ": expected KEY=VALUE, got '" + pair + "'"};
      ctx[pair.substr(0, eq)] = pair.substr(eq + 1);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return ctx;
}

// "Key=V" or the aws form "TagKey=K,TagValue=V".
json tags_argument(const std::vector<std::string>& items) {
  json tags = json::array();
  for (const auto& item : items) {
    if (item.rfind("TagKey=", 0) == 0) {
      auto comma = item.find(",TagValue=");
      if (comma == std::string::npos) throw UsageError{"--tags: expected TagKey=K,TagValue=V, got '" + item + "'"};
      tags.push_back({{"TagKey", item.substr(7, comma - 7)}, {"TagValue", item.substr(comma + 10)}});
      continue;
    }
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) throw UsageError{"--tags: expected KEY=VALUE, got '" + item + "'"};
    tags.push_back({{"TagKey", item.substr(0, eq)}, {"TagValue", item.substr(eq + 1)}});
  }
  return tags;
}

// Epoch seconds or ISO 8601 UTC ("2027-01-01T00:00:00Z").
double time_argument(const std::string& option, const std::string& value) {
  char* end = nullptr;
  double d = std::strtod(value.c_str(), &end);
  if (end != value.c_str() && *end == '\0') return d;
  std::tm tm{};
  const char* p = ::strptime(value.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (p == nullptr || (*p != '\0' && std::string(p) != "Z")) {
    throw UsageError{option + ": expected epoch seconds or YYYY-MM-DDTHH:MM:SSZ, got '" + value + "'"};
  }
  return static_cast<double>(::timegm(&tm));
}

enum class Arg {
  String,      // a string field
  Int,         // an integer field
  Flag,        // a boolean field set by the bare option
  Blob,        // fileb://PATH or base64
  Context,     // KEY=VALUE ... or JSON: an encryption context object
  Tags,        // KEY=VALUE or TagKey=K,TagValue=V ...
  StringList,  // several strings
  Text,        // file://PATH or the text
  JsonValue,   // a JSON value (or file://PATH holding one)
  Time,        // epoch seconds or ISO 8601
};

struct Opt {
  const char* cli;    // option name without "--"
  const char* field;  // AWS request field; "A.B" nests
  Arg type;
  bool required;
  const char* help;
};

struct Command {
  const char* name;       // kebab-case
  const char* operation;  // PascalCase AWS operation
  const char* summary;
  std::vector<Opt> opts;
  const char* page_field = nullptr;  // list operations: all pages unless --limit/--marker
  bool print_empty = false;
};

std::vector<Command> commands() {
  const Opt key{"key-id", "KeyId", Arg::String, true, "key id, key ARN, alias name or alias ARN"};
  const Opt limit{"limit", "Limit", Arg::Int, false, "page size (then only one page is listed)"};
  const Opt marker{"marker", "Marker", Arg::String, false, "NextMarker of the previous page"};
  const Opt ctx{"encryption-context", "EncryptionContext", Arg::Context, false,
                "KEY=VALUE[,KEY=VALUE] ... (or a JSON object); must match at decrypt"};
  const Opt alg{"encryption-algorithm", "EncryptionAlgorithm", Arg::String, false, "SYMMETRIC_DEFAULT"};
  const Opt tokens{"grant-tokens", "GrantTokens", Arg::StringList, false, "tokens from create-grant; each must name a live grant (grants act at once here)"};
  return {
      {"create-key", "CreateKey", "Creates a customer managed AES-256 key (generated in the HSM, or EXTERNAL).",
       {{"description", "Description", Arg::String, false, "description of the key"},
        {"origin", "Origin", Arg::String, false, "AWS_KMS (default) or EXTERNAL (import the material)"},
        {"policy", "Policy", Arg::Text, false, "key policy document (JSON or file://PATH)"},
        {"tags", "Tags", Arg::Tags, false, "KEY=VALUE or TagKey=K,TagValue=V ..."},
        {"key-usage", "KeyUsage", Arg::String, false, "ENCRYPT_DECRYPT"},
        {"key-spec", "KeySpec", Arg::String, false, "SYMMETRIC_DEFAULT"},
        {"bypass-policy-lockout-safety-check", "BypassPolicyLockoutSafetyCheck", Arg::Flag, false,
         "accept a policy that would lock you out"},
        {"alias", "", Arg::String, false, "also create this alias (alias/NAME) for the key (kmsctl extension)"}}},
      {"describe-key", "DescribeKey", "Shows a key's metadata.", {key}},
      {"list-keys", "ListKeys", "Lists the keys.", {limit, marker}, "Keys"},
      {"update-key-description", "UpdateKeyDescription", "Changes a key's description.",
       {key, {"description", "Description", Arg::String, true, "new description"}}},
      {"enable-key", "EnableKey", "Enables a key.", {key}},
      {"disable-key", "DisableKey", "Disables a key (cryptographic use fails with DisabledException).", {key}},
      {"schedule-key-deletion", "ScheduleKeyDeletion",
       "Schedules deletion: after the window the key material is destroyed in the HSM.",
       {key, {"pending-window-in-days", "PendingWindowInDays", Arg::Int, false, "7-30 (default 30)"}}},
      {"cancel-key-deletion", "CancelKeyDeletion", "Cancels a scheduled deletion (the key stays Disabled).", {key}},
      {"enable-key-rotation", "EnableKeyRotation", "Turns on automatic rotation.",
       {key, {"rotation-period-in-days", "RotationPeriodInDays", Arg::Int, false, "90-2560 (default 365)"}}},
      {"disable-key-rotation", "DisableKeyRotation", "Turns off automatic rotation.", {key}},
      {"get-key-rotation-status", "GetKeyRotationStatus", "Shows the rotation settings.", {key}},
      {"rotate-key-on-demand", "RotateKeyOnDemand", "Adds a new key version now.", {key}},
      {"list-key-rotations", "ListKeyRotations", "Lists the key's rotations.", {key, limit, marker}, "Rotations"},
      {"create-alias", "CreateAlias", "Creates an alias for a key.",
       {{"alias-name", "AliasName", Arg::String, true, "alias/NAME"},
        {"target-key-id", "TargetKeyId", Arg::String, true, "key id or key ARN"}}},
      {"update-alias", "UpdateAlias", "Points an alias at another key.",
       {{"alias-name", "AliasName", Arg::String, true, "alias/NAME"},
        {"target-key-id", "TargetKeyId", Arg::String, true, "key id or key ARN"}}},
      {"delete-alias", "DeleteAlias", "Deletes an alias.", {{"alias-name", "AliasName", Arg::String, true, "alias/NAME"}}},
      {"list-aliases", "ListAliases", "Lists aliases, optionally only those of one key.",
       {{"key-id", "KeyId", Arg::String, false, "only aliases of this key"}, limit, marker}, "Aliases"},
      {"generate-data-key", "GenerateDataKey",
       "Returns a new data key in plaintext and wrapped under KEY (default AES_256).",
       {key, ctx, {"key-spec", "KeySpec", Arg::String, false, "AES_256 or AES_128"},
        {"number-of-bytes", "NumberOfBytes", Arg::Int, false, "1-1024"}, tokens}},
      {"generate-data-key-without-plaintext", "GenerateDataKeyWithoutPlaintext",
       "Returns a new data key wrapped under KEY only.",
       {key, ctx, {"key-spec", "KeySpec", Arg::String, false, "AES_256 or AES_128"},
        {"number-of-bytes", "NumberOfBytes", Arg::Int, false, "1-1024"}, tokens}},
      {"encrypt", "Encrypt", "Encrypts up to 4096 bytes under KEY.",
       {key, {"plaintext", "Plaintext", Arg::Blob, true, "fileb://PATH or base64 (1-4096 bytes)"}, ctx, alg, tokens}},
      {"decrypt", "Decrypt", "Decrypts a ciphertext blob (the key is named in the blob).",
       {{"ciphertext-blob", "CiphertextBlob", Arg::Blob, true, "fileb://PATH or base64"}, ctx,
        {"key-id", "KeyId", Arg::String, false, "refuse (IncorrectKeyException) unless the blob is under this key"},
        alg, tokens}},
      {"re-encrypt", "ReEncrypt", "Decrypts and re-encrypts inside the KMS; the plaintext never leaves it.",
       {{"ciphertext-blob", "CiphertextBlob", Arg::Blob, true, "fileb://PATH or base64"},
        {"source-encryption-context", "SourceEncryptionContext", Arg::Context, false, "context of the blob"},
        {"source-key-id", "SourceKeyId", Arg::String, false, "refuse unless the blob is under this key"},
        {"destination-key-id", "DestinationKeyId", Arg::String, true, "key to encrypt under"},
        {"destination-encryption-context", "DestinationEncryptionContext", Arg::Context, false, "new context"},
        tokens}},
      {"generate-random", "GenerateRandom", "Random bytes from the HSM.",
       {{"number-of-bytes", "NumberOfBytes", Arg::Int, true, "1-1024"}}},
      {"get-key-policy", "GetKeyPolicy", "Shows the key policy.",
       {key, {"policy-name", "PolicyName", Arg::String, false, "default"}}},
      {"put-key-policy", "PutKeyPolicy", "Replaces the key policy.",
       {key, {"policy", "Policy", Arg::Text, true, "policy document (JSON or file://PATH)"},
        {"policy-name", "PolicyName", Arg::String, false, "default"},
        {"bypass-policy-lockout-safety-check", "BypassPolicyLockoutSafetyCheck", Arg::Flag, false,
         "accept a policy that would lock you out"}}},
      {"list-key-policies", "ListKeyPolicies", "Lists the key's policy names.", {key, limit, marker}},
      {"get-parameters-for-import", "GetParametersForImport",
       "Creates an RSA wrapping key pair in the HSM and an import token (valid 24 h).",
       {key, {"wrapping-algorithm", "WrappingAlgorithm", Arg::String, true, "RSAES_OAEP_SHA_256"},
        {"wrapping-key-spec", "WrappingKeySpec", Arg::String, true, "RSA_3072 (or RSA_2048, RSA_4096)"}}},
      {"import-key-material", "ImportKeyMaterial", "Imports 256-bit key material wrapped with the public key.",
       {key, {"import-token", "ImportToken", Arg::Blob, true, "fileb://PATH or base64"},
        {"encrypted-key-material", "EncryptedKeyMaterial", Arg::Blob, true, "fileb://PATH or base64"},
        {"expiration-model", "ExpirationModel", Arg::String, false,
         "KEY_MATERIAL_EXPIRES or KEY_MATERIAL_DOES_NOT_EXPIRE"},
        {"valid-to", "ValidTo", Arg::Time, false, "expiry (epoch seconds or YYYY-MM-DDTHH:MM:SSZ)"}}},
      {"delete-imported-key-material", "DeleteImportedKeyMaterial",
       "Destroys imported key material in the HSM (the key becomes PendingImport).", {key}},
      {"tag-resource", "TagResource", "Adds or replaces tags.",
       {key, {"tags", "Tags", Arg::Tags, true, "KEY=VALUE or TagKey=K,TagValue=V ..."}}},
      {"untag-resource", "UntagResource", "Removes tags.",
       {key, {"tag-keys", "TagKeys", Arg::StringList, true, "tag keys to remove"}}},
      {"list-resource-tags", "ListResourceTags", "Lists a key's tags.", {key, limit, marker}, "Tags"},
      {"create-grant", "CreateGrant", "Grants a local principal some operations on a key.",
       {key, {"grantee-principal", "GranteePrincipal", Arg::String, true, "uid:N, user:NAME, gid:N or group:NAME"},
        {"operations", "Operations", Arg::StringList, true, "Decrypt Encrypt GenerateDataKey ..."},
        {"retiring-principal", "RetiringPrincipal", Arg::String, false, "who may retire the grant"},
        {"name", "Name", Arg::String, false, "grant name (same name and parameters: same grant)"},
        {"constraints", "Constraints", Arg::JsonValue, false, "{\"EncryptionContextSubset\":{...}} or ...Equals, or EncryptionContextSubset={k=v,...}"},
        {"encryption-context-equals", "Constraints.EncryptionContextEquals", Arg::Context, false,
         "constraint: the request's context must equal this"},
        {"encryption-context-subset", "Constraints.EncryptionContextSubset", Arg::Context, false,
         "constraint: the request's context must include this"},
        tokens}},
      {"list-grants", "ListGrants", "Lists a key's grants.",
       {key, {"grant-id", "GrantId", Arg::String, false, "only this grant"},
        {"grantee-principal", "GranteePrincipal", Arg::String, false, "only grants to this principal"}, limit, marker},
       "Grants"},
      {"retire-grant", "RetireGrant", "Retires a grant (by token, or key and grant id).",
       {{"grant-token", "GrantToken", Arg::String, false, "the grant token"},
        {"key-id", "KeyId", Arg::String, false, "the key (with --grant-id)"},
        {"grant-id", "GrantId", Arg::String, false, "the grant (with --key-id)"}}},
      {"revoke-grant", "RevokeGrant", "Revokes a grant.",
       {key, {"grant-id", "GrantId", Arg::String, true, "the grant"}}},
      {"audit verify", "VerifyAuditLog",
       "Verifies the audit trail's hash chain and HSM-MACed checkpoints; names the first bad record.", {}, nullptr,
       true},
      {"audit search", "SearchAuditLog", "Prints the audit records that match (JSON).",
       {{"key-id", "KeyId", Arg::String, false, "records about this key (id, ARN or alias)"},
        {"event-name", "EventName", Arg::String, false, "e.g. Decrypt"},
        {"since", "Since", Arg::String, false, "records at or after this time (YYYY-MM-DDTHH:MM:SSZ)"},
        {"limit", "Limit", Arg::Int, false, "at most this many records"}},
       nullptr, true},
  };
}

void add_options(po::options_description& d, const Command& c) {
  // aws-cli's output shaping, accepted after the command as aws-cli does.
  d.add_options()("query", po::value<std::string>(),
                  "print only this part of the response: FIELD, FIELD.SUB, FIELD[N] (a JMESPath subset)")(
      "output", po::value<std::string>()->default_value("json"), "json (default) or text: values without quotes, tab-separated");
  for (const auto& o : c.opts) {
    switch (o.type) {
      case Arg::Flag:
        d.add_options()(o.cli, po::bool_switch(), o.help);
        break;
      case Arg::Int:
        if (o.required) {
          d.add_options()(o.cli, po::value<long long>()->required(), o.help);
        } else {
          d.add_options()(o.cli, po::value<long long>(), o.help);
        }
        break;
      case Arg::Context:
      case Arg::Tags:
      case Arg::StringList:
        if (o.required) {
          d.add_options()(o.cli, po::value<std::vector<std::string>>()->multitoken()->composing()->required(), o.help);
        } else {
          d.add_options()(o.cli, po::value<std::vector<std::string>>()->multitoken()->composing(), o.help);
        }
        break;
      default:
        if (o.required) {
          d.add_options()(o.cli, po::value<std::string>()->required(), o.help);
        } else {
          d.add_options()(o.cli, po::value<std::string>(), o.help);
        }
    }
  }
}

void set_field(json& req, const std::string& field, json value) {
  auto dot = field.find('.');
  if (dot == std::string::npos) {
    req[field] = std::move(value);
    return;
  }
  req[field.substr(0, dot)][field.substr(dot + 1)] = std::move(value);
}

json build_request(const Command& c, const po::variables_map& vm) {
  json req = json::object();
  for (const auto& o : c.opts) {
    if (std::string(o.field).empty() || vm.count(o.cli) == 0) continue;
    const std::string option = std::string("--") + o.cli;
    switch (o.type) {
      case Arg::Flag:
        if (vm[o.cli].as<bool>()) set_field(req, o.field, true);
        break;
      case Arg::Int:
        set_field(req, o.field, vm[o.cli].as<long long>());
        break;
      case Arg::Blob:
        set_field(req, o.field, blob_argument(option, vm[o.cli].as<std::string>()));
        break;
      case Arg::Context:
        set_field(req, o.field, context_argument(option, vm[o.cli].as<std::vector<std::string>>()));
        break;
      case Arg::Tags:
        set_field(req, o.field, tags_argument(vm[o.cli].as<std::vector<std::string>>()));
        break;
      case Arg::StringList:
        set_field(req, o.field, vm[o.cli].as<std::vector<std::string>>());
        break;
      case Arg::Text:
        set_field(req, o.field, text_argument(option, vm[o.cli].as<std::string>()));
        break;
      case Arg::JsonValue: {
        const std::string text = text_argument(option, vm[o.cli].as<std::string>());
        auto j = json::parse(text, nullptr, false);
        if (j.is_discarded()) j = shorthand_argument(option, text);
        for (const auto& [k, v] : j.items()) set_field(req, std::string(o.field) + "." + k, v);
        break;
      }
      case Arg::Time:
        set_field(req, o.field, time_argument(option, vm[o.cli].as<std::string>()));
        break;
      case Arg::String:
        set_field(req, o.field, vm[o.cli].as<std::string>());
        break;
    }
  }
  return req;
}

int run_command(KeyService& kms, const Command& c, const po::variables_map& vm) {
  // Output options are checked before the call: a typo must not leave a
  // key created with nothing printed.
  const std::string output = vm["output"].as<std::string>();
  if (output != "json" && output != "text") throw UsageError{"--output must be json or text, not '" + output + "'"};
  if (vm.count("query") != 0 && !select_query(json::object(), vm["query"].as<std::string>())) {
    throw UsageError{"--query '" + vm["query"].as<std::string>() +
                     "': kmsctl understands FIELD, FIELD.SUB and FIELD[N] (a JMESPath subset)"};
  }
  json req = build_request(c, vm);
  const std::string name = c.name;
  if (name == "generate-data-key" || name == "generate-data-key-without-plaintext") {
    if (!req.contains("KeySpec") && !req.contains("NumberOfBytes")) req["KeySpec"] = "AES_256";
  }
  std::optional<std::string> alias;
  if (name == "create-key" && vm.count("alias") != 0) {
    alias = vm["alias"].as<std::string>();
    // Refuse before creating anything, so a taken or reserved name leaves no
    // stray key (and describing the managed alias would create its key).
    if (*alias == kmsfs::keyclient::kDefaultManagedAlias) {
      return kms_failure({KmsErrorCode::InvalidAliasNameException, *alias + " is reserved for the managed kmsfs key"});
    }
    auto existing = kms.call("DescribeKey", {{"KeyId", *alias}});
    if (existing) {
      return kms_failure({KmsErrorCode::AlreadyExistsException, "An alias with the name " + *alias + " already exists"});
    }
    if (existing.error().code != KmsErrorCode::NotFoundException) return kms_failure(existing.error());
  }
  json out;
  if (c.page_field != nullptr && !req.contains("Limit") && !req.contains("Marker")) {
    out = json{{c.page_field, json::array()}, {"Truncated", false}};
    for (;;) {
      auto r = kms.call(c.operation, req);
      if (!r) return kms_failure(r.error());
      for (auto& item : (*r)[c.page_field]) out[c.page_field].push_back(item);
      if (!r->value("Truncated", false)) break;
      req["Marker"] = (*r)["NextMarker"];
    }
  } else {
    auto r = kms.call(c.operation, req);
    if (!r) return kms_failure(r.error());
    out = std::move(*r);
  }
  if (alias) {
    auto a = kms.call("CreateAlias", {{"AliasName", *alias}, {"TargetKeyId", out["KeyMetadata"]["KeyId"]}});
    if (!a) return kms_failure(a.error());
  }
  if (name == "audit verify") {
    print_json(out);
    if (!out.value("Valid", false)) {
      std::cerr << kTool << ": the audit trail was tampered with: " << out.value("Problem", std::string()) << "\n";
      return static_cast<int>(ExitCode::Corrupt);
    }
    return 0;
  }
  if (name == "audit search") {
    print_json(out["Events"]);
    return 0;
  }
  if (out.empty() && !c.print_empty) return 0;  // like `aws kms`: empty responses print nothing
  (void)print_response(out, vm);  // --query was checked above
  return 0;
}

void general_help(std::ostream& os) {
  os << "Usage: kmsctl [GLOBAL OPTIONS] COMMAND [OPTIONS]\n\n"
        "The kmsfs KMS on the command line, shaped like `aws kms`: each command is the AWS\n"
        "operation of that name (create-key = CreateKey), options are its request fields,\n"
        "output is its JSON response, errors carry the AWS error names. KEY is a key id,\n"
        "key ARN, alias name (alias/NAME) or alias ARN; blobs are fileb://PATH or base64.\n\n"
        "Commands:\n";
  for (const auto& c : commands()) {
    std::string n = c.name;
    if (n.size() < 36) n.resize(36, ' ');
    os << "  " << n << " " << c.summary << "\n";
  }
  os << "\n'kmsctl COMMAND --help' shows a command's options.\n\n"
     << kmsfs::cli::kGlobalOptionsHelp << "\n"
     << kmsfs::cli::kEnvironmentHelp << "\n"
     << kmsfs::cli::kExitCodesHelp
     << "  (kmsctl audit verify exits 5 when the audit trail was tampered with)\n";
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
  std::string name = g.rest[0];
  std::size_t first_arg = 1;
  if (name == "audit") {
    if (g.rest.size() < 2) return usage_error("audit: expected 'audit verify' or 'audit search'");
    name += " " + g.rest[1];
    first_arg = 2;
  }
  const auto all = commands();
  const Command* cmd = nullptr;
  for (const auto& c : all) {
    if (name == c.name) cmd = &c;
  }
  if (cmd == nullptr) return usage_error("unknown command '" + name + "' (see kmsctl --help)");

  po::options_description desc("Options");
  add_options(desc, *cmd);
  if (g.help) {
    std::cout << "Usage: kmsctl " << cmd->name << " [OPTIONS]\n\n"
              << cmd->summary << "\nAWS operation: " << cmd->operation << "\n\n"
              << desc << "\n"
              << kmsfs::cli::kGlobalOptionsHelp << "\n"
              << kmsfs::cli::kExitCodesHelp;
    return 0;
  }
  std::vector<std::string> args(g.rest.begin() + static_cast<std::ptrdiff_t>(first_arg), g.rest.end());
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
    return run_command(**kms, *cmd, vm);
  } catch (const UsageError& e) {
    return usage_error(name + ": " + e.message);
  }
}

}  // namespace

int main(int argc, char** argv) noexcept {
  // Before anything touches OpenSSL: its copies of keys (cipher contexts'
  // key schedules) stay out of core dumps (crypto/dontdump_heap.h).
  (void)kmsfs::crypto::install_openssl_dontdump_heap();
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << kTool << ": internal error: " << e.what() << "\n";
  } catch (...) {
    std::cerr << kTool << ": internal error\n";
  }
  return static_cast<int>(ExitCode::Failed);
}
