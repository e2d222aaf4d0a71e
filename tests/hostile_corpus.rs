//! Sends the edge's hostile-input corpus (`ingest/tests/corpus/cases.rs`, over 200 cases)
//! to the real binary. Every case must get its documented answer within the timeout; the
//! server must stay up with bounded memory, and nothing may be appended.

mod common;

#[path = "../ingest/tests/corpus/cases.rs"]
mod cases;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use cases::{Expect, Wire};
use common::Server;
use serde_json::Value;

/// What came back: a status, headers and body, or a closed connection.
enum Answer {
    Response {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
    Closed,
}

fn send(addr: SocketAddr, wire: &Wire) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let bytes = match wire {
        Wire::Request {
            method,
            path,
            headers,
            body,
        } => {
            let mut out =
                format!("{method} {path} HTTP/1.1\r\nhost: corpus\r\nconnection: close\r\n")
                    .into_bytes();
            for (k, v) in headers {
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
            out
        }
        Wire::Stall(bytes) => bytes.clone(),
    };
    // The server may answer (413, 431) and close before reading everything.
    let _ = s.write_all(&bytes);
    read_answer(&mut s)
}

/// Reads one response: the head, then `content-length` bytes of body.
fn read_answer(s: &mut TcpStream) -> std::io::Result<Answer> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(Answer::Closed),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Answer::Closed);
            }
            Err(e) => return Err(e),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut content_type = None;
    let mut length = 0usize;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(v.trim().to_owned()),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    Ok(Answer::Response {
        status,
        content_type,
        body,
    })
}

/// `None` when the answer is what the case documents; else why not.
fn judge(expect: &Expect, answer: &Answer) -> Option<String> {
    let (status, content_type, body) = match answer {
        Answer::Closed => {
            return match expect {
                Expect::ClosedOr(_) => None,
                other => Some(format!("connection closed; expected {other:?}")),
            };
        }
        Answer::Response {
            status,
            content_type,
            body,
        } => (*status, content_type, body),
    };
    let json = || serde_json::from_slice::<Value>(body).ok();
    let shown = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match expect {
        Expect::Error(want, code) => {
            if status != *want {
                return Some(format!("status {status}, expected {want}: {}", shown()));
            }
            if content_type.as_deref() != Some("application/json") {
                return Some(format!("content type {content_type:?}"));
            }
            let got = json().map(|v| v["error"]["code"].clone());
            if got.as_ref().and_then(Value::as_str) != Some(code) {
                return Some(format!(
                    "error code {got:?}, expected {code:?}: {}",
                    shown()
                ));
            }
            let message = json().map(|v| v["error"]["message"].clone());
            if message
                .as_ref()
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Some("no error message".to_owned());
            }
            None
        }
        Expect::Rejected(want) => {
            if status != 422 {
                return Some(format!("status {status}, expected 422: {}", shown()));
            }
            if content_type.as_deref() != Some("application/json") {
                return Some(format!("content type {content_type:?}: {}", shown()));
            }
            // A 422 whose body is not a batch result tells the producer nothing.
            let Some(v) = json() else {
                return Some(format!("the 422 body is not JSON: {}", shown()));
            };
            let Some(results) = v["results"].as_array().filter(|r| !r.is_empty()) else {
                return Some(format!("no per-event results: {}", shown()));
            };
            let counts = (&v["accepted"], &v["rejected"], &v["retry"]);
            if counts
                != (
                    &Value::from(0),
                    &Value::from(results.len()),
                    &Value::from(0),
                )
            {
                return Some(format!("counts {counts:?}: {}", shown()));
            }
            for (i, r) in results.iter().enumerate() {
                if r["index"] != i || r["status"] != "rejected" {
                    return Some(format!("result {i} is not a rejection: {r}"));
                }
                let Some(errors) = r["errors"].as_array() else {
                    return Some(format!("result {i} has no errors: {r}"));
                };
                let mut pointers = Vec::new();
                for e in errors {
                    let (Some(p), Some(m)) = (e["pointer"].as_str(), e["message"].as_str()) else {
                        return Some(format!(
                            "result {i}: an error without pointer and message: {e}"
                        ));
                    };
                    if m.is_empty() {
                        return Some(format!("result {i}: an empty message at {p:?}"));
                    }
                    pointers.push(p.to_owned());
                }
                pointers.sort();
                pointers.dedup();
                if &pointers != want {
                    return Some(format!(
                        "result {i}: pointers {}, expected exactly {}",
                        clipped(&pointers),
                        clipped(want)
                    ));
                }
            }
            None
        }
        Expect::Protocol(want) => {
            (status != *want).then(|| format!("status {status}, expected {want}: {}", shown()))
        }
        Expect::ClosedOr(allowed) => (!allowed.contains(&status))
            .then(|| format!("status {status}, expected one of {allowed:?} or a close")),
    }
}

/// Pointers for a failure message, each cut to 80 characters (a case may name a member
/// 1 MiB long).
fn clipped(pointers: &[String]) -> String {
    let shown: Vec<String> = pointers
        .iter()
        .map(|p| match p.char_indices().nth(80) {
            Some((at, _)) => format!("{}… ({} bytes)", &p[..at], p.len()),
            None => p.clone(),
        })
        .collect();
    format!("{shown:?}")
}

/// The server's resident memory now and at its peak, in MiB, from /proc.
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn every_hostile_case_gets_its_documented_answer() {
    let cases = cases::all();
    assert!(cases.len() >= 200, "the corpus has {} cases", cases.len());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    // Short timeouts so the cases that never finish are decided quickly.
    std::fs::write(
        &config,
        "[ingest]\nbody_timeout_ms = 1500\nheader_read_timeout_ms = 1500\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let pid = server.child.id();
    let (baseline, _) = memory_mib(pid);

    let mut failures = Vec::new();
    let started = Instant::now();
    for case in &cases {
        let t = Instant::now();
        let verdict = match send(server.addr, &case.wire) {
            Ok(answer) => judge(&case.expect, &answer),
            Err(e) => Some(format!("no answer: {e}")),
        };
        if let Some(why) = verdict {
            failures.push(format!("{}: {why}", case.name));
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} took {:?}",
            case.name,
            t.elapsed()
        );
        // The server is still up after every case.
        if server.get("/healthz").status != 200 {
            failures.push(format!("{}: the server stopped answering", case.name));
            break;
        }
    }
    let (rss, peak) = memory_mib(pid);
    eprintln!(
        "{} cases in {:?}; server RSS {baseline} MiB at start, {rss} MiB after, peak {peak} MiB",
        cases.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases answered wrongly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Bounded memory: bombs and floods never inflate the process. (The largest body the
    // edge holds is 5 MiB, decompressed; a few are in flight at once.)
    assert!(
        peak.saturating_sub(baseline) < 200,
        "peak RSS {peak} MiB, {baseline} MiB at start"
    );
    // Nothing invalid was appended.
    let appended = common::stream_read(&data, &[]);
    assert!(
        appended.is_empty(),
        "{} records appended, e.g. {}",
        appended.len(),
        appended[0]
    );
}
