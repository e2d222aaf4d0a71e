//! `EmbeddedOutbox`: the embedded publisher of derived events, an append-only NDJSON log
//! at `<data-dir>/outbox/outbox.ndjson`.
//!
//! One line per published outbox entry, `{"seq":N,"events":[{…},…]}`, written whole and
//! fsynced before `publish` returns. A line is the unit of atomicity, and the lines before
//! a write are never touched by it: a write that fails is undone by cutting the file back
//! to exactly its length before the write, and if that undo (or an fsync) fails the outbox
//! refuses every later publish until it is opened again, so a torn line can never end up
//! between good ones.
//!
//! Only the holder of the relay lease writes (see `floodgate_processors::relay`), but
//! every process opens the outbox at start. So the writer's position is not fixed at
//! open: `last_published` and `publish` first read whatever was appended since they last
//! looked (by a relay that has since died), fsync it, and cut a torn tail that writer
//! left, so that a standby that takes the lease over neither republishes nor appends after
//! a torn line.
//!
//! Damage is told apart from a torn tail: only an incomplete last line, or bad lines with
//! no valid line after them, are a tail (something a writer was still writing). A bad line
//! with valid lines after it is damage to published events, whose outbox rows are already
//! gone from the state store: opening the outbox, [`read_events`] and [`OutboxReader`] all
//! fail then, naming the file and the byte offset, rather than cutting or skipping them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use floodgate_core::state::{OutboxEntry, PublishError, Publisher};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::checkpoint::create_dir_durably;
use crate::embedded_log::fsync_dir;
use crate::failpoint;

pub const FILE_NAME: &str = "outbox.ndjson";

#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// The whole, valid lines of a stretch of an outbox file.
struct Scan {
    /// (seq, byte offset within the stretch, byte length, number of events) of each valid
    /// line, in order.
    lines: Vec<(u64, usize, usize, usize)>,
    /// Bytes the valid lines span. What follows is a torn tail: an incomplete last line,
    /// or bad lines with nothing valid after them.
    valid: usize,
}

/// Scans `bytes` (a stretch of an outbox file starting at a line boundary). `Err` holds
/// the offset (within `bytes`) of a bad line that has valid lines after it: damage, not a
/// torn tail.
fn scan(bytes: &[u8]) -> Result<Scan, usize> {
    let mut lines = Vec::new();
    let mut valid = 0;
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
                valid = off + line.len();
            }
            Err(_) => {
                first_bad.get_or_insert(off);
            }
        }
        off += line.len();
    }
    Ok(Scan { lines, valid })
}

fn damaged(path: &Path, offset: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}: damaged outbox line at byte offset {offset}, with valid lines after it; \
             the events after it are published and must not be cut (repair or remove that \
             line by hand)",
            path.display()
        ),
    )
}

/// `err` with the path it happened on in its message.
fn at(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// Every derived event in the outbox at `dir`, in publish order. Safe beside a live
/// server: a line still being written (a torn tail) is not returned. Damage in the middle
/// of the file is an error naming the file and offset, never a silent stop.
pub fn read_events(dir: &Path) -> io::Result<Vec<String>> {
    let path = dir.join(FILE_NAME);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(|e| at(&path, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(&path, e)),
    }
    let found = scan(&bytes).map_err(|off| damaged(&path, off as u64))?;
    let mut events = Vec::new();
    for (_, off, len, _) in found.lines {
        let line: Line<'_> =
            serde_json::from_slice(&bytes[off..off + len]).map_err(io::Error::other)?;
        events.extend(line.events.iter().map(|e| e.get().to_owned()));
    }
    Ok(events)
}

#[derive(Debug)]
struct Writer {
    /// Opened for appending: every write lands at the current end of the file.
    file: File,
    /// Bytes of whole, valid lines seen so far; the next line goes here.
    end: u64,
    /// The highest seq among those lines.
    last: Option<u64>,
    /// Set when the file may hold something other than whole lines after `end` (an undo
    /// or an fsync failed): no more publishes until the outbox is opened again.
    failed: Option<String>,
}

impl Writer {
    /// Takes in the lines appended after `end` since the last look (by a relay that has
    /// since stopped), making them durable: they count as published from now on. Returns
    /// whether a torn tail follows them.
    fn catch_up(&mut self, path: &Path) -> io::Result<bool> {
        let len = self.file.metadata().map_err(|e| at(path, e))?.len();
        if len < self.end {
            return Err(io::Error::other(format!(
                "{}: the file shrank to {len} bytes, below the {} bytes of whole lines \
                 already seen",
                path.display(),
                self.end
            )));
        }
        if len == self.end {
            return Ok(false);
        }
        let mut bytes = vec![0; (len - self.end) as usize];
        self.file
            .read_exact_at(&mut bytes, self.end)
            .map_err(|e| at(path, e))?;
        let found = scan(&bytes).map_err(|off| damaged(path, self.end + off as u64))?;
        if found.valid > 0 {
            // The writer of these lines may have died before its fsync.
            failpoint::sync_data(&self.file, path).map_err(|e| {
                self.failed = Some(format!("fsync of lines another relay wrote failed: {e}"));
                at(path, e)
            })?;
            for (seq, _, _, _) in &found.lines {
                self.last = Some(self.last.map_or(*seq, |l| l.max(*seq)));
            }
            self.end += found.valid as u64;
        }
        Ok(found.valid < bytes.len())
    }

    /// Cuts the file back to `len`, durably. On failure the file's tail is unknown, so
    /// the writer stops for good (until reopened).
    fn cut_to(&mut self, path: &Path, len: u64, why: &str) -> Result<(), String> {
        let result = failpoint::set_len(&self.file, len, path)
            .and_then(|()| failpoint::sync_data(&self.file, path));
        if let Err(e) = result {
            let reason = format!("cannot cut the file back to {len} bytes after {why}: {e}");
            self.failed = Some(reason.clone());
            return Err(reason);
        }
        Ok(())
    }
}

/// The embedded [`Publisher`] (see the module docs).
#[derive(Debug)]
pub struct EmbeddedOutbox {
    path: PathBuf,
    writer: Mutex<Writer>,
}

impl EmbeddedOutbox {
    /// Opens (or creates) the outbox in `dir`. Fails, naming the file and offset, when a
    /// damaged line has valid lines after it. A torn tail is left alone here (its writer
    /// may be alive in another process) and cut by the first `publish`, which only the
    /// relay-lease holder calls.
    pub fn open(dir: &Path) -> io::Result<Self> {
        create_dir_durably(dir)?;
        let path = dir.join(FILE_NAME);
        let mut options = OpenOptions::new();
        options.read(true).append(true);
        let file = match options.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = options.create(true).open(&path).map_err(|e| at(&path, e))?;
                // The new file's name must survive a crash along with what it will hold.
                fsync_dir(dir).map_err(|e| at(dir, e))?;
                f
            }
            Err(e) => return Err(at(&path, e)),
        };
        let mut writer = Writer {
            file,
            end: 0,
            last: None,
            failed: None,
        };
        if writer.catch_up(&path)? {
            tracing::info!(path = %path.display(), end = writer.end, "outbox: a torn last line follows; the relay cuts it before it next publishes");
        }
        Ok(Self {
            path,
            writer: Mutex::new(writer),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>, PublishError> {
        self.writer
            .lock()
            .map_err(|_| PublishError(format!("{}: outbox writer poisoned", self.path.display())))
    }

    fn error(&self, what: impl std::fmt::Display) -> PublishError {
        PublishError(format!("{}: {what}", self.path.display()))
    }
}

#[async_trait]
impl Publisher for EmbeddedOutbox {
    async fn last_published(&self) -> Result<Option<u64>, PublishError> {
        let mut w = self.writer()?;
        // Called when the relay lease is taken: what a relay that died meanwhile
        // published is published.
        w.catch_up(&self.path)
            .map_err(|e| PublishError(e.to_string()))?;
        Ok(w.last)
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        let mut w = self.writer()?;
        if let Some(why) = &w.failed {
            return Err(self.error(format_args!(
                "outbox refuses to publish until reopened: {why}"
            )));
        }
        // Only the relay-lease holder publishes, so whatever appeared since the last look
        // was written by a relay that is gone: its whole lines are published (and skipped
        // below), its torn tail is cut.
        let torn = w
            .catch_up(&self.path)
            .map_err(|e| PublishError(e.to_string()))?;
        if torn {
            let end = w.end;
            tracing::warn!(path = %self.path.display(), end, "outbox: cutting a torn last line");
            w.cut_to(&self.path, end, "a torn last line")
                .map_err(|e| self.error(e))?;
        }
        let mut buf = Vec::new();
        let mut top = w.last;
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
        let start = w.end;
        if let Err(e) = failpoint::write_all(&mut w.file, &buf, &self.path) {
            // Part of `buf` may be in the file (a short write at ENOSPC): cut back to
            // exactly the length before this write, so the earlier lines stay whole and a
            // retry appends cleanly.
            w.cut_to(&self.path, start, &format!("a failed write ({e})"))
                .map_err(|u| self.error(u))?;
            return Err(self.error(format_args!("write failed (undone): {e}")));
        }
        if let Err(e) = failpoint::sync_data(&w.file, &self.path) {
            // After a failed fsync the kernel may have dropped the pages: what the file
            // holds past `start` is unknown. Take it back if we can, and stop either way;
            // the next open scans the file afresh.
            let _ = w.cut_to(&self.path, start, "a failed fsync");
            w.failed = Some(format!("fsync failed: {e}"));
            return Err(self.error(format_args!("fsync failed: {e}")));
        }
        w.end = start + buf.len() as u64;
        w.last = top;
        Ok(())
    }
}

/// The published derived events as a one-shard stream (shard `outbox`), for consumers
/// such as the lake. Record `i` of outbox entry `seq` has sequence number
/// `seq × 1,000,000 + i` and key `seq`; its `appended_at_ms` is the event's `time`, and
/// `AtTimestamp(t)` starts at the first event whose `time` is at or after `t`.
/// Read-only and lock-free beside a live relay: a torn tail is not read (it is read once
/// it is whole, or after the relay cuts and rewrites it); damage in the middle is a read
/// error naming the file and offset, never a skip.
#[derive(Debug)]
pub struct OutboxReader {
    path: PathBuf,
    /// Every whole line seen so far, in file order.
    index: Mutex<Vec<IndexedLine>>,
}

/// A whole line of the outbox file, as the reader indexed it.
#[derive(Debug, Clone, Copy)]
struct IndexedLine {
    seq: u64,
    /// Byte offset and length in the file.
    off: u64,
    len: usize,
    /// Events the line holds, and events in all the lines before it: so that
    /// `records_behind` counts records, not lines, without reading the lines again.
    events: u64,
    events_before: u64,
}

/// Events per outbox entry the sequence numbering leaves room for.
pub const EVENTS_PER_ENTRY: u64 = 1_000_000;

pub const OUTBOX_SHARD: &str = "outbox";

/// A record's sequence number as (outbox entry seq, event index).
fn split_sequence(n: u64) -> (u64, u64) {
    (n / EVENTS_PER_ENTRY, n % EVENTS_PER_ENTRY)
}

/// An event's `time` in milliseconds since the Unix epoch; 0 when it has none that parses.
fn event_time_ms(event: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(event)
        .ok()
        .and_then(|v| v.get("time").and_then(|t| t.as_str()).map(str::to_owned))
        .and_then(|t| {
            time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

impl OutboxReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
            index: Mutex::new(Vec::new()),
        }
    }

    /// Extends the index with the whole lines appended since the last look.
    fn refresh(&self) -> io::Result<Vec<IndexedLine>> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let end = index.last().map_or(0, |l| l.off + l.len as u64);
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(index.clone()),
            Err(e) => return Err(at(&self.path, e)),
        };
        let len = f.metadata().map_err(|e| at(&self.path, e))?.len();
        if len < end {
            // Only a relay undoing a write it never confirmed cuts the file; it writes the
            // same lines again (an entry's line is a function of the entry).
            return Err(io::Error::other(format!(
                "{}: the file shrank to {len} bytes, below the {end} bytes already read; \
                 waiting for the relay to rewrite them",
                self.path.display()
            )));
        }
        let mut bytes = vec![0; (len - end) as usize];
        f.read_exact_at(&mut bytes, end)
            .map_err(|e| at(&self.path, e))?;
        let found = scan(&bytes).map_err(|off| damaged(&self.path, end + off as u64))?;
        let mut events_before = index.last().map_or(0, |l| l.events_before + l.events);
        for (seq, off, len, events) in found.lines {
            index.push(IndexedLine {
                seq,
                off: end + off as u64,
                len,
                events: events as u64,
                events_before,
            });
            events_before += events as u64;
        }
        Ok(index.clone())
    }

    fn read_line(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = File::open(&self.path).map_err(|e| at(&self.path, e))?;
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, off)
            .map_err(|e| at(&self.path, e))?;
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
        shard: &floodgate_core::stream::ShardId,
        from: &floodgate_core::stream::StartPosition,
        max_records: usize,
    ) -> Result<floodgate_core::stream::ReadBatch, floodgate_core::stream::StreamError> {
        use floodgate_core::stream::{
            ReadBatch, SequenceNumber, StartPosition, StoredRecord, StreamError,
        };
        if shard.0 != OUTBOX_SHARD {
            return Err(StreamError::UnknownShard(shard.clone()));
        }
        let io_err = StreamError::Io;
        let index = self.refresh().map_err(io_err)?;
        // The first record to return, as (seq, event index), and for `AtTimestamp` the
        // time before which records are passed over. A position too large for a u64 is
        // past every record, never back at the start.
        let ((seq0, i0), not_before) = match from {
            StartPosition::TrimHorizon => ((0, 0), None),
            StartPosition::AtTimestamp(ts) => ((0, 0), Some(*ts)),
            StartPosition::At(s) => (split_sequence(s.as_u64().unwrap_or(u64::MAX)), None),
            StartPosition::After(s) => (
                split_sequence(s.as_u64().map_or(u64::MAX, |n| n.saturating_add(1))),
                None,
            ),
        };
        let start = index.partition_point(|l| l.seq < seq0);
        let mut records = Vec::new();
        // The last record returned, or passed over for being older than `not_before`:
        // where the next read continues.
        let mut last: Option<u64> = None;
        'lines: for l in &index[start..] {
            if records.len() >= max_records {
                break;
            }
            let line = self.read_line(l.off, l.len).map_err(io_err)?;
            let parsed: Line<'_> = serde_json::from_slice(&line).map_err(|e| {
                StreamError::Io(io::Error::other(format!(
                    "{}: outbox line at byte offset {} changed under the reader: {e}",
                    self.path.display(),
                    l.off
                )))
            })?;
            let skip = if l.seq == seq0 { i0 } else { 0 };
            for (i, event) in parsed.events.iter().enumerate() {
                let i = i as u64;
                if i < skip {
                    continue;
                }
                // Stop within a line too: an entry can hold more events than asked for.
                if records.len() >= max_records {
                    break 'lines;
                }
                let sequence = l.seq * EVENTS_PER_ENTRY + i;
                let time = event_time_ms(event.get());
                last = Some(sequence);
                if records.is_empty() && not_before.is_some_and(|ts| time < ts) {
                    continue;
                }
                records.push(StoredRecord {
                    sequence: SequenceNumber::from_u64(sequence),
                    key: l.seq.to_string(),
                    payload: bytes::Bytes::copy_from_slice(event.get().as_bytes()),
                    appended_at_ms: time,
                });
            }
        }
        // Records after the next read's start: the lines after its line, and what its line
        // holds from its event on.
        let (next, (seq_n, i_n)) = match last {
            Some(s) => (
                StartPosition::After(SequenceNumber::from_u64(s)),
                split_sequence(s + 1),
            ),
            None => (from.clone(), (seq0, i0)),
        };
        let total = index.last().map_or(0, |l| l.events_before + l.events);
        let k = index.partition_point(|l| l.seq < seq_n);
        let records_behind = match index.get(k) {
            Some(l) if l.seq == seq_n => total - l.events_before - i_n.min(l.events),
            Some(l) => total - l.events_before,
            None => 0,
        };
        Ok(ReadBatch {
            records,
            next: Some(next),
            records_behind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> OutboxEntry {
        OutboxEntry {
            seq,
            events: vec![format!(r#"{{"id":"e-{seq}"}}"#)],
        }
    }

    #[test]
    fn an_undo_that_fails_stops_the_outbox_until_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let outbox = EmbeddedOutbox::open(dir.path()).unwrap();
            outbox.publish(&[entry(1)]).await.unwrap();
            // A file that can be neither written nor cut: the write fails, and so does
            // the undo, so what follows the last good line is unknown.
            {
                let mut w = outbox.writer.lock().unwrap();
                w.file = File::open(outbox.path()).unwrap();
            }
            let err = outbox.publish(&[entry(2)]).await.unwrap_err();
            assert!(
                err.to_string().contains("cannot cut the file back"),
                "{err}"
            );
            // Even once the file could be written again, this outbox refuses: a torn
            // line must never end up between good ones.
            {
                let mut w = outbox.writer.lock().unwrap();
                w.file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(outbox.path())
                    .unwrap();
            }
            let err = outbox.publish(&[entry(2)]).await.unwrap_err();
            assert!(err.to_string().contains("refuses to publish"), "{err}");
            drop(outbox);

            let reopened = EmbeddedOutbox::open(dir.path()).unwrap();
            assert_eq!(reopened.last_published().await.unwrap(), Some(1));
            reopened.publish(&[entry(2)]).await.unwrap();
            assert_eq!(
                read_events(dir.path()).unwrap(),
                vec![r#"{"id":"e-1"}"#, r#"{"id":"e-2"}"#]
            );
        });
    }
}
