//! KerFS metadata service: one raft-rs group of 3 or 5 nodes replicating the namespace
//! state machine, persisted in an embedded store behind [`store::Engine`].

pub mod namespace;
pub mod store;
