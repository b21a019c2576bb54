//! Erasure-coded chunks: full stripes written as k data and m parity shards, and reads
//! that reconstruct from any k shards.

use super::*;

impl FileHandle {
    /// Writes the stripes an EC chunk's dirty extents touch (read-modify-write for partial
    /// stripes), all shards in parallel.
    pub(super) async fn write_chunk_ec(&self, idx: u64, ext: &Extents) -> ClientResult<()> {
        let Some(codec) = self.inner.codec.clone() else {
            return Ok(());
        };
        let sb = codec.stripe_bytes() as u64;
        let cs = self.inner.chunk_size;
        // Stripes touched, with how many bytes of each the extents cover.
        let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
        for (&s, v) in &ext.0 {
            let e = s + v.len() as u64;
            let mut j = s / sb;
            while j * sb < e {
                let lo = s.max(j * sb);
                let hi = e.min((j + 1) * sb);
                *covered.entry(j).or_default() += hi - lo;
                j += 1;
            }
        }
        // Maximal runs of consecutive touched stripes, one write per shard per run.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &j in covered.keys() {
            match runs.last_mut() {
                Some((_, end)) if *end == j => *end = j + 1,
                _ => runs.push((j, j + 1)),
            }
        }
        for (j0, j1) in runs {
            let mut buf = vec![0u8; ((j1 - j0) * sb) as usize];
            for j in j0..j1 {
                // Bytes of this stripe that can hold data (the last stripe of a chunk whose
                // size is not a stripe multiple is partly outside the chunk: always zero).
                let span = (cs.min((j + 1) * sb)).saturating_sub(j * sb);
                if covered.get(&j).copied().unwrap_or(0) < span {
                    let old = self.read_chunk(idx, j * sb, sb as usize, true).await?;
                    let r = ((j - j0) * sb) as usize;
                    buf[r..r + sb as usize].copy_from_slice(&old);
                }
            }
            ext.overlay(j0 * sb, &mut buf);
            self.write_stripes(idx, j0, &buf).await?;
        }
        Ok(())
    }

    /// Encodes whole stripes starting at stripe `j0` and writes every live shard.
    pub(super) async fn write_stripes(&self, idx: u64, j0: u64, data: &[u8]) -> ClientResult<()> {
        let Some(codec) = self.inner.codec.clone() else {
            return Ok(());
        };
        let ino = self.inner.ino;
        let shards = {
            let data = data.to_vec();
            let c = codec.clone();
            tokio::task::spawn_blocking(move || c.encode(&data))
                .await
                .map_err(|e| eio(format!("file {ino}: encoder task failed: {e}")))?
                .map_err(|e| eio(format!("file {ino}: chunk {idx}: {e}")))?
        };
        let ep = self.epoch(idx)?;
        let pool = &self.inner.pool;
        let writes = shards.into_iter().enumerate().map(|(i, shard)| {
            let p = ep.members.get(i).cloned();
            let live = ep.alive.get(i).copied().unwrap_or(false);
            let (version, fresh) = (ep.version, ep.fresh);
            async move {
                let p = match p {
                    Some(p) if live => p,
                    _ => return (i, Err(None)),
                };
                let header = ChunkWriteHeader {
                    chunk_id: p.chunk_id,
                    version,
                    offset: j0 * BLOCK as u64,
                    length: 0,
                    chain: vec![],
                    sync: true,
                    create: fresh,
                    shard_index: i as u32,
                };
                match pool.write(&p.address, header, Bytes::from(shard)).await {
                    Ok(r) if r.all_ok => (i, Ok(())),
                    Ok(r) => (i, Err(Some(format!("{}: {:?}", p.address, r.replicas)))),
                    Err(e) => (i, Err(Some(format!("{}: {e}", p.address)))),
                }
            }
        });
        let results = futures::future::join_all(writes).await;
        let mut failures = Vec::new();
        self.update_epoch(idx, |e| {
            e.created = true;
            for (i, r) in &results {
                if let Err(why) = r {
                    if e.alive.get(*i).copied().unwrap_or(false) {
                        e.drop_member(*i);
                    }
                    if let Some(why) = why {
                        failures.push(why.clone());
                    }
                }
            }
        });
        if !failures.is_empty() {
            warn!(ino, chunk = idx, failures = ?failures, "shard writes failed; shards leave the epoch");
        }
        let ep = self.epoch(idx)?;
        if ep.alive_count() < codec.k {
            return Err(eio(format!(
                "file {ino}: chunk {idx}: only {} of {} shards took the write, {} needed ({}); the data is not stored. Check the chunk servers (`kerfsctl`)",
                ep.alive_count(),
                codec.k + codec.m,
                codec.k,
                failures.join("; ")
            )));
        }
        Ok(())
    }

    pub(super) async fn read_ec(
        &self,
        idx: u64,
        src: &Source,
        at: u64,
        n: usize,
    ) -> Result<Vec<u8>, (ClientError, bool)> {
        let Some(codec) = self.inner.codec.clone() else {
            return Err((eio("no codec".into()), false));
        };
        let sb = codec.stripe_bytes() as u64;
        let j0 = at / sb;
        let j1 = (at + n as u64).div_ceil(sb);
        let stripes = (j1 - j0) as usize;
        let (off, len) = (j0 * BLOCK as u64, stripes * BLOCK);
        let total = codec.k + codec.m;
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut failures = Vec::new();
        let mut newer = false;
        // Data shards first; parity only when some data shard fails.
        for phase in 0..2 {
            let wanted: Vec<usize> = if phase == 0 {
                (0..codec.k).collect()
            } else {
                let have = shards.iter().filter(|s| s.is_some()).count();
                if have == codec.k {
                    break;
                }
                (codec.k..total).collect()
            };
            let reads = wanted.into_iter().map(|i| {
                let p = src.members.get(i).cloned();
                let usable = src.usable.get(i).copied().unwrap_or(false);
                let pool = &self.inner.pool;
                let version = src.version;
                async move {
                    match p {
                        Some(p) if usable => {
                            let r = pool.read(&p.address, p.chunk_id, version, off, len).await;
                            (i, Some(p), r)
                        }
                        _ => (
                            i,
                            None,
                            Err(RpcError {
                                code: tonic::Code::Unavailable,
                                message: "no current shard".into(),
                            }),
                        ),
                    }
                }
            });
            for (i, p, r) in futures::future::join_all(reads).await {
                match r {
                    Ok(v) => shards[i] = Some(v),
                    Err(e) => {
                        if let Some(p) = p {
                            if e.is_newer() {
                                newer = true;
                            } else {
                                self.mark_bad(&p, idx, &e);
                            }
                            failures.push(format!("shard {i} on {}: {e}", p.address));
                        }
                    }
                }
            }
        }
        let data = tokio::task::spawn_blocking(move || codec.decode(&shards, stripes))
            .await
            .map_err(|e| (eio(format!("decoder task failed: {e}")), false))?
            .map_err(|e| {
                (
                    eio(format!(
                        "file {}: chunk {idx} version {}: {e} ({}); check the chunk servers (`kerfsctl`)",
                        self.inner.ino,
                        src.version,
                        failures.join("; ")
                    )),
                    newer,
                )
            })?;
        let r = (at - j0 * sb) as usize;
        Ok(data[r..r + n].to_vec())
    }
}
