//! Model-based property test of the bookings rules through the real processor and the
//! real SQLite store: random interleavings of creates, capacity changes, requests (with
//! repeated bookingIds), cancellations and payments, applied in random batches with
//! replays of whole batches, must end in the state a plain in-memory model computes, with
//! reserved never above capacity, and each booking decided (and announced) once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use floodgate_core::state::{BookingStatus, StateStore};
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
                if self.bookings.contains_key(&b) {
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn processor_matches_the_model(
        ops in proptest::collection::vec(op(), 1..120),
        cuts in proptest::collection::vec(1usize..20, 1..40),
        replays in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let store = Arc::new(SqliteStateStore::open(&dir.path().join("state.db")).unwrap());
            let processor = BookingsProcessor::new(store.clone());
            let outbox = EmbeddedOutbox::open(&dir.path().join("outbox")).unwrap();
            let shard = ShardId("0".into());
            let records: Vec<StoredRecord> = ops.iter().enumerate().map(|(i, op)| StoredRecord {
                sequence: SequenceNumber::from_u64(i as u64),
                key: "k".into(),
                payload: Bytes::from(event(op).to_string()),
                appended_at_ms: 1_700_000_000_000 + i as i64,
            }).collect();
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
                if let Some((ps, pe)) = prev && *replay.next().unwrap() {
                    let applied = processor.apply_batch(&shard, &records[ps..pe]).await.unwrap();
                    assert!(!applied, "a replayed batch changed state");
                    if *replay.next().unwrap() {
                        processor.apply_batch(&shard, &records[ps..end]).await.unwrap();
                        for op in &ops[start..end] { model.apply(op); }
                        prev = Some((start, end));
                        start = end;
                        relay::relay_once(&*store, &outbox, &mut last).await.unwrap();
                        continue;
                    }
                }
                processor.apply_batch(&shard, &records[start..end]).await.unwrap();
                for op in &ops[start..end] { model.apply(op); }
                // Relay now and then, as the live relay would.
                if *replay.next().unwrap() {
                    relay::relay_once(&*store, &outbox, &mut last).await.unwrap();
                }
                prev = Some((start, end));
                start = end;
            }
            relay::relay_once(&*store, &outbox, &mut None).await.unwrap();

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
                        assert_eq!((got.event_id.as_str(), got.seats, got.status), (format!("E{e}").as_str(), s, st), "B{b}");
                    }
                }
            }
            // Each booking is announced decided exactly once.
            let events = floodgate_sinks::outbox::read_events(&dir.path().join("outbox")).unwrap();
            let mut decisions: HashMap<String, usize> = HashMap::new();
            for e in &events {
                let v: Value = serde_json::from_str(e).unwrap();
                let ty = v["type"].as_str().unwrap();
                if ty == "booking.confirmed" || ty == "booking.rejected" {
                    *decisions.entry(v["data"]["bookingId"].as_str().unwrap().to_owned()).or_default() += 1;
                }
            }
            assert_eq!(decisions.len(), model.bookings.len());
            assert!(decisions.values().all(|&n| n == 1), "{decisions:?}");
            let mut ids: Vec<&str> = events.iter().map(|e| e.as_str()).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), events.len(), "a derived event was published twice");
        });
    }
}
