//! The threads other than the main one: freezing them all at export and capturing what the
//! kernel keeps per thread (registers with fs/gs base, XSAVE state, signal mask and pending
//! signals, rseq, robust futex list, alternate stack, clear_child_tid), and recreating them at
//! import with clone3 `set_tid` inside the restored process, so that every TID comes back as
//! it was (glibc caches it in each thread's descriptor).
//!
//! The main thread's state stays in the [`ProcessImage`] fields it always had, so images
//! without threads read and restore as before.

use std::fs;

use crate::error::{GhostError, Result};
use crate::image::{AltStack, PendingSignal, ProcessImage, Rseq, ThreadImage};
use crate::procfs;
use crate::sys::{self, Regs, Remote};

/// prctl(2) option returning the thread's clear_child_tid (CONFIG_CHECKPOINT_RESTORE).
const PR_GET_TID_ADDRESS: u64 = 40;
/// clone3 flags of a thread like the ones pthread_create makes; TLS, clear_child_tid and the
/// rest are set afterwards from the image.
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// A thread held stopped by the exporter, with what it needs to be let go unchanged.
pub(crate) struct Held {
    /// Host TID.
    pub tid: i32,
    /// Registers at the freeze, put back before the detach.
    pub regs: Option<Regs>,
    /// Signals that arrived while syscalls were injected; sent again after the detach.
    pub held: Vec<i32>,
}

/// Seizes and interrupts every thread of `pid` but the main one (already frozen by the
/// caller), pushing each onto `out` as soon as it is traced so that the caller's guard lets
/// it go on any error. A thread may start another until it is stopped itself, so the task
/// list is read again until it holds no thread not yet frozen.
pub(crate) fn freeze_others(pid: i32, out: &mut Vec<Held>) -> Result<()> {
    loop {
        let mut fresh = Vec::new();
        for tid in task_ids(pid)? {
            if tid == pid || out.iter().any(|h| h.tid == tid) {
                continue;
            }
            match sys::seize(tid) {
                Ok(()) => {}
                // Exited between the listing and the seize: nothing to capture.
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {
                    continue
                }
                Err(e) => return Err(e),
            }
            out.push(Held {
                tid,
                regs: None,
                held: Vec::new(),
            });
            sys::interrupt(tid)?;
            fresh.push(tid);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        for tid in fresh {
            let st = sys::wait(tid)?;
            if !libc::WIFSTOPPED(st) {
                return Err(GhostError::Process {
                    pid,
                    msg: format!(
                        "thread {tid} {} while being frozen; try the checkpoint again",
                        sys::describe_status(st)
                    ),
                });
            }
        }
    }
}

/// TIDs of `pid`'s threads, ascending.
fn task_ids(pid: i32) -> Result<Vec<i32>> {
    let dir = fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| GhostError::sys("listing /proc/PID/task", pid, e))?;
    let mut tids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// What a stopped thread reports from the outside (ptrace and /proc); its alternate stack and
/// clear_child_tid are asked from inside ([`ask`]).
pub(crate) fn capture(pid: i32, tid: i32) -> Result<(ThreadImage, Regs)> {
    let regs = sys::get_regs(tid)?;
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .map_err(|e| GhostError::sys("reading /proc/PID/task/TID/status", tid, e))?;
    let pending = sys::peek_siginfo(tid, false)?
        .into_iter()
        .map(|siginfo| PendingSignal {
            shared: false,
            siginfo,
        })
        .collect();
    let (robust_head, robust_len) = robust_list(tid);
    let t = ThreadImage {
        tid: procfs::status_ns_last(&status, "NSpid").unwrap_or(tid),
        host_tid: tid,
        comm: fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        regs: sys::regs_to_bytes(&regs),
        xstate: sys::get_xstate(tid)?,
        sigmask: sys::get_sigmask(tid)?,
        pending,
        rseq: sys::rseq_config(tid)?.map(|(ptr, len, sig)| Rseq { ptr, len, sig }),
        robust_head,
        robust_len,
        sigaltstack: None,
        clear_child_tid: 0,
    };
    Ok((t, regs))
}

/// The alternate signal stack and clear_child_tid of the thread `remote` injects into, asked
/// with injected sigaltstack and PR_GET_TID_ADDRESS through `scratch` (a page of the process
/// read through `mem`). A kernel without PR_GET_TID_ADDRESS gives 0: the thread then comes
/// back without it, as pthread_join of a detached thread would see anyway.
pub(crate) fn ask(
    remote: &Remote,
    mem: &sys::ProcMem,
    scratch: u64,
) -> Result<(Option<AltStack>, u64)> {
    remote.call_ok(
        "sigaltstack",
        libc::SYS_sigaltstack,
        [0, scratch, 0, 0, 0, 0],
    )?;
    let mut b = [0u8; 24];
    mem.read(scratch, &mut b)
        .map_err(|e| GhostError::sys("reading sigaltstack", remote.pid, e))?;
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        a
    };
    let sp = u64::from_le_bytes(word(0));
    let flags = i32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
    let size = u64::from_le_bytes(word(16));
    let alt = (flags & libc::SS_DISABLE == 0).then_some(AltStack { sp, flags, size });
    let r = remote.call(
        libc::SYS_prctl,
        [PR_GET_TID_ADDRESS, scratch + 64, 0, 0, 0, 0],
    )?;
    let mut c = [0u8; 8];
    let ctid = if r == 0 {
        mem.read(scratch + 64, &mut c)
            .map_err(|e| GhostError::sys("reading clear_child_tid", remote.pid, e))?;
        u64::from_le_bytes(c)
    } else {
        0
    };
    Ok((alt, ctid))
}

/// get_robust_list of a thread; (0, 0) if it has none or it cannot be read.
pub(crate) fn robust_list(tid: i32) -> (u64, u64) {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: out pointers are valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r == 0 {
        (head, len as u64)
    } else {
        (0, 0)
    }
}

/// Recreates the image's other threads in the process `main` injects into (whose memory,
/// fds and signal dispositions are already restored, its PID the image's: the new TIDs are
/// taken in its PID namespace). Each thread is left stopped with its registers, XSAVE
/// state, mask and kernel registrations restored; its host TID is pushed onto `made` as soon
/// as it exists, so that the caller detaches (or, on error, reaps) every one of them.
/// `put` writes into the scratch page at an offset and returns the address.
pub(crate) fn recreate(
    main: &Remote,
    put: &dyn Fn(u64, &[u8]) -> Result<u64>,
    meta: &ProcessImage,
    made: &mut Vec<i32>,
) -> Result<()> {
    if meta.threads.is_empty() {
        return Ok(());
    }
    sys::set_options(
        main.pid,
        sys::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE as i64,
    )?;
    let me = main.call_ok("getpid", libc::SYS_getpid, [0; 6])?;
    for t in &meta.threads {
        let step = |what: &str| format!("thread {}: {what}", t.tid);
        let restore_err = |what: &str, e: GhostError| GhostError::Restore {
            step: step(what),
            msg: e.to_string(),
        };
        let tid_at = put(512, &(t.tid as u64).to_le_bytes())?;
        // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size (cgroup left out: size 80).
        let mut args = Vec::with_capacity(80);
        for v in [THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, tid_at, 1] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        let at = put(0, &args)?;
        main.cloned.set(None);
        let r = main.call(libc::SYS_clone3, [at, args.len() as u64, 0, 0, 0, 0])?;
        if r == -(libc::EEXIST as i64) {
            return Err(GhostError::Restore {
                step: step("clone3"),
                msg: format!(
                    "TID {} is in use here; restart inside a fresh PID namespace (`krg restart` does)",
                    t.tid
                ),
            });
        }
        if r < 0 {
            return Err(restore_err(
                "clone3",
                GhostError::sys(
                    "clone3 (injected)",
                    main.pid,
                    std::io::Error::from_raw_os_error(-r as i32),
                ),
            ));
        }
        let host = main.cloned.take().ok_or_else(|| GhostError::Restore {
            step: step("clone3"),
            msg: "the new thread was not reported (PTRACE_EVENT_CLONE missing)".into(),
        })?;
        made.push(host);
        // Traced from birth (PTRACE_O_TRACECLONE), it stops before running any instruction.
        let st = sys::wait(host)?;
        if !libc::WIFSTOPPED(st) {
            return Err(GhostError::Restore {
                step: step("first stop"),
                msg: sys::describe_status(st),
            });
        }
        let remote = Remote::new(host, main.syscall_at)?;
        if t.robust_head != 0 {
            remote
                .call_ok(
                    "set_robust_list",
                    libc::SYS_set_robust_list,
                    [t.robust_head, t.robust_len, 0, 0, 0, 0],
                )
                .map_err(|e| restore_err("set_robust_list", e))?;
        }
        if let Some(rs) = &t.rseq {
            remote
                .call_ok(
                    "rseq",
                    libc::SYS_rseq,
                    [rs.ptr, rs.len as u64, 0, rs.sig as u64, 0, 0],
                )
                .map_err(|e| restore_err("register rseq", e))?;
        }
        if let Some(ss) = &t.sigaltstack {
            let p = put(0, &crate::import::altstack_bytes(ss))?;
            remote
                .call_ok("sigaltstack", libc::SYS_sigaltstack, [p, 0, 0, 0, 0, 0])
                .map_err(|e| restore_err("sigaltstack", e))?;
        }
        // Returns the caller's TID: the check that the TID really came back.
        let got = remote
            .call_ok(
                "set_tid_address",
                libc::SYS_set_tid_address,
                [t.clear_child_tid, 0, 0, 0, 0, 0],
            )
            .map_err(|e| restore_err("set_tid_address", e))?;
        if got != t.tid as u64 {
            return Err(GhostError::Restore {
                step: step("set_tid"),
                msg: format!("the thread came back as TID {got}, not {}", t.tid),
            });
        }
        // Queued by the thread group leader: a thread sending to itself is refused
        // kernel-generated si_codes (its TID is not the TGID).
        crate::import::requeue(main, put, me, Some(t.tid as u64), &t.pending)?;
        crate::import::set_name(&remote, put, &t.comm)?;
        let regs = sys::regs_from_bytes(&t.regs).ok_or_else(|| {
            GhostError::BadImage(format!("registers of thread {} are damaged", t.tid))
        })?;
        sys::set_sigmask(host, t.sigmask)?;
        sys::set_regs(host, &sys::resume_regs(regs))?;
        sys::set_xstate(host, &t.xstate).map_err(|e| restore_err("restore FPU/AVX state", e))?;
    }
    Ok(())
}
