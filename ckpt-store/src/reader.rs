//! Restoring a version: a [`GhostReader`] per process that re-assembles the image byte stream
//! (head, pages from the packs, trailer). Every page is checked against the blake3 its pack
//! index recorded when it was stored (the head comes from the checksummed manifest), so the
//! reader says it checks the contents and the trailer's checksum is left zero: pages taken from
//! an earlier version by write tracking were never part of the stream the exporter hashed, and
//! a checksum re-created here would only hash what this reader assembled.
//!
//! Page data is assembled by a [`FillPlan`]: the pack pages the image references, each
//! distinct page once however many image pages have its content, coalesced into reads of
//! whole pack ranges (several in flight), each page of a read checked once, and then copied
//! to every image page that references it. Deduplicated images are the store's best case;
//! reading a shared page once per reference made them its slowest restart. Ghost's loader
//! asks for all page data in one read, so a restore reads each page of the version once; a
//! caller reading in small pieces gets the same per window of [`WINDOW_PAGES`].

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use indicatif::ProgressBar;
use kerfs_client::{DataClient, DataConfig, FileHandle};
use kerfs_ghost::GhostReader;
use tokio::runtime::Handle;

use crate::error::{cluster, CkptError, Result};
use crate::format::{Manifest, PageRefRun, ProcessEntry, PAGE};
use crate::store::{pack_rel, Store};
use kerfs_ghost::image::{END_MAGIC, TRAILER_LEN};

/// The trailer handed out: no checksum (see the module docs), the end marker.
fn trailer() -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[32..].copy_from_slice(END_MAGIC);
    t
}

/// Pages assembled at a time for a caller that reads less than a page or not at a page
/// boundary (64 MiB).
const WINDOW_PAGES: u64 = 16384;
/// Largest single read, in pages (8 MiB): large enough that a read's fixed cost is small, small
/// enough that the reads of one pack range spread over the reads in flight.
const PIECE_PAGES: u64 = 2048;
/// Reads in flight.
const PARALLEL_READS: usize = 8;
/// Unreferenced pack pages between two referenced ones that are read (and not used) rather
/// than starting a second read: 64 KiB, the block a chunk server reads and checks whole anyway.
const GAP_PAGES: u64 = 16;
/// Pack page numbers above this are refused: their byte offsets would not fit in a u64.
const MAX_PACK_PAGE: u64 = u64::MAX / PAGE as u64;

/// The page hashes of a pack (its index), shared by every reader of the version.
type PackHashes = Arc<Vec<[u8; 32]>>;

/// A version opened for restore: its manifest and a handle on each pack it uses.
pub struct OpenVersion {
    store: Store,
    /// The manifest.
    pub manifest: Manifest,
    packs: Vec<FileHandle>,
    hashes: Vec<PackHashes>,
}

/// Packs whose index is read and which are opened at the same time.
const PARALLEL_OPENS: usize = 8;

impl Store {
    /// Opens version `v` (or the latest) for restore.
    pub async fn open_version(&self, v: Option<u64>) -> Result<OpenVersion> {
        let v = match v {
            Some(v) => v,
            None => self.latest().await?,
        };
        let manifest = self.manifest(v).await?;
        // The reader issues its own large parallel reads: the client's read-ahead would only
        // fetch again what another of them is already fetching.
        let data = DataClient::with_config(
            self.meta().clone(),
            DataConfig {
                readahead: 0,
                ..DataConfig::default()
            },
        );
        // Each pack costs a few metadata round trips (index lookup and read, pack lookup and
        // open): a version built on many incremental packs would wait for them one by one.
        let data = &data;
        let opened: Vec<Result<(PackHashes, FileHandle)>> = stream::iter(&manifest.packs)
            .map(|name| async move {
                let hashes = self.pack_hashes(name).await?;
                let attr = self.pack_ino(name).await?;
                let h = data
                    .open(attr.ino, libc::O_RDONLY as u32)
                    .await
                    .map_err(cluster("opening", &self.sub(&pack_rel(name))))?;
                Ok((Arc::new(hashes), h))
            })
            .buffered(PARALLEL_OPENS)
            .collect()
            .await;
        let mut packs = Vec::with_capacity(opened.len());
        let mut hashes = Vec::with_capacity(opened.len());
        let mut failed = None;
        for r in opened {
            match r {
                Ok((hs, h)) => {
                    hashes.push(hs);
                    packs.push(h);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            for p in packs {
                let _ = p.close().await;
            }
            return Err(e);
        }
        Ok(OpenVersion {
            store: self.clone(),
            manifest,
            packs,
            hashes,
        })
    }
}

impl OpenVersion {
    /// The version number.
    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// A reader of process `i`'s image, driven from a thread outside the runtime `rt`.
    pub fn reader(&self, i: usize, rt: &Handle, progress: Option<ProgressBar>) -> ProcessReader {
        let entry = self.manifest.processes[i].clone();
        let mut starts = Vec::with_capacity(entry.runs.len());
        let mut pages = 0u64;
        for r in &entry.runs {
            starts.push(pages);
            pages = pages.saturating_add(r.count);
        }
        let total = (entry.head.len() as u64)
            .saturating_add(pages.saturating_mul(PAGE as u64))
            .saturating_add(TRAILER_LEN as u64);
        if let Some(p) = &progress {
            p.set_length(total);
        }
        ProcessReader {
            rt: rt.clone(),
            ctx: ReadCtx {
                app: self.store.addr(),
                version: self.version(),
                pack_names: self.manifest.packs.clone(),
                packs: self.packs.clone(),
                hashes: self.hashes.clone(),
            },
            entry,
            starts,
            pages,
            total,
            pos: 0,
            window: Vec::new(),
            window_first: 0,
            progress,
        }
    }

    /// Directory `versions/N/NAME` of this version: its attributes and its path in the store.
    async fn version_dir(&self, name: &str) -> Result<(kerfs_proto::Attr, String)> {
        let v = self.version();
        let vrel = format!("versions/{v}");
        let dir = self
            .store
            .meta()
            .lookup(self.store.versions, v.to_string().as_bytes())
            .await
            .map_err(cluster("looking up", &self.store.sub(&vrel)))?;
        let rel = format!("{vrel}/{name}");
        let sub = self
            .store
            .meta()
            .lookup(dir.ino, name.as_bytes())
            .await
            .map_err(cluster("looking up", &self.store.sub(&rel)))?;
        Ok((sub, rel))
    }

    /// Writes the version's copied files back to their original paths.
    pub async fn restore_files(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.manifest.files.is_empty() {
            return Ok(());
        }
        let (files, files_rel) = self.version_dir("files").await?;
        for f in &self.manifest.files {
            let rel = format!("{files_rel}/{}", f.stored);
            let a = self
                .store
                .meta()
                .lookup(files.ino, f.stored.as_bytes())
                .await
                .map_err(cluster("looking up", &self.store.sub(&rel)))?;
            let bytes = self.store.read_file(a.ino, a.size, &rel).await?;
            if blake3::hash(&bytes).as_bytes()[..] != f.hash[..] {
                return Err(CkptError::Damaged {
                    object: self.store.sub(&rel),
                    msg: format!(
                        "its contents do not match the checksum recorded for {}",
                        f.path
                    ),
                });
            }
            let local = |cause| CkptError::Local {
                what: "restoring copied file".into(),
                path: f.path.clone(),
                cause,
            };
            std::fs::write(&f.path, &bytes).map_err(local)?;
            std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode))
                .map_err(local)?;
        }
        Ok(())
    }

    /// The System V IPC objects of the version, each checked (its image's checksum, and that
    /// it is the object the manifest names); restore them with `kerfs_ghost::ipc::restore`.
    pub async fn ipc_objects(&self) -> Result<Vec<kerfs_ghost::ipc::SysvObject>> {
        if self.manifest.ipc.is_empty() {
            return Ok(Vec::new());
        }
        let (ipc, ipc_rel) = self.version_dir("ipc").await?;
        let mut out = Vec::with_capacity(self.manifest.ipc.len());
        for s in &self.manifest.ipc {
            let rel = format!("{ipc_rel}/{}", s.stored);
            let path = self.store.sub(&rel);
            let a = self
                .store
                .meta()
                .lookup(ipc.ino, s.stored.as_bytes())
                .await
                .map_err(cluster("looking up", &path))?;
            let bytes = self.store.read_file(a.ino, a.size, &rel).await?;
            let damaged = |msg: String| CkptError::Damaged {
                object: path.clone(),
                msg,
            };
            let objs = kerfs_ghost::ipc::decode_image(&bytes, &format!("kerfs:{path}"))
                .map_err(|e| damaged(e.to_string()))?;
            let [o] = <[_; 1]>::try_from(objs).map_err(|objs| {
                damaged(format!(
                    "holds {} objects where one was expected",
                    objs.len()
                ))
            })?;
            if o.kind().short() != s.kind
                || i64::from(o.key()) != s.key
                || i64::from(o.id()) != s.id
            {
                return Err(damaged(format!(
                    "holds {} where the manifest names {} id {} key {}",
                    o.describe(),
                    s.kind,
                    s.id,
                    s.key
                )));
            }
            out.push(o);
        }
        Ok(out)
    }

    /// Closes the pack handles.
    pub async fn close(self) {
        for p in self.packs {
            let _ = p.close().await;
        }
    }
}

/// Byte range of `count` pages from page `first` of a buffer.
fn page_bytes(first: u64, count: u64) -> Range<usize> {
    (first * PAGE as u64) as usize..((first + count) * PAGE as u64) as usize
}

/// Image pages `to..to + count` (counted from the first page being filled) have the contents
/// of pack pages `first..first + count` of pack `pack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    pack: usize,
    first: u64,
    count: u64,
    to: u64,
}

/// One read: pack pages `first..first + count` of pack `pack`. `needed` are the pages some
/// image page references (sorted, disjoint, half-open); the others only bridge a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    pack: usize,
    first: u64,
    count: u64,
    needed: Vec<(u64, u64)>,
}

/// A copy out of a fetched piece: its pages `from..from + pages` to the image pages
/// `to..to + pages` being filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fanout {
    from: u64,
    to: u64,
    pages: u64,
}

/// How to fill a stretch of image pages: zero runs, the reads, and per read where its pages go.
#[derive(Debug, Default, PartialEq, Eq)]
struct FillPlan {
    /// (first page, pages) that are all zero (not stored).
    zeros: Vec<(u64, u64)>,
    /// The reads, sorted by pack and page, not overlapping.
    pieces: Vec<Piece>,
    /// `copies[i]`: where the pages of `pieces[i]` go.
    copies: Vec<Vec<Fanout>>,
}

/// Plans filling image pages `first..first + n` from `runs` (`starts[i]`: the image page
/// `runs[i]` starts at) out of `packs` packs. `object` names the version in errors.
fn plan_fill(
    runs: &[PageRefRun],
    starts: &[u64],
    first: u64,
    n: u64,
    packs: usize,
    object: &str,
) -> Result<FillPlan> {
    let damaged = |msg: String| CkptError::Damaged {
        object: object.to_string(),
        msg,
    };
    let end = first + n;
    let mut plan = FillPlan::default();
    let mut spans = Vec::new();
    let at = starts.partition_point(|&s| s <= first).saturating_sub(1);
    for (r, &s) in runs.iter().zip(starts).skip(at) {
        if s >= end {
            break;
        }
        let lo = first.max(s);
        let hi = end.min(s.saturating_add(r.count));
        if lo >= hi {
            continue;
        }
        if r.pack == 0 {
            plan.zeros.push((lo - first, hi - lo));
            continue;
        }
        let pack = (r.pack - 1) as usize;
        if pack >= packs {
            return Err(damaged(format!(
                "a page reference names pack #{pack}, the manifest lists {packs}"
            )));
        }
        if r.first
            .checked_add(r.count)
            .is_none_or(|e| e > MAX_PACK_PAGE)
        {
            return Err(damaged(format!(
                "a page reference names pages {}+{} of a pack, past any pack's end",
                r.first, r.count
            )));
        }
        spans.push(Span {
            pack,
            first: r.first + (lo - s),
            count: hi - lo,
            to: lo - first,
        });
    }

    // The referenced pack pages, each once: spans sorted by pack position and merged into
    // ranges wherever they overlap, touch, or leave a gap of at most GAP_PAGES.
    let mut by_pack: Vec<&Span> = spans.iter().collect();
    by_pack.sort_unstable_by_key(|s| (s.pack, s.first));
    let mut ranges: Vec<Piece> = Vec::new();
    for s in by_pack {
        let s_end = s.first + s.count;
        match ranges.last_mut() {
            Some(r) if r.pack == s.pack && s.first <= r.first + r.count + GAP_PAGES => {
                r.count = r.count.max(s_end - r.first);
                match r.needed.last_mut() {
                    Some(last) if s.first <= last.1 => last.1 = last.1.max(s_end),
                    _ => r.needed.push((s.first, s_end)),
                }
            }
            _ => ranges.push(Piece {
                pack: s.pack,
                first: s.first,
                count: s.count,
                needed: vec![(s.first, s_end)],
            }),
        }
    }
    // Ranges cut into reads of at most PIECE_PAGES, so one long range is read in parallel.
    for r in ranges {
        let r_end = r.first + r.count;
        let mut at = r.first;
        while at < r_end {
            let stop = r_end.min(at + PIECE_PAGES);
            let needed: Vec<(u64, u64)> = r
                .needed
                .iter()
                .map(|&(a, b)| (a.max(at), b.min(stop)))
                .filter(|(a, b)| a < b)
                .collect();
            if !needed.is_empty() {
                plan.pieces.push(Piece {
                    pack: r.pack,
                    first: at,
                    count: stop - at,
                    needed,
                });
            }
            at = stop;
        }
    }

    // Every span's pages, wherever in the image, copied out of the read that holds them.
    plan.copies = vec![Vec::new(); plan.pieces.len()];
    for s in &spans {
        let (mut from, mut to, mut left) = (s.first, s.to, s.count);
        let mut k = plan
            .pieces
            .partition_point(|p| (p.pack, p.first) <= (s.pack, from));
        while left > 0 {
            // The piece holding `from` is the last one starting at or before it; the next
            // part of the span, if any, is in the next piece.
            let holder = k
                .checked_sub(1)
                .and_then(|i| plan.pieces.get(i).map(|p| (i, p)))
                .filter(|(_, p)| p.pack == s.pack && p.first <= from && from < p.first + p.count);
            let Some((i, p)) = holder else {
                return Err(CkptError::Internal(format!(
                    "restore plan of {object}: no read holds page {from} of pack #{}",
                    s.pack
                )));
            };
            let pages = left.min(p.first + p.count - from);
            plan.copies[i].push(Fanout {
                from: from - p.first,
                to,
                pages,
            });
            from += pages;
            to += pages;
            left -= pages;
            k = i + 2;
        }
    }
    Ok(plan)
}

/// Below this many pages, the copies out of one read are made on the calling thread alone.
const PAR_COPY_PAGES: u64 = 4096;

/// Copies the pages of one read (`data`) to where `copies` says; returns the pages copied.
/// Many copies (a page shared by much of the image) are split over two threads: the cost is
/// the page faults of the fresh destination, which the kernel takes on both cores at once.
fn copy_out(copies: &[Fanout], data: &[u8], dst: &mut [u8]) -> u64 {
    let pages = copies.iter().map(|c| c.pages).sum();
    let k = copies.len() / 2;
    // Copies are made in image order, so those before `k` end where copy `k` starts at the
    // latest; checked, since the split below relies on it.
    let split = copies.get(k).map_or(0, |c| c.to);
    let ordered = copies[..k].iter().all(|c| c.to + c.pages <= split);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if pages < PAR_COPY_PAGES || k == 0 || !ordered || threads < 2 {
        copy_from(copies, data, dst, 0);
        return pages;
    }
    let (low, high) = dst.split_at_mut(page_bytes(0, split).end);
    // Behind a lock only so that, if no thread can be had, this thread can still take it.
    let high = std::sync::Mutex::new(high);
    let copy_high = || {
        let mut h = high.lock().unwrap_or_else(|e| e.into_inner());
        copy_from(&copies[k..], data, &mut h, split);
    };
    std::thread::scope(|s| {
        let second = std::thread::Builder::new().spawn_scoped(s, copy_high);
        copy_from(&copies[..k], data, low, 0);
        match second {
            // A panic there is an out-of-range copy, a bug here: raised again on this thread.
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            // No thread to be had: the second half here too.
            Err(_) => copy_high(),
        }
    });
    pages
}

/// The copies of [`copy_out`] into `dst`, which starts at image page `base` of the fill.
fn copy_from(copies: &[Fanout], data: &[u8], dst: &mut [u8], base: u64) {
    for c in copies {
        dst[page_bytes(c.to - base, c.pages)].copy_from_slice(&data[page_bytes(c.from, c.pages)]);
    }
}

/// Makes `b` all zero, writing only the pages that are not: the loader's buffer is fresh
/// memory, and reading a fresh page maps the shared zero page where writing it would allocate.
fn zero_pages(b: &mut [u8]) {
    for page in b.chunks_mut(PAGE) {
        // OR-ing 64 bytes at a time vectorizes; an early exit per byte would not.
        let zero = page
            .chunks(64)
            .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0);
        if !zero {
            page.fill(0);
        }
    }
}

/// What a fill needs.
#[derive(Clone)]
struct ReadCtx {
    app: String,
    version: u64,
    pack_names: Vec<String>,
    packs: Vec<FileHandle>,
    hashes: Vec<PackHashes>,
}

/// The image stream of one process of a version.
pub struct ProcessReader {
    rt: Handle,
    ctx: ReadCtx,
    entry: ProcessEntry,
    /// Image page number of the first page of each run.
    starts: Vec<u64>,
    pages: u64,
    total: u64,
    pos: u64,
    window: Vec<u8>,
    window_first: u64,
    progress: Option<ProgressBar>,
}

impl ReadCtx {
    fn object(&self) -> String {
        format!("{}@{}", self.app, self.version)
    }

    /// Reads one piece and checks each of its needed pages against the pack index.
    async fn fetch(&self, p: &Piece) -> Result<Vec<u8>> {
        let h = &self.packs[p.pack];
        let name = format!("{}/{}", self.app, pack_rel(&self.pack_names[p.pack]));
        let range = page_bytes(p.first, p.count);
        let (offset, len) = (range.start as u64, range.len());
        let unreadable = |cause| CkptError::PackUnreadable {
            cause: Box::new(cause),
            app: self.app.clone(),
            version: self.version,
            pack: name.clone(),
            offset,
            end: offset + len as u64,
        };
        // On a runtime worker rather than in the caller's block_on: receiving a read copies
        // every frame, and the reads in flight should do that on every core.
        let read = {
            let h = h.clone();
            tokio::spawn(async move { h.read_at(offset, len).await })
        };
        let got = read
            .await
            .map_err(|e| CkptError::Writer(format!("pack read task failed: {e}")))?
            .map_err(unreadable)?;
        if got.len() != len {
            return Err(CkptError::Damaged {
                object: name,
                msg: format!(
                    "is too short: bytes {offset}..{} needed by version {} are missing",
                    offset + len as u64,
                    self.version
                ),
            });
        }
        // Hashing is CPU work: off the runtime, so the reads in flight use every core.
        let hashes = self.hashes[p.pack].clone();
        let (first, needed) = (p.first, p.needed.clone());
        let (got, bad) = tokio::task::spawn_blocking(move || {
            let bad = needed.iter().flat_map(|&(a, b)| a..b).find(|&i| {
                let page = &got[page_bytes(i - first, 1)];
                hashes.get(i as usize).map(|h| &h[..]) != Some(blake3::hash(page).as_bytes())
            });
            (got, bad)
        })
        .await
        .map_err(|e| CkptError::Writer(format!("page check task failed: {e}")))?;
        if let Some(i) = bad {
            return Err(CkptError::Damaged {
                object: name,
                msg: format!(
                    "page {i} does not match the checksum its pack index recorded; version {} cannot be restored from it (restore an older version)",
                    self.version
                ),
            });
        }
        Ok(got)
    }

    /// Fills `dst` as `plan` says: the zero runs, then each piece as soon as it is read,
    /// copied to every place that references its pages. `dst` never passes to another task,
    /// so a failed read leaves nothing writing into it.
    async fn fill(
        &self,
        plan: &FillPlan,
        dst: &mut [u8],
        progress: Option<&ProgressBar>,
    ) -> Result<()> {
        for &(to, pages) in &plan.zeros {
            zero_pages(&mut dst[page_bytes(to, pages)]);
            if let Some(p) = progress {
                p.inc(pages * PAGE as u64);
            }
        }
        let mut fetched = stream::iter(plan.pieces.iter().enumerate())
            .map(|(i, p)| async move { self.fetch(p).await.map(|d| (i, d)) })
            .buffer_unordered(PARALLEL_READS);
        while let Some(r) = fetched.next().await {
            let (i, data) = r?;
            let copied = copy_out(&plan.copies[i], &data, dst);
            if let Some(p) = progress {
                p.inc(copied * PAGE as u64);
            }
        }
        Ok(())
    }
}

impl ProcessReader {
    /// Fills `dst` with image pages from `page` on.
    fn fill(&self, page: u64, dst: &mut [u8]) -> Result<()> {
        let n = (dst.len() / PAGE) as u64;
        let plan = plan_fill(
            &self.entry.runs,
            &self.starts,
            page,
            n,
            self.ctx.packs.len(),
            &self.ctx.object(),
        )?;
        self.rt
            .block_on(self.ctx.fill(&plan, dst, self.progress.as_ref()))
    }

    fn load_window(&mut self, page: u64) -> Result<()> {
        let n = WINDOW_PAGES.min(self.pages - page);
        let mut buf = vec![0u8; page_bytes(0, n).end];
        self.fill(page, &mut buf)?;
        self.window = buf;
        self.window_first = page;
        Ok(())
    }

    /// Copies image bytes from the current position into `out`; returns how many.
    fn read_some(&mut self, out: &mut [u8]) -> Result<usize> {
        let head = self.entry.head.len() as u64;
        let pages_end = head + self.pages * PAGE as u64;
        if self.pos < head {
            let from = &self.entry.head[self.pos as usize..];
            let n = from.len().min(out.len());
            out[..n].copy_from_slice(&from[..n]);
            return Ok(n);
        }
        if self.pos < pages_end {
            let at = self.pos - head;
            let page = at / PAGE as u64;
            if at.is_multiple_of(PAGE as u64) && out.len() >= PAGE {
                // Whole pages straight into the caller's buffer: no window, no second copy.
                let n = (self.pages - page).min((out.len() / PAGE) as u64);
                let dst = &mut out[page_bytes(0, n)];
                self.fill(page, dst)?;
                return Ok(dst.len());
            }
            let win_end = self.window_first + (self.window.len() / PAGE) as u64;
            if self.window.is_empty() || page < self.window_first || page >= win_end {
                self.load_window(page)?;
            }
            let from = &self.window[(at - self.window_first * PAGE as u64) as usize..];
            let n = from.len().min(out.len());
            out[..n].copy_from_slice(&from[..n]);
            return Ok(n);
        }
        let trailer = trailer();
        let from = &trailer[(self.pos - pages_end) as usize..];
        let n = from.len().min(out.len());
        out[..n].copy_from_slice(&from[..n]);
        Ok(n)
    }
}

impl GhostReader for ProcessReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() && self.pos < self.total {
            let n = self
                .read_some(&mut buf[done..])
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.pos += n as u64;
            done += n;
        }
        if let Some(p) = &self.progress {
            p.set_position(self.pos);
        }
        Ok(done)
    }

    fn size_hint(&self) -> Option<u64> {
        Some(self.total)
    }

    fn checks_content(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "{}@{} (pid {}, {})",
            self.ctx.app, self.ctx.version, self.entry.host_pid, self.entry.comm
        )
    }
}

/// Pack names referenced by a set of manifests.
pub(crate) fn referenced_packs<'a>(
    manifests: impl Iterator<Item = &'a Manifest>,
) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for m in manifests {
        for p in &m.packs {
            *out.entry(p.clone()).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn run(pack: u32, first: u64, count: u64) -> PageRefRun {
        PageRefRun { pack, first, count }
    }

    fn starts_of(runs: &[PageRefRun]) -> Vec<u64> {
        let mut at = 0;
        runs.iter()
            .map(|r| {
                let s = at;
                at += r.count;
                s
            })
            .collect()
    }

    /// Contents of page `page` of pack `pack` in these tests: its own number in every word.
    fn pack_page(pack: usize, page: u64) -> Vec<u8> {
        let word = ((pack as u64) << 48 | page).to_le_bytes();
        word.iter().copied().cycle().take(PAGE).collect()
    }

    /// What image page `i` must hold, read off the runs directly (zero for a zero run).
    fn expected_page(runs: &[PageRefRun], i: u64) -> Vec<u8> {
        let mut at = 0;
        for r in runs {
            if i < at + r.count {
                return match r.pack {
                    0 => vec![0; PAGE],
                    p => pack_page(p as usize - 1, r.first + (i - at)),
                };
            }
            at += r.count;
        }
        panic!("page {i} is past the runs");
    }

    /// Plans pages `first..first + n`, executes the plan against `pack_page` into a buffer
    /// full of garbage, and checks every page and that no pack page is read twice.
    fn fill_and_check(runs: &[PageRefRun], first: u64, n: u64, packs: usize) -> FillPlan {
        let plan = plan_fill(runs, &starts_of(runs), first, n, packs, "test").expect("plan");
        let mut read = std::collections::HashSet::new();
        for (a, b) in plan.pieces.iter().zip(plan.pieces.iter().skip(1)) {
            assert!(
                (a.pack, a.first + a.count) <= (b.pack, b.first),
                "reads overlap: {a:?} {b:?}"
            );
        }
        let mut dst = vec![0xEEu8; page_bytes(0, n).end];
        for &(to, pages) in &plan.zeros {
            zero_pages(&mut dst[page_bytes(to, pages)]);
        }
        for (p, copies) in plan.pieces.iter().zip(&plan.copies) {
            assert!(p.count <= PIECE_PAGES, "read too long: {p:?}");
            for page in p.needed.iter().flat_map(|&(a, b)| a..b) {
                assert!(page >= p.first && page < p.first + p.count, "{p:?}");
                assert!(read.insert((p.pack, page)), "page read twice: {p:?}");
            }
            let data: Vec<u8> = (p.first..p.first + p.count)
                .flat_map(|i| pack_page(p.pack, i))
                .collect();
            copy_out(copies, &data, &mut dst);
        }
        for i in 0..n {
            assert!(
                dst[page_bytes(i, 1)] == expected_page(runs, first + i)[..],
                "image page {} (filling {first}+{n}) holds the wrong contents",
                first + i
            );
        }
        plan
    }

    #[test]
    fn distinct_pages_are_read_in_pieces_and_land_in_place() {
        let runs = [run(1, 0, 5000)];
        let plan = fill_and_check(&runs, 0, 5000, 1);
        let reads: Vec<(u64, u64)> = plan.pieces.iter().map(|p| (p.first, p.count)).collect();
        assert_eq!(reads, vec![(0, 2048), (2048, 2048), (4096, 904)]);
    }

    #[test]
    fn a_page_referenced_everywhere_is_read_once() {
        let runs: Vec<PageRefRun> = (0..3000).map(|_| run(1, 7, 1)).collect();
        let plan = fill_and_check(&runs, 0, 3000, 1);
        assert_eq!(plan.pieces.len(), 1);
        assert_eq!((plan.pieces[0].first, plan.pieces[0].count), (7, 1));
        assert_eq!(plan.copies[0].len(), 3000);
    }

    #[test]
    fn many_copies_out_of_one_read_split_over_threads_land_in_place() {
        // Two pack pages in one read, referenced alternately 10,000 times (more than
        // PAR_COPY_PAGES): a copy of the second thread's half landing one page off shows.
        let runs: Vec<PageRefRun> = (0..10_000).map(|i| run(1, 7 + 2 * (i % 2), 1)).collect();
        let plan = fill_and_check(&runs, 0, 10_000, 1);
        assert_eq!(plan.pieces.len(), 1);
        assert!(plan.copies[0].len() as u64 >= 2 * PAR_COPY_PAGES);
        // A window starting mid-image: the split point is not page 0 of the fill.
        fill_and_check(&runs, 1234, 8000, 1);
    }

    #[test]
    fn small_gaps_are_read_through_and_large_ones_split_reads() {
        // Pack pages 0, 10 (gap of 9: one read) and 100 (gap of 89: its own read), then pages
        // of a second pack, zero runs in between.
        let runs = [
            run(1, 100, 1),
            run(0, 0, 3),
            run(1, 0, 1),
            run(2, 5, 2),
            run(1, 10, 1),
            run(0, 0, 1),
        ];
        let plan = fill_and_check(&runs, 0, 9, 2);
        let piece = |pack, first, count, needed: &[(u64, u64)]| Piece {
            pack,
            first,
            count,
            needed: needed.to_vec(),
        };
        assert_eq!(
            plan.pieces,
            vec![
                piece(0, 0, 11, &[(0, 1), (10, 11)]),
                piece(0, 100, 1, &[(100, 101)]),
                piece(1, 5, 2, &[(5, 7)]),
            ]
        );
        assert_eq!(plan.zeros, vec![(1, 3), (8, 1)]);
    }

    #[test]
    fn windows_cut_runs_anywhere() {
        let runs = [run(1, 0, 10), run(0, 0, 5), run(1, 3, 20), run(1, 40, 3)];
        for first in 0..38 {
            for n in 1..=(38 - first) {
                fill_and_check(&runs, first, n, 1);
            }
        }
    }

    #[test]
    fn random_references_fill_every_page_from_one_read_of_each() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for _ in 0..200 {
            let mut runs = Vec::new();
            let mut pages = 0;
            while pages < 6000 {
                let count = *[1u64, 1, 2, 3, 17, 300, 2100]
                    .get(rng.gen_range(0..7))
                    .unwrap_or(&1);
                let pack = rng.gen_range(0..4u32);
                runs.push(run(pack, rng.gen_range(0..5000), count));
                pages += count;
            }
            let n = rng.gen_range(1..=pages);
            let first = rng.gen_range(0..=pages - n);
            fill_and_check(&runs, first, n, 3);
        }
    }

    #[test]
    fn references_outside_the_manifest_are_refused() {
        let e = plan_fill(&[run(3, 0, 1)], &[0], 0, 1, 2, "v").unwrap_err();
        assert!(e.to_string().contains("pack #2"), "{e}");
        let e = plan_fill(&[run(1, u64::MAX - 1, 4)], &[0], 0, 4, 1, "v").unwrap_err();
        assert!(e.to_string().contains("past any pack's end"), "{e}");
    }

    #[test]
    fn zero_pages_clears_only_what_is_not_zero() {
        let mut b = vec![0u8; 3 * PAGE];
        b[PAGE + 4095] = 1;
        b[2 * PAGE] = 9;
        zero_pages(&mut b);
        assert!(b.iter().all(|&x| x == 0));
    }
}
