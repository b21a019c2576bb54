//! The Prometheus text endpoint of a metadata node: raft term, commit and applied index,
//! leadership, proposals. A deliberately tiny HTTP/1.0 responder: every request, whatever
//! its path, gets the metrics page.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Gauges and counters the driver thread updates and the endpoint reads.
#[derive(Debug, Default)]
pub struct MetaMetrics {
    pub node_id: AtomicU64,
    pub term: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    pub is_leader: AtomicU64,
    pub leader_id: AtomicU64,
    pub proposals_total: AtomicU64,
    /// Raft log writes flushed to disk before the node went on (new term or vote, or an
    /// entry an fsync asked for); every other write waits for the flush timer.
    pub log_syncs_total: AtomicU64,
    /// Proposals per second over the last measuring window, times 1000.
    pub proposals_per_sec_milli: AtomicU64,
    pub reads_total: AtomicU64,
    /// Reads the leader lease covered (no ReadIndex round of their own).
    pub lease_reads_total: AtomicU64,
    /// ReadIndex rounds started (for reads, or to renew the lease).
    pub read_rounds_total: AtomicU64,
    pub snapshot_index: AtomicU64,
    /// Chunks with fewer good copies than their layout wants, and those being repaired
    /// (from this node's applied state, refreshed every few seconds).
    pub chunks_under_replicated: AtomicU64,
    pub chunks_repairing: AtomicU64,
    /// Of the under-replicated ones, those with too few good copies to be read at all.
    pub chunks_unreadable: AtomicU64,
    /// Chunk servers by state, as this node's applied state has them.
    pub chunk_servers_up: AtomicU64,
    pub chunk_servers_down: AtomicU64,
    pub chunk_servers_draining: AtomicU64,
    pub repairs_total: AtomicU64,
    pub repairs_failed_total: AtomicU64,
}

impl MetaMetrics {
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let id = g(&self.node_id);
        let mut s = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{id}\"}} {value}\n"
            ));
        };
        line(
            "kerfs_meta_raft_term",
            "gauge",
            "Current raft term.",
            g(&self.term).to_string(),
        );
        line(
            "kerfs_meta_raft_commit_index",
            "gauge",
            "Highest committed log index.",
            g(&self.commit_index).to_string(),
        );
        line(
            "kerfs_meta_raft_applied_index",
            "gauge",
            "Highest log index applied to the namespace.",
            g(&self.applied_index).to_string(),
        );
        line(
            "kerfs_meta_raft_snapshot_index",
            "gauge",
            "Index the log was last compacted to.",
            g(&self.snapshot_index).to_string(),
        );
        line(
            "kerfs_meta_is_leader",
            "gauge",
            "1 if this node is the raft leader.",
            g(&self.is_leader).to_string(),
        );
        line(
            "kerfs_meta_leader_id",
            "gauge",
            "The leader this node knows of (0: none).",
            g(&self.leader_id).to_string(),
        );
        line(
            "kerfs_meta_proposals_total",
            "counter",
            "Commands proposed by this node.",
            g(&self.proposals_total).to_string(),
        );
        line(
            "kerfs_meta_log_syncs_total",
            "counter",
            "Raft log writes flushed to disk before going on (a new term or vote, or an fsync).",
            g(&self.log_syncs_total).to_string(),
        );
        line(
            "kerfs_meta_proposals_per_second",
            "gauge",
            "Commands proposed per second, over the last second.",
            format!("{:.3}", g(&self.proposals_per_sec_milli) as f64 / 1000.0),
        );
        line(
            "kerfs_meta_chunks_under_replicated",
            "gauge",
            "Chunks with fewer good copies (or shards) than their layout wants.",
            g(&self.chunks_under_replicated).to_string(),
        );
        line(
            "kerfs_meta_chunks_repairing",
            "gauge",
            "Under-replicated chunks with a repair task handed to a chunk server.",
            g(&self.chunks_repairing).to_string(),
        );
        line(
            "kerfs_meta_chunks_unreadable",
            "gauge",
            "Chunks with too few good copies left to be read (replicated: none; EC: < k).",
            g(&self.chunks_unreadable).to_string(),
        );
        for (state, value) in [
            ("up", &self.chunk_servers_up),
            ("down", &self.chunk_servers_down),
            ("draining", &self.chunk_servers_draining),
        ] {
            line(
                &format!("kerfs_meta_chunk_servers_{state}"),
                "gauge",
                &format!("Chunk servers that are {state}."),
                g(value).to_string(),
            );
        }
        line(
            "kerfs_meta_repairs_total",
            "counter",
            "Repair copies accepted.",
            g(&self.repairs_total).to_string(),
        );
        line(
            "kerfs_meta_repairs_failed_total",
            "counter",
            "Repair tasks that failed, timed out or raced with a write.",
            g(&self.repairs_failed_total).to_string(),
        );
        line(
            "kerfs_meta_reads_total",
            "counter",
            "Linearizable reads served.",
            g(&self.reads_total).to_string(),
        );
        line(
            "kerfs_meta_lease_reads_total",
            "counter",
            "Linearizable reads served inside the leader lease, without a ReadIndex round.",
            g(&self.lease_reads_total).to_string(),
        );
        line(
            "kerfs_meta_read_rounds_total",
            "counter",
            "ReadIndex rounds (heartbeat rounds) started for reads or lease renewal.",
            g(&self.read_rounds_total).to_string(),
        );
        s
    }
}

/// Serves the metrics page on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<MetaMetrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics endpoint listening");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read (and ignore) the request head; any path gets the page.
            let mut buf = [0u8; 2048];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
            let body = metrics.render();
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{}",
                body.len(),
                body
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                warn!(error = %e, "metrics write failed");
            }
        });
    }
}
