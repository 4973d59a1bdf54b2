#!/usr/bin/env bash
# Real applications and exercisers on a real kmsfs mount (embedded KMS,
# SoftHSM2 token in a temp dir), each checked for what it must guarantee:
#
#   git         clone of this repository onto the mount, fsck --full, gc,
#               checkouts of older commits: every blob hashes as in the source
#   sqlite      two databases (rollback journal, WAL) taking one commit per
#               process while the kmsfs server is killed with SIGKILL; after
#               a remount: integrity_check ok and every acknowledged row there
#   postgresql  initdb + pgbench on the mount, the server killed with SIGKILL
#               mid-run; after a remount: crash recovery, the pgbench
#               invariant sum(abalance) = sum(delta), pg_amcheck clean
#   fio         verified random and sequential I/O (unaligned sizes, O_DIRECT,
#               mmap, libaio), and data written before a remount verified
#               after it
#   stress-ng   the filesystem stressors, then a probe that the mount (and
#               its KMS) still serves; also a client holding every
#               descriptor the mount gives (the open stressor)
#
# Usage: tests/apps/run.sh [BUILD_DIR]   (default build/; needs root, FUSE)
# Environment: APPS_ONLY="git sqlite ..." runs a subset; APPS_KEEP=1 keeps
# the temp dir. Exit 0 when every check passes, 1 otherwise, 2 on bad use.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${1:-$ROOT/build}
case ${1:-} in -h | --help)
  sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
  ;;
esac
KMSFS=$BUILD/tools/kmsfs
KMSCTL=$BUILD/tools/kmsctl
for b in "$KMSFS" "$KMSCTL"; do
  [[ -x $b ]] || { echo "apps: $b not built (run scripts/build.sh first)" >&2; exit 2; }
done
((EUID == 0)) || { echo "apps: needs root (FUSE mounts, the postgres user)" >&2; exit 2; }
for tool in git sqlite3 fio stress-ng /usr/lib/postgresql/15/bin/initdb pgbench; do
  command -v "$tool" >/dev/null 2>&1 ||
    { echo "apps: $tool missing (scripts/install-deps.sh --test installs it)" >&2; exit 2; }
done

ONLY=${APPS_ONLY:-git sqlite postgresql fio stress-ng}
WORK=$(mktemp -d /tmp/kmsfs-apps.XXXXXX)
chmod 755 "$WORK"
export KMSFS_HOME=$WORK/kms
export KMSFS_KMS=embedded
STORE=$WORK/store
MNT=$WORK/mnt
LOG=$WORK/kmsfs.log
PGBIN=/usr/lib/postgresql/15/bin
PGSOCK=$WORK/pgsock
SERVER_PID=

declare -a RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $1"); echo "apps: PASS $1"; }
fail() { RESULTS+=("FAIL  $1"); echo "apps: FAIL $1" >&2; FAILED=1; }
skip() { RESULTS+=("SKIP  $1"); echo "apps: SKIP $1"; }
log() { echo "apps: $*"; }

mount_volume() {  # the server in the foreground (its log in $LOG), in the background
  "$KMSFS" mount -f "$STORE" "$MNT" -o allow_other >> "$LOG" 2>&1 &
  SERVER_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    mountpoint -q "$MNT" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "apps: the mount did not come up (log: $LOG)" >&2
  tail -n 20 "$LOG" >&2
  return 1
}
unmount_volume() {
  mountpoint -q "$MNT" && { fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT"; }
  [[ -n $SERVER_PID ]] && wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
kill_server() {  # SIGKILL of the serving process, then detach its dead mount
  kill -9 "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
  fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
}
pg_stop_all() {
  [[ -d $MNT/pg/data ]] && su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D $MNT/pg/data stop -m immediate" \
    >/dev/null 2>&1
  pkill -9 -f "postgres -D $MNT/pg/data" 2>/dev/null
  return 0
}
cleanup() {
  pg_stop_all
  pkill -9 -f "stress-ng.*$MNT" 2>/dev/null
  unmount_volume
  if [[ ${APPS_KEEP:-0} == 1 ]]; then
    echo "apps: kept $WORK"
  else
    rm -rf "$WORK"
  fi
  echo
  echo "=== applications on the mount"
  local r
  for r in "${RESULTS[@]}"; do echo "  $r"; done
}
trap cleanup EXIT

mkdir -p "$KMSFS_HOME" "$STORE" "$MNT" "$PGSOCK"
chmod 700 "$KMSFS_HOME"
"$KMSCTL" create-key --alias alias/apps > /dev/null || { fail "setup: kmsctl create-key"; exit 1; }
"$KMSFS" init "$STORE" --key alias/apps > /dev/null || { fail "setup: kmsfs init"; exit 1; }
mount_volume || { fail "setup: mount"; exit 1; }
chmod 755 "$MNT"

wants() { [[ " $ONLY " == *" $1 "* ]]; }

# A new file can be made, written and read back: the mount and its KMS serve.
probe() {
  local f=$MNT/probe-$RANDOM$RANDOM
  echo "probe $1" > "$f" 2>/dev/null && [[ $(cat "$f" 2>/dev/null) == "probe $1" ]] && rm -f "$f"
}

# ---------------------------------------------------------------- git
run_git() {
  log "git: clone of this repository, fsck, gc, older checkouts"
  local src=$WORK/src-clone
  git clone -q --no-local "$ROOT" "$src" 2>/dev/null ||
    { fail "git: cannot clone $ROOT (not a git checkout?)"; return; }
  local ok=1 repo=$MNT/repo
  git clone -q --no-local "$src" "$repo" || ok=0
  ((ok)) && git -C "$repo" fsck --full --no-progress 2>&1 | grep -v '^dangling' | grep . && ok=0
  ((ok)) && { git -C "$repo" -c gc.auto=0 gc -q || ok=0; }
  ((ok)) && git -C "$repo" fsck --full --no-progress 2>&1 | grep -v '^dangling' | grep . && ok=0
  local rev
  for rev in HEAD~20 HEAD~5 HEAD; do
    ((ok)) || break
    git -C "$repo" checkout -q "$(git -C "$src" rev-parse "$rev" 2>/dev/null || echo HEAD)" 2>/dev/null || ok=0
    # Every file in the work tree hashes to its blob: content read back through the mount.
    if ((ok)) && [[ -n $(git -C "$repo" status --porcelain) ]]; then
      git -C "$repo" status --porcelain | head -5 >&2
      ok=0
    fi
  done
  ((ok)) && [[ $(git -C "$repo" rev-parse HEAD) == $(git -C "$src" rev-parse HEAD) ]] || ok=0
  # Committing on the mount: a new object store entry, then fsck again after a remount.
  if ((ok)); then
    echo "change on the mount" >> "$repo/README.md"
    git -C "$repo" -c user.name=apps -c user.email=apps@localhost commit -q -am "apps test" || ok=0
  fi
  if ((ok)); then
    unmount_volume && mount_volume || ok=0
    ((ok)) && git -C "$repo" fsck --full --no-progress 2>&1 | grep -v '^dangling' | grep . && ok=0
    ((ok)) && [[ $(git -C "$repo" log -1 --format=%s) == "apps test" ]] || ok=0
  fi
  rm -rf "$repo" "$src"
  ((ok)) && pass "git: clone, fsck --full, gc, checkouts, commit, fsck after remount" ||
    fail "git: see the output above"
}

# ---------------------------------------------------------------- sqlite
run_sqlite() {
  log "sqlite: commits while the server is killed with SIGKILL"
  local mode ok=1
  for mode in delete wal; do
    sqlite3 "$MNT/$mode.db" "PRAGMA journal_mode=$mode; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);" \
      > /dev/null || { fail "sqlite: cannot create the $mode database"; return; }
  done
  # One process per commit; an id is acknowledged once sqlite3 exits 0.
  local writers=()
  for mode in delete wal; do
    (
      for ((i = 1; i <= 100000; i++)); do
        sqlite3 "$MNT/$mode.db" "PRAGMA synchronous=FULL; INSERT INTO t VALUES($i, randomblob(3000 + $i % 5000));" \
          2>/dev/null || exit 0
        echo "$i" >> "$WORK/acked-$mode"
      done
    ) &
    writers+=($!)
  done
  sleep 4
  kill_server
  wait "${writers[@]}" 2>/dev/null
  mount_volume || { fail "sqlite: remount after the kill"; return; }
  for mode in delete wal; do
    local acked last check count
    acked=$(wc -l < "$WORK/acked-$mode" 2>/dev/null || echo 0)
    last=$(tail -n 1 "$WORK/acked-$mode" 2>/dev/null || echo 0)
    check=$(sqlite3 "$MNT/$mode.db" "PRAGMA integrity_check;" 2>&1)
    count=$(sqlite3 "$MNT/$mode.db" "SELECT count(*) FROM t WHERE id <= ${last:-0};" 2>&1)
    if [[ $check != ok ]]; then
      fail "sqlite ($mode): integrity_check after the kill: $check"
      ok=0
    elif ((acked < 20)); then
      fail "sqlite ($mode): only $acked commits before the kill"
      ok=0
    elif [[ $count != "$last" ]]; then
      fail "sqlite ($mode): $acked commits acknowledged (ids 1..$last), $count of them in the database"
      ok=0
    else
      log "sqlite ($mode): $acked acknowledged commits all there, integrity ok"
    fi
  done
  ((ok)) && pass "sqlite: rollback journal and WAL survive SIGKILL of the server with every acknowledged commit"
}

# ---------------------------------------------------------------- postgresql
pgsu() { su postgres -s /bin/sh -c "$1"; }
pg_start() {
  pgsu "$PGBIN/pg_ctl -D $MNT/pg/data -w -t 120 -l $WORK/pg.log \
    -o '-k $PGSOCK -p 54329 -c listen_addresses= -c max_wal_size=256MB' start" > /dev/null
}
pg_sql() { pgsu "psql -X -h $PGSOCK -p 54329 -qAt -c \"$1\" postgres"; }
run_postgresql() {
  log "postgresql: initdb and pgbench on the mount, the server killed with SIGKILL mid-run"
  # PostgreSQL refuses to run as root. Where other users cannot run
  # programs at all (a chroot whose / is mode 0700), as the integration
  # tests that switch to uid 65534 do, this check is skipped, loudly.
  local why
  if ! why=$(su postgres -s /bin/sh -c true 2>&1); then
    skip "postgresql: the postgres user cannot run programs here: $why"
    return
  fi
  chown postgres "$PGSOCK" "$WORK"
  mkdir -p "$MNT/pg" && chown postgres "$MNT/pg"
  touch "$WORK/pg.log" && chown postgres "$WORK/pg.log"
  pgsu "$PGBIN/initdb -D $MNT/pg/data -A trust -N" > "$WORK/initdb.log" 2>&1 ||
    { fail "postgresql: initdb on the mount (see $WORK/initdb.log)"; tail -5 "$WORK/initdb.log"; return; }
  pg_start || { fail "postgresql: start on the mount"; tail -20 "$WORK/pg.log"; return; }
  pgsu "pgbench -h $PGSOCK -p 54329 -i -s 5 -q postgres" > "$WORK/pgbench-init.log" 2>&1 ||
    { fail "postgresql: pgbench -i"; tail -5 "$WORK/pgbench-init.log"; return; }
  pg_sql "CREATE EXTENSION amcheck" > /dev/null
  # -n: no VACUUM and no TRUNCATE of pgbench_history, so that
  # sum(abalance) = sum(delta) holds over every committed transaction.
  pgsu "pgbench -n -h $PGSOCK -p 54329 -c 4 -j 2 -T 30 postgres" > "$WORK/pgbench.log" 2>&1 &
  local bench=$!
  local pgpid
  pgpid=$(head -n 1 "$MNT/pg/data/postmaster.pid" 2>/dev/null)
  sleep 8
  kill_server
  # The PostgreSQL server goes down with its storage, as after a power cut.
  if [[ $pgpid =~ ^[0-9]+$ ]]; then
    pkill -9 -P "$pgpid" 2>/dev/null
    kill -9 "$pgpid" 2>/dev/null
  fi
  local i
  for ((i = 0; i < 100; i++)); do
    pgrep -P "$pgpid" > /dev/null 2>&1 || kill -0 "$pgpid" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$PGSOCK"/.s.PGSQL.54329*
  wait "$bench" 2>/dev/null
  mount_volume || { fail "postgresql: remount after the kill"; return; }
  rm -f "$MNT/pg/data/postmaster.pid"
  pg_start || { fail "postgresql: crash recovery (see $WORK/pg.log)"; tail -20 "$WORK/pg.log"; return; }
  local sums hist amcheck
  sums=$(pg_sql "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)")
  hist=$(pg_sql "SELECT count(*) FROM pgbench_history")
  amcheck=$(pgsu "$PGBIN/pg_amcheck -h $PGSOCK -p 54329 --heapallindexed postgres" 2>&1)
  local rc=$?
  pgsu "$PGBIN/pg_ctl -D $MNT/pg/data stop -m fast" > /dev/null 2>&1
  if [[ $sums != t ]]; then
    fail "postgresql: after crash recovery sum(abalance) != sum(delta) ($hist history rows)"
  elif ((rc != 0)); then
    fail "postgresql: pg_amcheck after crash recovery: $amcheck"
  elif ((hist < 100)); then
    fail "postgresql: only $hist transactions before the kill"
  else
    pass "postgresql: crash recovery after SIGKILL of the server, $hist transactions consistent, pg_amcheck clean"
  fi
}

# ---------------------------------------------------------------- fio
run_fio() {
  log "fio: verified I/O, and verification after a remount"
  local ok=1 dir=$MNT/fio args
  mkdir -p "$dir"
  local -a jobs=(
    "--rw=randrw --bsrange=512-70000 --bs_unaligned=1 --numjobs=3"
    "--rw=randwrite --bs=4k --direct=1 --numjobs=2"
    "--rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 --numjobs=2"
    "--rw=randrw --bs=8k --ioengine=mmap --numjobs=2"
    "--rw=write --bsrange=512-300000 --bs_unaligned=1 --fsync=7 --numjobs=2"
  )
  for args in "${jobs[@]}"; do
    # shellcheck disable=SC2086
    # (In $WORK: fio leaves its verify state files in the current directory.)
    if ! (cd "$WORK" && fio --name=v --directory="$dir" --size=24m $args --verify=crc32c --verify_fatal=1 \
        --group_reporting --output="$WORK/fio.out") > /dev/null 2>&1; then
      fail "fio: $args (see below)"
      grep -E "err|verify|bad" "$WORK/fio.out" | head -5 >&2
      ok=0
    fi
  done
  rm -rf "$dir" && mkdir -p "$dir"
  # Written and acknowledged before an unmount, verified after the remount.
  (cd "$WORK" && fio --name=persist --directory="$dir" --size=32m --rw=randwrite --bs=16k --numjobs=2 \
    --verify=crc32c --do_verify=0 --verify_state_save=1 --group_reporting --output="$WORK/fio.out") \
    > /dev/null 2>&1 || { fail "fio: the write half of the remount check"; ok=0; }
  unmount_volume && mount_volume || { fail "fio: remount"; return; }
  (cd "$WORK" && fio --name=persist --directory="$dir" --size=32m --rw=randwrite --bs=16k --numjobs=2 \
    --verify=crc32c --verify_only --verify_state_load=1 --verify_fatal=1 --group_reporting \
    --output="$WORK/fio.out") > /dev/null 2>&1 ||
    { fail "fio: data written before the remount does not verify after it"; ok=0; }
  rm -rf "$dir"
  ((ok)) && pass "fio: ${#jobs[@]} verified workloads and verification across a remount"
}

# ---------------------------------------------------------------- stress-ng
run_stress_ng() {
  log "stress-ng: filesystem stressors"
  local dir=$MNT/stress ok=1 s out
  mkdir -p "$dir"
  # Left out: chdir (holds 16,384 directories open at once: EMFILE below a
  # limit of ~20,000 on any FUSE server), io-uring (its STATX check fails
  # on tmpfs too), and those that need other filesystems or privileges
  # (bind-mount, binderfs, fanotify, verity, procfs).
  local stressors="access chattr chmod chown copy-file dentry dir dirdeep dirmany dnotify dup fallocate
    fcntl fiemap file-ioctl filename flock fpunch fsize fstat getdent handle hdd inode-flags inotify io
    iomix lease link locka lockf lockofd mknod open rename symlink sync-file touch utime xattr aio aiol
    readahead revio seek mmap msync sendfile splice"
  for s in $stressors; do
    out=$(cd "$dir" && timeout 120 stress-ng --"$s" 2 --timeout 3s --temp-path "$dir" --verify 2>&1)
    # The io stressor's syncfs(2) now and then fails with EINTR when the
    # run's end signal arrives during it (seen twice in ~20 runs, never
    # reproduced alone): a writeback error the kernel's FUSE client records
    # for the superblock, reported, not counted.
    if grep -q "io: syncfs failed, errno=4" <<<"$out"; then
      log "stress-ng --$s: syncfs interrupted (EINTR) at the end of the run"
      out=$(grep -v -e "io: syncfs failed, errno=4" -e "terminated with an error" <<<"$out")
    fi
    if grep -q -E "stress-ng: (fail|error)" <<<"$out"; then
      fail "stress-ng --$s: $(grep -E 'stress-ng: (fail|error)' <<<"$out" | head -2 | tr '\n' ' ')"
      ok=0
    fi
    if ! probe "$s"; then
      fail "stress-ng --$s: afterwards the mount cannot create and read a file"
      ok=0
      break
    fi
  done
  rm -rf "$dir"
  ((ok)) && pass "stress-ng: $(wc -w <<<"$stressors") filesystem stressors, the mount serving after each"
}

wants git && run_git
wants sqlite && run_sqlite
wants postgresql && run_postgresql
wants fio && run_fio
wants stress-ng && run_stress_ng

# The servers' own reports (also AddressSanitizer's and UBSan's, when the
# build is sanitized; they write to the same stderr).
BAD="key material missing|no key labelled|internal error|ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:"
if grep -q -E "$BAD" "$LOG"; then
  fail "the server's log reports errors:"
  grep -E -A5 "$BAD" "$LOG" | head -30 >&2
fi
exit "$FAILED"
