//! Upgrading a data directory an older floodgate wrote: its derived events
//! (`outbox/outbox.ndjson`) move into the segmented derived-event log at the first start,
//! and `floodgate outbox read` lists them, once, before what the new server publishes.

mod common;

use std::collections::HashMap;

use common::{Server, booking, envelope, outbox_read, wait_for};
use serde_json::{Value, json};

#[test]
fn an_ndjson_outbox_is_migrated_at_start_and_read_before_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let outbox = data.join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    // Entry 0 of an older outbox: its state store numbers entries from 1, so the
    // decisions to come are not taken for published ones.
    let old: Vec<Value> = (0..2)
        .map(|i| {
            envelope(
                &format!("old-{i}"),
                "booking.confirmed",
                json!({"bookingId": format!("old-b{i}"), "eventId": "E-old", "seats": 1}),
            )
        })
        .collect();
    let line = json!({"seq": 0, "events": old}).to_string();
    // …and a torn tail, a publish its relay never finished.
    std::fs::write(
        outbox.join("outbox.ndjson"),
        format!("{line}\n{{\"seq\":1,\"events\":[{{\"id\""),
    )
    .unwrap();
    assert_eq!(
        outbox_read(&data),
        old,
        "an unmigrated outbox reads as it is"
    );

    let mut server = Server::start(&data, &[]);
    let requests: Vec<Value> = (0..5)
        .map(|i| booking(&format!("r-{i}"), &format!("b-{i}"), "E-new", 1))
        .collect();
    assert_eq!(server.post_batch(&requests).status, 200);
    let events = wait_for(60, "a decision for every request", || {
        let events = outbox_read(&data);
        let decided = events
            .iter()
            .filter(|e| {
                e["data"]["bookingId"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("b-"))
            })
            .count();
        (decided >= requests.len()).then_some(events)
    });
    assert_eq!(events[..2], old[..], "the migrated events come first");
    let mut decisions: HashMap<&str, usize> = HashMap::new();
    for e in &events[2..] {
        *decisions
            .entry(e["data"]["bookingId"].as_str().unwrap())
            .or_default() += 1;
    }
    assert_eq!(decisions.len(), requests.len(), "{events:?}");
    assert!(decisions.values().all(|n| *n == 1), "{decisions:?}");
    assert!(!outbox.join("outbox.ndjson").exists());
    assert!(outbox.join("log/meta.json").exists());
    assert_eq!(server.terminate(), Some(0));
    assert_eq!(outbox_read(&data), events, "a restart changes nothing");
}
