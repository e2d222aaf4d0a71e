//! Partition keys to shards.
//!
//! The mapping is the one Kinesis Data Streams uses: the MD5 digest of the key, read as a
//! 128-bit big-endian integer, falls into one of N equal hash-key ranges. Because the hash
//! is fixed by the key's bytes alone, a key maps to the same shard across restarts,
//! versions and backends; the embedded log and Kinesis agree for the same shard count.

use md5::{Digest, Md5};

/// The 128-bit hash key of a partition key (MD5, big-endian), as Kinesis computes it.
pub fn hash_key(key: &str) -> u128 {
    let digest = Md5::digest(key.as_bytes());
    u128::from_be_bytes(digest.into())
}

/// The shard, in `0..shards`, that owns `key` when the hash-key space is split into
/// `shards` equal ranges. `shards` must be at least 1.
pub fn shard_for_key(key: &str, shards: u32) -> u32 {
    shard_for_hash(hash_key(key), shards)
}

/// The shard owning a 128-bit hash key. Uses the top 64 bits, which splits the space into
/// ranges that differ from the exact 128-bit split by less than 2^-64 of a range.
pub fn shard_for_hash(hash: u128, shards: u32) -> u32 {
    let shards = u128::from(shards.max(1));
    let top = hash >> 64;
    ((top * shards) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pinned vectors: if one of these changes, every existing log would be re-partitioned.
    #[test]
    fn mapping_is_pinned() {
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        assert_eq!(
            hash_key("evt-1"),
            u128::from_be_bytes(Md5::digest(b"evt-1").into())
        );
        let pinned: Vec<u32> = ["evt-1", "evt-2", "evt-3", "concert-42", ""]
            .iter()
            .map(|k| shard_for_key(k, 4))
            .collect();
        assert_eq!(pinned, PINNED_4);
    }
    // Computed independently (Python hashlib) for the Kinesis-style split.
    const PINNED_4: [u32; 5] = [3, 0, 1, 0, 3];

    proptest! {
        #[test]
        fn stable_and_in_range(key in ".{0,80}", shards in 1u32..1024) {
            let a = shard_for_key(&key, shards);
            prop_assert!(a < shards);
            prop_assert_eq!(a, shard_for_key(&key.clone(), shards));
        }

        #[test]
        fn one_shard_takes_everything(key in ".{0,40}") {
            prop_assert_eq!(shard_for_key(&key, 1), 0);
        }

        #[test]
        fn ranges_are_contiguous(a in any::<u128>(), b in any::<u128>(), shards in 1u32..64) {
            // A larger hash never maps to a smaller shard: shards own contiguous ranges.
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(shard_for_hash(lo, shards) <= shard_for_hash(hi, shards));
        }
    }
}
