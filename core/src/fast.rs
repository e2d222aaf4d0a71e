//! The edge's fast path: an event accepted straight from its text, without building a
//! `serde_json::Value` of it.
//!
//! [`crate::registry::Registry::check`] works on a parsed tree: the strict parse builds
//! every string, number and map of the event, the envelope check reads them back, and the
//! JSON Schema validator walks `data` generically. For the events a producer means to send
//! (almost all of them) that is most of the edge's CPU. This module accepts such an event
//! in one pass over its envelope and one over its `data`, borrowing from the text:
//!
//! - [`FastSchema`] is compiled from a schema when its objects use only `type: object`,
//!   `properties`, `required` and `additionalProperties: false` (plus annotations). Those
//!   are checked here, as the event is read: a member not named, a member named twice, a
//!   required member missing. Every other value (`string` with `pattern` or `format`,
//!   `integer` with bounds, anything else) is a *leaf*, checked by `jsonschema` itself
//!   with a validator compiled from its subschema, so its semantics are exactly the
//!   reference's.
//! - [`check`] reads the envelope with the same rules as [`crate::envelope`], calling the
//!   same predicates, for the attributes a well-formed event carries.
//!
//! The fast path only ever *accepts*. Whatever it does not recognise, or finds at fault,
//! it declines, and the event goes the reference way (strict parse, envelope check,
//! `jsonschema`), which decides and names every fault with its pointer. So the edge's
//! answers are the reference's by construction; `core/tests/fast_path.rs` checks that
//! every body gets the same outcomes either way, and `fuzz_targets/fast_path.rs` that the
//! fast path never accepts what the reference rejects.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::ByteString;

use crate::envelope::{self, SPEC_VERSION};
use crate::strict;
use crate::trace_context::{TRACEPARENT, TRACESTATE};

/// Keywords that only annotate: they never change whether an instance is valid.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// Keywords that make a subschema depend on something outside itself; a leaf holding any
/// of them is not compiled alone.
const CONTEXTUAL: &[&str] = &[
    "$ref",
    "$dynamicRef",
    "$recursiveRef",
    "$id",
    "$schema",
    "$anchor",
    "$dynamicAnchor",
    "$recursiveAnchor",
    "$vocabulary",
];

/// Members an object may name with the bit set of [`ObjectNode::required`].
const MAX_MEMBERS: usize = 64;
// The envelope's visitor tracks the attributes the spec names by one bit each.
const _: () = assert!(envelope::KNOWN.len() <= 16);

/// A schema's `data` check, specialised; see the module docs.
pub struct FastSchema {
    root: ObjectNode,
    /// The member of the root that holds the partition key, when the schema names one.
    key_member: Option<usize>,
}

impl fmt::Debug for FastSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastSchema")
            .field("members", &self.root.members.len())
            .field("key_member", &self.key_member)
            .finish()
    }
}

/// An object with a closed set of members.
struct ObjectNode {
    members: Vec<(String, Node)>,
    /// Bit `i` set: member `i` is required.
    required: u64,
}

enum Node {
    Object(ObjectNode),
    /// A string with at most a length and a simple pattern ([`Text`]).
    Text(TextRule),
    /// `{"type": "string", "format": "date-time"}` (see [`date_time_accepts`]).
    DateTime,
    /// An integer with at most integer bounds.
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// Checked by `jsonschema`, compiled from the member's subschema alone.
    Leaf(Box<jsonschema::Validator>),
}

/// `{"type": "string"}` with `minLength`, `maxLength` (in characters, as JSON Schema counts
/// them) and a `pattern` of the one shape ids are written in, `^[<class>]{m,n}$` with an
/// ASCII class of letters, digits and a few marks: a string matches it when every
/// character is in the class and there are `m` to `n` of them, in any regex dialect. Any
/// other pattern, or `format`, leaves the member to `jsonschema`.
struct TextRule {
    min_chars: u64,
    max_chars: u64,
    class: Option<Box<CharClass>>,
}

struct CharClass {
    /// `table[b]`: byte `b` is in the class (only ASCII bytes ever are). A table, not a
    /// 128-bit mask: a `u128` shift per byte cost twice the lookup.
    table: [bool; 256],
    min: u64,
    max: u64,
}

impl TextRule {
    fn compile(schema: &serde_json::Map<String, Value>) -> Option<Self> {
        let mut rule = TextRule {
            min_chars: 0,
            max_chars: u64::MAX,
            class: None,
        };
        let mut typed = false;
        for (keyword, value) in schema {
            match keyword.as_str() {
                "type" if value == "string" => typed = true,
                "minLength" => rule.min_chars = value.as_u64()?,
                "maxLength" => rule.max_chars = value.as_u64()?,
                "pattern" => rule.class = Some(Box::new(CharClass::parse(value.as_str()?)?)),
                k if ANNOTATIONS.contains(&k) => {}
                _ => return None,
            }
        }
        typed.then_some(rule)
    }

    fn accepts(&self, s: &str) -> bool {
        let chars = if s.is_ascii() {
            s.len()
        } else {
            s.chars().count()
        } as u64;
        if chars < self.min_chars || chars > self.max_chars {
            return false;
        }
        self.class.as_ref().is_none_or(|c| {
            (c.min..=c.max).contains(&chars) && s.bytes().all(|b| c.table[usize::from(b)])
        })
    }
}

impl CharClass {
    /// `^[<class>]{m,n}$`, `{m}`, `+` or `*`; the class made of `a-z`, `A-Z`, `0-9` ranges
    /// (or parts of them) and the characters `_ . : @ +`, and `-` first or last.
    fn parse(pattern: &str) -> Option<Self> {
        let body = pattern.strip_prefix("^[")?.strip_suffix('$')?;
        let (class, quantifier) = body.split_once(']')?;
        let (min, max) = match quantifier {
            "+" => (1, u64::MAX),
            "*" => (0, u64::MAX),
            q => {
                let q = q.strip_prefix('{')?.strip_suffix('}')?;
                match q.split_once(',') {
                    Some((m, n)) => (m.parse().ok()?, n.parse().ok()?),
                    None => {
                        let m = q.parse().ok()?;
                        (m, m)
                    }
                }
            }
        };
        let class = class.as_bytes();
        let mut bytes = 0u128;
        let mut i = 0;
        while i < class.len() {
            let c = class[i];
            let edge = i == 0 || i + 1 == class.len();
            if i + 2 < class.len() && class[i + 1] == b'-' {
                let (from, to) = (c, class[i + 2]);
                let same_kind = [b'a'..=b'z', b'A'..=b'Z', b'0'..=b'9']
                    .iter()
                    .any(|r| r.contains(&from) && r.contains(&to));
                if !same_kind || from > to {
                    return None;
                }
                for b in from..=to {
                    bytes |= 1u128 << b;
                }
                i += 3;
            } else if c.is_ascii_alphanumeric() || b"_.:@+".contains(&c) || (c == b'-' && edge) {
                bytes |= 1u128 << c;
                i += 1;
            } else {
                return None;
            }
        }
        let mut table = [false; 256];
        for (b, slot) in table.iter_mut().enumerate().take(128) {
            *slot = bytes & (1u128 << b) != 0;
        }
        (bytes != 0 && min <= max).then_some(CharClass { table, min, max })
    }
}

impl FastSchema {
    /// The specialised form of `document` (a schema whose partition key, if any, is at
    /// `partition_key`), or `None` when it uses what this module does not specialise.
    pub fn compile(document: &Value, partition_key: Option<&str>) -> Option<Self> {
        let root = object_node(document, true)?;
        let key_member = match partition_key {
            None => None,
            Some(pointer) => {
                let name = pointer.strip_prefix('/')?;
                if name.contains(['/', '~']) {
                    return None;
                }
                let i = root.members.iter().position(|(n, _)| n == name)?;
                // The key's value is at hand only for a leaf.
                if matches!(root.members[i].1, Node::Object(_)) {
                    return None;
                }
                Some(i)
            }
        };
        Some(Self { root, key_member })
    }
}

/// A validator of `schema`, built as every validator of the registry is: JSON Schema
/// 2020-12, formats asserted, unknown formats refused.
pub(crate) fn build_validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(schema)
        .map_err(|e| e.to_string())
}

fn object_node(schema: &Value, root: bool) -> Option<ObjectNode> {
    let obj = schema.as_object()?;
    let mut members = Vec::new();
    let mut required: &[Value] = &[];
    let mut closed = false;
    for (keyword, value) in obj {
        match keyword.as_str() {
            "type" if value == "object" => {}
            "properties" => {
                for (name, sub) in value.as_object()? {
                    members.push((name.clone(), node(sub)?));
                }
            }
            "required" => required = value.as_array()?,
            "additionalProperties" if *value == Value::Bool(false) => closed = true,
            // The registry's own keywords, and the root's identity.
            k if k.starts_with("x-") => {}
            "$schema" | "$id" if root => {}
            k if ANNOTATIONS.contains(&k) => {}
            _ => return None,
        }
    }
    if !closed || members.len() > MAX_MEMBERS {
        return None;
    }
    let mut mask = 0u64;
    for name in required {
        let name = name.as_str()?;
        // A required member the schema does not allow: no instance is valid; leave it to
        // the reference to say so.
        let i = members.iter().position(|(n, _)| n == name)?;
        mask |= 1 << i;
    }
    Some(ObjectNode {
        members,
        required: mask,
    })
}

fn node(schema: &Value) -> Option<Node> {
    if let Some(object) = object_node(schema, false) {
        return Some(Node::Object(object));
    }
    if let Some(rule) = schema.as_object().and_then(TextRule::compile) {
        return Some(Node::Text(rule));
    }
    if schema.as_object().is_some_and(is_date_time) {
        return Some(Node::DateTime);
    }
    if let Some((min, max)) = schema.as_object().and_then(integer_bounds) {
        return Some(Node::Integer { min, max });
    }
    if mentions(schema, CONTEXTUAL) {
        return None;
    }
    build_validator(schema)
        .ok()
        .map(|v| Node::Leaf(Box::new(v)))
}

/// `{"type": "string", "format": "date-time"}`, and nothing else but annotations.
fn is_date_time(schema: &serde_json::Map<String, Value>) -> bool {
    let (mut typed, mut format) = (false, false);
    for (keyword, value) in schema {
        match keyword.as_str() {
            "type" if value == "string" => typed = true,
            "format" if value == "date-time" => format = true,
            k if ANNOTATIONS.contains(&k) => {}
            _ => return false,
        }
    }
    typed && format
}

/// Whether `text` is a JSON Schema `date-time`: an RFC 3339 date-time with `T` or `t`
/// between date and time. [`crate::rfc3339::date_time_micros`] reads exactly what the
/// `jsonschema` crate's format check accepts, but for the space separator RFC 3339's note
/// allows (its tests compare the two over a grid of every component's edges; this
/// module's, over generated strings).
fn date_time_accepts(text: &str) -> bool {
    matches!(text.as_bytes().get(10), Some(b'T' | b't'))
        && crate::rfc3339::date_time_micros(text).is_some()
}

/// `{"type": "integer"}` with at most integer `minimum` and `maximum`: its bounds.
#[allow(clippy::type_complexity)]
fn integer_bounds(schema: &serde_json::Map<String, Value>) -> Option<(Option<i64>, Option<i64>)> {
    let (mut min, mut max, mut typed) = (None, None, false);
    for (keyword, value) in schema {
        match keyword.as_str() {
            "type" if value == "integer" => typed = true,
            "minimum" => min = Some(value.as_i64()?),
            "maximum" => max = Some(value.as_i64()?),
            k if ANNOTATIONS.contains(&k) => {}
            _ => return None,
        }
    }
    typed.then_some((min, max))
}

/// An integer as the text spells it without a fraction or an exponent; anything else
/// (`2.0`, `1e0`, a string) fails, and the member goes the reference way.
struct Integer(i128);

impl<'de> de::Deserialize<'de> for Integer {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(i128::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Integer, E> {
                Ok(Integer(i128::from(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether any object within `v` has a member named in `names`.
fn mentions(v: &Value, names: &[&str]) -> bool {
    match v {
        Value::Object(o) => o
            .iter()
            .any(|(k, v)| names.contains(&k.as_str()) || mentions(v, names)),
        Value::Array(a) => a.iter().any(|v| mentions(v, names)),
        _ => false,
    }
}

/// Why the fast path declined; never shown (the reference path says what is wrong).
fn decline<E: de::Error>() -> E {
    E::custom("declined by the fast path")
}

/// A member name or string, borrowed from the text unless it holds escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// An extension attribute's value, as far as the fast path takes them.
enum Extension<'de> {
    Text(Cow<'de, str>),
    Bool,
    Null,
}

impl<'de> de::Deserialize<'de> for Extension<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Extension<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a boolean or null")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Extension<'de>, E> {
                Ok(Extension::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Extension<'de>, E> {
                Ok(Extension::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Extension<'de>, E> {
                Ok(Extension::Text(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Extension<'de>, E> {
                Ok(Extension::Bool)
            }
            fn visit_unit<E>(self) -> Result<Extension<'de>, E> {
                Ok(Extension::Null)
            }
        }
        d.deserialize_any(V)
    }
}

/// An event the fast path accepted: what the edge needs to append it, as
/// [`crate::registry::CheckedEvent`] would give it. The attributes borrow from the event's
/// text where it spells them without escapes (nearly always), so accepting an event
/// allocates nothing; the caller, holding the body, can keep them as slices of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted<'a> {
    pub id: Cow<'a, str>,
    pub source: Cow<'a, str>,
    /// The type's registered name.
    pub event_type: &'a ByteString,
    pub key: Cow<'a, str>,
}

/// The attributes the fast path read from an event whose envelope it accepts.
pub(crate) struct Envelope<'de, 's> {
    pub id: Cow<'de, str>,
    pub source: Cow<'de, str>,
    pub event_type: Cow<'de, str>,
    pub dataschema: Option<Cow<'de, str>>,
    pub partitionkey: Option<Cow<'de, str>>,
    pub data: Data<'de, 's>,
}

/// An event's `data` as the envelope's reader left it.
pub(crate) enum Data<'de, 's> {
    /// Kept as text, to be checked once the schema is known ([`check_data`]).
    Raw(&'de RawValue),
    /// Checked against `schema` as it was read, which gave `key` ([`check_data`]'s
    /// result). The caller must still make sure `schema` is the one the event's type and
    /// `dataschema` select: it was chosen before the reader had seen all of the envelope.
    Checked {
        schema: &'s FastSchema,
        key: Option<Cow<'de, str>>,
    },
}

/// Chooses the schema of an event type (and `dataschema`, when given); `None` when the
/// fast path has none for it.
pub(crate) type Select<'s> = dyn Fn(&str, Option<&str>) -> Option<&'s FastSchema> + 's;

/// How the envelope's reader takes `data`: checked in place against a schema chosen
/// before the envelope is whole, or kept as text.
///
/// An event's `data` may come before its `type` (`serde_json` writes an object's members
/// sorted, so `data` is first), and the `type` (with `dataschema`) chooses the schema. Kept
/// as text, `data` is read twice: skipped, then parsed. Checked in place, it is read once,
/// against the schema its type chooses when the type came first, or else the schema the
/// body's previous event had (a body's events are mostly of one type). A choice that
/// turns out wrong, or a `data` that fails it, costs one more read of the event, as text.
#[derive(Clone, Copy)]
pub(crate) struct DataPlan<'a, 's> {
    /// The schema for an event whose type the reader has not met by `data`.
    pub guess: Option<&'s FastSchema>,
    /// For an event whose type came before `data`.
    pub select: Option<&'a Select<'s>>,
}

impl DataPlan<'_, '_> {
    /// Keep `data` as text.
    pub const RAW: Self = DataPlan {
        guess: None,
        select: None,
    };
}

/// What the fast path carries from one event of a body to the next: the schema the last
/// accepted event had, as the guess for the next one's `data` ([`DataPlan`]).
#[derive(Debug, Default)]
pub struct BodyHint<'s> {
    last: Option<&'s FastSchema>,
    misses: u8,
}

impl<'s> BodyHint<'s> {
    /// After this many events read again in a body (a body of mixed types, say, or of
    /// events that fail their schema), its later events are not guessed at: `data` before
    /// the type is kept as text. (After the type, its schema is no guess; `data` that fails
    /// it costs one more read of an event the reference path then takes anyway.)
    pub(crate) const MAX_MISSES: u8 = 4;

    pub(crate) fn plan<'a>(&self, select: &'a Select<'s>) -> DataPlan<'a, 's> {
        DataPlan {
            guess: self.last.filter(|_| self.misses < Self::MAX_MISSES),
            select: Some(select),
        }
    }

    /// The wrong choices made so far in this body.
    #[cfg(test)]
    pub(crate) fn misses(&self) -> u8 {
        self.misses
    }

    pub(crate) fn missed(&mut self) {
        self.misses = self.misses.saturating_add(1);
    }

    pub(crate) fn accepted(&mut self, schema: &'s FastSchema) {
        self.last = Some(schema);
    }
}

/// A context attribute's text, as the envelope check takes it: not empty, and no control
/// characters or noncharacters.
fn attribute<'de, E: de::Error>(text: Text<'de>) -> Result<Cow<'de, str>, E> {
    if text.0.is_empty() || envelope::bad_char(&text.0).is_some() {
        return Err(decline());
    }
    Ok(text.0)
}

struct EnvelopeVisitor<'a, 's> {
    plan: DataPlan<'a, 's>,
    /// Set when `data` failed the schema chosen for it in place: the event may still be
    /// one the fast path takes, read again with `data` as text.
    speculation_failed: &'a Cell<bool>,
}

impl<'de, 's> DeserializeSeed<'de> for EnvelopeVisitor<'_, 's> {
    type Value = Envelope<'de, 's>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Envelope<'de, 's>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 's> Visitor<'de> for EnvelopeVisitor<'_, 's> {
    type Value = Envelope<'de, 's>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvent")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de, 's>, A::Error> {
        // Members seen so far: the attributes the spec names (`envelope::KNOWN`) by one bit
        // each, any other (extension) name in `extensions`, which allocates only for an
        // event that has extensions.
        let mut seen_attributes = 0u16;
        let mut extensions: Vec<Cow<'de, str>> = Vec::new();
        let mut members = 0usize;
        let (mut specversion, mut id, mut source, mut event_type) = (false, None, None, None);
        let (mut dataschema, mut partitionkey, mut data) = (None, None, None);
        while let Some(Text(name)) = map.next_key()? {
            if members == MAX_MEMBERS {
                return Err(decline());
            }
            members += 1;
            let attribute_bit = envelope::KNOWN.iter().position(|a| *a == name);
            match attribute_bit {
                Some(bit) => {
                    if seen_attributes & (1 << bit) != 0 {
                        return Err(decline());
                    }
                    seen_attributes |= 1 << bit;
                }
                None if extensions.contains(&name) => return Err(decline()),
                None => {}
            }
            match &*name {
                "specversion" => {
                    let Text(v) = map.next_value()?;
                    if v != SPEC_VERSION {
                        return Err(decline());
                    }
                    specversion = true;
                }
                "id" => id = Some(attribute(map.next_value()?)?),
                "source" => {
                    let s = attribute(map.next_value()?)?;
                    // In ASCII the only such character is the space.
                    let spaced = if s.is_ascii() {
                        memchr::memchr(b' ', s.as_bytes()).is_some()
                    } else {
                        s.chars().any(|c| c.is_whitespace() && !c.is_control())
                    };
                    if spaced {
                        return Err(decline());
                    }
                    source = Some(s);
                }
                "type" => event_type = Some(attribute(map.next_value()?)?),
                "subject" => {
                    attribute::<A::Error>(map.next_value()?)?;
                }
                "dataschema" => dataschema = Some(attribute(map.next_value()?)?),
                "datacontenttype" => {
                    let ct = attribute::<A::Error>(map.next_value()?)?;
                    if !envelope::is_json_content_type(&ct) {
                        return Err(decline());
                    }
                }
                "time" => {
                    let Text(t) = map.next_value()?;
                    if !envelope::is_rfc3339(&t) {
                        return Err(decline());
                    }
                }
                "data" => {
                    let schema = match (&event_type, self.plan.select) {
                        (Some(t), Some(select)) => select(t, dataschema.as_deref()),
                        _ => self.plan.guess,
                    };
                    data = Some(match schema {
                        Some(schema) => {
                            let seed = ObjectSeed {
                                node: &schema.root,
                                level: 2,
                                capture: schema.key_member,
                            };
                            let key = map
                                .next_value_seed(seed)
                                .inspect_err(|_| self.speculation_failed.set(true))?;
                            Data::Checked { schema, key }
                        }
                        None => {
                            let raw: &'de RawValue = map.next_value()?;
                            if raw.get() == "null" {
                                return Err(decline());
                            }
                            Data::Raw(raw)
                        }
                    });
                }
                // Binary data and trace context: the reference path.
                "data_base64" => return Err(decline()),
                n if n == TRACEPARENT || n == TRACESTATE => return Err(decline()),
                n => {
                    if n.is_empty()
                        || n.len() > envelope::MAX_EXTENSION_NAME_CHARS
                        || !n
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    {
                        return Err(decline());
                    }
                    match map.next_value()? {
                        Extension::Text(s) => {
                            if envelope::bad_char(&s).is_some() {
                                return Err(decline());
                            }
                            if n == "partitionkey" {
                                if envelope::partition_key_fault(&s).is_some() {
                                    return Err(decline());
                                }
                                partitionkey = Some(s);
                            }
                        }
                        Extension::Null => {}
                        Extension::Bool if n == "partitionkey" => return Err(decline()),
                        Extension::Bool => {}
                    }
                }
            }
            if attribute_bit.is_none() {
                extensions.push(name);
            }
        }
        match (specversion, id, source, event_type, data) {
            (true, Some(id), Some(source), Some(event_type), Some(data)) => Ok(Envelope {
                id,
                source,
                event_type,
                dataschema,
                partitionkey,
                data,
            }),
            _ => Err(decline()),
        }
    }
}

/// Why [`read_envelope`] gave no envelope.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unread {
    /// The fast path declines the event.
    Declined,
    /// `data` failed the schema chosen for it in place ([`DataPlan`]); read it again with
    /// [`DataPlan::RAW`].
    Speculated,
}

/// Reads the envelope of the event that `text` starts with (an object, after any
/// whitespace; `text` may go on past it), taking its `data` as `plan` says, and the
/// event's length.
pub(crate) fn read_envelope<'de, 's>(
    text: &'de str,
    plan: DataPlan<'_, 's>,
) -> Result<(Envelope<'de, 's>, usize), Unread> {
    let speculation_failed = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let read = EnvelopeVisitor {
        plan,
        speculation_failed: &speculation_failed,
    }
    .deserialize(&mut de);
    match read {
        // A stream made from the deserializer starts counting where it stands: just past
        // the event's closing brace.
        Ok(envelope) => Ok((envelope, de.into_iter::<de::IgnoredAny>().byte_offset())),
        Err(_) if speculation_failed.get() => Err(Unread::Speculated),
        Err(_) => Err(Unread::Declined),
    }
}

/// Checks `data` against `schema`; returns the partition key that the key's member gives
/// (as [`crate::registry::SchemaEntry::key_of`] reads it) when the schema names one and
/// `data` has it, `Err` when the fast path declines.
pub(crate) fn check_data<'de>(
    schema: &FastSchema,
    data: &'de RawValue,
) -> Result<Option<Cow<'de, str>>, ()> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    let seed = ObjectSeed {
        node: &schema.root,
        level: 2,
        capture: schema.key_member,
    };
    let key = seed.deserialize(&mut de).map_err(|_| ())?;
    de.end().map_err(|_| ())?;
    Ok(key)
}

/// How deep a value the fast path takes may reach inside its event, counting the event
/// itself as 1. `serde_json` refuses text nested past 128; the fast path parses `data` on
/// its own, one level up from where the reference meets it, so it keeps well inside.
const MAX_DEPTH: usize = 100;

/// How deep `v` nests: 0 for a scalar, 1 for `[]`.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

struct ObjectSeed<'s> {
    node: &'s ObjectNode,
    /// This object's depth in the event (`data` is 2).
    level: usize,
    /// The member whose value to return.
    capture: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        d: D,
    ) -> Result<Option<Cow<'de, str>>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Cow<'de, str>>, A::Error> {
        let mut seen = 0u64;
        let mut captured = None;
        while let Some(Text(name)) = map.next_key()? {
            let Some(i) = self.node.members.iter().position(|(n, _)| *n == name) else {
                // Not allowed (the object is closed); drain nothing, the answer is known.
                return Err(decline());
            };
            let bit = 1u64 << i;
            if seen & bit != 0 {
                return Err(decline());
            }
            seen |= bit;
            match &self.node.members[i].1 {
                Node::Object(object) => {
                    if self.level >= MAX_DEPTH {
                        return Err(decline());
                    }
                    map.next_value_seed(ObjectSeed {
                        node: object,
                        level: self.level + 1,
                        capture: None,
                    })?;
                }
                Node::Text(rule) => {
                    let Text(text) = map.next_value()?;
                    if !rule.accepts(&text) {
                        return Err(decline());
                    }
                    if self.capture == Some(i) {
                        captured = Some(text);
                    }
                }
                Node::DateTime => {
                    let Text(text) = map.next_value()?;
                    if !date_time_accepts(&text) {
                        return Err(decline());
                    }
                    if self.capture == Some(i) {
                        captured = Some(text);
                    }
                }
                Node::Integer { min, max } => {
                    let Integer(n) = map.next_value()?;
                    if min.is_some_and(|m| n < i128::from(m))
                        || max.is_some_and(|m| n > i128::from(m))
                    {
                        return Err(decline());
                    }
                    if self.capture == Some(i) {
                        // As a JSON number: an i64 or a u64, whose decimal is the key.
                        if i64::try_from(n).is_err() && u64::try_from(n).is_err() {
                            return Err(decline());
                        }
                        captured = Some(Cow::Owned(n.to_string()));
                    }
                }
                Node::Leaf(validator) => {
                    let value = map.next_value_seed(strict::StrictValue)?;
                    if self.level + depth(&value) > MAX_DEPTH || !validator.is_valid(&value) {
                        return Err(decline());
                    }
                    if self.capture == Some(i) {
                        captured = match value {
                            Value::String(s) => Some(Cow::Owned(s)),
                            Value::Number(n) => Some(Cow::Owned(n.to_string())),
                            Value::Bool(b) => Some(Cow::Owned(b.to_string())),
                            _ => None,
                        };
                    }
                }
            }
        }
        if seen & self.node.required != self.node.required {
            return Err(decline());
        }
        Ok(captured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const PATTERNS: &[&str] = &[
        "^[A-Za-z0-9_-]{1,64}$",
        "^[A-Z]{3}$",
        "^[a-z0-9.:@+]+$",
        "^[-a-f0-9]*$",
        "^[a-]{2,3}$",
    ];

    /// The specialised string rules against `jsonschema` itself, for strings near them.
    fn agree(schema: &Value, text: &str) -> Result<(), TestCaseError> {
        let rule = TextRule::compile(schema.as_object().unwrap()).expect("specialised");
        let reference = build_validator(schema).unwrap();
        prop_assert_eq!(
            rule.accepts(text),
            reference.is_valid(&json!(text)),
            "{} on {:?}",
            schema,
            text
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn a_specialised_string_rule_decides_as_jsonschema(
            pattern in proptest::sample::select(PATTERNS),
            min in proptest::option::of(0u64..5),
            max in proptest::option::of(0u64..70),
            text in "[A-Za-z0-9_.:@+ é\\n-]{0,70}|[A-Z]{2,4}|[a-]{1,4}\\n?",
        ) {
            let mut schema = json!({"type": "string", "pattern": pattern});
            if let Some(min) = min {
                schema["minLength"] = json!(min);
            }
            if let Some(max) = max {
                schema["maxLength"] = json!(max);
            }
            agree(&schema, &text)?;
            agree(&json!({"type": "string", "minLength": min.unwrap_or(0)}), &text)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// The specialised `date-time` against `jsonschema`'s format check, for strings
        /// near the shape and for any.
        #[test]
        fn a_specialised_date_time_decides_as_jsonschema(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt _][0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,10})?(Z|z|[+-][0-2][0-9]:[0-6][0-9]|[+-][0-9]{4})?|[0-9Tt:.+Zz -]{0,30}|\\PC{0,30}",
        ) {
            let reference =
                build_validator(&json!({"type": "string", "format": "date-time"})).unwrap();
            prop_assert_eq!(
                date_time_accepts(&text),
                reference.is_valid(&json!(text)),
                "{:?}",
                text
            );
        }
    }

    /// The envelope's `source` check reads ASCII with a search for the space alone.
    #[test]
    fn in_ascii_only_the_space_is_whitespace_and_not_a_control() {
        let spaced: Vec<u8> = (0u8..128)
            .filter(|&b| char::from(b).is_whitespace() && !char::from(b).is_control())
            .collect();
        assert_eq!(spaced, b" ");
    }

    #[test]
    fn only_the_simple_shapes_are_specialised() {
        let compiles = |schema: Value| TextRule::compile(schema.as_object().unwrap()).is_some();
        for p in PATTERNS {
            assert!(compiles(json!({"type": "string", "pattern": p})), "{p}");
        }
        for p in [
            "[A-Z]{3}",
            "^[A-Z]{3}",
            "^[\\w]{3}$",
            "^[^a-z]{3}$",
            "^[a-z-0]{3}$",
            "^[z-a]{3}$",
            "^[A-z]{3}$",
            "^[a-z]{3,}$",
            "^[a-z]{3}|x$",
            "^[a-z]{4,3}$",
            "^[]{3}$",
        ] {
            assert!(!compiles(json!({"type": "string", "pattern": p})), "{p}");
        }
        assert!(!compiles(json!({"type": "string", "format": "date-time"})));
        assert!(!compiles(json!({"pattern": "^[a-z]{3}$"})));
        assert!(!compiles(json!({"type": "string", "maxLength": 1.5})));
    }
}
