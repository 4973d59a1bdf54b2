#!/usr/bin/env bash
# Runs every libFuzzer target for N seconds each (default 60), starting from
# the committed corpus; new corpus entries go to a scratch dir, crashes to
# BUILD_DIR/fuzz-crashes/. Builds the targets with clang in $KMSFS_FUZZ_BUILD_DIR
# (default build-fuzz/) first.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
#
# Exit 0 = no crash. Exit 77 = clang is not installed (skipped).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECONDS_EACH=${1:-60}
shift || true
BUILD=${KMSFS_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
JOBS=${KMSFS_JOBS:-$(nproc)}
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(file_header ciphertext_blob volume_config kms_http kms_json key_policy key_record audit_log
  kms_request)

CLANG=$(command -v clang++ || command -v clang++-14 || true)
if [[ -z $CLANG ]]; then
  echo "fuzz: clang++ not found; skipped"
  exit 77
fi
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_CXX_COMPILER="$CLANG" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKMSFS_FUZZ=ON >/dev/null || exit 1
cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]/#/fuzz_}" || exit 1

# The volume loader writes kmsfs.json per input: keep that off the disk.
[[ -d /dev/shm && -w /dev/shm ]] && export TMPDIR=/dev/shm
CRASHES=$BUILD/fuzz-crashes
mkdir -p "$CRASHES"
failed=0
for t in "${TARGETS[@]}"; do
  work=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-fuzz-$t.XXXXXX")
  dict=()  # tests/fuzz/TARGET.dict: tokens the mutator splices in
  [[ -f $ROOT/tests/fuzz/$t.dict ]] && dict=(-dict="$ROOT/tests/fuzz/$t.dict")
  echo "=== fuzz_$t for ${SECONDS_EACH}s"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    "$BUILD/tests/fuzz/fuzz_$t" -max_total_time="$SECONDS_EACH" -max_len=8192 -timeout=10 "${dict[@]}" \
    -artifact_prefix="$CRASHES/$t-" -print_final_stats=1 \
    "$work" "$ROOT/tests/fuzz/corpus/$t" >"$work.log" 2>&1
  rc=$?
  grep -E "stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|^SUMMARY|Test unit written" "$work.log"
  if ((rc != 0)); then
    tail -n 40 "$work.log"
    echo "fuzz_$t: CRASH (exit $rc; input in $CRASHES); add it to tests/fuzz/corpus/$t/ once fixed"
    failed=1
  fi
  rm -f "$work.log"
  rm -rf "$work"
done
exit $failed
