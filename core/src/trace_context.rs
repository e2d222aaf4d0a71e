//! W3C Trace Context as CloudEvents carry it: the Distributed Tracing extension's
//! `traceparent` and `tracestate` attributes.
//!
//! [`TraceParent::parse`] reads a `traceparent` strictly in the format it knows (version
//! `00`: exactly `00-<32 hex>-<16 hex>-<2 hex>`, lower-case, neither id all zeros) and
//! tolerantly for later versions, as the W3C recommendation asks: the first 55 characters
//! in the `00` layout, then the end or a `-` and whatever a later version adds. Version `ff`
//! is forbidden. [`check_tracestate`] holds a `tracestate` to the recommendation's list
//! grammar. [`insert_attributes`] adds both to an event's JSON text without re-encoding the
//! producer's bytes.
//!
//! Specs: <https://www.w3.org/TR/trace-context/> (§3.2 `traceparent`, §3.3 `tracestate`)
//! and <https://github.com/cloudevents/spec/blob/main/cloudevents/extensions/distributed-tracing.md>.

use std::borrow::Cow;
use std::fmt;

/// The Distributed Tracing extension's attribute (and the HTTP header) names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Length of a version `00` `traceparent`, and of the prefix every later version shares.
pub const TRACEPARENT_V00_LEN: usize = 55;
/// The longest `traceparent` taken: a later version may append fields, but an event's
/// attribute stays small.
pub const MAX_TRACEPARENT_BYTES: usize = 512;
/// The longest `tracestate` taken. The recommendation asks every vendor to propagate at
/// least 512 characters of it, and lets one drop a longer list; derived events copy it, so
/// it is bounded.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// The most list-members a `tracestate` may hold (W3C: 32).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A `traceparent`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub version: u8,
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Why a string is not a `traceparent`, as the rest of a sentence about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    #[error(
        "is not in the form 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags> (lower-case hex)"
    )]
    Format,
    #[error("has version ff, which is forbidden")]
    ForbiddenVersion,
    #[error("has version 00 but more than 55 characters")]
    TooLongForVersion,
    #[error("is longer than {MAX_TRACEPARENT_BYTES} characters")]
    TooLong,
    #[error("has an all-zero trace-id")]
    ZeroTraceId,
    #[error("has an all-zero parent-id")]
    ZeroParentId,
}

impl TraceParent {
    /// Parses `s` (see the module docs for what is taken).
    pub fn parse(s: &str) -> Result<TraceParent, TraceParentError> {
        let b = s.as_bytes();
        if b.len() > MAX_TRACEPARENT_BYTES {
            return Err(TraceParentError::TooLong);
        }
        if b.len() < TRACEPARENT_V00_LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParentError::Format);
        }
        let version = hex_byte(&b[0..2]).ok_or(TraceParentError::Format)?;
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i]).ok_or(TraceParentError::Format)?;
        }
        let mut parent_id = [0u8; 8];
        for (i, out) in parent_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i]).ok_or(TraceParentError::Format)?;
        }
        let flags = hex_byte(&b[53..55]).ok_or(TraceParentError::Format)?;
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        // Version 00 is exactly 55 characters; a later one may add fields after a dash.
        if b.len() > TRACEPARENT_V00_LEN {
            if version == 0 {
                return Err(TraceParentError::TooLongForVersion);
            }
            if b[TRACEPARENT_V00_LEN] != b'-' {
                return Err(TraceParentError::Format);
            }
        }
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(TraceParent {
            version,
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace-id in lower-case hex (32 characters).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Whether the caller recorded its span (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The AWS X-Ray trace header of the same trace and parent
    /// (`Root=1-<8 hex>-<24 hex>;Parent=<16 hex>;Sampled=<0|1>`), the form of EventBridge's
    /// `TraceHeader`: the mapping AWS's own W3C ↔ X-Ray propagators use.
    pub fn xray_header(&self) -> String {
        let trace = self.trace_id_hex();
        format!(
            "Root=1-{}-{};Parent={};Sampled={}",
            &trace[..8],
            &trace[8..],
            hex(&self.parent_id),
            u8::from(self.sampled())
        )
    }
}

/// The version `00` form, which is what Floodgate writes: for a version `00` input, the
/// input itself.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

/// Why a string is not a `tracestate`, as the rest of a sentence about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceStateError {
    #[error("is longer than {MAX_TRACESTATE_BYTES} characters")]
    TooLong,
    #[error("has more than {MAX_TRACESTATE_MEMBERS} list-members")]
    TooManyMembers,
    #[error("has a list-member {0:?} that is not key=value in the W3C grammar")]
    Member(String),
    #[error("has the key {0:?} twice")]
    DuplicateKey(String),
}

/// Checks `s` against the `tracestate` grammar: comma-separated `key=value` list-members
/// (empty ones and spaces or tabs around them allowed), at most 32, keys unique.
pub fn check_tracestate(s: &str) -> Result<(), TraceStateError> {
    if s.len() > MAX_TRACESTATE_BYTES {
        return Err(TraceStateError::TooLong);
    }
    let mut keys: Vec<&str> = Vec::new();
    for member in s.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let bad = || TraceStateError::Member(member.chars().take(40).collect());
        let (key, value) = member.split_once('=').ok_or_else(bad)?;
        if !is_tracestate_key(key) || !is_tracestate_value(value) {
            return Err(bad());
        }
        if keys.contains(&key) {
            return Err(TraceStateError::DuplicateKey(key.to_owned()));
        }
        keys.push(key);
        if keys.len() > MAX_TRACESTATE_MEMBERS {
            return Err(TraceStateError::TooManyMembers);
        }
    }
    Ok(())
}

/// `simple-key = lcalpha 0*255(keychar)` or `tenant-id "@" system-id`, where
/// `tenant-id = (lcalpha / DIGIT) 0*240(keychar)` and `system-id = lcalpha 0*13(keychar)`.
fn is_tracestate_key(key: &str) -> bool {
    let keychar = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(&c);
    let run = |s: &[u8], first: fn(u8) -> bool, max_rest: usize| matches!(s.split_first(), Some((&f, rest)) if first(f) && rest.len() <= max_rest && rest.iter().all(|&c| keychar(c)));
    match key.split_once('@') {
        None => run(key.as_bytes(), |c| c.is_ascii_lowercase(), 255),
        Some((tenant, system)) => {
            run(
                tenant.as_bytes(),
                |c| c.is_ascii_lowercase() || c.is_ascii_digit(),
                240,
            ) && run(system.as_bytes(), |c| c.is_ascii_lowercase(), 13)
        }
    }
}

/// `value = 0*255(chr) nblk-chr`: printable ASCII but `,` and `=`, spaces allowed except
/// at the end.
fn is_tracestate_value(value: &str) -> bool {
    let nblk = |c: u8| (0x21..=0x7e).contains(&c) && c != b',' && c != b'=';
    let b = value.as_bytes();
    matches!(b.split_last(), Some((&last, rest)) if nblk(last) && rest.len() <= 255 && rest.iter().all(|&c| c == b' ' || nblk(c)))
}

/// A trace context to store on an event: the `traceparent` (valid) and, when one came with
/// it and is valid, the `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of an HTTP request's `traceparent` and `tracestate` headers, as the W3C
    /// recommendation reads them: an invalid `traceparent` means no context at all (`None`),
    /// an invalid `tracestate` is dropped alone. The `traceparent` is stored in its version
    /// `00` form, which is the header itself for version `00`.
    pub fn from_headers(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let parent = TraceParent::parse(traceparent).ok()?;
        let tracestate = tracestate
            .map(|s| s.trim_matches([' ', '\t']))
            .filter(|s| !s.is_empty() && check_tracestate(s).is_ok())
            .map(str::to_owned);
        Some(TraceContext {
            traceparent: parent.to_string(),
            tracestate,
        })
    }

    /// The context an event carries, for the events derived from it: its `traceparent`
    /// when valid (in version `00` form), and its `tracestate` when that is valid too.
    /// Stored events are read leniently: an old record's invalid attributes mean no context,
    /// never a failure.
    pub fn of_event(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
        let parent = TraceParent::parse(traceparent?).ok()?;
        Some(TraceContext {
            traceparent: parent.to_string(),
            tracestate: tracestate
                .filter(|s| !s.is_empty() && check_tracestate(s).is_ok())
                .map(str::to_owned),
        })
    }
}

/// `event`'s JSON text (an object) with `"traceparent"` and, if `tracestate` is
/// `Some`, `"tracestate"` added as its first members; every other byte as it was. The caller
/// makes sure the object has neither member yet (member names must stay unique). `None`
/// when `event` does not start with an object.
pub fn insert_attributes(
    event: &[u8],
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<Vec<u8>> {
    let open = event.iter().position(|b| !b.is_ascii_whitespace())?;
    if event[open] != b'{' {
        return None;
    }
    // An empty object takes no trailing comma.
    let empty = event[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut members = format!("\"{TRACEPARENT}\":{}", quote(traceparent));
    if let Some(state) = tracestate {
        members.push_str(&format!(",\"{TRACESTATE}\":{}", quote(state)));
    }
    if !empty {
        members.push(',');
    }
    let mut out = Vec::with_capacity(event.len() + members.len());
    out.extend_from_slice(&event[..=open]);
    out.extend_from_slice(members.as_bytes());
    out.extend_from_slice(&event[open + 1..]);
    Some(out)
}

/// For `#[serde(deserialize_with)]`: a member's string value, and `None` for any other JSON
/// value (or none), so that reading an attribute never fails a stored event.
pub fn lenient_str<'de, D>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    deserializer.deserialize_any(LenientStr)
}

struct LenientStr;

impl<'de> serde::de::Visitor<'de> for LenientStr {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(None)
    }
}

/// Two lower-case hex digits.
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some((digit(two[0])? << 4) | digit(two[1])?)
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_version_00_exactly() {
        let p = TraceParent::parse(VALID).unwrap();
        assert_eq!(p.version, 0);
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.flags, 1);
        assert!(p.sampled());
        assert_eq!(p.to_string(), VALID, "version 00 round-trips");
        // Flags other than `sampled` are kept as they came.
        let p = TraceParent::parse(&VALID.replace("-01", "-fe")).unwrap();
        assert_eq!(p.flags, 0xfe);
        assert!(!p.sampled());
    }

    #[test]
    fn refuses_what_the_recommendation_calls_invalid() {
        let cases: &[(&str, TraceParentError)] = &[
            ("", TraceParentError::Format),
            ("00-abc-def-01", TraceParentError::Format),
            // Upper-case hex, in each field.
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceParentError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                TraceParentError::Format,
            ),
            (
                "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0G",
                TraceParentError::Format,
            ),
            // Wrong separators and field lengths.
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                TraceParentError::Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
                TraceParentError::Format,
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::Format,
            ),
            // Version 00 is exactly 55 characters.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                TraceParentError::TooLongForVersion,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceParentError::TooLongForVersion,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceParentError::ForbiddenVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceParentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceParentError::ZeroParentId,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(TraceParent::parse(s), Err(*want), "{s:?}");
        }
        let long = format!("01-{}", &VALID[3..]) + "-" + &"x".repeat(MAX_TRACEPARENT_BYTES);
        assert_eq!(TraceParent::parse(&long), Err(TraceParentError::TooLong));
        // Multi-byte characters never panic the fixed offsets.
        assert!(TraceParent::parse(&"é".repeat(40)).is_err());
    }

    /// W3C §3.2.4: a later version is read by the version 00 layout, with the end or a dash
    /// after the flags.
    #[test]
    fn reads_later_versions_tolerantly() {
        let v1 = format!("01-{}", &VALID[3..]);
        let p = TraceParent::parse(&v1).unwrap();
        assert_eq!(p.version, 1);
        assert_eq!(p.to_string(), VALID, "written back as version 00");
        let more = format!("{v1}-what-comes-later");
        assert_eq!(TraceParent::parse(&more).unwrap().trace_id, p.trace_id);
        // But a later version's fields still end the 00 layout: the end or a dash.
        assert_eq!(
            TraceParent::parse(&format!("{v1}x")),
            Err(TraceParentError::Format)
        );
        assert!(TraceParent::parse(&format!("fe-{}", &VALID[3..])).is_ok());
    }

    #[test]
    fn xray_header_keeps_trace_parent_and_sampling() {
        let p = TraceParent::parse(VALID).unwrap();
        assert_eq!(
            p.xray_header(),
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
        );
        let p = TraceParent::parse(&VALID.replace("-01", "-00")).unwrap();
        assert!(p.xray_header().ends_with(";Sampled=0"));
    }

    #[test]
    fn tracestate_grammar() {
        for ok in [
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            " rojo=1 ,\tcongo=2 ,, ",
            "tenant1@vendor=x",
            "0tenant@v=x",
            "a_b-c*d/e=va lue",
            "k=!\"#$%&'()*+-./:;<>?@[\\]^_`{|}~",
            "",
        ] {
            assert_eq!(check_tracestate(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "novalue",
            "=v",
            "Upper=v",
            "0simple=v",
            "k=",
            "k=tab\tinside",
            "k=a=b",
            "k=é",
            "@v=x",
            "t@0v=x",
            "t@toolongsystemid=x",
            "k=1,k=2",
        ] {
            assert!(check_tracestate(bad).is_err(), "{bad:?}");
        }
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            check_tracestate(&members.join(",")),
            Err(TraceStateError::TooManyMembers)
        );
        assert_eq!(
            check_tracestate(&members[..32].join(",")),
            Ok(()),
            "32 members are fine"
        );
        let long = format!("k={}", "v".repeat(MAX_TRACESTATE_BYTES));
        assert_eq!(check_tracestate(&long), Err(TraceStateError::TooLong));
    }

    #[test]
    fn headers_ignore_what_is_invalid() {
        assert_eq!(
            TraceContext::from_headers("00-abc-def-01", Some("k=v")),
            None
        );
        let c = TraceContext::from_headers(VALID, Some("k=v")).unwrap();
        assert_eq!(c.traceparent, VALID);
        assert_eq!(c.tracestate.as_deref(), Some("k=v"));
        // An invalid tracestate is dropped alone.
        let c = TraceContext::from_headers(VALID, Some("not a list")).unwrap();
        assert_eq!(c.tracestate, None);
        assert_eq!(
            TraceContext::from_headers(VALID, Some(" "))
                .unwrap()
                .tracestate,
            None
        );
    }

    #[test]
    fn inserts_attributes_before_the_producers_bytes() {
        let event = br#"  {"id" : "1", "data":{"seats":2.0e0}}"#;
        let out = insert_attributes(event, VALID, Some("k=\"v\\")).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!(
                r#"  {{"traceparent":"{VALID}","tracestate":"k=\"v\\","id" : "1", "data":{{"seats":2.0e0}}}}"#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["tracestate"], "k=\"v\\");
        let out = insert_attributes(b"{ }", VALID, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"traceparent": VALID}));
        assert_eq!(insert_attributes(b"[1]", VALID, None), None);
        assert_eq!(insert_attributes(b"  ", VALID, None), None);
    }

    #[test]
    fn lenient_str_reads_any_value() {
        #[derive(serde::Deserialize)]
        struct E<'a> {
            #[serde(default, borrow, deserialize_with = "lenient_str")]
            traceparent: Option<Cow<'a, str>>,
        }
        for (json, want) in [
            (r#"{"traceparent":"x"}"#, Some("x")),
            (r#"{"traceparent":"a\"b"}"#, Some("a\"b")),
            (r#"{"traceparent":7}"#, None),
            (r#"{"traceparent":null}"#, None),
            (r#"{"traceparent":true}"#, None),
            (r#"{"traceparent":[1,{"a":2}]}"#, None),
            (r#"{"traceparent":{"a":[]}}"#, None),
            (r#"{}"#, None),
        ] {
            let e: E<'_> = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(e.traceparent.as_deref(), want, "{json}");
        }
    }
}
