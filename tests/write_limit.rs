//! Writes that fail, through the real binary: `floodgate serve` runs under a file-size
//! limit (RLIMIT_FSIZE, `ulimit -f`) while clients post concurrently. SIGXFSZ is ignored
//! (`trap '' XFSZ` before `exec`, inherited across it), so a write past the limit fails
//! with EFBIG, after a short write up to the limit, instead of killing the process: the
//! same path as a full disk, without root or a mount. The log's segments are larger than
//! the limit, so the active segment can never roll to a new file and every write that
//! would take it past the limit fails, until the test lifts the limit.
//!
//! - No event whose write failed is answered `accepted` (200, or `accepted` in a 207): each
//!   event answered `retry` is absent from the log afterwards, since the failed write was
//!   undone, and each answered `accepted` is in it exactly once (checked through `floodgate
//!   stream read`, as the server left the log and again after a restart without the limit).
//! - `/readyz` answers 503 while the stream's last write failed, and 200 again once the
//!   limit is lifted (`prlimit` on the running server) and a write succeeds; that write
//!   must land right after the last whole frame, or the log would be damaged.
//!
//! No root needed.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Resp, Server, booking, metric, stream_read, try_request, wait_for};
use serde_json::Value;

/// The file-size limit. The log's first segment fills it after about a thousand events.
const LIMIT_BYTES: u64 = 256 * 1024;
const CLIENTS: usize = 4;
const BATCH: usize = 20;

/// Bytes per block of `ulimit -f` in `sh`: 512 in POSIX sh and dash, 1024 in bash.
fn ulimit_block_bytes() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -S -f 8 && exec cat /proc/self/limits"])
        .output()
        .expect("sh runs");
    let limits = String::from_utf8_lossy(&out.stdout);
    let bytes: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no file-size limit in /proc/self/limits:\n{limits}"));
    bytes / 8
}

/// What the edge answered for each event id: `accepted`, `retry` or `rejected`.
type Answers = Arc<Mutex<HashMap<String, String>>>;

/// Records the per-event answers of a response to `events`. Panics on a status the edge
/// must not give here, and on a 200 that does not accept every event.
fn record(answers: &Answers, events: &[Value], resp: &Resp) {
    match resp.status {
        200 | 207 | 503 => {}
        other => panic!(
            "unexpected status {other}: {}",
            String::from_utf8_lossy(&resp.body)
        ),
    }
    let body = resp.json();
    // A 503 without per-event results (e.g. an overloaded edge) appended nothing.
    let Some(results) = body["results"].as_array() else {
        assert_eq!(
            resp.status, 503,
            "a {} without results: {body}",
            resp.status
        );
        return;
    };
    assert_eq!(results.len(), events.len(), "{body}");
    let mut answers = answers.lock().unwrap();
    for (event, result) in events.iter().zip(results) {
        assert_eq!(result["id"], event["id"], "{body}");
        let status = result["status"].as_str().unwrap().to_owned();
        if resp.status == 200 {
            assert_eq!(status, "accepted", "a 200 that did not accept: {body}");
        }
        answers.insert(event["id"].as_str().unwrap().to_owned(), status);
    }
}

fn batch(tag: &str, c: usize, n: usize) -> Vec<Value> {
    (0..BATCH)
        .map(|k| {
            let id = format!("{tag}-{c}-{n}-{k}");
            booking(&id, &format!("bk-{id}"), &format!("E{}", (c + k) % 5), 1)
        })
        .collect()
}

fn post(server: &Server, events: &[Value]) -> Resp {
    let body = serde_json::to_vec(events).unwrap();
    try_request(
        server.addr,
        "POST",
        "/v1/events",
        &[("content-type", "application/cloudevents-batch+json")],
        Some(&body),
    )
    .unwrap_or_else(|e| panic!("the server stopped answering under the write limit: {e}"))
}

#[test]
fn failed_writes_are_never_acknowledged_and_make_the_edge_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    // One shard, so that the limit stops every append; no compression, so that the
    // segment grows by about the bytes posted.
    std::fs::write(
        &config,
        format!(
            "[stream.embedded]\nshards = 1\nsegment_bytes = {}\ncompression = \"none\"\n",
            4 * LIMIT_BYTES
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let blocks = (LIMIT_BYTES / ulimit_block_bytes()).to_string();
    let wrapper = [
        "sh",
        "-c",
        "trap '' XFSZ; ulimit -S -f \"$1\" || exit 97; shift; exec \"$@\"",
        "sh",
        &blocks,
    ];
    let mut server = Server::start_wrapped(&data, &args, &wrapper);

    let answers: Answers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (answers, stop) = (answers.clone(), stop.clone());
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let events = batch("load", c, n);
                    n += 1;
                    let body = serde_json::to_vec(&events).unwrap();
                    // A server that went away fails the test on the main thread.
                    let Ok(resp) = try_request(
                        addr,
                        "POST",
                        "/v1/events",
                        &[("content-type", "application/cloudevents-batch+json")],
                        Some(&body),
                    ) else {
                        break;
                    };
                    record(&answers, &events, &resp);
                }
            })
        })
        .collect();
    wait_for(120, "the log's writes to fail at the limit", || {
        (metric(&server, "floodgate_stream_write_errors_total", &[]) > 0.0).then_some(())
    });
    // Under load a group that still fits below the limit may succeed and make the edge
    // ready again for a moment; the gap closes, and then every write fails.
    let deadline = Instant::now() + Duration::from_secs(60);
    let not_ready_under_load = loop {
        if server.get("/readyz").status == 503 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Relaxed);
    for p in posters {
        p.join().expect("a poster failed");
    }

    // With the load stopped nothing else writes to the stream, so right after a request
    // whose write failed the edge must say it is not ready.
    let mut ready_after_failure = None;
    for probe in 0..200 {
        let events = batch("probe", 0, probe);
        let resp = post(&server, &events);
        record(&answers, &events, &resp);
        if resp.status == 503 && String::from_utf8_lossy(&resp.body).contains("write failed") {
            ready_after_failure = Some(server.get("/readyz"));
            break;
        }
    }

    // Room again: lift the (soft) limit of the running server, which needs no privilege
    // since the hard limit was left alone. The next write lands right after
    // the last whole frame (a failed write left nothing behind) and makes it ready again.
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &server.child.id().to_string(),
            "--fsize=unlimited:",
        ])
        .status()
        .expect("prlimit(1) runs");
    assert!(status.success(), "prlimit failed");
    let mut room = 0;
    wait_for(60, "a write to succeed once the limit is lifted", || {
        room += 1;
        let events = batch("room", 0, room);
        let resp = post(&server, &events);
        record(&answers, &events, &resp);
        (resp.status == 200).then_some(())
    });
    let ready_after_success = server.get("/readyz").status;
    server.kill9();
    // Read as that server left it (no recovery has run)...
    check_log(
        &data,
        &answers.lock().unwrap(),
        "after the limit was lifted",
    );

    // ...and after a restart without the limit, when the edge accepts again.
    let mut server = Server::start(&data, &args);
    let events = batch("after", 0, 0);
    let resp = post(&server, &events);
    assert_eq!(
        resp.status,
        200,
        "after a restart without the limit: {}",
        String::from_utf8_lossy(&resp.body)
    );
    record(&answers, &events, &resp);
    server.kill9();
    check_log(&data, &answers.lock().unwrap(), "after a restart");

    // Readiness last, so that a broken acknowledgement is reported as such first.
    assert!(
        not_ready_under_load,
        "/readyz never answered 503 while the log's writes failed"
    );
    let ready = ready_after_failure.expect("no write failed once the load stopped");
    let body = String::from_utf8_lossy(&ready.body);
    assert_eq!(
        ready.status, 503,
        "/readyz right after a failed write: {body}"
    );
    assert!(body.contains("last write failed"), "{body}");
    assert_eq!(
        ready_after_success, 200,
        "/readyz once a write succeeded again"
    );
}

/// Every event answered `accepted` is in the log at `data` exactly once, and none answered
/// `retry` (its write failed and was undone) is in it at all.
fn check_log(data: &Path, answers: &HashMap<String, String>, when: &str) {
    let mut in_log: HashMap<String, usize> = HashMap::new();
    for r in stream_read(data, &[]) {
        *in_log
            .entry(r["event"]["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let count = |s: &str| answers.values().filter(|a| *a == s).count();
    let (accepted, retry) = (count("accepted"), count("retry"));
    eprintln!(
        "{when}: {accepted} events answered accepted, {retry} retry; {} records in the log",
        in_log.values().sum::<usize>()
    );
    assert!(
        accepted > 500,
        "too few events accepted to prove anything: {accepted}"
    );
    assert!(retry > 0, "no write ever failed: the test proves nothing");
    for (id, answer) in answers {
        let n = in_log.get(id).copied().unwrap_or(0);
        match answer.as_str() {
            "accepted" => assert_eq!(
                n, 1,
                "{when}: {id} was answered accepted and is in the log {n} times"
            ),
            "retry" => assert_eq!(
                n, 0,
                "{when}: {id} was answered retry (its write failed), yet is in the log"
            ),
            other => panic!("{id}: unexpected answer {other}"),
        }
    }
}
