//! Model-based property test of the bookings rules through the real processor and the
//! real SQLite store: random interleavings of creates, capacity changes, requests (with
//! repeated bookingIds), cancellations and payments, applied in random batches with
//! replays of whole batches, must end in the state a plain in-memory model computes, with
//! reserved never above capacity, and each booking decided (and announced) once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use floodgate_core::state::{
    ApplyLimits, Booking, BookingStatus, DeadLetter, Inventory, OutboxCursor, OutboxEntry,
    Publisher, StateChanges, StateError, StateStore,
};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::bookings::BookingsProcessor;
use floodgate_processors::relay;
use floodgate_sinks::{EmbeddedOutbox, SqliteStateStore};
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
enum Op {
    Create(u8, i64),
    Change(u8, i64),
    Request(u8, u8, i64),
    Cancel(u8, u8),
    PayOk(u8, u8),
    PayFail(u8, u8),
    Checkin(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u8..3, 0i64..15).prop_map(|(e, c)| Op::Create(e, c)),
        1 => (0u8..3, 0i64..15).prop_map(|(e, c)| Op::Change(e, c)),
        6 => (0u8..10, 0u8..3, 1i64..6).prop_map(|(b, e, s)| Op::Request(b, e, s)),
        2 => (0u8..10, 0u8..3).prop_map(|(b, e)| Op::Cancel(b, e)),
        1 => (0u8..10, 0u8..3).prop_map(|(b, e)| Op::PayOk(b, e)),
        1 => (0u8..10, 0u8..3).prop_map(|(b, e)| Op::PayFail(b, e)),
        1 => (0u8..10, 0u8..3).prop_map(|(b, e)| Op::Checkin(b, e)),
    ]
}

fn event(op: &Op) -> Value {
    let (ty, data) = match *op {
        Op::Create(e, c) => (
            "inventory.event.created",
            json!({"eventId": format!("E{e}"), "name":"n","venue":"v","startsAt":"2026-12-01T20:00:00Z","capacity": c}),
        ),
        Op::Change(e, c) => (
            "inventory.capacity.changed",
            json!({"eventId": format!("E{e}"), "capacity": c}),
        ),
        Op::Request(b, e, s) => (
            "booking.requested",
            json!({"bookingId": format!("B{b}"), "eventId": format!("E{e}"), "customerId":"c","seats": s,"requestedAt":"2026-11-22T10:00:00Z"}),
        ),
        Op::Cancel(b, e) => (
            "booking.cancelled",
            json!({"bookingId": format!("B{b}"), "eventId": format!("E{e}")}),
        ),
        Op::PayOk(b, e) => (
            "payment.succeeded",
            json!({"paymentId":"p","bookingId": format!("B{b}"), "eventId": format!("E{e}"),"amountMinor":1,"currency":"EUR"}),
        ),
        Op::PayFail(b, e) => (
            "payment.failed",
            json!({"paymentId":"p","bookingId": format!("B{b}"), "eventId": format!("E{e}"),"code":"x"}),
        ),
        Op::Checkin(b, e) => (
            "checkin.scanned",
            json!({"bookingId": format!("B{b}"), "eventId": format!("E{e}"),"gate":"g","scannedAt":"2026-12-01T19:00:00Z"}),
        ),
    };
    json!({"specversion":"1.0","id":"x","source":"/t","type":ty,"data":data})
}

/// The plain model: a direct reading of the rules, one event at a time.
#[derive(Default, Debug)]
struct Model {
    inv: BTreeMap<u8, (i64, i64)>, // capacity, reserved
    bookings: BTreeMap<u8, (u8, i64, BookingStatus)>,
    /// Requests refused because another event's booking holds their bookingId.
    duplicate_ids: usize,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create(e, c) => {
                self.inv.entry(e).or_insert((c, 0));
            }
            Op::Change(e, c) => {
                if let Some((cap, res)) = self.inv.get_mut(&e)
                    && c >= *res
                {
                    *cap = c;
                }
            }
            Op::Request(b, e, s) => {
                if let Some((be, _, _)) = self.bookings.get(&b) {
                    if *be != e {
                        self.duplicate_ids += 1;
                    }
                    return;
                }
                let status = match self.inv.get_mut(&e) {
                    Some((cap, res)) if s <= *cap - *res => {
                        *res += s;
                        BookingStatus::Confirmed
                    }
                    _ => BookingStatus::Rejected,
                };
                self.bookings.insert(b, (e, s, status));
            }
            Op::Cancel(b, e) | Op::PayFail(b, e) => {
                if let Some((be, s, st)) = self.bookings.get_mut(&b)
                    && *be == e
                    && matches!(st, BookingStatus::Confirmed | BookingStatus::Paid)
                {
                    *st = BookingStatus::Cancelled;
                    if let Some((_, res)) = self.inv.get_mut(&e) {
                        *res -= *s;
                    }
                }
            }
            Op::PayOk(b, e) => {
                if let Some((be, _, st)) = self.bookings.get_mut(&b)
                    && *be == e
                    && *st == BookingStatus::Confirmed
                {
                    *st = BookingStatus::Paid;
                }
            }
            Op::Checkin(..) => {}
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A store under the model test, and where its published events are read back.
struct Rig {
    store: Arc<dyn StateStore>,
    publisher: Arc<dyn Publisher>,
    published: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

/// SQLite, published through the embedded outbox log; `limits` (if any) makes the
/// processor slice batches into small applies.
fn sqlite(limits: Option<ApplyLimits>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStateStore::open(&dir.path().join("state.db")).unwrap();
    let store: Arc<dyn StateStore> = match limits {
        None => Arc::new(sqlite),
        Some(l) => Arc::new(Limited(sqlite, l)),
    };
    let outbox_dir = dir.path().join("outbox");
    let publisher = Arc::new(EmbeddedOutbox::open(&outbox_dir).unwrap());
    Rig {
        store,
        publisher,
        published: Box::new(move || floodgate_sinks::outbox::read_events(&outbox_dir).unwrap()),
        _keep: vec![Box::new(dir)],
    }
}

/// A store that takes at most `.1` at once: the processor must slice.
#[derive(Debug)]
struct Limited<S>(S, ApplyLimits);

#[async_trait::async_trait]
impl<S: StateStore> StateStore for Limited<S> {
    fn limits(&self) -> ApplyLimits {
        self.1
    }
    async fn position(&self, shard: &ShardId) -> Result<Option<SequenceNumber>, StateError> {
        self.0.position(shard).await
    }
    async fn load(
        &self,
        event_ids: Vec<String>,
        booking_ids: Vec<String>,
    ) -> Result<(Vec<Inventory>, Vec<Booking>), StateError> {
        self.0.load(event_ids, booking_ids).await
    }
    async fn apply(&self, changes: StateChanges) -> Result<bool, StateError> {
        assert!(
            changes.items() <= self.1.max_items,
            "an apply over the limits: {} items",
            changes.items()
        );
        self.0.apply(changes).await
    }
    async fn inventory(&self, event_id: &str) -> Result<Option<Inventory>, StateError> {
        self.0.inventory(event_id).await
    }
    async fn booking(&self, booking_id: &str) -> Result<Option<Booking>, StateError> {
        self.0.booking(booking_id).await
    }
    async fn outbox_after(
        &self,
        cursor: &OutboxCursor,
        max: usize,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        self.0.outbox_after(cursor, max).await
    }
    async fn outbox_published(&self, upto: &OutboxCursor) -> Result<(), StateError> {
        self.0.outbox_published(upto).await
    }
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, StateError> {
        self.0.dead_letters(max).await
    }
}

/// The model test's body, over any store.
async fn matches_the_model(rig: Rig, ops: &[Op], cuts: &[usize], replays: &[bool]) {
    let store = rig.store.clone();
    let processor = BookingsProcessor::new(store.clone());
    let outbox = &*rig.publisher;
    let shard = ShardId("0".into());
    let records: Vec<StoredRecord> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| StoredRecord {
            sequence: SequenceNumber::from_u64(i as u64),
            key: "k".into(),
            payload: Bytes::from(event(op).to_string()),
            appended_at_ms: 1_700_000_000_000 + i as i64,
        })
        .collect();
    let mut model = Model::default();
    let mut start = 0;
    let mut prev: Option<(usize, usize)> = None;
    let mut cut = cuts.iter().cycle();
    let mut replay = replays.iter().cycle();
    let mut last = None;
    while start < records.len() {
        let end = (start + cut.next().unwrap()).min(records.len());
        // Sometimes the consumer re-reads from an older position: the previous
        // batch again, whole, or overlapping the new one.
        if let Some((ps, pe)) = prev
            && *replay.next().unwrap()
        {
            let applied = processor
                .apply_batch(&shard, &records[ps..pe])
                .await
                .unwrap();
            assert!(!applied, "a replayed batch changed state");
            if *replay.next().unwrap() {
                processor
                    .apply_batch(&shard, &records[ps..end])
                    .await
                    .unwrap();
                for op in &ops[start..end] {
                    model.apply(op);
                }
                prev = Some((start, end));
                start = end;
                relay::relay_once(&*store, outbox, &mut last).await.unwrap();
                continue;
            }
        }
        processor
            .apply_batch(&shard, &records[start..end])
            .await
            .unwrap();
        for op in &ops[start..end] {
            model.apply(op);
        }
        // Relay now and then, as the live relay would.
        if *replay.next().unwrap() {
            relay::relay_once(&*store, outbox, &mut last).await.unwrap();
        }
        prev = Some((start, end));
        start = end;
    }
    while relay::relay_once(&*store, outbox, &mut None).await.unwrap() > 0 {}

    for e in 0u8..3 {
        let got = store.inventory(&format!("E{e}")).await.unwrap();
        match model.inv.get(&e) {
            None => assert!(got.is_none()),
            Some(&(cap, res)) => {
                let got = got.unwrap();
                assert_eq!((got.capacity, got.reserved), (cap, res), "E{e}");
                assert!(got.reserved <= got.capacity && got.remaining() >= 0);
            }
        }
    }
    for b in 0u8..10 {
        let got = store.booking(&format!("B{b}")).await.unwrap();
        match model.bookings.get(&b) {
            None => assert!(got.is_none()),
            Some(&(e, s, st)) => {
                let got = got.unwrap();
                assert_eq!(
                    (got.event_id.as_str(), got.seats, got.status),
                    (format!("E{e}").as_str(), s, st),
                    "B{b}"
                );
            }
        }
    }
    // Each booking is announced decided exactly once.
    let events = (rig.published)();
    let mut decisions: HashMap<String, usize> = HashMap::new();
    let mut duplicate_ids = 0;
    for e in &events {
        let v: Value = serde_json::from_str(e).unwrap();
        let ty = v["type"].as_str().unwrap();
        if ty == "booking.rejected" && v["data"]["reason"] == "duplicate_booking_id" {
            duplicate_ids += 1;
        } else if ty == "booking.confirmed" || ty == "booking.rejected" {
            *decisions
                .entry(v["data"]["bookingId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(
        duplicate_ids, model.duplicate_ids,
        "duplicate bookingId refusals"
    );
    assert_eq!(decisions.len(), model.bookings.len());
    assert!(decisions.values().all(|&n| n == 1), "{decisions:?}");
    let mut ids: Vec<&str> = events.iter().map(|e| e.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        events.len(),
        "a derived event was published twice"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn processor_matches_the_model(
        ops in proptest::collection::vec(op(), 1..120),
        cuts in proptest::collection::vec(1usize..20, 1..40),
        replays in proptest::collection::vec(any::<bool>(), 40),
    ) {
        rt().block_on(matches_the_model(sqlite(None), &ops, &cuts, &replays));
    }

    /// The same, with every batch sliced into applies of at most 7 items (2 fixed, so
    /// one to two records each): slices applied one by one change exactly what the whole
    /// batch would, replays included.
    #[test]
    fn processor_matches_the_model_in_slices(
        ops in proptest::collection::vec(op(), 1..120),
        cuts in proptest::collection::vec(1usize..20, 1..40),
        replays in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let limits = ApplyLimits { max_items: 7, max_bytes: usize::MAX };
        rt().block_on(matches_the_model(sqlite(Some(limits)), &ops, &cuts, &replays));
    }
}

/// The model test against DynamoDB (moto server), sliced to small transactions, with the
/// relay publishing to a collector of the entries (DynamoDB's outbox has one partition
/// per shard, which the embedded outbox log does not take).
#[cfg(feature = "emulator-tests")]
mod dynamodb {
    use super::*;
    use floodgate_aws::emulator;
    use floodgate_aws::state::{DynamoDbStateStore, ensure_table};
    use floodgate_core::state::PublishError;
    use std::sync::Mutex;

    /// Keeps what is published, and its position, in memory: a destination that can be
    /// read back.
    #[derive(Debug, Default)]
    struct Collected {
        events: Mutex<Vec<String>>,
        cursor: Mutex<OutboxCursor>,
    }

    #[async_trait::async_trait]
    impl Publisher for Collected {
        async fn last_published(&self) -> Result<OutboxCursor, PublishError> {
            Ok(self.cursor.lock().unwrap().clone())
        }
        async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
            let mut cursor = self.cursor.lock().unwrap();
            for e in entries {
                if cursor.get(&e.partition).is_some_and(|&c| e.seq <= c) {
                    continue;
                }
                self.events.lock().unwrap().extend(e.events.iter().cloned());
                cursor.insert(e.partition.clone(), e.seq);
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        #[test]
        fn processor_matches_the_model_on_dynamodb(
            ops in proptest::collection::vec(op(), 1..80),
            cuts in proptest::collection::vec(1usize..20, 1..40),
            replays in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
            let client = moto.dynamodb_client();
            rt().block_on(async {
                ensure_table(&client, "state").await.unwrap();
                let limits = ApplyLimits { max_items: 9, max_bytes: usize::MAX };
                let store = Arc::new(DynamoDbStateStore::new(client, "state").with_limits(limits));
                let collected = Arc::new(Collected::default());
                let reader = collected.clone();
                let rig = Rig {
                    store,
                    publisher: collected,
                    published: Box::new(move || reader.events.lock().unwrap().clone()),
                    _keep: Vec::new(),
                };
                matches_the_model(rig, &ops, &cuts, &replays).await;
            });
            drop(moto);
        }
    }
}

/// `seats` and `capacity` written as JSON Schema integers in every spelling the edge
/// accepts (`2`, `2.0`, `2e0`, `20E-1`) are applied like `2`: nothing is skipped.
#[test]
fn integers_in_every_spelling_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = Arc::new(SqliteStateStore::open(&dir.path().join("state.db")).unwrap());
        let processor = BookingsProcessor::new(store.clone());
        let shard = ShardId("0".into());
        let raw = [
            r#"{"type":"inventory.event.created","data":{"eventId":"E","name":"n","venue":"v","startsAt":"2026-12-01T20:00:00Z","capacity":100.0}}"#,
            r#"{"type":"booking.requested","data":{"bookingId":"a","eventId":"E","customerId":"c","seats":2.0,"requestedAt":"2026-11-22T10:00:00Z"}}"#,
            r#"{"type":"booking.requested","data":{"bookingId":"b","eventId":"E","customerId":"c","seats":1e0,"requestedAt":"2026-11-22T10:00:00Z"}}"#,
            r#"{"type":"booking.requested","data":{"bookingId":"c","eventId":"E","customerId":"c","seats":30E-1,"requestedAt":"2026-11-22T10:00:00Z"}}"#,
            r#"{"type":"inventory.capacity.changed","data":{"eventId":"E","capacity":1.2e2}}"#,
            // Not an integer of 64 bits: kept as a dead letter, with the member named.
            r#"{"type":"inventory.capacity.changed","data":{"eventId":"E","capacity":1e30}}"#,
            r#"not json"#,
        ];
        let records: Vec<StoredRecord> = raw.iter().enumerate().map(|(i, p)| StoredRecord {
            sequence: SequenceNumber::from_u64(i as u64),
            key: "E".into(),
            payload: Bytes::from(p.to_string()),
            appended_at_ms: 1_700_000_000_000,
        }).collect();
        assert!(processor.apply_batch(&shard, &records).await.unwrap());
        let inv = store.inventory("E").await.unwrap().expect("created from capacity 100.0");
        assert_eq!((inv.capacity, inv.reserved), (120, 6));
        for (id, seats) in [("a", 2), ("b", 1), ("c", 3)] {
            let b = store.booking(id).await.unwrap().expect(id);
            assert_eq!((b.seats, b.status), (seats, BookingStatus::Confirmed), "{id}");
        }
        let dead = store.dead_letters(100).await.unwrap();
        let got: Vec<(String, String)> = dead.iter().map(|d| (d.sequence.to_string(), d.reason.clone())).collect();
        assert_eq!(got, [("5".to_owned(), "invalid_value".to_owned()), ("6".to_owned(), "undecodable".to_owned())]);
        assert!(dead[0].detail.starts_with("/data/capacity"), "{}", dead[0].detail);
        assert_eq!(dead[1].payload, "not json");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Two shards apply at the same time, as the runtime does, with bookingIds reused across
    /// events on different shards. A bookingId is claimed once: each is confirmed at most
    /// once, and every event's `reserved` is exactly the seats of its confirmed and paid
    /// bookings.
    #[test]
    fn a_booking_id_is_claimed_once_across_shards(
        requests in proptest::collection::vec((0u8..6, 0u8..4, 1i64..4), 1..80),
        cuts in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let store = Arc::new(SqliteStateStore::open(&dir.path().join("state.db")).unwrap());
            let processor = Arc::new(BookingsProcessor::new(store.clone()));
            // Events E0..E3 on sale with room for everything; event e lives on shard e % 2.
            let mut per_shard: [Vec<Value>; 2] = Default::default();
            for e in 0u8..4 {
                per_shard[usize::from(e % 2)].push(event(&Op::Create(e, 1000)));
            }
            for &(b, e, s) in &requests {
                per_shard[usize::from(e % 2)].push(event(&Op::Request(b, e, s)));
            }
            let mut tasks = Vec::new();
            for (i, events) in per_shard.into_iter().enumerate() {
                let processor = processor.clone();
                let cuts = cuts.clone();
                tasks.push(tokio::spawn(async move {
                    let shard = ShardId(i.to_string());
                    let records: Vec<StoredRecord> = events.iter().enumerate().map(|(n, v)| StoredRecord {
                        sequence: SequenceNumber::from_u64(n as u64),
                        key: "k".into(),
                        payload: Bytes::from(v.to_string()),
                        appended_at_ms: 1_700_000_000_000,
                    }).collect();
                    let mut start = 0;
                    let mut cut = cuts.iter().cycle();
                    while start < records.len() {
                        let end = (start + cut.next().unwrap()).min(records.len());
                        processor.apply_batch(&shard, &records[start..end]).await.unwrap();
                        start = end;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let mut reserved_by_bookings: HashMap<String, i64> = HashMap::new();
            for b in 0u8..6 {
                let booking = store.booking(&format!("B{b}")).await.unwrap();
                let requested = requests.iter().any(|&(rb, _, _)| rb == b);
                assert_eq!(booking.is_some(), requested, "B{b}");
                if let Some(booking) = booking
                    && matches!(booking.status, BookingStatus::Confirmed | BookingStatus::Paid)
                {
                    *reserved_by_bookings.entry(booking.event_id.clone()).or_default() += booking.seats;
                }
            }
            for e in 0u8..4 {
                let inv = store.inventory(&format!("E{e}")).await.unwrap().unwrap();
                let expected = reserved_by_bookings.get(&format!("E{e}")).copied().unwrap_or(0);
                assert_eq!(inv.reserved, expected, "E{e}: reserved vs its confirmed bookings");
            }
        });
    }
}

/// A record with two members the rules cannot read is dead-lettered once, not once per
/// member: stores key dead letters by record (DynamoDB refuses two writes of one item in
/// a transaction, which would stall the shard).
#[test]
fn a_record_is_dead_lettered_once_however_many_members_fail() {
    let raw = r#"{"type":"inventory.capacity.changed","data":{"eventId":"E","seats":1.5,"capacity":2.5}}"#;
    let records = vec![StoredRecord {
        sequence: SequenceNumber::from_u64(7),
        key: "E".into(),
        payload: Bytes::from(raw),
        appended_at_ms: 1_700_000_000_000,
    }];
    let events = floodgate_processors::bookings::parse(&records);
    let changes = floodgate_processors::bookings::decide(
        &ShardId("0".into()),
        &records,
        &events,
        Vec::new(),
        Vec::new(),
    );
    assert_eq!(changes.dead_letters.len(), 1, "{:?}", changes.dead_letters);
    assert!(changes.dead_letters[0].detail.starts_with("/data/seats"));
}
