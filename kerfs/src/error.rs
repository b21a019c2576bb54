//! The one error type of the mount: an errno for the kernel plus a sentence for the log.

use kerfs_client::ClientError;

/// A failed filesystem operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> FsError {
        FsError {
            errno,
            message: message.into(),
        }
    }

    /// Whether this failure is worth a warning in the log: the usual answers of a working
    /// filesystem (no such file, exists, permission) are not.
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self.errno,
            libc::EIO | libc::ETIMEDOUT | libc::ENOSYS | libc::EPROTO
        )
    }
}

impl From<ClientError> for FsError {
    fn from(e: ClientError) -> FsError {
        FsError {
            errno: e.errno(),
            message: e.to_string(),
        }
    }
}
