//! Extended attributes: the four Linux namespaces, XATTR_CREATE/REPLACE, Linux's size
//! limits (name 255 bytes: ERANGE; value 64 KiB: E2BIG) and its permission rules
//! (user.* follows the file mode, trusted.* is root's, security.*/system.* writes are root's).

use kerfs_proto::{
    FileKind, GetXattr, ListXattr, RemoveXattr, Reply, SetXattr, XATTR_CREATE, XATTR_REPLACE,
};

use super::nodes::must_inode;
use super::perm::{self, MAY_READ, MAY_WRITE};
use super::records::{self as rec, Inode};
use super::{show, Ctx, Fail, Who, R};
use crate::store::{KvRead, Overlay};

pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    User,
    Trusted,
    Security,
    System,
}

fn space_of(name: &[u8]) -> R<Space> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(Fail::new(
            libc::ERANGE,
            format!(
                "xattr name of {} bytes (must be 1 to {XATTR_NAME_MAX})",
                name.len()
            ),
        ));
    }
    if name.contains(&0) {
        return Err(Fail::new(libc::EINVAL, "xattr name contains NUL"));
    }
    let spaces: [(&[u8], Space); 4] = [
        (b"user.", Space::User),
        (b"trusted.", Space::Trusted),
        (b"security.", Space::Security),
        (b"system.", Space::System),
    ];
    for (prefix, space) in spaces {
        if let Some(rest) = name.strip_prefix(prefix) {
            if rest.is_empty() {
                return Err(Fail::new(
                    libc::EINVAL,
                    format!(
                        "xattr name {:?} has nothing after its namespace",
                        show(name)
                    ),
                ));
            }
            return Ok(space);
        }
    }
    Err(Fail::new(
        libc::EOPNOTSUPP,
        format!(
            "xattr name {:?} is not in the user., trusted., security. or system. namespace",
            show(name)
        ),
    ))
}

fn no_data(ino: u64, name: &[u8]) -> Fail {
    Fail::new(
        libc::ENODATA,
        format!("inode {ino} has no xattr {:?}", show(name)),
    )
}

/// Linux's xattr_permission: who may read (`write` false) or write a name on an inode.
fn check(who: &Who, inode: &Inode, name: &[u8], space: Space, write: bool) -> R<()> {
    match space {
        Space::Trusted | Space::Security | Space::System if write => {
            if !who.is_root() {
                return Err(Fail::new(
                    libc::EPERM,
                    format!("only root may change xattr {:?}", show(name)),
                ));
            }
            Ok(())
        }
        Space::Trusted => {
            if !who.is_root() {
                // Unprivileged readers cannot see trusted.* at all.
                return Err(no_data(inode.ino(), name));
            }
            Ok(())
        }
        Space::Security | Space::System => Ok(()),
        Space::User => {
            if !matches!(inode.kind(), FileKind::Regular | FileKind::Directory) {
                return Err(if write {
                    Fail::new(
                        libc::EPERM,
                        format!(
                            "user xattrs only on files and directories (inode {})",
                            inode.ino()
                        ),
                    )
                } else {
                    no_data(inode.ino(), name)
                });
            }
            if write && inode.is_dir() && inode.attr.mode & 0o1000 != 0 && !who.owns(&inode.attr) {
                return Err(Fail::new(
                    libc::EPERM,
                    format!(
                        "sticky directory {}: only its owner sets user xattrs",
                        inode.ino()
                    ),
                ));
            }
            let mask = if write { MAY_WRITE } else { MAY_READ };
            perm::need(who, &inode.attr, mask, "xattr")
        }
    }
}

pub fn set(ctx: &Ctx, state: &mut Overlay<'_>, s: &SetXattr) -> R<Reply> {
    if s.flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
        return Err(Fail::new(
            libc::EINVAL,
            format!("invalid xattr flags {:#x}", s.flags),
        ));
    }
    let space = space_of(&s.name)?;
    if s.value.len() > XATTR_SIZE_MAX {
        return Err(Fail::new(
            libc::E2BIG,
            format!(
                "xattr value of {} bytes is larger than {XATTR_SIZE_MAX}",
                s.value.len()
            ),
        ));
    }
    let mut inode = must_inode(state, s.ino)?;
    check(&ctx.who, &inode, &s.name, space, true)?;
    let key = rec::key_u64_bytes(rec::P_XATTR, s.ino, &s.name);
    let exists = state.get(&key)?.is_some();
    if exists && s.flags & XATTR_CREATE != 0 {
        return Err(Fail::new(
            libc::EEXIST,
            format!("inode {} already has xattr {:?}", s.ino, show(&s.name)),
        ));
    }
    if !exists && s.flags & XATTR_REPLACE != 0 {
        return Err(no_data(s.ino, &s.name));
    }
    state.put(key, s.value.clone());
    inode.attr.ctime = Some(ctx.now);
    rec::store_inode(state, &inode);
    Ok(Reply::default())
}

pub fn remove(ctx: &Ctx, state: &mut Overlay<'_>, r: &RemoveXattr) -> R<Reply> {
    let space = space_of(&r.name)?;
    let mut inode = must_inode(state, r.ino)?;
    check(&ctx.who, &inode, &r.name, space, true)?;
    let key = rec::key_u64_bytes(rec::P_XATTR, r.ino, &r.name);
    if state.get(&key)?.is_none() {
        return Err(no_data(r.ino, &r.name));
    }
    state.delete(key);
    inode.attr.ctime = Some(ctx.now);
    rec::store_inode(state, &inode);
    Ok(Reply::default())
}

pub fn get(state: &dyn KvRead, who: &Who, g: &GetXattr) -> R<Reply> {
    let space = space_of(&g.name)?;
    let inode = must_inode(state, g.ino)?;
    check(who, &inode, &g.name, space, false)?;
    match state.get(&rec::key_u64_bytes(rec::P_XATTR, g.ino, &g.name))? {
        Some(value) => Ok(Reply {
            data: value,
            ..Default::default()
        }),
        None => Err(no_data(g.ino, &g.name)),
    }
}

/// Names in key (byte) order; trusted.* only for root, as Linux lists them.
pub fn list(state: &dyn KvRead, who: &Who, l: &ListXattr) -> R<Reply> {
    must_inode(state, l.ino)?;
    let mut names = Vec::new();
    let mut pages = rec::Pages::new(
        rec::key_u64(rec::P_XATTR, l.ino),
        rec::end_u64(rec::P_XATTR, l.ino),
        256,
    );
    while let Some(rows) = pages.next_page(state)? {
        for (k, _) in rows {
            let name = rec::tail(&k);
            if name.starts_with(b"trusted.") && !who.is_root() {
                continue;
            }
            names.push(name.to_vec());
        }
    }
    Ok(Reply {
        names,
        ..Default::default()
    })
}
