//! The analytics lake's tables, derived from the schemas: JSON Schema → Arrow, and Arrow →
//! Athena DDL. Pure: no I/O, no Parquet (the writer lives in `floodgate-sinks`).
//!
//! Mapping (each registered type version; a table is one event type):
//! - `string` → Utf8; with `enum` → Dictionary(Int32, Utf8); `format: date-time` →
//!   Timestamp(µs, UTC); `format: date` → Date32
//! - `integer` → Int64, or Int8/16/32 when `minimum` and `maximum` allow
//! - `number` → Float64; `boolean` → Boolean
//! - `object` with `properties` → Struct; `array` with `items` → List
//! - `["<type>", "null"]` → that type, nullable; a property not `required` is nullable
//! - `data`'s properties become top-level columns in snake_case (`bookingId` →
//!   `booking_id`); one that would collide with an envelope column gets a `data_` prefix
//!   (`eventId` → `data_event_id`, since `event_id` is the CloudEvent's id)
//! - every table starts with the envelope columns [`ENVELOPE_COLUMNS`]
//!
//! Anything else (`oneOf`, `$ref`, free-form objects, tuples, several types, …) is a
//! [`MappingError`] naming the schema pointer: start-up stops instead of dropping data.
//!
//! Versions of a type share its table: later versions may only add nullable columns (the
//! registry's compatibility check guarantees it for the shipped schemas; a changed column
//! type is a [`MappingError`]). Older files lack the newer columns; readers fill nulls.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};

use crate::registry::Registry;

/// The envelope columns every table starts with, in order.
pub const ENVELOPE_COLUMNS: [&str; 7] = [
    "event_id",
    "source",
    "type",
    "time",
    "received_at",
    "shard",
    "sequence",
];

/// Field metadata naming the JSON member a struct field comes from (names are snake_case).
pub const MEMBER_KEY: &str = "floodgate.member";

/// The table of events the edge rejected.
pub const QUARANTINE_TABLE: &str = "quarantine";

/// A schema feature the lake cannot represent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event_type} v{version}: cannot map {pointer} to a lake column: {reason}")]
pub struct MappingError {
    pub event_type: String,
    pub version: u32,
    /// JSON pointer into the schema document.
    pub pointer: String,
    pub reason: String,
}

/// One lake table: its name, Arrow schema, and where each data column comes from.
#[derive(Debug, Clone)]
pub struct Table {
    /// `booking.requested` → `booking_requested`.
    pub name: String,
    pub event_type: String,
    pub schema: SchemaRef,
    /// For each column after the envelope ones: the member name in `data`.
    pub data_members: Vec<String>,
}

/// The timestamp type of every time column: microseconds, UTC.
pub fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn dictionary() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// The envelope fields, in [`ENVELOPE_COLUMNS`] order.
pub fn envelope_fields() -> Vec<Field> {
    vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("source", dictionary(), false),
        Field::new("type", dictionary(), false),
        Field::new("time", timestamp(), true),
        Field::new("received_at", timestamp(), false),
        Field::new("shard", dictionary(), false),
        Field::new("sequence", DataType::Utf8, false),
    ]
}

/// The quarantine table: every event (or unreadable body) the edge rejected.
pub fn quarantine_schema() -> SchemaRef {
    let reason = Field::new(
        "item",
        DataType::Struct(Fields::from(vec![
            Field::new("pointer", DataType::Utf8, false),
            Field::new("message", DataType::Utf8, false),
        ])),
        true,
    );
    Arc::new(Schema::new(vec![
        Field::new("received_at", timestamp(), false),
        Field::new("event_id", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("type", DataType::Utf8, true),
        Field::new("reasons", DataType::List(Arc::new(reason)), false),
        Field::new("raw", DataType::Utf8, false),
        Field::new("shard", dictionary(), false),
        Field::new("sequence", DataType::Utf8, false),
    ]))
}

/// `booking.requested` → `booking_requested`.
pub fn table_name(event_type: &str) -> String {
    event_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `bookingId` → `booking_id`, `HTTPStatus` → `http_status`, `amount_minor` unchanged.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let boundary = prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
                || (prev.is_some_and(|p| p.is_ascii_uppercase())
                    && next.is_some_and(|n| n.is_ascii_lowercase()));
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out
}

/// Every event type's table, from the registry (all versions merged per type).
pub fn tables(registry: &Registry) -> Result<Vec<Table>, MappingError> {
    let mut out = Vec::new();
    for event_type in registry.types() {
        let mut versions = Vec::new();
        let mut v = 1;
        let latest = registry.latest(event_type).map_or(0, |e| e.version);
        while v <= latest {
            if let Some(entry) = registry.get(event_type, v) {
                versions.push((v, &entry.document));
            }
            v += 1;
        }
        out.push(table_for(event_type, &versions)?);
    }
    Ok(out)
}

/// The tables of derived event types, all sharing one `data` schema. A derived type whose
/// table name an ingested type already uses gets a `derived_` prefix
/// (`booking.cancelled` → `derived_booking_cancelled`).
pub fn derived_tables(
    types: &[&str],
    data_schema: &Value,
    ingested: &[Table],
) -> Result<Vec<Table>, MappingError> {
    types
        .iter()
        .map(|t| {
            let mut table = table_for(t, &[(1, data_schema)])?;
            if ingested.iter().any(|i| i.name == table.name) {
                table.name = format!("derived_{}", table.name);
            }
            Ok(table)
        })
        .collect()
}

/// The table of one event type from its schema versions, oldest first.
pub fn table_for(event_type: &str, versions: &[(u32, &Value)]) -> Result<Table, MappingError> {
    let mut fields = envelope_fields();
    let mut data_members: Vec<String> = Vec::new();
    for &(version, doc) in versions {
        let err = |pointer: &str, reason: &str| MappingError {
            event_type: event_type.to_owned(),
            version,
            pointer: pointer.to_owned(),
            reason: reason.to_owned(),
        };
        let ctx = Ctx {
            event_type,
            version,
        };
        let (props, required) = object_parts(doc, "").map_err(|(p, r)| err(&p, &r))?;
        for (member, schema) in props {
            let pointer = format!("/properties/{}", crate::escape_pointer_token(member));
            let (data_type, nullable) = ctx.map(schema, &pointer)?;
            let nullable = nullable || !required.contains(&member.as_str());
            let mut column = snake_case(member);
            if column.is_empty() {
                return Err(err(&pointer, "the member name has no letters or digits"));
            }
            if ENVELOPE_COLUMNS.contains(&column.as_str()) {
                column = format!("data_{column}");
            }
            match data_members.iter().position(|m| m == member) {
                Some(i) => {
                    let existing = &fields[ENVELOPE_COLUMNS.len() + i];
                    if existing.data_type() != &data_type {
                        return Err(err(
                            &pointer,
                            &format!(
                                "its type changed from {} to {data_type} between versions",
                                existing.data_type()
                            ),
                        ));
                    }
                    if nullable && !existing.is_nullable() {
                        let f = existing.clone().with_nullable(true);
                        fields[ENVELOPE_COLUMNS.len() + i] = f;
                    }
                }
                None => {
                    if fields.iter().any(|f| f.name() == &column) {
                        return Err(err(
                            &pointer,
                            &format!("its column name {column:?} is taken by another member"),
                        ));
                    }
                    // A column added by a later version is absent from older events.
                    let nullable = nullable || version > versions[0].0;
                    fields.push(Field::new(column, data_type, nullable));
                    data_members.push(member.clone());
                }
            }
        }
    }
    Ok(Table {
        name: table_name(event_type),
        event_type: event_type.to_owned(),
        schema: Arc::new(Schema::new(fields)),
        data_members,
    })
}

/// An object schema's properties and required names.
#[allow(clippy::type_complexity)]
fn object_parts<'a>(
    schema: &'a Value,
    pointer: &str,
) -> Result<(Vec<(&'a String, &'a Value)>, Vec<&'a str>), (String, String)> {
    let obj = schema
        .as_object()
        .ok_or_else(|| (pointer.to_owned(), "a schema must be an object".to_owned()))?;
    let Some(props) = obj.get("properties").and_then(Value::as_object) else {
        return Err((
            pointer.to_owned(),
            "an object without `properties` has no columns to map".to_owned(),
        ));
    };
    let required = obj
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Ok((props.iter().collect(), required))
}

struct Ctx<'a> {
    event_type: &'a str,
    version: u32,
}

/// Keywords that only constrain values; they never change the column type.
const VALUE_KEYWORDS: &[&str] = &[
    "type",
    "format",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "description",
    "title",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "$id",
    "$schema",
    "x-floodgate-partition-key",
];

impl Ctx<'_> {
    fn err(&self, pointer: &str, reason: impl Into<String>) -> MappingError {
        MappingError {
            event_type: self.event_type.to_owned(),
            version: self.version,
            pointer: pointer.to_owned(),
            reason: reason.into(),
        }
    }

    /// Maps one property schema; returns its type and whether `null` is allowed.
    fn map(&self, schema: &Value, pointer: &str) -> Result<(DataType, bool), MappingError> {
        let obj = schema
            .as_object()
            .ok_or_else(|| self.err(pointer, "a property schema must be an object"))?;
        if let Some(k) = obj.keys().find(|k| !VALUE_KEYWORDS.contains(&k.as_str())) {
            return Err(self.err(pointer, format!("the keyword {k:?} has no column mapping")));
        }
        let (ty, nullable) = match obj.get("type") {
            Some(Value::String(t)) => (t.as_str(), false),
            Some(Value::Array(ts)) => {
                let non_null: Vec<&str> = ts
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|t| *t != "null")
                    .collect();
                match non_null.as_slice() {
                    [t] => (*t, ts.len() > non_null.len()),
                    _ => {
                        return Err(
                            self.err(pointer, "a column has one type (optionally with \"null\")")
                        );
                    }
                }
            }
            _ => return Err(self.err(pointer, "a property needs a `type`")),
        };
        let data_type = match ty {
            "string" => match obj.get("format").and_then(Value::as_str) {
                Some("date-time") => timestamp(),
                Some("date") => DataType::Date32,
                _ if obj.contains_key("enum") => dictionary(),
                _ => DataType::Utf8,
            },
            "integer" => integer_type(obj),
            "number" => DataType::Float64,
            "boolean" => DataType::Boolean,
            "object" => {
                if obj.get("additionalProperties").is_some_and(|a| a != false) {
                    return Err(self.err(
                        pointer,
                        "an object with additionalProperties has no fixed columns",
                    ));
                }
                let (props, required) =
                    object_parts(schema, pointer).map_err(|(p, r)| self.err(&p, r))?;
                let mut children = Vec::new();
                for (member, child) in props {
                    let p = format!(
                        "{pointer}/properties/{}",
                        crate::escape_pointer_token(member)
                    );
                    let (t, n) = self.map(child, &p)?;
                    children.push(
                        Field::new(
                            snake_case(member),
                            t,
                            n || !required.contains(&member.as_str()),
                        )
                        .with_metadata(std::collections::HashMap::from([
                            (MEMBER_KEY.to_owned(), member.clone()),
                        ])),
                    );
                }
                DataType::Struct(Fields::from(children))
            }
            "array" => {
                let items = obj
                    .get("items")
                    .filter(|i| i.is_object())
                    .ok_or_else(|| self.err(pointer, "an array needs one `items` schema"))?;
                let (t, _) = self.map(items, &format!("{pointer}/items"))?;
                DataType::List(Arc::new(Field::new("item", t, true)))
            }
            other => return Err(self.err(pointer, format!("unknown type {other:?}"))),
        };
        Ok((data_type, nullable))
    }
}

fn integer_type(obj: &Map<String, Value>) -> DataType {
    let min = obj.get("minimum").and_then(Value::as_i64);
    let max = obj.get("maximum").and_then(Value::as_i64);
    match (min, max) {
        (Some(lo), Some(hi)) if lo >= i64::from(i8::MIN) && hi <= i64::from(i8::MAX) => {
            DataType::Int8
        }
        (Some(lo), Some(hi)) if lo >= i64::from(i16::MIN) && hi <= i64::from(i16::MAX) => {
            DataType::Int16
        }
        (Some(lo), Some(hi)) if lo >= i64::from(i32::MIN) && hi <= i64::from(i32::MAX) => {
            DataType::Int32
        }
        _ => DataType::Int64,
    }
}

/// The Athena (Hive DDL) type of an Arrow type.
pub fn athena_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 => "string".into(),
        DataType::Dictionary(_, v) => athena_type(v),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float64 => "double".into(),
        DataType::Float32 => "float".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Timestamp(..) => "timestamp".into(),
        DataType::Date32 => "date".into(),
        DataType::List(f) => format!("array<{}>", athena_type(f.data_type())),
        DataType::Struct(fields) => format!(
            "struct<{}>",
            fields
                .iter()
                .map(|f| format!("{}:{}", f.name(), athena_type(f.data_type())))
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => format!("string /* unmapped {other} */"),
    }
}

/// `CREATE EXTERNAL TABLE` for Athena: Parquet, partitioned by `dt` and `hour` with
/// partition projection, so no `MSCK REPAIR` or Glue crawler is needed.
pub fn athena_ddl(table: &str, schema: &Schema, location: &str) -> String {
    let location = location.trim_end_matches('/');
    let columns = schema
        .fields()
        .iter()
        .map(|f| format!("  `{}` {}", f.name(), athena_type(f.data_type())))
        .collect::<Vec<_>>()
        .join(",\n");
    let properties = [
        ("parquet.compression", "ZSTD".to_owned()),
        ("projection.enabled", "true".to_owned()),
        ("projection.dt.type", "date".to_owned()),
        ("projection.dt.format", "yyyy-MM-dd".to_owned()),
        ("projection.dt.range", "2020-01-01,NOW".to_owned()),
        ("projection.dt.interval", "1".to_owned()),
        ("projection.dt.interval.unit", "DAYS".to_owned()),
        ("projection.hour.type", "integer".to_owned()),
        ("projection.hour.range", "0,23".to_owned()),
        ("projection.hour.digits", "2".to_owned()),
        (
            "storage.location.template",
            format!("{location}/{table}/dt=${{dt}}/hour=${{hour}}/"),
        ),
    ]
    .iter()
    .map(|(k, v)| format!("  '{k}' = '{v}'"))
    .collect::<Vec<_>>()
    .join(",\n");
    format!(
        "CREATE EXTERNAL TABLE IF NOT EXISTS `{table}` (\n{columns}\n)\n\
         PARTITIONED BY (`dt` string, `hour` int)\n\
         STORED AS PARQUET\n\
         LOCATION '{location}/{table}/'\n\
         TBLPROPERTIES (\n{properties}\n);\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snake_cases() {
        for (a, b) in [
            ("bookingId", "booking_id"),
            ("amountMinor", "amount_minor"),
            ("HTTPStatus", "http_status"),
            ("already_snake", "already_snake"),
            ("seats", "seats"),
            ("a2b", "a2b"),
            ("fooBAR", "foo_bar"),
        ] {
            assert_eq!(snake_case(a), b, "{a}");
        }
        assert_eq!(table_name("booking.requested"), "booking_requested");
    }

    #[test]
    fn shipped_schemas_map() {
        let registry = Registry::builtin().unwrap();
        let tables = tables(&registry).unwrap();
        let t = tables
            .iter()
            .find(|t| t.name == "booking_requested")
            .unwrap();
        let s = &t.schema;
        assert_eq!(
            s.field_with_name("seats").unwrap().data_type(),
            &DataType::Int8
        );
        assert_eq!(
            s.field_with_name("requested_at").unwrap().data_type(),
            &timestamp()
        );
        assert_eq!(
            s.field_with_name("booking_id").unwrap().data_type(),
            &DataType::Utf8
        );
        assert!(!s.field_with_name("booking_id").unwrap().is_nullable());
        // `eventId` would collide with the CloudEvent id column.
        assert!(s.field_with_name("data_event_id").is_ok());
        assert_eq!(s.fields()[0].name(), "event_id");
    }

    #[test]
    fn versions_add_nullable_columns_and_refuse_type_changes() {
        let v1 = json!({"type":"object","required":["a"],"properties":{"a":{"type":"string"}}});
        let v2 = json!({"type":"object","required":["a"],"properties":{"a":{"type":"string"},"b":{"type":"integer"}}});
        let t = table_for("t", &[(1, &v1), (2, &v2)]).unwrap();
        let b = t.schema.field_with_name("b").unwrap();
        assert!(b.is_nullable());
        assert_eq!(b.data_type(), &DataType::Int64);
        let v3 = json!({"type":"object","properties":{"a":{"type":"integer"}}});
        let e = table_for("t", &[(1, &v1), (3, &v3)]).unwrap_err();
        assert_eq!(e.pointer, "/properties/a");
    }

    #[test]
    fn unmappable_features_name_their_pointer() {
        for (schema, pointer) in [
            (
                json!({"type":"object","properties":{"a":{"oneOf":[{"type":"string"}]}}}),
                "/properties/a",
            ),
            (
                json!({"type":"object","properties":{"a":{"type":["string","integer"]}}}),
                "/properties/a",
            ),
            (
                json!({"type":"object","properties":{"a":{"type":"object"}}}),
                "/properties/a",
            ),
            (
                json!({"type":"object","properties":{"a":{"type":"array"}}}),
                "/properties/a",
            ),
            (
                json!({"type":"object","properties":{"a":{"$ref":"#/x"}}}),
                "/properties/a",
            ),
            (
                json!({"type":"object","properties":{"o":{"type":"object","properties":{"x":{"anyOf":[]}}}}}),
                "/properties/o/properties/x",
            ),
        ] {
            let e = table_for("t", &[(1, &schema)]).unwrap_err();
            assert_eq!(e.pointer, pointer, "{schema}");
        }
        let ok = json!({"type":"object","properties":{
            "l":{"type":"array","items":{"type":"integer","minimum":0,"maximum":100000}},
            "s":{"type":"object","properties":{"n":{"type":["number","null"]}},"additionalProperties":false},
            "e":{"type":"string","enum":["a","b"]},
            "d":{"type":"string","format":"date"}}});
        let t = table_for("t", &[(1, &ok)]).unwrap();
        assert_eq!(
            athena_type(t.schema.field_with_name("l").unwrap().data_type()),
            "array<int>"
        );
        assert_eq!(
            athena_type(t.schema.field_with_name("s").unwrap().data_type()),
            "struct<n:double>"
        );
        assert_eq!(
            t.schema.field_with_name("e").unwrap().data_type(),
            &dictionary()
        );
    }
}
