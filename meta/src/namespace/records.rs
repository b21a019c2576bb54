//! On-disk layout of the namespace: key encodings and the prost records stored under them,
//! plus typed load/store helpers that turn a malformed record into `EIO` instead of a panic.
//!
//! Keys (all without the state-space byte; integers big-endian so that key order is numeric
//! order, which readdir and the digest rely on):
//!
//! | key | value |
//! |---|---|
//! | `M` | [`Counters`]: id counters, inode count, total file size |
//! | `I` ino | [`InodeRec`] |
//! | `D` dir name | [`DirentRec`]: entry by name (lookup) |
//! | `C` dir seq | [`CookieRec`]: entry by creation sequence (readdir cookies) |
//! | `X` ino name | xattr value |
//! | `H` handle | [`HandleRec`]: one open file |
//! | `h` client handle | empty: the handles a client holds (closed when it expires) |
//! | `c` client | [`ClientRec`]: a client session |
//! | `r` client seq | an encoded `Reply`: the exactly-once reply cache |
//! | `L` ino | `Layout` of a directory or regular file (none: the default layout) |
//! | `S` server | [`ServerRec`]: one chunk server |
//! | `F` ino index | [`ChunkRec`]: chunk `index` of a file (version, placements) |
//! | `O` chunk | [`ChunkOwner`]: which file chunk a chunk id belongs to (reports name ids) |
//! | `G` server chunk | [`DeleteRec`]: a chunk the server must delete (deletion queue) |
//! | `u` ino index | `repair::UnderRec`: a chunk with fewer good copies than its layout wants |
//! | `w` server task | [`ChunkOwner`]: a repair task handed to that server (heartbeat delivery) |
//! | `#repair` | `repair::RepairCounters` |
//! | `K` ino | [`LockSet`]: the fcntl/flock locks held on a file (absent: none) |
//! | `W` client owner | [`LockWait`]: the POSIX lock an owner waits for (deadlock detection) |

use kerfs_proto::{Attr, ChunkPlacement, ChunkServerRecord, FileKind, Timespec};
use prost::Message;

use super::{Fail, R};
use crate::store::{KvRead, Overlay};

pub const K_COUNTERS: &[u8] = b"M";
// `P` is the metadata group's membership record (`crate::members::K_MEMBERS`).
pub const P_INODE: u8 = b'I';
pub const P_DIRENT: u8 = b'D';
pub const P_COOKIE: u8 = b'C';
pub const P_XATTR: u8 = b'X';
pub const P_HANDLE: u8 = b'H';
pub const P_CLIENT_HANDLE: u8 = b'h';
pub const P_CLIENT: u8 = b'c';
pub const P_REPLY: u8 = b'r';
pub const P_LAYOUT: u8 = b'L';
pub const P_SERVER: u8 = b'S';
pub const P_CHUNK: u8 = b'F';
pub const P_CHUNK_OWNER: u8 = b'O';
pub const P_DELETE: u8 = b'G';
pub const P_LOCKS: u8 = b'K';
pub const P_LOCK_WAIT: u8 = b'W';

/// First cookie handed to a real entry: 1 and 2 are left to the FUSE layer for "." and "..".
pub const FIRST_SEQ: u64 = 3;

/// Global counters. Ids come from here so every replica hands out the same ones.
#[derive(Clone, PartialEq, Message)]
pub struct Counters {
    #[prost(uint64, tag = "1")]
    pub next_ino: u64,
    #[prost(uint64, tag = "2")]
    pub next_generation: u64,
    #[prost(uint64, tag = "3")]
    pub next_handle: u64,
    #[prost(uint64, tag = "4")]
    pub next_client: u64,
    #[prost(uint64, tag = "5")]
    pub inodes: u64,
    #[prost(uint64, tag = "6")]
    pub total_size: u64,
    /// Next chunk id (0 in states written before chunks existed: read as 1).
    #[prost(uint64, tag = "7")]
    pub next_chunk: u64,
    /// Next chunk server id (0 in states written before chunks existed: read as 1).
    #[prost(uint64, tag = "8")]
    pub next_server: u64,
}

/// One inode: its attributes and what the attributes cannot say.
#[derive(Clone, PartialEq, Message)]
pub struct InodeRec {
    #[prost(message, optional, tag = "1")]
    pub attr: Option<Attr>,
    /// Directories: the parent directory (".." and the subtree check of rename).
    #[prost(uint64, tag = "2")]
    pub parent: u64,
    /// Symlinks: the target.
    #[prost(bytes = "vec", tag = "3")]
    pub target: Vec<u8>,
    /// Directories: the sequence number (readdir cookie) of the next entry created.
    #[prost(uint64, tag = "4")]
    pub next_seq: u64,
    /// Open handles; an inode with nlink 0 lives while this is above 0.
    #[prost(uint32, tag = "5")]
    pub open_count: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct DirentRec {
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    #[prost(enumeration = "FileKind", tag = "2")]
    pub kind: i32,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct CookieRec {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub ino: u64,
    #[prost(enumeration = "FileKind", tag = "3")]
    pub kind: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct HandleRec {
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    #[prost(uint64, tag = "2")]
    pub client_id: u64,
    #[prost(uint32, tag = "3")]
    pub flags: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ClientRec {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(uint64, tag = "2")]
    pub lease_ms: u64,
    #[prost(message, optional, tag = "3")]
    pub expires: Option<Timespec>,
    /// Replies below this seq were acknowledged by the client and dropped.
    #[prost(uint64, tag = "4")]
    pub acked_below: u64,
    #[prost(message, optional, tag = "5")]
    pub registered: Option<Timespec>,
}

/// A chunk server as the state machine keeps it.
#[derive(Clone, PartialEq, Message)]
pub struct ServerRec {
    #[prost(message, optional, tag = "1")]
    pub server: Option<ChunkServerRecord>,
    /// Ask for a full chunk report until one arrives (set when the server registers or
    /// comes back from "down": meta must learn what it holds before trusting deltas).
    #[prost(bool, tag = "2")]
    pub want_full_report: bool,
    /// An operator asked to drain it (`kerfsctl node drain`): it stays "draining" (or
    /// "drained") across restarts and down periods until it is removed.
    #[prost(bool, tag = "3")]
    pub drain: bool,
}

/// One chunk of a file. Placements are stored without addresses (servers may move; reads
/// fill them in from the server table).
#[derive(Clone, PartialEq, Message)]
pub struct ChunkRec {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(message, repeated, tag = "2")]
    pub replicas: Vec<ChunkPlacement>,
    /// Bumped by every commit and placement change: a repair copy is accepted only if this
    /// did not move while it was made (the version alone does not move within an epoch).
    #[prost(uint64, tag = "3")]
    pub writes: u64,
    /// The handle whose AllocateChunks started the current write epoch: while it is open its
    /// writer may still write this version, so a drain does not switch the chunk's
    /// placements under it.
    #[prost(uint64, tag = "4")]
    pub epoch_handle: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ChunkOwner {
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    #[prost(uint64, tag = "2")]
    pub index: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeleteRec {
    /// The server deletes the chunk only if it holds at most this version.
    #[prost(uint64, tag = "1")]
    pub max_version: u64,
}

/// Every lock held on one file, sorted (see `locks`), never empty when stored.
#[derive(Clone, PartialEq, Message)]
pub struct LockSet {
    #[prost(message, repeated, tag = "1")]
    pub locks: Vec<kerfs_proto::FileLock>,
}

/// A POSIX lock owner blocked in F_SETLKW: what it waits for, until when (the waiting
/// client repeats its request before that to stay recorded).
#[derive(Clone, PartialEq, Message)]
pub struct LockWait {
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    #[prost(uint64, tag = "2")]
    pub start: u64,
    #[prost(uint64, tag = "3")]
    pub end: u64,
    #[prost(enumeration = "kerfs_proto::LockType", tag = "4")]
    pub r#type: i32,
    #[prost(message, optional, tag = "5")]
    pub expires: Option<Timespec>,
}

// ------------------------------------------------------------------ keys

/// Key-value rows, in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The rows of a key range read a page at a time, so a range of any size is walked in bounded
/// memory. Each page starts after the last key of the one before, so the caller may change
/// the state between pages (rows already seen are not read again).
pub struct Pages {
    next: Vec<u8>,
    end: Vec<u8>,
    size: usize,
    done: bool,
}

impl Pages {
    /// Rows with `start <= key < end` (an empty `end`: no upper bound), `size` per page.
    pub fn new(start: Vec<u8>, end: Vec<u8>, size: usize) -> Pages {
        Pages {
            next: start,
            end,
            size,
            done: false,
        }
    }

    /// The next page, `None` once the range is walked.
    pub fn next_page(&mut self, state: &dyn KvRead) -> R<Option<Rows>> {
        if self.done {
            return Ok(None);
        }
        let rows = state.scan(&self.next, &self.end, self.size)?;
        let Some((last, _)) = rows.last() else {
            self.done = true;
            return Ok(None);
        };
        self.next = last.clone();
        self.next.push(0);
        Ok(Some(rows))
    }
}

/// Deletes every key in `[start, end)` (batches of rows, so any size works).
pub fn delete_range(state: &mut Overlay<'_>, start: &[u8], end: &[u8]) -> R<()> {
    loop {
        let rows = state.scan(start, end, 512)?;
        if rows.is_empty() {
            return Ok(());
        }
        for (k, _) in rows {
            state.delete(k);
        }
    }
}

pub fn key_u64(prefix: u8, a: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&a.to_be_bytes());
    k
}

pub fn key_u64_u64(prefix: u8, a: u64, b: u64) -> Vec<u8> {
    let mut k = key_u64(prefix, a);
    k.extend_from_slice(&b.to_be_bytes());
    k
}

pub fn key_u64_bytes(prefix: u8, a: u64, b: &[u8]) -> Vec<u8> {
    let mut k = key_u64(prefix, a);
    k.extend_from_slice(b);
    k
}

/// The exclusive end of every key starting with `prefix` + `a`.
pub fn end_u64(prefix: u8, a: u64) -> Vec<u8> {
    match a.checked_add(1) {
        Some(n) => key_u64(prefix, n),
        None => vec![prefix + 1],
    }
}

/// The suffix of `key` after `prefix` + 8 bytes, or a corruption error.
pub fn tail(key: &[u8]) -> &[u8] {
    key.get(9..).unwrap_or(&[])
}

pub fn u64_at(key: &[u8], at: usize) -> R<u64> {
    key.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Fail::corrupt(key, "key too short"))
}

// ------------------------------------------------------------------ load / store

pub fn decode<T: Message + Default>(key: &[u8], bytes: &[u8]) -> R<T> {
    T::decode(bytes).map_err(|e| Fail::corrupt(key, &e.to_string()))
}

pub fn get<T: Message + Default>(state: &dyn KvRead, key: &[u8]) -> R<Option<T>> {
    match state.get(key)? {
        Some(v) => decode(key, &v).map(Some),
        None => Ok(None),
    }
}

pub fn put<T: Message>(state: &mut Overlay<'_>, key: Vec<u8>, value: &T) {
    state.put(key, value.encode_to_vec());
}

pub fn counters(state: &dyn KvRead) -> R<Counters> {
    Ok(get(state, K_COUNTERS)?.unwrap_or(Counters {
        next_ino: kerfs_proto::ROOT_INO + 1,
        next_generation: 2,
        next_handle: 1,
        next_client: 1,
        inodes: 0,
        total_size: 0,
        next_chunk: 1,
        next_server: 1,
    }))
}

pub fn put_counters(state: &mut Overlay<'_>, c: &Counters) {
    put(state, K_COUNTERS.to_vec(), c);
}

/// An inode as the rules use it: attributes always present and of a known kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Inode {
    pub attr: Attr,
    pub parent: u64,
    pub target: Vec<u8>,
    pub next_seq: u64,
    pub open_count: u32,
}

impl Inode {
    pub fn kind(&self) -> FileKind {
        FileKind::try_from(self.attr.kind).unwrap_or(FileKind::Unknown)
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == FileKind::Directory
    }
    pub fn ino(&self) -> u64 {
        self.attr.ino
    }
}

pub fn load_inode(state: &dyn KvRead, ino: u64) -> R<Option<Inode>> {
    let key = key_u64(P_INODE, ino);
    let Some(rec) = get::<InodeRec>(state, &key)? else {
        return Ok(None);
    };
    let Some(attr) = rec.attr else {
        return Err(Fail::corrupt(&key, "inode record without attributes"));
    };
    match FileKind::try_from(attr.kind) {
        Ok(FileKind::Unknown) | Err(_) => {
            return Err(Fail::corrupt(&key, "inode record of unknown kind"))
        }
        Ok(_) => {}
    }
    if attr.ino != ino {
        return Err(Fail::corrupt(&key, "inode record for another inode number"));
    }
    Ok(Some(Inode {
        attr,
        parent: rec.parent,
        target: rec.target,
        next_seq: rec.next_seq,
        open_count: rec.open_count,
    }))
}

pub fn store_inode(state: &mut Overlay<'_>, inode: &Inode) {
    let rec = InodeRec {
        attr: Some(inode.attr),
        parent: inode.parent,
        target: inode.target.clone(),
        next_seq: inode.next_seq,
        open_count: inode.open_count,
    };
    put(state, key_u64(P_INODE, inode.attr.ino), &rec);
}

pub fn dirent_key(dir: u64, name: &[u8]) -> Vec<u8> {
    key_u64_bytes(P_DIRENT, dir, name)
}

pub fn cookie_key(dir: u64, seq: u64) -> Vec<u8> {
    key_u64_u64(P_COOKIE, dir, seq)
}

pub fn load_dirent(state: &dyn KvRead, dir: u64, name: &[u8]) -> R<Option<DirentRec>> {
    get(state, &dirent_key(dir, name))
}

/// Writes both indexes of one entry.
pub fn store_dirent(state: &mut Overlay<'_>, dir: u64, name: &[u8], d: &DirentRec) {
    put(state, dirent_key(dir, name), d);
    put(
        state,
        cookie_key(dir, d.seq),
        &CookieRec {
            name: name.to_vec(),
            ino: d.ino,
            kind: d.kind,
        },
    );
}

pub fn delete_dirent(state: &mut Overlay<'_>, dir: u64, name: &[u8], seq: u64) {
    state.delete(dirent_key(dir, name));
    state.delete(cookie_key(dir, seq));
}

/// Whether a directory has any entry (one row of its cookie index).
pub fn dir_is_empty(state: &dyn KvRead, dir: u64) -> R<bool> {
    Ok(state
        .scan(&key_u64(P_COOKIE, dir), &end_u64(P_COOKIE, dir), 1)?
        .is_empty())
}

pub fn ts_nanos(t: &Option<Timespec>) -> i128 {
    t.as_ref().map(|t| t.as_nanos()).unwrap_or(0)
}
