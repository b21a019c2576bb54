//! KerFS chunk server (kerfs-storage): stores chunks as files with a blake3 hash per 64 KiB
//! block, serves them over the `Chunk` gRPC service (`proto/proto/chunk.proto`), replicates
//! writes down a chain of servers, and scrubs.
//!
//! # For the client and metadata authors: RPC semantics
//!
//! * **Chunk ids** are allocated by the metadata service; 0 is reserved. An EC shard is a
//!   chunk with its own id; the client encodes and passes `shard_index` at creation.
//! * **Versions.** Every data call names the version it expects and is refused with
//!   `FAILED_PRECONDITION` unless the server holds exactly that version (message "stale" or
//!   "newer", held version in metadata [`VERSION_HEADER`]). A new write epoch is started by
//!   `SetVersion{from_version: V, version: V+1}` on the replicas that hold V (meta knows which):
//!   a replica holding anything but V (or V+1 already) refuses, so a server that missed an
//!   epoch can never be brought forward with old data. The bump is durable before the reply.
//! * **Write** (client streaming): one [`kerfs_proto::ChunkWriteHeader`] frame (chunk id,
//!   version, offset, optional total length, `chain` = the replicas after the one dialed,
//!   `sync`, `create` for a fresh chunk or a new replica/shard), then data frames of at most
//!   1 MiB, contiguous from `offset`. The dialed server checks its own copy first, then
//!   forwards header and frames to `chain[0]` as they arrive (that server forwards to
//!   `chain[1]`, ...). The reply ([`kerfs_proto::ChunkChainReply`]) lists one result per
//!   server of the chain (dialed server first) and `all_ok`; it comes back after every
//!   replica answered, so with `sync` every replica that says ok has the data on disk.
//!   The call fails as a whole (Status) only if the dialed server failed; a downstream
//!   failure is an entry with `ok = false` — the client must check `all_ok` and tell meta
//!   which replicas hold the new data.
//! * **Read** (server streaming): frames of at most 1 MiB from `offset`; the first one carries
//!   the chunk length and version. Bytes past the chunk's length are not sent (the client
//!   fills zeros up to the file size); holes read as zeros. A block failing its checksum ends
//!   the stream with `DATA_LOSS` naming chunk and block ([`CORRUPT_BLOCK_HEADER`]): go to
//!   another replica or reconstruct from shards, and report the replica.
//! * **Truncate** and **SetVersion** are unary and forwarded down `chain` like a write (send
//!   SetVersion with an empty chain to each replica when one stale replica must not stop the
//!   bump on the others). **Stat**, **List** (paged by id), **Delete** (`max_version` guards
//!   against deleting a re-created chunk), **Scrub** (verifies everything now),
//!   **ServerInfo**.
//! * Disk full is `RESOURCE_EXHAUSTED`: space is reserved before a write touches the disk,
//!   so a refused write changes nothing and acknowledged data stays readable.
//! * Heartbeats: [`server::HeartbeatConfig`] takes a function that delivers a
//!   [`kerfs_proto::ChunkHeartbeat`] to the metadata service (the daemon plugs the metadata
//!   client in); the server deletes what the [`kerfs_proto::ChunkHeartbeatReply`] lists and
//!   carries out its repair orders (copy a chunk from a peer, or rebuild an EC shard from k
//!   others), reporting each outcome in a later heartbeat.
//!
//! Start a server with [`server::run`]; the data directory is tagged with the cluster id and
//! the server id at first start and refused for any other ([`server::read_identity`] reads
//! them back, so a restarting daemon keeps its id). Chunk files can be located with
//! [`store::chunk_data_path`] (tools, fault-injection tests).

pub mod error;
pub mod metrics;
mod repair;
pub mod scrub;
pub mod server;
pub mod store;

pub use error::{StorageError, CORRUPT_BLOCK_HEADER, VERSION_HEADER};
pub use server::{read_identity, run, run_on, HeartbeatConfig, HeartbeatFn, ServerConfig};
pub use store::{ChunkStore, FileChunkStore, BLOCK_SIZE};
