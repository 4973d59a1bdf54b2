#include <gtest/gtest.h>

#include "tests/unit/keyclient/test_env.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  kmsfs::keyclient::test::set_up_test_environment();
  int rc = RUN_ALL_TESTS();
  kmsfs::keyclient::test::tear_down_test_environment();
  return rc;
}
