//! What the KerFS programs share: logging setup, the cluster key and metadata address lookups,
//! signal handling, address-list parsing and progress bars. The programs themselves (src/bin) stay thin over the libraries.

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

/// The metadata nodes of `kerfsd dev` with its default --base-port.
pub const DEV_META_ADDRS: [&str; 3] = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];

/// Environment variable naming the metadata nodes.
pub const META_ENV: &str = "KERFS_META";

/// Where a client program finds the metadata nodes: `flag` (--meta), then $KERFS_META, then
/// `meta = "host:port,..."` in ~/.config/kerfs/kerfs.toml ($XDG_CONFIG_HOME honoured), then
/// in /etc/kerfs/kerfs.toml, and last the addresses `kerfsd dev` uses by default, so that
/// every program works on one machine without configuration.
pub fn meta_addrs(flag: Option<&str>) -> Result<Vec<String>> {
    let env = std::env::var(META_ENV).ok();
    meta_addrs_from(flag, env.as_deref(), &config_files())
}

/// [`meta_addrs`] with the environment value and the file list given.
fn meta_addrs_from(
    flag: Option<&str>,
    env: Option<&str>,
    files: &[std::path::PathBuf],
) -> Result<Vec<String>> {
    if let Some(list) = flag {
        return Ok(kerfs_client::MetaClientConfig::parse_addrs(list)?);
    }
    if let Some(list) = env.filter(|l| !l.trim().is_empty()) {
        return kerfs_client::MetaClientConfig::parse_addrs(list)
            .with_context(|| format!("${META_ENV}"));
    }
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", file.display()))?;
        if let Some(v) = table.get("meta") {
            let list = v.as_str().with_context(|| {
                format!(
                    "{}: meta must be a string \"host:port,host:port\"",
                    file.display()
                )
            })?;
            return kerfs_client::MetaClientConfig::parse_addrs(list)
                .with_context(|| format!("meta in {}", file.display()));
        }
    }
    Ok(DEV_META_ADDRS.iter().map(|a| a.to_string()).collect())
}

/// The configuration files looked at, in order.
fn config_files() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = auth::user_config_dir() {
        out.push(dir.join("kerfs/kerfs.toml"));
    }
    out.push("/etc/kerfs/kerfs.toml".into());
    out
}

/// The key a daemon uses, created (0600) where it is looked for when missing.
/// Parses one metadata member `ID=HOST:PORT` (`kerfsd meta --peers`, `kerfsctl meta add`).
pub fn parse_member(item: &str) -> Result<(u64, String)> {
    let (id, addr) = item
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{item:?} is not ID=HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .with_context(|| format!("node id {id:?} is not a number"))?;
    if id == 0 {
        anyhow::bail!("node id 0 is reserved; number nodes from 1");
    }
    let addr = addr.trim();
    if addr
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        anyhow::bail!("{addr:?} (node {id}) is not HOST:PORT");
    }
    Ok((id, addr.to_string()))
}

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

/// A progress bar on stderr drawn with `template` (indicatif's), when stderr is a terminal;
/// None otherwise, so that scripts and logs get plain lines instead.
pub fn progress_bar(what: &str, template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    Some(pb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_addresses_flag_then_env_then_files() {
        let d = tempfile::tempdir().unwrap();
        let (none, user, system) = (
            d.path().join("missing.toml"),
            d.path().join("user.toml"),
            d.path().join("system.toml"),
        );
        std::fs::write(&user, "meta = \"u:1, u:2\"\n").unwrap();
        std::fs::write(&system, "meta = \"s:1\"\n").unwrap();
        let files = vec![none.clone(), user.clone(), system.clone()];
        assert_eq!(
            meta_addrs_from(Some("f:1"), Some("e:1"), &files).unwrap(),
            vec!["f:1"]
        );
        assert_eq!(
            meta_addrs_from(None, Some("e:1"), &files).unwrap(),
            vec!["e:1"]
        );
        assert_eq!(
            meta_addrs_from(None, Some(" "), &files).unwrap(),
            vec!["u:1", "u:2"]
        );
        assert_eq!(
            meta_addrs_from(None, None, &[none.clone(), system]).unwrap(),
            vec!["s:1"]
        );
        assert_eq!(
            meta_addrs_from(None, None, &[none]).unwrap(),
            DEV_META_ADDRS.to_vec()
        );
        std::fs::write(&user, "meta = 3\n").unwrap();
        assert!(meta_addrs_from(None, None, &[user]).is_err());
    }
}
