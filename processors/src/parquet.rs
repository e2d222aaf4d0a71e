//! Encoding lake rows as Parquet: JSON values into the Arrow arrays of a
//! [`floodgate_core::lake::Table`], then zstd-compressed, dictionary-encoded Parquet with
//! statistics, row groups of up to a million rows (Athena reads them in parallel).
//!
//! Whether a value fits its column is decided once, here: [`check`] says, before a row is
//! buffered, whether every value converts to its column's type (and every required column
//! has one), and [`column`] converts with the same functions. A JSON Schema can accept what
//! a column cannot hold (an `integer` with no `maximum` past i64, `1e30`); the lake
//! consumer sends such a row to the `quarantine` table with [`Misfit`]'s reason instead of
//! storing a null or failing the file. Integers written as `2.0` or `1e0` are integers.

use std::sync::Arc;

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int8Array, Int16Array, Int32Array,
    Int64Array, ListArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, SchemaRef};
use bytes::Bytes;
use floodgate_core::lake::MEMBER_KEY;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde_json::Value;

/// Rows per row group at most.
pub const ROW_GROUP_ROWS: usize = 1_000_000;
/// Bytes per row group at most (before encoding): Athena's recommended 128 MiB.
pub const ROW_GROUP_BYTES: usize = 128 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// A buffered row that cannot be read back (the lake checked it when it buffered it).
    #[error("row: {0}")]
    Row(String),
}

/// Builds one column from the values of its rows (`None`: absent). A value that does not
/// fit (see [`check`]) becomes a null; the lake checks every row before it buffers it.
pub fn column(data_type: &DataType, values: &[Option<&Value>]) -> Result<ArrayRef, EncodeError> {
    fn v<'a>(x: &Option<&'a Value>) -> Option<&'a Value> {
        x.filter(|v| !v.is_null())
    }
    Ok(match data_type {
        DataType::Utf8 => Arc::new(StringArray::from_iter(
            values.iter().map(|x| v(x).and_then(Value::as_str)),
        )),
        DataType::Dictionary(_, _) => {
            let mut b = StringDictionaryBuilder::<Int32Type>::new();
            for x in values {
                match v(x).and_then(Value::as_str) {
                    Some(s) => {
                        b.append_value(s);
                    }
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        DataType::Int8 => Arc::new(Int8Array::from_iter(
            values
                .iter()
                .map(|x| v(x).and_then(int).and_then(|i| i8::try_from(i).ok())),
        )),
        DataType::Int16 => Arc::new(Int16Array::from_iter(
            values
                .iter()
                .map(|x| v(x).and_then(int).and_then(|i| i16::try_from(i).ok())),
        )),
        DataType::Int32 => Arc::new(Int32Array::from_iter(
            values
                .iter()
                .map(|x| v(x).and_then(int).and_then(|i| i32::try_from(i).ok())),
        )),
        DataType::Int64 => Arc::new(Int64Array::from_iter(
            values.iter().map(|x| v(x).and_then(int)),
        )),
        DataType::Float64 => Arc::new(Float64Array::from_iter(
            values.iter().map(|x| v(x).and_then(Value::as_f64)),
        )),
        DataType::Boolean => Arc::new(BooleanArray::from_iter(
            values.iter().map(|x| v(x).and_then(Value::as_bool)),
        )),
        DataType::Timestamp(_, tz) => Arc::new(
            TimestampMicrosecondArray::from_iter(values.iter().map(|x| v(x).and_then(timestamp)))
                .with_timezone_opt(tz.clone()),
        ),
        DataType::Date32 => Arc::new(Date32Array::from_iter(
            values
                .iter()
                .map(|x| v(x).and_then(Value::as_str).and_then(date_days)),
        )),
        DataType::Struct(fields) => {
            let mut children = Vec::with_capacity(fields.len());
            for f in fields {
                let member = f
                    .metadata()
                    .get(MEMBER_KEY)
                    .cloned()
                    .unwrap_or_else(|| f.name().clone());
                let child: Vec<Option<&Value>> = values
                    .iter()
                    .map(|x| v(x).and_then(|o| o.get(&member)))
                    .collect();
                children.push(column(f.data_type(), &child)?);
            }
            let mut nulls: Vec<bool> = values
                .iter()
                .map(|x| v(x).is_some_and(Value::is_object))
                .collect();
            // An object without a value its struct requires does not fit: a null struct.
            for (f, child) in fields.iter().zip(&children) {
                if !f.is_nullable() && child.null_count() > 0 {
                    for (i, valid) in nulls.iter_mut().enumerate() {
                        *valid &= child.is_valid(i);
                    }
                }
            }
            Arc::new(StructArray::try_new(
                fields.clone(),
                children,
                Some(nulls.into()),
            )?)
        }
        DataType::List(item) => {
            let mut offsets = vec![0i32];
            let mut flat: Vec<Option<&Value>> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            for x in values {
                match v(x).and_then(Value::as_array) {
                    Some(items) => {
                        flat.extend(items.iter().map(Some));
                        valid.push(true);
                    }
                    None => valid.push(false),
                }
                offsets.push(i32::try_from(flat.len()).unwrap_or(i32::MAX));
            }
            let child = column(item.data_type(), &flat)?;
            Arc::new(ListArray::try_new(
                item.clone(),
                OffsetBuffer::new(offsets.into()),
                child,
                Some(valid.into()),
            )?)
        }
        other => {
            return Err(EncodeError::Arrow(
                arrow_schema::ArrowError::NotYetImplemented(format!("lake column type {other}")),
            ));
        }
    })
}

/// An integer column's value: a JSON integer, or a number without a fractional part
/// (`2.0`, `1e0`: integers under JSON Schema 2020-12), when it lies within i64.
pub fn int(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    // −2^63 is exactly representable as f64; 2^63 is the first value past i64::MAX.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    v.as_f64()
        .filter(|f| f.fract() == 0.0 && (-LIMIT..LIMIT).contains(f))
        .map(|f| f as i64)
}

/// A timestamp column's value in microseconds: an RFC 3339 `date-time` string (every
/// spelling the edge's validator accepts; see [`floodgate_core::rfc3339`]), or already
/// microseconds (the envelope's `time` and `received_at`).
pub fn timestamp(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => rfc3339_micros(s),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 timestamp.
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    floodgate_core::rfc3339::date_time_micros(s)
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date.
fn date_days(s: &str) -> Option<i32> {
    floodgate_core::rfc3339::full_date_days(s)
}

/// Why a value does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    /// Where, below the column's own JSON pointer: `""` for the value itself,
    /// `/items/0/price` for a part of it.
    pub pointer: String,
    pub message: String,
}

/// A column type as the messages name it.
fn type_name(t: &DataType) -> &'static str {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Dictionary(..) => "string",
        DataType::Int8 => "int8",
        DataType::Int16 => "int16",
        DataType::Int32 => "int32",
        DataType::Int64 => "int64",
        DataType::Float64 => "double",
        DataType::Boolean => "boolean",
        DataType::Timestamp(..) => "timestamp",
        DataType::Date32 => "date",
        DataType::Struct(_) => "struct",
        DataType::List(_) => "list",
        _ => "unsupported",
    }
}

/// `v` as JSON, cut short for a message.
fn shown(v: &Value) -> String {
    const MAX: usize = 80;
    let mut s = v.to_string();
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Whether `value` (`None`: absent) fits a column of `data_type`: exactly the values
/// [`column`] stores as they are, rather than as a null. `nullable`: whether the column may
/// hold a null.
pub fn check(data_type: &DataType, nullable: bool, value: Option<&Value>) -> Result<(), Misfit> {
    let misfit = |message: String| {
        Err(Misfit {
            pointer: String::new(),
            message,
        })
    };
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return if nullable {
            Ok(())
        } else {
            misfit(format!(
                "is missing, but the lake's {} column requires a value",
                type_name(data_type)
            ))
        };
    };
    let fits = match data_type {
        DataType::Utf8 | DataType::Dictionary(..) => value.is_string(),
        DataType::Int8 => int(value).is_some_and(|i| i8::try_from(i).is_ok()),
        DataType::Int16 => int(value).is_some_and(|i| i16::try_from(i).is_ok()),
        DataType::Int32 => int(value).is_some_and(|i| i32::try_from(i).is_ok()),
        DataType::Int64 => int(value).is_some(),
        DataType::Float64 => value.as_f64().is_some(),
        DataType::Boolean => value.is_boolean(),
        DataType::Timestamp(..) => timestamp(value).is_some(),
        DataType::Date32 => value.as_str().and_then(date_days).is_some(),
        DataType::Struct(fields) => {
            let Some(obj) = value.as_object() else {
                return misfit(format!(
                    "{} does not fit the lake's struct column",
                    shown(value)
                ));
            };
            for f in fields {
                let member = f
                    .metadata()
                    .get(MEMBER_KEY)
                    .map_or_else(|| f.name().as_str(), String::as_str);
                check(f.data_type(), f.is_nullable(), obj.get(member)).map_err(|m| Misfit {
                    pointer: format!(
                        "/{}{}",
                        floodgate_core::escape_pointer_token(member),
                        m.pointer
                    ),
                    message: m.message,
                })?;
            }
            true
        }
        DataType::List(item) => {
            let Some(items) = value.as_array() else {
                return misfit(format!(
                    "{} does not fit the lake's list column",
                    shown(value)
                ));
            };
            for (i, v) in items.iter().enumerate() {
                check(item.data_type(), item.is_nullable(), Some(v)).map_err(|m| Misfit {
                    pointer: format!("/{i}{}", m.pointer),
                    message: m.message,
                })?;
            }
            true
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        misfit(format!(
            "{} does not fit the lake's {} column",
            shown(value),
            type_name(data_type)
        ))
    }
}

/// Row groups of at most [`ROW_GROUP_ROWS`] and [`ROW_GROUP_BYTES`], zstd, dictionaries,
/// page statistics.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("a valid level"),
        ))
        .set_dictionary_enabled(true)
        // Unique per row: a dictionary would only cost time before falling back to plain.
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("sequence"), false)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_created_by(concat!("floodgate ", env!("CARGO_PKG_VERSION")).to_owned())
        .build()
}

/// Encodes `columns` (in `schema` order) as one Parquet file.
pub fn encode(schema: &SchemaRef, columns: Vec<ArrayRef>) -> Result<Bytes, EncodeError> {
    let mut file = FileEncoder::new(schema)?;
    file.write(columns)?;
    file.finish()
}

/// One Parquet file written a slice of rows at a time: the caller converts a few thousand
/// rows to columns, hands them over, and drops them before the next slice, so encoding a
/// large buffer never holds all its rows as Arrow arrays (or parsed JSON) at once. The
/// writer keeps a row group in its encoded form until it is full; the file is the same as
/// one [`encode`] of every row.
#[derive(Debug)]
pub struct FileEncoder {
    schema: SchemaRef,
    writer: ArrowWriter<Vec<u8>>,
}

impl FileEncoder {
    pub fn new(schema: &SchemaRef) -> Result<Self, EncodeError> {
        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(writer_properties()))?;
        Ok(Self {
            schema: schema.clone(),
            writer,
        })
    }

    /// Appends rows given as `columns` (in the schema's order).
    pub fn write(&mut self, columns: Vec<ArrayRef>) -> Result<(), EncodeError> {
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    /// Closes the file (its footer) and returns its bytes.
    pub fn finish(self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::from(self.writer.into_inner()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{Field, Fields};
    use serde_json::json;

    /// `check` and `column` agree: a value is stored as it is exactly when it fits.
    #[test]
    fn check_says_what_column_stores() {
        let nested = DataType::Struct(Fields::from(vec![
            Field::new("a", DataType::Int8, false),
            Field::new(
                "l",
                DataType::List(Arc::new(Field::new("item", DataType::Int16, true))),
                true,
            ),
        ]));
        let cases: Vec<(DataType, Vec<Value>)> = vec![
            (
                DataType::Int8,
                vec![
                    json!(2),
                    json!(2.0),
                    json!(1e0),
                    json!(127),
                    json!(128),
                    json!(-129),
                    json!(2.5),
                    json!("2"),
                ],
            ),
            (
                DataType::Int64,
                vec![
                    json!(i64::MAX),
                    json!(i64::MIN),
                    json!(u64::MAX),
                    json!(1e30),
                    json!(-9.3e18),
                    json!(-9_223_372_036_854_775_808.0),
                    json!(9_223_372_036_854_775_808.0),
                    serde_json::from_str("18446744073709551616").unwrap(),
                    json!(1500.0),
                ],
            ),
            (
                DataType::Float64,
                vec![json!(1), json!(u64::MAX), json!(1e300), json!(true)],
            ),
            (
                floodgate_core::lake::timestamp(),
                vec![
                    json!("2026-03-15T23:59:60Z"),
                    json!("2026-03-15t10:00:00z"),
                    json!("2026-03-15T10:00:00.1234567891234Z"),
                    json!("2026-03-15T10:00:00"),
                    json!(5),
                ],
            ),
            (
                DataType::Date32,
                vec![
                    json!("0000-02-29"),
                    json!("2026-02-29"),
                    json!("2026-03-15"),
                ],
            ),
            (DataType::Boolean, vec![json!(true), json!(1)]),
            (DataType::Utf8, vec![json!("x"), json!(1)]),
        ];
        for (t, values) in cases {
            let refs: Vec<Option<&Value>> = values.iter().map(Some).collect();
            let array = column(&t, &refs).unwrap();
            for (i, v) in values.iter().enumerate() {
                let fits = check(&t, true, Some(v)).is_ok();
                assert_eq!(fits, array.is_valid(i), "{t} {v}");
            }
        }
        // Nested: a misfit anywhere inside makes the whole value not fit; `column` never
        // fails on one (an object without a required member is a null struct).
        let values = [
            json!({"a": 1}),
            json!({"a": 1.0, "l": [1, 2.0, null]}),
            json!({"l": [1]}),
            json!({"a": 1, "l": [1, 40000]}),
            json!({"a": 1, "l": 3}),
            json!([1]),
        ];
        let fits: Vec<bool> = values
            .iter()
            .map(|v| check(&nested, true, Some(v)).is_ok())
            .collect();
        assert_eq!(fits, [true, true, false, false, false, false]);
        let refs: Vec<Option<&Value>> = values.iter().map(Some).collect();
        let array = column(&nested, &refs).unwrap();
        assert!(array.is_valid(0) && array.is_valid(1) && array.is_null(2) && array.is_null(5));
        assert!(check(&DataType::Int8, false, None).is_err());
        assert!(check(&DataType::Int8, false, Some(&Value::Null)).is_err());
        assert!(check(&DataType::Int8, true, None).is_ok());
        // Where inside a value the misfit is.
        let m = check(&nested, false, Some(&json!({"l": [1]}))).unwrap_err();
        assert_eq!(m.pointer, "/a");
        assert!(m.message.contains("requires a value"), "{}", m.message);
        let m = check(&nested, false, Some(&json!({"a": 1, "l": [1, 40000]}))).unwrap_err();
        assert_eq!(m.pointer, "/l/1");
        assert_eq!(m.message, "40000 does not fit the lake's int16 column");
        let m = check(&DataType::Int64, false, Some(&json!(1e30))).unwrap_err();
        assert_eq!(
            (m.pointer.as_str(), m.message.as_str()),
            ("", "1e+30 does not fit the lake's int64 column")
        );
        // A long value is cut short in the message.
        let m = check(&DataType::Int64, false, Some(&json!("x".repeat(10_000)))).unwrap_err();
        assert!(m.message.len() < 200, "{}", m.message);
    }
}
