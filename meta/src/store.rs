//! The storage engine behind the metadata service: one ordered key-value space with atomic,
//! optionally durable batches. sled is the engine today; everything else in meta goes through
//! [`Engine`] so that another embedded store can replace it (sled 0.34 is unmaintained and
//! only makes writes durable on flush).
//!
//! Durability: a write survives a kill of the process as soon as it returns (it is in the
//! write-ahead file, see [`crate::wal`]); it survives a power cut once a durable write or the
//! flush timer has run after it.
//!
//! Keys are partitioned by their first byte (see [`space`]): the raft log, the raft hard
//! state, node-local bookkeeping and the replicated state machine.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wal::{Wal, WalPos, APPLIED_KEY};

/// First byte of every key: which part of the node's state it belongs to.
pub mod space {
    /// Raft log entries, key = space + index (u64 big-endian).
    pub const LOG: u8 = b'L';
    /// Raft hard state, conf state, snapshot metadata, applied index.
    pub const RAFT: u8 = b'R';
    /// The replicated state machine (the namespace). Everything under it is what
    /// snapshots carry and what replicas must agree on.
    pub const STATE: u8 = b'S';
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store I/O error: {0}; check the data directory's disk")]
    Io(String),
    #[error("metadata store holds a malformed record under {key}: {why}; the data directory is damaged, restore this node from its peers (wipe it and let a snapshot bring it back)")]
    Corrupt { key: String, why: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Writes applied together or not at all.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub(crate) ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// `end` of a scan: an empty slice means "to the end of the key space".
fn upper_bound<T: ?Sized + AsRef<[u8]>>(end: &T) -> Bound<&T> {
    if end.as_ref().is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end)
    }
}

/// Read access to an ordered key space.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Pairs with `start <= key < end` (an empty `end` means no upper bound), in key order,
    /// at most `limit` of them.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// An embedded ordered key-value store with atomic batches.
pub trait Engine: KvRead + Send + Sync + 'static {
    /// Applies the batch atomically; it survives a crash of this process once this returns.
    /// With `durable`, returns only once it (and every write before it) is on disk, so that
    /// it also survives a crash of the machine.
    fn write(&self, batch: WriteBatch, durable: bool) -> StoreResult<()>;

    /// Makes everything written so far durable in the engine's own files, so that nothing
    /// needs replaying at the next start. The engine also does this by itself from time to
    /// time.
    fn checkpoint(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// sled behind a write-ahead file: a write is in the file (one write(2), so it survives the
/// process being killed) before it is applied to sled; a durable write flushes the file; a
/// background thread flushes sled every `flush_every` and deletes the files that made
/// redundant. See [`crate::wal`].
pub struct SledEngine {
    db: sled::Db,
    wal: Mutex<Wal>,
    /// Held by whoever flushes sled and retires a write-ahead file (the timer, shutdown).
    flushing: Mutex<()>,
}

impl SledEngine {
    /// Opens the store of a node's data directory (`meta.sled`, `meta.wal`), applies what
    /// the write-ahead files left there hold, and starts the flush timer (it stops when the
    /// engine is dropped).
    pub fn open(dir: &Path, flush_every: Duration) -> StoreResult<Arc<SledEngine>> {
        let db = sled::Config::new()
            .path(dir.join("meta.sled"))
            .cache_capacity(256 * 1024 * 1024)
            // Flushed by our own timer, after which the write-ahead file it covers goes.
            .flush_every_ms(None)
            .open()?;
        let applied = db.get(APPLIED_KEY)?.and_then(|v| WalPos::decode(&v));
        let (wal, replay, gens) = Wal::open(&dir.join("meta.wal"), applied)?;
        if !replay.is_empty() {
            tracing::info!(
                batches = replay.len(),
                "replaying the metadata write-ahead files"
            );
            for b in replay {
                db.apply_batch(sled_batch(b))?;
            }
            db.flush()?;
        }
        wal.remove_replayed(&gens);
        let engine = Arc::new(SledEngine {
            db,
            wal: Mutex::new(wal),
            flushing: Mutex::new(()),
        });
        let weak = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("meta-flush".into())
            .spawn(move || loop {
                std::thread::sleep(flush_every);
                let Some(engine) = weak.upgrade() else { break };
                if let Err(e) = engine.checkpoint() {
                    tracing::error!(error = %e, "flushing the metadata store failed; the write-ahead file keeps growing until it works");
                }
            })
            .map_err(|e| StoreError::Io(format!("start the metadata flush thread: {e}")))?;
        Ok(engine)
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        // Every Wal method leaves it usable when it fails half-way (at worst a record is
        // written twice, which replay tolerates), so a poisoned lock is still consistent.
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sled_batch(batch: WriteBatch) -> sled::Batch {
    let mut b = sled::Batch::default();
    for (k, v) in batch.ops {
        match v {
            Some(v) => b.insert(k, v),
            None => b.remove(k),
        }
    }
    b
}

impl KvRead for SledEngine {
    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let upper = upper_bound(end);
        if !end.is_empty() && start >= end {
            return Ok(out);
        }
        for kv in self
            .db
            .range::<&[u8], _>((Bound::Included(start), upper))
            .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k != APPLIED_KEY))
            .take(limit)
        {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

impl Engine for SledEngine {
    fn write(&self, batch: WriteBatch, durable: bool) -> StoreResult<()> {
        let mut wal = self.wal();
        if !batch.is_empty() {
            let pos = wal.append(&batch)?;
            let mut b = sled_batch(batch);
            b.insert(APPLIED_KEY, pos.encode());
            // Applied under the same lock, so that a rotation never retires a file holding
            // a batch sled has not seen yet.
            self.db.apply_batch(b)?;
        }
        if durable {
            wal.sync()?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> StoreResult<()> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(retired) = self.wal().rotate()? else {
            return Ok(());
        };
        self.db.flush()?;
        self.wal().retire(retired);
        Ok(())
    }
}

/// An in-memory engine: for the deterministic raft simulation, where a "crash" keeps
/// exactly what was written (every write is treated as durable).
#[derive(Clone, Default)]
pub struct MemEngine {
    map: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemEngine {
    pub fn new() -> MemEngine {
        MemEngine::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated (every update
        // is a single insert/remove), so a poisoned lock is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvRead for MemEngine {
    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        if !end.is_empty() && start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .lock()
            .range::<[u8], _>((Bound::Included(start), upper_bound(end)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Engine for MemEngine {
    fn write(&self, batch: WriteBatch, _durable: bool) -> StoreResult<()> {
        let mut map = self.lock();
        for (k, v) in batch.ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

/// A view of one key space (`space` byte) of an underlying reader, with keys given
/// without the space byte.
pub struct SpaceView<'a> {
    pub(crate) base: &'a dyn KvRead,
    pub(crate) space: u8,
}

impl<'a> SpaceView<'a> {
    pub fn new(base: &'a dyn KvRead, space: u8) -> SpaceView<'a> {
        SpaceView { base, space }
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.space);
        k.extend_from_slice(key);
        k
    }
}

impl KvRead for SpaceView<'_> {
    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.base.get(&self.full(key))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let full_end = if end.is_empty() {
            vec![self.space + 1]
        } else {
            self.full(end)
        };
        Ok(self
            .base
            .scan(&self.full(start), &full_end, limit)?
            .into_iter()
            .map(|(mut k, v)| {
                k.remove(0);
                (k, v)
            })
            .collect())
    }
}

/// Uncommitted writes layered over a reader: reads see the writes. The state machine applies
/// commands through an overlay so that a failing command is discarded whole, and a run of
/// committed entries becomes one batch written with the applied index.
pub struct Overlay<'a> {
    base: &'a dyn KvRead,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn KvRead) -> Overlay<'a> {
        Overlay {
            base,
            pending: BTreeMap::new(),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Takes the writes of a child overlay (one that was layered over this one).
    pub fn absorb(&mut self, child: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        self.pending.extend(child);
    }

    /// The pending writes, for [`Overlay::absorb`] or a [`WriteBatch`].
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.pending
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

impl KvRead for Overlay<'_> {
    fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        if start >= end && !end.is_empty() {
            return Ok(Vec::new());
        }
        // Merge the base scan with the pending writes. Deleted keys can hide base rows, so
        // ask the base for as many extra rows as there are pending deletes in range.
        let upper = upper_bound(end);
        let pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .pending
            .range::<[u8], _>((Bound::Included(start), upper))
            .collect();
        let deletes = pending.iter().filter(|(_, v)| v.is_none()).count();
        let base = self.base.scan(
            start,
            end,
            limit.saturating_add(deletes).saturating_add(pending.len()),
        )?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (k, v) in pending {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_scan_merges_puts_and_deletes() {
        let eng = MemEngine::new();
        let mut b = WriteBatch::default();
        for i in 0u8..10 {
            b.put(vec![i], vec![i]);
        }
        eng.write(b, true).unwrap();
        let mut o = Overlay::new(&eng);
        o.delete(vec![1]);
        o.delete(vec![2]);
        o.put(vec![3], vec![33]);
        o.put(vec![20], vec![20]);
        let rows = o.scan(&[0], &[30], 4).unwrap();
        assert_eq!(
            rows,
            vec![
                (vec![0], vec![0]),
                (vec![3], vec![33]),
                (vec![4], vec![4]),
                (vec![5], vec![5])
            ]
        );
        assert_eq!(o.get(&[2]).unwrap(), None);
        assert_eq!(o.get(&[20]).unwrap(), Some(vec![20]));
    }

    #[test]
    fn space_view_strips_and_bounds() {
        let eng = MemEngine::new();
        let mut b = WriteBatch::default();
        b.put(vec![b'S', 1], vec![1]);
        b.put(vec![b'S', 2], vec![2]);
        b.put(vec![b'T', 0], vec![9]);
        eng.write(b, true).unwrap();
        let v = SpaceView::new(&eng, b'S');
        assert_eq!(v.scan(&[], &[], 10).unwrap().len(), 2);
        assert_eq!(v.get(&[2]).unwrap(), Some(vec![2]));
    }
}
