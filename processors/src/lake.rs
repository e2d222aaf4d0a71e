//! The lake consumer: per shard, accepted events gathered into one Parquet file per table
//! and hour partition, written through the [`ObjectStore`] role as
//! `<table>/dt=YYYY-MM-DD/hour=HH/<shard>-<firstSeq>-<lastSeq>.parquet`.
//!
//! A flush covers a contiguous run of the shard's records, `firstSeq..=lastSeq`, and every
//! file it writes carries that run in its name. The checkpoint moves only after all of a
//! flush's files are durable (the store's `put` is atomic). Replays are therefore safe:
//! - a file rewritten for the same run has the same name and the same rows, so it
//!   replaces itself;
//! - after a crash in the middle of a flush, the next start finds the files of the
//!   unfinished run (their `firstSeq` is the first record after the checkpoint) and ends
//!   its first flush exactly at their `lastSeq`, rewriting that run whole.
//!
//! The partition comes from the event's `time`, else the time the stream received it
//! (UTC). A buffer rolls when it holds `roll_bytes` of events or is `roll_age` old, and on
//! shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::ArrayRef;
use async_trait::async_trait;
use floodgate_core::lake::{ENVELOPE_COLUMNS, Table};
use floodgate_core::object_store::ObjectStore;
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use serde_json::Value;

use crate::parquet;
use crate::runtime::{ProcessError, Progress, ShardProcessor};

/// When a buffer becomes a file.
#[derive(Debug, Clone)]
pub struct LakeConfig {
    pub roll_bytes: u64,
    pub roll_age: Duration,
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            roll_bytes: 128 << 20,
            roll_age: Duration::from_secs(60),
        }
    }
}

/// One row waiting for its file.
struct Row {
    /// The CloudEvent's `id`, `source`, `type` (strings) and `time` (microseconds).
    id: Option<Value>,
    source: Option<Value>,
    event_type: Option<Value>,
    time: Option<Value>,
    /// The event's `data` object (for the quarantine: `raw` and `reasons`).
    data: Option<Value>,
    received_us: i64,
    sequence: String,
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

#[derive(Default)]
struct ShardBuffer {
    /// (table, dt, hour) → rows, in stream order.
    /// (table, hour since the Unix epoch) → rows, in stream order. Cheap keys: the
    /// partition's strings are made once per flush, not per event.
    groups: BTreeMap<(Arc<str>, i64), Vec<Row>>,
    first: Option<SequenceNumber>,
    last: Option<SequenceNumber>,
    bytes: u64,
    opened: Option<Instant>,
    /// Run ends to reproduce, in order: the end of an unfinished run found at start-up, or
    /// every run of the lake being rebuilt. While any is left, flushes happen exactly there
    /// and nowhere else.
    boundaries: std::collections::VecDeque<SequenceNumber>,
    started: bool,
    durable: Option<SequenceNumber>,
}

/// Which records a [`LakeProcessor`] turns into rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Accepted events from the stream, one table per type.
    Events,
    /// The edge's quarantine log: every rejected event, in the `quarantine` table.
    Quarantine,
}

/// Whether an object key lies in one of `tables`' directories.
fn in_tables(key: &str, tables: &[String]) -> bool {
    key.split_once('/')
        .is_some_and(|(table, _)| tables.iter().any(|t| t == table))
}

/// Writes the lake; see the module docs.
pub struct LakeProcessor {
    scope: Scope,
    consumer: &'static str,
    store: Arc<dyn ObjectStore>,
    tables: HashMap<String, Table>,
    /// Each event type's table name, shared by the buffer keys.
    names: HashMap<String, Arc<str>>,
    config: LakeConfig,
    shards: Mutex<HashMap<ShardId, ShardBuffer>>,
    /// Set for a rebuild: the runs to reproduce per shard (no discovery in the store).
    planned: Option<HashMap<ShardId, Vec<SequenceNumber>>>,
}

impl std::fmt::Debug for LakeProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeProcessor")
            .field("tables", &self.tables.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Every run the lake in `store` holds or held, per shard, as `(first, last)`: from the
/// files' names, and from the inputs recorded by compactions (whose files are gone).
pub async fn known_runs(
    store: &dyn ObjectStore,
    shards: &[ShardId],
    tables: &[String],
) -> Result<HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>>, ProcessError> {
    let objects = store
        .list("")
        .await
        .map_err(|e| ProcessError::Other(e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for o in objects.iter().filter(|o| in_tables(&o.key, tables)) {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if name == crate::compact::MANIFEST {
            let partition = o.key.rsplit_once('/').map_or("", |(d, _)| d);
            let m = crate::compact::manifest(store, partition).await?;
            names.extend(m.compacted.into_values().flat_map(|p| p.inputs));
        } else {
            names.push(name.to_owned());
        }
    }
    let mut runs: HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>> = HashMap::new();
    for name in &names {
        for shard in shards {
            if let Some((first, last)) = parse_file_name(name, &shard.0) {
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

/// `(first, last)` of a lake file name `<shard>-<first>-<last>.parquet` of `shard`.
pub fn parse_file_name<'a>(name: &'a str, shard: &str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_prefix(shard)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".parquet")?;
    let (first, last) = rest.split_once('-')?;
    (first.bytes().all(|b| b.is_ascii_digit()) && last.bytes().all(|b| b.is_ascii_digit()))
        .then_some((first, last))
}

/// A quarantine record as a row: the rejected event's id, source and type lifted out of its
/// raw text, where it is readable.
fn quarantine_row(held: Value, received_us: i64, sequence: String) -> Row {
    let raw: Option<Value> = held
        .get("raw")
        .and_then(Value::as_str)
        .and_then(|r| serde_json::from_str(r).ok());
    let lift = |name: &str| {
        raw.as_ref()
            .and_then(|e| e.get(name))
            .filter(|v| v.is_string())
            .cloned()
    };
    Row {
        id: lift("id"),
        source: lift("source"),
        event_type: lift("type"),
        time: None,
        data: Some(held),
        received_us,
        sequence,
    }
}

fn quarantine_columns(
    table: &Table,
    rows: &[Row],
    shard: &str,
) -> Result<Vec<ArrayRef>, ProcessError> {
    let shard_value = Value::String(shard.to_owned());
    let received: Vec<Value> = rows.iter().map(|r| Value::from(r.received_us)).collect();
    let sequences: Vec<Value> = rows
        .iter()
        .map(|r| Value::String(r.sequence.clone()))
        .collect();
    let mut out = Vec::new();
    for (i, field) in table.schema.fields().iter().enumerate() {
        let values: Vec<Option<&Value>> = match field.name().as_str() {
            "received_at" => received.iter().map(Some).collect(),
            "event_id" => rows.iter().map(|r| r.id.as_ref()).collect(),
            "source" => rows.iter().map(|r| r.source.as_ref()).collect(),
            "type" => rows.iter().map(|r| r.event_type.as_ref()).collect(),
            "reasons" => rows
                .iter()
                .map(|r| r.data.as_ref().and_then(|d| d.get("reasons")))
                .collect(),
            "raw" => rows
                .iter()
                .map(|r| r.data.as_ref().and_then(|d| d.get("raw")))
                .collect(),
            "shard" => rows.iter().map(|_| Some(&shard_value)).collect(),
            "sequence" => sequences.iter().map(Some).collect(),
            other => unreachable!("quarantine column {i} {other}"),
        };
        out.push(
            parquet::column(field.data_type(), &values)
                .map_err(|e| ProcessError::Other(e.to_string()))?,
        );
    }
    Ok(out)
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
            tables: tables
                .into_iter()
                .map(|t| (t.event_type.clone(), t))
                .collect(),
            config,
            shards: Mutex::new(HashMap::new()),
            planned: None,
            scope: Scope::Events,
            consumer: "lake",
        }
    }

    /// The directories (table names) this processor writes.
    pub fn table_names(&self) -> Vec<String> {
        self.tables.values().map(|t| t.name.clone()).collect()
    }

    /// The consumer name: `lake` by default.
    pub fn named(mut self, consumer: &'static str) -> Self {
        self.consumer = consumer;
        self
    }

    /// The consumer of the quarantine log: the `quarantine` table.
    pub fn quarantine(store: Arc<dyn ObjectStore>, config: LakeConfig) -> Self {
        let table = Table {
            name: floodgate_core::lake::QUARANTINE_TABLE.to_owned(),
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
}

/// The Arrow columns of one file's rows.
fn columns_for(
    scope: Scope,
    table: &Table,
    rows: &[Row],
    shard: &str,
) -> Result<Vec<ArrayRef>, ProcessError> {
    if scope == Scope::Quarantine {
        return quarantine_columns(table, rows, shard);
    }
    let enc = |e: parquet::EncodeError| ProcessError::Other(e.to_string());
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
            Some(other) => unreachable!("envelope column {other}"),
            None => {
                let member = &table.data_members[i - ENVELOPE_COLUMNS.len()];
                datas
                    .iter()
                    .map(|d| d.and_then(|d| d.get(member)))
                    .collect()
            }
        };
        out.push(parquet::column(field.data_type(), &values).map_err(enc)?);
    }
    Ok(out)
}

impl LakeProcessor {
    /// Writes every group of `shard`'s buffer, then marks the run durable.
    async fn flush(&self, shard: &ShardId) -> Result<(), ProcessError> {
        let (groups, first, last) = {
            let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            let Some(buf) = shards.get_mut(shard) else {
                return Ok(());
            };
            let (Some(first), Some(last)) = (buf.first.take(), buf.last.take()) else {
                return Ok(());
            };
            buf.bytes = 0;
            buf.opened = None;
            (std::mem::take(&mut buf.groups), first, last)
        };
        let started = Instant::now();
        let mut bytes_written = 0u64;
        let mut rows_written = 0usize;
        let file_name = format!("{}-{first}-{last}.parquet", shard.0);
        // Which groups to write: not those whose run compaction already merged (a replay).
        let mut wanted = Vec::new();
        for (table_name, hour) in groups.keys() {
            let partition = partition_key(table_name, *hour);
            let covered = crate::compact::manifest(&*self.store, &partition)
                .await?
                .covers(&file_name);
            wanted.push(!covered);
        }
        // Building columns and encoding Parquet is CPU work of up to a few hundred ms: off
        // the async workers, so the edge's requests never wait behind it.
        let tables: Vec<Table> = self.tables.values().cloned().collect();
        let (scope, shard_name) = (self.scope, shard.0.clone());
        let encoded = tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            for (((table_name, hour), rows), write) in groups.iter().zip(wanted) {
                if !write {
                    continue;
                }
                let table = tables
                    .iter()
                    .find(|t| *t.name == **table_name)
                    .expect("groups are keyed by known tables");
                let columns = columns_for(scope, table, rows, &shard_name)?;
                let file = parquet::encode(&table.schema, columns)
                    .map_err(|e| ProcessError::Other(e.to_string()))?;
                files.push((partition_key(table_name, *hour), file, rows.len()));
            }
            Ok::<_, ProcessError>((groups, files))
        })
        .await
        .map_err(|e| ProcessError::Other(e.to_string()))?;
        let (groups, files) = encoded?;
        for (partition, file, rows) in files {
            let key = format!("{partition}/{file_name}");
            bytes_written += file.len() as u64;
            rows_written += rows;
            if let Err(e) = self.store.put(&key, file).await {
                // Put the rows back: the same run is written again on the next try.
                let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
                let buf = shards.entry(shard.clone()).or_default();
                buf.groups = groups;
                buf.first = Some(first);
                buf.last = Some(last);
                buf.opened = Some(Instant::now());
                return Err(ProcessError::Other(e.to_string()));
            }
        }
        metrics::counter!("floodgate_lake_files_total").increment(groups.len() as u64);
        metrics::counter!("floodgate_lake_rows_total").increment(rows_written as u64);
        metrics::counter!("floodgate_lake_bytes_total").increment(bytes_written);
        metrics::histogram!("floodgate_lake_flush_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(%shard, %first, %last, files = groups.len(), rows = rows_written, "lake flush");
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let buf = shards.entry(shard.clone()).or_default();
        buf.durable = Some(last);
        Ok(())
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
        let runs = known_runs(
            &*self.store,
            std::slice::from_ref(shard),
            &self.table_names(),
        )
        .await?;
        Ok(runs
            .get(shard)
            .into_iter()
            .flatten()
            .filter(|(f, _)| f >= first)
            .map(|(_, l)| l.clone())
            .collect())
    }
}

#[async_trait]
impl ShardProcessor for LakeProcessor {
    fn consumer(&self) -> &str {
        self.consumer
    }

    async fn start_position(
        &self,
        _shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
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
            let boundaries: std::collections::VecDeque<SequenceNumber> = match &self.planned {
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
        let mut i = 0;
        while i < records.len() {
            let mut flush_now = false;
            {
                let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
                let buf = shards.entry(shard.clone()).or_default();
                while i < records.len() {
                    let r = &records[i];
                    i += 1;
                    if buf.first.is_none() {
                        buf.first = Some(r.sequence.clone());
                        buf.opened = Some(Instant::now());
                    }
                    buf.last = Some(r.sequence.clone());
                    buf.bytes += r.payload.len() as u64;
                    let received_us = r.appended_at_ms * 1000;
                    let row = match self.scope {
                        Scope::Events => {
                            serde_json::from_slice::<EventParts>(&r.payload)
                                .ok()
                                .map(|p| {
                                    let time = p.time.as_deref().and_then(parquet::rfc3339_micros);
                                    Row {
                                        id: p.id,
                                        source: p.source,
                                        event_type: p.event_type,
                                        time: time.map(Value::from),
                                        data: p.data,
                                        received_us,
                                        sequence: r.sequence.to_string(),
                                    }
                                })
                        }
                        Scope::Quarantine => serde_json::from_slice::<Value>(&r.payload)
                            .ok()
                            .map(|held| quarantine_row(held, received_us, r.sequence.to_string())),
                    };
                    match row {
                        Some(row) => {
                            let key = match self.scope {
                                Scope::Events => row
                                    .event_type
                                    .as_ref()
                                    .and_then(Value::as_str)
                                    .unwrap_or(""),
                                Scope::Quarantine => "",
                            };
                            match self.names.get(key) {
                                Some(name) => {
                                    // The partition: the event's time, else when it arrived.
                                    let at = row
                                        .time
                                        .as_ref()
                                        .and_then(Value::as_i64)
                                        .unwrap_or(received_us);
                                    buf.groups
                                        .entry((name.clone(), hour_of(at)))
                                        .or_default()
                                        .push(row);
                                }
                                None => {
                                    metrics::counter!("floodgate_lake_skipped_total", "reason" => "unknown_type").increment(1);
                                }
                            }
                        }
                        None => {
                            metrics::counter!("floodgate_lake_skipped_total", "reason" => "unparsable").increment(1);
                        }
                    }
                    if buf.boundaries.front() == Some(&r.sequence) {
                        buf.boundaries.pop_front();
                        flush_now = true;
                        break;
                    }
                    if buf.boundaries.is_empty() && buf.bytes >= self.config.roll_bytes {
                        flush_now = true;
                        break;
                    }
                }
                if !flush_now
                    && buf.boundaries.is_empty()
                    && buf
                        .opened
                        .is_some_and(|o| o.elapsed() >= self.config.roll_age)
                {
                    flush_now = true;
                }
            }
            if flush_now {
                self.flush(shard).await?;
            }
        }
        Ok(())
    }

    fn progress(&self, shard: &ShardId) -> Progress {
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        Progress::Through(shards.get(shard).and_then(|b| b.durable.clone()))
    }

    async fn tick(&self, shard: &ShardId, last: bool) -> Result<(), ProcessError> {
        let due = {
            let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
            shards.get(shard).is_some_and(|b| {
                b.first.is_some()
                    && (last
                        || (b.boundaries.is_empty()
                            && b.opened
                                .is_some_and(|o| o.elapsed() >= self.config.roll_age)))
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
        let us = parquet::rfc3339_micros("2026-11-22T23:59:59.5+01:00").unwrap();
        assert_eq!(partition(hour_of(us)), ("2026-11-22".to_owned(), 22));
        let before_1970 = parquet::rfc3339_micros("1969-12-31T23:30:00Z").unwrap();
        assert_eq!(
            partition(hour_of(before_1970)),
            ("1969-12-31".to_owned(), 23)
        );
        assert_eq!(partition_key("t", 0), "t/dt=1970-01-01/hour=00");
    }
}
