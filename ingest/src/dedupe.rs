//! Dedupe of producer retries: an event whose (`source`, `id`) was accepted within the
//! window is answered `accepted` with `"duplicate": true` and not appended again.
//!
//! Memory is bounded: each remembered event costs one 128-bit hash (MD5 of source and id)
//! with its time in a hash map plus a time-ordered queue entry: about 130 MB per million
//! ids, allocated for the cap at start so that nothing grows under the lock
//! (`floodgate_core::budget::DEDUPE_BYTES_PER_ID`), and `max_ids` caps the total; past it
//! the oldest ids are forgotten early, so under sustained load the effective window is `max_ids / events per second`.
//! After a restart the window is rebuilt from the log's tail ([`Deduper::remember`]).
//!
//! An id whose first copy is still being appended is answered `retry`: whether that first
//! copy becomes durable is not known yet. Every claim ends settled ([`Deduper::settle`])
//! or released ([`Deduper::release`]), also when the request that made it is abandoned,
//! so pending claims are bounded by the requests being appended.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use floodgate_core::stream::{StartPosition, StreamError, StreamReader};
use md5::{Digest, Md5};

/// The dedupe key of an event: MD5 of its source and id (NUL-separated).
pub fn key(source: &str, id: &str) -> (u64, u64) {
    let mut h = Md5::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let d: [u8; 16] = h.finalize().into();
    (
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(d[8..].try_into().expect("8 bytes")),
    )
}

pub type Key = (u64, u64);

/// A slot's value: the acceptance time in ms, or [`PENDING`] while being appended.
type Slot = i64;
const PENDING: Slot = i64::MIN;

/// A map key hashed as one word: the digest's halves folded together, then through the
/// map's randomly seeded SipHash, which keeps a producer from aiming ids at one bucket
/// while hashing 8 bytes instead of 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapKey(Key);

impl Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.0 ^ self.0.1.rotate_left(29));
    }
}

/// What a new copy of an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen within the window: append it (and settle the claim afterwards).
    New,
    /// Accepted within the window: answer accepted, do not append.
    Duplicate,
    /// Its first copy is being appended: answer retry.
    InFlight,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<MapKey, Slot>,
    /// Accepted ids by acceptance time, oldest first.
    order: VecDeque<(i64, Key)>,
}

#[derive(Debug)]
pub struct Deduper {
    window_ms: i64,
    max_ids: usize,
    state: Mutex<State>,
}

impl Deduper {
    pub fn new(window_ms: u64, max_ids: usize) -> Self {
        let max_ids = max_ids.max(1);
        // Sized for the cap up front: growing a map of millions of ids rehashes all of
        // them under the lock every request waits on (400–900 ms stalls at p99 under
        // steady load), and the cap is in the memory budget anyway. Twice the cap: ids
        // come and go all the time, and a map whose deleted slots run out while it is
        // more than half full grows rather than tidying in place; below half it never
        // grows. Pending claims ride on the spare room.
        let state = State {
            slots: HashMap::with_capacity(max_ids.saturating_mul(2)),
            order: VecDeque::with_capacity(max_ids),
        };
        Self {
            window_ms: window_ms as i64,
            max_ids,
            state: Mutex::new(state),
        }
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Appends an accepted id to the time-ordered queue, first forgetting the oldest one
    /// when the queue is at the cap: the queue never holds more than `max_ids`, so it
    /// never reallocates.
    fn push(&self, state: &mut State, at_ms: i64, key: Key) {
        if state.order.len() >= self.max_ids
            && let Some((old_at, old)) = state.order.pop_front()
            && state.slots.get(&MapKey(old)) == Some(&old_at)
        {
            state.slots.remove(&MapKey(old));
        }
        state.slots.insert(MapKey(key), at_ms);
        state.order.push_back((at_ms, key));
    }

    fn evict(&self, state: &mut State, now_ms: i64) {
        let horizon = now_ms - self.window_ms;
        while let Some(&(at, key)) = state.order.front() {
            if at >= horizon && state.order.len() <= self.max_ids {
                break;
            }
            state.order.pop_front();
            if state.slots.get(&MapKey(key)) == Some(&at) {
                state.slots.remove(&MapKey(key));
            }
        }
    }

    /// Claims `keys` for a request at `now_ms`, in order.
    pub fn claim(&self, keys: &[Key], now_ms: i64) -> Vec<Claim> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.evict(&mut state, now_ms);
        let horizon = now_ms - self.window_ms;
        keys.iter()
            .map(|key| match state.slots.get(&MapKey(*key)) {
                Some(&PENDING) => Claim::InFlight,
                Some(at) if *at >= horizon => Claim::Duplicate,
                _ => {
                    state.slots.insert(MapKey(*key), PENDING);
                    Claim::New
                }
            })
            .collect()
    }

    /// Settles claimed keys after the append: accepted ones are remembered, the others
    /// forgotten so that a retry is appended.
    pub fn settle(&self, outcomes: &[(Key, bool)], now_ms: i64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for &(key, accepted) in outcomes {
            if accepted {
                self.push(&mut state, now_ms, key);
            } else if state.slots.get(&MapKey(key)) == Some(&PENDING) {
                state.slots.remove(&MapKey(key));
            }
        }
        self.evict(&mut state, now_ms);
        metrics::gauge!("floodgate_ingest_dedupe_ids").set(state.slots.len() as f64);
    }

    /// Forgets claims whose append never reported back (it was cancelled, or failed in
    /// a way that leaves its outcome unknown), so that a retry is appended again rather
    /// than answered `retry` forever. Keys that are no longer pending are left alone.
    pub fn release(&self, keys: &[Key]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if state.slots.get(&MapKey(*key)) == Some(&PENDING) {
                state.slots.remove(&MapKey(*key));
            }
        }
        metrics::gauge!("floodgate_ingest_dedupe_ids").set(state.slots.len() as f64);
    }

    /// Remembers an event accepted at `at_ms` (rebuilding the window from the log).
    /// Calls must come in acceptance-time order per source of truth; out-of-order times
    /// only make an id expire a little early or late.
    pub fn remember(&self, key: Key, at_ms: i64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.push(&mut state, at_ms, key);
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .slots
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refills the dedupe memory with the events the log accepted within the window, so that
/// a producer's retry after a restart is still recognised.
pub async fn rebuild_from_stream(
    reader: &dyn StreamReader,
    deduper: &Deduper,
) -> Result<(), StreamError> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow)]
        source: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let started = std::time::Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut seen = Vec::new();
    for shard in reader.shards().await? {
        let mut pos = StartPosition::AtTimestamp(now - deduper.window_ms());
        loop {
            let batch = reader.read(&shard.id, &pos, 10_000).await?;
            if batch.records.is_empty() {
                break;
            }
            for r in &batch.records {
                if let Ok(ids) = serde_json::from_slice::<Ids<'_>>(&r.payload) {
                    seen.push((r.appended_at_ms, key(&ids.source, &ids.id)));
                }
            }
            match batch.next {
                Some(next) => pos = next,
                None => break,
            }
        }
    }
    // Oldest first, so the memory's expiry order holds across shards.
    seen.sort_unstable_by_key(|(at, _)| *at);
    let n = seen.len();
    for (at, key) in seen {
        deduper.remember(key, at);
    }
    tracing::info!(
        events = n,
        ms = started.elapsed().as_millis() as u64,
        "dedupe window rebuilt from the log"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Filling the window to its cap, and going on past it, never grows (rehashes) the
    /// map or the queue under the lock.
    #[test]
    fn the_window_never_grows_under_the_lock() {
        let max = 50_000;
        let d = Deduper::new(u64::MAX / 4, max);
        let capacity = |d: &Deduper| {
            let s = d.state.lock().unwrap();
            (s.slots.capacity(), s.order.capacity())
        };
        let before = capacity(&d);
        assert!(before.0 >= max && before.1 >= max, "{before:?}");
        for chunk in 0..(2 * max as u64 / 100) {
            let keys: Vec<Key> = (0..100).map(|i| (chunk, i)).collect();
            d.claim(&keys, chunk as i64);
            let settled: Vec<(Key, bool)> = keys.iter().map(|k| (*k, true)).collect();
            d.settle(&settled, chunk as i64);
        }
        // (A map's reported capacity shrinks a little as deleted slots pile up; it would
        // double if it grew.)
        let after = capacity(&d);
        assert!(
            after.0 <= before.0 && after.1 == before.1,
            "{before:?} → {after:?}"
        );
    }

    #[test]
    fn claims_settle_and_expire() {
        let d = Deduper::new(1000, 100);
        let (a, b) = (key("s", "a"), key("s", "b"));
        assert_eq!(d.claim(&[a, b], 0), [Claim::New, Claim::New]);
        assert_eq!(d.claim(&[a], 1), [Claim::InFlight]);
        d.settle(&[(a, true), (b, false)], 2);
        assert_eq!(d.claim(&[a, b], 3), [Claim::Duplicate, Claim::New]);
        d.settle(&[(b, true)], 4);
        // After the window both are forgotten.
        assert_eq!(d.claim(&[a], 1003), [Claim::New]);
        assert_eq!(d.claim(&[b], 1003), [Claim::Duplicate]);
        assert_ne!(key("s", "ab"), key("sa", "b"));
    }

    #[test]
    fn released_claims_are_claimed_again() {
        let d = Deduper::new(1000, 100);
        let (a, b) = (key("s", "a"), key("s", "b"));
        assert_eq!(d.claim(&[a, b], 0), [Claim::New, Claim::New]);
        d.settle(&[(b, true)], 1);
        // Releasing touches only what is still pending: `b` stays accepted.
        d.release(&[a, b]);
        assert_eq!(d.claim(&[a, b], 2), [Claim::New, Claim::Duplicate]);
        assert_eq!(d.len(), 2);
    }

    /// The clock is the caller's (`now_ms`), so the window's edge is exact here: an id
    /// accepted at `t` is a duplicate up to and including `t + window`, and new after.
    #[test]
    fn expiry_is_exact_at_the_window_edge() {
        let d = Deduper::new(1000, 100);
        let a = key("s", "a");
        assert_eq!(d.claim(&[a], 5_000), [Claim::New]);
        d.settle(&[(a, true)], 5_000);
        assert_eq!(d.claim(&[a], 5_999), [Claim::Duplicate]);
        assert_eq!(d.claim(&[a], 6_000), [Claim::Duplicate]);
        assert_eq!(d.claim(&[a], 6_001), [Claim::New]);
        // Accepted again, it has a fresh window from its new acceptance.
        d.settle(&[(a, true)], 6_001);
        assert_eq!(d.claim(&[a], 7_001), [Claim::Duplicate]);
        assert_eq!(d.claim(&[a], 7_002), [Claim::New]);
        d.release(&[a]);
        // Ids rebuilt from the log expire by the same rule, from their append time.
        let b = key("s", "b");
        d.remember(b, 10_000);
        assert_eq!(d.claim(&[b], 11_000), [Claim::Duplicate]);
        assert_eq!(d.claim(&[b], 11_001), [Claim::New]);
    }

    /// A claim whose append has not reported back is never expired by time: its outcome
    /// is unknown, so a copy meanwhile must be answered `retry`, not appended again.
    #[test]
    fn pending_claims_do_not_expire() {
        let d = Deduper::new(1000, 100);
        let a = key("s", "a");
        assert_eq!(d.claim(&[a], 0), [Claim::New]);
        assert_eq!(d.claim(&[a], 1_000_000), [Claim::InFlight]);
        d.settle(&[(a, true)], 1_000_001);
        assert_eq!(d.claim(&[a], 1_000_002), [Claim::Duplicate]);
    }

    /// An id remembered twice (rebuilt from the log, then accepted again) keeps its newer
    /// acceptance when the older one's time runs out.
    #[test]
    fn an_older_acceptance_expiring_keeps_the_newer_one() {
        let d = Deduper::new(1000, 100);
        let a = key("s", "a");
        d.remember(a, 0);
        // The claim's outcome was unknown (released), and the retry was accepted at 500.
        d.settle(&[(a, true)], 500);
        // At 1200 the acceptance at 0 is past the window; the one at 500 is not.
        assert_eq!(d.claim(&[a], 1_200), [Claim::Duplicate]);
        assert_eq!(d.claim(&[a], 1_501), [Claim::New]);
    }

    /// Past `max_ids` the oldest acceptances go first, whatever the window: the count, not
    /// the clock, decides.
    #[test]
    fn past_max_ids_the_oldest_go_first() {
        let d = Deduper::new(u64::MAX / 4, 3);
        let k: Vec<Key> = (0..5).map(|i| key("s", &i.to_string())).collect();
        for (i, &key) in k.iter().enumerate() {
            assert_eq!(d.claim(&[key], i as i64), [Claim::New]);
            d.settle(&[(key, true)], i as i64);
        }
        assert_eq!(d.len(), 3);
        let now = 10;
        assert_eq!(
            d.claim(&k, now),
            [
                Claim::New,
                Claim::New,
                Claim::Duplicate,
                Claim::Duplicate,
                Claim::Duplicate
            ]
        );
    }

    #[test]
    fn memory_is_capped() {
        let d = Deduper::new(u64::MAX / 4, 10);
        for i in 0..100 {
            d.remember(key("s", &i.to_string()), i);
        }
        assert!(d.len() <= 11, "{}", d.len());
        assert_eq!(d.claim(&[key("s", "99")], 100), [Claim::Duplicate]);
        assert_eq!(d.claim(&[key("s", "0")], 100), [Claim::New]);
    }
}
