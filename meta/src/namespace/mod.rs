//! The namespace state machine: inodes, directory entries, xattrs, open-file sessions and
//! client sessions, changed only by committed [`Command`]s. Deterministic: the result of a
//! command depends only on the state and the command (its time is stamped in it).
//!
//! Layout of the code:
//! - `records`: keys and on-disk records;
//! - `perm`: who may do what (POSIX permission, sticky and ownership rules);
//! - `nodes`: create, link, remove, setattr (everything that changes inodes and entries);
//! - `rename`: rename with its flags and the subtree rule;
//! - `xattr`: extended attributes;
//! - `sessions`: client sessions, exactly-once replies, open handles and orphan inodes;
//! - `locks`: fcntl/flock record locks, dropped with the handle they were taken through;
//! - `chunks`: layouts, chunk servers, file chunk tables, placement, the deletion queue;
//! - `repair`: under-replicated chunks, repair tasks for chunk servers, replica replacement;
//! - `drain`: draining chunk servers (through the repair mover) and removing them;
//! - `reads`: lookup, getattr, readdir, readlink, statfs, the state digest.
//!
//! readdir leaves "." and ".." to the FUSE layer: cookies 1 and 2 are never handed out,
//! the first real entry of a directory has cookie 3.

mod chunks;
mod drain;
mod locks;
mod nodes;
mod perm;
mod reads;
mod records;
mod rename;
mod repair;
mod sessions;
mod xattr;

#[cfg(test)]
mod chunk_tests;
#[cfg(test)]
mod tests;

use kerfs_proto::{command, read_op, Caller, Command, ReadOp, Reply, Timespec};

use crate::store::{KvRead, Overlay, StoreError};

/// Settings every replica must share (they shape results, so they are part of determinism).
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// Capacity reported by statfs until chunk servers report real capacity.
    pub capacity_bytes: u64,
    /// Inode count reported as the maximum by statfs.
    pub max_files: u64,
    /// A chunk server whose last heartbeat is older than this is marked down.
    pub chunk_server_timeout_ms: u64,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            capacity_bytes: 1 << 40,
            max_files: 1 << 32,
            chunk_server_timeout_ms: 10_000,
        }
    }
}

/// The namespace rules over a key space (keys without the space byte).
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    pub config: NamespaceConfig,
}

/// A failed operation: the errno to return and what failed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fail {
    pub errno: i32,
    pub message: String,
}

impl Fail {
    pub fn new(errno: i32, message: impl Into<String>) -> Fail {
        Fail {
            errno,
            message: message.into(),
        }
    }

    /// A record that does not decode: the data directory is damaged.
    pub fn corrupt(key: &[u8], why: &str) -> Fail {
        Fail::new(
            libc::EIO,
            format!(
                "metadata record {} is malformed ({why}); the data directory is damaged, \
                 rebuild this node from its peers",
                hex(key)
            ),
        )
    }

    pub fn into_reply(self) -> Reply {
        Reply::error(self.errno, self.message)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::new(libc::EIO, e.to_string())
    }
}

pub(crate) type R<T> = Result<T, Fail>;

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Shows a name in messages (names are bytes, maybe not UTF-8).
pub(crate) fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// The credentials a request runs with: the wire's [`Caller`], whose permission rule lives
/// in [`kerfs_proto::perm`] so the mount applies the same one.
pub(crate) type Who = Caller;

/// The caller of a command; an absent caller is root (internal commands).
pub(crate) fn who_of(c: Option<&Caller>) -> Who {
    c.cloned().unwrap_or_default()
}

/// What one write command sees: its time and caller.
pub(crate) struct Ctx {
    pub now: Timespec,
    pub who: Who,
    pub client_id: u64,
}

impl Namespace {
    pub fn new(config: NamespaceConfig) -> Namespace {
        Namespace { config }
    }

    /// Applies one committed command; writes only through `state`. A failing command
    /// leaves no write behind except its cached reply (for exactly-once retries).
    pub fn apply(&self, state: &mut Overlay<'_>, cmd: &Command) -> Reply {
        match self.apply_inner(state, cmd) {
            Ok(reply) => reply,
            Err(f) => f.into_reply(),
        }
    }

    fn apply_inner(&self, state: &mut Overlay<'_>, cmd: &Command) -> R<Reply> {
        // The root comes into being with the first command; it is not part of any
        // command's own writes, so even a failing first command leaves it behind (on
        // every replica alike).
        nodes::ensure_root(state, cmd.now.unwrap_or_default())?;
        let ctx = Ctx {
            now: cmd.now.unwrap_or_default(),
            who: who_of(cmd.caller.as_ref()),
            client_id: cmd.client_id,
        };
        let config = &self.config;
        if cmd.client_id == 0 {
            return Ok(run_op(config, &ctx, state, cmd));
        }
        sessions::with_exactly_once(&ctx, state, cmd, |ctx, state| {
            run_op(config, ctx, state, cmd)
        })
    }

    /// Serves one read from the applied state.
    pub fn read(&self, state: &dyn KvRead, op: &ReadOp) -> Reply {
        let who = who_of(op.caller.as_ref());
        let result = match &op.op {
            None => Err(Fail::new(libc::EINVAL, "read request without an operation")),
            Some(read_op::Op::Lookup(l)) => reads::lookup(state, &who, l),
            Some(read_op::Op::GetAttr(g)) => reads::getattr(state, g),
            Some(read_op::Op::ReadDir(r)) => reads::readdir(state, &who, r),
            Some(read_op::Op::ReadLink(r)) => reads::readlink(state, r),
            Some(read_op::Op::GetXattr(g)) => xattr::get(state, &who, g),
            Some(read_op::Op::ListXattr(l)) => xattr::list(state, &who, l),
            Some(read_op::Op::StatFs(_)) => reads::statfs(state, &self.config),
            Some(read_op::Op::StateDigest(_)) => reads::digest(state),
            Some(read_op::Op::GetChunks(g)) => chunks::get_chunks(state, g),
            Some(read_op::Op::ListChunkServers(_)) => chunks::list_servers(state),
            Some(read_op::Op::RepairStatus(r)) => repair::status(state, r),
            Some(read_op::Op::GetLock(g)) => locks::get_lock(state, g),
            Some(read_op::Op::DrainStatus(d)) => drain::status(state, d),
        };
        result.unwrap_or_else(Fail::into_reply)
    }
}

/// Which of the leader's periodic sweeps would change something now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepsDue {
    /// `ExpireClients`: a session lease or a lock wait ran out.
    pub clients: bool,
    /// `ExpireChunkServers`: a chunk server that is up went silent for too long.
    pub chunk_servers: bool,
}

impl Namespace {
    /// What the periodic sweeps would do at `now`, judged on `state` (the leader's applied
    /// state), so that an idle cluster appends nothing to its log. A record that cannot be
    /// read counts as due: the sweep then runs and reports it, as it did unconditionally.
    pub fn sweeps_due(&self, state: &dyn KvRead, now: &Timespec) -> SweepsDue {
        SweepsDue {
            clients: sessions::expiry_due(state, now).unwrap_or(true),
            chunk_servers: chunks::silent_servers(state, now, &self.config)
                .map_or(true, |s| !s.is_empty()),
        }
    }
}

/// Runs the operation in a child overlay, keeping its writes only if it succeeds.
fn run_op(config: &NamespaceConfig, ctx: &Ctx, state: &mut Overlay<'_>, cmd: &Command) -> Reply {
    let mut child = Overlay::new(state);
    let result = match &cmd.op {
        None => Err(Fail::new(libc::EINVAL, "command without an operation")),
        Some(command::Op::MakeNode(m)) => nodes::make_node(ctx, &mut child, m),
        Some(command::Op::Link(l)) => nodes::link(ctx, &mut child, l),
        Some(command::Op::Remove(r)) => nodes::remove(ctx, &mut child, r),
        Some(command::Op::Rename(r)) => rename::rename(ctx, &mut child, r),
        Some(command::Op::SetAttr(s)) => nodes::setattr(ctx, &mut child, s),
        Some(command::Op::SetXattr(s)) => xattr::set(ctx, &mut child, s),
        Some(command::Op::RemoveXattr(r)) => xattr::remove(ctx, &mut child, r),
        Some(command::Op::Open(o)) => sessions::open(ctx, &mut child, o),
        Some(command::Op::Close(c)) => sessions::close(ctx, &mut child, c),
        Some(command::Op::RegisterClient(r)) => sessions::register(ctx, &mut child, r),
        Some(command::Op::RenewClient(_)) => sessions::renew(ctx, &mut child),
        Some(command::Op::ExpireClients(_)) => sessions::expire(ctx, &mut child),
        Some(command::Op::SetLayout(s)) => chunks::set_layout(ctx, &mut child, s),
        Some(command::Op::AllocateChunks(a)) => chunks::allocate(ctx, &mut child, a),
        Some(command::Op::CommitWrite(c)) => chunks::commit(ctx, &mut child, c),
        Some(command::Op::RegisterChunkServer(r)) => chunks::register_server(ctx, &mut child, r),
        Some(command::Op::ChunkServerHeartbeat(h)) => chunks::heartbeat(ctx, &mut child, h),
        Some(command::Op::ExpireChunkServers(_)) => chunks::expire_servers(ctx, &mut child, config),
        Some(command::Op::SyncBarrier(_)) => Ok(Reply {
            client_id: ctx.client_id,
            ..Default::default()
        }),
        Some(command::Op::RepairChunks(r)) => repair::tick(ctx, &mut child, r),
        Some(command::Op::ReplaceReplica(r)) => repair::replace_replica(ctx, &mut child, r),
        Some(command::Op::SetLock(s)) => locks::set_lock(ctx, &mut child, s),
        Some(command::Op::ReleaseLocks(r)) => locks::release_locks(ctx, &mut child, r),
        Some(command::Op::CancelLockWait(c)) => locks::cancel_wait(ctx, &mut child, c),
        Some(command::Op::DrainChunkServer(d)) => drain::drain(ctx, &mut child, d),
        Some(command::Op::RemoveChunkServer(r)) => drain::remove(ctx, &mut child, r),
    };
    match result {
        Ok(reply) => {
            let writes = child.into_writes();
            state.absorb(writes);
            reply
        }
        Err(f) => f.into_reply(),
    }
}
