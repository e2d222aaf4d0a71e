//! Dedupe of producer retries on the real binary: an event whose (source, id) was
//! accepted within the window is answered accepted with "duplicate": true and appended
//! once, also after a SIGKILL and restart; outside the window it is appended again.

mod common;

use common::{Server, booking, stream_read};
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

#[test]
fn outside_the_window_an_event_is_appended_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    std::fs::write(&config, "[ingest]\ndedupe_window_ms = 300\n").unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let e = booking("w1", "bw", "E", 1);
    assert_eq!(server.post_batch(std::slice::from_ref(&e)).status, 200);
    assert_eq!(
        server.post_batch(std::slice::from_ref(&e)).json()["results"][0]["duplicate"],
        true
    );
    // Let the window pass (time itself is what is under test here).
    std::thread::sleep(std::time::Duration::from_millis(400));
    let r = server.post_batch(&[e]);
    assert!(r.json()["results"][0].get("duplicate").is_none());
    assert_eq!(copies(&dir.path().join("data"), "w1"), 2);
}
