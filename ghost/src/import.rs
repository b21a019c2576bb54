//! Import: turn a verified ghost image into a live process.
//!
//! A child is cloned (with the image's PID when it is free), sets up what it can do itself
//! (fds, cwd, umask, session) using only raw syscalls, maps a one-page trampoline holding a
//! `syscall` instruction and stops. The parent then rebuilds its address space through syscalls
//! injected at the trampoline: rseq unregistered, every old mapping unmapped, the vDSO moved to
//! the recorded address, the recorded mappings created, pages written, mm fields, rseq,
//! signal state and registers restored, the trampoline unmapped, and the child released.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use crate::compat;
use crate::error::{GhostError, Result};
use crate::image::{self, FdRestore, LoadedImage, MapKind, Mapping};
use crate::procfs;
use crate::rao::GhostReader;
use crate::sys::{self, ProcMem, Remote};
use crate::PAGE;

/// Which PID the restored process gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PidChoice {
    /// The recorded PID or fail (inside a fresh PID namespace it is always free).
    Same,
    /// The recorded PID if it is free, any PID otherwise.
    #[default]
    SameOrAny,
    /// Any PID.
    Any,
}

/// Options of [`import_process`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// PID policy.
    pub pid: PidChoice,
    /// Descriptors handed in by the caller: (fd number in the image, fd of the caller). Needed
    /// for the fds recorded as external at export ([`crate::FdChoice::External`]); one given
    /// for any other fd of the image replaces it. The caller keeps its fd.
    pub inherit_fds: Vec<(i32, RawFd)>,
    /// fds 0-2 recorded as the caller's stdio (pipes, sockets, terminals) take the caller's
    /// own 0-2, like a shell job; without this they must be handed in.
    pub stdio_fallback: bool,
}

/// What an import created.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// PID of the restored process as the caller sees it.
    pub pid: i32,
    /// PID recorded in the image (in the process's own namespace).
    pub image_pid: i32,
    /// Whether the recorded PID was taken back.
    pub same_pid: bool,
}

/// Trampoline: one code page followed by scratch pages for syscall arguments.
const TRAMP_LEN: u64 = 16 * PAGE;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const SS_AUTODISARM: i32 = 1 << 31;

/// Reads, verifies and imports an image. Nothing is created unless the image is intact and the
/// host can run it.
pub fn import_process(r: &mut dyn GhostReader, opts: &ImportOptions) -> Result<ImportReport> {
    let img = image::load(r)?;
    import_image(&img, opts)
}

/// Checks everything [`import_image`] checks before it creates a process (host
/// compatibility, mapped files, every fd: external ones handed in, files reopenable), so that
/// a caller can refuse a restart before it creates anything of its own (`krg restart` forks
/// a PID namespace init first).
pub fn check_import(img: &LoadedImage, opts: &ImportOptions) -> Result<()> {
    preflight(img, opts).map(|_| ())
}

/// What [`preflight`] prepared for the restore.
struct Prepared {
    regs0: sys::Regs,
    mm: image::MmFields,
    fdplan: Vec<FdPlan>,
}

fn preflight(img: &LoadedImage, opts: &ImportOptions) -> Result<Prepared> {
    let meta = &img.meta;
    let req = meta
        .requirements
        .as_ref()
        .ok_or_else(|| GhostError::BadImage("no host requirements recorded".into()))?;
    let (local_xfeat, local_size) = local_xsave();
    compat::check(req, local_size, local_xfeat)?;
    let regs0 = sys::regs_from_bytes(&meta.regs)
        .ok_or_else(|| GhostError::BadImage("register block has the wrong size".into()))?;
    for t in &meta.threads {
        if sys::regs_from_bytes(&t.regs).is_none() {
            return Err(GhostError::BadImage(format!(
                "register block of thread {} has the wrong size",
                t.tid
            )));
        }
    }
    if !meta.threads.is_empty() && opts.pid == PidChoice::Any {
        return Err(GhostError::InvalidOption(format!(
            "the image has {} threads, whose TIDs must come back (glibc caches them): restart it with its PID kept, inside a fresh PID namespace (`krg restart` does)",
            meta.threads.len() + 1
        )));
    }
    let mm = meta
        .mm
        .clone()
        .ok_or_else(|| GhostError::BadImage("mm fields missing".into()))?;
    for m in &meta.mappings {
        check_mapping(m)?;
    }
    let fdplan = plan_fds(meta, img.format_version, opts, &img.fd_contents())?;
    Ok(Prepared { regs0, mm, fdplan })
}

/// Imports an image already read with [`crate::load_image`].
pub fn import_image(img: &LoadedImage, opts: &ImportOptions) -> Result<ImportReport> {
    let meta = &img.meta;
    let Prepared { regs0, mm, fdplan } = preflight(img, opts)?;
    let own_maps = procfs::maps(std::process::id() as i32)?;
    let cands = trampoline_candidates(&meta.mappings, &own_maps);
    if cands.len() < 2 {
        return Err(GhostError::Unsupported(
            "no free address range for the restore trampoline".into(),
        ));
    }

    // Everything the child needs is prepared here: after clone it may not allocate.
    let cwd = CString::new(meta.cwd.clone())
        .map_err(|_| GhostError::BadImage("cwd contains a NUL byte".into()))?;
    let mut errp = [0i32; 2];
    // SAFETY: errp is a valid 2-int array.
    if unsafe { libc::pipe2(errp.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(GhostError::last_os("pipe2", 0));
    }
    // SAFETY: pipe2 just returned these fds; we own them.
    let (err_r, err_w) = unsafe { (OwnedFd::from_raw_fd(errp[0]), OwnedFd::from_raw_fd(errp[1])) };
    let max_src = fdplan.iter().map(|f| f.src).max().unwrap_or(0);
    let max_tgt = fdplan.iter().map(|f| f.target).max().unwrap_or(0);
    let base = max_src.max(max_tgt).max(err_w.as_raw_fd()) + 1;
    let mut is_target = vec![false; base as usize];
    for f in &fdplan {
        is_target[f.target as usize] = true;
    }
    let mut gaps = Vec::new();
    let mut i = 0usize;
    while i < base as usize {
        if is_target[i] {
            i += 1;
            continue;
        }
        let s = i;
        while i < base as usize && !is_target[i] {
            i += 1;
        }
        gaps.push((s as u32, (i - 1) as u32));
    }
    let plan = ChildPlan {
        errfd: err_w.as_raw_fd(),
        base,
        srcs: fdplan.iter().map(|f| f.src).collect(),
        targets: fdplan.iter().map(|f| f.target).collect(),
        cloexec: fdplan.iter().map(|f| f.cloexec).collect(),
        gaps,
        cwd,
        umask: meta.umask,
        personality: meta.personality,
        setsid: meta.sid == meta.pid,
        setpgid: meta.pgid == meta.pid && meta.sid != meta.pid,
        tramp: cands[..cands.len() - 1].to_vec(),
    };
    let tmp_area = cands[cands.len() - 1];

    let want_same = opts.pid != PidChoice::Any && meta.pid > 0;
    let mut same_pid = want_same;
    let mut child = if want_same {
        clone_child(Some(meta.pid), &plan)
    } else {
        clone_child(None, &plan)
    };
    // Another PID would give the threads other TIDs than the ones glibc cached.
    if child.is_err() && opts.pid == PidChoice::SameOrAny && meta.threads.is_empty() {
        same_pid = false;
        child = clone_child(None, &plan);
    }
    let child = child.map_err(|e| match (e.raw_os_error(), opts.pid) {
        (Some(libc::EEXIST), PidChoice::Same) => GhostError::Process {
            pid: meta.pid,
            msg: "PID is in use here; restart inside a fresh PID namespace (`krg restart` does) or allow another PID".into(),
        },
        _ => GhostError::sys("clone3", meta.pid, e),
    })?;
    drop(err_w);
    let mut guard = KillGuard {
        pid: child,
        threads: Vec::new(),
        armed: true,
    };
    // The child reports its trampoline address (or the step that failed) then closes the pipe.
    let mut msg = [0u8; 16];
    let mut got = 0;
    while got < msg.len() {
        // SAFETY: reading into msg.
        let n = unsafe {
            libc::read(
                err_r.as_raw_fd(),
                msg[got..].as_mut_ptr() as *mut libc::c_void,
                msg.len() - got,
            )
        };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        got += n as usize;
    }
    drop(fdplan);
    let tag = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
    let val = u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default());
    if got < 16 || tag != 0 {
        let step = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let st = sys::wait(child)
            .map(sys::describe_status)
            .unwrap_or_default();
        guard.armed = false;
        return Err(GhostError::Restore {
            step: CHILD_STEPS
                .get(step as usize)
                .copied()
                .unwrap_or("child setup")
                .to_string(),
            msg: if got < 16 {
                format!("restore child {st} before reporting")
            } else {
                std::io::Error::from_raw_os_error(val as i32).to_string()
            },
        });
    }
    let tramp = val;
    let st = sys::wait(child)?;
    if !(libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGSTOP) {
        guard.armed = false;
        return Err(GhostError::Restore {
            step: "child stop".into(),
            msg: sys::describe_status(st),
        });
    }
    sys::set_options(child, sys::PTRACE_O_EXITKILL)?;
    let handed_in: Vec<i32> = opts.inherit_fds.iter().map(|&(t, _)| t).collect();
    rebuild(
        child,
        tramp,
        tmp_area,
        img,
        &mm,
        regs0,
        &handed_in,
        &mut guard.threads,
    )?;
    guard.armed = false;
    Ok(ImportReport {
        pid: child,
        image_pid: meta.pid,
        same_pid,
    })
}

/// Kills a half-built child on error.
struct KillGuard {
    pid: i32,
    /// Threads created so far (host TIDs): traced by us, each must be reaped before the
    /// leader's exit can be.
    threads: Vec<i32>,
    armed: bool,
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: plain kill/waitpid on our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut st = 0;
                for &t in &self.threads {
                    libc::waitpid(t, &mut st, libc::__WALL);
                }
                libc::waitpid(self.pid, &mut st, libc::__WALL);
            }
        }
    }
}

fn step_err(step: impl Into<String>) -> impl FnOnce(GhostError) -> GhostError {
    let step = step.into();
    move |e| GhostError::Restore {
        step,
        msg: e.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
fn rebuild(
    pid: i32,
    tramp: u64,
    tmp_area: u64,
    img: &LoadedImage,
    mm: &image::MmFields,
    regs0: sys::Regs,
    handed_in: &[i32],
    threads: &mut Vec<i32>,
) -> Result<()> {
    let meta = &img.meta;
    // Event fds made here (not handed in) whose state is set in the child.
    let made = |what: FdRestore| {
        meta.fds
            .iter()
            .filter(move |f| f.restore == what as i32 && !handed_in.contains(&f.fd))
    };
    let remote = Remote::new(pid, tramp)?;
    let mem = ProcMem::open(pid)?;
    let scratch = tramp + PAGE;
    let put = |off: u64, b: &[u8]| -> Result<u64> {
        mem.write(scratch + off, b)
            .map_err(|e| GhostError::sys("writing the scratch page", pid, e))?;
        Ok(scratch + off)
    };

    // 1. glibc registered rseq in the donor; the kernel would write to it after it is unmapped.
    if let Some((ptr, len, sig)) = sys::rseq_config(pid)? {
        remote
            .call_ok(
                "rseq unregister",
                libc::SYS_rseq,
                [ptr, len as u64, RSEQ_FLAG_UNREGISTER, sig as u64, 0, 0],
            )
            .map_err(step_err("unregister donor rseq"))?;
    }
    // 2. Unmap everything of the donor but the trampoline and the vDSO.
    let cur = procfs::maps(pid)?;
    for m in &cur {
        if m.start == tramp
            || m.path == "[vsyscall]"
            || compat::vdso_parts(std::slice::from_ref(m)).len() == 1
        {
            continue;
        }
        remote
            .call_ok(
                "munmap",
                libc::SYS_munmap,
                [m.start, m.end - m.start, 0, 0, 0, 0],
            )
            .map_err(step_err(format!(
                "munmap donor {:#x}-{:#x}",
                m.start, m.end
            )))?;
    }
    // 3. Move vvar/vvar_vclock/vdso where the process had them.
    let have: Vec<(String, u64, u64)> = compat::vdso_parts(&cur)
        .iter()
        .map(|m| (m.path.clone(), m.start, m.end))
        .collect();
    let want: Vec<&Mapping> = meta
        .mappings
        .iter()
        .filter(|m| m.kind == MapKind::Vdso as i32)
        .collect();
    move_vdso(&remote, &have, &want, tmp_area).map_err(step_err("move vDSO"))?;
    // 4. Recreate the mappings.
    for m in meta
        .mappings
        .iter()
        .filter(|m| m.kind != MapKind::Vdso as i32)
    {
        map_one(&remote, &put, m).map_err(step_err(format!(
            "mmap {:#x}-{:#x} {}",
            m.start, m.end, m.path
        )))?;
    }
    // 5. Page contents, then the real protection of read-only shared mappings.
    sys::with_threads_allowed(|| write_pages(pid, &mem, &meta.mappings, img.pages())).map_err(
        |e| GhostError::Restore {
            step: "restore the PID namespace for new children after writing pages".into(),
            msg: e.to_string(),
        },
    )??;
    for m in &meta.mappings {
        if m.kind == MapKind::ShmemAnon as i32 && m.prot & libc::PROT_WRITE as u32 == 0 {
            remote
                .call_ok(
                    "mprotect",
                    libc::SYS_mprotect,
                    [m.start, m.end - m.start, m.prot as u64, 0, 0, 0],
                )
                .map_err(step_err("mprotect shared mapping"))?;
        }
    }
    // 6. mm fields (brk, arg/env, auxv) and the exe link.
    let exe_fd = if meta.exe.is_empty() {
        None
    } else {
        let p = put(0, &cstr_bytes(&meta.exe))?;
        let r = remote.call(
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                p,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )?;
        (r >= 0).then_some(r as u64)
    };
    let mut st = Vec::with_capacity(104);
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
    ] {
        st.extend_from_slice(&v.to_le_bytes());
    }
    let auxv_at = put(4096, &meta.auxv)?;
    st.extend_from_slice(&auxv_at.to_le_bytes());
    st.extend_from_slice(&(meta.auxv.len() as u32).to_le_bytes());
    let with_exe = exe_fd.map(|f| f as u32).unwrap_or(u32::MAX);
    st.extend_from_slice(&with_exe.to_le_bytes());
    let stp = put(2048, &st)?;
    let r = remote.call(libc::SYS_prctl, [PR_SET_MM, PR_SET_MM_MAP, stp, 104, 0, 0])?;
    if r < 0 && exe_fd.is_some() {
        // The exe link cannot always be changed (capability, file gone): keep the rest.
        tracing::warn!(
            pid,
            err = r,
            "PR_SET_MM_MAP with exe_fd failed; retrying without"
        );
        put(2048 + 100, &u32::MAX.to_le_bytes())?;
        remote
            .call_ok(
                "prctl(PR_SET_MM_MAP)",
                libc::SYS_prctl,
                [PR_SET_MM, PR_SET_MM_MAP, stp, 104, 0, 0],
            )
            .map_err(step_err("PR_SET_MM_MAP"))?;
    } else if r < 0 {
        return Err(GhostError::Restore {
            step: "PR_SET_MM_MAP".into(),
            msg: std::io::Error::from_raw_os_error(-r as i32).to_string(),
        });
    }
    if let Some(fd) = exe_fd {
        remote.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    }
    // 7. Per-thread kernel registrations.
    if meta.robust_head != 0 {
        remote
            .call_ok(
                "set_robust_list",
                libc::SYS_set_robust_list,
                [meta.robust_head, meta.robust_len, 0, 0, 0, 0],
            )
            .map_err(step_err("set_robust_list"))?;
    }
    if let Some(rs) = &meta.rseq {
        remote
            .call_ok(
                "rseq",
                libc::SYS_rseq,
                [rs.ptr, rs.len as u64, 0, rs.sig as u64, 0, 0],
            )
            .map_err(step_err("register rseq"))?;
    }
    if meta.clear_child_tid != 0 {
        remote
            .call_ok(
                "set_tid_address",
                libc::SYS_set_tid_address,
                [meta.clear_child_tid, 0, 0, 0, 0, 0],
            )
            .map_err(step_err("set_tid_address"))?;
    }
    // 8. Signals: dispositions, alternate stack, pending signals (still blocked: the donor
    // blocks everything), then the real mask.
    for a in &meta.sigactions {
        let mut b = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let p = put(0, &b)?;
        remote
            .call_ok(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [a.sig as u64, p, 0, 8, 0, 0],
            )
            .map_err(step_err(format!("sigaction {}", a.sig)))?;
    }
    if let Some(ss) = &meta.sigaltstack {
        let p = put(0, &altstack_bytes(ss))?;
        remote
            .call_ok("sigaltstack", libc::SYS_sigaltstack, [p, 0, 0, 0, 0, 0])
            .map_err(step_err("sigaltstack"))?;
    }
    if !meta.pending.is_empty() {
        let me = remote.call_ok("getpid", libc::SYS_getpid, [0; 6])?;
        requeue(&remote, &put, me, None, &meta.pending)?;
    }
    for rl in &meta.rlimits {
        let new = libc::rlimit64 {
            rlim_cur: rl.cur,
            rlim_max: rl.max,
        };
        // SAFETY: prlimit64 on our own child with a valid struct.
        if unsafe { libc::prlimit64(pid, rl.resource as _, &new, std::ptr::null_mut()) } != 0 {
            tracing::warn!(pid, resource = rl.resource, "could not restore an rlimit");
        }
    }
    // The process was forked from the restorer and would go by its name in ps, top and the
    // kernel's messages.
    set_name(&remote, &put, &meta.comm)?;
    // 9. The other threads, with their TIDs, while the trampoline is still there to inject
    // their syscalls; they stay stopped until the main thread is done.
    crate::threads::recreate(&remote, &put, meta, threads)?;
    // 10. Epoll registrations, now that every fd they name is in place; then the timers,
    // as late as possible, so that the restore does not eat into their time left.
    for f in made(FdRestore::Epoll) {
        register_epoll(&remote, &put, f)?;
    }
    for f in made(FdRestore::TimerFd) {
        arm_timerfd(&remote, &put, f)?;
    }
    // 11. Remove the trampoline: the restored process must not see it.
    remote
        .call_ok(
            "munmap trampoline",
            libc::SYS_munmap,
            [tramp, TRAMP_LEN, 0, 0, 0, 0],
        )
        .map_err(step_err("unmap trampoline"))?;
    sys::set_sigmask(pid, meta.sigmask)?;
    // 12. Registers. A process caught in a restartable syscall re-runs it.
    sys::set_regs(pid, &sys::resume_regs(regs0))?;
    sys::set_xstate(pid, &meta.xstate).map_err(step_err("restore FPU/AVX state"))?;
    // The threads first: the process runs as a whole only once its leader goes.
    for &t in threads.iter() {
        sys::detach(t, 0)?;
    }
    sys::detach(pid, 0)?;
    Ok(())
}

/// struct stack_t for sigaltstack(2). SS_ONSTACK is not settable (the kernel derives it from
/// the stack pointer); SS_AUTODISARM is.
pub(crate) fn altstack_bytes(ss: &image::AltStack) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&ss.sp.to_le_bytes());
    b.extend_from_slice(&(ss.flags & SS_AUTODISARM).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&ss.size.to_le_bytes());
    b
}

/// Queues `pending` signals again, injected in the thread group leader `remote` (whose PID in
/// its namespace is `me`): to the process, or, with `tid`, to that thread. Sent by the process
/// to itself, so any si_code is accepted.
/// Names the thread that `remote` runs in (prctl PR_SET_NAME, injected: /proc/PID/comm can
/// be written only from within the process). An empty name (an old image) leaves it alone.
pub(crate) fn set_name(
    remote: &Remote,
    put: &dyn Fn(u64, &[u8]) -> Result<u64>,
    name: &str,
) -> Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    let mut b = name.as_bytes().to_vec();
    b.truncate(15); // TASK_COMM_LEN - 1
    b.push(0);
    let p = put(0, &b)?;
    remote
        .call_ok(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            [libc::PR_SET_NAME as u64, p, 0, 0, 0, 0],
        )
        .map_err(step_err("set the command name"))?;
    Ok(())
}

pub(crate) fn requeue(
    remote: &Remote,
    put: &dyn Fn(u64, &[u8]) -> Result<u64>,
    me: u64,
    tid: Option<u64>,
    pending: &[image::PendingSignal],
) -> Result<()> {
    for ps in pending {
        if ps.siginfo.len() != 128 {
            continue;
        }
        let signo = i32::from_le_bytes(ps.siginfo[..4].try_into().unwrap_or_default());
        let p = put(0, &ps.siginfo)?;
        let r = match (ps.shared, tid) {
            (true, _) => remote.call(libc::SYS_rt_sigqueueinfo, [me, signo as u64, p, 0, 0, 0])?,
            (false, t) => remote.call(
                libc::SYS_rt_tgsigqueueinfo,
                [me, t.unwrap_or(me), signo as u64, p, 0, 0],
            )?,
        };
        if r < 0 {
            tracing::warn!(
                pid = remote.pid,
                signo,
                err = r,
                "could not re-queue a pending signal"
            );
        }
    }
    Ok(())
}

fn cstr_bytes(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Below this many bytes per thread the pages are written by one thread.
const PAR_WRITE_MIN: usize = 32 << 20;

/// One stretch of stored pages and where it goes.
struct PagePiece<'a> {
    addr: u64,
    data: &'a [u8],
    writable: bool,
    path: &'a str,
}

/// Writes the stored pages into the child, split over every core. Most of the time goes into
/// the child's page faults (allocating and zeroing fresh anonymous pages), which the kernel
/// serves in parallel for different threads, so each core writes its own share of the runs.
fn write_pages(pid: i32, mem: &ProcMem, mappings: &[Mapping], pages: &[u8]) -> Result<()> {
    let mut pieces = Vec::new();
    let mut off = 0usize;
    for m in mappings {
        let writable = m.prot & libc::PROT_WRITE as u32 != 0;
        for run in &m.runs {
            let n = (run.npages * PAGE) as usize;
            pieces.push(PagePiece {
                addr: run.addr,
                data: &pages[off..off + n],
                writable,
                path: &m.path,
            });
            off += n;
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(pages.len() / PAR_WRITE_MIN)
        .max(1);
    let shares = split_pieces(pieces, pages.len().div_ceil(threads));
    if shares.len() < 2 {
        return shares.iter().try_for_each(|s| write_share(pid, mem, s));
    }
    std::thread::scope(|sc| {
        let mut results = Vec::new();
        let mut handles = Vec::new();
        for s in &shares[1..] {
            match std::thread::Builder::new().spawn_scoped(sc, || write_share(pid, mem, s)) {
                Ok(h) => handles.push(h),
                // No thread (see sys::with_threads_allowed): this share is written here.
                Err(_) => results.push(write_share(pid, mem, s)),
            }
        }
        results.push(write_share(pid, mem, &shares[0]));
        // Every thread is joined before the first error is returned.
        for h in handles {
            results.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        results.into_iter().collect::<Result<()>>()
    })
}

/// Cuts the pieces into consecutive shares of about `per` bytes, splitting a piece at a page
/// boundary where a share ends in its middle.
fn split_pieces(pieces: Vec<PagePiece<'_>>, per: usize) -> Vec<Vec<PagePiece<'_>>> {
    let per = per.max(PAGE as usize).next_multiple_of(PAGE as usize);
    let mut shares = vec![Vec::new()];
    let mut room = per;
    for mut p in pieces {
        while !p.data.is_empty() {
            if room == 0 {
                shares.push(Vec::new());
                room = per;
            }
            let n = p.data.len().min(room);
            let (head, tail) = p.data.split_at(n);
            if let Some(s) = shares.last_mut() {
                s.push(PagePiece {
                    addr: p.addr,
                    data: head,
                    writable: p.writable,
                    path: p.path,
                });
            }
            room -= n;
            p.addr += n as u64;
            p.data = tail;
        }
    }
    shares
}

fn write_share(pid: i32, mem: &ProcMem, share: &[PagePiece<'_>]) -> Result<()> {
    for p in share {
        // process_vm_writev is the fast path but cannot write read-only or PROT_NONE pages;
        // /proc/PID/mem can (it forces the copy-on-write).
        if p.writable {
            sys::vm_write(pid, p.addr, p.data)
        } else {
            mem.write(p.addr, p.data)
        }
        .map_err(|e| GhostError::Restore {
            step: format!("write pages at {:#x} ({})", p.addr, p.path),
            msg: e.to_string(),
        })?;
    }
    Ok(())
}

fn move_vdso(
    remote: &Remote,
    have: &[(String, u64, u64)],
    want: &[&Mapping],
    tmp: u64,
) -> Result<()> {
    if have.len() != want.len() || have.iter().zip(want).any(|(h, w)| h.0 != w.path) {
        return Err(GhostError::Incompatible(format!(
            "vDSO parts differ: here {:?}, image {:?}",
            have.iter().map(|h| &h.0).collect::<Vec<_>>(),
            want.iter().map(|w| &w.path).collect::<Vec<_>>()
        )));
    }
    let mut cur: Vec<u64> = have.iter().map(|h| h.1).collect();
    if have.iter().zip(want).all(|(h, w)| h.1 == w.start) {
        return Ok(());
    }
    let overlaps = have
        .iter()
        .any(|h| want.iter().any(|w| h.1 < w.end && w.start < h.2));
    let mremap = |from: u64, len: u64, to: u64| {
        remote.call_ok(
            "mremap",
            libc::SYS_mremap,
            [
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                to,
                0,
            ],
        )
    };
    if overlaps {
        let first = have[0].1;
        for (i, h) in have.iter().enumerate() {
            let to = tmp + (h.1 - first);
            mremap(cur[i], h.2 - h.1, to)?;
            cur[i] = to;
        }
    }
    for (i, w) in want.iter().enumerate() {
        mremap(cur[i], w.end - w.start, w.start)?;
    }
    Ok(())
}

fn map_one(remote: &Remote, put: &dyn Fn(u64, &[u8]) -> Result<u64>, m: &Mapping) -> Result<()> {
    let len = m.end - m.start;
    let kind = MapKind::try_from(m.kind).unwrap_or(MapKind::Anon);
    let mut prot = m.prot as u64;
    let fixed = libc::MAP_FIXED as u64;
    let (flags, fd) = match kind {
        MapKind::Anon => {
            let mut f = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | fixed;
            if m.growsdown {
                f |= libc::MAP_GROWSDOWN as u64;
            }
            (f, None)
        }
        MapKind::ShmemAnon => {
            // Made writable for the page copy; set to the real protection afterwards.
            prot |= (libc::PROT_READ | libc::PROT_WRITE) as u64;
            (
                (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64 | fixed,
                None,
            )
        }
        MapKind::FilePrivate | MapKind::FileShared => {
            let shared = kind == MapKind::FileShared;
            let mode = if shared && m.prot & libc::PROT_WRITE as u32 != 0 {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let p = put(0, &cstr_bytes(&m.path))?;
            let fd = remote.call_ok(
                &format!("open {}", m.path),
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as u64,
                    p,
                    (mode | libc::O_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )?;
            let f = if shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            } as u64
                | fixed;
            (f, Some(fd))
        }
        MapKind::Vdso => return Ok(()),
    };
    let r = remote.call_ok(
        "mmap",
        libc::SYS_mmap,
        [
            m.start,
            len,
            prot,
            flags,
            fd.unwrap_or(u64::MAX),
            if fd.is_some() { m.offset } else { 0 },
        ],
    );
    if let Some(fd) = fd {
        remote.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    }
    if r? != m.start {
        return Err(GhostError::Unsupported(
            "mmap did not land at the fixed address".into(),
        ));
    }
    Ok(())
}

/// Refuses a mapping whose file is missing or changed.
fn check_mapping(m: &Mapping) -> Result<()> {
    let Some(id) = &m.file else { return Ok(()) };
    let md = std::fs::metadata(&m.path).map_err(|e| {
        GhostError::Incompatible(format!(
            "the process maps {} which cannot be opened here ({e}); copy it to this node",
            m.path
        ))
    })?;
    let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    if md.dev() == id.dev && md.ino() == id.ino && md.len() == id.size && mtime == id.mtime_ns {
        return Ok(());
    }
    if !id.hash.is_empty() && md.len() == id.size {
        if let Ok(b) = std::fs::read(&m.path) {
            if blake3::hash(&b).as_bytes().as_slice() == id.hash.as_slice() {
                return Ok(());
            }
        }
    }
    Err(GhostError::Incompatible(format!(
        "{} changed since the checkpoint (size {} -> {}); the process would see different code or data: restore the original file",
        m.path,
        id.size,
        md.len()
    )))
}

struct FdPlan {
    target: i32,
    src: RawFd,
    cloexec: bool,
    /// Keeps a file we opened alive until the child has duplicated it.
    _owned: Option<File>,
}

/// How each fd of the image is given to the child: what export recorded, done as recorded.
/// Every fd that cannot be given is reported at once, before anything is created.
fn plan_fds(
    meta: &image::ProcessImage,
    format_version: u32,
    opts: &ImportOptions,
    contents: &[(i32, &[u8])],
) -> Result<Vec<FdPlan>> {
    for &(target, src) in &opts.inherit_fds {
        if !meta.fds.iter().any(|f| f.fd == target) {
            return Err(GhostError::InvalidOption(format!(
                "an fd is handed in for fd {target}, but the image has no fd {target} (its fds: {})",
                meta.fds
                    .iter()
                    .map(|f| f.fd.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !fd_is_open(src) {
            return Err(GhostError::InvalidOption(format!(
                "fd {src}, handed in for fd {target}, is not open in the restoring process (open it in the shell that starts the restart, e.g. `{src}<>FILE`)"
            )));
        }
    }
    let mut out = Vec::new();
    let mut missing = Vec::new();
    // Deleted files recreated so far, by the fd that carried the content.
    let mut recreated: Vec<(i32, File)> = Vec::new();
    // Internal pipes made so far.
    let mut pipes: Vec<MadePipe> = Vec::new();
    // Socketpair ends made so far, by socket inode; each end is handed to the first fd
    // that uses it (which keeps it open until the child has it), the others share it.
    let mut pair_ends: Vec<(u64, RawFd, Option<File>)> = Vec::new();
    // Sockets made so far (inode, fd): the other fds of a socket share it (a second bind of
    // the same address would fail).
    let mut socks: Vec<(u64, RawFd)> = Vec::new();
    for f in &meta.fds {
        let cloexec = f.flags & libc::O_CLOEXEC as u32 != 0;
        if let Some(&(_, src)) = opts.inherit_fds.iter().find(|(t, _)| *t == f.fd) {
            out.push(FdPlan {
                target: f.fd,
                src,
                cloexec,
                _owned: None,
            });
            continue;
        }
        let opened = match f.restore_method(format_version)? {
            FdRestore::Reopen => reopen(&f.path, f.flags, f.pos).map_err(|e| {
                format!(
                    "fd {} ({}) cannot be reopened here: {e} (put the file back, or hand a replacement in with `--inherit-fd {}=YOUR_FD`)",
                    f.fd, f.path, f.fd
                )
            }),
            FdRestore::DevNull => reopen("/dev/null", f.flags & libc::O_ACCMODE as u32, 0)
                .map_err(|e| format!("fd {} cannot be opened on /dev/null: {e}", f.fd)),
            FdRestore::External => Err(format!(
                "fd {} ({}) was recorded as external at checkpoint: hand one in with `krg restart --inherit-fd {}=YOUR_FD`",
                f.fd, f.path, f.fd
            )),
            FdRestore::CallerStdio if opts.stdio_fallback && fd_is_open(f.fd) => {
                out.push(FdPlan {
                    target: f.fd,
                    src: f.fd,
                    cloexec,
                    _owned: None,
                });
                continue;
            }
            FdRestore::PipeInProcess => {
                let p = f.pipe.as_ref().ok_or_else(|| {
                    GhostError::BadImage(format!("fd {} is a pipe end without its record", f.fd))
                })?;
                let i = match pipes.iter().position(|m| m.inode == p.inode) {
                    Some(i) => i,
                    None => {
                        let made = make_pipe(meta, p.inode, p.capacity, contents).map_err(|e| {
                            GhostError::Restore {
                                step: format!("make the pipe of fd {} again", f.fd),
                                msg: e.to_string(),
                            }
                        })?;
                        pipes.push(made);
                        pipes.len() - 1
                    }
                };
                let m = &mut pipes[i];
                let (raw, owned) = if crate::restorable::reads(f.flags) {
                    (m.rd_raw, m.rd.take())
                } else {
                    (m.wr_raw, m.wr.take())
                };
                out.push(FdPlan {
                    target: f.fd,
                    src: raw,
                    cloexec,
                    _owned: owned,
                });
                continue;
            }
            FdRestore::CallerStdio => Err(format!(
                "fd {} ({}) is to be the restorer's own fd {}, which {} (hand one in with `--inherit-fd {}=YOUR_FD`)",
                f.fd,
                f.path,
                f.fd,
                if opts.stdio_fallback {
                    "is not open"
                } else {
                    "was not offered (stdio fallback is off)"
                },
                f.fd
            )),
            FdRestore::DeletedFile => {
                let d = f.deleted.as_ref().ok_or_else(|| {
                    GhostError::BadImage(format!("fd {} is a deleted file without its record", f.fd))
                })?;
                let carrier = d.same_as.unwrap_or(f.fd);
                let have = recreated.iter().position(|(fd, _)| *fd == carrier);
                let file = match (have, d.same_as) {
                    (Some(i), _) => Ok(&recreated[i].1),
                    (None, Some(_)) => {
                        return Err(GhostError::BadImage(format!(
                            "fd {} shares deleted file fd {carrier}, which the image does not save first",
                            f.fd
                        )))
                    }
                    (None, None) => {
                        let content = contents
                            .iter()
                            .find(|(fd, _)| *fd == f.fd)
                            .map(|c| c.1)
                            .unwrap_or_default();
                        match recreate_deleted(&f.path, content, d.mode) {
                            Ok(file) => {
                                recreated.push((f.fd, file));
                                Ok(&recreated[recreated.len() - 1].1)
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                file.and_then(|file| {
                    reopen(&format!("/proc/self/fd/{}", file.as_raw_fd()), f.flags, f.pos)
                })
                .map_err(|e| {
                    format!(
                        "fd {} (deleted file {}) cannot be recreated here: {e} (free space in its directory or in {}, or restore it with `--inherit-fd {}=YOUR_FD`)",
                        f.fd,
                        f.path,
                        std::env::temp_dir().display(),
                        f.fd
                    )
                })
            }
            FdRestore::EventFd => {
                let e = f.eventfd.as_ref().ok_or_else(|| missing_record(f, "eventfd"))?;
                make_eventfd(e, f.flags)
                    .map_err(|e| format!("fd {} (eventfd) cannot be made again: {e}", f.fd))
            }
            FdRestore::SignalFd => {
                let m = f.signalfd.as_ref().ok_or_else(|| missing_record(f, "signalfd"))?;
                make_signalfd(m.sigmask, f.flags)
                    .map_err(|e| format!("fd {} (signalfd) cannot be made again: {e}", f.fd))
            }
            FdRestore::TimerFd => {
                let t = f.timerfd.as_ref().ok_or_else(|| missing_record(f, "timerfd"))?;
                make_timerfd(t.clockid, f.flags).map_err(|e| {
                    format!(
                        "fd {} (timerfd on clock {}) cannot be made again: {e}",
                        f.fd, t.clockid
                    )
                })
            }
            FdRestore::Epoll => {
                f.epoll.as_ref().ok_or_else(|| missing_record(f, "epoll"))?;
                make_epoll(f.flags)
                    .map_err(|e| format!("fd {} (epoll) cannot be made again: {e}", f.fd))
            }
            FdRestore::Inotify => {
                let w = f.inotify.as_ref().ok_or_else(|| missing_record(f, "inotify"))?;
                make_inotify(w, f.flags)
                    .map_err(|e| format!("fd {} (inotify) cannot be made again: {e}", f.fd))
            }
            FdRestore::Socket => {
                let s = f.socket.as_ref().ok_or_else(|| missing_record(f, "socket"))?;
                if let Some(&(_, raw)) = socks.iter().find(|(i, _)| *i == s.inode) {
                    out.push(FdPlan {
                        target: f.fd,
                        src: raw,
                        cloexec,
                        _owned: None,
                    });
                    continue;
                }
                let made = crate::sockets::make_socket(s, f.flags);
                if let Ok(m) = &made {
                    socks.push((s.inode, m.as_raw_fd()));
                }
                made.map_err(|e| {
                    format!(
                        "fd {} ({}) cannot be made again: {e} (or hand one in with `--inherit-fd {}=YOUR_FD`)",
                        f.fd, f.path, f.fd
                    )
                })
            }
            FdRestore::SocketPair => {
                let s = f.socket.as_ref().ok_or_else(|| missing_record(f, "socket"))?;
                if !pair_ends.iter().any(|(i, _, _)| *i == s.inode) {
                    let (a, b) = make_socketpair(meta, s, contents).map_err(|e| {
                        GhostError::Restore {
                            step: format!("make the socketpair of fd {} again", f.fd),
                            msg: e.to_string(),
                        }
                    })?;
                    pair_ends.push((s.inode, a.as_raw_fd(), Some(a)));
                    pair_ends.push((s.peer_inode, b.as_raw_fd(), Some(b)));
                }
                let Some(end) = pair_ends.iter_mut().find(|(i, _, _)| *i == s.inode) else {
                    continue;
                };
                out.push(FdPlan {
                    target: f.fd,
                    src: end.1,
                    cloexec,
                    _owned: end.2.take(),
                });
                continue;
            }
            FdRestore::Unrecorded => Err(format!("fd {} records no restore method", f.fd)),
        };
        match opened {
            Ok(file) => out.push(FdPlan {
                target: f.fd,
                src: file.as_raw_fd(),
                cloexec,
                _owned: Some(file),
            }),
            Err(e) => missing.push(e),
        }
    }
    if !missing.is_empty() {
        return Err(GhostError::Incompatible(format!(
            "no process was created: {}",
            missing.join("; ")
        )));
    }
    Ok(out)
}

/// The socketpair of socket `s` made again: (the end for `s`, the end for its peer), each
/// refilled with what was queued to it and with the flags of its first fd.
fn make_socketpair(
    meta: &image::ProcessImage,
    s: &image::SocketState,
    contents: &[(i32, &[u8])],
) -> std::io::Result<(File, File)> {
    let first = |inode: u64| {
        meta.fds
            .iter()
            .find(|g| g.socket.as_ref().is_some_and(|t| t.inode == inode))
    };
    let queue = |g: &image::Fd| {
        contents
            .iter()
            .find(|(fd, _)| *fd == g.fd)
            .map(|c| c.1)
            .unwrap_or_default()
    };
    let (fa, fb) = match (first(s.inode), first(s.peer_inode)) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(std::io::Error::other(format!(
                "the image lacks an end of the socketpair socket:[{}]",
                s.inode
            )))
        }
    };
    let (sa, sb) = match (&fa.socket, &fb.socket) {
        (Some(sa), Some(sb)) => (sa, sb),
        _ => return Err(std::io::Error::other("socketpair end without its record")),
    };
    crate::sockets::make_pair(sa, queue(fa), fa.flags, sb, queue(fb), fb.flags)
}

fn missing_record(f: &image::Fd, what: &str) -> GhostError {
    GhostError::BadImage(format!(
        "fd {} is an {what} without its recorded state",
        f.fd
    ))
}

/// Takes ownership of the descriptor a syscall returned (or its error) and gives it the
/// O_NONBLOCK of the recorded `flags`; close-on-exec is set when it is placed in the child.
pub(crate) fn own_fd(r: libc::c_long, flags: u32) -> std::io::Result<File> {
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this new descriptor.
    let file = unsafe { File::from_raw_fd(r as RawFd) };
    let fl = if flags & libc::O_NONBLOCK as u32 != 0 {
        libc::O_NONBLOCK
    } else {
        0
    };
    // SAFETY: fcntl on our own fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// An eventfd with the recorded counter and semaphore mode. The counter is written rather
/// than given to eventfd2, which takes only 32 bits; made non-blocking for that write, so
/// that a bad count is an error, not a hang.
fn make_eventfd(e: &image::EventFdState, flags: u32) -> std::io::Result<File> {
    let sem = if e.semaphore { libc::EFD_SEMAPHORE } else { 0 };
    // SAFETY: eventfd2 with constant flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_eventfd2,
            0,
            libc::EFD_CLOEXEC | libc::EFD_NONBLOCK | sem,
        )
    };
    let file = own_fd(r, libc::O_NONBLOCK as u32)?;
    if e.count > 0 {
        // SAFETY: writing one u64 from a local.
        let n = unsafe {
            libc::write(
                file.as_raw_fd(),
                &e.count as *const u64 as *const libc::c_void,
                8,
            )
        };
        if n != 8 {
            return Err(std::io::Error::last_os_error());
        }
    }
    own_fd(file.into_raw_fd() as libc::c_long, flags)
}

/// A signalfd for the recorded mask. It reads the signals of whichever process reads it, so
/// it can be made here and handed to the child.
fn make_signalfd(sigmask: u64, flags: u32) -> std::io::Result<File> {
    // SAFETY: signalfd4 reads an 8-byte mask from a local.
    let r = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &sigmask as *const u64,
            8usize,
            libc::SFD_CLOEXEC,
        )
    };
    own_fd(r, flags)
}

/// A timerfd on `clockid`, disarmed: it is armed in the child at the end of the restore
/// ([`arm_timerfd`]), so that the time spent restoring does not run down its time left.
fn make_timerfd(clockid: i32, flags: u32) -> std::io::Result<File> {
    // SAFETY: timerfd_create with constant flags.
    let r = unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC) };
    own_fd(r as libc::c_long, flags)
}

/// An empty epoll instance: its registrations name fds of the child and are added there
/// ([`register_epoll`]) once every fd is in place.
fn make_epoll(flags: u32) -> std::io::Result<File> {
    // SAFETY: epoll_create1 with a constant flag.
    let r = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    own_fd(r as libc::c_long, flags)
}

/// An inotify instance with the recorded watches, each under its recorded watch descriptor.
/// The kernel hands out descriptors in increasing order from the last one given, so a watch
/// is added, removed and added again until it gets its number; the IN_IGNORED events the
/// removals queue are read off before the fd is handed over (it had no unread event).
fn make_inotify(w: &image::InotifyState, flags: u32) -> std::io::Result<File> {
    // SAFETY: inotify_init1 with constant flags.
    let r = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    let file = own_fd(r as libc::c_long, libc::O_NONBLOCK as u32)?;
    for watch in &w.watches {
        let path = CString::new(watch.path.as_str()).map_err(std::io::Error::other)?;
        // The path is what the inode resolved to: the watch is on it, not on a link's target.
        let mask = watch.mask | libc::IN_DONT_FOLLOW;
        loop {
            // SAFETY: valid fd and C string.
            let wd = unsafe { libc::inotify_add_watch(file.as_raw_fd(), path.as_ptr(), mask) };
            if wd < 0 {
                return Err(std::io::Error::other(format!(
                    "watching {}: {}",
                    watch.path,
                    std::io::Error::last_os_error()
                )));
            }
            if wd == watch.wd {
                break;
            }
            if wd > watch.wd {
                return Err(std::io::Error::other(format!(
                    "{} got watch descriptor {wd}, past its {}",
                    watch.path, watch.wd
                )));
            }
            // SAFETY: removing the watch just added.
            unsafe { libc::inotify_rm_watch(file.as_raw_fd(), wd) };
        }
    }
    let mut buf = [0u8; 4096];
    // SAFETY: reading into a local buffer until the queue is empty (EAGAIN).
    while unsafe {
        libc::read(
            file.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    } > 0
    {}
    own_fd(file.into_raw_fd() as libc::c_long, flags)
}

/// Adds the recorded registrations of epoll fd `f` in the child, where the fds they name
/// are in place: an epoll registration is keyed by the fd number as well as the file.
/// Adding a registration reports the target's current readiness, so an edge-triggered one
/// whose target is ready is reported once more after the restart even if the process had
/// been told before the checkpoint (the kernel does not show whether it was): a spurious
/// wakeup, which edge-triggered loops tolerate, never a lost one.
fn register_epoll(
    remote: &Remote,
    put: &dyn Fn(u64, &[u8]) -> Result<u64>,
    f: &image::Fd,
) -> Result<()> {
    for t in f.epoll.iter().flat_map(|e| &e.targets) {
        // struct epoll_event is packed on x86_64: u32 events, u64 data.
        let mut ev = Vec::with_capacity(12);
        ev.extend_from_slice(&t.events.to_le_bytes());
        ev.extend_from_slice(&t.data.to_le_bytes());
        let p = put(0, &ev)?;
        remote
            .call_ok(
                "epoll_ctl",
                libc::SYS_epoll_ctl,
                [
                    f.fd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    t.fd as u64,
                    p,
                    0,
                    0,
                ],
            )
            .map_err(step_err(format!(
                "register fd {} (events {:#x}) in epoll fd {}",
                t.fd, t.events, f.fd
            )))?;
    }
    Ok(())
}

/// _IOW('T', 0, u64): sets the unread expirations of a timerfd (CONFIG_CHECKPOINT_RESTORE).
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// Arms timerfd `f` in the child: the time it had left (an absolute wall-clock timer: its
/// recorded expiry, however long the process was down) and its interval, then its unread
/// expirations. Without TFD_IOC_SET_TICKS on the host, pending expirations come back as one,
/// the timer then firing at once (the time left of a periodic timer is then lost).
fn arm_timerfd(
    remote: &Remote,
    put: &dyn Fn(u64, &[u8]) -> Result<u64>,
    f: &image::Fd,
) -> Result<()> {
    let Some(t) = &f.timerfd else { return Ok(()) };
    let abstime = libc::TFD_TIMER_ABSTIME as u32;
    let cancel_on_set = t.settime_flags & libc::TFD_TIMER_CANCEL_ON_SET as u32;
    let (flags, value_ns) = match t.realtime_expiry_ns {
        Some(at) => (abstime | cancel_on_set, at.max(1) as u64),
        // Time left on a clock that does not span reboots or nodes: counted from now, kept
        // absolute if it was so that the process sees the same settime flags.
        None if t.settime_flags & abstime != 0 && t.value_ns > 0 => (
            abstime,
            (sys::clock_ns(t.clockid) as u64).saturating_add(t.value_ns),
        ),
        None => (0, t.value_ns),
    };
    let settime = |value_ns: u64, flags: u32| -> Result<()> {
        let mut its = Vec::with_capacity(32);
        for v in [
            t.interval_ns / 1_000_000_000,
            t.interval_ns % 1_000_000_000,
            value_ns / 1_000_000_000,
            value_ns % 1_000_000_000,
        ] {
            its.extend_from_slice(&v.to_le_bytes());
        }
        let p = put(0, &its)?;
        remote
            .call_ok(
                "timerfd_settime",
                libc::SYS_timerfd_settime,
                [f.fd as u64, flags as u64, p, 0, 0, 0],
            )
            .map(|_| ())
            .map_err(step_err(format!("arm timerfd fd {}", f.fd)))
    };
    if value_ns > 0 {
        settime(value_ns, flags)?;
    }
    if t.ticks > 0 {
        let p = put(0, &t.ticks.to_le_bytes())?;
        let r = remote.call(
            libc::SYS_ioctl,
            [f.fd as u64, TFD_IOC_SET_TICKS, p, 0, 0, 0],
        )?;
        if r < 0 {
            tracing::warn!(
                fd = f.fd,
                ticks = t.ticks,
                err = r,
                "TFD_IOC_SET_TICKS failed: the timer's pending expirations come back as one"
            );
            settime(1, 0)?;
        }
    }
    Ok(())
}

/// A pipe made again for the fds of one internal pipe; each end is handed to the first fd
/// plan that uses it (which keeps it open until the child has it), the others share it.
struct MadePipe {
    inode: u64,
    rd: Option<File>,
    wr: Option<File>,
    rd_raw: RawFd,
    wr_raw: RawFd,
}

/// The pipe `inode` of the image: same capacity, refilled with the bytes it buffered, each
/// end with the O_NONBLOCK of the first fd of that end (the flag belongs to the end, which
/// dup'ed fds share).
fn make_pipe(
    meta: &image::ProcessImage,
    inode: u64,
    capacity: u32,
    contents: &[(i32, &[u8])],
) -> std::io::Result<MadePipe> {
    use std::io::Write;
    let mut p = [0i32; 2];
    // SAFETY: p is a 2-int array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2, owned from here on.
    let (rd, wr) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
    let cap = capacity as libc::c_int;
    // SAFETY: fcntl on our own fd.
    if cap > 0 && unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, cap) } < cap {
        return Err(std::io::Error::last_os_error());
    }
    let ends: Vec<&image::Fd> = meta
        .fds
        .iter()
        .filter(|g| g.pipe.as_ref().is_some_and(|q| q.inode == inode))
        .collect();
    let buffered = ends
        .iter()
        .find(|g| g.stored_bytes() > 0)
        .and_then(|g| contents.iter().find(|(fd, _)| *fd == g.fd))
        .map(|c| c.1)
        .unwrap_or_default();
    // Non-blocking: bytes that do not fit are an error, not a hang.
    (&wr).write_all(buffered)?;
    for (end, want_read) in [(&rd, true), (&wr, false)] {
        let nonblock = ends
            .iter()
            .find(|g| crate::restorable::reads(g.flags) == want_read)
            .is_some_and(|g| g.flags & libc::O_NONBLOCK as u32 != 0);
        let fl = if nonblock { libc::O_NONBLOCK } else { 0 };
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(end.as_raw_fd(), libc::F_SETFL, fl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(MadePipe {
        inode,
        rd_raw: rd.as_raw_fd(),
        wr_raw: wr.as_raw_fd(),
        rd: Some(rd),
        wr: Some(wr),
    })
}

/// An open, unlinked regular file holding `content`, made in the directory the deleted file
/// was in when it still exists (same filesystem, same quotas), else in the temporary
/// directory: O_TMPFILE where the filesystem has it, else a fresh name removed at once.
fn recreate_deleted(path: &str, content: &[u8], mode: u32) -> std::io::Result<File> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let original = std::path::Path::new(path.strip_suffix(" (deleted)").unwrap_or(path));
    let mut dirs = Vec::new();
    if let Some(d) = original.parent().filter(|d| d.is_dir()) {
        dirs.push(d.to_path_buf());
    }
    dirs.push(std::env::temp_dir());
    let mut last = std::io::Error::other("no directory to create it in");
    for dir in &dirs {
        let tmp = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir);
        let file = match tmp {
            Ok(f) => f,
            Err(_) => {
                // No O_TMPFILE here (e.g. a FUSE mount): a name of our own, unlinked at once.
                static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let name = dir.join(format!(".krg-deleted-{}-{n}", std::process::id()));
                match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .mode(0o600)
                    .open(&name)
                {
                    Ok(f) => {
                        std::fs::remove_file(&name)?;
                        f
                    }
                    Err(e) => {
                        last = e;
                        continue;
                    }
                }
            }
        };
        let mut w = &file;
        w.write_all(content)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        return Ok(file);
    }
    Err(last)
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries whether our fd is open.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

fn reopen(path: &str, flags: u32, pos: i64) -> std::io::Result<File> {
    let keep = (libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_DIRECTORY
        | libc::O_PATH
        | libc::O_NOFOLLOW
        | libc::O_DSYNC
        | libc::O_SYNC
        | libc::O_NOATIME
        | libc::O_DIRECT) as u32;
    let cpath = CString::new(path).map_err(std::io::Error::other)?;
    let fl = (flags & keep) as i32 | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(cpath.as_ptr(), fl) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened.
    let file = unsafe { File::from_raw_fd(fd) };
    if pos != 0 && flags & libc::O_PATH as u32 == 0 {
        // SAFETY: lseek on our fd; the offset lives in the open file description the child shares.
        if unsafe { libc::lseek(fd, pos, libc::SEEK_SET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// Addresses (TRAMP_LEN long, 1 GiB apart) free in the image and in our own address space (the
/// child starts as a copy of it). The last one is kept as a temporary spot for the vDSO.
fn trampoline_candidates(img: &[Mapping], own: &[procfs::MapLine]) -> Vec<u64> {
    let busy = |a: u64| {
        let e = a + TRAMP_LEN + PAGE;
        img.iter().any(|m| m.start < e && a < m.end + PAGE)
            || own.iter().any(|m| m.start < e && a < m.end + PAGE)
    };
    let mut out = Vec::new();
    let mut a: u64 = 0x10_0000_0000;
    while a < 0x7f00_0000_0000 && out.len() < 6 {
        if !busy(a) {
            out.push(a);
        }
        a += 1 << 30;
    }
    out
}

/// (XCR0, XSAVE area size) of this CPU/kernel, compared with what the image needs.
fn local_xsave() -> (u64, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        #[target_feature(enable = "xsave")]
        unsafe fn xgetbv0() -> u64 {
            std::arch::x86_64::_xgetbv(0)
        }
        #[allow(unused_unsafe)]
        // SAFETY: cpuid is always available on x86_64; xgetbv only after checking OSXSAVE.
        unsafe {
            let l1 = __cpuid(1);
            if l1.ecx & (1 << 27) == 0 {
                return (0, 512);
            }
            let d = __cpuid_count(0xd, 0);
            (xgetbv0(), d.ebx as usize)
        }
    }
}

const CHILD_STEPS: &[&str] = &[
    "block signals",
    "PTRACE_TRACEME",
    "raise fd limit",
    "move fds",
    "place fds",
    "close other fds",
    "chdir to the process's cwd",
    "personality",
    "session / process group",
    "map the trampoline",
];

/// What the child does on its own, prepared before clone.
struct ChildPlan {
    errfd: i32,
    base: i32,
    srcs: Vec<i32>,
    targets: Vec<i32>,
    cloexec: Vec<bool>,
    gaps: Vec<(u32, u32)>,
    cwd: CString,
    umask: u32,
    personality: u32,
    setsid: bool,
    setpgid: bool,
    tramp: Vec<u64>,
}

/// clone3 (with `set_tid` when a PID is asked for); returns the child's PID. The child runs
/// [`child_main`] and never returns.
fn clone_child(pid: Option<i32>, plan: &ChildPlan) -> std::io::Result<i32> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tid: [libc::pid_t; 1] = [pid.unwrap_or(0)];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid.is_some() {
            tid.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: pid.is_some() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork; the child only runs child_main.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r == 0 {
        child_main(plan);
    }
    Ok(r as i32)
}

/// Runs in the freshly cloned child of a possibly multi-threaded parent: raw syscalls only, no
/// allocation, no locks, no panics.
fn child_main(p: &ChildPlan) -> ! {
    // SAFETY: raw syscalls on values prepared by the parent; see the function comment.
    unsafe {
        let fail = |step: u32, errfd: i32| -> ! {
            let errno = *libc::__errno_location();
            let mut m = [0u8; 16];
            m[0..4].copy_from_slice(&1u32.to_le_bytes());
            m[4..8].copy_from_slice(&step.to_le_bytes());
            m[8..16].copy_from_slice(&(errno as u64).to_le_bytes());
            libc::write(errfd, m.as_ptr() as *const libc::c_void, 16);
            libc::syscall(libc::SYS_exit_group, 127);
            libc::_exit(127)
        };
        let all: u64 = !0;
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            0usize,
            8usize,
        ) != 0
        {
            fail(0, p.errfd);
        }
        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            fail(1, p.errfd);
        }
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        let need = (p.base as u64) + 2 + p.srcs.len() as u64;
        if rl.rlim_cur < need {
            rl.rlim_cur = need.max(rl.rlim_cur);
            if rl.rlim_max < need {
                rl.rlim_max = need;
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                fail(2, p.errfd);
            }
        }
        // Park everything above every number in use, then place: sources and targets may collide.
        if libc::dup3(p.errfd, p.base, libc::O_CLOEXEC) < 0 {
            fail(3, p.errfd);
        }
        let errfd = p.base;
        for (i, &s) in p.srcs.iter().enumerate() {
            if libc::dup3(s, p.base + 1 + i as i32, 0) < 0 {
                fail(3, errfd);
            }
        }
        for (i, &t) in p.targets.iter().enumerate() {
            let fl = if p.cloexec[i] { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(p.base + 1 + i as i32, t, fl) < 0 {
                fail(4, errfd);
            }
        }
        for &(lo, hi) in &p.gaps {
            if libc::close_range(lo, hi, 0) != 0 {
                fail(5, errfd);
            }
        }
        if libc::close_range((p.base + 1) as u32, u32::MAX, 0) != 0 {
            fail(5, errfd);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            fail(6, errfd);
        }
        libc::umask(p.umask as libc::mode_t);
        if libc::personality(p.personality as libc::c_ulong) < 0 {
            fail(7, errfd);
        }
        if p.setsid {
            libc::setsid();
        } else if p.setpgid {
            libc::setpgid(0, 0);
        }
        let mut tramp = 0u64;
        for &a in &p.tramp {
            let r = libc::mmap(
                a as *mut libc::c_void,
                TRAMP_LEN as usize,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if r as u64 == a {
                tramp = a;
                break;
            }
        }
        if tramp == 0 {
            fail(9, errfd);
        }
        // syscall; int3 (the int3 only catches a runaway step).
        let code = tramp as *mut u8;
        *code = 0x0f;
        *code.add(1) = 0x05;
        *code.add(2) = 0xcc;
        *code.add(3) = 0xcc;
        let mut m = [0u8; 16];
        m[8..16].copy_from_slice(&tramp.to_le_bytes());
        libc::write(errfd, m.as_ptr() as *const libc::c_void, 16);
        libc::close(errfd);
        let me = libc::syscall(libc::SYS_getpid);
        libc::syscall(libc::SYS_kill, me, libc::SIGSTOP);
        // The tracer takes over from the stop; it never lets the child run this far.
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_into_page_aligned_shares_that_cover_everything() {
        let data: Vec<u8> = (0..40 * PAGE as usize).map(|i| (i / 4096) as u8).collect();
        let piece = |addr: u64, from: usize, pages: usize, writable: bool| PagePiece {
            addr,
            data: &data[from * 4096..(from + pages) * 4096],
            writable,
            path: "",
        };
        // 3 + 30 + 7 pages, split into shares of 16 pages: the big run is cut twice.
        let pieces = vec![
            piece(0x1000_0000, 0, 3, true),
            piece(0x2000_0000, 3, 30, false),
            piece(0x3000_0000, 33, 7, true),
        ];
        let shares = split_pieces(pieces, 16 * PAGE as usize - 100);
        let sizes: Vec<usize> = shares
            .iter()
            .map(|s| s.iter().map(|p| p.data.len()).sum::<usize>() / PAGE as usize)
            .collect();
        assert_eq!(sizes, vec![16, 16, 8]);
        // Every byte lands at the address it had before the split, each once, in order.
        let mut seen = Vec::new();
        for p in shares.iter().flatten() {
            assert_eq!(p.addr % PAGE, 0);
            let (base, first, writable) = match p.addr {
                a if a >= 0x3000_0000 => (0x3000_0000, 33, true),
                a if a >= 0x2000_0000 => (0x2000_0000, 3, false),
                _ => (0x1000_0000, 0, true),
            };
            assert_eq!(p.writable, writable);
            let page = first + ((p.addr - base) / PAGE) as usize;
            assert_eq!(p.data[0], page as u8, "piece at {:#x}", p.addr);
            seen.extend_from_slice(p.data);
        }
        assert_eq!(seen, data);
    }
}
