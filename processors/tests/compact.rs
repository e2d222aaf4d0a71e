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

/// Writes shard `shard`'s run `first..=last` as one file of `n` rows; returns their ids.
async fn write_run(
    store: &dyn ObjectStore,
    shard: &str,
    first: u64,
    last: u64,
    n: usize,
) -> Vec<String> {
    let t = table();
    let ids: Vec<String> = (0..n).map(|i| format!("s{shard}-{first}-{i}")).collect();
    let received = json!(0);
    let shard_v = json!(shard);
    let seq = json!(first.to_string());
    let source = json!("/s");
    let ty = json!("t");
    let id_values: Vec<serde_json::Value> = ids.iter().map(|i| json!(i)).collect();
    let ns: Vec<serde_json::Value> = (0..n).map(|i| json!(i)).collect();
    let mut columns = Vec::new();
    for (c, field) in t.schema.fields().iter().enumerate() {
        let values: Vec<Option<&serde_json::Value>> = (0..n)
            .map(|i| match c {
                0 => Some(&id_values[i]),
                1 => Some(&source),
                2 => Some(&ty),
                3 => None,
                4 => Some(&received),
                5 => Some(&shard_v),
                6 => Some(&seq),
                _ => Some(&ns[i]),
            })
            .collect();
        columns.push(floodgate_processors::parquet::column(field.data_type(), &values).unwrap());
    }
    let bytes = floodgate_processors::parquet::encode(&t.schema, columns).unwrap();
    store
        .put(
            &format!("{PARTITION}/{shard}-{first}-{last}.parquet"),
            bytes,
        )
        .await
        .unwrap();
    ids
}

async fn sizes(store: &dyn ObjectStore) -> std::collections::BTreeMap<String, u64> {
    store
        .list(&format!("{PARTITION}/"))
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.key.ends_with(".parquet"))
        .map(|o| (o.key.rsplit('/').next().unwrap().to_owned(), o.size))
        .collect()
}

/// Item 9 of issue 9: compacted names ignored the shard, so shard 1's runs compacted after
/// shard 0's (whose compacted file had grown past `small_bytes`) took the same name
/// `c-0-19-2` and replaced it: shard 0's rows were gone, and a replay would write them
/// again beside nothing that records them.
#[tokio::test]
async fn two_shards_compactions_never_take_each_others_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    let t = table();
    let mut ids = write_run(&store, "0", 0, 9, 300).await;
    ids.extend(write_run(&store, "0", 10, 19, 300).await);
    compact::compact_table(&store, "t", None, &t.schema, u64::MAX)
        .await
        .unwrap();
    ids.extend(write_run(&store, "1", 0, 9, 300).await);
    ids.extend(write_run(&store, "1", 10, 19, 300).await);
    let before = sizes(&store).await;
    let small = before["1-0-9.parquet"].max(before["1-10-19.parquet"]) + 1;
    let (big_name, big) = before.iter().find(|(n, _)| n.starts_with("c-")).unwrap();
    assert!(
        *big >= small,
        "{big_name} ({big} bytes) must be past small_bytes ({small})"
    );
    compact::compact_table(&store, "t", None, &t.schema, small)
        .await
        .unwrap();
    let after = sizes(&store).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["c-0-0-19-2.parquet", "c-1-0-19-2.parquet"]
    );
    ids.sort();
    assert_eq!(rows(&store).await, ids, "rows lost or duplicated");
    // Every run is still attributed to its shard, from the manifest.
    let shards = [
        floodgate_core::stream::ShardId("0".to_owned()),
        floodgate_core::stream::ShardId("1".to_owned()),
    ];
    let runs = floodgate_processors::lake::known_runs(&store, &shards, &["t".to_owned()])
        .await
        .unwrap();
    for shard in &shards {
        let got: Vec<(String, String)> = runs[shard]
            .iter()
            .map(|(f, l)| (f.to_string(), l.to_string()))
            .collect();
        assert_eq!(
            got,
            [("0".into(), "9".into()), ("10".into(), "19".into())],
            "{shard}"
        );
    }
}

/// One compaction over a partition holding several shards' files merges each shard's on
/// its own, under names that say whose they are.
#[tokio::test]
async fn a_compaction_merges_each_shard_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for shard in ["0", "1", "shardId-000000000002"] {
        ids.extend(write_run(&store, shard, 5, 9, 3).await);
        ids.extend(write_run(&store, shard, 10, 12, 3).await);
    }
    ids.extend(write_run(&store, "lake.3", 1, 4, 3).await);
    let (parts, files) = compact::compact_table(&store, "t", None, &table().schema, u64::MAX)
        .await
        .unwrap();
    assert_eq!((parts, files), (1, 6));
    assert_eq!(
        sizes(&store).await.into_keys().collect::<Vec<_>>(),
        [
            "c-0-5-12-2.parquet",
            "c-1-5-12-2.parquet",
            "c-shardId-000000000002-5-12-2.parquet",
            "lake.3-1-4.parquet"
        ]
    );
    ids.sort();
    assert_eq!(rows(&store).await, ids);
    assert_eq!(
        compact::run_of("c-shardId-000000000002-5-12-2.parquet"),
        Some(("shardId-000000000002", 5, 12))
    );
    assert_eq!(
        compact::run_of("lake-derived.outbox-3-9.parquet"),
        Some(("lake-derived.outbox", 3, 9))
    );
    assert_eq!(
        compact::run_of("c-5-12-2.parquet"),
        None,
        "an older version's name"
    );
}
