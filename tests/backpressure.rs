//! Backpressure and per-event outcomes on the real binary and its real embedded log (not a
//! fake stream): a full append queue answers 503 with `Retry-After` and every event it
//! answered `accepted` is in the log exactly once after a SIGKILL; one request mixes
//! accepted, rejected and duplicate events under 207; an event whose first copy is still
//! being appended is answered `retry`, and a duplicate once that append is done; and a
//! partition key is held to one rule (1 to 256 bytes of UTF-8) at the edge, so that an
//! over-long one is a rejection with its pointer, never an event the log then refuses.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{Resp, Server, booking, envelope, metric, stream_read, wait_for};
use serde_json::{Value, json};

/// What the edge says of an event the log refused because its append queue is full
/// (`retry_after_ms` 1000 from the log).
const BUSY: &str = "the stream is busy; retry after 1000 ms";
/// What the edge says of an event whose first copy another request is appending.
const IN_FLIGHT: &str = "an event with this source and id is being appended; retry";

/// Starts `floodgate serve` on `data` with `toml` as its configuration.
fn start_with(dir: &std::path::Path, toml: &str) -> Server {
    let config = dir.join("floodgate.toml");
    std::fs::write(&config, toml).unwrap();
    Server::start(&dir.join("data"), &["--config", config.to_str().unwrap()])
}

fn show(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body[..r.body.len().min(2000)]).into_owned()
}

/// Checks a response to `events` that may be 200, 207 or 503 under backpressure: every
/// event is accepted (not as a duplicate) or `retry` with [`BUSY`]; the counts and the
/// status agree with the results; `Retry-After: 1` exactly when some event is `retry`.
/// Returns the accepted and the retried ids.
fn busy_or_accepted(r: &Resp, events: &[Value]) -> (Vec<String>, Vec<String>) {
    assert!(
        matches!(r.status, 200 | 207 | 503),
        "status {}: {}",
        r.status,
        show(r)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    let results = body["results"].as_array().expect("per-event results");
    assert_eq!(results.len(), events.len(), "{body}");
    let (mut accepted, mut retried) = (Vec::new(), Vec::new());
    for (i, (result, event)) in results.iter().zip(events).enumerate() {
        assert_eq!(result["index"], i, "{body}");
        assert_eq!(result["id"], event["id"], "{body}");
        let id = event["id"].as_str().unwrap().to_owned();
        match result["status"].as_str() {
            Some("accepted") => {
                assert!(result.get("duplicate").is_none(), "{result}");
                assert!(result.get("errors").is_none(), "{result}");
                accepted.push(id);
            }
            Some("retry") => {
                assert_eq!(
                    result["errors"],
                    json!([{"pointer": "", "message": BUSY}]),
                    "{result}"
                );
                retried.push(id);
            }
            _ => panic!("event {i} is neither accepted nor retry: {result}"),
        }
    }
    assert_eq!(body["accepted"], accepted.len(), "{body}");
    assert_eq!(body["retry"], retried.len(), "{body}");
    assert_eq!(body["rejected"], 0, "{body}");
    let expected = match (accepted.is_empty(), retried.is_empty()) {
        (false, true) => 200,
        (false, false) => 207,
        (true, false) => 503,
        (true, true) => unreachable!("a request with no event"),
    };
    assert_eq!(r.status, expected, "{body}");
    let retry_after = (!retried.is_empty()).then_some("1");
    assert_eq!(r.header("retry-after"), retry_after, "{body}");
    (accepted, retried)
}

/// How many times each event id is in the log.
fn copies_by_id(data: &std::path::Path) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in stream_read(data, &[]) {
        *seen
            .entry(r["event"]["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    seen
}

/// The real queue-full path: a tiny append queue held full by a long group commit, and
/// clients posting at once. Answers are 200, 207 or 503 with `Retry-After`, each event
/// `accepted` or `retry`; after a SIGKILL every accepted event is in the log exactly once
/// and no event answered `retry` is (so a retry stores it once); the log's refusal count
/// is the number of `retry` answers; and after a restart the retried events are taken
/// and the accepted ones are known as duplicates.
#[test]
fn a_full_append_queue_answers_503_and_every_accepted_event_is_durable_once() {
    const CLIENTS: usize = 6;
    const MAX_REQUESTS_PER_CLIENT: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 16 KiB may wait for an fsync, and each group waits 200 ms for company: about three
    // requests of 20 events fill the queue.
    let config = "[ingest]\nmax_body_bytes = 16384\n\
                  [stream.embedded]\nshards = 2\nmax_queued_bytes = 16384\ngroup_commit_max_delay_us = 200000\n";
    let mut server = start_with(dir.path(), config);

    let events: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let tally: Arc<Mutex<(Vec<String>, Vec<String>)>> = Arc::default();
    let statuses: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (events, tally, statuses, stop) = (
                events.clone(),
                tally.clone(),
                statuses.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                for n in 0..MAX_REQUESTS_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch: Vec<Value> = (0..20)
                        .map(|i| {
                            let id = format!("q{c}-{n}-{i}");
                            booking(&id, &format!("bk-{id}"), &format!("E{}", (c + i) % 7), 1)
                        })
                        .collect();
                    let body = serde_json::to_vec(&batch).unwrap();
                    let r = common::post(
                        addr,
                        "/v1/events",
                        Some("application/cloudevents-batch+json"),
                        &body,
                        &[],
                    );
                    let (accepted, retried) = busy_or_accepted(&r, &batch);
                    *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                    let mut all = events.lock().unwrap();
                    for e in batch {
                        all.insert(e["id"].as_str().unwrap().to_owned(), e);
                    }
                    let mut t = tally.lock().unwrap();
                    t.0.extend(accepted);
                    t.1.extend(retried);
                }
            })
        })
        .collect();
    // Until the queue has been full many times over and many events were taken (or the
    // clients are done: one failed, or all ran out of requests).
    wait_for(
        300,
        "200 accepted and 100 retried events, and a 503",
        || {
            let t = tally.lock().unwrap();
            let refused_whole = statuses.lock().unwrap().contains_key(&503);
            let enough = t.0.len() >= 200 && t.1.len() >= 100 && refused_whole;
            (enough || clients.iter().all(|c| c.is_finished())).then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client saw a wrong answer");
    }
    let (accepted, retried) = tally.lock().unwrap().clone();
    assert!(
        accepted.len() >= 200 && retried.len() >= 100,
        "{} accepted and {} retried events",
        accepted.len(),
        retried.len()
    );
    let refused = metric(
        &server,
        "floodgate_stream_append_refused_total",
        &["reason=\"queue_full\""],
    );
    assert_eq!(
        refused as usize,
        retried.len(),
        "the log refused {refused} events; the edge answered {} retry",
        retried.len()
    );
    eprintln!(
        "{} accepted, {} retried; statuses {:?}",
        accepted.len(),
        retried.len(),
        statuses.lock().unwrap()
    );
    assert!(
        statuses.lock().unwrap().get(&503).copied().unwrap_or(0) > 0,
        "no request was refused whole"
    );

    server.kill9();
    let seen = copies_by_id(&data);
    for id in &accepted {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "accepted {id} must be in the log exactly once"
        );
    }
    for id in &retried {
        assert_eq!(
            seen.get(id),
            None,
            "{id} was answered retry but is in the log"
        );
    }
    assert_eq!(
        seen.len(),
        accepted.len(),
        "the log holds only accepted events"
    );

    // After a restart, what was refused is taken, and what was taken is a duplicate.
    let server = start_with(dir.path(), config);
    let events = events.lock().unwrap();
    let pick = |ids: &[String]| -> Vec<Value> {
        ids.iter().take(20).map(|id| events[id].clone()).collect()
    };
    let again = pick(&retried);
    let r = server.post_batch(&again);
    let (taken, still) = busy_or_accepted(&r, &again);
    assert_eq!((taken.len(), still.len()), (again.len(), 0), "{}", show(&r));
    let known = pick(&accepted);
    let r = server.post_batch(&known);
    assert_eq!(r.status, 200, "{}", show(&r));
    let body = r.json();
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "accepted" && r["duplicate"] == true),
        "{body}"
    );
    drop(server);
    let seen = copies_by_id(&data);
    for e in again.iter().chain(&known) {
        let id = e["id"].as_str().unwrap();
        assert_eq!(seen.get(id), Some(&1), "{id}");
    }
}

/// The log's count of a record against `max_queued_bytes`: key, payload and 6 bytes of
/// framing (`sinks/src/embedded_log`). The test below fills the queue exactly by it, so
/// that `/readyz` (503 while the queue is full) says when its records wait in the log.
const LOG_RECORD_OVERHEAD: usize = 6;

/// What the log counts for `event`, posted alone as `application/cloudevents+json`: the
/// body is the record's payload, and the key is `data.eventId`.
fn queued_size(event: &Value) -> usize {
    serde_json::to_vec(event).unwrap().len()
        + event["data"]["eventId"].as_str().unwrap().len()
        + LOG_RECORD_OVERHEAD
}

/// One `booking.requested`, padded with an extension to a queued size of `bytes`.
fn booking_of_queued_size(id: &str, bytes: usize) -> Value {
    let mut e = booking(id, &format!("bk-{id}"), "E-pad", 1);
    e["pad"] = json!("");
    let bare = queued_size(&e);
    e["pad"] = json!("p".repeat(bytes - bare));
    assert_eq!(queued_size(&e), bytes);
    e
}

fn post_single(server: &Server, event: &Value) -> Resp {
    server.post(
        Some("application/cloudevents+json"),
        &serde_json::to_vec(event).unwrap(),
    )
}

/// While the first copy of an event is being appended (held by a 10 s group commit), a
/// second copy is answered `retry` (503, `Retry-After`), not appended and not called a
/// duplicate: whether the first becomes durable is not known yet. The first copy and a
/// filler posted beside it fill the append queue exactly, so `/readyz` says when both
/// wait in the log, and a new event meanwhile takes the real queue-full path. Once the
/// appends are done, the second copy is accepted as a duplicate, and the log holds one.
#[test]
fn a_copy_of_an_event_being_appended_is_answered_retry_then_duplicate() {
    const QUEUE: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The delay only has to outlast the few requests below; the test waits on it only to
    // let the held appends finish.
    let server = start_with(
        dir.path(),
        &format!(
            "[ingest]\nmax_body_bytes = {QUEUE}\n\
             [stream.embedded]\nshards = 1\nmax_queued_bytes = {QUEUE}\ngroup_commit_max_delay_us = 10000000\n"
        ),
    );
    let first = booking("held", "bk-held", "E-held", 1);
    let filler = booking_of_queued_size("filler", QUEUE - queued_size(&first));
    let appending: Vec<_> = [first.clone(), filler]
        .into_iter()
        .map(|event| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let body = serde_json::to_vec(&event).unwrap();
                common::post(
                    addr,
                    "/v1/events",
                    Some("application/cloudevents+json"),
                    &body,
                    &[],
                )
            })
        })
        .collect();
    wait_for(30, "both appends to wait in the log (/readyz 503)", || {
        let r = server.get("/readyz");
        match r.status {
            200 => None,
            503 => {
                assert_eq!(r.json()["error"]["code"], "not_ready");
                Some(())
            }
            other => panic!("/readyz {other}: {}", show(&r)),
        }
    });

    // A second copy while the first is appended: retry, with the reason.
    let r = post_single(&server, &first);
    assert_eq!(r.status, 503, "{}", show(&r));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.json(),
        json!({"accepted": 0, "rejected": 0, "retry": 1, "results": [
            {"index": 0, "id": "held", "status": "retry",
             "errors": [{"pointer": "", "message": IN_FLIGHT}]}]})
    );
    // Another event meets the full queue.
    let other = booking("other", "bk-other", "E-other", 1);
    let r = post_single(&server, &other);
    assert_eq!(r.status, 503, "{}", show(&r));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.json(),
        json!({"accepted": 0, "rejected": 0, "retry": 1, "results": [
            {"index": 0, "id": "other", "status": "retry",
             "errors": [{"pointer": "", "message": BUSY}]}]})
    );
    // Both in one request: each its own reason.
    let r = server.post_batch(&[other.clone(), first.clone()]);
    assert_eq!(r.status, 503, "{}", show(&r));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.json(),
        json!({"accepted": 0, "rejected": 0, "retry": 2, "results": [
            {"index": 0, "id": "other", "status": "retry",
             "errors": [{"pointer": "", "message": BUSY}]},
            {"index": 1, "id": "held", "status": "retry",
             "errors": [{"pointer": "", "message": IN_FLIGHT}]}]})
    );

    // The held appends complete: their requests are answered, then the copy is a
    // duplicate.
    for (t, id) in appending.into_iter().zip(["held", "filler"]) {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", show(&r));
        assert_eq!(
            r.json()["results"],
            json!([{"index": 0, "id": id, "status": "accepted"}])
        );
    }
    assert_eq!(server.get("/readyz").status, 200);
    let r = post_single(&server, &first);
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(
        r.json(),
        json!({"accepted": 1, "rejected": 0, "retry": 0, "results": [
            {"index": 0, "id": "held", "status": "accepted", "duplicate": true}]})
    );
    drop(server);
    let seen = copies_by_id(&data);
    assert_eq!(
        seen,
        HashMap::from([("held".to_owned(), 1), ("filler".to_owned(), 1)])
    );
}

/// One request mixing every per-event outcome but `retry`: a new event, an invalid one,
/// a repeat of an event accepted before, and a second copy of the new one. 207, each
/// result exact, no `Retry-After`; the log holds each accepted event once.
#[test]
fn one_request_with_mixed_outcomes_gets_207_and_each_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let earlier = booking("mx-earlier", "bk-earlier", "E1", 1);
    let r = server.post_batch(std::slice::from_ref(&earlier));
    assert_eq!(r.status, 200, "{}", show(&r));

    let new = booking("mx-new", "bk-new", "E1", 2);
    let invalid = booking("mx-invalid", "bk-invalid", "E1", 0);
    let r = server.post_batch(&[new.clone(), invalid, earlier.clone(), new.clone()]);
    assert_eq!(r.status, 207, "{}", show(&r));
    assert_eq!(r.header("retry-after"), None);
    let body = r.json();
    assert_eq!(
        (&body["accepted"], &body["rejected"], &body["retry"]),
        (&json!(3), &json!(1), &json!(0)),
        "{body}"
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(
        results[0],
        json!({"index": 0, "id": "mx-new", "status": "accepted"})
    );
    assert_eq!(results[1]["index"], 1);
    assert_eq!(results[1]["id"], "mx-invalid");
    assert_eq!(results[1]["status"], "rejected");
    let errors = results[1]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["pointer"], "/data/seats");
    assert!(
        errors[0]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(
        results[2],
        json!({"index": 2, "id": "mx-earlier", "status": "accepted", "duplicate": true})
    );
    assert_eq!(
        results[3],
        json!({"index": 3, "id": "mx-new", "status": "accepted", "duplicate": true})
    );
    assert_eq!(results.len(), 4);

    let seen = copies_by_id(dir.path());
    assert_eq!(
        seen,
        HashMap::from([("mx-earlier".to_owned(), 1), ("mx-new".to_owned(), 1)])
    );
}

/// A partition key is 1 to 256 bytes of UTF-8 wherever it comes from, as the log takes
/// it: a key of 128 two-byte characters (256 bytes) is accepted and stored as the record's
/// key; 129 of them, 256 of them (the Kinesis limit in characters, but 512 bytes), an `id`
/// that is the key, and a schema's key in `data` are each rejected with the pointer of
/// their source, and none reaches the log.
#[test]
fn partition_keys_are_held_to_the_logs_byte_limit_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    // Types of our own: one without a key in its schema (the key is `partitionkey`, else
    // the id), and one whose key is `data.holder`.
    let schemas = dir.path().join("schemas");
    for (ty, schema) in [
        (
            "note.posted",
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "properties": {"text": {"type": "string"}}}),
        ),
        (
            "seat.held",
            json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "x-floodgate-partition-key": "/holder",
                   "properties": {"holder": {"type": "string"}}, "required": ["holder"]}),
        ),
    ] {
        std::fs::create_dir_all(schemas.join(ty)).unwrap();
        std::fs::write(schemas.join(ty).join("v1.json"), schema.to_string()).unwrap();
    }
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--schemas", schemas.to_str().unwrap()]);
    let note = |id: &str, key: Option<&str>| {
        let mut e = envelope(id, "note.posted", json!({"text": "hi"}));
        if let Some(k) = key {
            e["partitionkey"] = json!(k);
        }
        e
    };
    let fits = "é".repeat(128);
    assert_eq!(fits.len(), 256);
    let events = [
        note("pk-fits", Some(&fits)),
        note("pk-129", Some(&"é".repeat(129))),
        note("pk-256-chars", Some(&"é".repeat(256))),
        note(&"é".repeat(129), None),
        envelope("pk-data", "seat.held", json!({"holder": "é".repeat(256)})),
    ];
    let r = server.post_batch(&events);
    assert_eq!(r.status, 207, "{}", show(&r));
    let body = r.json();
    assert_eq!(
        (&body["accepted"], &body["rejected"], &body["retry"]),
        (&json!(1), &json!(4), &json!(0)),
        "{body}"
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "accepted", "{body}");
    for (i, pointer, bytes) in [
        (1, "/partitionkey", 258),
        (2, "/partitionkey", 512),
        (3, "/id", 258),
        (4, "/data/holder", 512),
    ] {
        let result = &results[i];
        assert_eq!(result["status"], "rejected", "{result}");
        let errors = result["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{result}");
        assert_eq!(errors[0]["pointer"], pointer, "{result}");
        let message = errors[0]["message"].as_str().unwrap();
        assert!(
            message.contains("at most 256 bytes")
                && message.contains(&format!("not {bytes} bytes")),
            "{message}"
        );
    }
    let stored = stream_read(&data, &[]);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["event"]["id"], "pk-fits");
    assert_eq!(stored[0]["key"], fits.as_str());
}
