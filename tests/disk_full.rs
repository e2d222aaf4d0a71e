//! A full disk, and then room again: the data directory is a small tmpfs filled under
//! booking load until every writer (the log, SQLite, the outbox, the lake) hits ENOSPC,
//! then grown. Afterwards every acknowledged event is in the stream once, every booking is
//! decided once, and every decision's derived event is published once; the outbox has no
//! torn line, and the lake holds every acknowledged event once.
//!
//! Needs root (mount); the test script runs as root, as CI does.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Posters, Server, booking, envelope, outbox_read, wait_for};
use serde_json::{Value, json};

/// A tmpfs mounted for the test; unmounted on drop (lazily, so a failing test cannot
/// leave it busy).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount(8) runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (scripts/test runs as root in CI)"
        );
        Tmpfs(dir.to_owned())
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount failed");
    }

    fn available_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_then_room_again_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = Tmpfs::mount(&data, "12m");
    let config = dir.path().join("floodgate.toml");
    std::fs::write(
        &config,
        "[lake]\nroll_age_ms = 300\n[stream.embedded]\nsegment_bytes = 1048576\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    let events: Vec<String> = (0..4).map(|i| format!("full-ev-{i}")).collect();
    let created: Vec<Value> = events
        .iter()
        .map(|e| {
            envelope(
                &format!("create-{e}"),
                "inventory.event.created",
                json!({"eventId": e, "name": "Full", "venue": "Disk", "startsAt": "2026-12-01T20:00:00Z", "capacity": 1_000_000}),
            )
        })
        .collect();
    assert_eq!(server.post_batch(&created).status, 200);

    let acked = Arc::new(Mutex::new(Vec::new()));
    let batch = {
        let events = events.clone();
        move |c: usize, n: usize| -> Vec<Value> {
            (0..50)
                .map(|k| {
                    let id = format!("full-{c}-{n}-{k}");
                    booking(&id, &id, &events[k % events.len()], 1)
                })
                .collect()
        }
    };
    let posters = Posters::start(server.addr, 4, acked.clone(), batch.clone());
    // Fill the disk: wait until it is full and the edge has refused for a while, so that
    // every writer behind it has met ENOSPC too.
    let started = Instant::now();
    wait_for(300, "the tmpfs to fill up", || {
        (fs.available_bytes() < 64 * 1024).then_some(())
    });
    let full_at = Instant::now();
    let mut probe = 0;
    wait_for(60, "a refusal while the disk is full", || {
        probe += 1;
        let r = server.post_batch(&batch(99, probe));
        (r.status == 503 || r.status == 207).then_some(())
    });
    // Keep the pressure on the full disk for a moment (writers retrying on ENOSPC).
    std::thread::sleep(Duration::from_millis(1500));
    let acked_full = acked.lock().unwrap().len();
    eprintln!(
        "disk full after {:?}; {acked_full} events acked so far",
        full_at - started
    );
    let ready_full = server.get("/readyz").status;
    // Room again: the pipeline must catch up by itself.
    fs.resize("512m");
    let mut probe = 0;
    let accepted_again = wait_for(120, "the edge to accept again", || {
        probe += 1;
        let events = batch(98, probe);
        (server.post_batch(&events).status == 200).then_some(events)
    });
    std::thread::sleep(Duration::from_millis(500));
    posters.stop();
    let mut acked_ids: Vec<String> = acked.lock().unwrap().clone();
    acked_ids.extend(
        accepted_again
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned()),
    );
    assert!(
        acked_ids.len() > acked_full,
        "nothing was acked after the disk had room again"
    );
    eprintln!(
        "readyz while full: {ready_full}; {} events acked in all",
        acked_ids.len()
    );

    // Every acked booking is decided.
    let decided = common::bookings_decided(&server, &acked_ids, 180);
    // Every decision's derived event is published, once.
    let outbox = wait_for(120, "every decision to be published", || {
        let outbox = outbox_read(&server.data_dir);
        let n = outbox
            .iter()
            .filter(|e| e["type"] == "booking.confirmed")
            .count();
        (n >= acked_ids.len()).then_some(outbox)
    });
    assert_eq!(
        server.terminate(),
        Some(0),
        "a clean stop after the disk was full"
    );

    let mut confirmed: HashMap<&str, usize> = HashMap::new();
    let mut derived_ids = HashSet::new();
    for e in &outbox {
        assert!(
            derived_ids.insert(e["id"].as_str().unwrap()),
            "derived event published twice: {e}"
        );
        if e["type"] == "booking.confirmed" {
            *confirmed
                .entry(e["data"]["bookingId"].as_str().unwrap())
                .or_default() += 1;
        }
    }
    for id in &acked_ids {
        assert_eq!(
            decided[id]["status"], "confirmed",
            "{id}: capacity is ample, so every booking is confirmed"
        );
        assert_eq!(
            confirmed.get(id.as_str()),
            Some(&1),
            "booking.confirmed for {id}"
        );
    }
    // The stream holds each acked event once.
    let in_stream = common::stream_id_counts(&data);
    for id in &acked_ids {
        assert_eq!(in_stream.get(id), Some(&1), "{id} in the stream");
    }
    // A restart on the same directory opens cleanly and changes nothing.
    let mut again = Server::start(&data, &args);
    assert_eq!(again.get("/readyz").status, 200);
    assert_eq!(again.terminate(), Some(0));
    assert_eq!(outbox_read(&data).len(), outbox.len());

    // The lake: each acked event in exactly one row.
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let out = Command::new(python)
        .arg("-c")
        .arg(
            "import sys, duckdb, json; print(json.dumps([r[0] for r in duckdb.connect().execute(\
             f\"select event_id from read_parquet('{sys.argv[1]}/booking_requested/**/*.parquet', hive_partitioning = true, union_by_name = true)\").fetchall()]))",
        )
        .arg(data.join("lake"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    let mut in_lake: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *in_lake.entry(r.as_str()).or_default() += 1;
    }
    for id in &acked_ids {
        assert_eq!(in_lake.get(id.as_str()), Some(&1), "{id} in the lake");
    }
    drop(fs);
}
