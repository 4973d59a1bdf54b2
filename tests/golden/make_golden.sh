#!/usr/bin/env bash
# Makes a golden cipher directory for the current format version: a KMS state
# dir (SoftHSM2 token, PIN, key records) and two volumes (encrypted and
# plaintext names) holding a fixed tree. Run once per format version; the
# result is committed under tests/golden/vN/ and golden_test.cpp checks that
# every later kmsfs still reads it byte for byte. The token and its PIN are
# test fixtures, not secrets.
#
# Usage: tests/golden/make_golden.sh BUILD_DIR OUT_DIR
set -euo pipefail
BUILD=$(cd "$1" && pwd); OUT=$2
[[ ! -e $OUT ]] || { echo "refusing to overwrite $OUT" >&2; exit 1; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export KMSFS_HOME=$OUT/home KMSFS_KMS=embedded
unset SOFTHSM2_CONF
"$BUILD/tools/kmsctl" create-key --alias alias/golden --description "golden test key" > /dev/null
MNT=$(mktemp -d)
trap '"$BUILD/tools/kmsfs" umount "$MNT" 2>/dev/null || true; rmdir "$MNT"' EXIT

fill() {  # the fixed tree, written through the mount
  local m=$1
  : > "$m/empty"
  printf 'x' > "$m/one-byte"
  python3 - "$m" <<'PY'
import os, random, sys
m = sys.argv[1]
r = random.Random(20261129)
def put(name, n):
    with open(os.path.join(m, name), "wb") as f:
        f.write(bytes(r.getrandbits(8) for _ in range(n)))
put("block-4095", 4095); put("block-4096", 4096); put("block-4097", 4097); put("random-100k", 100000)
os.makedirs(os.path.join(m, "dir/sub"))
put("dir/sub/nested", 12345)
put("dir/" + "L" * 240, 5000)
with open(os.path.join(m, "sparse"), "wb") as f:
    f.write(b"head"); f.seek(3 << 20); f.write(b"tail")
with open(os.path.join(m, "dir/ünïcödé name ✓.txt"), "w") as f:
    f.write("text in a file with an awkward name\n")
os.symlink("dir/sub/nested", os.path.join(m, "link"))
PY
}

for kind in encrypted plaintext; do
  args=(); [[ $kind == plaintext ]] && args=(--plaintext-names)
  "$BUILD/tools/kmsfs" init "$OUT/cipher-$kind" --key alias/golden "${args[@]}" > /dev/null
  "$BUILD/tools/kmsfs" mount "$OUT/cipher-$kind" "$MNT"
  fill "$MNT"
  # The manifest: type, sha256 (files) or target (links), path.
  (cd "$MNT" && find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do
     if [[ -L $p ]]; then echo "L $(readlink "$p") $p"
     elif [[ -d $p ]]; then echo "D - $p"
     else echo "F $(sha256sum < "$p" | cut -c1-64) $p"; fi
   done) > "$OUT/manifest-$kind.txt"
  "$BUILD/tools/kmsfs" umount "$MNT"
done
echo "golden volumes written to $OUT"
