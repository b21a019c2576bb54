//! What an operator asks of a cluster, as typed answers that `kerfsctl` prints as text or as
//! JSON: the health of the whole cluster (metadata members, chunk servers, capacity, chunks
//! lacking copies, and one verdict with the reasons for it), the chunk servers, the copies of
//! a file's chunks, and the repair queue; and the chunk servers' comings and goings (drain,
//! remove), which are metadata commands. Nothing here copies data: the metadata service's
//! mover does.

use serde::Serialize;

use kerfs_proto::{
    command, read_op, ChunkServerRecord, DrainChunkServer, DrainReport, DrainStatus, GetChunks,
    ListChunkServers, RemoveChunkServer, RepairStatus,
};

use crate::error::ClientResult;
use crate::meta::{check, MetaClient};

/// The verdict on a cluster, worst last (so `max` of several is the overall one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Health {
    /// Every member answers, every chunk has all its copies.
    #[serde(rename = "HEALTH_OK")]
    Ok,
    /// Redundancy is missing somewhere (a server down, chunks under-replicated, a metadata
    /// node unreachable, little space left), but every byte can still be read and written.
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    /// Data cannot be read (chunks with too few good copies) or the metadata group has no
    /// quorum.
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Ok => "HEALTH_OK",
            Health::Warn => "HEALTH_WARN",
            Health::Err => "HEALTH_ERR",
        }
    }
}

/// One metadata node as it answers for itself.
#[derive(Debug, Clone, Serialize)]
pub struct MetaMember {
    pub address: String,
    /// None when the node did not answer (then `error` says why).
    pub id: Option<u64>,
    /// "leader", "follower" (a voter), "learner" (added, catching up), "joining" (started
    /// with --join, not added yet), "removed", or "unreachable".
    pub role: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// First log index still kept (earlier ones are in the snapshot).
    pub first_index: u64,
    pub leader_id: u64,
    pub leader_address: String,
    pub error: Option<String>,
}

/// One chunk server as meta records it.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkServer {
    pub id: u64,
    pub address: String,
    /// "up", "down" or "draining".
    pub state: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Chunk space placed on it (placement balances on this).
    pub allocated_bytes: u64,
    pub chunks: u64,
    pub failure_domain: String,
}

impl From<ChunkServerRecord> for ChunkServer {
    fn from(s: ChunkServerRecord) -> ChunkServer {
        let info = s.info.unwrap_or_default();
        ChunkServer {
            id: info.id,
            address: info.address,
            state: s.state,
            capacity_bytes: info.capacity_bytes,
            used_bytes: info.used_bytes,
            allocated_bytes: s.allocated_bytes,
            chunks: info.chunk_count,
            failure_domain: info.failure_domain,
        }
    }
}

/// Chunks lacking copies and the repairs working on them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkHealth {
    pub under_replicated: u64,
    pub repairing: u64,
    /// Too few good copies left to read them at all.
    pub unreadable: u64,
    pub repaired_total: u64,
    pub failed_total: u64,
    /// Chunk servers being drained (not yet drained).
    pub draining_servers: u64,
    /// Chunks with all their copies, one of them on a draining server: still to move.
    pub to_move: u64,
}

/// The whole cluster at a glance (`kerfsctl status`).
#[derive(Debug, Clone, Serialize)]
pub struct ClusterHealth {
    pub health: Health,
    /// What is wrong, one sentence each, worst first; empty when healthy.
    pub problems: Vec<String>,
    /// The leader the metadata nodes agree on, if any.
    pub leader: Option<u64>,
    pub meta: Vec<MetaMember>,
    /// Empty when the metadata service could not be asked (no leader).
    pub chunk_servers: Vec<ChunkServer>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// None when the metadata service could not be asked.
    pub chunks: Option<ChunkHealth>,
}

/// Share of the chunk servers' capacity above which the cluster warns.
const FULL_WARN: f64 = 0.90;

/// Asks every metadata node in `addrs` for its own state, and the leader for the chunk
/// servers and the repair queue, and judges the result. Never fails: what could not be
/// asked is itself part of the answer.
pub async fn cluster_health(client: &MetaClient, addrs: &[String]) -> ClusterHealth {
    let mut meta = Vec::new();
    // The members the nodes know of are asked too (one added after `addrs` was written
    // down); a removed node stays listed only if it was given.
    let mut queue: Vec<String> = addrs.to_vec();
    let mut i = 0;
    while i < queue.len() {
        let addr = queue[i].clone();
        i += 1;
        meta.push(match client.node_status(&addr).await {
            Ok(s) => {
                for p in &s.peers {
                    if !p.addr.is_empty() && !queue.contains(&p.addr) {
                        queue.push(p.addr.clone());
                    }
                }
                MetaMember {
                    address: addr.clone(),
                    id: Some(s.id),
                    role: s.role,
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    first_index: s.first_index,
                    leader_id: s.leader_id,
                    leader_address: s.leader_addr,
                    error: None,
                }
            }
            Err(e) => MetaMember {
                address: addr.clone(),
                id: None,
                role: "unreachable".into(),
                term: 0,
                commit_index: 0,
                applied_index: 0,
                first_index: 0,
                leader_id: 0,
                leader_address: String::new(),
                error: Some(e.to_string()),
            },
        });
    }
    let leader = meta.iter().find(|m| m.role == "leader").and_then(|m| m.id);
    let (servers, chunks) = if leader.is_some() {
        let chunks = repair_report(client, 1).await.map(|r| r.0);
        (chunk_servers(client).await, chunks)
    } else {
        (Ok(Vec::new()), Ok(ChunkHealth::default()))
    };
    judge(meta, leader, servers, chunks)
}

/// The verdict from what was gathered (kept apart from the gathering so it can be tested
/// without a cluster).
fn judge(
    meta: Vec<MetaMember>,
    leader: Option<u64>,
    servers: ClientResult<Vec<ChunkServer>>,
    chunks: ClientResult<ChunkHealth>,
) -> ClusterHealth {
    let mut problems: Vec<(Health, String)> = Vec::new();
    let answering = meta.iter().filter(|m| m.error.is_none()).count();
    if leader.is_none() {
        problems.push((
            Health::Err,
            format!(
                "no metadata leader: {answering} of {} nodes answer; a majority must be up \
                 and reach each other (check their logs and network)",
                meta.len()
            ),
        ));
    }
    for m in meta.iter().filter(|m| m.error.is_some()) {
        problems.push((
            Health::Warn,
            format!(
                "metadata node {} does not answer: {}",
                m.address,
                m.error.as_deref().unwrap_or_default()
            ),
        ));
    }
    let servers = match servers {
        Ok(s) => s,
        Err(e) => {
            problems.push((Health::Err, format!("cannot list the chunk servers: {e}")));
            Vec::new()
        }
    };
    let chunks = match chunks {
        Ok(c) if leader.is_some() => Some(c),
        Ok(_) => None,
        Err(e) => {
            problems.push((Health::Err, format!("cannot read the repair queue: {e}")));
            None
        }
    };
    let down: Vec<&ChunkServer> = servers.iter().filter(|s| s.state == "down").collect();
    if !down.is_empty() {
        let names: Vec<String> = down
            .iter()
            .map(|s| format!("{} ({})", s.id, s.address))
            .collect();
        problems.push((
            Health::Warn,
            format!(
                "{} of {} chunk servers down: {}",
                down.len(),
                servers.len(),
                names.join(", ")
            ),
        ));
    }
    // Drained and removed servers take no placements: their space is not the cluster's.
    let up: Vec<&ChunkServer> = servers
        .iter()
        .filter(|s| s.state == "up" || s.state == "draining")
        .collect();
    let capacity_bytes: u64 = up.iter().map(|s| s.capacity_bytes).sum();
    let used_bytes: u64 = up.iter().map(|s| s.used_bytes).sum();
    if capacity_bytes > 0 && used_bytes as f64 > FULL_WARN * capacity_bytes as f64 {
        problems.push((
            Health::Warn,
            format!(
                "chunk servers {:.0}% full: add servers or free space before writes fail",
                100.0 * used_bytes as f64 / capacity_bytes as f64
            ),
        ));
    }
    if leader.is_some() && servers.is_empty() {
        problems.push((
            Health::Err,
            "no chunk servers registered: start `kerfsd chunk` on the data nodes".into(),
        ));
    }
    if let Some(c) = &chunks {
        if c.unreadable > 0 {
            problems.push((
                Health::Err,
                format!(
                    "{} chunks have too few good copies to be read: bring their servers \
                     back (`kerfsctl repair` lists them)",
                    c.unreadable
                ),
            ));
        }
        if c.under_replicated > c.unreadable {
            problems.push((
                Health::Warn,
                format!(
                    "{} chunks under-replicated ({} being repaired)",
                    c.under_replicated - c.unreadable,
                    c.repairing
                ),
            ));
        }
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.0));
    ClusterHealth {
        health: problems.iter().map(|p| p.0).max().unwrap_or(Health::Ok),
        problems: problems.into_iter().map(|p| p.1).collect(),
        leader,
        meta,
        chunk_servers: servers,
        capacity_bytes,
        used_bytes,
        chunks,
    }
}

/// Every chunk server meta knows, in id order.
pub async fn chunk_servers(client: &MetaClient) -> ClientResult<Vec<ChunkServer>> {
    let reply = check(
        client
            .read(read_op::Op::ListChunkServers(ListChunkServers {}))
            .await?,
    )?;
    let mut servers: Vec<ChunkServer> = reply.servers.into_iter().map(Into::into).collect();
    servers.sort_by_key(|s| s.id);
    Ok(servers)
}

/// The chunks lacking copies (at most `limit` of them listed), with the counts.
pub async fn repair_report(
    client: &MetaClient,
    limit: u32,
) -> ClientResult<(ChunkHealth, kerfs_proto::RepairReport)> {
    let report = check(
        client
            .read(read_op::Op::RepairStatus(RepairStatus {
                limit: limit.max(1),
            }))
            .await?,
    )?
    .repair
    .unwrap_or_default();
    let health = ChunkHealth {
        under_replicated: report.under_replicated,
        repairing: report.repairing,
        unreadable: report.unreadable,
        repaired_total: report.repaired_total,
        failed_total: report.failed_total,
        draining_servers: report.draining_servers,
        to_move: report.to_move,
    };
    Ok((health, report))
}

/// How the drain of one chunk server stands (`kerfsctl node drain`).
#[derive(Debug, Clone, Serialize)]
pub struct DrainProgress {
    pub server_id: u64,
    /// The server's state: "draining", "drained", or "down" (it drains when it comes back).
    pub state: String,
    /// Every chunk is off it and it is marked drained: `kerfsctl node remove` may take it out.
    pub drained: bool,
    /// Chunks that still have a copy (replica or shard) on it.
    pub chunks_left: u64,
    /// Of those, the ones being copied elsewhere now.
    pub moving: u64,
    /// Why some of the others wait (a few distinct reasons).
    pub notes: Vec<String>,
}

impl From<DrainReport> for DrainProgress {
    fn from(r: DrainReport) -> DrainProgress {
        DrainProgress {
            server_id: r.server_id,
            drained: r.state == "drained",
            state: r.state,
            chunks_left: r.chunks_left,
            moving: r.moving,
            notes: r.notes,
        }
    }
}

/// Starts draining chunk server `id` (or confirms a drain under way): every chunk moves off
/// it, each keeping its redundancy throughout.
pub async fn drain_server(client: &MetaClient, id: u64) -> ClientResult<DrainProgress> {
    let reply = check(
        client
            .write(command::Op::DrainChunkServer(DrainChunkServer {
                server_id: id,
            }))
            .await?,
    )?;
    Ok(reply.drain.unwrap_or_default().into())
}

/// How the drain of chunk server `id` stands.
pub async fn drain_progress(client: &MetaClient, id: u64) -> ClientResult<DrainProgress> {
    let reply = check(
        client
            .read(read_op::Op::DrainStatus(DrainStatus { server_id: id }))
            .await?,
    )?;
    Ok(reply.drain.unwrap_or_default().into())
}

/// Takes chunk server `id` out of the cluster. Fails (EBUSY, saying what to do) while a
/// chunk still needs the copy it holds.
pub async fn remove_server(client: &MetaClient, id: u64) -> ClientResult<()> {
    check(
        client
            .write(command::Op::RemoveChunkServer(RemoveChunkServer {
                server_id: id,
            }))
            .await?,
    )?;
    Ok(())
}

/// How one copy of a chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Holds the current version on a live server.
    Ok,
    /// Missed a write epoch: holds an old version.
    Stale,
    /// Its server found a block of it failing its checksum; repair replaces it.
    Corrupt,
    /// Its server is down or unknown.
    Missing,
}

/// One copy (replica or EC shard) of a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkCopy {
    pub server_id: u64,
    pub address: String,
    pub chunk_id: u64,
    /// The shard's position for EC layouts.
    pub shard_index: Option<u32>,
    pub state: CopyState,
    /// The server's state when the copy is missing.
    pub server_state: String,
}

/// One chunk of a file: its version and copies.
#[derive(Debug, Clone, Serialize)]
pub struct FileChunkCopies {
    pub index: u64,
    pub version: u64,
    pub good: usize,
    pub wanted: usize,
    pub copies: Vec<ChunkCopy>,
}

/// The chunks of a file and where their copies are.
#[derive(Debug, Clone, Serialize)]
pub struct FileChunks {
    pub path: String,
    pub ino: u64,
    /// `replicas R` or `ec K+M`, and the chunk size.
    pub layout: String,
    pub chunks: Vec<FileChunkCopies>,
}

/// A layout in words: `replicas 2, chunk 64 MiB` or `ec 4+2, chunk 64 MiB`.
pub fn describe_layout(l: &kerfs_proto::Layout) -> String {
    let size = l.chunk_size;
    let chunk = if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1 << 10 && size.is_multiple_of(1 << 10) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    };
    if l.ec_data > 0 {
        format!("ec {}+{}, chunk {chunk}", l.ec_data, l.ec_parity)
    } else {
        format!("replicas {}, chunk {chunk}", l.replicas)
    }
}

/// Where every copy of every chunk of `path` is, and how it stands.
pub async fn file_chunks(client: &MetaClient, path: &str) -> ClientResult<FileChunks> {
    let attr = client.resolve(path).await?;
    let servers = chunk_servers(client).await?;
    let server_state = |id: u64| {
        servers
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.state.clone())
            .unwrap_or_else(|| "unknown".into())
    };
    let reply = check(
        client
            .read(read_op::Op::GetChunks(GetChunks {
                ino: attr.ino,
                first_index: 0,
                count: 0,
            }))
            .await?,
    )?;
    let layout = reply.layout.unwrap_or_default();
    let ec = layout.ec_data > 0;
    let wanted = layout.copies();
    let chunks = reply
        .chunks
        .into_iter()
        .map(|c| {
            let copies: Vec<ChunkCopy> = c
                .replicas
                .iter()
                .map(|p| {
                    let st = server_state(p.server_id);
                    let state = if st != "up" && st != "draining" {
                        CopyState::Missing
                    } else if !p.current && p.corrupt {
                        CopyState::Corrupt
                    } else if !p.current {
                        CopyState::Stale
                    } else {
                        CopyState::Ok
                    };
                    ChunkCopy {
                        server_id: p.server_id,
                        address: p.address.clone(),
                        chunk_id: p.chunk_id,
                        shard_index: ec.then_some(p.shard_index),
                        state,
                        server_state: st,
                    }
                })
                .collect();
            FileChunkCopies {
                index: c.index,
                version: c.version,
                good: copies.iter().filter(|c| c.state == CopyState::Ok).count(),
                wanted,
                copies,
            }
        })
        .collect();
    Ok(FileChunks {
        path: path.to_string(),
        ino: attr.ino,
        layout: describe_layout(&layout),
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(addr: &str, id: u64, role: &str) -> MetaMember {
        MetaMember {
            address: addr.into(),
            id: Some(id),
            role: role.into(),
            term: 2,
            commit_index: 10,
            applied_index: 10,
            first_index: 1,
            leader_id: 1,
            leader_address: "a:1".into(),
            error: None,
        }
    }

    fn server(id: u64, state: &str, capacity: u64, used: u64) -> ChunkServer {
        ChunkServer {
            id,
            address: format!("s:{id}"),
            state: state.into(),
            capacity_bytes: capacity,
            used_bytes: used,
            allocated_bytes: 0,
            chunks: 0,
            failure_domain: String::new(),
        }
    }

    fn members() -> Vec<MetaMember> {
        vec![
            member("a:1", 1, "leader"),
            member("b:1", 2, "follower"),
            member("c:1", 3, "follower"),
        ]
    }

    #[test]
    fn a_whole_cluster_is_ok() {
        let h = judge(
            members(),
            Some(1),
            Ok(vec![server(1, "up", 100, 10), server(2, "up", 100, 10)]),
            Ok(ChunkHealth::default()),
        );
        assert_eq!(h.health, Health::Ok, "{:?}", h.problems);
        assert!(h.problems.is_empty());
        assert_eq!((h.capacity_bytes, h.used_bytes), (200, 20));
    }

    #[test]
    fn lost_redundancy_warns_and_lost_data_is_an_error() {
        let mut meta = members();
        meta[2].error = Some("connection refused".into());
        let h = judge(
            meta,
            Some(1),
            Ok(vec![server(1, "up", 100, 95), server(2, "down", 100, 10)]),
            Ok(ChunkHealth {
                under_replicated: 5,
                repairing: 2,
                ..Default::default()
            }),
        );
        assert_eq!(h.health, Health::Warn);
        let all = h.problems.join("\n");
        for what in [
            "c:1 does not answer",
            "1 of 2 chunk servers down",
            "95% full",
            "5 chunks under-replicated (2 being repaired)",
        ] {
            assert!(all.contains(what), "missing {what:?} in:\n{all}");
        }
        let h = judge(
            members(),
            Some(1),
            Ok(vec![server(1, "up", 100, 10)]),
            Ok(ChunkHealth {
                under_replicated: 3,
                unreadable: 1,
                ..Default::default()
            }),
        );
        assert_eq!(h.health, Health::Err);
        assert!(h.problems[0].contains("1 chunks have too few good copies"));
        assert!(h.problems[1].contains("2 chunks under-replicated"));
    }

    #[test]
    fn no_leader_is_an_error_that_says_how_many_answer() {
        let mut meta = members();
        meta[0].role = "candidate".into();
        meta[1].error = Some("timed out".into());
        let h = judge(meta, None, Ok(Vec::new()), Ok(ChunkHealth::default()));
        assert_eq!(h.health, Health::Err);
        assert!(
            h.problems[0].contains("2 of 3 nodes answer"),
            "{:?}",
            h.problems
        );
        assert!(h.chunks.is_none());
    }

    #[test]
    fn layouts_in_words() {
        let l = kerfs_proto::Layout {
            replicas: 2,
            chunk_size: 64 << 20,
            ..Default::default()
        };
        assert_eq!(describe_layout(&l), "replicas 2, chunk 64 MiB");
        let l = kerfs_proto::Layout {
            ec_data: 4,
            ec_parity: 2,
            chunk_size: 256 << 10,
            ..Default::default()
        };
        assert_eq!(describe_layout(&l), "ec 4+2, chunk 256 KiB");
    }
}
