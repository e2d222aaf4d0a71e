//! Helpers for tests that drive the real `floodgate` binary over HTTP: start and kill the
//! server, a minimal HTTP/1.1 client on std sockets (so a test controls every byte it
//! sends), `floodgate stream read`, and event builders.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_floodgate");

/// `floodgate` as a child process, without the `FLOODGATE_*` variables of the environment
/// the tests run in: an exported `FLOODGATE_SHARDS` or `FLOODGATE_CONFIG` would otherwise
/// override what each test sets up (the environment beats the configuration file).
pub fn floodgate() -> Command {
    let mut command = Command::new(BIN);
    without_floodgate_env(&mut command);
    command
}

/// Removes every `FLOODGATE_*` variable of this process from `command`'s environment.
pub fn without_floodgate_env(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FLOODGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// A running `floodgate serve` child process.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts `floodgate serve` on an ephemeral loopback port with `extra` arguments and
    /// waits until it listens.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_logged(data_dir, extra, None)
    }

    /// As [`Server::start`]; with `log`, everything down to debug level goes to that file.
    pub fn start_logged(data_dir: &Path, extra: &[&str], log: Option<&Path>) -> Server {
        Self::start_with_env(data_dir, extra, log, &[])
    }

    /// As [`Server::start_logged`], with `env` added to the server's environment (e.g. the
    /// AWS emulators' dummy credentials).
    pub fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Server {
        Self::start_as("serve", data_dir, extra, log, env)
    }

    /// As [`Server::start_with_env`], running `command` (`serve` or `ingest`).
    pub fn start_as(
        command: &str,
        data_dir: &Path,
        extra: &[&str],
        log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Server {
        let (level, stderr) = match log {
            Some(path) => ("debug", Stdio::from(std::fs::File::create(path).unwrap())),
            None => ("warn", Stdio::null()),
        };
        let child = floodgate()
            .args([command, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().copied())
            .env("FLOODGATE_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("floodgate starts");
        Self::wait_listening(child, data_dir)
    }

    /// As [`Server::start`], with the binary run through `wrapper`: a program and its
    /// arguments, to which the binary's path and arguments are appended. E.g. `["sh", "-c",
    /// "ulimit -f 512; exec \"$@\"", "sh"]` runs it under a resource limit. The test's own
    /// `FLOODGATE_*` variables are not passed on.
    pub fn start_wrapped(data_dir: &Path, extra: &[&str], wrapper: &[&str]) -> Server {
        let (program, wrapper_args) = wrapper.split_first().expect("a wrapper program");
        let mut command = Command::new(program);
        command
            .args(wrapper_args)
            .arg(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra);
        let child = without_floodgate_env(&mut command)
            .env("FLOODGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the wrapper starts");
        Self::wait_listening(child, data_dir)
    }

    /// Waits for a starting `floodgate serve` to print the address it listens on.
    fn wait_listening(mut child: Child, data_dir: &Path) -> Server {
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .expect("floodgate prints its address")
            .expect("stdout is readable");
        let addr = line
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            data_dir: data_dir.to_owned(),
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn post(&self, content_type: Option<&str>, body: &[u8]) -> Resp {
        post(self.addr, "/v1/events", content_type, body, &[])
    }

    pub fn post_batch(&self, events: &[Value]) -> Resp {
        let body = serde_json::to_vec(events).unwrap();
        self.post(Some("application/cloudevents-batch+json"), &body)
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn post(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(ct) = content_type {
        all.push(("content-type", ct));
    }
    request(addr, "POST", path, &all, Some(body))
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("content-length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // The server may answer (413) and close before reading a large body.
        let _ = s.write_all(b);
    }
    read_response(&mut s)
}

pub fn read_response(s: &mut impl Read) -> std::io::Result<Resp> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .or_else(|e| if raw.is_empty() { Err(e) } else { Ok(0) })?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no header end in {:?}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// Every record in the log, via `floodgate stream read`.
pub fn stream_read(data_dir: &Path, extra: &[&str]) -> Vec<Value> {
    let out = floodgate()
        .args(["stream", "read", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("stream read runs");
    assert!(
        out.status.success(),
        "stream read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("stream read prints NDJSON"))
        .collect()
}

pub fn envelope(id: &str, ty: &str, data: Value) -> Value {
    json!({"specversion":"1.0","id":id,"source":"/tests","type":ty,"time":"2026-11-22T10:00:00Z","data":data})
}

pub fn booking(id: &str, booking_id: &str, event_id: &str, seats: i64) -> Value {
    envelope(
        id,
        "booking.requested",
        json!({"bookingId":booking_id,"eventId":event_id,"customerId":"cust-1","seats":seats,"requestedAt":"2026-11-22T10:00:00Z"}),
    )
}

/// One valid event of every shipped type, keyed by `event_id`.
pub fn one_of_each(prefix: &str, event_id: &str) -> Vec<Value> {
    vec![
        envelope(
            &format!("{prefix}-c"),
            "inventory.event.created",
            json!({"eventId":event_id,"name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":100}),
        ),
        envelope(
            &format!("{prefix}-cc"),
            "inventory.capacity.changed",
            json!({"eventId":event_id,"capacity":120}),
        ),
        booking(&format!("{prefix}-b"), &format!("{prefix}-bk"), event_id, 2),
        envelope(
            &format!("{prefix}-x"),
            "booking.cancelled",
            json!({"bookingId":"bk","eventId":event_id}),
        ),
        envelope(
            &format!("{prefix}-ps"),
            "payment.succeeded",
            json!({"paymentId":"p1","bookingId":"bk","eventId":event_id,"amountMinor":1500,"currency":"EUR"}),
        ),
        envelope(
            &format!("{prefix}-pf"),
            "payment.failed",
            json!({"paymentId":"p2","bookingId":"bk","eventId":event_id,"code":"card_declined"}),
        ),
        envelope(
            &format!("{prefix}-ck"),
            "checkin.scanned",
            json!({"bookingId":"bk","eventId":event_id,"gate":"A","scannedAt":"2026-12-01T19:30:00Z"}),
        ),
    ]
}

/// Every derived event in the outbox, via `floodgate outbox read`.
pub fn outbox_read(data_dir: &Path) -> Vec<Value> {
    let out = floodgate()
        .args(["outbox", "read", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("outbox read runs");
    assert!(
        out.status.success(),
        "outbox read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("outbox read prints NDJSON");
            v["event"].clone()
        })
        .collect()
}

/// The sum of a metric's samples whose line contains every one of `labels`.
pub fn metric(server: &Server, name: &str, labels: &[&str]) -> f64 {
    let text = String::from_utf8(server.get("/metrics").body).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it returns `Some`, or panics after `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Clients that POST batches back to back until stopped or until the server goes away,
/// recording the ids of every event answered 200.
pub struct Posters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Posters {
    /// `clients` threads; client `c`'s `n`-th request carries `batch(c, n)`. Acked ids are
    /// appended to `acked`. A status other than 200, 207 or 503 fails the test.
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        batch: impl Fn(usize, usize) -> Vec<Value> + Send + Sync + 'static,
    ) -> Posters {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let batch = std::sync::Arc::new(batch);
        let threads = (0..clients)
            .map(|c| {
                let (stop, acked, batch) = (stop.clone(), acked.clone(), batch.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let events = batch(c, n);
                        n += 1;
                        let body = serde_json::to_vec(&events).unwrap();
                        // Connection errors are expected once the server is stopped.
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
                            200 => acked.lock().unwrap().extend(
                                events.iter().map(|e| e["id"].as_str().unwrap().to_owned()),
                            ),
                            207 | 503 => {}
                            other => panic!("unexpected status {other}"),
                        }
                    }
                })
            })
            .collect();
        Posters {
            stop,
            acked,
            threads,
        }
    }

    /// Events acked so far (by every poster sharing the `acked` list).
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the clients and waits for them; a client's failure fails the test.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a poster failed");
        }
    }
}

/// Polls `GET /v1/bookings/{id}` until every id in `ids` has a booking (or panics after
/// `secs`); returns them by id.
pub fn bookings_decided<'a>(
    server: &Server,
    ids: impl IntoIterator<Item = &'a String> + Clone,
    secs: u64,
) -> std::collections::HashMap<String, Value> {
    let mut out = std::collections::HashMap::new();
    wait_for(secs, "every booking to be decided", || {
        for id in ids.clone() {
            if out.contains_key(id) {
                continue;
            }
            let r = server.get(&format!("/v1/bookings/{id}"));
            if r.status != 200 {
                return None;
            }
            out.insert(id.clone(), r.json());
        }
        Some(())
    });
    out
}

/// How many times each event id is in the log, via `floodgate stream read`.
pub fn stream_id_counts(data_dir: &Path) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for r in stream_read(data_dir, &[]) {
        *counts
            .entry(r["event"]["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}
