//! A metadata node as a network service: the driver thread that owns the [`MetaNode`], the
//! gRPC services (`Meta` for clients, `Raft` for peers), the peer transport and the metrics
//! endpoint.
//!
//! Membership: the peers a node sends to are the replicated membership record's (or
//! `--peers` before any change), re-read after every applied conf change; a joining node
//! answers its leader at the address the leader's batches carry until its snapshot brings
//! the record. Membership requests (the `Members` rpc) are judged by [`crate::members`].
//!
//! The driver thread batches: it drains every queued event (raft messages, proposals,
//! reads) before handling one Ready, so many concurrent proposals share one durable write,
//! and many concurrent reads share one ReadIndex round.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use raft::StateRole;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use kerfs_proto::auth::{ClientAuth, ClusterKey};
use kerfs_proto::meta_server::{Meta, MetaServer};
use kerfs_proto::raft_client::RaftClient;
use kerfs_proto::raft_server::{Raft, RaftServer};
use kerfs_proto::{
    command, members_request, meta_response, read_op, Command, ExpireChunkServers, ExpireClients,
    ListChunkServers, MemberInfo, MembersReport, MembersRequest, MetaResponse, NotLeader,
    PeerStatus, RaftAck, RaftBatch, ReadOp, ReadRequest, RepairChunks, RepairStatus, Reply,
    StatusReply, StatusRequest, Timespec, WriteRequest, MAX_MESSAGE_BYTES,
};

use crate::lease::Lease;
use crate::members::{GroupView, Plan};
use crate::metrics::MetaMetrics;
use crate::namespace::{Namespace, NamespaceConfig};
use crate::node::{MetaNode, NodeConfig, NodeError, ReadyOutput};
use crate::store::{Engine, SledEngine, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path} belongs to metadata node {found}, not {expected}; give each node its own directory")]
    WrongNode {
        path: PathBuf,
        found: String,
        expected: u64,
    },
    #[error("this node's id {0} is not in --peers; list every metadata node, this one included (or start it with --join and add it with `kerfsctl meta add`)")]
    NotAPeer(u64),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("transport: {0}")]
    Transport(String),
}

/// Everything a metadata node needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// Every metadata node (this one included): id -> address clients and peers dial. Only
    /// seeds a new group: once a membership change was applied, the replicated membership
    /// record wins (a restarted node comes back with the membership it last knew).
    pub peers: BTreeMap<u64, String>,
    /// Start with no configuration and wait to be added (`kerfsctl meta add`): the leader
    /// sends this node a snapshot with the group's state and membership.
    pub join: bool,
    pub data_dir: PathBuf,
    pub key: ClusterKey,
    pub metrics_listen: Option<SocketAddr>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub compact_after: u64,
    pub namespace: NamespaceConfig,
    /// How long a proposal or read may wait before the client is told to retry.
    pub request_timeout: Duration,
    /// How often the leader ends the sessions of clients whose lease ran out.
    pub expire_clients_every: Duration,
    /// How the leader makes reads linearizable.
    pub read_mode: ReadMode,
    /// How often the store is flushed to disk. An acknowledged command survives a kill of
    /// every node at once (it is in each quorum member's write-ahead file); a power cut of a
    /// majority at once loses what was acknowledged in the last interval, unless an fsync
    /// asked for it (see the README's durability contract).
    pub flush_every: Duration,
}

/// How a leader makes sure it still leads before it serves a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// A heartbeat round (ReadIndex) per batch of reads: trusts no clock.
    ReadIndex,
    /// A leader lease (see [`crate::lease`]): reads inside it skip the round. Safe as long
    /// as the nodes' monotonic clocks run at rates within [`crate::lease::LEASE_CLOCK_MARGIN`]
    /// of each other and every node uses the same tick; renewed in the background while
    /// reads keep coming.
    Lease,
}

impl std::str::FromStr for ReadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ReadMode, String> {
        match s {
            "lease" => Ok(ReadMode::Lease),
            "read-index" => Ok(ReadMode::ReadIndex),
            other => Err(format!(
                "unknown read mode {other:?}; use lease or read-index"
            )),
        }
    }
}

impl ServerConfig {
    pub fn new(
        id: u64,
        listen: SocketAddr,
        peers: BTreeMap<u64, String>,
        data_dir: PathBuf,
        key: ClusterKey,
    ) -> ServerConfig {
        ServerConfig {
            id,
            listen,
            peers,
            join: false,
            data_dir,
            key,
            metrics_listen: None,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after: 10_000,
            namespace: NamespaceConfig::default(),
            request_timeout: Duration::from_secs(3),
            expire_clients_every: Duration::from_secs(2),
            read_mode: ReadMode::Lease,
            flush_every: Duration::from_millis(100),
        }
    }
}

type ReplyTx = oneshot::Sender<Result<MetaResponse, Status>>;

enum Event {
    /// Messages from peer `.0`, which says it is reached at `.1`.
    Raft(u64, String, Vec<Message>),
    Members(members_request::Op, ReplyTx),
    /// A peer told us we were removed from the group.
    Removed,
    Propose(Command, ReplyTx),
    Read(ReadOp, bool, ReplyTx),
    Status(oneshot::Sender<StatusReply>),
    Unreachable(u64),
    SnapshotReport(u64, bool),
    Shutdown,
}

/// Runs a metadata node until `shutdown` resolves, then stops cleanly (the store flushed).
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let engine = open_data_dir(&config)?;
    let metrics = Arc::new(MetaMetrics::default());
    metrics.node_id.store(config.id, Ordering::Relaxed);
    let record = crate::members::load(&crate::store::SpaceView::new(
        engine.as_ref(),
        crate::store::space::STATE,
    ))?;
    // Precedence: the replicated membership record (written by the first membership change)
    // over --peers, which only seeds a new group.
    let peer_addrs: BTreeMap<u64, String> = match &record {
        Some(rec) => {
            let addrs: BTreeMap<u64, String> =
                rec.addrs.iter().map(|(k, v)| (*k, v.clone())).collect();
            if !config.peers.is_empty() && addrs != config.peers {
                info!(node = config.id, members = ?addrs, "membership from the replicated record; --peers is ignored");
            }
            addrs
        }
        None if config.join => config.peers.clone(),
        None => {
            if !config.peers.contains_key(&config.id) {
                return Err(ServerError::NotAPeer(config.id));
            }
            config.peers.clone()
        }
    };
    let self_removed = engine.get(KEY_REMOVED)?.is_some()
        || record
            .as_ref()
            .is_some_and(|r| r.removed.contains(&config.id));
    let self_addr = peer_addrs
        .get(&config.id)
        .cloned()
        .unwrap_or_else(|| config.listen.to_string());

    let node_config = NodeConfig {
        id: config.id,
        // A joining node starts with no configuration; the leader's snapshot brings it.
        voters: if config.join && record.is_none() {
            Vec::new()
        } else {
            config.peers.keys().copied().collect()
        },
        election_ticks: config.election_ticks,
        election_jitter: true,
        heartbeat_ticks: config.heartbeat_ticks,
        compact_after: config.compact_after,
    };
    let node = MetaNode::open(
        node_config,
        engine.clone(),
        Namespace::new(config.namespace.clone()),
    )?;
    info!(
        node = config.id,
        applied = node.applied_index(),
        term = node.term(),
        "metadata node opened its data"
    );

    let (events_tx, events_rx) = std_mpsc::channel::<Event>();

    let shared = Arc::new(Shared {
        self_removed: AtomicBool::new(self_removed),
        removed: Mutex::new(
            record
                .as_ref()
                .map(|r| r.removed.iter().copied().collect())
                .unwrap_or_default(),
        ),
    });
    let mut driver = Driver {
        node,
        engine,
        events: events_rx,
        events_tx: events_tx.clone(),
        runtime: tokio::runtime::Handle::current(),
        self_addr: self_addr.clone(),
        shared: shared.clone(),
        conf_epoch_seen: 0,
        members: BTreeMap::new(),
        peers: HashMap::new(),
        peer_addrs: BTreeMap::new(),
        metrics: metrics.clone(),
        pending_writes: HashMap::new(),
        read_queue: Vec::new(),
        reads_waiting_index: HashMap::new(),
        lease: Lease::new(config.tick, config.election_ticks),
        vote_guard_until: Instant::now() + config.tick * config.election_ticks as u32,
        reads_waiting_apply: Vec::new(),
        next_read_ctx: 1,
        config: config.clone(),
        last_role: StateRole::Follower,
    };
    // One sender task per peer; the driver hands them messages without blocking.
    driver.set_peers(peer_addrs);
    let driver_thread = std::thread::Builder::new()
        .name(format!("meta-driver-{}", config.id))
        .spawn(move || driver.run())
        .map_err(|e| ServerError::Transport(e.to_string()))?;

    if let Some(addr) = config.metrics_listen {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m).await {
                error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }

    let service = MetaService {
        events: events_tx.clone(),
        shared,
        id: config.id,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    info!(node = config.id, addr = %config.listen, "metadata node serving");
    let auth = config.key.server_auth();
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            MetaServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            RaftServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth,
        ))
        .serve_with_incoming_shutdown(tokio_stream_from(listener), shutdown);
    let served = serve.await;
    info!(node = config.id, "metadata node stopping");
    let _ = events_tx.send(Event::Shutdown);
    let driver_result = tokio::task::spawn_blocking(move || driver_thread.join())
        .await
        .map_err(|e| ServerError::Transport(e.to_string()))?;
    served.map_err(|e| ServerError::Transport(e.to_string()))?;
    match driver_result {
        Ok(r) => r,
        Err(_) => Err(ServerError::Transport("driver thread panicked".into())),
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// Creates or checks the data directory (0700, tagged with the node id) and opens the store.
fn open_data_dir(config: &ServerConfig) -> Result<Arc<dyn Engine>, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &config.data_dir;
    let io = |source| ServerError::DataDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let tag = dir.join("node-id");
    match std::fs::read_to_string(&tag) {
        Ok(found) => {
            if found.trim() != config.id.to_string() {
                return Err(ServerError::WrongNode {
                    path: dir.clone(),
                    found: found.trim().to_string(),
                    expected: config.id,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&tag, format!("{}\n", config.id)).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    Ok(SledEngine::open(dir, config.flush_every)?)
}

/// Sends raft messages to one peer, batching whatever queued up while the last RPC ran.
async fn peer_sender(
    from: u64,
    from_addr: String,
    peer: u64,
    addr: String,
    auth: ClientAuth,
    mut rx: mpsc::UnboundedReceiver<Message>,
    events: std_mpsc::Sender<Event>,
) {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
        Err(e) => {
            error!(peer, %addr, error = %e, "bad peer address; this peer will get no messages");
            return;
        }
    };
    let channel = endpoint.connect_lazy();
    let mut client = RaftClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots: usize = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .count();
        let messages: Vec<Vec<u8>> = batch
            .iter()
            .map(|m| m.write_to_bytes().unwrap_or_default())
            .collect();
        let mut req = Request::new(RaftBatch {
            from,
            messages,
            from_addr: from_addr.clone(),
        });
        req.set_timeout(if snapshots > 0 {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(2)
        });
        match client.send(req).await {
            Ok(ack) if ack.get_ref().removed => {
                warn!(
                    peer,
                    "peer says this node was removed from the metadata group"
                );
                let _ = events.send(Event::Removed);
                for _ in 0..snapshots {
                    let _ = events.send(Event::SnapshotReport(peer, false));
                }
            }
            Ok(_) => {
                if failing {
                    info!(peer, %addr, "peer reachable again");
                    failing = false;
                }
                for _ in 0..snapshots {
                    let _ = events.send(Event::SnapshotReport(peer, true));
                }
            }
            Err(status) => {
                if !failing {
                    warn!(peer, %addr, error = %status.message(), "cannot reach peer");
                    failing = true;
                }
                let _ = events.send(Event::Unreachable(peer));
                for _ in 0..snapshots {
                    let _ = events.send(Event::SnapshotReport(peer, false));
                }
                // Do not spin against a dead peer; raft resends what matters.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where this node stands in the group, shared by the driver and the gRPC services.
struct Shared {
    /// This node was removed from the group: it serves no client.
    self_removed: AtomicBool,
    /// Nodes removed from the group (from the replicated record): their raft messages are
    /// answered with `removed`, which is how a removed node that missed its own removal
    /// learns of it.
    removed: Mutex<std::collections::BTreeSet<u64>>,
}

/// The key (raft space) recording that this node was removed, so a restart keeps refusing.
const KEY_REMOVED: &[u8] = b"Rremoved";

#[derive(Clone)]
struct MetaService {
    events: std_mpsc::Sender<Event>,
    shared: Arc<Shared>,
    id: u64,
}

impl MetaService {
    /// Refuses client requests on a node removed from the group.
    fn serving(&self) -> Result<(), Status> {
        if self.shared.self_removed.load(Ordering::Relaxed) {
            return Err(Status::failed_precondition(format!(
                "metadata node {} was removed from the metadata group and serves nothing; use the other members (`kerfsctl meta members`), stop this node, and wipe its data directory before adding it back",
                self.id
            )));
        }
        Ok(())
    }

    async fn ask(
        &self,
        make: impl FnOnce(ReplyTx) -> Event,
    ) -> Result<Response<MetaResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        self.events.send(make(tx)).map_err(|_| {
            Status::unavailable("metadata node is shutting down; retry on another node")
        })?;
        match rx.await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable(
                "metadata node is shutting down; retry on another node",
            )),
        }
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<MetaResponse>, Status> {
        self.serving()?;
        let Some(cmd) = req.into_inner().command else {
            return Err(Status::invalid_argument("write request without a command"));
        };
        if cmd.op.is_none() {
            return Err(Status::invalid_argument("command without an operation"));
        }
        // Only the leader stamps the time of internal commands; clients' are ignored too.
        if matches!(
            cmd.op,
            Some(command::Op::ExpireClients(_)) | Some(command::Op::ExpireChunkServers(_))
        ) {
            return Err(Status::invalid_argument(
                "expiry commands are proposed by the leader only",
            ));
        }
        self.ask(|tx| Event::Propose(cmd, tx)).await
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<MetaResponse>, Status> {
        self.serving()?;
        let req = req.into_inner();
        let Some(op) = req.op else {
            return Err(Status::invalid_argument(
                "read request without an operation",
            ));
        };
        if op.op.is_none() {
            return Err(Status::invalid_argument("read without an operation"));
        }
        self.ask(|tx| Event::Read(op, req.allow_stale, tx)).await
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Status(tx))
            .map_err(|_| Status::unavailable("metadata node is shutting down"))?;
        rx.await
            .map(Response::new)
            .map_err(|_| Status::unavailable("metadata node is shutting down"))
    }

    async fn members(
        &self,
        req: Request<MembersRequest>,
    ) -> Result<Response<MetaResponse>, Status> {
        self.serving()?;
        let Some(op) = req.into_inner().op else {
            return Err(Status::invalid_argument(
                "membership request without an operation",
            ));
        };
        self.ask(|tx| Event::Members(op, tx)).await
    }
}

#[tonic::async_trait]
impl Raft for MetaService {
    async fn send(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let batch = req.into_inner();
        if lock(&self.shared.removed).contains(&batch.from) {
            return Ok(Response::new(RaftAck { removed: true }));
        }
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let m = Message::parse_from_bytes(bytes).map_err(|e| {
                Status::invalid_argument(format!(
                    "malformed raft message from node {}: {e}",
                    batch.from
                ))
            })?;
            msgs.push(m);
        }
        self.events
            .send(Event::Raft(batch.from, batch.from_addr, msgs))
            .map_err(|_| Status::unavailable("metadata node is shutting down"))?;
        Ok(Response::new(RaftAck { removed: false }))
    }
}

struct PendingRead {
    op: ReadOp,
    tx: ReplyTx,
}

/// A ReadIndex round under way: the reads waiting for it, when, in which term and with
/// which voters it began.
struct ReadRound {
    reads: Vec<PendingRead>,
    started: Instant,
    term: u64,
    voters: Vec<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a set of ids half-updated: keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Driver {
    node: MetaNode,
    engine: Arc<dyn Engine>,
    events: std_mpsc::Receiver<Event>,
    /// For the sender tasks of peers that join later.
    events_tx: std_mpsc::Sender<Event>,
    runtime: tokio::runtime::Handle,
    /// How peers reach this node (sent with every batch).
    self_addr: String,
    shared: Arc<Shared>,
    /// The node's conf epoch the peers were last set up for.
    conf_epoch_seen: u64,
    /// The members: the replicated record, or --peers before any change. `peer_addrs` adds
    /// the addresses learned from senders (a joining node's leader) for routing only.
    members: BTreeMap<u64, String>,
    peers: HashMap<u64, mpsc::UnboundedSender<Message>>,
    peer_addrs: BTreeMap<u64, String>,
    metrics: Arc<MetaMetrics>,
    /// Proposals waiting to be applied, by (client id, seq), with when they were proposed.
    pending_writes: HashMap<(u64, u64), Vec<(ReplyTx, Instant)>>,
    /// Reads not yet given a ReadIndex round.
    read_queue: Vec<PendingRead>,
    reads_waiting_index: HashMap<u64, ReadRound>,
    /// The leader lease (lease read mode only).
    lease: Lease,
    /// Until then this node grants no votes: a restarted node has forgotten the leader it
    /// heard from, and voting at once could elect a new leader inside a lease it gave.
    vote_guard_until: Instant,
    reads_waiting_apply: Vec<(u64, Vec<PendingRead>)>,
    next_read_ctx: u64,
    config: ServerConfig,
    last_role: StateRole,
}

impl Driver {
    fn run(mut self) -> Result<(), ServerError> {
        let mut next_tick = Instant::now() + self.config.tick;
        let mut next_expire = Instant::now() + self.config.expire_clients_every;
        let mut rate_window = (Instant::now(), 0u64);
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(wait) {
                Ok(Event::Shutdown) => break,
                Ok(ev) => {
                    self.handle_event(ev);
                    // Drain what else is queued: one Ready (one durable write) for all of it.
                    let mut stop = false;
                    for _ in 0..8192 {
                        match self.events.try_recv() {
                            Ok(Event::Shutdown) => {
                                stop = true;
                                break;
                            }
                            Ok(ev) => self.handle_event(ev),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.node.tick();
                next_tick = now + self.config.tick;
                self.expire_requests(now);
            }
            if now >= next_expire {
                next_expire = now + self.config.expire_clients_every;
                let repair_work = self.update_repair_metrics();
                if self.node.is_leader() {
                    // Each sweep is proposed only when it would change something: every
                    // proposal is a log entry and a flush on every node, idle or not.
                    let stamp = Timespec::now();
                    let due = self.node.sweeps_due(&stamp);
                    let mut ops = Vec::new();
                    if due.clients {
                        ops.push(command::Op::ExpireClients(ExpireClients {}));
                    }
                    if due.chunk_servers {
                        ops.push(command::Op::ExpireChunkServers(ExpireChunkServers {}));
                    }
                    // The queue only grows through other commands (expiry, reports, commits):
                    // an idle cluster need not write a repair tick to every log every period.
                    if repair_work {
                        ops.push(command::Op::RepairChunks(RepairChunks { rescan: false }));
                    }
                    // Dropped proposals are retried at the next period.
                    for op in ops {
                        let cmd = Command {
                            now: Some(stamp),
                            op: Some(op),
                            ..Default::default()
                        };
                        let _ = self.node.propose(&cmd);
                    }
                }
            }
            if now.duration_since(rate_window.0) >= Duration::from_secs(1) {
                let total = self.metrics.proposals_total.load(Ordering::Relaxed);
                let secs = now.duration_since(rate_window.0).as_secs_f64();
                let rate = (total - rate_window.1) as f64 / secs;
                self.metrics
                    .proposals_per_sec_milli
                    .store((rate * 1000.0) as u64, Ordering::Relaxed);
                rate_window = (now, total);
            }
            self.start_read_round(now);
            while self.node.has_ready() {
                let peers = &self.peers;
                let out = self
                    .node
                    .handle_ready_sending(|msgs| send_to_peers(peers, msgs))?;
                self.dispatch(out);
            }
            self.sync_membership();
            if self.node.transferring_to().is_some() {
                // However the transfer began (ours, or a MsgTransferLeader from a peer), the
                // lease is over for this term: the transferee may campaign inside it.
                self.lease.void_term(self.node.term());
            }
            self.serve_applied_reads();
            self.on_role_change();
            self.update_metrics();
        }
        // Flush everything, so that the next start has nothing to replay.
        self.engine.checkpoint()?;
        self.fail_all("metadata node is shutting down; retry on another node");
        info!(node = self.config.id, "driver stopped");
        Ok(())
    }

    fn not_leader(&self) -> MetaResponse {
        let leader = self.node.leader_id();
        MetaResponse {
            outcome: Some(meta_response::Outcome::NotLeader(NotLeader {
                leader_id: leader,
                leader_addr: self.peer_addrs.get(&leader).cloned().unwrap_or_default(),
            })),
        }
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Raft(from, from_addr, msgs) => {
                if !self.peers.contains_key(&from)
                    && !from_addr.is_empty()
                    && from != self.config.id
                    && !self.members.contains_key(&from)
                    && !lock(&self.shared.removed).contains(&from)
                {
                    // A node that joined knows nobody until its snapshot: answer the leader
                    // at the address it gave.
                    info!(peer = from, addr = %from_addr, "learned a peer's address from its messages");
                    self.peer_addrs.insert(from, from_addr.clone());
                    self.spawn_sender(from, from_addr);
                }
                let guard = Instant::now() < self.vote_guard_until;
                for m in msgs {
                    if guard
                        && matches!(
                            m.get_msg_type(),
                            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                        )
                    {
                        debug!(from = m.from, "vote request ignored: node just started");
                        continue;
                    }
                    if let Err(e) = self.node.step(m) {
                        debug!(error = %e, "raft step refused a message");
                    }
                }
            }
            Event::Propose(mut cmd, tx) => {
                if !self.node.is_leader() {
                    let _ = tx.send(Ok(self.not_leader()));
                    return;
                }
                cmd.now = Some(Timespec::now());
                match self.node.propose(&cmd) {
                    Ok(()) => {
                        self.metrics.proposals_total.fetch_add(1, Ordering::Relaxed);
                        self.pending_writes
                            .entry((cmd.client_id, cmd.seq))
                            .or_default()
                            .push((tx, Instant::now()));
                    }
                    Err(e) => {
                        debug!(error = %e, "proposal dropped");
                        let _ = tx.send(Ok(self.not_leader()));
                    }
                }
            }
            Event::Read(op, allow_stale, tx) => {
                if allow_stale {
                    let reply = self.node.read(&op);
                    let _ = tx.send(Ok(reply_response(reply)));
                } else if !self.node.is_leader() {
                    let _ = tx.send(Ok(self.not_leader()));
                } else {
                    self.read_queue.push(PendingRead { op, tx });
                }
            }
            Event::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Event::Members(op, tx) => {
                let _ = tx.send(Ok(self.members(op)));
            }
            Event::Removed => self.mark_removed(),
            Event::Unreachable(peer) => self.node.report_unreachable(peer),
            Event::SnapshotReport(peer, ok) => self.node.report_snapshot(peer, ok),
            Event::Shutdown => {}
        }
    }

    /// Serves the reads queued since the last pass from the lease when it holds, else gives
    /// them one ReadIndex round; renews a lease in use before it runs out.
    fn start_read_round(&mut self, now: Instant) {
        if !self.read_queue.is_empty() {
            let batch = std::mem::take(&mut self.read_queue);
            match self.lease_read_index(now) {
                Some(index) => {
                    self.metrics
                        .lease_reads_total
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.reads_waiting_apply.push((index, batch));
                }
                None => {
                    self.begin_round(now, batch);
                }
            }
        }
        self.maybe_renew_lease(now);
    }

    /// Starts a sender task for each peer in `addrs` and drops those of peers not in it
    /// (their tasks end with their channels).
    fn set_peers(&mut self, addrs: BTreeMap<u64, String>) {
        self.peers
            .retain(|id, _| addrs.contains_key(id) || *id == self.node.leader_id());
        for (&peer, addr) in &addrs {
            if peer == self.config.id {
                continue;
            }
            if self.peer_addrs.get(&peer) == Some(addr) && self.peers.contains_key(&peer) {
                continue;
            }
            self.spawn_sender(peer, addr.clone());
        }
        self.peer_addrs = addrs.clone();
        self.members = addrs;
    }

    fn spawn_sender(&mut self, peer: u64, addr: String) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.peers.insert(peer, tx);
        self.runtime.spawn(peer_sender(
            self.config.id,
            self.self_addr.clone(),
            peer,
            addr,
            self.config.key.client_auth(),
            rx,
            self.events_tx.clone(),
        ));
    }

    /// After a conf change (or a snapshot) was applied: reach the members of the new
    /// record, void the lease (its quorum was of the old voters), and notice our own removal.
    fn sync_membership(&mut self) {
        let epoch = self.node.conf_epoch();
        if epoch == self.conf_epoch_seen {
            return;
        }
        self.conf_epoch_seen = epoch;
        self.lease.clear();
        let record = match self.node.member_record() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                error!(error = %e, "cannot read the membership record");
                return;
            }
        };
        let addrs: BTreeMap<u64, String> =
            record.addrs.iter().map(|(k, v)| (*k, v.clone())).collect();
        info!(node = self.config.id, members = ?addrs, voters = ?self.node.voters(), learners = ?self.node.learners(), "membership changed");
        *lock(&self.shared.removed) = record.removed.iter().copied().collect();
        let me = self.config.id;
        let gone = record.removed.contains(&me);
        self.set_peers(addrs);
        if gone {
            self.mark_removed();
        }
    }

    /// This node is out of the group: persist it (a restart keeps refusing) and send every
    /// waiting client elsewhere.
    fn mark_removed(&mut self) {
        if self.shared.self_removed.swap(true, Ordering::Relaxed) {
            return;
        }
        warn!(
            node = self.config.id,
            "this node was removed from the metadata group; it now refuses clients"
        );
        let mut batch = crate::store::WriteBatch::default();
        batch.put(KEY_REMOVED.to_vec(), vec![1]);
        if let Err(e) = self.engine.write(batch, true) {
            error!(error = %e, "cannot record the removal");
        }
        self.lease.clear();
        self.fail_all("this metadata node was removed from the metadata group; use the others");
    }

    /// What the leader sees of the group, for judging a membership request.
    fn group_view(&self) -> GroupView {
        let voters = self.node.voters().into_iter().collect();
        let learners = self.node.learners().into_iter().collect();
        GroupView {
            leader: self.config.id,
            voters,
            learners,
            active: self.node.active_members().into_iter().collect(),
            matched: self.node.progress().into_iter().collect(),
            last_index: self.node.last_index(),
            change_pending: self.node.conf_change_pending(),
            addrs: self.members.clone(),
            removed: lock(&self.shared.removed).clone(),
        }
    }

    fn members_report(&self) -> MembersReport {
        let view = self.group_view();
        let mut members = Vec::new();
        for (id, addr) in &view.addrs {
            let role = if *id == self.config.id {
                "leader"
            } else if view.learners.contains(id) {
                "learner"
            } else if view.voters.contains(id) {
                "voter"
            } else {
                continue;
            };
            members.push(MemberInfo {
                id: *id,
                addr: addr.clone(),
                role: role.into(),
                matched: view.matched.get(id).copied().unwrap_or(0),
                active: view.active.contains(id),
            });
        }
        MembersReport {
            leader_id: self.config.id,
            term: self.node.term(),
            last_index: view.last_index,
            commit_index: self.node.commit_index(),
            members,
            change_pending: view.change_pending,
            transferring_to: self.node.transferring_to().unwrap_or(0),
        }
    }

    /// Serves a membership request (leader only): judged by [`crate::members::plan`], then
    /// proposed; the caller polls the report to see it applied.
    fn members(&mut self, op: members_request::Op) -> MetaResponse {
        if !self.node.is_leader() {
            return self.not_leader();
        }
        let mut reply = Reply::default();
        match crate::members::plan(&self.group_view(), &op) {
            Err(refused) => {
                reply.errno = refused.errno();
                reply.message = refused.to_string();
            }
            Ok(Plan::Nothing) => {}
            Ok(Plan::Transfer(to)) => {
                // From here on this leader serves no lease read in this term: the transferee
                // campaigns at once, inside the lease the peers gave us.
                self.lease.void_term(self.node.term());
                info!(node = self.config.id, to, "leader transfer started");
                self.node.transfer_leader(to);
            }
            Ok(Plan::Change(cc, record)) => {
                info!(node = self.config.id, change = ?cc.changes, "proposing a membership change");
                if let Err(e) = self.node.propose_conf_change(cc, &record) {
                    reply.errno = libc::EAGAIN;
                    reply.message = format!("the change was not proposed ({e}); retry");
                }
            }
        }
        reply.members = Some(self.members_report());
        reply_response(reply)
    }

    fn begin_round(&mut self, now: Instant, reads: Vec<PendingRead>) -> u64 {
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.node.read_index(ctx.to_be_bytes().to_vec());
        self.metrics
            .read_rounds_total
            .fetch_add(1, Ordering::Relaxed);
        self.reads_waiting_index.insert(
            ctx,
            ReadRound {
                reads,
                started: now,
                term: self.node.term(),
                voters: self.node.voters(),
            },
        );
        ctx
    }

    /// The index a read must wait for when the lease covers `now`, None when it needs a
    /// ReadIndex round.
    fn lease_read_index(&mut self, now: Instant) -> Option<u64> {
        if self.config.read_mode != ReadMode::Lease || !self.node.is_leader() {
            return None;
        }
        if self.node.transferring_to().is_some() {
            return None;
        }
        if !self.lease.serve(now, self.node.term(), &self.node.voters()) {
            return None;
        }
        // Until the leader commits in its term its commit index may lag entries an earlier
        // leader committed.
        self.node.current_term_commit()
    }

    /// Starts a round with no reads in it when the lease in use is past half its life, so
    /// that steady reads never wait for one.
    fn maybe_renew_lease(&mut self, now: Instant) {
        if self.config.read_mode != ReadMode::Lease
            || !self.node.is_leader()
            || !self.lease.wants_renewal(now)
        {
            return;
        }
        let ctx = self.begin_round(now, Vec::new());
        self.lease.renewing(ctx, now);
    }

    fn dispatch(&mut self, out: ReadyOutput) {
        send_to_peers(&self.peers, out.messages);
        for applied in out.applied {
            if let Some(waiters) = self
                .pending_writes
                .remove(&(applied.client_id, applied.seq))
            {
                for (tx, _) in waiters {
                    let _ = tx.send(Ok(reply_response(applied.reply.clone())));
                }
            }
        }
        for (ctx, index) in out.reads {
            let Ok(ctx) = <[u8; 8]>::try_from(ctx.as_slice()) else {
                continue;
            };
            let ctx = u64::from_be_bytes(ctx);
            self.lease.round_done(ctx);
            if let Some(round) = self.reads_waiting_index.remove(&ctx) {
                let reads = self.extend_lease(round);
                if !reads.is_empty() {
                    self.reads_waiting_apply.push((index, reads));
                }
            }
        }
    }

    /// A quorum answered the heartbeats of a round that began at `round.started`. A round
    /// that spanned a membership change proves nothing about the new voters' quorum.
    fn extend_lease(&mut self, round: ReadRound) -> Vec<PendingRead> {
        if self.config.read_mode == ReadMode::Lease
            && self.node.is_leader()
            && round.term == self.node.term()
            && round.voters == self.node.voters()
        {
            self.lease
                .confirmed(round.started, round.term, round.voters);
        }
        round.reads
    }

    fn serve_applied_reads(&mut self) {
        let applied = self.node.applied_index();
        let mut i = 0;
        while i < self.reads_waiting_apply.len() {
            if self.reads_waiting_apply[i].0 <= applied {
                let (_, batch) = self.reads_waiting_apply.swap_remove(i);
                self.metrics
                    .reads_total
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for r in batch {
                    let reply = self.node.read(&r.op);
                    let _ = r.tx.send(Ok(reply_response(reply)));
                }
            } else {
                i += 1;
            }
        }
    }

    /// Tells waiting clients to retry when a request waited too long (a lost leadership, a
    /// dropped ReadIndex). Writes are retried with the same seq, so a late commit is
    /// answered from the reply cache, never applied twice.
    fn expire_requests(&mut self, now: Instant) {
        let timeout = self.config.request_timeout;
        let retry = || {
            Err(Status::unavailable(
                "request timed out waiting for the raft group (election?); retry",
            ))
        };
        self.pending_writes.retain(|_, waiters| {
            let mut i = 0;
            while i < waiters.len() {
                if now.duration_since(waiters[i].1) > timeout {
                    let (tx, _) = waiters.swap_remove(i);
                    let _ = tx.send(retry());
                } else {
                    i += 1;
                }
            }
            !waiters.is_empty()
        });
        let expired: Vec<u64> = self
            .reads_waiting_index
            .iter()
            .filter(|(_, r)| now.duration_since(r.started) > timeout)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            if let Some(round) = self.reads_waiting_index.remove(&k) {
                for r in round.reads {
                    let _ = r.tx.send(retry());
                }
            }
        }
    }

    fn on_role_change(&mut self) {
        let role = self.node.role();
        if role == self.last_role {
            return;
        }
        info!(
            node = self.config.id,
            ?role,
            term = self.node.term(),
            leader = self.node.leader_id(),
            "raft role changed"
        );
        if self.last_role == StateRole::Leader {
            self.lease.clear();
            // Our proposals and reads may never complete here; send clients to the new leader.
            // A proposal that does commit later is answered to the retry from the reply cache.
            let nl = self.not_leader();
            self.answer_all_waiting(|| Ok(nl.clone()));
        }
        self.last_role = role;
    }

    fn fail_all(&mut self, why: &str) {
        self.answer_all_waiting(|| Err(Status::unavailable(why)));
    }

    /// Answers every write and read still waiting here with `answer()`: they will not
    /// complete on this node.
    fn answer_all_waiting(&mut self, answer: impl Fn() -> Result<MetaResponse, Status>) {
        for (_, waiters) in self.pending_writes.drain() {
            for (tx, _) in waiters {
                let _ = tx.send(answer());
            }
        }
        let reads = self
            .reads_waiting_index
            .drain()
            .flat_map(|(_, r)| r.reads)
            .chain(self.reads_waiting_apply.drain(..).flat_map(|(_, b)| b))
            .chain(self.read_queue.drain(..));
        for r in reads {
            let _ = r.tx.send(answer());
        }
    }

    /// Publishes the repair counters and the chunk servers' states, from this node's
    /// applied state (local reads: the gauges may lag the leader by a few entries); true
    /// while chunks lack copies, repairs are under way or a chunk server is draining.
    fn update_repair_metrics(&self) -> bool {
        let servers = self.node.read(&ReadOp {
            caller: None,
            op: Some(read_op::Op::ListChunkServers(ListChunkServers {})),
        });
        let count = |state: &str| servers.servers.iter().filter(|s| s.state == state).count();
        let m = &self.metrics;
        m.chunk_servers_up
            .store(count("up") as u64, Ordering::Relaxed);
        m.chunk_servers_down
            .store(count("down") as u64, Ordering::Relaxed);
        m.chunk_servers_draining
            .store(count("draining") as u64, Ordering::Relaxed);
        let reply = self.node.read(&ReadOp {
            caller: None,
            op: Some(read_op::Op::RepairStatus(RepairStatus { limit: 1 })),
        });
        let Some(r) = reply.repair else {
            // Unknown: keep ticking, as before the counters existed.
            return true;
        };
        m.chunks_under_replicated
            .store(r.under_replicated, Ordering::Relaxed);
        m.chunks_unreadable.store(r.unreadable, Ordering::Relaxed);
        m.chunks_repairing.store(r.repairing, Ordering::Relaxed);
        m.repairs_total.store(r.repaired_total, Ordering::Relaxed);
        m.repairs_failed_total
            .store(r.failed_total, Ordering::Relaxed);
        r.under_replicated > 0 || r.repairing > 0 || r.draining_servers > 0
    }

    fn update_metrics(&self) {
        let m = &self.metrics;
        m.term.store(self.node.term(), Ordering::Relaxed);
        m.commit_index
            .store(self.node.commit_index(), Ordering::Relaxed);
        m.applied_index
            .store(self.node.applied_index(), Ordering::Relaxed);
        m.snapshot_index
            .store(self.node.snapshot_index(), Ordering::Relaxed);
        m.is_leader
            .store(self.node.is_leader() as u64, Ordering::Relaxed);
        m.leader_id.store(self.node.leader_id(), Ordering::Relaxed);
        m.log_syncs_total
            .store(self.node.log_syncs(), Ordering::Relaxed);
    }

    fn status(&self) -> StatusReply {
        let leader = self.node.leader_id();
        let matched: HashMap<u64, u64> = if self.node.is_leader() {
            self.node.progress().into_iter().collect()
        } else {
            HashMap::new()
        };
        let learners = self.node.learners();
        let role = if self.shared.self_removed.load(Ordering::Relaxed) {
            "removed".to_string()
        } else if learners.contains(&self.config.id) {
            "learner".to_string()
        } else if self.node.voters().is_empty() && learners.is_empty() {
            "joining".to_string()
        } else {
            format!("{:?}", self.node.role()).to_lowercase()
        };
        StatusReply {
            id: self.config.id,
            role,
            last_index: self.node.last_index(),
            term: self.node.term(),
            commit_index: self.node.commit_index(),
            applied_index: self.node.applied_index(),
            leader_id: leader,
            leader_addr: self.peer_addrs.get(&leader).cloned().unwrap_or_default(),
            peers: self
                .members
                .iter()
                .map(|(id, addr)| PeerStatus {
                    id: *id,
                    addr: addr.clone(),
                    matched: matched.get(id).copied().unwrap_or(0),
                    role: if learners.contains(id) {
                        "learner".into()
                    } else {
                        "voter".into()
                    },
                })
                .collect(),
            first_index: self.node.first_index(),
            snapshot_index: self.node.snapshot_index(),
        }
    }
}

fn send_to_peers(peers: &HashMap<u64, mpsc::UnboundedSender<Message>>, msgs: Vec<Message>) {
    for m in msgs {
        if let Some(tx) = peers.get(&m.to) {
            let _ = tx.send(m);
        }
    }
}

fn reply_response(reply: Reply) -> MetaResponse {
    MetaResponse {
        outcome: Some(meta_response::Outcome::Reply(reply)),
    }
}
