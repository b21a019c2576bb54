//! The one error type of the chunk server, and its mapping to the tonic Status codes that
//! clients tell apart (see the top of `chunk.proto`).

use std::net::SocketAddr;
use std::path::PathBuf;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Response metadata key carrying the version a server holds (on FAILED_PRECONDITION).
pub const VERSION_HEADER: &str = "x-kerfs-chunk-version";
/// Response metadata key carrying the index of the block that failed its checksum.
pub const CORRUPT_BLOCK_HEADER: &str = "x-kerfs-corrupt-block";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("chunk {chunk:016x} is not on this server; ask the metadata service for its current replicas")]
    NotFound { chunk: u64 },
    #[error("chunk {chunk:016x} is stale on this server: it holds version {held}, version {wanted} was asked; read another replica (this one needs re-replication)")]
    Stale { chunk: u64, held: u64, wanted: u64 },
    #[error("chunk {chunk:016x} is newer on this server: it holds version {held}, version {wanted} was asked; the caller's chunk table is out of date, ask the metadata service again")]
    Newer { chunk: u64, held: u64, wanted: u64 },
    #[error("chunk {chunk:016x} block {block} is corrupt on this server ({why}; file {path}); read another replica and have this one repaired")]
    Corrupt {
        chunk: u64,
        block: u64,
        path: PathBuf,
        why: String,
    },
    #[error("chunk {chunk:016x}: its header {path} is damaged ({why}); the chunk cannot be served from this server, read another replica and have this one repaired")]
    CorruptHeader {
        chunk: u64,
        path: PathBuf,
        why: String,
    },
    #[error("disk full while {op} {path}: nothing of this request was applied; write to another server or free space")]
    NoSpace { op: String, path: PathBuf },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("I/O error while {op} {path}: {source}; check the chunk server's disk")]
    Io {
        op: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path}: {why}")]
    DataDir { path: PathBuf, why: String },
    #[error("data directory {path} belongs to cluster {found}, not {expected}; give this server an empty directory (or the one of this cluster)")]
    WrongCluster {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("data directory {path} belongs to chunk server {found}, not {expected}; give each chunk server its own directory")]
    WrongServer {
        path: PathBuf,
        found: String,
        expected: u64,
    },
    #[error("data directory {path} is already used by another running chunk server; stop it first or use another directory")]
    Locked { path: PathBuf },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("transport: {0}")]
    Transport(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    /// Classifies an I/O error: ENOSPC and EDQUOT become [`StorageError::NoSpace`].
    pub fn io(op: &str, path: &std::path::Path, source: std::io::Error) -> StorageError {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::NoSpace {
                op: op.to_string(),
                path: path.to_owned(),
            },
            _ => StorageError::Io {
                op: op.to_string(),
                path: path.to_owned(),
                source,
            },
        }
    }

    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StorageError::Corrupt { .. } | StorageError::CorruptHeader { .. }
        )
    }

    /// The Status a client sees. Codes are part of the protocol (chunk.proto).
    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            StorageError::NotFound { .. } => Status::not_found(msg),
            StorageError::Stale { held, .. } | StorageError::Newer { held, .. } => {
                let mut s = Status::failed_precondition(msg);
                if let Ok(v) = MetadataValue::try_from(held.to_string()) {
                    s.metadata_mut().insert(VERSION_HEADER, v);
                }
                s
            }
            StorageError::Corrupt { block, .. } => {
                let mut s = Status::data_loss(msg);
                if let Ok(v) = MetadataValue::try_from(block.to_string()) {
                    s.metadata_mut().insert(CORRUPT_BLOCK_HEADER, v);
                }
                s
            }
            StorageError::CorruptHeader { .. } => Status::data_loss(msg),
            StorageError::NoSpace { .. } => Status::resource_exhausted(msg),
            StorageError::InvalidArgument(_) => Status::invalid_argument(msg),
            StorageError::Transport(_) => Status::unavailable(msg),
            _ => Status::new(Code::Internal, msg),
        }
    }
}

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Status {
        e.to_status()
    }
}
