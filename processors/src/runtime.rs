//! The consumer runtime: one task per shard, reading from the shard's position, handing
//! batches to a [`ShardProcessor`], and committing the checkpoint only after the
//! processor has committed the batch's effects.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use floodgate_core::state::StateError;
use floodgate_core::stream::{
    CheckpointStore, ConsumerLag, SequenceNumber, ShardId, StartPosition, StoredRecord,
    StreamError, StreamReader,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Other(String),
}

/// A consumer of shards (bookings, lake).
#[async_trait]
pub trait ShardProcessor: Send + Sync + std::fmt::Debug {
    /// The consumer's name: checkpoints and metrics are kept under it.
    fn consumer(&self) -> &str;

    /// Where the processor's own committed state says `shard` is; `None` defers to the
    /// checkpoint store. Processors that record the position with their effects (bookings)
    /// answer from there, so a crash between effects and checkpoint loses nothing.
    async fn start_position(&self, shard: &ShardId)
    -> Result<Option<SequenceNumber>, ProcessError>;

    /// Commits the effects of `records` (contiguous, in sequence order). Must be
    /// idempotent: after a crash the same records may come again.
    async fn process(&self, shard: &ShardId, records: &[StoredRecord]) -> Result<(), ProcessError>;

    /// How far the checkpoint may move once `process` (or `tick`) returned. Processors
    /// that buffer (the lake) answer their last durable record; the default is every
    /// record processed.
    fn progress(&self, _shard: &ShardId) -> Progress {
        Progress::All
    }

    /// Time-based work: called when a read found nothing new, and with `last` once when
    /// the consumer stops (flush what is buffered).
    async fn tick(&self, _shard: &ShardId, _last: bool) -> Result<(), ProcessError> {
        Ok(())
    }
}

/// See [`ShardProcessor::progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Through the last record given to `process`.
    All,
    /// Through this record (`None`: nothing yet).
    Through(Option<SequenceNumber>),
}

/// Tuning of the consumer loop.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Records per read (and per processor batch).
    pub max_batch_records: usize,
    /// Back-off bounds while a shard has nothing new.
    pub idle_min: Duration,
    pub idle_max: Duration,
    /// Wait before retrying a batch that failed, or a lease another worker holds.
    pub retry_delay: Duration,
    /// This worker's identity in leases.
    pub owner: String,
    /// Where each shard's lag is published for the edge's backpressure, if anywhere.
    pub lag: Option<Arc<ConsumerLag>>,
    /// On shutdown, how long to keep processing what is already in the stream.
    pub drain_limit: Duration,
}

/// A worker identity unique to this process run.
pub fn default_owner() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("pid{}-{nanos:09}", std::process::id())
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_batch_records: 10_000,
            idle_min: Duration::from_millis(1),
            idle_max: Duration::from_millis(50),
            retry_delay: Duration::from_millis(500),
            owner: default_owner(),
            lag: None,
            drain_limit: Duration::from_secs(10),
        }
    }
}

/// Starts one task per shard. Each stops after finishing its current batch once
/// `shutdown` turns true.
pub async fn spawn_consumers(
    reader: Arc<dyn StreamReader>,
    checkpoints: Arc<dyn CheckpointStore>,
    processor: Arc<dyn ShardProcessor>,
    config: RuntimeConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, StreamError> {
    let mut tasks = Vec::new();
    for shard in reader.shards().await? {
        let (reader, checkpoints, processor, config, shutdown) = (
            reader.clone(),
            checkpoints.clone(),
            processor.clone(),
            config.clone(),
            shutdown.clone(),
        );
        let span =
            tracing::info_span!("consumer", consumer = %processor.consumer(), shard = %shard.id);
        tasks.push(tokio::spawn(
            run_shard(reader, checkpoints, processor, shard.id, config, shutdown).instrument(span),
        ));
    }
    Ok(tasks)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Sleeps `d` unless shutdown comes first; returns true on shutdown.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

async fn run_shard(
    reader: Arc<dyn StreamReader>,
    checkpoints: Arc<dyn CheckpointStore>,
    processor: Arc<dyn ShardProcessor>,
    shard: ShardId,
    config: RuntimeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let consumer = processor.consumer().to_owned();
    // Own the shard first: one worker per (consumer, shard) at a time.
    loop {
        match checkpoints
            .acquire_lease(&consumer, &shard, &config.owner)
            .await
        {
            Ok(true) => break,
            Ok(false) => tracing::debug!("another worker holds the lease; waiting"),
            Err(e) => tracing::warn!(error = %e, "cannot take the lease; retrying"),
        }
        if pause(config.retry_delay, &mut shutdown).await {
            return;
        }
    }
    consume(
        &*reader,
        &*checkpoints,
        &*processor,
        &shard,
        &config,
        &mut shutdown,
    )
    .await;
    // This worker no longer holds the shard back.
    if let Some(lag) = &config.lag {
        lag.set(&consumer, &shard, 0);
    }
    if let Err(e) = checkpoints
        .release_lease(&consumer, &shard, &config.owner)
        .await
    {
        tracing::warn!(error = %e, "cannot release the lease");
    }
}

async fn consume(
    reader: &dyn StreamReader,
    checkpoints: &dyn CheckpointStore,
    processor: &dyn ShardProcessor,
    shard: &ShardId,
    config: &RuntimeConfig,
    shutdown: &mut watch::Receiver<bool>,
) {
    let shard = shard.clone();
    let consumer = processor.consumer().to_owned();
    let mut shutdown = shutdown.clone();
    let labels = [("consumer", consumer.clone()), ("shard", shard.0.clone())];
    // Resume: the processor's own position, else the checkpoint, else the oldest record.
    let mut position = loop {
        let own = processor.start_position(&shard).await;
        let stored = match own {
            Ok(Some(p)) => Ok(Some(p)),
            Ok(None) => checkpoints
                .checkpoint(&consumer, &shard)
                .await
                .map_err(ProcessError::from),
            Err(e) => Err(e),
        };
        match stored {
            Ok(Some(seq)) => break StartPosition::After(seq),
            Ok(None) => break StartPosition::TrimHorizon,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the start position; retrying");
                if pause(config.retry_delay, &mut shutdown).await {
                    return;
                }
            }
        }
    };
    tracing::info!(?position, "consumer started");
    let mut committed = match &position {
        StartPosition::After(seq) => Some(seq.clone()),
        _ => None,
    };
    let mut idle = config.idle_min;
    // On shutdown the loop drains: it stops at the first read that finds nothing new, so
    // everything the edge accepted before it stopped is processed (and, for the lake,
    // flushed) before the process exits.
    let mut drain_deadline: Option<std::time::Instant> = None;
    loop {
        let stopping = *shutdown.borrow();
        if stopping {
            // A writer that keeps writing (another process) must not hold the drain open.
            let deadline = *drain_deadline
                .get_or_insert_with(|| std::time::Instant::now() + config.drain_limit);
            if std::time::Instant::now() >= deadline {
                tracing::warn!("drain limit reached; the rest is processed at the next start");
                break;
            }
        }
        let batch = match reader
            .read(&shard, &position, config.max_batch_records)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "read failed; retrying");
                if stopping || pause(config.retry_delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        metrics::gauge!("floodgate_processor_lag_records", &labels)
            .set(batch.records_behind as f64);
        if let Some(lag) = &config.lag {
            lag.set(&consumer, &shard, batch.records_behind);
        }
        let Some(last) = batch.records.last() else {
            metrics::gauge!("floodgate_processor_lag_milliseconds", &labels).set(0.0);
            if stopping {
                break;
            }
            if let Err(e) = processor.tick(&shard, false).await {
                tracing::warn!(error = %e, "tick failed; retrying later");
            } else if let Progress::Through(Some(seq)) = processor.progress(&shard) {
                commit_if_newer(checkpoints, &consumer, &shard, &mut committed, seq).await;
            }
            // On shutdown, go round once more to drain.
            pause(idle, &mut shutdown).await;
            idle = (idle * 2).min(config.idle_max);
            continue;
        };
        idle = config.idle_min;
        match checkpoints
            .renew_lease(&consumer, &shard, &config.owner)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("lease lost; stopping before committing anything more");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the lease; retrying");
                if pause(config.retry_delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        }
        let lag_ms = (now_ms() - last.appended_at_ms).max(0);
        if let Err(e) = processor.process(&shard, &batch.records).await {
            metrics::counter!("floodgate_processor_batch_failures_total", &labels).increment(1);
            tracing::error!(error = %e, "batch failed; retrying from the same position");
            if pause(config.retry_delay, &mut shutdown).await {
                break;
            }
            continue;
        }
        // Effects are committed (or, for a buffering processor, those it reports); now
        // the checkpoint may move.
        let durable = match processor.progress(&shard) {
            Progress::All => Some(last.sequence.clone()),
            Progress::Through(seq) => seq,
        };
        if let Some(seq) = durable {
            commit_if_newer(checkpoints, &consumer, &shard, &mut committed, seq).await;
        }
        metrics::counter!("floodgate_processor_records_total", &labels)
            .increment(batch.records.len() as u64);
        metrics::gauge!("floodgate_processor_lag_milliseconds", &labels).set(lag_ms as f64);
        position = batch
            .next
            .unwrap_or(StartPosition::After(last.sequence.clone()));
    }
    // Stopping: let a buffering processor make the rest durable, then record it.
    match processor.tick(&shard, true).await {
        Ok(()) => {
            if let Progress::Through(Some(seq)) = processor.progress(&shard) {
                commit_if_newer(checkpoints, &consumer, &shard, &mut committed, seq).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "final flush failed; the records will be read again"),
    }
    tracing::info!("consumer stopped");
}

async fn commit_if_newer(
    checkpoints: &dyn CheckpointStore,
    consumer: &str,
    shard: &ShardId,
    committed: &mut Option<SequenceNumber>,
    seq: SequenceNumber,
) {
    if committed.as_ref().is_some_and(|c| *c >= seq) {
        return;
    }
    match checkpoints.commit(consumer, shard, &seq).await {
        Ok(()) => *committed = Some(seq),
        Err(e) => {
            tracing::warn!(error = %e, "checkpoint commit failed; effects are safe, will commit later")
        }
    }
}
