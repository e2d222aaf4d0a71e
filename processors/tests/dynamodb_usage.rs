//! What the bookings apply costs in DynamoDB: write units and requests per 1,000
//! bookings, spread over many events and all on one hot event (an on-sale rush), through
//! the real processor and the DynamoDB state store on moto server. Prints the figures
//! (`--nocapture`) and checks the hot-key rule: one inventory write per transaction,
//! however many bookings a batch holds for the event.
#![cfg(feature = "emulator-tests")]

use std::sync::Arc;

use bytes::Bytes;
use floodgate_aws::emulator;
use floodgate_aws::state::{DynamoDbStateStore, ensure_table};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::bookings::BookingsProcessor;
use serde_json::json;

fn record(n: usize, v: serde_json::Value) -> StoredRecord {
    StoredRecord {
        sequence: SequenceNumber::from_u64(n as u64),
        key: "k".into(),
        payload: Bytes::from(v.to_string()),
        appended_at_ms: 1_700_000_000_000,
    }
}

/// Applies `events` creations then 1,000 bookings spread over them (round robin), in
/// batches of `batch`; returns (write units, transactions, seconds the bookings took).
async fn run(store: Arc<DynamoDbStateStore>, events: usize, batch: usize) -> (u64, u64, f64) {
    let processor = BookingsProcessor::new(store.clone());
    let shard = ShardId("shardId-000000000000".into());
    let mut records = Vec::new();
    for e in 0..events {
        records.push(record(records.len(), json!({"type":"inventory.event.created","data":{"eventId":format!("E{e}"),"capacity":100_000}})));
    }
    processor.apply_batch(&shard, &records).await.unwrap();
    let before = store.usage();
    let mut bookings = Vec::new();
    for b in 0..1000 {
        bookings.push(record(records.len() + b, json!({"type":"booking.requested","data":{"bookingId":format!("B{b}"),"eventId":format!("E{}", b % events),"customerId":"c","seats":1,"requestedAt":"2026-11-22T10:00:00Z"}})));
    }
    let started = std::time::Instant::now();
    for chunk in bookings.chunks(batch) {
        processor.apply_batch(&shard, chunk).await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    let after = store.usage();
    (after.0 - before.0, after.1 - before.1, took)
}

#[test]
fn write_units_per_thousand_bookings() {
    let moto = emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = moto.dynamodb_client();
        let mut rows = Vec::new();
        for (name, events, batch) in [
            ("spread over 100 events", 100, 500),
            ("one hot event", 1, 500),
        ] {
            let table = format!("usage-{events}");
            ensure_table(&client, &table).await.unwrap();
            let store = Arc::new(DynamoDbStateStore::new(client.clone(), &table));
            let (units, transactions, took) = run(store.clone(), events, batch).await;
            rows.push((name, units, transactions, 1000.0 / took));
            // A transaction holds 100 items: the position, the outbox entry, the hot
            // event's inventory once, and the rest bookings (a few short of 97, as the
            // processor cuts a slice while a next record could still add three items). A
            // transaction cannot write an item twice, so one inventory write each is the
            // only way; here it is also the bound on the number of transactions.
            if events == 1 {
                assert!(
                    transactions <= 2 * 1000_u64.div_ceil(90),
                    "{transactions} transactions"
                );
            }
        }
        // Bookings applied per second by one worker's processor (one shard) against moto
        // server: moto's speed, not DynamoDB's. For its rollback, moto deep-copies the
        // whole table once per item of a TransactWriteItems (moto/dynamodb/models), about
        // 2 s a call of 100 items here once the table holds a few thousand, so the figure
        // bounds nothing on AWS, where such a transaction takes tens of milliseconds.
        println!(
            "| bookings | write units / 1,000 | TransactWriteItems / 1,000 | applied/s (moto-bound) |"
        );
        println!("|---|---|---|---|");
        for (name, units, tx, rate) in rows {
            println!("| {name} | {units} | {tx} | {rate:.0} |");
        }
    });
}
