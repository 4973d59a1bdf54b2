#!/usr/bin/env bash
# Configures and builds kmsfs.
#
#   scripts/build.sh              release-with-debug-info build in build/
#   scripts/build.sh --asan       ASan+UBSan build in build-asan/ (-DKMSFS_SANITIZE=ON)
#   scripts/build.sh --werror     warnings are errors (what CI does: -DKMSFS_WERROR=ON)
#   scripts/build.sh --build-dir DIR   another build directory
#
# Other options: --type TYPE (CMAKE_BUILD_TYPE), --jobs N (default: nproc,
# or $KMSFS_JOBS), -D... (passed to cmake). Binaries land in DIR/tools/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=""
SANITIZE=OFF
WERROR=OFF
BUILD_TYPE=RelWithDebInfo
JOBS=${KMSFS_JOBS:-$(nproc)}
EXTRA=()

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case $1 in
    --asan) SANITIZE=ON ;;
    --werror) WERROR=ON ;;
    --build-dir) BUILD_DIR=${2:?--build-dir needs a directory}; shift ;;
    --type) BUILD_TYPE=${2:?--type needs a build type}; shift ;;
    --jobs|-j) JOBS=${2:?--jobs needs a number}; shift ;;
    -D*) EXTRA+=("$1") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [[ -z $BUILD_DIR ]]; then
  if [[ $SANITIZE == ON ]]; then BUILD_DIR=$ROOT/build-asan; else BUILD_DIR=$ROOT/build; fi
fi

echo "build: $BUILD_DIR (type $BUILD_TYPE, sanitize $SANITIZE, werror $WERROR, -j$JOBS)"
cmake -S "$ROOT" -B "$BUILD_DIR" \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DKMSFS_SANITIZE="$SANITIZE" \
  -DKMSFS_WERROR="$WERROR" \
  "${EXTRA[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"
