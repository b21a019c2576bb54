//! Metadata throughput: creates/s and linearizable stats/s through the client library
//! against a 3-node cluster of real `kerfsd meta` processes on this machine, with 1 and 16
//! concurrent clients, printed next to the same operations on a local directory in the same
//! run (the ratio is what to compare across machines; these machines are shared and noisy).
//!
//! Run: `cargo build --release -p kerfs-cli -p kerfs-bench --bin kerfsd --bin meta-bench &&
//! target/release/meta-bench --ops 2000 [--read-mode read-index]`

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use kerfs_proto::ROOT_INO;
use kerfs_tests::{MetaCluster, MetaClusterOptions};

#[derive(Parser)]
struct Args {
    /// Operations per client and phase.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// Client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// `--read-mode` of the metadata nodes (default: the daemon's, `lease`).
    #[arg(long, value_parser = ["lease", "read-index"])]
    read_mode: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let read_mode = match args.read_mode.as_deref() {
        Some("read-index") => Some("read-index"),
        Some(_) => Some("lease"),
        None => None,
    };
    let cluster = MetaCluster::start(MetaClusterOptions {
        read_mode,
        ..Default::default()
    })?;
    let admin = cluster.client().await?;
    cluster.wait_leader(&admin, Duration::from_secs(10)).await?;
    let local = tempfile::tempdir()?;

    println!(
        "{:<8} {:>8} {:>14} {:>14} {:>8}",
        "op", "clients", "kerfs ops/s", "local ops/s", "ratio"
    );
    for &n in &args.clients {
        let run = format!("run{n}");
        let top = admin.mkdir(ROOT_INO, run.as_bytes(), 0o755).await?;
        let mut clients = Vec::new();
        let mut dirs = Vec::new();
        for c in 0..n {
            let client = cluster.client().await?;
            dirs.push(
                client
                    .mkdir(top.ino, format!("c{c}").as_bytes(), 0o755)
                    .await?
                    .ino,
            );
            clients.push(client);
        }

        // creates
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (client, dir) in clients.iter().cloned().zip(dirs.iter().copied()) {
            let ops = args.ops;
            tasks.push(tokio::spawn(async move {
                for i in 0..ops {
                    client
                        .create_file(dir, format!("f{i}").as_bytes(), 0o644)
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let kerfs_creates = (n * args.ops) as f64 / start.elapsed().as_secs_f64();
        let local_creates = local_phase(local.path(), n, args.ops, true)?;
        report("create", n, kerfs_creates, local_creates);

        // stats (linearizable getattr: inside the leader lease, or after a ReadIndex round)
        let attrs: Vec<Vec<u64>> = {
            let mut all = Vec::new();
            for (client, dir) in clients.iter().zip(&dirs) {
                let entries = client.readdir_all(*dir).await?;
                all.push(entries.iter().map(|e| e.ino).collect());
            }
            all
        };
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (client, inos) in clients.iter().cloned().zip(attrs) {
            tasks.push(tokio::spawn(async move {
                for ino in inos {
                    client.getattr(ino).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let kerfs_stats = (n * args.ops) as f64 / start.elapsed().as_secs_f64();
        let local_stats = local_phase(local.path(), n, args.ops, false)?;
        report("stat", n, kerfs_stats, local_stats);
    }
    Ok(())
}

fn report(op: &str, clients: usize, kerfs: f64, local: f64) {
    println!(
        "{op:<8} {clients:>8} {kerfs:>14.0} {local:>14.0} {:>8.3}",
        kerfs / local
    );
}

/// The same workload on the local disk: `n` threads, each in its own directory.
fn local_phase(root: &std::path::Path, n: usize, ops: usize, create: bool) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for c in 0..n {
            let dir = root.join(format!("n{n}-c{c}"));
            handles.push(s.spawn(move || -> Result<()> {
                if create {
                    std::fs::create_dir_all(&dir)?;
                }
                for i in 0..ops {
                    let p = dir.join(format!("f{i}"));
                    if create {
                        std::fs::File::create(&p)?;
                    } else {
                        std::fs::metadata(&p)?;
                    }
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("local worker panicked"))??;
        }
        Ok(())
    })?;
    Ok((n * ops) as f64 / start.elapsed().as_secs_f64())
}
