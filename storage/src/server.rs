//! The chunk server as a network service: the data directory's identity checks, the `Chunk`
//! gRPC service behind the cluster-key interceptor, chain replication, the metrics endpoint,
//! the periodic scrubber and the heartbeat loop.
//!
//! Chain replication: the receiving server forwards the header (with the chain shortened by
//! one) and every data frame to the next replica as it receives them, through a small bounded
//! queue, while writing locally; one local write is in flight while the next frame is being
//! received and forwarded, so the chain streams instead of storing and forwarding the chunk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::Stream;
use kerfs_proto::auth::{ClientAuth, ClusterKey};
use kerfs_proto::chunk_client::ChunkClient;
use kerfs_proto::chunk_server::{Chunk, ChunkServer};
use kerfs_proto::chunk_write_frame::Frame;
use kerfs_proto::{
    ChunkChainReply, ChunkCorruption, ChunkDeleteReply, ChunkDeleteRequest, ChunkHeartbeat,
    ChunkHeartbeatReply, ChunkInfo, ChunkListReply, ChunkListRequest, ChunkReadFrame,
    ChunkReadRequest, ChunkReplicaResult, ChunkScrubReply, ChunkScrubRequest, ChunkServerInfo,
    ChunkServerInfoRequest, ChunkSetVersionRequest, ChunkStatRequest, ChunkTruncateRequest,
    ChunkWriteFrame, ChunkWriteHeader, MAX_MESSAGE_BYTES,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{error, info, warn};

use crate::error::{Result, StorageError};
use crate::metrics::StorageMetrics;
use crate::scrub;
use crate::store::{ChunkStore, FileChunkStore};

/// Largest data frame a server sends (reads, forwarded writes keep the client's frames).
pub const FRAME_BYTES: u64 = 1024 * 1024;

/// Sends one heartbeat to the metadata service and returns its answer. The metadata client
/// lives outside this crate, so the daemon that starts the server plugs it in here.
pub type HeartbeatFn = Arc<
    dyn Fn(ChunkHeartbeat) -> BoxFuture<'static, std::result::Result<ChunkHeartbeatReply, String>>
        + Send
        + Sync,
>;

/// How the server reports to the metadata service.
#[derive(Clone)]
pub struct HeartbeatConfig {
    pub interval: Duration,
    /// Every n-th heartbeat carries a full chunk report (the others: changes only).
    pub full_report_every: u32,
    pub send: HeartbeatFn,
}

impl std::fmt::Debug for HeartbeatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatConfig")
            .field("interval", &self.interval)
            .field("full_report_every", &self.full_report_every)
            .finish_non_exhaustive()
    }
}

/// Everything a chunk server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This server's id, given by the cluster (meta) and recorded in the data directory.
    pub server_id: u64,
    /// The cluster's id, recorded in the data directory at first start.
    pub cluster_id: String,
    pub listen: SocketAddr,
    /// The address clients and peers dial ("host:port"); default: `listen`.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub key: ClusterKey,
    pub failure_domain: String,
    pub metrics_listen: Option<SocketAddr>,
    /// Period of the background scrub (None: only on demand and after an unclean stop).
    pub scrub_interval: Option<Duration>,
    /// How long a downstream replica may stall a chain mutation before it is reported failed.
    pub forward_timeout: Duration,
    /// Largest chunk (offset + length) this server accepts.
    pub max_chunk_bytes: u64,
    pub heartbeat: Option<HeartbeatConfig>,
}

impl ServerConfig {
    pub fn new(
        server_id: u64,
        cluster_id: impl Into<String>,
        listen: SocketAddr,
        data_dir: PathBuf,
        key: ClusterKey,
    ) -> ServerConfig {
        ServerConfig {
            server_id,
            cluster_id: cluster_id.into(),
            listen,
            advertise: listen.to_string(),
            data_dir,
            key,
            failure_domain: String::new(),
            metrics_listen: None,
            scrub_interval: Some(Duration::from_secs(24 * 3600)),
            forward_timeout: Duration::from_secs(30),
            max_chunk_bytes: 4 << 30,
            heartbeat: None,
        }
    }
}

/// Runs a chunk server until `shutdown` resolves, then stops cleanly (everything synced and
/// the data directory marked clean, so the next start skips the recovery scrub).
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StorageError::Listen {
            addr: config.listen,
            source,
        })?;
    run_on(listener, config, shutdown).await
}

/// [`run`] on a listener the caller bound already: a daemon binds before it registers, so a
/// port that is taken fails the start instead of announcing an address nobody serves.
pub async fn run_on(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let dir_state = open_data_dir(&config)?;
    let metrics = Arc::new(StorageMetrics::default());
    let store: Arc<dyn ChunkStore> = Arc::new(FileChunkStore::open(
        &config.data_dir,
        config.max_chunk_bytes,
        metrics.clone(),
    )?);
    let usage = store.usage();
    info!(
        server = config.server_id,
        chunks = usage.chunk_count,
        used = usage.used_bytes,
        unclean = dir_state.unclean,
        "chunk server opened its data"
    );

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    if let Some(addr) = config.metrics_listen {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|source| StorageError::Listen { addr, source })?;
        let (s, m, id) = (store.clone(), metrics.clone(), config.server_id);
        let render: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(move || m.render(id, &s.usage()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, render).await {
                error!(error = %e, "metrics endpoint failed");
            }
        }));
    }
    if dir_state.unclean {
        // The last run did not stop cleanly: writes may have been torn. Reads already refuse
        // torn blocks; the scrub finds them so meta can repair them before anyone asks.
        warn!(
            server = config.server_id,
            "previous run did not stop cleanly; scrubbing every chunk in the background"
        );
        let (s, m) = (store.clone(), metrics.clone());
        tasks.push(tokio::spawn(async move {
            let _ = tokio::task::spawn_blocking(move || scrub::scrub(s.as_ref(), &m)).await;
        }));
    }
    if let Some(interval) = config.scrub_interval {
        tasks.push(tokio::spawn(scrub::periodic(
            store.clone(),
            metrics.clone(),
            interval,
            interval,
        )));
    }

    let inner = Arc::new(Inner {
        store: store.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        peers: Mutex::new(HashMap::new()),
        repairs: Default::default(),
    });
    if let Some(hb) = config.heartbeat.clone() {
        tasks.push(tokio::spawn(heartbeat_loop(inner.clone(), hb)));
    }

    info!(server = config.server_id, addr = %config.listen, "chunk server serving");
    let service = ChunkServer::new(ChunkService { inner })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let served = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(InterceptedService::new(service, config.key.server_auth()))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    info!(server = config.server_id, "chunk server stopping");
    for t in &tasks {
        t.abort();
    }
    let s = store.clone();
    let flushed = tokio::task::spawn_blocking(move || s.flush())
        .await
        .map_err(|e| StorageError::Transport(format!("flush task failed: {e}")))?;
    served.map_err(|e| StorageError::Transport(e.to_string()))?;
    flushed?;
    mark_clean(&config.data_dir)?;
    drop(dir_state);
    Ok(())
}

fn incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

// ---------------------------------------------------------------- data directory

const CLUSTER_ID_FILE: &str = "cluster-id";
const SERVER_ID_FILE: &str = "server-id";
const CLEAN_FILE: &str = "clean-shutdown";
const LOCK_FILE: &str = "lock";

/// The data directory, locked for this process.
struct DirState {
    _lock: std::fs::File,
    unclean: bool,
}

fn dir_err(path: &Path, why: impl std::fmt::Display) -> StorageError {
    StorageError::DataDir {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// Creates or checks the data directory: one server at a time (flock), the right cluster
/// and server id, and whether the last run stopped cleanly.
fn open_data_dir(config: &ServerConfig) -> Result<DirState> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::AsRawFd;
    let dir = &config.data_dir;
    if config.cluster_id.trim().is_empty() || config.cluster_id.contains('\n') {
        return Err(dir_err(
            dir,
            "the cluster id is empty or spans lines; pass the cluster's id",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| dir_err(dir, format!("cannot create it: {e}")))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| dir_err(dir, format!("cannot set its mode: {e}")))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| dir_err(dir, format!("cannot open {}: {e}", lock_path.display())))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StorageError::Locked { path: dir.clone() });
    }
    let chunks_exist = dir.join("chunks").exists();
    match read_tag(dir, CLUSTER_ID_FILE)? {
        Some(found) if found != config.cluster_id.trim() => {
            return Err(StorageError::WrongCluster {
                path: dir.clone(),
                found,
                expected: config.cluster_id.trim().to_string(),
            })
        }
        Some(_) => {}
        None if chunks_exist => {
            return Err(dir_err(
                dir,
                "it holds chunks but no cluster-id file; it was not made by a KerFS chunk server of this version, use an empty directory",
            ))
        }
        None => write_tag(dir, CLUSTER_ID_FILE, config.cluster_id.trim())?,
    }
    match read_tag(dir, SERVER_ID_FILE)? {
        Some(found) if found != config.server_id.to_string() => {
            return Err(StorageError::WrongServer {
                path: dir.clone(),
                found,
                expected: config.server_id,
            })
        }
        Some(_) => {}
        None => write_tag(dir, SERVER_ID_FILE, &config.server_id.to_string())?,
    }
    let clean = dir.join(CLEAN_FILE);
    let unclean = if clean.exists() {
        std::fs::remove_file(&clean)
            .map_err(|e| dir_err(dir, format!("cannot remove {CLEAN_FILE}: {e}")))?;
        sync_dir(dir)?;
        false
    } else {
        chunks_exist
    };
    Ok(DirState {
        _lock: lock,
        unclean,
    })
}

/// The identity recorded in a data directory by an earlier start: (cluster id, server id),
/// or None for a new directory. A daemon restarting on its directory uses this to keep its
/// server id instead of registering as a new server.
pub fn read_identity(data_dir: &Path) -> Result<Option<(String, u64)>> {
    let (Some(cluster), Some(server)) = (
        read_tag(data_dir, CLUSTER_ID_FILE)?,
        read_tag(data_dir, SERVER_ID_FILE)?,
    ) else {
        return Ok(None);
    };
    let id = server.parse().map_err(|_| {
        dir_err(
            data_dir,
            format!("its {SERVER_ID_FILE} file holds {server:?}, not a number; the directory is damaged"),
        )
    })?;
    Ok(Some((cluster, id)))
}

fn read_tag(dir: &Path, name: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(dir_err(dir, format!("cannot read {name}: {e}"))),
    }
}

/// Writes a small file atomically and durably (tmp, fsync, rename, fsync dir).
fn write_tag(dir: &Path, name: &str, value: &str) -> Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let err = |e: std::io::Error| dir_err(dir, format!("cannot write {name}: {e}"));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    writeln!(f, "{value}").map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(err)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| dir_err(dir, format!("cannot sync it: {e}")))
}

fn mark_clean(dir: &Path) -> Result<()> {
    write_tag(dir, CLEAN_FILE, "1")
}

// ---------------------------------------------------------------- the service

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ChunkStore>,
    pub(crate) metrics: Arc<StorageMetrics>,
    config: ServerConfig,
    /// Lazily connected channels to peers, by address (chain forwarding, repair copies).
    peers: Mutex<HashMap<String, Channel>>,
    pub(crate) repairs: crate::repair::Repairs,
}

pub(crate) type PeerClient = ChunkClient<InterceptedService<Channel, ClientAuth>>;

impl Inner {
    pub(crate) fn peer(&self, addr: &str) -> Result<PeerClient> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match peers.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| {
                        StorageError::InvalidArgument(format!("bad replica address {addr:?}: {e}"))
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                peers.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(
            ChunkClient::with_interceptor(channel, self.config.key.client_auth())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// Converts an error to the client's Status, counting what the metrics count.
    fn status(&self, e: StorageError) -> Status {
        if matches!(e, StorageError::NoSpace { .. }) {
            self.metrics.no_space_errors.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "disk full");
        }
        e.to_status()
    }

    fn me(&self, info: &ChunkInfo) -> ChunkReplicaResult {
        ChunkReplicaResult {
            address: self.config.advertise.clone(),
            ok: true,
            code: 0,
            message: String::new(),
            chunk_length: info.length,
            version: info.version,
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Transport(format!("storage worker failed: {e}")))?
}

fn check_id(id: u64) -> std::result::Result<(), Status> {
    if id == 0 {
        Err(Status::invalid_argument(
            "chunk id 0 is reserved; ask the metadata service for a chunk id",
        ))
    } else {
        Ok(())
    }
}

/// Results for a downstream replica that failed and the replicas after it.
fn failed_tail(
    addr: &str,
    rest: &[String],
    code: Code,
    message: String,
) -> Vec<ChunkReplicaResult> {
    let mut v = vec![ChunkReplicaResult {
        address: addr.to_string(),
        ok: false,
        code: code as i32,
        message,
        chunk_length: 0,
        version: 0,
    }];
    for r in rest {
        v.push(ChunkReplicaResult {
            address: r.clone(),
            ok: false,
            code: Code::Unknown as i32,
            message: format!("not known: the replica before it in the chain ({addr}) failed"),
            chunk_length: 0,
            version: 0,
        });
    }
    v
}

/// Normalises a downstream reply: its first entry is named as we dialed it, and it has one
/// entry per chain member.
fn downstream_results(
    addr: &str,
    rest: &[String],
    reply: ChunkChainReply,
) -> Vec<ChunkReplicaResult> {
    let mut v = reply.replicas;
    if v.is_empty() {
        return failed_tail(
            addr,
            rest,
            Code::Internal,
            "answered without results".into(),
        );
    }
    v[0].address = addr.to_string();
    while v.len() < rest.len() + 1 {
        let i = v.len() - 1;
        v.push(ChunkReplicaResult {
            address: rest[i].clone(),
            ok: false,
            code: Code::Unknown as i32,
            message: "missing from the downstream reply".into(),
            chunk_length: 0,
            version: 0,
        });
    }
    v
}

fn chain_reply(replicas: Vec<ChunkReplicaResult>, bytes: u64) -> ChunkChainReply {
    ChunkChainReply {
        all_ok: replicas.iter().all(|r| r.ok),
        replicas,
        bytes,
    }
}

/// A write stream being forwarded to the next replica.
struct Forward {
    addr: String,
    rest: Vec<String>,
    tx: Option<mpsc::Sender<ChunkWriteFrame>>,
    task: JoinHandle<std::result::Result<ChunkChainReply, Status>>,
    /// Why forwarding stopped early, if it did.
    failed: Option<String>,
    timeout: Duration,
}

impl Forward {
    fn start(inner: &Inner, header: &ChunkWriteHeader) -> Forward {
        let addr = header.chain[0].clone();
        let rest = header.chain[1..].to_vec();
        let (tx, rx) = mpsc::channel::<ChunkWriteFrame>(4);
        let mut down = header.clone();
        down.chain = rest.clone();
        let first = ChunkWriteFrame {
            frame: Some(Frame::Header(down)),
        };
        let client = inner.peer(&addr);
        let task = tokio::spawn(async move {
            let mut client = client.map_err(|e| e.to_status())?;
            let frames = futures::stream::once(async move { first })
                .chain(tokio_stream::wrappers::ReceiverStream::new(rx));
            client.write(frames).await.map(Response::into_inner)
        });
        Forward {
            addr,
            rest,
            tx: Some(tx),
            task,
            failed: None,
            timeout: inner.config.forward_timeout,
        }
    }

    async fn send(&mut self, data: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        let frame = ChunkWriteFrame {
            frame: Some(Frame::Data(data)),
        };
        match tokio::time::timeout(self.timeout, tx.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The downstream call ended early; finish() reports its error.
                self.failed = Some("the downstream replica stopped taking data".into());
                self.tx = None;
            }
            Err(_) => {
                self.failed = Some(format!(
                    "the downstream replica took no data for {:?}",
                    self.timeout
                ));
                self.tx = None;
                self.task.abort();
            }
        }
    }

    /// Ends the stream and collects the downstream results.
    async fn finish(mut self) -> Vec<ChunkReplicaResult> {
        self.tx = None;
        let outcome = tokio::time::timeout(self.timeout, &mut self.task).await;
        let results = match outcome {
            Ok(Ok(Ok(reply))) => match &self.failed {
                None => downstream_results(&self.addr, &self.rest, reply),
                Some(why) => failed_tail(&self.addr, &self.rest, Code::Aborted, why.clone()),
            },
            Ok(Ok(Err(status))) => failed_tail(
                &self.addr,
                &self.rest,
                status.code(),
                status.message().to_string(),
            ),
            Ok(Err(join)) => failed_tail(
                &self.addr,
                &self.rest,
                Code::Aborted,
                self.failed.clone().unwrap_or_else(|| join.to_string()),
            ),
            Err(_) => {
                self.task.abort();
                failed_tail(
                    &self.addr,
                    &self.rest,
                    Code::DeadlineExceeded,
                    format!("no answer within {:?}", self.timeout),
                )
            }
        };
        results
    }

    fn abort(self) {
        // Dropping the call resets the downstream stream, so the replica there refuses the
        // partial write instead of acknowledging it.
        self.task.abort();
    }
}

use futures::StreamExt as _;

#[derive(Clone)]
struct ChunkService {
    inner: Arc<Inner>,
}

type ReadStream = Pin<Box<dyn Stream<Item = std::result::Result<ChunkReadFrame, Status>> + Send>>;

impl ChunkService {
    /// Receives the data frames of a write and applies them locally (forwarding first).
    async fn write_local(
        &self,
        header: &ChunkWriteHeader,
        stream: &mut Streaming<ChunkWriteFrame>,
        fwd: &mut Option<Forward>,
        mut info: ChunkInfo,
    ) -> Result<(u64, ChunkInfo)> {
        let (id, version) = (header.chunk_id, header.version);
        let mut pos = header.offset;
        let mut total = 0u64;
        let mut pending: Option<JoinHandle<Result<ChunkInfo>>> = None;
        loop {
            let frame = match stream.message().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(s) => {
                    return Err(StorageError::Transport(format!(
                        "the write stream broke after {total} bytes: {}",
                        s.message()
                    )))
                }
            };
            let data = match frame.frame {
                Some(Frame::Data(d)) => d,
                _ => {
                    return Err(StorageError::InvalidArgument(
                        "only data frames may follow the header of a write".into(),
                    ))
                }
            };
            if data.is_empty() {
                continue;
            }
            if let Some(f) = fwd.as_mut() {
                f.send(data.clone()).await;
            }
            if let Some(p) = pending.take() {
                info = join_write(p).await?;
            }
            let store = self.inner.store.clone();
            let at = pos;
            pos += data.len() as u64;
            total += data.len() as u64;
            pending = Some(tokio::task::spawn_blocking(move || {
                store.write(id, version, at, &data)
            }));
        }
        if let Some(p) = pending.take() {
            info = join_write(p).await?;
        }
        if header.length != 0 && total != header.length {
            return Err(StorageError::InvalidArgument(format!(
                "the write announced {} bytes but carried {total}",
                header.length
            )));
        }
        if header.sync {
            let store = self.inner.store.clone();
            blocking(move || store.sync(id)).await?;
        }
        Ok((total, info))
    }

    /// Runs a unary chain mutation: locally, then on the rest of the chain.
    async fn chain_unary<F, Fut>(
        &self,
        local: Result<ChunkInfo>,
        chain: &[String],
        forward: F,
    ) -> std::result::Result<Response<ChunkChainReply>, Status>
    where
        F: FnOnce(PeerClient, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<ChunkChainReply, Status>>,
    {
        let info = local.map_err(|e| self.inner.status(e))?;
        let mut replicas = vec![self.inner.me(&info)];
        if let Some((next, rest)) = chain.split_first() {
            let results = match self.inner.peer(next) {
                Err(e) => failed_tail(next, rest, Code::InvalidArgument, e.to_string()),
                Ok(client) => {
                    match tokio::time::timeout(
                        self.inner.config.forward_timeout,
                        forward(client, rest.to_vec()),
                    )
                    .await
                    {
                        Ok(Ok(reply)) => downstream_results(next, rest, reply),
                        Ok(Err(s)) => failed_tail(next, rest, s.code(), s.message().to_string()),
                        Err(_) => failed_tail(
                            next,
                            rest,
                            Code::DeadlineExceeded,
                            "no answer in time".into(),
                        ),
                    }
                }
            };
            replicas.extend(results);
        }
        let reply = chain_reply(replicas, 0);
        if !reply.all_ok {
            self.inner
                .metrics
                .forward_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(reply))
    }
}

async fn join_write(p: JoinHandle<Result<ChunkInfo>>) -> Result<ChunkInfo> {
    p.await
        .map_err(|e| StorageError::Transport(format!("storage worker failed: {e}")))?
}

#[tonic::async_trait]
impl Chunk for ChunkService {
    async fn write(
        &self,
        request: Request<Streaming<ChunkWriteFrame>>,
    ) -> std::result::Result<Response<ChunkChainReply>, Status> {
        self.inner
            .metrics
            .write_rpcs
            .fetch_add(1, Ordering::Relaxed);
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(ChunkWriteFrame {
                frame: Some(Frame::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "a write stream must start with a header frame",
                ))
            }
        };
        check_id(header.chunk_id)?;
        let mut fwd = None;
        // The local chunk is checked (or created) before anything is forwarded: a replica
        // that refuses the write must not have its successors take it.
        let result = {
            let (id, version) = (header.chunk_id, header.version);
            let store = self.inner.store.clone();
            let (create, shard) = (header.create, header.shard_index);
            match blocking(move || store.prepare_write(id, version, create, shard)).await {
                Ok(info) => {
                    if !header.chain.is_empty() {
                        fwd = Some(Forward::start(&self.inner, &header));
                    }
                    self.write_local(&header, &mut stream, &mut fwd, info).await
                }
                Err(e) => Err(e),
            }
        };
        let (bytes, info) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(f) = fwd {
                    f.abort();
                }
                warn!(chunk = format_args!("{:016x}", header.chunk_id), error = %e, "write refused");
                return Err(self.inner.status(e));
            }
        };
        let mut replicas = vec![self.inner.me(&info)];
        if let Some(f) = fwd {
            replicas.extend(f.finish().await);
        }
        let reply = chain_reply(replicas, bytes);
        if !reply.all_ok {
            self.inner
                .metrics
                .forward_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(chunk = format_args!("{:016x}", header.chunk_id), replicas = ?reply.replicas, "chain write incomplete");
        }
        Ok(Response::new(reply))
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ChunkReadRequest>,
    ) -> std::result::Result<Response<ReadStream>, Status> {
        self.inner.metrics.read_rpcs.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        check_id(r.chunk_id)?;
        let store = self.inner.store.clone();
        let (id, version) = (r.chunk_id, r.version);
        let end = r.offset.saturating_add(r.length);
        // The first frame is read before answering, so "not found", "stale" and the like
        // are the call's status rather than a stream error.
        let first_len = r.length.min(FRAME_BYTES);
        let first = {
            let store = store.clone();
            let off = r.offset;
            blocking(move || store.read(id, version, off, first_len))
                .await
                .map_err(|e| self.inner.status(e))?
        };
        let (tx, rx) = mpsc::channel(4);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let chunk_length = first.chunk_length;
            let mut pos = r.offset + first.data.len() as u64;
            let more = first.data.len() as u64 == first_len && pos < end.min(chunk_length);
            let frame = ChunkReadFrame {
                offset: r.offset,
                data: first.data,
                chunk_length,
                version,
            };
            if tx.send(Ok(frame)).await.is_err() || !more {
                return;
            }
            while pos < end.min(chunk_length) {
                let n = (end - pos).min(FRAME_BYTES);
                let s = store.clone();
                let at = pos;
                match blocking(move || s.read(id, version, at, n)).await {
                    Ok(out) => {
                        if out.data.is_empty() {
                            break; // truncated meanwhile
                        }
                        pos += out.data.len() as u64;
                        let frame = ChunkReadFrame {
                            offset: at,
                            data: out.data,
                            chunk_length: out.chunk_length,
                            version,
                        };
                        if tx.send(Ok(frame)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(inner.status(e))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn truncate(
        &self,
        request: Request<ChunkTruncateRequest>,
    ) -> std::result::Result<Response<ChunkChainReply>, Status> {
        let r = request.into_inner();
        check_id(r.chunk_id)?;
        let store = self.inner.store.clone();
        let (id, version, length, sync) = (r.chunk_id, r.version, r.length, r.sync);
        let local = blocking(move || store.truncate(id, version, length, sync)).await;
        let chain = r.chain.clone();
        self.chain_unary(local, &chain, |mut client, rest| async move {
            let mut down = r.clone();
            down.chain = rest;
            client.truncate(down).await.map(Response::into_inner)
        })
        .await
    }

    async fn set_version(
        &self,
        request: Request<ChunkSetVersionRequest>,
    ) -> std::result::Result<Response<ChunkChainReply>, Status> {
        let r = request.into_inner();
        check_id(r.chunk_id)?;
        let store = self.inner.store.clone();
        let (id, from, to, create, shard) = (
            r.chunk_id,
            r.from_version,
            r.version,
            r.create,
            r.shard_index,
        );
        let local = blocking(move || store.set_version(id, from, to, create, shard)).await;
        let chain = r.chain.clone();
        self.chain_unary(local, &chain, |mut client, rest| async move {
            let mut down = r.clone();
            down.chain = rest;
            client.set_version(down).await.map(Response::into_inner)
        })
        .await
    }

    async fn stat(
        &self,
        request: Request<ChunkStatRequest>,
    ) -> std::result::Result<Response<ChunkInfo>, Status> {
        let id = request.into_inner().chunk_id;
        check_id(id)?;
        self.inner
            .store
            .stat(id)
            .map(Response::new)
            .map_err(|e| self.inner.status(e))
    }

    async fn list(
        &self,
        request: Request<ChunkListRequest>,
    ) -> std::result::Result<Response<ChunkListReply>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            10_000
        } else {
            r.limit as usize
        };
        let mut chunks = self.inner.store.list(r.start_after, limit + 1);
        let more = chunks.len() > limit;
        chunks.truncate(limit);
        Ok(Response::new(ChunkListReply { chunks, more }))
    }

    async fn delete(
        &self,
        request: Request<ChunkDeleteRequest>,
    ) -> std::result::Result<Response<ChunkDeleteReply>, Status> {
        let r = request.into_inner();
        check_id(r.chunk_id)?;
        let store = self.inner.store.clone();
        let existed = blocking(move || store.delete(r.chunk_id, r.max_version))
            .await
            .map_err(|e| self.inner.status(e))?;
        Ok(Response::new(ChunkDeleteReply { existed }))
    }

    async fn scrub(
        &self,
        _request: Request<ChunkScrubRequest>,
    ) -> std::result::Result<Response<ChunkScrubReply>, Status> {
        let (s, m) = (self.inner.store.clone(), self.inner.metrics.clone());
        let report = tokio::task::spawn_blocking(move || scrub::scrub(s.as_ref(), &m))
            .await
            .map_err(|e| Status::internal(format!("scrub failed: {e}")))?;
        Ok(Response::new(ChunkScrubReply {
            chunks_checked: report.chunks_checked,
            bytes_checked: report.bytes_checked,
            corrupt: report
                .corrupt
                .into_iter()
                .map(|c| ChunkCorruption {
                    chunk_id: c.chunk_id,
                    blocks: c.blocks,
                    message: c.message,
                })
                .collect(),
        }))
    }

    async fn server_info(
        &self,
        _request: Request<ChunkServerInfoRequest>,
    ) -> std::result::Result<Response<ChunkServerInfo>, Status> {
        let inner = self.inner.clone();
        let info = tokio::task::spawn_blocking(move || server_info(&inner))
            .await
            .map_err(|e| Status::internal(format!("server info failed: {e}")))?;
        Ok(Response::new(info))
    }
}

fn server_info(inner: &Inner) -> ChunkServerInfo {
    let u = inner.store.usage();
    ChunkServerInfo {
        id: inner.config.server_id,
        address: inner.config.advertise.clone(),
        capacity_bytes: u.capacity_bytes,
        used_bytes: u.used_bytes,
        available_bytes: u.available_bytes,
        failure_domain: inner.config.failure_domain.clone(),
        cluster_id: inner.config.cluster_id.clone(),
        chunk_count: u.chunk_count,
    }
}

/// Builds one heartbeat: full (every chunk) or the changes since the last one, corrupt
/// chunks always included.
fn build_heartbeat(inner: &Inner, full: bool) -> ChunkHeartbeat {
    let (changed, deleted) = inner.store.take_changes();
    let mut chunks = Vec::new();
    let mut after = 0;
    loop {
        let page = inner.store.list(after, 4096);
        let Some(last) = page.last() else { break };
        after = last.chunk_id;
        let n = page.len();
        chunks.extend(page.into_iter().filter(|c| full || c.corrupt));
        if n < 4096 {
            break;
        }
    }
    if !full {
        for id in changed {
            if let Ok(c) = inner.store.stat(id) {
                if !c.corrupt {
                    chunks.push(c);
                }
            }
        }
    }
    ChunkHeartbeat {
        server: Some(server_info(inner)),
        full_report: full,
        chunks,
        deleted: if full { Vec::new() } else { deleted },
        repaired: Vec::new(),
    }
}

async fn heartbeat_loop(inner: Arc<Inner>, hb: HeartbeatConfig) {
    let every = hb.full_report_every.max(1);
    let mut beat: u32 = 0;
    let mut want_full = true;
    loop {
        let full = want_full || beat.is_multiple_of(every);
        let i = inner.clone();
        let mut msg = match tokio::task::spawn_blocking(move || build_heartbeat(&i, full)).await {
            Ok(m) => m,
            Err(e) => {
                error!(error = %e, "building a heartbeat failed");
                tokio::time::sleep(hb.interval).await;
                continue;
            }
        };
        msg.repaired = inner.repairs.take_done();
        let reported = msg.repaired.clone();
        match (hb.send)(msg).await {
            Ok(reply) => {
                want_full = reply.want_full_report;
                for d in reply.delete {
                    let store = inner.store.clone();
                    let r = blocking(move || store.delete(d.chunk_id, d.max_version)).await;
                    match r {
                        Ok(_) => info!(
                            chunk = format_args!("{:016x}", d.chunk_id),
                            "deleted on the metadata service's request"
                        ),
                        Err(e) => {
                            warn!(chunk = format_args!("{:016x}", d.chunk_id), error = %e, "delete asked by the metadata service refused")
                        }
                    }
                }
                // After the deletions: an order may recreate an id deleted just now.
                crate::repair::start(&inner, reply.repair);
            }
            Err(e) => {
                // The changes taken for this beat are lost: the next one is a full report.
                warn!(error = %e, "heartbeat to the metadata service failed; retrying");
                want_full = true;
                inner.repairs.put_back(reported);
            }
        }
        beat = beat.wrapping_add(1);
        tokio::time::sleep(hb.interval).await;
    }
}
