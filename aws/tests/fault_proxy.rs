//! The fault proxy itself, against kinesalite and moto server through the Rust SDK: each
//! fault shows up in the SDK as it would from AWS, a failed record (Kinesis PutRecords,
//! Firehose PutRecordBatch) or a call refused before forwarding is really not written, a
//! call faulted after forwarding really is, and everything else passes through unchanged.
#![cfg(feature = "emulator-tests")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_kinesis::error::{ProvideErrorMetadata as _, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use floodgate_aws::client;
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Phase, RecordError, Rule};
use floodgate_core::config::AwsConfig;

const STREAM: &str = "faults";
const PUT_RECORDS: &str = "Kinesis_20131202.PutRecords";
/// Long enough that the proxy holds a call well past the SDK's attempt timeout.
const HOLD: Duration = Duration::from_secs(60);

/// How a test's SDK client behaves: retries off shows every fault as it comes.
#[derive(Clone, Copy)]
struct Sdk {
    attempts: u32,
    attempt_timeout: Duration,
}

const NO_RETRY: Sdk = Sdk {
    attempts: 1,
    attempt_timeout: Duration::from_secs(10),
};

async fn sdk_config() -> aws_config::SdkConfig {
    let aws = AwsConfig {
        region: Some("us-east-1".to_owned()),
        endpoint_url: None,
    };
    client::sdk_config(&aws).await
}

fn retry(sdk: Sdk) -> RetryConfig {
    if sdk.attempts <= 1 {
        RetryConfig::disabled()
    } else {
        RetryConfig::standard()
            .with_max_attempts(sdk.attempts)
            .with_initial_backoff(Duration::from_millis(10))
    }
}

fn timeouts(sdk: Sdk) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(sdk.attempt_timeout)
        .build()
}

fn dummy_credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "fault-proxy-test")
}

async fn kinesis(endpoint: &str, sdk: Sdk) -> aws_sdk_kinesis::Client {
    let base = client::kinesis(&sdk_config().await, Some(endpoint));
    let config = base
        .config()
        .to_builder()
        .credentials_provider(dummy_credentials())
        .retry_config(retry(sdk))
        .timeout_config(timeouts(sdk))
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

async fn dynamodb(endpoint: &str, sdk: Sdk) -> aws_sdk_dynamodb::Client {
    let base = client::dynamodb(&sdk_config().await, Some(endpoint));
    let config = base
        .config()
        .to_builder()
        .credentials_provider(dummy_credentials())
        .retry_config(retry(sdk))
        .timeout_config(timeouts(sdk))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

async fn firehose(endpoint: &str, sdk: Sdk) -> aws_sdk_firehose::Client {
    let base = client::firehose(&sdk_config().await, Some(endpoint));
    let config = base
        .config()
        .to_builder()
        .credentials_provider(dummy_credentials())
        .retry_config(retry(sdk))
        .timeout_config(timeouts(sdk))
        .build();
    aws_sdk_firehose::Client::from_conf(config)
}

/// Kinesalite with an ACTIVE two-shard stream, the proxy in front of it, and a client that
/// talks to kinesalite directly to check what was really written.
struct KinesisRig {
    _kinesalite: Emulator,
    proxy: FaultProxy,
    direct: aws_sdk_kinesis::Client,
}

async fn kinesis_rig() -> KinesisRig {
    let kinesalite = emulator::kinesalite(0).expect("start kinesalite");
    let proxy = FaultProxy::start(kinesalite.addr)
        .await
        .expect("start the fault proxy");
    let direct = kinesis(&kinesalite.endpoint, NO_RETRY).await;
    direct
        .create_stream()
        .stream_name(STREAM)
        .shard_count(2)
        .send()
        .await
        .expect("create the stream");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let summary = direct
            .describe_stream_summary()
            .stream_name(STREAM)
            .send()
            .await
            .expect("describe the stream");
        if summary
            .stream_description_summary()
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
        {
            break;
        }
        assert!(Instant::now() < deadline, "stream not ACTIVE within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    KinesisRig {
        _kinesalite: kinesalite,
        proxy,
        direct,
    }
}

fn entries(tag: &str, n: usize) -> Vec<PutRecordsRequestEntry> {
    (0..n)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(format!("{tag}-{i}")))
                .partition_key(format!("key-{i}"))
                .build()
                .expect("a record entry")
        })
        .collect()
}

async fn put(
    client: &aws_sdk_kinesis::Client,
    tag: &str,
    n: usize,
) -> Result<
    aws_sdk_kinesis::operation::put_records::PutRecordsOutput,
    SdkError<aws_sdk_kinesis::operation::put_records::PutRecordsError>,
> {
    client
        .put_records()
        .stream_name(STREAM)
        .set_records(Some(entries(tag, n)))
        .send()
        .await
}

/// Every record in the stream, all shards, from the start.
async fn stored(direct: &aws_sdk_kinesis::Client) -> Vec<String> {
    let shards = direct
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await
        .expect("list shards");
    let mut out = Vec::new();
    for shard in shards.shards() {
        let mut iterator = direct
            .get_shard_iterator()
            .stream_name(STREAM)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("get a shard iterator")
            .shard_iterator;
        while let Some(it) = iterator {
            let page = direct
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .expect("get records");
            if page.records().is_empty() {
                break;
            }
            for record in page.records() {
                out.push(String::from_utf8_lossy(record.data().as_ref()).into_owned());
            }
            iterator = page.next_shard_iterator;
        }
    }
    out.sort();
    out
}

/// Polls until `record` is stored (a call applied after its client gave up may still be
/// in flight), failing after a deadline.
async fn wait_stored(direct: &aws_sdk_kinesis::Client, record: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stored(direct).await.iter().any(|r| r == record) {
        assert!(Instant::now() < deadline, "{record} not stored within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes a marker through the proxy with no faults and waits for it, so that what is not
/// stored by then was never written (and reading works).
async fn settle(rig: &KinesisRig, client: &aws_sdk_kinesis::Client) -> Vec<String> {
    rig.proxy.set(FaultPlan::default());
    put(client, "marker", 1).await.expect("write the marker");
    wait_stored(&rig.direct, "marker-0").await;
    stored(&rig.direct).await
}

fn status<E>(err: &SdkError<E, aws_sdk_kinesis::config::http::HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_passes_through_unchanged() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;

    let out = put(&client, "plain", 20)
        .await
        .expect("put through the proxy");
    assert_eq!(out.failed_record_count(), Some(0));
    assert_eq!(out.records().len(), 20);
    assert!(out.records().iter().all(|r| r.sequence_number().is_some()));

    let mut want: Vec<String> = (0..20).map(|i| format!("plain-{i}")).collect();
    want.sort();
    assert_eq!(stored(&rig.direct).await, want, "read directly");
    assert_eq!(stored(&client).await, want, "read through the proxy");
    let injected = rig.proxy.injected();
    assert_eq!(injected.total(), 0);
    assert_eq!(injected.calls.get(PUT_RECORDS), Some(&1));
    assert!(injected.forwarded >= 4, "{injected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_records_partial_failure_removes_the_failed_records() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;

    // Every 3rd record, at most 3 of them: records 2, 5 and 8 of 10 fail.
    let fail_records = Fault::FailRecords(RecordError::ThroughputExceeded);
    rig.proxy
        .set(FaultPlan::default().rule(Rule::new("PutRecords", fail_records).every(3).times(3)));
    let out = put(&client, "a", 10).await.expect("put records");
    assert_eq!(out.failed_record_count(), Some(3));
    assert_eq!(out.records().len(), 10);
    let failed: Vec<usize> = (0..10)
        .filter(|&i| out.records()[i].error_code().is_some())
        .collect();
    assert_eq!(failed, [2, 5, 8]);
    for (i, record) in out.records().iter().enumerate() {
        if failed.contains(&i) {
            assert_eq!(
                record.error_code(),
                Some("ProvisionedThroughputExceededException")
            );
            assert!(
                record
                    .error_message()
                    .is_some_and(|m| m.starts_with("Rate exceeded for shard")),
                "{record:?}"
            );
            assert!(record.sequence_number().is_none());
        } else {
            assert!(record.sequence_number().is_some(), "{record:?}");
        }
    }
    assert_eq!(rig.proxy.injected().by_rule, [3]);

    // InternalFailure, on the first two records of the next call.
    let internal = Fault::FailRecords(RecordError::InternalFailure);
    rig.proxy
        .set(FaultPlan::default().rule(Rule::new(PUT_RECORDS, internal).times(2)));
    let out = put(&client, "b", 4).await.expect("put records");
    assert_eq!(out.failed_record_count(), Some(2));
    let codes: Vec<Option<&str>> = out.records().iter().map(|r| r.error_code()).collect();
    assert_eq!(
        codes,
        [Some("InternalFailure"), Some("InternalFailure"), None, None]
    );

    // Every record fails: the proxy answers without forwarding.
    let all = Fault::FailRecords(RecordError::ThroughputExceeded);
    rig.proxy
        .set(FaultPlan::default().rule(Rule::new("PutRecords", all)));
    let out = put(&client, "c", 3).await.expect("put records");
    assert_eq!(out.failed_record_count(), Some(3));
    assert!(out.records().iter().all(|r| r.error_code().is_some()));
    assert_eq!(rig.proxy.injected().forwarded, 0);

    let mut want: Vec<String> = [0, 1, 3, 4, 6, 7, 9]
        .iter()
        .map(|i| format!("a-{i}"))
        .chain(["b-2".to_owned(), "b-3".to_owned(), "marker-0".to_owned()])
        .collect();
    want.sort();
    assert_eq!(settle(&rig, &client).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_failures_by_probability_repeat_with_the_seed() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;
    let plan = FaultPlan::seeded(42).rule(
        Rule::new(
            "PutRecords",
            Fault::FailRecords(RecordError::ThroughputExceeded),
        )
        .probability(0.3),
    );

    let mut runs = Vec::new();
    for tag in ["x", "y"] {
        rig.proxy.set(plan.clone());
        let out = put(&client, tag, 50).await.expect("put records");
        let failed: BTreeSet<usize> = (0..50)
            .filter(|&i| out.records()[i].error_code().is_some())
            .collect();
        assert_eq!(out.failed_record_count(), Some(failed.len() as i32));
        assert_eq!(rig.proxy.injected().by_rule, [failed.len() as u64]);
        runs.push(failed);
    }
    assert!(
        (5..=25).contains(&runs[0].len()),
        "about 30% of 50 records should fail: {:?}",
        runs[0]
    );
    assert_eq!(runs[0], runs[1], "the same seed fails the same records");

    let stored = settle(&rig, &client).await;
    for (tag, failed) in ["x", "y"].iter().zip(&runs) {
        for i in 0..50 {
            let record = format!("{tag}-{i}");
            assert_eq!(
                stored.contains(&record),
                !failed.contains(&i),
                "{record}: stored iff it did not fail"
            );
        }
    }
}

/// The Rust SDK sends AWS JSON, but a client speaking CBOR (the Java SDK's default for
/// Kinesis) must not slip through unfaulted while a test believes records fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_faults_refuse_a_body_that_is_not_json() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let rig = kinesis_rig().await;
    let fail_records = Fault::FailRecords(RecordError::ThroughputExceeded);
    rig.proxy
        .set(FaultPlan::default().rule(Rule::new("PutRecords", fail_records)));
    let body = [
        0xbf_u8, 0x67, b'R', b'e', b'c', b'o', b'r', b'd', b's', 0x80, 0xff,
    ];
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nX-Amz-Target: {PUT_RECORDS}\r\n\
         Content-Type: application/x-amz-cbor-1.1\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        rig.proxy.endpoint().trim_start_matches("http://"),
        body.len()
    );
    let mut conn =
        tokio::net::TcpStream::connect(rig.proxy.endpoint().trim_start_matches("http://"))
            .await
            .expect("connect to the proxy");
    conn.write_all(head.as_bytes())
        .await
        .expect("send the head");
    conn.write_all(&body).await.expect("send the body");
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .await
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("FaultProxyUnsupportedBody"), "{answer}");
    assert!(answer.contains("not AWS JSON"), "{answer}");
    assert_eq!(rig.proxy.injected().forwarded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_call_throttling_fails_the_next_calls_then_behaves() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;

    rig.proxy.set(
        FaultPlan::default()
            .rule(Rule::new("PutRecords", Fault::throughput_exceeded()).times(2))
            .rule(Rule::new("PutRecords", Fault::throttling()).times(1)),
    );
    for (call, code) in [
        "ProvisionedThroughputExceededException",
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
    ]
    .iter()
    .enumerate()
    {
        let err = put(&client, &format!("t{call}"), 2)
            .await
            .expect_err("throttled");
        assert_eq!(err.code(), Some(*code), "call {call}: {err:?}");
        assert_eq!(status(&err), Some(400));
    }
    put(&client, "ok", 2).await.expect("behaves after 3 faults");
    assert_eq!(rig.proxy.injected().by_rule, [2, 1]);

    // The SDK's own retries (3 attempts) ride over two throttled calls.
    let retrying = kinesis(
        &rig.proxy.endpoint(),
        Sdk {
            attempts: 3,
            ..NO_RETRY
        },
    )
    .await;
    rig.proxy.set(
        FaultPlan::default().rule(Rule::new("PutRecords", Fault::throughput_exceeded()).times(2)),
    );
    put(&retrying, "retried", 1)
        .await
        .expect("third attempt passes");
    let injected = rig.proxy.injected();
    assert_eq!(injected.by_rule, [2]);
    assert_eq!(injected.calls.get(PUT_RECORDS), Some(&3));

    let mut want = vec!["marker-0", "ok-0", "ok-1", "retried-0"];
    want.sort_unstable();
    assert_eq!(
        settle(&rig, &client).await,
        want,
        "throttled calls not written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_answered_before_forwarding() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;

    rig.proxy.set(
        FaultPlan::default()
            .rule(Rule::new("PutRecords", Fault::internal_failure()).times(1))
            .rule(Rule::new("PutRecords", Fault::service_unavailable()).times(1))
            .rule(Rule::new("PutRecords", Fault::Html500).times(1)),
    );
    let err = put(&client, "e500", 1).await.expect_err("500");
    assert_eq!(
        (status(&err), err.code()),
        (Some(500), Some("InternalFailure"))
    );
    let err = put(&client, "e503", 1).await.expect_err("503");
    assert_eq!(
        (status(&err), err.code()),
        (Some(503), Some("ServiceUnavailable"))
    );
    let err = put(&client, "html", 1).await.expect_err("HTML 500");
    assert_eq!((status(&err), err.code()), (Some(500), None), "{err:?}");
    let body = err
        .raw_response()
        .and_then(|r| r.body().bytes())
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    assert!(
        body.contains("<title>500 Internal Server Error</title>"),
        "{body}"
    );

    assert_eq!(rig.proxy.injected().by_rule, [1, 1, 1]);
    assert_eq!(rig.proxy.injected().forwarded, 0);
    assert_eq!(settle(&rig, &client).await, ["marker-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_calls_time_out_in_the_sdk_applied_only_after_forwarding() {
    let rig = kinesis_rig().await;
    let client = kinesis(
        &rig.proxy.endpoint(),
        Sdk {
            attempts: 1,
            attempt_timeout: Duration::from_secs(2),
        },
    )
    .await;

    rig.proxy.set(
        FaultPlan::default().rule(
            Rule::new(
                "PutRecords",
                Fault::Hold {
                    phase: Phase::BeforeForwarding,
                    hold: HOLD,
                },
            )
            .times(1),
        ),
    );
    let err = put(&client, "before", 1).await.expect_err("timed out");
    assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
    assert_eq!(rig.proxy.injected().forwarded, 0);

    rig.proxy.set(
        FaultPlan::default().rule(
            Rule::new(
                "PutRecords",
                Fault::Hold {
                    phase: Phase::AfterForwarding,
                    hold: HOLD,
                },
            )
            .times(1),
        ),
    );
    let err = put(&client, "after", 1).await.expect_err("timed out");
    assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
    assert_eq!(rig.proxy.injected().forwarded, 1);
    // The call the SDK gave up on was applied: a retry would write it twice.
    wait_stored(&rig.direct, "after-0").await;

    // The marker goes through a client without the short timeout: a loaded machine must
    // not turn a slow answer into a failure here.
    let patient = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;
    assert_eq!(settle(&rig, &patient).await, ["after-0", "marker-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_before_and_after_forwarding() {
    let rig = kinesis_rig().await;
    let client = kinesis(&rig.proxy.endpoint(), NO_RETRY).await;

    for phase in [Phase::BeforeForwarding, Phase::AfterForwarding] {
        rig.proxy
            .set(FaultPlan::default().rule(Rule::new("PutRecords", Fault::Reset(phase)).times(1)));
        let err = put(&client, &format!("{phase:?}"), 1)
            .await
            .expect_err("reset");
        match &err {
            SdkError::DispatchFailure(e) => assert!(e.is_io(), "{phase:?}: {err:?}"),
            _ => panic!("{phase:?}: not a connection failure: {err:?}"),
        }
        assert_eq!(rig.proxy.injected().by_rule, [1]);
    }
    wait_stored(&rig.direct, "AfterForwarding-0").await;

    // With the SDK's retries on, a reset before forwarding costs one attempt, no record.
    let retrying = kinesis(
        &rig.proxy.endpoint(),
        Sdk {
            attempts: 3,
            ..NO_RETRY
        },
    )
    .await;
    rig.proxy.set(
        FaultPlan::default()
            .rule(Rule::new("PutRecords", Fault::Reset(Phase::BeforeForwarding)).times(1)),
    );
    put(&retrying, "retried", 1)
        .await
        .expect("the retry passes");
    assert_eq!(rig.proxy.injected().calls.get(PUT_RECORDS), Some(&2));

    assert_eq!(
        settle(&rig, &client).await,
        ["AfterForwarding-0", "marker-0", "retried-0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_faults_through_moto() {
    let moto = emulator::moto().expect("start moto server");
    let proxy = FaultProxy::start(moto.addr)
        .await
        .expect("start the fault proxy");
    let db = dynamodb(&proxy.endpoint(), NO_RETRY).await;
    let direct = dynamodb(&moto.endpoint, NO_RETRY).await;
    db.create_table()
        .table_name("leases")
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("leaseKey")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("leaseKey")
                .key_type(KeyType::Hash)
                .build()
                .expect("key"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create the table through the proxy");
    db.put_item()
        .table_name("leases")
        .item("leaseKey", AttributeValue::S("shard-0".to_owned()))
        .item("leaseCounter", AttributeValue::N("1".to_owned()))
        .send()
        .await
        .expect("put an item through the proxy");
    let counter = || async {
        let item = direct
            .get_item()
            .table_name("leases")
            .key("leaseKey", AttributeValue::S("shard-0".to_owned()))
            .consistent_read(true)
            .send()
            .await
            .expect("read the item directly");
        item.item()
            .and_then(|i| i.get("leaseCounter"))
            .and_then(|v| v.as_n().ok())
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(counter().await, "1", "passed through");
    let bump = || {
        db.update_item()
            .table_name("leases")
            .key("leaseKey", AttributeValue::S("shard-0".to_owned()))
            .update_expression("ADD leaseCounter :one")
            .expression_attribute_values(":one", AttributeValue::N("1".to_owned()))
            .send()
    };

    proxy.set(
        FaultPlan::default()
            .rule(Rule::new("DynamoDB_20120810.UpdateItem", Fault::throughput_exceeded()).times(1))
            .rule(Rule::new("UpdateItem", Fault::Html500).times(1))
            .rule(Rule::new("UpdateItem", Fault::Reset(Phase::AfterForwarding)).times(1)),
    );
    let err = bump().await.expect_err("throttled");
    assert_eq!(
        (err.raw_response().map(|r| r.status().as_u16()), err.code()),
        (Some(400), Some("ProvisionedThroughputExceededException")),
        "{err:?}"
    );
    let err = bump().await.expect_err("HTML 500");
    assert_eq!(
        (err.raw_response().map(|r| r.status().as_u16()), err.code()),
        (Some(500), None),
        "{err:?}"
    );
    assert_eq!(counter().await, "1", "refused calls are not applied");

    let err = bump().await.expect_err("reset");
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter().await != "2" {
        assert!(Instant::now() < deadline, "the reset call was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bump().await.expect("behaves after the faults");
    assert_eq!(counter().await, "3");
    assert_eq!(proxy.injected().by_rule, [1, 1, 1]);
}

/// Firehose PutRecordBatch through moto server: records failed by the proxy are answered
/// in `RequestResponses` with an `ErrorCode` and counted in `FailedPutCount`, and are
/// really not delivered; the others are, whole and in their place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_record_batch_partial_failure_removes_the_failed_records() {
    use aws_sdk_firehose::primitives::Blob;
    use aws_sdk_firehose::types::Record;

    const BATCH: &str = "Firehose_20150804.PutRecordBatch";
    let moto = emulator::moto().expect("start moto server");
    moto.firehose_to_bucket("raw", "archive", "raw/")
        .await
        .expect("create the bucket and the delivery stream");
    let proxy = FaultProxy::start(moto.addr)
        .await
        .expect("start the fault proxy");
    let fh = firehose(&proxy.endpoint(), NO_RETRY).await;
    let put = |tag: &'static str, n: usize| {
        let records = (0..n)
            .map(|i| {
                Record::builder()
                    .data(Blob::new(format!("{tag}-{i}\n")))
                    .build()
                    .expect("a record")
            })
            .collect();
        fh.put_record_batch()
            .delivery_stream_name("raw")
            .set_records(Some(records))
            .send()
    };

    // Every 3rd record, at most 3: records 2, 5 and 8 of 10 fail.
    let slow = Fault::FailRecords(RecordError::ThroughputExceeded);
    proxy.set(FaultPlan::default().rule(Rule::new("PutRecordBatch", slow).every(3).times(3)));
    let out = put("a", 10).await.expect("put a batch");
    assert_eq!(out.failed_put_count(), 3);
    assert_eq!(out.request_responses().len(), 10);
    for (i, r) in out.request_responses().iter().enumerate() {
        if [2, 5, 8].contains(&i) {
            assert_eq!(r.error_code(), Some("ServiceUnavailableException"), "{r:?}");
            assert!(
                r.error_message()
                    .is_some_and(|m| m.starts_with("Slow down.") && m.contains("raw")),
                "{r:?}"
            );
            assert!(r.record_id().is_none(), "{r:?}");
        } else {
            assert!(r.error_code().is_none() && r.record_id().is_some(), "{r:?}");
        }
    }
    let injected = proxy.injected();
    assert_eq!(injected.by_rule, [3]);
    assert_eq!(injected.calls.get(BATCH), Some(&1), "{injected:?}");

    // InternalFailure on the first two records of the next call.
    let internal = Fault::FailRecords(RecordError::InternalFailure);
    proxy.set(FaultPlan::default().rule(Rule::new(BATCH, internal).times(2)));
    let out = put("b", 4).await.expect("put a batch");
    assert_eq!(out.failed_put_count(), 2);
    let codes: Vec<Option<&str>> = out
        .request_responses()
        .iter()
        .map(|r| r.error_code())
        .collect();
    assert_eq!(
        codes,
        [Some("InternalFailure"), Some("InternalFailure"), None, None]
    );

    // Every record fails: the proxy answers without forwarding.
    let all = Fault::FailRecords(RecordError::ThroughputExceeded);
    proxy.set(FaultPlan::default().rule(Rule::new("PutRecordBatch", all)));
    let out = put("c", 3).await.expect("put a batch");
    assert_eq!(out.failed_put_count(), 3);
    assert!(
        out.request_responses()
            .iter()
            .all(|r| r.error_code().is_some())
    );
    assert_eq!(proxy.injected().forwarded, 0);

    // A Kinesis rule leaves Firehose alone.
    let kinesis_only = Fault::FailRecords(RecordError::ThroughputExceeded);
    proxy.set(FaultPlan::default().rule(Rule::new("PutRecords", kinesis_only)));
    let out = put("d", 2).await.expect("put a batch");
    assert_eq!(out.failed_put_count(), 0);
    assert_eq!(proxy.injected().by_rule, [0]);

    // moto delivered each forwarded call as one object: exactly the records not failed.
    let mut delivered: Vec<String> = Vec::new();
    for (_, body) in moto
        .s3_objects("archive", "raw/")
        .await
        .expect("read the bucket")
    {
        let text = String::from_utf8(body.to_vec()).expect("text");
        delivered.extend(text.lines().map(str::to_owned));
    }
    delivered.sort();
    let mut want: Vec<String> = [0, 1, 3, 4, 6, 7, 9]
        .iter()
        .map(|i| format!("a-{i}"))
        .chain(["b-2", "b-3", "d-0", "d-1"].map(str::to_owned))
        .collect();
    want.sort();
    assert_eq!(delivered, want);
}
