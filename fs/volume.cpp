#include "fs/volume.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <sys/mount.h>
#include <sys/wait.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <thread>
#include <csignal>
#include <chrono>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>

#include "crypto/encoding.h"
#include "crypto/json_int.h"
#include "crypto/random.h"
#include "fs/filesystem.h"
#include "fs/killpriv.h"
#include "fs/mountinfo.h"
#include "fs/name_mapper.h"

namespace kmsfs::fs {

namespace {

// Grows this process's descriptor table once to `want` entries (at most
// the open-file limit). The kernel grows a table shared by threads only
// after an RCU grace period (expand_fdtable: synchronize_rcu, ~10 ms on
// these machines), once per doubling from 64 up: a walk of 1,000 files
// after a mount spent ~50 ms in five such waits, most of an `ls -lR`. One
// wait now, at mount, instead. The table's memory is 8 bytes per entry.
void presize_descriptor_table(std::size_t want) {
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur != RLIM_INFINITY) want = std::min<std::size_t>(want, static_cast<std::size_t>(lim.rlim_cur));
  if (want < 2) return;
  const int base = ::open("/", O_PATH | O_CLOEXEC);
  if (base < 0) return;
  const int high = ::fcntl(base, F_DUPFD_CLOEXEC, static_cast<int>(want - 1));
  if (high >= 0) ::close(high);
  ::close(base);
}

using json = nlohmann::json;

std::shared_ptr<spdlog::logger> logger() {
  static auto l = [] {
    auto existing = spdlog::get("kmsfs.fs");
    return existing ? existing : spdlog::default_logger()->clone("kmsfs.fs");
  }();
  return l;
}

// Feature flags this version understands. A volume naming any other flag is
// refused: it was written by a newer kmsfs whose format this one would
// misread.
const std::set<std::string>& known_features() {
  static const std::set<std::string> known{VolumeConfig::kFeatureEncryptedNames};
  return known;
}

std::string errno_text(int err) { return std::strerror(err); }

Result<void, std::string> write_atomically(const std::string& dir, const std::string& name,
                                           const std::string& content, mode_t mode) {
  const std::string path = dir + "/" + name;
  const std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode));
  if (!fd.valid()) return unexpected("cannot create " + tmp + ": " + errno_text(errno));
  std::size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd.get(), content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::unlink(tmp.c_str());
      return unexpected("cannot write " + tmp + ": " + errno_text(err));
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return unexpected("cannot sync " + tmp + ": " + errno_text(err));
  }
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return unexpected("cannot replace " + path + ": " + errno_text(err));
  }
  UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.valid()) (void)::fsync(dfd.get());
  return {};
}

// Unprivileged unmount through libfuse's setuid helper.
bool run_fusermount_unmount(const std::string& mountpoint) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::execlp("fusermount3", "fusermount3", "-u", "-q", mountpoint.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  if (pid < 0) return false;
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Raises the read-ahead window of the kmsfs mount at `mountpoint` to `kb`
// KiB through its FUSE device's /sys/class/bdi entry, found in
// /proc/self/mountinfo (a stat of the mount point would be a request to
// this very session, not yet served). Done before the session answers
// INIT, whose reply the kernel then takes as the window (the smaller of
// the two). Best effort: without root the kernel's 128 KiB stays.
void raise_read_ahead(const std::string& mountpoint, std::size_t kb) {
  char abs[PATH_MAX];
  if (::realpath(mountpoint.c_str(), abs) == nullptr) return;
  std::string device;
  for (const auto& m : read_mountinfo()) {
    if (m.mount_point == abs && m.fstype == "fuse.kmsfs") device = m.device;  // the last one: mounted on top
  }
  if (device.empty()) {
    logger()->debug("read-ahead: no kmsfs mount at {} in /proc/self/mountinfo", abs);
    return;
  }
  const std::string path = "/sys/class/bdi/" + device + "/read_ahead_kb";
  std::ofstream out(path);
  out << kb << "\n";
  out.flush();
  if (!out) {
    logger()->debug("read-ahead of {} left to the kernel: cannot write {} ({})", abs, path, errno_text(errno));
    return;
  }
  logger()->debug("read-ahead of {}: {} KiB", abs, kb);
}

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string VolumeConfig::filesystem_id_hex() const { return crypto::to_hex(filesystem_id); }

bool VolumeConfig::has_feature(const std::string& f) const {
  return std::find(features.begin(), features.end(), f) != features.end();
}

keyclient::EncryptionContext name_key_context(const VolumeConfig& c) {
  return {{"kmsfs:fs", c.filesystem_id_hex()}, {"kmsfs:purpose", "filenames"}};
}

Result<VolumeConfig, std::string> VolumeConfig::load(const std::string& cipherdir) {
  const std::string path = cipherdir + "/" + kFileName;
  std::ifstream in(path);
  if (!in) {
    return unexpected(path + ": cannot read (" + errno_text(errno) +
                      "); is this a kmsfs cipher directory? Create one with `kmsfs init`");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    return unexpected(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) return unexpected(path + ": not a JSON object");
  try {
    VolumeConfig c;
    if (j.value("format", std::string()) != "kmsfs") {
      return unexpected(path + ": \"format\" is not \"kmsfs\"");
    }
    c.format_version = crypto::json_int<int>(j.at("format_version"));
    if (c.format_version != kFormatVersion) {
      return unexpected(path + ": format version " + std::to_string(c.format_version) +
                        " is not supported by this kmsfs (it reads version " +
                        std::to_string(kFormatVersion) + ")");
    }
    auto id = crypto::from_hex(j.at("filesystem_id").get<std::string>());
    if (!id || id->size() != c.filesystem_id.size()) {
      return unexpected(path + ": \"filesystem_id\" must be 32 hex digits");
    }
    std::memcpy(c.filesystem_id.data(), id->data(), c.filesystem_id.size());
    c.key_id = j.at("key_id").get<std::string>();
    if (c.key_id.empty()) return unexpected(path + ": \"key_id\" is empty");
    c.block_size = crypto::json_int<std::uint32_t>(j.at("block_size"));
    if (c.block_size != 4096) {
      return unexpected(path + ": block size " + std::to_string(c.block_size) +
                        " is not supported (only 4096)");
    }
    c.features = j.value("features", std::vector<std::string>{});
    for (const auto& f : c.features) {
      if (known_features().count(f) == 0) {
        return unexpected(path + ": feature \"" + f +
                          "\" is not known to this kmsfs; upgrade kmsfs to mount this volume");
      }
    }
    c.creation_date = j.value("creation_date", 0.0);
    if (c.has_feature(kFeatureEncryptedNames)) {
      auto wrapped = crypto::from_base64(j.at("wrapped_name_key").get<std::string>());
      if (!wrapped || wrapped->empty()) {
        return unexpected(path + ": \"wrapped_name_key\" is not valid base64");
      }
      c.wrapped_name_key = std::move(*wrapped);
      c.long_name_max = crypto::json_int_or(j, "long_name_max", 255U);
      if (c.long_name_max < NameMapper::kMinLongNameMax || c.long_name_max > NameMapper::kMaxName) {
        return unexpected(path + ": \"long_name_max\" must be in 63..255");
      }
    }
    return c;
  } catch (const json::exception& e) {
    return unexpected(path + ": missing or malformed field: " + e.what());
  }
}

Result<void, std::string> VolumeConfig::save(const std::string& cipherdir) const {
  json j = {
      {"format", "kmsfs"},
      {"format_version", format_version},
      {"filesystem_id", filesystem_id_hex()},
      {"key_id", key_id},
      {"block_size", block_size},
      {"features", features},
      {"creation_date", creation_date},
  };
  if (has_feature(kFeatureEncryptedNames)) {
    j["wrapped_name_key"] = crypto::to_base64(wrapped_name_key);
    j["long_name_max"] = long_name_max;
  }
  return write_atomically(cipherdir, kFileName, j.dump(2) + "\n", 0600);
}

unsigned default_max_threads() {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  return static_cast<unsigned>(std::clamp<long>(2 * std::max<long>(cpus, 1), 4, 10));
}

Result<MountOptions, std::string> parse_mount_options(const std::string& opts, MountOptions base) {
  std::stringstream ss(opts);
  std::string item;
  auto parse_seconds = [](const std::string& name, const std::string& v) -> Result<double, std::string> {
    try {
      std::size_t used = 0;
      double d = std::stod(v, &used);
      if (used != v.size() || d < 0) throw std::invalid_argument(v);
      return d;
    } catch (const std::exception&) {
      return unexpected("mount option " + name + "=" + v + ": not a number of seconds");
    }
  };
  auto parse_count = [](const std::string& name, const std::string& v, long lo,
                        long hi) -> Result<long, std::string> {
    try {
      std::size_t used = 0;
      long n = std::stol(v, &used);
      if (used != v.size() || n < lo || n > hi) throw std::out_of_range(v);
      return n;
    } catch (const std::exception&) {
      return unexpected("mount option " + name + "=" + v + ": not a number in " + std::to_string(lo) +
                        ".." + std::to_string(hi));
    }
  };
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    const std::string name = item.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
    const bool has_value = eq != std::string::npos;
    auto flag = [&](bool& field, bool v) -> Result<void, std::string> {
      if (has_value) return unexpected("mount option " + name + " takes no value");
      field = v;
      return {};
    };
    Result<void, std::string> r;
    if (name == "ro") {
      r = flag(base.read_only, true);
    } else if (name == "rw") {
      r = flag(base.read_only, false);
    } else if (name == "allow_other") {
      r = flag(base.allow_other, true);
    } else if (name == "debug") {
      r = flag(base.debug, true);
    } else if (name == "kernel_cache") {
      r = flag(base.kernel_cache, true);
    } else if (name == "shared_storage") {
      r = flag(base.shared_storage, true);
    } else if (name == "idle_timeout") {
      auto d = parse_seconds(name, value);
      if (!d) return unexpected(d.error());
      base.idle_timeout = *d;
    } else if (name == "writeback_cache") {
      r = flag(base.writeback_cache, true);
    } else if (name == "no_writeback_cache") {
      r = flag(base.writeback_cache, false);
    } else if (name == "fsname") {
      if (!has_value || value.empty()) return unexpected(std::string("mount option fsname needs a value"));
      base.fsname = value;
    } else if (name == "entry_timeout" || name == "attr_timeout") {
      auto d = parse_seconds(name, value);
      if (!d) return unexpected(d.error());
      (name == "entry_timeout" ? base.entry_timeout : base.attr_timeout) = *d;
    } else if (name == "key_cache") {
      if (value != "on" && value != "off") {
        return unexpected("mount option key_cache=" + value + ": expected on or off");
      }
      base.key_cache = value == "on";
    } else if (name == "key_cache_ttl") {
      auto d = parse_seconds(name, value);
      if (!d) return unexpected(d.error());
      base.key_cache_ttl = *d;
    } else if (name == "key_cache_entries") {
      auto n = parse_count(name, value, 1, 1 << 20);
      if (!n) return unexpected(n.error());
      base.key_cache_entries = static_cast<std::size_t>(*n);
    } else if (name == "key_readahead") {
      auto n = parse_count(name, value, 0, 65536);
      if (!n) return unexpected(n.error());
      base.key_readahead = static_cast<std::size_t>(*n);
    } else if (name == "max_inodes") {
      auto n = parse_count(name, value, 0, 1L << 30);
      if (!n) return unexpected(n.error());
      base.max_inodes = static_cast<std::size_t>(*n);
    } else if (name == "read_ahead_kb") {
      auto n = parse_count(name, value, 0, 65536);
      if (!n) return unexpected(n.error());
      base.read_ahead_kb = static_cast<std::size_t>(*n);
    } else if (name == "max_threads") {
      auto n = parse_count(name, value, 1, 256);
      if (!n) return unexpected(n.error());
      base.max_threads = static_cast<unsigned>(*n);
    } else if (name == "default_permissions" || name == "dev" || name == "suid" ||
               name == "nodev" || name == "nosuid" || name == "exec" || name == "noexec" ||
               name == "atime" || name == "noatime" || name == "relatime" || name == "auto" ||
               name == "noauto" || name == "nofail" || name == "_netdev" || name == "user" ||
               name == "users" || name == "defaults" || name.rfind("x-", 0) == 0) {
      // Handled by mount(8)/systemd or always on (default_permissions).
    } else {
      return unexpected("unknown mount option \"" + name + "\"");
    }
    if (!r) return unexpected(r.error());
  }
  return base;
}

Result<VolumeConfig, std::string> init_volume(keyclient::KeyService& kms, const std::string& cipherdir,
                                              const std::string& key_id, const InitOptions& options) {
  if (!options.plaintext_names && (options.long_name_max < NameMapper::kMinLongNameMax ||
                                   options.long_name_max > NameMapper::kMaxName)) {
    return unexpected("--long-name-max must be in " + std::to_string(NameMapper::kMinLongNameMax) +
                      "..255");
  }
  struct stat st {};
  if (::stat(cipherdir.c_str(), &st) != 0) {
    if (errno != ENOENT) return unexpected(cipherdir + ": " + errno_text(errno));
    if (::mkdir(cipherdir.c_str(), 0700) != 0) {
      return unexpected("cannot create " + cipherdir + ": " + errno_text(errno));
    }
  } else {
    if (!S_ISDIR(st.st_mode)) return unexpected(cipherdir + ": not a directory");
    UniqueDir d(::opendir(cipherdir.c_str()));
    if (!d) return unexpected(cipherdir + ": " + errno_text(errno));
    while (struct dirent* e = ::readdir(d.get())) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
        return unexpected(cipherdir + ": not empty; kmsfs init needs an empty directory");
      }
    }
  }
  auto desc = kms.describe_key({key_id});
  if (!desc) return unexpected("key " + key_id + ": " + desc.error().to_string());
  if (desc->key_metadata.key_state != "Enabled") {
    return unexpected("key " + key_id + " is " + desc->key_metadata.key_state +
                      "; a volume needs an Enabled key");
  }
  VolumeConfig c;
  crypto::random_bytes(c.filesystem_id);
  c.key_id = desc->key_metadata.arn;
  c.creation_date = now_seconds();
  // Prove that the key can wrap and unwrap for this volume before writing
  // anything, so that a policy or HSM problem shows up at init.
  keyclient::GenerateDataKeyRequest probe;
  probe.key_id = c.key_id;
  probe.key_spec = "AES_256";
  probe.encryption_context = {{"kmsfs:fs", c.filesystem_id_hex()}, {"kmsfs:file", "init-probe"}};
  auto dk = kms.generate_data_key(probe);
  if (!dk) return unexpected("key " + key_id + ": cannot generate a data key: " + dk.error().to_string());
  keyclient::DecryptRequest back;
  back.ciphertext_blob = dk->ciphertext_blob;
  back.encryption_context = probe.encryption_context;
  auto pt = kms.decrypt(back);
  if (!pt) return unexpected("key " + key_id + ": cannot decrypt a data key: " + pt.error().to_string());
  if (!(pt->plaintext == dk->plaintext)) {
    return unexpected("key " + key_id + ": the KMS returned a different data key on decrypt");
  }
  if (!options.plaintext_names) {
    keyclient::GenerateDataKeyRequest nk;
    nk.key_id = c.key_id;
    nk.number_of_bytes = static_cast<int>(crypto::NameCipher::kKeySize);
    nk.encryption_context = name_key_context(c);
    auto name_key = kms.generate_data_key(nk);
    if (!name_key) {
      return unexpected("key " + key_id + ": cannot generate the name key: " + name_key.error().to_string());
    }
    c.features.push_back(VolumeConfig::kFeatureEncryptedNames);
    c.wrapped_name_key = std::move(name_key->ciphertext_blob);
    c.long_name_max = options.long_name_max;
    UniqueFd root(::open(cipherdir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    int err = root.valid() ? NameMapper::create_dir_iv(root.get()) : errno;
    if (err != 0 && err != EEXIST) {
      return unexpected("cannot create " + cipherdir + "/" + NameMapper::kDirIvName + ": " + errno_text(err));
    }
  }
  // kmsfs.json last: a directory without it is not a volume yet, and init
  // can simply be run again.
  if (auto r = c.save(cipherdir); !r) return unexpected(r.error());
  return c;
}

struct Volume::Impl {
  keyclient::KeyService& kms;
  std::string cipherdir;
  VolumeConfig config;
  NameMapper names;
};

Volume::Volume(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Volume::~Volume() = default;

const VolumeConfig& Volume::config() const { return impl_->config; }
const NameMapper& Volume::names() const { return impl_->names; }

Result<std::unique_ptr<Volume>, std::string> Volume::open(keyclient::KeyService& kms,
                                                          const std::string& cipherdir) {
  auto config = VolumeConfig::load(cipherdir);
  if (!config) return unexpected(config.error());
  auto desc = kms.describe_key({config->key_id});
  if (!desc) {
    return unexpected("the volume's key " + config->key_id + " is unusable: " + desc.error().to_string());
  }
  if (desc->key_metadata.key_state != "Enabled") {
    return unexpected("the volume's key " + config->key_id + " is " +
                      desc->key_metadata.key_state + "; enable it to mount");
  }
  NameMapper names;
  if (config->has_feature(VolumeConfig::kFeatureEncryptedNames)) {
    // One KMS call per mount: names never cost a KMS round trip.
    keyclient::DecryptRequest req;
    req.ciphertext_blob = config->wrapped_name_key;
    req.encryption_context = name_key_context(*config);
    auto key = kms.decrypt(req);
    if (!key) return unexpected("cannot unwrap the volume's name key: " + key.error().to_string());
    if (key->plaintext.size() != crypto::NameCipher::kKeySize) {
      return unexpected(std::string("the volume's name key has the wrong size"));
    }
    names = NameMapper(std::make_unique<crypto::NameCipher>(std::move(key->plaintext)),
                       config->long_name_max);
  }
  auto impl = std::make_unique<Impl>(Impl{kms, cipherdir, std::move(*config), std::move(names)});
  return std::unique_ptr<Volume>(new Volume(std::move(impl)));
}

Result<void, std::string> Volume::serve(const std::string& mountpoint, const MountOptions& opts,
                                        const std::function<void()>& on_ready) {
  UniqueFd root(::open(impl_->cipherdir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!root.valid()) return unexpected(impl_->cipherdir + ": " + errno_text(errno));

  FileKeyOptions key_options;
  key_options.cache = opts.key_cache;
  key_options.cache_ttl = opts.key_cache_ttl;
  key_options.cache_entries = opts.key_cache_entries;
  FileKeys keys(impl_->kms, impl_->config.filesystem_id_hex(), impl_->config.key_id, key_options);
  // Follow kmsfs.json's key (rewrap --to-key on a live mount): re-read it
  // when its inode, size or mtime changed, and only if it is still this
  // volume.
  struct ConfigWatch {
    std::mutex mu;  // guards the rest
    ino_t ino = 0;
    off_t size = -1;
    timespec mtime{};
  };
  auto watch = std::make_shared<ConfigWatch>();
  const std::string config_path = impl_->cipherdir + "/" + VolumeConfig::kFileName;
  keys.set_key_source(
      [watch, config_path, cipherdir = impl_->cipherdir,
       fs_id = impl_->config.filesystem_id]() -> std::optional<std::string> {
        std::lock_guard<std::mutex> lock(watch->mu);
        struct stat st {};
        if (::stat(config_path.c_str(), &st) != 0) return std::nullopt;
        if (st.st_ino == watch->ino && st.st_size == watch->size && st.st_mtim.tv_sec == watch->mtime.tv_sec &&
            st.st_mtim.tv_nsec == watch->mtime.tv_nsec) {
          return std::nullopt;
        }
        watch->ino = st.st_ino;
        watch->size = st.st_size;
        watch->mtime = st.st_mtim;
        auto c = VolumeConfig::load(cipherdir);
        if (!c || c->filesystem_id != fs_id) return std::nullopt;
        return c->key_id;
      },
      std::chrono::milliseconds(kConfigRecheckMilliseconds));
  FsSettings settings;
  settings.entry_timeout = opts.shared_storage ? 0 : opts.entry_timeout;
  settings.attr_timeout = opts.shared_storage ? 0 : opts.attr_timeout;
  settings.writeback_cache = opts.writeback_cache && !opts.read_only && !opts.shared_storage;
  settings.kernel_cache = opts.kernel_cache && !opts.shared_storage;
  settings.read_only = opts.read_only;
  settings.cache_sizes = !opts.shared_storage;
  if (opts.max_inodes) {
    settings.max_inodes = *opts.max_inodes;
  } else if (struct rlimit lim {}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
    // A third of the descriptors for inodes: the rest for open files,
    // directory handles, the KMS, the session, and inodes made while the
    // trimmer catches up with a fast tree walk.
    settings.max_inodes = static_cast<std::size_t>(lim.rlim_cur / 3);
  }
  settings.key_readahead = opts.key_cache ? opts.key_readahead : 0;
  settings.read_ahead = opts.read_ahead_kb * 1024;
  // What the inode table will hold, and room for open files.
  constexpr std::size_t kPresizeCap = 65536;
  presize_descriptor_table(settings.max_inodes > 0 ? std::min(settings.max_inodes + 1024, kPresizeCap)
                                                   : kPresizeCap);
  Filesystem filesystem(std::move(root), keys, impl_->names, settings);

  // The fsname may not contain a comma (it would split the option string).
  std::string fsname = opts.fsname.empty() ? "kmsfs:" + impl_->cipherdir : opts.fsname;
  for (char& ch : fsname) {
    if (ch == ',') ch = '_';
  }
  std::string o = "fsname=" + fsname + ",subtype=kmsfs,default_permissions";
  if (opts.allow_other) o += ",allow_other";
  if (opts.read_only) o += ",ro";
  std::vector<std::string> argv_s{"kmsfs", "-o", o};
  if (opts.debug) argv_s.emplace_back("-d");
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  fuse_session* se = fuse_session_new(&args, &Filesystem::operations(),
                                      sizeof(fuse_lowlevel_ops), &filesystem);
  // fuse_session_new parses the options into a heap copy of the arguments.
  fuse_opt_free_args(&args);
  if (se == nullptr) return unexpected(std::string("cannot create the FUSE session"));
  struct SessionGuard {
    fuse_session* se;
    bool mounted = false;
    bool handlers = false;
    ~SessionGuard() {
      if (handlers) fuse_remove_signal_handlers(se);
      if (mounted) fuse_session_unmount(se);
      fuse_session_destroy(se);
    }
  } guard{se};
  if (fuse_set_signal_handlers(se) != 0) return unexpected(std::string("cannot install signal handlers"));
  guard.handlers = true;
  filesystem.set_session(se);
  if (fuse_session_mount(se, mountpoint.c_str()) != 0) {
    return unexpected("cannot mount at " + mountpoint +
                      " (is it an existing directory, and is /dev/fuse usable?)");
  }
  guard.mounted = true;
  if (opts.read_ahead_kb > 0) raise_read_ahead(mountpoint, opts.read_ahead_kb);
  // One FUSE round trip per write instead of two (fs/killpriv.h).
  if (!install_killpriv_io(se)) logger()->warn("FUSE custom I/O refused: writes ask for security.capability");
  logger()->info("mounted {} at {}", impl_->cipherdir, mountpoint);
  on_ready();

  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  const unsigned max_threads = opts.max_threads != 0 ? opts.max_threads : default_max_threads();
  fuse_loop_cfg_set_max_threads(cfg, max_threads);
  // idle_timeout: a watchdog unmounts once no file or directory is open
  // and no request came for that long. A busy mount point (a shell's cwd)
  // makes the unmount fail with EBUSY: then it simply keeps serving.
  std::atomic<bool> stop_watchdog{false};
  std::thread watchdog;
  if (opts.idle_timeout > 0) {
    watchdog = std::thread([&] {
      while (!stop_watchdog.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        if (stop_watchdog.load() || !filesystem.idle_for(opts.idle_timeout)) continue;
        logger()->info("{} idle for {} s: unmounting", mountpoint, opts.idle_timeout);
        if (::geteuid() == 0 ? ::umount2(mountpoint.c_str(), 0) == 0 : run_fusermount_unmount(mountpoint)) {
          return;
        }
        filesystem.touch();  // busy: try again after another idle period
      }
    });
  }
  int rc = fuse_session_loop_mt(se, cfg);
  stop_watchdog = true;
  if (watchdog.joinable()) watchdog.join();
  fuse_loop_cfg_destroy(cfg);
  logger()->info("unmounting {}", mountpoint);
  if (rc != 0 && rc != SIGINT && rc != SIGTERM && rc != SIGHUP) {
    return unexpected("the FUSE session ended with an error (" + std::to_string(rc) + ")");
  }
  return {};
}

}  // namespace kmsfs::fs
