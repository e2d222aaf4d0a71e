//! The conformance suite of the object store role ([`ObjectStore`]), written once and run
//! against every backend.
//!
//! A test binary declares this module and hands the suite a [`StoreFixture`]: a factory of
//! fresh, empty stores. `sinks/tests/object_store.rs` runs it over the local directory
//! store (`floodgate_sinks::LocalDirStore`), and `aws/tests/s3.rs` over S3 on moto server
//! (`floodgate_aws::s3::S3Store`), so "passes the suite" means the same for both.
//!
//! What every store must do: `get` answers what the last `put` stored, whole, and `None`
//! for a key never written or deleted; `put` replaces; `put_new` creates a missing key and
//! leaves an existing one exactly as it was (answering `Exists`), also when writers race;
//! `list` answers the keys starting with the prefix, sorted, with their sizes, and nothing
//! else; `delete` of a missing key is no error. Keys are Hive partition paths
//! (`table/dt=…/hour=…/file.parquet`), and objects span the sizes the lake writes, up to
//! past S3's multipart threshold.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore, PutOutcome};

/// A backend under test.
#[async_trait]
pub trait StoreFixture: Send + Sync {
    /// Names the backend in failure messages.
    fn name(&self) -> String;

    /// A fresh, empty store, shared with no other call.
    async fn store(&self) -> Arc<dyn ObjectStore>;
}

/// A Hive partition key of table `table`, as the lake names its files.
fn hive(table: &str, hour: u32, name: &str) -> String {
    format!("{table}/dt=2026-12-01/hour={hour:02}/{name}")
}

/// `len` bytes that differ from every other `seed`'s and have no period a wrong offset
/// would hide (xorshift64).
fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

async fn keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect()
}

pub async fn put_then_get_answers_the_bytes_and_put_replaces(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    let key = hive("booking_requested", 5, "0-1-9.parquet");
    store.put(&key, Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some(&b"first"[..]),
        "{name}"
    );
    store
        .put(&key, Bytes::from_static(b"second, longer"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some(&b"second, longer"[..]),
        "{name}: put replaces"
    );
    // An empty object is an object.
    let empty = hive("booking_requested", 6, "empty.parquet");
    store.put(&empty, Bytes::new()).await.unwrap();
    assert_eq!(
        store.get(&empty).await.unwrap().as_deref(),
        Some(&b""[..]),
        "{name}"
    );
}

pub async fn a_missing_key_reads_as_none(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    assert!(
        store
            .get("t/never-written.parquet")
            .await
            .unwrap()
            .is_none(),
        "{name}"
    );
    store
        .put("t/a.parquet", Bytes::from_static(b"a"))
        .await
        .unwrap();
    // A key that is a prefix of an object is not that object.
    assert!(store.get("t/a").await.unwrap().is_none(), "{name}");
}

pub async fn put_new_creates_once_and_never_changes_what_exists(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    let key = hive("quarantine", 23, "lake.0-100-199.parquet");
    assert_eq!(
        store
            .put_new(&key, Bytes::from_static(b"original"))
            .await
            .unwrap(),
        PutOutcome::Created,
        "{name}"
    );
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some(&b"original"[..]),
        "{name}"
    );
    assert_eq!(
        store
            .put_new(&key, Bytes::from_static(b"other bytes"))
            .await
            .unwrap(),
        PutOutcome::Exists,
        "{name}: a second put_new of the key"
    );
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some(&b"original"[..]),
        "{name}: Exists changed the stored bytes"
    );
    let listed = store.list("quarantine/").await.unwrap();
    assert_eq!(
        listed,
        [ObjectMeta {
            key: key.clone(),
            size: 8
        }],
        "{name}"
    );
    // An object `put` stored counts as existing too.
    let put_first = hive("quarantine", 23, "lake.0-200-299.parquet");
    store
        .put(&put_first, Bytes::from_static(b"by put"))
        .await
        .unwrap();
    assert_eq!(
        store
            .put_new(&put_first, Bytes::from_static(b"x"))
            .await
            .unwrap(),
        PutOutcome::Exists,
        "{name}"
    );
    assert_eq!(
        store.get(&put_first).await.unwrap().as_deref(),
        Some(&b"by put"[..]),
        "{name}"
    );
    // Once deleted, the key is free again.
    store.delete(&key).await.unwrap();
    assert_eq!(
        store
            .put_new(&key, Bytes::from_static(b"again"))
            .await
            .unwrap(),
        PutOutcome::Created,
        "{name}: put_new after delete"
    );
    assert_eq!(
        store.get(&key).await.unwrap().as_deref(),
        Some(&b"again"[..]),
        "{name}"
    );
}

/// Writers racing to create one key: exactly one creates it, and its bytes are the ones
/// stored.
pub async fn racing_put_news_create_once(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    for round in 0..5u64 {
        let key = hive("t", 1, &format!("0-{round}-{round}.parquet"));
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let bytes = pseudo_random(1000, round * 100 + w);
                    let outcome = store.put_new(&key, bytes.clone()).await.unwrap();
                    (outcome, bytes)
                })
            })
            .collect();
        let mut created = Vec::new();
        for w in writers {
            let (outcome, bytes) = w.await.unwrap();
            if outcome == PutOutcome::Created {
                created.push(bytes);
            }
        }
        assert_eq!(
            created.len(),
            1,
            "{name}: round {round}: {} writers created the key",
            created.len()
        );
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(created[0].clone()),
            "{name}: round {round}: the stored bytes are not the creator's"
        );
    }
}

pub async fn list_answers_the_prefix_sorted_and_nothing_else(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    // Written out of order; `ab` shares `a`'s first letter, `a.x` sorts between them.
    let written = [
        (hive("b", 1, "0-1-1.parquet"), 3),
        (hive("a", 10, "1-5-9.parquet"), 5),
        (hive("ab", 1, "0-1-1.parquet"), 2),
        (hive("a", 2, "0-1-1.parquet"), 1),
        ("a/_compaction.json".to_owned(), 4),
        (hive("a", 2, "0-10-19.parquet"), 7),
        ("a.x/y.parquet".to_owned(), 6),
    ];
    for (key, len) in &written {
        store.put(key, pseudo_random(*len, 1)).await.unwrap();
    }
    let listed = store.list("a/").await.unwrap();
    let mut want: Vec<ObjectMeta> = written
        .iter()
        .filter(|(k, _)| k.starts_with("a/"))
        .map(|(k, len)| ObjectMeta {
            key: k.clone(),
            size: *len as u64,
        })
        .collect();
    want.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(listed, want, "{name}: list(\"a/\")");
    assert_eq!(
        keys(&*store, "a/dt=2026-12-01/hour=02/").await,
        [
            hive("a", 2, "0-1-1.parquet"),
            hive("a", 2, "0-10-19.parquet")
        ],
        "{name}: a partition's prefix"
    );
    // A prefix is a string, not a directory: `a` covers `a.x/` and `ab/` too.
    let mut all: Vec<String> = written.iter().map(|(k, _)| k.clone()).collect();
    all.sort();
    let with_a: Vec<String> = all.iter().filter(|k| k.starts_with('a')).cloned().collect();
    assert_eq!(keys(&*store, "a").await, with_a, "{name}: list(\"a\")");
    assert_eq!(keys(&*store, "").await, all, "{name}: list(\"\")");
    assert!(keys(&*store, "c/").await.is_empty(), "{name}: list(\"c/\")");
    assert!(keys(&*store, "a/dt=2027").await.is_empty(), "{name}");
}

/// Enough objects that S3 answers a listing in several pages (its fixture lists a few
/// keys per page); a local store lists them all the same.
pub async fn list_answers_every_object_of_a_large_prefix(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    let mut want = Vec::new();
    for i in 0..23u32 {
        let key = hive("t", i % 24, &format!("0-{i}-{i}.parquet"));
        store.put(&key, Bytes::from(vec![b'x'; 1])).await.unwrap();
        want.push(key);
    }
    store
        .put("u/other.parquet", Bytes::from_static(b"u"))
        .await
        .unwrap();
    want.sort();
    assert_eq!(keys(&*store, "t/").await, want, "{name}");
}

pub async fn delete_is_idempotent(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    let key = hive("t", 0, "0-1-2.parquet");
    let other = hive("t", 0, "0-3-4.parquet");
    store.put(&key, Bytes::from_static(b"k")).await.unwrap();
    store.put(&other, Bytes::from_static(b"o")).await.unwrap();
    store.delete(&key).await.unwrap();
    assert!(store.get(&key).await.unwrap().is_none(), "{name}");
    store.delete(&key).await.unwrap();
    store.delete("t/never-written.parquet").await.unwrap();
    assert_eq!(
        keys(&*store, "t/").await,
        std::slice::from_ref(&other),
        "{name}"
    );
    assert_eq!(
        store.get(&other).await.unwrap().as_deref(),
        Some(&b"o"[..]),
        "{name}: delete removed another key"
    );
}

/// The lake's keys: `=` in partition directories, several levels of `/`.
pub async fn hive_partition_keys_round_trip(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    let keys_written = [
        "booking_requested/dt=2026-12-01/hour=05/x.parquet",
        "booking_requested/dt=2026-12-01/hour=05/c-0-1-99-4.parquet",
        "booking_requested/dt=2026-12-01/hour=05/_compaction.json",
        "quarantine/dt=2026-12-01/hour=05/lake-derived.0-7-8.parquet",
        "booking_requested/dt=2026-12-02/hour=00/shardId-000000000001-4959-4960.parquet",
    ];
    for (i, key) in keys_written.iter().enumerate() {
        assert_eq!(
            store
                .put_new(key, Bytes::from(key.as_bytes().to_vec()))
                .await
                .unwrap(),
            PutOutcome::Created,
            "{name}: {key} (#{i})"
        );
    }
    for key in keys_written {
        assert_eq!(
            store.get(key).await.unwrap().as_deref(),
            Some(key.as_bytes()),
            "{name}: {key}"
        );
    }
    assert_eq!(
        keys(&*store, "booking_requested/dt=2026-12-01/hour=05/").await,
        [
            "booking_requested/dt=2026-12-01/hour=05/_compaction.json",
            "booking_requested/dt=2026-12-01/hour=05/c-0-1-99-4.parquet",
            "booking_requested/dt=2026-12-01/hour=05/x.parquet",
        ],
        "{name}"
    );
    for key in keys_written {
        store.delete(key).await.unwrap();
    }
    assert!(keys(&*store, "").await.is_empty(), "{name}");
}

pub async fn keys_that_escape_or_are_empty_are_refused(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    for bad in ["", "../escape.parquet", "t/../../escape.parquet"] {
        let refused = |r: Result<(), ObjectError>| matches!(r, Err(ObjectError::InvalidKey(_)));
        assert!(
            refused(store.put(bad, Bytes::from_static(b"x")).await),
            "{name}: put {bad:?}"
        );
        assert!(
            refused(
                store
                    .put_new(bad, Bytes::from_static(b"x"))
                    .await
                    .map(|_| ())
            ),
            "{name}: put_new {bad:?}"
        );
        assert!(
            refused(store.get(bad).await.map(|_| ())),
            "{name}: get {bad:?}"
        );
        assert!(refused(store.delete(bad).await), "{name}: delete {bad:?}");
    }
}

/// A 20 MiB object (past S3's multipart threshold of 16 MiB, so two parts there) round
/// trips byte for byte, through `put_new` and through `put`, and `put_new` of a large
/// object over an existing key changes nothing.
pub async fn a_20_mib_object_round_trips(fixture: &dyn StoreFixture) {
    let name = fixture.name();
    let store = fixture.store().await;
    const LEN: usize = 20 << 20;
    let key = hive("booking_requested", 5, "0-1-1000000.parquet");
    let first = pseudo_random(LEN, 20);
    assert_eq!(
        store.put_new(&key, first.clone()).await.unwrap(),
        PutOutcome::Created,
        "{name}"
    );
    let read = store.get(&key).await.unwrap().unwrap();
    assert!(
        read == first,
        "{name}: the 20 MiB object came back different ({} bytes)",
        read.len()
    );
    assert_eq!(
        store.list("booking_requested/").await.unwrap(),
        [ObjectMeta {
            key: key.clone(),
            size: LEN as u64
        }],
        "{name}"
    );
    let second = pseudo_random(LEN + 1, 21);
    assert_eq!(
        store.put_new(&key, second.clone()).await.unwrap(),
        PutOutcome::Exists,
        "{name}: a large put_new over an existing key"
    );
    let read = store.get(&key).await.unwrap().unwrap();
    assert!(
        read == first,
        "{name}: a large Exists changed the stored bytes"
    );
    store.put(&key, second.clone()).await.unwrap();
    let read = store.get(&key).await.unwrap().unwrap();
    assert!(
        read == second,
        "{name}: a large put did not replace the object"
    );
}
