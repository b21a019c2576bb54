//! Sessions: client sessions with leases, the exactly-once reply cache keyed by
//! (client, seq), and open-file handles that keep an unlinked inode alive until the last
//! close (or until the client holding it expires).

use kerfs_proto::{Close, Command, Open, RegisterClient, Reply, Timespec};
use prost::Message;

use super::nodes::{blocks_for, store_or_reap};
use super::perm::{self, MAY_READ, MAY_WRITE};
use super::records::{self as rec, ClientRec, HandleRec, Inode};
use super::{Ctx, Fail, R};
use crate::store::{KvRead, Overlay};

/// What the client library looks for to know that it must register again.
pub const SESSION_EXPIRED: &str = "client session expired; reconnect";

/// Longest client description kept (it is only shown by kerfsctl).
const MAX_DESCRIPTION: usize = 4096;

pub(super) fn add_ms(t: Timespec, ms: u64) -> Timespec {
    let n = t.as_nanos().saturating_add(i128::from(ms) * 1_000_000);
    let sec = n.div_euclid(1_000_000_000);
    let nsec = n.rem_euclid(1_000_000_000) as u32;
    Timespec {
        sec: sec.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        nsec,
    }
}

/// Runs a client's command at most once: checks the session, answers a retry from the
/// reply cache, drops the replies the client acknowledged, and caches the new reply
/// (failed or not — a retry must see the same errno).
pub fn with_exactly_once(
    ctx: &Ctx,
    state: &mut Overlay<'_>,
    cmd: &Command,
    f: impl FnOnce(&Ctx, &mut Overlay<'_>) -> Reply,
) -> R<Reply> {
    let id = cmd.client_id;
    let ckey = rec::key_u64(rec::P_CLIENT, id);
    let Some(mut client) = rec::get::<ClientRec>(state, &ckey)? else {
        return Err(Fail::new(
            libc::ESTALE,
            format!("{SESSION_EXPIRED} (client {id} is unknown)"),
        ));
    };
    if rec::ts_nanos(&client.expires) < ctx.now.as_nanos() {
        return Err(Fail::new(
            libc::ESTALE,
            format!("{SESSION_EXPIRED} (the lease of client {id} ran out)"),
        ));
    }
    let rkey = rec::key_u64_u64(rec::P_REPLY, id, cmd.seq);
    if let Some(bytes) = state.get(&rkey)? {
        return rec::decode::<Reply>(&rkey, &bytes);
    }
    if cmd.seq < client.acked_below {
        return Err(Fail::new(
            libc::EINVAL,
            format!(
                "stale retry: command {} of client {id} is below {} whose replies the client \
                 already acknowledged",
                cmd.seq, client.acked_below
            ),
        ));
    }
    // A client never acknowledges the command it is sending.
    let floor = cmd.acked_below.min(cmd.seq);
    if floor > client.acked_below {
        rec::delete_range(
            state,
            &rec::key_u64_u64(rec::P_REPLY, id, client.acked_below),
            &rec::key_u64_u64(rec::P_REPLY, id, floor),
        )?;
        client.acked_below = floor;
        rec::put(state, ckey, &client);
    }
    let reply = f(ctx, state);
    state.put(rkey, reply.encode_to_vec());
    Ok(reply)
}

pub fn register(ctx: &Ctx, state: &mut Overlay<'_>, r: &RegisterClient) -> R<Reply> {
    if r.lease_ms == 0 {
        return Err(Fail::new(libc::EINVAL, "client lease of 0 ms"));
    }
    let mut c = rec::counters(state)?;
    let id = c.next_client;
    c.next_client += 1;
    rec::put_counters(state, &c);
    let mut description = r.description.clone();
    if description.len() > MAX_DESCRIPTION {
        let mut cut = MAX_DESCRIPTION;
        while !description.is_char_boundary(cut) {
            cut -= 1;
        }
        description.truncate(cut);
    }
    let client = ClientRec {
        description,
        lease_ms: r.lease_ms,
        expires: Some(add_ms(ctx.now, r.lease_ms)),
        acked_below: 0,
        registered: Some(ctx.now),
    };
    rec::put(state, rec::key_u64(rec::P_CLIENT, id), &client);
    Ok(Reply {
        client_id: id,
        ..Default::default()
    })
}

pub fn renew(ctx: &Ctx, state: &mut Overlay<'_>) -> R<Reply> {
    let key = rec::key_u64(rec::P_CLIENT, ctx.client_id);
    let Some(mut client) = rec::get::<ClientRec>(state, &key)? else {
        return Err(Fail::new(
            libc::ESTALE,
            format!("{SESSION_EXPIRED} (client {} is unknown)", ctx.client_id),
        ));
    };
    client.expires = Some(add_ms(ctx.now, client.lease_ms));
    rec::put(state, key, &client);
    Ok(Reply {
        client_id: ctx.client_id,
        ..Default::default()
    })
}

/// Ends every session whose lease ended before the command's time: closes its handles
/// (reaping orphan inodes) and drops its reply cache.
pub fn expire(ctx: &Ctx, state: &mut Overlay<'_>) -> R<Reply> {
    for id in &expired_clients(state, &ctx.now)? {
        drop_client(state, *id)?;
    }
    super::locks::expire_waits(ctx, state)?;
    Ok(Reply::default())
}

/// Whether [`expire`] at `now` would change anything.
pub fn expiry_due(state: &dyn KvRead, now: &Timespec) -> R<bool> {
    Ok(!expired_clients(state, now)?.is_empty()
        || !super::locks::stale_waits(state, now)?.is_empty())
}

/// The sessions whose lease ended before `now`.
fn expired_clients(state: &dyn KvRead, now: &Timespec) -> R<Vec<u64>> {
    let now = now.as_nanos();
    let mut expired = Vec::new();
    let mut pages = rec::Pages::new(vec![rec::P_CLIENT], vec![rec::P_CLIENT + 1], 512);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            let c: ClientRec = rec::decode(&k, &v)?;
            if rec::ts_nanos(&c.expires) < now {
                expired.push(rec::u64_at(&k, 1)?);
            }
        }
    }
    Ok(expired)
}

fn drop_client(state: &mut Overlay<'_>, id: u64) -> R<()> {
    loop {
        let rows = state.scan(
            &rec::key_u64(rec::P_CLIENT_HANDLE, id),
            &rec::end_u64(rec::P_CLIENT_HANDLE, id),
            256,
        )?;
        if rows.is_empty() {
            break;
        }
        for (k, _) in rows {
            let handle = rec::u64_at(&k, 9)?;
            let hkey = rec::key_u64(rec::P_HANDLE, handle);
            match rec::get::<HandleRec>(state, &hkey)? {
                Some(h) => release(state, handle, &h)?,
                None => state.delete(k),
            }
        }
    }
    super::locks::drop_client_waits(state, id)?;
    rec::delete_range(
        state,
        &rec::key_u64(rec::P_REPLY, id),
        &rec::end_u64(rec::P_REPLY, id),
    )?;
    state.delete(rec::key_u64(rec::P_CLIENT, id));
    Ok(())
}

/// Access bits an open asks for.
fn open_mask(flags: u32) -> u32 {
    let mut mask = match flags & libc::O_ACCMODE as u32 {
        f if f == libc::O_RDONLY as u32 => MAY_READ,
        f if f == libc::O_WRONLY as u32 => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    };
    if flags & libc::O_TRUNC as u32 != 0 {
        mask |= MAY_WRITE;
    }
    mask
}

pub fn handle_writable(h: &HandleRec) -> bool {
    open_mask(h.flags & libc::O_ACCMODE as u32) & MAY_WRITE != 0
}

/// The handle `h`, which must be open on `ino`.
pub fn must_handle(state: &dyn KvRead, h: u64, ino: u64) -> R<HandleRec> {
    match rec::get::<HandleRec>(state, &rec::key_u64(rec::P_HANDLE, h))? {
        Some(rec) if rec.ino == ino => Ok(rec),
        _ => Err(Fail::new(
            libc::EBADF,
            format!("no open handle {h} on inode {ino}"),
        )),
    }
}

fn new_handle(ctx: &Ctx, state: &mut Overlay<'_>, inode: &mut Inode, flags: u32) -> R<u64> {
    let mut c = rec::counters(state)?;
    let handle = c.next_handle;
    c.next_handle += 1;
    rec::put_counters(state, &c);
    rec::put(
        state,
        rec::key_u64(rec::P_HANDLE, handle),
        &HandleRec {
            ino: inode.ino(),
            client_id: ctx.client_id,
            flags,
        },
    );
    state.put(
        rec::key_u64_u64(rec::P_CLIENT_HANDLE, ctx.client_id, handle),
        Vec::new(),
    );
    inode.open_count = inode.open_count.saturating_add(1);
    Ok(handle)
}

/// Opens a file that was just created by the same command (no permission check: creating
/// it granted access).
pub fn open_new(ctx: &Ctx, state: &mut Overlay<'_>, mut inode: Inode, flags: u32) -> R<Reply> {
    let handle = new_handle(ctx, state, &mut inode, flags)?;
    rec::store_inode(state, &inode);
    Ok(Reply {
        attr: Some(inode.attr),
        handle,
        ..Default::default()
    })
}

/// Opens an existing inode: access checks for the requested mode, O_TRUNC.
pub fn open_inode(ctx: &Ctx, state: &mut Overlay<'_>, mut inode: Inode, flags: u32) -> R<Reply> {
    use kerfs_proto::FileKind;
    let mask = open_mask(flags);
    match inode.kind() {
        FileKind::Symlink => {
            return Err(Fail::new(
                libc::ELOOP,
                format!("inode {} is a symlink and cannot be opened", inode.ino()),
            ))
        }
        FileKind::Directory if mask & MAY_WRITE != 0 => {
            return Err(Fail::new(
                libc::EISDIR,
                format!("directory {} cannot be opened for writing", inode.ino()),
            ))
        }
        _ => {}
    }
    perm::need(&ctx.who, &inode.attr, mask, "open")?;
    if flags & libc::O_TRUNC as u32 != 0 && inode.kind() == FileKind::Regular {
        let mut c = rec::counters(state)?;
        c.total_size = c.total_size.saturating_sub(inode.attr.size);
        rec::put_counters(state, &c);
        super::chunks::truncate(state, inode.ino(), 0)?;
        inode.attr.size = 0;
        inode.attr.blocks = blocks_for(0);
        super::nodes::drop_set_id_after_write(&ctx.who, false, &mut inode.attr);
        inode.attr.mtime = Some(ctx.now);
        inode.attr.ctime = Some(ctx.now);
    }
    let handle = new_handle(ctx, state, &mut inode, flags)?;
    rec::store_inode(state, &inode);
    Ok(Reply {
        attr: Some(inode.attr),
        handle,
        ..Default::default()
    })
}

/// A second, read-write handle on a file the same command created and opened (see
/// `MakeNode.data_handle`); no permission check, as for [`open_new`].
pub fn open_new_again(ctx: &Ctx, state: &mut Overlay<'_>, ino: u64) -> R<u64> {
    let mut inode = super::nodes::must_inode(state, ino)?;
    let handle = new_handle(ctx, state, &mut inode, libc::O_RDWR as u32)?;
    rec::store_inode(state, &inode);
    Ok(handle)
}

pub fn open(ctx: &Ctx, state: &mut Overlay<'_>, o: &Open) -> R<Reply> {
    let inode = super::nodes::must_inode(state, o.ino)?;
    open_inode(ctx, state, inode, o.flags)
}

/// Forgets one handle, with the locks taken through it, and reaps its inode if that was
/// the last thing holding it.
fn release(state: &mut Overlay<'_>, handle: u64, h: &HandleRec) -> R<()> {
    super::locks::drop_handle(state, h.ino, handle)?;
    state.delete(rec::key_u64(rec::P_HANDLE, handle));
    state.delete(rec::key_u64_u64(rec::P_CLIENT_HANDLE, h.client_id, handle));
    if let Some(mut inode) = rec::load_inode(state, h.ino)? {
        inode.open_count = inode.open_count.saturating_sub(1);
        store_or_reap(state, &inode)?;
    }
    Ok(())
}

pub fn close(ctx: &Ctx, state: &mut Overlay<'_>, c: &Close) -> R<Reply> {
    // A failure leaves every handle open: the command's overlay is dropped.
    for &handle in std::iter::once(&c.handle).chain(&c.more) {
        close_one(ctx, state, handle)?;
    }
    Ok(Reply::default())
}

fn close_one(ctx: &Ctx, state: &mut Overlay<'_>, handle: u64) -> R<()> {
    let hkey = rec::key_u64(rec::P_HANDLE, handle);
    let Some(h) = rec::get::<HandleRec>(state, &hkey)? else {
        return Err(Fail::new(libc::EBADF, format!("no open handle {handle}")));
    };
    // Internal commands (client 0) may close anyone's handle; clients only their own.
    if ctx.client_id != 0 && h.client_id != ctx.client_id {
        return Err(Fail::new(
            libc::EBADF,
            format!("handle {handle} belongs to another client session"),
        ));
    }
    release(state, handle, &h)
}
