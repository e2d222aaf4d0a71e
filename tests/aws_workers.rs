//! Scaling out on Kinesis with DynamoDB leases, through the binary: an edge (`floodgate
//! ingest`) and several `floodgate process` workers sharing one data directory's SQLite
//! state (until the DynamoDB state store lands), against kinesalite and moto server.
//!
//! - Two workers split the shards; a third joins and the leases rebalance; one is killed
//!   with SIGKILL and its leases are taken within about twice the lease duration.
//! - Shards are split and merged under a steady load.
//!
//! Throughout, every acknowledged booking is decided exactly once, capacity is never
//! oversold, the decisions of one show come out in the order its requests were acked
//! (per-key order through the reshard), and every acknowledged event is in the lake once.
#![cfg(feature = "emulator-tests")]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, booking, envelope, floodgate, outbox_read, try_request, wait_for};
use floodgate_aws::emulator::{self, Emulator};
use floodgate_aws::leases::DynamoDbLeases;
use floodgate_core::stream::{CheckpointStore, LeaseInfo};
use serde_json::{Value, json};

const CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];
const LEASE_MS: u64 = 2000;
const CAPACITY: i64 = 1_000_000;

struct Deployment {
    _kinesis: Emulator,
    moto: Emulator,
    kinesis_client: aws_sdk_kinesis::Client,
    dir: tempfile::TempDir,
    config: PathBuf,
    stream: String,
}

impl Deployment {
    fn new(stream: &str, shards: u32) -> Deployment {
        let kinesis = emulator::kinesalite(50).expect("kinesalite starts");
        let moto = emulator::moto().expect("moto server starts");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("floodgate.toml");
        std::fs::write(
            &config,
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
shards = {shards}
[coordination]
backend = "dynamodb"
table_name = "{stream}-leases"
lease_duration_ms = {LEASE_MS}
"#,
                data = dir.path().join("data").display(),
                moto = moto.endpoint,
                kinesis = kinesis.endpoint,
            ),
        )
        .unwrap();
        let init = floodgate()
            .args(["aws", "init", "--config"])
            .arg(&config)
            .envs(CREDENTIALS)
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        Deployment {
            kinesis_client: kinesis.kinesis_client(),
            _kinesis: kinesis,
            moto,
            dir,
            config,
            stream: stream.to_owned(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn edge(&self, command: &str) -> Server {
        let config = self.config.display().to_string();
        Server::start_as(
            command,
            &self.data(),
            &["--config", &config],
            Some(&self.dir.path().join(format!("{command}.log"))),
            &CREDENTIALS,
        )
    }

    /// A `floodgate process` worker; its log goes to `worker-<name>.log`.
    fn worker(&self, name: &str) -> Child {
        let log =
            std::fs::File::create(self.dir.path().join(format!("worker-{name}.log"))).unwrap();
        floodgate()
            .args(["process", "--listen", "127.0.0.1:0", "--config"])
            .arg(&self.config)
            .envs(CREDENTIALS)
            .env("FLOODGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// The bookings consumer's leases, as the table says.
    fn leases(&self) -> Vec<LeaseInfo> {
        self.leases_of("bookings")
    }

    /// A consumer's leases, as the table says.
    fn leases_of(&self, consumer: &str) -> Vec<LeaseInfo> {
        let store = DynamoDbLeases::new(
            self.moto.dynamodb_client(),
            format!("{}-leases", self.stream),
            Duration::from_millis(LEASE_MS),
        );
        rt().block_on(store.leases(consumer)).unwrap()
    }

    /// Waits until the worker `pid` holds the lake consumer's lease of every open shard.
    /// A worker drains at SIGTERM the shards it runs, and only those: a lease nobody holds
    /// yet (a killed worker's, until it expires; one another worker released at its own
    /// SIGTERM; a merged child whose parents the lake has only just finished) is read by
    /// the next worker that runs. Each consumer takes its leases on its own, so the
    /// bookings consumer's holdings say nothing of the lake's.
    fn wait_for_lake_leases(&self, pid: u32) {
        let open: Vec<String> = rt()
            .block_on(floodgate_aws::kinesis::list_shards(
                &self.kinesis_client,
                &self.stream,
            ))
            .unwrap()
            .into_iter()
            .filter(|s| {
                s.sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_none())
            })
            .map(|s| s.shard_id().to_owned())
            .collect();
        let mine = format!(":pid{pid}-");
        wait_for(120, "the lake's leases of every open shard", || {
            let leases = self.leases_of("lake");
            open.iter()
                .all(|shard| {
                    leases.iter().any(|l| {
                        l.shard.0 == *shard
                            && !l.finished
                            && l.owner.as_deref().is_some_and(|o| o.contains(&mine))
                    })
                })
                .then_some(())
        });
    }

    /// The relay lease's owner and counter (raw, as the table holds them).
    fn relay_lease(&self) -> (Option<String>, i64) {
        let out = rt()
            .block_on(
                self.moto
                    .dynamodb_client()
                    .get_item()
                    .table_name(format!("{}-leases", self.stream))
                    .key(
                        "leaseKey",
                        aws_sdk_dynamodb::types::AttributeValue::S("relay:outbox".to_owned()),
                    )
                    .consistent_read(true)
                    .send(),
            )
            .unwrap();
        let item = out.item().cloned().unwrap_or_default();
        let owner = item.get("leaseOwner").and_then(|v| v.as_s().ok()).cloned();
        let counter = item
            .get("leaseCounter")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (owner, counter)
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How many of the unfinished `bookings` leases each worker (by pid) holds.
fn holdings(leases: &[LeaseInfo], workers: &[(&str, u32)]) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = workers.iter().map(|(n, _)| (n.to_string(), 0)).collect();
    for l in leases.iter().filter(|l| !l.finished) {
        let Some(owner) = &l.owner else { continue };
        let name = workers
            .iter()
            .find(|(_, pid)| owner.contains(&format!(":pid{pid}-")))
            .map_or_else(|| format!("other {owner}"), |(n, _)| n.to_string());
        *out.entry(name).or_default() += 1;
    }
    out
}

fn wait_for_holdings(
    d: &Deployment,
    workers: &[(&str, u32)],
    want: &[(&str, usize)],
    secs: u64,
) -> Duration {
    let started = Instant::now();
    let want: HashMap<String, usize> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
    let deadline = started + Duration::from_secs(secs);
    loop {
        let last = holdings(&d.leases(), workers);
        if last == want {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "leases never reached {want:?}; last {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Posters: client `c` books seats on show `show-c` only, one event per request, so each
/// show's requests have one order: the order they were acked in.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<Vec<(usize, String, String)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, clients: usize, tag: &str) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, acked, tag) = (stop.clone(), acked.clone(), tag.to_owned());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let id = format!("{tag}-{c}-{n}");
                        let event = booking(&id, &format!("bk-{id}"), &format!("show-{c}"), 1);
                        n += 1;
                        let body = serde_json::to_vec(&[event]).unwrap();
                        let Ok(resp) = try_request(
                            addr,
                            "POST",
                            "/v1/events",
                            &[("content-type", "application/cloudevents-batch+json")],
                            Some(&body),
                        ) else {
                            break;
                        };
                        match resp.status {
                            200 => acked
                                .lock()
                                .unwrap()
                                .push((c, id.clone(), format!("bk-{id}"))),
                            503 => std::thread::sleep(Duration::from_millis(20)),
                            other => panic!(
                                "unexpected status {other}: {}",
                                String::from_utf8_lossy(&resp.body)
                            ),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            acked,
            threads,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn stop(self) -> Vec<(usize, String, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a poster failed");
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Creates the shows without waiting for them (no worker may be running yet). The
/// creations are keyed by show, so each is applied before the show's bookings.
fn create_shows_unchecked(edge: &Server, shows: usize) {
    let events: Vec<Value> = (0..shows)
        .map(|c| {
            envelope(
                &format!("create-show-{c}"),
                "inventory.event.created",
                json!({"eventId": format!("show-{c}"), "name": "Rush", "venue": "Arena",
                       "startsAt": "2026-12-01T20:00:00Z", "capacity": CAPACITY}),
            )
        })
        .collect();
    assert_eq!(edge.post_batch(&events).status, 200);
}

fn create_shows(edge: &Server, shows: usize) {
    let events: Vec<Value> = (0..shows)
        .map(|c| {
            envelope(
                &format!("create-show-{c}"),
                "inventory.event.created",
                json!({"eventId": format!("show-{c}"), "name": "Rush", "venue": "Arena",
                       "startsAt": "2026-12-01T20:00:00Z", "capacity": CAPACITY}),
            )
        })
        .collect();
    assert_eq!(edge.post_batch(&events).status, 200);
    for c in 0..shows {
        wait_for(120, "the shows to exist", || {
            (edge.get(&format!("/v1/inventory/show-{c}")).status == 200).then_some(())
        });
    }
}

/// The checks every scenario ends with: each acked booking decided exactly once and in
/// its show's ack order, no show oversold, each acked event in the lake exactly once.
fn check_outcomes(d: &Deployment, edge: &Server, acked: &[(usize, String, String)], shows: usize) {
    let acked_bookings: HashSet<&str> = acked.iter().map(|(_, _, b)| b.as_str()).collect();
    let outbox = wait_for(
        240,
        "every acked booking to be decided and published",
        || {
            let outbox = outbox_read(&d.data());
            let decided: HashSet<String> = outbox
                .iter()
                .filter(|e| {
                    matches!(
                        e["type"].as_str(),
                        Some("booking.confirmed" | "booking.rejected")
                    )
                })
                .filter_map(|e| e["data"]["bookingId"].as_str().map(str::to_owned))
                .collect();
            acked_bookings
                .iter()
                .all(|b| decided.contains(*b))
                .then_some(outbox)
        },
    );
    // Exactly once, and per show in ack order.
    let mut decisions: HashMap<String, usize> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for e in &outbox {
        if !matches!(
            e["type"].as_str(),
            Some("booking.confirmed" | "booking.rejected")
        ) {
            continue;
        }
        let b = e["data"]["bookingId"].as_str().unwrap().to_owned();
        *decisions.entry(b.clone()).or_default() += 1;
        if acked_bookings.contains(b.as_str()) {
            order
                .entry(e["data"]["eventId"].as_str().unwrap().to_owned())
                .or_default()
                .push(b);
        }
    }
    for b in &acked_bookings {
        assert_eq!(decisions.get(*b), Some(&1), "{b} decided once");
    }
    for c in 0..shows {
        let want: Vec<String> = acked
            .iter()
            .filter(|(client, _, _)| *client == c)
            .map(|(_, _, b)| b.clone())
            .collect();
        let got = order.remove(&format!("show-{c}")).unwrap_or_default();
        assert!(
            got == want,
            "show-{c}: decisions out of ack order (first difference at {:?})",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        let inventory = edge.get(&format!("/v1/inventory/show-{c}")).json();
        assert!(
            inventory["reserved"].as_i64().unwrap() <= CAPACITY,
            "oversold: {inventory}"
        );
    }
}

fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "worker exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lake_ids(lake: &Path) -> HashMap<String, usize> {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .args(["ids"])
        .arg(lake)
        .arg("booking_requested")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut counts = HashMap::new();
    for id in v["ids"].as_array().unwrap() {
        *counts.entry(id.as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

fn check_lake(d: &Deployment, acked: &[(usize, String, String)]) {
    let counts = lake_ids(&d.data().join("lake"));
    let wrong: Vec<(&str, usize)> = acked
        .iter()
        .map(|(_, id, _)| (id.as_str(), counts.get(id).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    if !wrong.is_empty() {
        // The workers' logs and the lake are what explain it: keep them.
        let kept = std::env::temp_dir().join(format!("aws-workers-failed-{}", std::process::id()));
        let _ = Command::new("cp")
            .arg("-r")
            .arg(d.dir.path())
            .arg(&kept)
            .status();
        panic!(
            "{} of {} acked events are not in the lake exactly once (first: {:?}); deployment kept in {}",
            wrong.len(),
            acked.len(),
            &wrong[..wrong.len().min(10)],
            kept.display()
        );
    }
}

#[test]
fn workers_split_the_shards_rebalance_when_one_joins_and_take_over_after_kill_9() {
    let d = Deployment::new("workers", 6);
    let edge = d.edge("ingest");
    let mut a = d.worker("a");
    let mut b = d.worker("b");
    let pids = [("a", a.id()), ("b", b.id())];
    wait_for_holdings(&d, &pids, &[("a", 3), ("b", 3)], 120);
    // One relay, and its lease is renewed on a timer: over three lease durations its
    // owner stays while its counter moves (an unrenewed lease would pass to the other).
    let (owner, counter) = wait_for(60, "a relay", || {
        let (owner, counter) = d.relay_lease();
        owner.map(|o| (o, counter))
    });
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(3 * LEASE_MS) {
        assert_eq!(
            d.relay_lease().0.as_ref(),
            Some(&owner),
            "the relay lease moved"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        d.relay_lease().1 > counter + 3,
        "the relay lease was not renewed"
    );
    create_shows(&edge, 6);
    let load = Load::start(edge.addr, 6, "w");
    wait_for(60, "some load", || (load.acked() > 50).then_some(()));

    let mut c = d.worker("c");
    let pids = [("a", a.id()), ("b", b.id()), ("c", c.id())];
    let rebalance = wait_for_holdings(&d, &pids, &[("a", 2), ("b", 2), ("c", 2)], 120);
    eprintln!(
        "rebalance after a worker joined: {} ms",
        rebalance.as_millis()
    );
    let before = load.acked();
    wait_for(60, "more load", || {
        (load.acked() > before + 50).then_some(())
    });

    let _ = b.kill();
    let _ = b.wait();
    let takeover = wait_for_holdings(&d, &pids, &[("a", 3), ("b", 0), ("c", 3)], 120);
    eprintln!(
        "takeover after kill -9: {} ms (lease duration {LEASE_MS} ms)",
        takeover.as_millis()
    );
    let before = load.acked();
    wait_for(60, "load after the takeover", || {
        (load.acked() > before + 50).then_some(())
    });
    let acked = load.stop();
    check_outcomes(&d, &edge, &acked, 6);
    // SIGTERM hands the leases over at once (released after a checkpoint), without
    // waiting for them to expire.
    let started = Instant::now();
    terminate(&mut a);
    wait_for_holdings(&d, &pids, &[("a", 0), ("b", 0), ("c", 6)], 120);
    eprintln!(
        "hand-off after SIGTERM (exit included): {} ms",
        started.elapsed().as_millis()
    );
    d.wait_for_lake_leases(c.id());
    terminate(&mut c);
    check_lake(&d, &acked);
}

/// The edge takes a steady load while a shard is split and its children merged again. The
/// worker starts only after the split, with the parent's records still unread, so it has
/// a parent and its children to read at once: it must finish the parent first (and both
/// children before their merged child) for each show's decisions to stay in order.
#[test]
fn splitting_and_merging_under_load_keeps_each_keys_order_and_loses_nothing() {
    let d = Deployment::new("reshard", 2);
    let edge = d.edge("ingest");
    create_shows_unchecked(&edge, 8);
    let load = Load::start(edge.addr, 8, "r");
    wait_for(60, "some load", || (load.acked() > 200).then_some(()));
    let rt = rt();
    let shards = rt
        .block_on(floodgate_aws::kinesis::list_shards(
            &d.kinesis_client,
            &d.stream,
        ))
        .unwrap();
    let first = shards[0].shard_id().to_owned();
    rt.block_on(floodgate_aws::kinesis::split_shard(
        &d.kinesis_client,
        &d.stream,
        &first,
    ))
    .unwrap();
    let before = load.acked();
    wait_for(60, "load after the split", || {
        (load.acked() > before + 200).then_some(())
    });
    let mut worker = d.worker("reshard");
    // Merge the two children of the split back together.
    let open: Vec<String> = rt
        .block_on(floodgate_aws::kinesis::list_shards(
            &d.kinesis_client,
            &d.stream,
        ))
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.parent_shard_id() == Some(first.as_str())
                && s.sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_none())
        })
        .map(|s| s.shard_id().to_owned())
        .collect();
    assert_eq!(open.len(), 2, "the split's two children: {open:?}");
    rt.block_on(floodgate_aws::kinesis::merge_shards(
        &d.kinesis_client,
        &d.stream,
        &open[0],
        &open[1],
    ))
    .unwrap();
    let before = load.acked();
    wait_for(60, "load after the merge", || {
        (load.acked() > before + 200).then_some(())
    });
    let acked = load.stop();
    check_outcomes(&d, &edge, &acked, 8);
    // The merged child is the lake's only once it has finished both of its parents.
    d.wait_for_lake_leases(worker.id());
    terminate(&mut worker);
    check_lake(&d, &acked);
}

/// Stateless edges: a producer's retry that reaches another edge is the same event. Two
/// edges (each with its own data directory, so neither knows what the other accepted)
/// both accept the same events; the worker applies each once and the lake holds it once.
#[test]
fn the_same_event_accepted_by_two_edges_is_applied_and_stored_once() {
    let d = Deployment::new("two-edges", 2);
    let config = d.config.display().to_string();
    let edges: Vec<Server> = ["edge-1", "edge-2"]
        .iter()
        .map(|name| {
            Server::start_as(
                "ingest",
                &d.dir.path().join(name),
                &["--config", &config],
                None,
                &CREDENTIALS,
            )
        })
        .collect();
    create_shows_unchecked(&edges[0], 2);
    let events: Vec<Value> = (0..100)
        .map(|i| {
            booking(
                &format!("twice-{i}"),
                &format!("bk-twice-{i}"),
                &format!("show-{}", i % 2),
                1,
            )
        })
        .collect();
    for edge in &edges {
        for chunk in events.chunks(10) {
            let resp = edge.post_batch(chunk);
            assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        }
    }
    let mut worker = d.worker("two-edges");
    let acked: Vec<(usize, String, String)> = (0..100)
        .map(|i| (i % 2, format!("twice-{i}"), format!("bk-twice-{i}")))
        .collect();
    // The worker's data directory holds the decisions (the edges' hold nothing of it).
    let outbox = wait_for(240, "every booking decided", || {
        let outbox = outbox_read(&d.data());
        let decided = outbox
            .iter()
            .filter(|e| e["type"] == "booking.confirmed" || e["type"] == "booking.rejected")
            .count();
        (decided >= acked.len()).then_some(outbox)
    });
    let mut decisions: HashMap<String, usize> = HashMap::new();
    for e in &outbox {
        if let Some(b) = e["data"]["bookingId"].as_str() {
            *decisions.entry(b.to_owned()).or_default() += 1;
        }
    }
    for (_, _, b) in &acked {
        assert_eq!(decisions.get(b), Some(&1), "{b} decided once");
    }
    d.wait_for_lake_leases(worker.id());
    terminate(&mut worker);
    check_lake(&d, &acked);
}
