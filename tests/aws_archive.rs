//! The raw archive wired into the binary, on moto server (`[archive] backend =
//! "firehose"` over the embedded stream): `aws init` reports the delivery stream and does
//! not create it; `serve` and `process` refuse a missing or unreachable one, naming
//! Firehose and why; `process` and `serve` each run the archive consumer, and every
//! accepted event lands in S3 as one NDJSON line, rejected ones never.
#![cfg(feature = "emulator-tests")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Server, booking, floodgate, metric, wait_for};
use floodgate_aws::emulator::{self, Emulator};
use serde_json::{Value, json};

const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];
const BUCKET: &str = "archive";
const PREFIX: &str = "raw/";

/// A configuration on the embedded stream with `archive` as its `[archive]` section.
fn config(dir: &Path, name: &str, moto: &str, archive: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{data}\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{moto}\"\n\n\
             [lake]\nenabled = false\n\n[archive]\n{archive}\n",
            data = dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn firehose(stream: &str) -> String {
    format!("backend = \"firehose\"\ndelivery_stream_name = \"{stream}\"")
}

/// Runs the binary to its end, or kills it after 60 s (a command that should have failed
/// at start may be serving).
fn run(args: &[&str], config: &Path) -> Output {
    let mut child = floodgate()
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("AWS_PROFILE")
        .envs(CREDENTIALS)
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs `args` expecting it to fail at start (exit 2) with every one of `wants` in its
/// error output.
fn fails_at_start(args: &[&str], config: &Path, wants: &[&str]) {
    let started = Instant::now();
    let out = run(args, config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for want in wants {
        assert!(
            stderr.contains(want),
            "{args:?}: wanted {want:?} in: {stderr}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The archived lines, by event id (each line parsed as one JSON value).
fn archived(moto: &Emulator) -> BTreeMap<String, Vec<Value>> {
    let objects = rt().block_on(moto.s3_objects(BUCKET, PREFIX)).unwrap();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (key, body) in objects {
        assert!(body.ends_with(b"\n"), "{key}");
        for line in std::str::from_utf8(&body).unwrap().split_terminator('\n') {
            let v: Value = serde_json::from_str(line).unwrap();
            out.entry(v["id"].as_str().unwrap().to_owned())
                .or_default()
                .push(v);
        }
    }
    out
}

/// Posts 5 batches of 20 bookings and an event the edge rejects; returns the accepted
/// events by id.
fn post(server: &Server, tag: &str) -> BTreeMap<String, Value> {
    let mut accepted = BTreeMap::new();
    for batch in 0..5 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let n = batch * 20 + i;
                booking(&format!("{tag}-{n}"), &format!("b-{tag}-{n}"), "show-1", 1)
            })
            .collect();
        let rejected = json!({"specversion":"1.0","id":format!("{tag}-bad-{batch}"),"source":"/t","type":"booking.requested","data":{"seats":"many"}});
        let mut body = events.clone();
        body.push(rejected);
        let resp = server.post_batch(&body);
        assert_eq!(resp.status, 207, "{}", String::from_utf8_lossy(&resp.body));
        let answer = resp.json();
        assert_eq!(
            (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
            (Some(20), Some(1))
        );
        for e in events {
            accepted.insert(e["id"].as_str().unwrap().to_owned(), e);
        }
    }
    accepted
}

/// A `floodgate process` child, killed if the test fails before it is stopped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn terminate(child: &mut Child) -> Option<i32> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn aws_init_reports_the_delivery_stream_and_never_creates_it() {
    let moto = emulator::moto().expect("moto server starts");
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "init", &moto.endpoint, &firehose("raw-init"));
    let out = run(&["aws", "init"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("firehose delivery stream raw-init: missing")
            && stdout.contains("deploy/firehose.yaml"),
        "{stdout}"
    );
    rt().block_on(moto.firehose_to_bucket("raw-init", BUCKET, PREFIX))
        .unwrap();
    let out = run(&["aws", "init"], &config);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "firehose delivery stream raw-init: exists (ACTIVE)\n"
    );
}

#[test]
fn serve_and_process_archive_every_accepted_event_and_refuse_a_missing_stream() {
    let moto = emulator::moto().expect("moto server starts");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let plain = config(dir.path(), "plain", &moto.endpoint, "backend = \"none\"");
    let missing = config(
        dir.path(),
        "missing",
        &moto.endpoint,
        &firehose("never-made"),
    );
    let unreachable = config(
        dir.path(),
        "unreachable",
        &moto.endpoint,
        &format!("{}\nendpoint_url = \"http://127.0.0.1:9\"", firehose("raw")),
    );
    let good = config(dir.path(), "good", &moto.endpoint, &firehose("raw"));
    rt().block_on(moto.firehose_to_bucket("raw", BUCKET, PREFIX))
        .unwrap();

    // Events accepted while no archive is configured.
    let plain_arg = plain.display().to_string();
    let mut server = Server::start_with_env(&data, &["--config", &plain_arg], None, &CREDENTIALS);
    let mut accepted = post(&server, "a");
    assert_eq!(server.terminate(), Some(0));
    assert!(archived(&moto).is_empty());

    // Both commands refuse to start on an archive they cannot use.
    for command in ["serve", "process"] {
        let args: &[&str] = if command == "serve" {
            &["serve", "--listen", "127.0.0.1:0"]
        } else {
            &["process", "--listen", "127.0.0.1:0"]
        };
        fails_at_start(
            args,
            &missing,
            &[
                "firehose delivery stream \"never-made\" does not exist",
                "deploy/firehose.yaml",
            ],
        );
        fails_at_start(args, &unreachable, &["firehose", "cannot connect"]);
    }

    // `process` archives what the stream already holds, from its start.
    let log = std::fs::File::create(dir.path().join("process.log")).unwrap();
    let mut worker = Worker(
        floodgate()
            .args(["process", "--listen", "127.0.0.1:0", "--config"])
            .arg(&good)
            .env_remove("AWS_PROFILE")
            .envs(CREDENTIALS)
            .env("FLOODGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(60, "process to archive the first events", || {
        (archived(&moto).len() == accepted.len()).then_some(())
    });
    assert_eq!(terminate(&mut worker.0), Some(0));

    // `serve` archives what it accepts from then on, and counts it.
    let good_arg = good.display().to_string();
    let mut server = Server::start_with_env(&data, &["--config", &good_arg], None, &CREDENTIALS);
    let more = post(&server, "b");
    let want = accepted.len() + more.len();
    accepted.extend(more);
    wait_for(60, "serve to archive the new events", || {
        (archived(&moto).len() == want).then_some(())
    });
    wait_for(10, "the events metric", || {
        (metric(&server, "floodgate_archive_events_total", &[]) >= 100.0).then_some(())
    });
    assert!(
        metric(
            &server,
            "floodgate_archive_calls_total",
            &["outcome=\"accepted\""]
        ) >= 1.0
    );
    assert_eq!(server.terminate(), Some(0));

    let got = archived(&moto);
    assert_eq!(
        got.len(),
        accepted.len(),
        "only accepted events: {:?}",
        got.keys()
    );
    for (id, event) in &accepted {
        assert_eq!(
            got.get(id),
            Some(&vec![event.clone()]),
            "{id}: once, as posted"
        );
    }
}
