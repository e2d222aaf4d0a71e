//! One request body, checked: decode every event and run it through the registry.
//!
//! Pure CPU work with no I/O, shared by the edge (on its blocking pool for big bodies),
//! the benches and `floodgate schemas check`.

use bytes::Bytes;

use crate::FieldError;
use crate::decode::{self, BodyFormat, DecodeError, Parsed};
use crate::envelope::event_id;
use crate::registry::Registry;
use crate::trace_context::{TRACEPARENT, TRACESTATE, TraceContext, insert_attributes};

/// The decision for one event of a body, before the append.
#[derive(Debug)]
pub enum Outcome {
    Valid {
        id: String,
        source: String,
        event_type: String,
        key: String,
        payload: Bytes,
    },
    Rejected {
        id: Option<String>,
        /// The event's type when it is a registered one (a metric label).
        event_type: Option<String>,
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
    let items = decode::decode_with(body, format, max_events, |text| {
        registry.accept_fast_prefix(text)
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
                    id: accepted.id,
                    source: accepted.source,
                    event_type: accepted.event_type,
                    key: accepted.key,
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
                    id: checked.envelope.id.to_owned(),
                    source: checked.envelope.source.to_owned(),
                    event_type: checked.schema.event_type.clone(),
                    key: checked.key.into_owned(),
                    payload,
                });
            }
            Err(errors) => {
                let event_type = value
                    .get("type")
                    .and_then(|t| t.as_str())
                    .filter(|t| registry.latest(t).is_some())
                    .map(str::to_owned);
                out.push(Outcome::Rejected {
                    id: event_id(&value).map(str::to_owned),
                    event_type,
                    errors,
                    raw: body.slice_ref(item.raw.as_bytes()),
                });
            }
        }
    }
    Ok(out)
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
