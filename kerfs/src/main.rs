//! `kerfs META_ADDRS MOUNTPOINT [-o OPTS] [-f]`: mounts a KerFS cluster (what
//! `mount -t fuse.kerfs` runs through mount.fuse3). See the library's header for installing.

use clap::Parser;

fn main() {
    let args = kerfs::options::Args::parse();
    std::process::exit(kerfs::daemon::main(args));
}
