//! The raw archive on moto server: the archive consumer (`floodgate_processors::archive`)
//! puts events through [`FirehoseArchive`] into a delivery stream whose ExtendedS3
//! destination moto writes synchronously, one object per `PutRecordBatch` call. The
//! objects are read back: every event is one NDJSON line, calls stay within 500 records
//! and 4 MiB, and through the fault proxy (failed records, throttling, 5xx, resets after
//! forwarding) every event still arrives, at least once, with the retries counted. Also
//! measures the records Firehose would bill per million events (`--nocapture`). Each test
//! starts its own moto server (`scripts/emulators` installs it).
#![cfg(feature = "emulator-tests")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use bytes::Bytes;
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Phase, RecordError, Rule};
use floodgate_aws::firehose::{
    DeliveryStreamState, FirehoseArchive, MAX_CALL_BYTES, MAX_RECORDS_PER_CALL, billed_bytes,
    describe_delivery_stream, wait_active,
};
use floodgate_core::archive::{Archive, ArchiveError, ArchiveLimits, PutResults};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::archive::{ArchiveConfig, ArchiveProcessor};
use floodgate_processors::runtime::ShardProcessor;
use serde_json::{Value, json};
use tokio::sync::watch;

const STREAM: &str = "floodgate-raw";
const BUCKET: &str = "archive";
const PREFIX: &str = "raw/";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn moto() -> Emulator {
    emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"))
}

/// A Firehose client to `endpoint` as the binary builds it (SDK retries on), or with the
/// SDK's retries off so that every injected fault reaches the archive consumer.
async fn firehose(endpoint: &str, sdk_retries: bool) -> aws_sdk_firehose::Client {
    let aws = floodgate_core::config::AwsConfig {
        region: Some("us-east-1".to_owned()),
        endpoint_url: None,
    };
    let base = floodgate_aws::client::firehose(
        &floodgate_aws::client::sdk_config(&aws).await,
        Some(endpoint),
    );
    let mut config =
        base.config()
            .to_builder()
            .credentials_provider(aws_credential_types::Credentials::new(
                "test", "test", None, None, "tests",
            ));
    if !sdk_retries {
        config = config.retry_config(RetryConfig::disabled());
    }
    aws_sdk_firehose::Client::from_conf(config.build())
}

/// A booking event of about 350 bytes, as the seed's producers send them.
fn event(n: usize) -> String {
    json!({
        "specversion": "1.0",
        "id": format!("evt-{n:08}"),
        "source": "https://shop.example.com/checkout",
        "type": "booking.requested",
        "time": "2026-11-22T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "bookingId": format!("B-{n:08}"),
            "eventId": format!("E-{:04}", n % 97),
            "customerId": format!("C-{:06}", n % 7919),
            "seats": 1 + n % 4,
            "requestedAt": "2026-11-22T10:00:00Z",
            "channel": "web",
            "sessionId": format!("S-{:016x}", n * 2_654_435_761),
        },
    })
    .to_string()
}

fn records(from: usize, n: usize) -> Vec<StoredRecord> {
    (from..from + n)
        .map(|i| StoredRecord {
            sequence: SequenceNumber::from_u64(i as u64),
            key: format!("E-{:04}", i % 97),
            payload: Bytes::from(event(i)),
            appended_at_ms: 1_700_000_000_000,
        })
        .collect()
}

/// The archive under test, with each call's records and bytes and each stored record's
/// size written down (a decorator of the same role).
#[derive(Debug)]
struct Counting {
    inner: FirehoseArchive,
    /// (records, bytes) of each call made.
    calls: Mutex<Vec<(usize, usize)>>,
    /// Sizes of the records Firehose stored.
    stored: Mutex<Vec<usize>>,
}

impl Counting {
    fn new(inner: FirehoseArchive) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            calls: Mutex::new(Vec::new()),
            stored: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl Archive for Counting {
    fn limits(&self) -> ArchiveLimits {
        self.inner.limits()
    }

    async fn put(&self, records: &[Bytes]) -> Result<PutResults, ArchiveError> {
        let bytes = records.iter().map(Bytes::len).sum();
        self.calls.lock().unwrap().push((records.len(), bytes));
        let out = self.inner.put(records).await?;
        let mut stored = self.stored.lock().unwrap();
        for (r, ok) in records.iter().zip(&out) {
            if ok.is_ok() {
                stored.push(r.len());
            }
        }
        Ok(out)
    }
}

/// The delivered lines, by event id: each line parsed as JSON, every object ending with
/// a newline (so objects concatenate into valid NDJSON).
async fn delivered(moto: &Emulator) -> (BTreeMap<String, Vec<Value>>, Vec<usize>) {
    let objects = moto
        .s3_objects(BUCKET, PREFIX)
        .await
        .expect("read the bucket");
    let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut sizes = Vec::new();
    for (key, body) in objects {
        sizes.push(body.len());
        assert!(body.ends_with(b"\n"), "{key} does not end with a newline");
        let text = std::str::from_utf8(&body).expect("UTF-8");
        for line in text.split_terminator('\n') {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{key}: a line is not one JSON value ({e}): {line:.80}")
            });
            by_id
                .entry(v["id"].as_str().expect("an id").to_owned())
                .or_default()
                .push(v);
        }
    }
    (by_id, sizes)
}

/// `p.process`, failing the test instead of retrying forever (the consumer never gives a
/// batch up, so a broken archive would otherwise hang the test).
async fn archive_batch(p: &ArchiveProcessor, shard: &ShardId, records: &[StoredRecord]) {
    tokio::time::timeout(Duration::from_secs(60), p.process(shard, records))
        .await
        .expect("the batch archived within 60 s")
        .expect("the batch archived");
}

fn processor(
    archive: Arc<dyn Archive>,
    config: ArchiveConfig,
) -> (ArchiveProcessor, watch::Sender<bool>) {
    let (stop, stop_rx) = watch::channel(false);
    (ArchiveProcessor::new(archive, config, stop_rx), stop)
}

/// Batches of several sizes, one of them larger than a call holds (over 4 MiB), then
/// records small enough that one batch needs more than 500: every event is one line of
/// the delivered objects, exactly once, and every call is within the limits.
#[test]
fn every_event_lands_in_s3_as_one_line_and_calls_stay_within_limits() {
    let moto = moto();
    rt().block_on(async {
        moto.firehose_to_bucket(STREAM, BUCKET, PREFIX)
            .await
            .unwrap();
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let fh = firehose(&proxy.endpoint(), true).await;
        wait_active(&fh, STREAM)
            .await
            .expect("the delivery stream is usable");
        let archive = Counting::new(FirehoseArchive::new(fh, STREAM));
        let shard = ShardId("shardId-000000000000".to_owned());

        // Default packing: records up to 1,000 KiB, so 12,000 events (≈ 4.3 MB) are five
        // records, and a call takes four.
        let (p, _stop) = processor(archive.clone(), ArchiveConfig::default());
        let mut next = 0;
        for n in [1, 250, 12_000, 3_000] {
            archive_batch(&p, &shard, &records(next, n)).await;
            next += n;
        }
        // Records of at most 1 KiB (two or three events): 2,000 events are ~800 records,
        // more than one call holds.
        let small = ArchiveConfig {
            record_bytes: Some(1024),
            ..ArchiveConfig::default()
        };
        let (p_small, _stop) = processor(archive.clone(), small);
        archive_batch(&p_small, &shard, &records(next, 2_000)).await;
        next += 2_000;

        let calls = archive.calls.lock().unwrap().clone();
        assert!(
            calls.iter().any(|(_, bytes)| *bytes > 3 * 1024 * 1024),
            "a call close to 4 MiB: {calls:?}"
        );
        assert!(
            calls
                .iter()
                .filter(|(n, _)| *n == MAX_RECORDS_PER_CALL)
                .count()
                >= 1,
            "a call of 500 records: {calls:?}"
        );
        for (n, bytes) in &calls {
            assert!(
                *n <= MAX_RECORDS_PER_CALL && *bytes <= MAX_CALL_BYTES,
                "{calls:?}"
            );
        }
        // On the wire: one PutRecordBatch per call, one object per call, each within 4 MiB.
        let injected = proxy.injected();
        assert_eq!(
            injected.calls.get("Firehose_20150804.PutRecordBatch"),
            Some(&(calls.len() as u64)),
            "{injected:?}"
        );
        let (by_id, sizes) = delivered(&moto).await;
        assert_eq!(sizes.len(), calls.len(), "one object per call");
        assert!(sizes.iter().all(|s| *s <= MAX_CALL_BYTES), "{sizes:?}");

        assert_eq!(by_id.len(), next, "every event archived");
        for i in 0..next {
            let want: Value = serde_json::from_str(&event(i)).unwrap();
            let got = &by_id[&format!("evt-{i:08}")];
            assert_eq!(got, &vec![want], "event {i}: once, and as sent");
        }
        let counts = p.counts();
        assert_eq!(counts.events, 15_251);
        assert_eq!(
            counts.calls(),
            counts.calls_accepted,
            "no faults, no retries"
        );
        assert_eq!(counts.records_retried, 0);
        assert_eq!(p_small.counts().events, 2_000);
    });
}

/// Through the fault proxy, with the SDK's retries off so that each fault reaches the
/// consumer: per-record failures, throttling, 500s (AWS JSON and moto's HTML page), then
/// resets after forwarding. Every event is delivered; only the calls reset after moto
/// took them are delivered twice; and the consumer counted each fault.
#[test]
fn faults_lose_nothing_and_retries_are_counted() {
    let moto = moto();
    rt().block_on(async {
        moto.firehose_to_bucket(STREAM, BUCKET, PREFIX)
            .await
            .unwrap();
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let archive = Counting::new(FirehoseArchive::new(
            firehose(&proxy.endpoint(), false).await,
            STREAM,
        ));
        let config = ArchiveConfig {
            record_bytes: Some(4096),
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(20),
        };
        let (p, _stop) = processor(archive.clone(), config);
        let shard = ShardId("shardId-000000000001".to_owned());

        // Phase 1: faults before forwarding, and failed records. Nothing is delivered
        // twice, so each count is exact.
        proxy.set(
            FaultPlan::seeded(11)
                .rule(
                    Rule::new("PutRecordBatch", Fault::throttling())
                        .every(3)
                        .times(4),
                )
                .rule(
                    Rule::new("PutRecordBatch", Fault::internal_failure())
                        .every(4)
                        .times(3),
                )
                .rule(
                    Rule::new("PutRecordBatch", Fault::Html500)
                        .every(5)
                        .times(2),
                )
                .rule(
                    Rule::new(
                        "PutRecordBatch",
                        Fault::FailRecords(RecordError::ThroughputExceeded),
                    )
                    .probability(0.2),
                )
                .rule(
                    Rule::new(
                        "PutRecordBatch",
                        Fault::FailRecords(RecordError::InternalFailure),
                    )
                    .every(7),
                ),
        );
        let mut next = 0;
        for n in [40, 400, 1_500, 300] {
            archive_batch(&p, &shard, &records(next, n)).await;
            next += n;
        }
        let injected = proxy.injected();
        let c = p.counts();
        assert_eq!(injected.by_rule[..3], [4, 3, 2], "{injected:?}");
        assert_eq!(c.calls_throttled, 4);
        assert_eq!(c.calls_unavailable, 3 + 2);
        assert!(
            injected.by_rule[3] > 10 && injected.by_rule[4] > 5,
            "{injected:?}"
        );
        assert_eq!(
            c.records_retried,
            injected.by_rule[3] + injected.by_rule[4],
            "each failed record was counted and sent again"
        );
        assert!(c.calls_partial > 0);
        let (by_id, _) = delivered(&moto).await;
        assert_eq!(by_id.len(), next, "every event delivered");
        assert!(by_id.values().all(|v| v.len() == 1), "none twice");

        // Phase 2: resets after moto took the call. The consumer cannot tell, sends the
        // call again: those records are delivered twice, nothing is lost.
        proxy.set(
            FaultPlan::default().rule(
                Rule::new("PutRecordBatch", Fault::Reset(Phase::AfterForwarding))
                    .every(2)
                    .times(3),
            ),
        );
        let before = p.counts();
        let phase2 = next;
        for n in [250; 6] {
            archive_batch(&p, &shard, &records(next, n)).await;
            next += n;
        }
        assert_eq!(proxy.injected().by_rule, [3]);
        let c = p.counts();
        assert_eq!(c.calls_unavailable - before.calls_unavailable, 3);
        let (by_id, _) = delivered(&moto).await;
        assert_eq!(by_id.len(), next, "every event delivered, at least once");
        let twice = by_id.values().filter(|v| v.len() == 2).count();
        assert!(
            twice > 0,
            "a reset after forwarding delivers its call twice"
        );
        assert!(by_id.values().all(|v| v.len() <= 2));
        assert!(
            by_id
                .iter()
                .filter(|(_, v)| v.len() == 2)
                .all(|(id, _)| id.as_str() >= format!("evt-{phase2:08}").as_str()),
            "only phase 2 repeats"
        );
        for v in by_id.values() {
            assert!(
                v.windows(2).all(|w| w[0] == w[1]),
                "a repeat is the same event"
            );
        }
        assert_eq!(c.events, next as u64);
    });
}

/// With the SDK's own retries on (as the binary runs), faults by probability on every
/// kind: everything arrives at least once.
#[test]
fn faults_through_the_sdk_retries_lose_nothing() {
    let moto = moto();
    rt().block_on(async {
        moto.firehose_to_bucket(STREAM, BUCKET, PREFIX)
            .await
            .unwrap();
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let archive = Arc::new(FirehoseArchive::new(
            firehose(&proxy.endpoint(), true).await,
            STREAM,
        ));
        let config = ArchiveConfig {
            record_bytes: Some(8192),
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(20),
        };
        let (p, _stop) = processor(archive, config);
        let shard = ShardId("0".to_owned());
        proxy.set(
            FaultPlan::seeded(5)
                .rule(Rule::new("PutRecordBatch", Fault::throttling()).probability(0.2))
                .rule(Rule::new("PutRecordBatch", Fault::service_unavailable()).probability(0.1))
                .rule(
                    Rule::new("PutRecordBatch", Fault::Reset(Phase::BeforeForwarding))
                        .probability(0.05),
                )
                .rule(
                    Rule::new("PutRecordBatch", Fault::Reset(Phase::AfterForwarding))
                        .probability(0.05),
                )
                .rule(
                    Rule::new(
                        "PutRecordBatch",
                        Fault::FailRecords(RecordError::ThroughputExceeded),
                    )
                    .probability(0.1),
                ),
        );
        for (i, n) in [700, 700, 700].into_iter().enumerate() {
            archive_batch(&p, &shard, &records(i * 700, n)).await;
        }
        assert!(proxy.injected().total() > 5, "{:?}", proxy.injected());
        let (by_id, _) = delivered(&moto).await;
        assert_eq!(by_id.len(), 2_100);
        assert!(p.counts().records_retried > 0);
    });
}

/// `DescribeDeliveryStream` as `floodgate aws init` and the start-up check read it.
#[test]
fn a_missing_delivery_stream_is_named() {
    let moto = moto();
    rt().block_on(async {
        let fh = moto.firehose_client();
        assert_eq!(
            describe_delivery_stream(&fh, STREAM).await.unwrap(),
            DeliveryStreamState::Missing
        );
        let why = wait_active(&fh, STREAM).await.unwrap_err();
        assert!(
            why.contains("does not exist") && why.contains(STREAM),
            "{why}"
        );
        moto.firehose_to_bucket(STREAM, BUCKET, PREFIX)
            .await
            .unwrap();
        assert_eq!(
            describe_delivery_stream(&fh, STREAM).await.unwrap(),
            DeliveryStreamState::Exists("ACTIVE".to_owned())
        );
        // Nothing listening: the error names the call and why.
        let gone = firehose("http://127.0.0.1:9", false).await;
        let why = describe_delivery_stream(&gone, STREAM).await.unwrap_err();
        assert!(why.contains("DescribeDeliveryStream"), "{why}");
    });
}

/// What Firehose would bill per million ~350-byte events, packed by the consumer, for
/// stream batches of several sizes (the batch a shard's read returns bounds a record),
/// against one event per record. Measured on moto; printed with `--nocapture`.
#[test]
fn billed_bytes_per_million_events() {
    let moto = moto();
    rt().block_on(async {
        moto.firehose_to_bucket(STREAM, BUCKET, PREFIX).await.unwrap();
        let fh = firehose(&moto.endpoint, true).await;
        let event_bytes = event(0).len() + 1;
        println!("| events per batch | records / 1,000 events | calls / 1,000 events | billed GB / million events | $ / million events |");
        println!("|---|---|---|---|---|");
        let mut next = 0;
        let mut rows = Vec::new();
        for (batch, events) in [(1, 200), (10, 2_000), (100, 5_000), (1_000, 10_000), (10_000, 20_000)] {
            let archive = Counting::new(FirehoseArchive::new(fh.clone(), STREAM));
            let (p, _stop) = processor(archive.clone(), ArchiveConfig::default());
            let shard = ShardId("0".to_owned());
            for _ in 0..events / batch {
                archive_batch(&p, &shard, &records(next, batch)).await;
                next += batch;
            }
            let stored = archive.stored.lock().unwrap().clone();
            let calls = archive.calls.lock().unwrap().len();
            let billed: usize = stored.iter().map(|s| billed_bytes(*s)).sum();
            let per_million = billed as f64 * 1e6 / events as f64 / 1e9;
            println!(
                "| {batch} | {:.1} | {:.1} | {per_million:.3} | {:.4} |",
                stored.len() as f64 * 1000.0 / events as f64,
                calls as f64 * 1000.0 / events as f64,
                per_million * 0.029
            );
            rows.push((batch, billed as f64 / events as f64));
        }
        let alone = billed_bytes(event_bytes) as f64;
        println!(
            "one event per record: {alone} billed bytes an event, {:.3} GB / million, ${:.4}",
            alone * 1e6 / 1e9,
            alone * 1e6 / 1e9 * 0.029
        );
        for (batch, per_event) in rows {
            if batch >= 100 {
                assert!(
                    per_event < event_bytes as f64 * 1.1,
                    "batches of {batch}: {per_event} billed bytes an event of {event_bytes}"
                );
            }
            if batch == 1 {
                assert_eq!(per_event, alone, "a lone event is billed a whole record");
            }
        }
    });
}
