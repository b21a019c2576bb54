//! The mount end to end: real kerfsd processes, the built `kerfs` binary, a real FUSE mount,
//! and plain std::fs / libc calls on it, the way programs use it. Needs root and /dev/fuse
//! and fails (does not skip) without them: a mount test that silently passes proves nothing.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_tests::{
    bin_path, fstype, init_tracing, require_root_and_fuse, KerfsCluster, KerfsClusterOptions,
};

fn wait_unmounted(dir: &Path) -> Result<()> {
    let start = Instant::now();
    while fstype(dir).is_some() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{} is still mounted", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A mount point that is lazily unmounted if a test fails halfway.
struct MountDir {
    tmp: tempfile::TempDir,
}

impl MountDir {
    fn new() -> Result<MountDir> {
        Ok(MountDir {
            tmp: tempfile::Builder::new().prefix("kerfs-mnt-").tempdir()?,
        })
    }
    fn path(&self) -> &Path {
        self.tmp.path()
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        if fstype(self.path()).is_some() {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// A symlink installed for the duration of a test; what was there before comes back.
struct InstalledLink {
    link: PathBuf,
    previous: Option<PathBuf>,
}

impl InstalledLink {
    fn new(link: &Path, target: &Path) -> Result<InstalledLink> {
        let previous = match std::fs::symlink_metadata(link) {
            Ok(m) if m.file_type().is_symlink() => Some(std::fs::read_link(link)?),
            Ok(_) => bail!(
                "{} exists and is not a symlink: remove it to run this test",
                link.display()
            ),
            Err(_) => None,
        };
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(target, link)
            .with_context(|| format!("installing {}", link.display()))?;
        Ok(InstalledLink {
            link: link.to_path_buf(),
            previous,
        })
    }
}

impl Drop for InstalledLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
        if let Some(p) = &self.previous {
            let _ = std::os::unix::fs::symlink(p, &self.link);
        }
    }
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("test paths have no NUL")
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (p, n) = (c_path(p), CString::new(name).expect("no NUL"));
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_xattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (p, n) = (c_path(p), CString::new(name).expect("no NUL"));
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn list_xattr(p: &Path) -> std::io::Result<Vec<String>> {
    let p = c_path(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and a buffer of the given length.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Namespace operations through the mount, as std::fs and libc do them.
fn exercise_namespace(root: &Path) -> Result<()> {
    let a = root.join("a");
    std::fs::create_dir(&a)?;
    ensure!(std::fs::metadata(&a)?.is_dir());
    ensure!(errno_of(std::fs::create_dir(&a)) == Some(libc::EEXIST));

    let f = a.join("f");
    std::fs::File::create(&f).context("create")?;
    let m = std::fs::metadata(&f)?;
    ensure!(m.is_file() && m.len() == 0, "new file: {m:?}");

    let g = a.join("g");
    std::fs::rename(&f, &g)?;
    ensure!(!f.exists() && g.exists(), "rename");

    let l = a.join("l");
    std::os::unix::fs::symlink("g", &l)?;
    ensure!(std::fs::read_link(&l)? == Path::new("g"));
    ensure!(std::fs::symlink_metadata(&l)?.file_type().is_symlink());
    ensure!(std::fs::metadata(&l)?.is_file(), "symlink resolves to g");

    let h = a.join("h");
    std::fs::hard_link(&g, &h)?;
    ensure!(std::fs::metadata(&g)?.nlink() == 2, "nlink after link");
    ensure!(std::fs::metadata(&h)?.ino() == std::fs::metadata(&g)?.ino());
    std::fs::remove_file(&h)?;
    ensure!(std::fs::metadata(&g)?.nlink() == 1, "nlink after unlink");

    std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o640))?;
    ensure!(std::fs::metadata(&g)?.mode() & 0o7777 == 0o640, "chmod");
    std::os::unix::fs::chown(&g, Some(1234), Some(5678))?;
    let m = std::fs::metadata(&g)?;
    ensure!((m.uid(), m.gid()) == (1234, 5678), "chown");

    set_xattr(&g, "user.color", b"blue")?;
    ensure!(get_xattr(&g, "user.color")? == b"blue");
    ensure!(list_xattr(&g)?.contains(&"user.color".to_string()));
    ensure!(errno_of(get_xattr(&g, "user.none")) == Some(libc::ENODATA));

    ensure!(errno_of(std::fs::remove_dir(&a)) == Some(libc::ENOTEMPTY));

    let big = root.join("big");
    std::fs::create_dir(&big)?;
    let mut want = BTreeSet::new();
    for i in 0..1000 {
        let name = format!("entry-{i:04}");
        std::fs::File::create(big.join(&name))?;
        want.insert(name);
    }
    let got: BTreeSet<String> = std::fs::read_dir(&big)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    ensure!(
        got.len() == 1000,
        "readdir saw {} of 1000 entries",
        got.len()
    );
    ensure!(got == want, "readdir names differ");

    let st = c_path(root);
    // SAFETY: a valid path and a statvfs we own.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    ensure!(
        unsafe { libc::statvfs(st.as_ptr(), &mut sv) } == 0,
        "statvfs"
    );
    ensure!(sv.f_namemax == 255, "name max {}", sv.f_namemax);

    std::fs::remove_file(&l)?;
    std::fs::remove_file(&g)?;
    std::fs::remove_dir(&a)?;
    ensure!(!a.exists());
    Ok(())
}

/// File data through the mount: big sequential writes, reads through another descriptor
/// while the first is still open, overwrite in the middle, truncate down and up.
fn exercise_data(root: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let p = root.join("data");
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let mut w = std::fs::File::create(&p)?;
    w.write_all(&data)?;
    // Another descriptor sees the bytes before the writer closes.
    let mut got = Vec::new();
    std::fs::File::open(&p)?.read_to_end(&mut got)?;
    ensure!(
        got.len() == data.len(),
        "size seen while open: {}",
        got.len()
    );
    ensure!(got == data, "data seen while open differs");
    w.seek(SeekFrom::Start(1000))?;
    w.write_all(b"hello")?;
    drop(w);
    let mut want = data.clone();
    want[1000..1005].copy_from_slice(b"hello");
    ensure!(std::fs::read(&p)? == want, "data after close differs");
    ensure!(std::fs::metadata(&p)?.len() == want.len() as u64);

    let f = std::fs::OpenOptions::new().write(true).open(&p)?;
    f.set_len(1500)?;
    f.set_len(4000)?;
    drop(f);
    let got = std::fs::read(&p)?;
    ensure!(got.len() == 4000, "size after truncates: {}", got.len());
    ensure!(got[..1500] == want[..1500], "kept bytes differ");
    ensure!(
        got[1500..].iter().all(|b| *b == 0),
        "extension must read zeros"
    );

    let mut a = std::fs::OpenOptions::new().append(true).open(&p)?;
    a.write_all(b"tail")?;
    drop(a);
    let got = std::fs::read(&p)?;
    ensure!(got.len() == 4004 && &got[4000..] == b"tail", "append");
    std::fs::remove_file(&p)?;
    Ok(())
}

/// Starts `kerfs ADDRS DIR -o ...` (daemon mode) and waits for it: it returns once mounted.
fn mount_with_binary(kerfs: &Path, cluster: &KerfsCluster, dir: &Path, extra: &str) -> Result<()> {
    let addrs = cluster.meta.addrs().join(",");
    let opts = format!("key_file={}{extra}", cluster.meta.key_file.display());
    let out = Command::new(kerfs)
        .arg(&addrs)
        .arg(dir)
        .args(["-o", &opts])
        .stdin(Stdio::null())
        .output()
        .context("running kerfs")?;
    ensure!(
        out.status.success(),
        "kerfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_through_a_mount() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let kerfs = bin_path("kerfs")?;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let mnt = MountDir::new()?;
    let dir = mnt.path().to_path_buf();

    let log = cluster.meta.dir.path().join("kerfs.log");
    mount_with_binary(&kerfs, &cluster, &dir, &format!(",log={}", log.display()))?;
    assert_eq!(fstype(&dir).as_deref(), Some("fuse.kerfs"), "findmnt type");

    let result = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || exercise_namespace(&dir).and_then(|()| exercise_data(&dir))
    })
    .await?;
    if let Err(e) = &result {
        eprintln!(
            "kerfs log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        panic!("operations through the mount failed: {e:#}");
    }

    // What the mount did is what the cluster has.
    let client = cluster.client().await?;
    let big = client.resolve("/big").await?;
    assert_eq!(client.readdir_all(big.ino).await?.len(), 1000);

    let status = Command::new("umount").arg(&dir).status()?;
    assert!(status.success(), "umount failed");
    wait_unmounted(&dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_command_subdir_and_signals() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let kerfs = bin_path("kerfs")?;
    let cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: 1,
        ..Default::default()
    })
    .await?;
    let client = cluster.client().await?;
    let sub = client.mkdir(kerfs_proto::ROOT_INO, b"sub", 0o755).await?;
    client.create_file(sub.ino, b"inside", 0o644).await?;

    // mount(8) → mount.fuse3 → `/bin/sh -c "kerfs ..."`. mount(8) gives helpers a fixed
    // PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin), so the
    // documented install, a symlink in /usr/local/bin, is the only way to be found.
    let _installed = InstalledLink::new(Path::new("/usr/local/bin/kerfs"), &kerfs)?;
    let mnt = MountDir::new()?;
    let dir: PathBuf = mnt.path().to_path_buf();
    let addrs = cluster.meta.addrs().join(",");
    let opts = format!(
        "_netdev,subdir=/sub,attr_timeout=0.5,entry_timeout=0.5,key_file={}",
        cluster.meta.key_file.display()
    );
    let out = Command::new("mount")
        .args(["-t", "fuse.kerfs", &addrs])
        .arg(&dir)
        .args(["-o", &opts])
        .stdin(Stdio::null())
        .output()?;
    assert!(
        out.status.success(),
        "mount -t fuse.kerfs failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fstype(&dir).as_deref(), Some("fuse.kerfs"));
    assert!(
        dir.join("inside").is_file(),
        "subdir= shows /sub as the root"
    );
    let names: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(names, vec![std::ffi::OsString::from("inside")]);
    let status = Command::new("fusermount3").arg("-u").arg(&dir).status()?;
    assert!(status.success(), "fusermount3 -u failed");
    wait_unmounted(&dir)?;

    // A bad option fails the mount with a message, and leaves nothing mounted.
    let out = Command::new(&kerfs)
        .arg(&addrs)
        .arg(&dir)
        .args(["-o", "no_such_option"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_option"));
    assert_eq!(fstype(&dir), None);

    // Foreground mode: SIGTERM unmounts and the process exits cleanly.
    let mut child = Command::new(&kerfs)
        .arg(&addrs)
        .arg(&dir)
        .args(["-f", "-o"])
        .arg(format!("key_file={}", cluster.meta.key_file.display()))
        .stdin(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while fstype(&dir).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "kerfs -f did not mount"
        );
        assert!(child.try_wait()?.is_none(), "kerfs -f exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dir.join("sub").is_dir());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    assert!(status.success(), "kerfs -f after SIGTERM: {status}");
    wait_unmounted(&dir)?;

    // auto_unmount: a client killed with SIGKILL leaves no dead mount behind
    // ("Transport endpoint is not connected"); fusermount3's watcher unmounts it.
    let mut child = Command::new(&kerfs)
        .arg(&addrs)
        .arg(&dir)
        .args(["-f", "-o"])
        .arg(format!(
            "auto_unmount,key_file={}",
            cluster.meta.key_file.display()
        ))
        .stdin(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while fstype(&dir).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "kerfs -o auto_unmount did not mount"
        );
        assert!(child.try_wait()?.is_none(), "kerfs -o auto_unmount exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dir.join("sub").is_dir());
    child.kill()?;
    child.wait()?;
    wait_unmounted(&dir)?;
    Ok(())
}
