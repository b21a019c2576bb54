//! The one error type of the client library. Every variant maps to a POSIX errno, so the
//! FUSE layer and the CLI can report it the way the kernel or a shell would.

use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered: the operation failed with a POSIX error.
    #[error("{message} (errno {errno})")]
    Fs { errno: i32, message: String },
    /// No metadata node answered usefully before the deadline.
    #[error("metadata service unreachable for {waited:?} (tried {addrs}); last error: {last}. Check that the metadata nodes run and that a majority of them can reach each other")]
    Unavailable {
        waited: Duration,
        addrs: String,
        last: String,
    },
    /// The cluster refused our key.
    #[error("refused by the cluster: {0}")]
    Auth(String),
    /// We sent something the cluster could not take (a bug or a version mismatch).
    #[error("request rejected by the metadata service: {0}")]
    BadRequest(String),
    #[error("client configuration: {0}")]
    Config(String),
    /// The data path failed: chunk servers unreachable, every replica bad, disk full. The
    /// message names the file, the chunk and the servers, and what to check.
    #[error("{message} (errno {errno})")]
    Io { errno: i32, message: String },
}

impl ClientError {
    /// The errno a filesystem call should fail with.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Fs { errno, .. } => *errno,
            ClientError::Unavailable { .. } => libc::ETIMEDOUT,
            ClientError::Auth(_) => libc::EACCES,
            ClientError::BadRequest(_) => libc::EINVAL,
            ClientError::Config(_) => libc::EINVAL,
            ClientError::Io { errno, .. } => *errno,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;
