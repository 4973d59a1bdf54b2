#pragma once
// Test support for real mounts: a temp dir holding KMSFS_HOME (with its
// SoftHSM2 token), a cipher dir and a mount point; the built kmsfs and
// kmsctl binaries run as subprocesses. Every mount is unmounted in the
// destructor, also when a test fails.

#include <cstdint>
#include <string>
#include <vector>

namespace kmsfs::test {

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs argv[0] (a path) with the current environment; captures output.
CommandResult run_command(const std::vector<std::string>& argv);

// Empty when `program args...` runs as uid/gid 65534 here; else why not
// (e.g. a sandbox whose root directory only root may enter): tests that
// need another uid skip with that reason.
std::string cannot_run_as_nobody(const std::vector<std::string>& program_and_args);
std::string bin(const std::string& tool);  // path of a built tool

std::string make_temp_dir(const std::string& prefix);
void remove_tree(const std::string& path);

std::vector<std::uint8_t> read_file(const std::string& path);
void write_file(const std::string& path, const std::vector<std::uint8_t>& data);
std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint32_t seed);
// All regular files under `dir`, recursively.
std::vector<std::string> list_files(const std::string& dir);
bool contains(const std::vector<std::uint8_t>& hay, const std::string& needle);

class TempKms {
 public:
  TempKms();  // sets KMSFS_HOME for this process and its children
  ~TempKms();
  const std::string& root() const { return root_; }
  const std::string& home() const { return home_; }

 private:
  std::string root_;
  std::string home_;
};

class Mount {
 public:
  // Inits a volume under `root` (key: the default managed key unless given).
  Mount(const std::string& root, const std::string& name, const std::string& key = "",
        const std::vector<std::string>& init_args = {});
  ~Mount();
  void mount(const std::vector<std::string>& extra_args = {});
  void unmount();
  bool mounted() const { return mounted_; }
  // The mount went away by itself (idle timeout): nothing to unmount.
  void forget_mounted() { mounted_ = false; }
  const std::string& cipher() const { return cipher_; }
  const std::string& mnt() const { return mnt_; }
  std::string path(const std::string& rel) const { return mnt_ + "/" + rel; }

 private:
  std::string cipher_;
  std::string mnt_;
  bool mounted_ = false;
};

bool is_mountpoint(const std::string& path);

}  // namespace kmsfs::test
