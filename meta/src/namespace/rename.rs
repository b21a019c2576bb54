//! rename(2) and renameat2(2): plain, RENAME_NOREPLACE and RENAME_EXCHANGE, with the checks
//! in Linux's order (flags, names, lookups, subtree traps, same inode, delete/create
//! permission and type checks, emptiness of a replaced directory).

use kerfs_proto::{Rename, Reply, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO};

use super::nodes::{self, must_dir, must_inode, name_kind, NameKind, LINK_MAX};
use super::perm::{self, MAY_EXEC, MAY_WRITE};
use super::records::{self as rec, DirentRec, Inode};
use super::{show, Ctx, Fail, R};
use crate::store::{KvRead, Overlay};

/// Whether directory `anc` is `start` or one of its ancestors (walking parent pointers).
fn is_ancestor(state: &dyn KvRead, anc: u64, start: u64) -> R<bool> {
    let mut cur = start;
    // A chain longer than this can only come from a corrupt parent pointer loop.
    for _ in 0..1_000_000 {
        if cur == anc {
            return Ok(true);
        }
        if cur == ROOT_INO {
            return Ok(false);
        }
        cur = must_inode(state, cur)?.parent;
    }
    Err(Fail::new(
        libc::EIO,
        format!("parent pointers above directory {start} form a loop; the state is damaged"),
    ))
}

/// Loads, changes and stores one inode (parents may be the same directory twice).
fn update(state: &mut Overlay<'_>, ino: u64, f: impl FnOnce(&mut Inode)) -> R<()> {
    let mut i = must_inode(state, ino)?;
    f(&mut i);
    rec::store_inode(state, &i);
    Ok(())
}

pub fn rename(ctx: &Ctx, state: &mut Overlay<'_>, r: &Rename) -> R<Reply> {
    let exchange = r.flags & RENAME_EXCHANGE != 0;
    let noreplace = r.flags & RENAME_NOREPLACE != 0;
    if r.flags & !(RENAME_EXCHANGE | RENAME_NOREPLACE) != 0 || (exchange && noreplace) {
        return Err(Fail::new(
            libc::EINVAL,
            format!("invalid rename flags {:#x}", r.flags),
        ));
    }
    let old_kind = name_kind(&r.name)?;
    let new_kind = name_kind(&r.new_name)?;
    let old_parent = must_dir(state, r.parent)?;
    let new_parent = must_dir(state, r.new_parent)?;
    perm::need_search(&ctx.who, &old_parent.attr)?;
    perm::need_search(&ctx.who, &new_parent.attr)?;
    if old_kind != NameKind::Normal {
        return Err(Fail::new(
            libc::EBUSY,
            format!("cannot rename {:?}", show(&r.name)),
        ));
    }
    if new_kind != NameKind::Normal {
        return Err(Fail::new(
            if noreplace { libc::EEXIST } else { libc::EBUSY },
            format!("cannot rename onto {:?}", show(&r.new_name)),
        ));
    }
    let Some(src_entry) = rec::load_dirent(state, r.parent, &r.name)? else {
        return Err(Fail::new(
            libc::ENOENT,
            format!("no {:?} in directory {}", show(&r.name), r.parent),
        ));
    };
    let dst_entry = rec::load_dirent(state, r.new_parent, &r.new_name)?;
    if exchange && dst_entry.is_none() {
        return Err(Fail::new(
            libc::ENOENT,
            format!(
                "no {:?} in directory {} to exchange with",
                show(&r.new_name),
                r.new_parent
            ),
        ));
    }
    if noreplace && dst_entry.is_some() {
        return Err(Fail::new(
            libc::EEXIST,
            format!(
                "{:?} exists in directory {}",
                show(&r.new_name),
                r.new_parent
            ),
        ));
    }
    let mut src = must_inode(state, src_entry.ino)?;
    let dst = match &dst_entry {
        Some(d) => Some(must_inode(state, d.ino)?),
        None => None,
    };
    if src.is_dir() && is_ancestor(state, src.ino(), r.new_parent)? {
        return Err(Fail::new(
            libc::EINVAL,
            format!(
                "cannot move directory {:?} into its own subtree",
                show(&r.name)
            ),
        ));
    }
    if let Some(d) = &dst {
        if d.is_dir() && d.ino() != src.ino() && is_ancestor(state, d.ino(), r.parent)? {
            return Err(Fail::new(
                if exchange {
                    libc::EINVAL
                } else {
                    libc::ENOTEMPTY
                },
                format!(
                    "{:?} is an ancestor of {:?}",
                    show(&r.new_name),
                    show(&r.name)
                ),
            ));
        }
        if d.ino() == src.ino() {
            // Two names of one inode (or one name twice): nothing to do, as in Linux.
            return Ok(Reply {
                attr: Some(src.attr),
                ..Default::default()
            });
        }
    }
    let moving = r.parent != r.new_parent;
    nodes::may_delete(ctx, &old_parent, &src, src.is_dir())?;
    match &dst {
        None => perm::need(
            &ctx.who,
            &new_parent.attr,
            MAY_WRITE | MAY_EXEC,
            "rename into directory",
        )?,
        Some(d) if exchange => nodes::may_delete(ctx, &new_parent, d, d.is_dir())?,
        Some(d) => nodes::may_delete(ctx, &new_parent, d, src.is_dir())?,
    }
    if moving && src.is_dir() {
        perm::need(
            &ctx.who,
            &src.attr,
            MAY_WRITE,
            "move directory (update its \"..\")",
        )?;
    }
    if let Some(d) = &dst {
        if exchange && moving && d.is_dir() {
            perm::need(
                &ctx.who,
                &d.attr,
                MAY_WRITE,
                "move directory (update its \"..\")",
            )?;
        }
        if !exchange && d.is_dir() && !rec::dir_is_empty(state, d.ino())? {
            return Err(Fail::new(
                libc::ENOTEMPTY,
                format!("directory {:?} is not empty", show(&r.new_name)),
            ));
        }
    }
    if moving
        && src.is_dir()
        && !dst.as_ref().is_some_and(|d| d.is_dir())
        && new_parent.attr.nlink >= LINK_MAX
    {
        return Err(Fail::new(
            libc::EMLINK,
            format!("directory {} has too many subdirectories", r.new_parent),
        ));
    }

    let now = ctx.now;
    let touch = |p: &mut Inode| {
        p.attr.mtime = Some(now);
        p.attr.ctime = Some(now);
    };
    if let (true, Some(mut d), Some(de)) = (exchange, dst.clone(), dst_entry.clone()) {
        // Names stay where they are (and keep their cookies); the inodes swap.
        rec::store_dirent(
            state,
            r.parent,
            &r.name,
            &DirentRec {
                ino: d.ino(),
                kind: d.attr.kind,
                seq: src_entry.seq,
            },
        );
        rec::store_dirent(
            state,
            r.new_parent,
            &r.new_name,
            &DirentRec {
                ino: src.ino(),
                kind: src.attr.kind,
                seq: de.seq,
            },
        );
        if moving {
            let delta: i64 = i64::from(src.is_dir()) - i64::from(d.is_dir());
            update(state, r.parent, |p| {
                p.attr.nlink = (i64::from(p.attr.nlink) - delta).max(0) as u32;
            })?;
            update(state, r.new_parent, |p| {
                p.attr.nlink = (i64::from(p.attr.nlink) + delta).max(0) as u32;
            })?;
            if src.is_dir() {
                src.parent = r.new_parent;
            }
            if d.is_dir() {
                d.parent = r.parent;
            }
        }
        d.attr.ctime = Some(now);
        rec::store_inode(state, &d);
    } else {
        rec::delete_dirent(state, r.parent, &r.name, src_entry.seq);
        let mut seq = 0;
        match (&dst, &dst_entry) {
            (Some(d), Some(de)) => {
                // The name existed throughout, so it keeps its cookie.
                seq = de.seq;
                let mut d = d.clone();
                if d.is_dir() {
                    d.attr.nlink = 0;
                    update(state, r.new_parent, |p| {
                        p.attr.nlink = p.attr.nlink.saturating_sub(1)
                    })?;
                } else {
                    d.attr.nlink = d.attr.nlink.saturating_sub(1);
                }
                d.attr.ctime = Some(now);
                nodes::store_or_reap(state, &d)?;
            }
            _ => update(state, r.new_parent, |p| seq = nodes::take_seq(p))?,
        }
        rec::store_dirent(
            state,
            r.new_parent,
            &r.new_name,
            &DirentRec {
                ino: src.ino(),
                kind: src.attr.kind,
                seq,
            },
        );
        if moving && src.is_dir() {
            update(state, r.parent, |p| {
                p.attr.nlink = p.attr.nlink.saturating_sub(1)
            })?;
            update(state, r.new_parent, |p| p.attr.nlink += 1)?;
            src.parent = r.new_parent;
        }
    }
    src.attr.ctime = Some(now);
    rec::store_inode(state, &src);
    update(state, r.parent, touch)?;
    update(state, r.new_parent, touch)?;
    let attr = must_inode(state, src.ino())?.attr;
    Ok(Reply {
        attr: Some(attr),
        ..Default::default()
    })
}
