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

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

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
    /// Checked by `jsonschema`, compiled from the member's subschema alone.
    Leaf(Box<jsonschema::Validator>),
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
                Some(matches!(root.members[i].1, Node::Leaf(_)).then_some(i)?)
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
    if mentions(schema, CONTEXTUAL) {
        return None;
    }
    build_validator(schema)
        .ok()
        .map(|v| Node::Leaf(Box::new(v)))
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
/// [`crate::registry::CheckedEvent`] would give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub source: String,
    /// The type's registered name.
    pub event_type: String,
    pub key: String,
}

/// The attributes the fast path read from an event whose envelope it accepts.
pub(crate) struct Envelope<'de> {
    pub id: Cow<'de, str>,
    pub source: Cow<'de, str>,
    pub event_type: Cow<'de, str>,
    pub dataschema: Option<Cow<'de, str>>,
    pub partitionkey: Option<Cow<'de, str>>,
    pub data: &'de RawValue,
}

/// A context attribute's text, as the envelope check takes it: not empty, and no control
/// characters or noncharacters.
fn attribute<'de, E: de::Error>(text: Text<'de>) -> Result<Cow<'de, str>, E> {
    if text.0.is_empty() || envelope::bad_char(&text.0).is_some() {
        return Err(decline());
    }
    Ok(text.0)
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvent")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut names: Vec<Cow<'de, str>> = Vec::with_capacity(12);
        let (mut specversion, mut id, mut source, mut event_type) = (false, None, None, None);
        let (mut dataschema, mut partitionkey, mut data) = (None, None, None);
        while let Some(Text(name)) = map.next_key()? {
            if names.contains(&name) || names.len() == MAX_MEMBERS {
                return Err(decline());
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
                    if s.chars().any(|c| c.is_whitespace() && !c.is_control()) {
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
                    let raw: &'de RawValue = map.next_value()?;
                    if raw.get() == "null" {
                        return Err(decline());
                    }
                    data = Some(raw);
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
            names.push(name);
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

/// Reads one event's envelope; `None` when the fast path declines it.
pub(crate) fn read_envelope(raw: &str) -> Option<Envelope<'_>> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let envelope = de::Deserializer::deserialize_map(&mut de, EnvelopeVisitor).ok()?;
    de.end().ok()?;
    Some(envelope)
}

/// Checks `data` against `schema`; returns the value of the partition key's member when
/// the schema names one and `data` has it, `Err` when the fast path declines.
pub(crate) fn check_data(schema: &FastSchema, data: &RawValue) -> Result<Option<Value>, ()> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    let seed = ObjectSeed {
        node: &schema.root,
        capture: schema.key_member,
    };
    let key = seed.deserialize(&mut de).map_err(|_| ())?;
    de.end().map_err(|_| ())?;
    Ok(key)
}

struct ObjectSeed<'s> {
    node: &'s ObjectNode,
    /// The member whose value to return.
    capture: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = Option<Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<Value>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Value>, A::Error> {
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
                    map.next_value_seed(ObjectSeed {
                        node: object,
                        capture: None,
                    })?;
                }
                Node::Leaf(validator) => {
                    let value = map.next_value_seed(strict::StrictValue)?;
                    if !validator.is_valid(&value) {
                        return Err(decline());
                    }
                    if self.capture == Some(i) {
                        captured = Some(value);
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
