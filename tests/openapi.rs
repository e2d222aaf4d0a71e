//! `schemas/openapi.yaml` is kept true by driving every documented operation against the
//! real binary: each answer's status must be documented for its operation, and its body
//! must validate against the documented schema. (`scripts/test` also runs schemathesis
//! against `/openapi.json`.)

mod common;

use std::collections::BTreeSet;

use common::{Resp, Server, booking, envelope, request, wait_for};
use serde_json::{Value, json};

fn written_doc() -> Value {
    serde_json::from_slice(floodgate_ingest::openapi::OPENAPI_JSON).unwrap()
}

/// One JSON-pointer token, as it may appear in a URI fragment.
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0")
        .replace('/', "~1")
        .replace('{', "%7B")
        .replace('}', "%7D")
}

/// Checks that `resp` is documented for `path`/`method` and that its body matches.
fn conforms(doc: &Value, path: &str, method: &str, resp: &Resp) {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let status = resp.status.to_string();
    let mut documented = &op["responses"][&status];
    assert!(
        documented.is_object(),
        "{method} {path} answered {status}, which is not documented: {}",
        String::from_utf8_lossy(&resp.body)
    );
    let mut base = format!(
        "#/paths/{}/{method}/responses/{status}",
        pointer_token(path)
    );
    if let Some(r) = documented["$ref"].as_str() {
        base = r.to_owned();
        documented = doc.pointer(&r[1..]).unwrap();
    }
    let content_type = resp
        .header("content-type")
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let media = &documented["content"][&content_type];
    assert!(
        media.is_object(),
        "{method} {path} {status}: content type {content_type:?} is not documented"
    );
    if content_type.ends_with("json") {
        let mut root = doc.clone();
        root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        root["$ref"] = json!(format!(
            "{base}/content/{}/schema",
            pointer_token(&content_type)
        ));
        let validator = jsonschema::validator_for(&root).unwrap();
        let body: Value = resp.json();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: the body breaks the document: {errors:?}\n{body}"
        );
    }
    for (name, header) in documented["headers"].as_object().into_iter().flatten() {
        let value = resp.header(&name.to_ascii_lowercase());
        if name.eq_ignore_ascii_case("retry-after") || name.eq_ignore_ascii_case("www-authenticate")
        {
            assert!(
                value.is_some(),
                "{method} {path} {status}: header {name} is missing"
            );
        }
        // A header that is sent must hold what the document says it holds.
        let Some(value) = value else { continue };
        let schema_at = match header["$ref"].as_str() {
            Some(r) => format!("{r}/schema"),
            None => format!("{base}/headers/{}/schema", pointer_token(name)),
        };
        let schema = doc.pointer(&schema_at[1..]).unwrap_or(&Value::Null);
        let instance = match schema["type"].as_str() {
            Some("integer") => match value.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => {
                    panic!("{method} {path} {status}: header {name}: {value:?} is not an integer")
                }
            },
            _ => json!(value),
        };
        let mut root = doc.clone();
        root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        root["$ref"] = json!(schema_at);
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: header {name}: {value:?} breaks the document: {errors:?}"
        );
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let doc = written_doc();
    let addr = server.addr;
    let mut driven = BTreeSet::new();
    let mut check = |path: &str, method: &str, resp: Resp| -> Resp {
        conforms(&doc, path, method, &resp);
        driven.insert((path.to_owned(), method.to_owned()));
        resp
    };

    // The served document is schemas/openapi.yaml, with CloudEvent exact per type.
    let served = server.get("/openapi.json");
    let mut served_doc = served.json();
    let exact = served_doc["components"]["schemas"]["CloudEvent"].take();
    let mut written = written_doc();
    written["components"]["schemas"]["CloudEvent"] = Value::Null;
    assert_eq!(served_doc, written);
    let variants: Vec<&str> = exact["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["properties"]["type"]["const"].as_str().unwrap())
        .collect();
    assert!(variants.contains(&"booking.requested"), "{variants:?}");
    assert_eq!(variants.len(), 7);
    check("/openapi.json", "get", served);

    // Events: 200, 207, 422, 400, 415, 413.
    let created = envelope(
        "oa-c",
        "inventory.event.created",
        json!({"eventId":"OA1","name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":10}),
    );
    let r = check("/v1/events", "post", server.post_batch(&[created]));
    assert_eq!(r.status, 200);
    let r = check(
        "/v1/events",
        "post",
        server.post_batch(&[
            booking("oa-b", "OA-B1", "OA1", 2),
            booking("oa-x", "OA-B2", "OA1", 0),
        ]),
    );
    assert_eq!(r.status, 207);
    let r = check(
        "/v1/events",
        "post",
        server.post_batch(&[booking("oa-y", "OA-B3", "OA1", 0)]),
    );
    assert_eq!(r.status, 422);
    let r = check(
        "/v1/events",
        "post",
        server.post(Some("application/json"), b"{nope"),
    );
    assert_eq!(r.status, 400);
    let r = check("/v1/events", "post", server.post(Some("text/plain"), b"{}"));
    assert_eq!(r.status, 415);
    let many: Vec<Value> = (0..501)
        .map(|i| booking(&format!("m{i}"), "B", "E", 1))
        .collect();
    let r = check("/v1/events", "post", server.post_batch(&many));
    assert_eq!(r.status, 413);

    let r = check("/v1/schemas", "get", server.get("/v1/schemas"));
    assert_eq!(r.status, 200);
    let r = check(
        "/v1/schemas/{type}/{version}",
        "get",
        server.get("/v1/schemas/booking.requested/v1"),
    );
    assert_eq!(r.status, 200);
    let r = check(
        "/v1/schemas/{type}/{version}",
        "get",
        server.get("/v1/schemas/nope/v1"),
    );
    assert_eq!(r.status, 404);

    let inv = wait_for(30, "the inventory is applied", || {
        let r = server.get("/v1/inventory/OA1");
        (r.status == 200).then_some(r)
    });
    check("/v1/inventory/{eventId}", "get", inv);
    check(
        "/v1/inventory/{eventId}",
        "get",
        server.get("/v1/inventory/none"),
    );
    let b = wait_for(30, "the booking is decided", || {
        let r = server.get("/v1/bookings/OA-B1");
        (r.status == 200).then_some(r)
    });
    assert_eq!(b.json()["status"], "confirmed");
    check("/v1/bookings/{bookingId}", "get", b);
    check(
        "/v1/bookings/{bookingId}",
        "get",
        server.get("/v1/bookings/none"),
    );

    for p in ["/healthz", "/readyz", "/metrics"] {
        let r = check(p, "get", server.get(p));
        assert_eq!(r.status, 200, "{p}");
    }
    // An undocumented method gets 405 with Allow; an unknown path 404.
    let r = request(addr, "DELETE", "/v1/events", &[], None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(request(addr, "GET", "/nope", &[], None).status, 404);

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (p.clone(), m.clone()))
        })
        .collect();
    assert_eq!(driven, documented, "every documented operation is driven");
}

/// The answers a credential, its allowed types and rate, and a full edge give: 401, 403, 429
/// and 503, each as documented (status, content type, headers and their values, body).
#[test]
fn refusals_answer_as_documented() {
    use floodgate_ingest::auth::sha256_hex;
    const LIMITED: &str = "fg_openapi_limited";
    const OPS: &str = "fg_openapi_ops";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    // Requests in memory are bounded by one largest request (its body, its state and its
    // ten events' state), so that a compressed body (held while it inflates) over half
    // that size finds no room: 503.
    std::fs::write(
        &config,
        format!(
            "[ingest]\nmax_body_bytes = 65536\nmax_batch_events = 10\nmax_inflight_body_bytes = 87040\n\
             [ingest.auth]\nrequired = true\n\
             [[ingest.auth.api_keys]]\nname = \"limited\"\nkey_sha256 = \"{}\"\n\
             allowed_types = [\"booking.*\"]\nrate_per_sec = 1\nburst = 2\n\
             [[ingest.auth.api_keys]]\nname = \"ops\"\nkey_sha256 = \"{}\"\n",
            sha256_hex(LIMITED),
            sha256_hex(OPS)
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let doc = written_doc();
    let addr = server.addr;
    let batch = |events: &[Value], headers: &[(&str, &str)]| {
        common::post(
            addr,
            "/v1/events",
            Some("application/cloudevents-batch+json"),
            &serde_json::to_vec(events).unwrap(),
            headers,
        )
    };
    let limited = [("x-api-key", LIMITED)];
    let ops = [("x-api-key", OPS)];

    // 401: no credential, or one that is not known; on the state API too.
    for headers in [
        &[][..],
        &[("x-api-key", "fg_nope")],
        &[("authorization", "Bearer fg_nope")],
    ] {
        let r = batch(&[booking("u1", "U-B1", "U1", 1)], headers);
        assert_eq!(r.status, 401, "{headers:?}: {r:?}");
        conforms(&doc, "/v1/events", "post", &r);
    }
    for (path, template) in [
        ("/v1/inventory/U1", "/v1/inventory/{eventId}"),
        ("/v1/bookings/U-B1", "/v1/bookings/{bookingId}"),
    ] {
        let r = request(addr, "GET", path, &[], None);
        assert_eq!(r.status, 401, "{path}: {r:?}");
        conforms(&doc, template, "get", &r);
    }

    // 403: a type the key may not post.
    let checkin = envelope(
        "f1",
        "checkin.scanned",
        json!({"bookingId":"U-B1","eventId":"U1","gate":"A","scannedAt":"2026-11-22T10:00:00Z"}),
    );
    let r = batch(&[checkin], &limited);
    assert_eq!(r.status, 403, "{r:?}");
    conforms(&doc, "/v1/events", "post", &r);

    // 429: over the key's rate (1 event/s, burst 2). Two events at a time empty the
    // bucket; whatever passes on the way is checked too.
    let mut sent = 0;
    wait_for(30, "a 429", || {
        sent += 1;
        let r = batch(
            &[
                booking(&format!("l{sent}a"), &format!("L-{sent}a"), "U1", 1),
                booking(&format!("l{sent}b"), &format!("L-{sent}b"), "U1", 1),
            ],
            &limited,
        );
        assert!(matches!(r.status, 200 | 429), "{r:?}");
        conforms(&doc, "/v1/events", "post", &r);
        (r.status == 429).then_some(())
    });

    // 503: a gzip body of incompressible bytes, held while it inflates, passes the budget
    // for bodies in memory.
    let mut noise = Vec::with_capacity(48 * 1024);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while noise.len() < 48 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &noise).unwrap();
    let body = gz.finish().unwrap();
    let r = common::post(
        addr,
        "/v1/events",
        Some("application/cloudevents-batch+json"),
        &body,
        &[ops[0], ("content-encoding", "gzip")],
    );
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "inflight_bytes", "{r:?}");
    conforms(&doc, "/v1/events", "post", &r);
}
