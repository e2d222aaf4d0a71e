//! `EmbeddedOutbox`: the embedded publisher of derived events, an append-only NDJSON log
//! at `<data-dir>/outbox/outbox.ndjson`.
//!
//! One line per published outbox entry, `{"seq":N,"events":[{…},…]}`, written whole and
//! fsynced before `publish` returns. A line is the unit of atomicity: recovery drops a torn
//! last line, and `last_published` is the seq of the last whole line, so a relay that
//! crashed mid-publish republishes exactly what is missing. Readers ([`read_events`]) skip
//! a torn last line, so they are safe beside a live writer.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use floodgate_core::state::{OutboxEntry, PublishError, Publisher};
use serde::Deserialize;
use serde_json::value::RawValue;

pub const FILE_NAME: &str = "outbox.ndjson";

#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// Whole lines of an outbox file and the byte length they span.
fn scan(bytes: &[u8]) -> (Vec<(u64, Vec<String>)>, usize) {
    let mut out = Vec::new();
    let mut valid = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if !line.ends_with(b"\n") {
            break; // torn: still being written, or cut by a crash
        }
        match serde_json::from_slice::<Line<'_>>(line) {
            Ok(l) => {
                out.push((l.seq, l.events.iter().map(|e| e.get().to_owned()).collect()));
                valid += line.len();
            }
            Err(_) => break,
        }
    }
    (out, valid)
}

/// Every derived event in the outbox at `dir`, in publish order. Safe beside a live
/// server: a line still being written is not returned.
pub fn read_events(dir: &Path) -> io::Result<Vec<String>> {
    let mut bytes = Vec::new();
    match File::open(dir.join(FILE_NAME)) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    Ok(scan(&bytes)
        .0
        .into_iter()
        .flat_map(|(_, events)| events)
        .collect())
}

#[derive(Debug)]
struct State {
    file: File,
    last: Option<u64>,
}

#[derive(Debug)]
pub struct EmbeddedOutbox {
    path: PathBuf,
    state: Mutex<State>,
}

impl EmbeddedOutbox {
    /// Opens the outbox in `dir`, truncating a torn last line.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (lines, valid) = scan(&bytes);
        if valid < bytes.len() {
            tracing::warn!(path = %path.display(), cut = bytes.len() - valid, "outbox: truncated a torn last line");
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        let last = lines.last().map(|(seq, _)| *seq);
        Ok(Self {
            path,
            state: Mutex::new(State { file, last }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl Publisher for EmbeddedOutbox {
    async fn last_published(&self) -> Result<Option<u64>, PublishError> {
        Ok(self
            .state
            .lock()
            .map_err(|_| PublishError("poisoned".into()))?
            .last)
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| PublishError("poisoned".into()))?;
        let mut buf = Vec::new();
        let mut top = state.last;
        for e in entries {
            if top.is_some_and(|t| e.seq <= t) {
                continue;
            }
            buf.extend_from_slice(format!("{{\"seq\":{},\"events\":[", e.seq).as_bytes());
            for (i, ev) in e.events.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(ev.as_bytes());
            }
            buf.extend_from_slice(b"]}\n");
            top = Some(e.seq);
        }
        if buf.is_empty() {
            return Ok(());
        }
        // A small synchronous write and fsync; publish batches are rare next to appends.
        let result = state
            .file
            .write_all(&buf)
            .and_then(|()| state.file.sync_data());
        if let Err(e) = result {
            // Cut back to the last whole line so a retry appends cleanly.
            let len = state.file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = state.file.set_len(len.saturating_sub(buf.len() as u64));
            return Err(PublishError(format!("{}: {e}", self.path.display())));
        }
        state.last = top;
        Ok(())
    }
}

/// The published derived events as a one-shard stream (shard `outbox`), for consumers
/// such as the lake. Record `i` of outbox entry `seq` has sequence number
/// `seq × 1,000,000 + i` and key `seq`; its `appended_at_ms` is the event's `time`.
/// Read-only and lock-free beside a live relay: torn last lines are not read.
#[derive(Debug)]
pub struct OutboxReader {
    path: PathBuf,
    /// (seq, byte offset, byte length) of every whole line seen so far.
    index: Mutex<Vec<(u64, u64, usize)>>,
}

/// Events per outbox entry the sequence numbering leaves room for.
pub const EVENTS_PER_ENTRY: u64 = 1_000_000;

pub const OUTBOX_SHARD: &str = "outbox";

impl OutboxReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
            index: Mutex::new(Vec::new()),
        }
    }

    /// Extends the index with the whole lines appended since the last look.
    fn refresh(&self) -> io::Result<Vec<(u64, u64, usize)>> {
        use std::io::{Seek, SeekFrom};
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let end = index.last().map_or(0, |(_, off, len)| off + *len as u64);
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(index.clone()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(end))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        let mut off = end;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            if let Ok(l) = serde_json::from_slice::<Line<'_>>(line) {
                index.push((l.seq, off, line.len()));
            }
            off += line.len() as u64;
        }
        Ok(index.clone())
    }

    fn read_line(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(off))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }
}

#[async_trait]
impl floodgate_core::stream::StreamReader for OutboxReader {
    async fn shards(
        &self,
    ) -> Result<Vec<floodgate_core::stream::ShardInfo>, floodgate_core::stream::StreamError> {
        Ok(vec![floodgate_core::stream::ShardInfo {
            id: floodgate_core::stream::ShardId(OUTBOX_SHARD.to_owned()),
            parent: None,
            closed: false,
        }])
    }

    async fn read(
        &self,
        _shard: &floodgate_core::stream::ShardId,
        from: &floodgate_core::stream::StartPosition,
        max_records: usize,
    ) -> Result<floodgate_core::stream::ReadBatch, floodgate_core::stream::StreamError> {
        use floodgate_core::stream::{ReadBatch, SequenceNumber, StartPosition, StoredRecord};
        let io_err = floodgate_core::stream::StreamError::Io;
        let index = self.refresh().map_err(io_err)?;
        // The first record to return, as (seq, event index).
        let (seq0, i0) = match from {
            StartPosition::TrimHorizon | StartPosition::AtTimestamp(_) => (0, 0),
            StartPosition::At(s) => {
                let n = s.as_u64().unwrap_or(0);
                (n / EVENTS_PER_ENTRY, n % EVENTS_PER_ENTRY)
            }
            StartPosition::After(s) => {
                let n = s.as_u64().unwrap_or(0) + 1;
                (n / EVENTS_PER_ENTRY, n % EVENTS_PER_ENTRY)
            }
        };
        let start = index.partition_point(|(seq, _, _)| *seq < seq0);
        let mut records = Vec::new();
        let mut consumed_lines = start;
        for &(seq, off, len) in &index[start..] {
            let line = self.read_line(off, len).map_err(io_err)?;
            let parsed: Line<'_> = serde_json::from_slice(&line)
                .map_err(|e| floodgate_core::stream::StreamError::Io(io::Error::other(e)))?;
            let skip = if seq == seq0 { i0 as usize } else { 0 };
            for (i, event) in parsed.events.iter().enumerate().skip(skip) {
                let time = serde_json::from_str::<serde_json::Value>(event.get())
                    .ok()
                    .and_then(|v| v.get("time").and_then(|t| t.as_str()).map(str::to_owned))
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            &t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
                records.push(StoredRecord {
                    sequence: SequenceNumber::from_u64(seq * EVENTS_PER_ENTRY + i as u64),
                    key: seq.to_string(),
                    payload: bytes::Bytes::copy_from_slice(event.get().as_bytes()),
                    appended_at_ms: time,
                });
            }
            consumed_lines += 1;
            if records.len() >= max_records {
                break;
            }
        }
        let next = match records.last() {
            Some(r) => StartPosition::After(r.sequence.clone()),
            None => from.clone(),
        };
        Ok(ReadBatch {
            records,
            next: Some(next),
            records_behind: (index.len() - consumed_lines.min(index.len())) as u64,
        })
    }
}
