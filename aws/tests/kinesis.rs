//! The Kinesis stream backend against kinesalite (one emulator per test):
//!
//! - the stream conformance suite (`sinks/tests/conformance`) over [`KinesisWriter`] and
//!   [`KinesisReader`], with aggregation on and off;
//! - aggregated records read by an independent deaggregator (Python `aws_kinesis_agg`,
//!   through `deaggregate.py`): every acknowledged event exactly once, where it was acked;
//! - per-key order while shards split and merge under a steady write load;
//! - a read resumed from a position inside an aggregated record;
//! - the record size limit, which counts the partition key;
//! - stream creation waiting for ACTIVE, and GetRecords pacing;
//! - through the fault proxy: per-record failures, throttling, 5xx, resets and timeouts
//!   retried with per-key order kept, `Busy`/`Unavailable` once faults outlast the
//!   deadline, and an expired iterator renewed where the reader stood;
//! - a measurement (printed, not asserted): events/s with aggregation on and off, events
//!   per Kinesis record, records per PutRecords call, aggregated record size.
//!
//! Behind the `emulator-tests` feature, like every test that starts an emulator:
//! `cargo test -p floodgate-aws --features emulator-tests --test kinesis`.

#![cfg(feature = "emulator-tests")]

#[allow(dead_code)]
#[path = "../../sinks/tests/conformance/mod.rs"]
mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use conformance::{Capabilities, StreamFixture};
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::kinesis::{
    Ensured, KinesisReader, KinesisReaderConfig, KinesisWriter, KinesisWriterConfig,
    MAX_RECORD_BYTES, ensure_stream, list_shards, merge_shards, split_shard,
};
use floodgate_aws::seq;
use floodgate_core::partition::hash_key;
use floodgate_core::stream::{
    AppendError, Appended, Record, SequenceNumber, ShardId, StartPosition, StoredRecord,
    StreamReader, StreamWriter,
};
use proptest::prelude::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client of `emu` with the emulator's dummy credentials, given explicitly.
fn client(emu: &Emulator) -> Client {
    let env: HashMap<&str, &str> = Emulator::env().into_iter().collect();
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(env["AWS_REGION"]))
        .credentials_provider(Credentials::new(
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            None,
            None,
            "kinesalite",
        ))
        .endpoint_url(&emu.endpoint)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .build();
    Client::from_conf(config)
}

/// kinesalite with one ACTIVE stream of `shards` shards; resharding takes `transition_ms`.
async fn kinesalite(stream: &str, shards: u32, transition_ms: u64) -> (Emulator, Client) {
    let emu = emulator::kinesalite(transition_ms).expect("start kinesalite");
    let client = client(&emu);
    let ensured = ensure_stream(&client, stream, shards)
        .await
        .unwrap_or_else(|e| panic!("create stream {stream}: {e}"));
    assert_eq!(ensured, Ensured::Created);
    (emu, client)
}

/// A writer whose deadline leaves room for a loaded test machine: these tests check
/// outcomes, not latency.
fn writer(client: &Client, stream: &str, aggregation: bool) -> KinesisWriter {
    let mut config = KinesisWriterConfig::new(stream, aggregation);
    config.deadline = Duration::from_secs(20);
    config.attempt_timeout = Duration::from_secs(10);
    KinesisWriter::new(client.clone(), config)
}

fn reader(client: &Client, stream: &str) -> KinesisReader {
    KinesisReader::new(client.clone(), KinesisReaderConfig::new(stream))
}

async fn append_ok(writer: &KinesisWriter, records: Vec<Record>) -> Vec<Appended> {
    writer
        .append(records)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("append of record {i}: {e}")))
        .collect()
}

fn record(key: &str, payload: impl Into<Bytes>) -> Record {
    Record {
        key: key.into(),
        payload: payload.into(),
    }
}

/// Everything in `shard` from `from`, reading batches of `max` until a read is empty or
/// the shard ends. Returns the records and whether the shard ended.
async fn read_all(
    reader: &dyn StreamReader,
    shard: &ShardId,
    from: StartPosition,
    max: usize,
) -> (Vec<StoredRecord>, bool) {
    let mut out = Vec::new();
    let mut pos = from;
    loop {
        let batch = reader
            .read(shard, &pos, max)
            .await
            .unwrap_or_else(|e| panic!("read {shard} from {pos:?}: {e}"));
        let empty = batch.records.is_empty();
        for r in batch.records {
            // A step back is a replay (or a reader that never ends): fail on it at once.
            if let Some(last) = out.last() {
                let last: &StoredRecord = last;
                assert!(
                    r.sequence > last.sequence,
                    "{shard}: read {} after {}",
                    r.sequence,
                    last.sequence
                );
            }
            out.push(r);
        }
        match batch.next {
            None => return (out, true),
            Some(_) if empty => return (out, false),
            Some(next) => pos = next,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The conformance suite
// ---------------------------------------------------------------------------------------

struct Fixture {
    name: String,
    _emu: Emulator,
    writer: KinesisWriter,
    reader: Arc<KinesisReader>,
}

impl Fixture {
    async fn new(aggregation: bool) -> Self {
        let stream = "conformance";
        let (emu, client) = kinesalite(stream, 3, 0).await;
        Fixture {
            name: format!(
                "Kinesis (aggregation {})",
                if aggregation { "on" } else { "off" }
            ),
            writer: writer(&client, stream, aggregation),
            reader: Arc::new(reader(&client, stream)),
            _emu: emu,
        }
    }
}

#[async_trait]
impl StreamFixture for Fixture {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            keeps_keys: true,
            exact_records_behind: false,
            any_sequence_position: false,
        }
    }

    fn reader(&self) -> Arc<dyn StreamReader> {
        self.reader.clone()
    }

    async fn append(&self, records: Vec<Record>) -> Vec<Appended> {
        append_ok(&self.writer, records).await
    }

    fn reads_from_a_time_past_the_end(&self) -> bool {
        // kinesalite never answers AT_TIMESTAMP when no record is at or after the time.
        false
    }
}

#[test]
fn conformance_reader_aggregated() {
    rt().block_on(async {
        conformance::stream_reader(&Fixture::new(true).await).await;
    });
}

#[test]
fn conformance_reader_not_aggregated() {
    rt().block_on(async {
        conformance::stream_reader(&Fixture::new(false).await).await;
    });
}

#[test]
fn conformance_writer() {
    rt().block_on(async {
        for aggregation in [true, false] {
            let fx = Fixture::new(aggregation).await;
            conformance::stream_writer(&fx.name, &fx.writer, &*fx.reader).await;
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    #[test]
    fn conformance_read_while_writing(
        aggregation in any::<bool>(),
        batches in proptest::collection::vec(proptest::collection::vec(0u8..6, 1..25), 1..12),
        sizes in proptest::collection::vec(1usize..20, 1..6),
    ) {
        rt().block_on(async {
            let fx = Arc::new(Fixture::new(aggregation).await);
            conformance::read_while_writing(fx, batches, sizes).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Aggregation, read by an independent deaggregator
// ---------------------------------------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .to_path_buf()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex from deaggregate.py"))
        .collect()
}

/// Every Kinesis record of the stream as GetRecords returns it (not deaggregated), one
/// JSON line each for `deaggregate.py`.
async fn raw_records(client: &Client, stream: &str) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    for shard in list_shards(client, stream).await.unwrap() {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator
            .expect("an iterator");
        loop {
            let out = client
                .get_records()
                .shard_iterator(&iterator)
                .send()
                .await
                .unwrap();
            if out.records.is_empty() {
                break;
            }
            for r in &out.records {
                lines.push(
                    serde_json::json!({
                        "shard": shard.shard_id(),
                        "sequenceNumber": r.sequence_number,
                        "partitionKey": r.partition_key,
                        "data": hex(r.data.as_ref()),
                    })
                    .to_string(),
                );
            }
            iterator = out.next_shard_iterator.expect("an open shard");
        }
    }
    let n = lines.len();
    (lines, n)
}

#[test]
fn aggregated_records_read_by_aws_kinesis_agg() {
    rt().block_on(async {
        let stream = "aggregated";
        let (_emu, client) = kinesalite(stream, 3, 0).await;
        let writer = writer(&client, stream, true);
        // Calls of several sizes over keys that repeat, and one event too big to share a
        // record, which goes alone and plain.
        let mut acked: Vec<(Record, Appended)> = Vec::new();
        let mut n = 0;
        for size in [1, 7, 250, 40, 500] {
            let records: Vec<Record> = (0..size)
                .map(|i| {
                    n += 1;
                    record(
                        &format!("evt-{}", i % 37),
                        format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(300)),
                    )
                })
                .collect();
            let appended = append_ok(&writer, records.clone()).await;
            acked.extend(records.into_iter().zip(appended));
        }
        let big = record("big", vec![b'b'; MAX_RECORD_BYTES - 3]);
        let appended = append_ok(&writer, vec![big.clone()]).await;
        acked.push((big, appended[0].clone()));
        let stats = writer.stats();
        assert!(
            stats.aggregates_accepted > 0 && stats.records_accepted < acked.len() as u64,
            "nothing was aggregated: {stats:?}"
        );

        let (lines, kinesis_records) = raw_records(&client, stream).await;
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("records.jsonl");
        std::fs::write(&input, lines.join("\n")).unwrap();
        let python = workspace().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing; run scripts/emulators (scripts/test does)",
            python.display()
        );
        let out = Command::new(&python)
            .arg(workspace().join("aws/tests/deaggregate.py"))
            .stdin(Stdio::from(std::fs::File::open(&input).unwrap()))
            .output()
            .expect("run deaggregate.py");
        assert!(
            out.status.success(),
            "deaggregate.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // payload -> (shard, composite sequence, key), as the independent library reads it.
        let mut found: HashMap<Vec<u8>, Vec<(String, SequenceNumber, String)>> = HashMap::new();
        let mut user_records = 0;
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let sub = v["subSequenceNumber"].as_u64().unwrap_or(0);
            let sequence = seq::compose(v["sequenceNumber"].as_str().unwrap(), sub).unwrap();
            found.entry(unhex(v["data"].as_str().unwrap())).or_default().push((
                v["shard"].as_str().unwrap().to_owned(),
                sequence,
                v["partitionKey"].as_str().unwrap().to_owned(),
            ));
            user_records += 1;
        }
        assert_eq!(
            user_records,
            acked.len(),
            "aws_kinesis_agg found {user_records} events in {kinesis_records} records; {} were acked",
            acked.len()
        );
        for (r, at) in &acked {
            let got = found.get(&r.payload[..]).map_or(&[][..], Vec::as_slice);
            assert_eq!(
                got,
                &[(at.shard.0.clone(), at.sequence.clone(), r.key.to_string())][..],
                "event with key {} acked at {at:?}",
                r.key
            );
        }
        println!(
            "aws_kinesis_agg read {user_records} events from {kinesis_records} Kinesis records"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Resharding under load
// ---------------------------------------------------------------------------------------

/// Waits until `cond` holds, for at most `limit`.
async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, Clone)]
struct Sent {
    key: String,
    n: u64,
    at: Appended,
}

async fn reshard_under_load(aggregation: bool) {
    let stream = "reshard";
    let (_emu, client) = kinesalite(stream, 2, 300).await;
    let writer = Arc::new(writer(&client, stream, aggregation));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<HashMap<Bytes, Sent>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    // Two writers with keys of their own, each appending calls in sequence: a key's
    // events are appended in order of `n`.
    let mut tasks = Vec::new();
    for t in 0..2 {
        let (writer, stop, acked, sent, failed) = (
            writer.clone(),
            stop.clone(),
            acked.clone(),
            sent.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut next_n: HashMap<String, u64> = HashMap::new();
            let mut call = 0u64;
            while !stop.load(Ordering::Relaxed) {
                call += 1;
                let records: Vec<(String, u64, Record)> = (0..24)
                    .map(|i| {
                        let key = format!("w{t}-key-{}", (i + call) % 9);
                        let n = next_n.entry(key.clone()).or_default();
                        *n += 1;
                        let payload =
                            format!(r#"{{"key":"{key}","n":{n},"pad":"{}"}}"#, "p".repeat(200));
                        (key.clone(), *n, record(&key, payload))
                    })
                    .collect();
                let outcomes = writer
                    .append(records.iter().map(|(_, _, r)| r.clone()).collect())
                    .await;
                let mut sent = sent.lock().unwrap();
                for ((key, n, r), outcome) in records.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(at) => {
                            sent.insert(r.payload, Sent { key, n, at });
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("append failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let progress = |n: usize| {
        let acked = acked.clone();
        let from = acked.load(Ordering::Relaxed);
        async move {
            wait_for("writes", Duration::from_secs(60), || {
                acked.load(Ordering::Relaxed) >= from + n
            })
            .await;
        }
    };
    progress(300).await;
    let parent = "shardId-000000000000";
    split_shard(&client, stream, parent).await.unwrap();
    progress(300).await;
    let children: Vec<String> = list_shards(&client, stream)
        .await
        .unwrap()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(parent))
        .map(|s| s.shard_id().to_owned())
        .collect();
    assert_eq!(children.len(), 2, "a split makes two children");
    merge_shards(&client, stream, &children[0], &children[1])
        .await
        .unwrap();
    progress(300).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    writer.close().await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "appends failed without faults"
    );
    let stats = writer.stats();

    // The shards: the split parent and the merged children closed, each child after its
    // parents.
    let reader = reader(&client, stream);
    let shards = reader.shards().await.unwrap();
    let position = |id: &str| shards.iter().position(|s| s.id.0 == id).unwrap();
    let merged = shards
        .iter()
        .find(|s| s.parents.len() == 2)
        .expect("the merged shard lists two parents");
    for child in &children {
        let info = &shards[position(child)];
        assert_eq!(info.parents, vec![ShardId(parent.to_owned())]);
        assert!(info.closed, "{child} was merged away");
        assert!(position(parent) < position(child));
        assert!(position(child) < position(&merged.id.0));
    }
    assert!(shards[position(parent)].closed);
    assert!(!merged.closed);

    // Read parents to their end, then children, as consumers do.
    let ranges: HashMap<String, (u128, u128)> = list_shards(&client, stream)
        .await
        .unwrap()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().unwrap();
            (
                s.shard_id().to_owned(),
                (
                    r.starting_hash_key().parse().unwrap(),
                    r.ending_hash_key().parse().unwrap(),
                ),
            )
        })
        .collect();
    let sent = sent.lock().unwrap().clone();
    let mut seen: HashMap<Bytes, usize> = HashMap::new();
    let mut last_n: HashMap<String, (u64, String)> = HashMap::new();
    let mut per_shard = BTreeMap::new();
    for info in &shards {
        let (records, ended) = read_all(&reader, &info.id, StartPosition::TrimHorizon, 500).await;
        assert_eq!(
            ended, info.closed,
            "shard {}: read to its end iff closed",
            info.id
        );
        per_shard.insert(info.id.0.clone(), records.len());
        let (lo, hi) = ranges[&info.id.0];
        for r in records {
            let hash = hash_key(&r.key);
            assert!(
                lo <= hash && hash <= hi,
                "shard {} holds an event of key {}, which hashes outside its range",
                info.id,
                r.key
            );
            *seen.entry(r.payload.clone()).or_default() += 1;
            let Some(s) = sent.get(&r.payload) else {
                panic!("read an event that was never acked: key {}", r.key);
            };
            assert_eq!(
                (&s.at.shard, &s.at.sequence),
                (&info.id, &r.sequence),
                "key {} n={}: read where it was not acked",
                s.key,
                s.n
            );
            if let Some((prev, prev_shard)) = last_n.insert(s.key.clone(), (s.n, info.id.0.clone()))
            {
                assert!(
                    prev < s.n,
                    "key {}: n={} (shard {}) read after n={prev} (shard {prev_shard})",
                    s.key,
                    s.n,
                    info.id
                );
            }
        }
    }
    let missing = sent.keys().filter(|p| !seen.contains_key(*p)).count();
    let repeated = seen.values().filter(|&&c| c > 1).count();
    assert_eq!(
        (missing, repeated),
        (0, 0),
        "of {} acked events, {missing} missing and {repeated} read twice",
        sent.len()
    );
    println!(
        "reshard (aggregation {aggregation}): {} events acked, read per shard {per_shard:?}; {stats:?}",
        sent.len()
    );
}

#[test]
fn per_key_order_through_split_and_merge_aggregated() {
    rt().block_on(reshard_under_load(true));
}

#[test]
fn per_key_order_through_split_and_merge_not_aggregated() {
    rt().block_on(reshard_under_load(false));
}

// ---------------------------------------------------------------------------------------
// Positions inside an aggregated record
// ---------------------------------------------------------------------------------------

#[test]
fn resume_inside_an_aggregate() {
    rt().block_on(async {
        let stream = "resume";
        let (_emu, client) = kinesalite(stream, 1, 0).await;
        let writer = writer(&client, stream, true);
        let first: Vec<Record> = (0..10)
            .map(|i| record(if i % 2 == 0 { "a" } else { "b" }, format!("first-{i}")))
            .collect();
        let at = append_ok(&writer, first).await;
        let (kinesis, _) = seq::split(&at[0].sequence).unwrap();
        for (i, a) in at.iter().enumerate() {
            assert_eq!(
                seq::split(&a.sequence),
                Some((kinesis, i as u64)),
                "one call's events share one aggregated record"
            );
        }
        let second = append_ok(
            &writer,
            vec![record("a", "second-0"), record("c", "second-1")],
        )
        .await;
        let payloads = |records: &[StoredRecord]| -> Vec<String> {
            records
                .iter()
                .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
                .collect()
        };
        let shard = at[0].shard.clone();

        // A checkpoint after the third event: a consumer that restarts (a fresh reader)
        // neither skips nor replays the rest of the aggregate.
        let batch = reader(&client, stream)
            .read(&shard, &StartPosition::TrimHorizon, 3)
            .await
            .unwrap();
        assert_eq!(payloads(&batch.records), ["first-0", "first-1", "first-2"]);
        let checkpoint = batch.next.expect("an open shard");
        assert_eq!(checkpoint, StartPosition::After(at[2].sequence.clone()));
        let (rest, _) = read_all(&reader(&client, stream), &shard, checkpoint, 4).await;
        let want: Vec<String> = (3..10)
            .map(|i| format!("first-{i}"))
            .chain(["second-0".into(), "second-1".into()])
            .collect();
        assert_eq!(payloads(&rest), want);
        assert_eq!(rest[0].sequence, at[3].sequence);
        assert_eq!(rest.last().unwrap().sequence, second[1].sequence);

        // At an event inside the aggregate: from that event on.
        let fresh = reader(&client, stream);
        let (from_5, _) = read_all(
            &fresh,
            &shard,
            StartPosition::At(at[5].sequence.clone()),
            100,
        )
        .await;
        assert_eq!(
            payloads(&from_5)[..5],
            ["first-5", "first-6", "first-7", "first-8", "first-9"]
        );
        // After the aggregate's last event: the next record.
        let (after_9, _) = read_all(
            &fresh,
            &shard,
            StartPosition::After(at[9].sequence.clone()),
            100,
        )
        .await;
        assert_eq!(payloads(&after_9), ["second-0", "second-1"]);
        let (end, _) = read_all(
            &fresh,
            &shard,
            StartPosition::After(second[1].sequence.clone()),
            100,
        )
        .await;
        assert!(end.is_empty());
    });
}

// ---------------------------------------------------------------------------------------
// Record size limit
// ---------------------------------------------------------------------------------------

#[test]
fn records_over_the_limit_with_their_key_are_refused() {
    rt().block_on(async {
        let stream = "limits";
        let (_emu, client) = kinesalite(stream, 2, 0).await;
        for aggregation in [true, false] {
            let writer = writer(&client, stream, aggregation);
            let key = "a-key";
            let fits = vec![b'f'; MAX_RECORD_BYTES - key.len()];
            let over = vec![b'o'; MAX_RECORD_BYTES - key.len() + 1];
            let outcomes = writer
                .append(vec![
                    record(key, "small-1"),
                    record(key, fits.clone()),
                    record(key, over),
                    record(key, "small-2"),
                ])
                .await;
            assert!(
                matches!(outcomes[2], Err(AppendError::Refused(_))),
                "aggregation {aggregation}: 1 MiB + 1 byte with the key: {:?}",
                outcomes[2]
            );
            let acked: Vec<Appended> = [0, 1, 3]
                .iter()
                .map(|&i| {
                    outcomes[i].clone().unwrap_or_else(|e| {
                        panic!("aggregation {aggregation}: record {i} is within the limit: {e}")
                    })
                })
                .collect();
            assert!(acked[0].sequence < acked[1].sequence && acked[1].sequence < acked[2].sequence);
            let (records, _) = read_all(
                &reader(&client, stream),
                &acked[0].shard,
                StartPosition::At(acked[0].sequence.clone()),
                10,
            )
            .await;
            let sizes: Vec<usize> = records.iter().map(|r| r.payload.len()).collect();
            assert_eq!(sizes, [7, fits.len(), 7], "aggregation {aggregation}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Stream creation, pacing
// ---------------------------------------------------------------------------------------

#[test]
fn ensure_stream_waits_until_active_and_is_idempotent() {
    rt().block_on(async {
        let emu = emulator::kinesalite(1500).unwrap();
        let client = client(&emu);
        let started = Instant::now();
        assert_eq!(
            ensure_stream(&client, "s", 2).await.unwrap(),
            Ensured::Created
        );
        // kinesalite keeps a new stream CREATING for 1.5 s; writing needs it ACTIVE.
        assert!(started.elapsed() >= Duration::from_millis(1400));
        let status = client
            .describe_stream_summary()
            .stream_name("s")
            .send()
            .await
            .unwrap();
        assert_eq!(
            status
                .stream_description_summary()
                .unwrap()
                .stream_status()
                .as_str(),
            "ACTIVE"
        );
        assert_eq!(
            ensure_stream(&client, "s", 5).await.unwrap(),
            Ensured::Exists
        );
        assert_eq!(list_shards(&client, "s").await.unwrap().len(), 2);
        writer(&client, "s", true).check_writable().await.unwrap();
        let missing = writer(&client, "no-such-stream", true);
        assert!(missing.check_writable().await.is_err());
        let outcomes = missing.append(vec![record("k", "v")]).await;
        assert!(
            matches!(
                &outcomes[0],
                Err(AppendError::Unavailable(m)) if m.contains("no-such-stream")
            ),
            "{outcomes:?}"
        );
    });
}

#[test]
fn get_records_is_paced_per_shard() {
    rt().block_on(async {
        let stream = "paced";
        let (_emu, client) = kinesalite(stream, 1, 0).await;
        let reader = reader(&client, stream);
        let shard = ShardId("shardId-000000000000".into());
        let mut pos = StartPosition::TrimHorizon;
        let started = Instant::now();
        // Six reads of an empty shard are six GetRecords calls, 200 ms apart at least.
        for _ in 0..6 {
            pos = reader.read(&shard, &pos, 10).await.unwrap().next.unwrap();
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(5 * 200),
            "six GetRecords calls on one shard took {elapsed:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------

/// Events/s through the writer into kinesalite, with and without aggregation, from 8 and
/// 32 concurrent appenders of 100 ~350-byte events each (the edge's shape: one append per
/// request). Printed, not asserted: kinesalite on a shared 2-core machine says little
/// about Kinesis.
#[test]
fn measure_throughput() {
    rt().block_on(async {
        let (_emu, client) = kinesalite("agg-on", 4, 0).await;
        ensure_stream(&client, "agg-off", 4).await.unwrap();
        for (stream, aggregation, appenders) in [
            ("agg-on", true, 8),
            ("agg-on", true, 32),
            ("agg-off", false, 8),
            ("agg-off", false, 32),
        ] {
            let writer = Arc::new(writer(&client, stream, aggregation));
            let (calls, per_call) = (20, 100);
            let event_bytes = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for t in 0..appenders {
                let (writer, event_bytes) = (writer.clone(), event_bytes.clone());
                tasks.push(tokio::spawn(async move {
                    for c in 0..calls {
                        let records: Vec<Record> = (0..per_call)
                            .map(|i| {
                                let key =
                                    format!("event-{}", (t * 7919 + c * 104_729 + i * 13) % 5000);
                                let payload = serde_json::json!({
                                    "specversion": "1.0",
                                    "type": "booking.requested",
                                    "source": "/load",
                                    "id": format!("{t}-{c}-{i}"),
                                    "data": {"eventId": key, "pad": "x".repeat(220)},
                                })
                                .to_string();
                                event_bytes.fetch_add(key.len() + payload.len(), Ordering::Relaxed);
                                record(&key, payload)
                            })
                            .collect();
                        append_ok(&writer, records).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let elapsed = started.elapsed().as_secs_f64();
            let s = writer.stats();
            let events = s.events_acked as f64;
            let event_size = event_bytes.load(Ordering::Relaxed) as f64 / events;
            let per_record = events / s.records_accepted.max(1) as f64;
            let per_call = s.records_sent as f64 / s.put_records_calls.max(1) as f64;
            let mean_aggregate = s.aggregate_bytes as f64 / s.aggregates_accepted.max(1) as f64;
            let max_aggregate = s.max_aggregate_bytes as f64;
            let mib = MAX_RECORD_BYTES as f64;
            println!(
                "MEASURE aggregation={aggregation} appenders={appenders} event={event_size:.0} B: \
                 {events} events in {elapsed:.2} s = {:.0} events/s; \
                 {per_record:.1} events per Kinesis record; \
                 {per_call:.1} records per PutRecords call ({} calls); \
                 aggregated record mean {:.1} KiB = {:.2}% of 1 MiB, max {:.1} KiB = {:.2}%",
                events / elapsed,
                s.put_records_calls,
                mean_aggregate / 1024.0,
                100.0 * mean_aggregate / mib,
                max_aggregate / 1024.0,
                100.0 * max_aggregate / mib,
            );
        }
    });
}

// ---------------------------------------------------------------------------------------
// Faults (through the fault proxy)
// ---------------------------------------------------------------------------------------

/// Per-record failures, whole-call throttling and 5xx, resets and a timeout before and
/// after forwarding: every event is acknowledged within the deadline, each acknowledged
/// event is in the stream where it was acknowledged, and a key's events are in order
/// (counting each event's first copy: a call applied upstream whose answer was lost is
/// sent again, which may duplicate it).
async fn faults_are_retried_in_key_order(aggregation: bool) {
    use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Phase, RecordError, Rule};

    let stream = "faults";
    let (emu, direct) = kinesalite(stream, 2, 0).await;
    let proxy = FaultProxy::start(emu.addr).await.unwrap();
    let through_proxy = client(&emu)
        .config()
        .to_builder()
        .endpoint_url(proxy.endpoint())
        .build();
    let through_proxy = Client::from_conf(through_proxy);
    let mut config = KinesisWriterConfig::new(stream, aggregation);
    config.deadline = Duration::from_secs(30);
    config.attempt_timeout = Duration::from_millis(1500);
    // Small aggregates, so a shard's queue holds more than one record's worth and a failed
    // record must go back ahead of the rest.
    config.max_aggregate_bytes = 700;
    let writer = Arc::new(KinesisWriter::new(through_proxy, config));
    let hold = Duration::from_secs(5);
    proxy.set(
        FaultPlan::seeded(if aggregation { 11 } else { 12 })
            .rule(Rule::new("PutRecords", Fault::throughput_exceeded()).every(9))
            .rule(Rule::new("PutRecords", Fault::internal_failure()).every(19))
            .rule(Rule::new("PutRecords", Fault::service_unavailable()).every(23))
            .rule(Rule::new("PutRecords", Fault::Reset(Phase::BeforeForwarding)).every(13))
            .rule(Rule::new("PutRecords", Fault::Reset(Phase::AfterForwarding)).every(17))
            .rule(
                Rule::new(
                    "PutRecords",
                    Fault::Hold {
                        phase: Phase::BeforeForwarding,
                        hold,
                    },
                )
                .every(29)
                .times(1),
            )
            .rule(
                Rule::new(
                    "PutRecords",
                    Fault::Hold {
                        phase: Phase::AfterForwarding,
                        hold,
                    },
                )
                .every(31)
                .times(1),
            )
            .rule(
                Rule::new(
                    "PutRecords",
                    Fault::FailRecords(RecordError::ThroughputExceeded),
                )
                .probability(0.15),
            )
            .rule(
                Rule::new(
                    "PutRecords",
                    Fault::FailRecords(RecordError::InternalFailure),
                )
                .probability(0.05),
            ),
    );
    let sent: Arc<Mutex<HashMap<Bytes, Sent>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..2 {
        let (writer, sent) = (writer.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut next_n: HashMap<String, u64> = HashMap::new();
            for call in 0..20u64 {
                let records: Vec<(String, u64, Record)> = (0..20)
                    .map(|i| {
                        let key = format!("w{t}-key-{}", (i * 7 + call) % 8);
                        let n = next_n.entry(key.clone()).or_default();
                        *n += 1;
                        let payload = format!("{key}/{n}/{}", "p".repeat(100));
                        (key.clone(), *n, record(&key, payload))
                    })
                    .collect();
                let outcomes = writer
                    .append(records.iter().map(|(_, _, r)| r.clone()).collect())
                    .await;
                let mut sent = sent.lock().unwrap();
                for ((key, n, r), outcome) in records.into_iter().zip(outcomes) {
                    let at = outcome
                        .unwrap_or_else(|e| panic!("{key} n={n} not appended under faults: {e}"));
                    sent.insert(r.payload, Sent { key, n, at });
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    writer.close().await.unwrap();
    let injected = proxy.injected();
    let stats = writer.stats();
    assert!(
        injected.by_rule.iter().all(|&n| n > 0),
        "every fault was injected: {injected:?}"
    );

    let reader = reader(&direct, stream);
    let sent = sent.lock().unwrap().clone();
    let mut first_seen: HashMap<Bytes, ()> = HashMap::new();
    let mut last_n: HashMap<String, u64> = HashMap::new();
    let mut at_acked = 0;
    for info in reader.shards().await.unwrap() {
        let (records, _) = read_all(&reader, &info.id, StartPosition::TrimHorizon, 1000).await;
        for r in records {
            let Some(s) = sent.get(&r.payload) else {
                panic!("read {:?}, which was never sent", r.payload);
            };
            if s.at.shard == info.id && s.at.sequence == r.sequence {
                at_acked += 1;
            }
            if first_seen.insert(r.payload.clone(), ()).is_some() {
                continue;
            }
            if let Some(prev) = last_n.insert(s.key.clone(), s.n) {
                assert!(
                    prev < s.n,
                    "aggregation {aggregation}: key {} n={} read after n={prev}",
                    s.key,
                    s.n
                );
            }
        }
    }
    assert_eq!(
        (first_seen.len(), at_acked),
        (sent.len(), sent.len()),
        "aggregation {aggregation}: every acked event is in the stream where it was acked"
    );
    println!("faults (aggregation {aggregation}): injected {injected:?}; {stats:?}");
}

#[test]
fn faults_are_retried_in_key_order_aggregated() {
    rt().block_on(faults_are_retried_in_key_order(true));
}

#[test]
fn faults_are_retried_in_key_order_not_aggregated() {
    rt().block_on(faults_are_retried_in_key_order(false));
}

/// Faults that outlast the deadline: the append answers each event `Busy` (throttled) or
/// `Unavailable` (5xx) once its deadline passes, and none of them is in the stream.
#[test]
fn persistent_faults_answer_busy_or_unavailable() {
    use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, RecordError, Rule};

    rt().block_on(async {
        let stream = "persistent";
        let (emu, direct) = kinesalite(stream, 1, 0).await;
        let proxy = FaultProxy::start(emu.addr).await.unwrap();
        let through_proxy = client(&emu)
            .config()
            .to_builder()
            .endpoint_url(proxy.endpoint())
            .build();
        let mut config = KinesisWriterConfig::new(stream, true);
        config.deadline = Duration::from_millis(1500);
        let writer = KinesisWriter::new(Client::from_conf(through_proxy), config);
        let events = || vec![record("a", "1"), record("b", "2"), record("a", "3")];
        let busy = |r: &Result<Appended, AppendError>| matches!(r, Err(AppendError::Busy { .. }));
        let unavailable =
            |r: &Result<Appended, AppendError>| matches!(r, Err(AppendError::Unavailable(_)));
        for (fault, expect_busy) in [
            (Fault::throughput_exceeded(), true),
            (Fault::throttling(), true),
            (Fault::FailRecords(RecordError::ThroughputExceeded), true),
            (Fault::service_unavailable(), false),
            (Fault::internal_failure(), false),
            (Fault::FailRecords(RecordError::InternalFailure), false),
        ] {
            proxy.set(FaultPlan::seeded(1).rule(Rule::new("PutRecords", fault.clone())));
            let outcomes = writer.append(events()).await;
            assert!(
                outcomes
                    .iter()
                    .all(|r| if expect_busy { busy(r) } else { unavailable(r) }),
                "{fault:?}: {outcomes:?}"
            );
            assert!(proxy.injected().total() > 1, "{fault:?} was retried");
        }
        proxy.set(FaultPlan::default());
        let ok = append_ok(&writer, vec![record("c", "ok")]).await;
        let (records, _) = read_all(
            &reader(&direct, stream),
            &ok[0].shard,
            StartPosition::TrimHorizon,
            100,
        )
        .await;
        let payloads: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(
            payloads,
            [&b"ok"[..]],
            "only the acknowledged event was written"
        );
    });
}

/// GetRecords answering `ExpiredIteratorException` (kinesalite's iterators live a fixed
/// five minutes, so the proxy says it): the reader renews the iterator from the last
/// position it handed out and reads on with no gap and no repeat.
#[test]
fn an_expired_iterator_is_renewed_where_the_reader_stood() {
    use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Rule};

    rt().block_on(async {
        let stream = "expiring";
        let (emu, direct) = kinesalite(stream, 1, 0).await;
        // Not aggregated: a Kinesis record per event, so reading takes many calls.
        let writer = writer(&direct, stream, false);
        let mut want = Vec::new();
        for call in 0..3 {
            let records: Vec<Record> = (0..5)
                .map(|i| record(&format!("k{}", i % 3), format!("{call}-{i}")))
                .collect();
            want.extend(records.iter().map(|r| r.payload.clone()));
            append_ok(&writer, records).await;
        }
        let proxy = FaultProxy::start(emu.addr).await.unwrap();
        let through_proxy = client(&emu)
            .config()
            .to_builder()
            .endpoint_url(proxy.endpoint())
            .build();
        proxy.set(
            FaultPlan::seeded(3).rule(
                Rule::new("GetRecords", Fault::error(400, "ExpiredIteratorException")).every(2),
            ),
        );
        let mut config = KinesisReaderConfig::new(stream);
        // Small responses, so the read needs many GetRecords calls; quickly.
        config.get_records_limit = 1;
        config.get_records_interval = Duration::from_millis(20);
        let reader = KinesisReader::new(Client::from_conf(through_proxy), config);
        let shard = ShardId("shardId-000000000000".into());
        let (records, _) = read_all(&reader, &shard, StartPosition::TrimHorizon, 2).await;
        let got: Vec<Bytes> = records.into_iter().map(|r| r.payload).collect();
        assert_eq!(got, want);
        assert!(proxy.injected().total() >= 5, "{:?}", proxy.injected());
    });
}
