#!/usr/bin/env bash
# POSIX conformance of the mount: starts `kerfsd dev` on private ports, mounts it with the
# `kerfs` binary, runs pjdfstest (as root) on the mount and prints the pass/fail/skip counts.
#
#   tests/pjdfstest/run.sh [TARGET_DIR] [pjdfstest patterns...]
#
# TARGET_DIR holds the built kerfsd and kerfs (default target/debug; build them with
# `cargo build -p kerfs -p kerfs-cli --bins`). Installs pjdfstest with `cargo install` if it
# is not on PATH. Exits non-zero if a test fails that is not listed in known-failures.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${1:-$repo/target/debug}"
shift || true

[ "$(id -u)" -eq 0 ] || { echo "run.sh: pjdfstest must run as root (it switches users)" >&2; exit 2; }
[ -e /dev/fuse ] || { echo "run.sh: /dev/fuse is missing" >&2; exit 2; }
for b in kerfsd kerfs; do
  [ -x "$target/$b" ] || { echo "run.sh: $target/$b is not built" >&2; exit 2; }
done
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"

work="$(mktemp -d /tmp/kerfs-pjdfstest.XXXXXX)"
mnt="$work/mnt"
mkdir -p "$mnt"
# mktemp makes it 0700: the dummy users pjdfstest switches to must reach the mount.
chmod 755 "$work"
base="${KERFS_PJDFSTEST_PORT:-$((20000 + RANDOM % 20000))}"
addrs="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"

cleanup() {
  set +e
  if findmnt --mountpoint "$mnt" >/dev/null 2>&1; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt"
  fi
  [ -n "${dev_pid:-}" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$target/kerfsd" dev --dir "$work/cluster" --base-port "$base" --key-file "$work/cluster.key" \
  >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 100); do
  grep -q "dev cluster up" "$work/dev.log" && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.log"; exit 1; }
  sleep 0.2
done
grep -q "dev cluster up" "$work/dev.log" || { echo "run.sh: the dev cluster did not come up" >&2; cat "$work/dev.log"; exit 1; }

"$target/kerfs" "$addrs" "$mnt" -o "allow_other,key_file=$work/cluster.key,log=$work/kerfs.log"
[ "$(findmnt -n -o FSTYPE --mountpoint "$mnt")" = fuse.kerfs ]

# pjdfstest creates its files in the current directory of the path it is given.
out="$work/pjdfstest.out"
set +e
(cd "$mnt" && pjdfstest -c "$here/kerfs.toml" -p "$mnt" "$@") >"$out" 2>&1
status=$?
set -e
cp "$out" "${KERFS_PJDFSTEST_OUT:-/tmp/kerfs-pjdfstest.out}"

pass=$(grep -cE '[[:space:]]ok$' "$out" || true)
fail=$(grep -cE '[[:space:]]FAILED$' "$out" || true)
skip=$(grep -cE '[[:space:]]skipped$' "$out" || true)
echo "pjdfstest on fuse.kerfs: $pass passed, $fail failed, $skip skipped (exit $status; full output in ${KERFS_PJDFSTEST_OUT:-/tmp/kerfs-pjdfstest.out})"

# Every failure must be a known one.
unknown=0
while read -r name; do
  [ -z "$name" ] && continue
  if ! grep -qF "\`$name\`" "$here/known-failures.md"; then
    echo "unexpected failure: $name"
    unknown=1
  fi
done < <(grep -E '[[:space:]]FAILED$' "$out" | awk '{print $1}')
exit "$unknown"
