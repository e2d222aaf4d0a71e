//! The document served at `GET /openapi.json`: `schemas/openapi.yaml` (converted to JSON
//! at build time), with `components.schemas.CloudEvent` made exact for this registry: one
//! variant per registered type, its `data` the type's latest schema. A client generated
//! from the document, or a fuzzer, then knows precisely which events are accepted.

use floodgate_core::envelope::MAX_PARTITION_KEY_CHARS;
use floodgate_core::registry::Registry;
use serde_json::{Value, json};

/// `schemas/openapi.yaml` as JSON, exactly as written.
pub const OPENAPI_JSON: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/openapi.json"));

/// A CloudEvents String: no control characters, no (BMP) noncharacters.
const STRING_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F\\uFDD0-\\uFDEF\\uFFFE\\uFFFF]*$";

/// A version `00` `traceparent` whose trace-id and parent-id are not all zeros (W3C Trace
/// Context), spelled without look-arounds, which generators of examples may not take. The
/// edge also takes later versions; the document promises only what every client writes.
fn traceparent_pattern() -> String {
    let not_all_zeros = |n: usize| {
        (0..n)
            .map(|k| format!("0{{{k}}}[1-9a-f][0-9a-f]{{{}}}", n - 1 - k))
            .collect::<Vec<_>>()
            .join("|")
    };
    format!(
        "^00-(?:{})-(?:{})-[0-9a-f]{{2}}$",
        not_all_zeros(32),
        not_all_zeros(16)
    )
}

/// The served document for `registry`.
pub fn document(registry: &Registry) -> Value {
    let mut doc: Value = serde_json::from_slice(OPENAPI_JSON).expect("checked at build time");
    let variants: Vec<Value> = registry
        .types()
        .filter_map(|t| registry.latest(t))
        .map(|entry| {
            let mut data = entry.document.clone();
            if let Some(obj) = data.as_object_mut() {
                // Nested in the document, the schema keeps its `$id` (its own base) but
                // takes the document's dialect.
                obj.remove("$schema");
            }
            let mut properties = json!({
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "minLength": 1, "pattern": STRING_PATTERN},
                "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
                "type": {"const": entry.event_type},
                // Optional attributes may be null, which means absent.
                "time": {"type": ["string", "null"], "format": "date-time"},
                "subject": {"type": ["string", "null"], "minLength": 1, "pattern": STRING_PATTERN},
                "datacontenttype": {"enum": ["application/json", null]},
                "partitionkey": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_PARTITION_KEY_CHARS, "pattern": STRING_PATTERN},
                // The Distributed Tracing extension. (`tracestate`, which requires a
                // `traceparent`, stays among the extensions, described in the text.)
                "traceparent": {"type": ["string", "null"], "pattern": traceparent_pattern()},
                "data": data,
            });
            if let Some(id) = &entry.id {
                properties["dataschema"] = json!({"enum": [id, null]});
            }
            json!({
                "title": entry.event_type,
                "type": "object",
                "required": ["specversion", "id", "source", "type", "data"],
                "properties": properties,
                // Extension attributes: lower-case names, string, integer or boolean values.
                "propertyNames": {"pattern": "^[a-z0-9]{1,20}$"},
                "additionalProperties": {"anyOf": [
                    {"type": "string", "pattern": STRING_PATTERN},
                    {"type": ["boolean", "null"]},
                    {"type": "integer", "minimum": i32::MIN, "maximum": i32::MAX},
                ]},
            })
        })
        .collect();
    let generic = doc["components"]["schemas"]["CloudEvent"].clone();
    doc["components"]["schemas"]["CloudEvent"] = json!({
        "description": generic["description"],
        "oneOf": variants,
    });
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern, checked by the JSON Schema validator the edge's registry uses.
    #[test]
    fn traceparent_pattern_takes_valid_version_00_only() {
        let schema = json!({"type": "string", "pattern": traceparent_pattern()});
        let v = jsonschema::validator_for(&schema).unwrap();
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(v.is_valid(&json!(ok)));
        assert!(v.is_valid(&json!(format!(
            "00-{}1-{}1-00",
            "0".repeat(31),
            "0".repeat(15)
        ))));
        for bad in [
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", "0".repeat(16)),
            ok.to_uppercase(),
            format!("{ok}-"),
            "00-abc-def-01".to_owned(),
        ] {
            assert!(!v.is_valid(&json!(bad)), "{bad}");
        }
    }
}
