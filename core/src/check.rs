//! One request body, checked: decode every event and run it through the registry.
//!
//! Pure CPU work with no I/O, shared by the edge (on its blocking pool for big bodies),
//! the benches and `floodgate schemas check`.

use bytes::Bytes;

use crate::FieldError;
use crate::decode::{self, BodyFormat, DecodeError};
use crate::envelope::event_id;
use crate::registry::Registry;

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
    let items = decode::decode(body, format, max_events)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let value = match item.parsed {
            Ok(v) => v,
            Err(e) => {
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
                let payload = if raw.contains(&b'\n') || raw.contains(&b'\r') {
                    Bytes::from(serde_json::to_vec(&value).expect("a parsed value serializes"))
                } else {
                    body.slice_ref(item.raw.as_bytes())
                };
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
