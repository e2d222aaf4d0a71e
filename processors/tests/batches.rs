//! A consumer that keeps up with a trickle of records reads them in batches, not one read
//! per record: after a small batch it waits `batch_linger` before reading again. And the
//! wait loses nothing: every record is processed exactly once, in order, either way, and a
//! shutdown during the wait still drains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::stream::{Record, SequenceNumber, ShardId, StoredRecord, StreamWriter};
use floodgate_processors::runtime::{
    BATCH_LINGER_MS, ProcessError, RuntimeConfig, ShardProcessor, spawn_consumers,
};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog};
use tokio::sync::watch;

/// Records what it is given, batch by batch.
#[derive(Debug, Default)]
struct Counting {
    batches: AtomicUsize,
    payloads: Mutex<Vec<String>>,
}

#[async_trait]
impl ShardProcessor for Counting {
    fn consumer(&self) -> &str {
        "counting"
    }

    /// From the checkpoint.
    async fn start_position(
        &self,
        _shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
        Ok(None)
    }

    async fn process(
        &self,
        _shard: &ShardId,
        records: &[StoredRecord],
    ) -> Result<(), ProcessError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let mut payloads = self.payloads.lock().unwrap();
        payloads.extend(
            records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.payload).into_owned()),
        );
        Ok(())
    }
}

/// Appends `n` records one at a time, `every` apart, while a consumer with `linger` runs;
/// stops it once the last is appended (it drains); returns (batches, payloads seen).
async fn trickle(linger: Duration, n: usize, every: Duration) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let config = EmbeddedStreamConfig {
        shards: 1,
        ..EmbeddedStreamConfig::default()
    };
    let log = Arc::new(EmbeddedLog::open(&root, &config).unwrap());
    let checkpoints = Arc::new(EmbeddedCheckpoints::open(&root).unwrap());
    let processor = Arc::new(Counting::default());
    let (stop, stop_rx) = watch::channel(false);
    let tasks = spawn_consumers(
        log.clone(),
        checkpoints,
        processor.clone(),
        RuntimeConfig {
            batch_linger: linger,
            ..RuntimeConfig::default()
        },
        stop_rx,
    )
    .await
    .unwrap();
    let started = Instant::now();
    for i in 0..n {
        let out = log
            .append(vec![Record {
                key: "k".into(),
                payload: Bytes::from(format!("r{i}")),
            }])
            .await;
        out.into_iter().for_each(|r| {
            r.unwrap();
        });
        tokio::time::sleep_until((started + every * (i as u32 + 1)).into()).await;
    }
    stop.send(true).unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("the consumer stops")
            .unwrap();
    }
    let batches = processor.batches.load(Ordering::SeqCst);
    let payloads = processor.payloads.lock().unwrap().clone();
    (batches, payloads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_keeps_up_reads_a_trickle_in_batches_and_loses_nothing() {
    let n = 400;
    let every = Duration::from_millis(2);
    let expected: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();

    // Without the linger each record, landing 2 ms after the last, is a batch of its own.
    let (eager, seen) = trickle(Duration::ZERO, n, every).await;
    assert_eq!(seen, expected, "every record once, in order");
    // With it, a batch holds what arrived over about 50 ms: some 25 records.
    let (lingering, seen) = trickle(Duration::from_millis(50), n, every).await;
    assert_eq!(seen, expected, "every record once, in order");
    // Wide margins: the figures are about 400 and 17; a loaded machine moves both.
    assert!(
        eager >= 100,
        "without a linger, a read for about every record: {eager} batches"
    );
    assert!(
        lingering * 4 <= eager,
        "with a linger, batches of many records: {lingering} batches against {eager}"
    );
    assert_eq!(
        RuntimeConfig::default().batch_linger,
        Duration::from_millis(BATCH_LINGER_MS),
        "the closely polled stream lingers by default"
    );
    assert_eq!(
        RuntimeConfig::for_shared_stream(Duration::from_secs(10)).batch_linger,
        Duration::ZERO,
        "a shared stream's reader paces its reads itself"
    );
}
