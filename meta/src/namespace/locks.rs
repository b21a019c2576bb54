//! Record locks: fcntl(2) POSIX locks and flock(2) BSD locks, held in the replicated state
//! so that they hold across every mount of the cluster.
//!
//! The rules are Linux's (`fs/locks.c`):
//! - two namespaces, POSIX and FLOCK, that never conflict with each other;
//! - an owner is (client session, kernel lock owner, kind); a lock never conflicts with
//!   its own owner's locks, it replaces them: setting a range splits the owner's locks of
//!   the other type around it and merges with the owner's overlapping or adjacent locks of
//!   the same type (so an upgrade from read to write is one atomic step);
//! - read locks share, a write lock excludes every other owner's lock on the bytes it
//!   covers; a request never waits here (EAGAIN) — waiting is the mount's job, which
//!   retries, so a blocked waiter never holds up the state machine.
//!
//! Every lock is taken through an open handle and dies with it: the handle's close (and
//! therefore the expiry of a dead client, which closes its handles) drops it. POSIX locks
//! of a process also go when it closes any descriptor of the file: the mount sends
//! [`ReleaseLocks`] from FUSE flush.
//!
//! Deadlocks: a refused F_SETLKW of a POSIX lock records its owner as waiting (a
//! [`LockWait`] that lives a few seconds unless the waiting mount repeats the request).
//! A new refused F_SETLKW whose holders wait, directly or through a chain of waiters, for
//! the requester gets EDEADLK, as on Linux (which also looks only so far along the chain).

use std::collections::BTreeSet;

use kerfs_proto::{
    CancelLockWait, FileLock, GetLock, LockKind, LockType, ReleaseLocks, Reply, SetLock, Timespec,
};

use super::records::{self as rec, HandleRec, LockSet, LockWait};
use super::sessions::add_ms;
use super::{Ctx, Fail, R};
use crate::store::{KvRead, Overlay};

/// Most locks one file may carry (all owners together): bounds the record a command
/// rewrites. Beyond it a new lock fails with ENOLCK, as the kernel's lock table would.
pub const MAX_LOCKS_PER_FILE: usize = 4096;

/// How long a waiter stays recorded without repeating its request (the mount repeats it
/// every second).
pub const WAIT_RECORD_MS: u64 = 3_000;

/// How many waiting owners the deadlock search visits before it gives up (and answers
/// EAGAIN: no deadlock found). Linux stops after 10.
const MAX_DEADLOCK_STEPS: usize = 64;

fn key(ino: u64) -> Vec<u8> {
    rec::key_u64(rec::P_LOCKS, ino)
}

fn load(state: &dyn KvRead, ino: u64) -> R<Vec<FileLock>> {
    Ok(rec::get::<LockSet>(state, &key(ino))?
        .map(|s| s.locks)
        .unwrap_or_default())
}

fn store(state: &mut Overlay<'_>, ino: u64, mut locks: Vec<FileLock>) {
    if locks.is_empty() {
        // No record for a file without locks: the common case costs nothing to keep.
        state.delete(key(ino));
    } else {
        sort(&mut locks);
        rec::put(state, key(ino), &LockSet { locks });
    }
}

/// The stored order (deterministic replicas, and the F_GETLK answer is the first conflict).
fn sort(locks: &mut [FileLock]) {
    locks.sort_by_key(|l| (l.kind, l.start, l.end, l.client_id, l.owner));
}

fn same_owner(a: &FileLock, b: &FileLock) -> bool {
    a.client_id == b.client_id && a.owner == b.owner && a.kind == b.kind
}

fn overlaps(a: &FileLock, b: &FileLock) -> bool {
    a.start <= b.end && b.start <= a.end
}

/// `a` ends right before `b` starts or the other way round.
fn adjacent(a: &FileLock, b: &FileLock) -> bool {
    a.end.checked_add(1) == Some(b.start) || b.end.checked_add(1) == Some(a.start)
}

/// Whether `held` stops `want` (same namespace, another owner, shared bytes, a writer).
pub fn conflicts(held: &FileLock, want: &FileLock) -> bool {
    held.kind == want.kind
        && !same_owner(held, want)
        && overlaps(held, want)
        && (held.r#type == LockType::Write as i32 || want.r#type == LockType::Write as i32)
}

/// The first lock of `locks` that stops `want`.
pub fn first_conflict<'a>(locks: &'a [FileLock], want: &FileLock) -> Option<&'a FileLock> {
    locks.iter().find(|l| conflicts(l, want))
}

/// Applies `req` (a read or write lock, or an unlock of its range) to `locks` with POSIX
/// rules. On conflict, `locks` is left as it was and the conflicting lock comes back.
pub fn apply(locks: &mut Vec<FileLock>, req: &FileLock) -> Result<(), FileLock> {
    let unlock = req.r#type == LockType::Unlock as i32;
    if !unlock {
        if let Some(c) = first_conflict(locks, req) {
            return Err(*c);
        }
    }
    let mut merged = *req;
    let mut out = Vec::with_capacity(locks.len() + 2);
    for l in locks.drain(..) {
        if !same_owner(&l, req) || !(overlaps(&l, req) || adjacent(&l, req)) {
            out.push(l);
            continue;
        }
        if !unlock && l.r#type == req.r#type {
            // Same type, touching: one lock covers both. The owner's same-type locks never
            // touch each other (this merge keeps it so), so one pass finds them all.
            merged.start = merged.start.min(l.start);
            merged.end = merged.end.max(l.end);
            continue;
        }
        if !overlaps(&l, req) {
            out.push(l); // adjacent, other type: untouched
            continue;
        }
        // The request's range is cut out of the owner's lock; what sticks out stays.
        if l.start < req.start {
            out.push(FileLock {
                end: req.start - 1,
                ..l
            });
        }
        if l.end > req.end {
            out.push(FileLock {
                start: req.end + 1,
                ..l
            });
        }
    }
    if !unlock {
        out.push(merged);
    }
    sort(&mut out);
    *locks = out;
    Ok(())
}

fn lock_type(t: i32, allow_unlock: bool) -> R<LockType> {
    match LockType::try_from(t) {
        Ok(LockType::Unlock) if !allow_unlock => Err(Fail::new(
            libc::EINVAL,
            "a lock query needs a read or write type",
        )),
        Ok(t) => Ok(t),
        Err(_) => Err(Fail::new(libc::EINVAL, format!("unknown lock type {t}"))),
    }
}

fn lock_kind(k: i32) -> R<LockKind> {
    LockKind::try_from(k).map_err(|_| Fail::new(libc::EINVAL, format!("unknown lock kind {k}")))
}

fn check_range(start: u64, end: u64) -> R<()> {
    if start > end {
        return Err(Fail::new(
            libc::EINVAL,
            format!("lock range {start}..={end} ends before it starts"),
        ));
    }
    Ok(())
}

/// The caller's own open handle (locks are per session: another client's handle is EBADF).
fn own_handle(ctx: &Ctx, state: &dyn KvRead, handle: u64) -> R<HandleRec> {
    if ctx.client_id == 0 {
        return Err(Fail::new(
            libc::EINVAL,
            "locks belong to a client session; this command has none",
        ));
    }
    match rec::get::<HandleRec>(state, &rec::key_u64(rec::P_HANDLE, handle))? {
        Some(h) if h.client_id == ctx.client_id => Ok(h),
        Some(_) => Err(Fail::new(
            libc::EBADF,
            format!("handle {handle} belongs to another client session"),
        )),
        None => Err(Fail::new(libc::EBADF, format!("no open handle {handle}"))),
    }
}

/// F_SETLK: take, change or release a lock without waiting.
pub fn set_lock(ctx: &Ctx, state: &mut Overlay<'_>, s: &SetLock) -> R<Reply> {
    let h = own_handle(ctx, state, s.handle)?;
    lock_type(s.r#type, true)?;
    lock_kind(s.kind)?;
    check_range(s.start, s.end)?;
    let req = FileLock {
        client_id: ctx.client_id,
        owner: s.owner,
        handle: s.handle,
        pid: s.pid,
        start: s.start,
        end: s.end,
        r#type: s.r#type,
        kind: s.kind,
    };
    let mut locks = load(state, h.ino)?;
    let me = (ctx.client_id, s.owner);
    if let Err(c) = apply(&mut locks, &req) {
        if s.wait && s.kind == LockKind::Posix as i32 {
            if deadlock(ctx, state, me, &locks, &req)? {
                return Err(Fail::new(
                    libc::EDEADLK,
                    format!(
                        "waiting for bytes {}..={} of inode {} would deadlock: their holders \
                         wait for this lock owner",
                        s.start, s.end, h.ino
                    ),
                ));
            }
            let wait = LockWait {
                ino: h.ino,
                start: s.start,
                end: s.end,
                r#type: s.r#type,
                expires: Some(add_ms(ctx.now, WAIT_RECORD_MS)),
            };
            rec::put(state, wait_key(me), &wait);
            // Refused, but with the wait record kept: an Err would drop every write.
            return Ok(Reply::error(
                libc::EAGAIN,
                format!(
                    "bytes {}..={} of inode {} are locked by pid {} of client {} (waiting)",
                    c.start, c.end, h.ino, c.pid, c.client_id
                ),
            ));
        }
        return Err(Fail::new(
            libc::EAGAIN,
            format!(
                "bytes {}..={} of inode {} are locked by pid {} of client {}",
                c.start, c.end, h.ino, c.pid, c.client_id
            ),
        ));
    }
    if state.get(&wait_key(me))?.is_some() {
        state.delete(wait_key(me));
    }
    if locks.len() > MAX_LOCKS_PER_FILE {
        return Err(Fail::new(
            libc::ENOLCK,
            format!(
                "inode {} would carry more than {MAX_LOCKS_PER_FILE} locks",
                h.ino
            ),
        ));
    }
    store(state, h.ino, locks);
    Ok(Reply::default())
}

/// Close of a descriptor: every lock of the owner on the handle's file goes.
pub fn release_locks(ctx: &Ctx, state: &mut Overlay<'_>, r: &ReleaseLocks) -> R<Reply> {
    let h = own_handle(ctx, state, r.handle)?;
    lock_kind(r.kind)?;
    let mut locks = load(state, h.ino)?;
    let before = locks.len();
    locks.retain(|l| !(l.client_id == ctx.client_id && l.owner == r.owner && l.kind == r.kind));
    if locks.len() != before {
        store(state, h.ino, locks);
    }
    if state.get(&wait_key((ctx.client_id, r.owner)))?.is_some() {
        state.delete(wait_key((ctx.client_id, r.owner)));
    }
    Ok(Reply::default())
}

/// The owner stopped waiting (a signal): it no longer takes part in deadlocks.
pub fn cancel_wait(ctx: &Ctx, state: &mut Overlay<'_>, c: &CancelLockWait) -> R<Reply> {
    let key = wait_key((ctx.client_id, c.owner));
    if state.get(&key)?.is_some() {
        state.delete(key);
    }
    Ok(Reply::default())
}

/// A client session ends: its owners wait for nothing any more.
pub fn drop_client_waits(state: &mut Overlay<'_>, client: u64) -> R<()> {
    rec::delete_range(
        state,
        &rec::key_u64(rec::P_LOCK_WAIT, client),
        &rec::end_u64(rec::P_LOCK_WAIT, client),
    )
}

/// Drops the wait records whose waiter stopped asking (with the leader's client expiry
/// sweep, so a record whose cancel was lost does not stay in the state).
pub fn expire_waits(ctx: &Ctx, state: &mut Overlay<'_>) -> R<()> {
    for k in stale_waits(state, &ctx.now)? {
        state.delete(k);
    }
    Ok(())
}

/// Keys of the wait records that expired before `now`.
pub fn stale_waits(state: &dyn KvRead, now: &Timespec) -> R<Vec<Vec<u8>>> {
    let mut stale = Vec::new();
    let mut pages = rec::Pages::new(vec![rec::P_LOCK_WAIT], vec![rec::P_LOCK_WAIT + 1], 512);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let w: LockWait = rec::decode(&k, &v)?;
            if rec::ts_nanos(&w.expires) < now.as_nanos() {
                stale.push(k);
            }
        }
    }
    Ok(stale)
}

fn wait_key((client, owner): (u64, u64)) -> Vec<u8> {
    rec::key_u64_u64(rec::P_LOCK_WAIT, client, owner)
}

/// Whether the POSIX owners holding what `want` (of owner `me`) needs wait, directly or
/// through other waiting owners, for `me`. `locks` are the file's locks.
fn deadlock(
    ctx: &Ctx,
    state: &dyn KvRead,
    me: (u64, u64),
    locks: &[FileLock],
    want: &FileLock,
) -> R<bool> {
    let holders = |locks: &[FileLock], want: &FileLock| -> Vec<(u64, u64)> {
        locks
            .iter()
            .filter(|l| conflicts(l, want))
            .map(|l| (l.client_id, l.owner))
            .collect()
    };
    let mut stack = holders(locks, want);
    let mut seen = BTreeSet::new();
    while let Some(h) = stack.pop() {
        if h == me {
            return Ok(true);
        }
        if !seen.insert(h) {
            continue;
        }
        if seen.len() > MAX_DEADLOCK_STEPS {
            return Ok(false);
        }
        let Some(w) = rec::get::<LockWait>(state, &wait_key(h))? else {
            continue;
        };
        if rec::ts_nanos(&w.expires) < ctx.now.as_nanos() {
            continue; // stale: that waiter went away without telling
        }
        let theirs = FileLock {
            client_id: h.0,
            owner: h.1,
            start: w.start,
            end: w.end,
            r#type: w.r#type,
            kind: LockKind::Posix as i32,
            ..Default::default()
        };
        stack.extend(holders(&load(state, w.ino)?, &theirs));
    }
    Ok(false)
}

/// The handle is closed (by its client or by the expiry of a dead one): its locks go.
pub fn drop_handle(state: &mut Overlay<'_>, ino: u64, handle: u64) -> R<()> {
    let mut locks = load(state, ino)?;
    let before = locks.len();
    locks.retain(|l| l.handle != handle);
    if locks.len() != before {
        store(state, ino, locks);
    }
    Ok(())
}

/// F_GETLK: the first lock of another owner that would stop the one described.
pub fn get_lock(state: &dyn KvRead, g: &GetLock) -> R<Reply> {
    lock_type(g.r#type, false)?;
    lock_kind(g.kind)?;
    check_range(g.start, g.end)?;
    let want = FileLock {
        client_id: g.client_id,
        owner: g.owner,
        start: g.start,
        end: g.end,
        r#type: g.r#type,
        kind: g.kind,
        ..Default::default()
    };
    let locks = load(state, g.ino)?;
    Ok(Reply {
        lock: first_conflict(&locks, &want).copied(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOF: u64 = i64::MAX as u64;

    fn lk(owner: u64, start: u64, end: u64, t: LockType) -> FileLock {
        FileLock {
            client_id: 1,
            owner,
            handle: 10 + owner,
            pid: 100 + owner as u32,
            start,
            end,
            r#type: t as i32,
            kind: LockKind::Posix as i32,
        }
    }

    /// (owner, start, end, type) of every lock, in stored order.
    fn shape(locks: &[FileLock]) -> Vec<(u64, u64, u64, i32)> {
        locks
            .iter()
            .map(|l| (l.owner, l.start, l.end, l.r#type))
            .collect()
    }

    const R_: i32 = LockType::Read as i32;
    const W_: i32 = LockType::Write as i32;

    #[test]
    fn unlock_in_the_middle_splits() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 99, LockType::Write)).unwrap();
        apply(&mut v, &lk(1, 40, 59, LockType::Unlock)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 39, W_), (1, 60, 99, W_)]);
        // Unlocking what is not locked is fine and changes nothing.
        apply(&mut v, &lk(1, 45, 50, LockType::Unlock)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 39, W_), (1, 60, 99, W_)]);
        // Unlock to EOF covering both.
        apply(&mut v, &lk(1, 10, EOF, LockType::Unlock)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 9, W_)]);
    }

    #[test]
    fn same_type_merges_adjacent_and_overlapping() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 9, LockType::Read)).unwrap();
        apply(&mut v, &lk(1, 20, 29, LockType::Read)).unwrap();
        assert_eq!(v.len(), 2);
        apply(&mut v, &lk(1, 10, 19, LockType::Read)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 29, R_)]);
        apply(&mut v, &lk(1, 25, 40, LockType::Read)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 40, R_)]);
    }

    #[test]
    fn other_type_in_the_middle_splits_in_three() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 99, LockType::Read)).unwrap();
        apply(&mut v, &lk(1, 10, 19, LockType::Write)).unwrap();
        assert_eq!(
            shape(&v),
            vec![(1, 0, 9, R_), (1, 10, 19, W_), (1, 20, 99, R_)]
        );
        // Downgrade it back: the three merge into one read lock again.
        apply(&mut v, &lk(1, 10, 19, LockType::Read)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 99, R_)]);
    }

    #[test]
    fn one_request_over_several_locks_of_the_owner() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 9, LockType::Read)).unwrap();
        apply(&mut v, &lk(1, 10, 19, LockType::Write)).unwrap();
        apply(&mut v, &lk(1, 20, 29, LockType::Read)).unwrap();
        apply(&mut v, &lk(1, 40, 49, LockType::Write)).unwrap();
        // Cuts both reads, swallows the write it overlaps, merges with the adjacent write.
        apply(&mut v, &lk(1, 5, 39, LockType::Write)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 4, R_), (1, 5, 49, W_)]);
        // An unlock across all of it leaves only what sticks out.
        apply(&mut v, &lk(1, 2, 47, LockType::Unlock)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 1, R_), (1, 48, 49, W_)]);
    }

    #[test]
    fn adjacent_lock_of_other_type_is_kept() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 9, LockType::Read)).unwrap();
        apply(&mut v, &lk(1, 10, 19, LockType::Write)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 9, R_), (1, 10, 19, W_)]);
    }

    #[test]
    fn readers_share_writers_exclude() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, EOF, LockType::Read)).unwrap();
        apply(&mut v, &lk(2, 0, 10, LockType::Read)).unwrap();
        let c = apply(&mut v, &lk(3, 5, 5, LockType::Write)).unwrap_err();
        assert_eq!(c.owner, 2, "the first conflicting lock in stored order");
        // A failed request changes nothing.
        assert_eq!(shape(&v), vec![(2, 0, 10, R_), (1, 0, EOF, R_)]);
        // Past owner 2's range only owner 1 is in the way.
        let c = apply(&mut v, &lk(2, 11, 20, LockType::Write)).unwrap_err();
        assert_eq!((c.owner, c.pid), (1, 101));
    }

    #[test]
    fn upgrade_needs_the_other_readers_gone() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 99, LockType::Read)).unwrap();
        apply(&mut v, &lk(2, 50, 59, LockType::Read)).unwrap();
        assert!(apply(&mut v, &lk(1, 0, 99, LockType::Write)).is_err());
        // Upgrading only the bytes nobody else reads works (and splits owner 1's lock).
        apply(&mut v, &lk(1, 0, 49, LockType::Write)).unwrap();
        assert_eq!(
            shape(&v),
            vec![(1, 0, 49, W_), (2, 50, 59, R_), (1, 50, 99, R_)]
        );
        apply(&mut v, &lk(2, 0, EOF, LockType::Unlock)).unwrap();
        apply(&mut v, &lk(1, 0, 99, LockType::Write)).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 99, W_)]);
    }

    #[test]
    fn disjoint_ranges_do_not_conflict() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 99, LockType::Write)).unwrap();
        apply(&mut v, &lk(2, 100, 199, LockType::Write)).unwrap();
        assert!(apply(&mut v, &lk(3, 99, 100, LockType::Read)).is_err());
        apply(&mut v, &lk(3, 200, EOF, LockType::Write)).unwrap();
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn posix_and_flock_are_separate_namespaces() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, EOF, LockType::Write)).unwrap();
        let flock = FileLock {
            kind: LockKind::Flock as i32,
            ..lk(2, 0, EOF, LockType::Write)
        };
        apply(&mut v, &flock).unwrap();
        let flock2 = FileLock { owner: 3, ..flock };
        assert_eq!(apply(&mut v, &flock2).unwrap_err().owner, 2);
        // The same owner number in the other namespace is another owner.
        let posix_as_2 = lk(2, 0, 0, LockType::Read);
        assert_eq!(apply(&mut v, &posix_as_2).unwrap_err().owner, 1);
    }

    #[test]
    fn same_owner_number_on_two_clients_are_two_owners() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, 9, LockType::Write)).unwrap();
        let other_client = FileLock {
            client_id: 2,
            ..lk(1, 0, 9, LockType::Write)
        };
        assert!(apply(&mut v, &other_client).is_err());
        // And unlocking from the other client does not touch the first one's lock.
        let unlock = FileLock {
            client_id: 2,
            ..lk(1, 0, EOF, LockType::Unlock)
        };
        apply(&mut v, &unlock).unwrap();
        assert_eq!(shape(&v), vec![(1, 0, 9, W_)]);
    }

    #[test]
    fn edges_at_zero_and_eof_do_not_overflow() {
        let mut v = Vec::new();
        apply(&mut v, &lk(1, 0, u64::MAX, LockType::Write)).unwrap();
        apply(&mut v, &lk(1, 0, 0, LockType::Unlock)).unwrap();
        apply(&mut v, &lk(1, u64::MAX, u64::MAX, LockType::Unlock)).unwrap();
        assert_eq!(shape(&v), vec![(1, 1, u64::MAX - 1, W_)]);
        apply(&mut v, &lk(1, u64::MAX, u64::MAX, LockType::Write)).unwrap();
        assert_eq!(shape(&v), vec![(1, 1, u64::MAX, W_)]);
    }

    /// `apply` against a byte-by-byte model on a small file: every byte knows which owner
    /// holds it how. Random requests of 4 owners (two clients, both kinds); after each,
    /// the locks must cover exactly the model's bytes, and each owner's locks must be
    /// disjoint and fully merged (no two of one type touching).
    #[test]
    fn random_requests_match_a_byte_model() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeMap;

        const BYTES: u64 = 48;
        type Owner = (u64, u64, i32); // client, owner, kind
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut v: Vec<FileLock> = Vec::new();
            // byte -> owner -> type
            let mut model: Vec<BTreeMap<Owner, i32>> = vec![BTreeMap::new(); BYTES as usize];
            for step in 0..200 {
                let who = rng.gen_range(0..4u64);
                let kind = if rng.gen_bool(0.8) {
                    LockKind::Posix
                } else {
                    LockKind::Flock
                };
                let start = rng.gen_range(0..BYTES);
                let end = rng.gen_range(start..BYTES);
                let t = match rng.gen_range(0..3) {
                    0 => LockType::Read,
                    1 => LockType::Write,
                    _ => LockType::Unlock,
                };
                let req = FileLock {
                    client_id: 1 + who / 2,
                    owner: who % 2,
                    handle: who,
                    pid: 0,
                    start,
                    end,
                    r#type: t as i32,
                    kind: kind as i32,
                };
                let me: Owner = (req.client_id, req.owner, req.kind);
                let w = LockType::Write as i32;
                let blocked = t != LockType::Unlock
                    && (start..=end).any(|b| {
                        model[b as usize]
                            .iter()
                            .any(|(o, &ty)| o.2 == me.2 && *o != me && (ty == w || t as i32 == w))
                    });
                let got = apply(&mut v, &req);
                assert_eq!(got.is_err(), blocked, "seed {seed} step {step}: {req:?}");
                if let Err(c) = got {
                    assert!(conflicts(&c, &req), "seed {seed} step {step}");
                    continue;
                }
                for b in start..=end {
                    if t == LockType::Unlock {
                        model[b as usize].remove(&me);
                    } else {
                        model[b as usize].insert(me, t as i32);
                    }
                }
                // The locks, byte by byte, are the model.
                let mut seen: Vec<BTreeMap<Owner, i32>> = vec![BTreeMap::new(); BYTES as usize];
                for l in &v {
                    assert!(l.start <= l.end);
                    for b in l.start..=l.end {
                        let prev =
                            seen[b as usize].insert((l.client_id, l.owner, l.kind), l.r#type);
                        assert!(prev.is_none(), "seed {seed} step {step}: overlap in {v:?}");
                    }
                }
                assert_eq!(seen, model, "seed {seed} step {step}");
                // Fully merged: no two locks of one owner and type touch.
                for a in &v {
                    for b in &v {
                        if !std::ptr::eq(a, b) && same_owner(a, b) && a.r#type == b.r#type {
                            assert!(!adjacent(a, b), "seed {seed} step {step}: {v:?}");
                        }
                    }
                }
            }
        }
    }
}
