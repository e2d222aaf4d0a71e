//! Balancing hands a lease over; it never takes it from a worker that may still write.
//!
//! Two workers consume one stream through a DynamoDB lease table (moto server). The first
//! holds both shards; the second joins and asks for its share. Every batch takes a while,
//! as a lake flush to S3 does. A lease taken outright (KCL 2.x's steal) left the old holder
//! processing until its next renewal, beside the new holder's replay of the same records:
//! the lake wrote those records twice (seen in CI's whole-AWS rush). Handed over, the old
//! holder's last write ends before the new holder's first begins, on every shard.
#![cfg(feature = "emulator-tests")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_aws::emulator;
use floodgate_aws::leases::{DynamoDbLeases, ensure_table};
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::stream::{Record, SequenceNumber, ShardId, StoredRecord, StreamWriter};
use floodgate_processors::runtime::{ProcessError, RuntimeConfig, ShardProcessor, spawn_consumers};
use floodgate_sinks::EmbeddedLog;
use tokio::sync::watch;

/// One call that wrote: a batch processed (with its records' sequence numbers), or the
/// flush before a shard stops (none).
#[derive(Debug, Clone)]
struct Write {
    owner: &'static str,
    shard: String,
    start: Instant,
    end: Instant,
    records: Vec<SequenceNumber>,
}

/// A processor whose every batch takes `pause`, and whose flush before a shard stops takes
/// `flush` (longer than a coordinator's round: a hand-over made before the flush ended
/// would let the asker begin meanwhile), recording when each ran and for whom.
#[derive(Debug)]
struct Slow {
    owner: &'static str,
    pause: Duration,
    flush: Duration,
    writes: Arc<Mutex<Vec<Write>>>,
}

impl Slow {
    async fn write(&self, shard: &ShardId, pause: Duration, records: Vec<SequenceNumber>) {
        let start = Instant::now();
        tokio::time::sleep(pause).await;
        self.writes.lock().unwrap().push(Write {
            owner: self.owner,
            shard: shard.0.clone(),
            start,
            end: Instant::now(),
            records,
        });
    }
}

#[async_trait]
impl ShardProcessor for Slow {
    fn consumer(&self) -> &str {
        "lake"
    }

    async fn start_position(
        &self,
        _shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
        Ok(None)
    }

    async fn process(&self, shard: &ShardId, records: &[StoredRecord]) -> Result<(), ProcessError> {
        let records = records.iter().map(|r| r.sequence.clone()).collect();
        self.write(shard, self.pause, records).await;
        Ok(())
    }

    async fn tick(&self, shard: &ShardId, last: bool) -> Result<(), ProcessError> {
        if last {
            self.write(shard, self.flush, Vec::new()).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_changes_hands_only_after_its_holder_last_wrote() {
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    let client = moto.dynamodb_client();
    ensure_table(&client, "leases").await.unwrap();
    let lease_duration = Duration::from_secs(3);

    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedStreamConfig {
        shards: 2,
        ..EmbeddedStreamConfig::default()
    };
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("stream"), &config).unwrap());
    // A producer that keeps both shards busy.
    let (stop, stop_rx) = watch::channel(false);
    let producer = {
        let log = log.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !*stop.borrow() {
                let batch = (0..64)
                    .map(|k| Record {
                        key: format!("key-{k}").into(),
                        payload: Bytes::from(format!("r{n}-{k}")),
                    })
                    .collect();
                for r in log.append(batch).await {
                    r.unwrap();
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let writes = Arc::new(Mutex::new(Vec::new()));
    let worker = |owner: &'static str| {
        let (log, writes, client, stop_rx) =
            (log.clone(), writes.clone(), client.clone(), stop_rx.clone());
        async move {
            let store = Arc::new(DynamoDbLeases::new(client, "leases", lease_duration));
            let processor = Arc::new(Slow {
                owner,
                pause: Duration::from_millis(40),
                flush: lease_duration * 2 / 3,
                writes,
            });
            spawn_consumers(
                log,
                store,
                processor,
                RuntimeConfig {
                    owner: owner.to_owned(),
                    max_batch_records: 20,
                    // Positions are held back between commits, so that a hand-over
                    // without its last commit would show.
                    commit_interval: Duration::from_secs(30),
                    ..RuntimeConfig::for_shared_stream(lease_duration)
                },
                stop_rx,
            )
            .await
            .unwrap()
        }
    };
    let wrote = |owner: &str| {
        let writes = writes.lock().unwrap();
        let mut shards: Vec<String> = writes
            .iter()
            .filter(|w| w.owner == owner)
            .map(|w| w.shard.clone())
            .collect();
        shards.sort();
        shards.dedup();
        shards
    };
    let eventually = async |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let mut tasks = worker("a").await;
    eventually("worker a to consume both shards", &|| wrote("a").len() == 2).await;
    tasks.extend(worker("b").await);
    eventually("worker b to be handed a shard", &|| !wrote("b").is_empty()).await;
    // Both keep writing a while after the hand-over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true).unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the workers stop")
            .unwrap();
    }
    producer.await.unwrap();

    let to_b = wrote("b");
    assert_eq!(to_b.len(), 1, "b holds its share, one shard");
    let moved = &to_b[0];
    let writes = writes.lock().unwrap();
    let mut on_shard: Vec<&Write> = writes.iter().filter(|w| &w.shard == moved).collect();
    on_shard.sort_by_key(|w| w.start);
    let first_of_b = on_shard
        .iter()
        .find(|w| w.owner == "b")
        .expect("b wrote the shard it was handed");
    let overlapping: Vec<Duration> = on_shard
        .iter()
        .filter(|w| w.owner == "a" && w.end > first_of_b.start)
        .map(|w| w.end - first_of_b.start)
        .collect();
    assert!(
        overlapping.is_empty(),
        "worker a wrote shard {moved} after worker b began there, by {overlapping:?}"
    );
    // And b began where a's checkpoint ended: right after a's last record.
    let last_of_a = on_shard
        .iter()
        .filter(|w| w.owner == "a")
        .flat_map(|w| w.records.last())
        .max()
        .expect("a processed the shard first");
    let first_of_b = on_shard
        .iter()
        .filter(|w| w.owner == "b")
        .flat_map(|w| w.records.first())
        .min()
        .expect("b processed the shard");
    assert_eq!(
        first_of_b.as_u64(),
        last_of_a.as_u64().map(|n| n + 1),
        "b began at {first_of_b:?}, not right after a's last record {last_of_a:?}"
    );
}
