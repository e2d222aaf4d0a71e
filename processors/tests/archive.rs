//! The archive consumer under the real runtime, over the embedded log and its checkpoints:
//! the checkpoint follows what the archive stored and never passes it. An archive that
//! goes down keeps the shard retrying; a shutdown then leaves the checkpoint where the
//! archive's last stored record put it, and the next start archives the rest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::archive::{Archive, ArchiveError, ArchiveLimits, PutResults};
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::stream::{CheckpointStore, Record, SequenceNumber, ShardId, StreamWriter};
use floodgate_processors::archive::{ArchiveConfig, ArchiveProcessor, CONSUMER};
use floodgate_processors::runtime::{RuntimeConfig, spawn_consumers};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog};
use tokio::sync::watch;

/// An archive in memory that can be taken down.
#[derive(Debug, Default)]
struct Switchable {
    down: AtomicBool,
    lines: Mutex<Vec<String>>,
    failed_calls: AtomicU64,
}

#[async_trait]
impl Archive for Switchable {
    fn limits(&self) -> ArchiveLimits {
        ArchiveLimits {
            max_records: 500,
            max_bytes: 4 << 20,
            max_record_bytes: 1000 << 10,
        }
    }

    async fn put(&self, records: &[Bytes]) -> Result<PutResults, ArchiveError> {
        if self.down.load(Ordering::SeqCst) {
            self.failed_calls.fetch_add(1, Ordering::SeqCst);
            return Err(ArchiveError::Unavailable("connection reset".into()));
        }
        let mut lines = self.lines.lock().unwrap();
        for r in records {
            let text = std::str::from_utf8(r).unwrap();
            lines.extend(text.lines().map(str::to_owned));
        }
        Ok(vec![Ok(()); records.len()])
    }
}

fn event(n: usize) -> String {
    format!(r#"{{"specversion":"1.0","id":"e{n}","source":"/t","type":"t","data":{{}}}}"#)
}

async fn append(log: &EmbeddedLog, from: usize, n: usize) -> SequenceNumber {
    let out = log
        .append(
            (from..from + n)
                .map(|i| Record {
                    key: "k".into(),
                    payload: Bytes::from(event(i)),
                })
                .collect(),
        )
        .await;
    out.into_iter().map(|r| r.unwrap().sequence).max().unwrap()
}

async fn checkpoint(c: &EmbeddedCheckpoints) -> Option<SequenceNumber> {
    c.checkpoint(CONSUMER, &ShardId("0".to_owned()))
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "not within 20 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(
    log: &Arc<EmbeddedLog>,
    checkpoints: &Arc<EmbeddedCheckpoints>,
    archive: Arc<Switchable>,
) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let config = ArchiveConfig {
        record_bytes: Some(512),
        retry_min: Duration::from_millis(1),
        retry_max: Duration::from_millis(10),
    };
    let processor = Arc::new(ArchiveProcessor::new(archive, config, stop_rx.clone()));
    let tasks = spawn_consumers(
        log.clone(),
        checkpoints.clone(),
        processor,
        RuntimeConfig::default(),
        stop_rx,
    )
    .await
    .unwrap();
    Running { stop, tasks }
}

async fn stop(r: Running) {
    r.stop.send(true).unwrap();
    for t in r.tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("the consumer stops")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_what_the_archive_stored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let config = EmbeddedStreamConfig {
        shards: 1,
        ..EmbeddedStreamConfig::default()
    };
    let log = Arc::new(EmbeddedLog::open(&root, &config).unwrap());
    let checkpoints = Arc::new(EmbeddedCheckpoints::open(&root).unwrap());
    let archive = Arc::new(Switchable::default());

    // Healthy: everything archived, then checkpointed.
    let first = append(&log, 0, 300).await;
    let running = start(&log, &checkpoints, archive.clone()).await;
    wait_for("the first 300 archived and checkpointed", async || {
        checkpoint(&checkpoints).await.as_ref() == Some(&first)
    })
    .await;
    assert_eq!(archive.lines.lock().unwrap().len(), 300);

    // Down: new events are retried, not checkpointed, and still not at shutdown.
    archive.down.store(true, Ordering::SeqCst);
    append(&log, 300, 200).await;
    wait_for("puts failing and retried", async || {
        archive.failed_calls.load(Ordering::SeqCst) >= 5
    })
    .await;
    assert_eq!(checkpoint(&checkpoints).await, Some(first.clone()));
    stop(running).await;
    assert_eq!(
        checkpoint(&checkpoints).await,
        Some(first),
        "nothing the archive did not store is checkpointed at shutdown"
    );

    // Back up: the next start archives the rest from the checkpoint.
    archive.down.store(false, Ordering::SeqCst);
    let last = append(&log, 500, 10).await;
    let running = start(&log, &checkpoints, archive.clone()).await;
    wait_for("the rest archived and checkpointed", async || {
        checkpoint(&checkpoints).await.as_ref() == Some(&last)
    })
    .await;
    stop(running).await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in archive.lines.lock().unwrap().iter() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        *seen
            .entry(v["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 510, "every event archived");
    assert!(
        seen.values().all(|n| *n == 1),
        "nothing stored was archived again"
    );
}
