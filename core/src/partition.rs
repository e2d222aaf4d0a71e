//! Partition keys to shards.
//!
//! The mapping is the one Kinesis Data Streams uses: the MD5 digest of the key, read as a
//! 128-bit big-endian integer, falls into one of N equal hash-key ranges. Because the hash
//! is fixed by the key's bytes alone, a key maps to the same shard across restarts,
//! versions and backends; the embedded log and Kinesis agree for the same shard count.

//!
//! MD5 of a short key takes one compression, about 150 ns, a dependency chain no CPU can
//! overlap: 5 % of the edge's CPU at saturation. Partition keys repeat by design (a key is
//! the aggregate, such as the event being booked, whose records must stay in order), so
//! each thread remembers the digests of recent keys in a small direct-mapped table.

use std::cell::RefCell;

use md5::{Digest, Md5};

/// The 128-bit hash key of a partition key (MD5, big-endian), as Kinesis computes it.
pub fn hash_key(key: &str) -> u128 {
    let key = key.as_bytes();
    if key.len() > MEMO_KEY_MAX {
        return md5_key(key);
    }
    // `try_with`: a thread's own destructors may still route a record.
    MEMO.try_with(|memo| {
        let Ok(mut memo) = memo.try_borrow_mut() else {
            return md5_key(key);
        };
        let slots = memo.get_or_insert_with(|| vec![Slot::EMPTY; MEMO_SLOTS].into_boxed_slice());
        let slot = &mut slots[memo_index(key)];
        if usize::from(slot.len) == key.len() && &slot.key[..key.len()] == key {
            return slot.hash;
        }
        let hash = md5_key(key);
        slot.len = key.len() as u8;
        slot.key[..key.len()].copy_from_slice(key);
        slot.hash = hash;
        hash
    })
    .unwrap_or_else(|_| md5_key(key))
}

fn md5_key(key: &[u8]) -> u128 {
    u128::from_be_bytes(Md5::digest(key).into())
}

/// Keys longer than this are hashed every time (a slot is one 64-byte line). Only the
/// threads that route records (the runtime's workers) ever fill a table.
const MEMO_KEY_MAX: usize = 47;
/// Slots a thread keeps: 256 KiB.
const MEMO_SLOTS: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    /// The key's length, or `u8::MAX` for an empty slot (no key is that long).
    len: u8,
    key: [u8; MEMO_KEY_MAX],
    hash: u128,
}

impl Slot {
    const EMPTY: Slot = Slot {
        len: u8::MAX,
        key: [0; MEMO_KEY_MAX],
        hash: 0,
    };
}

thread_local! {
    static MEMO: RefCell<Option<Box<[Slot]>>> = const { RefCell::new(None) };
}

/// The slot of a key: a multiplicative hash of its bytes, eight at a time.
fn memo_index(key: &[u8]) -> usize {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = key.len() as u64;
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let word = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ word).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    (h >> (64 - MEMO_SLOTS.trailing_zeros())) as usize
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

    /// Keys that share a slot, or are too long for one, still get their own digest.
    #[test]
    fn remembered_digests_are_each_keys_own() {
        // Two keys of one length in one slot, found by search.
        let mut by_slot = std::collections::HashMap::new();
        let (a, b) = (0..)
            .map(|i| format!("concert-{i:05}"))
            .find_map(|k| {
                let slot = memo_index(k.as_bytes());
                by_slot.insert(slot, k.clone()).map(|other| (other, k))
            })
            .unwrap();
        let long = "x".repeat(MEMO_KEY_MAX + 1);
        let longer = "x".repeat(MEMO_KEY_MAX + 2);
        for _ in 0..3 {
            for key in [&a, &b, &long, &longer, "", "concert-1"] {
                assert_eq!(hash_key(key), md5_key(key.as_bytes()), "{key}");
            }
        }
    }

    proptest! {
        /// Any sequence of keys, many of them repeated, hashes as MD5 does.
        #[test]
        fn the_memo_is_invisible(keys in proptest::collection::vec("[ab]{0,3}|.{0,50}", 1..64)) {
            for key in keys.iter().chain(&keys) {
                prop_assert_eq!(hash_key(key), md5_key(key.as_bytes()));
            }
        }

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
