//! Calls down a replicated chunk's replica chain (writes, truncates): the first live member
//! forwards to the others; members that fail leave the epoch.

use super::*;
use kerfs_proto::ChunkChainReply;

impl FileHandle {
    /// Writes one chunk's dirty extents; returns the chunk's end offset written. EC shards
    /// are always written with a disk flush (a stripe's read-modify-write must not mix
    /// flushed and unflushed shards).
    pub(super) async fn write_chunk(
        &self,
        idx: u64,
        ext: &Extents,
        durability: Durability,
    ) -> ClientResult<u64> {
        if self.inner.codec.is_some() {
            self.write_chunk_ec(idx, ext).await?;
        } else if ext.0.is_empty() {
            // Nothing new: only the flush of what earlier writes left unflushed.
            self.write_replicated(idx, 0, Bytes::new(), durability)
                .await?;
        } else {
            for (&off, data) in &ext.0 {
                self.write_replicated(idx, off, Bytes::copy_from_slice(data), durability)
                    .await?;
            }
        }
        Ok(ext.end())
    }

    /// One extent to a replicated chunk, down its chain (see [`FileHandle::chain_call`]).
    pub(super) async fn write_replicated(
        &self,
        idx: u64,
        off: u64,
        data: Bytes,
        durability: Durability,
    ) -> ClientResult<()> {
        let sync = durability == Durability::Disk;
        let what = format!(
            "the write (offset {off}, {} bytes); the data is not stored",
            data.len()
        );
        self.chain_call(idx, &what, |first, version, fresh, chain| {
            let header = ChunkWriteHeader {
                chunk_id: first.chunk_id,
                version,
                offset: off,
                length: 0,
                chain,
                sync,
                create: fresh,
                shard_index: 0,
            };
            let data = data.clone();
            async move { self.inner.pool.write(&first.address, header, data).await }
        })
        .await?;
        self.update_epoch(idx, |e| {
            e.created = true;
            // A flushed write also flushed what came before it on the chunk.
            e.unsynced = !sync;
        });
        let ep = self.epoch(idx)?;
        if ep.alive_count() < ep.members.len() && !ep.no_spare {
            self.replace_lost(idx).await;
        }
        Ok(())
    }

    /// The one loop of calls down a replicated chunk's chain (writes and truncates): the
    /// first live member of the epoch is called with the others as its chain; members the
    /// reply reports failed leave the epoch, and when the first fails (or the reply has no
    /// success) the next live member becomes first. Done once a member took it; EIO
    /// (ENOSPC when the servers said disk full) when none did, naming `what` failed.
    pub(super) async fn chain_call<F, Fut>(&self, idx: u64, what: &str, call: F) -> ClientResult<()>
    where
        F: Fn(ChunkPlacement, u64, bool, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<ChunkChainReply, RpcError>>,
    {
        let ino = self.inner.ino;
        let mut failures = Vec::new();
        let mut no_space = false;
        loop {
            let ep = self.epoch(idx)?;
            let live: Vec<usize> = (0..ep.members.len()).filter(|&i| ep.alive[i]).collect();
            let Some(&first) = live.first() else {
                return Err(ClientError::Io {
                    errno: if no_space { libc::ENOSPC } else { libc::EIO },
                    message: format!(
                        "file {ino}: chunk {idx}: no replica took {what} ({}). Check the chunk servers (`kerfsctl status`) and their disks",
                        failures.join("; ")
                    ),
                });
            };
            let p = &ep.members[first];
            let chain = live[1..]
                .iter()
                .map(|&i| ep.members[i].address.clone())
                .collect();
            match call(p.clone(), ep.version, ep.fresh, chain).await {
                Ok(reply) => {
                    self.update_epoch(idx, |e| {
                        for (n, &i) in live.iter().enumerate() {
                            if !reply.replicas.get(n).is_some_and(|r| r.ok) {
                                e.drop_member(i);
                            }
                        }
                    });
                    if !reply.all_ok {
                        warn!(ino, chunk = idx, replicas = ?reply.replicas, "chain call incomplete; failed replicas leave the epoch");
                    }
                    if self.epoch(idx)?.alive_count() > 0 {
                        return Ok(());
                    }
                    failures.push(format!(
                        "{}: chain reply without a successful replica",
                        p.address
                    ));
                }
                Err(e) => {
                    if e.is_auth() {
                        return Err(ClientError::Auth(format!(
                            "chunk server {}: {}",
                            p.address, e.message
                        )));
                    }
                    no_space |= e.is_no_space();
                    warn!(ino, chunk = idx, server = %p.address, error = %e, "call to the first replica failed; trying the next");
                    failures.push(format!("{}: {e}", p.address));
                    self.update_epoch(idx, |ep| ep.drop_member(first));
                }
            }
        }
    }
}
