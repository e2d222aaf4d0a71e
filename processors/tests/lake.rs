//! The lake consumer against what the edge accepts and against a store that fails: every
//! record ends in exactly one table (typed or `quarantine`) exactly once, whatever its
//! values, whichever `put` fails, and however often the runtime retries.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arrow_array::{Array, Int8Array, Int64Array, RecordBatch, StringArray};
use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore, PutOutcome};
use floodgate_core::registry::Registry;
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{Progress, ShardProcessor};
use floodgate_sinks::LocalDirStore;
use serde_json::{Value, json};

/// When the stream received every record: 2026-12-01T15:00:00Z.
const RECEIVED_MS: i64 = 1_796_137_200_000;

fn envelope(id: &str, ty: &str, time: Option<&str>, data: Value) -> Value {
    let mut e = json!({"specversion":"1.0","id":id,"source":"/tests","type":ty,"data":data});
    if let Some(t) = time {
        e["time"] = json!(t);
    }
    e
}

/// `id` as an id the schemas' patterns accept.
fn safe(id: &str) -> String {
    id.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
}

fn booking(id: &str, seats: Value, requested_at: &str) -> Value {
    envelope(
        id,
        "booking.requested",
        Some("2026-12-01T14:00:00Z"),
        json!({"bookingId":format!("bk-{}", safe(id)),"eventId":"E1","customerId":"c1","seats":seats,"requestedAt":requested_at}),
    )
}

/// `payment.succeeded` with `amountMinor` spelled exactly as `amount` (raw JSON).
fn payment_raw(id: &str, amount: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"/tests","type":"payment.succeeded","time":"2026-12-01T14:00:00Z","data":{{"paymentId":"p-{}","bookingId":"bk","eventId":"E1","amountMinor":{amount},"currency":"EUR"}}}}"#,
        safe(id)
    )
}

/// Records of shard `0` from sequence `from`, each event's raw JSON as the stream holds it;
/// every one is first checked to be one the edge accepts.
fn records(registry: &Registry, from: u64, events: &[String]) -> Vec<StoredRecord> {
    events
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let v: Value = serde_json::from_str(raw).unwrap();
            if let Err(e) = registry.check(&v) {
                panic!("the edge would reject {raw}: {e:?}");
            }
            StoredRecord {
                sequence: SequenceNumber::from_u64(from + i as u64),
                key: "E1".to_owned(),
                payload: Bytes::from(raw.clone()),
                appended_at_ms: RECEIVED_MS,
            }
        })
        .collect()
}

fn lake(store: Arc<dyn ObjectStore>, registry: &Registry, roll_bytes: u64) -> LakeProcessor {
    let tables = floodgate_core::lake::tables(registry).unwrap();
    LakeProcessor::new(
        store,
        tables,
        LakeConfig {
            roll_bytes,
            roll_age: Duration::from_secs(3600),
        },
    )
}

/// Every Parquet file under `root`, by its path relative to `root`, read whole.
fn files(root: &Path) -> BTreeMap<String, Vec<RecordBatch>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                let bytes = Bytes::from(std::fs::read(&path).unwrap());
                let batches =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .unwrap()
                        .build()
                        .unwrap()
                        .map(Result::unwrap)
                        .collect();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, batches);
            }
        }
    }
    out
}

/// A string column (plain or dictionary-encoded) as strings.
fn strings(batch: &RecordBatch, column: &str) -> Vec<Option<String>> {
    let c = batch.column_by_name(column).unwrap();
    if let Some(d) = c
        .as_any()
        .downcast_ref::<arrow_array::DictionaryArray<arrow_array::types::Int32Type>>()
    {
        let values = d.values().as_any().downcast_ref::<StringArray>().unwrap();
        return (0..d.len())
            .map(|i| {
                d.is_valid(i)
                    .then(|| values.value(d.keys().value(i) as usize).to_owned())
            })
            .collect();
    }
    let c = c.as_any().downcast_ref::<StringArray>().unwrap();
    (0..c.len())
        .map(|i| c.is_valid(i).then(|| c.value(i).to_owned()))
        .collect()
}

/// `event_id` → the tables holding it, over every file under `root`. The quarantine's
/// rows are keyed by their raw event's id.
fn where_is_each(root: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, batches) in files(root) {
        let table = path.split('/').next().unwrap().to_owned();
        for b in &batches {
            for id in strings(b, "event_id") {
                out.entry(id.unwrap_or_default())
                    .or_default()
                    .push(table.clone());
            }
        }
    }
    out
}

/// Drives `p` the way the consumer runtime does: each batch is retried from the same
/// position until `process` succeeds, then the final flush until it succeeds.
async fn drive(p: &LakeProcessor, shard: &ShardId, batches: &[Vec<StoredRecord>]) -> usize {
    drive_checking(p, shard, batches, None).await
}

/// [`drive`], and after every failure, checks that the files under `root` are those of
/// runs already durable and of one run more at most: the pinned run, whose retry writes
/// the same names (a failed flush leaves its files; see `undo` in the lake). A second
/// run past what is durable would be an orphan that a later, longer run duplicates.
async fn drive_checking(
    p: &LakeProcessor,
    shard: &ShardId,
    batches: &[Vec<StoredRecord>],
    root: Option<&Path>,
) -> usize {
    let mut failures = 0;
    let mut failed = |p: &LakeProcessor| {
        failures += 1;
        assert!(failures < 100, "the lake is wedged");
        if let Some(root) = root {
            let durable = match p.progress(shard) {
                Progress::Through(s) => s.and_then(|s| s.as_u64()),
                Progress::All => unreachable!("the lake buffers"),
            };
            let pending: std::collections::BTreeSet<_> = runs(root)
                .into_iter()
                .filter(|(_, last)| durable.is_none_or(|d| *last > d))
                .collect();
            assert!(
                pending.len() <= 1,
                "failed flushes left the files of runs {pending:?} (durable: {durable:?})"
            );
        }
    };
    for batch in batches {
        while p.process(shard, batch).await.is_err() {
            failed(p);
        }
    }
    while p.tick(shard, true).await.is_err() {
        failed(p);
    }
    failures
}

/// Values the edge's validator accepts, at the edges of what the lake's columns hold:
/// each lands once, in its typed table when the column can hold it, else in the
/// quarantine with the pointer and why; and the consumer moves on.
#[tokio::test]
async fn every_value_the_edge_accepts_lands_once_typed_or_quarantined() {
    let registry = Registry::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let typed: Vec<(&str, Value)> = vec![
        ("leap", booking("leap", json!(2), "2026-03-15T23:59:60Z")),
        ("lower", booking("lower", json!(2), "2026-03-15t10:00:00z")),
        (
            "long-fraction",
            booking(
                "long-fraction",
                json!(2),
                "2026-03-15T10:00:00.123456789123456Z",
            ),
        ),
        (
            "unknown-offset",
            booking("unknown-offset", json!(2), "2026-03-15T10:00:00-00:00"),
        ),
        (
            "far-offset",
            booking("far-offset", json!(2), "0000-01-01T00:00:00+23:59"),
        ),
        (
            "year-9999",
            booking("year-9999", json!(2), "9999-12-31T23:59:59.999999Z"),
        ),
        (
            "seats-2.0",
            booking("seats-2.0", json!(2.0), "2026-03-15T10:00:00Z"),
        ),
        (
            "seats-1e0",
            booking("seats-1e0", json!(1e0), "2026-03-15T10:00:00Z"),
        ),
        (
            "seats-20",
            booking("seats-20", json!(20), "2026-03-15T10:00:00Z"),
        ),
    ];
    let mut raw: Vec<String> = typed.iter().map(|(_, e)| e.to_string()).collect();
    // Integers as the edge reads them: `1e30` and 2^64 are valid `integer`s with no
    // maximum, but no int64 holds them.
    for (id, amount) in [
        ("amount-max", "9223372036854775807"),
        ("amount-2.0", "1500.0"),
        ("amount-1e30", "1e30"),
        ("amount-2^64", "18446744073709551616"),
        ("amount-2^63", "9223372036854775808"),
        ("amount-u64max", "18446744073709551615"),
    ] {
        raw.push(payment_raw(id, amount));
    }
    let p = lake(store.clone(), &registry, 1 << 30);
    let shard = ShardId("0".to_owned());
    let recs = records(&registry, 0, &raw);
    assert_eq!(drive(&p, &shard, &[recs]).await, 0);
    assert_eq!(
        p.progress(&shard),
        Progress::Through(Some(SequenceNumber::from_u64(raw.len() as u64 - 1))),
        "the lake moved past every record"
    );

    let at = where_is_each(dir.path());
    for id in [
        "leap",
        "lower",
        "long-fraction",
        "unknown-offset",
        "far-offset",
        "year-9999",
        "seats-2.0",
        "seats-1e0",
        "seats-20",
    ] {
        assert_eq!(at[id], ["booking_requested"], "{id}");
    }
    for id in ["amount-max", "amount-2.0"] {
        assert_eq!(at[id], ["payment_succeeded"], "{id}");
    }
    for id in ["amount-1e30", "amount-2^64", "amount-2^63", "amount-u64max"] {
        assert_eq!(at[id], ["quarantine"], "{id}");
    }
    assert_eq!(at.len(), raw.len());

    // The values as stored.
    let all = files(dir.path());
    let (_, bookings) = all
        .iter()
        .find(|(k, _)| k.starts_with("booking_requested/"))
        .unwrap();
    assert_eq!(bookings.len(), 1);
    let b = &bookings[0];
    let ids = strings(b, "event_id");
    let seats = b
        .column_by_name("seats")
        .unwrap()
        .as_any()
        .downcast_ref::<Int8Array>()
        .unwrap();
    let requested = b
        .column_by_name("requested_at")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
        .unwrap();
    let row = |id: &str| ids.iter().position(|x| x.as_deref() == Some(id)).unwrap();
    assert_eq!(seats.value(row("seats-2.0")), 2);
    assert_eq!(seats.value(row("seats-1e0")), 1);
    let leap = floodgate_core::rfc3339::date_time_micros("2026-03-15T23:59:59.999999Z");
    assert_eq!(Some(requested.value(row("leap"))), leap);
    assert_eq!(
        Some(requested.value(row("long-fraction"))),
        floodgate_core::rfc3339::date_time_micros("2026-03-15T10:00:00.123456Z")
    );
    let (_, payments) = all
        .iter()
        .find(|(k, _)| k.starts_with("payment_succeeded/"))
        .unwrap();
    let amounts: Vec<i64> = payments
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("amount_minor")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            a.values().to_vec()
        })
        .collect();
    assert_eq!(amounts.iter().copied().max(), Some(i64::MAX));
    assert!(amounts.contains(&1500));

    // The quarantine names the pointer and why, keeps the raw event, and its file and
    // `shard` say which consumer diverted it.
    let (path, held) = all
        .iter()
        .find(|(k, _)| k.starts_with("quarantine/"))
        .unwrap();
    assert!(
        path.ends_with("/lake.0-0-14.parquet"),
        "a diverted file's name: {path}"
    );
    assert_eq!(held.len(), 1);
    let held = &held[0];
    assert_eq!(held.num_rows(), 4);
    let raws = strings(held, "raw");
    assert!(
        raws.iter()
            .any(|r| r.as_deref().unwrap().contains("\"amountMinor\":1e30"))
    );
    assert!(
        strings(held, "shard")
            .iter()
            .all(|s| s.as_deref() == Some("lake.0"))
    );
    let reasons = held
        .column_by_name("reasons")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::ListArray>()
        .unwrap();
    for i in 0..held.num_rows() {
        let r = reasons.value(i);
        let r = r
            .as_any()
            .downcast_ref::<arrow_array::StructArray>()
            .unwrap();
        let pointer = r.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let message = r.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(pointer.value(0), "/data/amountMinor");
        assert!(
            message
                .value(0)
                .ends_with("does not fit the lake's int64 column"),
            "{}",
            message.value(0)
        );
    }
}

/// Item 12 of issue 9: a producer's clock must not put an event where Athena's partition
/// projection (`dt` over 2020-01-01..NOW) never looks. Every partition lies within 7 days
/// before the time the stream received the event, and the `time` column keeps the
/// producer's value.
#[tokio::test]
async fn partitions_stay_within_the_projected_range_whatever_the_producers_clock() {
    let registry = Registry::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let times = [
        ("t1900", Some("1900-01-01T00:00:00Z")),
        ("t0061", Some("0061-04-27T12:00:00Z")),
        ("t2999", Some("2999-06-01T00:00:00Z")),
        ("tsoon", Some("2026-12-01T15:00:01Z")),
        ("tnow", Some("2026-12-01T15:00:00Z")),
        ("tlate", Some("2026-11-28T09:30:00Z")),
        ("tnone", None),
    ];
    let raw: Vec<String> = times
        .iter()
        .map(|(id, t)| {
            envelope(
                id,
                "booking.cancelled",
                *t,
                json!({"bookingId":"bk","eventId":"E1"}),
            )
            .to_string()
        })
        .collect();
    let p = lake(store, &registry, 1 << 30);
    let shard = ShardId("0".to_owned());
    drive(&p, &shard, &[records(&registry, 0, &raw)]).await;
    let mut partition_of = HashMap::new();
    for (path, batches) in files(dir.path()) {
        let partition = path.rsplit_once('/').unwrap().0.to_owned();
        for b in &batches {
            for id in strings(b, "event_id") {
                partition_of.insert(id.unwrap(), partition.clone());
            }
        }
    }
    let received = "booking_cancelled/dt=2026-12-01/hour=15";
    for id in ["t1900", "t0061", "t2999", "tsoon", "tnow", "tnone"] {
        assert_eq!(partition_of[id], received, "{id}");
    }
    assert_eq!(
        partition_of["tlate"], "booking_cancelled/dt=2026-11-28/hour=09",
        "3 days late: its own time"
    );
    // Both timestamps are kept.
    let all = files(dir.path());
    let b = &all[&format!("{received}/0-0-6.parquet")][0];
    let time = b
        .column_by_name("time")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
        .unwrap();
    let ids = strings(b, "event_id");
    let i = ids
        .iter()
        .position(|x| x.as_deref() == Some("t0061"))
        .unwrap();
    assert_eq!(
        Some(time.value(i)),
        floodgate_core::rfc3339::date_time_micros("0061-04-27T12:00:00Z")
    );
}

/// Fails the `fail_at`-th write (1-based, counting every `put` and `put_new`), and every
/// `delete` while `deletes_fail` is set; otherwise the real local store.
#[derive(Debug)]
struct FailingStore {
    inner: LocalDirStore,
    puts: AtomicUsize,
    fail_at: usize,
    deletes_fail: AtomicBool,
}

fn injected(key: &str) -> ObjectError {
    ObjectError::Io {
        key: key.to_owned(),
        message: "injected failure".to_owned(),
    }
}

#[async_trait]
impl ObjectStore for FailingStore {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        if self.puts.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(injected(key));
        }
        self.inner.put(key, bytes).await
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        if self.puts.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(injected(key));
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
        if self.deletes_fail.load(Ordering::SeqCst) {
            return Err(injected(key));
        }
        self.inner.delete(key).await
    }
}

/// A mixed stream: every run writes several tables' files and a quarantine file.
fn mixed(registry: &Registry, n: usize) -> Vec<StoredRecord> {
    let raw: Vec<String> = (0..n)
        .map(|i| match i % 4 {
            0 => booking(&format!("m{i}"), json!(1 + i % 20), "2026-12-01T10:00:00Z").to_string(),
            1 => payment_raw(&format!("m{i}"), &format!("{i}")),
            // Diverted: does not fit the int64 column.
            2 => payment_raw(&format!("m{i}"), "1e30"),
            _ => envelope(
                &format!("m{i}"),
                "booking.cancelled",
                Some(["2026-12-01T10:00:00Z", "2026-11-30T10:00:00Z"][i % 2]),
                json!({"bookingId":"bk","eventId":"E1"}),
            )
            .to_string(),
        })
        .collect();
    records(registry, 0, &raw)
}

/// The runs of shard `0`'s files under `root`, from their names, each once, in order.
fn runs(root: &Path) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for path in files(root).keys() {
        let name = path.rsplit('/').next().unwrap();
        let name = name.strip_prefix("lake.").unwrap_or(name);
        let (first, last) = floodgate_processors::lake::parse_file_name(name, "0")
            .unwrap_or_else(|| panic!("unexpected file {path}"));
        let run = (first.parse().unwrap(), last.parse().unwrap());
        if !runs.contains(&run) {
            runs.push(run);
        }
    }
    runs.sort();
    runs
}

/// Runs never overlap: a longer run beside a shorter one holds rows twice.
fn assert_runs_disjoint(root: &Path) {
    for w in runs(root).windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "overlapping runs {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}

fn assert_no_temporaries(root: &Path) {
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(name.ends_with(".parquet"), "left behind: {name}");
            }
        }
    }
}

/// Item 2 of issue 9 (from reading): a failed flush lost rows, left orphan files that a
/// later, longer run duplicated, and a retried batch was buffered twice. With the k-th put
/// failing, for every k: each record lands exactly once, in one run, with no orphan.
#[tokio::test]
async fn a_failed_put_leaves_no_orphan_and_the_retry_writes_every_row_once() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 120);
    let ids: Vec<String> = (0..all.len()).map(|i| format!("m{i}")).collect();
    // Batches as the runtime reads them, with runs (by size) ending inside batches.
    let batches: Vec<Vec<StoredRecord>> = all.chunks(25).map(<[_]>::to_vec).collect();
    let mut total_puts = None;
    let mut k = 1;
    // Twice through every k: with the failed flush's files removed, and with the store
    // refusing to remove them (the pinned retry then overwrites them).
    let rounds = (1..).flat_map(|k| [(k, false), (k, true)]);
    for (k_now, deletes_fail) in rounds {
        k = k_now;
        if total_puts.is_some_and(|t| k > t) {
            break;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore {
            inner: LocalDirStore::open(dir.path()).unwrap(),
            puts: AtomicUsize::new(0),
            fail_at: k,
            deletes_fail: AtomicBool::new(deletes_fail),
        });
        let p = lake(store.clone(), &registry, 4_000);
        let shard = ShardId("0".to_owned());
        let check = (!deletes_fail).then_some(dir.path());
        let failures = drive_checking(&p, &shard, &batches, check).await;
        assert_eq!(
            p.progress(&shard),
            Progress::Through(Some(SequenceNumber::from_u64(all.len() as u64 - 1)))
        );
        let at = where_is_each(dir.path());
        assert_eq!(
            at.keys().cloned().collect::<Vec<_>>().len(),
            ids.len(),
            "k={k}"
        );
        for (id, tables) in &at {
            assert_eq!(tables.len(), 1, "k={k}: {id} is in {tables:?}");
        }
        assert_runs_disjoint(dir.path());
        assert_no_temporaries(dir.path());
        let puts = store.puts.load(Ordering::SeqCst);
        if total_puts.is_none() {
            // The first round fails once; what it writes in all bounds the rounds.
            assert_eq!(failures, 1);
            total_puts = Some(puts - 1);
        }
    }
    assert!(k > 1);
    assert!(
        total_puts.unwrap() > 12,
        "{total_puts:?} puts: several runs of several files"
    );
}

/// A flush fails and its files cannot be removed (the store is down), then the process
/// dies; the next one replays from the checkpoint and rewrites the unfinished run whole,
/// also when the only file a run left is its quarantine file (`lake.0-…`).
#[tokio::test]
async fn a_restart_after_a_failed_flush_rewrites_the_same_runs() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 60);
    for k in 1..=12 {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore {
            inner: LocalDirStore::open(dir.path()).unwrap(),
            puts: AtomicUsize::new(0),
            fail_at: k,
            deletes_fail: AtomicBool::new(true),
        });
        let shard = ShardId("0".to_owned());
        let first = lake(store.clone(), &registry, 3_000);
        let mut committed = None;
        for batch in all.chunks(20) {
            if first.process(&shard, batch).await.is_err() {
                break;
            }
            if let Progress::Through(Some(s)) = first.progress(&shard) {
                committed = Some(s);
            }
        }
        drop(first);
        store.deletes_fail.store(false, Ordering::SeqCst);
        // The next process: from after the checkpoint, with the rest of the stream.
        let second = lake(store.clone(), &registry, 3_000);
        let rest: Vec<StoredRecord> = all
            .iter()
            .filter(|r| committed.as_ref().is_none_or(|c| r.sequence > *c))
            .cloned()
            .collect();
        drive(&second, &shard, &[rest]).await;
        let at = where_is_each(dir.path());
        assert_eq!(at.len(), all.len(), "k={k}");
        for (id, tables) in &at {
            assert_eq!(tables.len(), 1, "k={k}: {id} is in {tables:?}");
        }
        assert_runs_disjoint(dir.path());
    }
    // A run of diverted rows alone, written whole, but its checkpoint never committed.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let shard = ShardId("0".to_owned());
    let bad: Vec<String> = (0..5)
        .map(|i| payment_raw(&format!("q{i}"), "1e30"))
        .collect();
    let first = lake(store.clone(), &registry, 1 << 30);
    drive(&first, &shard, &[records(&registry, 0, &bad)]).await;
    drop(first);
    let mut more = bad.clone();
    more.extend((5..9).map(|i| payment_raw(&format!("q{i}"), "1e30")));
    let second = lake(store, &registry, 1 << 30);
    drive(&second, &shard, &[records(&registry, 0, &more)]).await;
    let at = where_is_each(dir.path());
    assert_eq!(at.len(), 9);
    assert!(at.values().all(|t| t == &["quarantine"]), "{at:?}");
    assert_runs_disjoint(dir.path());
}

/// The quarantine log's consumer (one shard, `0`) and the lake's diversions from the
/// stream's shard `0` share the quarantine table: their files never take each other's
/// names, and neither counts the other's runs as its own.
#[tokio::test]
async fn the_quarantine_logs_consumer_and_the_lakes_diversions_do_not_collide() {
    let registry = Registry::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let shard = ShardId("0".to_owned());
    let config = LakeConfig {
        roll_bytes: 1 << 30,
        roll_age: Duration::from_secs(3600),
    };
    let bad: Vec<String> = (0..2)
        .map(|i| payment_raw(&format!("d{i}"), "1e30"))
        .collect();
    let events = lake(store.clone(), &registry, 1 << 30);
    drive(&events, &shard, &[records(&registry, 0, &bad)]).await;
    let held: Vec<StoredRecord> = (0..4u64)
        .map(|i| StoredRecord {
            sequence: SequenceNumber::from_u64(i),
            key: "quarantine".to_owned(),
            payload: Bytes::from(
                json!({"raw": format!(r#"{{"id":"r{i}"}}"#), "reasons":[{"pointer":"/type","message":"missing"}]})
                    .to_string(),
            ),
            appended_at_ms: RECEIVED_MS,
        })
        .collect();
    // Twice, as after a restart: its own discovery must not pick up the lake's runs.
    for _ in 0..2 {
        let q = LakeProcessor::quarantine(store.clone(), config.clone());
        drive(&q, &shard, std::slice::from_ref(&held)).await;
    }
    let names: Vec<String> = files(dir.path()).into_keys().collect();
    assert_eq!(
        names,
        [
            "quarantine/dt=2026-12-01/hour=15/0-0-3.parquet",
            "quarantine/dt=2026-12-01/hour=15/lake.0-0-1.parquet"
        ]
    );
    let at = where_is_each(dir.path());
    assert_eq!(at.len(), 6);
    assert!(at.values().all(|t| t.len() == 1), "{at:?}");
    // Discovery as `lake rebuild` asks it: the lake's run, and the quarantine log's.
    let lake_runs = floodgate_processors::lake::runs_in(
        &*store,
        std::slice::from_ref(&shard),
        &["payment_succeeded".to_owned()],
    )
    .await
    .unwrap();
    assert_eq!(lake_runs[&shard], [SequenceNumber::from_u64(1)]);
    let q_runs = floodgate_processors::lake::known_runs(
        &*store,
        std::slice::from_ref(&shard),
        &["quarantine".to_owned()],
    )
    .await
    .unwrap();
    assert_eq!(
        q_runs[&shard],
        [(SequenceNumber::from_u64(0), SequenceNumber::from_u64(3))]
    );
}

/// A worker takes a shard back after another worker wrote the shard's runs meanwhile:
/// what it buffered in its earlier tenure is stale, and must not be written (it would
/// hold rows the other worker wrote, in an overlapping run).
#[tokio::test]
async fn a_worker_taking_a_shard_back_forgets_its_earlier_buffer() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 80);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let shard = ShardId("0".to_owned());
    let a = lake(store.clone(), &registry, 1 << 30);
    let b = lake(store.clone(), &registry, 1 << 30);
    // A buffers 0..30, then loses the lease without a flush.
    a.start_position(&shard).await.unwrap();
    a.process(&shard, &all[..30]).await.unwrap();
    // B takes the shard, writes 0..60 and checkpoints there.
    b.start_position(&shard).await.unwrap();
    drive(&b, &shard, &[all[..60].to_vec()]).await;
    // A takes it back, from B's checkpoint.
    a.start_position(&shard).await.unwrap();
    drive(&a, &shard, &[all[60..].to_vec()]).await;
    let at = where_is_each(dir.path());
    assert_eq!(at.len(), all.len());
    for (id, tables) in &at {
        assert_eq!(tables.len(), 1, "{id} is in {tables:?}");
    }
    assert_runs_disjoint(dir.path());
}

/// The local store, recording every prefix listed and every key replaced (`put`).
#[derive(Debug)]
struct ListingStore {
    inner: LocalDirStore,
    listed: std::sync::Mutex<Vec<String>>,
    replaced: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl ObjectStore for ListingStore {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        self.replaced.lock().unwrap().push(key.to_owned());
        self.inner.put(key, bytes).await
    }
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        self.inner.put_new(key, bytes).await
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.listed.lock().unwrap().push(prefix.to_owned());
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.inner.delete(key).await
    }
}

/// Issue 12: on S3 a listing is a request per 1,000 keys, so a shard's start must not list
/// the whole lake to find its runs: only the consumer's tables and the quarantine (for the
/// rows it diverted), each by its own `<table>/` prefix. The runs found are the same: the
/// restarted consumer reproduces the run a crash left unfinished, with `put_new` only.
#[tokio::test]
async fn finding_runs_lists_only_the_consumers_tables() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 40);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ListingStore {
        inner: LocalDirStore::open(dir.path()).unwrap(),
        listed: Default::default(),
        replaced: Default::default(),
    });
    let shard = ShardId("0".to_owned());
    // The files of run 0..=19, as a flush that crashed before its checkpoint left them.
    let first = lake(store.clone(), &registry, 1 << 30);
    drive(&first, &shard, &[all[..20].to_vec()]).await;
    let run_files = files(dir.path());
    // A table of no consumer's: never listed.
    store
        .inner
        .put(
            "zz_other/dt=2026-12-01/hour=10/0-0-99.parquet",
            Bytes::new(),
        )
        .await
        .unwrap();
    store.listed.lock().unwrap().clear();
    let restarted = lake(store.clone(), &registry, 1 << 30);
    restarted.start_position(&shard).await.unwrap();
    drive(&restarted, &shard, std::slice::from_ref(&all)).await;
    let listed = store.listed.lock().unwrap().clone();
    let mut tables = restarted.table_names();
    tables.push("quarantine".to_owned());
    assert!(!listed.is_empty(), "no run discovery at all");
    for prefix in &listed {
        let table = prefix
            .strip_suffix('/')
            .unwrap_or_else(|| panic!("listed {prefix:?}"));
        assert!(tables.iter().any(|t| t == table), "listed {prefix:?}");
    }
    // The crashed run was found: its files were reproduced under the same names, and
    // the rest of the records form one more run.
    store
        .delete("zz_other/dt=2026-12-01/hour=10/0-0-99.parquet")
        .await
        .unwrap();
    let after = files(dir.path());
    for name in run_files.keys() {
        assert!(after.contains_key(name), "{name} gone");
    }
    assert_eq!(runs(dir.path()), [(0, 19), (20, 39)]);
    // Issue 12: the lake never replaces a data file; it creates it or finds it there.
    let replaced = store.replaced.lock().unwrap().clone();
    assert!(
        replaced.is_empty(),
        "data files written by put: {replaced:?}"
    );
}

/// Found in review: a tenure reproducing the runs the store holds waited for each run's
/// last record, and one it never saw (dropped as a repeat by the consumer runtime, which
/// an earlier tenure had not dropped) held the buffer for good: it never rolled, and at
/// shutdown nothing was written. Now the buffer ends there, under the stored run's name.
#[tokio::test]
async fn a_stored_runs_end_this_tenure_never_sees_ends_the_run_all_the_same() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 20);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalDirStore::open(dir.path()).unwrap());
    let shard = ShardId("0".to_owned());
    // The first tenure writes run 0-9.
    let first = lake(store.clone(), &registry, 1 << 30);
    drive(&first, &shard, &[all[..10].to_vec()]).await;
    assert_eq!(runs(dir.path()), vec![(0, 9)]);
    // The next one replays from the start, but record 9 never reaches it.
    let next = lake(store, &registry, 1 << 30);
    let seen: Vec<StoredRecord> = all
        .iter()
        .filter(|r| r.sequence.as_u64() != Some(9))
        .cloned()
        .collect();
    drive(&next, &shard, &[seen[..12].to_vec(), seen[12..].to_vec()]).await;
    assert_eq!(
        next.progress(&shard),
        Progress::Through(Some(SequenceNumber::from_u64(19)))
    );
    assert_eq!(runs(dir.path()), vec![(0, 9), (10, 19)]);
    for (id, tables) in where_is_each(dir.path()) {
        assert_eq!(tables.len(), 1, "{id} is in {tables:?}");
    }
}

/// Found in review: a failed flush removed the files it had written, but another worker
/// that took the shard meanwhile may have found one, counted it written (create-only:
/// "exists") and moved its checkpoint past it; the removal then lost those rows. A failed
/// flush now leaves its files: each holds exactly the pinned run's rows under its name.
#[tokio::test]
async fn a_failed_flush_leaves_the_files_it_wrote() {
    let registry = Registry::builtin().unwrap();
    let all = mixed(&registry, 12);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore {
        inner: LocalDirStore::open(dir.path()).unwrap(),
        puts: AtomicUsize::new(0),
        fail_at: 2,
        deletes_fail: AtomicBool::new(false),
    });
    let p = lake(store, &registry, 1 << 30);
    let shard = ShardId("0".to_owned());
    assert!(p.process(&shard, &all).await.is_ok());
    assert!(p.tick(&shard, true).await.is_err(), "the 2nd put fails");
    let left = files(dir.path());
    assert_eq!(left.len(), 1, "the 1st file stays: {:?}", left.keys());
    // The retry writes the rest of the same run.
    p.tick(&shard, true).await.unwrap();
    assert_eq!(runs(dir.path()), vec![(0, 11)]);
    for (id, tables) in where_is_each(dir.path()) {
        assert_eq!(tables.len(), 1, "{id} is in {tables:?}");
    }
}
