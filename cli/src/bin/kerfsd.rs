//! `kerfsd`: the KerFS daemons. `kerfsd meta` runs a metadata node, `kerfsd chunk` a chunk
//! server; `kerfsd dev` runs a whole local cluster for trying KerFS on one machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use kerfs_client::{MetaClient, MetaClientConfig};
use kerfs_meta::ServerConfig;

#[derive(Parser)]
#[command(name = "kerfsd", version, about = "KerFS daemons")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one metadata node (3 or 5 per cluster).
    #[command(after_help = "A new group: start every node with the same --peers. \
                  Growing a running group: start the new node with --join (no --peers, an empty --data), \
                  then run `kerfsctl meta add ID=HOST:PORT`; it joins as a learner, gets the state from \
                  the leader, and becomes a voter once caught up. Shrinking: `kerfsctl meta remove ID`; \
                  the removed node then refuses every client. Membership precedence on restart: the \
                  membership replicated in --data (written by the first `meta add`/`meta remove`) wins \
                  over --peers, which only seeds a new group.")]
    Meta(MetaArgs),
    /// Run one chunk server (one per disk or node).
    Chunk(ChunkArgs),
    /// Run a local cluster (3 metadata nodes, N chunk servers) under one directory, until Ctrl-C.
    Dev(DevArgs),
}

#[derive(Args, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkArgs {
    /// TOML file with any of these settings (flags win): meta, listen, advertise, data,
    /// failure_domain, key_file, metrics, heartbeat_secs.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Metadata nodes: HOST:PORT[,HOST:PORT...]
    #[arg(long)]
    meta: Option<String>,
    /// Address to listen on, e.g. 127.0.0.1:7201.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address clients and peers dial (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Data directory: chunk files and their checksums (created 0700).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Failure domain (rack, host): replicas of a chunk go to distinct domains.
    #[arg(long)]
    failure_domain: Option<String>,
    /// Cluster key file (default: $KERFS_KEY_FILE, then the standard place).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Address of the Prometheus text endpoint.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Seconds between heartbeats to the metadata service (default 2).
    #[arg(long)]
    heartbeat_secs: Option<u64>,
}

/// The settings of `--config FILE` (every key optional; the flags win over them).
fn config_file<T: Default + serde::de::DeserializeOwned>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[derive(Args, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaArgs {
    /// TOML file with any of these settings (flags win): id, listen, peers, join, data,
    /// key_file, metrics, compact_after, tick_ms, chunk_server_timeout_ms, read_mode,
    /// flush_ms.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    id: Option<u64>,
    /// Address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Every metadata node of a new group, this one included: ID=HOST:PORT,ID=HOST:PORT,...
    /// Only seeds the group: once a membership change (`kerfsctl meta add/remove`) was
    /// applied, the membership replicated in the data directory wins and --peers is ignored.
    #[arg(long, conflicts_with = "join")]
    peers: Option<String>,
    /// Join an existing group instead of starting one: start with no peers and wait until
    /// `kerfsctl meta add ID=HOST:PORT` (HOST:PORT being --listen) adds this node; the
    /// leader then sends it the whole state. Give it an empty --data directory.
    #[arg(long)]
    #[serde(default)]
    join: bool,
    /// Data directory (created 0700).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cluster key file (default: $KERFS_KEY_FILE, then /etc/kerfs/cluster.key or
    /// ~/.config/kerfs/cluster.key); created when missing.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Address of the Prometheus text endpoint.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Compact the raft log after this many applied entries.
    #[arg(long)]
    compact_after: Option<u64>,
    /// Raft tick in milliseconds (election after 10-20 ticks).
    #[arg(long)]
    tick_ms: Option<u64>,
    /// A chunk server silent this long is marked down and its chunks re-replicated
    /// (default 10000). Every metadata node of a cluster must use the same value.
    #[arg(long)]
    chunk_server_timeout_ms: Option<u64>,
    /// How the leader makes reads linearizable: `lease` (default: no heartbeat round while
    /// its lease holds; assumes the nodes' clocks run at rates within 20 % of each other and
    /// every node has the same --tick-ms) or `read-index` (a heartbeat round per batch of
    /// reads; assumes nothing about clocks).
    #[arg(long)]
    read_mode: Option<String>,
    /// Flush the metadata store to disk every this many milliseconds (default 100). Every
    /// acknowledged operation survives a kill of all metadata nodes at once; a power cut of a
    /// majority at once loses at most this much of what no fsync asked for.
    #[arg(long)]
    flush_ms: Option<u64>,
}

#[derive(Args)]
struct DevArgs {
    /// Directory holding the data of every daemon.
    #[arg(long, default_value = "/tmp/kerfs-dev")]
    dir: PathBuf,
    /// First port: metadata nodes listen on BASE+1..BASE+3 (metrics BASE+101..), chunk
    /// servers on BASE+201.. (metrics BASE+301..).
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// Cluster key file (created when missing, where clients on this machine look for it).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Chunk servers to start (on BASE+201...).
    #[arg(long, default_value_t = 3)]
    chunk_servers: u16,
    /// Also mount the cluster here (with the `kerfs` binary next to this one), unmounted
    /// when the cluster stops.
    #[arg(long)]
    mount: Option<PathBuf>,
}

fn main() -> Result<()> {
    kerfs_cli::init_logging("info");
    let cli = Cli::parse();
    match cli.command {
        Cmd::Meta(args) => run_meta(args),
        Cmd::Chunk(args) => run_chunk(args),
        Cmd::Dev(args) => run_dev(args),
    }
}

fn parse_peers(list: &str) -> Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = kerfs_cli::parse_member(item).context("--peers")?;
        if peers.insert(id, addr).is_some() {
            bail!("peer id {id} appears twice in --peers");
        }
    }
    if peers.is_empty() {
        bail!("--peers lists no node");
    }
    Ok(peers)
}

fn run_meta(flags: MetaArgs) -> Result<()> {
    let file: MetaArgs = config_file(flags.config.as_deref())?;
    let id = flags
        .id
        .or(file.id)
        .ok_or_else(|| anyhow!("--id is required"))?;
    let listen = flags
        .listen
        .or(file.listen)
        .ok_or_else(|| anyhow!("--listen is required"))?;
    let join = flags.join || file.join;
    let peers = match flags.peers.as_deref().or(file.peers.as_deref()) {
        Some(list) if !join => parse_peers(list)?,
        Some(_) => bail!("--join and --peers exclude each other: a joining node learns its peers from the leader"),
        None if join => BTreeMap::new(),
        None => bail!("--peers is required (or --join, to be added to a running group with `kerfsctl meta add`)"),
    };
    let data = flags
        .data
        .or(file.data)
        .ok_or_else(|| anyhow!("--data is required"))?;
    let key_file = flags.key_file.or(file.key_file);
    let (key, key_path) = kerfs_cli::daemon_key(key_file.as_deref())?;
    tracing::info!(key = %key_path.display(), "using cluster key");

    let mut config = ServerConfig::new(id, listen, peers, data, key);
    config.join = join;
    config.metrics_listen = flags.metrics.or(file.metrics);
    if let Some(c) = flags.compact_after.or(file.compact_after) {
        config.compact_after = c;
    }
    if let Some(t) = flags.tick_ms.or(file.tick_ms) {
        config.tick = Duration::from_millis(t.max(1));
    }
    if let Some(t) = flags
        .chunk_server_timeout_ms
        .or(file.chunk_server_timeout_ms)
    {
        config.namespace.chunk_server_timeout_ms = t.max(1);
    }
    if let Some(ms) = flags.flush_ms.or(file.flush_ms) {
        config.flush_every = Duration::from_millis(ms.max(1));
    }
    if let Some(mode) = flags.read_mode.or(file.read_mode) {
        config.read_mode = mode
            .parse()
            .map_err(|e: String| anyhow!("--read-mode: {e}"))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(kerfs_meta::run(config, kerfs_cli::shutdown_signal()))
        .context("metadata node failed")?;
    Ok(())
}

/// `kerfsd chunk`'s settings once flags and the config file are merged.
struct ChunkSettings {
    meta: String,
    listen: SocketAddr,
    advertise: Option<String>,
    data: PathBuf,
    failure_domain: String,
    key_file: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    heartbeat_secs: u64,
}

impl ChunkSettings {
    fn from(flags: ChunkArgs) -> Result<ChunkSettings> {
        let file: ChunkArgs = config_file(flags.config.as_deref())?;
        Ok(ChunkSettings {
            meta: flags
                .meta
                .or(file.meta)
                .ok_or_else(|| anyhow!("--meta is required"))?,
            listen: flags
                .listen
                .or(file.listen)
                .ok_or_else(|| anyhow!("--listen is required"))?,
            advertise: flags.advertise.or(file.advertise),
            data: flags
                .data
                .or(file.data)
                .ok_or_else(|| anyhow!("--data is required"))?,
            failure_domain: flags
                .failure_domain
                .or(file.failure_domain)
                .unwrap_or_default(),
            key_file: flags.key_file.or(file.key_file),
            metrics: flags.metrics.or(file.metrics),
            heartbeat_secs: flags.heartbeat_secs.or(file.heartbeat_secs).unwrap_or(2),
        })
    }
}

fn run_chunk(flags: ChunkArgs) -> Result<()> {
    let args = ChunkSettings::from(flags)?;
    let (key, key_path) = kerfs_cli::daemon_key(args.key_file.as_deref())?;
    let cluster_id = key.cluster_id();
    let known = kerfs_storage::read_identity(&args.data)
        .with_context(|| format!("reading the identity of {}", args.data.display()))?;
    let known_id = match known {
        Some((cid, _)) if cid != cluster_id => bail!(
            "{} belongs to cluster {cid}, but the key {} is of cluster {cluster_id}; use that cluster's key or another directory",
            args.data.display(),
            key_path.display()
        ),
        Some((_, id)) => id,
        None => 0,
    };
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| args.listen.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        // Bind before registering: a taken port must fail the start, not leave the cluster
        // believing a server is up at an address nobody serves.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| {
                format!("listening on {}; choose a free --listen port", args.listen)
            })?;
        let mut config =
            MetaClientConfig::new(MetaClientConfig::parse_addrs(&args.meta)?, key.clone());
        config.description = format!("chunk server {advertise}");
        config.deadline = Duration::from_secs(60);
        let meta = MetaClient::connect(config)
            .await
            .context("connecting to the metadata service")?;
        let info = kerfs_proto::ChunkServerInfo {
            id: known_id,
            address: advertise.clone(),
            failure_domain: args.failure_domain.clone(),
            cluster_id: cluster_id.clone(),
            ..Default::default()
        };
        let reply = meta
            .write(kerfs_proto::command::Op::RegisterChunkServer(
                kerfs_proto::RegisterChunkServer { info: Some(info) },
            ))
            .await?;
        let server_id = kerfs_client::check(reply)
            .context("registering with the metadata service")?
            .server_id;
        tracing::info!(server_id, %advertise, "registered with the metadata service");

        let mut server = kerfs_storage::ServerConfig::new(
            server_id,
            cluster_id,
            args.listen,
            args.data.clone(),
            key,
        );
        server.advertise = advertise;
        server.failure_domain = args.failure_domain;
        server.metrics_listen = args.metrics;
        let send: kerfs_storage::HeartbeatFn = std::sync::Arc::new(move |hb| {
            let meta = meta.clone();
            Box::pin(async move {
                let op = kerfs_proto::command::Op::ChunkServerHeartbeat(
                    kerfs_proto::ChunkServerHeartbeat {
                        heartbeat: Some(hb),
                    },
                );
                let reply = meta.write(op).await.map_err(|e| e.to_string())?;
                let reply = kerfs_client::check(reply).map_err(|e| e.to_string())?;
                Ok(reply.heartbeat.unwrap_or_default())
            })
        });
        server.heartbeat = Some(kerfs_storage::HeartbeatConfig {
            interval: Duration::from_secs(args.heartbeat_secs.max(1)),
            full_report_every: 30,
            send,
        });
        kerfs_storage::run_on(listener, server, kerfs_cli::shutdown_signal())
            .await
            .context("chunk server failed")
    })
}

/// A command for a child of `kerfsd dev` that gets SIGTERM when `kerfsd dev` dies, however it
/// dies (a SIGTERM before its own handler is up, kill -9): no daemon or mount is left behind.
/// The children are spawned from the main thread, which lives as long as the process, as
/// PR_SET_PDEATHSIG requires.
fn child_of_dev(program: &std::path::Path) -> Command {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    let mut cmd = Command::new(program);
    // SAFETY: prctl, getppid and raise are async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    cmd
}

/// Children of `kerfsd dev`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemons(Vec<(String, Child)>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, child) in &self.0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in &mut self.0 {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("{name} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

fn run_dev(args: DevArgs) -> Result<()> {
    let (_, key_path) = kerfs_cli::daemon_key(args.key_file.as_deref())?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let exe = std::env::current_exe().context("finding the kerfsd executable")?;
    let meta_addrs: Vec<String> = (1..=3)
        .map(|i| format!("127.0.0.1:{}", args.base_port + i))
        .collect();
    let peers = meta_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut daemons = Daemons(Vec::new());
    for (i, addr) in meta_addrs.iter().enumerate() {
        let id = i + 1;
        let log = std::fs::File::create(logs.join(format!("meta{id}.log")))?;
        let child = child_of_dev(&exe)
            .arg("meta")
            .args(["--id", &id.to_string(), "--listen", addr, "--peers", &peers])
            .arg("--data")
            .arg(args.dir.join(format!("meta{id}")))
            .arg("--key-file")
            .arg(&key_path)
            .args([
                "--metrics",
                &format!("127.0.0.1:{}", args.base_port + 100 + id as u16),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting metadata node {id}"))?;
        daemons.0.push((format!("meta{id}"), child));
    }

    let addrs = meta_addrs.join(",");
    for i in 1..=args.chunk_servers {
        let log = std::fs::File::create(logs.join(format!("chunk{i}.log")))?;
        let child = child_of_dev(&exe)
            .arg("chunk")
            .args(["--meta", &addrs])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", args.base_port + 200 + i),
            ])
            .arg("--data")
            .arg(args.dir.join(format!("chunk{i}")))
            .arg("--key-file")
            .arg(&key_path)
            .args([
                "--metrics",
                &format!("127.0.0.1:{}", args.base_port + 300 + i),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting chunk server {i}"))?;
        daemons.0.push((format!("chunk{i}"), child));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let key = kerfs_cli::client_key(Some(&key_path))?;
        let mut config = MetaClientConfig::new(meta_addrs.clone(), key);
        config.deadline = Duration::from_secs(20);
        let client = MetaClient::connect(config)
            .await
            .context("the local cluster did not come up; see the logs")?;
        let status = client.node_status(&meta_addrs[0]).await?;
        println!(
            "KerFS dev cluster up: leader {} (term {})",
            status.leader_addr, status.term
        );
        println!("  metadata:  {addrs}");
        println!(
            "  chunk servers: {} on 127.0.0.1:{}..",
            args.chunk_servers,
            args.base_port + 201
        );
        println!("  key:       {}", key_path.display());
        println!("  data/logs: {}", args.dir.display());
        println!("  try:       kerfsctl --meta {addrs} status");
        wait_chunk_servers(&client, args.chunk_servers as usize).await?;
        anyhow::Ok(())
    })
    .inspect_err(|_| eprintln!("logs are in {}", logs.display()))?;

    // Stopped before the cluster (dropped first), so the unmount can still flush.
    let mut mount = Daemons(Vec::new());
    if let Some(dir) = &args.mount {
        let kerfs = exe.with_file_name("kerfs");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(logs.join("kerfs.log"))?;
        let child = child_of_dev(&kerfs)
            .arg(&addrs)
            .arg(dir)
            .arg("-f")
            .arg("-o")
            .arg(format!("allow_other,key_file={}", key_path.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with cargo build -p kerfs)",
                    kerfs.display()
                )
            })?;
        mount.0.push(("kerfs mount".into(), child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(dir) {
            if Instant::now() > deadline {
                bail!(
                    "the mount on {} did not come up; see {}",
                    dir.display(),
                    logs.join("kerfs.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("  mounted:   {} (fuse.kerfs)", dir.display());
    }
    println!("Ctrl-C stops the cluster.");

    rt.block_on(async {
        tokio::select! {
            _ = kerfs_cli::shutdown_signal() => {}
            name = watch_children(&mut daemons) => {
                eprintln!("{name} exited unexpectedly; stopping the cluster (logs in {})", logs.display());
            }
        }
    });
    println!("stopping the dev cluster");
    drop(mount);
    drop(daemons);
    Ok(())
}

/// Whether `dir` is a mount point of type fuse.kerfs (from /proc/self/mountinfo).
fn is_mounted(dir: &std::path::Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1));
        fields.get(4).map(std::path::Path::new) == Some(dir.as_path())
            && fstype == Some(&"fuse.kerfs")
    })
}

/// Waits until `n` chunk servers are registered and up.
async fn wait_chunk_servers(client: &MetaClient, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = client
            .read(kerfs_proto::read_op::Op::ListChunkServers(
                kerfs_proto::ListChunkServers {},
            ))
            .await?;
        let up = reply.servers.iter().filter(|s| s.state == "up").count();
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {n} chunk servers came up; see their logs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch_children(daemons: &mut Daemons) -> String {
    loop {
        for (name, child) in &mut daemons.0 {
            if let Ok(Some(_)) = child.try_wait() {
                return name.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configs scripts/install puts in /etc/kerfs parse, with every key known
    /// (the structs refuse unknown ones), and give what they say.
    #[test]
    fn installed_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.d");
        let meta: MetaArgs = config_file(Some(&dir.join("meta.toml.example"))).unwrap();
        assert_eq!(meta.id, Some(1));
        assert_eq!(
            parse_peers(meta.peers.as_deref().unwrap()).unwrap().len(),
            3
        );
        let chunk = ChunkSettings::from(ChunkArgs {
            config: Some(dir.join("chunk.toml.example")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(chunk.failure_domain, "rack1");
        assert_eq!(chunk.heartbeat_secs, 2);
        assert_eq!(chunk.data, PathBuf::from("/srv/kerfs/disk1"));
        // A flag wins over the file.
        let chunk = ChunkSettings::from(ChunkArgs {
            config: Some(dir.join("chunk.toml.example")),
            failure_domain: Some("rack9".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(chunk.failure_domain, "rack9");
        let bad = std::env::temp_dir().join(format!("kerfsd-bad-{}.toml", std::process::id()));
        std::fs::write(&bad, "listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
        let err = ChunkSettings::from(ChunkArgs {
            config: Some(bad.clone()),
            ..Default::default()
        })
        .err()
        .unwrap();
        let _ = std::fs::remove_file(&bad);
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }
}
