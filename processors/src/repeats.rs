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
    /// What the batch being processed changed, newest last, so that a batch that failed
    /// can be taken back and decided again exactly as before ([`Repeats::rollback`]).
    journal: Vec<Change>,
}

#[derive(Debug)]
enum Change {
    /// An entry entered at the back of `order` (and into `seen`).
    Admitted(u128),
    /// The front entry of `order` left (and left `seen`, if it held it there).
    Evicted((i64, u128, u64), bool),
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
            journal: Vec::new(),
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
            let held = self.seen.get(&key) == Some(&record);
            if held {
                self.seen.remove(&key);
            }
            self.journal.push(Change::Evicted((at, key, record), held));
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
        self.journal.push(Change::Admitted(key));
        false
    }

    /// Keeps what the records taken in since the last `commit` changed.
    pub fn commit(&mut self) {
        self.journal.clear();
    }

    /// Takes back what the records taken in since the last `commit` changed, so that
    /// reading them again decides exactly as the first time.
    pub fn rollback(&mut self) {
        while let Some(change) = self.journal.pop() {
            match change {
                Change::Admitted(key) => {
                    self.order.pop_back();
                    self.seen.remove(&key);
                }
                Change::Evicted(entry, held) => {
                    if held {
                        self.seen.insert(entry.1, entry.2);
                    }
                    self.order.push_front(entry);
                }
            }
        }
    }

    /// Appends the records of `batch` that are not repeats to `out`, in order.
    pub fn filter_into(&mut self, batch: &[StoredRecord], out: &mut Vec<StoredRecord>) {
        out.extend(batch.iter().filter(|r| !self.is_repeat(r)).cloned());
    }

    /// The records of `batch` that are not repeats, in order (kept: as `filter_into`
    /// then `commit`).
    pub fn filter(&mut self, batch: &[StoredRecord]) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        self.filter_into(batch, &mut out);
        self.commit();
        out
    }

    /// Before consuming `shard` after `checkpoint`: reads back the records that arrived
    /// within two spans before it, up to and including it, so that the first records
    /// after it are judged as an uninterrupted run would judge them. (Two spans: whether a
    /// record within the span before the checkpoint was itself a repeat depends on the
    /// span before it. A chain of repeats of one event longer than that, a producer
    /// retrying one event for over twice the span, may be decided differently.) A
    /// checkpoint the stream no longer holds seeds nothing, and says so.
    pub async fn seed(
        &mut self,
        reader: &dyn StreamReader,
        shard: &ShardId,
        checkpoint: &SequenceNumber,
    ) -> Result<usize, StreamError> {
        // A shared stream may answer a read with nothing before its end (a gap in time):
        // a few empty reads are read past; the shard's end or the head stops.
        const EMPTY_READS: usize = 20;
        let mut position = StartPosition::At(checkpoint.clone());
        let mut at = None;
        for _ in 0..EMPTY_READS {
            let batch = reader.read(shard, &position, 1).await?;
            if let Some(r) = batch.records.first() {
                at = Some(r.clone());
                break;
            }
            match batch.next {
                Some(next) => position = next,
                None => break,
            }
        }
        let Some(last) = at.filter(|r| r.sequence == *checkpoint) else {
            tracing::warn!(%shard, %checkpoint, "the checkpoint's record is no longer in the stream: repeats of earlier events are not recognised");
            return Ok(0);
        };
        self.commit();
        let mut position = StartPosition::AtTimestamp(last.appended_at_ms - 2 * self.span_ms);
        let mut seeded = 0;
        let mut empty = 0;
        loop {
            let batch = reader.read(shard, &position, 10_000).await?;
            for r in &batch.records {
                if r.sequence > *checkpoint {
                    self.commit();
                    return Ok(seeded);
                }
                self.is_repeat(r);
                seeded += 1;
                if r.sequence == *checkpoint {
                    self.commit();
                    return Ok(seeded);
                }
            }
            self.commit();
            empty = if batch.records.is_empty() {
                empty + 1
            } else {
                0
            };
            match batch.next {
                Some(next) if empty < EMPTY_READS => position = next,
                _ => return Ok(seeded),
            }
        }
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

    /// The review's case: within one batch, `a`'s first record is evicted (by the span)
    /// before its repeat arrives, so the repeat is kept. A failed batch read again must
    /// decide the same, not drop the first `a` as a repeat of the second.
    #[test]
    fn a_failed_batch_is_taken_back_and_decided_the_same() {
        let mut r = Repeats::new(Duration::from_millis(100), 100);
        r.filter(&[rec(1, 0, "s", "x")]);
        let batch = [
            rec(2, 10, "s", "a"),
            rec(3, 500, "s", "b"),
            rec(4, 600, "s", "a"),
        ];
        let mut first = Vec::new();
        r.filter_into(&batch, &mut first);
        r.rollback();
        let again = r.filter(&batch);
        let seqs = |v: &[StoredRecord]| {
            v.iter()
                .map(|x| x.sequence.as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&first), vec![2, 3, 4]);
        assert_eq!(seqs(&again), seqs(&first));
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
