//! The lake under a memory budget: a buffer rolls before its rows would take it past its
//! share, whatever the batches look like, so the memory it counts never exceeds the budget;
//! and every row still lands once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use floodgate_core::object_store::ObjectStore;
use floodgate_core::registry::Registry;
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{RuntimeConfig, ShardProcessor};
use floodgate_sinks::LocalDirStore;
use serde_json::json;

/// 2026-12-01T15:00:00Z.
const RECEIVED_MS: i64 = 1_796_137_200_000;

/// `n` booking requests (about 300 bytes each, some larger), and a few payments the lake
/// diverts to the quarantine, as shard `0` holds them.
fn records(registry: &Registry, n: u64) -> Vec<StoredRecord> {
    (0..n)
        .map(|i| {
            let event: serde_json::Value = if i % 37 == 5 {
                // Valid, but past the lake's int64 column: a quarantine row.
                serde_json::from_str(&format!(
                    r#"{{"specversion":"1.0","id":"q{i}","source":"/budget","type":"payment.succeeded","time":"2026-12-01T14:00:00Z","data":{{"paymentId":"p-{i}","bookingId":"bk","eventId":"E1","amountMinor":1e30,"currency":"EUR"}}}}"#
                ))
                .unwrap()
            } else {
                let customer = if i % 11 == 0 {
                    "c".repeat(64)
                } else {
                    format!("c{i}")
                };
                json!({"specversion":"1.0","id":format!("e{i}"),"source":"/budget","type":"booking.requested","time":"2026-12-01T14:00:00Z","data":{"bookingId":format!("bk-{i}"),"eventId":format!("E{}", i % 3),"customerId":customer,"seats":1 + i % 4,"requestedAt":"2026-12-01T14:00:00Z"}})
            };
            registry.check(&event).expect("an event the edge accepts");
            StoredRecord {
                sequence: SequenceNumber::from_u64(i),
                key: "E1".to_owned(),
                payload: Bytes::from(event.to_string()),
                appended_at_ms: RECEIVED_MS,
            }
        })
        .collect()
}

/// Rows over every Parquet file under `root`, and the number of files.
fn rows_and_files(root: &Path) -> (usize, usize) {
    let (mut rows, mut files) = (0, 0);
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                let bytes = Bytes::from(std::fs::read(&path).unwrap());
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .unwrap();
                rows += reader.metadata().file_metadata().num_rows() as usize;
                files += 1;
            }
        }
    }
    (rows, files)
}

/// Issue 10: the lake held its rows as parsed JSON and rolled by the events' *text*, so
/// memory ran to several times the roll size. Under a small budget, fed in batches of every
/// size (one record, a few, more than a buffer holds), the memory a buffer counts never
/// passes its share, and the buffer rolls early, many times, with every row written once.
#[tokio::test]
async fn under_a_small_budget_buffers_roll_early_and_never_pass_their_share() {
    let registry = Registry::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let share: u64 = 16 * 1024;
    let lake = LakeProcessor::new(
        store,
        floodgate_core::lake::tables(&registry).unwrap(),
        LakeConfig {
            roll_bytes: share,
            // Never by age: only memory rolls the buffer here.
            roll_age: Duration::from_secs(3600),
        },
    );
    let shard = ShardId("0".to_owned());
    let all = records(&registry, 600);
    let text: usize = all.iter().map(|r| r.payload.len()).sum();
    let mut at = 0;
    let mut size = 1;
    while at < all.len() {
        let end = (at + size).min(all.len());
        lake.process(&shard, &all[at..end]).await.unwrap();
        // The most a buffer held at any moment of the batch, flushes included.
        let peak = lake.peak_buffer_bytes();
        assert!(
            peak <= share,
            "by records {at}..{end}: {peak} bytes held, share {share}"
        );
        assert!(lake.buffered_bytes() <= peak);
        at = end;
        size = size * 3 % 97 + 1;
    }
    lake.tick(&shard, true).await.unwrap();
    assert_eq!(
        lake.buffered_bytes(),
        0,
        "the last flush empties the buffer"
    );
    let peak = lake.peak_buffer_bytes();
    assert!(
        peak > share / 2,
        "the buffer filled toward its share: {peak}"
    );
    let (rows, files) = rows_and_files(dir.path());
    assert_eq!(rows, all.len(), "every record once, typed or quarantined");
    // Rolled by memory, early: at least one run per share of text.
    let runs_at_least = text / share as usize;
    assert!(
        files >= runs_at_least,
        "{files} files for {text} bytes of events under a {share}-byte share"
    );
}

/// The budget counts the processors' read batches at `READ_BATCH_RECORDS` records.
#[test]
fn the_budget_counts_the_read_batch_the_runtime_reads() {
    assert_eq!(
        RuntimeConfig::default().max_batch_records as u64,
        floodgate_core::budget::READ_BATCH_RECORDS
    );
}
