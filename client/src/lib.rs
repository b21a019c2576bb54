//! KerFS client library: the one way programs reach the cluster. Tests, the FUSE mount, the
//! admin CLI and the checkpoint tools all go through it.
//!
//! [`MetaClient`] speaks to the metadata service: it finds the leader, follows redirects,
//! retries through elections until a deadline, and gives every write a (client, seq) pair
//! so that a retried write is applied exactly once.
//!
//! [`DataClient`] opens files; a [`FileHandle`] reads and writes their bytes on the chunk
//! servers (write-behind, read-ahead, replica failover, erasure coding).
//!
//! [`admin`] answers an operator's questions (cluster health, chunk servers, where a file's
//! copies are) as typed values that the admin CLI prints as text or JSON.
//!
//! [`members`] grows and shrinks the metadata group (add, remove, leader transfer).

pub mod admin;
mod chunks;
mod deferred;
pub mod ec;
mod error;
mod file;
pub mod members;
mod meta;

pub use error::{ClientError, ClientResult};
pub use file::{DataClient, DataConfig, Durability, FileHandle};
pub use kerfs_proto as proto;
pub use meta::{check, current_caller, MetaClient, MetaClientConfig};
