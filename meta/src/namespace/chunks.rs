//! The metadata half of the data path: layouts, the chunk-server table, per-file chunk
//! tables with versions and placements, placement of new chunks, and the queue of chunk
//! deletions each server picks up with its heartbeat.
//!
//! A replicated chunk has one chunk id held by R servers; an erasure-coded chunk has one
//! id per shard (k data + m parity), each on its own server. A chunk's version is its write
//! epoch: AllocateChunks bumps it, CommitWrite records which placements hold it (`current`);
//! the others are stale and never read.
//!
//! Everything is deterministic: times come from the command, ids from counters, and every
//! iteration is in key order or over sorted vectors / BTreeMaps.

use std::collections::{BTreeMap, BTreeSet};

use kerfs_proto::{
    AllocateChunks, ChunkDeleteRequest, ChunkHeartbeatReply, ChunkPlacement, ChunkServerHeartbeat,
    ChunkServerRecord, CommitWrite, FileChunk, FileKind, GetChunks, Layout, RegisterChunkServer,
    Reply, SetLayout, Timespec, ROOT_INO,
};

use super::nodes::{self, blocks_for, drop_set_id_after_write, must_inode};
use super::records::{self as rec, ChunkOwner, ChunkRec, DeleteRec, HandleRec, Inode, ServerRec};
use super::sessions::handle_writable;
use super::{repair, who_of, Ctx, Fail, NamespaceConfig, R};
use crate::store::{KvRead, Overlay};

pub const KIB64: u64 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u64 = 4 << 30;
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// R=2 survives one failed server at half the write cost of R=3, and the dev cluster has
/// three chunk servers (R=3 would leave no spare to re-replicate onto).
pub const DEFAULT_REPLICAS: u32 = 2;

pub const STATE_UP: &str = "up";
pub const STATE_DOWN: &str = "down";
pub const STATE_DRAINING: &str = "draining";
/// Drained: nothing is placed on it any more; it may be removed.
pub const STATE_DRAINED: &str = "drained";
/// Removed by the operator: its registrations and heartbeats are refused.
pub const STATE_REMOVED: &str = "removed";

/// Most chunk indexes one AllocateChunks may name (bounds the size of one raft entry's work).
const MAX_ALLOCATE: usize = 4096;
/// Most chunks one GetChunks returns; `eof` says whether the listing reached the end.
const MAX_GET_CHUNKS: usize = 1 << 18;
/// Most deletions handed to a server per heartbeat (the rest come with the next ones).
const MAX_DELETES_PER_HEARTBEAT: usize = 4096;
/// Longest server address or failure domain kept.
const MAX_NAME: usize = 1024;

// ------------------------------------------------------------------ layouts

pub fn default_layout() -> Layout {
    Layout {
        replicas: DEFAULT_REPLICAS,
        ec_data: 0,
        ec_parity: 0,
        chunk_size: DEFAULT_CHUNK_SIZE,
        stripe_width: 0,
    }
}

/// Bytes one placement of a chunk takes on its server (a shard is 1/k of the chunk).
pub fn placement_bytes(l: &Layout) -> u64 {
    if l.ec_data == 0 {
        l.chunk_size
    } else {
        l.chunk_size / u64::from(l.ec_data)
    }
}

pub fn validate_layout(l: &Layout) -> R<()> {
    let bad = |m: String| Err(Fail::new(libc::EINVAL, m));
    let unit = if l.ec_data == 0 {
        if l.ec_parity != 0 {
            return bad(format!(
                "layout has {} parity shards but no data shards; set ec_data (1..=16) for \
                 erasure coding or ec_parity 0 for replication",
                l.ec_parity
            ));
        }
        if !(1..=16).contains(&l.replicas) {
            return bad(format!(
                "layout asks for {} replicas; a replicated layout needs 1 to 16",
                l.replicas
            ));
        }
        KIB64
    } else {
        if !(1..=16).contains(&l.ec_data) {
            return bad(format!(
                "layout asks for {} data shards; erasure coding needs 1 to 16",
                l.ec_data
            ));
        }
        if !(1..=8).contains(&l.ec_parity) {
            return bad(format!(
                "layout asks for {} parity shards; erasure coding needs 1 to 8",
                l.ec_parity
            ));
        }
        KIB64 * u64::from(l.ec_data)
    };
    if l.chunk_size < unit || l.chunk_size > MAX_CHUNK_SIZE || !l.chunk_size.is_multiple_of(unit) {
        return bad(format!(
            "chunk size {} must be a multiple of {unit} bytes (64 KiB{}) between 64 KiB and 4 GiB",
            l.chunk_size,
            if l.ec_data == 0 { "" } else { " times ec_data" }
        ));
    }
    if l.stripe_width != 0 && (l.stripe_width as usize) < l.copies() {
        return bad(format!(
            "stripe width {} is smaller than the {} servers one chunk needs (0: all servers)",
            l.stripe_width,
            l.copies()
        ));
    }
    Ok(())
}

/// The layout of an inode: its own record, or the default (the root and anything created
/// before layouts existed).
pub fn layout_of(state: &dyn KvRead, ino: u64) -> R<Layout> {
    Ok(
        rec::get::<Layout>(state, &rec::key_u64(rec::P_LAYOUT, ino))?
            .unwrap_or_else(default_layout),
    )
}

/// Gives a new directory or regular file its parent's layout (a file keeps the layout it
/// was created with; a directory passes it on).
pub fn inherit_layout(state: &mut Overlay<'_>, parent: u64, ino: u64, kind: FileKind) -> R<()> {
    if matches!(kind, FileKind::Directory | FileKind::Regular) {
        let l = layout_of(state, parent)?;
        rec::put(state, rec::key_u64(rec::P_LAYOUT, ino), &l);
    }
    Ok(())
}

fn has_chunks(state: &dyn KvRead, ino: u64) -> R<bool> {
    Ok(!state
        .scan(
            &rec::key_u64(rec::P_CHUNK, ino),
            &rec::end_u64(rec::P_CHUNK, ino),
            1,
        )?
        .is_empty())
}

pub fn set_layout(ctx: &Ctx, state: &mut Overlay<'_>, s: &SetLayout) -> R<Reply> {
    let mut inode = must_inode(state, s.ino)?;
    let Some(layout) = s.layout else {
        return Err(Fail::new(libc::EINVAL, "set_layout without a layout"));
    };
    validate_layout(&layout)?;
    if !ctx.who.owns(&inode.attr) {
        return Err(Fail::new(
            libc::EPERM,
            format!(
                "only the owner or root may change the layout of inode {}",
                s.ino
            ),
        ));
    }
    match inode.kind() {
        FileKind::Directory => {}
        FileKind::Regular => {
            if has_chunks(state, s.ino)? {
                return Err(Fail::new(
                    libc::EBUSY,
                    format!(
                        "file {} already has data; a layout can only be set on an empty file \
                         (copy it into a directory with the wanted layout instead)",
                        s.ino
                    ),
                ));
            }
        }
        _ => {
            return Err(Fail::new(
                libc::EINVAL,
                format!("inode {} is neither a directory nor a regular file", s.ino),
            ))
        }
    }
    rec::put(state, rec::key_u64(rec::P_LAYOUT, s.ino), &layout);
    inode.attr.ctime = Some(ctx.now);
    rec::store_inode(state, &inode);
    Ok(Reply {
        attr: Some(inode.attr),
        layout: Some(layout),
        ..Default::default()
    })
}

// ------------------------------------------------------------------ chunk servers

fn server_key(id: u64) -> Vec<u8> {
    rec::key_u64(rec::P_SERVER, id)
}

/// A server record with its inner record present (a missing one is corruption).
pub(super) fn load_server(
    state: &dyn KvRead,
    id: u64,
) -> R<Option<(ServerRec, ChunkServerRecord)>> {
    let key = server_key(id);
    let Some(mut r) = rec::get::<ServerRec>(state, &key)? else {
        return Ok(None);
    };
    let Some(s) = r.server.take() else {
        return Err(Fail::corrupt(
            &key,
            "chunk server record without its server",
        ));
    };
    Ok(Some((r, s)))
}

pub(super) fn store_server(state: &mut Overlay<'_>, mut r: ServerRec, s: ChunkServerRecord) {
    let id = s.info.as_ref().map(|i| i.id).unwrap_or(0);
    r.server = Some(s);
    rec::put(state, server_key(id), &r);
}

/// Every server record, by id.
pub(super) fn all_servers(state: &dyn KvRead) -> R<Vec<(ServerRec, ChunkServerRecord)>> {
    let mut out = Vec::new();
    let mut pages = rec::Pages::new(vec![rec::P_SERVER], vec![rec::P_SERVER + 1], 512);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let mut r: ServerRec = rec::decode(&k, &v)?;
            let Some(s) = r.server.take() else {
                return Err(Fail::corrupt(&k, "chunk server record without its server"));
            };
            out.push((r, s));
        }
    }
    Ok(out)
}

pub(super) fn server_id(s: &ChunkServerRecord) -> u64 {
    s.info.as_ref().map(|i| i.id).unwrap_or(0)
}

fn check_name(what: &str, v: &str) -> R<()> {
    if v.len() > MAX_NAME {
        return Err(Fail::new(
            libc::EINVAL,
            format!(
                "chunk server {what} of {} bytes is longer than {MAX_NAME}",
                v.len()
            ),
        ));
    }
    Ok(())
}

pub fn register_server(ctx: &Ctx, state: &mut Overlay<'_>, r: &RegisterChunkServer) -> R<Reply> {
    let Some(info) = r.info.clone() else {
        return Err(Fail::new(
            libc::EINVAL,
            "register_chunk_server without server information",
        ));
    };
    if info.address.is_empty() {
        return Err(Fail::new(
            libc::EINVAL,
            "chunk server registers without an address clients can dial",
        ));
    }
    check_name("address", &info.address)?;
    check_name("failure domain", &info.failure_domain)?;
    check_name("cluster id", &info.cluster_id)?;
    let mut c = rec::counters(state)?;
    let next = c.next_server.max(1);
    let id = if info.id == 0 { next } else { info.id };
    // A server may come back with an id this state never handed out (a rebuilt metadata
    // service): keep its id and make sure the counter never hands it out again.
    c.next_server = next.max(id.saturating_add(1));
    rec::put_counters(state, &c);
    let (mut r, mut s) = match load_server(state, id)? {
        Some(found) => found,
        None => (
            ServerRec::default(),
            ChunkServerRecord {
                state: STATE_UP.into(),
                ..Default::default()
            },
        ),
    };
    refuse_removed(id, &s)?;
    // Draining is the operator's decision; a restart does not cancel it.
    s.state = live_state(&r, &s).into();
    s.info = Some(kerfs_proto::ChunkServerInfo { id, ..info });
    s.last_heartbeat = Some(ctx.now);
    r.want_full_report = true;
    store_server(state, r, s);
    Ok(Reply {
        server_id: id,
        ..Default::default()
    })
}

/// The state of a server that is alive (registers or heartbeats): up, or draining / drained
/// when an operator asked for a drain.
fn live_state(r: &ServerRec, s: &ChunkServerRecord) -> &'static str {
    if !r.drain {
        STATE_UP
    } else if s.state == STATE_DRAINED {
        STATE_DRAINED
    } else {
        STATE_DRAINING
    }
}

fn refuse_removed(id: u64, s: &ChunkServerRecord) -> R<()> {
    if s.state == STATE_REMOVED {
        return Err(Fail::new(
            libc::EPERM,
            format!(
                "chunk server {id} was removed from the cluster (`kerfsctl node remove`); to \
                 bring the machine back, empty its data directory and start `kerfsd chunk` \
                 again: it joins as a new server"
            ),
        ));
    }
    Ok(())
}

pub(super) fn delete_key(server: u64, chunk: u64) -> Vec<u8> {
    rec::key_u64_u64(rec::P_DELETE, server, chunk)
}

/// Queues the deletion of `chunk` (up to `version`) on `server`.
pub(super) fn queue_delete(
    state: &mut Overlay<'_>,
    server: u64,
    chunk: u64,
    version: u64,
) -> R<()> {
    let key = delete_key(server, chunk);
    let old = rec::get::<DeleteRec>(state, &key)?.map(|d| d.max_version);
    let max_version = old.unwrap_or(0).max(version);
    rec::put(state, key, &DeleteRec { max_version });
    Ok(())
}

pub fn heartbeat(ctx: &Ctx, state: &mut Overlay<'_>, h: &ChunkServerHeartbeat) -> R<Reply> {
    let Some(hb) = &h.heartbeat else {
        return Err(Fail::new(
            libc::EINVAL,
            "chunk server heartbeat without content",
        ));
    };
    let Some(info) = &hb.server else {
        return Err(Fail::new(
            libc::EINVAL,
            "chunk server heartbeat without the server's information",
        ));
    };
    let id = info.id;
    let Some((mut r, mut s)) = (if id == 0 {
        None
    } else {
        load_server(state, id)?
    }) else {
        return Err(Fail::new(
            libc::ENOENT,
            format!("chunk server {id} is not known to the metadata service; register first"),
        ));
    };
    refuse_removed(id, &s)?;
    let was_down = s.state == STATE_DOWN;
    if let Some(known) = s.info.as_mut() {
        known.capacity_bytes = info.capacity_bytes;
        known.used_bytes = info.used_bytes;
        known.available_bytes = info.available_bytes;
        known.chunk_count = info.chunk_count;
    }
    s.last_heartbeat = Some(ctx.now);
    s.state = live_state(&r, &s).into();

    for &chunk in &hb.deleted {
        state.delete(delete_key(id, chunk));
    }
    for c in hb.chunks.iter().filter(|c| c.corrupt) {
        mark_corrupt(state, id, c.chunk_id)?;
    }
    // Before the full report: a copy accepted here is placed, not garbage.
    repair::completed(ctx, state, id, &hb.repaired)?;
    if hb.full_report {
        reconcile_full_report(state, id, hb)?;
        if r.want_full_report || was_down {
            // The report meta asked for after a (re)registration: copies meta counts as
            // current there but the server no longer has (a wiped or replaced disk) are
            // marked missing, so that repair restores them.
            let held: BTreeSet<u64> = hb.chunks.iter().map(|c| c.chunk_id).collect();
            repair::note_missing(state, id, &held)?;
        }
    }
    r.want_full_report = (r.want_full_report || was_down) && !hb.full_report;

    let rows = state.scan(
        &rec::key_u64(rec::P_DELETE, id),
        &rec::end_u64(rec::P_DELETE, id),
        MAX_DELETES_PER_HEARTBEAT,
    )?;
    let mut delete = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let d: DeleteRec = rec::decode(&k, &v)?;
        delete.push(ChunkDeleteRequest {
            chunk_id: rec::u64_at(&k, 9)?,
            max_version: d.max_version,
        });
    }
    let want_full_report = r.want_full_report;
    // A repair accepted above moved placement bytes onto this server: keep them.
    // So did the end of its own drain (the walk after an accepted repair), if it ended.
    if let Some((_, now)) = load_server(state, id)? {
        s.allocated_bytes = now.allocated_bytes;
        if now.state == STATE_DRAINED {
            s.state = now.state;
        }
    }
    store_server(state, r, s);
    let repair = repair::orders_for(state, id)?;
    Ok(Reply {
        server_id: id,
        heartbeat: Some(ChunkHeartbeatReply {
            delete,
            want_full_report,
            repair,
        }),
        ..Default::default()
    })
}

/// The chunk a chunk id belongs to, if any file still has it.
pub(super) fn owner_of(state: &dyn KvRead, chunk: u64) -> R<Option<(ChunkOwner, ChunkRec)>> {
    let Some(o) = rec::get::<ChunkOwner>(state, &rec::key_u64(rec::P_CHUNK_OWNER, chunk))? else {
        return Ok(None);
    };
    let key = chunk_key(o.ino, o.index);
    Ok(rec::get::<ChunkRec>(state, &key)?.map(|c| (o, c)))
}

/// A server reported its copy of `chunk` as corrupt: it must not be read any more.
/// A server found `chunk` failing a block checksum: its copy there is no longer current,
/// and says why (`kerfsctl chunks` shows it as corrupt, not stale).
fn mark_corrupt(state: &mut Overlay<'_>, server: u64, chunk: u64) -> R<()> {
    let Some((o, mut c)) = owner_of(state, chunk)? else {
        return Ok(());
    };
    let mut changed = false;
    for p in c.replicas.iter_mut() {
        if p.server_id == server && p.chunk_id == chunk && p.current {
            p.current = false;
            p.corrupt = true;
            changed = true;
        }
    }
    if changed {
        rec::put(state, chunk_key(o.ino, o.index), &c);
        repair::note_chunk(state, o.ino, o.index, &c)?;
    }
    Ok(())
}

/// A full report lists everything the server holds: chunks no file places there are
/// garbage (queued for deletion), and queued deletions of chunks it no longer holds are
/// done.
fn reconcile_full_report(
    state: &mut Overlay<'_>,
    server: u64,
    hb: &kerfs_proto::ChunkHeartbeat,
) -> R<()> {
    let mut held = BTreeSet::new();
    for c in &hb.chunks {
        held.insert(c.chunk_id);
        let placed = match owner_of(state, c.chunk_id)? {
            Some((_, rec)) => rec
                .replicas
                .iter()
                .any(|p| p.server_id == server && p.chunk_id == c.chunk_id),
            None => false,
        } || repair::is_repair_target(state, server, c.chunk_id)?;
        if !placed {
            queue_delete(state, server, c.chunk_id, c.version)?;
        }
    }
    let mut pages = rec::Pages::new(
        rec::key_u64(rec::P_DELETE, server),
        rec::end_u64(rec::P_DELETE, server),
        1024,
    );
    while let Some(rows) = pages.next_page(state)? {
        for (k, _) in rows {
            if !held.contains(&rec::u64_at(&k, 9)?) {
                state.delete(k);
            }
        }
    }
    Ok(())
}

/// Marks down every server whose last heartbeat is older than the timeout.
pub fn expire_servers(ctx: &Ctx, state: &mut Overlay<'_>, config: &NamespaceConfig) -> R<Reply> {
    let mut went_down = BTreeSet::new();
    for (r, mut s) in silent_servers(state, &ctx.now, config)? {
        went_down.insert(server_id(&s));
        s.state = STATE_DOWN.into();
        store_server(state, r, s);
    }
    // Every chunk with a copy there lost one: queue them for re-replication.
    repair::note_servers_down(state, &went_down)?;
    Ok(Reply::default())
}

/// The servers [`expire_servers`] at `now` would mark down: not down, drained or removed, and
/// silent for longer than the timeout.
pub fn silent_servers(
    state: &dyn KvRead,
    now: &Timespec,
    config: &NamespaceConfig,
) -> R<Vec<(ServerRec, ChunkServerRecord)>> {
    let now = now.as_nanos();
    let timeout = i128::from(config.chunk_server_timeout_ms) * 1_000_000;
    let mut out = all_servers(state)?;
    // A drained server holds nothing: its silence loses no copy (it stays "drained").
    out.retain(|(_, s)| {
        s.state != STATE_DOWN
            && s.state != STATE_REMOVED
            && s.state != STATE_DRAINED
            && rec::ts_nanos(&s.last_heartbeat) + timeout < now
    });
    Ok(out)
}

pub fn list_servers(state: &dyn KvRead) -> R<Reply> {
    Ok(Reply {
        servers: all_servers(state)?.into_iter().map(|(_, s)| s).collect(),
        ..Default::default()
    })
}

/// Raw capacity and available bytes of the "up" servers, or None when no server has ever
/// registered.
pub fn server_space(state: &dyn KvRead) -> R<Option<(u64, u64)>> {
    let servers = all_servers(state)?;
    if servers.is_empty() {
        return Ok(None);
    }
    let (mut cap, mut avail) = (0u64, 0u64);
    for (_, s) in servers.iter().filter(|(_, s)| s.state == STATE_UP) {
        if let Some(i) = &s.info {
            cap = cap.saturating_add(i.capacity_bytes);
            avail = avail.saturating_add(i.available_bytes);
        }
    }
    Ok(Some((cap, avail)))
}

// ------------------------------------------------------------------ placement

/// Chooses `n` distinct servers for one chunk: "up" servers with room, least allocated
/// first (ties by id), spread over as many failure domains as possible and, beyond that,
/// evenly over the domains. Servers without a failure domain each count as their own.
fn choose(servers: &[ChunkServerRecord], n: usize, bytes: u64, l: &Layout) -> R<Vec<usize>> {
    let mut candidates: Vec<usize> = (0..servers.len())
        .filter(|&i| {
            let s = &servers[i];
            let room = s
                .info
                .as_ref()
                .map(|i| i.capacity_bytes == 0 || i.available_bytes >= bytes)
                .unwrap_or(false);
            s.state == STATE_UP && room
        })
        .collect();
    if candidates.len() < n {
        let up = servers.iter().filter(|s| s.state == STATE_UP).count();
        let full = up - candidates.len();
        let what = if l.ec_data == 0 {
            format!("{} replicas", l.replicas)
        } else {
            format!("erasure coding {}+{}", l.ec_data, l.ec_parity)
        };
        return Err(Fail::new(
            libc::ENOSPC,
            format!(
                "a chunk with {what} needs {n} chunk servers up with free space, but {up} of \
                 {} are up{}; start more chunk servers or choose a layout with fewer copies",
                servers.len(),
                if full > 0 {
                    format!(" and {full} of those are full")
                } else {
                    String::new()
                }
            ),
        ));
    }
    candidates.sort_by_key(|&i| (servers[i].allocated_bytes, server_id(&servers[i])));
    let domain = |i: usize| -> String {
        match servers[i].info.as_ref().map(|x| x.failure_domain.as_str()) {
            Some(d) if !d.is_empty() => format!("d:{d}"),
            _ => format!("s:{}", server_id(&servers[i])),
        }
    };
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    let mut chosen: Vec<usize> = Vec::with_capacity(n);
    // Level k admits a server whose domain holds fewer than k chosen servers: level 1
    // spreads over distinct domains, later levels fill evenly.
    let mut level = 1;
    while chosen.len() < n {
        for &i in &candidates {
            if chosen.len() == n {
                break;
            }
            if chosen.contains(&i) {
                continue;
            }
            let d = domain(i);
            let count = used.get(&d).copied().unwrap_or(0);
            if count < level {
                used.insert(d, count + 1);
                chosen.push(i);
            }
        }
        level += 1;
    }
    Ok(chosen)
}

// ------------------------------------------------------------------ chunk tables

pub(super) fn chunk_key(ino: u64, index: u64) -> Vec<u8> {
    rec::key_u64_u64(rec::P_CHUNK, ino, index)
}

/// The handle `handle` of this client, open for writing on a regular file.
pub(super) fn writable_handle(ctx: &Ctx, state: &dyn KvRead, handle: u64) -> R<(HandleRec, Inode)> {
    let Some(h) = rec::get::<HandleRec>(state, &rec::key_u64(rec::P_HANDLE, handle))? else {
        return Err(Fail::new(libc::EBADF, format!("no open handle {handle}")));
    };
    // Internal commands (client 0) may use anyone's handle; clients only their own.
    if ctx.client_id != 0 && h.client_id != ctx.client_id {
        return Err(Fail::new(
            libc::EBADF,
            format!("handle {handle} belongs to another client session"),
        ));
    }
    if !handle_writable(&h) {
        return Err(Fail::new(
            libc::EBADF,
            format!("handle {handle} is not open for writing"),
        ));
    }
    let inode = must_inode(state, h.ino)?;
    if inode.kind() != FileKind::Regular {
        return Err(Fail::new(
            libc::EBADF,
            format!("handle {handle} is not on a regular file"),
        ));
    }
    Ok((h, inode))
}

/// Fills in server addresses (from the server table) for a reply.
pub(super) fn with_addresses(
    c: &ChunkRec,
    index: u64,
    fresh: bool,
    addr: &BTreeMap<u64, String>,
) -> FileChunk {
    FileChunk {
        index,
        version: c.version,
        replicas: c
            .replicas
            .iter()
            .map(|p| ChunkPlacement {
                address: addr.get(&p.server_id).cloned().unwrap_or_default(),
                ..p.clone()
            })
            .collect(),
        fresh,
    }
}

pub(super) fn addresses(servers: &[ChunkServerRecord]) -> BTreeMap<u64, String> {
    servers
        .iter()
        .filter_map(|s| s.info.as_ref().map(|i| (i.id, i.address.clone())))
        .collect()
}

pub fn allocate(ctx: &Ctx, state: &mut Overlay<'_>, a: &AllocateChunks) -> R<Reply> {
    let (_, inode) = writable_handle(ctx, state, a.handle)?;
    let ino = inode.ino();
    let layout = layout_of(state, ino)?;
    validate_layout(&layout).map_err(|f| {
        Fail::new(
            libc::EIO,
            format!("inode {ino} has a bad layout: {}", f.message),
        )
    })?;
    if a.indexes.len() > MAX_ALLOCATE {
        return Err(Fail::new(
            libc::EINVAL,
            format!(
                "allocate_chunks names {} chunks; at most {MAX_ALLOCATE} per call",
                a.indexes.len()
            ),
        ));
    }
    let mut indexes = a.indexes.clone();
    indexes.sort_unstable();
    indexes.dedup();
    let limit = i64::MAX as u64;
    for &i in &indexes {
        if i.checked_mul(layout.chunk_size)
            .is_none_or(|off| off > limit)
        {
            return Err(Fail::new(
                libc::EFBIG,
                format!("chunk {i} of inode {ino} lies beyond the largest file size"),
            ));
        }
    }
    let loaded = all_servers(state)?;
    let mut touched = vec![false; loaded.len()];
    let (mut meta, mut servers): (Vec<ServerRec>, Vec<ChunkServerRecord>) =
        loaded.into_iter().unzip();
    let addr = addresses(&servers);
    let mut counters = rec::counters(state)?;
    let n = layout.copies();
    let bytes = placement_bytes(&layout);
    let mut chunks = Vec::with_capacity(indexes.len());
    for &index in &indexes {
        let key = chunk_key(ino, index);
        if let Some(mut c) = rec::get::<ChunkRec>(state, &key)? {
            // A new write epoch on an existing chunk: same placements, next version.
            c.version = c.version.saturating_add(1);
            c.epoch_handle = a.handle;
            rec::put(state, key, &c);
            chunks.push(with_addresses(&c, index, false, &addr));
            continue;
        }
        let picked = choose(&servers, n, bytes, &layout)?;
        // Replicas share one chunk id; each EC shard has its own.
        let base = counters.next_chunk.max(1);
        let ids = if layout.ec_data == 0 { 1 } else { n as u64 };
        counters.next_chunk = base.saturating_add(ids);
        let mut replicas = Vec::with_capacity(n);
        for (shard, &i) in picked.iter().enumerate() {
            let (chunk_id, shard_index) = if layout.ec_data == 0 {
                (base, 0)
            } else {
                (base + shard as u64, shard as u32)
            };
            servers[i].allocated_bytes = servers[i].allocated_bytes.saturating_add(bytes);
            touched[i] = true;
            replicas.push(ChunkPlacement {
                server_id: server_id(&servers[i]),
                address: String::new(),
                chunk_id,
                shard_index,
                current: true,
                corrupt: false,
            });
        }
        let c = ChunkRec {
            version: 1,
            replicas,
            writes: 0,
            epoch_handle: a.handle,
        };
        let mut ids: Vec<u64> = c.replicas.iter().map(|p| p.chunk_id).collect();
        ids.dedup();
        for id in ids {
            rec::put(
                state,
                rec::key_u64(rec::P_CHUNK_OWNER, id),
                &ChunkOwner { ino, index },
            );
        }
        rec::put(state, key, &c);
        chunks.push(with_addresses(&c, index, true, &addr));
    }
    rec::put_counters(state, &counters);
    for (i, s) in servers.into_iter().enumerate() {
        if touched[i] {
            store_server(state, std::mem::take(&mut meta[i]), s);
        }
    }
    Ok(Reply {
        attr: Some(inode.attr),
        layout: Some(layout),
        chunks,
        ..Default::default()
    })
}

pub fn commit(ctx: &Ctx, state: &mut Overlay<'_>, cw: &CommitWrite) -> R<Reply> {
    let (_, mut inode) = writable_handle(ctx, state, cw.handle)?;
    let ino = inode.ino();
    if cw.size > i64::MAX as u64 {
        return Err(Fail::new(
            libc::EFBIG,
            format!("size {} is too large", cw.size),
        ));
    }
    let mut states = None;
    for w in &cw.chunks {
        let key = chunk_key(ino, w.index);
        // A chunk truncated away meanwhile, or rewritten by a newer epoch, is not this
        // commit's to decide.
        let Some(mut c) = rec::get::<ChunkRec>(state, &key)? else {
            continue;
        };
        if c.version != w.version {
            continue;
        }
        for p in c.replicas.iter_mut() {
            p.current = w.servers_ok.contains(&p.server_id);
            // A copy the write reached whole again is no longer the damaged one.
            p.corrupt &= !p.current;
        }
        // A repair copy made before this commit may lack what it wrote: refuse it.
        c.writes = c.writes.wrapping_add(1);
        rec::put(state, key, &c);
        if states.is_none() {
            states = Some(repair::server_states(state)?);
        }
        if let Some(states) = &states {
            repair::note_with(state, ino, w.index, &c, states)?;
        }
    }
    let data_changed = !cw.chunks.is_empty() || cw.size > inode.attr.size;
    if cw.size > inode.attr.size {
        let mut c = rec::counters(state)?;
        c.total_size = c
            .total_size
            .saturating_sub(inode.attr.size)
            .saturating_add(cw.size);
        rec::put_counters(state, &c);
        inode.attr.size = cw.size;
        inode.attr.blocks = blocks_for(cw.size);
    }
    drop_set_id_after_write(&ctx.who, cw.clear_set_id, &mut inode.attr);
    if data_changed {
        inode.attr.mtime = Some(ctx.now);
        inode.attr.ctime = Some(ctx.now);
    }
    rec::store_inode(state, &inode);
    let mut reply = Reply {
        attr: Some(inode.attr),
        ..Default::default()
    };
    for d in &cw.then_set {
        let Some(set) = &d.set else { continue };
        if set.ino != ino || set.size.is_some() {
            return Err(Fail::new(
                libc::EINVAL,
                format!("a deferred setattr of a commit must be of inode {ino}, without a size"),
            ));
        }
        let as_caller = Ctx {
            now: ctx.now,
            who: who_of(d.caller.as_ref()),
            client_id: ctx.client_id,
        };
        reply = nodes::setattr(&as_caller, state, set)?;
    }
    Ok(reply)
}

/// Drops the chunks of `ino` from `first` on: each placement is queued for deletion on its
/// server and its space given back to placement.
fn drop_chunks_from(state: &mut Overlay<'_>, ino: u64, first: u64) -> R<()> {
    let layout = layout_of(state, ino)?;
    let bytes = placement_bytes(&layout);
    let mut freed: BTreeMap<u64, u64> = BTreeMap::new();
    let start = chunk_key(ino, first);
    let end = rec::end_u64(rec::P_CHUNK, ino);
    loop {
        let rows = state.scan(&start, &end, 512)?;
        if rows.is_empty() {
            break;
        }
        for (k, v) in rows {
            let c: ChunkRec = rec::decode(&k, &v)?;
            repair::forget(state, ino, rec::u64_at(&k, 9)?)?;
            for p in &c.replicas {
                queue_delete(state, p.server_id, p.chunk_id, c.version)?;
                state.delete(rec::key_u64(rec::P_CHUNK_OWNER, p.chunk_id));
                let f = freed.entry(p.server_id).or_insert(0);
                *f = f.saturating_add(bytes);
            }
            state.delete(k);
        }
    }
    for (id, bytes) in freed {
        if let Some((r, mut s)) = load_server(state, id)? {
            s.allocated_bytes = s.allocated_bytes.saturating_sub(bytes);
            store_server(state, r, s);
        }
    }
    Ok(())
}

/// A file's size changed to `size`: chunks entirely at or past it go (the boundary chunk
/// stays; the client truncates it on its servers).
pub fn truncate(state: &mut Overlay<'_>, ino: u64, size: u64) -> R<()> {
    let cs = layout_of(state, ino)?.chunk_size.max(1);
    drop_chunks_from(state, ino, size.div_ceil(cs))
}

/// An inode is gone: all its chunks and its layout go with it.
pub fn forget_inode(state: &mut Overlay<'_>, ino: u64) -> R<()> {
    drop_chunks_from(state, ino, 0)?;
    state.delete(rec::key_u64(rec::P_LAYOUT, ino));
    Ok(())
}

pub fn get_chunks(state: &dyn KvRead, g: &GetChunks) -> R<Reply> {
    let inode = must_inode(state, g.ino)?;
    let layout = layout_of(state, g.ino)?;
    let limit = match g.count as usize {
        0 => MAX_GET_CHUNKS,
        n => n.min(MAX_GET_CHUNKS),
    };
    let rows = state.scan(
        &chunk_key(g.ino, g.first_index),
        &rec::end_u64(rec::P_CHUNK, g.ino),
        limit + 1,
    )?;
    let eof = rows.len() <= limit;
    let servers: Vec<ChunkServerRecord> = all_servers(state)?.into_iter().map(|(_, s)| s).collect();
    let addr = addresses(&servers);
    let mut chunks = Vec::with_capacity(rows.len().min(limit));
    for (k, v) in rows.into_iter().take(limit) {
        let c: ChunkRec = rec::decode(&k, &v)?;
        chunks.push(with_addresses(&c, rec::u64_at(&k, 9)?, false, &addr));
    }
    Ok(Reply {
        attr: Some(inode.attr),
        layout: Some(layout),
        chunks,
        eof,
        ..Default::default()
    })
}

/// The replication factor statfs divides raw space by: copies per byte of file data in the
/// root's layout.
pub fn root_overhead(state: &dyn KvRead) -> R<(u64, u64)> {
    let l = layout_of(state, ROOT_INO)?;
    Ok(if l.ec_data == 0 {
        (u64::from(l.replicas.max(1)), 1)
    } else {
        (u64::from(l.ec_data + l.ec_parity), u64::from(l.ec_data))
    })
}
