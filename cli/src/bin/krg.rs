//! `krg`: checkpoint, restart and migrate processes with kerfs-ghost.
//!
//! `krg run` starts a program in its own PID namespace so that its PID can be taken back at
//! restart; `krg restart` and `krg listen` likewise import every process into a fresh PID
//! namespace, whose init is a small reaper forked from krg.

use std::os::fd::RawFd;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use kerfs_ghost as ghost;

#[derive(Parser)]
#[command(
    name = "krg",
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
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true)]
        cmd: Vec<String>,
    },
    /// Write the ghost image of a running process to a file.
    Checkpoint {
        /// PID (as seen from here).
        pid: i32,
        /// Image file to write.
        #[arg(long)]
        to: String,
        /// Leave the process running afterwards (default).
        #[arg(long, group = "after")]
        leave_running: bool,
        /// Leave it stopped (SIGSTOP); `krg unfreeze PID` resumes it.
        #[arg(long, group = "after")]
        stop: bool,
        /// Kill it once the image is safely written.
        #[arg(long, group = "after")]
        kill: bool,
    },
    /// Restart a process from an image, in a fresh PID namespace with its old PID.
    Restart {
        /// Image file.
        file: String,
        /// Return once the process runs instead of waiting for it to exit.
        #[arg(long)]
        detach: bool,
        /// Give the restored process one of krg's fds: IMAGE_FD=KRG_FD (for pipes, sockets).
        #[arg(long = "inherit-fd", value_parser = parse_inherit)]
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

fn parse_inherit(s: &str) -> Result<(i32, RawFd), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("expected IMAGE_FD=KRG_FD, got {s}"))?;
    Ok((
        a.parse().map_err(|_| format!("bad fd {a}"))?,
        b.parse().map_err(|_| format!("bad fd {b}"))?,
    ))
}

fn main() {
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
        Cmd::Run { cmd } => cmd_run(&cmd),
        Cmd::Checkpoint {
            pid,
            to,
            leave_running: _,
            stop,
            kill,
        } => {
            if to.starts_with("kerfs:") {
                bail!("kerfs: destinations need the checkpoint store, which is not built yet; write to a local FILE");
            }
            let after = if kill {
                ghost::After::Kill
            } else if stop {
                ghost::After::Stop
            } else {
                ghost::After::LeaveRunning
            };
            let t = Instant::now();
            let mut w = ghost::FileWriter::create(&to)?;
            let rep = ghost::export_process(pid, &ghost::ExportOptions { after }, &mut w)
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
            detach,
            inherit_fd,
        } => cmd_restart(&file, detach, inherit_fd),
        Cmd::Listen { addr } => cmd_listen(&addr),
        Cmd::Migrate { pid, dest } => cmd_migrate(pid, &dest),
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

fn cmd_run(cmd: &[String]) -> Result<i32> {
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
    wait_status(init)
}

fn cmd_restart(file: &str, detach: bool, inherit: Vec<(i32, RawFd)>) -> Result<i32> {
    let mut r = ghost::FileReader::open(file)?;
    let img = ghost::load_image(&mut r).with_context(|| format!("cannot restart from {file}"))?;
    new_pid_namespace()?;
    let init = spawn_ns_init()?;
    let opts = ghost::ImportOptions {
        pid: ghost::PidChoice::Same,
        inherit_fds: inherit,
        stdio_fallback: true,
    };
    let rep = match ghost::import_image(&img, &opts) {
        Ok(rep) => rep,
        Err(e) => {
            kill_and_reap(init);
            return Err(anyhow!(e)).with_context(|| format!("restart from {file} failed"));
        }
    };
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

fn cmd_migrate(pid: i32, dest: &str) -> Result<i32> {
    let t = Instant::now();
    let mut w = ghost::TcpWriter::connect(dest)?;
    let rep = ghost::export_process(
        pid,
        &ghost::ExportOptions {
            after: ghost::After::Stop,
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
