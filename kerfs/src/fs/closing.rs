//! The mount's closes of cluster handles, gathered into one `Close` command.
//!
//! Closing a handle is a metadata command (a raft commit) of its own, and `tar -x` closes one
//! or two per file. The kernel does not wait for FUSE_RELEASE (close(2) returned at
//! FUSE_FLUSH, which already published the data), so nothing waits for the Close either: the
//! handles released within [`WINDOW`] go to the cluster together. What a later Close changes
//! (an unlinked file's space freed, a drain's wait for an open write) happens at most that
//! much later. Unmount drains the queue ([`CloseQueue::drain`]).

use std::time::Duration;

use kerfs_client::MetaClient;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// How long a released handle may wait for others to join its Close.
pub const WINDOW: Duration = Duration::from_millis(50);

/// Handles in one Close at most.
const BATCH_MAX: usize = 256;

enum Job {
    Close(u64),
    Drain(oneshot::Sender<()>),
}

/// Sends the handles given to [`CloseQueue::close`] in batches, from a task of its own.
pub struct CloseQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl CloseQueue {
    /// Starts the sender task on the current tokio runtime.
    pub fn start(client: MetaClient) -> CloseQueue {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx));
        CloseQueue { jobs }
    }

    /// Queues `handles` for closing.
    pub fn close(&self, handles: &[u64]) {
        for &h in handles {
            if self.jobs.send(Job::Close(h)).is_err() {
                warn!(
                    handle = h,
                    "the close queue has stopped; the handle stays open until the session expires"
                );
            }
        }
    }

    /// Returns once every handle queued before the call has been sent.
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Drain(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(client: MetaClient, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut batch = Vec::new();
    let mut drained = Vec::new();
    while let Some(job) = rx.recv().await {
        take(job, &mut batch, &mut drained);
        let deadline = tokio::time::Instant::now() + WINDOW;
        while batch.len() < BATCH_MAX && drained.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => take(job, &mut batch, &mut drained),
                Ok(None) | Err(_) => break,
            }
        }
        send(&client, std::mem::take(&mut batch)).await;
        for done in drained.drain(..) {
            let _ = done.send(());
        }
    }
}

fn take(job: Job, batch: &mut Vec<u64>, drained: &mut Vec<oneshot::Sender<()>>) {
    match job {
        Job::Close(h) => batch.push(h),
        Job::Drain(done) => drained.push(done),
    }
}

/// One Close for the batch; it is all or none, so when it fails each handle is tried alone
/// (one bad handle must not keep the others open).
async fn send(client: &MetaClient, batch: Vec<u64>) {
    let Some((&first, rest)) = batch.split_first() else {
        return;
    };
    if client.close_all(first, rest).await.is_ok() {
        return;
    }
    for h in batch {
        if let Err(e) = client.close(h).await {
            warn!(handle = h, error = %e, "closing a released file handle");
        }
    }
}
