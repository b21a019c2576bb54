//! Attribute changes a mount answers from its own state and sends with the file's next
//! commit.
//!
//! tar, `cp -a` and rsync finish every file with futimens, fchown and fchmod on the descriptor
//! they wrote through, and then close it. Sent one by one, these are three metadata commands
//! (each a raft commit) per file; carried by the `CommitWrite` of the close
//! (`CommitWrite.then_set`) they cost nothing more. Meta applies them after the data, each as
//! the caller who made it, all or none with the commit, so another client that opens the file
//! after the close sees data and attributes together (close-to-open, as for the data).
//!
//! Only changes whose outcome the handle can compute exactly are deferred ([`deferrable`]):
//! no size, explicit times only (a "now" is the cluster's stamp, not ours), and no
//! set-user-ID/set-group-ID bit before or after (Linux's rules for dropping them on chown
//! and chmod live in meta alone). The kernel has already checked the caller's right to make
//! the change on a `default_permissions` mount; meta checks again when the commit arrives.

use kerfs_proto::{time_set, Attr, Caller, DeferredSetAttr, SetAttr};

const SET_ID: u32 = 0o6000;

/// Whether `set` on a file whose attributes are `current` may wait for the next commit.
pub(crate) fn deferrable(current: &Attr, set: &SetAttr) -> bool {
    let explicit = |t: &Option<kerfs_proto::TimeSet>| {
        t.as_ref()
            .is_none_or(|t| matches!(t.how, Some(time_set::How::At(_))))
    };
    set.size.is_none()
        && !set.clear_set_id
        && explicit(&set.atime)
        && explicit(&set.mtime)
        && current.mode & SET_ID == 0
        && set.mode.is_none_or(|m| m & SET_ID == 0)
}

/// `a` as it is once `set` (a [`deferrable`] change) is applied (ctime aside: the caller
/// knows when the change was made).
pub(crate) fn apply(a: &mut Attr, set: &SetAttr) {
    if let Some(m) = set.mode {
        a.mode = (a.mode & !0o7777) | (m & 0o7777);
    }
    if let Some(uid) = set.uid {
        a.uid = uid;
    }
    if let Some(gid) = set.gid {
        a.gid = gid;
    }
    let at = |t: &Option<kerfs_proto::TimeSet>| match t.as_ref().and_then(|t| t.how.as_ref()) {
        Some(time_set::How::At(ts)) => Some(*ts),
        _ => None,
    };
    if let Some(t) = at(&set.atime) {
        a.atime = Some(t);
    }
    if let Some(t) = at(&set.mtime) {
        a.mtime = Some(t);
    }
}

/// A change waiting for the commit, as meta will get it.
pub(crate) fn entry(caller: Option<Caller>, set: SetAttr) -> DeferredSetAttr {
    DeferredSetAttr {
        caller,
        set: Some(set),
    }
}

/// A write after an explicit mtime was set marks the file modified again (the commit
/// stamps its own time): the earlier explicit mtime must not win over it.
pub(crate) fn forget_mtimes(pending: &mut [DeferredSetAttr]) {
    for d in pending {
        if let Some(set) = &mut d.set {
            set.mtime = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kerfs_proto::Timespec;

    fn at(sec: i64) -> Option<kerfs_proto::TimeSet> {
        Some(kerfs_proto::TimeSet {
            how: Some(time_set::How::At(Timespec { sec, nsec: 0 })),
        })
    }

    #[test]
    fn only_predictable_changes_wait() {
        let file = Attr {
            mode: 0o100600,
            ..Default::default()
        };
        let chmod = |m| SetAttr {
            mode: Some(m),
            ..Default::default()
        };
        assert!(deferrable(&file, &chmod(0o644)));
        assert!(
            !deferrable(&file, &chmod(0o4755)),
            "set-user-ID rules stay in meta"
        );
        let setuid_file = Attr {
            mode: 0o104755,
            ..Default::default()
        };
        let chown = SetAttr {
            uid: Some(1),
            ..Default::default()
        };
        assert!(deferrable(&file, &chown));
        assert!(!deferrable(&setuid_file, &chown), "chown drops set-user-ID");
        let touch_now = SetAttr {
            mtime: Some(kerfs_proto::TimeSet {
                how: Some(time_set::How::Now(true)),
            }),
            ..Default::default()
        };
        assert!(!deferrable(&file, &touch_now), "now is the cluster's stamp");
        let truncate = SetAttr {
            size: Some(0),
            ..Default::default()
        };
        assert!(!deferrable(&file, &truncate));
    }

    #[test]
    fn applied_changes_keep_the_file_type_and_forget_mtime_after_a_write() {
        let mut a = Attr {
            mode: 0o100600,
            ..Default::default()
        };
        let set = SetAttr {
            mode: Some(0o100644),
            gid: Some(7),
            mtime: at(5),
            ..Default::default()
        };
        apply(&mut a, &set);
        assert_eq!(
            (a.mode, a.gid, a.mtime.map(|t| t.sec)),
            (0o100644, 7, Some(5))
        );
        let mut pending = vec![entry(None, set)];
        forget_mtimes(&mut pending);
        assert_eq!(pending[0].set.as_ref().and_then(|s| s.mtime), None);
        assert_eq!(pending[0].set.as_ref().and_then(|s| s.gid), Some(7));
    }
}
