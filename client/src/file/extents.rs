//! Dirty byte ranges of a chunk (the write-behind buffer) and their overlay on bytes read
//! from the servers, so that reads see this handle's own writes.

use super::*;

/// Non-overlapping dirty byte ranges of one chunk, keyed by chunk offset.
#[derive(Default, Clone, Debug)]
pub(super) struct Extents(pub(super) BTreeMap<u64, Vec<u8>>);

impl Extents {
    pub(super) fn insert(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        let mut touching = Vec::new();
        if let Some((&s, v)) = self.0.range(..=off).next_back() {
            if s + v.len() as u64 >= off {
                touching.push(s);
            }
        }
        touching.extend(
            self.0
                .range((Excluded(off), Included(end)))
                .map(|(&s, _)| s),
        );
        let Some(&first) = touching.first() else {
            self.0.insert(off, data.to_vec());
            return;
        };
        if touching.len() == 1 && first <= off {
            // Overwrite or append inside one extent: grow it in place (amortized, so a
            // stream of small sequential writes does not copy the extent each time).
            if let Some(v) = self.0.get_mut(&first) {
                let rel = (off - first) as usize;
                if v.len() < rel + data.len() {
                    v.resize(rel + data.len(), 0);
                }
                v[rel..rel + data.len()].copy_from_slice(data);
                return;
            }
        }
        let start = first.min(off);
        let last_end = touching
            .iter()
            .map(|s| s + self.0.get(s).map_or(0, |v| v.len() as u64))
            .max()
            .unwrap_or(end);
        let new_end = end.max(last_end);
        let mut buf = vec![0u8; (new_end - start) as usize];
        for s in touching {
            if let Some(v) = self.0.remove(&s) {
                let r = (s - start) as usize;
                buf[r..r + v.len()].copy_from_slice(&v);
            }
        }
        let r = (off - start) as usize;
        buf[r..r + data.len()].copy_from_slice(data);
        self.0.insert(start, buf);
    }

    /// Copies the dirty bytes that fall in `[at, at + out.len())` (chunk offsets) into `out`.
    pub(super) fn overlay(&self, at: u64, out: &mut [u8]) {
        let end = at + out.len() as u64;
        let from = self
            .0
            .range(..=at)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(at);
        for (&s, v) in self.0.range(from..end) {
            let e = s + v.len() as u64;
            let lo = s.max(at);
            let hi = e.min(end);
            if lo < hi {
                out[(lo - at) as usize..(hi - at) as usize]
                    .copy_from_slice(&v[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// Dirty bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    pub(super) fn end(&self) -> u64 {
        self.0
            .iter()
            .next_back()
            .map_or(0, |(s, v)| s + v.len() as u64)
    }

    /// Drops everything at or past `len`.
    pub(super) fn cut(&mut self, len: u64) {
        let keys: Vec<u64> = self.0.range(..).map(|(&s, _)| s).collect();
        for s in keys {
            if s >= len {
                self.0.remove(&s);
            } else if let Some(v) = self.0.get_mut(&s) {
                v.truncate((len - s).min(v.len() as u64) as usize);
            }
        }
    }
}

/// Applies the captured dirty extents (oldest first) to `out`, which holds file bytes from
/// `offset`.
pub(super) fn apply_overlay(
    overlay: &[Arc<BTreeMap<u64, Extents>>],
    chunk_size: u64,
    offset: u64,
    out: &mut [u8],
) {
    let end = offset + out.len() as u64;
    for map in overlay {
        for (&idx, ext) in map.range(offset / chunk_size..=(end - 1) / chunk_size) {
            let cstart = idx * chunk_size;
            let lo = offset.max(cstart);
            let hi = end.min(cstart + chunk_size);
            if lo < hi {
                ext.overlay(
                    lo - cstart,
                    &mut out[(lo - offset) as usize..(hi - offset) as usize],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(e: &Extents) -> Vec<(u64, Vec<u8>)> {
        e.0.iter().map(|(&s, v)| (s, v.clone())).collect()
    }

    #[test]
    fn extents_merge_and_overlay() {
        let mut e = Extents::default();
        e.insert(10, &[1; 5]);
        e.insert(15, &[2; 5]); // adjacent: appended in place
        assert_eq!(flat(&e), vec![(10, [vec![1; 5], vec![2; 5]].concat())]);
        e.insert(30, &[3; 5]);
        e.insert(5, &[4; 27]); // covers the first, touches the second
        assert_eq!(e.0.len(), 1);
        let mut out = vec![0u8; 40];
        e.overlay(0, &mut out);
        assert_eq!(&out[..5], &[0; 5]);
        assert_eq!(&out[5..32], &[4; 27]);
        assert_eq!(&out[32..35], &[3; 3]);
        assert_eq!(e.end(), 35);
        e.cut(20);
        assert_eq!(e.end(), 20);
        e.insert(0, &[9; 2]);
        e.insert(1, &[8; 1]);
        let mut out = vec![0u8; 4];
        e.overlay(0, &mut out);
        assert_eq!(out, vec![9, 8, 0, 0]);
    }
}
