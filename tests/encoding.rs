//! Compressed bodies and CloudEvents binary mode on the real binary: gzip and zstd are
//! decoded, a compression bomb costs a few MiB and gets 413, other encodings get 415, and
//! a binary-mode event is checked and stored like a structured one.

mod common;

use std::io::{Read, Write};

use common::{Server, booking, post, stream_read};
use serde_json::{Value, json};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A field of `/proc/<pid>/status`, in KiB (`VmRSS:` now, `VmHWM:` the peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resets the peak resident size (`VmHWM`) of `pid` to its current size (proc(5),
/// `clear_refs`, value 5), so that a later `VmHWM` is the peak of what came after.
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("cannot reset the peak RSS of {pid}: {e}"));
}

#[test]
fn gzip_and_zstd_bodies_are_decoded_and_bombs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let batch = "application/cloudevents-batch+json";
    // Distinct ids per encoding: the same ids again would be answered as duplicates.
    let body_for = |tag: &str| {
        let events: Vec<Value> = (0..50)
            .map(|i| booking(&format!("{tag}{i}"), &format!("b{i}"), "E", 1))
            .collect();
        serde_json::to_vec(&events).unwrap()
    };
    let body = body_for("g");

    let r = post(
        server.addr,
        "/v1/events",
        Some(batch),
        &gzip(&body),
        &[("content-encoding", "gzip")],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["accepted"], 50);
    let zs = zstd::bulk::compress(&body_for("z"), 3).unwrap();
    let r = post(
        server.addr,
        "/v1/events",
        Some(batch),
        &zs,
        &[("content-encoding", "zstd")],
    );
    assert_eq!(r.status, 200);
    let r = post(
        server.addr,
        "/v1/events",
        Some(batch),
        &body_for("i"),
        &[("content-encoding", "identity")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(stream_read(dir.path(), &[]).len(), 150);

    // A 1 GiB zstd bomb and a 256 MiB gzip bomb: 413, and the server's memory stays small.
    let mut zbomb = Vec::new();
    {
        let mut enc = zstd::stream::write::Encoder::new(&mut zbomb, 1).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            enc.write_all(&zeros).unwrap();
        }
        enc.finish().unwrap();
    }
    let mut gbomb = Vec::new();
    {
        let mut enc = flate2::write::GzEncoder::new(&mut gbomb, flate2::Compression::fast());
        std::io::copy(&mut std::io::repeat(0).take(256 << 20), &mut enc).unwrap();
        enc.finish().unwrap();
    }
    // The peak, not the size after: memory a bomb took and gave back counts too.
    let pid = server.child.id();
    reset_peak_rss(pid);
    let before = status_kib(pid, "VmRSS:");
    for (bomb, enc) in [(&zbomb, "zstd"), (&gbomb, "gzip")] {
        assert!(bomb.len() < 5 << 20, "{enc} bomb is {} bytes", bomb.len());
        let r = post(
            server.addr,
            "/v1/events",
            Some(batch),
            bomb,
            &[("content-encoding", enc)],
        );
        assert_eq!(r.status, 413, "{enc}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], "body_too_large");
    }
    let peak = status_kib(pid, "VmHWM:");
    eprintln!("server RSS {before} KiB before the bombs, peak {peak} KiB during them");
    // A body is inflated to at most max_body_bytes (5 MiB) before it is refused: a few
    // such buffers (about 50 MiB measured), never the 256 MiB or 1 GiB the bombs hold.
    assert!(
        peak.saturating_sub(before) < 128 * 1024,
        "the server's peak RSS rose from {before} KiB to {peak} KiB during the bombs"
    );

    // Corrupt data and unknown encodings.
    let r = post(
        server.addr,
        "/v1/events",
        Some(batch),
        b"not gzip at all",
        &[("content-encoding", "gzip")],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_content_encoding");
    for enc in ["br", "deflate", "gzip, br", "compress"] {
        let r = post(
            server.addr,
            "/v1/events",
            Some(batch),
            &body,
            &[("content-encoding", enc)],
        );
        assert_eq!(r.status, 415, "{enc}");
        assert_eq!(r.json()["error"]["code"], "unsupported_content_encoding");
    }
    assert_eq!(
        stream_read(dir.path(), &[]).len(),
        150,
        "refused bodies reached the stream"
    );
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn binary_mode_events_are_checked_and_stored_as_structured() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let data = json!({"bookingId":"bk-bin","eventId":"E-bin","customerId":"c","seats":2,"requestedAt":"2026-11-22T10:00:00Z"});
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin%201"),
        ("ce-source", "/binary"),
        ("ce-type", "booking.requested"),
        ("ce-time", "2026-11-22T10:00:00Z"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/json"),
        data.to_string().as_bytes(),
        &headers,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["results"][0]["id"], "bin 1");
    let records = stream_read(dir.path(), &[]);
    assert_eq!(records.len(), 1);
    let e = &records[0]["event"];
    assert_eq!(e["id"], "bin 1");
    assert_eq!(e["source"], "/binary");
    assert_eq!(
        e["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(e["data"], data);
    assert_eq!(records[0]["key"], "E-bin");

    // Invalid data gets its pointer, as in structured mode.
    let mut bad = data.clone();
    bad["seats"] = json!(0);
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/json"),
        bad.to_string().as_bytes(),
        &headers,
    );
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["results"][0]["errors"][0]["pointer"],
        "/data/seats"
    );
    // Data that is not JSON cannot satisfy a schema.
    let r = post(
        server.addr,
        "/v1/events",
        Some("text/plain"),
        b"hello",
        &headers,
    );
    assert_eq!(r.status, 422);
    let pointers: Vec<Value> = r.json()["results"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].clone())
        .collect();
    assert!(
        pointers.contains(&json!("/datacontenttype")),
        "{pointers:?}"
    );
    // A body that claims JSON but is not: 400 with line and column.
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/json"),
        b"{\"seats\":",
        &headers,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    // Missing required attributes are named: exactly those, by their pointers.
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/json"),
        data.to_string().as_bytes(),
        &[("ce-specversion", "1.0")],
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["results"][0]["status"], "rejected", "{body}");
    let mut pointers: Vec<&str> = body["results"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    pointers.sort_unstable();
    pointers.dedup();
    assert_eq!(pointers, ["/id", "/source", "/type"], "{body}");
    // Structured content types win over stray ce- headers.
    let structured = booking("s1", "bk-s1", "E", 1);
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/cloudevents+json"),
        structured.to_string().as_bytes(),
        &[("ce-specversion", "1.0")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(stream_read(dir.path(), &[]).len(), 2);
}
