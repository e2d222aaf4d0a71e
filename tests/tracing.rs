//! Distributed tracing on the real binary: a W3C `traceparent` on the request, or the
//! CloudEvents Distributed Tracing extension on the event, is kept on the stored event and
//! carried into the events derived from it, so one booking can be followed from its POST to
//! its `booking.confirmed`.

mod common;

use common::{Server, booking, envelope, outbox_read, post, stream_read, wait_for};
use serde_json::{Value, json};

const HEADER_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OTHER_HEADER_TRACE: &str = "00-11111111111111111111111111111111-2222222222222222-00";
const OWN_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn trace_id(traceparent: &Value) -> &str {
    traceparent
        .as_str()
        .and_then(|t| t.split('-').nth(1))
        .unwrap_or_else(|| panic!("no traceparent: {traceparent}"))
}

/// POSTs `body` as `content_type` with `headers`; the answer must be 200.
fn post_ok(server: &Server, content_type: &str, body: &[u8], headers: &[(&str, &str)]) {
    let r = post(server.addr, "/v1/events", Some(content_type), body, headers);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// The stored event of each booking id, from `floodgate stream read`.
fn stored(server: &Server, booking_id: &str) -> Value {
    stream_read(&server.data_dir, &[])
        .into_iter()
        .map(|r| r["event"].clone())
        .find(|e| e["data"]["bookingId"] == booking_id)
        .unwrap_or_else(|| panic!("{booking_id} is not in the stream"))
}

#[test]
fn a_booking_is_followed_from_its_post_to_its_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let created = envelope(
        "create-T1",
        "inventory.event.created",
        json!({"eventId":"T1","name":"Traced","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":100}),
    );
    post_ok(
        &server,
        "application/cloudevents+json",
        created.to_string().as_bytes(),
        &[],
    );
    wait_for(30, "the inventory", || {
        (server.get("/v1/inventory/T1").status == 200).then_some(())
    });

    // 1. The request's traceparent and tracestate, onto an event without its own.
    post_ok(
        &server,
        "application/cloudevents+json",
        booking("r1", "tb-1", "T1", 2).to_string().as_bytes(),
        &[
            ("traceparent", HEADER_TRACE),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    );
    // 2. A batch under another request trace: the event with its own traceparent keeps it,
    // the other takes the request's.
    let mut own = booking("r2", "tb-2", "T1", 1);
    own["traceparent"] = json!(OWN_TRACE);
    let batch = json!([own, booking("r3", "tb-3", "T1", 1)]);
    post_ok(
        &server,
        "application/cloudevents-batch+json",
        batch.to_string().as_bytes(),
        &[("traceparent", OTHER_HEADER_TRACE)],
    );
    // 3. An invalid header is ignored (the event is accepted, without a trace context);
    // 4. no header, no context.
    post_ok(
        &server,
        "application/cloudevents+json",
        booking("r4", "tb-4", "T1", 1).to_string().as_bytes(),
        &[("traceparent", "00-abc-def-01")],
    );
    post_ok(
        &server,
        "application/cloudevents+json",
        booking("r5", "tb-5", "T1", 1).to_string().as_bytes(),
        &[],
    );
    // 5. Binary mode: the traceparent header too, beside the ce-* attributes.
    let data = json!({"bookingId":"tb-6","eventId":"T1","customerId":"c","seats":1,"requestedAt":"2026-11-22T10:00:00Z"});
    post_ok(
        &server,
        "application/json",
        data.to_string().as_bytes(),
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "r6"),
            ("ce-source", "/tests"),
            ("ce-type", "booking.requested"),
            ("traceparent", HEADER_TRACE),
        ],
    );

    // The stored events.
    let e1 = stored(&server, "tb-1");
    assert_eq!(e1["traceparent"], HEADER_TRACE);
    assert_eq!(e1["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(e1["id"], "r1", "the rest of the event as sent");
    assert_eq!(e1["data"]["seats"], 2);
    assert_eq!(stored(&server, "tb-2")["traceparent"], OWN_TRACE);
    assert_eq!(stored(&server, "tb-3")["traceparent"], OTHER_HEADER_TRACE);
    for plain in ["tb-4", "tb-5"] {
        let e = stored(&server, plain);
        assert!(e.get("traceparent").is_none(), "{e}");
        assert!(e.get("tracestate").is_none(), "{e}");
    }
    assert_eq!(stored(&server, "tb-6")["traceparent"], HEADER_TRACE);

    // The confirmations, derived from them.
    let confirmations = wait_for(30, "six confirmations", || {
        let confirmed: Vec<Value> = outbox_read(&server.data_dir)
            .into_iter()
            .filter(|e| e["type"] == "booking.confirmed")
            .collect();
        (confirmed.len() == 6).then_some(confirmed)
    });
    let confirmation = |booking_id: &str| {
        confirmations
            .iter()
            .find(|e| e["subject"] == booking_id)
            .unwrap_or_else(|| panic!("no confirmation of {booking_id}"))
    };
    let c1 = confirmation("tb-1");
    assert_eq!(trace_id(&c1["traceparent"]), trace_id(&json!(HEADER_TRACE)));
    assert_eq!(
        c1["traceparent"], HEADER_TRACE,
        "the same parent-id: Floodgate records no span of its own"
    );
    assert_eq!(c1["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(confirmation("tb-2")["traceparent"], OWN_TRACE);
    assert_eq!(confirmation("tb-3")["traceparent"], OTHER_HEADER_TRACE);
    assert!(confirmation("tb-3").get("tracestate").is_none());
    for plain in ["tb-4", "tb-5"] {
        let c = confirmation(plain);
        assert!(c.get("traceparent").is_none(), "{c}");
    }
    assert_eq!(confirmation("tb-6")["traceparent"], HEADER_TRACE);
}

/// An event's own trace attributes are held to W3C Trace Context: an invalid one rejects
/// the event, with its pointer (a header never does).
#[test]
fn an_invalid_trace_attribute_rejects_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut zero = booking("z1", "zb-1", "T1", 1);
    zero["traceparent"] = json!("00-00000000000000000000000000000000-b7ad6b7169203331-01");
    let mut lonely = booking("z2", "zb-2", "T1", 1);
    lonely["tracestate"] = json!("congo=t61rcWkgMzE");
    let fine = booking("z3", "zb-3", "T1", 1);
    let r = server.post_batch(&[zero, lonely, fine]);
    assert_eq!(r.status, 207, "{}", String::from_utf8_lossy(&r.body));
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["status"], "rejected");
    assert_eq!(results[0]["errors"][0]["pointer"], "/traceparent");
    assert_eq!(results[1]["status"], "rejected");
    assert_eq!(results[1]["errors"][0]["pointer"], "/tracestate");
    assert_eq!(results[2]["status"], "accepted");
}
