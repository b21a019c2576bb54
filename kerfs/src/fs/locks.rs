//! Record locks of the mount: fcntl (POSIX and OFD) and flock requests from the kernel
//! become cluster lock commands, so a lock taken through one mount holds against every
//! other mount of the cluster.
//!
//! The cluster never waits: a lock that is taken answers EAGAIN. A blocking request
//! (F_SETLKW, flock without LOCK_NB) waits here, in the task that serves it, polling the
//! cluster with a read (no log entry per poll) every 20 ms at first and then every 100 ms,
//! and trying the lock again whenever the read says it is free; an unlock through this
//! same mount wakes its waiters at once. It gives up only when the
//! waiting thread has a signal to take ([`signal_pending`]): the reply is then EINTR, which
//! the kernel turns into a restart of the call or EINTR, as for a local lock. fuser 0.18
//! answers FUSE_INTERRUPT with ENOSYS itself, so without this check a waiter killed with
//! SIGKILL would hang in D state until the lock came free.
//!
//! Who releases what:
//! - a POSIX lock goes when its process closes any descriptor of the file: FUSE flush
//!   carries the process's lock owner and [`KerFs::release_owner_locks`] sends
//!   `ReleaseLocks` (only for owners this mount saw lock the file, so a plain close costs
//!   no cluster command);
//! - flock and OFD locks belong to the open file description and go with its last close:
//!   the cluster drops every lock of a handle when the handle is closed (FUSE release);
//! - a mount that dies loses its session, and the session's expiry closes its handles
//!   (`-o lease=SECS` says how soon).
//!
//! A blocked POSIX request is sent again every second rather than only polled: the cluster
//! keeps it recorded as waiting, and answers EDEADLK when it closes a cycle of waiters
//! (across mounts); an interrupted waiter has its record dropped.
//!
//! Known differences from local locks:
//! - no FIFO order among waiters (neither has Linux's POSIX locks), and a waiter notices a
//!   release on another mount within one poll period, not at once;
//! - flock and OFD locks are freed by FUSE release, which the kernel sends in the background
//!   after the last close: another mount may see them for a moment after close(2) returns
//!   (a blocking request simply waits for it);
//! - the pid F_GETLK shows is the holder's on its own machine;
//! - data: an unlock writes back what this mount buffered, but another mount's page cache
//!   and chunk tables are only refreshed by an open (close-to-open), not by taking a lock;
//! - flock on a directory stays local: the kernel does not send it to FUSE.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use kerfs_proto::{GetLock, LockKind, LockType, SetLock};
use tracing::warn;

use super::{lock, KerFs};
use crate::error::{FsError, FsResult};

/// First and longest pause between two polls of a blocked lock request.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(100);
/// How often a blocked POSIX request is sent again (not just polled with a read): it keeps
/// the waiter recorded for deadlock detection (the cluster forgets it after 3 s).
const REFRESH_WAIT: Duration = Duration::from_secs(1);

/// The largest offset the kernel accepts in a lock (OFFSET_MAX): a lock "to end of file".
const OFFSET_MAX: u64 = i64::MAX as u64;

/// A lock as the kernel describes it (`struct fuse_file_lock`): inclusive byte range,
/// F_RDLCK / F_WRLCK / F_UNLCK, and the pid to show in F_GETLK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLock {
    pub start: u64,
    pub end: u64,
    pub typ: i32,
    pub pid: u32,
}

/// What a mount keeps about its locks.
#[derive(Debug, Default)]
pub(crate) struct MountLocks {
    /// (cluster inode, lock owner) pairs that took a POSIX lock through this mount and have
    /// not closed a descriptor of the file since: the only flushes that need a command.
    owners: Mutex<HashSet<(u64, u64)>>,
    /// Signalled after every unlock sent from here: waiters on this mount try again now
    /// instead of at their next poll.
    released: tokio::sync::Notify,
}

fn lock_type(typ: i32) -> FsResult<LockType> {
    match typ {
        libc::F_RDLCK => Ok(LockType::Read),
        libc::F_WRLCK => Ok(LockType::Write),
        libc::F_UNLCK => Ok(LockType::Unlock),
        _ => Err(FsError::new(
            libc::EINVAL,
            format!("unknown lock type {typ}"),
        )),
    }
}

fn kernel_type(t: i32) -> i32 {
    if t == LockType::Write as i32 {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    }
}

impl KerFs {
    /// F_GETLK (and F_OFD_GETLK): the first lock of another owner, on any mount, that
    /// would stop `want`; `want` itself with type F_UNLCK when none would.
    pub async fn getlk(&self, fh: u64, owner: u64, want: KernelLock) -> FsResult<KernelLock> {
        let file = self.file(fh)?;
        let typ = lock_type(want.typ)?;
        if typ == LockType::Unlock {
            return Err(FsError::new(libc::EINVAL, "F_GETLK of an unlock"));
        }
        let held = self
            .client
            .get_lock(GetLock {
                ino: file.ino,
                client_id: 0, // this session
                owner,
                start: want.start,
                end: want.end,
                r#type: typ as i32,
                kind: LockKind::Posix as i32,
            })
            .await?;
        Ok(match held {
            Some(l) => KernelLock {
                start: l.start.min(OFFSET_MAX),
                end: l.end.min(OFFSET_MAX),
                typ: kernel_type(l.r#type),
                // The holder's pid as its own mount saw it: right when both mounts are on
                // one machine; the kernel shows 0 for a pid it does not know.
                pid: l.pid,
            },
            None => KernelLock {
                typ: libc::F_UNLCK,
                ..want
            },
        })
    }

    /// F_SETLK / F_SETLKW / flock: takes, changes or releases a lock of `kind`. With
    /// `sleep`, waits until the lock is granted or thread `tid` (0: nobody to watch) has a
    /// signal to take (EINTR).
    pub async fn setlk(
        &self,
        fh: u64,
        owner: u64,
        want: KernelLock,
        kind: LockKind,
        sleep: bool,
        tid: u32,
    ) -> FsResult<()> {
        let file = self.file(fh)?;
        let typ = lock_type(want.typ)?;
        file.locked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if typ == LockType::Unlock {
            // Whoever takes the lock next, on any mount, must find what was written under
            // it: push it out of the write-behind buffer before letting go.
            if let Err(e) = file.data.publish().await {
                warn!(ino = file.ino, error = %e, "writing data back before an unlock");
            }
        } else if kind == LockKind::Posix {
            lock(&self.locks.owners).insert((file.ino, owner));
        }
        let req = SetLock {
            handle: file.handle,
            owner,
            pid: want.pid,
            start: want.start,
            end: want.end,
            r#type: typ as i32,
            kind: kind as i32,
            // Only POSIX waiters take part in deadlock detection, as on Linux.
            wait: sleep && kind == LockKind::Posix,
        };
        let mut pause = POLL_FIRST;
        loop {
            let attempt = tokio::time::Instant::now();
            // Created before the attempt, so an unlock on this mount right after a refusal
            // is not missed (tokio wakes a `notified()` from its creation on).
            let released = self.locks.released.notified();
            tokio::pin!(released);
            match self.client.set_lock(req).await {
                Ok(()) => {
                    if typ == LockType::Unlock {
                        self.locks.released.notify_waiters();
                    }
                    return Ok(());
                }
                Err(e) if sleep && e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(e.into()),
            }
            // Taken: wait with cheap reads until it looks free (read at once when something
            // was unlocked here), then try again; another waiter may get there first, then
            // we wait again.
            loop {
                if tid != 0 && signal_pending(tid) {
                    if req.wait {
                        if let Err(e) = self.client.cancel_lock_wait(owner).await {
                            warn!(error = %e, "forgetting an interrupted lock wait");
                        }
                    }
                    return Err(FsError::new(
                        libc::EINTR,
                        format!(
                            "waiting for a lock on inode {} interrupted by a signal",
                            file.ino
                        ),
                    ));
                }
                let woken = tokio::select! {
                    _ = tokio::time::sleep(pause) => false,
                    _ = &mut released => true,
                };
                pause = (pause * 3 / 2).min(POLL_MAX);
                if req.wait && attempt.elapsed() >= REFRESH_WAIT {
                    break; // ask again: stays recorded as waiting, or gets it
                }
                if woken {
                    // Spent: watch again from before the read below.
                    released.set(self.locks.released.notified());
                }
                let held = self
                    .client
                    .get_lock(GetLock {
                        ino: file.ino,
                        client_id: 0,
                        owner,
                        start: want.start,
                        end: want.end,
                        r#type: typ as i32,
                        kind: kind as i32,
                    })
                    .await?;
                if held.is_none() {
                    break;
                }
            }
        }
    }

    /// A descriptor of the file open as `fh` was closed by the process with lock owner
    /// `owner`: its POSIX locks on the file go (on every descriptor, as POSIX says).
    pub async fn release_owner_locks(&self, fh: u64, owner: u64) -> FsResult<()> {
        let file = self.file(fh)?;
        if !lock(&self.locks.owners).remove(&(file.ino, owner)) {
            return Ok(());
        }
        let r = self
            .client
            .release_locks(file.handle, owner, LockKind::Posix)
            .await;
        self.locks.released.notify_waiters();
        Ok(r?)
    }
}

/// Which namespace a lock request belongs to. The kernel marks flock requests with
/// FUSE_LK_FLOCK, but fuser 0.18 does not pass that flag on; the requesting thread is
/// still inside its system call while we serve it, so /proc says which call it is. When
/// that cannot be read (the thread is gone, or the mount may not look), the request is
/// taken as POSIX: flock then behaves as on NFS (a whole-file POSIX lock of the open file).
pub fn lock_kind_of(tid: u32) -> LockKind {
    if tid == 0 {
        return LockKind::Posix;
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{tid}/syscall")) else {
        return LockKind::Posix;
    };
    match s.split_whitespace().next().map(str::parse::<i64>) {
        Some(Ok(nr)) if nr == libc::SYS_flock => LockKind::Flock,
        _ => LockKind::Posix,
    }
}

/// Whether thread `tid` has a signal waiting that it neither blocks nor ignores: a blocked
/// lock request must then return so the signal can be taken (the kernel restarts the call
/// afterwards unless the handler says otherwise). Signals sent to the whole process count
/// only for a single-threaded one: otherwise the kernel may give them to another thread,
/// exactly as a local lock waiter would stay blocked. SIGKILL is queued on every thread.
/// When /proc cannot say (another pid namespace), nothing is pending: answering EINTR with
/// no signal to take would hand the program a raw ERESTARTSYS.
pub fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mask = |name: &str| -> u64 {
        field(name)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let mut pending = mask("SigPnd:");
    if field("Threads:") == Some("1") {
        pending |= mask("ShdPnd:");
    }
    pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_types_map_both_ways() {
        assert_eq!(lock_type(libc::F_RDLCK).unwrap(), LockType::Read);
        assert_eq!(lock_type(libc::F_WRLCK).unwrap(), LockType::Write);
        assert_eq!(lock_type(libc::F_UNLCK).unwrap(), LockType::Unlock);
        assert_eq!(lock_type(77).unwrap_err().errno, libc::EINVAL);
        assert_eq!(kernel_type(LockType::Write as i32), libc::F_WRLCK);
        assert_eq!(kernel_type(LockType::Read as i32), libc::F_RDLCK);
    }

    #[test]
    fn a_running_thread_is_not_in_flock_and_has_no_signal() {
        let tid = std::process::id();
        assert_eq!(lock_kind_of(tid), LockKind::Posix);
        assert_eq!(lock_kind_of(0), LockKind::Posix);
        assert!(!signal_pending(tid));
        // A thread /proc does not show: nothing to interrupt for.
        assert!(!signal_pending(u32::MAX - 1));
    }
}
