//! The stream roles on Kinesis Data Streams: [`KinesisWriter`] (the edge's
//! [`StreamWriter`]: PutRecords with KPL-format aggregation and per-record retries) and
//! [`KinesisReader`] (the processors' [`StreamReader`]: GetRecords, deaggregated, paced),
//! plus the stream operations `floodgate aws init` and the tests need ([`ensure_stream`],
//! [`split_shard`], [`merge_shards`], [`update_shard_count`]).
//!
//! # Writing
//!
//! An append routes each event to the open shard whose hash-key range holds the MD5 of its
//! partition key (the shard map comes from ListShards, cached and refreshed), and queues it
//! on that shard. Queued events leave in *units*: with aggregation, one KPL aggregated
//! record per shard (at most [`MAX_RECORD_BYTES`] with its partition key, with an
//! `ExplicitHashKey` inside the shard's range, so it lands there); without, one Kinesis
//! record per event, at most one per partition key. Units of several shards share one
//! PutRecords call (at most [`MAX_PUT_RECORDS_ENTRIES`] records and
//! [`MAX_PUT_RECORDS_BYTES`]).
//!
//! Per-key order under retries rests on three rules:
//! - a shard's queue is in append order, and a unit is a prefix of it;
//! - at most one unit is in flight per hash-key range (a range is held from the call until
//!   its failed records are back at the front of their queue and the backoff has passed);
//! - a unit holds a key at most once unless it is aggregated (an aggregated record is
//!   written or not as a whole).
//!
//! So a key's later event is never written before its earlier one, even when PutRecords
//! fails some records and not others. An event is `Ok` only once Kinesis returned a
//! sequence number for its record; otherwise, once the append's deadline
//! ([`KinesisWriterConfig::deadline`]) passes, it is `Busy` (throttled) or `Unavailable`.
//! The SDK's own retries are off for PutRecords, so every fault reaches this logic.
//!
//! Resharding: when Kinesis answers with a different shard than the map predicted, the map
//! was stale, and is refreshed. An aggregated record sent with a stale map can land in a
//! child shard whose range does not hold all of its events (after a split); those events
//! are sent again to the right shard before anything later of their keys, and readers
//! (this one, like the KCL) skip the misplaced copies: an aggregated event whose hash key
//! is outside the shard it is read from is not that shard's.
//!
//! # Reading
//!
//! A read keeps the shard iterator per shard and position, so reading on from the `next`
//! of the previous read costs one GetRecords and no GetShardIterator (both are limited per
//! shard). GetRecords is paced to [`MIN_GET_RECORDS_INTERVAL`] per shard. Sequence numbers
//! are composites (`crate::seq`): the Kinesis sequence number and the event's subsequence
//! within its aggregate, so a position inside an aggregated record resumes exactly after
//! the event it names. A read returns at most `max_records` events and keeps the rest of
//! the GetRecords response for the read that continues from its `next` (`After` the last
//! event handed out); a read from any other position starts afresh from that position, so
//! nothing is lost or repeated either way. An expired iterator is renewed from the last
//! position handed out.
//!
//! `millis_behind` is `MillisBehindLatest`. `records_behind` is 0 when that is 0 (caught
//! up); otherwise it is the events still buffered plus an estimate of what lies beyond:
//! the arrival rate of the last response (events per millisecond of arrival time) times
//! `MillisBehindLatest`, at least 1.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{
    PutRecordsRequestEntry, ScalingType, Shard, ShardIteratorType, StreamStatus,
};
use bytes::Bytes;
use floodgate_core::partition::hash_key;
use floodgate_core::stream::{
    AppendError, Appended, Record, ShardId, ShardInfo, StartPosition, StoredRecord, StreamError,
    StreamReader, StreamWriter,
};
use tokio::time::Instant;

use crate::client::describe;
use crate::kpl::{self, Aggregator};
use crate::seq;

/// A Kinesis record's data plus its partition key, at most.
/// <https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html>
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Records in one PutRecords call, at most.
/// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecords.html>
pub const MAX_PUT_RECORDS_ENTRIES: usize = 500;
/// Bytes in one PutRecords call (data and partition keys), at most.
/// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecords.html>
pub const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;
/// Characters of a partition key, at most (and at least 1).
/// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecordsRequestEntry.html>
pub const MAX_PARTITION_KEY_CHARS: usize = 256;
/// GetRecords takes at most 5 calls per second per shard.
/// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html>
pub const MIN_GET_RECORDS_INTERVAL: Duration = Duration::from_millis(200);
/// GetShardIterator takes at most 5 calls per second per shard.
/// <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetShardIterator.html>
pub const MIN_GET_SHARD_ITERATOR_INTERVAL: Duration = Duration::from_millis(200);
/// Records one GetRecords call returns, at most.
pub const MAX_GET_RECORDS_LIMIT: usize = 10_000;
/// What a throttled event tells its producer to wait.
pub const BUSY_RETRY_AFTER_MS: u64 = 1000;
/// How long the stream operations wait for a stream to become ACTIVE (creating a stream on
/// AWS takes tens of seconds; a reshard, longer on large streams).
pub const ACTIVE_WAIT: Duration = Duration::from_secs(300);

/// Errors of the stream operations (creating, resharding).
#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    #[error("kinesis {operation} on stream {stream} failed: {detail}")]
    Call {
        operation: &'static str,
        stream: String,
        detail: String,
    },
    #[error("kinesis stream {stream} is not ACTIVE after {waited_ms} ms (status {status})")]
    NotActive {
        stream: String,
        status: String,
        waited_ms: u64,
    },
    #[error("kinesis stream {stream}: {detail}")]
    Invalid { stream: String, detail: String },
}

fn call_error<E, R>(operation: &'static str, stream: &str, err: &SdkError<E, R>) -> KinesisError
where
    E: ProvideErrorMetadata + std::error::Error,
    R: fmt::Debug,
{
    KinesisError::Call {
        operation,
        stream: stream.to_owned(),
        detail: describe(err),
    }
}

fn error_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}

/// What [`ensure_stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Exists,
}

impl fmt::Display for Ensured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ensured::Created => "created",
            Ensured::Exists => "exists",
        })
    }
}

/// The stream's status, from DescribeStreamSummary.
async fn stream_status(client: &Client, stream: &str) -> Result<StreamStatus, KinesisError> {
    let out = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| call_error("DescribeStreamSummary", stream, &e))?;
    out.stream_description_summary()
        .map(|s| s.stream_status().clone())
        .ok_or_else(|| KinesisError::Invalid {
            stream: stream.to_owned(),
            detail: "DescribeStreamSummary answered without a summary".to_owned(),
        })
}

/// Waits until `stream` is ACTIVE, polling DescribeStreamSummary, for at most `wait`.
pub async fn wait_active(
    client: &Client,
    stream: &str,
    wait: Duration,
) -> Result<(), KinesisError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let status = stream_status(client, stream).await?;
        if status == StreamStatus::Active {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(KinesisError::NotActive {
                stream: stream.to_owned(),
                status: status.as_str().to_owned(),
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Creates `stream` with `shards` shards unless it exists, then waits (up to
/// [`ACTIVE_WAIT`]) until it is ACTIVE. An existing stream keeps its own shard count.
pub async fn ensure_stream(
    client: &Client,
    stream: &str,
    shards: u32,
) -> Result<Ensured, KinesisError> {
    let ensured = match client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
    {
        Ok(_) => Ensured::Exists,
        Err(e) if error_code(&e) == Some("ResourceNotFoundException") => {
            let shard_count = i32::try_from(shards).map_err(|_| KinesisError::Invalid {
                stream: stream.to_owned(),
                detail: format!("{shards} shards is more than Kinesis takes"),
            })?;
            match client
                .create_stream()
                .stream_name(stream)
                .shard_count(shard_count)
                .send()
                .await
            {
                Ok(_) => Ensured::Created,
                // Created meanwhile by another `aws init`.
                Err(e) if error_code(&e) == Some("ResourceInUseException") => Ensured::Exists,
                Err(e) => return Err(call_error("CreateStream", stream, &e)),
            }
        }
        Err(e) => return Err(call_error("DescribeStreamSummary", stream, &e)),
    };
    wait_active(client, stream, ACTIVE_WAIT).await?;
    Ok(ensured)
}

/// Every shard of `stream` (ListShards, all pages), open and closed, as Kinesis lists them.
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<Shard>, KinesisError> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // A page after the first names only its token: ListShards refuses both.
        let request = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let out = request
            .send()
            .await
            .map_err(|e| call_error("ListShards", stream, &e))?;
        shards.extend(out.shards().iter().cloned());
        match out.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(shards),
        }
    }
}

/// A shard's hash-key range, inclusive.
fn hash_range(shard: &Shard) -> Option<(u128, u128)> {
    let range = shard.hash_key_range()?;
    Some((
        range.starting_hash_key().parse().ok()?,
        range.ending_hash_key().parse().ok()?,
    ))
}

fn is_open(shard: &Shard) -> bool {
    shard
        .sequence_number_range()
        .is_none_or(|r| r.ending_sequence_number().is_none())
}

async fn find_shard(client: &Client, stream: &str, id: &str) -> Result<(u128, u128), KinesisError> {
    list_shards(client, stream)
        .await?
        .iter()
        .find(|s| s.shard_id() == id && is_open(s))
        .and_then(hash_range)
        .ok_or_else(|| KinesisError::Invalid {
            stream: stream.to_owned(),
            detail: format!("no open shard {id}"),
        })
}

/// Splits open shard `shard` in two at the middle of its hash-key range and waits until
/// the stream is ACTIVE again.
pub async fn split_shard(client: &Client, stream: &str, shard: &str) -> Result<(), KinesisError> {
    let (lo, hi) = find_shard(client, stream, shard).await?;
    // The upper child starts here; SplitShard wants it above lo + 1 and below hi.
    let middle = lo + (hi - lo) / 2 + 1;
    if hi - lo < 3 {
        return Err(KinesisError::Invalid {
            stream: stream.to_owned(),
            detail: format!("shard {shard}'s hash-key range is too small to split"),
        });
    }
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await
        .map_err(|e| call_error("SplitShard", stream, &e))?;
    wait_active(client, stream, ACTIVE_WAIT).await
}

/// Merges two open shards with adjacent hash-key ranges (in either order) and waits until
/// the stream is ACTIVE again.
pub async fn merge_shards(
    client: &Client,
    stream: &str,
    a: &str,
    b: &str,
) -> Result<(), KinesisError> {
    let ra = find_shard(client, stream, a).await?;
    let rb = find_shard(client, stream, b).await?;
    // MergeShards wants the lower range first.
    let ((low, lr), (high, hr)) = if ra.0 <= rb.0 {
        ((a, ra), (b, rb))
    } else {
        ((b, rb), (a, ra))
    };
    if lr.1.checked_add(1) != Some(hr.0) {
        return Err(KinesisError::Invalid {
            stream: stream.to_owned(),
            detail: format!("shards {low} and {high} are not adjacent"),
        });
    }
    client
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(low)
        .adjacent_shard_to_merge(high)
        .send()
        .await
        .map_err(|e| call_error("MergeShards", stream, &e))?;
    wait_active(client, stream, ACTIVE_WAIT).await
}

/// Resizes the stream to `shards` open shards (UNIFORM_SCALING) and waits until it is
/// ACTIVE again. (kinesalite does not implement UpdateShardCount.)
pub async fn update_shard_count(
    client: &Client,
    stream: &str,
    shards: u32,
) -> Result<(), KinesisError> {
    let target = i32::try_from(shards).map_err(|_| KinesisError::Invalid {
        stream: stream.to_owned(),
        detail: format!("{shards} shards is more than Kinesis takes"),
    })?;
    client
        .update_shard_count()
        .stream_name(stream)
        .target_shard_count(target)
        .scaling_type(ScalingType::UniformScaling)
        .send()
        .await
        .map_err(|e| call_error("UpdateShardCount", stream, &e))?;
    wait_active(client, stream, ACTIVE_WAIT).await
}

/// Logs at most once per second per limiter, so a sustained fault does not flood the log.
#[derive(Debug, Default)]
struct LogLimiter {
    last_ms: AtomicU64,
}

impl LogLimiter {
    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

// ---------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------

/// How a [`KinesisWriter`] writes.
#[derive(Debug, Clone)]
pub struct KinesisWriterConfig {
    pub stream_name: String,
    /// KPL-format aggregation of a shard's events into one Kinesis record.
    pub aggregation: bool,
    /// How long one append may take, retries included. Below the edge's request timeout,
    /// so the edge answers every event itself.
    pub deadline: Duration,
    /// How long one PutRecords attempt may take before it counts as failed (and is tried
    /// again, within the deadline).
    pub attempt_timeout: Duration,
    /// The first retry's backoff; it doubles per consecutive failure of a shard, up to
    /// `backoff_max`, and each wait is jittered to between half and all of it.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How old the shard map may get before an append refreshes it. (A put that lands in
    /// another shard than predicted refreshes it at once.)
    pub shard_refresh: Duration,
    /// An aggregated record's size limit, partition key included (at most
    /// [`MAX_RECORD_BYTES`]).
    pub max_aggregate_bytes: usize,
}

impl KinesisWriterConfig {
    pub fn new(stream_name: impl Into<String>, aggregation: bool) -> Self {
        Self {
            stream_name: stream_name.into(),
            aggregation,
            deadline: Duration::from_secs(2),
            attempt_timeout: Duration::from_millis(1000),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            shard_refresh: Duration::from_secs(60),
            max_aggregate_bytes: MAX_RECORD_BYTES,
        }
    }
}

impl From<&floodgate_core::config::KinesisStreamConfig> for KinesisWriterConfig {
    fn from(c: &floodgate_core::config::KinesisStreamConfig) -> Self {
        Self::new(c.stream_name.clone(), c.aggregation)
    }
}

/// Counters of what a [`KinesisWriter`] sent, for measurement and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// PutRecords calls made (answered or not).
    pub put_records_calls: u64,
    /// Kinesis records sent, over all calls (retries included).
    pub records_sent: u64,
    /// Kinesis records Kinesis accepted.
    pub records_accepted: u64,
    /// Events acknowledged (`Ok`).
    pub events_acked: u64,
    /// Accepted aggregated records, the events in them, and their bytes (data and key).
    pub aggregates_accepted: u64,
    pub aggregated_events: u64,
    pub aggregate_bytes: u64,
    /// The largest accepted aggregated record (data and key).
    pub max_aggregate_bytes: u64,
    /// Records that failed, one by one or with their whole call.
    pub records_failed: u64,
    /// Events an aggregated record took to the wrong shard (a stale shard map), sent again.
    pub events_misplaced: u64,
    /// Shard-map refreshes.
    pub shard_refreshes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    put_records_calls: AtomicU64,
    records_sent: AtomicU64,
    records_accepted: AtomicU64,
    events_acked: AtomicU64,
    aggregates_accepted: AtomicU64,
    aggregated_events: AtomicU64,
    aggregate_bytes: AtomicU64,
    max_aggregate_bytes: AtomicU64,
    records_failed: AtomicU64,
    events_misplaced: AtomicU64,
    shard_refreshes: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The outcome slots of one append call, shared by the call and the units carrying its
/// events.
#[derive(Debug)]
struct Call {
    slots: Mutex<Vec<Slot>>,
    remaining: AtomicUsize,
    /// The call has answered (its deadline passed): its events still queued are dropped.
    abandoned: AtomicBool,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Clone)]
enum Slot {
    /// Not appended yet; the last failed attempt's error, if any.
    Waiting(Option<AppendError>),
    Done(Result<Appended, AppendError>),
}

impl Call {
    fn new(n: usize) -> Self {
        Self {
            slots: Mutex::new(vec![Slot::Waiting(None); n]),
            remaining: AtomicUsize::new(n),
            abandoned: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn resolve(&self, index: usize, outcome: Result<Appended, AppendError>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(slots[index], Slot::Done(_)) {
            return;
        }
        slots[index] = Slot::Done(outcome);
        drop(slots);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    fn failed_attempt(&self, index: usize, err: &AppendError) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Slot::Waiting(last) = &mut slots[index] {
            *last = Some(err.clone());
        }
    }

    /// The outcomes, turning what is still waiting into its last error (or `Busy`).
    fn finish(&self) -> Vec<Result<Appended, AppendError>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.abandoned.store(true, Ordering::Release);
        slots
            .iter()
            .map(|s| match s {
                Slot::Done(r) => r.clone(),
                Slot::Waiting(Some(e)) => Err(e.clone()),
                Slot::Waiting(None) => Err(AppendError::Busy {
                    retry_after_ms: BUSY_RETRY_AFTER_MS,
                }),
            })
            .collect()
    }
}

/// An event waiting in a shard's queue (or in flight).
#[derive(Debug)]
struct Pending {
    call: Arc<Call>,
    index: usize,
    /// Order of arrival over the whole writer; a queue is sorted by it.
    arrival: u64,
    key: String,
    hash: u128,
    payload: Bytes,
}

impl Pending {
    fn abandoned(&self) -> bool {
        self.call.abandoned.load(Ordering::Acquire)
    }
    fn bytes(&self) -> usize {
        self.key.len() + self.payload.len()
    }
}

/// The open shards, by hash-key range.
#[derive(Debug)]
struct Routing {
    /// Sorted by range start; ranges are disjoint.
    open: Vec<(u128, u128, ShardId)>,
    fetched: Instant,
}

impl Routing {
    fn from_shards(shards: &[Shard]) -> Self {
        let mut open: Vec<(u128, u128, ShardId)> = shards
            .iter()
            .filter(|s| is_open(s))
            .filter_map(|s| {
                let (lo, hi) = hash_range(s)?;
                Some((lo, hi, ShardId(s.shard_id().to_owned())))
            })
            .collect();
        open.sort();
        Self {
            open,
            fetched: Instant::now(),
        }
    }

    fn find(&self, hash: u128) -> Option<&(u128, u128, ShardId)> {
        let i = self.open.partition_point(|(lo, _, _)| *lo <= hash);
        let candidate = self.open.get(i.checked_sub(1)?)?;
        (candidate.1 >= hash).then_some(candidate)
    }

    fn range_of(&self, shard: &ShardId) -> Option<(u128, u128)> {
        self.open
            .iter()
            .find(|(_, _, id)| id == shard)
            .map(|(lo, hi, _)| (*lo, *hi))
    }
}

#[derive(Debug, Default)]
struct State {
    routing: Option<Arc<Routing>>,
    queues: HashMap<ShardId, VecDeque<Pending>>,
    /// Hash-key ranges with a unit in flight (or backing off), by hold id.
    holds: HashMap<u64, (u128, u128)>,
    next_hold: u64,
    next_arrival: u64,
    /// Consecutive failed attempts per shard, for the backoff.
    failures: HashMap<ShardId, u32>,
    closed: bool,
}

impl State {
    fn held(&self, lo: u128, hi: u128) -> bool {
        self.holds.values().any(|&(a, b)| a <= hi && lo <= b)
    }

    /// Puts `events` back in their shards' queues (by the current map), in arrival order:
    /// they are older than what was queued behind them. Abandoned events are dropped.
    /// Events no open shard takes fail.
    fn requeue(&mut self, events: Vec<Pending>) {
        let mut by_shard: HashMap<ShardId, Vec<Pending>> = HashMap::new();
        for p in events {
            if p.abandoned() {
                continue;
            }
            match self.routing.as_ref().and_then(|r| r.find(p.hash)) {
                Some((_, _, shard)) => by_shard.entry(shard.clone()).or_default().push(p),
                None => p.call.resolve(
                    p.index,
                    Err(AppendError::Unavailable(
                        "no open kinesis shard takes the event's hash key".to_owned(),
                    )),
                ),
            }
        }
        for (shard, mut events) in by_shard {
            let queue = self.queues.entry(shard).or_default();
            events.sort_by_key(|p| p.arrival);
            if queue
                .front()
                .is_none_or(|f| events.last().is_some_and(|l| l.arrival < f.arrival))
            {
                for p in events.into_iter().rev() {
                    queue.push_front(p);
                }
            } else {
                let mut all: Vec<Pending> = queue.drain(..).chain(events).collect();
                all.sort_by_key(|p| p.arrival);
                queue.extend(all);
            }
        }
    }

    /// Installs a new shard map; the queues of shards it no longer lists as open move, by
    /// hash key, to the shards that now hold their ranges.
    fn install(&mut self, routing: Routing) {
        let routing = Arc::new(routing);
        let open: HashSet<&ShardId> = routing.open.iter().map(|(_, _, id)| id).collect();
        let orphans: Vec<ShardId> = self
            .queues
            .keys()
            .filter(|s| !open.contains(s))
            .cloned()
            .collect();
        self.routing = Some(routing.clone());
        for shard in orphans {
            if let Some(queue) = self.queues.remove(&shard) {
                self.requeue(queue.into());
            }
        }
        self.failures.retain(|s, _| routing.range_of(s).is_some());
    }
}

/// One shard's share of a PutRecords call.
#[derive(Debug)]
struct Unit {
    shard: ShardId,
    range: (u128, u128),
    hold: u64,
    events: Vec<Pending>,
    /// One aggregated record of all `events`; else one record per event.
    aggregate: Option<Aggregator>,
}

impl Unit {
    fn entries(&self) -> usize {
        if self.aggregate.is_some() {
            1
        } else {
            self.events.len()
        }
    }
}

/// Takes from `queue` the next unit's events: with aggregation, as many as one aggregated
/// record of at most `max_aggregate` bytes holds (a lone event goes plain); without, a
/// prefix holding each key once. `room` is what is left of the call (records, bytes).
fn take_unit(
    queue: &mut VecDeque<Pending>,
    aggregation: bool,
    max_aggregate: usize,
    room: (usize, usize),
) -> Option<(Vec<Pending>, Option<Aggregator>)> {
    while queue.front().is_some_and(Pending::abandoned) {
        queue.pop_front();
    }
    let first = queue.front()?;
    let (room_records, room_bytes) = room;
    if room_records == 0 || first.bytes() > room_bytes {
        return None;
    }
    if aggregation {
        let mut agg = Aggregator::new();
        let mut taken = Vec::new();
        while let Some(p) = queue.front() {
            if p.abandoned() {
                queue.pop_front();
                continue;
            }
            let len = agg.record_len_with(&p.key, p.payload.len());
            if len > max_aggregate.min(room_bytes) {
                break;
            }
            agg.add(&p.key, p.payload.clone());
            taken.extend(queue.pop_front());
        }
        match taken.len() {
            // Too big to aggregate (or to share this call): the first event alone, plain.
            0 => Some((queue.pop_front().into_iter().collect(), None)),
            1 => Some((taken, None)),
            _ => Some((taken, Some(agg))),
        }
    } else {
        let mut keys = HashSet::new();
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Some(p) = queue.front() {
            if p.abandoned() {
                queue.pop_front();
                continue;
            }
            if taken.len() == room_records
                || bytes + p.bytes() > room_bytes
                || !keys.insert(p.key.clone())
            {
                break;
            }
            bytes += p.bytes();
            taken.extend(queue.pop_front());
        }
        Some((taken, None))
    }
}

/// The PutRecords calls to make now: a unit for every shard with queued events whose
/// range is not held, packed into calls within the PutRecords limits.
fn take_calls(state: &mut State, config: &KinesisWriterConfig) -> Vec<Vec<Unit>> {
    let Some(routing) = state.routing.clone() else {
        return Vec::new();
    };
    // Oldest waiting event first, so no shard starves.
    let mut ready: Vec<(u64, ShardId, (u128, u128))> = state
        .queues
        .iter()
        .filter_map(|(shard, q)| {
            let front = q.front()?;
            let range = routing.range_of(shard)?;
            Some((front.arrival, shard.clone(), range))
        })
        .collect();
    ready.sort();
    let mut calls: Vec<Vec<Unit>> = Vec::new();
    let mut current: Vec<Unit> = Vec::new();
    let (mut records, mut bytes) = (0usize, 0usize);
    for (_, shard, (lo, hi)) in ready {
        if state.held(lo, hi) {
            continue;
        }
        let Some(queue) = state.queues.get_mut(&shard) else {
            continue;
        };
        let mut taken = take_unit(
            queue,
            config.aggregation,
            config.max_aggregate_bytes,
            (
                MAX_PUT_RECORDS_ENTRIES - records,
                MAX_PUT_RECORDS_BYTES - bytes,
            ),
        );
        if taken.is_none() && !current.is_empty() {
            // No room left in this call: start another.
            calls.push(std::mem::take(&mut current));
            (records, bytes) = (0, 0);
            taken = take_unit(
                queue,
                config.aggregation,
                config.max_aggregate_bytes,
                (MAX_PUT_RECORDS_ENTRIES, MAX_PUT_RECORDS_BYTES),
            );
        }
        let Some((events, aggregate)) = taken else {
            continue;
        };
        if events.is_empty() {
            continue;
        }
        let hold = state.next_hold;
        state.next_hold += 1;
        state.holds.insert(hold, (lo, hi));
        let unit = Unit {
            shard,
            range: (lo, hi),
            hold,
            events,
            aggregate,
        };
        records += unit.entries();
        bytes += match &unit.aggregate {
            Some(a) => a.data_len() + a.partition_key().map_or(0, str::len),
            None => unit.events.iter().map(Pending::bytes).sum(),
        };
        current.push(unit);
    }
    if !current.is_empty() {
        calls.push(current);
    }
    state.queues.retain(|_, q| !q.is_empty());
    calls
}

/// Kinesis' answer for one record: where it landed and its sequence number, or why not.
type RecordAnswer = Result<(ShardId, String), Failure>;

/// How a failed PutRecords attempt failed.
#[derive(Debug, Clone)]
enum Failure {
    /// Throttled or failed inside the service: try again after a backoff.
    Retry(AppendError),
    /// A fault no retry fixes (the stream is gone, a request Kinesis rejects).
    Fatal(AppendError),
}

fn classify_call_error(err: &SdkError<PutRecordsError, HttpResponse>) -> Failure {
    let detail = describe(err);
    match err {
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            match e.err().code() {
                Some(
                    "ProvisionedThroughputExceededException"
                    | "ThrottlingException"
                    | "LimitExceededException"
                    | "KMSThrottlingException"
                    | "RequestLimitExceeded",
                ) => Failure::Retry(AppendError::Busy {
                    retry_after_ms: BUSY_RETRY_AFTER_MS,
                }),
                _ if status >= 500 => Failure::Retry(AppendError::Unavailable(format!(
                    "kinesis PutRecords: {detail}"
                ))),
                Some("InternalFailure" | "InternalFailureException" | "ServiceUnavailable") => {
                    Failure::Retry(AppendError::Unavailable(format!(
                        "kinesis PutRecords: {detail}"
                    )))
                }
                _ => Failure::Fatal(AppendError::Unavailable(format!(
                    "kinesis PutRecords: {detail}"
                ))),
            }
        }
        // Timeouts, refused or reset connections, unreadable answers: the call may or may
        // not have been applied; sending again at worst duplicates.
        _ => Failure::Retry(AppendError::Unavailable(format!(
            "kinesis PutRecords: {detail}"
        ))),
    }
}

fn record_failure(code: &str, message: Option<&str>) -> AppendError {
    let detail = format!("{code}: {}", message.unwrap_or(""));
    match code {
        "ProvisionedThroughputExceededException" | "KMSThrottlingException" => AppendError::Busy {
            retry_after_ms: BUSY_RETRY_AFTER_MS,
        },
        _ => AppendError::Unavailable(format!("kinesis PutRecords record: {detail}")),
    }
}

#[derive(Debug)]
struct WriterInner {
    client: Client,
    config: KinesisWriterConfig,
    state: Mutex<State>,
    /// One shard-map refresh at a time.
    refresh: tokio::sync::Mutex<()>,
    /// Signalled whenever a call finishes (for `close`).
    idle: tokio::sync::Notify,
    counters: Counters,
    log_failures: LogLimiter,
}

/// The edge's [`StreamWriter`] on Kinesis Data Streams. See the module documentation.
#[derive(Debug, Clone)]
pub struct KinesisWriter {
    inner: Arc<WriterInner>,
}

impl KinesisWriter {
    pub fn new(client: Client, config: KinesisWriterConfig) -> Self {
        let mut config = config;
        config.max_aggregate_bytes = config.max_aggregate_bytes.min(MAX_RECORD_BYTES);
        Self {
            inner: Arc::new(WriterInner {
                client,
                config,
                state: Mutex::new(State::default()),
                refresh: tokio::sync::Mutex::new(()),
                idle: tokio::sync::Notify::new(),
                counters: Counters::default(),
                log_failures: LogLimiter::default(),
            }),
        }
    }

    /// What this writer has sent so far.
    pub fn stats(&self) -> WriterStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStats {
            put_records_calls: get(&c.put_records_calls),
            records_sent: get(&c.records_sent),
            records_accepted: get(&c.records_accepted),
            events_acked: get(&c.events_acked),
            aggregates_accepted: get(&c.aggregates_accepted),
            aggregated_events: get(&c.aggregated_events),
            aggregate_bytes: get(&c.aggregate_bytes),
            max_aggregate_bytes: get(&c.max_aggregate_bytes),
            records_failed: get(&c.records_failed),
            events_misplaced: get(&c.events_misplaced),
            shard_refreshes: get(&c.shard_refreshes),
        }
    }
}

/// Why a record can never be appended, if so.
fn refuse(record: &Record) -> Option<String> {
    let chars = record.key.chars().count();
    if chars == 0 {
        return Some("the partition key is empty".to_owned());
    }
    if chars > MAX_PARTITION_KEY_CHARS {
        return Some(format!(
            "the partition key has {chars} characters; kinesis takes at most {MAX_PARTITION_KEY_CHARS}"
        ));
    }
    let bytes = record.key.len() + record.payload.len();
    if bytes > MAX_RECORD_BYTES {
        return Some(format!(
            "the record is {bytes} bytes with its partition key; kinesis takes at most {MAX_RECORD_BYTES}"
        ));
    }
    None
}

impl WriterInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refreshes the shard map unless `fresh` says the current one will do (checked again
    /// once this task's turn comes, so concurrent callers list once).
    async fn refresh_routing(&self, fresh: impl Fn(&Routing) -> bool) -> Result<(), String> {
        let _turn = self.refresh.lock().await;
        if self.lock().routing.as_deref().is_some_and(&fresh) {
            return Ok(());
        }
        let shards = list_shards(&self.client, &self.config.stream_name)
            .await
            .map_err(|e| e.to_string())?;
        let routing = Routing::from_shards(&shards);
        if routing.open.is_empty() {
            return Err(format!(
                "kinesis stream {} lists no open shard",
                self.config.stream_name
            ));
        }
        add(&self.counters.shard_refreshes, 1);
        self.lock().install(routing);
        Ok(())
    }

    /// Starts the PutRecords calls that can go now.
    fn kick(self: &Arc<Self>) {
        let calls = take_calls(&mut self.lock(), &self.config);
        for units in calls {
            let inner = self.clone();
            tokio::spawn(async move { inner.put(units).await });
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let full = exp.min(self.config.backoff_max);
        // Jitter to between half and all of it, so writers throttled together do not
        // come back together.
        let jitter = getrandom::u64().unwrap_or(0) % 1000;
        full / 2 + full / 2 * (jitter as u32) / 1000
    }

    /// Makes one PutRecords call of `units`, then settles every event: acknowledged,
    /// failed for good, or back at the front of its queue.
    async fn put(self: Arc<Self>, units: Vec<Unit>) {
        let mut units = units;
        let (entries, spans) = request_entries(&mut units);
        let entry_bytes: Vec<u64> = entries
            .iter()
            .map(|e| (e.data().as_ref().len() + e.partition_key().map_or(0, str::len)) as u64)
            .collect();
        let sent = entries.len();
        add(&self.counters.put_records_calls, 1);
        add(&self.counters.records_sent, sent as u64);
        let overrides = aws_sdk_kinesis::config::Builder::default()
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.config.attempt_timeout.min(Duration::from_secs(3)))
                    .operation_attempt_timeout(self.config.attempt_timeout)
                    .operation_timeout(self.config.attempt_timeout)
                    .build(),
            );
        let result = self
            .client
            .put_records()
            .stream_name(&self.config.stream_name)
            .set_records(Some(entries))
            .customize()
            .config_override(overrides)
            .send()
            .await;

        let answers = answers(&result, sent);
        let outcome = match &answers {
            Ok(a) if a.iter().all(Result::is_ok) => "ok",
            Ok(_) => "partial",
            Err(Failure::Retry(AppendError::Busy { .. })) => "throttled",
            Err(_) => "error",
        };
        metrics::counter!("floodgate_kinesis_put_records_calls_total", "outcome" => outcome)
            .increment(1);
        if outcome != "ok" && self.log_failures.allow() {
            let detail = match &answers {
                Err(Failure::Retry(e) | Failure::Fatal(e)) => e.to_string(),
                Ok(a) => {
                    let failed = a.iter().filter(|r| r.is_err()).count();
                    format!("{failed} of {sent} records failed")
                }
            };
            let retrying = !matches!(answers, Err(Failure::Fatal(_)));
            tracing::warn!(
                stream = %self.config.stream_name,
                %detail,
                retrying,
                "kinesis PutRecords failed"
            );
        }

        // A record that landed in another shard than predicted: the map is stale.
        let landed: HashSet<ShardId> = match &answers {
            Ok(a) => a
                .iter()
                .filter_map(|r| r.as_ref().ok().map(|(s, _)| s.clone()))
                .collect(),
            Err(_) => HashSet::new(),
        };
        let stale = units
            .iter()
            .zip(&spans)
            .any(|(u, &(start, end, _))| match &answers {
                Ok(a) => a[start..end]
                    .iter()
                    .any(|r| r.as_ref().is_ok_and(|(s, _)| *s != u.shard)),
                Err(_) => false,
            });
        if stale {
            let landed = landed.clone();
            if let Err(e) = self
                .refresh_routing(|r| landed.iter().all(|s| r.range_of(s).is_some()))
                .await
            {
                tracing::warn!(
                    stream = %self.config.stream_name,
                    error = %e,
                    "cannot refresh the kinesis shard map"
                );
            }
        }

        let mut retry_after: Option<Duration> = None;
        let mut released = Vec::new();
        let mut kept = Vec::new();
        {
            let mut state = self.lock();
            let routing = state.routing.clone();
            for (unit, &(start, end, aggregated)) in units.into_iter().zip(&spans) {
                let mut requeue = Vec::new();
                let mut failed = false;
                match &answers {
                    Err(Failure::Fatal(e)) => {
                        add(&self.counters.records_failed, (end - start) as u64);
                        for p in unit.events {
                            p.call.resolve(p.index, Err(e.clone()));
                        }
                    }
                    Err(Failure::Retry(e)) => {
                        add(&self.counters.records_failed, (end - start) as u64);
                        failed = true;
                        for p in &unit.events {
                            p.call.failed_attempt(p.index, e);
                        }
                        requeue = unit.events;
                    }
                    Ok(a) if aggregated => match &a[start] {
                        Ok((shard, kseq)) => {
                            add(&self.counters.records_accepted, 1);
                            add(&self.counters.aggregates_accepted, 1);
                            add(&self.counters.aggregate_bytes, entry_bytes[start]);
                            self.counters
                                .max_aggregate_bytes
                                .fetch_max(entry_bytes[start], Ordering::Relaxed);
                            // Events whose hash is not in the shard they landed in were
                            // misplaced by a stale map: send them again. If the shard's
                            // range is unknown, all of them (a duplicate at worst).
                            let range = if *shard == unit.shard {
                                Some(unit.range)
                            } else {
                                routing.as_ref().and_then(|r| r.range_of(shard))
                            };
                            let mut acked = 0;
                            for (sub, p) in unit.events.into_iter().enumerate() {
                                let inside =
                                    range.is_some_and(|(lo, hi)| lo <= p.hash && p.hash <= hi);
                                if inside {
                                    acked += 1;
                                    p.call.resolve(p.index, appended(shard, kseq, sub as u64));
                                } else {
                                    add(&self.counters.events_misplaced, 1);
                                    requeue.push(p);
                                }
                            }
                            add(&self.counters.aggregated_events, acked);
                            add(&self.counters.events_acked, acked);
                        }
                        Err(Failure::Retry(e) | Failure::Fatal(e)) => {
                            add(&self.counters.records_failed, 1);
                            failed = true;
                            for p in &unit.events {
                                p.call.failed_attempt(p.index, e);
                            }
                            requeue = unit.events;
                        }
                    },
                    Ok(a) => {
                        for (p, answer) in unit.events.into_iter().zip(&a[start..end]) {
                            match answer {
                                Ok((shard, kseq)) => {
                                    add(&self.counters.records_accepted, 1);
                                    add(&self.counters.events_acked, 1);
                                    p.call.resolve(p.index, appended(shard, kseq, 0));
                                }
                                Err(Failure::Retry(e) | Failure::Fatal(e)) => {
                                    add(&self.counters.records_failed, 1);
                                    failed = true;
                                    p.call.failed_attempt(p.index, e);
                                    requeue.push(p);
                                }
                            }
                        }
                    }
                }
                state.requeue(requeue);
                if failed {
                    let n = state.failures.entry(unit.shard.clone()).or_insert(0);
                    *n += 1;
                    let wait = self.backoff(*n);
                    retry_after = Some(retry_after.map_or(wait, |w| w.max(wait)));
                    kept.push(unit.hold);
                } else {
                    state.failures.remove(&unit.shard);
                    released.push(unit.hold);
                }
            }
            for hold in released {
                state.holds.remove(&hold);
            }
        }
        self.kick();
        if let Some(wait) = retry_after {
            // The failed units' ranges stay held through the backoff, so nothing of their
            // keys overtakes the records going back out.
            tokio::time::sleep(wait).await;
            let mut state = self.lock();
            for hold in kept {
                state.holds.remove(&hold);
            }
            drop(state);
            self.kick();
        }
        self.idle.notify_waiters();
    }
}

/// The PutRecords entries of `units` (their aggregates are encoded and taken), and per
/// unit the span of its entries and whether it is one aggregated record.
fn request_entries(units: &mut [Unit]) -> (Vec<PutRecordsRequestEntry>, Vec<(usize, usize, bool)>) {
    let mut entries = Vec::new();
    let mut spans = Vec::new();
    for unit in units.iter_mut() {
        let start = entries.len();
        let aggregated = unit.aggregate.is_some();
        match unit.aggregate.take() {
            Some(agg) => {
                let key = agg.partition_key().unwrap_or_default().to_owned();
                // Inside the predicted shard's range: the first event's own hash.
                let hash = unit.events.first().map_or(unit.range.0, |p| p.hash);
                let data = agg.finish();
                entries.push(
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(data.to_vec()))
                        .partition_key(key)
                        .explicit_hash_key(hash.to_string())
                        .build()
                        .expect("data and partition key are set"),
                );
            }
            None => {
                for p in &unit.events {
                    entries.push(
                        PutRecordsRequestEntry::builder()
                            .data(Blob::new(p.payload.to_vec()))
                            .partition_key(p.key.clone())
                            .build()
                            .expect("data and partition key are set"),
                    );
                }
            }
        }
        spans.push((start, entries.len(), aggregated));
    }
    (entries, spans)
}

/// Kinesis' answer for each record of a PutRecords call of `sent` records, or the call's
/// failure.
fn answers(
    result: &Result<PutRecordsOutput, SdkError<PutRecordsError, HttpResponse>>,
    sent: usize,
) -> Result<Vec<RecordAnswer>, Failure> {
    match result {
        Ok(out) if out.records().len() == sent => Ok(out
            .records()
            .iter()
            .map(
                |r| match (r.error_code(), r.sequence_number(), r.shard_id()) {
                    (Some(code), _, _) => {
                        Err(Failure::Retry(record_failure(code, r.error_message())))
                    }
                    (None, Some(seq), Some(shard)) => {
                        Ok((ShardId(shard.to_owned()), seq.to_owned()))
                    }
                    _ => Err(Failure::Retry(AppendError::Unavailable(
                        "kinesis PutRecords answered a record without a sequence number".to_owned(),
                    ))),
                },
            )
            .collect()),
        Ok(out) => Err(Failure::Retry(AppendError::Unavailable(format!(
            "kinesis PutRecords answered {} records for {sent}",
            out.records().len()
        )))),
        Err(e) => Err(classify_call_error(e)),
    }
}

fn appended(shard: &ShardId, kinesis_seq: &str, sub: u64) -> Result<Appended, AppendError> {
    match seq::compose(kinesis_seq, sub) {
        Some(sequence) => Ok(Appended {
            shard: shard.clone(),
            sequence,
        }),
        None => Err(AppendError::Unavailable(format!(
            "kinesis answered sequence number {kinesis_seq:?}, which is not decimal"
        ))),
    }
}

#[async_trait]
impl StreamWriter for KinesisWriter {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.config.deadline;
        if records.is_empty() {
            return Vec::new();
        }
        let closed = || {
            AppendError::Unavailable(format!(
                "the kinesis writer of stream {} is closed",
                inner.config.stream_name
            ))
        };
        if inner.lock().closed {
            return records.iter().map(|_| Err(closed())).collect();
        }
        let call = Arc::new(Call::new(records.len()));
        let mut accepted = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            match refuse(&r) {
                Some(why) => call.resolve(i, Err(AppendError::Refused(why))),
                None => accepted.push((i, r)),
            }
        }
        if !accepted.is_empty() {
            let max_age = inner.config.shard_refresh;
            let refreshed = inner
                .refresh_routing(|r| r.fetched.elapsed() < max_age)
                .await;
            let mut state = inner.lock();
            match (&refreshed, state.routing.clone()) {
                _ if state.closed => {
                    for (i, _) in accepted {
                        call.resolve(i, Err(closed()));
                    }
                }
                (Err(e), None) => {
                    for (i, _) in accepted {
                        call.resolve(i, Err(AppendError::Unavailable(e.clone())));
                    }
                }
                (Ok(()), None) => {
                    let e = "the kinesis shard map is empty".to_owned();
                    for (i, _) in accepted {
                        call.resolve(i, Err(AppendError::Unavailable(e.clone())));
                    }
                }
                (_, Some(routing)) => {
                    if let Err(e) = &refreshed
                        && inner.log_failures.allow()
                    {
                        tracing::warn!(
                            stream = %inner.config.stream_name,
                            error = %e,
                            "using a stale kinesis shard map"
                        );
                    }
                    for (i, r) in accepted {
                        let hash = hash_key(&r.key);
                        let Some((_, _, shard)) = routing.find(hash) else {
                            call.resolve(
                                i,
                                Err(AppendError::Unavailable(
                                    "no open kinesis shard takes the event's hash key".to_owned(),
                                )),
                            );
                            continue;
                        };
                        let arrival = state.next_arrival;
                        state.next_arrival += 1;
                        state
                            .queues
                            .entry(shard.clone())
                            .or_default()
                            .push_back(Pending {
                                call: call.clone(),
                                index: i,
                                arrival,
                                key: r.key.to_string(),
                                hash,
                                payload: r.payload,
                            });
                    }
                }
            }
            drop(state);
            inner.kick();
        }
        loop {
            let notified = call.wake.notified();
            if call.remaining.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        call.finish()
    }

    async fn check_writable(&self) -> Result<(), StreamError> {
        let name = &self.inner.config.stream_name;
        if self.inner.lock().closed {
            return Err(StreamError::Unavailable(format!(
                "the kinesis writer of stream {name} is closed"
            )));
        }
        match stream_status(&self.inner.client, name).await {
            Ok(StreamStatus::Active | StreamStatus::Updating) => Ok(()),
            Ok(status) => Err(StreamError::Unavailable(format!(
                "kinesis stream {name} is {}",
                status.as_str()
            ))),
            Err(e) => Err(StreamError::Unavailable(e.to_string())),
        }
    }

    async fn close(&self) -> Result<(), StreamError> {
        self.inner.lock().closed = true;
        // Appends already accepted finish (or answer) within their deadline; wait for
        // their calls to settle so nothing is still being sent when close returns.
        let until = Instant::now() + self.inner.config.deadline + self.inner.config.attempt_timeout;
        loop {
            let notified = self.inner.idle.notified();
            {
                let state = self.inner.lock();
                let queued = state.queues.values().flatten().any(|p| !p.abandoned());
                if !queued && state.holds.is_empty() {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(StreamError::Unavailable(format!(
                    "kinesis writer of stream {}: calls still in flight at close",
                    self.inner.config.stream_name
                )));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------

/// How a [`KinesisReader`] reads.
#[derive(Debug, Clone)]
pub struct KinesisReaderConfig {
    pub stream_name: String,
    /// The least time between two GetRecords calls on one shard.
    pub get_records_interval: Duration,
    /// Records one GetRecords call asks for at least (more when a read asks for more, up
    /// to [`MAX_GET_RECORDS_LIMIT`]).
    pub get_records_limit: usize,
    /// Read positions per shard whose iterators are kept (one per consumer reading it).
    pub cursors_per_shard: usize,
}

impl From<&floodgate_core::config::KinesisStreamConfig> for KinesisReaderConfig {
    fn from(c: &floodgate_core::config::KinesisStreamConfig) -> Self {
        Self::new(c.stream_name.clone())
    }
}

impl KinesisReaderConfig {
    pub fn new(stream_name: impl Into<String>) -> Self {
        Self {
            stream_name: stream_name.into(),
            get_records_interval: MIN_GET_RECORDS_INTERVAL,
            get_records_limit: 1000,
            cursors_per_shard: 4,
        }
    }
}

/// Where a cursor's next GetRecords reads from.
#[derive(Debug, Clone)]
enum Iter {
    /// No iterator yet (or it expired): get one for the cursor's position.
    None,
    At(String),
    /// The shard is closed and read to its end.
    Ended,
}

/// A read position with its shard iterator and what the last GetRecords returned beyond
/// what was handed out.
#[derive(Debug)]
struct Cursor {
    /// The position the last read handed out as `next` (or the one asked for).
    at: StartPosition,
    iter: Iter,
    buffered: VecDeque<StoredRecord>,
    millis_behind: Option<u64>,
    /// Events per millisecond of arrival time in the last non-empty response, for the
    /// `records_behind` estimate.
    rate_per_ms: f64,
    used: Instant,
}

impl Cursor {
    fn new(at: StartPosition) -> Self {
        Self {
            at,
            iter: Iter::None,
            buffered: VecDeque::new(),
            millis_behind: None,
            rate_per_ms: 1.0,
            used: Instant::now(),
        }
    }

    /// Records after what was handed out: the buffered ones, plus, when Kinesis says the
    /// response's end is behind the head, an estimate: the arrival rate of the last
    /// response times `MillisBehindLatest`, at least 1. Zero when caught up.
    fn records_behind(&self) -> u64 {
        let estimate = match self.millis_behind {
            Some(0) | None => 0,
            Some(ms) => ((ms as f64 * self.rate_per_ms).ceil() as u64).max(1),
        };
        self.buffered.len() as u64 + estimate
    }
}

#[derive(Debug)]
struct ShardReads {
    cursors: Vec<Cursor>,
    next_get_records: Instant,
    next_get_iterator: Instant,
}

/// The processors' [`StreamReader`] on Kinesis Data Streams. See the module documentation.
#[derive(Debug)]
pub struct KinesisReader {
    client: Client,
    config: KinesisReaderConfig,
    /// Every listed shard's hash-key range.
    ranges: Mutex<HashMap<ShardId, (u128, u128)>>,
    shards: Mutex<HashMap<ShardId, Arc<tokio::sync::Mutex<ShardReads>>>>,
}

fn unavailable<E, R>(what: &str, err: &SdkError<E, R>) -> StreamError
where
    E: ProvideErrorMetadata + std::error::Error,
    R: fmt::Debug,
{
    StreamError::Unavailable(format!("kinesis {what}: {}", describe(err)))
}

/// An arrival time in milliseconds. Kinesis sends it as fractional epoch seconds with
/// millisecond precision; the float parse can land a hair below the millisecond, which
/// truncation would turn into the one before (and an `AT_TIMESTAMP` read from "just after
/// this record" would then return it). So: the nearest millisecond.
fn arrival_ms(t: DateTime) -> i64 {
    t.secs() * 1000 + (i64::from(t.subsec_nanos()) + 500_000) / 1_000_000
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Parents before children; otherwise in the order listed.
fn parents_first(shards: Vec<ShardInfo>) -> Vec<ShardInfo> {
    let listed: HashSet<ShardId> = shards.iter().map(|s| s.id.clone()).collect();
    let mut done: HashSet<ShardId> = HashSet::new();
    let mut out = Vec::with_capacity(shards.len());
    let mut left = shards;
    while !left.is_empty() {
        let (ready, rest): (Vec<ShardInfo>, Vec<ShardInfo>) = left.into_iter().partition(|s| {
            s.parents
                .iter()
                .all(|p| !listed.contains(p) || done.contains(p))
        });
        left = rest;
        if ready.is_empty() {
            // A cycle cannot happen in Kinesis; list the rest as they came rather than loop.
            out.append(&mut left);
            break;
        }
        for s in ready {
            done.insert(s.id.clone());
            out.push(s);
        }
    }
    out
}

impl KinesisReader {
    pub fn new(client: Client, config: KinesisReaderConfig) -> Self {
        Self {
            client,
            config,
            ranges: Mutex::new(HashMap::new()),
            shards: Mutex::new(HashMap::new()),
        }
    }

    async fn list(&self) -> Result<Vec<Shard>, StreamError> {
        let shards = list_shards(&self.client, &self.config.stream_name)
            .await
            .map_err(|e| StreamError::Unavailable(e.to_string()))?;
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        for s in &shards {
            if let Some(r) = hash_range(s) {
                ranges.insert(ShardId(s.shard_id().to_owned()), r);
            }
        }
        Ok(shards)
    }

    /// `shard`'s hash-key range, listing the shards again if it is not known yet.
    async fn range(&self, shard: &ShardId) -> Result<(u128, u128), StreamError> {
        let known = self
            .ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shard)
            .copied();
        if let Some(r) = known {
            return Ok(r);
        }
        self.list().await?;
        self.ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(shard)
            .copied()
            .ok_or_else(|| StreamError::UnknownShard(shard.clone()))
    }

    fn shard_reads(&self, shard: &ShardId) -> Arc<tokio::sync::Mutex<ShardReads>> {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(shard.clone())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(ShardReads {
                    cursors: Vec::new(),
                    next_get_records: Instant::now(),
                    next_get_iterator: Instant::now(),
                }))
            })
            .clone()
    }

    /// A shard iterator for `at`.
    async fn iterator(
        &self,
        shard: &ShardId,
        at: &StartPosition,
        reads: &mut ShardReads,
    ) -> Result<Option<String>, StreamError> {
        let mut request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.config.stream_name)
            .shard_id(&shard.0);
        request = match at {
            StartPosition::TrimHorizon => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartPosition::At(c) | StartPosition::After(c) => {
                let Some((kinesis, _)) = seq::split(c) else {
                    return Err(StreamError::Unavailable(format!(
                        "{c} is not a kinesis position (a sequence number and a {}-digit subsequence number)",
                        seq::SUB_DIGITS
                    )));
                };
                // At the record itself: the events of its aggregate up to the position
                // are skipped after deaggregation.
                request
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(kinesis)
            }
            StartPosition::AtTimestamp(ms) => {
                if *ms > now_ms() {
                    // Nothing has arrived at or after a time still to come.
                    return Ok(None);
                }
                request
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(DateTime::from_millis(*ms))
            }
        };
        tokio::time::sleep_until(reads.next_get_iterator).await;
        reads.next_get_iterator = Instant::now() + MIN_GET_SHARD_ITERATOR_INTERVAL;
        let out = request.send().await.map_err(|e| match error_code(&e) {
            Some("ResourceNotFoundException") => StreamError::UnknownShard(shard.clone()),
            _ => unavailable(&format!("GetShardIterator of shard {shard}"), &e),
        })?;
        match out.shard_iterator() {
            Some(it) => Ok(Some(it.to_owned())),
            None => Err(StreamError::Unavailable(format!(
                "kinesis GetShardIterator of shard {shard} answered no iterator"
            ))),
        }
    }

    /// One GetRecords into `cursor.buffered`. Ok(false) when there was nothing to call
    /// (a position in the future).
    async fn fetch(
        &self,
        shard: &ShardId,
        range: (u128, u128),
        cursor: &mut Cursor,
        reads: &mut ShardReads,
        max_records: usize,
    ) -> Result<bool, StreamError> {
        for _renewal in 0..2 {
            let iterator = match &cursor.iter {
                Iter::Ended => return Ok(true),
                Iter::At(it) => it.clone(),
                Iter::None => match self.iterator(shard, &cursor.at, reads).await? {
                    Some(it) => it,
                    None => return Ok(false),
                },
            };
            cursor.iter = Iter::At(iterator.clone());
            tokio::time::sleep_until(reads.next_get_records).await;
            reads.next_get_records = Instant::now() + self.config.get_records_interval;
            // Ask for more than this read takes: the rest is buffered for the reads that
            // follow, which then need no call (the calls are what is rate-limited).
            let limit = max_records
                .max(self.config.get_records_limit)
                .clamp(1, MAX_GET_RECORDS_LIMIT);
            let out = match self
                .client
                .get_records()
                .shard_iterator(iterator)
                .limit(limit as i32)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => match error_code(&e) {
                    // Iterators live five minutes: get a new one where this cursor stands
                    // (the last position handed out).
                    Some("ExpiredIteratorException") => {
                        cursor.iter = Iter::None;
                        cursor.buffered.clear();
                        continue;
                    }
                    Some("ProvisionedThroughputExceededException") => {
                        reads.next_get_records = Instant::now() + Duration::from_secs(1);
                        return Err(unavailable(&format!("GetRecords of shard {shard}"), &e));
                    }
                    _ => return Err(unavailable(&format!("GetRecords of shard {shard}"), &e)),
                },
            };
            let floor = match &cursor.at {
                StartPosition::At(c) => Some((c.clone(), true)),
                StartPosition::After(c) => Some((c.clone(), false)),
                _ => None,
            };
            let (mut first_ms, mut last_ms) = (i64::MAX, i64::MIN);
            let mut got = Vec::new();
            for r in out.records {
                let appended_at_ms = r.approximate_arrival_timestamp.map_or(0, arrival_ms);
                first_ms = first_ms.min(appended_at_ms);
                last_ms = last_ms.max(appended_at_ms);
                let data = Bytes::from(r.data.into_inner());
                let events = match kpl::deaggregate(&data) {
                    Some(events) => events
                        .into_iter()
                        // An aggregated event whose hash key is outside this shard's
                        // range was misplaced by a producer's stale shard map; the
                        // producer sent it again to its own shard (KCL skips these too).
                        .filter(|e| {
                            let hash = e
                                .explicit_hash_key
                                .as_deref()
                                .and_then(|h| h.parse::<u128>().ok())
                                .unwrap_or_else(|| hash_key(&e.partition_key));
                            range.0 <= hash && hash <= range.1
                        })
                        .map(|e| (e.partition_key, e.data, e.subsequence))
                        .collect::<Vec<_>>(),
                    None => vec![(r.partition_key.unwrap_or_default(), data, 0)],
                };
                for (key, payload, sub) in events {
                    let Some(sequence) = seq::compose(&r.sequence_number, sub) else {
                        return Err(StreamError::Corrupt(format!(
                            "kinesis shard {shard} has sequence number {:?}, which is not decimal",
                            r.sequence_number
                        )));
                    };
                    if let Some((floor, inclusive)) = &floor
                        && (sequence < *floor || (!inclusive && sequence == *floor))
                    {
                        continue;
                    }
                    got.push(StoredRecord {
                        sequence,
                        key,
                        payload,
                        appended_at_ms,
                    });
                }
            }
            if !got.is_empty() {
                cursor.rate_per_ms = got.len() as f64 / (last_ms - first_ms).max(1) as f64;
            }
            cursor.buffered.extend(got);
            cursor.millis_behind = out.millis_behind_latest.map(|ms| ms.max(0) as u64);
            cursor.iter = match out.next_shard_iterator {
                Some(it) => Iter::At(it),
                None => Iter::Ended,
            };
            return Ok(true);
        }
        Err(StreamError::Unavailable(format!(
            "kinesis GetRecords of shard {shard}: the iterator expired again right after renewal"
        )))
    }
}

#[async_trait]
impl StreamReader for KinesisReader {
    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        let shards = self.list().await?;
        let infos = shards
            .iter()
            .map(|s| ShardInfo {
                id: ShardId(s.shard_id().to_owned()),
                parents: [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(|p| ShardId(p.to_owned()))
                    .collect(),
                closed: !is_open(s),
            })
            .collect();
        Ok(parents_first(infos))
    }

    async fn read(
        &self,
        shard: &ShardId,
        from: &StartPosition,
        max_records: usize,
    ) -> Result<floodgate_core::stream::ReadBatch, StreamError> {
        let range = self.range(shard).await?;
        let reads = self.shard_reads(shard);
        let mut reads = reads.lock().await;
        let mut cursor = match reads.cursors.iter().position(|c| c.at == *from) {
            Some(i) => reads.cursors.swap_remove(i),
            None => Cursor::new(from.clone()),
        };
        cursor.used = Instant::now();
        if max_records > 0 {
            // Kinesis may answer empty while records lie further on (MillisBehindLatest
            // then says so): a few more calls before answering "nothing yet".
            for _ in 0..3 {
                if !cursor.buffered.is_empty() || matches!(cursor.iter, Iter::Ended) {
                    break;
                }
                match self
                    .fetch(shard, range, &mut cursor, &mut reads, max_records)
                    .await
                {
                    Ok(true) if cursor.millis_behind.unwrap_or(0) > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        // Keep the cursor (and its iterator) for the retry from `from`.
                        reads.cursors.push(cursor);
                        return Err(e);
                    }
                }
            }
        }
        let take = max_records.min(cursor.buffered.len());
        let records: Vec<StoredRecord> = cursor.buffered.drain(..take).collect();
        let next = match records.last() {
            Some(last) => Some(StartPosition::After(last.sequence.clone())),
            None if cursor.buffered.is_empty() && matches!(cursor.iter, Iter::Ended) => None,
            None => Some(from.clone()),
        };
        let batch = floodgate_core::stream::ReadBatch {
            records_behind: cursor.records_behind(),
            millis_behind: cursor.millis_behind,
            records,
            next: next.clone(),
        };
        if let Some(next) = next {
            cursor.at = next;
            reads.cursors.retain(|c| c.at != cursor.at);
            reads.cursors.push(cursor);
            if reads.cursors.len() > self.config.cursors_per_shard.max(1) {
                let oldest = reads
                    .cursors
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, c)| c.used)
                    .map(|(i, _)| i);
                if let Some(i) = oldest {
                    reads.cursors.swap_remove(i);
                }
            }
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(call: &Arc<Call>, index: usize, arrival: u64, key: &str, size: usize) -> Pending {
        Pending {
            call: call.clone(),
            index,
            arrival,
            key: key.to_owned(),
            hash: hash_key(key),
            payload: Bytes::from(vec![b'x'; size]),
        }
    }

    fn keys(events: &[Pending]) -> Vec<&str> {
        events.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn routing_finds_the_range_holding_a_hash() {
        let routing = Routing {
            open: vec![
                (0, 99, ShardId("a".into())),
                (100, 199, ShardId("b".into())),
                (300, u128::MAX, ShardId("c".into())),
            ],
            fetched: Instant::now(),
        };
        let find = |h| routing.find(h).map(|(_, _, id)| id.0.clone());
        assert_eq!(find(0).as_deref(), Some("a"));
        assert_eq!(find(99).as_deref(), Some("a"));
        assert_eq!(find(100).as_deref(), Some("b"));
        assert_eq!(find(250), None, "a gap in the map");
        assert_eq!(find(u128::MAX).as_deref(), Some("c"));
    }

    #[test]
    fn an_unaggregated_unit_holds_each_key_once() {
        let call = Arc::new(Call::new(5));
        let mut queue: VecDeque<Pending> = ["a", "b", "a", "c"]
            .iter()
            .enumerate()
            .map(|(i, k)| pending(&call, i, i as u64, k, 10))
            .collect();
        let room = (MAX_PUT_RECORDS_ENTRIES, MAX_PUT_RECORDS_BYTES);
        let (unit, agg) = take_unit(&mut queue, false, MAX_RECORD_BYTES, room).unwrap();
        assert!(agg.is_none());
        assert_eq!(keys(&unit), ["a", "b"]);
        let (unit, _) = take_unit(&mut queue, false, MAX_RECORD_BYTES, room).unwrap();
        assert_eq!(keys(&unit), ["a", "c"]);
        assert!(take_unit(&mut queue, false, MAX_RECORD_BYTES, room).is_none());
    }

    #[test]
    fn an_aggregate_stays_within_its_limit_and_a_lone_event_goes_plain() {
        let call = Arc::new(Call::new(8));
        let mut queue: VecDeque<Pending> = (0..6)
            .map(|i| pending(&call, i, i as u64, "k", 300))
            .chain([pending(&call, 6, 6, "big", 2000)])
            .collect();
        let room = (MAX_PUT_RECORDS_ENTRIES, MAX_PUT_RECORDS_BYTES);
        let (unit, agg) = take_unit(&mut queue, true, 1000, room).unwrap();
        let agg = agg.expect("three 300-byte events share a 1000-byte record");
        assert_eq!(unit.len(), 3);
        assert!(agg.record_len_with("k", 0) > 0 && agg.data_len() + "k".len() <= 1000);
        let (unit, agg) = take_unit(&mut queue, true, 1000, room).unwrap();
        assert_eq!((unit.len(), agg.is_some()), (3, true));
        let (unit, agg) = take_unit(&mut queue, true, 1000, room).unwrap();
        assert_eq!((keys(&unit), agg.is_some()), (vec!["big"], false));
    }

    #[test]
    fn requeued_events_go_back_ahead_of_later_ones() {
        let call = Arc::new(Call::new(6));
        let mut state = State::default();
        state.install(Routing {
            open: vec![(0, u128::MAX, ShardId("s".into()))],
            fetched: Instant::now(),
        });
        let queue = state.queues.entry(ShardId("s".into())).or_default();
        queue.extend([pending(&call, 3, 3, "d", 1), pending(&call, 4, 4, "e", 1)]);
        state.requeue(vec![
            pending(&call, 1, 1, "b", 1),
            pending(&call, 0, 0, "a", 1),
        ]);
        // One from between: merged into its place.
        state.requeue(vec![pending(&call, 2, 2, "c", 1)]);
        let queue: Vec<Pending> = state.queues.remove(&ShardId("s".into())).unwrap().into();
        assert_eq!(keys(&queue), ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_new_map_moves_queued_events_to_the_shards_now_holding_them() {
        let call = Arc::new(Call::new(2));
        let mut state = State::default();
        state.install(Routing {
            open: vec![(0, u128::MAX, ShardId("parent".into()))],
            fetched: Instant::now(),
        });
        let (low, high) = if hash_key("x") < hash_key("y") {
            ("x", "y")
        } else {
            ("y", "x")
        };
        let split = hash_key(high);
        state
            .queues
            .entry(ShardId("parent".into()))
            .or_default()
            .extend([pending(&call, 0, 0, low, 1), pending(&call, 1, 1, high, 1)]);
        state.install(Routing {
            open: vec![
                (0, split - 1, ShardId("left".into())),
                (split, u128::MAX, ShardId("right".into())),
            ],
            fetched: Instant::now(),
        });
        assert!(!state.queues.contains_key(&ShardId("parent".into())));
        assert_eq!(
            keys(state.queues[&ShardId("left".into())].as_slices().0),
            [low]
        );
        assert_eq!(
            keys(state.queues[&ShardId("right".into())].as_slices().0),
            [high]
        );
    }

    #[test]
    fn parents_come_before_children() {
        let info = |id: &str, parents: &[&str]| ShardInfo {
            id: ShardId(id.into()),
            parents: parents.iter().map(|p| ShardId((*p).into())).collect(),
            closed: false,
        };
        let ordered = parents_first(vec![
            info("merged", &["c1", "c2"]),
            info("c2", &["p"]),
            info("c1", &["p"]),
            info("p", &["trimmed"]),
        ]);
        let ids: Vec<&str> = ordered.iter().map(|s| s.id.0.as_str()).collect();
        assert_eq!(ids, ["p", "c2", "c1", "merged"]);
    }

    #[test]
    fn arrival_times_round_to_the_millisecond() {
        // 1796160753.791 as an f64 is a hair below .791: truncating gives .790.
        let t = DateTime::from_secs_f64(1_796_160_753.791);
        assert_eq!(arrival_ms(t), 1_796_160_753_791);
        assert_eq!(arrival_ms(DateTime::from_millis(5)), 5);
    }

    #[test]
    fn records_are_refused_over_kinesis_limits() {
        let r = |key: &str, n: usize| Record {
            key: key.into(),
            payload: Bytes::from(vec![0; n]),
        };
        assert!(refuse(&r("k", MAX_RECORD_BYTES - 1)).is_none());
        assert!(
            refuse(&r("k", MAX_RECORD_BYTES)).is_some(),
            "the key counts"
        );
        assert!(refuse(&r("", 1)).is_some());
        assert!(
            refuse(&r(&"é".repeat(256), 1)).is_none(),
            "characters, not bytes"
        );
        assert!(refuse(&r(&"k".repeat(257), 1)).is_some());
    }
}
