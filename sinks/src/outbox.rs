//! `EmbeddedOutbox`: the embedded publisher of derived events, a one-shard log under
//! `<data-dir>/outbox/log/`: the stream's own format ([`EmbeddedLog`]: segments, zstd
//! record batches, CRCs, a durable watermark), so it is as compact as the stream, is read
//! the same way, and keeps only what its consumers still need.
//!
//! ```text
//! outbox/log/meta.json, LOCK, shard-0000/…    the log (see `embedded_log`)
//! outbox/log/checkpoints/<consumer>.json      its consumers' checkpoints (the lake's
//!                                             `lake-derived`), which bound retention
//! outbox/MIGRATE.lock                         serialises creating the log
//! ```
//!
//! One record per derived event, in publish order. Its key is `<seq>:<i>/<n>`: event `i`
//! of the `n` of outbox entry `seq`. An entry's events are appended and fsynced together
//! before `publish` returns; should only some of them be on disk after a crash (a group
//! that straddles two frames), the key of the last one says so, and the next relay appends
//! the rest of that entry and nothing twice.
//!
//! Only the holder of the relay lease writes (see `floodgate_processors::relay`), and the
//! log's `LOCK` admits one writer process. So the log is opened lazily, by the first
//! `last_published` or `publish`, which the relay calls only once it holds the lease: a
//! standby process opens nothing until it takes over, and then finds its position from the
//! log's last record. A write or fsync that fails closes the log; the next call reopens it,
//! which recovers the tail exactly as the stream does, and finds the position again.
//!
//! Retention (`[publish.outbox] retention_bytes`) deletes the oldest segments once the log
//! is larger, but only segments every consumer has checkpointed past.
//! [`for_each_event`] (`floodgate outbox read`) reads what is retained, from any process.
//!
//! A data directory written by an older floodgate holds `outbox/outbox.ndjson` (one line
//! `{"seq":N,"events":[…]}` per entry). [`ensure_log`] migrates it once: it copies every
//! event into a new log built beside it, with its consumers' checkpoints translated to the
//! new sequence numbers, renames the new log into place (the commit point), then removes
//! the old file. A crash at any step leaves either the old outbox whole or the new log
//! whole, and the next start finishes the job.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::checkpoint::create_dir_durably;
use crate::embedded_log::{EmbeddedLog, EmbeddedLogReader, fsync_dir};
use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::{Compression, EmbeddedStreamConfig, OutboxConfig};
use floodgate_core::state::{OutboxEntry, PublishError, Publisher};
use floodgate_core::stream::{
    Record, SequenceNumber, ShardId, StartPosition, StoredRecord, StreamError, StreamReader,
    StreamWriter,
};

/// The file an older floodgate kept derived events in (migrated by [`ensure_log`]).
pub const FILE_NAME: &str = "outbox.ndjson";
/// The log's directory under the outbox directory.
pub const LOG_DIR: &str = "log";
/// The log's one shard, as its readers name it.
pub const SHARD: &str = "0";

/// The log under the outbox directory `dir`.
pub fn log_root(dir: &Path) -> PathBuf {
    dir.join(LOG_DIR)
}

/// The log's configuration: one shard, zstd, written at once (the relay is its only
/// writer and waits for each publish).
pub fn log_config(cfg: &OutboxConfig) -> EmbeddedStreamConfig {
    EmbeddedStreamConfig {
        shards: 1,
        segment_bytes: cfg.segment_bytes,
        retention_bytes: cfg.retention_bytes,
        group_commit_max_delay_us: 0,
        group_commit_max_bytes: 16 * 1024 * 1024,
        compression: Compression::Zstd,
        max_queued_bytes: 64 * 1024 * 1024,
    }
}

/// A record's key: event `i` of the `n` events of outbox entry `seq`.
fn key(seq: u64, i: usize, n: usize) -> String {
    format!("{seq}:{i}/{n}")
}

/// `(seq, i, n)` from a record's key.
fn parse_key(key: &str) -> Option<(u64, usize, usize)> {
    let (seq, rest) = key.split_once(':')?;
    let (i, n) = rest.split_once('/')?;
    let (seq, i, n) = (seq.parse().ok()?, i.parse().ok()?, n.parse().ok()?);
    (i < n).then_some((seq, i, n))
}

fn shard() -> ShardId {
    ShardId(SHARD.to_owned())
}

fn at(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// How far the log holds the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Position {
    /// The last entry whose events are all in the log.
    complete: Option<u64>,
    /// An entry after it of which only the first `.1` events are.
    partial: Option<(u64, usize)>,
}

impl Position {
    /// From the log's last record.
    fn after(last: Option<&StoredRecord>) -> Result<Position, String> {
        let Some(r) = last else {
            return Ok(Position::default());
        };
        let (seq, i, n) = parse_key(&r.key).ok_or_else(|| {
            format!(
                "the derived-event log's last record (sequence {}) has key {:?}, not \
                 `<seq>:<i>/<n>`",
                r.sequence.as_str(),
                r.key
            )
        })?;
        Ok(if i + 1 == n {
            Position {
                complete: Some(seq),
                partial: None,
            }
        } else {
            Position {
                complete: seq.checked_sub(1),
                partial: Some((seq, i + 1)),
            }
        })
    }

    /// The records of `entries` the log does not hold yet, in order, and the position
    /// once they are appended.
    fn records(self, entries: &[OutboxEntry]) -> (Vec<Record>, Position) {
        let mut records = Vec::new();
        let mut after = self;
        for e in entries {
            if self.complete.is_some_and(|c| e.seq <= c) {
                continue;
            }
            let from = match self.partial {
                Some((s, k)) if s == e.seq => k,
                Some((s, _)) if e.seq < s => continue,
                _ => 0,
            };
            let n = e.events.len();
            for (i, ev) in e.events.iter().enumerate().skip(from) {
                records.push(Record {
                    key: key(e.seq, i, n),
                    payload: Bytes::copy_from_slice(ev.as_bytes()),
                });
            }
            after = Position {
                complete: Some(after.complete.map_or(e.seq, |c| c.max(e.seq))),
                partial: None,
            };
        }
        (records, after)
    }
}

/// The last record of a one-shard log, if any.
async fn last_record(log: &dyn StreamReader) -> Result<Option<StoredRecord>, StreamError> {
    let first = log.read(&shard(), &StartPosition::TrimHorizon, 1).await?;
    let Some(r) = first.records.first() else {
        return Ok(None);
    };
    if first.records_behind == 0 {
        return Ok(first.records.into_iter().next());
    }
    let seq = r.sequence.as_u64().unwrap_or(0) + first.records_behind;
    let at = StartPosition::At(SequenceNumber::from_u64(seq));
    Ok(log.read(&shard(), &at, 1).await?.records.into_iter().next())
}

#[derive(Debug)]
struct Writer {
    log: EmbeddedLog,
    position: Position,
}

/// The embedded [`Publisher`] (see the module docs).
#[derive(Debug)]
pub struct EmbeddedOutbox {
    dir: PathBuf,
    cfg: OutboxConfig,
    writer: tokio::sync::Mutex<Option<Writer>>,
}

impl EmbeddedOutbox {
    /// The outbox in `dir` with the default configuration. Opens nothing yet (see the
    /// module docs).
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with(dir, &OutboxConfig::default())
    }

    pub fn open_with(dir: &Path, cfg: &OutboxConfig) -> io::Result<Self> {
        create_dir_durably(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            writer: tokio::sync::Mutex::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn error(&self, what: impl std::fmt::Display) -> PublishError {
        PublishError(format!(
            "derived-event log {}: {what}",
            log_root(&self.dir).display()
        ))
    }

    /// The open log, opening it (and finding the position) if needed.
    async fn writer<'a>(
        &self,
        slot: &'a mut Option<Writer>,
    ) -> Result<&'a mut Writer, PublishError> {
        if slot.is_none() {
            let (dir, cfg) = (self.dir.clone(), self.cfg.clone());
            tokio::task::spawn_blocking(move || ensure_log(&dir, &cfg))
                .await
                .map_err(|e| self.error(e))?
                .map_err(|e| self.error(e))?;
            let log = EmbeddedLog::open(&log_root(&self.dir), &log_config(&self.cfg))
                .map_err(|e| self.error(e))?;
            let last = last_record(&log).await.map_err(|e| self.error(e))?;
            let position = Position::after(last.as_ref()).map_err(|e| self.error(e))?;
            *slot = Some(Writer { log, position });
        }
        Ok(slot.as_mut().expect("opened above"))
    }
}

#[async_trait]
impl Publisher for EmbeddedOutbox {
    async fn last_published(&self) -> Result<Option<u64>, PublishError> {
        let mut slot = self.writer.lock().await;
        let w = self.writer(&mut slot).await?;
        Ok(w.position.complete)
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        let mut slot = self.writer.lock().await;
        let w = self.writer(&mut slot).await?;
        let (records, after) = w.position.records(entries);
        if !records.is_empty() {
            let failed = w
                .log
                .append(records)
                .await
                .into_iter()
                .find_map(Result::err);
            if let Some(e) = failed {
                // What reached the disk is unknown here: close the log and let the next
                // call reopen it, recover its tail and read the position from it.
                if let Some(w) = slot.take() {
                    let _ = w.log.close().await;
                }
                return Err(self.error(format_args!("append failed: {e}")));
            }
        }
        w.position = after;
        Ok(())
    }
}

/// Makes sure the derived-event log exists under `dir`, migrating an older floodgate's
/// `outbox.ndjson` into it first (see the module docs). Safe to call from several
/// processes at once, and beside a process that has the log open.
pub fn ensure_log(dir: &Path, cfg: &OutboxConfig) -> io::Result<()> {
    let root = log_root(dir);
    let legacy = dir.join(FILE_NAME);
    if root.join("meta.json").exists() && !legacy.exists() {
        return Ok(());
    }
    create_dir_durably(dir)?;
    let lock_path = dir.join("MIGRATE.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| at(&lock_path, e))?;
    lock.lock().map_err(|e| at(&lock_path, e))?;
    if root.join("meta.json").exists() {
        if legacy.exists() {
            // Migrated (the new log is in place); the old outbox is left over.
            remove_legacy(dir)?;
        }
        return Ok(());
    }
    if legacy.exists() {
        return migrate(dir, cfg);
    }
    match EmbeddedLog::open(&root, &log_config(cfg)) {
        Ok(log) => drop(log),
        // Another process created it and holds it.
        Err(StreamError::Unavailable(_)) if root.join("meta.json").exists() => {}
        Err(e) => return Err(io::Error::other(e.to_string())),
    }
    Ok(())
}

/// Copies the events of `outbox.ndjson` into a new log beside it, translates the
/// consumers' checkpoints, renames the new log into place and removes the old outbox.
fn migrate(dir: &Path, cfg: &OutboxConfig) -> io::Result<()> {
    let legacy = dir.join(FILE_NAME);
    let staging = dir.join("log.migrating");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| at(&staging, e))?;
    }
    let bytes = fs::read(&legacy).map_err(|e| at(&legacy, e))?;
    let found = legacy::scan(&bytes).map_err(|off| legacy::damaged(&legacy, off as u64))?;
    // Old checkpoints name (seq × 1,000,000 + i) on shard `outbox`: the event they name,
    // per consumer.
    let old_checkpoints = dir.join("checkpoints");
    let mut wanted: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if old_checkpoints.is_dir() {
        for entry in fs::read_dir(&old_checkpoints).map_err(|e| at(&old_checkpoints, e))? {
            let path = entry?.path();
            let Some(consumer) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let file: legacy::ConsumerFile =
                serde_json::from_slice(&fs::read(&path).map_err(|e| at(&path, e))?)
                    .map_err(|e| at(&path, io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if let Some(seq) = file.shards.get(legacy::SHARD).and_then(|s| s.parse().ok()) {
                wanted.insert(consumer.to_owned(), legacy::split_sequence(seq));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(io::Error::other)?;
    let translated = rt.block_on(async {
        let log = EmbeddedLog::open(&staging, &log_config(cfg))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut translated = BTreeMap::new();
        for (seq, off, len, _) in &found.lines {
            let line: legacy::Line<'_> =
                serde_json::from_slice(&bytes[*off..*off + *len]).map_err(io::Error::other)?;
            let n = line.events.len();
            let records = line
                .events
                .iter()
                .enumerate()
                .map(|(i, ev)| Record {
                    key: key(*seq, i, n),
                    payload: Bytes::copy_from_slice(ev.get().as_bytes()),
                })
                .collect();
            let appended = log.append(records).await;
            for (i, a) in appended.into_iter().enumerate() {
                let a = a.map_err(|e| io::Error::other(e.to_string()))?;
                for (consumer, at) in &wanted {
                    if *at == (*seq, i as u64) {
                        translated.insert(consumer.clone(), a.sequence.clone());
                    }
                }
            }
        }
        log.close()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok::<_, io::Error>(translated)
    })?;
    // A consumer whose checkpoint names no event of the file (there is none) starts
    // afresh; one that had read everything resumes after the last event.
    let staged_checkpoints = staging.join("checkpoints");
    create_dir_durably(&staged_checkpoints)?;
    for (consumer, seq) in &translated {
        let mut shards = BTreeMap::new();
        shards.insert(SHARD.to_owned(), seq.clone());
        let body = serde_json::to_vec(&serde_json::json!({ "shards": shards }))?;
        let path = staged_checkpoints.join(format!("{consumer}.json"));
        crate::embedded_log::write_atomically(&path, &body)?;
    }
    fsync_dir(&staging)?;
    fs::rename(&staging, log_root(dir)).map_err(|e| at(&staging, e))?;
    fsync_dir(dir)?;
    tracing::info!(
        from = %legacy.display(),
        to = %log_root(dir).display(),
        entries = found.lines.len(),
        "migrated the derived events to a segmented log"
    );
    remove_legacy(dir)
}

/// Removes what an older floodgate's outbox left once its events are in the log.
fn remove_legacy(dir: &Path) -> io::Result<()> {
    let legacy = dir.join(FILE_NAME);
    fs::remove_file(&legacy).map_err(|e| at(&legacy, e))?;
    let old = dir.join("checkpoints");
    if old.is_dir() {
        fs::remove_dir_all(&old).map_err(|e| at(&old, e))?;
    }
    fsync_dir(dir)
}

/// Calls `each` with every derived event the outbox at `dir` holds, in publish order:
/// what retention has kept of the log (or, in a data directory an older floodgate wrote
/// and no newer one has opened, its `outbox.ndjson`). Safe beside a live server: only
/// events already durable are read. Damage is an error naming the file and offset.
pub fn for_each_event(dir: &Path, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    let root = log_root(dir);
    if !root.join("meta.json").exists() {
        let path = dir.join(FILE_NAME);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(|e| at(&path, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(at(&path, e)),
        }
        let found = legacy::scan(&bytes).map_err(|off| legacy::damaged(&path, off as u64))?;
        for (_, off, len, _) in found.lines {
            let line: legacy::Line<'_> =
                serde_json::from_slice(&bytes[off..off + len]).map_err(io::Error::other)?;
            for e in line.events {
                each(e.get().as_bytes())?;
            }
        }
        return Ok(());
    }
    let reader = EmbeddedLogReader::open(&root).map_err(|e| io::Error::other(e.to_string()))?;
    let mut from = StartPosition::TrimHorizon;
    loop {
        let batch = reader
            .read_blocking(0, &from, 10_000)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let Some(last) = batch.records.last() else {
            return Ok(());
        };
        from = StartPosition::After(last.sequence.clone());
        for r in &batch.records {
            each(&r.payload)?;
        }
    }
}

/// Every derived event the outbox at `dir` holds (see [`for_each_event`]).
pub fn read_events(dir: &Path) -> io::Result<Vec<String>> {
    let mut events = Vec::new();
    for_each_event(dir, |e| {
        events.push(String::from_utf8_lossy(e).into_owned());
        Ok(())
    })?;
    Ok(events)
}

/// The NDJSON outbox of older floodgates, read only to migrate it.
mod legacy {
    use std::collections::BTreeMap;
    use std::io;
    use std::path::Path;

    use serde::Deserialize;
    use serde_json::value::RawValue;

    /// The shard its reader named, and the room it left per entry in sequence numbers.
    pub const SHARD: &str = "outbox";
    const EVENTS_PER_ENTRY: u64 = 1_000_000;

    pub fn split_sequence(n: u64) -> (u64, u64) {
        (n / EVENTS_PER_ENTRY, n % EVENTS_PER_ENTRY)
    }

    /// A consumer's checkpoint file, as `checkpoint` writes it.
    #[derive(Deserialize)]
    pub struct ConsumerFile {
        pub shards: BTreeMap<String, String>,
    }

    #[derive(Deserialize)]
    pub struct Line<'a> {
        pub seq: u64,
        #[serde(borrow)]
        pub events: Vec<&'a RawValue>,
    }

    /// The whole, valid lines of a stretch of an outbox file.
    pub struct Scan {
        /// (seq, byte offset within the stretch, byte length, number of events) of each valid
        /// line, in order.
        /// What follows the last is a torn tail (an incomplete last line, or bad lines
        /// with nothing valid after them), which was never published: not migrated.
        pub lines: Vec<(u64, usize, usize, usize)>,
    }

    /// Scans `bytes` (a stretch of an outbox file starting at a line boundary). `Err` holds
    /// the offset (within `bytes`) of a bad line that has valid lines after it: damage, not a
    /// torn tail.
    pub fn scan(bytes: &[u8]) -> Result<Scan, usize> {
        let mut lines = Vec::new();
        let mut first_bad = None;
        let mut off = 0;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break; // still being written, or cut by a crash
            }
            match serde_json::from_slice::<Line<'_>>(line) {
                Ok(l) => {
                    if let Some(bad) = first_bad {
                        return Err(bad);
                    }
                    lines.push((l.seq, off, line.len(), l.events.len()));
                }
                Err(_) => {
                    first_bad.get_or_insert(off);
                }
            }
            off += line.len();
        }
        Ok(Scan { lines })
    }

    pub fn damaged(path: &Path, offset: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: damaged outbox line at byte offset {offset}, with valid lines after it; \
                 the events after it are published and must not be cut (repair or remove \
                 that line by hand)",
                path.display()
            ),
        )
    }
}
