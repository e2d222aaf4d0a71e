//! The embedded stream: a sharded, append-only, CRC-checked log on local disk.
//!
//! Layout under the stream root (`<data-dir>/stream/`):
//!
//! ```text
//! meta.json                     shard count and format; fixed at creation
//! LOCK                          held (flock) by the one process that writes
//! journal                       frames not yet fsynced in their segments (journal.rs)
//! shard-0000/00000000000000000000.seg   segments, named by their first sequence
//! shard-0000/durable            the shard's published durable watermark
//! checkpoints/<consumer>.json   consumers' checkpoints (see EmbeddedCheckpoints)
//! ```
//!
//! Writes: one writer thread owns every shard's active segment and the log's journal.
//! Appends queue to it; the thread takes everything queued (waiting up to
//! `group_commit_max_delay_us` for more, and while the edge is busy up to
//! `group_commit_linger_us`), writes each shard's part as record-batch frames with one
//! `write` to that shard's segment, writes the same frames to the journal, calls `fdatasync`
//! once, on the journal, and only then answers every append in the group. So concurrent
//! requests share an fsync, however many shards they touch, and an acknowledged record is
//! on disk: in its segment, or, until the next checkpoint fsyncs the segments, in the
//! journal, which open replays into them (see `journal.rs`).
//!
//! Reads never return a record beyond the shard's durable watermark: in this process the
//! writer's in-memory watermark; in another process (`floodgate process`, `floodgate stream
//! read`, [`EmbeddedLogReader`]) the watermark the writer publishes in `shard-NNNN/durable`
//! after every fsync. A frame that is whole on disk but not yet fsynced may still be undone
//! (a short write at a full disk is cut off, and its sequences are reused), so no reader
//! may see it. A reader that meets a bad frame below the watermark fails naming the file
//! and offset; it never skips records.
//!
//! Recovery at open checks the last segment of each shard and truncates a torn tail: only
//! bytes past the published watermark, which were never acknowledged. Damage below it
//! (or, for a log without a watermark, damage with valid frames after it) makes `open`
//! refuse, naming the file and offset; [`verify::check`] lists every damaged frame, and
//! [`verify::repair`] repairs with the operator's consent.

pub mod frame;
mod frame_cache;
pub mod journal;
mod segment;
pub mod snapshot;
pub mod verify;

pub(crate) use segment::start_writeback;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use frame_cache::FrameCache;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::checkpoint;
use crate::failpoint;
use segment::{Position, ScanEnd, Segment, Watermark};

/// Version of the on-disk format written in `meta.json`. 2: the journal (`journal.rs`) may
/// hold acknowledged frames that a segment does not yet hold durably, so a floodgate that
/// does not replay it must not open the log. 3: the journal keeps its size and tells its
/// generations apart, which a floodgate of format 2 cannot read. Logs of formats 1 and 2
/// are upgraded at open.
const FORMAT_VERSION: u32 = 3;
/// The format before the journal, and the format whose journal was cut back at each
/// checkpoint: both opened and upgraded.
const FORMAT_BEFORE_JOURNAL: u32 = 1;
const FORMAT_BEFORE_GENERATIONS: u32 = 2;
/// How often a writer retries publishing its watermark after a failed publication.
/// While a group lingers, how often it looks again whether the edge is still busy.
const LINGER_SLICE: Duration = Duration::from_micros(250);

/// A group lingers only while at least this many requests are in progress at the edge.
/// With fewer the edge has CPU to spare, and waiting only delays the group. Measured here
/// (2 cores, 100-event batches, closed loop, linger 2 ms): lingering whenever another
/// request was on its way cost 13-16 % of the throughput of 2 and 4 producers; from 8 in
/// progress it cost 8 producers 12 %; from 16 it costs 2 to 16 producers nothing beyond
/// the noise and gains 32 producers 7 % and 64 producers 18 %. That was with the edge at
/// 5 µs an event; at 1.4 µs the same linger halves 32 producers' throughput, so it is off
/// by default (`group_commit_linger_us = 0`).
pub const LINGER_MIN_IN_PROGRESS: usize = 16;

const PUBLISH_RETRY: Duration = Duration::from_secs(1);
/// Once this much of a segment has been written since its last writeback began, the writer
/// asks the kernel to start writing it back ([`segment::start_writeback`]), without waiting.
/// A checkpoint's fsync of the segments then finds most pages already on their way. Left to
/// the kernel, every page written since the last checkpoint (8 MiB of journal's worth) was
/// still dirty at the fsync, and the writer stopped 5-10 ms at every checkpoint, about once
/// a second at 750,000 events/s: the requests that came meanwhile waited for it, and
/// `ingest`'s open-loop p99 at that rate ran from 4 to 340 ms. Measured at that rate, three
/// runs each: at 1 MiB most checkpoints took 2.5-5 ms; at 256 KiB all took under 2.5 ms,
/// the rest being the segments' fdatasyncs of their new sizes. At 750,000 events/s that is
/// about 50 calls a second. Durability does not change: only the journal's fsync
/// acknowledges, and a checkpoint still fsyncs every segment.
const WRITEBACK_BYTES: u64 = 256 * 1024;
/// Frames are cut at about this many uncompressed bytes.
const FRAME_TARGET_BYTES: usize = 1024 * 1024;
/// The largest record (key + payload) the log takes; the Kinesis limit, so that anything
/// the embedded log takes, Kinesis takes too.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Kinesis' limit on partition key length, applied here for the same reason.
pub const MAX_KEY_BYTES: usize = 256;
/// The most records a read reserves room for up front (a caller may ask for any number).
const MAX_RESERVED_RECORDS: usize = 16 * 1024;

/// `meta.json`: what must never change for an existing log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    pub format: u32,
    pub shards: u32,
}

impl LogMeta {
    /// Marks a log of an older format (whose journal, if any, was replayed, and which is
    /// read as this format from here on) as of this format, which older floodgates refuse.
    fn upgrade(&self, root: &Path) -> io::Result<()> {
        if !matches!(
            self.format,
            FORMAT_BEFORE_JOURNAL | FORMAT_BEFORE_GENERATIONS
        ) {
            return Ok(());
        }
        let upgraded = LogMeta {
            format: FORMAT_VERSION,
            shards: self.shards,
        };
        write_atomically(
            &root.join("meta.json"),
            &serde_json::to_vec(&upgraded).unwrap(),
        )?;
        tracing::info!(
            root = %root.display(),
            "upgraded the log to format {FORMAT_VERSION} (journal generations)"
        );
        Ok(())
    }

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

/// The error of an `open` that found damage to acknowledged records: what, where, and how
/// an operator recovers.
fn refuse_damaged(root: &Path, refusal: &segment::Refusal) -> StreamError {
    let data_dir = root.parent().unwrap_or(Path::new("."));
    StreamError::Corrupt(format!(
        "damaged log, refusing to open it: {refusal}. Truncating there would silently drop \
         acknowledged records, so nothing was changed. `floodgate stream verify --data-dir {dir}` \
         lists every damaged frame; with the server stopped, `floodgate stream verify --data-dir \
         {dir} --repair` moves the damaged bytes aside (the records from the damage on leave the \
         stream; see the README, \"Damaged log\")",
        dir = data_dir.display()
    ))
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
    /// Set while the shard's last write failed (and was undone), e.g. on a full disk: the
    /// shard still takes appends, but one issued now would likely fail too, so it is not
    /// ready. Cleared by the next write that succeeds.
    write_error: Mutex<Option<String>>,
    /// The frames read last, for the next consumer of the same records.
    frames: FrameCache,
}

enum Command {
    Append(AppendRequest),
    Close(oneshot::Sender<io::Result<()>>),
    /// Stop at once, syncing nothing, as a crash would (tests only: see `EmbeddedLog::halt`).
    #[cfg(feature = "failpoints")]
    Halt(oneshot::Sender<()>),
}

/// One append call: its records, split by shard. The reply has one outcome per part: the
/// sequence of the part's first record, or why it was not appended.
struct AppendRequest {
    parts: Vec<Part>,
    bytes: u64,
    reply: oneshot::Sender<Vec<Result<u64, AppendError>>>,
}

struct Part {
    shard: u32,
    records: Vec<Record>,
}

/// Where a read of one shard left off: lets a sequential reader resume without
/// rescanning the segment from its start.
#[derive(Debug, Clone, Copy)]
struct ReadHint {
    next: u64,
    segment_base: u64,
    at: Position,
}

/// The last few places reads of one shard left off, newest first. Several consumers read
/// each shard (the bookings processor, the lake), each at its own position, and a consumer
/// that has caught up reads nothing again and again until the next append: each keeps its
/// place, so no read rescans the active segment from its start (at 128 MiB segments such
/// rescans took half the CPU under steady load).
#[derive(Debug, Clone, Default)]
struct Hints(Vec<ReadHint>);

impl Hints {
    const KEEP: usize = 8;

    fn find(&self, next: u64, segment_base: u64) -> Option<ReadHint> {
        self.0
            .iter()
            .find(|h| h.next == next && h.segment_base == segment_base)
            .copied()
    }

    fn keep(&mut self, hint: ReadHint) {
        self.0.retain(|h| h.next != hint.next);
        self.0.insert(0, hint);
        self.0.truncate(Self::KEEP);
    }
}

/// The embedded stream. Implements [`StreamWriter`] and [`StreamReader`].
#[derive(Debug)]
pub struct EmbeddedLog {
    root: PathBuf,
    shards: Vec<Arc<ShardShared>>,
    /// To the writer thread; `None` once dropped.
    sender: Option<mpsc::Sender<Command>>,
    queued_bytes: Arc<AtomicU64>,
    /// Requests in progress at the edge, as it counts them (see `StreamWriter::incoming`);
    /// the writers' group commit lingers while there are enough of them.
    incoming: Arc<AtomicUsize>,
    max_queued_bytes: u64,
    closed: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    hints: Mutex<HashMap<u32, Hints>>,
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
            Some(meta)
                if ![
                    FORMAT_VERSION,
                    FORMAT_BEFORE_GENERATIONS,
                    FORMAT_BEFORE_JOURNAL,
                ]
                .contains(&meta.format) =>
            {
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
        // Every frame the journal holds goes back into its segment before any shard's
        // recovery looks at the segment's tail.
        let replayed = journal::replay(root, meta.shards)?;
        if replayed.entries > 0 || replayed.torn_bytes > 0 {
            tracing::info!(
                entries = replayed.entries,
                bytes = replayed.bytes,
                cut_bytes = replayed.cut_bytes,
                torn_bytes = replayed.torn_bytes,
                "replayed the journal into the segments"
            );
        }
        meta.upgrade(root)?;

        let queued_bytes = Arc::new(AtomicU64::new(0));
        let incoming = Arc::new(AtomicUsize::new(0));
        let mut shards = Vec::new();
        let mut writers = Vec::new();
        for index in 0..meta.shards {
            let dir = shard_dir(root, index);
            fs::create_dir_all(&dir)?;
            let mut segments = segment::list(&dir)?;
            if segments.is_empty() {
                let path = segment::segment_path(&dir, 0);
                File::create(&path)?.sync_all()?;
                fsync_dir(&dir)?;
                fsync_dir(root)?;
                segments.push(Segment {
                    base: 0,
                    path,
                    repaired: false,
                });
            }
            let active = segments.last().expect("a shard has a segment").clone();
            let published = segment::read_watermark(&dir)?;
            if published == Watermark::Damaged {
                tracing::warn!(shard = index, dir = %dir.display(), "the durable watermark file is damaged; recovery goes by the frames alone and rewrites it");
            }
            let recovered = segment::recover(&active, published.known())?
                .map_err(|refusal| refuse_damaged(root, &refusal))?;
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
            // Everything recovered is fsynced now: publish it for readers in other processes.
            let durable_file =
                segment::open_watermark(&dir, recovered.next_sequence).map_err(|e| {
                    StreamError::Unavailable(format!(
                        "cannot publish the durable watermark in {}: {e}",
                        dir.join(segment::WATERMARK_FILE).display()
                    ))
                })?;
            let (durable_tx, _) = watch::channel(recovered.next_sequence);
            let shared = Arc::new(ShardShared {
                dir: dir.clone(),
                durable_next: AtomicU64::new(recovered.next_sequence),
                durable_tx,
                failed: Mutex::new(None),
                write_error: Mutex::new(None),
                frames: FrameCache::default(),
            });
            let file = OpenOptions::new().append(true).open(&active.path)?;
            writers.push(ShardWriter {
                index,
                shared: shared.clone(),
                root: root.to_owned(),
                file,
                durable_file,
                publish_pending: false,
                segment_base: active.base,
                segment_len: recovered.valid_len,
                writeback_from: recovered.valid_len,
                dirty: false,
                next_seq: recovered.next_sequence,
                segment_bytes: cfg.segment_bytes,
                retention_bytes: cfg.retention_bytes,
                buf: Vec::new(),
            });
            shards.push(shared);
        }
        // Every shard's segments now hold, fsynced, what the journal held: start its next
        // generation.
        let journal_generation = journal::reset(root)?;
        let journal_path = journal::path(root);
        // Read too: the failpoints keep what each write overwrites.
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&journal_path)?;
        let writer = LogWriter {
            shards: writers,
            journal,
            journal_path,
            journal_len: journal::HEADER_LEN,
            journal_generation,
            journal_buf: Vec::new(),
            max_delay: Duration::from_micros(cfg.group_commit_max_delay_us),
            linger: Duration::from_micros(cfg.group_commit_linger_us),
            group_max_bytes: cfg.group_commit_max_bytes,
            compression: cfg.compression,
            queued_bytes: queued_bytes.clone(),
            incoming: incoming.clone(),
            broken: None,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fg-log-writer".into())
            .spawn(move || writer.run(rx))?;
        tracing::info!(root = %root.display(), shards = meta.shards, "embedded log open");
        Ok(EmbeddedLog {
            root: root.to_owned(),
            shards,
            sender: Some(tx),
            queued_bytes,
            incoming,
            max_queued_bytes: cfg.max_queued_bytes,
            closed: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
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
    /// Why the log can no longer guarantee durability (an fsync failed, or a failed write
    /// could not be undone), if it cannot: it refuses every append until it is opened again.
    pub fn failed(&self) -> Option<String> {
        self.shards
            .iter()
            .find_map(|s| s.failed.lock().unwrap().clone())
    }

    /// Stops the writer the way a crash would: what is queued is dropped unanswered and
    /// nothing more is written or synced. With [`crate::failpoint::Watch::lose_unsynced`]
    /// this is a power cut; the log can be opened again once this is dropped.
    #[cfg(feature = "failpoints")]
    pub async fn halt(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(tx) = &self.sender {
            let (ack, rx) = oneshot::channel();
            if tx.send(Command::Halt(ack)).is_ok() {
                let _ = rx.await;
            }
        }
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

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
        // Let the writer finish what is queued and checkpoint; it exits when the channel
        // closes. Waiting for it means that once the log is dropped its files are settled.
        self.sender.take();
        let thread = self.thread.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = thread.take() {
            let _ = t.join();
        }
    }
}

impl EmbeddedLog {
    /// Appends `records`; for each, the shard and sequence it was given, or why not.
    async fn append_positions(&self, records: Vec<Record>) -> Vec<Result<(u32, u64), AppendError>> {
        let started = Instant::now();
        let n = records.len();
        let mut results: Vec<Option<Result<(u32, u64), AppendError>>> = vec![None; n];
        if self.closed.load(Ordering::Acquire) {
            return vec![Err(AppendError::Unavailable("the log is closed".into())); n];
        }
        // Split by shard, keeping input order within each shard, and count each shard's
        // bytes for the writer's queue.
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
        let refuse = |results: &mut Vec<Option<Result<(u32, u64), AppendError>>>,
                      indexes: &[usize],
                      e: &AppendError| {
            for &i in indexes {
                results[i] = Some(Err(e.clone()));
            }
        };
        let mut parts = Vec::new();
        let mut part_indexes = Vec::new();
        let mut bytes = 0u64;
        for (shard, (indexes, records, shard_bytes)) in per_shard.into_iter().enumerate() {
            if indexes.is_empty() {
                continue;
            }
            if let Some(reason) = self.shards[shard].failed.lock().unwrap().clone() {
                refuse(&mut results, &indexes, &AppendError::Unavailable(reason));
                continue;
            }
            bytes += shard_bytes;
            parts.push(Part {
                shard: shard as u32,
                records,
            });
            part_indexes.push((shard, indexes));
        }
        let everything = |results: &mut Vec<Option<Result<(u32, u64), AppendError>>>,
                          part_indexes: &[(usize, Vec<usize>)],
                          e: AppendError| {
            for (_, indexes) in part_indexes {
                refuse(results, indexes, &e);
            }
        };
        if !parts.is_empty() {
            let queued = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
            let sender = self.sender.as_ref();
            if queued > self.max_queued_bytes {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                metrics::counter!("floodgate_stream_append_refused_total", "reason" => "queue_full")
                    .increment(part_indexes.iter().map(|(_, i)| i.len() as u64).sum());
                everything(
                    &mut results,
                    &part_indexes,
                    AppendError::Busy {
                        retry_after_ms: 1000,
                    },
                );
            } else {
                let (reply, rx) = oneshot::channel();
                let cmd = Command::Append(AppendRequest {
                    parts,
                    bytes,
                    reply,
                });
                if sender.is_none_or(|tx| tx.send(cmd).is_err()) {
                    self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    everything(
                        &mut results,
                        &part_indexes,
                        AppendError::Unavailable("the log writer stopped".into()),
                    );
                } else {
                    match rx.await {
                        Ok(outcomes) => {
                            for ((shard, indexes), outcome) in part_indexes.iter().zip(outcomes) {
                                for (k, &i) in indexes.iter().enumerate() {
                                    results[i] = Some(match &outcome {
                                        Ok(base) => Ok((*shard as u32, base + k as u64)),
                                        Err(e) => Err(e.clone()),
                                    });
                                }
                            }
                        }
                        Err(_) => everything(
                            &mut results,
                            &part_indexes,
                            AppendError::Unavailable("the log writer stopped".into()),
                        ),
                    }
                }
            }
        }
        metrics::histogram!("floodgate_stream_append_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(AppendError::Unavailable("not appended".into()))))
            .collect()
    }
}

#[async_trait]
impl StreamWriter for EmbeddedLog {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        self.append_positions(records)
            .await
            .into_iter()
            .map(|r| {
                r.map(|(shard, sequence)| Appended {
                    shard: ShardId(shard.to_string()),
                    sequence: SequenceNumber::from_u64(sequence),
                })
            })
            .collect()
    }

    async fn append_acked(&self, records: Vec<Record>) -> Vec<Result<(), AppendError>> {
        self.append_positions(records)
            .await
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect()
    }

    fn incoming(&self) -> Option<Arc<AtomicUsize>> {
        Some(self.incoming.clone())
    }

    async fn check_writable(&self) -> Result<(), StreamError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StreamError::Unavailable("the log is closed".into()));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if let Some(reason) = shard.failed.lock().unwrap().clone() {
                return Err(StreamError::Unavailable(format!("shard {i}: {reason}")));
            }
            if let Some(reason) = shard.write_error.lock().unwrap().clone() {
                return Err(StreamError::Unavailable(format!(
                    "shard {i}: its last write failed ({reason}); ready again once a write succeeds"
                )));
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
        let outcome = match &self.sender {
            Some(tx) => {
                let (ack, rx) = oneshot::channel();
                if tx.send(Command::Close(ack)).is_ok() {
                    rx.await.unwrap_or(Ok(()))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        };
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        outcome.map_err(Into::into)
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
        let hints = self.hints.lock().unwrap().get(&index).cloned();
        let shared = shared.clone();
        let from = from.clone();
        let (batch, hint) = tokio::task::spawn_blocking(move || {
            let hints = hints.unwrap_or_default();
            let frames = Some(&shared.frames);
            read_shard(&shared.dir, &from, max_records, bound, hints, frames)
        })
        .await
        .map_err(|e| StreamError::Unavailable(format!("read task failed: {e}")))??;
        if let Some(h) = hint {
            self.hints.lock().unwrap().entry(index).or_default().keep(h);
        }
        Ok(batch)
    }
}

fn shard_infos(n: u32) -> Vec<ShardInfo> {
    (0..n)
        .map(|i| ShardInfo {
            id: ShardId(i.to_string()),
            parents: Vec::new(),
            closed: false,
        })
        .collect()
}

/// Reads records of one shard directory, none at or past `bound`, the shard's durable
/// watermark (read before the directory is listed, so every record below it is in a listed
/// segment). Damage below the bound is a [`StreamError::Corrupt`] naming file and offset.
fn read_shard(
    dir: &Path,
    from: &StartPosition,
    max: usize,
    bound: u64,
    hints: Hints,
    cache: Option<&FrameCache>,
) -> Result<(ReadBatch, Option<ReadHint>), StreamError> {
    // A segment can be deleted by retention between listing and opening; list again.
    let mut attempts = 0;
    loop {
        match try_read_shard(dir, from, max, bound, &hints, cache) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(StreamError::Corrupt(e.to_string()));
            }
            other => return other.map_err(StreamError::from),
        }
    }
}

fn try_read_shard(
    dir: &Path,
    from: &StartPosition,
    max: usize,
    bound: u64,
    hints: &Hints,
    cache: Option<&FrameCache>,
) -> io::Result<(ReadBatch, Option<ReadHint>)> {
    let segments = segment::list(dir)?;
    let Some(first) = segments.first() else {
        let batch = ReadBatch {
            records: Vec::new(),
            next: Some(from.clone()),
            records_behind: 0,
            millis_behind: None,
        };
        return Ok((batch, None));
    };
    let start = match from {
        StartPosition::TrimHorizon => first.base,
        StartPosition::At(s) => s.as_u64().unwrap_or(u64::MAX),
        StartPosition::After(s) => s.as_u64().map_or(u64::MAX, |s| s.saturating_add(1)),
        // Everything is older: start after the last durable record.
        StartPosition::AtTimestamp(ts) => {
            segment::first_sequence_at_or_after(&segments, *ts)?.map_or(bound, |seq| seq.min(bound))
        }
    }
    .max(first.base);
    // Sized once: a read of thousands of records grew its list a dozen times, each a copy.
    let wanted = usize::try_from(bound.saturating_sub(start)).map_or(max, |n| n.min(max));
    let mut records = Vec::with_capacity(wanted.min(MAX_RESERVED_RECORDS));
    let mut new_hint = None;
    if start < bound && max > 0 {
        let idx = segments
            .partition_point(|s| s.base <= start)
            .saturating_sub(1);
        let mut at = match hints.find(start, segments[idx].base) {
            Some(h) => h.at,
            None => Position {
                offset: 0,
                sequence: segments[idx].base,
            },
        };
        for (i, seg) in segments.iter().enumerate().skip(idx) {
            if seg.base >= bound {
                break;
            }
            if i > idx {
                at = Position {
                    offset: 0,
                    sequence: seg.base,
                };
            }
            let later = segments.get(i + 1);
            let scanned = segment::read_records(
                seg,
                later.is_some(),
                at,
                start..bound,
                max,
                &mut records,
                cache,
            );
            let scanned = match scanned {
                // Deliver what precedes damage; the next read starts at it and fails.
                Err(e) if e.kind() == io::ErrorKind::InvalidData && !records.is_empty() => {
                    new_hint = None;
                    break;
                }
                other => other?,
            };
            match scanned {
                ScanEnd::Full { resume } => {
                    new_hint = Some((seg.base, resume));
                    break;
                }
                ScanEnd::EndOfData { at: end } => {
                    new_hint = Some((seg.base, end));
                    let Some(later) = later else { break };
                    if end.sequence >= bound {
                        break;
                    }
                    // A sealed segment ends where the next begins, unless a repair moved
                    // its damaged tail aside (an accepted gap). Anything else would skip
                    // records without a word.
                    let accepted_gap = seg.repaired && later.base > end.sequence;
                    if later.base != end.sequence && !accepted_gap {
                        if !records.is_empty() {
                            new_hint = None;
                            break;
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} ends at sequence {} but the next segment {} starts at {}: \
                                 records are missing (`floodgate stream verify` lists the damage)",
                                seg.path.display(),
                                end.sequence,
                                later.path.display(),
                                later.base
                            ),
                        ));
                    }
                }
            }
        }
    }
    let next = records.last().map_or(start, |r| r.sequence + 1);
    let hint = new_hint.map(|(segment_base, at)| ReadHint {
        next,
        segment_base,
        at,
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
        records_behind: bound.saturating_sub(next),
        millis_behind: None,
    };
    Ok((batch, hint))
}

/// A read-only view of a log that another process may be writing (e.g. a live
/// `floodgate serve`). Takes no lock and writes nothing.
///
/// Every read is bounded by the shard's published durable watermark (`shard-NNNN/durable`,
/// read on every call: it is 16 bytes), so a record is seen only once it is durable (in the
/// journal, or in its segment), never while its frame could still be undone. Opening one
/// replays the journal of a log whose writer stopped without closing it
/// ([`journal::settle`]), since a power cut may have left acknowledged records only there. A shard without a watermark file (a log last
/// written by a floodgate that did not publish one, or one whose writer is still opening)
/// reads as empty until a writer publishes one: nothing there is known to be durable.
#[derive(Debug)]
pub struct EmbeddedLogReader {
    root: PathBuf,
    meta: LogMeta,
    hints: Mutex<HashMap<u32, Hints>>,
    /// Shards already warned about for a missing or damaged watermark (one warning each).
    warned: Mutex<Vec<u32>>,
}

impl EmbeddedLogReader {
    pub fn open(root: &Path) -> Result<EmbeddedLogReader, StreamError> {
        let meta = LogMeta::read(root)?.ok_or_else(|| {
            StreamError::Unavailable(format!(
                "no log at {} (meta.json is missing)",
                root.display()
            ))
        })?;
        // A writer stopped by a power cut may have left acknowledged records only in the
        // journal: put them back in their segments before reading those.
        journal::settle(root, meta.shards)?;
        Ok(EmbeddedLogReader {
            root: root.to_owned(),
            meta,
            hints: Mutex::new(HashMap::new()),
            warned: Mutex::new(Vec::new()),
        })
    }

    pub fn meta(&self) -> LogMeta {
        self.meta
    }

    /// The sequence below which `shard`'s records are durable, as its writer published it.
    fn durable_bound(&self, shard: u32, dir: &Path) -> Result<u64, StreamError> {
        let published = segment::read_watermark(dir).map_err(|e| {
            StreamError::Unavailable(format!(
                "cannot read the durable watermark {}: {e}",
                dir.join(segment::WATERMARK_FILE).display()
            ))
        })?;
        if let Some(w) = published.known() {
            return Ok(w);
        }
        let mut warned = self.warned.lock().unwrap();
        if !warned.contains(&shard) {
            warned.push(shard);
            tracing::warn!(
                shard,
                file = %dir.join(segment::WATERMARK_FILE).display(),
                state = ?published,
                "no durable watermark for this shard; reading nothing from it until its writer \
                 publishes one (start `floodgate serve` or `floodgate ingest` on this data directory)"
            );
        }
        Ok(0)
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
        let dir = shard_dir(&self.root, shard);
        // The bound first, then the listing: every record below it is in a listed segment.
        let bound = self.durable_bound(shard, &dir)?;
        let hints = self.hints.lock().unwrap().get(&shard).cloned();
        // Read by one consumer at a time (`floodgate stream`, the derived lake): no cache.
        let (batch, hint) = read_shard(
            &dir,
            from,
            max_records,
            bound,
            hints.unwrap_or_default(),
            None,
        )?;
        if let Some(h) = hint {
            self.hints.lock().unwrap().entry(shard).or_default().keep(h);
        }
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

/// The log's writer thread: the only code that writes segments and the journal.
struct LogWriter {
    shards: Vec<ShardWriter>,
    /// The journal; `journal_len` is where its current generation's entries end (the file
    /// may be longer: older generations' entries).
    journal: File,
    journal_path: PathBuf,
    journal_len: u64,
    journal_generation: u64,
    journal_buf: Vec<u8>,
    max_delay: Duration,
    /// How long a group may wait for more while the edge is busy (`group_commit_linger_us`).
    linger: Duration,
    group_max_bytes: u64,
    /// Requests in progress at the edge (see `StreamWriter::incoming`).
    incoming: Arc<AtomicUsize>,
    compression: Compression,
    queued_bytes: Arc<AtomicU64>,
    /// Why the log stopped (an fsync failed), if it did. A stopped log never checkpoints:
    /// the segments' unsynced pages may be gone, and the journal is what the next open
    /// replays.
    broken: Option<String>,
}

/// One shard's active segment and watermark, as the writer keeps them.
struct ShardWriter {
    index: u32,
    shared: Arc<ShardShared>,
    root: PathBuf,
    file: File,
    /// `shard-NNNN/durable`: the watermark published to readers in other processes.
    durable_file: File,
    /// The last publication failed; retried until one succeeds.
    publish_pending: bool,
    /// The active segment's first sequence (its name).
    segment_base: u64,
    segment_len: u64,
    /// Where in the active segment the bytes begin whose writeback has not been started
    /// ([`WRITEBACK_BYTES`]).
    writeback_from: u64,
    /// Written since the last checkpoint: the journal holds frames the segment may not
    /// hold durably yet.
    dirty: bool,
    next_seq: u64,
    segment_bytes: u64,
    retention_bytes: u64,
    /// This group's frames for the shard.
    buf: Vec<u8>,
}

/// Where one request's part is in a group: request, part, shard.
#[derive(Clone, Copy)]
struct Slot {
    shard: u32,
    request: usize,
    part: usize,
}

/// A shard's frames of this group, written to its segment and waiting for the journal.
struct Written {
    shard: usize,
    /// The slots whose records the frames hold, with the sequence of each one's first.
    slots: Vec<(Slot, u64)>,
    next_seq: u64,
    records: u64,
}

type Outcomes = Vec<Vec<Option<Result<u64, AppendError>>>>;

impl LogWriter {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            // While a publication of a watermark is owed, wake up now and then to retry
            // it, so that an idle shard's records do not stay invisible to other processes.
            let first = if self.shards.iter().any(|s| s.publish_pending) {
                match rx.recv_timeout(PUBLISH_RETRY) {
                    Ok(cmd) => cmd,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        for s in self.shards.iter_mut().filter(|s| s.publish_pending) {
                            s.publish(s.next_seq);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                }
            };
            let mut group = Vec::new();
            let mut group_bytes = 0u64;
            let mut close = None;
            match first {
                Command::Append(req) => {
                    group_bytes += req.bytes;
                    group.push(req);
                }
                Command::Close(ack) => close = Some(ack),
                #[cfg(feature = "failpoints")]
                Command::Halt(ack) => {
                    let _ = ack.send(());
                    return;
                }
            }
            let started = Instant::now();
            let deadline = started + self.max_delay;
            let lingered = started + self.linger;
            while close.is_none() && group_bytes < self.group_max_bytes {
                let next = match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                    Err(mpsc::TryRecvError::Empty) => {
                        // Linger longer only while the edge is busy (enough requests in
                        // progress), when more appends are bound to come: each fsync saved is
                        // CPU the edge gets back (on a VM's disk an fdatasync costs about as
                        // much CPU as checking a hundred events). A few producers, whose
                        // requests wait for this group, are never held by it. The count is
                        // looked at again every slice, so a group stops waiting soon after
                        // the edge quietens.
                        let now = Instant::now();
                        let coming =
                            self.incoming.load(Ordering::Acquire) >= LINGER_MIN_IN_PROGRESS;
                        let until = if coming {
                            deadline.max(lingered)
                        } else {
                            deadline
                        };
                        if now >= until {
                            break;
                        }
                        let wait = if coming && now >= deadline {
                            (until - now).min(LINGER_SLICE)
                        } else {
                            until - now
                        };
                        match rx.recv_timeout(wait) {
                            Ok(cmd) => cmd,
                            Err(mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                };
                match next {
                    Command::Append(req) => {
                        group_bytes += req.bytes;
                        group.push(req);
                    }
                    Command::Close(ack) => close = Some(ack),
                    #[cfg(feature = "failpoints")]
                    Command::Halt(ack) => {
                        let _ = ack.send(());
                        return;
                    }
                }
            }
            if !group.is_empty() {
                self.commit(group);
                if self.journal_len >= journal::CHECKPOINT_BYTES {
                    self.checkpoint_or_fail();
                }
            }
            if let Some(ack) = close {
                let _ = ack.send(self.close());
                return;
            }
        }
        // Channel closed without an explicit close (the log was dropped).
        let _ = self.close();
    }

    /// Makes everything written durable in the segments (a checkpoint) and publishes what
    /// is owed.
    fn close(&mut self) -> io::Result<()> {
        self.checkpoint()?;
        for s in self.shards.iter_mut().filter(|s| s.publish_pending) {
            s.publish(s.next_seq);
        }
        Ok(())
    }

    /// Fsyncs every segment written since the last checkpoint, then starts the journal's
    /// next generation: from here on the segments alone hold what was acknowledged.
    fn checkpoint(&mut self) -> io::Result<()> {
        if let Some(reason) = &self.broken {
            return Err(io::Error::other(format!(
                "the log stopped ({reason}); the next open replays the journal"
            )));
        }
        let started = Instant::now();
        for s in self.shards.iter_mut().filter(|s| s.dirty) {
            failpoint::sync_data(&s.file, &s.shared.dir)?;
            s.dirty = false;
            s.writeback_from = s.segment_len;
        }
        // The segments now hold every entry's frames durably: a new generation leaves
        // them behind, and its entries overwrite theirs.
        if self.journal_len > journal::HEADER_LEN {
            let next = journal::next_generation(self.journal_generation);
            journal::start_generation(&self.journal, &self.journal_path, next)?;
            self.journal_generation = next;
            self.journal_len = journal::HEADER_LEN;
        }
        metrics::histogram!("floodgate_stream_checkpoint_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A checkpoint; one that fails stops the log (a segment's fsync failed, or the journal's
    /// new generation could not be made durable).
    fn checkpoint_or_fail(&mut self) -> bool {
        if self.broken.is_some() {
            return false;
        }
        match self.checkpoint() {
            Ok(()) => true,
            Err(e) => {
                self.fail_all(format!("checkpoint failed: {e}"));
                false
            }
        }
    }

    fn fail_all(&mut self, reason: String) {
        tracing::error!(%reason, "log writer failed; appends are refused until restart");
        for s in &self.shards {
            *s.shared.failed.lock().unwrap() = Some(reason.clone());
        }
        self.broken.get_or_insert(reason);
    }

    fn commit(&mut self, group: Vec<AppendRequest>) {
        let mut outcomes: Outcomes = group.iter().map(|r| vec![None; r.parts.len()]).collect();
        let mut slots: Vec<Slot> = group
            .iter()
            .enumerate()
            .flat_map(|(request, r)| {
                r.parts.iter().enumerate().map(move |(part, p)| Slot {
                    shard: p.shard,
                    request,
                    part,
                })
            })
            .collect();
        // By shard, each shard's parts in the order they came (a stable sort).
        slots.sort_by_key(|s| s.shard);

        // A shard about to roll seals its segment: first make the journal hold nothing
        // for it, so that replay never writes into a sealed segment (which retention may
        // delete).
        let rolls = slots.iter().any(|slot| {
            let s = &self.shards[slot.shard as usize];
            s.segment_len >= s.segment_bytes && s.shared.failed.lock().unwrap().is_none()
        });
        if rolls {
            // One that fails stops every shard, and the loop below refuses every part.
            self.checkpoint_or_fail();
        }

        self.journal_buf.clear();
        let ts = now_ms();
        let mut written: Vec<Written> = Vec::new();
        let mut start = 0;
        while start < slots.len() {
            let shard = slots[start].shard as usize;
            let end = start
                + slots[start..]
                    .iter()
                    .take_while(|s| s.shard as usize == shard)
                    .count();
            let these = &slots[start..end];
            start = end;
            let s = &mut self.shards[shard];
            let refuse = |outcomes: &mut Outcomes, e: AppendError| {
                for slot in these {
                    outcomes[slot.request][slot.part] = Some(Err(e.clone()));
                }
            };
            if let Some(reason) = s.shared.failed.lock().unwrap().clone() {
                refuse(&mut outcomes, AppendError::Unavailable(reason));
                continue;
            }
            if s.segment_len >= s.segment_bytes
                && let Err(e) = s.roll()
            {
                s.fail(format!("cannot roll segment: {e}"));
                refuse(
                    &mut outcomes,
                    AppendError::Unavailable(format!("cannot roll segment: {e}")),
                );
                continue;
            }
            let parts = these
                .iter()
                .map(|slot| (*slot, &group[slot.request].parts[slot.part].records[..]));
            let encoded = match s.encode(parts, ts, self.compression) {
                Ok(encoded) => encoded,
                Err(e) => {
                    refuse(
                        &mut outcomes,
                        AppendError::Refused(format!("cannot encode records: {e}")),
                    );
                    continue;
                }
            };
            if let Err(e) = failpoint::write_all(&mut s.file, &s.buf, &s.shared.dir) {
                s.undo_write(&e);
                refuse(
                    &mut outcomes,
                    AppendError::Unavailable(format!("write failed: {e}")),
                );
                continue;
            }
            journal::push_entry(
                &mut self.journal_buf,
                self.journal_generation,
                s.index,
                s.segment_base,
                s.segment_len,
                &s.buf,
            );
            written.push(encoded);
        }

        if !written.is_empty() {
            self.make_durable(&mut outcomes, written);
        }
        let mut released = 0;
        for (req, outcome) in group.into_iter().zip(outcomes) {
            released += req.bytes;
            let outcome = outcome
                .into_iter()
                .map(|o| o.unwrap_or(Err(AppendError::Unavailable("not appended".into()))))
                .collect();
            let _ = req.reply.send(outcome);
        }
        self.queued_bytes.fetch_sub(released, Ordering::AcqRel);
        // After the answers, so that they never wait for it.
        for s in &mut self.shards {
            s.start_writeback_if_due();
        }
    }

    /// Writes the group's journal entries and fsyncs the journal; then the shards' new
    /// records are durable: publish them and settle their outcomes. Any failure undoes the
    /// group's writes (or stops the log, when it cannot) and refuses every written part.
    fn make_durable(&mut self, outcomes: &mut Outcomes, written: Vec<Written>) {
        let refuse_written = |outcomes: &mut Outcomes, written: &[Written], e: AppendError| {
            for w in written {
                for (slot, _) in &w.slots {
                    outcomes[slot.request][slot.part] = Some(Err(e.clone()));
                }
            }
        };
        if let Err(e) = failpoint::write_all_at(
            &self.journal,
            &self.journal_buf,
            self.journal_len,
            &self.journal_path,
        ) {
            // Undo the journal to its last entry, durably before the refusal is answered:
            // the entries it wrote lie inside the file's size, where a page written back
            // without the cut would read after a power cut as this generation's, and bring
            // back records that were refused. Then the segments to their last frames.
            let undo = failpoint::set_len(&self.journal, self.journal_len, &self.journal_path)
                .and_then(|()| failpoint::sync_data(&self.journal, &self.journal_path));
            if let Err(u) = undo {
                self.fail_all(format!(
                    "journal write failed ({e}) and could not be undone ({u})"
                ));
            }
            for w in &written {
                self.shards[w.shard].undo_write(&e);
            }
            refuse_written(
                outcomes,
                &written,
                AppendError::Unavailable(format!("write failed: {e}")),
            );
            return;
        }
        let fsync_started = Instant::now();
        if let Err(e) = failpoint::sync_data(&self.journal, &self.journal_path) {
            // After a failed fsync the kernel may have dropped the dirty pages; nothing
            // written since the last good fsync can be trusted. Stop the log.
            self.fail_all(format!("fsync failed: {e}"));
            refuse_written(
                outcomes,
                &written,
                AppendError::Unavailable(format!("fsync failed: {e}")),
            );
            return;
        }
        metrics::histogram!("floodgate_stream_fsync_duration_seconds")
            .record(fsync_started.elapsed().as_secs_f64());
        self.journal_len += self.journal_buf.len() as u64;
        let mut records = 0;
        let mut bytes = 0;
        for w in written {
            let s = &mut self.shards[w.shard];
            {
                let mut write_error = s.shared.write_error.lock().unwrap();
                if write_error.take().is_some() {
                    tracing::info!(shard = s.index, "writes succeed again");
                }
            }
            records += w.records;
            bytes += s.buf.len() as u64;
            s.segment_len += s.buf.len() as u64;
            s.dirty = true;
            if s.buf.capacity() > 4 * FRAME_TARGET_BYTES {
                s.buf = Vec::new();
            }
            // Publish the new watermark before acknowledging, so a reader that hears of an
            // acknowledged record can always read it: to other processes (the file), then
            // to this one.
            s.publish(w.next_seq);
            s.next_seq = w.next_seq;
            s.shared.durable_next.store(w.next_seq, Ordering::Release);
            s.shared.durable_tx.send_replace(w.next_seq);
            for (slot, base) in w.slots {
                outcomes[slot.request][slot.part] = Some(Ok(base));
            }
        }
        if self.journal_buf.capacity() > 4 * FRAME_TARGET_BYTES {
            self.journal_buf = Vec::new();
        }
        metrics::histogram!("floodgate_stream_group_commit_records").record(records as f64);
        metrics::histogram!("floodgate_stream_group_commit_bytes").record(bytes as f64);
        metrics::counter!("floodgate_stream_appended_records_total").increment(records);
        metrics::counter!("floodgate_stream_written_bytes_total").increment(bytes);
    }
}

/// The range (offset, length) of a segment whose writeback is due, when `written` bytes of
/// it are written and the writeback of those from `from` on has not begun.
fn writeback_due(from: u64, written: u64) -> Option<(u64, u64)> {
    let len = written.checked_sub(from)?;
    (len >= WRITEBACK_BYTES).then_some((from, len))
}

impl ShardWriter {
    /// Publishes `next` as the durable watermark for readers in other processes. A failure
    /// leaves the old (lower) value in place, which is safe: those readers only lag until a
    /// later publication succeeds. The records themselves are durable either way.
    fn publish(&mut self, next: u64) {
        match segment::write_watermark(&mut self.durable_file, next) {
            Ok(()) => {
                if self.publish_pending {
                    tracing::info!(
                        shard = self.index,
                        next,
                        "durable watermark published again"
                    );
                }
                self.publish_pending = false;
            }
            Err(e) => {
                metrics::counter!("floodgate_stream_watermark_errors_total").increment(1);
                if !self.publish_pending {
                    tracing::warn!(shard = self.index, error = %e, "cannot publish the durable watermark; readers in other processes lag until it succeeds");
                }
                self.publish_pending = true;
            }
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(shard = self.index, %reason, "shard failed; appends to this shard are refused until restart");
        *self.shared.failed.lock().unwrap() = Some(reason);
    }

    /// Encodes the parts' records into `buf` as frames of about FRAME_TARGET_BYTES, from
    /// the shard's next sequence on: each part with the sequence of its first record.
    fn encode<'a>(
        &mut self,
        parts: impl Iterator<Item = (Slot, &'a [Record])>,
        ts: i64,
        compression: Compression,
    ) -> io::Result<Written> {
        self.buf.clear();
        let mut seq = self.next_seq;
        let mut placed = Vec::new();
        let mut pending: Vec<(&str, &[u8])> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut frame_base = seq;
        for (slot, records) in parts {
            placed.push((slot, seq));
            for r in records {
                pending.push((&*r.key, &r.payload[..]));
                pending_bytes += frame::record_len(&r.key, &r.payload);
                seq += 1;
                if pending_bytes >= FRAME_TARGET_BYTES {
                    frame::encode(&mut self.buf, frame_base, ts, compression, &pending)?;
                    pending.clear();
                    pending_bytes = 0;
                    frame_base = seq;
                }
            }
        }
        if !pending.is_empty() {
            frame::encode(&mut self.buf, frame_base, ts, compression, &pending)?;
        }
        Ok(Written {
            shard: self.index as usize,
            slots: placed,
            next_seq: seq,
            records: seq - self.next_seq,
        })
    }

    /// Undoes a failed (or unjournaled) write so the next group starts on a frame boundary.
    fn undo_write(&mut self, e: &io::Error) {
        let undo = failpoint::set_len(&self.file, self.segment_len, &self.shared.dir);
        if let Err(u) = undo {
            self.fail(format!("write failed ({e}) and could not be undone ({u})"));
        }
        *self.shared.write_error.lock().unwrap() = Some(e.to_string());
        metrics::counter!("floodgate_stream_write_errors_total").increment(1);
    }

    /// Starts the writeback of what was written since the last one began, once that is
    /// [`WRITEBACK_BYTES`] or more.
    fn start_writeback_if_due(&mut self) {
        let Some((offset, len)) = writeback_due(self.writeback_from, self.segment_len) else {
            return;
        };
        self.writeback_from = offset + len;
        if let Err(e) = failpoint::start_writeback(&self.file, offset, len, &self.shared.dir) {
            // Only a hint: the checkpoint's fsync writes whatever it did not, and reports
            // the disk's error if there is one. A file system without the call says so
            // every time, which is not worth a warning.
            match e.kind() {
                io::ErrorKind::Unsupported | io::ErrorKind::InvalidInput => {
                    tracing::debug!(shard = self.index, error = %e, "could not start a segment's writeback")
                }
                _ => {
                    tracing::warn!(shard = self.index, error = %e, "could not start a segment's writeback")
                }
            }
        }
    }

    fn roll(&mut self) -> io::Result<()> {
        failpoint::sync_all(&self.file, &self.shared.dir)?;
        let path = segment::segment_path(&self.shared.dir, self.next_seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        fsync_dir(&self.shared.dir)?;
        self.file = file;
        self.segment_base = self.next_seq;
        self.segment_len = 0;
        self.writeback_from = 0;
        self.dirty = false;
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
        // The newest sealed segment stays as well as the active one: right after a roll the
        // active segment is empty, and the shard's last record must still be readable (the
        // derived-event log's writer finds its position from it).
        for i in 0..segments.len().saturating_sub(2) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte written has its writeback started once, in order, [`WRITEBACK_BYTES`] or
    /// more at a time: the ranges run on from each other and never past what was written.
    #[test]
    fn writeback_is_started_for_each_step_written_and_never_twice() {
        const W: u64 = WRITEBACK_BYTES;
        let mut from = 0;
        let mut started = Vec::new();
        let mut written = 0;
        // Groups of odd sizes, as a writer appends them; the third ends exactly at W.
        for group in [W / 4, W / 2, W / 4, 1, 2 * W, 10, W - 1, 5] {
            written += group;
            if let Some((offset, len)) = writeback_due(from, written) {
                assert!(len >= W && offset + len == written);
                started.push((offset, len));
                from = offset + len;
            }
        }
        assert_eq!(started, [(0, W), (W, 2 * W + 1), (3 * W + 1, W + 9)]);
        // Nothing is due below W, nor for a range that a checkpoint already covered
        // (the writer's `from` then stands past what it had written).
        assert_eq!(writeback_due(from, from + WRITEBACK_BYTES - 1), None);
        assert_eq!(writeback_due(from + 10, from), None);
        // The call itself, on a real file: a hint the kernel takes, for any range.
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("seg")).unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; 2 * WRITEBACK_BYTES as usize]).unwrap();
        segment::start_writeback(&f, 0, 2 * WRITEBACK_BYTES).unwrap();
        segment::start_writeback(&f, WRITEBACK_BYTES, 10 * WRITEBACK_BYTES).unwrap();
    }

    /// Runs `test` with a new one-shard log in a temp dir (given too), on a runtime of its own.
    fn on_one_shard(test: impl AsyncFnOnce(EmbeddedLog, &Path)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EmbeddedStreamConfig {
            shards: 1,
            ..EmbeddedStreamConfig::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let log = EmbeddedLog::open(dir.path(), &cfg).unwrap();
            test(log, dir.path()).await;
        });
    }

    /// Two consumers of one shard, one of them caught up and polling: each read resumes
    /// from where that consumer left off instead of scanning the segment from its start.
    #[test]
    fn each_consumer_keeps_its_place_even_when_a_read_finds_nothing() {
        on_one_shard(async |log, _dir| {
            let shard = ShardId("0".into());
            for i in 0..50 {
                let r = log
                    .append(vec![Record {
                        key: "k".into(),
                        payload: format!("r{i}").into_bytes().into(),
                    }])
                    .await;
                r[0].as_ref().unwrap();
            }
            let at = |n: u64| StartPosition::At(SequenceNumber::from_u64(n));
            let hinted = |next: u64| {
                let hints = log.hints.lock().unwrap();
                hints.get(&0).and_then(|h| h.find(next, 0)).is_some()
            };
            // The bookings processor reads everything; the lake is behind, at 20.
            log.read(&shard, &at(0), 100).await.unwrap();
            log.read(&shard, &at(0), 20).await.unwrap();
            assert!(hinted(50) && hinted(20));
            // Caught up, the first polls again and again and finds nothing new.
            for _ in 0..3 {
                assert!(
                    log.read(&shard, &at(50), 100)
                        .await
                        .unwrap()
                        .records
                        .is_empty()
                );
            }
            assert!(
                hinted(50),
                "a read that found nothing dropped the consumer's place"
            );
            assert!(hinted(20), "one consumer's read took the other's place");
            log.close().await.unwrap();
        });
    }

    /// Two consumers reading the same records, at the same place or not: the second reads
    /// each frame from the cache the first filled, and gets the very records the file holds.
    #[test]
    fn a_second_consumer_reads_the_frames_the_first_decoded() {
        on_one_shard(async |log, dir| {
            let shard = ShardId("0".into());
            // Five frames of ten records each.
            for f in 0..5 {
                let batch = (0..10)
                    .map(|i| Record {
                        key: format!("k{f}").into(),
                        payload: format!("r{f}-{i}").into_bytes().into(),
                    })
                    .collect();
                for r in log.append(batch).await {
                    r.unwrap();
                }
            }
            let at = |n: u64| StartPosition::At(SequenceNumber::from_u64(n));
            let hits = || log.shards[0].frames.hits();
            let first = log.read(&shard, &at(0), 100).await.unwrap().records;
            assert_eq!(first.len(), 50);
            assert_eq!(hits(), 0, "the first reader decodes every frame");
            // The second, a batch at a time: each batch starts inside a frame and runs on
            // past its end, and is whole.
            let mut second = Vec::new();
            let mut from = at(0);
            while second.len() < 50 {
                let batch = log.read(&shard, &from, 15).await.unwrap();
                assert_eq!(batch.records.len(), 15.min(50 - second.len()));
                from = batch.next.clone().unwrap();
                second.extend(batch.records);
            }
            assert_eq!(format!("{first:?}"), format!("{second:?}"));
            assert!(
                hits() >= 5,
                "{} of the second reader's frames cached",
                hits()
            );
            assert_eq!(log.shards[0].frames.len(), 5, "each frame kept once");
            // What a fresh open reads from the file alone is the same.
            log.close().await.unwrap();
            let cold = EmbeddedLogReader::open(dir).unwrap();
            let third = cold.read(&shard, &at(0), 100).await.unwrap().records;
            assert_eq!(format!("{first:?}"), format!("{third:?}"));
        });
    }
}
