//! Installing for real, as an operator would on a fresh machine: `scripts/install` into a
//! scratch prefix (binaries, systemd units, example configs), then the cluster mounted with
//! `mount -t fuse.kerfs` and with an fstab line (`mount -T FSTAB DIR`, so the machine's own
//! /etc/fstab is not touched), both going through mount(8) and mount.fuse3 to the installed
//! `kerfs` found on mount's standard PATH (in a private mount namespace where the scratch
//! prefix is bind-mounted on /usr/local/bin).
//!
//! Needs root, /dev/fuse and fuse3; fails (does not skip) without them.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use kerfs_tests::{
    bin_path, fstype, init_tracing, require_root_and_fuse, KerfsCluster, KerfsClusterOptions,
};
use tracing::info;

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn install_then_mount_by_type_and_by_fstab() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let built = bin_path("kerfs")?;
    let built_dir = built.parent().context("binary without a directory")?;
    let root = tempfile::tempdir()?;
    let (prefix, etc, units) = (
        root.path().join("usr"),
        root.path().join("etc/kerfs"),
        root.path().join("systemd"),
    );
    let install = || {
        run(
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install"))
                .arg("--prefix")
                .arg(&prefix)
                .arg("--etc")
                .arg(&etc)
                .arg("--systemd-dir")
                .arg(&units)
                .arg("--from")
                .arg(built_dir),
            "scripts/install",
        )
    };
    let out = install()?;
    info!("scripts/install said:\n{out}");
    let bin = prefix.join("bin");
    for b in ["kerfsd", "kerfs", "kerfsctl", "krg"] {
        let version = run(Command::new(bin.join(b)).arg("--version"), b)?;
        ensure!(version.contains("0."), "{b} --version: {version}");
    }
    for (unit, config) in [
        ("kerfs-meta@.service", "meta-%i.toml"),
        ("kerfs-chunk@.service", "chunk-%i.toml"),
    ] {
        let text = std::fs::read_to_string(units.join(unit))?;
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .with_context(|| format!("{unit} has no ExecStart"))?;
        let want = format!("{}/kerfsd ", bin.display());
        ensure!(
            exec.starts_with(&want) && exec.ends_with(&format!("{}/{config}", etc.display())),
            "{unit}: ExecStart={exec}"
        );
        ensure!(
            !text.contains("@BIN@") && !text.contains("@ETC@"),
            "{unit} kept a placeholder"
        );
    }
    for example in [
        "meta.toml.example",
        "chunk.toml.example",
        "kerfs.toml.example",
    ] {
        ensure!(etc.join(example).is_file(), "{example} not installed");
    }
    // Installing again keeps what the operator edited.
    std::fs::write(etc.join("kerfs.toml.example"), "meta = \"edited\"\n")?;
    install()?;
    ensure!(
        std::fs::read_to_string(etc.join("kerfs.toml.example"))? == "meta = \"edited\"\n",
        "a second install overwrote a config"
    );

    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let addrs = cluster.meta.addrs().join(",");
    let key = cluster.meta.key_file.display().to_string();
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let fstab = root.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# KerFS\n{addrs} {} fuse.kerfs _netdev,allow_other,key_file={key} 0 0\n",
            mnt.display()
        ),
    )?;
    // mount(8) runs its helpers with the standard PATH (/usr/local/sbin:/usr/local/bin:
    // /usr/sbin:...), whatever the caller's: the programs must be in /usr/local/bin, where
    // scripts/install puts them by default. The test puts its scratch prefix there in a
    // private mount namespace (a bind mount), so this machine's /usr/local/bin is left alone
    // and mount(8), mount.fuse3 and `sh -c kerfs ...` run exactly as on a fresh install.
    let script = format!(
        r#"
        mount --bind {bin} /usr/local/bin
        mount -t fuse.kerfs {addrs} {mnt} -o allow_other,key_file={key}
        [ "$(findmnt -n -o FSTYPE --mountpoint {mnt})" = fuse.kerfs ]
        served_by=$(for p in /proc/[0-9]*; do
            if tr '\0' ' ' <$p/cmdline 2>/dev/null | grep -q "^kerfs .* {mnt} "; then
                readlink $p/exe; fi; done)
        echo "served by $served_by"
        [ "$served_by" = /usr/local/bin/kerfs ]
        echo installed >{mnt}/hello
        umount {mnt}
        ! findmnt --mountpoint {mnt} >/dev/null
        mount -T {fstab} {mnt}
        [ "$(findmnt -n -o FSTYPE --mountpoint {mnt})" = fuse.kerfs ]
        [ "$(cat {mnt}/hello)" = installed ]
        umount {mnt}
        echo mounted both ways
        "#,
        bin = bin.display(),
        mnt = mnt.display(),
        fstab = fstab.display(),
    );
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "/bin/sh", "-exc"])
                .arg(&script),
            "mounting through mount(8) in a private mount namespace",
        )
    })
    .await
    .context("mount thread")??;
    info!("{out}");
    ensure!(out.contains("mounted both ways"), "{out}");
    ensure!(
        fstype(&mnt).is_none(),
        "the test's mount leaked out of its namespace"
    );
    Ok(())
}
