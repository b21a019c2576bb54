//! Unit tests of the data path's metadata: placement (distinct, balanced, failure domains,
//! EC), version epochs, commit, truncation and deletion queueing, heartbeats, expiry,
//! layouts, and bad input.

use kerfs_proto::{
    command::Op, read_op, AllocateChunks, Caller, ChunkHeartbeat, ChunkInfo, ChunkServerHeartbeat,
    ChunkServerInfo, ChunkWritten, Close, Command, CommitWrite, ExpireChunkServers, FileKind,
    GetAttr, GetChunks, Layout, ListChunkServers, MakeNode, ReadOp, RegisterChunkServer,
    RegisterClient, Remove, Reply, SetAttr, SetLayout, StatFs, Timespec, ROOT_INO,
};

use super::*;
use crate::store::{Engine, MemEngine, WriteBatch};

const MIB: u64 = 1 << 20;

struct T {
    eng: MemEngine,
    ns: Namespace,
    /// Seconds.
    now: i64,
    client: u64,
    seq: u64,
}

impl T {
    fn new() -> T {
        let mut t = T {
            eng: MemEngine::new(),
            ns: Namespace::default(),
            now: 1000,
            client: 0,
            seq: 0,
        };
        let r = t.internal(Op::RegisterClient(RegisterClient {
            description: "test".into(),
            lease_ms: 1 << 40,
        }));
        assert_eq!(r.errno, 0, "{}", r.message);
        t.client = r.client_id;
        t
    }

    fn apply(&mut self, cmd: Command) -> Reply {
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

    fn ts(&self) -> Option<Timespec> {
        Some(Timespec {
            sec: self.now,
            nsec: 0,
        })
    }

    /// A command of client 0 (chunk servers, timers).
    fn internal(&mut self, op: Op) -> Reply {
        let cmd = Command {
            now: self.ts(),
            op: Some(op),
            ..Default::default()
        };
        self.apply(cmd)
    }

    /// A command of the registered client session, as `caller`.
    fn client_as(&mut self, caller: Option<Caller>, op: Op) -> Reply {
        self.seq += 1;
        let cmd = Command {
            client_id: self.client,
            seq: self.seq,
            acked_below: self.seq,
            now: self.ts(),
            caller,
            op: Some(op),
            sync: false,
        };
        self.apply(cmd)
    }

    fn client(&mut self, op: Op) -> Reply {
        self.client_as(None, op)
    }

    /// Closes a handle of the client session; it must succeed.
    fn close(&mut self, handle: u64) {
        let r = self.client(Op::Close(Close {
            handle,
            more: vec![],
        }));
        assert_eq!(r.errno, 0, "close of handle {handle}: {}", r.message);
    }

    fn read(&self, op: read_op::Op) -> Reply {
        self.ns.read(
            &self.eng,
            &ReadOp {
                caller: None,
                op: Some(op),
            },
        )
    }

    fn server(&mut self, addr: &str, domain: &str) -> u64 {
        let r = self.internal(Op::RegisterChunkServer(RegisterChunkServer {
            info: Some(ChunkServerInfo {
                address: addr.into(),
                failure_domain: domain.into(),
                capacity_bytes: 1 << 40,
                available_bytes: 1 << 39,
                ..Default::default()
            }),
        }));
        assert_eq!(r.errno, 0, "{}", r.message);
        r.server_id
    }

    fn heartbeat(
        &mut self,
        id: u64,
        full: bool,
        chunks: Vec<ChunkInfo>,
        deleted: Vec<u64>,
    ) -> Reply {
        self.internal(Op::ChunkServerHeartbeat(ChunkServerHeartbeat {
            heartbeat: Some(ChunkHeartbeat {
                server: Some(ChunkServerInfo {
                    id,
                    capacity_bytes: 1 << 40,
                    available_bytes: 1 << 39,
                    used_bytes: 1 << 30,
                    ..Default::default()
                }),
                full_report: full,
                chunks,
                deleted,
                ..Default::default()
            }),
        }))
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> u64 {
        let r = self.client(Op::MakeNode(MakeNode {
            parent,
            name: name.into(),
            kind: FileKind::Directory as i32,
            mode: 0o755,
            exclusive: true,
            ..Default::default()
        }));
        assert_eq!(r.errno, 0, "{}", r.message);
        r.attr.unwrap().ino
    }

    /// Creates and opens a file read-write: (ino, handle).
    fn create(&mut self, parent: u64, name: &str) -> (u64, u64) {
        let r = self.client(Op::MakeNode(MakeNode {
            parent,
            name: name.into(),
            kind: FileKind::Regular as i32,
            mode: 0o644,
            exclusive: true,
            open: true,
            open_flags: libc::O_RDWR as u32,
            ..Default::default()
        }));
        assert_eq!(r.errno, 0, "{}", r.message);
        (r.attr.unwrap().ino, r.handle)
    }

    fn alloc(&mut self, handle: u64, indexes: &[u64]) -> Reply {
        self.client(Op::AllocateChunks(AllocateChunks {
            handle,
            indexes: indexes.to_vec(),
        }))
    }

    fn commit(&mut self, handle: u64, size: u64, chunks: Vec<ChunkWritten>) -> Reply {
        self.client(Op::CommitWrite(CommitWrite {
            handle,
            size,
            chunks,
            ..Default::default()
        }))
    }

    fn chunks(&self, ino: u64) -> Reply {
        let r = self.read(read_op::Op::GetChunks(GetChunks {
            ino,
            first_index: 0,
            count: 0,
        }));
        assert_eq!(r.errno, 0, "{}", r.message);
        r
    }

    fn servers(&self) -> Vec<kerfs_proto::ChunkServerRecord> {
        self.read(read_op::Op::ListChunkServers(ListChunkServers {}))
            .servers
    }

    fn set_layout(&mut self, ino: u64, layout: Layout) -> Reply {
        self.client(Op::SetLayout(SetLayout {
            ino,
            layout: Some(layout),
        }))
    }
}

fn servers_of(c: &kerfs_proto::FileChunk) -> Vec<u64> {
    c.replicas.iter().map(|p| p.server_id).collect()
}

fn ec(k: u32, m: u32, chunk_size: u64) -> Layout {
    Layout {
        replicas: 0,
        ec_data: k,
        ec_parity: m,
        chunk_size,
        stripe_width: 0,
    }
}

#[test]
fn register_assigns_ids_and_reregistration_keeps_them() {
    let mut t = T::new();
    let a = t.server("a:1", "");
    let b = t.server("b:1", "");
    assert_ne!(a, 0);
    assert_ne!(a, b);
    // Coming back with its id: same record, new address.
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo {
            id: a,
            address: "a:2".into(),
            ..Default::default()
        }),
    }));
    assert_eq!(r.server_id, a);
    let list = t.servers();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].info.as_ref().unwrap().address, "a:2");
    assert_eq!(list[0].state, "up");
    // A server id this state never handed out is kept, and never handed out again.
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo {
            id: 40,
            address: "z:1".into(),
            ..Default::default()
        }),
    }));
    assert_eq!(r.server_id, 40);
    assert_eq!(t.server("c:1", ""), 41);
    // No address or no info: EINVAL.
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer { info: None }));
    assert_eq!(r.errno, libc::EINVAL);
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo::default()),
    }));
    assert_eq!(r.errno, libc::EINVAL);
}

#[test]
fn placement_is_distinct_and_balanced() {
    let mut t = T::new();
    let ids: Vec<u64> = (0..3).map(|i| t.server(&format!("s{i}:1"), "")).collect();
    let (ino, h) = t.create(ROOT_INO, "f");
    let r = t.alloc(h, &[0, 1, 2, 3, 4, 5]);
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.layout.unwrap().replicas, 2);
    assert_eq!(r.chunks.len(), 6);
    let mut per_server = std::collections::BTreeMap::new();
    for (i, c) in r.chunks.iter().enumerate() {
        assert_eq!(c.index, i as u64);
        assert_eq!(c.version, 1);
        assert!(c.fresh);
        let s = servers_of(c);
        assert_eq!(s.len(), 2);
        assert_ne!(s[0], s[1], "replicas on distinct servers");
        // Replicas of one chunk share its id; addresses are filled in.
        assert_eq!(c.replicas[0].chunk_id, c.replicas[1].chunk_id);
        assert!(c
            .replicas
            .iter()
            .all(|p| p.current && !p.address.is_empty()));
        for id in s {
            *per_server.entry(id).or_insert(0) += 1;
        }
    }
    // 12 placements over 3 servers: 4 each.
    assert_eq!(
        per_server.values().copied().collect::<Vec<_>>(),
        vec![4, 4, 4]
    );
    for s in t.servers() {
        assert_eq!(s.allocated_bytes, 4 * 64 * MIB);
    }
    // Distinct chunks get distinct ids.
    let mut chunk_ids: Vec<u64> = r.chunks.iter().map(|c| c.replicas[0].chunk_id).collect();
    chunk_ids.dedup();
    assert_eq!(chunk_ids.len(), 6);
    assert_eq!(t.chunks(ino).chunks.len(), 6);
    let _ = ids;
}

#[test]
fn placement_respects_failure_domains() {
    let mut t = T::new();
    // Two racks; rack a has three servers, rack b one.
    for i in 0..3 {
        t.server(&format!("a{i}:1"), "rack-a");
    }
    let b = t.server("b0:1", "rack-b");
    let (_, h) = t.create(ROOT_INO, "f");
    let r = t.alloc(h, &[0, 1, 2, 3]);
    assert_eq!(r.errno, 0, "{}", r.message);
    for c in &r.chunks {
        // Each chunk has one replica in each rack, so rack b's server is in every chunk.
        assert!(servers_of(c).contains(&b), "{:?}", servers_of(c));
    }
    // With more copies than racks, copies spread evenly over the racks.
    let d = t.mkdir(ROOT_INO, "r4");
    let l = Layout {
        replicas: 4,
        chunk_size: 64 * 1024,
        ..Default::default()
    };
    assert_eq!(t.set_layout(d, l).errno, 0);
    let (_, h) = t.create(d, "g");
    let r = t.alloc(h, &[0]);
    assert_eq!(r.errno, 0, "{}", r.message);
    let mut s = servers_of(&r.chunks[0]);
    s.sort();
    s.dedup();
    assert_eq!(s.len(), 4);
}

#[test]
fn too_few_servers_is_enospc() {
    let mut t = T::new();
    let (_, h) = t.create(ROOT_INO, "f");
    let r = t.alloc(h, &[0]);
    assert_eq!(r.errno, libc::ENOSPC);
    assert!(r.message.contains("needs 2"), "{}", r.message);
    t.server("a:1", "");
    let r = t.alloc(h, &[0]);
    assert_eq!(r.errno, libc::ENOSPC);
    assert!(r.message.contains("1 of 1 are up"), "{}", r.message);
    // Nothing half-done stayed behind.
    assert_eq!(t.servers()[0].allocated_bytes, 0);
    t.server("b:1", "");
    assert_eq!(t.alloc(h, &[0]).errno, 0);
}

#[test]
fn erasure_coded_placement_uses_k_plus_m_servers() {
    let mut t = T::new();
    for i in 0..6 {
        t.server(&format!("s{i}:1"), "");
    }
    let d = t.mkdir(ROOT_INO, "ec");
    assert_eq!(t.set_layout(d, ec(4, 2, 4 * MIB)).errno, 0);
    let (ino, h) = t.create(d, "f");
    let r = t.alloc(h, &[0, 1]);
    assert_eq!(r.errno, 0, "{}", r.message);
    for c in &r.chunks {
        assert_eq!(c.replicas.len(), 6);
        let mut s = servers_of(c);
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 6, "k+m distinct servers");
        let shards: Vec<u32> = c.replicas.iter().map(|p| p.shard_index).collect();
        assert_eq!(shards, vec![0, 1, 2, 3, 4, 5]);
        let mut ids: Vec<u64> = c.replicas.iter().map(|p| p.chunk_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6, "one chunk id per shard");
    }
    // Each shard is a quarter of the chunk.
    for s in t.servers() {
        assert_eq!(s.allocated_bytes, 2 * MIB);
    }
    assert_eq!(t.chunks(ino).layout.unwrap().ec_data, 4);
    // Five servers are not enough for 4+2.
    let (_, h7) = t.create(d, "g");
    t.now += 60;
    t.internal(Op::ExpireChunkServers(ExpireChunkServers {}));
    for id in 1..=5 {
        t.heartbeat(id, true, vec![], vec![]);
    }
    let r = t.alloc(h7, &[0]);
    assert_eq!(r.errno, libc::ENOSPC);
    assert!(
        r.message.contains("needs 6") && r.message.contains("5 of 6"),
        "{}",
        r.message
    );
}

#[test]
fn versions_bump_by_one_per_epoch_and_commit_records_current_replicas() {
    let mut t = T::new();
    for i in 0..3 {
        t.server(&format!("s{i}:1"), "");
    }
    let (ino, h) = t.create(ROOT_INO, "f");
    let first = t.alloc(h, &[0]).chunks[0].clone();
    assert!(first.fresh);
    let again = t.alloc(h, &[0, 0]);
    assert_eq!(again.chunks.len(), 1);
    let c = &again.chunks[0];
    assert_eq!(c.version, 2);
    assert!(!c.fresh);
    assert_eq!(servers_of(c), servers_of(&first));
    assert_eq!(c.replicas[0].chunk_id, first.replicas[0].chunk_id);
    // Only the first replica acknowledged.
    let ok = servers_of(c)[0];
    let r = t.commit(
        h,
        100,
        vec![ChunkWritten {
            index: 0,
            version: 2,
            servers_ok: vec![ok],
        }],
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.attr.unwrap().size, 100);
    let got = t.chunks(ino).chunks[0].clone();
    let cur: Vec<(u64, bool)> = got
        .replicas
        .iter()
        .map(|p| (p.server_id, p.current))
        .collect();
    assert_eq!(cur, vec![(ok, true), (servers_of(c)[1], false)]);
    // A commit of an old epoch changes nothing; an empty servers_ok means nobody has it.
    t.commit(
        h,
        0,
        vec![ChunkWritten {
            index: 0,
            version: 1,
            servers_ok: servers_of(c),
        }],
    );
    assert_eq!(t.chunks(ino).chunks[0], got);
    t.commit(
        h,
        50,
        vec![ChunkWritten {
            index: 0,
            version: 2,
            servers_ok: vec![],
        }],
    );
    let after = t.chunks(ino);
    assert!(after.chunks[0].replicas.iter().all(|p| !p.current));
    // Size only grows on commit.
    assert_eq!(after.attr.unwrap().size, 100);
    let stats = t.read(read_op::Op::StatFs(StatFs {})).stats.unwrap();
    assert!(stats.blocks > 0);
}

#[test]
fn commit_clears_setuid_for_non_root_writers() {
    let mut t = T::new();
    t.server("a:1", "");
    t.server("b:1", "");
    let r = t.client_as(
        Some(Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        }),
        Op::MakeNode(MakeNode {
            parent: ROOT_INO,
            name: b"s".to_vec(),
            kind: FileKind::Regular as i32,
            mode: 0o6755,
            exclusive: true,
            open: true,
            open_flags: libc::O_WRONLY as u32,
            ..Default::default()
        }),
    );
    // The root directory is 0755 root: uid 1000 cannot create there.
    assert_eq!(r.errno, libc::EACCES);
    let (ino, h) = t.create(ROOT_INO, "s");
    t.client(Op::SetAttr(SetAttr {
        ino,
        mode: Some(0o6755),
        ..Default::default()
    }));
    let r = t.client_as(
        Some(Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        }),
        Op::CommitWrite(CommitWrite {
            handle: h,
            size: 10,
            chunks: vec![],
            ..Default::default()
        }),
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.attr.unwrap().mode & 0o7777, 0o0755);
}

/// A mount commits every writer's data under its own identity (root): the writer's lack
/// of CAP_FSETID travels as `clear_set_id`, in the commit itself or in a truncate.
#[test]
fn a_mount_vouching_for_an_unprivileged_writer_clears_set_id_in_its_commit() {
    let mut t = T::new();
    t.server("a:1", "");
    let (ino, h) = t.create(ROOT_INO, "s");
    let chmod = |t: &mut T, mode| {
        t.client(Op::SetAttr(SetAttr {
            ino,
            mode: Some(mode),
            ..Default::default()
        }))
    };
    let commit = |t: &mut T, clear_set_id| {
        t.client(Op::CommitWrite(CommitWrite {
            handle: h,
            size: 10,
            chunks: vec![],
            clear_set_id,
            ..Default::default()
        }))
    };
    chmod(&mut t, 0o6775);
    let r = commit(&mut t, false);
    assert_eq!(
        r.attr.unwrap().mode & 0o7777,
        0o6775,
        "root's own write keeps them"
    );
    let r = commit(&mut t, true);
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.attr.unwrap().mode & 0o7777, 0o0775);
    // Set-group-ID without group-execute is a locking mark, not a privilege: it stays.
    chmod(&mut t, 0o6765);
    let r = commit(&mut t, true);
    assert_eq!(r.attr.unwrap().mode & 0o7777, 0o2765);
    chmod(&mut t, 0o4755);
    let r = t.client(Op::SetAttr(SetAttr {
        ino,
        size: Some(3),
        handle: Some(h),
        clear_set_id: true,
        ..Default::default()
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.attr.unwrap().mode & 0o7777, 0o0755, "truncate clears too");
}

/// tar's futimens, fchown and fchmod before close, deferred by the mount into the commit of
/// the close: applied after the data (an explicit mtime wins over the commit's stamp), and
/// a commit that carries only attribute changes does not stamp the file as modified.
#[test]
fn attribute_changes_deferred_into_a_commit_follow_its_data() {
    let mut t = T::new();
    t.server("a:1", "");
    let (ino, h) = t.create(ROOT_INO, "tarred");
    let mtime = Timespec { sec: 77, nsec: 5 };
    let set = SetAttr {
        ino,
        mode: Some(0o751),
        uid: Some(1000),
        gid: Some(1000),
        mtime: Some(kerfs_proto::TimeSet {
            how: Some(kerfs_proto::time_set::How::At(mtime)),
        }),
        ..Default::default()
    };
    let r = t.client(Op::CommitWrite(CommitWrite {
        handle: h,
        size: 10,
        then_set: vec![kerfs_proto::DeferredSetAttr {
            caller: None,
            set: Some(set),
        }],
        ..Default::default()
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let a = r.attr.unwrap();
    assert_eq!(
        (a.size, a.mode & 0o7777, a.uid, a.gid),
        (10, 0o751, 1000, 1000)
    );
    assert_eq!(
        a.mtime,
        Some(mtime),
        "the explicit mtime is applied after the data"
    );
    t.now += 5;
    let r = t.client(Op::CommitWrite(CommitWrite {
        handle: h,
        then_set: vec![kerfs_proto::DeferredSetAttr {
            caller: None,
            set: Some(SetAttr {
                ino,
                mode: Some(0o640),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let b = r.attr.unwrap();
    assert_eq!((b.size, b.mode & 0o7777), (10, 0o640));
    assert_eq!(
        b.mtime,
        Some(mtime),
        "an attribute-only commit is no data change"
    );
}

/// The deferred changes are checked as their caller when the commit arrives, and the
/// commit is all or none: refused changes take the data's size change down with them
/// (the client sends the data again alone and reports the refusal to close).
#[test]
fn a_refused_deferred_change_refuses_the_whole_commit() {
    let mut t = T::new();
    t.server("a:1", "");
    let (ino, h) = t.create(ROOT_INO, "roots");
    let stranger = Caller {
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    let r = t.client(Op::CommitWrite(CommitWrite {
        handle: h,
        size: 10,
        then_set: vec![kerfs_proto::DeferredSetAttr {
            caller: Some(stranger),
            set: Some(SetAttr {
                ino,
                mode: Some(0o777),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }));
    assert_eq!(r.errno, libc::EPERM, "{}", r.message);
    let wrong_inode = t.client(Op::CommitWrite(CommitWrite {
        handle: h,
        size: 10,
        then_set: vec![kerfs_proto::DeferredSetAttr {
            caller: None,
            set: Some(SetAttr {
                ino: ino + 1,
                mode: Some(0o600),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }));
    assert_eq!(wrong_inode.errno, libc::EINVAL, "{}", wrong_inode.message);
    let a = t.read(read_op::Op::GetAttr(GetAttr { ino })).attr.unwrap();
    assert_eq!(
        (a.size, a.mode & 0o7777),
        (0, 0o644),
        "nothing of either commit applied"
    );
}

#[test]
fn truncation_drops_chunks_past_the_size_and_queues_deletions() {
    let mut t = T::new();
    let a = t.server("a:1", "");
    let b = t.server("b:1", "");
    let d = t.mkdir(ROOT_INO, "small");
    let cs = 64 * 1024;
    assert_eq!(
        t.set_layout(
            d,
            Layout {
                replicas: 2,
                chunk_size: cs,
                ..Default::default()
            }
        )
        .errno,
        0
    );
    let (ino, h) = t.create(d, "f");
    let r = t.alloc(h, &[0, 1, 2, 3]);
    assert_eq!(r.errno, 0, "{}", r.message);
    let ids: Vec<u64> = r.chunks.iter().map(|c| c.replicas[0].chunk_id).collect();
    t.commit(h, 4 * cs, vec![]);
    // Bump chunk 3 so its queued deletion carries version 2.
    t.alloc(h, &[3]);
    // Truncate to 1.5 chunks: chunk 1 is the boundary and stays; 2 and 3 go.
    let r = t.client(Op::SetAttr(SetAttr {
        ino,
        size: Some(cs + cs / 2),
        ..Default::default()
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let left: Vec<u64> = t.chunks(ino).chunks.iter().map(|c| c.index).collect();
    assert_eq!(left, vec![0, 1]);
    for s in t.servers() {
        assert_eq!(s.allocated_bytes, 2 * cs);
    }
    let hb = t.heartbeat(a, false, vec![], vec![]).heartbeat.unwrap();
    let want: Vec<(u64, u64)> = vec![(ids[2], 1), (ids[3], 2)];
    let got: Vec<(u64, u64)> = hb
        .delete
        .iter()
        .map(|d| (d.chunk_id, d.max_version))
        .collect();
    assert_eq!(got, want);
    // The server reports them deleted: they leave its queue, b's stays.
    let hb = t
        .heartbeat(a, false, vec![], vec![ids[2], ids[3]])
        .heartbeat
        .unwrap();
    assert!(hb.delete.is_empty());
    assert_eq!(
        t.heartbeat(b, false, vec![], vec![])
            .heartbeat
            .unwrap()
            .delete
            .len(),
        2
    );
    // Truncating to exactly one chunk drops chunk 1 as well; O_TRUNC drops everything.
    t.client(Op::SetAttr(SetAttr {
        ino,
        size: Some(cs),
        ..Default::default()
    }));
    assert_eq!(t.chunks(ino).chunks.len(), 1);
    let r = t.client(Op::Open(kerfs_proto::Open {
        ino,
        flags: (libc::O_RDWR | libc::O_TRUNC) as u32,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert!(t.chunks(ino).chunks.is_empty());
    for s in t.servers() {
        assert_eq!(s.allocated_bytes, 0);
    }
}

#[test]
fn deleting_a_file_queues_its_chunks_once_the_last_handle_closes() {
    let mut t = T::new();
    let a = t.server("a:1", "");
    t.server("b:1", "");
    let (ino, h) = t.create(ROOT_INO, "f");
    let r = t.alloc(h, &[0, 1]);
    let ids: Vec<u64> = r.chunks.iter().map(|c| c.replicas[0].chunk_id).collect();
    let r = t.client(Op::Remove(Remove {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        directory: false,
    }));
    assert_eq!(r.errno, 0);
    // Still open: the data stays.
    assert_eq!(t.chunks(ino).chunks.len(), 2);
    assert!(t
        .heartbeat(a, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .delete
        .is_empty());
    t.close(h);
    let r = t.read(read_op::Op::GetChunks(GetChunks {
        ino,
        ..Default::default()
    }));
    assert_eq!(r.errno, libc::ENOENT);
    let del: Vec<u64> = t
        .heartbeat(a, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .delete
        .iter()
        .map(|d| d.chunk_id)
        .collect();
    assert_eq!(del, ids);
    // No chunk table, owner index or layout of the inode is left.
    let rows = t.eng.scan(&[], &[], usize::MAX).unwrap();
    assert!(!rows.iter().any(|(k, _)| {
        matches!(k[0], b'F' | b'L') && k.get(1..9) == Some(&ino.to_be_bytes()[..])
    }));
    assert!(!rows.iter().any(|(k, _)| k[0] == b'O'));
}

#[test]
fn heartbeats_expiry_and_full_reports() {
    let mut t = T::new();
    let a = t.server("a:1", "");
    let b = t.server("b:1", "");
    // A new server is asked for a full report until it sends one.
    let hb = t.heartbeat(a, false, vec![], vec![]).heartbeat.unwrap();
    assert!(hb.want_full_report);
    let hb = t.heartbeat(a, true, vec![], vec![]).heartbeat.unwrap();
    assert!(!hb.want_full_report);
    assert!(
        !t.heartbeat(a, false, vec![], vec![])
            .heartbeat
            .unwrap()
            .want_full_report
    );
    t.heartbeat(b, true, vec![], vec![]);
    let (ino, h) = t.create(ROOT_INO, "f");
    let c = t.alloc(h, &[0]).chunks[0].clone();
    let id = c.replicas[0].chunk_id;
    // Unknown server: ENOENT saying to register.
    let r = t.heartbeat(99, false, vec![], vec![]);
    assert_eq!(r.errno, libc::ENOENT);
    assert!(r.message.contains("register first"));
    // Expiry: nothing before the timeout, down after.
    t.now += 5;
    t.heartbeat(b, false, vec![], vec![]);
    t.now += 6;
    assert_eq!(
        t.internal(Op::ExpireChunkServers(ExpireChunkServers {}))
            .errno,
        0
    );
    let states: Vec<String> = t.servers().into_iter().map(|s| s.state).collect();
    assert_eq!(states, vec!["down", "up"]);
    // A down server is still listed in placements but not chosen.
    assert_eq!(t.chunks(ino).chunks[0].replicas.len(), 2);
    assert_eq!(t.alloc(h, &[1]).errno, libc::ENOSPC);
    let stats = t.read(read_op::Op::StatFs(StatFs {})).stats.unwrap();
    // Only b is up: 1 TiB raw over R=2.
    assert_eq!(stats.blocks, (1u64 << 40) / 2 / 4096);
    assert_eq!(stats.blocks_free, (1u64 << 39) / 2 / 4096);
    // It comes back: up, and asked for a full report.
    let hb = t.heartbeat(a, false, vec![], vec![]).heartbeat.unwrap();
    assert!(hb.want_full_report);
    assert_eq!(t.servers()[0].state, "up");
    // A corrupt copy is no longer current.
    t.heartbeat(
        a,
        false,
        vec![ChunkInfo {
            chunk_id: id,
            version: 1,
            corrupt: true,
            ..Default::default()
        }],
        vec![],
    );
    let cur: Vec<(u64, bool, bool)> = t.chunks(ino).chunks[0]
        .replicas
        .iter()
        .map(|p| (p.server_id, p.current, p.corrupt))
        .collect();
    assert!(
        cur.contains(&(a, false, true)) && cur.contains(&(b, true, false)),
        "the copy on a is corrupt, not merely stale: {cur:?}"
    );
    // A full report: chunks nobody placed there are garbage, queued with their version.
    let hb = t
        .heartbeat(
            a,
            true,
            vec![
                ChunkInfo {
                    chunk_id: id,
                    version: 1,
                    ..Default::default()
                },
                ChunkInfo {
                    chunk_id: 777,
                    version: 3,
                    ..Default::default()
                },
            ],
            vec![],
        )
        .heartbeat
        .unwrap();
    let del: Vec<(u64, u64)> = hb
        .delete
        .iter()
        .map(|d| (d.chunk_id, d.max_version))
        .collect();
    assert_eq!(del, vec![(777, 3)]);
    assert!(!hb.want_full_report);
    // The next full report without it ends the queued deletion.
    let hb = t.heartbeat(a, true, vec![], vec![]).heartbeat.unwrap();
    assert!(hb.delete.is_empty());
}

#[test]
fn layouts_inherit_and_validate() {
    let mut t = T::new();
    let root = t.chunks(ROOT_INO).layout.unwrap();
    assert_eq!(root.replicas, 2);
    assert_eq!(root.chunk_size, 64 * MIB);
    let d = t.mkdir(ROOT_INO, "d");
    assert_eq!(t.chunks(d).layout.unwrap(), root);
    let l3 = Layout {
        replicas: 3,
        chunk_size: MIB,
        ..Default::default()
    };
    let r = t.set_layout(d, l3);
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(r.layout, Some(l3));
    let sub = t.mkdir(d, "sub");
    let (f, h) = t.create(sub, "f");
    assert_eq!(t.chunks(f).layout.unwrap(), l3);
    // Changing the directory later leaves existing entries alone.
    t.set_layout(d, ec(4, 2, 4 * MIB));
    assert_eq!(t.chunks(sub).layout.unwrap(), l3);
    // A file without chunks may change; with chunks it is EBUSY.
    assert_eq!(t.set_layout(f, root).errno, 0);
    for i in 0..3 {
        t.server(&format!("s{i}:1"), "");
    }
    assert_eq!(t.alloc(h, &[0]).errno, 0);
    assert_eq!(t.set_layout(f, l3).errno, libc::EBUSY);
    // Validation.
    let bad = [
        Layout {
            replicas: 0,
            chunk_size: MIB,
            ..Default::default()
        },
        Layout {
            replicas: 17,
            chunk_size: MIB,
            ..Default::default()
        },
        Layout {
            replicas: 2,
            chunk_size: MIB + 1,
            ..Default::default()
        },
        Layout {
            replicas: 2,
            chunk_size: 32 * 1024,
            ..Default::default()
        },
        Layout {
            replicas: 2,
            chunk_size: 8 << 30,
            ..Default::default()
        },
        ec(17, 2, 17 * MIB),
        ec(4, 0, 4 * MIB),
        ec(4, 9, 4 * MIB),
        ec(3, 2, MIB),
        Layout {
            ec_parity: 2,
            replicas: 2,
            chunk_size: MIB,
            ..Default::default()
        },
    ];
    for l in bad {
        let r = t.set_layout(d, l);
        assert_eq!(r.errno, libc::EINVAL, "{l:?}");
        assert!(!r.message.is_empty());
    }
    assert_eq!(t.set_layout(d, ec(3, 2, 3 * 64 * 1024)).errno, 0);
    // Only the owner or root.
    let r = t.client_as(
        Some(Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        }),
        Op::SetLayout(SetLayout {
            ino: d,
            layout: Some(root),
        }),
    );
    assert_eq!(r.errno, libc::EPERM);
    assert_eq!(
        t.client(Op::SetLayout(SetLayout {
            ino: d,
            layout: None
        }))
        .errno,
        libc::EINVAL
    );
}

#[test]
fn bad_handles_inodes_and_servers_are_errnos() {
    let mut t = T::new();
    t.server("a:1", "");
    t.server("b:1", "");
    assert_eq!(t.alloc(12345, &[0]).errno, libc::EBADF);
    assert_eq!(t.commit(12345, 1, vec![]).errno, libc::EBADF);
    // Read-only handle.
    let (ino, h) = t.create(ROOT_INO, "f");
    let ro = t.client(Op::Open(kerfs_proto::Open {
        ino,
        flags: libc::O_RDONLY as u32,
    }));
    assert_eq!(ro.errno, 0);
    assert_eq!(t.alloc(ro.handle, &[0]).errno, libc::EBADF);
    assert_eq!(t.commit(ro.handle, 1, vec![]).errno, libc::EBADF);
    // Another client's handle.
    let other = t
        .internal(Op::RegisterClient(RegisterClient {
            description: "other".into(),
            lease_ms: 1 << 40,
        }))
        .client_id;
    let r = t.apply(Command {
        client_id: other,
        seq: 1,
        now: t.ts(),
        op: Some(Op::AllocateChunks(AllocateChunks {
            handle: h,
            indexes: vec![0],
        })),
        ..Default::default()
    });
    assert_eq!(r.errno, libc::EBADF);
    // Indexes too far out, too many.
    assert_eq!(t.alloc(h, &[u64::MAX]).errno, libc::EFBIG);
    let many: Vec<u64> = (0..5000).collect();
    assert_eq!(t.alloc(h, &many).errno, libc::EINVAL);
    assert_eq!(t.commit(h, u64::MAX, vec![]).errno, libc::EFBIG);
    // Commits of chunks that do not exist are ignored.
    let r = t.commit(
        h,
        5,
        vec![ChunkWritten {
            index: 9,
            version: 1,
            servers_ok: vec![1],
        }],
    );
    assert_eq!(r.errno, 0);
    // Unknown inode.
    let r = t.read(read_op::Op::GetChunks(GetChunks {
        ino: 999,
        ..Default::default()
    }));
    assert_eq!(r.errno, libc::ENOENT);
    assert_eq!(
        t.set_layout(999, super::chunks::default_layout()).errno,
        libc::ENOENT
    );
    // Heartbeats without content.
    let r = t.internal(Op::ChunkServerHeartbeat(ChunkServerHeartbeat {
        heartbeat: None,
    }));
    assert_eq!(r.errno, libc::EINVAL);
    let r = t.internal(Op::ChunkServerHeartbeat(ChunkServerHeartbeat {
        heartbeat: Some(ChunkHeartbeat::default()),
    }));
    assert_eq!(r.errno, libc::EINVAL);
    let r = t.heartbeat(0, false, vec![], vec![]);
    assert_eq!(r.errno, libc::ENOENT);
    // Paged GetChunks reports eof.
    assert_eq!(t.alloc(h, &[0, 1, 2]).errno, 0);
    let r = t.read(read_op::Op::GetChunks(GetChunks {
        ino,
        first_index: 1,
        count: 1,
    }));
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].index, 1);
    assert!(!r.eof);
    let r = t.read(read_op::Op::GetChunks(GetChunks {
        ino,
        first_index: 2,
        count: 1,
    }));
    assert!(r.eof);
    let _ = t.read(read_op::Op::GetAttr(GetAttr { ino }));
}

#[test]
fn statfs_without_servers_keeps_the_configured_figures() {
    let t = T::new();
    let s = t.read(read_op::Op::StatFs(StatFs {})).stats.unwrap();
    assert_eq!(s.blocks, NamespaceConfig::default().capacity_bytes / 4096);
}

// ------------------------------------------------------------------ repair

/// Three servers, an R=2 file with chunk 0 written to both of its servers: (t, ino, handle,
/// the chunk's servers, the spare server).
fn repair_setup() -> (T, u64, u64, Vec<u64>, u64) {
    let mut t = T::new();
    let ids: Vec<u64> = (0..3).map(|i| t.server(&format!("s{i}:1"), "")).collect();
    let (ino, h) = t.create(ROOT_INO, "f");
    let c = t.alloc(h, &[0]).chunks[0].clone();
    let on = servers_of(&c);
    let r = t.commit(
        h,
        MIB,
        vec![ChunkWritten {
            index: 0,
            version: c.version,
            servers_ok: on.clone(),
        }],
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    let spare = *ids.iter().find(|i| !on.contains(i)).unwrap();
    (t, ino, h, on, spare)
}

fn repair_report(t: &T) -> kerfs_proto::RepairReport {
    let r = t.read(read_op::Op::RepairStatus(kerfs_proto::RepairStatus {
        limit: 0,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    r.repair.unwrap()
}

fn tick(t: &mut T) {
    let r = t.internal(Op::RepairChunks(kerfs_proto::RepairChunks {
        rescan: false,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
}

/// `dead` stops heartbeating; the others keep going until it is marked down.
fn kill(t: &mut T, dead: u64) {
    t.now += 60;
    for id in 1..=3 {
        if id != dead {
            t.heartbeat(id, false, vec![], vec![]);
        }
    }
    t.internal(Op::ExpireChunkServers(ExpireChunkServers {}));
}

fn done(o: &kerfs_proto::ChunkRepairOrder, ok: bool) -> kerfs_proto::ChunkRepairDone {
    kerfs_proto::ChunkRepairDone {
        task_id: o.task_id,
        ino: o.ino,
        index: o.index,
        chunk_id: o.chunk_id,
        version: o.version,
        ok,
        message: String::new(),
        bytes: MIB,
    }
}

fn report_done(t: &mut T, server: u64, d: Vec<kerfs_proto::ChunkRepairDone>) -> Reply {
    t.internal(Op::ChunkServerHeartbeat(ChunkServerHeartbeat {
        heartbeat: Some(ChunkHeartbeat {
            server: Some(ChunkServerInfo {
                id: server,
                capacity_bytes: 1 << 40,
                available_bytes: 1 << 39,
                ..Default::default()
            }),
            repaired: d,
            ..Default::default()
        }),
    }))
}

#[test]
fn lost_server_is_repaired_onto_the_spare_and_the_copy_becomes_current() {
    let (mut t, ino, _h, on, spare) = repair_setup();
    assert_eq!(repair_report(&t).under_replicated, 0);
    let (dead, alive) = (on[0], on[1]);
    kill(&mut t, dead);
    assert_eq!(repair_report(&t).under_replicated, 1, "the loss is noted");
    // Nothing is handed out before the tick; the tick gives the spare the task.
    assert!(t
        .heartbeat(spare, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair
        .is_empty());
    tick(&mut t);
    let rep = repair_report(&t);
    assert_eq!(rep.repairing, 1);
    assert_eq!(rep.chunks[0].task.as_ref().unwrap().target_server, spare);
    // The alive server gets no order; the spare gets it (again, until it reports).
    assert!(t
        .heartbeat(alive, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair
        .is_empty());
    let orders = t
        .heartbeat(spare, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair;
    assert_eq!(orders.len(), 1);
    let o = orders[0].clone();
    assert_eq!(o.sources.len(), 1);
    assert_eq!(o.sources[0].address, format!("s{}:1", alive - 1));
    assert_eq!(
        t.heartbeat(spare, false, vec![], vec![])
            .heartbeat
            .unwrap()
            .repair,
        orders
    );
    // A full report of the spare while it copies: its partial copy is not garbage.
    let info = ChunkInfo {
        chunk_id: o.chunk_id,
        version: o.version,
        ..Default::default()
    };
    t.heartbeat(spare, true, vec![info], vec![]);
    let r = t.heartbeat(spare, false, vec![], vec![]);
    assert!(
        r.heartbeat.unwrap().delete.is_empty(),
        "partial copy queued for deletion"
    );

    report_done(&mut t, spare, vec![done(&o, true)]);
    let c = t.chunks(ino).chunks[0].clone();
    let mut now_on = servers_of(&c);
    now_on.sort();
    let mut want = vec![alive, spare];
    want.sort();
    assert_eq!(now_on, want);
    assert!(c.replicas.iter().all(|p| p.current));
    let rep = repair_report(&t);
    assert_eq!((rep.under_replicated, rep.repaired_total), (0, 1));
    // The dead server deletes its copy when it comes back.
    let del = t
        .heartbeat(dead, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .delete;
    assert_eq!(del.len(), 1);
    assert_eq!(del[0].chunk_id, o.chunk_id);
    // Placement accounting moved with the copy.
    let alloc: std::collections::BTreeMap<u64, u64> = t
        .servers()
        .iter()
        .map(|s| (s.info.as_ref().unwrap().id, s.allocated_bytes))
        .collect();
    assert_eq!(alloc[&dead], 0);
    assert!(alloc[&spare] > 0);
}

#[test]
fn a_copy_made_while_the_chunk_was_written_is_refused() {
    let (mut t, ino, h, on, spare) = repair_setup();
    let (dead, alive) = (on[0], on[1]);
    kill(&mut t, dead);
    tick(&mut t);
    let o = t
        .heartbeat(spare, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair[0]
        .clone();
    // The writer commits again in the same epoch (same version) while the copy is made.
    let r = t.commit(
        h,
        2 * MIB,
        vec![ChunkWritten {
            index: 0,
            version: o.version,
            servers_ok: vec![alive],
        }],
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    report_done(&mut t, spare, vec![done(&o, true)]);
    let c = t.chunks(ino).chunks[0].clone();
    assert!(
        !c.replicas.iter().any(|p| p.server_id == spare && p.current),
        "a copy that may miss the last commit was counted as current"
    );
    let rep = repair_report(&t);
    assert_eq!(
        (rep.under_replicated, rep.repaired_total, rep.failed_total),
        (1, 0, 1)
    );
    // A new task is handed out at once (the refused copy's deletion is withdrawn for it,
    // so it cannot remove the new copy).
    let hb = t.heartbeat(spare, false, vec![], vec![]).heartbeat.unwrap();
    assert!(hb.delete.is_empty());
    assert_eq!(hb.repair.len(), 1);
    assert_ne!(hb.repair[0].task_id, o.task_id);
    // A new epoch (version bump) also voids the task.
    let o2 = hb.repair[0].clone();
    t.alloc(h, &[0]);
    report_done(&mut t, spare, vec![done(&o2, true)]);
    assert_eq!(repair_report(&t).repaired_total, 0);
}

#[test]
fn corrupt_report_queues_the_chunk_and_a_stale_task_report_is_ignored() {
    let (mut t, ino, _h, on, spare) = repair_setup();
    let chunk_id = t.chunks(ino).chunks[0].replicas[0].chunk_id;
    let bad = ChunkInfo {
        chunk_id,
        version: 1,
        corrupt: true,
        ..Default::default()
    };
    t.heartbeat(on[0], false, vec![bad], vec![]);
    assert_eq!(repair_report(&t).under_replicated, 1);
    tick(&mut t);
    let o = t
        .heartbeat(spare, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair[0]
        .clone();
    // A report naming another task id (an old, abandoned one) changes nothing.
    let mut wrong = done(&o, true);
    wrong.task_id += 100;
    report_done(&mut t, spare, vec![wrong]);
    assert_eq!(repair_report(&t).repairing, 1);
    report_done(&mut t, spare, vec![done(&o, true)]);
    let c = t.chunks(ino).chunks[0].clone();
    assert!(c.replicas.iter().all(|p| p.current && p.server_id != on[0]));
}

#[test]
fn writer_replaces_a_failed_replica_and_its_commit_makes_it_current() {
    let (mut t, ino, h, on, spare) = repair_setup();
    let c = t.alloc(h, &[0]).chunks[0].clone();
    let r = t.client(Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
        handle: h,
        index: 0,
        version: c.version,
        server_id: on[0],
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let placed = servers_of(&r.chunks[0]);
    assert!(placed.contains(&spare) && placed.contains(&on[1]) && !placed.contains(&on[0]));
    let new = r.chunks[0]
        .replicas
        .iter()
        .find(|p| p.server_id == spare)
        .unwrap();
    assert!(!new.current, "no data there before the commit");
    assert_eq!(new.address, format!("s{}:1", spare - 1));
    // Background repair leaves it to the writer.
    tick(&mut t);
    assert_eq!(repair_report(&t).repairing, 0);
    let r = t.commit(
        h,
        MIB,
        vec![ChunkWritten {
            index: 0,
            version: c.version,
            servers_ok: vec![on[1], spare],
        }],
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    assert!(t.chunks(ino).chunks[0].replicas.iter().all(|p| p.current));
    assert_eq!(repair_report(&t).under_replicated, 0);
    // A live member can be rewritten in place when no other server is free.
    let r = t.client(Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
        handle: h,
        index: 0,
        version: c.version,
        server_id: spare,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let p = r.chunks[0]
        .replicas
        .iter()
        .find(|p| p.server_id == on[0])
        .expect("the free server takes it");
    assert!(!p.current);
    // The spare goes down: on[0] itself is all that is left for its own replacement.
    kill(&mut t, spare);
    let r = t.client(Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
        handle: h,
        index: 0,
        version: c.version,
        server_id: on[0],
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert!(
        servers_of(&r.chunks[0]).contains(&on[0]),
        "in place: the same server, rewritten"
    );
    let del = t
        .heartbeat(on[0], false, vec![], vec![])
        .heartbeat
        .unwrap()
        .delete;
    assert!(
        del.is_empty(),
        "an in-place replacement must not queue its own copy for deletion"
    );
    // With on[1] down too, nothing is left for it: ENOSPC.
    t.now += 60;
    t.heartbeat(on[0], false, vec![], vec![]);
    t.internal(Op::ExpireChunkServers(ExpireChunkServers {}));
    let r = t.client(Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
        handle: h,
        index: 0,
        version: c.version,
        server_id: on[1],
    }));
    assert_eq!(r.errno, libc::ENOSPC, "{}", r.message);
    // A stale epoch is refused.
    let r = t.client(Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
        handle: h,
        index: 0,
        version: c.version - 1,
        server_id: on[1],
    }));
    assert_eq!(r.errno, libc::ESTALE, "{}", r.message);
}

#[test]
fn a_server_back_without_its_chunks_has_them_marked_missing_and_repaired() {
    let (mut t, ino, _h, on, spare) = repair_setup();
    let chunk_id = t.chunks(ino).chunks[0].replicas[0].chunk_id;
    // A routine full report that lists the chunk changes nothing...
    let held = ChunkInfo {
        chunk_id,
        version: 1,
        ..Default::default()
    };
    t.heartbeat(on[0], true, vec![held], vec![]);
    t.heartbeat(on[1], true, vec![held], vec![]);
    assert_eq!(repair_report(&t).under_replicated, 0);
    // ...but on[0] restarts on an empty disk: its first full report lacks the chunk.
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo {
            id: on[0],
            address: format!("s{}:1", on[0] - 1),
            ..Default::default()
        }),
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    t.heartbeat(on[0], true, vec![], vec![]);
    let c = t.chunks(ino).chunks[0].clone();
    let p = c.replicas.iter().find(|p| p.server_id == on[0]).unwrap();
    assert!(
        !p.current,
        "a copy the server does not have is still counted current"
    );
    assert_eq!(repair_report(&t).under_replicated, 1);
    tick(&mut t);
    let task = repair_report(&t).chunks[0].task.unwrap();
    assert_eq!(task.target_server, spare, "the spare first, not in place");
    assert_eq!(task.old_server, on[0]);
}

// ------------------------------------------------------------------ drain and removal

fn drain_report(t: &T, server: u64) -> kerfs_proto::DrainReport {
    let r = t.read(read_op::Op::DrainStatus(kerfs_proto::DrainStatus {
        server_id: server,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    r.drain.unwrap()
}

fn state_of(t: &T, server: u64) -> String {
    t.servers()
        .into_iter()
        .find(|s| s.info.as_ref().unwrap().id == server)
        .unwrap()
        .state
}

fn orders(t: &mut T, server: u64) -> Vec<kerfs_proto::ChunkRepairOrder> {
    t.heartbeat(server, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .repair
}

#[test]
fn drain_moves_the_copy_before_dropping_it_then_remove_is_allowed() {
    let (mut t, ino, h, on, spare) = repair_setup();
    t.close(h);
    let (leaving, staying) = (on[0], on[1]);
    let remove = |t: &mut T| {
        t.internal(Op::RemoveChunkServer(kerfs_proto::RemoveChunkServer {
            server_id: leaving,
        }))
    };
    // It holds one of the two copies: removing it would leave the chunk with one.
    let r = remove(&mut t);
    assert_eq!(r.errno, libc::EBUSY, "{}", r.message);
    assert!(r.message.contains("node drain"), "{}", r.message);
    assert_eq!(state_of(&t, leaving), "up");

    let r = t.internal(Op::DrainChunkServer(kerfs_proto::DrainChunkServer {
        server_id: leaving,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(state_of(&t, leaving), "draining");
    let rep = r.drain.unwrap();
    assert_eq!((rep.chunks_left, rep.moving), (1, 1), "{rep:?}");
    // Nothing is lacking: the draining copy still counts.
    let q = repair_report(&t);
    assert_eq!(
        (q.under_replicated, q.to_move, q.draining_servers),
        (0, 1, 1)
    );
    let o = orders(&mut t, spare);
    assert_eq!(o.len(), 1, "the spare gets the move");
    // New chunks are never placed on a draining server.
    let (_, h2) = t.create(ROOT_INO, "g");
    for _ in 0..4 {
        let c = t.alloc(h2, &[0]).chunks[0].clone();
        assert!(!servers_of(&c).contains(&leaving));
    }
    // While the copy is made both old copies stay current; the move only lands on acceptance.
    let c = t.chunks(ino).chunks[0].clone();
    assert!(servers_of(&c).contains(&leaving) && c.replicas.iter().all(|p| p.current));
    report_done(&mut t, spare, vec![done(&o[0], true)]);
    let c = t.chunks(ino).chunks[0].clone();
    let mut now_on = servers_of(&c);
    now_on.sort();
    let mut want = vec![staying, spare];
    want.sort();
    assert_eq!(now_on, want);
    assert!(c.replicas.iter().all(|p| p.current));
    let del = t
        .heartbeat(leaving, false, vec![], vec![])
        .heartbeat
        .unwrap()
        .delete;
    assert_eq!(del.len(), 1, "the drained copy is deleted");
    assert_eq!(state_of(&t, leaving), "drained");
    let rep = drain_report(&t, leaving);
    assert_eq!((rep.chunks_left, rep.state.as_str()), (0, "drained"));
    assert_eq!(repair_report(&t).draining_servers, 0);
    // A restart does not undo it.
    t.heartbeat(leaving, true, vec![], vec![]);
    assert_eq!(state_of(&t, leaving), "drained");

    let r = remove(&mut t);
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(state_of(&t, leaving), "removed");
    let r = t.heartbeat(leaving, false, vec![], vec![]);
    assert_eq!(r.errno, libc::EPERM, "a removed server is refused");
    assert!(r.message.contains("removed"), "{}", r.message);
}

#[test]
fn drain_waits_for_an_open_write_epoch_and_a_commit_meanwhile_refuses_the_copy() {
    let (mut t, ino, h, on, spare) = repair_setup();
    let leaving = on[0];
    let r = t.internal(Op::DrainChunkServer(kerfs_proto::DrainChunkServer {
        server_id: leaving,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    // `h` started the chunk's epoch and is open: no move yet, and the report says why.
    assert!(orders(&mut t, spare).is_empty());
    let rep = drain_report(&t, leaving);
    assert_eq!((rep.chunks_left, rep.moving), (1, 0));
    assert!(
        rep.notes
            .iter()
            .any(|n| n.contains("waiting for the writer")),
        "{rep:?}"
    );
    t.close(h);
    tick(&mut t);
    let o = orders(&mut t, spare);
    assert_eq!(o.len(), 1);
    // Another writer commits while the copy is made: the copy is refused, the draining copy
    // stays, and the move is handed out again.
    let h2 = t
        .client(Op::Open(kerfs_proto::Open {
            ino,
            flags: libc::O_RDWR as u32,
        }))
        .handle;
    let c = t.alloc(h2, &[0]).chunks[0].clone();
    let r = t.commit(
        h2,
        MIB,
        vec![ChunkWritten {
            index: 0,
            version: c.version,
            servers_ok: on.clone(),
        }],
    );
    assert_eq!(r.errno, 0, "{}", r.message);
    t.close(h2);
    report_done(&mut t, spare, vec![done(&o[0], true)]);
    let c = t.chunks(ino).chunks[0].clone();
    assert!(servers_of(&c).contains(&leaving), "moved despite the write");
    assert!(c.replicas.iter().all(|p| p.current));
    assert_eq!(state_of(&t, leaving), "draining");
    tick(&mut t);
    let o = orders(&mut t, spare);
    assert_eq!(o.len(), 1, "the move is retried");
    assert_eq!(o[0].version, c.version);
}

#[test]
fn removing_a_down_server_is_refused_only_while_it_has_the_last_copy() {
    let (mut t, ino, h, on, _spare) = repair_setup();
    t.close(h);
    let (dead, alive) = (on[0], on[1]);
    kill(&mut t, dead);
    // The other copy is good: the dead server's copy is not the last one.
    let r = t.internal(Op::RemoveChunkServer(kerfs_proto::RemoveChunkServer {
        server_id: dead,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(state_of(&t, dead), "removed");
    // Now `alive` holds the last current copy (the removed one and the spare have none yet).
    let rep = repair_report(&t);
    assert_eq!(rep.under_replicated, 1);
    kill(&mut t, alive);
    let r = t.internal(Op::RemoveChunkServer(kerfs_proto::RemoveChunkServer {
        server_id: alive,
    }));
    assert_eq!(r.errno, libc::EBUSY, "{}", r.message);
    assert!(r.message.contains("last readable copy"), "{}", r.message);
    let _ = ino;
}

#[test]
fn a_drain_survives_the_server_going_down_and_registering_again() {
    let (mut t, _ino, h, on, spare) = repair_setup();
    t.close(h);
    let leaving = on[0];
    let r = t.internal(Op::DrainChunkServer(kerfs_proto::DrainChunkServer {
        server_id: leaving,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    kill(&mut t, leaving);
    assert_eq!(state_of(&t, leaving), "down");
    let rep = drain_report(&t, leaving);
    assert!(rep.requested && rep.state == "down", "{rep:?}");
    // It restarts: registering again does not cancel the drain.
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo {
            id: leaving,
            address: format!("s{}:1", leaving - 1),
            ..Default::default()
        }),
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    assert_eq!(state_of(&t, leaving), "draining");
    t.heartbeat(leaving, false, vec![], vec![]);
    assert_eq!(state_of(&t, leaving), "draining");
    // The chunk is still queued (a repair or a move): the mover hands out a copy for it.
    tick(&mut t);
    let o = orders(&mut t, spare);
    assert_eq!(o.len(), 1, "{:?}", repair_report(&t));
    report_done(&mut t, spare, vec![done(&o[0], true)]);
    tick(&mut t);
    assert_eq!(state_of(&t, leaving), "drained");
    // A removed server cannot come back under its id.
    let r = t.internal(Op::RemoveChunkServer(kerfs_proto::RemoveChunkServer {
        server_id: leaving,
    }));
    assert_eq!(r.errno, 0, "{}", r.message);
    let r = t.internal(Op::RegisterChunkServer(RegisterChunkServer {
        info: Some(ChunkServerInfo {
            id: leaving,
            address: format!("s{}:1", leaving - 1),
            ..Default::default()
        }),
    }));
    assert_eq!(r.errno, libc::EPERM, "{}", r.message);
}
