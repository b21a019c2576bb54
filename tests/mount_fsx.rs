//! fsx through a real mount (issue 4): random file operations at random offsets, each
//! checked against an in-memory model of the files, plus focused tests of what fsx found and
//! of fallocate and copy_file_range.
//!
//! - `fsx_against_a_model`: 20,000 operations (`KERFS_FSX_OPS`) on three files of R=2:
//!   pwrite, pread, ftruncate down and up, writes and reads through shared mappings,
//!   fallocate (mode 0, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE), copy_file_range (between files
//!   and within one), fsync, close + reopen (sometimes O_TRUNC), fstat and stat by path.
//!   The seed is printed first and with a failure, together with the last operations;
//!   `KERFS_FSX_SEED=N` replays one, `KERFS_FSX_MMAP=0` leaves mappings out.
//!   `fsx_against_a_model_erasure_coded`: the same, 4,000 operations on EC 4+2 files.
//! - `lookup_keeps_the_size_of_buffered_writes`: the bug fsx found (see the test).
//! - `copy_file_range_on_the_mount`, `fallocate_on_the_mount`: the edge cases of both calls.
//! - `write_drops_file_capabilities`: the mount's cache of "no capabilities" ends when
//!   capabilities are set.
//!
//! Needs root, /dev/fuse and fuse3; fails (does not skip) without them.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerfs_tests::{
    blocking, ensure_same, env_u64, erasure, init_tracing, layout_dir, replicated,
    require_root_and_fuse, KerfsCluster, KerfsClusterOptions, Mount,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Each test starts a cluster on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster whose daemons keep their data on tmpfs (/dev/shm) when there is one: these
/// tests check what the mount returns, not durability, and on this kind of machine every
/// fsync of a chunk write or a raft entry costs about 3 ms of disk flush, which would be most
/// of the run time.
fn on_tmpfs() -> KerfsClusterOptions {
    let mut options = KerfsClusterOptions::default();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        options.meta.parent_dir = Some(shm.to_path_buf());
    }
    options
}

/// A cluster and a mount of it, with directory `/d` whose files have R=2 and 1 MiB chunks,
/// so that operations of a few hundred KiB cross chunk boundaries.
async fn cluster_and_mount(name: &str, options: &str) -> Result<(KerfsCluster, Mount, PathBuf)> {
    cluster_and_mount_with(name, options, replicated(2, MIB)).await
}

async fn cluster_and_mount_with(
    name: &str,
    options: &str,
    layout: kerfs_proto::Layout,
) -> Result<(KerfsCluster, Mount, PathBuf)> {
    let mut cluster_options = on_tmpfs();
    cluster_options.chunk_servers =
        u64::from(layout.replicas.max(layout.ec_data + layout.ec_parity)).max(3);
    let cluster = KerfsCluster::start(cluster_options).await?;
    let client = cluster.client().await?;
    layout_dir(&client, "d", layout).await?;
    let mount = Mount::new(&cluster, name, options)?;
    let dir = mount.path().join("d");
    Ok((cluster, mount, dir))
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate(2) on an open descriptor; the kernel checks the arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One copy_file_range(2) call with explicit offsets; returns the bytes it copied.
fn copy_file_range(
    src: &File,
    off_in: u64,
    dst: &File,
    off_out: u64,
    len: u64,
) -> std::io::Result<u64> {
    let (mut i, mut o) = (off_in as i64, off_out as i64);
    // SAFETY: both descriptors are open; the offsets are ours and outlive the call.
    let r = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut i,
            dst.as_raw_fd(),
            &mut o,
            len as usize,
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

// ------------------------------------------------------------------ fsx

/// Largest file the model lets grow to: a little over 4 chunks of 1 MiB.
const FSX_MAX_SIZE: u64 = 4 * MIB + 100 * KIB;
/// Largest single transfer.
const FSX_MAX_IO: u64 = 256 * KIB;
const FSX_FILES: usize = 3;
/// Operations remembered for the failure report.
const FSX_HISTORY: usize = 40;

struct FsxFile {
    path: PathBuf,
    file: File,
    model: Vec<u8>,
}

/// A mapping of part of a file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, offset: u64, len: usize, write: bool) -> std::io::Result<(Mapping, usize)> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let start = offset & !(page - 1);
        let delta = (offset - start) as usize;
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of an open file; the kernel checks the arguments.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                delta + len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok((
            Mapping {
                ptr,
                len: delta + len,
            },
            delta,
        ))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, mapped writable by the caller that writes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    fn msync(&self) -> std::io::Result<()> {
        // SAFETY: our own mapping.
        if unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// An offset: uniform over the file's range, or near a chunk boundary a quarter of the time.
fn pick_offset(rng: &mut StdRng, limit: u64) -> u64 {
    if limit == 0 {
        return 0;
    }
    if rng.gen_bool(0.25) {
        let boundary = MIB * rng.gen_range(1..=4u64);
        let near = boundary as i64 + rng.gen_range(-(8 * KIB as i64)..=(8 * KIB as i64));
        (near.max(0) as u64).min(limit - 1)
    } else {
        rng.gen_range(0..limit)
    }
}

/// A transfer size: log-uniform from 1 byte to 256 KiB (many small, some large).
fn pick_len(rng: &mut StdRng) -> u64 {
    let bits = rng.gen_range(0..=18u32);
    rng.gen_range(1..=(1u64 << bits)).min(FSX_MAX_IO)
}

fn open_rw(path: &Path, truncate: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
}

/// Reads `[offset, offset + len)` with pread and compares it with the model, length included.
fn check_range(f: &FsxFile, offset: u64, len: u64, what: &str) -> Result<()> {
    let size = f.model.len() as u64;
    let mut buf = vec![0u8; len as usize];
    let mut got = 0usize;
    while got < buf.len() {
        let n = f
            .file
            .read_at(&mut buf[got..], offset + got as u64)
            .with_context(|| format!("{what}: pread"))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let want_len = size.saturating_sub(offset).min(len) as usize;
    if got != want_len {
        // What the kernel and a fresh descriptor think, for the report.
        let fstat = f.file.metadata().map(|m| m.len());
        let again = f.file.read_at(&mut buf, offset);
        let fresh = File::open(&f.path).and_then(|g| g.read_at(&mut buf, offset));
        bail!(
            "{what}: pread returned {got} bytes, the model has {want_len} (model size {size:#x}); \
             now fstat says {fstat:?}, pread again {again:?}, pread on a fresh open {fresh:?}"
        );
    }
    let from = (offset.min(size)) as usize;
    let want = &f.model[from..from + want_len];
    ensure_same(
        &buf[..got],
        want,
        format!("{what}: data differs from the model"),
    )?;
    Ok(())
}

/// The model of fallocate(2) on a file of `model.len()` bytes, as Linux defines it.
fn fallocate_model(model: &mut Vec<u8>, mode: i32, off: u64, len: u64) {
    let size = model.len() as u64;
    let end = off + len;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 && off < size {
        model[off as usize..end.min(size) as usize].fill(0);
    }
    if !keep && end > size {
        model.resize(end as usize, 0);
    }
}

/// The fallocate modes fsx draws from.
const FSX_FALLOCATE_MODES: [(i32, &str); 5] = [
    (0, "0"),
    (libc::FALLOC_FL_KEEP_SIZE, "KEEP_SIZE"),
    (
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        "PUNCH_HOLE|KEEP_SIZE",
    ),
    (libc::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"),
    (
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        "ZERO_RANGE|KEEP_SIZE",
    ),
];

/// Runs one random operation on `files[which]`; returns its kind, a description for the
/// log, and whether the mount's answer matched the model (which it updates).
fn fsx_op(
    files: &mut [FsxFile],
    which: usize,
    rng: &mut StdRng,
    mmap: bool,
) -> (&'static str, String, Result<()>) {
    let mut roll = rng.gen_range(0..100u32);
    if !mmap && (47..=62).contains(&roll) {
        // Without mappings: plain writes and reads instead.
        roll = if roll < 55 { roll - 47 } else { roll - 55 + 22 };
    }
    let size = files[which].model.len() as u64;
    match roll {
        // pwrite at a random offset (may extend the file, may leave a hole).
        0..=21 => {
            let f = &mut files[which];
            let off = pick_offset(rng, FSX_MAX_SIZE);
            let len = pick_len(rng).min(FSX_MAX_SIZE - off);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            let r = f.file.write_all_at(&data, off).context("pwrite");
            let end = (off + len) as usize;
            if f.model.len() < end {
                f.model.resize(end, 0);
            }
            f.model[off as usize..end].copy_from_slice(&data);
            ("write", format!("pwrite {off:#x}+{len:#x}"), r)
        }
        // pread at a random offset, possibly past EOF.
        22..=39 => {
            let off = pick_offset(rng, size + 64 * KIB);
            let len = pick_len(rng);
            let r = check_range(&files[which], off, len, "pread");
            (
                "read",
                format!("pread {off:#x}+{len:#x} (size {size:#x})"),
                r,
            )
        }
        // ftruncate down or up.
        40..=46 => {
            let f = &mut files[which];
            let new = if rng.gen_bool(0.5) {
                rng.gen_range(0..=size)
            } else {
                pick_offset(rng, FSX_MAX_SIZE)
            };
            let r = f.file.set_len(new).context("ftruncate");
            f.model.resize(new as usize, 0);
            ("truncate", format!("ftruncate {size:#x} -> {new:#x}"), r)
        }
        // Write through a shared writable mapping, msync, unmap. A mapping cannot grow a
        // file, so extend it first with ftruncate, as fsx does.
        47..=54 => {
            let f = &mut files[which];
            let off = pick_offset(rng, FSX_MAX_SIZE);
            let len = pick_len(rng).min(FSX_MAX_SIZE - off);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            let end = off + len;
            let r = (|| -> Result<()> {
                if end > size {
                    f.file.set_len(end).context("ftruncate before mapwrite")?;
                }
                let (mut m, delta) =
                    Mapping::new(&f.file, off, len as usize, true).context("mmap")?;
                m.bytes_mut()[delta..delta + len as usize].copy_from_slice(&data);
                m.msync().context("msync")
            })();
            if f.model.len() < end as usize {
                f.model.resize(end as usize, 0);
            }
            f.model[off as usize..end as usize].copy_from_slice(&data);
            let desc = format!("mapwrite {off:#x}+{len:#x} (size {size:#x})");
            ("mapwrite", desc, r)
        }
        // Read through a shared read-only mapping (of at least one byte: an empty file
        // cannot be mapped).
        55..=62 => {
            let f = &files[which];
            let off = pick_offset(rng, size.max(1));
            let len = pick_len(rng).min(size.saturating_sub(off));
            let desc = format!("mapread {off:#x}+{len:#x} (size {size:#x})");
            if len == 0 {
                return ("mapread", desc + " skipped", Ok(()));
            }
            let r = (|| -> Result<()> {
                let (m, delta) = Mapping::new(&f.file, off, len as usize, false).context("mmap")?;
                let got = &m.bytes()[delta..delta + len as usize];
                let want = &f.model[off as usize..(off + len) as usize];
                ensure_same(got, want, "mapread: data differs from the model")?;
                Ok(())
            })();
            ("mapread", desc, r)
        }
        // fallocate in one of the modes the mount supports.
        63..=70 => {
            let f = &mut files[which];
            let (mode, name) = FSX_FALLOCATE_MODES[rng.gen_range(0..FSX_FALLOCATE_MODES.len())];
            let off = pick_offset(rng, FSX_MAX_SIZE);
            let len = pick_len(rng).min(FSX_MAX_SIZE - off);
            let r = fallocate(&f.file, mode, off, len).context("fallocate");
            fallocate_model(&mut f.model, mode, off, len);
            let desc = format!("fallocate {name} {off:#x}+{len:#x} (size {size:#x})");
            ("fallocate", desc, r)
        }
        // copy_file_range from a random file (this one included) into this one. Within one
        // file, overlapping ranges must fail with EINVAL and change nothing.
        71..=77 => {
            let from = rng.gen_range(0..FSX_FILES);
            let src_size = files[from].model.len() as u64;
            let off_in = pick_offset(rng, src_size + 16 * KIB);
            let off_out = pick_offset(rng, FSX_MAX_SIZE);
            let len = pick_len(rng).min(FSX_MAX_SIZE - off_out);
            let want = src_size.saturating_sub(off_in).min(len);
            // The kernel judges the overlap on the length cut at the source's end.
            let overlap = from == which && off_in < off_out + want && off_out < off_in + want;
            let desc = format!(
                "copy_file_range file {from} {off_in:#x} -> {off_out:#x}+{len:#x} \
                 (sizes {src_size:#x} -> {size:#x})"
            );
            let got = copy_file_range(&files[from].file, off_in, &files[which].file, off_out, len);
            let r = match got {
                Err(e) if overlap && e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                _ if overlap => Err(anyhow::anyhow!(
                    "copy_file_range of overlapping ranges returned {got:?}, not EINVAL"
                )),
                Ok(0) if want == 0 => Ok(()),
                Ok(n) if n == want => {
                    let bytes = files[from].model[off_in as usize..(off_in + n) as usize].to_vec();
                    let model = &mut files[which].model;
                    let end = (off_out + n) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off_out as usize..end].copy_from_slice(&bytes);
                    Ok(())
                }
                Ok(n) => Err(anyhow::anyhow!(
                    "copy_file_range copied {n:#x} bytes, the model has {want:#x}"
                )),
                Err(e) => Err(anyhow::Error::new(e).context("copy_file_range")),
            };
            ("copy", desc, r)
        }
        // fsync.
        78..=80 => {
            let r = files[which].file.sync_all().context("fsync");
            ("fsync", "fsync".to_string(), r)
        }
        // Close and reopen (the kernel drops its cached pages at open, so what follows
        // reads from the mount); one reopen in five truncates.
        81..=86 => {
            let f = &mut files[which];
            let trunc = rng.gen_bool(0.2);
            let desc = format!("reopen{}", if trunc { " O_TRUNC" } else { "" });
            let r = open_rw(&f.path, trunc).context("reopen").map(|file| {
                f.file = file;
            });
            if trunc {
                f.model.clear();
            }
            ("reopen", desc, r)
        }
        // fstat, or stat by path (a lookup once the kernel's entry expired): the size is
        // the model's.
        _ => {
            let f = &files[which];
            let (how, m) = if rng.gen_bool(0.5) {
                ("fstat", f.file.metadata())
            } else {
                ("stat", std::fs::metadata(&f.path))
            };
            let r = m.context(how).and_then(|m| {
                ensure!(
                    m.len() == size,
                    "{how} size {:#x}, the model has {size:#x}",
                    m.len()
                );
                Ok(())
            });
            ("stat", format!("{how} (size {size:#x})"), r)
        }
    }
}

/// Runs `ops` random operations in `dir`, a full read of one file every 1000, and a full
/// check of every file (fresh open, final size) at the end.
fn fsx(dir: &Path, seed: u64, ops: u64, mmap: bool) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut files = Vec::new();
    for i in 0..FSX_FILES {
        let path = dir.join(format!("fsx-{i}"));
        let file = open_rw(&path, true).with_context(|| format!("create {}", path.display()))?;
        files.push(FsxFile {
            path,
            file,
            model: Vec::new(),
        });
    }
    let mut history: VecDeque<String> = VecDeque::new();
    // Per kind: how many, and the time they took (where a slow run spends it).
    let mut counts = BTreeMap::<&str, (u64, Duration)>::new();
    let start = Instant::now();
    for n in 0..ops {
        let began = Instant::now();
        let which = rng.gen_range(0..FSX_FILES);
        let (kind, desc, result) = fsx_op(&mut files, which, &mut rng, mmap);
        let c = counts.entry(kind).or_default();
        c.0 += 1;
        c.1 += began.elapsed();
        history.push_back(format!("#{n} file {which}: {desc}"));
        if history.len() > FSX_HISTORY {
            history.pop_front();
        }
        let result = result.and_then(|()| {
            if n % 1000 == 999 {
                check_range(&files[which], 0, FSX_MAX_SIZE + MIB, "periodic full read")?;
            }
            Ok(())
        });
        if let Err(e) = result {
            bail!(
                "fsx seed {seed} (replay with KERFS_FSX_SEED={seed}): operation #{n} on {} \
                 failed: {e:#}\nlast operations:\n{}",
                files[which].path.display(),
                Vec::from(history).join("\n")
            );
        }
        if n % 5000 == 4999 {
            info!(done = n + 1, elapsed = ?start.elapsed(), "fsx progress");
        }
    }
    let elapsed = start.elapsed();
    info!(
        ops,
        ?elapsed,
        ops_per_sec = (ops as f64 / elapsed.as_secs_f64()).round(),
        ?counts,
        "fsx operations done"
    );
    // Every file through a fresh open (no cached pages) and as the final size.
    for (i, f) in files.iter_mut().enumerate() {
        f.file.sync_all()?;
        f.file = open_rw(&f.path, false)?;
        let len = std::fs::metadata(&f.path)?.len();
        ensure!(
            len == f.model.len() as u64,
            "fsx seed {seed}: final size of file {i} is {len:#x}, the model has {:#x}",
            f.model.len()
        );
        check_range(f, 0, FSX_MAX_SIZE + MIB, "final read")
            .with_context(|| format!("fsx seed {seed}: file {i}"))?;
    }
    Ok(())
}

/// One fsx run on files of `layout`: the seed from `KERFS_FSX_SEED` or random, `ops`
/// operations unless `KERFS_FSX_OPS` says otherwise.
async fn fsx_run(name: &str, layout: kerfs_proto::Layout, ops: u64) -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let seed = env_u64("KERFS_FSX_SEED").unwrap_or_else(|| rand::thread_rng().gen());
    let ops = env_u64("KERFS_FSX_OPS").unwrap_or(ops);
    let mmap = env_u64("KERFS_FSX_MMAP").unwrap_or(1) != 0;
    eprintln!(
        "fsx {name}: seed {seed} (replay with KERFS_FSX_SEED={seed}), {ops} operations, \
         mappings {}",
        if mmap { "on" } else { "off" }
    );
    let (_cluster, mount, dir) = cluster_and_mount_with(name, "", layout).await?;
    let start = Instant::now();
    blocking(&[&mount], move || fsx(&dir, seed, ops, mmap)).await;
    info!(name, seed, ops, elapsed = ?start.elapsed(), "fsx: every operation matched the model");
    mount.unmount()?;
    Ok(())
}

/// The 20,000 operations, on replicated files (R=2, 1 MiB chunks).
#[tokio::test(flavor = "multi_thread")]
async fn fsx_against_a_model() -> Result<()> {
    fsx_run("fsx", replicated(2, MIB), 20_000).await
}

/// Fewer operations on erasure-coded files (4+2, 1 MiB chunks): partial stripes make every
/// small write, truncate and hole a read-modify-write on the chunk servers.
#[tokio::test(flavor = "multi_thread")]
async fn fsx_against_a_model_erasure_coded() -> Result<()> {
    fsx_run("fsx-ec", erasure(4, 2, MIB), 4_000).await
}

// ------------------------------------------------------------------ focused tests

/// A lookup of a file that is open here with writes still in the write-behind buffer must
/// report the size those writes made, as getattr does: the kernel applies the size a lookup
/// returns to its cached inode, so a lookup with the cluster's older size made the writer's
/// own fstat and pread see the file shrink (fsx found it after close + reopen).
#[tokio::test(flavor = "multi_thread")]
async fn lookup_keeps_the_size_of_buffered_writes() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    // Entries expire at once, so every path walk below is a lookup; attributes are cached,
    // so fstat and pread believe what the last lookup said.
    let (_cluster, mount, dir) = cluster_and_mount("lookup", ",entry_timeout=0").await?;
    blocking(&[&mount], move || {
        let path = dir.join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let file = open_rw(&path, true)?;
        file.write_all_at(&data[..1000], 0)?;
        file.sync_all()?;
        // Buffered, not yet in the cluster: the cluster still says 1000 bytes.
        file.write_all_at(&data[1000..], 1000)?;
        let by_path = std::fs::metadata(&path)?.len();
        let by_fd = file.metadata()?.len();
        ensure!(
            by_path == data.len() as u64 && by_fd == data.len() as u64,
            "after buffered writes to {} bytes: stat says {by_path}, fstat says {by_fd}",
            data.len()
        );
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0)
            .context("pread of what this descriptor wrote")?;
        ensure_same(&back, &data, "read back")?;
        Ok(())
    })
    .await;
    mount.unmount()?;
    Ok(())
}

/// copy_file_range(2) on the mount: between two files (several chunks, a short copy at the
/// source's end, an extension of the destination), from a file whose writes are still
/// buffered, within one file, and the errors.
#[tokio::test(flavor = "multi_thread")]
async fn copy_file_range_on_the_mount() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (_cluster, mount, dir) = cluster_and_mount("copy", "").await?;
    blocking(&[&mount], move || {
        let mut rng = StdRng::seed_from_u64(7);
        let mut data = vec![0u8; (5 * MIB + 12_345) as usize];
        rng.fill(&mut data[..]);
        std::fs::write(dir.join("src"), &data)?;
        let src = File::open(dir.join("src"))?;
        let dst = open_rw(&dir.join("dst"), true)?;
        let mut model = Vec::new();

        // The whole file, at an unaligned destination offset: extends the destination,
        // leaving a hole of zeros before it.
        let n = copy_file_range(&src, 0, &dst, 1000, data.len() as u64 + MIB)?;
        ensure!(n == data.len() as u64, "copied {n} bytes of {}", data.len());
        model.resize(1000, 0);
        model.extend_from_slice(&data);

        // A part crossing chunk boundaries, over existing bytes.
        let n = copy_file_range(&src, MIB - 7, &dst, 3 * MIB + 5, 2 * MIB)?;
        ensure!(n == 2 * MIB, "copied {n} bytes of {}", 2 * MIB);
        let (from, to) = ((MIB - 7) as usize, (3 * MIB + 5) as usize);
        model[to..to + (2 * MIB) as usize].copy_from_slice(&data[from..from + (2 * MIB) as usize]);

        // At and past the source's end: short, then nothing.
        let n = copy_file_range(&src, data.len() as u64 - 10, &dst, 0, 100)?;
        ensure!(n == 10, "a copy of the last 10 bytes copied {n}");
        model[..10].copy_from_slice(&data[data.len() - 10..]);
        let n = copy_file_range(&src, data.len() as u64 + 1, &dst, 0, 100)?;
        ensure!(n == 0, "a copy from past the end copied {n}");

        // From a descriptor whose writes are still in the mount's write-behind buffer.
        let patch = vec![0xa5u8; 70_000];
        dst.write_all_at(&patch, 2 * MIB)?;
        model[(2 * MIB) as usize..(2 * MIB) as usize + patch.len()].copy_from_slice(&patch);
        let n = copy_file_range(&dst, 2 * MIB, &dst, 6 * MIB, patch.len() as u64)?;
        ensure!(
            n == patch.len() as u64,
            "copied {n} bytes of {}",
            patch.len()
        );
        model.resize((6 * MIB) as usize, 0);
        model.extend_from_slice(&patch);

        // Within one file, overlapping: EINVAL.
        let r = copy_file_range(&dst, 0, &dst, 100, 1000);
        ensure!(
            errno_of(r) == Some(libc::EINVAL),
            "an overlapping copy within one file did not fail with EINVAL"
        );
        // Into a descriptor not open for writing: EBADF.
        let r = copy_file_range(&dst, 0, &src, 0, 10);
        ensure!(
            errno_of(r) == Some(libc::EBADF),
            "a copy into a read-only descriptor"
        );

        ensure!(
            dst.metadata()?.len() == model.len() as u64,
            "size after the copies"
        );
        let got = std::fs::read(dir.join("dst"))?;
        ensure_same(&got, &model, "after the copies")?;
        // And again after close, through a fresh open.
        drop(dst);
        let got = std::fs::read(dir.join("dst"))?;
        ensure_same(&got, &model, "after close")?;
        Ok(())
    })
    .await;
    mount.unmount()?;
    Ok(())
}

/// fallocate(2) on the mount: every supported mode against the model, over buffered and
/// flushed bytes, and EOPNOTSUPP for the modes the mount does not have.
#[tokio::test(flavor = "multi_thread")]
async fn fallocate_on_the_mount() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (_cluster, mount, dir) = cluster_and_mount("fallocate", "").await?;
    blocking(&[&mount], move || {
        let path = dir.join("f");
        let f = open_rw(&path, true)?;
        let mut model = Vec::new();
        let steps: [(i32, u64, u64, bool); 8] = [
            // mode, offset, length, fsync first
            (0, 0, 567, false),
            (0, 20_000, 3 * MIB, false),
            (libc::FALLOC_FL_KEEP_SIZE, 3 * MIB, 2 * MIB, false),
            (
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                MIB - 10,
                4096,
                true,
            ),
            (
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                3 * MIB,
                MIB,
                false,
            ),
            (libc::FALLOC_FL_ZERO_RANGE, 100, 200_000, false),
            (
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                3 * MIB,
                2 * MIB,
                false,
            ),
            (libc::FALLOC_FL_ZERO_RANGE, 3 * MIB, 2 * MIB, true),
        ];
        let mut rng = StdRng::seed_from_u64(3);
        for (i, (mode, off, len, sync)) in steps.into_iter().enumerate() {
            // Fresh random bytes over the whole file, so that zeroing shows.
            let mut data = vec![0u8; model.len()];
            rng.fill(&mut data[..]);
            f.write_all_at(&data, 0)?;
            model.copy_from_slice(&data);
            if sync {
                f.sync_all()?;
            }
            fallocate(&f, mode, off, len)
                .with_context(|| format!("step {i}: fallocate mode {mode:#x} {off}+{len}"))?;
            fallocate_model(&mut model, mode, off, len);
            let size = f.metadata()?.len();
            ensure!(
                size == model.len() as u64,
                "step {i}: size {size} after fallocate mode {mode:#x}, want {}",
                model.len()
            );
            let mut got = vec![0u8; model.len()];
            f.read_exact_at(&mut got, 0)?;
            ensure_same(&got, &model, format!("step {i}"))?;
        }
        for (mode, what) in [
            (libc::FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"),
            (libc::FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"),
            (libc::FALLOC_FL_PUNCH_HOLE, "PUNCH_HOLE without KEEP_SIZE"),
        ] {
            let r = fallocate(&f, mode, 0, 4096);
            ensure!(
                errno_of(r) == Some(libc::EOPNOTSUPP),
                "fallocate {what} did not fail with EOPNOTSUPP"
            );
        }
        drop(f);
        let got = std::fs::read(&path)?;
        ensure_same(&got, &model, "after close")?;
        Ok(())
    })
    .await;
    mount.unmount()?;
    Ok(())
}

/// The mount remembers for a while that a file has no `security.capability` (the kernel asks
/// before every write, to drop file capabilities): setting one must end that, so that the
/// next write still drops it, as on any filesystem.
#[tokio::test(flavor = "multi_thread")]
async fn write_drops_file_capabilities() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let (_cluster, mount, dir) = cluster_and_mount("caps", "").await?;
    blocking(&[&mount], move || {
        let path = dir.join("prog");
        let f = open_rw(&path, true)?;
        // Writes with no capabilities set: the mount now knows the file has none.
        f.write_all_at(b"first", 0)?;
        f.write_all_at(b"second", 5)?;
        // struct vfs_cap_data, revision 2: CAP_NET_BIND_SERVICE (bit 10) permitted.
        let mut caps = Vec::new();
        caps.extend_from_slice(&0x0200_0000u32.to_le_bytes());
        caps.extend_from_slice(&(1u32 << 10).to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        caps.extend_from_slice(&0u32.to_le_bytes());
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        let name = c"security.capability";
        // SAFETY: valid C strings and a buffer of the given length.
        let r = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                name.as_ptr(),
                caps.as_ptr().cast(),
                caps.len(),
                0,
            )
        };
        ensure!(
            r == 0,
            "setxattr security.capability: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 64];
        // SAFETY: as above, into a buffer of the given length.
        let size = |buf: &mut [u8]| unsafe {
            libc::getxattr(
                c_path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        ensure!(
            size(&mut buf) == caps.len() as isize,
            "capabilities not set"
        );
        f.write_all_at(b"third", 11)?;
        let after = size(&mut buf);
        let errno = std::io::Error::last_os_error().raw_os_error();
        ensure!(
            after < 0 && errno == Some(libc::ENODATA),
            "a write after setting file capabilities left them in place (getxattr {after})"
        );
        Ok(())
    })
    .await;
    mount.unmount()?;
    Ok(())
}
