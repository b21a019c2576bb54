//! Workloads through a real mount (issue 4's tests): real `kerfsd` processes, the built `kerfs`
//! binary, a real FUSE mount, and the calls and programs people run on it.
//!
//! - `two_mounts_close_to_open`: two `kerfs` processes on one cluster; what one writes, renames
//!   and unlinks, the other sees.
//! - `page_cache_is_kept_across_opens_of_an_unchanged_file`: FOPEN_KEEP_CACHE when the
//!   data version is the one of the previous open, not after another mount's change.
//! - `attribute_changes_of_an_open_file_travel_with_its_close`: tar's futimens, fchown and
//!   fchmod before close cost no command of their own and reach the other mount with the data.
//! - `programs_on_the_mount`: git, tar + diff, sqlite3.
//! - `dd_survives_leader_and_chunk_server_kill9`: kill -9 of the metadata leader and of a chunk
//!   server while dd writes; `KERFS_DD_MIB` sets the size (default 1024 = 1 GiB).
//!
//! Needs root, /dev/fuse, fuse3, and the programs git, tar, diff (diffutils) and sqlite3;
//! fails (does not skip) without them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_tests::{
    blocking, ensure_same, env_u64, init_tracing, require_root_and_fuse, KerfsCluster,
    KerfsClusterOptions, Mount,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

const MIB: u64 = 1024 * 1024;

/// Each test starts a cluster and moves data on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ mount plumbing

/// Panics naming the Debian package when a program the test runs is not installed.
fn require_program(program: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(program))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    });
    assert!(
        found,
        "`{program}` is not installed: this test runs it on the mount; apt-get install {package}"
    );
}

/// Runs a program, fails with its output if it fails, returns its stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

// ------------------------------------------------------------------ two mounts

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut out);
    out
}

fn two_mounts(a: &Path, b: &Path) -> Result<()> {
    info!("A writes 3 MiB + 17 bytes to f and closes; B opens f");
    let first = pattern(1, (3 * MIB + 17) as usize);
    std::fs::write(a.join("f"), &first)?;
    let got = std::fs::read(b.join("f")).context("B reads f")?;
    ensure!(
        got.len() == first.len(),
        "B sees size {} of f, A wrote {}",
        got.len(),
        first.len()
    );
    ensure_same(&got, &first, "B reads other bytes than A wrote")?;
    ensure!(std::fs::metadata(b.join("f"))?.len() == first.len() as u64);

    info!("A rewrites f shorter (in place, O_TRUNC) and closes; B, which read it before, opens it again");
    let second = pattern(2, (MIB + 5) as usize);
    std::fs::write(a.join("f"), &second)?;
    ensure!(
        std::fs::metadata(b.join("f"))?.len() == second.len() as u64,
        "B's stat size after A's rewrite: {}",
        std::fs::metadata(b.join("f"))?.len()
    );
    let got = std::fs::read(b.join("f"))?;
    ensure_same(&got, &second, "B reads stale data after A's rewrite")?;

    info!("B keeps f open across A's overwrite of a range; its next open sees the change");
    let mut held = File::open(b.join("f"))?;
    let mut tmp = vec![0u8; 4096];
    held.read_exact(&mut tmp)?;
    let patch = pattern(3, 100_000);
    {
        let w = OpenOptions::new().write(true).open(a.join("f"))?;
        w.write_all_at(&patch, 500_000)?;
    }
    let mut third = second.clone();
    third[500_000..600_000].copy_from_slice(&patch);
    drop(held);
    let got = std::fs::read(b.join("f"))?;
    ensure_same(
        &got,
        &third,
        "B reads stale data after A's partial overwrite",
    )?;

    info!("and the other way: B appends, A sees it");
    {
        let mut w = OpenOptions::new().append(true).open(b.join("f"))?;
        w.write_all(b"appended by B")?;
    }
    third.extend_from_slice(b"appended by B");
    let got = std::fs::read(a.join("f"))?;
    ensure_same(&got, &third, "A does not see B's append")?;

    info!("A creates a directory and files in it; B lists them");
    std::fs::create_dir(a.join("d"))?;
    for i in 0..20 {
        std::fs::write(a.join("d").join(format!("x{i}")), format!("{i}"))?;
    }
    let mut names: Vec<String> = std::fs::read_dir(b.join("d"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
    want.sort();
    ensure!(names == want, "B lists {names:?}");

    info!("A renames f to g (and over an existing name); B sees the new names");
    ensure!(b.join("f").exists(), "B sees f before the rename");
    std::fs::rename(a.join("f"), a.join("g"))?;
    ensure!(
        errno_of(std::fs::metadata(b.join("f"))) == Some(libc::ENOENT),
        "B still sees f after A renamed it"
    );
    let got = std::fs::read(b.join("g")).context("B reads g")?;
    ensure_same(&got, &third, "g on B")?;
    std::fs::rename(a.join("d/x1"), a.join("d/x2"))?;
    ensure!(
        std::fs::read_to_string(b.join("d/x2"))? == "1",
        "B sees the replaced x2"
    );
    ensure!(errno_of(std::fs::metadata(b.join("d/x1"))) == Some(libc::ENOENT));
    std::fs::rename(a.join("d"), a.join("e"))?;
    ensure!(errno_of(std::fs::read_dir(b.join("d"))) == Some(libc::ENOENT));
    ensure!(
        std::fs::read_to_string(b.join("e/x5"))? == "5",
        "B sees e/x5"
    );

    info!("A unlinks g; B gets ENOENT, and an open on B from before keeps reading it");
    let mut kept = File::open(b.join("g"))?;
    std::fs::remove_file(a.join("g"))?;
    ensure!(
        errno_of(File::open(b.join("g"))) == Some(libc::ENOENT),
        "B can still open g after A unlinked it"
    );
    ensure!(errno_of(std::fs::metadata(b.join("g"))) == Some(libc::ENOENT));
    let mut got = Vec::new();
    kept.read_to_end(&mut got)?;
    ensure_same(&got, &third, "B's open descriptor of the unlinked g")?;
    drop(kept);

    info!("B removes the tree; A sees it gone");
    std::fs::remove_dir_all(b.join("e"))?;
    ensure!(errno_of(std::fs::metadata(a.join("e"))) == Some(libc::ENOENT));
    let left: Vec<_> = std::fs::read_dir(a)?.collect::<std::io::Result<_>>()?;
    ensure!(left.is_empty(), "A still lists {} entries", left.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_mounts_close_to_open() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    info!("starting a cluster (3 meta, 3 chunk servers) and two kerfs mounts of it");
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let opts = ",attr_timeout=0,entry_timeout=0";
    let a = Mount::new(&cluster, "a", opts)?;
    let b = Mount::new(&cluster, "b", opts)?;
    let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
    blocking(&[&a, &b], move || two_mounts(&pa, &pb)).await;
    a.unmount()?;
    b.unmount()?;
    Ok(())
}

/// The kernel keeps a file's cached pages across opens while its data is unchanged (no
/// chunk read for the second `cat`), and drops them at the next open once another mount
/// changed it, even when the change kept its size and set its mtime back (close-to-open
/// with the page cache).
#[tokio::test(flavor = "multi_thread")]
async fn page_cache_is_kept_across_opens_of_an_unchanged_file() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let a = Mount::new(&cluster, "cache-a", "")?;
    let b = Mount::new(&cluster, "cache-b", "")?;
    let (fa, fb) = (a.path().join("f"), b.path().join("f"));
    let first = pattern(3, (2 * MIB) as usize);
    std::fs::write(&fb, &first)?;
    let read_bytes = || cluster.chunk_metric_sum("kerfs_chunk_bytes_read_total");

    let before = read_bytes()?;
    ensure_same(&std::fs::read(&fa)?, &first, "A's first read")?;
    let first_read = read_bytes()? - before;
    ensure!(
        first_read >= first.len() as f64,
        "A's first read took only {first_read} bytes from the chunk servers"
    );
    let before = read_bytes()?;
    ensure_same(&std::fs::read(&fa)?, &first, "A's second read")?;
    let second_read = read_bytes()? - before;
    info!(
        first_read,
        second_read, "chunk bytes read by two opens of an unchanged file"
    );
    ensure!(
        second_read == 0.0,
        "the second open of an unchanged file read {second_read} bytes from the chunk servers"
    );

    info!("B rewrites f in place with other bytes of the same size and sets its mtime back");
    let mtime = std::fs::metadata(&fb)?.modified()?;
    let second = pattern(4, first.len());
    {
        let f = OpenOptions::new().write(true).open(&fb)?;
        f.write_all_at(&second, 0)?;
        f.set_modified(mtime)?;
    }
    ensure!(std::fs::metadata(&fb)?.modified()? == mtime);
    ensure_same(
        &std::fs::read(&fa)?,
        &second,
        "A's read after B's same-size rewrite (stale cached pages?)",
    )?;
    a.unmount()?;
    b.unmount()?;
    Ok(())
}

/// What a program does to make metadata durable reaches the metadata log's disk flush, and
/// nothing else does: plain creates through the mount are acknowledged without one; fsync
/// of a file, fsync of a directory and a write to an O_SYNC file each wait for one.
#[tokio::test(flavor = "multi_thread")]
async fn fsync_through_the_mount_flushes_the_metadata_log() -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let mount = Mount::new(&cluster, "fsync", "")?;
    let client = cluster.client().await?;
    let leader = cluster
        .meta
        .wait_leader(&client, Duration::from_secs(10))
        .await?;
    let root = mount.path().to_path_buf();
    std::fs::create_dir(root.join("d"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let syncs = || cluster.meta.metric(leader, "kerfs_meta_log_syncs_total");

    let start = syncs()?;
    for i in 0..50 {
        std::fs::write(root.join(format!("d/plain-{i}")), b"x")?;
    }
    let plain = syncs()? - start;
    info!(
        plain,
        "log flushes during 50 small files written without fsync"
    );
    ensure!(
        plain < 5.0,
        "50 plain small files flushed the log {plain} times"
    );

    let flushed = |what: &str, op: &dyn Fn() -> std::io::Result<()>| -> Result<()> {
        let before = syncs()?;
        op().with_context(|| what.to_string())?;
        let n = syncs()? - before;
        info!(what, n, "log flushes");
        ensure!(
            n >= 1.0,
            "{what} returned without flushing the metadata log"
        );
        Ok(())
    };
    flushed("fsync of a new file", &|| {
        let f = File::create(root.join("d/synced"))?;
        f.sync_all()
    })?;
    flushed("fsync of a directory after a rename", &|| {
        std::fs::rename(root.join("d/plain-0"), root.join("d/renamed"))?;
        File::open(root.join("d"))?.sync_all()
    })?;
    flushed("a write to an O_SYNC file", &|| {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(root.join("d/plain-1"))?
            .write_all(b"sync")
    })?;
    drop(client);
    mount.unmount()?;
    Ok(())
}

/// One file finished the way tar x, cp -a and rsync finish it: written through a new
/// descriptor, then futimens (explicit mtime, atime left alone), fchown and fchmod on that
/// descriptor, then close. Returns what fstat said between the last change and the close.
fn write_like_tar(
    path: &Path,
    data: &[u8],
    mtime: i64,
    uid: u32,
    mode: u32,
) -> Result<std::fs::Metadata> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    let changed = (|| {
        f.set_modified(unix_time(mtime))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(uid))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.metadata()
    })();
    let st =
        changed.with_context(|| format!("futimens/fchown/fchmod/fstat of {}", path.display()))?;
    drop(f);
    Ok(st)
}

fn unix_time(sec: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(sec as u64)
}

/// The attribute changes tar makes on a file it holds open cost no metadata command of
/// their own: they travel with the commit of the close (and releases share Close commands). The file shows them at once through
/// its descriptor, and another mount sees data and attributes together after the close. A
/// write after an explicit mtime still marks the file modified, and a change whose outcome
/// only the cluster knows (a set-user-ID bit) goes straight to it.
#[tokio::test(flavor = "multi_thread")]
async fn attribute_changes_of_an_open_file_travel_with_its_close() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let a = Mount::new(&cluster, "tar-a", "")?;
    let b = Mount::new(&cluster, "tar-b", ",attr_timeout=0,entry_timeout=0")?;
    let client = cluster.client().await?;
    let leader = cluster
        .meta
        .wait_leader(&client, Duration::from_secs(10))
        .await?;
    let (ra, rb) = (a.path().to_path_buf(), b.path().to_path_buf());
    std::fs::create_dir(ra.join("x"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let proposals = || cluster.meta.metric(leader, "kerfs_meta_proposals_total");

    const FILES: u32 = 40;
    let before = proposals()?;
    for i in 0..FILES {
        let mode = if i % 2 == 0 { 0o644 } else { 0o751 };
        let st = write_like_tar(
            &ra.join(format!("x/f{i}")),
            &pattern(i as u8, 100 + i as usize),
            1_000_000 + i as i64,
            2000 + i,
            mode,
        )?;
        ensure!(
            (st.mode() & 0o7777, st.uid(), st.mtime()) == (mode, 2000 + i, 1_000_000 + i as i64),
            "fstat before close of f{i}: mode {:o} uid {} mtime {}",
            st.mode() & 0o7777,
            st.uid(),
            st.mtime()
        );
    }
    let per_file = (proposals()? - before) / f64::from(FILES);
    info!(per_file, "metadata commands per file written the tar way");
    // Create, chunk allocation, commit and close; each of the three changes on its own would
    // add one, and a flush before the futimens another.
    ensure!(
        per_file < 5.0,
        "{per_file} metadata commands per tar-like file: its attribute changes were not merged into its close"
    );
    for i in 0..FILES {
        let path = rb.join(format!("x/f{i}"));
        let m = std::fs::metadata(&path)?;
        let mode = if i % 2 == 0 { 0o644 } else { 0o751 };
        ensure!(
            (m.mode() & 0o7777, m.uid(), m.gid(), m.mtime(), m.len())
                == (
                    mode,
                    2000 + i,
                    2000 + i,
                    1_000_000 + i as i64,
                    100 + u64::from(i)
                ),
            "the other mount sees f{i} with mode {:o} uid {} gid {} mtime {} size {}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.mtime(),
            m.len()
        );
        ensure_same(
            &std::fs::read(&path)?,
            &pattern(i as u8, 100 + i as usize),
            "f{i}'s data",
        )?;
    }

    info!("a write after futimens marks the file modified again");
    let later = ra.join("x/later");
    {
        let mut f = File::create(&later)?;
        f.write_all(b"first")?;
        f.set_modified(unix_time(1_000))?;
        f.write_all(b" and second")?;
    }
    let m = std::fs::metadata(rb.join("x/later"))?;
    ensure!(
        m.mtime() > 1_000_000 && m.len() == 16,
        "a write after an explicit mtime left mtime {} size {}",
        m.mtime(),
        m.len()
    );

    info!("a set-user-ID chmod through an open descriptor reaches the cluster as it is");
    let st = write_like_tar(&ra.join("x/suid"), b"#!/bin/sh\n", 5_000_000, 0, 0o4755)?;
    ensure!(
        st.mode() & 0o7777 == 0o4755,
        "fstat: {:o}",
        st.mode() & 0o7777
    );
    let m = std::fs::metadata(rb.join("x/suid"))?;
    ensure!(
        (m.mode() & 0o7777, m.mtime()) == (0o4755, 5_000_000),
        "the other mount sees suid with mode {:o} mtime {}",
        m.mode() & 0o7777,
        m.mtime()
    );

    info!("the releases of files closed together go to the cluster in one Close");
    let files: Vec<File> = (0..20)
        .map(|i| File::open(ra.join(format!("x/f{i}"))))
        .collect::<std::io::Result<_>>()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proposals()?;
    drop(files);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closes = proposals()? - before;
    info!(closes, "metadata commands for 20 releases");
    ensure!(
        closes <= 10.0,
        "20 files closed at once cost {closes} metadata commands"
    );
    drop(client);
    a.unmount()?;
    b.unmount()?;
    Ok(())
}

// ------------------------------------------------------------------ programs

/// Files of many sizes (0, around page and chunk sizes, a few MiB), nested directories, an
/// empty directory, a symlink, a hard link and an executable.
fn generate_tree(root: &Path, rng: &mut StdRng) -> Result<()> {
    let sizes = [
        0u64,
        1,
        100,
        4095,
        4096,
        4097,
        65_536,
        200_000,
        MIB + 1,
        3 * MIB + 7,
    ];
    for d in 0..4 {
        let dir = root.join(format!("dir{d}/sub{}", d % 2));
        std::fs::create_dir_all(&dir)?;
        for (i, size) in sizes.iter().enumerate() {
            let mut data = vec![0u8; *size as usize];
            if i % 2 == 0 {
                rng.fill(&mut data[..]);
            } else {
                // Compressible text, as source files are.
                let line = b"fn main() { println!(\"kerfs\"); }\n";
                for (j, b) in data.iter_mut().enumerate() {
                    *b = line[j % line.len()];
                }
            }
            std::fs::write(dir.join(format!("file{i}.dat")), &data)?;
        }
    }
    std::fs::create_dir_all(root.join("empty"))?;
    std::os::unix::fs::symlink("dir0/sub0/file2.dat", root.join("link"))?;
    std::fs::hard_link(root.join("dir1/sub1/file3.dat"), root.join("hardlink"))?;
    let exe = root.join("run.sh");
    std::fs::write(&exe, "#!/bin/sh\necho hello\n")?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn git(repo: &Path, home: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(repo)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "KerFS Test")
        .env("GIT_AUTHOR_EMAIL", "test@kerfs.invalid")
        .env("GIT_COMMITTER_NAME", "KerFS Test")
        .env("GIT_COMMITTER_EMAIL", "test@kerfs.invalid")
        .args(["-c", "safe.directory=*", "-c", "init.defaultBranch=main"]);
    c
}

fn git_on_mount(mnt: &Path, local: &Path) -> Result<()> {
    let home = local.join("home");
    std::fs::create_dir_all(&home)?;
    let repo = mnt.join("repo");
    std::fs::create_dir(&repo)?;
    info!("git init, a tree of files, git add + commit");
    run(git(&repo, &home).args(["init", "-q"]))?;
    let mut rng = StdRng::seed_from_u64(7);
    generate_tree(&repo.join("tree"), &mut rng)?;
    // git does not track empty directories; the clone is compared with this tree.
    std::fs::remove_dir(repo.join("tree/empty"))?;
    std::fs::write(repo.join("README"), "kerfs git test\n")?;
    run(git(&repo, &home).args(["add", "-A"]))?;
    run(git(&repo, &home).args(["commit", "-q", "-m", "first"]))?;
    info!("a second commit: edit, remove, rename");
    std::fs::write(repo.join("README"), "kerfs git test, edited\n")?;
    std::fs::remove_file(repo.join("tree/dir0/sub0/file4.dat"))?;
    run(git(&repo, &home).args(["mv", "tree/dir2", "tree/dir2-moved"]))?;
    run(git(&repo, &home).args(["commit", "-q", "-a", "-m", "second"]))?;
    let log = run(git(&repo, &home).args(["log", "--format=%s"]))?;
    ensure!(log == "second\nfirst\n", "git log: {log:?}");
    let status = run(git(&repo, &home).args(["status", "--porcelain"]))?;
    ensure!(status.is_empty(), "git status after commit: {status:?}");
    let stat = run(git(&repo, &home).args(["show", "--stat", "--format=", "HEAD"]))?;
    ensure!(
        stat.contains("README") && stat.contains("dir2-moved"),
        "git show: {stat}"
    );
    info!("git fsck --full --strict, git gc (packs and renames), fsck again");
    run(git(&repo, &home).args(["fsck", "--full", "--strict", "--no-progress"]))?;
    run(git(&repo, &home).args(["gc", "-q"]))?;
    run(git(&repo, &home).args(["fsck", "--full", "--strict", "--no-progress"]))?;
    info!("git clone from the mount to local disk: the same tree");
    let clone = local.join("clone");
    run(git(local, &home)
        .arg("clone")
        .arg("-q")
        .arg(&repo)
        .arg(&clone))?;
    run(Command::new("diff")
        .args(["-r", "--no-dereference", "-x", ".git"])
        .arg(&repo)
        .arg(&clone))?;
    Ok(())
}

/// Every entry under `a` exists under `b` with the same type, permission bits, size and
/// symlink target (diff -r compares the contents).
fn compare_metadata(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let out = run(Command::new("find").arg(a).arg("-mindepth").arg("1"))?;
    let mut n = 0;
    for line in out.lines() {
        let rel = Path::new(line).strip_prefix(a)?;
        let (ma, mb) = (
            std::fs::symlink_metadata(a.join(rel))?,
            std::fs::symlink_metadata(b.join(rel))
                .with_context(|| format!("{} on the mount", rel.display()))?,
        );
        ensure!(
            ma.mode() == mb.mode(),
            "{}: mode {:o} on the mount, {:o} originally",
            rel.display(),
            mb.mode(),
            ma.mode()
        );
        ensure!(
            ma.is_dir() || ma.len() == mb.len(),
            "{}: size {} on the mount, {} originally",
            rel.display(),
            mb.len(),
            ma.len()
        );
        if ma.file_type().is_symlink() {
            ensure!(std::fs::read_link(a.join(rel))? == std::fs::read_link(b.join(rel))?);
        }
        n += 1;
    }
    ensure!(n > 40, "only {n} entries compared");
    Ok(())
}

fn tar_on_mount(mnt: &Path, local: &Path) -> Result<()> {
    let orig = local.join("orig");
    info!("a source tree: generated files and the repository's meta/ sources");
    let mut rng = StdRng::seed_from_u64(8);
    generate_tree(&orig.join("gen"), &mut rng)?;
    let meta_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../meta");
    run(Command::new("cp")
        .arg("-a")
        .arg(&meta_src)
        .arg(orig.join("meta")))?;
    let archive = local.join("src.tar.gz");
    run(Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&orig)
        .arg("."))?;
    info!("the archive copied onto the mount, extracted there with tar x");
    let on_mount = mnt.join("src.tar.gz");
    std::fs::copy(&archive, &on_mount)?;
    ensure!(
        std::fs::read(&on_mount)? == std::fs::read(&archive)?,
        "archive copy differs"
    );
    let x = mnt.join("extract");
    std::fs::create_dir(&x)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&on_mount)
        .arg("-C")
        .arg(&x))?;
    info!("diff -r against the original; types, modes, sizes and link targets match");
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&orig)
        .arg(&x))?;
    compare_metadata(&orig, &x)?;
    // tar sets mtimes with futimens before close: buffered writes must not stamp "now" over
    // them when they are committed.
    info!("tar --compare: contents, modes and mtimes as archived");
    run(Command::new("tar")
        .arg("--compare")
        .arg("-zf")
        .arg(&on_mount)
        .arg("-C")
        .arg(&x))?;
    let n = run(Command::new("find").arg(&x).args(["-type", "f"]))?
        .lines()
        .count();
    ensure!(n > 40, "only {n} files extracted");
    let hl = std::fs::metadata(x.join("gen/hardlink"))?;
    ensure!(
        std::os::unix::fs::MetadataExt::nlink(&hl) == 2,
        "hard link extracted with nlink {}",
        std::os::unix::fs::MetadataExt::nlink(&hl)
    );
    info!(files = n, "tar tree matches; removing it with rm -r");
    run(Command::new("rm").arg("-r").arg(&x))?;
    ensure!(!x.exists());
    Ok(())
}

fn sqlite_on_mount(mnt: &Path) -> Result<()> {
    let db = mnt.join("test.db");
    info!("sqlite3: a table and 10,000 rows inserted in one transaction");
    let mut sql = String::from(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, v INTEGER);\n\
         CREATE INDEX t_v ON t(v);\nBEGIN;\n",
    );
    for i in 0..10_000u64 {
        sql.push_str(&format!(
            "INSERT INTO t VALUES({i}, 'row-{i}-{}', {});\n",
            "x".repeat((i % 50) as usize),
            (i * 7919) % 10_007
        ));
    }
    sql.push_str("COMMIT;\n");
    let mut child = Command::new("sqlite3")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sqlite3")?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sql.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "sqlite3 insert: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    info!("sqlite3: a new process queries them");
    let q = |sql: &str| run(Command::new("sqlite3").arg(&db).arg(sql));
    let got = q("SELECT count(*), sum(id), sum(v) FROM t;")?;
    let want_v: u64 = (0..10_000u64).map(|i| (i * 7919) % 10_007).sum();
    ensure!(
        got.trim() == format!("10000|49995000|{want_v}"),
        "count/sums: {got:?}"
    );
    let got = q("SELECT name FROM t WHERE id = 4321;")?;
    ensure!(
        got.trim() == format!("row-4321-{}", "x".repeat(4321 % 50)),
        "row 4321: {got:?}"
    );
    let got = q("SELECT count(*) FROM t WHERE v BETWEEN 100 AND 199;")?;
    let want = (0..10_000u64)
        .filter(|i| (100..200).contains(&((i * 7919) % 10_007)))
        .count();
    ensure!(
        got.trim() == want.to_string(),
        "index range query: {got:?}, want {want}"
    );
    info!("sqlite3: update + delete in a transaction, a rolled back one, integrity_check");
    q("BEGIN; UPDATE t SET v = -1 WHERE id % 10 = 0; DELETE FROM t WHERE id >= 9000; COMMIT;")?;
    q("BEGIN; DELETE FROM t; ROLLBACK;")?;
    let got = q("SELECT count(*), sum(v = -1) FROM t;")?;
    ensure!(got.trim() == "9000|900", "after update/delete: {got:?}");
    let got = q("PRAGMA integrity_check;")?;
    ensure!(got.trim() == "ok", "integrity_check: {got:?}");
    ensure!(
        !mnt.join("test.db-journal").exists(),
        "the rollback journal is left behind"
    );
    info!("sqlite3: WAL mode (shared-memory index mapped from the mount)");
    let got = q(
        "PRAGMA journal_mode=WAL; INSERT INTO t VALUES(20000, 'wal', 1); SELECT count(*) FROM t;",
    )?;
    ensure!(
        got.split_whitespace().collect::<Vec<_>>() == ["wal", "9001"],
        "WAL: {got:?}"
    );
    let got = q("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA integrity_check;")?;
    ensure!(got.trim().ends_with("ok"), "after checkpoint: {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn programs_on_the_mount() -> Result<()> {
    require_root_and_fuse();
    for (program, package) in [
        ("git", "git"),
        ("tar", "tar"),
        ("gzip", "gzip"),
        ("diff", "diffutils"),
        ("sqlite3", "sqlite3"),
    ] {
        require_program(program, package);
    }
    init_tracing();
    let _serial = SERIAL.lock().await;
    info!("starting a cluster (3 meta, 3 chunk servers) and a mount");
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let mount = Mount::new(&cluster, "programs", "")?;
    let local = tempfile::Builder::new().prefix("kerfs-local-").tempdir()?;
    let (mnt, loc) = (mount.path().to_path_buf(), local.path().to_path_buf());
    blocking(&[&mount], move || {
        std::fs::create_dir(loc.join("git"))?;
        std::fs::create_dir(loc.join("tar"))?;
        let t = Instant::now();
        git_on_mount(&mnt, &loc.join("git")).context("git")?;
        info!(elapsed = ?t.elapsed(), "git done");
        let t = Instant::now();
        tar_on_mount(&mnt, &loc.join("tar")).context("tar")?;
        info!(elapsed = ?t.elapsed(), "tar done");
        let t = Instant::now();
        sqlite_on_mount(&mnt).context("sqlite3")?;
        info!(elapsed = ?t.elapsed(), "sqlite3 done");
        Ok(())
    })
    .await;
    mount.unmount()?;
    Ok(())
}

// ------------------------------------------------------------------ dd under kill -9

/// The bytes written by dd: a keyed blake3 stream, generated once on local disk.
fn write_source(path: &Path, size: u64) -> Result<blake3::Hash> {
    let mut xof = blake3::Hasher::new_keyed(&[42; 32]).finalize_xof();
    let mut f = std::io::BufWriter::new(File::create(path)?);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        xof.fill(&mut buf);
        h.update(&buf);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(h.finalize())
}

fn hash_file(path: &Path) -> Result<(u64, blake3::Hash)> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize()))
}

/// How far dd has written: the position of its standard output (the of= file).
fn dd_position(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/1")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("pos:"))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn dd_survives_leader_and_chunk_server_kill9() -> Result<()> {
    require_root_and_fuse();
    require_program("dd", "coreutils");
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mib = env_u64("KERFS_DD_MIB").unwrap_or(1024);
    let size = mib * MIB;
    info!(
        mib,
        "starting a cluster (3 meta, 3 chunk servers) and a mount"
    );
    let mut cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let client = cluster.client().await?;
    let mount = Mount::new(&cluster, "dd", "")?;
    let src = cluster.meta.dir.path().join("dd-source");
    let want = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || write_source(&src, size)).await??
    };
    info!(mib, hash = %want, "source file generated on local disk");

    let dst = mount.path().join("big");
    let start = Instant::now();
    let mut dd = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=1M", "conv=fsync"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting dd")?;
    let pid = dd.id();
    info!(pid, "dd started");

    let mut killed_leader = None;
    let mut killed_chunk = false;
    let status = loop {
        if let Some(status) = dd.try_wait()? {
            break status;
        }
        let pos = dd_position(pid).unwrap_or(0);
        if killed_leader.is_none() && pos >= size / 4 {
            let leader = cluster
                .meta
                .wait_leader(&client, Duration::from_secs(10))
                .await?;
            info!(
                pos,
                leader, "dd is a quarter through: kill -9 of the metadata leader"
            );
            cluster.meta.kill9(leader)?;
            killed_leader = Some((leader, pos));
        }
        if killed_leader.is_some() && !killed_chunk && pos >= size / 2 {
            info!(pos, "dd is half through: kill -9 of chunk server 1");
            cluster.kill9_chunk(1)?;
            killed_chunk = true;
        }
        if start.elapsed() > Duration::from_secs(600) {
            let _ = dd.kill();
            bail!("dd did not finish within 600 s (at {pos} bytes)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    dd.stderr.take().expect("stderr").read_to_string(&mut err)?;
    let elapsed = start.elapsed();
    if !status.success() {
        eprintln!("--- tail of kerfs log ---\n{}", mount.log_tail());
        panic!("dd failed ({status}) after the kills: {err}");
    }
    ensure!(
        killed_leader.is_some() && killed_chunk,
        "dd finished before both kills happened (leader {killed_leader:?}, chunk {killed_chunk}): \
         the file is too small for this machine; raise KERFS_DD_MIB"
    );
    info!(?elapsed, mib, dd = %err.lines().last().unwrap_or(""), "dd completed after both kills");

    info!("reading the file back through the mount (a fresh open: from the cluster)");
    let (len, got) = {
        let dst = dst.clone();
        tokio::task::spawn_blocking(move || hash_file(&dst)).await??
    };
    ensure!(len == size, "file size {len}, dd wrote {size}");
    ensure!(got == want, "the file read back differs from what dd wrote");
    info!(hash = %got, "identical");

    // And from the cluster's side, after the metadata node that was killed comes back.
    let (leader, _) = killed_leader.expect("checked");
    cluster.meta.restart(leader)?;
    let st = std::fs::metadata(&dst)?;
    ensure!(st.len() == size);
    mount.unmount()?;
    Ok(())
}
