//! The binary on the AWS backends, against local emulators (kinesalite for Kinesis, moto
//! server for DynamoDB) that each test starts: `floodgate aws init`, start-up failures
//! that name the service, and `serve` on a Kinesis stream with DynamoDB leases, end to end
//! (bookings decided, every accepted event in the lake once).
#![cfg(feature = "emulator-tests")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Server, booking, bookings_decided, floodgate};
use floodgate_aws::emulator::{self, Emulator};
use serde_json::Value;

const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];

/// A configuration naming Kinesis (on `kinesis`) and DynamoDB leases (on `moto`).
fn aws_config(dir: &Path, kinesis: &str, moto: &str, stream: &str) -> PathBuf {
    let path = dir.join("floodgate.toml");
    std::fs::write(
        &path,
        format!(
            r#"data_dir = "{data}"

[aws]
region = "us-east-1"
endpoint_url = "{moto}"

[stream]
backend = "kinesis"

[stream.kinesis]
stream_name = "{stream}"
endpoint_url = "{kinesis}"
shards = 2

[coordination]
backend = "dynamodb"
table_name = "{stream}-leases"
lease_duration_ms = 3000
"#,
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn run(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    floodgate()
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .envs(env.iter().copied())
        .env("FLOODGATE_LOG", "warn")
        .output()
        .unwrap()
}

fn emulators() -> (Emulator, Emulator) {
    (
        // Streams become ACTIVE after 300 ms, so `aws init` must wait for them.
        emulator::kinesalite(300).expect("kinesalite starts"),
        emulator::moto().expect("moto server starts"),
    )
}

#[test]
fn aws_init_creates_what_is_missing_then_reports_it_exists() {
    let (kinesis, moto) = emulators();
    let dir = tempfile::tempdir().unwrap();
    let config = aws_config(dir.path(), &kinesis.endpoint, &moto.endpoint, "init-events");
    let first = run(&["aws", "init"], &config, &CREDENTIALS);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        "kinesis stream init-events: created\nkinesis stream init-events-quarantine: created\n\
         dynamodb table init-events-leases: created\n"
    );
    let again = run(&["aws", "init"], &config, &CREDENTIALS);
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "kinesis stream init-events: exists\nkinesis stream init-events-quarantine: exists\n\
         dynamodb table init-events-leases: exists\n"
    );
}

/// `aws init --check` creates nothing, says what is missing or differs (one line per
/// resource), and exits non-zero until every resource is there with its key schema.
#[test]
fn aws_init_check_changes_nothing_and_fails_on_drift() {
    let (kinesis, moto) = emulators();
    let dir = tempfile::tempdir().unwrap();
    let config = aws_config(
        dir.path(),
        &kinesis.endpoint,
        &moto.endpoint,
        "check-events",
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        r#"
[state]
backend = "dynamodb"
table_name = "check-state"

[lake]
store = "s3"
bucket = "check-lake"

[publish]
backend = "eventbridge"
event_bus_name = "check-bus"

[archive]
backend = "firehose"
delivery_stream_name = "check-raw"
"#,
    );
    std::fs::write(&config, text).unwrap();
    let check = || {
        let out = run(&["aws", "init", "--check"], &config, &CREDENTIALS);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let resources = [
        "kinesis stream check-events",
        "kinesis stream check-events-quarantine",
        "dynamodb table check-events-leases",
        "dynamodb table check-state",
        "eventbridge bus check-bus",
        "s3 bucket check-lake",
        "firehose delivery stream check-raw",
    ];

    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    for resource in resources {
        assert!(out.contains(&format!("{resource}: missing\n")), "{out}");
    }
    // Nothing was created: init creates every one of them now.
    let init = run(&["aws", "init"], &config, &CREDENTIALS);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let created = String::from_utf8_lossy(&init.stdout);
    for resource in &resources[..resources.len() - 1] {
        assert!(
            created.contains(&format!("{resource}: created\n")),
            "{created}"
        );
    }
    // The delivery stream is the deployment's to make (it needs a destination).
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("firehose delivery stream check-raw: missing\n"),
        "{out}"
    );
    assert!(out.contains("s3 bucket check-lake: ok ("), "{out}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(moto.firehose_to_bucket("check-raw", "check-raw-archive", "raw/"))
        .unwrap();

    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().count(), resources.len(), "{out}");
    for resource in resources {
        assert!(out.contains(&format!("{resource}: ok (")), "{out}");
    }
    assert!(
        out.contains("dynamodb table check-state: ok (ACTIVE, key [pk (HASH S), sk (RANGE S)])"),
        "{out}"
    );

    // Drift: a lease table of that name with another key.
    let dynamodb = moto.dynamodb_client();
    rt.block_on(async {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        dynamodb
            .delete_table()
            .table_name("check-events-leases")
            .send()
            .await
            .unwrap();
        dynamodb
            .create_table()
            .table_name("check-events-leases")
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .unwrap();
    });
    let (code, out) = check();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "dynamodb table check-events-leases: drift: key schema is [id (HASH S)], \
             expected [leaseKey (HASH S)]"
        ),
        "{out}"
    );
    assert!(out.contains("dynamodb table check-state: ok ("), "{out}");
}

/// A configuration naming AWS fails at start, quickly, naming the service and why: no
/// endpoint listening, no such stream, no credentials.
#[test]
fn a_config_naming_aws_fails_at_start_naming_the_service() {
    let (kinesis, moto) = emulators();
    let dir = tempfile::tempdir().unwrap();
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    let check = |config: &Path, env: &[(&str, &str)], wants: &[&str]| {
        let started = Instant::now();
        let out = run(&serve, config, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        for want in wants {
            assert!(stderr.contains(want), "wanted {want:?} in: {stderr}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "took {:?}",
            started.elapsed()
        );
    };
    // Nothing listens on port 9 of the loopback.
    let unreachable = aws_config(dir.path(), "http://127.0.0.1:9", &moto.endpoint, "x");
    check(&unreachable, &CREDENTIALS, &["kinesis", "cannot connect"]);
    // The stream was never created.
    let missing = aws_config(dir.path(), &kinesis.endpoint, &moto.endpoint, "never-made");
    check(
        &missing,
        &CREDENTIALS,
        &["kinesis stream \"never-made\"", "floodgate aws init"],
    );
    // No credentials anywhere in the chain.
    let no_credentials = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    check(
        &missing,
        &no_credentials,
        &["kinesis", "no AWS credentials"],
    );
}

/// `serve` on Kinesis with DynamoDB leases: events posted are decided by the bookings
/// processor and land in the lake exactly once, as on the embedded log.
#[test]
fn serve_on_kinesis_and_dynamodb_decides_bookings_and_fills_the_lake() {
    let (kinesis, moto) = emulators();
    let dir = tempfile::tempdir().unwrap();
    let config = aws_config(dir.path(), &kinesis.endpoint, &moto.endpoint, "e2e-events");
    let init = run(&["aws", "init"], &config, &CREDENTIALS);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let data = dir.path().join("data");
    let config_arg = config.display().to_string();
    let mut server = Server::start_with_env(
        &data,
        &["--config", &config_arg],
        Some(&dir.path().join("serve.log")),
        &CREDENTIALS,
    );
    let mut ids = Vec::new();
    let mut bookings = Vec::new();
    for batch in 0..10 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let n = batch * 20 + i;
                booking(
                    &format!("e-{n}"),
                    &format!("b-{n}"),
                    &format!("show-{}", n % 7),
                    1,
                )
            })
            .collect();
        let resp = server.post_batch(&events);
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        ids.extend((0..20).map(|i| format!("e-{}", batch * 20 + i)));
        bookings.extend((0..20).map(|i| format!("b-{}", batch * 20 + i)));
    }
    let decided = bookings_decided(&server, &bookings, 120);
    assert_eq!(decided.len(), bookings.len());
    // SIGTERM: the consumers drain, the lake flushes, the leases are handed back.
    assert_eq!(server.terminate(), Some(0));
    let lake_ids = lake_ids(&data.join("lake"), "booking_requested");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &lake_ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "{id} in the lake");
    }
    assert_eq!(lake_ids.len(), ids.len(), "nothing else in the table");
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Every event id of `table` in the lake, repeats kept (DuckDB, as analysts read it).
fn lake_ids(lake: &Path, table: &str) -> Vec<String> {
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .arg("ids")
        .arg(lake)
        .arg(table)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect()
}
