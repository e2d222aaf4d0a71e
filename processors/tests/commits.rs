//! Checkpoint commits while a shard is busy: at most one per `commit_interval`, and the
//! latest durable position is committed all the same once the shard idles or stops. A
//! commit is two fsyncs on the embedded store and a conditional write on DynamoDB; a
//! consumer that keeps up made one after every small batch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::stream::{
    CheckpointStore, LeaseInfo, Record, SequenceNumber, ShardId, ShardInfo, StoredRecord,
    StreamError, StreamWriter,
};
use floodgate_processors::runtime::{
    COMMIT_INTERVAL_MS, ProcessError, RuntimeConfig, ShardProcessor, spawn_consumers,
};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog};
use tokio::sync::watch;

/// The embedded checkpoint store, counting the commits made through it; once `gone` is
/// raised, the lease is another worker's: commits are refused and renewals answer no; once
/// `hang` is raised, renewals never answer.
#[derive(Debug)]
struct Counted {
    inner: EmbeddedCheckpoints,
    commits: AtomicUsize,
    gone: AtomicBool,
    hang: AtomicBool,
}

#[async_trait]
impl CheckpointStore for Counted {
    async fn acquire_lease(&self, c: &str, s: &ShardId, o: &str) -> Result<bool, StreamError> {
        self.inner.acquire_lease(c, s, o).await
    }
    async fn renew_lease(&self, c: &str, s: &ShardId, o: &str) -> Result<bool, StreamError> {
        if self.gone.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.renew_lease(c, s, o).await
    }
    async fn release_lease(&self, c: &str, s: &ShardId, o: &str) -> Result<(), StreamError> {
        self.inner.release_lease(c, s, o).await
    }
    async fn checkpoint(
        &self,
        c: &str,
        s: &ShardId,
    ) -> Result<Option<SequenceNumber>, StreamError> {
        self.inner.checkpoint(c, s).await
    }
    async fn commit(&self, c: &str, s: &ShardId, seq: &SequenceNumber) -> Result<(), StreamError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        if self.gone.load(Ordering::SeqCst) {
            return Err(StreamError::Unavailable(
                "the lease is another worker's".into(),
            ));
        }
        self.inner.commit(c, s, seq).await
    }
    async fn leases(&self, c: &str) -> Result<Vec<LeaseInfo>, StreamError> {
        self.inner.leases(c).await
    }
    async fn request_lease(&self, c: &str, s: &ShardId, o: &str) -> Result<bool, StreamError> {
        self.inner.request_lease(c, s, o).await
    }
    async fn finish_shard(&self, c: &str, s: &ShardId) -> Result<(), StreamError> {
        self.inner.finish_shard(c, s).await
    }
    async fn ensure_leases(&self, c: &str, shards: &[ShardInfo]) -> Result<(), StreamError> {
        self.inner.ensure_leases(c, shards).await
    }
    async fn shard_finished(&self, c: &str, s: &ShardId) -> Result<bool, StreamError> {
        self.inner.shard_finished(c, s).await
    }
}

/// Counts its batches and records; each batch takes `pause`; from batch `fail_from` on
/// (when set) every batch fails, as against a sink that went down.
#[derive(Debug, Default)]
struct Slow {
    pause: Duration,
    fail_from: Option<usize>,
    batches: AtomicUsize,
    /// `tick(_, true)` calls: the flush before a shard stops.
    final_ticks: AtomicUsize,
    records: Mutex<Vec<SequenceNumber>>,
}

#[async_trait]
impl ShardProcessor for Slow {
    fn consumer(&self) -> &str {
        "slow"
    }

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
        tokio::time::sleep(self.pause).await;
        if self
            .fail_from
            .is_some_and(|n| self.batches.load(Ordering::SeqCst) >= n)
        {
            return Err(ProcessError::Other("the sink is down".into()));
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.records
            .lock()
            .unwrap()
            .extend(records.iter().map(|r| r.sequence.clone()));
        Ok(())
    }

    async fn tick(&self, _shard: &ShardId, last: bool) -> Result<(), ProcessError> {
        if last {
            self.final_ticks.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

struct Run {
    _dir: tempfile::TempDir,
    checkpoints: Arc<Counted>,
    processor: Arc<Slow>,
    last: SequenceNumber,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// 1,000 records in one append, then a consumer reading 10 at a time (100 batches back to
/// back, each taking `pause`) with `interval` between commits.
async fn start(interval: Duration, pause: Duration) -> Run {
    start_with(interval, pause, None, None).await
}

/// `renew`: renew the lease this often, and list the shards only once; `None`: no renewal
/// during a run (a lost lease is found by a refused commit).
async fn start_with(
    interval: Duration,
    pause: Duration,
    fail_from: Option<usize>,
    renew: Option<Duration>,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let config = EmbeddedStreamConfig {
        shards: 1,
        ..EmbeddedStreamConfig::default()
    };
    let log = Arc::new(EmbeddedLog::open(&root, &config).unwrap());
    let appended = log
        .append(
            (0..1000)
                .map(|i| Record {
                    key: "k".into(),
                    payload: Bytes::from(format!("r{i}")),
                })
                .collect(),
        )
        .await;
    let last = appended.last().unwrap().as_ref().unwrap().sequence.clone();
    let checkpoints = Arc::new(Counted {
        inner: EmbeddedCheckpoints::open(&root).unwrap(),
        commits: AtomicUsize::new(0),
        gone: AtomicBool::new(false),
        hang: AtomicBool::new(false),
    });
    let processor = Arc::new(Slow {
        pause,
        fail_from,
        ..Slow::default()
    });
    let (stop, stop_rx) = watch::channel(false);
    let tasks = spawn_consumers(
        log,
        checkpoints.clone(),
        processor.clone(),
        RuntimeConfig {
            max_batch_records: 10,
            batch_linger: Duration::ZERO,
            commit_interval: interval,
            renew_interval: renew.unwrap_or(Duration::from_secs(3600)),
            // One round: a shard that stopped is not started again.
            sync_interval: Duration::from_secs(3600),
            ..RuntimeConfig::default()
        },
        stop_rx,
    )
    .await
    .unwrap();
    Run {
        _dir: dir,
        checkpoints,
        processor,
        last,
        stop,
        tasks,
    }
}

/// Polls `check` every 50 ms for up to 30 s: its first `Some`; panics naming `what`.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..600 {
        if let Some(t) = check().await {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}");
}

impl Run {
    async fn checkpoint(&self) -> Option<SequenceNumber> {
        self.checkpoints
            .checkpoint("slow", &ShardId("0".into()))
            .await
            .unwrap()
    }

    /// Waits until the processor has applied `n` records; the last one's sequence.
    async fn processor_seen(&self, n: usize) -> SequenceNumber {
        eventually(
            &format!("the processor never applied {n} records"),
            async || self.processor.records.lock().unwrap().get(n - 1).cloned(),
        )
        .await
    }

    fn batches(&self) -> usize {
        self.processor.batches.load(Ordering::SeqCst)
    }

    fn commits(&self) -> usize {
        self.checkpoints.commits.load(Ordering::SeqCst)
    }

    async fn wait_for_checkpoint_at(&self, want: &SequenceNumber) {
        eventually(
            &format!("the checkpoint never reached {want:?}"),
            async || (self.checkpoint().await.as_ref() == Some(want)).then_some(()),
        )
        .await
    }

    /// Stops the consumer and waits for its tasks to end.
    async fn stop(&mut self) {
        self.stop.send(true).unwrap();
        for t in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("the consumer stops")
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_shard_commits_once_an_interval_and_its_last_position_once_idle() {
    // An interval no batch run reaches: the first batch's commit, then the idle one.
    let mut run = start(Duration::from_secs(3600), Duration::ZERO).await;
    run.wait_for_checkpoint_at(&run.last).await;
    let seen = run.processor.records.lock().unwrap().len();
    assert_eq!(seen, 1000, "every record processed once");
    let batches = run.batches();
    assert!(batches >= 100, "10 records a batch: {batches} batches");
    assert!(
        run.commits() <= 2,
        "{} commits for {batches} batches in one interval",
        run.commits()
    );
    run.stop().await;
    assert_eq!(run.checkpoint().await.as_ref(), Some(&run.last));

    // Zero: a commit after every batch, as before the interval existed.
    let mut eager = start(Duration::ZERO, Duration::ZERO).await;
    eager.wait_for_checkpoint_at(&eager.last).await;
    let batches = eager.batches();
    assert!(
        eager.commits() >= batches,
        "{} commits for {batches} batches",
        eager.commits()
    );
    eager.stop().await;
    assert_eq!(
        RuntimeConfig::default().commit_interval,
        Duration::from_millis(COMMIT_INTERVAL_MS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stopped_while_busy_commits_what_it_held_back() {
    // 100 batches of 5 ms: stopped once the first is done, the shard drains the rest and
    // commits its last position before it ends, however long the interval.
    let mut run = start(Duration::from_secs(3600), Duration::from_millis(5)).await;
    eventually("no batch", async || (run.batches() > 0).then_some(())).await;
    assert!(
        run.processor.records.lock().unwrap().len() < 1000,
        "still busy when stopped"
    );
    run.stop().await;
    assert_eq!(run.processor.records.lock().unwrap().len(), 1000, "drained");
    assert_eq!(
        run.checkpoint().await.as_ref(),
        Some(&run.last),
        "the held-back position committed at the stop"
    );
    assert!(run.commits() <= 2, "{} commits", run.commits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_keeps_failing_does_not_hold_back_the_ones_before_it() {
    // 30 batches applied, then the sink goes down: the checkpoint reaches the 30th
    // batch's last record while the 31st is retried, without waiting for the outage to end.
    let mut run = start_with(Duration::from_secs(3600), Duration::ZERO, Some(30), None).await;
    let want = run.processor_seen(300).await;
    // The applied batches committed during the outage.
    run.wait_for_checkpoint_at(&want).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_commit_refused_at_the_stop_flushes_nothing() {
    // The lease passes to another worker while batches are held back: the commit at the
    // stop is refused, and the shard ends there, lost, without its final flush (the new
    // owner has planned its runs from the checkpoint it found).
    let mut run = start(Duration::from_secs(3600), Duration::from_millis(5)).await;
    run.processor_seen(10).await;
    run.checkpoints.gone.store(true, Ordering::SeqCst);
    run.stop().await;
    assert!(
        run.checkpoints.commits.load(Ordering::SeqCst) >= 2,
        "the stop tried to commit"
    );
    assert_eq!(
        run.processor.final_ticks.load(Ordering::SeqCst),
        0,
        "no flush after the lease was found gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_never_answers_stops_the_shard_in_time() {
    // The store holds a renewal open (SDK retries, adoption, a store that never answers):
    // the shard stops within two and a half renewal periods of the last renewal, as when
    // renewals fail, before another worker may take the lease; not whenever the call ends.
    let renew = Duration::from_millis(100);
    let mut run = start_with(
        Duration::from_secs(3600),
        Duration::from_millis(20),
        None,
        Some(renew),
    )
    .await;
    run.processor_seen(10).await;
    run.checkpoints.hang.store(true, Ordering::SeqCst);
    tokio::time::sleep(renew * 10).await;
    let stopped_at = run.batches();
    tokio::time::sleep(renew * 3).await;
    assert_eq!(
        run.batches(),
        stopped_at,
        "the shard went on processing while its renewal hung"
    );
    assert!(stopped_at < 100, "it stopped before the stream's end");
    run.stop().await;
}
