//! Parsers for the /proc files export and import read: maps, stat, status, pagemap, fdinfo.

use std::fs;
use std::os::unix::fs::FileExt;

use crate::error::{GhostError, Result};

/// One line of /proc/PID/maps.
#[derive(Debug, Clone)]
pub(crate) struct MapLine {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// Path or pseudo name; empty for anonymous memory.
    pub path: String,
}

impl MapLine {
    pub fn prot(&self) -> u32 {
        (if self.read { libc::PROT_READ } else { 0 }
            | if self.write { libc::PROT_WRITE } else { 0 }
            | if self.exec { libc::PROT_EXEC } else { 0 }) as u32
    }
}

pub(crate) fn read_to_string(pid: i32, file: &str) -> Result<String> {
    let p = format!("/proc/{pid}/{file}");
    fs::read_to_string(&p).map_err(|e| GhostError::sys(format!("reading {p}"), pid, e))
}

pub(crate) fn parse_maps(text: &str) -> Result<Vec<MapLine>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let bad = || GhostError::Unsupported(format!("unparsable /proc maps line: {line}"));
        let mut it = line.splitn(6, ' ');
        let range = it.next().ok_or_else(bad)?;
        let perms = it.next().ok_or_else(bad)?.as_bytes();
        let offset = it.next().ok_or_else(bad)?;
        let _dev = it.next().ok_or_else(bad)?;
        let inode = it.next().ok_or_else(bad)?;
        let path = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        if perms.len() < 4 {
            return Err(bad());
        }
        out.push(MapLine {
            start: u64::from_str_radix(s, 16).map_err(|_| bad())?,
            end: u64::from_str_radix(e, 16).map_err(|_| bad())?,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            shared: perms[3] == b's',
            offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
            inode: inode.parse().map_err(|_| bad())?,
            path,
        });
    }
    Ok(out)
}

pub(crate) fn maps(pid: i32) -> Result<Vec<MapLine>> {
    parse_maps(&read_to_string(pid, "maps")?)
}

/// Fields of /proc/PID/stat after the command name, indexed from field 3 (state) = 0.
pub(crate) struct Stat {
    fields: Vec<String>,
}

impl Stat {
    pub fn read(pid: i32) -> Result<Self> {
        let s = read_to_string(pid, "stat")?;
        // The command name may contain spaces and parentheses: split after the last ')'.
        let rest = s
            .rfind(')')
            .map(|i| &s[i + 1..])
            .ok_or_else(|| GhostError::Unsupported("unparsable /proc/PID/stat".into()))?;
        Ok(Stat {
            fields: rest.split_whitespace().map(str::to_string).collect(),
        })
    }
    /// Field by its number in proc(5) (1-based; 3 = state).
    pub fn field(&self, n: usize) -> u64 {
        self.fields
            .get(n.wrapping_sub(3))
            .and_then(|f| f.parse::<i64>().ok())
            .unwrap_or(0) as u64
    }
    pub fn state(&self) -> char {
        self.fields
            .first()
            .and_then(|f| f.chars().next())
            .unwrap_or('?')
    }
}

/// Value of a "Key:\tvalue" line of /proc/PID/status.
pub(crate) fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Last (innermost namespace) number of a status line like "NSpid:\t123\t2".
pub(crate) fn status_ns_last(status: &str, key: &str) -> Option<i32> {
    status_field(status, key)?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Reads pagemap entries for [start, end).
pub(crate) fn pagemap(pm: &fs::File, start: u64, end: u64) -> std::io::Result<Vec<u64>> {
    let n = ((end - start) / crate::PAGE) as usize;
    let mut raw = vec![0u8; n * 8];
    pm.read_exact_at(&mut raw, start / crate::PAGE * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect())
}

pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAP: u64 = 1 << 62;
pub(crate) const PM_FILE: u64 = 1 << 61;
/// Swap type bits of a swapped entry (with CAP_SYS_ADMIN; zero otherwise).
const PM_SWAP_TYPE: u64 = 0x1f;
/// The swap type of a PTE marker (the last of the 32 types). Write tracking leaves markers
/// on pages never populated; pagemap shows them as swapped, but there is nothing to store.
const SWP_PTE_MARKER: u64 = 31;

/// Whether a pagemap entry is a page swapped out (or being migrated), not a PTE marker.
pub(crate) fn swapped(entry: u64) -> bool {
    entry & PM_SWAP != 0 && entry & PM_SWAP_TYPE != SWP_PTE_MARKER
}

/// (pos, flags) from /proc/PID/fdinfo/N.
pub(crate) fn fdinfo(pid: i32, fd: i32) -> Result<(i64, u32)> {
    let s = read_to_string(pid, &format!("fdinfo/{fd}"))?;
    let pos = status_field(&s, "pos")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let flags = status_field(&s, "flags")
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .unwrap_or(0);
    Ok((pos, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_line_with_spaces_in_path() {
        let m = parse_maps(
            "7f0f8e9ae000-7f0f8e9b0000 r-xp 00000000 00:00 0                          [vdso]\n\
             00400000-00401000 rw-s 00001000 fe:00 1234   /tmp/a b (deleted)\n",
        )
        .unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].path, "[vdso]");
        assert!(m[0].exec && !m[0].write && !m[0].shared);
        assert_eq!(m[1].path, "/tmp/a b (deleted)");
        assert!(m[1].shared && m[1].write);
        assert_eq!(m[1].offset, 0x1000);
        assert_eq!(m[1].inode, 1234);
    }

    #[test]
    fn ns_fields() {
        let st = "Name:\tx\nNSpid:\t4000\t2\nUmask:\t0022\n";
        assert_eq!(status_ns_last(st, "NSpid"), Some(2));
        assert_eq!(status_field(st, "Umask").as_deref(), Some("0022"));
    }
}
