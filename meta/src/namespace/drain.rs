//! Chunk servers that leave: draining (moving every placement off a server) and removal.
//!
//! [`drain`] marks a server "draining" and puts every chunk with a placement there in the
//! repair queue. There is one mover: the repair path ([`super::repair`]) treats a copy on a
//! draining server as good (it is still read and written, so the chunk keeps its redundancy)
//! but as one to replace, and hands out a copy task for it like for a missing copy; the
//! draining copy is dropped (queued for deletion) only when the new one is made and accepted
//! under the chunk's version. A write epoch still open on the chunk makes the move wait (the
//! writer could still write the copy that would be dropped); a commit meanwhile makes the
//! copy worthless and the move is retried. Draining servers are never chosen for new
//! placements. When a walk of the whole queue finds nothing left on a draining server,
//! [`finish`] checks the chunk tables once more and marks it "drained".
//!
//! [`remove`] takes a server out for good ("removed"). It is refused while a chunk would
//! lose redundancy without the server (a good copy there that the others do not make up for)
//! or while the server, down, holds the last copy of anything.
//!
//! Deterministic like the rest of the state machine: key-order walks only.

use kerfs_proto::{
    ChunkPlacement, DrainChunkServer, DrainReport, DrainStatus, RemoveChunkServer, Reply,
};

use super::chunks::{
    chunk_key, layout_of, load_server, store_server, STATE_DOWN, STATE_DRAINED, STATE_DRAINING,
    STATE_REMOVED, STATE_UP,
};
use super::records::{self as rec, ChunkRec};
use super::repair::{self, UnderRec, P_UNDER};
use super::{Ctx, Fail, R};
use crate::store::{KvRead, Overlay};

/// Distinct notes a drain report carries at most.
const MAX_NOTES: usize = 5;

fn unknown(id: u64) -> Fail {
    Fail::new(
        libc::ENOENT,
        format!("no chunk server {id} is registered; `kerfsctl nodes` lists them"),
    )
}

fn on(c: &ChunkRec, server: u64) -> Option<&ChunkPlacement> {
    c.replicas.iter().find(|p| p.server_id == server)
}

/// Starts (or, when already under way, confirms) the drain of a server.
pub fn drain(ctx: &Ctx, state: &mut Overlay<'_>, d: &DrainChunkServer) -> R<Reply> {
    let id = d.server_id;
    let Some((mut r, mut s)) = load_server(state, id)? else {
        return Err(unknown(id));
    };
    if s.state == STATE_REMOVED {
        return Err(Fail::new(
            libc::EINVAL,
            format!("chunk server {id} was removed from the cluster; there is nothing to drain"),
        ));
    }
    r.drain = true;
    if s.state == STATE_UP {
        s.state = STATE_DRAINING.into();
    }
    // A server that is down keeps the request: it drains when it comes back (meanwhile its
    // copies count as missing and are repaired elsewhere anyway).
    let draining = s.state == STATE_DRAINING;
    store_server(state, r, s);
    if draining {
        repair::scan_chunks(state, |c| on(c, id).is_some())?;
        // Hand out the first moves now rather than at the leader's next tick (and end a
        // drain with nothing to move at once).
        repair::assign(ctx, state, repair::MAX_SCAN_ON_REPORT)?;
    }
    Ok(Reply {
        server_id: id,
        drain: Some(report(state, id)?),
        ..Default::default()
    })
}

/// A walk of the whole repair queue found nothing left on draining server `id`: unless the
/// chunk tables say otherwise (then those chunks are queued again), it is drained.
pub(super) fn finish(state: &mut Overlay<'_>, id: u64) -> R<()> {
    let mut left = Vec::new();
    let mut pages = rec::Pages::new(vec![rec::P_CHUNK], vec![rec::P_CHUNK + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let c: ChunkRec = rec::decode(&k, &v)?;
            if on(&c, id).is_some() {
                left.push((rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?, c));
            }
        }
    }
    if !left.is_empty() {
        for (ino, index, c) in left {
            repair::note_chunk(state, ino, index, &c)?;
        }
        return Ok(());
    }
    if let Some((r, mut s)) = load_server(state, id)? {
        if s.state == STATE_DRAINING {
            s.state = STATE_DRAINED.into();
            store_server(state, r, s);
        }
    }
    Ok(())
}

/// Takes a server out of the cluster, unless a chunk still needs it.
pub fn remove(_ctx: &Ctx, state: &mut Overlay<'_>, rm: &RemoveChunkServer) -> R<Reply> {
    let id = rm.server_id;
    let Some((mut r, mut s)) = load_server(state, id)? else {
        return Err(unknown(id));
    };
    let done = Reply {
        server_id: id,
        ..Default::default()
    };
    if s.state == STATE_REMOVED {
        return Ok(done);
    }
    let states = repair::server_states(state)?;
    let live = |server: u64| {
        matches!(
            states.get(&server).map(String::as_str),
            Some(STATE_UP) | Some(STATE_DRAINING)
        )
    };
    let (mut needed, mut last) = (0u64, 0u64);
    let mut placed = Vec::new();
    let mut layout_cache: Option<(u64, kerfs_proto::Layout)> = None;
    let mut pages = rec::Pages::new(vec![rec::P_CHUNK], vec![rec::P_CHUNK + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let c: ChunkRec = rec::decode(&k, &v)?;
            let Some(p) = on(&c, id) else { continue };
            let (ino, index) = (rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?);
            let layout = match &layout_cache {
                Some((i, l)) if *i == ino => *l,
                _ => {
                    let l = layout_of(state, ino)?;
                    layout_cache = Some((ino, l));
                    l
                }
            };
            let others = c
                .replicas
                .iter()
                .filter(|q| q.server_id != id && q.current && live(q.server_id))
                .count();
            let last_copy = p.current && others < layout.readable_with();
            let redundancy = p.current && live(id) && others < layout.copies();
            if last_copy || redundancy {
                needed += 1;
            }
            if last_copy {
                last += 1;
            }
            placed.push((ino, index));
        }
    }
    if needed > 0 {
        let addr = s
            .info
            .as_ref()
            .map(|i| i.address.clone())
            .unwrap_or_default();
        let what = if s.state == STATE_DOWN {
            format!(
                "it is down and holds the last readable copy of {last} chunks: bring it back \
                 (then `kerfsctl node drain {id} --wait`), or it takes that data with it"
            )
        } else {
            format!(
                "{needed} of its chunk copies are needed ({last} of them the last readable \
                 copy): run `kerfsctl node drain {id} --wait` first, then remove it"
            )
        };
        return Err(Fail::new(
            libc::EBUSY,
            format!("chunk server {id} ({addr}) cannot be removed: {what}"),
        ));
    }
    s.state = STATE_REMOVED.into();
    r.drain = false;
    r.want_full_report = false;
    store_server(state, r, s);
    // Deletions it will never pick up.
    let mut pages = rec::Pages::new(
        rec::key_u64(rec::P_DELETE, id),
        rec::end_u64(rec::P_DELETE, id),
        1024,
    );
    while let Some(rows) = pages.next_page(state)? {
        for (k, _) in rows {
            state.delete(k);
        }
    }
    // Leftover placements there (stale, or redundant copies) are missing from now on.
    for (ino, index) in placed {
        if let Some(c) = rec::get::<ChunkRec>(state, &chunk_key(ino, index))? {
            repair::note_chunk(state, ino, index, &c)?;
        }
    }
    Ok(done)
}

/// How the drain of a server stands, from the repair queue (every chunk with a placement on
/// a draining server is in it).
fn report(state: &dyn KvRead, id: u64) -> R<DrainReport> {
    let Some((r, s)) = load_server(state, id)? else {
        return Err(unknown(id));
    };
    let mut out = DrainReport {
        server_id: id,
        state: s.state.clone(),
        requested: r.drain,
        ..Default::default()
    };
    let mut pages = rec::Pages::new(vec![P_UNDER], vec![P_UNDER + 1], 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let (ino, index) = (rec::u64_at(&k, 1)?, rec::u64_at(&k, 9)?);
            let Some(c) = rec::get::<ChunkRec>(state, &chunk_key(ino, index))? else {
                continue;
            };
            if on(&c, id).is_none() {
                continue;
            }
            out.chunks_left += 1;
            let u: UnderRec = rec::decode(&k, &v)?;
            match u.task {
                Some(t) if t.old_server == id => out.moving += 1,
                _ => {
                    if !u.note.is_empty()
                        && out.notes.len() < MAX_NOTES
                        && !out.notes.contains(&u.note)
                    {
                        out.notes.push(u.note);
                    }
                }
            }
        }
    }
    Ok(out)
}

pub fn status(state: &dyn KvRead, d: &DrainStatus) -> R<Reply> {
    Ok(Reply {
        server_id: d.server_id,
        drain: Some(report(state, d.server_id)?),
        ..Default::default()
    })
}
