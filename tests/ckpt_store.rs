//! The checkpoint store on a real cluster with real processes: `krg checkpoint --to kerfs:`,
//! restart from another mount namespace, incremental (deduplicated) versions, kill -9 of krg
//! and of a chunk server mid-checkpoint, corrupted pack chunks, GC next to a running
//! checkpoint, and fds whose contents a version carries (internal pipes, deleted files,
//! socketpair queues), sockets bound again, or fds that refuse the checkpoint. Needs root (ptrace, PID namespaces, unshare -m).
//!
//! Build the binaries first: `cargo build --workspace --bins` (scripts/test does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_ckpt::Store;
use kerfs_client::{DataClient, MetaClient};
use kerfs_ghost::GhostReader;
use kerfs_tests::*;
use tracing::info;

const MIB: u64 = 1 << 20;

/// One test at a time: each runs a cluster and big processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster with `servers` chunk servers and a `/ckpt` directory of R=2, 8 MiB chunks.
async fn start(servers: u64) -> Result<(KerfsCluster, MetaClient)> {
    require_root_and_fuse();
    init_tracing();
    let cluster = KerfsCluster::start(KerfsClusterOptions {
        chunk_servers: servers,
        ..Default::default()
    })
    .await?;
    let meta = cluster.client().await?;
    layout_dir(&meta, "ckpt", replicated(2, 8 * MIB)).await?;
    Ok((cluster, meta))
}

/// The test program: `mb` MiB heap of pattern `seed` (every page distinct), counting into
/// `log`.
fn spawn_heap(prog: &Path, mb: u64, log: &Path, seed: u64) -> Result<Child> {
    spawn_heap_mode(prog, mb, log, seed, "distinct")
}

/// [`spawn_heap`] with the program's MODE (which pages share content, see tests/c/ckpt_heap.c).
/// Only stdio (on /dev/null) is inherited: cargo's jobserver pipe could not be restored.
fn spawn_heap_mode(prog: &Path, mb: u64, log: &Path, seed: u64, mode: &str) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(prog);
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    Ok(c.arg(mb.to_string())
        .arg(log)
        .arg(seed.to_string())
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn counters(s: &str) -> Vec<u64> {
    s.lines().filter_map(|l| l.parse().ok()).collect()
}

/// Asks the program to check its memory and returns the "CHECK ..." line.
fn check_memory(pid: i32, log: &Path) -> Result<String> {
    let before = read(log).matches("CHECK").count();
    signal(pid, libc::SIGUSR2);
    let s = wait_log(log, "the memory check", 60, |s| {
        s.matches("CHECK").count() > before
    })?;
    Ok(s.lines()
        .rfind(|l| l.starts_with("CHECK"))
        .unwrap_or_default()
        .to_string())
}

fn kill_all(prog: &Path) {
    for pid in pids_of(prog) {
        signal(pid, libc::SIGKILL);
    }
}

fn kill_child(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Restarts `addr` elsewhere and checks the restored program's memory; returns its pid.
/// The log is emptied first: a restored program writes at the offset its fd had at the
/// checkpoint, below lines a later run left, which would confuse the reading of the log.
fn restore_and_check(
    cluster: &KerfsCluster,
    addr: &str,
    prog: &Path,
    log: &Path,
    muts: u32,
) -> Result<i32> {
    kill_all(prog);
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    restore_and_check_log(cluster, addr, prog, log, muts)
}

/// [`restore_and_check`] keeping the log as it is.
fn restore_and_check_log(
    cluster: &KerfsCluster,
    addr: &str,
    prog: &Path,
    log: &Path,
    muts: u32,
) -> Result<i32> {
    kill_all(prog);
    let n = counters(&read(log)).len();
    let out = restart_elsewhere(cluster, addr)?;
    ensure!(
        out.status.success(),
        "restart of {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_log(log, "counting after restart", 60, |s| {
        counters(s).len() >= n + 5
    })?;
    let pids = pids_of(prog);
    ensure!(
        pids.len() == 1,
        "exactly one restored process, found {pids:?}"
    );
    let line = check_memory(pids[0], log)?;
    ensure!(
        line == format!("CHECK OK {muts}"),
        "restored memory of {addr} is wrong: {line:?} (want CHECK OK {muts})"
    );
    Ok(pids[0])
}

async fn open_store(meta: &MetaClient, path: &str) -> Result<Store> {
    Ok(Store::open(DataClient::new(meta.clone()), path, false).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_kill_and_restart_on_another_node() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let child = spawn_heap(&prog, 16, &log, 1)?;
    let pid = child.id() as i32;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 5)?;
    signal(pid, libc::SIGUSR1);
    wait_log(&log, "a rewrite", 30, |s| s.contains("MUT 1"))?;
    krg_ok(
        &cluster,
        &[
            "checkpoint",
            &pid.to_string(),
            "--to",
            "kerfs:/ckpt/t1",
            "--kill",
        ],
    )?;
    kill_child(child);
    let s = read(&log);
    let n = counters(&s).len();
    let ls = krg_ok(&cluster, &["ls", "kerfs:/ckpt/t1"])?;
    ensure!(
        ls.lines().any(|l| l.split_whitespace().next() == Some("1")),
        "krg ls does not show version 1:\n{ls}"
    );
    let restored = restore_and_check_log(&cluster, "kerfs:/ckpt/t1", &prog, &log, 1)?;
    // The counter continues exactly where the checkpoint stopped it.
    let c = counters(&read(&log));
    ensure!(c.len() > n + 5, "too few counters after restart");
    for (i, v) in c.iter().enumerate() {
        ensure!(
            *v == i as u64 + 1,
            "counter sequence broken at line {i}: {v}"
        );
    }
    signal(restored, libc::SIGKILL);
    let store = open_store(&meta, "/ckpt/t1").await?;
    ensure!(store.version_numbers().await? == vec![1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_incremental_checkpoints_store_only_new_pages() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let child = spawn_heap(&prog, 256, &log, 2)?;
    let pid = child.id() as i32;
    wait_log(&log, "counters", 60, |s| counters(s).len() >= 3)?;
    let mut times = Vec::new();
    for i in 0..10u32 {
        if i > 0 {
            signal(pid, libc::SIGUSR1);
            wait_log(&log, "a rewrite", 60, |s| s.contains(&format!("MUT {i}\n")))?;
        }
        let t = Instant::now();
        let pid = pid.to_string();
        let mut args = vec!["checkpoint", &pid, "--to", "kerfs:/ckpt/t2"];
        if i == 9 {
            // The last one kills the process: it still builds on the previous version.
            args.push("--kill");
        }
        krg_ok(&cluster, &args)?;
        times.push(t.elapsed());
    }
    let store = open_store(&meta, "/ckpt/t2").await?;
    let versions = store.versions().await?;
    ensure!(versions.len() == 10, "{} versions", versions.len());
    let full = versions[0].stats.image_bytes;
    ensure!(
        full > 256 * MIB,
        "the image of a 256 MiB heap is {full} bytes"
    );
    let packs = store.pack_bytes().await?;
    for v in &versions {
        info!(
            version = v.version,
            image = v.stats.image_bytes,
            new = v.stats.new_bytes,
            dedup = v.stats.dedup_pages,
            zero = v.stats.zero_pages,
            reused = v.stats.reused_pages,
            ms = v.stats.elapsed_ms,
            "version"
        );
    }
    eprintln!(
        "MEASURED full image {:.1} MiB written in {:?}; incrementals new bytes {:?} MiB; times {:?}; packs {:.1} MiB for {} MiB of images",
        full as f64 / MIB as f64,
        times[0],
        versions[1..]
            .iter()
            .map(|v| v.stats.new_bytes / MIB)
            .collect::<Vec<_>>(),
        &times[1..],
        packs as f64 / MIB as f64,
        versions.iter().map(|v| v.stats.image_bytes).sum::<u64>() / MIB
    );
    ensure!(
        packs < 2 * full,
        "ten versions take {packs} bytes of packs, not under 2x one image ({full})"
    );
    for v in &versions[1..] {
        ensure!(
            v.stats.new_bytes * 10 <= full,
            "version {} wrote {} new bytes, more than 10% of a full image ({full})",
            v.version,
            v.stats.new_bytes
        );
        // Write tracking: the pages left alone since the previous version are neither read
        // nor hashed; what is read is the 5% rewritten plus the stack, libraries' data...
        let read = v.stats.read_bytes();
        ensure!(
            read * 10 <= full,
            "version {} read {read} bytes of memory, more than 10% of a full image ({full}): write tracking did not work",
            v.version
        );
        // 5% of the heap changed: at least that much must be new, or dedup lies.
        ensure!(
            v.stats.new_bytes >= 256 * MIB / 20,
            "version {} wrote only {} bytes although 12.8 MiB changed",
            v.version,
            v.stats.new_bytes
        );
    }
    kill_child(child);
    let t = Instant::now();
    let restored = restore_and_check(&cluster, "kerfs:/ckpt/t2", &prog, &log, 9)?;
    let restore_time = t.elapsed();
    signal(restored, libc::SIGKILL);
    // Baseline: the same bytes written through the client into the same layout.
    let data = DataClient::new(meta.clone());
    let dir = meta.resolve("/ckpt").await?;
    let t = Instant::now();
    let f = data.create(dir.ino, b"dd", 0o644, true).await?;
    let block = content(1, 0, 8 << 20);
    let mut off = 0;
    while off < full {
        f.write_at(off, &block).await?;
        off += block.len() as u64;
    }
    f.close().await?;
    eprintln!(
        "MEASURED restore of the latest version (incl. restart, 5 counters and a memory check) {restore_time:?}; writing {} MiB through the client: {:?}",
        off / MIB,
        t.elapsed()
    );
    // An older version restores too, with its own memory.
    let restored = restore_and_check(&cluster, "kerfs:/ckpt/t2@4", &prog, &log, 3)?;
    signal(restored, libc::SIGKILL);
    Ok(())
}

/// Write tracking is re-armed by every checkpoint, whichever store it goes to: after a
/// checkpoint into another store, the next one into the first store must read everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_into_another_store_resets_write_tracking() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let child = spawn_heap(&prog, 32, &log, 9)?;
    let pid = child.id().to_string();
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
    let mutate = |k: u32| {
        signal(child.id() as i32, libc::SIGUSR1);
        wait_log(&log, "a rewrite", 60, |s| s.contains(&format!("MUT {k}\n")))
    };
    info!("s1@1, then a rewrite and s1@2 built on it");
    krg_ok(&cluster, &["checkpoint", &pid, "--to", "kerfs:/ckpt/s1"])?;
    mutate(1)?;
    krg_ok(&cluster, &["checkpoint", &pid, "--to", "kerfs:/ckpt/s1"])?;
    info!("a rewrite, s2@1 (re-arms tracking), another rewrite, s1@3");
    mutate(2)?;
    krg_ok(&cluster, &["checkpoint", &pid, "--to", "kerfs:/ckpt/s2"])?;
    mutate(3)?;
    krg_ok(&cluster, &["checkpoint", &pid, "--to", "kerfs:/ckpt/s1"])?;
    kill_child(child);
    let s1 = open_store(&meta, "/ckpt/s1").await?.versions().await?;
    let s2 = open_store(&meta, "/ckpt/s2").await?.versions().await?;
    let full = s1[0].stats.page_bytes;
    ensure!(
        s1[1].stats.read_bytes() * 5 < full,
        "s1@2 read {} of {full} bytes: it should have built on s1@1",
        s1[1].stats.read_bytes()
    );
    for (what, v) in [("s2@1", &s2[0]), ("s1@3", &s1[2])] {
        ensure!(
            v.stats.reused_pages == 0,
            "{what} took {} pages as unchanged from a version whose changes it did not see",
            v.stats.reused_pages
        );
    }
    let pid = restore_and_check(&cluster, "kerfs:/ckpt/s1", &prog, &log, 3)?;
    signal(pid, libc::SIGKILL);
    Ok(())
}

/// Waits until a checkpoint writer's marker is in the store (the checkpoint has begun).
async fn wait_writer(meta: &MetaClient, path: &str, krg: &mut Child) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(dir) = meta.resolve(&format!("{path}/writers")).await {
            if !meta.readdir_all(dir.ino).await?.is_empty() {
                return Ok(());
            }
        }
        if let Some(st) = krg.try_wait()? {
            bail!("krg checkpoint ended ({st}) before its writer marker was seen");
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "no writer marker after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the checkpoint has written pack data (pack bytes grew past `before`).
async fn wait_pack_growth(store: &Store, before: u64, krg: &mut Child) -> Result<()> {
    let t = Instant::now();
    loop {
        if store.pack_bytes().await? > before + 16 * MIB {
            return Ok(());
        }
        if let Some(st) = krg.try_wait()? {
            bail!("krg checkpoint ended ({st}) before it had written 16 MiB");
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "no pack growth after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_krg_or_chunk_server_leaves_previous_versions() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (mut cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let addr = "kerfs:/ckpt/t3";
    let a = spawn_heap(&prog, 32, &log, 3)?;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
    krg_ok(&cluster, &["checkpoint", &a.id().to_string(), "--to", addr])?;
    kill_child(a);
    let store = open_store(&meta, "/ckpt/t3").await?;

    // kill -9 of krg while it writes the pages of a new 256 MiB process.
    let log_b = d.path().join("log_b");
    let b = spawn_heap(&prog, 256, &log_b, 4)?;
    wait_log(&log_b, "counters", 60, |s| counters(s).len() >= 3)?;
    let before = store.pack_bytes().await?;
    let err1 = d.path().join("krg1.err");
    let mut k = krg_cmd(&cluster)?
        .args(["checkpoint", &b.id().to_string(), "--to", addr])
        .stderr(std::fs::File::create(&err1)?)
        .spawn()?;
    wait_pack_growth(&store, before, &mut k)
        .await
        .with_context(|| read(&err1))?;
    ensure!(
        k.try_wait()?.is_none(),
        "krg finished before it could be killed"
    );
    k.kill()?;
    k.wait()?;
    ensure!(
        store.version_numbers().await? == vec![1],
        "a killed checkpoint published a version"
    );
    ensure!(
        !store.uncommitted_entries().await?.is_empty(),
        "the killed checkpoint left no partial version: was it killed mid-way?"
    );
    let ls = krg_ok(&cluster, &["ls", addr])?;
    let rows: Vec<&str> = ls
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u64>().is_ok())
                && !l.contains("versions,")
        })
        .collect();
    ensure!(rows.len() == 1, "krg ls must list only version 1:\n{ls}");

    // The process whose export was cut is not reused: ghost leaves it a pending SIGTRAP of
    // its syscall injection, which kills it once its tracer is gone.
    kill_child(b);

    // kill -9 of a chunk server in the middle of another checkpoint.
    let b = spawn_heap(&prog, 256, &log_b, 4)?;
    wait_log(&log_b, "counters", 60, |s| counters(s).len() >= 3)?;
    let before = store.pack_bytes().await?;
    let err2 = d.path().join("krg2.err");
    let mut k = krg_cmd(&cluster)?
        .args(["checkpoint", &b.id().to_string(), "--to", addr])
        .stderr(std::fs::File::create(&err2)?)
        .spawn()?;
    wait_pack_growth(&store, before, &mut k)
        .await
        .with_context(|| read(&err2))?;
    cluster.kill9_chunk(2)?;
    let status = k.wait()?;
    info!(?status, stderr = %read(&err2), "checkpoint during chunk server kill");
    kill_child(b);
    let versions = store.version_numbers().await?;
    ensure!(
        versions.first() == Some(&1),
        "version 1 vanished: {versions:?}"
    );
    ensure!(
        status.success() == (versions.len() == 2),
        "krg said {status:?} but the store has versions {versions:?}"
    );
    let pid = restore_and_check(&cluster, &format!("{addr}@1"), &prog, &log, 0)?;
    signal(pid, libc::SIGKILL);
    if let Some(&v) = versions.get(1) {
        // Published although a server died: it must be whole.
        let pid = restore_and_check(&cluster, &format!("{addr}@{v}"), &prog, &log_b, 0)?;
        signal(pid, libc::SIGKILL);
    }
    // GC clears what the killed krg left.
    let gc = krg_ok(&cluster, &["gc", addr])?;
    let left = store.uncommitted_entries().await?;
    ensure!(left.is_empty(), "gc left partial versions {left:?}: {gc}");
    let pid = restore_and_check(&cluster, &format!("{addr}@1"), &prog, &log, 0)?;
    signal(pid, libc::SIGKILL);
    Ok(())
}

/// Damages every block file of `ino`'s chunks on the chunk server at `address`: one byte in
/// every 64 KiB block gets +1 (so damaging twice never undoes it).
async fn damage_replica(
    cluster: &KerfsCluster,
    meta: &MetaClient,
    ino: u64,
    replica: usize,
) -> Result<usize> {
    let reply = meta
        .read(kerfs_client::proto::read_op::Op::GetChunks(
            kerfs_client::proto::GetChunks {
                ino,
                first_index: 0,
                count: 0,
            },
        ))
        .await?;
    let mut damaged = 0;
    for chunk in &reply.chunks {
        let Some(place) = chunk.replicas.get(replica) else {
            continue;
        };
        let server = cluster.server_index(&place.address)?;
        let path = cluster
            .chunk_data_dir(server)
            .join("chunks")
            .join(format!("{:02x}", place.chunk_id & 0xff))
            .join(format!("{:016x}.data", place.chunk_id));
        let mut bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let mut i = 777;
        while i < bytes.len() {
            bytes[i] = bytes[i].wrapping_add(1);
            i += 64 * 1024;
        }
        std::fs::write(&path, &bytes)?;
        damaged += 1;
    }
    Ok(damaged)
}

/// A store `/ckpt/APP` holding one version of one process (an `mb` MiB heap) in one pack.
struct OnePack {
    cluster: KerfsCluster,
    meta: MetaClient,
    _dir: tempfile::TempDir,
    prog: PathBuf,
    log: PathBuf,
    addr: String,
    pack: String,
    pack_ino: u64,
}

async fn one_pack_version(app: &str, mb: u64, seed: u64) -> Result<OnePack> {
    let (cluster, meta) = start(3).await?;
    let dir = tempfile::tempdir()?;
    let prog = build(dir.path(), "ckpt_heap")?;
    let log = dir.path().join("log");
    let addr = format!("kerfs:/ckpt/{app}");
    let a = spawn_heap(&prog, mb, &log, seed)?;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
    krg_ok(
        &cluster,
        &["checkpoint", &a.id().to_string(), "--to", &addr, "--kill"],
    )?;
    kill_child(a);
    let store = open_store(&meta, &format!("/ckpt/{app}")).await?;
    let mut packs = store.pack_names().await?;
    ensure!(packs.len() == 1, "one pack expected: {packs:?}");
    let pack = packs.remove(0);
    let pack_dir = meta.resolve(&format!("/ckpt/{app}/packs")).await?;
    let pack_ino = meta
        .lookup(pack_dir.ino, format!("{pack}.pack").as_bytes())
        .await?
        .ino;
    Ok(OnePack {
        cluster,
        meta,
        _dir: dir,
        prog,
        log,
        addr,
        pack,
        pack_ino,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pack_replica_is_read_around_and_lost_data_named() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let OnePack {
        cluster,
        meta,
        prog,
        log,
        addr,
        pack,
        pack_ino,
        _dir,
    } = one_pack_version("t4", 32, 5).await?;
    let addr = addr.as_str();
    let n = damage_replica(&cluster, &meta, pack_ino, 0).await?;
    ensure!(n >= 4, "only {n} chunks of a 32 MiB pack damaged");
    let pid = restore_and_check(&cluster, addr, &prog, &log, 0)?;
    signal(pid, libc::SIGKILL);

    damage_replica(&cluster, &meta, pack_ino, 1).await?;
    kill_all(&prog);
    let out = restart_elsewhere(&cluster, addr)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "a version with every copy damaged restored"
    );
    ensure!(
        err.contains("version 1") && err.contains(&format!("packs/{}.pack", pack)),
        "the refusal does not name the version and the pack: {err}"
    );
    ensure!(
        pids_of(&prog).is_empty(),
        "a process was started from damaged data"
    );
    Ok(())
}

/// Damage the storage layer cannot see (a pack page rewritten through the client, with fresh
/// block checksums) is caught by the pack index's page hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_page_rewritten_through_the_client_is_refused() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let OnePack {
        cluster,
        meta,
        prog,
        addr,
        pack,
        pack_ino,
        _dir,
        log: _,
    } = one_pack_version("t8", 16, 8).await?;
    info!("overwriting page 100 of the pack through the client");
    let data = DataClient::new(meta.clone());
    let f = data.open(pack_ino, libc::O_RDWR as u32).await?;
    f.write_at(100 * 4096, &[0xAB; 4096]).await?;
    f.close().await?;
    let out = restart_elsewhere(&cluster, &addr)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "a version with a wrong page restored"
    );
    ensure!(
        err.contains("version 1")
            && err.contains(&format!("packs/{}.pack", pack))
            && err.contains("page 100"),
        "the refusal does not name the version, the pack and the page: {err}"
    );
    ensure!(
        pids_of(&prog).is_empty(),
        "a process was started from damaged data"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_during_checkpoint_keeps_the_pages_it_needs() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let addr = "kerfs:/ckpt/t5";
    // Version 1 holds the pages; removing it leaves its pack referenced by nothing.
    let a = spawn_heap(&prog, 128, &log, 6)?;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
    krg_ok(&cluster, &["checkpoint", &a.id().to_string(), "--to", addr])?;
    kill_child(a);
    let store = open_store(&meta, "/ckpt/t5").await?;
    let old_packs = store.pack_names().await?;
    krg_ok(&cluster, &["rm", &format!("{addr}@1")])?;
    ensure!(store.version_numbers().await?.is_empty());

    // A process with the same pages: its checkpoint deduplicates against that pack.
    let b = spawn_heap(&prog, 128, &log, 6)?;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
    let mut k = krg_cmd(&cluster)?
        .args(["checkpoint", &b.id().to_string(), "--to", addr])
        .stderr(Stdio::piped())
        .spawn()?;
    wait_writer(&meta, "/ckpt/t5", &mut k).await?;
    // Hold the checkpoint in the middle while GC runs.
    signal(k.id() as i32, libc::SIGSTOP);
    let gc = krg(&cluster, &["gc", addr, "--keep-last", "1"]);
    signal(k.id() as i32, libc::SIGCONT);
    let gc = gc?;
    let gc_err = String::from_utf8_lossy(&gc.stderr);
    ensure!(gc.status.success(), "gc failed: {gc_err}");
    ensure!(
        gc_err.contains("being written"),
        "gc did not see the running checkpoint: {gc_err}"
    );
    for p in &old_packs {
        ensure!(
            store.pack_names().await?.contains(p),
            "gc deleted pack {p} while a checkpoint was being written"
        );
    }
    let out = k.wait_with_output()?;
    ensure!(
        out.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let versions = store.versions().await?;
    ensure!(versions.len() == 1, "{} versions", versions.len());
    let v = &versions[0];
    ensure!(
        v.stats.new_bytes * 10 < v.stats.image_bytes,
        "the same pages in another process were stored again: {} new of {}",
        v.stats.new_bytes,
        v.stats.image_bytes
    );
    // Now nothing is being written: GC runs fully, and must keep what the version needs.
    let gc = krg_ok(&cluster, &["gc", addr])?;
    ensure!(!gc.contains("being written"), "{gc}");
    for p in &old_packs {
        ensure!(
            store.pack_names().await?.contains(p),
            "gc deleted pack {p} that version {} references",
            v.version
        );
    }
    kill_child(b);
    let pid = restore_and_check(&cluster, &format!("{addr}@{}", v.version), &prog, &log, 0)?;
    signal(pid, libc::SIGKILL);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_checkpoints_of_an_app_with_copied_files() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let log = d.path().join("log");
    let app = format!("t6app{}", std::process::id());
    let mut run = krg_cmd(&cluster)?
        .args(["run", "--app", &app, "--"])
        .arg(&prog)
        .args(["8", log.to_str().context("path")?, "9"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        let err = run.stderr.take().context("stderr")?;
        std::io::BufReader::new(err).read_line(&mut line)?;
    }
    // "krg: PROG runs as pid N (pid 2 in its own PID namespace)"
    let pid: i32 = line
        .split("as pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("unexpected krg run output: {line}"))?;
    wait_log(&log, "counters", 30, |s| counters(s).len() >= 5)?;
    let err = d.path().join("periodic.err");
    let mut periodic = krg_cmd(&cluster)?
        .args([
            "checkpoint",
            "--app",
            &app,
            "--copy-files",
            "--periodic",
            "1s",
        ])
        .args(["--keep-last", "2"])
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let path = format!("/ckpt/{app}");
    let t = Instant::now();
    let store = loop {
        if let Ok(store) = open_store(&meta, &path).await {
            if store
                .version_numbers()
                .await?
                .last()
                .is_some_and(|&v| v >= 4)
            {
                break store;
            }
        }
        ensure!(
            periodic.try_wait()?.is_none(),
            "periodic krg stopped early: {}",
            read(&err)
        );
        ensure!(
            t.elapsed() < Duration::from_secs(90),
            "fewer than 4 versions in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The application ends: the periodic checkpoints stop by themselves.
    signal(pid, libc::SIGKILL);
    run.wait()?;
    let t = Instant::now();
    let status = loop {
        if let Some(st) = periodic.try_wait()? {
            break st;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "periodic krg did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(status.success(), "periodic krg failed: {}", read(&err));
    let versions = store.version_numbers().await?;
    ensure!(versions.len() == 2, "--keep-last 2 left {versions:?}");
    ensure!(store.uncommitted_entries().await?.is_empty());
    let latest = *versions.last().context("no version")?;
    let m = store.manifest(latest).await?;
    ensure!(
        m.files.iter().any(|f| Path::new(&f.path) == log),
        "the log was not copied: {:?}",
        m.files.iter().map(|f| &f.path).collect::<Vec<_>>()
    );
    // The program went on writing after the last checkpoint; the restart puts the log back as
    // it was then, so the restored program's lines follow on without a gap or a repeat.
    let before = counters(&read(&log)).len();
    let restored = restore_and_check_log(&cluster, &format!("kerfs:{path}"), &prog, &log, 0)?;
    let c = counters(&read(&log));
    for (i, v) in c.iter().enumerate() {
        ensure!(
            *v == i as u64 + 1,
            "counter sequence broken at line {i}: {v}"
        );
    }
    info!(before, after = c.len(), "log restored from the copy");
    signal(restored, libc::SIGKILL);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkpoints_publish_distinct_versions() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let addr = "kerfs:/ckpt/t7";
    let logs = [d.path().join("log_a"), d.path().join("log_b")];
    let mut apps = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        apps.push(spawn_heap(&prog, 16, log, 10 + i as u64)?);
        wait_log(log, "counters", 30, |s| counters(s).len() >= 3)?;
    }
    // Both writers start together and race for the same next version number.
    let krgs: Vec<Child> = apps
        .iter()
        .map(|a| {
            krg_cmd(&cluster)?
                .args(["checkpoint", &a.id().to_string(), "--to", addr, "--kill"])
                .stderr(Stdio::null())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    for mut k in krgs {
        ensure!(k.wait()?.success(), "a concurrent checkpoint failed");
    }
    let app_pids: Vec<i32> = apps.iter().map(|a| a.id() as i32).collect();
    for a in apps {
        kill_child(a);
    }
    let store = open_store(&meta, "/ckpt/t7").await?;
    ensure!(store.version_numbers().await? == vec![1, 2]);
    let mut pids = Vec::new();
    for v in [1, 2] {
        let m = store.manifest(v).await?;
        ensure!(m.processes.len() == 1);
        pids.push(m.processes[0].host_pid);
    }
    ensure!(pids[0] != pids[1], "both versions hold the same process");
    for (v, pid) in [1u64, 2].into_iter().zip(pids) {
        // Each version restores its own process, which writes to its own log.
        let i = app_pids
            .iter()
            .position(|&p| p == pid)
            .with_context(|| format!("version {v} holds pid {pid}, not one of {app_pids:?}"))?;
        let pid = restore_and_check(&cluster, &format!("{addr}@{v}"), &prog, &logs[i], 0)?;
        signal(pid, libc::SIGKILL);
    }
    Ok(())
}

/// Starts ghost/tests/c/holdfd (built into `dir`) in `mode`, stdio on /dev/null, logging to
/// `log`; returns it once it counts.
fn spawn_holdfd(dir: &Path, log: &Path, mode: &[&str]) -> Result<(PathBuf, Child)> {
    let started = spawn_ghost_prog(dir, "holdfd", log, mode)?;
    wait_log(log, "counters", 30, |s| counters(s).len() >= 3)?;
    Ok(started)
}

/// Builds ghost/tests/c/NAME.c into `dir` and starts it with `log` and `mode` as arguments,
/// stdio on /dev/null and no other fd inherited.
fn spawn_ghost_prog(dir: &Path, name: &str, log: &Path, mode: &[&str]) -> Result<(PathBuf, Child)> {
    use std::os::unix::process::CommandExt;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../ghost/tests/c/{name}.c"));
    let prog = dir.join(name);
    let st = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&prog)
        .arg(&src)
        .status()
        .context("gcc must be installed to build the test programs")?;
    ensure!(st.success(), "gcc failed on {}", src.display());
    let mut c = Command::new(&prog);
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    let child = c
        .arg(log)
        .args(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((prog, child))
}

/// Sends `sig` and returns the first log line starting with `prefix` that it produced.
fn ask(pid: i32, sig: i32, log: &Path, prefix: &str) -> Result<String> {
    let count = |s: &str| s.lines().filter(|l| l.starts_with(prefix)).count();
    let before = count(&read(log));
    signal(pid, sig);
    let s = wait_log(log, prefix, 30, |s| count(s) > before)?;
    Ok(s.lines()
        .filter(|l| l.starts_with(prefix))
        .nth(before)
        .unwrap_or_default()
        .to_string())
}

/// holdfd in `mode` (built and logging in `dir`), checkpointed with `--kill` into
/// `kerfs:/ckpt/STORE` and restarted in another mount namespace; returns the restored
/// process and its log.
fn holdfd_through_the_store(
    cluster: &KerfsCluster,
    dir: &Path,
    mode: &[&str],
    store: &str,
) -> Result<(i32, PathBuf)> {
    std::fs::create_dir(dir)?;
    let log = dir.join("log");
    let (prog, child) = spawn_holdfd(dir, &log, mode)?;
    let pid = child.id().to_string();
    let store = format!("kerfs:/ckpt/{store}");
    krg_ok(cluster, &["checkpoint", &pid, "--to", &store, "--kill"])?;
    kill_child(child);
    let out = restart_elsewhere(cluster, &store)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pids = pids_of(&prog);
    ensure!(pids.len() == 1, "restored processes: {pids:?}");
    Ok((pids[0], log))
}

/// What fds carry goes through the store: a pipe with both ends in the process comes back
/// on another node with its buffered bytes, a file deleted while open with its contents; a
/// device is refused before any version is made, the process left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_contents_and_refusals_through_the_store() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;

    let pipe_dir = d.path().join("pipe");
    let (pid, log) = holdfd_through_the_store(&cluster, &pipe_dir, &["pipe-self"], "fdpipe")?;
    ensure!(ask(pid, libc::SIGUSR2, &log, "PING")? == "PING ok");
    let drained = ask(pid, libc::SIGHUP, &log, "DRAIN")?;
    ensure!(
        drained == "DRAIN 30005 ok ping|",
        "pipe after restart: {drained}"
    );
    signal(pid, libc::SIGKILL);

    let del_dir = d.path().join("deleted");
    let scratch = del_dir.join("scratch");
    let args = ["deleted", scratch.to_str().unwrap_or("")];
    let (pid, _) = holdfd_through_the_store(&cluster, &del_dir, &args, "fddel")?;
    let content = std::fs::read(format!("/proc/{pid}/fd/5"))?;
    let mut want = vec![b'x'; 5000];
    want.extend_from_slice(b"hello\n");
    ensure!(
        content == want,
        "the deleted file came back with other contents"
    );
    signal(pid, libc::SIGKILL);

    let dev_dir = d.path().join("device");
    std::fs::create_dir(&dev_dir)?;
    let log = dev_dir.join("log");
    let (_prog, child) = spawn_holdfd(&dev_dir, &log, &["device", "/dev/kmsg"])?;
    let pid = child.id().to_string();
    let out = krg(
        &cluster,
        &["checkpoint", &pid, "--to", "kerfs:/ckpt/fddev", "--kill"],
    )?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a device was checkpointed: {e}");
    ensure!(e.contains("fd 5: device /dev/kmsg"), "unclear refusal: {e}");
    let n = counters(&read(&log)).len();
    wait_log(&log, "counting after the refusal", 30, |s| {
        counters(s).len() >= n + 10
    })?;
    ensure!(
        open_store(&meta, "/ckpt/fddev").await.is_err(),
        "a refused checkpoint made a store"
    );
    kill_child(child);
    Ok(())
}

/// Sockets through the store: TCP listeners on 127.0.0.1 and [::1], a UDP socket, Unix
/// listeners on a path and an abstract name, and socketpairs with messages queued each way
/// (ghost/tests/c/sockets.c) come back from a version restarted in another mount namespace:
/// at their addresses, with their options, accepting connections, with their queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_through_the_store() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, _meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let (log, path) = (d.path().join("log"), d.path().join("srv.sock"));
    let port = loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        drop(l);
        if std::net::TcpListener::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            break port;
        }
    };
    let name = format!("krg-store-{}", std::process::id());
    let path_s = path.to_str().context("temporary path is not UTF-8")?;
    let args = ["serve", &port.to_string(), path_s, &name];
    let (prog, child) = spawn_ghost_prog(d.path(), "sockets", &log, &args)?;
    let s = wait_log(&log, "READY", 30, |s| {
        s.contains("READY") || s.contains("SETUP")
    })?;
    ensure!(s.contains("READY"), "sockets did not start: {s}");
    let pid = child.id().to_string();
    krg_ok(
        &cluster,
        &["checkpoint", &pid, "--to", "kerfs:/ckpt/sock", "--kill"],
    )?;
    kill_child(child);
    let out = restart_elsewhere(&cluster, "kerfs:/ckpt/sock")?;
    ensure!(
        out.status.success(),
        "restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pids = pids_of(&prog);
    ensure!(pids.len() == 1, "restored processes: {pids:?}");
    signal(pids[0], libc::SIGUSR1);
    wait_log(&log, "ACCEPTING", 30, |s| {
        s.contains("ACCEPTING") || s.contains("VERDICT")
    })?;
    use std::io::Write;
    let mut t4 = std::net::TcpStream::connect(("127.0.0.1", port))?;
    t4.write_all(b"hi")?;
    let mut t6 = std::net::TcpStream::connect(("::1", port))?;
    t6.write_all(b"hi")?;
    let mut up = std::os::unix::net::UnixStream::connect(&path)?;
    up.write_all(b"hi")?;
    // An abstract seqpacket socket: std has neither, so through libc.
    // SAFETY: plain socket/connect/send with a valid sockaddr_un; the fd is closed below.
    let abstract_ok = unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as u16;
        for (i, b) in name.bytes().enumerate() {
            a.sun_path[1 + i] = b as libc::c_char;
        }
        let len = (2 + 1 + name.len()) as libc::socklen_t;
        let ok = s >= 0
            && libc::connect(s, &a as *const _ as *const libc::sockaddr, len) == 0
            && libc::send(s, b"hi".as_ptr() as *const libc::c_void, 2, 0) == 2;
        std::thread::sleep(Duration::from_millis(300));
        libc::close(s);
        ok
    };
    ensure!(abstract_ok, "connecting to the abstract listener failed");
    std::net::UdpSocket::bind("127.0.0.1:0")?.send_to(b"hi", ("127.0.0.1", port))?;
    let s = wait_log(&log, "the verdict", 60, |s| s.contains("VERDICT"))?;
    drop((t4, t6, up));
    signal(pids[0], libc::SIGKILL);
    ensure!(
        s.contains("VERDICT ok"),
        "the restored process found its sockets changed:\n{s}"
    );
    Ok(())
}

/// Reads `r` to its end, `sizes` bytes at a time (cycling).
fn read_in_pieces(r: &mut dyn GhostReader, sizes: &[usize]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for &size in sizes.iter().cycle() {
        let at = out.len();
        out.resize(at + size, 0);
        let n = r.read(&mut out[at..])?;
        out.truncate(at + n);
        if n == 0 {
            return Ok(out);
        }
    }
    unreachable!("cycle() never ends")
}

/// Deduplicated and zero-heavy images restore page by page. The `mixed` heap repeats 13
/// contents (each stored once and referenced hundreds of times) between pages of their own and
/// zero pages, so a page copied to the wrong address fails the program's check of every page;
/// `zeros` is 60 zero pages out of 64; `same` is one page referenced by the whole heap. A
/// second version of the restored `mixed` process, after a rewrite, references pages of two
/// packs; its image read in odd-sized pieces (the reader's windows) is the same as in one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplicated_and_zero_heavy_images_restore_page_by_page() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (cluster, meta) = start(3).await?;
    let d = tempfile::tempdir()?;
    let prog = build(d.path(), "ckpt_heap")?;
    let mb = 24;
    let heap_pages = mb * MIB / 4096;
    for mode in ["mixed", "zeros", "same"] {
        let log = d.path().join(format!("log.{mode}"));
        let path = format!("/ckpt/dedup-{mode}");
        let addr = format!("kerfs:{path}");
        let child = spawn_heap_mode(&prog, mb, &log, 3, mode)?;
        wait_log(&log, "counters", 30, |s| counters(s).len() >= 3)?;
        krg_ok(
            &cluster,
            &[
                "checkpoint",
                &child.id().to_string(),
                "--to",
                &addr,
                "--kill",
            ],
        )?;
        kill_child(child);
        let store = open_store(&meta, &path).await?;
        let stats = store.versions().await?[0].stats;
        info!(mode, ?stats, "first version");
        // The heap's own share of the image (the rest is stack, libc's data...).
        let new_pages = stats.new_bytes / 4096;
        let (zero_min, dedup_min, new_max) = match mode {
            // 768 zero pages, 1075 of their own, 4301 of 13 contents.
            "mixed" => (heap_pages / 8, heap_pages * 2 / 3, heap_pages / 4),
            "zeros" => (heap_pages * 15 / 16, 0, heap_pages / 8),
            _ => (0, heap_pages - 1, 256),
        };
        ensure!(
            stats.zero_pages >= zero_min && stats.dedup_pages >= dedup_min && new_pages <= new_max,
            "the {mode} heap was not stored as expected: {stats:?}"
        );
        let restored = restore_and_check(&cluster, &addr, &prog, &log, 0)?;
        if mode != "mixed" {
            signal(restored, libc::SIGKILL);
            continue;
        }
        signal(restored, libc::SIGUSR1);
        wait_log(&log, "a rewrite", 30, |s| s.contains("MUT 1"))?;
        krg_ok(
            &cluster,
            &["checkpoint", &restored.to_string(), "--to", &addr, "--kill"],
        )?;
        let v2 = store.manifest(2).await?;
        ensure!(
            v2.packs.len() == 2,
            "version 2 of the mixed heap uses packs {:?}, not both packs",
            v2.packs
        );
        let version = store.open_version(Some(2)).await?;
        let rt = tokio::runtime::Handle::current();
        let (whole, pieces) = tokio::task::spawn_blocking(move || {
            let mut one = version.reader(0, &rt, None);
            let size = one.size_hint().unwrap_or(0) as usize + 1;
            let whole = read_in_pieces(&mut one, &[size])?;
            let sizes = [1, 4095, 4096, 3 * 4096 + 7, 70_000, (1 << 20) + 5, 40 << 20];
            let pieces = read_in_pieces(&mut version.reader(0, &rt, None), &sizes)?;
            rt.block_on(version.close());
            Ok::<_, anyhow::Error>((whole, pieces))
        })
        .await??;
        ensure!(
            whole.len() as u64 > mb * MIB,
            "the image is {} bytes",
            whole.len()
        );
        ensure_same(&pieces, &whole, "the image read in pieces against one read")?;
        restore_and_check(&cluster, &addr, &prog, &log, 1)?;
        kill_all(&prog);
    }
    Ok(())
}
