//! The one error type of the checkpoint store. Every message says what failed, where (the
//! KerFS path, version or pack) and what to do about it. The underlying error is part of the
//! message (field `cause`) rather than a `source`, so that `{:#}` chains do not print it twice.

use kerfs_client::ClientError;

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    /// A cluster operation on a path of the store failed.
    #[error("{what} {path}: {cause}")]
    Cluster {
        /// What was being done ("creating", "reading"...).
        what: String,
        /// The KerFS path it was done on.
        path: String,
        /// The client library's error (it names the chunk and servers for data errors).
        cause: Box<ClientError>,
    },
    /// Page data of a version cannot be read from any replica.
    #[error("version {version} of {app} cannot be restored: pack {pack} bytes {offset}..{end} are unreadable on every replica ({cause}). Restore an older version (`krg ls {app}`) or bring the chunk servers holding that data back")]
    PackUnreadable {
        /// The store path (kerfs:/...).
        app: String,
        /// The version being restored.
        version: u64,
        /// The pack file.
        pack: String,
        /// First byte of the range.
        offset: u64,
        /// End of the range (exclusive).
        end: u64,
        /// What the client library said.
        cause: Box<ClientError>,
    },
    /// A stored object (manifest, pack index, pack) is damaged or not what it should be.
    #[error("{object} is damaged: {msg}")]
    Damaged {
        /// The KerFS path of the object.
        object: String,
        /// What is wrong with it and what to do.
        msg: String,
    },
    /// The version asked for does not exist.
    #[error("{app} has no version {version} (see `krg ls {app}`)")]
    NoSuchVersion {
        /// The store path.
        app: String,
        /// The version asked for.
        version: u64,
    },
    /// The store holds no committed version at all.
    #[error("{app} holds no checkpoint yet (write one with `krg checkpoint PID --to {app}`)")]
    Empty {
        /// The store path.
        app: String,
    },
    /// A lock or marker file stands in the way.
    #[error("{0}")]
    Busy(String),
    /// The image stream handed to the store is not a ghost image.
    #[error("the ghost image stream is malformed: {0}")]
    BadStream(String),
    /// A local file could not be read or written.
    #[error("{what} {path}: {cause}")]
    Local {
        /// What was being done.
        what: String,
        /// The local path.
        path: String,
        /// The io error.
        cause: std::io::Error,
    },
    /// The background writer task ended before the checkpoint was complete.
    #[error("the checkpoint writer task stopped: {0}")]
    Writer(String),
    /// A store address that is not `kerfs:/path[@VERSION]`.
    #[error("{0}")]
    Address(String),
    /// An inconsistency the code should have made impossible.
    #[error("internal error (a bug in krg; please report it): {0}")]
    Internal(String),
}

/// Result with [`CkptError`].
pub type Result<T> = std::result::Result<T, CkptError>;

/// Wraps a client error with what was done on which path.
pub(crate) fn cluster(what: &str, path: &str) -> impl FnOnce(ClientError) -> CkptError {
    let (what, path) = (what.to_string(), path.to_string());
    move |cause| CkptError::Cluster {
        what,
        path,
        cause: Box::new(cause),
    }
}
