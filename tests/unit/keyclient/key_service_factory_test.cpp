#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>

#include "keyclient/kms_options.h"
#include "tests/unit/keyclient/test_env.h"

namespace kmsfs::keyclient {
namespace {

KmsOptions options_for(const std::string& home) {
  KmsOptions o;
  o.home = home;
  o.token_label = test::unique_token_label();  // one token per test in the shared token dir
  return o;
}

TEST(KeyServiceFactory, FirstUseCreatesPinFilesAndAWorkingService) {
  const std::string home = test::make_temp_dir("home") + "/kms";  // does not exist yet
  auto svc = make_key_service(options_for(home));
  ASSERT_TRUE(svc) << svc.error().to_string();
  struct stat st {};
  ASSERT_EQ(::stat(home.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  for (const char* f : {"/pin", "/so-pin"}) {
    ASSERT_EQ(::stat((home + f).c_str(), &st), 0) << f;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << f;
    auto pin = test::read_text(home + f);
    EXPECT_EQ(pin.size(), 32u);
    EXPECT_EQ(pin.find_first_not_of("0123456789abcdef"), std::string::npos);
  }
  EXPECT_NE(test::read_text(home + "/pin"), test::read_text(home + "/so-pin"));

  auto k = (*svc)->create_key({});
  ASSERT_TRUE(k) << k.error().to_string();
  GenerateDataKeyRequest g;
  g.key_id = k->key_metadata.key_id;
  g.number_of_bytes = 32;
  auto dk = (*svc)->generate_data_key(g);
  ASSERT_TRUE(dk) << dk.error().to_string();
  DecryptRequest d;
  d.ciphertext_blob = dk->ciphertext_blob;
  auto p = (*svc)->decrypt(d);
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->plaintext == dk->plaintext);
}

TEST(KeyServiceFactory, SecondOpenOfAHomeReusesItsToken) {
  const std::string home = test::make_temp_dir("home");
  auto opts = options_for(home);
  std::string key_id;
  {
    auto svc = make_key_service(opts);
    ASSERT_TRUE(svc) << svc.error().to_string();
    key_id = (*svc)->create_key({})->key_metadata.key_id;
  }
  auto svc = make_key_service(opts);
  ASSERT_TRUE(svc) << svc.error().to_string();
  GenerateDataKeyRequest g;
  g.key_id = key_id;
  g.key_spec = "AES_256";
  EXPECT_TRUE((*svc)->generate_data_key(g));
}

TEST(KeyServiceFactory, RefusesAGroupReadablePinFile) {
  const std::string home = test::make_temp_dir("home");
  test::write_text(home + "/pin", "0123456789abcdef0123456789abcdef");
  ASSERT_EQ(::chmod((home + "/pin").c_str(), 0644), 0);
  auto svc = make_key_service(options_for(home));
  ASSERT_FALSE(svc);
  EXPECT_EQ(svc.error().message,
            "PIN file " + home + "/pin is readable by group or others (mode 0644); chmod 600 it");
}

TEST(KeyServiceFactory, RefusesAnExplicitPinFileWithOpenMode) {
  const std::string home = test::make_temp_dir("home");
  const std::string pin = test::make_temp_dir("pins") + "/user-pin";
  test::write_text(pin, "1234\n");
  ASSERT_EQ(::chmod(pin.c_str(), 0640), 0);
  auto opts = options_for(home);
  opts.pin_file = pin;
  auto svc = make_key_service(opts);
  ASSERT_FALSE(svc);
  EXPECT_NE(svc.error().message.find("chmod 600"), std::string::npos) << svc.error().message;
}

TEST(KeyServiceFactory, RefusesAGroupWritableHome) {
  const std::string home = test::make_temp_dir("home");
  ASSERT_EQ(::chmod(home.c_str(), 0770), 0);
  auto svc = make_key_service(options_for(home));
  ASSERT_FALSE(svc);
  EXPECT_NE(svc.error().message.find("writable by group or others (mode 0770)"), std::string::npos)
      << svc.error().message;
  EXPECT_FALSE(std::filesystem::exists(home + "/pin"));  // nothing created in it
}

TEST(KeyServiceFactory, UnixSpecReachesKmsdAndUnknownSpecsAreRefused) {
  auto opts = options_for(test::make_temp_dir("home"));
  opts.spec = "unix:/nonexistent/kmsd.sock";
  auto a = make_key_service(opts);
  ASSERT_TRUE(a) << a.error().to_string();  // connects lazily, reconnects by itself
  auto call = (*a)->list_keys({});
  ASSERT_FALSE(call);
  EXPECT_EQ(call.error().code, KmsErrorCode::KMSInternalException);
  EXPECT_NE(call.error().message.find("/nonexistent/kmsd.sock"), std::string::npos) << call.error().message;
  opts.spec = "carrier-pigeon";
  auto b = make_key_service(opts);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, KmsErrorCode::ValidationException);
  EXPECT_NE(b.error().message.find("carrier-pigeon"), std::string::npos);
}

TEST(KeyServiceFactory, MissingModuleIsAStartupFailureNamingIt) {
  auto opts = options_for(test::make_temp_dir("home"));
  opts.pkcs11_module = "/nonexistent/pkcs11.so";
  opts.pin_file = test::make_temp_dir("pins") + "/pin";
  test::write_text(opts.pin_file, "1234");
  ASSERT_EQ(::chmod(opts.pin_file.c_str(), 0600), 0);
  auto svc = make_key_service(opts);
  ASSERT_FALSE(svc);
  EXPECT_EQ(svc.error().code, KmsErrorCode::KeyUnavailableException);
  EXPECT_NE(svc.error().message.find("/nonexistent/pkcs11.so"), std::string::npos);
}

TEST(KeyServiceFactory, HsmTimeoutComesFromTheEnvironmentAndBadValuesAreRefused) {
  KmsOptions o;
  EXPECT_EQ(resolve_kms_options(o).hsm_timeout_ms, 30000);
  ::setenv("KMSFS_HSM_TIMEOUT_MS", "0", 1);
  EXPECT_EQ(resolve_kms_options(o).hsm_timeout_ms, 0);
  ::setenv("KMSFS_HSM_TIMEOUT_MS", "2500", 1);
  EXPECT_EQ(resolve_kms_options(o).hsm_timeout_ms, 2500);
  o.hsm_timeout_ms = 7;  // an explicit value wins over the environment
  EXPECT_EQ(resolve_kms_options(o).hsm_timeout_ms, 7);
  for (const char* bad : {"soon", "-5", "99999999999"}) {
    ::setenv("KMSFS_HSM_TIMEOUT_MS", bad, 1);
    auto svc = make_key_service(options_for(test::make_temp_dir("home")));
    ASSERT_FALSE(svc) << bad;
    EXPECT_EQ(svc.error().code, KmsErrorCode::ValidationException) << bad;
    EXPECT_NE(svc.error().message.find("KMSFS_HSM_TIMEOUT_MS must be"), std::string::npos) << svc.error().message;
  }
  ::unsetenv("KMSFS_HSM_TIMEOUT_MS");
}

TEST(KeyServiceFactory, ResolveFillsDefaults) {
  ::setenv("KMSFS_HOME", "/tmp/some-home/", 1);
  ::setenv("KMSFS_KMS", "unix:/x", 1);
  KmsOptions o;
  o.spec.clear();
  auto r = resolve_kms_options(o);
  ::unsetenv("KMSFS_HOME");
  ::unsetenv("KMSFS_KMS");
  EXPECT_EQ(r.spec, "unix:/x");
  EXPECT_EQ(r.home, "/tmp/some-home");
  EXPECT_EQ(r.pin_file, "/tmp/some-home/pin");
  EXPECT_FALSE(r.pkcs11_module.empty());
  KmsOptions explicit_spec;
  explicit_spec.spec = "embedded";
  explicit_spec.home = "/h";
  EXPECT_EQ(resolve_kms_options(explicit_spec).spec, "embedded");
}

}  // namespace
}  // namespace kmsfs::keyclient
