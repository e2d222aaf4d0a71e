//! The DynamoDB lease table on moto server: the lease and checkpoint conformance suite
//! (`sinks/tests/lease_conformance/`), and what only DynamoDB does — leases that expire when
//! not renewed, hand-over on request that fences the old holder, `SHARD_END`, the item layout KCL
//! tooling reads, listing across Scan pages, creating the table, and errors that name
//! DynamoDB. Each test starts its own moto server (`scripts/emulators` installs it).
#![cfg(feature = "emulator-tests")]

// DynamoDB leases expire; they are never lost by dropping a store (`LeaseLoss::WhenDropped`).
#[allow(dead_code)]
#[path = "../../sinks/tests/lease_conformance/mod.rs"]
mod lease_conformance;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::leases::{DynamoDbLeases, TableOutcome, ensure_table};
use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId, ShardInfo, StreamError};
use lease_conformance::{Capabilities, LeaseFixture, LeaseLoss};

const KINESIS: &str = "49590338271490256608559692538361571095921575989136588898";

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

/// A DynamoDB client of `endpoint` with explicit dummy credentials and region, so that
/// nothing depends on the environment of the test process.
fn client(endpoint: &str) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

fn shard(i: usize) -> ShardId {
    ShardId(format!("shardId-{i:012}"))
}

fn seq(n: u64) -> SequenceNumber {
    SequenceNumber::from_u64(n)
}

fn composite(kinesis: &str, sub: u64) -> SequenceNumber {
    SequenceNumber::new(format!("{kinesis}{sub:06}"))
}

/// Stores over fresh tables of one moto server.
struct Dynamo {
    _moto: Emulator,
    client: Client,
    lease_duration: Duration,
    tables: AtomicUsize,
}

impl Dynamo {
    fn new(lease_duration: Duration) -> Self {
        let moto = moto();
        let client = client(&moto.endpoint);
        Self {
            _moto: moto,
            client,
            lease_duration,
            tables: AtomicUsize::new(0),
        }
    }

    async fn table(&self) -> String {
        let name = format!("leases-{}", self.tables.fetch_add(1, Ordering::Relaxed));
        assert_eq!(
            ensure_table(&self.client, &name).await.unwrap(),
            TableOutcome::Created
        );
        name
    }

    fn store(&self, table: &str) -> DynamoDbLeases {
        DynamoDbLeases::new(self.client.clone(), table, self.lease_duration)
    }
}

#[async_trait]
impl LeaseFixture for Dynamo {
    fn name(&self) -> String {
        "DynamoDbLeases".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            lists_leases: true,
            hands_over: true,
            shard_end: true,
            loss: LeaseLoss::Expires(self.lease_duration),
        }
    }

    async fn workers(&self, n: usize) -> Vec<Arc<dyn CheckpointStore>> {
        let table = self.table().await;
        (0..n)
            .map(|_| Arc::new(self.store(&table)) as Arc<dyn CheckpointStore>)
            .collect()
    }
}

/// The conformance suite's lease duration: long enough that no check's "live" lease
/// lapses on a loaded machine, short enough for its expiry check.
fn conformance() -> Dynamo {
    Dynamo::new(Duration::from_millis(3000))
}

#[test]
fn conformance_a_lease_is_exclusive() {
    rt().block_on(lease_conformance::a_lease_is_exclusive(&conformance()));
}

#[test]
fn conformance_a_commit_without_the_lease_is_refused() {
    rt().block_on(lease_conformance::a_commit_without_the_lease_is_refused(
        &conformance(),
    ));
}

#[test]
fn conformance_checkpoints_never_regress() {
    rt().block_on(lease_conformance::checkpoints_never_regress(&conformance()));
}

#[test]
fn conformance_workers_committing_different_shards_lose_nothing() {
    rt().block_on(
        lease_conformance::workers_committing_different_shards_lose_nothing(&conformance()),
    );
}

#[test]
fn conformance_releasing_keeps_the_checkpoint() {
    rt().block_on(lease_conformance::releasing_keeps_the_checkpoint(
        &conformance(),
    ));
}

#[test]
fn conformance_sequence_numbers_round_trip_exactly() {
    rt().block_on(lease_conformance::sequence_numbers_round_trip_exactly(
        &conformance(),
    ));
}

#[test]
fn conformance_a_dead_workers_lease_is_taken() {
    rt().block_on(lease_conformance::a_dead_workers_lease_is_taken(
        &conformance(),
    ));
}

#[test]
fn conformance_listing_handing_over_and_shard_end() {
    rt().block_on(lease_conformance::listing_handing_over_and_shard_end(
        &conformance(),
    ));
}

/// The raw item of `key`, read with the SDK.
async fn raw_item(client: &Client, table: &str, key: &str) -> HashMap<String, AttributeValue> {
    client
        .get_item()
        .table_name(table)
        .key("leaseKey", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
        .unwrap_or_else(|| panic!("no item {key} in {table}"))
}

/// An item as (attribute name → "TYPE value"), for whole-item comparisons.
fn typed(item: &HashMap<String, AttributeValue>) -> BTreeMap<String, String> {
    item.iter()
        .map(|(name, value)| {
            let v = match value {
                AttributeValue::S(s) => format!("S {s}"),
                AttributeValue::N(n) => format!("N {n}"),
                AttributeValue::Ss(set) => {
                    let mut set = set.clone();
                    set.sort();
                    format!("SS {}", set.join(","))
                }
                other => format!("{other:?}"),
            };
            (name.clone(), v)
        })
        .collect()
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn counter(item: &HashMap<String, AttributeValue>) -> u64 {
    item["leaseCounter"].as_n().unwrap().parse().unwrap()
}

/// Every attribute has KCL 2.x's name and type; `parentShardId` is a string set present only
/// when there are parents; a composite is stored as KCL's two parts; every write increments
/// `leaseCounter`, and syncing shards again writes nothing.
#[test]
fn items_have_kcl_attribute_names_and_types() {
    rt().block_on(async {
        let dynamo = Dynamo::new(Duration::from_secs(10));
        let table = dynamo.table().await;
        let store = dynamo.store(&table);
        let c = &dynamo.client;
        let shards = [
            ShardInfo {
                id: shard(0),
                parents: vec![],
                closed: false,
            },
            ShardInfo {
                id: shard(3),
                parents: vec![shard(1)],
                closed: false,
            },
            ShardInfo {
                id: shard(4),
                parents: vec![shard(2), shard(1)],
                closed: false,
            },
        ];
        store.ensure_leases("lake", &shards).await.unwrap();
        let fresh = |key: &str, parents: Option<&str>| {
            let mut want = expect(&[
                ("leaseKey", &format!("S {key}")),
                ("leaseCounter", "N 0"),
                ("checkpoint", "S TRIM_HORIZON"),
                ("checkpointSubSequenceNumber", "N 0"),
                ("ownerSwitchesSinceCheckpoint", "N 0"),
            ]);
            if let Some(p) = parents {
                want.insert("parentShardId".into(), format!("SS {p}"));
            }
            want
        };
        let k0 = "lake:shardId-000000000000";
        let k3 = "lake:shardId-000000000003";
        let k4 = "lake:shardId-000000000004";
        assert_eq!(typed(&raw_item(c, &table, k0).await), fresh(k0, None));
        assert_eq!(
            typed(&raw_item(c, &table, k3).await),
            fresh(k3, Some("shardId-000000000001"))
        );
        assert_eq!(
            typed(&raw_item(c, &table, k4).await),
            fresh(k4, Some("shardId-000000000001,shardId-000000000002"))
        );

        // Taken: an owner, the counter moves.
        assert!(
            store
                .acquire_lease("lake", &shard(3), "worker-a")
                .await
                .unwrap()
        );
        let item = raw_item(c, &table, k3).await;
        assert_eq!(item["leaseOwner"], AttributeValue::S("worker-a".into()));
        assert_eq!(counter(&item), 1);

        // A composite: the Kinesis sequence in `checkpoint`, the subsequence apart.
        let sequence = composite(KINESIS, 17);
        store.commit("lake", &shard(3), &sequence).await.unwrap();
        let mut want = fresh(k3, Some("shardId-000000000001"));
        want.extend(expect(&[
            ("leaseOwner", "S worker-a"),
            ("leaseCounter", "N 2"),
            ("checkpoint", &format!("S {KINESIS}")),
            ("checkpointSubSequenceNumber", "N 17"),
            ("floodgateSequence", &format!("S {sequence}")),
        ]));
        assert_eq!(typed(&raw_item(c, &table, k3).await), want);

        // Renewing and releasing write the counter too; releasing keeps the checkpoint.
        assert!(
            store
                .renew_lease("lake", &shard(3), "worker-a")
                .await
                .unwrap()
        );
        assert_eq!(counter(&raw_item(c, &table, k3).await), 3);
        store
            .release_lease("lake", &shard(3), "worker-a")
            .await
            .unwrap();
        want.remove("leaseOwner");
        want.insert("leaseCounter".into(), "N 4".into());
        assert_eq!(typed(&raw_item(c, &table, k3).await), want);

        // A sequence too short to split (the embedded log's) is stored whole.
        assert!(
            store
                .acquire_lease("lake", &shard(0), "worker-a")
                .await
                .unwrap()
        );
        store.commit("lake", &shard(0), &seq(42)).await.unwrap();
        let item = typed(&raw_item(c, &table, k0).await);
        assert_eq!(item["checkpoint"], "S 42");
        assert_eq!(item["checkpointSubSequenceNumber"], "N 0");

        // A lease created by acquiring it starts as KCL's do, with its owner.
        assert!(
            store
                .acquire_lease("relay", &shard(9), "worker-r")
                .await
                .unwrap()
        );
        let key = "relay:shardId-000000000009";
        let mut want = fresh(key, None);
        want.extend(expect(&[
            ("leaseOwner", "S worker-r"),
            ("leaseCounter", "N 1"),
        ]));
        assert_eq!(typed(&raw_item(c, &table, key).await), want);

        // Syncing shards again writes nothing.
        let mut snapshots = Vec::new();
        for k in [k0, k3, k4] {
            snapshots.push((k, typed(&raw_item(c, &table, k).await)));
        }
        store.ensure_leases("lake", &shards).await.unwrap();
        for (k, was) in snapshots {
            assert_eq!(typed(&raw_item(c, &table, k).await), was, "{k}");
        }
    });
}

/// With a short lease duration (1 s): a lease renewed well within it is never taken, and
/// one that stops being renewed is taken by another store no sooner than that after the
/// last renewal it saw; the old holder then gets `false` on renew and cannot commit.
#[test]
fn an_unrenewed_lease_expires_and_a_renewed_one_does_not() {
    const DURATION: Duration = Duration::from_millis(1000);
    rt().block_on(async {
        let dynamo = Dynamo::new(DURATION);
        let table = dynamo.table().await;
        let a = Arc::new(dynamo.store(&table));
        let b = dynamo.store(&table);
        let s0 = shard(0);
        assert!(a.acquire_lease("lake", &s0, "worker-a").await.unwrap());
        a.commit("lake", &s0, &seq(5)).await.unwrap();

        // `a` renews every 100 ms for three lease durations; `b` keeps trying.
        let renewing = {
            let a = a.clone();
            let s0 = s0.clone();
            tokio::spawn(async move {
                let until = Instant::now() + DURATION * 3;
                let mut last = Instant::now();
                while Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    assert!(a.renew_lease("lake", &s0, "worker-a").await.unwrap());
                    last = Instant::now();
                }
                last
            })
        };
        while !renewing.is_finished() {
            assert!(
                !b.acquire_lease("lake", &s0, "worker-b").await.unwrap(),
                "a lease renewed every 100 ms was taken"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let last_renewal = renewing.await.unwrap();

        // `a` stops renewing.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.acquire_lease("lake", &s0, "worker-b").await.unwrap() {
            assert!(
                Instant::now() < deadline,
                "an unrenewed lease was not taken within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let taken_after = last_renewal.elapsed();
        assert!(
            taken_after >= DURATION,
            "taken {taken_after:?} after the last renewal, within the lease duration"
        );
        assert!(!a.renew_lease("lake", &s0, "worker-a").await.unwrap());
        let err = a.commit("lake", &s0, &seq(6)).await.unwrap_err();
        assert!(err.to_string().contains("lease"), "{err}");
        assert_eq!(b.checkpoint("lake", &s0).await.unwrap(), Some(seq(5)));
        b.commit("lake", &s0, &seq(6)).await.unwrap();
        assert_eq!(a.checkpoint("lake", &s0).await.unwrap(), Some(seq(6)));
    });
}

/// A live lease asked for to balance the workers: the request names the asker in
/// `floodgateHandoffTo` and moves no counter, so its holder renews and commits on; the
/// asker cannot take it until the holder hands it over; handed over, it names the asker
/// (an owner switch), the request is gone, nobody else may take it, and the old holder is
/// fenced out.
#[test]
fn a_lease_asked_for_stays_with_its_holder_until_handed_over() {
    rt().block_on(async {
        let dynamo = Dynamo::new(Duration::from_secs(10));
        let table = dynamo.table().await;
        let (a, b) = (dynamo.store(&table), dynamo.store(&table));
        let s0 = shard(0);
        let key = "lake:shardId-000000000000";
        assert!(
            !b.request_lease("lake", &s0, "worker-b").await.unwrap(),
            "nothing to ask for"
        );

        assert!(a.acquire_lease("lake", &s0, "worker-a").await.unwrap());
        assert!(
            !a.request_lease("lake", &s0, "worker-a").await.unwrap(),
            "its own lease"
        );
        a.commit("lake", &s0, &composite(KINESIS, 3)).await.unwrap();
        let before = raw_item(&dynamo.client, &table, key).await;

        assert!(b.request_lease("lake", &s0, "worker-b").await.unwrap());
        assert!(
            b.request_lease("lake", &s0, "worker-b").await.unwrap(),
            "asking again"
        );
        let item = raw_item(&dynamo.client, &table, key).await;
        assert_eq!(
            item["floodgateHandoffTo"],
            AttributeValue::S("worker-b".into())
        );
        assert_eq!(item["leaseOwner"], AttributeValue::S("worker-a".into()));
        assert_eq!(
            item["leaseCounter"], before["leaseCounter"],
            "a request is no write of the holder's"
        );
        assert!(!b.acquire_lease("lake", &s0, "worker-b").await.unwrap());
        assert!(a.renew_lease("lake", &s0, "worker-a").await.unwrap());
        a.commit("lake", &s0, &composite(KINESIS, 4)).await.unwrap();
        let listed = a.leases("lake").await.unwrap();
        assert_eq!(listed[0].owner.as_deref(), Some("worker-a"));
        assert_eq!(listed[0].handoff_to.as_deref(), Some("worker-b"));

        a.hand_over_lease("lake", &s0, "worker-a", "worker-b")
            .await
            .unwrap();
        let item = raw_item(&dynamo.client, &table, key).await;
        assert_eq!(item["leaseOwner"], AttributeValue::S("worker-b".into()));
        assert!(
            !item.contains_key("floodgateHandoffTo"),
            "the hand-over answers the request"
        );
        assert_eq!(
            item["ownerSwitchesSinceCheckpoint"],
            AttributeValue::N("1".into()),
            "a hand-over is an owner switch"
        );
        let third = dynamo.store(&table);
        assert!(
            !third.acquire_lease("lake", &s0, "worker-c").await.unwrap(),
            "a lease handed over is the asker's, not free"
        );
        assert!(b.acquire_lease("lake", &s0, "worker-b").await.unwrap());
        assert_eq!(
            b.checkpoint("lake", &s0).await.unwrap(),
            Some(composite(KINESIS, 4))
        );

        // The old holder is fenced out.
        assert!(!a.renew_lease("lake", &s0, "worker-a").await.unwrap());
        let err = a
            .commit("lake", &s0, &composite(KINESIS, 5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("lease"), "{err}");
        assert!(a.finish_shard("lake", &s0).await.is_err());
        assert!(!a.acquire_lease("lake", &s0, "worker-a").await.unwrap());

        // A request left over from an earlier tenure is not carried into the next one:
        // taking a lease removes it.
        assert!(a.request_lease("lake", &s0, "worker-a").await.unwrap());
        b.release_lease("lake", &s0, "worker-b").await.unwrap();
        dynamo
            .client
            .update_item()
            .table_name(&table)
            .key("leaseKey", AttributeValue::S(key.to_owned()))
            .update_expression("SET floodgateHandoffTo = :w")
            .expression_attribute_values(":w", AttributeValue::S("worker-c".into()))
            .send()
            .await
            .unwrap();
        assert!(a.acquire_lease("lake", &s0, "worker-a").await.unwrap());
        assert_eq!(a.leases("lake").await.unwrap()[0].handoff_to, None);
    });
}

/// `SHARD_END` is written as KCL writes it, `shard_finished` says so from any store,
/// `checkpoint` still answers the last real checkpoint (None if there was none), and a
/// later commit does not undo it.
#[test]
fn finish_shard_records_shard_end() {
    rt().block_on(async {
        let dynamo = Dynamo::new(Duration::from_secs(10));
        let table = dynamo.table().await;
        let (a, b) = (dynamo.store(&table), dynamo.store(&table));
        let (s0, s1) = (shard(0), shard(1));

        assert!(
            a.finish_shard("lake", &s0).await.is_err(),
            "ended without the lease"
        );
        assert!(a.acquire_lease("lake", &s0, "worker-a").await.unwrap());
        let last = composite(KINESIS, 9);
        a.commit("lake", &s0, &last).await.unwrap();
        assert!(!b.shard_finished("lake", &s0).await.unwrap());
        assert!(
            b.finish_shard("lake", &s0).await.is_err(),
            "ended without the lease"
        );
        a.finish_shard("lake", &s0).await.unwrap();
        a.finish_shard("lake", &s0).await.unwrap();

        let item = raw_item(&dynamo.client, &table, "lake:shardId-000000000000").await;
        assert_eq!(item["checkpoint"], AttributeValue::S("SHARD_END".into()));
        assert_eq!(
            item["checkpointSubSequenceNumber"],
            AttributeValue::N("0".into())
        );
        for store in [&a, &b] {
            assert!(store.shard_finished("lake", &s0).await.unwrap());
            assert_eq!(
                store.checkpoint("lake", &s0).await.unwrap(),
                Some(last.clone())
            );
        }
        a.commit("lake", &s0, &composite(KINESIS, 10))
            .await
            .unwrap();
        assert!(b.shard_finished("lake", &s0).await.unwrap());
        assert_eq!(b.checkpoint("lake", &s0).await.unwrap(), Some(last));
        assert!(b.leases("lake").await.unwrap()[0].finished);
        // Released, the shard stays finished.
        a.release_lease("lake", &s0, "worker-a").await.unwrap();
        assert!(b.shard_finished("lake", &s0).await.unwrap());

        // Ended with nothing committed: no checkpoint.
        assert!(a.acquire_lease("lake", &s1, "worker-a").await.unwrap());
        a.finish_shard("lake", &s1).await.unwrap();
        assert!(b.shard_finished("lake", &s1).await.unwrap());
        assert_eq!(b.checkpoint("lake", &s1).await.unwrap(), None);
        assert!(!b.shard_finished("lake", &shard(2)).await.unwrap());
    });
}

/// `leases` lists exactly one consumer's leases (not those of a consumer whose name it
/// prefixes), across Scan pages.
#[test]
fn listing_pages_through_the_table() {
    rt().block_on(async {
        let dynamo = Dynamo::new(Duration::from_secs(10));
        let table = dynamo.table().await;
        let store = dynamo.store(&table).with_scan_page_size(2);
        let infos = |n: usize| -> Vec<ShardInfo> {
            (0..n)
                .map(|i| ShardInfo {
                    id: shard(i),
                    parents: vec![],
                    closed: false,
                })
                .collect()
        };
        store.ensure_leases("lake", &infos(7)).await.unwrap();
        store.ensure_leases("bookings", &infos(5)).await.unwrap();
        store.ensure_leases("lake2", &infos(3)).await.unwrap();
        for (consumer, n) in [("lake", 7), ("bookings", 5), ("lake2", 3), ("relay", 0)] {
            let listed: Vec<ShardId> = store
                .leases(consumer)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.shard)
                .collect();
            assert_eq!(listed, (0..n).map(shard).collect::<Vec<_>>(), "{consumer}");
        }
    });
}

/// Created, then Exists, with KCL's key and on-demand billing; a table of that name with
/// another key is refused rather than used.
#[test]
fn ensure_table_is_idempotent() {
    rt().block_on(async {
        let moto = moto();
        let c = client(&moto.endpoint);
        assert_eq!(
            ensure_table(&c, "floodgate-leases").await.unwrap(),
            TableOutcome::Created
        );
        assert_eq!(
            ensure_table(&c, "floodgate-leases").await.unwrap(),
            TableOutcome::Exists
        );
        assert_eq!(TableOutcome::Exists.as_str(), "exists");
        let described = c
            .describe_table()
            .table_name("floodgate-leases")
            .send()
            .await
            .unwrap();
        let t = described.table().unwrap();
        let keys: Vec<_> = t
            .key_schema()
            .iter()
            .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
            .collect();
        assert_eq!(keys, vec![("leaseKey".to_owned(), KeyType::Hash)]);
        let attrs: Vec<_> = t
            .attribute_definitions()
            .iter()
            .map(|a| (a.attribute_name().to_owned(), a.attribute_type().clone()))
            .collect();
        assert_eq!(attrs, vec![("leaseKey".to_owned(), ScalarAttributeType::S)]);
        assert_eq!(
            t.billing_mode_summary().and_then(|b| b.billing_mode()),
            Some(&BillingMode::PayPerRequest)
        );

        c.create_table()
            .table_name("not-leases")
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .unwrap();
        let err = ensure_table(&c, "not-leases").await.unwrap_err();
        assert!(err.to_string().contains("not-leases"), "{err}");
        assert!(err.to_string().contains("leaseKey"), "{err}");
    });
}

/// A store whose table is missing, or whose endpoint does not answer, fails with
/// `Unavailable` naming DynamoDB and the table: an error, not a refusal.
#[test]
fn failures_are_unavailable_naming_dynamodb() {
    rt().block_on(async {
        let moto = moto();
        let missing = DynamoDbLeases::new(
            client(&moto.endpoint),
            "no-such-table",
            Duration::from_secs(10),
        );
        let err = missing
            .acquire_lease("lake", &shard(0), "worker-a")
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::Unavailable(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("DynamoDB") && msg.contains("no-such-table"),
            "{msg}"
        );
        assert!(msg.contains("ResourceNotFoundException"), "{msg}");

        // Nothing listens on a port just freed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let down = client(&format!("http://127.0.0.1:{port}"));
        let store = DynamoDbLeases::new(down.clone(), "floodgate-leases", Duration::from_secs(10));
        let err = store.checkpoint("lake", &shard(0)).await.unwrap_err();
        assert!(matches!(err, StreamError::Unavailable(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("DynamoDB") && msg.contains("floodgate-leases"),
            "{msg}"
        );
        let err = ensure_table(&down, "floodgate-leases").await.unwrap_err();
        assert!(err.to_string().contains("DynamoDB"), "{err}");
    });
}

/// A renewal or commit whose answer is lost (the connection reset after DynamoDB applied
/// it) moved the counter by this worker's own hand: the lease is still this worker's, and
/// the next write must say so, not report the lease lost. (Each lost answer used to cost
/// the shard's tenure, and with it what the lake had buffered.)
#[test]
fn a_write_whose_answer_was_lost_does_not_lose_the_lease() {
    use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Phase, Rule};
    rt().block_on(async {
        let moto = moto();
        let direct = client(&moto.endpoint);
        ensure_table(&direct, "lost-answers").await.unwrap();
        let proxy = FaultProxy::start(moto.addr).await.unwrap();
        let store = DynamoDbLeases::new(
            client(&proxy.endpoint()),
            "lost-answers",
            Duration::from_secs(10),
        );
        let (c, s) = ("bookings", shard(0));
        assert!(store.acquire_lease(c, &s, "me").await.unwrap());
        // The next renewal is applied, but its answer never arrives.
        proxy.set(
            FaultPlan::seeded(1)
                .rule(Rule::new("UpdateItem", Fault::Reset(Phase::AfterForwarding)).times(1)),
        );
        let _ = store.renew_lease(c, &s, "me").await;
        assert_eq!(proxy.injected().total(), 1, "the fault happened");
        assert!(
            store.renew_lease(c, &s, "me").await.unwrap(),
            "the lease is still this worker's"
        );
        store.commit(c, &s, &seq(7)).await.unwrap();
        assert_eq!(store.checkpoint(c, &s).await.unwrap(), Some(seq(7)));
        // Lost answers in a run: the write after the adoption loses its answer too (calls
        // 1 and 3 of UpdateItem; 2 and 4 are the SDK's retries, which find the counter
        // moved). Still this worker's lease.
        proxy.set(
            FaultPlan::seeded(2)
                .rule(Rule::new("UpdateItem", Fault::Reset(Phase::AfterForwarding)).times(1))
                .rule(
                    Rule::new("UpdateItem", Fault::Reset(Phase::AfterForwarding))
                        .every(2)
                        .times(1),
                ),
        );
        assert!(
            store.renew_lease(c, &s, "me").await.unwrap(),
            "two lost answers in a row lose no lease"
        );
        assert_eq!(proxy.injected().by_rule, vec![1, 1], "both faults happened");
        store.commit(c, &s, &seq(8)).await.unwrap();
        assert_eq!(store.checkpoint(c, &s).await.unwrap(), Some(seq(8)));
        // Someone else's write still means the lease is lost.
        direct
            .update_item()
            .table_name("lost-answers")
            .key("leaseKey", AttributeValue::S(format!("{c}:{}", s.0)))
            .update_expression("SET leaseOwner = :o ADD leaseCounter :one")
            .expression_attribute_values(":o", AttributeValue::S("other".into()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await
            .unwrap();
        assert!(!store.renew_lease(c, &s, "me").await.unwrap());
    });
}
