//! The raft log, hard state and snapshot metadata of one node, kept in the [`Engine`], as
//! raft-rs's [`Storage`]. Entries are stored under `space::LOG` + index (big-endian), the rest
//! under `space::RAFT`. The small fields are cached in memory; entries are read from the engine.
//!
//! Snapshots are made on request from the applied state machine (everything under
//! `space::STATE`), so the log can be compacted up to the applied index at any time.

use std::sync::Arc;

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::store::{space, Engine, KvRead, SpaceView, StoreError, StoreResult, WriteBatch};

const KEY_HARD_STATE: &[u8] = b"Rhard_state";
const KEY_CONF_STATE: &[u8] = b"Rconf_state";
const KEY_SNAPSHOT_META: &[u8] = b"Rsnapshot_meta";
/// The applied index: written in the same batch as the state it produced.
pub(crate) const KEY_APPLIED: &[u8] = b"Rapplied";

pub(crate) fn log_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(space::LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn decode<M: protobuf::Message>(key: &[u8], bytes: &[u8]) -> StoreResult<M> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    // Encoding a well-formed in-memory message into a Vec cannot fail.
    m.write_to_bytes().unwrap_or_default()
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// The persisted raft state of one node.
pub struct LogStore {
    engine: Arc<dyn Engine>,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry folded into the state machine and dropped from the log.
    snapshot_meta: SnapshotMetadata,
    last_index: u64,
    applied: u64,
}

impl LogStore {
    /// Loads what the engine holds. On a fresh engine, `voters` becomes the initial
    /// configuration (every node of a new cluster must be given the same list).
    pub fn open(engine: Arc<dyn Engine>, voters: &[u64]) -> StoreResult<LogStore> {
        let hard_state = match engine.get(KEY_HARD_STATE)? {
            Some(b) => decode(KEY_HARD_STATE, &b)?,
            None => HardState::default(),
        };
        let snapshot_meta: SnapshotMetadata = match engine.get(KEY_SNAPSHOT_META)? {
            Some(b) => decode(KEY_SNAPSHOT_META, &b)?,
            None => SnapshotMetadata::default(),
        };
        let conf_state = match engine.get(KEY_CONF_STATE)? {
            Some(b) => decode(KEY_CONF_STATE, &b)?,
            None => {
                let cs = ConfState {
                    voters: voters.to_vec(),
                    ..Default::default()
                };
                let mut b = WriteBatch::default();
                b.put(KEY_CONF_STATE.to_vec(), encode(&cs));
                engine.write(b, true)?;
                cs
            }
        };
        let applied = match engine.get(KEY_APPLIED)? {
            Some(b) => u64_from(KEY_APPLIED, &b)?,
            None => 0,
        };
        // The applied state is written without a flush and the commit index after it, so a
        // crash can leave applied > commit; every applied entry was committed, so the commit
        // index can safely be raised to it (raft refuses to start otherwise).
        let mut hard_state = hard_state;
        if applied > hard_state.commit {
            hard_state.commit = applied;
        }
        let last = engine.scan(&log_key(0), &[space::LOG + 1], usize::MAX)?;
        let last_index = match last.last() {
            Some((k, _)) => u64_from(k, &k[1..])?,
            None => snapshot_meta.index,
        };
        Ok(LogStore {
            engine,
            hard_state,
            conf_state,
            snapshot_meta,
            last_index,
            applied,
        })
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_meta.index
    }

    pub fn first(&self) -> u64 {
        self.snapshot_meta.index + 1
    }

    pub fn last(&self) -> u64 {
        self.last_index
    }

    /// Adds the appended entries (replacing any conflicting suffix) and the hard state to
    /// `batch`. The caller writes the batch durably, then calls [`LogStore::appended`].
    pub fn stage_append(&self, entries: &[Entry], hs: Option<&HardState>, batch: &mut WriteBatch) {
        if let Some(first) = entries.first() {
            // A leader change may overwrite an uncommitted suffix: drop what lies past the new
            // entries so the log stays contiguous.
            let new_last = first.index + entries.len() as u64 - 1;
            for i in (new_last + 1)..=self.last_index {
                batch.delete(log_key(i));
            }
            for e in entries {
                batch.put(log_key(e.index), encode(e));
            }
        }
        if let Some(hs) = hs {
            batch.put(KEY_HARD_STATE.to_vec(), encode(hs));
        }
    }

    pub fn appended(&mut self, entries: &[Entry], hs: Option<&HardState>) {
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
    }

    pub fn stage_commit(&mut self, commit: u64, batch: &mut WriteBatch) {
        self.hard_state.commit = commit;
        batch.put(KEY_HARD_STATE.to_vec(), encode(&self.hard_state));
    }

    pub fn stage_applied(&mut self, applied: u64, batch: &mut WriteBatch) {
        self.applied = applied;
        batch.put(KEY_APPLIED.to_vec(), applied.to_be_bytes().to_vec());
    }

    pub fn stage_conf_state(&mut self, cs: ConfState, batch: &mut WriteBatch) {
        batch.put(KEY_CONF_STATE.to_vec(), encode(&cs));
        self.conf_state = cs;
    }

    /// Drops log entries up to and including `index` (which must be applied and durable in
    /// the state machine).
    pub fn compact(&mut self, index: u64) -> StoreResult<()> {
        if index <= self.snapshot_meta.index || index > self.applied {
            return Ok(());
        }
        let term = self
            .term(index)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let mut batch = WriteBatch::default();
        for i in self.first()..=index {
            batch.delete(log_key(i));
        }
        let meta = SnapshotMetadata {
            index,
            term,
            conf_state: Some(self.conf_state.clone()).into(),
            ..Default::default()
        };
        batch.put(KEY_SNAPSHOT_META.to_vec(), encode(&meta));
        self.engine.write(batch, true)?;
        self.snapshot_meta = meta;
        Ok(())
    }

    /// Replaces the whole state (state machine, log) with a snapshot from the leader.
    pub fn install_snapshot(&mut self, snap: &Snapshot) -> StoreResult<()> {
        let meta = snap.get_metadata().clone();
        let pairs = decode_state(&snap.data)?;
        let mut batch = WriteBatch::default();
        // Wipe the old state machine and log.
        for (k, _) in self
            .engine
            .scan(&[space::STATE], &[space::STATE + 1], usize::MAX)?
        {
            batch.delete(k);
        }
        for (k, _) in self
            .engine
            .scan(&[space::LOG], &[space::LOG + 1], usize::MAX)?
        {
            batch.delete(k);
        }
        for (k, v) in pairs {
            let mut key = Vec::with_capacity(k.len() + 1);
            key.push(space::STATE);
            key.extend_from_slice(&k);
            batch.put(key, v);
        }
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        batch.put(KEY_HARD_STATE.to_vec(), encode(&hs));
        batch.put(KEY_CONF_STATE.to_vec(), encode(meta.get_conf_state()));
        batch.put(KEY_SNAPSHOT_META.to_vec(), encode(&meta));
        batch.put(KEY_APPLIED.to_vec(), meta.index.to_be_bytes().to_vec());
        self.engine.write(batch, true)?;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.last_index = meta.index;
        self.applied = meta.index;
        self.snapshot_meta = meta;
        Ok(())
    }

    fn entry(&self, index: u64) -> StoreResult<Option<Entry>> {
        let key = log_key(index);
        match self.engine.get(&key)? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }
}

fn u64_from(key: &[u8], b: &[u8]) -> StoreResult<u64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: format!("{} bytes where a u64 was expected", b.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Snapshot data: every state-machine pair, length-prefixed, then a blake3 of all of it.
pub(crate) fn encode_state(view: &dyn KvRead) -> StoreResult<Vec<u8>> {
    let mut out = Vec::new();
    for (k, v) in view.scan(&[], &[], usize::MAX)? {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(&v);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

fn decode_state(data: &[u8]) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let corrupt = |why: &str| StoreError::Corrupt {
        key: "snapshot".into(),
        why: why.into(),
    };
    if data.len() < 32 {
        return Err(corrupt("shorter than its checksum"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("checksum mismatch"));
    }
    let mut pairs = Vec::new();
    let mut rest = body;
    let take = |rest: &mut &[u8]| -> StoreResult<Vec<u8>> {
        if rest.len() < 4 {
            return Err(corrupt("truncated length"));
        }
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if tail.len() < len {
            return Err(corrupt("truncated record"));
        }
        let (v, tail) = tail.split_at(len);
        *rest = tail;
        Ok(v.to_vec())
    };
    while !rest.is_empty() {
        let k = take(&mut rest)?;
        let v = take(&mut rest)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let rows = self
            .engine
            .scan(&log_key(low), &log_key(high), usize::MAX)
            .map_err(store_err)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut size = 0u64;
        for (k, v) in rows {
            let e: Entry = decode(&k, &v).map_err(store_err)?;
            size += e.compute_size() as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.entry(idx).map_err(store_err)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied < request_index || self.applied == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let view = SpaceView::new(self.engine.as_ref(), space::STATE);
        let data = encode_state(&view).map_err(store_err)?;
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = self.applied;
        meta.term = self.term(self.applied)?;
        meta.set_conf_state(self.conf_state.clone());
        Ok(snap)
    }
}
