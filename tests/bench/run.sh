#!/usr/bin/env bash
# tests/bench/run.sh — the kmsfs benchmark (issue #6).
#
# Mounts kmsfs beside gocryptfs, securefs (lite format), CryFS, a FUSE
# passthrough (bindfs) and the backing store without FUSE, all on fresh
# backing directories (tmpfs by default), and runs the same workloads on each,
# alternating systems and repeating; then measures the KMS (GenerateDataKey /
# Decrypt, embedded and through kmsd, beside the HSM's raw AES-GCM) and
# OpenSSL's AES-256-GCM. Writes a Markdown table (absolute figures, ratios to
# gocryptfs, pass/fail against the issue's targets) with the machine
# description and a PNG chart. docs/performance.md explains every figure.
#
# Run as root (mounts, drop_caches) on a machine you may load:
#
#   BENCH_PROFILE=short tests/bench/run.sh     # < 5 minutes, small sizes
#   tests/bench/run.sh                         # full profile, < 45 minutes
#
# Environment (defaults: full / short profile):
#   BENCH_PROFILE       full | short
#   REPEAT              rounds over all systems (3 / 2); medians and min-max
#   BENCH_SYSTEMS       systems in the order of round 1; later rounds rotate it
#                       ("backing bindfs kmsfs gocryptfs securefs cryfs";
#                        kmsfs-kmsd = kmsfs through kmsd, add it if wanted)
#   BENCH_SEQ_MB        sequential file size in MiB (1024 / 64)
#   BENCH_FIO_MB        fio file size in MiB (512 / 32)
#   BENCH_FIO_SECONDS   runtime of each fio job (15 / 2)
#   BENCH_UNTAR_FILES   regular files of the Linux tree to untar, 0 = all (17500 / 1000)
#   BENCH_SQLITE_ROWS   rows inserted per SQLite mode (100000 / 2000)
#   BENCH_SQLITE_BATCH  rows per transaction (100 / 50)
#   BENCH_KMS_SECONDS   seconds per KMS measurement (3 / 1)
#   BENCH_KMS_THREADS   comma-separated thread counts (1,nproc)
#   BENCH_BACKING       tmpfs | disk (backing dirs on a private tmpfs or under BENCH_WORK)
#   BENCH_KMSFS_OPTS    extra kmsfs mount options (-o), e.g. key_cache=off
#   BENCH_BUILD_DIR     where kmsfs, kmsctl, kmsd and kms_bench are built (REPO/build)
#   BENCH_OUT           output dir (REPO/docs/bench); BENCH_NAME file stem (latest)
#   BENCH_CACHE         decompressed Linux tar, subsets, SQL scripts (/var/tmp/kmsfs-bench-cache)
#   BENCH_WORK          parent of the scratch dir (/var/tmp)
#   BENCH_STEP_TIMEOUT  seconds before one step is abandoned (900)
#   BENCH_KMS_STATE     disk | tmpfs: where the KMS state dirs live (disk, under BENCH_WORK)
#   BENCH_CRYFS_REMOUNT=1  remount CryFS between steps like the others (slow: scrypt per mount)
#   BENCH_PYTHON        interpreter for the report (/usr/bin/python3)
#   BENCH_NO_INSTALL=1  never run apt-get; systems whose tools are missing are skipped
#   BENCH_SKIP_KMS=1 / BENCH_SKIP_FS=1   leave out the KMS or the filesystem part
#
# Everything the script mounts or starts is unmounted / stopped on exit,
# also on failure or Ctrl-C (trap). It sends no traffic off this machine
# (CryFS's update check is disabled).

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

PROFILE=${BENCH_PROFILE:-full}
case $PROFILE in
  full)
    : "${REPEAT:=3}" "${BENCH_SEQ_MB:=1024}" "${BENCH_FIO_MB:=512}" "${BENCH_FIO_SECONDS:=15}"
    : "${BENCH_UNTAR_FILES:=17500}" "${BENCH_SQLITE_ROWS:=100000}" "${BENCH_SQLITE_BATCH:=100}"
    : "${BENCH_KMS_SECONDS:=3}" ;;
  short)
    : "${REPEAT:=2}" "${BENCH_SEQ_MB:=64}" "${BENCH_FIO_MB:=32}" "${BENCH_FIO_SECONDS:=2}"
    : "${BENCH_UNTAR_FILES:=1000}" "${BENCH_SQLITE_ROWS:=2000}" "${BENCH_SQLITE_BATCH:=50}"
    : "${BENCH_KMS_SECONDS:=1}" ;;
  *) echo "run.sh: BENCH_PROFILE must be full or short" >&2; exit 2 ;;
esac
: "${BENCH_SYSTEMS:=backing bindfs kmsfs gocryptfs securefs cryfs}"
: "${BENCH_KMS_THREADS:=1,$(nproc)}"
: "${BENCH_BACKING:=tmpfs}"
: "${BENCH_KMSFS_OPTS:=}"
: "${BENCH_BUILD_DIR:=$REPO/build}"
: "${BENCH_OUT:=$REPO/docs/bench}"
: "${BENCH_NAME:=latest}"
: "${BENCH_CACHE:=/var/tmp/kmsfs-bench-cache}"
: "${BENCH_WORK:=/var/tmp}"
: "${BENCH_STEP_TIMEOUT:=900}"
: "${BENCH_NO_INSTALL:=0}"
: "${BENCH_SKIP_KMS:=0}"
: "${BENCH_SKIP_FS:=0}"
: "${BENCH_CRYFS_REMOUNT:=0}"
: "${BENCH_KMS_STATE:=disk}"
# Debian's python3 (matplotlib comes from python3-matplotlib), even when a
# pyenv or venv python3 is first on PATH.
: "${BENCH_PYTHON:=$( [[ -x /usr/bin/python3 ]] && echo /usr/bin/python3 || echo python3)}"

KMSFS=$BENCH_BUILD_DIR/tools/kmsfs
KMSCTL=$BENCH_BUILD_DIR/tools/kmsctl
KMSD=$BENCH_BUILD_DIR/tools/kmsd
KMS_BENCH=$BENCH_BUILD_DIR/tests/bench/kms_bench
PASSWORD=kmsfs-bench-not-a-secret   # peers' volumes are throwaway

# Never let CryFS (or anything else) reach the network; keep git quiet and local.
export CRYFS_NO_UPDATE_CHECK=true CRYFS_FRONTEND=noninteractive
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME=bench GIT_AUTHOR_EMAIL=bench@localhost
export GIT_COMMITTER_NAME=bench GIT_COMMITTER_EMAIL=bench@localhost
export LC_ALL=C

# ---------------------------------------------------------------- logging

log() {
  local line
  line="$(date +%H:%M:%S) $*"
  [[ -n ${RAW:-} && -d $RAW ]] && printf '%s\n' "$line" >> "$RAW/run.log"
  printf '%s\n' "$line" >&2
}
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup

WORK=""
RAW=""
STORE=""
MOUNTED=()        # mountpoints to unmount on exit (FUSE mounts and our tmpfs)
KMSD_PID=""

unmount_one() {  # MOUNTPOINT: unmount, waiting for the FUSE server to exit
  local mnt=$1 pid
  grep -qs " $mnt " /proc/mounts || return 0
  pid=$(fuse_pid "$mnt")
  fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  # The server flushes and exits after the unmount; a remount must not race it.
  local i=0
  while [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && ((i++ < 300)); do sleep 0.1; done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local i
  # FUSE mounts first, then kmsd (its state may live on our tmpfs), then the tmpfs.
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    [[ -n ${MOUNTED[i]} && ${MOUNTED[i]} != "${STORE:-}" ]] && unmount_one "${MOUNTED[i]}"
  done
  if [[ -n $KMSD_PID ]] && kill -0 "$KMSD_PID" 2>/dev/null; then
    kill -TERM "$KMSD_PID" 2>/dev/null
    wait "$KMSD_PID" 2>/dev/null
  fi
  [[ -n ${STORE:-} ]] && unmount_one "$STORE"
  if [[ -n $WORK && -d $WORK ]]; then
    # Never delete through a mount that is somehow still there.
    if grep -qs " $WORK/" /proc/mounts; then
      echo "run.sh: $WORK still has mounts; left in place" >&2
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_mount() {  # MOUNTPOINT: drop it from MOUNTED
  local i
  for i in "${!MOUNTED[@]}"; do [[ ${MOUNTED[i]} == "$1" ]] && MOUNTED[i]=""; done
}

# ---------------------------------------------------------------- helpers

# The PID of the process serving the FUSE mount MNT: the one whose argv has
# MNT as an argument (every system here is started with the absolute path).
# Bash builtins only: this runs at every remount, and a fork per process
# costs seconds on a busy machine.
fuse_pid() {
  local mnt=$1 d a best=""
  local -a args
  for d in /proc/[0-9]*; do
    mapfile -d "" -t args 2> /dev/null < "$d/cmdline" || continue
    for a in "${args[@]:1}"; do
      if [[ $a == "$mnt" ]]; then
        best=${d#/proc/}
        break
      fi
    done
  done
  echo "$best"
}

vm_hwm_mib() {  # PID -> peak RSS in MiB
  awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null
}

DROP_WARNED=0
drop_caches() {
  # syncfs of our backing store only: a global sync would also flush other
  # users' disks. (tmpfs pages are the store itself and are never dropped.)
  sync -f "${STORE:-/}"
  if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    ((DROP_WARNED++)) || log "warning: cannot write /proc/sys/vm/drop_caches; reads may be served from cache"
  fi
}

SECONDS_TAKEN=""
# timed CMD...: runs CMD under the step timeout, sets SECONDS_TAKEN.
timed() {
  local t0 t1 rc
  t0=$EPOCHREALTIME
  timeout "$BENCH_STEP_TIMEOUT" "$@"
  rc=$?
  t1=$EPOCHREALTIME
  SECONDS_TAKEN=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
  return $rc
}

# record SYSTEM METRIC ROUND VALUE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RAW/results.tsv"; }

wait_mounted() {  # MNT: up to 30 s
  local i
  for ((i = 0; i < 300; i++)); do
    grep -qs " $1 " /proc/mounts && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- set-up

need_root() {
  [[ $(id -u) -eq 0 ]] || die "run as root (mounts a tmpfs, drops caches, mounts FUSE filesystems)"
  [[ -c /dev/fuse ]] || die "/dev/fuse is missing"
}

# Installs what the selected systems and workloads need, from Debian.
install_missing() {
  local pkgs=() s
  have() { command -v "$1" > /dev/null 2>&1; }
  for s in $BENCH_SYSTEMS; do
    case $s in
      gocryptfs) have gocryptfs || pkgs+=(gocryptfs) ;;
      securefs) have securefs || pkgs+=(securefs) ;;
      cryfs) have cryfs || pkgs+=(cryfs) ;;
      bindfs) have bindfs || pkgs+=(bindfs) ;;
    esac
  done
  have fio || pkgs+=(fio)
  have sqlite3 || pkgs+=(sqlite3)
  have git || pkgs+=(git)
  have python3 || pkgs+=(python3)
  have fusermount3 || pkgs+=(fuse3)
  have openssl || pkgs+=(openssl)
  "$BENCH_PYTHON" -c 'import matplotlib' > /dev/null 2>&1 || pkgs+=(python3-matplotlib)
  compgen -G '/usr/src/linux-source-*.tar.xz' > /dev/null || pkgs+=(linux-source)
  ((${#pkgs[@]})) || return 0
  if [[ $BENCH_NO_INSTALL == 1 ]]; then
    log "not installing (BENCH_NO_INSTALL=1): ${pkgs[*]}"
    return 0
  fi
  log "installing from Debian: ${pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >> "$RAW/apt.log" 2>&1 \
    || { apt-get update >> "$RAW/apt.log" 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >> "$RAW/apt.log" 2>&1; } \
    || log "warning: apt-get install failed (see $RAW/apt.log); systems without their tools are skipped"
}

# Drops systems whose tools are missing, with a note in the report.
usable_systems() {
  local s out=()
  for s in $BENCH_SYSTEMS; do
    case $s in
      backing) out+=("$s") ;;
      kmsfs | kmsfs-kmsd)
        [[ -x $KMSFS && -x $KMSCTL ]] || { note "$s skipped: $KMSFS not built"; continue; }
        [[ $s != kmsfs-kmsd || -x $KMSD ]] || { note "$s skipped: $KMSD not built"; continue; }
        out+=("$s") ;;
      gocryptfs | securefs | cryfs | bindfs)
        command -v "$s" > /dev/null || { note "$s skipped: not installed"; continue; }
        out+=("$s") ;;
      *) note "unknown system '$s' skipped" ;;
    esac
  done
  echo "${out[*]}"
}

note() { echo "$*" >> "$RAW/notes.txt"; log "note: $*"; }

describe_machine() {
  local f=$RAW/machine.txt
  {
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "profile=$PROFILE"
    echo "repeat=$REPEAT"
    echo "backing=$BENCH_BACKING"
    echo "nproc=$(nproc)"
    echo "cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "kernel=$(uname -sr)"
    echo "memory=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "kmsfs_commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- crypto fs keyclient tools 2>/dev/null || echo '+uncommitted changes')"
    echo "kmsfs_opts=${BENCH_KMSFS_OPTS:-(defaults)}"
    echo "kms_state=$BENCH_KMS_STATE ($(df --output=fstype "$(kms_state_parent)" 2> /dev/null | tail -1))"
    echo "seq_mb=$BENCH_SEQ_MB"
    echo "fio_mb=$BENCH_FIO_MB"
    echo "fio_seconds=$BENCH_FIO_SECONDS"
    echo "untar_files=$UNTAR_COUNT"
    echo "sqlite_rows=$BENCH_SQLITE_ROWS"
    echo "sqlite_batch=$BENCH_SQLITE_BATCH"
    echo "kms_seconds=$BENCH_KMS_SECONDS"
    echo "kms_threads=$BENCH_KMS_THREADS"
    local v
    for v in gocryptfs securefs cryfs bindfs fio sqlite3 git openssl; do
      command -v "$v" > /dev/null || continue
      case $v in
        gocryptfs) echo "version_$v=$(gocryptfs -version 2>/dev/null | head -1 | cut -d';' -f1)" ;;
        securefs | cryfs | bindfs | sqlite3 | fio | git | openssl)
          echo "version_$v=$(dpkg-query -W -f='${Version}' "$( [[ $v == openssl ]] && echo openssl || echo "$v")" 2>/dev/null)" ;;
      esac
    done
    echo "version_softhsm2=$(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null)"
    echo "version_libfuse3=$(dpkg-query -W -f='${Version}' libfuse3-3 2>/dev/null)"
  } > "$f"
}

UNTAR_TAR=""
UNTAR_COUNT=""
SQL_FILE=""

prepare_inputs() {
  mkdir -p "$BENCH_CACHE"
  local xz full
  xz=$(compgen -G '/usr/src/linux-source-*.tar.xz' | sort -V | tail -1)
  [[ -n $xz ]] || die "no /usr/src/linux-source-*.tar.xz (apt-get install linux-source)"
  full=$BENCH_CACHE/$(basename "${xz%.xz}")
  if [[ ! -s $full ]]; then
    log "decompressing $xz to $full (once)"
    xz -dc "$xz" > "$full.part" && mv "$full.part" "$full" || die "cannot decompress $xz"
  fi
  if [[ $BENCH_UNTAR_FILES == 0 ]]; then
    UNTAR_TAR=$full
    UNTAR_COUNT=$(tar -tvf "$full" | grep -c '^-')
  else
    UNTAR_TAR=$BENCH_CACHE/$(basename "${full%.tar}")-first$BENCH_UNTAR_FILES.tar
    if [[ ! -s $UNTAR_TAR ]]; then
      log "writing a subset tar of $BENCH_UNTAR_FILES files"
      "$BENCH_PYTHON" "$HERE/tar_subset.py" "$full" "$BENCH_UNTAR_FILES" "$UNTAR_TAR" > /dev/null || die "tar_subset failed"
    fi
    UNTAR_COUNT=$BENCH_UNTAR_FILES
  fi
  SQL_FILE=$BENCH_CACHE/sqlite-$BENCH_SQLITE_ROWS-$BENCH_SQLITE_BATCH.sql
  if [[ ! -s $SQL_FILE ]]; then
    awk -v rows="$BENCH_SQLITE_ROWS" -v batch="$BENCH_SQLITE_BATCH" 'BEGIN {
      srand(6);
      print "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v TEXT NOT NULL);";
      print "CREATE INDEX t_k ON t(k);";
      pad = "abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01";
      for (i = 0; i < rows; i++) {
        if (i % batch == 0) print "BEGIN;";
        printf "INSERT INTO t(k, v) VALUES(%d, \x27%s-%d\x27);\n", int(rand() * 1000000000), pad, i;
        if (i % batch == batch - 1 || i == rows - 1) print "COMMIT;";
      }
      print "SELECT count(*), sum(k) % 1000 FROM t;";
    }' > "$SQL_FILE.part" && mv "$SQL_FILE.part" "$SQL_FILE"
  fi
}

ensure_built() {
  local missing=0 f need=()
  [[ " $BENCH_SYSTEMS " == *" kmsfs"* && $BENCH_SKIP_FS != 1 ]] && need+=("$KMSFS" "$KMSCTL" "$KMSD")
  [[ $BENCH_SKIP_KMS != 1 ]] && need+=("$KMSCTL" "$KMSD" "$KMS_BENCH")
  for f in "${need[@]}"; do [[ -x $f ]] || missing=1; done
  ((missing)) || return 0
  [[ -f $BENCH_BUILD_DIR/CMakeCache.txt ]] || die "no build in $BENCH_BUILD_DIR (set BENCH_BUILD_DIR or run scripts/build.sh)"
  log "building kmsfs kmsctl kmsd kms_bench in $BENCH_BUILD_DIR"
  cmake --build "$BENCH_BUILD_DIR" -j2 --target kmsfs kmsctl kmsd kms_bench >> "$RAW/build.log" 2>&1 \
    || die "build failed (see $RAW/build.log)"
}

# A KMS home with key alias/bench: embedded (HOME) or through a kmsd on SOCK.
KMS_HOME_EMB=""
KMS_HOME_D=""
KMSD_SOCK=""

# The KMS state (key records, audit log, SoftHSM token): on disk by default,
# as /var/lib/kmsfs is in real use; BENCH_KMS_STATE=tmpfs puts it on the
# private tmpfs to separate the filesystem from the cost of the KMS's fsyncs.
kms_state_parent() {
  if [[ $BENCH_KMS_STATE == tmpfs && $BENCH_BACKING == tmpfs ]]; then echo "$STORE"; else echo "$WORK"; fi
}

setup_kms_embedded() {
  [[ -n $KMS_HOME_EMB ]] && return 0
  KMS_HOME_EMB=$(kms_state_parent)/kms-embedded
  mkdir -m 0700 -p "$KMS_HOME_EMB"
  KMSFS_HOME=$KMS_HOME_EMB "$KMSCTL" create-key --alias alias/bench --description "benchmark" > /dev/null \
    || die "kmsctl create-key (embedded) failed"
}

start_kmsd() {
  [[ -n $KMSD_PID ]] && return 0
  KMS_HOME_D=$(kms_state_parent)/kms-kmsd
  KMSD_SOCK=$WORK/kmsd.sock
  mkdir -m 0700 -p "$KMS_HOME_D"
  "$KMSD" --state-dir "$KMS_HOME_D" --socket "$KMSD_SOCK" >> "$RAW/kmsd.log" 2>&1 &
  KMSD_PID=$!
  local i
  for ((i = 0; i < 300; i++)); do
    [[ -S $KMSD_SOCK ]] && break
    kill -0 "$KMSD_PID" 2>/dev/null || die "kmsd exited (see $RAW/kmsd.log)"
    sleep 0.1
  done
  [[ -S $KMSD_SOCK ]] || die "kmsd did not create $KMSD_SOCK"
  "$KMSCTL" --kms "unix:$KMSD_SOCK" create-key --alias alias/bench --description "benchmark" > /dev/null \
    || die "kmsctl create-key through kmsd failed"
}

# ---------------------------------------------------------------- systems
# sys_create SYS DIR: a fresh volume in DIR/{cipher,...}; sys_mount SYS DIR MNT.

sys_create() {
  local sys=$1 dir=$2
  mkdir -p "$dir/cipher"
  case $sys in
    backing | bindfs) ;;
    kmsfs)
      setup_kms_embedded
      KMSFS_HOME=$KMS_HOME_EMB "$KMSFS" init "$dir/cipher" --key alias/bench > /dev/null ;;
    kmsfs-kmsd)
      start_kmsd
      "$KMSFS" --kms "unix:$KMSD_SOCK" init "$dir/cipher" --key alias/bench > /dev/null ;;
    gocryptfs)
      printf '%s\n' "$PASSWORD" > "$dir/pass"
      gocryptfs -init -q -scryptn 10 -passfile "$dir/pass" "$dir/cipher" > /dev/null ;;
    securefs)
      # Format 4 is securefs's "lite" format; a fast KDF keeps remounts quick
      # (key derivation is not what is measured).
      securefs create --format 4 --pbkdf pkcs5-pbkdf2-hmac-sha256 -r 1000 --pass "$PASSWORD" "$dir/cipher" > /dev/null ;;
    cryfs)
      mkdir -p "$dir/cryfs-state" ;;  # created at first mount
  esac
}

sys_mount() {
  local sys=$1 dir=$2 mnt=$3
  mkdir -p "$mnt"
  case $sys in
    backing) return 0 ;;
    bindfs) bindfs --multithreaded --no-allow-other -o big_writes "$dir/cipher" "$mnt" ;;
    kmsfs)
      KMSFS_HOME=$KMS_HOME_EMB "$KMSFS" mount "$dir/cipher" "$mnt" ${BENCH_KMSFS_OPTS:+-o "$BENCH_KMSFS_OPTS"} ;;
    kmsfs-kmsd)
      "$KMSFS" --kms "unix:$KMSD_SOCK" mount "$dir/cipher" "$mnt" ${BENCH_KMSFS_OPTS:+-o "$BENCH_KMSFS_OPTS"} ;;
    gocryptfs) gocryptfs -q -nosyslog -passfile "$dir/pass" "$dir/cipher" "$mnt" ;;
    securefs) securefs mount -b --pass "$PASSWORD" "$dir/cipher" "$mnt" > /dev/null ;;
    cryfs)
      # Same cipher as the others (CryFS's default is XChaCha20-Poly1305).
      printf '%s\n' "$PASSWORD" | CRYFS_LOCAL_STATE_DIR=$dir/cryfs-state \
        cryfs --cipher aes-256-gcm "$dir/cipher" "$mnt" > /dev/null ;;
  esac || return 1
  MOUNTED+=("$mnt")
  wait_mounted "$mnt" || return 1
}

sys_umount() {
  local sys=$1 mnt=$2
  [[ $sys == backing ]] && return 0
  unmount_one "$mnt"
  forget_mount "$mnt"
  ! grep -qs " $mnt " /proc/mounts
}

remount() {  # SYS DIR MNT: unmount, drop caches, mount again (a cold start)
  if [[ $1 == cryfs && $BENCH_CRYFS_REMOUNT != 1 ]]; then
    # Every CryFS mount runs its scrypt (about 17 CPU-seconds here, with no
    # option to lower it), so CryFS stays mounted: caches dropped only, its
    # own in-process caches stay warm (which favours it). See notes.
    drop_caches
    return 0
  fi
  sys_umount "$1" "$3" || return 1
  drop_caches
  sys_mount "$1" "$2" "$3" >> "$RAW/run.log" 2>&1
}

# ---------------------------------------------------------------- workloads

mbps() { awk -v mb="$1" -v s="$2" 'BEGIN { printf "%.1f", mb * 1048576 / 1e6 / s }'; }

fio_iops() {  # RW PATH -> IOPS (direct I/O, one job, queue depth 1)
  local rw=$1 file=$2 out
  out=$(timeout "$BENCH_STEP_TIMEOUT" fio --name=bench --filename="$file" --size="${BENCH_FIO_MB}M" \
    --bs=4k --rw="$rw" --direct=1 --ioengine=psync --iodepth=1 --numjobs=1 \
    --runtime="$BENCH_FIO_SECONDS" --time_based --randrepeat=0 --output-format=json 2>> "$RAW/fio.err") || return 1
  "$BENCH_PYTHON" -c 'import json, sys
d = json.load(sys.stdin)["jobs"][0]
print("%.0f" % d[sys.argv[1]]["iops"])' "$([[ $rw == randread ]] && echo read || echo write)" <<< "$out"
}

# untar_into DIR SYS ROUND: timed tar -x of the subset into DIR, then syncfs.
# When tar reports errors but every file arrived (e.g. it could not set a
# symlink's times), the time counts and the error goes into the notes: the
# row stays comparable and the defect stays visible.
untar_into() {
  local dest=$1 sys=$2 round=$3 rc n
  mkdir -p "$dest"
  timed bash -c 'tar -xf "$1" -C "$2" 2> "$3"; rc=$?; sync -f "$2"; exit $rc' _ "$UNTAR_TAR" "$dest" "$RAW/tar.err"
  rc=$?
  ((rc == 0)) && return 0
  n=$(find "$dest" -type f | wc -l)
  if [[ $n -eq $UNTAR_COUNT ]]; then
    note "$sys: tar exited $rc in round $round although all $n files arrived (time counted): $(head -1 "$RAW/tar.err")"
    return 0
  fi
  note "$sys: tar exited $rc in round $round with $n of $UNTAR_COUNT files: $(head -1 "$RAW/tar.err")"
  return 1
}

# One system, one round: every filesystem workload on a fresh volume.
run_system() {
  local sys=$1 round=$2 dir=$STORE/$1 mnt=$WORK/mnt/$1 p v pid
  rm -rf "$dir"
  mkdir -p "$dir"
  log "[$round/$REPEAT] $sys"
  if ! sys_create "$sys" "$dir" >> "$RAW/run.log" 2>&1; then
    note "$sys: creating the volume failed in round $round"
    rm -rf "$dir"
    return 0
  fi
  if ! sys_mount "$sys" "$dir" "$mnt" >> "$RAW/run.log" 2>&1; then
    note "$sys: mount failed in round $round"
    sys_umount "$sys" "$mnt"
    rm -rf "$dir"
    return 0
  fi
  p=$mnt
  [[ $sys == backing ]] && p=$dir/cipher

  # Sequential write (fsync'd, so the writeback cache is flushed) and read
  # after drop_caches and a remount.
  if timed dd if=/dev/zero of="$p/seq.bin" bs=1M count="$BENCH_SEQ_MB" conv=fsync status=none; then
    record "$sys" seq_write "$round" "$(mbps "$BENCH_SEQ_MB" "$SECONDS_TAKEN")"
    if remount "$sys" "$dir" "$mnt" && timed dd if="$p/seq.bin" of=/dev/null bs=1M status=none; then
      record "$sys" seq_read "$round" "$(mbps "$BENCH_SEQ_MB" "$SECONDS_TAKEN")"
    else
      note "$sys: seq_read failed in round $round"
    fi
  else
    note "$sys: seq_write failed in round $round"
  fi
  rm -f "$p/seq.bin"

  # Random 4 KiB reads and writes, O_DIRECT (so every request reaches the
  # filesystem, not the page cache), bounded runtime.
  for v in randread randwrite; do
    local iops
    if iops=$(fio_iops "$v" "$p/fio.dat") && [[ -n $iops ]]; then
      record "$sys" "${v/rand/rand_}" "$round" "$iops"
    else
      note "$sys: fio $v failed in round $round (see fio.err)"
    fi
  done
  rm -f "$p/fio.dat"

  # SQLite: BENCH_SQLITE_ROWS inserts, BENCH_SQLITE_BATCH per transaction.
  for v in delete wal; do
    if timed sqlite3 -cmd "PRAGMA journal_mode=$v" "$p/bench-$v.db" < "$SQL_FILE" > /dev/null; then
      record "$sys" "sqlite_$v" "$round" "$SECONDS_TAKEN"
    else
      note "$sys: sqlite $v failed in round $round"
    fi
    rm -f "$p/bench-$v.db" "$p/bench-$v.db-wal" "$p/bench-$v.db-shm" "$p/bench-$v.db-journal"
  done

  # Untar into a freshly started server (its VmHWM is then the untar's peak),
  # syncfs included so that written-back data counts.
  remount "$sys" "$dir" "$mnt" || note "$sys: remount failed in round $round"
  if untar_into "$p/tree" "$sys" "$round"; then
    record "$sys" untar "$round" "$SECONDS_TAKEN"
    if [[ $sys != backing ]]; then
      pid=$(fuse_pid "$mnt")
      [[ -n $pid ]] && record "$sys" rss_untar "$round" "$(vm_hwm_mib "$pid")"
    fi
    remount "$sys" "$dir" "$mnt" &&
      timed bash -c 'ls -lR "$1" > /dev/null' _ "$p/tree" &&
      record "$sys" ls_lR "$round" "$SECONDS_TAKEN" || note "$sys: ls -lR failed in round $round"
    remount "$sys" "$dir" "$mnt" &&
      timed bash -c 'find "$1" -type f -exec cat {} + > /dev/null' _ "$p/tree" &&
      record "$sys" read_all "$round" "$SECONDS_TAKEN" || note "$sys: read-all failed in round $round"
    remount "$sys" "$dir" "$mnt" &&
      timed bash -c 'rm -rf "$1" && sync -f "$2"' _ "$p/tree" "$p" &&
      record "$sys" rm_rf "$round" "$SECONDS_TAKEN" || note "$sys: rm -rf failed in round $round"
  else
    note "$sys: untar failed in round $round"
  fi
  rm -rf "$p/tree"

  # git: the same tree untarred again (not timed), then add + commit + fsck
  # from a cold mount. --force: Debian's linux-source tree carries a
  # .gitignore that ignores "/*".
  if untar_into "$p/repo" "$sys" "$round" && remount "$sys" "$dir" "$mnt"; then
    local t_add t_commit t_fsck
    if timed git -C "$p/repo" init -q && timed git -C "$p/repo" -c gc.auto=0 add --all --force .; then
      t_add=$SECONDS_TAKEN
      if timed git -C "$p/repo" -c gc.auto=0 commit -q -m bench && t_commit=$SECONDS_TAKEN &&
         timed git -C "$p/repo" fsck --full --no-progress && t_fsck=$SECONDS_TAKEN; then
        record "$sys" git_add "$round" "$t_add"
        record "$sys" git_commit "$round" "$t_commit"
        record "$sys" git_fsck "$round" "$t_fsck"
        record "$sys" git "$round" "$(awk -v a="$t_add" -v b="$t_commit" -v c="$t_fsck" 'BEGIN { printf "%.4f", a + b + c }')"
      else
        note "$sys: git commit/fsck failed in round $round"
      fi
    else
      note "$sys: git add failed in round $round"
    fi
  else
    note "$sys: preparing the git tree failed in round $round"
  fi >> "$RAW/git.log" 2>&1
  rm -rf "$p/repo"

  sys_umount "$sys" "$mnt" || note "$sys: unmount failed in round $round"
  rm -rf "$dir"
}

run_filesystems() {
  local systems=("$@") n=$# round i
  for ((round = 1; round <= REPEAT; round++)); do
    # Rotate the order each round so no system always runs first or last.
    for ((i = 0; i < n; i++)); do
      run_system "${systems[(i + round - 1) % n]}" "$round"
    done
  done
}

run_kms() {
  local round out
  setup_kms_embedded
  start_kmsd
  for ((round = 1; round <= REPEAT; round++)); do
    log "[$round/$REPEAT] KMS: HSM raw AES-GCM, embedded core, kmsd"
    out=$("$KMS_BENCH" --mode hsm --home "$KMS_HOME_EMB" --threads "$BENCH_KMS_THREADS" \
      --seconds "$BENCH_KMS_SECONDS" 2>> "$RAW/kms.err") || note "kms_bench hsm failed (see kms.err)"
    sed "s/^{/{\"round\":$round,/" <<< "$out" | grep '^{' >> "$RAW/kms.jsonl"
    out=$("$KMS_BENCH" --mode service --kms embedded --home "$KMS_HOME_EMB" --key alias/bench \
      --threads "$BENCH_KMS_THREADS" --seconds "$BENCH_KMS_SECONDS" 2>> "$RAW/kms.err") \
      || note "kms_bench embedded failed (see kms.err)"
    sed "s/^{/{\"round\":$round,/" <<< "$out" | grep '^{' >> "$RAW/kms.jsonl"
    out=$("$KMS_BENCH" --mode service --kms "unix:$KMSD_SOCK" --home "$KMS_HOME_D" --key alias/bench \
      --threads "$BENCH_KMS_THREADS" --seconds "$BENCH_KMS_SECONDS" 2>> "$RAW/kms.err") \
      || note "kms_bench kmsd failed (see kms.err)"
    sed "s/^{/{\"round\":$round,/" <<< "$out" | grep '^{' >> "$RAW/kms.jsonl"
  done
}

run_openssl() {
  local round
  for ((round = 1; round <= REPEAT; round++)); do
    # Bytes per CPU-second of one core (openssl speed counts user time), at
    # kmsfs's 4 KiB block size and at 16 KiB.
    openssl speed -evp aes-256-gcm -bytes 4096 -seconds "$BENCH_KMS_SECONDS" -mr 2> /dev/null |
      awk -F: -v r="$round" '/^\+F:/ { printf "openssl\taes_gcm_4k\t%s\t%.1f\n", r, $NF / 1e6 }' >> "$RAW/results.tsv"
    openssl speed -evp aes-256-gcm -bytes 16384 -seconds "$BENCH_KMS_SECONDS" -mr 2> /dev/null |
      awk -F: -v r="$round" '/^\+F:/ { printf "openssl\taes_gcm_16k\t%s\t%.1f\n", r, $NF / 1e6 }' >> "$RAW/results.tsv"
  done
}

# ---------------------------------------------------------------- main

main() {
  need_root
  mkdir -p "$BENCH_WORK"
  WORK=$(mktemp -d "$BENCH_WORK/kmsfs-bench.XXXXXX")
  RAW=$WORK/raw
  mkdir -p "$RAW" "$WORK/mnt"
  : > "$RAW/results.tsv"
  : > "$RAW/kms.jsonl"
  : > "$RAW/notes.txt"
  local t_start=$EPOCHREALTIME
  log "profile $PROFILE, $REPEAT rounds, work dir $WORK"

  install_missing
  ensure_built
  prepare_inputs

  STORE=$WORK/store
  mkdir -p "$STORE"
  if [[ $BENCH_BACKING == tmpfs ]]; then
    # A private tmpfs, so that no other user of /tmp or /dev/shm shares it.
    local avail_mb
    avail_mb=$(awk '/^MemAvailable:/ { print int($2 / 1024 / 2) }' /proc/meminfo)
    mount -t tmpfs -o "size=${avail_mb}m,mode=0755" kmsfs-bench "$STORE" || die "cannot mount tmpfs on $STORE"
    MOUNTED+=("$STORE")
  elif [[ $BENCH_BACKING != disk ]]; then
    die "BENCH_BACKING must be tmpfs or disk"
  fi

  describe_machine
  local systems
  read -r -a systems <<< "$(usable_systems)"
  if [[ " ${systems[*]} " == *" cryfs "* && $BENCH_CRYFS_REMOUNT != 1 ]]; then
    note "cryfs is mounted once per round (each mount costs its scrypt); between steps only the kernel caches are dropped, its own caches stay warm"
  fi
  if [[ $BENCH_SKIP_FS != 1 && ${#systems[@]} -gt 0 ]]; then
    run_filesystems "${systems[@]}"
  fi
  if [[ $BENCH_SKIP_KMS != 1 ]]; then
    run_kms
  fi
  run_openssl
  echo "duration_s=$(awk -v a="$t_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')" >> "$RAW/machine.txt"
  echo "load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$RAW/machine.txt"

  mkdir -p "$BENCH_OUT"
  local raw_out=$BENCH_OUT/$BENCH_NAME-raw
  rm -rf "$raw_out"
  mkdir -p "$raw_out"
  cp "$RAW/results.tsv" "$RAW/kms.jsonl" "$RAW/machine.txt" "$RAW/notes.txt" "$raw_out/"
  "$BENCH_PYTHON" "$HERE/report.py" --raw "$raw_out" --md "$BENCH_OUT/$BENCH_NAME.md" --png "$BENCH_OUT/$BENCH_NAME.png" \
    || die "report.py failed"
  log "wrote $BENCH_OUT/$BENCH_NAME.md, $BENCH_OUT/$BENCH_NAME.png and $raw_out/"
}

main "$@"
