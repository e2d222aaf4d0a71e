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
//! The log publishes a one-partition outbox (partition `""`, the SQLite state store's):
//! with one seq, the log's last record is its whole position. A partitioned outbox
//! (DynamoDB's, one partition per shard) publishes to EventBridge instead.
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
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::checkpoint::{create_dir_durably, lock_exclusive};
use crate::embedded_log::{EmbeddedLog, EmbeddedLogReader, MAX_RECORD_BYTES, fsync_dir};
use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::{Compression, EmbeddedStreamConfig, OutboxConfig};
use floodgate_core::state::{OutboxCursor, OutboxEntry, PublishError, Publisher};
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
/// The one outbox partition the log publishes: its keys hold one seq, so its last record
/// is its whole position (see the module docs).
pub const PARTITION: &str = "";

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
        group_commit_linger_us: 0,
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

/// The outbox entry a record of the log belongs to, from its key (`<seq>:<i>/<n>`).
pub(crate) fn entry_of(key: &str) -> Option<u64> {
    parse_key(key).map(|(seq, _, _)| seq)
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
                    key: key(e.seq, i, n).into(),
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

/// Opens the log for writing. Its lock can be held for a moment after its last holder
/// let it go (a child process forked just then shares the descriptor until it execs), so
/// a held lock is tried again for up to a second before it counts as another writer's.
async fn open_log(root: &Path, cfg: &EmbeddedStreamConfig) -> Result<EmbeddedLog, StreamError> {
    let mut attempts = 0;
    loop {
        match EmbeddedLog::open(root, cfg) {
            Err(StreamError::Unavailable(_)) if attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

#[derive(Debug)]
struct Writer {
    log: EmbeddedLog,
    position: Position,
    /// Set once an fsync failed: what the log holds past its last fsync is unknown (the
    /// kernel may have dropped the pages), so this process publishes nothing more. A new
    /// process recovers the log's tail as the stream does.
    failed: Option<String>,
}

/// Bytes of records per append: a relay catching up on a backlog publishes many entries at
/// once, and the log refuses a single append larger than its queue.
const APPEND_CHUNK_BYTES: usize = 4 * 1024 * 1024;

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
            ensure_log(&self.dir, &self.cfg)
                .await
                .map_err(|e| self.error(e))?;
            let log = open_log(&log_root(&self.dir), &log_config(&self.cfg))
                .await
                .map_err(|e| self.error(e))?;
            let last = last_record(&log).await.map_err(|e| self.error(e))?;
            let position = Position::after(last.as_ref()).map_err(|e| self.error(e))?;
            *slot = Some(Writer {
                log,
                position,
                failed: None,
            });
        }
        let w = slot.as_mut().expect("opened above");
        if let Some(why) = &w.failed {
            return Err(self.error(format_args!(
                "refuses to publish until the process restarts: {why}"
            )));
        }
        Ok(w)
    }
}

#[async_trait]
impl Publisher for EmbeddedOutbox {
    async fn last_published(&self) -> Result<OutboxCursor, PublishError> {
        let mut slot = self.writer.lock().await;
        let w = self.writer(&mut slot).await?;
        Ok(w.position
            .complete
            .map(|seq| OutboxCursor::from([(PARTITION.to_owned(), seq)]))
            .unwrap_or_default())
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        if let Some(e) = entries.iter().find(|e| e.partition != PARTITION) {
            return Err(self.error(format_args!(
                "holds one outbox partition (the SQLite state store's), not {:?}: a state \
                 store that partitions its outbox publishes elsewhere ([publish] backend)",
                e.partition
            )));
        }
        let mut slot = self.writer.lock().await;
        let w = self.writer(&mut slot).await?;
        let (records, after) = w.position.records(entries);
        // The log refuses a record this large and appends the others: a hole. Derived
        // events are small; one this large is a bug, and stops the relay, loudly.
        if let Some(r) = records
            .iter()
            .find(|r| r.key.len() + r.payload.len() > MAX_RECORD_BYTES)
        {
            return Err(self.error(format_args!(
                "derived event {} is larger than the log's {MAX_RECORD_BYTES}-byte record limit",
                r.key
            )));
        }
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some(r) = records.next_if(|_| chunk.is_empty() || bytes < APPEND_CHUNK_BYTES)
            {
                bytes += r.key.len() + r.payload.len();
                chunk.push(r);
            }
            let failed = w.log.append(chunk).await.into_iter().find_map(Result::err);
            let Some(e) = failed else { continue };
            if let Some(why) = w.log.failed() {
                w.failed = Some(why.clone());
                return Err(self.error(format_args!(
                    "append failed ({e}); refuses to publish until the process restarts: {why}"
                )));
            }
            // The write failed and the log undid it (a full disk): it holds exactly what
            // it held before this chunk. The next publish goes on from there.
            let last = last_record(&w.log).await.map_err(|e| self.error(e))?;
            w.position = Position::after(last.as_ref()).map_err(|e| self.error(e))?;
            return Err(self.error(format_args!("append failed: {e}")));
        }
        w.position = after;
        Ok(())
    }
}

/// Makes sure the derived-event log exists under `dir`, migrating an older floodgate's
/// `outbox.ndjson` into it first (see the module docs). Safe to call from several
/// processes at once, and beside a process that has the log open.
///
/// An older floodgate must not be running on `dir` meanwhile: it would go on appending to
/// `outbox.ndjson`. The migration notices a file that changed under it and stops.
pub async fn ensure_log(dir: &Path, cfg: &OutboxConfig) -> io::Result<()> {
    let root = log_root(dir);
    let legacy = dir.join(FILE_NAME);
    let old_checkpoints = dir.join("checkpoints");
    if root.join("meta.json").exists() && !legacy.exists() && !old_checkpoints.exists() {
        return Ok(());
    }
    create_dir_durably(dir)?;
    let lock_path = dir.join("MIGRATE.lock");
    // Held until this function returns (another process may be migrating: wait for it).
    let _lock = tokio::task::spawn_blocking(move || lock_exclusive(&lock_path))
        .await
        .map_err(io::Error::other)??;
    if root.join("meta.json").exists() {
        // Migrated (the new log is in place); what the old outbox left goes.
        return remove_legacy(dir);
    }
    if legacy.exists() {
        if root.exists() {
            // A log directory without meta.json holds nothing: its creation was cut short.
            fs::remove_dir_all(&root).map_err(|e| at(&root, e))?;
        }
        return migrate(dir, cfg).await;
    }
    match EmbeddedLog::open(&root, &log_config(cfg)) {
        Ok(log) => log
            .close()
            .await
            .map_err(|e| io::Error::other(e.to_string()))?,
        // Another process created it and holds it.
        Err(StreamError::Unavailable(_)) if root.join("meta.json").exists() => {}
        Err(e) => return Err(io::Error::other(e.to_string())),
    }
    Ok(())
}

/// Copies the events of `outbox.ndjson` into a new log beside it, translates the
/// consumers' checkpoints, renames the new log into place and removes the old outbox.
/// Reads the file line by line and appends in large batches (one fsync each), so a file
/// of gigabytes migrates in about the time it takes to read it.
async fn migrate(dir: &Path, cfg: &OutboxConfig) -> io::Result<()> {
    let legacy = dir.join(FILE_NAME);
    let staging = dir.join("log.migrating");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| at(&staging, e))?;
    }
    // Old checkpoints name (seq × 1,000,000 + i) on shard `outbox`: the event they name,
    // per consumer.
    let old_checkpoints = dir.join("checkpoints");
    let mut wanted: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
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
                wanted
                    .entry(legacy::split_sequence(seq))
                    .or_default()
                    .push(consumer.to_owned());
            }
        }
    }
    let file = File::open(&legacy).map_err(|e| at(&legacy, e))?;
    let length = file.metadata().map_err(|e| at(&legacy, e))?.len();
    let mut lines = legacy::Lines::new(io::BufReader::with_capacity(1 << 20, file), &legacy);
    let log = EmbeddedLog::open(&staging, &log_config(cfg))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut translated: BTreeMap<String, SequenceNumber> = BTreeMap::new();
    let mut entries = 0u64;
    loop {
        // A batch of records, each with the (seq, index) it came from.
        let mut batch: Vec<(Record, (u64, u64))> = Vec::new();
        let mut bytes = 0;
        while bytes < APPEND_CHUNK_BYTES {
            let Some(line) = lines.next_line()? else {
                break;
            };
            entries += 1;
            let n = line.events.len();
            for (i, ev) in line.events.into_iter().enumerate() {
                bytes += ev.len();
                let record = Record {
                    key: key(line.seq, i, n).into(),
                    payload: Bytes::from(ev),
                };
                batch.push((record, (line.seq, i as u64)));
            }
        }
        if batch.is_empty() {
            break;
        }
        let (records, tags): (Vec<Record>, Vec<(u64, u64)>) = batch.into_iter().unzip();
        for (a, tag) in log.append(records).await.into_iter().zip(tags) {
            let a = a.map_err(|e| io::Error::other(e.to_string()))?;
            for consumer in wanted.get(&tag).into_iter().flatten() {
                translated.insert(consumer.clone(), a.sequence.clone());
            }
        }
    }
    log.close()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    drop(log);
    let now = fs::metadata(&legacy).map_err(|e| at(&legacy, e))?.len();
    if now != length || lines.consumed() != length {
        let _ = fs::remove_dir_all(&staging);
        return Err(io::Error::other(format!(
            "{} changed during its migration ({length} bytes, then {now}): an older floodgate \
             is still publishing to it. Stop every older floodgate on this data directory, \
             then start again",
            legacy.display()
        )));
    }
    // A consumer whose checkpoint names no event of the file (there is none) starts
    // afresh.
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
        entries,
        "migrated the derived events to a segmented log"
    );
    remove_legacy(dir)
}

/// Removes what an older floodgate's outbox left once its events are in the log.
fn remove_legacy(dir: &Path) -> io::Result<()> {
    let legacy = dir.join(FILE_NAME);
    match fs::remove_file(&legacy) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(&legacy, e)),
    }
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
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(at(&path, e)),
        };
        let mut lines = legacy::Lines::new(io::BufReader::new(file), &path);
        while let Some(line) = lines.next_line()? {
            for e in &line.events {
                each(e)?;
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
    use std::io::{self, BufRead};
    use std::path::{Path, PathBuf};

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
    struct Line<'a> {
        seq: u64,
        #[serde(borrow)]
        events: Vec<&'a RawValue>,
    }

    /// One line of the file: an outbox entry's seq and its events' JSON text.
    pub struct Entry {
        pub seq: u64,
        pub events: Vec<Vec<u8>>,
    }

    /// The whole, valid lines of an outbox file, in order. What follows the last of them
    /// (an incomplete last line, or bad lines with nothing valid after them) is a torn
    /// tail, never published, and not returned. A bad line with valid lines after it is
    /// damage: an error naming the file and offset.
    pub struct Lines<R> {
        reader: R,
        path: PathBuf,
        buf: Vec<u8>,
        /// Bytes read so far, and the offset of the first bad line not yet followed by a
        /// good one.
        consumed: u64,
        first_bad: Option<u64>,
    }

    impl<R: BufRead> Lines<R> {
        pub fn new(reader: R, path: &Path) -> Self {
            Self {
                reader,
                path: path.to_owned(),
                buf: Vec::new(),
                consumed: 0,
                first_bad: None,
            }
        }

        /// Bytes of the file read so far (all of it, once `next_line` returned `None`).
        pub fn consumed(&self) -> u64 {
            self.consumed
        }

        pub fn next_line(&mut self) -> io::Result<Option<Entry>> {
            loop {
                self.buf.clear();
                let offset = self.consumed;
                let n = self.reader.read_until(b'\n', &mut self.buf).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
                })?;
                self.consumed += n as u64;
                if n == 0 || !self.buf.ends_with(b"\n") {
                    return Ok(None); // the end, or a line still being written
                }
                match serde_json::from_slice::<Line<'_>>(&self.buf) {
                    Ok(line) => {
                        if let Some(bad) = self.first_bad {
                            return Err(damaged(&self.path, bad));
                        }
                        return Ok(Some(Entry {
                            seq: line.seq,
                            events: line
                                .events
                                .iter()
                                .map(|e| e.get().as_bytes().to_vec())
                                .collect(),
                        }));
                    }
                    Err(_) => {
                        self.first_bad.get_or_insert(offset);
                    }
                }
            }
        }
    }

    fn damaged(path: &Path, offset: u64) -> io::Error {
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
