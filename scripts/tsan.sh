#!/usr/bin/env bash
# ThreadSanitizer run of the concurrent tests (issue #7): builds only what
# they need with -DKMSFS_TSAN=ON in $KMSFS_TSAN_BUILD_DIR (default
# build-tsan/) — the kmsfs server, kmsctl, kmsd, the differential tester,
# the keyclient unit tests and the kmsd tests — and runs the tester's
# concurrent modes against a TSan-instrumented kmsfs, then the KMS side's
# concurrent unit tests (audit group commit, DEK cache, prefetch refillers,
# two cores on one home, the HSM session pool and call deadlines, background
# maintenance), then 50 concurrent clients against a TSan-instrumented kmsd
# (a race makes kmsd exit 66 at once: the clients fail). A data race in the server makes
# kmsfs exit 66 at unmount (TSan's exitcode), which the tester reports as a
# failure, with TSan's report in the server log.
#
#   scripts/tsan.sh [--jobs N]
#
# Cost on 2 cores: about 12-15 min to build, 1-2 min to run. scripts/test.sh
# (CI) runs it unless KMSFS_CI_TSAN=0.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${KMSFS_TSAN_BUILD_DIR:-$ROOT/build-tsan}
JOBS=${KMSFS_JOBS:-$(nproc)}
[[ ${1:-} == --jobs ]] && JOBS=$2
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKMSFS_TSAN=ON >/dev/null || exit 1
cmake --build "$BUILD" -j "$JOBS" --target kmsfs kmsctl kmsd kmsfs_difftest keyclient_unit_tests fs_unit_tests kmsd_tests || exit 1
# halt_on_error: the first race fails the run; second_deadlock_stack for
# lock-order reports. Logs of the server land in its volume's .log file.
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:exitcode=66:${TSAN_OPTIONS:-}"
failed=0
DIFF=$BUILD/tests/stress/kmsfs_difftest
"$DIFF" --seed 11 --ops 3000 --threads 4 --shrink-seconds 0 || failed=1
"$DIFF" --seed 12 --ops 3000 --threads 2 --mount-opts no_writeback_cache --shrink-seconds 0 || failed=1
"$DIFF" --seed 13 --ops 2000 --shrink-seconds 0 || failed=1
# The inode trimmer (-o max_inodes) against lookups, renames and unlinks.
"$DIFF" --seed 14 --ops 3000 --threads 4 --mount-opts max_inodes=20 --shrink-seconds 0 || failed=1
CONCURRENT='AuditLog.ConcurrentAppendersKeepOneChain:DataKeyCache.ConcurrentUseIsSafe:DataKeyPrefetcher.*:CachingKeyService.*'
CONCURRENT+=':KmsCoreTest.DefaultManagedKeyIsCreatedOnceByTwoCores:KmsCoreTest.TwoCoresCreatingConcurrentlyLoseNothing'
CONCURRENT+=':KmsCoreMaintenance.*:Pkcs11Hsm.ConcurrentCallersShareASmallPool:BoundedHsm.*'
"$BUILD/tests/unit/keyclient/keyclient_unit_tests" --gtest_filter="$CONCURRENT" || failed=1
"$BUILD/tests/unit/fs/fs_unit_tests" --gtest_filter='KeyReadaheadTest.*:KeyReadaheadTreeTest.*' || failed=1
"$BUILD/tests/integration/kmsd_tests" --gtest_filter='Kmsd.FiftyConcurrentClientsGetCorrectDataKeys' || failed=1
exit $failed
