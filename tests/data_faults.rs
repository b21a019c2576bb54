//! Faults of the data path with real processes (3 `kerfsd meta` + N `kerfsd chunk`), the
//! parts of issue 3 that tests/data_path.rs does not cover:
//!
//! * a chunk server that was down while a chunk was rewritten comes back and never serves the
//!   old version (through the client, and asked directly over the Chunk RPC);
//! * the whole cluster (every metadata node and every chunk server) restarted, with SIGTERM
//!   and with kill -9: every file reads back identical;
//! * a chunk server whose disk fills up (its data dir on a 32 MiB tmpfs): writes fail over or
//!   fail with ENOSPC/EIO (never hang), and every write acknowledged by close reads back.
//!
//! Each test narrates its steps. They need root (the disk-full test mounts a tmpfs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_client::{ClientError, DataClient, MetaClient};
use kerfs_proto::FileChunk;
use kerfs_tests::{
    chunk_table, content, erasure, expected_hash, hash_file, init_tracing, layout_dir, log_tail,
    replicated, write_stream, KerfsCluster, KerfsClusterOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::{info, warn};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Each test starts a dozen processes and moves a lot of data on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until every chunk server answers ServerInfo (it listens and serves), and meta counts
/// them all as up.
async fn wait_chunk_servers_serving(cluster: &KerfsCluster, meta: &MetaClient) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &i in cluster.chunks.keys() {
        loop {
            let ok = match cluster.chunk_rpc(cluster.chunk_addr(i)).await {
                Ok(mut c) => c
                    .server_info(kerfs_proto::ChunkServerInfoRequest {})
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "chunk server {i} does not answer 30 s after its restart; log:\n{}",
                    log_tail(&cluster.chunks[&i].log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster
        .wait_chunk_servers_up(meta, cluster.chunks.len(), Duration::from_secs(30))
        .await
}

// ---------------------------------------------------------------- a. stale server comes back

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_down_during_rewrite_never_serves_the_old_version() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    // Two servers for R=2: no spare, so the writer cannot move the stopped server's
    // replicas elsewhere (tests/data_repair.rs covers that) and the stale copies stay there.
    let mut cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: 2,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    let chunk = MIB;
    let dir = layout_dir(&meta, "r2", replicated(2, chunk)).await?;
    let size = 6 * chunk + 12_345;

    info!(
        size,
        "writing a 6-chunk R=2 file (1 MiB chunks) on 2 servers"
    );
    let f = data.create(dir, b"f", 0o644, true).await?;
    write_stream(&f, 1, 0, size).await?;
    f.close().await?;
    let ino = f.ino();
    let before = chunk_table(&meta, ino).await?.1;
    ensure!(before.len() == 7, "{} chunks in meta, want 7", before.len());

    // The server holding a replica of chunk 1; chunks 1..=4 get rewritten while it is down,
    // the others keep their version (it must still be able to serve those).
    let victim_addr = before
        .iter()
        .find(|c| c.index == 1)
        .and_then(|c| c.replicas.first())
        .map(|p| p.address.clone())
        .context("chunk 1 has no placement")?;
    let victim = cluster.server_index(&victim_addr)?;
    let held: Vec<FileChunk> = before
        .iter()
        .filter(|c| c.replicas.iter().any(|p| p.address == victim_addr))
        .cloned()
        .collect();
    let rewritten: Vec<&FileChunk> = held.iter().filter(|c| (1..=4).contains(&c.index)).collect();
    info!(victim, addr = %victim_addr, chunks = ?held.iter().map(|c| c.index).collect::<Vec<_>>(), "stopping the chunk server holding a replica of chunk 1");
    cluster.stop_chunk(victim)?;

    info!("overwriting chunks 1..=4 (bytes 1 MiB .. 5 MiB) while it is down");
    let (ow_from, ow_len) = (chunk, 4 * chunk);
    let f = data.open(ino, libc::O_RDWR as u32).await?;
    write_stream(&f, 2, ow_from, ow_len).await?;
    f.close().await?;
    let expected = |off: u64, len: usize| -> Vec<u8> {
        let mut out = content(1, off, len);
        let (lo, hi) = (off.max(ow_from), (off + len as u64).min(ow_from + ow_len));
        if lo < hi {
            let new = content(2, lo, (hi - lo) as usize);
            out[(lo - off) as usize..(hi - off) as usize].copy_from_slice(&new);
        }
        out
    };
    let want_hash = blake3::hash(&expected(0, size as usize));

    let after = chunk_table(&meta, ino).await?.1;
    for c in &rewritten {
        let now = after
            .iter()
            .find(|a| a.index == c.index)
            .context("chunk gone")?;
        ensure!(
            now.version > c.version,
            "chunk {} still at version {} after the rewrite",
            c.index,
            c.version
        );
        let p = now
            .replicas
            .iter()
            .find(|p| p.address == victim_addr)
            .context("victim placement gone")?;
        ensure!(
            !p.current,
            "meta still counts the stopped server as current for chunk {} (version {})",
            c.index,
            now.version
        );
        ensure!(
            now.replicas.iter().any(|p| p.current),
            "chunk {} has no current replica",
            c.index
        );
    }
    info!(
        versions = ?after.iter().map(|c| (c.index, c.version)).collect::<Vec<_>>(),
        "meta bumped the rewritten chunks and left the stopped server out"
    );

    info!(victim, "restarting the stopped chunk server");
    cluster.restart_chunk(victim)?;
    wait_chunk_servers_serving(&cluster, &meta).await?;

    info!("reading the file 30 times through fresh clients and opens");
    let mut rng = StdRng::seed_from_u64(17);
    for round in 0..30 {
        // A fresh DataClient each time: no connection or handle state carried over.
        let data = DataClient::new(meta.clone());
        let f = data.open(ino, libc::O_RDONLY as u32).await?;
        ensure!(f.size() == size, "round {round}: size {}", f.size());
        if round % 5 == 0 {
            ensure!(
                hash_file(&f).await? == want_hash,
                "round {round}: whole-file read returned old data"
            );
        } else {
            for _ in 0..8 {
                let off = rng.gen_range(0..size);
                let len = rng.gen_range(1..(600 * KIB) as usize);
                let got = f.read_at(off, len).await?;
                let want = expected(off, (len as u64).min(size - off) as usize);
                ensure!(
                    got == want,
                    "round {round}: read at {off}+{len} returned old data"
                );
            }
        }
        f.close().await?;
    }

    info!("asking the restarted server directly for the new versions");
    let mut rpc = cluster.chunk_rpc(cluster.chunk_addr(victim)).await?;
    let after = chunk_table(&meta, ino).await?.1;
    for c in &rewritten {
        let now = after
            .iter()
            .find(|a| a.index == c.index)
            .context("chunk gone")?;
        let chunk_id = now
            .replicas
            .iter()
            .find(|p| p.address == victim_addr)
            .map(|p| p.chunk_id)
            .context("victim placement gone")?;
        let req = kerfs_proto::ChunkReadRequest {
            chunk_id,
            version: now.version,
            offset: 0,
            length: chunk,
        };
        let status = match rpc.read(req).await {
            Err(s) => s,
            Ok(resp) => match resp.into_inner().message().await {
                Err(s) => s,
                Ok(frame) => {
                    // Background repair may have brought it up to date since it came back:
                    // then it must serve the new data, never the old.
                    let frame = frame.context("empty read stream")?;
                    ensure!(
                        frame.data == expected(c.index * chunk + frame.offset, frame.data.len()),
                        "server {victim} served chunk {} at version {} with data it missed (the old version's)",
                        c.index,
                        now.version
                    );
                    info!(chunk = c.index, "repaired meanwhile: serves the new data");
                    continue;
                }
            },
        };
        info!(chunk = c.index, version = now.version, code = ?status.code(), message = status.message(), "refused");
        if status.code() == tonic::Code::NotFound {
            // A repair is replacing the stale copy right now: nothing old is served.
            continue;
        }
        ensure!(
            status.code() == tonic::Code::FailedPrecondition && status.message().contains("stale"),
            "chunk {}: want FAILED_PRECONDITION \"stale\", got {:?}: {}",
            c.index,
            status.code(),
            status.message()
        );
        let stat = match rpc.stat(kerfs_proto::ChunkStatRequest { chunk_id }).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => continue, // being repaired
            Err(s) => return Err(s.into()),
        };
        let repaired_since = stat.version == now.version
            && chunk_table(&meta, ino).await?.1.iter().any(|t| {
                t.index == c.index
                    && t.replicas
                        .iter()
                        .any(|p| p.address == victim_addr && p.current)
            });
        ensure!(
            stat.version < now.version || repaired_since,
            "server {victim} claims version {} of chunk {} it never received (meta: {})",
            stat.version,
            c.index,
            now.version
        );
    }
    // The chunks that were not rewritten are still current there and still served.
    for c in held.iter().filter(|c| !(1..=4).contains(&c.index)) {
        let now = after
            .iter()
            .find(|a| a.index == c.index)
            .context("chunk gone")?;
        let p = now
            .replicas
            .iter()
            .find(|p| p.address == victim_addr)
            .context("placement gone")?;
        ensure!(p.current, "chunk {} lost its untouched replica", c.index);
        let mut stream = rpc
            .read(kerfs_proto::ChunkReadRequest {
                chunk_id: p.chunk_id,
                version: now.version,
                offset: 0,
                length: 4096,
            })
            .await?
            .into_inner();
        let frame = stream.message().await?.context("no frame")?;
        ensure!(
            frame.data == expected(c.index * chunk, frame.data.len()),
            "untouched chunk {} differs on the restarted server",
            c.index
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- b. whole-cluster restart

/// A file the restart test wrote and what it must read back as.
struct Written {
    dir: u64,
    name: String,
    size: u64,
    hash: blake3::Hash,
}

/// Writes the restart test's files: R=2 and EC 4+2, a few MiB to 64 MiB, one sparse, one
/// overwritten in the middle.
async fn write_restart_files(meta: &MetaClient, data: &DataClient) -> Result<Vec<Written>> {
    let r2 = layout_dir(meta, "r2", replicated(2, 8 * MIB)).await?;
    let ec = layout_dir(meta, "ec", erasure(4, 2, 8 * MIB)).await?;
    let mut out = Vec::new();
    for (dir, name, seed, size) in [
        (r2, "small", 1u8, 3 * MIB + 123),
        (r2, "big", 2, 64 * MIB),
        (ec, "small", 3, 5 * MIB + 77),
        (ec, "big", 4, 40 * MIB),
    ] {
        let t = Instant::now();
        let f = data.create(dir, name.as_bytes(), 0o644, true).await?;
        write_stream(&f, seed, 0, size).await?;
        f.close().await?;
        info!(name, dir, size, secs = t.elapsed().as_secs_f64(), "written");
        out.push(Written {
            dir,
            name: name.into(),
            size,
            hash: expected_hash(seed, size),
        });
    }
    // Sparse (a hole over a whole chunk) and overwritten in the middle, both layouts.
    for (dir, label) in [(r2, "r2"), (ec, "ec")] {
        let mut model = vec![0u8; (20 * MIB + 5) as usize];
        let f = data.create(dir, b"sparse", 0o644, true).await?;
        for (off, len, seed) in [(0, MIB, 5u8), (19 * MIB + 5, MIB, 6)] {
            let bytes = content(seed, off, len as usize);
            f.write_at(off, &bytes).await?;
            model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
        }
        f.close().await?;
        out.push(Written {
            dir,
            name: "sparse".into(),
            size: model.len() as u64,
            hash: blake3::hash(&model),
        });

        let mut model = content(7, 0, (16 * MIB) as usize);
        let f = data.create(dir, b"overwritten", 0o644, true).await?;
        f.write_at(0, &model).await?;
        f.fsync().await?;
        let (off, len) = (6 * MIB + 1, 3 * MIB);
        let bytes = content(8, off, len as usize);
        f.write_at(off, &bytes).await?;
        model[off as usize..(off + len) as usize].copy_from_slice(&bytes);
        f.close().await?;
        out.push(Written {
            dir,
            name: "overwritten".into(),
            size: model.len() as u64,
            hash: blake3::hash(&model),
        });
        info!(layout = label, "sparse and overwritten files written");
    }
    Ok(out)
}

async fn verify_files(meta: &MetaClient, data: &DataClient, files: &[Written]) -> Result<()> {
    for w in files {
        let attr = meta
            .lookup(w.dir, w.name.as_bytes())
            .await
            .with_context(|| format!("lookup of {} in dir {}", w.name, w.dir))?;
        ensure!(
            attr.size == w.size,
            "{} in dir {}: size {} want {}",
            w.name,
            w.dir,
            attr.size,
            w.size
        );
        let f = data.open(attr.ino, libc::O_RDONLY as u32).await?;
        let got = hash_file(&f)
            .await
            .with_context(|| format!("reading {} in dir {}", w.name, w.dir))?;
        f.close().await?;
        ensure!(
            got == w.hash,
            "{} in dir {} ({} bytes) reads back different after the restart",
            w.name,
            w.dir,
            w.size
        );
    }
    Ok(())
}

async fn whole_cluster_restart(kill9: bool) -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let mut cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: 6,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());
    info!("writing R=2 and EC 4+2 files on 6 chunk servers");
    let files = write_restart_files(&meta, &data).await?;
    let total: u64 = files.iter().map(|w| w.size).sum();
    info!(
        files = files.len(),
        mib = total / MIB,
        "every file closed (acknowledged)"
    );
    verify_files(&meta, &data, &files)
        .await
        .context("before the restart")?;

    let how = if kill9 { "SIGKILL" } else { "SIGTERM" };
    info!(how, "stopping every chunk server and every metadata node");
    let chunk_ids: Vec<u64> = cluster.chunks.keys().copied().collect();
    let meta_ids: Vec<u64> = cluster.meta.nodes.keys().copied().collect();
    for &i in &chunk_ids {
        if kill9 {
            cluster.kill9_chunk(i)?;
        } else {
            cluster.stop_chunk(i)?;
        }
    }
    for &id in &meta_ids {
        if kill9 {
            cluster.meta.kill9(id)?;
        } else {
            cluster.meta.stop(id)?;
        }
    }
    drop(data);
    drop(meta);

    info!("restarting everything: metadata nodes first, then chunk servers");
    for &id in &meta_ids {
        cluster.meta.restart(id)?;
    }
    for &i in &chunk_ids {
        cluster.restart_chunk(i)?;
    }
    let meta = cluster.client().await?;
    let leader = cluster
        .meta
        .wait_leader(&meta, Duration::from_secs(30))
        .await?;
    info!(leader, "metadata service has a leader again");
    wait_chunk_servers_serving(&cluster, &meta).await?;
    let data = DataClient::new(meta.clone());

    info!("reading every file back through a fresh client");
    let t = Instant::now();
    verify_files(&meta, &data, &files)
        .await
        .with_context(|| format!("after a whole-cluster restart with {how}"))?;
    info!(
        secs = t.elapsed().as_secs_f64(),
        "every file identical after the restart"
    );

    info!("the restarted cluster takes new writes, and overwrites of old files");
    let w = &files[0];
    let attr = meta.lookup(w.dir, w.name.as_bytes()).await?;
    let f = data.open(attr.ino, libc::O_RDWR as u32).await?;
    write_stream(&f, 9, 0, w.size).await?;
    f.close().await?;
    let f = data.open(attr.ino, libc::O_RDONLY as u32).await?;
    ensure!(
        hash_file(&f).await? == expected_hash(9, w.size),
        "overwrite after the restart reads back different"
    );
    f.close().await?;
    verify_files(&meta, &data, &files[1..]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_sigterm_every_file_identical() -> Result<()> {
    whole_cluster_restart(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_kill9_every_file_identical() -> Result<()> {
    whole_cluster_restart(true).await
}

// ---------------------------------------------------------------- c. disk full

/// A tmpfs mounted for the life of the value; unmounted on drop (even when the test fails).
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    fn mount(path: &Path, size: &str) -> Result<TmpfsMount> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .context("running mount(8)")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs -o size={size} tmpfs {} failed ({}): {} — this test needs root and a kernel that allows tmpfs mounts",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())
            .expect("path without NUL");
        // SAFETY: umount2(2) with a valid C string. Lazy, so that a process still holding a
        // file there (a chunk server that outlived the test) cannot keep the mount forever.
        let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if r != 0 {
            eprintln!(
                "unmounting the test tmpfs at {} failed: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

fn statvfs_free(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(2) into a zeroed struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        bail!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(s.f_bavail * s.f_frsize)
}

/// Runs a write (or close) with a deadline: a full disk must give an answer, not a hang.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<Result<T, ClientError>> {
    match tokio::time::timeout(Duration::from_secs(45), fut).await {
        Ok(r) => Ok(r),
        Err(_) => bail!("{what}: no answer within 45 s on a full disk (hang)"),
    }
}

fn is_clear_space_error(e: &ClientError) -> bool {
    matches!(e.errno(), libc::ENOSPC | libc::EIO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_writes_fail_over_or_fail_clearly_and_acked_data_survives() -> Result<()> {
    init_tracing();
    let _serial = SERIAL.lock().await;
    // Drop order (reverse of declaration): cluster (kills the servers), then the mount, then
    // the directory.
    let mnt_dir = tempfile::Builder::new().prefix("kerfs-tmpfs-").tempdir()?;
    let full_dir = mnt_dir.path().join("chunk3");
    std::fs::create_dir_all(&full_dir)?;
    let _mount = TmpfsMount::mount(&full_dir, "32m")?;
    info!(dir = %full_dir.display(), free = statvfs_free(&full_dir)?, "chunk server 3's data dir is a 32 MiB tmpfs");
    let cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: 3,
        chunk_data_dirs: vec![None, None, Some(full_dir.clone())],
        ..Default::default()
    })
    .await?;
    ensure!(cluster.chunk_data_dir(3) == full_dir);
    let full_addr = cluster.chunk_addr(3).to_string();
    let meta = cluster.client().await?;
    let data = DataClient::new(meta.clone());

    // Phase 1: R=1 files with 16 MiB chunks, 100 KiB each, placed round-robin while server 3
    // is empty: some of them live on server 3 only.
    let r1 = layout_dir(&meta, "r1", replicated(1, 16 * MIB)).await?;
    let small = 100 * KIB;
    let mut on_full = Vec::new();
    for i in 0..6u8 {
        let name = format!("r1-{i}");
        let f = data.create(r1, name.as_bytes(), 0o644, true).await?;
        write_stream(&f, 20 + i, 0, small).await?;
        f.close().await?;
        let table = chunk_table(&meta, f.ino()).await?.1;
        if table
            .iter()
            .any(|c| c.replicas.iter().any(|p| p.address == full_addr))
        {
            on_full.push((i, f.ino()));
        }
    }
    info!(on_server_3 = ?on_full, "phase 1: six 100 KiB R=1 files written");
    ensure!(
        !on_full.is_empty(),
        "no R=1 file was placed on server 3; cannot test writes that have nowhere else to go"
    );

    // Phase 2: 96 MiB of R=2 files (4 MiB chunks): about 64 MiB of replicas aimed at server
    // 3, which holds 32. Every write must succeed by failing over to servers 1 and 2, or fail
    // with a clear error.
    let r2 = layout_dir(&meta, "r2", replicated(2, 4 * MIB)).await?;
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let t = Instant::now();
    for i in 0..12u8 {
        let name = format!("r2-{i}");
        let size = 8 * MIB;
        let f = data.create(r2, name.as_bytes(), 0o644, true).await?;
        let w = bounded(&format!("write of {name}"), async {
            let mut pos = 0;
            while pos < size {
                let n = MIB.min(size - pos) as usize;
                f.write_at(pos, &content(40 + i, pos, n)).await?;
                pos += n as u64;
            }
            Ok(())
        })
        .await?;
        let c = bounded(&format!("close of {name}"), f.close()).await?;
        match w.and(c) {
            Ok(()) => acked.push((r2, name, 40 + i, size)),
            Err(e) => {
                warn!(file = %name, error = %e, errno = e.errno(), "R=2 write refused");
                ensure!(
                    is_clear_space_error(&e),
                    "{name}: write failed with errno {} ({e}), want ENOSPC or EIO",
                    e.errno()
                );
                failed.push(name);
            }
        }
    }
    let free = statvfs_free(&full_dir)?;
    info!(
        acked = acked.len(),
        failed = failed.len(),
        free,
        secs = t.elapsed().as_secs_f64(),
        "phase 2: 96 MiB of R=2 files written"
    );
    ensure!(
        failed.is_empty(),
        "R=2 writes failed although two servers had room: {failed:?}"
    );
    ensure!(
        free < 16 * MIB - small,
        "server 3's tmpfs still has {free} bytes free after 96 MiB of R=2 writes: placement did not fill it"
    );
    let table_servers = |t: &[FileChunk]| -> Vec<Vec<(String, bool)>> {
        t.iter()
            .map(|c| {
                c.replicas
                    .iter()
                    .map(|p| (p.address.clone(), p.current))
                    .collect()
            })
            .collect()
    };
    let mut degraded = 0;
    for (dir, name, _, _) in &acked {
        let attr = meta.lookup(*dir, name.as_bytes()).await?;
        for c in chunk_table(&meta, attr.ino).await?.1 {
            let current = c.replicas.iter().filter(|p| p.current).count();
            ensure!(
                current >= 1,
                "{name} chunk {} has no current replica",
                c.index
            );
            if current < 2 {
                degraded += 1;
            }
        }
    }
    info!(
        degraded,
        "R=2 chunks left with one current replica (their copy on the full server failed)"
    );

    // Phase 3: grow the R=1 files that live only on the full server to 16 MiB: the chunk
    // cannot move, so the write must fail with ENOSPC (or EIO), quickly, and lose nothing.
    let mut refused = 0;
    for &(i, ino) in &on_full {
        let f = data.open(ino, libc::O_RDWR as u32).await?;
        let w = bounded("growing an R=1 file on the full server", async {
            let mut pos = small;
            while pos < 16 * MIB {
                let n = MIB.min(16 * MIB - pos) as usize;
                f.write_at(pos, &content(60 + i, pos, n)).await?;
                pos += n as u64;
            }
            Ok(())
        })
        .await?;
        let c = bounded("close after growing", f.close()).await?;
        match w.and(c) {
            Ok(()) => bail!(
                "r1-{i}: 16 MiB written to a chunk on a server with {free} bytes free, and acknowledged"
            ),
            Err(e) => {
                info!(file = i, errno = e.errno(), error = %e, "refused as expected");
                ensure!(
                    e.errno() == libc::ENOSPC || e.errno() == libc::EIO,
                    "r1-{i}: failed with errno {} ({e}), want ENOSPC or EIO",
                    e.errno()
                );
                if e.errno() != libc::ENOSPC {
                    warn!(file = i, "disk full reported as EIO, not ENOSPC");
                }
                refused += 1;
            }
        }
    }
    ensure!(refused == on_full.len());
    let metrics = {
        use std::io::{Read, Write};
        let addr = &cluster.chunks[&3].metrics_addr;
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        out
    };
    let no_space = metrics
        .lines()
        .find(|l| l.starts_with("kerfs_chunk_no_space_errors_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .context("server 3 exports no kerfs_chunk_no_space_errors_total")?;
    info!(no_space, "server 3 counted ENOSPC errors");
    ensure!(no_space > 0.0, "server 3 never reported a full disk");

    // Phase 4: everything acknowledged reads back, through fresh opens.
    info!("phase 4: reading back every acknowledged file");
    let data = DataClient::new(meta.clone());
    for (dir, name, seed, size) in &acked {
        let attr = meta.lookup(*dir, name.as_bytes()).await?;
        ensure!(attr.size == *size, "{name}: size {} want {size}", attr.size);
        let f = data.open(attr.ino, libc::O_RDONLY as u32).await?;
        let got = hash_file(&f).await?;
        f.close().await?;
        if got != expected_hash(*seed, *size) {
            bail!(
                "{name}: acknowledged data reads back different; chunk table {:?}",
                table_servers(&chunk_table(&meta, attr.ino).await?.1)
            );
        }
    }
    for i in 0..6u8 {
        let attr = meta.lookup(r1, format!("r1-{i}").as_bytes()).await?;
        let f = data.open(attr.ino, libc::O_RDONLY as u32).await?;
        let got = f.read_at(0, (2 * small) as usize).await?;
        f.close().await?;
        // A refused grow must not have changed the acknowledged 100 KiB; the size may not
        // have moved either (nothing of the grow was acknowledged).
        ensure!(
            attr.size == small,
            "r1-{i}: size {} after a refused grow, want {small}",
            attr.size
        );
        ensure!(
            got == content(20 + i, 0, small as usize),
            "r1-{i}: acknowledged 100 KiB read back different"
        );
    }
    info!(
        acked = acked.len(),
        "every acknowledged write read back intact"
    );
    Ok(())
}
