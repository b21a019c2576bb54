//! Reads: lookup (with "." and ".."), getattr, readdir with stable cookies, readlink,
//! statfs and the state digest replicas are compared by.

use kerfs_proto::{
    DirEntry, FileKind, FsStats, GetAttr, Lookup, ReadDir, ReadLink, Reply, NAME_MAX,
};

use super::chunks;
use super::nodes::{must_dir, must_inode, name_kind, NameKind};
use super::perm::{self, MAY_READ};
use super::records::{self as rec, CookieRec};
use super::{show, Fail, NamespaceConfig, Who, R};
use crate::store::KvRead;

/// Entries per readdir reply when the caller sets no limit, and the most it may ask for.
const DEFAULT_READDIR: usize = 1024;
const MAX_READDIR: usize = 16384;

pub fn lookup(state: &dyn KvRead, who: &Who, l: &Lookup) -> R<Reply> {
    let kind = name_kind(&l.name)?;
    let dir = must_dir(state, l.parent)?;
    perm::need_search(who, &dir.attr)?;
    let ino = match kind {
        NameKind::Dot => dir.ino(),
        NameKind::DotDot => dir.parent,
        NameKind::Normal => match rec::load_dirent(state, l.parent, &l.name)? {
            Some(d) => d.ino,
            None => {
                return Err(Fail::new(
                    libc::ENOENT,
                    format!("no {:?} in directory {}", show(&l.name), l.parent),
                ))
            }
        },
    };
    let inode = must_inode(state, ino)?;
    Ok(Reply {
        attr: Some(inode.attr),
        ..Default::default()
    })
}

pub fn getattr(state: &dyn KvRead, g: &GetAttr) -> R<Reply> {
    let inode = must_inode(state, g.ino)?;
    Ok(Reply {
        attr: Some(inode.attr),
        ..Default::default()
    })
}

/// Entries after `cookie` in creation order. Cookies are creation sequence numbers, so a
/// reader continuing from a cookie sees every entry that existed throughout exactly once,
/// whatever was created or removed in between.
pub fn readdir(state: &dyn KvRead, who: &Who, r: &ReadDir) -> R<Reply> {
    let dir = must_dir(state, r.ino)?;
    perm::need(who, &dir.attr, MAY_READ, "read directory")?;
    let limit = match r.limit as usize {
        0 => DEFAULT_READDIR,
        n => n.min(MAX_READDIR),
    };
    let Some(from) = r.cookie.checked_add(1) else {
        return Ok(Reply {
            eof: true,
            ..Default::default()
        });
    };
    let rows = state.scan(
        &rec::cookie_key(r.ino, from.max(rec::FIRST_SEQ)),
        &rec::end_u64(rec::P_COOKIE, r.ino),
        limit + 1,
    )?;
    let eof = rows.len() <= limit;
    let mut entries = Vec::with_capacity(rows.len().min(limit));
    for (k, v) in rows.into_iter().take(limit) {
        let c: CookieRec = rec::decode(&k, &v)?;
        let attr = if r.plus {
            Some(must_inode(state, c.ino)?.attr)
        } else {
            None
        };
        entries.push(DirEntry {
            name: c.name,
            ino: c.ino,
            kind: c.kind,
            cookie: rec::u64_at(&k, 9)?,
            attr,
        });
    }
    Ok(Reply {
        entries,
        eof,
        ..Default::default()
    })
}

pub fn readlink(state: &dyn KvRead, r: &ReadLink) -> R<Reply> {
    let inode = must_inode(state, r.ino)?;
    if inode.kind() != FileKind::Symlink {
        return Err(Fail::new(
            libc::EINVAL,
            format!("inode {} is not a symlink", r.ino),
        ));
    }
    Ok(Reply {
        data: inode.target,
        ..Default::default()
    })
}

pub fn statfs(state: &dyn KvRead, config: &NamespaceConfig) -> R<Reply> {
    const BLOCK: u64 = 4096;
    let c = rec::counters(state)?;
    // An empty state still has its (implicit) root.
    let files = c.inodes.max(1);
    let (blocks, free) = match chunks::server_space(state)? {
        // Usable space: raw space of the up servers over the root layout's overhead, so
        // df shows what files can still hold.
        Some((cap, avail)) => {
            let (copies, data) = chunks::root_overhead(state)?;
            let usable = |raw: u64| {
                (u128::from(raw) * u128::from(data) / u128::from(copies.max(1))) as u64 / BLOCK
            };
            (usable(cap), usable(avail))
        }
        None => (
            config.capacity_bytes / BLOCK,
            config.capacity_bytes.saturating_sub(c.total_size) / BLOCK,
        ),
    };
    Ok(Reply {
        stats: Some(FsStats {
            block_size: BLOCK,
            blocks,
            blocks_free: free,
            blocks_avail: free,
            files,
            files_free: config.max_files.saturating_sub(files),
            name_max: NAME_MAX as u32,
        }),
        ..Default::default()
    })
}

/// blake3 over every key and value, length-prefixed, in key order.
pub fn digest(state: &dyn KvRead) -> R<Reply> {
    let mut h = blake3::Hasher::new();
    let mut pages = rec::Pages::new(Vec::new(), Vec::new(), 1024);
    while let Some(rows) = pages.next_page(state)? {
        for (k, v) in rows {
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(&k);
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(&v);
        }
    }
    Ok(Reply {
        data: h.finalize().as_bytes().to_vec(),
        ..Default::default()
    })
}
