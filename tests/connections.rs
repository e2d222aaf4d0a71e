//! Connection hygiene on the real binary: slow headers and slow bodies are cut off, the
//! connection limit holds new connections back in the accept queue instead of serving
//! them all (while the operations listener still answers), and a graceful shutdown under
//! load loses no acked event.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, booking, read_response, stream_read};

fn start_with(dir: &std::path::Path, toml: &str) -> Server {
    let config = dir.join("floodgate.toml");
    std::fs::write(&config, toml).unwrap();
    Server::start(&dir.join("data"), &["--config", config.to_str().unwrap()])
}

#[test]
fn slow_headers_and_slow_bodies_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        "[ingest]\nheader_read_timeout_ms = 500\nbody_timeout_ms = 500\n",
    );
    // Slowloris: half a request head, then silence. The server hangs up.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow headers held the connection {:?}",
        started.elapsed()
    );
    // A body that never completes gets 408.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n[{\"id\":").unwrap();
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 408);
    assert_eq!(resp.json()["error"]["code"], "body_timeout");
    assert_eq!(server.get("/healthz").status, 200);
}

/// `max_connections` holds further connections back in the kernel's accept queue instead
/// of serving them. Decided by conditions, not by a read timeout: with both slots taken
/// (the open-connection gauge, read on one of them, says 2), a third connection is in the
/// listening socket's accept queue (`/proc/net/tcp`), so the server has not accepted it;
/// it stays there, unanswered, across a request the server serves on the probe; and once
/// a slot frees it is accepted and answered.
#[test]
fn the_connection_limit_holds_new_connections_back() {
    let dir = tempfile::tempdir().unwrap();
    // Timeouts far longer than the test, so that only the test closes its connections.
    let server = start_with(
        dir.path(),
        "[ingest]\nmax_connections = 2\nidle_timeout_ms = 600000\nheader_read_timeout_ms = 600000\n",
    );
    let port = server.addr.port();
    // Slot 1: a keep-alive connection that reads /metrics. Slot 2: a silent connection.
    let mut probe = TcpStream::connect(server.addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let silent = TcpStream::connect(server.addr).unwrap();
    common::wait_for(30, "both connections to be served", || {
        (open_connections(&mut probe) == 2).then_some(())
    });

    let mut third = TcpStream::connect(server.addr).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    third.set_nonblocking(true).unwrap();
    let unanswered = |third: &mut TcpStream| {
        let mut buf = [0u8; 64];
        match third.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("served beyond the connection limit: {other:?}"),
        }
    };
    common::wait_for(
        30,
        "the third connection to wait in the accept queue",
        || {
            unanswered(&mut third);
            let open = open_connections(&mut probe);
            assert!(open <= 2, "{open} connections served; the limit is 2");
            (accept_queue(port) == 1).then_some(())
        },
    );
    // Still waiting after the server has answered the probe again: the limit, not a
    // slow accept, holds it.
    assert_eq!(open_connections(&mut probe), 2);
    assert_eq!(accept_queue(port), 1, "the third connection left the queue");
    unanswered(&mut third);
    third.set_nonblocking(false).unwrap();

    // A slot frees: the third connection is accepted and answered.
    drop(silent);
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let resp = read_response(&mut third).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(accept_queue(port), 0);
}

/// `ingest.ops_listen`: with the edge's one connection taken by a request still sending
/// its body, `/metrics`, `/healthz` and `/readyz` answer on the operations listener (the
/// edge's own listener would hold them in its accept queue), which serves nothing else;
/// once the edge drains, its `/readyz` says so while the request in flight finishes.
#[test]
fn the_operations_listener_answers_while_the_edge_is_full_and_says_when_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    std::fs::write(
        &config,
        "[ingest]\nmax_connections = 1\nidle_timeout_ms = 600000\nheader_read_timeout_ms = 600000\n\
         body_timeout_ms = 600000\nrequest_timeout_ms = 600000\nshutdown_grace_ms = 600000\n",
    )
    .unwrap();
    let mut child = common::floodgate()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env("FLOODGATE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut addr_of = |what: &str| -> std::net::SocketAddr {
        let line = lines.next().expect(what).unwrap();
        assert!(line.contains(what), "{line}");
        let addr = line.split("http://").nth(1).unwrap();
        addr.split_whitespace().next().unwrap().parse().unwrap()
    };
    let edge = addr_of("listening on");
    let ops = addr_of("operations on");
    std::thread::spawn(move || for _ in lines {});
    let server = Server {
        child,
        addr: edge,
        data_dir: dir.path().join("data"),
    };

    // The edge's one connection: a batch whose body is half sent.
    let body = serde_json::to_vec(&[booking("ops-1", "b-ops-1", "ev-ops", 1)]).unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = TcpStream::connect(edge).unwrap();
    slow.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             content-type: application/cloudevents-batch+json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    slow.write_all(first).unwrap();
    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("floodgate_ingest_open_connections "))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
    };
    common::wait_for(30, "the edge to hold its one connection", || {
        let metrics = common::request(ops, "GET", "/metrics", &[], None);
        assert_eq!(metrics.status, 200);
        assert!(
            metrics
                .header("content-type")
                .unwrap()
                .starts_with("text/plain"),
            "{:?}",
            metrics.headers
        );
        (gauge(&String::from_utf8_lossy(&metrics.body)) == Some(1)).then_some(())
    });
    let health = common::request(ops, "GET", "/healthz", &[], None);
    assert_eq!(
        (health.status, &health.json()["status"]),
        (200, &"ok".into())
    );
    let ready = common::request(ops, "GET", "/readyz", &[], None);
    assert_eq!(
        (ready.status, &ready.json()["status"]),
        (200, &"ready".into())
    );
    let events = common::post(ops, "/v1/events", Some("application/json"), &body, &[]);
    assert_eq!(
        events.status, 404,
        "the operations listener takes no events"
    );
    assert_eq!(events.json()["error"]["code"], "not_found");
    // The edge's own listener is full: a probe there waits in its accept queue.
    let _waiting = TcpStream::connect(edge).unwrap();
    common::wait_for(30, "the edge's accept queue to hold a probe", || {
        (accept_queue(edge.port()) == 1).then_some(())
    });

    // SIGTERM: the edge drains (the slow request may still finish), and says so.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let draining = common::wait_for(30, "/readyz to say the edge drains", || {
        let ready = common::request(ops, "GET", "/readyz", &[], None);
        (ready.status == 503).then_some(ready)
    });
    assert_eq!(draining.json()["error"]["code"], "not_ready");
    assert_eq!(
        common::request(ops, "GET", "/healthz", &[], None).status,
        200
    );
    slow.write_all(rest).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let answered = read_response(&mut slow).unwrap();
    assert_eq!(
        answered.status,
        200,
        "{}",
        String::from_utf8_lossy(&answered.body)
    );
    assert_eq!(answered.json()["results"][0]["status"], "accepted");
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the server did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stream_read(&server.data_dir, &[]).len(), 1);
}

/// `floodgate_ingest_open_connections` from /metrics, asked on the keep-alive `probe`.
fn open_connections(probe: &mut TcpStream) -> u64 {
    probe
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = probe.read(&mut buf).expect("the probe connection reads");
        assert!(n > 0, "the server closed the probe connection");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("/metrics has a content-length");
    while raw.len() < head_end + length {
        let n = probe.read(&mut buf).expect("the probe connection reads");
        assert!(n > 0, "the server closed the probe connection");
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw[head_end..head_end + length]);
    text.lines()
        .find_map(|l| l.strip_prefix("floodgate_ingest_open_connections "))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a number") as u64)
}

/// Connections waiting in the accept queue of the socket listening on `port`: for a
/// listening socket, `/proc/net/tcp` shows that queue's length as `rx_queue`.
fn accept_queue(port: u16) -> u64 {
    let port = format!(":{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A: LISTEN), tx_queue:rx_queue.
            if f.len() > 4 && f[1].ends_with(&port) && f[3] == "0A" {
                let rx = f[4].split(':').nth(1).expect("tx_queue:rx_queue");
                return u64::from_str_radix(rx, 16).expect("hex");
            }
        }
    }
    panic!("no socket listens on port{port}")
}

#[test]
fn graceful_shutdown_under_load_loses_no_acked_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let posters = common::Posters::start(server.addr, 6, acked.clone(), |c, n| {
        (0..20)
            .map(|i| booking(&format!("g{c}-{n}-{i}"), "b", &format!("K{i}"), 1))
            .collect()
    });
    // Shut down once the load is well under way.
    common::wait_for(30, "load to build", || {
        (posters.acked() >= 400).then_some(())
    });
    assert_eq!(
        server.terminate(),
        Some(0),
        "SIGTERM under load did not exit 0"
    );
    posters.stop();
    let acked = acked.lock().unwrap();
    assert!(acked.len() > 100, "too little load: {}", acked.len());
    let ids: std::collections::HashSet<String> = stream_read(dir.path(), &[])
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    for id in acked.iter() {
        assert!(ids.contains(id), "acked {id} lost in a graceful shutdown");
    }
}

#[test]
fn http2_cleartext_and_http1_keep_alive_are_both_served() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for http2 in [true, false] {
            let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new())
                .http2_only(http2)
                .build_http();
            // Several requests on the client's pooled connection (h2 streams, or h1
            // keep-alive).
            for i in 0..3 {
                let body =
                    serde_json::to_vec(&[booking(&format!("h{http2}-{i}"), "b", "K", 1)]).unwrap();
                let req = hyper::Request::post(format!("http://{}/v1/events", server.addr))
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let version = resp.version();
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["accepted"], 1);
                let expected = if http2 {
                    hyper::Version::HTTP_2
                } else {
                    hyper::Version::HTTP_11
                };
                assert_eq!(version, expected);
            }
        }
    });
    assert_eq!(stream_read(dir.path(), &["--limit", "100"]).len(), 6);
}

/// The HTTP/2 connection preface, then an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Idle connections are closed after `idle_timeout_ms`, so they cannot hold every
/// connection slot: HTTP/2 connections that sent their preface and then nothing, and TCP
/// connections that sent nothing at all, are closed and `/healthz` is answered. Clients
/// sending requests back to back on one HTTP/1 keep-alive connection and on one HTTP/2
/// connection are not cut, however long they go on.
#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        "[ingest]\nmax_connections = 8\nidle_timeout_ms = 1000\n",
    );
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // Two busy clients, one connection each, each counting its answered requests.
    let busy: Vec<_> = [false, true]
        .into_iter()
        .map(|http2| {
            let (stop, done) = (stop.clone(), Arc::new(AtomicUsize::new(0)));
            let counter = done.clone();
            let client = std::thread::spawn(move || busy_client(addr, http2, &stop, &counter));
            (done, client)
        })
        .collect();
    common::wait_for(30, "both busy clients to be served", || {
        busy.iter()
            .all(|(n, _)| n.load(Ordering::Relaxed) > 0)
            .then_some(())
    });

    // More idle connections than there are slots left: h2 prefaces (some with their
    // SETTINGS), and silent TCP connections.
    let mut idle = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(H2_PREFACE).unwrap();
        if i % 2 == 0 {
            s.write_all(H2_EMPTY_SETTINGS).unwrap();
        }
        idle.push(s);
    }
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).unwrap());
    }
    let opened = Instant::now();
    // /healthz waits in the accept queue behind them until they are closed.
    let mut probe = TcpStream::connect(server.addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut probe).expect("/healthz answered once idle connections close");
    assert_eq!(resp.status, 200);
    // The server closed them (after a GOAWAY, for HTTP/2); it did not just forget them.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sink = Vec::new();
        if let Err(e) = s.read_to_end(&mut sink) {
            // A reset is a close too; only a read timeout means the connection is open.
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "an idle connection was not closed by the server: {e}"
            );
        }
    }
    // The busy clients outlived the idle timeout several times over before they stop.
    common::wait_for(30, "the busy clients to run past 3 idle timeouts", || {
        (opened.elapsed() > Duration::from_secs(3)).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for (done, client) in busy {
        client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("a busy client was cut off: {e}"));
        assert!(done.load(Ordering::Relaxed) > 10);
    }
}

/// Sends `GET /healthz` back to back on one connection (HTTP/2 or HTTP/1.1 keep-alive)
/// until `stop`, counting answers in `done`; any failure, a closed connection among
/// them, is an error.
fn busy_client(
    addr: std::net::SocketAddr,
    http2: bool,
    stop: &std::sync::atomic::AtomicBool,
    done: &std::sync::atomic::AtomicUsize,
) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::Ordering;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(tcp);
        let mut send = if http2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Sender::H1(send)
        };
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let req = hyper::Request::get(format!("http://{addr}/healthz"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = match &mut send {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| format!("request {n}: {e}"))?;
                    s.send_request(req).await
                }
                Sender::H2(s) => s.send_request(req).await,
            }
            .map_err(|e| format!("request {n}: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("request {n}: status {}", resp.status()));
            }
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("request {n}: {e}"))?;
            n += 1;
            done.store(n, Ordering::Relaxed);
        }
        Ok(())
    })
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}
