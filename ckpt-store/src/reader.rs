//! Restoring a version: a [`GhostReader`] per process that re-assembles the image byte stream
//! (head, pages from the packs, trailer). Every page is checked against the blake3 its pack
//! index recorded when it was stored (the head comes from the checksummed manifest), so the
//! reader says it checks the contents and the trailer's checksum is left zero: pages taken from
//! an earlier version by write tracking were never part of the stream the exporter hashed, and
//! a checksum re-created here would only hash what this reader assembled.
//!
//! Page data is fetched a window at a time; inside a window every run of consecutive pack
//! pages is one read (split into large pieces), several in flight at once.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
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

/// Pages fetched per window (64 MiB).
const WINDOW_PAGES: u64 = 16384;
/// Largest single read.
const READ_PIECE: u64 = 8 << 20;
/// Reads in flight.
const PARALLEL_READS: usize = 8;

/// A version opened for restore: its manifest and a handle on each pack it uses.
pub struct OpenVersion {
    store: Store,
    /// The manifest.
    pub manifest: Manifest,
    packs: Vec<FileHandle>,
    hashes: Vec<Arc<Vec<[u8; 32]>>>,
}

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
        let mut packs = Vec::new();
        let mut hashes = Vec::new();
        for name in &manifest.packs {
            hashes.push(Arc::new(self.pack_hashes(name).await?));
            let attr = self.pack_ino(name).await?;
            let h = data
                .open(attr.ino, libc::O_RDONLY as u32)
                .await
                .map_err(cluster("opening", &self.sub(&pack_rel(name))))?;
            packs.push(h);
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
        let mut pages = 0;
        for r in &entry.runs {
            starts.push(pages);
            pages += r.count;
        }
        let total = entry.head.len() as u64 + pages * PAGE as u64 + TRAILER_LEN as u64;
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

    /// Writes the version's copied files back to their original paths.
    pub async fn restore_files(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.manifest.files.is_empty() {
            return Ok(());
        }
        let v = self.version();
        let vrel = format!("versions/{v}");
        let dir = self
            .store
            .meta()
            .lookup(self.store.versions, v.to_string().as_bytes())
            .await
            .map_err(cluster("looking up", &self.store.sub(&vrel)))?;
        let files = self
            .store
            .meta()
            .lookup(dir.ino, b"files")
            .await
            .map_err(cluster(
                "looking up",
                &self.store.sub(&format!("{vrel}/files")),
            ))?;
        for f in &self.manifest.files {
            let rel = format!("{vrel}/files/{}", f.stored);
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

    /// Closes the pack handles.
    pub async fn close(self) {
        for p in self.packs {
            let _ = p.close().await;
        }
    }
}

/// What a window fetch needs.
#[derive(Clone)]
struct ReadCtx {
    app: String,
    version: u64,
    pack_names: Vec<String>,
    packs: Vec<FileHandle>,
    hashes: Vec<Arc<Vec<[u8; 32]>>>,
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

/// One read of a window: pack, byte offset in the pack, length, offset in the window.
struct Piece {
    pack: usize,
    offset: u64,
    len: u64,
    into: usize,
}

impl ReadCtx {
    /// Fills `buf` (pages `first..first + n` of the image) from the packs.
    async fn fetch(
        &self,
        runs: &[PageRefRun],
        starts: &[u64],
        first: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let n = buf.len() as u64 / PAGE as u64;
        let end = first + n;
        let mut pieces = Vec::new();
        let at = starts.partition_point(|&s| s <= first).saturating_sub(1);
        for (r, &s) in runs.iter().zip(starts).skip(at) {
            if s >= end {
                break;
            }
            let lo = first.max(s);
            let hi = end.min(s + r.count);
            if lo >= hi || r.pack == 0 {
                continue; // zero pages: the buffer is already zero
            }
            let pack = (r.pack - 1) as usize;
            if pack >= self.packs.len() {
                return Err(CkptError::Damaged {
                    object: format!("{}@{}", self.app, self.version),
                    msg: format!(
                        "a page reference names pack #{pack}, the manifest lists {}",
                        self.packs.len()
                    ),
                });
            }
            let mut off = (r.first + (lo - s)) * PAGE as u64;
            let mut into = ((lo - first) * PAGE as u64) as usize;
            let mut left = (hi - lo) * PAGE as u64;
            while left > 0 {
                let len = left.min(READ_PIECE);
                pieces.push(Piece {
                    pack,
                    offset: off,
                    len,
                    into,
                });
                off += len;
                into += len as usize;
                left -= len;
            }
        }
        let results: Vec<(usize, Vec<u8>)> = stream::iter(pieces)
            .map(|p| async move {
                let h = &self.packs[p.pack];
                let name = pack_rel(&self.pack_names[p.pack]);
                let unreadable = |cause| CkptError::PackUnreadable {
                    cause: Box::new(cause),
                    app: self.app.clone(),
                    version: self.version,
                    pack: format!("{}/{name}", self.app),
                    offset: p.offset,
                    end: p.offset + p.len,
                };
                let got = h
                    .read_at(p.offset, p.len as usize)
                    .await
                    .map_err(unreadable)?;
                if got.len() as u64 != p.len {
                    return Err(CkptError::Damaged {
                        object: format!("{}/{name}", self.app),
                        msg: format!(
                            "is too short: bytes {}..{} needed by version {} are missing",
                            p.offset,
                            p.offset + p.len,
                            self.version
                        ),
                    });
                }
                // Hashing is CPU work: off the runtime, so the pieces in flight use every core.
                let hashes = self.hashes[p.pack].clone();
                let first = p.offset / PAGE as u64;
                let (got, bad) = tokio::task::spawn_blocking(move || {
                    let bad = got.chunks(PAGE).zip(first..).find(|(page, i)| {
                        hashes.get(*i as usize).map(|h| &h[..])
                            != Some(blake3::hash(page).as_bytes())
                    });
                    let bad = bad.map(|(_, i)| i);
                    (got, bad)
                })
                .await
                .map_err(|e| CkptError::Writer(format!("page check task failed: {e}")))?;
                if let Some(i) = bad {
                    return Err(CkptError::Damaged {
                        object: format!("{}/{name}", self.app),
                        msg: format!(
                            "page {i} does not match the checksum its pack index recorded; version {} cannot be restored from it (restore an older version)",
                            self.version
                        ),
                    });
                }
                Ok((p.into, got))
            })
            .buffer_unordered(PARALLEL_READS)
            .try_collect()
            .await?;
        for (into, data) in results {
            buf[into..into + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }
}

impl ProcessReader {
    fn load_window(&mut self, page: u64) -> Result<()> {
        let n = WINDOW_PAGES.min(self.pages - page);
        let mut buf = vec![0u8; (n * PAGE as u64) as usize];
        let ctx = self.ctx.clone();
        let runs = &self.entry.runs;
        let starts = &self.starts;
        self.rt.block_on(ctx.fetch(runs, starts, page, &mut buf))?;
        self.window = buf;
        self.window_first = page;
        Ok(())
    }
}

impl GhostReader for ProcessReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let head = self.entry.head.len() as u64;
        let pages_end = head + self.pages * PAGE as u64;
        let n = if self.pos >= self.total || buf.is_empty() {
            0
        } else if self.pos < head {
            let from = &self.entry.head[self.pos as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else if self.pos < pages_end {
            let page = (self.pos - head) / PAGE as u64;
            let win_end = self.window_first + self.window.len() as u64 / PAGE as u64;
            if self.window.is_empty() || page < self.window_first || page >= win_end {
                self.load_window(page)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
            let at = (self.pos - head - self.window_first * PAGE as u64) as usize;
            let from = &self.window[at..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else {
            let trailer = trailer();
            let from = &trailer[(self.pos - pages_end) as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        };
        self.pos += n as u64;
        if let Some(p) = &self.progress {
            p.set_position(self.pos);
        }
        Ok(n)
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
