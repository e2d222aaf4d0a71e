//! Compaction interrupted at each step, through a store that fails on cue (our own role
//! trait around the real local store): after `recover`, every row is there exactly once.
//! And the same for every store operation of a compaction in turn (an error, a lost reply,
//! a crash before or after it), followed by a recovery and a replay of the lake's source.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::lake::Table;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore, PutOutcome};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::compact;
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{Progress, ShardProcessor};
use floodgate_sinks::LocalDirStore;
use serde_json::json;

/// Fails the first `put_new` of a compacted file (`Fail::Put`) or the first delete
/// (`Fail::Delete`): a crash at that step. A compacted file written by `put` fails the test.
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
        // Issue 12: a compacted file's name fixes its rows; it is created, never replaced.
        assert!(
            !key.contains("/c-"),
            "a compacted file written by put: {key}"
        );
        self.inner.put(key, bytes).await
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
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
        self.inner.put_new(key, bytes).await
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
        Some(("shardId-000000000002", seq("5"), seq("12")))
    );
    assert_eq!(
        compact::run_of("lake-derived.outbox-3-9.parquet"),
        Some(("lake-derived.outbox", seq("3"), seq("9")))
    );
    // Kinesis sequence numbers (with Floodgate's subsequence) are far wider than u128:
    // the name keeps them whole, ordered numerically, so two runs never collide.
    let a = "49590338271490256608559692538361571095921575989136588898000000";
    let b = "49590338271490256608559692538361571095921575989136588898000007";
    let c = "9"; // shorter is smaller, whatever its digits
    let name = compact::compacted_name(&[
        format!("shardId-000000000001-{a}-{b}.parquet"),
        format!("shardId-000000000001-{c}-{c}.parquet"),
    ]);
    assert_eq!(name, format!("c-shardId-000000000001-{c}-{b}-2.parquet"));
    assert_eq!(
        compact::run_of(&name),
        Some(("shardId-000000000001", seq(c), seq(b)))
    );
    assert_eq!(
        compact::run_of("c-5-12-2.parquet"),
        None,
        "an older version's name"
    );
}

fn seq(s: &str) -> floodgate_core::stream::SequenceNumber {
    floodgate_core::stream::SequenceNumber::new(s)
}

// The k-th object-store operation of a compaction fails, for every k.

/// An object store in memory: what a crash leaves is exactly what it holds.
#[derive(Debug, Default, Clone)]
struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MemoryStore {
    fn holding(objects: BTreeMap<String, Bytes>) -> Self {
        Self {
            objects: Arc::new(Mutex::new(objects)),
        }
    }

    fn snapshot(&self) -> BTreeMap<String, Bytes> {
        self.objects.lock().unwrap().clone()
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        self.objects.lock().unwrap().insert(key.to_owned(), bytes);
        Ok(())
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        match self.objects.lock().unwrap().entry(key.to_owned()) {
            std::collections::btree_map::Entry::Occupied(_) => Ok(PutOutcome::Exists),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(bytes);
                Ok(PutOutcome::Created)
            }
        }
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        Ok(self.objects.lock().unwrap().get(key).cloned())
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
}

/// How the chosen operation goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// It fails without taking effect; the caller may go on.
    Error,
    /// It takes effect, but its answer is an error (a reply lost on the way).
    ErrorAfter,
    /// The process dies as it starts: it takes no effect, and nothing after it runs.
    Crash,
    /// The process dies once it took effect.
    CrashAfter,
}

const FAULTS: [Fault; 4] = [
    Fault::Error,
    Fault::ErrorAfter,
    Fault::Crash,
    Fault::CrashAfter,
];

/// A store whose `at`-th operation (1-based, counting every put, get, list and delete;
/// 0: none) goes wrong as `fault` says.
#[derive(Debug)]
struct FailingAt {
    inner: MemoryStore,
    at: usize,
    fault: Fault,
    ops: AtomicUsize,
    dead: AtomicBool,
}

impl FailingAt {
    fn new(inner: MemoryStore, at: usize, fault: Fault) -> Self {
        Self {
            inner,
            at,
            fault,
            ops: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
        }
    }

    async fn op<T>(
        &self,
        key: &str,
        op: impl std::future::Future<Output = Result<T, ObjectError>>,
    ) -> Result<T, ObjectError> {
        let fail = |message: &str| ObjectError::Io {
            key: key.to_owned(),
            message: message.to_owned(),
        };
        if self.dead.load(Ordering::SeqCst) {
            return Err(fail("injected: the process is gone"));
        }
        if self.ops.fetch_add(1, Ordering::SeqCst) + 1 != self.at {
            return op.await;
        }
        match self.fault {
            Fault::Error => Err(fail("injected failure")),
            Fault::ErrorAfter => {
                op.await?;
                Err(fail("injected failure after the operation took effect"))
            }
            Fault::Crash => {
                self.dead.store(true, Ordering::SeqCst);
                Err(fail("injected crash"))
            }
            Fault::CrashAfter => {
                op.await?;
                self.dead.store(true, Ordering::SeqCst);
                Err(fail("injected crash after the operation took effect"))
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FailingAt {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        self.op(key, self.inner.put(key, bytes)).await
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        self.op(key, self.inner.put_new(key, bytes)).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        self.op(key, self.inner.get(key)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.op(prefix, self.inner.list(prefix)).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.op(key, self.inner.delete(key)).await
    }
}

const SHARDS: [&str; 2] = ["0", "1"];
/// When the stream received every record: 2026-12-01T15:00:00Z.
const RECEIVED_MS: i64 = 1_796_137_200_000;
/// Records per run (one batch, flushed whole).
const RUN_RECORDS: u64 = 3;
/// The tables compacted: a typed one, and the quarantine (rows the lake diverted).
const COMPACTED: [&str; 2] = ["booking_requested", "quarantine"];

/// Run `run` of `shard`: a booking, a payment (a table not compacted) and a payment whose
/// amount no int64 column holds (diverted to the quarantine), as the edge accepts them.
fn run_records(
    registry: &floodgate_core::registry::Registry,
    shard: &str,
    run: u64,
) -> Vec<StoredRecord> {
    let id = |n: u64| format!("s{shard}-r{run}-{n}");
    let payment = |n: u64, amount: &str| {
        json!({"specversion":"1.0","id":id(n),"source":"/tests","type":"payment.succeeded",
            "time":"2026-12-01T14:00:00Z",
            "data":{"paymentId":format!("p{shard}{run}{n}"),"bookingId":"bk","eventId":"E1","amountMinor":serde_json::from_str::<serde_json::Value>(amount).unwrap(),"currency":"EUR"}})
    };
    let events = [
        json!({"specversion":"1.0","id":id(0),"source":"/tests","type":"booking.requested",
            "time":"2026-12-01T10:00:00Z",
            "data":{"bookingId":format!("bk{shard}{run}"),"eventId":"E1","customerId":"c1","seats":1,"requestedAt":"2026-12-01T10:00:00Z"}}),
        payment(1, "1500"),
        payment(2, "1e30"),
    ];
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if let Err(errors) = registry.check(e) {
                panic!("the edge would reject {e}: {errors:?}");
            }
            StoredRecord {
                sequence: SequenceNumber::from_u64(run * RUN_RECORDS + i as u64),
                key: "E1".to_owned(),
                payload: Bytes::from(e.to_string()),
                appended_at_ms: RECEIVED_MS,
            }
        })
        .collect()
}

/// The lake consumer over `store`, rolling only when told to.
fn lake_consumer(store: Arc<dyn ObjectStore>, tables: &[Table]) -> LakeProcessor {
    LakeProcessor::new(
        store,
        tables.to_vec(),
        LakeConfig {
            roll_bytes: 1 << 30,
            roll_age: Duration::from_secs(3600),
        },
    )
}

/// Writes runs `runs` of every shard, one flush each, as the lake consumer does.
async fn write_runs(
    store: Arc<dyn ObjectStore>,
    registry: &floodgate_core::registry::Registry,
    tables: &[Table],
    runs: std::ops::Range<u64>,
) {
    let lake = lake_consumer(store, tables);
    for shard in SHARDS {
        let id = ShardId(shard.to_owned());
        for run in runs.clone() {
            lake.process(&id, &run_records(registry, shard, run))
                .await
                .unwrap();
            lake.tick(&id, true).await.unwrap();
        }
    }
}

/// The lake consumer replays every shard from its first record (its checkpoint lost): it
/// finds the runs the lake holds or held and reproduces them.
async fn replay(
    store: Arc<dyn ObjectStore>,
    registry: &floodgate_core::registry::Registry,
    tables: &[Table],
    runs: u64,
) {
    let lake = lake_consumer(store, tables);
    for shard in SHARDS {
        let id = ShardId(shard.to_owned());
        let records: Vec<StoredRecord> = (0..runs)
            .flat_map(|run| run_records(registry, shard, run))
            .collect();
        lake.process(&id, &records).await.unwrap();
        lake.tick(&id, true).await.unwrap();
        assert_eq!(
            lake.progress(&id),
            Progress::Through(Some(SequenceNumber::from_u64(runs * RUN_RECORDS - 1))),
            "the replay of shard {shard} did not reach its end"
        );
    }
}

/// Compacts every table of [`COMPACTED`], every file being small.
async fn compact_all(store: &dyn ObjectStore, tables: &[Table]) -> Result<(), String> {
    for name in COMPACTED {
        let schema = if name == "quarantine" {
            floodgate_core::lake::quarantine_schema()
        } else {
            tables
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .schema
                .clone()
        };
        compact::compact_table(store, name, None, &schema, u64::MAX)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A string column (plain or dictionary-encoded) as strings.
fn string_column(batch: &arrow_array::RecordBatch, column: &str) -> Vec<String> {
    use arrow_array::Array;
    let c = batch.column_by_name(column).unwrap();
    if let Some(d) = c
        .as_any()
        .downcast_ref::<arrow_array::DictionaryArray<arrow_array::types::Int32Type>>()
    {
        let values = d
            .values()
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        return (0..d.len())
            .map(|i| values.value(d.keys().value(i) as usize).to_owned())
            .collect();
    }
    let c = c
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .unwrap();
    (0..c.len()).map(|i| c.value(i).to_owned()).collect()
}

/// What the lake holds: each Parquet file's rows (`event_id shard sequence`, sorted) and
/// each manifest, by key.
fn contents(objects: &BTreeMap<String, Bytes>) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (key, bytes) in objects {
        let name = key.rsplit('/').next().unwrap();
        let rows = if name == compact::MANIFEST {
            let m: compact::Manifest = serde_json::from_slice(bytes).unwrap();
            vec![format!("{m:?}")]
        } else {
            assert!(name.ends_with(".parquet"), "unexpected object {key}");
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                bytes.clone(),
            )
            .unwrap_or_else(|e| panic!("{key} is unreadable: {e}"))
            .build()
            .unwrap();
            let mut rows = Vec::new();
            for batch in reader {
                let batch = batch.unwrap_or_else(|e| panic!("{key} is unreadable: {e}"));
                let ids = string_column(&batch, "event_id");
                let shards = string_column(&batch, "shard");
                let seqs = string_column(&batch, "sequence");
                for i in 0..ids.len() {
                    rows.push(format!("{} {} {}", ids[i], shards[i], seqs[i]));
                }
            }
            rows.sort();
            rows
        };
        out.insert(key.clone(), rows);
    }
    out
}

/// Every row of every table, per table, sorted: the multiset the lake must keep.
fn table_rows(contents: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, rows) in contents {
        if key.ends_with(".parquet") {
            let table = key.split('/').next().unwrap().to_owned();
            out.entry(table).or_default().extend(rows.iter().cloned());
        }
    }
    for rows in out.values_mut() {
        rows.sort();
    }
    out
}

/// Every manifest is settled and agrees with the files: each plan is done, none of its
/// inputs is left beside it, and its compacted file is there unless a later plan of the
/// same partition merged it.
fn assert_manifests_consistent(objects: &BTreeMap<String, Bytes>, label: &str) {
    for (key, bytes) in objects {
        let Some(partition) = key.strip_suffix(&format!("/{}", compact::MANIFEST)) else {
            continue;
        };
        let m: compact::Manifest = serde_json::from_slice(bytes).unwrap();
        for (name, plan) in &m.compacted {
            assert!(
                plan.done,
                "{label}: {partition}: plan {name} is left unfinished"
            );
            for input in &plan.inputs {
                assert!(
                    !objects.contains_key(&format!("{partition}/{input}")),
                    "{label}: {partition}: {input} is still there beside {name}, which holds it"
                );
            }
            let merged_later = m.compacted.values().any(|p| p.inputs.contains(name));
            assert!(
                merged_later || objects.contains_key(&format!("{partition}/{name}")),
                "{label}: {partition}: the manifest records {name}, which is not there"
            );
        }
    }
}

/// What a lake is checked against, from a store holding what a compaction started from.
struct Expected {
    registry: floodgate_core::registry::Registry,
    tables: Vec<Table>,
    runs: u64,
    /// The rows, per table, before the compaction.
    rows: BTreeMap<String, Vec<String>>,
    /// The runs the lake holds or held, per shard, before the compaction.
    known: std::collections::HashMap<ShardId, Vec<(SequenceNumber, SequenceNumber)>>,
    /// What an uninterrupted compaction followed by a replay leaves.
    reference: BTreeMap<String, Vec<String>>,
}

impl Expected {
    async fn check(&self, store: &MemoryStore, label: &str) {
        let objects = store.snapshot();
        let now = contents(&objects);
        assert_eq!(
            table_rows(&now),
            self.rows,
            "{label}: rows lost or duplicated"
        );
        assert_manifests_consistent(&objects, label);
        let shards: Vec<ShardId> = SHARDS.iter().map(|s| ShardId((*s).to_owned())).collect();
        let names: Vec<String> = self.tables.iter().map(|t| t.name.clone()).collect();
        assert_eq!(
            floodgate_processors::lake::known_runs(store, &shards, &names)
                .await
                .unwrap(),
            self.known,
            "{label}: the lake's record of its runs changed (a replay or rebuild would write others)"
        );
        assert_eq!(
            now, self.reference,
            "{label}: not the lake an uninterrupted compaction leaves"
        );
    }
}

/// The partitions whose manifest holds an unfinished plan.
fn interrupted(objects: &BTreeMap<String, Bytes>) -> Vec<String> {
    objects
        .iter()
        .filter_map(|(key, bytes)| {
            let partition = key.strip_suffix(&format!("/{}", compact::MANIFEST))?;
            let m: compact::Manifest = serde_json::from_slice(bytes).unwrap();
            m.compacted
                .values()
                .any(|p| !p.done)
                .then(|| partition.to_owned())
        })
        .collect()
}

/// Runs `job` against `state` with its `k`-th store operation failing as `fault` says, for
/// every k up to the number of operations it makes and every fault; returns each state it
/// leaves that is not in `seen` yet (adding it there), and the number of operations.
async fn states_after_a_fault<F, Fut>(
    state: &BTreeMap<String, Bytes>,
    faults: &[Fault],
    seen: &mut Vec<BTreeMap<String, Bytes>>,
    job: F,
) -> (Vec<BTreeMap<String, Bytes>>, usize)
where
    F: Fn(Arc<FailingAt>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let counting = Arc::new(FailingAt::new(
        MemoryStore::holding(state.clone()),
        0,
        Fault::Error,
    ));
    job(counting.clone()).await.unwrap();
    let ops = counting.ops.load(Ordering::SeqCst);
    let mut new = Vec::new();
    for k in 1..=ops + 1 {
        for &fault in faults {
            let store = MemoryStore::holding(state.clone());
            let result = job(Arc::new(FailingAt::new(store.clone(), k, fault))).await;
            assert_eq!(
                result.is_err(),
                k <= ops,
                "operation {k} of {ops}, {fault:?}: the fault decides the outcome ({result:?})"
            );
            // Whatever the failed job held in memory is gone with it; the store keeps what
            // it did.
            let after = store.snapshot();
            if !seen.contains(&after) {
                seen.push(after.clone());
                new.push(after);
            }
        }
    }
    (new, ops)
}

/// Fails the k-th object-store operation of a compaction, for every k and every way it can
/// go wrong (an error, an error after the operation took effect, a crash before or after
/// it); and, where that left a plan unfinished, also the k-th operation of the recovery
/// that settles it (a second crash). From every state this leaves, the next compaction
/// (whose recovery finishes or forgets the interrupted plan) and a replay of the whole
/// source run, in both orders. Every time: the rows are the ones before the compaction,
/// each exactly once; every manifest is settled and agrees with the files; the runs the
/// lake knows are unchanged; and the lake is the one an uninterrupted compaction leaves.
/// The compaction is a second one: its plans merge a compacted file of an earlier
/// compaction with newer runs. (What follows a fault depends only on what the store holds,
/// so each distinct state is checked once.)
#[tokio::test]
async fn a_compaction_failing_at_any_store_operation_loses_and_duplicates_nothing() {
    let registry = floodgate_core::registry::Registry::builtin().unwrap();
    let tables = floodgate_core::lake::tables(&registry).unwrap();
    let base = MemoryStore::default();
    write_runs(Arc::new(base.clone()), &registry, &tables, 0..2).await;
    compact_all(&base, &tables).await.unwrap();
    write_runs(Arc::new(base.clone()), &registry, &tables, 2..4).await;
    let before = base.snapshot();
    assert!(
        before
            .keys()
            .any(|k| k.starts_with("booking_requested/") && k.contains("/c-0-")),
        "an earlier compaction's file is there to be merged again"
    );
    let shards: Vec<ShardId> = SHARDS.iter().map(|s| ShardId((*s).to_owned())).collect();
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let known = floodgate_processors::lake::known_runs(&base, &shards, &names)
        .await
        .unwrap();
    for shard in &shards {
        assert_eq!(known[shard].len(), 4, "{shard}: every run is known");
    }
    let clean = MemoryStore::holding(before.clone());
    compact_all(&clean, &tables).await.unwrap();
    replay(Arc::new(clean.clone()), &registry, &tables, 4).await;
    let expected = Expected {
        rows: table_rows(&contents(&before)),
        known,
        reference: contents(&clean.snapshot()),
        registry,
        tables,
        runs: 4,
    };
    expected.check(&clean, "uninterrupted").await;

    // One fault in the compaction.
    let mut seen = vec![before.clone()];
    let (once, ops) = states_after_a_fault(&before, &FAULTS, &mut seen, |store| {
        let tables = expected.tables.clone();
        async move { compact_all(&*store, &tables).await }
    })
    .await;
    assert!(
        ops >= 40,
        "{ops} operations: several plans of several files"
    );
    // Each plan's pending record, compacted file, input deletions and done record leaves a
    // state of its own.
    assert!(once.len() >= 20, "{} distinct states", once.len());
    // A second: the process dies again while recovering an unfinished plan.
    let mut twice = Vec::new();
    let mut recoveries = 0;
    for state in &once {
        for partition in interrupted(state) {
            recoveries += 1;
            let (new, _) = states_after_a_fault(
                state,
                &[Fault::Crash, Fault::CrashAfter],
                &mut seen,
                |store| {
                    let partition = partition.clone();
                    async move {
                        compact::recover(&*store, &partition)
                            .await
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await;
            twice.extend(new);
        }
    }

    for (i, state) in seen.iter().enumerate() {
        for replay_first in [false, true] {
            let label = format!(
                "state {i} of {} ({} after one fault, {} after two), replay first: {replay_first}",
                seen.len(),
                once.len(),
                twice.len()
            );
            let store = MemoryStore::holding(state.clone());
            let shared: Arc<dyn ObjectStore> = Arc::new(store.clone());
            if replay_first {
                replay(
                    shared.clone(),
                    &expected.registry,
                    &expected.tables,
                    expected.runs,
                )
                .await;
                compact_all(&store, &expected.tables).await.unwrap();
            } else {
                compact_all(&store, &expected.tables).await.unwrap();
                // The recovery alone settles the rows: a running lake does not replay.
                assert_eq!(
                    table_rows(&contents(&store.snapshot())),
                    expected.rows,
                    "{label}: after the recovery (before a replay), rows lost or duplicated"
                );
                replay(
                    shared.clone(),
                    &expected.registry,
                    &expected.tables,
                    expected.runs,
                )
                .await;
            }
            expected.check(&store, &label).await;
        }
    }
    // (A crashed recovery leaves states a crashed compaction left already: its steps are
    // the compaction's last ones, repeated.)
    assert!(recoveries >= 4, "{recoveries} unfinished plans to recover");
    eprintln!(
        "{ops} operations; {} distinct states after one fault, {} more after a crash in \
         one of {recoveries} recoveries",
        once.len(),
        twice.len()
    );
}
