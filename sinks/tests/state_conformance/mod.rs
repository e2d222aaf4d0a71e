//! The conformance suite of the state role ([`StateStore`]), written once and run against
//! every backend: `sinks/tests/state_conformance.rs` over SQLite, `aws/tests/state.rs`
//! over DynamoDB on moto. "Passes the suite" means the same thing for both.
//!
//! What every store must do: an apply is all or nothing; a replay (an apply whose end the
//! position already covers) changes nothing and says so; an apply decided from another
//! position than the stored one is refused whole (fencing), also when it comes through
//! another store over the same backing (another worker); a booking id is claimed once
//! across shards; an inventory is written only over the row it was decided from, and
//! never oversold; sequence numbers compare as numbers, not strings; each outbox
//! partition numbers its entries one by one, never reusing a seq after entries are
//! published; dead letters are kept once; an apply as large as the store's limits goes
//! through.

use std::sync::Arc;

use async_trait::async_trait;
use floodgate_core::state::{
    ApplyLimits, Booking, BookingStatus, DeadLetter, Inventory, OutboxCursor, StateChanges,
    StateError, StateStore,
};
use floodgate_core::stream::{SequenceNumber, ShardId};

/// A backend under test.
#[async_trait]
pub trait StateFixture: Send + Sync {
    /// Names the backend in failure messages.
    fn name(&self) -> String;

    /// `n` stores over one fresh, empty backing, as `n` worker processes open it.
    async fn stores(&self, n: usize) -> Vec<Arc<dyn StateStore>>;
}

async fn one(f: &dyn StateFixture) -> Arc<dyn StateStore> {
    f.stores(1).await.pop().unwrap()
}

fn shard(s: &str) -> ShardId {
    ShardId(s.to_owned())
}

fn seq(n: u64) -> SequenceNumber {
    SequenceNumber::from_u64(n)
}

fn inventory(id: &str, capacity: i64, reserved: i64) -> Inventory {
    Inventory {
        event_id: id.to_owned(),
        capacity,
        reserved,
        low_notified: false,
        sold_out_notified: false,
        updated_at_ms: 1,
    }
}

fn booking(id: &str, event: &str, seats: i64, status: BookingStatus) -> Booking {
    Booking {
        booking_id: id.to_owned(),
        event_id: event.to_owned(),
        seats,
        status,
        reason: None,
        updated_at_ms: 2,
    }
}

/// Creates event `event` with `capacity` on `shard` at `at`, from `from`.
fn create(
    shard_id: &str,
    from: Option<SequenceNumber>,
    at: SequenceNumber,
    event: &str,
    capacity: i64,
) -> StateChanges {
    StateChanges {
        shard: shard(shard_id),
        last_sequence: at,
        expected_position: Some(from),
        inventories: vec![inventory(event, capacity, 0)],
        inventories_before: vec![None],
        derived: vec![format!(r#"{{"id":"created-{event}"}}"#)],
        ..StateChanges::default()
    }
}

/// Books `seats` of `event` (decided from `before`) as booking `id`.
fn book(
    shard_id: &str,
    from: Option<SequenceNumber>,
    at: SequenceNumber,
    before: &Inventory,
    id: &str,
    seats: i64,
) -> StateChanges {
    let mut after = before.clone();
    after.reserved += seats;
    StateChanges {
        shard: shard(shard_id),
        last_sequence: at,
        expected_position: Some(from),
        inventories: vec![after],
        inventories_before: vec![Some(before.clone())],
        bookings: vec![booking(
            id,
            &before.event_id,
            seats,
            BookingStatus::Confirmed,
        )],
        created_bookings: vec![id.to_owned()],
        derived: vec![format!(r#"{{"id":"confirmed-{id}"}}"#)],
        ..StateChanges::default()
    }
}

async fn outbox_events(store: &dyn StateStore) -> Vec<(String, u64, Vec<String>)> {
    store
        .outbox_after(&OutboxCursor::new(), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.partition, e.seq, e.events))
        .collect()
}

pub async fn an_apply_is_read_back(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    assert_eq!(store.position(&shard("s0")).await.unwrap(), None, "{name}");
    assert!(
        store
            .apply(create("s0", None, seq(5), "E", 10))
            .await
            .unwrap()
    );
    let e = store.inventory("E").await.unwrap().unwrap();
    assert_eq!(e, inventory("E", 10, 0), "{name}");
    assert!(
        store
            .apply(book("s0", Some(seq(5)), seq(7), &e, "B1", 3))
            .await
            .unwrap()
    );
    assert_eq!(store.position(&shard("s0")).await.unwrap(), Some(seq(7)));
    assert_eq!(store.inventory("E").await.unwrap().unwrap().reserved, 3);
    assert_eq!(
        store.booking("B1").await.unwrap().unwrap(),
        booking("B1", "E", 3, BookingStatus::Confirmed),
        "{name}"
    );
    assert_eq!(store.inventory("nope").await.unwrap(), None);
    assert_eq!(store.booking("nope").await.unwrap(), None);
    let (inv, books) = store
        .load(
            vec!["E".into(), "missing".into()],
            vec!["B1".into(), "B9".into()],
        )
        .await
        .unwrap();
    assert_eq!(inv, vec![inventory("E", 10, 3)], "{name}");
    assert_eq!(books.len(), 1, "{name}: only the booking that exists");
}

pub async fn a_replay_changes_nothing(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    assert!(
        store
            .apply(create("s0", None, seq(5), "E", 10))
            .await
            .unwrap()
    );
    let e = store.inventory("E").await.unwrap().unwrap();
    let changes = book("s0", Some(seq(5)), seq(9), &e, "B1", 4);
    assert!(store.apply(changes.clone()).await.unwrap());
    // The same apply again, and one that ends inside what is applied: both replays.
    assert!(!store.apply(changes.clone()).await.unwrap(), "{name}");
    let mut inside = changes.clone();
    inside.last_sequence = seq(8);
    inside.expected_position = Some(Some(seq(5)));
    assert!(!store.apply(inside).await.unwrap(), "{name}");
    assert_eq!(store.inventory("E").await.unwrap().unwrap().reserved, 4);
    assert_eq!(
        outbox_events(&*store).await.len(),
        2,
        "{name}: one entry per apply"
    );
}

pub async fn an_apply_from_another_position_is_refused_whole(f: &dyn StateFixture) {
    let stores = f.stores(2).await;
    let (a, b) = (&stores[0], &stores[1]);
    let name = f.name();
    assert!(a.apply(create("s0", None, seq(5), "E", 10)).await.unwrap());
    let e = a.inventory("E").await.unwrap().unwrap();
    // Worker B decided from the shard's start, as if it never saw A's apply: refused,
    // though B itself never read the position (nothing cached to go by).
    let stale = book("s0", None, seq(9), &e, "B1", 4);
    let err = b.apply(stale).await.unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    // Decided from a position the shard never had: refused too.
    let wrong = book("s0", Some(seq(6)), seq(9), &e, "B1", 4);
    let err = a.apply(wrong).await.unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    assert_eq!(a.position(&shard("s0")).await.unwrap(), Some(seq(5)));
    assert_eq!(b.booking("B1").await.unwrap(), None, "{name}");
    assert_eq!(b.inventory("E").await.unwrap().unwrap().reserved, 0);
    assert_eq!(outbox_events(&**b).await.len(), 1, "{name}");
    // B, now deciding from the stored position, applies; then A, whose cache is stale.
    assert!(
        b.apply(book("s0", Some(seq(5)), seq(9), &e, "B1", 4))
            .await
            .unwrap()
    );
    let e2 = b.inventory("E").await.unwrap().unwrap();
    let err = a
        .apply(book("s0", Some(seq(5)), seq(12), &e2, "B2", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    assert!(
        a.apply(book("s0", Some(seq(9)), seq(12), &e2, "B2", 1))
            .await
            .unwrap()
    );
    assert_eq!(a.inventory("E").await.unwrap().unwrap().reserved, 5);
}

pub async fn a_booking_id_is_claimed_once_across_shards(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    assert!(
        store
            .apply(create("s0", None, seq(1), "E", 10))
            .await
            .unwrap()
    );
    assert!(
        store
            .apply(create("s1", None, seq(1), "F", 10))
            .await
            .unwrap()
    );
    let e = store.inventory("E").await.unwrap().unwrap();
    let f_inv = store.inventory("F").await.unwrap().unwrap();
    assert!(
        store
            .apply(book("s0", Some(seq(1)), seq(2), &e, "B", 2))
            .await
            .unwrap()
    );
    let err = store
        .apply(book("s1", Some(seq(1)), seq(2), &f_inv, "B", 3))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    // Nothing of the refused apply: F's seats, s1's position, its outbox entry.
    assert_eq!(store.inventory("F").await.unwrap().unwrap().reserved, 0);
    assert_eq!(store.position(&shard("s1")).await.unwrap(), Some(seq(1)));
    assert_eq!(store.booking("B").await.unwrap().unwrap().event_id, "E");
    assert_eq!(outbox_events(&*store).await.len(), 3, "{name}");
}

pub async fn inventories_are_written_only_over_what_was_decided_from(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    assert!(
        store
            .apply(create("s0", None, seq(1), "E", 10))
            .await
            .unwrap()
    );
    // Decided from a row that is not the stored one (reserved 2, stored 0): refused.
    let stale = book("s0", Some(seq(1)), seq(2), &inventory("E", 10, 2), "B", 8);
    let err = store.apply(stale).await.unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    // Creating an inventory that exists: refused.
    let err = store
        .apply(create("s0", Some(seq(1)), seq(2), "E", 99))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict(_)), "{name}: {err}");
    // Oversold: refused, whatever it was decided from.
    let e = store.inventory("E").await.unwrap().unwrap();
    let err = store
        .apply(book("s0", Some(seq(1)), seq(2), &e, "B", 11))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Corrupt(_)), "{name}: {err}");
    assert_eq!(store.inventory("E").await.unwrap().unwrap(), e, "{name}");
    assert_eq!(store.booking("B").await.unwrap(), None, "{name}");
    assert_eq!(store.position(&shard("s0")).await.unwrap(), Some(seq(1)));
    assert!(
        store
            .apply(book("s0", Some(seq(1)), seq(2), &e, "B", 10))
            .await
            .unwrap()
    );
}

pub async fn sequence_numbers_compare_as_numbers(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    // Kinesis sequence numbers: 56 digits; "9…" sorts after "10…" as a string.
    let low = SequenceNumber::new(format!("9{}", "0".repeat(54)));
    let high = SequenceNumber::new(format!("1{}", "0".repeat(55)));
    assert!(
        store
            .apply(create("s0", None, low.clone(), "E", 10))
            .await
            .unwrap()
    );
    let e = store.inventory("E").await.unwrap().unwrap();
    assert!(
        store
            .apply(book("s0", Some(low.clone()), high.clone(), &e, "B", 1))
            .await
            .unwrap(),
        "{name}: a longer sequence number is later"
    );
    assert_eq!(
        store.position(&shard("s0")).await.unwrap(),
        Some(high.clone())
    );
    let mut replay = book(
        "s0",
        Some(low),
        SequenceNumber::new(format!("95{}", "0".repeat(53))),
        &e,
        "C",
        1,
    );
    replay.expected_position = Some(Some(high));
    assert!(!store.apply(replay).await.unwrap(), "{name}: covered");
}

pub async fn each_outbox_partition_counts_on_and_forgets_what_is_published(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    let mut positions = std::collections::HashMap::new();
    for (i, s) in ["s0", "s1", "s0", "s0", "s1"].iter().enumerate() {
        let from = positions.get(s).cloned();
        let at = seq(10 + i as u64);
        let changes = StateChanges {
            shard: shard(s),
            last_sequence: at.clone(),
            expected_position: Some(from),
            derived: vec![format!("{s}-{i}-a"), format!("{s}-{i}-b")],
            ..StateChanges::default()
        };
        assert!(store.apply(changes).await.unwrap());
        positions.insert(*s, at);
    }
    // An apply that derives nothing adds no entry.
    let quiet = StateChanges {
        shard: shard("s0"),
        last_sequence: seq(99),
        expected_position: Some(positions.get("s0").cloned()),
        ..StateChanges::default()
    };
    assert!(store.apply(quiet).await.unwrap());
    let all = outbox_events(&*store).await;
    assert_eq!(all.len(), 5, "{name}: {all:?}");
    let partitions: std::collections::BTreeSet<&str> =
        all.iter().map(|(p, _, _)| p.as_str()).collect();
    // Each partition numbers its own entries 1, 2, 3, … in apply order; a one-partition
    // store numbers them all.
    for p in &partitions {
        let mine: Vec<&(String, u64, Vec<String>)> =
            all.iter().filter(|(q, _, _)| q == p).collect();
        let want: Vec<u64> = (1..=mine.len() as u64).collect();
        assert_eq!(
            mine.iter().map(|e| e.1).collect::<Vec<_>>(),
            want,
            "{name}: partition {p:?}"
        );
        for e in &mine {
            assert_eq!(e.2.len(), 2, "{name}: both events of an entry");
        }
    }
    // The cursor: entries beyond it, in each partition.
    let mut cursor = OutboxCursor::new();
    for p in &partitions {
        cursor.insert((*p).to_owned(), 1);
    }
    let rest = store.outbox_after(&cursor, 100).await.unwrap();
    assert_eq!(rest.len(), 5 - partitions.len(), "{name}");
    assert!(rest.iter().all(|e| e.seq > 1));
    // `max` bounds the answer.
    assert_eq!(
        store
            .outbox_after(&OutboxCursor::new(), 2)
            .await
            .unwrap()
            .len(),
        2
    );
    // Published entries are forgotten; seqs go on from where they were.
    store.outbox_published(&cursor).await.unwrap();
    assert_eq!(
        store
            .outbox_after(&OutboxCursor::new(), 100)
            .await
            .unwrap()
            .len(),
        5 - partitions.len(),
        "{name}"
    );
    let s0 = all
        .iter()
        .find(|e| e.2[0].starts_with("s0"))
        .unwrap()
        .0
        .clone();
    let top = all.iter().filter(|e| e.0 == s0).map(|e| e.1).max().unwrap();
    let more = StateChanges {
        shard: shard("s0"),
        last_sequence: seq(100),
        expected_position: Some(Some(seq(99))),
        derived: vec!["s0-late".into()],
        ..StateChanges::default()
    };
    assert!(store.apply(more).await.unwrap());
    store
        .outbox_published(&OutboxCursor::from([(s0.clone(), top)]))
        .await
        .unwrap();
    let left = store.outbox_after(&OutboxCursor::new(), 100).await.unwrap();
    let late: Vec<_> = left.iter().filter(|e| e.partition == s0).collect();
    assert_eq!(late.len(), 1, "{name}: {left:?}");
    assert_eq!(late[0].seq, top + 1, "{name}: a seq is never reused");
    assert_eq!(late[0].events, vec!["s0-late".to_owned()]);
}

pub async fn dead_letters_are_kept_once(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    let dead = |s: &str, n: u64| DeadLetter {
        shard: shard(s),
        sequence: seq(n),
        reason: "undecodable".into(),
        detail: format!("record {n}"),
        payload: format!("{{not json {n}"),
    };
    let changes = StateChanges {
        shard: shard("s0"),
        last_sequence: seq(12),
        expected_position: Some(None),
        dead_letters: vec![dead("s0", 3), dead("s0", 12)],
        ..StateChanges::default()
    };
    assert!(store.apply(changes.clone()).await.unwrap());
    assert!(!store.apply(changes).await.unwrap());
    let got = store.dead_letters(100).await.unwrap();
    assert_eq!(got, vec![dead("s0", 3), dead("s0", 12)], "{name}");
    assert_eq!(store.dead_letters(1).await.unwrap().len(), 1);
}

pub async fn an_apply_as_large_as_the_limits_goes_through(f: &dyn StateFixture) {
    let store = one(f).await;
    let name = f.name();
    let limits = store.limits();
    // At most 100 items: every store takes that many (DynamoDB's transaction size).
    let n = limits.max_items.min(100) - ApplyLimits::FIXED_ITEMS;
    let events: Vec<Inventory> = (0..n / 2)
        .map(|i| inventory(&format!("E{i}"), 5, 1))
        .collect();
    let bookings: Vec<Booking> = (0..n - n / 2)
        .map(|i| booking(&format!("B{i}"), "E0", 1, BookingStatus::Confirmed))
        .collect();
    let changes = StateChanges {
        shard: shard("s0"),
        last_sequence: seq(1),
        expected_position: Some(None),
        inventories_before: vec![None; events.len()],
        inventories: events,
        created_bookings: bookings.iter().map(|b| b.booking_id.clone()).collect(),
        bookings,
        derived: vec!["x".repeat(200); 100],
        ..StateChanges::default()
    };
    assert_eq!(changes.items(), n + ApplyLimits::FIXED_ITEMS);
    assert!(changes.approx_bytes() <= limits.max_bytes, "{name}");
    assert!(store.apply(changes).await.unwrap(), "{name}");
    assert!(
        store
            .booking(&format!("B{}", n - n / 2 - 1))
            .await
            .unwrap()
            .is_some()
    );
}
