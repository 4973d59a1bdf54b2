// kmsctl end to end: the built binary against its own KMSFS_HOME (its own
// softhsm2.conf and token, since SOFTHSM2_CONF is removed from its
// environment), several processes at once.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "tests/unit/keyclient/test_env.h"

extern char** environ;

namespace kmsfs::keyclient {
namespace {

struct ProcessResult {
  int rc = -1;
  std::string out;
  std::string err;
};

std::string kmsctl_path() { return std::string(KMSFS_BIN_DIR) + "/kmsctl"; }

pid_t spawn(const std::string& home, const std::vector<std::string>& args, const std::string& out_path,
            const std::string& err_path) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string s = *e;
    if (s.rfind("SOFTHSM2_CONF=", 0) == 0 || s.rfind("KMSFS_", 0) == 0) continue;
    env.push_back(s);
  }
  env.push_back("KMSFS_HOME=" + home);
  std::vector<std::string> argv_s{kmsctl_path()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(o, 1);
    ::dup2(e, 2);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

ProcessResult wait_for(pid_t pid, const std::string& out_path, const std::string& err_path) {
  ProcessResult r;
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  r.out = test::read_text(out_path);
  r.err = test::read_text(err_path);
  return r;
}

class KmsctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("kmsctl");
    home_ = dir_ + "/home";
  }
  ProcessResult kmsctl(const std::vector<std::string>& args) {
    const std::string out = dir_ + "/out", err = dir_ + "/err";
    return wait_for(spawn(home_, args, out, err), out, err);
  }
  std::string dir_;
  std::string home_;
};

TEST_F(KmsctlTest, CreateDescribeListAndDataKeyRoundTrip) {
  auto c = kmsctl({"create-key", "--description", "e2e", "--alias", "alias/e2e", "--tags", "team=fs"});
  ASSERT_EQ(c.rc, 0) << c.err;
  auto cj = nlohmann::json::parse(c.out);
  const std::string key_id = cj["KeyMetadata"]["KeyId"];
  EXPECT_EQ(cj["KeyMetadata"]["Description"], "e2e");
  EXPECT_EQ(cj["KeyMetadata"]["KeyState"], "Enabled");
  EXPECT_TRUE(std::filesystem::exists(home_ + "/softhsm2.conf"));

  auto d = kmsctl({"describe-key", "--key-id", "alias/e2e"});
  ASSERT_EQ(d.rc, 0) << d.err;
  EXPECT_EQ(nlohmann::json::parse(d.out)["KeyMetadata"]["KeyId"], key_id);

  auto l = kmsctl({"list-keys"});
  ASSERT_EQ(l.rc, 0) << l.err;
  auto lj = nlohmann::json::parse(l.out);
  ASSERT_EQ(lj["Keys"].size(), 1u);
  EXPECT_EQ(lj["Keys"][0]["KeyId"], key_id);

  auto a = kmsctl({"list-aliases", "--key-id", key_id});
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(nlohmann::json::parse(a.out)["Aliases"][0]["AliasName"], "alias/e2e");

  // Global options after the subcommand work too.
  auto g = kmsctl({"generate-data-key", "--key-id", "alias/e2e", "--encryption-context", "fs=1", "file=2",
                   "--kms", "embedded"});
  ASSERT_EQ(g.rc, 0) << g.err;
  auto gj = nlohmann::json::parse(g.out);
  EXPECT_EQ(gj["KeyId"], "arn:aws:kms:local:000000000000:key/" + key_id);
  const std::string blob = gj["CiphertextBlob"];
  const std::string plaintext = gj["Plaintext"];

  auto ok = kmsctl({"decrypt", "--ciphertext-blob", blob, "--encryption-context", "file=2", "fs=1"});
  ASSERT_EQ(ok.rc, 0) << ok.err;
  EXPECT_EQ(nlohmann::json::parse(ok.out)["Plaintext"], plaintext);

  auto bad = kmsctl({"decrypt", "--ciphertext-blob", blob, "--encryption-context", "fs=1"});
  EXPECT_EQ(bad.rc, 3);
  EXPECT_EQ(bad.err.rfind("kmsctl: InvalidCiphertextException: ", 0), 0u) << bad.err;

  test::write_text(dir_ + "/pt", "secret text");
  auto e = kmsctl({"encrypt", "--key-id", key_id, "--plaintext", "fileb://" + dir_ + "/pt"});
  ASSERT_EQ(e.rc, 0) << e.err;
  auto back = kmsctl({"decrypt", "--ciphertext-blob", nlohmann::json::parse(e.out)["CiphertextBlob"]});
  ASSERT_EQ(back.rc, 0) << back.err;
  EXPECT_EQ(nlohmann::json::parse(back.out)["Plaintext"], "c2VjcmV0IHRleHQ=");

  auto r = kmsctl({"generate-random", "--number-of-bytes", "16"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["Plaintext"].get<std::string>().size(), 24u);
}

// aws-cli habits: `--query FIELD --output text` prints one bare value (the
// `aws kms decrypt ... --query Plaintext --output text | base64 -d` idiom),
// grant constraints in aws-cli shorthand, and a bad --query refused before
// the call (no key made).
TEST_F(KmsctlTest, QueryOutputTextAndShorthandLikeAwsCli) {
  auto id = kmsctl({"create-key", "--query", "KeyMetadata.KeyId", "--output", "text"});
  ASSERT_EQ(id.rc, 0) << id.err;
  const std::string key = id.out.substr(0, id.out.find('\n'));
  EXPECT_EQ(key.size(), 36u) << id.out;
  test::write_text(dir_ + "/pt", "hello");
  auto blob = kmsctl({"encrypt", "--key-id", key, "--plaintext", "fileb://" + dir_ + "/pt", "--query", "CiphertextBlob",
                      "--output", "text"});
  ASSERT_EQ(blob.rc, 0) << blob.err;
  auto pt = kmsctl({"decrypt", "--ciphertext-blob", blob.out.substr(0, blob.out.find('\n')), "--query", "Plaintext",
                    "--output", "text"});
  ASSERT_EQ(pt.rc, 0) << pt.err;
  EXPECT_EQ(pt.out, "aGVsbG8=\n");
  auto json_out = kmsctl({"describe-key", "--key-id", key, "--query", "KeyMetadata.Enabled"});
  ASSERT_EQ(json_out.rc, 0) << json_out.err;
  EXPECT_EQ(json_out.out, "true\n");

  auto g = kmsctl({"create-grant", "--key-id", key, "--grantee-principal", "uid:1000", "--operations", "Decrypt",
                   "--constraints", "EncryptionContextSubset={Department=IT,Env=prod}"});
  ASSERT_EQ(g.rc, 0) << g.err;
  auto c = kmsctl({"list-grants", "--key-id", key, "--query", "Grants[0].Constraints.EncryptionContextSubset.Department",
                   "--output", "text"});
  ASSERT_EQ(c.rc, 0) << c.err;
  EXPECT_EQ(c.out, "IT\n");
  auto bad_shorthand = kmsctl({"create-grant", "--key-id", key, "--grantee-principal", "uid:1000", "--operations",
                               "Decrypt", "--constraints", "EncryptionContextSubset=Department"});
  EXPECT_EQ(bad_shorthand.rc, 2) << bad_shorthand.out;
  EXPECT_NE(bad_shorthand.err.find("--constraints"), std::string::npos) << bad_shorthand.err;

  auto bad = kmsctl({"create-key", "--query", "KeyMetadata..KeyId"});
  EXPECT_EQ(bad.rc, 2);
  EXPECT_NE(bad.err.find("--query"), std::string::npos) << bad.err;
  auto bad_out = kmsctl({"create-key", "--output", "yaml"});
  EXPECT_EQ(bad_out.rc, 2);
  auto keys = kmsctl({"list-keys", "--query", "Keys", "--output", "text"});
  ASSERT_EQ(keys.rc, 0) << keys.err;
  EXPECT_EQ(std::count(keys.out.begin(), keys.out.end(), '\n'), 1) << "a refused command created a key: " << keys.out;
}

TEST_F(KmsctlTest, ExitCodesAndMessages) {
  auto nf = kmsctl({"describe-key", "--key-id", "alias/missing"});
  EXPECT_EQ(nf.rc, 3);
  EXPECT_EQ(nf.err, "kmsctl: NotFoundException: Alias alias/missing is not found.\n");
  auto unknown = kmsctl({"frobnicate"});
  EXPECT_EQ(unknown.rc, 2);
  EXPECT_NE(unknown.err.find("frobnicate"), std::string::npos);
  auto bad_opt = kmsctl({"list-keys", "--bogus"});
  EXPECT_EQ(bad_opt.rc, 2);
  EXPECT_NE(bad_opt.err.find("--bogus"), std::string::npos) << bad_opt.err;
  auto missing = kmsctl({"describe-key"});
  EXPECT_EQ(missing.rc, 2);
  EXPECT_NE(missing.err.find("key-id"), std::string::npos) << missing.err;
  auto help = kmsctl({"--help"});
  EXPECT_EQ(help.rc, 0);
  EXPECT_NE(help.out.find("generate-data-key"), std::string::npos);
  EXPECT_NE(help.out.find("Exit codes"), std::string::npos);
  EXPECT_NE(help.out.find("KMSFS_HOME"), std::string::npos);
  auto sub_help = kmsctl({"decrypt", "--help"});
  EXPECT_EQ(sub_help.rc, 0);
  EXPECT_NE(sub_help.out.find("--ciphertext-blob"), std::string::npos);
  auto spec = kmsctl({"--kms", "unix:/nowhere", "list-keys"});
  EXPECT_EQ(spec.rc, 4);  // KMS unavailable
  EXPECT_NE(spec.err.find("/nowhere"), std::string::npos) << spec.err;
}

TEST_F(KmsctlTest, EveryOperationIsASubcommandWithAwsShapedOutput) {
  auto c = kmsctl({"create-key", "--description", "ops", "--alias", "alias/ops"});
  ASSERT_EQ(c.rc, 0) << c.err;
  const std::string key = nlohmann::json::parse(c.out)["KeyMetadata"]["KeyId"];
  auto other = kmsctl({"create-key", "--alias", "alias/other"});
  ASSERT_EQ(other.rc, 0) << other.err;

  // Commands with an empty AWS response print nothing, as `aws kms` does.
  auto rot = kmsctl({"enable-key-rotation", "--key-id", "alias/ops", "--rotation-period-in-days", "180"});
  ASSERT_EQ(rot.rc, 0) << rot.err;
  EXPECT_EQ(rot.out, "");
  auto st = kmsctl({"get-key-rotation-status", "--key-id", key});
  ASSERT_EQ(st.rc, 0) << st.err;
  EXPECT_EQ(nlohmann::json::parse(st.out)["RotationPeriodInDays"], 180);
  ASSERT_EQ(kmsctl({"rotate-key-on-demand", "--key-id", key}).rc, 0);
  auto lr = kmsctl({"list-key-rotations", "--key-id", key});
  ASSERT_EQ(lr.rc, 0) << lr.err;
  EXPECT_EQ(nlohmann::json::parse(lr.out)["Rotations"].size(), 1u);

  auto e = kmsctl({"encrypt", "--key-id", "alias/ops", "--plaintext", "aGVsbG8=", "--encryption-context", "a=1,b=2"});
  ASSERT_EQ(e.rc, 0) << e.err;
  const std::string blob = nlohmann::json::parse(e.out)["CiphertextBlob"];
  auto re = kmsctl({"re-encrypt", "--ciphertext-blob", blob, "--source-encryption-context", "a=1", "b=2",
                    "--destination-key-id", "alias/other"});
  ASSERT_EQ(re.rc, 0) << re.err;
  auto rj = nlohmann::json::parse(re.out);
  EXPECT_FALSE(rj.contains("Plaintext"));
  auto back = kmsctl({"decrypt", "--ciphertext-blob", rj["CiphertextBlob"], "--key-id", "alias/ops"});
  EXPECT_EQ(back.rc, 3);
  EXPECT_NE(back.err.find("IncorrectKeyException"), std::string::npos) << back.err;

  ASSERT_EQ(kmsctl({"tag-resource", "--key-id", key, "--tags", "env=prod", "TagKey=team,TagValue=fs"}).rc, 0);
  auto tags = kmsctl({"list-resource-tags", "--key-id", key});
  EXPECT_EQ(nlohmann::json::parse(tags.out)["Tags"].size(), 2u);
  auto g = kmsctl({"create-grant", "--key-id", key, "--grantee-principal", "uid:1000", "--operations", "Decrypt",
                   "Encrypt", "--encryption-context-subset", "a=1"});
  ASSERT_EQ(g.rc, 0) << g.err;
  auto lg = kmsctl({"list-grants", "--key-id", key});
  auto gj = nlohmann::json::parse(lg.out)["Grants"];
  ASSERT_EQ(gj.size(), 1u);
  EXPECT_EQ(gj[0]["Constraints"]["EncryptionContextSubset"]["a"], "1");
  EXPECT_EQ(gj[0]["Operations"], nlohmann::json({"Decrypt", "Encrypt"}));

  test::write_text(dir_ + "/bad-policy.json", R"({"Statement":[{"Effect":"Allow","Principal":"*"}]})");
  auto bad = kmsctl({"put-key-policy", "--key-id", key, "--policy", "file://" + dir_ + "/bad-policy.json"});
  EXPECT_EQ(bad.rc, 3);
  EXPECT_NE(bad.err.find("MalformedPolicyDocumentException"), std::string::npos) << bad.err;
  auto pol = kmsctl({"get-key-policy", "--key-id", key});
  ASSERT_EQ(pol.rc, 0) << pol.err;
  EXPECT_NE(nlohmann::json::parse(pol.out)["Policy"].get<std::string>().find("kms:*"), std::string::npos);

  auto s = kmsctl({"schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7"});
  ASSERT_EQ(s.rc, 0) << s.err;
  EXPECT_EQ(nlohmann::json::parse(s.out)["KeyState"], "PendingDeletion");
  auto dis = kmsctl({"encrypt", "--key-id", key, "--plaintext", "aGk="});
  EXPECT_EQ(dis.rc, 3);
  EXPECT_NE(dis.err.find("KMSInvalidStateException"), std::string::npos) << dis.err;
  ASSERT_EQ(kmsctl({"cancel-key-deletion", "--key-id", key}).rc, 0);
  auto d = kmsctl({"describe-key", "--key-id", key});
  EXPECT_EQ(nlohmann::json::parse(d.out)["KeyMetadata"]["KeyState"], "Disabled");

  auto v = kmsctl({"audit", "verify"});
  EXPECT_EQ(v.rc, 0) << v.out << v.err;
  EXPECT_TRUE(nlohmann::json::parse(v.out)["Valid"]);
  auto search = kmsctl({"audit", "search", "--key-id", key, "--event-name", "ReEncrypt"});
  ASSERT_EQ(search.rc, 0) << search.err;
  EXPECT_EQ(nlohmann::json::parse(search.out).size(), 1u);
  auto help = kmsctl({"create-grant", "--help"});
  EXPECT_EQ(help.rc, 0);
  EXPECT_NE(help.out.find("AWS operation: CreateGrant"), std::string::npos);
  EXPECT_NE(help.out.find("--encryption-context-subset"), std::string::npos);
}

TEST_F(KmsctlTest, ParallelProcessesLoseNoKeyOrAlias) {
  // First use (token initialisation) also races.
  constexpr int kProcs = 4;
  std::vector<pid_t> pids;
  for (int i = 0; i < kProcs; ++i) {
    pids.push_back(spawn(home_, {"create-key", "--alias", "alias/p" + std::to_string(i)},
                         dir_ + "/o" + std::to_string(i), dir_ + "/e" + std::to_string(i)));
  }
  std::set<std::string> ids;
  for (int i = 0; i < kProcs; ++i) {
    auto r = wait_for(pids[i], dir_ + "/o" + std::to_string(i), dir_ + "/e" + std::to_string(i));
    ASSERT_EQ(r.rc, 0) << r.err;
    ids.insert(nlohmann::json::parse(r.out)["KeyMetadata"]["KeyId"].get<std::string>());
  }
  auto l = kmsctl({"list-keys"});
  ASSERT_EQ(l.rc, 0) << l.err;
  std::set<std::string> listed;
  const auto lj = nlohmann::json::parse(l.out);
  for (const auto& k : lj["Keys"]) listed.insert(k["KeyId"].get<std::string>());
  EXPECT_EQ(listed, ids);
  auto a = kmsctl({"list-aliases"});
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(nlohmann::json::parse(a.out)["Aliases"].size(), static_cast<std::size_t>(kProcs));
}

TEST_F(KmsctlTest, RefusesAnOpenPinFile) {
  ASSERT_EQ(kmsctl({"list-keys"}).rc, 0);  // first use creates HOME/pin
  ASSERT_EQ(::chmod((home_ + "/pin").c_str(), 0644), 0);
  auto r = kmsctl({"list-keys"});
  EXPECT_EQ(r.rc, 4);
  EXPECT_NE(r.err.find("is readable by group or others (mode 0644); chmod 600 it"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace kmsfs::keyclient
