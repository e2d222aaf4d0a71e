//! The lake's rows read straight from an event's text into Arrow builders, without
//! building a `serde_json::Value` tree: strings are borrowed from the text (copied once,
//! into the column's buffer), numbers and times are converted as they are read.
//!
//! It only ever takes a row that fits. [`Layout::stage`] reads an event against its
//! table and gives every column's value, or `None` when it meets anything it does not
//! decide itself: a value that does not fit its column, a required column without one, a
//! duplicate member, text that is not a CloudEvent object. The lake then takes the
//! reference way, [`crate::parquet::check`] and [`crate::parquet::column`] over parsed
//! `Value`s, which names every misfit. Both ways give the same columns for a row that
//! fits (`typed_rows_agree_with_the_reference` in `lake.rs` checks it, differentially);
//! nested columns (structs, lists) and members without a column are still parsed whole as
//! `Value`s, so that the typed way meets every number out of range, lone surrogate and
//! nesting too deep that the reference would, and declines them.

use std::borrow::Cow;
use std::sync::Arc;

use arrow_array::ArrayRef;
use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Builder,
    Int64Builder, StringBuilder, StringDictionaryBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::types::Int32Type;
use arrow_schema::DataType;
use floodgate_core::lake::{ENVELOPE_COLUMNS, Table};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::parquet::{self, EncodeError};

/// What a column holds, as this module reads and builds it.
#[derive(Debug, Clone)]
enum Kind {
    Utf8,
    Dictionary,
    Int8,
    Int16,
    Int32,
    Int64,
    Float64,
    Boolean,
    Timestamp,
    Date32,
    /// A struct or a list: read as a `Value`, checked and converted by the reference.
    Nested(DataType),
}

impl Kind {
    fn of(data_type: &DataType) -> Option<Kind> {
        Some(match data_type {
            DataType::Utf8 => Kind::Utf8,
            DataType::Dictionary(key, value)
                if **key == DataType::Int32 && **value == DataType::Utf8 =>
            {
                Kind::Dictionary
            }
            DataType::Int8 => Kind::Int8,
            DataType::Int16 => Kind::Int16,
            DataType::Int32 => Kind::Int32,
            DataType::Int64 => Kind::Int64,
            DataType::Float64 => Kind::Float64,
            DataType::Boolean => Kind::Boolean,
            DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _) => Kind::Timestamp,
            DataType::Date32 => Kind::Date32,
            DataType::Struct(_) | DataType::List(_) => Kind::Nested(data_type.clone()),
            _ => return None,
        })
    }
}

/// One column's value in a staged row (`None` in [`Staged`]: null or absent).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell<'a> {
    Str(Cow<'a, str>),
    /// An integer column's value, a timestamp's microseconds or a date's days.
    Int(i64),
    Float(f64),
    Bool(bool),
    Nested(Value),
}

/// A row's cells, one per column of its table, in the table's order.
pub(crate) type Staged<'a> = Vec<Option<Cell<'a>>>;

/// How the rows of one table are read: each column's kind and whether it may be null, and
/// the `data` members that have a column.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    kinds: Vec<Kind>,
    nullable: Vec<bool>,
    /// The columns a row must have a value in: those not nullable, but the lake's own
    /// (`received_at`, `shard`, `sequence`), which it always sets.
    required: Vec<usize>,
    /// `(member, column)` for every data column.
    members: Vec<(String, usize)>,
    /// Whether every column is one this module reads (else it declines every row).
    supported: bool,
}

/// The envelope's columns, by their place in [`ENVELOPE_COLUMNS`].
const EVENT_ID: usize = 0;
const SOURCE: usize = 1;
const TYPE: usize = 2;
const TIME: usize = 3;
pub(crate) const RECEIVED_AT: usize = 4;
pub(crate) const SHARD: usize = 5;
pub(crate) const SEQUENCE: usize = 6;

/// A JSON string, borrowed from the text unless it has escapes. (serde borrows a bare
/// `Cow<str>` field, but not one inside an `Option`, nor a map key.)
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(Strings)
    }
}

/// The parts of an event the lake reads, borrowed from its text. When the event's `type`
/// comes before its `data` (as producers write them), `data` is read in the same pass by
/// the table's [`Layout`]; otherwise it is kept as text, and read by [`Layout::stage`].
pub(crate) struct Head<'a, 'l> {
    id: Option<Text<'a>>,
    source: Option<Text<'a>>,
    event_type: Option<Text<'a>>,
    time: Option<Text<'a>>,
    data: Data<'a, 'l>,
}

/// An event's `data`, as [`Head::read`] left it.
enum Data<'a, 'l> {
    /// None, or `null`.
    Absent,
    /// Not read yet: its type came after it.
    Text(&'a RawValue),
    /// Read by this layout into a row's data columns.
    Read(&'l Layout, Staged<'a>),
}

/// One top-level member's value, set once (a repeated member is the reference's).
fn once<'de, T: Deserialize<'de>, M: MapAccess<'de>>(
    slot: &mut Option<Option<T>>,
    map: &mut M,
) -> Result<(), M::Error> {
    if slot.is_some() {
        return Err(decline());
    }
    *slot = Some(map.next_value::<Option<T>>()?);
    Ok(())
}

/// The layout of an event type's table, where the lake has one.
type LayoutOf<'f, 'l> = &'f dyn Fn(&str) -> Option<&'l Layout>;

/// Reads an event object into a [`Head`]: its `data` too, with `layout_of`; the envelope
/// alone without (`data` checked as JSON and kept as text).
struct HeadSeed<'f, 'l> {
    layout_of: Option<LayoutOf<'f, 'l>>,
}

impl<'de, 'f, 'l> Visitor<'de> for HeadSeed<'f, 'l> {
    type Value = Head<'de, 'l>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a CloudEvent object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Head<'de, 'l>, M::Error> {
        let (mut id, mut source, mut event_type, mut time) = (None, None, None, None);
        let mut data: Option<Data<'de, 'l>> = None;
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            match &*key {
                "id" => once(&mut id, &mut map)?,
                "source" => once(&mut source, &mut map)?,
                "type" => once(&mut event_type, &mut map)?,
                "time" => once(&mut time, &mut map)?,
                "data" => {
                    if data.is_some() {
                        return Err(decline());
                    }
                    let layout = match (&event_type, self.layout_of) {
                        (Some(Some(Text(t))), Some(layout_of)) => {
                            Some(layout_of(t).ok_or_else(decline)?)
                        }
                        _ => None,
                    };
                    data = Some(match layout {
                        // Read where it stands: at the depth the reference reads it.
                        Some(layout) if layout.supported => {
                            let mut row: Staged<'de> = vec![None; layout.kinds.len()];
                            map.next_value_seed(DataSeed {
                                layout,
                                row: &mut row,
                            })?;
                            Data::Read(layout, row)
                        }
                        Some(_) => return Err(decline()),
                        None => match map.next_value::<Option<&'de RawValue>>()? {
                            Some(text) => Data::Text(text),
                            None => Data::Absent,
                        },
                    });
                }
                // As the reference's own reading skips them.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Head {
            id: id.flatten(),
            source: source.flatten(),
            event_type: event_type.flatten(),
            time: time.flatten(),
            data: data.unwrap_or(Data::Absent),
        })
    }
}

impl<'a, 'l> Head<'a, 'l> {
    /// The event's head, its `data` read in the same pass when its type comes first and
    /// `layout_of` gives that type's layout; `None` when its text is not a JSON object
    /// whose envelope members the lake can read this way, or its type (coming before its
    /// `data`) has no layout (the reference decides those).
    pub(crate) fn read(
        payload: &'a [u8],
        layout_of: &dyn Fn(&str) -> Option<&'l Layout>,
    ) -> Option<Self> {
        Self::read_from(payload, Some(layout_of))
    }

    /// The event's envelope alone, as [`Self::read`] reads it, its `data` only checked
    /// as JSON and kept as text: what buffering needs to place a row (its type, time and
    /// ids), at half the cost of reading the row. [`Layout::stage`] reads the rest when
    /// the row's file is encoded.
    pub(crate) fn read_envelope(payload: &'a [u8]) -> Option<Self> {
        Self::read_from(payload, None)
    }

    fn read_from(payload: &'a [u8], layout_of: Option<LayoutOf<'_, 'l>>) -> Option<Self> {
        match std::str::from_utf8(payload) {
            // One check of the whole text, so the reader takes each string without its own.
            Ok(text) => Self::read_seed(serde_json::Deserializer::from_str(text), layout_of),
            // The same answer as ever for text that is not UTF-8 throughout.
            Err(_) => Self::read_seed(serde_json::Deserializer::from_slice(payload), layout_of),
        }
    }

    /// [`Self::read`] with the reader given (tests: to read bytes as bytes).
    #[cfg(test)]
    pub(crate) fn read_with<R: serde_json::de::Read<'a>>(
        de: serde_json::Deserializer<R>,
        layout_of: &dyn Fn(&str) -> Option<&'l Layout>,
    ) -> Option<Self> {
        Self::read_seed(de, Some(layout_of))
    }

    fn read_seed<R: serde_json::de::Read<'a>>(
        mut de: serde_json::Deserializer<R>,
        layout_of: Option<LayoutOf<'_, 'l>>,
    ) -> Option<Self> {
        let head = de::Deserializer::deserialize_map(&mut de, HeadSeed { layout_of }).ok()?;
        de.end().ok()?;
        Some(head)
    }

    /// Whether the envelope has the `id` and `source` (strings) every typed row needs.
    pub(crate) fn has_ids(&self) -> bool {
        self.id.is_some() && self.source.is_some()
    }

    /// The producer's `time` in microseconds: `Some(None)` when it has none; `None` when
    /// it is text the lake cannot read as a time.
    pub(crate) fn time_us(&self) -> Option<Option<i64>> {
        match &self.time {
            None => Some(None),
            Some(t) => parquet::rfc3339_micros(&t.0).map(Some),
        }
    }

    /// The event's `type`, when it is a string.
    pub(crate) fn event_type(&self) -> Option<&str> {
        self.event_type.as_ref().map(|t| &*t.0)
    }

    /// Where this envelope's strings and `data` lie in `payload` (the text it was read
    /// from), with its time: `None` unless `id`, `source` and `type` are strings without
    /// escapes (slices of the text), `time` reads as a time, and `data` was kept as text.
    pub(crate) fn spans(&self, payload: &[u8]) -> Option<Spans> {
        let span = |text: &str| -> Option<Span> {
            let start = (text.as_ptr() as usize).checked_sub(payload.as_ptr() as usize)?;
            let end = start.checked_add(text.len())?;
            (end <= payload.len()).then_some(())?;
            Some(Span(
                u16::try_from(start).ok()?,
                u16::try_from(text.len()).ok()?,
            ))
        };
        let borrowed = |t: &Option<Text<'a>>| match t {
            Some(Text(Cow::Borrowed(s))) => span(s),
            _ => None,
        };
        let time = self.time_us()?;
        Some(Spans {
            id: borrowed(&self.id)?,
            source: borrowed(&self.source)?,
            event_type: borrowed(&self.event_type)?,
            data: match &self.data {
                Data::Absent => None,
                Data::Text(raw) => Some(span(raw.get())?),
                Data::Read(..) => return None,
            },
            time_us: time.unwrap_or_default(),
            has_time: time.is_some(),
        })
    }
}

/// A part of an event's text: its offset and length in bytes. Sixteen bits each, as a
/// buffered row's size is what a buffer's memory counts: an event with a part that starts
/// or ends past 64 KiB has no spans, and is read whole again instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span(u16, u16);

impl Span {
    fn of<'a>(&self, payload: &'a [u8]) -> Option<&'a str> {
        let start = self.0 as usize;
        let bytes = payload.get(start..start.checked_add(self.1 as usize)?)?;
        std::str::from_utf8(bytes).ok()
    }
}

/// What buffering learnt of a placed event's envelope ([`Head::spans`]), so that encoding
/// its row reads its `data` alone ([`Layout::stage_spans`]) rather than the whole event
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spans {
    id: Span,
    source: Span,
    event_type: Span,
    /// `None`: no `data`, or `null`.
    data: Option<Span>,
    /// The `time` in microseconds, when `has_time` (two fields rather than an `Option`,
    /// which would make a buffered row 8 bytes larger).
    time_us: i64,
    has_time: bool,
}

/// Nesting the typed way reads as a whole `Value` at most: the reference parses `data`
/// inside the event (two levels down) against serde_json's limit of 128, while the typed
/// way parses a member on its own; a member nested deeper than this is the reference's.
const NESTING: usize = 64;

/// Whether the JSON text `text` nests arrays and objects deeper than `limit`.
fn nests_deeper_than(text: &str, limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A member's whole value parsed as the reference parses it (numbers in range, escapes
/// whole), when it does not nest past [`NESTING`]; an error (a decline) otherwise.
fn whole_value<'de, D: de::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    let raw = <&RawValue>::deserialize(d)?;
    if nests_deeper_than(raw.get(), NESTING) {
        return Err(decline());
    }
    serde_json::from_str(raw.get()).map_err(|_| decline())
}

impl Layout {
    /// Whether this module reads every column of the table (else [`Self::stage`] declines
    /// every row).
    pub(crate) fn supported(&self) -> bool {
        self.supported
    }

    pub(crate) fn of(table: &Table) -> Layout {
        let fields = table.schema.fields();
        let kinds: Vec<Option<Kind>> = fields.iter().map(|f| Kind::of(f.data_type())).collect();
        let supported = kinds.iter().all(Option::is_some)
            && fields.len() == ENVELOPE_COLUMNS.len() + table.data_members.len();
        Layout {
            kinds: kinds
                .into_iter()
                .map(|k| k.unwrap_or(Kind::Nested(DataType::Null)))
                .collect(),
            nullable: fields.iter().map(|f| f.is_nullable()).collect(),
            required: fields
                .iter()
                .enumerate()
                .filter(|(i, f)| {
                    !f.is_nullable() && !matches!(i, &RECEIVED_AT | &SHARD | &SEQUENCE)
                })
                .map(|(i, _)| i)
                .collect(),
            members: table
                .data_members
                .iter()
                .enumerate()
                .map(|(i, m)| (m.clone(), ENVELOPE_COLUMNS.len() + i))
                .collect(),
            supported,
        }
    }

    /// Every column's value of the event whose head is `head`, when the row fits its table
    /// and this module decides it; `None` sends it the reference way. The lake's own
    /// columns (`received_at`, `shard`, `sequence`) stay `None` here.
    pub(crate) fn stage<'a>(&self, head: Head<'a, '_>) -> Option<Staged<'a>> {
        if !self.supported {
            return None;
        }
        let time = head.time_us()?;
        let row: Staged<'a> = match head.data {
            Data::Read(layout, row) if std::ptr::eq(layout, self) => row,
            // Read by another table's layout: not this one's to judge.
            Data::Read(..) => return None,
            Data::Absent => vec![None; self.kinds.len()],
            Data::Text(data) => self.data_row(data.get())?,
        };
        self.complete(row, head.id?.0, head.source?.0, head.event_type?.0, time)
    }

    /// [`Self::stage`] for an event whose envelope buffering read already: `data` read
    /// from its span of `payload`, the envelope's values taken from theirs. The same row
    /// as `stage` gives for the whole event (`typed_rows_agree_with_the_reference` checks it).
    pub(crate) fn stage_spans<'a>(&self, payload: &'a [u8], spans: &Spans) -> Option<Staged<'a>> {
        if !self.supported {
            return None;
        }
        let row = match spans.data {
            None => vec![None; self.kinds.len()],
            Some(data) => self.data_row(data.of(payload)?)?,
        };
        let text = |span: Span| span.of(payload).map(Cow::Borrowed);
        self.complete(
            row,
            text(spans.id)?,
            text(spans.source)?,
            text(spans.event_type)?,
            spans.has_time.then_some(spans.time_us),
        )
    }

    /// A row with the data columns read from `data` (the text of an object or `null`).
    fn data_row<'a>(&self, data: &'a str) -> Option<Staged<'a>> {
        let mut row = vec![None; self.kinds.len()];
        let mut de = serde_json::Deserializer::from_str(data);
        DataSeed {
            layout: self,
            row: &mut row,
        }
        .deserialize(&mut de)
        .ok()?;
        Some(row)
    }

    /// `row` with its envelope's columns set, when every required column has a value.
    fn complete<'a>(
        &self,
        mut row: Staged<'a>,
        id: Cow<'a, str>,
        source: Cow<'a, str>,
        event_type: Cow<'a, str>,
        time_us: Option<i64>,
    ) -> Option<Staged<'a>> {
        row[EVENT_ID] = Some(Cell::Str(id));
        row[SOURCE] = Some(Cell::Str(source));
        row[TYPE] = Some(Cell::Str(event_type));
        row[TIME] = time_us.map(Cell::Int);
        let required_missing = self.required.iter().any(|&i| row[i].is_none());
        (!required_missing).then_some(row)
    }
}

/// Reads `data` (an object) into a row's data columns.
struct DataSeed<'l, 'r, 'a> {
    layout: &'l Layout,
    row: &'r mut Staged<'a>,
}

/// Why a staged read stopped: the reference decides.
fn decline<E: de::Error>() -> E {
    E::custom("not for the typed path")
}

impl<'de, 'l, 'r, 'a> DeserializeSeed<'de> for DataSeed<'l, 'r, 'a>
where
    'de: 'a,
{
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 'l, 'r, 'a> Visitor<'de> for DataSeed<'l, 'r, 'a>
where
    'de: 'a,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }

    /// `"data": null` reads as no `data`, as the reference reads it.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let mut seen = vec![false; self.layout.members.len()];
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            let Some(m) = self
                .layout
                .members
                .iter()
                .position(|(member, _)| *member == *key)
            else {
                // Without a column, but the reference parses it: so must this.
                map.next_value_seed(WholeValue)?;
                continue;
            };
            // A repeated member: the reference keeps the last; it decides.
            if std::mem::replace(&mut seen[m], true) {
                return Err(decline());
            }
            let column = self.layout.members[m].1;
            let kind = &self.layout.kinds[column];
            let nullable = self.layout.nullable[column];
            self.row[column] = map.next_value_seed(CellSeed { kind, nullable })?;
        }
        Ok(())
    }
}

/// A member's value read whole and dropped ([`whole_value`]).
struct WholeValue;

impl<'de> DeserializeSeed<'de> for WholeValue {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        whole_value(d).map(drop)
    }
}

/// Reads one value of a column: `Ok(None)` for a null, an error (a decline) for a value
/// that does not fit.
struct CellSeed<'k> {
    kind: &'k Kind,
    nullable: bool,
}

impl<'de, 'k> DeserializeSeed<'de> for CellSeed<'k> {
    type Value = Option<Cell<'de>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if let Kind::Nested(data_type) = self.kind {
            let value = whole_value(d)?;
            if value.is_null() {
                return Ok(None);
            }
            parquet::check(data_type, self.nullable, Some(&value)).map_err(|_| decline())?;
            return Ok(Some(Cell::Nested(value)));
        }
        d.deserialize_any(self)
    }
}

/// `2^63`: the first number past `i64::MAX`, exactly an f64.
const I64_LIMIT: f64 = 9_223_372_036_854_775_808.0;

impl<'de, 'k> CellSeed<'k> {
    /// An integer column's value of `i` (as [`parquet::int`] reads it), narrowed to the
    /// column's width.
    fn integer<E: de::Error>(&self, i: i64) -> Result<Option<Cell<'de>>, E> {
        let fits = match self.kind {
            Kind::Int8 => i8::try_from(i).is_ok(),
            Kind::Int16 => i16::try_from(i).is_ok(),
            Kind::Int32 => i32::try_from(i).is_ok(),
            Kind::Int64 | Kind::Timestamp => true,
            Kind::Float64 => return Ok(Some(Cell::Float(i as f64))),
            _ => false,
        };
        if fits {
            Ok(Some(Cell::Int(i)))
        } else {
            Err(decline())
        }
    }

    fn text<E: de::Error>(&self, s: Cow<'de, str>) -> Result<Option<Cell<'de>>, E> {
        match self.kind {
            Kind::Utf8 | Kind::Dictionary => Ok(Some(Cell::Str(s))),
            Kind::Timestamp => parquet::rfc3339_micros(&s)
                .map(|t| Some(Cell::Int(t)))
                .ok_or_else(decline),
            Kind::Date32 => floodgate_core::rfc3339::full_date_days(&s)
                .map(|d| Some(Cell::Int(i64::from(d))))
                .ok_or_else(decline),
            _ => Err(decline()),
        }
    }
}

impl<'de, 'k> Visitor<'de> for CellSeed<'k> {
    type Value = Option<Cell<'de>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a column's value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        match self.kind {
            Kind::Boolean => Ok(Some(Cell::Bool(b))),
            _ => Err(decline()),
        }
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Self::Value, E> {
        self.integer(i)
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Self::Value, E> {
        match i64::try_from(u) {
            Ok(i) => self.integer(i),
            // Past i64: only a double holds it (as `Value::as_f64` reads it).
            Err(_) => match self.kind {
                Kind::Float64 => Ok(Some(Cell::Float(u as f64))),
                _ => Err(decline()),
            },
        }
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Self::Value, E> {
        match self.kind {
            Kind::Float64 => Ok(Some(Cell::Float(f))),
            // `2.0` and `1e0` are integers; a timestamp reads only a JSON integer.
            Kind::Int8 | Kind::Int16 | Kind::Int32 | Kind::Int64
                if f.fract() == 0.0 && (-I64_LIMIT..I64_LIMIT).contains(&f) =>
            {
                self.integer(f as i64)
            }
            _ => Err(decline()),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        self.text(Cow::Borrowed(s))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        self.text(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        self.text(Cow::Owned(s))
    }

    fn visit_map<M: MapAccess<'de>>(self, _: M) -> Result<Self::Value, M::Error> {
        Err(decline())
    }

    fn visit_seq<S: de::SeqAccess<'de>>(self, _: S) -> Result<Self::Value, S::Error> {
        Err(decline())
    }
}

/// A cell as the reference converts a parsed value into a column: what does not convert
/// is `None`. For a row the reference way takes.
pub(crate) fn cell_of<'a>(data_type: &DataType, value: Option<&Value>) -> Option<Cell<'a>> {
    let value = value.filter(|v| !v.is_null())?;
    match Kind::of(data_type)? {
        Kind::Utf8 | Kind::Dictionary => value.as_str().map(|s| Cell::Str(Cow::Owned(s.into()))),
        Kind::Int8 => parquet::int(value)
            .filter(|i| i8::try_from(*i).is_ok())
            .map(Cell::Int),
        Kind::Int16 => parquet::int(value)
            .filter(|i| i16::try_from(*i).is_ok())
            .map(Cell::Int),
        Kind::Int32 => parquet::int(value)
            .filter(|i| i32::try_from(*i).is_ok())
            .map(Cell::Int),
        Kind::Int64 => parquet::int(value).map(Cell::Int),
        Kind::Float64 => value.as_f64().map(Cell::Float),
        Kind::Boolean => value.as_bool().map(Cell::Bool),
        Kind::Timestamp => parquet::timestamp(value).map(Cell::Int),
        Kind::Date32 => value
            .as_str()
            .and_then(floodgate_core::rfc3339::full_date_days)
            .map(|d| Cell::Int(i64::from(d))),
        Kind::Nested(_) => Some(Cell::Nested(value.clone())),
    }
}

/// One column being built.
enum Builder {
    Utf8(StringBuilder),
    Dictionary(StringDictionaryBuilder<Int32Type>),
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder, DataType),
    Date32(Date32Builder),
    Nested(DataType, Vec<Option<Value>>),
}

/// The columns of one slice of a table's rows, appended a row at a time.
pub(crate) struct Columns {
    builders: Vec<Builder>,
}

impl Columns {
    pub(crate) fn new(table: &Table, rows: usize) -> Result<Columns, EncodeError> {
        let builders = table
            .schema
            .fields()
            .iter()
            .map(|f| {
                let kind = Kind::of(f.data_type()).ok_or_else(|| {
                    EncodeError::Arrow(arrow_schema::ArrowError::NotYetImplemented(format!(
                        "lake column type {}",
                        f.data_type()
                    )))
                })?;
                Ok(match kind {
                    Kind::Utf8 => Builder::Utf8(StringBuilder::with_capacity(rows, rows * 16)),
                    Kind::Dictionary => Builder::Dictionary(StringDictionaryBuilder::new()),
                    Kind::Int8 => Builder::Int8(Int8Builder::with_capacity(rows)),
                    Kind::Int16 => Builder::Int16(Int16Builder::with_capacity(rows)),
                    Kind::Int32 => Builder::Int32(Int32Builder::with_capacity(rows)),
                    Kind::Int64 => Builder::Int64(Int64Builder::with_capacity(rows)),
                    Kind::Float64 => Builder::Float64(Float64Builder::with_capacity(rows)),
                    Kind::Boolean => Builder::Boolean(BooleanBuilder::with_capacity(rows)),
                    Kind::Timestamp => Builder::Timestamp(
                        TimestampMicrosecondBuilder::with_capacity(rows),
                        f.data_type().clone(),
                    ),
                    Kind::Date32 => Builder::Date32(Date32Builder::with_capacity(rows)),
                    Kind::Nested(data_type) => Builder::Nested(data_type, Vec::with_capacity(rows)),
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        Ok(Columns { builders })
    }

    /// Appends one row's cells, in the table's column order. A cell of the wrong kind is a
    /// null (as the reference stores a value that does not convert).
    pub(crate) fn push(&mut self, row: Staged<'_>) {
        for (builder, cell) in self.builders.iter_mut().zip(row) {
            match (builder, cell) {
                (Builder::Utf8(b), Some(Cell::Str(s))) => b.append_value(s),
                (Builder::Utf8(b), _) => b.append_null(),
                (Builder::Dictionary(b), Some(Cell::Str(s))) => {
                    b.append_value(s);
                }
                (Builder::Dictionary(b), _) => b.append_null(),
                (Builder::Int8(b), cell) => b.append_option(int(cell)),
                (Builder::Int16(b), cell) => b.append_option(int(cell)),
                (Builder::Int32(b), cell) => b.append_option(int(cell)),
                (Builder::Int64(b), cell) => b.append_option(int(cell)),
                (Builder::Timestamp(b, _), cell) => b.append_option(int(cell)),
                (Builder::Date32(b), cell) => b.append_option(int(cell)),
                (Builder::Float64(b), Some(Cell::Float(f))) => b.append_value(f),
                (Builder::Float64(b), _) => b.append_null(),
                (Builder::Boolean(b), Some(Cell::Bool(v))) => b.append_value(v),
                (Builder::Boolean(b), _) => b.append_null(),
                (Builder::Nested(_, values), Some(Cell::Nested(v))) => values.push(Some(v)),
                (Builder::Nested(_, values), _) => values.push(None),
            }
        }
    }

    /// The finished columns; the builders are ready for the next slice.
    pub(crate) fn finish(&mut self) -> Result<Vec<ArrayRef>, EncodeError> {
        self.builders
            .iter_mut()
            .map(|builder| -> Result<ArrayRef, EncodeError> {
                Ok(match builder {
                    Builder::Utf8(b) => Arc::new(b.finish()),
                    Builder::Dictionary(b) => Arc::new(b.finish()),
                    Builder::Int8(b) => Arc::new(b.finish()),
                    Builder::Int16(b) => Arc::new(b.finish()),
                    Builder::Int32(b) => Arc::new(b.finish()),
                    Builder::Int64(b) => Arc::new(b.finish()),
                    Builder::Float64(b) => Arc::new(b.finish()),
                    Builder::Boolean(b) => Arc::new(b.finish()),
                    Builder::Timestamp(b, data_type) => {
                        let tz = match data_type {
                            DataType::Timestamp(_, tz) => tz.clone(),
                            _ => None,
                        };
                        Arc::new(b.finish().with_timezone_opt(tz))
                    }
                    Builder::Date32(b) => Arc::new(b.finish()),
                    Builder::Nested(data_type, values) => {
                        let values = std::mem::take(values);
                        let refs: Vec<Option<&Value>> = values.iter().map(Option::as_ref).collect();
                        parquet::column(data_type, &refs)?
                    }
                })
            })
            .collect()
    }
}

/// An integer-backed column's value; narrowing cannot fail (the cell was checked), and
/// would give a null if it did.
fn int<T: TryFrom<i64>>(cell: Option<Cell<'_>>) -> Option<T> {
    match cell {
        Some(Cell::Int(i)) => T::try_from(i).ok(),
        _ => None,
    }
}
