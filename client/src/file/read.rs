//! Reads: the chunk's replicas in turn (a bad one is remembered for this handle), the
//! handle's unflushed writes overlaid, and read-ahead of sequential reads in the background.

use super::*;

pub(super) type Fetch = Shared<BoxFuture<'static, Result<Arc<Vec<u8>>, ClientError>>>;

/// A background read of `[start, start + len)`, valid while `generation` is current.
pub(super) struct Prefetch {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) generation: u64,
    pub(super) fetch: Fetch,
}

/// Where to read one chunk from: a version and the placements holding it.
pub(super) struct Source {
    pub(super) version: u64,
    pub(super) members: Vec<ChunkPlacement>,
    pub(super) usable: Vec<bool>,
    /// Fresh chunk of our epoch not written yet: nothing exists on the servers.
    pub(super) empty: bool,
}

impl FileHandle {
    /// Reads up to `len` bytes at `offset`: fewer at the end of the file, none past it.
    pub async fn read_at(&self, offset: u64, len: usize) -> ClientResult<Vec<u8>> {
        self.check_open()?;
        // The overlay is captured before the servers are read: whatever leaves it afterwards
        // was flushed before our server reads started... or after; either way it was written
        // before this read began, so it is in the overlay or on the servers.
        let (end, overlay, cached, sequential) = {
            let mut st = lock(&self.inner.state);
            let end = offset.saturating_add(len as u64).min(st.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            let mut overlay: Vec<Arc<BTreeMap<u64, Extents>>> = st.flushing.clone();
            if !st.dirty.is_empty() {
                overlay.push(Arc::new(st.dirty.clone()));
            }
            let g = st.generation;
            st.prefetch
                .retain(|p| p.generation == g && p.start + p.len > offset);
            let cached = st
                .prefetch
                .iter()
                .find(|p| p.start <= offset && end <= p.start + p.len)
                .map(|p| (p.start, p.fetch.clone()));
            let sequential = st.last_read_end == offset || offset == 0;
            st.last_read_end = end;
            (end, overlay, cached, sequential)
        };
        if sequential {
            self.start_readahead(end);
        }
        let mut out = match cached {
            Some((start, fetch)) => match fetch.await {
                Ok(buf) => buf[(offset - start) as usize..(end - start) as usize].to_vec(),
                Err(_) => self.fetch_range(offset, end).await?,
            },
            None => self.fetch_range(offset, end).await?,
        };
        apply_overlay(&overlay, self.inner.chunk_size, offset, &mut out);
        Ok(out)
    }

    /// Keeps about two read-ahead windows in flight past `end`.
    pub(super) fn start_readahead(&self, end: u64) {
        let window = self.inner.config.readahead as u64;
        if window == 0 {
            return;
        }
        let mut st = lock(&self.inner.state);
        let mut frontier = st.prefetch.back().map_or(end, |p| p.start + p.len).max(end);
        while frontier < st.size && frontier < end + 2 * window && st.prefetch.len() < 3 {
            let stop = (frontier + window).min(st.size);
            let this = self.clone();
            let start = frontier;
            let task =
                tokio::spawn(async move { this.fetch_range(start, stop).await.map(Arc::new) });
            let ino = self.inner.ino;
            let fetch = async move {
                task.await
                    .map_err(|e| eio(format!("file {ino}: read-ahead task failed: {e}")))?
            }
            .boxed()
            .shared();
            let generation = st.generation;
            st.prefetch.push_back(Prefetch {
                start,
                len: stop - start,
                generation,
                fetch,
            });
            frontier = stop;
        }
    }

    /// Reads `[offset, end)` of the file from the servers (no overlay), chunks in parallel.
    pub(super) async fn fetch_range(&self, offset: u64, end: u64) -> ClientResult<Vec<u8>> {
        let cs = self.inner.chunk_size;
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let stop = end.min((idx + 1) * cs);
            pieces.push((idx, pos % cs, (stop - pos) as usize));
            pos = stop;
        }
        let parts: Vec<ClientResult<Vec<u8>>> = futures::stream::iter(
            pieces
                .into_iter()
                .map(|(idx, at, n)| self.read_chunk(idx, at, n, false)),
        )
        .buffered(self.inner.config.parallel_chunks)
        .collect()
        .await;
        if parts.len() == 1 {
            // A read inside one chunk: its buffer is the answer, no second copy.
            return parts.into_iter().next().unwrap_or_else(|| Ok(Vec::new()));
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out)
    }

    /// Where chunk `idx` can be read: our epoch if we hold one, else the chunk table.
    pub(super) fn source(&self, idx: u64) -> Option<Source> {
        let st = lock(&self.inner.state);
        if let Some(ep) = st.epochs.get(&idx) {
            let usable = ep
                .members
                .iter()
                .zip(&ep.alive)
                .map(|(p, a)| *a && !st.bad.contains(&(p.server_id, p.chunk_id)))
                .collect();
            return Some(Source {
                version: ep.version,
                members: ep.members.clone(),
                usable,
                empty: ep.fresh && !ep.created,
            });
        }
        let c = st.chunks.get(&idx)?;
        Some(Source {
            version: c.version,
            members: c.replicas.clone(),
            usable: c
                .replicas
                .iter()
                .map(|p| p.current && !st.bad.contains(&(p.server_id, p.chunk_id)))
                .collect(),
            empty: false,
        })
    }

    pub(super) fn mark_bad(&self, p: &ChunkPlacement, idx: u64, e: &RpcError) {
        warn!(ino = self.inner.ino, chunk = idx, server = %p.address, chunk_id = p.chunk_id, error = %e, "replica unreadable; not used again by this handle");
        lock(&self.inner.state)
            .bad
            .insert((p.server_id, p.chunk_id));
    }

    /// Asks meta again for chunk `idx` (after a server said our version is old).
    pub(super) async fn refresh_chunk(&self, idx: u64) -> ClientResult<()> {
        let reply = check(
            self.inner
                .meta
                .read(read_op::Op::GetChunks(kerfs_proto::GetChunks {
                    ino: self.inner.ino,
                    first_index: idx,
                    count: 1,
                }))
                .await?,
        )?;
        let mut st = lock(&self.inner.state);
        if st.epochs.contains_key(&idx) {
            return Ok(()); // our own epoch is authoritative for us
        }
        match reply.chunks.into_iter().find(|c| c.index == idx) {
            Some(c) => st.chunks.insert(idx, sorted(c)),
            None => st.chunks.remove(&idx),
        };
        Ok(())
    }

    /// Reads `n` bytes at chunk offset `at` of chunk `idx` (zeros where nothing is stored).
    /// `for_rmw`: called by the EC writer, which holds the flush lock.
    pub(super) async fn read_chunk(
        &self,
        idx: u64,
        at: u64,
        n: usize,
        for_rmw: bool,
    ) -> ClientResult<Vec<u8>> {
        let mut refreshed = false;
        loop {
            let Some(src) = self.source(idx) else {
                return Ok(vec![0u8; n]);
            };
            if src.empty {
                return Ok(vec![0u8; n]);
            }
            let r = if self.inner.codec.is_some() {
                self.read_ec(idx, &src, at, n).await
            } else {
                self.read_replicated(idx, &src, at, n).await
            };
            match r {
                Ok(v) => return Ok(v),
                Err((e, newer)) => {
                    if newer && !refreshed && !for_rmw {
                        refreshed = true;
                        self.refresh_chunk(idx).await?;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    pub(super) async fn read_replicated(
        &self,
        idx: u64,
        src: &Source,
        at: u64,
        n: usize,
    ) -> Result<Vec<u8>, (ClientError, bool)> {
        let count = src.members.len();
        let mut failures = Vec::new();
        let mut newer = false;
        // Start at a different replica per chunk so a large read spreads over servers.
        for k in 0..count {
            let i = (idx as usize + k) % count.max(1);
            if !src.usable[i] {
                continue;
            }
            let p = &src.members[i];
            match self
                .inner
                .pool
                .read(&p.address, p.chunk_id, src.version, at, n)
                .await
            {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if e.is_auth() {
                        return Err((
                            ClientError::Auth(format!("chunk server {}: {}", p.address, e.message)),
                            false,
                        ));
                    }
                    if e.is_newer() {
                        newer = true;
                    } else {
                        self.mark_bad(p, idx, &e);
                    }
                    failures.push(format!("{}: {e}", p.address));
                }
            }
        }
        Err((
            eio(format!(
                "file {}: chunk {idx} version {}: no replica could be read ({}); check the chunk servers (`kerfsctl`), the data may need repair",
                self.inner.ino,
                src.version,
                if failures.is_empty() { "no current replica known".to_string() } else { failures.join("; ") }
            )),
            newer,
        ))
    }
}
