//! The data path with real processes (3 `kerfsd meta` + N `kerfsd chunk`): large files with
//! random write patterns (R=2 and EC 4+2), chunk servers killed in the middle of a read,
//! bits flipped in block files on disk, and the file semantics (overwrite, extend, holes,
//! truncate down and up, writes straddling chunk boundaries) checked against an in-memory
//! model. Each test narrates its steps.
//!
//! `KERFS_DATA_TEST_MIB` sets the size of the large-file tests (default 1024 = 1 GiB).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kerfs_client::{DataClient, DataConfig, FileHandle, MetaClient};
use kerfs_proto::Layout;
use kerfs_tests::{
    content, erasure, expected_hash, flip_bits_in_chunk_files, init_tracing, layout_dir,
    replicated, KerfsCluster, KerfsClusterOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

const MIB: u64 = 1024 * 1024;

/// Each test starts a dozen processes and moves a lot of data on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(chunk_servers: u64) -> Result<(KerfsCluster, MetaClient, DataClient)> {
    let cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    Ok((cluster, meta, data))
}

/// Something done once in the middle of a read (kill a server).
type MidRead<'a> = Box<dyn FnMut() -> Result<()> + Send + 'a>;

/// Reads the whole file in `step`-byte sequential requests; `at_fraction` runs once when
/// that share of the file was read (to kill servers mid-read).
async fn hash_file(
    f: &FileHandle,
    step: usize,
    mut at_fraction: Option<(f64, MidRead<'_>)>,
) -> Result<blake3::Hash> {
    let size = f.size();
    let mut h = blake3::Hasher::new();
    let mut pos = 0u64;
    while pos < size {
        if let Some((frac, _)) = &at_fraction {
            if pos as f64 >= size as f64 * frac {
                let (_, mut act) = at_fraction.take().context("taken")?;
                act()?;
            }
        }
        let buf = f.read_at(pos, step).await?;
        ensure!(!buf.is_empty(), "short read at {pos} of {size}");
        h.update(&buf);
        pos += buf.len() as u64;
    }
    Ok(h.finalize())
}

/// Writes `size` bytes of `content(seed)` as a shuffled set of pieces of random sizes, after
/// a pass of garbage over random ranges (so the final bytes are all overwrites of something).
async fn write_random_pattern(f: &FileHandle, seed: u8, size: u64, rng: &mut StdRng) -> Result<()> {
    for _ in 0..32 {
        let len = rng.gen_range(1..=2 * MIB) as usize;
        let off = rng.gen_range(0..size.saturating_sub(len as u64).max(1));
        f.write_at(off, &vec![0xAB; len.min((size - off) as usize)])
            .await?;
    }
    let mut pieces = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let len = match rng.gen_range(0..10) {
            0..=3 => rng.gen_range(1..64 * 1024),
            4..=8 => rng.gen_range(64 * 1024..4 * MIB),
            _ => rng.gen_range(4 * MIB..16 * MIB),
        }
        .min(size - pos);
        pieces.push((pos, len));
        pos += len;
    }
    // Shuffle in windows so write-behind still sees some locality (as real programs do),
    // while offsets jump around within each window.
    for w in pieces.chunks_mut(64) {
        for i in (1..w.len()).rev() {
            let j = rng.gen_range(0..=i);
            w.swap(i, j);
        }
    }
    for (off, len) in pieces {
        f.write_at(off, &content(seed, off, len as usize)).await?;
    }
    Ok(())
}

fn large_size() -> u64 {
    std::env::var("KERFS_DATA_TEST_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        * MIB
}

async fn large_file(layout: Layout, name: &str) -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let size = large_size();
    let (_cluster, meta, data) = start(6).await?;
    let dir = layout_dir(&meta, name, layout).await?;
    info!(?layout, size, "writing a large file with a random pattern");
    let mut rng = StdRng::seed_from_u64(7);
    let seed = 11u8;
    let t = Instant::now();
    let f = data.create(dir, b"big", 0o644, true).await?;
    write_random_pattern(&f, seed, size, &mut rng).await?;
    f.close().await?;
    let write_s = t.elapsed().as_secs_f64();
    let want = expected_hash(seed, size);

    let t = Instant::now();
    let attr = meta.lookup(dir, b"big").await?;
    ensure!(
        attr.size == size,
        "size {} after close, want {size}",
        attr.size
    );
    let f = data.open(attr.ino, libc::O_RDONLY as u32).await?;
    let got = hash_file(&f, MIB as usize, None).await?;
    let read_s = t.elapsed().as_secs_f64();
    f.close().await?;
    info!(
        write_mib_s = size as f64 / MIB as f64 / write_s,
        read_mib_s = size as f64 / MIB as f64 / read_s,
        "throughput (random-pattern write incl. garbage pass, sequential 1 MiB read)"
    );
    ensure!(got == want, "blake3 of the file read back differs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_file_r2_random_pattern() -> Result<()> {
    large_file(replicated(2, 8 * MIB), "r2").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_file_ec42_random_pattern() -> Result<()> {
    large_file(erasure(4, 2, 8 * MIB), "ec42").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunk_servers_killed_during_reads() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (mut cluster, meta, data) = start(6).await?;
    let size = 48 * MIB;
    let mut rng = StdRng::seed_from_u64(3);
    let r2 = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let ec = layout_dir(&meta, "ec", erasure(4, 2, MIB)).await?;
    for (dir, seed) in [(r2, 1u8), (ec, 2u8)] {
        let f = data.create(dir, b"f", 0o644, true).await?;
        write_random_pattern(&f, seed, size, &mut rng).await?;
        f.close().await?;
    }

    info!("R=2: reading, chunk server 1 killed at a third of the file");
    let f = data.open(meta.lookup(r2, b"f").await?.ino, 0).await?;
    let got = hash_file(
        &f,
        MIB as usize,
        Some((0.33, Box::new(|| cluster.kill9_chunk(1)))),
    )
    .await?;
    ensure!(
        got == expected_hash(1, size),
        "R=2 file differs after a server died mid-read"
    );
    f.close().await?;

    info!("EC 4+2: reading with server 1 down, server 2 killed at half the file");
    let f = data.open(meta.lookup(ec, b"f").await?.ino, 0).await?;
    let got = hash_file(
        &f,
        MIB as usize,
        Some((0.5, Box::new(|| cluster.kill9_chunk(2)))),
    )
    .await?;
    ensure!(
        got == expected_hash(2, size),
        "EC file differs with two servers down"
    );
    f.close().await?;

    info!("EC 4+2: a fresh handle reads the whole file degraded, small random reads");
    let f = data.open(meta.lookup(ec, b"f").await?.ino, 0).await?;
    for _ in 0..50 {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..300_000);
        let got = f.read_at(off, len).await?;
        let want = content(2, off, (len as u64).min(size - off) as usize);
        ensure!(got == want, "degraded read at {off}+{len} differs");
    }
    f.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flipped_bits_on_disk_are_never_returned() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (cluster, meta, data) = start(6).await?;
    let size = 12 * MIB + 4321;
    let mut rng = StdRng::seed_from_u64(5);
    let r2 = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    let ec = layout_dir(&meta, "ec", erasure(4, 2, MIB)).await?;
    for (dir, seed) in [(r2, 3u8), (ec, 4u8)] {
        let f = data.create(dir, b"f", 0o644, true).await?;
        write_random_pattern(&f, seed, size, &mut rng).await?;
        f.close().await?;
    }
    // One damaged server can only cost R=2 one of its two copies, so R=2 is read with server 1
    // damaged; EC 4+2 then loses a second server (4), which its two parity shards cover. (With
    // both servers damaged at once, an R=2 chunk placed on 1 and 4 is really lost.)
    let checks: [(u64, &[(u64, u8)]); 2] = [(1, &[(r2, 3), (ec, 4)]), (4, &[(ec, 4)])];
    for (server, files) in checks {
        let flipped = flip_bits_in_chunk_files(cluster.chunk_data_dir(server))?;
        info!(
            server,
            flipped, "flipped bits in the block files of one server"
        );
        ensure!(
            flipped > 0,
            "no block file found to corrupt on server {server}"
        );
        for &(dir, seed) in files {
            let f = data.open(meta.lookup(dir, b"f").await?.ino, 0).await?;
            ensure!(
                hash_file(&f, 700_000, None).await? == expected_hash(seed, size),
                "corrupt blocks leaked into a read"
            );
            f.close().await?;
        }
    }
    Ok(())
}

/// Applies a write to the model.
fn model_write(model: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[off as usize..end].copy_from_slice(data);
}

async fn check_model(f: &FileHandle, model: &[u8], what: &str) -> Result<()> {
    ensure!(
        f.size() == model.len() as u64,
        "{what}: size {} want {}",
        f.size(),
        model.len()
    );
    let got = f.read_at(0, model.len() + 10).await?;
    ensure!(
        got.len() == model.len(),
        "{what}: read {} bytes, want {}",
        got.len(),
        model.len()
    );
    if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
        anyhow::bail!("{what}: first difference at byte {i}");
    }
    Ok(())
}

async fn semantics(data: &DataClient, meta: &MetaClient, dir: u64, label: &str) -> Result<()> {
    let f = data.create(dir, b"sem", 0o644, true).await?;
    let ino = f.ino();
    let mut model = Vec::new();
    let mut rng = StdRng::seed_from_u64(9);
    let pat =
        |n: usize, b: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(31) ^ b).collect() };

    // Straddling chunk boundaries (1 MiB chunks), then overwrite the middle.
    let a = pat((3 * MIB + MIB / 2) as usize, 1);
    f.write_at(0, &a).await?;
    model_write(&mut model, 0, &a);
    let b = pat(300_000, 2);
    f.write_at(MIB - 100_000, &b).await?;
    model_write(&mut model, MIB - 100_000, &b);
    check_model(&f, &model, &format!("{label}: buffered overwrite")).await?;
    f.fsync().await?;
    check_model(&f, &model, &format!("{label}: after fsync")).await?;
    // Overwrite the middle after a flush (a new write epoch on existing chunks).
    let c = pat(1_500_000, 3);
    f.write_at(1_200_000, &c).await?;
    model_write(&mut model, 1_200_000, &c);
    f.fsync().await?;
    // Extend with a hole of two chunks.
    let d = pat(70_000, 4);
    f.write_at(6 * MIB + 5, &d).await?;
    model_write(&mut model, 6 * MIB + 5, &d);
    check_model(&f, &model, &format!("{label}: extended past a hole")).await?;
    // Truncate down (non-aligned, inside a chunk) and up: the cut bytes read as zeros.
    f.truncate(2 * MIB + 777).await?;
    model.truncate((2 * MIB + 777) as usize);
    check_model(&f, &model, &format!("{label}: truncated down")).await?;
    f.truncate(5 * MIB).await?;
    model.resize((5 * MIB) as usize, 0);
    check_model(&f, &model, &format!("{label}: truncated up")).await?;
    f.close().await?;

    // A random sequence of small and large operations, checked through fresh handles.
    for round in 0..4 {
        let f = data.open(ino, libc::O_RDWR as u32).await?;
        check_model(&f, &model, &format!("{label}: reopened, round {round}")).await?;
        for _ in 0..40 {
            match rng.gen_range(0..10) {
                0..=6 => {
                    let off = rng.gen_range(0..model.len() as u64 + MIB);
                    let len = if rng.gen_bool(0.5) {
                        rng.gen_range(1..5000)
                    } else {
                        rng.gen_range(1..2_500_000)
                    };
                    let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    f.write_at(off, &buf).await?;
                    model_write(&mut model, off, &buf);
                }
                7 => {
                    let size = rng.gen_range(0..model.len() as u64 + 2 * MIB);
                    f.truncate(size).await?;
                    model.resize(size as usize, 0);
                }
                8 => f.fsync().await?,
                _ => {
                    let off = rng.gen_range(0..model.len() as u64 + 1);
                    let len = rng.gen_range(1..3_000_000);
                    let got = f.read_at(off, len).await?;
                    let end = (off as usize + len).min(model.len());
                    ensure!(
                        got[..] == model[off as usize..end],
                        "{label}: read at {off}+{len} differs"
                    );
                }
            }
        }
        check_model(&f, &model, &format!("{label}: round {round} before close")).await?;
        f.close().await?;
        let attr = meta.getattr(ino).await?;
        ensure!(
            attr.size == model.len() as u64,
            "{label}: meta size {} want {}",
            attr.size,
            model.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overwrite_extend_truncate_and_chunk_boundaries() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (_cluster, meta, _) = start(6).await?;
    // A small flush threshold so that flushes happen in the middle of the sequences too.
    let data = DataClient::with_config(
        meta.clone(),
        DataConfig {
            flush_threshold: 3 * MIB as usize,
            readahead: 2 * MIB as usize,
            parallel_chunks: 4,
        },
    );
    let r2 = layout_dir(&meta, "r2", replicated(2, MIB)).await?;
    semantics(&data, &meta, r2, "R=2").await?;
    let ec = layout_dir(&meta, "ec", erasure(4, 2, MIB)).await?;
    semantics(&data, &meta, ec, "EC 4+2").await?;
    Ok(())
}

/// A write made visible with `publish` (what close(2) on a mount does) is read by another
/// handle at once and waits for no chunk server's disk; `fsync` then flushes it on both
/// replicas (an empty synced write down the chain); a write followed straight by `fsync`
/// goes out synced; `close` of the library flushes as `fsync` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_waits_for_no_disk_and_fsync_flushes_every_replica() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (cluster, meta, data) = start(3).await?;
    let dir = layout_dir(&meta, "r2", replicated(2, 4 * MIB)).await?;
    let syncs = || cluster.chunk_metric_sum("kerfs_chunk_write_syncs_total");

    let f = data.create(dir, b"f", 0o644, true).await?;
    let start = syncs()?;
    f.write_at(0, &content(3, 0, 5000)).await?;
    f.publish().await?;
    ensure!(syncs()? == start, "publish flushed a chunk server's disk");
    let attr = meta.lookup(dir, b"f").await?;
    let reader = data.open(attr.ino, libc::O_RDONLY as u32).await?;
    ensure!(
        reader.read_at(0, 5000).await? == content(3, 0, 5000),
        "another handle does not read the published bytes"
    );
    reader.close().await?;

    f.fsync().await?;
    let after_fsync = syncs()?;
    ensure!(
        after_fsync - start >= 2.0,
        "fsync after publish flushed {} replicas, want 2",
        after_fsync - start
    );
    // Nothing left unflushed: a second fsync sends nothing.
    f.fsync().await?;
    ensure!(
        syncs()? == after_fsync,
        "an fsync with nothing new flushed again"
    );

    f.write_at(5000, &content(3, 5000, 100)).await?;
    f.close().await?;
    ensure!(
        syncs()? - after_fsync >= 2.0,
        "close did not flush the last write on both replicas"
    );
    Ok(())
}
