//! The namespace half of the client: leader discovery, redirects, retries with a deadline,
//! the client session (registered, renewed, with a per-write sequence number for
//! exactly-once application), and one method per namespace operation.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Mutex as AsyncMutex;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::{debug, info, warn};

use kerfs_proto::auth::{ClientAuth, ClusterKey};
use kerfs_proto::meta_client::MetaClient as MetaGrpc;
use kerfs_proto::{
    command, meta_response, read_op, Attr, Caller, Command, DirEntry, FileKind, FsStats, MakeNode,
    MembersRequest, MetaResponse, ReadOp, ReadRequest, Reply, StatusReply, StatusRequest,
    WriteRequest, MAX_MESSAGE_BYTES,
};

use crate::error::{ClientError, ClientResult};

type Grpc = MetaGrpc<tonic::service::interceptor::InterceptedService<Channel, ClientAuth>>;

/// How to reach a cluster.
#[derive(Debug, Clone)]
pub struct MetaClientConfig {
    /// Addresses of the metadata nodes (any subset that includes a live one will do).
    pub addrs: Vec<String>,
    pub key: ClusterKey,
    /// How long an operation keeps retrying (elections, dead nodes) before it fails.
    pub deadline: Duration,
    /// How long one RPC may take.
    pub rpc_timeout: Duration,
    /// The session lease: if this client stops renewing for this long (it died), the cluster
    /// closes its open files.
    pub lease: Duration,
    /// Shown by `kerfsctl` next to the session.
    pub description: String,
}

impl MetaClientConfig {
    pub fn new(addrs: Vec<String>, key: ClusterKey) -> MetaClientConfig {
        MetaClientConfig {
            addrs,
            key,
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            description: default_description(),
        }
    }

    /// Parses "host:port,host:port".
    pub fn parse_addrs(list: &str) -> ClientResult<Vec<String>> {
        let addrs: Vec<String> = list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Config(format!(
                "no metadata address in {list:?}; give host:port[,host:port...]"
            )));
        }
        Ok(addrs)
    }
}

fn default_description() -> String {
    let exe = std::env::args().next().unwrap_or_default();
    format!("{} pid {}", exe, std::process::id())
}

struct Node {
    addr: String,
    grpc: Grpc,
}

struct Inner {
    config: MetaClientConfig,
    nodes: Mutex<Vec<Node>>,
    /// Index in `nodes` of the last node that answered as leader.
    leader: AtomicUsize,
    session: AsyncMutex<()>,
    client_id: AtomicU64,
    next_seq: AtomicU64,
    /// Sequence numbers sent and not yet answered: the smallest bounds what the cluster must
    /// keep in its reply cache for us.
    in_flight: Mutex<BTreeSet<u64>>,
}

/// A connection to the metadata service, cheap to clone, acting for one caller identity.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
    caller: Caller,
}

impl MetaClient {
    /// Connects, registers a client session and keeps it renewed in the background.
    pub async fn connect(config: MetaClientConfig) -> ClientResult<MetaClient> {
        let client = MetaClient::connect_lazily(config)?;
        client.open_session().await?;
        Ok(client)
    }

    /// A client that opens its session only with its first write: reads and node status
    /// need none, so an admin command that only looks (`kerfsctl status`) writes nothing
    /// to the cluster, and answers even while the metadata group has no leader.
    pub fn connect_lazily(config: MetaClientConfig) -> ClientResult<MetaClient> {
        if config.addrs.is_empty() {
            return Err(ClientError::Config("no metadata address given".into()));
        }
        let mut nodes = Vec::new();
        for addr in &config.addrs {
            nodes.push(make_node(addr, &config)?);
        }
        Ok(MetaClient {
            inner: Arc::new(Inner {
                config,
                nodes: Mutex::new(nodes),
                leader: AtomicUsize::new(0),
                session: AsyncMutex::new(()),
                client_id: AtomicU64::new(0),
                next_seq: AtomicU64::new(1),
                in_flight: Mutex::new(BTreeSet::new()),
            }),
            caller: current_caller(),
        })
    }

    /// Registers this client's first session and keeps it renewed.
    async fn open_session(&self) -> ClientResult<()> {
        if self.register(0).await? {
            self.spawn_renewer();
        }
        Ok(())
    }

    /// The same connection acting for another user (the FUSE layer passes each request's).
    pub fn with_caller(&self, caller: Caller) -> MetaClient {
        MetaClient {
            inner: self.inner.clone(),
            caller,
        }
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// How this client reaches the cluster (the data path dials chunk servers with its key).
    pub fn config(&self) -> &MetaClientConfig {
        &self.inner.config
    }

    /// This client's session id in the cluster.
    pub fn client_id(&self) -> u64 {
        self.inner.client_id.load(Ordering::Relaxed)
    }

    /// (Re-)registers a session unless another task already replaced `stale_id`; says
    /// whether this call did.
    async fn register(&self, stale_id: u64) -> ClientResult<bool> {
        let _guard = self.inner.session.lock().await;
        if self.inner.client_id.load(Ordering::Relaxed) != stale_id {
            return Ok(false);
        }
        let cmd = Command {
            client_id: 0,
            // Registration has no session yet; a random seq keeps concurrent
            // registrations of different clients apart.
            seq: rand::thread_rng().gen_range(1..u64::MAX),
            op: Some(command::Op::RegisterClient(kerfs_proto::RegisterClient {
                description: self.inner.config.description.clone(),
                lease_ms: self.inner.config.lease.as_millis() as u64,
            })),
            ..Default::default()
        };
        let reply = self.send_write(cmd).await?;
        let reply = check(reply)?;
        info!(client_id = reply.client_id, "registered client session");
        self.inner
            .client_id
            .store(reply.client_id, Ordering::Relaxed);
        Ok(true)
    }

    fn spawn_renewer(&self) {
        let weak = Arc::downgrade(&self.inner);
        let caller = self.caller.clone();
        let period = self.inner.config.lease / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else {
                    return; // every handle dropped: let the session expire
                };
                let client = MetaClient {
                    inner,
                    caller: caller.clone(),
                };
                let op = command::Op::RenewClient(kerfs_proto::RenewClient {});
                if let Err(e) = client.write(op).await {
                    warn!(error = %e, "cannot renew the client session");
                }
            }
        });
    }

    // ------------------------------------------------------------- generic calls

    /// Runs a namespace write exactly once, retrying through elections until the deadline.
    /// Returns the reply whatever its errno (see [`check`]). Acknowledged once a quorum of
    /// metadata nodes has it in its write-ahead file: it survives a kill of every node, and
    /// a power cut once the nodes' flush timer ran or a [`MetaClient::sync`] returned.
    pub async fn write(&self, op: command::Op) -> ClientResult<Reply> {
        self.write_with(op, false).await
    }

    /// Returns once every namespace change this client (or anyone) made before the call is
    /// on disk on a quorum of metadata nodes: what fsync(2) promises for metadata.
    pub async fn sync(&self) -> ClientResult<()> {
        if self.client_id() == 0 {
            return Ok(()); // no session yet: this client changed nothing
        }
        let op = command::Op::SyncBarrier(kerfs_proto::SyncBarrier {});
        check(self.write_with(op, true).await?)?;
        Ok(())
    }

    async fn write_with(&self, op: command::Op, sync: bool) -> ClientResult<Reply> {
        loop {
            let client_id = self.client_id();
            if client_id == 0 {
                // Connected lazily: the first write opens the session.
                self.open_session().await?;
                continue;
            }
            // The seq is taken under the in-flight lock: taken outside it, a later seq could
            // be registered first and announce a floor above an earlier seq still on its way,
            // which the cluster would then refuse as a stale retry (EINVAL).
            let (seq, acked_below) = {
                let mut in_flight = lock(&self.inner.in_flight);
                let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
                in_flight.insert(seq);
                (seq, in_flight.first().copied().unwrap_or(seq))
            };
            let cmd = Command {
                client_id,
                seq,
                acked_below,
                now: None,
                caller: Some(self.caller.clone()),
                sync,
                op: Some(op.clone()),
            };
            let result = self.send_write(cmd).await;
            lock(&self.inner.in_flight).remove(&seq);
            let reply = result?;
            if reply.errno == libc::ESTALE && reply.message.contains("session") {
                // Our session expired (we were cut off longer than the lease); the command
                // was refused, not applied. Open a new session and try again.
                warn!(client_id, "client session expired; registering a new one");
                self.register(client_id).await?;
                continue;
            }
            return Ok(reply);
        }
    }

    /// Runs a linearizable read (served by the leader after a ReadIndex round).
    pub async fn read(&self, op: read_op::Op) -> ClientResult<Reply> {
        let req = ReadRequest {
            op: Some(ReadOp {
                caller: Some(self.caller.clone()),
                op: Some(op),
            }),
            allow_stale: false,
        };
        self.call(move |mut g| {
            let req = req.clone();
            async move { g.read(req).await }
        })
        .await
    }

    /// A metadata-membership request, served by the leader (followed through redirects).
    /// Returns the reply whatever its errno (see [`check`]); its `members` is the leader's
    /// view of the group.
    pub async fn members(&self, op: kerfs_proto::members_request::Op) -> ClientResult<Reply> {
        let req = MembersRequest { op: Some(op) };
        self.call(move |mut g| {
            let req = req.clone();
            async move { g.members(req).await }
        })
        .await
    }

    async fn send_write(&self, cmd: Command) -> ClientResult<Reply> {
        let req = WriteRequest { command: Some(cmd) };
        self.call(move |mut g| {
            let req = req.clone();
            async move { g.write(req).await }
        })
        .await
    }

    /// The retry loop every call goes through: try the known leader, follow redirects,
    /// move on from dead nodes, back off while there is no leader, stop at the deadline.
    async fn call<F, Fut>(&self, rpc: F) -> ClientResult<Reply>
    where
        F: Fn(Grpc) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<MetaResponse>, tonic::Status>>,
    {
        let config = &self.inner.config;
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut target = self.inner.leader.load(Ordering::Relaxed);
        let mut last: String;
        loop {
            let (addr, grpc) = {
                let nodes = lock(&self.inner.nodes);
                let n = &nodes[target % nodes.len()];
                (n.addr.clone(), n.grpc.clone())
            };
            let outcome = tokio::time::timeout(config.rpc_timeout, rpc(grpc)).await;
            let mut redirected = false;
            match outcome {
                Ok(Ok(resp)) => match resp.into_inner().outcome {
                    Some(meta_response::Outcome::Reply(reply)) => {
                        self.inner.leader.store(target, Ordering::Relaxed);
                        return Ok(reply);
                    }
                    Some(meta_response::Outcome::NotLeader(nl)) => {
                        last = format!("{addr} is not the leader");
                        if !nl.leader_addr.is_empty() && nl.leader_addr != addr {
                            target = self.node_index(&nl.leader_addr)?;
                            redirected = true;
                            debug!(from = %addr, to = %nl.leader_addr, "redirected to leader");
                        } else {
                            target += 1; // no leader known there: try the others
                        }
                    }
                    None => {
                        return Err(ClientError::BadRequest(format!(
                            "{addr} sent an empty response"
                        )))
                    }
                },
                Ok(Err(status)) => match status.code() {
                    Code::Unauthenticated | Code::PermissionDenied => {
                        return Err(ClientError::Auth(format!("{addr}: {}", status.message())))
                    }
                    Code::InvalidArgument | Code::Unimplemented | Code::OutOfRange => {
                        return Err(ClientError::BadRequest(format!(
                            "{addr}: {}",
                            status.message()
                        )))
                    }
                    _ => {
                        last = format!("{addr}: {}", status.message());
                        target += 1;
                    }
                },
                Err(_) => {
                    last = format!("{addr}: no answer within {:?}", config.rpc_timeout);
                    target += 1;
                }
            }
            let waited = start.elapsed();
            if waited >= config.deadline {
                return Err(ClientError::Unavailable {
                    waited,
                    addrs: config.addrs.join(","),
                    last,
                });
            }
            if !redirected {
                let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
                tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }

    /// Index of `addr` among known nodes, adding it if a redirect named a node we did not
    /// know (a member added after we started).
    fn node_index(&self, addr: &str) -> ClientResult<usize> {
        let mut nodes = lock(&self.inner.nodes);
        if let Some(i) = nodes.iter().position(|n| n.addr == addr) {
            return Ok(i);
        }
        nodes.push(make_node(addr, &self.inner.config)?);
        Ok(nodes.len() - 1)
    }

    /// Status of one metadata node (not redirected).
    pub async fn node_status(&self, addr: &str) -> ClientResult<StatusReply> {
        let index = self.node_index(addr)?;
        let mut grpc = lock(&self.inner.nodes)[index].grpc.clone();
        match tokio::time::timeout(self.inner.config.rpc_timeout, grpc.status(StatusRequest {}))
            .await
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) if s.code() == Code::Unauthenticated => {
                Err(ClientError::Auth(format!("{addr}: {}", s.message())))
            }
            Ok(Err(s)) => Err(ClientError::Unavailable {
                waited: Duration::ZERO,
                addrs: addr.into(),
                last: s.message().into(),
            }),
            Err(_) => Err(ClientError::Unavailable {
                waited: self.inner.config.rpc_timeout,
                addrs: addr.into(),
                last: "no answer".into(),
            }),
        }
    }

    // ------------------------------------------------------------- namespace operations

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> ClientResult<Attr> {
        let r = self
            .read(read_op::Op::Lookup(kerfs_proto::Lookup {
                parent,
                name: name.to_vec(),
            }))
            .await?;
        attr_of(check(r)?)
    }

    pub async fn getattr(&self, ino: u64) -> ClientResult<Attr> {
        let r = self
            .read(read_op::Op::GetAttr(kerfs_proto::GetAttr { ino }))
            .await?;
        attr_of(check(r)?)
    }

    /// Creates any kind of node; see [`MakeNode`]. Returns its attributes and, when
    /// `open` was asked, a handle.
    pub async fn make_node(&self, req: MakeNode) -> ClientResult<(Attr, u64)> {
        let r = self.make_node_reply(req).await?;
        let handle = r.handle;
        Ok((attr_of(r)?, handle))
    }

    /// [`make_node`](Self::make_node) with the whole reply: handles, and the layout of a
    /// regular file it created and opened.
    pub async fn make_node_reply(&self, req: MakeNode) -> ClientResult<Reply> {
        check(self.write(command::Op::MakeNode(req)).await?)
    }

    pub async fn mkdir(&self, parent: u64, name: &[u8], mode: u32) -> ClientResult<Attr> {
        self.make_node(MakeNode {
            parent,
            name: name.to_vec(),
            kind: FileKind::Directory as i32,
            mode,
            exclusive: true,
            ..Default::default()
        })
        .await
        .map(|(a, _)| a)
    }

    /// Creates a regular file (O_CREAT|O_EXCL) without opening it.
    pub async fn create_file(&self, parent: u64, name: &[u8], mode: u32) -> ClientResult<Attr> {
        self.make_node(MakeNode {
            parent,
            name: name.to_vec(),
            kind: FileKind::Regular as i32,
            mode,
            exclusive: true,
            ..Default::default()
        })
        .await
        .map(|(a, _)| a)
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8]) -> ClientResult<Attr> {
        self.make_node(MakeNode {
            parent,
            name: name.to_vec(),
            kind: FileKind::Symlink as i32,
            mode: 0o777,
            target: target.to_vec(),
            exclusive: true,
            ..Default::default()
        })
        .await
        .map(|(a, _)| a)
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> ClientResult<Attr> {
        let r = self
            .write(command::Op::Link(kerfs_proto::Link {
                ino,
                new_parent,
                new_name: new_name.to_vec(),
            }))
            .await?;
        attr_of(check(r)?)
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> ClientResult<()> {
        self.remove(parent, name, false).await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> ClientResult<()> {
        self.remove(parent, name, true).await
    }

    async fn remove(&self, parent: u64, name: &[u8], directory: bool) -> ClientResult<()> {
        let r = self
            .write(command::Op::Remove(kerfs_proto::Remove {
                parent,
                name: name.to_vec(),
                directory,
            }))
            .await?;
        check(r).map(|_| ())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> ClientResult<()> {
        let r = self
            .write(command::Op::Rename(kerfs_proto::Rename {
                parent,
                name: name.to_vec(),
                new_parent,
                new_name: new_name.to_vec(),
                flags,
            }))
            .await?;
        check(r).map(|_| ())
    }

    pub async fn setattr(&self, req: kerfs_proto::SetAttr) -> ClientResult<Attr> {
        let r = self.write(command::Op::SetAttr(req)).await?;
        attr_of(check(r)?)
    }

    /// One page of a directory listing after `cookie` (0: from the start).
    pub async fn readdir(
        &self,
        ino: u64,
        cookie: u64,
        limit: u32,
        plus: bool,
    ) -> ClientResult<(Vec<DirEntry>, bool)> {
        let r = self
            .read(read_op::Op::ReadDir(kerfs_proto::ReadDir {
                ino,
                cookie,
                limit,
                plus,
            }))
            .await?;
        let r = check(r)?;
        Ok((r.entries, r.eof))
    }

    /// The whole directory, page by page.
    pub async fn readdir_all(&self, ino: u64) -> ClientResult<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let (entries, eof) = self.readdir(ino, cookie, 1024, false).await?;
            if let Some(last) = entries.last() {
                cookie = last.cookie;
            }
            let empty = entries.is_empty();
            out.extend(entries);
            if eof || empty {
                return Ok(out);
            }
        }
    }

    /// Sets the data layout of a directory (inherited by new entries) or of a file without
    /// data; returns the layout now in force.
    pub async fn set_layout(
        &self,
        ino: u64,
        layout: kerfs_proto::Layout,
    ) -> ClientResult<kerfs_proto::Layout> {
        let r = self
            .write(command::Op::SetLayout(kerfs_proto::SetLayout {
                ino,
                layout: Some(layout),
            }))
            .await?;
        check(r)?
            .layout
            .ok_or_else(|| ClientError::BadRequest("set_layout reply without a layout".into()))
    }

    pub async fn readlink(&self, ino: u64) -> ClientResult<Vec<u8>> {
        let r = self
            .read(read_op::Op::ReadLink(kerfs_proto::ReadLink { ino }))
            .await?;
        Ok(check(r)?.data)
    }

    pub async fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> ClientResult<()> {
        let r = self
            .write(command::Op::SetXattr(kerfs_proto::SetXattr {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
                flags,
            }))
            .await?;
        check(r).map(|_| ())
    }

    pub async fn getxattr(&self, ino: u64, name: &[u8]) -> ClientResult<Vec<u8>> {
        let r = self
            .read(read_op::Op::GetXattr(kerfs_proto::GetXattr {
                ino,
                name: name.to_vec(),
            }))
            .await?;
        Ok(check(r)?.data)
    }

    pub async fn listxattr(&self, ino: u64) -> ClientResult<Vec<Vec<u8>>> {
        let r = self
            .read(read_op::Op::ListXattr(kerfs_proto::ListXattr { ino }))
            .await?;
        Ok(check(r)?.names)
    }

    pub async fn removexattr(&self, ino: u64, name: &[u8]) -> ClientResult<()> {
        let r = self
            .write(command::Op::RemoveXattr(kerfs_proto::RemoveXattr {
                ino,
                name: name.to_vec(),
            }))
            .await?;
        check(r).map(|_| ())
    }

    /// Opens an inode: the cluster keeps it alive while the handle is open, even unlinked.
    pub async fn open(&self, ino: u64, flags: u32) -> ClientResult<(Attr, u64)> {
        let r = check(
            self.write(command::Op::Open(kerfs_proto::Open { ino, flags }))
                .await?,
        )?;
        let handle = r.handle;
        Ok((attr_of(r)?, handle))
    }

    pub async fn close(&self, handle: u64) -> ClientResult<()> {
        self.close_all(handle, &[]).await
    }

    /// Closes `handle` and `more` (handles of this session) in one command: all or none.
    pub async fn close_all(&self, handle: u64, more: &[u64]) -> ClientResult<()> {
        let r = self
            .write(command::Op::Close(kerfs_proto::Close {
                handle,
                more: more.to_vec(),
            }))
            .await?;
        check(r).map(|_| ())
    }

    /// Takes, changes or releases (type UNLOCK) a record lock through an open handle,
    /// without waiting: a conflicting lock of another owner is `Fs { errno: EAGAIN }`.
    pub async fn set_lock(&self, req: kerfs_proto::SetLock) -> ClientResult<()> {
        let r = self.write(command::Op::SetLock(req)).await?;
        check(r).map(|_| ())
    }

    /// `owner` no longer waits for a POSIX lock (its F_SETLKW was interrupted).
    pub async fn cancel_lock_wait(&self, owner: u64) -> ClientResult<()> {
        let r = self
            .write(command::Op::CancelLockWait(kerfs_proto::CancelLockWait {
                owner,
            }))
            .await?;
        check(r).map(|_| ())
    }

    /// Drops every lock of `owner` on the file open as `handle` (close of a descriptor).
    pub async fn release_locks(
        &self,
        handle: u64,
        owner: u64,
        kind: kerfs_proto::LockKind,
    ) -> ClientResult<()> {
        let r = self
            .write(command::Op::ReleaseLocks(kerfs_proto::ReleaseLocks {
                handle,
                owner,
                kind: kind as i32,
            }))
            .await?;
        check(r).map(|_| ())
    }

    /// The first lock that would stop the one described (`client_id` 0 in the request is
    /// filled with this session's), or `None` when it could be taken now.
    pub async fn get_lock(
        &self,
        mut req: kerfs_proto::GetLock,
    ) -> ClientResult<Option<kerfs_proto::FileLock>> {
        if req.client_id == 0 {
            req.client_id = self.client_id();
        }
        let r = self.read(read_op::Op::GetLock(req)).await?;
        Ok(check(r)?.lock)
    }

    pub async fn statfs(&self) -> ClientResult<FsStats> {
        let r = check(
            self.read(read_op::Op::StatFs(kerfs_proto::StatFs {}))
                .await?,
        )?;
        r.stats
            .ok_or_else(|| ClientError::BadRequest("statfs reply without stats".into()))
    }

    /// A digest of the leader's whole namespace (to compare replicas, see [`Self::node_digest`]).
    pub async fn digest(&self) -> ClientResult<(Vec<u8>, u64)> {
        let r = check(
            self.read(read_op::Op::StateDigest(kerfs_proto::StateDigest {}))
                .await?,
        )?;
        Ok((r.data, r.applied_index))
    }

    /// The digest of one node's local state, and the index it was taken at.
    pub async fn node_digest(&self, addr: &str) -> ClientResult<(Vec<u8>, u64)> {
        let index = self.node_index(addr)?;
        let mut grpc = lock(&self.inner.nodes)[index].grpc.clone();
        let req = ReadRequest {
            op: Some(ReadOp {
                caller: Some(self.caller.clone()),
                op: Some(read_op::Op::StateDigest(kerfs_proto::StateDigest {})),
            }),
            allow_stale: true,
        };
        let resp = grpc.read(req).await.map_err(|s| ClientError::Unavailable {
            waited: Duration::ZERO,
            addrs: addr.into(),
            last: s.message().into(),
        })?;
        match resp.into_inner().outcome {
            Some(meta_response::Outcome::Reply(r)) => {
                let r = check(r)?;
                Ok((r.data, r.applied_index))
            }
            _ => Err(ClientError::BadRequest(format!("{addr}: no digest"))),
        }
    }
}

fn make_node(addr: &str, config: &MetaClientConfig) -> ClientResult<Node> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Config(format!("bad metadata address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let grpc = MetaGrpc::with_interceptor(endpoint.connect_lazy(), config.key.client_auth())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Node {
        addr: addr.to_string(),
        grpc,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a plain update that cannot leave the value half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The caller identity of this process (effective ids and supplementary groups).
pub fn current_caller() -> Caller {
    // SAFETY: these calls have no preconditions; getgroups writes at most `len` entries.
    unsafe {
        let mut groups = vec![0 as libc::gid_t; 64];
        let n = libc::getgroups(groups.len() as i32, groups.as_mut_ptr());
        groups.truncate(n.max(0) as usize);
        Caller {
            uid: libc::geteuid(),
            gid: libc::getegid(),
            groups,
        }
    }
}

/// Turns an errno reply into [`ClientError::Fs`].
pub fn check(reply: Reply) -> ClientResult<Reply> {
    if reply.errno == 0 {
        Ok(reply)
    } else {
        Err(ClientError::Fs {
            errno: reply.errno,
            message: reply.message,
        })
    }
}

fn attr_of(reply: Reply) -> ClientResult<Attr> {
    reply
        .attr
        .ok_or_else(|| ClientError::BadRequest("reply without attributes".into()))
}

impl MetaClient {
    /// Resolves an absolute path ("/a/b") to its attributes, component by component.
    pub async fn resolve(&self, path: &str) -> ClientResult<Attr> {
        let mut attr = self.getattr(kerfs_proto::ROOT_INO).await?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            attr = self.lookup(attr.ino, part.as_bytes()).await?;
        }
        Ok(attr)
    }

    /// Resolves the parent of `path` and returns it with the last component.
    pub async fn resolve_parent<'p>(&self, path: &'p str) -> ClientResult<(Attr, &'p str)> {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => ("", trimmed),
        };
        if name.is_empty() {
            return Err(ClientError::Fs {
                errno: libc::EINVAL,
                message: format!("{path:?} names no entry"),
            });
        }
        Ok((self.resolve(dir).await?, name))
    }
}
