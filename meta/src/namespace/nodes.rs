//! Operations that create, link, remove and change inodes: mknod/mkdir/symlink/create,
//! link, unlink/rmdir and setattr, with Linux's errno order and time updates (pjdfstest
//! checks which of ctime/mtime move on parents and targets).

use kerfs_proto::{
    time_set, Attr, FileKind, Link, MakeNode, Remove, Reply, SetAttr, TimeSet, Timespec, NAME_MAX,
    PATH_MAX, ROOT_INO,
};

use super::perm::{self, MAY_EXEC, MAY_WRITE};
use super::records::{self as rec, DirentRec, Inode};
use super::{chunks, sessions, show, Ctx, Fail, Who, R};
use crate::store::{KvRead, Overlay};

use kerfs_proto::perm::clear_set_id;
pub use kerfs_proto::perm::{S_ISGID, S_IXGRP};
/// Most links one inode may have (ext4's limit), so nlink never wraps.
pub const LINK_MAX: u32 = 65000;

/// After a write, a truncate or an O_TRUNC open: a caller without CAP_FSETID (anyone but
/// root), or one the mount vouches for with `unprivileged` (the mount commits its callers'
/// writes under its own identity), loses set-user-ID and set-group-ID, as on Linux.
pub fn drop_set_id_after_write(who: &Who, unprivileged: bool, attr: &mut Attr) {
    if unprivileged || !who.is_root() {
        attr.mode = clear_set_id(attr.mode);
    }
}

/// What a syntactically valid name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Normal,
    Dot,
    DotDot,
}

/// Checks a name: not empty, no '/' or NUL, at most NAME_MAX bytes. "." and ".." are
/// valid names whose meaning each operation decides.
pub fn name_kind(name: &[u8]) -> R<NameKind> {
    if name.is_empty() {
        return Err(Fail::new(libc::EINVAL, "empty file name"));
    }
    if name.len() > NAME_MAX {
        return Err(Fail::new(
            libc::ENAMETOOLONG,
            format!(
                "file name of {} bytes is longer than {NAME_MAX}",
                name.len()
            ),
        ));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(Fail::new(
            libc::EINVAL,
            format!("file name {:?} contains '/' or NUL", show(name)),
        ));
    }
    Ok(match name {
        b"." => NameKind::Dot,
        b".." => NameKind::DotDot,
        _ => NameKind::Normal,
    })
}

pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(512)
}

/// Creates the root directory if the state has none (the first command ever applied).
pub fn ensure_root(state: &mut Overlay<'_>, now: Timespec) -> R<()> {
    if state.get(&rec::key_u64(rec::P_INODE, ROOT_INO))?.is_some() {
        return Ok(());
    }
    let mut counters = rec::counters(state)?;
    counters.inodes += 1;
    rec::put_counters(state, &counters);
    rec::store_inode(state, &root_inode(now));
    Ok(())
}

/// The root directory as it is created (reads of an empty state see it with time 0).
pub fn root_inode(now: Timespec) -> Inode {
    Inode {
        attr: Attr {
            ino: ROOT_INO,
            kind: FileKind::Directory as i32,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            nlink: 2,
            rdev: 0,
            atime: Some(now),
            mtime: Some(now),
            ctime: Some(now),
            crtime: Some(now),
            generation: 1,
            blocks: 0,
        },
        parent: ROOT_INO,
        target: Vec::new(),
        next_seq: rec::FIRST_SEQ,
        open_count: 0,
    }
}

/// Loads an inode that must exist (ENOENT otherwise). The root of an empty state exists.
pub fn must_inode(state: &dyn KvRead, ino: u64) -> R<Inode> {
    match rec::load_inode(state, ino)? {
        Some(i) => Ok(i),
        None if ino == ROOT_INO => Ok(root_inode(Timespec::default())),
        None => Err(Fail::new(libc::ENOENT, format!("no inode {ino}"))),
    }
}

/// Loads a live directory (ENOENT if missing or already removed, ENOTDIR if not one).
pub fn must_dir(state: &dyn KvRead, ino: u64) -> R<Inode> {
    let d = must_inode(state, ino)?;
    if !d.is_dir() {
        return Err(Fail::new(
            libc::ENOTDIR,
            format!("inode {ino} is not a directory"),
        ));
    }
    if d.attr.nlink == 0 {
        return Err(Fail::new(
            libc::ENOENT,
            format!("directory {ino} was removed"),
        ));
    }
    Ok(d)
}

fn touch_dir(dir: &mut Inode, now: Timespec) {
    dir.attr.mtime = Some(now);
    dir.attr.ctime = Some(now);
}

/// Takes the next readdir sequence number of a directory.
pub fn take_seq(dir: &mut Inode) -> u64 {
    let seq = dir.next_seq.max(rec::FIRST_SEQ);
    dir.next_seq = seq + 1;
    seq
}

/// Deletes an inode that has no name and no open handle left: its record, its xattrs,
/// and its share of the counters.
pub fn destroy_inode(state: &mut Overlay<'_>, inode: &Inode) -> R<()> {
    let ino = inode.ino();
    state.delete(rec::key_u64(rec::P_INODE, ino));
    // Its data: chunk table, placements queued for deletion on their servers, layout.
    chunks::forget_inode(state, ino)?;
    loop {
        let rows = state.scan(
            &rec::key_u64(rec::P_XATTR, ino),
            &rec::end_u64(rec::P_XATTR, ino),
            256,
        )?;
        if rows.is_empty() {
            break;
        }
        for (k, _) in rows {
            state.delete(k);
        }
    }
    let mut c = rec::counters(state)?;
    c.inodes = c.inodes.saturating_sub(1);
    if inode.kind() == FileKind::Regular {
        c.total_size = c.total_size.saturating_sub(inode.attr.size);
    }
    rec::put_counters(state, &c);
    Ok(())
}

/// Stores an inode whose link count changed, or deletes it when nothing holds it any more.
pub fn store_or_reap(state: &mut Overlay<'_>, inode: &Inode) -> R<()> {
    if inode.attr.nlink == 0 && inode.open_count == 0 {
        destroy_inode(state, inode)
    } else {
        rec::store_inode(state, inode);
        Ok(())
    }
}

fn check_target(target: &[u8]) -> R<()> {
    if target.is_empty() {
        return Err(Fail::new(libc::ENOENT, "empty symlink target"));
    }
    if target.len() > PATH_MAX {
        return Err(Fail::new(
            libc::ENAMETOOLONG,
            format!(
                "symlink target of {} bytes is longer than {PATH_MAX}",
                target.len()
            ),
        ));
    }
    if target.contains(&0) {
        return Err(Fail::new(libc::EINVAL, "symlink target contains NUL"));
    }
    Ok(())
}

pub fn make_node(ctx: &Ctx, state: &mut Overlay<'_>, m: &MakeNode) -> R<Reply> {
    let kind = match FileKind::try_from(m.kind) {
        Ok(FileKind::Unknown) | Err(_) => {
            return Err(Fail::new(
                libc::EINVAL,
                format!("cannot create a node of unknown kind {}", m.kind),
            ))
        }
        Ok(k) => k,
    };
    if m.mode & !0o7777 != 0 {
        return Err(Fail::new(
            libc::EINVAL,
            format!("mode {:o} has bits outside 07777", m.mode),
        ));
    }
    let name = name_kind(&m.name)?;
    if kind == FileKind::Symlink {
        check_target(&m.target)?;
    }
    let mut parent = must_dir(state, m.parent)?;
    perm::need_search(&ctx.who, &parent.attr)?;
    if name != NameKind::Normal {
        return Err(Fail::new(
            libc::EEXIST,
            format!("{:?} always exists", show(&m.name)),
        ));
    }
    if let Some(existing) = rec::load_dirent(state, m.parent, &m.name)? {
        if m.exclusive {
            return Err(Fail::new(
                libc::EEXIST,
                format!("{:?} exists in directory {}", show(&m.name), m.parent),
            ));
        }
        let inode = must_inode(state, existing.ino)?;
        if inode.is_dir() {
            return Err(Fail::new(
                libc::EISDIR,
                format!("{:?} is a directory", show(&m.name)),
            ));
        }
        if m.open {
            return sessions::open_inode(ctx, state, inode, m.open_flags);
        }
        return Ok(Reply {
            attr: Some(inode.attr),
            ..Default::default()
        });
    }
    perm::need(
        &ctx.who,
        &parent.attr,
        MAY_WRITE | MAY_EXEC,
        "create in directory",
    )?;
    if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) && !ctx.who.is_root() {
        return Err(Fail::new(libc::EPERM, "only root may create device nodes"));
    }
    if kind == FileKind::Directory && parent.attr.nlink >= LINK_MAX {
        return Err(Fail::new(
            libc::EMLINK,
            format!("directory {} has too many subdirectories", m.parent),
        ));
    }

    let setgid_parent = parent.attr.mode & S_ISGID != 0;
    let gid = if setgid_parent {
        parent.attr.gid
    } else {
        ctx.who.gid
    };
    let mut mode = m.mode;
    match kind {
        FileKind::Symlink => mode = 0o777,
        FileKind::Directory if setgid_parent => mode |= S_ISGID,
        _ => {
            if setgid_parent
                && mode & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP)
                && !ctx.who.in_group(gid)
                && !ctx.who.is_root()
            {
                mode &= !S_ISGID;
            }
        }
    }

    let mut c = rec::counters(state)?;
    let ino = c.next_ino;
    c.next_ino += 1;
    let generation = c.next_generation;
    c.next_generation += 1;
    c.inodes += 1;
    rec::put_counters(state, &c);

    let now = ctx.now;
    let is_dir = kind == FileKind::Directory;
    let size = if kind == FileKind::Symlink {
        m.target.len() as u64
    } else {
        0
    };
    let inode = Inode {
        attr: Attr {
            ino,
            kind: kind as i32,
            mode,
            uid: ctx.who.uid,
            gid,
            size,
            nlink: if is_dir { 2 } else { 1 },
            rdev: if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                m.rdev
            } else {
                0
            },
            atime: Some(now),
            mtime: Some(now),
            ctime: Some(now),
            crtime: Some(now),
            generation,
            blocks: 0,
        },
        parent: if is_dir { m.parent } else { 0 },
        target: if kind == FileKind::Symlink {
            m.target.clone()
        } else {
            Vec::new()
        },
        next_seq: if is_dir { rec::FIRST_SEQ } else { 0 },
        open_count: 0,
    };
    chunks::inherit_layout(state, m.parent, ino, kind)?;
    let seq = take_seq(&mut parent);
    touch_dir(&mut parent, now);
    if is_dir {
        parent.attr.nlink += 1;
    }
    rec::store_inode(state, &parent);
    rec::store_dirent(
        state,
        m.parent,
        &m.name,
        &DirentRec {
            ino,
            kind: kind as i32,
            seq,
        },
    );
    if m.open {
        // Creating the file grants access whatever its mode (as open(O_CREAT) does).
        let mut reply = sessions::open_new(ctx, state, inode, m.open_flags)?;
        if kind == FileKind::Regular {
            reply.layout = Some(chunks::layout_of(state, ino)?);
            if m.data_handle {
                reply.data_handle = sessions::open_new_again(ctx, state, ino)?;
            }
        }
        return Ok(reply);
    }
    rec::store_inode(state, &inode);
    Ok(Reply {
        attr: Some(inode.attr),
        ..Default::default()
    })
}

pub fn link(ctx: &Ctx, state: &mut Overlay<'_>, l: &Link) -> R<Reply> {
    let name = name_kind(&l.new_name)?;
    let mut inode = must_inode(state, l.ino)?;
    let mut parent = must_dir(state, l.new_parent)?;
    perm::need_search(&ctx.who, &parent.attr)?;
    if name != NameKind::Normal || rec::load_dirent(state, l.new_parent, &l.new_name)?.is_some() {
        return Err(Fail::new(
            libc::EEXIST,
            format!(
                "{:?} exists in directory {}",
                show(&l.new_name),
                l.new_parent
            ),
        ));
    }
    perm::need(
        &ctx.who,
        &parent.attr,
        MAY_WRITE | MAY_EXEC,
        "link into directory",
    )?;
    if inode.is_dir() {
        return Err(Fail::new(
            libc::EPERM,
            format!(
                "inode {} is a directory; directories cannot be hard-linked",
                l.ino
            ),
        ));
    }
    if inode.attr.nlink == 0 {
        return Err(Fail::new(
            libc::ENOENT,
            format!("inode {} was removed and cannot get a new name", l.ino),
        ));
    }
    if inode.attr.nlink >= LINK_MAX {
        return Err(Fail::new(
            libc::EMLINK,
            format!("inode {} has {LINK_MAX} links already", l.ino),
        ));
    }
    let now = ctx.now;
    inode.attr.nlink += 1;
    inode.attr.ctime = Some(now);
    let seq = take_seq(&mut parent);
    touch_dir(&mut parent, now);
    rec::store_inode(state, &parent);
    rec::store_inode(state, &inode);
    rec::store_dirent(
        state,
        l.new_parent,
        &l.new_name,
        &DirentRec {
            ino: inode.ino(),
            kind: inode.attr.kind,
            seq,
        },
    );
    Ok(Reply {
        attr: Some(inode.attr),
        ..Default::default()
    })
}

/// Checks that `who` may delete the entry `victim` from `dir` (write+search, sticky bit),
/// then that its type suits the operation (`want_dir`: rmdir or a directory rename).
pub fn may_delete(ctx: &Ctx, dir: &Inode, victim: &Inode, want_dir: bool) -> R<()> {
    perm::need(
        &ctx.who,
        &dir.attr,
        MAY_WRITE | MAY_EXEC,
        "remove from directory",
    )?;
    perm::check_sticky(&ctx.who, &dir.attr, &victim.attr)?;
    if want_dir && !victim.is_dir() {
        return Err(Fail::new(
            libc::ENOTDIR,
            format!("inode {} is not a directory", victim.ino()),
        ));
    }
    if !want_dir && victim.is_dir() {
        return Err(Fail::new(
            libc::EISDIR,
            format!("inode {} is a directory", victim.ino()),
        ));
    }
    if victim.ino() == ROOT_INO {
        return Err(Fail::new(
            libc::EBUSY,
            "the root directory cannot be removed",
        ));
    }
    Ok(())
}

pub fn remove(ctx: &Ctx, state: &mut Overlay<'_>, r: &Remove) -> R<Reply> {
    let name = name_kind(&r.name)?;
    let mut parent = must_dir(state, r.parent)?;
    perm::need_search(&ctx.who, &parent.attr)?;
    match (name, r.directory) {
        (NameKind::Normal, _) => {}
        (_, false) => {
            return Err(Fail::new(
                libc::EISDIR,
                format!("cannot unlink {:?}", show(&r.name)),
            ))
        }
        (NameKind::Dot, true) => return Err(Fail::new(libc::EINVAL, "cannot remove \".\"")),
        (NameKind::DotDot, true) => return Err(Fail::new(libc::ENOTEMPTY, "cannot remove \"..\"")),
    }
    let Some(entry) = rec::load_dirent(state, r.parent, &r.name)? else {
        return Err(Fail::new(
            libc::ENOENT,
            format!("no {:?} in directory {}", show(&r.name), r.parent),
        ));
    };
    let mut victim = must_inode(state, entry.ino)?;
    may_delete(ctx, &parent, &victim, r.directory)?;
    if r.directory && !rec::dir_is_empty(state, victim.ino())? {
        return Err(Fail::new(
            libc::ENOTEMPTY,
            format!("directory {:?} is not empty", show(&r.name)),
        ));
    }
    let now = ctx.now;
    rec::delete_dirent(state, r.parent, &r.name, entry.seq);
    touch_dir(&mut parent, now);
    if victim.is_dir() {
        parent.attr.nlink = parent.attr.nlink.saturating_sub(1);
        victim.attr.nlink = 0;
    } else {
        victim.attr.nlink = victim.attr.nlink.saturating_sub(1);
    }
    victim.attr.ctime = Some(now);
    rec::store_inode(state, &parent);
    store_or_reap(state, &victim)?;
    Ok(Reply::default())
}

fn time_of(ctx: &Ctx, t: &TimeSet, what: &str) -> R<Option<(Timespec, bool)>> {
    match &t.how {
        None => Ok(None),
        Some(time_set::How::Now(_)) => Ok(Some((ctx.now, false))),
        Some(time_set::How::At(at)) => {
            if at.nsec >= 1_000_000_000 {
                return Err(Fail::new(
                    libc::EINVAL,
                    format!("{what} has {} nanoseconds", at.nsec),
                ));
            }
            Ok(Some((*at, true)))
        }
    }
}

pub fn setattr(ctx: &Ctx, state: &mut Overlay<'_>, s: &SetAttr) -> R<Reply> {
    let mut inode = must_inode(state, s.ino)?;
    let who = &ctx.who;
    let handle = match s.handle {
        Some(h) => Some(sessions::must_handle(state, h, s.ino)?),
        None => None,
    };
    let atime = s
        .atime
        .as_ref()
        .map(|t| time_of(ctx, t, "atime"))
        .transpose()?
        .flatten();
    let mtime = s
        .mtime
        .as_ref()
        .map(|t| time_of(ctx, t, "mtime"))
        .transpose()?
        .flatten();
    if let Some(mode) = s.mode {
        // FUSE hands over st_mode with the type bits; only the permission bits count.
        if mode & !0o177777 != 0 {
            return Err(Fail::new(
                libc::EINVAL,
                format!("mode {mode:o} has bits outside 07777"),
            ));
        }
    }

    if let Some(size) = s.size {
        match inode.kind() {
            FileKind::Directory => {
                return Err(Fail::new(
                    libc::EISDIR,
                    format!("inode {} is a directory", s.ino),
                ))
            }
            FileKind::Regular => {}
            _ => {
                return Err(Fail::new(
                    libc::EINVAL,
                    format!("inode {} is not a regular file", s.ino),
                ))
            }
        }
        match &handle {
            Some(h) => {
                if !sessions::handle_writable(h) {
                    return Err(Fail::new(
                        libc::EINVAL,
                        format!("handle {:?} is not open for writing", s.handle),
                    ));
                }
            }
            None => perm::need(who, &inode.attr, MAY_WRITE, "truncate")?,
        }
        if size > i64::MAX as u64 {
            return Err(Fail::new(libc::EFBIG, format!("size {size} is too large")));
        }
    }
    if let Some(uid) = s.uid {
        let keeps_own = who.uid == inode.attr.uid && uid == inode.attr.uid;
        if !who.is_root() && !keeps_own {
            return Err(Fail::new(
                libc::EPERM,
                format!("only root may give inode {} to uid {uid}", s.ino),
            ));
        }
    }
    if let Some(gid) = s.gid {
        if !who.is_root()
            && !(who.uid == inode.attr.uid && (who.in_group(gid) || gid == inode.attr.gid))
        {
            return Err(Fail::new(
                libc::EPERM,
                format!(
                    "uid {} may not give inode {} to group {gid}",
                    who.uid, s.ino
                ),
            ));
        }
    }
    if s.mode.is_some() && !who.owns(&inode.attr) {
        return Err(Fail::new(
            libc::EPERM,
            format!("only the owner or root may chmod inode {}", s.ino),
        ));
    }
    let explicit = atime.map(|t| t.1).unwrap_or(false) || mtime.map(|t| t.1).unwrap_or(false);
    if explicit {
        if !who.owns(&inode.attr) {
            return Err(Fail::new(
                libc::EPERM,
                format!(
                    "only the owner or root may set explicit times on inode {}",
                    s.ino
                ),
            ));
        }
    } else if (atime.is_some() || mtime.is_some())
        && !who.owns(&inode.attr)
        && !perm::allowed(who, &inode.attr, MAY_WRITE)
    {
        return Err(Fail::new(
            libc::EACCES,
            format!(
                "touching inode {} needs ownership or write permission",
                s.ino
            ),
        ));
    }

    let now = ctx.now;
    if let Some(mode) = s.mode {
        let mut mode = mode & 0o7777;
        if !who.is_root() && !who.in_group(inode.attr.gid) {
            mode &= !S_ISGID;
        }
        inode.attr.mode = mode;
    }
    if s.uid.is_some() || s.gid.is_some() {
        if let Some(uid) = s.uid {
            inode.attr.uid = uid;
        }
        if let Some(gid) = s.gid {
            inode.attr.gid = gid;
        }
        if !inode.is_dir() {
            inode.attr.mode = clear_set_id(inode.attr.mode);
        }
    }
    if let Some(size) = s.size {
        let mut c = rec::counters(state)?;
        c.total_size = c
            .total_size
            .saturating_sub(inode.attr.size)
            .saturating_add(size);
        rec::put_counters(state, &c);
        chunks::truncate(state, inode.ino(), size)?;
        drop_set_id_after_write(who, s.clear_set_id, &mut inode.attr);
        inode.attr.size = size;
        inode.attr.blocks = blocks_for(size);
        inode.attr.mtime = Some(now);
    }
    if let Some((t, _)) = atime {
        inode.attr.atime = Some(t);
    }
    if let Some((t, _)) = mtime {
        inode.attr.mtime = Some(t);
    }
    inode.attr.ctime = Some(now);
    rec::store_inode(state, &inode);
    Ok(Reply {
        attr: Some(inode.attr),
        ..Default::default()
    })
}
