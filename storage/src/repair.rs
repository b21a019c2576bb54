//! Repair orders from the metadata service: make a copy of a chunk on this server.
//!
//! An order (in a heartbeat reply) names a chunk id, the version the copy must have, and
//! the placements to read from. A replicated chunk is copied from one source (the next one
//! when a source fails); an erasure-coded shard is rebuilt from any k of the other shards
//! with Reed-Solomon. Sources verify their blake3 blocks when they serve a read (a corrupt
//! block is never sent), the local store hashes what it writes, and the finished copy is
//! verified once more before it is reported. Holes stay holes: all-zero blocks are not
//! written, the length is set at the end.
//!
//! An older copy this server held under the id is discarded first: meta only sends an
//! order for a placement it does not count as current here. A newer one belongs to a writer
//! who took the placement over, and is left alone (the repair fails, meta ignores it). The outcome goes back in the next
//! heartbeat; meta accepts the copy only if the chunk was not written meanwhile.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use kerfs_proto::{
    ChunkInfo, ChunkReadRequest, ChunkRepairDone, ChunkRepairOrder, ChunkStatRequest,
};
use reed_solomon_erasure::galois_8::ReedSolomon;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::error::{Result, StorageError};
use crate::server::Inner;
use crate::store::BLOCK_SIZE;

/// Bytes of one shard (or one replica) read and written per step of a copy.
const STEP: u64 = 16 * BLOCK_SIZE;
/// Copies this server makes at once.
const PARALLEL: usize = 2;
/// Finished task ids remembered (an order can come back in a reply that was on its way
/// while the task finished; running it again would rewrite a copy meta counts as current).
const REMEMBER_FINISHED: usize = 4096;

/// Repairs running on this server and outcomes not yet reported.
pub(crate) struct Repairs {
    /// Chunk ids being copied: a repeated order for one of them is ignored.
    running: Mutex<HashSet<u64>>,
    done: Mutex<Vec<ChunkRepairDone>>,
    finished: Mutex<VecDeque<u64>>,
    slots: Arc<Semaphore>,
}

impl Default for Repairs {
    fn default() -> Self {
        Repairs {
            running: Mutex::new(HashSet::new()),
            done: Mutex::new(Vec::new()),
            finished: Mutex::new(VecDeque::new()),
            slots: Arc::new(Semaphore::new(PARALLEL)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repairs {
    /// Outcomes for the next heartbeat.
    pub(crate) fn take_done(&self) -> Vec<ChunkRepairDone> {
        std::mem::take(&mut *lock(&self.done))
    }

    /// A heartbeat that carried them failed: report them with the next one.
    pub(crate) fn put_back(&self, mut done: Vec<ChunkRepairDone>) {
        let mut d = lock(&self.done);
        done.append(&mut d);
        *d = done;
    }
}

/// Starts the orders of one heartbeat reply (in the background, a few at a time).
pub(crate) fn start(inner: &Arc<Inner>, orders: Vec<ChunkRepairOrder>) {
    for o in orders {
        if lock(&inner.repairs.finished).contains(&o.task_id) {
            continue; // done already; meta has or will have the outcome
        }
        if !lock(&inner.repairs.running).insert(o.chunk_id) {
            continue; // already copying it (the order repeats until reported)
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let _slot = inner.repairs.slots.clone().acquire_owned().await;
            let started = std::time::Instant::now();
            let r = if o.ec_data == 0 {
                copy_replica(&inner, &o).await
            } else {
                rebuild_shard(&inner, &o).await
            };
            let (ok, message, bytes) = match r {
                Ok(bytes) => {
                    info!(
                        chunk = format_args!("{:016x}", o.chunk_id),
                        task = o.task_id,
                        version = o.version,
                        bytes,
                        secs = started.elapsed().as_secs_f64(),
                        "repair copy made"
                    );
                    inner
                        .metrics
                        .repair_bytes
                        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    (true, String::new(), bytes)
                }
                Err(e) => {
                    warn!(chunk = format_args!("{:016x}", o.chunk_id), task = o.task_id, error = %e, "repair failed");
                    // Our partial copy goes; a newer copy (a writer's) stays.
                    let store = inner.store.clone();
                    let (id, version) = (o.chunk_id, o.version);
                    let _ = tokio::task::spawn_blocking(move || store.delete(id, version)).await;
                    (false, e.to_string(), 0)
                }
            };
            let done = ChunkRepairDone {
                task_id: o.task_id,
                ino: o.ino,
                index: o.index,
                chunk_id: o.chunk_id,
                version: o.version,
                ok,
                message,
                bytes,
            };
            {
                let mut f = lock(&inner.repairs.finished);
                f.push_back(o.task_id);
                if f.len() > REMEMBER_FINISHED {
                    f.pop_front();
                }
            }
            lock(&inner.repairs.done).push(done);
            lock(&inner.repairs.running).remove(&o.chunk_id);
        });
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Transport(format!("storage worker failed: {e}")))?
}

fn remote(addr: &str, what: &str, s: tonic::Status) -> StorageError {
    StorageError::Transport(format!(
        "{what} from {addr}: {:?}: {}",
        s.code(),
        s.message()
    ))
}

async fn stat(inner: &Inner, addr: &str, chunk_id: u64) -> Result<ChunkInfo> {
    let mut c = inner.peer(addr)?;
    Ok(c.stat(ChunkStatRequest { chunk_id })
        .await
        .map_err(|s| remote(addr, "stat", s))?
        .into_inner())
}

/// `len` bytes at `offset` of a remote chunk at `version`; zeros past its end.
async fn read_range(
    inner: &Inner,
    addr: &str,
    chunk_id: u64,
    version: u64,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let mut c = inner.peer(addr)?;
    let mut stream = c
        .read(ChunkReadRequest {
            chunk_id,
            version,
            offset,
            length: len,
        })
        .await
        .map_err(|s| remote(addr, "read", s))?
        .into_inner();
    let mut out = vec![0u8; len as usize];
    while let Some(f) = stream
        .message()
        .await
        .map_err(|s| remote(addr, "read", s))?
    {
        let start = f.offset.checked_sub(offset).map(|s| s as usize);
        match start {
            Some(s) if s.saturating_add(f.data.len()) <= out.len() => {
                out[s..s + f.data.len()].copy_from_slice(&f.data);
            }
            _ => {
                return Err(StorageError::Transport(format!(
                    "{addr} sent a frame outside the range asked"
                )))
            }
        }
    }
    Ok(out)
}

/// Creates the local chunk afresh (discarding whatever was held under the id).
async fn fresh_local(inner: &Inner, o: &ChunkRepairOrder) -> Result<()> {
    let (store, id, version, shard) = (inner.store.clone(), o.chunk_id, o.version, o.shard_index);
    blocking(move || {
        // Only an older (or corrupt) copy goes: a newer one is a writer's, who took this
        // placement over meanwhile; the repair is then moot (Newer error).
        store.delete(id, version)?;
        store.prepare_write(id, version, true, shard).map(|_| ())
    })
    .await
}

/// Writes `data` at `offset` locally, skipping all-zero blocks (holes stay holes).
async fn write_local(
    inner: &Inner,
    o: &ChunkRepairOrder,
    offset: u64,
    data: Vec<u8>,
) -> Result<()> {
    let (store, id, version) = (inner.store.clone(), o.chunk_id, o.version);
    blocking(move || {
        let bs = BLOCK_SIZE as usize;
        let mut at = 0usize;
        while at < data.len() {
            let end = (at + bs).min(data.len());
            let block = &data[at..end];
            if block.iter().any(|&b| b != 0) {
                store.write(id, version, offset + at as u64, block)?;
            }
            at = end;
        }
        Ok(())
    })
    .await
}

/// Sets the final length, syncs, and re-verifies every block of the copy.
async fn finish_local(inner: &Inner, o: &ChunkRepairOrder, length: u64) -> Result<()> {
    let (store, id, version) = (inner.store.clone(), o.chunk_id, o.version);
    blocking(move || {
        store.truncate(id, version, length, true)?;
        match store.verify(id)? {
            None => Ok(()),
            Some(c) => Err(StorageError::Transport(format!(
                "the copy fails its own checksums right after it was written ({}); check this server's disk",
                c.message
            ))),
        }
    })
    .await
}

/// A replicated chunk: copy it from the first source that serves it whole.
async fn copy_replica(inner: &Inner, o: &ChunkRepairOrder) -> Result<u64> {
    let mut failures = Vec::new();
    for s in &o.sources {
        match copy_from(inner, o, &s.address, s.chunk_id).await {
            Ok(n) => return Ok(n),
            Err(e) => failures.push(format!("{}: {e}", s.address)),
        }
    }
    Err(StorageError::Transport(format!(
        "no source could be copied ({}); meta retries with other sources",
        if failures.is_empty() {
            "the order named none".to_string()
        } else {
            failures.join("; ")
        }
    )))
}

async fn copy_from(inner: &Inner, o: &ChunkRepairOrder, addr: &str, src: u64) -> Result<u64> {
    let info = stat(inner, addr, src).await?;
    if info.version != o.version {
        return Err(StorageError::Transport(format!(
            "source holds version {}, the copy must be of version {}",
            info.version, o.version
        )));
    }
    fresh_local(inner, o).await?;
    let length = info.length;
    let mut pos = 0u64;
    while pos < length {
        let n = (length - pos).min(STEP);
        let data = read_range(inner, addr, src, o.version, pos, n).await?;
        write_local(inner, o, pos, data).await?;
        pos += n;
    }
    finish_local(inner, o, length).await?;
    Ok(length)
}

/// An EC shard: rebuild it from any k of the other shards, step by step.
async fn rebuild_shard(inner: &Inner, o: &ChunkRepairOrder) -> Result<u64> {
    let (k, m) = (o.ec_data as usize, o.ec_parity as usize);
    let rs = Arc::new(ReedSolomon::new(k, m).map_err(|e| {
        StorageError::InvalidArgument(format!("unusable erasure-code layout {k}+{m}: {e:?}"))
    })?);
    let me = o.shard_index as usize;
    if me >= k + m {
        return Err(StorageError::InvalidArgument(format!(
            "shard index {me} outside the layout {k}+{m}"
        )));
    }
    // Sources at the right version, by shard index; the shard length is theirs (writers
    // keep every shard of a chunk the same length).
    let stats = futures::future::join_all(
        o.sources
            .iter()
            .map(|s| async move { (s, stat(inner, &s.address, s.chunk_id).await) }),
    )
    .await;
    let mut usable = Vec::new();
    let mut length = 0u64;
    let mut failures = Vec::new();
    for (s, r) in stats {
        match r {
            Ok(i) if i.version == o.version && !i.corrupt && (s.shard_index as usize) < k + m => {
                length = length.max(i.length);
                usable.push(s.clone());
            }
            Ok(i) => failures.push(format!(
                "shard {} on {}: version {} (corrupt: {})",
                s.shard_index, s.address, i.version, i.corrupt
            )),
            Err(e) => failures.push(format!("shard {} on {}: {e}", s.shard_index, s.address)),
        }
    }
    if usable.len() < k {
        return Err(StorageError::Transport(format!(
            "only {} of the {k} shards needed are readable ({})",
            usable.len(),
            failures.join("; ")
        )));
    }
    fresh_local(inner, o).await?;
    let mut pos = 0u64;
    while pos < length {
        let n = (length - pos).min(STEP);
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
        let mut have = 0usize;
        let mut next = 0usize;
        // Read k shards at a time; replace the ones that fail with the next sources.
        while have < k && next < usable.len() {
            let want = k - have;
            let batch: Vec<_> = usable[next..(next + want).min(usable.len())].to_vec();
            next += batch.len();
            let reads = futures::future::join_all(batch.iter().map(|s| async move {
                (
                    s,
                    read_range(inner, &s.address, s.chunk_id, o.version, pos, n).await,
                )
            }))
            .await;
            for (s, r) in reads {
                match r {
                    Ok(v) => {
                        shards[s.shard_index as usize] = Some(v);
                        have += 1;
                    }
                    Err(e) => {
                        failures.push(format!("shard {} on {}: {e}", s.shard_index, s.address))
                    }
                }
            }
        }
        if have < k {
            return Err(StorageError::Transport(format!(
                "at offset {pos} only {have} of the {k} shards needed could be read ({})",
                failures.join("; ")
            )));
        }
        let codec = rs.clone();
        let block = tokio::task::spawn_blocking(move || {
            codec
                .reconstruct(&mut shards)
                .map_err(|e| format!("reconstruction failed: {e:?}"))?;
            shards
                .into_iter()
                .nth(me)
                .flatten()
                .ok_or_else(|| "reconstruction left the shard missing".to_string())
        })
        .await
        .map_err(|e| StorageError::Transport(format!("decoder task failed: {e}")))?
        .map_err(StorageError::Transport)?;
        write_local(inner, o, pos, block).await?;
        pos += n;
    }
    finish_local(inner, o, length).await?;
    Ok(length)
}
