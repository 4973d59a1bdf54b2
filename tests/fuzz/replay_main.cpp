// Without libFuzzer (a gcc build): runs a fuzz target once per file named on
// the command line (directories: every file in them). The ctest entries
// fuzz_corpus_* replay the committed corpus and the regression inputs of
// every crash found, so that each stays fixed in every build.
#include <dirent.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

int run_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    return 1;
  }
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int files = 0;
  int bad = 0;
  for (int i = 1; i < argc; ++i) {
    struct stat st {};
    if (::stat(argv[i], &st) != 0) {
      std::fprintf(stderr, "no such input: %s\n", argv[i]);
      return 1;
    }
    if (S_ISDIR(st.st_mode)) {
      DIR* d = ::opendir(argv[i]);
      while (dirent* e = d != nullptr ? ::readdir(d) : nullptr) {
        if (e->d_name[0] == '.') continue;
        bad += run_file(std::string(argv[i]) + "/" + e->d_name);
        ++files;
      }
      if (d != nullptr) ::closedir(d);
    } else {
      bad += run_file(argv[i]);
      ++files;
    }
  }
  std::printf("%d inputs replayed\n", files);
  return bad == 0 && files > 0 ? 0 : 1;
}
