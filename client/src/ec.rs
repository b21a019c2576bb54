//! Reed-Solomon striping of one erasure-coded chunk over its k data + m parity shards.
//!
//! # Layout
//!
//! A chunk holds `chunk_size` bytes of file data. It is cut into stripes of k blocks of
//! [`BLOCK`] (64 KiB, the chunk servers' checksum block, so a shard block is exactly one
//! checksummed block on its server):
//!
//! ```text
//! chunk offset  c  →  stripe j = c / (k·B),  data block i = (c mod k·B) / B,
//!                     shard i, shard offset j·B + (c mod B)
//! parity blocks of stripe j: shards k..k+m, shard offset j·B
//! ```
//!
//! Every shard is a chunk of its own (own chunk id, `shard_index` = i), so shard i of every
//! stripe lives on placement i of the chunk. Writers always write whole stripes (all k+m
//! blocks, zero-padded past the data), so every shard of a chunk has the same length and a
//! stripe never written reads as zeros on every shard — zeros are a valid codeword, so holes
//! need no special case in reconstruction. A partial-stripe write is a read-modify-write of
//! that stripe (read the k data blocks, possibly degraded, overlay, re-encode).
//!
//! Reads fetch the data shards' ranges; when any of them fails (down, corrupt, stale), the
//! parity shards' same ranges are fetched and each stripe is reconstructed from any k of k+m.

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Stripe block: one 64 KiB block per shard per stripe.
pub const BLOCK: usize = 64 * 1024;

/// Encoder/decoder for one k+m geometry.
pub struct Codec {
    pub k: usize,
    pub m: usize,
    rs: ReedSolomon,
}

impl Codec {
    pub fn new(k: usize, m: usize) -> Result<Codec, String> {
        let rs = ReedSolomon::new(k, m)
            .map_err(|e| format!("unusable erasure-code layout {k}+{m}: {e:?}"))?;
        Ok(Codec { k, m, rs })
    }

    /// Bytes of file data per stripe.
    pub fn stripe_bytes(&self) -> usize {
        self.k * BLOCK
    }

    /// Splits `stripes` consecutive stripes of file data (`data.len()` = stripes·k·B) into k+m
    /// shard buffers of stripes·B bytes each, computing parity stripe by stripe.
    pub fn encode(&self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let sb = self.stripe_bytes();
        debug_assert_eq!(data.len() % sb, 0);
        let stripes = data.len() / sb;
        let mut shards = vec![vec![0u8; stripes * BLOCK]; self.k + self.m];
        for j in 0..stripes {
            let stripe = &data[j * sb..(j + 1) * sb];
            for (i, shard) in shards.iter_mut().enumerate().take(self.k) {
                shard[j * BLOCK..(j + 1) * BLOCK]
                    .copy_from_slice(&stripe[i * BLOCK..(i + 1) * BLOCK]);
            }
            let mut blocks: Vec<&mut [u8]> = shards
                .iter_mut()
                .map(|s| &mut s[j * BLOCK..(j + 1) * BLOCK])
                .collect();
            self.rs
                .encode(&mut blocks)
                .map_err(|e| format!("erasure encoding failed: {e:?}"))?;
        }
        Ok(shards)
    }

    /// Rebuilds file data of `stripes` stripes from shard buffers (stripes·B bytes each,
    /// `None` where a shard could not be read). Needs at least k present shards.
    pub fn decode(&self, shards: &[Option<Vec<u8>>], stripes: usize) -> Result<Vec<u8>, String> {
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.k {
            return Err(format!(
                "only {present} of {} shards readable, {} needed",
                self.k + self.m,
                self.k
            ));
        }
        let sb = self.stripe_bytes();
        let mut out = vec![0u8; stripes * sb];
        let all_data = shards[..self.k].iter().all(|s| s.is_some());
        for j in 0..stripes {
            let range = j * BLOCK..(j + 1) * BLOCK;
            if all_data {
                for (i, s) in shards[..self.k].iter().enumerate() {
                    if let Some(s) = s {
                        out[j * sb + i * BLOCK..j * sb + (i + 1) * BLOCK]
                            .copy_from_slice(&s[range.clone()]);
                    }
                }
                continue;
            }
            let mut blocks: Vec<Option<Vec<u8>>> = shards
                .iter()
                .map(|s| s.as_ref().map(|s| s[range.clone()].to_vec()))
                .collect();
            self.rs
                .reconstruct_data(&mut blocks)
                .map_err(|e| format!("erasure reconstruction failed: {e:?}"))?;
            for (i, b) in blocks.iter().take(self.k).enumerate() {
                let b = b
                    .as_ref()
                    .ok_or_else(|| "reconstruction left a data block missing".to_string())?;
                out[j * sb + i * BLOCK..j * sb + (i + 1) * BLOCK].copy_from_slice(b);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_with_two_missing() {
        let c = Codec::new(4, 2).unwrap();
        let data: Vec<u8> = (0..3 * c.stripe_bytes())
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let shards = c.encode(&data).unwrap();
        let mut opt: Vec<Option<Vec<u8>>> = shards.into_iter().map(Some).collect();
        opt[1] = None;
        opt[3] = None;
        assert_eq!(c.decode(&opt, 3).unwrap(), data);
        opt[0] = None;
        assert!(c.decode(&opt, 3).is_err());
    }

    #[test]
    fn zeros_are_a_codeword() {
        let c = Codec::new(4, 2).unwrap();
        let shards = c.encode(&vec![0u8; c.stripe_bytes()]).unwrap();
        assert!(shards.iter().all(|s| s.iter().all(|&b| b == 0)));
    }
}
