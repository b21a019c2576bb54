//! KerFS metadata service: one raft-rs group of 3 or 5 nodes replicating the namespace
//! state machine, persisted in an embedded store behind [`store::Engine`].
//!
//! - [`store`]: the engine trait (sled, memory) and the overlay commands are applied through.
//! - [`wal`]: the write-ahead file that makes sled's writes survive a kill at once.
//! - [`raft_log`]: raft's log and hard state in the engine.
//! - [`lease`]: the leader lease of the `lease` read mode.
//! - [`members`]: the group's membership record and the rules for changing it.
//! - [`node`]: one node's raft core, I/O-free: feed it, persist, send what it returns.
//! - [`namespace`]: the replicated state machine (inodes, entries, sessions).
//! - [`server`]: a node as a gRPC service with its driver thread, transport and metrics.

pub mod lease;
pub mod members;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod raft_log;
pub mod server;
pub mod store;
mod wal;

pub use node::{AppliedCommand, MetaNode, NodeConfig, NodeError, ReadyOutput};
pub use server::{run, ReadMode, ServerConfig, ServerError};
