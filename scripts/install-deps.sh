#!/usr/bin/env bash
# Installs everything kmsfs needs to build, test and run its demo on Debian 12
# (bookworm); `--test` adds what only the test suite needs. Idempotent: when every package is already installed it does not
# touch apt at all (no `apt-get update`). Non-interactive. Needs root, or a
# user who may run sudo.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake pkg-config git ca-certificates
  # libraries (headers + pkg-config / CMake files)
  libfuse3-dev libssl-dev libboost-program-options-dev libspdlog-dev
  libgtest-dev libgmock-dev nlohmann-json3-dev libp11-kit-dev libsystemd-dev
  # run time: FUSE mount helper, the PKCS#11 HSM and its tools
  fuse3 softhsm2 opensc openssl
  # demo and tests: hexdump (bsdextrautils), xxd, mountpoint (util-linux), ps/pgrep (procps)
  bsdextrautils xxd util-linux procps
  # kmsd and systemd (#4): systemd-analyze verify of the units, curl
  # --unix-socket and setpriv (util-linux) in the kmsd tests, man pages
  # generated from --help
  systemd curl help2man
)
# --test (scripts/test.sh): also clang, whose libFuzzer runs the fuzz targets
# (tests/fuzz/run.sh), and libclang-rt-dev: its runtime libraries
# (libclang_rt.fuzzer, libclang_rt.asan), which clang does not pull in.
# Also the applications and exercisers tests/apps/run.sh runs on a mount:
# sqlite3, PostgreSQL (server and pgbench), fio and stress-ng.
if [[ ${1:-} == --test ]]; then
  PACKAGES+=(clang libclang-rt-dev sqlite3 postgresql postgresql-contrib fio stress-ng)
fi
# The AWS SDK for JavaScript test (npm install @aws-sdk/client-kms): any
# node and npm will do. Debian's are installed only when none is on PATH
# (NodeSource's nodejs bundles npm and conflicts with Debian's npm package).
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ $status == installed ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

if ((EUID == 0)); then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root (or install sudo) so that they can be installed" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"
