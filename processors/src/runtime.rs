//! The consumer runtime: per consumer, a coordinator that keeps the shard list in sync
//! with the stream and decides which shards this worker consumes; per shard held, a task
//! reading from the shard's position, handing batches to a [`ShardProcessor`], and
//! committing the checkpoint only after the processor has committed the batch's effects.
//!
//! What it guarantees, on any backend:
//! - **One worker per (consumer, shard)**, by the checkpoint store's lease. A held lease is
//!   renewed on a timer, whether or not the shard has records (an idle shard keeps its
//!   lease). A worker that finds its lease gone stops the shard before committing anything
//!   more, and its coordinator may take the shard again later.
//! - **Parents before children.** A shard born of a split or merge starts only once every
//!   parent the stream still lists is finished (read to its end, its effects committed,
//!   `SHARD_END` recorded), so a key's records are applied in order across a reshard.
//! - **Balance.** Where the store lists leases (DynamoDB), each worker aims at its share
//!   (shards / live workers, rounded up): it takes expired or free leases first, then asks
//!   the busiest worker, while that one holds more than its share, to hand one lease over
//!   ([`CheckpointStore::request_lease`]), one at a time. The holder sees the request at
//!   its next round and, while it holds more than its share (the askers counted as
//!   workers), finishes the shard (no drain: it flushes and checkpoints) and writes the
//!   asker as the owner, which takes it up at its own next round. A lease never changes
//!   hands while its holder may still write. Where the store cannot list leases (the embedded store's flocks), every
//!   worker waits on every shard and the first takes it, as a standby does.
//! - **Hand-off.** On shutdown each shard drains what is already in the stream (bounded by
//!   `drain_limit`), flushes, checkpoints, and releases its lease, so another worker
//!   continues exactly there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use floodgate_core::state::StateError;
use floodgate_core::stream::{
    CheckpointStore, ConsumerLag, LeaseInfo, SequenceNumber, ShardId, ShardInfo, StartPosition,
    StoredRecord, StreamError, StreamReader,
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

    /// Called once each time this worker starts consuming `shard` (again): forget any
    /// state of an earlier tenure (another worker may have moved the shard on since), and
    /// say where the processor's own committed state says `shard` is; `None` defers to the
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

    /// The shard is closed and every record of it was given to `process`: make all of it
    /// durable (no later record will end a buffered run). The shard is recorded as
    /// finished, and its children start, only once `progress` covers every record.
    async fn end_of_shard(&self, shard: &ShardId) -> Result<(), ProcessError> {
        self.tick(shard, true).await
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
    /// After a small batch (under a quarter of `max_batch_records`), wait this long before
    /// the next read, so that it finds more. Each batch costs the same whatever its size
    /// (a read: listing, opening and decoding frames; a state transaction and its fsync;
    /// a wake of a blocking thread for each): a consumer that keeps up with the stream,
    /// reading each handful of records as it lands, spent more of its CPU on batches than
    /// on records. Zero: read again at once.
    pub batch_linger: Duration,
    /// Wait before retrying a batch that failed, or a lease another worker holds.
    pub retry_delay: Duration,
    /// At most one checkpoint commit per shard in this span while batches keep coming; the
    /// latest durable position is committed at the next commit, when the shard goes idle,
    /// and when the shard stops (shutdown, hand-off, its end). A commit is a file written
    /// and fsynced twice (embedded) or a conditional write (DynamoDB); a consumer that keeps
    /// up commits after every small batch, dozens of times a second per shard, for a
    /// position that only says where a restart begins. Processors are replay-safe from any
    /// earlier checkpoint (their effects are idempotent or keyed by their own position), so
    /// a crash costs at most this span's records read again. Zero: after every batch.
    pub commit_interval: Duration,
    /// This worker's identity in leases.
    pub owner: String,
    /// Where each shard's lag is published for the edge's backpressure, if anywhere.
    pub lag: Option<Arc<ConsumerLag>>,
    /// On shutdown, how long to keep processing what is already in the stream.
    pub drain_limit: Duration,
    /// How often a held lease is renewed (a third of the lease's time-to-live).
    pub renew_interval: Duration,
    /// How often the coordinator lists the shards and the leases, and rebalances.
    pub sync_interval: Duration,
    /// Drop repeats of an event (`source`, `id`) within this span per shard, keeping at
    /// most this many ids per shard (see [`crate::repeats`]). `None`: the stream never
    /// holds repeats (the embedded log behind one edge, which dedupes itself).
    pub repeats: Option<(Duration, usize)>,
}

impl RuntimeConfig {
    /// Timing for a lease store whose leases live `lease_duration` without renewal, and a
    /// stream whose reads are rate-limited (Kinesis: 5 GetRecords a second per shard,
    /// which the reader paces; idle polls at most 5 a second keep well inside it).
    pub fn for_shared_stream(lease_duration: Duration) -> Self {
        Self {
            idle_min: Duration::from_millis(200),
            idle_max: Duration::from_secs(1),
            // The reader paces its reads already.
            batch_linger: Duration::ZERO,
            renew_interval: lease_duration / 3,
            sync_interval: (lease_duration / 2)
                .clamp(Duration::from_millis(500), Duration::from_secs(10)),
            ..Self::default()
        }
    }
}

/// The default [`RuntimeConfig::batch_linger`] of a closely polled stream, in ms. Measured
/// here (serve, 2 cores, 110,000 events/s open loop, every consumer keeping up): see
/// bench/results/performance-2026-12-02.md.
pub const BATCH_LINGER_MS: u64 = 25;

/// The default [`RuntimeConfig::commit_interval`], in ms.
pub const COMMIT_INTERVAL_MS: u64 = 200;

/// Records filtered for repeats between two yields to the scheduler.
const REPEATS_CHUNK: usize = 1024;

/// A worker identity unique to this process run, naming the host so that an operator
/// reading a shared lease table sees which machine holds what.
pub fn default_owner() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    // Containers often run as PID 1 under one host name, and two may start in the same
    // nanosecond as far as their clocks tell: 32 random bits more (the standard library's
    // randomly keyed hasher) keep two workers from ever sharing a name, which lease
    // adoption relies on.
    let random = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    };
    format!("{host}:pid{}-{nanos:09}-{random:08x}", std::process::id())
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_batch_records: 10_000,
            idle_min: Duration::from_millis(1),
            idle_max: Duration::from_millis(50),
            batch_linger: Duration::from_millis(BATCH_LINGER_MS),
            retry_delay: Duration::from_millis(500),
            commit_interval: Duration::from_millis(COMMIT_INTERVAL_MS),
            owner: default_owner(),
            lag: None,
            drain_limit: Duration::from_secs(10),
            renew_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(1),
            repeats: None,
        }
    }
}

/// Starts the coordinator of `processor`'s consumer: it consumes the shards this worker
/// takes until `shutdown` turns true, then drains, checkpoints and releases each. The
/// returned task ends when every shard task has.
pub async fn spawn_consumers(
    reader: Arc<dyn StreamReader>,
    checkpoints: Arc<dyn CheckpointStore>,
    processor: Arc<dyn ShardProcessor>,
    config: RuntimeConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, StreamError> {
    // Fail at start on a stream that cannot be listed (a wrong name, no credentials).
    reader.shards().await?;
    let span = tracing::info_span!("coordinator", consumer = %processor.consumer());
    Ok(vec![tokio::spawn(
        coordinate(reader, checkpoints, processor, config, shutdown).instrument(span),
    )])
}

/// A shard task this worker runs.
struct Running {
    task: JoinHandle<ShardExit>,
    /// Tells the task to stop (hand the shard to another worker) without shutting down.
    stop: watch::Sender<bool>,
    /// The worker to hand the lease to when the task stops, set before `stop`.
    to: Arc<std::sync::Mutex<Option<String>>>,
}

/// Why a shard task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShardExit {
    /// Shutdown, or the coordinator handed the shard away.
    Stopped,
    /// The lease went to another worker.
    LeaseLost,
    /// The shard is closed, read to its end, and recorded as finished.
    Finished,
}

async fn coordinate(
    reader: Arc<dyn StreamReader>,
    checkpoints: Arc<dyn CheckpointStore>,
    processor: Arc<dyn ShardProcessor>,
    config: RuntimeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let consumer = processor.consumer().to_owned();
    let mut running: HashMap<ShardId, Running> = HashMap::new();
    // Finishing is permanent: remembered, so a finished shard is never asked about again.
    let mut finished: HashSet<ShardId> = HashSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Reap tasks that ended.
        let ended: Vec<ShardId> = running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(s, _)| s.clone())
            .collect();
        let mut resync = false;
        for shard in ended {
            if let Some(r) = running.remove(&shard) {
                match r.task.await {
                    Ok(ShardExit::Finished) => {
                        finished.insert(shard);
                        // Its children may start now.
                        resync = true;
                    }
                    Ok(exit) => tracing::debug!(%shard, ?exit, "shard task ended"),
                    Err(e) => tracing::error!(%shard, error = %e, "shard task panicked"),
                }
            }
        }
        match sync_once(
            &*reader,
            &*checkpoints,
            &consumer,
            &config,
            &mut finished,
            &running,
        )
        .await
        {
            Ok(plan) => {
                for (shard, to) in plan.give_up {
                    if let Some(r) = running.get(&shard) {
                        *r.to.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
                        let _ = r.stop.send(true);
                    }
                }
                for (shard, wait) in plan.start {
                    if running.contains_key(&shard) {
                        // Its task has not ended yet (it finds the lease gone, or the
                        // shard's end, at its next step); one task per shard.
                        continue;
                    }
                    let (stop, stop_rx) = watch::channel(false);
                    let to = Arc::new(std::sync::Mutex::new(None));
                    let task = tokio::spawn(
                        run_shard(
                            reader.clone(),
                            checkpoints.clone(),
                            processor.clone(),
                            shard.clone(),
                            config.clone(),
                            shutdown.clone(),
                            (stop_rx, to.clone()),
                            wait,
                        )
                        .instrument(
                            tracing::info_span!("consumer", consumer = %consumer, shard = %shard),
                        ),
                    );
                    running.insert(shard, Running { task, stop, to });
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sync the shards and leases; retrying"),
        }
        if resync {
            continue;
        }
        if pause(config.sync_interval, &mut shutdown).await {
            break;
        }
    }
    // Shutdown: every shard drains, flushes, checkpoints and releases.
    for (_, r) in running {
        let _ = r.task.await;
    }
}

/// What one round of the coordinator decided.
#[derive(Debug, Default)]
struct Plan {
    /// Shards to start a task for; `true`: the task waits for the lease (the store cannot
    /// list leases, so every worker waits on every shard), `false`: the lease is held.
    start: Vec<(ShardId, bool)>,
    /// Running shards to hand over, each to the worker that asked for it.
    give_up: Vec<(ShardId, String)>,
}

async fn sync_once(
    reader: &dyn StreamReader,
    checkpoints: &dyn CheckpointStore,
    consumer: &str,
    config: &RuntimeConfig,
    finished: &mut HashSet<ShardId>,
    running: &HashMap<ShardId, Running>,
) -> Result<Plan, StreamError> {
    let shards = reader.shards().await?;
    checkpoints.ensure_leases(consumer, &shards).await?;
    for s in &shards {
        if s.closed
            && !finished.contains(&s.id)
            && checkpoints.shard_finished(consumer, &s.id).await?
        {
            finished.insert(s.id.clone());
        }
    }
    let ready = ready_shards(&shards, finished);
    let leases = checkpoints.leases(consumer).await?;
    let mut plan = Plan::default();
    if leases.is_empty() {
        // No view of other workers: wait on every ready shard; the lease decides.
        for s in ready {
            if !running.contains_key(&s) {
                plan.start.push((s, true));
            }
        }
        return Ok(plan);
    }
    let me = config.owner.as_str();
    plan.give_up = asked_of(me, &ready, &leases, |s| running.contains_key(s));
    for pick in balance(me, &ready, &leases, running) {
        // A pick that fails is skipped, not the round: leases already taken are consumed.
        let taken = match pick {
            Pick::Take(ref shard) => checkpoints.acquire_lease(consumer, shard, me).await,
            Pick::Ask(ref shard, ref from) => {
                // The holder hands it over at its next round; it is taken free after that.
                if let Err(e) = checkpoints.request_lease(consumer, shard, me).await {
                    tracing::warn!(error = %e, %shard, %from, "cannot ask for a lease; trying next round");
                }
                continue;
            }
        };
        let taken = match taken {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, ?pick, "cannot take a lease; trying next round");
                false
            }
        };
        if taken && let Pick::Take(shard) = pick {
            plan.start.push((shard, false));
        }
    }
    Ok(plan)
}

/// The running shards whose leases another worker asked this one to hand over, and to
/// whom: as many as this worker holds above its share, so that a request made on an older
/// view (the asker has since taken a free lease) does not move a lease for nothing.
fn asked_of(
    me: &str,
    ready: &[ShardId],
    leases: &[LeaseInfo],
    running: impl Fn(&ShardId) -> bool,
) -> Vec<(ShardId, String)> {
    let (load, share) = shares(me, ready, leases, &running);
    let above = load[me].saturating_sub(share);
    leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some(me) && running(&l.shard))
        .filter_map(|l| {
            let to = l.handoff_to.as_deref().filter(|to| *to != me)?;
            Some((l.shard.clone(), to.to_owned()))
        })
        .take(above)
        .inspect(|(shard, to)| {
            tracing::info!(%shard, to, "handing a lease over, as another worker asked");
        })
        .collect()
}

/// Each worker's count of the ready shards, and the share of each: the ready shards over
/// the workers, rounded up. The workers are the owners of live leases, the workers that
/// asked for one (they may hold none yet), and this one, whose count is what it runs,
/// whatever the listing said a moment ago.
fn shares<'a>(
    me: &'a str,
    ready: &[ShardId],
    leases: &'a [LeaseInfo],
    running: &impl Fn(&ShardId) -> bool,
) -> (HashMap<&'a str, usize>, usize) {
    let ready_set: HashSet<&ShardId> = ready.iter().collect();
    let mut load: HashMap<&str, usize> = HashMap::new();
    for l in leases.iter().filter(|l| ready_set.contains(&l.shard)) {
        if let Some(owner) = l.owner.as_deref().filter(|_| l.live) {
            *load.entry(owner).or_default() += 1;
        }
        if let Some(asker) = &l.handoff_to {
            load.entry(asker.as_str()).or_default();
        }
    }
    let mine = ready.iter().filter(|s| running(s)).count();
    load.insert(me, mine);
    let share = ready.len().div_ceil(load.len());
    (load, share)
}

/// The shards that may be consumed now: not finished, and every parent the stream still
/// lists finished.
fn ready_shards(shards: &[ShardInfo], finished: &HashSet<ShardId>) -> Vec<ShardId> {
    let listed: HashSet<&ShardId> = shards.iter().map(|s| &s.id).collect();
    shards
        .iter()
        .filter(|s| !finished.contains(&s.id))
        .filter(|s| {
            s.parents
                .iter()
                .all(|p| !listed.contains(p) || finished.contains(p))
        })
        .map(|s| s.id.clone())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pick {
    /// A lease that is free, expired, or this worker's own.
    Take(ShardId),
    /// A live lease of another worker (which holds more than its share), to ask for.
    Ask(ShardId, String),
}

/// KCL's balancing, one round: the leases this worker should take now. Its share is the
/// ready shards over the live workers (this one included), rounded up. Below it, it takes
/// free or expired leases first; then, if still below, asks for one lease of the worker
/// holding the most, when that worker holds more than the share. At most one request a
/// round, so workers converge without thrashing.
fn balance(
    me: &str,
    ready: &[ShardId],
    leases: &[LeaseInfo],
    running: &HashMap<ShardId, Running>,
) -> Vec<Pick> {
    let ready_set: HashSet<&ShardId> = ready.iter().collect();
    let by_shard: HashMap<&ShardId, &LeaseInfo> = leases.iter().map(|l| (&l.shard, l)).collect();
    let (load, share) = shares(me, ready, leases, &|s| running.contains_key(s));
    let mut picks = Vec::new();
    let mut have = load[me];
    // Ours but not running, whatever the share: handed to this worker at its request, or
    // a lease a previous task of ours lost by timeout, or the process restarted under the
    // same owner. Nobody else takes it while it is live.
    for s in ready {
        let ours = by_shard
            .get(s)
            .is_some_and(|l| l.live && l.owner.as_deref() == Some(me));
        if ours && !running.contains_key(s) {
            picks.push(Pick::Take(s.clone()));
            have += 1;
        }
    }
    // Free or expired.
    for s in ready {
        if have >= share {
            break;
        }
        if running.contains_key(s) {
            continue;
        }
        let takeable = match by_shard.get(s) {
            None => true,
            Some(l) => !l.live || l.owner.is_none(),
        };
        if takeable {
            picks.push(Pick::Take(s.clone()));
            have += 1;
        }
    }
    if have < share {
        let busiest = load
            .iter()
            .filter(|(o, _)| **o != me)
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(o, n)| (o.to_string(), *n));
        if let Some((owner, n)) = busiest
            && n > share
            && let Some(l) = leases.iter().find(|l| {
                l.live
                    && l.owner.as_deref() == Some(owner.as_str())
                    && ready_set.contains(&l.shard)
                    // A shard whose task here has not ended is not taken again.
                    && !running.contains_key(&l.shard)
            })
        {
            picks.push(Pick::Ask(l.shard.clone(), owner));
        }
    }
    picks
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

/// Merges two stop signals: shutdown of the process, or the coordinator's hand-off.
fn either(a: &watch::Receiver<bool>, b: &watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    let (mut a, mut b) = (a.clone(), b.clone());
    tokio::spawn(async move {
        loop {
            if *a.borrow() || *b.borrow() {
                let _ = tx.send(true);
                return;
            }
            // A stop signal whose sender is gone can never say "go on": stop.
            tokio::select! {
                r = a.changed() => if r.is_err() { let _ = tx.send(true); return },
                r = b.changed() => if r.is_err() { let _ = tx.send(true); return },
                () = tx.closed() => return,
            }
        }
    });
    rx
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    reader: Arc<dyn StreamReader>,
    checkpoints: Arc<dyn CheckpointStore>,
    processor: Arc<dyn ShardProcessor>,
    shard: ShardId,
    config: RuntimeConfig,
    shutdown: watch::Receiver<bool>,
    (handoff, to): (watch::Receiver<bool>, Arc<std::sync::Mutex<Option<String>>>),
    wait_for_lease: bool,
) -> ShardExit {
    let consumer = processor.consumer().to_owned();
    let mut stop = either(&shutdown, &handoff);
    if wait_for_lease {
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
            if pause(config.retry_delay, &mut stop).await {
                return ShardExit::Stopped;
            }
        }
    }
    let _held = Held::new(&consumer);
    // Renew on a timer, whatever the shard is doing; a failed renewal raises `lost`.
    let lost = Arc::new(AtomicBool::new(false));
    let (renewer_stop, renewer_stop_rx) = watch::channel(false);
    let renewer = tokio::spawn(
        renew(
            checkpoints.clone(),
            consumer.clone(),
            shard.clone(),
            config.owner.clone(),
            config.renew_interval,
            lost.clone(),
            renewer_stop_rx,
        )
        .in_current_span(),
    );
    let exit = consume(
        &*reader,
        &*checkpoints,
        &*processor,
        &shard,
        &config,
        &mut stop,
        &handoff,
        &lost,
    )
    .await;
    let _ = renewer_stop.send(true);
    let _ = renewer.await;
    // This worker no longer holds the shard back, for the edge's backpressure and on
    // /metrics: the worker that holds it now reports its lag, and a sum over workers (the
    // dashboard, the lag alert) must not keep this one's last figure.
    if let Some(lag) = &config.lag {
        lag.set(&consumer, &shard, 0);
    }
    let labels = [("consumer", consumer.clone()), ("shard", shard.0.clone())];
    metrics::gauge!("floodgate_processor_lag_records", &labels).set(0.0);
    metrics::gauge!("floodgate_processor_lag_milliseconds", &labels).set(0.0);
    if exit != ShardExit::LeaseLost {
        // Handed straight to the worker that asked: released, it could go to anyone,
        // this worker included, before the asker's next round.
        let to = to.lock().unwrap_or_else(|e| e.into_inner()).take();
        let given = match &to {
            Some(to) => {
                checkpoints
                    .hand_over_lease(&consumer, &shard, &config.owner, to)
                    .await
            }
            None => {
                checkpoints
                    .release_lease(&consumer, &shard, &config.owner)
                    .await
            }
        };
        if let Err(e) = given {
            tracing::warn!(error = %e, ?to, "cannot release the lease");
        }
    }
    exit
}

/// A shard this worker consumes under its lease, counted on /metrics while its task runs.
struct Held(String);

impl Held {
    fn new(consumer: &str) -> Self {
        metrics::gauge!("floodgate_processor_leases_held", "consumer" => consumer.to_owned())
            .increment(1.0);
        Self(consumer.to_owned())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!("floodgate_processor_leases_held", "consumer" => self.0.clone())
            .decrement(1.0);
    }
}

/// Renews the lease every `every` until told to stop; raises `lost` (and stops) when the
/// store says the lease is gone. A renewal that fails for another reason (the store is
/// unreachable) is retried at the next tick: the lease may still be ours, and a commit is
/// fenced by the store anyway.
async fn renew(
    checkpoints: Arc<dyn CheckpointStore>,
    consumer: String,
    shard: ShardId,
    owner: String,
    every: Duration,
    lost: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    // Renewals are every third of the lease's life. A worker that cannot renew for two
    // and a half of them (the store unreachable) stops the shard itself, before another
    // worker may take the lease over: it cannot know it still holds it.
    // A renewal counts from when it was sent (the store may have applied it at once), and
    // a call that hangs (retries, a store that holds requests open) is cut at the same
    // limit: the stop must come in time, not whenever the call gives up.
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let sent = tokio::time::Instant::now();
        let limit = renewed + every * 5 / 2;
        let answer =
            tokio::time::timeout_at(limit, checkpoints.renew_lease(&consumer, &shard, &owner))
                .await
                .unwrap_or_else(|_| {
                    Err(StreamError::Unavailable(
                        "the renewal did not answer in time".into(),
                    ))
                });
        match answer {
            Ok(true) => renewed = sent,
            Ok(false) => {
                tracing::warn!("lease lost; stopping before committing anything more");
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                if renewed.elapsed() >= every * 5 / 2 {
                    tracing::warn!(error = %e, "cannot renew the lease in time; stopping the shard before it may pass to another worker");
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                tracing::warn!(error = %e, "cannot renew the lease; retrying");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    reader: &dyn StreamReader,
    checkpoints: &dyn CheckpointStore,
    processor: &dyn ShardProcessor,
    shard: &ShardId,
    config: &RuntimeConfig,
    stop: &mut watch::Receiver<bool>,
    handoff: &watch::Receiver<bool>,
    lost: &AtomicBool,
) -> ShardExit {
    let shard = shard.clone();
    let consumer = processor.consumer().to_owned();
    let mut shutdown = stop.clone();
    let labels = [("consumer", consumer.clone()), ("shard", shard.0.clone())];
    let is_lost = || lost.load(Ordering::SeqCst);
    // Resume: the processor's own position, else the checkpoint, else the oldest record.
    let mut position = loop {
        if is_lost() {
            return ShardExit::LeaseLost;
        }
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
                    return ShardExit::Stopped;
                }
            }
        }
    };
    let mut repeats = config
        .repeats
        .map(|(span, max_ids)| crate::repeats::Repeats::new(span, max_ids));
    if let (Some(r), StartPosition::After(checkpoint)) = (repeats.as_mut(), &position) {
        loop {
            match r.seed(reader, &shard, checkpoint).await {
                Ok(n) => {
                    tracing::info!(
                        records = n,
                        "read back the span before the checkpoint to drop repeats"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read back the span before the checkpoint; retrying");
                    if pause(config.retry_delay, &mut shutdown).await {
                        return ShardExit::Stopped;
                    }
                }
            }
        }
    }
    tracing::info!(?position, "consumer started");
    let mut commits = Commits {
        checkpoints,
        at: (&consumer, &shard, &config.owner),
        lost,
        interval: config.commit_interval,
        committed: match &position {
            StartPosition::After(seq) => Some(seq.clone()),
            _ => None,
        },
        held: None,
        last: None,
    };
    let mut idle = config.idle_min;
    // On shutdown the loop drains: it stops at the first read that finds nothing new, so
    // everything the edge accepted before it stopped is processed (and, for the lake,
    // flushed) before the process exits.
    let mut drain_deadline: Option<std::time::Instant> = None;
    let mut at_end = false;
    // The last record given to the processor, and the last one read (repeats dropped
    // included), in this tenure: a shard is finished only once both are covered.
    let mut last_given: Option<SequenceNumber> = None;
    let mut last_read: Option<SequenceNumber> = None;
    loop {
        if is_lost() {
            return ShardExit::LeaseLost;
        }
        if *handoff.borrow() {
            // Another worker asked for the shard: no drain, it continues from here.
            break;
        }
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
            lag.set_both(
                &consumer,
                &shard,
                batch.records_behind,
                batch.millis_behind.unwrap_or(0),
            );
        }
        let Some(last) = batch.records.last() else {
            metrics::gauge!("floodgate_processor_lag_milliseconds", &labels)
                .set(batch.millis_behind.unwrap_or(0) as f64);
            if batch.next.is_none() {
                // A closed shard, read to its end: flush, checkpoint, then record the end.
                at_end = true;
                break;
            }
            if stopping {
                break;
            }
            // Caught up: what was held back is committed now (nothing more, a tick may
            // flush, once the lease is found gone).
            if !commits.release_held().await {
                return ShardExit::LeaseLost;
            }
            if let Err(e) = processor.tick(&shard, false).await {
                tracing::warn!(error = %e, "tick failed; retrying later");
            } else if let Progress::Through(Some(seq)) = processor.progress(&shard) {
                commits.commit(seq).await;
            }
            // On shutdown, go round once more to drain.
            pause(idle, &mut shutdown).await;
            idle = (idle * 2).min(config.idle_max);
            continue;
        };
        idle = config.idle_min;
        let lag_ms = batch
            .millis_behind
            .map_or_else(|| (now_ms() - last.appended_at_ms).max(0), |m| m as i64);
        if is_lost() {
            return ShardExit::LeaseLost;
        }
        // On a stream many edges write, a repeat of an event is dropped before the
        // processor sees it (and counted); the checkpoint still moves past it.
        let mut kept = Vec::new();
        let records = match repeats.as_mut() {
            Some(r) => {
                // Parsing each event's ids is CPU work: a slice at a time, yielding between.
                for chunk in batch.records.chunks(REPEATS_CHUNK) {
                    r.filter_into(chunk, &mut kept);
                    tokio::task::yield_now().await;
                }
                let dropped = batch.records.len() - kept.len();
                if dropped > 0 {
                    metrics::counter!("floodgate_processor_repeats_dropped_total", &labels)
                        .increment(dropped as u64);
                }
                &kept[..]
            }
            None => &batch.records[..],
        };
        if !records.is_empty()
            && let Err(e) = processor.process(&shard, records).await
        {
            // The batch is read again: the repeats window forgets what it took from it, so
            // the retry decides exactly as this attempt did.
            if let Some(r) = repeats.as_mut() {
                r.rollback();
            }
            metrics::counter!("floodgate_processor_batch_failures_total", &labels).increment(1);
            tracing::error!(error = %e, "batch failed; retrying from the same position");
            // A batch that keeps failing (its sink down) must not keep the batches before
            // it uncommitted for the whole outage.
            if !commits.release_held().await {
                return ShardExit::LeaseLost;
            }
            if pause(config.retry_delay, &mut shutdown).await {
                break;
            }
            continue;
        }
        if let Some(r) = repeats.as_mut() {
            r.commit();
        }
        if let Some(given) = records.last() {
            last_given = Some(given.sequence.clone());
        }
        last_read = Some(last.sequence.clone());
        // Effects are committed (or, for a buffering processor, those it reports); now
        // the checkpoint may move.
        let durable = match processor.progress(&shard) {
            Progress::All => Some(last.sequence.clone()),
            Progress::Through(seq) => seq,
        };
        if let Some(seq) = durable {
            if is_lost() {
                return ShardExit::LeaseLost;
            }
            commits.durable(seq).await;
        }
        metrics::counter!("floodgate_processor_records_total", &labels)
            .increment(batch.records.len() as u64);
        metrics::gauge!("floodgate_processor_lag_milliseconds", &labels).set(lag_ms as f64);
        position = batch
            .next
            .unwrap_or(StartPosition::After(last.sequence.clone()));
        if !stopping
            && !config.batch_linger.is_zero()
            && batch.records.len() < config.max_batch_records / 4
        {
            // A shutdown meanwhile ends the wait; the loop then drains.
            pause(config.batch_linger, &mut shutdown).await;
        }
    }
    if is_lost() {
        return ShardExit::LeaseLost;
    }
    // Stopping (or at the shard's end): first what was held back (a refusal means the
    // lease is gone, and then nothing is flushed), ...
    if !commits.release_held().await {
        return ShardExit::LeaseLost;
    }
    // ... then let a buffering processor make the rest durable, and record it. At the end
    // no later record will close a buffered run, so all of it is made durable.
    let flushed = if at_end {
        processor.end_of_shard(&shard).await
    } else {
        processor.tick(&shard, true).await
    };
    let covered = match flushed {
        Ok(()) => {
            let progress = processor.progress(&shard);
            if let Progress::Through(Some(seq)) = &progress {
                commits.commit(seq.clone()).await;
            }
            match progress {
                Progress::All => true,
                Progress::Through(Some(seq)) => last_given.as_ref().is_none_or(|g| seq >= *g),
                Progress::Through(None) => last_given.is_none(),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "final flush failed; the records will be read again");
            false
        }
    };
    if at_end && !covered {
        tracing::warn!(
            "at the shard's end the processor has not made every record durable; the shard is read again later"
        );
    }
    if at_end && covered && !is_lost() {
        // Past repeats dropped at the very end too, so the checkpoint is the shard's last.
        if let Some(seq) = last_read.clone() {
            commits.commit(seq).await;
        }
        match checkpoints.finish_shard(&consumer, &shard).await {
            Ok(()) => {
                tracing::info!("shard read to its end; its children may start");
                return ShardExit::Finished;
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the shard's end; it is read again"),
        }
    }
    tracing::info!("consumer stopped");
    ShardExit::Stopped
}

/// One shard tenure's checkpoint: what is committed, and the durable position held back
/// while batches keep coming (see [`RuntimeConfig::commit_interval`]).
struct Commits<'a> {
    checkpoints: &'a dyn CheckpointStore,
    /// (consumer, shard, owner)
    at: (&'a str, &'a ShardId, &'a str),
    lost: &'a AtomicBool,
    interval: Duration,
    committed: Option<SequenceNumber>,
    held: Option<SequenceNumber>,
    last: Option<std::time::Instant>,
}

impl Commits<'_> {
    /// A batch's effects are durable through `seq`: committed now, or held back when the
    /// last commit is under an interval old.
    async fn durable(&mut self, seq: SequenceNumber) {
        if self.last.is_some_and(|t| t.elapsed() < self.interval) {
            self.held = Some(seq);
        } else {
            self.held = None;
            self.commit(seq).await;
        }
    }

    /// Commits what is held back, if anything. `false` when the lease is gone (found by a
    /// refused commit or by the renewal timer): the shard must stop before doing more.
    async fn release_held(&mut self) -> bool {
        if let Some(seq) = self.held.take() {
            self.commit(seq).await;
        }
        !self.lost.load(Ordering::SeqCst)
    }

    /// Commits `seq` unless an equal or later one is committed. A refused commit is checked
    /// against the lease: if the lease is gone, `lost` is raised at once (the renewal timer
    /// would notice only later), so nothing more is processed.
    async fn commit(&mut self, seq: SequenceNumber) {
        self.last = Some(std::time::Instant::now());
        let (consumer, shard, owner) = self.at;
        if self.committed.as_ref().is_some_and(|c| *c >= seq) {
            return;
        }
        match self.checkpoints.commit(consumer, shard, &seq).await {
            Ok(()) => self.committed = Some(seq),
            Err(e) => {
                if let Ok(false) = self.checkpoints.renew_lease(consumer, shard, owner).await {
                    tracing::warn!(error = %e, "checkpoint commit refused: the lease is gone; stopping the shard");
                    self.lost.store(true, Ordering::SeqCst);
                } else {
                    tracing::warn!(error = %e, "checkpoint commit failed; effects are safe, will commit later");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ShardId {
        ShardId(s.to_owned())
    }
    fn info(s: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            id: id(s),
            parents: parents.iter().map(|p| id(p)).collect(),
            closed,
        }
    }
    fn lease(s: &str, owner: Option<&str>, live: bool) -> LeaseInfo {
        LeaseInfo {
            shard: id(s),
            owner: owner.map(str::to_owned),
            live,
            finished: false,
            handoff_to: None,
        }
    }

    #[test]
    fn children_wait_for_every_listed_parent() {
        // 0 split into 1 and 2; 1 and 2 merged into 3; 4 is a child of a trimmed parent.
        let shards = [
            info("0", &[], true),
            info("1", &["0"], true),
            info("2", &["0"], true),
            info("3", &["1", "2"], false),
            info("4", &["gone"], false),
        ];
        let mut finished = HashSet::new();
        assert_eq!(ready_shards(&shards, &finished), vec![id("0"), id("4")]);
        finished.insert(id("0"));
        assert_eq!(
            ready_shards(&shards, &finished),
            vec![id("1"), id("2"), id("4")]
        );
        finished.insert(id("1"));
        assert_eq!(
            ready_shards(&shards, &finished),
            vec![id("2"), id("4")],
            "3 waits for 2"
        );
        finished.insert(id("2"));
        assert_eq!(ready_shards(&shards, &finished), vec![id("3"), id("4")]);
    }

    #[test]
    fn a_joining_worker_takes_free_leases_then_asks_the_busiest_for_one() {
        let ready: Vec<ShardId> = ["a", "b", "c", "d"].iter().map(|s| id(s)).collect();
        let running = HashMap::new();
        // Nobody holds anything: take all four (share = 4 with one worker).
        let free: Vec<LeaseInfo> = ready.iter().map(|s| lease(&s.0, None, false)).collect();
        assert_eq!(balance("me", &ready, &free, &running).len(), 4);
        // Another worker holds all four, live: share is 2, so ask for one (one per round).
        let held: Vec<LeaseInfo> = ready
            .iter()
            .map(|s| lease(&s.0, Some("w1"), true))
            .collect();
        assert_eq!(
            balance("me", &ready, &held, &running),
            vec![Pick::Ask(id("a"), "w1".to_owned())]
        );
        // Its lease on "c" expired: take that before asking.
        let mut some_expired = held.clone();
        some_expired[2].live = false;
        assert_eq!(
            balance("me", &ready, &some_expired, &running),
            vec![Pick::Take(id("c")), Pick::Ask(id("a"), "w1".to_owned())]
        );
        // Balanced (two each): nothing to do.
        let even = vec![
            lease("a", Some("w1"), true),
            lease("b", Some("w1"), true),
            lease("c", Some("w2"), true),
            lease("d", Some("w2"), true),
        ];
        assert!(
            balance("me", &ready, &even, &running).is_empty(),
            "share is 2, nobody holds more"
        );
    }

    #[test]
    fn a_worker_hands_over_the_running_leases_others_asked_for() {
        let asked = |shard: &str, owner: &str, to: Option<&str>| LeaseInfo {
            handoff_to: to.map(str::to_owned),
            ..lease(shard, Some(owner), true)
        };
        let leases = vec![
            asked("a", "me", Some("w2")),
            asked("b", "me", None),
            asked("c", "me", Some("me")),
            asked("d", "w1", Some("w2")),
            asked("e", "me", Some("w2")),
        ];
        let ready: Vec<ShardId> = ["a", "b", "c", "d", "e"].iter().map(|s| id(s)).collect();
        let running = |s: &ShardId| s.0 != "d" && s.0 != "e";
        // Three workers (w2 holds nothing yet but asked), five shards: a share of two,
        // and this worker runs three.
        assert_eq!(
            asked_of("me", &ready, &leases, running),
            vec![(id("a"), "w2".to_owned())],
            "only its own running leases, asked for by another worker, down to its share"
        );
        let few = [id("a"), id("d")];
        assert_eq!(
            asked_of("me", &few, &leases, running),
            vec![],
            "at its share, a request (made on an older view) is not answered"
        );
    }

    #[test]
    fn a_lease_handed_to_this_worker_is_taken_up_whatever_its_share() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let run = || Running {
            task: tokio::spawn(async { ShardExit::Stopped }),
            stop: watch::channel(false).0,
            to: Arc::default(),
        };
        let ready: Vec<ShardId> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|s| id(s))
            .collect();
        let running: HashMap<ShardId, Running> =
            ["b", "c", "d"].iter().map(|s| (id(s), run())).collect();
        let leases = vec![
            lease("a", Some("me"), true),
            lease("b", Some("me"), true),
            lease("c", Some("me"), true),
            lease("d", Some("me"), true),
            lease("e", Some("w1"), true),
            lease("f", Some("w1"), true),
        ];
        // At its share (three of six, two workers), it still takes up "a": nobody else
        // may while the lease names it.
        assert_eq!(
            balance("me", &ready, &leases, &running),
            vec![Pick::Take(id("a"))]
        );
    }
}
