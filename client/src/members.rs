//! Growing and shrinking the metadata group, as an operator asks it (`kerfsctl meta ...`):
//! each call sends one membership request to the leader (which judges it: one change at a
//! time, never below a quorum) and then waits, by polling the leader's view, until the change
//! took effect. An add is two changes: the node joins as a learner, and once its log is
//! within reach of the leader's it is promoted to voter.

use std::time::{Duration, Instant};

use serde::Serialize;

use kerfs_proto::members_request::Op;
use kerfs_proto::{MemberAdd, MemberList, MemberPromote, MemberRemove, MemberTransfer};

use crate::error::{ClientError, ClientResult};
use crate::meta::{check, MetaClient};

/// One member of the metadata group, as the leader sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub address: String,
    /// "leader", "voter" or "learner".
    pub role: String,
    /// Last log index known to match the leader's.
    pub matched: u64,
    /// Heard from by the leader within the last election timeout.
    pub active: bool,
}

/// The metadata group (`kerfsctl meta members`).
#[derive(Debug, Clone, Serialize)]
pub struct Members {
    pub leader: u64,
    pub term: u64,
    /// The leader's last log index (a member's `matched` catches up to it).
    pub last_index: u64,
    pub commit_index: u64,
    /// A membership change is proposed and not yet applied.
    pub change_pending: bool,
    /// The voter a leader transfer is under way to, if any.
    pub transferring_to: Option<u64>,
    pub members: Vec<Member>,
}

impl Members {
    pub fn get(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn from_reply(reply: kerfs_proto::Reply) -> ClientResult<Members> {
        let r = reply.members.ok_or_else(|| {
            ClientError::BadRequest("membership reply without the members".into())
        })?;
        Ok(Members {
            leader: r.leader_id,
            term: r.term,
            last_index: r.last_index,
            commit_index: r.commit_index,
            change_pending: r.change_pending,
            transferring_to: (r.transferring_to != 0).then_some(r.transferring_to),
            members: r
                .members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    address: m.addr,
                    role: m.role,
                    matched: m.matched,
                    active: m.active,
                })
                .collect(),
        })
    }
}

/// How often the waits below ask the leader.
const POLL: Duration = Duration::from_millis(200);

async fn ask(client: &MetaClient, op: Op) -> ClientResult<Members> {
    Members::from_reply(check(client.members(op).await?)?)
}

/// The group as the leader sees it.
pub async fn members(client: &MetaClient) -> ClientResult<Members> {
    ask(client, Op::List(MemberList {})).await
}

fn timed_out(message: String) -> ClientError {
    ClientError::Fs {
        errno: libc::ETIMEDOUT,
        message,
    }
}

/// Adds node `id` at `addr` (started with `kerfsd meta --id ID --join`): as a learner, then,
/// once it caught up, as a voter. `progress` hears (matched, leader's last index) while it
/// catches up. Running it again after a timeout resumes the same add.
pub async fn add(
    client: &MetaClient,
    id: u64,
    addr: &str,
    timeout: Duration,
    mut progress: impl FnMut(&Members),
) -> ClientResult<Members> {
    let start = Instant::now();
    let now = members(client).await?;
    let resuming = now
        .get(id)
        .is_some_and(|m| m.role == "learner" && m.address == addr);
    if !resuming {
        ask(
            client,
            Op::Add(MemberAdd {
                id,
                addr: addr.to_string(),
            }),
        )
        .await?;
    }
    loop {
        let view = members(client).await?;
        match view.get(id).map(|m| m.role.as_str()) {
            Some("voter") | Some("leader") if !view.change_pending => return Ok(view),
            Some("learner") if !view.change_pending => {
                progress(&view);
                match ask(client, Op::Promote(MemberPromote { id })).await {
                    Ok(_) => {}
                    // Not caught up yet (EBUSY): keep waiting.
                    Err(ClientError::Fs { errno, .. }) if errno == libc::EBUSY => {}
                    Err(e) => return Err(e),
                }
            }
            None if !view.change_pending => {
                return Err(ClientError::Fs {
                    errno: libc::ENOENT,
                    message: format!(
                        "node {id} is no longer a member (removed meanwhile?); see `kerfsctl meta members`"
                    ),
                })
            }
            _ => {}
        }
        if start.elapsed() > timeout {
            let matched = view.get(id).map_or(0, |m| m.matched);
            return Err(timed_out(format!(
                "node {id} did not catch up within {timeout:?} (its log matches the leader's up to {matched} of {}): check that `kerfsd meta --id {id} --join` runs and listens on {addr}, that it uses the cluster key, and that the leader (node {}) can reach {addr}. Run the same `kerfsctl meta add` again to keep waiting, or `kerfsctl meta remove {id}` to give up",
                view.last_index, view.leader
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Removes node `id` from the group and waits until the change is applied.
pub async fn remove(client: &MetaClient, id: u64, timeout: Duration) -> ClientResult<Members> {
    let start = Instant::now();
    ask(client, Op::Remove(MemberRemove { id })).await?;
    loop {
        let view = members(client).await?;
        if view.get(id).is_none() && !view.change_pending {
            return Ok(view);
        }
        if start.elapsed() > timeout {
            return Err(timed_out(format!(
                "the removal of node {id} was proposed but is not applied after {timeout:?}: the group may have lost its quorum; see `kerfsctl status`"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Moves leadership to voter `id` and waits until it leads. raft gives a transfer up after
/// an election timeout, so it is asked again until the deadline.
pub async fn transfer_leader(
    client: &MetaClient,
    id: u64,
    timeout: Duration,
) -> ClientResult<Members> {
    let start = Instant::now();
    let mut asked = None::<Instant>;
    loop {
        let view = members(client).await?;
        if view.leader == id {
            return Ok(view);
        }
        if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
            ask(client, Op::Transfer(MemberTransfer { id })).await?;
            asked = Some(Instant::now());
        }
        if start.elapsed() > timeout {
            return Err(timed_out(format!(
                "node {id} does not lead after {timeout:?} (leader is {}): check that it runs and is caught up (`kerfsctl meta members`)",
                view.leader
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
