//! The write-ahead file in front of sled: every batch the engine applies is first appended
//! here with one write(2), so that it survives a kill -9 of the process the moment the call
//! returns, without a disk flush. sled itself keeps writes in its own memory until flushed;
//! the engine flushes it on a timer and then drops the write-ahead files that the flush made
//! redundant. A durable write (and [`Wal::sync`]) flushes the write-ahead files instead, which
//! costs one fdatasync of a small append-only file rather than a sled flush.
//!
//! Files are `DIR/GEN.wal`, a header then records `[len u64][blake3 of payload, 8 bytes]
//! [payload]`. Replay applies every record of every file in generation order; applying a
//! batch again over a state that already holds it, or newer writes, ends in the same state,
//! because each batch only puts or deletes whole values and they are replayed in order.
//! Every batch sled applies carries the position of its record ([`WalPos`]) under
//! [`APPLIED_KEY`], so that replay skips what sled already has on disk: after a power cut,
//! sled may hold writes whose records the unflushed write-ahead file lost, and replaying an
//! older prefix over them would mix two points in time.
//!
//! A record cut short or failing its hash is a write the process did not finish or the
//! machine lost in a power cut: replay stops there, and files after it are set aside (no
//! durable write can have returned after it, since a sync flushes every file in order).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use crate::store::{StoreError, StoreResult, WriteBatch};

const HEADER: &[u8; 8] = b"KERFSWL1";
const HASH_LEN: usize = 8;

/// The sled key under which each applied batch records its [`WalPos`]. Outside the key
/// spaces of [`crate::store::space`]; the engine hides it from reads.
pub(crate) const APPLIED_KEY: &[u8] = b"\0wal-applied";

/// Where a record ends: its file's generation and the byte offset after it. Ordered as the
/// records were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WalPos {
    pub gen: u64,
    pub end: u64,
}

impl WalPos {
    pub fn encode(self) -> Vec<u8> {
        let mut v = self.gen.to_be_bytes().to_vec();
        v.extend_from_slice(&self.end.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<WalPos> {
        let gen = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let end = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
        Some(WalPos { gen, end })
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn hash8(payload: &[u8]) -> [u8; HASH_LEN] {
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&blake3::hash(payload).as_bytes()[..HASH_LEN]);
    h
}

fn encode(batch: &WriteBatch) -> Vec<u8> {
    let size: usize = batch
        .ops
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
        .sum();
    let mut payload = Vec::with_capacity(4 + size);
    payload.extend_from_slice(&(batch.ops.len() as u32).to_le_bytes());
    for (k, v) in &batch.ops {
        payload.push(u8::from(v.is_some()));
        payload.extend_from_slice(&(k.len() as u32).to_le_bytes());
        payload.extend_from_slice(k);
        if let Some(v) = v {
            payload.extend_from_slice(&(v.len() as u32).to_le_bytes());
            payload.extend_from_slice(v);
        }
    }
    let mut rec = Vec::with_capacity(8 + HASH_LEN + payload.len());
    rec.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    rec.extend_from_slice(&hash8(&payload));
    rec.extend_from_slice(&payload);
    rec
}

/// Reads `n` bytes at `*at` of `b`, moving `*at` on.
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
    let s = b.get(*at..at.checked_add(n)?)?;
    *at += n;
    Some(s)
}

fn take_u32(b: &[u8], at: &mut usize) -> Option<usize> {
    let s = take(b, at, 4)?;
    Some(u32::from_le_bytes(s.try_into().ok()?) as usize)
}

fn decode_payload(p: &[u8]) -> Option<WriteBatch> {
    let mut at = 0;
    let n = take_u32(p, &mut at)?;
    let mut batch = WriteBatch::default();
    for _ in 0..n {
        let put = *take(p, &mut at, 1)?.first()? == 1;
        let klen = take_u32(p, &mut at)?;
        let key = take(p, &mut at, klen)?.to_vec();
        if put {
            let vlen = take_u32(p, &mut at)?;
            batch.put(key, take(p, &mut at, vlen)?.to_vec());
        } else {
            batch.delete(key);
        }
    }
    (at == p.len()).then_some(batch)
}

/// What one file holds: its batches with the offset each ends at, the length of its good
/// prefix (shorter than the file when a record is torn) and the file's length.
struct FileContents {
    records: Vec<(WriteBatch, u64)>,
    good: u64,
    len: u64,
}

fn read_file(path: &Path) -> StoreResult<FileContents> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_err("read write-ahead file", path, e))?;
    let mut out = Vec::new();
    if bytes.len() < HEADER.len() {
        return Ok(FileContents {
            records: out,
            good: 0,
            len: bytes.len() as u64,
        });
    }
    if &bytes[..HEADER.len()] != HEADER {
        return Err(StoreError::Corrupt {
            key: path.display().to_string(),
            why: "not a KerFS write-ahead file".into(),
        });
    }
    let mut at = HEADER.len();
    loop {
        let start = at;
        let Some(len) = take(&bytes, &mut at, 8)
            .and_then(|s| s.try_into().ok())
            .and_then(|s| usize::try_from(u64::from_le_bytes(s)).ok())
        else {
            return Ok(FileContents {
                records: out,
                good: start as u64,
                len: bytes.len() as u64,
            });
        };
        let rec = take(&bytes, &mut at, HASH_LEN)
            .zip(take(&bytes, &mut at, len))
            .filter(|(h, p)| *h == hash8(p))
            .and_then(|(_, p)| decode_payload(p));
        match rec {
            Some(batch) => out.push((batch, at as u64)),
            None => {
                return Ok(FileContents {
                    records: out,
                    good: start as u64,
                    len: bytes.len() as u64,
                })
            }
        }
    }
}

/// The write-ahead files of one engine.
pub(crate) struct Wal {
    dir: PathBuf,
    gen: u64,
    current: Arc<File>,
    /// Bytes appended to `current` since it was created.
    written: u64,
    /// The file rotated out by a sled flush still running: its batches are in sled's memory,
    /// maybe not yet on disk, so a sync must flush it too.
    retiring: Option<(u64, Arc<File>)>,
}

/// A file taken out of use by [`Wal::rotate`], deleted by [`Wal::retire`] once sled holds
/// its batches on disk.
pub(crate) struct Retired(u64);

impl Wal {
    /// Opens `dir`, returning the batches of the files left there that come after
    /// `applied` (in order, to be applied again) and the generations of those files (to be
    /// deleted once that is flushed).
    pub fn open(
        dir: &Path,
        applied: Option<WalPos>,
    ) -> StoreResult<(Wal, Vec<WriteBatch>, Vec<u64>)> {
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let mut gens: Vec<u64> = fs::read_dir(dir)
            .map_err(|e| io_err("list", dir, e))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".wal")?
                    .parse::<u64>()
                    .ok()
            })
            .collect();
        gens.sort_unstable();
        let mut batches = Vec::new();
        for (i, &g) in gens.iter().enumerate() {
            let path = Self::path_of(dir, g);
            let FileContents { records, good, len } = read_file(&path)?;
            batches.extend(
                records
                    .into_iter()
                    .filter(|(_, end)| applied.is_none_or(|a| WalPos { gen: g, end: *end } > a))
                    .map(|(b, _)| b),
            );
            let covered = applied.is_some_and(|a| WalPos { gen: g, end: good } < a);
            if good < len && !covered {
                warn!(file = %path.display(), at = good, len, "write-ahead file ends in an unfinished record (a write cut short by a crash); replaying up to it");
                // Cut it off, or the next start would find it again in the middle.
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(good))
                    .map_err(|e| io_err("truncate write-ahead file", &path, e))?;
                for &later in &gens[i + 1..] {
                    let from = Self::path_of(dir, later);
                    let to = from.with_extension("wal.unreplayed");
                    tracing::error!(file = %from.display(), kept_as = %to.display(), "a write-ahead file after a damaged record is not replayed (only writes no fsync waited for can be in it); the node catches up from its peers");
                    fs::rename(&from, &to).map_err(|e| io_err("set aside", &from, e))?;
                }
                gens.truncate(i + 1);
                break;
            }
        }
        let gen = gens
            .last()
            .map_or(1, |g| g + 1)
            .max(applied.map_or(0, |a| a.gen + 1));
        let current = Self::create(dir, gen)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                gen,
                current: Arc::new(current),
                written: 0,
                retiring: None,
            },
            batches,
            gens,
        ))
    }

    fn path_of(dir: &Path, gen: u64) -> PathBuf {
        dir.join(format!("{gen:020}.wal"))
    }

    fn create(dir: &Path, gen: u64) -> StoreResult<File> {
        let path = Self::path_of(dir, gen);
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("create write-ahead file", &path, e))?;
        f.write_all(HEADER).map_err(|e| io_err("write", &path, e))?;
        // The new file's name must survive a power cut once something in it was synced.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(f)
    }

    /// Appends one batch (one write(2)); returns where its record ends.
    pub fn append(&mut self, batch: &WriteBatch) -> StoreResult<WalPos> {
        let rec = encode(batch);
        (&*self.current)
            .write_all(&rec)
            .map_err(|e| io_err("append to", &Self::path_of(&self.dir, self.gen), e))?;
        self.written += rec.len() as u64;
        Ok(WalPos {
            gen: self.gen,
            end: HEADER.len() as u64 + self.written,
        })
    }

    /// Puts everything appended so far on disk.
    pub fn sync(&self) -> StoreResult<()> {
        if let Some((g, f)) = &self.retiring {
            f.sync_data()
                .map_err(|e| io_err("fdatasync", &Self::path_of(&self.dir, *g), e))?;
        }
        self.current
            .sync_data()
            .map_err(|e| io_err("fdatasync", &Self::path_of(&self.dir, self.gen), e))
    }

    /// Starts a new file if the current one holds anything; the caller flushes sled and
    /// then calls [`Wal::retire`] with what this returned.
    pub fn rotate(&mut self) -> StoreResult<Option<Retired>> {
        if self.written == 0 {
            return Ok(None);
        }
        let next = Arc::new(Self::create(&self.dir, self.gen + 1)?);
        let old = std::mem::replace(&mut self.current, next);
        self.retiring = Some((self.gen, old));
        self.gen += 1;
        self.written = 0;
        Ok(Some(Retired(self.gen - 1)))
    }

    /// Deletes a rotated file whose batches sled now has on disk.
    pub fn retire(&mut self, r: Retired) {
        if self.retiring.as_ref().is_some_and(|(g, _)| *g == r.0) {
            self.retiring = None;
        }
        self.remove(r.0);
    }

    /// Deletes files of earlier runs whose batches were replayed and flushed.
    pub fn remove_replayed(&self, gens: &[u64]) {
        for &g in gens {
            self.remove(g);
        }
    }

    fn remove(&self, gen: u64) {
        let path = Self::path_of(&self.dir, gen);
        if let Err(e) = fs::remove_file(&path) {
            // Harmless: the next start replays it again, to the same state.
            warn!(file = %path.display(), error = %e, "could not delete a flushed write-ahead file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: u8) -> WriteBatch {
        let mut b = WriteBatch::default();
        b.put(vec![i], vec![i; i as usize]);
        b.delete(vec![i, 0]);
        b
    }

    fn keys(batches: &[WriteBatch]) -> Vec<Vec<u8>> {
        batches.iter().map(|b| b.ops[0].0.clone()).collect()
    }

    #[test]
    fn batches_come_back_in_order_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, old, _) = Wal::open(dir.path(), None).unwrap();
            assert!(old.is_empty());
            w.append(&batch(1)).unwrap();
            // Not retired: as if the process died during the sled flush.
            let _never_retired = w.rotate().unwrap().expect("something to rotate");
            w.append(&batch(2)).unwrap();
            w.append(&batch(3)).unwrap();
            w.sync().unwrap();
        }
        let (_, old, gens) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(keys(&old), vec![vec![1], vec![2], vec![3]]);
        assert_eq!(old[1].ops[1], (vec![2, 0], None));
        assert_eq!(gens.len(), 2);
    }

    #[test]
    fn what_sled_already_applied_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let applied;
        {
            let (mut w, _, _) = Wal::open(dir.path(), None).unwrap();
            w.append(&batch(1)).unwrap();
            applied = w.append(&batch(2)).unwrap();
            w.append(&batch(3)).unwrap();
        }
        let (w, old, _) = Wal::open(dir.path(), Some(applied)).unwrap();
        assert_eq!(keys(&old), vec![vec![3]]);
        assert!(w.gen > applied.gen);
        assert_eq!(WalPos::decode(&applied.encode()), Some(applied));
    }

    #[test]
    fn retired_files_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, _, _) = Wal::open(dir.path(), None).unwrap();
            w.append(&batch(1)).unwrap();
            let r = w.rotate().unwrap().unwrap();
            w.retire(r);
            w.append(&batch(2)).unwrap();
        }
        let (_, old, _) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(keys(&old), vec![vec![2]]);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_files_after_damage_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let gen;
        {
            let (mut w, _, _) = Wal::open(dir.path(), None).unwrap();
            w.append(&batch(1)).unwrap();
            w.append(&batch(2)).unwrap();
            gen = w.gen;
        }
        let path = Wal::path_of(dir.path(), gen);
        let len = fs::metadata(&path).unwrap().len();
        // Cut the last record short: it is dropped, the first one kept.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let (w, old, _) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(keys(&old), vec![vec![1]]);
        drop(w);
        // The torn tail was cut off: the file, no longer the newest, still opens.
        let (w, old, _) = Wal::open(dir.path(), None).unwrap();
        assert_eq!(keys(&old), vec![vec![1]]);
        drop(w);
        // Now a flipped byte in the first record of a file that is no longer the newest:
        // replay stops there and the later file is set aside, not replayed.
        let (mut w, _, _) = Wal::open(dir.path(), None).unwrap();
        w.append(&batch(3)).unwrap();
        let later = w.gen;
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER.len() + 8 + HASH_LEN + 6] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (_, old, gens) = Wal::open(dir.path(), None).unwrap();
        assert!(old.is_empty(), "{:?}", keys(&old));
        assert_eq!(gens, vec![gen]);
        assert!(Wal::path_of(dir.path(), later)
            .with_extension("wal.unreplayed")
            .exists());
    }
}
