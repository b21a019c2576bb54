//! Helpers for cluster-level tests: start real `kerfsd` processes on loopback ports with real
//! data directories, kill -9 / stop / restart them, and connect clients to them.
//!
//! The binaries are looked up next to the test executable (target/<profile>/), so build them
//! first: `cargo build --workspace --bins` (scripts/test does).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kerfs_client::{MetaClient, MetaClientConfig};
use kerfs_proto::auth::ClusterKey;
use kerfs_proto::chunk_client::ChunkClient;
use tracing::info;

/// `tracing` output for tests (RUST_LOG, default info), once per process.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Path of a workspace binary built next to the running test or benchmark
/// (target/<profile>/deps/<test> or target/<profile>/<bench>).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} is not built next to {}: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        exe.display()
    )
}

/// A free loopback port for a daemon to listen on. Taken below the kernel's ephemeral range
/// (32768 and up), where a port the kernel hands out with `bind(:0)` could be given again to
/// an outgoing connection between our check and the daemon's bind; each test process starts
/// at its own place (by pid) and walks up, checking that the port binds.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 997) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {LOW} and {}", LOW + SPAN)
}

/// One `kerfsd meta` process and what it needs to be restarted the same way.
pub struct MetaProc {
    pub id: u64,
    pub addr: String,
    pub metrics_addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// Started with `--join` (added to the running group later) instead of `--peers`.
    pub join: bool,
    child: Option<Child>,
}

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct MetaClusterOptions {
    pub nodes: u64,
    pub compact_after: u64,
    pub tick_ms: u64,
    /// Where the cluster's temporary directory (every daemon's data and log) is made; the
    /// system's temporary directory when `None`. A tmpfs here makes fsync free, for tests of
    /// semantics rather than durability.
    pub parent_dir: Option<PathBuf>,
    /// `--chunk-server-timeout-ms` of every metadata node (None: the daemon's default).
    pub chunk_server_timeout_ms: Option<u64>,
    /// `--read-mode` of every metadata node (None: the daemon's default).
    pub read_mode: Option<&'static str>,
    /// `--flush-ms` of every metadata node (None: the daemon's default).
    pub flush_ms: Option<u64>,
}

impl Default for MetaClusterOptions {
    fn default() -> Self {
        MetaClusterOptions {
            nodes: 3,
            compact_after: 10_000,
            tick_ms: 100,
            parent_dir: None,
            chunk_server_timeout_ms: None,
            read_mode: None,
            flush_ms: None,
        }
    }
}

/// A metadata cluster of real processes under a temporary directory.
pub struct MetaCluster {
    pub dir: tempfile::TempDir,
    pub key_file: PathBuf,
    pub key: ClusterKey,
    pub nodes: BTreeMap<u64, MetaProc>,
    peers: String,
    options: MetaClusterOptions,
    pub kerfsd: PathBuf,
}

impl MetaCluster {
    pub fn start(options: MetaClusterOptions) -> Result<MetaCluster> {
        let kerfsd = bin_path("kerfsd")?;
        let mut dir = tempfile::Builder::new();
        dir.prefix("kerfs-test-");
        let dir = match &options.parent_dir {
            Some(parent) => dir.tempdir_in(parent),
            None => dir.tempdir(),
        }?;
        let key_file = dir.path().join("cluster.key");
        let key = ClusterKey::load_or_create(&key_file)?;
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let metrics_addr = format!("127.0.0.1:{}", free_port()?);
            nodes.insert(
                id,
                MetaProc {
                    id,
                    addr,
                    metrics_addr,
                    data: dir.path().join(format!("meta{id}")),
                    log: dir.path().join(format!("meta{id}.log")),
                    join: false,
                    child: None,
                },
            );
        }
        let peers = nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = MetaCluster {
            dir,
            key_file,
            key,
            nodes,
            peers,
            options,
            kerfsd,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        let mut cmd = Command::new(&self.kerfsd);
        cmd.arg("meta")
            .args(["--id", &id.to_string(), "--listen", &node.addr]);
        if node.join {
            cmd.arg("--join");
        } else {
            cmd.args(["--peers", &self.peers]);
        }
        cmd.arg("--data")
            .arg(&node.data)
            .arg("--key-file")
            .arg(&self.key_file)
            .args(["--metrics", &node.metrics_addr])
            .args(["--compact-after", &self.options.compact_after.to_string()])
            .args(["--tick-ms", &self.options.tick_ms.to_string()]);
        if let Some(t) = self.options.chunk_server_timeout_ms {
            cmd.args(["--chunk-server-timeout-ms", &t.to_string()]);
        }
        if let Some(mode) = self.options.read_mode {
            cmd.args(["--read-mode", mode]);
        }
        if let Some(ms) = self.options.flush_ms {
            cmd.args(["--flush-ms", &ms.to_string()]);
        }
        let child = start_daemon(cmd, &node.log, &format!("kerfsd meta {id}"))?;
        info!(node = id, pid = child.id(), addr = %node.addr, "started metadata node");
        node.child = Some(child);
        Ok(())
    }

    /// Starts node `id` with `--join` (empty data directory, no peers), to be added with
    /// `kerfsctl meta add`; returns its address.
    pub fn start_joining(&mut self, id: u64) -> Result<String> {
        ensure!(!self.nodes.contains_key(&id), "node {id} exists already");
        let addr = format!("127.0.0.1:{}", free_port()?);
        self.nodes.insert(
            id,
            MetaProc {
                id,
                addr: addr.clone(),
                metrics_addr: format!("127.0.0.1:{}", free_port()?),
                data: self.dir.path().join(format!("meta{id}")),
                log: self.dir.path().join(format!("meta{id}.log")),
                join: true,
                child: None,
            },
        );
        self.spawn(id)?;
        Ok(addr)
    }

    /// Runs `kerfsctl --meta ADDRS ARGS` against this cluster (every node's address, or
    /// `meta` when given); returns its exit code, standard output and standard error,
    /// whatever the code.
    pub fn kerfsctl(&self, meta: Option<&str>, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(bin_path("kerfsctl")?)
            .arg("--meta")
            .arg(meta.map_or_else(|| self.addrs().join(","), str::to_string))
            .arg("--key-file")
            .arg(&self.key_file)
            .args(["--timeout", "5"])
            .args(args)
            .output()
            .context("running kerfsctl")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    /// kill -9: the process gets no chance to flush anything.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        sigkill(node.child.take(), &format!("metadata node {id}"))
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        if let Some(child) = node.child.take() {
            stop_child(child, &format!("metadata node {id}"), &node.log)?;
        }
        Ok(())
    }

    /// SIGSTOP (`freeze: true`) or SIGCONT: a node that stalls and comes back with the state
    /// it had, like a paused VM or a process stuck in the kernel.
    pub fn freeze(&mut self, id: u64, freeze: bool) -> Result<()> {
        let pid = self
            .nodes
            .get(&id)
            .and_then(|n| n.child.as_ref())
            .ok_or_else(|| anyhow!("metadata node {id} is not running"))?
            .id();
        let sig = if freeze { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child's pid; it is not reaped while we hold the Child.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!(
                "signal {sig} to metadata node {id}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn client_config(&self) -> MetaClientConfig {
        let mut c = MetaClientConfig::new(self.addrs(), self.key.clone());
        c.deadline = Duration::from_secs(30);
        c.description = "test client".into();
        c
    }

    pub async fn client(&self) -> Result<MetaClient> {
        Ok(MetaClient::connect(self.client_config()).await?)
    }

    /// Waits until a node reports itself leader, and returns its id.
    pub async fn wait_leader(&self, client: &MetaClient, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for node in self.nodes.values() {
                if node.child.is_none() {
                    continue;
                }
                if let Ok(s) = client.node_status(&node.addr).await {
                    if s.role == "leader" {
                        return Ok(s.id);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node has applied at least `index`, then returns each
    /// running node's state digest, taken at the same applied index.
    pub async fn converged_digests(
        &self,
        client: &MetaClient,
        timeout: Duration,
    ) -> Result<BTreeMap<u64, (Vec<u8>, u64)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut digests = BTreeMap::new();
            for node in self.nodes.values().filter(|n| n.child.is_some()) {
                if let Ok(d) = client.node_digest(&node.addr).await {
                    digests.insert(node.id, d);
                }
            }
            let running = self.nodes.values().filter(|n| n.child.is_some()).count();
            let indexes: std::collections::BTreeSet<u64> = digests.values().map(|d| d.1).collect();
            if digests.len() == running && indexes.len() == 1 {
                return Ok(digests);
            }
            if Instant::now() > deadline {
                bail!(
                    "nodes did not converge to one applied index within {timeout:?}: {:?}",
                    digests.iter().map(|(id, d)| (id, d.1)).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fetches the metrics page of a node.
    pub fn metrics(&self, id: u64) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.nodes[&id].metrics_addr)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The value of one metric of node `id`.
    pub fn metric(&self, id: u64, name: &str) -> Result<f64> {
        let page = self.metrics(id)?;
        let line = page
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .with_context(|| format!("{name} missing from the metrics of node {id}:\n{page}"))?;
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[&id].log).unwrap_or_default()
    }
}

impl Drop for MetaCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One `kerfsd chunk` process.
pub struct ChunkProc {
    pub index: u64,
    pub addr: String,
    pub metrics_addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub failure_domain: String,
    child: Option<Child>,
}

/// Options of a whole test cluster.
#[derive(Clone, Debug)]
pub struct KerfsClusterOptions {
    pub meta: MetaClusterOptions,
    pub chunk_servers: u64,
    /// Failure domain of chunk server i (1-based) is `failure_domains[i-1]` if given.
    pub failure_domains: Vec<String>,
    /// Data directory of chunk server i (1-based) is `chunk_data_dirs[i-1]` if given (e.g. a
    /// small tmpfs mounted by the test); otherwise `chunk<i>` under the cluster's directory.
    pub chunk_data_dirs: Vec<Option<PathBuf>>,
}

impl Default for KerfsClusterOptions {
    fn default() -> Self {
        KerfsClusterOptions {
            meta: MetaClusterOptions::default(),
            chunk_servers: 3,
            failure_domains: Vec::new(),
            chunk_data_dirs: Vec::new(),
        }
    }
}

/// A whole cluster of real processes: metadata nodes and chunk servers.
pub struct KerfsCluster {
    pub meta: MetaCluster,
    pub chunks: BTreeMap<u64, ChunkProc>,
}

impl KerfsCluster {
    /// Starts the metadata nodes and the chunk servers, and waits until every chunk server
    /// is registered and up.
    pub async fn start(options: KerfsClusterOptions) -> Result<KerfsCluster> {
        let meta = MetaCluster::start(options.meta.clone())?;
        let mut chunks = BTreeMap::new();
        for index in 1..=options.chunk_servers {
            chunks.insert(
                index,
                ChunkProc {
                    index,
                    addr: format!("127.0.0.1:{}", free_port()?),
                    metrics_addr: format!("127.0.0.1:{}", free_port()?),
                    data: options
                        .chunk_data_dirs
                        .get(index as usize - 1)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| meta.dir.path().join(format!("chunk{index}"))),
                    log: meta.dir.path().join(format!("chunk{index}.log")),
                    failure_domain: options
                        .failure_domains
                        .get(index as usize - 1)
                        .cloned()
                        .unwrap_or_default(),
                    child: None,
                },
            );
        }
        let mut cluster = KerfsCluster { meta, chunks };
        for index in 1..=options.chunk_servers {
            cluster.spawn_chunk(index)?;
        }
        let client = cluster.client().await?;
        cluster
            .wait_chunk_servers_up(
                &client,
                options.chunk_servers as usize,
                Duration::from_secs(30),
            )
            .await?;
        Ok(cluster)
    }

    fn spawn_chunk(&mut self, index: u64) -> Result<()> {
        let meta_addrs = self.meta.addrs().join(",");
        let node = self
            .chunks
            .get_mut(&index)
            .ok_or_else(|| anyhow!("no chunk server {index}"))?;
        let mut cmd = Command::new(&self.meta.kerfsd);
        cmd.arg("chunk")
            .args(["--meta", &meta_addrs, "--listen", &node.addr])
            .arg("--data")
            .arg(&node.data)
            .arg("--key-file")
            .arg(&self.meta.key_file)
            .args(["--metrics", &node.metrics_addr])
            .args(["--failure-domain", &node.failure_domain])
            .args(["--heartbeat-secs", "1"]);
        let child = start_daemon(cmd, &node.log, &format!("kerfsd chunk {index}"))?;
        info!(chunk = index, pid = child.id(), addr = %node.addr, "started chunk server");
        node.child = Some(child);
        Ok(())
    }

    pub async fn client(&self) -> Result<MetaClient> {
        self.meta.client().await
    }

    /// The sum of one metric over every chunk server that answers.
    pub fn chunk_metric_sum(&self, name: &str) -> Result<f64> {
        use std::io::{Read, Write};
        let mut sum = 0.0;
        for c in self.chunks.values() {
            let Ok(mut s) = std::net::TcpStream::connect(&c.metrics_addr) else {
                continue;
            };
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            let line = page
                .lines()
                .find(|l| l.starts_with(name) && !l.starts_with('#'))
                .with_context(|| format!("{name} missing from chunk server {}", c.index))?;
            sum += line.rsplit(' ').next().unwrap_or("").parse::<f64>()?;
        }
        Ok(sum)
    }

    pub fn chunk_addr(&self, index: u64) -> &str {
        &self.chunks[&index].addr
    }

    pub fn chunk_data_dir(&self, index: u64) -> &Path {
        &self.chunks[&index].data
    }

    /// kill -9 of a chunk server.
    pub fn kill9_chunk(&mut self, index: u64) -> Result<()> {
        let node = self
            .chunks
            .get_mut(&index)
            .ok_or_else(|| anyhow!("no chunk server {index}"))?;
        sigkill(node.child.take(), &format!("chunk server {index}"))
    }

    /// SIGTERM and wait.
    pub fn stop_chunk(&mut self, index: u64) -> Result<()> {
        let node = self
            .chunks
            .get_mut(&index)
            .ok_or_else(|| anyhow!("no chunk server {index}"))?;
        if let Some(child) = node.child.take() {
            stop_child(child, &format!("chunk server {index}"), &node.log)?;
        }
        Ok(())
    }

    pub fn restart_chunk(&mut self, index: u64) -> Result<()> {
        self.spawn_chunk(index)
    }

    /// Process ids of every running metadata node and chunk server (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        let meta = self.meta.nodes.values().filter_map(|n| n.child.as_ref());
        let chunks = self.chunks.values().filter_map(|n| n.child.as_ref());
        meta.chain(chunks).map(|c| c.id()).collect()
    }

    /// Which of the cluster's chunk servers (1-based index) listens on `addr`.
    pub fn server_index(&self, addr: &str) -> Result<u64> {
        self.chunks
            .keys()
            .copied()
            .find(|&i| self.chunk_addr(i) == addr)
            .with_context(|| format!("no chunk server of the test cluster listens on {addr}"))
    }

    /// A direct Chunk RPC client to the chunk server at `addr`, with the cluster key.
    pub async fn chunk_rpc(&self, addr: &str) -> Result<ChunkRpc> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to chunk server {addr}"))?;
        Ok(
            ChunkClient::with_interceptor(channel, self.meta.key.client_auth())
                .max_decoding_message_size(kerfs_proto::MAX_MESSAGE_BYTES),
        )
    }

    /// Waits until at least `n` chunk servers are registered and up.
    pub async fn wait_chunk_servers_up(
        &self,
        client: &MetaClient,
        n: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = client
                .read(kerfs_proto::read_op::Op::ListChunkServers(
                    kerfs_proto::ListChunkServers {},
                ))
                .await?;
            let up = reply.servers.iter().filter(|s| s.state == "up").count();
            if reply.errno == 0 && up >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {up} of {n} chunk servers up after {timeout:?} (errno {}: {}); logs in {}",
                    reply.errno,
                    reply.message,
                    self.meta.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for KerfsCluster {
    fn drop(&mut self) {
        for node in self.chunks.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Starts a daemon with its output appended to `log` (restarts keep the earlier lines).
fn start_daemon(mut cmd: Command, log: &Path, what: &str) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {what}"))
}

/// kill -9 and reap: the process gets no chance to flush anything.
fn sigkill(child: Option<Child>, what: &str) -> Result<()> {
    if let Some(mut child) = child {
        child.kill()?;
        child.wait()?;
        info!(what, "killed with SIGKILL");
    }
    Ok(())
}

/// The last `n` lines of a daemon's log, for an error message (the temporary directory that
/// holds the log is gone once the test fails).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SIGTERM, then wait up to 10 s for a clean exit.
fn stop_child(mut child: Child, what: &str, log: &Path) -> Result<()> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            info!(what, ?status, "stopped");
            if !status.success() {
                bail!(
                    "{what} exited with {status} on SIGTERM; the end of {}:\n{}",
                    log.display(),
                    log_tail(log, 20)
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("{what} did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A replicated layout: `r` copies of every `chunk_size` chunk.
pub fn replicated(r: u32, chunk_size: u64) -> kerfs_proto::Layout {
    kerfs_proto::Layout {
        replicas: r,
        chunk_size,
        ..Default::default()
    }
}

/// An erasure-coded layout: `k` data and `m` parity shards per `chunk_size` chunk.
pub fn erasure(k: u32, m: u32, chunk_size: u64) -> kerfs_proto::Layout {
    kerfs_proto::Layout {
        ec_data: k,
        ec_parity: m,
        chunk_size,
        ..Default::default()
    }
}

/// A new directory under the root whose new files get `layout`; returns its inode.
pub async fn layout_dir(meta: &MetaClient, name: &str, layout: kerfs_proto::Layout) -> Result<u64> {
    let dir = meta
        .mkdir(kerfs_proto::ROOT_INO, name.as_bytes(), 0o755)
        .await?;
    meta.set_layout(dir.ino, layout)
        .await
        .context("set_layout")?;
    Ok(dir.ino)
}

/// The bytes a test file must hold: a keyed blake3 stream, so any range of a large file can
/// be produced (and checked) without keeping the file in memory.
pub fn content(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    let mut xof = blake3::Hasher::new_keyed(&[seed; 32]).finalize_xof();
    xof.set_position(offset);
    let mut out = vec![0u8; len];
    xof.fill(&mut out);
    out
}

/// Writes `content(seed)` over `[from, from + len)` of `f` in 1 MiB requests.
pub async fn write_stream(
    f: &kerfs_client::FileHandle,
    seed: u8,
    from: u64,
    len: u64,
) -> Result<()> {
    let mut pos = from;
    while pos < from + len {
        let n = (from + len - pos).min(1 << 20) as usize;
        f.write_at(pos, &content(seed, pos, n)).await?;
        pos += n as u64;
    }
    Ok(())
}

/// blake3 of the whole file, read in sequential 1 MiB requests.
/// A file's layout and chunk table as meta has it.
pub async fn chunk_table(
    meta: &MetaClient,
    ino: u64,
) -> Result<(kerfs_proto::Layout, Vec<kerfs_proto::FileChunk>)> {
    let reply = kerfs_client::check(
        meta.read(kerfs_proto::read_op::Op::GetChunks(
            kerfs_proto::GetChunks {
                ino,
                first_index: 0,
                count: 0,
            },
        ))
        .await?,
    )?;
    Ok((reply.layout.unwrap_or_default(), reply.chunks))
}

/// The chunk server holding the most copies (replicas and shards) of the files' chunks:
/// its placement (id and address) and how many it holds.
pub async fn busiest_server(
    meta: &MetaClient,
    inos: &[u64],
) -> Result<(kerfs_proto::ChunkPlacement, usize)> {
    let mut load: BTreeMap<u64, (kerfs_proto::ChunkPlacement, usize)> = BTreeMap::new();
    for &ino in inos {
        for c in chunk_table(meta, ino).await?.1 {
            for p in c.replicas {
                load.entry(p.server_id).or_insert_with(|| (p.clone(), 0)).1 += 1;
            }
        }
    }
    load.into_values()
        .max_by_key(|(_, n)| *n)
        .context("no placements")
}

/// blake3 of the whole file, read through a fresh open.
pub async fn hash_of(data: &kerfs_client::DataClient, ino: u64) -> Result<blake3::Hash> {
    let f = data.open(ino, libc::O_RDONLY as u32).await?;
    let h = hash_file(&f).await?;
    f.close().await?;
    Ok(h)
}

pub async fn hash_file(f: &kerfs_client::FileHandle) -> Result<blake3::Hash> {
    let size = f.size();
    let mut h = blake3::Hasher::new();
    let mut pos = 0u64;
    while pos < size {
        let buf = f.read_at(pos, 1 << 20).await?;
        ensure!(!buf.is_empty(), "short read at {pos} of {size}");
        h.update(&buf);
        pos += buf.len() as u64;
    }
    Ok(h.finalize())
}

/// blake3 of the first `size` bytes of `content(seed)`.
pub fn expected_hash(seed: u8, size: u64) -> blake3::Hash {
    const STEP: u64 = 8 << 20;
    let mut h = blake3::Hasher::new();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(STEP) as usize;
        h.update(&content(seed, pos, n));
        pos += n as u64;
    }
    h.finalize()
}

/// Runs `kerfsctl ARGS` against `cluster`; returns its exit code and standard output
/// (whatever the code: status answers with 3, 4 and 5 too).
pub fn kerfsctl(cluster: &KerfsCluster, args: &[&str]) -> Result<(i32, String)> {
    let (code, stdout, stderr) = cluster.meta.kerfsctl(None, args)?;
    if code == 1 || code == 2 {
        bail!("kerfsctl {args:?} failed (exit {code}): {stderr}{stdout}");
    }
    Ok((code, stdout))
}

/// [`kerfsctl`] with `--json`, its output parsed.
pub fn kerfsctl_json(cluster: &KerfsCluster, args: &[&str]) -> Result<(i32, serde_json::Value)> {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    let (code, out) = kerfsctl(cluster, &with_json)?;
    let value = serde_json::from_str(&out)
        .with_context(|| format!("kerfsctl {args:?} --json printed no JSON:\n{out}"))?;
    Ok((code, value))
}

/// Panics (loudly: these tests must not be skipped) unless the process is root and FUSE
/// mounts are possible.
pub fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the mount tests must run as root (they mount FUSE filesystems and call mount(8))"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container the device"
    );
    assert!(
        Path::new("/sbin/mount.fuse3").exists() || Path::new("/usr/sbin/mount.fuse3").exists(),
        "mount.fuse3 is missing: apt-get install fuse3"
    );
}

// ------------------------------------------------------------------ mounts

/// The filesystem type findmnt reports at `dir`, if something is mounted there.
pub fn fstype(dir: &Path) -> Option<String> {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--mountpoint"])
        .arg(dir)
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !t.is_empty()).then_some(t)
}

/// A `kerfs` mount of a test cluster on a temporary directory. Dropping it unmounts lazily,
/// so a test that fails halfway leaves nothing mounted; `unmount` is the checked way.
pub struct Mount {
    tmp: tempfile::TempDir,
    log: PathBuf,
}

impl Mount {
    /// Runs `kerfs ADDRS DIR -o key_file=..,log=..<extra>` (daemon mode: it returns once mounted).
    pub fn new(cluster: &KerfsCluster, name: &str, extra: &str) -> Result<Mount> {
        let kerfs = bin_path("kerfs")?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("kerfs-mnt-{name}-"))
            .tempdir()?;
        let log = cluster.meta.dir.path().join(format!("kerfs-{name}.log"));
        let opts = format!(
            "key_file={},log={}{extra}",
            cluster.meta.key_file.display(),
            log.display()
        );
        let out = Command::new(&kerfs)
            .arg(cluster.meta.addrs().join(","))
            .arg(tmp.path())
            .args(["-o", &opts])
            .stdin(Stdio::null())
            .output()
            .context("running kerfs")?;
        ensure!(
            out.status.success(),
            "kerfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = Mount { tmp, log };
        ensure!(
            fstype(m.path()).as_deref() == Some("fuse.kerfs"),
            "findmnt does not show a fuse.kerfs mount at {}",
            m.path().display()
        );
        info!(mount = %m.path().display(), options = %opts, "mounted");
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The pid of the `kerfs` process serving this mount (found by its command line).
    pub fn daemon_pid(&self) -> Result<i32> {
        use std::os::unix::ffi::OsStrExt;
        let dir = self.path().as_os_str().as_bytes();
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.first().is_some_and(|a| a.ends_with(b"kerfs")) && args.contains(&dir) {
                return Ok(pid);
            }
        }
        bail!("no kerfs process serves {}", self.path().display())
    }

    /// The last 40 lines of this mount's `kerfs` log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 40)
    }

    /// umount(8), checked, and wait until findmnt no longer shows it.
    pub fn unmount(&self) -> Result<()> {
        let out = Command::new("umount").arg(self.path()).output()?;
        ensure!(
            out.status.success(),
            "umount {} failed: {}",
            self.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let start = Instant::now();
        while fstype(self.path()).is_some() {
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "{} still mounted 10 s after umount",
                self.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        info!(mount = %self.path().display(), "unmounted");
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if fstype(self.path()).is_some() {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

/// Runs `f` on a blocking thread; on failure prints the tail of the mount logs and panics.
pub async fn blocking<F>(mounts: &[&Mount], f: F)
where
    F: FnOnce() -> Result<()> + Send + 'static,
{
    let r = tokio::task::spawn_blocking(f).await.expect("test thread");
    if let Err(e) = r {
        for m in mounts {
            eprintln!(
                "--- tail of kerfs log {} ---\n{}",
                m.log.display(),
                m.log_tail()
            );
        }
        panic!("{e:#}");
    }
}

/// A numeric setting from the environment (seeds, sizes); a value that is not a number
/// stops the test rather than being ignored.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

/// Fails unless `got == want`, naming `what` and the first byte where they differ.
pub fn ensure_same(got: &[u8], want: &[u8], what: impl std::fmt::Display) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let difference = match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "first difference at +{i}: got {:#04x}, want {:#04x} ({} of {} bytes differ)",
            got[i],
            want[i],
            got.iter().zip(want).filter(|(a, b)| a != b).count(),
            want.len()
        ),
        None => format!("lengths differ: got {}, want {}", got.len(), want.len()),
    };
    bail!("{what}: {difference}")
}

/// A Chunk RPC client that proves the cluster key (see [`KerfsCluster::chunk_rpc`]).
pub type ChunkRpc = ChunkClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        kerfs_proto::auth::ClientAuth,
    >,
>;

/// Flips one bit in every 64 KiB block of every chunk data file under a chunk server's data
/// directory (what a failing disk does); returns how many files were damaged.
pub fn flip_bits_in_chunk_files(data_dir: &Path) -> Result<usize> {
    let mut n = 0;
    for sub in std::fs::read_dir(data_dir.join("chunks"))? {
        let sub = sub?.path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub)? {
            let p = f?.path();
            if p.extension().is_some_and(|e| e == "data") {
                let mut bytes = std::fs::read(&p)?;
                let mut i = 777;
                while i < bytes.len() {
                    bytes[i] ^= 0x04;
                    i += 64 * 1024;
                }
                std::fs::write(&p, &bytes)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

// ---- krg and the C test programs (checkpoint tests) ----

/// Builds tests/c/NAME.c into `dir` (the test programs of the checkpoint tests).
pub fn build(dir: &Path, name: &str) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("c/{name}.c"));
    let out = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("gcc must be installed to build the test programs")?;
    ensure!(st.success(), "gcc failed on {}", src.display());
    Ok(out)
}

/// The contents of a text file (empty if it cannot be read).
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `pred(contents of log)` holds.
pub fn wait_log(log: &Path, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> Result<String> {
    let t = Instant::now();
    loop {
        let s = read(log);
        if pred(&s) {
            return Ok(s);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            let tail: String = s.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            bail!(
                "timed out waiting for {what} in {}; last lines: {tail}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process this test created.
    unsafe { libc::kill(pid, sig) };
}

/// A `krg` command that finds the cluster through the environment, as a user's would.
pub fn krg_cmd(cluster: &KerfsCluster) -> Result<Command> {
    let mut c = Command::new(bin_path("krg")?);
    c.env("KERFS_META", cluster.meta.addrs().join(","))
        .env("KERFS_KEY_FILE", &cluster.meta.key_file)
        .env_remove("RUST_LOG");
    Ok(c)
}

/// Runs `krg ARGS` (see [`krg_cmd`]) and logs what it said.
pub fn krg(cluster: &KerfsCluster, args: &[&str]) -> Result<Output> {
    let out = krg_cmd(cluster)?.args(args).stdin(Stdio::null()).output()?;
    info!(
        ?args,
        status = ?out.status,
        stderr = %String::from_utf8_lossy(&out.stderr),
        "krg"
    );
    Ok(out)
}

/// [`krg`] that must succeed; returns its stdout and stderr.
pub fn krg_ok(cluster: &KerfsCluster, args: &[&str]) -> Result<String> {
    let out = krg(cluster, args)?;
    ensure!(
        out.status.success(),
        "krg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// `krg restart ADDR --detach` in a mount namespace of its own: another "node" with its own
/// client, sharing only the cluster. Its stderr goes to a file, not a pipe: a restored
/// process whose stdio cannot be reopened takes krg's, and would hold a pipe open forever.
pub fn restart_elsewhere(cluster: &KerfsCluster, addr: &str) -> Result<Output> {
    let err = tempfile::NamedTempFile::new()?;
    let status = Command::new("unshare")
        .args(["-m", "--"])
        .arg(bin_path("krg")?)
        .args(["restart", addr, "--detach"])
        .env("KERFS_META", cluster.meta.addrs().join(","))
        .env("KERFS_KEY_FILE", &cluster.meta.key_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.reopen()?)
        .status()?;
    let stderr = std::fs::read(err.path())?;
    info!(addr, ?status, stderr = %String::from_utf8_lossy(&stderr), "krg restart");
    Ok(Output {
        status,
        stdout: Vec::new(),
        stderr,
    })
}

/// PIDs of live processes running `prog`.
pub fn pids_of(prog: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z") && !s.contains(") X"))
            .unwrap_or(false);
        if alive
            && std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .as_deref()
                == Some(prog)
        {
            out.push(pid);
        }
    }
    out
}
