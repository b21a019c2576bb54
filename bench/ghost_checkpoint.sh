#!/usr/bin/env bash
# Ghost checkpoint/restart of a process with 1 GiB of touched memory, next to gcore of the
# same process and dd of 1 GiB to the same disk, in one run. Needs root, gcc, gdb (gcore).
# Usage: bench/ghost_checkpoint.sh [MiB]   (KRG=path/to/krg to choose the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-1024}
KRG=${KRG:-target/release/krg}
[ -x "$KRG" ] || cargo build --release -p kerfs-cli --bin krg
DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/ghost-bench.XXXXXX")
trap 'kill -9 $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
gcc -O2 -o "$DIR/touch" bench/ghost_touch.c
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }

# Started under `krg run` (as a user would), which also keeps stray inherited fds away from it.
"$KRG" run -- "$DIR/touch" "$MB" "$DIR/ready" 2>"$DIR/run.log" &
while ! grep -q ready "$DIR/ready" 2>/dev/null; do sleep 0.1; done
PID=$(sed -n 's/.* as pid \([0-9]*\) .*/\1/p' "$DIR/run.log")

# Every timed write starts with no dirty data of an earlier step left to write back.
sync
t0=$(now); "$KRG" checkpoint "$PID" --to "$DIR/img" --leave-running 2>/dev/null; t1=$(now)
ckpt=$(secs "$t0" "$t1")
sync
t0=$(now); gcore -o "$DIR/core" "$PID" >/dev/null 2>&1; t1=$(now); sync "$DIR"/core*; t2=$(now)
gc=$(secs "$t0" "$t1"); gcs=$(secs "$t0" "$t2")
rm -f "$DIR"/core*; sync
t0=$(now); dd if=/dev/zero of="$DIR/dd" bs=1M count="$MB" conv=fsync status=none; t1=$(now)
ddw=$(secs "$t0" "$t1")
rm -f "$DIR/dd"; sync
# The same bytes as the image (read from the page cache): zeros may be cheaper for the
# virtual disk to store than memory contents.
t0=$(now); dd if="$DIR/img" of="$DIR/dd" bs=1M conv=fsync status=none; t1=$(now)
ddi=$(secs "$t0" "$t1")
rm -f "$DIR/dd"; sync
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
t0=$(now); dd if="$DIR/img" of=/dev/null bs=1M status=none; t1=$(now)
ddr=$(secs "$t0" "$t1")
t0=$(now); dd if="$DIR/img" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
ddrc=$(secs "$t0" "$t1")
t0=$(now); "$KRG" restart "$DIR/img" --detach 2>"$DIR/restart.log" || { cat "$DIR/restart.log"; exit 1; }; t1=$(now)
rst=$(secs "$t0" "$t1")
PID=$(sed -n 's/.* as pid \([0-9]*\) .*/\1/p' "$DIR/restart.log")
grep -q . /proc/"$PID"/stat  # the restored process is alive
size=$(stat -c %s "$DIR/img")

printf 'memory touched      %6d MiB, image %d MiB\n' "$MB" $((size >> 20))
printf 'krg checkpoint      %6.3f s  (fsynced)\n' "$ckpt"
printf 'gcore               %6.3f s  -> checkpoint/gcore   = %.2f  (gcore does not fsync)\n' "$gc" "$(echo "$ckpt / $gc" | bc -l)"
printf 'gcore + fsync       %6.3f s  -> checkpoint/(gcore+fsync) = %.2f\n' "$gcs" "$(echo "$ckpt / $gcs" | bc -l)"
printf 'dd write %4d MiB   %6.3f s  -> checkpoint/dd      = %.2f  (zeros, conv=fsync)\n' "$MB" "$ddw" "$(echo "$ckpt / $ddw" | bc -l)"
printf 'dd copy of image    %6.3f s  -> checkpoint/dd copy = %.2f  (image bytes from cache, conv=fsync)\n' "$ddi" "$(echo "$ckpt / $ddi" | bc -l)"
printf 'dd read image       %6.3f s  (page cache)\n' "$ddr"
printf 'dd read image       %6.3f s  (O_DIRECT, from disk)\n' "$ddrc"
printf 'krg restart         %6.3f s  (image in page cache) -> /cached read = %.2f, /disk read = %.2f\n' "$rst" "$(echo "$rst / $ddr" | bc -l)" "$(echo "$rst / $ddrc" | bc -l)"
