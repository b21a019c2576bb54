//! Unit tests of the namespace rules that are easy to get wrong: rename cases, nlink
//! accounting, the sticky bit, orphan inodes, exactly-once replies, readdir cookies under
//! concurrent changes, client expiry, bad input.

use kerfs_proto::{
    command::Op, read_op, time_set, Caller, Close, Command, ExpireClients, FileKind, GetAttr,
    GetXattr, Link, Lookup, MakeNode, Open, ReadDir, ReadOp, RegisterClient, Remove, Rename,
    RenewClient, Reply, SetAttr, SetXattr, StateDigest, TimeSet, Timespec, RENAME_EXCHANGE,
    RENAME_NOREPLACE, ROOT_INO, XATTR_CREATE, XATTR_REPLACE,
};

use super::*;
use crate::store::{Engine, MemEngine, WriteBatch};

struct T {
    eng: MemEngine,
    ns: Namespace,
    now: i64,
}

fn user(uid: u32, gid: u32) -> Option<Caller> {
    Some(Caller {
        uid,
        gid,
        groups: vec![],
    })
}

impl T {
    fn new() -> T {
        T {
            eng: MemEngine::new(),
            ns: Namespace::default(),
            now: 1000,
        }
    }

    fn run(&mut self, cmd: Command) -> Reply {
        let mut o = Overlay::new(&self.eng);
        let reply = self.ns.apply(&mut o, &cmd);
        let mut b = WriteBatch::default();
        for (k, v) in o.into_writes() {
            match v {
                Some(v) => b.put(k, v),
                None => b.delete(k),
            }
        }
        self.eng.write(b, true).unwrap();
        reply
    }

    fn as_(&mut self, caller: Option<Caller>, op: Op) -> Reply {
        self.now += 1;
        self.run(Command {
            now: Some(Timespec {
                sec: self.now,
                nsec: 0,
            }),
            caller,
            op: Some(op),
            ..Default::default()
        })
    }

    fn root(&mut self, op: Op) -> Reply {
        self.as_(None, op)
    }

    fn read(&self, caller: Option<Caller>, op: read_op::Op) -> Reply {
        self.ns.read(
            &self.eng,
            &ReadOp {
                caller,
                op: Some(op),
            },
        )
    }

    fn attr(&self, ino: u64) -> kerfs_proto::Attr {
        let r = self.read(None, read_op::Op::GetAttr(GetAttr { ino }));
        assert_eq!(r.errno, 0, "{}", r.message);
        r.attr.unwrap()
    }

    fn lookup(&self, parent: u64, name: &str) -> Reply {
        self.read(
            None,
            read_op::Op::Lookup(Lookup {
                parent,
                name: name.into(),
            }),
        )
    }

    fn mk(
        &mut self,
        caller: Option<Caller>,
        parent: u64,
        name: &str,
        kind: FileKind,
        mode: u32,
    ) -> Reply {
        self.as_(
            caller,
            Op::MakeNode(MakeNode {
                parent,
                name: name.into(),
                kind: kind as i32,
                mode,
                exclusive: true,
                target: b"x".to_vec(),
                ..Default::default()
            }),
        )
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> u64 {
        let r = self.mk(None, parent, name, FileKind::Directory, 0o755);
        assert_eq!(r.errno, 0, "{}", r.message);
        r.attr.unwrap().ino
    }

    fn file(&mut self, parent: u64, name: &str) -> u64 {
        let r = self.mk(None, parent, name, FileKind::Regular, 0o644);
        assert_eq!(r.errno, 0, "{}", r.message);
        r.attr.unwrap().ino
    }

    fn rename(&mut self, p: u64, n: &str, np: u64, nn: &str, flags: u32) -> Reply {
        self.root(Op::Rename(Rename {
            parent: p,
            name: n.into(),
            new_parent: np,
            new_name: nn.into(),
            flags,
        }))
    }

    fn rm(&mut self, caller: Option<Caller>, parent: u64, name: &str, dir: bool) -> Reply {
        self.as_(
            caller,
            Op::Remove(Remove {
                parent,
                name: name.into(),
                directory: dir,
            }),
        )
    }

    fn names(&self, dir: u64) -> Vec<String> {
        let r = self.read(
            None,
            read_op::Op::ReadDir(ReadDir {
                ino: dir,
                ..Default::default()
            }),
        );
        assert_eq!(r.errno, 0);
        r.entries
            .iter()
            .map(|e| String::from_utf8(e.name.clone()).unwrap())
            .collect()
    }
}

#[test]
fn empty_state_has_a_root() {
    let t = T::new();
    let a = t.attr(ROOT_INO);
    assert_eq!(
        (a.mode, a.nlink, a.kind),
        (0o755, 2, FileKind::Directory as i32)
    );
    assert_eq!(t.lookup(ROOT_INO, "..").attr.unwrap().ino, ROOT_INO);
}

#[test]
fn mkdir_rmdir_nlink_and_times() {
    let mut t = T::new();
    let a = t.mkdir(ROOT_INO, "a");
    assert_eq!(t.attr(ROOT_INO).nlink, 3);
    assert_eq!(t.attr(a).nlink, 2);
    let b = t.mkdir(a, "b");
    assert_eq!(t.attr(a).nlink, 3);
    assert_eq!(t.lookup(b, "..").attr.unwrap().ino, a);
    assert_eq!(t.lookup(b, ".").attr.unwrap().ino, b);
    let before = t.attr(a);
    assert_eq!(t.rm(None, ROOT_INO, "a", true).errno, libc::ENOTEMPTY);
    assert_eq!(t.rm(None, a, "b", false).errno, libc::EISDIR);
    assert_eq!(t.rm(None, a, "b", true).errno, 0);
    let after = t.attr(a);
    assert_eq!(after.nlink, 2);
    assert!(after.mtime.unwrap().sec > before.mtime.unwrap().sec);
    assert!(after.ctime.unwrap().sec > before.ctime.unwrap().sec);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino: b })).errno,
        libc::ENOENT
    );
    assert_eq!(t.rm(None, ROOT_INO, "a", true).errno, 0);
    assert_eq!(t.attr(ROOT_INO).nlink, 2);
    assert_eq!(t.rm(None, ROOT_INO, ".", true).errno, libc::EINVAL);
    assert_eq!(t.rm(None, ROOT_INO, "..", true).errno, libc::ENOTEMPTY);
    assert_eq!(t.rm(None, ROOT_INO, ".", false).errno, libc::EISDIR);
}

#[test]
fn hard_links() {
    let mut t = T::new();
    let f = t.file(ROOT_INO, "f");
    let d = t.mkdir(ROOT_INO, "d");
    let ctime = t.attr(f).ctime.unwrap();
    let r = t.root(Op::Link(Link {
        ino: f,
        new_parent: d,
        new_name: b"g".to_vec(),
    }));
    assert_eq!(r.errno, 0);
    let a = t.attr(f);
    assert_eq!(a.nlink, 2);
    assert!(a.ctime.unwrap().sec > ctime.sec);
    let r = t.root(Op::Link(Link {
        ino: d,
        new_parent: ROOT_INO,
        new_name: b"d2".to_vec(),
    }));
    assert_eq!(r.errno, libc::EPERM);
    let r = t.root(Op::Link(Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: b"d".to_vec(),
    }));
    assert_eq!(r.errno, libc::EEXIST);
    assert_eq!(t.rm(None, ROOT_INO, "f", false).errno, 0);
    assert_eq!(t.attr(f).nlink, 1);
    assert_eq!(t.rm(None, d, "g", false).errno, 0);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino: f })).errno,
        libc::ENOENT
    );
}

#[test]
fn rename_rules() {
    let mut t = T::new();
    let a = t.mkdir(ROOT_INO, "a");
    let b = t.mkdir(a, "b");
    let f = t.file(ROOT_INO, "f");
    let g = t.file(ROOT_INO, "g");
    let e = t.mkdir(ROOT_INO, "e");
    t.file(e, "inner");
    let empty = t.mkdir(ROOT_INO, "empty");

    assert_eq!(t.rename(ROOT_INO, "a", b, "x", 0).errno, libc::EINVAL);
    assert_eq!(t.rename(ROOT_INO, "a", a, "x", 0).errno, libc::EINVAL);
    assert_eq!(t.rename(a, "b", ROOT_INO, "a", 0).errno, libc::ENOTEMPTY);
    assert_eq!(
        t.rename(a, "b", ROOT_INO, "a", RENAME_EXCHANGE).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.rename(ROOT_INO, "f", ROOT_INO, "e", 0).errno,
        libc::EISDIR
    );
    assert_eq!(
        t.rename(ROOT_INO, "a", ROOT_INO, "f", 0).errno,
        libc::ENOTDIR
    );
    assert_eq!(
        t.rename(ROOT_INO, "a", ROOT_INO, "e", 0).errno,
        libc::ENOTEMPTY
    );
    assert_eq!(
        t.rename(ROOT_INO, "f", ROOT_INO, "g", RENAME_NOREPLACE)
            .errno,
        libc::EEXIST
    );
    assert_eq!(
        t.rename(ROOT_INO, "f", ROOT_INO, "zz", RENAME_EXCHANGE)
            .errno,
        libc::ENOENT
    );
    assert_eq!(
        t.rename(ROOT_INO, "zz", ROOT_INO, "f", 0).errno,
        libc::ENOENT
    );
    assert_eq!(
        t.rename(ROOT_INO, "f", ROOT_INO, "g", 3).errno,
        libc::EINVAL
    );
    assert_eq!(t.rename(ROOT_INO, ".", ROOT_INO, "g", 0).errno, libc::EBUSY);

    // Onto itself: nothing changes, not even ctime.
    let before = t.attr(f);
    assert_eq!(t.rename(ROOT_INO, "f", ROOT_INO, "f", 0).errno, 0);
    assert_eq!(t.attr(f), before);

    // Replace a file: the old one is gone, the moved one's ctime moves.
    assert_eq!(t.rename(ROOT_INO, "f", ROOT_INO, "g", 0).errno, 0);
    assert_eq!(t.lookup(ROOT_INO, "g").attr.unwrap().ino, f);
    assert_eq!(t.lookup(ROOT_INO, "f").errno, libc::ENOENT);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino: g })).errno,
        libc::ENOENT
    );
    assert!(t.attr(f).ctime.unwrap().sec > before.ctime.unwrap().sec);

    // Move a directory across parents: nlinks and "..".
    let root_links = t.attr(ROOT_INO).nlink;
    assert_eq!(t.rename(a, "b", e, "b", 0).errno, 0);
    assert_eq!(t.attr(a).nlink, 2);
    assert_eq!(t.attr(e).nlink, 3);
    assert_eq!(t.lookup(b, "..").attr.unwrap().ino, e);
    // Replace an empty directory by a directory from elsewhere.
    assert_eq!(t.rename(e, "b", ROOT_INO, "empty", 0).errno, 0);
    assert_eq!(t.attr(e).nlink, 2);
    assert_eq!(t.attr(ROOT_INO).nlink, root_links);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino: empty }))
            .errno,
        libc::ENOENT
    );
    assert_eq!(t.lookup(b, "..").attr.unwrap().ino, ROOT_INO);

    // Exchange a file and a directory across parents.
    assert_eq!(t.rename(ROOT_INO, "g", a, "b2", RENAME_NOREPLACE).errno, 0);
    let root_links = t.attr(ROOT_INO).nlink;
    assert_eq!(
        t.rename(a, "b2", ROOT_INO, "empty", RENAME_EXCHANGE).errno,
        0
    );
    assert_eq!(t.lookup(a, "b2").attr.unwrap().ino, b);
    assert_eq!(t.lookup(ROOT_INO, "empty").attr.unwrap().ino, f);
    assert_eq!(t.attr(a).nlink, 3);
    assert_eq!(t.attr(ROOT_INO).nlink, root_links - 1);
    assert_eq!(t.lookup(b, "..").attr.unwrap().ino, a);
}

#[test]
fn sticky_directory() {
    let mut t = T::new();
    let tmp = t.mkdir(ROOT_INO, "tmp");
    t.root(Op::SetAttr(SetAttr {
        ino: tmp,
        mode: Some(0o1777),
        ..Default::default()
    }));
    assert_eq!(
        t.mk(user(10, 10), tmp, "mine", FileKind::Regular, 0o644)
            .errno,
        0
    );
    assert_eq!(
        t.mk(user(11, 11), tmp, "theirs", FileKind::Regular, 0o666)
            .errno,
        0
    );
    assert_eq!(t.rm(user(10, 10), tmp, "theirs", false).errno, libc::EPERM);
    let r = t.as_(
        user(10, 10),
        Op::Rename(Rename {
            parent: tmp,
            name: b"theirs".to_vec(),
            new_parent: tmp,
            new_name: b"x".to_vec(),
            flags: 0,
        }),
    );
    assert_eq!(r.errno, libc::EPERM);
    assert_eq!(t.rm(user(10, 10), tmp, "mine", false).errno, 0);
    assert_eq!(t.rm(None, tmp, "theirs", false).errno, 0);
}

#[test]
fn permissions_and_ownership() {
    let mut t = T::new();
    let d = t.mkdir(ROOT_INO, "d");
    // uid 10 cannot create in a root-owned 0755 directory.
    assert_eq!(
        t.mk(user(10, 10), d, "x", FileKind::Regular, 0o644).errno,
        libc::EACCES
    );
    t.root(Op::SetAttr(SetAttr {
        ino: d,
        mode: Some(0o777),
        ..Default::default()
    }));
    let f = t
        .mk(user(10, 10), d, "x", FileKind::Regular, 0o644)
        .attr
        .unwrap()
        .ino;
    assert_eq!(t.attr(f).uid, 10);
    // Non-owner chmod: EPERM; owner chown to another uid: EPERM; chgrp to own group: ok.
    let chmod = |mode| {
        Op::SetAttr(SetAttr {
            ino: f,
            mode: Some(mode),
            ..Default::default()
        })
    };
    assert_eq!(t.as_(user(11, 11), chmod(0o600)).errno, libc::EPERM);
    let chown = |uid, gid| {
        Op::SetAttr(SetAttr {
            ino: f,
            uid,
            gid,
            ..Default::default()
        })
    };
    assert_eq!(
        t.as_(user(10, 10), chown(Some(11), None)).errno,
        libc::EPERM
    );
    assert_eq!(
        t.as_(user(10, 10), chown(None, Some(12))).errno,
        libc::EPERM
    );
    let caller = Some(Caller {
        uid: 10,
        gid: 10,
        groups: vec![12],
    });
    assert_eq!(t.as_(caller, chown(None, Some(12))).errno, 0);
    // Non-root chmod with setgid of a group it is not in: the bit is dropped.
    assert_eq!(t.as_(user(10, 10), chmod(0o2755)).errno, 0);
    assert_eq!(t.attr(f).mode, 0o755);
    // chown clears setuid (and setgid with group exec) of files.
    assert_eq!(t.root(chmod(0o6755)).errno, 0);
    assert_eq!(t.root(chown(Some(20), None)).errno, 0);
    assert_eq!(t.attr(f).mode, 0o755);
    // Times: explicit needs ownership (EPERM), "now" needs write permission (EACCES).
    let times = |how| {
        Op::SetAttr(SetAttr {
            ino: f,
            atime: Some(TimeSet { how: Some(how) }),
            ..Default::default()
        })
    };
    assert_eq!(
        t.as_(user(11, 11), times(time_set::How::Now(true))).errno,
        libc::EACCES
    );
    let at = time_set::How::At(Timespec { sec: 5, nsec: 0 });
    assert_eq!(t.as_(user(11, 11), times(at)).errno, libc::EPERM);
    assert_eq!(t.root(times(at)).errno, 0);
    assert_eq!(t.attr(f).atime.unwrap().sec, 5);
    // Truncate needs write permission.
    let trunc = Op::SetAttr(SetAttr {
        ino: f,
        size: Some(10),
        ..Default::default()
    });
    assert_eq!(t.as_(user(11, 11), trunc.clone()).errno, libc::EACCES);
    assert_eq!(t.root(trunc).errno, 0);
    assert_eq!(t.attr(f).size, 10);
    // Device nodes are root's.
    assert_eq!(
        t.mk(user(10, 10), d, "dev", FileKind::CharDevice, 0o644)
            .errno,
        libc::EPERM
    );
}

#[test]
fn setgid_directory_inheritance() {
    let mut t = T::new();
    let d = t.mkdir(ROOT_INO, "d");
    t.root(Op::SetAttr(SetAttr {
        ino: d,
        mode: Some(0o2777),
        gid: Some(50),
        ..Default::default()
    }));
    let sub = t
        .mk(user(10, 10), d, "sub", FileKind::Directory, 0o755)
        .attr
        .unwrap();
    assert_eq!((sub.gid, sub.mode), (50, 0o2755));
    let f = t
        .mk(user(10, 10), d, "f", FileKind::Regular, 0o2755)
        .attr
        .unwrap();
    assert_eq!((f.gid, f.mode), (50, 0o755));
}

#[test]
fn orphan_inode_lives_until_last_close() {
    let mut t = T::new();
    let r = t.root(Op::MakeNode(MakeNode {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        kind: FileKind::Regular as i32,
        mode: 0o600,
        exclusive: true,
        open: true,
        open_flags: libc::O_RDWR as u32,
        ..Default::default()
    }));
    assert_eq!(r.errno, 0);
    let (ino, h1) = (r.attr.unwrap().ino, r.handle);
    t.root(Op::SetXattr(SetXattr {
        ino,
        name: b"user.k".to_vec(),
        value: b"v".to_vec(),
        flags: 0,
    }));
    let h2 = t.root(Op::Open(Open { ino, flags: 0 })).handle;
    assert_ne!(h1, h2);
    assert_eq!(t.rm(None, ROOT_INO, "f", false).errno, 0);
    assert_eq!(t.attr(ino).nlink, 0);
    assert_eq!(
        t.root(Op::Close(Close {
            handle: h1,
            more: vec![]
        }))
        .errno,
        0
    );
    assert_eq!(t.attr(ino).nlink, 0);
    assert_eq!(
        t.root(Op::Close(Close {
            handle: h1,
            more: vec![]
        }))
        .errno,
        libc::EBADF
    );
    assert_eq!(
        t.root(Op::Close(Close {
            handle: h2,
            more: vec![]
        }))
        .errno,
        0
    );
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino })).errno,
        libc::ENOENT
    );
    // Nothing of the inode is left: its xattrs went with it.
    let rows = t.eng.scan(b"X", b"Y", 10).unwrap();
    assert!(rows.is_empty());
    let stats = t
        .read(None, read_op::Op::StatFs(Default::default()))
        .stats
        .unwrap();
    assert_eq!(stats.files, 1);
}

/// A create that asks for a data handle gets two handles and the file's layout; the inode of
/// an unlinked file lives until both are closed. Opening an existing file gets neither.
#[test]
fn create_with_a_data_handle() {
    let mut t = T::new();
    let create = |exclusive| {
        Op::MakeNode(MakeNode {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            kind: FileKind::Regular as i32,
            mode: 0o400,
            exclusive,
            open: true,
            open_flags: libc::O_WRONLY as u32,
            data_handle: true,
            ..Default::default()
        })
    };
    let r = t.root(create(true));
    assert_eq!(r.errno, 0);
    let (ino, h, d) = (r.attr.unwrap().ino, r.handle, r.data_handle);
    assert!(h != 0 && d != 0 && h != d, "handles {h} and {d}");
    assert!(
        r.layout.is_some(),
        "a created file's reply carries its layout"
    );
    let again = t.root(create(false));
    assert_eq!(again.errno, 0);
    assert_eq!((again.data_handle, again.layout), (0, None));
    assert_eq!(
        t.root(Op::Close(Close {
            handle: again.handle,
            more: vec![]
        }))
        .errno,
        0
    );
    assert_eq!(t.rm(None, ROOT_INO, "f", false).errno, 0);
    // Both closed in one command, all or none: a handle given twice fails it, and both
    // stay open.
    let twice = Close {
        handle: h,
        more: vec![d, h],
    };
    assert_eq!(t.root(Op::Close(twice)).errno, libc::EBADF);
    assert_eq!(t.read(None, read_op::Op::GetAttr(GetAttr { ino })).errno, 0);
    let both = Close {
        handle: h,
        more: vec![d],
    };
    assert_eq!(t.root(Op::Close(both)).errno, 0);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino })).errno,
        libc::ENOENT
    );
}

#[test]
fn open_truncates_and_checks_access() {
    let mut t = T::new();
    let f = t.file(ROOT_INO, "f");
    t.root(Op::SetAttr(SetAttr {
        ino: f,
        size: Some(100),
        ..Default::default()
    }));
    let r = t.as_(
        user(5, 5),
        Op::Open(Open {
            ino: f,
            flags: libc::O_WRONLY as u32,
        }),
    );
    assert_eq!(r.errno, libc::EACCES);
    assert_eq!(
        t.as_(user(5, 5), Op::Open(Open { ino: f, flags: 0 })).errno,
        0
    );
    let r = t.root(Op::Open(Open {
        ino: f,
        flags: (libc::O_RDWR | libc::O_TRUNC) as u32,
    }));
    assert_eq!((r.errno, r.attr.unwrap().size), (0, 0));
    assert_eq!(
        t.root(Op::Open(Open {
            ino: ROOT_INO,
            flags: libc::O_WRONLY as u32
        }))
        .errno,
        libc::EISDIR
    );
    let stats = t
        .read(None, read_op::Op::StatFs(Default::default()))
        .stats
        .unwrap();
    assert_eq!(stats.blocks, stats.blocks_free);
}

fn client_cmd(client_id: u64, seq: u64, acked_below: u64, now: i64, op: Op) -> Command {
    Command {
        client_id,
        seq,
        acked_below,
        now: Some(Timespec { sec: now, nsec: 0 }),
        caller: None,
        op: Some(op),
        sync: false,
    }
}

fn register(t: &mut T, now: i64, lease_ms: u64) -> u64 {
    let r = t.run(client_cmd(
        0,
        77,
        0,
        now,
        Op::RegisterClient(RegisterClient {
            description: "test".into(),
            lease_ms,
        }),
    ));
    assert_eq!(r.errno, 0);
    r.client_id
}

#[test]
fn exactly_once_replies() {
    let mut t = T::new();
    let c = register(&mut t, 100, 10_000);
    let mk = |name: &str| {
        Op::MakeNode(MakeNode {
            parent: ROOT_INO,
            name: name.into(),
            kind: FileKind::Regular as i32,
            mode: 0o644,
            exclusive: true,
            ..Default::default()
        })
    };
    let r1 = t.run(client_cmd(c, 1, 1, 101, mk("a")));
    assert_eq!(r1.errno, 0);
    // A retry gets the same reply and creates nothing more.
    let again = t.run(client_cmd(c, 1, 1, 102, mk("a")));
    assert_eq!(again, r1);
    // A failed command's errno is cached too.
    let r2 = t.run(client_cmd(c, 2, 1, 103, mk("a")));
    assert_eq!(r2.errno, libc::EEXIST);
    assert_eq!(t.run(client_cmd(c, 2, 1, 104, mk("zz"))), r2);
    // Acknowledging drops replies; a retry below the floor is refused.
    assert_eq!(t.run(client_cmd(c, 3, 3, 105, mk("b"))).errno, 0);
    let stale = t.run(client_cmd(c, 1, 3, 106, mk("c")));
    assert_eq!(stale.errno, libc::EINVAL);
    assert_eq!(t.lookup(ROOT_INO, "c").errno, libc::ENOENT);
    let cached = t.eng.scan(b"r", b"s", 100).unwrap();
    let replies: Vec<_> = cached.iter().filter(|(k, _)| k[0] == b'r').collect();
    assert_eq!(replies.len(), 1);
    // Unknown client: ESTALE with the message the client library looks for.
    let r = t.run(client_cmd(99, 1, 1, 107, mk("d")));
    assert_eq!(r.errno, libc::ESTALE);
    assert!(r.message.contains("session"));
}

#[test]
fn client_expiry_closes_handles() {
    let mut t = T::new();
    let c = register(&mut t, 100, 1_000);
    let keep = register(&mut t, 100, 1_000);
    let r = t.run(client_cmd(
        c,
        1,
        1,
        100,
        Op::MakeNode(MakeNode {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            kind: FileKind::Regular as i32,
            mode: 0o644,
            exclusive: true,
            open: true,
            ..Default::default()
        }),
    ));
    let ino = r.attr.unwrap().ino;
    assert_eq!(
        t.run(client_cmd(
            c,
            2,
            1,
            100,
            Op::Remove(Remove {
                parent: ROOT_INO,
                name: b"f".to_vec(),
                directory: false,
            })
        ))
        .errno,
        0
    );
    // Renewing keeps `keep` alive past the first lease.
    assert_eq!(
        t.run(client_cmd(
            keep,
            1,
            1,
            100 + 1,
            Op::RenewClient(RenewClient {})
        ))
        .errno,
        0
    );
    // Before the lease ends nothing happens.
    t.run(client_cmd(
        0,
        0,
        0,
        101,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert_eq!(t.attr(ino).nlink, 0);
    t.run(client_cmd(
        0,
        0,
        0,
        101,
        Op::ExpireClients(ExpireClients {}),
    ));
    t.run(client_cmd(
        0,
        0,
        0,
        101,
        Op::ExpireClients(ExpireClients {}),
    ));
    let r = t.run(client_cmd(
        0,
        0,
        0,
        102,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert_eq!(r.errno, 0);
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino })).errno,
        libc::ENOENT
    );
    let r = t.run(client_cmd(c, 3, 1, 102, Op::RenewClient(RenewClient {})));
    assert_eq!(r.errno, libc::ESTALE);
    assert!(t
        .eng
        .scan(b"r", b"s", 10)
        .unwrap()
        .iter()
        .all(|(k, _)| k[1..9] != c.to_be_bytes()));
    assert_eq!(
        t.run(client_cmd(keep, 2, 2, 102, Op::RenewClient(RenewClient {})))
            .errno,
        0
    );
}

#[test]
fn readdir_cookies_survive_concurrent_changes() {
    let mut t = T::new();
    let d = t.mkdir(ROOT_INO, "d");
    for i in 0..20 {
        t.file(d, &format!("f{i:02}"));
    }
    let page = |t: &T, cookie| {
        t.read(
            None,
            read_op::Op::ReadDir(ReadDir {
                ino: d,
                cookie,
                limit: 5,
                plus: true,
            }),
        )
    };
    let mut seen = Vec::new();
    let mut cookie = 0;
    let mut round = 0;
    loop {
        let r = page(&t, cookie);
        assert_eq!(r.errno, 0);
        for e in &r.entries {
            assert!(e.cookie > 2, "cookies 1 and 2 are left for . and ..");
            assert!(e.attr.is_some());
            seen.push(String::from_utf8(e.name.clone()).unwrap());
            cookie = e.cookie;
        }
        if r.eof {
            break;
        }
        // Between pages: delete an entry not seen yet, add new ones, rename one.
        round += 1;
        assert_eq!(
            t.rm(None, d, &format!("f{:02}", 19 - round), false).errno,
            0
        );
        t.file(d, &format!("new{round}"));
        assert_eq!(
            t.rename(d, &format!("f{:02}", round - 1), d, &format!("r{round}"), 0)
                .errno,
            0
        );
    }
    // Every entry that existed throughout appears exactly once.
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no repeats: {seen:?}");
    for i in round..(19 - round) {
        let name = format!("f{i:02}");
        assert!(seen.contains(&name), "{name} missing from {seen:?}");
    }
}

#[test]
fn xattrs() {
    let mut t = T::new();
    let f = t.file(ROOT_INO, "f");
    let set = |name: &[u8], value: &[u8], flags| {
        Op::SetXattr(SetXattr {
            ino: f,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        })
    };
    assert_eq!(
        t.root(set(b"user.a", b"1", XATTR_REPLACE)).errno,
        libc::ENODATA
    );
    assert_eq!(t.root(set(b"user.a", b"1", XATTR_CREATE)).errno, 0);
    assert_eq!(
        t.root(set(b"user.a", b"2", XATTR_CREATE)).errno,
        libc::EEXIST
    );
    assert_eq!(t.root(set(b"user.a", b"2", XATTR_REPLACE)).errno, 0);
    assert_eq!(t.root(set(b"other.a", b"2", 0)).errno, libc::EOPNOTSUPP);
    assert_eq!(t.root(set(&[b'u'; 256], b"2", 0)).errno, libc::ERANGE);
    assert_eq!(
        t.root(set(b"user.big", &vec![0; 65537], 0)).errno,
        libc::E2BIG
    );
    assert_eq!(
        t.as_(user(3, 3), set(b"trusted.x", b"", 0)).errno,
        libc::EPERM
    );
    assert_eq!(t.root(set(b"trusted.x", b"", 0)).errno, 0);
    let get = |n: &[u8]| {
        read_op::Op::GetXattr(GetXattr {
            ino: f,
            name: n.to_vec(),
        })
    };
    assert_eq!(t.read(None, get(b"user.a")).data, b"2");
    assert_eq!(t.read(None, get(b"user.b")).errno, libc::ENODATA);
    assert_eq!(t.read(user(3, 3), get(b"trusted.x")).errno, libc::ENODATA);
    let list = |c| {
        t.read(c, read_op::Op::ListXattr(kerfs_proto::ListXattr { ino: f }))
            .names
    };
    assert_eq!(list(None), vec![b"trusted.x".to_vec(), b"user.a".to_vec()]);
    assert_eq!(list(user(3, 3)), vec![b"user.a".to_vec()]);
    let rm = |n: &[u8]| {
        Op::RemoveXattr(kerfs_proto::RemoveXattr {
            ino: f,
            name: n.to_vec(),
        })
    };
    assert_eq!(t.root(rm(b"user.a")).errno, 0);
    assert_eq!(t.root(rm(b"user.a")).errno, libc::ENODATA);
}

#[test]
fn bad_input_is_refused_without_writes() {
    let mut t = T::new();
    t.mkdir(ROOT_INO, "d");
    let before = t.eng.scan(&[], &[], usize::MAX).unwrap();
    let long = "x".repeat(256);
    assert_eq!(
        t.mk(None, ROOT_INO, &long, FileKind::Regular, 0o644).errno,
        libc::ENAMETOOLONG
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "a/b", FileKind::Regular, 0o644).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "a\0b", FileKind::Regular, 0o644).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "", FileKind::Regular, 0o644).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.mk(None, ROOT_INO, ".", FileKind::Directory, 0o644).errno,
        libc::EEXIST
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "m", FileKind::Regular, 0o10644).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "m", FileKind::Unknown, 0o644).errno,
        libc::EINVAL
    );
    assert_eq!(
        t.mk(None, 999, "m", FileKind::Regular, 0o644).errno,
        libc::ENOENT
    );
    let r = t.root(Op::MakeNode(MakeNode {
        parent: ROOT_INO,
        name: b"l".to_vec(),
        kind: FileKind::Symlink as i32,
        target: vec![b'a'; 4096],
        exclusive: true,
        ..Default::default()
    }));
    assert_eq!(r.errno, libc::ENAMETOOLONG);
    let r = t.run(Command {
        op: None,
        ..Default::default()
    });
    assert_eq!(r.errno, libc::EINVAL);
    assert!(!r.message.is_empty());
    assert_eq!(t.eng.scan(&[], &[], usize::MAX).unwrap(), before);
    // A corrupt record is EIO, not a panic.
    let mut b = WriteBatch::default();
    b.put(
        records::key_u64(records::P_INODE, ROOT_INO),
        vec![0xff, 0xff, 0xff],
    );
    t.eng.write(b, true).unwrap();
    assert_eq!(
        t.read(None, read_op::Op::GetAttr(GetAttr { ino: ROOT_INO }))
            .errno,
        libc::EIO
    );
    assert_eq!(
        t.mk(None, ROOT_INO, "m", FileKind::Regular, 0o644).errno,
        libc::EIO
    );
}

#[test]
fn digest_is_deterministic() {
    let run = || {
        let mut t = T::new();
        let d = t.mkdir(ROOT_INO, "d");
        t.file(d, "f");
        t.rename(d, "f", ROOT_INO, "g", 0);
        t.read(None, read_op::Op::StateDigest(StateDigest {})).data
    };
    let a = run();
    assert_eq!(a.len(), 32);
    assert_eq!(a, run());
    let empty = T::new();
    assert_ne!(
        a,
        empty
            .read(None, read_op::Op::StateDigest(StateDigest {}))
            .data
    );
    assert_eq!(T::new().names(ROOT_INO), Vec::<String>::new());
}

/// Locks through the state machine: across two client sessions, dropped by close, by
/// ReleaseLocks of the owner, and by the expiry of a dead client.
#[test]
fn locks_across_clients_close_and_expiry() {
    use kerfs_proto::{GetLock, LockKind, LockType, ReleaseLocks, SetLock};
    let mut t = T::new();
    let a = register(&mut t, 100, 1_000);
    let b = register(&mut t, 100, 60_000);
    let r = t.run(client_cmd(
        a,
        1,
        1,
        100,
        Op::MakeNode(MakeNode {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            kind: FileKind::Regular as i32,
            mode: 0o644,
            exclusive: true,
            open: true,
            open_flags: libc::O_RDWR as u32,
            ..Default::default()
        }),
    ));
    assert_eq!(r.errno, 0, "{}", r.message);
    let (ino, ha) = (r.attr.unwrap().ino, r.handle);
    let open_b = |t: &mut T, seq| {
        let r = t.run(client_cmd(
            b,
            seq,
            seq,
            100,
            Op::Open(Open {
                ino,
                flags: libc::O_RDWR as u32,
            }),
        ));
        assert_eq!(r.errno, 0, "{}", r.message);
        r.handle
    };
    let hb = open_b(&mut t, 1);
    let set = |handle, owner, start, end, ty: LockType| {
        Op::SetLock(SetLock {
            handle,
            owner,
            pid: 42,
            start,
            end,
            r#type: ty as i32,
            kind: LockKind::Posix as i32,
            wait: false,
        })
    };
    let get = |client_id, owner, ty: LockType| {
        read_op::Op::GetLock(GetLock {
            ino,
            client_id,
            owner,
            start: 0,
            end: u64::MAX,
            r#type: ty as i32,
            kind: LockKind::Posix as i32,
        })
    };
    // Client a (owner 7) write-locks bytes 0..=99; b (same owner number) cannot, and sees it.
    assert_eq!(
        t.run(client_cmd(a, 2, 2, 100, set(ha, 7, 0, 99, LockType::Write)))
            .errno,
        0
    );
    let r = t.run(client_cmd(b, 2, 2, 100, set(hb, 7, 50, 50, LockType::Read)));
    assert_eq!(r.errno, libc::EAGAIN);
    let seen = t.read(None, get(b, 7, LockType::Read)).lock.unwrap();
    assert_eq!(
        (seen.client_id, seen.pid, seen.start, seen.end),
        (a, 42, 0, 99)
    );
    // The holder itself sees no conflict with its own lock.
    assert!(t.read(None, get(a, 7, LockType::Write)).lock.is_none());
    // Disjoint bytes are free.
    assert_eq!(
        t.run(client_cmd(
            b,
            3,
            3,
            100,
            set(hb, 7, 100, 199, LockType::Write)
        ))
        .errno,
        0
    );
    // Another client's handle cannot be used.
    assert_eq!(
        t.run(client_cmd(b, 4, 4, 100, set(ha, 7, 0, 0, LockType::Read)))
            .errno,
        libc::EBADF
    );
    // ReleaseLocks of a's owner (close of a descriptor) frees 0..=99.
    let rel = Op::ReleaseLocks(ReleaseLocks {
        handle: ha,
        owner: 7,
        kind: LockKind::Posix as i32,
    });
    assert_eq!(t.run(client_cmd(a, 3, 3, 100, rel)).errno, 0);
    assert_eq!(
        t.run(client_cmd(b, 5, 5, 100, set(hb, 7, 0, 99, LockType::Read)))
            .errno,
        0
    );
    // Closing b's handle drops all its locks.
    assert_eq!(
        t.run(client_cmd(
            b,
            6,
            6,
            100,
            Op::Close(Close {
                handle: hb,
                more: vec![]
            })
        ))
        .errno,
        0
    );
    assert!(t.read(None, get(a, 1, LockType::Write)).lock.is_none());
    assert!(
        t.eng.scan(b"K", b"L", 10).unwrap().is_empty(),
        "no empty lock records"
    );
    // a locks everything, then dies: the expiry frees the file for b.
    assert_eq!(
        t.run(client_cmd(
            a,
            4,
            4,
            100,
            set(ha, 7, 0, u64::MAX, LockType::Write)
        ))
        .errno,
        0
    );
    let hb = open_b(&mut t, 7);
    assert_eq!(
        t.run(client_cmd(b, 8, 8, 100, set(hb, 1, 0, 0, LockType::Read)))
            .errno,
        libc::EAGAIN
    );
    t.run(client_cmd(
        0,
        0,
        0,
        102,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert_eq!(
        t.run(client_cmd(b, 9, 9, 102, set(hb, 1, 0, 0, LockType::Write)))
            .errno,
        0
    );
    // Bad input: reversed range, unknown type.
    assert_eq!(
        t.run(client_cmd(
            b,
            10,
            10,
            102,
            set(hb, 1, 9, 8, LockType::Write)
        ))
        .errno,
        libc::EINVAL
    );
    let mut bad = set(hb, 1, 0, 0, LockType::Write);
    if let Op::SetLock(s) = &mut bad {
        s.r#type = 9;
    }
    assert_eq!(t.run(client_cmd(b, 11, 11, 102, bad)).errno, libc::EINVAL);
}

/// F_SETLKW records its owner as waiting; a request whose holders wait (through a chain)
/// for the requester gets EDEADLK; cancelled, expired or granted waits take no part.
#[test]
fn lock_waits_detect_deadlocks() {
    use kerfs_proto::{CancelLockWait, LockKind, LockType, SetLock};
    let mut t = T::new();
    let a = register(&mut t, 100, 60_000);
    let b = register(&mut t, 100, 60_000);
    let c = register(&mut t, 100, 60_000);
    let f = t.file(ROOT_INO, "f");
    let open = |t: &mut T, client, seq| {
        let r = t.run(client_cmd(
            client,
            seq,
            seq,
            100,
            Op::Open(Open {
                ino: f,
                flags: libc::O_RDWR as u32,
            }),
        ));
        assert_eq!(r.errno, 0, "{}", r.message);
        r.handle
    };
    let (ha, hb, hc) = (open(&mut t, a, 1), open(&mut t, b, 1), open(&mut t, c, 1));
    let lock = |handle, byte, wait| {
        Op::SetLock(SetLock {
            handle,
            owner: 1,
            pid: 1,
            start: byte,
            end: byte,
            r#type: LockType::Write as i32,
            kind: LockKind::Posix as i32,
            wait,
        })
    };
    // a holds byte 0, b byte 1, c byte 2.
    for (cl, h, byte) in [(a, ha, 0), (b, hb, 1), (c, hc, 2)] {
        assert_eq!(
            t.run(client_cmd(cl, 2, 2, 100, lock(h, byte, false))).errno,
            0
        );
    }
    // a waits for b's byte, b for c's: both only EAGAIN (and recorded).
    assert_eq!(
        t.run(client_cmd(a, 3, 3, 100, lock(ha, 1, true))).errno,
        libc::EAGAIN
    );
    assert_eq!(
        t.run(client_cmd(b, 3, 3, 100, lock(hb, 2, true))).errno,
        libc::EAGAIN
    );
    // c asking for a's byte closes the cycle c -> a -> b -> c.
    let r = t.run(client_cmd(c, 3, 3, 101, lock(hc, 0, true)));
    assert_eq!(r.errno, libc::EDEADLK, "{}", r.message);
    // Without waiting (F_SETLK) it is just EAGAIN.
    assert_eq!(
        t.run(client_cmd(c, 4, 4, 101, lock(hc, 0, false))).errno,
        libc::EAGAIN
    );
    // b gives up waiting: no cycle any more.
    let cancel = Op::CancelLockWait(CancelLockWait { owner: 1 });
    assert_eq!(t.run(client_cmd(b, 4, 4, 101, cancel)).errno, 0);
    assert_eq!(
        t.run(client_cmd(c, 5, 5, 101, lock(hc, 0, true))).errno,
        libc::EAGAIN
    );
    // Now c waits for a, a for b: b asking for c's byte closes the cycle the other way.
    assert_eq!(
        t.run(client_cmd(b, 5, 5, 102, lock(hb, 2, true))).errno,
        libc::EDEADLK
    );
    // Records older than their lifetime (the waiters stopped asking) take no part.
    assert_eq!(
        t.run(client_cmd(b, 6, 6, 110, lock(hb, 2, true))).errno,
        libc::EAGAIN
    );
    // A grant forgets the grantee's wait: c releases byte 2, b gets it.
    let unlock = Op::SetLock(SetLock {
        handle: hc,
        owner: 1,
        start: 2,
        end: 2,
        r#type: LockType::Unlock as i32,
        kind: LockKind::Posix as i32,
        ..Default::default()
    });
    assert_eq!(t.run(client_cmd(c, 6, 6, 110, unlock)).errno, 0);
    assert_eq!(t.run(client_cmd(b, 7, 7, 110, lock(hb, 2, true))).errno, 0);
    assert!(t
        .eng
        .scan(b"W", b"X", 10)
        .unwrap()
        .iter()
        .all(|(k, _)| k[1..9] != b.to_be_bytes()));
    // c's wait from time 110 is swept by the expiry once it is old.
    assert_eq!(
        t.run(client_cmd(c, 7, 7, 110, lock(hc, 1, true))).errno,
        libc::EAGAIN
    );
    // a's old record (a never came back) and c's.
    assert_eq!(t.eng.scan(b"W", b"X", 10).unwrap().len(), 2);
    t.run(client_cmd(
        0,
        0,
        0,
        112,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert_eq!(
        t.eng.scan(b"W", b"X", 10).unwrap().len(),
        1,
        "c's is still fresh"
    );
    t.run(client_cmd(
        0,
        0,
        0,
        114,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert!(t.eng.scan(b"W", b"X", 10).unwrap().is_empty());
}

#[test]
fn client_sweep_is_due_only_once_a_lease_ran_out() {
    let mut t = T::new();
    let due = |t: &T, sec: i64| t.ns.sweeps_due(&t.eng, &Timespec { sec, nsec: 0 });
    assert!(!due(&t, 100).clients, "no session yet");
    register(&mut t, 100, 1_000);
    assert!(!due(&t, 101).clients, "the lease runs until 101");
    assert!(due(&t, 102).clients, "the lease ran out at 101");
    assert!(!due(&t, 102).chunk_servers, "no chunk server registered");
    t.run(client_cmd(
        0,
        0,
        0,
        102,
        Op::ExpireClients(ExpireClients {}),
    ));
    assert!(!due(&t, 102).clients, "the sweep ended the session");
}
