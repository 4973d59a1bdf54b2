#!/usr/bin/env bash
# Configures and builds kmsfs.
#
#   scripts/build.sh              release-with-debug-info build in build/
#   scripts/build.sh --asan       ASan+UBSan build in build-asan/ (-DKMSFS_SANITIZE=ON)
#   scripts/build.sh --werror     warnings are errors (what CI does: -DKMSFS_WERROR=ON)
#   scripts/build.sh --no-werror  turn that off again in an existing build dir
#   scripts/build.sh --build-dir DIR   another build directory
#
# Without --werror/--no-werror an existing build dir keeps its setting (so the
# demo reuses a CI build instead of recompiling everything).
#
# Other options: --type TYPE (CMAKE_BUILD_TYPE), --jobs N (default: nproc,
# or $KMSFS_JOBS), -D... (passed to cmake). Binaries land in DIR/tools/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=""
SANITIZE=""
WERROR=""
BUILD_TYPE=RelWithDebInfo
JOBS=${KMSFS_JOBS:-$(nproc)}
EXTRA=()

usage() { sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case $1 in
    --asan) SANITIZE=ON ;;
    --werror) WERROR=ON ;;
    --no-werror) WERROR=OFF ;;
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

[[ -n $SANITIZE ]] && EXTRA+=("-DKMSFS_SANITIZE=$SANITIZE")
[[ -n $WERROR ]] && EXTRA+=("-DKMSFS_WERROR=$WERROR")

echo "build: $BUILD_DIR (type $BUILD_TYPE, sanitize ${SANITIZE:-as configured}, werror ${WERROR:-as configured}, -j$JOBS)"
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" "${EXTRA[@]}"
cmake --build "$BUILD_DIR" -j "$JOBS"
