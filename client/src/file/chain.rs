//! Writes of replicated chunks down the replica chain: the first live member forwards to
//! the others; members that fail leave the epoch.

use super::*;

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

    /// One extent to a replicated chunk: first live member, the others as its chain; if the
    /// first fails, the next live member becomes first.
    pub(super) async fn write_replicated(
        &self,
        idx: u64,
        off: u64,
        data: Bytes,
        durability: Durability,
    ) -> ClientResult<()> {
        let sync = durability == Durability::Disk;
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
                        "file {ino}: chunk {idx} (offset {off}, {} bytes): no replica took the write ({}); the data is not stored. Check the chunk servers (`kerfsctl`) and their disks",
                        data.len(),
                        failures.join("; ")
                    ),
                });
            };
            let p = &ep.members[first];
            let header = ChunkWriteHeader {
                chunk_id: p.chunk_id,
                version: ep.version,
                offset: off,
                length: 0,
                chain: live[1..]
                    .iter()
                    .map(|&i| ep.members[i].address.clone())
                    .collect(),
                sync,
                create: ep.fresh,
                shard_index: 0,
            };
            match self
                .inner
                .pool
                .write(&p.address, header, data.clone())
                .await
            {
                Ok(reply) => {
                    self.update_epoch(idx, |e| {
                        e.created = true;
                        // A flushed write also flushed what came before it on the chunk.
                        e.unsynced = !sync;
                        for (n, &i) in live.iter().enumerate() {
                            let ok = reply.replicas.get(n).is_some_and(|r| r.ok);
                            if !ok {
                                e.drop_member(i);
                            }
                        }
                    });
                    if !reply.all_ok {
                        warn!(ino, chunk = idx, replicas = ?reply.replicas, "chain write incomplete; failed replicas leave the epoch");
                    }
                    let ep = self.epoch(idx)?;
                    if ep.alive_count() == 0 {
                        failures.push(format!(
                            "{}: chain reply without a successful replica",
                            p.address
                        ));
                        continue;
                    }
                    if ep.alive_count() < ep.members.len() && !ep.no_spare {
                        self.replace_lost(idx).await;
                    }
                    return Ok(());
                }
                Err(e) => {
                    if e.is_auth() {
                        return Err(ClientError::Auth(format!(
                            "chunk server {}: {}",
                            p.address, e.message
                        )));
                    }
                    no_space |= e.is_no_space();
                    warn!(ino, chunk = idx, server = %p.address, error = %e, "write to first replica failed; trying the next");
                    failures.push(format!("{}: {e}", p.address));
                    self.update_epoch(idx, |ep| ep.drop_member(first));
                }
            }
        }
    }
}
