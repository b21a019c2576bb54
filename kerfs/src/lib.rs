//! KerFS mount client: the `kerfs` program that mount(8) runs for `mount -t fuse.kerfs`.
//!
//! Layout (after awslabs/mountpoint-s3): [`fs`] is the filesystem logic in plain async Rust
//! over the cluster client, testable without a kernel; [`fuse`] is the thin glue that turns
//! kernel requests into calls on [`fs::KerFs`] and replies from tokio tasks; [`options`]
//! parses the command line and the fstab/mount.fuse3 option list; [`daemon`] mounts and then
//! detaches from the terminal. Every failure is a [`error::FsError`] carrying an errno.
//!
//! Installing: `mount -t fuse.kerfs ADDRS DIR` runs `/sbin/mount.fuse3`, which runs `kerfs`
//! from `$PATH` (`/bin/sh -c "kerfs ADDRS DIR -o OPTS"`); `scripts/install` puts it in
//! /usr/local/bin, and the README shows the fstab line.

pub mod daemon;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod options;
