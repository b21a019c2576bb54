#!/usr/bin/env bash
# The checkpoint store: full and incremental (5% of the heap changed) checkpoint of a process
# with MiB of memory into KerFS (R=2 and EC 4+2) and restart from it, next to writing the same
# amount through the client library (`kerfsctl put`, the "dd into the cluster") and the
# local-file ghost checkpoint, in one run. Needs root and gcc.
# Usage: bench/ckpt_store.sh [MiB]   (KERFS_BIN=dir with kerfsd, kerfsctl, krg to choose binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-1024}
if [ -z "${KERFS_BIN:-}" ]; then
    cargo build --release -p kerfs-cli --bins
    KERFS_BIN=$PWD/target/release
fi
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/ckpt-bench.XXXXXX")
base=$((20000 + RANDOM % 20000))
export KERFS_META="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
export KERFS_KEY_FILE="$DIR/cluster.key"
PIDS=()
cleanup() {
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$DIR/heap" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    kill -TERM "${DEV:-}" 2>/dev/null || true
    wait "${DEV:-}" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
ctl() { "$KERFS_BIN/kerfsctl" --meta "$KERFS_META" --key-file "$KERFS_KEY_FILE" "$@"; }
krg() { "$KERFS_BIN/krg" "$@"; }

# 6 chunk servers: EC 4+2 needs six.
"$KERFS_BIN/kerfsd" dev --dir "$DIR/cluster" --base-port "$base" --key-file "$KERFS_KEY_FILE" \
    --chunk-servers 6 >"$DIR/dev.log" 2>&1 &
DEV=$!
for _ in $(seq 1 300); do ctl nodes 2>/dev/null | grep -c ' up' | grep -q 6 && break; sleep 0.2; done
ctl mkdir /r2 && ctl layout /r2 --replicas 2 >/dev/null
ctl mkdir /ec && ctl layout /ec --ec 4+2 >/dev/null
gcc -O2 -o "$DIR/heap" tests/c/ckpt_heap.c
head -c "$((MB << 20))" /dev/urandom >"$DIR/random"

start_app() {  # $1 = seed; sets PID and LOG
    LOG="$DIR/log.$1"
    krg run -- "$DIR/heap" "$MB" "$LOG" "$1" 2>"$DIR/run.$1" >/dev/null &
    for _ in $(seq 1 600); do grep -q '^3$' "$LOG" 2>/dev/null && break; sleep 0.1; done
    PID=$(sed -n 's/.* as pid \([0-9]*\) .*/\1/p' "$DIR/run.$1")
}
mutate() {  # 5% of the heap rewritten
    n=$(grep -c '^MUT' "$LOG" || true)
    kill -USR1 "$PID"
    for _ in $(seq 1 600); do [ "$(grep -c '^MUT' "$LOG" || true)" -gt "$n" ] && break; sleep 0.05; done
}
timed() { local t0 t1; t0=$(now); "$@" 2>>"$DIR/krg.log" >/dev/null; t1=$(now); secs "$t0" "$t1"; }

declare -A R
for L in r2 ec; do
    R[$L.put]=$(timed ctl put "$DIR/random" "/$L/dd")
    ctl rm "/$L/dd"
    if [ "$L" = r2 ]; then start_app 1; else start_app 2; fi
    R[$L.full]=$(timed krg checkpoint "$PID" --to "kerfs:/$L/app")
    mutate
    R[$L.incr]=$(timed krg checkpoint "$PID" --to "kerfs:/$L/app")
    kill -9 "$PID"
    R[$L.restart]=$(timed krg restart "kerfs:/$L/app" --detach)
    sleep 0.5
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$DIR/heap" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    R[$L.ls]=$(krg ls "kerfs:/$L/app" | tail -1)
done
start_app 3
R[local]=$(timed krg checkpoint "$PID" --to "$DIR/img")
kill -9 "$PID"

printf 'process memory %d MiB; local-file ghost checkpoint (fsynced): %.2f s\n' "$MB" "${R[local]}"
for L in r2 ec; do
    printf '%-3s put %d MiB via client %6.2f s | full checkpoint %6.2f s (%.2fx put) | incremental %6.2f s (%.0f%% of full) | restart %6.2f s\n' \
        "$L" "$MB" "${R[$L.put]}" "${R[$L.full]}" "$(echo "${R[$L.full]} / ${R[$L.put]}" | bc -l)" \
        "${R[$L.incr]}" "$(echo "100 * ${R[$L.incr]} / ${R[$L.full]}" | bc -l)" "${R[$L.restart]}"
    printf '    %s\n' "${R[$L.ls]}"
done
