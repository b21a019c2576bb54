//! Chunk servers that leave, with real processes (3 `kerfsd meta`, 4 `kerfsd chunk`) and the
//! real `kerfsctl`:
//!
//! - `drain_under_writes_keeps_redundancy_then_remove`: R=2 files (1 MiB chunks) and an
//!   EC 2+1 file written; `kerfsctl node remove` of the server holding the most copies is
//!   refused (exit 1, saying to drain it first); `kerfsctl node drain ID --wait --json`
//!   runs while a client keeps creating and writing files. Meanwhile every chunk of the
//!   files written before is sampled again and again and never has fewer good copies than
//!   its layout wants. Afterwards: no client write failed (and some happened during the
//!   drain), the server is "drained", meta places nothing there, the server itself reports
//!   0 chunks, every file reads back identical (blake3); `node remove` is accepted, the
//!   server is listed as removed, and with its process killed every file still reads back.
//! - `drain_resumes_under_a_new_leader_after_the_leader_is_killed`: a drain with more moves
//!   than one round hands out is started, the metadata leader is killed at once; without
//!   any further drain command the new leader's mover finishes it (the server turns
//!   "drained", nothing placed there, every chunk with its copies, files identical).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kerfs_client::{DataClient, MetaClient};
use kerfs_tests::{
    bin_path, busiest_server, chunk_table, erasure, expected_hash, hash_of, init_tracing, kerfsctl,
    kerfsctl_json, layout_dir, replicated, write_stream, KerfsCluster, KerfsClusterOptions,
    MetaClusterOptions,
};
use serde_json::Value;
use tracing::info;

const MIB: u64 = 1024 * 1024;

/// Each test starts seven daemons on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `kerfsctl --json ARGS` without borrowing the cluster (to run on a blocking thread while
/// the test goes on): exit code, stdout, stderr.
fn kerfsctl_detached(
    meta: String,
    key: std::path::PathBuf,
    args: Vec<String>,
) -> Result<(i32, String, String)> {
    let out = Command::new(bin_path("kerfsctl")?)
        .args(["--meta", &meta])
        .arg("--key-file")
        .arg(&key)
        .args(["--timeout", "5", "--json"])
        .args(&args)
        .output()
        .context("running kerfsctl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The chunk server record `kerfsctl nodes --json` shows for `id`.
fn node(cluster: &KerfsCluster, id: u64) -> Result<Value> {
    let (_, v) = kerfsctl_json(cluster, &["nodes"])?;
    v.as_array()
        .context("nodes is not a list")?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
        .cloned()
        .with_context(|| format!("server {id} not listed: {v:#}"))
}

/// After a drain: no chunk of the files is placed on `victim`, and each has every copy its
/// layout wants.
async fn ensure_nothing_on(
    meta: &MetaClient,
    inos: &[u64],
    victim: u64,
    states: &BTreeMap<u64, String>,
) -> Result<()> {
    for &ino in inos {
        for c in chunk_table(meta, ino).await?.1 {
            ensure!(
                c.replicas.iter().all(|p| p.server_id != victim),
                "inode {ino} chunk {} still placed on the drained server {victim}",
                c.index
            );
        }
    }
    let (margin, which) = worst_margin(meta, inos, states).await?;
    ensure!(margin >= 0, "after the drain {which} good copies");
    Ok(())
}

/// The fewest good copies (current, on an up or draining server) any chunk of `inos` has,
/// minus what its layout wants: negative when a chunk lacks redundancy.
async fn worst_margin(
    meta: &MetaClient,
    inos: &[u64],
    live: &BTreeMap<u64, String>,
) -> Result<(i64, String)> {
    let mut worst = (i64::MAX, String::new());
    for &ino in inos {
        let (layout, chunks) = chunk_table(meta, ino).await?;
        for c in chunks {
            let good = c
                .replicas
                .iter()
                .filter(|p| {
                    p.current
                        && matches!(
                            live.get(&p.server_id).map(String::as_str),
                            Some("up") | Some("draining")
                        )
                })
                .count() as i64;
            let margin = good - layout.copies() as i64;
            if margin < worst.0 {
                worst = (
                    margin,
                    format!(
                        "inode {ino} chunk {}: {good} of {}",
                        c.index,
                        layout.copies()
                    ),
                );
            }
        }
    }
    Ok(worst)
}

async fn server_states(meta: &MetaClient) -> Result<BTreeMap<u64, String>> {
    let servers = kerfs_client::admin::chunk_servers(meta).await?;
    Ok(servers.into_iter().map(|s| (s.id, s.state)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_under_writes_keeps_redundancy_then_remove() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = KerfsCluster::start(KerfsClusterOptions {
        meta: MetaClusterOptions {
            chunk_server_timeout_ms: Some(5000),
            ..Default::default()
        },
        chunk_servers: 4,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let r2 = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let ec = layout_dir(&meta, "ec", erasure(2, 1, 2 * MIB)).await?;
    // (ino, seed, size) of every file that must read back.
    let mut files: Vec<(u64, u8, u64)> = Vec::new();
    for (seed, size) in [
        (1u8, 9 * MIB + 77),
        (2, 8 * MIB),
        (3, 6 * MIB + 1),
        (4, 7 * MIB),
    ] {
        let f = data
            .create(r2, format!("f{seed}").as_bytes(), 0o644, true)
            .await?;
        write_stream(&f, seed, 0, size).await?;
        f.close().await?;
        files.push((f.ino(), seed, size));
    }
    let f = data.create(ec, b"e", 0o644, true).await?;
    write_stream(&f, 9, 0, 10 * MIB + 5).await?;
    f.close().await?;
    files.push((f.ino(), 9, 10 * MIB + 5));
    let before: Vec<u64> = files.iter().map(|f| f.0).collect();

    // The server holding the most copies (replicas and shards) leaves.
    let (busiest, held) = busiest_server(&meta, &before).await?;
    let victim = busiest.server_id;
    let ec_ino = files.last().map(|f| f.0).context("no EC file")?;
    let ec_shards = chunk_table(&meta, ec_ino)
        .await?
        .1
        .iter()
        .flat_map(|c| c.replicas.iter())
        .filter(|p| p.server_id == victim)
        .count();
    ensure!(
        ec_shards > 0,
        "the server to drain holds no EC shard: test too weak"
    );
    let victim_addr = node(&cluster, victim)?["address"]
        .as_str()
        .context("no address")?
        .to_string();
    let victim_index = cluster.server_index(&victim_addr)?;
    info!(victim, held, ec_shards, %victim_addr, "draining the server holding the most copies");
    ensure!(
        held >= 10,
        "only {held} copies on the busiest server: test too small"
    );

    // Before the drain: removal is refused, saying what to do.
    let refused = kerfsctl(&cluster, &["node", "remove", &victim.to_string()])
        .err()
        .context("`node remove` of a server holding needed copies succeeded")?;
    let text = format!("{refused:#}");
    ensure!(
        text.contains("exit 1") && text.contains(&format!("kerfsctl node drain {victim}")),
        "the refusal does not say to drain first: {text}"
    );
    ensure!(
        node(&cluster, victim)?["state"] == "up",
        "refused removal changed the state"
    );

    // A client keeps writing new files for the whole drain.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (data, stop) = (data.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written: Vec<(u64, u8, u64, Instant)> = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let seed = 100 + (n % 100) as u8;
                let size = 2 * MIB + n * 4096;
                let f = data
                    .create(r2, format!("w{n}").as_bytes(), 0o644, true)
                    .await
                    .with_context(|| format!("creating w{n}"))?;
                write_stream(&f, seed, 0, size)
                    .await
                    .with_context(|| format!("writing w{n}"))?;
                f.close().await.with_context(|| format!("closing w{n}"))?;
                written.push((f.ino(), seed, size, Instant::now()));
                n += 1;
            }
            anyhow::Ok(written)
        })
    };

    let started = Instant::now();
    let drain = tokio::task::spawn_blocking({
        let (m, k) = (
            cluster.meta.addrs().join(","),
            cluster.meta.key_file.clone(),
        );
        let args = [
            "node",
            "drain",
            &victim.to_string(),
            "--wait",
            "--wait-secs",
            "300",
        ]
        .map(String::from)
        .to_vec();
        move || kerfsctl_detached(m, k, args)
    });
    // While it runs: no chunk written before ever has fewer good copies than wanted.
    let mut samples = 0;
    let mut saw_draining = false;
    while !drain.is_finished() {
        let states = server_states(&meta).await?;
        saw_draining |= states.get(&victim).map(String::as_str) == Some("draining");
        let (margin, which) = worst_margin(&meta, &before, &states).await?;
        ensure!(
            margin >= 0,
            "during the drain {which} good copies (server states {states:?})"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = drain.await??;
    let took = started.elapsed();
    ensure!(code == 0, "node drain --wait exited {code}: {err}\n{out}");
    let v: Value = serde_json::from_str(&out).with_context(|| format!("no JSON: {out}"))?;
    ensure!(
        v["drained"] == true && v["chunks_left"] == 0 && v["state"] == "drained",
        "{v:#}"
    );
    // Not a terminal: one progress line a second on stderr, counting down.
    let progress: Vec<u64> = err
        .lines()
        .filter(|l| l.contains("chunks left"))
        .filter_map(|l| l.split(": ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    ensure!(
        progress.first().is_some_and(|&n| n > 0),
        "no progress shown while waiting: {err}"
    );
    ensure!(
        saw_draining || samples == 0,
        "the server was never seen draining"
    );
    info!(?took, samples, "drained");
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .await?
        .context("a client write failed during the drain")?;
    let during = written.iter().filter(|w| w.3 <= started + took).count();
    ensure!(during > 0, "no client write completed during the drain");
    info!(
        written = written.len(),
        during, "client writes, none failed"
    );
    files.extend(written.iter().map(|w| (w.0, w.1, w.2)));

    // Meta places nothing there, every chunk has its copies, and the server empties itself.
    let states = server_states(&meta).await?;
    ensure!(
        states.get(&victim).map(String::as_str) == Some("drained"),
        "{states:?}"
    );
    let all: Vec<u64> = files.iter().map(|f| f.0).collect();
    ensure_nothing_on(&meta, &all, victim, &states).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = node(&cluster, victim)?;
        if n["chunks"] == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the drained server still reports chunks: {n:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, text) = kerfsctl(&cluster, &["node", "drain", &victim.to_string()])?;
    ensure!(text.contains("drained, 0 chunks left"), "{text}");

    for &(ino, seed, size) in &files {
        ensure!(
            hash_of(&data, ino).await? == expected_hash(seed, size),
            "inode {ino} reads back different bytes after the drain"
        );
    }
    info!(files = files.len(), "every file reads back identical");

    // Now removal is accepted; the process going away changes nothing for the data.
    let (_, v) = kerfsctl_json(&cluster, &["node", "remove", &victim.to_string()])?;
    ensure!(v["removed"] == victim, "{v:#}");
    ensure!(node(&cluster, victim)?["state"] == "removed");
    let (code, status) = kerfsctl_json(&cluster, &["status"])?;
    ensure!(code == 0 && status["health"] == "HEALTH_OK", "{status:#}");
    cluster.kill9_chunk(victim_index)?;
    for &(ino, seed, size) in &files {
        ensure!(
            hash_of(&data, ino).await? == expected_hash(seed, size),
            "inode {ino} differs once the removed server is gone"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_resumes_under_a_new_leader_after_the_leader_is_killed() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: 4,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let r2 = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let mut files = Vec::new();
    for (seed, size) in [(1u8, 20 * MIB + 3), (2, 16 * MIB), (3, 12 * MIB)] {
        let f = data
            .create(r2, format!("f{seed}").as_bytes(), 0o644, true)
            .await?;
        write_stream(&f, seed, 0, size).await?;
        f.close().await?;
        files.push((f.ino(), seed, size));
    }
    let mut load: BTreeMap<u64, usize> = BTreeMap::new();
    for &(ino, _, _) in &files {
        for c in chunk_table(&meta, ino).await?.1 {
            for p in c.replicas {
                *load.entry(p.server_id).or_default() += 1;
            }
        }
    }
    let (victim, held) = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(id, n)| (*id, *n))
        .context("no placements")?;
    let (_, status) = kerfsctl_json(&cluster, &["status"])?;
    let leader = status["leader"].as_u64().context("no leader")?;

    let (_, v) = kerfsctl_json(&cluster, &["node", "drain", &victim.to_string()])?;
    ensure!(v["state"] == "draining", "{v:#}");
    let left = v["chunks_left"].as_u64().unwrap_or(0);
    ensure!(
        left > 12,
        "{left} of {held} chunks left right after the start: more than one round of moves is needed for this test"
    );
    info!(
        victim,
        held, left, leader, "drain started; kill -9 of the metadata leader"
    );
    cluster.meta.kill9(leader)?;

    // Only looking from here on (no second drain command): the new leader's mover finishes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match kerfsctl_json(&cluster, &["nodes"]) {
            Ok((_, v)) => {
                let n = v
                    .as_array()
                    .and_then(|a| a.iter().find(|n| n["id"].as_u64() == Some(victim)).cloned())
                    .context("drained server not listed")?;
                if n["state"] == "drained" {
                    break;
                }
                ensure!(Instant::now() < deadline, "not drained in time: {n:#}");
            }
            Err(e) => ensure!(Instant::now() < deadline, "no answer in time: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, status) = kerfsctl_json(&cluster, &["status"])?;
    let new_leader = status["leader"].as_u64().context("no new leader")?;
    ensure!(new_leader != leader, "{status:#}");
    let states = server_states(&meta).await?;
    let inos: Vec<u64> = files.iter().map(|f| f.0).collect();
    ensure_nothing_on(&meta, &inos, victim, &states).await?;
    for &(ino, seed, size) in &files {
        ensure!(
            hash_of(&data, ino).await? == expected_hash(seed, size),
            "inode {ino} reads back different bytes"
        );
    }
    let (_, v) = kerfsctl_json(&cluster, &["node", "remove", &victim.to_string()])?;
    ensure!(v["removed"] == victim, "{v:#}");
    Ok(())
}
