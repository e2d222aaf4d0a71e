//! The edge's hostile-input corpus: requests no producer should send, each with the answer
//! the edge documents for it. `tests/hostile_corpus.rs` (in the `floodgate` package, which
//! owns the binary) sends every case to the real binary.
//!
//! No case holds a valid event, so after the whole corpus the stream must be empty.
//!
//! Expectations follow the documented rules, not observed behaviour:
//! - a body that is not JSON, not UTF-8, or nested deeper than 128 → 400 (`invalid_json`,
//!   `invalid_utf8`); an empty one → 400 `empty_body`
//! - a JSON body whose events break the envelope or their schema → 422 with a JSON body
//!   (`application/json`), each event `rejected` with the pointer of every fault: a case
//!   names the exact set of pointers, so a missing or an extra one fails it (duplicate
//!   member names included)
//! - too big (bytes after decompression, or events) → 413; unknown media type or
//!   encoding → 415; a body that never finishes → 408
//! - HTTP-level faults (header floods, bad framing, NUL in a header) are refused by the
//!   HTTP layer itself: 4xx without a JSON body, or the connection is closed

#![allow(dead_code)]

use serde_json::{Value, json};

/// What the edge must answer.
#[derive(Debug, Clone)]
pub enum Expect {
    /// A whole-request error: this status and `error.code`.
    Error(u16, &'static str),
    /// 422 with a JSON body; every event rejected, with errors whose pointers are exactly
    /// this set (sorted, no repeats; `""` is the whole event).
    Rejected(Vec<String>),
    /// Refused by the HTTP layer: this status (no JSON body required).
    Protocol(u16),
    /// The HTTP layer closes the connection, or answers with one of these statuses.
    ClosedOr(&'static [u16]),
}

/// How the request goes on the wire.
#[derive(Debug, Clone)]
pub enum Wire {
    /// A whole HTTP/1.1 request; `Content-Length` is added unless a header sets framing.
    Request {
        method: &'static str,
        path: String,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    },
    /// These bytes, then silence: the server must answer or close on its own.
    Stall(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub wire: Wire,
    pub expect: Expect,
}

pub const BATCH: &str = "application/cloudevents-batch+json";
pub const SINGLE: &str = "application/cloudevents+json";
pub const JSON: &str = "application/json";
pub const NDJSON: &str = "application/x-ndjson";

fn post(ct: &str, body: impl Into<Vec<u8>>) -> Wire {
    post_with(vec![("content-type".into(), ct.as_bytes().to_vec())], body)
}

fn post_with(headers: Vec<(String, Vec<u8>)>, body: impl Into<Vec<u8>>) -> Wire {
    Wire::Request {
        method: "POST",
        path: "/v1/events".into(),
        headers,
        body: body.into(),
    }
}

fn case(name: impl Into<String>, wire: Wire, expect: Expect) -> Case {
    Case {
        name: name.into(),
        wire,
        expect,
    }
}

/// 422; the event's one fault is at `pointer`.
fn rejected(pointer: &str) -> Expect {
    rejected_at(&[pointer])
}

/// 422; the event's faults are at exactly these pointers.
fn rejected_at(pointers: &[&str]) -> Expect {
    let mut all: Vec<String> = pointers.iter().map(|p| (*p).to_owned()).collect();
    all.sort();
    all.dedup();
    Expect::Rejected(all)
}

/// A valid `booking.requested`; every case breaks it (or its framing) somehow.
pub fn good() -> Value {
    json!({"specversion":"1.0","id":"hostile-1","source":"/corpus","type":"booking.requested",
           "time":"2026-11-22T10:00:00Z",
           "data":{"bookingId":"B1","eventId":"E1","customerId":"C1","seats":2,
                   "requestedAt":"2026-11-22T10:00:00Z"}})
}

fn with(pointer: &str, value: Value) -> Value {
    let mut e = good();
    set(&mut e, pointer, value);
    e
}

fn without(pointer: &str) -> Value {
    let mut e = good();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    e.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    e
}

fn set(e: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    e.pointer_mut(parent).unwrap()[key] = value;
}

fn one(e: &Value) -> Vec<u8> {
    serde_json::to_vec(e).unwrap()
}

/// One valid-looking event (as text) with `piece` spliced in place of the `"B1"` booking id.
fn splice(piece: &[u8]) -> Vec<u8> {
    let text = serde_json::to_string(&good()).unwrap();
    let at = text.find("\"B1\"").unwrap();
    let mut out = text.as_bytes()[..at].to_vec();
    out.extend_from_slice(piece);
    out.extend_from_slice(&text.as_bytes()[at + 4..]);
    out
}

/// Every case, in a fixed order.
pub fn all() -> Vec<Case> {
    let mut c = Vec::new();
    malformed_json(&mut c);
    malformed_utf8(&mut c);
    deep_nesting(&mut c);
    huge_values(&mut c);
    duplicate_keys(&mut c);
    nul_and_controls(&mut c);
    content_types(&mut c);
    encodings(&mut c);
    lookalikes(&mut c);
    envelope_faults(&mut c);
    schema_faults(&mut c);
    shapes_and_sizes(&mut c);
    routes(&mut c);
    binary_mode(&mut c);
    framing_and_floods(&mut c);
    c
}

fn malformed_json(c: &mut Vec<Case>) {
    let texts: &[&str] = &[
        "{",
        "}",
        "{\"specversion\":\"1.0\"",
        "{\"specversion\":}",
        "{\"specversion\" \"1.0\"}",
        "{specversion:\"1.0\"}",
        "{'specversion':'1.0'}",
        "{\"a\":1,}",
        "{\"a\":1,,\"b\":2}",
        "{\"a\":NaN}",
        "{\"a\":Infinity}",
        "{\"a\":-Infinity}",
        "{\"a\":undefined}",
        "{\"a\":01}",
        "{\"a\":1.}",
        "{\"a\":.5}",
        "{\"a\":+1}",
        "{\"a\":-}",
        "{\"a\":1e}",
        "{\"a\":0x10}",
        "{\"a\":\"\\x41\"}",
        "{\"a\":\"\\u12\"}",
        "{\"a\":\"\\ud800\"}",
        "{\"a\":\"unterminated}",
        "{\"a\":tru}",
        "{\"a\":nul}",
        "{\"a\":1} {\"b\":2}",
        "{\"a\":1} trailing",
        "{/* comment */}",
        "{\"a\":1 // comment\n}",
        "{\"a\":[1,2}",
        "{\"a\":{\"b\":1]}",
        "\"just a string",
        "{\"a\":\"tab\there\"}",
    ];
    for (i, t) in texts.iter().enumerate() {
        c.push(case(
            format!("malformed json #{i} (single): {t}"),
            post(SINGLE, *t),
            Expect::Error(400, "invalid_json"),
        ));
    }
    for (i, t) in [
        "[",
        "]",
        "[{\"a\":1},]",
        "[,{\"a\":1}]",
        "[{\"a\":1}{\"b\":2}]",
        "[{\"a\":1}] [{\"b\":2}]",
        "[{\"a\":}]",
        "[{\"a\":1}",
        "[1,2,3",
        "[{\"id\":\"x\"},,]",
    ]
    .iter()
    .enumerate()
    {
        c.push(case(
            format!("malformed json #{i} (batch): {t}"),
            post(BATCH, *t),
            Expect::Error(400, "invalid_json"),
        ));
    }
    c.push(case(
        "every ndjson line malformed",
        post(NDJSON, "{\n}\n{\"a\":\n"),
        Expect::Error(400, "invalid_json"),
    ));
}

fn malformed_utf8(c: &mut Vec<Case>) {
    let seqs: &[(&str, &[u8])] = &[
        ("lone continuation", b"\"\x80\""),
        ("0xff", b"\"\xff\""),
        ("0xfe", b"\"\xfe\""),
        ("overlong slash", b"\"\xc0\xaf\""),
        ("overlong nul", b"\"\xc0\x80\""),
        ("encoded surrogate", b"\"\xed\xa0\x80\""),
        ("truncated 2-byte", b"\"\xc3\""),
        ("truncated 3-byte", b"\"\xe2\x82\""),
        ("truncated 4-byte", b"\"\xf0\x9f\x98\""),
        ("above U+10FFFF", b"\"\xf4\x90\x80\x80\""),
        ("5-byte form", b"\"\xf8\x88\x80\x80\x80\""),
        ("latin-1 e-acute", b"\"caf\xe9\""),
    ];
    for (name, seq) in seqs {
        c.push(case(
            format!("malformed utf-8: {name} (single)"),
            post(SINGLE, splice(seq)),
            Expect::Error(400, "invalid_utf8"),
        ));
        let mut batch = b"[".to_vec();
        batch.extend(splice(seq));
        batch.push(b']');
        c.push(case(
            format!("malformed utf-8: {name} (batch)"),
            post(BATCH, batch),
            Expect::Error(400, "invalid_utf8"),
        ));
    }
    c.push(case(
        "malformed utf-8 in an ndjson line",
        post(NDJSON, splice(b"\"\xff\"")),
        Expect::Error(400, "invalid_utf8"),
    ));
    let mut utf16 = vec![0xff, 0xfe];
    for u in serde_json::to_string(&good()).unwrap().encode_utf16() {
        utf16.extend_from_slice(&u.to_le_bytes());
    }
    c.push(case(
        "utf-16 body",
        post(SINGLE, utf16),
        Expect::Error(400, "invalid_utf8"),
    ));
}

fn deep_nesting(c: &mut Vec<Case>) {
    let arrays = |n: usize| "[".repeat(n) + &"]".repeat(n);
    let objects = |n: usize| "{\"a\":".repeat(n) + "1" + &"}".repeat(n);
    for n in [129, 1_000, 10_000, 100_000] {
        c.push(case(
            format!("{n}-deep arrays (batch)"),
            post(BATCH, arrays(n)),
            Expect::Error(400, "invalid_json"),
        ));
        c.push(case(
            format!("{n}-deep objects (single)"),
            post(SINGLE, objects(n)),
            Expect::Error(400, "invalid_json"),
        ));
    }
    for n in [200, 10_000] {
        let text = serde_json::to_string(&good())
            .unwrap()
            .replace("\"seats\":2", &format!("\"seats\":{}", arrays(n)));
        c.push(case(
            format!("{n}-deep arrays in data (single)"),
            post(SINGLE, text.clone()),
            Expect::Error(400, "invalid_json"),
        ));
        c.push(case(
            format!("{n}-deep arrays in data (json)"),
            post(JSON, text.clone()),
            Expect::Error(400, "invalid_json"),
        ));
        c.push(case(
            format!("{n}-deep arrays in data (ndjson)"),
            post(NDJSON, text),
            Expect::Error(400, "invalid_json"),
        ));
    }
    // Deep, but within the parser's limit: the schema refuses it.
    let text = serde_json::to_string(&good())
        .unwrap()
        .replace("\"seats\":2", &format!("\"seats\":{}", arrays(100)));
    c.push(case(
        "100-deep arrays as seats",
        post(SINGLE, text),
        rejected("/data/seats"),
    ));
    let text = serde_json::to_string(&good())
        .unwrap()
        .replace("\"time\"", &format!("\"deep\":{},\"time\"", objects(100)));
    c.push(case(
        "100-deep object as an extension",
        post(SINGLE, text),
        rejected("/deep"),
    ));
}

fn huge_values(c: &mut Vec<Case>) {
    for (name, num) in [
        ("1e400", "1e400"),
        ("-1e400", "-1e400"),
        ("1e999999", "1e999999"),
    ] {
        let text = serde_json::to_string(&good())
            .unwrap()
            .replace("\"seats\":2", &format!("\"seats\":{num}"));
        c.push(case(
            format!("number out of range: {name}"),
            post(SINGLE, text),
            Expect::Error(400, "invalid_json"),
        ));
    }
    for (name, num) in [
        ("1e20", "1e20"),
        ("-1e20", "-1e20"),
        ("2^64", "18446744073709551616"),
        ("30 digits", "123456789012345678901234567890"),
        ("-2^63-1", "-9223372036854775809"),
        ("1.5", "1.5"),
        ("tiny", "1e-300"),
        ("negative zero", "-0"),
        ("21", "21"),
    ] {
        let text = serde_json::to_string(&good())
            .unwrap()
            .replace("\"seats\":2", &format!("\"seats\":{num}"));
        c.push(case(
            format!("seats out of range: {name}"),
            post(SINGLE, text),
            rejected("/data/seats"),
        ));
    }
    for (name, num) in [
        ("2^31", "2147483648"),
        ("-2^31-1", "-2147483649"),
        ("1.5", "1.5"),
    ] {
        let text = serde_json::to_string(&good())
            .unwrap()
            .replace("\"time\"", &format!("\"ext\":{num},\"time\""));
        c.push(case(
            format!("extension integer out of range: {name}"),
            post(SINGLE, text),
            rejected("/ext"),
        ));
    }
    let mega = "x".repeat(1 << 20);
    for pointer in [
        "/type",
        "/specversion",
        "/data/bookingId",
        "/data/customerId",
    ] {
        c.push(case(
            format!("1 MiB string at {pointer}"),
            post(SINGLE, one(&with(pointer, json!(mega)))),
            rejected(pointer),
        ));
    }
    c.push(case(
        "1 MiB extension name",
        post(
            SINGLE,
            serde_json::to_string(&good()).unwrap().replace(
                "\"time\"",
                &format!("\"{}\":1,\"time\"", "a".repeat(1 << 20)),
            ),
        ),
        // RFC 6901 names the member whole, so the pointer is as long as the name.
        rejected(&format!("/{}", "a".repeat(1 << 20))),
    ));
}

fn duplicate_keys(c: &mut Vec<Case>) {
    let text = serde_json::to_string(&good()).unwrap();
    let dups = [
        (
            "id",
            text.replace(
                "\"id\":\"hostile-1\"",
                "\"id\":\"hostile-1\",\"id\":\"other\"",
            ),
            "/id",
        ),
        (
            "type",
            text.replace(
                "\"type\":\"booking.requested\"",
                "\"type\":\"booking.cancelled\",\"type\":\"booking.requested\"",
            ),
            "/type",
        ),
        (
            "specversion",
            text.replace(
                "\"specversion\":\"1.0\"",
                "\"specversion\":\"1.0\",\"specversion\":\"1.0\"",
            ),
            "/specversion",
        ),
        (
            "data",
            text.replace("\"data\":", "\"data\":{},\"data\":"),
            "/data",
        ),
        (
            "seats",
            text.replace("\"seats\":2", "\"seats\":2,\"seats\":2000"),
            "/data/seats",
        ),
        (
            "bookingId",
            text.replace(
                "\"bookingId\":\"B1\"",
                "\"bookingId\":\"B1\",\"bookingId\":\"B2\"",
            ),
            "/data/bookingId",
        ),
        (
            "source",
            text.replace(
                "\"source\":\"/corpus\"",
                "\"source\":\"/a\",\"source\":\"/corpus\"",
            ),
            "/source",
        ),
    ];
    for (name, body, pointer) in dups {
        c.push(case(
            format!("duplicate member {name} (single)"),
            post(SINGLE, body.clone()),
            rejected(pointer),
        ));
        c.push(case(
            format!("duplicate member {name} (batch)"),
            post(BATCH, format!("[{body}]")),
            rejected(pointer),
        ));
        c.push(case(
            format!("duplicate member {name} (ndjson)"),
            post(NDJSON, body),
            rejected(pointer),
        ));
    }
}

fn nul_and_controls(c: &mut Vec<Case>) {
    let text = serde_json::to_string(&good()).unwrap();
    c.push(case(
        "raw NUL between members",
        post(SINGLE, text.replacen(',', ",\0", 1)),
        Expect::Error(400, "invalid_json"),
    ));
    c.push(case(
        "raw NUL inside a string",
        post(SINGLE, text.replace("hostile-1", "hostile\0-1")),
        Expect::Error(400, "invalid_json"),
    ));
    c.push(case(
        "raw NUL body",
        post(SINGLE, vec![0u8; 64]),
        Expect::Error(400, "invalid_json"),
    ));
    for pointer in [
        "/id",
        "/source",
        "/type",
        "/subject",
        "/ext",
        "/partitionkey",
    ] {
        for (name, ch) in [
            ("NUL", "\u{0}"),
            ("ESC", "\u{1b}"),
            ("DEL", "\u{7f}"),
            ("C1 NEL", "\u{85}"),
            ("noncharacter U+FFFE", "\u{fffe}"),
        ] {
            c.push(case(
                format!("{name} in {pointer}"),
                post(SINGLE, one(&with(pointer, json!(format!("a{ch}b"))))),
                rejected(pointer),
            ));
        }
    }
}

fn content_types(c: &mut Vec<Case>) {
    let body = one(&with("/data/seats", json!(0)));
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/cloudevents+xml",
        "application/cloudevents+protobuf",
        "application/jsonx",
        "application/json-seq",
        "json",
        "",
        "*/*",
        "application/*",
        "text/json",
        "application/octet-stream",
    ] {
        c.push(case(
            format!("content type {ct:?}"),
            post(ct, body.clone()),
            Expect::Error(415, "unsupported_media_type"),
        ));
    }
    c.push(case(
        "no content type",
        post_with(Vec::new(), body.clone()),
        Expect::Error(415, "unsupported_media_type"),
    ));
    c.push(case(
        "8 KiB content type",
        post(&format!("application/{}", "x".repeat(8192)), body.clone()),
        Expect::Error(415, "unsupported_media_type"),
    ));
    c.push(case(
        "content type with a Cyrillic j",
        post_with(
            vec![(
                "content-type".into(),
                "application/јson".as_bytes().to_vec(),
            )],
            body.clone(),
        ),
        Expect::Error(415, "unsupported_media_type"),
    ));
    c.push(case(
        "content type with a Latin-1 byte",
        post_with(
            vec![("content-type".into(), b"application/json\xe9".to_vec())],
            body,
        ),
        Expect::Error(415, "unsupported_media_type"),
    ));
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 19).unwrap()
}

fn encoded(encoding: &[u8], body: Vec<u8>) -> Wire {
    post_with(
        vec![
            ("content-type".into(), SINGLE.as_bytes().to_vec()),
            ("content-encoding".into(), encoding.to_vec()),
        ],
        body,
    )
}

fn encodings(c: &mut Vec<Case>) {
    let bad_event = one(&with("/data/seats", json!(0)));
    for enc in [
        &b"br"[..],
        b"deflate",
        b"compress",
        b"gzip, zstd",
        b"zstd, gzip",
        b"identity, gzip",
        b"lz4",
        b"snappy",
        b"gzip\xff",
        b"\xc3\xa9",
    ] {
        c.push(case(
            format!("content encoding {:?}", String::from_utf8_lossy(enc)),
            encoded(enc, bad_event.clone()),
            Expect::Error(415, "unsupported_content_encoding"),
        ));
    }
    let gz = gzip(&bad_event);
    c.push(case(
        "corrupt gzip",
        encoded(b"gzip", b"\x1f\x8b\x08\x00garbage-garbage-garbage".to_vec()),
        Expect::Error(400, "invalid_content_encoding"),
    ));
    c.push(case(
        "truncated gzip",
        encoded(b"gzip", gz[..gz.len() / 2].to_vec()),
        Expect::Error(400, "invalid_content_encoding"),
    ));
    c.push(case(
        "gzip header on a plain body",
        encoded(b"gzip", bad_event.clone()),
        Expect::Error(400, "invalid_content_encoding"),
    ));
    c.push(case(
        "corrupt zstd",
        encoded(b"zstd", b"\x28\xb5\x2f\xfdgarbage-garbage".to_vec()),
        Expect::Error(400, "invalid_content_encoding"),
    ));
    c.push(case(
        "zstd header on a plain body",
        encoded(b"zstd", bad_event.clone()),
        Expect::Error(400, "invalid_content_encoding"),
    ));
    c.push(case(
        "gzip bomb: 64 MiB of zeros",
        encoded(b"gzip", gzip(&vec![0u8; 64 << 20])),
        Expect::Error(413, "body_too_large"),
    ));
    c.push(case(
        "zstd bomb: 256 MiB of zeros",
        encoded(b"zstd", zstd(&vec![0u8; 256 << 20])),
        Expect::Error(413, "body_too_large"),
    ));
    c.push(case(
        "gzip bomb of JSON whitespace",
        encoded(b"gzip", gzip(&vec![b' '; 32 << 20])),
        Expect::Error(413, "body_too_large"),
    ));
    c.push(case(
        "gzip inside gzip",
        encoded(b"gzip", gzip(&gz)),
        Expect::Error(400, "invalid_utf8"),
    ));
    c.push(case(
        "gzip of malformed JSON",
        encoded(b"gzip", gzip(b"{\"a\":")),
        Expect::Error(400, "invalid_json"),
    ));
    c.push(case(
        "zstd of invalid UTF-8",
        encoded(b"zstd", zstd(&splice(b"\"\xff\""))),
        Expect::Error(400, "invalid_utf8"),
    ));
    c.push(case(
        "gzip of an invalid event",
        encoded(b"gzip", gz),
        rejected("/data/seats"),
    ));
}

fn lookalikes(c: &mut Vec<Case>) {
    let cases: &[(&str, &str, &str)] = &[
        ("Cyrillic o in type", "/type", "b\u{43e}oking.requested"),
        ("Cyrillic e in type", "/type", "booking.r\u{435}quested"),
        ("fullwidth dot in type", "/type", "booking\u{ff0e}requested"),
        (
            "zero-width space in type",
            "/type",
            "booking.\u{200b}requested",
        ),
        (
            "zero-width joiner in type",
            "/type",
            "booking\u{200d}.requested",
        ),
        (
            "right-to-left override in type",
            "/type",
            "\u{202e}booking.requested",
        ),
        ("trailing space in type", "/type", "booking.requested "),
        ("upper case type", "/type", "Booking.Requested"),
        (
            "combining dot in type",
            "/type",
            "booking.requeste\u{0323}d",
        ),
        (
            "Arabic-Indic digits in specversion",
            "/specversion",
            "\u{661}.\u{660}",
        ),
        ("fullwidth dot in specversion", "/specversion", "1\u{ff0e}0"),
        (
            "one dot leader in specversion",
            "/specversion",
            "1\u{2024}0",
        ),
        ("Cyrillic B in bookingId", "/data/bookingId", "\u{412}1"),
        ("fullwidth digit in eventId", "/data/eventId", "E\u{ff11}"),
        (
            "Greek omicron in customerId",
            "/data/customerId",
            "C\u{3bf}1",
        ),
        ("dotless i in bookingId", "/data/bookingId", "B\u{131}1"),
        (
            "non-breaking hyphen in bookingId",
            "/data/bookingId",
            "B\u{2011}1",
        ),
        (
            "capital I for l in dataschema",
            "/dataschema",
            "https://schemas.fIoodgate.dev/booking.requested/v1.json",
        ),
        (
            "Cyrillic a in dataschema",
            "/dataschema",
            "https://schemas.floodg\u{430}te.dev/booking.requested/v1.json",
        ),
        (
            "superscript digits in requestedAt",
            "/data/requestedAt",
            "2026-11-22T10:00:00\u{b2}",
        ),
        (
            "fullwidth digits in requestedAt",
            "/data/requestedAt",
            "\u{ff12}026-11-22T10:00:00Z",
        ),
    ];
    for (name, pointer, value) in cases {
        c.push(case(
            format!("lookalike: {name}"),
            post(SINGLE, one(&with(pointer, json!(value)))),
            rejected(pointer),
        ));
    }
    for (name, ext) in [
        ("Cyrillic e in an extension name", "partitionk\u{435}y"),
        ("Kelvin sign in an extension name", "\u{212a}ey"),
    ] {
        let mut e = good();
        e[ext] = json!("x");
        c.push(case(
            format!("lookalike: {name}"),
            post(SINGLE, one(&e)),
            rejected(&format!("/{ext}")),
        ));
    }
}

fn envelope_faults(c: &mut Vec<Case>) {
    let long_name = format!("/{}", "a".repeat(65));
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no specversion", without("/specversion"), "/specversion"),
        (
            "specversion 0.3",
            with("/specversion", json!("0.3")),
            "/specversion",
        ),
        (
            "specversion 1",
            with("/specversion", json!(1)),
            "/specversion",
        ),
        (
            "specversion 1.0.0",
            with("/specversion", json!("1.0.0")),
            "/specversion",
        ),
        ("no id", without("/id"), "/id"),
        ("empty id", with("/id", json!("")), "/id"),
        ("numeric id", with("/id", json!(7)), "/id"),
        ("object id", with("/id", json!({"a": 1})), "/id"),
        ("no source", without("/source"), "/source"),
        ("empty source", with("/source", json!("")), "/source"),
        (
            "source with a space",
            with("/source", json!("/a b")),
            "/source",
        ),
        ("array source", with("/source", json!(["/a"])), "/source"),
        ("no type", without("/type"), "/type"),
        ("numeric type", with("/type", json!(1)), "/type"),
        (
            "unknown type",
            with("/type", json!("booking.exploded")),
            "/type",
        ),
        (
            "time not RFC 3339",
            with("/time", json!("yesterday")),
            "/time",
        ),
        (
            "time month 13",
            with("/time", json!("2026-13-01T00:00:00Z")),
            "/time",
        ),
        (
            "time without zone",
            with("/time", json!("2026-11-22T10:00:00")),
            "/time",
        ),
        ("numeric time", with("/time", json!(1732269600)), "/time"),
        ("empty subject", with("/subject", json!("")), "/subject"),
        (
            "datacontenttype xml",
            with("/datacontenttype", json!("application/xml")),
            "/datacontenttype",
        ),
        (
            "unknown dataschema",
            with("/dataschema", json!("https://example.com/x.json")),
            "/dataschema",
        ),
        (
            "upper-case extension name",
            with("/Ext", json!("x")),
            "/Ext",
        ),
        (
            "dashed extension name",
            with("/my-ext", json!("x")),
            "/my-ext",
        ),
        (
            "65-character extension name",
            with(&long_name, json!("x")),
            &long_name,
        ),
        ("object extension", with("/ext", json!({"a": 1})), "/ext"),
        ("array extension", with("/ext", json!([1])), "/ext"),
        (
            "empty partitionkey",
            with("/partitionkey", json!("")),
            "/partitionkey",
        ),
        (
            "257-character partitionkey",
            with("/partitionkey", json!("k".repeat(257))),
            "/partitionkey",
        ),
        // The key rule counts bytes of UTF-8 (the log's), not characters.
        (
            "partitionkey of 129 two-byte characters (258 bytes)",
            with("/partitionkey", json!("é".repeat(129))),
            "/partitionkey",
        ),
        (
            "partitionkey of 256 two-byte characters",
            with("/partitionkey", json!("é".repeat(256))),
            "/partitionkey",
        ),
        (
            "numeric partitionkey",
            with("/partitionkey", json!(5)),
            "/partitionkey",
        ),
        (
            "data and data_base64",
            with("/data_base64", json!("AAAA")),
            "/data_base64",
        ),
        (
            "numeric data_base64",
            {
                let mut e = without("/data");
                e["data_base64"] = json!(5);
                e
            },
            "/data_base64",
        ),
        ("no data", without("/data"), "/data"),
        ("null data", with("/data", Value::Null), "/data"),
        ("string data", with("/data", json!("B1")), "/data"),
    ];
    for (name, event, pointer) in cases {
        c.push(case(
            format!("envelope: {name}"),
            post(SINGLE, one(&event)),
            rejected(pointer),
        ));
    }
}

fn schema_faults(c: &mut Vec<Case>) {
    let types: &[(&str, Value)] = &[
        ("booking.requested", good()["data"].clone()),
        (
            "booking.cancelled",
            json!({"bookingId":"B1","eventId":"E1","reason":"r"}),
        ),
        (
            "checkin.scanned",
            json!({"bookingId":"B1","eventId":"E1","gate":"A","scannedAt":"2026-11-22T10:00:00Z"}),
        ),
        (
            "inventory.capacity.changed",
            json!({"eventId":"E1","capacity":10}),
        ),
        (
            "inventory.event.created",
            json!({"eventId":"E1","name":"n","venue":"v","startsAt":"2026-11-22T10:00:00Z","capacity":10}),
        ),
        (
            "payment.failed",
            json!({"paymentId":"P1","bookingId":"B1","eventId":"E1","code":"x"}),
        ),
        (
            "payment.succeeded",
            json!({"paymentId":"P1","bookingId":"B1","eventId":"E1","amountMinor":5,"currency":"EUR"}),
        ),
    ];
    for (ty, data) in types {
        for (field, value) in data.as_object().unwrap() {
            let wrong = match value {
                Value::String(_) => json!(12345),
                _ => json!("12"),
            };
            let mut e = good();
            e["type"] = json!(ty);
            e["data"] = data.clone();
            e["data"][field] = wrong;
            c.push(case(
                format!("{ty}: {field} of the wrong type"),
                post(SINGLE, one(&e)),
                rejected(&format!("/data/{field}")),
            ));
        }
        let mut e = good();
        e["type"] = json!(ty);
        e["data"] = data.clone();
        e["data"]["unexpected"] = json!(1);
        c.push(case(
            format!("{ty}: an unknown field"),
            post(SINGLE, one(&e)),
            rejected("/data/unexpected"),
        ));
        let mut e = good();
        e["type"] = json!(ty);
        e["data"] = data.clone();
        e["data"].as_object_mut().unwrap().remove("eventId");
        // A missing member is named by the pointer it would have.
        c.push(case(
            format!("{ty}: no eventId"),
            post(SINGLE, one(&e)),
            rejected("/data/eventId"),
        ));
    }
}

fn shapes_and_sizes(c: &mut Vec<Case>) {
    for ct in [SINGLE, BATCH, JSON, NDJSON] {
        c.push(case(
            format!("empty body ({ct})"),
            post(ct, ""),
            Expect::Error(400, "empty_body"),
        ));
        c.push(case(
            format!("whitespace body ({ct})"),
            post(ct, " \r\n\t \n"),
            Expect::Error(400, "empty_body"),
        ));
    }
    c.push(case(
        "a batch sent as one event",
        post(
            SINGLE,
            format!(
                "[{}]",
                serde_json::to_string(&with("/data/seats", json!(0))).unwrap()
            ),
        ),
        Expect::Error(400, "invalid_body_shape"),
    ));
    c.push(case(
        "one event sent as a batch",
        post(BATCH, one(&with("/data/seats", json!(0)))),
        Expect::Error(400, "invalid_json"),
    ));
    for (name, body) in [
        ("null", "null"),
        ("string", "\"event\""),
        ("number", "42"),
        ("true", "true"),
    ] {
        c.push(case(
            format!("a bare {name} as the event"),
            post(SINGLE, body),
            rejected(""),
        ));
        c.push(case(
            format!("a bare {name} in a batch"),
            post(BATCH, format!("[{body}]")),
            rejected(""),
        ));
    }
    // Every required attribute is missing; `data` is not named, as no type says it is due.
    c.push(case(
        "{} as the event",
        post(SINGLE, "{}"),
        rejected_at(&["/id", "/source", "/specversion", "/type"]),
    ));
    let bad = serde_json::to_string(&with("/data/seats", json!(0))).unwrap();
    let many = format!("[{}]", vec![bad.as_str(); 501].join(","));
    c.push(case(
        "501 events in a batch",
        post(BATCH, many),
        Expect::Error(413, "too_many_events"),
    ));
    c.push(case(
        "501 ndjson lines",
        post(NDJSON, vec![bad.as_str(); 501].join("\n")),
        Expect::Error(413, "too_many_events"),
    ));
    c.push(case(
        "6 MiB body",
        post(
            SINGLE,
            with("/data/customerId", json!("x".repeat(6 << 20))).to_string(),
        ),
        Expect::Error(413, "body_too_large"),
    ));
}

fn routes(c: &mut Vec<Case>) {
    let bad = one(&with("/data/seats", json!(0)));
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        c.push(case(
            format!("{method} /v1/events"),
            Wire::Request {
                method,
                path: "/v1/events".into(),
                headers: vec![("content-type".into(), SINGLE.as_bytes().to_vec())],
                body: bad.clone(),
            },
            Expect::Error(405, "method_not_allowed"),
        ));
    }
    for path in [
        "/v1/events/",
        "/v1/EVENTS",
        "/v1/events/../../etc/passwd",
        "/v1/%65vents",
        "/v2/events",
        "//v1/events",
    ] {
        c.push(case(
            format!("POST {path}"),
            Wire::Request {
                method: "POST",
                path: path.into(),
                headers: vec![("content-type".into(), SINGLE.as_bytes().to_vec())],
                body: bad.clone(),
            },
            Expect::Error(404, "not_found"),
        ));
    }
    for path in [
        "/v1/schemas/../../../etc/passwd/v1",
        "/v1/schemas/booking.requested/v99",
        "/v1/schemas/%00/v1",
    ] {
        c.push(case(
            format!("GET {path}"),
            Wire::Request {
                method: "GET",
                path: path.into(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            Expect::Error(404, "schema_not_found"),
        ));
    }
}

fn binary_mode(c: &mut Vec<Case>) {
    let headers = |extra: &[(&str, &[u8])]| -> Vec<(String, Vec<u8>)> {
        let mut h: Vec<(String, Vec<u8>)> = vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("ce-specversion".into(), b"1.0".to_vec()),
            ("ce-id".into(), b"bin-1".to_vec()),
            ("ce-source".into(), b"/corpus".to_vec()),
            ("ce-type".into(), b"booking.requested".to_vec()),
        ];
        for (k, v) in extra {
            h.retain(|(name, _)| name != k);
            h.push(((*k).to_owned(), v.to_vec()));
        }
        h
    };
    let data = serde_json::to_vec(&good()["data"]).unwrap();
    c.push(case(
        "binary mode: malformed JSON data",
        post_with(headers(&[]), b"{\"bookingId\":".to_vec()),
        Expect::Error(400, "invalid_json"),
    ));
    c.push(case(
        "binary mode: ce-type with a Cyrillic o",
        post_with(
            headers(&[("ce-type", "b\u{43e}oking.requested".as_bytes())]),
            data.clone(),
        ),
        Expect::Error(400, "invalid_header"),
    ));
    c.push(case(
        "binary mode: percent-encoded lookalike type",
        post_with(
            headers(&[("ce-type", b"b%D0%BEoking.requested")]),
            data.clone(),
        ),
        rejected("/type"),
    ));
    c.push(case(
        "binary mode: specversion 0.3",
        post_with(headers(&[("ce-specversion", b"0.3")]), data.clone()),
        rejected("/specversion"),
    ));
    c.push(case(
        "binary mode: seats 0",
        post_with(headers(&[]), serde_json::to_vec(&json!({"bookingId":"B1","eventId":"E1","customerId":"C1","seats":0,"requestedAt":"2026-11-22T10:00:00Z"})).unwrap()),
        rejected("/data/seats"),
    ));
    c.push(case(
        "binary mode: malformed percent-encoding",
        post_with(headers(&[("ce-id", b"%zz")]), data),
        Expect::Error(400, "invalid_header"),
    ));
}

fn framing_and_floods(c: &mut Vec<Case>) {
    let bad = one(&with("/data/seats", json!(0)));
    let head = |extra: &str| {
        format!("POST /v1/events HTTP/1.1\r\nhost: corpus\r\ncontent-type: {SINGLE}\r\n{extra}\r\n")
            .into_bytes()
    };
    // Bodies that never finish.
    let mut chunked = head("transfer-encoding: chunked\r\n");
    chunked.extend_from_slice(b"10\r\n{\"specversion\":\"\r\n");
    c.push(case(
        "chunked body that never ends",
        Wire::Stall(chunked),
        Expect::Error(408, "body_timeout"),
    ));
    let mut short = head("content-length: 1000\r\n");
    short.extend_from_slice(&bad[..bad.len().min(100)]);
    c.push(case(
        "content-length larger than the body sent",
        Wire::Stall(short),
        Expect::Error(408, "body_timeout"),
    ));
    c.push(case(
        "headers that never end (slowloris)",
        Wire::Stall(b"POST /v1/events HTTP/1.1\r\nhost: corpus\r\nx-slow: 1\r\n".to_vec()),
        Expect::ClosedOr(&[408]),
    ));
    let mut bad_chunk = head("transfer-encoding: chunked\r\n");
    bad_chunk.extend_from_slice(b"zz\r\nhello\r\n0\r\n\r\n");
    c.push(case(
        "chunk size not hex",
        Wire::Stall(bad_chunk),
        Expect::ClosedOr(&[400]),
    ));
    let mut huge_chunk = head("transfer-encoding: chunked\r\n");
    huge_chunk.extend_from_slice(b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n");
    c.push(case(
        "chunk size overflows",
        Wire::Stall(huge_chunk),
        Expect::ClosedOr(&[400, 413]),
    ));
    c.push(case(
        "declared 1 TB body",
        Wire::Stall(head("content-length: 1000000000000\r\n")),
        Expect::Error(413, "body_too_large"),
    ));
    c.push(case(
        "two different content-lengths",
        Wire::Stall(head("content-length: 10\r\ncontent-length: 20\r\n")),
        Expect::Protocol(400),
    ));
    c.push(case(
        "negative content-length",
        Wire::Stall(head("content-length: -1\r\n")),
        Expect::Protocol(400),
    ));
    c.push(case(
        "NUL in a header value",
        Wire::Stall(head("x-evil: a\0b\r\ncontent-length: 0\r\n")),
        Expect::Protocol(400),
    ));
    c.push(case(
        "space before the colon",
        Wire::Stall(head("x-evil : 1\r\ncontent-length: 0\r\n")),
        Expect::Protocol(400),
    ));
    // Header floods.
    let many: String = (0..500).map(|i| format!("x-flood-{i}: {i}\r\n")).collect();
    c.push(case(
        "500 headers",
        Wire::Stall(head(&many)),
        Expect::ClosedOr(&[431]),
    ));
    c.push(case(
        "one 1 MiB header",
        Wire::Stall(head(&format!("x-big: {}\r\n", "a".repeat(1 << 20)))),
        Expect::ClosedOr(&[431]),
    ));
    c.push(case(
        "16 KiB request line",
        Wire::Stall(
            format!(
                "GET /{} HTTP/1.1\r\nhost: corpus\r\n\r\n",
                "a".repeat(16 << 10)
            )
            .into_bytes(),
        ),
        Expect::ClosedOr(&[404, 414]),
    ));
    c.push(case(
        "1 MiB request line",
        Wire::Stall(
            format!(
                "GET /{} HTTP/1.1\r\nhost: corpus\r\n\r\n",
                "a".repeat(1 << 20)
            )
            .into_bytes(),
        ),
        Expect::ClosedOr(&[414, 431]),
    ));
    c.push(case(
        "not HTTP at all",
        Wire::Stall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n".to_vec()),
        Expect::ClosedOr(&[400]),
    ));
}
