//! Property test of the namespace state machine against a small, independent in-memory
//! model of the POSIX rules: random sequences of creates, links, removes, renames,
//! attribute changes, xattrs and opens, by root and two unprivileged callers, must give
//! the same errno as the model, and the resulting trees (names, kinds, modes, owners,
//! sizes, link counts, "..", xattrs) must match after every step.
//!
//! The model shares no code with the implementation: plain structs and the rules as the
//! Linux man pages and the kernel's namei.c state them.

use std::collections::BTreeMap;

use kerfs_meta::namespace::Namespace;
use kerfs_meta::store::{Engine, KvRead, MemEngine, Overlay, WriteBatch};
use kerfs_proto::{
    command::Op, read_op, Caller, Close, Command, FileKind, GetAttr, GetXattr, Link, ListXattr,
    Lookup, MakeNode, Open, ReadDir, ReadOp, RegisterClient, Remove, RemoveXattr, Rename, Reply,
    SetAttr, SetXattr, StatFs, Timespec,
};
use proptest::prelude::*;

const ROOT: u64 = 1;
const MISSING: u64 = 999_999;

// ------------------------------------------------------------------ the model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    parent: u64,
    entries: BTreeMap<Vec<u8>, u64>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    open: u32,
}

#[derive(Debug, Clone)]
struct Person {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Person {
    fn root(&self) -> bool {
        self.uid == 0
    }
    fn in_group(&self, g: u32) -> bool {
        self.gid == g || self.groups.contains(&g)
    }
}

struct Model {
    nodes: BTreeMap<u64, Node>,
    next_ino: u64,
    next_handle: u64,
    handles: BTreeMap<u64, u64>,
    gone: Vec<u64>,
}

type Res = Result<(), i32>;

fn can(p: &Person, n: &Node, mask: u32) -> bool {
    if p.root() {
        return true;
    }
    let bits = if p.uid == n.uid {
        n.mode >> 6
    } else if p.in_group(n.gid) {
        n.mode >> 3
    } else {
        n.mode
    } & 7;
    bits & mask == mask
}

fn need(p: &Person, n: &Node, mask: u32) -> Res {
    if can(p, n, mask) {
        Ok(())
    } else {
        Err(libc::EACCES)
    }
}

/// What Linux leaves of a regular file's mode after a chown, or a write or truncate by a
/// caller without CAP_FSETID: no set-user-ID, no set-group-ID if group-execute is set.
fn without_set_id(mode: u32) -> u32 {
    let mode = mode & !0o4000;
    if mode & 0o010 != 0 {
        mode & !0o2000
    } else {
        mode
    }
}

impl Model {
    fn new() -> Model {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                parent: ROOT,
                entries: BTreeMap::new(),
                xattrs: BTreeMap::new(),
                open: 0,
            },
        );
        Model {
            nodes,
            next_ino: 2,
            next_handle: 1,
            handles: BTreeMap::new(),
            gone: Vec::new(),
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, i32> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Node, i32> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if n.nlink == 0 {
            // Removed but still open: nothing can be created in it.
            return Err(libc::ENOENT);
        }
        Ok(n)
    }

    fn resolve(&self, path: &[&[u8]]) -> u64 {
        let mut cur = ROOT;
        for c in path {
            match self.nodes.get(&cur).and_then(|n| n.entries.get(*c)) {
                Some(&i) => cur = i,
                None => return MISSING,
            }
        }
        cur
    }

    /// An inode to operate on: half the time one the model knows (directories only when
    /// `dirs`), otherwise whatever one of a few fixed paths leads to (maybe nothing).
    fn pick(&self, x: u8, dirs: bool) -> u64 {
        if x.is_multiple_of(2) {
            let cands: Vec<u64> = self
                .nodes
                .iter()
                .filter(|(_, n)| !dirs || n.kind == Kind::Dir)
                .map(|(&i, _)| i)
                .collect();
            cands[(x as usize / 2) % cands.len()]
        } else {
            self.resolve(PATHS[(x as usize / 2) % PATHS.len()])
        }
    }

    fn reap(&mut self, ino: u64) {
        let n = &self.nodes[&ino];
        if n.nlink == 0 && n.open == 0 {
            self.nodes.remove(&ino);
            self.gone.push(ino);
        }
    }

    fn sticky_ok(p: &Person, dir: &Node, victim: &Node) -> bool {
        dir.mode & 0o1000 == 0 || p.root() || p.uid == dir.uid || p.uid == victim.uid
    }

    /// may_delete of namei.c: write+search, sticky, type.
    fn may_delete(&self, p: &Person, dir: u64, victim: u64, want_dir: bool) -> Res {
        let d = &self.nodes[&dir];
        let v = &self.nodes[&victim];
        need(p, d, 3)?;
        if !Self::sticky_ok(p, d, v) {
            return Err(libc::EPERM);
        }
        match (want_dir, v.kind == Kind::Dir) {
            (true, false) => Err(libc::ENOTDIR),
            (false, true) => Err(libc::EISDIR),
            _ => Ok(()),
        }
    }

    fn create(&mut self, p: &Person, parent: u64, name: &[u8], kind: Kind, mode: u32) -> Res {
        let d = self.dir(parent)?;
        need(p, d, 1)?;
        if name == b"." || d.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        need(p, d, 3)?;
        let sgid = d.mode & 0o2000 != 0;
        let gid = if sgid { d.gid } else { p.gid };
        let mode = match kind {
            Kind::Symlink => 0o777,
            Kind::Dir if sgid => mode | 0o2000,
            _ if sgid && mode & 0o2010 == 0o2010 && !p.in_group(gid) && !p.root() => mode & !0o2000,
            _ => mode,
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                mode,
                uid: p.uid,
                gid,
                size: if kind == Kind::Symlink { 1 } else { 0 },
                nlink: if kind == Kind::Dir { 2 } else { 1 },
                parent,
                entries: BTreeMap::new(),
                xattrs: BTreeMap::new(),
                open: 0,
            },
        );
        let d = self.nodes.get_mut(&parent).unwrap();
        d.entries.insert(name.to_vec(), ino);
        if kind == Kind::Dir {
            d.nlink += 1;
        }
        Ok(())
    }

    fn link(&mut self, p: &Person, ino: u64, parent: u64, name: &[u8]) -> Res {
        let n = self.node(ino)?.clone();
        let d = self.dir(parent)?;
        need(p, d, 1)?;
        if name == b"." || d.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        need(p, d, 3)?;
        if n.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        // Linux refuses to link an inode that is unlinked but still open.
        if n.nlink == 0 {
            return Err(libc::ENOENT);
        }
        self.nodes
            .get_mut(&parent)
            .unwrap()
            .entries
            .insert(name.to_vec(), ino);
        self.nodes.get_mut(&ino).unwrap().nlink += 1;
        Ok(())
    }

    fn remove(&mut self, p: &Person, parent: u64, name: &[u8], rmdir: bool) -> Res {
        let d = self.dir(parent)?;
        need(p, d, 1)?;
        if name == b"." {
            return Err(if rmdir { libc::EINVAL } else { libc::EISDIR });
        }
        let victim = *d.entries.get(name).ok_or(libc::ENOENT)?;
        self.may_delete(p, parent, victim, rmdir)?;
        if rmdir && !self.nodes[&victim].entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        let d = self.nodes.get_mut(&parent).unwrap();
        d.entries.remove(name);
        if rmdir {
            d.nlink -= 1;
            self.nodes.get_mut(&victim).unwrap().nlink = 0;
        } else {
            self.nodes.get_mut(&victim).unwrap().nlink -= 1;
        }
        self.reap(victim);
        Ok(())
    }

    fn is_ancestor(&self, anc: u64, mut cur: u64) -> bool {
        loop {
            if cur == anc {
                return true;
            }
            if cur == ROOT {
                return false;
            }
            cur = self.nodes[&cur].parent;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(&mut self, p: &Person, sp: u64, sn: &[u8], dp: u64, dn: &[u8], flags: u32) -> Res {
        let exchange = flags == 2;
        let noreplace = flags == 1;
        let s_dir = self.dir(sp)?;
        let d_dir = self.dir(dp)?;
        need(p, s_dir, 1)?;
        need(p, d_dir, 1)?;
        if sn == b"." {
            return Err(libc::EBUSY);
        }
        if dn == b"." {
            return Err(if noreplace { libc::EEXIST } else { libc::EBUSY });
        }
        let src = *s_dir.entries.get(sn).ok_or(libc::ENOENT)?;
        let dst = d_dir.entries.get(dn).copied();
        if exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if noreplace && dst.is_some() {
            return Err(libc::EEXIST);
        }
        let src_dir = self.nodes[&src].kind == Kind::Dir;
        if src_dir && self.is_ancestor(src, dp) {
            return Err(libc::EINVAL);
        }
        if let Some(t) = dst {
            let t_dir = self.nodes[&t].kind == Kind::Dir;
            if t_dir && t != src && self.is_ancestor(t, sp) {
                return Err(if exchange {
                    libc::EINVAL
                } else {
                    libc::ENOTEMPTY
                });
            }
            if t == src {
                return Ok(());
            }
        }
        let moving = sp != dp;
        self.may_delete(p, sp, src, src_dir)?;
        match dst {
            None => need(p, &self.nodes[&dp], 3)?,
            Some(t) if exchange => {
                let t_dir = self.nodes[&t].kind == Kind::Dir;
                self.may_delete(p, dp, t, t_dir)?
            }
            Some(t) => self.may_delete(p, dp, t, src_dir)?,
        }
        if moving && src_dir {
            need(p, &self.nodes[&src], 2)?;
        }
        if let Some(t) = dst {
            let tn = &self.nodes[&t];
            if exchange && moving && tn.kind == Kind::Dir {
                need(p, tn, 2)?;
            }
            if !exchange && tn.kind == Kind::Dir && !tn.entries.is_empty() {
                return Err(libc::ENOTEMPTY);
            }
        }
        // Apply.
        if exchange {
            let t = dst.unwrap_or(MISSING);
            let t_dir = self.nodes[&t].kind == Kind::Dir;
            self.nodes
                .get_mut(&sp)
                .unwrap()
                .entries
                .insert(sn.to_vec(), t);
            self.nodes
                .get_mut(&dp)
                .unwrap()
                .entries
                .insert(dn.to_vec(), src);
            if moving {
                if src_dir {
                    self.nodes.get_mut(&src).unwrap().parent = dp;
                    self.nodes.get_mut(&sp).unwrap().nlink -= 1;
                    self.nodes.get_mut(&dp).unwrap().nlink += 1;
                }
                if t_dir {
                    self.nodes.get_mut(&t).unwrap().parent = sp;
                    self.nodes.get_mut(&dp).unwrap().nlink -= 1;
                    self.nodes.get_mut(&sp).unwrap().nlink += 1;
                }
            }
            return Ok(());
        }
        self.nodes.get_mut(&sp).unwrap().entries.remove(sn);
        if let Some(t) = dst {
            let tn = self.nodes.get_mut(&t).unwrap();
            if tn.kind == Kind::Dir {
                tn.nlink = 0;
                self.nodes.get_mut(&dp).unwrap().nlink -= 1;
            } else {
                tn.nlink -= 1;
            }
            self.reap(t);
        }
        self.nodes
            .get_mut(&dp)
            .unwrap()
            .entries
            .insert(dn.to_vec(), src);
        if moving && src_dir {
            self.nodes.get_mut(&src).unwrap().parent = dp;
            self.nodes.get_mut(&sp).unwrap().nlink -= 1;
            self.nodes.get_mut(&dp).unwrap().nlink += 1;
        }
        Ok(())
    }

    fn chmod(&mut self, p: &Person, ino: u64, mode: u32) -> Res {
        let n = self.node(ino)?;
        if !p.root() && p.uid != n.uid {
            return Err(libc::EPERM);
        }
        let keep_sgid = p.root() || p.in_group(n.gid);
        let n = self.nodes.get_mut(&ino).unwrap();
        n.mode = if keep_sgid { mode } else { mode & !0o2000 };
        Ok(())
    }

    fn chown(&mut self, p: &Person, ino: u64, uid: Option<u32>, gid: Option<u32>) -> Res {
        let n = self.node(ino)?;
        if let Some(u) = uid {
            if !(p.root() || p.uid == n.uid && u == n.uid) {
                return Err(libc::EPERM);
            }
        }
        if let Some(g) = gid {
            if !p.root() && !(p.uid == n.uid && (p.in_group(g) || g == n.gid)) {
                return Err(libc::EPERM);
            }
        }
        let n = self.nodes.get_mut(&ino).unwrap();
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if (uid.is_some() || gid.is_some()) && n.kind != Kind::Dir {
            n.mode = without_set_id(n.mode);
        }
        Ok(())
    }

    fn truncate(&mut self, p: &Person, ino: u64, size: u64) -> Res {
        let n = self.node(ino)?;
        match n.kind {
            Kind::Dir => return Err(libc::EISDIR),
            Kind::File => {}
            _ => return Err(libc::EINVAL),
        }
        need(p, n, 2)?;
        let n = self.nodes.get_mut(&ino).unwrap();
        n.size = size;
        if !p.root() {
            n.mode = without_set_id(n.mode);
        }
        Ok(())
    }

    /// xattr_permission for a name in `user.`, `trusted.` (anything else never gets here).
    fn xattr_perm(p: &Person, n: &Node, name: &[u8], write: bool) -> Res {
        if name.starts_with(b"trusted.") {
            if p.root() {
                return Ok(());
            }
            return Err(if write { libc::EPERM } else { libc::ENODATA });
        }
        if !matches!(n.kind, Kind::File | Kind::Dir) {
            return Err(if write { libc::EPERM } else { libc::ENODATA });
        }
        if write && n.kind == Kind::Dir && n.mode & 0o1000 != 0 && !p.root() && p.uid != n.uid {
            return Err(libc::EPERM);
        }
        need(p, n, if write { 2 } else { 4 })
    }

    fn xattr_name_ok(name: &[u8]) -> Res {
        if name.starts_with(b"user.") || name.starts_with(b"trusted.") {
            Ok(())
        } else {
            Err(libc::EOPNOTSUPP)
        }
    }

    fn setxattr(&mut self, p: &Person, ino: u64, name: &[u8], value: &[u8], flags: u32) -> Res {
        Self::xattr_name_ok(name)?;
        let n = self.node(ino)?;
        Self::xattr_perm(p, n, name, true)?;
        let exists = n.xattrs.contains_key(name);
        if flags == 1 && exists {
            return Err(libc::EEXIST);
        }
        if flags == 2 && !exists {
            return Err(libc::ENODATA);
        }
        let n = self.nodes.get_mut(&ino).unwrap();
        n.xattrs.insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    fn removexattr(&mut self, p: &Person, ino: u64, name: &[u8]) -> Res {
        Self::xattr_name_ok(name)?;
        let n = self.node(ino)?;
        Self::xattr_perm(p, n, name, true)?;
        if !n.xattrs.contains_key(name) {
            return Err(libc::ENODATA);
        }
        self.nodes.get_mut(&ino).unwrap().xattrs.remove(name);
        Ok(())
    }

    fn getxattr(&self, p: &Person, ino: u64, name: &[u8]) -> Result<Vec<u8>, i32> {
        Self::xattr_name_ok(name)?;
        let n = self.node(ino)?;
        Self::xattr_perm(p, n, name, false)?;
        n.xattrs.get(name).cloned().ok_or(libc::ENODATA)
    }

    fn open(&mut self, p: &Person, ino: u64, flags: u32) -> Result<u64, i32> {
        let n = self.node(ino)?;
        let acc = flags & 3;
        let mut mask = match acc {
            0 => 4,
            1 => 2,
            _ => 6,
        };
        let trunc = flags & libc::O_TRUNC as u32 != 0;
        if trunc {
            mask |= 2;
        }
        match n.kind {
            Kind::Symlink => return Err(libc::ELOOP),
            Kind::Dir if mask & 2 != 0 => return Err(libc::EISDIR),
            _ => {}
        }
        need(p, n, mask)?;
        let n = self.nodes.get_mut(&ino).unwrap();
        if trunc && n.kind == Kind::File {
            n.size = 0;
            if !p.root() {
                n.mode = without_set_id(n.mode);
            }
        }
        n.open += 1;
        let h = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(h, ino);
        Ok(h)
    }

    fn close(&mut self, h: u64) -> Res {
        let ino = self.handles.remove(&h).ok_or(libc::EBADF)?;
        self.nodes.get_mut(&ino).unwrap().open -= 1;
        self.reap(ino);
        Ok(())
    }
}

// ------------------------------------------------------------------ the system under test

struct Sut {
    eng: MemEngine,
    ns: Namespace,
    now: i64,
    client: u64,
    seq: u64,
    last: Option<(Command, Reply)>,
}

impl Sut {
    fn new(with_client: bool) -> Sut {
        let mut s = Sut {
            eng: MemEngine::new(),
            ns: Namespace::default(),
            now: 1_000,
            client: 0,
            seq: 0,
            last: None,
        };
        if with_client {
            let r = s.raw(Command {
                now: Some(Timespec {
                    sec: s.now,
                    nsec: 0,
                }),
                op: Some(Op::RegisterClient(RegisterClient {
                    description: "model".into(),
                    lease_ms: 1 << 40,
                })),
                ..Default::default()
            });
            assert_eq!(r.errno, 0, "{}", r.message);
            s.client = r.client_id;
        }
        s
    }

    fn raw(&mut self, cmd: Command) -> Reply {
        let mut overlay = Overlay::new(&self.eng);
        let reply = self.ns.apply(&mut overlay, &cmd);
        let mut batch = WriteBatch::default();
        for (k, v) in overlay.into_writes() {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        self.eng.write(batch, true).expect("memory engine write");
        reply
    }

    fn apply(&mut self, who: &Person, op: Op) -> Reply {
        self.now += 1;
        let caller = (!who.root()).then(|| Caller {
            uid: who.uid,
            gid: who.gid,
            groups: who.groups.clone(),
        });
        let cmd = if self.client != 0 {
            self.seq += 1;
            Command {
                client_id: self.client,
                seq: self.seq,
                acked_below: self.seq.saturating_sub(1).max(1),
                now: Some(Timespec {
                    sec: self.now,
                    nsec: 0,
                }),
                caller,
                op: Some(op),
                sync: false,
            }
        } else {
            Command {
                now: Some(Timespec {
                    sec: self.now,
                    nsec: 0,
                }),
                caller,
                op: Some(op),
                ..Default::default()
            }
        };
        let reply = self.raw(cmd.clone());
        self.last = Some((cmd, reply.clone()));
        reply
    }

    /// Sends the last command again: exactly-once must answer from the cache.
    fn retry(&mut self) -> Option<(Reply, Reply)> {
        let (cmd, first) = self.last.clone()?;
        if cmd.client_id == 0 {
            return None;
        }
        let mut again = cmd;
        again.now = Some(Timespec {
            sec: self.now + 1,
            nsec: 0,
        });
        Some((first, self.raw(again)))
    }

    fn read(&self, who: Option<&Person>, op: read_op::Op) -> Reply {
        let caller = who.filter(|p| !p.root()).map(|p| Caller {
            uid: p.uid,
            gid: p.gid,
            groups: p.groups.clone(),
        });
        self.ns.read(
            &self.eng,
            &ReadOp {
                caller,
                op: Some(op),
            },
        )
    }
}

// ------------------------------------------------------------------ the test

const NAMES: [&[u8]; 8] = [b"a", b"b", b"c", b"a", b"b", b"c", b"d", b"."];
const PATHS: [&[&[u8]]; 7] = [
    &[],
    &[b"a"],
    &[b"b"],
    &[b"a", b"a"],
    &[b"a", b"b"],
    &[b"b", b"c"],
    &[b"c"],
];
const MODES: [u32; 9] = [
    0o755, 0o700, 0o644, 0o777, 0o1777, 0o2775, 0o600, 0o4755, 0o000,
];
const XNAMES: [&[u8]; 4] = [b"user.a", b"user.b", b"trusted.t", b"bad.x"];

fn people() -> [Person; 3] {
    [
        Person {
            uid: 0,
            gid: 0,
            groups: vec![],
        },
        Person {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        },
        Person {
            uid: 1001,
            gid: 1001,
            groups: vec![1000],
        },
    ]
}

fn kind_of(k: Kind) -> FileKind {
    match k {
        Kind::File => FileKind::Regular,
        Kind::Dir => FileKind::Directory,
        Kind::Symlink => FileKind::Symlink,
        Kind::Fifo => FileKind::Fifo,
    }
}

type Step = (u8, u8, u8, u8, u8, u8);

fn check(model: &Model, sut: &Sut) -> Result<(), TestCaseError> {
    // Walk the model's tree and compare every directory and inode.
    let mut stack = vec![ROOT];
    while let Some(dir) = stack.pop() {
        let r = sut.read(
            None,
            read_op::Op::ReadDir(ReadDir {
                ino: dir,
                cookie: 0,
                limit: 0,
                plus: true,
            }),
        );
        prop_assert_eq!(r.errno, 0, "readdir {}: {}", dir, r.message);
        prop_assert!(r.eof);
        let got: BTreeMap<Vec<u8>, u64> =
            r.entries.iter().map(|e| (e.name.clone(), e.ino)).collect();
        prop_assert_eq!(&got, &model.nodes[&dir].entries, "entries of {}", dir);
        let dotdot = sut.read(
            None,
            read_op::Op::Lookup(Lookup {
                parent: dir,
                name: b"..".to_vec(),
            }),
        );
        prop_assert_eq!(dotdot.attr.map(|a| a.ino), Some(model.nodes[&dir].parent));
        for &ino in got.values() {
            if model.nodes[&ino].kind == Kind::Dir && !stack.contains(&ino) {
                stack.push(ino);
            }
        }
    }
    for (&ino, n) in &model.nodes {
        let r = sut.read(None, read_op::Op::GetAttr(GetAttr { ino }));
        prop_assert_eq!(r.errno, 0, "getattr {}: {}", ino, r.message);
        let a = r.attr.unwrap_or_default();
        prop_assert_eq!(
            (a.kind, a.mode, a.uid, a.gid, a.size, a.nlink),
            (
                kind_of(n.kind) as i32,
                n.mode,
                n.uid,
                n.gid,
                n.size,
                n.nlink
            ),
            "attributes of inode {}",
            ino
        );
        let names = sut
            .read(None, read_op::Op::ListXattr(ListXattr { ino }))
            .names;
        let want: Vec<Vec<u8>> = n.xattrs.keys().cloned().collect();
        prop_assert_eq!(names, want, "xattrs of {}", ino);
        for (k, v) in &n.xattrs {
            let r = sut.read(
                None,
                read_op::Op::GetXattr(GetXattr {
                    ino,
                    name: k.clone(),
                }),
            );
            prop_assert_eq!(&r.data, v);
        }
    }
    for &ino in &model.gone {
        let r = sut.read(None, read_op::Op::GetAttr(GetAttr { ino }));
        prop_assert_eq!(r.errno, libc::ENOENT, "inode {} should be gone", ino);
    }
    let stats = sut
        .read(None, read_op::Op::StatFs(StatFs {}))
        .stats
        .unwrap_or_default();
    prop_assert_eq!(stats.files, model.nodes.len() as u64);
    Ok(())
}

/// Every case starts from a small tree where unprivileged callers can do things:
/// / 0777, /a 0777 (root), /b 0755 (uid 1000), /c 01777 (sticky).
const PRELUDE: [Step; 5] = [
    (8, 1, 3, 0, 0, 0),
    (0, 1, 0, 1, 3, 0),
    (0, 1, 1, 1, 0, 1),
    (0, 1, 2, 1, 4, 0),
    (0, 1, 6, 0, 2, 2),
];

fn run(mut steps: Vec<Step>, with_client: bool) -> Result<(), TestCaseError> {
    steps.splice(0..0, PRELUDE);
    let mut model = Model::new();
    let mut sut = Sut::new(with_client);
    let people = people();
    for (i, &(op, a, b, c, d, e)) in steps.iter().enumerate() {
        let who = &people[(e % 3) as usize];
        let name = |x: u8| NAMES[(x % 8) as usize];
        let (want, reply): (Res, Reply) = match op % 15 {
            0..=2 => {
                let kind = [Kind::File, Kind::Dir, Kind::Symlink, Kind::Fifo][(c % 4) as usize];
                let mode = MODES[(d % 9) as usize];
                let parent = model.pick(a, true);
                let want = model.create(who, parent, name(b), kind, mode);
                let reply = sut.apply(
                    who,
                    Op::MakeNode(MakeNode {
                        parent,
                        name: name(b).to_vec(),
                        kind: kind_of(kind) as i32,
                        mode,
                        target: b"t".to_vec(),
                        exclusive: true,
                        ..Default::default()
                    }),
                );
                (want, reply)
            }
            3 => {
                let ino = model.pick(a, false);
                let parent = model.pick(c, true);
                let want = model.link(who, ino, parent, name(b));
                let reply = sut.apply(
                    who,
                    Op::Link(Link {
                        ino,
                        new_parent: parent,
                        new_name: name(b).to_vec(),
                    }),
                );
                (want, reply)
            }
            4 | 5 => {
                let parent = model.pick(a, true);
                let rmdir = op % 15 == 5;
                let want = model.remove(who, parent, name(b), rmdir);
                let reply = sut.apply(
                    who,
                    Op::Remove(Remove {
                        parent,
                        name: name(b).to_vec(),
                        directory: rmdir,
                    }),
                );
                (want, reply)
            }
            6 | 7 => {
                let sp = model.pick(a, true);
                let dp = model.pick(c, true);
                let flags = [0, 0, 1, 2][(d % 4) as usize];
                let want = model.rename(who, sp, name(b), dp, name(d / 4), flags);
                let reply = sut.apply(
                    who,
                    Op::Rename(Rename {
                        parent: sp,
                        name: name(b).to_vec(),
                        new_parent: dp,
                        new_name: name(d / 4).to_vec(),
                        flags,
                    }),
                );
                (want, reply)
            }
            8 => {
                let ino = model.pick(a, false);
                let mode = MODES[(b % 9) as usize];
                let want = model.chmod(who, ino, mode);
                let reply = sut.apply(
                    who,
                    Op::SetAttr(SetAttr {
                        ino,
                        mode: Some(mode),
                        ..Default::default()
                    }),
                );
                (want, reply)
            }
            9 => {
                let ino = model.pick(a, false);
                let ids = [None, Some(0), Some(1000), Some(1001)];
                let uid = ids[(b % 4) as usize];
                let gid = ids[(c % 4) as usize];
                let want = model.chown(who, ino, uid, gid);
                let reply = sut.apply(
                    who,
                    Op::SetAttr(SetAttr {
                        ino,
                        uid,
                        gid,
                        ..Default::default()
                    }),
                );
                (want, reply)
            }
            10 => {
                let ino = model.pick(a, false);
                let size = u64::from(b) * 1000;
                let want = model.truncate(who, ino, size);
                let reply = sut.apply(
                    who,
                    Op::SetAttr(SetAttr {
                        ino,
                        size: Some(size),
                        ..Default::default()
                    }),
                );
                (want, reply)
            }
            11 => {
                let ino = model.pick(a, false);
                let xname = XNAMES[(b % 4) as usize];
                let value = vec![c; (d % 5) as usize];
                let flags = u32::from(c % 3);
                let want = model.setxattr(who, ino, xname, &value, flags);
                let reply = sut.apply(
                    who,
                    Op::SetXattr(SetXattr {
                        ino,
                        name: xname.to_vec(),
                        value,
                        flags,
                    }),
                );
                (want, reply)
            }
            12 => {
                let ino = model.pick(a, false);
                let xname = XNAMES[(b % 4) as usize];
                if c % 2 == 0 {
                    let want = model.removexattr(who, ino, xname);
                    let reply = sut.apply(
                        who,
                        Op::RemoveXattr(RemoveXattr {
                            ino,
                            name: xname.to_vec(),
                        }),
                    );
                    (want, reply)
                } else {
                    let want = model.getxattr(who, ino, xname);
                    let reply = sut.read(
                        Some(who),
                        read_op::Op::GetXattr(GetXattr {
                            ino,
                            name: xname.to_vec(),
                        }),
                    );
                    if let Ok(v) = &want {
                        prop_assert_eq!(&reply.data, v, "step {}: getxattr value", i);
                    }
                    (want.map(|_| ()), reply)
                }
            }
            13 => {
                let ino = model.pick(a, false);
                let flags = [
                    libc::O_RDONLY,
                    libc::O_WRONLY,
                    libc::O_RDWR,
                    libc::O_WRONLY | libc::O_TRUNC,
                ][(b % 4) as usize] as u32;
                let want = model.open(who, ino, flags);
                let reply = sut.apply(who, Op::Open(Open { ino, flags }));
                if let Ok(h) = want {
                    prop_assert_eq!(reply.handle, h, "step {}: handle", i);
                }
                (want.map(|_| ()), reply)
            }
            _ => {
                // Close one of the open handles, or a bogus one; or retry the last command.
                if c % 4 == 0 {
                    if let Some((first, again)) = sut.retry() {
                        prop_assert_eq!(first, again, "step {}: retry must hit the cache", i);
                    }
                    continue;
                }
                let handles: Vec<u64> = model.handles.keys().copied().collect();
                let h = if handles.is_empty() || b % 5 == 0 {
                    9_999
                } else {
                    handles[(b as usize) % handles.len()]
                };
                let want = model.close(h);
                let reply = sut.apply(
                    who,
                    Op::Close(Close {
                        handle: h,
                        more: vec![],
                    }),
                );
                (want, reply)
            }
        };
        prop_assert_eq!(
            want.err().unwrap_or(0),
            reply.errno,
            "step {} {:?} by uid {}: implementation said {:?}",
            i,
            (op % 15, a, b, c, d),
            who.uid,
            reply.message
        );
        if std::env::var("NS_MODEL_TRACE").is_ok() {
            eprintln!(
                "{i} {:?} uid {} -> {}",
                (op % 15, a, b, c, d),
                who.uid,
                reply.errno
            );
        }
        check(&model, &sut)?;
    }
    if std::env::var("NS_MODEL_STATS").is_ok() {
        let ok = model.nodes.len();
        eprintln!("steps {} nodes {ok} gone {}", steps.len(), model.gone.len());
    }
    // Nothing half-applied anywhere: a state read back through the engine decodes.
    prop_assert!(sut.eng.scan(&[], &[], 1).is_ok());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn namespace_matches_the_posix_model(
        steps in proptest::collection::vec(any::<Step>(), 1..60),
        with_client in any::<bool>(),
    ) {
        run(steps, with_client)?;
    }
}

/// A fixed history that exercises a deep tree, so the model and the walk are exercised
/// even when proptest's random cases stay shallow.
#[test]
fn fixed_history() {
    let steps: Vec<Step> = vec![
        (1, 0, 0, 1, 3, 0), // mkdir /a 0777
        (1, 1, 0, 1, 3, 0), // mkdir /a/a
        (1, 1, 1, 0, 3, 1), // uid 1000 creates /a/b
        (6, 1, 1, 0, 4, 2), // uid 1001 renames /a/b -> /b? (flags from d)
        (8, 1, 4, 0, 0, 0), // chmod /a 01777
        (4, 1, 1, 0, 0, 2), // uid 1001 unlinks /a/b: sticky
        (11, 1, 0, 5, 3, 0),
        (13, 4, 2, 0, 0, 0),
        (4, 1, 1, 0, 0, 0),
        (14, 0, 1, 1, 0, 0),
    ];
    if let Err(e) = run(steps.clone(), false) {
        panic!("{e}");
    }
    if let Err(e) = run(steps, true) {
        panic!("{e}");
    }
}
