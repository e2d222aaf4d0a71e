//! Request bodies to events.
//!
//! Every body format the edge takes (one event, a JSON array batch, NDJSON) decodes to a
//! list of [`Item`]s: the event's raw JSON text, borrowed from the body, and its parse.
//! Keeping the raw text lets the stream store exactly what the producer sent without
//! serialising it again.
//!
//! Whole-body faults ([`DecodeError`]) carry a line and column. NDJSON is the exception by
//! design: a line that does not parse rejects that event alone, so one corrupt line never
//! costs a producer its valid events (unless no line parses at all).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserializer as _, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::strict::{self, StrictError};

use crate::FieldError;

/// How the body is framed; the edge picks it from `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// Exactly one event object (`application/cloudevents+json`).
    Single,
    /// A JSON array of events (`application/cloudevents-batch+json`).
    Batch,
    /// An object is one event, an array is a batch (`application/json`).
    Auto,
    /// One event per line (`application/x-ndjson`); blank lines are skipped.
    Ndjson,
}

/// One event of a body.
#[derive(Debug)]
pub struct Item<'a> {
    /// The event's JSON text exactly as sent (without surrounding whitespace).
    pub raw: &'a str,
    /// Its parse. Only NDJSON lines can fail individually.
    pub parsed: Result<Value, FieldError>,
}

/// Why a whole body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the body is empty")]
    Empty,
    #[error("the body is not valid UTF-8 (line {line}, column {column})")]
    InvalidUtf8 { line: usize, column: usize },
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the batch holds more than {max} events")]
    TooManyEvents { max: usize },
    #[error("{0}")]
    Shape(&'static str),
}

impl DecodeError {
    /// A stable, machine-readable code for the error body.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_body",
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::Syntax { .. } => "invalid_json",
            DecodeError::TooManyEvents { .. } => "too_many_events",
            DecodeError::Shape(_) => "invalid_body_shape",
        }
    }
}

/// One event of a body, as [`decode_with`] leaves it.
#[derive(Debug)]
pub struct Decoded<'a, T> {
    /// The event's JSON text exactly as sent (without surrounding whitespace).
    pub raw: &'a str,
    pub parsed: Parsed<T>,
}

/// How far [`decode_with`] took one event.
#[derive(Debug)]
pub enum Parsed<T> {
    /// What the caller's early look at the event's text gave; the event was not parsed.
    Early(T),
    /// Its parse.
    Value(Value),
    /// Why it could not be parsed. Only NDJSON lines can fail individually.
    Fault(FieldError),
}

/// Decodes a body into at most `max_events` events.
pub fn decode(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<Item<'_>>, DecodeError> {
    let items = decode_with(body, format, max_events, |_| {
        None::<(std::convert::Infallible, usize)>
    })?;
    Ok(items
        .into_iter()
        .map(|item| Item {
            raw: item.raw,
            parsed: match item.parsed {
                Parsed::Early(never) => match never {},
                Parsed::Value(v) => Ok(v),
                Parsed::Fault(e) => Err(e),
            },
        })
        .collect())
}

/// [`decode`], with a look at each event's text first. `early` is given text that starts
/// with an event and may go on past it (in a batch, the rest of the body): when it gives
/// `Some((t, len))`, the event is the first `len` bytes, and it is not parsed (the caller
/// took it from its text). `early` must only give `Some` when those bytes are one JSON
/// object with unique member names. A batch's events are so read in one pass over the
/// body. The body's faults are the same either way.
pub fn decode_with<'a, T>(
    body: &'a [u8],
    format: BodyFormat,
    max_events: usize,
    early: impl FnMut(&'a str) -> Option<(T, usize)>,
) -> Result<Vec<Decoded<'a, T>>, DecodeError> {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) => {
            let (line, column) = line_column(body, e.valid_up_to());
            return Err(DecodeError::InvalidUtf8 { line, column });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start_matches([' ', '\t', '\r', '\n']);
    if trimmed.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = match format {
        BodyFormat::Auto if trimmed.starts_with('[') => BodyFormat::Batch,
        BodyFormat::Auto => BodyFormat::Single,
        f => f,
    };
    match format {
        BodyFormat::Single => {
            if trimmed.starts_with('[') {
                return Err(DecodeError::Shape(
                    "expected one event object; send a batch as application/cloudevents-batch+json",
                ));
            }
            let mut early = early;
            let raw = text.trim_matches([' ', '\t', '\r', '\n']);
            let parsed = match early(raw).filter(|(_, len)| *len == raw.len()) {
                Some((t, _)) => Parsed::Early(t),
                None => match strict::from_str(text) {
                    Ok(value) => Parsed::Value(value),
                    Err(StrictError::Syntax(e)) => return Err(syntax(e)),
                    Err(StrictError::Duplicate { pointer }) => Parsed::Fault(duplicate(pointer)),
                },
            };
            Ok(vec![Decoded { raw, parsed }])
        }
        BodyFormat::Batch | BodyFormat::Auto => decode_array(text, max_events, early),
        BodyFormat::Ndjson => decode_ndjson(text, max_events, early),
    }
}

fn decode_array<'a, T>(
    text: &'a str,
    max_events: usize,
    mut early: impl FnMut(&'a str) -> Option<(T, usize)>,
) -> Result<Vec<Decoded<'a, T>>, DecodeError> {
    match decode_array_once(text, max_events, &mut early) {
        Some(items) => Ok(items),
        None => decode_array_twice(text, max_events, early),
    }
}

/// JSON's insignificant whitespace.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A well-formed batch of at most `max_events` events, in one pass: each event is read
/// where it starts, by `early` or else as a raw value, and the array's own syntax between
/// them by hand. `None` for any other body (a syntax fault anywhere, too many events, an
/// empty array, an event nested too deep): [`decode_array_twice`] then reads it from the
/// start and reports the fault where it is. So no body is answered differently; a valid
/// batch is just not scanned twice.
fn decode_array_once<'a, T>(
    text: &'a str,
    max_events: usize,
    early: &mut impl FnMut(&'a str) -> Option<(T, usize)>,
) -> Option<Vec<Decoded<'a, T>>> {
    let bytes = text.as_bytes();
    let skip_space = |at: usize| at + bytes[at..].iter().take_while(|b| is_space(**b)).count();
    let mut at = skip_space(0);
    if bytes.get(at) != Some(&b'[') {
        return None;
    }
    at = skip_space(at + 1);
    if bytes.get(at) == Some(&b']') {
        return None;
    }
    // About 350 bytes an event is usual; the vector grows if not.
    let mut items = Vec::with_capacity((text.len() / 256 + 1).min(max_events));
    loop {
        if items.len() == max_events {
            return None;
        }
        // `rest` starts with the event: `at` is past any whitespace.
        let rest = &text[at..];
        let (raw, parsed) = match early(rest) {
            Some((t, len)) => (rest.get(..len)?, Parsed::Early(t)),
            None => {
                let mut values = serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
                values.next()?.ok()?;
                let raw = &rest[..values.byte_offset()];
                match strict::from_str(raw) {
                    Ok(value) => (raw, Parsed::Value(value)),
                    Err(StrictError::Duplicate { pointer }) => {
                        (raw, Parsed::Fault(duplicate(pointer)))
                    }
                    Err(StrictError::Syntax(_)) => return None,
                }
            }
        };
        items.push(Decoded { raw, parsed });
        at = skip_space(at + raw.len());
        match bytes.get(at) {
            Some(b',') => at = skip_space(at + 1),
            Some(b']') => return (skip_space(at + 1) == bytes.len()).then_some(items),
            _ => return None,
        }
    }
}

/// Any batch: its events' raw text first (faults of the array's syntax reported by
/// position), then each event.
fn decode_array_twice<'a, T>(
    text: &'a str,
    max_events: usize,
    mut early: impl FnMut(&'a str) -> Option<(T, usize)>,
) -> Result<Vec<Decoded<'a, T>>, DecodeError> {
    let too_many = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let raws = match de.deserialize_seq(BoundedSeq {
        max: max_events,
        too_many: &too_many,
    }) {
        Ok(raws) => raws,
        Err(_) if too_many.get() => return Err(DecodeError::TooManyEvents { max: max_events }),
        Err(e) => return Err(syntax(e)),
    };
    de.end().map_err(syntax)?;
    let mut items = Vec::with_capacity(raws.len());
    for raw in raws {
        let raw = raw.get();
        if let Some((t, _)) = early(raw).filter(|(_, len)| *len == raw.len()) {
            items.push(Decoded {
                raw,
                parsed: Parsed::Early(t),
            });
            continue;
        }
        match strict::from_str(raw) {
            Ok(value) => items.push(Decoded {
                raw,
                parsed: Parsed::Value(value),
            }),
            Err(StrictError::Duplicate { pointer }) => items.push(Decoded {
                raw,
                parsed: Parsed::Fault(duplicate(pointer)),
            }),
            // The array scan does not bound nesting; the full parse does. Report the
            // position in the whole body.
            Err(_) => {
                return Err(match serde_json::from_str::<Value>(text) {
                    Err(e) => syntax(e),
                    Ok(_) => DecodeError::Shape("an event could not be parsed"),
                });
            }
        }
    }
    Ok(items)
}

fn decode_ndjson<'a, T>(
    text: &'a str,
    max_events: usize,
    mut early: impl FnMut(&'a str) -> Option<(T, usize)>,
) -> Result<Vec<Decoded<'a, T>>, DecodeError> {
    let mut items = Vec::new();
    let mut first_error = None;
    for (n, line) in text.split('\n').enumerate() {
        let line = line.trim_matches([' ', '\t', '\r']);
        if line.is_empty() {
            continue;
        }
        if items.len() == max_events {
            return Err(DecodeError::TooManyEvents { max: max_events });
        }
        if let Some((t, _)) = early(line).filter(|(_, len)| *len == line.len()) {
            items.push(Decoded {
                raw: line,
                parsed: Parsed::Early(t),
            });
            continue;
        }
        let parsed = match strict::from_str(line) {
            Ok(value) => Parsed::Value(value),
            Err(StrictError::Duplicate { pointer }) => Parsed::Fault(duplicate(pointer)),
            Err(StrictError::Syntax(e)) => {
                let err = DecodeError::Syntax {
                    line: n + 1,
                    column: e.column(),
                    message: e.to_string(),
                };
                let field = FieldError::new("", err.to_string());
                first_error.get_or_insert(err);
                Parsed::Fault(field)
            }
        };
        items.push(Decoded { raw: line, parsed });
    }
    if items.is_empty() {
        return Err(DecodeError::Empty);
    }
    // Every line unreadable: the body as a whole is not NDJSON. (Lines that parsed but
    // repeat a member name are judged as events.)
    if let Some(err) = first_error
        && items.iter().all(|i| matches!(i.parsed, Parsed::Fault(_)))
    {
        return Err(err);
    }
    Ok(items)
}

fn duplicate(pointer: String) -> FieldError {
    FieldError::new(
        pointer,
        "this member name appears twice in one object; event JSON must use unique names (I-JSON)",
    )
}

fn syntax(e: serde_json::Error) -> DecodeError {
    DecodeError::Syntax {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    }
}

/// 1-based line and column (in bytes) of a byte offset.
fn line_column(body: &[u8], offset: usize) -> (usize, usize) {
    let before = &body[..offset.min(body.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (line, column)
}

/// Collects the raw elements of a JSON array, refusing to collect more than `max`.
struct BoundedSeq<'c> {
    max: usize,
    too_many: &'c Cell<bool>,
}

impl<'de> Visitor<'de> for BoundedSeq<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(self.max));
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.max {
                self.too_many.set(true);
                return Err(de::Error::custom("too many events"));
            }
            out.push(raw);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let one = br#" {"id":"1"} "#;
        assert_eq!(
            decode(one, BodyFormat::Single, 10).unwrap()[0].raw,
            r#"{"id":"1"}"#
        );
        assert_eq!(decode(one, BodyFormat::Auto, 10).unwrap().len(), 1);
        let many = br#"[{"id":"1"}, {"id":"2"} ]"#;
        let items = decode(many, BodyFormat::Batch, 10).unwrap();
        assert_eq!(items[1].raw, r#"{"id":"2"}"#);
        assert_eq!(decode(many, BodyFormat::Auto, 10).unwrap().len(), 2);
        let nd = b"{\"id\":\"1\"}\r\n\n{oops\n{\"id\":\"3\"}";
        let items = decode(nd, BodyFormat::Ndjson, 10).unwrap();
        assert_eq!(items.len(), 3);
        assert!(
            items[1]
                .parsed
                .as_ref()
                .unwrap_err()
                .message
                .contains("line 3")
        );
    }

    #[test]
    fn whole_body_faults() {
        assert_eq!(
            decode(b"  \n", BodyFormat::Auto, 10).unwrap_err(),
            DecodeError::Empty
        );
        assert!(matches!(
            decode(b"[1,\n{\"a\":\xff}]", BodyFormat::Batch, 10).unwrap_err(),
            DecodeError::InvalidUtf8 { line: 2, column: 6 }
        ));
        assert!(matches!(
            decode(b"[1,\n2,}", BodyFormat::Batch, 10).unwrap_err(),
            DecodeError::Syntax { line: 2, .. }
        ));
        assert_eq!(
            decode(b"[1,2,3]", BodyFormat::Batch, 2).unwrap_err(),
            DecodeError::TooManyEvents { max: 2 }
        );
        assert_eq!(decode(b"[1,2]", BodyFormat::Batch, 2).unwrap().len(), 2);
        assert!(matches!(
            decode(b"{}", BodyFormat::Batch, 2).unwrap_err(),
            DecodeError::Syntax { .. }
        ));
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(
            decode(deep.as_bytes(), BodyFormat::Auto, 500).unwrap_err(),
            DecodeError::Syntax { .. }
        ));
        let deep_obj = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
        assert!(matches!(
            decode(deep_obj.as_bytes(), BodyFormat::Single, 500).unwrap_err(),
            DecodeError::Syntax { .. }
        ));
        assert!(matches!(
            decode(b"{oops", BodyFormat::Ndjson, 5).unwrap_err(),
            DecodeError::Syntax { line: 1, .. }
        ));
    }

    /// A test's early look: takes objects with a member `fast` (read as a raw value, then
    /// strictly), and gives their length; the event is "taken" as its length.
    fn take_fast(text: &str) -> Option<(usize, usize)> {
        let mut values = serde_json::Deserializer::from_str(text).into_iter::<&RawValue>();
        values.next()?.ok()?;
        let len = values.byte_offset();
        let value = strict::from_str(&text[..len]).ok()?;
        value.get("fast")?;
        Some((len, len))
    }

    /// Pieces of batches: events of every kind, and text that breaks the array.
    fn piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just(r#"{"fast":1,"a":"x"}"#.to_owned()),
            Just(r#"{"fast":{"deep":[1,2,{"b":"]"}]},"s":"a\"b\\"}"#.to_owned()),
            Just(r#"{"slow":true}"#.to_owned()),
            Just(r#"{"a":1,"a":2}"#.to_owned()),
            Just(r#"{"fast":1,"fast":2}"#.to_owned()),
            Just("{\n\"fast\": 1\n}".to_owned()),
            Just("12".to_owned()),
            Just("1e5".to_owned()),
            Just(r#""str,]""#.to_owned()),
            Just("null".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just(format!("{}{}", "[".repeat(130), "]".repeat(130))),
            Just(format!(
                "{{\"fast\":{}{}}}",
                "[".repeat(126),
                "]".repeat(126)
            )),
            Just(r#"{"fast":1"#.to_owned()),
            Just("tru".to_owned()),
            Just("1x".to_owned()),
            Just(",".to_owned()),
            Just("]".to_owned()),
            Just(r#"{"fast":"\ud800"}"#.to_owned()),
        ]
    }

    fn space() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[ \t\r\n]{0,2}").unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// The one-pass reading of a batch gives what the two-pass one does, whenever it
        /// gives anything, and it gives something for every well-formed batch.
        #[test]
        fn a_batch_read_once_reads_as_one_read_twice(
            events in proptest::collection::vec((piece(), space(), space()), 0..6),
            commas in proptest::collection::vec(proptest::bool::weighted(0.9), 6),
            open in space(),
            trailing in proptest::prelude::prop_oneof![
                proptest::prelude::Just(String::new()),
                proptest::prelude::Just(" \n".to_owned()),
                proptest::prelude::Just(",".to_owned()),
                proptest::prelude::Just("x".to_owned()),
                proptest::prelude::Just("]".to_owned()),
            ],
            max in 1usize..6,
        ) {
            let mut body = format!("{open}[");
            for (i, (event, before, after)) in events.iter().enumerate() {
                if i > 0 && commas[i] {
                    body.push(',');
                }
                body.push_str(before);
                body.push_str(event);
                body.push_str(after);
            }
            body.push(']');
            body.push_str(&trailing);

            let twice = format!("{:?}", decode_array_twice(&body, max, take_fast));
            if let Some(once) = decode_array_once(&body, max, &mut take_fast) {
                proptest::prop_assert_eq!(format!("{:?}", Ok::<_, DecodeError>(once)), twice.clone());
            }
            proptest::prop_assert_eq!(format!("{:?}", decode_array(&body, max, take_fast)), twice);

            // Well-formed: events that are whole values, nested within bounds, commas
            // between them, nothing after the array but whitespace, not too many.
            let well_formed = !events.is_empty()
                && events.len() <= max
                && commas[1..events.len()].iter().all(|c| *c)
                && trailing.trim().is_empty()
                && events.iter().all(|(e, _, _)| serde_json::from_str::<serde_json::Value>(e).is_ok());
            if well_formed {
                proptest::prop_assert!(decode_array_once(&body, max, &mut take_fast).is_some(), "{}", body);
            }
        }
    }
}
