//! Hostile input against the real binary: every case gets its documented 4xx with a JSON
//! error, the server keeps answering, and nothing is appended.

mod common;

use common::{Server, booking, envelope, post, stream_read};
use serde_json::{Value, json};

fn expect_error(resp: &common::Resp, status: u16, code: &str) {
    assert_eq!(
        resp.status,
        status,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    let body = resp.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

/// The pointers of one event result's errors, sorted.
fn sorted_pointers(result: &Value) -> Vec<String> {
    let mut pointers: Vec<String> = result["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap().to_owned())
        .collect();
    pointers.sort();
    pointers
}

#[test]
fn hostile_bodies_get_their_4xx_and_append_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let batch = Some("application/cloudevents-batch+json");

    // Invalid JSON, with line and column.
    let r = server.post(batch, b"[{\"id\":\n  \"x\",,]");
    expect_error(&r, 400, "invalid_json");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("line 2") && msg.contains("column"), "{msg}");

    // Invalid UTF-8.
    let r = server.post(batch, b"[{\"id\":\"\xff\xfe\"}]");
    expect_error(&r, 400, "invalid_utf8");

    // 10,000-deep nesting, as a batch and as one event.
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    expect_error(&server.post(batch, deep.as_bytes()), 400, "invalid_json");
    let deep_obj = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
    expect_error(
        &server.post(Some("application/cloudevents+json"), deep_obj.as_bytes()),
        400,
        "invalid_json",
    );
    let deep_data = format!(
        r#"{{"specversion":"1.0","id":"d","source":"s","type":"booking.requested","data":{}}}"#,
        "[".repeat(10_000) + &"]".repeat(10_000)
    );
    expect_error(
        &server.post(Some("application/json"), deep_data.as_bytes()),
        400,
        "invalid_json",
    );

    // A 6 MiB body (default limit 5 MiB), declared and chunked-free.
    let big = vec![b' '; 6 * 1024 * 1024];
    expect_error(&server.post(batch, &big), 413, "body_too_large");

    // 501 events.
    let many: Vec<Value> = (0..501)
        .map(|i| booking(&format!("m{i}"), "b", "E", 1))
        .collect();
    expect_error(&server.post_batch(&many), 413, "too_many_events");
    let nd: String = many.iter().map(|e| e.to_string() + "\n").collect();
    expect_error(
        &server.post(Some("application/x-ndjson"), nd.as_bytes()),
        413,
        "too_many_events",
    );

    // Wrong and missing content types.
    let one = serde_json::to_vec(&booking("w", "b", "E", 1)).unwrap();
    for ct in [
        Some("text/plain"),
        Some("application/xml"),
        Some("application/cloudevents+xml"),
        None,
        Some(""),
    ] {
        expect_error(&server.post(ct, &one), 415, "unsupported_media_type");
    }
    // An encoding we do not take.
    let r = post(
        server.addr,
        "/v1/events",
        Some("application/json"),
        &one,
        &[("content-encoding", "br")],
    );
    expect_error(&r, 415, "unsupported_content_encoding");

    // Empty bodies.
    for ct in [
        "application/cloudevents-batch+json",
        "application/cloudevents+json",
        "application/json",
        "application/x-ndjson",
    ] {
        expect_error(&server.post(Some(ct), b""), 400, "empty_body");
    }
    expect_error(&server.post(batch, b" \r\n "), 400, "empty_body");

    // Not an event at all.
    let r = server.post(batch, b"[1, \"x\", null, [], {}]");
    assert_eq!(r.status, 422);
    assert!(
        r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "rejected")
    );

    // A wrong type in every field of one schema: one pointer per field.
    let wrong = envelope(
        "wt",
        "booking.requested",
        json!({"bookingId": 1, "eventId": true, "customerId": [], "seats": "2", "requestedAt": 5}),
    );
    let r = server.post_batch(&[wrong]);
    assert_eq!(r.status, 422);
    let pointers = sorted_pointers(&r.json()["results"][0]);
    assert_eq!(
        pointers,
        [
            "/data/bookingId",
            "/data/customerId",
            "/data/eventId",
            "/data/requestedAt",
            "/data/seats"
        ]
    );
    // …and a wrong type in every envelope attribute.
    let wrong_env = json!({"specversion": 1, "id": 2, "source": 3, "type": 4, "time": 5, "subject": 6,
        "datacontenttype": 7, "dataschema": 8, "data": {}});
    let r = server.post_batch(&[wrong_env]);
    assert_eq!(r.status, 422);
    let pointers = sorted_pointers(&r.json()["results"][0]);
    assert_eq!(
        pointers,
        [
            "/datacontenttype",
            "/dataschema",
            "/id",
            "/source",
            "/specversion",
            "/subject",
            "/time",
            "/type"
        ]
    );

    // A huge string is rejected without being echoed back whole.
    let mut huge = booking("h", "b", "E", 1);
    huge["data"]["customerId"] = json!("x".repeat(1_000_000));
    let r = server.post_batch(&[huge]);
    assert_eq!(r.status, 422);
    assert!(
        r.body.len() < 4096,
        "error response is {} bytes",
        r.body.len()
    );

    // Huge numbers and NUL bytes.
    let r = server.post(batch, br#"[{"specversion":"1.0","id":"n","source":"s","type":"booking.requested","data":{"bookingId":"b","eventId":"E","customerId":"c","seats":1e400,"requestedAt":"2026-11-22T10:00:00Z"}}]"#);
    // 1e400 is past every JSON number the parser can hold: the body does not parse (the
    // corpus's "number out of range" cases), so 400 `invalid_json`, not a per-event 422.
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    let r = server.post(batch, b"[{\"specversion\":\"1.0\",\"id\":\"a\x00b\"}]");
    assert_eq!(r.status, 400);
    let mut nul = booking("nul\u{0}", "b\u{0}", "E", 1);
    nul["source"] = json!("/s");
    let r = server.post_batch(&[nul]);
    assert_eq!(r.status, 422);

    // The server is still up and answers, and nothing reached the stream.
    assert_eq!(server.get("/healthz").status, 200);
    assert_eq!(server.get("/readyz").status, 200);
    assert!(
        stream_read(dir.path(), &[]).is_empty(),
        "hostile input reached the stream"
    );
    // A valid event still goes through.
    assert_eq!(
        server.post_batch(&[booking("fine", "b", "E", 1)]).status,
        200
    );
    assert_eq!(stream_read(dir.path(), &[]).len(), 1);
}
