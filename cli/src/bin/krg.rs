//! `krg`: checkpoint, restart and migrate processes with kerfs-ghost.
//!
//! `krg run` starts a program in its own PID namespace so that its PID can be taken back at
//! restart; `krg restart` and `krg listen` likewise import every process into a fresh PID
//! namespace, whose init is a small reaper forked from krg.
//!
//! Checkpoints go to a local FILE or to a checkpoint store in the cluster
//! (`kerfs:/ckpt/myapp`, see kerfs-ckpt), written through the client library; `krg ls`,
//! `krg rm` and `krg gc` manage a store's versions. `krg ipc checkpoint|restart` does the same
//! for System V IPC objects (kerfs_ghost::ipc), which `krg checkpoint --ipc` also stores in
//! the version of a process. Cluster work runs on a tokio runtime
//! while ptrace stays on the main thread; before krg forks a PID namespace init the runtime
//! is shut down, so the fork happens in a single-threaded process.

use std::os::fd::RawFd;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kerfs_ckpt::{Retention, Store, StoreAddr};
use kerfs_client::{DataClient, MetaClient, MetaClientConfig};
use kerfs_ghost as ghost;
use kerfs_ghost::ipc::{IpcKind, IpcRef, SysvObject};

#[derive(Parser)]
#[command(
    name = "krg",
    version,
    about = "Checkpoint, restart and migrate processes (ghost processes)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in its own PID namespace so that it can be checkpointed and restarted with the
    /// same PID. Waits for it and exits with its status. CMD gets stdin/stdout/stderr only.
    Run {
        /// Register the command under this application name (`krg checkpoint --app NAME`).
        #[arg(long)]
        app: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true)]
        cmd: Vec<String>,
    },
    /// Write the ghost image of a running process to a file or a checkpoint store
    /// (kerfs:/PATH, a new version). Refused, with the process left running, if a restart
    /// could not rebuild something it holds (see --drop and --external for fds).
    Checkpoint {
        /// PID (as seen from here).
        #[arg(required_unless_present = "app", conflicts_with = "app")]
        pid: Option<i32>,
        /// The application started with `krg run --app NAME` (default store kerfs:/ckpt/NAME).
        #[arg(long)]
        app: Option<String>,
        /// Image file, or checkpoint store kerfs:/PATH.
        #[arg(long, required_unless_present = "app")]
        to: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Copy the regular files the process has open into the version (not those on a
        /// KerFS mount, which every node sees); a restart puts them back.
        #[arg(long)]
        copy_files: bool,
        /// After each checkpoint, keep only the last N versions (and GC their packs).
        #[arg(long)]
        keep_last: Option<usize>,
        /// Checkpoint again every DURATION (30s, 5m...) until the process exits.
        #[arg(long, value_parser = kerfs_ckpt::parse_duration)]
        periodic: Option<std::time::Duration>,
        /// Do not track the process's writes. By default a checkpoint into a store leaves a
        /// userfaultfd in the process (at a high descriptor number) so that the next
        /// checkpoint reads only the pages written since this one.
        #[arg(long)]
        no_track_writes: bool,
        /// Leave the process running afterwards (default).
        #[arg(long, group = "after")]
        leave_running: bool,
        /// Leave it stopped (SIGSTOP); `krg unfreeze PID` resumes it.
        #[arg(long, group = "after")]
        stop: bool,
        /// Kill it once the image is safely written.
        #[arg(long, group = "after")]
        kill: bool,
        #[command(flatten)]
        fds: FdArgs,
        /// Also store these System V IPC objects in the version, captured while the process
        /// is stopped: m:ID (message queue), s:ID (semaphore array), M:ID (shared memory
        /// segment), comma-separated or repeated. `krg restart` of the version creates them
        /// again (same keys and ids) before the process. Needs a kerfs:/PATH destination.
        #[arg(long = "ipc", value_name = "m:ID,s:ID,M:ID", value_delimiter = ',')]
        ipc: Vec<IpcRef>,
    },
    /// Restart a process from an image, in a fresh PID namespace with its old PID. The
    /// System V IPC objects of a version (`krg checkpoint --ipc`) are created first; the
    /// restart is refused, with nothing created, if their keys or ids are taken.
    Restart {
        /// Image file, or kerfs:/PATH[@VERSION] (latest version by default).
        file: String,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Return once the process runs instead of waiting for it to exit.
        #[arg(long)]
        detach: bool,
        /// Hand one of krg's own open fds to the restored process: IMAGE_FD=KRG_FD, or FD for
        /// the same number on both sides (e.g. `krg restart IMG --inherit-fd 5 5<>FILE`).
        /// Required for every fd checkpointed with --external; replaces any other fd.
        /// Repeatable.
        #[arg(long = "inherit-fd", value_name = "IMAGE_FD[=KRG_FD]", value_parser = parse_inherit)]
        inherit_fd: Vec<(i32, RawFd)>,
    },
    /// Receive migrating processes (`krg migrate`) and run them here.
    Listen {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7411")]
        addr: String,
    },
    /// Move a process to the `krg listen` at HOST:PORT; it is killed here once it runs there.
    Migrate {
        /// PID (as seen from here).
        pid: i32,
        /// Receiving `krg listen`.
        dest: String,
        /// Restore fd FD as /dev/null on the receiver instead of refusing the migration
        /// because of it. Repeatable.
        #[arg(long = "drop", value_name = "FD")]
        drop: Vec<i32>,
    },
    /// List the versions of a checkpoint store.
    Ls {
        /// kerfs:/PATH
        store: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Remove one version of a checkpoint store (its pages go at the next `krg gc`).
    Rm {
        /// kerfs:/PATH@VERSION
        version: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Apply retention rules, then delete pages no version needs and leftovers of killed
    /// checkpoints. Safe while a checkpoint is being written.
    Gc {
        /// kerfs:/PATH
        store: String,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Keep the newest N versions.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Keep versions whose number is a multiple of K.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Remove versions older than this (30m, 12h, 7d...); the newest is always kept.
        #[arg(long, value_parser = kerfs_ckpt::parse_duration)]
        max_age: Option<std::time::Duration>,
    },
    /// Checkpoint and restart System V IPC objects (message queues, semaphore arrays, shared
    /// memory segments) with their keys, ids, owners, modes and contents.
    Ipc {
        #[command(subcommand)]
        cmd: IpcCmd,
    },
    /// Stop a process (SIGSTOP) and wait until it is stopped.
    Freeze {
        /// PID.
        pid: i32,
    },
    /// Resume a process stopped by `krg freeze`.
    Unfreeze {
        /// PID.
        pid: i32,
    },
}

/// `krg ipc ...`
#[derive(Subcommand)]
enum IpcCmd {
    /// Save System V IPC objects to an image file or to a new version of a checkpoint store
    /// (kerfs:/PATH), leaving them as they are: messages are copied, not received. Give
    /// several -m/-s/-M to save several objects together. Stop the processes using them
    /// first (`krg freeze`) for a consistent picture. SEM_UNDO adjustments belong to the
    /// processes that made them and are not saved here.
    #[command(
        after_help = "Example: krg ipc checkpoint -m 32768 -s 5 -M 98305 --to kerfs:/ckpt/ipc
         krg ipc restart kerfs:/ckpt/ipc"
    )]
    Checkpoint {
        /// A message queue: every message, in order, with its type; its msg_qbytes. Repeatable.
        #[arg(short = 'm', long = "msg", value_name = "ID", value_parser = clap::value_parser!(i32).range(0..))]
        msg: Vec<i32>,
        /// A semaphore array: its values. Repeatable.
        #[arg(short = 's', long = "sem", value_name = "ID", value_parser = clap::value_parser!(i32).range(0..))]
        sem: Vec<i32>,
        /// A shared memory segment: its size and contents (pages in memory that are not all
        /// zero). Repeatable.
        #[arg(short = 'M', long = "shm", value_name = "ID", value_parser = clap::value_parser!(i32).range(0..))]
        shm: Vec<i32>,
        /// Image file, or checkpoint store kerfs:/PATH (a new version).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Create the objects of an image file or a store version again, with the same keys,
    /// ids, owners (uid/gid), modes and contents (needs root: ids are chosen through
    /// /proc/sys/kernel/*_next_id). Refused, with nothing created, if an object with one of
    /// their keys or ids exists, or if the image is damaged.
    Restart {
        /// Image file, or kerfs:/PATH[@VERSION] (latest version by default).
        from: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// How to reach the cluster for kerfs: stores.
#[derive(Args, Clone, Default)]
struct ClusterArgs {
    /// Metadata nodes HOST:PORT[,...] (default: $KERFS_META, then `meta` in
    /// ~/.config/kerfs/kerfs.toml or /etc/kerfs/kerfs.toml).
    #[arg(long)]
    meta: Option<String>,
    /// Cluster key file (default: $KERFS_KEY_FILE, then the standard place).
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

/// What to do with fds a restart could not rebuild (otherwise the checkpoint is refused).
#[derive(Args, Clone, Default)]
struct FdArgs {
    /// Restore fd FD as /dev/null (same number and access mode) instead of refusing the
    /// checkpoint because of it. Repeatable.
    #[arg(long = "drop", value_name = "FD")]
    drop: Vec<i32>,
    /// Record fd FD as external: `krg restart --inherit-fd FD=YOUR_FD` must hand one in
    /// (a restart without it is refused). Repeatable.
    #[arg(long = "external", value_name = "FD")]
    external: Vec<i32>,
}

impl FdArgs {
    fn policy(&self) -> Result<ghost::FdPolicy> {
        let mut p = ghost::FdPolicy::new();
        for &fd in &self.drop {
            p.choose(fd, ghost::FdChoice::DevNull)?;
        }
        for &fd in &self.external {
            p.choose(fd, ghost::FdChoice::External)?;
        }
        Ok(p)
    }
}

fn parse_inherit(s: &str) -> Result<(i32, RawFd), String> {
    let (a, b) = s.split_once('=').unwrap_or((s, s));
    let fd = |x: &str| {
        x.parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            format!("expected IMAGE_FD=KRG_FD or FD, got {s}: {x} is not an fd number")
        })
    };
    Ok((fd(a)?, fd(b)?))
}

fn main() {
    kerfs_cli::init_logging("warn");
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("krg: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Run { app, cmd } => cmd_run(&cmd, app.as_deref()),
        Cmd::Checkpoint {
            pid,
            app,
            to,
            cluster,
            copy_files,
            keep_last,
            periodic,
            no_track_writes,
            leave_running: _,
            stop,
            kill,
            fds,
            ipc,
        } => {
            let after = if kill {
                ghost::After::Kill
            } else if stop {
                ghost::After::Stop
            } else {
                ghost::After::LeaveRunning
            };
            let pid = match (pid, &app) {
                (Some(p), _) => p,
                (None, Some(name)) => app_pid(name)?,
                (None, None) => bail!("give a PID or --app NAME"),
            };
            let to = match (to, &app) {
                (Some(t), _) => t,
                (None, Some(name)) => format!("kerfs:/ckpt/{name}"),
                (None, None) => bail!("give --to FILE or --to kerfs:/PATH"),
            };
            if !ipc.is_empty() && !to.starts_with("kerfs:") {
                bail!("--ipc needs a kerfs:/PATH destination (an image file holds one process); save the objects beside it with `krg ipc checkpoint ... --to FILE`");
            }
            let fds = fds.policy()?;
            // Refused before any file, version or freeze is made; the export decides again
            // on the frozen process (the authoritative check).
            ghost::check_restorable(pid, &fds)?;
            ghost::ipc::check_capture(&ipc)?;
            if to.starts_with("kerfs:") {
                let job = StoreCheckpoint {
                    pid,
                    addr: StoreAddr::parse(&to)?,
                    after,
                    copy_files,
                    keep_last,
                    periodic,
                    track_writes: !no_track_writes,
                    fds,
                    ipc,
                };
                return cmd_checkpoint_store(&job, &cluster);
            }
            if copy_files || keep_last.is_some() || periodic.is_some() {
                bail!("--copy-files, --keep-last and --periodic need a kerfs:/PATH destination");
            }
            let t = Instant::now();
            let mut w = ghost::FileWriter::create(&to)?;
            let rep = ghost::export_process(
                pid,
                &ghost::ExportOptions {
                    after,
                    fds,
                    ..Default::default()
                },
                &mut w,
            )
            .with_context(|| {
                format!("checkpoint of pid {pid} to {to} failed (the process was left running)")
            })?;
            eprintln!(
                "krg: checkpointed pid {pid} to {to}: {:.1} MiB ({:.1} MiB of pages, {} mappings) in {:.3} s",
                rep.image_bytes as f64 / 1048576.0,
                rep.page_bytes as f64 / 1048576.0,
                rep.mappings,
                t.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Cmd::Restart {
            file,
            cluster,
            detach,
            inherit_fd,
        } => {
            let (images, ipc, source) = if file.starts_with("kerfs:") {
                load_from_store(&StoreAddr::parse(&file)?, &cluster)?
            } else {
                let mut r = ghost::FileReader::open(&file)?;
                let img = ghost::load_image(&mut r)
                    .with_context(|| format!("cannot restart from {file}"))?;
                (vec![img], Vec::new(), file.clone())
            };
            cmd_restart(&images, &ipc, &source, detach, inherit_fd)
        }
        Cmd::Ls { store, cluster } => cmd_ls(&StoreAddr::parse(&store)?, &cluster),
        Cmd::Rm { version, cluster } => {
            let addr = StoreAddr::parse(&version)?;
            let Some(v) = addr.version else {
                bail!("name the version to remove: {version}@VERSION (see `krg ls {version}`)");
            };
            let rt = runtime()?;
            rt.block_on(async {
                let store = open_store(&cluster, &addr.path, false).await?;
                store.remove_version(v).await?;
                eprintln!(
                    "krg: removed {}@{v} (its pages go at the next `krg gc`)",
                    store.addr()
                );
                Ok(0)
            })
        }
        Cmd::Gc {
            store,
            cluster,
            keep_last,
            keep_every,
            max_age,
        } => {
            let addr = StoreAddr::parse(&store)?;
            let retention = Retention {
                keep_last,
                keep_every,
                max_age,
            };
            let rt = runtime()?;
            rt.block_on(async {
                let store = open_store(&cluster, &addr.path, false).await?;
                let rep = store.gc(&retention).await?;
                print_gc(&store, &rep);
                Ok(0)
            })
        }
        Cmd::Listen { addr } => cmd_listen(&addr),
        Cmd::Migrate { pid, dest, drop } => {
            // `krg listen` has no fds to hand in: only --drop makes sense here.
            let fds = FdArgs {
                drop,
                external: Vec::new(),
            }
            .policy()?;
            cmd_migrate(pid, &dest, fds)
        }
        Cmd::Ipc {
            cmd:
                IpcCmd::Checkpoint {
                    msg,
                    sem,
                    shm,
                    to,
                    cluster,
                },
        } => {
            let refs: Vec<IpcRef> = [
                (IpcKind::Msg, msg),
                (IpcKind::Sem, sem),
                (IpcKind::Shm, shm),
            ]
            .into_iter()
            .flat_map(|(kind, ids)| ids.into_iter().map(move |id| IpcRef { kind, id }))
            .collect();
            cmd_ipc_checkpoint(&refs, &to, &cluster)
        }
        Cmd::Ipc {
            cmd: IpcCmd::Restart { from, cluster },
        } => cmd_ipc_restart(&from, &cluster),
        Cmd::Freeze { pid } => {
            ghost::freeze(pid).with_context(|| format!("freezing pid {pid}"))?;
            Ok(0)
        }
        Cmd::Unfreeze { pid } => {
            ghost::unfreeze(pid).with_context(|| format!("unfreezing pid {pid}"))?;
            Ok(0)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Connects to the cluster and opens the store at `path`.
async fn open_store(cluster: &ClusterArgs, path: &str, create: bool) -> Result<Store> {
    let addrs = kerfs_cli::meta_addrs(cluster.meta.as_deref())?;
    let key = kerfs_cli::client_key(cluster.key_file.as_deref())?;
    let mut config = MetaClientConfig::new(addrs, key);
    config.description = format!("krg pid {}", std::process::id());
    let meta = MetaClient::connect(config)
        .await
        .context("connecting to the KerFS metadata service")?;
    Ok(Store::open(DataClient::new(meta), path, create).await?)
}

/// A byte-counting progress bar on stderr when it is a terminal.
fn progress(what: &str) -> Option<indicatif::ProgressBar> {
    kerfs_cli::progress_bar(
        what,
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
}

/// What `krg checkpoint ... --to kerfs:` was asked to do.
struct StoreCheckpoint {
    pid: i32,
    addr: StoreAddr,
    after: ghost::After,
    copy_files: bool,
    keep_last: Option<usize>,
    periodic: Option<std::time::Duration>,
    track_writes: bool,
    fds: ghost::FdPolicy,
    ipc: Vec<IpcRef>,
}

fn cmd_checkpoint_store(job: &StoreCheckpoint, cluster: &ClusterArgs) -> Result<i32> {
    if job.addr.version.is_some() {
        bail!(
            "a checkpoint makes a new version: give kerfs:{} without @VERSION",
            job.addr.path
        );
    }
    let rt = runtime()?;
    let store = rt.block_on(open_store(cluster, &job.addr.path, true))?;
    let exited = || {
        eprintln!("krg: pid {} exited; periodic checkpoints stop", job.pid);
        Ok(0)
    };
    loop {
        if let Err(e) = checkpoint_once(&rt, &store, job) {
            if job.periodic.is_some() && !process_alive(job.pid) {
                return exited();
            }
            return Err(e);
        }
        if let Some(n) = job.keep_last {
            let rep = rt.block_on(store.gc(&Retention {
                keep_last: Some(n),
                ..Default::default()
            }))?;
            print_gc(&store, &rep);
        }
        let Some(every) = job.periodic else {
            return Ok(0);
        };
        let deadline = Instant::now() + every;
        loop {
            if !process_alive(job.pid) {
                return exited();
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z") && !s.contains(") X"))
        .unwrap_or(false)
}

/// Regular files `pid` has open that are not on a KerFS mount (those need no copy: every
/// node sees the same cluster namespace).
fn files_to_copy(pid: i32) -> Result<Vec<std::path::PathBuf>> {
    let kerfs_mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("fuse.kerfs")
                .then(|| left.split_whitespace().nth(4).map(str::to_string))
                .flatten()
        })
        .collect();
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(target) = std::fs::read_link(e?.path()) else {
            continue;
        };
        let is_file = std::fs::metadata(&target).is_ok_and(|m| m.is_file());
        let on_kerfs = kerfs_mounts
            .iter()
            .any(|m| target.starts_with(m) && m != "/");
        if is_file && !on_kerfs && !out.contains(&target) {
            out.push(target);
        }
    }
    Ok(out)
}

fn checkpoint_once(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    job: &StoreCheckpoint,
) -> Result<()> {
    let pid = job.pid;
    let t = Instant::now();
    let files = if job.copy_files {
        files_to_copy(pid)?
    } else {
        Vec::new()
    };
    let mut ck = rt.block_on(store.begin_checkpoint())?;
    let version = ck.version();
    let tracking = job.track_writes.then(|| TrackingState::open(pid)).flatten();
    // Taken (removed) before the export: if this checkpoint is not committed, the next one
    // must not build on write tracking that was re-armed for it.
    let base = match &tracking {
        Some(state) => match state.take(&store.addr()) {
            Some((v, b)) if rt.block_on(ck.reuse_base(v, pid))? => Some(b),
            _ => None,
        },
        None => None,
    };
    // A checkpoint-and-kill stops the process and kills it only once the version is
    // committed: if anything fails before, it is resumed. Files are copied and IPC objects
    // captured while the process is stopped, so they match the memory image (file offsets
    // included).
    let export_after = match job.after {
        ghost::After::Kill => ghost::After::Stop,
        ghost::After::LeaveRunning if job.copy_files || !job.ipc.is_empty() => ghost::After::Stop,
        a => a,
    };
    let stopped_by_us = export_after == ghost::After::Stop && job.after != ghost::After::Stop;
    let pb = progress(&format!("checkpoint pid {pid}"));
    let (mut sink, task) = ck.image_sink(rt.handle(), pb.clone())?;
    let exported = ghost::export_process(
        pid,
        &ghost::ExportOptions {
            after: export_after,
            // A process killed after its checkpoint has no next one to prepare for.
            track_writes: tracking.is_some() && job.after != ghost::After::Kill,
            base,
            fds: job.fds.clone(),
        },
        &mut sink,
    );
    drop(sink);
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let added = rt.block_on(ck.add_image(task));
    let resume = || {
        if stopped_by_us {
            // SAFETY: plain kill(2) on the process we stopped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    };
    let rep = match (exported, added) {
        (Ok(rep), Ok(())) => rep,
        (Err(e), _) => {
            rt.block_on(ck.abort());
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "checkpoint of pid {pid} to {}@{version} failed (the process was left running)",
                    store.addr()
                )
            });
        }
        (Ok(_), Err(e)) => {
            rt.block_on(ck.abort());
            resume();
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "checkpoint of pid {pid} to {}@{version} failed; nothing was published",
                    store.addr()
                )
            });
        }
    };
    for f in &files {
        if let Err(e) = rt.block_on(ck.copy_file(f)) {
            rt.block_on(ck.abort());
            resume();
            return Err(anyhow!(e)).context("--copy-files failed; nothing was published");
        }
    }
    if !job.ipc.is_empty() {
        let stored = match ghost::ipc::capture_all(&job.ipc) {
            Ok(objs) => rt.block_on(ck.add_ipc(&objs)).map_err(anyhow::Error::from),
            Err(e) => Err(anyhow!(e)),
        };
        if let Err(e) = stored {
            rt.block_on(ck.abort());
            resume();
            return Err(e)
                .context("--ipc failed; nothing was published (the process was left running)");
        }
    }
    if job.after == ghost::After::LeaveRunning {
        // Memory and files are captured: the process may go on while the version commits.
        resume();
    }
    let commit = match rt.block_on(ck.commit()) {
        Ok(c) => c,
        Err(e) => {
            resume();
            return Err(anyhow!(e)).with_context(|| {
                format!("checkpoint of pid {pid} to {} was not published (the process was left running)", store.addr())
            });
        }
    };
    if job.after == ghost::After::Kill {
        // SAFETY: plain kill(2); the version holding the process is committed.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(why) = &rep.tracking_failed {
        eprintln!("krg: note: write tracking of pid {pid} is off ({why}); the next checkpoint reads all its memory");
    }
    if let (Some(state), Some(tracked)) = (&tracking, &rep.tracked) {
        state.save(&store.addr(), commit.version, tracked);
    }
    let s = commit.stats;
    eprintln!(
        "krg: checkpointed pid {pid} to {}@{}: image {:.1} MiB, {:.1} MiB read, {:.1} MiB unchanged since the last version, {:.1} MiB new, {} pages deduplicated, {} zero pages, dedup {:.1}x, {} files copied, {} System V IPC objects, in {:.3} s",
        store.addr(),
        commit.version,
        rep.image_bytes as f64 / 1048576.0,
        rep.read_bytes as f64 / 1048576.0,
        rep.reused_bytes as f64 / 1048576.0,
        s.new_bytes as f64 / 1048576.0,
        s.dedup_pages,
        s.zero_pages,
        s.dedup_ratio(),
        files.len(),
        job.ipc.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What write tracking needs between two checkpoints of a process into a store: which version
/// the pages recorded in the base belong to. One file per process incarnation (PID and start
/// time) under the runtime directory; it only lives on the node the process runs on, like the
/// userfaultfd it goes with. Every export re-arms the tracking, so a checkpoint holds the
/// file's lock from taking the base to saving the next one: a checkpoint of the same process
/// into another store in between would otherwise leave a base whose changes nobody saw.
struct TrackingState {
    path: std::path::PathBuf,
    _lock: std::fs::File,
}

impl TrackingState {
    /// Locks the state of `pid` (waiting for another checkpoint of it), after removing the
    /// state of processes that are gone. `None` if the runtime directory is not usable.
    fn open(pid: i32) -> Option<TrackingState> {
        use std::os::fd::AsRawFd;
        let dir = run_dir("krg-track");
        std::fs::create_dir_all(&dir).ok()?;
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.trim_end_matches(".lock");
            let live = key
                .split_once('-')
                .and_then(|(p, _)| p.parse().ok())
                .and_then(Self::key)
                .is_some_and(|k| k == key);
            if !live {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let key = Self::key(pid)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{key}.lock")))
            .ok()?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return None;
        }
        Some(TrackingState {
            path: dir.join(key),
            _lock: lock,
        })
    }

    /// "PID-STARTTIME" of a live process.
    fn key(pid: i32) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_comm = stat.rsplit_once(") ")?.1;
        // Field 22 (start time); fields after the comm are numbered from 3.
        let start = after_comm.split_whitespace().nth(19)?;
        Some(format!("{pid}-{start}"))
    }

    /// Removes the state and returns (version, base) if it belongs to store `addr`.
    fn take(&self, addr: &str) -> Option<(u64, ghost::TrackBase)> {
        let bytes = std::fs::read(&self.path).ok()?;
        let _ = std::fs::remove_file(&self.path);
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&bytes[..nl]).ok()?;
        let (a, v) = line.rsplit_once(' ')?;
        if a != addr {
            return None;
        }
        Some((v.parse().ok()?, ghost::TrackBase::decode(&bytes[nl + 1..])?))
    }

    /// Records that `base` is version `version` of store `addr`. Losing it only costs the
    /// next checkpoint a full read, so a failure is a note, not an error.
    fn save(&self, addr: &str, version: u64, base: &ghost::TrackBase) {
        let mut bytes = format!("{addr} {version}\n").into_bytes();
        bytes.extend_from_slice(&base.encode());
        if let Err(e) = std::fs::write(&self.path, &bytes) {
            eprintln!(
                "krg: note: cannot record write tracking in {} ({e}); the next checkpoint reads all memory",
                self.path.display()
            );
        }
    }
}

/// Loads every process image and System V IPC object of a version (and puts its copied files
/// back).
fn load_from_store(
    addr: &StoreAddr,
    cluster: &ClusterArgs,
) -> Result<(Vec<ghost::LoadedImage>, Vec<SysvObject>, String)> {
    let rt = runtime()?;
    let res = (|| {
        let store = rt.block_on(open_store(cluster, &addr.path, false))?;
        let version = rt.block_on(store.open_version(addr.version))?;
        let source = format!("{}@{}", store.addr(), version.version());
        if version.manifest.processes.is_empty() && !version.manifest.ipc.is_empty() {
            bail!(
                "{source} holds no process, only {} System V IPC objects: restore them with `krg ipc restart {source}`",
                version.manifest.ipc.len()
            );
        }
        let ipc = rt
            .block_on(version.ipc_objects())
            .with_context(|| format!("cannot restart from {source}"))?;
        rt.block_on(version.restore_files())?;
        let mut images = Vec::new();
        for i in 0..version.manifest.processes.len() {
            let pb = progress(&format!("restore {source}"));
            let mut r = version.reader(i, rt.handle(), pb.clone());
            // The ghost error quotes the store's message and also chains it as its source:
            // flattened to one level so that `{:#}` does not print it twice.
            let img = ghost::load_image(&mut r)
                .map_err(|e| anyhow!(e.to_string()))
                .with_context(|| format!("cannot restart from {source}"));
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            images.push(img?);
        }
        rt.block_on(version.close());
        if images.is_empty() {
            bail!("{source} holds no process");
        }
        Ok((images, ipc, source))
    })();
    // The restart forks a PID namespace init next: no runtime thread may be left.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    res
}

fn cmd_ls(addr: &StoreAddr, cluster: &ClusterArgs) -> Result<i32> {
    let rt = runtime()?;
    rt.block_on(async {
        let store = open_store(cluster, &addr.path, false).await?;
        let versions = store.versions().await?;
        let packs = store.pack_bytes().await?;
        println!(
            "{:>7}  {:<19}  {:>5}  {:>4}  {:>10}  {:>10}  {:>10}  {:>6}  {:>8}",
            "VERSION",
            "CREATED (UTC)",
            "PROCS",
            "IPC",
            "IMAGE MiB",
            "READ MiB",
            "NEW MiB",
            "DEDUP",
            "TIME s"
        );
        for v in &versions {
            println!(
                "{:>7}  {:<19}  {:>5}  {:>4}  {:>10.1}  {:>10.1}  {:>10.1}  {:>5.1}x  {:>8.3}",
                v.version,
                utc(v.created_unix_ms),
                v.processes,
                v.ipc_objects,
                v.stats.image_bytes as f64 / 1048576.0,
                v.stats.read_bytes() as f64 / 1048576.0,
                v.stats.new_bytes as f64 / 1048576.0,
                v.stats.dedup_ratio(),
                v.stats.elapsed_ms as f64 / 1000.0
            );
        }
        let logical: u64 = versions.iter().map(|v| v.stats.image_bytes).sum();
        println!(
            "{} versions, {:.1} MiB of images stored in {:.1} MiB of packs ({:.1}x)",
            versions.len(),
            logical as f64 / 1048576.0,
            packs as f64 / 1048576.0,
            logical as f64 / packs.max(1) as f64
        );
        Ok(0)
    })
}

fn print_gc(store: &Store, rep: &kerfs_ckpt::GcReport) {
    eprintln!(
        "krg: gc {}: removed versions {:?}, {} packs ({:.1} MiB), {} partial versions, {} stale writer markers",
        store.addr(),
        rep.removed_versions,
        rep.removed_packs.len(),
        rep.freed_bytes as f64 / 1048576.0,
        rep.removed_partials.len(),
        rep.stale_writers.len()
    );
    if !rep.live_writers.is_empty() {
        eprintln!(
            "krg: gc {}: {} checkpoint(s) being written ({}): no pack and no partial version deleted; run gc again later",
            store.addr(),
            rep.live_writers.len(),
            rep.live_writers.join(", ")
        );
    }
}

/// "YYYY-MM-DD HH:MM:SS" of a UTC time in ms since the epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// krg's directory `sub` for per-node runtime state: under $XDG_RUNTIME_DIR for a user,
/// /run/kerfs for root.
fn run_dir(sub: &str) -> std::path::PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        // SAFETY: geteuid has no preconditions.
        Some(d) if unsafe { libc::geteuid() } != 0 && !d.is_empty() => {
            std::path::Path::new(&d).join("kerfs").join(sub)
        }
        _ => std::path::Path::new("/run/kerfs").join(sub),
    }
}

/// Directory of the files recording the root PID of `krg run --app` applications.
fn apps_dir() -> std::path::PathBuf {
    run_dir("krg-apps")
}

/// The root PID of application `name`.
fn app_pid(name: &str) -> Result<i32> {
    let file = apps_dir().join(name);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "no application {name:?} is registered ({} missing): start it with `krg run --app {name} -- CMD`",
            file.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a PID", file.display()))?;
    if !process_alive(pid) {
        bail!(
            "application {name:?} (pid {pid}, from {}) is no longer running",
            file.display()
        );
    }
    Ok(pid)
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Makes krg's next child the init of a new PID namespace. Repeated calls work because
/// pid_ns_for_children is first reset to our own namespace.
fn new_pid_namespace() -> Result<()> {
    let own = std::fs::File::open("/proc/self/ns/pid").context("opening /proc/self/ns/pid")?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns/unshare on valid arguments; they affect only this thread's future children.
    unsafe {
        if libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) != 0 {
            bail!(
                "setns to our own PID namespace failed: {} (krg needs root)",
                errno()
            );
        }
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            bail!("unshare(CLONE_NEWPID) failed: {} (krg needs root)", errno());
        }
    }
    Ok(())
}

/// Forks the init of the new namespace. It reaps whatever is reparented to it and exits once
/// its namespace, after having had a process, is empty (kill(-1, 0) from a namespace's init
/// reaches exactly the other processes of that namespace).
fn spawn_ns_init() -> Result<i32> {
    // SAFETY: krg is single-threaded, so fork is safe.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", errno());
    }
    if pid == 0 {
        // SAFETY: raw fd and process calls in the forked init; nothing here can unwind.
        unsafe {
            // Holding krg's stdout/stderr would keep pipes to krg's caller open forever.
            libc::close_range(0, u32::MAX, 0);
            for _ in 0..3 {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            }
            let mut populated = false;
            loop {
                let mut st = 0;
                while libc::waitpid(-1, &mut st, libc::WNOHANG) > 0 {}
                if libc::kill(-1, 0) == 0 {
                    populated = true;
                } else if populated {
                    libc::_exit(0);
                }
                libc::usleep(50_000);
            }
        }
    }
    Ok(pid)
}

fn wait_status(pid: i32) -> Result<i32> {
    let mut st = 0;
    loop {
        // SAFETY: plain waitpid.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            break;
        }
        if errno().raw_os_error() != Some(libc::EINTR) {
            bail!("waitpid {pid}: {}", errno());
        }
    }
    Ok(if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    })
}

fn cmd_run(cmd: &[String], app: Option<&str>) -> Result<i32> {
    let args: Vec<std::ffi::CString> = cmd
        .iter()
        .map(|a| std::ffi::CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .context("argument contains a NUL byte")?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    new_pid_namespace()?;
    // SAFETY: krg is single-threaded here.
    let init = unsafe { libc::fork() };
    if init < 0 {
        bail!("fork failed: {}", errno());
    }
    if init == 0 {
        // PID 1 of the new namespace: run the command as PID 2 and reap everything.
        // SAFETY: single-threaded child.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // Only stdio is passed on: inherited pipes and sockets above 2 could not be
            // restored, and would make every checkpoint of the command unrestartable.
            // SAFETY: close_range and execvp on valid arguments; argv is NULL-terminated.
            unsafe {
                libc::close_range(3, u32::MAX, 0);
                libc::execvp(argv[0], argv.as_ptr());
            }
            eprintln!("krg: cannot run {}: {}", cmd[0], errno());
            // SAFETY: plain _exit.
            unsafe { libc::_exit(127) };
        }
        loop {
            let mut st = 0;
            // SAFETY: plain waitpid.
            let r = unsafe { libc::waitpid(-1, &mut st, 0) };
            if r == child || r < 0 {
                let code = if r < 0 {
                    1
                } else if libc::WIFEXITED(st) {
                    libc::WEXITSTATUS(st)
                } else {
                    128 + libc::WTERMSIG(st)
                };
                // SAFETY: plain _exit.
                unsafe { libc::_exit(code) };
            }
        }
    }
    let mut host_pid = 0;
    for _ in 0..500 {
        let s = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .unwrap_or_default();
        if let Some(p) = s.split_whitespace().next().and_then(|p| p.parse().ok()) {
            host_pid = p;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!(
        "krg: {} runs as pid {host_pid} (pid 2 in its own PID namespace)",
        cmd[0]
    );
    let registered = match app {
        Some(name) => {
            if name.is_empty() || name.contains('/') {
                bail!("application name {name:?} must be non-empty and contain no '/'");
            }
            let dir = apps_dir();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let file = dir.join(name);
            std::fs::write(&file, format!("{host_pid}\n"))
                .with_context(|| format!("registering the application in {}", file.display()))?;
            Some(file)
        }
        None => None,
    };
    let status = wait_status(init);
    if let Some(file) = registered {
        let _ = std::fs::remove_file(file);
    }
    status
}

fn cmd_restart(
    images: &[ghost::LoadedImage],
    ipc: &[SysvObject],
    file: &str,
    detach: bool,
    inherit: Vec<(i32, RawFd)>,
) -> Result<i32> {
    let [img] = images else {
        bail!(
            "{file} holds {} processes; restarting several processes together is not supported yet",
            images.len()
        );
    };
    let opts = ghost::ImportOptions {
        pid: ghost::PidChoice::Same,
        inherit_fds: inherit,
        stdio_fallback: true,
    };
    // Before the namespace init is forked: a restart that cannot succeed creates nothing.
    ghost::check_import(img, &opts).with_context(|| format!("cannot restart from {file}"))?;
    ghost::ipc::check_restore(ipc).with_context(|| format!("cannot restart from {file}"))?;
    // The IPC objects exist before the process that uses them runs; they go again if it
    // cannot be restored.
    let made = ghost::ipc::restore(ipc).with_context(|| format!("cannot restart from {file}"))?;
    let undo = |e: anyhow::Error| {
        ghost::ipc::remove_all(&made);
        if made.is_empty() {
            e
        } else {
            e.context("the System V IPC objects this restart had created were removed")
        }
    };
    new_pid_namespace().map_err(undo)?;
    let init = spawn_ns_init().map_err(undo)?;
    let rep = match ghost::import_image(img, &opts) {
        Ok(rep) => rep,
        Err(e) => {
            kill_and_reap(init);
            return Err(undo(
                anyhow!(e).context(format!("restart from {file} failed")),
            ));
        }
    };
    for o in ipc {
        eprintln!("krg: restored {}: {}", o.describe(), o.summary());
    }
    eprintln!(
        "krg: restored {} as pid {} (pid {} in its own PID namespace)",
        img.meta.comm, rep.pid, rep.image_pid
    );
    if detach {
        return Ok(0);
    }
    let code = wait_status(rep.pid)?;
    kill_and_reap(init);
    Ok(code)
}

/// `krg ipc checkpoint`.
fn cmd_ipc_checkpoint(refs: &[IpcRef], to: &str, cluster: &ClusterArgs) -> Result<i32> {
    if refs.is_empty() {
        bail!("name the objects to save: -m ID (message queue), -s ID (semaphore array), -M ID (shared memory segment); `ipcs` lists them");
    }
    let t = Instant::now();
    // Refused before a version is claimed or a file written.
    ghost::ipc::check_capture(refs)?;
    let show = |objs: &[SysvObject]| {
        for o in objs {
            eprintln!("krg: saved {}: {}", o.describe(), o.summary());
        }
    };
    if to.starts_with("kerfs:") {
        let addr = StoreAddr::parse(to)?;
        if addr.version.is_some() {
            bail!(
                "a checkpoint makes a new version: give kerfs:{} without @VERSION",
                addr.path
            );
        }
        let rt = runtime()?;
        return rt.block_on(async {
            let store = open_store(cluster, &addr.path, true).await?;
            let mut ck = store.begin_checkpoint().await?;
            let version = ck.version();
            let stored = match ghost::ipc::capture_all(refs) {
                Ok(objs) => ck
                    .add_ipc(&objs)
                    .await
                    .map(|_| objs)
                    .map_err(anyhow::Error::from),
                Err(e) => Err(anyhow!(e)),
            };
            let objs = match stored {
                Ok(o) => o,
                Err(e) => {
                    ck.abort().await;
                    return Err(e).with_context(|| {
                        format!(
                            "IPC checkpoint to {}@{version} failed; nothing was published",
                            store.addr()
                        )
                    });
                }
            };
            let commit = ck.commit().await?;
            show(&objs);
            eprintln!(
                "krg: checkpointed {} System V IPC objects to {}@{} ({:.1} KiB) in {:.3} s",
                objs.len(),
                store.addr(),
                commit.version,
                commit.stats.ipc_bytes as f64 / 1024.0,
                t.elapsed().as_secs_f64()
            );
            Ok(0)
        });
    }
    let objs = ghost::ipc::capture_all(refs)?;
    let bytes = ghost::ipc::write_image_file(std::path::Path::new(to), &objs)?;
    show(&objs);
    eprintln!(
        "krg: checkpointed {} System V IPC objects to {to} ({:.1} KiB) in {:.3} s",
        objs.len(),
        bytes as f64 / 1024.0,
        t.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// `krg ipc restart`.
fn cmd_ipc_restart(from: &str, cluster: &ClusterArgs) -> Result<i32> {
    let (objs, source) = if from.starts_with("kerfs:") {
        let addr = StoreAddr::parse(from)?;
        let rt = runtime()?;
        rt.block_on(async {
            let store = open_store(cluster, &addr.path, false).await?;
            let version = store.open_version(addr.version).await?;
            let source = format!("{}@{}", store.addr(), version.version());
            let objs = version.ipc_objects().await;
            version.close().await;
            Ok::<_, anyhow::Error>((
                objs.with_context(|| format!("cannot restart from {source}"))?,
                source,
            ))
        })?
    } else {
        (
            ghost::ipc::read_image_file(std::path::Path::new(from))?,
            from.to_string(),
        )
    };
    if objs.is_empty() {
        bail!("{source} holds no System V IPC object");
    }
    ghost::ipc::restore(&objs).with_context(|| format!("cannot restart from {source}"))?;
    for o in &objs {
        eprintln!("krg: restored {}: {}", o.describe(), o.summary());
    }
    Ok(0)
}

fn kill_and_reap(pid: i32) {
    // SAFETY: kill/waitpid on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

fn cmd_listen(addr: &str) -> Result<i32> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (port in use? try --addr)"))?;
    let local = l.local_addr()?;
    println!("krg: listening on {local}");
    use std::io::Write;
    std::io::stdout().flush()?;
    l.set_nonblocking(true)?;
    // restored pid -> init of its namespace, killed once the restored process is reaped.
    let mut inits: Vec<(i32, i32)> = Vec::new();
    loop {
        // Reap restored processes (they are our children) between migrations, never during
        // one, so that no ptrace stop of an import is taken by this wait.
        inits.retain(|&(p, init)| {
            let mut st = 0;
            // SAFETY: plain waitpid on our own child.
            if unsafe { libc::waitpid(p, &mut st, libc::WNOHANG) } == p {
                kill_and_reap(init);
                false
            } else {
                true
            }
        });
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e).context("accept"),
        };
        stream.set_nonblocking(false)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        new_pid_namespace()?;
        let init = spawn_ns_init()?;
        let opts = ghost::ImportOptions {
            pid: ghost::PidChoice::Same,
            inherit_fds: Vec::new(),
            stdio_fallback: true,
        };
        match ghost::serve_migration(stream, &opts) {
            Ok(rep) => {
                eprintln!(
                    "krg: migrated process from {peer} runs as pid {} (pid {} in its namespace)",
                    rep.pid, rep.image_pid
                );
                inits.push((rep.pid, init));
            }
            Err(e) => {
                eprintln!("krg: migration from {peer} refused: {e}");
                kill_and_reap(init);
            }
        }
    }
}

fn cmd_migrate(pid: i32, dest: &str, fds: ghost::FdPolicy) -> Result<i32> {
    let t = Instant::now();
    // Refused before the receiver is contacted; the export decides again, frozen.
    ghost::check_restorable(pid, &fds)?;
    let mut w = ghost::TcpWriter::connect(dest)?;
    let rep = ghost::export_process(
        pid,
        &ghost::ExportOptions {
            after: ghost::After::Stop,
            fds,
            ..Default::default()
        },
        &mut w,
    )
    .with_context(|| {
        format!("exporting pid {pid} to {dest} failed (the process was left running)")
    })?;
    let ack = w.wait_ack();
    match ack {
        Ok(ghost::MigrationAck::Restored(remote)) => {
            // SAFETY: plain kill(2); the original is stopped and now redundant.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            eprintln!(
                "krg: migrated pid {pid} to {dest} (pid {remote} there): {:.1} MiB in {:.3} s",
                rep.image_bytes as f64 / 1048576.0,
                t.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Ok(ghost::MigrationAck::Failed(msg)) => {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGCONT) };
            bail!("{dest} could not restore pid {pid}: {msg}; the process was resumed here")
        }
        Err(e) => {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGCONT) };
            Err(anyhow!(e)).context(format!(
                "no answer from {dest}; pid {pid} was resumed here (check that it is not also running there)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_inherit;

    #[test]
    fn inherit_fd_takes_a_pair_or_one_number_for_both() {
        assert_eq!(parse_inherit("5=7"), Ok((5, 7)));
        assert_eq!(parse_inherit("5"), Ok((5, 5)));
        assert!(parse_inherit("5=").is_err());
        assert!(parse_inherit("-1").is_err());
        assert!(parse_inherit("x=3").is_err());
    }
}
