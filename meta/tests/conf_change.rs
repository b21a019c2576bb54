//! Membership changes on in-memory [`MetaNode`]s, deterministically (one thread, messages
//! delivered in order, no faults): a node that starts with no configuration joins as a
//! learner through a snapshot, is promoted, leadership moves, an original node is removed,
//! and a node reopened from its engine comes back with the new membership. Each change is
//! judged by [`members::plan`] on the leader's own view, as the server does.
//!
//! The faulty-network simulation (raft_sim.rs) keeps a fixed membership; this file checks
//! the conf-change path of the node itself (the record applied with the change, the
//! compaction that makes a joining node start from a snapshot).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use raft::prelude::{Message, MessageType};

use kerfs_meta::members::{self, GroupView, Plan};
use kerfs_meta::namespace::Namespace;
use kerfs_meta::store::{Engine, MemEngine};
use kerfs_meta::{MetaNode, NodeConfig};
use kerfs_proto::{
    command, members_request, read_op, Caller, Command, MemberAdd, MemberPromote, MemberRemove,
    ReadOp, RegisterClient, StateDigest,
};

/// raft keeps voters in a hash set: compare them in order.
fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

struct Group {
    engines: BTreeMap<u64, MemEngine>,
    nodes: BTreeMap<u64, MetaNode>,
    queue: VecDeque<Message>,
}

fn config(id: u64, voters: Vec<u64>) -> NodeConfig {
    let mut c = NodeConfig::new(id, voters);
    c.election_jitter = false;
    // Node 1 times out first and wins the first election.
    c.election_ticks = 10 + 3 * id as usize;
    c
}

impl Group {
    fn new() -> Group {
        let mut g = Group {
            engines: BTreeMap::new(),
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
        };
        for id in 1..=3 {
            g.open(id, vec![1, 2, 3]);
        }
        g
    }

    fn open(&mut self, id: u64, voters: Vec<u64>) {
        let engine = self.engines.entry(id).or_default().clone();
        let engine: Arc<dyn Engine> = Arc::new(engine);
        let node =
            MetaNode::open(config(id, voters), engine, Namespace::default()).expect("open node");
        self.nodes.insert(id, node);
    }

    /// Handles every Ready and delivers every message until nothing moves.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for node in self.nodes.values_mut() {
                while node.has_ready() {
                    let out = node.handle_ready().expect("handle ready");
                    self.queue.extend(out.messages);
                    moved = true;
                }
            }
            while let Some(m) = self.queue.pop_front() {
                moved = true;
                let (from, to, snap) = (m.from, m.to, m.get_msg_type() == MessageType::MsgSnapshot);
                if let Some(node) = self.nodes.get_mut(&to) {
                    node.step(m).expect("step");
                }
                if snap {
                    if let Some(sender) = self.nodes.get_mut(&from) {
                        sender.report_snapshot(to, true);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the group never settled");
    }

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.pump();
        }
    }

    fn leader(&self) -> u64 {
        let leaders: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect();
        assert_eq!(leaders.len(), 1, "one leader expected: {leaders:?}");
        leaders[0]
    }

    fn view(&self) -> GroupView {
        let l = &self.nodes[&self.leader()];
        let record = l.member_record().expect("record");
        GroupView {
            leader: l.id(),
            voters: l.voters().into_iter().collect(),
            learners: l.learners().into_iter().collect(),
            active: l.active_members().into_iter().collect(),
            matched: l.progress().into_iter().collect(),
            last_index: l.last_index(),
            change_pending: l.conf_change_pending(),
            addrs: match record {
                Some(r) => r.addrs.into_iter().collect(),
                None => (1..=3).map(|i| (i, format!("10.0.0.{i}:7001"))).collect(),
            },
            removed: Default::default(),
        }
    }

    /// Judges `op` on the leader's view and proposes the change; panics if refused.
    fn change(&mut self, op: members_request::Op) {
        let view = self.view();
        let Ok(Plan::Change(cc, record)) = members::plan(&view, &op) else {
            panic!("{op:?} refused: {:?}", members::plan(&view, &op));
        };
        let leader = self.leader();
        self.nodes
            .get_mut(&leader)
            .expect("leader")
            .propose_conf_change(cc, &record)
            .expect("propose");
        self.ticks(5);
    }

    fn write(&mut self, n: u64) {
        let leader = self.leader();
        for seq in 0..n {
            let cmd = Command {
                client_id: 0,
                seq: 1000 + seq,
                op: Some(command::Op::RegisterClient(RegisterClient {
                    description: format!("client {seq}"),
                    lease_ms: 3_600_000,
                })),
                ..Default::default()
            };
            self.nodes
                .get_mut(&leader)
                .expect("leader")
                .propose(&cmd)
                .expect("propose");
        }
        self.ticks(3);
    }

    fn digest(&self, id: u64) -> (Vec<u8>, u64) {
        let n = &self.nodes[&id];
        let reply = n.read(&ReadOp {
            caller: Some(Caller::default()),
            op: Some(read_op::Op::StateDigest(StateDigest {})),
        });
        (reply.data, n.applied_index())
    }
}

#[test]
fn a_node_joins_through_a_snapshot_and_a_removed_one_is_gone_after_a_restart() {
    let mut g = Group::new();
    g.ticks(30);
    assert_eq!(g.leader(), 1);
    g.write(20);

    // Node 4 starts with no configuration; the leader adds it as a learner.
    g.open(4, Vec::new());
    g.change(members_request::Op::Add(MemberAdd {
        id: 4,
        addr: "10.0.0.4:7001".into(),
    }));
    let n4 = &g.nodes[&4];
    assert!(
        n4.snapshot_index() > 0,
        "node 4 did not start from a snapshot"
    );
    assert_eq!(n4.learners(), vec![4]);
    assert_eq!(sorted(n4.voters()), vec![1, 2, 3]);
    let rec = n4
        .member_record()
        .expect("record")
        .expect("node 4 has no record");
    assert_eq!(rec.addrs.get(&4).map(String::as_str), Some("10.0.0.4:7001"));

    g.write(10);
    g.change(members_request::Op::Promote(MemberPromote { id: 4 }));
    assert_eq!(sorted(g.nodes[&4].voters()), vec![1, 2, 3, 4]);

    // The leader is not removed; once leadership moved, it is.
    assert!(matches!(
        members::plan(
            &g.view(),
            &members_request::Op::Remove(MemberRemove { id: 1 })
        ),
        Err(members::Refused::RemoveLeader(1))
    ));
    g.nodes.get_mut(&1).expect("node 1").transfer_leader(2);
    g.ticks(20);
    assert_eq!(g.leader(), 2);
    g.change(members_request::Op::Remove(MemberRemove { id: 1 }));
    g.write(10);
    for id in [2, 3, 4] {
        assert_eq!(sorted(g.nodes[&id].voters()), vec![2, 3, 4], "node {id}");
        let rec = g.nodes[&id]
            .member_record()
            .expect("record")
            .expect("record");
        assert_eq!(rec.removed, vec![1], "node {id}");
        assert!(!rec.addrs.contains_key(&1), "node {id}");
    }
    let d2 = g.digest(2);
    assert_eq!(g.digest(3), d2);
    assert_eq!(g.digest(4), d2);

    // Node 3 reopened with its original voter list comes back with the new configuration.
    g.nodes.remove(&3);
    g.open(3, vec![1, 2, 3]);
    assert_eq!(sorted(g.nodes[&3].voters()), vec![2, 3, 4]);
    g.nodes.remove(&1);
    g.ticks(10);
    g.write(5);
    let d2 = g.digest(2);
    assert_eq!(g.digest(3), d2);
}
