//! `floodgate-loadgen`'s open loop is corrected for coordinated omission: against a server
//! that stalls for a second once, the open loop's p99 shows the stall (every request that
//! fell due during it waited), where the closed loop's does not (its one connection sat
//! in the stall and sent nothing, so the stall is one slow sample among thousands).
//!
//! The server is a few lines of std TCP, so that the stall is exactly what the test says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_floodgate-loadgen");

/// When the stall begins, after the first request, and how long it lasts.
const STALL_AFTER: Duration = Duration::from_secs(1);
const STALL_FOR: Duration = Duration::from_secs(1);

/// The server's clock: when it saw its first request, and the one stall's end once begun.
#[derive(Default)]
struct Clock {
    first: Option<Instant>,
    stall_until: Option<Instant>,
}

impl Clock {
    /// How long a request arriving now waits: the first request at least `STALL_AFTER`
    /// after the first of all starts the stall, and every request arriving before it ends
    /// waits for its end, as behind a process-wide pause.
    fn wait(&mut self, now: Instant) -> Duration {
        let first = *self.first.get_or_insert(now);
        if self.stall_until.is_none() && now.duration_since(first) >= STALL_AFTER {
            self.stall_until = Some(now + STALL_FOR);
        }
        self.stall_until
            .map_or(Duration::ZERO, |end| end.saturating_duration_since(now))
    }
}

/// An HTTP/1.1 server on a loopback port that answers every POST `200 {"accepted":1}`, a
/// thread per connection, with one stall of `STALL_FOR`.
fn stalling_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let clock = Arc::new(Mutex::new(Clock::default()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let clock = clock.clone();
            std::thread::spawn(move || serve(stream, &clock));
        }
    });
    addr
}

fn serve(stream: TcpStream, clock: &Mutex<Clock>) {
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let wait = clock.lock().unwrap().wait(Instant::now());
        std::thread::sleep(wait);
        // One write: a head and a body written apart would meet the client's delayed ACK
        // (Nagle), 40 ms a request.
        let answer = r#"{"accepted":1}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn loadgen(args: &[&str]) -> String {
    let out = Command::new(LOADGEN)
        .args(args)
        .env_remove("FLOODGATE_API_KEY")
        .output()
        .expect("floodgate-loadgen runs");
    assert!(
        out.status.success(),
        "floodgate-loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The open loop at 100 requests/s for 3 s with at most `max_inflight` in flight; returns
/// its step's report.
fn open_loop(max_inflight: &str) -> Value {
    let url = format!("http://{}/v1/events", stalling_server());
    let out = tempfile::tempdir().unwrap();
    let table = loadgen(&[
        "--url",
        &url,
        "--rate-events",
        "100",
        "--batch",
        "1",
        "--step-seconds",
        "3",
        "--warmup",
        "0",
        "--max-inflight",
        max_inflight,
        "--out",
        out.path().to_str().unwrap(),
    ]);
    eprintln!("open loop, --max-inflight {max_inflight}:\n{table}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    report["steps"][0].clone()
}

#[test]
fn the_open_loop_charges_a_stall_to_every_request_it_held_up() {
    // The closed loop, one connection: the stall is in its max, not in its p99.
    let url = format!("http://{}/v1/events", stalling_server());
    let closed = loadgen(&[
        "--url",
        &url,
        "--concurrency",
        "1",
        "--batch",
        "1",
        "--duration",
        "3",
        "--warmup",
        "0",
    ]);
    eprintln!("closed loop: {closed}");
    let closed: Value = serde_json::from_str(closed.lines().last().unwrap()).unwrap();
    assert!(
        closed["max_ms"].as_f64().unwrap() >= 900.0,
        "the closed loop ran through the stall: {closed}"
    );
    assert!(
        closed["p99_ms"].as_f64().unwrap() < 500.0,
        "the closed loop hides the stall in its percentiles: {closed}"
    );

    // The open loop held to one request in flight, as the closed loop was: the ~100
    // requests due during the stall could only be sent after it, late, and each is charged
    // from when it was due. (Timed from their actual sends, they would look fast, and the
    // p99 would be as small as the closed loop's.)
    let held = open_loop("1");
    assert!(
        held["latency_ms"]["p99"].as_f64().unwrap() >= 500.0,
        "the open loop's p99 shows the stall: {held}"
    );
    assert!(
        held["late_sends"].as_u64().unwrap() >= 50,
        "the requests held up are reported as sent late: {held}"
    );
    assert!(
        held["inflight_limit_waits"].as_u64().unwrap() >= 50,
        "{held}"
    );
    assert_eq!(held["errors_total"], 0, "{held}");

    // With permits to spare, the same requests are sent on time and wait in the server:
    // the p99 shows the stall just the same.
    let free = open_loop("256");
    assert!(
        free["latency_ms"]["p99"].as_f64().unwrap() >= 500.0,
        "the open loop's p99 shows the stall: {free}"
    );
    assert_eq!(free["errors_total"], 0, "{free}");
    assert_eq!(free["requests_due"], 300, "{free}");
}
