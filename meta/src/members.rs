//! The metadata group's membership: the replicated id → address record (stored in the state
//! machine, so snapshots carry it to new and lagging nodes), and the rules a leader checks
//! before it proposes a membership change (one change at a time, never below a quorum of
//! live voters, learners first and promoted only once caught up). The rules are a pure
//! function of what the leader sees ([`GroupView`]), so they are unit-tested without raft.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2};

use kerfs_proto::{members_request, MemberRecord};

use crate::store::{KvRead, StoreResult};

/// Key of the [`MemberRecord`] in the state machine (no namespace key starts with `P`).
pub const K_MEMBERS: &[u8] = b"P";

/// A learner within this many entries of the leader's last index may be promoted: close
/// enough that, as a voter, it acknowledges new entries at once instead of stalling commits
/// while it catches up.
pub const CATCH_UP_SLACK: u64 = 64;

/// The record in `state`, None until the first membership change (before it, `--peers`
/// says who the members are).
pub fn load(state: &dyn KvRead) -> StoreResult<Option<MemberRecord>> {
    match state.get(K_MEMBERS)? {
        Some(bytes) => match MemberRecord::decode(bytes.as_slice()) {
            Ok(r) => Ok(Some(r)),
            Err(e) => Err(crate::store::StoreError::Corrupt {
                key: "members".into(),
                why: e.to_string(),
            }),
        },
        None => Ok(None),
    }
}

/// What the leader knows when it judges a change.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    pub leader: u64,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// Members heard from within the last election timeout (the leader included).
    pub active: BTreeSet<u64>,
    /// Last index known to match the leader's log, per member.
    pub matched: BTreeMap<u64, u64>,
    pub last_index: u64,
    /// A conf change was proposed and is not applied yet.
    pub change_pending: bool,
    /// Addresses of the members (the replicated record, or `--peers` before any change).
    pub addrs: BTreeMap<u64, String>,
    pub removed: BTreeSet<u64>,
}

/// Why a membership request was refused; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("a membership change is still in progress ({0}); wait for it to finish (`kerfsctl meta members`) and try again")]
    Pending(String),
    #[error("node id 0 is reserved; number metadata nodes from 1")]
    ZeroId,
    #[error("{0:?} is not HOST:PORT")]
    BadAddr(String),
    #[error("node {0} is already a member ({1}); remove it first to move it")]
    AlreadyMember(u64, String),
    #[error("address {addr} is already node {id}'s")]
    AddrTaken { id: u64, addr: String },
    #[error("node {0} is not a member of the metadata group (`kerfsctl meta members` lists them)")]
    NotMember(u64),
    #[error("node {0} is not a learner; only a node added with `kerfsctl meta add` is promoted")]
    NotLearner(u64),
    #[error("learner {0} has not answered the leader yet; check that `kerfsd meta --id {0} --join` runs at the address given and that the leader can reach it")]
    NotHeard(u64),
    #[error("learner {id} is {behind} entries behind the leader (at most {CATCH_UP_SLACK} for a promotion); check that it runs and that the leader can reach it, then retry")]
    Behind { id: u64, behind: u64 },
    #[error("node {0} is the last voter of the metadata group; it cannot be removed")]
    LastVoter(u64),
    #[error("removing node {id} would leave {live} live voters of {left}, fewer than a quorum of {quorum}: start the nodes that are down first (or add one)")]
    Quorum {
        id: u64,
        live: usize,
        left: usize,
        quorum: usize,
    },
    #[error("promoting node {id} would make {voters} voters with {live} live, fewer than a quorum of {quorum}: start the voters that are down first")]
    PromoteQuorum {
        id: u64,
        live: usize,
        voters: usize,
        quorum: usize,
    },
    #[error(
        "node {0} is the leader; move leadership first (`kerfsctl meta transfer-leader OTHER`)"
    )]
    RemoveLeader(u64),
    #[error("node {0} is a learner; it must be promoted to voter before it can lead")]
    TransferToLearner(u64),
}

impl Refused {
    pub fn errno(&self) -> i32 {
        match self {
            Refused::Pending(_) | Refused::Behind { .. } | Refused::NotHeard(_) => libc::EBUSY,
            Refused::Quorum { .. }
            | Refused::PromoteQuorum { .. }
            | Refused::LastVoter(_)
            | Refused::RemoveLeader(_) => libc::EPERM,
            Refused::NotMember(_) => libc::ENOENT,
            Refused::AlreadyMember(..) | Refused::AddrTaken { .. } => libc::EEXIST,
            _ => libc::EINVAL,
        }
    }
}

/// What the leader does for an accepted request.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Propose this conf change, with the membership record after it as its context.
    Change(ConfChangeV2, MemberRecord),
    /// raft's leader transfer to this voter.
    Transfer(u64),
    /// Nothing to do (e.g. a transfer to the leader itself).
    Nothing,
}

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn single(kind: ConfChangeType, id: u64) -> ConfChangeV2 {
    let mut step = ConfChangeSingle::default();
    step.set_change_type(kind);
    step.node_id = id;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![step].into());
    cc
}

fn record(addrs: BTreeMap<u64, String>, removed: BTreeSet<u64>) -> MemberRecord {
    MemberRecord {
        addrs: addrs.into_iter().collect(),
        removed: removed.into_iter().collect(),
    }
}

/// Judges `op` against `view`: the change to propose, or why not.
pub fn plan(view: &GroupView, op: &members_request::Op) -> Result<Plan, Refused> {
    use members_request::Op;
    let is_change = !matches!(op, Op::List(_) | Op::Transfer(_));
    if is_change && view.change_pending {
        return Err(Refused::Pending("a conf change is not applied yet".into()));
    }
    match op {
        Op::List(_) => Ok(Plan::Nothing),
        Op::Add(add) => {
            if add.id == 0 {
                return Err(Refused::ZeroId);
            }
            if add.addr.parse::<std::net::SocketAddr>().is_err()
                && add
                    .addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(Refused::BadAddr(add.addr.clone()));
            }
            if let Some(addr) = view.addrs.get(&add.id) {
                if view.voters.contains(&add.id) || view.learners.contains(&add.id) {
                    return Err(Refused::AlreadyMember(add.id, addr.clone()));
                }
            }
            if let Some(l) = view.learners.iter().next() {
                return Err(Refused::Pending(format!(
                    "learner {l} is not promoted yet; `kerfsctl meta add` promotes it once it caught up, or `kerfsctl meta remove {l}` gives up"
                )));
            }
            if let Some((id, _)) = view.addrs.iter().find(|(_, a)| **a == add.addr) {
                return Err(Refused::AddrTaken {
                    id: *id,
                    addr: add.addr.clone(),
                });
            }
            let mut addrs = view.addrs.clone();
            addrs.insert(add.id, add.addr.clone());
            let mut removed = view.removed.clone();
            removed.remove(&add.id);
            Ok(Plan::Change(
                single(ConfChangeType::AddLearnerNode, add.id),
                record(addrs, removed),
            ))
        }
        Op::Promote(p) => {
            if !view.learners.contains(&p.id) {
                return Err(if view.voters.contains(&p.id) {
                    Refused::NotLearner(p.id)
                } else {
                    Refused::NotMember(p.id)
                });
            }
            let matched = view.matched.get(&p.id).copied().unwrap_or(0);
            // In a short log even a learner that never answered is "close": it must have
            // acknowledged something (its snapshot at least) and be heard from now.
            if matched == 0 || !view.active.contains(&p.id) {
                return Err(Refused::NotHeard(p.id));
            }
            let behind = view.last_index.saturating_sub(matched);
            if behind > CATCH_UP_SLACK {
                return Err(Refused::Behind { id: p.id, behind });
            }
            // A bigger group needs a bigger quorum: the voters that are down must not be
            // what it then lacks (the caught-up learner counts as live).
            let voters = view.voters.len() + 1;
            let live = view
                .voters
                .iter()
                .filter(|v| view.active.contains(v))
                .count()
                + 1;
            if live < quorum(voters) {
                return Err(Refused::PromoteQuorum {
                    id: p.id,
                    live,
                    voters,
                    quorum: quorum(voters),
                });
            }
            Ok(Plan::Change(
                single(ConfChangeType::AddNode, p.id),
                record(view.addrs.clone(), view.removed.clone()),
            ))
        }
        Op::Remove(r) => {
            let is_voter = view.voters.contains(&r.id);
            if !is_voter && !view.learners.contains(&r.id) {
                return Err(Refused::NotMember(r.id));
            }
            if is_voter {
                if view.voters.len() == 1 {
                    return Err(Refused::LastVoter(r.id));
                }
                if r.id == view.leader {
                    return Err(Refused::RemoveLeader(r.id));
                }
                let left = view.voters.len() - 1;
                let live = view
                    .voters
                    .iter()
                    .filter(|v| **v != r.id && view.active.contains(v))
                    .count();
                if live < quorum(left) {
                    return Err(Refused::Quorum {
                        id: r.id,
                        live,
                        left,
                        quorum: quorum(left),
                    });
                }
            }
            let mut addrs = view.addrs.clone();
            addrs.remove(&r.id);
            let mut removed = view.removed.clone();
            removed.insert(r.id);
            Ok(Plan::Change(
                single(ConfChangeType::RemoveNode, r.id),
                record(addrs, removed),
            ))
        }
        Op::Transfer(t) => {
            if view.learners.contains(&t.id) {
                return Err(Refused::TransferToLearner(t.id));
            }
            if !view.voters.contains(&t.id) {
                return Err(Refused::NotMember(t.id));
            }
            if view.change_pending {
                return Err(Refused::Pending("a conf change is not applied yet".into()));
            }
            if t.id == view.leader {
                return Ok(Plan::Nothing);
            }
            Ok(Plan::Transfer(t.id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kerfs_proto::{MemberAdd, MemberPromote, MemberRemove, MemberTransfer};
    use members_request::Op;

    /// Voters 1..=n, leader 1, all active and caught up at index 100.
    fn view(n: u64) -> GroupView {
        let voters: BTreeSet<u64> = (1..=n).collect();
        GroupView {
            leader: 1,
            active: voters.clone(),
            matched: voters.iter().map(|v| (*v, 100)).collect(),
            addrs: voters
                .iter()
                .map(|v| (*v, format!("127.0.0.1:{}", 7000 + v)))
                .collect(),
            voters,
            last_index: 100,
            ..Default::default()
        }
    }

    fn add(id: u64, port: u16) -> Op {
        Op::Add(MemberAdd {
            id,
            addr: format!("127.0.0.1:{port}"),
        })
    }

    fn remove(id: u64) -> Op {
        Op::Remove(MemberRemove { id })
    }

    #[test]
    fn a_new_node_joins_as_a_learner_with_its_address_in_the_record() {
        let Ok(Plan::Change(cc, rec)) = plan(&view(3), &add(4, 7004)) else {
            panic!("add refused");
        };
        assert_eq!(cc.changes.len(), 1);
        assert_eq!(
            cc.changes[0].get_change_type(),
            ConfChangeType::AddLearnerNode
        );
        assert_eq!(
            rec.addrs.get(&4).map(String::as_str),
            Some("127.0.0.1:7004")
        );
        assert_eq!(rec.addrs.len(), 4);
    }

    #[test]
    fn a_second_change_is_refused_while_one_is_pending() {
        let mut v = view(3);
        v.change_pending = true;
        assert!(matches!(plan(&v, &add(4, 7004)), Err(Refused::Pending(_))));
        assert!(matches!(plan(&v, &remove(3)), Err(Refused::Pending(_))));
        // An unpromoted learner is an add in progress: no second add.
        let mut v = view(3);
        v.learners.insert(4);
        v.active.insert(4);
        v.matched.insert(4, 100);
        v.addrs.insert(4, "127.0.0.1:7004".into());
        assert!(matches!(plan(&v, &add(5, 7005)), Err(Refused::Pending(_))));
        // But it can be promoted, or given up.
        assert!(plan(&v, &Op::Promote(MemberPromote { id: 4 })).is_ok());
        assert!(plan(&v, &remove(4)).is_ok());
    }

    #[test]
    fn a_learner_is_promoted_only_when_caught_up() {
        let mut v = view(3);
        v.learners.insert(4);
        let promote = Op::Promote(MemberPromote { id: 4 });
        assert_eq!(
            plan(&v, &promote),
            Err(Refused::NotHeard(4)),
            "never answered"
        );
        v.matched.insert(4, 90);
        assert_eq!(
            plan(&v, &promote),
            Err(Refused::NotHeard(4)),
            "not heard lately"
        );
        v.active.insert(4);
        v.matched.insert(4, 100 - CATCH_UP_SLACK - 1);
        assert_eq!(
            plan(&v, &promote),
            Err(Refused::Behind {
                id: 4,
                behind: CATCH_UP_SLACK + 1
            })
        );
        v.matched.insert(4, 100 - CATCH_UP_SLACK);
        let Ok(Plan::Change(cc, _)) = plan(&v, &promote) else {
            panic!("promotion refused");
        };
        assert_eq!(cc.changes[0].get_change_type(), ConfChangeType::AddNode);
        assert_eq!(
            plan(&v, &Op::Promote(MemberPromote { id: 2 })),
            Err(Refused::NotLearner(2))
        );
    }

    #[test]
    fn a_promotion_that_would_leave_too_few_live_voters_is_refused() {
        // 3 voters with 2 down: promoting makes 4 voters, 2 live, quorum 3.
        let mut v = view(3);
        v.active.remove(&2);
        v.active.remove(&3);
        v.learners.insert(4);
        v.active.insert(4);
        v.matched.insert(4, 100);
        let promote = Op::Promote(MemberPromote { id: 4 });
        assert!(matches!(
            plan(&v, &promote),
            Err(Refused::PromoteQuorum {
                live: 2,
                voters: 4,
                quorum: 3,
                ..
            })
        ));
        v.active.insert(2);
        assert!(plan(&v, &promote).is_ok(), "3 live of 4");
    }

    #[test]
    fn a_remove_that_would_lose_quorum_is_refused() {
        // 3 voters, node 3 down: removing 2 leaves {1, 3} with one live, quorum 2.
        let mut v = view(3);
        v.active.remove(&3);
        assert_eq!(
            plan(&v, &remove(2)),
            Err(Refused::Quorum {
                id: 2,
                live: 1,
                left: 2,
                quorum: 2
            })
        );
        // Removing the dead node itself is fine: {1, 2}, both live.
        assert!(plan(&v, &remove(3)).is_ok());
        // 5 voters, two down: removing a live one leaves 2 live of 4, quorum 3.
        let mut v = view(5);
        v.active.remove(&4);
        v.active.remove(&5);
        assert!(matches!(plan(&v, &remove(2)), Err(Refused::Quorum { .. })));
        assert!(plan(&v, &remove(5)).is_ok());
    }

    #[test]
    fn the_last_voter_and_the_leader_are_not_removed() {
        assert_eq!(plan(&view(1), &remove(1)), Err(Refused::LastVoter(1)));
        assert_eq!(plan(&view(3), &remove(1)), Err(Refused::RemoveLeader(1)));
        assert_eq!(plan(&view(3), &remove(9)), Err(Refused::NotMember(9)));
    }

    #[test]
    fn a_removed_node_is_remembered_and_forgotten_when_re_added() {
        let Ok(Plan::Change(_, rec)) = plan(&view(3), &remove(3)) else {
            panic!("remove refused");
        };
        assert_eq!(rec.removed, vec![3]);
        assert!(!rec.addrs.contains_key(&3));
        let mut v = view(2);
        v.removed.insert(3);
        let Ok(Plan::Change(_, rec)) = plan(&v, &add(3, 7013)) else {
            panic!("re-add refused");
        };
        assert!(rec.removed.is_empty());
    }

    #[test]
    fn bad_adds_are_refused_with_what_to_fix() {
        let v = view(3);
        assert_eq!(plan(&v, &add(0, 7009)), Err(Refused::ZeroId));
        assert!(matches!(
            plan(&v, &add(2, 7009)),
            Err(Refused::AlreadyMember(2, _))
        ));
        assert!(matches!(
            plan(&v, &add(4, 7002)),
            Err(Refused::AddrTaken { id: 2, .. })
        ));
        let bad = Op::Add(MemberAdd {
            id: 4,
            addr: "nohost".into(),
        });
        assert!(matches!(plan(&v, &bad), Err(Refused::BadAddr(_))));
        let named = Op::Add(MemberAdd {
            id: 4,
            addr: "meta4.example:7001".into(),
        });
        assert!(plan(&v, &named).is_ok());
    }

    #[test]
    fn transfer_goes_to_voters_only() {
        let mut v = view(3);
        v.learners.insert(4);
        assert_eq!(
            plan(&v, &Op::Transfer(MemberTransfer { id: 2 })),
            Ok(Plan::Transfer(2))
        );
        assert_eq!(
            plan(&v, &Op::Transfer(MemberTransfer { id: 1 })),
            Ok(Plan::Nothing)
        );
        assert_eq!(
            plan(&v, &Op::Transfer(MemberTransfer { id: 4 })),
            Err(Refused::TransferToLearner(4))
        );
        assert_eq!(
            plan(&v, &Op::Transfer(MemberTransfer { id: 7 })),
            Err(Refused::NotMember(7))
        );
    }
}
