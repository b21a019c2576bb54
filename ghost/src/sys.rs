//! Thin, checked wrappers over ptrace, remote memory access and syscall injection.
//!
//! Syscalls are injected by pointing the tracee's instruction pointer at a `syscall`
//! instruction and single-stepping it: the kernel reports a SIGTRAP as soon as the syscall
//! returns, so no breakpoint has to be written into the tracee's code (writing one into a
//! file-backed text page would leave a private copy of that page behind).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::error::{GhostError, Result};

pub(crate) const PTRACE_SEIZE: libc::c_uint = 0x4206;
pub(crate) const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
pub(crate) const PTRACE_GETREGSET: libc::c_uint = 0x4204;
pub(crate) const PTRACE_SETREGSET: libc::c_uint = 0x4205;
pub(crate) const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
pub(crate) const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
pub(crate) const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
pub(crate) const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
pub(crate) const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
pub(crate) const PTRACE_O_EXITKILL: libc::c_long = 1 << 20;
const NT_X86_XSTATE: libc::c_long = 0x202;
/// Big enough for every XSAVE layout up to AMX; the kernel shortens the iovec to the real size.
const XSTATE_MAX: usize = 16384;

/// `struct user_regs_struct` (x86_64), as PTRACE_GETREGS returns it.
pub(crate) type Regs = libc::user_regs_struct;

pub(crate) fn regs_to_bytes(r: &Regs) -> Vec<u8> {
    let p = r as *const Regs as *const u8;
    // SAFETY: user_regs_struct is plain old data of 27 u64.
    unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<Regs>()) }.to_vec()
}

pub(crate) fn regs_from_bytes(b: &[u8]) -> Option<Regs> {
    if b.len() != std::mem::size_of::<Regs>() {
        return None;
    }
    // SAFETY: every bit pattern is a valid user_regs_struct; length checked above.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const Regs) })
}

fn ptrace(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> libc::c_long {
    // SAFETY: the callers pass addresses of live buffers of the size each request needs.
    unsafe {
        libc::ptrace(
            req,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    }
}

fn check(r: libc::c_long, what: &str, pid: i32) -> Result<libc::c_long> {
    if r == -1 {
        Err(GhostError::last_os(what, pid))
    } else {
        Ok(r)
    }
}

/// waitpid(pid, __WALL), retrying on EINTR.
pub(crate) fn wait(pid: i32) -> Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(GhostError::sys("waitpid", pid, e));
        }
    }
}

/// Describes a wait status for error messages.
pub(crate) fn describe_status(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exited with status {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("was killed by signal {}", libc::WTERMSIG(st))
    } else if libc::WIFSTOPPED(st) {
        format!(
            "stopped by signal {} (event {})",
            libc::WSTOPSIG(st),
            st >> 16
        )
    } else {
        format!("changed state (status {st:#x})")
    }
}

pub(crate) fn seize(pid: i32) -> Result<()> {
    check(ptrace(PTRACE_SEIZE, pid, 0, 0), "PTRACE_SEIZE", pid).map_err(|e| match e {
        GhostError::Sys { source, .. } => GhostError::Process {
            pid,
            msg: format!(
                "cannot trace it ({source}); it must exist, be single-threaded, not already \
                 traced (gdb, strace), and you need root or the same user with ptrace_scope 0"
            ),
        },
        e => e,
    })?;
    Ok(())
}

pub(crate) fn interrupt(pid: i32) -> Result<()> {
    check(ptrace(PTRACE_INTERRUPT, pid, 0, 0), "PTRACE_INTERRUPT", pid).map(|_| ())
}

/// Moves a tracee stopped after a single-step (a SIGTRAP signal-delivery-stop) into a
/// PTRACE_EVENT_STOP without running any of its code. Were the tracer killed while the tracee
/// waits in the single-step stop, the kernel would deliver that SIGTRAP on detach and kill the
/// process; from an event stop it just resumes.
pub(crate) fn park(pid: i32) -> Result<()> {
    interrupt(pid)?;
    // The interrupt is taken before any signal is dequeued and before user code runs.
    check(ptrace(libc::PTRACE_CONT, pid, 0, 0), "PTRACE_CONT", pid)?;
    let st = wait(pid)?;
    if libc::WIFSTOPPED(st) && st >> 16 == libc::PTRACE_EVENT_STOP {
        return Ok(());
    }
    Err(GhostError::Process {
        pid,
        msg: format!(
            "{} while being parked after the injected syscalls",
            describe_status(st)
        ),
    })
}

pub(crate) fn detach(pid: i32, sig: i32) -> Result<()> {
    check(
        ptrace(libc::PTRACE_DETACH, pid, 0, sig as usize),
        "PTRACE_DETACH",
        pid,
    )
    .map(|_| ())
}

pub(crate) fn set_options(pid: i32, opts: libc::c_long) -> Result<()> {
    check(
        ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts as usize),
        "PTRACE_SETOPTIONS",
        pid,
    )
    .map(|_| ())
}

pub(crate) fn get_regs(pid: i32) -> Result<Regs> {
    // SAFETY: zeroed POD.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    check(
        ptrace(libc::PTRACE_GETREGS, pid, 0, &mut r as *mut Regs as usize),
        "PTRACE_GETREGS",
        pid,
    )?;
    Ok(r)
}

pub(crate) fn set_regs(pid: i32, r: &Regs) -> Result<()> {
    check(
        ptrace(libc::PTRACE_SETREGS, pid, 0, r as *const Regs as usize),
        "PTRACE_SETREGS",
        pid,
    )
    .map(|_| ())
}

pub(crate) fn get_xstate(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    check(
        ptrace(
            PTRACE_GETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec as usize,
        ),
        "PTRACE_GETREGSET NT_X86_XSTATE",
        pid,
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub(crate) fn set_xstate(pid: i32, x: &[u8]) -> Result<()> {
    let mut iov = libc::iovec {
        iov_base: x.as_ptr() as *mut libc::c_void,
        iov_len: x.len(),
    };
    check(
        ptrace(
            PTRACE_SETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec as usize,
        ),
        "PTRACE_SETREGSET NT_X86_XSTATE",
        pid,
    )
    .map(|_| ())
}

pub(crate) fn get_sigmask(pid: i32) -> Result<u64> {
    let mut m = 0u64;
    check(
        ptrace(PTRACE_GETSIGMASK, pid, 8, &mut m as *mut u64 as usize),
        "PTRACE_GETSIGMASK",
        pid,
    )?;
    Ok(m)
}

pub(crate) fn set_sigmask(pid: i32, m: u64) -> Result<()> {
    check(
        ptrace(PTRACE_SETSIGMASK, pid, 8, &m as *const u64 as usize),
        "PTRACE_SETSIGMASK",
        pid,
    )
    .map(|_| ())
}

/// All pending siginfos of one queue (private or shared), 128 bytes each.
pub(crate) fn peek_siginfo(pid: i32, shared: bool) -> Result<Vec<Vec<u8>>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 128 * 32];
    loop {
        let args = Args {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: 32,
        };
        let n = check(
            ptrace(
                PTRACE_PEEKSIGINFO,
                pid,
                &args as *const Args as usize,
                buf.as_mut_ptr() as usize,
            ),
            "PTRACE_PEEKSIGINFO",
            pid,
        )? as usize;
        for i in 0..n {
            out.push(buf[i * 128..(i + 1) * 128].to_vec());
        }
        if n < 32 {
            return Ok(out);
        }
    }
}

/// (rseq area, length, signature), or None when the thread has no rseq registered.
pub(crate) fn rseq_config(pid: i32) -> Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        len: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    check(
        ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid,
            std::mem::size_of::<Conf>(),
            &mut c as *mut Conf as usize,
        ),
        "PTRACE_GET_RSEQ_CONFIGURATION",
        pid,
    )?;
    Ok(if c.ptr == 0 || c.len == 0 {
        None
    } else {
        Some((c.ptr, c.len, c.sig))
    })
}

/// Reads remote memory with process_vm_readv (readable mappings only).
pub(crate) fn vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: local iovec points into buf.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(if n == 0 {
                io::Error::new(io::ErrorKind::UnexpectedEof, "short process_vm_readv")
            } else {
                io::Error::last_os_error()
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes remote memory with process_vm_writev (writable mappings only).
pub(crate) fn vm_write(pid: i32, addr: u64, buf: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: local iovec points into buf.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(if n == 0 {
                io::Error::new(io::ErrorKind::UnexpectedEof, "short process_vm_writev")
            } else {
                io::Error::last_os_error()
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// Runs `f` with the calling thread able to create threads; fails if the caller's PID
/// namespace for new children cannot be put back afterwards.
///
/// After unshare(CLONE_NEWPID) (what `krg restart` does, so that the restored process gets a
/// PID namespace of its own) this thread's new children go to another namespace than the one
/// it lives in, and the kernel refuses to create threads (clone with CLONE_THREAD: EINVAL)
/// until the two agree again. For `f` the children's namespace is set back to our own; then
/// it is restored, so the caller's next child still goes where it asked. Without the rights
/// to switch (setns needs CAP_SYS_ADMIN) `f` runs unchanged and its threads fail to start.
pub(crate) fn with_threads_allowed<T>(f: impl FnOnce() -> T) -> io::Result<T> {
    let link = |n: &str| std::fs::read_link(format!("/proc/thread-self/ns/{n}"));
    let saved = match (link("pid"), link("pid_for_children")) {
        (Ok(own), Ok(children)) if own != children => children_ns_to_own().ok(),
        _ => None,
    };
    let out = f();
    if let Some(ns) = saved {
        // SAFETY: setns on a namespace fd we hold; it is a descendant of ours (we came from it).
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(out)
}

/// Points this thread's new children at its own PID namespace; returns the namespace they
/// went to before.
fn children_ns_to_own() -> io::Result<File> {
    let saved = File::open("/proc/thread-self/ns/pid_for_children")?;
    let own = File::open("/proc/thread-self/ns/pid")?;
    // SAFETY: setns on a namespace fd we just opened.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(saved)
}

/// /proc/PID/mem, which (unlike process_vm_*) reaches read-only and PROT_NONE pages.
pub(crate) struct ProcMem {
    file: File,
}

impl ProcMem {
    pub fn open(pid: i32) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| GhostError::sys("open /proc/PID/mem", pid, e))?;
        Ok(ProcMem { file })
    }
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
    pub fn write(&self, addr: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, addr)
    }
}

/// Injects system calls into a stopped tracee.
pub(crate) struct Remote {
    pub pid: i32,
    /// Address of a `syscall` instruction (0f 05) in the tracee.
    pub syscall_at: u64,
    /// Registers the injected calls start from (the tracee's state at the stop).
    pub base: Regs,
    /// Signals that arrived while we were stepping; they were held back and must be sent
    /// again once the tracee is released, so the process loses none.
    pub held: std::cell::RefCell<Vec<i32>>,
    /// Host TID of the thread the last injected clone3 created (PTRACE_EVENT_CLONE).
    pub cloned: std::cell::Cell<Option<i32>>,
}

impl Remote {
    /// Injection into `pid` through the `syscall` instruction at `syscall_at`, starting from
    /// its current registers.
    pub fn new(pid: i32, syscall_at: u64) -> Result<Self> {
        Ok(Remote {
            pid,
            syscall_at,
            base: get_regs(pid)?,
            held: Default::default(),
            cloned: Default::default(),
        })
    }
}

/// The registers a thread stopped at `regs` resumes with when restored: a thread caught in a
/// restartable syscall (futex wait, read, poll, epoll_wait...) re-runs it, one whose syscall
/// would be restarted through restart_syscall (nanosleep, clock_nanosleep, a futex wait with
/// a timeout) sees EINTR, since the kernel's restart block did not survive. orig_rax = -1
/// keeps the kernel from applying its own restart logic on top.
pub(crate) fn resume_regs(mut regs: Regs) -> Regs {
    const ERESTARTSYS: i64 = -512;
    const ERESTARTNOHAND: i64 = -514;
    const ERESTART_RESTARTBLOCK: i64 = -516;
    if (regs.orig_rax as i64) >= 0 {
        match regs.rax as i64 {
            ERESTARTNOHAND..=ERESTARTSYS => {
                regs.rax = regs.orig_rax;
                regs.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => regs.rax = (-libc::EINTR) as u64,
            _ => {}
        }
    }
    regs.orig_rax = u64::MAX;
    regs
}

/// tgkill(2): a signal to one thread.
pub(crate) fn tgkill(pid: i32, tid: i32, sig: i32) {
    // SAFETY: plain tgkill(2).
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
}

impl Remote {
    /// Runs one system call in the tracee and returns its raw result (-errno on failure).
    pub fn call(&self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let mut r = self.base;
        r.rip = self.syscall_at;
        r.rax = nr as u64;
        // orig_rax = -1 keeps the kernel's syscall-restart logic away from our registers.
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        set_regs(self.pid, &r)?;
        check(
            ptrace(libc::PTRACE_SINGLESTEP, self.pid, 0, 0),
            "PTRACE_SINGLESTEP",
            self.pid,
        )?;
        loop {
            let st = wait(self.pid)?;
            if libc::WIFSTOPPED(st) && st >> 16 == libc::PTRACE_EVENT_CLONE {
                // An injected clone3 of a thread (PTRACE_O_TRACECLONE): the call is still in
                // the kernel; step on to its return. The new thread is traced and stopped.
                let mut msg: libc::c_ulong = 0;
                check(
                    ptrace(
                        libc::PTRACE_GETEVENTMSG,
                        self.pid,
                        0,
                        &mut msg as *mut libc::c_ulong as usize,
                    ),
                    "PTRACE_GETEVENTMSG",
                    self.pid,
                )?;
                self.cloned.set(Some(msg as i32));
                check(
                    ptrace(libc::PTRACE_SINGLESTEP, self.pid, 0, 0),
                    "PTRACE_SINGLESTEP",
                    self.pid,
                )?;
                continue;
            }
            if libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP {
                break;
            }
            if libc::WIFSTOPPED(st) {
                if st >> 16 == 0 {
                    self.held.borrow_mut().push(libc::WSTOPSIG(st));
                }
                // Some other stop (a signal that is not blocked, a group stop): swallow it and
                // keep stepping; the real signal state is restored separately.
                check(
                    ptrace(libc::PTRACE_SINGLESTEP, self.pid, 0, 0),
                    "PTRACE_SINGLESTEP",
                    self.pid,
                )?;
                continue;
            }
            return Err(GhostError::Process {
                pid: self.pid,
                msg: format!("{} during an injected syscall {nr}", describe_status(st)),
            });
        }
        let after = get_regs(self.pid)?;
        if after.rip != self.syscall_at + 2 {
            return Err(GhostError::Process {
                pid: self.pid,
                msg: format!(
                    "injected syscall {nr} did not return where expected (rip {:#x})",
                    after.rip
                ),
            });
        }
        Ok(after.rax as i64)
    }

    /// Like `call` but turns -errno into an error naming `what`.
    pub fn call_ok(&self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self.call(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(GhostError::Sys {
                what: format!("{what} (injected)"),
                pid: self.pid,
                source: io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(r as u64)
    }
}

/// A pidfd for `pid` (to take copies of its fds with pidfd_getfd).
pub(crate) fn pidfd_open(pid: i32) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open with valid arguments; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(GhostError::last_os("pidfd_open", pid));
    }
    // SAFETY: pidfd_open returned a new descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of fd `fd` of the process of `pidfd` (same open file description).
pub(crate) fn pidfd_getfd(
    pidfd: &std::os::fd::OwnedFd,
    fd: i32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd with valid arguments; the result is checked.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd returned a new descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(got as i32) })
}

/// The time on `clock`, in ns.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; a clock that does not exist leaves it 0.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// (capacity, buffered bytes) of the pipe that fd `fd` of `pid` reads, without consuming
/// them: a copy of the fd is taken (pidfd_getfd) and the buffer duplicated with tee(2) into
/// a scratch pipe of the same capacity, which is then read.
pub(crate) fn peek_pipe(pid: i32, pidfd: &std::os::fd::OwnedFd, fd: i32) -> Result<(u32, Vec<u8>)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let what = |w: &str| format!("{w} (buffer of the pipe at fd {fd})");
    // SAFETY: pidfd_getfd with valid arguments; the result is checked.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(GhostError::last_os(what("pidfd_getfd"), pid));
    }
    // SAFETY: pidfd_getfd returned a new descriptor we own.
    let src = unsafe { OwnedFd::from_raw_fd(got as i32) };
    // SAFETY: fcntl/ioctl on our own fd.
    let cap = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(GhostError::last_os(what("F_GETPIPE_SZ"), pid));
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(src.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
        return Err(GhostError::last_os(what("FIONREAD"), pid));
    }
    if queued <= 0 {
        return Ok((cap as u32, Vec::new()));
    }
    let mut p = [0i32; 2];
    // SAFETY: p is a 2-int array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(GhostError::last_os(what("pipe2"), pid));
    }
    // SAFETY: fresh fds from pipe2, owned from here on.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    // Same capacity, so as many buffer slots as the source can have in use.
    // SAFETY: fcntl on our own fd.
    if unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, cap) } < cap {
        return Err(GhostError::last_os(what("F_SETPIPE_SZ"), pid));
    }
    // One call: tee duplicates from the start of the source every time, so a second call
    // would copy the same bytes again.
    // SAFETY: tee between two pipes we hold.
    let n = unsafe {
        libc::tee(
            src.as_raw_fd(),
            wr.as_raw_fd(),
            queued as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(GhostError::last_os(what("tee"), pid));
    }
    if n != queued as isize {
        return Err(GhostError::Unsupported(format!(
            "process {pid}: only {n} of the {queued} bytes buffered in the pipe at fd {fd} could be copied"
        )));
    }
    let mut buf = vec![0u8; n as usize];
    let mut got = 0usize;
    while got < buf.len() {
        // SAFETY: reading into the rest of buf from our own fd.
        let r = unsafe {
            libc::read(
                rd.as_raw_fd(),
                buf[got..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - got,
            )
        };
        if r <= 0 {
            return Err(GhostError::last_os(what("reading the scratch pipe"), pid));
        }
        got += r as usize;
    }
    Ok((cap as u32, buf))
}
