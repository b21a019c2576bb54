//! truncate(2) through a data handle: meta's new size first, then the boundary chunk cut on
//! its replicas.

use super::*;

impl FileHandle {
    /// Sets the file size: data past it is dropped, a later extension reads zeros. Returns
    /// the file's attributes as meta has them after the cut.
    pub async fn truncate(&self, size: u64) -> ClientResult<Attr> {
        self.check_open()?;
        // Buffered writes are not flushed first: those past the new end are dropped, and the
        // others stay buffered and reach the servers after the cut below, in the same write
        // epoch, which is the order they need (a flush here cost a round of chunk writes and
        // a commit per truncate). The flush lock keeps any flush from overlapping the cut.
        let _serial = self.inner.flush_lock.lock().await;
        let cs = self.inner.chunk_size;
        let old = {
            let mut st = lock(&self.inner.state);
            st.generation += 1;
            st.prefetch.clear();
            let keep = size.div_ceil(cs);
            st.dirty.retain(|&i, _| i < keep);
            if let Some(e) = st.dirty.get_mut(&(size / cs)) {
                e.cut(size % cs);
            }
            st.dirty.retain(|_, e| !e.0.is_empty());
            st.dirty_bytes = st.dirty.values().map(Extents::bytes).sum();
            st.size
        };
        // The chunk holding the lower of the two ends must lose what lies past that end, so
        // that bytes past the size never reappear (truncate down, or leftovers past the old
        // size when extending).
        let boundary = old.min(size);
        let idx = boundary / cs;
        let has_chunk = {
            let st = lock(&self.inner.state);
            st.chunks.contains_key(&idx) || st.epochs.contains_key(&idx)
        };
        if boundary % cs != 0 && has_chunk {
            self.truncate_chunk(idx, boundary % cs).await?;
        }
        let clear_set_id = self.take_clear_set_id();
        let attr = self
            .inner
            .meta
            .setattr(kerfs_proto::SetAttr {
                ino: self.inner.ino,
                size: Some(size),
                handle: Some(self.inner.handle),
                clear_set_id,
                ..Default::default()
            })
            .await
            .inspect_err(|_| self.restore_set_id(clear_set_id))?;
        debug!(
            ino = self.inner.ino,
            size,
            meta_size = attr.size,
            "truncated"
        );
        let mut st = lock(&self.inner.state);
        st.size = size;
        st.note_attr(attr);
        let keep = size.div_ceil(cs);
        // Meta dropped the chunks past the end: forget them (and our epochs on them).
        st.chunks.retain(|&i, _| i < keep);
        st.epochs.retain(|&i, _| i < keep);
        Ok(attr)
    }

    /// Cuts chunk `idx` to `len` bytes on its servers in a write epoch, and commits.
    pub(super) async fn truncate_chunk(&self, idx: u64, len: u64) -> ClientResult<()> {
        self.ensure_epochs(&[idx]).await?;
        let ino = self.inner.ino;
        if let Some(codec) = self.inner.codec.clone() {
            let sb = codec.stripe_bytes() as u64;
            let j = len / sb;
            let within = len % sb;
            if within != 0 {
                // Zero the tail of the boundary stripe and re-encode it.
                let mut stripe = self.read_chunk(idx, j * sb, sb as usize, true).await?;
                stripe[within as usize..].fill(0);
                self.write_stripes(idx, j, &stripe).await?;
            }
            let shard_len = len.div_ceil(sb) * BLOCK as u64;
            let ep = self.epoch(idx)?;
            let cuts = ep.members.iter().enumerate().map(|(i, p)| {
                let live = ep.alive[i];
                let pool = &self.inner.pool;
                let req = ChunkTruncateRequest {
                    chunk_id: p.chunk_id,
                    version: ep.version,
                    length: shard_len,
                    chain: vec![],
                    sync: true,
                };
                async move {
                    if !live {
                        return (i, true);
                    }
                    match pool.truncate(&p.address, req).await {
                        Ok(r) => (i, r.all_ok),
                        Err(e) => {
                            // A fresh shard never written does not exist: nothing to cut.
                            (i, e.code == tonic::Code::NotFound && ep.fresh)
                        }
                    }
                }
            });
            let results = futures::future::join_all(cuts).await;
            self.update_epoch(idx, |e| {
                for (i, ok) in results {
                    if !ok {
                        e.drop_member(i);
                    }
                }
            });
            let ep = self.epoch(idx)?;
            if ep.alive_count() < codec.k {
                return Err(eio(format!(
                    "file {ino}: chunk {idx}: truncate reached only {} shards; check the chunk servers",
                    ep.alive_count()
                )));
            }
        } else if !self.epoch(idx).map(|ep| ep.fresh && !ep.created)? {
            // (A fresh chunk never written has nothing on the servers to cut.)
            let what = format!("the truncate to {len} bytes");
            self.chain_call(idx, &what, |first, version, _fresh, chain| {
                let req = ChunkTruncateRequest {
                    chunk_id: first.chunk_id,
                    version,
                    length: len,
                    chain,
                    sync: true,
                };
                async move { self.inner.pool.truncate(&first.address, req).await }
            })
            .await?;
        }
        let ep = self.epoch(idx)?;
        self.commit(
            0,
            vec![ChunkWritten {
                index: idx,
                version: ep.version,
                servers_ok: ep.servers_ok(),
            }],
        )
        .await
    }
}
