#pragma once
// Test scaffolding shared by the keyclient tests.
//
// SoftHSM reads SOFTHSM2_CONF once, at C_Initialize, and PKCS#11 is
// initialised once per process. So the test binary gets ONE temp token
// directory and softhsm2.conf (set up in main() before any test), and every
// test that needs a token makes its own token label (unique_token_label()).

#include <memory>
#include <string>

#include "keyclient/pkcs11_hsm.h"

namespace kmsfs::keyclient::test {

// The module under test (KMSFS_TEST_PKCS11_MODULE).
std::string module_path();
// The temp root of this test process (removed at exit).
const std::string& test_root();
// A fresh empty directory under test_root().
std::string make_temp_dir(const std::string& prefix);
// "t<pid>-<n>", at most 32 bytes.
std::string unique_token_label();

// Opens a fresh token (initialised through the API) or, with `label`, the
// existing one of that label.
std::unique_ptr<Pkcs11Hsm> open_test_hsm(const std::string& label, std::size_t max_sessions = 4);

void set_up_test_environment();
void tear_down_test_environment();

std::string read_text(const std::string& path);
void write_text(const std::string& path, const std::string& text);

}  // namespace kmsfs::keyclient::test
