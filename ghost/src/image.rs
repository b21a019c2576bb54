//! The ghost image format: a fixed header, prost metadata, page data and a checksummed trailer.
//!
//! ```text
//! header  (32 B)  magic "KRGGHOST" | format version u32 | header size u32 | meta len u64 | pages len u64
//! meta            ProcessImage (prost)
//! pages           contents of the stored pages, in the order of Mapping.runs, then, in fd
//!                 order, what fds carry (Fd::stored_bytes: a deleted-but-open file, the
//!                 bytes buffered in a pipe, the messages queued in a socketpair end),
//!                 each padded to whole pages
//! trailer (40 B)  blake3(header ‖ meta ‖ pages) | end magic "KRGGEND\0"
//! ```
//!
//! The checksum sits at the end so an export can stream without knowing it up front; an import
//! therefore reads the whole image and checks it before anything is created. All integers are
//! little endian. When the writer took unchanged pages from the previous image instead of the
//! stream (write tracking, [`crate::GhostWriter::reuse_pages`]), the checksum covers only what
//! was streamed; the source that re-assembles the image checks its contents instead
//! ([`crate::GhostReader::checks_content`]).

use crate::error::{GhostError, Result};
use crate::rao::{read_full, rio, wio, GhostReader, GhostWriter};

/// First bytes of every ghost image.
pub const MAGIC: &[u8; 8] = b"KRGGHOST";
/// Last bytes of every ghost image.
pub const END_MAGIC: &[u8; 8] = b"KRGGEND\0";
/// Format version written by this crate; images with a higher version are refused.
/// Version 2 records how every fd is restored ([`Fd::restore`]); version 1 images are still
/// read, their fds taken the way version 1 restored them ([`Fd::restore_method`]). The event
/// and timer fd methods ([`FdRestore::EventFd`] and on, the socket ones included) and their
/// state fields were added within version 2: a reader that predates them refuses such an fd
/// as an unknown restore method (asking for a newer krg) rather than misreading it (one that
/// predates the socket methods refuses an image with socketpair queues even earlier, as
/// damaged: it cannot account for their bytes), and images without them read as before. Version 3 adds the threads other than the main one ([`ProcessImage::threads`])
/// and every thread's clear_child_tid: a version 2 reader would silently restore only the
/// main thread, so it must refuse such an image; images of versions 1 and 2 have no other
/// threads and restore as before.
pub const FORMAT_VERSION: u32 = 3;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Size of the trailer.
pub const TRAILER_LEN: usize = 40;
/// Refuse metadata larger than this: no real process needs it and a damaged length must not
/// make us allocate gigabytes.
const MAX_META: u64 = 256 << 20;

/// Everything about the process except page contents.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessImage {
    /// What the restoring host must offer.
    #[prost(message, optional, tag = "1")]
    pub requirements: Option<Requirements>,
    /// PID in the process's own (innermost) PID namespace: the one to take back.
    #[prost(int32, tag = "2")]
    pub pid: i32,
    /// PID as seen by the exporter, for messages.
    #[prost(int32, tag = "3")]
    pub host_pid: i32,
    /// Command name (/proc/PID/comm).
    #[prost(string, tag = "4")]
    pub comm: String,
    /// Executable path (/proc/PID/exe).
    #[prost(string, tag = "5")]
    pub exe: String,
    /// `struct user_regs_struct` as returned by PTRACE_GETREGS (27 u64).
    #[prost(bytes = "vec", tag = "6")]
    pub regs: Vec<u8>,
    /// The XSAVE area from PTRACE_GETREGSET NT_X86_XSTATE (FPU, SSE, AVX, AVX-512...).
    #[prost(bytes = "vec", tag = "7")]
    pub xstate: Vec<u8>,
    /// Every mapping of the address space, in address order.
    #[prost(message, repeated, tag = "8")]
    pub mappings: Vec<Mapping>,
    /// brk and the other fields of the mm, restored with PR_SET_MM_MAP.
    #[prost(message, optional, tag = "9")]
    pub mm: Option<MmFields>,
    /// Raw /proc/PID/auxv.
    #[prost(bytes = "vec", tag = "10")]
    pub auxv: Vec<u8>,
    /// The registered rseq area, if any.
    #[prost(message, optional, tag = "11")]
    pub rseq: Option<Rseq>,
    /// Open file descriptors.
    #[prost(message, repeated, tag = "12")]
    pub fds: Vec<Fd>,
    /// Working directory.
    #[prost(string, tag = "13")]
    pub cwd: String,
    /// File creation mask.
    #[prost(uint32, tag = "14")]
    pub umask: u32,
    /// Resource limits.
    #[prost(message, repeated, tag = "15")]
    pub rlimits: Vec<Rlimit>,
    /// Signal dispositions that are not SIG_DFL.
    #[prost(message, repeated, tag = "16")]
    pub sigactions: Vec<SigAction>,
    /// Blocked signal mask.
    #[prost(uint64, tag = "17")]
    pub sigmask: u64,
    /// Pending signals with their siginfo.
    #[prost(message, repeated, tag = "18")]
    pub pending: Vec<PendingSignal>,
    /// Alternate signal stack.
    #[prost(message, optional, tag = "19")]
    pub sigaltstack: Option<AltStack>,
    /// Session id in the process's PID namespace.
    #[prost(int32, tag = "20")]
    pub sid: i32,
    /// Process group id in the process's PID namespace.
    #[prost(int32, tag = "21")]
    pub pgid: i32,
    /// personality(2) flags.
    #[prost(uint32, tag = "22")]
    pub personality: u32,
    /// set_robust_list head and length.
    #[prost(uint64, tag = "23")]
    pub robust_head: u64,
    /// Length passed to set_robust_list.
    #[prost(uint64, tag = "24")]
    pub robust_len: u64,
    /// Total bytes of page data following the metadata.
    #[prost(uint64, tag = "25")]
    pub page_bytes: u64,
    /// When the image was taken (ms since the epoch).
    #[prost(uint64, tag = "26")]
    pub created_unix_ms: u64,
    /// The threads other than the main one (whose state is the fields above), in TID order
    /// (format 3).
    #[prost(message, repeated, tag = "27")]
    pub threads: Vec<ThreadImage>,
    /// The main thread's clear_child_tid (set_tid_address), 0 if none or not obtainable
    /// (format 3).
    #[prost(uint64, tag = "28")]
    pub clear_child_tid: u64,
}

/// One thread other than the main one: what the kernel keeps per thread. Memory, fds and
/// signal dispositions are the process's and live in [`ProcessImage`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ThreadImage {
    /// TID in the process's own (innermost) PID namespace: the one to take back (glibc caches
    /// it in the thread's descriptor).
    #[prost(int32, tag = "1")]
    pub tid: i32,
    /// TID as seen by the exporter, for messages.
    #[prost(int32, tag = "2")]
    pub host_tid: i32,
    /// Thread name (/proc/PID/task/TID/comm).
    #[prost(string, tag = "3")]
    pub comm: String,
    /// `struct user_regs_struct` (PTRACE_GETREGS), fs_base/gs_base (TLS) included.
    #[prost(bytes = "vec", tag = "4")]
    pub regs: Vec<u8>,
    /// XSAVE area (NT_X86_XSTATE).
    #[prost(bytes = "vec", tag = "5")]
    pub xstate: Vec<u8>,
    /// Blocked signals.
    #[prost(uint64, tag = "6")]
    pub sigmask: u64,
    /// Signals pending on this thread only (the shared queue is the process's).
    #[prost(message, repeated, tag = "7")]
    pub pending: Vec<PendingSignal>,
    /// Its rseq registration.
    #[prost(message, optional, tag = "8")]
    pub rseq: Option<Rseq>,
    /// get_robust_list head (0: none).
    #[prost(uint64, tag = "9")]
    pub robust_head: u64,
    /// get_robust_list length.
    #[prost(uint64, tag = "10")]
    pub robust_len: u64,
    /// Its alternate signal stack.
    #[prost(message, optional, tag = "11")]
    pub sigaltstack: Option<AltStack>,
    /// Address the kernel clears and futex-wakes when the thread exits (what pthread_join
    /// waits on), from PR_GET_TID_ADDRESS; 0 if none.
    #[prost(uint64, tag = "12")]
    pub clear_child_tid: u64,
}

/// Host properties the image depends on, checked before anything is created.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Requirements {
    /// Machine architecture ("x86_64").
    #[prost(string, tag = "1")]
    pub arch: String,
    /// uname release of the exporting kernel (informational).
    #[prost(string, tag = "2")]
    pub kernel_release: String,
    /// XSAVE feature mask (XCR0) of the exporting host; the importer must offer all of them.
    #[prost(uint64, tag = "3")]
    pub xfeatures: u64,
    /// Size of the XSAVE area; must match.
    #[prost(uint32, tag = "4")]
    pub xstate_size: u32,
    /// Instruction-set flags from /proc/cpuinfo that programs pick code paths by.
    #[prost(string, repeated, tag = "5")]
    pub cpu_flags: Vec<String>,
    /// vvar / vvar_vclock / vdso sizes in address order (name, size).
    #[prost(message, repeated, tag = "6")]
    pub vdso_parts: Vec<VdsoPart>,
    /// blake3 of the vDSO text: code may hold return addresses into it.
    #[prost(bytes = "vec", tag = "7")]
    pub vdso_hash: Vec<u8>,
}

/// One of the kernel's special mappings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VdsoPart {
    /// "[vvar]", "[vvar_vclock]" or "[vdso]".
    #[prost(string, tag = "1")]
    pub name: String,
    /// Size in bytes.
    #[prost(uint64, tag = "2")]
    pub size: u64,
}

/// How a mapping is rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum MapKind {
    /// Private anonymous memory (heap, stack, malloc arenas): stored pages.
    Anon = 0,
    /// A file mapped privately: remapped from the file, plus the pages the process changed.
    FilePrivate = 1,
    /// A file mapped shared: remapped, contents live in the file.
    FileShared = 2,
    /// Shared anonymous memory (or a deleted shmem file): recreated, every present page stored.
    ShmemAnon = 3,
    /// vvar / vvar_vclock / vdso: moved, never stored.
    Vdso = 4,
}

/// One line of /proc/PID/maps.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    /// First address.
    #[prost(uint64, tag = "1")]
    pub start: u64,
    /// End (exclusive).
    #[prost(uint64, tag = "2")]
    pub end: u64,
    /// PROT_* bits.
    #[prost(uint32, tag = "3")]
    pub prot: u32,
    /// How to rebuild it.
    #[prost(enumeration = "MapKind", tag = "4")]
    pub kind: i32,
    /// Path of the mapped file, or the pseudo name ("[heap]", "[stack]"...).
    #[prost(string, tag = "5")]
    pub path: String,
    /// File offset.
    #[prost(uint64, tag = "6")]
    pub offset: u64,
    /// Identity of the mapped file, checked at import.
    #[prost(message, optional, tag = "7")]
    pub file: Option<FileId>,
    /// Runs of stored pages; their contents follow in the page data, in this order.
    #[prost(message, repeated, tag = "8")]
    pub runs: Vec<PageRun>,
    /// The mapping grows down (stack).
    #[prost(bool, tag = "9")]
    pub growsdown: bool,
}

/// Identity of a file a mapping needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileId {
    /// st_dev.
    #[prost(uint64, tag = "1")]
    pub dev: u64,
    /// st_ino.
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    /// st_size.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// st_mtime in ns.
    #[prost(int64, tag = "4")]
    pub mtime_ns: i64,
    /// blake3 of the whole file when it is small enough to hash at export (lets a copy of
    /// the same file on another node pass).
    #[prost(bytes = "vec", tag = "5")]
    pub hash: Vec<u8>,
}

/// Consecutive stored pages.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PageRun {
    /// First address.
    #[prost(uint64, tag = "1")]
    pub addr: u64,
    /// Number of 4 KiB pages.
    #[prost(uint64, tag = "2")]
    pub npages: u64,
}

/// Fields of PR_SET_MM_MAP.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MmFields {
    #[prost(uint64, tag = "1")]
    #[allow(missing_docs)]
    pub start_code: u64,
    #[prost(uint64, tag = "2")]
    #[allow(missing_docs)]
    pub end_code: u64,
    #[prost(uint64, tag = "3")]
    #[allow(missing_docs)]
    pub start_data: u64,
    #[prost(uint64, tag = "4")]
    #[allow(missing_docs)]
    pub end_data: u64,
    #[prost(uint64, tag = "5")]
    #[allow(missing_docs)]
    pub start_brk: u64,
    /// Current program break (brk(0) in the process).
    #[prost(uint64, tag = "6")]
    pub brk: u64,
    #[prost(uint64, tag = "7")]
    #[allow(missing_docs)]
    pub start_stack: u64,
    #[prost(uint64, tag = "8")]
    #[allow(missing_docs)]
    pub arg_start: u64,
    #[prost(uint64, tag = "9")]
    #[allow(missing_docs)]
    pub arg_end: u64,
    #[prost(uint64, tag = "10")]
    #[allow(missing_docs)]
    pub env_start: u64,
    #[prost(uint64, tag = "11")]
    #[allow(missing_docs)]
    pub env_end: u64,
}

/// Registered rseq area (PTRACE_GET_RSEQ_CONFIGURATION).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Rseq {
    /// Address of struct rseq.
    #[prost(uint64, tag = "1")]
    pub ptr: u64,
    /// Registered length.
    #[prost(uint32, tag = "2")]
    pub len: u32,
    /// Abort signature.
    #[prost(uint32, tag = "3")]
    pub sig: u32,
}

/// What an fd refers to (informational since format 2: [`Fd::restore`] says how it comes back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum FdKind {
    /// A file, directory or device named by a path.
    Path = 0,
    /// A terminal.
    Tty = 1,
    /// A pipe.
    Pipe = 2,
    /// A socket.
    Socket = 3,
    /// Anything else (eventfd, epoll, a deleted file...).
    Other = 4,
}

/// How a restart rebuilds an fd. Export decides it for every fd (or refuses the checkpoint,
/// see `restorable.rs`) and import does exactly what is recorded: no second opinion that
/// could disagree with the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum FdRestore {
    /// Not recorded: a version 1 image (see [`Fd::restore_method`]); refused in version 2.
    Unrecorded = 0,
    /// Reopened by `path` with `flags` at offset `pos`.
    Reopen = 1,
    /// Opened on /dev/null with the recorded access mode (`krg checkpoint --drop FD`).
    DevNull = 2,
    /// Handed in by whoever restarts the process (`krg checkpoint --external FD`, then
    /// `krg restart --inherit-fd FD=KRG_FD`); a restart without it is refused.
    External = 3,
    /// fd 0, 1 or 2 connected to a pipe, socket or terminal: the restorer's own fd of the same
    /// number takes its place, as for a shell job (or one handed in).
    CallerStdio = 4,
    /// A regular file deleted while open ([`Fd::deleted`]): its contents are stored in the
    /// image and it comes back as an open, unlinked file with the same flags and offset.
    DeletedFile = 5,
    /// One end of a pipe whose both ends the process holds ([`Fd::pipe`]): the pipe is made
    /// again with its capacity and the bytes buffered in it.
    PipeInProcess = 6,
    /// An eventfd ([`Fd::eventfd`]): made again with its counter and semaphore mode.
    EventFd = 7,
    /// A timerfd ([`Fd::timerfd`]): made again on its clock, re-armed with the time that was
    /// left and its interval, with its unread expirations.
    TimerFd = 8,
    /// A signalfd ([`Fd::signalfd`]): made again with its signal mask.
    SignalFd = 9,
    /// An epoll instance ([`Fd::epoll`]): made again, and its registrations added once every
    /// other fd of the process is in place (they name fds of the process).
    Epoll = 10,
    /// An inotify instance ([`Fd::inotify`]): made again with its watches, each on the path
    /// its inode had at checkpoint and with its watch descriptor number.
    Inotify = 11,
    /// A TCP, UDP or Unix socket, unbound, bound or listening ([`Fd::socket`]): made again,
    /// bound at its address with its options, listening with its backlog, a UDP one
    /// connected again to its peer address.
    Socket = 12,
    /// One end of a Unix socketpair whose both ends the process holds ([`Fd::socket`]): the
    /// pair is made again, each end with the messages that were queued to it.
    SocketPair = 13,
}

/// A socket, as [`FdRestore::Socket`] and [`FdRestore::SocketPair`] rebuild it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketState {
    /// Inode of the socket: fds with the same one are one socket.
    #[prost(uint64, tag = "1")]
    pub inode: u64,
    /// AF_INET, AF_INET6 or AF_UNIX.
    #[prost(int32, tag = "2")]
    pub family: i32,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    #[prost(int32, tag = "3")]
    pub sotype: i32,
    /// The protocol (IPPROTO_TCP, IPPROTO_UDP, 0).
    #[prost(int32, tag = "4")]
    pub protocol: i32,
    /// The address it is bound to, as getsockname gave it (a raw sockaddr); empty: unbound.
    #[prost(bytes = "vec", tag = "5")]
    pub bound: Vec<u8>,
    /// The listen backlog, if it listens.
    #[prost(int32, optional, tag = "6")]
    pub listen_backlog: Option<i32>,
    /// A UDP socket's connected peer (raw sockaddr); empty: not connected.
    #[prost(bytes = "vec", tag = "7")]
    pub connected_to: Vec<u8>,
    /// SO_REUSEADDR.
    #[prost(bool, tag = "8")]
    pub reuseaddr: bool,
    /// SO_REUSEPORT.
    #[prost(bool, tag = "9")]
    pub reuseport: bool,
    /// IPV6_V6ONLY (AF_INET6).
    #[prost(bool, tag = "10")]
    pub v6only: bool,
    /// The other end of a socketpair.
    #[prost(uint64, tag = "11")]
    pub peer_inode: u64,
    /// Lengths of the messages queued to be read from this end (a stream: one piece); the
    /// bytes follow in the page data, carried by the first fd of the socket.
    #[prost(uint32, repeated, tag = "12")]
    pub messages: Vec<u32>,
    /// Bytes of [`SocketState::messages`] stored in the page data (0 on the other fds of
    /// the socket).
    #[prost(uint64, tag = "13")]
    pub queued: u64,
    /// Permission bits of the socket file of a path-bound Unix socket.
    #[prost(uint32, tag = "14")]
    pub path_mode: u32,
}

/// One watch of an inotify instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InotifyWatch {
    /// The watch descriptor the process knows it by.
    #[prost(int32, tag = "1")]
    pub wd: i32,
    /// Its mask (events, IN_ONESHOT, IN_EXCL_UNLINK).
    #[prost(uint32, tag = "2")]
    pub mask: u32,
    /// The watched file or directory, resolved from its file handle at checkpoint.
    #[prost(string, tag = "3")]
    pub path: String,
}

/// The watches of an inotify instance (it had no unread event: those are refused).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InotifyState {
    /// By watch descriptor.
    #[prost(message, repeated, tag = "1")]
    pub watches: Vec<InotifyWatch>,
}

/// The state of an eventfd, from its fdinfo.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventFdState {
    /// `eventfd-count`.
    #[prost(uint64, tag = "1")]
    pub count: u64,
    /// `eventfd-semaphore` (EFD_SEMAPHORE).
    #[prost(bool, tag = "2")]
    pub semaphore: bool,
}

/// The state of a timerfd: its fdinfo, with the time left read by timerfd_gettime (the
/// fdinfo shows 0 for a periodic timer that expired and was not read since).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimerFdState {
    /// `clockid` (CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, the _ALARM ones).
    #[prost(int32, tag = "1")]
    pub clockid: i32,
    /// `ticks`: expirations not read yet.
    #[prost(uint64, tag = "2")]
    pub ticks: u64,
    /// `settime flags` (TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET).
    #[prost(uint32, tag = "3")]
    pub settime_flags: u32,
    /// Time left to the next expiration, in ns (0: disarmed).
    #[prost(uint64, tag = "4")]
    pub value_ns: u64,
    /// Interval, in ns (0: one-shot).
    #[prost(uint64, tag = "5")]
    pub interval_ns: u64,
    /// For an absolute timer on a wall clock (CLOCK_REALTIME[_ALARM] with
    /// TFD_TIMER_ABSTIME): the expiration as a CLOCK_REALTIME time in ns, kept as it is at
    /// restart, however long the process was down.
    #[prost(int64, optional, tag = "6")]
    pub realtime_expiry_ns: Option<i64>,
}

/// The state of a signalfd.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignalFdState {
    /// `sigmask`: bit N-1 for signal N.
    #[prost(uint64, tag = "1")]
    pub sigmask: u64,
}

/// One registration of an epoll instance (a `tfd:` line of its fdinfo).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EpollTarget {
    /// The registered fd number, an fd of the process open on the registered file.
    #[prost(int32, tag = "1")]
    pub fd: i32,
    /// The events mask, EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE and EPOLLWAKEUP included (a
    /// oneshot that fired keeps only those flags, so it comes back disabled).
    #[prost(uint32, tag = "2")]
    pub events: u32,
    /// The user data returned with its events.
    #[prost(uint64, tag = "3")]
    pub data: u64,
}

/// The registered set of an epoll instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EpollState {
    /// Its registrations, in fdinfo order.
    #[prost(message, repeated, tag = "1")]
    pub targets: Vec<EpollTarget>,
}

/// One end of a pipe held, both ends, by the process.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PipeEnd {
    /// Inode of the pipe: the fds with the same one are ends of one pipe.
    #[prost(uint64, tag = "1")]
    pub inode: u64,
    /// F_GETPIPE_SZ.
    #[prost(uint32, tag = "2")]
    pub capacity: u32,
    /// Bytes buffered in the pipe, stored in the page data; only the first fd of a pipe
    /// carries them (0 on the others).
    #[prost(uint64, tag = "3")]
    pub buffered: u64,
}

/// A regular file that was deleted while open, saved with the image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeletedFile {
    /// Bytes of content stored in the page data (0 when `same_as` is set).
    #[prost(uint64, tag = "1")]
    pub size: u64,
    /// Permission bits.
    #[prost(uint32, tag = "2")]
    pub mode: u32,
    /// A lower fd on the same file, whose stored content this one shares: after restore both
    /// are one file again (each with its own flags and offset).
    #[prost(int32, optional, tag = "3")]
    pub same_as: Option<i32>,
}

/// Bytes a deleted file of `size` bytes takes in the page data (whole pages, so that page
/// data stays a sequence of pages for the checkpoint store).
pub fn stored_len(size: u64) -> u64 {
    size.div_ceil(crate::PAGE).saturating_mul(crate::PAGE)
}

/// One open file descriptor.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Fd {
    /// Descriptor number.
    #[prost(int32, tag = "1")]
    pub fd: i32,
    /// What it is.
    #[prost(enumeration = "FdKind", tag = "2")]
    pub kind: i32,
    /// readlink of /proc/PID/fd/N.
    #[prost(string, tag = "3")]
    pub path: String,
    /// open(2) flags from fdinfo (O_CLOEXEC included).
    #[prost(uint32, tag = "4")]
    pub flags: u32,
    /// File offset.
    #[prost(int64, tag = "5")]
    pub pos: i64,
    /// How a restart rebuilds it (format 2 on).
    #[prost(enumeration = "FdRestore", tag = "6")]
    pub restore: i32,
    /// For [`FdRestore::DeletedFile`]: the saved file.
    #[prost(message, optional, tag = "7")]
    pub deleted: Option<DeletedFile>,
    /// For [`FdRestore::PipeInProcess`]: which pipe, and what it held.
    #[prost(message, optional, tag = "8")]
    pub pipe: Option<PipeEnd>,
    /// For [`FdRestore::EventFd`].
    #[prost(message, optional, tag = "9")]
    pub eventfd: Option<EventFdState>,
    /// For [`FdRestore::TimerFd`].
    #[prost(message, optional, tag = "10")]
    pub timerfd: Option<TimerFdState>,
    /// For [`FdRestore::SignalFd`].
    #[prost(message, optional, tag = "11")]
    pub signalfd: Option<SignalFdState>,
    /// For [`FdRestore::Epoll`].
    #[prost(message, optional, tag = "12")]
    pub epoll: Option<EpollState>,
    /// For [`FdRestore::Inotify`].
    #[prost(message, optional, tag = "13")]
    pub inotify: Option<InotifyState>,
    /// For [`FdRestore::Socket`] and [`FdRestore::SocketPair`].
    #[prost(message, optional, tag = "14")]
    pub socket: Option<SocketState>,
}

impl Fd {
    /// Bytes this fd carries in the page data (a deleted file's contents, a pipe's buffer, a
    /// socketpair end's queue).
    pub fn stored_bytes(&self) -> u64 {
        let deleted = self.deleted.as_ref().map_or(0, |d| d.size);
        deleted
            .saturating_add(self.pipe.as_ref().map_or(0, |p| p.buffered))
            .saturating_add(self.socket.as_ref().map_or(0, |s| s.queued))
    }

    /// How a restart rebuilds this fd. Images of format 1 did not record it: their pipes,
    /// sockets and other fds had to be handed in (or, for fds 0-2, were replaced by the
    /// restorer's own), files and terminals were reopened; that is what is returned for them.
    pub fn restore_method(&self, format_version: u32) -> Result<FdRestore> {
        let recorded = FdRestore::try_from(self.restore).map_err(|_| {
            GhostError::BadImage(format!(
                "fd {} has an unknown restore method {}: restore it with a newer krg",
                self.fd, self.restore
            ))
        })?;
        if recorded != FdRestore::Unrecorded {
            return Ok(recorded);
        }
        if format_version >= 2 {
            return Err(GhostError::BadImage(format!(
                "fd {} ({}) records no restore method",
                self.fd, self.path
            )));
        }
        Ok(match FdKind::try_from(self.kind).unwrap_or(FdKind::Other) {
            FdKind::Path | FdKind::Tty => FdRestore::Reopen,
            _ if self.fd <= 2 => FdRestore::CallerStdio,
            _ => FdRestore::External,
        })
    }
}

/// One resource limit.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Rlimit {
    /// RLIMIT_* number.
    #[prost(uint32, tag = "1")]
    pub resource: u32,
    /// Soft limit.
    #[prost(uint64, tag = "2")]
    pub cur: u64,
    /// Hard limit.
    #[prost(uint64, tag = "3")]
    pub max: u64,
}

/// A kernel `struct sigaction` for one signal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SigAction {
    /// Signal number.
    #[prost(uint32, tag = "1")]
    pub sig: u32,
    /// Handler address (1 = SIG_IGN).
    #[prost(uint64, tag = "2")]
    pub handler: u64,
    /// SA_* flags.
    #[prost(uint64, tag = "3")]
    pub flags: u64,
    /// sa_restorer.
    #[prost(uint64, tag = "4")]
    pub restorer: u64,
    /// sa_mask.
    #[prost(uint64, tag = "5")]
    pub mask: u64,
}

/// A pending signal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingSignal {
    /// From the process-wide queue (else the thread's).
    #[prost(bool, tag = "1")]
    pub shared: bool,
    /// The 128-byte siginfo_t.
    #[prost(bytes = "vec", tag = "2")]
    pub siginfo: Vec<u8>,
}

/// sigaltstack(2) state.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AltStack {
    /// ss_sp.
    #[prost(uint64, tag = "1")]
    pub sp: u64,
    /// ss_flags.
    #[prost(int32, tag = "2")]
    pub flags: i32,
    /// ss_size.
    #[prost(uint64, tag = "3")]
    pub size: u64,
}

/// Pieces of at least this size are hashed on another thread while they are written.
const PAR_PUT_MIN: usize = 1 << 20;

/// Writes an image: header and metadata first, then page data in pieces, then the trailer.
pub(crate) struct ImageWriter<'a> {
    out: &'a mut dyn GhostWriter,
    hasher: blake3::Hasher,
    pages_left: u64,
}

impl<'a> ImageWriter<'a> {
    /// Writes header and metadata; `meta.page_bytes` announces the page data that must follow.
    pub fn begin(out: &'a mut dyn GhostWriter, meta: &ProcessImage) -> Result<Self> {
        let meta_bytes = prost::Message::encode_to_vec(meta);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        header.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
        header.extend_from_slice(&meta.page_bytes.to_le_bytes());
        let mut w = ImageWriter {
            out,
            hasher: blake3::Hasher::new(),
            pages_left: meta.page_bytes,
        };
        w.put(&header, "writing the image header")?;
        w.put(&meta_bytes, "writing the image metadata")?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8], what: &str) -> Result<()> {
        if b.len() < PAR_PUT_MIN {
            self.hasher.update(b);
            return self.out.write_all(b).map_err(|e| wio(self.out, what, e));
        }
        // Page data is hashed on a second core while this one writes it: the writer may not
        // leave the calling thread (it need not be Send), the hasher may.
        let hasher = &mut self.hasher;
        let out = &mut *self.out;
        let (r, hashed) = std::thread::scope(|s| {
            let h = std::thread::Builder::new().spawn_scoped(s, || {
                hasher.update(b);
            });
            let r = out.write_all(b).map_err(|e| wio(out, what, e));
            // A panic while hashing is a bug in blake3 or here; re-raise it.
            let hashed = h.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (r, hashed.is_ok())
        });
        if !hashed {
            // No thread to be had: hashed after writing, as a single thread would.
            self.hasher.update(b);
        }
        r
    }

    /// Appends page data.
    pub fn pages(&mut self, b: &[u8]) -> Result<()> {
        if b.len() as u64 > self.pages_left {
            return Err(GhostError::Unsupported(
                "the process's memory changed while it was exported (more pages than announced)"
                    .into(),
            ));
        }
        self.pages_left -= b.len() as u64;
        self.put(b, "writing page data")
    }

    /// Offers pages unchanged since the previous image to the writer (see
    /// [`GhostWriter::reuse_pages`]); true if it took them and they must not be written.
    pub fn reuse(&mut self, addr: u64, npages: u64) -> Result<bool> {
        let bytes = npages * crate::PAGE;
        if bytes > self.pages_left {
            return Err(GhostError::Unsupported(
                "the process's memory changed while it was exported (more pages than announced)"
                    .into(),
            ));
        }
        let taken = self
            .out
            .reuse_pages(addr, npages)
            .map_err(|e| wio(self.out, "handing over unchanged pages", e))?;
        if taken {
            self.pages_left -= bytes;
        }
        Ok(taken)
    }

    /// Appends the page data of `pieces` (`size` bytes each, read with `read`). The next piece
    /// is read on a second thread while this one writes the previous one, so copying out of
    /// the process overlaps copying into the destination. A piece for which `unchanged` gives
    /// (address, pages) is first offered to the writer ([`ImageWriter::reuse`]) and read only
    /// if the writer declines. Returns the bytes the writer took that way.
    pub fn pages_from<P: Sync>(
        &mut self,
        pieces: &[P],
        size: impl Fn(&P) -> usize + Sync,
        unchanged: impl Fn(&P) -> Option<(u64, u64)> + Sync,
        read: impl Fn(&P, &mut [u8]) -> Result<()> + Sync,
    ) -> Result<u64> {
        use std::sync::mpsc::sync_channel;
        let cap = pieces.iter().map(&size).max().unwrap_or(0);
        let mut reused = 0u64;
        // Offers an unchanged piece; Ok(true) if the writer took it. A declined one is read
        // here, in turn (the reader thread skips every offered piece).
        let mut offer = |w: &mut Self, p: &P, buf: &mut Vec<u8>| -> Result<bool> {
            let Some((addr, npages)) = unchanged(p) else {
                return Ok(false);
            };
            if w.reuse(addr, npages)? {
                reused += size(p) as u64;
                return Ok(true);
            }
            buf.resize(cap, 0);
            let b = &mut buf[..size(p)];
            read(p, b)?;
            w.pages(b)?;
            Ok(true)
        };
        let mut spare = Vec::new();
        // Two buffers: one being filled while the other is written.
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(2);
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, Result<()>)>(1);
        for _ in 0..2 {
            // Cannot fail: the channel has room for both and its receiver is alive.
            let _ = free_tx.send(vec![0u8; cap]);
        }
        let (size, read, unchanged) = (&size, &read, &unchanged);
        std::thread::scope(|s| {
            let reader = std::thread::Builder::new().spawn_scoped(s, move || {
                for p in pieces.iter().filter(|p| unchanged(p).is_none()) {
                    // The writer stopped (error): nothing more to read.
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let r = read(p, &mut buf[..size(p)]);
                    let failed = r.is_err();
                    if full_tx.send((buf, r)).is_err() || failed {
                        return;
                    }
                }
            });
            let Ok(reader) = reader else {
                // No thread to be had: read and write in turn.
                let mut buf = vec![0u8; cap];
                for p in pieces {
                    if offer(self, p, &mut spare)? {
                        continue;
                    }
                    let b = &mut buf[..size(p)];
                    read(p, b)?;
                    self.pages(b)?;
                }
                return Ok(());
            };
            let mut res = Ok(());
            for p in pieces {
                match offer(self, p, &mut spare) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
                // A closed channel means the reader panicked; join below re-raises it.
                let Ok((buf, r)) = full_rx.recv() else { break };
                res = r.and_then(|()| self.pages(&buf[..size(p)]));
                if res.is_err() {
                    break;
                }
                let _ = free_tx.send(buf);
            }
            // Closing both channels ends a reader waiting on either.
            drop(free_tx);
            drop(full_rx);
            reader
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            res
        })?;
        Ok(reused)
    }

    /// Writes the trailer and finishes the writer.
    pub fn end(self) -> Result<()> {
        if self.pages_left != 0 {
            return Err(GhostError::Unsupported(format!(
                "{} bytes of announced page data were not written",
                self.pages_left
            )));
        }
        let hash = self.hasher.finalize();
        let mut t = Vec::with_capacity(TRAILER_LEN);
        t.extend_from_slice(hash.as_bytes());
        t.extend_from_slice(END_MAGIC);
        self.out
            .write_all(&t)
            .map_err(|e| wio(self.out, "writing the image trailer", e))?;
        self.out
            .finish()
            .map_err(|e| wio(self.out, "finishing the image", e))
    }
}

/// A whole image read and verified.
pub struct LoadedImage {
    /// The metadata.
    pub meta: ProcessImage,
    /// Format version from the header (older versions are read, see [`FORMAT_VERSION`]).
    pub format_version: u32,
    bytes: Storage,
    pages_off: usize,
    pages_len: usize,
}

impl LoadedImage {
    /// The page data, in the order of the mappings' runs (then what fds carry).
    pub fn pages(&self) -> &[u8] {
        &self.bytes.as_slice()[self.pages_off..self.pages_off + self.pages_len]
    }

    /// What fds carry in the page data ([`Fd::stored_bytes`]), by fd (checked to fit at load).
    pub fn fd_contents(&self) -> Vec<(i32, &[u8])> {
        let pages = self.pages();
        let mut off: usize = self
            .meta
            .mappings
            .iter()
            .flat_map(|m| m.runs.iter())
            .map(|r| (r.npages * crate::PAGE) as usize)
            .sum();
        let mut out = Vec::new();
        for f in &self.meta.fds {
            let n = f.stored_bytes();
            if n > 0 {
                out.push((f.fd, &pages[off..off + n as usize]));
                off += stored_len(n) as usize;
            }
        }
        out
    }
    /// Total size of the image in bytes.
    pub fn len(&self) -> usize {
        self.bytes.as_slice().len()
    }
    /// True for an image of no bytes (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.bytes.as_slice().is_empty()
    }
}

/// Reads a whole image, checks magic, version, lengths and checksum, and decodes the metadata.
/// Nothing about the host is checked here (see `compat`).
pub fn load(r: &mut dyn GhostReader) -> Result<LoadedImage> {
    let mut header = [0u8; HEADER_LEN];
    let n = read_full(r, &mut header).map_err(|e| rio(r, "reading the image header", e))?;
    if n < 8 || &header[..8] != MAGIC {
        return Err(GhostError::BadImage(format!(
            "{} is not a ghost image (wrong magic; expected a file written by `krg checkpoint`)",
            r.describe()
        )));
    }
    if n < HEADER_LEN {
        return Err(GhostError::BadImage(format!(
            "{} is truncated: {n} bytes, shorter than the {HEADER_LEN}-byte header",
            r.describe()
        )));
    }
    let le32 =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let le64 = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = le32(8);
    if version > FORMAT_VERSION {
        return Err(GhostError::BadImage(format!(
            "{} has format version {version}, newer than this build understands ({FORMAT_VERSION}): restore it with a newer krg",
            r.describe()
        )));
    }
    if version == 0 || le32(12) as usize != HEADER_LEN {
        return Err(GhostError::BadImage(format!(
            "{} has a damaged header (version {version}, header size {})",
            r.describe(),
            le32(12)
        )));
    }
    let meta_len = le64(16);
    let pages_len = le64(24);
    if meta_len > MAX_META || pages_len > (1u64 << 47) {
        return Err(GhostError::BadImage(format!(
            "{} has a damaged header (metadata {meta_len} bytes, pages {pages_len} bytes)",
            r.describe()
        )));
    }
    let total = HEADER_LEN as u64 + meta_len + pages_len + TRAILER_LEN as u64;
    if let Some(have) = r.size_hint() {
        if have < total {
            return Err(GhostError::BadImage(format!(
                "{} is truncated: {have} bytes, the header announces {total}",
                r.describe()
            )));
        }
    }
    let total = usize::try_from(total)
        .map_err(|_| GhostError::BadImage("image larger than the address space".into()))?;
    // A zeroed allocation of this size comes straight from mmap (fresh zero pages), so
    // nothing is written twice; only the read touches the pages.
    if let (Some(f), Some(have)) = (r.as_file(), r.size_hint()) {
        if have == total as u64 {
            // A local file is mapped rather than read: no copy and no page faults on a fresh
            // buffer, page-cache pages are used in place (the restore writes from them).
            if let Some(m) = Mapped::of(f, total) {
                return finish_load(r, Storage::Map(m), version, meta_len, pages_len);
            }
        }
    }
    let mut bytes: Vec<u8> = Vec::new();
    bytes.try_reserve_exact(total).map_err(|_| {
        GhostError::BadImage(format!(
            "cannot allocate {total} bytes to read {} (not enough memory)",
            r.describe()
        ))
    })?;
    drop(bytes);
    let mut bytes = vec![0u8; total];
    bytes[..HEADER_LEN].copy_from_slice(&header);
    let got = read_full(r, &mut bytes[HEADER_LEN..]).map_err(|e| rio(r, "reading the image", e))?;
    if got + HEADER_LEN < total {
        return Err(GhostError::BadImage(format!(
            "{} is truncated: {} bytes, the header announces {total}",
            r.describe(),
            got + HEADER_LEN
        )));
    }
    let mut extra = [0u8; 1];
    if read_full(r, &mut extra).map_err(|e| rio(r, "reading the image", e))? != 0 {
        return Err(GhostError::BadImage(format!(
            "{} has bytes after the end of the image (damaged or concatenated)",
            r.describe()
        )));
    }
    finish_load(r, Storage::Vec(bytes), version, meta_len, pages_len)
}

/// Checks end marker and checksum and decodes the metadata of a fully read image.
fn finish_load(
    r: &dyn GhostReader,
    storage: Storage,
    version: u32,
    meta_len: u64,
    pages_len: u64,
) -> Result<LoadedImage> {
    let bytes = storage.as_slice();
    let total = bytes.len();
    let body = total - TRAILER_LEN;
    if &bytes[body + 32..] != END_MAGIC {
        return Err(GhostError::BadImage(format!(
            "{} is damaged: end marker missing",
            r.describe()
        )));
    }
    // `krg listen` reads a migrating image after moving its children into a new PID namespace.
    let hash = if r.checks_content() {
        None
    } else {
        let h =
            crate::sys::with_threads_allowed(|| hash_parallel(&bytes[..body])).map_err(|e| {
                GhostError::Restore {
                    step: "restore the PID namespace for new children after hashing the image"
                        .into(),
                    msg: e.to_string(),
                }
            })?;
        Some(h)
    };
    if hash.is_some_and(|h| h.as_bytes() != &bytes[body..body + 32]) {
        return Err(GhostError::BadImage(format!(
            "{} is damaged: checksum mismatch (the file was altered or corrupted; use another checkpoint)",
            r.describe()
        )));
    }
    let meta_end = HEADER_LEN + meta_len as usize;
    let meta: ProcessImage = prost::Message::decode(&bytes[HEADER_LEN..meta_end]).map_err(|e| {
        GhostError::BadImage(format!("{}: metadata does not decode: {e}", r.describe()))
    })?;
    if meta.page_bytes != pages_len {
        return Err(GhostError::BadImage(format!(
            "{}: metadata announces {} page bytes, header {pages_len}",
            r.describe(),
            meta.page_bytes
        )));
    }
    let run_bytes: u64 = meta
        .mappings
        .iter()
        .flat_map(|m| m.runs.iter())
        .map(|r| r.npages.saturating_mul(crate::PAGE))
        .fold(0u64, |a, b| a.saturating_add(b));
    let fd_bytes: u64 = meta
        .fds
        .iter()
        .map(|f| stored_len(f.stored_bytes()))
        .fold(0u64, |a, b| a.saturating_add(b));
    if run_bytes.saturating_add(fd_bytes) != pages_len {
        return Err(GhostError::BadImage(format!(
            "{}: page runs cover {run_bytes} bytes and fds {fd_bytes}, but {pages_len} are stored",
            r.describe()
        )));
    }
    Ok(LoadedImage {
        meta,
        format_version: version,
        bytes: storage,
        pages_off: meta_end,
        pages_len: pages_len as usize,
    })
}

/// Where a loaded image's bytes live.
enum Storage {
    Vec(Vec<u8>),
    Map(Mapped),
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Vec(v) => v,
            // SAFETY: the mapping is alive as long as self and `len` bytes long.
            Storage::Map(m) => unsafe { std::slice::from_raw_parts(m.ptr as *const u8, m.len) },
        }
    }
}

/// A read-only shared mapping of a whole image file. If the file is truncated while mapped,
/// reading the lost part raises SIGBUS: image files are written once and never rewritten.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn of(f: &std::fs::File, len: usize) -> Option<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: read-only mapping of a file we hold open; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        (ptr != libc::MAP_FAILED).then_some(Mapped { ptr, len })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `of` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Below this size a subtree is hashed on the calling thread: a thread costs more than it saves.
const PAR_HASH_MIN: usize = 16 << 20;

/// `blake3::hash(data)`, computed on every core. The checksum of an image is verified before
/// anything is restored, so with one thread it is the longest sequential step of a restart
/// (~0.2 s per GiB on this kind of CPU). BLAKE3 is a tree of 1 KiB chunks: disjoint subtrees
/// are hashed on their own threads and their chaining values merged, which gives the same hash
/// as the sequential function (checked in the tests below).
pub(crate) fn hash_parallel(data: &[u8]) -> blake3::Hash {
    hash_threads(
        data,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

/// [`hash_parallel`] on at most `threads` threads.
fn hash_threads(data: &[u8], threads: usize) -> blake3::Hash {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_root, Mode};
    if threads < 2 || data.len() < 2 * PAR_HASH_MIN {
        return blake3::hash(data);
    }
    let split = left_subtree_len(data.len() as u64) as usize;
    let (l, r) = data.split_at(split);
    let (lcv, rcv) = split_cvs(l, r, 0, threads);
    merge_subtrees_root(&lcv, &rcv, Mode::Hash)
}

/// Chaining value of the subtree `data` that starts at byte `off` of the whole input, using up
/// to `threads` threads.
fn subtree_cv(data: &[u8], off: u64, threads: usize) -> blake3::hazmat::ChainingValue {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, HasherExt, Mode};
    if threads < 2 || data.len() < 2 * PAR_HASH_MIN {
        return blake3::Hasher::new()
            .set_input_offset(off)
            .update(data)
            .finalize_non_root();
    }
    let split = left_subtree_len(data.len() as u64) as usize;
    let (l, r) = data.split_at(split);
    let (lcv, rcv) = split_cvs(l, r, off, threads);
    merge_subtrees_non_root(&lcv, &rcv, Mode::Hash)
}

/// Chaining values of the two children `l` (at `off`) and `r` (right after it). The left child
/// is a power of two long and may be far larger than the right one (an image is 2^n pages plus
/// a little metadata): then all threads go down the left side and the right child is hashed
/// afterwards, instead of one thread idling while the other hashes almost everything.
fn split_cvs(
    l: &[u8],
    r: &[u8],
    off: u64,
    threads: usize,
) -> (blake3::hazmat::ChainingValue, blake3::hazmat::ChainingValue) {
    let roff = off + l.len() as u64;
    if r.len() < PAR_HASH_MIN || r.len() * threads < l.len() {
        let lcv = subtree_cv(l, off, threads);
        (lcv, subtree_cv(r, roff, threads))
    } else {
        let rt = threads / 2;
        std::thread::scope(|s| {
            let right = std::thread::Builder::new().spawn_scoped(s, || subtree_cv(r, roff, rt));
            let lcv = subtree_cv(l, off, threads - rt);
            let rcv = match right {
                // A panic in the hashing thread is a bug in this function; re-raise it here.
                Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                // No thread to be had (see sys::with_threads_allowed): hash it here.
                Err(_) => subtree_cv(r, roff, 1),
            };
            (lcv, rcv)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rao::{MemReader, MemWriter};

    /// Takes offers of pages at even page addresses only, and keeps what it took.
    #[derive(Default)]
    struct EvenTaker {
        mem: MemWriter,
        taken: Vec<(u64, u64)>,
    }

    impl GhostWriter for EvenTaker {
        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            self.mem.write_all(buf)
        }
        fn finish(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "even taker".into()
        }
        fn reuse_pages(&mut self, addr: u64, npages: u64) -> std::io::Result<bool> {
            let take = (addr / crate::PAGE).is_multiple_of(2);
            if take {
                self.taken.push((addr, npages));
            }
            Ok(take)
        }
    }

    #[test]
    fn pages_from_streams_in_order_and_reads_declined_offers() {
        // Pieces of one page at page addresses 0..8; pages 2..6 are offered as unchanged, and
        // the writer takes 2 and 4 and declines 3 and 5, which must then be read and streamed
        // in their place.
        let pieces: Vec<u64> = (0..8).collect();
        let meta = ProcessImage {
            page_bytes: 8 * crate::PAGE,
            ..Default::default()
        };
        let mut out = EvenTaker::default();
        let mut w = ImageWriter::begin(&mut out, &meta).expect("begin");
        let reused = w
            .pages_from(
                &pieces,
                |_| crate::PAGE as usize,
                |&p| (2..6).contains(&p).then_some((p * crate::PAGE, 1)),
                |&p, b| {
                    b.fill(p as u8 + 1);
                    Ok(())
                },
            )
            .expect("pages");
        assert_eq!(reused, 2 * crate::PAGE);
        w.end().expect("end");
        assert_eq!(out.taken, vec![(2 * crate::PAGE, 1), (4 * crate::PAGE, 1)]);
        let head = HEADER_LEN + prost::Message::encoded_len(&meta);
        let streamed: Vec<u8> = out.mem.buf[head..out.mem.buf.len() - TRAILER_LEN]
            .chunks(crate::PAGE as usize)
            .map(|page| page[0])
            .collect();
        assert_eq!(streamed, vec![1, 2, 4, 6, 7, 8]);
        // The streamed bytes alone are not a loadable image: the taker must re-assemble it.
        assert!(load(&mut MemReader::new(&out.mem.buf)).is_err());
    }

    #[test]
    fn format_1_fds_are_restored_the_way_format_1_did() {
        let fd = |fd: i32, kind: FdKind| Fd {
            fd,
            kind: kind as i32,
            path: "x".into(),
            ..Default::default()
        };
        let method = |f: Fd, v: u32| f.restore_method(v).ok();
        assert_eq!(method(fd(3, FdKind::Path), 1), Some(FdRestore::Reopen));
        assert_eq!(method(fd(0, FdKind::Tty), 1), Some(FdRestore::Reopen));
        assert_eq!(method(fd(1, FdKind::Pipe), 1), Some(FdRestore::CallerStdio));
        assert_eq!(method(fd(4, FdKind::Socket), 1), Some(FdRestore::External));
        // Format 2 must say: an fd without a method is a damaged image, not a guess.
        assert_eq!(method(fd(3, FdKind::Path), 2), None);
        let recorded = Fd {
            restore: FdRestore::DevNull as i32,
            ..fd(4, FdKind::Socket)
        };
        assert_eq!(method(recorded, 2), Some(FdRestore::DevNull));
    }

    #[test]
    fn parallel_hash_matches_blake3() {
        // Patterned rather than zero so a subtree hashed at the wrong offset or merged in the
        // wrong order gives a different hash.
        let data: Vec<u8> = (0..(70u64 << 20) + 3000)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        for len in [
            0,
            1,
            1024,
            1025,
            (2 * PAR_HASH_MIN) - 1,
            2 * PAR_HASH_MIN,
            (32 << 20) + 1,
            (48 << 20) + 7,
            64 << 20,
            (64 << 20) + 4096 + 200,
            data.len(),
        ] {
            let want = blake3::hash(&data[..len]);
            for threads in 1..=4 {
                assert_eq!(
                    hash_threads(&data[..len], threads),
                    want,
                    "length {len}, {threads} threads"
                );
            }
        }
    }
}
