#!/usr/bin/env bash
# Create / stat / unlink of FILES empty files through a fuse.kerfs mount (`kerfsd dev`, 3
# metadata nodes, 3 chunk servers, R=2), for one or more builds taken in turn, ROUNDS times,
# each round next to the same loop on local disk and on a bindfs passthrough of it, printed
# as ratios (only same-run ratios mean something on these shared machines). The metadata
# rows of small_files.sh alone, quick enough to compare two builds by alternating them.
#
#   bench/meta_ops.sh                                   # release build, 2000 files, 2 rounds
#   FILES=2000 ROUNDS=2 bench/meta_ops.sh /var/tmp/kbin-before /var/tmp/kbin-after
#
# Needs root (mount).
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-2000}
ROUNDS=${ROUNDS:-2}
[ "$(id -u)" -eq 0 ] || { echo "run as root: the benchmark mounts" >&2; exit 1; }
if ! command -v bindfs >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs fuse3 >/dev/null
fi
. bench/mount_common.sh
builds=("$@")
if [ ${#builds[@]} -eq 0 ]; then
    kerfs_binaries
    builds=("$bin")
fi
printf "%-28s %5s %10s %10s %10s %14s\n" build round creates/s stats/s unlinks/s "kerfs/bindfs"
for round in $(seq 1 "$ROUNDS"); do
    for b in "${builds[@]}"; do
        bin=$(realpath "$b")
        start_mounts
        read -r bc bs bu < <(meta_ops "$dir/bindfs")
        read -r kc ks ku < <(meta_ops "$dir/kerfs")
        printf "%-28s %5s %10s %10s %10s %14s\n" "$b" "$round" "$kc" "$ks" "$ku" \
            "$(ratio "$kc" "$bc") $(ratio "$ks" "$bs") $(ratio "$ku" "$bu")"
        stop_mounts
        trap - EXIT
    done
done
