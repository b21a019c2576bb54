//! The filesystem logic of the mount, in plain async Rust over [`MetaClient`]: inode number
//! mapping (for `subdir=`), attribute conversion, open file and directory handle tables,
//! readdir offsets, and POSIX errors. Nothing here knows about kernel requests or replies;
//! [`crate::fuse`] adapts this to fuser, so this part can be driven directly by tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use kerfs_client::{DataClient, Durability, FileHandle, MetaClient};
use kerfs_proto::{
    perm, time_set, Attr, Caller, FileKind, FsStats, MakeNode, Reply, TimeSet, Timespec,
};

use crate::error::{FsError, FsResult};

mod closing;
mod locks;
pub use locks::{lock_kind_of, signal_pending, KernelLock};

/// Entries asked from the cluster per readdir call: the kernel's readdir buffer (one page
/// for readdir, a few for readdirplus) holds about this many, so more would be fetched for
/// nothing and fetched again from the next offset.
const READDIR_PAGE: u32 = 128;

/// `st_blksize`: the I/O size programs like cp pick their buffer from.
const BLKSIZE: u32 = 64 * 1024;

/// Largest copy_file_range per request: the reply's byte count is 32 bits.
const COPY_MAX: u64 = 1 << 30;

/// Offsets of the synthesized "." and ".." entries; the cluster's own cookies start at 3.
const DOT_OFFSET: u64 = 1;
const DOTDOT_OFFSET: u64 = 2;

/// Behaviour fixed at mount time.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// How long the kernel may cache name → inode lookups.
    pub entry_ttl: Duration,
    /// The kernel checks permissions from the mode bits before it asks us (the
    /// `default_permissions` mount option): a change it allowed can wait for the file's
    /// next commit (see [`KerFs::setattr`]).
    pub default_permissions: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            default_permissions: true,
        }
    }
}

/// A name resolved to an inode, as the kernel wants it for lookup/create/mkdir...
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: FileAttr,
    pub generation: u64,
}

/// One line of a directory listing.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    /// The offset to continue from after this entry.
    pub offset: u64,
    pub kind: FileType,
    pub name: Vec<u8>,
    /// Filled for readdirplus.
    pub entry: Option<Entry>,
}

/// Attributes to change; `None` leaves a field alone (UTIME_OMIT included).
#[derive(Debug, Clone, Default)]
pub struct SetAttrIn {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// Set through an open file (ftruncate): the handle's access mode decides, not the
    /// inode's permission bits.
    pub fh: Option<u64>,
}

/// A time to set: now (the cluster's clock) or an explicit time.
pub fn time_now() -> TimeSet {
    TimeSet {
        how: Some(time_set::How::Now(true)),
    }
}

pub fn time_at(t: SystemTime) -> TimeSet {
    TimeSet {
        how: Some(time_set::How::At(Timespec::from_system_time(t))),
    }
}

/// An open regular file (one per kernel `open`).
struct OpenFile {
    /// Cluster inode.
    ino: u64,
    /// The cluster handle opened as the caller: it checked the caller's access and keeps an
    /// unlinked file alive until release.
    handle: u64,
    /// The inode's shared data handle (see [`DataSlot`]).
    data: FileHandle,
    /// Opened for writing (O_WRONLY or O_RDWR).
    writable: bool,
    /// A lock was asked for through it: the cluster drops flock and OFD locks with the
    /// handle, so its release must not wait in the close queue.
    locked: std::sync::atomic::AtomicBool,
}

/// The data handle of one inode, shared by every open of it in this mount. Sharing is what
/// makes a write through one descriptor visible to a read through another before either is
/// closed, as POSIX wants within one machine: each data handle has its own write-behind
/// buffer, size and chunk table. It is opened read-write as the mount itself (access was
/// checked by the caller's own open) and closed with the inode's last open.
struct DataSlot {
    handle: FileHandle,
    refs: usize,
}

/// An open directory. Listing is stateless (the cluster's cookies are stable offsets), so
/// the handle only remembers which directory it is.
#[derive(Debug)]
struct OpenDir {
    ino: u64,
}

/// The mounted filesystem.
pub struct KerFs {
    client: MetaClient,
    data: DataClient,
    /// Data handles by cluster inode. An async lock: opening a slot awaits the cluster, and
    /// two first opens of one inode must not make two slots.
    slots: tokio::sync::Mutex<HashMap<u64, DataSlot>>,
    config: FsConfig,
    /// Cluster inode shown as the mount's root (1 unless `subdir=`).
    root: u64,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    /// Inodes found without a [`CAPS_XATTR`], and when: the kernel asks for it before every
    /// write (to drop file capabilities), and asking the cluster each time cost a round trip
    /// per write. Trusted for `attr_ttl`, like every other cached attribute.
    no_caps: Mutex<HashMap<u64, Instant>>,
    /// Lock bookkeeping of this mount (see `locks`).
    locks: locks::MountLocks,
    /// Per inode, the version of its data (see [`DataVersion`]) the cluster reported at its
    /// last open here: what the kernel's cached pages of the file can be trusted for.
    opened_versions: Mutex<HashMap<u64, DataVersion>>,
    /// Released handles on their way to the cluster (see `closing`).
    closing: closing::CloseQueue,
}

/// What changes whenever anyone changes a file's data: its size, mtime and ctime (an
/// explicit mtime set back after a write still moves ctime, which nobody can set).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DataVersion {
    size: u64,
    mtime: Option<Timespec>,
    ctime: Option<Timespec>,
}

impl DataVersion {
    fn of(a: &Attr) -> DataVersion {
        DataVersion {
            size: a.size,
            mtime: a.mtime,
            ctime: a.ctime,
        }
    }
}

/// Entries in [`KerFs::opened_versions`] before it starts over (a forgotten version only
/// costs the kernel's cached pages of that file at its next open).
const OPENED_VERSIONS_MAX: usize = 65536;

/// The extended attribute holding file capabilities.
const CAPS_XATTR: &[u8] = b"security.capability";

/// Entries in [`KerFs::no_caps`] before the stale ones are dropped.
const NO_CAPS_MAX: usize = 4096;

impl KerFs {
    /// A filesystem showing cluster directory `root` as the mount's root. Call it within
    /// the tokio runtime that serves it (it starts a task there).
    pub fn new(client: MetaClient, config: FsConfig, root: u64) -> KerFs {
        KerFs {
            data: DataClient::new(client.clone()),
            slots: tokio::sync::Mutex::new(HashMap::new()),
            config,
            root,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            no_caps: Mutex::new(HashMap::new()),
            locks: locks::MountLocks::default(),
            opened_versions: Mutex::new(HashMap::new()),
            closing: closing::CloseQueue::start(client.clone()),
            client,
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    fn as_caller(&self, caller: &Caller) -> MetaClient {
        self.client.with_caller(caller.clone())
    }

    // ------------------------------------------------------------- inode numbers

    /// The kernel's inode number 1 is the mount root; with `subdir=` that is another
    /// cluster inode, so the two numbers swap places (a bijection: no table needed).
    pub fn to_cluster(&self, fuse_ino: u64) -> u64 {
        swap_root(self.root, fuse_ino)
    }

    pub fn to_fuse(&self, cluster_ino: u64) -> u64 {
        // The swap is its own inverse.
        swap_root(self.root, cluster_ino)
    }

    // ------------------------------------------------------------- attributes

    pub fn file_attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.to_fuse(a.ino)),
            size: a.size,
            blocks: a.blocks,
            atime: system_time(a.atime.as_ref()),
            mtime: system_time(a.mtime.as_ref()),
            ctime: system_time(a.ctime.as_ref()),
            crtime: system_time(a.crtime.as_ref()),
            kind: file_type(a.kind),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            // The kernel's dev_t encoding (new_encode_dev) fits in 32 bits.
            rdev: a.rdev as u32,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    /// An inode's attributes as an entry for the kernel, with the size of the file as this
    /// mount sees it (see [`KerFs::overlay_open_state`]): the kernel applies the size of every
    /// entry it is given (lookup, create, link, readdirplus) to its cached inode, so one
    /// entry with the cluster's older size would shrink a file that is being written here.
    async fn entry(&self, mut a: Attr) -> Entry {
        self.overlay_open_state(&mut a).await;
        Entry {
            attr: self.file_attr(&a),
            generation: a.generation,
        }
    }

    // ------------------------------------------------------------- namespace

    pub async fn lookup(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<Entry> {
        let parent = self.to_cluster(parent);
        if parent == self.root && name == b".." {
            // Never let ".." climb above the subdir the mount shows.
            let a = self.as_caller(caller).getattr(parent).await?;
            return Ok(self.entry(a).await);
        }
        let a = self.as_caller(caller).lookup(parent, name).await?;
        Ok(self.entry(a).await)
    }

    pub async fn getattr(&self, caller: &Caller, ino: u64) -> FsResult<FileAttr> {
        let mut a = self.as_caller(caller).getattr(self.to_cluster(ino)).await?;
        self.overlay_open_state(&mut a).await;
        Ok(self.file_attr(&a))
    }

    /// While a file is open here, its size is what our data handle says (it includes
    /// writes still in the write-behind buffer, which the cluster does not know yet), and
    /// its mode lacks the set-user-ID/set-group-ID bits that the commit of an unprivileged
    /// writer's data will clear (so nobody is shown, or execs, a privilege already gone).
    /// Every attribute reply for a regular file goes through this.
    async fn overlay_open_state(&self, a: &mut Attr) {
        if a.kind != FileKind::Regular as i32 {
            return;
        }
        if let Some(slot) = self.slots.lock().await.get(&a.ino) {
            let size = slot.handle.size();
            if size != a.size {
                a.size = size;
                a.blocks = size.div_ceil(512);
            }
            slot.handle.overlay_deferred(a);
            if slot.handle.clears_set_id() {
                a.mode = perm::clear_set_id(a.mode);
            }
        }
    }

    pub async fn setattr(&self, caller: &Caller, ino: u64, s: SetAttrIn) -> FsResult<FileAttr> {
        let ino = self.to_cluster(ino);
        let file = s.fh.and_then(|fh| self.file(fh).ok());
        let req = kerfs_proto::SetAttr {
            ino,
            // The kernel hands over st_mode with the type bits; only permissions change.
            mode: s.mode.map(|m| m & 0o7777),
            uid: s.uid,
            gid: s.gid,
            size: None,
            atime: s.atime,
            mtime: s.mtime,
            handle: file.as_ref().map(|f| f.handle),
            clear_set_id: false,
        };
        let changes_attrs = req.mode.is_some()
            || req.uid.is_some()
            || req.gid.is_some()
            || req.atime.is_some()
            || req.mtime.is_some();
        let slot = self.data_handle(ino).await;
        if let Some(data) = slot.as_ref().filter(|_| s.size.is_none() && changes_attrs) {
            if let Some(mut a) = self.defer_setattr(data, caller, &req) {
                self.overlay_open_state(&mut a).await;
                return Ok(self.file_attr(&a));
            }
        }
        // Earlier changes wait for the commit; this one must not overtake them (a deferred
        // chown after a direct chmod u+s would drop the bit).
        self.flush_deferred(slot.as_ref()).await?;
        let truncated = match s.size {
            Some(size) => Some(self.truncate(caller, ino, size, file.as_deref()).await?),
            None => None,
        };
        if let Some(data) = slot.filter(|_| req.mtime.is_some() || req.atime.is_some()) {
            // Buffered writes are committed with the time of their flush, which would
            // override the time set here (tar x, cp -p, rsync -t): commit them first.
            data.flush().await?;
        }
        let mut a = if changes_attrs {
            self.as_caller(caller).setattr(req).await?
        } else {
            match truncated {
                Some(a) => a,
                None => self.chown_keeping_ids(caller, ino).await?,
            }
        };
        self.overlay_open_state(&mut a).await;
        Ok(self.file_attr(&a))
    }

    /// An attribute change of a file this mount has open for writing, answered here and sent
    /// with the file's next commit (tar's futimens, fchown and fchmod before close cost no
    /// command of their own; see `kerfs_client::FileHandle::defer_setattr`). Only on a
    /// `default_permissions` mount, where the kernel has already refused what the mode bits
    /// refuse; `None` when the change must go to the cluster now.
    fn defer_setattr(
        &self,
        data: &FileHandle,
        caller: &Caller,
        req: &kerfs_proto::SetAttr,
    ) -> Option<Attr> {
        if !self.config.default_permissions || !self.open_for_writing(req.ino) {
            return None;
        }
        data.defer_setattr(Some(caller.clone()), *req)
    }

    /// The data handle of `ino` in this mount, if some descriptor has it open.
    async fn data_handle(&self, ino: u64) -> Option<FileHandle> {
        self.slots.lock().await.get(&ino).map(|s| s.handle.clone())
    }

    /// Sends the attribute changes `data` holds for its next commit (with any buffered
    /// writes): before a cluster command that must see them.
    async fn flush_deferred(&self, data: Option<&FileHandle>) -> FsResult<()> {
        match data.filter(|d| d.has_deferred()) {
            Some(d) => Ok(d.flush().await?),
            None => Ok(()),
        }
    }

    /// A setattr with nothing in it: chown(f, -1, -1), or what is left of the kernel's
    /// privilege drop before a write by a process without CAP_FSETID (with
    /// FUSE_HANDLE_KILLPRIV_V2 the kernel strips the mode from it and leaves the drop to us;
    /// the write's commit does it). Linux drops set-user-ID (and a real set-group-ID) of a
    /// regular file on every chown, ids unchanged or not (notify_change's ATTR_KILL_*), and
    /// refuses that to a caller who neither owns the file nor is root. The two requests
    /// look the same, so a non-owner's is taken as the write's while this mount has the
    /// file open for writing (and changes nothing), and refused as chown's otherwise.
    async fn chown_keeping_ids(&self, caller: &Caller, ino: u64) -> FsResult<Attr> {
        let client = self.as_caller(caller);
        let a = client.getattr(ino).await?;
        let mode = a.mode & 0o7777;
        if a.kind != FileKind::Regular as i32 || perm::clear_set_id(mode) == mode {
            return Ok(a);
        }
        if !caller.owns(&a) {
            if self.open_for_writing(ino) {
                return Ok(a);
            }
            return Err(FsError::new(
                libc::EPERM,
                format!(
                    "chown of inode {} would drop its set-user-ID/set-group-ID bits, which only its owner or root may do",
                    a.ino
                ),
            ));
        }
        Ok(client
            .setattr(kerfs_proto::SetAttr {
                ino,
                mode: Some(perm::clear_set_id(mode)),
                ..Default::default()
            })
            .await?)
    }

    /// truncate(2)/ftruncate(2). The bytes past the new end must go from the chunk servers
    /// too (an extension later reads zeros), which only a data handle can do. Returns the
    /// attributes after the cut, as its last step got them (which saves a getattr).
    async fn truncate(
        &self,
        caller: &Caller,
        ino: u64,
        size: u64,
        file: Option<&OpenFile>,
    ) -> FsResult<Attr> {
        // A path truncate borrows the open slot: the release of the file's last descriptor
        // may arrive meanwhile (the kernel sends it after close(2) returned), and must not
        // close the handle under the cut.
        let slot = match file {
            Some(_) => None,
            None => self.slots.lock().await.get_mut(&ino).map(|s| {
                s.refs += 1;
                s.handle.clone()
            }),
        };
        if let Some(data) = slot {
            let cut = async {
                let a = self.as_caller(caller).getattr(ino).await?;
                check_truncate(caller, &a)?;
                cut_shared(caller, &data, size).await
            }
            .await;
            let released = match self.unref_slot(ino).await {
                Some(last) => last.close_with(&[], Durability::Visible).await,
                None => Ok(()),
            };
            let after = cut?;
            released?;
            return Ok(after);
        }
        let data = match file {
            // ftruncate: the kernel checked that the descriptor is open for writing.
            Some(f) => f.data.clone(),
            None => {
                // The caller's own truncate checks its permission and cuts the metadata;
                // a data handle then cuts the boundary chunk when the file shrank into it.
                let client = self.as_caller(caller);
                let before = client.getattr(ino).await?;
                let after = client
                    .setattr(kerfs_proto::SetAttr {
                        ino,
                        size: Some(size),
                        ..Default::default()
                    })
                    .await?;
                if size < before.size {
                    let data = self.data.open(ino, libc::O_RDWR as u32).await?;
                    let cut = data.truncate(size).await;
                    let closed = data.close().await;
                    let after = cut?;
                    closed?;
                    return Ok(after);
                }
                return Ok(after);
            }
        };
        cut_shared(caller, &data, size).await
    }

    /// mknod(2): `mode` carries the file type bits (S_IFREG, S_IFIFO...).
    pub async fn mknod(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
    ) -> FsResult<Entry> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::Regular,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFDIR => FileKind::Directory,
            other => {
                return Err(FsError::new(
                    libc::EINVAL,
                    format!("mknod of unsupported file type {other:o}"),
                ))
            }
        };
        let (a, _) = self
            .as_caller(caller)
            .make_node(MakeNode {
                parent: self.to_cluster(parent),
                name: name.to_vec(),
                kind: kind as i32,
                mode: mode & 0o7777,
                rdev,
                exclusive: true,
                ..Default::default()
            })
            .await?;
        Ok(self.entry(a).await)
    }

    pub async fn mkdir(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> FsResult<Entry> {
        let a = self
            .as_caller(caller)
            .mkdir(self.to_cluster(parent), name, mode & 0o7777)
            .await?;
        Ok(self.entry(a).await)
    }

    pub async fn unlink(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        Ok(self
            .as_caller(caller)
            .unlink(self.to_cluster(parent), name)
            .await?)
    }

    pub async fn rmdir(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        Ok(self
            .as_caller(caller)
            .rmdir(self.to_cluster(parent), name)
            .await?)
    }

    pub async fn symlink(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Entry> {
        let a = self
            .as_caller(caller)
            .symlink(self.to_cluster(parent), name, target)
            .await?;
        Ok(self.entry(a).await)
    }

    pub async fn readlink(&self, caller: &Caller, ino: u64) -> FsResult<Vec<u8>> {
        Ok(self
            .as_caller(caller)
            .readlink(self.to_cluster(ino))
            .await?)
    }

    pub async fn rename(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let known = kerfs_proto::RENAME_NOREPLACE | kerfs_proto::RENAME_EXCHANGE;
        if flags & !known != 0 {
            // RENAME_WHITEOUT is for overlayfs upper layers; we have no whiteouts.
            return Err(FsError::new(
                libc::EINVAL,
                format!("rename flags {flags:#x} not supported"),
            ));
        }
        Ok(self
            .as_caller(caller)
            .rename(
                self.to_cluster(parent),
                name,
                self.to_cluster(new_parent),
                new_name,
                flags,
            )
            .await?)
    }

    pub async fn link(
        &self,
        caller: &Caller,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> FsResult<Entry> {
        let a = self
            .as_caller(caller)
            .link(self.to_cluster(ino), self.to_cluster(new_parent), new_name)
            .await?;
        Ok(self.entry(a).await)
    }

    /// access(2), asked only of a `no_default_permissions` mount (otherwise the kernel
    /// answers it itself): the cluster checks every operation itself; this answers the
    /// question without doing anything, with the same rule.
    pub async fn access(&self, caller: &Caller, ino: u64, mask: i32) -> FsResult<()> {
        let a = self.as_caller(caller).getattr(self.to_cluster(ino)).await?;
        if mask == libc::F_OK || perm::permitted(caller, &a, mask as u32) {
            Ok(())
        } else {
            Err(FsError::new(
                libc::EACCES,
                format!("access {mask:o} denied on inode {}", a.ino),
            ))
        }
    }

    pub async fn statfs(&self, caller: &Caller) -> FsResult<FsStats> {
        Ok(self.as_caller(caller).statfs().await?)
    }

    // ------------------------------------------------------------- xattrs

    pub async fn setxattr(
        &self,
        caller: &Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let ino = self.to_cluster(ino);
        lock(&self.no_caps).remove(&ino);
        Ok(self
            .as_caller(caller)
            .setxattr(ino, name, value, flags)
            .await?)
    }

    pub async fn getxattr(&self, caller: &Caller, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let ino = self.to_cluster(ino);
        let caps = name == CAPS_XATTR;
        if caps {
            let ttl = self.config.attr_ttl;
            let known = lock(&self.no_caps)
                .get(&ino)
                .is_some_and(|at| at.elapsed() < ttl);
            if known {
                return Err(FsError::new(
                    libc::ENODATA,
                    format!("inode {ino} has no file capabilities"),
                ));
            }
        }
        let r = self.as_caller(caller).getxattr(ino, name).await;
        if caps {
            match &r {
                Err(e) if e.errno() == libc::ENODATA => {
                    let mut no_caps = lock(&self.no_caps);
                    if no_caps.len() >= NO_CAPS_MAX {
                        // Bounded: entries past their time are of no use.
                        let ttl = self.config.attr_ttl;
                        no_caps.retain(|_, at| at.elapsed() < ttl);
                    }
                    no_caps.insert(ino, Instant::now());
                }
                _ => {
                    lock(&self.no_caps).remove(&ino);
                }
            }
        }
        Ok(r?)
    }

    /// The names, each NUL-terminated, as listxattr(2) returns them.
    pub async fn listxattr(&self, caller: &Caller, ino: u64) -> FsResult<Vec<u8>> {
        let names = self
            .as_caller(caller)
            .listxattr(self.to_cluster(ino))
            .await?;
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub async fn removexattr(&self, caller: &Caller, ino: u64, name: &[u8]) -> FsResult<()> {
        let ino = self.to_cluster(ino);
        lock(&self.no_caps).remove(&ino);
        Ok(self.as_caller(caller).removexattr(ino, name).await?)
    }

    // ------------------------------------------------------------- files

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether some descriptor of this mount has cluster inode `ino` open for writing.
    fn open_for_writing(&self, ino: u64) -> bool {
        lock(&self.files)
            .values()
            .any(|f| f.ino == ino && f.writable)
    }

    fn file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("no open file handle {fh}")))
    }

    /// Registers an open: takes a reference on the inode's data slot (opening it if this
    /// is the first open here), closing the caller's cluster handle if that fails.
    /// Registers an open file handle; `created` is the reply of the create that opened it
    /// when that reply carries a data handle for the slot (see [`KerFs::create`]).
    async fn add_file(
        &self,
        ino: u64,
        handle: u64,
        flags: i32,
        created: Option<Reply>,
    ) -> FsResult<u64> {
        match self.slot_ref(ino, flags, created).await {
            Ok(data) => {
                let fh = self.new_fh();
                let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let file = OpenFile {
                    ino,
                    handle,
                    data,
                    writable,
                    locked: Default::default(),
                };
                lock(&self.files).insert(fh, Arc::new(file));
                Ok(fh)
            }
            Err(e) => {
                let _ = self.client.close(handle).await;
                Err(e)
            }
        }
    }

    async fn slot_ref(&self, ino: u64, flags: i32, created: Option<Reply>) -> FsResult<FileHandle> {
        let mut slots = self.slots.lock().await;
        if let Some(slot) = slots.get_mut(&ino) {
            slot.refs += 1;
            let data = slot.handle.clone();
            drop(slots);
            if let Some(unused) = created {
                // A slot already existed: the create's data handle is not needed.
                let _ = self.client.close(unused.data_handle).await;
            }
            if flags & libc::O_TRUNC != 0 {
                // The caller's open truncated the file in the cluster; our shared handle
                // still has the old size and chunk table.
                data.truncate(0).await?;
            }
            return Ok(data);
        }
        let opened = match created {
            Some(reply) => {
                let data_handle = reply.data_handle;
                self.data.attach_created(data_handle, reply)
            }
            None => self.data.open(ino, libc::O_RDWR as u32).await,
        };
        let data = match opened {
            Ok(d) => d,
            // A mount not run by root may not open everything read-write; it can still
            // open the way the caller did.
            Err(e) if e.errno() == libc::EACCES => {
                self.data
                    .open(ino, (flags & libc::O_ACCMODE) as u32)
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        slots.insert(
            ino,
            DataSlot {
                handle: data.clone(),
                refs: 1,
            },
        );
        Ok(data)
    }

    /// Opens an existing file; the cluster checks access and applies O_TRUNC.
    /// open(2) of a regular file: its file handle, and whether the kernel may keep the pages
    /// it has cached of the file (`FOPEN_KEEP_CACHE`).
    pub async fn open(&self, caller: &Caller, ino: u64, flags: i32) -> FsResult<(u64, bool)> {
        let ino = self.to_cluster(ino);
        // The cluster checks the open against the file's mode and owner: attribute changes
        // this mount still holds for its next commit must be there first.
        self.flush_deferred(self.data_handle(ino).await.as_ref())
            .await?;
        let (a, handle) = self.as_caller(caller).open(ino, flags as u32).await?;
        if a.kind != FileKind::Regular as i32 {
            // Device nodes, FIFOs and sockets are opened by the kernel itself; directories
            // go through opendir. Nothing to read or write here.
            let _ = self.client.close(handle).await;
            return Err(FsError::new(
                libc::EINVAL,
                format!("inode {ino} is not a regular file"),
            ));
        }
        let keep_cache = self.note_opened_version(&a);
        Ok((self.add_file(ino, handle, flags, None).await?, keep_cache))
    }

    /// Close-to-open with the page cache kept across opens: the cluster's answer to an open
    /// is current, so if the file's data version is the one of its previous open here,
    /// nobody changed its data since, and the pages the kernel cached meanwhile (read from
    /// that version, or written through this mount, which the kernel caches as it sends
    /// them) are still its contents. Any other version drops them.
    fn note_opened_version(&self, a: &Attr) -> bool {
        let now = DataVersion::of(a);
        let mut versions = lock(&self.opened_versions);
        if versions.len() >= OPENED_VERSIONS_MAX {
            versions.clear();
        }
        versions.insert(a.ino, now) == Some(now)
    }

    /// Creates (or with O_CREAT without O_EXCL, opens) and opens a regular file in one
    /// cluster command.
    pub async fn create(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> FsResult<(Entry, u64)> {
        // A file this command creates comes with the mount's data handle and its layout, so
        // the shared data slot costs no second open and no chunk-table read.
        let reply = self
            .as_caller(caller)
            .make_node_reply(MakeNode {
                parent: self.to_cluster(parent),
                name: name.to_vec(),
                kind: FileKind::Regular as i32,
                mode: mode & 0o7777,
                exclusive: flags & libc::O_EXCL != 0,
                open: true,
                open_flags: flags as u32,
                data_handle: true,
                ..Default::default()
            })
            .await?;
        let handle = reply.handle;
        let Some(a) = reply.attr else {
            return Err(FsError::new(libc::EIO, "a create reply without attributes"));
        };
        let created = (reply.data_handle != 0).then_some(reply);
        let fh = self.add_file(a.ino, handle, flags, created).await?;
        Ok((self.entry(a).await, fh))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = self.file(fh)?;
        Ok(file.data.read_at(offset, size as usize).await?)
    }

    /// write(2). `unprivileged`: the kernel says the writer lacks CAP_FSETID
    /// (FUSE_WRITE_KILL_SUIDGID), so the commit of these bytes clears set-user-ID and
    /// set-group-ID, in the same cluster command as their size and mtime.
    pub async fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        unprivileged: bool,
    ) -> FsResult<u32> {
        let file = self.file(fh)?;
        let n = u32::try_from(data.len())
            .map_err(|_| FsError::new(libc::EINVAL, "write larger than 4 GiB"))?;
        if unprivileged {
            file.data.clear_set_id_on_commit();
        }
        file.data.write_at(offset, data).await?;
        Ok(n)
    }

    /// close(2) of one descriptor: written data goes to the chunk servers and the size to
    /// the cluster, so that an open on another mount after this close sees it.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        Ok(self.file(fh)?.data.publish().await?)
    }

    /// fsync(2), fdatasync(2), and every write of an O_SYNC file (the kernel sends an fsync
    /// after it): the data on every replica's disk, then the metadata on a quorum's.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.file(fh)?.data.fsync().await?;
        Ok(self.client.sync().await?)
    }

    /// fsync(2) of a directory: the namespace changes made before it on a quorum's disk.
    pub async fn fsyncdir(&self) -> FsResult<()> {
        Ok(self.client.sync().await?)
    }

    /// fallocate(2). Space is not reserved on the chunk servers (chunks are files there,
    /// written on demand): mode 0 and KEEP_SIZE give the size semantics only, mode 0
    /// extending the file with zeros. PUNCH_HOLE (always with KEEP_SIZE) and ZERO_RANGE
    /// write zeros over the range through the file's data handle, so they are ordered with
    /// every buffered write. Other modes (collapse, insert, unshare) are EOPNOTSUPP.
    pub async fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let file = self.file(fh)?;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| {
                FsError::new(
                    libc::EFBIG,
                    format!("fallocate past the largest file size ({offset} + {length})"),
                )
            })?;
        if length == 0 {
            return Err(FsError::new(libc::EINVAL, "fallocate of zero bytes"));
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let data = &file.data;
        let size = data.size();
        let zero = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => false,
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => true,
            libc::FALLOC_FL_ZERO_RANGE => true,
            _ => {
                return Err(FsError::new(
                    libc::EOPNOTSUPP,
                    format!("fallocate mode {mode:#x} is not supported"),
                ))
            }
        };
        if zero {
            // Only what lies inside the file: past its end there is nothing to zero.
            data.write_zeros(offset, end.min(size).saturating_sub(offset))
                .await?;
        }
        if !keep_size && end > size {
            data.truncate(end).await?;
        }
        Ok(())
    }

    /// copy_file_range(2) between two files open here: the client reads and writes the
    /// bytes in large blocks, without the kernel's page cache in between. Copies at most
    /// [`COPY_MAX`] bytes per call (the reply counts in 32 bits; callers loop on short copies).
    pub async fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> FsResult<u32> {
        if flags != 0 {
            return Err(FsError::new(
                libc::EINVAL,
                format!("copy_file_range flags {flags:#x}"),
            ));
        }
        let (src, dst) = (self.file(fh_in)?, self.file(fh_out)?);
        let len = len.min(COPY_MAX);
        if offset_out
            .checked_add(len)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(FsError::new(
                libc::EFBIG,
                format!("copy_file_range past the largest file size ({offset_out} + {len})"),
            ));
        }
        // The kernel refuses overlapping copies within one file; a block-wise copy forward
        // would read bytes it already overwrote.
        let overlap = offset_in < offset_out.saturating_add(len)
            && offset_out < offset_in.saturating_add(len);
        if src.ino == dst.ino && overlap {
            return Err(FsError::new(
                libc::EINVAL,
                format!("copy_file_range of overlapping ranges in inode {}", src.ino),
            ));
        }
        let n = src
            .data
            .copy_range(offset_in, &dst.data, offset_out, len)
            .await?;
        u32::try_from(n).map_err(|_| {
            FsError::new(
                libc::EIO,
                format!("copy_file_range copied {n} bytes, more than it was asked"),
            )
        })
    }

    /// The last descriptor of an open file went away: drop the caller's cluster handle
    /// (which lets the cluster reclaim the file if it was unlinked while open) and the
    /// inode's data handle with its last open.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let file = lock(&self.files).remove(&fh);
        let Some(file) = file else {
            return Err(FsError::new(
                libc::EBADF,
                format!("no open file handle {fh}"),
            ));
        };
        let last = self.unref_slot(file.ino).await;
        // The last open here closes the data handle with the caller's; both join the
        // other handles released meanwhile in one Close command.
        let mut handles = vec![file.handle];
        let published = match last {
            Some(data) => {
                handles.push(data.handle_id());
                data.finish(Durability::Visible).await
            }
            None => Ok(()),
        };
        if file.locked.load(Ordering::Relaxed) {
            self.client.close_all(handles[0], &handles[1..]).await?;
        } else {
            self.closing.close(&handles);
        }
        Ok(published?)
    }

    /// Drops one reference on the inode's data slot; returns its handle when that was the
    /// last (the caller closes it).
    async fn unref_slot(&self, ino: u64) -> Option<FileHandle> {
        let mut slots = self.slots.lock().await;
        match slots.get_mut(&ino) {
            Some(slot) if slot.refs > 1 => {
                slot.refs -= 1;
                None
            }
            Some(_) => slots.remove(&ino).map(|s| s.handle),
            None => None,
        }
    }

    /// Closes every handle still open (the mount is going away).
    pub async fn release_all(&self) {
        let files: Vec<Arc<OpenFile>> = lock(&self.files).drain().map(|(_, f)| f).collect();
        let slots: Vec<DataSlot> = self.slots.lock().await.drain().map(|(_, s)| s).collect();
        for s in slots {
            if let Err(e) = s.handle.close().await {
                tracing::warn!(error = %e, ino = s.handle.ino(), "closing a file at unmount");
            }
        }
        for f in files {
            if let Err(e) = self.client.close(f.handle).await {
                tracing::warn!(error = %e, ino = f.ino, "closing a file at unmount");
            }
        }
        lock(&self.dirs).clear();
        self.closing.drain().await;
    }

    // ------------------------------------------------------------- directories

    /// opendir(3): needs read permission on the directory, as open(2) would check.
    pub async fn opendir(&self, caller: &Caller, ino: u64, flags: i32) -> FsResult<u64> {
        let ino = self.to_cluster(ino);
        let a = self.as_caller(caller).getattr(ino).await?;
        if a.kind != FileKind::Directory as i32 {
            return Err(FsError::new(
                libc::ENOTDIR,
                format!("inode {ino} is not a directory"),
            ));
        }
        let mut want = 0;
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => want |= 4,
            libc::O_WRONLY => want |= 2,
            _ => want |= 6,
        }
        if !perm::permitted(caller, &a, want) {
            return Err(FsError::new(
                libc::EACCES,
                format!("no permission to open directory {ino}"),
            ));
        }
        let fh = self.new_fh();
        lock(&self.dirs).insert(fh, Arc::new(OpenDir { ino }));
        Ok(fh)
    }

    /// Entries after `offset`: 0 starts with ".", 1 continues with "..", 2 with the
    /// cluster's first entry, and any other value is a cluster cookie (the offset of the
    /// last entry the kernel took).
    pub async fn readdir(
        &self,
        caller: &Caller,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> FsResult<Vec<DirItem>> {
        let dir = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("no open directory handle {fh}")))?;
        let client = self.as_caller(caller);
        let mut out = Vec::new();
        if offset < DOTDOT_OFFSET {
            let me = client.getattr(dir.ino).await?;
            let parent = if dir.ino == self.root {
                me
            } else {
                // The parent may have gone (a removed directory still open): show ourselves.
                client.lookup(dir.ino, b"..").await.unwrap_or(me)
            };
            if offset < DOT_OFFSET {
                out.push(self.dir_item(&me, DOT_OFFSET, b".", plus).await);
            }
            out.push(self.dir_item(&parent, DOTDOT_OFFSET, b"..", plus).await);
        }
        let cookie = if offset <= DOTDOT_OFFSET { 0 } else { offset };
        let (entries, _eof) = client.readdir(dir.ino, cookie, READDIR_PAGE, plus).await?;
        for e in entries {
            let entry = match e.attr.filter(|_| plus) {
                Some(a) => Some(self.entry(a).await),
                None => None,
            };
            out.push(DirItem {
                ino: self.to_fuse(e.ino),
                offset: e.cookie,
                kind: file_type(e.kind),
                entry,
                name: e.name,
            });
        }
        Ok(out)
    }

    async fn dir_item(&self, a: &Attr, offset: u64, name: &[u8], plus: bool) -> DirItem {
        let entry = if plus {
            Some(self.entry(*a).await)
        } else {
            None
        };
        DirItem {
            ino: self.to_fuse(a.ino),
            offset,
            kind: FileType::Directory,
            name: name.to_vec(),
            entry,
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }
}

/// truncate(2) by path needs write permission on a regular file.
fn check_truncate(caller: &Caller, a: &Attr) -> FsResult<()> {
    if a.kind == FileKind::Directory as i32 {
        return Err(FsError::new(
            libc::EISDIR,
            format!("inode {} is a directory", a.ino),
        ));
    }
    if !perm::permitted(caller, a, perm::MAY_WRITE) {
        return Err(FsError::new(
            libc::EACCES,
            format!("no write permission to truncate inode {}", a.ino),
        ));
    }
    Ok(())
}

/// Exchanges inode 1 and `root`, leaving every other number alone.
pub fn swap_root(root: u64, ino: u64) -> u64 {
    if ino == kerfs_proto::ROOT_INO {
        root
    } else if ino == root {
        kerfs_proto::ROOT_INO
    } else {
        ino
    }
}

pub fn file_type(kind: i32) -> FileType {
    match FileKind::try_from(kind) {
        Ok(FileKind::Directory) => FileType::Directory,
        Ok(FileKind::Symlink) => FileType::Symlink,
        Ok(FileKind::Fifo) => FileType::NamedPipe,
        Ok(FileKind::Socket) => FileType::Socket,
        Ok(FileKind::CharDevice) => FileType::CharDevice,
        Ok(FileKind::BlockDevice) => FileType::BlockDevice,
        Ok(FileKind::Regular) | Ok(FileKind::Unknown) | Err(_) => FileType::RegularFile,
    }
}

/// A cluster timestamp as SystemTime, nanoseconds included; times before 1970 work too.
pub fn system_time(t: Option<&Timespec>) -> SystemTime {
    let Some(t) = t else {
        return UNIX_EPOCH;
    };
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    let base = if t.sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
    };
    base.and_then(|b| b.checked_add(nsec)).unwrap_or(UNIX_EPOCH)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation that cannot leave it half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Truncates through a data handle the mount shares between callers. It commits under the
/// mount's identity: say the caller lacks CAP_FSETID, so the cut drops set-user-ID and
/// set-group-ID as the caller's own would.
async fn cut_shared(caller: &Caller, data: &FileHandle, size: u64) -> FsResult<Attr> {
    if !caller.is_root() {
        data.clear_set_id_on_commit();
    }
    Ok(data.truncate(size).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_nanoseconds_and_negative_seconds() {
        let t = Timespec { sec: 5, nsec: 7 };
        assert_eq!(
            system_time(Some(&t)),
            UNIX_EPOCH + Duration::from_secs(5) + Duration::from_nanos(7)
        );
        let t = Timespec {
            sec: -2,
            nsec: 500_000_000,
        };
        assert_eq!(
            system_time(Some(&t)),
            UNIX_EPOCH - Duration::from_millis(1500)
        );
        let back = Timespec::from_system_time(system_time(Some(&t)));
        assert_eq!((back.sec, back.nsec), (-2, 500_000_000));
    }

    #[test]
    fn subdir_root_swaps_with_inode_one() {
        assert_eq!(swap_root(1, 1), 1);
        assert_eq!(swap_root(1, 7), 7);
        assert_eq!(swap_root(42, 1), 42);
        assert_eq!(swap_root(42, 42), 1);
        assert_eq!(swap_root(42, 7), 7);
    }

    #[test]
    fn kinds_map_to_kernel_types() {
        assert_eq!(file_type(FileKind::Directory as i32), FileType::Directory);
        assert_eq!(file_type(FileKind::Fifo as i32), FileType::NamedPipe);
        assert_eq!(file_type(999), FileType::RegularFile);
    }
}
