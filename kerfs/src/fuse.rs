//! The fuser glue: every kernel request becomes a task on the tokio runtime that calls
//! [`KerFs`] and sends the reply itself, so a slow cluster call never holds up the session
//! loop that reads the next request. Request data the kernel lends (names, write buffers)
//! is copied before the task starts.

use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use kerfs_proto::Caller;
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::error::FsError;
use crate::fs::{lock_kind_of, time_at, time_now, Entry, KerFs, KernelLock, SetAttrIn};

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// Requests the kernel keeps in flight in the background (read-ahead, write-back); the
/// default of 12 starves a cluster that answers in parallel.
const MAX_BACKGROUND: u16 = 64;

/// The `fuser::Filesystem` of a KerFS mount.
pub struct FuseFs {
    fs: Arc<KerFs>,
    rt: Handle,
}

impl FuseFs {
    pub fn new(fs: Arc<KerFs>, rt: Handle) -> FuseFs {
        FuseFs { fs, rt }
    }

    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(task);
    }

    fn attr_ttl(&self) -> Duration {
        self.fs.config().attr_ttl
    }

    fn entry_ttl(&self) -> Duration {
        self.fs.config().entry_ttl
    }
}

/// The identity the cluster checks permissions against: the requesting process's ids and,
/// read from /proc, its supplementary groups (the kernel does not send them).
fn caller_of(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        groups: groups_of(req.pid()),
    }
}

fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new(); // a request the kernel makes on its own behalf
    }
    // Not cached: a process may change its groups between two calls (pjdfstest does), and
    // reading this file costs far less than the cluster round trip that follows.
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new(); // the process already exited
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn errno(e: &FsError, op: &str) -> Errno {
    if e.is_unexpected() {
        warn!(op, error = %e, "operation failed");
    } else {
        debug!(op, error = %e, "operation failed");
    }
    Errno::from_i32(e.errno)
}

fn reply_entry(
    reply: ReplyEntry,
    r: Result<Entry, FsError>,
    attr_ttl: Duration,
    entry_ttl: Duration,
    op: &str,
) {
    match r {
        Ok(e) => reply.entry_with_ttls(&attr_ttl, &entry_ttl, &e.attr, Generation(e.generation)),
        Err(e) => reply.error(errno(&e, op)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>, op: &str) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e, op)),
    }
}

/// Replies to open and opendir: the handle, and whether the kernel keeps the pages it has
/// cached of the file (without FOPEN_KEEP_CACHE it drops them at open, which is how
/// close-to-open holds between mounts; `KerFs::open` decides when keeping them is safe).
fn reply_opened(reply: ReplyOpen, r: Result<(u64, bool), FsError>, op: &str) {
    match r {
        Ok((fh, keep_cache)) => {
            let flags = if keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            reply.opened(FileHandle(fh), flags)
        }
        Err(e) => reply.error(errno(&e, op)),
    }
}

fn time_set(t: TimeOrNow) -> kerfs_proto::TimeSet {
    match t {
        TimeOrNow::Now => time_now(),
        TimeOrNow::SpecificTime(t) => time_at(t),
    }
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        // readdirplus saves the lookup per entry that `ls -l` would cause; atomic O_TRUNC
        // makes open(O_TRUNC) one cluster command instead of setattr + open; parallel
        // dirops lets lookups and creates in one directory run at once.
        // POSIX and flock locks come to us (and to the cluster) instead of staying in
        // this machine's kernel, so they hold across mounts.
        // HANDLE_KILLPRIV_V2: the kernel flags each write of a process without CAP_FSETID
        // instead of first sending a chmod as that process, which the cluster would refuse
        // to a non-owner (so such a write failed with EPERM); the cluster clears
        // set-user-ID/set-group-ID in the commit of the write (and on truncate and chown).
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        if let Err(missing) = config.add_capabilities(wanted) {
            let _ = config.add_capabilities(wanted - missing);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = self.fs.clone();
        // Called on the session thread as the mount goes away: wait for the handles to close
        // so the cluster does not keep unlinked files until our lease runs out.
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), fs.release_all()).await
        });
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        self.spawn(async move {
            reply_entry(
                reply,
                fs.lookup(&caller, parent.0, &name).await,
                at,
                et,
                "lookup",
            );
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, caller, ttl) = (self.fs.clone(), caller_of(req), self.attr_ttl());
        self.spawn(async move {
            match fs.getattr(&caller, ino.0).await {
                Ok(a) => reply.attr(&ttl, &a),
                Err(e) => reply.error(errno(&e, "getattr")),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // ctime is the cluster's business: it stamps every change itself.
        let s = SetAttrIn {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            fh: fh.map(|f| f.0),
        };
        let (fs, caller, ttl) = (self.fs.clone(), caller_of(req), self.attr_ttl());
        self.spawn(async move {
            match fs.setattr(&caller, ino.0, s).await {
                Ok(a) => reply.attr(&ttl, &a),
                Err(e) => reply.error(errno(&e, "setattr")),
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            match fs.readlink(&caller, ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e, "readlink")),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // The kernel already applied the umask (we do not ask for FUSE_DONT_MASK).
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        self.spawn(async move {
            let r = fs
                .mknod(&caller, parent.0, &name, mode, u64::from(rdev))
                .await;
            reply_entry(reply, r, at, et, "mknod");
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        self.spawn(async move {
            let r = fs.mkdir(&caller, parent.0, &name, mode).await;
            reply_entry(reply, r, at, et, "mkdir");
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        self.spawn(async move {
            reply_empty(reply, fs.unlink(&caller, parent.0, &name).await, "unlink");
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        self.spawn(async move {
            reply_empty(reply, fs.rmdir(&caller, parent.0, &name).await, "rmdir");
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(link_name));
        let target = target.as_os_str().as_bytes().to_vec();
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        self.spawn(async move {
            let r = fs.symlink(&caller, parent.0, &name, &target).await;
            reply_entry(reply, r, at, et, "symlink");
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        let (name, newname) = (bytes(name), bytes(newname));
        self.spawn(async move {
            let r = fs
                .rename(
                    &caller,
                    parent.0,
                    &name,
                    newparent.0,
                    &newname,
                    flags.bits(),
                )
                .await;
            reply_empty(reply, r, "rename");
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(newname));
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        self.spawn(async move {
            let r = fs.link(&caller, ino.0, newparent.0, &name).await;
            reply_entry(reply, r, at, et, "link");
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(
            async move { reply_opened(reply, fs.open(&caller, ino.0, flags.0).await, "open") },
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        let ttl = self.entry_ttl();
        self.spawn(async move {
            match fs.create(&caller, parent.0, &name, mode, flags).await {
                Ok((e, fh)) => reply.created(
                    &ttl,
                    &e.attr,
                    Generation(e.generation),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno(&e, "create")),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e, "read")),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The buffer belongs to the session loop and is reused for the next request.
        let data = data.to_vec();
        let fs = self.fs.clone();
        let unprivileged = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.spawn(async move {
            match fs.write(fh.0, offset, &data, unprivileged).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e, "write")),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            let r = fs.flush(fh.0).await;
            // After the data: whoever gets the lock next must see what was written.
            if let Err(e) = fs.release_owner_locks(fh.0, lock_owner.0).await {
                warn!(error = %e, "dropping the locks of a closing process");
            }
            reply_empty(reply, r, "flush")
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move { reply_empty(reply, fs.release(fh.0).await, "release") });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move { reply_empty(reply, fs.fsync(fh.0).await, "fsync") });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            let r = fs.opendir(&caller, ino.0, flags.0).await;
            reply_opened(reply, r.map(|fh| (fh, false)), "opendir")
        });
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            match fs.readdir(&caller, fh.0, offset, false).await {
                Ok(items) => {
                    for it in items {
                        let name = OsStr::from_bytes(&it.name);
                        if reply.add(INodeNo(it.ino), it.offset, it.kind, name) {
                            break; // buffer full: the kernel asks again from the last offset
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e, "readdir")),
            }
        });
    }

    fn readdirplus(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        let (at, et) = (self.attr_ttl(), self.entry_ttl());
        // fuser gives one TTL for entry and attributes here: use the shorter.
        let ttl = at.min(et);
        self.spawn(async move {
            match fs.readdir(&caller, fh.0, offset, true).await {
                Ok(items) => {
                    for it in items {
                        let Some(e) = it.entry else { continue };
                        let name = OsStr::from_bytes(&it.name);
                        let full = reply.add(
                            INodeNo(it.ino),
                            it.offset,
                            name,
                            &ttl,
                            &e.attr,
                            Generation(e.generation),
                        );
                        if full {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(errno(&e, "readdirplus")),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move { reply_empty(reply, fs.fsyncdir().await, "fsyncdir") });
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            match fs.statfs(&caller).await {
                Ok(s) => {
                    let bsize = u32::try_from(s.block_size).unwrap_or(4096).max(512);
                    reply.statfs(
                        s.blocks,
                        s.blocks_free,
                        s.blocks_avail,
                        s.files,
                        s.files_free,
                        bsize,
                        s.name_max,
                        bsize,
                    )
                }
                Err(e) => reply.error(errno(&e, "statfs")),
            }
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        let value = value.to_vec();
        self.spawn(async move {
            let r = fs
                .setxattr(&caller, ino.0, &name, &value, flags as u32)
                .await;
            reply_empty(reply, r, "setxattr");
        });
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        self.spawn(async move {
            let r = fs.getxattr(&caller, ino.0, &name).await;
            reply_xattr(reply, r, size, "getxattr");
        });
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            let r = fs.listxattr(&caller, ino.0).await;
            reply_xattr(reply, r, size, "listxattr");
        });
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (fs, caller, name) = (self.fs.clone(), caller_of(req), bytes(name));
        self.spawn(async move {
            reply_empty(
                reply,
                fs.removexattr(&caller, ino.0, &name).await,
                "removexattr",
            );
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let (fs, caller) = (self.fs.clone(), caller_of(req));
        self.spawn(async move {
            reply_empty(
                reply,
                fs.access(&caller, ino.0, mask.bits()).await,
                "access",
            );
        });
    }

    // Locks: see crate::fs::locks. A blocking request waits in its own task.

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let fs = self.fs.clone();
        let want = KernelLock {
            start,
            end,
            typ,
            pid,
        };
        self.spawn(async move {
            match fs.getlk(fh.0, lock_owner.0, want).await {
                Ok(l) => reply.locked(l.start, l.end, l.typ, l.pid),
                Err(e) => reply.error(errno(&e, "getlk")),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        let tid = req.pid();
        // Read now, while the requesting thread is surely still inside flock(2)/fcntl(2).
        let kind = lock_kind_of(tid);
        let lock = KernelLock {
            start,
            end,
            typ,
            pid,
        };
        self.spawn(async move {
            let r = fs.setlk(fh.0, lock_owner.0, lock, kind, sleep, tid).await;
            reply_empty(reply, r, "setlk");
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            let r = fs.fallocate(fh.0, offset, length, mode).await;
            reply_empty(reply, r, "fallocate");
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let fs = self.fs.clone();
        self.spawn(async move {
            let r = fs
                .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len, flags.bits())
                .await;
            match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e, "copy_file_range")),
            }
        });
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length, a too small buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, r: Result<Vec<u8>, FsError>, size: u32, op: &str) {
    match r {
        Ok(v) if size == 0 => match u32::try_from(v.len()) {
            Ok(n) => reply.size(n),
            Err(_) => reply.error(Errno::E2BIG),
        },
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e, op)),
    }
}
