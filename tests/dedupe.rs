//! Dedupe of producer retries on the real binary: an event whose (source, id) was
//! accepted within the window is answered accepted with "duplicate": true and appended
//! once, also after a SIGKILL and restart; once forgotten (past `dedupe_max_ids`) it is
//! appended again; a request abandoned mid-append leaves no id waiting on it. The window's
//! expiry in time is tested with an injected clock in `ingest/src/dedupe.rs`.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{Server, booking, metric, stream_read, wait_for};
use serde_json::Value;

fn copies(dir: &std::path::Path, id: &str) -> usize {
    stream_read(dir, &[])
        .iter()
        .filter(|r| r["event"]["id"] == id)
        .count()
}

#[test]
fn retries_are_answered_as_duplicates_and_appended_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let events: Vec<Value> = (0..10)
        .map(|i| booking(&format!("d{i}"), &format!("b{i}"), "E", 1))
        .collect();
    let r = server.post_batch(&events);
    assert_eq!(r.status, 200);
    assert!(r.json()["results"][0].get("duplicate").is_none());

    // The producer retries the whole batch: all accepted, all duplicates.
    let r = server.post_batch(&events);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["accepted"], 10);
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["duplicate"] == true && e["status"] == "accepted")
    );

    // Two copies in one request: one append, the second answered as a duplicate.
    let twin = booking("twin", "bt", "E", 1);
    let r = server.post_batch(&[twin.clone(), twin.clone()]);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert!(body["results"][0].get("duplicate").is_none());
    assert_eq!(body["results"][1]["duplicate"], true);

    // The same id from another source is another event.
    let mut other = events[0].clone();
    other["source"] = "/elsewhere".into();
    let r = server.post_batch(&[other]);
    assert!(r.json()["results"][0].get("duplicate").is_none());

    // A SIGKILL and restart: the window is rebuilt from the log.
    server.kill9();
    let server = Server::start(dir.path(), &[]);
    let r = server.post_batch(&events[..3]);
    assert_eq!(r.status, 200);
    assert!(
        r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["duplicate"] == true)
    );
    let r = server.post_batch(&[twin]);
    assert_eq!(r.json()["results"][0]["duplicate"], true);

    for e in &events {
        assert_eq!(
            copies(dir.path(), e["id"].as_str().unwrap()),
            if e["id"] == "d0" { 2 } else { 1 }
        );
    }
    assert_eq!(copies(dir.path(), "twin"), 1);
}

/// Past `dedupe_max_ids` the oldest ids are forgotten first, and their next copy is
/// appended again. The window is the default 10 minutes, so what expires here is decided
/// by the count alone, not by the clock (the window's edge is tested with an injected
/// clock beside `Deduper`).
#[test]
fn past_dedupe_max_ids_the_oldest_ids_are_appended_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    std::fs::write(&config, "[ingest]\ndedupe_max_ids = 3\n").unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let e: Vec<Value> = (0..4)
        .map(|i| booking(&format!("m{i}"), &format!("bm{i}"), "E", 1))
        .collect();
    let duplicate = |event: &Value| {
        let r = server.post_batch(std::slice::from_ref(event));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["results"][0]["duplicate"] == true
    };
    assert!(!duplicate(&e[0]));
    assert!(duplicate(&e[0]), "m0 is remembered");
    // Three more ids: four accepted, one over the cap, so m0 (the oldest) goes.
    for event in &e[1..] {
        assert!(!duplicate(event));
    }
    assert!(duplicate(&e[3]), "m3, the newest, is remembered");
    assert!(!duplicate(&e[0]), "m0 was forgotten and is appended again");
    // m0's new acceptance is the newest now; m1 became the oldest and went.
    assert!(duplicate(&e[0]));
    assert!(!duplicate(&e[1]), "m1 was forgotten in turn");
    assert_eq!(copies(&data, "m0"), 2);
    assert_eq!(copies(&data, "m1"), 2);
    assert_eq!(copies(&data, "m3"), 1);
}

/// `dedupe_window_ms = 0` turns dedupe off: every copy is appended and none is answered
/// as a duplicate.
#[test]
fn a_window_of_zero_turns_dedupe_off() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    std::fs::write(&config, "[ingest]\ndedupe_window_ms = 0\n").unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let e = booking("off", "boff", "E", 1);
    for _ in 0..2 {
        let r = server.post_batch(&[e.clone(), e.clone()]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json();
        assert!(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["status"] == "accepted" && r.get("duplicate").is_none()),
            "{body}"
        );
    }
    assert_eq!(copies(&data, "off"), 4);
}

/// A producer whose request is abandoned after its events were claimed in the dedupe
/// window, but before their append returned (it hung up, or `request_timeout` cut the
/// request), retries: the retry is answered, accepted as duplicates of what the first
/// append stored, and nothing is stored twice. Not 503 `retry` forever.
#[test]
fn a_retry_after_an_abandoned_request_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    // Appends wait 1 s for company before their fsync and requests give up after
    // 500 ms: every append outlives both a client that hangs up early and its request.
    std::fs::write(
        &config,
        "[ingest]\nrequest_timeout_ms = 500\n[stream.embedded]\ngroup_commit_max_delay_us = 1000000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let batch = |prefix: &str| -> Vec<Value> {
        (0..500)
            .map(|i| booking(&format!("{prefix}{i}"), &format!("b{prefix}{i}"), "E", 1))
            .collect()
    };

    // 1. The client hangs up once its events are claimed. The claim is taken in the same
    // step that counts the batch in /metrics, so once the count moves the claims exist
    // and the append (held 1 s by the group commit) has not returned.
    let hung_up = batch("hup-");
    let counted = || metric(&server, "floodgate_ingest_batch_size_events_count", &[]);
    let before = counted();
    let body = serde_json::to_vec(&hung_up).unwrap();
    let mut s = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents-batch+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    wait_for(30, "the batch to be claimed", || {
        (counted() > before).then_some(())
    });
    let _ = s.shutdown(std::net::Shutdown::Both);
    drop(s);
    retried_until_answered(&server, &hung_up);

    // 2. The request is cut by request_timeout while its append waits.
    let timed_out = batch("late-");
    let r = server.post_batch(&timed_out);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    retried_until_answered(&server, &timed_out);

    let stored = stream_read(&data, &[]);
    for e in hung_up.iter().chain(&timed_out) {
        let id = e["id"].as_str().unwrap();
        let n = stored.iter().filter(|r| r["event"]["id"] == id).count();
        assert_eq!(n, 1, "{id} stored {n} times");
    }
}

/// Retries `events` until they are answered 200 (503 meanwhile is fine: the first append
/// may still be running), then checks that every one is a duplicate of the stored copy.
fn retried_until_answered(server: &Server, events: &[Value]) {
    let r = wait_for(30, "the retry to be answered 200, not 503", || {
        let r = server.post_batch(events);
        match r.status {
            200 => Some(r),
            503 => None,
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    });
    let body = r.json();
    assert_eq!(body["accepted"], events.len(), "{body}");
    let results = body["results"].as_array().unwrap();
    assert!(
        results.iter().all(|e| e["duplicate"] == true),
        "the first append stored them all: {body}"
    );
}
