#!/usr/bin/env bash
# README set-up command 1: installs what is missing, builds, and runs the
# main job end to end with the embedded KMS on a throwaway SoftHSM2 token:
# a key, an encrypted directory, a mount, a file going in as plaintext and
# landing as ciphertext, an unmount and a remount.
#
# Everything lives in a fresh directory under /tmp (printed below), so the
# demo never touches /var/lib/kmsfs or ~/.local/share/kmsfs. The mount is
# always unmounted on exit, also when a step fails.
#
# Environment (optional): KMSFS_BUILD_DIR (default build/), KMSFS_JOBS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD_DIR=${KMSFS_BUILD_DIR:-$ROOT/build}
bash scripts/install-deps.sh
bash scripts/build.sh --build-dir "$BUILD_DIR"

BIN=$BUILD_DIR/tools
KMSCTL=$BIN/kmsctl
KMSFS=$BIN/kmsfs

DEMO=$(mktemp -d /tmp/kmsfs-demo.XXXXXX)
export KMSFS_HOME=$DEMO/kms-home
unset KMSFS_KMS  # the embedded KMS, whatever the caller's environment says
CIPHER=$DEMO/cipher
MNT=$DEMO/mnt
mkdir -p "$MNT"

cleanup() {
  local rc=$?
  if mountpoint -q "$MNT" 2>/dev/null; then
    echo "demo: unmounting $MNT"
    "$KMSFS" umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" || true
  fi
  if ((rc != 0)); then echo "demo: FAILED (exit $rc); state left in $DEMO" >&2; fi
}
trap cleanup EXIT

say() { printf '\n\033[1m## %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

SECRET="kmsfs demo: this line is plaintext only inside the mount ($(date -u +%FT%TZ))"

say "Demo directory: $DEMO"
echo "KMSFS_HOME=$KMSFS_HOME  (embedded KMS state: SoftHSM2 token, PIN file, key metadata)"

say "1. Create a KMS key (the master key is generated inside the HSM and never leaves it)"
run "$KMSCTL" create-key --alias alias/demo --description "kmsfs demo key"
run "$KMSCTL" describe-key --key-id alias/demo

say "2. Create an encrypted directory whose file keys that KMS key wraps"
run "$KMSFS" init "$CIPHER" --key alias/demo
run cat "$CIPHER/kmsfs.json"

say "3. Mount it (returns once the mount is serving)"
run "$KMSFS" mount "$CIPHER" "$MNT"
run mountpoint "$MNT"

say "4. Write through the mount"
printf '%s\n' "$SECRET" > "$MNT/hello.txt"
run cp -a "$ROOT/crypto" "$MNT/src"
run ls -l "$MNT"
run cat "$MNT/hello.txt"

say "5. What landed on disk: the backing file in $CIPHER"
run ls -l "$CIPHER"
# Names are encrypted too: ask kmsfs which backing file holds hello.txt.
BACKING="$CIPHER/$("$KMSFS" encrypt-path "$CIPHER" hello.txt)"
echo "hello.txt is stored as $BACKING"
run hexdump -C "$BACKING"
echo "(128-byte header with the wrapped data key, then iv ‖ ciphertext ‖ tag)"
echo "plaintext size through the mount: $(stat -c %s "$MNT/hello.txt"), backing file: $(stat -c %s "$BACKING")"
if grep -rqF -- "$SECRET" "$CIPHER"; then
  echo "demo: the plaintext line was found in $CIPHER: NOT ENCRYPTED" >&2
  exit 1
fi
echo "OK: grep finds the plaintext line nowhere under $CIPHER"

say "6. Volume information"
run "$KMSFS" info "$CIPHER"

say "7. Unmount, remount, read back"
run "$KMSFS" umount "$MNT"
if mountpoint -q "$MNT"; then echo "demo: $MNT is still mounted" >&2; exit 1; fi
run "$KMSFS" mount "$CIPHER" "$MNT"
run cat "$MNT/hello.txt"
[[ $(cat "$MNT/hello.txt") == "$SECRET" ]] || { echo "demo: read-back differs" >&2; exit 1; }
run diff -r "$ROOT/crypto" "$MNT/src"
echo "OK: hello.txt and the copied source tree are byte-identical after the remount"
run "$KMSFS" umount "$MNT"

say "Done"
echo "The demo's state is left for you to look at: $DEMO"
echo "(remove it with: rm -rf $DEMO)"
