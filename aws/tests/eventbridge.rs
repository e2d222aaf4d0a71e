//! The EventBridge publisher on moto server: derived events reach an SQS queue through a
//! rule on the bus (the seed's notification path), calls respect PutEvents' limits, and
//! faults of the whole call are survived by publishing again. Each test starts its own
//! moto server (`scripts/emulators` installs it).
#![cfg(feature = "emulator-tests")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::eventbridge::{EventBridgePublisher, MAX_CALL_BYTES, ensure_bus};
use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Rule};
use floodgate_aws::leases::TableOutcome;
use floodgate_core::state::{OutboxEntry, Publisher};
use serde_json::{Value, json};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn eventbridge(endpoint: &str) -> aws_sdk_eventbridge::Client {
    use aws_sdk_eventbridge::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_eventbridge::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    aws_sdk_eventbridge::Client::from_conf(config)
}

fn sqs(endpoint: &str) -> aws_sdk_sqs::Client {
    use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

fn derived(ty: &str, id: &str, pad: usize) -> String {
    json!({
        "specversion": "1.0", "id": id, "source": "floodgate", "type": ty,
        "subject": id, "datacontenttype": "application/json",
        "data": {"eventId": "E1", "bookingId": id, "reason": "x".repeat(pad)},
    })
    .to_string()
}

/// A bus with a rule sending `booking.confirmed` from floodgate to a fresh queue; the
/// queue's URL.
async fn bus_to_queue(moto: &Emulator, bus: &str) -> String {
    let eb = eventbridge(&moto.endpoint);
    assert_eq!(ensure_bus(&eb, bus).await.unwrap(), TableOutcome::Created);
    assert_eq!(ensure_bus(&eb, bus).await.unwrap(), TableOutcome::Exists);
    let q = sqs(&moto.endpoint);
    let url = q
        .create_queue()
        .queue_name("confirmed")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let arn = q
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    eb.put_rule()
        .name("confirmed-to-sqs")
        .event_bus_name(bus)
        .event_pattern(r#"{"source":["floodgate"],"detail-type":["booking.confirmed"]}"#)
        .send()
        .await
        .unwrap();
    eb.put_targets()
        .rule("confirmed-to-sqs")
        .event_bus_name(bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    url
}

/// The messages of the queue until `want` distinct ids arrived (or 20 s passed), as the
/// CloudEvents their `detail` carries, by id.
async fn drain(moto: &Emulator, url: &str, want: usize) -> BTreeMap<String, Vec<Value>> {
    let q = sqs(&moto.endpoint);
    let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want && Instant::now() < deadline {
        let out = q
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for m in out.messages() {
            let envelope: Value = serde_json::from_str(m.body().unwrap()).unwrap();
            assert_eq!(envelope["source"], "floodgate");
            assert_eq!(envelope["detail-type"], "booking.confirmed");
            let event = envelope["detail"].clone();
            got.entry(event["id"].as_str().unwrap().to_owned())
                .or_default()
                .push(event);
            q.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    got
}

/// Confirmed bookings reach the queue, each once and whole; rejected ones do not match
/// the rule. 25 events in entries of 4 are 3 calls of at most 10.
#[test]
fn confirmed_bookings_reach_the_queue_through_a_rule() {
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    let proxy_rt = rt();
    proxy_rt.block_on(async {
        let url = bus_to_queue(&moto, "floodgate").await;
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let publisher = EventBridgePublisher::new(eventbridge(&proxy.endpoint()), "floodgate");
        let mut entries = Vec::new();
        let mut confirmed = BTreeMap::new();
        for seq in 1..=7u64 {
            let mut events = Vec::new();
            for i in 0..4 {
                let n = seq * 10 + i;
                let ty = if n % 3 == 0 {
                    "booking.rejected"
                } else {
                    "booking.confirmed"
                };
                let e = derived(ty, &format!("b{n}"), 0);
                if ty == "booking.confirmed" {
                    confirmed.insert(format!("b{n}"), serde_json::from_str::<Value>(&e).unwrap());
                }
                events.push(e);
            }
            entries.push(OutboxEntry {
                partition: "shardId-0".into(),
                seq,
                events,
            });
        }
        entries.truncate(7);
        publisher.publish(&entries).await.unwrap();
        let calls = proxy.injected().calls.values().sum::<u64>();
        assert_eq!(calls, 3, "28 events in calls of at most 10");
        let got = drain(&moto, &url, confirmed.len()).await;
        assert_eq!(got.len(), confirmed.len(), "{:?}", got.keys());
        for (id, want) in &confirmed {
            assert_eq!(got[id], vec![want.clone()], "{id}: once, and whole");
        }
        assert!(
            publisher.last_published().await.unwrap().is_empty(),
            "nothing to read back"
        );
    });
}

/// Events large enough that three of them pass 256 KB go two to a call.
#[test]
fn calls_stay_within_256_kb() {
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    rt().block_on(async {
        let eb = eventbridge(&moto.endpoint);
        ensure_bus(&eb, "floodgate").await.unwrap();
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let publisher = EventBridgePublisher::new(eventbridge(&proxy.endpoint()), "floodgate");
        let big = MAX_CALL_BYTES / 3 + 1000;
        let events: Vec<String> = (0..6)
            .map(|i| derived("booking.confirmed", &format!("b{i}"), big))
            .collect();
        publisher
            .publish(&[OutboxEntry {
                partition: "p".into(),
                seq: 1,
                events,
            }])
            .await
            .unwrap();
        assert_eq!(proxy.injected().calls.values().sum::<u64>(), 3);
    });
}

/// Throttled and failing calls: `publish` retries within its deadline (the SDK's retries,
/// then its own), or fails, and the relay's next `publish` of the same entries delivers
/// them; nothing is lost, and what is repeated carries the same id.
#[test]
fn failed_calls_are_published_again_and_nothing_is_lost() {
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    rt().block_on(async {
        let url = bus_to_queue(&moto, "floodgate").await;
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let publisher = EventBridgePublisher::new(eventbridge(&proxy.endpoint()), "floodgate");
        proxy.set(
            FaultPlan::seeded(3)
                .rule(
                    Rule::new("PutEvents", Fault::throttling())
                        .every(2)
                        .times(6),
                )
                .rule(
                    Rule::new("PutEvents", Fault::service_unavailable())
                        .every(3)
                        .times(3),
                ),
        );
        let entries: Vec<OutboxEntry> = (1..=5u64)
            .map(|seq| OutboxEntry {
                partition: "s".into(),
                seq,
                events: (0..5)
                    .map(|i| derived("booking.confirmed", &format!("b{seq}-{i}"), 0))
                    .collect(),
            })
            .collect();
        let mut attempts = 0;
        while publisher.publish(&entries).await.is_err() {
            attempts += 1;
            assert!(attempts < 20, "never got through");
        }
        assert!(proxy.injected().total() > 0, "faults were injected");
        let got = drain(&moto, &url, 25).await;
        assert_eq!(got.len(), 25, "every event arrived: {:?}", got.keys());
    });
}

/// Entries EventBridge fails on their own (`FailedEntryCount`, each with its `ErrorCode`)
/// while the rest of the call succeeds: the publisher sends exactly those again, so every
/// event arrives, and none of the others twice.
#[test]
fn failed_entries_are_sent_again_alone() {
    use floodgate_aws::fault_proxy::RecordError;
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    rt().block_on(async {
        let url = bus_to_queue(&moto, "floodgate").await;
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let publisher = EventBridgePublisher::new(eventbridge(&proxy.endpoint()), "floodgate");
        proxy.set(
            FaultPlan::seeded(4)
                .rule(
                    Rule::new(
                        "PutEvents",
                        Fault::FailRecords(RecordError::ThroughputExceeded),
                    )
                    .every(3)
                    .times(4),
                )
                .rule(
                    Rule::new(
                        "PutEvents",
                        Fault::FailRecords(RecordError::InternalFailure),
                    )
                    .every(4)
                    .times(2),
                ),
        );
        let entries: Vec<OutboxEntry> = (1..=4u64)
            .map(|seq| OutboxEntry {
                partition: "s".into(),
                seq,
                events: (0..5)
                    .map(|i| derived("booking.confirmed", &format!("e{seq}-{i}"), 0))
                    .collect(),
            })
            .collect();
        publisher.publish(&entries).await.unwrap();
        let injected = proxy.injected();
        assert_eq!(injected.by_rule, [4, 2], "entries failed on their own");
        let got = drain(&moto, &url, 20).await;
        assert_eq!(got.len(), 20, "every event arrived: {:?}", got.keys());
        let twice: Vec<&String> = got
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .collect();
        assert!(
            twice.is_empty(),
            "only the failed entries were sent again: {twice:?}"
        );
    });
}
