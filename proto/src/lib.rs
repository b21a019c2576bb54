//! The KerFS wire format: the protobuf messages and gRPC services every daemon and client
//! speaks (generated from `proto/kerfs.proto`), errno constants shared by all sides, the
//! cluster key that every RPC must prove knowledge of, and the permission rule every side
//! applies to the callers and attributes those messages carry.

pub mod auth;
pub mod perm;

/// Generated messages and services of package `kerfs.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kerfs.v1");
}

pub use v1::*;

/// Largest gRPC message either side accepts. Raft snapshots travel inside one message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Longest file name (bytes), as Linux NAME_MAX.
pub const NAME_MAX: usize = 255;
/// Longest path or symlink target (bytes, without the terminating NUL), as Linux PATH_MAX - 1.
pub const PATH_MAX: usize = 4095;

/// Flags of [`Rename`], with the values of Linux renameat2(2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// Flags of [`SetXattr`], with the values of Linux setxattr(2).
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

/// The root directory's inode number (as FUSE expects).
pub const ROOT_INO: u64 = 1;

impl Timespec {
    pub fn from_system_time(t: std::time::SystemTime) -> Timespec {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                // Before the epoch: normalise so that nsec stays in 0..1e9.
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec { sec, nsec }
            }
        }
    }

    pub fn now() -> Timespec {
        Timespec::from_system_time(std::time::SystemTime::now())
    }

    /// Nanoseconds since the epoch, saturating.
    pub fn as_nanos(&self) -> i128 {
        self.sec as i128 * 1_000_000_000 + self.nsec as i128
    }
}

impl Layout {
    /// Placements each chunk wants: R replicas, or k + m shards.
    pub fn copies(&self) -> usize {
        if self.ec_data == 0 {
            self.replicas as usize
        } else {
            (self.ec_data + self.ec_parity) as usize
        }
    }

    /// Good placements a chunk needs to be read at all: one replica, or k shards.
    pub fn readable_with(&self) -> usize {
        if self.ec_data == 0 {
            1
        } else {
            self.ec_data as usize
        }
    }
}

impl Reply {
    /// A failed operation: `errno` (a Linux errno value) and a sentence saying what to do.
    pub fn error(errno: i32, message: impl Into<String>) -> Reply {
        Reply {
            errno,
            message: message.into(),
            ..Default::default()
        }
    }

    pub fn is_ok(&self) -> bool {
        self.errno == 0
    }
}
