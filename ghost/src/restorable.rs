//! Restorability: an image holds only what import can rebuild, decided once, at export.
//!
//! A checkpoint that succeeds but cannot be restarted loses the process (`--kill`). So before
//! anything is written, export surveys the process ([`survey`]): for every fd it decides how a
//! restart rebuilds it ([`FdRestore`], recorded in the image and executed as recorded by
//! import), for every mapping how it is recreated ([`map_kind`]), and it checks what is not
//! captured at all (children, POSIX timers, file locks, a deleted working
//! directory, a pipe or deleted file shared with another process). Whatever cannot be
//! rebuilt faithfully becomes a [`Problem`]; any problem refuses the export with
//! [`GhostError::Unrestorable`] while the process is still untouched, and it is left running.
//!
//! Event and timer fds are rebuilt from their fdinfo ([`anon_restore`]): an eventfd's
//! counter, a timerfd's clock, time left, interval and unread expirations (read with
//! timerfd_gettime first, see [`timerfd_state`]), a signalfd's mask, an epoll fd's
//! registrations. An epoll registration must name an fd of the process still open on the
//! registered file (checked with kcmp); what it watches is restored or refused on its own.
//! An inotify fd's watches are resolved to paths through their file handles
//! ([`inotify_state`]); unread events refuse it.
//!
//! Sockets at fd 3 and up are looked at by [`crate::sockets::inspect`] ([`socket_restore`]):
//! TCP, UDP (IPv4, IPv6) and Unix sockets that are unbound, bound or listening are made
//! again at their address with their options ([`FdRestore::Socket`]); a Unix socketpair
//! whose both ends the process holds, with the messages queued in each direction
//! ([`FdRestore::SocketPair`]). Refused: a TCP connection, a Unix socket whose peer is in
//! another process (named in the message), a listener with connections waiting to be
//! accepted, data queued on a UDP or unconnected datagram socket, a shut-down socket, fds in
//! flight, a socket another process holds too, or a process in another network namespace.
//! Sockets on 0-2 are the restorer's stdio, like pipes and terminals.
//!
//! The caller can resolve an fd problem with an [`FdPolicy`]: restore the fd as /dev/null
//! ([`FdChoice::DevNull`], `krg checkpoint --drop FD`) or have it handed in at restart
//! ([`FdChoice::External`], `krg checkpoint --external FD`, then
//! `krg restart --inherit-fd FD=KRG_FD`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::error::{GhostError, Result};
use crate::image::{
    DeletedFile, EpollState, EpollTarget, EventFdState, Fd, FdKind, FdRestore, InotifyState,
    InotifyWatch, MapKind, PipeEnd, SignalFdState, SocketState, TimerFdState,
};
use crate::procfs::{self, MapLine};

/// What to do with one fd instead of restoring it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdChoice {
    /// Restore it as /dev/null (same number, access mode and close-on-exec flag).
    DevNull,
    /// Record it as external: whoever restarts the process must hand in a descriptor for it
    /// ([`crate::ImportOptions::inherit_fds`]); a restart without one is refused.
    External,
}

/// Per-fd choices of an export ([`crate::ExportOptions::fds`]). Every fd named must exist in
/// the process when it is exported, so that a mistyped number is an error, not a no-op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdPolicy {
    chosen: BTreeMap<i32, FdChoice>,
}

impl FdPolicy {
    /// A policy that keeps every fd as it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses what to do with `fd`. Choosing the same thing twice is fine; two different
    /// choices for one fd, or a negative fd, are refused.
    pub fn choose(&mut self, fd: i32, choice: FdChoice) -> Result<()> {
        if fd < 0 {
            return Err(GhostError::InvalidOption(format!(
                "fd {fd} is not a descriptor number (give 0 or more)"
            )));
        }
        match self.chosen.get(&fd) {
            Some(&old) if old != choice => Err(GhostError::InvalidOption(format!(
                "fd {fd} is given both as {} and as {}: choose one",
                old.flag(),
                choice.flag()
            ))),
            _ => {
                self.chosen.insert(fd, choice);
                Ok(())
            }
        }
    }

    /// The choice made for `fd`, if any.
    pub fn get(&self, fd: i32) -> Option<FdChoice> {
        self.chosen.get(&fd).copied()
    }

    /// Every (fd, choice), by fd number.
    pub fn iter(&self) -> impl Iterator<Item = (i32, FdChoice)> + '_ {
        self.chosen.iter().map(|(&fd, &c)| (fd, c))
    }
}

impl FdChoice {
    /// The `krg checkpoint` option that makes this choice, for messages.
    fn flag(self) -> &'static str {
        match self {
            FdChoice::DevNull => "--drop",
            FdChoice::External => "--external",
        }
    }
}

/// One thing of a process that a restart could not rebuild faithfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The fd, when the problem is one (then [`FdPolicy`] can resolve it).
    pub fd: Option<i32>,
    /// What it is and why it cannot be restored, e.g. `fd 5: pipe:[1234]: ...`.
    pub what: String,
    /// What the user can do, for problems that are not fds (fds share one hint).
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

/// The message of [`GhostError::Unrestorable`].
pub(crate) fn refusal_message(pid: i32, comm: &str, problems: &[Problem]) -> String {
    let mut s = format!(
        "process {pid} ({comm}) cannot be checkpointed: a restart could not rebuild {}; nothing was written and the process was left running",
        if problems.len() == 1 { "this" } else { "these" }
    );
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    if problems.iter().any(|p| p.fd.is_some()) {
        s.push_str(
            "\nfor an fd: `--drop FD` restores it as /dev/null; `--external FD` records it so \
             that the restart is handed one in its place (`krg restart --inherit-fd FD=YOUR_FD`); \
             or have the program close it before the checkpoint",
        );
    }
    s
}

/// What a survey of a process found.
pub(crate) struct Survey {
    /// Command name, for messages.
    pub comm: String,
    /// Every fd (less the one skipped) with its restore method; fds with a problem are left
    /// out.
    pub fds: Vec<Fd>,
    /// Everything a restart could not rebuild.
    pub problems: Vec<Problem>,
}

impl Survey {
    /// The fds, or the refusal if anything cannot be restored.
    pub fn into_fds(self, pid: i32) -> Result<Vec<Fd>> {
        if self.problems.is_empty() {
            Ok(self.fds)
        } else {
            Err(GhostError::Unrestorable {
                pid,
                comm: self.comm,
                problems: self.problems,
            })
        }
    }
}

/// Decides the restorability of everything `pid` holds: fds (less `skip`, the write-tracking
/// descriptor, which is krg's) with their locks, mappings, children, POSIX timers
/// and working directory. Run on a frozen
/// process by export (the authoritative check) and on a running one by
/// [`check_restorable`] (an early answer that needs no freeze). Errors only if /proc cannot
/// be read or `policy` names an fd the process does not have.
pub(crate) fn survey(
    pid: i32,
    policy: &FdPolicy,
    skip: Option<i32>,
    frozen: bool,
) -> Result<Survey> {
    let comm = procfs::read_to_string(pid, "comm")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mut problems = Vec::new();
    // Fails early, with the errno, if the process is gone.
    procfs::read_to_string(pid, "status")?;
    problems.extend(children_problem(pid));
    problems.extend(cwd_problem(pid));
    problems.extend(timers_problem(pid));
    let maps = procfs::maps(pid)?;
    for m in &maps {
        if let Err(p) = map_kind(pid, m) {
            problems.push(p);
        }
    }
    let (fds, fd_problems) = plan_fds(pid, policy, skip, &maps, frozen)?;
    problems.extend(fd_problems);
    Ok(Survey {
        comm,
        fds,
        problems,
    })
}

/// Checks, without stopping it, that `pid` could be checkpointed and restarted with `policy`:
/// the same decisions [`crate::export_process`] makes (and makes again, on the frozen
/// process). Returns [`GhostError::Unrestorable`] listing every problem.
pub fn check_restorable(pid: i32, policy: &FdPolicy) -> Result<()> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(GhostError::Process {
            pid,
            msg: "no such process (check the PID; inside `krg run` use the PID printed at start)"
                .into(),
        });
    }
    let skip = crate::tracking::find_uffd(pid).map(|(fd, _)| fd);
    survey(pid, policy, skip, false)?.into_fds(pid).map(|_| ())
}

/// Children are not captured: a restarted parent would find none to wait for.
fn children_problem(pid: i32) -> Option<Problem> {
    let list = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let kids: Vec<String> = list
        .split_whitespace()
        .map(|c| {
            let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
            format!("{c} ({})", comm.trim())
        })
        .collect();
    (!kids.is_empty()).then(|| Problem {
        fd: None,
        what: format!(
            "it has child processes {}; they are not captured and the restarted process would have none",
            kids.join(", ")
        ),
        hint: Some("checkpoint it once they have exited and been reaped".into()),
    })
}

/// POSIX timers (timer_create) are not captured: a restarted process would wait forever for
/// their signals.
fn timers_problem(pid: i32) -> Option<Problem> {
    let timers = fs::read_to_string(format!("/proc/{pid}/timers")).unwrap_or_default();
    let n = timers.lines().filter(|l| l.starts_with("ID:")).count();
    (n > 0).then(|| Problem {
        fd: None,
        what: format!("it has {n} POSIX timer(s) (timer_create, see /proc/{pid}/timers), which are not restored yet"),
        hint: Some("delete them (timer_delete) before the checkpoint".into()),
    })
}

/// The file locks fd `fd` holds, from its fdinfo ("POSIX  ADVISORY  WRITE ..." lines).
fn locks_of(pid: i32, fd: i32) -> Vec<String> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    info.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .map(|l| {
            // "1: POSIX  ADVISORY  WRITE 1234 fe:00:99 0 EOF": kind, mode and range.
            let f: Vec<&str> = l.split_whitespace().collect();
            match (f.get(1), f.get(3), f.get(6), f.get(7)) {
                (Some(kind), Some(mode), Some(start), Some(end)) => {
                    format!("{kind} {mode} {start}-{end}")
                }
                _ => l.trim().to_string(),
            }
        })
        .collect()
}

/// The restart chdirs to the recorded path: it must name the same directory.
fn cwd_problem(pid: i32) -> Option<Problem> {
    let link = format!("/proc/{pid}/cwd");
    let path = fs::read_link(&link).ok()?.to_string_lossy().into_owned();
    let same = match (fs::metadata(&link), fs::metadata(&path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    (!same).then(|| Problem {
        fd: None,
        what: format!(
            "its working directory {path} was deleted or is not reachable by that path from here"
        ),
        hint: Some("make the program chdir to an existing directory first".into()),
    })
}

/// How a mapping is rebuilt (None: it is skipped), or why it cannot be.
pub(crate) fn map_kind(pid: i32, m: &MapLine) -> std::result::Result<Option<MapKind>, Problem> {
    let p = m.path.as_str();
    let refuse = |why: String, hint: &str| Problem {
        fd: None,
        what: format!("mapping {:#x}-{:#x} {p}: {why}", m.start, m.end),
        hint: Some(hint.into()),
    };
    Ok(Some(match p {
        "[vsyscall]" => return Ok(None),
        "[vvar]" | "[vvar_vclock]" | "[vdso]" => MapKind::Vdso,
        "" | "[heap]" | "[stack]" => {
            if m.shared {
                MapKind::ShmemAnon
            } else {
                MapKind::Anon
            }
        }
        _ if p.starts_with('[') => {
            return Err(refuse(
                "a special kernel mapping that is not recreated".into(),
                "not supported",
            ))
        }
        _ if p.starts_with("/SYSV") && p.ends_with(" (deleted)") => return Err(refuse(
            "System V shared memory; restored it would be a private copy, cut off from the segment"
                .into(),
            "a process with System V shared memory attached cannot be checkpointed yet; detach it (shmdt) first (the segment itself is saved with `krg ipc checkpoint -M ID` or `krg checkpoint --ipc M:ID`)",
        )),
        _ if !p.starts_with('/') => {
            return Err(refuse(
                "memory of a kernel object (not a file), which is not recreated".into(),
                "not supported",
            ))
        }
        _ if p.ends_with(" (deleted)") || m.inode == 0 => {
            if m.shared {
                // /dev/zero (deleted), memfd: the contents live only in memory and are stored.
                MapKind::ShmemAnon
            } else {
                return Err(refuse(
                    "a deleted file mapped privately; its unchanged pages cannot be recovered".into(),
                    "the file was deleted or replaced while mapped (an upgraded binary?): restart the program",
                ));
            }
        }
        _ => {
            let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let mapped = fs::metadata(&link).map_err(|e| {
                refuse(
                    format!("cannot stat the mapped file ({e})"),
                    "check that krg runs as root",
                )
            })?;
            if mapped.file_type().is_char_device() || mapped.file_type().is_block_device() {
                return Err(refuse(
                    "a device mapped into memory; its state cannot be carried to a restart".into(),
                    "not supported",
                ));
            }
            let same =
                fs::metadata(p).is_ok_and(|b| b.dev() == mapped.dev() && b.ino() == mapped.ino());
            if !same {
                return Err(refuse(
                    "that path now names another file (or nothing) as seen from krg, so a restart could not map it".into(),
                    "the file was renamed or replaced, or the process runs in another mount namespace",
                ));
            }
            if m.shared {
                MapKind::FileShared
            } else {
                MapKind::FilePrivate
            }
        }
    }))
}

/// Every fd of `pid` but `skip`, each with the method a restart uses for it, and the problems
/// of those that have none.
fn plan_fds(
    pid: i32,
    policy: &FdPolicy,
    skip: Option<i32>,
    maps: &[MapLine],
    frozen: bool,
) -> Result<(Vec<Fd>, Vec<Problem>)> {
    let dir = format!("/proc/{pid}/fd");
    let rd = fs::read_dir(&dir).map_err(|e| GhostError::sys(format!("listing {dir}"), pid, e))?;
    let mut fds = Vec::new();
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    // (fd, /proc link, pos, flags) first: whether a pipe is internal depends on the other fds.
    let mut listed = Vec::new();
    for ent in rd.flatten() {
        let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if Some(fd) == skip {
            continue;
        }
        // Closed between the listing and here (the survey of a running process).
        let Ok(target) = fs::read_link(ent.path()) else {
            continue;
        };
        let (pos, flags) = procfs::fdinfo(pid, fd)?;
        listed.push((fd, target.to_string_lossy().into_owned(), pos, flags));
    }
    let mut internal = internal_pipes(&listed);
    // An internal pipe or a deleted file another process also holds is restored as a new
    // one, cut off from that process: refused.
    let deleted_file = |fd: i32, target: &str| {
        (target.ends_with(" (deleted)") && !target.starts_with("/memfd:"))
            .then(|| fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok())
            .flatten()
            .map(|m| Held::File(m.dev(), m.ino()))
    };
    // Sockets (not on 0-2, which are the caller's stdio) are made again too.
    let own_socks: Vec<u64> = listed
        .iter()
        .filter_map(|(_, t, _, _)| socket_inode(t))
        .collect();
    let mut wanted: Vec<Held> = internal.iter().map(|&i| Held::Pipe(i)).collect();
    wanted.extend(
        listed
            .iter()
            .filter(|(fd, _, _, _)| *fd > 2 && policy.get(*fd).is_none())
            .filter_map(|(_, t, _, _)| socket_inode(t).map(Held::Socket)),
    );
    wanted.extend(
        listed
            .iter()
            .filter_map(|(fd, t, _, _)| deleted_file(*fd, t)),
    );
    let shared = held_elsewhere(pid, &wanted);
    internal.retain(|&i| !shared.iter().any(|(s, _)| *s == Held::Pipe(i)));
    for (fd, target, pos, flags) in listed {
        seen.push(fd);
        let held = pipe_inode(&target)
            .map(Held::Pipe)
            .or_else(|| socket_inode(&target).filter(|_| fd > 2).map(Held::Socket))
            .or_else(|| deleted_file(fd, &target));
        if let Some((_, other)) = held
            .and_then(|h| shared.iter().find(|(s, _)| *s == h))
            .filter(|_| policy.get(fd).is_none())
        {
            let what = if target.starts_with("pipe:") {
                "a pipe whose both ends are in the process".to_string()
            } else if let Some(ino) = socket_inode(&target) {
                let desc = describe_socket(pid, ino).unwrap_or_else(|| "socket".into());
                format!("a {desc}")
            } else {
                "a deleted file".to_string()
            };
            problems.push(Problem {
                fd: Some(fd),
                what: format!(
                    "fd {fd}: {target}, {what}, but {other} holds it too: restored, it would be a new one, cut off from that process"
                ),
                hint: None,
            });
            continue;
        }
        let locks = locks_of(pid, fd);
        if !locks.is_empty() && policy.get(fd).is_none() {
            problems.push(Problem {
                fd: Some(fd),
                what: format!(
                    "fd {fd}: {target} holds file lock(s) {}: locks are not restored yet, the restarted process would run without them",
                    locks.join(", ")
                ),
                hint: None,
            });
            continue;
        }
        let ctx = Context {
            maps,
            internal_pipes: &internal,
            own_socks: &own_socks,
            frozen,
        };
        match fd_restore(pid, fd, &target, flags, policy, &ctx) {
            Ok((restore, object)) => fds.push(Fd {
                fd,
                kind: fd_kind(&target) as i32,
                pipe: pipe_inode(&target)
                    .filter(|_| restore == FdRestore::PipeInProcess)
                    .map(|inode| PipeEnd {
                        inode,
                        ..Default::default()
                    }),
                path: target,
                flags,
                pos,
                restore: restore as i32,
                deleted: None,
                eventfd: match &object {
                    KernelObject::EventFd(e) => Some(e.clone()),
                    _ => None,
                },
                timerfd: match &object {
                    KernelObject::TimerFd(t) => Some(t.clone()),
                    _ => None,
                },
                signalfd: match &object {
                    KernelObject::SignalFd(m) => Some(m.clone()),
                    _ => None,
                },
                epoll: match &object {
                    KernelObject::Epoll(e) => Some(e.clone()),
                    _ => None,
                },
                socket: match &object {
                    KernelObject::Socket(s) => Some(s.clone()),
                    _ => None,
                },
                inotify: match object {
                    KernelObject::Inotify(i) => Some(i),
                    _ => None,
                },
            }),
            Err(why) => problems.push(Problem {
                fd: Some(fd),
                what: format!("fd {fd}: {why}"),
                hint: None,
            }),
        }
    }
    for (fd, choice) in policy.iter() {
        if !seen.contains(&fd) {
            return Err(GhostError::InvalidOption(format!(
                "{} {fd}: process {pid} has no fd {fd} (see ls -l /proc/{pid}/fd)",
                choice.flag()
            )));
        }
    }
    // A socketpair end is made again with its peer: one whose other end is not made again
    // (dropped, external) would come back connected to nothing.
    let pair_socks: Vec<u64> = fds
        .iter()
        .filter(|f| f.restore == FdRestore::SocketPair as i32)
        .filter_map(|f| f.socket.as_ref().map(|s| s.inode))
        .collect();
    fds.retain(|f| {
        let Some(s) = f.socket.as_ref().filter(|_| f.restore == FdRestore::SocketPair as i32)
        else {
            return true;
        };
        if pair_socks.contains(&s.peer_inode) {
            return true;
        }
        problems.push(Problem {
            fd: Some(f.fd),
            what: format!(
                "fd {}: {}, one end of a socketpair of the process, whose other end (socket:[{}]) is to be dropped or handed in: it would come back connected to nothing; drop or hand in this end as well, or keep both",
                f.fd, f.path, s.peer_inode
            ),
            hint: None,
        });
        false
    });
    fds.sort_by_key(|f| f.fd);
    problems.sort_by_key(|p| p.fd);
    // A socket's queue is carried by its lowest fd; the other fds of it are the same socket.
    let mut carried: Vec<u64> = Vec::new();
    for s in fds.iter_mut().filter_map(|f| f.socket.as_mut()) {
        if carried.contains(&s.inode) {
            s.queued = 0;
        } else {
            carried.push(s.inode);
        }
    }
    // Deleted files: the size and mode to save, and which fds are one file (the lowest fd of
    // a file carries its content, the others point to it). Export reads the contents.
    let mut firsts: Vec<((u64, u64), i32)> = Vec::new();
    for f in fds
        .iter_mut()
        .filter(|f| f.restore == FdRestore::DeletedFile as i32)
    {
        let md = fs::metadata(format!("/proc/{pid}/fd/{}", f.fd))
            .map_err(|e| GhostError::sys(format!("stat of fd {}", f.fd), pid, e))?;
        let id = (md.dev(), md.ino());
        let same_as = firsts.iter().find(|(i, _)| *i == id).map(|&(_, fd)| fd);
        if same_as.is_none() {
            firsts.push((id, f.fd));
        }
        f.deleted = Some(DeletedFile {
            size: if same_as.is_some() { 0 } else { md.len() },
            mode: md.mode() & 0o7777,
            same_as,
        });
    }
    Ok((fds, problems))
}

/// The inode of a `pipe:[N]` link.
fn pipe_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
}

/// The inode of a `socket:[N]` link.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
}

/// "process N (comm)" of a process other than `pid` that holds socket `ino`.
pub(crate) fn holder_of_socket(pid: i32, ino: u64) -> Option<String> {
    held_elsewhere(pid, &[Held::Socket(ino)])
        .into_iter()
        .next()
        .map(|(_, who)| who)
}

/// Whether an fd with these open flags reads (else it writes) a pipe.
pub(crate) fn reads(flags: u32) -> bool {
    flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32
}

/// Pipes of which the process holds both a read end and a write end: made again whole at
/// restart, with their buffered bytes. (A pipe with one end elsewhere cannot be: the other
/// side is not in the image.)
fn internal_pipes(listed: &[(i32, String, i64, u32)]) -> Vec<u64> {
    let ends = |want_read: bool| -> Vec<u64> {
        listed
            .iter()
            .filter(|(_, _, _, flags)| reads(*flags) == want_read)
            .filter_map(|(_, t, _, _)| pipe_inode(t))
            .collect()
    };
    let (readers, writers) = (ends(true), ends(false));
    let mut both: Vec<u64> = readers
        .into_iter()
        .filter(|i| writers.contains(i))
        .collect();
    both.sort_unstable();
    both.dedup();
    both
}

/// Something an fd holds that a restore makes anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// A pipe, by inode.
    Pipe(u64),
    /// A deleted file, by (device, inode).
    File(u64, u64),
    /// A socket, by inode.
    Socket(u64),
}

/// The things among `wanted` that a process other than `pid` also holds, each with one such
/// process ("process N (comm)"). Every process's fds are looked at: a few ms on a busy host,
/// and only when the process has internal pipes or deleted files.
fn held_elsewhere(pid: i32, wanted: &[Held]) -> Vec<(Held, String)> {
    let mut out: Vec<(Held, String)> = Vec::new();
    if wanted.is_empty() {
        return out;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    // Threads of `pid` share its fd table; so may processes made with CLONE_FILES, which
    // show the same fds: those are told apart by their thread group.
    let tgid_of = |p: &str| {
        fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| procfs::status_field(&s, "Tgid"))
            .and_then(|t| t.parse::<i32>().ok())
    };
    for ent in procs.flatten() {
        let name = ent.file_name();
        let Some(other) = name.to_str().filter(|n| n.parse::<i32>().is_ok()) else {
            continue;
        };
        if other == pid.to_string() || tgid_of(other) == Some(pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let held = match pipe_inode(&target) {
                Some(i) => Held::Pipe(i),
                None if socket_inode(&target).is_some() => {
                    Held::Socket(socket_inode(&target).unwrap_or_default())
                }
                None if target.ends_with(" (deleted)") => match fs::metadata(fd.path()) {
                    Ok(m) => Held::File(m.dev(), m.ino()),
                    Err(_) => continue,
                },
                None => continue,
            };
            if wanted.contains(&held) && !out.iter().any(|(h, _)| *h == held) {
                let comm = fs::read_to_string(format!("/proc/{other}/comm")).unwrap_or_default();
                out.push((held, format!("process {other} ({})", comm.trim())));
            }
        }
    }
    out
}

/// The informational kind recorded with an fd.
fn fd_kind(target: &str) -> FdKind {
    if target.starts_with("pipe:") {
        FdKind::Pipe
    } else if target.starts_with("socket:") {
        FdKind::Socket
    } else if target.starts_with("/dev/pts/")
        || target.starts_with("/dev/tty")
        || target == "/dev/console"
    {
        FdKind::Tty
    } else if target.starts_with('/') && !target.ends_with(" (deleted)") {
        FdKind::Path
    } else {
        FdKind::Other
    }
}

/// Character devices without per-open state, the same on every node: reopening them by path
/// is a faithful restore. (major, minor): null, zero, full, random, urandom.
const STATELESS_DEVICES: &[(u32, u32)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)];
/// Terminal majors: consoles and serial lines (4), /dev/tty, console, ptmx (5), pts (136-143).
fn is_terminal_major(major: u32) -> bool {
    major == 4 || major == 5 || (136..=143).contains(&major)
}
/// statfs magic of procfs: its files describe a live process.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
/// A deleted file is saved in the image up to this size; a bigger one refuses the checkpoint
/// (it is read while the process is frozen, and held in memory).
pub(crate) const DELETED_FILE_MAX: u64 = 256 << 20;

/// What the decision for one fd depends on besides the fd itself.
struct Context<'a> {
    maps: &'a [MapLine],
    /// Pipes whose both ends the process holds.
    internal_pipes: &'a [u64],
    /// Inodes of the sockets the process holds.
    own_socks: &'a [u64],
    /// The process is stopped (export), not running (check_restorable).
    frozen: bool,
}

/// THE decision: how a restart rebuilds fd `fd` of `pid` (`target` is its /proc link, `flags`
/// its open flags), or why it cannot. Import implements exactly the [`FdRestore`] methods,
/// so whatever this returns `Ok` for, a restart can do.
fn fd_restore(
    pid: i32,
    fd: i32,
    target: &str,
    flags: u32,
    policy: &FdPolicy,
    ctx: &Context<'_>,
) -> std::result::Result<(FdRestore, KernelObject), String> {
    match policy.get(fd) {
        Some(FdChoice::DevNull) => return Ok((FdRestore::DevNull, KernelObject::Plain)),
        Some(FdChoice::External) => return Ok((FdRestore::External, KernelObject::Plain)),
        None => {}
    }
    // eventfd, timerfd, epoll...: kernel objects with no path, rebuilt from their fdinfo.
    if let Some(what) = target.strip_prefix("anon_inode:") {
        let what = what.trim_start_matches('[').trim_end_matches(']');
        return anon_restore(pid, fd, what, policy);
    }
    // Sockets on 0-2 are the caller's stdio (file_restore); the others are made again.
    if let Some(ino) = socket_inode(target).filter(|_| fd > 2) {
        return socket_restore(pid, fd, ino, ctx);
    }
    file_restore(pid, fd, target, flags, ctx.maps, ctx.internal_pipes)
        .map(|r| (r, KernelObject::Plain))
}

/// [`fd_restore`] for socket `ino`, see [`crate::sockets`].
fn socket_restore(
    pid: i32,
    fd: i32,
    ino: u64,
    ctx: &Context<'_>,
) -> std::result::Result<(FdRestore, KernelObject), String> {
    let desc = describe_socket(pid, ino).unwrap_or_else(|| "(protocol not identified)".into());
    let same_netns = fs::read_link(format!("/proc/{pid}/ns/net")).ok()
        == fs::read_link("/proc/self/ns/net").ok();
    if !same_netns {
        return Err(format!(
            "socket:[{ino}] {desc}: the process is in another network namespace than krg, which a restart would not recreate"
        ));
    }
    crate::sockets::inspect(pid, fd, ino, ctx.own_socks, ctx.frozen)
        .map(|(r, s)| (r, KernelObject::Socket(s)))
        .map_err(|why| format!("socket:[{ino}] {desc}: {why}"))
}

/// [`fd_restore`] for what is not an anonymous-inode object.
fn file_restore(
    pid: i32,
    fd: i32,
    target: &str,
    flags: u32,
    maps: &[MapLine],
    internal_pipes: &[u64],
) -> std::result::Result<FdRestore, String> {
    // Pipes, sockets and terminals on 0-2 are the caller's stdio, as for a shell job.
    let stdio = fd <= 2;
    if let Some(inode) = target
        .strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
    {
        if pipe_inode(target).is_some_and(|i| internal_pipes.contains(&i)) {
            return Ok(FdRestore::PipeInProcess);
        }
        if stdio {
            return Ok(FdRestore::CallerStdio);
        }
        return Err(format!(
            "pipe:[{inode}], a pipe whose other end is outside the process: that end and the bytes buffered in it cannot be recreated by a restart"
        ));
    }
    if let Some(inode) = target
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
    {
        if stdio {
            return Ok(FdRestore::CallerStdio);
        }
        // Only 0-2 come here (see fd_restore).
        return Err(format!("socket:[{inode}]: not restored on fd {fd}"));
    }
    if !target.starts_with('/') {
        return Err(format!(
            "{target}: a kernel object (not a file) that cannot be reopened by a restart"
        ));
    }
    let link = format!("/proc/{pid}/fd/{fd}");
    if target.ends_with(" (deleted)") {
        if target.starts_with("/memfd:") {
            return Err(format!(
                "{target}, a memfd: memfds (their seals and sharing) are not restored yet"
            ));
        }
        let md = fs::metadata(&link).map_err(|e| format!("{target}: cannot stat it ({e})"))?;
        if !md.file_type().is_file() || flags & libc::O_PATH as u32 != 0 {
            return Err(format!(
                "deleted {target}: only deleted regular files (not directories, devices or O_PATH fds) are saved"
            ));
        }
        if md.len() > DELETED_FILE_MAX {
            return Err(format!(
                "deleted file {target} holds {} MiB, more than the {} MiB a checkpoint saves",
                md.len() >> 20,
                DELETED_FILE_MAX >> 20
            ));
        }
        // Its pages in memory and its contents would become two files after restore.
        if let Some(m) = maps.iter().find(|m| {
            m.inode == md.ino() && m.path.ends_with(" (deleted)") && !m.path.starts_with("/SYSV")
        }) {
            return Err(format!(
                "deleted file {target} is also mapped into memory at {:#x}; a deleted file that is both open and mapped is not restored yet",
                m.start
            ));
        }
        return Ok(FdRestore::DeletedFile);
    }
    let open = fs::metadata(&link).map_err(|e| format!("{target}: cannot stat it ({e})"))?;
    let same_path = fs::metadata(target)
        .is_ok_and(|p| p.dev() == open.dev() && p.ino() == open.ino() && p.rdev() == open.rdev());
    let not_same = || {
        format!(
            "{target}: that path now names another file (or nothing) as seen from krg, so a restart could not reopen it (renamed or replaced, or another mount namespace)"
        )
    };
    // An O_PATH fd only names the file: reopening the name is faithful whatever it is.
    if flags & libc::O_PATH as u32 != 0 {
        return if same_path {
            Ok(FdRestore::Reopen)
        } else {
            Err(not_same())
        };
    }
    let ft = open.file_type();
    if ft.is_fifo() {
        return Err(format!(
            "FIFO (named pipe) {target}: reopening it would block the restart and lose the bytes buffered in it"
        ));
    }
    if ft.is_socket() {
        return Err(format!("{target}: a socket, which is not restored"));
    }
    if ft.is_char_device() || ft.is_block_device() {
        let (major, minor) = (libc::major(open.rdev()), libc::minor(open.rdev()));
        if ft.is_char_device() && is_terminal_major(major) && stdio {
            return Ok(FdRestore::CallerStdio);
        }
        if ft.is_char_device() && STATELESS_DEVICES.contains(&(major, minor)) {
            return if same_path {
                Ok(FdRestore::Reopen)
            } else {
                Err(not_same())
            };
        }
        let (what, class) = if ft.is_block_device() {
            ("block", "device")
        } else if is_terminal_major(major) {
            ("char", "terminal")
        } else {
            ("char", "device")
        };
        return Err(format!(
            "{class} {target} ({what} {major}:{minor}): its state belongs to this node and cannot be carried to a restart"
        ));
    }
    if on_procfs(&link) {
        return Err(format!(
            "{target}: a /proc file describes a live process; reopened after a restart it would describe another"
        ));
    }
    if !same_path {
        return Err(not_same());
    }
    Ok(FdRestore::Reopen)
}

/// The state an anonymous-inode fd is rebuilt from, recorded with it in the image.
#[derive(Debug, Clone, PartialEq)]
enum KernelObject {
    /// Nothing beyond the fd's path, flags and offset.
    Plain,
    EventFd(EventFdState),
    TimerFd(TimerFdState),
    SignalFd(SignalFdState),
    Epoll(EpollState),
    Inotify(InotifyState),
    Socket(SocketState),
}

/// How an anonymous-inode fd (`anon_inode:[what]`) is rebuilt, with the state it is rebuilt
/// from, or why it cannot be.
fn anon_restore(
    pid: i32,
    fd: i32,
    what: &str,
    policy: &FdPolicy,
) -> std::result::Result<(FdRestore, KernelObject), String> {
    let info = || {
        fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .map_err(|e| format!("anon_inode:[{what}]: cannot read its fdinfo ({e})"))
    };
    let unparsable = |field: &str| {
        format!("anon_inode:[{what}]: /proc/{pid}/fdinfo/{fd} has no readable `{field}` line (a kernel this version does not know?)")
    };
    match what {
        "eventfd" => {
            let e = parse_eventfd(&info()?).ok_or_else(|| unparsable("eventfd-count"))?;
            Ok((FdRestore::EventFd, KernelObject::EventFd(e)))
        }
        "signalfd" => {
            let m = parse_signalfd(&info()?).ok_or_else(|| unparsable("sigmask"))?;
            Ok((FdRestore::SignalFd, KernelObject::SignalFd(m)))
        }
        "timerfd" => {
            let t = timerfd_state(pid, fd, &info).map_err(|e| format!("anon_inode:[timerfd]: {e}"))?;
            Ok((FdRestore::TimerFd, KernelObject::TimerFd(t)))
        }
        "eventpoll" => {
            let lines = parse_epoll_lines(&info()?).ok_or_else(|| unparsable("tfd"))?;
            check_epoll_targets(pid, fd, &lines, policy)?;
            let targets = lines.into_iter().map(|l| l.target).collect();
            Ok((FdRestore::Epoll, KernelObject::Epoll(EpollState { targets })))
        }
        "inotify" => {
            let w = inotify_state(pid, fd, &info()?).map_err(|e| {
                format!("anon_inode:inotify, an inotify instance: {e}; or have the program close it before the checkpoint and add its watches again after the restart, or `--drop {fd}` if it can do without the events")
            })?;
            Ok((FdRestore::Inotify, KernelObject::Inotify(w)))
        }
        _ => Err(format!(
            "anon_inode:[{what}], a{} {what} descriptor: this kind of descriptor is not restored yet",
            if what.starts_with(['a', 'e', 'i', 'o', 'u']) { "n" } else { "" }
        )),
    }
}

/// Value of the `key:` line of an fdinfo.
fn fdinfo_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// `eventfd-count` (hex) and `eventfd-semaphore` (absent before Linux 6.6: a kernel that
/// does not show it is taken as not in semaphore mode).
fn parse_eventfd(info: &str) -> Option<EventFdState> {
    Some(EventFdState {
        count: u64::from_str_radix(fdinfo_field(info, "eventfd-count")?, 16).ok()?,
        semaphore: fdinfo_field(info, "eventfd-semaphore") == Some("1"),
    })
}

/// `sigmask` (hex, as in /proc/PID/status).
fn parse_signalfd(info: &str) -> Option<SignalFdState> {
    Some(SignalFdState {
        sigmask: u64::from_str_radix(fdinfo_field(info, "sigmask")?, 16).ok()?,
    })
}

/// `(sec, nsec)` of a timerfd fdinfo, in ns.
fn parse_timespec(s: &str) -> Option<u64> {
    let (sec, nsec) = s.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    let sec: u64 = sec.trim().parse().ok()?;
    let nsec: u64 = nsec.trim().parse().ok()?;
    sec.checked_mul(1_000_000_000)?.checked_add(nsec)
}

/// clockid, ticks, settime flags (octal), it_value and it_interval of a timerfd fdinfo.
fn parse_timerfd(info: &str) -> Option<TimerFdState> {
    Some(TimerFdState {
        clockid: fdinfo_field(info, "clockid")?.parse().ok()?,
        ticks: fdinfo_field(info, "ticks")?.parse().ok()?,
        settime_flags: u32::from_str_radix(fdinfo_field(info, "settime flags")?, 8).ok()?,
        value_ns: parse_timespec(fdinfo_field(info, "it_value")?)?,
        interval_ns: parse_timespec(fdinfo_field(info, "it_interval")?)?,
        realtime_expiry_ns: None,
    })
}

/// The state of timerfd `fd` of `pid`. The fdinfo shows a periodic timer that expired and was
/// not read since as disarmed with one tick: the kernel counts the missed periods only when
/// the timer is read or queried. So the time left is queried (timerfd_gettime on a copy of the
/// fd, which counts them into `ticks` just as the process's next read would) before the
/// fdinfo is read for the ticks.
fn timerfd_state(
    pid: i32,
    fd: i32,
    info: &dyn Fn() -> std::result::Result<String, String>,
) -> std::result::Result<TimerFdState, String> {
    use std::os::fd::AsRawFd;
    let pidfd = crate::sys::pidfd_open(pid).map_err(|e| e.to_string())?;
    let copy = crate::sys::pidfd_getfd(&pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let gettime = || {
        // SAFETY: an all-zero itimerspec is a valid value.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: timerfd_gettime on our copy of the fd, writing one itimerspec.
        if unsafe { libc::timerfd_gettime(copy.as_raw_fd(), &mut cur) } != 0 {
            return Err(format!(
                "timerfd_gettime: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(cur)
    };
    let ns = |t: &libc::timespec| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    // A period that ends between the fdinfo read and the query after it is counted by that
    // query, not in the ticks read: the time left jumps up then, and it is read again.
    let mut before = gettime()?;
    let mut state = None;
    for _ in 0..3 {
        let s = parse_timerfd(&info()?)
            .ok_or("its fdinfo has no readable clockid/ticks/it_value lines")?;
        let after = gettime()?;
        let stable = ns(&after.it_value) <= ns(&before.it_value);
        state = Some(TimerFdState {
            value_ns: ns(&after.it_value),
            interval_ns: ns(&after.it_interval),
            ..s
        });
        if stable {
            break;
        }
        before = after;
    }
    let mut state = state.ok_or("its state could not be read")?;
    let wall_clock = matches!(
        state.clockid,
        libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM
    );
    if wall_clock && state.settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0 && state.value_ns > 0
    {
        state.realtime_expiry_ns =
            Some(crate::sys::clock_ns(libc::CLOCK_REALTIME) + state.value_ns as i64);
    }
    Ok(state)
}

/// One `inotify wd:` line of an inotify fdinfo: (wd, inode, kernel dev, mask, handle type,
/// handle bytes).
type InotifyLine = (i32, u64, u64, u32, i32, Vec<u8>);

fn parse_inotify(info: &str) -> Option<Vec<InotifyLine>> {
    let mut out = Vec::new();
    for l in info.lines().filter_map(|l| l.strip_prefix("inotify ")) {
        let get = |key: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix(':'))
        };
        let hex = |key: &str| get(key).and_then(|v| u64::from_str_radix(v, 16).ok());
        let handle = get("f_handle")?;
        let bytes = (0..handle.len() / 2)
            .map(|i| u8::from_str_radix(handle.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        if bytes.len() as u64 != hex("fhandle-bytes")? {
            return None;
        }
        out.push((
            i32::try_from(hex("wd")?).ok()?,
            hex("ino")?,
            hex("sdev")?,
            u32::try_from(hex("mask")?).ok()?,
            i32::try_from(hex("fhandle-type")?).ok()?,
            bytes,
        ));
    }
    Some(out)
}

/// The watches of inotify fd `fd` of `pid`, each resolved to a path from its file handle
/// (open_by_handle_at on a mount of its filesystem, then the path of what was opened,
/// checked to name the same inode from here). Refused if events are queued unread: they
/// cannot be put back into the queue.
fn inotify_state(pid: i32, fd: i32, info: &str) -> std::result::Result<InotifyState, String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let lines = parse_inotify(info).ok_or(
        "its fdinfo has unreadable `inotify wd:` lines (a kernel without file handles in it?)",
    )?;
    let pidfd = crate::sys::pidfd_open(pid).map_err(|e| e.to_string())?;
    let copy = crate::sys::pidfd_getfd(&pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 || queued > 0 {
        return Err(format!(
            "{queued} bytes of events are queued unread, and would be lost; checkpoint it once it has read them"
        ));
    }
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let mut watches = Vec::new();
    for (wd, ino, sdev, mask, htype, handle) in lines {
        let (major, minor) = (sdev >> 20, sdev & 0xf_ffff);
        let cant =
            |why: String| format!("watch {wd} (inode {ino} on device {major}:{minor}): {why}");
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&format!("{major}:{minor}").as_str()))
                    .then(|| f.get(4).map(|m| m.to_string()))?
            })
            .ok_or_else(|| cant("no mount of its filesystem in the process".into()))?;
        // Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
        let mount_dir = std::ffi::CString::new(format!("/proc/{pid}/root{mount}"))
            .map_err(|_| cant("a mount point with a NUL byte".into()))?;
        // SAFETY: open with a valid C string; the result is checked.
        let mfd = unsafe {
            libc::open(
                mount_dir.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if mfd < 0 {
            return Err(cant(format!(
                "cannot open its mount {mount} ({})",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: open returned a new descriptor we own.
        let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
        // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
        let mut fh = Vec::with_capacity(8 + handle.len());
        fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        fh.extend_from_slice(&htype.to_ne_bytes());
        fh.extend_from_slice(&handle);
        // SAFETY: fh is a complete struct file_handle; the result is checked.
        let obj = unsafe {
            libc::open_by_handle_at(
                mfd.as_raw_fd(),
                fh.as_mut_ptr() as *mut libc::file_handle,
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if obj < 0 {
            return Err(cant(format!(
                "its file handle cannot be opened ({}; deleted since?)",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: open_by_handle_at returned a new descriptor we own.
        let obj = unsafe { OwnedFd::from_raw_fd(obj) };
        let path = fs::read_link(format!("/proc/self/fd/{}", obj.as_raw_fd()))
            .map_err(|e| cant(format!("its path cannot be read ({e})")))?
            .to_string_lossy()
            .into_owned();
        let same = fs::symlink_metadata(&path).is_ok_and(|m| {
            m.ino() == ino
                && u64::from(libc::major(m.dev())) == major
                && u64::from(libc::minor(m.dev())) == minor
        });
        if !same {
            return Err(cant(format!("{path}, its path as seen from krg, names another file (or nothing), so a restart could not watch it again")));
        }
        watches.push(InotifyWatch { wd, mask, path });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(InotifyState { watches })
}

/// One `tfd:` line of an epoll fdinfo: the registration, and the target file's offset,
/// inode and device (kernel-internal dev_t: major << 20 | minor).
#[derive(Debug, Clone, PartialEq)]
struct EpollLine {
    target: EpollTarget,
    pos: i64,
    ino: u64,
    sdev: u64,
}

/// `tfd: N events: X data: Y  pos:P ino:I sdev:D` lines (events, data, ino, sdev in hex).
fn parse_epoll_lines(info: &str) -> Option<Vec<EpollLine>> {
    let mut out = Vec::new();
    for l in info.lines().filter(|l| l.starts_with("tfd:")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let after = |key: &str| f.iter().position(|w| *w == key).and_then(|i| f.get(i + 1));
        let tagged = |key: &str| f.iter().find_map(|w| w.strip_prefix(key));
        out.push(EpollLine {
            target: EpollTarget {
                fd: after("tfd:")?.parse().ok()?,
                events: u32::from_str_radix(after("events:")?, 16).ok()?,
                data: u64::from_str_radix(after("data:")?, 16).ok()?,
            },
            pos: tagged("pos:")?.parse().ok()?,
            ino: u64::from_str_radix(tagged("ino:")?, 16).ok()?,
            sdev: u64::from_str_radix(tagged("sdev:")?, 16).ok()?,
        });
    }
    Some(out)
}

/// Every registration of epoll fd `epfd` must name an fd of the process open on the
/// registered file, restored as something epoll can watch: epoll keeps watching a file that
/// is still open elsewhere after its fd was closed (or reused for another file), and a
/// restart could not register that file under that number.
fn check_epoll_targets(
    pid: i32,
    epfd: i32,
    lines: &[EpollLine],
    policy: &FdPolicy,
) -> std::result::Result<(), String> {
    let mut bad = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = &l.target;
        // The same number can be registered more than once (with different files): kcmp
        // names a registration by its number and its rank among those with that number, in
        // the order the fdinfo lists them.
        let toff = lines[..i].iter().filter(|o| o.target.fd == t.fd).count();
        let same =
            same_epoll_target(pid, epfd, t.fd, toff as u32).unwrap_or_else(|| same_file(pid, l));
        if !same {
            bad.push(format!(
                "it watches fd {} (events {:#x}, data {:#x}), which was closed or now names another file: epoll still watches the file the fd had, and a restart could not register it again (have the program remove it with EPOLL_CTL_DEL before closing the fd)",
                t.fd, t.events, t.data
            ));
        } else if policy.get(t.fd) == Some(FdChoice::DevNull) {
            bad.push(format!(
                "it watches fd {}, which is to be restored as /dev/null (--drop {}), which epoll cannot watch: drop the epoll fd as well, or keep fd {}",
                t.fd, t.fd, t.fd
            ));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "anon_inode:[eventpoll], an epoll instance: {}",
            bad.join("; ")
        ))
    }
}

/// kcmp(KCMP_EPOLL_TFD): whether registration (`tfd`, `toff`) of epoll fd `epfd` is the file
/// at fd `tfd` of `pid`. None if kcmp is not available (a kernel without CONFIG_KCMP).
fn same_epoll_target(pid: i32, epfd: i32, tfd: i32, toff: u32) -> Option<bool> {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    #[repr(C)]
    struct KcmpEpollSlot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = KcmpEpollSlot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff,
    };
    // SAFETY: kcmp reads the slot struct; it changes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            tfd as libc::c_long,
            &slot as *const KcmpEpollSlot,
        )
    };
    match (r, std::io::Error::last_os_error().raw_os_error()) {
        (0, _) => Some(true),
        (r, _) if r > 0 => Some(false),
        // No fd `tfd` in the process (EBADF), or no such registration (ENOENT).
        (_, Some(libc::EBADF) | Some(libc::ENOENT)) => Some(false),
        _ => None,
    }
}

/// Without kcmp: whether fd `l.target.fd` of `pid` has the inode, device and offset the
/// registration's file has. (Anonymous-inode objects of one kind share an inode, so this
/// cannot tell two eventfds apart; kcmp can.)
fn same_file(pid: i32, l: &EpollLine) -> bool {
    let Ok(md) = fs::metadata(format!("/proc/{pid}/fd/{}", l.target.fd)) else {
        return false;
    };
    let kernel_dev = (u64::from(libc::major(md.dev())) << 20) | u64::from(libc::minor(md.dev()));
    let pos = procfs::fdinfo(pid, l.target.fd).map(|(p, _)| p).ok();
    md.ino() == l.ino && kernel_dev == l.sdev && pos == Some(l.pos)
}

fn on_procfs(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and an out struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == PROC_SUPER_MAGIC }
}

/// Description of socket inode `ino` (protocol, addresses, state), from the tables of the
/// process's network namespace, for messages.
fn describe_socket(pid: i32, ino: u64) -> Option<String> {
    for (table, proto) in [
        ("tcp", "TCP"),
        ("tcp6", "TCP"),
        ("udp", "UDP"),
        ("udp6", "UDP"),
    ] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        if let Some(d) = text.lines().skip(1).find_map(|l| inet_line(l, ino, proto)) {
            return Some(d);
        }
    }
    let unix = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    if let Some(d) = unix.lines().skip(1).find_map(|l| unix_line(l, ino)) {
        return Some(d);
    }
    for (table, proto, col) in [
        ("netlink", "Netlink", 9),
        ("packet", "packet", 8),
        ("raw", "raw IP", 9),
        ("raw6", "raw IPv6", 9),
    ] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        let found = text.lines().skip(1).any(|l| {
            l.split_whitespace()
                .nth(col)
                .and_then(|i| i.parse::<u64>().ok())
                == Some(ino)
        });
        if found {
            return Some(format!("{proto} socket"));
        }
    }
    None
}

/// A line of /proc/net/{tcp,tcp6,udp,udp6} if it is socket `ino`.
fn inet_line(line: &str, ino: u64, proto: &str) -> Option<String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(9)?.parse::<u64>().ok()? != ino {
        return None;
    }
    let local = inet_addr(f.get(1)?)?;
    let remote = inet_addr(f.get(2)?)?;
    let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
    let unbound = |a: &std::net::SocketAddr| a.port() == 0 && a.ip().is_unspecified();
    Some(if proto == "TCP" && state == 0x0A {
        format!("TCP listening on {local}")
    } else if proto == "TCP" {
        format!("TCP {local} -> {remote} ({})", tcp_state(state))
    } else if unbound(&remote) {
        format!("UDP bound to {local}")
    } else {
        format!("UDP {local} -> {remote}")
    })
}

fn tcp_state(st: u8) -> &'static str {
    match st {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0B => "CLOSING",
        _ => "unknown state",
    }
}

/// "0100007F:1F90" (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them: each
/// 32-bit word of the address in host byte order, the port in host order.
fn inet_addr(s: &str) -> Option<std::net::SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| {
        a.get(i * 8..i * 8 + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip: std::net::IpAddr = match a.len() {
        8 => std::net::Ipv4Addr::from(word(0)?).into(),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            std::net::Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// A line of /proc/net/unix if it is socket `ino`.
fn unix_line(line: &str, ino: u64) -> Option<String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(6)?.parse::<u64>().ok()? != ino {
        return None;
    }
    let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
    let ty = match u16::from_str_radix(f.get(4)?, 16).ok()? {
        1 => "stream",
        2 => "datagram",
        5 => "seqpacket",
        _ => "",
    };
    let state = u8::from_str_radix(f.get(5)?, 16).ok()?;
    let name = match f.get(7) {
        Some(p) => format!("at {p}"),
        None => "unnamed".into(),
    };
    // __SO_ACCEPTCON in the flags marks a listening socket.
    Some(if flags & 0x1_0000 != 0 {
        format!("Unix {ty} socket listening {name}")
    } else if state == 3 {
        format!("Unix {ty} socket, connected, {name}")
    } else {
        format!("Unix {ty} socket, {name}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_and_signalfd_fdinfo_are_parsed() {
        let e = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\neventfd-count:               1a\neventfd-id: 2\neventfd-semaphore: 1\n";
        assert_eq!(
            parse_eventfd(e),
            Some(EventFdState {
                count: 26,
                semaphore: true
            })
        );
        // Kernels before 6.6 do not show the semaphore mode.
        assert_eq!(
            parse_eventfd("eventfd-count: 5\n").map(|e| e.semaphore),
            Some(false)
        );
        assert_eq!(parse_eventfd("pos:\t0\n"), None);
        let s = "pos:\t0\nflags:\t02000002\nsigmask:\t0000000800000200\n";
        assert_eq!(
            parse_signalfd(s).map(|m| m.sigmask),
            Some((1 << (libc::SIGUSR1 - 1)) | (1 << 35))
        );
    }

    #[test]
    fn timerfd_fdinfo_is_parsed() {
        let t = "pos:\t0\nflags:\t02\nclockid: 0\nticks: 3\nsettime flags: 01\nit_value: (99, 684346951)\nit_interval: (0, 100000000)\n";
        assert_eq!(
            parse_timerfd(t),
            Some(TimerFdState {
                clockid: 0,
                ticks: 3,
                settime_flags: 1,
                value_ns: 99_684_346_951,
                interval_ns: 100_000_000,
                realtime_expiry_ns: None,
            })
        );
        assert_eq!(parse_timerfd("clockid: 0\nticks: x\n"), None);
    }

    #[test]
    fn epoll_fdinfo_lines_are_parsed() {
        let e = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n\
                 tfd:        4 events: 40000019 data:                7  pos:0 ino:40e sdev:10\n\
                 tfd:       12 events: 80000019 data: ffffffffffffffff  pos:5 ino:3c4a7 sdev:fe00000\n";
        let l = parse_epoll_lines(e).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0].target,
            EpollTarget {
                fd: 4,
                events: 0x4000_0019,
                data: 7
            }
        );
        assert_eq!((l[1].target.fd, l[1].target.data), (12, u64::MAX));
        assert_eq!((l[1].pos, l[1].ino, l[1].sdev), (5, 0x3c4a7, 0xfe0_0000));
        assert_eq!(parse_epoll_lines("pos:\t0\n"), Some(vec![]));
        assert_eq!(
            parse_epoll_lines("tfd: 4 events: zz data: 1 pos:0 ino:1 sdev:1\n"),
            None
        );
    }

    #[test]
    fn policy_refuses_two_choices_for_one_fd() {
        let mut p = FdPolicy::new();
        p.choose(5, FdChoice::DevNull).unwrap();
        p.choose(5, FdChoice::DevNull).unwrap();
        let e = p.choose(5, FdChoice::External).unwrap_err().to_string();
        assert!(e.contains("--drop") && e.contains("--external"), "{e}");
        assert!(p.choose(-1, FdChoice::DevNull).is_err());
        assert_eq!(p.get(5), Some(FdChoice::DevNull));
        assert_eq!(p.get(6), None);
    }

    #[test]
    fn tcp_lines_are_described_with_addresses_and_state() {
        let l = "   1: 0100007F:D4F4 0200000A:0050 01 00000000:00000000 00:00000000 00000000     0        0 3673 1 0000000000000000 20 4 1 130 146";
        let d = inet_line(l, 3673, "TCP").unwrap();
        assert_eq!(d, "TCP 127.0.0.1:54516 -> 10.0.0.2:80 (ESTABLISHED)");
        assert!(inet_line(l, 3674, "TCP").is_none());
        let l = "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1070 1";
        assert_eq!(
            inet_line(l, 1070, "TCP").unwrap(),
            "TCP listening on 0.0.0.0:2024"
        );
        let l6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1";
        assert_eq!(
            inet_line(l6, 77, "TCP").unwrap(),
            "TCP listening on [::1]:8080"
        );
    }

    #[test]
    fn unix_lines_tell_socketpairs_from_listeners() {
        let pair = "00000000eebbe3db: 00000003 00000000 00000000 0001 03  3665";
        assert!(unix_line(pair, 3665)
            .unwrap()
            .contains("stream socket, connected, unnamed"));
        let listen = "0000000012345678: 00000002 00000000 00010000 0001 01 4000 /run/x.sock";
        assert_eq!(
            unix_line(listen, 4000).unwrap(),
            "Unix stream socket listening at /run/x.sock"
        );
    }

    #[test]
    fn refusal_names_the_process_and_the_fd_options() {
        let m = refusal_message(
            42,
            "prog",
            &[Problem {
                fd: Some(5),
                what: "fd 5: pipe:[1]".into(),
                hint: None,
            }],
        );
        assert!(m.starts_with("process 42 (prog)"), "{m}");
        assert!(
            m.contains("fd 5: pipe:[1]") && m.contains("--drop FD"),
            "{m}"
        );
    }
}
