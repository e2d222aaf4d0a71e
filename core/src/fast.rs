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
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Visitor};
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
// The envelope's reader tracks the attributes the spec names by one bit each.
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
    /// Bit `i` set: member `i`'s name is spelled in JSON as it is (it holds no quote,
    /// backslash or control character), so the reader can match it in place ([`member`]).
    plain: u64,
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
    let plain = members
        .iter()
        .enumerate()
        .filter(|(_, (name, _))| is_plain(name))
        .fold(0, |plain, (i, _)| plain | 1 << i);
    Some(ObjectNode {
        members,
        required: mask,
        plain,
    })
}

/// Whether JSON spells `name` as it is: no quote, backslash or control character.
fn is_plain(name: &str) -> bool {
    name.bytes().all(|b| b != b'"' && b != b'\\' && b >= 0x20)
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

/// Why the fast path declined; never shown (the reference path says what is wrong).
#[derive(Debug, PartialEq, Eq)]
struct Declined;

/// A context attribute's text, as the envelope check takes it: not empty, and no control
/// characters or noncharacters.
fn attribute(text: Cow<'_, str>) -> Result<Cow<'_, str>, Declined> {
    if text.is_empty() || envelope::bad_char(&text).is_some() {
        return Err(Declined);
    }
    Ok(text)
}

/// The fast path's reader of JSON text: the grammar of RFC 8259 as `serde_json` reads it,
/// for the values the fast path takes, from where it stands.
///
/// It reads objects, strings without escapes, integers and the three literals itself, and
/// hands anything else (a string with escapes, a leaf, `data` kept as text) to
/// `serde_json`, carrying on past what that read. It never accepts text `serde_json`
/// refuses: where the two could differ it declines. (Through `serde_json`'s visitors the
/// envelope's reading was a third of the edge's CPU: every string went through its
/// scratch-buffer machinery and every member through a `MapAccess` call chain.)
struct Reader<'de> {
    text: &'de str,
    pos: usize,
}

impl<'de> Reader<'de> {
    fn new(text: &'de str) -> Self {
        Reader { text, pos: 0 }
    }

    /// The next byte that is not JSON whitespace, which stays unread.
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn eat(&mut self, byte: u8) -> Result<(), Declined> {
        if self.peek() != Some(byte) {
            return Err(Declined);
        }
        self.pos += 1;
        Ok(())
    }

    /// An object's `{`, and whether a member follows (else its `}` is read too).
    fn open(&mut self) -> Result<bool, Declined> {
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether the member name at the reader is `name`, which must be plain
    /// ([`is_plain`]): if so, reads it and its `:`; if not, reads nothing but whitespace.
    /// (A name matched in place needs no scan for its end.)
    fn named(&mut self, name: &str) -> Result<bool, Declined> {
        if self.peek() != Some(b'"') {
            return Err(Declined);
        }
        let start = self.pos + 1;
        let end = start + name.len();
        let bytes = self.text.as_bytes();
        if bytes.get(start..end) != Some(name.as_bytes()) || bytes.get(end) != Some(&b'"') {
            return Ok(false);
        }
        self.pos = end + 1;
        self.eat(b':')?;
        Ok(true)
    }

    /// The attribute the spec names (its place in [`envelope::KNOWN`], whose names are
    /// plain) that the member name at the reader spells as it is, read with its `:`; or
    /// `None`, having read nothing but whitespace.
    fn known_attribute(&mut self) -> Result<Option<usize>, Declined> {
        if self.peek() != Some(b'"') {
            return Err(Declined);
        }
        let first = self.text.as_bytes().get(self.pos + 1).copied();
        for (bit, name) in envelope::KNOWN.iter().enumerate() {
            if first == name.as_bytes().first().copied() && self.named(name)? {
                return Ok(Some(bit));
            }
        }
        Ok(None)
    }

    /// A member's name and its `:`.
    fn name(&mut self) -> Result<Cow<'de, str>, Declined> {
        let name = self.string()?;
        self.eat(b':')?;
        Ok(name)
    }

    /// What follows a member's value: `,` and another member (`true`), or `}` (`false`).
    fn more(&mut self) -> Result<bool, Declined> {
        let more = match self.peek() {
            Some(b',') => true,
            Some(b'}') => false,
            _ => return Err(Declined),
        };
        self.pos += 1;
        Ok(more)
    }

    /// A string, borrowed from the text unless it holds escapes (which `serde_json`
    /// reads).
    fn string(&mut self) -> Result<Cow<'de, str>, Declined> {
        if self.peek() != Some(b'"') {
            return Err(Declined);
        }
        let start = self.pos + 1;
        let end = first_escaped(self.text.as_bytes(), start).ok_or(Declined)?;
        match self.text.as_bytes()[end] {
            b'"' => {
                self.pos = end + 1;
                // Quotes are ASCII, so both ends are on character boundaries.
                self.text.get(start..end).map(Cow::Borrowed).ok_or(Declined)
            }
            b'\\' => self.escaped(),
            // A control character, which JSON strings must escape.
            _ => Err(Declined),
        }
    }

    /// The string at the reader, which holds escapes: `serde_json` reads it. (Out of line,
    /// so that [`Self::string`] stays small for the strings that have none.)
    #[cold]
    #[inline(never)]
    fn escaped(&mut self) -> Result<Cow<'de, str>, Declined> {
        self.serde(PhantomData::<Text<'de>>).map(|Text(text)| text)
    }

    /// An integer spelled as `serde_json` gives it to a visitor as an `i64` or a `u64`:
    /// no fraction, no exponent, no leading zero, no `-0`, within those types.
    fn integer(&mut self) -> Result<i128, Declined> {
        self.peek();
        let bytes = self.text.as_bytes();
        let negative = bytes.get(self.pos) == Some(&b'-');
        let first = self.pos + usize::from(negative);
        let mut end = first;
        let mut n = 0u64;
        while let Some(&b @ b'0'..=b'9') = bytes.get(end) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .ok_or(Declined)?;
            end += 1;
        }
        let digits = end - first;
        if digits == 0
            || (digits > 1 && bytes[first] == b'0')
            || matches!(bytes.get(end), Some(b'.' | b'e' | b'E'))
        {
            return Err(Declined);
        }
        self.pos = end;
        match negative {
            false => Ok(i128::from(n)),
            true if n == 0 || n > 1 << 63 => Err(Declined),
            true => Ok(-i128::from(n)),
        }
    }

    /// `true`, `false` or `null`, as `literal` spells it.
    fn literal(&mut self, literal: &[u8]) -> Result<(), Declined> {
        self.peek();
        if !self.text.as_bytes()[self.pos..].starts_with(literal) {
            return Err(Declined);
        }
        self.pos += literal.len();
        Ok(())
    }

    /// The value at the reader, read by `serde_json` with `seed`.
    fn serde<T>(&mut self, seed: impl DeserializeSeed<'de, Value = T>) -> Result<T, Declined> {
        let text: &'de str = self.text;
        let mut de = serde_json::Deserializer::from_str(text.get(self.pos..).ok_or(Declined)?);
        let value = seed.deserialize(&mut de).map_err(|_| Declined)?;
        // A stream made from the deserializer starts counting where it stands: just past
        // the value.
        self.pos += de.into_iter::<de::IgnoredAny>().byte_offset();
        Ok(value)
    }
}

/// The index of the first byte at or after `from` that a JSON string must escape (a `"`,
/// a `\` or a control character), if any: where a string's text starts being more than
/// its value (the reader), or whether a value can be written as it is (the edge's
/// answer). Eight bytes at a time: each test flags the bytes it finds, and a byte it does
/// not find only when a lower byte was found (the borrow from a found byte), so the
/// lowest flag of all three is exact.
pub fn first_escaped(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::MAX / 255;
    const HIGHS: u64 = ONES << 7;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let found = (zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | x.wrapping_sub(ONES * 0x20) & !x)
            & HIGHS;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let tail = bytes.get(i..)?;
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|at| i + at)
}

/// Reads an envelope at `r`; sets `speculation_failed` when `data`, checked in place
/// against a schema chosen before the envelope was whole, failed it.
fn envelope<'de, 's>(
    r: &mut Reader<'de>,
    plan: DataPlan<'_, 's>,
    speculation_failed: &mut bool,
) -> Result<Envelope<'de, 's>, Declined> {
    // Members seen so far: the attributes the spec names (`envelope::KNOWN`) by one bit
    // each, any other (extension) name in `extensions`, which allocates only for an event
    // that has extensions.
    let mut seen_attributes = 0u16;
    let mut extensions: Vec<Cow<'de, str>> = Vec::new();
    let mut members = 0usize;
    let (mut specversion, mut id, mut source, mut event_type) = (false, None, None, None);
    let (mut dataschema, mut partitionkey, mut data) = (None, None, None);
    let mut more = r.open()?;
    while more {
        let (name, attribute_bit) = match r.known_attribute()? {
            Some(bit) => (Cow::Borrowed(envelope::KNOWN[bit]), Some(bit)),
            None => {
                let name = r.name()?;
                let bit = envelope::KNOWN.iter().position(|a| *a == name);
                (name, bit)
            }
        };
        if members == MAX_MEMBERS {
            return Err(Declined);
        }
        members += 1;
        match attribute_bit {
            Some(bit) => {
                if seen_attributes & (1 << bit) != 0 {
                    return Err(Declined);
                }
                seen_attributes |= 1 << bit;
            }
            None if extensions.contains(&name) => return Err(Declined),
            None => {}
        }
        match &*name {
            "specversion" => {
                if r.string()? != SPEC_VERSION {
                    return Err(Declined);
                }
                specversion = true;
            }
            "id" => id = Some(attribute(r.string()?)?),
            "source" => {
                let s = attribute(r.string()?)?;
                // In ASCII the only such character is the space.
                let spaced = if s.is_ascii() {
                    memchr::memchr(b' ', s.as_bytes()).is_some()
                } else {
                    s.chars().any(|c| c.is_whitespace() && !c.is_control())
                };
                if spaced {
                    return Err(Declined);
                }
                source = Some(s);
            }
            "type" => event_type = Some(attribute(r.string()?)?),
            "subject" => {
                attribute(r.string()?)?;
            }
            "dataschema" => dataschema = Some(attribute(r.string()?)?),
            "datacontenttype" => {
                if !envelope::is_json_content_type(&attribute(r.string()?)?) {
                    return Err(Declined);
                }
            }
            "time" => {
                if !envelope::is_rfc3339(&r.string()?) {
                    return Err(Declined);
                }
            }
            "data" => {
                let schema = match (&event_type, plan.select) {
                    (Some(t), Some(select)) => select(t, dataschema.as_deref()),
                    _ => plan.guess,
                };
                data = Some(match schema {
                    Some(schema) => {
                        let key = object(r, &schema.root, 2, schema.key_member)
                            .inspect_err(|_| *speculation_failed = true)?;
                        Data::Checked { schema, key }
                    }
                    None => {
                        let raw: &'de RawValue = r.serde(PhantomData)?;
                        if raw.get() == "null" {
                            return Err(Declined);
                        }
                        Data::Raw(raw)
                    }
                });
            }
            // Binary data and trace context: the reference path.
            "data_base64" => return Err(Declined),
            n if n == TRACEPARENT || n == TRACESTATE => return Err(Declined),
            n => {
                if n.is_empty()
                    || n.len() > envelope::MAX_EXTENSION_NAME_CHARS
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(Declined);
                }
                match r.peek() {
                    Some(b'"') => {
                        let s = r.string()?;
                        if envelope::bad_char(&s).is_some() {
                            return Err(Declined);
                        }
                        if n == "partitionkey" {
                            if envelope::partition_key_fault(&s).is_some() {
                                return Err(Declined);
                            }
                            partitionkey = Some(s);
                        }
                    }
                    Some(b'n') => r.literal(b"null")?,
                    Some(b't' | b'f') if n == "partitionkey" => return Err(Declined),
                    Some(b't') => r.literal(b"true")?,
                    Some(b'f') => r.literal(b"false")?,
                    _ => return Err(Declined),
                }
            }
        }
        if attribute_bit.is_none() {
            extensions.push(name);
        }
        more = r.more()?;
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
        _ => Err(Declined),
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
/// event's length: up to and with its closing brace.
pub(crate) fn read_envelope<'de, 's>(
    text: &'de str,
    plan: DataPlan<'_, 's>,
) -> Result<(Envelope<'de, 's>, usize), Unread> {
    let mut r = Reader::new(text);
    let mut speculation_failed = false;
    match envelope(&mut r, plan, &mut speculation_failed) {
        Ok(envelope) => Ok((envelope, r.pos)),
        Err(Declined) if speculation_failed => Err(Unread::Speculated),
        Err(Declined) => Err(Unread::Declined),
    }
}

/// Checks `data` against `schema`; returns the partition key that the key's member gives
/// (as [`crate::registry::SchemaEntry::key_of`] reads it) when the schema names one and
/// `data` has it, `Err` when the fast path declines.
pub(crate) fn check_data<'de>(
    schema: &FastSchema,
    data: &'de RawValue,
) -> Result<Option<Cow<'de, str>>, ()> {
    let mut r = Reader::new(data.get());
    let key = object(&mut r, &schema.root, 2, schema.key_member).map_err(|_| ())?;
    if r.peek().is_some() {
        return Err(());
    }
    Ok(key)
}

/// How deep a value the fast path takes may reach inside its event, counting the event
/// itself as 1. `serde_json` refuses text nested past 128; the fast path parses leaves on
/// their own, deeper than where the reference meets them, so it keeps well inside.
const MAX_DEPTH: usize = 100;

/// How deep `v` nests: 0 for a scalar, 1 for `[]`.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Which of `node`'s members the name at `r` is, read with its `:`: matched in place among
/// the plain names that start with its first byte (no scan, whatever order the producer
/// writes them in), else read as a string and looked up. `Err` for a name the object does
/// not allow (it is closed: the answer is known).
fn member(r: &mut Reader<'_>, node: &ObjectNode) -> Result<usize, Declined> {
    if r.peek() != Some(b'"') {
        return Err(Declined);
    }
    let first = r.text.as_bytes().get(r.pos + 1).copied();
    for (i, (name, _)) in node.members.iter().enumerate() {
        if node.plain & (1 << i) != 0
            && first == name.as_bytes().first().copied()
            && r.named(name)?
        {
            return Ok(i);
        }
    }
    let name = r.name()?;
    node.members
        .iter()
        .position(|(n, _)| *n == name)
        .ok_or(Declined)
}

/// Reads an object of `node`'s shape at `r`, at depth `level` of its event (`data` is 2),
/// and returns member `capture`'s value as a partition key.
fn object<'de>(
    r: &mut Reader<'de>,
    node: &ObjectNode,
    level: usize,
    capture: Option<usize>,
) -> Result<Option<Cow<'de, str>>, Declined> {
    let mut seen = 0u64;
    let mut captured = None;
    let mut more = r.open()?;
    while more {
        let i = member(r, node)?;
        let bit = 1u64 << i;
        if seen & bit != 0 {
            return Err(Declined);
        }
        seen |= bit;
        let value = match &node.members[i].1 {
            Node::Object(object) => {
                if level >= MAX_DEPTH {
                    return Err(Declined);
                }
                self::object(r, object, level + 1, None)?;
                None
            }
            Node::Text(rule) => {
                let text = r.string()?;
                if !rule.accepts(&text) {
                    return Err(Declined);
                }
                Some(text)
            }
            Node::DateTime => {
                let text = r.string()?;
                if !date_time_accepts(&text) {
                    return Err(Declined);
                }
                Some(text)
            }
            Node::Integer { min, max } => {
                let n = r.integer()?;
                if min.is_some_and(|m| n < i128::from(m)) || max.is_some_and(|m| n > i128::from(m))
                {
                    return Err(Declined);
                }
                // As a JSON number, the key is its decimal.
                (capture == Some(i)).then(|| Cow::Owned(n.to_string()))
            }
            Node::Leaf(validator) => {
                let value = r.serde(strict::StrictValue)?;
                if level + depth(&value) > MAX_DEPTH || !validator.is_valid(&value) {
                    return Err(Declined);
                }
                match value {
                    Value::String(s) => Some(Cow::Owned(s)),
                    Value::Number(n) if capture == Some(i) => Some(Cow::Owned(n.to_string())),
                    Value::Bool(b) if capture == Some(i) => Some(Cow::Owned(b.to_string())),
                    _ => None,
                }
            }
        };
        if capture == Some(i) {
            captured = value;
        }
        more = r.more()?;
    }
    if seen & node.required != node.required {
        return Err(Declined);
    }
    Ok(captured)
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
    /// `serde_json`'s reading of a whole text as a string, or `None` when it refuses it.
    fn serde_string(text: &str) -> Option<String> {
        serde_json::from_str::<String>(text).ok()
    }

    /// The reader's, with nothing but whitespace after the value.
    fn read_whole<'a, T>(
        text: &'a str,
        read: impl FnOnce(&mut Reader<'a>) -> Result<T, Declined>,
    ) -> Option<T> {
        let mut r = Reader::new(text);
        let value = read(&mut r).ok()?;
        r.peek().is_none().then_some(value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// A string the reader takes is the one `serde_json` reads, borrowed unless it
        /// holds escapes; and it takes every string `serde_json` does.
        #[test]
        fn the_reader_reads_strings_as_serde_json(
            text in "[ \t]?\"([a-z\"\\\\/ é\u{7f}\u{2028}\t\n\u{1}]|\\\\[\"\\\\/bfnrtu]|\\\\u00[0-9a-f]{2}){0,24}\"?[ \n]?",
        ) {
            let ours = read_whole(&text, Reader::string);
            let serde = serde_string(&text);
            prop_assert_eq!(ours.as_deref(), serde.as_deref(), "{:?}", text);
            if let Some(Cow::Borrowed(_)) = ours {
                prop_assert!(!text.contains('\\'));
            }
        }

        /// The integers the reader takes are those `serde_json` gives as an `i64` or a
        /// `u64`, with their values; it declines the rest (fractions, exponents, `-0`,
        /// leading zeros, overflow), which the reference path then reads.
        #[test]
        fn the_reader_reads_integers_as_serde_json(
            text in "-?(0|[1-9][0-9]{0,20}|0[0-9]{1,3}|18446744073709551[0-9]{3}|922337203685477580[0-9])(\\.[0-9]{0,3})?([eE][+-]?[0-9]{1,2})? ?|[-+0-9.eE ]{0,6}",
        ) {
            let serde = match serde_json::from_str::<Value>(&text) {
                Ok(Value::Number(n)) => n
                    .as_i64()
                    .map(i128::from)
                    .or(n.as_u64().map(i128::from)),
                _ => None,
            };
            prop_assert_eq!(read_whole(&text, Reader::integer), serde, "{:?}", text);
        }
    }

    /// The integers at the edges of `i64` and `u64`, which `serde_json` reads as floats
    /// one past them.
    #[test]
    fn the_reader_reads_integers_to_the_edges_of_serde_jsons() {
        for (text, n) in [
            ("0", Some(0)),
            ("-0", None),
            ("-9223372036854775808", Some(i128::from(i64::MIN))),
            ("-9223372036854775809", None),
            ("18446744073709551615", Some(i128::from(u64::MAX))),
            ("18446744073709551616", None),
            ("01", None),
            ("1.0", None),
            ("1e0", None),
            ("-", None),
            ("+1", None),
        ] {
            assert_eq!(read_whole(text, Reader::integer), n, "{text}");
        }
    }

    #[test]
    fn the_reader_reads_literals_and_objects_as_json_spells_them() {
        assert_eq!(read_whole(" true ", |r| r.literal(b"true")), Some(()));
        assert_eq!(read_whole("tru", |r| r.literal(b"true")), None);
        assert_eq!(read_whole("nul", |r| r.literal(b"null")), None);
        // An object's punctuation: `{}`, members, and no trailing comma.
        let members = |text: &str| {
            read_whole(text, |r| {
                let mut names = Vec::new();
                let mut more = r.open()?;
                while more {
                    names.push(r.name()?.into_owned());
                    r.integer()?;
                    more = r.more()?;
                }
                Ok(names)
            })
        };
        assert_eq!(members(" { } "), Some(vec![]));
        assert_eq!(
            members("{\"a\" : 1 ,\n\"b\":2}"),
            Some(vec!["a".into(), "b".into()])
        );
        for bad in [
            "{\"a\":1,}",
            "{,}",
            "{\"a\" 1}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":1",
            "{a:1}",
        ] {
            assert_eq!(members(bad), None, "{bad}");
        }
    }

    /// A member name is matched in place only when JSON spells it as it is: a name with a
    /// quote in it is read as a string, so that its raw bytes in the text do not pass for
    /// it; a name is matched whole, not as the prefix of a longer one; and a name matched
    /// in place still counts towards repeats.
    #[test]
    fn member_names_are_matched_in_place_only_when_plain() {
        let schema = FastSchema::compile(
            &json!({"type": "object", "additionalProperties": false,
                    "properties": {"a\"b": {"type": "integer"}, "c": {"type": "integer"},
                                   "cd": {"type": "integer"}, "d": {"type": "integer"}}}),
            None,
        )
        .unwrap();
        assert_eq!(schema.root.plain, 0b1110);
        let read = |text: &str| read_whole(text, |r| object(r, &schema.root, 2, None)).is_some();
        for (text, taken) in [
            (r#"{"a\"b":1,"c":2,"d":3}"#, true),
            (r#"{"d":3,"c":2,"a\"b":1}"#, true),
            (r#"{"c":2,"d":3}"#, true),
            (r#"{"\u0063":2,"d":3}"#, true),
            (r#"{"a"b":1}"#, false),
            (r#"{"c":2,"c":2}"#, false),
            (r#"{"c":2,"d":3,"c":2}"#, false),
            (r#"{"d":3,"d":3}"#, false),
            (r#"{"cd":2,"c":1}"#, true),
            (r#"{"ce":2}"#, false),
            (r#"{"c" 2}"#, false),
            (r#"{"c":2,"e":3}"#, false),
        ] {
            assert_eq!(read(text), taken, "{text}");
        }
        assert!(envelope::KNOWN.iter().all(|name| is_plain(name)));
    }

    /// `first_escaped`'s eight-at-a-time scan against a byte-by-byte one, for every byte
    /// value at every place of a 17-byte buffer (two words and a tail), alone and after
    /// a byte it finds.
    #[test]
    fn the_string_scan_finds_the_first_quote_backslash_or_control() {
        let plain = |b: u8| b != b'"' && b != b'\\' && b >= 0x20;
        for earlier in [None, Some(b'"'), Some(0x1f)] {
            for at in 0..17 {
                for byte in 0..=255u8 {
                    let mut buf = [b'a'; 17];
                    buf[at] = byte;
                    if let Some(e) = earlier
                        && at > 0
                    {
                        buf[at - 1] = e;
                    }
                    for from in [0, 1, 9] {
                        let expected = buf[from..]
                            .iter()
                            .position(|&b| !plain(b))
                            .map(|p| from + p);
                        assert_eq!(first_escaped(&buf, from), expected, "{buf:?} from {from}");
                    }
                }
            }
        }
        assert_eq!(first_escaped(b"abc", 3), None);
        assert_eq!(first_escaped(b"abc", 4), None);
    }
}
