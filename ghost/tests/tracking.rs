//! Write tracking: an export that takes unchanged pages from the previous image must give the
//! same memory as a full export, whatever the process did in between (user stores, kernel
//! writes, pages zapped, mappings moved).

mod common;

use std::collections::HashMap;
use std::io;

use common::*;
use kerfs_ghost::image::{END_MAGIC, TRAILER_LEN};
use kerfs_ghost::*;

const PAGE: usize = 4096;

/// Every stored page of an image, by address.
fn pages_by_addr(img: &LoadedImage) -> HashMap<u64, Vec<u8>> {
    let mut out = HashMap::new();
    let mut at = 0;
    for m in &img.meta.mappings {
        for r in &m.runs {
            for i in 0..r.npages {
                out.insert(
                    r.addr + i * PAGE as u64,
                    img.pages()[at..at + PAGE].to_vec(),
                );
                at += PAGE;
            }
        }
    }
    out
}

/// A writer that holds the previous image, as the checkpoint store does: pages offered as
/// unchanged are copied from it, and the trailer is re-created over the assembled image.
struct Rebuilder<'a> {
    base: &'a HashMap<u64, Vec<u8>>,
    buf: Vec<u8>,
    /// (address, pages) of every offer taken.
    taken: Vec<(u64, u64)>,
}

impl GhostWriter for Rebuilder<'_> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(b);
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        let body = self.buf.len() - TRAILER_LEN;
        let hash = blake3::hash(&self.buf[..body]);
        self.buf.truncate(body);
        self.buf.extend_from_slice(hash.as_bytes());
        self.buf.extend_from_slice(END_MAGIC);
        Ok(())
    }
    fn describe(&self) -> String {
        "rebuilder".into()
    }
    fn reuse_pages(&mut self, addr: u64, npages: u64) -> io::Result<bool> {
        let addrs = (0..npages).map(|i| addr + i * PAGE as u64);
        if !addrs.clone().all(|a| self.base.contains_key(&a)) {
            return Ok(false);
        }
        for a in addrs {
            self.buf.extend_from_slice(&self.base[&a]);
        }
        self.taken.push((addr, npages));
        Ok(true)
    }
}

fn export_to_mem(pid: i32, opts: &ExportOptions) -> (LoadedImage, ExportReport) {
    let mut w = MemWriter::default();
    let rep = export_process(pid, opts, &mut w).expect("export");
    let img = load_image(&mut MemReader::new(&w.buf)).expect("load");
    (img, rep)
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("address in the log")
}

#[test]
fn unchanged_pages_are_exactly_the_untouched_ones() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let prog = build(dir.path(), "tracked", &[]);
    let log = dir.path().join("log");
    let src = dir.path().join("src");
    std::fs::write(&src, vec![0xEEu8; PAGE]).unwrap();
    let mut child = spawn(&prog, &[log.to_str().unwrap(), src.to_str().unwrap()]);
    let pid = child.id() as i32;
    let ready = wait_for(&log, "READY", 30, |s| s.contains("READY"));
    let addrs: Vec<u64> = ready.split_whitespace().skip(1).map(hex).collect();
    let (heap, a) = (addrs[0], addrs[1]);

    // 1: a full export that arms tracking. The descriptor it leaves is high and not in the image.
    let (first, rep1) = export_to_mem(
        pid,
        &ExportOptions {
            track_writes: true,
            ..Default::default()
        },
    );
    assert!(rep1.tracking_failed.is_none(), "{:?}", rep1.tracking_failed);
    assert_eq!(rep1.reused_bytes, 0);
    let base = rep1.tracked.clone().expect("tracking armed");
    assert!(base.len() >= 64 * 256, "base records {} pages", base.len());
    let uffd: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy() == "anon_inode:[userfaultfd]")
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    assert_eq!(uffd.len(), 1, "one tracking descriptor, got {uffd:?}");
    assert!(uffd[0] >= 64, "tracking descriptor {} is low", uffd[0]);
    assert!(
        first.meta.fds.iter().all(|f| f.fd != uffd[0]),
        "the tracking descriptor must not be in the image"
    );
    let first_pages = pages_by_addr(&first);

    // 2: the program changes its memory; an export with the base reads only what changed.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    wait_for(&log, "CHANGED", 30, |s| s.contains("CHANGED"));
    let mut w = Rebuilder {
        base: &first_pages,
        buf: Vec::new(),
        taken: Vec::new(),
    };
    let rep2 = export_process(
        pid,
        &ExportOptions {
            track_writes: true,
            base: Some(base),
            ..Default::default()
        },
        &mut w,
    )
    .expect("incremental export");
    eprintln!(
        "MEASURED incremental export: read {} KiB, reused {} KiB of {} KiB",
        rep2.read_bytes / 1024,
        rep2.reused_bytes / 1024,
        rep2.page_bytes / 1024
    );
    assert!(
        rep2.reused_bytes >= 60 << 20,
        "only {} bytes reused: tracking missed untouched pages",
        rep2.reused_bytes
    );
    assert!(
        rep2.read_bytes < 4 << 20,
        "{} bytes read for a few changed pages",
        rep2.read_bytes
    );
    let taken = |addr: u64| {
        w.taken
            .iter()
            .any(|&(s, n)| addr >= s && addr < s + n * PAGE as u64)
    };
    for (what, addr) in [
        ("a page stored to", heap),
        ("a page stored to", heap + 9 * PAGE as u64),
        ("the page read(2) wrote", heap + 100 * PAGE as u64),
        ("the zapped page", heap + 200 * PAGE as u64),
        ("region B moved onto A", a),
    ] {
        assert!(!taken(addr), "{what} at {addr:#x} was taken as unchanged");
    }
    assert!(
        taken(heap + 1000 * PAGE as u64),
        "an untouched page was read"
    );
    let incremental = load_image(&mut MemReader::new(&w.buf)).expect("rebuilt image loads");

    // 3: a full export of the same state: every page must match the rebuilt one.
    let full = load_image(&mut MemReader::new(&export_killed(pid).buf)).expect("load");
    let _ = child.wait();
    let (inc, full) = (pages_by_addr(&incremental), pages_by_addr(&full));
    assert_eq!(inc.len(), full.len(), "page sets differ");
    for (addr, p) in &full {
        assert!(
            inc.get(addr) == Some(p),
            "page {addr:#x} differs between the incremental and the full image"
        );
    }
    assert_eq!(full[&(heap + 100 * PAGE as u64)], vec![0xEE; PAGE]);
    assert!(full[&a]
        .chunks(8)
        .zip(1u64..)
        .all(|(w, i)| u64::from_ne_bytes(w.try_into().unwrap())
            == i.wrapping_mul(0x9E3779B97F4A7C15) ^ 3));
}
