//! `kerfsctl`: run a KerFS cluster — status of the metadata nodes, and namespace commands
//! for scripts and demos (the mount is the everyday way in).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use kerfs_client::{MetaClient, MetaClientConfig};

#[derive(Parser)]
#[command(name = "kerfsctl", version, about = "Administer a KerFS cluster")]
struct Cli {
    /// Metadata nodes: HOST:PORT[,HOST:PORT...]
    #[arg(
        long,
        env = "KERFS_META",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    meta: String,
    /// Cluster key file (default: $KERFS_KEY_FILE, then the standard place).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Give up after this many seconds without a leader.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Raft state of every metadata node.
    Status,
    /// List a directory.
    Ls { path: String },
    /// Create a directory.
    Mkdir { path: String },
    /// Create an empty file.
    Touch { path: String },
    /// Show the attributes of a path.
    Stat { path: String },
    /// Remove a file or an empty directory.
    Rm { path: String },
    /// Rename a path.
    Mv { from: String, to: String },
    /// Filesystem statistics.
    Df,
}

fn main() -> Result<()> {
    kerfs_cli::init_logging();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let key = kerfs_cli::client_key(cli.key_file.as_deref())?;
    let addrs = MetaClientConfig::parse_addrs(&cli.meta)?;
    let mut config = MetaClientConfig::new(addrs.clone(), key);
    config.deadline = Duration::from_secs(cli.timeout);
    config.description = "kerfsctl".into();
    let client = MetaClient::connect(config)
        .await
        .context("connecting to the metadata service")?;
    match cli.command {
        Cmd::Status => {
            println!(
                "{:<4} {:<22} {:<10} {:>6} {:>9} {:>9} {:>9}  leader",
                "id", "address", "role", "term", "commit", "applied", "log-from"
            );
            for addr in &addrs {
                match client.node_status(addr).await {
                    Ok(s) => println!(
                        "{:<4} {:<22} {:<10} {:>6} {:>9} {:>9} {:>9}  {}",
                        s.id,
                        addr,
                        s.role,
                        s.term,
                        s.commit_index,
                        s.applied_index,
                        s.first_index,
                        s.leader_addr
                    ),
                    Err(e) => println!("?    {addr:<22} unreachable: {e}"),
                }
            }
        }
        Cmd::Ls { path } => {
            let dir = client.resolve(&path).await?;
            for e in client.readdir_all(dir.ino).await? {
                let attr = client.getattr(e.ino).await?;
                println!(
                    "{:>10} {:o} {:>5} {:>5} {:>12} {}",
                    e.ino,
                    attr.mode,
                    attr.uid,
                    attr.gid,
                    attr.size,
                    String::from_utf8_lossy(&e.name)
                );
            }
        }
        Cmd::Mkdir { path } => {
            let (parent, name) = client.resolve_parent(&path).await?;
            client.mkdir(parent.ino, name.as_bytes(), 0o755).await?;
        }
        Cmd::Touch { path } => {
            let (parent, name) = client.resolve_parent(&path).await?;
            client
                .create_file(parent.ino, name.as_bytes(), 0o644)
                .await?;
        }
        Cmd::Stat { path } => {
            let a = client.resolve(&path).await?;
            println!("{a:#?}");
        }
        Cmd::Rm { path } => {
            let (parent, name) = client.resolve_parent(&path).await?;
            let attr = client.lookup(parent.ino, name.as_bytes()).await?;
            if attr.kind == kerfs_proto::FileKind::Directory as i32 {
                client.rmdir(parent.ino, name.as_bytes()).await?;
            } else {
                client.unlink(parent.ino, name.as_bytes()).await?;
            }
        }
        Cmd::Mv { from, to } => {
            let (p1, n1) = client.resolve_parent(&from).await?;
            let (p2, n2) = client.resolve_parent(&to).await?;
            client
                .rename(p1.ino, n1.as_bytes(), p2.ino, n2.as_bytes(), 0)
                .await?;
        }
        Cmd::Df => {
            let s = client.statfs().await?;
            println!("{s:#?}");
        }
    }
    Ok(())
}
