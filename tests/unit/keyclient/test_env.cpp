#include "tests/unit/keyclient/test_env.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace kmsfs::keyclient::test {

namespace {
std::string g_root;  // set once in set_up_test_environment()
std::atomic<int> g_counter{0};
}  // namespace

std::string module_path() { return KMSFS_TEST_PKCS11_MODULE; }

const std::string& test_root() { return g_root; }

std::string make_temp_dir(const std::string& prefix) {
  std::string dir = g_root + "/" + prefix + "-" + std::to_string(g_counter++);
  std::filesystem::create_directories(dir);
  std::filesystem::permissions(dir, std::filesystem::perms::owner_all);
  return dir;
}

std::string unique_token_label() {
  return "t" + std::to_string(::getpid()) + "-" + std::to_string(g_counter++);
}

std::unique_ptr<Pkcs11Hsm> open_test_hsm(const std::string& label, std::size_t max_sessions) {
  Pkcs11Config cfg;
  cfg.module_path = module_path();
  cfg.token_label = label;
  cfg.user_pin = crypto::SecureBuffer::from_string("user-pin-1234");
  cfg.so_pin_for_init = crypto::SecureBuffer::from_string("so-pin-5678");
  cfg.init_token_if_missing = true;
  cfg.max_sessions = max_sessions;
  auto h = Pkcs11Hsm::open(std::move(cfg));
  if (!h) throw std::runtime_error("cannot open test token: " + h.error().message);
  return std::move(*h);
}

void set_up_test_environment() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "kmsfs-kc-test-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  g_root = tmpl;
  std::filesystem::create_directories(g_root + "/tokens");
  write_text(g_root + "/softhsm2.conf", "directories.tokendir = " + g_root +
                                            "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n");
  ::setenv("SOFTHSM2_CONF", (g_root + "/softhsm2.conf").c_str(), 1);
  ::unsetenv("KMSFS_HOME");
  ::unsetenv("KMSFS_KMS");
}

void tear_down_test_environment() {
  if (g_root.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(g_root, ec);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << text;
}

}  // namespace kmsfs::keyclient::test
