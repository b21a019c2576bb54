//! Re-replication with real processes (3 `kerfsd meta` + N `kerfsd chunk`):
//!
//! * R=2: a chunk server killed for good; every chunk is back to 2 current copies on live
//!   servers within a bounded wait (checked through meta's chunk tables and `kerfsctl`),
//!   then a second original server dies and every file still reads back identical;
//! * a replica corrupted on disk is found (scrub / read) and repaired: every current copy
//!   read straight from its server holds the right bytes;
//! * EC 4+2 on 7 servers: a server lost, its shards rebuilt elsewhere; then two more servers
//!   (not those holding rebuilt shards) lost, and the file still reads back identical;
//! * a write during which a chain member dies is acknowledged with R current copies when a
//!   spare server exists (the writer replaced the replica itself, before meta even noticed);
//! * overwrites all over a file while a lost server's data is being repaired (R=2, where the
//!   writer replaces replicas, and EC 2+1, where background rebuilds race the write epochs):
//!   afterwards every current copy / shard holds exactly the acknowledged bytes.
//!
//! Each test narrates its steps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_client::{DataClient, MetaClient};
use kerfs_proto::{read_op, Layout};
use kerfs_tests::{
    busiest_server, chunk_table, content, erasure, expected_hash, flip_bits_in_chunk_files,
    hash_of, init_tracing, kerfsctl, kerfsctl_json, layout_dir, replicated, write_stream,
    KerfsCluster, KerfsClusterOptions, MetaClusterOptions,
};
use tracing::info;

const MIB: u64 = 1024 * 1024;

/// Each test starts a dozen processes on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(chunk_servers: u64, timeout_ms: Option<u64>) -> Result<KerfsCluster> {
    KerfsCluster::start(KerfsClusterOptions {
        meta: MetaClusterOptions {
            chunk_server_timeout_ms: timeout_ms,
            ..Default::default()
        },
        chunk_servers,
        ..Default::default()
    })
    .await
}

async fn repair_report(meta: &MetaClient) -> Result<kerfs_proto::RepairReport> {
    Ok(kerfs_client::check(
        meta.read(read_op::Op::RepairStatus(kerfs_proto::RepairStatus {
            limit: 20,
        }))
        .await?,
    )?
    .repair
    .unwrap_or_default())
}

/// Chunks of `inos` that lack a current placement on a server in `live` (addresses), as
/// "ino/index: n of m" strings; empty when every chunk is whole.
async fn lacking(meta: &MetaClient, inos: &[u64], live: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for &ino in inos {
        let (layout, chunks) = chunk_table(meta, ino).await?;
        for c in chunks {
            let good = c
                .replicas
                .iter()
                .filter(|p| p.current && live.contains(&p.address))
                .count();
            let servers: BTreeSet<u64> = c.replicas.iter().map(|p| p.server_id).collect();
            if good < layout.copies() || servers.len() != c.replicas.len() {
                out.push(format!(
                    "{ino}/{}: {good} of {} ({} placements on {} servers)",
                    c.index,
                    layout.copies(),
                    c.replicas.len(),
                    servers.len()
                ));
            }
        }
    }
    Ok(out)
}

/// Waits until every chunk of `inos` has all its copies current on live servers.
async fn wait_whole(
    meta: &MetaClient,
    inos: &[u64],
    live: &BTreeSet<String>,
    timeout: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let missing = lacking(meta, inos, live).await?;
        if missing.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            let r = repair_report(meta).await?;
            bail!(
                "after {timeout:?}, {} chunks still lack copies: {missing:?}; repair queue: {:?}",
                missing.len(),
                r
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn live_addrs(cluster: &KerfsCluster, dead: &[u64]) -> BTreeSet<String> {
    cluster
        .chunks
        .keys()
        .filter(|i| !dead.contains(i))
        .map(|&i| cluster.chunk_addr(i).to_string())
        .collect()
}

/// One replica's bytes `[0, len)` read straight from its server (zeros past its length).
async fn read_replica(
    cluster: &KerfsCluster,
    addr: &str,
    chunk_id: u64,
    version: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let mut rpc = cluster.chunk_rpc(addr).await?;
    let mut stream = rpc
        .read(kerfs_proto::ChunkReadRequest {
            chunk_id,
            version,
            offset: 0,
            length: len,
        })
        .await
        .with_context(|| format!("reading chunk {chunk_id} v{version} from {addr}"))?
        .into_inner();
    let mut out = vec![0u8; len as usize];
    while let Some(f) = stream
        .message()
        .await
        .with_context(|| format!("reading chunk {chunk_id} v{version} from {addr}"))?
    {
        let s = f.offset as usize;
        ensure!(s + f.data.len() <= out.len(), "frame outside the range");
        out[s..s + f.data.len()].copy_from_slice(&f.data);
    }
    Ok(out)
}

/// Checks every current replica of every chunk of a replicated file against `expected`
/// (file bytes of that chunk), read straight from its server.
async fn check_every_replica(
    cluster: &KerfsCluster,
    meta: &MetaClient,
    ino: u64,
    size: u64,
    expected: impl Fn(u64, usize) -> Vec<u8>,
) -> Result<usize> {
    let (layout, chunks) = chunk_table(meta, ino).await?;
    let cs = layout.chunk_size;
    let mut checked = 0;
    for c in chunks {
        let len = cs.min(size - c.index * cs);
        let want = expected(c.index * cs, len as usize);
        for p in c.replicas.iter().filter(|p| p.current) {
            let got = read_replica(cluster, &p.address, p.chunk_id, c.version, len).await?;
            ensure!(
                got == want,
                "chunk {} (id {}) on {} differs from what was written",
                c.index,
                p.chunk_id,
                p.address
            );
            checked += 1;
        }
    }
    Ok(checked)
}

// ---------------------------------------------------------------- 1. R=2, a server lost

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r2_lost_server_is_re_replicated_then_a_second_loss_reads_back() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = start(4, Some(3000)).await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let dir = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let files = [(1u8, 5 * MIB + 123), (2, 8 * MIB), (3, 2 * MIB + 1)];
    let mut inos = Vec::new();
    for (seed, size) in files {
        let f = data
            .create(dir, format!("f{seed}").as_bytes(), 0o644, true)
            .await?;
        write_stream(&f, seed, 0, size).await?;
        f.close().await?;
        inos.push(f.ino());
    }
    info!(
        files = files.len(),
        "wrote R=2 files with 1 MiB chunks on 4 servers"
    );

    // The server holding the most copies goes for good.
    let (busiest, held) = busiest_server(&meta, &inos).await?;
    let victim_addr = busiest.address;
    let victim = cluster.server_index(&victim_addr)?;
    info!(
        victim,
        held, "kill -9 of the chunk server holding the most copies"
    );
    cluster.kill9_chunk(victim)?;
    let live = live_addrs(&cluster, &[victim]);
    let before = lacking(&meta, &inos, &live).await?;
    ensure!(
        before.len() == held,
        "{} chunks lack a copy right after the kill, {held} expected",
        before.len()
    );

    // Once meta marks it down, kerfsctl status counts its copies as lacking (the chunk table
    // is printed along; it is read a moment later, so it may already show the loss while
    // the status did not: only the status decides).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, status) = kerfsctl_json(&cluster, &["status"])?;
        let (_, table) = kerfsctl(&cluster, &["chunks", "/r2/f2"])?;
        let lacking = status["chunks"]["under_replicated"].as_u64().unwrap_or(0);
        if lacking > 0 {
            ensure!(
                code == 3 && status["health"] == "HEALTH_WARN",
                "kerfsctl status during repair: exit {code}, {status:#}"
            );
            info!("kerfsctl during repair:\n{status:#}\n{table}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "kerfsctl never showed the loss:\n{status:#}\n{table}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Detection (3 s) + a repair tick (2 s) + copies: well within 60 s.
    let took = wait_whole(&meta, &inos, &live, Duration::from_secs(60)).await?;
    let bytes = held as u64 * MIB;
    info!(
        secs = took.as_secs_f64(),
        chunks = held,
        mib_per_sec = bytes as f64 / MIB as f64 / took.as_secs_f64(),
        "every chunk back to 2 current copies on live servers (time includes failure detection)"
    );
    let report = repair_report(&meta).await?;
    ensure!(
        report.under_replicated == 0 && report.repaired_total >= held as u64,
        "repair queue after repair: {report:?}"
    );
    let (_, status) = kerfsctl_json(&cluster, &["status"])?;
    ensure!(
        status["chunks"]["under_replicated"] == 0,
        "kerfsctl status does not show the repaired state:\n{status:#}"
    );
    // The metadata nodes' metrics say the same (refreshed every 2 s from applied state).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = cluster.meta.metrics(1)?;
        let value = |name: &str| -> Option<u64> {
            page.lines()
                .find(|l| l.starts_with(name) && l.contains('{'))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        if value("kerfs_meta_chunks_under_replicated") == Some(0)
            && value("kerfs_meta_repairs_total").is_some_and(|n| n >= held as u64)
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "metadata node 1's metrics do not show the repairs:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, queue) = kerfsctl(
        &cluster,
        &["repair", "--now", "--wait", "--wait-secs", "30"],
    )?;
    ensure!(
        queue.contains("chunks under-replicated: 0"),
        "kerfsctl repair --now --wait:\n{queue}"
    );
    let (_, chunks) = kerfsctl(&cluster, &["chunks", "/r2/f2"])?;
    ensure!(
        !chunks.contains("MISSING") && !chunks.contains("UNDER-REPLICATED"),
        "kerfsctl chunks still shows missing copies:\n{chunks}"
    );
    for (i, &ino) in inos.iter().enumerate() {
        let seed = files[i].0;
        let n = check_every_replica(&cluster, &meta, ino, files[i].1, |off, len| {
            content(seed, off, len)
        })
        .await?;
        info!(
            ino,
            replicas = n,
            "every current replica holds the written bytes"
        );
    }

    // A second original server dies: every chunk still has a copy.
    let second = cluster
        .chunks
        .keys()
        .copied()
        .find(|&i| i != victim)
        .context("no second server")?;
    info!(second, "kill -9 of a second original server");
    cluster.kill9_chunk(second)?;
    for (i, &ino) in inos.iter().enumerate() {
        let (seed, size) = files[i];
        ensure!(
            hash_of(&data, ino).await? == expected_hash(seed, size),
            "file {ino} differs after the second loss"
        );
    }
    info!("every file reads back identical with two of four servers gone");
    Ok(())
}

// ---------------------------------------------------------------- 2. a corrupt replica

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_replica_is_found_and_repaired_to_r_good_copies() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = start(3, None).await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let dir = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let size = 6 * MIB + 4321;
    let f = data.create(dir, b"f", 0o644, true).await?;
    write_stream(&f, 7, 0, size).await?;
    f.close().await?;
    let ino = f.ino();

    let damaged = 1u64;
    let addr = cluster.chunk_addr(damaged).to_string();
    let on_damaged: Vec<u64> = chunk_table(&meta, ino)
        .await?
        .1
        .iter()
        .filter(|c| c.replicas.iter().any(|p| p.address == addr))
        .map(|c| c.index)
        .collect();
    let flipped = flip_bits_in_chunk_files(cluster.chunk_data_dir(damaged))?;
    ensure!(flipped > 0, "no block file to damage on server {damaged}");
    info!(damaged, flipped, chunks = ?on_damaged, "flipped bits in every block file of one server");

    // A read finds some of it (and still returns the right bytes); the scrub finds the rest.
    ensure!(
        hash_of(&data, ino).await? == expected_hash(7, size),
        "a corrupt block leaked into a read"
    );
    let mut rpc = cluster.chunk_rpc(&addr).await?;
    let scrub = rpc
        .scrub(kerfs_proto::ChunkScrubRequest {})
        .await?
        .into_inner();
    info!(corrupt = scrub.corrupt.len(), "scrub of the damaged server");
    ensure!(
        scrub.corrupt.len() == on_damaged.len(),
        "the scrub found {} corrupt chunks, {} were damaged",
        scrub.corrupt.len(),
        on_damaged.len()
    );

    // Repaired: every chunk has 2 current copies again, none of them the damaged one.
    let live = live_addrs(&cluster, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, chunks) = chunk_table(&meta, ino).await?;
        // Repaired means: 2 current copies on live servers, and the damaged server's copy
        // is no longer one of them (with a third server there, repair goes there).
        let still: Vec<u64> = chunks
            .iter()
            .filter(|c| {
                let good = c
                    .replicas
                    .iter()
                    .filter(|p| p.current && live.contains(&p.address))
                    .count();
                let damaged_current = on_damaged.contains(&c.index)
                    && c.replicas.iter().any(|p| p.current && p.address == addr);
                good < 2 || damaged_current
            })
            .map(|c| c.index)
            .collect();
        if still.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "chunks {still:?} still lack a good copy after 60 s; repair queue: {:?}",
                repair_report(&meta).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let n =
        check_every_replica(&cluster, &meta, ino, size, |off, len| content(7, off, len)).await?;
    ensure!(n == 2 * 7, "{n} current replicas checked, 14 expected");
    let report = repair_report(&meta).await?;
    ensure!(
        report.repaired_total >= on_damaged.len() as u64,
        "{} repairs recorded for {} damaged chunks: {report:?}",
        report.repaired_total,
        on_damaged.len()
    );
    info!(
        replicas = n,
        "every current copy, read straight from its server, is intact"
    );
    Ok(())
}

// ---------------------------------------------------------------- 3. EC 4+2

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ec42_lost_server_shards_rebuilt_then_two_more_losses_read_back() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = start(7, Some(3000)).await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let dir = layout_dir(&meta, "ec", erasure(4, 2, 4 * MIB)).await?;
    let size = 22 * MIB + 5;
    let f = data.create(dir, b"f", 0o644, true).await?;
    write_stream(&f, 9, 0, size).await?;
    f.close().await?;
    let ino = f.ino();
    let (_, before) = chunk_table(&meta, ino).await?;
    info!(
        chunks = before.len(),
        "wrote an EC 4+2 file with 4 MiB chunks on 7 servers"
    );

    let victim_addr = before[0].replicas[0].address.clone();
    let victim = cluster.server_index(&victim_addr)?;
    let held = before
        .iter()
        .filter(|c| c.replicas.iter().any(|p| p.address == victim_addr))
        .count();
    info!(victim, shards = held, "kill -9 of a server holding shards");
    cluster.kill9_chunk(victim)?;
    let live = live_addrs(&cluster, &[victim]);
    let took = wait_whole(&meta, &[ino], &live, Duration::from_secs(90)).await?;
    info!(
        secs = took.as_secs_f64(),
        shards = held,
        "every lost shard rebuilt on another server"
    );

    // Where the rebuilt shards went: those servers must stay, so that the reads below
    // depend on the rebuilt shards.
    let (_, after) = chunk_table(&meta, ino).await?;
    let mut rebuilt_on: BTreeMap<String, usize> = BTreeMap::new();
    for (b, a) in before.iter().zip(&after) {
        for (pb, pa) in b.replicas.iter().zip(&a.replicas) {
            if pb.address != pa.address {
                *rebuilt_on.entry(pa.address.clone()).or_default() += 1;
            }
        }
    }
    info!(?rebuilt_on, "rebuilt shards per server");
    ensure!(!rebuilt_on.is_empty(), "no placement moved");
    // Each chunk's lost shard went to the one server outside its placement, so the rebuilt
    // shards are spread out: kill the two servers holding the fewest of them, never the one
    // holding chunk 0's, so that reading chunk 0 needs its rebuilt shard.
    let chunk0_new = after[0]
        .replicas
        .iter()
        .zip(&before[0].replicas)
        .find(|(a, b)| a.address != b.address)
        .map(|(a, _)| a.address.clone())
        .context("chunk 0's lost shard was not moved")?;
    let mut candidates: Vec<(usize, u64)> = cluster
        .chunks
        .keys()
        .copied()
        .filter(|&i| i != victim && cluster.chunk_addr(i) != chunk0_new)
        .map(|i| {
            let n = rebuilt_on
                .iter()
                .filter(|(a, _)| a.as_str() == cluster.chunk_addr(i))
                .map(|(_, n)| *n)
                .sum::<usize>();
            (n, i)
        })
        .collect();
    candidates.sort();
    let others: Vec<u64> = candidates.iter().take(2).map(|&(_, i)| i).collect();
    ensure!(others.len() == 2, "not enough servers to kill");
    for &i in &others {
        info!(server = i, "kill -9");
        cluster.kill9_chunk(i)?;
    }
    ensure!(
        hash_of(&data, ino).await? == expected_hash(9, size),
        "the file differs with three servers lost (one repaired)"
    );
    info!("the file reads back identical with 3 of 7 servers gone");
    Ok(())
}

// ---------------------------------------------------------------- 4. writer replaces a replica

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_losing_a_chain_member_is_acknowledged_with_r_copies() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    // The default 10 s server timeout: meta does not notice the loss during the write, so
    // background repair cannot be what restores the copies.
    let mut cluster = start(4, None).await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let dir = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let f = data.create(dir, b"f", 0o644, true).await?;
    write_stream(&f, 1, 0, 4 * MIB).await?;
    f.fsync().await?;
    let ino = f.ino();
    let (_, chunks) = chunk_table(&meta, ino).await?;
    let victim_addr = chunks[0].replicas[0].address.clone();
    let victim = cluster.server_index(&victim_addr)?;
    let killed_at = Instant::now();
    info!(
        victim,
        "kill -9 of the first replica of chunk 0 between two flushes"
    );
    cluster.kill9_chunk(victim)?;

    // Rewrites inside chunks 0..=3 (their first 512 KiB stay from the first write and must
    // reach the new replicas by copy) and extends the file to 6 MiB.
    let (from, len) = (MIB / 2, 3 * MIB);
    write_stream(&f, 2, from, len).await?;
    write_stream(&f, 2, 4 * MIB, 2 * MIB).await?;
    f.close().await?;
    let size = 6 * MIB;
    let expected = move |off: u64, n: usize| -> Vec<u8> {
        let mut out = content(1, off, n);
        let fresh = content(2, off, n);
        for (i, b) in out.iter_mut().enumerate() {
            let at = off + i as u64;
            if (from..from + len).contains(&at) || at >= 4 * MIB {
                *b = fresh[i];
            }
        }
        out
    };
    let acked = killed_at.elapsed();
    ensure!(
        acked < Duration::from_secs(8),
        "the write took {acked:?}: meta may have noticed the loss, which defeats the test"
    );

    let live = live_addrs(&cluster, &[victim]);
    let missing = lacking(&meta, &[ino], &live).await?;
    ensure!(
        missing.is_empty(),
        "acknowledged with fewer than 2 current copies on live servers: {missing:?}"
    );
    let report = repair_report(&meta).await?;
    ensure!(
        report.repaired_total == 0,
        "background repair ran ({report:?}): the writer was supposed to replace the replica"
    );
    let n = check_every_replica(&cluster, &meta, ino, size, expected).await?;
    ensure!(n == 12, "{n} current replicas checked, 12 expected");
    ensure!(
        hash_of(&data, ino).await? == blake3::hash(&expected(0, size as usize)),
        "the file reads back wrong"
    );
    info!(
        secs = acked.as_secs_f64(),
        "acknowledged with 2 current copies of every chunk, one server down"
    );
    Ok(())
}

// ---------------------------------------------------------------- 5. writes racing repair

/// Every placement of every chunk checked against `model`: replicated copies byte for byte;
/// EC chunks decoded from every k-subset of their current shards (so every shard, parity
/// included, must agree with the others).
async fn check_against_model(
    cluster: &KerfsCluster,
    meta: &MetaClient,
    ino: u64,
    model: &[u8],
) -> Result<usize> {
    let (layout, chunks) = chunk_table(meta, ino).await?;
    if layout.ec_data == 0 {
        return check_every_replica(cluster, meta, ino, model.len() as u64, |off, len| {
            model[off as usize..off as usize + len].to_vec()
        })
        .await;
    }
    let (k, m) = (layout.ec_data as usize, layout.ec_parity as usize);
    let codec = kerfs_client::ec::Codec::new(k, m).map_err(anyhow::Error::msg)?;
    let cs = layout.chunk_size;
    let stripes = (cs / codec.stripe_bytes() as u64) as usize;
    let shard_len = (stripes * kerfs_client::ec::BLOCK) as u64;
    let mut checked = 0;
    for c in chunks {
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
        for p in c.replicas.iter().filter(|p| p.current) {
            shards[p.shard_index as usize] =
                Some(read_replica(cluster, &p.address, p.chunk_id, c.version, shard_len).await?);
        }
        ensure!(
            shards.iter().all(|s| s.is_some()),
            "chunk {} lacks a current shard",
            c.index
        );
        let want = &model[(c.index * cs) as usize..((c.index + 1) * cs) as usize];
        // Leave out each shard in turn (m = 1 here; for larger m this still covers each).
        for skip in 0..k + m {
            let mut some = shards.clone();
            some[skip] = None;
            let got = codec.decode(&some, stripes).map_err(anyhow::Error::msg)?;
            ensure!(
                got == want,
                "chunk {} decoded without shard {skip} differs from the acknowledged data",
                c.index
            );
        }
        checked += k + m;
    }
    Ok(checked)
}

async fn writes_racing_repair(
    layout: Layout,
    wanted_placements: usize,
    background: bool,
) -> Result<()> {
    use rand::{Rng, SeedableRng};
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = start(4, Some(3000)).await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let dir = layout_dir(&meta, "d", layout).await?;
    let size = 8 * MIB;
    let f = data.create(dir, b"f", 0o644, true).await?;
    write_stream(&f, 1, 0, size).await?;
    f.close().await?;
    let ino = f.ino();
    let mut model = content(1, 0, size as usize);

    let (_, chunks) = chunk_table(&meta, ino).await?;
    let victim_addr = chunks[0].replicas[0].address.clone();
    let victim = cluster.server_index(&victim_addr)?;
    info!(
        victim,
        "kill -9; then small overwrites all over the file while it is repaired"
    );
    cluster.kill9_chunk(victim)?;

    // Detection takes 3 s, repair ticks every 2 s: 12 s of writes overlap both, and each
    // flush commits (so repair copies made meanwhile must be refused or superseded).
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let f = data.open(ino, libc::O_RDWR as u32).await?;
    let t = Instant::now();
    let mut writes = 0;
    while t.elapsed() < Duration::from_secs(12) {
        let off = rng.gen_range(0..size - 1);
        let len = rng.gen_range(1..=(300 * 1024)).min((size - off) as usize);
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf[..]);
        f.write_at(off, &buf).await?;
        model[off as usize..off as usize + len].copy_from_slice(&buf);
        f.fsync().await?;
        writes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.close().await?;
    info!(writes, "overwrites acknowledged");

    let live = live_addrs(&cluster, &[victim]);
    wait_whole(&meta, &[ino], &live, Duration::from_secs(60)).await?;
    let report = repair_report(&meta).await?;
    info!(?report, "repair queue");
    ensure!(
        !background || report.repaired_total > 0,
        "background repair never completed a copy, so it raced nothing: {report:?}"
    );
    let n = check_against_model(&cluster, &meta, ino, &model).await?;
    ensure!(
        n == 8 * wanted_placements,
        "{n} current placements checked, {} expected",
        8 * wanted_placements
    );
    ensure!(
        hash_of(&data, ino).await? == blake3::hash(&model),
        "the file reads back wrong"
    );
    info!("every current copy holds the last acknowledged bytes");
    Ok(())
}

/// R=2: the writer replaces lost replicas itself while background repair runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r2_writes_racing_repair_never_leave_a_stale_copy_current() -> Result<()> {
    writes_racing_repair(replicated(2, MIB), 2, false).await
}

/// EC 2+1: the writer does not replace shards, so background rebuilds race its epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ec21_writes_racing_repair_never_leave_a_stale_shard_current() -> Result<()> {
    writes_racing_repair(erasure(2, 1, MIB), 3, true).await
}
