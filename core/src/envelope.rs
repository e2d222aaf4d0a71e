//! The CloudEvents 1.0 envelope, JSON event format.
//!
//! [`check_envelope`] reads the context attributes of one event (a `serde_json::Value`)
//! and reports every way it breaks the specification, each with the pointer of the
//! attribute at fault. It borrows from the event; nothing is copied.
//!
//! Spec: <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md> and
//! <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>.

use serde_json::{Map, Value};

use crate::FieldError;
use crate::trace_context::{TRACEPARENT, TRACESTATE, TraceParent, check_tracestate};

/// The only `specversion` this edge speaks.
pub const SPEC_VERSION: &str = "1.0";

/// The longest extension attribute name we accept. The spec says names SHOULD NOT exceed
/// 20 characters; we allow a little more but bound it so hostile names cannot grow maps.
pub const MAX_EXTENSION_NAME_CHARS: usize = 64;

/// The longest partition key, in bytes of UTF-8: one rule for every key an event is
/// appended under (the `partitionkey` attribute, a schema's key in `data`, or the event
/// `id`), checked at the edge so that an over-long key is rejected there with its pointer,
/// never refused by the stream after the event was checked. Kinesis documents 256
/// characters (<https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecordsRequestEntry.html>)
/// and the embedded log refuses keys over 256 bytes; a key within 256 bytes is within
/// both, however its characters are counted.
pub const MAX_PARTITION_KEY_BYTES: usize = 256;

/// The most characters a partition key may have whatever its characters (at most 4 bytes
/// of UTF-8 each): what the served OpenAPI document promises with `maxLength`, which counts
/// characters. Every key the document allows is accepted; longer ASCII keys are accepted
/// too, up to [`MAX_PARTITION_KEY_BYTES`].
pub const MAX_PARTITION_KEY_CHARS: usize = MAX_PARTITION_KEY_BYTES / 4;

/// Why `key` cannot be a partition key, if it cannot (Kinesis takes 1 to 256), as the
/// rest of a sentence whose subject names the key: "must not be empty", "may be at
/// most …".
pub fn partition_key_fault(key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("must not be empty".to_owned());
    }
    (key.len() > MAX_PARTITION_KEY_BYTES).then(|| {
        format!(
            "may be at most {MAX_PARTITION_KEY_BYTES} bytes of UTF-8, not {} bytes ({} characters)",
            key.len(),
            key.chars().count()
        )
    })
}

/// Attributes the spec or the JSON format define; anything else is an extension.
pub(crate) const KNOWN: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// The context attributes of one event that passed the envelope checks.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub id: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    pub time: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub datacontenttype: Option<&'a str>,
    pub dataschema: Option<&'a str>,
    /// The `partitionkey` extension (CloudEvents "Partitioning" extension).
    pub partitionkey: Option<&'a str>,
    /// `data`, when present and not `null`.
    pub data: Option<&'a Value>,
    /// Whether the event carries binary data (`data_base64`) instead of JSON `data`.
    pub has_data_base64: bool,
}

/// Best-effort `id` of an event, for reporting even when the envelope is broken.
pub fn event_id(event: &Value) -> Option<&str> {
    event.get("id").and_then(Value::as_str)
}

/// Checks the envelope of one event. On failure returns every fault found, not just the
/// first, so a producer can fix an event in one round trip.
pub fn check_envelope(event: &Value) -> Result<Envelope<'_>, Vec<FieldError>> {
    let Some(obj) = event.as_object() else {
        return Err(vec![FieldError::new(
            "",
            format!("an event must be a JSON object, not {}", kind(event)),
        )]);
    };
    let mut errors = Vec::new();

    match obj.get("specversion") {
        None | Some(Value::Null) => errors.push(missing("specversion")),
        Some(Value::String(v)) if v == SPEC_VERSION => {}
        Some(Value::String(v)) => errors.push(FieldError::new(
            "/specversion",
            format!("unsupported specversion {v:?}; this edge accepts \"{SPEC_VERSION}\""),
        )),
        Some(other) => errors.push(wrong_type("specversion", "a string", other)),
    }
    let id = required_string(obj, "id", &mut errors);
    let source = required_string(obj, "source", &mut errors);
    if let Some(s) = source
        && s.chars().any(|c| c.is_whitespace() && !c.is_control())
    {
        errors.push(FieldError::new(
            "/source",
            "source must be a URI-reference: no whitespace",
        ));
    }
    let event_type = required_string(obj, "type", &mut errors);
    let datacontenttype = optional_string(obj, "datacontenttype", &mut errors);
    let dataschema = optional_string(obj, "dataschema", &mut errors);
    let subject = optional_string(obj, "subject", &mut errors);
    let time = optional_string(obj, "time", &mut errors);
    for (name, value) in [
        ("id", id),
        ("source", source),
        ("type", event_type),
        ("datacontenttype", datacontenttype),
        ("dataschema", dataschema),
        ("subject", subject),
    ] {
        if let Some(v) = value {
            check_chars(name, v, &mut errors);
        }
    }
    if let Some(t) = time
        && !is_rfc3339(t)
    {
        errors.push(FieldError::new(
            "/time",
            format!("time must be an RFC 3339 timestamp, got {t:?}"),
        ));
    }

    let data = obj.get("data").filter(|d| !d.is_null());
    let has_data_base64 = match obj.get("data_base64") {
        None | Some(Value::Null) => false,
        Some(Value::String(_)) => true,
        Some(other) => {
            errors.push(wrong_type("data_base64", "a base64 string", other));
            false
        }
    };
    if data.is_some() && has_data_base64 {
        errors.push(FieldError::new(
            "/data_base64",
            "an event carries either data or data_base64, not both",
        ));
    }

    let mut partitionkey = None;
    for (name, value) in obj {
        if KNOWN.contains(&name.as_str()) {
            continue;
        }
        let pointer = format!("/{}", crate::escape_pointer_token(name));
        if name.is_empty()
            || name.len() > MAX_EXTENSION_NAME_CHARS
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            errors.push(FieldError::new(
                pointer,
                "extension attribute names must be lower-case ASCII letters and digits",
            ));
            continue;
        }
        if name == TRACEPARENT || name == TRACESTATE {
            check_trace_attribute(name, value, pointer, &mut errors);
            continue;
        }
        match value {
            Value::String(s) if name == "partitionkey" => {
                // The attribute is held to the key rule whether or not the type's schema
                // names another key: one rule for the attribute, whatever the type.
                if let Some(fault) = partition_key_fault(s) {
                    errors.push(FieldError::new(pointer, format!("partitionkey {fault}")));
                } else {
                    check_chars(name, s, &mut errors);
                    partitionkey = Some(s.as_str());
                }
            }
            Value::String(s) => check_chars(name, s, &mut errors),
            Value::Null | Value::Bool(_) if name != "partitionkey" => {}
            Value::Null => {}
            // The spec's Integer is 32-bit signed; `4.0` is a whole number too.
            Value::Number(n) if name != "partitionkey" && is_i32(n) => {}
            other if name == "partitionkey" => errors.push(wrong_type(name, "a string", other)),
            other => errors.push(FieldError::new(
                pointer,
                format!(
                    "extension attributes must be a string, a 32-bit integer or a boolean, not {}",
                    kind(other)
                ),
            )),
        }
    }

    // The Distributed Tracing extension requires `traceparent`; a `tracestate` alone is
    // half of it.
    let present = |name: &str| obj.get(name).is_some_and(|v| !v.is_null());
    if present(TRACESTATE) && !present(TRACEPARENT) {
        errors.push(FieldError::new(
            "/tracestate",
            "tracestate is given without a traceparent (CloudEvents Distributed Tracing extension)",
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Envelope {
        id: id.unwrap_or_default(),
        source: source.unwrap_or_default(),
        event_type: event_type.unwrap_or_default(),
        time,
        subject,
        datacontenttype,
        dataschema,
        partitionkey,
        data,
        has_data_base64,
    })
}

/// The Distributed Tracing extension's attributes: strings in W3C Trace Context format
/// (`null`, as for every attribute, means absent). An event is refused for an invalid one,
/// with its pointer, rather than stored with a trace context no consumer could follow; the
/// edge is as strict as for every other attribute. (An invalid `traceparent` *header* is
/// ignored instead, as the W3C recommendation asks: it is the transport's, not the event's.)
fn check_trace_attribute(name: &str, value: &Value, pointer: String, errors: &mut Vec<FieldError>) {
    match value {
        Value::Null => {}
        Value::String(s) => {
            let before = errors.len();
            check_chars(name, s, errors);
            if errors.len() > before {
                return;
            }
            let fault = if name == TRACEPARENT {
                TraceParent::parse(s).err().map(|e| e.to_string())
            } else {
                check_tracestate(s).err().map(|e| e.to_string())
            };
            if let Some(fault) = fault {
                errors.push(FieldError::new(
                    pointer,
                    format!("{name} {fault} (W3C Trace Context)"),
                ));
            }
        }
        other => errors.push(wrong_type(name, "a string", other)),
    }
}

/// The spec's String excludes control characters (U+0000–U+001F, U+007F–U+009F) and
/// noncharacters (surrogates cannot occur in a Rust string).
fn check_chars(name: &str, s: &str, errors: &mut Vec<FieldError>) {
    if let Some(c) = bad_char(s) {
        errors.push(FieldError::new(
            format!("/{}", crate::escape_pointer_token(name)),
            format!(
                "{name} must not contain control characters or noncharacters (CloudEvents String); found U+{:04X}",
                u32::from(c)
            ),
        ));
    }
}

/// The first character of `s` the spec's String excludes, if any.
pub(crate) fn bad_char(s: &str) -> Option<char> {
    let noncharacter = |c: char| {
        let u = u32::from(c);
        (0xFDD0..=0xFDEF).contains(&u) || u & 0xFFFE == 0xFFFE
    };
    // Every excluded character is outside ASCII but for the C0 controls and DEL.
    if printable_ascii(s.as_bytes()) {
        return None;
    }
    s.chars().find(|&c| c.is_control() || noncharacter(c))
}

/// Whether every byte of `bytes` is in `0x20..0x7F`, eight at a time: a byte below 0x20
/// borrows into its high bit when 0x20 is taken from it, a byte of 0x7F or more sets it
/// when 1 is added or has it set already (and is found, so the first line's flagging it
/// too does not matter). A carry or borrow only crosses into the next byte from one
/// that is found anyway. (Every context attribute an event carries goes through here;
/// byte by byte it was 5 instructions a byte.)
fn printable_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const HIGHS: u64 = ONES << 7;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let below = x.wrapping_sub(ONES * 0x20);
        let above = x.wrapping_add(ONES) | x;
        if (below | above) & HIGHS != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| (0x20..0x7F).contains(b))
}

fn is_i32(n: &serde_json::Number) -> bool {
    match n.as_i64() {
        Some(v) => i32::try_from(v).is_ok(),
        None => n.as_f64().is_some_and(|f| {
            f.fract() == 0.0 && f >= f64::from(i32::MIN) && f <= f64::from(i32::MAX)
        }),
    }
}

/// Whether `s` is an RFC 3339 `date-time` (e.g. `2026-11-22T10:00:00Z`). The same reading
/// as every consumer's ([`crate::rfc3339`]): whatever `time` the edge accepts, the lake can
/// partition by and store, leap seconds and lowercase `t`/`z` included.
pub fn is_rfc3339(s: &str) -> bool {
    crate::rfc3339::date_time_micros(s).is_some()
}

/// Whether a `datacontenttype` denotes JSON data (absent means JSON in the JSON format).
/// Media types compare without regard to ASCII case (RFC 9110 §8.3.1); every event that
/// names its type comes through here, so this compares in place rather than lowercasing
/// a copy.
pub fn is_json_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim().as_bytes();
    essence.eq_ignore_ascii_case(b"application/json")
        || essence.eq_ignore_ascii_case(b"text/json")
        || essence
            .len()
            .checked_sub(5)
            .is_some_and(|at| essence[at..].eq_ignore_ascii_case(b"+json"))
}

fn required_string<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match obj.get(name) {
        None | Some(Value::Null) => {
            errors.push(missing(name));
            None
        }
        Some(Value::String(s)) if s.is_empty() => {
            errors.push(FieldError::new(
                format!("/{name}"),
                format!("{name} must not be empty"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            errors.push(wrong_type(name, "a string", other));
            None
        }
    }
}

fn optional_string<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => {
            errors.push(FieldError::new(
                format!("/{name}"),
                format!("{name} must not be empty when present"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            errors.push(wrong_type(name, "a string", other));
            None
        }
    }
}

fn missing(name: &str) -> FieldError {
    FieldError::new(
        format!("/{name}"),
        format!("required attribute {name} is missing"),
    )
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> FieldError {
    FieldError::new(
        format!("/{}", crate::escape_pointer_token(name)),
        format!("{name} must be {expected}, not {}", kind(got)),
    )
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]

        /// The eight-at-a-time check against the plain one, on bytes near both edges.
        #[test]
        fn printable_ascii_reads_as_a_byte_loop(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    20 => 0x20u8..0x7F,
                    1 => 0x1Eu8..0x22,
                    1 => 0x7Cu8..0x82,
                    1 => 0xFCu8..=0xFF,
                ],
                0..40,
            ),
        ) {
            let plain = bytes.iter().all(|b| (0x20..0x7F).contains(b));
            proptest::prop_assert_eq!(printable_ascii(&bytes), plain, "{:x?}", bytes);
        }
    }
    use serde_json::json;

    fn ok() -> Value {
        json!({"specversion":"1.0","id":"a-1","source":"/shop","type":"booking.requested",
               "time":"2026-11-22T10:00:00Z","partitionkey":"k","count":3,
               "traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               "tracestate":"congo=t61rcWkgMzE",
               "data":{"x":1}})
    }

    fn pointers(v: Value) -> Vec<String> {
        check_envelope(&v)
            .unwrap_err()
            .into_iter()
            .map(|e| e.pointer)
            .collect()
    }

    #[test]
    fn accepts_a_full_envelope() {
        let v = ok();
        let env = check_envelope(&v).unwrap();
        assert_eq!(env.id, "a-1");
        assert_eq!(env.partitionkey, Some("k"));
        assert!(env.data.is_some());
    }

    #[test]
    fn rejects_spec_violations_with_pointers() {
        let mut v = ok();
        v.as_object_mut().unwrap().remove("id");
        assert_eq!(pointers(v), ["/id"]);
        let mut v = ok();
        v["specversion"] = json!("0.3");
        assert_eq!(pointers(v), ["/specversion"]);
        let mut v = ok();
        v["source"] = json!(7);
        assert_eq!(pointers(v), ["/source"]);
        let mut v = ok();
        v["time"] = json!("yesterday");
        assert_eq!(pointers(v), ["/time"]);
        let mut v = ok();
        v["Bad-Ext"] = json!("x");
        assert_eq!(pointers(v), ["/Bad-Ext"]);
        let mut v = ok();
        v["ext"] = json!({"nested": true});
        assert_eq!(pointers(v), ["/ext"]);
        let mut v = ok();
        v["partitionkey"] = json!("k".repeat(257));
        assert_eq!(pointers(v), ["/partitionkey"]);
        let mut v = ok();
        v["partitionkey"] = json!("");
        assert_eq!(pointers(v), ["/partitionkey"]);
        let mut v = ok();
        v["data_base64"] = json!("AAAA");
        assert_eq!(pointers(v), ["/data_base64"]);
        assert_eq!(pointers(json!([1])), [""]);
        assert_eq!(
            pointers(json!({})),
            ["/specversion", "/id", "/source", "/type"]
        );
    }

    /// The Distributed Tracing extension's attributes are held to W3C Trace Context.
    #[test]
    fn trace_attributes_are_w3c_trace_context() {
        let mut v = ok();
        v["traceparent"] = json!("00-x");
        assert_eq!(pointers(v), ["/traceparent"]);
        let mut v = ok();
        v["traceparent"] = json!("00-00000000000000000000000000000000-00f067aa0ba902b7-01");
        let errors = check_envelope(&v).unwrap_err();
        assert_eq!(errors[0].pointer, "/traceparent");
        assert!(
            errors[0].message.contains("all-zero trace-id"),
            "{errors:?}"
        );
        let mut v = ok();
        v["traceparent"] = json!(1);
        assert_eq!(pointers(v), ["/traceparent"]);
        let mut v = ok();
        v["tracestate"] = json!("Not=valid");
        assert_eq!(pointers(v), ["/tracestate"]);
        let mut v = ok();
        v["tracestate"] = json!(true);
        assert_eq!(pointers(v), ["/tracestate"]);
        // A tracestate needs its traceparent.
        let mut v = ok();
        v.as_object_mut().unwrap().remove("traceparent");
        assert_eq!(pointers(v), ["/tracestate"]);
        let mut v = ok();
        v["traceparent"] = json!(null);
        assert_eq!(pointers(v), ["/tracestate"]);
        // Both absent, or null, or a traceparent alone, or a later version: fine.
        let mut v = ok();
        v.as_object_mut().unwrap().remove("tracestate");
        assert!(check_envelope(&v).is_ok());
        v["traceparent"] = json!("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later");
        assert!(check_envelope(&v).is_ok());
        v["traceparent"] = json!(null);
        v["tracestate"] = json!(null);
        assert!(check_envelope(&v).is_ok());
    }

    /// The key rule counts bytes of UTF-8, as the log does, not characters: 256 two-byte
    /// characters are 512 bytes, and rejected.
    #[test]
    fn partitionkey_is_bounded_in_bytes() {
        let with_key = |k: String| {
            let mut v = ok();
            v["partitionkey"] = json!(k);
            v
        };
        for fits in ["k".repeat(256), "é".repeat(128), "😀".repeat(64)] {
            assert_eq!(fits.len(), 256);
            let v = with_key(fits);
            assert!(check_envelope(&v).is_ok(), "{v}");
        }
        for (too_long, chars) in [
            ("k".repeat(257), 257),
            ("é".repeat(129), 129),
            ("é".repeat(256), 256),
            (format!("{}k", "😀".repeat(64)), 65),
        ] {
            let v = with_key(too_long);
            let errors = check_envelope(&v).unwrap_err();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].pointer, "/partitionkey");
            assert!(
                errors[0].message.contains(&format!("({chars} characters)")),
                "{}",
                errors[0].message
            );
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/cloudevents+json"));
        assert!(is_json_content_type(" Application/JSON "));
        assert!(is_json_content_type("TEXT/Json;q=1"));
        assert!(is_json_content_type("application/vnd.api+JSON"));
        assert!(!is_json_content_type("application/octet-stream"));
        assert!(!is_json_content_type("json"));
        assert!(!is_json_content_type("application/json-seq"));
        assert!(!is_json_content_type("x+jsoné"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The in-place comparison decides as lowercasing a copy did.
        #[test]
        fn json_content_types_are_read_as_by_lowercasing(
            ct in "[ \t]{0,2}(application|text|Application|TEXT|x|é)?(/|\\+)?(json|JSON|Json|cloudevents\\+json|jsoné|son)?[ \t]{0,2}(;[ a-z=-]{0,8})?|\\PC{0,20}",
        ) {
            let lowered = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            let by_copy = lowered == "application/json"
                || lowered == "text/json"
                || lowered.ends_with("+json");
            proptest::prop_assert_eq!(is_json_content_type(&ct), by_copy, "{:?}", ct);
        }
    }
}
