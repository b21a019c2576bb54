# Sourced by the mount benchmarks (mount_fio.sh, small_files.sh): the binaries, a `kerfsd dev`
# cluster mounted at $dir/kerfs, a bindfs passthrough of $dir/local at $dir/bindfs, the
# create/stat/unlink loop, and the table of same-run ratios. Needs root (mount).

# Sets $bin: $KERFS_BIN if given, else a release build.
kerfs_binaries() {
    if [ -n "${KERFS_BIN:-}" ]; then
        bin=$(realpath "$KERFS_BIN")
    else
        cargo build --release -p kerfs-cli -p kerfs --bins
        bin=$PWD/target/release
    fi
}

# Sets $dir (on the disk, not a tmpfs) with local/, bindfs/ and kerfs/ mounted; everything is
# unmounted, stopped and removed when the script exits.
start_mounts() {
    dir=$(mktemp -d /var/tmp/kerfs-bench.XXXXXX)
    local base=$((20000 + RANDOM % 10000))
    mkdir -p "$dir/local" "$dir/bindfs" "$dir/kerfs"
    "$bin/kerfsd" dev --dir "$dir/cluster" --base-port "$base" --key-file "$dir/cluster.key" \
        --mount "$dir/kerfs" >"$dir/dev.log" 2>&1 &
    dev=$!
    trap stop_mounts EXIT
    for _ in $(seq 1 300); do findmnt --mountpoint "$dir/kerfs" >/dev/null 2>&1 && break; sleep 0.2; done
    findmnt --mountpoint "$dir/kerfs" >/dev/null || { cat "$dir/dev.log"; exit 1; }
    bindfs "$dir/local" "$dir/bindfs"
}

stop_mounts() {
    fusermount3 -u "$dir/bindfs" 2>/dev/null || true
    kill -TERM "$dev" 2>/dev/null || true
    wait "$dev" 2>/dev/null || true
    rm -rf "$dir"
}

meta_ops() { # target -> "creates/s stats/s unlinks/s" of $FILES empty files
    python3 - "$1" "$FILES" <<'PY'
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
PY
}

ratio() { python3 -c "print(f'{$1 / $2:.2f}' if $2 else '-')"; }

# Prints the table of R[local|bindfs|kerfs.KEY] for rows "KEY:label", with kerfs's ratios.
print_ratios() { # width rows...
    local w=$1 row k label
    shift
    printf "%-${w}s %10s %10s %10s %12s %12s\n" job local bindfs kerfs kerfs/local kerfs/bindfs
    for row in "$@"; do
        k=${row%%:*} label=${row#*:}
        printf "%-${w}s %10s %10s %10s %12s %12s\n" "$label" "${R[local.$k]}" "${R[bindfs.$k]}" \
            "${R[kerfs.$k]}" "$(ratio "${R[kerfs.$k]}" "${R[local.$k]}")" \
            "$(ratio "${R[kerfs.$k]}" "${R[bindfs.$k]}")"
    done
}
