//! The namespace state machine: inodes, directory entries, xattrs, open-file sessions and
//! client sessions, changed only by committed [`Command`]s. Deterministic: the result of a
//! command depends only on the state and the command (its time is stamped in it).

use kerfs_proto::{Command, ReadOp, Reply};

use crate::store::{KvRead, Overlay};

/// Settings every replica must share (they shape results, so they are part of determinism).
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// Capacity reported by statfs until chunk servers report real capacity.
    pub capacity_bytes: u64,
    /// Inode count reported as the maximum by statfs.
    pub max_files: u64,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            capacity_bytes: 1 << 40,
            max_files: 1 << 32,
        }
    }
}

/// The namespace rules over a key space (keys without the space byte).
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    pub config: NamespaceConfig,
}

impl Namespace {
    pub fn new(config: NamespaceConfig) -> Namespace {
        Namespace { config }
    }

    /// Applies one committed command; writes only through `state`. A failing command
    /// leaves no write behind except its cached reply (for exactly-once retries).
    pub fn apply(&self, state: &mut Overlay<'_>, cmd: &Command) -> Reply {
        let _ = (state, cmd);
        Reply::error(libc_enosys(), "not implemented")
    }

    /// Serves one read from the applied state.
    pub fn read(&self, state: &dyn KvRead, op: &ReadOp) -> Reply {
        let _ = (state, op);
        Reply::error(libc_enosys(), "not implemented")
    }
}

fn libc_enosys() -> i32 {
    38
}
