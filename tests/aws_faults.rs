//! Floodgate on Kinesis under injected faults, through the binary: `floodgate serve` with
//! `[stream] backend = "kinesis"` whose Kinesis endpoint is a [`FaultProxy`] in front of
//! kinesalite (the proxy runs in this test's own tokio runtime), and DynamoDB leases on moto
//! server. Under a steady POST load (several clients, 1 to 3 events a request), each test
//! injects one class of fault into PutRecords, in phases:
//!
//! 1. per-record failures (`ProvisionedThroughputExceededException`, `InternalFailure`),
//!    with KPL aggregation and without;
//! 2. whole-call faults: runs of 400 throttles, 500s, 503s and HTML 500s;
//! 3. timeouts: a call held before it is forwarded (never applied), then after (applied,
//!    its answer withheld: the writer sends it again, so the stream holds it twice);
//! 4. connection resets, before and after forwarding.
//!
//! Each test also has an outage phase (every call or record fails until the writer's
//! deadline runs out and the edge answers `retry`), and ends with the faults cleared and the
//! writer acknowledging again. Two more put a second proxy in front of moto: the lease
//! table's calls fail now and then; and one worker is cut off from the lease table while a
//! second takes its shards, then the first takes them back.
//!
//! After the load, for every event the edge acknowledged (answered `accepted`):
//! - its booking is decided, exactly once (one `booking.confirmed` or `booking.rejected`
//!   in the outbox; `GET /v1/bookings/{id}` answers for a sample);
//! - it is in the lake at least once, and in kinesalite's stream (read past the proxy);
//! - it is in the lake exactly once. Faults after forwarding write repeats into the stream
//!   (the tests check that they did); the lake is exactly-once there because the consumers
//!   drop repeats of (source, id) per shard.
//!
//! Each phase ends once each of its rules has fired often enough (the proxy's counters say
//! the faults really happened) and the load has seen what the phase is for. What the edge
//! answered, how PutRecords calls ended, the repeats the consumers dropped and the warnings
//! in the log are printed (`--nocapture`), not asserted.
#![cfg(feature = "emulator-tests")]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Server, booking, bookings_decided, envelope, floodgate, metric, outbox_read, try_request,
    wait_for,
};
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::fault_proxy::{
    Fault, FaultPlan, FaultProxy, Injected, Phase, RecordError, Rule,
};
use floodgate_aws::kinesis::{KinesisReader, KinesisReaderConfig};
use floodgate_aws::leases::DynamoDbLeases;
use floodgate_core::stream::{CheckpointStore, LeaseInfo, StartPosition, StreamReader};
use serde_json::{Value, json};

const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];
/// Shows on sale; a request's bookings are spread over them, so over both shards.
const SHOWS: usize = 8;
const CAPACITY: i64 = 1_000_000;
/// The lease table's lease duration.
const LEASE_MS: u64 = 3000;
/// Poster threads.
const CLIENTS: usize = 4;
/// Events a phase must see acknowledged under its faults before it ends.
const PHASE_ACKS: usize = 100;
/// Longer than the Kinesis writer's attempt timeout (1 s), so a held call times out.
const HOLD: Duration = Duration::from_secs(2);

/// How a test's deployment is set up.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// `[stream.kinesis] aggregation`.
    aggregation: bool,
    /// DynamoDB (the lease table) is reached through a fault proxy of its own too.
    dynamodb_proxy: bool,
}

const AGGREGATED: Setup = Setup {
    aggregation: true,
    dynamodb_proxy: false,
};

/// kinesalite and moto server, the fault proxies in front of them, and `floodgate serve`.
/// Fields drop in order: the server first, then the proxies, then the runtime they run on.
struct Faulted {
    edge: Server,
    kinesis_proxy: FaultProxy,
    dynamodb_proxy: Option<FaultProxy>,
    rt: tokio::runtime::Runtime,
    kinesis: Emulator,
    moto: Emulator,
    stream: String,
    dir: tempfile::TempDir,
}

impl Drop for Faulted {
    /// A failed test keeps serve's log, which the temporary directory would take with it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept =
                std::env::temp_dir().join(format!("floodgate-failed-{}-serve.log", self.stream));
            if std::fs::copy(self.dir.path().join("serve.log"), &kept).is_ok() {
                eprintln!("serve's log kept at {}", kept.display());
            }
        }
    }
}

impl Faulted {
    /// Starts everything, creates the stream and the lease table through the proxies (with
    /// no fault set), starts `serve`, and puts the shows on sale.
    fn start(stream: &str, setup: Setup) -> Faulted {
        let kinesis = emulator::kinesalite(50).expect("kinesalite starts");
        let moto = emulator::moto().expect("moto server starts");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the proxies' runtime starts");
        let kinesis_proxy = rt
            .block_on(FaultProxy::start(kinesis.addr))
            .expect("the kinesis fault proxy starts");
        let dynamodb_proxy = setup.dynamodb_proxy.then(|| {
            rt.block_on(FaultProxy::start(moto.addr))
                .expect("the dynamodb fault proxy starts")
        });
        let dynamodb = dynamodb_proxy
            .as_ref()
            .map_or_else(|| moto.endpoint.clone(), FaultProxy::endpoint);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("floodgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"data_dir = "{data}"
[aws]
region = "us-east-1"
endpoint_url = "{dynamodb}"
[stream]
backend = "kinesis"
[stream.kinesis]
stream_name = "{stream}"
endpoint_url = "{kinesis}"
shards = 2
aggregation = {aggregation}
[coordination]
backend = "dynamodb"
table_name = "{stream}-leases"
lease_duration_ms = {LEASE_MS}
"#,
                data = dir.path().join("data").display(),
                kinesis = kinesis_proxy.endpoint(),
                aggregation = setup.aggregation,
            ),
        )
        .unwrap();
        let init = floodgate()
            .args(["aws", "init", "--config"])
            .arg(&config)
            .envs(CREDENTIALS)
            .env("FLOODGATE_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "floodgate aws init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let edge = serve(
            &dir.path().join("data"),
            &config,
            &dir.path().join("serve.log"),
        );
        let shows: Vec<Value> = (0..SHOWS)
            .map(|s| {
                envelope(
                    &format!("create-show-{s}"),
                    "inventory.event.created",
                    json!({"eventId": format!("show-{s}"), "name": "Rush", "venue": "Arena",
                           "startsAt": "2026-12-01T20:00:00Z", "capacity": CAPACITY}),
                )
            })
            .collect();
        let created = edge.post_batch(&shows);
        assert_eq!(
            created.status,
            200,
            "{}",
            String::from_utf8_lossy(&created.body)
        );
        for s in 0..SHOWS {
            wait_for(120, "the shows to be on sale", || {
                (edge.get(&format!("/v1/inventory/show-{s}")).status == 200).then_some(())
            });
        }
        Faulted {
            edge,
            kinesis_proxy,
            dynamodb_proxy,
            rt,
            kinesis,
            moto,
            stream: stream.to_owned(),
            dir,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// How many times each event id is in the stream, read straight from kinesalite (not
    /// through the proxy) and deaggregated, as the consumers read it before they drop
    /// repeats. For a stream no one writes any more.
    fn stream_copies(&self) -> HashMap<String, usize> {
        let reader = KinesisReader::new(self.kinesis.kinesis_client(), {
            let mut c = KinesisReaderConfig::new(self.stream.clone());
            c.get_records_limit = 10_000;
            c
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut copies = HashMap::new();
        self.rt.block_on(async {
            for shard in reader.shards().await.expect("kinesalite lists the shards") {
                let mut from = StartPosition::TrimHorizon;
                loop {
                    let batch = reader
                        .read(&shard.id, &from, 10_000)
                        .await
                        .expect("kinesalite reads");
                    let empty = batch.records.is_empty();
                    for r in batch.records {
                        let event: Value = serde_json::from_slice(&r.payload).unwrap_or_default();
                        if let Some(id) = event["id"].as_str() {
                            *copies.entry(id.to_owned()).or_default() += 1;
                        }
                    }
                    match batch.next {
                        Some(next) if !(empty && batch.records_behind == 0) => from = next,
                        _ => break,
                    }
                    assert!(
                        Instant::now() < deadline,
                        "reading shard {:?} to its end took over 60 s",
                        shard.id
                    );
                }
            }
        });
        copies
    }
}

/// `floodgate serve` on `config`, logging at info level to `log` (debug, which
/// `Server::start_as` picks, logs every SDK call and slows the edge under load).
fn serve(data: &Path, config: &Path, log: &Path) -> Server {
    let mut child = floodgate()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--config")
        .arg(config)
        .envs(CREDENTIALS)
        .env("FLOODGATE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("floodgate serve starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines
        .next()
        .unwrap_or_else(|| {
            panic!(
                "floodgate serve exited before listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .expect("stdout is readable");
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        addr,
        data_dir: data.to_owned(),
    }
}

/// What the posters saw.
#[derive(Debug, Default)]
struct Tally {
    /// (event id, booking id) of every event answered `accepted`.
    acked: Vec<(String, String)>,
    /// Events answered `retry`, and the answers that carried them: with and without
    /// `Retry-After`.
    retried: Vec<(String, String)>,
    retry_answers_with_retry_after: u64,
    retry_answers_without_retry_after: u64,
    /// Why events were answered `retry` (the start of the message), and how often.
    retry_reasons: BTreeMap<String, u64>,
    /// 503s without per-event results (the edge's own backpressure), by error code.
    busy: BTreeMap<String, u64>,
    /// Answers by HTTP status.
    statuses: BTreeMap<u16, u64>,
    /// Anything no fault may cause: a rejected event, another status, a dropped connection.
    unexpected: Vec<String>,
}

/// Poster threads: client `c`'s `n`-th request carries 1 to 3 booking requests, each for
/// one of the shows, with ids never used before (a producer's retry would reuse an id; these
/// do not retry, so every event is acknowledged at most once).
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..CLIENTS)
            .map(|c| {
                let (stop, tally, tag) = (stop.clone(), tally.clone(), tag.to_owned());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let events: Vec<(String, String, Value)> = (0..1 + n % 3)
                            .map(|i| {
                                let id = format!("{tag}-{c}-{n}-{i}");
                                let booking_id = format!("bk-{id}");
                                let show = format!("show-{}", (c + n + i) % SHOWS);
                                let event = booking(&id, &booking_id, &show, 1);
                                (id, booking_id, event)
                            })
                            .collect();
                        n += 1;
                        let body = serde_json::to_vec(
                            &events.iter().map(|(_, _, e)| e).collect::<Vec<_>>(),
                        )
                        .unwrap();
                        let answer = try_request(
                            addr,
                            "POST",
                            "/v1/events",
                            &[("content-type", "application/cloudevents-batch+json")],
                            Some(&body),
                        );
                        let mut tally = tally.lock().unwrap();
                        let resp = match answer {
                            Ok(resp) => resp,
                            Err(e) => {
                                tally.unexpected.push(format!("request failed: {e}"));
                                break;
                            }
                        };
                        *tally.statuses.entry(resp.status).or_default() += 1;
                        let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                        match (resp.status, body["results"].as_array()) {
                            (200 | 207 | 503, Some(results)) => {
                                let mut retried = false;
                                for r in results {
                                    let Some((id, booking_id, _)) =
                                        r["index"].as_u64().and_then(|i| events.get(i as usize))
                                    else {
                                        tally.unexpected.push(format!("bad result {r}"));
                                        continue;
                                    };
                                    let ids = (id.clone(), booking_id.clone());
                                    match r["status"].as_str() {
                                        Some("accepted") => tally.acked.push(ids),
                                        Some("retry") => {
                                            retried = true;
                                            tally.retried.push(ids);
                                            let why: String = r["errors"][0]["message"]
                                                .as_str()
                                                .unwrap_or("")
                                                .chars()
                                                .take(48)
                                                .collect();
                                            *tally.retry_reasons.entry(why).or_default() += 1;
                                        }
                                        _ => tally.unexpected.push(format!("{id}: {r}")),
                                    }
                                }
                                if retried && resp.header("retry-after").is_some() {
                                    tally.retry_answers_with_retry_after += 1;
                                } else if retried {
                                    tally.retry_answers_without_retry_after += 1;
                                }
                            }
                            (503, None) => {
                                let code = body["error"]["code"].as_str().unwrap_or("?");
                                *tally.busy.entry(code.to_owned()).or_default() += 1;
                                drop(tally);
                                // The edge sheds load; come back a little later (not a
                                // wait for a condition: the load just goes on).
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            (status, _) => tally.unexpected.push(format!(
                                "status {status}: {}",
                                String::from_utf8_lossy(&resp.body)
                            )),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    fn acked(&self) -> usize {
        self.tally.lock().unwrap().acked.len()
    }

    fn retried(&self) -> usize {
        self.tally.lock().unwrap().retried.len()
    }

    fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a poster failed");
        }
        Arc::try_unwrap(self.tally).unwrap().into_inner().unwrap()
    }
}

/// One phase of faults: `plan` is in force until each of its rules has fired at least
/// `min_fired[i]` times and the load has seen `until`.
struct FaultPhase {
    name: &'static str,
    plan: FaultPlan,
    min_fired: Vec<u64>,
    until: Until,
}

/// What the load must see before a phase ends.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// [`PHASE_ACKS`] more events acknowledged: the writer gets through the faults.
    Acked,
    /// This many more events answered `retry`: the faults outlasted the writer's deadline.
    Retried(usize),
}

/// A phase that ends once its rules fired and [`PHASE_ACKS`] more events were acknowledged.
fn phase(name: &'static str, rules: Vec<(Rule, u64)>) -> FaultPhase {
    let mut plan = FaultPlan::seeded(11);
    let mut min_fired = Vec::new();
    for (rule, min) in rules {
        plan = plan.rule(rule);
        min_fired.push(min);
    }
    FaultPhase {
        name,
        plan,
        min_fired,
        until: Until::Acked,
    }
}

/// A phase with `rule` on every call (or record), until `retried` more events were
/// answered `retry`: the writer's deadline ran out under it.
fn outage(name: &'static str, rule: Rule, retried: usize) -> FaultPhase {
    FaultPhase {
        until: Until::Retried(retried),
        ..phase(name, vec![(rule, 1)])
    }
}

/// Runs the phases on `proxy` under `load`, one after the other, and returns what each
/// injected (the proxy's counters at the phase's end). The last plan is cleared after.
fn run_phases(
    proxy: &FaultProxy,
    load: &Load,
    phases: Vec<FaultPhase>,
) -> Vec<(&'static str, Injected)> {
    let mut out = Vec::new();
    for p in phases {
        proxy.set(p.plan.clone());
        let before = load.acked();
        let retried_before = load.retried();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let injected = loop {
            let injected = proxy.injected();
            let fired = injected
                .by_rule
                .iter()
                .zip(&p.min_fired)
                .all(|(got, min)| got >= min);
            let seen = match p.until {
                Until::Acked => load.acked() >= before + PHASE_ACKS,
                Until::Retried(n) => load.retried() >= retried_before + n,
            };
            if fired && seen {
                break injected;
            }
            assert!(
                Instant::now() < deadline,
                "phase {:?}: within 120 s, the faults did not all fire (wanted at least {:?} \
                 per rule) or the load did not see {:?}: fired {:?}, {} acknowledged, {} \
                 answered retry, calls {:?}",
                p.name,
                p.min_fired,
                p.until,
                injected.by_rule,
                load.acked() - before,
                load.retried() - retried_before,
                injected.calls,
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!(
            "phase {:?}: {} ms, fired {:?}, forwarded {}, {} acknowledged, {} answered retry",
            p.name,
            started.elapsed().as_millis(),
            injected.by_rule,
            injected.forwarded,
            load.acked() - before,
            load.retried() - retried_before,
        );
        out.push((p.name, injected));
    }
    proxy.set(FaultPlan::default());
    // The writer recovers once the faults stop.
    let before = load.acked();
    wait_for(120, "events acknowledged again after the faults", || {
        (load.acked() >= before + PHASE_ACKS).then_some(())
    });
    out
}

/// The warnings and errors in a log, by their message (the start of it, without fields).
fn warnings(log: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let rest = &line[at..];
        // `LEVEL target: message field=value …`: the message, without the fields.
        let message = rest.split_once(": ").map_or(rest, |(_, m)| m);
        let end = message.find('=').and_then(|e| message[..e].rfind(' '));
        let message: String = message[..end.unwrap_or(message.len())]
            .chars()
            .take(80)
            .collect();
        *out.entry(message).or_default() += 1;
    }
    out
}

/// Every event id of the lake's `booking_requested` table and how often it is there
/// (DuckDB, as analysts read it).
fn lake_ids(lake: &Path) -> HashMap<String, usize> {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .arg("ids")
        .arg(lake)
        .arg("booking_requested")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lake_check.py ids failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut counts = HashMap::new();
    for id in v["ids"].as_array().unwrap() {
        *counts.entry(id.as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

/// Drives the load through `phases` on `proxy` (of `f`), then checks what every
/// acknowledged event became: decided once, in the lake at least once, then exactly once.
fn faults_lose_nothing(
    mut f: Faulted,
    proxy: impl Fn(&Faulted) -> &FaultProxy,
    phases: Vec<FaultPhase>,
    writes: Writes,
) {
    let load = Load::start(f.edge.addr, "ev");
    wait_for(120, "load before the faults", || {
        (load.acked() >= PHASE_ACKS).then_some(())
    });
    let injected = run_phases(proxy(&f), &load, phases);
    let tally = load.stop();

    eprintln!(
        "answers by status {:?}; {} events acknowledged, {} answered retry ({} answers with \
         Retry-After, {} without; reasons {:?}); edge busy {:?}",
        tally.statuses,
        tally.acked.len(),
        tally.retried.len(),
        tally.retry_answers_with_retry_after,
        tally.retry_answers_without_retry_after,
        tally.retry_reasons,
        tally.busy,
    );
    assert!(
        tally.unexpected.is_empty(),
        "answers no fault may cause: {:?}",
        &tally.unexpected[..tally.unexpected.len().min(5)]
    );
    for (name, injected) in &injected {
        assert!(
            injected.by_rule.iter().all(|&n| n > 0),
            "phase {name:?}: a rule never fired: {injected:?}"
        );
    }

    // Every acknowledged booking is decided, exactly once.
    let acked_bookings: HashSet<&str> = tally.acked.iter().map(|(_, b)| b.as_str()).collect();
    let is_decision = |e: &Value| {
        matches!(
            e["type"].as_str(),
            Some("booking.confirmed" | "booking.rejected")
        )
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let outbox = loop {
        let outbox = outbox_read(&f.data());
        let decided: HashSet<&str> = outbox
            .iter()
            .filter(|e| is_decision(e))
            .filter_map(|e| e["data"]["bookingId"].as_str())
            .collect();
        let undecided: Vec<&&str> = acked_bookings
            .iter()
            .filter(|b| !decided.contains(**b))
            .collect();
        if undecided.is_empty() {
            drop(decided);
            break outbox;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged bookings still undecided after 180 s, e.g. {:?}",
            undecided.len(),
            acked_bookings.len(),
            &undecided[..undecided.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut decisions: HashMap<&str, usize> = HashMap::new();
    for e in outbox.iter().filter(|e| is_decision(e)) {
        if let Some(b) = e["data"]["bookingId"].as_str() {
            *decisions.entry(b).or_default() += 1;
        }
    }
    let twice: Vec<&&str> = acked_bookings
        .iter()
        .filter(|b| decisions.get(**b) != Some(&1))
        .collect();
    assert!(
        twice.is_empty(),
        "{} acknowledged bookings decided more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    // The edge answers for them too.
    for (_, b) in tally.acked.iter().step_by(tally.acked.len() / 20 + 1) {
        let r = f.edge.get(&format!("/v1/bookings/{b}"));
        assert_eq!(r.status, 200, "GET /v1/bookings/{b}");
    }

    let outcomes: Vec<String> = ["ok", "partial", "throttled", "error"]
        .iter()
        .map(|o| {
            let n = metric(
                &f.edge,
                "floodgate_kinesis_put_records_calls_total",
                &[&format!("outcome=\"{o}\"")],
            );
            format!("{o} {}", n as u64)
        })
        .collect();
    eprintln!(
        "PutRecords calls by outcome: {}; repeats the consumers dropped: {}",
        outcomes.join(", "),
        metric(&f.edge, "floodgate_processor_repeats_dropped_total", &[]) as u64
    );
    // A shard whose lease renewals failed for too long under the faults was stopped (it
    // could not know it still held the lease), and its coordinator takes it again at its
    // next round. SIGTERM drains only the shards this worker holds: wait until it holds
    // every one again, or the lake rows of a shard stopped at that moment would be left
    // for the next worker to write, after this test has looked.
    for (consumer, shards) in [("bookings", 2.0), ("lake", 2.0), ("lake-quarantine", 1.0)] {
        let label = format!("consumer=\"{consumer}\"");
        wait_for(
            60,
            &format!("serve to hold every {consumer} lease again"),
            || {
                (metric(&f.edge, "floodgate_processor_leases_held", &[&label]) == shards)
                    .then_some(())
            },
        );
    }
    // SIGTERM: the consumers drain, the lake flushes, the leases are handed back.
    assert_eq!(f.edge.terminate(), Some(0), "serve exits cleanly");
    eprintln!(
        "serve's warnings and errors: {:?}",
        warnings(&f.dir.path().join("serve.log"))
    );
    check_lake_and_stream(&f, &tally, writes);
}

/// Once every writer and consumer has stopped: every acknowledged event is in the lake at
/// least once, in the stream (each at least once; with `Writes::Twice`, some twice), and
/// in the lake exactly once.
fn check_lake_and_stream(f: &Faulted, tally: &Tally, writes: Writes) {
    let counts = lake_ids(&f.data().join("lake"));
    let missing: Vec<&str> = tally
        .acked
        .iter()
        .filter(|(id, _)| !counts.contains_key(id))
        .map(|(id, _)| id.as_str())
        .collect();
    let repeated: Vec<(&str, usize)> = tally
        .acked
        .iter()
        .filter_map(|(id, _)| {
            counts
                .get(id)
                .filter(|&&n| n > 1)
                .map(|&n| (id.as_str(), n))
        })
        .collect();
    let unacked_in_lake = tally
        .retried
        .iter()
        .filter(|(id, _)| counts.contains_key(id))
        .count();
    eprintln!(
        "lake: {} of {} acknowledged events missing (at least once), {} there more than once \
         (exactly once); {} of {} events answered retry are there anyway",
        missing.len(),
        tally.acked.len(),
        repeated.len(),
        unacked_in_lake,
        tally.retried.len()
    );
    assert!(
        missing.is_empty(),
        "at least once: {} acknowledged events are not in the lake, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let copies = f.stream_copies();
    let not_in_stream = tally
        .acked
        .iter()
        .filter(|(id, _)| !copies.contains_key(id))
        .count();
    let twice_in_stream = tally
        .acked
        .iter()
        .filter(|(id, _)| copies.get(id).is_some_and(|&n| n > 1))
        .count();
    eprintln!(
        "stream: {not_in_stream} acknowledged events missing, {twice_in_stream} there more than \
         once"
    );
    assert_eq!(
        not_in_stream, 0,
        "acknowledged events that kinesalite does not hold"
    );
    if writes == Writes::Twice {
        assert!(
            twice_in_stream > 0,
            "the faults after forwarding wrote no acknowledged event twice into the stream, so \
             this test did not exercise the consumers' dropping of repeats"
        );
    }
    let repeated_in_stream = repeated
        .iter()
        .filter(|(id, _)| copies.get(*id).is_some_and(|&n| n > 1))
        .count();
    assert!(
        repeated.is_empty(),
        "exactly once: {} acknowledged events are in the lake more than once, e.g. {:?}; {} \
         of them are in the stream more than once (repeats the consumers must drop), the rest \
         once (written to the lake twice)",
        repeated.len(),
        &repeated[..repeated.len().min(5)],
        repeated_in_stream,
    );
}

/// Whether a test's faults strike after forwarding, and so write records into the stream
/// that the writer sends again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    Once,
    Twice,
}

fn kinesis(f: &Faulted) -> &FaultProxy {
    &f.kinesis_proxy
}

fn per_record_failures(stream: &str, aggregation: bool) {
    let f = Faulted::start(
        stream,
        Setup {
            aggregation,
            ..AGGREGATED
        },
    );
    let fail = |error| Rule::new("PutRecords", Fault::FailRecords(error));
    faults_lose_nothing(
        f,
        kinesis,
        vec![
            phase(
                "every 3rd record ProvisionedThroughputExceeded",
                vec![(fail(RecordError::ThroughputExceeded).every(3), 30)],
            ),
            phase(
                "every 3rd record InternalFailure",
                vec![(fail(RecordError::InternalFailure).every(3), 30)],
            ),
            outage(
                "every record ProvisionedThroughputExceeded (a throttled stream)",
                fail(RecordError::ThroughputExceeded),
                5,
            ),
            phase(
                "every 4th record ProvisionedThroughputExceeded, every 5th InternalFailure",
                vec![
                    (fail(RecordError::ThroughputExceeded).every(4), 20),
                    (fail(RecordError::InternalFailure).every(5), 10),
                ],
            ),
        ],
        Writes::Once,
    );
}

/// PutRecords answers some records as failed (and the proxy really did not write them):
/// the writer sends those again, and only an event whose record got a sequence number is
/// acknowledged. With aggregation, a failed record is a shard's whole aggregate.
#[test]
fn per_record_failures_lose_nothing_with_aggregation() {
    per_record_failures("per-record-agg", true);
}

/// As above, one Kinesis record per event: a call's records fail one by one.
#[test]
fn per_record_failures_lose_nothing_without_aggregation() {
    per_record_failures("per-record-plain", false);
}

/// Whole PutRecords calls fail without reaching kinesalite: a run of 400 throttles, then
/// throttles long enough to outlast the writer's deadline, then 500s, 503s and the HTML
/// 500 of an emulator's own bug.
#[test]
fn whole_call_throttling_and_5xx_lose_nothing() {
    let f = Faulted::start("whole-call", AGGREGATED);
    let put = |fault| Rule::new("PutRecords", fault);
    faults_lose_nothing(
        f,
        kinesis,
        vec![
            phase(
                "a run of 12 calls throttled (400)",
                vec![(put(Fault::throughput_exceeded()).times(12), 12)],
            ),
            outage(
                "every call throttled (400)",
                put(Fault::throughput_exceeded()),
                5,
            ),
            phase(
                "every 3rd call 500 InternalFailure",
                vec![(put(Fault::internal_failure()).every(3), 10)],
            ),
            phase(
                "every 3rd call 503 ServiceUnavailable",
                vec![(put(Fault::service_unavailable()).every(3), 10)],
            ),
            phase(
                "every 3rd call an HTML 500",
                vec![(put(Fault::Html500).every(3), 10)],
            ),
            phase(
                "a run of 4 ThrottlingException, then every 5th call 400 or 500",
                vec![
                    (put(Fault::throttling()).times(4), 4),
                    (put(Fault::throughput_exceeded()).every(5), 5),
                    (put(Fault::internal_failure()).every(5), 5),
                ],
            ),
        ],
        Writes::Once,
    );
}

/// PutRecords calls held past the writer's attempt timeout: before forwarding (never
/// applied), then after (applied, the answer withheld: the writer's retry writes the
/// records a second time, which only the consumers can drop).
#[test]
fn timeouts_before_and_after_forwarding_lose_nothing() {
    let f = Faulted::start("timeouts", AGGREGATED);
    let hold = |phase| Rule::new("PutRecords", Fault::Hold { phase, hold: HOLD });
    faults_lose_nothing(
        f,
        kinesis,
        vec![
            phase(
                "every 4th call held before forwarding",
                vec![(hold(Phase::BeforeForwarding).every(4), 6)],
            ),
            outage(
                "every call held before forwarding",
                hold(Phase::BeforeForwarding),
                5,
            ),
            phase(
                "every 4th call held after forwarding",
                vec![(hold(Phase::AfterForwarding).every(4), 6)],
            ),
        ],
        Writes::Twice,
    );
}

/// PutRecords connections reset: before forwarding (never applied), then after (applied,
/// unanswered: written twice).
#[test]
fn connection_resets_before_and_after_forwarding_lose_nothing() {
    let f = Faulted::start("resets", AGGREGATED);
    let reset = |phase| Rule::new("PutRecords", Fault::Reset(phase));
    faults_lose_nothing(
        f,
        kinesis,
        vec![
            phase(
                "every 3rd call reset before forwarding",
                vec![(reset(Phase::BeforeForwarding).every(3), 10)],
            ),
            outage(
                "every call reset before forwarding",
                reset(Phase::BeforeForwarding),
                5,
            ),
            phase(
                "every 3rd call reset after forwarding",
                vec![(reset(Phase::AfterForwarding).every(3), 10)],
            ),
        ],
        Writes::Twice,
    );
}

/// The lease table's calls fail (throttled, 500, reset after the write was applied, so the
/// SDK's retry finds the lease's counter moved) while the consumers renew, commit and take
/// their leases back: nothing acknowledged is lost or decided twice.
#[test]
fn lease_table_faults_lose_nothing() {
    let f = Faulted::start(
        "lease-faults",
        Setup {
            dynamodb_proxy: true,
            ..AGGREGATED
        },
    );
    let update = |fault| Rule::new("UpdateItem", fault);
    faults_lose_nothing(
        f,
        |f| f.dynamodb_proxy.as_ref().expect("a dynamodb proxy"),
        vec![phase(
            "lease table: UpdateItem throttled, 500s, resets after forwarding",
            vec![
                (update(Fault::throughput_exceeded()).every(5), 4),
                (update(Fault::error(500, "InternalServerError")).every(6), 3),
                (update(Fault::Reset(Phase::AfterForwarding)).every(5), 3),
            ],
        )],
        Writes::Once,
    );
}

/// A worker cut off from the lease table (every call to it fails) can neither renew its
/// leases nor learn that it lost them; once they lapse, a second worker takes them and
/// writes the lake's runs of their shards. When the cut heals and the second worker
/// leaves, the first takes its shards back. What it had buffered for the lake before the
/// cut was written by the other worker meanwhile, so it must not be written again: every
/// acknowledged event is in the lake once, and every booking is decided once.
#[test]
fn a_worker_cut_off_from_the_lease_table_and_back_writes_no_event_to_the_lake_twice() {
    let mut f = Faulted::start(
        "cut-off",
        Setup {
            dynamodb_proxy: true,
            ..AGGREGATED
        },
    );
    let load = Load::start(f.edge.addr, "co");
    wait_for(120, "load before the cut", || {
        (load.acked() >= PHASE_ACKS).then_some(())
    });
    // The second worker reaches moto directly.
    let config = std::fs::read_to_string(f.dir.path().join("floodgate.toml")).unwrap();
    let proxy = f.dynamodb_proxy.as_ref().expect("a dynamodb proxy");
    let direct = config.replace(&proxy.endpoint(), &f.moto.endpoint);
    assert_ne!(
        config, direct,
        "the second worker's config names moto itself"
    );
    let direct_config = f.dir.path().join("direct.toml");
    std::fs::write(&direct_config, direct).unwrap();

    proxy.set(FaultPlan::seeded(3).rule(Rule::new("*", Fault::throughput_exceeded())));
    let mut worker = floodgate()
        .args(["process", "--listen", "127.0.0.1:0", "--config"])
        .arg(&direct_config)
        .envs(CREDENTIALS)
        .env("FLOODGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(f.dir.path().join("worker.log")).unwrap())
        .spawn()
        .expect("floodgate process starts");
    let store = DynamoDbLeases::new(
        f.moto.dynamodb_client(),
        format!("{}-leases", f.stream),
        Duration::from_millis(LEASE_MS),
    );
    let all_held_by = |pid: u32, consumers: &[&str]| {
        let mine = format!(":pid{pid}-");
        let leases: Vec<LeaseInfo> = consumers
            .iter()
            .flat_map(|c| {
                f.rt.block_on(store.leases(c))
                    .expect("moto lists the leases")
            })
            .collect();
        leases
            .iter()
            .all(|l| l.owner.as_deref().is_some_and(|o| o.contains(&mine)))
            .then_some(())
    };
    let cut = Instant::now();
    wait_for(60, "the second worker to take every lease", || {
        all_held_by(worker.id(), &["bookings", "lake"])
    });
    eprintln!(
        "the second worker holds every lease {} ms after the cut",
        cut.elapsed().as_millis()
    );
    let before = load.acked();
    wait_for(120, "load after the takeover", || {
        (load.acked() >= before + 3 * PHASE_ACKS).then_some(())
    });
    let tally = load.stop();
    let injected = proxy.injected();
    assert!(injected.total() > 0, "the cut never struck: {injected:?}");
    proxy.set(FaultPlan::default());
    assert!(tally.unexpected.is_empty(), "{:?}", tally.unexpected);

    let acked_bookings: Vec<String> = tally.acked.iter().map(|(_, b)| b.clone()).collect();
    bookings_decided(&f.edge, &acked_bookings, 180);
    // The second worker leaves (writing its runs, handing its leases back); the first
    // takes its shards back, then stops too.
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the worker did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(60, "the first worker to take its shards back", || {
        all_held_by(f.edge.child.id(), &["lake"])
    });
    assert_eq!(f.edge.terminate(), Some(0), "serve exits cleanly");
    eprintln!(
        "the cut-off worker's warnings: {:?}; the second worker's: {:?}",
        warnings(&f.dir.path().join("serve.log")),
        warnings(&f.dir.path().join("worker.log"))
    );
    let mut decisions: HashMap<String, usize> = HashMap::new();
    for e in outbox_read(&f.data()) {
        if matches!(
            e["type"].as_str(),
            Some("booking.confirmed" | "booking.rejected")
        ) && let Some(b) = e["data"]["bookingId"].as_str()
        {
            *decisions.entry(b.to_owned()).or_default() += 1;
        }
    }
    let twice: Vec<&String> = acked_bookings
        .iter()
        .filter(|b| decisions.get(*b).is_some_and(|&n| n > 1))
        .collect();
    assert!(
        twice.is_empty(),
        "{} acknowledged bookings decided more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    check_lake_and_stream(&f, &tally, Writes::Once);
}
