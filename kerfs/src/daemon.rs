//! Mounting and the daemon's life: connect, mount, tell the waiting parent, serve until
//! unmounted.
//!
//! mount(8) runs mount.fuse3, which runs us and waits for us to exit; so unless `-f`, the
//! process forks first (before any thread exists: a forked child keeps only the thread that
//! forked). The child sets up a new session, connects to the cluster and mounts, then
//! writes "ok" (or the error) into a pipe; the parent exits 0 on "ok" and 1 otherwise. Errors
//! therefore reach the terminal of whoever ran `mount`, and `mount` returns only once the
//! filesystem answers.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kerfs_client::{MetaClient, MetaClientConfig};
use kerfs_proto::auth::{load_client_key, ClusterKey};
use kerfs_proto::FileKind;
use tracing::{info, warn};

use crate::fs::{FsConfig, KerFs};
use crate::fuse::FuseFs;
use crate::options::{Args, MountOptions};

/// Everything decided before forking (so that mistakes are reported on the terminal).
struct Plan {
    addrs: Vec<String>,
    meta_addrs: String,
    mountpoint: PathBuf,
    options: MountOptions,
    key: ClusterKey,
}

/// The whole program; returns the exit status.
pub fn main(args: Args) -> i32 {
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kerfs: {e:#}");
            return 1;
        }
    };
    if args.foreground {
        init_logging(None, true);
        return match serve(plan, None) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("kerfs: {e:#}");
                1
            }
        };
    }
    match fork_with_pipe() {
        Err(e) => {
            eprintln!("kerfs: cannot start the daemon: {e:#}");
            1
        }
        Ok(Forked::Parent(pipe)) => wait_for_child(pipe),
        Ok(Forked::Child(pipe)) => {
            let log = plan.options.log_file.clone();
            if log.is_some() {
                // Everything the daemon says goes to its log from the start; failures
                // before the mount also travel back through the pipe.
                if let Err(e) = detach_stdio(log.as_deref()) {
                    let mut pipe = pipe;
                    let _ = write!(pipe, "{e:#}");
                    return 1;
                }
            }
            init_logging(log.as_deref(), false);
            let mut ready = Some(pipe);
            let result = serve(plan, Some(&mut ready));
            match result {
                Ok(()) => 0,
                Err(e) => {
                    match ready.take() {
                        // Still before "ok": the parent prints it and fails the mount.
                        Some(mut p) => {
                            let _ = write!(p, "{e:#}");
                        }
                        None => tracing::error!(error = %format!("{e:#}"), "kerfs stopped"),
                    }
                    1
                }
            }
        }
    }
}

fn plan(args: &Args) -> Result<Plan> {
    let options = MountOptions::parse(&args.options).map_err(|e| anyhow!(e))?;
    let addrs = MetaClientConfig::parse_addrs(&args.meta_addrs)?;
    let key = load_client_key(options.key_file.as_deref())?;
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!(
            "mount point {} is not a directory",
            args.mountpoint.display()
        );
    }
    Ok(Plan {
        addrs,
        meta_addrs: args.meta_addrs.clone(),
        mountpoint: args.mountpoint.clone(),
        options,
        key,
    })
}

fn init_logging(log_file: Option<&Path>, foreground: bool) {
    // A daemon without a log file says nothing on the terminal of `mount` unless it fails
    // (failures come back through the pipe).
    let default = if foreground || log_file.is_some() {
        "kerfs=info,kerfs_client=info,warn"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Logs go to stderr; a daemon points stderr at its log file once mounted.
    let ansi = log_file.is_none() && unsafe { libc::isatty(2) } == 1;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

enum Forked {
    Parent(File),
    Child(File),
}

fn fork_with_pipe() -> Result<Forked> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both descriptors were just created and belong to nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no thread has been started yet (no runtime, no mount), so the child is a
    // complete copy of this process.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(r);
            // Leave the terminal's session so that its hangup does not kill the mount.
            // SAFETY: setsid has no preconditions; it fails only if we lead a group.
            unsafe { libc::setsid() };
            Ok(Forked::Child(File::from(w)))
        }
        _ => {
            drop(w);
            Ok(Forked::Parent(File::from(r)))
        }
    }
}

fn wait_for_child(mut pipe: File) -> i32 {
    let mut msg = String::new();
    let _ = pipe.read_to_string(&mut msg);
    if msg == "ok" {
        return 0;
    }
    if msg.is_empty() {
        eprintln!("kerfs: the daemon exited before the mount was up (mount with -f to see why)");
    } else {
        eprintln!("kerfs: {msg}");
    }
    1
}

/// Points stdin at /dev/null and stdout/stderr at the log (or /dev/null): the daemon must not
/// hold the terminal, or pipes of whoever ran mount.
fn detach_stdio(log_file: Option<&Path>) -> Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let out = match log_file {
        Some(p) => File::options()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("log file {}", p.display()))?,
        None => null.try_clone()?,
    };
    // SAFETY: dup2 onto the standard descriptors, from descriptors we own.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(out.as_raw_fd(), 2);
    }
    Ok(())
}

/// Connects, mounts, reports readiness (daemon) and runs the session until unmounted.
fn serve(plan: Plan, ready: Option<&mut Option<File>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kerfs-worker")
        .build()
        .context("starting the runtime")?;
    let mut config = MetaClientConfig::new(plan.addrs.clone(), plan.key.clone());
    config.deadline = plan.options.deadline;
    config.lease = plan.options.lease;
    config.description = format!(
        "kerfs mount {} pid {}",
        plan.mountpoint.display(),
        std::process::id()
    );
    let (client, root) = rt.block_on(async {
        let client = MetaClient::connect(config)
            .await
            .with_context(|| format!("connecting to the cluster at {}", plan.meta_addrs))?;
        let root = client
            .resolve(&plan.options.subdir)
            .await
            .with_context(|| format!("subdir={}", plan.options.subdir))?;
        if root.kind != FileKind::Directory as i32 {
            bail!("subdir={} is not a directory", plan.options.subdir);
        }
        anyhow::Ok((client, root))
    })?;
    // KerFs starts its background tasks on this runtime.
    let _runtime = rt.enter();
    let fs = Arc::new(KerFs::new(
        client,
        FsConfig {
            attr_ttl: plan.options.attr_timeout,
            entry_ttl: plan.options.entry_timeout,
            default_permissions: plan.options.default_permissions,
        },
        root.ino,
    ));
    let fuser_config = plan.options.fuser_config(&plan.meta_addrs);
    let fuse_fs = FuseFs::new(fs, rt.handle().clone());
    let mut session = fuser::Session::new(fuse_fs, &plan.mountpoint, &fuser_config)
        .with_context(|| format!("mounting on {}", plan.mountpoint.display()))?;
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    let mountpoint = plan.mountpoint.clone();
    rt.spawn(unmount_on_signal(unmounter, mountpoint));

    if let Some(ready) = ready {
        detach_stdio(plan.options.log_file.as_deref())?;
        if let Some(mut pipe) = ready.take() {
            pipe.write_all(b"ok").context("telling the parent")?;
        }
    }
    info!(mountpoint = %plan.mountpoint.display(), cluster = %plan.meta_addrs, "mounted");
    let result = session.run();
    info!("unmounted");
    rt.shutdown_timeout(Duration::from_secs(2));
    result.context("FUSE session")
}

/// SIGTERM, SIGINT or SIGHUP unmount the filesystem, which ends the session loop. A busy
/// mount is detached lazily (the kernel finishes it once the last user lets go).
async fn unmount_on_signal(unmounter: Arc<Mutex<fuser::SessionUnmounter>>, mountpoint: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers; unmount with umount or fusermount3 -u");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
    info!(mountpoint = %mountpoint.display(), "signal received: unmounting");
    let result = tokio::task::spawn_blocking(move || {
        let mut u = unmounter.lock().unwrap_or_else(|p| p.into_inner());
        u.unmount()
    })
    .await;
    if !matches!(result, Ok(Ok(()))) {
        lazy_unmount(&mountpoint);
    }
}

fn lazy_unmount(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: path is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        warn!(
            mountpoint = %mountpoint.display(),
            error = %std::io::Error::last_os_error(),
            "cannot unmount"
        );
    }
}
