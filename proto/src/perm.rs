//! Who may do what to an inode: the POSIX permission rule (owner, group, other bits; root's
//! overrides), decided on the [`Caller`] and [`Attr`] types every side already shares. The
//! metadata service applies it to every command and the mount to the operations it answers
//! itself, so the two can never disagree about a caller.

use crate::{Attr, Caller, FileKind};

/// Bits of an access mask, as in access(2) and the kernel's MAY_*.
pub const MAY_READ: u32 = 4;
pub const MAY_WRITE: u32 = 2;
pub const MAY_EXEC: u32 = 1;

/// Set-user-ID, set-group-ID and group-execute bits of `st_mode`.
pub const S_ISUID: u32 = 0o4000;
pub const S_ISGID: u32 = 0o2000;
pub const S_IXGRP: u32 = 0o010;

impl Caller {
    /// The superuser: every permission check passes (CAP_DAC_OVERRIDE, CAP_FOWNER,
    /// CAP_FSETID, CAP_CHOWN together; there are no finer capabilities on the wire).
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether `gid` is the caller's group or one of its supplementary groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the caller owns `attr` or is root (chmod, utimes with explicit times...).
    pub fn owns(&self, attr: &Attr) -> bool {
        self.is_root() || self.uid == attr.uid
    }
}

/// Whether `caller` has every permission in `mask` ([`MAY_READ`] | [`MAY_WRITE`] |
/// [`MAY_EXEC`]) on `attr`, as the kernel's generic_permission decides it without ACLs: the
/// owner's bits if the caller owns the inode, else the group's if it is in the inode's
/// group (supplementary groups included), else the others'. Root may read and write
/// anything, search any directory, and execute a file only if someone may.
pub fn permitted(caller: &Caller, attr: &Attr, mask: u32) -> bool {
    let mask = mask & 7;
    if caller.is_root() {
        return mask & MAY_EXEC == 0
            || attr.kind == FileKind::Directory as i32
            || attr.mode & 0o111 != 0;
    }
    let bits = if caller.uid == attr.uid {
        (attr.mode >> 6) & 7
    } else if caller.in_group(attr.gid) {
        (attr.mode >> 3) & 7
    } else {
        attr.mode & 7
    };
    bits & mask == mask
}

/// The mode of a regular file after a write or truncate by a caller without CAP_FSETID, or
/// after a chown, as Linux leaves it (file_remove_privs, notify_change): set-user-ID goes,
/// and set-group-ID goes when group-execute makes it a real one (without group-execute it
/// marks mandatory locking and stays).
pub fn clear_set_id(mode: u32) -> u32 {
    let mut mode = mode & !S_ISUID;
    if mode & S_IXGRP != 0 {
        mode &= !S_ISGID;
    }
    mode
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(mode: u32, uid: u32, gid: u32, kind: FileKind) -> Attr {
        Attr {
            mode,
            uid,
            gid,
            kind: kind as i32,
            ..Default::default()
        }
    }

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn owner_then_group_then_other() {
        let a = attr(0o640, 10, 99, FileKind::Regular);
        let owner = caller(10, 5, &[]);
        let member = caller(11, 5, &[99]);
        let other = caller(12, 5, &[]);
        assert!(permitted(&owner, &a, MAY_READ | MAY_WRITE));
        assert!(!permitted(&owner, &a, MAY_EXEC));
        assert!(
            permitted(&member, &a, MAY_READ),
            "supplementary group counts"
        );
        assert!(!permitted(&member, &a, MAY_WRITE));
        assert!(!permitted(&other, &a, MAY_READ));
        // The owner's bits decide even when the group's would allow more.
        let b = attr(0o070, 10, 99, FileKind::Regular);
        assert!(!permitted(&caller(10, 99, &[]), &b, MAY_READ));
        assert!(permitted(&caller(11, 99, &[]), &b, MAY_READ));
    }

    #[test]
    fn root_reads_and_writes_all_but_executes_only_what_someone_may() {
        let root = caller(0, 0, &[]);
        assert!(permitted(&root, &attr(0o000, 1, 1, FileKind::Regular), 6));
        assert!(!permitted(&root, &attr(0o600, 1, 1, FileKind::Regular), 1));
        assert!(permitted(&root, &attr(0o601, 1, 1, FileKind::Regular), 1));
        assert!(permitted(&root, &attr(0o000, 1, 1, FileKind::Directory), 1));
    }

    #[test]
    fn clear_set_id_drops_setuid_and_real_setgid() {
        assert_eq!(clear_set_id(0o4755), 0o755);
        assert_eq!(clear_set_id(0o6775), 0o775);
        // setgid without group-execute is a mandatory-lock mark, not a privilege.
        assert_eq!(clear_set_id(0o2664), 0o2664);
        assert_eq!(clear_set_id(0o1777), 0o1777);
    }
}
