//! The lake consumer: per shard, accepted events gathered into one Parquet file per table
//! and hour partition, written through the [`ObjectStore`] role as
//! `<table>/dt=YYYY-MM-DD/hour=HH/<shard>-<firstSeq>-<lastSeq>.parquet`.
//!
//! A flush covers a contiguous run of the shard's records, `firstSeq..=lastSeq`, and every
//! file it writes carries that run in its name. The checkpoint moves only after all of a
//! flush's files are durable (the store's `put_new` is atomic). Replays are therefore safe:
//! - a file written again for the same run has the same name and the same rows, so the
//!   one there is kept: files are written create-only ([`ObjectStore::put_new`]), which
//!   also makes a write whose answer was lost safe to repeat;
//! - after a crash in the middle of a flush, the next start finds the files of the
//!   unfinished run (their `firstSeq` is the first record after the checkpoint) and ends
//!   its first flush exactly at their `lastSeq`: the run's files that were written are
//!   kept, the missing ones created;
//! - a flush that fails leaves the buffer as it was and pins the run: the next attempt
//!   writes exactly the same `firstSeq..=lastSeq` (so the same names) before anything more
//!   is buffered, and a retried batch skips the records already buffered.
//!
//! Every event ends in exactly one table. A row is checked against its table
//! ([`crate::parquet::check`]): each value must convert to its column's type and every
//! required column must have one. An event whose envelope places it (a type with a table,
//! a readable `time`, an `id` and a `source`) is buffered on that alone and checked when
//! its file is encoded, where its `data` is read anyway; any other is checked before it is
//! buffered. An event that does not fit (an `integer` past its column, a `time` the lake
//! cannot read, a type without a table, an unreadable record) goes to the `quarantine`
//! table with the JSON pointer and the reason, and the lake moves on; so does, as a last
//! line of defence, every row of a table file that fails to encode. No value can hold the
//! consumer up. Diverted rows are written in the run's quarantine file,
//! named `<consumer>.<shard>-<firstSeq>-<lastSeq>.parquet` (`lake.0-…`, `lake-derived.0-…`),
//! a name the quarantine log's own consumer (whose one shard is also `0`) never uses; their
//! `shard` column holds the same `<consumer>.<shard>`.
//!
//! The partition of a typed row is the event's own `time` when it lies within
//! [`LATE_WINDOW`] before the time the stream received it (and not after it); otherwise,
//! and when the event has no `time`, it is the time received. So every partition lies
//! between 7 days before an event's `received_at` and its `received_at`, never in the
//! future and never before the deployment existed, whatever a producer's clock says.
//! Quarantine rows are partitioned by the time received. All UTC.
//!
//! Memory is bounded by bytes, not by events. A buffer holds its typed rows as the events'
//! text in an arena (parsed again, a slice of rows at a time, when its files are encoded),
//! and counts what it holds by what it allocated ([`LakeProcessor::buffered_bytes`]). It
//! rolls before a row would take it past `roll_bytes` (the binary sets that to the buffer's
//! share of the memory budget, `[lake] max_buffer_bytes`), when it is `roll_age` old, and
//! on shutdown. Only while it reproduces a run the store already holds does a buffer wait
//! for that run's end whatever it holds: the run was written under the limit of its day.
//! Encoding is CPU work on the blocking pool; at most [`default_encoders`] files are encoded
//! at once across the process, so a burst of rolls leaves cores to the edge.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, ListArray, StringArray, StructArray, TimestampMicrosecondArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::FieldError;
use floodgate_core::lake::{ENVELOPE_COLUMNS, QUARANTINE_TABLE, Table};
use floodgate_core::object_store::{ObjectStore, PutOutcome};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use serde_json::Value;

use crate::lake_rows::{self, Cell, Columns, Head, Layout, Spans};
use crate::parquet::{self, EncodeError};
use crate::runtime::{ProcessError, Progress, ShardProcessor};

/// When a buffer becomes a file.
#[derive(Debug, Clone)]
pub struct LakeConfig {
    /// A shard's buffer rolls before a row would take the memory it holds past this (see
    /// [`LakeProcessor::buffered_bytes`]).
    pub roll_bytes: u64,
    pub roll_age: Duration,
}

/// Rows parsed at once while a file is encoded (see [`floodgate_core::budget`]).
const ENCODE_CHUNK_ROWS: usize = floodgate_core::budget::LAKE_ENCODE_CHUNK_ROWS as usize;

/// Records buffered between two yields to the async runtime: checking a row (parsing its
/// JSON) takes microseconds, so a batch of 10,000 would hold a worker thread, and the edge's
/// requests queued on it, for tens of milliseconds.
const YIELD_EVERY_RECORDS: usize = 128;

/// Files the lake encodes at once by default, across every lake consumer of the process:
/// half the cores (at least one), so that however many buffers roll together the edge
/// keeps the other half.
pub fn default_encoders() -> Arc<tokio::sync::Semaphore> {
    static ENCODERS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    ENCODERS
        .get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            Arc::new(tokio::sync::Semaphore::new((cores / 2).max(1)))
        })
        .clone()
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            roll_bytes: 128 << 20,
            roll_age: Duration::from_secs(60),
        }
    }
}

/// How long before the stream received it an event's own `time` still picks its
/// partition. Seven days covers producers that buffer while offline (mobile apps, edge
/// devices) and retries over a long weekend, and it bounds where analysts look: a row's
/// partition lies in `[received_at − 7 days, received_at]`.
pub const LATE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
const LATE_WINDOW_US: i64 = LATE_WINDOW.as_secs() as i64 * 1_000_000;

/// The instant whose hour partitions a typed row: its `time` within [`LATE_WINDOW`]
/// before `received_us` (not after it), else `received_us`. Microseconds, UTC.
pub fn partition_micros(time_us: Option<i64>, received_us: i64) -> i64 {
    match time_us {
        Some(t) if t <= received_us && received_us - t <= LATE_WINDOW_US => t,
        _ => received_us,
    }
}

/// One typed row waiting for its file: where its event's text and sequence lie in the
/// buffer's [`Arena`], and when the stream received it. The row's values are read again
/// from the text when its file is encoded. Rows used to be held parsed, as
/// `serde_json::Value` trees: those take four to five times the event's text (bench:
/// `floodgate-lakebench`, `peak_over_input`), so a buffer's memory followed the shape of
/// the events rather than their bytes, and a 128 MiB roll held gigabytes.
#[derive(Debug, Clone, Copy)]
struct EventRow {
    received_us: i64,
    /// A record is at most 1 MiB on every stream: a `u32`, as the arena's offsets are.
    payload_len: u32,
    chunk: u32,
    start: u32,
    sequence_len: u32,
    /// Where its envelope and `data` lie in its text, when buffering placed it by its
    /// envelope: encoding then reads `data` alone. `None`: encoding reads the whole event.
    spans: Option<Spans>,
}

/// One row of the `quarantine` table waiting for its file.
#[derive(Debug, Clone, PartialEq)]
struct HeldRow {
    received_us: i64,
    event_id: Option<String>,
    source: Option<String>,
    event_type: Option<String>,
    reasons: Vec<FieldError>,
    raw: String,
    sequence: String,
}

impl HeldRow {
    /// The heap this row holds, by capacity (its place in a `Vec` is counted there).
    fn heap_bytes(&self) -> u64 {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        let reasons: usize = self
            .reasons
            .iter()
            .map(|r| r.pointer.capacity() + r.message.capacity())
            .sum();
        (opt(&self.event_id)
            + opt(&self.source)
            + opt(&self.event_type)
            + self.raw.capacity()
            + self.sequence.capacity()
            + self.reasons.capacity() * std::mem::size_of::<FieldError>()
            + reasons) as u64
    }
}

fn string_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

/// An event's parts as the lake reads them: parsed from its text when it is buffered (to
/// check it against its table) and again, a slice of rows at a time, when its file is
/// encoded.
struct ParsedRow {
    /// The CloudEvent's `id`, `source`, `type` (strings) and `time` (microseconds).
    id: Option<Value>,
    source: Option<Value>,
    event_type: Option<Value>,
    time: Option<Value>,
    /// The event's `data` object.
    data: Option<Value>,
    received_us: i64,
    sequence: String,
}

impl ParsedRow {
    /// Reads an event's text; also returns its `time` when that is text the lake cannot
    /// read as a time.
    fn parse(
        payload: &[u8],
        received_us: i64,
        sequence: String,
    ) -> Result<(Self, Option<String>), serde_json::Error> {
        let parts: EventParts = serde_json::from_slice(payload)?;
        let time_us = parts.time.as_deref().map(parquet::rfc3339_micros);
        let unreadable_time = match (parts.time, time_us) {
            (Some(t), Some(None)) => Some(t),
            _ => None,
        };
        let row = Self {
            id: parts.id,
            source: parts.source,
            event_type: parts.event_type,
            time: time_us.flatten().map(Value::from),
            data: parts.data,
            received_us,
            sequence,
        };
        Ok((row, unreadable_time))
    }

    /// This row for the quarantine, with why; `raw`: the event's text.
    fn held(&self, reasons: Vec<FieldError>, raw: String) -> HeldRow {
        HeldRow {
            received_us: self.received_us,
            event_id: string_of(self.id.as_ref()),
            source: string_of(self.source.as_ref()),
            event_type: string_of(self.event_type.as_ref()),
            reasons,
            raw,
            sequence: self.sequence.clone(),
        }
    }
}

/// The parts of an event the lake keeps: parsed without building the rest (`serde`
/// skips what a struct does not name).
#[derive(serde::Deserialize)]
struct EventParts {
    id: Option<Value>,
    source: Option<Value>,
    #[serde(rename = "type")]
    event_type: Option<Value>,
    time: Option<String>,
    data: Option<Value>,
}

/// The text of a shard's buffered events and their sequences, in chunks that fill up and
/// never move: each event is copied once, memory is counted by the chunks' capacity (what
/// was allocated, not what is used), and a flushed buffer is freed in a few calls rather
/// than one per value.
#[derive(Debug, Default)]
struct Arena {
    chunks: Vec<Vec<u8>>,
}

/// A copy keeps each chunk's capacity, so the copy's accounting holds for it too.
impl Clone for Arena {
    fn clone(&self) -> Self {
        let chunks = self
            .chunks
            .iter()
            .map(|c| {
                let mut copy = Vec::with_capacity(c.capacity());
                copy.extend_from_slice(c);
                copy
            })
            .collect();
        Self { chunks }
    }
}

impl Arena {
    /// What appending `n` bytes adds to the arena: nothing while the last chunk has room,
    /// else a new chunk of `chunk_bytes` (or of `n`, for an event larger than that).
    fn growth(&self, n: usize, chunk_bytes: usize) -> u64 {
        match self.chunks.last() {
            Some(c) if c.capacity() - c.len() >= n => 0,
            _ => n.max(chunk_bytes) as u64,
        }
    }

    /// Appends `parts` back to back; returns their chunk and offset.
    fn push(&mut self, parts: [&[u8]; 2], chunk_bytes: usize) -> (u32, u32) {
        let n = parts[0].len() + parts[1].len();
        if self.growth(n, chunk_bytes) > 0 {
            self.chunks.push(Vec::with_capacity(n.max(chunk_bytes)));
        }
        let index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[index];
        // A new chunk is at most `chunk_bytes` (≤ 1 MiB) unless it holds one event alone
        // (offset 0), so offsets fit in 32 bits.
        let start = chunk.len() as u32;
        chunk.extend_from_slice(parts[0]);
        chunk.extend_from_slice(parts[1]);
        (index as u32, start)
    }

    fn get(&self, chunk: u32, start: u32, len: usize) -> &[u8] {
        let start = start as usize;
        self.chunks
            .get(chunk as usize)
            .and_then(|c| c.get(start..start + len))
            .unwrap_or(&[])
    }

    fn payload(&self, row: &EventRow) -> &[u8] {
        self.get(row.chunk, row.start, row.payload_len as usize)
    }

    fn sequence(&self, row: &EventRow) -> String {
        self.sequence_str(row).into_owned()
    }

    fn sequence_str(&self, row: &EventRow) -> Cow<'_, str> {
        let bytes = self.get(
            row.chunk,
            row.start + row.payload_len,
            row.sequence_len as usize,
        );
        String::from_utf8_lossy(bytes)
    }
}

/// What a new group (a table and hour of a buffer) costs besides its rows: its entry in the
/// buffer's map, an estimate.
const GROUP_BYTES: u64 = 64;

/// Rows a group's list grows by when it is full: what it holds (at least 4, at most 64 Ki
/// rows, 3.5 MiB), by this exact step, so what the next row costs is known before it is
/// added. It used to grow by a quarter, so as to charge a buffer less for rows it does not
/// have (at most a quarter of its list, now at most half, or 64 Ki rows); but each growth
/// copies the whole list into fresh pages, and growing by quarters copied every row about
/// four times over: in perf at 150,000 events/s, 1.5 % of `serve`'s CPU.
fn growth_step(capacity: usize) -> usize {
    capacity.clamp(4, 64 * 1024)
}

/// What adding one row to `list` (absent: a new group) costs in its list and map.
fn list_growth<T>(list: Option<&Vec<T>>) -> u64 {
    let size = std::mem::size_of::<T>() as u64;
    match list {
        Some(v) if v.len() < v.capacity() => 0,
        Some(v) => growth_step(v.capacity()) as u64 * size,
        None => GROUP_BYTES + growth_step(0) as u64 * size,
    }
}

fn push_row<T>(list: &mut Vec<T>, row: T) {
    if list.len() == list.capacity() {
        list.reserve_exact(growth_step(list.capacity()));
    }
    list.push(row);
}

/// A row on its way into a buffer: a typed row's group and text, or a quarantine row.
enum Row<'a> {
    Typed {
        group: (Arc<str>, i64),
        payload: &'a [u8],
        sequence: &'a str,
        received_us: i64,
        spans: Option<Spans>,
    },
    Held(HeldRow),
}

/// A shard's buffered rows: the typed ones by (table, hour since the Unix epoch), the
/// quarantined ones by hour, each in stream order. Cheap keys: the partition's strings are
/// made once per flush, not per event.
#[derive(Default, Clone)]
struct Pending {
    typed: BTreeMap<(Arc<str>, i64), Vec<EventRow>>,
    held: BTreeMap<i64, Vec<HeldRow>>,
    arena: Arena,
    /// The memory all of the above holds: the arena's chunks and the row lists by
    /// capacity, each quarantine row's strings, and [`GROUP_BYTES`] a group. This is what
    /// a buffer's roll and the lake's budget count.
    bytes: u64,
}

impl Pending {
    /// What adding `row` would add to [`Pending::bytes`].
    fn growth(&self, row: &Row<'_>, chunk_bytes: usize) -> u64 {
        match row {
            Row::Typed {
                group,
                payload,
                sequence,
                ..
            } => {
                self.arena
                    .growth(payload.len() + sequence.len(), chunk_bytes)
                    + list_growth(self.typed.get(group))
            }
            Row::Held(h) => h.heap_bytes() + list_growth(self.held.get(&hour_of(h.received_us))),
        }
    }

    /// Adds `row`, counting it in [`Pending::bytes`].
    fn push(&mut self, row: Row<'_>, chunk_bytes: usize) {
        self.bytes += self.growth(&row, chunk_bytes);
        match row {
            Row::Typed {
                group,
                payload,
                sequence,
                received_us,
                spans,
            } => {
                let (chunk, start) = self.arena.push([payload, sequence.as_bytes()], chunk_bytes);
                let row = EventRow {
                    received_us,
                    payload_len: payload.len() as u32,
                    chunk,
                    start,
                    sequence_len: sequence.len() as u32,
                    spans,
                };
                push_row(self.typed.entry(group).or_default(), row);
            }
            Row::Held(h) => push_row(self.held.entry(hour_of(h.received_us)).or_default(), h),
        }
    }

    /// [`Pending::bytes`] counted again from what the buffer holds.
    #[cfg(test)]
    fn recount(&self) -> u64 {
        let chunks: usize = self.arena.chunks.iter().map(Vec::capacity).sum();
        let typed: u64 = self
            .typed
            .values()
            .map(|v| GROUP_BYTES + (v.capacity() * std::mem::size_of::<EventRow>()) as u64)
            .sum();
        let held: u64 = self
            .held
            .values()
            .map(|v| {
                GROUP_BYTES
                    + (v.capacity() * std::mem::size_of::<HeldRow>()) as u64
                    + v.iter().map(HeldRow::heap_bytes).sum::<u64>()
            })
            .sum();
        chunks as u64 + typed + held
    }
}

#[derive(Default)]
struct ShardBuffer {
    /// Shared with a flush in progress, which encodes it off the async workers; only
    /// emptied once the flush succeeded.
    rows: Arc<Pending>,
    first: Option<SequenceNumber>,
    last: Option<SequenceNumber>,
    /// The last record taken into the buffer (flushed or not): a batch retried after a
    /// failure skips everything up to it.
    taken: Option<SequenceNumber>,
    opened: Option<Instant>,
    /// Run ends to reproduce, in order: the end of an unfinished run found at start-up, or
    /// every run of the lake being rebuilt. While any is left, flushes happen exactly there
    /// and nowhere else.
    boundaries: VecDeque<SequenceNumber>,
    started: bool,
    durable: Option<SequenceNumber>,
    /// A flush of `first..=last` failed: the next flush writes exactly this run before
    /// anything more is buffered, so it writes the same names.
    pinned: bool,
}

/// Which records a [`LakeProcessor`] turns into rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Accepted events from the stream, one table per type.
    Events,
    /// The edge's quarantine log: every rejected event, in the `quarantine` table.
    Quarantine,
}

/// Writes the lake; see the module docs.
pub struct LakeProcessor {
    scope: Scope,
    consumer: &'static str,
    store: Arc<dyn ObjectStore>,
    /// Each table by the event type it holds.
    tables: HashMap<String, Table>,
    /// Each table by its name (the buffer keys), for the flush's blocking task.
    by_name: Arc<HashMap<Arc<str>, Table>>,
    /// Each event type's table name, shared by the buffer keys.
    names: HashMap<String, Arc<str>>,
    /// Each event type's table, as the typed reading of rows sees it.
    layouts: HashMap<String, Layout>,
    config: LakeConfig,
    /// The size of a buffer's arena chunks: small beside `roll_bytes`, so the chunk being
    /// filled wastes little of it.
    chunk_bytes: usize,
    /// Permits to encode a file; see [`default_encoders`].
    encoders: Arc<tokio::sync::Semaphore>,
    shards: Mutex<HashMap<ShardId, ShardBuffer>>,
    /// The most any one of its buffers has held (see [`LakeProcessor::peak_buffer_bytes`]).
    peak: std::sync::atomic::AtomicU64,
    /// Set for a rebuild: the runs to reproduce per shard (no discovery in the store).
    planned: Option<HashMap<ShardId, Vec<SequenceNumber>>>,
}

impl std::fmt::Debug for LakeProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeProcessor")
            .field("consumer", &self.consumer)
            .field("tables", &self.tables.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Which quarantine files a run discovery attributes to the consumer asking: those of
/// rows a consumer of events diverted (`<consumer>.<shard>-<first>-<last>.parquet`).
#[derive(Debug, Clone, Copy)]
enum Diverted<'a> {
    /// None: the consumer asking is the quarantine log's own.
    Never,
    /// Any consumer's (consumers of events read disjoint shards: the stream's, the
    /// outbox's).
    AnyConsumer,
    /// Only this consumer's.
    By(&'a str),
}

/// `(first, last)` of a diverted file name `<consumer>.<shard>-<first>-<last>.parquet`.
fn parse_diverted_name<'a>(
    name: &'a str,
    shard: &str,
    diverted: Diverted<'_>,
) -> Option<(&'a str, &'a str)> {
    let (consumer, rest) = name.split_once('.')?;
    let ours = match diverted {
        Diverted::Never => false,
        Diverted::AnyConsumer => !consumer.is_empty(),
        Diverted::By(c) => consumer == c,
    };
    if ours {
        parse_file_name(rest, shard)
    } else {
        None
    }
}

/// Every run the lake in `store` holds or held, per shard, as `(first, last)`: from the
/// files' names, and from the inputs recorded by compactions (whose files are gone). Asked
/// for the tables of a consumer of events (not `quarantine`), it also counts the runs of
/// the rows such a consumer diverted to the quarantine table.
pub async fn known_runs(
    store: &dyn ObjectStore,
    shards: &[ShardId],
    tables: &[String],
) -> Result<HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>>, ProcessError> {
    let diverted = if tables.iter().any(|t| t == QUARANTINE_TABLE) {
        Diverted::Never
    } else {
        Diverted::AnyConsumer
    };
    runs_of(store, shards, tables, diverted).await
}

async fn runs_of(
    store: &dyn ObjectStore,
    shards: &[ShardId],
    tables: &[String],
    diverted: Diverted<'_>,
) -> Result<HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>>, ProcessError> {
    // Only the directories of the tables asked about (and of the quarantine, for the rows
    // they diverted) are listed, each by its own prefix: on S3 a listing of the whole lake
    // is a request per 1,000 files of every table, at every shard's start.
    let mut listed: Vec<(&str, bool)> = tables.iter().map(|t| (t.as_str(), false)).collect();
    if !matches!(diverted, Diverted::Never) && !tables.iter().any(|t| t == QUARANTINE_TABLE) {
        listed.push((QUARANTINE_TABLE, true));
    }
    listed.sort_unstable();
    listed.dedup();
    let mut objects = Vec::new();
    for (table, held) in listed {
        // The trailing `/`: table `t`'s prefix must not list table `tt`.
        let found = store
            .list(&format!("{table}/"))
            .await
            .map_err(|e| ProcessError::Other(e.to_string()))?;
        objects.extend(found.into_iter().map(|o| (o, held)));
    }
    // (name, whether it is a diverted file in the quarantine table)
    let mut names: Vec<(String, bool)> = Vec::new();
    for (o, held) in &objects {
        let held = *held;
        let name = o.key.rsplit('/').next().unwrap_or("");
        if name == crate::compact::MANIFEST {
            let partition = o.key.rsplit_once('/').map_or("", |(d, _)| d);
            let m = crate::compact::manifest(store, partition).await?;
            names.extend(
                m.compacted
                    .into_values()
                    .flat_map(|p| p.inputs)
                    .map(|n| (n, held)),
            );
        } else {
            names.push((name.to_owned(), held));
        }
    }
    let mut runs: HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>> = HashMap::new();
    for (name, held) in &names {
        for shard in shards {
            let parsed = if *held {
                parse_diverted_name(name, &shard.0, diverted)
            } else {
                parse_file_name(name, &shard.0)
            };
            if let Some((first, last)) = parsed {
                let run = (SequenceNumber::new(first), SequenceNumber::new(last));
                let list = runs.entry(shard.clone()).or_default();
                if !list.contains(&run) {
                    list.push(run);
                }
            }
        }
    }
    for list in runs.values_mut() {
        list.sort();
    }
    Ok(runs)
}

/// The `lastSeq` of every run [`known_runs`] finds, per shard.
pub async fn runs_in(
    store: &dyn ObjectStore,
    shards: &[ShardId],
    tables: &[String],
) -> Result<HashMap<ShardId, Vec<SequenceNumber>>, ProcessError> {
    Ok(known_runs(store, shards, tables)
        .await?
        .into_iter()
        .map(|(shard, runs)| (shard, runs.into_iter().map(|(_, last)| last).collect()))
        .collect())
}

/// The `lastSeq` of every run of the events consumer `consumer` (`lake`, `lake-derived`)
/// per shard: its files in `tables`, and the rows it diverted to the quarantine table.
/// Unlike [`runs_in`], another consumer's diverted rows never count, even where both read
/// shards of the same name (the stream's and the derived-event log's shard `0`).
pub async fn runs_of_consumer(
    store: &dyn ObjectStore,
    shards: &[ShardId],
    tables: &[String],
    consumer: &str,
) -> Result<HashMap<ShardId, Vec<SequenceNumber>>, ProcessError> {
    Ok(runs_of(store, shards, tables, Diverted::By(consumer))
        .await?
        .into_iter()
        .map(|(shard, runs)| (shard, runs.into_iter().map(|(_, last)| last).collect()))
        .collect())
}

/// `(first, last)` of a lake file name `<shard>-<first>-<last>.parquet` of `shard`.
pub fn parse_file_name<'a>(name: &'a str, shard: &str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_prefix(shard)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".parquet")?;
    let (first, last) = rest.split_once('-')?;
    (!first.is_empty()
        && !last.is_empty()
        && first.bytes().all(|b| b.is_ascii_digit())
        && last.bytes().all(|b| b.is_ascii_digit()))
    .then_some((first, last))
}

/// A quarantine-log record as a row: the rejected event's id, source and type lifted out of
/// its raw text, where it is readable. A record that is not what the edge writes still
/// makes a row, with its bytes as `raw` and a reason saying so.
fn quarantine_row(payload: &[u8], received_us: i64, sequence: String) -> HeldRow {
    let held: Option<Value> = serde_json::from_slice(payload).ok();
    let raw_text = held
        .as_ref()
        .and_then(|h| h.get("raw"))
        .and_then(Value::as_str);
    let reasons: Option<Vec<FieldError>> = held
        .as_ref()
        .and_then(|h| h.get("reasons"))
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .map(|r| {
                    Some(FieldError {
                        pointer: r.get("pointer")?.as_str()?.to_owned(),
                        message: r.get("message")?.as_str()?.to_owned(),
                    })
                })
                .collect()
        });
    let (raw, reasons) = match (raw_text, reasons) {
        (Some(raw), Some(reasons)) => (raw.to_owned(), reasons),
        _ => (
            String::from_utf8_lossy(payload).into_owned(),
            vec![FieldError::new(
                "",
                "the quarantine log's record is not {raw, reasons}; raw holds it whole",
            )],
        ),
    };
    let event: Option<Value> = serde_json::from_str(&raw).ok();
    let lift = |name: &str| string_of(event.as_ref().and_then(|e| e.get(name)));
    HeldRow {
        received_us,
        event_id: lift("id"),
        source: lift("source"),
        event_type: lift("type"),
        reasons,
        raw,
        sequence,
    }
}

/// The `quarantine` table's columns of `rows`, whose `shard` column says `shard`.
fn quarantine_columns(
    schema: &SchemaRef,
    rows: &[&HeldRow],
    shard: &str,
) -> Result<Vec<ArrayRef>, EncodeError> {
    let strings = |f: &dyn Fn(&HeldRow) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(|r| f(r))))
    };
    let mut out = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column: ArrayRef = match (field.name().as_str(), field.data_type()) {
            ("received_at", DataType::Timestamp(_, tz)) => Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.received_us))
                    .with_timezone_opt(tz.clone()),
            ),
            ("event_id", _) => strings(&|r| r.event_id.as_deref()),
            ("source", _) => strings(&|r| r.source.as_deref()),
            ("type", _) => strings(&|r| r.event_type.as_deref()),
            ("raw", _) => strings(&|r| Some(&r.raw)),
            ("sequence", _) => strings(&|r| Some(&r.sequence)),
            ("shard", _) => {
                let mut b = StringDictionaryBuilder::<Int32Type>::new();
                for _ in rows {
                    b.append_value(shard);
                }
                Arc::new(b.finish())
            }
            ("reasons", DataType::List(item)) => {
                let DataType::Struct(members) = item.data_type() else {
                    return Err(not_quarantine(field.name()));
                };
                let all: Vec<&FieldError> = rows.iter().flat_map(|r| &r.reasons).collect();
                let pointers = StringArray::from_iter_values(all.iter().map(|e| &e.pointer));
                let messages = StringArray::from_iter_values(all.iter().map(|e| &e.message));
                let reasons = StructArray::try_new(
                    members.clone(),
                    vec![Arc::new(pointers), Arc::new(messages)],
                    None,
                )?;
                let offsets = OffsetBuffer::try_from_lengths(rows.iter().map(|r| r.reasons.len()))
                    .map_err(|e| {
                        EncodeError::Arrow(arrow_schema::ArrowError::ComputeError(e.to_string()))
                    })?;
                Arc::new(ListArray::try_new(
                    item.clone(),
                    offsets,
                    Arc::new(reasons),
                    None,
                )?)
            }
            (name, _) => return Err(not_quarantine(name)),
        };
        out.push(column);
    }
    Ok(out)
}

fn not_quarantine(column: &str) -> EncodeError {
    EncodeError::Arrow(arrow_schema::ArrowError::SchemaError(format!(
        "the quarantine table has no column builder for {column:?}"
    )))
}

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The hour (since the Unix epoch, UTC) of a time in microseconds.
fn hour_of(micros: i64) -> i64 {
    micros.div_euclid(MICROS_PER_HOUR)
}

/// `YYYY-MM-DD` and hour of day of an hour since the Unix epoch.
fn partition(hour: i64) -> (String, u8) {
    let day = hour.div_euclid(24);
    // 2440588 is the Julian day of 1970-01-01.
    let date = i32::try_from(day + 2_440_588)
        .ok()
        .and_then(|j| time::Date::from_julian_day(j).ok())
        .unwrap_or(time::Date::MIN);
    (
        format!(
            "{:04}-{:02}-{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        ),
        hour.rem_euclid(24) as u8,
    )
}

/// `table/dt=YYYY-MM-DD/hour=HH`.
fn partition_key(table: &str, hour: i64) -> String {
    let (dt, h) = partition(hour);
    format!("{table}/dt={dt}/hour={h:02}")
}

impl LakeProcessor {
    /// `tables`: every table this consumer writes, keyed by the event type it holds.
    pub fn new(store: Arc<dyn ObjectStore>, tables: Vec<Table>, config: LakeConfig) -> Self {
        Self {
            store,
            names: tables
                .iter()
                .map(|t| (t.event_type.clone(), Arc::from(t.name.as_str())))
                .collect(),
            layouts: tables
                .iter()
                .map(|t| (t.event_type.clone(), Layout::of(t)))
                .collect(),
            by_name: Arc::new(
                tables
                    .iter()
                    .map(|t| (Arc::from(t.name.as_str()), t.clone()))
                    .collect(),
            ),
            tables: tables
                .into_iter()
                .map(|t| (t.event_type.clone(), t))
                .collect(),
            chunk_bytes: (config.roll_bytes / 16).clamp(256, 1 << 20) as usize,
            config,
            encoders: default_encoders(),
            shards: Mutex::new(HashMap::new()),
            peak: std::sync::atomic::AtomicU64::new(0),
            planned: None,
            scope: Scope::Events,
            consumer: "lake",
        }
    }

    /// Encodes at most as many files at once as `encoders` has permits, shared with whoever
    /// else holds it (instead of [`default_encoders`]).
    pub fn with_encoders(mut self, encoders: Arc<tokio::sync::Semaphore>) -> Self {
        self.encoders = encoders;
        self
    }

    /// The memory every shard's buffer of this consumer holds now, as its rolls count it:
    /// the events' text and sequences (by the capacity of the arena's chunks), the row
    /// lists, and the quarantine rows' strings. A buffer being flushed counts until its
    /// files are written.
    pub fn buffered_bytes(&self) -> u64 {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        shards.values().map(|b| b.rows.bytes).sum()
    }

    /// The most memory any one buffer of this consumer has held since it started, as its
    /// rolls count it: at most `roll_bytes`, except while reproducing a run or for a single
    /// event larger than that.
    pub fn peak_buffer_bytes(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The directories (table names) this processor writes, besides the rows it diverts to
    /// `quarantine`.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.values().map(|t| t.name.clone()).collect()
    }

    /// The consumer name its checkpoints and diverted files go by.
    pub fn consumer_name(&self) -> &'static str {
        self.consumer
    }

    /// The consumer name: `lake` by default.
    pub fn named(mut self, consumer: &'static str) -> Self {
        self.consumer = consumer;
        self
    }

    /// The consumer of the quarantine log: the `quarantine` table.
    pub fn quarantine(store: Arc<dyn ObjectStore>, config: LakeConfig) -> Self {
        let table = Table {
            name: QUARANTINE_TABLE.to_owned(),
            event_type: String::new(),
            schema: floodgate_core::lake::quarantine_schema(),
            data_members: Vec::new(),
        };
        let mut p = Self::new(store, vec![table], config);
        p.scope = Scope::Quarantine;
        p.consumer = "lake-quarantine";
        p
    }

    /// For a rebuild: end runs exactly where `runs` (per shard, the `lastSeq` of each run
    /// of the lake being replaced) say, so the rebuilt lake has the same files.
    pub fn with_runs(mut self, runs: HashMap<ShardId, Vec<SequenceNumber>>) -> Self {
        self.planned = Some(runs);
        self
    }

    /// The name stem of a run's quarantine file, and its `shard` column.
    fn held_stem(&self, shard: &ShardId) -> String {
        match self.scope {
            Scope::Events => format!("{}.{}", self.consumer, shard.0),
            Scope::Quarantine => shard.0.clone(),
        }
    }

    /// The group of an event whose envelope places it: a type with a table this module
    /// reads, a readable `time`, an `id` and a `source`; `None` leaves it to the reference
    /// now. Its `data` is read, and the row checked against its table, when its file is
    /// encoded ([`slice_columns`]): a row that does not fit is diverted to the quarantine
    /// there, with the reasons the reference gives (see [`judge`]).
    fn fits(&self, payload: &[u8], received_us: i64) -> Option<Placed<Arc<str>>> {
        place(payload, received_us, |t| {
            Some((self.names.get(t)?.clone(), self.layouts.get(t)?))
        })
    }

    /// Turns one record into a row of its table, or of the quarantine when it does not fit.
    fn row_of<'a>(&self, r: &'a StoredRecord) -> Row<'a> {
        let received_us = r.appended_at_ms.saturating_mul(1000);
        if self.scope == Scope::Quarantine {
            let sequence = r.sequence.to_string();
            return Row::Held(quarantine_row(&r.payload, received_us, sequence));
        }
        // Most rows are placed by their envelope alone, borrowed; anything else is decided
        // (and every misfit named) by the reference below.
        match self.fits(&r.payload, received_us) {
            Some(placed) => Row::Typed {
                group: placed.group,
                payload: &r.payload,
                sequence: r.sequence.as_str(),
                received_us,
                spans: placed.spans,
            },
            None => self.reference_row(r, received_us),
        }
    }

    /// [`row_of`](Self::row_of) the reference way: the event parsed as `Value`s and
    /// checked against its table, every misfit named.
    fn reference_row<'a>(&self, r: &'a StoredRecord, received_us: i64) -> Row<'a> {
        let judged = judge(&r.payload, received_us, r.sequence.to_string(), |t| {
            self.tables.get(t)
        });
        match judged {
            Judged::Fits { table, at_us, .. } => match self.names.get(&table.event_type) {
                Some(name) => Row::Typed {
                    group: (name.clone(), hour_of(at_us)),
                    payload: &r.payload,
                    sequence: r.sequence.as_str(),
                    received_us,
                    spans: None,
                },
                // `tables` and `names` have the same keys: unreachable.
                None => Row::Held(HeldRow {
                    received_us,
                    event_id: None,
                    source: None,
                    event_type: Some(table.event_type.clone()),
                    reasons: vec![FieldError::new("/type", "the lake lost this type's table")],
                    raw: String::from_utf8_lossy(&r.payload).into_owned(),
                    sequence: r.sequence.to_string(),
                }),
            },
            Judged::Held(row, reason) => {
                metrics::counter!("floodgate_lake_quarantined_total", "reason" => reason)
                    .increment(1);
                Row::Held(row)
            }
        }
    }
}

/// Where [`place`] put an event.
struct Placed<T> {
    /// `T`, and the hour since the Unix epoch.
    group: (T, i64),
    /// Where its envelope and `data` lie in its text, for encoding (see [`EventRow`]).
    spans: Option<Spans>,
}

/// The group (`T`, with `table_of`'s layout for the event's type, and the hour) of an
/// event whose envelope alone places it; see [`LakeProcessor::fits`].
fn place<'l, T>(
    payload: &[u8],
    received_us: i64,
    table_of: impl Fn(&str) -> Option<(T, &'l Layout)>,
) -> Option<Placed<T>> {
    let head = Head::read_envelope(payload)?;
    let (group, layout) = table_of(head.event_type()?)?;
    if !layout.supported() || !head.has_ids() {
        return None;
    }
    let time = head.time_us()?;
    Some(Placed {
        group: (group, hour_of(partition_micros(time, received_us))),
        spans: head.spans(payload),
    })
}

/// What the reference makes of an event: a row of `table`, partitioned at `at_us`, or a
/// quarantine row with the reasons and the metric's label.
enum Judged<'t> {
    Fits {
        table: &'t Table,
        row: ParsedRow,
        at_us: i64,
    },
    Held(HeldRow, &'static str),
}

/// The reference's judgement of an event (its text, when the stream received it, its
/// sequence): parsed as `Value`s, its table found by its type with `table_of`, and checked
/// against that table, every misfit named. Buffering uses it for rows whose envelope does
/// not place them, encoding for rows whose typed reading declines.
fn judge<'t>(
    payload: &[u8],
    received_us: i64,
    sequence: String,
    table_of: impl Fn(&str) -> Option<&'t Table>,
) -> Judged<'t> {
    let raw = || String::from_utf8_lossy(payload).into_owned();
    let (row, unreadable_time) = match ParsedRow::parse(payload, received_us, String::new()) {
        Ok((row, unreadable_time)) => (ParsedRow { sequence, ..row }, unreadable_time),
        Err(e) => {
            let row = HeldRow {
                received_us,
                event_id: None,
                source: None,
                event_type: None,
                reasons: vec![FieldError::new(
                    "",
                    format!("the lake cannot read this record as a CloudEvent: {e}"),
                )],
                raw: raw(),
                sequence,
            };
            return Judged::Held(row, "unreadable");
        }
    };
    let event_type = row
        .event_type
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(table) = table_of(event_type) else {
        let reason = FieldError::new(
            "/type",
            format!("the lake has no table for event type {event_type:?}"),
        );
        return Judged::Held(row.held(vec![reason], raw()), "unknown_type");
    };
    let mut misfits = Vec::new();
    if let Some(t) = unreadable_time {
        misfits.push(FieldError::new(
            "/time",
            format!("{t:?} is not an RFC 3339 date-time the lake can read"),
        ));
    }
    misfits.extend(fit(table, &row));
    if !misfits.is_empty() {
        return Judged::Held(row.held(misfits, raw()), "does_not_fit");
    }
    // The row keeps the producer's `time` as a column whatever its partition.
    let at_us = partition_micros(row.time.as_ref().and_then(Value::as_i64), received_us);
    Judged::Fits { table, row, at_us }
}

/// Why `row` does not fit `table`: one reason per column whose value does not convert, or
/// that requires a value and has none. Empty when it fits.
fn fit(table: &Table, row: &ParsedRow) -> Vec<FieldError> {
    let data = row.data.as_ref().and_then(Value::as_object);
    let mut out = Vec::new();
    for (i, field) in table.schema.fields().iter().enumerate() {
        // (envelope attribute, or `data` member; the value). Pointers are only spelled out
        // for a misfit: this runs for every row.
        let (attribute, member, value) = match ENVELOPE_COLUMNS.get(i) {
            Some(&"event_id") => ("id", None, row.id.as_ref()),
            Some(&"source") => ("source", None, row.source.as_ref()),
            Some(&"type") => ("type", None, row.event_type.as_ref()),
            Some(&"time") => ("time", None, row.time.as_ref()),
            // Written by the lake itself.
            Some(_) => continue,
            None => {
                let Some(member) = table.data_members.get(i - ENVELOPE_COLUMNS.len()) else {
                    out.push(FieldError::new(
                        "",
                        format!(
                            "the lake's table {} has no member for column {i}",
                            table.name
                        ),
                    ));
                    continue;
                };
                ("data", Some(member), data.and_then(|d| d.get(member)))
            }
        };
        if let Err(m) = parquet::check(field.data_type(), field.is_nullable(), value) {
            let pointer = match member {
                Some(member) => format!(
                    "/data/{}{}",
                    floodgate_core::escape_pointer_token(member),
                    m.pointer
                ),
                None => format!("/{attribute}{}", m.pointer),
            };
            out.push(FieldError::new(pointer, m.message));
        }
    }
    out
}

/// The Arrow columns of one typed file's rows, the reference way: from parsed `Value`s.
/// The typed reading ([`encode_group`]) must build the same (tests check).
#[cfg(test)]
fn columns_for(
    table: &Table,
    rows: &[ParsedRow],
    shard: &str,
) -> Result<Vec<ArrayRef>, EncodeError> {
    let fields = table.schema.fields();
    let mut out = Vec::with_capacity(fields.len());
    let shard_value = Value::String(shard.to_owned());
    let received: Vec<Value> = rows.iter().map(|r| Value::from(r.received_us)).collect();
    let sequences: Vec<Value> = rows
        .iter()
        .map(|r| Value::String(r.sequence.clone()))
        .collect();
    // Each row's `data` object, looked up once.
    let datas: Vec<Option<&serde_json::Map<String, Value>>> = rows
        .iter()
        .map(|r| r.data.as_ref().and_then(Value::as_object))
        .collect();
    for (i, field) in fields.iter().enumerate() {
        let values: Vec<Option<&Value>> = match ENVELOPE_COLUMNS.get(i) {
            Some(&"event_id") => rows.iter().map(|r| r.id.as_ref()).collect(),
            Some(&"source") => rows.iter().map(|r| r.source.as_ref()).collect(),
            Some(&"type") => rows.iter().map(|r| r.event_type.as_ref()).collect(),
            Some(&"time") => rows.iter().map(|r| r.time.as_ref()).collect(),
            Some(&"received_at") => received.iter().map(Some).collect(),
            Some(&"shard") => rows.iter().map(|_| Some(&shard_value)).collect(),
            Some(&"sequence") => sequences.iter().map(Some).collect(),
            Some(other) => {
                return Err(EncodeError::Arrow(arrow_schema::ArrowError::SchemaError(
                    format!("unknown envelope column {other:?}"),
                )));
            }
            None => {
                let member = table
                    .data_members
                    .get(i - ENVELOPE_COLUMNS.len())
                    .map_or("", String::as_str);
                datas
                    .iter()
                    .map(|d| d.and_then(|d| d.get(member)))
                    .collect()
            }
        };
        out.push(parquet::column(field.data_type(), &values)?);
    }
    Ok(out)
}

/// One typed file: its rows read back from the arena and appended to Arrow builders a
/// slice of [`ENCODE_CHUNK_ROWS`] at a time, so the rows' columns never cost more than one
/// slice's worth beside the encoded file. A row is read once, borrowed
/// ([`lake_rows`](crate::lake_rows)); one the typed reading declines is judged by the
/// reference ([`judge`]): converted [`columns_for`]'s way when it fits, else pushed to
/// `diverted` (in order, with its metric's label) and left out of the file. `None` when
/// every row was diverted.
fn encode_group(
    table: &Table,
    group: &[EventRow],
    arena: &Arena,
    shard: &str,
    diverted: &mut Vec<(HeldRow, &'static str)>,
) -> Result<Option<Bytes>, EncodeError> {
    let mut file = parquet::FileEncoder::new(&table.schema)?;
    let layout = Layout::of(table);
    let mut columns = Columns::new(table, group.len().min(ENCODE_CHUNK_ROWS))?;
    let before = diverted.len();
    for slice in group.chunks(ENCODE_CHUNK_ROWS) {
        let in_slice = diverted.len();
        let batch = slice_columns(table, &layout, &mut columns, slice, arena, shard, diverted)?;
        if diverted.len() - in_slice < slice.len() {
            file.write(batch)?;
        }
    }
    if diverted.len() - before == group.len() {
        return Ok(None);
    }
    file.finish().map(Some)
}

/// The Arrow columns of the rows of `rows` that fit, appended to `columns` (which are left
/// empty for the next slice); the others are pushed to `diverted`.
fn slice_columns(
    table: &Table,
    layout: &Layout,
    columns: &mut Columns,
    rows: &[EventRow],
    arena: &Arena,
    shard: &str,
    diverted: &mut Vec<(HeldRow, &'static str)>,
) -> Result<Vec<ArrayRef>, EncodeError> {
    for row in rows {
        let payload = arena.payload(row);
        let staged = match &row.spans {
            Some(spans) => layout.stage_spans(payload, spans),
            None => Head::read(payload, &|_| Some(layout)).and_then(|head| layout.stage(head)),
        };
        let mut cells = match staged {
            Some(cells) => cells,
            None => {
                let this_table = |t: &str| (t == table.event_type).then_some(table);
                match judge(payload, row.received_us, arena.sequence(row), this_table) {
                    Judged::Fits { row, .. } => reference_cells(table, &row),
                    Judged::Held(held, reason) => {
                        diverted.push((held, reason));
                        continue;
                    }
                }
            }
        };
        cells[lake_rows::RECEIVED_AT] = Some(Cell::Int(row.received_us));
        cells[lake_rows::SHARD] = Some(Cell::Str(Cow::Borrowed(shard)));
        cells[lake_rows::SEQUENCE] = Some(Cell::Str(arena.sequence_str(row)));
        columns.push(cells);
    }
    columns.finish()
}

/// A parsed row's cells the reference way, each value converted as [`columns_for`]
/// converts it (what does not convert is a null). The lake's own columns stay `None`.
fn reference_cells<'a>(table: &Table, row: &ParsedRow) -> Vec<Option<Cell<'a>>> {
    let data = row.data.as_ref().and_then(Value::as_object);
    table
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let value = match ENVELOPE_COLUMNS.get(i) {
                Some(&"event_id") => row.id.as_ref(),
                Some(&"source") => row.source.as_ref(),
                Some(&"type") => row.event_type.as_ref(),
                Some(&"time") => row.time.as_ref(),
                Some(_) => None,
                None => table
                    .data_members
                    .get(i - ENVELOPE_COLUMNS.len())
                    .and_then(|member| data.and_then(|d| d.get(member))),
            };
            lake_rows::cell_of(field.data_type(), value)
        })
        .collect()
}

/// The lake's per-row work for one typed file, outside the consumer: each event (its text,
/// when the stream received it, its sequence) is placed by its envelope as buffering does
/// (judged by the reference when that does not place it), copied into an arena, then read
/// again and encoded as `encode_group` does at a flush. For benches
/// (`bench/benches/pipeline.rs`); `Err` names the first event that does not fit.
pub fn encode_events(
    table: &Table,
    shard: &str,
    events: &[(&[u8], i64, &str)],
) -> Result<Bytes, EncodeError> {
    let layout = Layout::of(table);
    let this_table = |t: &str| (t == table.event_type).then_some(table);
    let misfit = |i: usize, held: &HeldRow| {
        let first = held.reasons.first();
        EncodeError::Row(format!(
            "event {i}: {} {}",
            first.map_or("", |r| &r.pointer),
            first.map_or("", |r| &r.message)
        ))
    };
    let mut arena = Arena::default();
    let mut rows = Vec::with_capacity(events.len());
    for (i, &(payload, received_us, sequence)) in events.iter().enumerate() {
        let placed = place(payload, received_us, |t| {
            (t == table.event_type).then_some(((), &layout))
        });
        if placed.is_none()
            && let Judged::Held(held, _) =
                judge(payload, received_us, sequence.to_owned(), this_table)
        {
            return Err(misfit(i, &held));
        }
        let (chunk, start) = arena.push([payload, sequence.as_bytes()], 1 << 20);
        rows.push(EventRow {
            received_us,
            payload_len: payload.len() as u32,
            chunk,
            start,
            sequence_len: sequence.len() as u32,
            spans: placed.and_then(|p| p.spans),
        });
    }
    let mut diverted = Vec::new();
    let file = encode_group(table, &rows, &arena, shard, &mut diverted)?;
    if let Some((held, _)) = diverted.first() {
        let i = events.iter().position(|e| e.2 == held.sequence);
        return Err(misfit(i.unwrap_or(usize::MAX), held));
    }
    file.ok_or_else(|| EncodeError::Row("no events".to_owned()))
}

/// The quarantine row of a typed row whose file failed to encode: the event's own text
/// as `raw`, with `reason`.
fn held_from_arena(row: &EventRow, arena: &Arena, reason: FieldError) -> HeldRow {
    let payload = arena.payload(row);
    let sequence = arena.sequence(row);
    let raw = String::from_utf8_lossy(payload).into_owned();
    match ParsedRow::parse(payload, row.received_us, sequence.clone()) {
        Ok((parsed, _)) => parsed.held(vec![reason], raw),
        Err(_) => HeldRow {
            received_us: row.received_us,
            event_id: None,
            source: None,
            event_type: None,
            reasons: vec![reason],
            raw,
            sequence,
        },
    }
}

/// One file of a run, encoded.
struct RunFile {
    /// `table/dt=…/hour=…`.
    partition: String,
    name: String,
    bytes: Bytes,
    rows: usize,
}

/// The panic message of a caught panic, for a reason.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// Every file of one run (each typed group, then the quarantine's), and how many rows went
/// to the quarantine here, by the label of `floodgate_lake_quarantined_total` (counted once
/// the run is written). A row that does not fit its table goes to the quarantine with the
/// reference's reasons; a typed group that fails to encode (a bug the row check missed)
/// goes whole, each row with the error as its reason: no value may hold the consumer up.
/// Each quarantine file's rows are in stream order.
fn encode_run(
    rows: &Pending,
    tables: &HashMap<Arc<str>, Table>,
    (typed_stem, held_stem): (&str, &str),
    run: &str,
) -> Result<(Vec<RunFile>, BTreeMap<&'static str, u64>), EncodeError> {
    let mut files = Vec::new();
    let mut failed: BTreeMap<i64, Vec<HeldRow>> = BTreeMap::new();
    let mut quarantined: BTreeMap<&'static str, u64> = BTreeMap::new();
    for ((table_name, hour), group) in &rows.typed {
        let mut diverted = Vec::new();
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let table = tables.get(table_name).ok_or_else(|| {
                EncodeError::Arrow(arrow_schema::ArrowError::SchemaError(format!(
                    "no table {table_name}"
                )))
            })?;
            encode_group(table, group, &rows.arena, typed_stem, &mut diverted)
        }))
        .unwrap_or_else(|p| {
            Err(EncodeError::Arrow(arrow_schema::ArrowError::ComputeError(
                panic_text(&*p),
            )))
        });
        match encoded {
            Ok(bytes) => {
                let kept = group.len() - diverted.len();
                for (row, reason) in diverted {
                    *quarantined.entry(reason).or_default() += 1;
                    failed
                        .entry(hour_of(row.received_us))
                        .or_default()
                        .push(row);
                }
                if let Some(bytes) = bytes {
                    files.push(RunFile {
                        partition: partition_key(table_name, *hour),
                        name: format!("{typed_stem}-{run}.parquet"),
                        bytes,
                        rows: kept,
                    });
                }
            }
            Err(e) => {
                tracing::error!(table = %table_name, error = %e, rows = group.len(), "a lake file failed to encode; its rows go to the quarantine");
                *quarantined.entry("encode").or_default() += group.len() as u64;
                for row in group {
                    let reason = FieldError::new(
                        "",
                        format!("the lake could not write this event to {table_name}: {e}"),
                    );
                    failed
                        .entry(hour_of(row.received_us))
                        .or_default()
                        .push(held_from_arena(row, &rows.arena, reason));
                }
            }
        }
    }
    let hours: BTreeSet<i64> = rows.held.keys().chain(failed.keys()).copied().collect();
    let schema = floodgate_core::lake::quarantine_schema();
    for hour in hours {
        let mut group: Vec<&HeldRow> = rows
            .held
            .get(&hour)
            .into_iter()
            .chain(failed.get(&hour))
            .flatten()
            .collect();
        // Held at buffering, then diverted here: back in stream order (sequences are
        // decimal, so shorter is earlier).
        group.sort_by(|a, b| {
            (a.sequence.len(), a.sequence.as_bytes())
                .cmp(&(b.sequence.len(), b.sequence.as_bytes()))
        });
        let columns = quarantine_columns(&schema, &group, held_stem)?;
        files.push(RunFile {
            partition: partition_key(QUARANTINE_TABLE, hour),
            name: format!("{held_stem}-{run}.parquet"),
            bytes: parquet::encode(&schema, columns)?,
            rows: group.len(),
        });
    }
    Ok((files, quarantined))
}

impl LakeProcessor {
    /// Writes every group of `shard`'s buffer, then marks the run durable. On failure the
    /// buffer is left as it was and the run pinned (see the module docs); the files this
    /// attempt wrote stay (see `undo`).
    async fn flush(&self, shard: &ShardId) -> Result<(), ProcessError> {
        let flushed = self.flush_run(shard).await;
        if flushed.is_err() {
            metrics::counter!("floodgate_lake_flush_failures_total").increment(1);
        }
        flushed
    }

    /// [`Self::flush`] itself.
    async fn flush_run(&self, shard: &ShardId) -> Result<(), ProcessError> {
        let (rows, first, last) = {
            let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            let Some(buf) = shards.get_mut(shard) else {
                return Ok(());
            };
            let (Some(first), Some(last)) = (buf.first.clone(), buf.last.clone()) else {
                return Ok(());
            };
            buf.pinned = true;
            (buf.rows.clone(), first, last)
        };
        let started = Instant::now();
        let run = format!("{first}-{last}");
        // Building columns and encoding Parquet is CPU work of up to a few hundred ms: off
        // the async workers, so the edge's requests never wait behind it.
        let tables = self.by_name.clone();
        let stems = (shard.0.clone(), self.held_stem(shard));
        let run_name = run.clone();
        // One permit per file being encoded across the process (see `default_encoders`).
        let permit = self
            .encoders
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ProcessError::Other(format!("lake encoding of run {run}: {e}")))?;
        let waited = started.elapsed();
        let files = tokio::task::spawn_blocking(move || {
            let files = encode_run(&rows, &tables, (&stems.0, &stems.1), &run_name);
            drop(permit);
            files
        })
        .await
        .map_err(|e| ProcessError::Other(format!("lake encoding of run {run}: {e}")))?;
        let (files, quarantined) =
            files.map_err(|e| ProcessError::Other(format!("lake encoding of run {run}: {e}")))?;
        metrics::histogram!("floodgate_lake_encode_wait_seconds").record(waited.as_secs_f64());
        let mut written: Vec<String> = Vec::new();
        let (mut bytes_written, mut rows_written) = (0u64, 0usize);
        for file in files {
            // Not a run compaction already merged (a replay).
            let covered = match crate::compact::manifest(&*self.store, &file.partition).await {
                Ok(m) => m.covers(&file.name),
                Err(e) => return Err(self.undo(&written, e).await),
            };
            if covered {
                continue;
            }
            let key = format!("{}/{}", file.partition, file.name);
            let (bytes, rows) = (file.bytes.len() as u64, file.rows);
            // Create-only: a file of this name holds this run's rows already (written by
            // an earlier attempt whose answer was lost, or before a crash), so it is kept.
            match self.store.put_new(&key, file.bytes).await {
                Ok(PutOutcome::Created) => {
                    bytes_written += bytes;
                    rows_written += rows;
                    written.push(key);
                }
                Ok(PutOutcome::Exists) => {
                    metrics::counter!("floodgate_lake_files_present_total").increment(1);
                    tracing::debug!(%key, "lake file present already; kept");
                }
                Err(e) => {
                    return Err(self
                        .undo(&written, ProcessError::Other(e.to_string()))
                        .await);
                }
            }
        }
        for (reason, rows) in quarantined {
            metrics::counter!("floodgate_lake_quarantined_total", "reason" => reason)
                .increment(rows);
        }
        metrics::counter!("floodgate_lake_files_total").increment(written.len() as u64);
        metrics::counter!("floodgate_lake_rows_total").increment(rows_written as u64);
        metrics::counter!("floodgate_lake_bytes_total").increment(bytes_written);
        metrics::histogram!("floodgate_lake_flush_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(%shard, %first, %last, files = written.len(), rows = rows_written, "lake flush");
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let buf = shards.entry(shard.clone()).or_default();
        buf.rows = Arc::default();
        buf.first = None;
        buf.last = None;
        buf.opened = None;
        buf.pinned = false;
        buf.durable = Some(last);
        Ok(())
    }

    /// After a failed flush: the files it wrote stay. Each is named by the pinned run and
    /// holds exactly its rows, so the retry (same run, same names) finds them there, and
    /// so does a later tenure's discovery, which ends its runs where they end. Removing
    /// them would not be safe: another worker that took the shard meanwhile may have found
    /// one, counted it written, and moved its checkpoint past it. Returns `error`.
    async fn undo(&self, written: &[String], error: ProcessError) -> ProcessError {
        tracing::warn!(error = %error, files = written.len(), "lake flush failed; the run is kept for the retry");
        error
    }

    /// At a shard's first batch: the ends of the runs the lake holds (or held) from
    /// `first` on. A restart after a crash finds the unfinished run; a replay from an
    /// earlier position finds every run it must reproduce, so names (and compaction
    /// records) match and no row is written twice.
    async fn runs_from(
        &self,
        shard: &ShardId,
        first: &SequenceNumber,
    ) -> Result<Vec<SequenceNumber>, ProcessError> {
        let diverted = match self.scope {
            Scope::Events => Diverted::By(self.consumer),
            Scope::Quarantine => Diverted::Never,
        };
        let runs = runs_of(
            &*self.store,
            std::slice::from_ref(shard),
            &self.table_names(),
            diverted,
        )
        .await?;
        // In order, once each: two runs that end at the same record (a file of the same
        // run in two tables) are one boundary.
        let mut ends: Vec<SequenceNumber> = runs
            .get(shard)
            .into_iter()
            .flatten()
            .filter(|(f, _)| f >= first)
            .map(|(_, l)| l.clone())
            .collect();
        ends.sort();
        ends.dedup();
        Ok(ends)
    }

    fn is_pinned(&self, shard: &ShardId) -> bool {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        shards.get(shard).is_some_and(|b| b.pinned)
    }
}

#[async_trait]
impl ShardProcessor for LakeProcessor {
    fn consumer(&self) -> &str {
        self.consumer
    }

    async fn start_position(
        &self,
        shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
        // A new tenure on the shard: what an earlier one buffered (or learned of the runs)
        // may be stale, since another worker may have written the shard's runs since. The
        // records after the checkpoint are read again, as after a restart.
        let dropped = self
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(shard);
        if dropped.is_some_and(|b| b.first.is_some()) {
            tracing::info!(%shard, "dropped an earlier tenure's buffer; its records are read again");
        }
        Ok(None)
    }

    async fn process(&self, shard: &ShardId, records: &[StoredRecord]) -> Result<(), ProcessError> {
        let Some(head) = records.first() else {
            return Ok(());
        };
        let needs_start = {
            let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            !shards.get(shard).is_some_and(|b| b.started)
        };
        if needs_start {
            let boundaries: VecDeque<SequenceNumber> = match &self.planned {
                Some(runs) => {
                    let mut ends = runs.get(shard).cloned().unwrap_or_default();
                    ends.sort();
                    ends.into_iter().filter(|e| *e >= head.sequence).collect()
                }
                None => {
                    let ends = self.runs_from(shard, &head.sequence).await?;
                    if let Some(last) = ends.last() {
                        tracing::info!(%shard, first = %head.sequence, %last, runs = ends.len(), "reproducing the lake's runs");
                    }
                    ends.into_iter().collect()
                }
            };
            let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            let buf = shards.entry(shard.clone()).or_default();
            buf.boundaries = boundaries;
            buf.started = true;
        }
        // A run whose flush failed is written first, exactly as it was.
        if self.is_pinned(shard) {
            self.flush(shard).await?;
        }
        let mut since_yield = 0;
        for r in records {
            // A batch retried after a failure: these are buffered or written already.
            let taken = {
                let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
                shards
                    .get(shard)
                    .and_then(|b| b.taken.as_ref())
                    .is_some_and(|t| r.sequence <= *t)
            };
            if taken {
                continue;
            }
            let mut row = Some(self.row_of(r));
            while let Some(next) = row.take() {
                let flush_now = {
                    let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
                    let buf = shards.entry(shard.clone()).or_default();
                    // Reproducing a run, the buffer ends exactly where the run did.
                    let free = buf.boundaries.is_empty();
                    let limit = self.config.roll_bytes;
                    let passed = buf
                        .boundaries
                        .front()
                        .filter(|end| **end < r.sequence)
                        .cloned();
                    if let Some(end) = passed {
                        // A run the store holds ended at a record this tenure never saw
                        // (dropped as a repeat): the buffer ends there too, under that
                        // run's name, before this record. Waiting for it would hold the
                        // buffer forever.
                        buf.boundaries.pop_front();
                        row = Some(next);
                        if buf.first.is_some() {
                            buf.last = Some(end);
                            true
                        } else {
                            false
                        }
                    } else if free
                        && buf.first.is_some()
                        && buf.rows.bytes + buf.rows.growth(&next, self.chunk_bytes) > limit
                    {
                        // Full: what is buffered goes first, then this row starts the next run.
                        row = Some(next);
                        true
                    } else {
                        buf.taken = Some(r.sequence.clone());
                        if buf.first.is_none() {
                            buf.first = Some(r.sequence.clone());
                            buf.opened = Some(Instant::now());
                        }
                        buf.last = Some(r.sequence.clone());
                        Arc::make_mut(&mut buf.rows).push(next, self.chunk_bytes);
                        self.peak
                            .fetch_max(buf.rows.bytes, std::sync::atomic::Ordering::Relaxed);
                        if buf.boundaries.front() == Some(&r.sequence) {
                            buf.boundaries.pop_front();
                            true
                        } else {
                            free && buf.rows.bytes >= limit
                        }
                    }
                };
                if flush_now {
                    self.flush(shard).await?;
                }
            }
            since_yield += 1;
            if since_yield == YIELD_EVERY_RECORDS {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        let aged = {
            let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            shards.get(shard).is_some_and(|b| {
                b.boundaries.is_empty()
                    && b.opened
                        .is_some_and(|o| o.elapsed() >= self.config.roll_age)
            })
        };
        if aged {
            self.flush(shard).await?;
        }
        metrics::gauge!("floodgate_lake_buffered_bytes", "consumer" => self.consumer)
            .set(self.buffered_bytes() as f64);
        Ok(())
    }

    fn progress(&self, shard: &ShardId) -> Progress {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        Progress::Through(shards.get(shard).and_then(|b| b.durable.clone()))
    }

    async fn end_of_shard(&self, shard: &ShardId) -> Result<(), ProcessError> {
        // No later record will end a run: whatever is buffered is the shard's last run.
        let due = {
            let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            shards
                .get(shard)
                .is_some_and(|b| b.pinned || b.first.is_some())
        };
        if due {
            self.flush(shard).await?;
        }
        Ok(())
    }

    async fn tick(&self, shard: &ShardId, last: bool) -> Result<(), ProcessError> {
        let due = {
            let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            shards.get(shard).is_some_and(|b| {
                b.pinned
                    || (b.first.is_some()
                        && if last {
                            // Stopping in the middle of a run the store holds would write a
                            // shorter run beside its files: leave it to the next start,
                            // which reads it again (the checkpoint is behind it). A rebuild
                            // writes into an empty store and keeps every row.
                            b.boundaries.is_empty() || self.planned.is_some()
                        } else {
                            b.boundaries.is_empty()
                                && b.opened
                                    .is_some_and(|o| o.elapsed() >= self.config.roll_age)
                        })
            })
        };
        if due {
            self.flush(shard).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_partitions() {
        assert_eq!(
            parse_file_name("shard-0001-10-20.parquet", "shard-0001"),
            Some(("10", "20"))
        );
        assert_eq!(
            parse_file_name("shard-0001-10-20.parquet", "shard-0002"),
            None
        );
        assert_eq!(
            parse_file_name("shard-0001-x-20.parquet", "shard-0001"),
            None
        );
        assert_eq!(parse_file_name("0--20.parquet", "0"), None);
        // A diverted file is its consumer's, never the quarantine log's shard `0`.
        assert_eq!(parse_file_name("lake.0-10-20.parquet", "0"), None);
        for (d, want) in [
            (Diverted::By("lake"), Some(("10", "20"))),
            (Diverted::AnyConsumer, Some(("10", "20"))),
            (Diverted::By("lake-derived"), None),
            (Diverted::Never, None),
        ] {
            assert_eq!(parse_diverted_name("lake.0-10-20.parquet", "0", d), want);
        }
        assert_eq!(
            parse_diverted_name("0-10-20.parquet", "0", Diverted::AnyConsumer),
            None
        );
        let us = parquet::rfc3339_micros("2026-11-22T23:59:59.5+01:00").unwrap();
        assert_eq!(partition(hour_of(us)), ("2026-11-22".to_owned(), 22));
        let before_1970 = parquet::rfc3339_micros("1969-12-31T23:30:00Z").unwrap();
        assert_eq!(
            partition(hour_of(before_1970)),
            ("1969-12-31".to_owned(), 23)
        );
        assert_eq!(partition_key("t", 0), "t/dt=1970-01-01/hour=00");
    }

    /// The last line of defence: a table file that fails to encode (here: a column type
    /// the encoder lacks) sends its rows to the quarantine with the error, and the run
    /// still writes.
    #[test]
    fn a_file_that_fails_to_encode_goes_to_the_quarantine() {
        let mut fields = floodgate_core::lake::envelope_fields();
        fields.push(arrow_schema::Field::new("x", DataType::Float32, true));
        let table = Table {
            name: "t".to_owned(),
            event_type: "t".to_owned(),
            schema: Arc::new(arrow_schema::Schema::new(fields)),
            data_members: vec!["x".to_owned()],
        };
        let payload = br#"{"id":"e1","source":"/s","type":"t","data":{"x":1.5}}"#;
        let mut rows = Pending::default();
        let row = Row::Typed {
            group: (Arc::from("t"), 0),
            payload,
            sequence: "7",
            received_us: 0,
            spans: None,
        };
        rows.push(row, 256);
        let tables = HashMap::from([(Arc::from("t"), table)]);
        let (files, quarantined) = encode_run(&rows, &tables, ("0", "lake.0"), "7-7").unwrap();
        assert_eq!(quarantined, BTreeMap::from([("encode", 1)]));
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].partition, "quarantine/dt=1970-01-01/hour=00");
        assert_eq!(files[0].name, "lake.0-7-7.parquet");
        assert_eq!(files[0].rows, 1);
        // The row keeps the event's own text and ids.
        let held = held_from_arena(
            &rows.typed[&(Arc::from("t"), 0)][0],
            &rows.arena,
            FieldError::new("", "x"),
        );
        assert_eq!(held.raw.as_bytes(), payload);
        assert_eq!(held.event_id.as_deref(), Some("e1"));
        assert_eq!(held.sequence, "7");
    }

    /// A buffer's count of its memory is what it allocated, row after row, whatever the
    /// mix of typed rows (small and larger than a chunk), groups and quarantine rows; and
    /// every row reads back as it came.
    #[test]
    fn a_buffer_counts_exactly_what_it_allocated() {
        let mut rows = Pending::default();
        let chunk = 1024;
        let mut texts = Vec::new();
        for i in 0..3000usize {
            let text = format!(
                r#"{{"id":"e{i}","pad":"{}"}}"#,
                "x".repeat(if i % 97 == 0 { 3000 } else { i % 300 })
            );
            texts.push(text);
        }
        let sequences: Vec<String> = (0..3000u64).map(|i| (1_000_000 + i).to_string()).collect();
        for (i, text) in texts.iter().enumerate() {
            let row = if i % 50 == 7 {
                Row::Held(HeldRow {
                    received_us: (i as i64 % 3) * MICROS_PER_HOUR,
                    event_id: Some(format!("e{i}")),
                    source: None,
                    event_type: Some("t".to_owned()),
                    reasons: vec![FieldError::new("/data/x", "does not fit")],
                    raw: text.clone(),
                    sequence: sequences[i].clone(),
                })
            } else {
                Row::Typed {
                    group: (Arc::from(if i % 2 == 0 { "a" } else { "b" }), i as i64 % 5),
                    payload: text.as_bytes(),
                    sequence: &sequences[i],
                    received_us: 0,
                    spans: None,
                }
            };
            let before = rows.bytes;
            let growth = rows.growth(&row, chunk);
            rows.push(row, chunk);
            assert_eq!(rows.bytes, before + growth);
            assert_eq!(rows.bytes, rows.recount(), "after row {i}");
        }
        let payload_bytes: usize = texts.iter().map(String::len).sum();
        // The text (here about 200 bytes an event), its sequences, 56 bytes a row, and a
        // chunk's slack: nothing like a tree of parsed values (four to five times the text).
        assert_eq!(std::mem::size_of::<EventRow>(), 56);
        assert!(
            (rows.bytes as usize) < payload_bytes * 7 / 4,
            "{} bytes for {payload_bytes} of text",
            rows.bytes
        );
        let mut read = 0;
        for group in rows.typed.values() {
            for row in group {
                let seq = rows.arena.sequence(row);
                let i: usize = seq.parse::<usize>().unwrap() - 1_000_000;
                assert_eq!(rows.arena.payload(row), texts[i].as_bytes());
                read += 1;
            }
        }
        assert_eq!(read, 3000 - 60);
        // A copy (made when a cancelled flush still holds the buffer) holds no more than
        // the count it inherits: the count stays a bound.
        assert!(rows.clone().recount() <= rows.bytes);
    }

    #[test]
    fn a_producers_clock_picks_the_partition_only_within_the_window() {
        let received = parquet::rfc3339_micros("2026-12-01T15:00:00Z").unwrap();
        let at = |t: &str| partition_micros(parquet::rfc3339_micros(t), received);
        assert_eq!(at("2026-12-01T14:10:00Z"), at("2026-12-01T14:10:00Z"));
        assert_eq!(
            hour_of(at("2026-12-01T14:10:00Z")),
            hour_of(received) - 1,
            "a little late: its own hour"
        );
        assert_eq!(
            at("2026-11-24T15:00:00Z"),
            received - LATE_WINDOW_US,
            "7 days late: still its own"
        );
        for far in [
            "2026-11-24T14:59:59.999999Z",
            "1900-01-01T00:00:00Z",
            "0061-04-27T00:00:00Z",
            "2999-01-01T00:00:00Z",
            "2026-12-01T15:00:00.001Z",
        ] {
            assert_eq!(at(far), received, "{far}");
        }
        assert_eq!(partition_micros(None, received), received);
    }

    /// A table with a column of every kind the lake writes.
    fn every_kind() -> Table {
        use arrow_schema::{Field, Fields};
        let mut fields = floodgate_core::lake::envelope_fields();
        let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        fields.extend([
            Field::new("s", DataType::Utf8, true),
            Field::new("d", dictionary, false),
            Field::new("i8", DataType::Int8, true),
            Field::new("i16", DataType::Int16, true),
            Field::new("i32", DataType::Int32, false),
            Field::new("i64", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("b", DataType::Boolean, true),
            Field::new("ts", floodgate_core::lake::timestamp(), true),
            Field::new("dt", DataType::Date32, true),
            Field::new(
                "st",
                DataType::Struct(Fields::from(vec![
                    Field::new("a", DataType::Int8, false),
                    Field::new("b", DataType::Utf8, true),
                ])),
                true,
            ),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new("item", DataType::Int16, true))),
                true,
            ),
        ]);
        let members = [
            "s", "d", "i8", "i16", "i32", "i64", "f", "b", "ts", "dt", "st", "l",
        ];
        Table {
            name: "t".to_owned(),
            event_type: "t".to_owned(),
            schema: Arc::new(arrow_schema::Schema::new(fields)),
            data_members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    /// JSON texts a member's value is drawn from: every kind, near every bound, escaped
    /// and not, and values that fit no column.
    const VALUES: &[&str] = &[
        r#""abc""#,
        r#""a\"b\u00e9""#,
        r#""\ud83d\ude00""#,
        r#""""#,
        r#""2026-12-01T10:00:00Z""#,
        r#""2026-12-01T10:00:00.123456+02:00""#,
        r#""2026-12-01""#,
        r#""2026-13-01""#,
        r#""\u0032026-12-01""#,
        "0",
        "1",
        "-1",
        "127",
        "128",
        "-129",
        "300",
        "32768",
        "70000",
        "2147483648",
        "3000000000",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "-9223372036854775808",
        "2.0",
        "1e0",
        "2.5",
        "-0",
        "-0.0",
        "1e19",
        "1.5e300",
        "true",
        "false",
        "null",
        "{}",
        r#"{"a":1}"#,
        r#"{"a":1,"b":"x"}"#,
        r#"{"a":300}"#,
        r#"{"b":"x"}"#,
        "[]",
        "[1,2,null]",
        "[1,40000]",
        r#"["x"]"#,
        "[[1]]",
    ];

    /// Values that fit each column of [`every_kind`], in its member order.
    const FITTING: [&[&str]; 12] = [
        &[r#""abc""#, r#""a\"b\u00e9""#, r#""""#, "null"],
        &[r#""x""#, r#""y\n""#],
        &["0", "-128", "127", "2.0", "null"],
        &["-32768", "32767", "1e0", "-0"],
        &["7", "2147483647", "-2147483648", "-0.0", "3e2"],
        &["9223372036854775807", "-9223372036854775808", "1e18", "5"],
        &["2.5", "1", "18446744073709551615", "-0.0", "1.5e300"],
        &["true", "false"],
        &[
            r#""2026-12-01T10:00:00Z""#,
            r#""2026-12-01T10:00:00.123456+02:00""#,
            "1700000000000000",
        ],
        &[r#""2026-12-01""#, r#""\u0032026-12-01""#, r#""1970-01-01""#],
        &[r#"{"a":1}"#, r#"{"a":1,"b":"x","c":[]}"#, "null"],
        &["[]", "[1,2,null]", "null"],
    ];

    /// Values just outside each column of [`every_kind`]: past its range, of a near type.
    const NEAR: [&[&str]; 12] = [
        &["1", "true", "[]"],
        &["null", "5"],
        &["128", "-129", "1.5", r#""1""#],
        &["32768", "-32769", "1e5"],
        &["2147483648", "-2147483649", "2.5", "null"],
        &["9223372036854775808", "1e19", "-9.3e18"],
        &[r#""1""#, "true"],
        &["1", r#""true""#],
        &[
            "1.5",
            r#""2026-12-01""#,
            "18446744073709551615",
            r#""2026-12-01T25:00:00Z""#,
        ],
        &[r#""2026-12-01T10:00:00Z""#, r#""2026-02-30""#, "20261201"],
        &[r#"{"b":"x"}"#, r#"{"a":300}"#, "[1]", r#"{"a":null}"#],
        &["[40000]", r#"["x"]"#, "{}", "[1.5]"],
    ];

    /// Values the edge would refuse but the stream can still hold (a rebuild reads any
    /// log): numbers out of range, lone surrogates, nesting about serde_json's limit
    /// (which the reference meets two levels into the event, and the typed way would meet
    /// later were it not for its own bound).
    fn hostile_values() -> Vec<String> {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let mut out: Vec<String> = ["1e400", "-1e400", r#""\ud800""#, r#""\udc00x""#]
            .iter()
            .map(|v| (*v).to_owned())
            .collect();
        out.push(format!("1{}", "0".repeat(400)));
        for n in [63, 64, 65, 124, 125, 126, 127, 130] {
            out.push(deep(n));
            out.push(format!(r#"{{"a":1,"c":{}}}"#, deep(n)));
        }
        out
    }

    /// [`VALUES`] and [`hostile_values`].
    fn all_values() -> &'static [String] {
        static ALL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
            let mut all: Vec<String> = VALUES.iter().map(|v| (*v).to_owned()).collect();
            all.extend(hostile_values());
            all
        });
        &ALL
    }

    /// An event's text for [`every_kind`], and whether the typed way must take it (every
    /// column fitting, a plain envelope, nothing extra).
    fn event_text() -> impl proptest::strategy::Strategy<Value = (String, bool)> {
        use proptest::prelude::*;
        let values = all_values().len();
        // Per column: absent, any value, a near miss, or (mostly) a fitting value.
        let column = (0usize..20, 0usize..8, 0..values);
        let columns = proptest::collection::vec(column, 12);
        // Extra members: unknown ones (some with escaped names) and repeats.
        let extra = proptest::collection::vec((0usize..16, 0..values), 0..3);
        let envelope = (0usize..8, 0usize..10, 0usize..8, 0usize..5);
        (columns, extra, envelope).prop_map(|(columns, extra, (id, time, data, order))| {
            let names = [
                "s", "d", "i8", "i16", "i32", "i64", "f", "b", "ts", "dt", "st", "l",
            ];
            let all = all_values();
            let mut members = Vec::new();
            for (m, &(how, fitting, any)) in columns.iter().enumerate() {
                match how {
                    0 => {}
                    1 => members.push(format!(r#""{}":{}"#, names[m], all[any])),
                    2 => {
                        let pool = NEAR[m];
                        members.push(format!(r#""{}":{}"#, names[m], pool[fitting % pool.len()]));
                    }
                    _ => {
                        let pool = FITTING[m];
                        members.push(format!(r#""{}":{}"#, names[m], pool[fitting % pool.len()]));
                    }
                }
            }
            for &(m, v) in &extra {
                let name = match m {
                    12 => r"\u0069\u0038", // "i8", escaped
                    13 => r#"o\"x"#,
                    _ => names.get(m).copied().unwrap_or("other"),
                };
                members.push(format!(r#""{name}":{}"#, all[v]));
            }
            let n = members.len().max(1);
            members.rotate_left(order % n);
            let data_text = format!("{{{}}}", members.join(","));
            let mut parts = vec![
                r#""source":"/s""#.to_owned(),
                r#""type":"t""#.to_owned(),
                r#""specversion":"1.0""#.to_owned(),
            ];
            let id = id.saturating_sub(4);
            parts.push([r#""id":"e1""#, r#""id":"e\u0031""#, r#""id":1"#, ""][id].to_owned());
            // Times about when the events are received (see the test), inside and outside
            // the late window, with offsets and fractions.
            let times = [
                r#""time":"2026-12-01T10:00:00Z""#,
                r#""time":"2026-12-01T09:59:59.999999-01:00""#,
                r#""time":"2026-11-24T11:30:00.5+01:30""#,
                r#""time":"2026-12-01T23:59:60Z""#,
                "",
                r#""time":"yesterday""#,
                r#""time":null"#,
                r#""time":5"#,
            ];
            let time = time.min(times.len() - 1);
            parts.push(times[time].to_owned());
            let data = data.saturating_sub(4);
            parts.push(
                [
                    format!(r#""data":{data_text}"#),
                    r#""data":null"#.to_owned(),
                    r#""data":[1]"#.to_owned(),
                    String::new(),
                ][data]
                    .clone(),
            );
            parts.retain(|p| !p.is_empty());
            let n = parts.len();
            parts.rotate_left(order % n);
            let plain = columns.iter().all(|&(how, _, _)| how >= 3)
                && extra.is_empty()
                && id <= 1
                && time <= 4
                && data == 0;
            (format!("{{{}}}", parts.join(",")), plain)
        })
    }

    /// A lake over [`every_kind`] in a scratch directory.
    fn every_kind_lake() -> (tempfile::TempDir, LakeProcessor) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(floodgate_sinks::LocalDirStore::open(dir.path()).unwrap());
        let config = LakeConfig {
            roll_bytes: 1 << 20,
            roll_age: Duration::from_secs(3600),
        };
        (dir, LakeProcessor::new(store, vec![every_kind()], config))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Every row ends where the reference puts it: placed by its envelope (or, when
        /// that declines, by the reference) in the reference's table and hour, then, at
        /// encoding, kept in the file or diverted to the quarantine with the reference's
        /// reasons. Every plain row is placed by its envelope and read the typed way; and
        /// the columns built for the rows kept, whichever way each was read, are the
        /// reference's.
        #[test]
        fn typed_rows_agree_with_the_reference(
            texts in proptest::collection::vec(event_text(), 1..40),
        ) {
            let (_dir, lake) = every_kind_lake();
            let table = every_kind();
            let layout = Layout::of(&table);
            // 2026-12-01T10:00:00Z, and receipts around it: before the events' times,
            // within the late window after them, and past it.
            let base_ms = 1_796_119_200_000_i64;
            let offsets_ms = [1_800_000, 7_200_000, -3_600_000, 691_200_000, 518_400_000];
            let mut arena = Arena::default();
            let mut rows = Vec::new();
            let mut parsed = Vec::new();
            let mut expected_held = Vec::new();
            for (i, (text, plain)) in texts.iter().enumerate() {
                let record = StoredRecord {
                    sequence: SequenceNumber::from_u64(10_000 + i as u64),
                    key: "k".to_owned(),
                    payload: Bytes::copy_from_slice(text.as_bytes()),
                    appended_at_ms: base_ms + offsets_ms[i % offsets_ms.len()],
                };
                let received_us = record.appended_at_ms * 1000;
                let placed = lake.fits(&record.payload, received_us);
                let reference = lake.reference_row(&record, received_us);
                if *plain {
                    proptest::prop_assert!(placed.is_some(), "the envelope declined a plain row: {}", text);
                    let head = Head::read(text.as_bytes(), &|_| Some(&layout));
                    proptest::prop_assert!(head.and_then(|h| layout.stage(h)).is_some(), "typed declined a plain row: {}", text);
                }
                let buffered = match lake.row_of(&record) {
                    Row::Typed { group, spans, .. } => {
                        // What encoding reads from the spans is what it reads from the
                        // whole event.
                        if let Some(spans) = &spans {
                            let whole = Head::read(text.as_bytes(), &|_| Some(&layout))
                                .and_then(|h| layout.stage(h));
                            proptest::prop_assert_eq!(layout.stage_spans(text.as_bytes(), spans), whole, "{}", text);
                        }
                        Some((group, spans))
                    }
                    Row::Held(held) => {
                        proptest::prop_assert!(placed.is_none(), "{}", text);
                        proptest::prop_assert!(matches!(&reference, Row::Held(r) if *r == held), "{}", text);
                        None
                    }
                };
                match &reference {
                    Row::Typed { group, .. } => {
                        proptest::prop_assert_eq!(buffered.as_ref().map(|b| &b.0), Some(group), "{}", text);
                        let sequence = record.sequence.to_string();
                        parsed.push(ParsedRow::parse(text.as_bytes(), received_us, sequence).unwrap().0);
                    }
                    // Placed by its envelope, the reference's to divert at encoding.
                    Row::Held(held) if buffered.is_some() => expected_held.push(held.clone()),
                    Row::Held(_) => {}
                }
                if let Some((_, spans)) = buffered {
                    let sequence = record.sequence.to_string();
                    let (chunk, start) = arena.push([text.as_bytes(), sequence.as_bytes()], 4096);
                    rows.push(EventRow {
                        received_us,
                        payload_len: text.len() as u32,
                        chunk,
                        start,
                        sequence_len: sequence.len() as u32,
                        spans,
                    });
                }
            }
            let mut columns = Columns::new(&table, rows.len()).unwrap();
            // Twice through the same builders: they must be left ready for the next slice.
            for _ in 0..2 {
                let mut diverted = Vec::new();
                let typed = slice_columns(
                    &table, &layout, &mut columns, &rows, &arena, "shard-0", &mut diverted,
                )
                .unwrap();
                let held: Vec<HeldRow> = diverted.into_iter().map(|(h, _)| h).collect();
                proptest::prop_assert_eq!(&held, &expected_held);
                let reference = columns_for(&table, &parsed, "shard-0").unwrap();
                proptest::prop_assert_eq!(typed.len(), reference.len());
                for (i, (a, b)) in typed.iter().zip(&reference).enumerate() {
                    proptest::prop_assert_eq!(a.to_data(), b.to_data(), "column {}", i);
                }
            }
        }
    }

    /// Where each event ends, as the lake decides it: buffered by its envelope (or the
    /// reference) and then kept at encoding, or held at either step. `None`: held.
    fn decided(lake: &LakeProcessor, record: &StoredRecord) -> Option<(Arc<str>, i64)> {
        let Row::Typed { group, spans, .. } = lake.row_of(record) else {
            return None;
        };
        let table = every_kind();
        let sequence = record.sequence.to_string();
        let mut arena = Arena::default();
        let (chunk, start) = arena.push([&record.payload, sequence.as_bytes()], 4096);
        let row = EventRow {
            received_us: record.appended_at_ms * 1000,
            payload_len: record.payload.len() as u32,
            chunk,
            start,
            sequence_len: sequence.len() as u32,
            spans,
        };
        let mut diverted = Vec::new();
        encode_group(&table, &[row], &arena, "shard-0", &mut diverted).unwrap();
        diverted.is_empty().then_some(group)
    }

    /// Wherever a hostile value stands, the lake keeps its event only as the reference
    /// does: not at all when the reference cannot read it.
    #[test]
    fn hostile_values_are_read_as_the_reference_reads_them() {
        let (_dir, lake) = every_kind_lake();
        let received_us = 1_796_119_200_000_000;
        let row = |text: String| {
            let record = StoredRecord {
                sequence: SequenceNumber::from_u64(1),
                key: "k".to_owned(),
                payload: Bytes::from(text),
                appended_at_ms: received_us / 1000,
            };
            let placed = lake.fits(&record.payload, received_us);
            let reference = match lake.reference_row(&record, received_us) {
                Row::Typed { group, .. } => Some(group),
                Row::Held(_) => None,
            };
            (placed, decided(&lake, &record), reference)
        };
        let fitting = r#""d":"x","i32":7"#;
        let mut unreadable = 0;
        for value in hostile_values() {
            for member in ["other", "st", "l", "s", "f"] {
                let text = format!(
                    r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting},"{member}":{value}}}}}"#
                );
                let (_, decided, reference) = row(text.clone());
                assert_eq!(decided, reference, "{text}");
                unreadable += usize::from(reference.is_none() && member == "other");
            }
        }
        // Out of range, lone surrogates, and the deepest nestings (in `other` alone).
        assert_eq!(unreadable, 12, "the reference refuses what it cannot read");
        // …and the same event without them is placed by its envelope, whichever of `type`
        // and `data` comes first…
        for text in [
            format!(r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting}}}}}"#),
            format!(r#"{{"data":{{{fitting}}},"id":"e1","source":"/s","type":"t"}}"#),
        ] {
            let (placed, decided, reference) = row(text);
            // Encoding will read its `data` alone.
            assert!(placed.as_ref().is_some_and(|p| p.spans.is_some()));
            let placed = placed.map(|p| p.group);
            assert!(placed.is_some() && placed == reference && decided == reference);
        }
        // …but not with anything after it, nor with a member twice.
        for text in [
            format!(r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting}}}}}x"#),
            format!(r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting}}}}} {{}}"#),
            format!(r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting}}},"type":"t"}}"#),
            format!(r#"{{"id":"e1","source":"/s","type":"t","data":{{{fitting}}},"data":{{}}}}"#),
        ] {
            let (placed, decided, reference) = row(text.clone());
            assert!(placed.is_none() && decided == reference, "{text}");
        }
    }

    /// A row placed by its envelope that does not fit is diverted when its file is
    /// encoded: out of the typed file, into the run's quarantine file in stream order
    /// among the rows held at buffering, named by its pointer, and counted for the metric
    /// (once the run is written).
    #[test]
    fn a_misfit_placed_by_its_envelope_is_diverted_at_encoding() {
        use arrow_array::Array;
        let (_dir, lake) = every_kind_lake();
        let received_ms = 1_796_119_200_000;
        let texts = [
            (
                9,
                r#"{"id":"a","source":"/s","type":"t","data":{"d":"x","i32":7.5}}"#,
            ),
            (
                10,
                r#"{"id":"b","source":"/s","type":"t","data":{"d":"x","i32":7}}"#,
            ),
            (11, r#"{"id":"c","source":"/s","type":"nope","data":{}}"#),
        ];
        let records: Vec<StoredRecord> = texts
            .iter()
            .map(|(sequence, text)| StoredRecord {
                sequence: SequenceNumber::from_u64(*sequence),
                key: "k".to_owned(),
                payload: Bytes::from_static(text.as_bytes()),
                appended_at_ms: received_ms,
            })
            .collect();
        let mut rows = Pending::default();
        for record in &records {
            rows.push(lake.row_of(record), 4096);
        }
        assert_eq!(rows.typed.values().map(Vec::len).sum::<usize>(), 2);
        let (files, quarantined) =
            encode_run(&rows, &lake.by_name, ("0", "lake.0"), "9-11").unwrap();
        assert_eq!(quarantined, BTreeMap::from([("does_not_fit", 1)]));
        let read = |bytes: &Bytes| -> Vec<arrow_array::RecordBatch> {
            ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
                .unwrap()
                .build()
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let strings = |batch: &arrow_array::RecordBatch, column: &str| -> Vec<String> {
            let array = batch.column_by_name(column).unwrap();
            let array = array.as_any().downcast_ref::<StringArray>().unwrap();
            (0..array.len())
                .map(|i| array.value(i).to_owned())
                .collect()
        };
        assert_eq!(files.len(), 2);
        assert!(
            files[0].partition.starts_with("t/"),
            "{}",
            files[0].partition
        );
        assert_eq!(files[0].rows, 1);
        let typed = read(&files[0].bytes);
        assert_eq!(strings(&typed[0], "event_id"), ["b"]);
        assert!(files[1].partition.starts_with("quarantine/"));
        assert_eq!(files[1].rows, 2);
        let held = read(&files[1].bytes);
        assert_eq!(strings(&held[0], "sequence"), ["9", "11"]);
        assert_eq!(strings(&held[0], "event_id"), ["a", "c"]);
        let reasons = held[0].column_by_name("reasons").unwrap();
        let reasons = reasons.as_any().downcast_ref::<ListArray>().unwrap();
        let first = reasons.value(0);
        let first = first.as_any().downcast_ref::<StructArray>().unwrap();
        let pointer = first
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(pointer.value(0), "/data/i32");
    }

    /// The benches' entry point reads and checks rows as buffering does: a misfit, typed
    /// way or not, is named by its place.
    #[test]
    fn encode_events_names_the_first_misfit() {
        let table = every_kind();
        let fitting = br#"{"id":"e1","source":"/s","type":"t","data":{"d":"x","i32":7}}"#;
        let escaped = br#"{"id":"e\u0032","source":"/s","type":"t","data":{"d":"x","i32":7.0}}"#;
        let misfit = br#"{"id":"e3","source":"/s","type":"t","data":{"d":"x","i32":7.5}}"#;
        let events = [
            (&fitting[..], 1, "1"),
            (&escaped[..], 2, "2"),
            (&misfit[..], 3, "3"),
        ];
        let file = encode_events(&table, "shard-0", &events[..2]).unwrap();
        let rows: usize =
            ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap().num_rows())
                .sum();
        assert_eq!(rows, 2);
        let e = encode_events(&table, "shard-0", &events).unwrap_err();
        assert!(e.to_string().contains("event 2: /data/i32"), "{e}");
    }

    /// An event is read as text after one UTF-8 check of the whole; its row is the one its
    /// bytes give, for text that is not UTF-8 throughout too (serde_json does not check the
    /// strings it skips).
    #[test]
    fn a_head_read_as_text_is_the_head_its_bytes_give() {
        let table = every_kind();
        let layout = Layout::of(&table);
        let texts: [&'static [u8]; 6] = [
            br#"{"id":"e1","source":"/s","type":"t","data":{"d":"x","i32":7}}"#,
            "{\"id\":\"é\\u00e9\\\"\",\"source\":\"/s\",\"type\":\"t\",\"data\":{\"d\":\"ü\",\"i32\":7}}"
                .as_bytes(),
            "{\"id\":\"a\u{1}b\",\"source\":\"/s\",\"type\":\"t\",\"data\":{\"d\":\"x\",\"i32\":7}}"
                .as_bytes(),
            br#"{"id":"e1","source":"/s","type":"t","data":{"d":"x","i32":7}} x"#,
            b"{\"zz\":\"\xc3\",\"id\":\"e1\",\"source\":\"/s\",\"type\":\"t\",\"data\":{\"d\":\"x\",\"i32\":7}}",
            b"{\"id\":\"e\xff\",\"source\":\"/s\",\"type\":\"t\",\"data\":{\"d\":\"x\",\"i32\":7}}",
        ];
        for text in texts {
            let got = Head::read(text, &|_| Some(&layout)).and_then(|h| layout.stage(h));
            let from_bytes = Head::read_with(serde_json::Deserializer::from_slice(text), &|_| {
                Some(&layout)
            })
            .and_then(|h| layout.stage(h));
            assert_eq!(got, from_bytes, "{}", String::from_utf8_lossy(text));
        }
    }

    /// Rows that fit are read the typed way: the reference is the exception, not the rule.
    #[test]
    fn a_plain_event_is_read_the_typed_way() {
        let table = every_kind();
        let layout = Layout::of(&table);
        let text = br#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","time":"2026-12-01T10:00:00Z","data":{"d":"x","i32":7,"s":"a\"b","st":{"a":1},"l":[1,2],"ts":"2026-12-01T10:00:00Z","dt":"2026-12-01","f":2,"i8":2.0,"b":true}}"#;
        let head = Head::read(text, &|_| Some(&layout)).expect("a head");
        let cells = layout.stage(head).expect("typed");
        assert!(matches!(&cells[0], Some(Cell::Str(Cow::Borrowed("e1")))));
        assert!(
            matches!(&cells[ENVELOPE_COLUMNS.len()], Some(Cell::Str(Cow::Owned(s))) if s == "a\"b")
        );
        assert!(matches!(
            &cells[ENVELOPE_COLUMNS.len() + 1],
            Some(Cell::Str(Cow::Borrowed("x")))
        ));
        assert_eq!(cells[ENVELOPE_COLUMNS.len() + 4], Some(Cell::Int(7)));
        assert_eq!(cells[ENVELOPE_COLUMNS.len() + 2], Some(Cell::Int(2)));
        assert_eq!(cells[ENVELOPE_COLUMNS.len() + 6], Some(Cell::Float(2.0)));
        // Without its required `i32`, the row is the reference's to judge.
        let text = br#"{"id":"e1","source":"/s","type":"t","data":{"d":"x"}}"#;
        assert!(
            layout
                .stage(Head::read(text, &|_| Some(&layout)).unwrap())
                .is_none()
        );
    }
}
