//! The stream conformance suite (`conformance/`) over every embedded [`StreamReader`]:
//!
//! - [`EmbeddedLog`] read in the process that writes it (bounded by its in-memory durable
//!   watermark);
//! - [`EmbeddedLogReader`], the view of another process (`floodgate process`, `stream
//!   read`) of a log an [`EmbeddedLog`] writes (bounded by the published `durable` file);
//! - the derived-event log (an [`EmbeddedLog`] of one shard) as its consumers read it,
//!   fed through [`EmbeddedOutbox::publish`].
//!
//! Each backend is a small fixture: how to append records with keys, the reader, and how
//! to show the state "written, not yet durable" to the reader.

mod conformance;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conformance::{Capabilities, StreamFixture};
use floodgate_core::config::{Compression, EmbeddedStreamConfig, OutboxConfig};
use floodgate_core::state::{OutboxEntry, Publisher};
use floodgate_core::stream::{
    Appended, Record, SequenceNumber, ShardId, StreamReader, StreamWriter,
};
use floodgate_sinks::outbox::{ensure_log, log_root};
use floodgate_sinks::{EmbeddedLog, EmbeddedLogReader, EmbeddedOutbox};
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Four shards; small segments, so that reads cross segment files.
fn small_segments(compression: Compression) -> EmbeddedStreamConfig {
    EmbeddedStreamConfig {
        segment_bytes: 4096,
        compression,
        ..EmbeddedStreamConfig::default()
    }
}

const LOG_CAPABILITIES: Capabilities = Capabilities {
    keeps_keys: true,
    exact_records_behind: true,
    any_sequence_position: true,
};

async fn append_all(log: &EmbeddedLog, records: Vec<Record>) -> Vec<Appended> {
    log.append(records)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("append of record {i}: {e}")))
        .collect()
}

/// Copies the files under `from` to `to`, keeping the layout.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn shard_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-"))
        })
        .collect();
    dirs.sort();
    dirs
}

/// The embedded log, read by the process that writes it.
struct InProcessLog {
    dir: tempfile::TempDir,
    config: EmbeddedStreamConfig,
    log: Mutex<Option<Arc<EmbeddedLog>>>,
}

impl InProcessLog {
    fn new(config: EmbeddedStreamConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        Self {
            dir,
            config,
            log: Mutex::new(Some(Arc::new(log))),
        }
    }

    fn log(&self) -> Arc<EmbeddedLog> {
        self.log.lock().unwrap().clone().expect("the log is open")
    }

    /// Closes the log, lets `between` change its files, and opens it again.
    async fn reopen(&self, between: impl FnOnce()) {
        let log = self.log.lock().unwrap().take().expect("the log is open");
        log.close().await.unwrap();
        let log = Arc::into_inner(log).expect("no reader outlives a read");
        drop(log);
        between();
        let log = EmbeddedLog::open(self.dir.path(), &self.config).unwrap();
        *self.log.lock().unwrap() = Some(Arc::new(log));
    }
}

#[async_trait]
impl StreamFixture for InProcessLog {
    fn name(&self) -> String {
        format!("EmbeddedLog ({:?})", self.config.compression)
    }

    fn capabilities(&self) -> Capabilities {
        LOG_CAPABILITIES
    }

    fn reader(&self) -> Arc<dyn StreamReader> {
        self.log()
    }

    async fn append(&self, records: Vec<Record>) -> Vec<Appended> {
        append_all(&self.log(), records).await
    }

    /// Puts whole, valid frames of `records` in the segment files past the log's durable
    /// watermark, as its writer thread leaves them between its write and the fsync. The
    /// frames come from a copy of the log that appends `records` after the same history,
    /// so they carry the sequences the log would give them.
    async fn write_without_durability(&self, records: Vec<Record>) -> bool {
        let twin = tempfile::tempdir().unwrap();
        self.reopen(|| copy_tree(self.dir.path(), twin.path()))
            .await;
        {
            let twin_log = EmbeddedLog::open(twin.path(), &self.config).unwrap();
            append_all(&twin_log, records).await;
            twin_log.close().await.unwrap();
        }
        for (ours, theirs) in shard_dirs(self.dir.path())
            .into_iter()
            .zip(shard_dirs(twin.path()))
        {
            for entry in fs::read_dir(&theirs).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name();
                if !name.to_string_lossy().ends_with(".seg") {
                    continue;
                }
                let bytes = fs::read(entry.path()).unwrap();
                let target = ours.join(&name);
                let have = fs::metadata(&target).map_or(0, |m| m.len()) as usize;
                if bytes.len() > have {
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&target)
                        .unwrap()
                        .write_all(&bytes[have..])
                        .unwrap();
                }
            }
        }
        true
    }

    /// The log's next open finds the whole frames, fsyncs them and takes them in.
    async fn make_durable(&self) {
        self.reopen(|| {}).await;
    }
}

/// The embedded log as another process sees it: an [`EmbeddedLogReader`] beside a live
/// [`EmbeddedLog`] writer.
struct OtherProcessView {
    dir: tempfile::TempDir,
    writer: EmbeddedLog,
    reader: Arc<EmbeddedLogReader>,
    /// The watermarks the writer published for records the reader is not told of yet.
    withheld: Mutex<Vec<(PathBuf, Vec<u8>)>>,
}

impl OtherProcessView {
    fn new(config: EmbeddedStreamConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let writer = EmbeddedLog::open(dir.path(), &config).unwrap();
        let reader = Arc::new(EmbeddedLogReader::open(dir.path()).unwrap());
        Self {
            dir,
            writer,
            reader,
            withheld: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait]
impl StreamFixture for OtherProcessView {
    fn name(&self) -> String {
        "EmbeddedLogReader".into()
    }

    fn capabilities(&self) -> Capabilities {
        LOG_CAPABILITIES
    }

    fn reader(&self) -> Arc<dyn StreamReader> {
        self.reader.clone()
    }

    async fn append(&self, records: Vec<Record>) -> Vec<Appended> {
        append_all(&self.writer, records).await
    }

    /// Appends, then puts back the watermarks published before: the frames are whole on
    /// disk, but as far as another process knows not yet fsynced.
    async fn write_without_durability(&self, records: Vec<Record>) -> bool {
        let watermarks: Vec<PathBuf> = shard_dirs(self.dir.path())
            .into_iter()
            .map(|d| d.join("durable"))
            .collect();
        let before: Vec<Vec<u8>> = watermarks.iter().map(|p| fs::read(p).unwrap()).collect();
        append_all(&self.writer, records).await;
        let mut withheld = self.withheld.lock().unwrap();
        for (path, old) in watermarks.into_iter().zip(before) {
            withheld.push((path.clone(), fs::read(&path).unwrap()));
            fs::write(&path, old).unwrap();
        }
        true
    }

    async fn make_durable(&self) {
        for (path, published) in self.withheld.lock().unwrap().drain(..) {
            fs::write(path, published).unwrap();
        }
    }
}

/// The derived-event log as its consumers read it: records are published through
/// [`EmbeddedOutbox::publish`] as outbox entries of up to three events (so that an entry
/// spans several records), and read with an [`EmbeddedLogReader`].
struct Outbox {
    _dir: tempfile::TempDir,
    outbox: EmbeddedOutbox,
    reader: Arc<EmbeddedLogReader>,
    /// The next outbox entry seq, and the next record's sequence in the log.
    next: Mutex<(u64, u64)>,
}

const EVENTS_PER_TEST_ENTRY: usize = 3;

impl Outbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = OutboxConfig {
            segment_bytes: 4096,
            ..OutboxConfig::default()
        };
        rt().block_on(ensure_log(dir.path(), &cfg)).unwrap();
        let outbox = EmbeddedOutbox::open_with(dir.path(), &cfg).unwrap();
        let reader = Arc::new(EmbeddedLogReader::open(&log_root(dir.path())).unwrap());
        Self {
            _dir: dir,
            outbox,
            reader,
            next: Mutex::new((1, 0)),
        }
    }

    /// Groups `records` into entries of up to `per_entry` events with the next outbox
    /// seqs, and says where each record lands.
    fn entries(&self, records: &[Record], per_entry: usize) -> (Vec<OutboxEntry>, Vec<Appended>) {
        let mut next = self.next.lock().unwrap();
        let mut entries = Vec::new();
        let mut appended = Vec::new();
        for chunk in records.chunks(per_entry) {
            let seq = next.0;
            next.0 += 1;
            for _ in chunk {
                appended.push(Appended {
                    shard: ShardId("0".into()),
                    sequence: SequenceNumber::from_u64(next.1),
                });
                next.1 += 1;
            }
            entries.push(OutboxEntry {
                partition: String::new(),
                seq,
                events: chunk
                    .iter()
                    .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
                    .collect(),
            });
        }
        (entries, appended)
    }
}

#[async_trait]
impl StreamFixture for Outbox {
    fn name(&self) -> String {
        "derived-event log".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            keeps_keys: false,
            exact_records_behind: true,
            any_sequence_position: true,
        }
    }

    fn reader(&self) -> Arc<dyn StreamReader> {
        self.reader.clone()
    }

    async fn append(&self, records: Vec<Record>) -> Vec<Appended> {
        let (entries, appended) = self.entries(&records, EVENTS_PER_TEST_ENTRY);
        self.outbox.publish(&entries).await.unwrap();
        appended
    }
}

#[test]
fn embedded_log_read_in_process() {
    for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
        let fixture = InProcessLog::new(small_segments(compression));
        rt().block_on(conformance::stream_reader(&fixture));
    }
}

#[test]
fn embedded_log_read_from_another_process() {
    let fixture = OtherProcessView::new(small_segments(Compression::None));
    rt().block_on(conformance::stream_reader(&fixture));
}

#[test]
fn outbox_reader() {
    rt().block_on(conformance::stream_reader(&Outbox::new()));
}

#[test]
fn embedded_log_writer() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), &small_segments(Compression::Zstd)).unwrap();
        conformance::stream_writer("EmbeddedLog", &log, &log).await;

        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), &small_segments(Compression::None)).unwrap();
        let reader = EmbeddedLogReader::open(dir.path()).unwrap();
        conformance::stream_writer("EmbeddedLog read by EmbeddedLogReader", &log, &reader).await;
    });
}

/// Batches of key numbers (a few keys, so that keys share shards and repeat), and the
/// sizes of the reader's reads.
fn batches() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(0u8..6, 1..25), 1..12)
}

fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..20, 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn embedded_log_read_in_process_while_writing(batches in batches(), sizes in read_sizes()) {
        let fixture = Arc::new(InProcessLog::new(small_segments(Compression::None)));
        rt().block_on(conformance::read_while_writing(fixture, batches, sizes));
    }

    #[test]
    fn embedded_log_read_from_another_process_while_writing(
        batches in batches(),
        sizes in read_sizes(),
    ) {
        let fixture = Arc::new(OtherProcessView::new(small_segments(Compression::Zstd)));
        rt().block_on(conformance::read_while_writing(fixture, batches, sizes));
    }

    #[test]
    fn outbox_read_while_publishing(batches in batches(), sizes in read_sizes()) {
        rt().block_on(conformance::read_while_writing(Arc::new(Outbox::new()), batches, sizes));
    }
}
