//! The one error type of the crate: every failure names what failed and, where the user can do
//! something about it, says what to do.

use std::io;

/// Everything export, import and the resource access objects can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GhostError {
    /// A system call on the target process or on /proc failed.
    #[error("{what} failed for pid {pid}: {source}")]
    Sys {
        /// The operation, e.g. "PTRACE_SEIZE".
        what: String,
        /// The process it was done on.
        pid: i32,
        /// The errno.
        source: io::Error,
    },
    /// Reading or writing the image through a resource access object failed.
    #[error("{what} on {target} failed: {source}")]
    Io {
        /// What was being done ("writing the image", "reading the header"...).
        what: String,
        /// The resource access object, e.g. "file /tmp/x.ghost".
        target: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The image is not a ghost image, is damaged, truncated or comes from a newer format.
    #[error("ghost image refused: {0}")]
    BadImage(String),
    /// The image needs something this host does not have (CPU features, vDSO layout, a file).
    #[error("ghost image cannot be restored here: {0}")]
    Incompatible(String),
    /// The process uses something this implementation cannot capture or restore.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The process does not exist or cannot be traced.
    #[error("process {pid}: {msg}")]
    Process {
        /// The process.
        pid: i32,
        /// What is wrong and what to do.
        msg: String,
    },
    /// The process holds something a restart could not rebuild faithfully (see
    /// [`crate::FdPolicy`] for fds); the export was refused before anything was written, and
    /// the process was left running.
    #[error("{}", crate::restorable::refusal_message(*pid, comm, problems))]
    Unrestorable {
        /// The process.
        pid: i32,
        /// Its command name.
        comm: String,
        /// Everything that cannot be restored.
        problems: Vec<crate::Problem>,
    },
    /// An option given to export or import contradicts itself or the process.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// Restoring the process failed after it was created; the half-built process was killed.
    #[error("restore failed at step '{step}': {msg}")]
    Restore {
        /// The step (e.g. "mmap 0x400000-0x401000").
        step: String,
        /// The detail.
        msg: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = GhostError> = std::result::Result<T, E>;

impl GhostError {
    /// A `Sys` error built from the current errno.
    pub(crate) fn last_os(what: impl Into<String>, pid: i32) -> Self {
        GhostError::Sys {
            what: what.into(),
            pid,
            source: io::Error::last_os_error(),
        }
    }

    /// A `Sys` error from an io::Error.
    pub(crate) fn sys(what: impl Into<String>, pid: i32, source: io::Error) -> Self {
        GhostError::Sys {
            what: what.into(),
            pid,
            source,
        }
    }
}
