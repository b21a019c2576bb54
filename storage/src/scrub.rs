//! The scrubber: re-verifies every block of every chunk against its blake3 hash, so rot in
//! data nobody reads is found (and reported to meta through the heartbeat's corrupt flag)
//! while the other replicas can still repair it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::metrics::StorageMetrics;
use crate::store::{ChunkStore, Corruption};

/// The outcome of one pass over every chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<Corruption>,
    /// Chunks that could not be read for another reason (I/O errors), with the error.
    pub errors: Vec<(u64, String)>,
}

/// Verifies every chunk once. Blocking (file I/O): run it on a blocking thread.
pub fn scrub(store: &dyn ChunkStore, metrics: &StorageMetrics) -> ScrubReport {
    let mut report = ScrubReport::default();
    let mut after = 0u64; // chunk id 0 is never used
    loop {
        // Page through the index so chunks created or deleted meanwhile do not matter.
        let page = store.list(after, 256);
        let Some(last) = page.last() else { break };
        after = last.chunk_id;
        for info in &page {
            match store.verify(info.chunk_id) {
                Ok(None) => {}
                Ok(Some(c)) => {
                    error!(chunk = format_args!("{:016x}", c.chunk_id), blocks = ?c.blocks, message = %c.message, "scrub found a corrupt chunk");
                    report.corrupt.push(c);
                }
                Err(e) => {
                    warn!(chunk = format_args!("{:016x}", info.chunk_id), error = %e, "scrub could not check a chunk");
                    report.errors.push((info.chunk_id, e.to_string()));
                }
            }
            report.chunks_checked += 1;
            report.bytes_checked += info.length;
        }
        if page.len() < 256 {
            break;
        }
    }
    metrics.scrub_runs.fetch_add(1, Ordering::Relaxed);
    metrics
        .scrub_corrupt_chunks
        .store(report.corrupt.len() as u64, Ordering::Relaxed);
    info!(
        chunks = report.chunks_checked,
        bytes = report.bytes_checked,
        corrupt = report.corrupt.len(),
        "scrub finished"
    );
    report
}

/// Scrubs every `interval` (first pass after `first_delay`) until the task is dropped.
pub async fn periodic(
    store: Arc<dyn ChunkStore>,
    metrics: Arc<StorageMetrics>,
    first_delay: Duration,
    interval: Duration,
) {
    tokio::time::sleep(first_delay).await;
    loop {
        let (s, m) = (store.clone(), metrics.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || scrub(s.as_ref(), &m)).await {
            error!(error = %e, "scrub task failed");
        }
        tokio::time::sleep(interval).await;
    }
}
