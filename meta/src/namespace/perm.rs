//! Who may do what, with the errno Linux returns for each (EACCES for missing rwx bits,
//! EPERM for ownership): the shared rule of [`kerfs_proto::perm`] turned into the metadata
//! service's failures, and the sticky-bit rule.

use kerfs_proto::Attr;

pub use kerfs_proto::perm::{permitted as allowed, MAY_EXEC, MAY_READ, MAY_WRITE};

use super::{Fail, Who, R};

pub fn need(who: &Who, attr: &Attr, mask: u32, what: &str) -> R<()> {
    if allowed(who, attr, mask) {
        Ok(())
    } else {
        let mut bits = String::new();
        for (bit, c) in [(MAY_READ, 'r'), (MAY_WRITE, 'w'), (MAY_EXEC, 'x')] {
            if mask & bit != 0 {
                bits.push(c);
            }
        }
        Err(Fail::new(
            libc::EACCES,
            format!(
                "{what}: uid {} lacks {bits} permission on inode {} (mode {:o}, owner {}:{})",
                who.uid, attr.ino, attr.mode, attr.uid, attr.gid
            ),
        ))
    }
}

/// Search permission on a directory (every name looked up in it).
pub fn need_search(who: &Who, dir: &Attr) -> R<()> {
    need(who, dir, MAY_EXEC, "search directory")
}

/// The sticky-bit rule: in a sticky directory only the owner of the entry, the owner of the
/// directory or root may remove or rename it away.
pub fn check_sticky(who: &Who, dir: &Attr, victim: &Attr) -> R<()> {
    const S_ISVTX: u32 = 0o1000;
    if dir.mode & S_ISVTX == 0 || who.is_root() || who.uid == dir.uid || who.uid == victim.uid {
        return Ok(());
    }
    Err(Fail::new(
        libc::EPERM,
        format!(
            "directory {} is sticky and uid {} owns neither it nor inode {}",
            dir.ino, who.uid, victim.ino
        ),
    ))
}
