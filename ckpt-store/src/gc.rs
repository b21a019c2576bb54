//! Retention and garbage collection.
//!
//! Retention removes whole versions (a rename out of the version namespace, then deletion).
//! GC then deletes packs no committed version references, partial versions left by killed
//! writers, and stale writer markers.
//!
//! Safety against a checkpoint written at the same time rests on two files and the order in
//! which they are created (metadata operations are linearizable): a writer creates its marker
//! `writers/<id>` and only then looks for `gc.lock`; GC creates `gc.lock` and only then lists
//! `writers/`. So either GC sees the writer (and deletes no pack and no partial version) or
//! the writer sees the lock (and waits for GC to finish before it loads the pack index).
//! Markers and the lock are touched every few seconds; one untouched for a minute belongs to
//! a killed process, and so does a marker of this host whose pid (in its name) is gone.
//!
//! While any writer is live, GC deletes no pack and no partial version at all (not only those
//! the writer may use): the writer may deduplicate against any pack whose index it loaded.

use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::warn;

use crate::error::{cluster, CkptError, Result};
use crate::reader::referenced_packs;
use crate::store::{
    age_of, committed_number, errno_of, host_name, now_ms, Store, DELETED_PREFIX, GC_LOCK,
    HEARTBEAT, PACKS, PARTIAL_PREFIX, STALE_AFTER, VERSIONS, WRITERS,
};

/// Which versions to keep. A version is kept if it is among the last `keep_last`, or its
/// number is a multiple of `keep_every`; `max_age` then removes anything older than it. The
/// newest version is always kept. With no rule at all, every version is kept.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Keep the newest N versions.
    pub keep_last: Option<usize>,
    /// Keep every version whose number is a multiple of K.
    pub keep_every: Option<u64>,
    /// Remove versions older than this.
    pub max_age: Option<Duration>,
}

impl Retention {
    /// True when no rule is set (GC then removes no version).
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none() && self.keep_every.is_none() && self.max_age.is_none()
    }

    /// The versions to remove from `versions` (number, creation ms), ascending by number.
    pub fn to_remove(&self, versions: &[(u64, u64)], now_ms: u64) -> Vec<u64> {
        if self.is_empty() || versions.is_empty() {
            return Vec::new();
        }
        let mut sorted = versions.to_vec();
        sorted.sort_unstable();
        let newest = sorted[sorted.len() - 1].0;
        let count_rules = self.keep_last.is_some() || self.keep_every.is_some();
        let mut out = Vec::new();
        for (i, &(v, created)) in sorted.iter().enumerate() {
            if v == newest {
                continue;
            }
            let from_end = sorted.len() - 1 - i;
            let kept_by_count = !count_rules
                || self.keep_last.is_some_and(|n| from_end < n)
                || self.keep_every.is_some_and(|k| k > 0 && v % k == 0);
            let too_old = self
                .max_age
                .is_some_and(|a| now_ms.saturating_sub(created) > a.as_millis() as u64);
            if !kept_by_count || too_old {
                out.push(v);
            }
        }
        out
    }
}

/// What a GC did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Versions removed by the retention rules.
    pub removed_versions: Vec<u64>,
    /// Packs deleted (names).
    pub removed_packs: Vec<String>,
    /// Bytes of the deleted packs.
    pub freed_bytes: u64,
    /// Partial or half-deleted version directories removed.
    pub removed_partials: Vec<String>,
    /// Stale writer markers removed.
    pub stale_writers: Vec<String>,
    /// Live writers seen: while any is live, no pack and no partial version is deleted.
    pub live_writers: Vec<String>,
}

/// Holds `gc.lock` and touches it until dropped.
struct GcLock {
    heartbeat: JoinHandle<()>,
}

impl Drop for GcLock {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Store {
    async fn take_gc_lock(&self) -> Result<GcLock> {
        for _ in 0..2 {
            match self
                .meta()
                .create_file(self.dir, GC_LOCK.as_bytes(), 0o644)
                .await
            {
                Ok(a) => {
                    let store = self.clone();
                    let heartbeat = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(HEARTBEAT).await;
                            let _ = store.touch(a.ino, GC_LOCK).await;
                        }
                    });
                    return Ok(GcLock { heartbeat });
                }
                Err(e) if errno_of(&e) == libc::EEXIST => {
                    let a = self
                        .meta()
                        .lookup(self.dir, GC_LOCK.as_bytes())
                        .await
                        .map_err(cluster("looking up", &self.sub(GC_LOCK)))?;
                    if age_of(&a) <= STALE_AFTER {
                        return Err(CkptError::Busy(format!(
                            "another `krg gc` holds {} (touched {}s ago); wait for it to finish",
                            self.sub(GC_LOCK),
                            age_of(&a).as_secs()
                        )));
                    }
                    warn!(lock = %self.sub(GC_LOCK), "replacing a stale GC lock");
                    let _ = self.meta().unlink(self.dir, GC_LOCK.as_bytes()).await;
                }
                Err(e) => return Err(cluster("creating", &self.sub(GC_LOCK))(e)),
            }
        }
        Err(CkptError::Busy(format!(
            "could not take {}: another `krg gc` keeps taking it",
            self.sub(GC_LOCK)
        )))
    }

    /// Applies `retention`, then deletes unreferenced packs, partial versions and stale
    /// markers (see the module docs for why this is safe next to a running checkpoint).
    pub async fn gc(&self, retention: &Retention) -> Result<GcReport> {
        let lock = self.take_gc_lock().await?;
        let res = self.gc_locked(retention).await;
        drop(lock);
        let _ = self.meta().unlink(self.dir, GC_LOCK.as_bytes()).await;
        res
    }

    async fn gc_locked(&self, retention: &Retention) -> Result<GcReport> {
        let mut report = GcReport::default();
        // 1. Retention: removing a version never removes a page, so it needs no care for
        //    live writers.
        if !retention.is_empty() {
            let versions: Vec<(u64, u64)> = self
                .versions()
                .await?
                .iter()
                .map(|v| (v.version, v.created_unix_ms))
                .collect();
            for v in retention.to_remove(&versions, now_ms()) {
                self.remove_version(v).await?;
                report.removed_versions.push(v);
            }
        }
        // 2. Writers, listed after our lock exists.
        for (name, attr) in self.list(self.writers, WRITERS).await? {
            if age_of(&attr) > STALE_AFTER || writer_died_here(&name) {
                let _ = self.meta().unlink(self.writers, name.as_bytes()).await;
                report.stale_writers.push(name);
            } else {
                report.live_writers.push(name);
            }
        }
        if !report.live_writers.is_empty() {
            return Ok(report);
        }
        // 3. Partial and half-deleted versions: nobody writes them any more.
        for (name, _) in self.list(self.versions, VERSIONS).await? {
            if name.starts_with(PARTIAL_PREFIX) || name.starts_with(DELETED_PREFIX) {
                self.remove_tree(self.versions, &name, &format!("{VERSIONS}/{name}"))
                    .await?;
                report.removed_partials.push(name);
            }
        }
        // 4. Packs no committed version references. Every manifest must be readable: a
        //    manifest we cannot read might reference any pack.
        let mut manifests = Vec::new();
        for v in self.version_numbers().await? {
            manifests.push(self.manifest(v).await.map_err(|e| CkptError::Busy(format!(
                "GC deleted no pack: the manifest of version {v} cannot be read ({e}); remove that version with `krg rm {}@{v}` if it is lost",
                self.addr()
            )))?);
        }
        let referenced = referenced_packs(manifests.iter());
        let entries = self.list(self.packs, PACKS).await?;
        for (name, attr) in &entries {
            let Some(pack) = name
                .strip_suffix(".pack")
                .or_else(|| name.strip_suffix(".idx"))
            else {
                continue;
            };
            if referenced.contains_key(pack) {
                continue;
            }
            // The index goes first: a pack without index is never deduplicated against.
            if name.ends_with(".pack") {
                report.freed_bytes += attr.size;
                report.removed_packs.push(pack.to_string());
            }
        }
        for pack in &report.removed_packs {
            for ext in ["idx", "pack"] {
                let file = format!("{pack}.{ext}");
                match self.meta().unlink(self.packs, file.as_bytes()).await {
                    Ok(()) => {}
                    Err(e) if errno_of(&e) == libc::ENOENT => {}
                    Err(e) => {
                        return Err(cluster("removing", &self.sub(&format!("{PACKS}/{file}")))(
                            e,
                        ))
                    }
                }
            }
        }
        // Index files whose pack is gone.
        for (name, _) in &entries {
            if let Some(pack) = name.strip_suffix(".idx") {
                let has_pack = entries.iter().any(|(n, _)| n == &format!("{pack}.pack"));
                if !has_pack && !referenced.contains_key(pack) {
                    let _ = self.meta().unlink(self.packs, name.as_bytes()).await;
                }
            }
        }
        let _ = committed_number; // versions are recognised by `version_numbers`
        Ok(report)
    }
}

/// True when marker `name` (`<host>-<pid>-<random>`) was made by a process of this host
/// that no longer exists: a killed krg's marker need not wait a minute to go stale. A reused
/// pid only keeps the marker alive longer, which is the safe side.
fn writer_died_here(name: &str) -> bool {
    let mut parts = name.rsplitn(3, '-');
    let (_rand, pid, host) = (parts.next(), parts.next(), parts.next());
    match (pid.and_then(|p| p.parse::<u32>().ok()), host) {
        (Some(pid), Some(host)) => {
            host == host_name() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        _ => false,
    }
}

/// Parses "30s", "5m", "2h", "7d" (a bare number is seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 30s, 5m, 2h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(n: u64) -> Vec<(u64, u64)> {
        (1..=n).map(|v| (v, v * 1000)).collect()
    }

    #[test]
    fn keep_last_and_every() {
        let r = Retention {
            keep_last: Some(2),
            ..Default::default()
        };
        assert_eq!(r.to_remove(&vs(5), 10_000), vec![1, 2, 3]);
        let r = Retention {
            keep_last: Some(1),
            keep_every: Some(2),
            ..Default::default()
        };
        assert_eq!(r.to_remove(&vs(5), 10_000), vec![1, 3]);
        assert!(Retention::default().to_remove(&vs(5), 0).is_empty());
    }

    #[test]
    fn max_age_keeps_the_newest() {
        let r = Retention {
            max_age: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        // now = 5 s: versions created at 1,2 s are older than 2 s; 5 is newest anyway.
        assert_eq!(r.to_remove(&vs(5), 5_000), vec![1, 2]);
        assert_eq!(r.to_remove(&vs(1), 1_000_000), Vec::<u64>::new());
    }

    #[test]
    fn dead_local_writers() {
        let me = format!("{}-{}-abc", host_name(), std::process::id());
        assert!(!writer_died_here(&me));
        assert!(writer_died_here(&format!("{}-999999999-abc", host_name())));
        assert!(!writer_died_here("otherhost-999999999-abc"));
        assert!(!writer_died_here("garbage"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("x").is_err());
    }
}
