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
if [ -n "${KERFS_BIN:-}" ]; then
    bin=$(realpath "$KERFS_BIN")
else
    cargo build --release -p kerfs-cli -p kerfs --bins
    bin=$PWD/target/release
fi
dir=$(mktemp -d /var/tmp/kerfs-bench.XXXXXX) # on the disk, not a tmpfs
base=$((20000 + RANDOM % 10000))
mkdir -p "$dir/local" "$dir/bindfs" "$dir/kerfs"
"$bin/kerfsd" dev --dir "$dir/cluster" --base-port "$base" --key-file "$dir/cluster.key" \
    --mount "$dir/kerfs" >"$dir/dev.log" 2>&1 &
dev=$!
cleanup() {
    fusermount3 -u "$dir/bindfs" 2>/dev/null || true
    kill -TERM $dev 2>/dev/null || true
    wait $dev 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 300); do findmnt --mountpoint "$dir/kerfs" >/dev/null 2>&1 && break; sleep 0.2; done
findmnt --mountpoint "$dir/kerfs" >/dev/null || { cat "$dir/dev.log"; exit 1; }
bindfs "$dir/local" "$dir/bindfs"

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
meta_ops() { # target -> "creates/s stats/s unlinks/s"
    python3 - "$1" "$FILES" <<'EOF'
import os, sys, time
d, n = os.path.join(sys.argv[1], "files"), int(sys.argv[2])
os.mkdir(d)
names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
out = []
for op in (lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), os.stat, os.unlink):
    t = time.perf_counter()
    for p in names:
        op(p)
    out.append(f"{n / (time.perf_counter() - t):.0f}")
os.rmdir(d)
print(" ".join(out))
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

ratio() { python3 -c "print(f'{$1 / $2:.2f}' if $2 else '-')"; }
echo
echo "small files: tar -x of /usr/include ($entries entries), cp -a of /usr/share/doc ($docs entries), $FILES empty files; kerfs = kerfsd dev, R=2, 3 chunk servers"
printf '%-30s %10s %10s %10s %12s %12s\n' job local bindfs kerfs kerfs/local kerfs/bindfs
for row in "tar:tar -x, s" "cp:cp -a, s" "create:creates/s" "stat:stats/s" "unlink:unlinks/s"; do
    k=${row%%:*} label=${row#*:}
    printf '%-30s %10s %10s %10s %12s %12s\n' "$label" "${R[local.$k]}" "${R[bindfs.$k]}" \
        "${R[kerfs.$k]}" "$(ratio "${R[kerfs.$k]}" "${R[local.$k]}")" \
        "$(ratio "${R[kerfs.$k]}" "${R[bindfs.$k]}")"
done
