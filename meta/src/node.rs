//! One metadata node's raft core, with I/O left to the caller: the server's driver thread
//! and the deterministic simulation both feed it ticks, messages, proposals and read
//! requests, and send what [`MetaNode::handle_ready`] returns.
//!
//! `handle_ready` follows the order raft-rs documents: apply a received snapshot, apply
//! committed entries (state writes and the applied index in one batch), append entries and
//! hard state durably, then hand out the messages, then advance. Messages are only released
//! after the entries they acknowledge are on disk.

use std::sync::Arc;

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::*;
use raft::{ReadOnlyOption, StateRole};
use tracing::{debug, info, warn};

use kerfs_proto::{Command, MemberRecord, ReadOp, Reply, Timespec};

use crate::namespace::{Namespace, SweepsDue};
use crate::raft_log::LogStore;
use crate::store::{space, Engine, Overlay, SpaceView, StoreError, WriteBatch};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// The context of a log entry whose command asked to be on disk before it is acknowledged
/// ([`Command::sync`]): every node that appends it flushes before answering the append.
const SYNC_CONTEXT: &[u8] = b"sync";

/// Raft timing and log settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Every voter of the initial configuration, this node included.
    pub voters: Vec<u64>,
    /// Ticks without a heartbeat before a follower campaigns (randomised up to twice that
    /// unless `election_jitter` is off).
    pub election_ticks: usize,
    /// Draw each election timeout from [election_ticks, 2 * election_ticks), as raft
    /// recommends against split votes. raft-rs draws it from an unseedable thread RNG, so a
    /// deterministic simulation turns this off and varies `election_ticks` per node itself.
    pub election_jitter: bool,
    pub heartbeat_ticks: usize,
    /// Compact the log once it holds more applied entries than this.
    pub compact_after: u64,
}

impl NodeConfig {
    pub fn new(id: u64, voters: Vec<u64>) -> NodeConfig {
        NodeConfig {
            id,
            voters,
            election_ticks: 10,
            election_jitter: true,
            heartbeat_ticks: 2,
            compact_after: 10_000,
        }
    }
}

/// A command that committed and was applied, with the reply for whoever proposed it.
#[derive(Debug, Clone)]
pub struct AppliedCommand {
    pub index: u64,
    pub client_id: u64,
    pub seq: u64,
    pub reply: Reply,
}

/// What one pass of [`MetaNode::handle_ready`] produced for the caller to act on.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// Raft messages to send to peers (already safe to send: their entries are durable).
    pub messages: Vec<Message>,
    pub applied: Vec<AppliedCommand>,
    /// ReadIndex results: (request context, index that must be applied before serving).
    pub reads: Vec<(Vec<u8>, u64)>,
}

pub struct MetaNode {
    raw: RawNode<LogStore>,
    namespace: Namespace,
    config: NodeConfig,
    /// Log writes flushed to disk before going on (see `handle_ready_sending`).
    log_syncs: u64,
    /// A conf change was applied since the last compaction: compact at once, so that a node
    /// joining with an empty log is sent a snapshot (which carries the configuration and
    /// the members' addresses) rather than entries from index 1 (replayed over an empty
    /// configuration, they would give it a wrong one).
    compact_now: bool,
    /// Bumped on every applied conf change, so the server knows to reconnect its peers.
    conf_epoch: u64,
}

impl MetaNode {
    /// Opens (or creates) the node's state in `engine` and starts raft from it.
    pub fn open(
        config: NodeConfig,
        engine: Arc<dyn Engine>,
        namespace: Namespace,
    ) -> Result<MetaNode, NodeError> {
        let store = LogStore::open(engine, &config.voters)?;
        let raft_config = Config {
            id: config.id,
            election_tick: config.election_ticks,
            // 0 lets raft choose its default range; [n, n+1) is the fixed timeout n.
            min_election_tick: if config.election_jitter {
                0
            } else {
                config.election_ticks
            },
            max_election_tick: if config.election_jitter {
                0
            } else {
                config.election_ticks + 1
            },
            heartbeat_tick: config.heartbeat_ticks,
            // Entries up to here are already in the state machine: never apply them twice.
            applied: store.applied(),
            max_size_per_msg: 4 * 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            // ReadIndex: a leader confirms it still leads with a heartbeat round before
            // serving a read. Unlike a lease it does not trust clocks.
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, store, &logger)?;
        Ok(MetaNode {
            raw,
            namespace,
            config,
            log_syncs: 0,
            compact_now: false,
            conf_epoch: 0,
        })
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn step(&mut self, msg: Message) -> Result<(), NodeError> {
        match self.raw.step(msg) {
            // A message for a peer this node does not know (or from an old term) is noise.
            Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            other => Ok(other?),
        }
    }

    /// Proposes a command. `Err(ProposalDropped)` means: not leader or leadership moving;
    /// the caller retries.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), NodeError> {
        let context = if cmd.sync {
            SYNC_CONTEXT.to_vec()
        } else {
            Vec::new()
        };
        self.raw.propose(context, cmd.encode_to_vec())?;
        Ok(())
    }

    /// Proposes a membership change, with the membership record after it as the entry's
    /// context (applied into the state machine with the change itself).
    pub fn propose_conf_change(
        &mut self,
        cc: ConfChangeV2,
        record: &MemberRecord,
    ) -> Result<(), NodeError> {
        self.raw.propose_conf_change(record.encode_to_vec(), cc)?;
        Ok(())
    }

    /// Starts raft's leader transfer to `to` (leader only; ignored by raft otherwise).
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// The voter a leader transfer is under way to, if any.
    pub fn transferring_to(&self) -> Option<u64> {
        self.raw.raft.lead_transferee
    }

    /// A conf change was proposed (or is in the log) and is not applied yet.
    pub fn conf_change_pending(&self) -> bool {
        self.raw.raft.has_pending_conf()
    }

    pub fn learners(&self) -> Vec<u64> {
        self.raw.store().conf_state().learners.clone()
    }

    /// Counts applied conf changes (and installed snapshots) since start.
    pub fn conf_epoch(&self) -> u64 {
        self.conf_epoch
    }

    pub fn last_index(&self) -> u64 {
        self.raw.store().last()
    }

    /// Voters and learners the leader heard from recently (itself included); empty on a
    /// follower.
    pub fn active_members(&self) -> Vec<u64> {
        if !self.is_leader() {
            return Vec::new();
        }
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, pr)| **id == self.config.id || pr.recent_active)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The membership record in the applied state (None before any membership change).
    pub fn member_record(&self) -> Result<Option<MemberRecord>, NodeError> {
        let engine = self.raw.store().engine();
        let view = SpaceView::new(engine.as_ref(), space::STATE);
        Ok(crate::members::load(&view)?)
    }

    /// Asks for a ReadIndex; the answer comes back in [`ReadyOutput::reads`] with `ctx`.
    /// raft drops the request silently without a leader: callers need a timeout.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raw.read_index(ctx);
    }

    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    pub fn report_snapshot(&mut self, peer: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(peer, status);
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    /// Log writes this node flushed to disk before going on, since it started.
    pub fn log_syncs(&self) -> u64 {
        self.log_syncs
    }

    /// The leader this node knows of, 0 if none.
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The commit index, if this node committed an entry of its own term: only then does a
    /// leader's commit index cover everything committed before it (a lease read's index).
    pub fn current_term_commit(&self) -> Option<u64> {
        self.raw
            .raft
            .commit_to_current_term()
            .then(|| self.commit_index())
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn applied_index(&self) -> u64 {
        self.raw.store().applied()
    }

    pub fn first_index(&self) -> u64 {
        self.raw.store().first()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.raw.store().snapshot_index()
    }

    /// How far each peer's log matches the leader's (leader only).
    pub fn progress(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect();
        out.sort_unstable();
        out
    }

    pub fn voters(&self) -> Vec<u64> {
        self.raw.store().conf_state().voters.clone()
    }

    /// Serves a read from the applied state (the caller made it linearizable first).
    pub fn read(&self, op: &ReadOp) -> Reply {
        let engine = self.raw.store().engine();
        let view = SpaceView::new(engine.as_ref(), space::STATE);
        let mut reply = self.namespace.read(&view, op);
        reply.applied_index = self.applied_index();
        reply
    }

    /// Which periodic sweeps would change this node's applied state at `now`.
    pub fn sweeps_due(&self, now: &Timespec) -> SweepsDue {
        let engine = self.raw.store().engine();
        let view = SpaceView::new(engine.as_ref(), space::STATE);
        self.namespace.sweeps_due(&view, now)
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Persists, applies and collects everything raft has ready. Call after every batch of
    /// ticks, steps and proposals, until [`MetaNode::has_ready`] is false.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput, NodeError> {
        let mut early = Vec::new();
        let mut out = self.handle_ready_sending(|msgs| early.extend(msgs))?;
        early.append(&mut out.messages);
        out.messages = early;
        Ok(out)
    }

    /// Like [`MetaNode::handle_ready`], but hands the messages that may leave before this
    /// node's log write (a leader's appends and heartbeats) to `send_early` right away, so
    /// the leader's fsync overlaps with its followers' instead of preceding it.
    pub fn handle_ready_sending(
        &mut self,
        mut send_early: impl FnMut(Vec<Message>),
    ) -> Result<ReadyOutput, NodeError> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();

        let early = rd.take_messages();
        if !early.is_empty() {
            send_early(early);
        }

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            info!(
                node = self.config.id,
                index = snap.get_metadata().index,
                "installing snapshot from leader"
            );
            self.raw.mut_store().install_snapshot(&snap)?;
            self.conf_epoch += 1;
        }

        for rs in rd.take_read_states() {
            out.reads.push((rs.request_ctx, rs.index));
        }

        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out)?;

        let mut batch = WriteBatch::default();
        self.raw
            .store()
            .stage_append(rd.entries(), rd.hs(), &mut batch);
        if !batch.is_empty() {
            // Every write survives a kill of this process once made (the engine's write-ahead
            // file); a flush to disk is only paid for a new term or vote (so that no node
            // votes twice in a term after a power cut) and for entries that asked for it
            // (fsync). Everything else reaches the disk on the engine's flush timer: the
            // durability contract in the README.
            let stored = self.raw.store().hard_state();
            let vote_changed = rd
                .hs()
                .is_some_and(|hs| hs.term != stored.term || hs.vote != stored.vote);
            let asked = rd.entries().iter().any(|e| e.context == SYNC_CONTEXT);
            let engine = self.raw.store().engine().clone();
            let durable = vote_changed || asked;
            self.log_syncs += u64::from(durable);
            engine.write(batch, durable)?;
        }
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        self.raw.mut_store().appended(&entries, hs.as_ref());
        out.messages.extend(rd.take_persisted_messages());

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut batch = WriteBatch::default();
            self.raw.mut_store().stage_commit(commit, &mut batch);
            self.raw.store().engine().clone().write(batch, false)?;
        }
        out.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut out)?;
        self.raw.advance_apply();

        self.maybe_compact()?;
        Ok(out)
    }

    /// Applies committed entries: every state change and the new applied index go to the
    /// engine in one batch, so a restart resumes exactly after the last applied entry.
    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        out: &mut ReadyOutput,
    ) -> Result<(), NodeError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let engine = self.raw.store().engine().clone();
        let view = SpaceView::new(engine.as_ref(), space::STATE);
        let mut state = Overlay::new(&view);
        let mut conf_state = None;
        for entry in entries {
            if entry.index <= self.applied_index() {
                continue; // already in the state machine (replayed after a snapshot)
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    if entry.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let reply = match Command::decode(entry.data.as_ref()) {
                        Ok(cmd) => {
                            let reply = self.namespace.apply(&mut state, &cmd);
                            out.applied.push(AppliedCommand {
                                index: entry.index,
                                client_id: cmd.client_id,
                                seq: cmd.seq,
                                reply: reply.clone(),
                            });
                            reply
                        }
                        Err(e) => {
                            // Only authenticated peers propose, so this is a bug, not an
                            // attack; every replica skips the entry the same way.
                            warn!(index = entry.index, error = %e, "undecodable command in log, skipped");
                            continue;
                        }
                    };
                    debug!(index = entry.index, errno = reply.errno, "applied");
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(&entry.data)
                        .map_err(raft::Error::CodecError)?;
                    conf_state = Some(self.raw.apply_conf_change(&cc)?);
                    self.conf_applied(&entry, &mut state);
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    cc.merge_from_bytes(&entry.data)
                        .map_err(raft::Error::CodecError)?;
                    conf_state = Some(self.raw.apply_conf_change(&cc)?);
                    self.conf_applied(&entry, &mut state);
                }
            }
        }
        let writes = state.into_writes();
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            let mut key = Vec::with_capacity(k.len() + 1);
            key.push(space::STATE);
            key.extend_from_slice(&k);
            match v {
                Some(v) => batch.put(key, v),
                None => batch.delete(key),
            }
        }
        let store = self.raw.mut_store();
        if last > store.applied() {
            store.stage_applied(last, &mut batch);
        }
        if let Some(cs) = conf_state {
            store.stage_conf_state(cs, &mut batch);
        }
        // Not flushed here: the log holds these entries durably, and the next durable write
        // (or the flush before compaction) makes this batch durable too, atomically.
        engine.write(batch, false)?;
        Ok(())
    }

    /// A conf change entry was applied: its context (the membership record after it) goes
    /// into the state machine with it.
    fn conf_applied(&mut self, entry: &Entry, state: &mut Overlay) {
        self.conf_epoch += 1;
        self.compact_now = true;
        if entry.context.is_empty() {
            return;
        }
        match MemberRecord::decode(entry.context.as_ref()) {
            // The proposer's bytes, not a re-encoding: prost encodes a map in hash order,
            // which differs between processes, and every replica must store the same bytes.
            Ok(_) => state.put(crate::members::K_MEMBERS.to_vec(), entry.context.to_vec()),
            // Only authenticated peers propose: a bug, skipped the same way everywhere.
            Err(e) => {
                warn!(index = entry.index, error = %e, "undecodable membership record, skipped")
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let store = self.raw.store();
        let applied = store.applied();
        let due = applied.saturating_sub(store.snapshot_index()) > self.config.compact_after
            || (self.compact_now && applied > store.snapshot_index());
        if !due {
            return Ok(());
        }
        self.compact_now = false;
        // compact() writes durably, which also makes the applied state durable first.
        self.raw.mut_store().compact(applied)?;
        info!(node = self.config.id, index = applied, "compacted raft log");
        Ok(())
    }
}
