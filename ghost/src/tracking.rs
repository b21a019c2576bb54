//! Write tracking between exports: which pages a process has not touched since its last image,
//! so the next checkpoint neither reads nor sends them.
//!
//! This kernel has no soft-dirty bits (see PLATFORM.md). userfaultfd in asynchronous
//! write-protect mode gives the same information: every page of a registered mapping is
//! write-protected at export; the first write after it is resolved by the kernel itself (no
//! handler thread, the process never blocks) and clears the page's protection, which the
//! PAGEMAP_SCAN ioctl on /proc/PID/pagemap reports as PAGE_IS_WRITTEN.
//!
//! The userfaultfd must belong to the target's mm, so it is created inside the process by an
//! injected syscall and moved to a high descriptor (close-on-exec) where it stays between
//! checkpoints; the exporter takes a copy with pidfd_getfd for the ioctls, which act on the
//! target's mm. Export never stores that descriptor, so a restored process has none and its
//! first checkpoint reads everything again.
//!
//! A page is taken as unchanged only if it is still write-protected, is not the shared zero
//! page, lies in a private writable mapping, and sits on the same physical frame as at the
//! last export. Shared mappings are never taken: other processes write them through their own
//! page tables. The kernel already drops the protection wherever contents may change without
//! a write fault (a mapping moved by mremap loses its registration since we ask for no remap
//! events; a zapped page comes back unprotected or as the zero page); the frame check is a
//! second, independent proof that costs one map lookup per page, and it only ever turns a
//! reuse into a read (a page migrated or swapped in again is read needlessly).
//! Everything here is an optimisation; whatever fails makes the export read pages as usual.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{GhostError, Result};
use crate::procfs;
use crate::sys::Remote;

/// `UFFD_FEATURE_WP_ASYNC`: write faults on protected pages are resolved by the kernel.
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: allowed without privileges; async write faults never reach a handler.
const UFFD_USER_MODE_ONLY: u64 = 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = 0xC060_6610;
/// Page categories of PAGEMAP_SCAN.
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages during the scan.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// The physical frame number bits of a /proc/PID/pagemap entry (zero without CAP_SYS_ADMIN).
const PM_PFN: u64 = (1 << 55) - 1;
/// Where the descriptor is put in the target: far from the low numbers a program would get
/// from its next open(), so holding it changes nothing the program can see in practice.
const HIGH_FD_DIVISOR: u64 = 2;
/// Regions returned per PAGEMAP_SCAN call.
const SCAN_BATCH: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// The pages a process had at its last export, with the physical frame each sat on. The caller
/// keeps it with the checkpoint it belongs to and passes it back for the next export.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrackBase {
    /// (page address, frame number), in address order (export records pages in that order):
    /// 16 bytes a page, looked up by binary search.
    frames: Vec<(u64, u64)>,
}

impl std::fmt::Debug for TrackBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrackBase({} pages)", self.frames.len())
    }
}

const BASE_MAGIC: &[u8; 8] = b"KRGTRAK1";

impl TrackBase {
    /// Number of pages recorded.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no page is recorded.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Serialises the base (magic, count, then address/frame pairs, little endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.frames.len() * 16);
        out.extend_from_slice(BASE_MAGIC);
        out.extend_from_slice(&(self.frames.len() as u64).to_le_bytes());
        for &(a, f) in &self.frames {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&f.to_le_bytes());
        }
        out
    }

    /// Reads what [`TrackBase::encode`] wrote; `None` if it is not that.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let rest = b.strip_prefix(BASE_MAGIC)?;
        let n = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
        let body = rest.get(8..)?;
        if body.len() != n.checked_mul(16)? {
            return None;
        }
        let le = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or_default());
        let frames: Vec<(u64, u64)> = body
            .chunks_exact(16)
            .map(|c| (le(&c[..8]), le(&c[8..])))
            .collect();
        frames
            .windows(2)
            .all(|w| w[0].0 < w[1].0)
            .then_some(TrackBase { frames })
    }

    /// Records the frame of page `addr` from its pagemap entry; no frame, no record.
    /// Pages must come in increasing address order; one out of order is not recorded.
    pub(crate) fn record(&mut self, addr: u64, pagemap_entry: u64) {
        let pfn = pagemap_entry & PM_PFN;
        let in_order = self.frames.last().is_none_or(|&(last, _)| last < addr);
        if pagemap_entry & procfs::PM_PRESENT != 0 && pfn != 0 && in_order {
            self.frames.push((addr, pfn));
        }
    }

    /// Whether page `addr` is on the frame it was on at the last export.
    pub(crate) fn same_frame(&self, addr: u64, pagemap_entry: u64) -> bool {
        let pfn = pagemap_entry & PM_PFN;
        pagemap_entry & procfs::PM_PRESENT != 0
            && pfn != 0
            && self
                .frames
                .binary_search_by_key(&addr, |&(a, _)| a)
                .is_ok_and(|i| self.frames[i].1 == pfn)
    }
}

/// Whether this process sees physical frame numbers in pagemap (CAP_SYS_ADMIN). Without
/// them no page can be proven unchanged, and PTE markers cannot be told from swapped pages,
/// so tracking is not armed at all.
pub(crate) fn frames_visible() -> bool {
    let probe = [1u8; 1];
    let addr = std::hint::black_box(probe.as_ptr()) as u64;
    let Ok(pm) = fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    procfs::pagemap(
        &pm,
        addr & !(crate::PAGE - 1),
        (addr & !(crate::PAGE - 1)) + crate::PAGE,
    )
    .ok()
    .and_then(|e| e.first().copied())
    .is_some_and(|e| e & procfs::PM_PRESENT != 0 && e & PM_PFN != 0)
}

/// The exporter's handle on the target's write-tracking userfaultfd.
pub(crate) struct Tracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: fs::File,
}

/// Set in a userfaultfd's features once UFFDIO_API was done on it (shown in its fdinfo).
const UFFD_FEATURE_INITIALIZED: u64 = 1 << 31;

/// Finds the tracking userfaultfd the target already holds: one whose fdinfo shows the
/// asynchronous write-protect feature, or one never initialised (an exporter was killed
/// between creating and initialising it; no program keeps such a descriptor). Returns its
/// descriptor number and whether UFFDIO_API is still to be done.
pub(crate) fn find_uffd(pid: i32) -> Option<(i32, bool)> {
    let rd = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for ent in rd.flatten() {
        let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let is_uffd = fs::read_link(ent.path())
            .map(|t| t.to_string_lossy() == "anon_inode:[userfaultfd]")
            .unwrap_or(false);
        if !is_uffd {
            continue;
        }
        match uffd_features(pid, fd) {
            Some(f) if f & UFFD_FEATURE_INITIALIZED == 0 => return Some((fd, true)),
            Some(f) if f & UFFD_FEATURE_WP_ASYNC != 0 => return Some((fd, false)),
            _ => {}
        }
    }
    None
}

/// The features of a userfaultfd from its fdinfo line "API:\t<api>:<features>:<ioctls>".
fn uffd_features(pid: i32, fd: i32) -> Option<u64> {
    let s = procfs::read_to_string(pid, &format!("fdinfo/{fd}")).ok()?;
    let api = procfs::status_field(&s, "API")?;
    let features = api.split(':').nth(1)?;
    u64::from_str_radix(features, 16).ok()
}

fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> std::io::Result<i64> {
    // SAFETY: `arg` is the #[repr(C)] struct the request expects and lives for the call.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

impl Tracker {
    /// Opens the target's tracking userfaultfd, creating it with injected syscalls (the
    /// process must be stopped under `remote`) when it has none.
    pub fn attach(remote: &Remote) -> Result<Tracker> {
        let pid = remote.pid;
        if !frames_visible() {
            return Err(GhostError::Unsupported(
                "write tracking needs CAP_SYS_ADMIN to see page frame numbers".into(),
            ));
        }
        let (target_fd, fresh) = match find_uffd(pid) {
            Some(found) => found,
            None => (create_in_target(remote)?, true),
        };
        // SAFETY: pidfd_open and pidfd_getfd with valid arguments; results checked below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(GhostError::sys(
                "pidfd_open",
                pid,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: pidfd_open returned a new descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: see above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
        if fd < 0 {
            return Err(GhostError::sys(
                "pidfd_getfd of the tracking userfaultfd",
                pid,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: pidfd_getfd returned a new descriptor we own.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if fresh {
            let mut api = UffdioApi {
                api: UFFD_API,
                features: UFFD_FEATURE_WP_ASYNC,
                ioctls: 0,
            };
            ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| {
                GhostError::sys(
                    "UFFDIO_API with asynchronous write protection (kernel 6.7 or later)",
                    pid,
                    e,
                )
            })?;
        }
        let pagemap = fs::OpenOptions::new()
            .read(true)
            .open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| GhostError::sys("open /proc/PID/pagemap", pid, e))?;
        Ok(Tracker { pid, uffd, pagemap })
    }

    /// Pages that are still write-protected since the last [`Tracker::rearm`], present, and
    /// not the zero page, as (start, end) address ranges.
    pub fn unwritten(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut vec = vec![PageRegion::default(); SCAN_BATCH];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: at,
                end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                // WPALLOWED and PRESENT set, WRITTEN and PFNZERO clear.
                category_inverted: PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
                category_mask: PAGE_IS_WPALLOWED
                    | PAGE_IS_PRESENT
                    | PAGE_IS_WRITTEN
                    | PAGE_IS_PFNZERO,
                return_mask: PAGE_IS_PRESENT,
                ..Default::default()
            };
            let n = ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg)
                .map_err(|e| GhostError::sys("PAGEMAP_SCAN", self.pid, e))?;
            for r in &vec[..n as usize] {
                out.push((r.start, r.end));
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }

    /// Registers every private mapping for write tracking (mappings registered before stay
    /// registered) and write-protects all their pages again: from now on, a write marks a
    /// page. Mappings the kernel refuses stay untracked and are read in full every time.
    pub fn rearm(&self, maps: &[procfs::MapLine]) -> Result<()> {
        for m in maps {
            // Shared mappings can be written through other processes' page tables, which no
            // tracking here sees. Read-only and reserved (PROT_NONE) areas are left out too:
            // registering installs a marker on every unpopulated page, page tables included.
            if m.shared || !m.write || m.path.starts_with("[v") {
                continue;
            }
            let mut reg = UffdioRegister {
                start: m.start,
                len: m.end - m.start,
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            if let Err(e) = ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) {
                tracing::debug!(pid = self.pid, start = m.start, error = %e, "mapping not tracked");
            }
        }
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING,
            start: 0,
            end: user_end(maps),
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg)
            .map_err(|e| GhostError::sys("PAGEMAP_SCAN write-protecting", self.pid, e))?;
        Ok(())
    }
}

/// The end of the last mapping below the kernel's half ([vsyscall] is above it and outside
/// what PAGEMAP_SCAN accepts).
pub(crate) fn user_end(maps: &[procfs::MapLine]) -> u64 {
    maps.iter()
        .filter(|m| m.path != "[vsyscall]")
        .map(|m| m.end)
        .max()
        .unwrap_or(0)
}

/// Creates the userfaultfd inside the stopped target and moves it to a high, close-on-exec
/// descriptor. Returns that descriptor's number.
fn create_in_target(remote: &Remote) -> Result<i32> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
    let fd = remote.call_ok("userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 with a NULL new limit only reads.
    let soft =
        if unsafe { libc::prlimit64(remote.pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) }
            == 0
        {
            lim.rlim_cur.min(1 << 20)
        } else {
            1024
        };
    let high = remote.call(
        libc::SYS_fcntl,
        [
            fd,
            libc::F_DUPFD_CLOEXEC as u64,
            soft / HIGH_FD_DIVISOR,
            0,
            0,
            0,
        ],
    );
    let kept = match high {
        Ok(h) if h >= 0 => {
            remote.call_ok("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
            h as u64
        }
        // No free descriptor up there: keep the low one rather than give up tracking.
        _ => fd,
    };
    Ok(kept as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESENT: u64 = procfs::PM_PRESENT;

    #[test]
    fn base_round_trip_and_frame_check() {
        let mut b = TrackBase::default();
        b.record(0x1000, PRESENT | 7);
        b.record(0x3000, PRESENT | 9);
        b.record(0x2000, PRESENT | 8); // out of order: not recorded
        b.record(0x4000, 11); // not present
        b.record(0x5000, PRESENT); // no frame visible
        assert_eq!(b.len(), 2);
        let d = TrackBase::decode(&b.encode()).expect("decodes");
        assert_eq!(d, b);
        assert!(d.same_frame(0x1000, PRESENT | 7));
        assert!(!d.same_frame(0x1000, PRESENT | 8), "another frame");
        assert!(!d.same_frame(0x1000, 7), "no longer present");
        assert!(!d.same_frame(0x2000, PRESENT | 8), "never recorded");
        let mut bad = b.encode();
        bad.truncate(bad.len() - 1);
        assert!(TrackBase::decode(&bad).is_none());
        assert!(TrackBase::decode(b"KRGTRAK1").is_none());
    }
}
