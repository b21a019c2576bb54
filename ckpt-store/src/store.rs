//! The layout of a checkpoint store in KerFS and the namespace operations on it.
//!
//! ```text
//! /ckpt/myapp/
//!   packs/<id>.pack        page data, content-addressed, shared by every version
//!   packs/<id>.idx         blake3 of each page of the pack (written once the pack is durable)
//!   versions/<N>/manifest  one committed version (see `format`)
//!   versions/<N>/files/    files copied with --copy-files
//!   versions/<N>/ipc/      System V IPC objects (`krg ipc checkpoint`, `krg checkpoint --ipc`)
//!   versions/.partial-<N>  a version being written (or left by a killed krg)
//!   versions/.deleted-<N>-<r>  a version being removed
//!   writers/<id>           one marker per live checkpoint writer (heartbeat in its mtime)
//!   gc.lock                present while `krg gc` runs
//! ```
//!
//! Only `versions/<number>` entries are versions: a directory gets such a name by one rename
//! once everything in it and every pack it references is durable, so a reader never sees half
//! a version. A writer claims number N by creating `.partial-N` (mkdir is exclusive), one above
//! every committed or partial number it sees; after `krg rm` of the newest version, its number
//! can be taken again (retention never removes the newest).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kerfs_client::proto::{Attr, FileKind, SetAttr, TimeSet, ROOT_INO};
use kerfs_client::{ClientError, DataClient, MetaClient};

use crate::error::{cluster, CkptError, Result};
use crate::format::{Manifest, Stats};

/// Name of the pack directory.
pub const PACKS: &str = "packs";
/// Path of pack `name` relative to the store.
pub fn pack_rel(name: &str) -> String {
    format!("{PACKS}/{name}.pack")
}

/// Name of the version directory.
pub const VERSIONS: &str = "versions";
/// Name of the writer marker directory.
pub const WRITERS: &str = "writers";
/// Name of the GC lock file.
pub const GC_LOCK: &str = "gc.lock";
/// Name of the manifest in a version directory.
pub const MANIFEST: &str = "manifest";
/// Prefix of a version being written.
pub const PARTIAL_PREFIX: &str = ".partial-";
/// Prefix of a version being removed.
pub const DELETED_PREFIX: &str = ".deleted-";
/// A marker or lock whose heartbeat is older than this belongs to a dead process.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// How often live markers and locks are touched.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Where a store is and, optionally, which version: `kerfs:/ckpt/myapp[@VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreAddr {
    /// Absolute KerFS path of the store.
    pub path: String,
    /// The version, when one was named.
    pub version: Option<u64>,
}

impl StoreAddr {
    /// Parses `kerfs:/path[@VERSION]`.
    pub fn parse(s: &str) -> Result<StoreAddr> {
        let rest = s.strip_prefix("kerfs:").ok_or_else(|| {
            CkptError::Address(format!(
                "{s:?} is not a checkpoint store address; write kerfs:/PATH[@VERSION], e.g. kerfs:/ckpt/myapp"
            ))
        })?;
        let (path, version) = match rest.rsplit_once('@') {
            Some((p, v)) => {
                let v = v.parse::<u64>().map_err(|_| {
                    CkptError::Address(format!(
                        "{s:?}: {v:?} after @ is not a version number (see `krg ls kerfs:{p}`)"
                    ))
                })?;
                (p, Some(v))
            }
            None => (rest, None),
        };
        let path = format!("/{}", path.trim_matches('/'));
        if path == "/" {
            return Err(CkptError::Address(format!(
                "{s:?}: a store needs its own directory, e.g. kerfs:/ckpt/myapp"
            )));
        }
        Ok(StoreAddr { path, version })
    }
}

/// A committed version as `krg ls` shows it.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// When it was taken (ms since the epoch).
    pub created_unix_ms: u64,
    /// Number of processes.
    pub processes: usize,
    /// Number of System V IPC objects.
    pub ipc_objects: usize,
    /// What writing it cost.
    pub stats: Stats,
}

/// An open checkpoint store.
#[derive(Clone)]
pub struct Store {
    pub(crate) data: DataClient,
    pub(crate) path: String,
    pub(crate) app: String,
    pub(crate) dir: u64,
    pub(crate) packs: u64,
    pub(crate) versions: u64,
    pub(crate) writers: u64,
}

pub(crate) fn errno_of(e: &ClientError) -> i32 {
    e.errno()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Age of a file by its mtime (zero if the clock or the mtime is odd).
pub(crate) fn age_of(attr: &Attr) -> Duration {
    let mtime_ms = attr
        .mtime
        .map(|t| (t.sec.max(0) as u64) * 1000 + u64::from(t.nsec) / 1_000_000)
        .unwrap_or(0);
    Duration::from_millis(now_ms().saturating_sub(mtime_ms))
}

/// This host's name, for manifests and marker names.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A random hex string for unique names.
pub(crate) fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

/// Looks `name` up in `parent`, creating the directory if it is missing.
async fn mkdir_p(meta: &MetaClient, parent: u64, name: &str, path: &str) -> Result<u64> {
    match meta.lookup(parent, name.as_bytes()).await {
        Ok(a) => return Ok(a.ino),
        Err(e) if errno_of(&e) == libc::ENOENT => {}
        Err(e) => return Err(cluster("looking up", path)(e)),
    }
    match meta.mkdir(parent, name.as_bytes(), 0o755).await {
        Ok(a) => Ok(a.ino),
        // Another writer created it between our lookup and mkdir.
        Err(e) if errno_of(&e) == libc::EEXIST => meta
            .lookup(parent, name.as_bytes())
            .await
            .map(|a| a.ino)
            .map_err(cluster("looking up", path)),
        Err(e) => Err(cluster("creating directory", path)(e)),
    }
}

impl Store {
    /// Opens the store at `path`; with `create`, makes it (and its parents) if missing.
    pub async fn open(data: DataClient, path: &str, create: bool) -> Result<Store> {
        let meta = data.meta().clone();
        let mut ino = ROOT_INO;
        let mut so_far = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            so_far.push('/');
            so_far.push_str(part);
            ino = if create {
                mkdir_p(&meta, ino, part, &so_far).await?
            } else {
                match meta.lookup(ino, part.as_bytes()).await {
                    Ok(a) => a.ino,
                    Err(e) if errno_of(&e) == libc::ENOENT => {
                        return Err(CkptError::Empty {
                            app: format!("kerfs:{path}"),
                        })
                    }
                    Err(e) => return Err(cluster("looking up", &so_far)(e)),
                }
            };
        }
        let sub = |n: &str| format!("{so_far}/{n}");
        if !create {
            // Reading a directory that is no store must not turn it into one.
            match meta.lookup(ino, VERSIONS.as_bytes()).await {
                Ok(_) => {}
                Err(e) if errno_of(&e) == libc::ENOENT => {
                    return Err(CkptError::Empty {
                        app: format!("kerfs:{so_far}"),
                    })
                }
                Err(e) => return Err(cluster("looking up", &sub(VERSIONS))(e)),
            }
        }
        let packs = mkdir_p(&meta, ino, PACKS, &sub(PACKS)).await?;
        let versions = mkdir_p(&meta, ino, VERSIONS, &sub(VERSIONS)).await?;
        let writers = mkdir_p(&meta, ino, WRITERS, &sub(WRITERS)).await?;
        let app = so_far.rsplit('/').next().unwrap_or_default().to_string();
        Ok(Store {
            data,
            path: so_far,
            app,
            dir: ino,
            packs,
            versions,
            writers,
        })
    }

    /// `kerfs:/path` of the store, for messages.
    pub fn addr(&self) -> String {
        format!("kerfs:{}", self.path)
    }

    /// The application name (last path component).
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The client the store works through.
    pub fn data(&self) -> &DataClient {
        &self.data
    }

    pub(crate) fn meta(&self) -> &MetaClient {
        self.data.meta()
    }

    /// KerFS path of `rel` inside the store, for messages.
    pub(crate) fn sub(&self, rel: &str) -> String {
        format!("{}/{rel}", self.path)
    }

    /// Entries of a directory with their attributes.
    pub(crate) async fn list(&self, ino: u64, rel: &str) -> Result<Vec<(String, Attr)>> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let (entries, eof) = self
                .meta()
                .readdir(ino, cookie, 1024, true)
                .await
                .map_err(cluster("listing", &self.sub(rel)))?;
            if let Some(last) = entries.last() {
                cookie = last.cookie;
            }
            let empty = entries.is_empty();
            for e in entries {
                let name = String::from_utf8_lossy(&e.name).into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                out.push((name, e.attr.unwrap_or_default()));
            }
            if eof || empty {
                return Ok(out);
            }
        }
    }

    /// Reads a whole file of `size` bytes.
    pub(crate) async fn read_file(&self, ino: u64, size: u64, rel: &str) -> Result<Vec<u8>> {
        let path = self.sub(rel);
        let f = self
            .data
            .open(ino, libc::O_RDONLY as u32)
            .await
            .map_err(cluster("opening", &path))?;
        let mut out = Vec::with_capacity(size as usize);
        let res = async {
            while (out.len() as u64) < size {
                let want = ((size - out.len() as u64) as usize).min(16 << 20);
                let got = f.read_at(out.len() as u64, want).await?;
                if got.is_empty() {
                    break;
                }
                out.extend_from_slice(&got);
            }
            Ok::<_, ClientError>(())
        }
        .await;
        let _ = f.close().await;
        res.map_err(cluster("reading", &path))?;
        if (out.len() as u64) < size {
            return Err(CkptError::Damaged {
                object: path,
                msg: format!("{} bytes where {size} were expected", out.len()),
            });
        }
        Ok(out)
    }

    /// Creates `name` in `parent` (exclusively) holding `bytes`, durable when this returns.
    pub(crate) async fn write_file(
        &self,
        parent: u64,
        name: &str,
        bytes: &[u8],
        rel: &str,
    ) -> Result<()> {
        let path = self.sub(rel);
        let f = self
            .data
            .create(parent, name.as_bytes(), 0o644, true)
            .await
            .map_err(cluster("creating", &path))?;
        let written = f.write_at(0, bytes).await;
        let closed = f.close().await;
        written
            .and(closed)
            .map_err(cluster("writing (the data is not durable)", &path))
    }

    /// Sets a marker's mtime to the metadata service's clock: its heartbeat.
    pub(crate) async fn touch(&self, ino: u64, rel: &str) -> Result<()> {
        self.meta()
            .setattr(SetAttr {
                ino,
                mtime: Some(TimeSet {
                    how: Some(kerfs_client::proto::time_set::How::Now(true)),
                }),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(cluster("touching", &self.sub(rel)))
    }

    /// Removes `name` in `parent` and everything below it.
    pub(crate) async fn remove_tree(&self, parent: u64, name: &str, rel: &str) -> Result<()> {
        let attr = match self.meta().lookup(parent, name.as_bytes()).await {
            Ok(a) => a,
            Err(e) if errno_of(&e) == libc::ENOENT => return Ok(()),
            Err(e) => return Err(cluster("looking up", &self.sub(rel))(e)),
        };
        if attr.kind == FileKind::Directory as i32 {
            for (child, _) in self.list(attr.ino, rel).await? {
                Box::pin(self.remove_tree(attr.ino, &child, &format!("{rel}/{child}"))).await?;
            }
            match self.meta().rmdir(parent, name.as_bytes()).await {
                Ok(()) => Ok(()),
                Err(e) if errno_of(&e) == libc::ENOENT => Ok(()),
                Err(e) => Err(cluster("removing", &self.sub(rel))(e)),
            }
        } else {
            match self.meta().unlink(parent, name.as_bytes()).await {
                Ok(()) => Ok(()),
                Err(e) if errno_of(&e) == libc::ENOENT => Ok(()),
                Err(e) => Err(cluster("removing", &self.sub(rel))(e)),
            }
        }
    }

    /// Committed version numbers, ascending.
    pub async fn version_numbers(&self) -> Result<Vec<u64>> {
        let mut v: Vec<u64> = self
            .list(self.versions, VERSIONS)
            .await?
            .into_iter()
            .filter_map(|(name, _)| committed_number(&name))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// The newest committed version.
    pub async fn latest(&self) -> Result<u64> {
        self.version_numbers()
            .await?
            .last()
            .copied()
            .ok_or_else(|| CkptError::Empty { app: self.addr() })
    }

    /// Reads and checks the manifest of version `v`.
    pub async fn manifest(&self, v: u64) -> Result<Manifest> {
        let dir = match self
            .meta()
            .lookup(self.versions, v.to_string().as_bytes())
            .await
        {
            Ok(a) => a,
            Err(e) if errno_of(&e) == libc::ENOENT => {
                return Err(CkptError::NoSuchVersion {
                    app: self.addr(),
                    version: v,
                })
            }
            Err(e) => return Err(cluster("looking up", &self.sub(&format!("{VERSIONS}/{v}")))(e)),
        };
        let rel = format!("{VERSIONS}/{v}/{MANIFEST}");
        let attr = self
            .meta()
            .lookup(dir.ino, MANIFEST.as_bytes())
            .await
            .map_err(cluster("looking up", &self.sub(&rel)))?;
        let bytes = self.read_file(attr.ino, attr.size, &rel).await?;
        let m = Manifest::decode_file(&bytes, &self.sub(&rel))?;
        if m.version != v {
            return Err(CkptError::Damaged {
                object: self.sub(&rel),
                msg: format!(
                    "holds version {} in the directory of version {v}",
                    m.version
                ),
            });
        }
        Ok(m)
    }

    /// Every committed version with its statistics, ascending.
    pub async fn versions(&self) -> Result<Vec<VersionInfo>> {
        let mut out = Vec::new();
        for v in self.version_numbers().await? {
            let m = self.manifest(v).await?;
            out.push(VersionInfo {
                version: v,
                created_unix_ms: m.created_unix_ms,
                processes: m.processes.len(),
                ipc_objects: m.ipc.len(),
                stats: m.stats.unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Removes committed version `v`: first renamed out of the version namespace (so it
    /// disappears at once), then deleted. Its packs stay until `gc` finds them unreferenced.
    pub async fn remove_version(&self, v: u64) -> Result<()> {
        let gone = format!("{DELETED_PREFIX}{v}-{}", random_hex());
        match self
            .meta()
            .rename(
                self.versions,
                v.to_string().as_bytes(),
                self.versions,
                gone.as_bytes(),
                kerfs_client::proto::RENAME_NOREPLACE,
            )
            .await
        {
            Ok(()) => {}
            Err(e) if errno_of(&e) == libc::ENOENT => {
                return Err(CkptError::NoSuchVersion {
                    app: self.addr(),
                    version: v,
                })
            }
            Err(e) => {
                return Err(cluster("removing", &self.sub(&format!("{VERSIONS}/{v}")))(
                    e,
                ))
            }
        }
        self.remove_tree(self.versions, &gone, &format!("{VERSIONS}/{gone}"))
            .await
    }

    /// Sum of the sizes of the pack files (what the page data costs in the cluster, per copy).
    pub async fn pack_bytes(&self) -> Result<u64> {
        Ok(self
            .list(self.packs, PACKS)
            .await?
            .iter()
            .filter(|(n, _)| n.ends_with(".pack"))
            .map(|(_, a)| a.size)
            .sum())
    }

    /// Names of the pack files (without extension).
    pub async fn pack_names(&self) -> Result<Vec<String>> {
        Ok(self
            .list(self.packs, PACKS)
            .await?
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(".pack").map(str::to_string))
            .collect())
    }

    /// Names under `versions/` that are not committed versions (partial or being deleted).
    pub async fn uncommitted_entries(&self) -> Result<Vec<String>> {
        Ok(self
            .list(self.versions, VERSIONS)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| committed_number(n).is_none())
            .collect())
    }

    /// The page hashes of pack `name` (its `.idx`), for readers to check pages against.
    pub(crate) async fn pack_hashes(&self, name: &str) -> Result<Vec<[u8; 32]>> {
        let rel = format!("{PACKS}/{name}.idx");
        let a = self
            .meta()
            .lookup(self.packs, format!("{name}.idx").as_bytes())
            .await
            .map_err(cluster("looking up", &self.sub(&rel)))?;
        let bytes = self.read_file(a.ino, a.size, &rel).await?;
        crate::format::decode_index(&bytes, &self.sub(&rel))
    }

    /// Inode of pack `name` (`.pack`), for readers.
    pub(crate) async fn pack_ino(&self, name: &str) -> Result<Attr> {
        let rel = pack_rel(name);
        self.meta()
            .lookup(self.packs, format!("{name}.pack").as_bytes())
            .await
            .map_err(|e| {
                if errno_of(&e) == libc::ENOENT {
                    CkptError::Damaged {
                        object: self.sub(&rel),
                        msg: "is missing (removed by hand, or by a GC that ignored this version's marker); this version cannot be restored".into(),
                    }
                } else {
                    cluster("looking up", &self.sub(&rel))(e)
                }
            })
    }
}

/// The version number of a committed version directory name (digits only).
pub fn committed_number(name: &str) -> Option<u64> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            StoreAddr::parse("kerfs:/ckpt/app@12").unwrap(),
            StoreAddr {
                path: "/ckpt/app".into(),
                version: Some(12)
            }
        );
        assert_eq!(
            StoreAddr::parse("kerfs:ckpt/app/").unwrap().path,
            "/ckpt/app"
        );
        assert!(StoreAddr::parse("/ckpt/app").is_err());
        assert!(StoreAddr::parse("kerfs:/").is_err());
        assert!(StoreAddr::parse("kerfs:/a@x").is_err());
    }

    #[test]
    fn only_numbers_are_versions() {
        assert_eq!(committed_number("12"), Some(12));
        assert_eq!(committed_number(".partial-3"), None);
        assert_eq!(committed_number(".deleted-3-ab"), None);
        assert_eq!(committed_number(""), None);
    }
}
