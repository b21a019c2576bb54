//! Export: freeze a live process with ptrace, capture its state and stream it as a ghost image.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::compat;
use crate::error::{GhostError, Result};
use crate::image::{
    AltStack, FileId, ImageWriter, MapKind, Mapping, MmFields, PageRun, PendingSignal,
    ProcessImage, Rlimit, Rseq, SigAction, ThreadImage,
};
use crate::procfs::{self, MapLine, Stat, PM_FILE, PM_PRESENT};
use crate::rao::GhostWriter;
use crate::restorable::{self, FdPolicy};
use crate::sys::{self, ProcMem, Regs, Remote};
use crate::threads::{self, Held};
use crate::tracking::{self, TrackBase, Tracker};
use crate::PAGE;

/// What happens to the process once its image is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum After {
    /// It continues as if nothing happened (a checkpoint).
    #[default]
    LeaveRunning,
    /// It is left stopped with SIGSTOP (resume with SIGCONT / `krg unfreeze`).
    Stop,
    /// It is killed (SIGKILL): checkpoint-and-kill, or the source side of a migration.
    Kill,
}

/// Options of [`export_process`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Fate of the process after a successful export. On failure it is always left running.
    pub after: After,
    /// Arm write tracking (see [`crate::tracking`]) so that the next export can skip the pages
    /// left untouched; the report's `tracked` is then what to pass back as `base`. Without it
    /// a `base` is still used, and the tracking is left as it was (a process about to be
    /// killed needs no next export).
    pub track_writes: bool,
    /// The pages of the previous export, when the writer holds that export's image: pages
    /// untouched since are offered to [`GhostWriter::reuse_pages`] instead of being read.
    pub base: Option<TrackBase>,
    /// fds to restore as /dev/null or to have handed in at import, instead of refusing the
    /// export when a restart could not rebuild them.
    pub fds: FdPolicy,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Bytes of the whole image.
    pub image_bytes: u64,
    /// Bytes of page data in it.
    pub page_bytes: u64,
    /// Number of mappings.
    pub mappings: usize,
    /// PID in the process's own namespace (the one a restart takes back).
    pub ns_pid: i32,
    /// Bytes of page data read from the process (the rest was reused from the base).
    pub read_bytes: u64,
    /// Bytes of page data the writer took from the previous image instead.
    pub reused_bytes: u64,
    /// The base for the next export, when write tracking is armed.
    pub tracked: Option<TrackBase>,
    /// Why write tracking could not be armed, when it was asked for and failed.
    pub tracking_failed: Option<String>,
    /// Number of threads captured (the main one included).
    pub threads: usize,
}

/// Files up to this size are hashed at export so that an identical copy on another node is
/// accepted at import even though its inode differs.
const HASH_FILES_UP_TO: u64 = 64 << 20;
/// Pages are copied out in pieces of this size.
const CHUNK: usize = 8 << 20;

/// Detaches on drop so that any error leaves the process running.
struct Traced {
    pid: i32,
    regs: Option<Regs>,
    held: Vec<i32>,
    /// The other threads, each traced and stopped.
    threads: Vec<Held>,
    active: bool,
}

impl Traced {
    fn release(&mut self, sig: i32) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        // Every thread is let go, even if one of them fails; the first error is reported.
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = match &t.regs {
                Some(regs) => sys::set_regs(t.tid, regs),
                None => Ok(()),
            }
            .and_then(|_| sys::detach(t.tid, 0));
            for s in t.held {
                sys::tgkill(self.pid, t.tid, s);
            }
            if first.is_ok() {
                first = r;
            }
        }
        if let Some(r) = &self.regs {
            sys::set_regs(self.pid, r)?;
        }
        let r = sys::detach(self.pid, sig).and(first);
        for s in self.held.drain(..) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(self.pid, s) };
        }
        r
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.release(0);
    }
}

/// Freezes `pid`, writes its ghost image to `out`, then leaves it running, stopped or killed as
/// `opts.after` says. Every thread is frozen and captured. The process must be traceable by
/// the caller.
pub fn export_process(
    pid: i32,
    opts: &ExportOptions,
    out: &mut dyn GhostWriter,
) -> Result<ExportReport> {
    let status = procfs::read_to_string(pid, "status").map_err(|_| GhostError::Process {
        pid,
        msg: "no such process (check the PID; inside `krg run` use the PID printed at start)"
            .into(),
    })?;
    sys::seize(pid)?;
    let mut guard = Traced {
        pid,
        regs: None,
        held: Vec::new(),
        threads: Vec::new(),
        active: true,
    };
    sys::interrupt(pid)?;
    let st = sys::wait(pid)?;
    if !libc::WIFSTOPPED(st) {
        guard.active = false;
        return Err(GhostError::Process {
            pid,
            msg: format!("{} while being frozen", sys::describe_status(st)),
        });
    }
    // The other threads, before anything is read: memory, fds and the survey must see the
    // process at one moment.
    threads::freeze_others(pid, &mut guard.threads)?;
    // Frozen: decide now, before any syscall is injected and any byte written, whether a
    // restart could rebuild everything; a refusal releases the process untouched. The fd
    // list (with each fd's restore method) is what goes into the image: a frozen process
    // cannot open or close fds.
    let skip = tracking::find_uffd(pid).map(|(fd, _)| fd);
    let mut fds = restorable::survey(pid, &opts.fds, skip, true)?.into_fds(pid)?;
    let carried = read_fd_contents(pid, &mut fds)?;
    let regs = sys::get_regs(pid)?;
    guard.regs = Some(regs);
    let xstate = sys::get_xstate(pid)?;
    let sigmask = sys::get_sigmask(pid)?;
    let mut pending = Vec::new();
    for shared in [false, true] {
        for si in sys::peek_siginfo(pid, shared)? {
            pending.push(PendingSignal {
                shared,
                siginfo: si,
            });
        }
    }
    let rseq = sys::rseq_config(pid)?.map(|(ptr, len, sig)| Rseq { ptr, len, sig });
    let mut others: Vec<ThreadImage> = Vec::new();
    for t in guard.threads.iter_mut() {
        let (img, regs) = threads::capture(pid, t.tid)?;
        t.regs = Some(regs);
        others.push(img);
    }

    // State only the process itself can report: ask it through injected syscalls.
    let maps0 = procfs::maps(pid)?;
    let mem = ProcMem::open(pid)?;
    let vdso = maps0
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| GhostError::Unsupported(format!("process {pid} has no [vdso] mapping")))?;
    let mut vdso_text = vec![0u8; (vdso.end - vdso.start) as usize];
    mem.read(vdso.start, &mut vdso_text)
        .map_err(|e| GhostError::sys("reading [vdso]", pid, e))?;
    let syscall_off = vdso_text
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .ok_or_else(|| GhostError::Unsupported("no syscall instruction in the vDSO".into()))?;
    let syscall_at = vdso.start + syscall_off as u64;
    let remote = Remote::new(pid, syscall_at)?;
    let thread_remotes = guard
        .threads
        .iter()
        .map(|t| Remote::new(t.tid, syscall_at))
        .collect::<Result<Vec<_>>>()?;
    let asked = ask_process(&remote, &mem, &status, &thread_remotes);
    // The tracking descriptor is made (if new) while syscalls can still be injected.
    let tracker = match (&asked, opts.track_writes || opts.base.is_some()) {
        (Ok(_), true) => Some(Tracker::attach(&remote)),
        _ => None,
    };
    guard.held = remote.held.take();
    // Put the registers back now: the rest is read from the outside, with the process parked
    // where our death (kill -9 of krg mid-dump) just lets it run on.
    sys::set_regs(pid, &regs)?;
    for (t, r) in guard.threads.iter_mut().zip(&thread_remotes) {
        t.held = r.held.take();
        if let Some(regs) = &t.regs {
            sys::set_regs(t.tid, regs)?;
        }
    }
    let asked = asked?;
    sys::park(pid)?;
    sys::set_regs(pid, &regs)?;
    for t in &guard.threads {
        if let Some(regs) = &t.regs {
            sys::park(t.tid)?;
            sys::set_regs(t.tid, regs)?;
        }
    }
    for (img, (alt, ctid)) in others.iter_mut().zip(&asked.threads) {
        img.sigaltstack = alt.clone();
        img.clear_child_tid = *ctid;
    }
    let (sigactions, altstack, brk) = (asked.sigactions, asked.altstack, asked.brk);

    let maps = procfs::maps(pid)?;
    let stat = Stat::read(pid)?;
    let pm = fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| GhostError::sys("open /proc/PID/pagemap", pid, e))?;
    let mut file_ids: HashMap<String, FileId> = HashMap::new();
    let mut mappings = Vec::new();
    // Pagemap entries of each stored mapping (same order as `mappings`), for write tracking.
    let mut entries: Vec<Vec<u64>> = Vec::new();
    let mut page_bytes = 0u64;
    for m in &maps {
        let Some(kind) = restorable::map_kind(pid, m).map_err(|p| GhostError::Unrestorable {
            pid,
            comm: procfs::read_to_string(pid, "comm")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            problems: vec![p],
        })?
        else {
            continue;
        };
        let mut mp = Mapping {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            kind: kind as i32,
            path: m.path.clone(),
            offset: m.offset,
            file: None,
            runs: Vec::new(),
            growsdown: m.path == "[stack]",
        };
        if matches!(kind, MapKind::FilePrivate | MapKind::FileShared) {
            let id = match file_ids.get(&m.path) {
                Some(id) => id.clone(),
                None => {
                    let id = file_id(pid, m)?;
                    file_ids.insert(m.path.clone(), id.clone());
                    id
                }
            };
            mp.file = Some(id);
        }
        if kind != MapKind::FileShared && kind != MapKind::Vdso {
            let ents = procfs::pagemap(&pm, m.start, m.end)
                .map_err(|e| GhostError::sys("reading /proc/PID/pagemap", pid, e))?;
            let want = |e: u64| match kind {
                // A private file page that is still the page-cache page comes back from the
                // file; only copies the process wrote (anonymous now) are stored.
                MapKind::FilePrivate => {
                    (e & PM_PRESENT != 0 && e & PM_FILE == 0) || procfs::swapped(e)
                }
                _ => e & PM_PRESENT != 0 || procfs::swapped(e),
            };
            let mut i = 0;
            while i < ents.len() {
                if !want(ents[i]) {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < ents.len() && want(ents[i]) {
                    i += 1;
                }
                mp.runs.push(PageRun {
                    addr: m.start + s as u64 * PAGE,
                    npages: (i - s) as u64,
                });
                page_bytes += (i - s) as u64 * PAGE;
            }
            entries.push(ents);
        } else {
            entries.push(Vec::new());
        }
        mappings.push(mp);
    }
    // Pages still write-protected since the last export; an error only costs a full read.
    let tracker = tracker.map(|t| {
        t.and_then(|t| {
            let unwritten = match &opts.base {
                Some(_) => t.unwritten(0, tracking::user_end(&maps))?,
                None => Vec::new(),
            };
            Ok((t, unwritten))
        })
    });
    let (tracker, unwritten, mut tracking_failed) = match tracker {
        Some(Ok((t, u))) => (Some(t), u, None),
        Some(Err(e)) => (None, Vec::new(), Some(e.to_string())),
        None => (None, Vec::new(), None),
    };
    let unchanged = |kind: MapKind, addr: u64, entry: u64| -> bool {
        let Some(base) = &opts.base else { return false };
        let private = matches!(kind, MapKind::Anon | MapKind::FilePrivate);
        let i = unwritten.partition_point(|r| r.1 <= addr);
        private && unwritten.get(i).is_some_and(|r| r.0 <= addr) && base.same_frame(addr, entry)
    };

    let cwd = fs::read_link(format!("/proc/{pid}/cwd"))
        .map_err(|e| GhostError::sys("readlink /proc/PID/cwd", pid, e))?
        .to_string_lossy()
        .into_owned();
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let auxv = fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| GhostError::sys("reading /proc/PID/auxv", pid, e))?;
    let personality = procfs::read_to_string(pid, "personality")
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let (robust_head, robust_len) = threads::robust_list(pid);
    let mut rlimits = Vec::new();
    for res in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a NULL new limit only reads.
        let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
        if r == 0 {
            rlimits.push(Rlimit {
                resource: res,
                cur: old.rlim_cur,
                max: old.rlim_max,
            });
        }
    }
    // What fds carry follows the mappings' pages in the page data.
    page_bytes += carried
        .iter()
        .map(|c| crate::image::stored_len(c.len() as u64))
        .sum::<u64>();
    let meta = ProcessImage {
        requirements: Some(compat::requirements(&xstate, &maps, &vdso_text)),
        pid: procfs::status_ns_last(&status, "NSpid").unwrap_or(pid),
        host_pid: pid,
        comm: procfs::read_to_string(pid, "comm")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        exe,
        regs: sys::regs_to_bytes(&regs),
        xstate,
        mappings,
        mm: Some(MmFields {
            start_code: stat.field(26),
            end_code: stat.field(27),
            start_data: stat.field(45),
            end_data: stat.field(46),
            start_brk: stat.field(47),
            brk,
            start_stack: stat.field(28),
            arg_start: stat.field(48),
            arg_end: stat.field(49),
            env_start: stat.field(50),
            env_end: stat.field(51),
        }),
        auxv,
        rseq,
        fds,
        cwd,
        umask: procfs::status_field(&status, "Umask")
            .and_then(|u| u32::from_str_radix(&u, 8).ok())
            .unwrap_or(0o022),
        rlimits,
        sigactions,
        sigmask,
        pending,
        sigaltstack: altstack,
        sid: procfs::status_ns_last(&status, "NSsid").unwrap_or(0),
        pgid: procfs::status_ns_last(&status, "NSpgid").unwrap_or(0),
        personality,
        robust_head,
        robust_len,
        page_bytes,
        threads: others,
        clear_child_tid: asked.clear_child_tid,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };

    let mut w = ImageWriter::begin(out, &meta)?;
    // (address, bytes, readable, unchanged): the pieces of page data in image order.
    let mut pieces: Vec<(u64, usize, bool, bool)> = Vec::new();
    let mut next_base = TrackBase::default();
    for (m, ents) in meta.mappings.iter().zip(&entries) {
        // process_vm_readv cannot read pages the process itself cannot read; /proc/PID/mem can.
        let readable = m.prot & libc::PROT_READ as u32 != 0;
        let kind = MapKind::try_from(m.kind).unwrap_or(MapKind::ShmemAnon);
        let entry = |addr: u64| ents[((addr - m.start) / PAGE) as usize];
        for run in &m.runs {
            let mut addr = run.addr;
            let end = run.addr + run.npages * PAGE;
            while addr < end {
                if opts.track_writes {
                    next_base.record(addr, entry(addr));
                }
                // The longest stretch from here that is either all unchanged or all changed.
                let same = unchanged(kind, addr, entry(addr));
                let mut stop = addr + PAGE;
                while stop < end
                    && stop - addr < CHUNK as u64
                    && unchanged(kind, stop, entry(stop)) == same
                {
                    if opts.track_writes {
                        next_base.record(stop, entry(stop));
                    }
                    stop += PAGE;
                }
                pieces.push((addr, (stop - addr) as usize, readable, same));
                addr = stop;
            }
        }
    }
    let reused_bytes = w.pages_from(
        &pieces,
        |p| p.1,
        |&(addr, n, _, same)| same.then_some((addr, n as u64 / PAGE)),
        |&(addr, _, readable, _), b| {
            if readable {
                sys::vm_read(pid, addr, b)
            } else {
                mem.read(addr, b)
            }
            .map_err(|e| GhostError::sys(format!("reading memory at {addr:#x}"), pid, e))
        },
    )?;
    for content in &carried {
        let pad = crate::image::stored_len(content.len() as u64) as usize - content.len();
        w.pages(content)?;
        w.pages(&vec![0u8; pad])?;
    }
    w.end()?;
    // Still frozen: from here on every write of the process marks its page.
    let tracker = tracker.filter(|_| opts.track_writes);
    let tracked = match tracker.map(|t| t.rearm(&maps)) {
        Some(Ok(())) => Some(next_base),
        Some(Err(e)) => {
            tracking_failed = Some(e.to_string());
            None
        }
        None => None,
    };
    let meta_len = prost::Message::encoded_len(&meta) as u64;
    let report = ExportReport {
        image_bytes: crate::image::HEADER_LEN as u64
            + meta_len
            + page_bytes
            + crate::image::TRAILER_LEN as u64,
        page_bytes,
        mappings: meta.mappings.len(),
        ns_pid: meta.pid,
        read_bytes: page_bytes - reused_bytes,
        reused_bytes,
        tracked,
        tracking_failed,
        threads: meta.threads.len() + 1,
    };
    finish(&mut guard, opts.after)?;
    Ok(report)
}

/// Releases the process as asked.
fn finish(guard: &mut Traced, after: After) -> Result<()> {
    let pid = guard.pid;
    match after {
        After::LeaveRunning => guard.release(0),
        After::Stop => {
            // SAFETY: plain kill(2); the SIGSTOP is taken after the detach.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            guard.release(0)
        }
        After::Kill => {
            guard.active = false;
            let ppid = Stat::read(pid).map(|s| s.field(4) as i32).unwrap_or(0);
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // The other threads are ours to reap as their tracer: until they are, the leader's
            // exit is not reported to anyone.
            for t in guard.threads.drain(..) {
                let _ = sys::wait(t.tid);
            }
            // We are its tracer: collect the death notice. If we are also its parent the
            // zombie stays for our caller to reap (WNOWAIT); otherwise consuming it here only
            // ends the tracing and passes the zombie on to the real parent.
            let flags = libc::WEXITED
                | libc::__WALL
                | if ppid == std::process::id() as i32 {
                    libc::WNOWAIT
                } else {
                    0
                };
            loop {
                // SAFETY: zeroed siginfo out buffer.
                let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: valid pointers.
                let r = unsafe { libc::waitid(libc::P_PID, pid as u32, &mut si, flags) };
                if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// What the process reports from inside (injected syscalls).
struct Asked {
    sigactions: Vec<SigAction>,
    altstack: Option<AltStack>,
    brk: u64,
    clear_child_tid: u64,
    /// Alternate stack and clear_child_tid of each other thread, in `others` order.
    threads: Vec<(Option<AltStack>, u64)>,
}

/// Signal dispositions, the program break, and each thread's alternate stack and
/// clear_child_tid, asked from inside (`others` inject into the threads other than the main).
fn ask_process(remote: &Remote, mem: &ProcMem, status: &str, others: &[Remote]) -> Result<Asked> {
    let mask = |k: &str| {
        procfs::status_field(status, k)
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .unwrap_or(0)
    };
    let non_default = mask("SigCgt") | mask("SigIgn");
    let brk = remote.call_ok("brk(0)", libc::SYS_brk, [0; 6])?;
    let scratch = remote.call_ok(
        "mmap scratch page",
        libc::SYS_mmap,
        [
            0,
            PAGE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let res = (|| {
        let mut acts = Vec::new();
        for sig in 1..=64u32 {
            if non_default & (1u64 << (sig - 1)) == 0 {
                continue;
            }
            remote.call_ok(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [sig as u64, 0, scratch, 8, 0, 0],
            )?;
            let mut b = [0u8; 32];
            mem.read(scratch, &mut b)
                .map_err(|e| GhostError::sys("reading sigaction", remote.pid, e))?;
            let q = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[i * 8..i * 8 + 8]);
                u64::from_le_bytes(a)
            };
            acts.push(SigAction {
                sig,
                handler: q(0),
                flags: q(1),
                restorer: q(2),
                mask: q(3),
            });
        }
        let (altstack, clear_child_tid) = threads::ask(remote, mem, scratch)?;
        // The scratch page is the process's: every thread shares it.
        let threads = others
            .iter()
            .map(|r| threads::ask(r, mem, scratch))
            .collect::<Result<Vec<_>>>()?;
        Ok(Asked {
            sigactions: acts,
            altstack,
            brk,
            clear_child_tid,
            threads,
        })
    })();
    remote.call_ok(
        "munmap scratch page",
        libc::SYS_munmap,
        [scratch, PAGE, 0, 0, 0, 0],
    )?;
    res
}

/// Identity of the file mapped at `m` (through map_files, which follows the mapping even if the
/// path was renamed since).
fn file_id(pid: i32, m: &MapLine) -> Result<FileId> {
    let link = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let md = fs::metadata(&link)
        .or_else(|_| fs::metadata(&m.path))
        .map_err(|e| GhostError::sys(format!("stat of mapped file {}", m.path), pid, e))?;
    let hash = if md.len() <= HASH_FILES_UP_TO {
        fs::read(&link)
            .or_else(|_| fs::read(&m.path))
            .map(|b| blake3::hash(&b).as_bytes().to_vec())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(FileId {
        dev: md.dev(),
        ino: md.ino(),
        size: md.len(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        hash,
    })
}

/// Reads what fds carry into the image, in fd order (see [`crate::image::Fd::stored_bytes`]):
/// the contents of deleted files (recording their exact size), the bytes buffered in
/// internal pipes (recording them and each pipe's capacity) and the messages queued in
/// socketpair ends (peeked, their lengths recorded by the survey). The process is frozen: nothing
/// changes them meanwhile (short of another process holding the same file or pipe, which a
/// checkpoint of one process cannot freeze).
fn read_fd_contents(pid: i32, fds: &mut [crate::image::Fd]) -> Result<Vec<Vec<u8>>> {
    use std::io::Read;
    let mut out = Vec::new();
    // Pipes already read: (inode, capacity).
    let mut pipes: Vec<(u64, u32)> = Vec::new();
    let mut pidfd = None;
    for f in fds.iter_mut() {
        if let Some(d) = f.deleted.as_mut().filter(|d| d.same_as.is_none()) {
            let link = format!("/proc/{pid}/fd/{}", f.fd);
            let mut content = Vec::new();
            fs::File::open(&link)
                .and_then(|file| {
                    file.take(restorable::DELETED_FILE_MAX + 1)
                        .read_to_end(&mut content)
                })
                .map_err(|e| GhostError::sys(format!("reading deleted file {}", f.path), pid, e))?;
            if content.len() as u64 > restorable::DELETED_FILE_MAX {
                return Err(GhostError::Unsupported(format!(
                    "deleted file {} of process {pid} grew past {} MiB while it was checkpointed",
                    f.path,
                    restorable::DELETED_FILE_MAX >> 20
                )));
            }
            d.size = content.len() as u64;
            out.push(content);
        }
        if let Some(s) = f.socket.as_ref().filter(|s| s.queued > 0) {
            if pidfd.is_none() {
                pidfd = Some(sys::pidfd_open(pid)?);
            }
            let Some(pidfd) = &pidfd else { continue };
            let content = crate::sockets::peek_queue(pidfd, f.fd, s).map_err(|e| {
                GhostError::Unsupported(format!(
                    "the queue of socket fd {} of process {pid}: {e}",
                    f.fd
                ))
            })?;
            out.push(content);
            continue;
        }
        let read_end = restorable::reads(f.flags);
        if let Some(p) = f.pipe.as_mut() {
            if let Some(&(_, cap)) = pipes.iter().find(|(i, _)| *i == p.inode) {
                p.capacity = cap;
                continue;
            }
            if !read_end {
                // The buffer is read through a read end; the pipe's first one carries it.
                continue;
            }
            if pidfd.is_none() {
                pidfd = Some(sys::pidfd_open(pid)?);
            }
            let Some(pidfd) = &pidfd else { continue };
            let (cap, content) = sys::peek_pipe(pid, pidfd, f.fd)?;
            p.capacity = cap;
            p.buffered = content.len() as u64;
            pipes.push((p.inode, cap));
            out.push(content);
        }
    }
    // Write ends before the pipe's first read end learn the capacity now.
    for f in fds.iter_mut() {
        if let Some(p) = f.pipe.as_mut() {
            if let Some(&(_, cap)) = pipes.iter().find(|(i, _)| *i == p.inode) {
                p.capacity = cap;
            }
        }
    }
    Ok(out)
}
