//! Compaction interrupted at each step, through a store that fails on cue (our own role
//! trait around the real local store): after `recover`, every row is there exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore};
use floodgate_processors::compact;
use floodgate_sinks::LocalDirStore;
use serde_json::json;

/// Fails the first `put` of a compacted file (`Fail::Put`) or the first delete
/// (`Fail::Delete`): a crash at that step.
#[derive(Debug)]
struct Faulty {
    inner: LocalDirStore,
    fail: AtomicU8,
}

const NONE: u8 = 0;
const PUT: u8 = 1;
const DELETE: u8 = 2;

#[async_trait]
impl ObjectStore for Faulty {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        if key.contains("/c-")
            && self
                .fail
                .compare_exchange(PUT, NONE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            return Err(ObjectError::Io {
                key: key.into(),
                message: "injected".into(),
            });
        }
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        if self
            .fail
            .compare_exchange(DELETE, NONE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Err(ObjectError::Io {
                key: key.into(),
                message: "injected".into(),
            });
        }
        self.inner.delete(key).await
    }
}

const PARTITION: &str = "t/dt=2026-11-22/hour=10";

fn table() -> floodgate_core::lake::Table {
    let schema = json!({"type":"object","required":["n"],"properties":{"n":{"type":"integer"}}});
    floodgate_core::lake::table_for("t", &[(1, &schema)]).unwrap()
}

/// Writes `files` small files of 3 rows each; returns every row's `event_id`.
async fn seed(store: &dyn ObjectStore, files: usize) -> Vec<String> {
    let t = table();
    let mut ids = Vec::new();
    for f in 0..files {
        let rows: Vec<serde_json::Value> = (0..3)
            .map(|i| json!({"id": format!("e{f}-{i}"), "source":"/s", "type":"t", "data":{"n": i}}))
            .collect();
        ids.extend(rows.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        let received = json!(0);
        let shard = json!("0");
        let seq = json!(f.to_string());
        let mut columns = Vec::new();
        for (c, field) in t.schema.fields().iter().enumerate() {
            let values: Vec<Option<&serde_json::Value>> = rows
                .iter()
                .map(|r| match c {
                    0 => r.get("id"),
                    1 => r.get("source"),
                    2 => r.get("type"),
                    3 => None,
                    4 => Some(&received),
                    5 => Some(&shard),
                    6 => Some(&seq),
                    _ => r["data"].get("n"),
                })
                .collect();
            columns
                .push(floodgate_processors::parquet::column(field.data_type(), &values).unwrap());
        }
        let bytes = floodgate_processors::parquet::encode(&t.schema, columns).unwrap();
        store
            .put(
                &format!("{PARTITION}/0-{}-{}.parquet", f * 10, f * 10 + 9),
                bytes,
            )
            .await
            .unwrap();
    }
    ids
}

/// Every `event_id` in the partition's visible files, sorted.
async fn rows(store: &dyn ObjectStore) -> Vec<String> {
    use arrow_array::Array;
    let mut out = Vec::new();
    for o in store.list(&format!("{PARTITION}/")).await.unwrap() {
        if !o.key.ends_with(".parquet") {
            continue;
        }
        let bytes = store.get(&o.key).await.unwrap().unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch
                .column_by_name("event_id")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .unwrap()
                .clone();
            out.extend((0..ids.len()).map(|i| ids.value(i).to_owned()));
        }
    }
    out.sort();
    out
}

async fn interrupted_at(step: u8) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty {
        inner: LocalDirStore::open(dir.path()).unwrap(),
        fail: AtomicU8::new(NONE),
    });
    let mut ids = seed(&*store, 20).await;
    ids.sort();
    store.fail.store(step, Ordering::SeqCst);
    let t = table();
    let result = compact::compact_table(&*store, "t", None, &t.schema, u64::MAX).await;
    assert!(result.is_err(), "the fault was injected");
    // Recovery (which every compaction runs first) settles it.
    compact::recover(&*store, PARTITION).await.unwrap();
    assert_eq!(
        rows(&*store).await,
        ids,
        "step {step}: rows lost or duplicated"
    );
    // And a second compaction completes.
    compact::compact_table(&*store, "t", None, &t.schema, u64::MAX)
        .await
        .unwrap();
    assert_eq!(rows(&*store).await, ids);
    let files = store.list(&format!("{PARTITION}/")).await.unwrap();
    assert_eq!(
        files.iter().filter(|o| o.key.ends_with(".parquet")).count(),
        1
    );
    let m = compact::manifest(&*store, PARTITION).await.unwrap();
    assert!(m.compacted.values().all(|p| p.done));
}

#[tokio::test]
async fn a_compaction_cut_before_its_file_is_written_is_undone() {
    interrupted_at(PUT).await;
}

#[tokio::test]
async fn a_compaction_cut_before_its_inputs_are_deleted_is_finished() {
    interrupted_at(DELETE).await;
}
