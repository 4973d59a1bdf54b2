#!/usr/bin/env bash
# The long reliability runs of issue #7 (not part of CI):
#   1. kmsfs_difftest --soak: an hour (default) of random operation rounds on
#      one mount, compared against a plain directory, failing when the kmsfs
#      server's RSS or open fds grow beyond a bound;
#   2. the same concurrently (2 workers in subtrees + shared-file writers);
#   3. the crash test with 200 kill -9 iterations.
#
#   tests/stress/soak.sh [SECONDS] [BUILD_DIR]     (as root: FUSE mounts)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SECS=${1:-3600}
BUILD=${2:-${KMSFS_BUILD_DIR:-$ROOT/build}}
DIFF=$BUILD/tests/stress/kmsfs_difftest
REL=$BUILD/tests/stress/reliability_tests
[[ -x $DIFF && -x $REL ]] || { echo "soak: build first ($DIFF, $REL missing)"; exit 2; }
SEED=${KMSFS_SOAK_SEED:-$(date +%s)}
# KMSFS_SOAK_MOUNT_OPTS: extra kmsfs mount options (-o), e.g.
# no_writeback_cache; the default mount by default.
OPTS=(--mount-opts "${KMSFS_SOAK_MOUNT_OPTS-}")
[[ -z ${OPTS[1]} ]] && OPTS=()
failed=0
echo "=== difftest soak ${SECS}s, seed $SEED"
"$DIFF" --soak "$((SECS * 2 / 3))" --seed "$SEED" --ops 2000 "${OPTS[@]}" -v || failed=1
echo "=== difftest soak, 2 threads, $((SECS / 3))s, seed $((SEED + 1))"
"$DIFF" --soak "$((SECS / 3))" --seed "$((SEED + 1))" --ops 1000 --threads 2 "${OPTS[@]}" || failed=1
echo "=== crash test, 200 iterations"
KMSFS_CRASH_ITERATIONS=${KMSFS_CRASH_ITERATIONS:-200} "$REL" --gtest_filter='Crash.*' || failed=1
exit $failed
