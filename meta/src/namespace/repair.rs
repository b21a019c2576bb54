//! Re-replication: the state machine's half of repair.
//!
//! A chunk is *under-replicated* when fewer of its placements are good (hold the current
//! version, on a server that is up or draining) than its layout wants (R, or k+m). Such
//! chunks are kept in a set (`u` ino index), updated deterministically where health changes:
//! a server expires (every chunk placed there), a replica is reported corrupt, a write
//! commits with fewer servers than placements, a writer replaces a replica, a repair ends.
//!
//! The leader proposes [`RepairChunks`] on its timer. Applying it walks the set: chunks that
//! are healthy again are dropped; for the others a task is handed out — *which* placement to
//! replace, the sources (good placements) and a target server chosen like placement does
//! (up, with room, least allocated first, away from the failure domains of the good copies),
//! falling back to the bad placement's own server (in-place rewrite) when no other is left.
//! Tasks are indexed by target (`w` server task) and delivered in that server's heartbeat
//! replies until it reports the outcome in a later heartbeat, or the task times out.
//!
//! A copy is accepted only if the chunk's `version` and `writes` (bumped by every commit and
//! placement change) are what they were when the task was given: a write epoch that started
//! or committed meanwhile makes the copy worthless, and it is thrown away instead of being
//! counted as current. A commit after the acceptance recomputes the current set from what
//! the writer reached, which leaves the new copy out (and queues the chunk again).
//!
//! Draining uses the same mover: a placement on a "draining" server is good (read, written
//! and counted) but queued to be replaced. Its task is handed out like a repair's once the
//! chunk has no missing copy and no open write epoch, and the draining copy is dropped only
//! when the new one is accepted (see `drain`).
//!
//! [`ReplaceReplica`] is the writer's fast path: a replica failed mid-write, the writer gets
//! another server for the same placement at once, copies the chunk there itself, and names
//! it in its commit, so the write is acknowledged with every copy.

use std::collections::{BTreeMap, BTreeSet};

use kerfs_proto::{
    ChunkPlacement, ChunkRepairDone, ChunkRepairOrder, ChunkRepairSource, ChunkServerRecord,
    Layout, RepairChunks, RepairReport, RepairStatus, RepairTaskInfo, ReplaceReplica, Reply,
    Timespec, UnderReplicatedChunk,
};
use prost::Message;

use super::chunks::{
    addresses, all_servers, chunk_key, delete_key, layout_of, load_server, placement_bytes,
    queue_delete, server_id, store_server, with_addresses, writable_handle, STATE_DRAINING,
    STATE_UP,
};
use super::records::{self as rec, ChunkOwner, ChunkRec, HandleRec};
use super::{drain, Ctx, Fail, R};
use crate::store::{KvRead, Overlay};

pub const P_UNDER: u8 = b'u';
pub const P_TARGET: u8 = b'w';
const K_COUNTERS: &[u8] = b"#repair";

/// How long a chunk server has to make one copy before the task goes elsewhere.
const TASK_TIMEOUT_NS: i128 = 120 * 1_000_000_000;
/// How long the background repair leaves a chunk alone after a writer replaced a replica
/// (the writer is copying it and will commit the new placement).
const WRITER_GRACE_NS: i128 = 30 * 1_000_000_000;
/// Tasks one server works on at once (copies compete for its disk and network).
const MAX_TASKS_PER_SERVER: usize = 4;
/// Tasks handed out by one tick, and under-replicated chunks one tick looks at.
const MAX_ASSIGN_PER_TICK: usize = 256;
const MAX_SCAN_PER_TICK: usize = 16_384;
pub(super) const MAX_SCAN_ON_REPORT: usize = 256;
/// Orders carried by one heartbeat reply.
const MAX_ORDERS_PER_HEARTBEAT: usize = 64;

/// A chunk known to lack good copies, and the repair in progress for it.
#[derive(Clone, PartialEq, Message)]
pub struct UnderRec {
    #[prost(message, optional, tag = "1")]
    pub task: Option<TaskRec>,
    /// Why it is not being repaired, or how the last attempt ended (for kerfsctl).
    #[prost(string, tag = "2")]
    pub note: String,
    /// Leave it alone until then (a writer is replacing a replica itself).
    #[prost(message, optional, tag = "3")]
    pub not_before: Option<Timespec>,
}

/// One repair task: `target` makes a copy of the placement (`old_server`, `chunk_id`,
/// `shard_index`) from `sources`.
#[derive(Clone, PartialEq, Message)]
pub struct TaskRec {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub target: u64,
    #[prost(uint64, tag = "3")]
    pub old_server: u64,
    #[prost(uint64, tag = "4")]
    pub chunk_id: u64,
    #[prost(uint32, tag = "5")]
    pub shard_index: u32,
    #[prost(uint64, tag = "6")]
    pub version: u64,
    #[prost(uint64, tag = "7")]
    pub writes: u64,
    #[prost(message, optional, tag = "8")]
    pub deadline: Option<Timespec>,
    /// Placements (without addresses) to read from.
    #[prost(message, repeated, tag = "9")]
    pub sources: Vec<ChunkPlacement>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RepairCounters {
    #[prost(uint64, tag = "1")]
    pub next_task: u64,
    #[prost(uint64, tag = "2")]
    pub repaired: u64,
    #[prost(uint64, tag = "3")]
    pub failed: u64,
    /// Where the next tick starts looking (the last key looked at), so that a long queue
    /// is walked round-robin rather than always from its first entries.
    #[prost(bytes = "vec", tag = "4")]
    pub cursor: Vec<u8>,
}

fn under_key(ino: u64, index: u64) -> Vec<u8> {
    rec::key_u64_u64(P_UNDER, ino, index)
}

fn target_key(server: u64, task: u64) -> Vec<u8> {
    rec::key_u64_u64(P_TARGET, server, task)
}

fn counters(state: &dyn KvRead) -> R<RepairCounters> {
    Ok(rec::get(state, K_COUNTERS)?.unwrap_or_default())
}

fn add_ns(t: &Timespec, ns: i128) -> Timespec {
    let total = t.as_nanos() + ns;
    Timespec {
        sec: (total.div_euclid(1_000_000_000)) as i64,
        nsec: (total.rem_euclid(1_000_000_000)) as u32,
    }
}

/// State of every server, by id.
pub(super) fn server_states(state: &dyn KvRead) -> R<BTreeMap<u64, String>> {
    Ok(all_servers(state)?
        .into_iter()
        .map(|(_, s)| (server_id(&s), s.state))
        .collect())
}

/// A placement that can serve the current version.
fn good(p: &ChunkPlacement, states: &BTreeMap<u64, String>) -> bool {
    p.current
        && matches!(
            states.get(&p.server_id).map(String::as_str),
            Some(STATE_UP) | Some(STATE_DRAINING)
        )
}

fn good_count(c: &ChunkRec, states: &BTreeMap<u64, String>) -> usize {
    c.replicas.iter().filter(|p| good(p, states)).count()
}

/// A placement on a server being drained: still good, but it must move.
fn leaving(p: &ChunkPlacement, states: &BTreeMap<u64, String>) -> bool {
    states.get(&p.server_id).map(String::as_str) == Some(STATE_DRAINING)
}

/// Whether the mover has work on chunk `c`: copies missing, or one on a draining server.
fn needs_work(c: &ChunkRec, states: &BTreeMap<u64, String>, wanted: usize) -> bool {
    good_count(c, states) < wanted || c.replicas.iter().any(|p| leaving(p, states))
}

/// Ends the task of `u` (if any): its delivery index goes.
fn drop_task(state: &mut Overlay<'_>, u: &mut UnderRec) {
    if let Some(t) = u.task.take() {
        state.delete(target_key(t.target, t.id));
    }
}

/// Re-evaluates one chunk after its placements or their currency changed: records it as
/// under-replicated, or forgets it when it has every copy again.
pub(super) fn note_chunk(state: &mut Overlay<'_>, ino: u64, index: u64, c: &ChunkRec) -> R<()> {
    let states = server_states(state)?;
    note_with(state, ino, index, c, &states)
}

pub(super) fn note_with(
    state: &mut Overlay<'_>,
    ino: u64,
    index: u64,
    c: &ChunkRec,
    states: &BTreeMap<u64, String>,
) -> R<()> {
    let wanted = layout_of(state, ino)?.copies();
    if needs_work(c, states, wanted) {
        let key = under_key(ino, index);
        if rec::get::<UnderRec>(state, &key)?.is_none() {
            rec::put(state, key, &UnderRec::default());
        }
        Ok(())
    } else {
        forget(state, ino, index)
    }
}

/// The chunk is healthy or gone: no more repair for it.
pub(super) fn forget(state: &mut Overlay<'_>, ino: u64, index: u64) -> R<()> {
    let key = under_key(ino, index);
    if let Some(mut u) = rec::get::<UnderRec>(state, &key)? {
        drop_task(state, &mut u);
        state.delete(key);
    }
    Ok(())
}

/// Servers just marked down: every chunk with a placement there is queued. One pass over the
/// chunk tables (a server going down is rare; the namespace has no server -> chunk index).
pub(super) fn note_servers_down(state: &mut Overlay<'_>, down: &BTreeSet<u64>) -> R<()> {
    if down.is_empty() {
        return Ok(());
    }
    scan_chunks(state, |c| {
        c.replicas.iter().any(|p| down.contains(&p.server_id))
    })
}

/// The first full report of a server that registered or came back: placements counted as
/// current there that it does not hold are not current any more (and get repaired).
pub(super) fn note_missing(state: &mut Overlay<'_>, server: u64, held: &BTreeSet<u64>) -> R<()> {
    let states = server_states(state)?;
    let mut pages = rec::Pages::new(vec![rec::P_CHUNK], vec![rec::P_CHUNK + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let mut c: ChunkRec = rec::decode(&k, &v)?;
            let mut changed = false;
            for p in c.replicas.iter_mut() {
                if p.server_id == server && p.current && !held.contains(&p.chunk_id) {
                    p.current = false;
                    changed = true;
                }
            }
            if changed {
                c.writes = c.writes.wrapping_add(1);
                let (ino, index) = (rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?);
                rec::put(state, k, &c);
                note_with(state, ino, index, &c, &states)?;
            }
        }
    }
    Ok(())
}

/// Re-checks every chunk that `pick` selects (all of them for a rescan).
pub(super) fn scan_chunks(state: &mut Overlay<'_>, pick: impl Fn(&ChunkRec) -> bool) -> R<()> {
    let states = server_states(state)?;
    let mut pages = rec::Pages::new(vec![rec::P_CHUNK], vec![rec::P_CHUNK + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let c: ChunkRec = rec::decode(&k, &v)?;
            if pick(&c) {
                note_with(state, rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?, &c, &states)?;
            }
        }
    }
    Ok(())
}

/// Whether `server` is making a copy of `chunk` for a repair (its partial copy is not
/// garbage).
pub(super) fn is_repair_target(state: &dyn KvRead, server: u64, chunk: u64) -> R<bool> {
    let Some(o) = rec::get::<ChunkOwner>(state, &rec::key_u64(rec::P_CHUNK_OWNER, chunk))? else {
        return Ok(false);
    };
    Ok(rec::get::<UnderRec>(state, &under_key(o.ino, o.index))?
        .and_then(|u| u.task)
        .is_some_and(|t| t.target == server && t.chunk_id == chunk))
}

fn domain_of(s: &ChunkServerRecord) -> String {
    match s.info.as_ref().map(|i| i.failure_domain.as_str()) {
        Some(d) if !d.is_empty() => format!("d:{d}"),
        _ => format!("s:{}", server_id(s)),
    }
}

fn has_room(s: &ChunkServerRecord, bytes: u64) -> bool {
    s.info
        .as_ref()
        .is_some_and(|i| i.capacity_bytes == 0 || i.available_bytes >= bytes)
}

/// The server to hold a new copy of placement `bad` of `c`: up, with room, holding no other
/// placement of the chunk; away from the domains of the other placements, least allocated
/// first; the bad placement's own server only when nothing else is left (`in_place_ok`).
fn pick_target(
    servers: &[ChunkServerRecord],
    c: &ChunkRec,
    bad: usize,
    bytes: u64,
    in_place_ok: bool,
    busy: &BTreeMap<u64, usize>,
    avoid: Option<u64>,
) -> Option<u64> {
    let others: BTreeSet<u64> = c
        .replicas
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != bad)
        .map(|(_, p)| p.server_id)
        .collect();
    let by_id: BTreeMap<u64, &ChunkServerRecord> =
        servers.iter().map(|s| (server_id(s), s)).collect();
    let used_domains: BTreeSet<String> = others
        .iter()
        .filter_map(|id| by_id.get(id).map(|s| domain_of(s)))
        .collect();
    let old = c.replicas.get(bad).map(|p| p.server_id);
    servers
        .iter()
        .filter(|s| s.state == STATE_UP && has_room(s, bytes))
        .filter(|s| !others.contains(&server_id(s)))
        .filter(|s| in_place_ok || Some(server_id(s)) != old)
        .filter(|s| Some(server_id(s)) != avoid)
        .filter(|s| busy.get(&server_id(s)).copied().unwrap_or(0) < MAX_TASKS_PER_SERVER)
        .min_by_key(|s| {
            (
                Some(server_id(s)) == old,
                used_domains.contains(&domain_of(s)),
                s.allocated_bytes,
                server_id(s),
            )
        })
        .map(server_id)
}

/// Proposed on the leader's timer: hands out repair tasks for under-replicated chunks.
pub fn tick(ctx: &Ctx, state: &mut Overlay<'_>, r: &RepairChunks) -> R<Reply> {
    if r.rescan {
        scan_chunks(state, |_| true)?;
    }
    assign(ctx, state, MAX_SCAN_PER_TICK)
}

/// Walks up to `scan` entries of the queue (round-robin from the cursor): forgets healthy
/// chunks, abandons expired tasks, hands out new ones. A walk that saw the whole queue
/// also ends the drains with nothing left to move.
pub(super) fn assign(ctx: &Ctx, state: &mut Overlay<'_>, scan: usize) -> R<Reply> {
    let servers: Vec<ChunkServerRecord> = all_servers(state)?.into_iter().map(|(_, s)| s).collect();
    let states: BTreeMap<u64, String> = servers
        .iter()
        .map(|s| (server_id(s), s.state.clone()))
        .collect();
    let now = ctx.now.as_nanos();

    // Tasks each server holds already.
    let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
    for (k, _) in state.scan(&[P_TARGET], &[P_TARGET + 1], 1 << 20)? {
        *busy.entry(rec::u64_at(&k, 1)?).or_default() += 1;
    }

    let initial = counters(state)?;
    let mut counters = initial.clone();
    let mut from = counters.cursor.clone();
    if from.first() != Some(&P_UNDER) {
        from = vec![P_UNDER];
    } else {
        from.push(0);
    }
    let mut rows = state.scan(&from, &[P_UNDER + 1], scan)?;
    if rows.len() < scan {
        // Wrap around to the entries before the cursor.
        let more = state.scan(&[P_UNDER], &from, scan - rows.len())?;
        rows.extend(more);
    }
    counters.cursor = match rows.last() {
        Some((k, _)) if rows.len() >= scan => k.clone(),
        _ => Vec::new(),
    };
    let whole_queue = rows.len() < scan;
    // Servers that still hold a placement of a queued chunk.
    let mut still_placed: BTreeSet<u64> = BTreeSet::new();
    let mut assigned = 0usize;
    for (k, v) in rows {
        let (ino, index) = (rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?);
        let mut u: UnderRec = rec::decode(&k, &v)?;
        let before = u.clone();
        let Some(c) = rec::get::<ChunkRec>(state, &chunk_key(ino, index))? else {
            forget(state, ino, index)?;
            continue;
        };
        let layout = layout_of(state, ino)?;
        if !needs_work(&c, &states, layout.copies()) {
            forget(state, ino, index)?;
            continue;
        }
        still_placed.extend(c.replicas.iter().map(|p| p.server_id));
        if let Some(t) = &u.task {
            let target_up = states.get(&t.target).map(String::as_str) == Some(STATE_UP);
            if target_up && rec::ts_nanos(&t.deadline) > now {
                continue; // in progress
            }
            let why = if target_up {
                format!("server {} did not finish in time", t.target)
            } else {
                format!("server {} went down while copying", t.target)
            };
            let t = t.clone();
            if let Some(n) = busy.get_mut(&t.target) {
                *n = n.saturating_sub(1);
            }
            drop_task(state, &mut u);
            if !c.replicas.iter().any(|p| p.server_id == t.target) {
                queue_delete(state, t.target, t.chunk_id, t.version)?;
            }
            counters.failed = counters.failed.saturating_add(1);
            u.note = format!("repair task {} abandoned: {why}", t.id);
        }
        let waiting = u.not_before.as_ref().is_some_and(|t| t.as_nanos() > now);
        if !waiting && assigned < MAX_ASSIGN_PER_TICK {
            // A drain move (every copy good) waits for the writer of an open epoch: it may
            // still write this version to the copy that would be dropped.
            let writer = if c.replicas.iter().all(|p| good(p, &states)) && c.epoch_handle != 0 {
                rec::get::<HandleRec>(state, &rec::key_u64(rec::P_HANDLE, c.epoch_handle))?
                    .map(|_| c.epoch_handle)
            } else {
                None
            };
            match plan(ctx, &servers, &states, &layout, &c, &busy, writer) {
                Ok(mut t) => {
                    counters.next_task = counters.next_task.max(1);
                    t.id = counters.next_task;
                    counters.next_task = counters.next_task.saturating_add(1);
                    // A deletion of this id queued earlier for the target must not remove
                    // the copy it is about to make.
                    state.delete(delete_key(t.target, t.chunk_id));
                    rec::put(
                        state,
                        target_key(t.target, t.id),
                        &ChunkOwner { ino, index },
                    );
                    *busy.entry(t.target).or_default() += 1;
                    assigned += 1;
                    u.task = Some(t);
                    u.not_before = None;
                }
                Err(why) => u.note = why,
            }
        }
        if u != before {
            rec::put(state, k, &u);
        }
    }
    if counters != initial {
        rec::put(state, K_COUNTERS.to_vec(), &counters);
    }
    if whole_queue {
        for (id, st) in &states {
            if st == STATE_DRAINING && !still_placed.contains(id) {
                drain::finish(state, *id)?;
            }
        }
    }
    Ok(Reply::default())
}

/// A task for chunk `c` (id filled in by the caller), or why none can be given now.
fn plan(
    ctx: &Ctx,
    servers: &[ChunkServerRecord],
    states: &BTreeMap<u64, String>,
    layout: &Layout,
    c: &ChunkRec,
    busy: &BTreeMap<u64, usize>,
    writer: Option<u64>,
) -> Result<TaskRec, String> {
    let sources: Vec<ChunkPlacement> = c
        .replicas
        .iter()
        .filter(|p| good(p, states))
        .cloned()
        .collect();
    let need = if layout.ec_data == 0 {
        1
    } else {
        layout.ec_data as usize
    };
    if sources.len() < need {
        return Err(format!(
            "only {} good {} of {} needed: cannot rebuild until a server holding one comes back",
            sources.len(),
            if layout.ec_data == 0 {
                "copies"
            } else {
                "shards"
            },
            need
        ));
    }
    // A missing copy first; else the copy on a draining server, which stays current (and
    // counted) until its replacement is accepted.
    let bad = match c.replicas.iter().position(|p| !good(p, states)) {
        Some(i) => i,
        None => match c.replicas.iter().position(|p| leaving(p, states)) {
            Some(i) => {
                if let Some(h) = writer {
                    return Err(format!(
                        "waiting for the writer: handle {h} started the chunk's write epoch and is still open; it moves off draining server {} once that handle is closed",
                        c.replicas[i].server_id
                    ));
                }
                i
            }
            None => {
                return Err(format!(
                    "the chunk has {} placements for a layout of {}; run `kerfsctl repair --now` after checking the metadata",
                    c.replicas.len(),
                    layout.copies()
                ))
            }
        },
    };
    let bytes = placement_bytes(layout);
    let Some(target) = pick_target(servers, c, bad, bytes, true, busy, None) else {
        return Err(
            "no chunk server is up with room that holds no copy of this chunk (or all are busy); start another chunk server"
                .to_string(),
        );
    };
    let p = &c.replicas[bad];
    Ok(TaskRec {
        id: 0,
        target,
        old_server: p.server_id,
        chunk_id: p.chunk_id,
        shard_index: p.shard_index,
        version: c.version,
        writes: c.writes,
        deadline: Some(add_ns(&ctx.now, TASK_TIMEOUT_NS)),
        sources: sources
            .into_iter()
            .map(|s| ChunkPlacement {
                address: String::new(),
                ..s
            })
            .collect(),
    })
}

/// The repair orders for `server`, for its heartbeat reply.
pub(super) fn orders_for(state: &dyn KvRead, server: u64) -> R<Vec<ChunkRepairOrder>> {
    let rows = state.scan(
        &rec::key_u64(P_TARGET, server),
        &rec::end_u64(P_TARGET, server),
        MAX_ORDERS_PER_HEARTBEAT,
    )?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let servers: Vec<ChunkServerRecord> = all_servers(state)?.into_iter().map(|(_, s)| s).collect();
    let addr = addresses(&servers);
    let mut out = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let o: ChunkOwner = rec::decode(&k, &v)?;
        let Some(t) = rec::get::<UnderRec>(state, &under_key(o.ino, o.index))?.and_then(|u| u.task)
        else {
            continue;
        };
        if t.target != server {
            continue;
        }
        let layout = layout_of(state, o.ino)?;
        out.push(ChunkRepairOrder {
            task_id: t.id,
            ino: o.ino,
            index: o.index,
            chunk_id: t.chunk_id,
            version: t.version,
            shard_index: t.shard_index,
            sources: t
                .sources
                .iter()
                .map(|p| ChunkRepairSource {
                    address: addr.get(&p.server_id).cloned().unwrap_or_default(),
                    chunk_id: p.chunk_id,
                    shard_index: p.shard_index,
                })
                .collect(),
            ec_data: layout.ec_data,
            ec_parity: layout.ec_parity,
        });
    }
    Ok(out)
}

/// Outcomes reported by `server`: accepted copies become current placements (the replaced
/// one is queued for deletion); refused ones are thrown away.
pub(super) fn completed(
    ctx: &Ctx,
    state: &mut Overlay<'_>,
    server: u64,
    done: &[ChunkRepairDone],
) -> R<()> {
    if done.is_empty() {
        return Ok(());
    }
    let mut counters = counters(state)?;
    for d in done {
        let ukey = under_key(d.ino, d.index);
        let Some(mut u) = rec::get::<UnderRec>(state, &ukey)? else {
            continue;
        };
        let Some(t) = u.task.clone() else { continue };
        if t.id != d.task_id || t.target != server {
            continue; // an old task's late report: the current one is elsewhere
        }
        drop_task(state, &mut u);
        let ckey = chunk_key(d.ino, d.index);
        let chunk = rec::get::<ChunkRec>(state, &ckey)?;
        let mut accepted = false;
        let mut why = d.message.clone();
        if let Some(mut c) = chunk.clone() {
            let slot = c.replicas.iter().position(|p| {
                p.server_id == t.old_server
                    && p.chunk_id == t.chunk_id
                    && p.shard_index == t.shard_index
            });
            if !d.ok {
                why = format!("the server could not make the copy: {}", d.message);
            } else if d.version != t.version || c.version != t.version || c.writes != t.writes {
                why = "the chunk was written while it was copied; copying again".into();
            } else if let Some(j) = slot {
                let layout = layout_of(state, d.ino)?;
                let bytes = placement_bytes(&layout);
                if t.old_server != t.target {
                    queue_delete(state, t.old_server, t.chunk_id, c.version)?;
                    if let Some((r, mut s)) = load_server(state, t.old_server)? {
                        s.allocated_bytes = s.allocated_bytes.saturating_sub(bytes);
                        store_server(state, r, s);
                    }
                    if let Some((r, mut s)) = load_server(state, t.target)? {
                        s.allocated_bytes = s.allocated_bytes.saturating_add(bytes);
                        store_server(state, r, s);
                    }
                }
                c.replicas[j] = ChunkPlacement {
                    server_id: t.target,
                    address: String::new(),
                    chunk_id: t.chunk_id,
                    shard_index: t.shard_index,
                    current: true,
                    corrupt: false,
                };
                c.writes = c.writes.wrapping_add(1);
                rec::put(state, ckey.clone(), &c);
                accepted = true;
            } else {
                why = "the placement it replaced changed meanwhile".into();
            }
            if !accepted && !c.replicas.iter().any(|p| p.server_id == server) {
                queue_delete(state, server, t.chunk_id, t.version)?;
            }
        }
        if accepted {
            counters.repaired = counters.repaired.saturating_add(1);
            u.note = format!("task {} copied {} bytes to server {server}", t.id, d.bytes);
        } else {
            counters.failed = counters.failed.saturating_add(1);
            u.note = format!("task {} on server {server} failed: {why}", t.id);
        }
        rec::put(state, ukey, &u);
        match rec::get::<ChunkRec>(state, &ckey)? {
            Some(c) => note_chunk(state, d.ino, d.index, &c)?,
            None => forget(state, d.ino, d.index)?,
        }
    }
    rec::put(state, K_COUNTERS.to_vec(), &counters);
    // The server has free slots now: hand out the next tasks at once (they go back in this
    // very heartbeat's reply) instead of waiting for the leader's timer. A short walk: this
    // runs for every reporting heartbeat.
    assign(ctx, state, MAX_SCAN_ON_REPORT)?;
    Ok(())
}

/// A writer lost a replica mid-write and asks for another server in its place.
pub fn replace_replica(ctx: &Ctx, state: &mut Overlay<'_>, r: &ReplaceReplica) -> R<Reply> {
    let (_, inode) = writable_handle(ctx, state, r.handle)?;
    let ino = inode.ino();
    let key = chunk_key(ino, r.index);
    let Some(mut c) = rec::get::<ChunkRec>(state, &key)? else {
        return Err(Fail::new(
            libc::ENOENT,
            format!("file {ino} has no chunk {}", r.index),
        ));
    };
    if c.version != r.version {
        return Err(Fail::new(
            libc::ESTALE,
            format!(
                "chunk {} of file {ino} is at version {}, not {}: start a new write epoch",
                r.index, c.version, r.version
            ),
        ));
    }
    let Some(j) = c.replicas.iter().position(|p| p.server_id == r.server_id) else {
        return Err(Fail::new(
            libc::ENOENT,
            format!(
                "chunk {} of file {ino} has no placement on server {} (already replaced?)",
                r.index, r.server_id
            ),
        ));
    };
    let layout = layout_of(state, ino)?;
    let bytes = placement_bytes(&layout);
    let servers: Vec<ChunkServerRecord> = all_servers(state)?.into_iter().map(|(_, s)| s).collect();
    // In place (the same server, rewritten) only as the last resort: it is what a stale
    // but live member needs; for a dead one the writer's copy fails and repair takes over.
    // Not where a repair of this chunk may still be copying (its late writes would mix
    // with the writer's copy).
    let ukey = under_key(ino, r.index);
    let repairing_on = rec::get::<UnderRec>(state, &ukey)?
        .and_then(|u| u.task)
        .map(|t| t.target);
    let Some(target) = pick_target(&servers, &c, j, bytes, true, &BTreeMap::new(), repairing_on)
    else {
        return Err(Fail::new(
            libc::ENOSPC,
            format!(
                "no spare chunk server (up, with room, not already holding chunk {} of file {ino}); the write keeps fewer copies until repair restores them",
                r.index
            ),
        ));
    };
    let old = c.replicas[j].clone();
    state.delete(delete_key(target, old.chunk_id));
    if target != old.server_id {
        queue_delete(state, old.server_id, old.chunk_id, c.version)?;
        if let Some((rr, mut s)) = load_server(state, old.server_id)? {
            s.allocated_bytes = s.allocated_bytes.saturating_sub(bytes);
            store_server(state, rr, s);
        }
        if let Some((rr, mut s)) = load_server(state, target)? {
            s.allocated_bytes = s.allocated_bytes.saturating_add(bytes);
            store_server(state, rr, s);
        }
    }
    // Not current until the writer's commit names it (it has no data yet).
    c.replicas[j] = ChunkPlacement {
        server_id: target,
        address: String::new(),
        chunk_id: old.chunk_id,
        shard_index: old.shard_index,
        current: false,
        corrupt: false,
    };
    c.writes = c.writes.wrapping_add(1);
    rec::put(state, key, &c);
    note_chunk(state, ino, r.index, &c)?;
    if let Some(mut u) = rec::get::<UnderRec>(state, &ukey)? {
        drop_task(state, &mut u);
        u.not_before = Some(add_ns(&ctx.now, WRITER_GRACE_NS));
        u.note = format!("writer is copying it to server {target}");
        rec::put(state, ukey, &u);
    }
    let addr = addresses(&servers);
    Ok(Reply {
        attr: Some(inode.attr),
        layout: Some(layout),
        chunks: vec![with_addresses(&c, r.index, false, &addr)],
        ..Default::default()
    })
}

/// The repair queue for kerfsctl.
pub fn status(state: &dyn KvRead, r: &RepairStatus) -> R<Reply> {
    let limit = match r.limit {
        0 => 100,
        n => n as usize,
    };
    let states = server_states(state)?;
    let counters = counters(state)?;
    let mut report = RepairReport {
        repaired_total: counters.repaired,
        failed_total: counters.failed,
        draining_servers: states.values().filter(|s| *s == STATE_DRAINING).count() as u64,
        ..Default::default()
    };
    let mut pages = rec::Pages::new(vec![P_UNDER], vec![P_UNDER + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let (ino, index) = (rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?);
            let u: UnderRec = rec::decode(&k, &v)?;
            let Some(c) = rec::get::<ChunkRec>(state, &chunk_key(ino, index))? else {
                continue;
            };
            let layout = layout_of(state, ino)?;
            let wanted = layout.copies();
            let good = good_count(&c, &states);
            if good >= wanted {
                if c.replicas.iter().any(|p| leaving(p, &states)) {
                    report.to_move += 1;
                }
                continue; // healthy (or only to move off a draining server)
            }
            report.under_replicated += 1;
            if good < layout.readable_with() {
                report.unreadable += 1;
            }
            if u.task.is_some() {
                report.repairing += 1;
            }
            if report.chunks.len() < limit {
                report.chunks.push(UnderReplicatedChunk {
                    ino,
                    index,
                    good: good as u32,
                    wanted: wanted as u32,
                    task: u.task.map(|t| RepairTaskInfo {
                        task_id: t.id,
                        target_server: t.target,
                        old_server: t.old_server,
                        chunk_id: t.chunk_id,
                        shard_index: t.shard_index,
                        version: t.version,
                        deadline: t.deadline,
                    }),
                    note: u.note,
                });
            }
        }
    }
    Ok(Reply {
        repair: Some(report),
        ..Default::default()
    })
}
