//! The archive consumer: every accepted event, as the producer sent it, copied from the
//! stream into the [`Archive`] role (Firehose delivering to S3) by a consumer of its own
//! ([`CONSUMER`], under its own leases and checkpoints), never by the edge.
//!
//! # What lands where
//!
//! Each event is one NDJSON line: the stored record's payload (the producer's CloudEvent
//! JSON, as accepted) and `\n`. JSON allows a raw line break only as whitespace between
//! tokens (inside strings it is always escaped), so a CR or LF byte in a payload is turned
//! into a space: the line holds the same JSON value and nothing else. Lines are packed into
//! archive records of up to [`ArchiveConfig::record_bytes`] (never past the archive's own
//! record limit), each record ending with its last line's `\n`. Firehose bills each record
//! rounded up to 5 KB, so one 350-byte event per record would be billed about 14 times
//! its size; packed, the rounding is a few percent. The destination concatenates records,
//! so its objects hold exactly one event per line.
//!
//! An event too large for an archive record on its own (Firehose: over 1,000 KiB; the
//! stream takes up to 1 MiB) cannot be archived whole; its line is replaced by one naming
//! it (`{"floodgate_archive":"omitted", "reason", "bytes", "shard", "sequence", "id",
//! "source"}`), counted (`floodgate_archive_oversized_events_total`) and logged, so
//! the archive says what it lacks instead of stalling the shard. The lake holds the event.
//!
//! # Delivery: at least once
//!
//! A batch of the stream becomes records, the records calls within [`ArchiveLimits`], one
//! call in flight per shard. Records the archive failed on their own are sent again, alone,
//! and failed calls (throttling, 5xx, resets, timeouts) whole, with jittered exponential
//! back-off, until every record is stored: a batch is never given up. `process` returns
//! only then, so the checkpoint (which the runtime commits after `process`) never passes
//! an event the archive does not hold. On shutdown a batch still failing stops retrying
//! and fails: its checkpoint is not moved, and the next start archives it again.
//!
//! So an event may be archived more than once: a call whose answer was lost (a reset after
//! Firehose took it) is sent again, what followed the last checkpoint commit is archived
//! again after a crash (a busy shard commits at most every
//! [`crate::runtime::RuntimeConfig::commit_interval`], 200 ms by default), a batch cut short
//! by a shutdown is archived again from the checkpoint, and a worker that lost its lease
//! mid-batch may finish a put that the shard's new owner repeats. Every line carries the event's `id` and `source`:
//! readers drop repeats by them.

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::archive::{Archive, ArchiveError, ArchiveLimits};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use tokio::sync::watch;

use crate::runtime::{ProcessError, ShardProcessor};

/// The archive consumer's name: its leases, checkpoints and metrics are kept under it.
pub const CONSUMER: &str = "archive";

/// Records packed between two yields to the async runtime: copying a batch of 10,000
/// events is a few milliseconds of CPU that the edge's requests should not wait behind.
const PACK_CHUNK: usize = 1024;

/// A failing put logs at most this often (each failure is counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How the archive consumer packs and retries.
#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    /// A record is closed before a line would take it past this many bytes (and never
    /// grows past the archive's record limit). `None`: as large as the archive takes.
    pub record_bytes: Option<usize>,
    /// Back-off bounds between attempts of a failing put (full jitter, doubling).
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            record_bytes: None,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
        }
    }
}

/// What the consumer did, since it was made (also counted in metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveCounts {
    /// Events archived (lines in records the archive stored, omission lines included).
    pub events: u64,
    /// Records the archive stored.
    pub records: u64,
    /// Bytes of the records the archive stored.
    pub bytes: u64,
    /// Records the archive failed on their own and that were sent again.
    pub records_retried: u64,
    /// Calls by outcome: every record stored; some failed on their own; the whole call
    /// failed, throttled, unavailable (its fate unknown) or refused.
    pub calls_accepted: u64,
    pub calls_partial: u64,
    pub calls_throttled: u64,
    pub calls_unavailable: u64,
    pub calls_refused: u64,
    /// Events too large for a record, archived as a line that names them.
    pub oversized_events: u64,
}

impl ArchiveCounts {
    /// Every call made, whatever its outcome.
    pub fn calls(&self) -> u64 {
        self.calls_accepted
            + self.calls_partial
            + self.calls_throttled
            + self.calls_unavailable
            + self.calls_refused
    }
}

/// The counters behind [`ArchiveCounts`]; each bump also counts the metric.
#[derive(Debug, Default)]
struct Counters {
    events: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    records_retried: AtomicU64,
    calls_accepted: AtomicU64,
    calls_partial: AtomicU64,
    calls_throttled: AtomicU64,
    calls_unavailable: AtomicU64,
    calls_refused: AtomicU64,
    oversized_events: AtomicU64,
}

/// How one call ended.
#[derive(Debug, Clone, Copy)]
enum CallOutcome {
    Accepted,
    Partial,
    Throttled,
    Unavailable,
    Refused,
}

impl From<&ArchiveError> for CallOutcome {
    fn from(e: &ArchiveError) -> Self {
        match e {
            ArchiveError::Throttled(_) => CallOutcome::Throttled,
            ArchiveError::Unavailable(_) => CallOutcome::Unavailable,
            ArchiveError::Refused(_) => CallOutcome::Refused,
        }
    }
}

impl Counters {
    fn call(&self, outcome: CallOutcome) {
        let (counter, label) = match outcome {
            CallOutcome::Accepted => (&self.calls_accepted, "accepted"),
            CallOutcome::Partial => (&self.calls_partial, "partial"),
            CallOutcome::Throttled => (&self.calls_throttled, "throttled"),
            CallOutcome::Unavailable => (&self.calls_unavailable, "unavailable"),
            CallOutcome::Refused => (&self.calls_refused, "refused"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("floodgate_archive_calls_total", "outcome" => label).increment(1);
    }

    fn stored(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("floodgate_archive_records_total").increment(records);
        metrics::counter!("floodgate_archive_bytes_total").increment(bytes);
    }

    fn retried(&self, records: u64) {
        self.records_retried.fetch_add(records, Ordering::Relaxed);
        metrics::counter!("floodgate_archive_records_retried_total").increment(records);
    }

    fn archived(&self, events: u64, oversized: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        metrics::counter!("floodgate_archive_events_total").increment(events);
        if oversized > 0 {
            self.oversized_events
                .fetch_add(oversized, Ordering::Relaxed);
            metrics::counter!("floodgate_archive_oversized_events_total").increment(oversized);
        }
    }

    fn snapshot(&self) -> ArchiveCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ArchiveCounts {
            events: get(&self.events),
            records: get(&self.records),
            bytes: get(&self.bytes),
            records_retried: get(&self.records_retried),
            calls_accepted: get(&self.calls_accepted),
            calls_partial: get(&self.calls_partial),
            calls_throttled: get(&self.calls_throttled),
            calls_unavailable: get(&self.calls_unavailable),
            calls_refused: get(&self.calls_refused),
            oversized_events: get(&self.oversized_events),
        }
    }
}

/// A batch's events as archive records (see the module docs).
#[derive(Debug)]
pub struct Packer {
    /// A record is closed before a line would take it past this.
    target: usize,
    /// No record, and so no line, is larger than this.
    limit: usize,
    current: Vec<u8>,
    records: Vec<Bytes>,
    events: u64,
    oversized: u64,
}

impl Packer {
    /// Records of at most `target` bytes (lines larger than `target` alone in theirs),
    /// none over `limit`.
    pub fn new(target: usize, limit: usize) -> Packer {
        let target = target.clamp(1, limit);
        Packer {
            target,
            limit,
            current: Vec::new(),
            records: Vec::new(),
            events: 0,
            oversized: 0,
        }
    }

    /// Adds `record`'s event as one line.
    pub fn push(&mut self, shard: &ShardId, record: &StoredRecord) {
        let payload = &record.payload[..];
        let omitted;
        let payload = if payload.len() < self.limit {
            payload
        } else {
            self.oversized += 1;
            omitted = omission(shard, &record.sequence, payload, self.limit);
            tracing::error!(
                %shard, sequence = %record.sequence, bytes = payload.len(), limit = self.limit,
                "an event is larger than an archive record: archived as a line naming it"
            );
            omitted.as_bytes()
        };
        let line = payload.len() + 1;
        if !self.current.is_empty() && self.current.len() + line > self.target {
            self.close();
        }
        let start = self.current.len();
        self.current.extend_from_slice(payload);
        for b in &mut self.current[start..] {
            if *b == b'\n' || *b == b'\r' {
                *b = b' ';
            }
        }
        self.current.push(b'\n');
        self.events += 1;
        if self.current.len() >= self.target {
            self.close();
        }
    }

    fn close(&mut self) {
        if !self.current.is_empty() {
            let record = std::mem::take(&mut self.current);
            self.records.push(Bytes::from(record));
        }
    }

    /// The records, in the events' order; events and omitted events packed.
    pub fn finish(mut self) -> (Vec<Bytes>, u64, u64) {
        self.close();
        (self.records, self.events, self.oversized)
    }
}

/// The line standing for an event too large to archive (always far below `limit`).
fn omission(shard: &ShardId, sequence: &SequenceNumber, payload: &[u8], limit: usize) -> String {
    #[derive(serde::Deserialize)]
    struct Ids {
        id: Option<String>,
        source: Option<String>,
    }
    let ids = serde_json::from_slice::<Ids>(payload).unwrap_or(Ids {
        id: None,
        source: None,
    });
    serde_json::json!({
        "floodgate_archive": "omitted",
        "reason": format!("the event is larger than an archive record ({limit} bytes with its newline)"),
        "bytes": payload.len(),
        "shard": shard.0,
        "sequence": sequence.as_str(),
        "id": ids.id,
        "source": ids.source,
    })
    .to_string()
}

/// Cuts `records` into calls within `limits` (each record is within the record limit).
pub fn calls(records: Vec<Bytes>, limits: ArchiveLimits) -> Vec<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut call: Vec<Bytes> = Vec::new();
    let mut bytes = 0;
    for r in records {
        if !call.is_empty()
            && (call.len() == limits.max_records || bytes + r.len() > limits.max_bytes)
        {
            out.push(std::mem::take(&mut call));
            bytes = 0;
        }
        bytes += r.len();
        call.push(r);
    }
    if !call.is_empty() {
        out.push(call);
    }
    out
}

/// The archive consumer (see the module docs).
#[derive(Debug)]
pub struct ArchiveProcessor {
    archive: Arc<dyn Archive>,
    config: ArchiveConfig,
    limits: ArchiveLimits,
    /// The process's shutdown: a failing put stops retrying once it is raised.
    shutdown: watch::Receiver<bool>,
    counters: Counters,
}

impl ArchiveProcessor {
    pub fn new(
        archive: Arc<dyn Archive>,
        config: ArchiveConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let limits = archive.limits();
        Self {
            archive,
            config,
            limits,
            shutdown,
            counters: Counters::default(),
        }
    }

    /// What it did so far.
    pub fn counts(&self) -> ArchiveCounts {
        self.counters.snapshot()
    }

    fn record_target(&self) -> usize {
        self.config
            .record_bytes
            .unwrap_or(self.limits.max_record_bytes)
            .min(self.limits.max_record_bytes)
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps the back-off of `attempt` unless shutdown comes first; true on shutdown.
    async fn back_off(&self, attempt: u32) -> bool {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(&self.config, attempt)) => false,
            _ = shutdown.changed() => true,
        }
    }

    /// Puts one call's records until every one is stored, or shutdown.
    async fn put_all(&self, shard: &ShardId, mut pending: Vec<Bytes>) -> Result<(), ProcessError> {
        let mut attempt = 0u32;
        let mut logged: Option<Instant> = None;
        loop {
            let mut refused = false;
            let why = match self.archive.put(&pending).await {
                Ok(results) if results.len() == pending.len() => {
                    let mut failed = Vec::new();
                    let mut why = None;
                    let (mut records, mut bytes) = (0u64, 0u64);
                    for (record, result) in pending.into_iter().zip(results) {
                        match result {
                            Ok(()) => {
                                records += 1;
                                bytes += record.len() as u64;
                            }
                            Err(failure) => {
                                why.get_or_insert(failure);
                                failed.push(record);
                            }
                        }
                    }
                    self.counters.stored(records, bytes);
                    let Some(why) = why else {
                        self.counters.call(CallOutcome::Accepted);
                        return Ok(());
                    };
                    self.counters.call(CallOutcome::Partial);
                    self.counters.retried(failed.len() as u64);
                    pending = failed;
                    format!("{} records failed on their own ({why})", pending.len())
                }
                Ok(results) => {
                    // Against the role's contract; nothing shows which were stored.
                    self.counters.call(CallOutcome::Unavailable);
                    format!(
                        "the archive answered {} results for {} records",
                        results.len(),
                        pending.len()
                    )
                }
                Err(e) => {
                    self.counters.call(CallOutcome::from(&e));
                    refused = matches!(e, ArchiveError::Refused(_));
                    e.to_string()
                }
            };
            attempt = attempt.saturating_add(1);
            if logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                logged = Some(Instant::now());
                if refused {
                    // No retry fixes this by itself, but one is kept trying so that a fixed
                    // destination (a delivery stream recreated, a permission granted) takes
                    // over without a restart.
                    tracing::error!(%shard, attempt, records = pending.len(), why = %why, "the archive refuses the put; retrying until it is fixed");
                } else {
                    tracing::warn!(%shard, attempt, records = pending.len(), why = %why, "archive put failed; retrying");
                }
            }
            if self.stopping() || self.back_off(attempt).await {
                return Err(ProcessError::Other(format!(
                    "archive: stopping with {} records not stored ({why}); they are archived \
                     again from the checkpoint",
                    pending.len()
                )));
            }
        }
    }
}

/// Full-jitter exponential back-off: a random pause up to `retry_min` × 2^attempt, at
/// most `retry_max`. The randomness is std's `RandomState` (random keys per thread),
/// which is plenty to spread retries.
fn backoff(config: &ArchiveConfig, attempt: u32) -> Duration {
    let cap = config
        .retry_min
        .saturating_mul(1u32 << attempt.min(16))
        .min(config.retry_max);
    let r = std::collections::hash_map::RandomState::new().hash_one(attempt);
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
}

#[async_trait]
impl ShardProcessor for ArchiveProcessor {
    fn consumer(&self) -> &str {
        CONSUMER
    }

    async fn start_position(
        &self,
        _shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
        // The archive cannot be read back: the checkpoint is the position.
        Ok(None)
    }

    async fn process(&self, shard: &ShardId, records: &[StoredRecord]) -> Result<(), ProcessError> {
        let mut packer = Packer::new(self.record_target(), self.limits.max_record_bytes);
        for chunk in records.chunks(PACK_CHUNK) {
            for r in chunk {
                packer.push(shard, r);
            }
            tokio::task::yield_now().await;
        }
        let (packed, events, oversized) = packer.finish();
        for call in calls(packed, self.limits) {
            self.put_all(shard, call).await?;
        }
        self.counters.archived(events, oversized);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use floodgate_core::archive::{PutResults, RecordFailure};

    use super::*;

    fn shard() -> ShardId {
        ShardId("shard-0".to_owned())
    }

    fn record(n: u64, payload: &str) -> StoredRecord {
        StoredRecord {
            sequence: SequenceNumber::from_u64(n),
            key: "k".to_owned(),
            payload: Bytes::from(payload.to_owned()),
            appended_at_ms: 0,
        }
    }

    fn event(n: u64, pad: usize) -> String {
        serde_json::json!({"specversion":"1.0","id":format!("e{n}"),"source":"test","type":"t","data":{"pad":"x".repeat(pad)}}).to_string()
    }

    fn lines(records: &[Bytes]) -> Vec<String> {
        let all: Vec<u8> = records.iter().flat_map(|r| r.iter().copied()).collect();
        let text = String::from_utf8(all).unwrap();
        assert!(text.ends_with('\n'));
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn lines_are_packed_whole_into_records_up_to_the_target() {
        let events: Vec<String> = (0..100).map(|n| event(n, n as usize % 50)).collect();
        let mut p = Packer::new(1000, 5000);
        for (n, e) in events.iter().enumerate() {
            p.push(&shard(), &record(n as u64, e));
        }
        let (records, count, oversized) = p.finish();
        assert_eq!((count, oversized), (100, 0));
        for r in &records {
            assert!(r.len() <= 1000, "{}", r.len());
            assert_eq!(r.last(), Some(&b'\n'), "each record ends its last line");
        }
        let total: usize = events.iter().map(|e| e.len() + 1).sum();
        assert!(
            records.len() <= total / 1000 + 2,
            "{} records for {total} bytes: records are filled",
            records.len()
        );
        assert_eq!(
            lines(&records),
            events,
            "every event once, in order, one a line"
        );
    }

    #[test]
    fn a_line_break_in_an_event_becomes_a_space() {
        let pretty = "{\n  \"id\": \"a\",\r\n  \"source\": \"s\",\n  \"data\": {\"text\": \"two\\nlines\"}\n}";
        let mut p = Packer::new(1000, 5000);
        p.push(&shard(), &record(1, pretty));
        p.push(&shard(), &record(2, "{\"id\":\"b\"}"));
        let (records, _, _) = p.finish();
        let got = lines(&records);
        assert_eq!(got.len(), 2, "{got:?}");
        let a: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(
            a,
            serde_json::from_str::<serde_json::Value>(pretty).unwrap()
        );
        assert_eq!(
            a["data"]["text"], "two\nlines",
            "escapes inside strings are kept"
        );
    }

    #[test]
    fn an_event_larger_than_a_record_is_a_line_naming_it() {
        let limit = 2000;
        let big = event(7, limit);
        let mut p = Packer::new(500, limit);
        p.push(&shard(), &record(1, &event(1, 0)));
        p.push(&shard(), &record(2, &big));
        // Exactly at the limit with its newline: still fits.
        let fits = format!("{{\"id\":\"f\",\"pad\":\"{}\"}}", "y".repeat(limit - 20));
        assert_eq!(fits.len() + 1, limit);
        p.push(&shard(), &record(3, &fits));
        // One byte more: omitted.
        let over = format!("{{\"id\":\"o\",\"pad\":\"{}\"}}", "z".repeat(limit - 19));
        assert_eq!(over.len() + 1, limit + 1);
        p.push(&shard(), &record(4, &over));
        let (records, count, oversized) = p.finish();
        assert_eq!((count, oversized), (4, 2));
        assert!(records.iter().all(|r| r.len() <= limit));
        let got = lines(&records);
        let named: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
        assert_eq!(named["floodgate_archive"], "omitted");
        assert_eq!(named["id"], "e7");
        assert_eq!(named["source"], "test");
        assert_eq!(named["sequence"], "2");
        assert_eq!(named["bytes"], big.len());
        assert_eq!(got[2], fits);
        let named: serde_json::Value = serde_json::from_str(&got[3]).unwrap();
        assert_eq!(
            (named["id"].as_str(), named["bytes"].as_u64()),
            (Some("o"), Some(limit as u64))
        );
    }

    #[test]
    fn calls_stay_within_the_limits() {
        let limits = ArchiveLimits {
            max_records: 3,
            max_bytes: 100,
            max_record_bytes: 60,
        };
        // Three records at most; 100 bytes at most, exactly 100 allowed.
        let records: Vec<Bytes> = [10, 10, 10, 40, 60, 50, 50, 1, 60, 40]
            .iter()
            .map(|n| Bytes::from(vec![b'x'; *n]))
            .collect();
        let got: Vec<Vec<usize>> = calls(records, limits)
            .iter()
            .map(|c| c.iter().map(Bytes::len).collect())
            .collect();
        assert_eq!(
            got,
            vec![
                vec![10, 10, 10],
                vec![40, 60],
                vec![50, 50],
                vec![1, 60],
                vec![40]
            ]
        );
    }

    /// An archive that answers from a script, then stores everything.
    #[derive(Debug, Default)]
    struct Scripted {
        /// Per call: a whole-call error, or which records (by index) fail.
        script: Mutex<VecDeque<Result<Vec<usize>, ArchiveError>>>,
        /// After the script: every call fails as unavailable.
        down: std::sync::atomic::AtomicBool,
        stored: Mutex<Vec<Bytes>>,
        calls: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Archive for Scripted {
        fn limits(&self) -> ArchiveLimits {
            ArchiveLimits {
                max_records: 4,
                max_bytes: 10_000,
                max_record_bytes: 300,
            }
        }

        async fn put(&self, records: &[Bytes]) -> Result<PutResults, ArchiveError> {
            self.calls.lock().unwrap().push(records.len());
            let next = self.script.lock().unwrap().pop_front();
            let step = next.unwrap_or_else(|| {
                if self.down.load(Ordering::Relaxed) {
                    Err(ArchiveError::Unavailable("down".into()))
                } else {
                    Ok(Vec::new())
                }
            });
            let failing = step?;
            let mut out = Vec::new();
            for (i, r) in records.iter().enumerate() {
                if failing.contains(&i) {
                    out.push(Err(RecordFailure {
                        code: "ServiceUnavailableException".into(),
                        message: "Slow down.".into(),
                    }));
                } else {
                    self.stored.lock().unwrap().push(r.clone());
                    out.push(Ok(()));
                }
            }
            Ok(out)
        }
    }

    fn quick() -> ArchiveConfig {
        ArchiveConfig {
            record_bytes: Some(200),
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn failed_records_and_calls_are_sent_again_until_stored() {
        let archive = Arc::new(Scripted::default());
        archive.script.lock().unwrap().extend([
            Err(ArchiveError::Throttled("slow".into())),
            Ok(vec![0, 2]),
            Err(ArchiveError::Unavailable("reset".into())),
            Ok(vec![1]),
            Err(ArchiveError::Refused("no stream".into())),
        ]);
        let (_stop, stop_rx) = watch::channel(false);
        let p = ArchiveProcessor::new(archive.clone(), quick(), stop_rx);
        let events: Vec<String> = (0..40).map(|n| event(n, 10)).collect();
        let records: Vec<StoredRecord> = events
            .iter()
            .enumerate()
            .map(|(n, e)| record(n as u64, e))
            .collect();
        p.process(&shard(), &records).await.unwrap();

        let stored = archive.stored.lock().unwrap().clone();
        let mut got = lines(&stored);
        got.sort();
        let mut want = events.clone();
        want.sort();
        assert_eq!(
            got, want,
            "every event stored once: failures were resent, not doubled"
        );
        assert!(archive.calls.lock().unwrap().iter().all(|n| *n <= 4));
        let c = p.counts();
        assert_eq!(c.events, 40);
        assert_eq!(c.records, stored.len() as u64);
        assert_eq!(c.bytes, stored.iter().map(|r| r.len() as u64).sum::<u64>());
        assert_eq!(c.records_retried, 3, "two, then one, failed on their own");
        assert_eq!(
            (
                c.calls_throttled,
                c.calls_unavailable,
                c.calls_refused,
                c.calls_partial
            ),
            (1, 1, 1, 2)
        );
        assert_eq!(c.calls(), archive.calls.lock().unwrap().len() as u64);
    }

    #[tokio::test]
    async fn a_put_failing_at_shutdown_fails_the_batch() {
        let archive = Arc::new(Scripted::default());
        archive.down.store(true, Ordering::Relaxed);
        let (stop, stop_rx) = watch::channel(false);
        let p = Arc::new(ArchiveProcessor::new(archive.clone(), quick(), stop_rx));
        let task = {
            let p = p.clone();
            tokio::spawn(async move { p.process(&shard(), &[record(1, &event(1, 0))]).await })
        };
        // It keeps trying while the process runs...
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.counts().calls_unavailable < 5 {
            assert!(Instant::now() < deadline, "no retries");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!task.is_finished(), "a failing batch is never given up");
        // ...and gives the batch up, failed, when it stops.
        stop.send(true).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops at shutdown")
            .unwrap();
        assert!(out.is_err(), "{out:?}");
        assert_eq!(p.counts().events, 0);
    }

    #[test]
    fn back_off_is_jittered_within_its_bounds() {
        let c = ArchiveConfig {
            record_bytes: None,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(100),
        };
        let pauses: Vec<Duration> = (0..50).map(|_| backoff(&c, 20)).collect();
        assert!(pauses.iter().all(|p| *p <= Duration::from_millis(100)));
        assert!(
            pauses
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 10,
            "{pauses:?}"
        );
        assert!((0..50).all(|_| backoff(&c, 1) <= Duration::from_millis(20)));
    }
}
