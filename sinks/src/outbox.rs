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
