//! `floodgate backup` beside a live server under load, `floodgate restore`, and a server
//! on the restored directory: the backup holds every event acknowledged before it began,
//! and the restored deployment's bookings, capacity, derived events and lake are exactly
//! what the bookings rules make of the restored log, each effect once.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Posters, Server, booking, envelope, floodgate, outbox_read, stream_read, wait_for};
use serde_json::{Value, json};

/// The shows on sale and their capacities: the first sells out within moments, so the
/// load holds confirmed and rejected bookings on both sides of the backup.
const SHOWS: [(&str, i64); 3] = [("show-a", 60), ("show-b", 1500), ("show-c", 4000)];

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "the test venv is missing: run scripts/venv (scripts/test does) to install duckdb"
    );
    p
}

/// Many small segments (the backup copies sealed ones first, the rest last) and a lake
/// that writes files and moves its checkpoints every few hundred milliseconds, so the
/// backup runs while all of them move.
fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("floodgate.toml");
    std::fs::write(
        &path,
        "[stream.embedded]\nsegment_bytes = 8192\n[lake]\nroll_age_ms = 200\n\
         [publish.outbox]\nsegment_bytes = 4096\n",
    )
    .unwrap();
    path
}

/// Runs `floodgate` with `args`; its standard output, or a failure with its output.
fn run<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = floodgate().args(args).output().expect("floodgate runs");
    assert!(
        out.status.success(),
        "floodgate {:?} failed: {}{}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `floodgate` with `args`, expecting it to fail; its standard error.
fn refused<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = floodgate().args(args).output().expect("floodgate runs");
    assert!(
        !out.status.success(),
        "floodgate {:?} succeeded",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Client `c`'s `n`-th batch: five booking requests across the shows, 1 to 4 seats; every
/// tenth batch also carries an invalid one (0 seats), which goes to the quarantine (and
/// makes the batch's answer 207, so its valid events do not count as acked here).
fn load_batch(c: usize, n: usize) -> Vec<Value> {
    let mut batch: Vec<Value> = (0..5)
        .map(|i| {
            let k = c * 7 + n * 5 + i;
            booking(
                &format!("req-{c}-{n}-{i}"),
                &format!("bk-{c}-{n}-{i}"),
                SHOWS[k % SHOWS.len()].0,
                1 + (k % 4) as i64,
            )
        })
        .collect();
    if n % 10 == 9 {
        batch.push(booking(&format!("bad-{c}-{n}"), "bk-bad", SHOWS[0].0, 0));
    }
    batch
}

/// What the bookings rules make of a log: each booking's (event, seats, status, reason)
/// and each show's reserved seats. Shows are keys, so each show's records are in one shard
/// in order, and bookingIds here are all distinct: shards do not interact.
#[derive(Debug, Default)]
struct Model {
    bookings: BTreeMap<String, (String, i64, &'static str, Option<&'static str>)>,
    capacity: HashMap<String, i64>,
    reserved: HashMap<String, i64>,
}

impl Model {
    fn of(records: &[Value]) -> Model {
        let mut by_shard: BTreeMap<i64, Vec<(u64, &Value)>> = BTreeMap::new();
        for r in records {
            let seq: u64 = r["sequence"].as_str().unwrap().parse().unwrap();
            by_shard
                .entry(r["shard"].as_i64().unwrap())
                .or_default()
                .push((seq, &r["event"]));
        }
        let mut m = Model::default();
        for (_, mut events) in by_shard {
            events.sort_by_key(|(seq, _)| *seq);
            for (_, e) in events {
                let data = &e["data"];
                let show = data["eventId"].as_str().unwrap().to_owned();
                match e["type"].as_str().unwrap() {
                    "inventory.event.created" => {
                        m.capacity
                            .entry(show.clone())
                            .or_insert(data["capacity"].as_i64().unwrap());
                        m.reserved.entry(show).or_insert(0);
                    }
                    "booking.requested" => {
                        let id = data["bookingId"].as_str().unwrap().to_owned();
                        let seats = data["seats"].as_i64().unwrap();
                        if m.bookings.contains_key(&id) {
                            continue;
                        }
                        let decision = match m.capacity.get(&show) {
                            None => ("rejected", Some("unknown_event")),
                            Some(cap) if m.reserved[&show] + seats <= *cap => {
                                *m.reserved.get_mut(&show).unwrap() += seats;
                                ("confirmed", None)
                            }
                            Some(_) => ("rejected", Some("insufficient_capacity")),
                        };
                        m.bookings.insert(id, (show, seats, decision.0, decision.1));
                    }
                    other => panic!("the test posts no {other}"),
                }
            }
        }
        m
    }

    fn confirmed(&self) -> usize {
        self.bookings
            .values()
            .filter(|b| b.2 == "confirmed")
            .count()
    }
}

/// Waits until the server has decided every booking of `model`, then checks each booking
/// and each show against the model, and reserved seats against the confirmed bookings.
fn check_state(server: &Server, model: &Model) {
    let ids: Vec<String> = model.bookings.keys().cloned().collect();
    let answers = common::bookings_decided(server, &ids, 60);
    let mut confirmed_seats: HashMap<String, i64> = HashMap::new();
    for (id, (show, seats, status, reason)) in &model.bookings {
        let b = &answers[id];
        assert_eq!(b["eventId"], json!(show), "booking {id}: {b}");
        assert_eq!(b["seats"], json!(seats), "booking {id}: {b}");
        assert_eq!(
            b["status"],
            json!(status),
            "booking {id}: the restored state decided {b}, the rules over the restored log \
             decide {status}"
        );
        assert_eq!(b["reason"].as_str(), *reason, "booking {id}: {b}");
        if *status == "confirmed" {
            *confirmed_seats.entry(show.clone()).or_default() += seats;
        }
    }
    for (show, capacity) in &model.capacity {
        let inv = server.get(&format!("/v1/inventory/{show}")).json();
        assert_eq!(inv["capacity"], json!(capacity), "{inv}");
        assert_eq!(
            inv["reserved"],
            json!(model.reserved[show]),
            "{show}: reserved in the restored state vs the rules over the restored log: {inv}"
        );
        assert_eq!(
            inv["reserved"],
            json!(confirmed_seats.get(show).copied().unwrap_or(0)),
            "{show}: reserved differs from the seats of its confirmed bookings (applied \
             twice?): {inv}"
        );
    }
}

/// Every booking of `model` decided exactly once in the derived events, as the model says;
/// no derived event twice.
fn check_derived(data: &Path, model: &Model) {
    let outbox = wait_for(60, "every decision to be published", || {
        let outbox = outbox_read(data);
        let decided: HashSet<&str> = outbox
            .iter()
            .filter(|e| {
                matches!(
                    e["type"].as_str(),
                    Some("booking.confirmed" | "booking.rejected")
                )
            })
            .filter_map(|e| e["data"]["bookingId"].as_str())
            .collect();
        model
            .bookings
            .keys()
            .all(|id| decided.contains(id.as_str()))
            .then_some(outbox)
    });
    let mut ids = HashSet::new();
    let mut decisions: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in &outbox {
        assert!(
            ids.insert(e["id"].as_str().unwrap()),
            "derived event published twice: {e}"
        );
        if let Some(t @ ("booking.confirmed" | "booking.rejected")) = e["type"].as_str() {
            decisions
                .entry(e["data"]["bookingId"].as_str().unwrap())
                .or_default()
                .push(t);
        }
    }
    for (id, (_, _, status, _)) in &model.bookings {
        let d = &decisions[id.as_str()];
        assert_eq!(
            d,
            &vec![if *status == "confirmed" {
                "booking.confirmed"
            } else {
                "booking.rejected"
            }],
            "booking {id}: decisions in the derived events"
        );
    }
    assert_eq!(
        decisions.len(),
        model.bookings.len(),
        "decisions for bookings that are not in the restored log"
    );
}

/// Every event id of a lake table, with repeats, via the test venv's DuckDB.
fn lake_ids(lake: &Path, table: &str) -> Vec<String> {
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .args(["ids"])
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

#[test]
fn a_backup_under_load_restores_to_a_deployment_that_applied_its_log_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    let backup_dir = dir.path().join("backup");
    let restored = dir.path().join("restored");
    let cfg = config.to_str().unwrap();

    let mut server = Server::start(&data, &["--config", cfg]);
    let created: Vec<Value> = SHOWS
        .iter()
        .map(|(show, capacity)| {
            envelope(
                &format!("create-{show}"),
                "inventory.event.created",
                json!({"eventId": show, "name": "Show", "venue": "Hall",
                       "startsAt": "2026-12-01T20:00:00Z", "capacity": capacity}),
            )
        })
        .collect();
    assert_eq!(server.post_batch(&created).status, 200);

    // Load, then a backup while the load goes on.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let posters = Posters::start(server.addr, 4, acked.clone(), load_batch);
    wait_for(60, "load to be acked", || {
        (posters.acked() >= 1500).then_some(())
    });
    let before: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let started = Instant::now();
    let out = run(&[
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--to"),
        backup_dir.as_os_str(),
    ]);
    let backup_took = started.elapsed();
    let acked_by_end = posters.acked();
    let acked_during = acked_by_end - before.len();
    std::thread::sleep(Duration::from_millis(300));
    posters.stop();
    assert!(acked_during > 0, "the load went on during the backup");
    assert_eq!(server.terminate(), Some(0));
    eprintln!("backup took {backup_took:?}; {acked_during} events acked meanwhile:\n{out}");

    // Restore into a new directory, then check what it holds before anything runs on it.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).unwrap()).unwrap();
    let restore_out = run(&[
        OsStr::new("restore"),
        OsStr::new("--from"),
        backup_dir.as_os_str(),
        OsStr::new("--data-dir"),
        restored.as_os_str(),
    ]);
    eprintln!("{restore_out}");
    let log = stream_read(&restored, &[]);
    let backed_up = log.len();
    let in_log: HashSet<&str> = log
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        in_log.len(),
        log.len(),
        "an event is in the restored log twice"
    );
    let missing: Vec<&String> = before
        .iter()
        .filter(|id| !in_log.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of the {} events acked before the backup began are not in the restored log, e.g. {:?}",
        missing.len(),
        before.len(),
        &missing[..missing.len().min(5)]
    );
    // The state applied nothing the restored log lacks: else the restored stream would
    // hand those sequence numbers to new events, which the state would skip as applied.
    let mut log_end: HashMap<String, u64> = HashMap::new();
    for r in &log {
        let seq: u64 = r["sequence"].as_str().unwrap().parse().unwrap();
        let end = log_end.entry(r["shard"].to_string()).or_default();
        *end = (*end).max(seq + 1);
    }
    for (shard, position) in manifest["state"]["positions"].as_object().unwrap() {
        let position: u64 = position.as_str().unwrap().parse().unwrap();
        let end = log_end.get(shard).copied().unwrap_or(0);
        assert!(
            position < end,
            "the restored state applied shard {shard} through {position}, but the restored \
             log ends before {end}"
        );
    }
    let acked_later = acked.lock().unwrap()[acked_by_end..].to_vec();
    assert!(
        acked_later.iter().any(|id| !in_log.contains(id.as_str())),
        "the backup holds every one of the {} events acked after it ended: was the load on?",
        acked_later.len()
    );

    // A server on the restored directory: it catches up, and takes new events.
    let server = Server::start(&restored, &["--config", cfg]);
    let after: Vec<Value> = (0..30)
        .map(|i| {
            booking(
                &format!("after-{i}"),
                &format!("bk-after-{i}"),
                SHOWS[i % SHOWS.len()].0,
                1 + (i % 3) as i64,
            )
        })
        .collect();
    assert_eq!(server.post_batch(&after).status, 200);
    let log = stream_read(&restored, &[]);
    let model = Model::of(&log);
    assert!(
        model.confirmed() > 0 && model.confirmed() < model.bookings.len(),
        "the load holds confirmed and rejected bookings"
    );
    check_state(&server, &model);
    check_derived(&restored, &model);
    eprintln!(
        "acked before the backup: {}; in the backup: {backed_up} events; in the restored log \
         after 30 more: {} events ({} bookings: {} confirmed, {} rejected), all compared with \
         the restored state; manifest shards: {}",
        before.len(),
        log.len(),
        model.bookings.len(),
        model.confirmed(),
        model.bookings.len() - model.confirmed(),
        manifest["logs"]
    );

    // The lake: a clean stop flushes; every booking request in it once, every
    // confirmation once.
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    let lake = restored.join("lake");
    let mut requested = lake_ids(&lake, "booking_requested");
    requested.sort();
    let mut expected: Vec<String> = log
        .iter()
        .filter(|r| r["event"]["type"] == "booking.requested")
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    assert_eq!(
        requested, expected,
        "the restored lake's booking_requested table is not the restored log's requests, once each"
    );
    let confirmed = lake_ids(&lake, "booking_confirmed");
    let distinct: HashSet<&String> = confirmed.iter().collect();
    assert_eq!(
        distinct.len(),
        confirmed.len(),
        "a confirmation is in the lake twice"
    );
    assert_eq!(
        confirmed.len(),
        model.confirmed(),
        "confirmations in the lake"
    );
    // The rejected events (the quarantine log) came through too, once each.
    let quarantined = lake_ids(&lake, "quarantine");
    let distinct: HashSet<&String> = quarantined.iter().collect();
    assert!(!quarantined.is_empty(), "the quarantine table is empty");
    assert_eq!(
        distinct.len(),
        quarantined.len(),
        "a rejected event is in the lake twice"
    );
}

/// A backup refuses a destination that is not empty, and a restore a data directory that
/// is not empty or a backup without its manifest; none of them changes anything.
#[test]
fn backup_and_restore_refuse_directories_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    assert_eq!(
        server
            .post_batch(&[booking("r1", "bk-r1", "nowhere", 1)])
            .status,
        200
    );
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    let err = refused(&[
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--to"),
        full.as_os_str(),
    ]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");

    let backup_dir = dir.path().join("b");
    run(&[
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--to"),
        backup_dir.as_os_str(),
    ]);
    server.terminate();
    let err = refused(&[
        OsStr::new("restore"),
        OsStr::new("--from"),
        backup_dir.as_os_str(),
        OsStr::new("--data-dir"),
        full.as_os_str(),
    ]);
    assert!(err.contains("not empty"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = refused(&[
        OsStr::new("restore"),
        OsStr::new("--from"),
        empty.as_os_str(),
        OsStr::new("--data-dir"),
        dir.path().join("r").as_os_str(),
    ]);
    assert!(err.contains("manifest.json"), "{err}");

    // A flipped byte in a segment: the restore names the file and leaves nothing behind.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).unwrap()).unwrap();
    let seg = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .find(|p| {
            p.starts_with("stream/") && p.ends_with(".seg") && {
                std::fs::metadata(backup_dir.join(p)).unwrap().len() > 0
            }
        })
        .unwrap()
        .to_owned();
    let mut bytes = std::fs::read(backup_dir.join(&seg)).unwrap();
    bytes[40] ^= 1;
    std::fs::write(backup_dir.join(&seg), bytes).unwrap();
    let target = dir.path().join("r");
    let err = refused(&[
        OsStr::new("restore"),
        OsStr::new("--from"),
        backup_dir.as_os_str(),
        OsStr::new("--data-dir"),
        target.as_os_str(),
    ]);
    assert!(err.contains(&seg), "{err}");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "a failed restore left files"
    );
}
