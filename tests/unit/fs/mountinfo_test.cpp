// Lines of /proc/self/mountinfo as the kernel writes them (proc(5)).

#include "fs/mountinfo.h"

#include <gtest/gtest.h>

namespace kmsfs::fs {
namespace {

TEST(MountInfo, ParsesTheFieldsAroundTheOptionalOnes) {
  auto e = parse_mountinfo_line(
      "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue");
  ASSERT_TRUE(e);
  EXPECT_EQ(e->device, "98:0");
  EXPECT_EQ(e->mount_point, "/mnt2");
  EXPECT_EQ(e->fstype, "ext3");
  EXPECT_EQ(e->source, "/dev/root");
}

TEST(MountInfo, UndoesTheKernelsEscapesInPathsAndSources) {
  auto e = parse_mountinfo_line(
      "812 29 0:61 / /srv/my\\040vault\\011x\\134y rw,nosuid,nodev,relatime - fuse.kmsfs "
      "kmsfs:/srv/cipher\\040dir rw,user_id=0,group_id=0,default_permissions");
  ASSERT_TRUE(e);
  EXPECT_EQ(e->device, "0:61");
  EXPECT_EQ(e->mount_point, "/srv/my vault\tx\\y");
  EXPECT_EQ(e->fstype, "fuse.kmsfs");
  EXPECT_EQ(e->source, "kmsfs:/srv/cipher dir");
  // A backslash not followed by three octal digits is kept.
  auto odd = parse_mountinfo_line("1 2 0:1 / /a\\9b rw - tmpfs x\\12 rw");
  ASSERT_TRUE(odd);
  EXPECT_EQ(odd->mount_point, "/a\\9b");
  EXPECT_EQ(odd->source, "x\\12");
}

TEST(MountInfo, RefusesLinesThatAreNotOnes) {
  EXPECT_FALSE(parse_mountinfo_line(""));
  EXPECT_FALSE(parse_mountinfo_line("36 35 98:0 /mnt1 /mnt2 rw"));       // no " - "
  EXPECT_FALSE(parse_mountinfo_line("36 35 - ext3 /dev/root rw"));       // head cut short
  EXPECT_FALSE(parse_mountinfo_line("36 35 98:0 /mnt1 /mnt2 rw - ext3"));  // no source
}

TEST(MountInfo, ReadsThisProcessesTable) {
  const auto all = read_mountinfo();
  ASSERT_FALSE(all.empty());
  bool root = false;
  for (const auto& m : all) root = root || m.mount_point == "/";
  EXPECT_TRUE(root);
}

}  // namespace
}  // namespace kmsfs::fs
