//! Write epochs: `AllocateChunks` starts one per chunk (a new version on its replicas), and
//! a replica lost in the middle of one is replaced by a copy from a live member.

use super::*;

/// A write epoch on one chunk: the version we write and the members still in it.
#[derive(Clone)]
pub(super) struct Epoch {
    pub(super) version: u64,
    pub(super) fresh: bool,
    /// Placements in shard order (EC) or chain order (replicated).
    pub(super) members: Vec<ChunkPlacement>,
    pub(super) alive: Vec<bool>,
    /// A member dropped out: the next flush of this chunk starts a new epoch.
    pub(super) broken: bool,
    /// Something was written in this epoch (a fresh chunk exists on its servers).
    pub(super) created: bool,
    /// Meta had no spare server for a lost replica (or the copy failed): stop asking in this
    /// epoch; background repair restores the copies after the commit.
    pub(super) no_spare: bool,
    /// Bytes were written in this epoch without a disk flush on the replicas: the next
    /// `fsync` flushes them there (a new epoch's set-version flushes them too).
    pub(super) unsynced: bool,
}

impl Epoch {
    pub(super) fn servers_ok(&self) -> Vec<u64> {
        self.members
            .iter()
            .zip(&self.alive)
            .filter(|(_, a)| **a)
            .map(|(p, _)| p.server_id)
            .collect()
    }

    pub(super) fn alive_count(&self) -> usize {
        self.alive.iter().filter(|a| **a).count()
    }

    pub(super) fn drop_member(&mut self, i: usize) {
        self.alive[i] = false;
        self.broken = true;
    }
}

impl Epoch {
    pub(super) fn with_index(self, idx: u64) -> (u64, Epoch) {
        (idx, self)
    }
}

impl FileHandle {
    /// Starts a write epoch on every chunk of `indexes` that has none (or a broken one).
    pub(super) async fn ensure_epochs(&self, indexes: &[u64]) -> ClientResult<()> {
        let need: Vec<u64> = {
            let st = lock(&self.inner.state);
            indexes
                .iter()
                .copied()
                .filter(|i| st.epochs.get(i).is_none_or(|e| e.broken))
                .collect()
        };
        if need.is_empty() {
            return Ok(());
        }
        let reply = check(
            self.inner
                .meta
                .write(command::Op::AllocateChunks(kerfs_proto::AllocateChunks {
                    handle: self.inner.handle,
                    indexes: need.clone(),
                }))
                .await?,
        )?;
        let ino = self.inner.ino;
        let pool = &self.inner.pool;
        let epochs = futures::future::join_all(reply.chunks.into_iter().map(|c| async move {
            let c = sorted(c);
            let members = c.replicas.clone();
            let mut alive: Vec<bool> = if c.fresh {
                vec![true; members.len()]
            } else {
                members.iter().map(|p| p.current).collect()
            };
            if !c.fresh {
                // Each replica separately: one stale or dead replica must not stop the bump
                // on the others; those that fail are left out of the epoch.
                let bumps = members.iter().zip(alive.clone()).map(|(p, cur)| async move {
                    if !cur {
                        return false;
                    }
                    let req = ChunkSetVersionRequest {
                        chunk_id: p.chunk_id,
                        from_version: c.version.saturating_sub(1),
                        version: c.version,
                        create: false,
                        shard_index: p.shard_index,
                        chain: vec![],
                    };
                    match pool.set_version(&p.address, req).await {
                        Ok(r) if r.all_ok => true,
                        Ok(r) => {
                            warn!(ino, chunk = c.index, server = %p.address, replies = ?r.replicas, "set-version refused");
                            false
                        }
                        Err(e) => {
                            warn!(ino, chunk = c.index, server = %p.address, error = %e, "set-version failed; replica left out of the epoch");
                            false
                        }
                    }
                });
                alive = futures::future::join_all(bumps).await;
            }
            let broken = alive.iter().zip(&members).any(|(a, p)| !a && (c.fresh || p.current));
            Epoch {
                version: c.version,
                fresh: c.fresh,
                members,
                alive,
                broken,
                created: false,
                no_spare: false,
                unsynced: false,
            }
            .with_index(c.index)
        }))
        .await;
        let mut st = lock(&self.inner.state);
        for (idx, ep) in epochs {
            debug!(
                ino,
                chunk = idx,
                version = ep.version,
                fresh = ep.fresh,
                alive = ep.alive_count(),
                "write epoch"
            );
            st.epochs.insert(idx, ep);
        }
        for i in &need {
            if !st.epochs.contains_key(i) {
                return Err(eio(format!(
                    "file {ino}: the metadata service allocated no placement for chunk {i}; check `kerfsctl` for live chunk servers"
                )));
            }
        }
        Ok(())
    }

    pub(super) fn epoch(&self, idx: u64) -> ClientResult<Epoch> {
        lock(&self.inner.state)
            .epochs
            .get(&idx)
            .cloned()
            .ok_or_else(|| {
                eio(format!(
                    "file {}: chunk {idx} has no write epoch",
                    self.inner.ino
                ))
            })
    }

    /// Records the outcome of a member (by index) in the handle's epoch.
    pub(super) fn update_epoch(&self, idx: u64, f: impl FnOnce(&mut Epoch)) {
        if let Some(ep) = lock(&self.inner.state).epochs.get_mut(&idx) {
            f(ep)
        }
    }

    /// Puts a new server in place of every replica that dropped out of this replicated
    /// chunk's epoch, before the write is acknowledged: meta picks the server (placement
    /// rules, failure domains), this handle copies the chunk there from a live member at the
    /// epoch's version, and the member rejoins the epoch, so the commit names R servers.
    /// Without a spare server the write goes on with fewer copies (logged) and meta's
    /// background repair restores them.
    pub(super) async fn replace_lost(&self, idx: u64) {
        let ino = self.inner.ino;
        loop {
            let Ok(ep) = self.epoch(idx) else { return };
            let Some(lost) = (0..ep.members.len()).find(|&i| !ep.alive[i]) else {
                return;
            };
            let Some(src) = (0..ep.members.len()).find(|&i| ep.alive[i]) else {
                return;
            };
            let failed = ep.members[lost].clone();
            let give_up = |why: String| {
                warn!(ino, chunk = idx, server = %failed.address, why = %why, "lost replica not replaced before the acknowledgement; background repair will restore the copy");
                self.update_epoch(idx, |e| e.no_spare = true);
            };
            let reply = self
                .inner
                .meta
                .write(command::Op::ReplaceReplica(kerfs_proto::ReplaceReplica {
                    handle: self.inner.handle,
                    index: idx,
                    version: ep.version,
                    server_id: failed.server_id,
                }))
                .await
                .and_then(check);
            let new = match reply {
                Ok(r) => r.chunks.into_iter().find(|c| c.index == idx).and_then(|c| {
                    // The placement of the same shard on a server no other member uses
                    // (possibly the failed one's own, to be rewritten in place).
                    c.replicas.into_iter().find(|p| {
                        p.shard_index == failed.shard_index
                            && !ep
                                .members
                                .iter()
                                .enumerate()
                                .any(|(i, m)| i != lost && m.server_id == p.server_id)
                    })
                }),
                Err(e) => {
                    give_up(e.to_string());
                    return;
                }
            };
            let Some(new) = new else {
                give_up("meta's answer names no new placement".into());
                return;
            };
            if let Err(e) = self.copy_replica(&ep.members[src], &new, ep.version).await {
                give_up(format!("copy to {} failed: {e}", new.address));
                return;
            }
            debug!(ino, chunk = idx, from = %failed.address, to = %new.address, "replica replaced");
            self.update_epoch(idx, |e| {
                e.members[lost] = new;
                e.alive[lost] = true;
                if e.alive.iter().all(|a| *a) {
                    e.broken = false;
                }
            });
        }
    }

    /// Copies chunk `from` (at `version`) to the new placement `to`, which it creates.
    pub(super) async fn copy_replica(
        &self,
        from: &ChunkPlacement,
        to: &ChunkPlacement,
        version: u64,
    ) -> Result<(), RpcError> {
        const STEP: u64 = 8 << 20;
        let pool = &self.inner.pool;
        let info = pool.stat(&from.address, from.chunk_id).await?;
        if info.version != version {
            return Err(RpcError {
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "the source holds version {}, the epoch is at {version}",
                    info.version
                ),
            });
        }
        // Meta never hands out a server that holds a current copy: anything it has under
        // this id is an old leftover, which must not mix with the copy.
        pool.delete(&to.address, to.chunk_id, 0).await?;
        let mut pos = 0u64;
        loop {
            let n = (info.length - pos).min(STEP);
            let data = pool
                .read(&from.address, from.chunk_id, version, pos, n as usize)
                .await?;
            let header = ChunkWriteHeader {
                chunk_id: to.chunk_id,
                version,
                offset: pos,
                length: 0,
                chain: vec![],
                sync: true,
                create: pos == 0,
                shard_index: to.shard_index,
            };
            let reply = pool.write(&to.address, header, Bytes::from(data)).await?;
            if !reply.all_ok {
                return Err(RpcError {
                    code: tonic::Code::Internal,
                    message: format!("write refused: {:?}", reply.replicas),
                });
            }
            pos += n;
            if pos >= info.length {
                return Ok(());
            }
        }
    }
}
