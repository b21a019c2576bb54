//! Ghost processes: export a live process into a ghost image and import an image back into a
//! live process.
//!
//! This is the Kerrighed ghost process mechanism rebuilt in user space on ptrace and /proc. It
//! knows nothing of the KerFS cluster.
//!
//! * [`export_process`] freezes a process, every thread of it (PTRACE_SEIZE + PTRACE_INTERRUPT),
//!   captures each thread's registers (fs/gs base included), XSAVE state, signal mask and
//!   pending signals, rseq, robust list, alternate stack and clear_child_tid, and the process's address space (the present private pages only;
//!   file mappings by path, offset and file identity), mm fields, auxv, vDSO layout, rseq,
//!   fds, cwd, umask, rlimits, signal state, session and process group, streams the image to
//!   a [`GhostWriter`] and leaves the process running, stopped or killed ([`After`]).
//! * [`import_process`] reads an image from a [`GhostReader`], refuses it if it is damaged or
//!   needs something this host lacks, and only then creates a child (with the recorded PID
//!   when free), rebuilds its address space with injected syscalls, recreates the other
//!   threads under their TIDs (clone3 `set_tid`, so the PID must be kept) and lets it run.
//! * Resource access objects say where images go: [`FileWriter`]/[`FileReader`],
//!   [`MemWriter`]/[`MemReader`], and [`TcpWriter`]/[`TcpReader`] for migration to a
//!   `krg listen` on another node (see [`MigrationAck`]).
//!
//! * Nothing is lost by a checkpoint: export decides, before writing anything, how a restart
//!   rebuilds every fd and mapping, and refuses ([`GhostError::Unrestorable`], process left
//!   running) whatever it could not rebuild faithfully. [`check_restorable`] gives the same
//!   answer without freezing; an [`FdPolicy`] restores chosen fds as /dev/null or has them
//!   handed in at import ([`ImportOptions::inherit_fds`]).
//!
//!   Files deleted while open and pipes whose both ends the process holds are saved with
//!   their contents.
//!
//!   Sockets bound or listening (TCP, UDP, Unix) are bound again at restart; Unix socketpairs
//!   whose both ends the process holds come back with their queued messages.
//!
//! * [`ipc`] captures System V IPC objects (message queues, semaphore arrays, shared memory
//!   segments) and restores them with the same key and id; they live beside the processes,
//!   not in a ghost image.
//!
//! Limits: no children; no itimers/POSIX timers, SysV shared memory attached to the process;
//! pipes and sockets on fds 0-2 take the importer's own stdio; pipes to the outside, TCP
//! connections and Unix sockets connected to another process are refused unless dropped or
//! external; the restoring host must run the
//! same kernel (same vDSO) on a CPU with the same XSAVE features.
//! Needs root (or CAP_SYS_PTRACE + CAP_CHECKPOINT_RESTORE).

mod compat;
mod error;
mod export;
pub mod image;
mod import;
pub mod ipc;
mod procfs;
mod rao;
mod restorable;
mod sockets;
mod sys;
mod threads;
pub mod tracking;

pub use error::{GhostError, Result};
pub use export::{export_process, After, ExportOptions, ExportReport};
pub use image::{load as load_image, LoadedImage, FORMAT_VERSION};
pub use import::{
    check_import, import_image, import_process, ImportOptions, ImportReport, PidChoice,
};
pub use rao::{
    FileReader, FileWriter, GhostReader, GhostWriter, MemReader, MemWriter, MigrationAck,
    TcpReader, TcpWriter,
};
pub use restorable::{check_restorable, FdChoice, FdPolicy, Problem};
pub use tracking::TrackBase;

/// Page size the image format counts in (x86_64 base pages).
pub const PAGE: u64 = 4096;

/// Receives one migration on `stream`: reads the image, imports it and answers the sender with
/// a [`MigrationAck`]. Returns the import result as well.
pub fn serve_migration(stream: std::net::TcpStream, opts: &ImportOptions) -> Result<ImportReport> {
    let mut r = TcpReader::new(stream);
    let res = import_process(&mut r, opts);
    let ack = match &res {
        Ok(rep) => MigrationAck::Restored(rep.image_pid),
        Err(e) => MigrationAck::Failed(e.to_string()),
    };
    r.send_ack(&ack)?;
    res
}

/// Stops a process with SIGSTOP and waits until it is stopped (`krg freeze`).
pub fn freeze(pid: i32) -> Result<()> {
    signal_and_wait(pid, libc::SIGSTOP, |s| s == 'T' || s == 't')
}

/// Resumes a process stopped by [`freeze`] (`krg unfreeze`).
pub fn unfreeze(pid: i32) -> Result<()> {
    signal_and_wait(pid, libc::SIGCONT, |s| s != 'T' && s != 't')
}

fn signal_and_wait(pid: i32, sig: i32, done: impl Fn(char) -> bool) -> Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(GhostError::Process {
            pid,
            msg: format!(
                "cannot signal it: {} (check the PID and your permissions)",
                std::io::Error::last_os_error()
            ),
        });
    }
    for _ in 0..500 {
        if done(procfs::Stat::read(pid)?.state()) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(GhostError::Process {
        pid,
        msg: "did not change state within 5 s".into(),
    })
}
