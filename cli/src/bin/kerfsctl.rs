//! `kerfsctl`: run a KerFS cluster — status of the metadata nodes, and namespace commands
//! for scripts and demos (the mount is the everyday way in).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use kerfs_client::{DataClient, MetaClient, MetaClientConfig};
use kerfs_proto::read_op;

#[derive(Parser)]
#[command(name = "kerfsctl", version, about = "Administer a KerFS cluster")]
struct Cli {
    /// Metadata nodes: HOST:PORT[,HOST:PORT...] (default: $KERFS_META, then `meta` in
    /// ~/.config/kerfs/kerfs.toml or /etc/kerfs/kerfs.toml, then the `kerfsd dev` addresses).
    #[arg(long)]
    meta: Option<String>,
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
    /// Raft state of every metadata node, and how many chunks lack copies.
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
    /// Chunk servers: address, state, capacity, usage.
    Nodes,
    /// Copy a local file into KerFS (through the client library, not a mount).
    Put { local: PathBuf, path: String },
    /// Copy a KerFS file to a local file ("-" for stdout).
    Get { path: String, local: PathBuf },
    /// Re-replication: chunks lacking copies and the repairs in progress.
    Repair {
        /// Re-check every chunk of every file now and hand out repair tasks at once.
        #[arg(long)]
        now: bool,
        /// Wait until no chunk lacks a copy (or the timeout passes), showing progress.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
        /// Chunks listed at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The chunks of a file: version and placements (current, stale, or missing when the
    /// server holding it is down).
    Chunks { path: String },
    /// Show or set the data layout of a directory (inherited by new entries).
    Layout {
        path: String,
        /// Copies of each chunk (replicated layout).
        #[arg(long, conflicts_with = "ec")]
        replicas: Option<u32>,
        /// Erasure coding as K+M (e.g. 4+2).
        #[arg(long)]
        ec: Option<String>,
        /// Chunk size, e.g. 64M, 1M, 256K.
        #[arg(long)]
        chunk_size: Option<String>,
    },
}

fn main() -> Result<()> {
    kerfs_cli::init_logging("warn");
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let key = kerfs_cli::client_key(cli.key_file.as_deref())?;
    let addrs = kerfs_cli::meta_addrs(cli.meta.as_deref())?;
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
            match repair_report(&client, 0).await {
                Ok(r) => println!(
                    "chunks under-replicated: {} (repairing {}); repairs done {}, failed {}",
                    r.under_replicated, r.repairing, r.repaired_total, r.failed_total
                ),
                Err(e) => println!("chunks under-replicated: unknown ({e})"),
            }
        }
        Cmd::Repair {
            now,
            wait,
            wait_secs,
            limit,
        } => {
            if now {
                kerfs_client::check(
                    client
                        .write(kerfs_proto::command::Op::RepairChunks(
                            kerfs_proto::RepairChunks { rescan: true },
                        ))
                        .await?,
                )
                .context("asking for a repair pass")?;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(wait_secs);
            loop {
                let r = repair_report(&client, limit).await?;
                if !wait || r.under_replicated == 0 {
                    print_repair(&r);
                    if wait && r.under_replicated > 0 {
                        anyhow::bail!("chunks still lack copies");
                    }
                    break;
                }
                eprintln!(
                    "{} chunks under-replicated, {} being repaired",
                    r.under_replicated, r.repairing
                );
                if std::time::Instant::now() > deadline {
                    print_repair(&r);
                    anyhow::bail!(
                        "{} chunks still lack copies after {wait_secs} s; see the notes above and the chunk servers' logs",
                        r.under_replicated
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Cmd::Chunks { path } => {
            let attr = client.resolve(&path).await?;
            let servers = kerfs_client::check(
                client
                    .read(read_op::Op::ListChunkServers(
                        kerfs_proto::ListChunkServers {},
                    ))
                    .await?,
            )?
            .servers;
            let state = |id: u64| {
                servers
                    .iter()
                    .find(|s| s.info.as_ref().is_some_and(|i| i.id == id))
                    .map(|s| s.state.clone())
                    .unwrap_or_else(|| "unknown".into())
            };
            let reply = kerfs_client::check(
                client
                    .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                        ino: attr.ino,
                        first_index: 0,
                        count: 0,
                    }))
                    .await?,
            )?;
            let layout = reply.layout.unwrap_or_default();
            let wanted = if layout.ec_data > 0 {
                (layout.ec_data + layout.ec_parity) as usize
            } else {
                layout.replicas as usize
            };
            println!("{} ({})", path, show_layout(&layout));
            for c in reply.chunks {
                let mut good = 0;
                let mut parts = Vec::new();
                for p in &c.replicas {
                    let st = state(p.server_id);
                    let mark = if st != "up" && st != "draining" {
                        format!("MISSING:server {st}")
                    } else if !p.current {
                        "STALE".to_string()
                    } else {
                        good += 1;
                        "ok".to_string()
                    };
                    parts.push(format!(
                        "{}{}@{}({}) {mark}",
                        if layout.ec_data > 0 {
                            format!("s{}:", p.shard_index)
                        } else {
                            String::new()
                        },
                        p.chunk_id,
                        p.server_id,
                        p.address
                    ));
                }
                println!(
                    "chunk {:>6} v{:<4} {good}/{wanted}{}  {}",
                    c.index,
                    c.version,
                    if good < wanted {
                        " UNDER-REPLICATED"
                    } else {
                        ""
                    },
                    parts.join(", ")
                );
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
            let gib = |blocks: u64| (blocks * s.block_size) as f64 / (1u64 << 30) as f64;
            println!(
                "size {:.1} GiB, free {:.1} GiB, available {:.1} GiB, files {} (free {})",
                gib(s.blocks),
                gib(s.blocks_free),
                gib(s.blocks_avail),
                s.files,
                s.files_free
            );
        }
        Cmd::Put { local, path } => {
            use std::io::Read;
            let (parent, name) = client.resolve_parent(&path).await?;
            let data = DataClient::new(client.clone());
            let file = data
                .create(parent.ino, name.as_bytes(), 0o644, false)
                .await?;
            file.truncate(0).await?;
            let mut src = std::fs::File::open(&local)
                .with_context(|| format!("opening {}", local.display()))?;
            let mut buf = vec![0u8; 4 << 20];
            let mut offset = 0u64;
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                file.write_at(offset, &buf[..n]).await?;
                offset += n as u64;
            }
            file.close().await?;
            println!("{offset} bytes -> {path}");
        }
        Cmd::Get { path, local } => {
            use std::io::Write;
            let attr = client.resolve(&path).await?;
            let data = DataClient::new(client.clone());
            let file = data.open(attr.ino, libc::O_RDONLY as u32).await?;
            let mut out: Box<dyn Write> = if local.as_os_str() == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(
                    std::fs::File::create(&local)
                        .with_context(|| format!("creating {}", local.display()))?,
                )
            };
            let size = file.size();
            let mut offset = 0u64;
            while offset < size {
                let chunk = file.read_at(offset, 4 << 20).await?;
                if chunk.is_empty() {
                    break;
                }
                out.write_all(&chunk)?;
                offset += chunk.len() as u64;
            }
            out.flush()?;
            file.close().await?;
        }
        Cmd::Nodes => {
            let reply = kerfs_client::check(
                client
                    .read(read_op::Op::ListChunkServers(
                        kerfs_proto::ListChunkServers {},
                    ))
                    .await?,
            )?;
            println!(
                "{:<4} {:<22} {:<9} {:>12} {:>12} {:>12} {:>8}  domain",
                "id", "address", "state", "capacity", "used", "allocated", "chunks"
            );
            for s in reply.servers {
                let info = s.info.unwrap_or_default();
                println!(
                    "{:<4} {:<22} {:<9} {:>12} {:>12} {:>12} {:>8}  {}",
                    info.id,
                    info.address,
                    s.state,
                    human(info.capacity_bytes),
                    human(info.used_bytes),
                    human(s.allocated_bytes),
                    info.chunk_count,
                    info.failure_domain
                );
            }
        }
        Cmd::Layout {
            path,
            replicas,
            ec,
            chunk_size,
        } => {
            let dir = client.resolve(&path).await?;
            let current = kerfs_client::check(
                client
                    .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                        ino: dir.ino,
                        first_index: 0,
                        count: 1,
                    }))
                    .await?,
            )?
            .layout
            .unwrap_or_default();
            if replicas.is_none() && ec.is_none() && chunk_size.is_none() {
                println!("{}", show_layout(&current));
                return Ok(());
            }
            let mut layout = current;
            if let Some(r) = replicas {
                layout.replicas = r;
                layout.ec_data = 0;
                layout.ec_parity = 0;
            }
            if let Some(ec) = ec {
                let (k, m) = ec.split_once('+').context("--ec takes K+M, e.g. 4+2")?;
                layout.ec_data = k.parse().context("--ec K is not a number")?;
                layout.ec_parity = m.parse().context("--ec M is not a number")?;
            }
            if let Some(size) = chunk_size {
                layout.chunk_size = parse_size(&size)?;
            }
            let layout = client.set_layout(dir.ino, layout).await?;
            println!("{}", show_layout(&layout));
        }
    }
    Ok(())
}

async fn repair_report(client: &MetaClient, limit: u32) -> Result<kerfs_proto::RepairReport> {
    Ok(kerfs_client::check(
        client
            .read(read_op::Op::RepairStatus(kerfs_proto::RepairStatus {
                limit: limit.max(1),
            }))
            .await?,
    )?
    .repair
    .unwrap_or_default())
}

fn print_repair(r: &kerfs_proto::RepairReport) {
    println!(
        "chunks under-replicated: {} (repairing {}); repairs done {}, failed {}",
        r.under_replicated, r.repairing, r.repaired_total, r.failed_total
    );
    for c in &r.chunks {
        let task = match &c.task {
            Some(t) => format!(
                "task {}: server {} copies chunk id {} v{} (replacing server {})",
                t.task_id, t.target_server, t.chunk_id, t.version, t.old_server
            ),
            None => "waiting".to_string(),
        };
        println!(
            "  inode {} chunk {}: {}/{} good; {task}{}",
            c.ino,
            c.index,
            c.good,
            c.wanted,
            if c.note.is_empty() {
                String::new()
            } else {
                format!("; {}", c.note)
            }
        );
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => {
            let mult = match t[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "K" => 1u64 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                other => anyhow::bail!("unknown size unit {other:?} in {text:?}; use K, M or G"),
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a size"))?;
    Ok(n * mult)
}

fn show_layout(l: &kerfs_proto::Layout) -> String {
    let scheme = if l.ec_data > 0 {
        format!("erasure-coded {}+{}", l.ec_data, l.ec_parity)
    } else {
        format!("{} replicas", l.replicas)
    };
    format!("{scheme}, chunk size {}", human(l.chunk_size))
}
