//! End to end on the real binary: a mixed batch gets exactly the right per-event outcomes,
//! and every accepted event can be read back in the shard of its key, in order per key.

mod common;

use std::collections::HashMap;

use common::{Server, booking, envelope, one_of_each, stream_read};
use floodgate_core::partition::shard_for_key;
use serde_json::{Value, json};

/// The ten ways an event is invalid in the mixed batch, with the pointer each must name.
fn invalid_event(kind: usize, n: usize) -> (Value, &'static str) {
    let id = format!("bad-{n}");
    let mut e = booking(&id, &format!("bk-bad-{n}"), "E0", 2);
    let pointer = match kind {
        0 => {
            e["data"]["seats"] = json!("two");
            "/data/seats"
        }
        1 => {
            e["data"]["seats"] = json!(21);
            "/data/seats"
        }
        2 => {
            e["data"].as_object_mut().unwrap().remove("customerId");
            "/data/customerId"
        }
        3 => {
            e["data"]["vip"] = json!(true);
            "/data/vip"
        }
        4 => {
            e["data"]["requestedAt"] = json!("2026-13-45T25:00:00Z");
            "/data/requestedAt"
        }
        5 => {
            e["data"]["eventId"] = json!("bad id!");
            "/data/eventId"
        }
        6 => {
            e["type"] = json!("booking.teleported");
            "/type"
        }
        7 => {
            e["specversion"] = json!("0.3");
            "/specversion"
        }
        8 => {
            e.as_object_mut().unwrap().remove("id");
            "/id"
        }
        _ => {
            e["source"] = json!(42);
            "/source"
        }
    };
    (e, pointer)
}

#[test]
fn mixed_batch_of_100_gets_exact_outcomes_and_lands_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut events = Vec::new();
    let mut expected: Vec<Option<&str>> = Vec::new();
    let mut valid = 0;
    for i in 0..100 {
        if i % 10 == 5 {
            let (e, pointer) = invalid_event(i / 10, i);
            events.push(e);
            expected.push(Some(pointer));
        } else {
            let key = format!("E{}", valid % 9);
            events.push(booking(
                &format!("ok-{i}"),
                &format!("bk-{i}"),
                &key,
                1 + (i as i64 % 4),
            ));
            expected.push(None);
            valid += 1;
        }
    }
    let resp = server.post_batch(&events);
    assert_eq!(resp.status, 207, "{}", String::from_utf8_lossy(&resp.body));
    let body = resp.json();
    assert_eq!(body["accepted"], 90);
    assert_eq!(body["rejected"], 10);
    assert_eq!(body["retry"], 0);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    for (i, (r, want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(r["index"], i);
        match want {
            None => {
                assert_eq!(r["status"], "accepted", "{r}");
                assert_eq!(r["id"], format!("ok-{i}"));
                assert!(r.get("errors").is_none(), "{r}");
            }
            Some(pointer) => {
                assert_eq!(r["status"], "rejected", "{r}");
                let pointers: Vec<&str> = r["errors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["pointer"].as_str().unwrap())
                    .collect();
                assert_eq!(pointers, [*pointer], "event {i}: {r}");
                assert!(
                    r["errors"][0]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty())
                );
            }
        }
    }

    // Read back: every accepted event once, in its key's shard, in order per key.
    let records = stream_read(dir.path(), &[]);
    assert_eq!(records.len(), 90);
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for r in &records {
        let key = r["event"]["data"]["eventId"].as_str().unwrap().to_owned();
        assert_eq!(r["shard"], shard_for_key(&key, 4), "{r}");
        assert_eq!(r["key"], key);
        per_key
            .entry(key)
            .or_default()
            .push(r["event"]["id"].as_str().unwrap().to_owned());
    }
    for (key, ids) in &per_key {
        let sent: Vec<String> = events
            .iter()
            .zip(&expected)
            .filter(|(e, want)| want.is_none() && e["data"]["eventId"] == key.as_str())
            .map(|(e, _)| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, &sent, "order of key {key}");
    }
    // The stored event is the one sent, attribute for attribute.
    let first = records.iter().find(|r| r["event"]["id"] == "ok-0").unwrap();
    assert_eq!(first["event"], events[0]);
}

#[test]
fn every_content_type_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let events = one_of_each("ct", "EV1");
    let one = serde_json::to_vec(&events[0]).unwrap();

    let r = server.post(Some("application/cloudevents+json; charset=utf-8"), &one);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][0]["status"], "accepted");

    let r = server.post(
        Some("application/json"),
        &serde_json::to_vec(&events[1]).unwrap(),
    );
    assert_eq!(r.status, 200);
    let r = server.post(
        Some("application/json"),
        &serde_json::to_vec(&events[2..4]).unwrap(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["accepted"], 2);

    // Pretty-printed batches are stored one event per line.
    let r = server.post(
        Some("application/cloudevents-batch+json"),
        serde_json::to_string_pretty(&events[4..5])
            .unwrap()
            .as_bytes(),
    );
    assert_eq!(r.status, 200);

    // NDJSON: a line that does not parse rejects that event alone.
    let mut nd = String::new();
    nd.push_str(&serde_json::to_string(&events[5]).unwrap());
    nd.push_str("\n{not json\n\n");
    nd.push_str(&serde_json::to_string(&events[6]).unwrap());
    nd.push('\n');
    let r = server.post(Some("application/x-ndjson"), nd.as_bytes());
    assert_eq!(r.status, 207);
    let body = r.json();
    assert_eq!(body["results"][1]["status"], "rejected");
    assert_eq!(body["results"][1]["errors"][0]["pointer"], "");
    assert!(
        body["results"][1]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("line 2")
    );
    assert_eq!(body["results"][2]["status"], "accepted");

    // All invalid → 422.
    let mut bad = events[0].clone();
    bad["data"]["capacity"] = json!(-1);
    let r = server.post_batch(&[bad.clone(), bad]);
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["results"][1]["errors"][0]["pointer"],
        "/data/capacity"
    );

    // A batch sent as a single event is a shape error.
    let r = server.post(Some("application/cloudevents+json"), b"[]");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_body_shape");

    // An empty batch is trivially all accepted.
    let r = server.post(Some("application/cloudevents-batch+json"), b"[]");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"accepted":0,"rejected":0,"retry":0,"results":[]})
    );

    let records = stream_read(dir.path(), &[]);
    assert_eq!(records.len(), 7);
    let mut ids: Vec<_> = records
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want: Vec<_> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    want.sort();
    assert_eq!(ids, want);
}

#[test]
fn dataschema_and_partitionkey() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut e = booking("ds-1", "bk-ds-1", "E-ds", 1);
    e["dataschema"] = json!("https://schemas.floodgate.dev/booking.requested/v1.json");
    e["partitionkey"] = json!("ignored-for-typed-keys");
    let mut unknown_version = booking("ds-2", "bk-ds-2", "E-ds", 1);
    unknown_version["dataschema"] =
        json!("https://schemas.floodgate.dev/booking.requested/v7.json");
    let r = server.post_batch(&[e, unknown_version]);
    assert_eq!(r.status, 207);
    let body = r.json();
    assert_eq!(body["results"][0]["status"], "accepted");
    assert_eq!(body["results"][1]["errors"][0]["pointer"], "/dataschema");
    let records = stream_read(dir.path(), &[]);
    assert_eq!(records[0]["key"], "E-ds");
}

#[test]
fn routes_health_metrics_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.get("/healthz").status, 200);
    let r = server.get("/readyz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");

    let r = server.post_batch(&one_of_each("m", "EVM"));
    assert_eq!(r.status, 200);
    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    for needle in [
        r#"floodgate_ingest_requests_total{route="/v1/events",status="200"}"#,
        r#"floodgate_ingest_events_total{type="booking.requested",outcome="accepted"}"#,
        "floodgate_ingest_batch_size_events_bucket",
        "floodgate_stream_append_duration_seconds_bucket",
        "floodgate_stream_fsync_duration_seconds_bucket",
        "floodgate_stream_group_commit_records_bucket",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    // One count per (type, outcome): a batch of one event of each type counts one each.
    for event in one_of_each("m", "EVM") {
        let line = format!(
            "floodgate_ingest_events_total{{type=\"{}\",outcome=\"accepted\"}} 1\n",
            event["type"].as_str().unwrap()
        );
        assert!(text.contains(&line), "/metrics lacks {line}:\n{text}");
    }

    let r = server.get("/v1/schemas");
    assert_eq!(r.status, 200);
    let list = r.json();
    let types: Vec<&str> = list["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 7, "{list}");
    assert!(
        list["schemas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["partitionKey"] == "/eventId")
    );
    for path in [
        "/v1/schemas/booking.requested/v1",
        "/v1/schemas/booking.requested/1",
    ] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/schema+json"));
        assert_eq!(r.json()["x-floodgate-partition-key"], "/eventId");
    }
    let r = server.get("/v1/schemas/booking.requested/v9");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "schema_not_found");
    let r = server.get("/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = server.get("/v1/events");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[test]
fn sigterm_drains_and_exits_zero_with_everything_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let r = server.post_batch(&one_of_each("t", "EVT"));
    assert_eq!(r.status, 200);
    assert_eq!(server.terminate(), Some(0));
    assert_eq!(stream_read(dir.path(), &[]).len(), 7);
    // And it starts again on the same directory.
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.post_batch(&one_of_each("t2", "EVT")).status, 200);
    assert_eq!(stream_read(dir.path(), &[]).len(), 14);
}

#[test]
fn stream_read_flags() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--shards", "2"]);
    let events: Vec<Value> = (0..30)
        .map(|i| {
            booking(
                &format!("s{i}"),
                &format!("b{i}"),
                &format!("K{}", i % 6),
                1,
            )
        })
        .collect();
    assert_eq!(server.post_batch(&events).status, 200);
    let all = stream_read(dir.path(), &[]);
    assert_eq!(all.len(), 30);
    let shard1 = stream_read(dir.path(), &["--shard", "1"]);
    assert!(shard1.iter().all(|r| r["shard"] == 1));
    assert_eq!(shard1.len(), all.iter().filter(|r| r["shard"] == 1).count());
    let from = stream_read(dir.path(), &["--shard", "1", "--from", "2"]);
    assert_eq!(from.len(), shard1.len() - 2);
    assert_eq!(from[0]["sequence"], "2");
    assert_eq!(stream_read(dir.path(), &["--limit", "5"]).len(), 5);
    // Sequences are strings that grow within a shard.
    let seqs: Vec<u64> = shard1
        .iter()
        .map(|r| r["sequence"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // A different shard count on restart is refused.
    drop(server);
    let out = common::floodgate()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 shards"));
}

#[test]
fn schemas_cli_and_bad_schema_dir() {
    let out = common::floodgate()
        .args(["schemas", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for t in [
        "booking.requested",
        "inventory.event.created",
        "checkin.scanned",
    ] {
        assert!(text.contains(t), "{text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    let mut bad = booking("c2", "b2", "E", 1);
    bad["data"]["seats"] = json!(0);
    std::fs::write(&file, format!("{}\n{}\n", booking("c1", "b1", "E", 1), bad)).unwrap();
    let out = common::floodgate()
        .args(["schemas", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["status"], "valid");
    assert_eq!(lines[0]["partitionKey"], "E");
    assert_eq!(lines[1]["status"], "invalid");
    assert_eq!(lines[1]["errors"][0]["pointer"], "/data/seats");
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec(&one_of_each("g", "E")).unwrap()).unwrap();
    let out = common::floodgate()
        .args(["schemas", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // An invalid schema stops start-up with a message naming the file.
    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(schemas.join("thing.happened")).unwrap();
    let broken = schemas.join("thing.happened/v1.json");
    std::fs::write(
        &broken,
        r#"{"type":"object","properties":{"a":{"type":"strnig"}}}"#,
    )
    .unwrap();
    let out = common::floodgate()
        .args(["serve", "--listen", "127.0.0.1:0", "--schemas"])
        .arg(&schemas)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&broken.display().to_string()), "{stderr}");

    // A valid override directory replaces the built-in schemas.
    std::fs::write(&broken, r#"{"type":"object","x-floodgate-partition-key":"/k","properties":{"k":{"type":"string"}},"required":["k"]}"#).unwrap();
    let data = dir.path().join("data2");
    let server = Server::start(&data, &["--schemas", schemas.to_str().unwrap()]);
    let r = server.post_batch(&[
        envelope("o1", "thing.happened", json!({"k":"x"})),
        booking("o2", "b", "E", 1),
    ]);
    assert_eq!(r.status, 207);
    assert_eq!(r.json()["results"][1]["errors"][0]["pointer"], "/type");
}

/// Each thread of `pid`: its name and nice value, from `/proc/<pid>/task/*/stat`.
#[cfg(target_os = "linux")]
fn threads_nice(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended
        };
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let name = stat[open + 1..close].to_owned();
        // After the name: state (field 3) … nice (field 19).
        let nice = stat[close + 1..].split_whitespace().nth(16).unwrap();
        out.push((name, nice.parse().unwrap()));
    }
    out
}

/// `serve` runs its processors on threads of their own (`fg-consumer`, blocking pool
/// included), `ingest.consumer_nice` nicer than the edge's (`fg-worker`), so that the edge's
/// requests go first when the cores are busy.
#[cfg(target_os = "linux")]
#[test]
fn the_processors_run_nicer_than_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    std::fs::write(&config, "[ingest]\nconsumer_nice = 7\n").unwrap();
    let data = dir.path().join("data");
    // One worker a runtime, whatever the machine: more `fg-consumer` threads than that are
    // the processors' blocking pool at work.
    let server = Server::start_with_env(
        &data,
        &["--config", config.to_str().unwrap()],
        None,
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    let events: Vec<Value> = (0..20)
        .map(|i| booking(&format!("n-{i}"), &format!("bk-n-{i}"), "E-nice", 1))
        .collect();
    assert_eq!(server.post_batch(&events).status, 200);
    let base = threads_nice(server.child.id())
        .into_iter()
        .find(|(name, _)| name == "fg-worker")
        .expect("the edge's workers")
        .1;
    assert!(
        base <= 12,
        "at nice {base}, 7 more is not told apart from the cap of 19"
    );
    // The processors' blocking work (their log reads) runs on their runtime's pool.
    let threads = common::wait_for(30, "the processors' blocking threads", || {
        let t = threads_nice(server.child.id());
        (t.iter().filter(|(n, _)| n == "fg-consumer").count() > 1).then_some(t)
    });
    for (name, nice) in &threads {
        match name.as_str() {
            "fg-worker" => assert_eq!(*nice, base, "{threads:?}"),
            "fg-consumer" => assert_eq!(*nice, (base + 7).min(19), "{threads:?}"),
            _ => {}
        }
    }
}
