// libFuzzer target: the kmsfs.json loader (fs/volume.h, VolumeConfig::load),
// fed through a real file in a private temp dir (the loader reads a
// directory). A config that loads must save and load back unchanged.
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fs/volume.h"

namespace {

std::string make_dir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/kmsfs-fuzz-volume.XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
  return tmpl;
}

struct Dirs {
  std::string in = make_dir();
  std::string out = make_dir();
  ~Dirs() {
    for (const auto& d : {in, out}) {
      ::unlink((d + "/kmsfs.json").c_str());
      ::rmdir(d.c_str());
    }
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Dirs dirs;
  using kmsfs::fs::VolumeConfig;
  {
    FILE* f = std::fopen((dirs.in + "/kmsfs.json").c_str(), "wb");
    if (f == nullptr) std::abort();
    if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
    std::fclose(f);
  }
  auto c = VolumeConfig::load(dirs.in);
  if (!c) {
    if (c.error().empty()) std::abort();  // every refusal says why
    return 0;
  }
  (void)c->filesystem_id_hex();
  if (!c->save(dirs.out)) std::abort();
  auto back = VolumeConfig::load(dirs.out);
  if (!back) std::abort();
  if (back->filesystem_id != c->filesystem_id || back->key_id != c->key_id ||
      back->features != c->features || back->wrapped_name_key != c->wrapped_name_key ||
      back->block_size != c->block_size || back->format_version != c->format_version ||
      back->long_name_max != c->long_name_max) {
    std::abort();
  }
  return 0;
}
