//! `kerfsctl`: run a KerFS cluster. Each subcommand is one small function over a library
//! call (`kerfs_client::admin` for what an operator asks, `MetaClient`/`DataClient` for the
//! namespace and data commands) that returns what it found; `--json` prints that as JSON for
//! scripts, otherwise it is printed for people. Exit codes mean something (see `EXIT_*`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use kerfs_client::admin::{self, ClusterHealth, CopyState, FileChunks, Health};
use kerfs_client::members;
use kerfs_client::{ClientError, DataClient, MetaClient, MetaClientConfig};
use kerfs_proto::{read_op, Attr, FileKind};

/// The command failed (its message says why and what to do).
const EXIT_FAILED: u8 = 1;
/// `status`: HEALTH_WARN, redundancy missing but every byte readable.
const EXIT_DEGRADED: u8 = 3;
/// `status`: HEALTH_ERR, data unreadable or the metadata group without a leader.
const EXIT_DATA_UNAVAILABLE: u8 = 4;
/// No metadata node answered (any command): the cluster is unreachable from here.
const EXIT_UNREACHABLE: u8 = 5;

#[derive(Parser)]
#[command(
    name = "kerfsctl",
    version,
    about = "Administer a KerFS cluster",
    after_help = "Exit codes: 0 success (status: HEALTH_OK); 1 the command failed; 2 bad \
                  arguments; 3 status: HEALTH_WARN (degraded, all data readable); 4 status: \
                  HEALTH_ERR (data unreadable or no metadata leader); 5 the metadata service \
                  is unreachable."
)]
struct Cli {
    /// Metadata nodes: HOST:PORT[,HOST:PORT...] (default: $KERFS_META, then `meta` in
    /// ~/.config/kerfs/kerfs.toml or /etc/kerfs/kerfs.toml, then the `kerfsd dev` addresses).
    #[arg(long, global = true)]
    meta: Option<String>,
    /// Cluster key file (default: $KERFS_KEY_FILE, then the standard place).
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Give up after this many seconds without a leader.
    #[arg(long, default_value_t = 15, global = true)]
    timeout: u64,
    /// Print the result as JSON (one object) for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The cluster at a glance: metadata leader and members, chunk servers, capacity,
    /// chunks lacking copies, and a HEALTH_OK / HEALTH_WARN / HEALTH_ERR verdict (also the
    /// exit code: 0, 3, 4; 5 when no metadata node answers).
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
    /// Chunk servers coming and going: drain one, remove one. (Adding one is starting
    /// `kerfsd chunk` on it: it registers by itself.)
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// The metadata group: list its members, add one, remove one, move leadership.
    Meta {
        #[command(subcommand)]
        command: MetaCmd,
    },
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
    /// The chunks of a file: version and copies (ok, stale, corrupt when it failed a
    /// checksum, or missing when the server holding it is down).
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

#[derive(Subcommand)]
enum NodeCmd {
    /// Move every chunk (replicas and EC shards) off chunk server ID, keeping each chunk's
    /// redundancy all the way; the server is then marked drained. It stays readable and
    /// writable meanwhile but takes no new chunks.
    Drain {
        id: u64,
        /// Wait until it is drained, showing the chunks left.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        wait_secs: u64,
    },
    /// Take chunk server ID out of the cluster. Refused while it holds copies the cluster
    /// needs (drain it first) or, when down, the last copy of anything.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum MetaCmd {
    /// The members with their role (leader, voter, learner) and how far each log matches
    /// the leader's.
    Members,
    /// Add the node ID at HOST:PORT, started with `kerfsd meta --id ID --listen HOST:PORT
    /// --join`: it joins as a learner, catches up (from a snapshot), and is promoted to
    /// voter; waits for all of it, showing progress.
    Add {
        /// ID=HOST:PORT
        member: String,
        /// Give up waiting after this many seconds (run it again to keep waiting).
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
    /// Remove node ID from the group. Refused if the others would not keep a quorum of
    /// live voters, for the last voter, and for the leader (transfer leadership first).
    Remove {
        id: u64,
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Make voter ID the leader; waits until it leads.
    TransferLeader {
        id: u64,
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
}

/// What every command works with.
struct Ctx {
    client: MetaClient,
    /// The metadata nodes given, each asked for its own status.
    addrs: Vec<String>,
    json: bool,
}

impl Ctx {
    /// Prints `value` as JSON, or for people with `text`.
    fn show<T: Serialize>(&self, value: &T, text: impl FnOnce(&T)) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            text(value);
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    kerfs_cli::init_logging("warn");
    let cli = Cli::parse();
    let json = cli.json;
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = if e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(ClientError::Unavailable { .. })))
            {
                EXIT_UNREACHABLE
            } else {
                EXIT_FAILED
            };
            if json {
                let err = serde_json::json!({ "error": format!("{e:#}"), "exit_code": code });
                println!("{err}");
            }
            eprintln!("kerfsctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Runs the command; returns the exit code for a command that ran (status has several).
async fn run(cli: Cli) -> Result<u8> {
    let key = kerfs_cli::client_key(cli.key_file.as_deref())?;
    let addrs = kerfs_cli::meta_addrs(cli.meta.as_deref())?;
    let mut config = MetaClientConfig::new(addrs.clone(), key);
    config.deadline = Duration::from_secs(cli.timeout);
    config.description = "kerfsctl".into();
    // The session opens with the first write: commands that only look write nothing.
    let client =
        MetaClient::connect_lazily(config).context("connecting to the metadata service")?;
    let ctx = Ctx {
        client,
        addrs,
        json: cli.json,
    };
    match cli.command {
        Cmd::Status => return status(&ctx).await,
        Cmd::Repair {
            now,
            wait,
            wait_secs,
            limit,
        } => repair(&ctx, now, wait.then_some(wait_secs), limit).await?,
        Cmd::Chunks { path } => chunks(&ctx, &path).await?,
        Cmd::Ls { path } => ls(&ctx, &path).await?,
        Cmd::Mkdir { path } => mkdir(&ctx, &path).await?,
        Cmd::Touch { path } => touch(&ctx, &path).await?,
        Cmd::Stat { path } => stat(&ctx, &path).await?,
        Cmd::Rm { path } => rm(&ctx, &path).await?,
        Cmd::Mv { from, to } => mv(&ctx, &from, &to).await?,
        Cmd::Df => df(&ctx).await?,
        Cmd::Put { local, path } => put(&ctx, &local, &path).await?,
        Cmd::Get { path, local } => get(&ctx, &path, &local).await?,
        Cmd::Nodes => nodes(&ctx).await?,
        Cmd::Node {
            command:
                NodeCmd::Drain {
                    id,
                    wait,
                    wait_secs,
                },
        } => node_drain(&ctx, id, wait.then_some(wait_secs)).await?,
        Cmd::Node {
            command: NodeCmd::Remove { id },
        } => node_remove(&ctx, id).await?,
        Cmd::Layout {
            path,
            replicas,
            ec,
            chunk_size,
        } => layout(&ctx, &path, replicas, ec, chunk_size).await?,
        Cmd::Meta { command } => meta(&ctx, command).await?,
    }
    Ok(0)
}

// ------------------------------------------------------------------ cluster

async fn status(ctx: &Ctx) -> Result<u8> {
    let h = admin::cluster_health(&ctx.client, &ctx.addrs).await;
    ctx.show(&h, print_status)?;
    Ok(if h.meta.iter().all(|m| m.error.is_some()) {
        EXIT_UNREACHABLE
    } else {
        match h.health {
            Health::Ok => 0,
            Health::Warn => EXIT_DEGRADED,
            Health::Err => EXIT_DATA_UNAVAILABLE,
        }
    })
}

fn print_status(h: &ClusterHealth) {
    println!("health: {}", h.health.label());
    for p in &h.problems {
        println!("        {p}");
    }
    let answering = h.meta.iter().filter(|m| m.error.is_none()).count();
    match h.leader {
        Some(id) => println!(
            "meta:   leader {id}, {answering} of {} members answer",
            h.meta.len()
        ),
        None => println!(
            "meta:   no leader, {answering} of {} members answer",
            h.meta.len()
        ),
    }
    println!(
        "        {:<4} {:<22} {:<10} {:>6} {:>9} {:>9} {:>9}",
        "id", "address", "role", "term", "commit", "applied", "log-from"
    );
    for m in &h.meta {
        match (&m.error, m.id) {
            (None, Some(id)) => println!(
                "        {:<4} {:<22} {:<10} {:>6} {:>9} {:>9} {:>9}",
                id, m.address, m.role, m.term, m.commit_index, m.applied_index, m.first_index
            ),
            (err, _) => println!(
                "        ?    {:<22} unreachable: {}",
                m.address,
                err.as_deref().unwrap_or_default()
            ),
        }
    }
    let count = |state: &str| h.chunk_servers.iter().filter(|s| s.state == state).count();
    println!(
        "chunks: {} servers: {} up, {} down, {} draining, {} drained; {} of {} used",
        h.chunk_servers.len() - count("removed"),
        count("up"),
        count("down"),
        count("draining"),
        count("drained"),
        human(h.used_bytes),
        human(h.capacity_bytes)
    );
    match &h.chunks {
        Some(c) => println!(
            "        {} under-replicated ({} being repaired, {} unreadable); repairs done {}, failed {}",
            c.under_replicated, c.repairing, c.unreadable, c.repaired_total, c.failed_total
        ),
        None => println!("        chunk health unknown (no metadata leader to ask)"),
    }
    if let Some(c) = h.chunks.as_ref().filter(|c| c.draining_servers > 0) {
        println!(
            "        draining {} servers: {} chunks still to move (`kerfsctl node drain ID` for one)",
            c.draining_servers, c.to_move
        );
    }
}

async fn meta(ctx: &Ctx, command: MetaCmd) -> Result<()> {
    let view = match command {
        MetaCmd::Members => members::members(&ctx.client).await?,
        MetaCmd::Add { member, wait_secs } => {
            let (id, addr) = kerfs_cli::parse_member(&member)?;
            let mut last = None;
            let json = ctx.json;
            members::add(
                &ctx.client,
                id,
                &addr,
                Duration::from_secs(wait_secs),
                |v| {
                    let matched = v.get(id).map_or(0, |m| m.matched);
                    if !json && last != Some(matched) {
                        eprintln!(
                            "learner {id}: log at {matched} of the leader's {}",
                            v.last_index
                        );
                        last = Some(matched);
                    }
                },
            )
            .await
            .with_context(|| format!("adding metadata node {id}"))?
        }
        MetaCmd::Remove { id, wait_secs } => {
            members::remove(&ctx.client, id, Duration::from_secs(wait_secs))
                .await
                .with_context(|| format!("removing metadata node {id}"))?
        }
        MetaCmd::TransferLeader { id, wait_secs } => {
            members::transfer_leader(&ctx.client, id, Duration::from_secs(wait_secs))
                .await
                .with_context(|| format!("moving leadership to metadata node {id}"))?
        }
    };
    ctx.show(&view, print_members)
}

fn print_members(v: &members::Members) {
    println!(
        "leader {} (term {}), last index {}, commit {}{}",
        v.leader,
        v.term,
        v.last_index,
        v.commit_index,
        if v.change_pending {
            ", a membership change is pending"
        } else {
            ""
        }
    );
    println!(
        "{:<4} {:<22} {:<8} {:>9} {:>6}",
        "id", "address", "role", "matched", "active"
    );
    for m in &v.members {
        println!(
            "{:<4} {:<22} {:<8} {:>9} {:>6}",
            m.id,
            m.address,
            m.role,
            m.matched,
            if m.active { "yes" } else { "no" }
        );
    }
}

async fn nodes(ctx: &Ctx) -> Result<()> {
    let servers = admin::chunk_servers(&ctx.client).await?;
    ctx.show(&servers, |servers| {
        println!(
            "{:<4} {:<22} {:<9} {:>12} {:>12} {:>12} {:>8}  domain",
            "id", "address", "state", "capacity", "used", "allocated", "chunks"
        );
        for s in servers {
            println!(
                "{:<4} {:<22} {:<9} {:>12} {:>12} {:>12} {:>8}  {}",
                s.id,
                s.address,
                s.state,
                human(s.capacity_bytes),
                human(s.used_bytes),
                human(s.allocated_bytes),
                s.chunks,
                s.failure_domain
            );
        }
    })
}

async fn node_drain(ctx: &Ctx, id: u64, wait_secs: Option<u64>) -> Result<()> {
    let mut p = admin::drain_server(&ctx.client, id)
        .await
        .with_context(|| format!("starting the drain of chunk server {id}"))?;
    if let Some(secs) = wait_secs {
        let at = std::time::Instant::now() + Duration::from_secs(secs);
        // On a terminal, a bar of the chunks moved since the wait began; else a line a second.
        let mut bar: Option<indicatif::ProgressBar> = None;
        let mut most_left = 0;
        while !p.drained {
            if std::time::Instant::now() > at {
                if let Some(b) = &bar {
                    b.abandon();
                }
                ctx.show(&p, print_drain)?;
                anyhow::bail!(
                    "chunk server {id} still holds {} chunks after {secs} s; see the notes above, `kerfsctl repair` and the chunk servers' logs",
                    p.chunks_left
                );
            }
            most_left = most_left.max(p.chunks_left);
            if bar.is_none() {
                bar = kerfs_cli::progress_bar(
                    "draining",
                    "{msg} [{bar:40}] {pos}/{len} chunks moved, {elapsed} elapsed",
                );
            }
            match &bar {
                Some(b) => {
                    b.set_length(most_left);
                    b.set_position(most_left - p.chunks_left);
                    b.set_message(format!(
                        "draining server {id}: {} left ({} moving)",
                        p.chunks_left, p.moving
                    ));
                }
                None => eprintln!(
                    "chunk server {id} ({}): {} chunks left, {} moving",
                    p.state, p.chunks_left, p.moving
                ),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            p = admin::drain_progress(&ctx.client, id).await?;
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
    }
    ctx.show(&p, print_drain)
}

fn print_drain(p: &admin::DrainProgress) {
    if p.drained {
        println!("chunk server {}: drained, 0 chunks left", p.server_id);
    } else {
        println!(
            "chunk server {}: {}, {} chunks left ({} moving)",
            p.server_id, p.state, p.chunks_left, p.moving
        );
        if p.state == "down" {
            println!("  the server is down: its drain goes on when it comes back");
        }
    }
    for n in &p.notes {
        println!("  {n}");
    }
}

async fn node_remove(ctx: &Ctx, id: u64) -> Result<()> {
    admin::remove_server(&ctx.client, id)
        .await
        .with_context(|| format!("removing chunk server {id}"))?;
    ctx.show(&serde_json::json!({ "removed": id }), |_| {
        println!("chunk server {id} removed")
    })
}

/// The repair queue as JSON: the counts and the chunks listed.
#[derive(Serialize)]
struct RepairView {
    #[serde(flatten)]
    health: admin::ChunkHealth,
    chunks: Vec<UnderReplicatedView>,
}

#[derive(Serialize)]
struct UnderReplicatedView {
    ino: u64,
    index: u64,
    good: u32,
    wanted: u32,
    /// The server copying it, when a repair task is out.
    target_server: Option<u64>,
    note: String,
}

async fn repair_view(ctx: &Ctx, limit: u32) -> Result<RepairView> {
    let (health, report) = admin::repair_report(&ctx.client, limit).await?;
    Ok(RepairView {
        health,
        chunks: report
            .chunks
            .into_iter()
            .map(|c| UnderReplicatedView {
                ino: c.ino,
                index: c.index,
                good: c.good,
                wanted: c.wanted,
                target_server: c.task.map(|t| t.target_server),
                note: c.note,
            })
            .collect(),
    })
}

async fn repair(ctx: &Ctx, now: bool, wait_secs: Option<u64>, limit: u32) -> Result<()> {
    if now {
        kerfs_client::check(
            ctx.client
                .write(kerfs_proto::command::Op::RepairChunks(
                    kerfs_proto::RepairChunks { rescan: true },
                ))
                .await?,
        )
        .context("asking for a repair pass")?;
    }
    let deadline = wait_secs.map(|s| (s, std::time::Instant::now() + Duration::from_secs(s)));
    // On a terminal, a bar of the chunks repaired since the wait began (made once there is
    // something to wait for); else a line a second.
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut most_lacking = 0;
    loop {
        let r = repair_view(ctx, limit).await?;
        let lacking = r.health.under_replicated;
        match deadline {
            Some((secs, at)) if lacking > 0 => {
                if std::time::Instant::now() > at {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    ctx.show(&r, print_repair)?;
                    anyhow::bail!(
                        "{lacking} chunks still lack copies after {secs} s; see the notes above and the chunk servers' logs"
                    );
                }
                most_lacking = most_lacking.max(lacking);
                if bar.is_none() {
                    bar = kerfs_cli::progress_bar(
                        "repairing",
                        "{msg} [{bar:40}] {pos}/{len} chunks, {elapsed} elapsed",
                    );
                }
                match &bar {
                    Some(b) => {
                        b.set_length(most_lacking);
                        b.set_position(most_lacking - lacking);
                        b.set_message(format!("repairing ({} in progress)", r.health.repairing));
                    }
                    None => eprintln!(
                        "{lacking} chunks under-replicated, {} being repaired",
                        r.health.repairing
                    ),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return ctx.show(&r, print_repair);
            }
        }
    }
}

fn print_repair(r: &RepairView) {
    let h = &r.health;
    println!(
        "chunks under-replicated: {} (repairing {}, unreadable {}); repairs done {}, failed {}",
        h.under_replicated, h.repairing, h.unreadable, h.repaired_total, h.failed_total
    );
    for c in &r.chunks {
        let task = match c.target_server {
            Some(t) => format!("being copied to server {t}"),
            None => "waiting".to_string(),
        };
        let note = if c.note.is_empty() {
            String::new()
        } else {
            format!("; {}", c.note)
        };
        println!(
            "  inode {} chunk {}: {}/{} good; {task}{note}",
            c.ino, c.index, c.good, c.wanted
        );
    }
}

async fn chunks(ctx: &Ctx, path: &str) -> Result<()> {
    let f = admin::file_chunks(&ctx.client, path).await?;
    ctx.show(&f, print_chunks)
}

fn print_chunks(f: &FileChunks) {
    println!("{} ({})", f.path, f.layout);
    for c in &f.chunks {
        let copies: Vec<String> = c
            .copies
            .iter()
            .map(|p| {
                let mark = match p.state {
                    CopyState::Ok => "ok".to_string(),
                    CopyState::Stale => "STALE".to_string(),
                    CopyState::Corrupt => "CORRUPT".to_string(),
                    CopyState::Missing => format!("MISSING:server {}", p.server_state),
                };
                let shard = p.shard_index.map(|s| format!("s{s}:")).unwrap_or_default();
                format!(
                    "{shard}{}@{}({}) {mark}",
                    p.chunk_id, p.server_id, p.address
                )
            })
            .collect();
        println!(
            "chunk {:>6} v{:<4} {}/{}{}  {}",
            c.index,
            c.version,
            c.good,
            c.wanted,
            if c.good < c.wanted {
                " UNDER-REPLICATED"
            } else {
                ""
            },
            copies.join(", ")
        );
    }
}

async fn df(ctx: &Ctx) -> Result<()> {
    let s = ctx.client.statfs().await?;
    #[derive(Serialize)]
    struct Df {
        size_bytes: u64,
        free_bytes: u64,
        available_bytes: u64,
        files: u64,
        files_free: u64,
    }
    let df = Df {
        size_bytes: s.blocks * s.block_size,
        free_bytes: s.blocks_free * s.block_size,
        available_bytes: s.blocks_avail * s.block_size,
        files: s.files,
        files_free: s.files_free,
    };
    ctx.show(&df, |d| {
        println!(
            "size {}, free {}, available {}, files {} (free {})",
            human(d.size_bytes),
            human(d.free_bytes),
            human(d.available_bytes),
            d.files,
            d.files_free
        )
    })
}

async fn layout(
    ctx: &Ctx,
    path: &str,
    replicas: Option<u32>,
    ec: Option<String>,
    chunk_size: Option<String>,
) -> Result<()> {
    let dir = ctx.client.resolve(path).await?;
    let mut layout = kerfs_client::check(
        ctx.client
            .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                ino: dir.ino,
                first_index: 0,
                count: 1,
            }))
            .await?,
    )?
    .layout
    .unwrap_or_default();
    if replicas.is_some() || ec.is_some() || chunk_size.is_some() {
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
        layout = ctx.client.set_layout(dir.ino, layout).await?;
    }
    #[derive(Serialize)]
    struct LayoutView {
        path: String,
        replicas: u32,
        ec_data: u32,
        ec_parity: u32,
        chunk_size: u64,
        description: String,
    }
    let view = LayoutView {
        path: path.to_string(),
        replicas: layout.replicas,
        ec_data: layout.ec_data,
        ec_parity: layout.ec_parity,
        chunk_size: layout.chunk_size,
        description: admin::describe_layout(&layout),
    };
    ctx.show(&view, |v| println!("{}", v.description))
}

// ------------------------------------------------------------------ namespace and data

/// A path's attributes, as `stat`, `ls` and the creating commands print them.
#[derive(Serialize)]
struct Entry {
    name: String,
    ino: u64,
    kind: &'static str,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    mtime: i64,
}

impl Entry {
    fn of(name: &str, a: &Attr) -> Entry {
        Entry {
            name: name.to_string(),
            ino: a.ino,
            kind: match FileKind::try_from(a.kind) {
                Ok(FileKind::Directory) => "directory",
                Ok(FileKind::Symlink) => "symlink",
                Ok(FileKind::Fifo) => "fifo",
                Ok(FileKind::Socket) => "socket",
                Ok(FileKind::CharDevice) => "char-device",
                Ok(FileKind::BlockDevice) => "block-device",
                _ => "file",
            },
            mode: format!("{:04o}", a.mode & 0o7777),
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            nlink: a.nlink,
            mtime: a.mtime.as_ref().map(|t| t.sec).unwrap_or_default(),
        }
    }

    fn print(&self) {
        println!(
            "{:>10} {:<9} {} {:>5} {:>5} {:>12} {}",
            self.ino, self.kind, self.mode, self.uid, self.gid, self.size, self.name
        );
    }
}

async fn ls(ctx: &Ctx, path: &str) -> Result<()> {
    let dir = ctx.client.resolve(path).await?;
    let mut entries = Vec::new();
    for e in ctx.client.readdir_all(dir.ino).await? {
        let attr = ctx.client.getattr(e.ino).await?;
        entries.push(Entry::of(&String::from_utf8_lossy(&e.name), &attr));
    }
    ctx.show(&entries, |entries| entries.iter().for_each(Entry::print))
}

async fn stat(ctx: &Ctx, path: &str) -> Result<()> {
    let a = ctx.client.resolve(path).await?;
    ctx.show(&Entry::of(path, &a), Entry::print)
}

async fn mkdir(ctx: &Ctx, path: &str) -> Result<()> {
    let (parent, name) = ctx.client.resolve_parent(path).await?;
    let a = ctx.client.mkdir(parent.ino, name.as_bytes(), 0o755).await?;
    ctx.show(&Entry::of(path, &a), |_| {})
}

async fn touch(ctx: &Ctx, path: &str) -> Result<()> {
    let (parent, name) = ctx.client.resolve_parent(path).await?;
    let a = ctx
        .client
        .create_file(parent.ino, name.as_bytes(), 0o644)
        .await?;
    ctx.show(&Entry::of(path, &a), |_| {})
}

async fn rm(ctx: &Ctx, path: &str) -> Result<()> {
    let (parent, name) = ctx.client.resolve_parent(path).await?;
    let attr = ctx.client.lookup(parent.ino, name.as_bytes()).await?;
    if attr.kind == FileKind::Directory as i32 {
        ctx.client.rmdir(parent.ino, name.as_bytes()).await?;
    } else {
        ctx.client.unlink(parent.ino, name.as_bytes()).await?;
    }
    ctx.show(&serde_json::json!({ "removed": path }), |_| {})
}

async fn mv(ctx: &Ctx, from: &str, to: &str) -> Result<()> {
    let (p1, n1) = ctx.client.resolve_parent(from).await?;
    let (p2, n2) = ctx.client.resolve_parent(to).await?;
    ctx.client
        .rename(p1.ino, n1.as_bytes(), p2.ino, n2.as_bytes(), 0)
        .await?;
    ctx.show(&serde_json::json!({ "from": from, "to": to }), |_| {})
}

async fn put(ctx: &Ctx, local: &std::path::Path, path: &str) -> Result<()> {
    use std::io::Read;
    let (parent, name) = ctx.client.resolve_parent(path).await?;
    let data = DataClient::new(ctx.client.clone());
    let file = data
        .create(parent.ino, name.as_bytes(), 0o644, false)
        .await?;
    file.truncate(0).await?;
    let mut src =
        std::fs::File::open(local).with_context(|| format!("opening {}", local.display()))?;
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
    ctx.show(
        &serde_json::json!({ "path": path, "bytes": offset }),
        |_| println!("{offset} bytes -> {path}"),
    )
}

async fn get(ctx: &Ctx, path: &str, local: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let attr = ctx.client.resolve(path).await?;
    let data = DataClient::new(ctx.client.clone());
    let file = data.open(attr.ino, libc::O_RDONLY as u32).await?;
    let to_stdout = local.as_os_str() == "-";
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(local)
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
    drop(out);
    file.close().await?;
    if to_stdout {
        return Ok(()); // the bytes are the output
    }
    ctx.show(
        &serde_json::json!({ "path": path, "bytes": offset }),
        |_| {},
    )
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
