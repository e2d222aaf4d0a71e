//! One request body, checked: decode every event and run it through the registry.
//!
//! Pure CPU work with no I/O, shared by the edge (on its blocking pool for big bodies),
//! the benches and `floodgate schemas check`.

use std::borrow::Cow;

use bytes::Bytes;

use crate::decode::{self, BodyFormat, DecodeError, Parsed};
use crate::envelope::event_id;
use crate::fast::BodyHint;
use crate::registry::Registry;
use crate::trace_context::{TRACEPARENT, TRACESTATE, TraceContext, insert_attributes};
use crate::{ByteString, FieldError};

/// The decision for one event of a body, before the append.
#[derive(Debug)]
pub enum Outcome {
    /// The attributes are slices of the body where it spells them without escapes.
    Valid {
        id: ByteString,
        source: ByteString,
        event_type: ByteString,
        key: ByteString,
        payload: Bytes,
    },
    Rejected {
        id: Option<ByteString>,
        /// The event's type when it is a registered one (a metric label).
        event_type: Option<ByteString>,
        errors: Vec<FieldError>,
        /// The event's bytes as sent, for the quarantine.
        raw: Bytes,
    },
}

/// Decodes `body` and checks every event, in input order.
pub fn check_body(
    registry: &Registry,
    body: &Bytes,
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<Outcome>, DecodeError> {
    check_body_traced(registry, body, format, max_events, None)
}

/// [`check_body`], and each valid event without a `traceparent` member of its own gets
/// `trace` (the request's `traceparent` and `tracestate` headers) as its Distributed Tracing
/// attributes. An event that has one keeps it, and everything else it carries: the headers
/// describe the request, the attribute the event (CloudEvents' multi-hop rule). Only such
/// events are rewritten, and then by adding the two members before the producer's bytes
/// ([`insert_attributes`]), not by re-encoding them; without `trace` every event is stored
/// exactly as it would be by [`check_body`].
pub fn check_body_traced(
    registry: &Registry,
    body: &Bytes,
    format: BodyFormat,
    max_events: usize,
    trace: Option<&TraceContext>,
) -> Result<Vec<Outcome>, DecodeError> {
    let mut hint = BodyHint::default();
    let items = decode::decode_with(body, format, max_events, |text| {
        registry.accept_fast_in_body(text, &mut hint)
    })?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let value = match item.parsed {
            Parsed::Early(accepted) => {
                // Accepted from its text: stored as sent (the fast path takes no event that
                // spans lines) and without a trace context of its own (it takes none).
                let mut payload = body.slice_ref(item.raw.as_bytes());
                if let Some(trace) = trace
                    && let Some(with) =
                        insert_attributes(&payload, &trace.traceparent, trace.tracestate.as_deref())
                {
                    payload = Bytes::from(with);
                }
                out.push(Outcome::Valid {
                    id: shared(body, accepted.id),
                    source: shared(body, accepted.source),
                    event_type: accepted.event_type.clone(),
                    key: shared(body, accepted.key),
                    payload,
                });
                continue;
            }
            Parsed::Value(v) => v,
            Parsed::Fault(e) => {
                out.push(Outcome::Rejected {
                    id: None,
                    event_type: None,
                    errors: vec![e],
                    raw: body.slice_ref(item.raw.as_bytes()),
                });
                continue;
            }
        };
        match registry.check(&value) {
            Ok(checked) => {
                // Store the producer's bytes as sent, unless they span lines (pretty-printed
                // batches): the log and its NDJSON views hold one event per line.
                let raw = item.raw.as_bytes();
                let mut payload = if raw.contains(&b'\n') || raw.contains(&b'\r') {
                    Bytes::from(serde_json::to_vec(&value).expect("a parsed value serializes"))
                } else {
                    body.slice_ref(item.raw.as_bytes())
                };
                // An event naming `traceparent` (even as null, which the JSON format reads as
                // absent) keeps what it has: adding a second member of that name would make
                // the stored event ambiguous.
                if let Some(trace) = trace
                    && value.get(TRACEPARENT).is_none()
                {
                    let tracestate = trace
                        .tracestate
                        .as_deref()
                        .filter(|_| value.get(TRACESTATE).is_none());
                    if let Some(with) = insert_attributes(&payload, &trace.traceparent, tracestate)
                    {
                        payload = Bytes::from(with);
                    }
                }
                out.push(Outcome::Valid {
                    id: ByteString::from(checked.envelope.id),
                    source: ByteString::from(checked.envelope.source),
                    event_type: checked.schema.event_type.clone(),
                    key: ByteString::from(checked.key.into_owned()),
                    payload,
                });
            }
            Err(errors) => {
                let event_type = value
                    .get("type")
                    .and_then(|t| t.as_str())
                    .and_then(|t| registry.latest(t))
                    .map(|schema| schema.event_type.clone());
                out.push(Outcome::Rejected {
                    id: event_id(&value).map(ByteString::from),
                    event_type,
                    errors,
                    raw: body.slice_ref(item.raw.as_bytes()),
                });
            }
        }
    }
    Ok(out)
}

/// `text` as a slice of `body` when it is one (the event spelled it without escapes), so
/// that keeping it copies nothing; else its own copy.
fn shared(body: &Bytes, text: Cow<'_, str>) -> ByteString {
    match text {
        Cow::Borrowed(s) if within(body, s) => {
            ByteString::try_from(body.slice_ref(s.as_bytes())).unwrap_or_else(|_| s.into())
        }
        Cow::Borrowed(s) => s.into(),
        Cow::Owned(s) => s.into(),
    }
}

/// Whether `s` lies inside `body` (as [`Bytes::slice_ref`] requires).
fn within(body: &Bytes, s: &str) -> bool {
    let range = body.as_ptr_range();
    let (start, end) = (s.as_ptr(), s.as_ptr().wrapping_add(s.len()));
    range.start <= start && end <= range.end
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OWN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

    fn booking(extra: &str) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"e1","source":"/s","type":"booking.requested",{extra}"data":{{"bookingId":"b1","eventId":"E1","customerId":"c","seats":2.0,"requestedAt":"2026-11-22T10:00:00Z"}}}}"#
        )
    }

    fn payloads(body: &str, format: BodyFormat, trace: Option<&TraceContext>) -> Vec<Bytes> {
        let registry = Registry::builtin().unwrap();
        check_body_traced(&registry, &Bytes::from(body.to_owned()), format, 10, trace)
            .unwrap()
            .into_iter()
            .map(|o| match o {
                Outcome::Valid { payload, .. } => payload,
                Outcome::Rejected { errors, .. } => panic!("rejected: {errors:?}"),
            })
            .collect()
    }

    fn strict(payload: &Bytes) -> serde_json::Value {
        crate::strict::from_str(std::str::from_utf8(payload).unwrap()).unwrap()
    }

    /// An accepted event's attributes are slices of the body (keeping them copies
    /// nothing); one spelled with escapes is its own copy, decoded.
    #[test]
    fn attributes_are_slices_of_the_body_unless_escaped() {
        // `seats` as the integer the fast path reads (it leaves `2.0` to the reference).
        let plain = booking("").replace(r#""seats":2.0"#, r#""seats":2"#);
        let escaped = plain.replace(r#""id":"e1""#, r#""id":"e\u0032""#);
        assert!(plain.contains(r#""seats":2,"#) && escaped.contains("u0032"));
        let body = Bytes::from(format!("[{plain},{escaped}]"));
        let registry = Registry::builtin().unwrap();
        let out = check_body(&registry, &body, BodyFormat::Batch, 10).unwrap();
        let attributes = |o: &Outcome| match o {
            Outcome::Valid {
                id,
                source,
                event_type,
                key,
                ..
            } => (id.clone(), source.clone(), event_type.clone(), key.clone()),
            Outcome::Rejected { errors, .. } => panic!("rejected: {errors:?}"),
        };
        let (id, source, event_type, key) = attributes(&out[0]);
        assert_eq!((&*id, &*source, &*key), ("e1", "/s", "E1"));
        assert_eq!(&*event_type, "booking.requested");
        for s in [&id, &source, &key] {
            assert!(within(&body, s), "{s:?} is a copy");
        }
        let (id, _, _, key) = attributes(&out[1]);
        assert_eq!(&*id, "e2");
        assert!(!within(&body, &id));
        assert!(within(&body, &key));
    }

    #[test]
    fn without_a_request_context_events_are_stored_as_sent() {
        let event = booking("");
        assert_eq!(
            payloads(&event, BodyFormat::Single, None),
            [event.as_bytes()]
        );
    }

    /// The request's context goes onto the events that have none, in front of the
    /// producer's bytes (the spelling `2.0` survives); an event with its own keeps it.
    #[test]
    fn the_request_context_goes_only_onto_events_without_one() {
        let trace = TraceContext::from_headers(TP, Some("congo=t61rcWkgMzE")).unwrap();
        let plain = booking("");
        let own = booking(&format!(r#""traceparent":"{OWN}","#));
        let batch = format!("[{plain},{own}]");
        let out = payloads(&batch, BodyFormat::Batch, Some(&trace));
        let first = std::str::from_utf8(&out[0]).unwrap();
        assert!(first.ends_with(&plain[1..]), "{first}");
        assert!(first.contains(r#""seats":2.0"#));
        let v = strict(&out[0]);
        assert_eq!(v["traceparent"], TP);
        assert_eq!(v["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(out[1], own.as_bytes(), "its own context, bytes untouched");

        // A pretty-printed event (re-encoded to one line) gets it as well; an event that
        // names traceparent as null, or carries a null tracestate, never gets a member twice.
        let pretty = serde_json::to_string_pretty(&strict(&Bytes::from(plain.clone()))).unwrap();
        let v = strict(&payloads(&pretty, BodyFormat::Single, Some(&trace))[0]);
        assert_eq!(v["traceparent"], TP);
        let null_parent = booking(r#""traceparent":null,"#);
        let out = payloads(&null_parent, BodyFormat::Single, Some(&trace));
        assert_eq!(out[0], null_parent.as_bytes());
        let null_state = booking(r#""tracestate":null,"#);
        let v = strict(&payloads(&null_state, BodyFormat::Single, Some(&trace))[0]);
        assert_eq!(v["traceparent"], TP);
        assert!(v["tracestate"].is_null());
    }
}
