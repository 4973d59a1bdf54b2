#!/usr/bin/env bash
# Runs test.mjs (the AWS SDK for JavaScript v3) against a kmsd started here
# on a temp socket with a temp state dir.
#   run.sh PATH/TO/kmsd
# Exit 0 = passed, 77 = skipped (node/npm missing or npm install failed,
# e.g. offline), anything else = failed. node_modules lives in the temp dir
# (or $KMSFS_NPM_CACHE_DIR, reused between runs); nothing is written here.
set -uo pipefail
KMSD=${1:?usage: run.sh PATH/TO/kmsd}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

command -v node >/dev/null && command -v npm >/dev/null || {
  echo "SKIP: node and npm are needed (apt-get install nodejs npm)"; exit 77; }

TMP=$(mktemp -d /tmp/kmsfs-aws-sdk.XXXXXX)
KMSD_PID=
cleanup() {
  [[ -n $KMSD_PID ]] && kill -9 "$KMSD_PID" 2>/dev/null && wait "$KMSD_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

WORK=${KMSFS_NPM_CACHE_DIR:-$TMP/npm}
mkdir -p "$WORK"
cp "$HERE/package.json" "$HERE/test.mjs" "$WORK/"
if [[ ! -d $WORK/node_modules/@aws-sdk/client-kms ]]; then
  echo "npm install @aws-sdk/client-kms in $WORK"
  if ! (cd "$WORK" && npm install --no-audit --no-fund --loglevel=error >"$TMP/npm.log" 2>&1); then
    cat "$TMP/npm.log"
    echo "SKIP: npm install failed (offline?); the AWS SDK test did not run"
    exit 77
  fi
fi

SOCK=$TMP/kmsd.sock
env -u SOFTHSM2_CONF -u KMSFS_HOME -u LISTEN_FDS -u LISTEN_PID -u NOTIFY_SOCKET \
  "$KMSD" --config /dev/null --state-dir "$TMP/state" --socket "$SOCK" 2>"$TMP/kmsd.log" &
KMSD_PID=$!
for _ in $(seq 600); do
  [[ -S $SOCK ]] && break
  kill -0 "$KMSD_PID" 2>/dev/null || { cat "$TMP/kmsd.log"; echo "FAIL: kmsd exited"; exit 1; }
  sleep 0.1
done
[[ -S $SOCK ]] || { cat "$TMP/kmsd.log"; echo "FAIL: kmsd did not serve"; exit 1; }

OPS=$("$KMSD" --list-operations | tr '\n' ' ')
(cd "$WORK" && KMSD_SOCKET=$SOCK KMSD_OPERATIONS=$OPS node test.mjs)
rc=$?
kill -TERM "$KMSD_PID"; wait "$KMSD_PID"; krc=$?; KMSD_PID=
if ((rc != 0)); then cat "$TMP/kmsd.log"; exit "$rc"; fi
((krc == 0)) || { echo "FAIL: kmsd exited $krc after SIGTERM"; exit 1; }
echo "PASS: AWS SDK for JavaScript v3 against kmsd"
