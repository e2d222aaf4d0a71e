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
