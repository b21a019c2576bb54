//! What the KerFS programs share: logging setup, the cluster key lookup, signal handling and
//! address-list parsing. The programs themselves (src/bin) stay thin over the libraries.

use std::path::Path;

use anyhow::{Context, Result};
use kerfs_proto::auth::{self, ClusterKey};

/// `tracing` to stderr, filtered by $RUST_LOG (default: `default`, e.g. "info" for daemons,
/// "warn" for commands whose output is for people).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The key a client program uses: --key-file, $KERFS_KEY_FILE, then the standard place.
pub fn client_key(flag: Option<&Path>) -> Result<ClusterKey> {
    auth::load_client_key(flag).context("loading the cluster key")
}

/// The key a daemon uses, created (0600) where it is looked for when missing.
pub fn daemon_key(flag: Option<&Path>) -> Result<(ClusterKey, std::path::PathBuf)> {
    let path = auth::key_path(flag);
    let key = ClusterKey::load_or_create(&path)
        .with_context(|| format!("loading or creating the cluster key {}", path.display()))?;
    Ok((key, path))
}

/// Resolves when the process gets SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            // Without signal handlers we can only wait for Ctrl-C through tokio's fallback.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
