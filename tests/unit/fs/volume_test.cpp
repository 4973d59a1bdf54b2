#include "fs/volume.h"

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

namespace kmsfs::fs {
namespace {

class VolumeConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kmsfs-vc.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  void write_config(const std::string& text) {
    std::ofstream(dir_ + "/kmsfs.json") << text;
  }
  std::string dir_;
};

TEST_F(VolumeConfigTest, SaveLoadRoundTrip) {
  VolumeConfig c;
  c.filesystem_id[0] = 0xAB;
  c.filesystem_id[15] = 0xCD;
  c.key_id = "arn:aws:kms:local:000000000000:key/11111111-2222-4333-8444-555555555555";
  c.creation_date = 1700000000.5;
  ASSERT_TRUE(c.save(dir_));
  struct stat st {};
  ASSERT_EQ(::stat((dir_ + "/kmsfs.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600U);
  auto back = VolumeConfig::load(dir_);
  ASSERT_TRUE(back) << back.error();
  EXPECT_EQ(back->filesystem_id, c.filesystem_id);
  EXPECT_EQ(back->key_id, c.key_id);
  EXPECT_EQ(back->block_size, 4096U);
}

TEST_F(VolumeConfigTest, RejectsUnknownFeatureNamingIt) {
  write_config(R"({"format":"kmsfs","format_version":1,"filesystem_id":"00112233445566778899aabbccddeeff",
                  "key_id":"k","block_size":4096,"features":["time_travel"]})");
  auto r = VolumeConfig::load(dir_);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("time_travel"), std::string::npos);
}

TEST_F(VolumeConfigTest, RejectsBadFields) {
  const char* cases[] = {
      "not json",
      R"({"format":"other","format_version":1})",
      R"({"format":"kmsfs","format_version":2,"filesystem_id":"00112233445566778899aabbccddeeff","key_id":"k","block_size":4096})",
      R"({"format":"kmsfs","format_version":1,"filesystem_id":"0011","key_id":"k","block_size":4096})",
      R"({"format":"kmsfs","format_version":1,"filesystem_id":"00112233445566778899aabbccddeeff","key_id":"","block_size":4096})",
      R"({"format":"kmsfs","format_version":1,"filesystem_id":"00112233445566778899aabbccddeeff","key_id":"k","block_size":8192})",
      R"({"format":"kmsfs","format_version":1,"filesystem_id":"00112233445566778899aabbccddeeff","block_size":4096})",
  };
  for (const char* text : cases) {
    write_config(text);
    auto r = VolumeConfig::load(dir_);
    EXPECT_FALSE(r) << text;
    if (!r) {
      EXPECT_NE(r.error().find("kmsfs.json"), std::string::npos) << r.error();
    }
  }
}

TEST_F(VolumeConfigTest, MissingFileSaysHowToCreateOne) {
  auto r = VolumeConfig::load(dir_);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("kmsfs init"), std::string::npos);
}

TEST(MountOptions, ParsesKnownOptions) {
  auto r = parse_mount_options("ro,allow_other,fsname=data,attr_timeout=5,nofail,x-systemd.requires=kmsd.socket", {});
  ASSERT_TRUE(r) << r.error();
  EXPECT_TRUE(r->read_only);
  EXPECT_TRUE(r->allow_other);
  EXPECT_EQ(r->fsname, "data");
  EXPECT_DOUBLE_EQ(r->attr_timeout, 5.0);
}

TEST(MountOptions, RejectsUnknownOptionNamingIt) {
  auto r = parse_mount_options("ro,warp_speed", {});
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().find("warp_speed"), std::string::npos);
  EXPECT_FALSE(parse_mount_options("attr_timeout=soon", {}));
  EXPECT_FALSE(parse_mount_options("ro=1", {}));
}

TEST(MountOptions, MaxInodesIsACountOrUnset) {
  auto unset = parse_mount_options("ro", {});
  ASSERT_TRUE(unset) << unset.error();
  EXPECT_FALSE(unset->max_inodes.has_value());
  auto r = parse_mount_options("max_inodes=5000", {});
  ASSERT_TRUE(r) << r.error();
  EXPECT_EQ(r->max_inodes, std::optional<std::size_t>(5000));
  auto off = parse_mount_options("max_inodes=0", {});
  ASSERT_TRUE(off) << off.error();
  EXPECT_EQ(off->max_inodes, std::optional<std::size_t>(0));
  auto bad = parse_mount_options("max_inodes=many", {});
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().find("max_inodes"), std::string::npos) << bad.error();
}

}  // namespace
}  // namespace kmsfs::fs
