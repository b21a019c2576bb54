//! The checkpoint store: versioned, atomic, deduplicated process checkpoints in KerFS.
//!
//! An application's checkpoints live under a KerFS path (`kerfs:/ckpt/myapp`). Each
//! checkpoint is a numbered *version*: a manifest (prost) holding, per process, the ghost
//! image's header and metadata verbatim and references to its pages, which are
//! stored content-addressed (blake3) in pack files shared by every version, so a later
//! checkpoint writes only pages whose content is new and identical pages of different
//! processes are stored once; all-zero pages are not stored at all.
//!
//! * [`Store::begin_checkpoint`] → [`Checkpoint`]: [`Checkpoint::image_sink`] is the
//!   `GhostWriter` that `kerfs_ghost::export_process` streams into; [`Checkpoint::commit`]
//!   makes the version durable and visible with one rename.
//! * [`Store::open_version`] → [`OpenVersion::reader`]: the `GhostReader` that re-assembles
//!   the original image, every page checked against its pack index, each distinct page
//!   read once however many image pages share its content.
//! * [`Checkpoint::add_ipc`] stores System V IPC objects (`kerfs_ghost::ipc` snapshots) in the
//!   version; [`OpenVersion::ipc_objects`] reads them back, checked.
//! * [`Store::gc`] with a [`Retention`]: removes old versions and unreferenced packs, safe
//!   against a checkpoint being written at the same time.
//!
//! Everything goes through the KerFS client library, never through a mount. The ghost crate
//! knows nothing of this one.

mod error;
pub mod format;
mod gc;
mod reader;
mod store;
mod writer;

pub use error::{CkptError, Result};
pub use format::{Manifest, Stats};
pub use gc::{parse_duration, GcReport, Retention};
pub use reader::{OpenVersion, ProcessReader};
pub use store::{committed_number, Store, StoreAddr, VersionInfo};
pub use writer::{Checkpoint, CommitReport, ImageSink, ImageTask};
