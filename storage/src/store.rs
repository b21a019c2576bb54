//! The chunk storage engine: the [`ChunkStore`] trait the gRPC service and the scrubber use,
//! and [`FileChunkStore`], which keeps each chunk as two files in the data directory.
//!
//! ## On-disk format
//! `chunks/<xx>/<id as 16 hex digits>.data` holds the chunk's bytes (a sparse file) and
//! `<id>.meta` its header and block hashes:
//!
//! ```text
//! 0..8    magic "KRFSCHK1"        8..12  format (1)       12..16 shard index
//! 16..24  chunk id                24..32 version          32..40 length
//! 40..48  reserved (0)            48..64 first 16 bytes of blake3(bytes 0..48)
//! 64 + 32*i  blake3 of block i (64 KiB, zero-padded past the chunk's end); all zeros = hole
//! ```
//!
//! ## Why it is safe after a crash
//! A write goes data first, then the hash slots, then the header (and with `sync`, fdatasync
//! of both files before the caller is answered). Whatever subset of that reached the disk, a
//! block whose bytes do not match its hash is refused as corrupt, never served; a block whose
//! slot never reached the disk is still a hole (it was never acknowledged). A header that
//! fails its own checksum makes the whole chunk corrupt. Space for the data and the hash
//! slots is reserved with `fallocate` before anything is overwritten, so a full disk fails a
//! write before it touches a byte (ENOSPC cannot tear an acknowledged block).
//!
//! Creating a chunk and a write without `sync` wait for no disk: they survive a kill of the
//! server (the bytes are in the kernel), and a power cut only once a later sync ran (a synced
//! write, an empty synced write sent by the client's fsync, a set-version). That sync also
//! flushes the chunk's directory. After a power cut, what was not synced may come back as a
//! hole or a corrupt chunk, never as wrong bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use kerfs_proto::ChunkInfo;
use tracing::{error, warn};

use crate::error::{Result, StorageError};
use crate::metrics::StorageMetrics;

/// Size of a checksummed block.
pub const BLOCK_SIZE: u64 = 64 * 1024;
const HASH_LEN: u64 = 32;
const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"KRFSCHK1";
const FORMAT: u32 = 1;
/// A slot of all zeros: the block was never written (reads as zeros).
const HOLE: [u8; 32] = [0; 32];
/// A slot past the end of a short `.meta` file (a crash lost it): the block cannot be trusted.
const LOST: [u8; 32] = [0xff; 32];
/// How many chunks keep their files open and hashes in memory.
const OPEN_CACHE: usize = 256;

/// Bytes of a chunk read back, with the chunk's state at the time of the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOut {
    pub data: Vec<u8>,
    pub chunk_length: u64,
    pub version: u64,
}

/// Blocks of one chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub chunk_id: u64,
    pub blocks: Vec<u64>,
    pub message: String,
}

/// Space on the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub capacity_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub chunk_count: u64,
}

/// The storage engine behind the chunk service. All calls block (file I/O): call them from
/// `spawn_blocking`. Every data call names the version it expects (see `chunk.proto`).
pub trait ChunkStore: Send + Sync + 'static {
    /// Checks that a write at `version` may go ahead, creating the chunk (empty, at
    /// `version`) when it is missing and `create` is set.
    fn prepare_write(
        &self,
        id: u64,
        version: u64,
        create: bool,
        shard_index: u32,
    ) -> Result<ChunkInfo>;
    /// Writes `data` at `offset` (any offset; holes stay holes).
    fn write(&self, id: u64, version: u64, offset: u64, data: &[u8]) -> Result<ChunkInfo>;
    /// Makes everything written to the chunk durable.
    fn sync(&self, id: u64) -> Result<()>;
    /// Verified bytes `[offset, offset+len)` clipped to the chunk's length.
    fn read(&self, id: u64, version: u64, offset: u64, len: u64) -> Result<ReadOut>;
    fn truncate(&self, id: u64, version: u64, length: u64, sync: bool) -> Result<ChunkInfo>;
    /// Moves the chunk from `from` (or already `to`) to version `to`, durably.
    fn set_version(
        &self,
        id: u64,
        from: u64,
        to: u64,
        create: bool,
        shard_index: u32,
    ) -> Result<ChunkInfo>;
    fn stat(&self, id: u64) -> Result<ChunkInfo>;
    /// Chunks with id > `start_after`, in id order, at most `limit`.
    fn list(&self, start_after: u64, limit: usize) -> Vec<ChunkInfo>;
    /// Removes the chunk if its version is <= `max_version` (0: any). Returns whether it existed.
    fn delete(&self, id: u64, max_version: u64) -> Result<bool>;
    /// Re-reads and verifies every block of one chunk.
    fn verify(&self, id: u64) -> Result<Option<Corruption>>;
    fn usage(&self) -> Usage;
    /// Chunk ids changed and deleted since the last call (for delta heartbeats).
    fn take_changes(&self) -> (Vec<u64>, Vec<u64>);
    /// Makes every chunk's unsynced writes durable (clean shutdown).
    fn flush(&self) -> Result<()>;
}

/// Parsed chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    shard_index: u32,
    chunk_id: u64,
    version: u64,
    length: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard_index.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.version.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        let sum = blake3::hash(&b[0..48]);
        b[48..64].copy_from_slice(&sum.as_bytes()[0..16]);
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_LEN as usize {
            return Err(format!(
                "header is {} bytes, {HEADER_LEN} expected",
                b.len()
            ));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let sum = blake3::hash(&b[0..48]);
        if b[48..64] != sum.as_bytes()[0..16] {
            return Err("header checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let format = u32_at(8);
        if format != FORMAT {
            return Err(format!("unknown format {format}"));
        }
        Ok(Header {
            shard_index: u32_at(12),
            chunk_id: u64_at(16),
            version: u64_at(24),
            length: u64_at(32),
        })
    }
}

fn blocks_for(length: u64) -> u64 {
    length.div_ceil(BLOCK_SIZE)
}

fn hash_block(buf: &[u8]) -> [u8; 32] {
    // `buf` is always exactly one block (zero-padded), so a short last block and the same
    // block grown by a truncate-up hash alike.
    *blake3::hash(buf).as_bytes()
}

/// One open chunk: its files, header and block hashes.
struct ChunkFile {
    id: u64,
    data: File,
    meta: File,
    data_path: PathBuf,
    meta_path: PathBuf,
    header: Header,
    hashes: Vec<[u8; 32]>,
    deleted: bool,
    /// The directory entries of the chunk's files may not be on disk yet (a creation
    /// waits for no disk flush; a chunk opened again may have been created so): the next
    /// `sync` flushes the directory too.
    dir_unsynced: bool,
}

impl ChunkFile {
    fn check_version(&self, wanted: u64) -> Result<()> {
        let held = self.header.version;
        if self.deleted {
            return Err(StorageError::NotFound { chunk: self.id });
        }
        if held < wanted {
            Err(StorageError::Stale {
                chunk: self.id,
                held,
                wanted,
            })
        } else if held > wanted {
            Err(StorageError::Newer {
                chunk: self.id,
                held,
                wanted,
            })
        } else {
            Ok(())
        }
    }

    fn info(&self) -> ChunkInfo {
        ChunkInfo {
            chunk_id: self.id,
            version: self.header.version,
            length: self.header.length,
            shard_index: self.header.shard_index,
            corrupt: false,
        }
    }

    /// Reads block `i` (zero-padded to a full block) and checks it against its hash.
    fn read_block(&self, i: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let slot = self.hashes.get(i as usize).copied().unwrap_or(HOLE);
        if slot == HOLE {
            return Ok(());
        }
        let start = i * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(self.header.length);
        let want = (end.saturating_sub(start)) as usize;
        let mut got = 0;
        while got < want {
            match self.data.read_at(&mut buf[got..want], start + got as u64) {
                Ok(0) => break, // short file: the rest stays zero, the hash decides
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StorageError::io("reading", &self.data_path, e)),
            }
        }
        if slot == LOST {
            return Err(self.corrupt(i, "its checksum was lost in a crash"));
        }
        if hash_block(buf) != slot {
            return Err(self.corrupt(i, "blake3 checksum mismatch"));
        }
        Ok(())
    }

    fn corrupt(&self, block: u64, why: &str) -> StorageError {
        StorageError::Corrupt {
            chunk: self.id,
            block,
            path: self.data_path.clone(),
            why: why.to_string(),
        }
    }

    fn write_header(&self) -> Result<()> {
        self.meta
            .write_all_at(&self.header.encode(), 0)
            .map_err(|e| StorageError::io("writing the header of", &self.meta_path, e))
    }

    fn write_slots(&self, first: u64, last: u64) -> Result<()> {
        let mut buf = Vec::with_capacity(((last - first + 1) * HASH_LEN) as usize);
        for i in first..=last {
            buf.extend_from_slice(&self.hashes[i as usize]);
        }
        self.meta
            .write_all_at(&buf, HEADER_LEN + first * HASH_LEN)
            .map_err(|e| StorageError::io("writing block checksums to", &self.meta_path, e))
    }

    fn set_meta_len(&self) -> Result<()> {
        let len = HEADER_LEN + self.hashes.len() as u64 * HASH_LEN;
        self.meta
            .set_len(len)
            .map_err(|e| StorageError::io("resizing", &self.meta_path, e))
    }

    fn sync(&mut self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| StorageError::io("syncing", &self.data_path, e))?;
        self.meta
            .sync_data()
            .map_err(|e| StorageError::io("syncing", &self.meta_path, e))?;
        if self.dir_unsynced {
            if let Some(dir) = self.meta_path.parent() {
                sync_dir(dir)?;
            }
            self.dir_unsynced = false;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], max_len: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= max_len)
            .ok_or_else(|| {
                StorageError::InvalidArgument(format!(
                    "write of {} bytes at offset {offset} goes past the largest chunk this server accepts ({max_len} bytes)",
                    data.len()
                ))
            })?;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let old_len = self.header.length;
        let new_len = old_len.max(end);
        // Reserve space first: once this succeeds, the writes below cannot hit ENOSPC on an
        // ordinary file system, so a full disk never leaves a half-overwritten block.
        let span_start = first * BLOCK_SIZE;
        let span_end = ((last + 1) * BLOCK_SIZE).min(new_len);
        reserve(
            &self.data,
            span_start,
            span_end - span_start,
            &self.data_path,
        )?;
        reserve(
            &self.meta,
            HEADER_LEN + first * HASH_LEN,
            (last - first + 1) * HASH_LEN,
            &self.meta_path,
        )?;
        // The whole blocks touched, old content merged with the new bytes: partial blocks
        // need their old bytes (verified) for the new hash, and writing them back whole also
        // wipes leftovers of an unacknowledged write past the old end.
        let mut span = vec![0u8; (span_end - span_start) as usize];
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        for (i, edge) in [
            (first, !offset.is_multiple_of(BLOCK_SIZE)),
            (last, !end.is_multiple_of(BLOCK_SIZE)),
        ] {
            let bstart = i * BLOCK_SIZE;
            if !edge || bstart >= old_len {
                continue;
            }
            self.read_block(i, &mut block)?;
            let from = (bstart - span_start) as usize;
            let n = (span.len() - from).min(BLOCK_SIZE as usize);
            span[from..from + n].copy_from_slice(&block[..n]);
        }
        let at = (offset - span_start) as usize;
        span[at..at + data.len()].copy_from_slice(data);
        self.data
            .write_all_at(&span, span_start)
            .map_err(|e| StorageError::io("writing", &self.data_path, e))?;
        if (self.hashes.len() as u64) < last + 1 {
            self.hashes.resize((last + 1) as usize, HOLE);
        }
        for i in first..=last {
            let from = ((i - first) * BLOCK_SIZE) as usize;
            let to = (from + BLOCK_SIZE as usize).min(span.len());
            block.fill(0);
            block[..to - from].copy_from_slice(&span[from..to]);
            self.hashes[i as usize] = hash_block(&block);
        }
        self.write_slots(first, last)?;
        if new_len != old_len {
            self.header.length = new_len;
            self.write_header()?;
        }
        Ok(())
    }

    fn truncate(&mut self, length: u64) -> Result<()> {
        let old_len = self.header.length;
        if length < old_len {
            let nblocks = blocks_for(length);
            let mut tail_hash = None;
            if !length.is_multiple_of(BLOCK_SIZE) {
                // The new last block keeps only its head: verify it, rehash it zero-padded.
                let i = length / BLOCK_SIZE;
                let mut block = vec![0u8; BLOCK_SIZE as usize];
                if self.hashes.get(i as usize).copied().unwrap_or(HOLE) != HOLE {
                    self.read_block(i, &mut block)?;
                    block[(length % BLOCK_SIZE) as usize..].fill(0);
                    tail_hash = Some((i, hash_block(&block)));
                }
            }
            self.data
                .set_len(length)
                .map_err(|e| StorageError::io("truncating", &self.data_path, e))?;
            self.hashes.truncate(nblocks as usize);
            if let Some((i, h)) = tail_hash {
                self.hashes[i as usize] = h;
                self.write_slots(i, i)?;
            }
        } else if length > old_len {
            // Growing adds a hole: the old last block's zero-padded hash stays right.
            self.data
                .set_len(length)
                .map_err(|e| StorageError::io("extending", &self.data_path, e))?;
            self.hashes.resize(blocks_for(length) as usize, HOLE);
        }
        self.set_meta_len()?;
        self.header.length = length;
        self.write_header()
    }
}

/// Reserves `[offset, offset+len)` of a file without changing its size. File systems
/// without fallocate just skip the reservation.
fn reserve(file: &File, offset: u64, len: u64, path: &Path) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an open fd with integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(StorageError::io("reserving space for", path, e)),
    }
}

/// What the index knows of a chunk without opening it.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    version: u64,
    length: u64,
    shard_index: u32,
    corrupt: bool,
}

/// Chunks as files under `<data dir>/chunks`.
pub struct FileChunkStore {
    root: PathBuf,
    max_chunk_bytes: u64,
    metrics: Arc<StorageMetrics>,
    index: Mutex<BTreeMap<u64, IndexEntry>>,
    open: Mutex<HashMap<u64, Arc<Mutex<ChunkFile>>>>,
    changes: Mutex<(HashSet<u64>, HashSet<u64>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a chunk lock leaves in-memory state that mirrors the disk at
    // worst one write behind; the disk checksums still decide what is served.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FileChunkStore {
    /// Opens (or creates) the chunk directory under `data_dir` and indexes every chunk found.
    pub fn open(
        data_dir: &Path,
        max_chunk_bytes: u64,
        metrics: Arc<StorageMetrics>,
    ) -> Result<FileChunkStore> {
        let root = data_dir.join("chunks");
        std::fs::create_dir_all(&root).map_err(|e| StorageError::io("creating", &root, e))?;
        let mut index = BTreeMap::new();
        let dirs = std::fs::read_dir(&root).map_err(|e| StorageError::io("listing", &root, e))?;
        for dir in dirs {
            let dir = dir
                .map_err(|e| StorageError::io("listing", &root, e))?
                .path();
            if !dir.is_dir() {
                continue;
            }
            let files =
                std::fs::read_dir(&dir).map_err(|e| StorageError::io("listing", &dir, e))?;
            for f in files {
                let path = f.map_err(|e| StorageError::io("listing", &dir, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".tmp") {
                    // A chunk creation interrupted by a crash: never acknowledged.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(stem) = name.strip_suffix(".meta") else {
                    if let Some(stem) = name.strip_suffix(".data") {
                        if !path.with_file_name(format!("{stem}.meta")).exists() {
                            warn!(path = %path.display(), "removing chunk data without a header (interrupted create or delete)");
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                    continue;
                };
                let Ok(id) = u64::from_str_radix(stem, 16) else {
                    warn!(path = %path.display(), "ignoring a file that is not a chunk");
                    continue;
                };
                let entry = match read_header(&path) {
                    Ok(h) if h.chunk_id == id => IndexEntry {
                        version: h.version,
                        length: h.length,
                        shard_index: h.shard_index,
                        corrupt: false,
                    },
                    Ok(h) => {
                        error!(path = %path.display(), found = h.chunk_id, "chunk header names another chunk; treating the chunk as corrupt");
                        metrics.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                        corrupt_entry()
                    }
                    Err(why) => {
                        error!(path = %path.display(), %why, "chunk header damaged; treating the chunk as corrupt");
                        metrics.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                        corrupt_entry()
                    }
                };
                index.insert(id, entry);
            }
        }
        Ok(FileChunkStore {
            root,
            max_chunk_bytes,
            metrics,
            index: Mutex::new(index),
            open: Mutex::new(HashMap::new()),
            changes: Mutex::new((HashSet::new(), HashSet::new())),
        })
    }

    fn paths(&self, id: u64) -> (PathBuf, PathBuf, PathBuf) {
        chunk_paths(&self.root, id)
    }

    /// Where chunk `id`'s data file is (tests and tools flip bits in it).
    pub fn data_path(&self, id: u64) -> PathBuf {
        self.paths(id).1
    }

    /// Where chunk `id`'s header and hashes are.
    pub fn meta_path(&self, id: u64) -> PathBuf {
        self.paths(id).2
    }

    /// The open chunk, or None if this server does not have it.
    fn get(&self, id: u64) -> Result<Option<Arc<Mutex<ChunkFile>>>> {
        let mut open = lock(&self.open);
        if let Some(c) = open.get(&id) {
            return Ok(Some(c.clone()));
        }
        let entry = lock(&self.index).get(&id).copied();
        let Some(entry) = entry else {
            return Ok(None);
        };
        let (_, data_path, meta_path) = self.paths(id);
        if entry.corrupt {
            return Err(StorageError::CorruptHeader {
                chunk: id,
                path: meta_path,
                why: "found damaged when the server started".into(),
            });
        }
        let c = open_chunk(id, &data_path, &meta_path).inspect_err(|e| {
            if e.is_corrupt() {
                self.mark_corrupt(id);
            }
        })?;
        let c = Arc::new(Mutex::new(c));
        if open.len() >= OPEN_CACHE {
            // Forget chunks nobody is using; their state is on disk.
            open.retain(|_, c| Arc::strong_count(c) > 1);
        }
        open.insert(id, c.clone());
        Ok(Some(c))
    }

    fn get_existing(&self, id: u64) -> Result<Arc<Mutex<ChunkFile>>> {
        self.get(id)?.ok_or(StorageError::NotFound { chunk: id })
    }

    /// The open chunk; a missing one is created at `version` when `create` is set (the first
    /// write of an epoch may be the chunk's first).
    fn get_or_create(
        &self,
        id: u64,
        version: u64,
        create: bool,
        shard_index: u32,
    ) -> Result<Arc<Mutex<ChunkFile>>> {
        match self.get(id)? {
            Some(c) => Ok(c),
            None if create => self.create(id, version, shard_index),
            None => Err(StorageError::NotFound { chunk: id }),
        }
    }

    fn create(&self, id: u64, version: u64, shard_index: u32) -> Result<Arc<Mutex<ChunkFile>>> {
        let mut open = lock(&self.open);
        if let Some(c) = open.get(&id) {
            return Ok(c.clone());
        }
        if lock(&self.index).contains_key(&id) {
            drop(open);
            return self.get_existing(id);
        }
        let (dir, data_path, meta_path) = self.paths(id);
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("creating", &dir, e))?;
        let header = Header {
            shard_index,
            chunk_id: id,
            version,
            length: 0,
        };
        // Data file first, header last (via rename): a chunk exists once its header does.
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|e| StorageError::io("creating", &data_path, e))?;
        let tmp = meta_path.with_extension("meta.tmp");
        let result = (|| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| StorageError::io("creating", &tmp, e))?;
            f.write_all_at(&header.encode(), 0)
                .map_err(|e| StorageError::io("writing", &tmp, e))?;
            // No disk flush: the chunk's first sync (a synced write, an fsync, a new epoch)
            // flushes its files and this directory.
            std::fs::rename(&tmp, &meta_path).map_err(|e| StorageError::io("renaming", &tmp, e))?;
            Ok(f)
        })();
        let meta = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&data_path);
                return Err(e);
            }
        };
        let c = ChunkFile {
            id,
            data,
            meta,
            data_path,
            meta_path,
            header,
            hashes: Vec::new(),
            deleted: false,
            dir_unsynced: true,
        };
        self.update_index(&c);
        let c = Arc::new(Mutex::new(c));
        open.insert(id, c.clone());
        Ok(c)
    }

    fn update_index(&self, c: &ChunkFile) {
        lock(&self.index).insert(
            c.id,
            IndexEntry {
                version: c.header.version,
                length: c.header.length,
                shard_index: c.header.shard_index,
                corrupt: false,
            },
        );
        let mut ch = lock(&self.changes);
        ch.0.insert(c.id);
        ch.1.remove(&c.id);
    }

    fn mark_corrupt(&self, id: u64) {
        if let Some(e) = lock(&self.index).get_mut(&id) {
            e.corrupt = true;
        }
        lock(&self.changes).0.insert(id);
    }

    /// Counts, logs and remembers a corrupt block found while serving.
    fn note(&self, r: Result<ReadOut>, id: u64) -> Result<ReadOut> {
        if let Err(e) = &r {
            if e.is_corrupt() {
                self.metrics.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                error!(chunk = format_args!("{id:016x}"), error = %e, "corrupt block refused");
                self.mark_corrupt(id);
            }
        }
        r
    }
}

/// (directory, data file, header file) of chunk `id` under the `chunks` directory `root`.
fn chunk_paths(root: &Path, id: u64) -> (PathBuf, PathBuf, PathBuf) {
    let dir = root.join(format!("{:02x}", id & 0xff));
    let data = dir.join(format!("{id:016x}.data"));
    let meta = dir.join(format!("{id:016x}.meta"));
    (dir, data, meta)
}

/// The data file of chunk `id` in a chunk server's data directory (for tools and tests).
pub fn chunk_data_path(data_dir: &Path, id: u64) -> PathBuf {
    chunk_paths(&data_dir.join("chunks"), id).1
}

/// The header/checksum file of chunk `id` in a chunk server's data directory.
pub fn chunk_meta_path(data_dir: &Path, id: u64) -> PathBuf {
    chunk_paths(&data_dir.join("chunks"), id).2
}

fn corrupt_entry() -> IndexEntry {
    IndexEntry {
        version: 0,
        length: 0,
        shard_index: 0,
        corrupt: true,
    }
}

fn read_header(path: &Path) -> std::result::Result<Header, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut b = [0u8; HEADER_LEN as usize];
    f.read_exact_at(&mut b, 0).map_err(|e| e.to_string())?;
    Header::decode(&b)
}

fn open_chunk(id: u64, data_path: &Path, meta_path: &Path) -> Result<ChunkFile> {
    let rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| StorageError::io("opening", p, e))
    };
    let meta = rw(meta_path)?;
    let data = match rw(data_path) {
        Ok(f) => f,
        Err(_) => {
            return Err(StorageError::CorruptHeader {
                chunk: id,
                path: data_path.to_owned(),
                why: "the data file is missing".into(),
            })
        }
    };
    let meta_len = meta
        .metadata()
        .map_err(|e| StorageError::io("reading", meta_path, e))?
        .len();
    let mut hb = [0u8; HEADER_LEN as usize];
    meta.read_exact_at(&mut hb, 0)
        .map_err(|e| StorageError::CorruptHeader {
            chunk: id,
            path: meta_path.to_owned(),
            why: e.to_string(),
        })?;
    let header = Header::decode(&hb).map_err(|why| StorageError::CorruptHeader {
        chunk: id,
        path: meta_path.to_owned(),
        why,
    })?;
    let nblocks = blocks_for(header.length);
    let have = (meta_len.saturating_sub(HEADER_LEN) / HASH_LEN).min(nblocks);
    let mut raw = vec![0u8; (have * HASH_LEN) as usize];
    meta.read_exact_at(&mut raw, HEADER_LEN)
        .map_err(|e| StorageError::io("reading block checksums from", meta_path, e))?;
    let mut hashes: Vec<[u8; 32]> = raw
        .chunks_exact(HASH_LEN as usize)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect();
    // Slots a crash cut off: those blocks cannot be verified, so they cannot be served.
    hashes.resize(nblocks as usize, LOST);
    Ok(ChunkFile {
        id,
        data,
        meta,
        data_path: data_path.to_owned(),
        meta_path: meta_path.to_owned(),
        header,
        hashes,
        deleted: false,
        dir_unsynced: true,
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("syncing directory", dir, e))
}

/// statvfs of the file system holding `path`: (capacity, available) in bytes.
pub fn fs_space(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let frsize = s.f_frsize as u64;
    (s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize)
}

impl ChunkStore for FileChunkStore {
    fn prepare_write(
        &self,
        id: u64,
        version: u64,
        create: bool,
        shard_index: u32,
    ) -> Result<ChunkInfo> {
        let c = self.get_or_create(id, version, create, shard_index)?;
        let c = lock(&c);
        c.check_version(version)?;
        Ok(c.info())
    }

    fn write(&self, id: u64, version: u64, offset: u64, data: &[u8]) -> Result<ChunkInfo> {
        let c = self.get_existing(id)?;
        let mut c = lock(&c);
        c.check_version(version)?;
        let r = c.write(offset, data, self.max_chunk_bytes);
        // Whatever happened, the index follows the in-memory header.
        self.update_index(&c);
        if let Err(e) = &r {
            if e.is_corrupt() {
                self.metrics.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                self.mark_corrupt(id);
            }
        }
        r?;
        self.metrics
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(c.info())
    }

    fn sync(&self, id: u64) -> Result<()> {
        self.metrics.write_syncs.fetch_add(1, Ordering::Relaxed);
        let c = self.get_existing(id)?;
        let mut c = lock(&c);
        if c.deleted {
            return Err(StorageError::NotFound { chunk: id });
        }
        c.sync()
    }

    fn read(&self, id: u64, version: u64, offset: u64, len: u64) -> Result<ReadOut> {
        let c = self.get_existing(id).inspect_err(|e| {
            if e.is_corrupt() {
                self.metrics.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
            }
        })?;
        let c = lock(&c);
        c.check_version(version)?;
        let length = c.header.length;
        let end = offset.saturating_add(len).min(length);
        if offset >= end {
            return Ok(ReadOut {
                data: Vec::new(),
                chunk_length: length,
                version,
            });
        }
        if end - offset > 64 * 1024 * 1024 {
            return Err(StorageError::InvalidArgument(format!(
                "one read call returns at most 64 MiB, {} asked",
                end - offset
            )));
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let r = (|| {
            for i in offset / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                c.read_block(i, &mut block)?;
                let bstart = i * BLOCK_SIZE;
                let from = offset.max(bstart) - bstart;
                let to = end.min(bstart + BLOCK_SIZE) - bstart;
                out.extend_from_slice(&block[from as usize..to as usize]);
            }
            Ok(())
        })();
        drop(c);
        let r = r.map(|()| ReadOut {
            data: out,
            chunk_length: length,
            version,
        });
        let r = self.note(r, id)?;
        self.metrics
            .bytes_read
            .fetch_add(r.data.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    fn truncate(&self, id: u64, version: u64, length: u64, sync: bool) -> Result<ChunkInfo> {
        if length > self.max_chunk_bytes {
            return Err(StorageError::InvalidArgument(format!(
                "truncate to {length} bytes is past the largest chunk this server accepts ({} bytes)",
                self.max_chunk_bytes
            )));
        }
        let c = self.get_existing(id)?;
        let mut c = lock(&c);
        c.check_version(version)?;
        let r = c.truncate(length);
        self.update_index(&c);
        r?;
        if sync {
            c.sync()?;
        }
        Ok(c.info())
    }

    fn set_version(
        &self,
        id: u64,
        from: u64,
        to: u64,
        create: bool,
        shard_index: u32,
    ) -> Result<ChunkInfo> {
        let c = self.get_or_create(id, to, create, shard_index)?;
        let mut c = lock(&c);
        if c.deleted {
            return Err(StorageError::NotFound { chunk: id });
        }
        let held = c.header.version;
        if held == to {
            // Durably, even when this call only created it.
            c.sync()?;
            return Ok(c.info());
        }
        if held != from {
            return Err(if held < from {
                StorageError::Stale {
                    chunk: id,
                    held,
                    wanted: from,
                }
            } else {
                StorageError::Newer {
                    chunk: id,
                    held,
                    wanted: from,
                }
            });
        }
        if to < held {
            return Err(StorageError::InvalidArgument(format!(
                "chunk {id:016x}: version can only move forward ({held} -> {to} asked)"
            )));
        }
        // Data first: the new version must never cover bytes still only in the page cache.
        c.data
            .sync_data()
            .map_err(|e| StorageError::io("syncing", &c.data_path, e))?;
        c.header.version = to;
        c.write_header()?;
        c.meta
            .sync_data()
            .map_err(|e| StorageError::io("syncing", &c.meta_path, e))?;
        self.update_index(&c);
        Ok(c.info())
    }

    fn stat(&self, id: u64) -> Result<ChunkInfo> {
        let e = lock(&self.index)
            .get(&id)
            .copied()
            .ok_or(StorageError::NotFound { chunk: id })?;
        Ok(ChunkInfo {
            chunk_id: id,
            version: e.version,
            length: e.length,
            shard_index: e.shard_index,
            corrupt: e.corrupt,
        })
    }

    fn list(&self, start_after: u64, limit: usize) -> Vec<ChunkInfo> {
        lock(&self.index)
            .range(start_after.saturating_add(1)..)
            .take(limit)
            .map(|(&id, e)| ChunkInfo {
                chunk_id: id,
                version: e.version,
                length: e.length,
                shard_index: e.shard_index,
                corrupt: e.corrupt,
            })
            .collect()
    }

    fn delete(&self, id: u64, max_version: u64) -> Result<bool> {
        let mut open = lock(&self.open);
        let Some(entry) = lock(&self.index).get(&id).copied() else {
            return Ok(false);
        };
        if max_version != 0 && !entry.corrupt && entry.version > max_version {
            return Err(StorageError::Newer {
                chunk: id,
                held: entry.version,
                wanted: max_version,
            });
        }
        if let Some(c) = open.remove(&id) {
            lock(&c).deleted = true;
        }
        let (dir, data_path, meta_path) = self.paths(id);
        // Header first: without it the chunk no longer exists, even if a crash keeps the data.
        match std::fs::remove_file(&meta_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("removing", &meta_path, e)),
        }
        let _ = std::fs::remove_file(&data_path);
        sync_dir(&dir)?;
        lock(&self.index).remove(&id);
        let mut ch = lock(&self.changes);
        ch.0.remove(&id);
        ch.1.insert(id);
        Ok(true)
    }

    fn verify(&self, id: u64) -> Result<Option<Corruption>> {
        let c = match self.get(id) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(None),
            Err(e) if e.is_corrupt() => {
                return Ok(Some(Corruption {
                    chunk_id: id,
                    blocks: Vec::new(),
                    message: e.to_string(),
                }))
            }
            Err(e) => return Err(e),
        };
        let c = lock(&c);
        if c.deleted {
            return Ok(None);
        }
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let mut bad = Vec::new();
        let mut message = String::new();
        for i in 0..c.hashes.len() as u64 {
            match c.read_block(i, &mut block) {
                Ok(()) => {}
                Err(e) if e.is_corrupt() => {
                    if message.is_empty() {
                        message = e.to_string();
                    }
                    bad.push(i);
                }
                Err(e) => return Err(e),
            }
        }
        self.metrics
            .bytes_scrubbed
            .fetch_add(c.header.length, Ordering::Relaxed);
        drop(c);
        if bad.is_empty() {
            return Ok(None);
        }
        self.metrics
            .corrupt_blocks
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        self.mark_corrupt(id);
        Ok(Some(Corruption {
            chunk_id: id,
            blocks: bad,
            message,
        }))
    }

    fn usage(&self) -> Usage {
        let (capacity_bytes, available_bytes) = fs_space(&self.root);
        let index = lock(&self.index);
        Usage {
            capacity_bytes,
            available_bytes,
            used_bytes: index.values().map(|e| e.length).sum(),
            chunk_count: index.len() as u64,
        }
    }

    fn flush(&self) -> Result<()> {
        // syncfs covers chunks evicted from the open cache with writes still unsynced.
        let dir = File::open(&self.root).map_err(|e| StorageError::io("opening", &self.root, e))?;
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(StorageError::io(
                "syncing the file system of",
                &self.root,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn take_changes(&self) -> (Vec<u64>, Vec<u64>) {
        let mut ch = lock(&self.changes);
        let changed = ch.0.drain().collect();
        let deleted = ch.1.drain().collect();
        (changed, deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> FileChunkStore {
        FileChunkStore::open(dir, 1 << 30, Arc::new(StorageMetrics::default())).unwrap()
    }

    #[test]
    fn header_round_trip_and_damage_detected() {
        let h = Header {
            shard_index: 3,
            chunk_id: 42,
            version: 7,
            length: 123456,
        };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        b[30] ^= 1;
        assert!(Header::decode(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn partial_block_rewrites_keep_neighbours_and_holes_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.prepare_write(1, 1, true, 0).unwrap();
        s.write(1, 1, 100, &[7u8; 10]).unwrap();
        s.write(1, 1, 3 * BLOCK_SIZE + 5, &[9u8; 3]).unwrap();
        s.write(1, 1, 105, &[8u8; 2]).unwrap();
        let r = s.read(1, 1, 0, 4 * BLOCK_SIZE).unwrap();
        assert_eq!(r.chunk_length, 3 * BLOCK_SIZE + 8);
        assert_eq!(r.data.len() as u64, 3 * BLOCK_SIZE + 8);
        let mut want = vec![0u8; r.data.len()];
        want[100..110].fill(7);
        want[105..107].fill(8);
        want[(3 * BLOCK_SIZE + 5) as usize..].fill(9);
        assert_eq!(r.data, want);
    }

    #[test]
    fn truncate_down_then_up_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.prepare_write(2, 1, true, 0).unwrap();
        s.write(2, 1, 0, &vec![5u8; 200_000]).unwrap();
        s.truncate(2, 1, 70_000, false).unwrap();
        s.truncate(2, 1, 150_000, true).unwrap();
        let r = s.read(2, 1, 0, 200_000).unwrap();
        assert_eq!(r.data.len(), 150_000);
        assert!(r.data[..70_000].iter().all(|&b| b == 5));
        assert!(r.data[70_000..].iter().all(|&b| b == 0));
        // A write into the zeroed tail of the old block keeps the hash consistent.
        s.write(2, 1, 69_000, &[1u8; 2000]).unwrap();
        let r = s.read(2, 1, 65_536, 10_000).unwrap();
        assert!(r.data[..69_000 - 65_536].iter().all(|&b| b == 5));
        assert!(r.data[69_000 - 65_536..71_000 - 65_536]
            .iter()
            .all(|&b| b == 1));
        assert!(r.data[71_000 - 65_536..].iter().all(|&b| b == 0));
    }

    #[test]
    fn torn_write_after_crash_is_detected_not_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path());
            s.prepare_write(3, 4, true, 0).unwrap();
            s.write(3, 4, 0, &vec![1u8; 300_000]).unwrap();
            s.sync(3).unwrap();
            // A crash after the data of an overwrite reached the disk but not its hashes.
            let f = OpenOptions::new().write(true).open(s.data_path(3)).unwrap();
            f.write_all_at(&[2u8; 1000], 140_000).unwrap();
        }
        let s = store(dir.path());
        assert_eq!(s.read(3, 4, 0, 131_072).unwrap().data, vec![1u8; 131_072]);
        let e = s.read(3, 4, 131_072, 10).unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::Corrupt {
                    chunk: 3,
                    block: 2,
                    ..
                }
            ),
            "{e}"
        );
        let c = s.verify(3).unwrap().unwrap();
        assert_eq!(c.blocks, vec![2]);
        assert!(s.stat(3).unwrap().corrupt);
    }

    #[test]
    fn lost_hash_slots_and_damaged_header_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path());
            s.prepare_write(4, 1, true, 0).unwrap();
            s.write(4, 1, 0, &vec![1u8; 200_000]).unwrap();
            s.prepare_write(5, 1, true, 0).unwrap();
            s.write(5, 1, 0, &[1u8; 10]).unwrap();
            let meta = OpenOptions::new().write(true).open(s.meta_path(4)).unwrap();
            meta.set_len(HEADER_LEN + HASH_LEN).unwrap();
            let meta5 = OpenOptions::new().write(true).open(s.meta_path(5)).unwrap();
            meta5.write_all_at(&[0xAA], 20).unwrap();
        }
        let s = store(dir.path());
        assert_eq!(s.read(4, 1, 0, 10).unwrap().data, vec![1u8; 10]);
        assert!(s.read(4, 1, 70_000, 10).unwrap_err().is_corrupt());
        assert!(s.stat(5).unwrap().corrupt);
        assert!(s.read(5, 1, 0, 10).unwrap_err().is_corrupt());
    }

    #[test]
    fn versions_refuse_mismatches_and_only_move_from_the_expected_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(matches!(
            s.prepare_write(6, 1, false, 0),
            Err(StorageError::NotFound { .. })
        ));
        s.prepare_write(6, 1, true, 2).unwrap();
        s.write(6, 1, 0, b"abc").unwrap();
        s.set_version(6, 1, 2, false, 0).unwrap();
        s.set_version(6, 1, 2, false, 0).unwrap(); // idempotent
        assert!(matches!(
            s.read(6, 1, 0, 3),
            Err(StorageError::Newer { held: 2, .. })
        ));
        assert!(matches!(
            s.read(6, 3, 0, 3),
            Err(StorageError::Stale { held: 2, .. })
        ));
        assert!(matches!(
            s.set_version(6, 3, 4, false, 0),
            Err(StorageError::Stale { .. })
        ));
        assert_eq!(s.read(6, 2, 0, 3).unwrap().data, b"abc");
        assert_eq!(s.stat(6).unwrap().shard_index, 2);
        assert!(matches!(s.delete(6, 1), Err(StorageError::Newer { .. })));
        assert!(s.delete(6, 2).unwrap());
        assert!(!s.delete(6, 0).unwrap());
        assert!(matches!(
            s.read(6, 2, 0, 3),
            Err(StorageError::NotFound { .. })
        ));
    }
}
