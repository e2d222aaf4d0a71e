//! Encoding lake rows as Parquet: JSON values into the Arrow arrays of a
//! [`floodgate_core::lake::Table`], then zstd-compressed, dictionary-encoded Parquet with
//! statistics, row groups of up to a million rows (Athena reads them in parallel).
//!
//! Values were validated against the same schemas the tables come from, so every value
//! fits its column; one that does not (an older producer, a hand-edited log) becomes a
//! null in that column, never a failed file.

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
}

/// Builds one column from the values of its rows (`None`: absent).
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
            TimestampMicrosecondArray::from_iter(values.iter().map(|x| {
                v(x).and_then(|v| match v {
                    Value::String(s) => rfc3339_micros(s),
                    // Already microseconds (the envelope's `received_at`).
                    Value::Number(n) => n.as_i64(),
                    _ => None,
                })
            }))
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
            let nulls: Vec<bool> = values
                .iter()
                .map(|x| v(x).is_some_and(Value::is_object))
                .collect();
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

fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
            .map(|f| f as i64)
    })
}

/// Microseconds since the Unix epoch of an RFC 3339 timestamp.
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date.
fn date_days(s: &str) -> Option<i32> {
    let mut parts = s.splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    let d = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?;
    Some(d.to_julian_day() - epoch.to_julian_day())
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
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 4 + 1024);
    let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), Some(writer_properties()))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
}
