//! File handles: the data half of the client. Reads and writes file bytes on the chunk
//! servers, with write-behind buffering, read-ahead, write epochs and failover.
//!
//! # Model
//!
//! * **Open** fetches the file's layout, size and chunk table from meta (close-to-open: what
//!   another client closed before our open is visible).
//! * **Writes** land in per-chunk dirty extents (coalesced) and are flushed when more than
//!   [`DataConfig::flush_threshold`] bytes are dirty, on `fsync`, `truncate` and `close`. A
//!   flush writes every dirty chunk in parallel; each chunk's first flush in this handle starts
//!   a write epoch (`AllocateChunks`, then `SetVersion` on each current replica separately),
//!   later flushes reuse the epoch until a replica fails. A flush makes the bytes visible
//!   ([`Durability::Visible`]); `fsync` and the library's `close` also have every replica
//!   flush them to disk ([`Durability::Disk`]). Every flush ends with `CommitWrite` listing
//!   the servers that acknowledged, so meta's idea of the current replicas and of the size
//!   is never behind what was acknowledged to the caller.
//! * **Attribute changes** a mount makes through an open file can wait for that commit
//!   ([`FileHandle::defer_setattr`], see `deferred`).
//! * **Reads** see this handle's own writes: the bytes read from the servers are overlaid with
//!   the dirty extents and with extents being flushed (rather than flushing before a read, so
//!   read-modify-write patterns do not turn into many tiny syncs). Sequential reads prefetch
//!   the next [`DataConfig::readahead`] bytes in the background.
//! * **Failures**: a replica that fails a read (down, corrupt, stale, missing) is remembered
//!   as bad for this handle and the next one is used; EC chunks are reconstructed from any k
//!   shards. A replica that fails a write is left out of `servers_ok`, and the chunk's next
//!   flush starts a new epoch without it. A chunk no replica took is EIO (ENOSPC when the
//!   servers said disk full) — never acknowledged — and the error stays on the handle so that
//!   `fsync`/`close` report it too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound::{Excluded, Included};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use tracing::{debug, warn};

use kerfs_proto::{
    command, read_op, Attr, Caller, ChunkPlacement, ChunkSetVersionRequest, ChunkTruncateRequest,
    ChunkWriteHeader, ChunkWritten, DeferredSetAttr, FileChunk, FileKind, Layout, MakeNode, Reply,
    SetAttr, Timespec,
};

use crate::chunks::{ChunkPool, RpcError};
use crate::deferred;
use crate::ec::{Codec, BLOCK};
use crate::error::{ClientError, ClientResult};
use crate::meta::{check, MetaClient};

/// Tunables of the data path.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// Dirty bytes per handle that trigger a flush (write-behind bound).
    pub flush_threshold: usize,
    /// Bytes prefetched ahead of a sequential reader.
    pub readahead: usize,
    /// Chunks flushed or read at once per handle.
    pub parallel_chunks: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            flush_threshold: 16 * 1024 * 1024,
            readahead: 8 * 1024 * 1024,
            parallel_chunks: 8,
        }
    }
}

/// Bytes per read and write of [`FileHandle::copy_range`] and [`FileHandle::write_zeros`]:
/// several chunks' worth, so that one block keeps the chunk servers busy in parallel.
const COPY_BLOCK: u64 = 8 << 20;

/// Opens files; one per client process (shares the chunk-server connections).
#[derive(Clone)]
pub struct DataClient {
    meta: MetaClient,
    pool: Arc<ChunkPool>,
    config: DataConfig,
}

impl DataClient {
    pub fn new(meta: MetaClient) -> DataClient {
        DataClient::with_config(meta, DataConfig::default())
    }

    pub fn with_config(meta: MetaClient, config: DataConfig) -> DataClient {
        let pool = ChunkPool::new(meta.config().key.clone());
        DataClient { meta, pool, config }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// Opens an existing file (`flags`: O_ACCMODE bits, O_TRUNC).
    pub async fn open(&self, ino: u64, flags: u32) -> ClientResult<FileHandle> {
        let (_attr, handle) = self.meta.open(ino, flags).await?;
        self.attach(ino, handle).await
    }

    /// Creates (or, without `exclusive`, opens) `name` in `parent` and opens it read-write.
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        exclusive: bool,
    ) -> ClientResult<FileHandle> {
        let reply = self
            .meta
            .make_node_reply(MakeNode {
                parent,
                name: name.to_vec(),
                kind: FileKind::Regular as i32,
                mode,
                exclusive,
                open: true,
                open_flags: libc::O_RDWR as u32,
                ..Default::default()
            })
            .await?;
        let handle = reply.handle;
        match reply.attr {
            Some(a) if reply.layout.is_none() => self.attach(a.ino, handle).await,
            _ => self.attach_created(handle, reply),
        }
    }

    /// Wraps a handle already opened in meta (e.g. by the FUSE layer's create).
    pub async fn attach(&self, ino: u64, handle: u64) -> ClientResult<FileHandle> {
        let reply = match self
            .meta
            .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                ino,
                first_index: 0,
                count: 0,
            }))
            .await
            .and_then(check)
        {
            Ok(r) => r,
            Err(e) => {
                // Do not leak the meta handle when we cannot use it.
                let _ = self.meta.close(handle).await;
                return Err(e);
            }
        };
        self.handle_from(ino, handle, reply)
    }

    /// Wraps `handle` on a regular file that the command answered by `created` made and
    /// opened: a new file has no chunks, so the reply's layout is all the handle needs and no
    /// chunk table is read.
    pub fn attach_created(&self, handle: u64, created: Reply) -> ClientResult<FileHandle> {
        let Some(ino) = created.attr.as_ref().map(|a| a.ino) else {
            return Err(ClientError::Io {
                errno: libc::EIO,
                message: "a create reply without attributes".into(),
            });
        };
        self.handle_from(ino, handle, created)
    }

    /// A handle from a reply carrying the file's attributes, layout and (first) chunks.
    fn handle_from(&self, ino: u64, handle: u64, reply: Reply) -> ClientResult<FileHandle> {
        let layout = reply.layout.unwrap_or_default();
        let size = reply.attr.as_ref().map(|a| a.size).unwrap_or(0);
        let codec = if layout.ec_data > 0 {
            Some(Arc::new(
                Codec::new(layout.ec_data as usize, layout.ec_parity as usize).map_err(|e| {
                    ClientError::Io {
                        errno: libc::EIO,
                        message: format!("file {ino}: {e}"),
                    }
                })?,
            ))
        } else {
            None
        };
        let chunk_size = if layout.chunk_size == 0 {
            64 << 20
        } else {
            layout.chunk_size
        };
        let chunks = reply
            .chunks
            .into_iter()
            .map(|c| (c.index, sorted(c)))
            .collect();
        Ok(FileHandle {
            inner: Arc::new(Inner {
                meta: self.meta.clone(),
                pool: self.pool.clone(),
                config: self.config.clone(),
                ino,
                handle,
                layout,
                chunk_size,
                codec,
                state: Mutex::new(State {
                    size,
                    chunks,
                    attr: reply.attr,
                    ..Default::default()
                }),
                flush_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// EC placements in shard order (placement i must be shard i).
fn sorted(mut c: FileChunk) -> FileChunk {
    c.replicas.sort_by_key(|p| p.shard_index);
    c
}

/// An open file. Cheap to clone; every method takes `&self` and may run concurrently from
/// several tasks. Call [`FileHandle::close`]: dropping a handle discards unflushed data and
/// leaves the meta handle to expire with the client session.
#[derive(Clone)]
pub struct FileHandle {
    inner: Arc<Inner>,
}

struct Inner {
    meta: MetaClient,
    pool: Arc<ChunkPool>,
    config: DataConfig,
    ino: u64,
    handle: u64,
    layout: Layout,
    chunk_size: u64,
    codec: Option<Arc<Codec>>,
    state: Mutex<State>,
    /// One flush (or truncate) at a time per handle, so two flushes of the same chunk can
    /// never reorder on the servers.
    flush_lock: tokio::sync::Mutex<()>,
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<Vec<u8>>, ClientError>>>;

/// A background read of `[start, start + len)`, valid while `generation` is current.
struct Prefetch {
    start: u64,
    len: u64,
    generation: u64,
    fetch: Fetch,
}

#[derive(Default)]
struct State {
    /// The file size as this handle sees it (meta's at open, raised by our writes).
    size: u64,
    /// Chunk table from meta, updated by our commits.
    chunks: HashMap<u64, FileChunk>,
    /// Write epochs this handle holds.
    epochs: HashMap<u64, Epoch>,
    dirty: BTreeMap<u64, Extents>,
    dirty_bytes: usize,
    /// Snapshots being flushed, oldest first (reads overlay them until the flush is done).
    flushing: Vec<Arc<BTreeMap<u64, Extents>>>,
    /// (server id, chunk id) pairs that failed a read: not tried again by this handle.
    bad: HashSet<(u64, u64)>,
    /// A write-back failure, reported by every later fsync/close (data was lost).
    error: Option<ClientError>,
    /// Bumped by every mutation; prefetched data of an older generation is discarded.
    generation: u64,
    last_read_end: u64,
    prefetch: VecDeque<Prefetch>,
    closed: bool,
    /// A writer without CAP_FSETID changed the data: the next command that records a data
    /// change (commit, truncate) clears set-user-ID/set-group-ID with it.
    clear_set_id: bool,
    /// The file's attributes as meta last reported them to this handle (open, commit,
    /// truncate), with the deferred changes applied: what a deferred setattr answers.
    attr: Option<Attr>,
    /// Attribute changes answered here and sent with the next commit (see `deferred`).
    deferred: Vec<DeferredSetAttr>,
}

impl State {
    /// Meta reported the file's attributes: they are the handle's, with the changes
    /// deferred since (not in meta's answer) applied.
    fn note_attr(&mut self, mut a: Attr) {
        for set in self.deferred.iter().filter_map(|d| d.set.as_ref()) {
            deferred::apply(&mut a, set);
        }
        self.attr = Some(a);
    }
}

/// A write epoch on one chunk: the version we write and the members still in it.
#[derive(Clone)]
struct Epoch {
    version: u64,
    fresh: bool,
    /// Placements in shard order (EC) or chain order (replicated).
    members: Vec<ChunkPlacement>,
    alive: Vec<bool>,
    /// A member dropped out: the next flush of this chunk starts a new epoch.
    broken: bool,
    /// Something was written in this epoch (a fresh chunk exists on its servers).
    created: bool,
    /// Meta had no spare server for a lost replica (or the copy failed): stop asking in this
    /// epoch; background repair restores the copies after the commit.
    no_spare: bool,
    /// Bytes were written in this epoch without a disk flush on the replicas: the next
    /// `fsync` flushes them there (a new epoch's set-version flushes them too).
    unsynced: bool,
}

impl Epoch {
    fn servers_ok(&self) -> Vec<u64> {
        self.members
            .iter()
            .zip(&self.alive)
            .filter(|(_, a)| **a)
            .map(|(p, _)| p.server_id)
            .collect()
    }

    fn alive_count(&self) -> usize {
        self.alive.iter().filter(|a| **a).count()
    }

    fn drop_member(&mut self, i: usize) {
        self.alive[i] = false;
        self.broken = true;
    }
}

/// How far a flush of written bytes goes before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On the chunk servers and recorded in meta: every client reads it, and a kill of any
    /// process keeps it (close(2) on a mount).
    Visible,
    /// Also on every replica's disk (fsync(2), and what the library's `close` promises).
    Disk,
}

/// Non-overlapping dirty byte ranges of one chunk, keyed by chunk offset.
#[derive(Default, Clone, Debug)]
struct Extents(BTreeMap<u64, Vec<u8>>);

impl Extents {
    fn insert(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        let mut touching = Vec::new();
        if let Some((&s, v)) = self.0.range(..=off).next_back() {
            if s + v.len() as u64 >= off {
                touching.push(s);
            }
        }
        touching.extend(
            self.0
                .range((Excluded(off), Included(end)))
                .map(|(&s, _)| s),
        );
        let Some(&first) = touching.first() else {
            self.0.insert(off, data.to_vec());
            return;
        };
        if touching.len() == 1 && first <= off {
            // Overwrite or append inside one extent: grow it in place (amortized, so a
            // stream of small sequential writes does not copy the extent each time).
            if let Some(v) = self.0.get_mut(&first) {
                let rel = (off - first) as usize;
                if v.len() < rel + data.len() {
                    v.resize(rel + data.len(), 0);
                }
                v[rel..rel + data.len()].copy_from_slice(data);
                return;
            }
        }
        let start = first.min(off);
        let last_end = touching
            .iter()
            .map(|s| s + self.0.get(s).map_or(0, |v| v.len() as u64))
            .max()
            .unwrap_or(end);
        let new_end = end.max(last_end);
        let mut buf = vec![0u8; (new_end - start) as usize];
        for s in touching {
            if let Some(v) = self.0.remove(&s) {
                let r = (s - start) as usize;
                buf[r..r + v.len()].copy_from_slice(&v);
            }
        }
        let r = (off - start) as usize;
        buf[r..r + data.len()].copy_from_slice(data);
        self.0.insert(start, buf);
    }

    /// Copies the dirty bytes that fall in `[at, at + out.len())` (chunk offsets) into `out`.
    fn overlay(&self, at: u64, out: &mut [u8]) {
        let end = at + out.len() as u64;
        let from = self
            .0
            .range(..=at)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(at);
        for (&s, v) in self.0.range(from..end) {
            let e = s + v.len() as u64;
            let lo = s.max(at);
            let hi = e.min(end);
            if lo < hi {
                out[(lo - at) as usize..(hi - at) as usize]
                    .copy_from_slice(&v[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// Dirty bytes held.
    fn bytes(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    fn end(&self) -> u64 {
        self.0
            .iter()
            .next_back()
            .map_or(0, |(s, v)| s + v.len() as u64)
    }

    /// Drops everything at or past `len`.
    fn cut(&mut self, len: u64) {
        let keys: Vec<u64> = self.0.range(..).map(|(&s, _)| s).collect();
        for s in keys {
            if s >= len {
                self.0.remove(&s);
            } else if let Some(v) = self.0.get_mut(&s) {
                v.truncate((len - s).min(v.len() as u64) as usize);
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Critical sections are plain updates; a panic elsewhere cannot leave them half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn eio(message: String) -> ClientError {
    ClientError::Io {
        errno: libc::EIO,
        message,
    }
}

/// Where to read one chunk from: a version and the placements holding it.
struct Source {
    version: u64,
    members: Vec<ChunkPlacement>,
    usable: Vec<bool>,
    /// Fresh chunk of our epoch not written yet: nothing exists on the servers.
    empty: bool,
}

impl FileHandle {
    pub fn ino(&self) -> u64 {
        self.inner.ino
    }

    /// The meta handle id.
    pub fn handle(&self) -> u64 {
        self.inner.handle
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The size as this handle sees it (including its unflushed writes).
    pub fn size(&self) -> u64 {
        lock(&self.inner.state).size
    }

    /// Says that the data is being changed by a process without CAP_FSETID, for a handle
    /// shared by several callers (the mount's): the commit of those writes, or the truncate
    /// that follows, clears set-user-ID and set-group-ID in meta in the same command, as
    /// Linux does for local files. Until then [`FileHandle::clears_set_id`] says so.
    pub fn clear_set_id_on_commit(&self) {
        lock(&self.inner.state).clear_set_id = true;
    }

    /// Whether a change by an unprivileged writer is not committed yet (the mode meta
    /// reports still has set-user-ID/set-group-ID that the commit will clear).
    pub fn clears_set_id(&self) -> bool {
        lock(&self.inner.state).clear_set_id
    }

    /// Takes the pending [`FileHandle::clear_set_id_on_commit`] for the command about to
    /// be sent; `restore_set_id` gives it back if that command failed.
    fn take_clear_set_id(&self) -> bool {
        std::mem::take(&mut lock(&self.inner.state).clear_set_id)
    }

    fn restore_set_id(&self, taken: bool) {
        if taken {
            lock(&self.inner.state).clear_set_id = true;
        }
    }

    /// Takes a setattr of the file (by `caller`, on a mount that let the kernel check the
    /// caller's right to make it) to send with the next commit, if its outcome can be
    /// computed here; returns the attributes the file now has. `None`: send it yourself.
    pub fn defer_setattr(&self, caller: Option<Caller>, set: SetAttr) -> Option<Attr> {
        let mut st = lock(&self.inner.state);
        let size = st.size;
        let closed = st.closed;
        let attr = st.attr.as_mut().filter(|a| !closed && a.ino == set.ino)?;
        attr.size = size;
        if !deferred::deferrable(attr, &set) {
            return None;
        }
        deferred::apply(attr, &set);
        attr.ctime = Some(Timespec::now());
        let answer = *attr;
        st.deferred.push(deferred::entry(caller, set));
        Some(answer)
    }

    /// Whether attribute changes wait for the next commit: a change sent on its own must
    /// not overtake them (flush first).
    pub fn has_deferred(&self) -> bool {
        !lock(&self.inner.state).deferred.is_empty()
    }

    /// Applies the changes waiting for the next commit to `a`, the file's attributes as
    /// meta reports them (which does not know them yet).
    pub fn overlay_deferred(&self, a: &mut Attr) {
        for set in lock(&self.inner.state)
            .deferred
            .iter()
            .filter_map(|d| d.set.as_ref())
        {
            deferred::apply(a, set);
        }
    }

    fn check_open(&self) -> ClientResult<()> {
        if lock(&self.inner.state).closed {
            return Err(ClientError::Fs {
                errno: libc::EBADF,
                message: format!("file {}: handle already closed", self.inner.ino),
            });
        }
        Ok(())
    }

    /// Buffers `data` at `offset`; flushes when enough is dirty. An error here means a
    /// flush failed (possibly of earlier writes).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> ClientResult<()> {
        self.check_open()?;
        if data.is_empty() {
            return Ok(());
        }
        let cs = self.inner.chunk_size;
        let over = {
            let mut st = lock(&self.inner.state);
            let mut pos = 0usize;
            while pos < data.len() {
                let at = offset + pos as u64;
                let idx = at / cs;
                let in_chunk = at % cs;
                let n = ((cs - in_chunk) as usize).min(data.len() - pos);
                st.dirty
                    .entry(idx)
                    .or_default()
                    .insert(in_chunk, &data[pos..pos + n]);
                pos += n;
            }
            st.dirty_bytes += data.len();
            st.size = st.size.max(offset + data.len() as u64);
            deferred::forget_mtimes(&mut st.deferred);
            st.generation += 1;
            st.prefetch.clear();
            st.dirty_bytes >= self.inner.config.flush_threshold
        };
        if over {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset + len)`: fallocate's hole punching and range
    /// zeroing. The range reads back as zeros; no space is given back to the servers.
    pub async fn write_zeros(&self, offset: u64, len: u64) -> ClientResult<()> {
        let zeros = vec![0u8; len.min(COPY_BLOCK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_BLOCK) as usize;
            self.write_at(offset + done, &zeros[..n]).await?;
            done += n as u64;
        }
        Ok(())
    }

    /// Copies up to `len` bytes at `offset` of this file to `dst_offset` of `dst`
    /// (copy_file_range). The bytes are read and written here in large blocks, through the
    /// same buffers as any read and write (so either file's buffered writes are seen), and
    /// never pass through the kernel. Stops at this file's end; returns the bytes copied.
    /// The ranges must not overlap when `dst` is this file.
    pub async fn copy_range(
        &self,
        offset: u64,
        dst: &FileHandle,
        dst_offset: u64,
        len: u64,
    ) -> ClientResult<u64> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_BLOCK) as usize;
            let data = self.read_at(offset + done, n).await?;
            if data.is_empty() {
                break;
            }
            dst.write_at(dst_offset + done, &data).await?;
            done += data.len() as u64;
        }
        Ok(done)
    }

    /// Makes every write so far durable on the chunk servers and recorded in meta.
    pub async fn fsync(&self) -> ClientResult<()> {
        self.check_open()?;
        self.write_out(Durability::Disk).await?;
        self.sticky_error()
    }

    /// Makes every write so far visible to every client (on the chunk servers, recorded
    /// in meta) without waiting for the replicas' disks: what close(2) promises on a mount.
    /// A kill of any process keeps it; a power cut of the replicas before the next
    /// [`FileHandle::fsync`] may not.
    pub async fn publish(&self) -> ClientResult<()> {
        self.check_open()?;
        self.write_out(Durability::Visible).await?;
        self.sticky_error()
    }

    fn sticky_error(&self) -> ClientResult<()> {
        match &lock(&self.inner.state).error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Flushes, then closes the meta handle. The handle is unusable afterwards, even when
    /// this fails (the error says whether data was lost).
    pub async fn close(&self) -> ClientResult<()> {
        self.close_with(&[], Durability::Disk).await
    }

    /// [`FileHandle::close`] with the durability the caller needs, closing `others`
    /// (handles of the same meta session that the caller is done with, such as a mount's
    /// handle of the process that opened the file) in the same command.
    pub async fn close_with(&self, others: &[u64], durability: Durability) -> ClientResult<()> {
        self.check_open()?;
        let flushed = self.write_out_and_stop(durability).await;
        let closed = self.inner.meta.close_all(self.inner.handle, others).await;
        flushed?;
        closed
    }

    /// [`FileHandle::close_with`] without the Close: publishes what is written with the
    /// durability asked and stops using the handle, whose meta handle
    /// ([`FileHandle::handle_id`]) the caller closes (a mount gathers several into one
    /// command). The handle is done with even when the flush fails.
    pub async fn finish(&self, durability: Durability) -> ClientResult<()> {
        self.check_open()?;
        self.write_out_and_stop(durability).await
    }

    async fn write_out_and_stop(&self, durability: Durability) -> ClientResult<()> {
        let flushed = match durability {
            Durability::Disk => self.fsync().await,
            Durability::Visible => self.publish().await,
        };
        lock(&self.inner.state).closed = true;
        flushed
    }

    /// The meta handle this data handle writes through.
    pub fn handle_id(&self) -> u64 {
        self.inner.handle
    }

    /// Writes out every dirty extent (the flush of the write-behind buffer), visible to
    /// every client, not waiting for disks.
    pub async fn flush(&self) -> ClientResult<()> {
        self.write_out(Durability::Visible).await
    }

    async fn write_out(&self, durability: Durability) -> ClientResult<()> {
        let _serial = self.inner.flush_lock.lock().await;
        let snapshot = {
            let mut st = lock(&self.inner.state);
            if durability == Durability::Disk {
                // Chunks written earlier without a disk flush get an empty write that
                // flushes them on every replica, through the same chain as a write.
                let unsynced: Vec<u64> = st
                    .epochs
                    .iter()
                    .filter(|(i, e)| e.unsynced && !st.dirty.contains_key(i))
                    .map(|(&i, _)| i)
                    .collect();
                for i in unsynced {
                    st.dirty.insert(i, Extents::default());
                }
            }
            if st.dirty.is_empty() {
                None
            } else {
                st.dirty_bytes = 0;
                let snap = Arc::new(std::mem::take(&mut st.dirty));
                st.flushing.push(snap.clone());
                Some(snap)
            }
        };
        let Some(snapshot) = snapshot else {
            let attrs_only = !lock(&self.inner.state).deferred.is_empty();
            if attrs_only {
                return self.commit(0, Vec::new()).await;
            }
            return Ok(());
        };
        let result = self.flush_snapshot(&snapshot, durability).await;
        let mut st = lock(&self.inner.state);
        st.flushing.retain(|s| !Arc::ptr_eq(s, &snapshot));
        // Read-ahead started before this point may have read the servers before this data
        // reached them, and the overlay no longer holds it: such prefetched bytes are stale.
        st.generation += 1;
        st.prefetch.clear();
        if let Err(e) = &result {
            st.error = Some(e.clone());
        }
        result
    }

    async fn flush_snapshot(
        &self,
        snap: &BTreeMap<u64, Extents>,
        durability: Durability,
    ) -> ClientResult<()> {
        let indexes: Vec<u64> = snap.keys().copied().collect();
        self.ensure_epochs(&indexes).await?;
        let cs = self.inner.chunk_size;
        // The per-chunk futures are collected (boxed) before they are streamed: with the
        // closure inside the stream type, rustc cannot prove the flush future is Send
        // (rust-lang/rust#64552), and then no caller could hand a file operation to
        // `tokio::spawn`.
        let jobs: Vec<futures::future::BoxFuture<'_, (u64, ClientResult<u64>)>> = snap
            .iter()
            .map(|(&idx, ext)| {
                Box::pin(async move { (idx, self.write_chunk(idx, ext, durability).await) })
                    as futures::future::BoxFuture<'_, _>
            })
            .collect();
        let results: Vec<(u64, ClientResult<u64>)> = futures::stream::iter(jobs)
            .buffer_unordered(self.inner.config.parallel_chunks)
            .collect()
            .await;
        let mut written = Vec::new();
        let mut size = 0u64;
        let mut first_err = None;
        for (idx, r) in results {
            match r {
                Ok(end) => {
                    size = size.max(idx * cs + end);
                    let st = lock(&self.inner.state);
                    if let Some(ep) = st.epochs.get(&idx) {
                        written.push(ChunkWritten {
                            index: idx,
                            version: ep.version,
                            servers_ok: ep.servers_ok(),
                        });
                    }
                }
                Err(e) => {
                    warn!(ino = self.inner.ino, chunk = idx, error = %e, "chunk write failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        if !written.is_empty() {
            self.commit(size, written).await?;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Records the chunks' new versions and holders in meta and raises the size, with the
    /// deferred attribute changes.
    async fn commit(&self, size: u64, chunks: Vec<ChunkWritten>) -> ClientResult<()> {
        let clear_set_id = self.take_clear_set_id();
        let then_set = std::mem::take(&mut lock(&self.inner.state).deferred);
        let send = |then_set| {
            self.inner
                .meta
                .write(command::Op::CommitWrite(kerfs_proto::CommitWrite {
                    handle: self.inner.handle,
                    size,
                    chunks: chunks.clone(),
                    clear_set_id,
                    then_set,
                }))
        };
        let mut sent = send(then_set.clone()).await.and_then(check);
        let mut attrs_failed = None;
        if sent.is_err() && !then_set.is_empty() {
            // The attribute changes may be what meta refused (another mount changed the
            // owner meanwhile): the data goes in without them, and their error is the
            // flush's, reported to close(2).
            attrs_failed = sent.as_ref().err().cloned();
            sent = send(Vec::new()).await.and_then(check);
        }
        let reply = sent.inspect_err(|_| self.restore_set_id(clear_set_id))?;
        let mut guard = lock(&self.inner.state);
        let st = &mut *guard;
        if let Some(a) = reply.attr {
            st.size = st.size.max(a.size);
            st.note_attr(a);
        }
        for c in chunks {
            if let Some(ep) = st.epochs.get(&c.index) {
                let mut members = ep.members.clone();
                for (p, a) in members.iter_mut().zip(&ep.alive) {
                    p.current = *a;
                }
                st.chunks.insert(
                    c.index,
                    FileChunk {
                        index: c.index,
                        version: ep.version,
                        replicas: members,
                        fresh: false,
                    },
                );
            }
        }
        match attrs_failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts a write epoch on every chunk of `indexes` that has none (or a broken one).
    async fn ensure_epochs(&self, indexes: &[u64]) -> ClientResult<()> {
        let need: Vec<u64> = {
            let st = lock(&self.inner.state);
            indexes
                .iter()
                .copied()
                .filter(|i| st.epochs.get(i).is_none_or(|e| e.broken))
                .collect()
        };
        if need.is_empty() {
            return Ok(());
        }
        let reply = check(
            self.inner
                .meta
                .write(command::Op::AllocateChunks(kerfs_proto::AllocateChunks {
                    handle: self.inner.handle,
                    indexes: need.clone(),
                }))
                .await?,
        )?;
        let ino = self.inner.ino;
        let pool = &self.inner.pool;
        let epochs = futures::future::join_all(reply.chunks.into_iter().map(|c| async move {
            let c = sorted(c);
            let members = c.replicas.clone();
            let mut alive: Vec<bool> = if c.fresh {
                vec![true; members.len()]
            } else {
                members.iter().map(|p| p.current).collect()
            };
            if !c.fresh {
                // Each replica separately: one stale or dead replica must not stop the bump
                // on the others; those that fail are left out of the epoch.
                let bumps = members.iter().zip(alive.clone()).map(|(p, cur)| async move {
                    if !cur {
                        return false;
                    }
                    let req = ChunkSetVersionRequest {
                        chunk_id: p.chunk_id,
                        from_version: c.version.saturating_sub(1),
                        version: c.version,
                        create: false,
                        shard_index: p.shard_index,
                        chain: vec![],
                    };
                    match pool.set_version(&p.address, req).await {
                        Ok(r) if r.all_ok => true,
                        Ok(r) => {
                            warn!(ino, chunk = c.index, server = %p.address, replies = ?r.replicas, "set-version refused");
                            false
                        }
                        Err(e) => {
                            warn!(ino, chunk = c.index, server = %p.address, error = %e, "set-version failed; replica left out of the epoch");
                            false
                        }
                    }
                });
                alive = futures::future::join_all(bumps).await;
            }
            let broken = alive.iter().zip(&members).any(|(a, p)| !a && (c.fresh || p.current));
            Epoch {
                version: c.version,
                fresh: c.fresh,
                members,
                alive,
                broken,
                created: false,
                no_spare: false,
                unsynced: false,
            }
            .with_index(c.index)
        }))
        .await;
        let mut st = lock(&self.inner.state);
        for (idx, ep) in epochs {
            debug!(
                ino,
                chunk = idx,
                version = ep.version,
                fresh = ep.fresh,
                alive = ep.alive_count(),
                "write epoch"
            );
            st.epochs.insert(idx, ep);
        }
        for i in &need {
            if !st.epochs.contains_key(i) {
                return Err(eio(format!(
                    "file {ino}: the metadata service allocated no placement for chunk {i}; check `kerfsctl` for live chunk servers"
                )));
            }
        }
        Ok(())
    }

    fn epoch(&self, idx: u64) -> ClientResult<Epoch> {
        lock(&self.inner.state)
            .epochs
            .get(&idx)
            .cloned()
            .ok_or_else(|| {
                eio(format!(
                    "file {}: chunk {idx} has no write epoch",
                    self.inner.ino
                ))
            })
    }

    /// Records the outcome of a member (by index) in the handle's epoch.
    fn update_epoch(&self, idx: u64, f: impl FnOnce(&mut Epoch)) {
        if let Some(ep) = lock(&self.inner.state).epochs.get_mut(&idx) {
            f(ep)
        }
    }

    /// Writes one chunk's dirty extents; returns the chunk's end offset written. EC shards
    /// are always written with a disk flush (a stripe's read-modify-write must not mix
    /// flushed and unflushed shards).
    async fn write_chunk(
        &self,
        idx: u64,
        ext: &Extents,
        durability: Durability,
    ) -> ClientResult<u64> {
        if self.inner.codec.is_some() {
            self.write_chunk_ec(idx, ext).await?;
        } else if ext.0.is_empty() {
            // Nothing new: only the flush of what earlier writes left unflushed.
            self.write_replicated(idx, 0, Bytes::new(), durability)
                .await?;
        } else {
            for (&off, data) in &ext.0 {
                self.write_replicated(idx, off, Bytes::copy_from_slice(data), durability)
                    .await?;
            }
        }
        Ok(ext.end())
    }

    /// One extent to a replicated chunk: first live member, the others as its chain; if the
    /// first fails, the next live member becomes first.
    async fn write_replicated(
        &self,
        idx: u64,
        off: u64,
        data: Bytes,
        durability: Durability,
    ) -> ClientResult<()> {
        let sync = durability == Durability::Disk;
        let ino = self.inner.ino;
        let mut failures = Vec::new();
        let mut no_space = false;
        loop {
            let ep = self.epoch(idx)?;
            let live: Vec<usize> = (0..ep.members.len()).filter(|&i| ep.alive[i]).collect();
            let Some(&first) = live.first() else {
                return Err(ClientError::Io {
                    errno: if no_space { libc::ENOSPC } else { libc::EIO },
                    message: format!(
                        "file {ino}: chunk {idx} (offset {off}, {} bytes): no replica took the write ({}); the data is not stored. Check the chunk servers (`kerfsctl`) and their disks",
                        data.len(),
                        failures.join("; ")
                    ),
                });
            };
            let p = &ep.members[first];
            let header = ChunkWriteHeader {
                chunk_id: p.chunk_id,
                version: ep.version,
                offset: off,
                length: 0,
                chain: live[1..]
                    .iter()
                    .map(|&i| ep.members[i].address.clone())
                    .collect(),
                sync,
                create: ep.fresh,
                shard_index: 0,
            };
            match self
                .inner
                .pool
                .write(&p.address, header, data.clone())
                .await
            {
                Ok(reply) => {
                    self.update_epoch(idx, |e| {
                        e.created = true;
                        // A flushed write also flushed what came before it on the chunk.
                        e.unsynced = !sync;
                        for (n, &i) in live.iter().enumerate() {
                            let ok = reply.replicas.get(n).is_some_and(|r| r.ok);
                            if !ok {
                                e.drop_member(i);
                            }
                        }
                    });
                    if !reply.all_ok {
                        warn!(ino, chunk = idx, replicas = ?reply.replicas, "chain write incomplete; failed replicas leave the epoch");
                    }
                    let ep = self.epoch(idx)?;
                    if ep.alive_count() == 0 {
                        failures.push(format!(
                            "{}: chain reply without a successful replica",
                            p.address
                        ));
                        continue;
                    }
                    if ep.alive_count() < ep.members.len() && !ep.no_spare {
                        self.replace_lost(idx).await;
                    }
                    return Ok(());
                }
                Err(e) => {
                    if e.is_auth() {
                        return Err(ClientError::Auth(format!(
                            "chunk server {}: {}",
                            p.address, e.message
                        )));
                    }
                    no_space |= e.is_no_space();
                    warn!(ino, chunk = idx, server = %p.address, error = %e, "write to first replica failed; trying the next");
                    failures.push(format!("{}: {e}", p.address));
                    self.update_epoch(idx, |ep| ep.drop_member(first));
                }
            }
        }
    }

    /// Puts a new server in place of every replica that dropped out of this replicated
    /// chunk's epoch, before the write is acknowledged: meta picks the server (placement
    /// rules, failure domains), this handle copies the chunk there from a live member at the
    /// epoch's version, and the member rejoins the epoch, so the commit names R servers.
    /// Without a spare server the write goes on with fewer copies (logged) and meta's
    /// background repair restores them.
    async fn replace_lost(&self, idx: u64) {
        let ino = self.inner.ino;
        loop {
            let Ok(ep) = self.epoch(idx) else { return };
            let Some(lost) = (0..ep.members.len()).find(|&i| !ep.alive[i]) else {
                return;
            };
            let Some(src) = (0..ep.members.len()).find(|&i| ep.alive[i]) else {
                return;
            };
            let failed = ep.members[lost].clone();
            let give_up = |why: String| {
                warn!(ino, chunk = idx, server = %failed.address, why = %why, "lost replica not replaced before the acknowledgement; background repair will restore the copy");
                self.update_epoch(idx, |e| e.no_spare = true);
            };
            let reply = self
                .inner
                .meta
                .write(command::Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
                    handle: self.inner.handle,
                    index: idx,
                    version: ep.version,
                    server_id: failed.server_id,
                }))
                .await
                .and_then(check);
            let new = match reply {
                Ok(r) => r.chunks.into_iter().find(|c| c.index == idx).and_then(|c| {
                    // The placement of the same shard on a server no other member uses
                    // (possibly the failed one's own, to be rewritten in place).
                    c.replicas.into_iter().find(|p| {
                        p.shard_index == failed.shard_index
                            && !ep
                                .members
                                .iter()
                                .enumerate()
                                .any(|(i, m)| i != lost && m.server_id == p.server_id)
                    })
                }),
                Err(e) => {
                    give_up(e.to_string());
                    return;
                }
            };
            let Some(new) = new else {
                give_up("meta's answer names no new placement".into());
                return;
            };
            if let Err(e) = self.copy_replica(&ep.members[src], &new, ep.version).await {
                give_up(format!("copy to {} failed: {e}", new.address));
                return;
            }
            debug!(ino, chunk = idx, from = %failed.address, to = %new.address, "replica replaced");
            self.update_epoch(idx, |e| {
                e.members[lost] = new;
                e.alive[lost] = true;
                if e.alive.iter().all(|a| *a) {
                    e.broken = false;
                }
            });
        }
    }

    /// Copies chunk `from` (at `version`) to the new placement `to`, which it creates.
    async fn copy_replica(
        &self,
        from: &ChunkPlacement,
        to: &ChunkPlacement,
        version: u64,
    ) -> Result<(), RpcError> {
        const STEP: u64 = 8 << 20;
        let pool = &self.inner.pool;
        let info = pool.stat(&from.address, from.chunk_id).await?;
        if info.version != version {
            return Err(RpcError {
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "the source holds version {}, the epoch is at {version}",
                    info.version
                ),
            });
        }
        // Meta never hands out a server that holds a current copy: anything it has under
        // this id is an old leftover, which must not mix with the copy.
        pool.delete(&to.address, to.chunk_id, 0).await?;
        let mut pos = 0u64;
        loop {
            let n = (info.length - pos).min(STEP);
            let data = pool
                .read(&from.address, from.chunk_id, version, pos, n as usize)
                .await?;
            let header = ChunkWriteHeader {
                chunk_id: to.chunk_id,
                version,
                offset: pos,
                length: 0,
                chain: vec![],
                sync: true,
                create: pos == 0,
                shard_index: to.shard_index,
            };
            let reply = pool.write(&to.address, header, Bytes::from(data)).await?;
            if !reply.all_ok {
                return Err(RpcError {
                    code: tonic::Code::Internal,
                    message: format!("write refused: {:?}", reply.replicas),
                });
            }
            pos += n;
            if pos >= info.length {
                return Ok(());
            }
        }
    }

    /// Writes the stripes an EC chunk's dirty extents touch (read-modify-write for partial
    /// stripes), all shards in parallel.
    async fn write_chunk_ec(&self, idx: u64, ext: &Extents) -> ClientResult<()> {
        let Some(codec) = self.inner.codec.clone() else {
            return Ok(());
        };
        let sb = codec.stripe_bytes() as u64;
        let cs = self.inner.chunk_size;
        // Stripes touched, with how many bytes of each the extents cover.
        let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
        for (&s, v) in &ext.0 {
            let e = s + v.len() as u64;
            let mut j = s / sb;
            while j * sb < e {
                let lo = s.max(j * sb);
                let hi = e.min((j + 1) * sb);
                *covered.entry(j).or_default() += hi - lo;
                j += 1;
            }
        }
        // Maximal runs of consecutive touched stripes, one write per shard per run.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &j in covered.keys() {
            match runs.last_mut() {
                Some((_, end)) if *end == j => *end = j + 1,
                _ => runs.push((j, j + 1)),
            }
        }
        for (j0, j1) in runs {
            let mut buf = vec![0u8; ((j1 - j0) * sb) as usize];
            for j in j0..j1 {
                // Bytes of this stripe that can hold data (the last stripe of a chunk whose
                // size is not a stripe multiple is partly outside the chunk: always zero).
                let span = (cs.min((j + 1) * sb)).saturating_sub(j * sb);
                if covered.get(&j).copied().unwrap_or(0) < span {
                    let old = self.read_chunk(idx, j * sb, sb as usize, true).await?;
                    let r = ((j - j0) * sb) as usize;
                    buf[r..r + sb as usize].copy_from_slice(&old);
                }
            }
            ext.overlay(j0 * sb, &mut buf);
            self.write_stripes(idx, j0, &buf).await?;
        }
        Ok(())
    }

    /// Encodes whole stripes starting at stripe `j0` and writes every live shard.
    async fn write_stripes(&self, idx: u64, j0: u64, data: &[u8]) -> ClientResult<()> {
        let Some(codec) = self.inner.codec.clone() else {
            return Ok(());
        };
        let ino = self.inner.ino;
        let shards = {
            let data = data.to_vec();
            let c = codec.clone();
            tokio::task::spawn_blocking(move || c.encode(&data))
                .await
                .map_err(|e| eio(format!("file {ino}: encoder task failed: {e}")))?
                .map_err(|e| eio(format!("file {ino}: chunk {idx}: {e}")))?
        };
        let ep = self.epoch(idx)?;
        let pool = &self.inner.pool;
        let writes = shards.into_iter().enumerate().map(|(i, shard)| {
            let p = ep.members.get(i).cloned();
            let live = ep.alive.get(i).copied().unwrap_or(false);
            let (version, fresh) = (ep.version, ep.fresh);
            async move {
                let p = match p {
                    Some(p) if live => p,
                    _ => return (i, Err(None)),
                };
                let header = ChunkWriteHeader {
                    chunk_id: p.chunk_id,
                    version,
                    offset: j0 * BLOCK as u64,
                    length: 0,
                    chain: vec![],
                    sync: true,
                    create: fresh,
                    shard_index: i as u32,
                };
                match pool.write(&p.address, header, Bytes::from(shard)).await {
                    Ok(r) if r.all_ok => (i, Ok(())),
                    Ok(r) => (i, Err(Some(format!("{}: {:?}", p.address, r.replicas)))),
                    Err(e) => (i, Err(Some(format!("{}: {e}", p.address)))),
                }
            }
        });
        let results = futures::future::join_all(writes).await;
        let mut failures = Vec::new();
        self.update_epoch(idx, |e| {
            e.created = true;
            for (i, r) in &results {
                if let Err(why) = r {
                    if e.alive.get(*i).copied().unwrap_or(false) {
                        e.drop_member(*i);
                    }
                    if let Some(why) = why {
                        failures.push(why.clone());
                    }
                }
            }
        });
        if !failures.is_empty() {
            warn!(ino, chunk = idx, failures = ?failures, "shard writes failed; shards leave the epoch");
        }
        let ep = self.epoch(idx)?;
        if ep.alive_count() < codec.k {
            return Err(eio(format!(
                "file {ino}: chunk {idx}: only {} of {} shards took the write, {} needed ({}); the data is not stored. Check the chunk servers (`kerfsctl`)",
                ep.alive_count(),
                codec.k + codec.m,
                codec.k,
                failures.join("; ")
            )));
        }
        Ok(())
    }

    // ------------------------------------------------------------------ reads

    /// Reads up to `len` bytes at `offset`: fewer at the end of the file, none past it.
    pub async fn read_at(&self, offset: u64, len: usize) -> ClientResult<Vec<u8>> {
        self.check_open()?;
        // The overlay is captured before the servers are read: whatever leaves it afterwards
        // was flushed before our server reads started... or after; either way it was written
        // before this read began, so it is in the overlay or on the servers.
        let (end, overlay, cached, sequential) = {
            let mut st = lock(&self.inner.state);
            let end = offset.saturating_add(len as u64).min(st.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            let mut overlay: Vec<Arc<BTreeMap<u64, Extents>>> = st.flushing.clone();
            if !st.dirty.is_empty() {
                overlay.push(Arc::new(st.dirty.clone()));
            }
            let g = st.generation;
            st.prefetch
                .retain(|p| p.generation == g && p.start + p.len > offset);
            let cached = st
                .prefetch
                .iter()
                .find(|p| p.start <= offset && end <= p.start + p.len)
                .map(|p| (p.start, p.fetch.clone()));
            let sequential = st.last_read_end == offset || offset == 0;
            st.last_read_end = end;
            (end, overlay, cached, sequential)
        };
        if sequential {
            self.start_readahead(end);
        }
        let mut out = match cached {
            Some((start, fetch)) => match fetch.await {
                Ok(buf) => buf[(offset - start) as usize..(end - start) as usize].to_vec(),
                Err(_) => self.fetch_range(offset, end).await?,
            },
            None => self.fetch_range(offset, end).await?,
        };
        apply_overlay(&overlay, self.inner.chunk_size, offset, &mut out);
        Ok(out)
    }

    /// Keeps about two read-ahead windows in flight past `end`.
    fn start_readahead(&self, end: u64) {
        let window = self.inner.config.readahead as u64;
        if window == 0 {
            return;
        }
        let mut st = lock(&self.inner.state);
        let mut frontier = st.prefetch.back().map_or(end, |p| p.start + p.len).max(end);
        while frontier < st.size && frontier < end + 2 * window && st.prefetch.len() < 3 {
            let stop = (frontier + window).min(st.size);
            let this = self.clone();
            let start = frontier;
            let task =
                tokio::spawn(async move { this.fetch_range(start, stop).await.map(Arc::new) });
            let ino = self.inner.ino;
            let fetch = async move {
                task.await
                    .map_err(|e| eio(format!("file {ino}: read-ahead task failed: {e}")))?
            }
            .boxed()
            .shared();
            let generation = st.generation;
            st.prefetch.push_back(Prefetch {
                start,
                len: stop - start,
                generation,
                fetch,
            });
            frontier = stop;
        }
    }

    /// Reads `[offset, end)` of the file from the servers (no overlay), chunks in parallel.
    async fn fetch_range(&self, offset: u64, end: u64) -> ClientResult<Vec<u8>> {
        let cs = self.inner.chunk_size;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let stop = end.min((idx + 1) * cs);
            pieces.push((idx, pos % cs, (stop - pos) as usize));
            pos = stop;
        }
        let parts: Vec<ClientResult<Vec<u8>>> = futures::stream::iter(
            pieces
                .into_iter()
                .map(|(idx, at, n)| self.read_chunk(idx, at, n, false)),
        )
        .buffered(self.inner.config.parallel_chunks)
        .collect()
        .await;
        if parts.len() == 1 {
            // A read inside one chunk: its buffer is the answer, no second copy.
            return parts.into_iter().next().unwrap_or_else(|| Ok(Vec::new()));
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out)
    }

    /// Where chunk `idx` can be read: our epoch if we hold one, else the chunk table.
    fn source(&self, idx: u64) -> Option<Source> {
        let st = lock(&self.inner.state);
        if let Some(ep) = st.epochs.get(&idx) {
            let usable = ep
                .members
                .iter()
                .zip(&ep.alive)
                .map(|(p, a)| *a && !st.bad.contains(&(p.server_id, p.chunk_id)))
                .collect();
            return Some(Source {
                version: ep.version,
                members: ep.members.clone(),
                usable,
                empty: ep.fresh && !ep.created,
            });
        }
        let c = st.chunks.get(&idx)?;
        Some(Source {
            version: c.version,
            members: c.replicas.clone(),
            usable: c
                .replicas
                .iter()
                .map(|p| p.current && !st.bad.contains(&(p.server_id, p.chunk_id)))
                .collect(),
            empty: false,
        })
    }

    fn mark_bad(&self, p: &ChunkPlacement, idx: u64, e: &RpcError) {
        warn!(ino = self.inner.ino, chunk = idx, server = %p.address, chunk_id = p.chunk_id, error = %e, "replica unreadable; not used again by this handle");
        lock(&self.inner.state)
            .bad
            .insert((p.server_id, p.chunk_id));
    }

    /// Asks meta again for chunk `idx` (after a server said our version is old).
    async fn refresh_chunk(&self, idx: u64) -> ClientResult<()> {
        let reply = check(
            self.inner
                .meta
                .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                    ino: self.inner.ino,
                    first_index: idx,
                    count: 1,
                }))
                .await?,
        )?;
        let mut st = lock(&self.inner.state);
        if st.epochs.contains_key(&idx) {
            return Ok(()); // our own epoch is authoritative for us
        }
        match reply.chunks.into_iter().find(|c| c.index == idx) {
            Some(c) => st.chunks.insert(idx, sorted(c)),
            None => st.chunks.remove(&idx),
        };
        Ok(())
    }

    /// Reads `n` bytes at chunk offset `at` of chunk `idx` (zeros where nothing is stored).
    /// `for_rmw`: called by the EC writer, which holds the flush lock.
    async fn read_chunk(
        &self,
        idx: u64,
        at: u64,
        n: usize,
        for_rmw: bool,
    ) -> ClientResult<Vec<u8>> {
        let mut refreshed = false;
        loop {
            let Some(src) = self.source(idx) else {
                return Ok(vec![0u8; n]);
            };
            if src.empty {
                return Ok(vec![0u8; n]);
            }
            let r = if self.inner.codec.is_some() {
                self.read_ec(idx, &src, at, n).await
            } else {
                self.read_replicated(idx, &src, at, n).await
            };
            match r {
                Ok(v) => return Ok(v),
                Err((e, newer)) => {
                    if newer && !refreshed && !for_rmw {
                        refreshed = true;
                        self.refresh_chunk(idx).await?;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn read_replicated(
        &self,
        idx: u64,
        src: &Source,
        at: u64,
        n: usize,
    ) -> Result<Vec<u8>, (ClientError, bool)> {
        let count = src.members.len();
        let mut failures = Vec::new();
        let mut newer = false;
        // Start at a different replica per chunk so a large read spreads over servers.
        for k in 0..count {
            let i = (idx as usize + k) % count.max(1);
            if !src.usable[i] {
                continue;
            }
            let p = &src.members[i];
            match self
                .inner
                .pool
                .read(&p.address, p.chunk_id, src.version, at, n)
                .await
            {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if e.is_auth() {
                        return Err((
                            ClientError::Auth(format!("chunk server {}: {}", p.address, e.message)),
                            false,
                        ));
                    }
                    if e.is_newer() {
                        newer = true;
                    } else {
                        self.mark_bad(p, idx, &e);
                    }
                    failures.push(format!("{}: {e}", p.address));
                }
            }
        }
        Err((
            eio(format!(
                "file {}: chunk {idx} version {}: no replica could be read ({}); check the chunk servers (`kerfsctl`), the data may need repair",
                self.inner.ino,
                src.version,
                if failures.is_empty() { "no current replica known".to_string() } else { failures.join("; ") }
            )),
            newer,
        ))
    }

    async fn read_ec(
        &self,
        idx: u64,
        src: &Source,
        at: u64,
        n: usize,
    ) -> Result<Vec<u8>, (ClientError, bool)> {
        let Some(codec) = self.inner.codec.clone() else {
            return Err((eio("no codec".into()), false));
        };
        let sb = codec.stripe_bytes() as u64;
        let j0 = at / sb;
        let j1 = (at + n as u64).div_ceil(sb);
        let stripes = (j1 - j0) as usize;
        let (off, len) = (j0 * BLOCK as u64, stripes * BLOCK);
        let total = codec.k + codec.m;
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut failures = Vec::new();
        let mut newer = false;
        // Data shards first; parity only when some data shard fails.
        for phase in 0..2 {
            let wanted: Vec<usize> = if phase == 0 {
                (0..codec.k).collect()
            } else {
                let have = shards.iter().filter(|s| s.is_some()).count();
                if have == codec.k {
                    break;
                }
                (codec.k..total).collect()
            };
            let reads = wanted.into_iter().map(|i| {
                let p = src.members.get(i).cloned();
                let usable = src.usable.get(i).copied().unwrap_or(false);
                let pool = &self.inner.pool;
                let version = src.version;
                async move {
                    match p {
                        Some(p) if usable => {
                            let r = pool.read(&p.address, p.chunk_id, version, off, len).await;
                            (i, Some(p), r)
                        }
                        _ => (
                            i,
                            None,
                            Err(RpcError {
                                code: tonic::Code::Unavailable,
                                message: "no current shard".into(),
                            }),
                        ),
                    }
                }
            });
            for (i, p, r) in futures::future::join_all(reads).await {
                match r {
                    Ok(v) => shards[i] = Some(v),
                    Err(e) => {
                        if let Some(p) = p {
                            if e.is_newer() {
                                newer = true;
                            } else {
                                self.mark_bad(&p, idx, &e);
                            }
                            failures.push(format!("shard {i} on {}: {e}", p.address));
                        }
                    }
                }
            }
        }
        let data = tokio::task::spawn_blocking(move || codec.decode(&shards, stripes))
            .await
            .map_err(|e| (eio(format!("decoder task failed: {e}")), false))?
            .map_err(|e| {
                (
                    eio(format!(
                        "file {}: chunk {idx} version {}: {e} ({}); check the chunk servers (`kerfsctl`)",
                        self.inner.ino,
                        src.version,
                        failures.join("; ")
                    )),
                    newer,
                )
            })?;
        let r = (at - j0 * sb) as usize;
        Ok(data[r..r + n].to_vec())
    }

    // ------------------------------------------------------------------ truncate

    /// Sets the file size: data past it is dropped, a later extension reads zeros. Returns
    /// the file's attributes as meta has them after the cut.
    pub async fn truncate(&self, size: u64) -> ClientResult<Attr> {
        self.check_open()?;
        // Buffered writes are not flushed first: those past the new end are dropped, and the
        // others stay buffered and reach the servers after the cut below, in the same write
        // epoch, which is the order they need (a flush here cost a round of chunk writes and
        // a commit per truncate). The flush lock keeps any flush from overlapping the cut.
        let _serial = self.inner.flush_lock.lock().await;
        let cs = self.inner.chunk_size;
        let old = {
            let mut st = lock(&self.inner.state);
            st.generation += 1;
            st.prefetch.clear();
            let keep = size.div_ceil(cs);
            st.dirty.retain(|&i, _| i < keep);
            if let Some(e) = st.dirty.get_mut(&(size / cs)) {
                e.cut(size % cs);
            }
            st.dirty.retain(|_, e| !e.0.is_empty());
            st.dirty_bytes = st.dirty.values().map(Extents::bytes).sum();
            st.size
        };
        // The chunk holding the lower of the two ends must lose what lies past that end, so
        // that bytes past the size never reappear (truncate down, or leftovers past the old
        // size when extending).
        let boundary = old.min(size);
        let idx = boundary / cs;
        let has_chunk = {
            let st = lock(&self.inner.state);
            st.chunks.contains_key(&idx) || st.epochs.contains_key(&idx)
        };
        if boundary % cs != 0 && has_chunk {
            self.truncate_chunk(idx, boundary % cs).await?;
        }
        let clear_set_id = self.take_clear_set_id();
        let attr = self
            .inner
            .meta
            .setattr(kerfs_proto::SetAttr {
                ino: self.inner.ino,
                size: Some(size),
                handle: Some(self.inner.handle),
                clear_set_id,
                ..Default::default()
            })
            .await
            .inspect_err(|_| self.restore_set_id(clear_set_id))?;
        debug!(
            ino = self.inner.ino,
            size,
            meta_size = attr.size,
            "truncated"
        );
        let mut st = lock(&self.inner.state);
        st.size = size;
        st.note_attr(attr);
        let keep = size.div_ceil(cs);
        // Meta dropped the chunks past the end: forget them (and our epochs on them).
        st.chunks.retain(|&i, _| i < keep);
        st.epochs.retain(|&i, _| i < keep);
        Ok(attr)
    }

    /// Cuts chunk `idx` to `len` bytes on its servers in a write epoch, and commits.
    async fn truncate_chunk(&self, idx: u64, len: u64) -> ClientResult<()> {
        self.ensure_epochs(&[idx]).await?;
        let ino = self.inner.ino;
        if let Some(codec) = self.inner.codec.clone() {
            let sb = codec.stripe_bytes() as u64;
            let j = len / sb;
            let within = len % sb;
            if within != 0 {
                // Zero the tail of the boundary stripe and re-encode it.
                let mut stripe = self.read_chunk(idx, j * sb, sb as usize, true).await?;
                stripe[within as usize..].fill(0);
                self.write_stripes(idx, j, &stripe).await?;
            }
            let shard_len = len.div_ceil(sb) * BLOCK as u64;
            let ep = self.epoch(idx)?;
            let cuts = ep.members.iter().enumerate().map(|(i, p)| {
                let live = ep.alive[i];
                let pool = &self.inner.pool;
                let req = ChunkTruncateRequest {
                    chunk_id: p.chunk_id,
                    version: ep.version,
                    length: shard_len,
                    chain: vec![],
                    sync: true,
                };
                async move {
                    if !live {
                        return (i, true);
                    }
                    match pool.truncate(&p.address, req).await {
                        Ok(r) => (i, r.all_ok),
                        Err(e) => {
                            // A fresh shard never written does not exist: nothing to cut.
                            (i, e.code == tonic::Code::NotFound && ep.fresh)
                        }
                    }
                }
            });
            let results = futures::future::join_all(cuts).await;
            self.update_epoch(idx, |e| {
                for (i, ok) in results {
                    if !ok {
                        e.drop_member(i);
                    }
                }
            });
            let ep = self.epoch(idx)?;
            if ep.alive_count() < codec.k {
                return Err(eio(format!(
                    "file {ino}: chunk {idx}: truncate reached only {} shards; check the chunk servers",
                    ep.alive_count()
                )));
            }
        } else {
            let mut failures = Vec::new();
            loop {
                let ep = self.epoch(idx)?;
                if ep.fresh && !ep.created {
                    break; // never written: nothing on the servers to cut
                }
                let live: Vec<usize> = (0..ep.members.len()).filter(|&i| ep.alive[i]).collect();
                let Some(&first) = live.first() else {
                    return Err(eio(format!(
                        "file {ino}: chunk {idx}: no replica could be truncated ({}); check the chunk servers",
                        failures.join("; ")
                    )));
                };
                let p = &ep.members[first];
                let req = ChunkTruncateRequest {
                    chunk_id: p.chunk_id,
                    version: ep.version,
                    length: len,
                    chain: live[1..]
                        .iter()
                        .map(|&i| ep.members[i].address.clone())
                        .collect(),
                    sync: true,
                };
                match self.inner.pool.truncate(&p.address, req).await {
                    Ok(reply) => {
                        self.update_epoch(idx, |e| {
                            for (n, &i) in live.iter().enumerate() {
                                if !reply.replicas.get(n).is_some_and(|r| r.ok) {
                                    e.drop_member(i);
                                }
                            }
                        });
                        if self.epoch(idx)?.alive_count() > 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        failures.push(format!("{}: {e}", p.address));
                        self.update_epoch(idx, |ep| ep.drop_member(first));
                    }
                }
            }
        }
        let ep = self.epoch(idx)?;
        self.commit(
            0,
            vec![ChunkWritten {
                index: idx,
                version: ep.version,
                servers_ok: ep.servers_ok(),
            }],
        )
        .await
    }
}

impl Epoch {
    fn with_index(self, idx: u64) -> (u64, Epoch) {
        (idx, self)
    }
}

/// Applies the captured dirty extents (oldest first) to `out`, which holds file bytes from
/// `offset`.
fn apply_overlay(
    overlay: &[Arc<BTreeMap<u64, Extents>>],
    chunk_size: u64,
    offset: u64,
    out: &mut [u8],
) {
    let end = offset + out.len() as u64;
    for map in overlay {
        for (&idx, ext) in map.range(offset / chunk_size..=(end - 1) / chunk_size) {
            let cstart = idx * chunk_size;
            let lo = offset.max(cstart);
            let hi = end.min(cstart + chunk_size);
            if lo < hi {
                ext.overlay(
                    lo - cstart,
                    &mut out[(lo - offset) as usize..(hi - offset) as usize],
                );
            }
        }
    }
}

/// Compile-time check: every file operation can be handed to `tokio::spawn`.
#[allow(dead_code)]
fn file_operations_are_send(f: &FileHandle) {
    fn send<T: Send>(_: T) {}
    send(f.write_at(0, &[]));
    send(f.read_at(0, 0));
    send(f.fsync());
    send(f.flush());
    send(f.truncate(0));
    send(f.write_zeros(0, 0));
    send(f.copy_range(0, f, 0, 0));
    send(f.close());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(e: &Extents) -> Vec<(u64, Vec<u8>)> {
        e.0.iter().map(|(&s, v)| (s, v.clone())).collect()
    }

    #[test]
    fn extents_merge_and_overlay() {
        let mut e = Extents::default();
        e.insert(10, &[1; 5]);
        e.insert(15, &[2; 5]); // adjacent: appended in place
        assert_eq!(flat(&e), vec![(10, [vec![1; 5], vec![2; 5]].concat())]);
        e.insert(30, &[3; 5]);
        e.insert(5, &[4; 27]); // covers the first, touches the second
        assert_eq!(e.0.len(), 1);
        let mut out = vec![0u8; 40];
        e.overlay(0, &mut out);
        assert_eq!(&out[..5], &[0; 5]);
        assert_eq!(&out[5..32], &[4; 27]);
        assert_eq!(&out[32..35], &[3; 3]);
        assert_eq!(e.end(), 35);
        e.cut(20);
        assert_eq!(e.end(), 20);
        e.insert(0, &[9; 2]);
        e.insert(1, &[8; 1]);
        let mut out = vec![0u8; 4];
        e.overlay(0, &mut out);
        assert_eq!(out, vec![9, 8, 0, 0]);
    }
}
