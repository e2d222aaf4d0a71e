//! Dropping repeats of an event within a shard, for streams written by many stateless
//! edges (Kinesis). A producer that retries after a lost answer may reach another edge,
//! and a Kinesis put whose answer timed out may have been written before the edge wrote
//! it again: the same event, `(source, id)`, then sits in the shard twice. The same
//! `(source, id)` always has the same partition key, so both copies are in one shard, and
//! each consumer drops the later copy here, before its processor sees it.
//!
//! The decision is a function of the shard's records alone, so every consumer, and every
//! replay of the same records, drops the same ones (the lake's runs come out the same):
//! a record is a repeat when a record before it in the shard had the same `(source, id)`
//! and arrived at most `span` earlier, among the last `max_ids` events. A consumer that
//! starts from a checkpoint first reads back what arrived within `span` before it
//! ([`Repeats::seed`]), so that a restart decides as an uninterrupted run would have.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use floodgate_core::stream::{
    SequenceNumber, ShardId, StartPosition, StoredRecord, StreamError, StreamReader,
};
use md5::{Digest, Md5};

/// The events of one shard seen within the span.
#[derive(Debug)]
pub struct Repeats {
    span_ms: i64,
    max_ids: usize,
    /// (arrival, key, record) in shard order: the eviction queue.
    order: VecDeque<(i64, u128, u64)>,
    /// key → the record that holds it (a digest of its sequence number). The same record
    /// read again (a batch retried after a failure) is not a repeat of itself.
    seen: HashMap<u128, u64>,
}

#[derive(serde::Deserialize)]
struct Ids<'a> {
    #[serde(borrow)]
    source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// The event's `(source, id)` as a 128-bit digest; `None` for a payload without them
/// (such a record is never dropped).
fn key(payload: &[u8]) -> Option<u128> {
    let ids: Ids<'_> = serde_json::from_slice(payload).ok()?;
    let mut h = Md5::new();
    h.update(ids.source.as_bytes());
    h.update([0u8]);
    h.update(ids.id.as_bytes());
    Some(u128::from_be_bytes(h.finalize().into()))
}

/// A record's identity within its shard: its sequence number, digested.
fn record_id(seq: &SequenceNumber) -> u64 {
    let digest: [u8; 16] = Md5::digest(seq.as_str().as_bytes()).into();
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

impl Repeats {
    pub fn new(span: Duration, max_ids: usize) -> Self {
        Self {
            span_ms: i64::try_from(span.as_millis()).unwrap_or(i64::MAX),
            max_ids: max_ids.max(1),
            order: VecDeque::new(),
            seen: HashMap::new(),
        }
    }

    /// Forgets ids that arrived more than the span before `now_ms`, and (with `room`) the
    /// oldest ones until one more fits under `max_ids`.
    fn expire(&mut self, now_ms: i64, room: bool) {
        while let Some(&(at, key, record)) = self.order.front() {
            let old = at < now_ms.saturating_sub(self.span_ms);
            let full = room && self.order.len() >= self.max_ids;
            if !old && !full {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key) == Some(&record) {
                self.seen.remove(&key);
            }
        }
    }

    /// Takes `record` in, in shard order; `true` when it repeats an event that another
    /// record held within the span (drop it). Reading the same records again (a retried
    /// batch) decides the same.
    pub fn is_repeat(&mut self, record: &StoredRecord) -> bool {
        let Some(key) = key(&record.payload) else {
            return false;
        };
        let id = record_id(&record.sequence);
        self.expire(record.appended_at_ms, false);
        if let Some(&holder) = self.seen.get(&key) {
            return holder != id;
        }
        self.expire(record.appended_at_ms, true);
        self.order.push_back((record.appended_at_ms, key, id));
        self.seen.insert(key, id);
        false
    }

    /// The records of `batch` that are not repeats, in order.
    pub fn filter(&mut self, batch: &[StoredRecord]) -> Vec<StoredRecord> {
        batch
            .iter()
            .filter(|r| !self.is_repeat(r))
            .cloned()
            .collect()
    }

    /// Before consuming `shard` after `checkpoint`: reads the records that arrived within
    /// the span before it, up to and including it, so that the first records after it are
    /// judged against them. A checkpoint the stream no longer holds seeds nothing.
    pub async fn seed(
        &mut self,
        reader: &dyn StreamReader,
        shard: &ShardId,
        checkpoint: &SequenceNumber,
    ) -> Result<usize, StreamError> {
        let at = reader
            .read(shard, &StartPosition::At(checkpoint.clone()), 1)
            .await?;
        let Some(last) = at.records.first().filter(|r| r.sequence == *checkpoint) else {
            return Ok(0);
        };
        let mut position = StartPosition::AtTimestamp(last.appended_at_ms - self.span_ms);
        let mut seeded = 0;
        // A shared stream may answer empty reads before the end (a gap in time); only a
        // read that is at the head (or the shard's end) stops the seeding early.
        for _ in 0..100_000 {
            let batch = reader.read(shard, &position, 10_000).await?;
            for r in &batch.records {
                if r.sequence > *checkpoint {
                    return Ok(seeded);
                }
                self.is_repeat(r);
                seeded += 1;
                if r.sequence == *checkpoint {
                    return Ok(seeded);
                }
            }
            let at_head = batch.records.is_empty() && batch.millis_behind.unwrap_or(0) == 0;
            match batch.next {
                Some(next) if !at_head => position = next,
                _ => return Ok(seeded),
            }
        }
        Ok(seeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(seq: u64, at: i64, source: &str, id: &str) -> StoredRecord {
        StoredRecord {
            sequence: SequenceNumber::from_u64(seq),
            key: "k".to_owned(),
            payload: Bytes::from(format!(r#"{{"source":"{source}","id":"{id}","type":"t"}}"#)),
            appended_at_ms: at,
        }
    }

    #[test]
    fn a_repeat_within_the_span_is_dropped_and_one_after_it_kept() {
        let mut r = Repeats::new(Duration::from_millis(1000), 100);
        let batch = [
            rec(1, 0, "s", "a"),
            rec(2, 10, "s", "b"),
            rec(3, 500, "s", "a"),  // repeat
            rec(4, 600, "t", "a"),  // another source: not a repeat
            rec(5, 1001, "s", "b"), // b arrived at 10: 991 ms earlier, within the span
            rec(6, 1011, "s", "b"), // the first b is now 1001 ms old, but the
                                    // repeat at 1001 was dropped, not admitted: b expired
        ];
        let kept: Vec<u64> = r
            .filter(&batch)
            .iter()
            .map(|x| x.sequence.as_u64().unwrap())
            .collect();
        assert_eq!(kept, vec![1, 2, 4, 6]);
    }

    #[test]
    fn the_id_cap_bounds_memory_deterministically() {
        let mut r = Repeats::new(Duration::from_secs(3600), 2);
        let batch = [
            rec(1, 0, "s", "a"),
            rec(2, 1, "s", "b"),
            rec(3, 2, "s", "c"), // evicts a
            rec(4, 3, "s", "a"), // so a is new again
            rec(5, 4, "s", "c"), // c is still held
        ];
        let kept: Vec<u64> = r
            .filter(&batch)
            .iter()
            .map(|x| x.sequence.as_u64().unwrap())
            .collect();
        assert_eq!(kept, vec![1, 2, 3, 4]);
        assert!(r.order.len() <= 2 && r.seen.len() <= 2);
    }

    #[test]
    fn a_batch_read_again_after_a_failure_is_decided_the_same() {
        let mut r = Repeats::new(Duration::from_secs(60), 100);
        let batch = [
            rec(1, 0, "s", "a"),
            rec(2, 1, "s", "b"),
            rec(3, 2, "s", "a"),
        ];
        let first: Vec<u64> = r
            .filter(&batch)
            .iter()
            .map(|x| x.sequence.as_u64().unwrap())
            .collect();
        let again: Vec<u64> = r
            .filter(&batch)
            .iter()
            .map(|x| x.sequence.as_u64().unwrap())
            .collect();
        assert_eq!(first, vec![1, 2]);
        assert_eq!(again, first, "a retried batch must not lose its records");
    }

    #[test]
    fn payloads_without_ids_are_never_dropped() {
        let mut r = Repeats::new(Duration::from_secs(1), 10);
        let mut x = rec(1, 0, "s", "a");
        x.payload = Bytes::from_static(b"not json");
        assert!(!r.is_repeat(&x));
        assert!(!r.is_repeat(&x));
    }
}
