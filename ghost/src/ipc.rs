//! System V IPC objects: capture a message queue, a semaphore array or a shared memory segment
//! into a typed snapshot ([`SysvMsgQueue`], [`SysvSemArray`], [`SysvShmSegment`]), and create it
//! again with the same key, the same id, owner, permissions and contents.
//!
//! * [`capture`] reads an object without changing it: a queue's messages are copied with
//!   `msgrcv(MSG_COPY | IPC_NOWAIT)` by index, so none is received; a semaphore array's values
//!   with `GETALL`; a segment is attached read-only and only its pages in memory (`mincore`;
//!   every page when some of the segment is in swap) are read, all-zero pages left out. A queue
//!   whose users sent or received while it was read is refused: freeze them first.
//! * [`check_restore`] refuses a set of snapshots (nothing created) when an object of the same
//!   kind already has one of their keys or ids, when this host's limits (msgmax, semmsl,
//!   shmmax) would refuse them, or when ids cannot be chosen (not root). [`restore`] checks
//!   the same, then creates every object under its old id by writing
//!   `/proc/sys/kernel/{msg,sem,shm}_next_id` just before the create (the kernel's checkpoint
//!   and restore interface, needs root), checks the id it got, sets owner, mode and (queues)
//!   `msg_qbytes` with `IPC_SET`, and fills it. If any step fails, the objects it created are
//!   removed again.
//! * [`encode_image`] / [`decode_image`] (and the file helpers) give a self-contained image:
//!
//! ```text
//! "KRGSYSV\0" | format u32 | reserved u32 | payload len u64 | blake3(payload) | payload (prost)
//! ```
//!
//!   A damaged, truncated or newer image is refused before anything is created.
//!
//! Not captured: `SEM_UNDO` adjustments (they belong to each process that made them and go
//! with it), processes waiting on a queue or semaphore, pids and times (`lspid`, `sempid`,
//! `shm_atime`...), attachments of a segment, and the creator (`cuid`/`cgid` are the
//! restorer's, root).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::str::FromStr;

/// First bytes of a System V IPC image.
pub const IMAGE_MAGIC: &[u8; 8] = b"KRGSYSV\0";
/// Format version written by this crate; higher versions are refused.
pub const IMAGE_FORMAT: u32 = 1;
/// Size of the framing in front of the payload.
const FRAME_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// The largest value a semaphore can hold (the kernel's SEMVMX).
const SEMVMX: u32 = 32767;
const PAGE: usize = crate::PAGE as usize;
/// The kernel's id layout without `ipcmni_extend`: the low 15 bits are the slot.
const SLOT_MASK: i32 = 0x7fff;
/// The segment is marked for removal (`IPC_RMID` while attached).
const SHM_DEST: u32 = 0o1000;
/// The segment is locked in memory (`SHM_LOCK`).
const SHM_LOCKED: u32 = 0o2000;
/// The capability that lets msg_qbytes exceed kernel.msgmnb.
const CAP_SYS_RESOURCE: u32 = 24;

/// Errors of System V IPC capture and restore.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// A system call on an object failed.
    #[error("{what} of {object} failed: {source}")]
    Sys {
        /// The operation ("IPC_STAT", "shmat"...).
        what: String,
        /// The object, e.g. "message queue 32768".
        object: String,
        /// The errno.
        source: io::Error,
    },
    /// The object cannot be captured faithfully.
    #[error("{object} cannot be checkpointed: {msg}")]
    Capture {
        /// The object.
        object: String,
        /// Why, and what to do.
        msg: String,
    },
    /// The image is not a System V IPC image, is damaged, truncated or from a newer krg.
    #[error("System V IPC image {origin} refused (nothing was created): {msg}")]
    Damaged {
        /// Where the image came from.
        origin: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The snapshots cannot be restored here; nothing was created.
    #[error("System V IPC restart refused (nothing was created): {}", problems.join("; "))]
    Refused {
        /// Every reason, each saying what to do.
        problems: Vec<String>,
    },
    /// Creating or filling an object failed; every object created before was removed.
    #[error("restoring {object} failed: {msg}; the objects this restart had created were removed")]
    Restore {
        /// The object.
        object: String,
        /// What failed.
        msg: String,
    },
    /// Reading or writing an image file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The file.
        path: String,
        /// The io error.
        source: io::Error,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = IpcError> = std::result::Result<T, E>;

/// The three kinds of System V IPC objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpcKind {
    /// A message queue (`msgget`).
    Msg,
    /// A semaphore array (`semget`).
    Sem,
    /// A shared memory segment (`shmget`).
    Shm,
}

impl IpcKind {
    /// "message queue", "semaphore array", "shared memory segment".
    pub fn name(self) -> &'static str {
        match self {
            IpcKind::Msg => "message queue",
            IpcKind::Sem => "semaphore array",
            IpcKind::Shm => "shared memory segment",
        }
    }

    /// "msg", "sem", "shm" (the names of `/proc/sysvipc/*`, used in manifests).
    pub fn short(self) -> &'static str {
        match self {
            IpcKind::Msg => "msg",
            IpcKind::Sem => "sem",
            IpcKind::Shm => "shm",
        }
    }

    /// The kind whose [`IpcKind::short`] name is `s`.
    pub fn from_short(s: &str) -> Option<IpcKind> {
        match s {
            "msg" => Some(IpcKind::Msg),
            "sem" => Some(IpcKind::Sem),
            "shm" => Some(IpcKind::Shm),
            _ => None,
        }
    }

    /// The `ipcrm` option that removes an object of this kind by id.
    pub fn ipcrm(self) -> &'static str {
        match self {
            IpcKind::Msg => "-q",
            IpcKind::Sem => "-s",
            IpcKind::Shm => "-m",
        }
    }

    fn next_id_file(self) -> String {
        format!("/proc/sys/kernel/{}_next_id", self.short())
    }
}

/// An object named by kind and id: `m:ID` (message queue), `s:ID` (semaphore array) or `M:ID`
/// (shared memory segment) on krg's command line; `msg:`, `sem:` and `shm:` are accepted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcRef {
    /// The kind.
    pub kind: IpcKind,
    /// The id (`ipcs` shows it).
    pub id: i32,
}

impl fmt::Display for IpcRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.id)
    }
}

impl FromStr for IpcRef {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<IpcRef, String> {
        let (k, id) = s.split_once(':').ok_or_else(|| {
            format!(
                "{s:?}: write m:ID (message queue), s:ID (semaphore array) or M:ID (shared memory)"
            )
        })?;
        let kind = match k {
            "m" | "msg" => IpcKind::Msg,
            "s" | "sem" => IpcKind::Sem,
            "M" | "shm" => IpcKind::Shm,
            _ => {
                return Err(format!(
                    "{s:?}: {k:?} is no kind of System V IPC object; use m (message queue), s (semaphore array) or M (shared memory)"
                ))
            }
        };
        let id = id
            .parse::<i32>()
            .ok()
            .filter(|i| *i >= 0)
            .ok_or_else(|| format!("{s:?}: {id:?} is not an IPC id (see ipcs)"))?;
        Ok(IpcRef { kind, id })
    }
}

/// Key, id, owner and permissions of an object.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IpcPerm {
    /// The IPC key (0 is IPC_PRIVATE).
    #[prost(int32, tag = "1")]
    pub key: i32,
    /// The id, restored as it was.
    #[prost(int32, tag = "2")]
    pub id: i32,
    /// Owner uid.
    #[prost(uint32, tag = "3")]
    pub uid: u32,
    /// Owner gid.
    #[prost(uint32, tag = "4")]
    pub gid: u32,
    /// The mode as IPC_STAT gives it (permission bits and, for segments, SHM_* flags).
    #[prost(uint32, tag = "5")]
    pub mode: u32,
    /// Creator uid (informational: a restored object's creator is the restorer).
    #[prost(uint32, tag = "6")]
    pub cuid: u32,
    /// Creator gid (informational).
    #[prost(uint32, tag = "7")]
    pub cgid: u32,
}

/// One message of a queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SysvMessage {
    /// Its type (`mtype`, at least 1).
    #[prost(int64, tag = "1")]
    pub mtype: i64,
    /// Its bytes (`mtext`).
    #[prost(bytes = "vec", tag = "2")]
    pub text: Vec<u8>,
}

/// A message queue with every message, in queue order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SysvMsgQueue {
    /// Key, id, owner, mode.
    #[prost(message, optional, tag = "1")]
    pub perm: Option<IpcPerm>,
    /// The queue's capacity in bytes (`msg_qbytes`).
    #[prost(uint64, tag = "2")]
    pub qbytes: u64,
    /// The messages, first to be received first.
    #[prost(message, repeated, tag = "3")]
    pub messages: Vec<SysvMessage>,
}

/// A semaphore array with its values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SysvSemArray {
    /// Key, id, owner, mode.
    #[prost(message, optional, tag = "1")]
    pub perm: Option<IpcPerm>,
    /// The value of each semaphore (`GETALL`).
    #[prost(uint32, repeated, tag = "2")]
    pub values: Vec<u32>,
}

/// Consecutive pages of a segment that are not all zero.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShmRun {
    /// Byte offset in the segment (a multiple of the page size).
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    /// The bytes (whole pages, but the segment's last one may be cut at its size).
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

/// A shared memory segment: its size and the contents of the pages that are not zero.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SysvShmSegment {
    /// Key, id, owner, mode.
    #[prost(message, optional, tag = "1")]
    pub perm: Option<IpcPerm>,
    /// Size in bytes (`shm_segsz`).
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// Whether it was locked in memory (`SHM_LOCK`); restored so.
    #[prost(bool, tag = "3")]
    pub locked: bool,
    /// Runs of non-zero pages, in offset order; everything else is zero.
    #[prost(message, repeated, tag = "4")]
    pub runs: Vec<ShmRun>,
}

/// A snapshot of one System V IPC object.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum SysvObject {
    /// A message queue.
    #[prost(message, tag = "1")]
    Msg(SysvMsgQueue),
    /// A semaphore array.
    #[prost(message, tag = "2")]
    Sem(SysvSemArray),
    /// A shared memory segment.
    #[prost(message, tag = "3")]
    Shm(SysvShmSegment),
}

/// One object of an image (a oneof needs a message around it).
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    #[prost(oneof = "SysvObject", tags = "1, 2, 3")]
    object: Option<SysvObject>,
}

/// The payload of an image.
#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(message, repeated, tag = "1")]
    objects: Vec<Entry>,
}

impl SysvObject {
    /// Its kind.
    pub fn kind(&self) -> IpcKind {
        match self {
            SysvObject::Msg(_) => IpcKind::Msg,
            SysvObject::Sem(_) => IpcKind::Sem,
            SysvObject::Shm(_) => IpcKind::Shm,
        }
    }

    /// Key, id, owner and mode.
    pub fn perm(&self) -> IpcPerm {
        match self {
            SysvObject::Msg(q) => q.perm.clone(),
            SysvObject::Sem(s) => s.perm.clone(),
            SysvObject::Shm(m) => m.perm.clone(),
        }
        .unwrap_or_default()
    }

    /// The IPC key.
    pub fn key(&self) -> i32 {
        self.perm().key
    }

    /// The id it is restored under.
    pub fn id(&self) -> i32 {
        self.perm().id
    }

    /// Kind and id.
    pub fn ipc_ref(&self) -> IpcRef {
        IpcRef {
            kind: self.kind(),
            id: self.id(),
        }
    }

    /// "message queue 32768 (key 0x0000abcd)", for messages.
    pub fn describe(&self) -> String {
        format!("{} (key {})", self.ipc_ref(), key_text(self.key()))
    }

    /// What it holds: "3 messages, 120 bytes", "4 semaphores", "64 MiB, 5 pages stored".
    pub fn summary(&self) -> String {
        match self {
            SysvObject::Msg(q) => format!(
                "{} messages, {} bytes",
                q.messages.len(),
                q.messages.iter().map(|m| m.text.len()).sum::<usize>()
            ),
            SysvObject::Sem(s) => format!("{} semaphores", s.values.len()),
            SysvObject::Shm(m) => format!(
                "{} bytes, {} non-zero pages stored",
                m.size,
                m.runs
                    .iter()
                    .map(|r| r.data.len().div_ceil(PAGE))
                    .sum::<usize>()
            ),
        }
    }

    /// Checks what a damaged or hand-made image could get wrong.
    fn validate(&self) -> std::result::Result<(), String> {
        let what = self.describe();
        let has_perm = match self {
            SysvObject::Msg(q) => q.perm.is_some(),
            SysvObject::Sem(s) => s.perm.is_some(),
            SysvObject::Shm(m) => m.perm.is_some(),
        };
        if !has_perm || self.id() < 0 {
            return Err(format!("{what} has no valid key and id"));
        }
        match self {
            SysvObject::Msg(q) => {
                if let Some(i) = q.messages.iter().position(|m| m.mtype < 1) {
                    return Err(format!("{what}: message {i} has type < 1"));
                }
            }
            SysvObject::Sem(s) => {
                if s.values.is_empty() {
                    return Err(format!("{what} has no semaphore"));
                }
                if s.values.iter().any(|&v| v > SEMVMX) {
                    return Err(format!("{what} holds a value above {SEMVMX}"));
                }
            }
            SysvObject::Shm(m) => {
                if m.size == 0 {
                    return Err(format!("{what} has size 0"));
                }
                let mut end = 0u64;
                for r in &m.runs {
                    let stop = r.offset.checked_add(r.data.len() as u64);
                    if r.offset % PAGE as u64 != 0
                        || r.offset < end
                        || stop.is_none_or(|s| s > m.size)
                    {
                        return Err(format!(
                            "{what}: stored pages at offset {} overlap or lie outside the segment",
                            r.offset
                        ));
                    }
                    end = stop.unwrap_or(0);
                }
            }
        }
        Ok(())
    }
}

/// "0x0000abcd" (as ipcs shows keys), or "IPC_PRIVATE".
fn key_text(key: i32) -> String {
    if key == 0 {
        "IPC_PRIVATE".into()
    } else {
        format!("{:#010x}", key as u32)
    }
}

fn perm_of(p: &libc::ipc_perm, id: i32) -> IpcPerm {
    IpcPerm {
        key: p.__key,
        id,
        uid: p.uid,
        gid: p.gid,
        mode: u32::from(p.mode),
        cuid: p.cuid,
        cgid: p.cgid,
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn sys(what: &str, object: impl fmt::Display) -> IpcError {
    IpcError::Sys {
        what: what.into(),
        object: object.to_string(),
        source: errno(),
    }
}

/// An `IPC_STAT` failure, with what the errno means for a user.
fn stat_error(r: IpcRef) -> IpcError {
    let e = errno();
    let msg = match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EIDRM) => format!(
            "there is no {} with id {} (see `ipcs {}`)",
            r.kind.name(),
            r.id,
            match r.kind {
                IpcKind::Msg => "-q",
                IpcKind::Sem => "-s",
                IpcKind::Shm => "-m",
            }
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "no permission to read it (run krg as root)".to_string()
        }
        _ => format!("IPC_STAT failed: {e}"),
    };
    IpcError::Capture {
        object: r.to_string(),
        msg,
    }
}

fn msg_stat(r: IpcRef) -> Result<libc::msqid_ds> {
    // SAFETY: msqid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes a msqid_ds into `ds`.
    if unsafe { libc::msgctl(r.id, libc::IPC_STAT, &mut ds) } != 0 {
        return Err(stat_error(r));
    }
    Ok(ds)
}

fn sem_stat(r: IpcRef) -> Result<libc::semid_ds> {
    // SAFETY: semid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes a semid_ds through the pointer (the union semun's `buf`).
    if unsafe { libc::semctl(r.id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) } != 0 {
        return Err(stat_error(r));
    }
    Ok(ds)
}

fn shm_stat(r: IpcRef) -> Result<libc::shmid_ds> {
    // SAFETY: shmid_ds is plain data; all-zero is a valid value.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes a shmid_ds into `ds`.
    if unsafe { libc::shmctl(r.id, libc::IPC_STAT, &mut ds) } != 0 {
        return Err(stat_error(r));
    }
    Ok(ds)
}

/// A number from /proc/sys/kernel/NAME (its first field).
fn sysctl(name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Checks that every object exists and can be read, and that none is named twice: what
/// [`capture_all`] would refuse, without reading any contents.
pub fn check_capture(refs: &[IpcRef]) -> Result<()> {
    for (i, r) in refs.iter().enumerate() {
        if refs[..i].contains(r) {
            return Err(IpcError::Capture {
                object: r.to_string(),
                msg: "it is named twice".into(),
            });
        }
        match r.kind {
            IpcKind::Msg => msg_stat(*r).map(|_| ())?,
            IpcKind::Sem => sem_stat(*r).map(|_| ())?,
            IpcKind::Shm => {
                let ds = shm_stat(*r)?;
                if u32::from(ds.shm_perm.mode) & SHM_DEST != 0 {
                    return Err(shm_dest(*r));
                }
            }
        }
    }
    Ok(())
}

/// Captures every object of `refs` (refused if one is named twice).
pub fn capture_all(refs: &[IpcRef]) -> Result<Vec<SysvObject>> {
    check_capture(refs)?;
    refs.iter().map(|r| capture(*r)).collect()
}

/// Captures one object, leaving it as it was (see the module docs).
pub fn capture(r: IpcRef) -> Result<SysvObject> {
    match r.kind {
        IpcKind::Msg => capture_msg(r).map(SysvObject::Msg),
        IpcKind::Sem => capture_sem(r).map(SysvObject::Sem),
        IpcKind::Shm => capture_shm(r).map(SysvObject::Shm),
    }
}

fn capture_msg(r: IpcRef) -> Result<SysvMsgQueue> {
    let before = msg_stat(r)?;
    let changed = || {
        IpcError::Capture {
        object: r.to_string(),
        msg: "it changed while it was read (a process sent or received a message meanwhile): stop the processes using it (`krg freeze PID`) and checkpoint again".into(),
    }
    };
    // MSG_COPY copies at most msgmax bytes of a message.
    let max = sysctl("msgmax").unwrap_or(8192).max(1) as usize;
    // u64 words: the buffer starts with the message's `long mtype`.
    let mut buf = vec![0u64; 1 + max.div_ceil(8)];
    let mut messages = Vec::with_capacity(before.msg_qnum as usize);
    for i in 0..before.msg_qnum {
        // SAFETY: the buffer holds a long and `max` bytes after it.
        let n = unsafe {
            libc::msgrcv(
                r.id,
                buf.as_mut_ptr().cast(),
                max,
                i as libc::c_long,
                libc::MSG_COPY | libc::IPC_NOWAIT,
            )
        };
        if n < 0 {
            let e = errno();
            return Err(match e.raw_os_error() {
                Some(libc::ENOMSG) => changed(),
                Some(libc::E2BIG) | Some(libc::EINVAL) => IpcError::Capture {
                    object: r.to_string(),
                    msg: format!(
                        "message {i} is larger than kernel.msgmax ({max} bytes), the most MSG_COPY can read: raise it (sysctl kernel.msgmax=N) and checkpoint again"
                    ),
                },
                Some(libc::ENOSYS) => IpcError::Capture {
                    object: r.to_string(),
                    msg: "this kernel cannot copy messages (MSG_COPY needs CONFIG_CHECKPOINT_RESTORE)".into(),
                },
                _ => IpcError::Sys {
                    what: format!("msgrcv(MSG_COPY) of message {i}"),
                    object: r.to_string(),
                    source: e,
                },
            });
        }
        let n = n as usize;
        let bytes: &[u8] =
            // SAFETY: the kernel wrote the long and `n` bytes after it; u64s are plain bytes.
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), 8 + n) };
        let mut t = [0u8; 8];
        t.copy_from_slice(&bytes[..8]);
        messages.push(SysvMessage {
            mtype: i64::from_ne_bytes(t),
            text: bytes[8..].to_vec(),
        });
    }
    let after = msg_stat(r)?;
    let total: u64 = messages.iter().map(|m| m.text.len() as u64).sum();
    if after.msg_qnum != before.msg_qnum
        || after.__msg_cbytes != before.__msg_cbytes
        || after.msg_stime != before.msg_stime
        || after.msg_rtime != before.msg_rtime
        || total != before.__msg_cbytes
    {
        return Err(changed());
    }
    Ok(SysvMsgQueue {
        perm: Some(perm_of(&before.msg_perm, r.id)),
        qbytes: before.msg_qbytes,
        messages,
    })
}

fn capture_sem(r: IpcRef) -> Result<SysvSemArray> {
    let ds = sem_stat(r)?;
    let mut values = vec![0u16; ds.sem_nsems as usize];
    // SAFETY: GETALL writes sem_nsems unsigned shorts through the pointer (semun's `array`).
    if unsafe { libc::semctl(r.id, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
        return Err(sys("semctl(GETALL)", r));
    }
    // The array may have been removed and its id reused meanwhile: the stat must match.
    let again = sem_stat(r)?;
    if again.sem_ctime != ds.sem_ctime || again.sem_nsems != ds.sem_nsems {
        return Err(IpcError::Capture {
            object: r.to_string(),
            msg: "it was changed (IPC_SET, SETALL or removed) while it was read; checkpoint again"
                .into(),
        });
    }
    Ok(SysvSemArray {
        perm: Some(perm_of(&ds.sem_perm, r.id)),
        values: values.into_iter().map(u32::from).collect(),
    })
}

fn shm_dest(r: IpcRef) -> IpcError {
    IpcError::Capture {
        object: r.to_string(),
        msg: "it was removed (IPC_RMID) and only lives until its last process detaches it; nothing could restore it".into(),
    }
}

/// An attachment of a segment, detached on drop.
struct Attached {
    addr: *mut u8,
}

impl Attached {
    fn new(r: IpcRef, flags: i32) -> Result<Attached> {
        // SAFETY: shmat at an address of the kernel's choice.
        let addr = unsafe { libc::shmat(r.id, std::ptr::null(), flags) };
        if addr as isize == -1 {
            return Err(sys("shmat", r));
        }
        Ok(Attached { addr: addr.cast() })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: detaching our own attachment; nothing refers to it any more.
        unsafe { libc::shmdt(self.addr.cast()) };
    }
}

/// One of /proc/sysvipc/{msg,sem,shm}: a header line of column names, then one line of
/// values per object.
pub struct ProcTable {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl ProcTable {
    /// Reads `/proc/sysvipc/KIND` ("msg", "sem" or "shm").
    pub fn read(kind: &str) -> io::Result<ProcTable> {
        let text = fs::read_to_string(format!("/proc/sysvipc/{kind}"))?;
        let mut lines = text.lines();
        let split = |l: &str| l.split_whitespace().map(str::to_string).collect();
        let columns = lines.next().map(split).unwrap_or_default();
        Ok(ProcTable {
            columns,
            rows: lines.map(split).collect(),
        })
    }

    /// The index of the first column named one of `names`.
    pub fn column(&self, names: &[&str]) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| names.contains(&c.as_str()))
    }

    /// Column `col` of every row, parsed (None where it is missing or does not parse).
    pub fn values<T: FromStr>(&self, col: usize) -> impl Iterator<Item = Option<T>> + '_ {
        self.rows
            .iter()
            .map(move |r| r.get(col).and_then(|v| v.parse().ok()))
    }

    /// Column `col` of the row whose column `key_col` is `key`.
    pub fn lookup<T: FromStr>(&self, key_col: usize, key: i32, col: usize) -> Option<T> {
        self.rows
            .iter()
            .find(|r| r.get(key_col).and_then(|v| v.parse::<i32>().ok()) == Some(key))?
            .get(col)?
            .parse()
            .ok()
    }
}

/// Bytes of segment `id` in swap, from /proc/sysvipc/shm (None if it cannot be told).
fn shm_swapped(id: i32) -> Option<u64> {
    let t = ProcTable::read("shm").ok()?;
    t.lookup(t.column(&["shmid"])?, id, t.column(&["swap"])?)
}

fn capture_shm(r: IpcRef) -> Result<SysvShmSegment> {
    let ds = shm_stat(r)?;
    let mode = u32::from(ds.shm_perm.mode);
    if mode & SHM_DEST != 0 {
        return Err(shm_dest(r));
    }
    let size = ds.shm_segsz;
    let npages = size.div_ceil(PAGE);
    let at = Attached::new(r, libc::SHM_RDONLY)?;
    // Pages never touched are not in memory: reading them would allocate them. A page in swap
    // is not "in memory" either, so a segment with pages in swap is read whole.
    let whole = shm_swapped(r.id).is_none_or(|s| s > 0);
    let mut resident = vec![1u8; npages];
    if !whole {
        // SAFETY: the attachment covers npages pages; the vector has one byte per page.
        if unsafe { libc::mincore(at.addr.cast(), npages * PAGE, resident.as_mut_ptr()) } != 0 {
            return Err(sys("mincore", r));
        }
    }
    let mut runs: Vec<ShmRun> = Vec::new();
    for (p, res) in resident.iter().enumerate() {
        if res & 1 == 0 {
            continue;
        }
        let off = p * PAGE;
        let len = PAGE.min(size - off);
        // SAFETY: within the read-only attachment, which lives until `at` is dropped.
        let page = unsafe { std::slice::from_raw_parts(at.addr.add(off), len) };
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.offset as usize + last.data.len() == off => {
                last.data.extend_from_slice(page)
            }
            _ => runs.push(ShmRun {
                offset: off as u64,
                data: page.to_vec(),
            }),
        }
    }
    drop(at);
    Ok(SysvShmSegment {
        perm: Some(perm_of(&ds.shm_perm, r.id)),
        size: size as u64,
        locked: mode & SHM_LOCKED != 0,
        runs,
    })
}

/// Keys and ids of the objects of one kind that exist now (from /proc/sysvipc).
fn existing(kind: IpcKind) -> Result<Vec<(i32, i32)>> {
    let path = format!("/proc/sysvipc/{}", kind.short());
    let t = ProcTable::read(kind.short()).map_err(|source| IpcError::Io {
        what: "reading".into(),
        path: path.clone(),
        source,
    })?;
    let (Some(key_col), Some(id_col)) =
        (t.column(&["key"]), t.column(&["msqid", "semid", "shmid"]))
    else {
        return Err(IpcError::Io {
            what: "reading".into(),
            path,
            source: io::Error::other("unexpected header (no key or id column)"),
        });
    };
    Ok(t.values::<i32>(key_col)
        .zip(t.values::<i32>(id_col))
        .filter_map(|(k, i)| Some((k?, i?)))
        .collect())
}

/// What would make a restore of `objs` fail, each with what to do; empty if it can go ahead.
fn restore_problems(objs: &[SysvObject]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for o in objs {
        if let Err(e) = o.validate() {
            problems.push(e);
        }
    }
    let mut kinds: Vec<IpcKind> = objs.iter().map(|o| o.kind()).collect();
    kinds.sort();
    kinds.dedup();
    for &kind in &kinds {
        let file = kind.next_id_file();
        if let Err(e) = fs::OpenOptions::new().write(true).open(&file) {
            problems.push(format!(
                "cannot open {file} to give a {} its old id ({e}): restoring needs root and a kernel with CONFIG_CHECKPOINT_RESTORE",
                kind.name()
            ));
        }
        let now = existing(kind)?;
        let mine: Vec<&SysvObject> = objs.iter().filter(|o| o.kind() == kind).collect();
        for (i, o) in mine.iter().enumerate() {
            let (key, id) = (o.key(), o.id());
            let what = o.describe();
            if mine[..i]
                .iter()
                .any(|p| p.id() & SLOT_MASK == id & SLOT_MASK)
            {
                problems.push(format!(
                    "{what}: the image holds another {} with the same id slot",
                    kind.name()
                ));
            }
            if key != 0 && mine[..i].iter().any(|p| p.key() == key) {
                problems.push(format!(
                    "{what}: the image holds another {} with the same key",
                    kind.name()
                ));
            }
            for &(k, other) in &now {
                if other == id {
                    problems.push(format!(
                        "{what}: id {id} is taken by the {} with key {}; remove it (ipcrm {} {id}) or restart elsewhere",
                        kind.name(),
                        key_text(k),
                        kind.ipcrm()
                    ));
                } else if other & SLOT_MASK == id & SLOT_MASK {
                    problems.push(format!(
                        "{what}: id {id} cannot be taken back, its slot is held by the {} {other} (key {}); remove it (ipcrm {} {other}) or restart elsewhere",
                        kind.name(),
                        key_text(k),
                        kind.ipcrm()
                    ));
                } else if key != 0 && k == key {
                    problems.push(format!(
                        "{what}: key {} is taken by the {} {other}; remove it (ipcrm {} {other}) or restart elsewhere",
                        key_text(key),
                        kind.name(),
                        kind.ipcrm()
                    ));
                }
            }
        }
    }
    let msgmax = sysctl("msgmax");
    let semmsl = fs::read_to_string("/proc/sys/kernel/sem")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
    let shmmax = sysctl("shmmax");
    let msgmnb = sysctl("msgmnb");
    let sys_resource = has_capability(CAP_SYS_RESOURCE);
    for o in objs {
        let what = o.describe();
        match o {
            SysvObject::Msg(q) => {
                let big = q.messages.iter().map(|m| m.text.len() as u64).max();
                if let (Some(big), Some(max)) = (big, msgmax) {
                    if big > max {
                        problems.push(format!("{what}: a message of {big} bytes is above this host's kernel.msgmax ({max}); raise it (sysctl kernel.msgmax={big})"));
                    }
                }
                let need = queue_room(q);
                if let Some(mnb) = msgmnb {
                    if need > mnb && !sys_resource {
                        problems.push(format!("{what}: msg_qbytes {need} is above this host's kernel.msgmnb ({mnb}), which only CAP_SYS_RESOURCE may exceed; raise it (sysctl kernel.msgmnb={need})"));
                    }
                }
            }
            SysvObject::Sem(s) => {
                if let Some(max) = semmsl {
                    if s.values.len() as u64 > max {
                        problems.push(format!("{what}: {} semaphores are above this host's SEMMSL ({max}, the first field of kernel.sem); raise it", s.values.len()));
                    }
                }
            }
            SysvObject::Shm(m) => {
                if let Some(max) = shmmax {
                    if m.size > max {
                        problems.push(format!("{what}: {} bytes are above this host's kernel.shmmax ({max}); raise it (sysctl kernel.shmmax={})", m.size, m.size));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// The capacity a restored queue needs while its messages are sent: its own, or more for a
/// queue whose msg_qbytes was lowered below what it holds.
fn queue_room(q: &SysvMsgQueue) -> u64 {
    let total: u64 = q.messages.iter().map(|m| m.text.len() as u64).sum();
    q.qbytes.max(total).max(q.messages.len() as u64)
}

/// Whether this process has capability `cap` in effect (/proc/self/status CapEff).
fn has_capability(cap: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|eff| eff >> cap & 1 == 1)
}

/// Refuses (with [`IpcError::Refused`], nothing created) what [`restore`] could not do.
pub fn check_restore(objs: &[SysvObject]) -> Result<()> {
    let problems = restore_problems(objs)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(IpcError::Refused { problems })
    }
}

/// Serializes restores on this host: the next id is one value per IPC namespace.
struct NextIdLock {
    _file: fs::File,
}

impl NextIdLock {
    fn take() -> Result<NextIdLock> {
        let path = IpcKind::Msg.next_id_file();
        let f = fs::File::open(&path).map_err(|source| IpcError::Io {
            what: "opening".into(),
            path,
            source,
        })?;
        // SAFETY: flock on a descriptor we own; it goes with the file.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        Ok(NextIdLock { _file: f })
    }
}

fn set_next_id(kind: IpcKind, id: i32) -> io::Result<()> {
    fs::write(kind.next_id_file(), format!("{id}\n"))
}

/// Creates an object with `create` so that it gets `id`, and records it in `made`; the object
/// is removed again if the kernel gave it another one.
fn create_with_id(
    o: &SysvObject,
    made: &mut Vec<IpcRef>,
    create: impl FnOnce() -> libc::c_int,
) -> std::result::Result<i32, String> {
    let (kind, id) = (o.kind(), o.id());
    set_next_id(kind, id).map_err(|e| format!("writing {id} to {}: {e}", kind.next_id_file()))?;
    let got = create();
    if got < 0 {
        let e = errno();
        // The kernel takes the next id only when it creates an object: it must not be left
        // for an unrelated one.
        let _ = set_next_id(kind, -1);
        let hint = match e.raw_os_error() {
            Some(libc::EEXIST) => " (an object with its key was created meanwhile)",
            Some(libc::ENOSPC) => " (the host's limit of such objects is reached)",
            _ => "",
        };
        return Err(format!("create: {e}{hint}"));
    }
    if got != id {
        let _ = remove(IpcRef { kind, id: got });
        return Err(format!(
            "the kernel gave it id {got} (another object took id {id} meanwhile?); try again"
        ));
    }
    made.push(IpcRef { kind, id });
    Ok(got)
}

/// Sets uid, gid and the permission bits of `perm` (the kernel keeps the other mode bits).
fn set_owner(p: &mut libc::ipc_perm, want: &IpcPerm) {
    p.uid = want.uid;
    p.gid = want.gid;
    p.mode = (want.mode & 0o777) as libc::c_ushort;
}

fn restore_msg(
    o: &SysvObject,
    made: &mut Vec<IpcRef>,
    q: &SysvMsgQueue,
) -> std::result::Result<(), String> {
    let perm = q.perm.clone().unwrap_or_default();
    let mode = (perm.mode & 0o777) as i32;
    // SAFETY: plain msgget.
    let id = create_with_id(o, made, || unsafe {
        libc::msgget(perm.key, libc::IPC_CREAT | libc::IPC_EXCL | mode)
    })?;
    let r = IpcRef {
        kind: IpcKind::Msg,
        id,
    };
    let set = |ds: &mut libc::msqid_ds| {
        // SAFETY: IPC_SET reads a msqid_ds.
        if unsafe { libc::msgctl(id, libc::IPC_SET, ds) } != 0 {
            return Err(format!("IPC_SET: {}", errno()));
        }
        Ok(())
    };
    // Room for every message while they are sent; the recorded capacity is set at the end.
    let mut ds = msg_stat(r).map_err(|e| e.to_string())?;
    ds.msg_qbytes = queue_room(q).max(1);
    set(&mut ds)?;
    let mut buf: Vec<u64> = Vec::new();
    for (i, m) in q.messages.iter().enumerate() {
        buf.clear();
        buf.resize(1 + m.text.len().div_ceil(8), 0);
        // SAFETY: the buffer holds 8 + text bytes; u64s are plain bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), 8 + m.text.len())
        };
        bytes[..8].copy_from_slice(&m.mtype.to_ne_bytes());
        bytes[8..].copy_from_slice(&m.text);
        // SAFETY: msgsnd reads the long and text bytes of the buffer.
        let rc = unsafe { libc::msgsnd(id, buf.as_ptr().cast(), m.text.len(), libc::IPC_NOWAIT) };
        if rc != 0 {
            return Err(format!("msgsnd of message {i}: {}", errno()));
        }
    }
    let mut ds = msg_stat(r).map_err(|e| e.to_string())?;
    set_owner(&mut ds.msg_perm, &perm);
    ds.msg_qbytes = q.qbytes;
    set(&mut ds)
}

fn restore_sem(
    o: &SysvObject,
    made: &mut Vec<IpcRef>,
    s: &SysvSemArray,
) -> std::result::Result<(), String> {
    let perm = s.perm.clone().unwrap_or_default();
    let mode = (perm.mode & 0o777) as i32;
    // SAFETY: plain semget.
    let id = create_with_id(o, made, || unsafe {
        libc::semget(
            perm.key,
            s.values.len() as i32,
            libc::IPC_CREAT | libc::IPC_EXCL | mode,
        )
    })?;
    let mut values: Vec<u16> = s.values.iter().map(|&v| v as u16).collect();
    // SAFETY: SETALL reads nsems unsigned shorts through the pointer.
    if unsafe { libc::semctl(id, 0, libc::SETALL, values.as_mut_ptr()) } != 0 {
        return Err(format!("semctl(SETALL): {}", errno()));
    }
    let mut ds = sem_stat(IpcRef {
        kind: IpcKind::Sem,
        id,
    })
    .map_err(|e| e.to_string())?;
    set_owner(&mut ds.sem_perm, &perm);
    // SAFETY: IPC_SET reads a semid_ds through the pointer.
    if unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) } != 0 {
        return Err(format!("IPC_SET: {}", errno()));
    }
    Ok(())
}

fn restore_shm(
    o: &SysvObject,
    made: &mut Vec<IpcRef>,
    m: &SysvShmSegment,
) -> std::result::Result<(), String> {
    let perm = m.perm.clone().unwrap_or_default();
    let mode = (perm.mode & 0o777) as i32;
    // SAFETY: plain shmget.
    let id = create_with_id(o, made, || unsafe {
        libc::shmget(
            perm.key,
            m.size as usize,
            libc::IPC_CREAT | libc::IPC_EXCL | mode,
        )
    })?;
    let r = IpcRef {
        kind: IpcKind::Shm,
        id,
    };
    {
        let at = Attached::new(r, 0).map_err(|e| e.to_string())?;
        for run in &m.runs {
            // SAFETY: validate() checked that every run lies within the segment.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    run.data.as_ptr(),
                    at.addr.add(run.offset as usize),
                    run.data.len(),
                )
            };
        }
    }
    let mut ds = shm_stat(r).map_err(|e| e.to_string())?;
    set_owner(&mut ds.shm_perm, &perm);
    // SAFETY: IPC_SET reads a shmid_ds.
    if unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) } != 0 {
        return Err(format!("IPC_SET: {}", errno()));
    }
    // SAFETY: SHM_LOCK takes no buffer.
    if m.locked && unsafe { libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) } != 0 {
        return Err(format!("SHM_LOCK: {}", errno()));
    }
    Ok(())
}

/// Creates every object of `objs` under its key and id, with its owner, mode and contents.
/// Refused with nothing created as [`check_restore`] says; if creating or filling one fails,
/// the ones created before are removed. Returns the objects created, in order.
pub fn restore(objs: &[SysvObject]) -> Result<Vec<IpcRef>> {
    if objs.is_empty() {
        return Ok(Vec::new());
    }
    let _lock = NextIdLock::take()?;
    check_restore(objs)?;
    let mut made: Vec<IpcRef> = Vec::new();
    for o in objs {
        // An object is in `made` from its creation on, even if it could not be filled.
        let res = match o {
            SysvObject::Msg(q) => restore_msg(o, &mut made, q),
            SysvObject::Sem(s) => restore_sem(o, &mut made, s),
            SysvObject::Shm(m) => restore_shm(o, &mut made, m),
        };
        if let Err(msg) = res {
            remove_all(&made);
            return Err(IpcError::Restore {
                object: o.describe(),
                msg,
            });
        }
    }
    Ok(made)
}

/// Removes an object (`IPC_RMID`).
pub fn remove(r: IpcRef) -> Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    let rc = unsafe {
        match r.kind {
            IpcKind::Msg => libc::msgctl(r.id, libc::IPC_RMID, std::ptr::null_mut()),
            IpcKind::Sem => libc::semctl(r.id, 0, libc::IPC_RMID),
            IpcKind::Shm => libc::shmctl(r.id, libc::IPC_RMID, std::ptr::null_mut()),
        }
    };
    if rc != 0 {
        return Err(sys("IPC_RMID", r));
    }
    Ok(())
}

/// Removes every object of `refs`, best effort (undoing a restore).
pub fn remove_all(refs: &[IpcRef]) {
    for r in refs {
        let _ = remove(*r);
    }
}

/// The bytes of an image holding `objs`.
pub fn encode_image(objs: &[SysvObject]) -> Vec<u8> {
    let payload = prost::Message::encode_to_vec(&Payload {
        objects: objs
            .iter()
            .map(|o| Entry {
                object: Some(o.clone()),
            })
            .collect(),
    });
    let mut out = Vec::with_capacity(FRAME_LEN + payload.len());
    out.extend_from_slice(IMAGE_MAGIC);
    out.extend_from_slice(&IMAGE_FORMAT.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes and checks an image; `origin` names it in errors. Every object is checked too, so a
/// restore of what this returns never fails on the image's account half-way.
pub fn decode_image(bytes: &[u8], origin: &str) -> Result<Vec<SysvObject>> {
    let damaged = |msg: String| IpcError::Damaged {
        origin: origin.to_string(),
        msg,
    };
    if bytes.len() < FRAME_LEN || &bytes[..8] != IMAGE_MAGIC {
        return Err(damaged(format!(
            "{} bytes without the System V IPC image header (not written by `krg ipc checkpoint`, or truncated)",
            bytes.len()
        )));
    }
    let word = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(b)
    };
    let format = word(8);
    if format > IMAGE_FORMAT {
        return Err(damaged(format!(
            "format version {format} is newer than this krg understands ({IMAGE_FORMAT}); use a newer krg"
        )));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(l);
    let payload = &bytes[FRAME_LEN..];
    if len != payload.len() as u64 {
        return Err(damaged(format!(
            "announces {len} payload bytes, holds {} (truncated?)",
            payload.len()
        )));
    }
    if blake3::hash(payload).as_bytes() != &bytes[24..56] {
        return Err(damaged(
            "checksum mismatch (the file was altered or corrupted)".into(),
        ));
    }
    let p: Payload =
        prost::Message::decode(payload).map_err(|e| damaged(format!("does not decode: {e}")))?;
    let mut out = Vec::with_capacity(p.objects.len());
    for (i, e) in p.objects.into_iter().enumerate() {
        let o = e.object.ok_or_else(|| {
            damaged(format!(
                "object {i} is of a kind this krg does not know (written by a newer krg?)"
            ))
        })?;
        o.validate().map_err(damaged)?;
        out.push(o);
    }
    Ok(out)
}

/// Writes an image of `objs` to `path` (a temporary file renamed over it once on disk).
/// Returns its size.
pub fn write_image_file(path: &Path, objs: &[SysvObject]) -> Result<u64> {
    let bytes = encode_image(objs);
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |what: &str, source: io::Error| IpcError::Io {
        what: what.into(),
        path: shown.clone(),
        source,
    };
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io(
            "writing the image (check the directory exists and is writable)",
            e,
        ));
    }
    Ok(bytes.len() as u64)
}

/// Reads and checks the image in `path`.
pub fn read_image_file(path: &Path) -> Result<Vec<SysvObject>> {
    let bytes = fs::read(path).map_err(|source| IpcError::Io {
        what: "reading the image".into(),
        path: path.display().to_string(),
        source,
    })?;
    decode_image(&bytes, &format!("file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<SysvObject> {
        let perm = |id| {
            Some(IpcPerm {
                key: 0x1234,
                id,
                uid: 65534,
                gid: 65534,
                mode: 0o640,
                ..Default::default()
            })
        };
        vec![
            SysvObject::Msg(SysvMsgQueue {
                perm: perm(32768),
                qbytes: 16384,
                messages: vec![
                    SysvMessage {
                        mtype: 3,
                        text: b"abc".to_vec(),
                    },
                    SysvMessage {
                        mtype: 1,
                        text: Vec::new(),
                    },
                ],
            }),
            SysvObject::Sem(SysvSemArray {
                perm: perm(5),
                values: vec![0, 7, 32767],
            }),
            SysvObject::Shm(SysvShmSegment {
                perm: perm(98305),
                size: 3 * 4096 + 10,
                locked: false,
                runs: vec![ShmRun {
                    offset: 3 * 4096,
                    data: vec![9; 10],
                }],
            }),
        ]
    }

    #[test]
    fn image_round_trip() {
        let objs = sample();
        let bytes = encode_image(&objs);
        assert_eq!(decode_image(&bytes, "t").unwrap(), objs);
        assert_eq!(decode_image(&encode_image(&[]), "t").unwrap(), vec![]);
    }

    #[test]
    fn damaged_images_are_refused() {
        let bytes = encode_image(&sample());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let e = decode_image(&flipped, "t").unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let e = decode_image(&bytes[..bytes.len() - 5], "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(decode_image(b"KRGGHOST", "t").is_err());
        let mut newer = bytes.clone();
        newer[8] = 99;
        let e = decode_image(&newer, "t").unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn bad_contents_are_refused_even_with_a_good_checksum() {
        let mut objs = sample();
        if let SysvObject::Shm(m) = &mut objs[2] {
            m.runs[0].data = vec![1; 11];
        }
        let e = decode_image(&encode_image(&objs), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the segment"), "{e}");
        let mut objs = sample();
        if let SysvObject::Msg(q) = &mut objs[0] {
            q.messages[0].mtype = 0;
        }
        assert!(decode_image(&encode_image(&objs), "t").is_err());
    }

    #[test]
    fn refs_parse() {
        assert_eq!(
            "m:5".parse::<IpcRef>(),
            Ok(IpcRef {
                kind: IpcKind::Msg,
                id: 5
            })
        );
        assert_eq!("M:0".parse::<IpcRef>().unwrap().kind, IpcKind::Shm);
        assert_eq!("sem:7".parse::<IpcRef>().unwrap().kind, IpcKind::Sem);
        assert!("q:1".parse::<IpcRef>().is_err());
        assert!("m:-1".parse::<IpcRef>().is_err());
        assert!("m".parse::<IpcRef>().is_err());
    }
}
