//! The fast path against the reference: every body gets the same outcomes, pointers and
//! messages included, with the fast path on as with it off; and the events producers mean
//! to send are the ones it takes.

use bytes::Bytes;
use floodgate_core::check::check_body_traced;
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::{Registry, SchemaSource};
use floodgate_core::trace_context::TraceContext;
use proptest::prelude::*;
use serde_json::{Value, json};

fn registries() -> (Registry, Registry) {
    (
        Registry::builtin().unwrap(),
        Registry::builtin().unwrap().without_fast_path(),
    )
}

/// One valid event of every shipped type.
fn samples() -> Vec<Value> {
    let envelope = |id: &str, ty: &str, data: Value| {
        json!({"specversion":"1.0","id":id,"source":"https://shop.example.com/checkout",
               "type":ty,"time":"2026-11-22T10:00:00.123Z","datacontenttype":"application/json",
               "data":data})
    };
    vec![
        envelope(
            "c1",
            "inventory.event.created",
            json!({"eventId":"concert-1","name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":100}),
        ),
        envelope(
            "cc1",
            "inventory.capacity.changed",
            json!({"eventId":"concert-1","capacity":120}),
        ),
        envelope(
            "b1",
            "booking.requested",
            json!({"bookingId":"bk-1","eventId":"concert-1","customerId":"cu-1","seats":2,"requestedAt":"2026-11-22T10:00:00Z"}),
        ),
        envelope(
            "x1",
            "booking.cancelled",
            json!({"bookingId":"bk-1","eventId":"concert-1","reason":"changed plans"}),
        ),
        envelope(
            "ps1",
            "payment.succeeded",
            json!({"paymentId":"p1","bookingId":"bk-1","eventId":"concert-1","amountMinor":1500,"currency":"EUR"}),
        ),
        envelope(
            "pf1",
            "payment.failed",
            json!({"paymentId":"p2","bookingId":"bk-1","eventId":"concert-1","code":"card_declined"}),
        ),
        envelope(
            "ck1",
            "checkin.scanned",
            json!({"bookingId":"bk-1","eventId":"concert-1","gate":"A","scannedAt":"2026-12-01T19:30:00Z"}),
        ),
    ]
}

/// Both registries' outcomes for `body`, as text (outcomes compare by every field).
fn outcomes(body: &str, format: BodyFormat, trace: Option<&TraceContext>) -> (String, String) {
    let (fast, reference) = registries_cached();
    let body = Bytes::from(body.to_owned());
    let run = |r: &Registry| format!("{:?}", check_body_traced(r, &body, format, 100, trace));
    (run(fast), run(reference))
}

fn registries_cached() -> &'static (Registry, Registry) {
    static R: std::sync::OnceLock<(Registry, Registry)> = std::sync::OnceLock::new();
    R.get_or_init(registries)
}

#[test]
fn every_shipped_schema_has_a_fast_path() {
    let registry = Registry::builtin().unwrap();
    for t in registry.types().collect::<Vec<_>>() {
        assert!(registry.latest(t).unwrap().has_fast_path(), "{t}");
    }
}

#[test]
fn the_events_producers_send_are_taken_fast_with_the_references_attributes() {
    let (fast, reference) = registries();
    for event in samples() {
        let raw = event.to_string();
        let accepted = fast
            .accept_fast(&raw)
            .unwrap_or_else(|| panic!("declined: {raw}"));
        let checked = reference.check(&event).unwrap();
        assert_eq!(accepted.id, checked.envelope.id);
        assert_eq!(accepted.source, checked.envelope.source);
        assert_eq!(*accepted.event_type, checked.schema.event_type);
        assert_eq!(accepted.key, checked.key);
        assert!(
            reference.accept_fast(&raw).is_none(),
            "the reference is off"
        );
    }
    // A partition key from the extension, an absent optional member, escapes, a dataschema.
    let mut e = samples().remove(3);
    e["partitionkey"] = json!("pk-1");
    e["data"].as_object_mut().unwrap().remove("reason");
    e["dataschema"] = json!("https://schemas.floodgate.dev/booking.cancelled/v1.json");
    e["subject"] = json!("caf\u{e9}");
    let raw = e.to_string().replace("checkout", "check\\/out");
    let accepted = fast.accept_fast(&raw).expect("taken fast");
    assert_eq!(accepted.source, "https://shop.example.com/check/out");
    assert_eq!(accepted.key, "concert-1", "the schema's key comes first");
}

#[test]
fn what_the_fast_path_declines_is_still_decided_by_the_reference() {
    let (fast, _) = registries();
    let base = samples().remove(2);
    let declined = [
        // Faults.
        r#"{"specversion":"1.0","id":"b","source":"s","type":"booking.requested","data":{"bookingId":"b","eventId":"e","customerId":"c","seats":21,"requestedAt":"2026-11-22T10:00:00Z"}}"#.to_owned(),
        r#"{"specversion":"1.0","id":"b","source":"s","type":"booking.requested","data":{"bookingId":"b","eventId":"e","customerId":"c","seats":2}}"#.to_owned(),
        r#"{"specversion":"1.0","id":"b","id":"b","source":"s","type":"booking.requested","data":{"bookingId":"b","eventId":"e","customerId":"c","seats":2,"requestedAt":"2026-11-22T10:00:00Z"}}"#.to_owned(),
        r#"{"specversion":"1.0","id":"b","source":"s","type":"booking.requested","data":{"bookingId":"b","bookingId":"b","eventId":"e","customerId":"c","seats":2,"requestedAt":"2026-11-22T10:00:00Z"}}"#.to_owned(),
        // Valid, but for the reference: trace context, over several lines.
        {
            let mut e = base.clone();
            e["traceparent"] = json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            e.to_string()
        },
        serde_json::to_string_pretty(&base).unwrap(),
        // Lines broken by a carriage return alone.
        serde_json::to_string_pretty(&base)
            .unwrap()
            .replace('\n', "\r"),
    ];
    for raw in declined {
        assert!(fast.accept_fast(&raw).is_none(), "{raw}");
        let (a, b) = outcomes(&raw, BodyFormat::Single, None);
        assert_eq!(a, b);
    }
}

#[test]
fn a_schema_the_fast_path_cannot_take_is_left_to_the_reference() {
    let source = |text: &str| SchemaSource {
        relative_path: "thing.done/v1.json".into(),
        origin: "test".into(),
        text: text.into(),
    };
    for (schema, fast) in [
        (
            r#"{"type":"object","additionalProperties":false,"properties":{"a":{"type":"string"}}}"#,
            true,
        ),
        // Open objects, references and combinators are the reference's.
        (
            r#"{"type":"object","properties":{"a":{"type":"string"}}}"#,
            false,
        ),
        (
            r##"{"type":"object","additionalProperties":false,"properties":{"a":{"$ref":"#/$defs/a"}},"$defs":{"a":{"type":"string"}}}"##,
            false,
        ),
        (
            r#"{"type":"object","additionalProperties":false,"minProperties":1,"properties":{"a":{"type":"string"}}}"#,
            false,
        ),
        // A leaf may use anything self-contained.
        (
            r#"{"type":"object","additionalProperties":false,"properties":{"a":{"anyOf":[{"type":"string"},{"type":"array","items":{"type":"integer"}}]}}}"#,
            true,
        ),
    ] {
        let registry = Registry::from_sources([source(schema)]).unwrap();
        assert_eq!(
            registry.latest("thing.done").unwrap().has_fast_path(),
            fast,
            "{schema}"
        );
    }
}

/// A value nested near `serde_json`'s limit: the fast path reads `data` on its own, one
/// level up from where the reference meets it, and must not take what the reference
/// cannot parse.
#[test]
fn deep_nesting_is_decided_by_the_reference() {
    let schema = SchemaSource {
        relative_path: "deep.thing/v1.json".into(),
        origin: "test".into(),
        text:
            r#"{"type":"object","additionalProperties":false,"properties":{"m":{"type":"array"}}}"#
                .into(),
    };
    let fast = Registry::from_sources([schema.clone()]).unwrap();
    let reference = Registry::from_sources([schema])
        .unwrap()
        .without_fast_path();
    for levels in [1, 50, 95, 100, 120, 125, 126, 127, 128, 130] {
        let event = format!(
            r#"{{"specversion":"1.0","id":"1","source":"/s","type":"deep.thing","data":{{"m":{}{}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        for (body, format) in [
            (event.clone(), BodyFormat::Single),
            (format!("[{event}]"), BodyFormat::Batch),
            (format!("{event}\n{event}"), BodyFormat::Ndjson),
        ] {
            let body = Bytes::from(body);
            let run =
                |r: &Registry| format!("{:?}", check_body_traced(r, &body, format, 100, None));
            assert_eq!(run(&fast), run(&reference), "{levels} levels, {format:?}");
        }
    }
}

/// Values that break some rule somewhere, or sit at an edge of one.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("")),
        Just(json!(" ")),
        Just(json!("a b")),
        Just(json!("\u{1}x")),
        Just(json!("\u{7f}")),
        Just(json!("\u{fdd0}")),
        Just(json!("caf\u{e9}")),
        Just(json!("1.0")),
        Just(json!("0.9")),
        Just(json!("EUR")),
        Just(json!("eur")),
        Just(json!("concert-1")),
        Just(json!("concert-1\n")),
        Just(json!("x".repeat(64))),
        Just(json!("AB")),
        Just(json!("ABCD")),
        Just(json!("a.b")),
        Just(json!("2026-11-22T10:00:00Z")),
        Just(json!("2026-11-22t10:00:00z")),
        Just(json!("2026-02-30T10:00:00Z")),
        Just(json!("2016-12-31T23:59:60Z")),
        Just(json!("2016-12-31T22:59:60Z")),
        Just(json!("2026-11-22 10:00:00Z")),
        Just(json!("application/json")),
        Just(json!("application/cloudevents+json; charset=utf-8")),
        Just(json!("text/plain")),
        Just(json!("booking.requested")),
        Just(json!("booking.cancelled")),
        Just(json!(
            "https://schemas.floodgate.dev/booking.requested/v1.json"
        )),
        Just(json!("booking.requested/v2.json")),
        Just(json!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        )),
        Just(json!("x".repeat(65))),
        Just(json!("é".repeat(70))),
        Just(json!("k".repeat(257))),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(20)),
        Just(json!(21)),
        Just(json!(-1)),
        Just(json!(2.0)),
        Just(json!(2.5)),
        Just(json!(1e300)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(2147483648u64)),
        Just(json!(1_000_000)),
        Just(json!(1_000_001)),
        Just(json!(true)),
        Just(json!(false)),
        Just(Value::Null),
        Just(json!({})),
        Just(json!({"a": 1})),
        Just(json!([])),
        Just(json!(["x"])),
    ]
}

const ATTRIBUTES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "partitionkey",
    "traceparent",
    "tracestate",
    "ext1",
    "Bad",
    "",
];

const MEMBERS: &[&str] = &[
    "bookingId",
    "eventId",
    "customerId",
    "seats",
    "requestedAt",
    "reason",
    "capacity",
    "name",
    "currency",
    "amountMinor",
    "gate",
    "other",
];

/// One change to an event: to an attribute or to a member of `data` — removed (`None`) or
/// set to a value.
#[derive(Debug, Clone)]
enum Change {
    Attribute(&'static str, Option<Value>),
    Member(&'static str, Option<Value>),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            proptest::sample::select(ATTRIBUTES),
            proptest::option::weighted(0.8, odd_value())
        )
            .prop_map(|(a, v)| Change::Attribute(a, v)),
        (
            proptest::sample::select(MEMBERS),
            proptest::option::weighted(0.8, odd_value())
        )
            .prop_map(|(m, v)| Change::Member(m, v)),
    ]
}

/// A change to the event's text that a `Value` cannot hold.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    AsIs,
    /// A member name written again at the front of the event or of its `data`.
    DuplicateAttribute(usize),
    DuplicateMember(usize),
    /// A name or value spelled with escapes.
    EscapedName,
    EscapedSlash,
    /// Over several lines.
    Pretty,
    /// `data` after the attributes, as the CloudEvents SDKs write it (a `Value` writes its
    /// members sorted, `data` first).
    DataLast,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        4 => Just(Spelling::AsIs),
        1 => (0..ATTRIBUTES.len()).prop_map(Spelling::DuplicateAttribute),
        1 => (0..MEMBERS.len()).prop_map(Spelling::DuplicateMember),
        1 => Just(Spelling::EscapedName),
        1 => Just(Spelling::EscapedSlash),
        1 => Just(Spelling::Pretty),
        2 => Just(Spelling::DataLast),
    ]
}

fn event_text(base: usize, changes: &[Change], spelling: Spelling) -> String {
    let mut event = samples().swap_remove(base % 7);
    for change in changes {
        match change {
            Change::Attribute(a, v) => match v {
                Some(v) => event[*a] = v.clone(),
                None => {
                    event.as_object_mut().unwrap().remove(*a);
                }
            },
            Change::Member(m, v) => {
                if let Some(data) = event.get_mut("data").and_then(Value::as_object_mut) {
                    match v {
                        Some(v) => {
                            data.insert((*m).to_owned(), v.clone());
                        }
                        None => {
                            data.remove(*m);
                        }
                    }
                }
            }
        }
    }
    let text = event.to_string();
    match spelling {
        Spelling::AsIs => text,
        Spelling::DuplicateAttribute(i) => {
            text.replacen('{', &format!("{{\"{}\":\"1.0\",", ATTRIBUTES[i]), 1)
        }
        Spelling::DuplicateMember(i) => text.replacen(
            "\"data\":{",
            &format!("\"data\":{{\"{}\":\"concert-1\",", MEMBERS[i]),
            1,
        ),
        Spelling::EscapedName => text.replacen("\"id\"", "\"\\u0069d\"", 1),
        Spelling::EscapedSlash => text.replace("://", ":\\/\\/"),
        Spelling::Pretty => serde_json::to_string_pretty(&event).unwrap(),
        Spelling::DataLast => {
            let object = event.as_object().unwrap();
            let mut members: Vec<String> = object
                .iter()
                .filter(|(k, _)| *k != "data")
                .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
                .collect();
            members.extend(object.get("data").map(|d| format!("\"data\":{d}")));
            format!("{{{}}}", members.join(","))
        }
    }
}

/// A registry whose one type has leaves (values `jsonschema` checks, which the fast path
/// hands to `serde_json` in place) and a nested object; with the reference beside it.
fn leafy_registries() -> &'static (Registry, Registry) {
    static R: std::sync::OnceLock<(Registry, Registry)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let source = SchemaSource {
            relative_path: "leafy.thing/v1.json".into(),
            origin: "test".into(),
            text:
                r#"{"type":"object","additionalProperties":false,"x-floodgate-partition-key":"/m",
                "required":["m","n"],
                "properties":{"m":{"anyOf":[{"type":"array"},{"type":"number"},{"type":"string"}]},
                              "n":{"type":"string","maxLength":8},
                              "o":{"type":"object","additionalProperties":false,
                                   "properties":{"p":{"type":"integer"},"q":{"type":"boolean"}}}}}"#
                    .into(),
        };
        let fast = Registry::from_sources([source.clone()]).unwrap();
        let reference = Registry::from_sources([source])
            .unwrap()
            .without_fast_path();
        (fast, reference)
    })
}

/// Events of `leafy.thing`, each taken fast unedited.
const LEAFY: &[&str] = &[
    r#"{"specversion":"1.0","id":"l1","source":"/s","type":"leafy.thing","data":{"m":[1,[2,{"a":null}]] ,"n":"x","o":{"p":-3,"q":true}}}"#,
    r#"{"data":{"m":1.50,"n":"y","o":{}},"specversion":"1.0","id":"l2","source":"/s","type":"leafy.thing"}"#,
    r#"{"specversion":"1.0","id":"l3","source":"/s","type":"leafy.thing","data":{"n":"\u00e9","m":"k\"1"}}"#,
];

/// `text` with `edits` made: each replaces, inserts or removes a byte, half of them beside
/// the grammar's punctuation, where readers differ. `None` when a removal split a
/// character.
fn edited(text: &str, edits: &[(proptest::sample::Index, u8, u8)]) -> Option<String> {
    let mut bytes = text.as_bytes().to_vec();
    for &(at, how, byte) in edits {
        let marks: Vec<usize> = (0..bytes.len())
            .filter(|&i| b"{}[],:\"".contains(&bytes[i]))
            .flat_map(|i| [i, i + 1])
            .filter(|&i| i < bytes.len())
            .collect();
        let at = if how >= 3 && !marks.is_empty() {
            marks[at.index(marks.len())]
        } else {
            at.index(bytes.len())
        };
        match how % 3 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => {
                bytes.remove(at);
            }
        }
    }
    String::from_utf8(bytes).ok()
}

/// The fast path against the reference on one event's text, alone and followed by more
/// of a batch: whatever it takes, the reference takes, with the same key, and the length
/// it gives is exactly that event's (the batch reader goes on from there); and the
/// outcomes of a body holding the text agree.
fn agrees_on_text(
    (fast, reference): &(Registry, Registry),
    text: &str,
) -> Result<(), TestCaseError> {
    let then = format!("{text} ,{{}}");
    if let Some((accepted, len)) = fast.accept_fast_prefix(&then) {
        let event = floodgate_core::strict::from_str(&then[..len]);
        prop_assert!(
            event.is_ok(),
            "taken fast as {:?}, which does not parse",
            &then[..len]
        );
        let event = event.unwrap();
        let checked = reference.check(&event);
        prop_assert!(
            checked.is_ok(),
            "taken fast, refused by the reference: {text}"
        );
        let checked = checked.unwrap();
        prop_assert_eq!(&accepted.key, &checked.key);
        prop_assert_eq!(&accepted.id, checked.envelope.id);
    }
    for (body, format) in [
        (text.to_owned(), BodyFormat::Single),
        (format!("[{text},{text}]"), BodyFormat::Batch),
    ] {
        let body = Bytes::from(body);
        let run = |r: &Registry| format!("{:?}", check_body_traced(r, &body, format, 100, None));
        prop_assert_eq!(run(fast), run(reference), "{}", text);
    }
    Ok(())
}

/// Every unedited base is taken fast, whole: else the edit tests below would pass with a
/// fast path that declines everything.
#[test]
fn the_bases_of_the_edits_are_taken_fast_whole() {
    let (fast, _) = registries_cached();
    for base in 0..7 {
        for spelling in [Spelling::AsIs, Spelling::DataLast] {
            let text = event_text(base, &[], spelling);
            let (_, len) = fast.accept_fast_prefix(&text).expect(&text);
            assert_eq!(len, text.len(), "{text}");
        }
    }
    let (fast, reference) = leafy_registries();
    for text in LEAFY {
        let (accepted, len) = fast.accept_fast_prefix(text).expect(text);
        assert_eq!(len, text.len(), "{text}");
        let event = floodgate_core::strict::from_str(text).unwrap();
        let checked = reference.check(&event).unwrap();
        assert_eq!(accepted.key, checked.key, "{text}");
    }
    let (accepted, _) = fast.accept_fast_prefix(LEAFY[1]).unwrap();
    assert_eq!(accepted.key, "1.5", "a number key is its JSON value's");
}

proptest! {
    // Cheap cases, and a broken reading shows in few of them.
    #![proptest_config(ProptestConfig::with_cases(20000))]

    /// One event's text with a few bytes replaced, inserted or removed (the grammar's
    /// punctuation, digits, escapes, whitespace and controls): the same outcome either
    /// way. The fast path reads JSON itself, and this holds it to the reference's reading
    /// of broken and odd text, as a fuzzer would.
    #[test]
    fn an_event_with_bytes_changed_gets_the_references_outcome(
        base in 0usize..7,
        data_last in any::<bool>(),
        edits in proptest::collection::vec(
            (any::<proptest::sample::Index>(), 0u8..6, proptest::sample::select(EDIT_BYTES)),
            1..4,
        ),
    ) {
        let spelling = if data_last { Spelling::DataLast } else { Spelling::AsIs };
        if let Some(text) = edited(&event_text(base, &[], spelling), &edits) {
            agrees_on_text(registries_cached(), &text)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10000))]

    /// The same for events with leaves and a nested object, read partly by `serde_json`
    /// from where the fast path's reader stands.
    #[test]
    fn an_event_with_leaves_with_bytes_changed_gets_the_references_outcome(
        base in proptest::sample::select(LEAFY),
        edits in proptest::collection::vec(
            (any::<proptest::sample::Index>(), 0u8..6, proptest::sample::select(EDIT_BYTES)),
            1..4,
        ),
    ) {
        if let Some(text) = edited(base, &edits) {
            agrees_on_text(leafy_registries(), &text)?;
        }
    }
}

/// The bytes the byte-level edits put in: JSON's punctuation and literals' letters, digits
/// and number marks, escapes, every kind of whitespace, and controls.
const EDIT_BYTES: &[u8] = b"{}[],:\"\\/ \t\n\r\x00\x01\x1f\x7f0129-+.eEtrufalsnu";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// One event, changed in up to four ways and spelled oddly: the same outcome either
    /// way, and the fast path takes it only when the reference accepts it.
    #[test]
    fn one_event_gets_the_references_outcome(
        base in 0usize..7,
        changes in proptest::collection::vec(change(), 0..4),
        spelling in spelling(),
    ) {
        let text = event_text(base, &changes, spelling);
        let (fast, reference) = registries_cached();
        if let Some(accepted) = fast.accept_fast(&text) {
            let event = floodgate_core::strict::from_str(&text).expect("taken fast, so it parses");
            let checked = reference.check(&event);
            prop_assert!(checked.is_ok(), "taken fast, refused by the reference: {text}\n{checked:?}");
            let checked = checked.unwrap();
            prop_assert_eq!(&accepted.key, &checked.key);
            prop_assert_eq!(&accepted.id, checked.envelope.id);
        }
        let (a, b) = outcomes(&text, BodyFormat::Single, None);
        prop_assert_eq!(a, b);
    }

    /// Whole bodies of each format, with and without a request trace context.
    #[test]
    fn a_body_gets_the_references_outcomes(
        events in proptest::collection::vec(
            (0usize..7, proptest::collection::vec(change(), 0..3), spelling()),
            1..5,
        ),
        ndjson in any::<bool>(),
        traced in any::<bool>(),
        broken_line in any::<bool>(),
    ) {
        let texts: Vec<String> = events.iter().map(|(b, c, s)| event_text(*b, c, *s)).collect();
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: Some("k=v".into()),
        };
        let trace = traced.then_some(&trace);
        let (body, format) = if ndjson {
            let mut lines: Vec<String> = texts.iter().map(|t| t.replace('\n', "")).collect();
            if broken_line {
                lines.push("{\"id\":".into());
            }
            (lines.join("\n"), BodyFormat::Ndjson)
        } else {
            (format!("[{}]", texts.join(",")), BodyFormat::Batch)
        };
        let (a, b) = outcomes(&body, format, trace);
        prop_assert_eq!(a, b);
    }
}
