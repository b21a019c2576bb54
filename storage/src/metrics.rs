//! The Prometheus text endpoint of a chunk server: bytes read and written, corrupt blocks,
//! chunks, capacity and usage. A deliberately tiny HTTP/1.0 responder (like the metadata
//! node's): every request, whatever its path, gets the metrics page.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::store::Usage;

/// Counters the store and the service update and the endpoint reads.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_scrubbed: AtomicU64,
    /// Blocks refused because their checksum did not match (reads, writes, scrubs).
    pub corrupt_blocks: AtomicU64,
    pub write_rpcs: AtomicU64,
    /// Writes flushed to disk before their reply (synced writes, a client's fsync).
    pub write_syncs: AtomicU64,
    pub read_rpcs: AtomicU64,
    /// Chain writes where a downstream replica failed.
    pub forward_failures: AtomicU64,
    pub no_space_errors: AtomicU64,
    pub scrub_runs: AtomicU64,
    /// Corrupt chunks found by the last scrub.
    pub scrub_corrupt_chunks: AtomicU64,
    /// Bytes copied or rebuilt here by repair orders.
    pub repair_bytes: AtomicU64,
}

impl StorageMetrics {
    pub fn render(&self, server_id: u64, usage: &Usage) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let mut s = String::new();
        let mut line = |name: &str, kind: &str, help: &str, value: String| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{server=\"{server_id}\"}} {value}\n"
            ));
        };
        line(
            "kerfs_chunk_bytes_written_total",
            "counter",
            "Data bytes written to chunks.",
            g(&self.bytes_written),
        );
        line(
            "kerfs_chunk_write_syncs_total",
            "counter",
            "Writes flushed to disk before their reply (synced writes, a client's fsync).",
            g(&self.write_syncs),
        );
        line(
            "kerfs_chunk_bytes_read_total",
            "counter",
            "Verified data bytes read from chunks.",
            g(&self.bytes_read),
        );
        line(
            "kerfs_chunk_bytes_scrubbed_total",
            "counter",
            "Bytes re-verified by the scrubber.",
            g(&self.bytes_scrubbed),
        );
        line(
            "kerfs_chunk_corrupt_blocks_total",
            "counter",
            "Blocks that failed their blake3 checksum and were refused.",
            g(&self.corrupt_blocks),
        );
        line(
            "kerfs_chunk_repair_bytes_total",
            "counter",
            "Bytes of chunk copies made here by repair orders.",
            g(&self.repair_bytes),
        );
        line(
            "kerfs_chunk_write_rpcs_total",
            "counter",
            "Write streams received.",
            g(&self.write_rpcs),
        );
        line(
            "kerfs_chunk_read_rpcs_total",
            "counter",
            "Read requests received.",
            g(&self.read_rpcs),
        );
        line(
            "kerfs_chunk_forward_failures_total",
            "counter",
            "Chain mutations whose downstream replica failed.",
            g(&self.forward_failures),
        );
        line(
            "kerfs_chunk_no_space_errors_total",
            "counter",
            "Requests refused because the disk is full.",
            g(&self.no_space_errors),
        );
        line(
            "kerfs_chunk_scrub_runs_total",
            "counter",
            "Completed scrubs of every chunk.",
            g(&self.scrub_runs),
        );
        line(
            "kerfs_chunk_scrub_corrupt_chunks",
            "gauge",
            "Corrupt chunks found by the last scrub.",
            g(&self.scrub_corrupt_chunks),
        );
        line(
            "kerfs_chunk_chunks",
            "gauge",
            "Chunks held.",
            usage.chunk_count.to_string(),
        );
        line(
            "kerfs_chunk_capacity_bytes",
            "gauge",
            "Size of the file system holding the data directory.",
            usage.capacity_bytes.to_string(),
        );
        line(
            "kerfs_chunk_available_bytes",
            "gauge",
            "Free bytes left on that file system.",
            usage.available_bytes.to_string(),
        );
        line(
            "kerfs_chunk_used_bytes",
            "gauge",
            "Bytes of chunk data held (logical lengths).",
            usage.used_bytes.to_string(),
        );
        s
    }
}

/// Serves the metrics page on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "chunk server metrics endpoint listening");
    }
    loop {
        let (mut sock, _) = listener.accept().await?;
        let render = render.clone();
        tokio::spawn(async move {
            // Read (and ignore) the request head; any path gets the page.
            let mut buf = [0u8; 2048];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
            // usage() calls statvfs: keep it off the async workers.
            let body = tokio::task::spawn_blocking(move || render())
                .await
                .unwrap_or_default();
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

/// Binds the metrics endpoint (so a port in use is an error at start, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
