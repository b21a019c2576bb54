//! The metadata service as a cluster of real `kerfsd meta` processes on loopback: election,
//! concurrent clients, kill -9 of the leader, snapshot catch-up, full restart, the cluster
//! key, bad input, metrics, client-session expiry, and membership changes (`kerfsctl meta
//! add/remove/transfer-leader`: growing, shrinking, refusals). Each test narrates its steps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_client::{ClientError, MetaClient, MetaClientConfig};
use kerfs_proto::auth::ClusterKey;
use kerfs_proto::{FileKind, ROOT_INO};
use kerfs_tests::{init_tracing, MetaCluster, MetaClusterOptions};
use tracing::info;

fn names_of(entries: &[kerfs_proto::DirEntry]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect()
}

fn assert_all_equal(digests: &BTreeMap<u64, (Vec<u8>, u64)>) -> Result<()> {
    let first = digests.values().next().context("no digest")?;
    for (id, d) in digests {
        ensure!(
            d == first,
            "node {id} state digest differs: {:?} vs {:?}",
            d,
            first
        );
    }
    ensure!(
        first.0.len() == 32,
        "digest is not a blake3 hash: {:?}",
        first.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_apply_concurrent_ops_once_and_agree() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    let leader = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    info!(leader, "a leader was elected");

    // 8 clients, 125 operations each, in a directory of their own: creates, mkdirs,
    // renames, chmods, unlinks. Each client keeps a model of what its directory must hold.
    let mut tasks = Vec::new();
    for c in 0..8u32 {
        let client = cluster.client().await?;
        tasks.push(tokio::spawn(async move {
            let dir = client
                .mkdir(ROOT_INO, format!("client{c}").as_bytes(), 0o755)
                .await?;
            let mut expected = BTreeSet::new();
            for i in 0..124u32 {
                let name = format!("f{i}");
                match i % 4 {
                    0 | 1 => {
                        client.create_file(dir.ino, name.as_bytes(), 0o644).await?;
                        expected.insert(name);
                    }
                    2 => {
                        let prev = format!("f{}", i - 1);
                        let new = format!("r{i}");
                        client
                            .rename(dir.ino, prev.as_bytes(), dir.ino, new.as_bytes(), 0)
                            .await?;
                        expected.remove(&prev);
                        expected.insert(new);
                    }
                    _ => {
                        let victim = format!("f{}", i - 3);
                        client.unlink(dir.ino, victim.as_bytes()).await?;
                        expected.remove(&victim);
                    }
                }
            }
            let got = names_of(&client.readdir_all(dir.ino).await?);
            anyhow::ensure!(
                got == expected,
                "client {c}: directory holds {got:?}, expected {expected:?}"
            );
            Ok::<usize, anyhow::Error>(expected.len())
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    info!(
        total,
        "1,000 operations from 8 clients applied, each directory as its model says"
    );

    // A create retried after success must not create twice: EEXIST proves it ran once.
    let err = admin
        .create_file(ROOT_INO, b"client0", 0o644)
        .await
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);

    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(10))
        .await?;
    info!(?digests, "digests of the three nodes");
    assert_all_equal(&digests)?;
    ensure!(digests.len() == 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_during_creates_loses_no_acknowledged_create() -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    let leader = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let dir = admin.mkdir(ROOT_INO, b"stream", 0o755).await?;

    // Four clients create files as fast as they can and record what was acknowledged.
    let storm = CreateStorm::start(&cluster, dir.ino, 4, false).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = storm.acked_count();
    info!(leader, before, "killing the leader with SIGKILL");
    let killed_at = Instant::now();
    cluster.kill9(leader)?;

    // Writers keep going; the first acknowledgement after the kill (the old leader is dead)
    // shows a new leader serves.
    let resumed = storm
        .first_ack_after(killed_at, Duration::from_secs(15))
        .await
        .context("after killing the leader")?;
    let failover = resumed.duration_since(killed_at);
    info!(?failover, "a new leader serves");
    ensure!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, _) = storm.finish().await?;
    let present = names_of(&admin.readdir_all(dir.ino).await?);
    info!(
        acked = acked.len(),
        present = present.len(),
        "comparing acknowledged creates with the directory"
    );
    for name in &acked {
        ensure!(
            present.contains(name),
            "acknowledged create {name} is missing"
        );
    }
    ensure!(
        acked.len() > before,
        "no create acknowledged after the kill"
    );

    info!(leader, "restarting the killed node from its data dir");
    cluster.restart(leader)?;
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(20))
        .await?;
    assert_all_equal(&digests)?;
    ensure!(
        digests.contains_key(&leader),
        "restarted node did not catch up"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_down_during_compaction_catches_up_by_snapshot() -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions {
        compact_after: 50,
        ..Default::default()
    })?;
    let admin = cluster.client().await?;
    let leader = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let down = cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader)
        .context("no follower")?;
    info!(down, "stopping a follower");
    cluster.kill9(down)?;

    let dir = admin.mkdir(ROOT_INO, b"snap", 0o755).await?;
    for i in 0..300 {
        admin
            .create_file(dir.ino, format!("f{i}").as_bytes(), 0o644)
            .await?;
    }
    let status = admin.node_status(cluster.addr(leader)).await?;
    info!(
        first_index = status.first_index,
        applied = status.applied_index,
        "leader compacted its log"
    );
    ensure!(
        status.snapshot_index > 0 && status.first_index > 2,
        "leader did not compact: {status:?}"
    );

    info!(
        down,
        "restarting the follower; its log is behind the leader's first index"
    );
    cluster.restart(down)?;
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(30))
        .await?;
    assert_all_equal(&digests)?;
    let s = admin.node_status(cluster.addr(down)).await?;
    ensure!(
        s.snapshot_index > 0,
        "the follower caught up without installing a snapshot: {s:?}"
    );
    ensure!(
        cluster.log_of(down).contains("installing snapshot"),
        "follower log does not show a snapshot install"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_the_namespace() -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let a = admin.mkdir(ROOT_INO, b"a", 0o750).await?;
    let b = admin.mkdir(a.ino, b"b", 0o700).await?;
    admin.create_file(b.ino, b"file", 0o600).await?;
    admin.symlink(a.ino, b"link", b"b/file").await?;
    admin.setxattr(a.ino, b"user.color", b"blue", 0).await?;
    let before = cluster
        .converged_digests(&admin, Duration::from_secs(10))
        .await?;
    drop(admin);

    info!("stopping all three nodes (SIGTERM), then two with SIGKILL after a restart");
    for id in [1, 2, 3] {
        cluster.stop(id)?;
    }
    for id in [1, 2, 3] {
        cluster.restart(id)?;
    }
    let admin = cluster.client().await?;
    let a2 = admin.resolve("/a").await?;
    ensure!(a2.ino == a.ino && a2.mode == 0o750, "/a changed: {a2:?}");
    let f = admin.resolve("/a/b/file").await?;
    ensure!(f.kind == FileKind::Regular as i32 && f.mode == 0o600);
    ensure!(admin.readlink(admin.resolve("/a/link").await?.ino).await? == b"b/file");
    ensure!(admin.getxattr(a.ino, b"user.color").await? == b"blue");

    // The same after kill -9 of every node: only what was flushed may survive, and
    // everything acknowledged was flushed.
    admin.create_file(b.ino, b"after-restart", 0o644).await?;
    for id in [1, 2, 3] {
        cluster.kill9(id)?;
    }
    for id in [1, 2, 3] {
        cluster.restart(id)?;
    }
    let admin = cluster.client().await?;
    admin.resolve("/a/b/after-restart").await?;
    let after = cluster
        .converged_digests(&admin, Duration::from_secs(10))
        .await?;
    assert_all_equal(&after)?;
    ensure!(before.len() == 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_or_missing_cluster_key_is_refused_and_changes_nothing() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let before = admin.readdir_all(ROOT_INO).await?;

    info!("connecting with another cluster's key");
    let mut config = MetaClientConfig::new(cluster.addrs(), ClusterKey::generate());
    config.deadline = Duration::from_secs(3);
    match MetaClient::connect(config).await {
        Err(ClientError::Auth(msg)) => {
            info!(%msg, "refused");
            ensure!(
                msg.contains("key"),
                "refusal does not mention the key: {msg}"
            );
        }
        Err(e) => bail!("wrong error for a foreign key: {e}"),
        Ok(_) => bail!("a client with a foreign key was accepted"),
    }

    info!("calling without any token");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(1)))?
        .connect()
        .await?;
    let mut raw = kerfs_proto::meta_client::MetaClient::new(channel.clone());
    let status = raw
        .write(kerfs_proto::WriteRequest {
            command: Some(kerfs_proto::Command {
                op: Some(kerfs_proto::command::Op::MakeNode(kerfs_proto::MakeNode {
                    parent: ROOT_INO,
                    name: b"intruder".to_vec(),
                    kind: FileKind::Regular as i32,
                    mode: 0o644,
                    exclusive: true,
                    ..Default::default()
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");
    let mut raft = kerfs_proto::raft_client::RaftClient::new(channel);
    let status = raft
        .send(kerfs_proto::RaftBatch {
            from: 9,
            messages: vec![vec![1, 2, 3]],
            from_addr: String::new(),
        })
        .await
        .unwrap_err();
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");

    let after = admin.readdir_all(ROOT_INO).await?;
    ensure!(
        names_of(&before) == names_of(&after),
        "the namespace changed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clean_errors_and_nothing_half_applied() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;

    let long = vec![b'x'; 256];
    let cases: Vec<(&str, Vec<u8>, i32)> = vec![
        ("name over 255 bytes", long.clone(), libc::ENAMETOOLONG),
        ("name with a slash", b"a/b".to_vec(), libc::EINVAL),
        ("name with a NUL", b"a\0b".to_vec(), libc::EINVAL),
        ("empty name", b"".to_vec(), libc::EINVAL),
    ];
    for (what, name, errno) in cases {
        let err = admin.create_file(ROOT_INO, &name, 0o644).await.unwrap_err();
        info!(what, %err, "refused");
        ensure!(
            err.errno() == errno,
            "{what}: errno {} instead of {errno}",
            err.errno()
        );
    }
    ensure!(
        admin
            .create_file(ROOT_INO, &long[..255], 0o644)
            .await
            .is_ok(),
        "255-byte name refused"
    );

    let err = admin.getattr(987_654_321).await.unwrap_err();
    ensure!(err.errno() == libc::ENOENT, "missing inode: {err}");
    let err = admin
        .create_file(987_654_321, b"x", 0o644)
        .await
        .unwrap_err();
    ensure!(err.errno() == libc::ENOENT, "create in missing dir: {err}");
    let file = admin
        .resolve(&format!("/{}", String::from_utf8_lossy(&long[..255])))
        .await?;
    let err = admin.create_file(file.ino, b"x", 0o644).await.unwrap_err();
    ensure!(err.errno() == libc::ENOTDIR, "create under a file: {err}");
    let err = admin
        .symlink(ROOT_INO, b"l", &vec![b'y'; 5000])
        .await
        .unwrap_err();
    ensure!(
        err.errno() == libc::ENAMETOOLONG,
        "symlink target over PATH_MAX: {err}"
    );
    let err = admin
        .setxattr(ROOT_INO, b"user.big", &vec![0u8; 100_000], 0)
        .await
        .unwrap_err();
    ensure!(
        err.errno() == libc::E2BIG || err.errno() == libc::ENOSPC || err.errno() == libc::ERANGE,
        "huge xattr: {err}"
    );

    info!("a 300 MiB request is refused by the transport, not by a crash");
    let huge = vec![b'z'; 300 * 1024 * 1024];
    let err = admin
        .setxattr(ROOT_INO, b"user.huge", &huge, 0)
        .await
        .unwrap_err();
    info!(%err, "refused");
    drop(huge);

    info!("malformed raft bytes from an authenticated peer are refused");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(1)))?
        .connect()
        .await?;
    let mut raft =
        kerfs_proto::raft_client::RaftClient::with_interceptor(channel, cluster.key.client_auth());
    let status = raft
        .send(kerfs_proto::RaftBatch {
            from: 2,
            messages: vec![vec![0xff; 64]],
            from_addr: String::new(),
        })
        .await
        .unwrap_err();
    ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");

    // Nothing of the failed operations is visible, and every node is still alive and agrees.
    let names = names_of(&admin.readdir_all(ROOT_INO).await?);
    ensure!(
        names.len() == 1,
        "unexpected entries after refused operations: {names:?}"
    );
    ensure!(admin.listxattr(ROOT_INO).await?.is_empty());
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(10))
        .await?;
    assert_all_equal(&digests)?;
    ensure!(digests.len() == 3, "a node died on bad input");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_endpoint_reports_raft_progress() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    let leader = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    for i in 0..20 {
        admin
            .mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755)
            .await?;
    }
    let page = cluster.metrics(leader)?;
    let value = |name: &str| -> Result<f64> {
        let line = page
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .with_context(|| format!("{name} missing from metrics:\n{page}"))?;
        Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
    };
    ensure!(value("kerfs_meta_raft_term")? >= 1.0);
    ensure!(value("kerfs_meta_raft_applied_index")? >= 20.0);
    ensure!(value("kerfs_meta_raft_commit_index")? >= value("kerfs_meta_raft_applied_index")?);
    ensure!(value("kerfs_meta_is_leader")? == 1.0);
    ensure!(value("kerfs_meta_proposals_total")? >= 20.0);
    value("kerfs_meta_proposals_per_second")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlinked_open_file_lives_until_close_or_client_death() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;

    info!("an open, unlinked file keeps its inode until the last close");
    let f = admin.create_file(ROOT_INO, b"kept", 0o644).await?;
    let (_, handle) = admin.open(f.ino, libc::O_RDWR as u32).await?;
    admin.unlink(ROOT_INO, b"kept").await?;
    let orphan = admin.getattr(f.ino).await?;
    ensure!(
        orphan.nlink == 0,
        "unlinked inode has nlink {}",
        orphan.nlink
    );
    admin.close(handle).await?;
    ensure!(admin.getattr(f.ino).await.unwrap_err().errno() == libc::ENOENT);

    info!("a client that dies with the file open: its session expires and the inode goes");
    let mut config = cluster.client_config();
    config.lease = Duration::from_secs(2);
    let doomed = MetaClient::connect(config).await?;
    let g = doomed.create_file(ROOT_INO, b"orphan", 0o644).await?;
    doomed.open(g.ino, libc::O_RDONLY as u32).await?;
    doomed.unlink(ROOT_INO, b"orphan").await?;
    ensure!(admin.getattr(g.ino).await?.nlink == 0);
    drop(doomed); // stops renewing, like a killed process
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match admin.getattr(g.ino).await {
            Err(e) if e.errno() == libc::ENOENT => break,
            _ if Instant::now() > deadline => {
                bail!("the dead client's open file was never released")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    info!("the inode was released after the lease ran out");
    Ok(())
}

/// One metric of one node, from its Prometheus page.
/// A leader that holds a lease is frozen (SIGSTOP) while the others elect a new leader and
/// acknowledge a create, then woken: a read sent to it must see the create, not its old
/// state. Then the new leader is killed with SIGKILL and reads through the survivors must see
/// every acknowledged create. `mode` is the nodes' `--read-mode`. End to end only: a woken
/// leader reads the new term from peer messages queued while it was stopped before it serves
/// the read, so a lease that never ended passed this test when tried; the lease's end is
/// checked by the unit tests in meta/src/lease.rs (a real partition needs network namespaces).
async fn reads_stay_linearizable_across_freeze_and_kill(mode: &'static str) -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions {
        read_mode: Some(mode),
        ..Default::default()
    })?;
    let admin = cluster.client().await?;
    let old = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let dir = admin.mkdir(ROOT_INO, b"reads", 0o755).await?;
    admin.create_file(dir.ino, b"before", 0o644).await?;

    // A reader that knows only the leader: it keeps asking it, whatever happens.
    let mut pinned_config = cluster.client_config();
    pinned_config.addrs = vec![cluster.addr(old).to_string()];
    let pinned = MetaClient::connect(pinned_config).await?;
    for _ in 0..200 {
        pinned.lookup(dir.ino, b"before").await?;
    }
    let lease_reads = cluster.metric(old, "kerfs_meta_lease_reads_total")?;
    let rounds = cluster.metric(old, "kerfs_meta_read_rounds_total")?;
    info!(mode, lease_reads, rounds, "reads served by the leader");
    if mode == "lease" {
        ensure!(
            lease_reads >= 150.0 && rounds < 50.0,
            "lease mode: {lease_reads} of 200 reads from the lease, {rounds} ReadIndex rounds"
        );
    } else {
        ensure!(
            lease_reads == 0.0 && rounds >= 1.0,
            "read-index mode: {lease_reads} lease reads, {rounds} rounds"
        );
    }

    info!(old, "freezing the leader with SIGSTOP");
    cluster.freeze(old, true)?;
    let mut others_config = cluster.client_config();
    others_config.addrs = cluster
        .nodes
        .values()
        .filter(|n| n.id != old)
        .map(|n| n.addr.clone())
        .collect();
    let writer = MetaClient::connect(others_config).await?;
    writer.create_file(dir.ino, b"after-freeze", 0o644).await?;
    let new = cluster
        .wait_leader(&writer, Duration::from_secs(10))
        .await?;
    ensure!(
        new != old,
        "node {old} is frozen, yet still reported leader"
    );
    info!(
        new,
        "a new leader acknowledged a create; waking the old one"
    );
    cluster.freeze(old, false)?;

    let seen = pinned.lookup(dir.ino, b"after-freeze").await;
    ensure!(
        seen.is_ok(),
        "a read through the woken old leader {old} missed a create acknowledged before it was \
         sent (a stale read): {seen:?}"
    );

    info!(new, "killing the new leader with SIGKILL");
    cluster.kill9(new)?;
    writer.create_file(dir.ino, b"after-kill", 0o644).await?;
    for name in [&b"before"[..], b"after-freeze", b"after-kill"] {
        let seen = pinned.lookup(dir.ino, name).await;
        ensure!(
            seen.is_ok(),
            "after the kill, {:?} is missing: {seen:?}",
            String::from_utf8_lossy(name)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_reads_are_never_stale_after_leader_freeze_or_kill() -> Result<()> {
    reads_stay_linearizable_across_freeze_and_kill("lease").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_index_reads_are_never_stale_after_leader_freeze_or_kill() -> Result<()> {
    reads_stay_linearizable_across_freeze_and_kill("read-index").await
}

/// Clients creating files in one directory as fast as they can, each create retried by the
/// client through elections and outages, recording every acknowledged create and when.
/// With `sync_every_other`, clients 1, 3... call `sync` after each create and record it only
/// once that returned.
struct CreateStorm {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<Result<usize>>>,
}

impl CreateStorm {
    async fn start(
        cluster: &MetaCluster,
        dir: u64,
        clients: usize,
        sync_every_other: bool,
    ) -> Result<CreateStorm> {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..clients {
            let client = cluster.client().await?;
            let (acked, stop) = (acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("w{w}-{i}");
                    client
                        .create_file(dir, name.as_bytes(), 0o644)
                        .await
                        .with_context(|| format!("create {name}"))?;
                    if sync_every_other && w % 2 == 1 {
                        client
                            .sync()
                            .await
                            .with_context(|| format!("sync after {name}"))?;
                    }
                    acked.lock().unwrap().push((name, Instant::now()));
                    i += 1;
                }
                anyhow::Ok(i)
            }));
        }
        Ok(CreateStorm {
            acked,
            stop,
            writers,
        })
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for the first create acknowledged after `t` (by a leader elected after it).
    async fn first_ack_after(&self, t: Instant, timeout: Duration) -> Result<Instant> {
        let deadline = t + timeout;
        loop {
            let first = self
                .acked
                .lock()
                .unwrap()
                .iter()
                .map(|(_, at)| *at)
                .find(|at| *at > t + Duration::from_millis(1));
            if let Some(at) = first {
                return Ok(at);
            }
            ensure!(
                Instant::now() < deadline,
                "no create acknowledged within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the clients once their create in flight is acknowledged; returns the names
    /// acknowledged and how many creates were attempted.
    async fn finish(self) -> Result<(BTreeSet<String>, usize)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut attempted = 0;
        for w in self.writers {
            attempted += w.await??;
        }
        let acked = self
            .acked
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        Ok((acked, attempted))
    }
}

/// Four clients create files as fast as they can, two of them calling `sync` (what fsync
/// sends) after each create, while every metadata node is killed with SIGKILL at once and
/// restarted. Every create a client saw acknowledged must be there afterwards, and the
/// creates in flight at the kill finish exactly once when the cluster is back. With
/// `flush_ms` of an hour, nothing reaches the store's own files after the start: all of it
/// comes back from the write-ahead files.
async fn all_nodes_killed_during_a_create_storm(flush_ms: Option<u64>) -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions {
        flush_ms,
        ..Default::default()
    })?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let dir = admin.mkdir(ROOT_INO, b"storm", 0o755).await?;

    let storm = CreateStorm::start(&cluster, dir.ino, 4, true).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = storm.acked_count();
    info!(before, "killing every metadata node with SIGKILL");
    for id in [1, 2, 3] {
        cluster.kill9(id)?;
    }
    let killed_at = Instant::now();
    for id in [1, 2, 3] {
        cluster.restart(id)?;
    }
    // The writers retry through the outage; wait until they are acknowledged again.
    storm
        .first_ack_after(killed_at, Duration::from_secs(30))
        .await
        .context("after restarting every node")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, attempted) = storm.finish().await?;
    let present = names_of(&admin.readdir_all(dir.ino).await?);
    info!(
        before,
        acked = acked.len(),
        present = present.len(),
        "comparing acknowledged creates with the directory"
    );
    let missing: Vec<&String> = acked.difference(&present).collect();
    ensure!(
        missing.is_empty(),
        "{} acknowledged creates are missing after the kill, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Every create was retried until acknowledged, so the directory holds exactly those.
    ensure!(
        present == acked && acked.len() == attempted,
        "{} files present, {} acknowledged, {attempted} attempted",
        present.len(),
        acked.len()
    );
    ensure!(before > 20, "only {before} creates before the kill");
    if flush_ms.is_some() {
        for id in [1, 2, 3] {
            ensure!(
                cluster
                    .log_of(id)
                    .contains("replaying the metadata write-ahead files"),
                "node {id} restarted without replaying its write-ahead files"
            );
        }
    }
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(20))
        .await?;
    assert_all_equal(&digests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_nodes_killed_during_a_create_storm_lose_no_acknowledged_create() -> Result<()> {
    all_nodes_killed_during_a_create_storm(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_nodes_killed_without_any_store_flush_lose_no_acknowledged_create() -> Result<()> {
    all_nodes_killed_during_a_create_storm(Some(3_600_000)).await
}

/// A create is acknowledged without a disk flush on the leader; `sync` (what fsync and
/// fsyncdir send) is acknowledged only after one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_sync_waits_for_a_disk_flush() -> Result<()> {
    init_tracing();
    let cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let client = cluster.client().await?;
    let leader = cluster
        .wait_leader(&client, Duration::from_secs(10))
        .await?;
    let dir = client.mkdir(ROOT_INO, b"d", 0o755).await?;
    // Settle elections and registration before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let syncs = |c: &MetaCluster| c.metric(leader, "kerfs_meta_log_syncs_total");

    let start = syncs(&cluster)?;
    for i in 0..200 {
        client
            .create_file(dir.ino, format!("plain-{i}").as_bytes(), 0o644)
            .await?;
    }
    let plain = syncs(&cluster)? - start;
    info!(plain, "log flushes during 200 creates");
    ensure!(
        plain < 10.0,
        "200 plain creates flushed the log {plain} times"
    );

    let start = syncs(&cluster)?;
    for i in 0..50 {
        client
            .create_file(dir.ino, format!("synced-{i}").as_bytes(), 0o644)
            .await?;
        client.sync().await?;
    }
    let synced = syncs(&cluster)? - start;
    info!(
        synced,
        "log flushes during 50 creates each followed by a sync"
    );
    ensure!(
        synced >= 50.0,
        "50 syncs flushed the log only {synced} times"
    );
    Ok(())
}

/// Runs `kerfsctl ARGS` against every node of `cluster` and requires success.
fn ctl_ok(cluster: &MetaCluster, args: &[&str]) -> Result<String> {
    let (code, out, err) = cluster.kerfsctl(None, args)?;
    ensure!(code == 0, "kerfsctl {args:?} exited {code}: {err}{out}");
    Ok(out)
}

/// `kerfsctl --json meta members`: (leader, id -> role).
fn members_of(cluster: &MetaCluster) -> Result<(u64, BTreeMap<u64, String>)> {
    let out = ctl_ok(cluster, &["--json", "meta", "members"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    let leader = v["leader"].as_u64().context("no leader in members")?;
    let mut roles = BTreeMap::new();
    for m in v["members"].as_array().context("no members")? {
        roles.insert(
            m["id"].as_u64().context("member id")?,
            m["role"].as_str().unwrap_or_default().to_string(),
        );
    }
    Ok((leader, roles))
}

/// Waits until node `id` reports `role` in its own status.
async fn wait_role(
    cluster: &MetaCluster,
    client: &MetaClient,
    id: u64,
    role: &str,
    timeout: Duration,
) -> Result<kerfs_proto::StatusReply> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.node_status(cluster.addr(id)).await;
        if let Ok(s) = &status {
            if s.role == role {
                return Ok(s.clone());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "node {id} is not {role} after {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metadata group grows from 3 to 5 nodes and shrinks back to 3 (a different 3) while
/// clients create files: each new node starts with `--join`, is added with `kerfsctl meta
/// add` (learner, snapshot, promotion), leadership moves to a new node with `meta
/// transfer-leader`, and two original nodes are removed with `meta remove`. No acknowledged
/// create is lost, the nodes' digests agree, the removed nodes refuse clients saying why,
/// and an original node restarted with its old `--peers` comes back with the new membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_group_grows_to_five_and_shrinks_to_three_under_a_create_storm() -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions {
        compact_after: 500,
        ..Default::default()
    })?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let dir = admin.mkdir(ROOT_INO, b"storm", 0o755).await?;
    let storm = CreateStorm::start(&cluster, dir.ino, 3, false).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    info!("step 1: start nodes 4 and 5 with --join and add them one at a time");
    for id in [4u64, 5] {
        let addr = cluster.start_joining(id)?;
        wait_role(&cluster, &admin, id, "joining", Duration::from_secs(10)).await?;
        let started = Instant::now();
        let member = format!("{id}={addr}");
        ctl_ok(&cluster, &["meta", "add", &member, "--wait-secs", "60"])?;
        info!(id, took = ?started.elapsed(), acked = storm.acked_count(), "node added");
        wait_role(&cluster, &admin, id, "follower", Duration::from_secs(10)).await?;
    }
    let (leader, roles) = members_of(&cluster)?;
    ensure!(roles.len() == 5, "5 members expected: {roles:?}");
    ensure!(
        roles.values().filter(|r| *r == "voter").count() == 4 && roles[&leader] == "leader",
        "4 voters and a leader expected: {roles:?}"
    );
    ensure!(
        cluster
            .log_of(4)
            .contains("installing snapshot from leader"),
        "node 4 caught up without a snapshot"
    );
    // `kerfsctl status` given only node 1 lists all five members with their roles.
    let (_, out, err) = cluster.kerfsctl(Some(cluster.addr(1)), &["--json", "status"])?;
    let status: serde_json::Value = serde_json::from_str(&out).context(err)?;
    let mut listed: Vec<(u64, String)> = status["meta"]
        .as_array()
        .context("status lists no metadata members")?
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    listed.sort();
    ensure!(
        listed.iter().map(|m| m.0).collect::<Vec<_>>() == vec![1, 2, 3, 4, 5]
            && listed.iter().filter(|m| m.1 == "leader").count() == 1
            && listed.iter().filter(|m| m.1 == "follower").count() == 4,
        "status should list 5 members, one leader: {listed:?}"
    );

    info!("step 2: move leadership to node 4 while a reader pinned to the old leader reads");
    let mut pinned_config = cluster.client_config();
    pinned_config.addrs = vec![cluster.addr(leader).to_string()];
    let pinned = MetaClient::connect(pinned_config).await?;
    for _ in 0..50 {
        pinned.getattr(dir.ino).await?;
    }
    let started = Instant::now();
    ctl_ok(&cluster, &["meta", "transfer-leader", "4"])?;
    info!(took = ?started.elapsed(), "leadership moved");
    wait_role(&cluster, &admin, 4, "leader", Duration::from_secs(1)).await?;
    // The old leader's lease ended with the transfer: a read through it sees a create
    // acknowledged by the new leader.
    admin.create_file(dir.ino, b"after-transfer", 0o644).await?;
    pinned
        .lookup(dir.ino, b"after-transfer")
        .await
        .with_context(|| format!("a read through the old leader {leader} after the transfer"))?;

    info!("step 3: remove nodes 1 and 2");
    for id in [1u64, 2] {
        ctl_ok(&cluster, &["meta", "remove", &id.to_string()])?;
    }
    let (leader, roles) = members_of(&cluster)?;
    ensure!(leader == 4, "leader moved off 4: {roles:?}");
    ensure!(
        roles.keys().copied().collect::<Vec<_>>() == vec![3, 4, 5],
        "members should be 3, 4, 5: {roles:?}"
    );

    info!("step 4: the removed nodes refuse clients, saying why");
    for id in [1u64, 2] {
        wait_role(&cluster, &admin, id, "removed", Duration::from_secs(15)).await?;
        let mut config =
            MetaClientConfig::new(vec![cluster.addr(id).to_string()], cluster.key.clone());
        config.deadline = Duration::from_secs(1);
        let alone = MetaClient::connect_lazily(config)?;
        let err = alone
            .getattr(ROOT_INO)
            .await
            .err()
            .context("a removed node served a read")?;
        ensure!(
            err.to_string().contains("removed from the metadata group"),
            "the refusal does not say why: {err}"
        );
    }

    info!("step 5: stop the storm; every acknowledged create is there");
    let (acked, attempted) = storm.finish().await?;
    info!(acked = acked.len(), attempted, "storm over");
    ensure!(
        acked.len() > 50,
        "too few creates acknowledged: {}",
        acked.len()
    );
    let listed = names_of(&admin.readdir_all(dir.ino).await?);
    let lost: Vec<_> = acked.difference(&listed).collect();
    ensure!(lost.is_empty(), "acknowledged creates lost: {lost:?}");
    cluster.stop(1)?;
    cluster.stop(2)?;
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(20))
        .await?;
    ensure!(digests.len() == 3, "3 digests expected: {digests:?}");
    assert_all_equal(&digests)?;

    info!("step 6: node 3, restarted with its old --peers, comes back with the new membership");
    cluster.stop(3)?;
    cluster.restart(3)?;
    let status = wait_role(&cluster, &admin, 3, "follower", Duration::from_secs(15)).await?;
    let peers: Vec<u64> = status.peers.iter().map(|p| p.id).collect();
    ensure!(
        peers == vec![3, 4, 5],
        "node 3 restarted with peers {peers:?}"
    );
    admin.create_file(dir.ino, b"after-restart", 0o644).await?;
    let digests = cluster
        .converged_digests(&admin, Duration::from_secs(20))
        .await?;
    assert_all_equal(&digests)?;
    Ok(())
}

/// Membership changes that would hurt the group are refused and change nothing: removing a
/// voter when the rest would have no live quorum, removing the leader, adding an existing id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_that_would_lose_quorum_are_refused() -> Result<()> {
    init_tracing();
    let mut cluster = MetaCluster::start(MetaClusterOptions::default())?;
    let admin = cluster.client().await?;
    let leader = cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let (down, live) = (others[0], others[1]);
    cluster.stop(down)?;
    // Let the leader notice it is gone (check_quorum marks peers inactive each timeout).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let before = members_of(&cluster)?;
    let (code, out, err) = cluster.kerfsctl(None, &["meta", "remove", &live.to_string()])?;
    ensure!(
        code == 1,
        "remove of a live voter with one down was not refused: {out}{err}"
    );
    ensure!(
        err.contains("quorum"),
        "the refusal does not say why: {err}"
    );
    let (code, _, err) = cluster.kerfsctl(None, &["meta", "remove", &leader.to_string()])?;
    ensure!(
        code == 1 && err.contains("transfer-leader"),
        "leader removal: {err}"
    );
    let (code, _, err) =
        cluster.kerfsctl(None, &["meta", "add", &format!("{live}=127.0.0.1:1")])?;
    ensure!(
        code == 1 && err.contains("already a member"),
        "re-add: {err}"
    );
    ensure!(
        members_of(&cluster)? == before,
        "a refused change changed the group"
    );
    admin
        .create_file(ROOT_INO, b"still-writable", 0o644)
        .await?;

    // A node that is never started is added: it stays a learner, the add times out saying
    // what to check, a second add is refused while that one is in progress, and removing
    // the learner gives it up.
    let nowhere = format!("7=127.0.0.1:{}", kerfs_tests::free_port()?);
    let (code, _, err) = cluster.kerfsctl(None, &["meta", "add", &nowhere, "--wait-secs", "2"])?;
    ensure!(
        code == 1 && err.contains("did not catch up") && err.contains("--join"),
        "an add of a node that never runs: exit {code}: {err}"
    );
    let (_, roles) = members_of(&cluster)?;
    ensure!(
        roles.get(&7).map(String::as_str) == Some("learner"),
        "{roles:?}"
    );
    let other = format!("8=127.0.0.1:{}", kerfs_tests::free_port()?);
    let (code, _, err) = cluster.kerfsctl(None, &["meta", "add", &other])?;
    ensure!(
        code == 1 && err.contains("in progress"),
        "a second add while one is pending: exit {code}: {err}"
    );
    ctl_ok(&cluster, &["meta", "remove", "7"])?;
    ensure!(
        members_of(&cluster)? == before,
        "giving the add up left the group changed"
    );

    // Removing the node that is down is allowed: the two left are both live.
    ctl_ok(&cluster, &["meta", "remove", &down.to_string()])?;
    let (_, roles) = members_of(&cluster)?;
    ensure!(roles.len() == 2 && !roles.contains_key(&down), "{roles:?}");
    admin.create_file(ROOT_INO, b"two-voters", 0o644).await?;
    Ok(())
}
