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
//!
//! # Layout
//!
//! This file holds the handle, its state, the write-behind flush and the commit; each other
//! responsibility has a submodule adding its part of `impl FileHandle`: `extents` (dirty
//! ranges and their overlay), `epochs` (write epochs, replacing a lost replica), `chain`
//! (replicated writes down the chain), `ec_io` (erasure-coded writes and reads), `read`
//! (reads, failover and read-ahead) and `truncate`.

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

mod chain;
mod ec_io;
mod epochs;
mod extents;
mod read;
mod truncate;

use epochs::Epoch;
use extents::{apply_overlay, Extents};
use read::{Prefetch, Source};

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
        self.apply_deferred(&mut a);
        self.attr = Some(a);
    }

    /// `a` with the changes waiting for the next commit applied.
    fn apply_deferred(&self, a: &mut Attr) {
        for set in self.deferred.iter().filter_map(|d| d.set.as_ref()) {
            deferred::apply(a, set);
        }
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
        lock(&self.inner.state).apply_deferred(a);
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

    // ------------------------------------------------------------------ reads

    // ------------------------------------------------------------------ truncate
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
