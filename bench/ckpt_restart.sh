#!/usr/bin/env bash
# Restart from the checkpoint store against restart from a local file of the same image, in one
# run: a process with MiB of heap whose pages are all distinct, and one whose pages all have the
# same content (the store keeps one page for the whole heap). Each process is checkpointed once
# to a local file (`krg checkpoint --to FILE --leave-running`) and once into KerFS (R=2, 64 MiB
# chunks, `kerfsd dev` with 3 chunk servers); then, ROUNDS times, each krg binary restarts each
# image from the file and from KerFS in turn (page cache warm for both), and the restored
# memory is checked (the program compares every page with its pattern).
# Prints every wall time and the KerFS/file ratio per binary and image, the CPU time of each
# restart (krg's, plus the cluster's for a restart from KerFS: on a machine shared with other
# work it varies less than the wall time), and, as the floor of a
# restart from KerFS, the time `kerfsctl get` takes to read the distinct image's pack (the
# same page bytes, through the same client library); the range over the rounds last.
# Needs root and gcc.
# Usage: bench/ckpt_restart.sh [MiB] [ROUNDS]
#   KERFS_BIN=dir with kerfsd, kerfsctl, krg (default: a release build of this tree)
#   KRG_OLD=path of another krg to alternate with (e.g. a build of main), optional
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-128}
ROUNDS=${2:-3}
if [ -z "${KERFS_BIN:-}" ]; then
    cargo build --release -p kerfs-cli --bins
    KERFS_BIN=$PWD/target/release
fi
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/ckpt-restart.XXXXXX")
base=$((20000 + RANDOM % 20000))
export KERFS_META="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
export KERFS_KEY_FILE="$DIR/cluster.key"
# Only processes this script started are ever killed: the restored heaps are found by their
# executable, which is this run's own copy.
kill_heaps() {
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$DIR/heap" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    # Wait until they are gone: the next restore takes the same PID in a new namespace, and
    # the next timing must not include their teardown.
    for _ in $(seq 1 100); do
        local left=0
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/exe" 2>/dev/null)" = "$DIR/heap" ] && left=1
        done
        [ "$left" = 0 ] && return 0
        sleep 0.05
    done
}
cleanup() {
    kill_heaps
    kill -TERM "${DEV:-}" 2>/dev/null || true
    wait "${DEV:-}" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
now() { date +%s.%N; }
ctl() { "$KERFS_BIN/kerfsctl" --meta "$KERFS_META" --key-file "$KERFS_KEY_FILE" "$@"; }

"$KERFS_BIN/kerfsd" dev --dir "$DIR/cluster" --base-port "$base" --key-file "$KERFS_KEY_FILE" \
    --chunk-servers 3 >"$DIR/dev.log" 2>&1 &
DEV=$!
for _ in $(seq 1 300); do ctl nodes 2>/dev/null | grep -c ' up' | grep -q 3 && break; sleep 0.2; done
ctl mkdir /r2 && ctl layout /r2 --replicas 2 >/dev/null
gcc -O2 -o "$DIR/heap" tests/c/ckpt_heap.c

KRGS=("$KERFS_BIN/krg")
NAMES=(new)
if [ -n "${KRG_OLD:-}" ]; then
    KRGS=("$KRG_OLD" "$KERFS_BIN/krg")
    NAMES=(old new)
fi
MODES=(distinct same)

# Checkpoints: the same process to the file, then into the store.
for m in "${MODES[@]}"; do
    log="$DIR/log.$m"
    "$KERFS_BIN/krg" run -- "$DIR/heap" "$MB" "$log" 1 "$m" 2>"$DIR/run.$m" >/dev/null &
    for _ in $(seq 1 600); do grep -q '^3$' "$log" 2>/dev/null && break; sleep 0.1; done
    pid=$(sed -n 's/.* as pid \([0-9]*\) .*/\1/p' "$DIR/run.$m")
    "$KERFS_BIN/krg" checkpoint "$pid" --to "$DIR/img.$m" --leave-running 2>>"$DIR/krg.log"
    "$KERFS_BIN/krg" checkpoint "$pid" --to "kerfs:/r2/$m" --kill 2>>"$DIR/krg.log"
    kill_heaps
    printf '%-8s image %s MiB; store: %s\n' "$m" "$(($(stat -c %s "$DIR/img.$m") >> 20))" \
        "$("$KERFS_BIN/krg" ls "kerfs:/r2/$m" | tail -1)"
done

# CPU seconds (user + system) used so far by kerfsd dev and its meta and chunk servers.
cluster_cpu() {
    local ticks=0 p
    for p in "$DEV" $(pgrep -P "$DEV"); do
        # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
        ticks=$((ticks + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$ticks / $(getconf CLK_TCK)" | bc -l
}

# One timed restart of $2 with krg $1; the restored memory is checked afterwards (not timed).
# Prints the wall time and the CPU time of krg plus the cluster's during the restart.
restart() {
    local krg=$1 src=$2 m=$3 log="$DIR/log.$3" t0 t1 c0 c1
    kill_heaps
    : >"$log"
    cat "$DIR/img.$m" >/dev/null
    c0=$(cluster_cpu)
    t0=$(now)
    /usr/bin/time -f '%U %S' -o "$DIR/cpu" "$krg" restart "$src" --detach 2>>"$DIR/krg.log" >/dev/null
    t1=$(now)
    c1=$(cluster_cpu)
    for _ in $(seq 1 600); do grep -q '^[0-9]' "$log" 2>/dev/null && break; sleep 0.05; done
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$DIR/heap" ] && kill -USR2 "${p#/proc/}"
    done
    for _ in $(seq 1 600); do grep -q '^CHECK' "$log" 2>/dev/null && break; sleep 0.05; done
    if ! grep -q '^CHECK OK' "$log"; then
        echo "restart of $src with $krg: memory check failed: $(grep CHECK "$log" || echo none)" >&2
        exit 1
    fi
    echo "$t1 - $t0" | bc -l
    echo "$(awk '{print $1 + $2}' "$DIR/cpu") + $c1 - $c0" | bc -l
}

PACK=$(ctl ls /r2/distinct/packs | awk '/\.pack$/ {print $NF}')

declare -A R
printf '%-5s %-4s %-8s %9s %9s %7s %11s %12s %9s\n' round krg image "file s" "kerfs s" ratio \
    "file cpu s" "kerfs cpu s" "cpu ratio"
for r in $(seq 1 "$ROUNDS"); do
    t0=$(now)
    ctl get "/r2/distinct/packs/$PACK" /dev/null
    t1=$(now)
    get=$(echo "$t1 - $t0" | bc -l)
    R[get]="${R[get]:-} $get"
    printf '%-5s kerfsctl get of the distinct pack (%s MiB): %.3f s\n' "$r" "$MB" "$get"
    for i in "${!KRGS[@]}"; do
        for m in "${MODES[@]}"; do
            # Plain substitutions, so that a failed restart (or memory check) stops the run.
            out=$(restart "${KRGS[$i]}" "$DIR/img.$m" "$m")
            read -r f fc <<<"$(echo $out)"
            out=$(restart "${KRGS[$i]}" "kerfs:/r2/$m" "$m")
            read -r k kc <<<"$(echo $out)"
            ratio=$(echo "$k / $f" | bc -l)
            cratio=$(echo "$kc / $fc" | bc -l)
            key="${NAMES[$i]}.$m"
            R[$key]="${R[$key]:-} $ratio"
            R[$key.f]="${R[$key.f]:-} $f"
            R[$key.k]="${R[$key.k]:-} $k"
            R[$key.c]="${R[$key.c]:-} $cratio"
            printf '%-5s %-4s %-8s %9.3f %9.3f %7.2f %11.3f %12.3f %9.2f\n' "$r" "${NAMES[$i]}" "$m" \
                "$f" "$k" "$ratio" "$fc" "$kc" "$cratio"
        done
    done
done
range() { tr ' ' '\n' | grep . | sort -g | sed -n '1p;$p' | xargs printf '%.2f-%.2f'; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "ranges over $ROUNDS rounds ($MB MiB):"
printf '  kerfsctl get of the distinct pack %s s\n' "$(echo "${R[get]}" | range)"
for n in "${NAMES[@]}"; do
    for m in "${MODES[@]}"; do
        printf '  %-4s %-8s file %s s, kerfs %s s, kerfs/file %s (median %s), CPU kerfs/file %s\n' \
            "$n" "$m" "$(echo "${R[$n.$m.f]}" | range)" "$(echo "${R[$n.$m.k]}" | range)" \
            "$(echo "${R[$n.$m]}" | range)" "$(echo "${R[$n.$m]}" | median)" \
            "$(echo "${R[$n.$m.c]}" | range)"
    done
done
