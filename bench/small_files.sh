#!/usr/bin/env bash
# Small files and metadata through the mount (issue 13): `tar -x` of /usr/include, `cp -a` of
# /usr/share/doc, and create / stat / unlink of FILES empty files, on a fuse.kerfs mount of a
# local `kerfsd dev` cluster (3 metadata nodes, 3 chunk servers, R=2), next to the same work on
# a local-disk directory and on a bindfs FUSE passthrough of it, in one run, printed as ratios
# (the machine is shared and noisy; only same-run ratios mean something).
#
#   bench/small_files.sh                      # release build, 10,000 files
#   KERFS_BIN=target/debug FILES=2000 bench/small_files.sh
#
# Every tree copy is followed by `sync` inside the timing (the local disk would otherwise only
# have it in its page cache), and checked with `diff -r` afterwards. Needs root (mount).
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-10000}
[ "$(id -u)" -eq 0 ] || { echo "run as root: the benchmark mounts" >&2; exit 1; }
if ! command -v bindfs >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs fuse3 >/dev/null
fi
. bench/mount_common.sh
kerfs_binaries
start_mounts

# Seconds (2 decimals) that a command took, the sync after it included.
timed() {
    python3 - "$@" <<'EOF'
import subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
subprocess.run(["sync"], check=True)
print(f"{time.perf_counter() - t:.2f}")
EOF
}

tar -C /usr -cf "$dir/include.tar" include
entries=$(tar -tf "$dir/include.tar" | wc -l)
docs=$(find /usr/share/doc | wc -l)
declare -A R
for t in local bindfs kerfs; do
    target="$dir/$t"
    echo "== $t" >&2
    mkdir "$target/tar" "$target/cp"
    R[$t.tar]=$(timed tar -C "$target/tar" -xf "$dir/include.tar")
    diff -r --no-dereference /usr/include "$target/tar/include"
    R[$t.cp]=$(timed cp -a /usr/share/doc "$target/cp/")
    diff -r --no-dereference /usr/share/doc "$target/cp/doc"
    rm -rf "$target/tar" "$target/cp"
    read -r c s u <<<"$(meta_ops "$target")"
    R[$t.create]=$c R[$t.stat]=$s R[$t.unlink]=$u
done

echo
echo "small files: tar -x of /usr/include ($entries entries), cp -a of /usr/share/doc ($docs entries), $FILES empty files; kerfs = kerfsd dev, R=2, 3 chunk servers"
print_ratios 30 "tar:tar -x, s" "cp:cp -a, s" "create:creates/s" "stat:stats/s" "unlink:unlinks/s"
