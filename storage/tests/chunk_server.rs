//! Chunk servers started in-process on loopback with real data directories: round trips,
//! chain replication, corruption, versions, restart, identity checks, disk full, scrub.

mod common;

use common::*;
use kerfs_proto::auth::ClusterKey;
use kerfs_proto::{
    ChunkDeleteRequest, ChunkScrubRequest, ChunkSetVersionRequest, ChunkStatRequest,
    ChunkTruncateRequest,
};
use kerfs_storage::{StorageError, BLOCK_SIZE, CORRUPT_BLOCK_HEADER, VERSION_HEADER};
use rand::{Rng, SeedableRng};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_and_reads_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let node = Node::start(1, dir.path(), &key).await;
    let mut c = node.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: Vec<u8> = Vec::new();
    let chunk = 11;
    for i in 0..60u64 {
        // Offsets around block boundaries and beyond the end (holes), sizes up to 2.5 MiB
        // (several frames).
        let offset = match i % 3 {
            0 => rng.gen_range(0..4 * 1024 * 1024),
            1 => rng.gen_range(1..40) * BLOCK_SIZE - rng.gen_range(0..3),
            _ => model.len() as u64 + rng.gen_range(0..300_000),
        };
        let len = if i % 7 == 0 {
            rng.gen_range(1_000_000..2_600_000)
        } else {
            rng.gen_range(1..200_000)
        };
        let data = random_bytes(len, i);
        let mut h = header(chunk, 1, offset, &[]);
        h.sync = i % 5 == 0;
        let reply = write(&mut c, h, &data).await.unwrap();
        assert!(reply.all_ok);
        assert_eq!(reply.bytes, len as u64);
        let end = offset as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(&data);
        assert_eq!(reply.replicas[0].chunk_length, model.len() as u64);
    }
    for j in 0..40 {
        let off = rng.gen_range(0..model.len() as u64 + 100_000);
        let len = rng.gen_range(0..3_000_000);
        let got = read(&mut c, chunk, 1, off, len).await.unwrap();
        let lo = (off as usize).min(model.len());
        let hi = (off as usize + len as usize).min(model.len());
        assert_eq!(got.len(), hi - lo, "read {j} at {off}+{len}");
        assert!(got == model[lo..hi], "read {j} at {off}+{len} differs");
    }
    let all = read(&mut c, chunk, 1, 0, u64::MAX / 2).await.unwrap();
    assert!(all == model);

    // Truncate down into the middle of a block, then up: the tail reads as zeros.
    let cut = model.len() as u64 / 2 + 123;
    let r = c
        .truncate(ChunkTruncateRequest {
            chunk_id: chunk,
            version: 1,
            length: cut,
            chain: vec![],
            sync: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.all_ok);
    model.truncate(cut as usize);
    c.truncate(ChunkTruncateRequest {
        chunk_id: chunk,
        version: 1,
        length: cut + 500_000,
        chain: vec![],
        sync: false,
    })
    .await
    .unwrap();
    model.resize(cut as usize + 500_000, 0);
    let all = read(&mut c, chunk, 1, 0, u64::MAX / 2).await.unwrap();
    assert!(all == model);
    let st = c
        .stat(ChunkStatRequest { chunk_id: chunk })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.length, model.len() as u64);
    assert_eq!(st.version, 1);

    // Requests the server must refuse, with codes a client can tell apart.
    let mut h = header(99, 1, 0, &[]);
    h.create = false;
    let e = write(&mut c, h, b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = read(&mut c, 99, 1, 0, 10).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A stream that carries fewer bytes than its header announced is refused.
    let mut h = header(chunk, 1, 0, &[]);
    h.length = 10;
    let frames = vec![
        kerfs_proto::ChunkWriteFrame {
            frame: Some(kerfs_proto::chunk_write_frame::Frame::Header(h)),
        },
        kerfs_proto::ChunkWriteFrame {
            frame: Some(kerfs_proto::chunk_write_frame::Frame::Data(
                b"short".to_vec(),
            )),
        },
    ];
    let e = c.write(futures::stream::iter(frames)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("announced 10 bytes"),
        "{}",
        e.message()
    );
    let bad = kerfs_proto::ChunkWriteFrame {
        frame: Some(kerfs_proto::chunk_write_frame::Frame::Data(vec![1])),
    };
    let e = c.write(futures::stream::iter(vec![bad])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let stranger = connect(&node.addr, &ClusterKey::generate()).await.unwrap();
    let e = { stranger }
        .stat(ChunkStatRequest { chunk_id: chunk })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let written = node.metric("kerfs_chunk_bytes_written_total").await;
    assert!(written > 10_000_000, "{written}");
    assert!(node.metric("kerfs_chunk_bytes_read_total").await > 0);
    assert_eq!(node.metric("kerfs_chunk_chunks").await, 1);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_replicates_and_a_corrupt_replica_is_refused_while_others_serve() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let key = ClusterKey::generate();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(Node::start(i as u64 + 1, d.path(), &key).await);
    }
    let chain = [nodes[1].addr.as_str(), nodes[2].addr.as_str()];
    let data = random_bytes(5 * 1024 * 1024 + 12345, 42);
    let mut c0 = nodes[0].client().await;
    let reply = write(&mut c0, header(5, 1, 0, &chain), &data)
        .await
        .unwrap();
    assert!(reply.all_ok, "{reply:?}");
    assert_eq!(reply.replicas.len(), 3);
    assert_eq!(reply.replicas[1].address, nodes[1].addr);
    assert_eq!(reply.replicas[2].address, nodes[2].addr);
    for r in &reply.replicas {
        assert!(r.ok);
        assert_eq!(r.chunk_length, data.len() as u64);
        assert_eq!(r.version, 1);
    }
    for n in &nodes {
        let mut c = n.client().await;
        assert!(read(&mut c, 5, 1, 0, 1 << 30).await.unwrap() == data);
    }

    // Flip bits in block 17 of the middle replica's file.
    let path = nodes[1].data_path(5);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 17 * BLOCK_SIZE as usize + 4000;
    bytes[at] ^= 0x10;
    bytes[at + 1] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let mut c1 = nodes[1].client().await;
    // A read of the blocks before it still works; one touching it fails with DataLoss.
    let before = read(&mut c1, 5, 1, 0, 17 * BLOCK_SIZE).await.unwrap();
    assert!(before[..] == data[..17 * BLOCK_SIZE as usize]);
    let e = read(&mut c1, 5, 1, 16 * BLOCK_SIZE, 3 * BLOCK_SIZE)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("0000000000000005"), "{}", e.message());
    assert!(e.message().contains("block 17"), "{}", e.message());
    assert_eq!(
        e.metadata()
            .get(CORRUPT_BLOCK_HEADER)
            .unwrap()
            .to_str()
            .unwrap(),
        "17"
    );
    // A whole-chunk read fails too (after the good frames), never returning bad bytes.
    let e = read(&mut c1, 5, 1, 0, 1 << 30).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    for n in [&nodes[0], &nodes[2]] {
        let mut c = n.client().await;
        assert!(read(&mut c, 5, 1, 0, 1 << 30).await.unwrap() == data);
    }
    assert!(nodes[1].metric("kerfs_chunk_corrupt_blocks_total").await >= 2);
    assert_eq!(nodes[0].metric("kerfs_chunk_corrupt_blocks_total").await, 0);
    let st = c1
        .stat(ChunkStatRequest { chunk_id: 5 })
        .await
        .unwrap()
        .into_inner();
    assert!(st.corrupt);

    // The scrubber finds it too, and only there.
    let scrub = c1.scrub(ChunkScrubRequest {}).await.unwrap().into_inner();
    assert_eq!(scrub.chunks_checked, 1);
    assert_eq!(scrub.corrupt.len(), 1);
    assert_eq!(scrub.corrupt[0].chunk_id, 5);
    assert_eq!(scrub.corrupt[0].blocks, vec![17]);
    let scrub = c0.scrub(ChunkScrubRequest {}).await.unwrap().into_inner();
    assert!(scrub.corrupt.is_empty());
    assert_eq!(scrub.bytes_checked, data.len() as u64);
    assert_eq!(nodes[1].metric("kerfs_chunk_scrub_corrupt_chunks").await, 1);

    // A partial overwrite of the corrupt block is refused rather than blessing bad bytes;
    // a full rewrite of the replica's block repairs it.
    let mut h = header(5, 1, 17 * BLOCK_SIZE + 10, &[]);
    h.create = false;
    let e = write(&mut c1, h, b"abc").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    let blk = &data[17 * BLOCK_SIZE as usize..18 * BLOCK_SIZE as usize];
    write(&mut c1, header(5, 1, 17 * BLOCK_SIZE, &[]), blk)
        .await
        .unwrap();
    assert!(read(&mut c1, 5, 1, 0, 1 << 30).await.unwrap() == data);
    for n in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_downstream_replica_is_reported_never_acknowledged() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let key = ClusterKey::generate();
    let a = Node::start(1, dirs[0].path(), &key).await;
    let b = Node::start(2, dirs[1].path(), &key).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let data = random_bytes(3 * 1024 * 1024, 3);
    let mut ca = a.client().await;

    // Last replica dead: first two ok, the dead one reported with its error.
    let reply = write(&mut ca, header(8, 1, 0, &[&b.addr, &dead]), &data)
        .await
        .unwrap();
    assert!(!reply.all_ok);
    assert_eq!(reply.replicas.len(), 3);
    assert!(reply.replicas[0].ok && reply.replicas[1].ok);
    assert!(!reply.replicas[2].ok);
    assert_eq!(reply.replicas[2].address, dead);
    assert!(!reply.replicas[2].message.is_empty());
    let mut cb = b.client().await;
    assert!(read(&mut cb, 8, 1, 0, 1 << 30).await.unwrap() == data);

    // Middle replica dead: it failed, the one after it is "not known".
    let reply = write(&mut ca, header(9, 1, 0, &[&dead, &b.addr]), &data)
        .await
        .unwrap();
    assert!(!reply.all_ok);
    assert!(reply.replicas[0].ok);
    assert!(!reply.replicas[1].ok && !reply.replicas[2].ok);
    assert!(reply.replicas[2].message.contains("not known"));
    assert!(a.metric("kerfs_chunk_forward_failures_total").await >= 2);

    // A downstream that refuses (wrong version there) is reported with its code.
    c_set(&mut cb, 10, 0, 5, true).await;
    let reply = write(&mut ca, header(10, 1, 0, &[&b.addr]), b"hello")
        .await
        .unwrap();
    assert!(!reply.all_ok);
    assert_eq!(reply.replicas[1].code, Code::FailedPrecondition as i32);
    assert!(reply.replicas[1].message.contains("newer"), "{reply:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

async fn c_set(c: &mut Client, chunk: u64, from: u64, to: u64, create: bool) {
    c.set_version(ChunkSetVersionRequest {
        chunk_id: chunk,
        from_version: from,
        version: to,
        create,
        shard_index: 0,
        chain: vec![],
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_left_at_an_old_version_refuses_the_new_one() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let key = ClusterKey::generate();
    let mut nodes = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        nodes.push(Node::start(i as u64 + 1, d.path(), &key).await);
    }
    let v1 = random_bytes(200_000, 1);
    let mut c0 = nodes[0].client().await;
    let mut h = header(21, 1, 0, &[&nodes[1].addr, &nodes[2].addr]);
    h.shard_index = 4;
    assert!(write(&mut c0, h, &v1).await.unwrap().all_ok);

    // New epoch on servers 1 and 2 only (server 3 "was down"), through the chain.
    let r = c0
        .set_version(ChunkSetVersionRequest {
            chunk_id: 21,
            from_version: 1,
            version: 2,
            create: false,
            shard_index: 0,
            chain: vec![nodes[1].addr.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.all_ok && r.replicas.len() == 2 && r.replicas[1].version == 2);
    let v2 = random_bytes(100_000, 2);
    let reply = write(&mut c0, header(21, 2, 50_000, &[&nodes[1].addr]), &v2)
        .await
        .unwrap();
    assert!(reply.all_ok);
    let mut want = v1.clone();
    want[50_000..150_000].copy_from_slice(&v2);

    let mut c2 = nodes[2].client().await;
    let e = read(&mut c2, 21, 2, 0, 1000).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("stale"), "{}", e.message());
    assert_eq!(
        e.metadata().get(VERSION_HEADER).unwrap().to_str().unwrap(),
        "1"
    );
    let e = write(&mut c2, header(21, 2, 0, &[]), b"x")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // It cannot be brought forward past the epoch it missed either.
    let e = c2
        .set_version(ChunkSetVersionRequest {
            chunk_id: 21,
            from_version: 2,
            version: 3,
            create: false,
            shard_index: 0,
            chain: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The up-to-date ones serve the new data and refuse the old version.
    for n in &nodes[..2] {
        let mut c = n.client().await;
        assert!(read(&mut c, 21, 2, 0, 1 << 20).await.unwrap() == want);
        let e = read(&mut c, 21, 1, 0, 10).await.unwrap_err();
        assert!(e.message().contains("newer"), "{}", e.message());
    }
    let st = c0
        .stat(ChunkStatRequest { chunk_id: 21 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.version, st.shard_index), (2, 4));
    // Garbage collection of the stale copy: a delete guarded by max_version.
    let e = c0
        .delete(ChunkDeleteRequest {
            chunk_id: 21,
            max_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let d = c2
        .delete(ChunkDeleteRequest {
            chunk_id: 21,
            max_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.existed);
    assert_eq!(
        read(&mut c2, 21, 1, 0, 1).await.unwrap_err().code(),
        Code::NotFound
    );
    for n in nodes {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_foreign_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let data = random_bytes(1_500_000, 9);
    let node = Node::start(3, dir.path(), &key).await;
    let mut c = node.client().await;
    write(&mut c, header(31, 4, 70_000, &[]), &data)
        .await
        .unwrap();
    let mut h = header(32, 1, 0, &[]);
    h.sync = false; // made durable by the clean shutdown
    write(&mut c, h, &data[..1000]).await.unwrap();
    drop(c);
    node.stop().await.unwrap();

    let node = Node::start(3, dir.path(), &key).await;
    let mut c = node.client().await;
    let got = read(&mut c, 31, 4, 0, 1 << 30).await.unwrap();
    assert_eq!(got.len(), 70_000 + data.len());
    assert!(got[..70_000].iter().all(|&b| b == 0));
    assert!(got[70_000..] == data[..]);
    assert!(read(&mut c, 32, 1, 0, 1 << 30).await.unwrap() == data[..1000]);
    let list = c
        .list(kerfs_proto::ChunkListRequest {
            start_after: 0,
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.chunks.len(), 1);
    assert!(list.more);
    assert_eq!(list.chunks[0].chunk_id, 31);

    assert_eq!(
        kerfs_storage::read_identity(dir.path()).unwrap(),
        Some((CLUSTER.to_string(), 3))
    );
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(kerfs_storage::read_identity(fresh.path()).unwrap(), None);
    // A second server on the same directory is refused while the first runs.
    let e = kerfs_storage::run(config(3, CLUSTER, dir.path(), &key), async {})
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Locked { .. }), "{e}");
    drop(c);
    node.stop().await.unwrap();

    let e = kerfs_storage::run(config(3, "another-cluster", dir.path(), &key), async {})
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::WrongCluster { .. }), "{e}");
    assert!(e.to_string().contains("test-cluster"));
    let e = kerfs_storage::run(config(4, CLUSTER, dir.path(), &key), async {})
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::WrongServer { .. }), "{e}");
    // And the data survived the refused attempts.
    let node = Node::start(3, dir.path(), &key).await;
    let mut c = node.client().await;
    assert!(read(&mut c, 31, 4, 70_000, 1 << 30).await.unwrap() == data);
    drop(c);
    node.stop().await.unwrap();
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_resource_exhausted_and_acknowledged_data_survives() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "mounting an 8 MiB tmpfs failed ({st}); this test needs root and mount(2)"
    );
    let _guard = Tmpfs(mnt.clone());
    let key = ClusterKey::generate();
    let node = Node::start(1, &mnt.join("data"), &key).await;
    let mut c = node.client().await;
    let mut acked = Vec::new();
    let mut full = None;
    for i in 1..=20u64 {
        let data = random_bytes(1024 * 1024 + 777, i);
        match write(&mut c, header(i, 1, 0, &[]), &data).await {
            Ok(r) => {
                assert!(r.all_ok);
                acked.push((i, data));
            }
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let e = full.expect("8 MiB of tmpfs never filled up");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("disk full"), "{}", e.message());
    assert!(acked.len() >= 4, "only {} chunks fit", acked.len());
    // Overwriting an acknowledged chunk in place still works on a full disk (space was
    // reserved when it was written), and everything acknowledged reads back.
    let (id0, d0) = &mut acked[0];
    let patch = random_bytes(200_000, 99);
    write(&mut c, header(*id0, 1, 100_000, &[]), &patch)
        .await
        .unwrap();
    d0[100_000..300_000].copy_from_slice(&patch);
    // Extending the last acknowledged chunk fails cleanly and leaves it intact.
    let (idl, dl) = acked.last().unwrap();
    let e = write(
        &mut c,
        header(*idl, 1, dl.len() as u64 - 5, &[]),
        &random_bytes(3 * 1024 * 1024, 5),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    for (id, data) in &acked {
        assert!(read(&mut c, *id, 1, 0, 1 << 30).await.unwrap() == *data);
    }
    assert!(node.metric("kerfs_chunk_no_space_errors_total").await >= 2);
    let scrub = c.scrub(ChunkScrubRequest {}).await.unwrap().into_inner();
    assert!(scrub.corrupt.is_empty(), "{scrub:?}");
    drop(c);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_after_a_crash_is_detected_and_scrubbed() {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let data = random_bytes(600_000, 4);
    let node = Node::start(1, dir.path(), &key).await;
    let mut c = node.client().await;
    write(&mut c, header(41, 1, 0, &[]), &data).await.unwrap();
    drop(c);
    // Crash: the server dies without its clean stop...
    drop(node);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // ...while an overwrite had reached the data file but not the checksums.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(kerfs_storage::store::chunk_data_path(dir.path(), 41))
            .unwrap();
        f.write_all_at(&[0xEE; 3000], 5 * BLOCK_SIZE + 100).unwrap();
    }
    let node = Node::start(1, dir.path(), &key).await;
    let mut c = node.client().await;
    assert!(
        read(&mut c, 41, 1, 0, 5 * BLOCK_SIZE).await.unwrap()[..]
            == data[..5 * BLOCK_SIZE as usize]
    );
    let e = read(&mut c, 41, 1, 5 * BLOCK_SIZE, 10).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    // The unclean start scrubbed in the background and flagged the chunk for the report.
    let mut flagged = false;
    for _ in 0..100 {
        if node.metric("kerfs_chunk_scrub_runs_total").await >= 1 {
            flagged = c
                .stat(ChunkStatRequest { chunk_id: 41 })
                .await
                .unwrap()
                .into_inner()
                .corrupt;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        flagged,
        "the recovery scrub did not run or did not flag chunk 41"
    );
    assert_eq!(node.metric("kerfs_chunk_scrub_corrupt_chunks").await, 1);
    drop(c);
    node.stop().await.unwrap();
    // After a clean stop, the next start does not scrub again.
    let node = Node::start(1, dir.path(), &key).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(node.metric("kerfs_chunk_scrub_runs_total").await, 0);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_chunks_and_carry_out_deletes() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::generate();
    let sent: Arc<Mutex<Vec<kerfs_proto::ChunkHeartbeat>>> = Arc::default();
    let mut cfg = config(7, CLUSTER, dir.path(), &key);
    cfg.failure_domain = "rack-a".into();
    let s = sent.clone();
    cfg.heartbeat = Some(kerfs_storage::HeartbeatConfig {
        interval: std::time::Duration::from_millis(100),
        full_report_every: 1000,
        send: Arc::new(move |hb| {
            let s = s.clone();
            Box::pin(async move {
                let mut s = s.lock().unwrap();
                // Once chunk 52 has been reported, ask to delete it (up to version 1).
                let delete = if hb.chunks.iter().any(|c| c.chunk_id == 52) {
                    vec![ChunkDeleteRequest {
                        chunk_id: 52,
                        max_version: 1,
                    }]
                } else {
                    vec![]
                };
                s.push(hb);
                Ok(kerfs_proto::ChunkHeartbeatReply {
                    delete,
                    want_full_report: false,
                    ..Default::default()
                })
            })
        }),
    });
    let node = Node::start_with(cfg).await;
    let mut c = node.client().await;
    write(&mut c, header(51, 1, 0, &[]), &[1u8; 1000])
        .await
        .unwrap();
    write(&mut c, header(52, 1, 0, &[]), &[2u8; 2000])
        .await
        .unwrap();
    let mut deleted_seen = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let s = sent.lock().unwrap();
        if s.iter().any(|h| h.deleted.contains(&52)) {
            deleted_seen = true;
            break;
        }
    }
    assert!(
        deleted_seen,
        "no heartbeat reported the deletion of chunk 52"
    );
    let s = sent.lock().unwrap().clone();
    let first = &s[0];
    assert!(first.full_report);
    let info = first.server.as_ref().unwrap();
    assert_eq!(info.id, 7);
    assert_eq!(info.address, node.addr);
    assert_eq!(info.failure_domain, "rack-a");
    assert_eq!(info.cluster_id, CLUSTER);
    assert!(info.capacity_bytes > 0 && info.available_bytes > 0);
    // Some heartbeat (full or delta) carried both chunks with their versions and lengths.
    let mut seen: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    assert!(s[1..].iter().all(|h| !h.full_report));
    for h in &s {
        for ch in &h.chunks {
            seen.insert(ch.chunk_id, (ch.version, ch.length));
        }
    }
    assert_eq!(seen.get(&51), Some(&(1, 1000)));
    assert_eq!(seen.get(&52), Some(&(1, 2000)));
    assert_eq!(
        read(&mut c, 52, 1, 0, 10).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(read(&mut c, 51, 1, 0, 10).await.unwrap(), vec![1u8; 10]);
    drop(c);
    node.stop().await.unwrap();
}
