//! Data path throughput through the client library, against real `kerfsd meta` (3 nodes) and
//! `kerfsd chunk` processes on this machine, each workload next to the same workload on the
//! local disk in the same run (the ratio is what to compare; these machines are shared):
//!
//! * sequential write of one file in `--request-kib` requests, then fsync/close;
//! * sequential read of that file (page cache dropped before the read, for KerFS and for the
//!   local file alike, unless `--no-drop-caches`);
//! * `--writers` concurrent writers of `--writer-mib` each (one file each, fsync/close).
//!
//! For R=2 on 3 chunk servers and EC 4+2 on 6 (`--layouts r2,ec42`). All chunk servers share
//! the local disk, so R=2 writes twice the bytes the local baseline writes, EC 4+2 1.5 times.
//! Also: CPU-seconds per GiB written (and read) (utime+stime from /proc/PID/stat of every
//! cluster process plus this one, before and after each phase; the local figure is this
//! process only: neither counts kernel writeback threads).
//!
//! Run: `cargo build --release -p kerfs-cli -p kerfs-bench --bin kerfsd --bin data-bench &&
//! target/release/data-bench` (as root, to drop the page cache).
//! (quick: `--seq-mib 256 --writer-mib 32`).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use kerfs_client::{DataClient, MetaClient};
use kerfs_proto::{command, Layout, ROOT_INO};
use kerfs_tests::{KerfsCluster, KerfsClusterOptions};

const MIB: u64 = 1024 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Parser)]
struct Args {
    /// Size of the sequentially written and read file (MiB).
    #[arg(long, default_value_t = 2048)]
    seq_mib: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Bytes each concurrent writer writes (MiB).
    #[arg(long, default_value_t = 256)]
    writer_mib: u64,
    /// Size of every read and write request (KiB).
    #[arg(long, default_value_t = 1024)]
    request_kib: u64,
    /// Chunk size of the layouts (MiB).
    #[arg(long, default_value_t = 64)]
    chunk_mib: u64,
    /// Layouts to measure: r2 (3 chunk servers), ec42 (6 chunk servers), r1, r3.
    #[arg(long, value_delimiter = ',', default_value = "r2,ec42")]
    layouts: Vec<String>,
    /// Do not drop the page cache between writes and reads.
    #[arg(long)]
    no_drop_caches: bool,
}

/// One measured workload: MiB/s and CPU-seconds for KerFS and local.
struct Row {
    layout: String,
    workload: String,
    kerfs_mib_s: f64,
    local_mib_s: f64,
    /// Client (this process), metadata nodes, chunk servers.
    kerfs_cpu_per_gib: Option<[f64; 3]>,
    local_cpu_per_gib: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.request_kib > 0 && args.seq_mib > 0 && args.writer_mib > 0);
    let request = (args.request_kib * 1024) as usize;
    let pattern = pattern(request);
    println!(
        "data-bench: seq {} MiB, {} writers x {} MiB, {} KiB requests, {} MiB chunks, caches {}; load average at start: {}",
        args.seq_mib,
        args.writers,
        args.writer_mib,
        args.request_kib,
        args.chunk_mib,
        if args.no_drop_caches { "not dropped" } else { "dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every read" },
        loadavg()
    );
    let mut rows = Vec::new();
    for name in &args.layouts {
        let (label, servers, layout) = match name.as_str() {
            "r1" => ("R=1, 3 servers", 3, replicated(1, args.chunk_mib)),
            "r2" => ("R=2, 3 servers", 3, replicated(2, args.chunk_mib)),
            "r3" => ("R=3, 3 servers", 3, replicated(3, args.chunk_mib)),
            "ec42" => (
                "EC 4+2, 6 servers",
                6,
                Layout {
                    ec_data: 4,
                    ec_parity: 2,
                    chunk_size: args.chunk_mib * MIB,
                    ..Default::default()
                },
            ),
            other => bail!("unknown layout {other:?}: r1, r2, r3 or ec42"),
        };
        eprintln!("[{label}] starting the cluster");
        let cluster = KerfsCluster::start(KerfsClusterOptions {
            chunk_servers: servers,
            ..Default::default()
        })
        .await?;
        let meta = cluster.client().await?;
        cluster
            .meta
            .wait_leader(&meta, Duration::from_secs(20))
            .await?;
        let dir = layout_dir(&meta, name, layout).await?;
        let data = DataClient::new(meta.clone());
        let local = cluster.meta.dir.path().join("local");
        std::fs::create_dir_all(&local)?;
        rows.extend(
            run_layout(&args, label, &cluster, &data, dir, &local, &pattern)
                .await
                .with_context(|| format!("layout {label}"))?,
        );
        drop(data);
        drop(cluster);
    }

    println!();
    println!("| layout | workload | KerFS MiB/s | local MiB/s | ratio | KerFS CPU-s per GiB moved (client+meta+chunk) | local CPU-s/GiB |");
    println!("|---|---|---|---|---|---|---|");
    let cpu = |c: Option<f64>| c.map_or("—".to_string(), |c| format!("{c:.2}"));
    let split = |c: Option<[f64; 3]>| {
        c.map_or("—".to_string(), |[a, b, d]| {
            format!("{:.2} ({a:.2}+{b:.2}+{d:.2})", a + b + d)
        })
    };
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {} | {} |",
            r.layout,
            r.workload,
            r.kerfs_mib_s,
            r.local_mib_s,
            r.kerfs_mib_s / r.local_mib_s,
            split(r.kerfs_cpu_per_gib),
            cpu(r.local_cpu_per_gib)
        );
    }
    println!("load average at the end: {}", loadavg());
    Ok(())
}

async fn run_layout(
    args: &Args,
    label: &str,
    cluster: &KerfsCluster,
    data: &DataClient,
    dir: u64,
    local: &Path,
    pattern: &[u8],
) -> Result<Vec<Row>> {
    let request = pattern.len();
    let seq_bytes = args.seq_mib * MIB;
    let mut rows = Vec::new();
    let pids = cluster.pids();
    let n_meta = cluster.meta.nodes.len();

    // Sequential write.
    eprintln!("[{label}] KerFS: sequential write of {} MiB", args.seq_mib);
    let cpu0 = cluster_cpu(&pids, n_meta)?;
    let t = Instant::now();
    let f = data.create(dir, b"seq", 0o644, true).await?;
    let mut pos = 0u64;
    while pos < seq_bytes {
        let n = (seq_bytes - pos).min(request as u64) as usize;
        f.write_at(pos, &pattern[..n]).await?;
        pos += n as u64;
    }
    f.close().await?;
    let kerfs_w = seq_bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let kerfs_w_cpu = per_gib(cpu0, cluster_cpu(&pids, n_meta)?, seq_bytes);
    let ino = f.ino();

    eprintln!("[{label}] local: sequential write of {} MiB", args.seq_mib);
    let path = local.join("seq");
    let cpu0 = cpu_seconds(&[])?;
    let t = Instant::now();
    {
        let mut file = std::fs::File::create(&path)?;
        let mut pos = 0u64;
        while pos < seq_bytes {
            let n = (seq_bytes - pos).min(request as u64) as usize;
            file.write_all(&pattern[..n])?;
            pos += n as u64;
        }
        file.sync_all()?;
    }
    let local_w = seq_bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let local_w_cpu = (cpu_seconds(&[])? - cpu0) / (seq_bytes as f64 / GIB);
    rows.push(Row {
        layout: label.into(),
        workload: format!(
            "sequential write {} MiB ({} KiB requests, fsync at the end)",
            args.seq_mib, args.request_kib
        ),
        kerfs_mib_s: kerfs_w,
        local_mib_s: local_w,
        kerfs_cpu_per_gib: Some(kerfs_w_cpu),
        local_cpu_per_gib: Some(local_w_cpu),
    });

    // Sequential read, cold caches.
    drop_caches(args)?;
    eprintln!("[{label}] KerFS: sequential read");
    let cpu0 = cluster_cpu(&pids, n_meta)?;
    let t = Instant::now();
    let f = data.open(ino, libc_rdonly()).await?;
    ensure!(f.size() == seq_bytes, "KerFS file size {}", f.size());
    let mut pos = 0u64;
    while pos < seq_bytes {
        let buf = f.read_at(pos, request).await?;
        ensure!(
            buf[..] == pattern[..buf.len()],
            "KerFS read at {pos} returned wrong data"
        );
        ensure!(!buf.is_empty(), "short read at {pos}");
        pos += buf.len() as u64;
    }
    f.close().await?;
    let kerfs_r = seq_bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let kerfs_r_cpu = per_gib(cpu0, cluster_cpu(&pids, n_meta)?, seq_bytes);

    drop_caches(args)?;
    eprintln!("[{label}] local: sequential read");
    let cpu0 = cpu_seconds(&[])?;
    let t = Instant::now();
    {
        let mut file = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; request];
        let mut pos = 0u64;
        while pos < seq_bytes {
            let n = (seq_bytes - pos).min(request as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            ensure!(buf[..n] == pattern[..n], "local read at {pos} differs");
            pos += n as u64;
        }
    }
    let local_r = seq_bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let local_r_cpu = (cpu_seconds(&[])? - cpu0) / (seq_bytes as f64 / GIB);
    std::fs::remove_file(&path)?;
    rows.push(Row {
        layout: label.into(),
        workload: format!(
            "sequential read {} MiB ({} KiB requests, cold cache)",
            args.seq_mib, args.request_kib
        ),
        kerfs_mib_s: kerfs_r,
        local_mib_s: local_r,
        kerfs_cpu_per_gib: Some(kerfs_r_cpu),
        local_cpu_per_gib: Some(local_r_cpu),
    });

    // Concurrent writers.
    let per = args.writer_mib * MIB;
    let total = per * args.writers as u64;
    eprintln!(
        "[{label}] KerFS: {} writers x {} MiB",
        args.writers, args.writer_mib
    );
    // FileHandle futures cannot go to tokio::spawn (rustc cannot prove them Send, see
    // kerfs/src/fuse.rs), so each writer is a thread with its own current-thread runtime and
    // its own client connections, as the FUSE mount runs its data path.
    let config = cluster.meta.client_config();
    let cpu0 = cluster_cpu(&pids, n_meta)?;
    let t = Instant::now();
    let threads: Vec<_> = (0..args.writers)
        .map(|w| {
            let config = config.clone();
            let pattern = pattern.to_vec();
            std::thread::spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let meta = MetaClient::connect(config).await?;
                    let data = DataClient::new(meta);
                    let f = data
                        .create(dir, format!("w{w}").as_bytes(), 0o644, true)
                        .await?;
                    let mut pos = 0u64;
                    while pos < per {
                        let n = (per - pos).min(pattern.len() as u64) as usize;
                        f.write_at(pos, &pattern[..n]).await?;
                        pos += n as u64;
                    }
                    f.close().await?;
                    Ok(())
                })
            })
        })
        .collect();
    tokio::task::block_in_place(|| -> Result<()> {
        for h in threads {
            h.join()
                .map_err(|_| anyhow::anyhow!("KerFS writer panicked"))??;
        }
        Ok(())
    })?;
    let kerfs_c = total as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let kerfs_c_cpu = per_gib(cpu0, cluster_cpu(&pids, n_meta)?, total);

    eprintln!(
        "[{label}] local: {} writers x {} MiB",
        args.writers, args.writer_mib
    );
    let cpu0 = cpu_seconds(&[])?;
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..args.writers)
            .map(|w| {
                let path = local.join(format!("w{w}"));
                s.spawn(move || -> Result<()> {
                    let mut file = std::fs::File::create(&path)?;
                    let mut pos = 0u64;
                    while pos < per {
                        let n = (per - pos).min(pattern.len() as u64) as usize;
                        file.write_all(&pattern[..n])?;
                        pos += n as u64;
                    }
                    file.sync_all()?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("local writer panicked"))??;
        }
        Ok(())
    })?;
    let local_c = total as f64 / MIB as f64 / t.elapsed().as_secs_f64();
    let local_c_cpu = (cpu_seconds(&[])? - cpu0) / (total as f64 / GIB);
    for w in 0..args.writers {
        std::fs::remove_file(local.join(format!("w{w}")))?;
    }
    rows.push(Row {
        layout: label.into(),
        workload: format!(
            "{} concurrent writers x {} MiB (fsync at the end)",
            args.writers, args.writer_mib
        ),
        kerfs_mib_s: kerfs_c,
        local_mib_s: local_c,
        kerfs_cpu_per_gib: Some(kerfs_c_cpu),
        local_cpu_per_gib: Some(local_c_cpu),
    });
    for r in &rows {
        eprintln!(
            "[{label}] {}: KerFS {:.0} MiB/s, local {:.0} MiB/s, ratio {:.2}",
            r.workload,
            r.kerfs_mib_s,
            r.local_mib_s,
            r.kerfs_mib_s / r.local_mib_s
        );
    }
    Ok(rows)
}

fn replicated(r: u32, chunk_mib: u64) -> Layout {
    Layout {
        replicas: r,
        chunk_size: chunk_mib * MIB,
        ..Default::default()
    }
}

fn libc_rdonly() -> u32 {
    0 // O_RDONLY
}

async fn layout_dir(meta: &MetaClient, name: &str, layout: Layout) -> Result<u64> {
    let dir = meta.mkdir(ROOT_INO, name.as_bytes(), 0o755).await?;
    let r = meta
        .write(command::Op::SetLayout(kerfs_proto::SetLayout {
            ino: dir.ino,
            layout: Some(layout),
        }))
        .await?;
    kerfs_client::check(r).context("set_layout")?;
    Ok(dir.ino)
}

/// Incompressible request-sized data (splitmix64), the same for KerFS and local.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes dirty pages back and drops the page cache (root only); says so when it cannot.
fn drop_caches(args: &Args) -> Result<()> {
    if args.no_drop_caches {
        return Ok(());
    }
    let status = std::process::Command::new("sync").status()?;
    ensure!(status.success(), "sync failed");
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").context(
        "dropping the page cache (/proc/sys/vm/drop_caches needs root); run with --no-drop-caches otherwise",
    )?;
    Ok(())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime (seconds) of this process and of `pids`.
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut paths = vec!["/proc/self/stat".to_string()];
    paths.extend(pids.iter().map(|p| format!("/proc/{p}/stat")));
    stat_seconds(&paths)
}

/// Sum of utime + stime (seconds) of the processes whose /proc/PID/stat are `paths`.
fn stat_seconds(paths: &[String]) -> Result<f64> {
    let ticks = clock_ticks();
    let mut total = 0u64;
    for path in paths {
        let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14,
        // stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("parsing {path}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).context("utime")?.parse()?;
        let stime: u64 = fields.get(12).context("stime")?.parse()?;
        total += utime + stime;
    }
    Ok(total as f64 / ticks)
}

/// CPU-seconds so far of this process (the client), the metadata nodes (the first `n_meta`
/// of `pids`) and the chunk servers (the rest).
fn cluster_cpu(pids: &[u32], n_meta: usize) -> Result<[f64; 3]> {
    let stat = |p: &[u32]| -> Vec<String> { p.iter().map(|p| format!("/proc/{p}/stat")).collect() };
    Ok([
        stat_seconds(&["/proc/self/stat".to_string()])?,
        stat_seconds(&stat(&pids[..n_meta]))?,
        stat_seconds(&stat(&pids[n_meta..]))?,
    ])
}

fn per_gib(before: [f64; 3], after: [f64; 3], bytes: u64) -> [f64; 3] {
    let gib = bytes as f64 / GIB;
    [0, 1, 2].map(|i| (after[i] - before[i]) / gib)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
