//! Writing a version: the writer marker and GC handshake, the version claim, the dedup index,
//! pack files, and the [`GhostWriter`] that turns a ghost image stream into pack pages and a
//! manifest entry.
//!
//! `export_process` calls [`ImageSink::write_all`] on its ptrace thread. The sink only copies
//! the bytes into a bounded channel; a task on the tokio runtime splits the stream (header,
//! metadata, pages, trailer), hashes each page, looks it up, and appends new ones to the pack.
//! Pages write tracking showed unchanged since the previous version arrive as that version's
//! references instead of bytes; the trailer is not kept (the reader re-creates it).
//! So reading the process's memory and writing to the cluster overlap, and a slow cluster
//! slows the dump down (the channel is full) instead of buffering the whole image.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use kerfs_client::proto::RENAME_NOREPLACE;
use kerfs_client::FileHandle;
use kerfs_ghost::image::{HEADER_LEN, MAGIC, TRAILER_LEN};
use kerfs_ghost::GhostWriter;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::error::{cluster, CkptError, Result};
use crate::format::{
    decode_index, encode_index, CopiedFile, IpcSnapshot, Manifest, PageRefRun, ProcessEntry, Stats,
    PAGE,
};
use crate::store::{
    errno_of, host_name, now_ms, pack_rel, random_hex, Store, GC_LOCK, HEARTBEAT, MANIFEST, PACKS,
    PARTIAL_PREFIX, STALE_AFTER, VERSIONS, WRITERS,
};

/// How long a writer waits for a running GC to finish.
const GC_WAIT: Duration = Duration::from_secs(120);
/// Pages are appended to the pack in batches of this size.
const PACK_BATCH: usize = 8 << 20;
/// Background pack writes in flight.
const WRITES_IN_FLIGHT: usize = 3;
/// Buffers in flight between the ptrace thread and the writer task.
const CHANNEL_DEPTH: usize = 8;

/// Where a page already is: (pack number in this checkpoint's manifest list, page in pack).
type Location = (u32, u64);

/// What the ptrace thread hands the writer task: image bytes, or pages of the previous
/// version that write tracking showed unchanged (as `(known pack, page)`, `None` for zero).
enum StreamItem {
    Bytes(Vec<u8>),
    Reused(Vec<Option<(u32, u64)>>),
}

/// The previous version's image of a process, from which pages left unchanged are taken.
struct BaseImage {
    /// (first address, pages, first image page) of each stored run, in address order.
    runs: Vec<(u64, u64, u64)>,
    /// The base entry's page references and the image page each starts at.
    refs: Vec<PageRefRun>,
    starts: Vec<u64>,
    /// Base manifest pack number → index in the writer's known packs.
    packs: Vec<u32>,
}

impl BaseImage {
    /// Where the base has page `addr`: `Some(None)` for a zero page, `None` if it has none.
    fn locate(&self, addr: u64) -> Option<Option<(u32, u64)>> {
        let i = self.runs.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        let (start, n, first) = self.runs[i];
        let page = (addr - start) / PAGE as u64;
        if page >= n {
            return None;
        }
        let img = first + page;
        let j = self.starts.partition_point(|&s| s <= img).checked_sub(1)?;
        let r = self.refs.get(j)?;
        if img - self.starts[j] >= r.count {
            return None;
        }
        if r.pack == 0 {
            return Some(None);
        }
        let known = *self.packs.get(r.pack as usize - 1)?;
        Some(Some((known, r.first + img - self.starts[j])))
    }
}

/// A checkpoint being written: holds the writer marker (with its heartbeat), the claimed
/// version, the dedup index and the pack new pages go to.
pub struct Checkpoint {
    store: Store,
    version: u64,
    partial: String,
    partial_ino: u64,
    marker: String,
    marker_ino: u64,
    heartbeat: tokio::task::JoinHandle<()>,
    state: Option<Ingest>,
    base: Option<Arc<BaseImage>>,
    processes: Vec<ProcessEntry>,
    files: Vec<CopiedFile>,
    files_ino: Option<u64>,
    ipc: Vec<IpcSnapshot>,
    ipc_ino: Option<u64>,
    ipc_bytes: u64,
    started: Instant,
    page_bytes: u64,
    image_bytes: u64,
}

/// What the writer task owns between images: the index and the open pack.
struct Ingest {
    store: Store,
    /// Pack names referenced so far; a `Location`'s pack number indexes this list.
    packs: Vec<String>,
    /// Packs whose index was loaded, by name → number in `packs` once referenced.
    pack_numbers: HashMap<String, u32>,
    /// Every stored page: blake3 → (pack name index in `known_packs`, page).
    index: HashMap<[u8; 32], (u32, u64)>,
    /// Names of the packs the index knows (index into this from `index`).
    known_packs: Vec<String>,
    pack: Option<PackWriter>,
    new_bytes: u64,
    dedup_pages: u64,
    zero_pages: u64,
    reused_pages: u64,
}

/// The pack of this checkpoint: created on the first new page. Full batches are handed to
/// background writes (a few in flight) so that hashing the next pages overlaps the network.
struct PackWriter {
    name: String,
    handle: FileHandle,
    hashes: Vec<[u8; 32]>,
    pending: Vec<u8>,
    written: u64,
    in_flight: tokio::task::JoinSet<std::result::Result<(), kerfs_client::ClientError>>,
}

/// Summary of a committed version.
#[derive(Debug, Clone)]
pub struct CommitReport {
    /// The version number.
    pub version: u64,
    /// Its statistics (also in the manifest).
    pub stats: Stats,
}

impl Store {
    /// Starts writing a new version: registers a writer marker, waits for a running GC,
    /// claims the next version number and loads the page index of every pack.
    pub async fn begin_checkpoint(&self) -> Result<Checkpoint> {
        let started = Instant::now();
        let marker = format!("{}-{}-{}", host_name(), std::process::id(), random_hex());
        let rel = format!("{WRITERS}/{marker}");
        let marker_attr = self
            .meta()
            .create_file(self.writers, marker.as_bytes(), 0o644)
            .await
            .map_err(cluster("creating the writer marker", &self.sub(&rel)))?;
        let heartbeat = {
            let store = self.clone();
            let ino = marker_attr.ino;
            let rel = rel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    if let Err(e) = store.touch(ino, &rel).await {
                        warn!(error = %e, "writer marker heartbeat failed");
                    }
                }
            })
        };
        let res = async {
            // The marker exists before we look for the GC lock; a GC takes its lock before it
            // lists the markers. With linearizable metadata, either the GC sees our marker
            // (and deletes no pack) or we see its lock (and wait).
            self.wait_for_gc().await?;
            let (version, partial, partial_ino) = self.claim_version().await?;
            let (known_packs, index) = self.load_index().await?;
            Ok::<_, CkptError>((version, partial, partial_ino, known_packs, index))
        }
        .await;
        let (version, partial, partial_ino, known_packs, index) = match res {
            Ok(r) => r,
            Err(e) => {
                heartbeat.abort();
                let _ = self.meta().unlink(self.writers, marker.as_bytes()).await;
                return Err(e);
            }
        };
        debug!(version, pages = index.len(), "checkpoint started");
        Ok(Checkpoint {
            store: self.clone(),
            version,
            partial,
            partial_ino,
            marker,
            marker_ino: marker_attr.ino,
            heartbeat,
            state: Some(Ingest {
                store: self.clone(),
                packs: Vec::new(),
                pack_numbers: HashMap::new(),
                index,
                known_packs,
                pack: None,
                new_bytes: 0,
                dedup_pages: 0,
                zero_pages: 0,
                reused_pages: 0,
            }),
            base: None,
            processes: Vec::new(),
            files: Vec::new(),
            files_ino: None,
            ipc: Vec::new(),
            ipc_ino: None,
            ipc_bytes: 0,
            started,
            page_bytes: 0,
            image_bytes: 0,
        })
    }

    async fn wait_for_gc(&self) -> Result<()> {
        let deadline = Instant::now() + GC_WAIT;
        loop {
            match self.meta().lookup(self.dir, GC_LOCK.as_bytes()).await {
                Err(e) if errno_of(&e) == libc::ENOENT => return Ok(()),
                Err(e) => return Err(cluster("looking up", &self.sub(GC_LOCK))(e)),
                Ok(a) => {
                    let age = crate::store::age_of(&a);
                    if age > STALE_AFTER {
                        return Err(CkptError::Busy(format!(
                            "{} is {}s old: a `krg gc` was killed while holding it. Run `krg gc {}` (it replaces a stale lock) and checkpoint again",
                            self.sub(GC_LOCK),
                            age.as_secs(),
                            self.addr()
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(CkptError::Busy(format!(
                            "a `krg gc` of {} has held {} for over {}s; try again once it is done",
                            self.addr(),
                            self.sub(GC_LOCK),
                            GC_WAIT.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Takes the next free version number by creating `.partial-N` exclusively: two writers
    /// can never both hold N, and the partial directory is where the version is written.
    async fn claim_version(&self) -> Result<(u64, String, u64)> {
        let names = self.list(self.versions, VERSIONS).await?;
        let first = names
            .iter()
            .filter_map(|(n, _)| {
                crate::store::committed_number(n)
                    .or_else(|| n.strip_prefix(PARTIAL_PREFIX).and_then(|r| r.parse().ok()))
            })
            .max()
            .unwrap_or(0)
            + 1;
        for next in first..first + 1000 {
            let name = format!("{PARTIAL_PREFIX}{next}");
            match self
                .meta()
                .mkdir(self.versions, name.as_bytes(), 0o755)
                .await
            {
                Ok(a) => {
                    // A committed N can exist while `.partial-N` is free again (the writer of N
                    // renamed it away): such an N is taken too.
                    match self
                        .meta()
                        .lookup(self.versions, next.to_string().as_bytes())
                        .await
                    {
                        Err(e) if errno_of(&e) == libc::ENOENT => return Ok((next, name, a.ino)),
                        _ => {
                            let _ = self.meta().rmdir(self.versions, name.as_bytes()).await;
                        }
                    }
                }
                Err(e) if errno_of(&e) == libc::EEXIST => {}
                Err(e) => {
                    return Err(cluster(
                        "claiming a version",
                        &self.sub(&format!("{VERSIONS}/{name}")),
                    )(e))
                }
            }
        }
        Err(CkptError::Busy(format!(
            "could not claim a version number in {} after 1000 tries",
            self.sub(VERSIONS)
        )))
    }

    /// Loads the index of every pack that has one (a pack without its index was left by a
    /// killed writer and is never deduplicated against).
    async fn load_index(&self) -> Result<(Vec<String>, HashMap<[u8; 32], (u32, u64)>)> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let entries = self.list(self.packs, PACKS).await?;
        let idx: Vec<(String, kerfs_client::proto::Attr)> = entries
            .into_iter()
            .filter_map(|(n, a)| n.strip_suffix(".idx").map(|p| (p.to_string(), a)))
            .collect();
        let loaded: Vec<(String, Option<Vec<[u8; 32]>>)> = stream::iter(idx)
            .map(|(name, attr)| async move {
                let rel = format!("{PACKS}/{name}.idx");
                let bytes = self.read_file(attr.ino, attr.size, &rel).await?;
                match decode_index(&bytes, &self.sub(&rel)) {
                    Ok(h) => Ok::<_, CkptError>((name, Some(h))),
                    Err(e) => {
                        warn!(error = %e, "pack index skipped: its pages will be stored again");
                        Ok((name, None))
                    }
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let mut names = Vec::new();
        let mut index = HashMap::new();
        for (name, hashes) in loaded {
            let Some(hashes) = hashes else { continue };
            let n = names.len() as u32;
            names.push(name);
            for (i, h) in hashes.into_iter().enumerate() {
                index.entry(h).or_insert((n, i as u64));
            }
        }
        Ok((names, index))
    }
}

impl Ingest {
    /// The manifest pack number of known pack `k`, adding it to the manifest's list.
    fn pack_number(&mut self, known: u32) -> u32 {
        let name = &self.known_packs[known as usize];
        if let Some(&n) = self.pack_numbers.get(name) {
            return n;
        }
        let n = self.packs.len() as u32;
        self.packs.push(name.clone());
        self.pack_numbers.insert(name.clone(), n);
        n
    }

    /// Stores one page (or finds it stored) and returns where it is; `None` for a zero page.
    async fn page(&mut self, page: &[u8]) -> Result<Option<Location>> {
        if page.iter().all(|&b| b == 0) {
            self.zero_pages += 1;
            return Ok(None);
        }
        let hash = *blake3::hash(page).as_bytes();
        if let Some(&(known, at)) = self.index.get(&hash) {
            self.dedup_pages += 1;
            return Ok(Some((self.pack_number(known), at)));
        }
        if self.pack.is_none() {
            let name = format!("{}-{}", now_ms(), random_hex());
            let rel = pack_rel(&name);
            let handle = self
                .store
                .data
                .create(
                    self.store.packs,
                    format!("{name}.pack").as_bytes(),
                    0o644,
                    true,
                )
                .await
                .map_err(cluster("creating pack", &self.store.sub(&rel)))?;
            self.known_packs.push(name.clone());
            self.pack = Some(PackWriter {
                name,
                handle,
                hashes: Vec::new(),
                pending: Vec::with_capacity(PACK_BATCH),
                written: 0,
                in_flight: tokio::task::JoinSet::new(),
            });
        }
        let known = (self.known_packs.len() - 1) as u32;
        let number = self.pack_number(known);
        let pack = self
            .pack
            .as_mut()
            .ok_or_else(|| CkptError::Writer("pack vanished while pages were written".into()))?;
        let at = pack.hashes.len() as u64;
        pack.hashes.push(hash);
        pack.pending.extend_from_slice(page);
        self.index.insert(hash, (known, at));
        self.new_bytes += PAGE as u64;
        if pack.pending.len() >= PACK_BATCH {
            self.flush_pack(WRITES_IN_FLIGHT).await?;
        }
        Ok(Some((number, at)))
    }

    /// Hands the pending batch to a background write, then waits until at most `in_flight`
    /// writes are still running (0: the pack holds everything handed over so far).
    async fn flush_pack(&mut self, in_flight: usize) -> Result<()> {
        let Some(pack) = self.pack.as_mut() else {
            return Ok(());
        };
        let rel = pack_rel(&pack.name);
        if !pack.pending.is_empty() {
            let data = std::mem::replace(&mut pack.pending, Vec::with_capacity(PACK_BATCH));
            let (handle, at) = (pack.handle.clone(), pack.written);
            pack.written += data.len() as u64;
            pack.in_flight
                .spawn(async move { handle.write_at(at, &data).await });
        }
        while pack.in_flight.len() > in_flight {
            join_write(&mut pack.in_flight, &self.store.sub(&rel)).await?;
        }
        Ok(())
    }

    /// Writes out and fsyncs what the pack holds so far.
    async fn sync_pack(&mut self) -> Result<()> {
        self.flush_pack(0).await?;
        let Some(pack) = self.pack.as_ref() else {
            return Ok(());
        };
        let rel = pack_rel(&pack.name);
        pack.handle
            .fsync()
            .await
            .map_err(cluster("syncing pack", &self.store.sub(&rel)))
    }

    /// Makes the pack durable on every replica, then writes its index.
    async fn close_pack(&mut self) -> Result<()> {
        self.flush_pack(0).await?;
        let Some(pack) = self.pack.take() else {
            return Ok(());
        };
        let rel = pack_rel(&pack.name);
        pack.handle.close().await.map_err(cluster(
            "closing pack (data not durable)",
            &self.store.sub(&rel),
        ))?;
        let idx_name = format!("{}.idx", pack.name);
        self.store
            .write_file(
                self.store.packs,
                &idx_name,
                &encode_index(&pack.hashes),
                &format!("{PACKS}/{idx_name}"),
            )
            .await
    }
}

/// Takes the result of one background pack write.
async fn join_write(
    set: &mut tokio::task::JoinSet<std::result::Result<(), kerfs_client::ClientError>>,
    path: &str,
) -> Result<()> {
    match set.join_next().await {
        None => Ok(()),
        Some(Ok(res)) => res.map_err(cluster("writing pack", path)),
        Some(Err(e)) => Err(CkptError::Writer(format!(
            "a write of {path} panicked or was cancelled: {e}"
        ))),
    }
}

/// Appends a page location to run-length references.
fn push_ref(runs: &mut Vec<PageRefRun>, loc: Option<Location>) {
    let (pack, first) = match loc {
        None => (0, 0),
        Some((p, at)) => (p + 1, at),
    };
    if let Some(last) = runs.last_mut() {
        if last.pack == pack && (pack == 0 || last.first + last.count == first) {
            last.count += 1;
            return;
        }
    }
    runs.push(PageRefRun {
        pack,
        first,
        count: 1,
    });
}

/// Splits an image stream and ingests its pages.
async fn ingest_image(
    state: &mut Ingest,
    mut rx: mpsc::Receiver<StreamItem>,
) -> Result<(ProcessEntry, u64)> {
    let mut head: Vec<u8> = Vec::new();
    let mut trailer_seen = 0usize;
    let mut head_len: Option<usize> = None;
    let mut pages_left: u64 = 0;
    let mut carry: Vec<u8> = Vec::with_capacity(PAGE);
    let mut runs = Vec::new();
    let mut total = 0u64;
    while let Some(item) = rx.recv().await {
        let buf = match item {
            StreamItem::Bytes(b) => b,
            StreamItem::Reused(locs) => {
                let bytes = (locs.len() * PAGE) as u64;
                if head_len.is_none_or(|l| head.len() < l)
                    || !carry.is_empty()
                    || bytes > pages_left
                {
                    return Err(CkptError::BadStream(
                        "unchanged pages handed over outside the page data".into(),
                    ));
                }
                for loc in locs {
                    push_ref(&mut runs, loc.map(|(k, at)| (state.pack_number(k), at)));
                }
                state.reused_pages += bytes / PAGE as u64;
                pages_left -= bytes;
                total += bytes;
                continue;
            }
        };
        total += buf.len() as u64;
        let mut rest: &[u8] = &buf;
        while !rest.is_empty() {
            // Header and metadata.
            let want_head = head_len.unwrap_or(HEADER_LEN);
            if head.len() < want_head {
                let n = (want_head - head.len()).min(rest.len());
                head.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if head_len.is_none() && head.len() == HEADER_LEN {
                    if &head[..8] != MAGIC {
                        return Err(CkptError::BadStream("wrong magic".into()));
                    }
                    let le64 = |o: usize| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&head[o..o + 8]);
                        u64::from_le_bytes(b)
                    };
                    let meta_len = le64(16);
                    pages_left = le64(24);
                    if meta_len > 256 << 20 || !pages_left.is_multiple_of(PAGE as u64) {
                        return Err(CkptError::BadStream(format!(
                            "metadata {meta_len} bytes, pages {pages_left} bytes"
                        )));
                    }
                    head_len = Some(HEADER_LEN + meta_len as usize);
                }
                continue;
            }
            // Pages, whole pages straight from the buffer when aligned.
            if pages_left > 0 {
                if carry.is_empty() {
                    let whole = (rest.len() / PAGE).min((pages_left / PAGE as u64) as usize);
                    if whole > 0 {
                        for p in rest[..whole * PAGE].chunks_exact(PAGE) {
                            let loc = state.page(p).await?;
                            push_ref(&mut runs, loc);
                        }
                        rest = &rest[whole * PAGE..];
                        pages_left -= (whole * PAGE) as u64;
                        continue;
                    }
                }
                let n = (PAGE - carry.len()).min(rest.len());
                carry.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if carry.len() == PAGE {
                    let loc = state.page(&carry).await?;
                    push_ref(&mut runs, loc);
                    carry.clear();
                    pages_left -= PAGE as u64;
                }
                continue;
            }
            // Trailer.
            let n = (TRAILER_LEN - trailer_seen).min(rest.len());
            if n == 0 {
                return Err(CkptError::BadStream(
                    "bytes after the end of the image".into(),
                ));
            }
            trailer_seen += n;
            rest = &rest[n..];
        }
    }
    if head_len.is_none_or(|l| head.len() < l) || pages_left > 0 || trailer_seen < TRAILER_LEN {
        return Err(CkptError::BadStream(
            "the image ended early (the export failed?)".into(),
        ));
    }
    let meta: kerfs_ghost::image::ProcessImage = prost::Message::decode(&head[HEADER_LEN..])
        .map_err(|e| CkptError::BadStream(format!("the image metadata does not decode: {e}")))?;
    Ok((
        ProcessEntry {
            host_pid: meta.host_pid,
            comm: meta.comm,
            head,
            runs,
        },
        total,
    ))
}

/// The [`GhostWriter`] of one process image; see the module docs.
pub struct ImageSink {
    tx: Option<mpsc::Sender<StreamItem>>,
    base: Option<Arc<BaseImage>>,
    done: Option<oneshot::Receiver<std::result::Result<(), String>>>,
    failure: Arc<Mutex<Option<String>>>,
    describe: String,
    progress: Option<ProgressBar>,
    seen: u64,
}

/// The task behind an [`ImageSink`]; hand it to [`Checkpoint::add_image`].
pub struct ImageTask {
    join: tokio::task::JoinHandle<(Ingest, Result<(ProcessEntry, u64)>)>,
}

impl ImageSink {
    fn failed(&self) -> io::Error {
        let msg = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "the checkpoint writer task stopped".into());
        io::Error::other(msg)
    }
}

impl GhostWriter for ImageSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.seen == 0 && buf.len() >= HEADER_LEN {
            // The header announces the size: the progress bar can show a total.
            if let Some(p) = &self.progress {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[16..24]);
                let meta = u64::from_le_bytes(b);
                b.copy_from_slice(&buf[24..32]);
                let pages = u64::from_le_bytes(b);
                p.set_length(HEADER_LEN as u64 + meta + pages + TRAILER_LEN as u64);
            }
        }
        self.seen += buf.len() as u64;
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("image already finished"));
        };
        if tx.blocking_send(StreamItem::Bytes(buf.to_vec())).is_err() {
            return Err(self.failed());
        }
        if let Some(p) = &self.progress {
            p.set_position(self.seen);
        }
        Ok(())
    }

    fn reuse_pages(&mut self, addr: u64, npages: u64) -> io::Result<bool> {
        let Some(base) = &self.base else {
            return Ok(false);
        };
        let locs: Option<Vec<_>> = (0..npages)
            .map(|i| base.locate(addr + i * PAGE as u64))
            .collect();
        let Some(locs) = locs else {
            return Ok(false);
        };
        let Some(tx) = &self.tx else {
            return Err(io::Error::other("image already finished"));
        };
        if tx.blocking_send(StreamItem::Reused(locs)).is_err() {
            return Err(self.failed());
        }
        self.seen += npages * PAGE as u64;
        if let Some(p) = &self.progress {
            p.set_position(self.seen);
        }
        Ok(true)
    }

    fn finish(&mut self) -> io::Result<()> {
        // Closing the channel ends the image; the task flushes the pack and answers.
        self.tx = None;
        let Some(done) = self.done.take() else {
            return Err(io::Error::other("image already finished"));
        };
        match done.blocking_recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(io::Error::other(msg)),
            Err(_) => Err(self.failed()),
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

impl Checkpoint {
    /// The version being written.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Lets the next image take the pages write tracking shows unchanged from process
    /// `host_pid`'s image in `version`. False (and a full image) if that version or process is
    /// gone, or references a pack without an index.
    pub async fn reuse_base(&mut self, version: u64, host_pid: i32) -> Result<bool> {
        let state = self
            .state
            .as_ref()
            .ok_or_else(|| CkptError::Writer("an image is already being written".into()))?;
        let manifest = match self.store.manifest(version).await {
            Ok(m) => m,
            Err(e) => {
                debug!(version, error = %e, "no base version for unchanged pages");
                return Ok(false);
            }
        };
        let Some(entry) = manifest.processes.iter().find(|p| p.host_pid == host_pid) else {
            return Ok(false);
        };
        let mut packs = Vec::with_capacity(manifest.packs.len());
        for name in &manifest.packs {
            match state.known_packs.iter().position(|k| k == name) {
                Some(k) => packs.push(k as u32),
                None => return Ok(false),
            }
        }
        let image: kerfs_ghost::image::ProcessImage =
            match prost::Message::decode(entry.head.get(HEADER_LEN..).unwrap_or_default()) {
                Ok(m) => m,
                Err(_) => return Ok(false),
            };
        let mut runs = Vec::new();
        let mut img = 0u64;
        for m in &image.mappings {
            for r in &m.runs {
                runs.push((r.addr, r.npages, img));
                img += r.npages;
            }
        }
        runs.sort_unstable();
        let mut starts = Vec::with_capacity(entry.runs.len());
        let mut at = 0u64;
        for r in &entry.runs {
            starts.push(at);
            at += r.count;
        }
        self.base = Some(Arc::new(BaseImage {
            runs,
            refs: entry.runs.clone(),
            starts,
            packs,
        }));
        Ok(true)
    }

    /// A writer for the image of one more process, and the task that ingests it. Pass the
    /// sink to `export_process` (on a thread outside the runtime), then hand the task to
    /// [`Checkpoint::add_image`].
    pub fn image_sink(
        &mut self,
        rt: &Handle,
        progress: Option<ProgressBar>,
    ) -> Result<(ImageSink, ImageTask)> {
        let mut state = self
            .state
            .take()
            .ok_or_else(|| CkptError::Writer("an image is already being written".into()))?;
        let (tx, rx) = mpsc::channel::<StreamItem>(CHANNEL_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let failure = Arc::new(Mutex::new(None));
        let fail = failure.clone();
        let join = rt.spawn(async move {
            let res = ingest_image(&mut state, rx).await;
            // `finish` promises the image is stored: its pages are on every replica before it
            // returns (the version still becomes visible only at commit).
            let res = match res {
                Ok(r) => state.sync_pack().await.map(|_| r),
                Err(e) => Err(e),
            };
            let answer = res.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if let Err(msg) = &answer {
                if let Ok(mut f) = fail.lock() {
                    *f = Some(msg.clone());
                }
            }
            let _ = done_tx.send(answer);
            (state, res)
        });
        Ok((
            ImageSink {
                tx: Some(tx),
                base: self.base.take(),
                done: Some(done_rx),
                failure,
                describe: format!("{}@{}", self.store.addr(), self.version),
                progress,
                seen: 0,
            },
            ImageTask { join },
        ))
    }

    /// Takes the result of an image's task into the version. Call it after the export
    /// returned, whether it succeeded or not (the writer state comes back either way).
    pub async fn add_image(&mut self, task: ImageTask) -> Result<()> {
        let (state, res) = task.join.await.map_err(|e| {
            CkptError::Writer(format!("writer task panicked or was cancelled: {e}"))
        })?;
        self.state = Some(state);
        let (entry, image_bytes) = res?;
        self.image_bytes += image_bytes;
        self.page_bytes += entry.runs.iter().map(|r| r.count).sum::<u64>() * PAGE as u64;
        self.processes.push(entry);
        Ok(())
    }

    /// Copies a local file into the version (`--copy-files`); a restart puts it back.
    pub async fn copy_file(&mut self, local: &std::path::Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let shown = local.display().to_string();
        let bytes = std::fs::read(local).map_err(|cause| CkptError::Local {
            what: "reading file to copy".into(),
            path: shown.clone(),
            cause,
        })?;
        let mode = std::fs::metadata(local)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let files_rel = format!("{VERSIONS}/{}/files", self.partial);
        let files_ino = match self.files_ino {
            Some(i) => i,
            None => {
                let a = self
                    .store
                    .meta()
                    .mkdir(self.partial_ino, b"files", 0o755)
                    .await
                    .map_err(cluster("creating", &self.store.sub(&files_rel)))?;
                self.files_ino = Some(a.ino);
                a.ino
            }
        };
        let stored = format!("{}", self.files.len());
        self.store
            .write_file(files_ino, &stored, &bytes, &format!("{files_rel}/{stored}"))
            .await?;
        self.files.push(CopiedFile {
            path: shown,
            stored,
            size: bytes.len() as u64,
            mode,
            hash: blake3::hash(&bytes).as_bytes().to_vec(),
        });
        Ok(())
    }

    /// Stores System V IPC objects in the version, each in a file of its own under
    /// `ipc/`; a restart creates them again ([`crate::OpenVersion::ipc_objects`]).
    pub async fn add_ipc(&mut self, objects: &[kerfs_ghost::ipc::SysvObject]) -> Result<()> {
        let ipc_rel = format!("{VERSIONS}/{}/ipc", self.partial);
        for o in objects {
            let ipc_ino = match self.ipc_ino {
                Some(i) => i,
                None => {
                    let a = self
                        .store
                        .meta()
                        .mkdir(self.partial_ino, b"ipc", 0o755)
                        .await
                        .map_err(cluster("creating", &self.store.sub(&ipc_rel)))?;
                    self.ipc_ino = Some(a.ino);
                    a.ino
                }
            };
            let stored = format!("{}", self.ipc.len());
            let bytes = kerfs_ghost::ipc::encode_image(std::slice::from_ref(o));
            self.store
                .write_file(ipc_ino, &stored, &bytes, &format!("{ipc_rel}/{stored}"))
                .await?;
            self.ipc_bytes += bytes.len() as u64;
            self.ipc.push(IpcSnapshot {
                kind: o.kind().short().to_string(),
                key: i64::from(o.key()),
                id: i64::from(o.id()),
                stored,
            });
        }
        Ok(())
    }

    /// Makes the version durable and visible: closes the pack (durable on every replica)
    /// and writes its index, writes the manifest, then renames `.partial-N` to `N`.
    pub async fn commit(mut self) -> Result<CommitReport> {
        let res = self.commit_inner().await;
        self.release(res.is_err()).await;
        res
    }

    async fn commit_inner(&mut self) -> Result<CommitReport> {
        let mut state = self
            .state
            .take()
            .ok_or_else(|| CkptError::Writer("an image is still being written".into()))?;
        state.close_pack().await?;
        let stats = Stats {
            image_bytes: self.image_bytes,
            page_bytes: self.page_bytes,
            new_bytes: state.new_bytes,
            dedup_pages: state.dedup_pages,
            zero_pages: state.zero_pages,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            file_bytes: self.files.iter().map(|f| f.size).sum(),
            reused_pages: state.reused_pages,
            ipc_bytes: self.ipc_bytes,
        };
        let manifest = Manifest {
            version: self.version,
            created_unix_ms: now_ms(),
            app: self.store.app.clone(),
            host: host_name(),
            packs: state.packs.clone(),
            processes: std::mem::take(&mut self.processes),
            ipc: std::mem::take(&mut self.ipc),
            files: std::mem::take(&mut self.files),
            comm_logs: Vec::new(),
            stats: Some(stats),
        };
        let partial_rel = format!("{VERSIONS}/{}", self.partial);
        self.store
            .write_file(
                self.partial_ino,
                MANIFEST,
                &manifest.encode_file(),
                &format!("{partial_rel}/{MANIFEST}"),
            )
            .await?;
        // A GC only deletes packs when no writer marker is live; if ours was judged stale
        // (this process was stopped for minutes) and removed, our packs may be gone.
        let marker_rel = format!("{WRITERS}/{}", self.marker);
        self.store.touch(self.marker_ino, &marker_rel).await.map_err(|_| {
            CkptError::Busy(format!(
                "{} vanished while the checkpoint was written (a `krg gc` judged this writer dead); the version was not published, checkpoint again",
                self.store.sub(&marker_rel)
            ))
        })?;
        self.store
            .meta()
            .rename(
                self.store.versions,
                self.partial.as_bytes(),
                self.store.versions,
                self.version.to_string().as_bytes(),
                RENAME_NOREPLACE,
            )
            .await
            .map_err(cluster(
                "publishing (rename) the version",
                &self.store.sub(&partial_rel),
            ))?;
        Ok(CommitReport {
            version: self.version,
            stats,
        })
    }

    /// Gives up: removes the marker and the partial version (packs are left to GC).
    pub async fn abort(mut self) {
        self.release(true).await;
    }

    /// Stops the heartbeat and removes the writer marker; with `discard`, also closes the pack
    /// and removes the partial version. Best effort: GC removes whatever is left.
    async fn release(&mut self, discard: bool) {
        self.heartbeat.abort();
        let _ = self
            .store
            .meta()
            .unlink(self.store.writers, self.marker.as_bytes())
            .await;
        if !discard {
            return;
        }
        if let Some(pack) = self.state.as_mut().and_then(|s| s.pack.take()) {
            let _ = pack.handle.close().await;
        }
        let _ = self
            .store
            .remove_tree(
                self.store.versions,
                &self.partial,
                &format!("{VERSIONS}/{}", self.partial),
            )
            .await;
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_coalesce() {
        let mut runs = Vec::new();
        for loc in [
            Some((0, 5)),
            Some((0, 6)),
            None,
            None,
            Some((0, 9)),
            Some((1, 10)),
        ] {
            push_ref(&mut runs, loc);
        }
        let got: Vec<(u32, u64, u64)> = runs.iter().map(|r| (r.pack, r.first, r.count)).collect();
        assert_eq!(got, vec![(1, 5, 2), (0, 0, 2), (1, 9, 1), (2, 10, 1)]);
    }
}
