//! The DynamoDB state table on moto server: the state conformance suite
//! (`sinks/tests/state_conformance/`), and what only DynamoDB does — the table's layout,
//! creating it, and throttling told apart from failure. Each test starts its own moto
//! server (`scripts/emulators` installs it).
#![cfg(feature = "emulator-tests")]

#[path = "../../sinks/tests/state_conformance/mod.rs"]
mod state_conformance;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::leases::TableOutcome;
use floodgate_aws::state::{DynamoDbStateStore, ensure_table};
use floodgate_core::state::{Inventory, OutboxCursor, StateChanges, StateStore};
use floodgate_core::stream::{SequenceNumber, ShardId};
use state_conformance::StateFixture;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Stores over fresh tables of one moto server.
struct Dynamo {
    moto: Emulator,
    client: Client,
    tables: AtomicUsize,
}

impl Dynamo {
    fn new() -> Self {
        let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
        let client = moto.dynamodb_client();
        Self {
            moto,
            client,
            tables: AtomicUsize::new(0),
        }
    }

    async fn table(&self) -> String {
        let name = format!("state-{}", self.tables.fetch_add(1, Ordering::Relaxed));
        assert_eq!(
            ensure_table(&self.client, &name).await.unwrap(),
            TableOutcome::Created
        );
        name
    }
}

#[async_trait]
impl StateFixture for Dynamo {
    fn name(&self) -> String {
        "DynamoDbStateStore".into()
    }

    async fn stores(&self, n: usize) -> Vec<Arc<dyn StateStore>> {
        let table = self.table().await;
        (0..n)
            .map(|_| {
                // Each worker its own client, as each process has.
                Arc::new(DynamoDbStateStore::new(self.moto.dynamodb_client(), &table))
                    as Arc<dyn StateStore>
            })
            .collect()
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {$(
        #[test]
        fn $test() {
            rt().block_on(state_conformance::$test(&Dynamo::new()));
        }
    )*};
}

conformance!(
    an_apply_is_read_back,
    a_replay_changes_nothing,
    an_apply_from_another_position_is_refused_whole,
    a_booking_id_is_claimed_once_across_shards,
    inventories_are_written_only_over_what_was_decided_from,
    sequence_numbers_compare_as_numbers,
    each_outbox_partition_counts_on_and_forgets_what_is_published,
    dead_letters_are_kept_once,
    an_apply_as_large_as_the_limits_goes_through,
);

/// The items are where the README's table design says: `EVENT#<id>`/`INVENTORY`,
/// `BOOKING#<id>`/`BOOKING`, `SHARD#<id>`/`POSITION` with the shard's outbox seq, and the
/// outbox entry under `OUTBOX#<id>` with a 20-digit seq.
#[test]
fn items_follow_the_documented_layout() {
    let d = Dynamo::new();
    rt().block_on(async {
        let table = d.table().await;
        let store = DynamoDbStateStore::new(d.client.clone(), &table);
        let changes = StateChanges {
            shard: ShardId("shardId-000000000001".into()),
            last_sequence: SequenceNumber::new(
                "49590338271490256608559692538361571095921575989136588898000003",
            ),
            expected_position: Some(None),
            inventories: vec![Inventory {
                event_id: "E1".into(),
                capacity: 10,
                reserved: 0,
                low_notified: false,
                sold_out_notified: false,
                updated_at_ms: 7,
            }],
            inventories_before: vec![None],
            derived: vec!["{}".into()],
            ..StateChanges::default()
        };
        assert!(store.apply(changes).await.unwrap());
        let get = |pk: &str, sk: &str| {
            let (pk, sk) = (pk.to_owned(), sk.to_owned());
            let client = d.client.clone();
            let table = table.clone();
            async move {
                client
                    .get_item()
                    .table_name(table)
                    .key("pk", AttributeValue::S(pk))
                    .key("sk", AttributeValue::S(sk))
                    .send()
                    .await
                    .unwrap()
                    .item
            }
        };
        let inv = get("EVENT#E1", "INVENTORY").await.unwrap();
        assert_eq!(inv["capacity"], AttributeValue::N("10".into()));
        assert_eq!(inv["reserved"], AttributeValue::N("0".into()));
        let pos = get("SHARD#shardId-000000000001", "POSITION").await.unwrap();
        assert_eq!(
            pos["sequence"],
            AttributeValue::S(
                "49590338271490256608559692538361571095921575989136588898000003".into()
            ),
            "sequence numbers are stored as strings, whole"
        );
        assert_eq!(pos["outboxSeq"], AttributeValue::N("1".into()));
        let entry = get("OUTBOX#shardId-000000000001", "00000000000000000001")
            .await
            .unwrap();
        assert_eq!(entry["events"], AttributeValue::S("{}".into()));
        assert!(
            get("SHARDS", "SHARDS").await.is_some(),
            "the shard registry"
        );
    });
}

/// `ensure_table` creates once, then finds it; a table with another key is refused.
#[test]
fn the_table_is_created_once_and_checked() {
    let d = Dynamo::new();
    rt().block_on(async {
        assert_eq!(
            ensure_table(&d.client, "st").await.unwrap(),
            TableOutcome::Created
        );
        assert_eq!(
            ensure_table(&d.client, "st").await.unwrap(),
            TableOutcome::Exists
        );
        floodgate_aws::leases::ensure_table(&d.client, "leases")
            .await
            .unwrap();
        let err = ensure_table(&d.client, "leases").await.unwrap_err();
        assert!(err.to_string().contains("not a state table"), "{err}");
    });
}

/// A shard the registry item lost is written into it again by the store's next apply after
/// the refresh interval, so the relay finds its outbox late, not never, as long as the shard
/// is applied to. moto loses entries
/// this way: its `UpdateItem` is not atomic, and two first `ADD`s on the missing item can
/// both read nothing, the second write dropping the first's shard. The test loses the entry
/// by overwriting the item, as that second write does. Its control, a store that never
/// refreshes, shows the overwrite hides the shard.
#[test]
fn a_shard_lost_from_the_registry_is_written_again() {
    let d = Dynamo::new();
    rt().block_on(async {
        for (refresh, found) in [
            (Duration::from_millis(200), true),
            (Duration::from_secs(3600), false),
        ] {
            let table = d.table().await;
            let store =
                DynamoDbStateStore::new(d.client.clone(), &table).with_registry_refresh(refresh);
            let shard = "shardId-000000000001";
            let apply = |n: u64, derived: &str| StateChanges {
                shard: ShardId(shard.into()),
                last_sequence: SequenceNumber::from_u64(n),
                expected_position: Some((n > 1).then(|| SequenceNumber::from_u64(n - 1))),
                derived: vec![derived.into()],
                ..StateChanges::default()
            };
            assert!(store.apply(apply(1, "a")).await.unwrap());
            d.client
                .put_item()
                .table_name(&table)
                .item("pk", AttributeValue::S("SHARDS".into()))
                .item("sk", AttributeValue::S("SHARDS".into()))
                .item(
                    "shards",
                    AttributeValue::Ss(vec!["shardId-000000000000".into()]),
                )
                .send()
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(store.apply(apply(2, "b")).await.unwrap());
            let mine: Vec<Vec<String>> = store
                .outbox_after(&OutboxCursor::new(), 100)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.partition == shard)
                .map(|e| e.events)
                .collect();
            let want = if found {
                vec![vec!["a".to_owned()], vec!["b".to_owned()]]
            } else {
                vec![]
            };
            assert_eq!(mine, want, "refreshed every {refresh:?}");
        }
    });
}
