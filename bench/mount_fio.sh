#!/usr/bin/env bash
# The mount benchmark (issue 4): fio through a fuse.kerfs mount of a local `kerfsd dev` cluster
# (3 metadata nodes, 3 chunk servers, default layout R=2), next to the same jobs on a local-disk
# directory and on a bindfs FUSE passthrough of that directory, all in one run, printed as
# ratios (the machine is shared and noisy; only same-run ratios mean something).
#
#   bench/mount_fio.sh            # 2 GiB sequential files, 8 x 256 MiB writers, 10,000 files
#   SIZE_MB=256 WRITER_MB=32 FILES=1000 bench/mount_fio.sh   # a quick run
#
# Jobs: sequential write (1 MiB blocks, fsync at the end) and read (page cache dropped first) of
# SIZE_MB; 4 KiB random reads of that file for RAND_SECS; 8 concurrent writers of WRITER_MB each;
# create + stat + unlink of FILES empty files (python, one process, no fork per file).
# Needs root (mount, drop_caches). Installs fio and bindfs with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-2048}
WRITER_MB=${WRITER_MB:-256}
RAND_SECS=${RAND_SECS:-15}
FILES=${FILES:-10000}
[ "$(id -u)" -eq 0 ] || { echo "run as root: the benchmark mounts and drops caches" >&2; exit 1; }
if ! command -v fio >/dev/null || ! command -v bindfs >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio bindfs fuse3 >/dev/null
fi
. bench/mount_common.sh
kerfs_binaries
start_mounts

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# fio's bandwidth (MiB/s) or IOPS of one job group, from its JSON.
fio_run() { # target name field extra-args...
    local target=$1 name=$2 field=$3
    shift 3
    fio --output-format=json --name="$name" --directory="$target" --ioengine=psync \
        --group_reporting "$@" >"$dir/fio.json"
    python3 - "$dir/fio.json" "$field" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side, what = sys.argv[2].split(".")
print(f"{j[side]['bw'] / 1024:.1f}" if what == "bw" else f"{j[side]['iops']:.0f}")
EOF
}

declare -A R
for t in local bindfs kerfs; do
    target="$dir/$t"
    echo "== $t" >&2
    R[$t.seqw]=$(fio_run "$target" seq write.bw --rw=write --bs=1M --size="${SIZE_MB}M" --end_fsync=1)
    drop
    R[$t.seqr]=$(fio_run "$target" seq read.bw --rw=read --bs=1M --size="${SIZE_MB}M")
    drop
    R[$t.randr]=$(fio_run "$target" seq read.iops --rw=randread --bs=4k --size="${SIZE_MB}M" \
        --time_based --runtime="$RAND_SECS")
    rm -f "$target"/seq.*
    R[$t.par]=$(fio_run "$target" par write.bw --rw=write --bs=1M --size="${WRITER_MB}M" \
        --numjobs=8 --end_fsync=1)
    rm -f "$target"/par.*
    read -r c s u <<<"$(meta_ops "$target")"
    R[$t.create]=$c R[$t.stat]=$s R[$t.unlink]=$u
done

echo
echo "mount benchmark: ${SIZE_MB} MiB sequential, 8 x ${WRITER_MB} MiB writers, ${FILES} files; kerfs = kerfsd dev, R=2, 3 chunk servers"
print_ratios 32 "seqw:sequential write MiB/s" "seqr:sequential read MiB/s" \
    "randr:4 KiB random read IOPS" "par:8 writers MiB/s (total)" "create:creates/s" \
    "stat:stats/s" "unlink:unlinks/s"
