//! The embedded stream: a sharded, append-only, CRC-checked log on local disk.
//!
//! Layout under the stream root (`<data-dir>/stream/`):
//!
//! ```text
//! meta.json                     shard count and format; fixed at creation
//! LOCK                          held (flock) by the one process that writes
//! shard-0000/00000000000000000000.seg   segments, named by their first sequence
//! checkpoints/<consumer>.json   consumers' checkpoints (see EmbeddedCheckpoints)
//! ```
//!
//! Writes: each shard has one writer thread that owns the active segment. Appends queue
//! to it; the thread takes everything queued (waiting up to `group_commit_max_delay_us`
//! for more), writes it as record-batch frames with one `write`, calls `fdatasync` once,
//! and only then answers every append in the group. So concurrent requests share an
//! fsync, and an acknowledged record is on disk.
//!
//! Reads never return a record beyond the shard's durable watermark (in this process) or
//! a frame that fails its CRC (from another process, e.g. `floodgate stream read`).
//!
//! Recovery at open scans the last segment of each shard and truncates a torn tail; every
//! fsynced frame is whole, so nothing acknowledged is lost.

mod frame;
mod segment;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use floodgate_core::config::{Compression, EmbeddedStreamConfig};
use floodgate_core::partition::shard_for_key;
use floodgate_core::stream::{
    AppendError, Appended, ReadBatch, Record, SequenceNumber, ShardId, ShardInfo, StartPosition,
    StoredRecord, StreamError, StreamReader, StreamWriter,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::checkpoint;
use segment::{ScanEnd, Segment};

/// Version of the on-disk format written in `meta.json`.
const FORMAT_VERSION: u32 = 1;
/// Frames are cut at about this many uncompressed bytes.
const FRAME_TARGET_BYTES: usize = 1024 * 1024;
/// The largest record (key + payload) the log takes; the Kinesis limit, so that anything
/// the embedded log takes, Kinesis takes too.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Kinesis' limit on partition key length, applied here for the same reason.
pub const MAX_KEY_BYTES: usize = 256;

/// `meta.json`: what must never change for an existing log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    pub format: u32,
    pub shards: u32,
}

impl LogMeta {
    fn read(root: &Path) -> Result<Option<LogMeta>, StreamError> {
        match fs::read(root.join("meta.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StreamError::Corrupt(format!("{}/meta.json: {e}", root.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn shard_dir(root: &Path, shard: u32) -> PathBuf {
    root.join(format!("shard-{shard:04}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// State of one shard shared by its writer thread and readers.
#[derive(Debug)]
struct ShardShared {
    dir: PathBuf,
    /// Sequence after the last durable record.
    durable_next: AtomicU64,
    durable_tx: watch::Sender<u64>,
    /// Set when the shard can no longer guarantee durability (an fsync failed).
    failed: Mutex<Option<String>>,
}

enum Command {
    Append(AppendRequest),
    Close(oneshot::Sender<io::Result<()>>),
}

struct AppendRequest {
    records: Vec<Record>,
    bytes: u64,
    reply: oneshot::Sender<Result<u64, AppendError>>,
}

/// Where a read of one shard left off: lets a sequential reader resume without
/// rescanning the segment from its start.
#[derive(Debug, Clone, Copy)]
struct ReadHint {
    next: u64,
    segment_base: u64,
    offset: u64,
}

/// The embedded stream. Implements [`StreamWriter`] and [`StreamReader`].
#[derive(Debug)]
pub struct EmbeddedLog {
    root: PathBuf,
    shards: Vec<Arc<ShardShared>>,
    senders: Vec<mpsc::Sender<Command>>,
    queued_bytes: Arc<AtomicU64>,
    max_queued_bytes: u64,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    hints: Mutex<HashMap<u32, ReadHint>>,
    _lock: File,
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log under `root`, recovering each shard's tail.
    /// Refuses a shard count different from the one the log was created with, and a log
    /// another process holds.
    pub fn open(root: &Path, cfg: &EmbeddedStreamConfig) -> Result<EmbeddedLog, StreamError> {
        fs::create_dir_all(root)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))?;
        if lock.try_lock().is_err() {
            return Err(StreamError::Unavailable(format!(
                "another process holds the log at {}",
                root.display()
            )));
        }
        let meta = match LogMeta::read(root)? {
            Some(meta) if meta.shards != cfg.shards => {
                return Err(StreamError::Unavailable(format!(
                    "the log at {} has {} shards; configured {}. Changing the shard count would move keys to other shards",
                    root.display(),
                    meta.shards,
                    cfg.shards
                )));
            }
            Some(meta) if meta.format != FORMAT_VERSION => {
                return Err(StreamError::Corrupt(format!(
                    "log format {} is not supported (expected {FORMAT_VERSION})",
                    meta.format
                )));
            }
            Some(meta) => meta,
            None => {
                let meta = LogMeta {
                    format: FORMAT_VERSION,
                    shards: cfg.shards,
                };
                write_atomically(&root.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
                meta
            }
        };
        fs::create_dir_all(root.join(checkpoint::DIR))?;

        let queued_bytes = Arc::new(AtomicU64::new(0));
        let mut shards = Vec::new();
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for index in 0..meta.shards {
            let dir = shard_dir(root, index);
            fs::create_dir_all(&dir)?;
            let mut segments = segment::list(&dir)?;
            if segments.is_empty() {
                let path = segment::segment_path(&dir, 0);
                File::create(&path)?.sync_all()?;
                fsync_dir(&dir)?;
                fsync_dir(root)?;
                segments.push(Segment { base: 0, path });
            }
            let active = segments.last().expect("a shard has a segment").clone();
            let recovered = segment::recover(&active)?;
            if recovered.truncated_bytes > 0 {
                tracing::warn!(
                    shard = index,
                    segment = %active.path.display(),
                    truncated_bytes = recovered.truncated_bytes,
                    reason = recovered.reason.unwrap_or(""),
                    "truncated a torn tail; records after the last whole frame were never acknowledged"
                );
                metrics::counter!("floodgate_stream_recovery_truncated_bytes_total")
                    .increment(recovered.truncated_bytes);
            }
            let (durable_tx, _) = watch::channel(recovered.next_sequence);
            let shared = Arc::new(ShardShared {
                dir: dir.clone(),
                durable_next: AtomicU64::new(recovered.next_sequence),
                durable_tx,
                failed: Mutex::new(None),
            });
            let file = OpenOptions::new().append(true).open(&active.path)?;
            let writer = ShardWriter {
                index,
                shared: shared.clone(),
                root: root.to_owned(),
                file,
                segment_len: recovered.valid_len,
                next_seq: recovered.next_sequence,
                segment_bytes: cfg.segment_bytes,
                retention_bytes: cfg.retention_bytes,
                max_delay: Duration::from_micros(cfg.group_commit_max_delay_us),
                group_max_bytes: cfg.group_commit_max_bytes,
                compress: cfg.compression == Compression::Zstd,
                queued_bytes: queued_bytes.clone(),
                buf: Vec::new(),
            };
            let (tx, rx) = mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("fg-log-{index}"))
                .spawn(move || writer.run(rx))?;
            shards.push(shared);
            senders.push(tx);
            threads.push(handle);
        }
        tracing::info!(root = %root.display(), shards = meta.shards, "embedded log open");
        Ok(EmbeddedLog {
            root: root.to_owned(),
            shards,
            senders,
            queued_bytes,
            max_queued_bytes: cfg.max_queued_bytes,
            closed: AtomicBool::new(false),
            threads: Mutex::new(threads),
            hints: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    /// The stream root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The shard a key is appended to.
    pub fn shard_of(&self, key: &str) -> u32 {
        shard_for_key(key, self.shard_count())
    }

    /// A receiver that changes whenever `shard`'s durable watermark (the sequence after
    /// the last durable record) moves; lets a consumer wait for new records without polling.
    pub fn watch_durable(&self, shard: u32) -> Option<watch::Receiver<u64>> {
        self.shards
            .get(shard as usize)
            .map(|s| s.durable_tx.subscribe())
    }

    fn parse_shard(&self, shard: &ShardId) -> Result<u32, StreamError> {
        shard
            .0
            .parse::<u32>()
            .ok()
            .filter(|i| (*i as usize) < self.shards.len())
            .ok_or_else(|| StreamError::UnknownShard(shard.clone()))
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        // Let the writer threads finish what is queued; they exit when the channel closes.
        self.senders.clear();
    }
}

#[async_trait]
impl StreamWriter for EmbeddedLog {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        let started = Instant::now();
        let n = records.len();
        let mut results: Vec<Option<Result<Appended, AppendError>>> = vec![None; n];
        if self.closed.load(Ordering::Acquire) {
            return vec![Err(AppendError::Unavailable("the log is closed".into())); n];
        }
        // Split by shard, keeping input order within each shard.
        let shard_count = self.shard_count();
        let mut per_shard: Vec<(Vec<usize>, Vec<Record>, u64)> =
            (0..shard_count).map(|_| Default::default()).collect();
        for (i, record) in records.into_iter().enumerate() {
            if record.key.len() > MAX_KEY_BYTES {
                results[i] = Some(Err(AppendError::Refused(format!(
                    "partition key longer than {MAX_KEY_BYTES} bytes"
                ))));
                continue;
            }
            if record.key.len() + record.payload.len() > MAX_RECORD_BYTES {
                results[i] = Some(Err(AppendError::Refused(format!(
                    "record larger than {MAX_RECORD_BYTES} bytes"
                ))));
                continue;
            }
            let shard = shard_for_key(&record.key, shard_count) as usize;
            let slot = &mut per_shard[shard];
            slot.2 += (record.key.len() + record.payload.len() + 6) as u64;
            slot.0.push(i);
            slot.1.push(record);
        }
        let mut waiting = Vec::new();
        for (shard, (indexes, records, bytes)) in per_shard.into_iter().enumerate() {
            if indexes.is_empty() {
                continue;
            }
            let refuse = |results: &mut Vec<Option<Result<Appended, AppendError>>>,
                          e: AppendError| {
                for &i in &indexes {
                    results[i] = Some(Err(e.clone()));
                }
            };
            if let Some(reason) = self.shards[shard].failed.lock().unwrap().clone() {
                refuse(&mut results, AppendError::Unavailable(reason));
                continue;
            }
            let queued = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
            if queued > self.max_queued_bytes {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                metrics::counter!("floodgate_stream_append_refused_total", "reason" => "queue_full")
                    .increment(indexes.len() as u64);
                refuse(
                    &mut results,
                    AppendError::Busy {
                        retry_after_ms: 1000,
                    },
                );
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let cmd = Command::Append(AppendRequest {
                records,
                bytes,
                reply,
            });
            if self.senders[shard].send(cmd).is_err() {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                refuse(
                    &mut results,
                    AppendError::Unavailable("the log writer stopped".into()),
                );
                continue;
            }
            waiting.push((shard, indexes, rx));
        }
        for (shard, indexes, rx) in waiting {
            let outcome = rx
                .await
                .unwrap_or_else(|_| Err(AppendError::Unavailable("the log writer stopped".into())));
            for (k, &i) in indexes.iter().enumerate() {
                results[i] = Some(outcome.clone().map(|base| Appended {
                    shard: ShardId(shard.to_string()),
                    sequence: SequenceNumber::from_u64(base + k as u64),
                }));
            }
        }
        metrics::histogram!("floodgate_stream_append_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(AppendError::Unavailable("not appended".into()))))
            .collect()
    }

    async fn check_writable(&self) -> Result<(), StreamError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StreamError::Unavailable("the log is closed".into()));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if let Some(reason) = shard.failed.lock().unwrap().clone() {
                return Err(StreamError::Unavailable(format!("shard {i}: {reason}")));
            }
        }
        if self.queued_bytes.load(Ordering::Acquire) >= self.max_queued_bytes {
            return Err(StreamError::Unavailable("append queue is full".into()));
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), StreamError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut acks = Vec::new();
        for tx in &self.senders {
            let (ack, rx) = oneshot::channel();
            if tx.send(Command::Close(ack)).is_ok() {
                acks.push(rx);
            }
        }
        let mut first_err = None;
        for rx in acks {
            if let Ok(Err(e)) = rx.await {
                first_err.get_or_insert(e);
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl StreamReader for EmbeddedLog {
    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        Ok(shard_infos(self.shard_count()))
    }

    async fn read(
        &self,
        shard: &ShardId,
        from: &StartPosition,
        max_records: usize,
    ) -> Result<ReadBatch, StreamError> {
        let index = self.parse_shard(shard)?;
        let shared = &self.shards[index as usize];
        let bound = shared.durable_next.load(Ordering::Acquire);
        let hint = self.hints.lock().unwrap().get(&index).copied();
        let dir = shared.dir.clone();
        let from = from.clone();
        let (batch, hint) = tokio::task::spawn_blocking(move || {
            read_shard(&dir, &from, max_records, Some(bound), hint)
        })
        .await
        .map_err(|e| StreamError::Unavailable(format!("read task failed: {e}")))??;
        let mut hints = self.hints.lock().unwrap();
        match hint {
            Some(h) => hints.insert(index, h),
            None => hints.remove(&index),
        };
        Ok(batch)
    }
}

fn shard_infos(n: u32) -> Vec<ShardInfo> {
    (0..n)
        .map(|i| ShardInfo {
            id: ShardId(i.to_string()),
            parent: None,
            closed: false,
        })
        .collect()
}

/// Reads records of one shard directory. `bound` is the durable watermark when known.
fn read_shard(
    dir: &Path,
    from: &StartPosition,
    max: usize,
    bound: Option<u64>,
    hint: Option<ReadHint>,
) -> Result<(ReadBatch, Option<ReadHint>), StreamError> {
    // A segment can be deleted by retention between listing and opening; list again.
    let mut attempts = 0;
    loop {
        match try_read_shard(dir, from, max, bound, hint) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            other => return other.map_err(StreamError::from),
        }
    }
}

fn try_read_shard(
    dir: &Path,
    from: &StartPosition,
    max: usize,
    bound: Option<u64>,
    hint: Option<ReadHint>,
) -> io::Result<(ReadBatch, Option<ReadHint>)> {
    let segments = segment::list(dir)?;
    let bound_or_max = bound.unwrap_or(u64::MAX);
    let Some(first) = segments.first() else {
        let batch = ReadBatch {
            records: Vec::new(),
            next: Some(from.clone()),
            records_behind: 0,
        };
        return Ok((batch, None));
    };
    let start = match from {
        StartPosition::TrimHorizon => first.base,
        StartPosition::At(s) => s.as_u64().unwrap_or(u64::MAX),
        StartPosition::After(s) => s.as_u64().map_or(u64::MAX, |s| s.saturating_add(1)),
        StartPosition::AtTimestamp(ts) => {
            match segment::first_sequence_at_or_after(&segments, *ts)? {
                Some(seq) => seq,
                // Everything is older: start after the last record.
                None => bound.unwrap_or_else(|| last_sequence(&segments).unwrap_or(first.base)),
            }
        }
    }
    .max(first.base);
    let mut records = Vec::new();
    let mut new_hint = None;
    if start < bound_or_max && max > 0 {
        let idx = segments
            .partition_point(|s| s.base <= start)
            .saturating_sub(1);
        let mut offset = match hint {
            Some(h) if h.next == start && h.segment_base == segments[idx].base => h.offset,
            _ => 0,
        };
        for seg in &segments[idx..] {
            if seg.base >= bound_or_max {
                break;
            }
            match segment::read_records(seg, offset, start, bound_or_max, max, &mut records)? {
                ScanEnd::Full { resume_offset } => {
                    new_hint = Some((seg.base, resume_offset));
                    break;
                }
                ScanEnd::EndOfData { offset: end } => new_hint = Some((seg.base, end)),
            }
            offset = 0;
        }
    }
    let next = records.last().map_or(start, |r| r.sequence + 1);
    let hint = new_hint.map(|(segment_base, offset)| ReadHint {
        next,
        segment_base,
        offset,
    });
    let batch = ReadBatch {
        records: records
            .into_iter()
            .map(|r| StoredRecord {
                sequence: SequenceNumber::from_u64(r.sequence),
                key: r.key,
                payload: r.payload,
                appended_at_ms: r.appended_at_ms,
            })
            .collect(),
        next: Some(StartPosition::At(SequenceNumber::from_u64(next))),
        records_behind: bound.map_or(0, |b| b.saturating_sub(next)),
    };
    Ok((batch, hint))
}

/// The sequence after the last whole record of the newest segment (for read-only views).
fn last_sequence(segments: &[Segment]) -> Option<u64> {
    let seg = segments.last()?;
    let mut reader = io::BufReader::new(File::open(&seg.path).ok()?);
    let mut next = seg.base;
    while let Ok(segment::FrameAt::Frame { header, .. }) = segment::read_frame(&mut reader, false) {
        next = header.next_sequence();
    }
    Some(next)
}

/// A read-only view of a log that another process may be writing (e.g. a live
/// `floodgate serve`). Takes no lock and writes nothing. It sees records as soon as their
/// frame is whole on disk, which can be a moment before that frame's fsync completes.
#[derive(Debug)]
pub struct EmbeddedLogReader {
    root: PathBuf,
    meta: LogMeta,
    hints: Mutex<HashMap<u32, ReadHint>>,
}

impl EmbeddedLogReader {
    pub fn open(root: &Path) -> Result<EmbeddedLogReader, StreamError> {
        let meta = LogMeta::read(root)?.ok_or_else(|| {
            StreamError::Unavailable(format!(
                "no log at {} (meta.json is missing)",
                root.display()
            ))
        })?;
        Ok(EmbeddedLogReader {
            root: root.to_owned(),
            meta,
            hints: Mutex::new(HashMap::new()),
        })
    }

    pub fn meta(&self) -> LogMeta {
        self.meta
    }

    /// Synchronous read, for command-line tools.
    pub fn read_blocking(
        &self,
        shard: u32,
        from: &StartPosition,
        max_records: usize,
    ) -> Result<ReadBatch, StreamError> {
        if shard >= self.meta.shards {
            return Err(StreamError::UnknownShard(ShardId(shard.to_string())));
        }
        let hint = self.hints.lock().unwrap().get(&shard).copied();
        let (batch, hint) =
            read_shard(&shard_dir(&self.root, shard), from, max_records, None, hint)?;
        let mut hints = self.hints.lock().unwrap();
        match hint {
            Some(h) => hints.insert(shard, h),
            None => hints.remove(&shard),
        };
        Ok(batch)
    }
}

#[async_trait]
impl StreamReader for EmbeddedLogReader {
    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError> {
        Ok(shard_infos(self.meta.shards))
    }

    async fn read(
        &self,
        shard: &ShardId,
        from: &StartPosition,
        max_records: usize,
    ) -> Result<ReadBatch, StreamError> {
        let index = shard
            .0
            .parse::<u32>()
            .map_err(|_| StreamError::UnknownShard(shard.clone()))?;
        self.read_blocking(index, from, max_records)
    }
}

/// The writer thread of one shard: the only code that writes its segments.
struct ShardWriter {
    index: u32,
    shared: Arc<ShardShared>,
    root: PathBuf,
    file: File,
    segment_len: u64,
    next_seq: u64,
    segment_bytes: u64,
    retention_bytes: u64,
    max_delay: Duration,
    group_max_bytes: u64,
    compress: bool,
    queued_bytes: Arc<AtomicU64>,
    buf: Vec<u8>,
}

impl ShardWriter {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut group = Vec::new();
            let mut group_bytes = 0u64;
            let mut close = None;
            match first {
                Command::Append(req) => {
                    group_bytes += req.bytes;
                    group.push(req);
                }
                Command::Close(ack) => close = Some(ack),
            }
            let deadline = Instant::now() + self.max_delay;
            while close.is_none() && group_bytes < self.group_max_bytes {
                let next = match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                    Err(mpsc::TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(cmd) => cmd,
                            Err(_) => break,
                        }
                    }
                };
                match next {
                    Command::Append(req) => {
                        group_bytes += req.bytes;
                        group.push(req);
                    }
                    Command::Close(ack) => close = Some(ack),
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if let Some(ack) = close {
                let _ = ack.send(self.file.sync_all());
                return;
            }
        }
        // Channel closed without an explicit close (the log was dropped).
        let _ = self.file.sync_all();
    }

    fn fail(&self, reason: String) {
        tracing::error!(shard = self.index, %reason, "shard writer failed; appends to this shard are refused until restart");
        *self.shared.failed.lock().unwrap() = Some(reason);
    }

    /// Answers every request of a group; `base` is the sequence of the group's first record
    /// (meaningful for `Ok` outcomes only).
    fn reply_all(
        &self,
        group: Vec<AppendRequest>,
        base: u64,
        outcome: impl Fn(u64) -> Result<u64, AppendError>,
    ) {
        let mut released = 0;
        let mut base = base;
        for req in group {
            released += req.bytes;
            let n = req.records.len() as u64;
            let _ = req.reply.send(outcome(base));
            base += n;
        }
        self.queued_bytes.fetch_sub(released, Ordering::AcqRel);
    }

    fn commit(&mut self, group: Vec<AppendRequest>) {
        if let Some(reason) = self.shared.failed.lock().unwrap().clone() {
            self.reply_all(group, 0, |_| Err(AppendError::Unavailable(reason.clone())));
            return;
        }
        if self.segment_len >= self.segment_bytes
            && let Err(e) = self.roll()
        {
            self.fail(format!("cannot roll segment: {e}"));
            self.reply_all(group, 0, |_| {
                Err(AppendError::Unavailable(format!(
                    "cannot roll segment: {e}"
                )))
            });
            return;
        }
        // Encode the group into frames of about FRAME_TARGET_BYTES.
        self.buf.clear();
        let ts = now_ms();
        let mut seq = self.next_seq;
        let mut pending: Vec<(&str, &[u8])> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut frame_base = seq;
        let mut encode_err = None;
        let mut record_count = 0u64;
        for req in &group {
            for r in &req.records {
                pending.push((r.key.as_str(), &r.payload[..]));
                pending_bytes += frame::record_len(&r.key, &r.payload);
                seq += 1;
                record_count += 1;
                if pending_bytes >= FRAME_TARGET_BYTES {
                    if let Err(e) =
                        frame::encode(&mut self.buf, frame_base, ts, self.compress, &pending)
                    {
                        encode_err.get_or_insert(e);
                    }
                    pending.clear();
                    pending_bytes = 0;
                    frame_base = seq;
                }
            }
        }
        if !pending.is_empty()
            && let Err(e) = frame::encode(&mut self.buf, frame_base, ts, self.compress, &pending)
        {
            encode_err.get_or_insert(e);
        }
        drop(pending);
        if let Some(e) = encode_err {
            self.reply_all(group, 0, |_| {
                Err(AppendError::Refused(format!("cannot encode records: {e}")))
            });
            return;
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            // Undo a partial write so the next group starts on a frame boundary.
            let undo = self.file.set_len(self.segment_len);
            if let Err(u) = undo {
                self.fail(format!("write failed ({e}) and could not be undone ({u})"));
            }
            metrics::counter!("floodgate_stream_write_errors_total").increment(1);
            self.reply_all(group, 0, |_| {
                Err(AppendError::Unavailable(format!("write failed: {e}")))
            });
            return;
        }
        let fsync_started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages; nothing
            // written since the last good fsync can be trusted. Stop this shard.
            self.fail(format!("fsync failed: {e}"));
            self.reply_all(group, 0, |_| {
                Err(AppendError::Unavailable(format!("fsync failed: {e}")))
            });
            return;
        }
        metrics::histogram!("floodgate_stream_fsync_duration_seconds")
            .record(fsync_started.elapsed().as_secs_f64());
        metrics::histogram!("floodgate_stream_group_commit_records").record(record_count as f64);
        metrics::histogram!("floodgate_stream_group_commit_bytes").record(self.buf.len() as f64);
        metrics::counter!("floodgate_stream_appended_records_total").increment(record_count);
        metrics::counter!("floodgate_stream_written_bytes_total").increment(self.buf.len() as u64);
        self.segment_len += self.buf.len() as u64;
        if self.buf.capacity() > 4 * FRAME_TARGET_BYTES {
            self.buf = Vec::new();
        }
        // Publish the new watermark before acknowledging, so a reader that hears of an
        // acknowledged record can always read it.
        let base = std::mem::replace(&mut self.next_seq, seq);
        self.shared.durable_next.store(seq, Ordering::Release);
        self.shared.durable_tx.send_replace(seq);
        self.reply_all(group, base, Ok);
    }

    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        let path = segment::segment_path(&self.shared.dir, self.next_seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        fsync_dir(&self.shared.dir)?;
        self.file = file;
        self.segment_len = 0;
        tracing::debug!(shard = self.index, base = self.next_seq, "rolled segment");
        if self.retention_bytes > 0
            && let Err(e) = self.enforce_retention()
        {
            tracing::warn!(shard = self.index, error = %e, "retention failed; will retry at the next roll");
        }
        Ok(())
    }

    /// Deletes the oldest sealed segments while the shard is over `retention_bytes`, but
    /// only segments that every consumer has checkpointed past. With no consumer
    /// checkpoints at all, nothing is deleted.
    fn enforce_retention(&self) -> io::Result<()> {
        let segments = segment::list(&self.shared.dir)?;
        let mut sizes = Vec::with_capacity(segments.len());
        for s in &segments {
            sizes.push(fs::metadata(&s.path)?.len());
        }
        let mut total: u64 = sizes.iter().sum();
        let Some(min_checkpoint) = checkpoint::min_checkpoint(&self.root, self.index)? else {
            return Ok(());
        };
        let mut deleted = 0;
        for i in 0..segments.len().saturating_sub(1) {
            if total <= self.retention_bytes {
                break;
            }
            // Segment i holds sequences below the next segment's base.
            let next_base = segments[i + 1].base;
            if min_checkpoint.saturating_add(1) < next_base {
                break;
            }
            fs::remove_file(&segments[i].path)?;
            total -= sizes[i];
            deleted += 1;
        }
        if deleted > 0 {
            fsync_dir(&self.shared.dir)?;
            metrics::counter!("floodgate_stream_segments_deleted_total").increment(deleted);
            tracing::info!(shard = self.index, deleted, "retention deleted segments");
        }
        Ok(())
    }
}
