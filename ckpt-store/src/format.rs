//! What the store keeps in KerFS: the version manifest (prost, framed with a magic, a format
//! version and a checksum) and the pack index files.
//!
//! ```text
//! manifest   "KRGCKPT\0" | format u32 | reserved u32 | payload len u64 | blake3(payload) | Manifest
//! pack index "KRGPIDX\0" | format u32 | reserved u32 | page count u64  | blake3(hashes)  | hashes
//! ```
//!
//! A pack holds only whole 4 KiB pages, appended in the order they were first seen, so the
//! index needs no offsets: page `i` of the pack is at byte `i * 4096` and its blake3 is the
//! `i`-th 32-byte hash of the index.

use crate::error::{CkptError, Result};

/// First bytes of a manifest file.
pub const MANIFEST_MAGIC: &[u8; 8] = b"KRGCKPT\0";
/// First bytes of a pack index file.
pub const INDEX_MAGIC: &[u8; 8] = b"KRGPIDX\0";
/// Format version written by this crate; higher versions are refused.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the framing in front of a manifest or index payload.
pub const FRAME_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// Page size of the image format.
pub const PAGE: usize = kerfs_ghost::PAGE as usize;

/// One checkpoint version of an application.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Manifest {
    /// The version number (the name of its directory under `versions/`).
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// When the checkpoint was taken (ms since the epoch).
    #[prost(uint64, tag = "2")]
    pub created_unix_ms: u64,
    /// The application name (last component of the store path).
    #[prost(string, tag = "3")]
    pub app: String,
    /// Host the checkpoint was taken on.
    #[prost(string, tag = "4")]
    pub host: String,
    /// Pack files the page references point into (names without extension, in `packs/`).
    #[prost(string, repeated, tag = "5")]
    pub packs: Vec<String>,
    /// One entry per checkpointed process.
    #[prost(message, repeated, tag = "6")]
    pub processes: Vec<ProcessEntry>,
    /// System V IPC objects (message queues, semaphore arrays, shared memory segments).
    #[prost(message, repeated, tag = "7")]
    pub ipc: Vec<IpcSnapshot>,
    /// Files copied into the version (`--copy-files`).
    #[prost(message, repeated, tag = "8")]
    pub files: Vec<CopiedFile>,
    /// Communication logs; filled by a later issue.
    #[prost(message, repeated, tag = "9")]
    pub comm_logs: Vec<CommLog>,
    /// What writing this version cost.
    #[prost(message, optional, tag = "10")]
    pub stats: Option<Stats>,
}

/// A process of a version: its ghost image, with page data replaced by references.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessEntry {
    /// PID as seen by the checkpointing host (informational).
    #[prost(int32, tag = "1")]
    pub host_pid: i32,
    /// Command name, for listings.
    #[prost(string, tag = "2")]
    pub comm: String,
    /// The image's header and metadata bytes, verbatim.
    #[prost(bytes = "vec", tag = "3")]
    pub head: Vec<u8>,
    // Tag 4 held the image's trailer verbatim. Pages taken from the previous version by write
    // tracking were never streamed, so the exporter's checksum does not cover them: the reader
    // checks every page against its pack index instead.
    /// Where each page of the image's page data is, in image order.
    #[prost(message, repeated, tag = "5")]
    pub runs: Vec<PageRefRun>,
}

/// Consecutive image pages stored consecutively in one pack (or all zero).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct PageRefRun {
    /// 0: the pages are all zero and not stored; `i + 1`: they are in `Manifest.packs[i]`.
    #[prost(uint32, tag = "1")]
    pub pack: u32,
    /// Page number of the first page in the pack.
    #[prost(uint64, tag = "2")]
    pub first: u64,
    /// Number of pages.
    #[prost(uint64, tag = "3")]
    pub count: u64,
}

/// A System V IPC object of the version. Its snapshot is a file of its own under
/// `versions/<N>/ipc/`, a `kerfs_ghost::ipc` image holding that one object (checksummed), so
/// that a version's manifest stays small however large its shared memory segments are.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IpcSnapshot {
    /// "sem", "msg" or "shm" (`kerfs_ghost::ipc::IpcKind::short`).
    #[prost(string, tag = "1")]
    pub kind: String,
    /// The IPC key.
    #[prost(int64, tag = "2")]
    pub key: i64,
    /// The IPC id to restore.
    #[prost(int64, tag = "3")]
    pub id: i64,
    /// File under `versions/<N>/ipc/` holding the contents.
    #[prost(string, tag = "4")]
    pub stored: String,
}

/// A local file copied into the version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CopiedFile {
    /// Its path on the checkpointing host (where a restart puts it back).
    #[prost(string, tag = "1")]
    pub path: String,
    /// Its name under `versions/<N>/files/`.
    #[prost(string, tag = "2")]
    pub stored: String,
    /// Size in bytes.
    #[prost(uint64, tag = "3")]
    pub size: u64,
    /// Permission bits.
    #[prost(uint32, tag = "4")]
    pub mode: u32,
    /// blake3 of the contents.
    #[prost(bytes = "vec", tag = "5")]
    pub hash: Vec<u8>,
}

/// A communication log (reserved for the uncoordinated-checkpoint issue).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommLog {
    /// Which channel it logs.
    #[prost(string, tag = "1")]
    pub channel: String,
    /// File under `versions/<N>/logs/`.
    #[prost(string, tag = "2")]
    pub stored: String,
}

/// What a checkpoint wrote, for `krg ls` and the tests.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Stats {
    /// Bytes of all ghost images of the version, as `krg checkpoint --to FILE` would write.
    #[prost(uint64, tag = "1")]
    pub image_bytes: u64,
    /// Bytes of page data in them.
    #[prost(uint64, tag = "2")]
    pub page_bytes: u64,
    /// Bytes of pages newly written to packs by this version.
    #[prost(uint64, tag = "3")]
    pub new_bytes: u64,
    /// Pages found already stored (earlier versions, other processes, this image).
    #[prost(uint64, tag = "4")]
    pub dedup_pages: u64,
    /// All-zero pages (not stored).
    #[prost(uint64, tag = "5")]
    pub zero_pages: u64,
    /// Wall time of the checkpoint.
    #[prost(uint64, tag = "6")]
    pub elapsed_ms: u64,
    /// Bytes of copied files.
    #[prost(uint64, tag = "7")]
    pub file_bytes: u64,
    /// Pages write tracking showed unchanged since the previous version: neither read from
    /// the process nor hashed, referenced where that version has them.
    #[prost(uint64, tag = "8")]
    pub reused_pages: u64,
    /// Bytes of the System V IPC snapshots.
    #[prost(uint64, tag = "9")]
    pub ipc_bytes: u64,
}

impl Stats {
    /// Bytes of memory read from the processes: all their pages but those write tracking
    /// showed unchanged since the previous version.
    pub fn read_bytes(&self) -> u64 {
        self.page_bytes
            .saturating_sub(self.reused_pages * PAGE as u64)
    }

    /// Page bytes per byte newly written (1.0 = nothing was deduplicated).
    pub fn dedup_ratio(&self) -> f64 {
        self.page_bytes as f64 / self.new_bytes.max(1) as f64
    }
}

fn frame(magic: &[u8; 8], count: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the framing; returns the count field and the payload.
fn unframe<'a>(magic: &[u8; 8], bytes: &'a [u8], object: &str) -> Result<(u64, &'a [u8])> {
    let damaged = |msg: String| CkptError::Damaged {
        object: object.to_string(),
        msg,
    };
    if bytes.len() < FRAME_LEN || &bytes[..8] != magic {
        return Err(damaged(format!(
            "{} bytes without the expected header (not written by krg, or truncated)",
            bytes.len()
        )));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    let version = u32::from_le_bytes(v);
    if version > FORMAT_VERSION {
        return Err(damaged(format!(
            "format version {version} is newer than this krg understands ({FORMAT_VERSION}); use a newer krg"
        )));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&bytes[16..24]);
    let payload = &bytes[FRAME_LEN..];
    if blake3::hash(payload).as_bytes() != &bytes[24..56] {
        return Err(damaged(
            "checksum mismatch (the file was altered or corrupted)".into(),
        ));
    }
    Ok((u64::from_le_bytes(c), payload))
}

impl Manifest {
    /// The manifest file's bytes.
    pub fn encode_file(&self) -> Vec<u8> {
        let payload = prost::Message::encode_to_vec(self);
        frame(MANIFEST_MAGIC, payload.len() as u64, &payload)
    }

    /// Decodes and checks a manifest file; `object` names it in errors.
    pub fn decode_file(bytes: &[u8], object: &str) -> Result<Manifest> {
        let (len, payload) = unframe(MANIFEST_MAGIC, bytes, object)?;
        if len != payload.len() as u64 {
            return Err(CkptError::Damaged {
                object: object.to_string(),
                msg: format!("announces {len} payload bytes, holds {}", payload.len()),
            });
        }
        prost::Message::decode(payload).map_err(|e| CkptError::Damaged {
            object: object.to_string(),
            msg: format!("does not decode: {e}"),
        })
    }
}

/// The page hashes of a pack, in pack order.
pub fn encode_index(hashes: &[[u8; 32]]) -> Vec<u8> {
    let flat: Vec<u8> = hashes.iter().flatten().copied().collect();
    frame(INDEX_MAGIC, hashes.len() as u64, &flat)
}

/// Decodes and checks a pack index file.
pub fn decode_index(bytes: &[u8], object: &str) -> Result<Vec<[u8; 32]>> {
    let (count, payload) = unframe(INDEX_MAGIC, bytes, object)?;
    if count.checked_mul(32) != Some(payload.len() as u64) {
        return Err(CkptError::Damaged {
            object: object.to_string(),
            msg: format!("announces {count} pages, holds {} bytes", payload.len()),
        });
    }
    Ok(payload
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip_and_damage() {
        let m = Manifest {
            version: 7,
            app: "app".into(),
            packs: vec!["p1".into()],
            processes: vec![ProcessEntry {
                head: vec![1, 2, 3],
                runs: vec![PageRefRun {
                    pack: 1,
                    first: 0,
                    count: 4,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut bytes = m.encode_file();
        assert_eq!(Manifest::decode_file(&bytes, "m").unwrap(), m);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let e = Manifest::decode_file(&bytes, "m").unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        assert!(Manifest::decode_file(b"short", "m").is_err());
    }

    #[test]
    fn index_round_trip() {
        let h = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(decode_index(&encode_index(&h), "i").unwrap(), h);
        let mut b = encode_index(&h);
        b.truncate(b.len() - 1);
        assert!(decode_index(&b, "i").is_err());
    }
}
