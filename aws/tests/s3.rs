//! The lake's S3 store on moto server: the object store conformance suite
//! (`sinks/tests/object_store_conformance/`), and what only S3 does — the CRC32C S3 is
//! sent and stores, multipart uploads (and their abort when `If-None-Match` refuses one),
//! listing across ListObjectsV2 pages, path-style clients from an SDK config, errors that
//! name S3's code, conflicts retried and lost answers (through the fault proxy) — and the lake consumer writing Parquet to S3 that pyarrow and DuckDB
//! read back. Each test starts its own moto server (`scripts/emulators` installs it).
#![cfg(feature = "emulator-tests")]

// All of the suite but `racing_put_news_create_once`: on S3 that a race has one winner is
// S3's doing (`If-None-Match` is checked atomically), and moto server checks the header
// and stores the object in two steps of a threaded handler, under no lock. (It passed 60
// races of 8 writers, but nothing makes it hold, and a flaky test helps no one.)
#[allow(dead_code)]
#[path = "../../sinks/tests/object_store_conformance/mod.rs"]
mod object_store_conformance;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::types::ChecksumMode;
use bytes::Bytes;
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, Phase, Rule};
use floodgate_aws::s3::S3Store;
use floodgate_core::object_store::{ObjectError, ObjectStore, PutOutcome};
use floodgate_core::registry::Registry;
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::ShardProcessor;
use object_store_conformance::StoreFixture;
use serde_json::{Value, json};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn moto() -> Emulator {
    emulator::moto().unwrap_or_else(|e| panic!("moto server: {e}"))
}

/// Keys every bucket of these tests holds outside the store's prefix (`lake/`), or as
/// "folder" markers inside it, none of which a store may list: a string neighbour of the
/// prefix, the bucket's root, and markers as consoles create them.
const DECOYS: [&str; 5] = [
    "lakehouse/t/dt=2026-12-01/hour=01/0-1-1.parquet",
    "t/dt=2026-12-01/hour=01/0-1-1.parquet",
    "a/dt=2026-12-01/hour=02/0-1-1.parquet",
    "lake/",
    "lake/t/",
];

/// Listing pages of the stores under test: small, so every listing of the suite with
/// more than this many objects takes several ListObjectsV2 requests.
const PAGE_KEYS: i32 = 2;

async fn bucket_with_decoys(client: &aws_sdk_s3::Client, bucket: &str) {
    client.create_bucket().bucket(bucket).send().await.unwrap();
    for key in DECOYS {
        client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(Bytes::from_static(b"decoy").into())
            .send()
            .await
            .unwrap();
    }
}

/// Stores on fresh buckets of one moto server, under `lake/`.
struct Moto {
    emulator: Emulator,
    buckets: AtomicUsize,
}

impl Moto {
    fn new() -> Self {
        Self {
            emulator: moto(),
            buckets: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl StoreFixture for Moto {
    fn name(&self) -> String {
        "S3Store on moto".into()
    }

    async fn store(&self) -> Arc<dyn ObjectStore> {
        let client = self.emulator.s3_client();
        let bucket = format!("lake-{}", self.buckets.fetch_add(1, Ordering::SeqCst));
        bucket_with_decoys(&client, &bucket).await;
        Arc::new(S3Store::new(client, bucket, "lake/").with_list_page_keys(PAGE_KEYS))
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                rt().block_on(object_store_conformance::$test(&Moto::new()));
            }
        )*
    };
}

conformance!(
    put_then_get_answers_the_bytes_and_put_replaces,
    a_missing_key_reads_as_none,
    put_new_creates_once_and_never_changes_what_exists,
    list_answers_the_prefix_sorted_and_nothing_else,
    list_answers_every_object_of_a_large_prefix,
    delete_is_idempotent,
    hive_partition_keys_round_trip,
    keys_that_escape_or_are_empty_are_refused,
    a_20_mib_object_round_trips,
);

/// The decoys are where the suite left them: no store call reached outside its prefix.
#[test]
fn a_store_never_touches_keys_outside_its_prefix() {
    rt().block_on(async {
        let moto = Moto::new();
        let client = moto.emulator.s3_client();
        let store = moto.store().await;
        store
            .put(
                "t/dt=2026-12-01/hour=01/0-1-1.parquet",
                Bytes::from_static(b"mine"),
            )
            .await
            .unwrap();
        store
            .delete("t/dt=2026-12-01/hour=01/0-1-1.parquet")
            .await
            .unwrap();
        assert!(store.list("").await.unwrap().is_empty());
        for key in DECOYS {
            let o = client
                .get_object()
                .bucket("lake-0")
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{key}: {e:?}"));
            assert_eq!(&o.body.collect().await.unwrap().into_bytes()[..], b"decoy");
        }
    });
}

/// S3 checks an object's CRC32C only if the client sends one: every write of the store
/// carries it, and S3 (moto) keeps it with the object. (moto stores it without checking
/// it against the body; real S3 refuses a body that does not match.)
#[test]
fn every_write_carries_a_crc32c_that_s3_keeps() {
    rt().block_on(async {
        let moto = Moto::new();
        let client = moto.emulator.s3_client();
        let store = moto.store().await;
        let small = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        let large = "t/dt=2026-12-01/hour=01/0-2-2.parquet";
        assert_eq!(
            store
                .put_new(small, Bytes::from_static(b"small"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        store
            .put(large, Bytes::from(vec![7u8; 17 << 20]))
            .await
            .unwrap();
        for key in [small, large] {
            // The SDK checks the body it receives against the checksum S3 returns.
            let o = client
                .get_object()
                .bucket("lake-0")
                .key(format!("lake/{key}"))
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
                .unwrap();
            assert!(
                o.checksum_crc32_c().is_some(),
                "{key}: no CRC32C stored: {o:?}"
            );
        }
    });
}

/// Above 16 MiB the store uploads in parts (a multipart ETag ends in `-<parts>`); a
/// create-only upload that `If-None-Match` refuses is aborted, so no parts are left.
#[test]
fn large_objects_go_in_parts_and_a_refused_upload_is_aborted() {
    rt().block_on(async {
        let moto = Moto::new();
        let client = moto.emulator.s3_client();
        let store = moto.store().await;
        let key = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        let bytes = Bytes::from(vec![1u8; (16 << 20) + 1]);
        assert_eq!(
            store.put_new(key, bytes.clone()).await.unwrap(),
            PutOutcome::Created
        );
        let head = client
            .head_object()
            .bucket("lake-0")
            .key(format!("lake/{key}"))
            .send()
            .await
            .unwrap();
        assert!(
            head.e_tag()
                .is_some_and(|t| t.trim_matches('"').ends_with("-2")),
            "not a 2-part upload: {:?}",
            head.e_tag()
        );
        assert_eq!(store.put_new(key, bytes).await.unwrap(), PutOutcome::Exists);
        let uploads = client
            .list_multipart_uploads()
            .bucket("lake-0")
            .send()
            .await
            .unwrap();
        assert!(
            uploads.uploads().is_empty(),
            "uploads left open: {:?}",
            uploads.uploads()
        );
        // A replace never conflicts with itself: no condition, no abort.
        store
            .put(key, Bytes::from(vec![2u8; (16 << 20) + 1]))
            .await
            .unwrap();
        assert_eq!(store.get(key).await.unwrap().unwrap()[0], 2);
    });
}

/// The store built from an SDK config the way the binary builds one ([`S3Store::from_sdk`]):
/// with the endpoint in `[aws]` or given for S3 alone, it addresses buckets by path, as an
/// emulator or an S3-compatible store needs (a virtual-host request would go to
/// `lake-0.localhost`, a name that does not resolve).
#[test]
fn a_store_from_an_sdk_config_with_an_endpoint_uses_path_style() {
    rt().block_on(async {
        let moto = Moto::new();
        bucket_with_decoys(&moto.emulator.s3_client(), "lake-0").await;
        let sdk = |endpoint: Option<&str>| {
            let mut b = aws_config::SdkConfig::builder()
                .behavior_version(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .credentials_provider(
                    aws_credential_types::provider::SharedCredentialsProvider::new(
                        aws_credential_types::Credentials::new("test", "test", None, None, "t"),
                    ),
                );
            if let Some(e) = endpoint {
                b = b.endpoint_url(e);
            }
            b.build()
        };
        // By name: for an IP address the SDK picks path-style URLs by itself.
        let endpoint = format!("http://localhost:{}", moto.emulator.addr.port());
        let endpoint = endpoint.as_str();
        for (name, store) in [
            (
                "[aws] endpoint",
                S3Store::from_sdk(&sdk(Some(endpoint)), None, "lake-0", "lake"),
            ),
            (
                "S3 endpoint",
                S3Store::from_sdk(&sdk(None), Some(endpoint), "lake-0", "lake"),
            ),
        ] {
            let key = "t/dt=2026-12-01/hour=03/x.parquet";
            store
                .put(key, Bytes::from_static(b"x"))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                store.get(key).await.unwrap().as_deref(),
                Some(&b"x"[..]),
                "{name}"
            );
        }
    });
}

/// A missing bucket is an error naming S3's code, the bucket and the key, for reads too
/// (a `None` would read as an empty lake).
#[test]
fn errors_name_the_s3_code_bucket_and_key() {
    rt().block_on(async {
        let moto = Moto::new();
        let store = S3Store::new(moto.emulator.s3_client(), "no-such-bucket", "lake/");
        let key = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        let errors = [
            (
                "put_new",
                store
                    .put_new(key, Bytes::from_static(b"x"))
                    .await
                    .map(|_| ()),
            ),
            ("get", store.get(key).await.map(|_| ())),
            ("list", store.list("t/").await.map(|_| ())),
        ];
        for (op, result) in errors {
            let Err(ObjectError::Io { message, .. }) = result else {
                panic!("{op}: {result:?}");
            };
            assert!(
                message.contains("NoSuchBucket") && message.contains("s3://no-such-bucket/lake/t/"),
                "{op}: {message}"
            );
        }
    });
}

/// An S3 client of `endpoint` (a fault proxy), as the emulator's own.
fn s3_client_at(endpoint: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// S3 answers 409 `ConditionalRequestConflict` to a conditional write that raced another
/// write of the key, and says to retry: the store does, a few times, then gives up naming
/// the conflict. (moto never answers 409; the fault proxy does.)
#[test]
fn a_conditional_write_conflict_is_retried() {
    rt().block_on(async {
        let moto = Moto::new();
        bucket_with_decoys(&moto.emulator.s3_client(), "lake-0").await;
        let proxy = FaultProxy::start(moto.emulator.addr).await.unwrap();
        let store = S3Store::new(s3_client_at(&proxy.endpoint()), "lake-0", "lake/");
        let conflict = || Fault::error(409, "ConditionalRequestConflict");
        proxy.set(FaultPlan::seeded(1).rule(Rule::new("*", conflict()).times(2)));
        let key = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        assert_eq!(
            store.put_new(key, Bytes::from_static(b"x")).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(proxy.injected().by_rule, [2]);
        let attempts = u64::from(floodgate_aws::s3::CONFLICT_ATTEMPTS);
        proxy.set(FaultPlan::seeded(1).rule(Rule::new("*", conflict()).times(attempts)));
        let other = "t/dt=2026-12-01/hour=01/0-2-2.parquet";
        let err = store
            .put_new(other, Bytes::from_static(b"y"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("ConditionalRequestConflict"),
            "{err}"
        );
        assert_eq!(proxy.injected().by_rule, [attempts]);
        proxy.set(FaultPlan::seeded(1));
        assert!(store.get(other).await.unwrap().is_none());
    });
}

/// The fault proxy names S3's REST calls by operation and answers their faults in S3's
/// XML: throttling (`SlowDown`) and 500s on puts and listings are retried by the SDK, and
/// one that outlasts its retries reaches the caller with S3's own error code.
#[test]
fn s3_calls_are_faulted_by_operation_in_s3s_xml() {
    rt().block_on(async {
        let moto = Moto::new();
        bucket_with_decoys(&moto.emulator.s3_client(), "lake-0").await;
        let proxy = FaultProxy::start(moto.emulator.addr).await.unwrap();
        let store = S3Store::new(s3_client_at(&proxy.endpoint()), "lake-0", "lake/");
        proxy.set(
            FaultPlan::seeded(1)
                .rule(Rule::new("PutObject", Fault::slow_down()).times(2))
                .rule(Rule::new("S3.ListObjectsV2", Fault::error(500, "InternalError")).times(1)),
        );
        let key = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        assert_eq!(
            store.put_new(key, Bytes::from_static(b"x")).await.unwrap(),
            PutOutcome::Created
        );
        let listed = store.list("t/").await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let injected = proxy.injected();
        assert_eq!(injected.by_rule, [2, 1]);
        assert_eq!(injected.calls.get("S3.PutObject"), Some(&3), "{injected:?}");
        assert_eq!(
            injected.calls.get("S3.ListObjectsV2"),
            Some(&2),
            "{injected:?}"
        );
        // Past the SDK's retries the caller sees S3's code, read from the XML.
        proxy.set(FaultPlan::seeded(1).rule(Rule::new("PutObject", Fault::slow_down())));
        let err = store
            .put_new(
                "t/dt=2026-12-01/hour=01/0-2-2.parquet",
                Bytes::from_static(b"y"),
            )
            .await
            .unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains(": SlowDown: ") && !err.contains("unhandled"),
            "S3's code, parsed from its XML: {err}"
        );
        proxy.set(FaultPlan::seeded(1));
        assert_eq!(store.get(key).await.unwrap().as_deref(), Some(&b"x"[..]));
    });
}

/// A `put_new` whose answer is lost after S3 stored the object (the connection reset) is
/// sent again by the SDK; S3 then refuses it (`If-None-Match`), so the store answers
/// `Exists`, and the object is the one the first attempt wrote.
#[test]
fn a_put_new_whose_answer_was_lost_answers_exists() {
    rt().block_on(async {
        let moto = Moto::new();
        bucket_with_decoys(&moto.emulator.s3_client(), "lake-0").await;
        let proxy = FaultProxy::start(moto.emulator.addr).await.unwrap();
        let store = S3Store::new(s3_client_at(&proxy.endpoint()), "lake-0", "lake/");
        proxy.set(
            FaultPlan::seeded(1)
                .rule(Rule::new("*", Fault::Reset(Phase::AfterForwarding)).times(1)),
        );
        let key = "t/dt=2026-12-01/hour=01/0-1-1.parquet";
        let outcome = store.put_new(key, Bytes::from_static(b"first")).await;
        assert_eq!(proxy.injected().by_rule, [1]);
        assert_eq!(outcome.unwrap(), PutOutcome::Exists);
        assert_eq!(
            store.get(key).await.unwrap().as_deref(),
            Some(&b"first"[..])
        );
    });
}

/// When the stream received every record: 2026-12-01T15:00:00Z.
const RECEIVED_MS: i64 = 1_796_137_200_000;

/// `n` bookings of shard `0` from sequence `from`, in two hours' partitions.
fn bookings(registry: &Registry, from: u64, n: u64) -> Vec<StoredRecord> {
    (from..from + n)
        .map(|i| {
            let hour = 13 + i % 2;
            let event = json!({"specversion":"1.0","id":format!("e{i:04}"),"source":"/tests",
                "type":"booking.requested","time":format!("2026-12-01T{hour}:00:00Z"),
                "data":{"bookingId":format!("bk{i}"),"eventId":"E1","customerId":"c1","seats":1,
                    "requestedAt":"2026-12-01T10:00:00Z"}});
            registry
                .check(&event)
                .unwrap_or_else(|e| panic!("{event}: {e:?}"));
            StoredRecord {
                sequence: SequenceNumber::from_u64(i),
                key: "E1".to_owned(),
                payload: Bytes::from(event.to_string()),
                appended_at_ms: RECEIVED_MS,
            }
        })
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The lake consumer writes its Parquet files to S3 through [`S3Store`]; pyarrow (its own
/// S3 client) and DuckDB read every row back once, in its Hive partition. A replay of the
/// same records from the start writes nothing new (`put_new` finds every file) and the
/// readers still see each row once.
#[test]
fn lake_files_on_s3_are_read_back_by_pyarrow_and_duckdb() {
    rt().block_on(async {
        let moto = Moto::new();
        let store = moto.store().await;
        let registry = Registry::builtin().unwrap();
        let tables = floodgate_core::lake::tables(&registry).unwrap();
        let shard = ShardId("0".to_owned());
        let config = LakeConfig {
            roll_bytes: 1 << 30,
            roll_age: Duration::from_secs(3600),
        };
        for _replay in 0..2 {
            let lake = LakeProcessor::new(store.clone(), tables.clone(), config.clone());
            for from in [0, 50] {
                lake.process(&shard, &bookings(&registry, from, 50))
                    .await
                    .unwrap();
                lake.tick(&shard, true).await.unwrap();
            }
        }
        let files: Vec<String> = store
            .list("booking_requested/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(
            files,
            [
                "booking_requested/dt=2026-12-01/hour=13/0-0-49.parquet",
                "booking_requested/dt=2026-12-01/hour=13/0-50-99.parquet",
                "booking_requested/dt=2026-12-01/hour=14/0-0-49.parquet",
                "booking_requested/dt=2026-12-01/hour=14/0-50-99.parquet",
            ]
        );

        let python = workspace().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing; run scripts/emulators (scripts/test does)",
            python.display()
        );
        let out = Command::new(&python)
            .arg(workspace().join("aws/tests/read_lake.py"))
            .args([
                &moto.emulator.endpoint,
                "lake-0",
                "lake/",
                "booking_requested",
            ])
            .output()
            .expect("run read_lake.py");
        assert!(
            out.status.success(),
            "read_lake.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<String> = (0..100).map(|i| format!("e{i:04}")).collect();
        assert_eq!(read["pyarrow_rows"], 100, "{read}");
        assert_eq!(read["pyarrow_event_ids"], json!(ids), "pyarrow");
        assert_eq!(
            read["pyarrow_partitions"],
            json!(["dt=2026-12-01/hour=13", "dt=2026-12-01/hour=14"])
        );
        assert_eq!(read["duckdb_rows"], 100, "{read}");
        assert_eq!(read["duckdb_event_ids"], json!(ids), "duckdb");
        // DuckDB read them over S3 itself, with httpfs (scripts/venv installs the DuckDB
        // that PyPI has httpfs for; see read_lake.py).
        assert_eq!(read["duckdb_over_s3"], true, "{read}");
    });
}
