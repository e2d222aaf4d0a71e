//! The schema registry: versioned JSON Schemas (2020-12) per event type, compiled once.
//!
//! Schemas live at `schemas/<type>/v<N>.json`. The shipped ones are built into the crate
//! ([`Registry::builtin`]); a directory can replace them ([`Registry::from_sources`], fed by
//! the caller, since this crate does no I/O). Loading refuses, naming the file, a schema
//! that is not valid JSON Schema 2020-12, uses a format we cannot assert, declares a bad
//! partition key, or breaks backward compatibility with the previous version of its type.
//!
//! [`Registry::check`] is the whole per-event decision of the edge: envelope, version
//! selection (`dataschema`, else the latest version), `data` validation with format
//! assertions on, and the partition key.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use serde::Serialize;
use serde_json::Value;

use crate::envelope::{self, Envelope};
use crate::fast::{self, Accepted, BodyHint, FastSchema};
use crate::{ByteString, FieldError, escape_pointer_token};

include!(concat!(env!("OUT_DIR"), "/builtin_schemas.rs"));

/// The schema keyword that names the partition key: a JSON pointer into `data`.
pub const PARTITION_KEY_KEYWORD: &str = "x-floodgate-partition-key";

/// At most this many schema violations are reported per event.
pub const MAX_ERRORS_PER_EVENT: usize = 16;

/// A schema file, as read by the caller.
#[derive(Debug, Clone)]
pub struct SchemaSource {
    /// Path relative to the schema root: `<type>/v<N>.json`.
    pub relative_path: String,
    /// Where it came from, for messages (a file path, or `builtin:<relative>`).
    pub origin: String,
    pub text: String,
}

/// Why the registry refused to load. Always names the file.
#[derive(Debug, thiserror::Error)]
#[error("invalid schema {origin}: {message}")]
pub struct RegistryError {
    pub origin: String,
    pub message: String,
}

/// `name` as a `ByteString` whose clones share nothing that counts: every accepted event
/// takes a clone of its type's name, and a shared one made both of the edge's workers
/// bump one reference count, a cache line they pulled from each other for every event.
/// Names are kept for the life of the process, once each (a process loads few).
fn interned(name: &str) -> ByteString {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let kept = match names.get(name) {
        Some(kept) => *kept,
        None => {
            let kept: &'static str = Box::leak(name.to_owned().into_boxed_str());
            names.insert(kept);
            kept
        }
    };
    ByteString::from_static(kept)
}

/// One compiled schema version of one event type.
#[derive(Debug)]
pub struct SchemaEntry {
    /// The type's registered name; shared (not copied) by every event accepted as one.
    pub event_type: ByteString,
    pub version: u32,
    /// The schema's `$id`, when it declares one. A `dataschema` equal to it selects it.
    pub id: Option<String>,
    /// JSON pointer into `data` of the partition key, if the type declares one.
    pub partition_key: Option<String>,
    /// The schema document as loaded.
    pub document: Value,
    validator: jsonschema::Validator,
    /// The fast path's form of this schema, when it has one.
    fast: Option<FastSchema>,
}

impl SchemaEntry {
    /// Whether events of this schema can be accepted by the fast path ([`crate::fast`]).
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// Validates `data` and returns its faults as pointers into the *event* (`/data/...`).
    pub fn validate_data(&self, data: &Value) -> Result<(), Vec<FieldError>> {
        if self.validator.is_valid(data) {
            return Ok(());
        }
        let mut errors = Vec::new();
        for e in self.validator.iter_errors(data) {
            if errors.len() >= MAX_ERRORS_PER_EVENT {
                break;
            }
            let base = format!("/data{}", e.instance_path().as_str());
            match e.kind() {
                ValidationErrorKind::Required { property } => {
                    let name = property
                        .as_str()
                        .map_or_else(|| property.to_string(), str::to_owned);
                    errors.push(FieldError::new(
                        format!("{base}/{}", escape_pointer_token(&name)),
                        format!("required property {name:?} is missing"),
                    ));
                }
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for name in unexpected.iter().take(MAX_ERRORS_PER_EVENT) {
                        errors.push(FieldError::new(
                            format!("{base}/{}", escape_pointer_token(name)),
                            format!("property {name:?} is not allowed by the schema"),
                        ));
                    }
                }
                _ => errors.push(FieldError::new(base, e.to_string())),
            }
        }
        if errors.is_empty() {
            // `is_valid` and `iter_errors` disagreeing would be a validator bug; never
            // let it turn an invalid event into an accepted one.
            errors.push(FieldError::new("/data", "data does not match its schema"));
        }
        Err(errors)
    }

    /// The partition key this schema picks out of `data`, if it declares one and `data`
    /// holds a scalar there.
    pub fn key_of<'a>(&self, data: &'a Value) -> Option<Cow<'a, str>> {
        let pointer = self.partition_key.as_deref()?;
        match data.pointer(pointer)? {
            Value::String(s) => Some(Cow::Borrowed(s.as_str())),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            _ => None,
        }
    }
}

/// A summary of one schema version, as listed by `GET /v1/schemas`.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaSummary {
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u32,
    #[serde(rename = "$id", skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "partitionKey", skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    pub latest: bool,
}

/// An event that passed every check, with what the edge needs to append it.
#[derive(Debug)]
pub struct CheckedEvent<'a> {
    pub envelope: Envelope<'a>,
    pub schema: &'a SchemaEntry,
    /// The partition key: the schema's key in `data`, else the `partitionkey` extension,
    /// else the event `id`.
    pub key: Cow<'a, str>,
}

/// Compiled schemas by type and version.
#[derive(Debug, Default)]
pub struct Registry {
    types: BTreeMap<String, BTreeMap<u32, Arc<SchemaEntry>>>,
    by_id: HashMap<String, (String, u32)>,
    /// Every event goes the reference way ([`Registry::without_fast_path`]).
    reference_only: bool,
}

impl Registry {
    /// The schemas shipped with Floodgate.
    pub fn builtin() -> Result<Self, RegistryError> {
        Self::from_sources(BUILTIN_SCHEMAS.iter().map(|(rel, text)| SchemaSource {
            relative_path: (*rel).to_owned(),
            origin: format!("builtin:schemas/{rel}"),
            text: (*text).to_owned(),
        }))
    }

    /// Compiles a set of schema files. Fails on the first bad file, naming it.
    pub fn from_sources(
        sources: impl IntoIterator<Item = SchemaSource>,
    ) -> Result<Self, RegistryError> {
        let mut registry = Registry::default();
        let mut docs: BTreeMap<(String, u32), (String, Value)> = BTreeMap::new();
        for src in sources {
            let err = |message: String| RegistryError {
                origin: src.origin.clone(),
                message,
            };
            let (event_type, version) = parse_relative_path(&src.relative_path).map_err(err)?;
            let document: Value =
                serde_json::from_str(&src.text).map_err(|e| err(format!("not valid JSON: {e}")))?;
            if docs.contains_key(&(event_type.clone(), version)) {
                return Err(err(format!("duplicate schema for {event_type} v{version}")));
            }
            docs.insert((event_type, version), (src.origin, document));
        }
        for ((event_type, version), (origin, document)) in docs {
            let err = |message: String| RegistryError {
                origin: origin.clone(),
                message,
            };
            let entry = compile(&event_type, version, document).map_err(err)?;
            if let Some(prev) = registry
                .types
                .get(&event_type)
                .and_then(|versions| versions.values().next_back())
            {
                check_backward_compatible(&prev.document, &entry.document).map_err(|m| {
                    err(format!(
                        "v{version} is not backward compatible with v{}: {m}",
                        prev.version
                    ))
                })?;
            }
            if let Some(id) = &entry.id
                && registry
                    .by_id
                    .insert(id.clone(), (event_type.clone(), version))
                    .is_some()
            {
                return Err(err(format!("$id {id:?} is used by another schema")));
            }
            registry
                .types
                .entry(event_type)
                .or_default()
                .insert(version, Arc::new(entry));
        }
        Ok(registry)
    }

    /// The latest version of `event_type`.
    pub fn latest(&self, event_type: &str) -> Option<&SchemaEntry> {
        self.types
            .get(event_type)?
            .values()
            .next_back()
            .map(|e| &**e)
    }

    /// One version of one type.
    pub fn get(&self, event_type: &str, version: u32) -> Option<&SchemaEntry> {
        self.types.get(event_type)?.get(&version).map(|e| &**e)
    }

    /// The registered event types, sorted.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Every schema version, sorted by type then version.
    pub fn summaries(&self) -> Vec<SchemaSummary> {
        let mut out = Vec::new();
        for (event_type, versions) in &self.types {
            let latest = versions.keys().next_back().copied();
            for (version, entry) in versions {
                out.push(SchemaSummary {
                    event_type: event_type.clone(),
                    version: *version,
                    id: entry.id.clone(),
                    partition_key: entry.partition_key.clone(),
                    latest: Some(*version) == latest,
                });
            }
        }
        out
    }

    /// Resolves the schema an event asks for: `dataschema` when given (it must name a
    /// registered version of the event's own type), otherwise the latest version.
    fn select(
        &self,
        event_type: &str,
        dataschema: Option<&str>,
    ) -> Result<&SchemaEntry, FieldError> {
        let Some(versions) = self.types.get(event_type) else {
            return Err(FieldError::new(
                "/type",
                format!("unknown event type {event_type:?}; see GET /v1/schemas"),
            ));
        };
        let Some(ds) = dataschema else {
            return Ok(versions
                .values()
                .next_back()
                .expect("a registered type has a version"));
        };
        let named = self
            .by_id
            .get(ds)
            .map(|(t, v)| (t.as_str(), *v))
            .or_else(|| parse_relative_dataschema(ds));
        match named {
            Some((t, v)) if t == event_type => versions.get(&v).map(|e| &**e).ok_or_else(|| {
                FieldError::new(
                    "/dataschema",
                    format!("{event_type} has no schema version v{v}"),
                )
            }),
            Some((t, _)) => Err(FieldError::new(
                "/dataschema",
                format!("dataschema names type {t:?} but the event's type is {event_type:?}"),
            )),
            None => Err(FieldError::new(
                "/dataschema",
                format!(
                    "dataschema {ds:?} names no registered schema; use a schema's $id exactly, or a relative reference ending in {event_type}/v<N>.json"
                ),
            )),
        }
    }

    /// This registry with the fast path off: every event is parsed and checked the
    /// reference way. For the differential tests and the benches.
    #[must_use]
    pub fn without_fast_path(mut self) -> Self {
        self.reference_only = true;
        self
    }

    /// Accepts one event straight from its text (`raw`, one JSON value), when the fast
    /// path can ([`crate::fast`]): then [`Registry::check`] of its parse would accept it
    /// with the same attributes and key. `None` says nothing about the event: check it.
    pub fn accept_fast<'a>(&'a self, raw: &'a str) -> Option<Accepted<'a>> {
        let (accepted, len) = self.accept_fast_prefix(raw)?;
        // As one JSON value alone: the end may only be followed by whitespace, and none
        // that breaks a line (see `accept_fast_prefix`).
        raw[len..]
            .bytes()
            .all(|b| b == b' ' || b == b'\t')
            .then_some(accepted)
    }

    /// [`Registry::accept_fast`] of the event that `text` starts with (`text` may go on
    /// past it, as the rest of a batch does), and the event's length in bytes.
    pub fn accept_fast_prefix<'a>(&'a self, text: &'a str) -> Option<(Accepted<'a>, usize)> {
        self.accept_fast_in_body(text, &mut BodyHint::default())
    }

    /// [`Registry::accept_fast_prefix`] for one event of a body after another: `hint`
    /// carries what the body's earlier events tell about this one's schema, so that its
    /// `data` can be checked as it is read, once ([`fast::DataPlan`]). The answer is the
    /// same whatever `hint` holds; only the work differs.
    pub fn accept_fast_in_body<'a, 'r: 'a>(
        &'r self,
        text: &'a str,
        hint: &mut BodyHint<'r>,
    ) -> Option<(Accepted<'a>, usize)> {
        if self.reference_only {
            return None;
        }
        let select = |t: &str, ds: Option<&str>| self.select(t, ds).ok()?.fast.as_ref();
        let mut plan = hint.plan(&select);
        // Read once as planned, and at most once more with `data` as text, which can
        // neither be Speculated nor Checked.
        let mut reread = false;
        loop {
            let (envelope, len) = match fast::read_envelope(text, plan) {
                Ok(read) => read,
                Err(fast::Unread::Speculated) if !reread => {
                    hint.missed();
                    (plan, reread) = (fast::DataPlan::RAW, true);
                    continue;
                }
                Err(_) => return None,
            };
            // Events spread over lines are stored re-encoded, from their parse. (`memchr2`
            // compares 16 or 32 bytes at a time; a byte loop here cost as much as reading
            // the event's strings: 14 % of the whole check, counted with callgrind.)
            if memchr::memchr2(b'\n', b'\r', &text.as_bytes()[..len]).is_some() {
                return None;
            }
            let schema = self
                .select(&envelope.event_type, envelope.dataschema.as_deref())
                .ok()?;
            let fast = schema.fast.as_ref()?;
            // As `check` and `SchemaEntry::key_of` pick it.
            let key = match envelope.data {
                fast::Data::Raw(data) => fast::check_data(fast, data).ok()?,
                fast::Data::Checked { schema, key } if std::ptr::eq(schema, fast) => key,
                // Checked in place against another type's schema: read it again.
                fast::Data::Checked { .. } if !reread => {
                    hint.missed();
                    (plan, reread) = (fast::DataPlan::RAW, true);
                    continue;
                }
                fast::Data::Checked { .. } => return None,
            };
            hint.accepted(fast);
            let key = key
                .or(envelope.partitionkey)
                .unwrap_or_else(|| envelope.id.clone());
            if envelope::partition_key_fault(&key).is_some() {
                return None;
            }
            return Some((
                Accepted {
                    id: envelope.id,
                    source: envelope.source,
                    event_type: &schema.event_type,
                    key,
                },
                len,
            ));
        }
    }

    /// Checks one event completely: envelope, schema selection, `data`, partition key.
    /// On failure returns every fault found (bounded), each with its pointer.
    pub fn check<'a>(&'a self, event: &'a Value) -> Result<CheckedEvent<'a>, Vec<FieldError>> {
        let envelope = match envelope::check_envelope(event) {
            Ok(env) => env,
            Err(mut errors) => {
                // Still validate `data` when the type is usable, so a producer sees every
                // fault of the event at once.
                if let Some(t) = event.get("type").and_then(Value::as_str)
                    && let Ok(schema) =
                        self.select(t, event.get("dataschema").and_then(Value::as_str))
                    && let Some(data) = event.get("data").filter(|d| !d.is_null())
                    && let Err(more) = schema.validate_data(data)
                {
                    errors.extend(more);
                }
                errors.truncate(MAX_ERRORS_PER_EVENT);
                return Err(errors);
            }
        };
        let schema = self
            .select(envelope.event_type, envelope.dataschema)
            .map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        if let Some(ct) = envelope.datacontenttype
            && !envelope::is_json_content_type(ct)
        {
            errors.push(FieldError::new(
                "/datacontenttype",
                format!("{} requires JSON data, not {ct:?}", envelope.event_type),
            ));
        }
        if envelope.has_data_base64 {
            errors.push(FieldError::new(
                "/data_base64",
                format!(
                    "{} requires JSON data, not data_base64",
                    envelope.event_type
                ),
            ));
        }
        let key = match envelope.data {
            None => {
                errors.push(FieldError::new(
                    "/data",
                    format!(
                        "required attribute data is missing; {} requires it",
                        envelope.event_type
                    ),
                ));
                None
            }
            Some(data) => {
                if let Err(more) = schema.validate_data(data) {
                    errors.extend(more);
                }
                schema.key_of(data)
            }
        };
        if !errors.is_empty() {
            errors.truncate(MAX_ERRORS_PER_EVENT);
            return Err(errors);
        }
        let key = key.filter(|_| schema.partition_key.is_some());
        let from_data = key.is_some();
        let key = key
            .or_else(|| envelope.partitionkey.map(Cow::Borrowed))
            .unwrap_or(Cow::Borrowed(envelope.id));
        // The stream takes only keys within the rule; a key it would refuse is the event's
        // fault, named here by where the key came from. (The `partitionkey` attribute was
        // held to the rule with the envelope.)
        if let Some(fault) = envelope::partition_key_fault(&key) {
            let (pointer, message) = match (from_data, &schema.partition_key) {
                (true, Some(p)) => (
                    format!("/data{p}"),
                    format!(
                        "the partition key ({p} in data, as {} declares) {fault}",
                        schema.event_type
                    ),
                ),
                _ if envelope.partitionkey.is_some() => {
                    ("/partitionkey".to_owned(), format!("partitionkey {fault}"))
                }
                _ => (
                    "/id".to_owned(),
                    format!(
                        "the event id is the partition key ({} declares none and no partitionkey is given), and {fault}",
                        schema.event_type
                    ),
                ),
            };
            return Err(vec![FieldError::new(pointer, message)]);
        }
        Ok(CheckedEvent {
            envelope,
            schema,
            key,
        })
    }
}

fn parse_relative_path(rel: &str) -> Result<(String, u32), String> {
    let rel = rel.replace('\\', "/");
    let mut parts = rel.rsplitn(2, '/');
    let file = parts.next().unwrap_or_default();
    let event_type = parts.next().unwrap_or_default();
    if event_type.is_empty()
        || event_type.contains('/')
        || !event_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
    {
        return Err(format!(
            "schema files live at <type>/v<N>.json with a type of lower-case letters, digits, '.' and '_', not {rel:?}"
        ));
    }
    let version = file
        .strip_prefix('v')
        .and_then(|f| f.strip_suffix(".json"))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|v| *v >= 1)
        .ok_or_else(|| format!("schema file name must be v<N>.json with N >= 1, not {file:?}"))?;
    Ok((event_type.to_owned(), version))
}

/// A relative reference `…/<type>/v<N>` or `…/<type>/v<N>.json` → (type, N). An absolute
/// URI must be a registered `$id` exactly: a lookalike host must not select our schemas.
fn parse_relative_dataschema(ds: &str) -> Option<(&str, u32)> {
    if ds.contains(':') {
        return None;
    }
    let ds = ds.strip_suffix(".json").unwrap_or(ds);
    let (rest, version) = ds.rsplit_once('/')?;
    let version = version.strip_prefix('v')?.parse().ok()?;
    let event_type = rest.rsplit('/').next()?;
    Some((event_type, version))
}

fn compile(event_type: &str, version: u32, document: Value) -> Result<SchemaEntry, String> {
    let obj = document
        .as_object()
        .ok_or("a schema must be a JSON object")?;
    match obj.get("$schema").and_then(Value::as_str) {
        None | Some("https://json-schema.org/draft/2020-12/schema") => {}
        Some(other) => {
            return Err(format!(
                "$schema must be JSON Schema 2020-12, not {other:?}"
            ));
        }
    }
    let id = match obj.get("$id") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("$id must be a string".into()),
    };
    let partition_key = match obj.get(PARTITION_KEY_KEYWORD) {
        None => None,
        Some(Value::String(p)) if p.starts_with('/') => Some(p.clone()),
        Some(other) => {
            return Err(format!(
                "{PARTITION_KEY_KEYWORD} must be a JSON pointer into data such as \"/eventId\", not {other}"
            ));
        }
    };
    let validator = fast::build_validator(&document)
        .map_err(|e| format!("not a valid JSON Schema 2020-12: {e}"))?;
    let fast = FastSchema::compile(&document, partition_key.as_deref());
    Ok(SchemaEntry {
        event_type: interned(event_type),
        version,
        id,
        partition_key,
        document,
        validator,
        fast,
    })
}

/// A new version must accept every event the previous one accepted, as far as we can
/// tell structurally: no property removed or retyped, no property newly required.
fn check_backward_compatible(prev: &Value, next: &Value) -> Result<(), String> {
    let props = |s: &Value| {
        s.get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let required = |s: &Value| -> Vec<String> {
        s.get("required")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (prev_props, next_props) = (props(prev), props(next));
    for (name, schema) in &prev_props {
        match next_props.get(name) {
            None => return Err(format!("property {name:?} was removed")),
            Some(n) if n.get("type") != schema.get("type") => {
                return Err(format!("property {name:?} changed its type"));
            }
            Some(_) => {}
        }
    }
    let prev_required = required(prev);
    for name in required(next) {
        if !prev_required.contains(&name) {
            return Err(format!("property {name:?} is newly required"));
        }
    }
    if prev.get(PARTITION_KEY_KEYWORD) != next.get(PARTITION_KEY_KEYWORD) {
        return Err("the partition key changed; events of one key would change shards".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `booking.requested` with `data` first (as `serde_json` writes a `Value`) or last (as
    /// the CloudEvents SDKs write it).
    fn booking(data_last: bool) -> String {
        let data = r#""data":{"bookingId":"bk-1","customerId":"c-1","eventId":"concert-7","requestedAt":"2026-11-22T09:59:59Z","seats":2}"#;
        let attributes =
            r#""id":"e1","source":"/shop","specversion":"1.0","type":"booking.requested""#;
        if data_last {
            format!("{{{attributes},{data}}}")
        } else {
            format!("{{{data},{attributes}}}")
        }
    }

    /// Two types whose `data` fits either schema: a guess from the one, checked in place,
    /// must not give the other its key.
    #[test]
    fn a_guess_that_fits_another_types_data_is_not_taken() {
        let schema = |key: &str| {
            json!({
                "type": "object",
                "additionalProperties": false,
                "x-floodgate-partition-key": key,
                "properties": {"x": {"type": "string"}, "y": {"type": "string"}}
            })
        };
        let registry = Registry::from_sources([
            src("a.one/v1.json", schema("/x")),
            src("a.two/v1.json", schema("/y")),
        ])
        .unwrap();
        let event = |t: &str| {
            format!(
                r#"{{"data":{{"x":"kx","y":"ky"}},"id":"1","source":"/s","specversion":"1.0","type":"{t}"}}"#
            )
        };
        let (text_one, text_two) = (event("a.one"), event("a.two"));
        let mut hint = BodyHint::default();
        let (one, _) = registry.accept_fast_in_body(&text_one, &mut hint).unwrap();
        let (two, _) = registry.accept_fast_in_body(&text_two, &mut hint).unwrap();
        assert_eq!((&**one.event_type, &*one.key), ("a.one", "kx"));
        assert_eq!((&**two.event_type, &*two.key), ("a.two", "ky"));
        assert_eq!(hint.misses(), 1);
    }

    #[test]
    fn data_is_checked_as_read_when_its_schema_is_known_or_guessed() {
        /// Whether `text`'s `data` is checked as it is read, with the plan `hint` makes.
        fn checked<'r>(registry: &'r Registry, text: &str, hint: &BodyHint<'r>) -> bool {
            let select = |t: &str, ds: Option<&str>| registry.select(t, ds).ok()?.fast.as_ref();
            let fast = select("booking.requested", None).unwrap();
            let (envelope, len) = fast::read_envelope(text, hint.plan(&select)).unwrap();
            assert_eq!(len, text.len());
            match envelope.data {
                fast::Data::Checked { schema, key } => {
                    assert!(std::ptr::eq(schema, fast));
                    assert_eq!(key.as_deref(), Some("concert-7"));
                    true
                }
                fast::Data::Raw(_) => false,
            }
        }
        let registry = Registry::builtin().unwrap();
        let fast = registry
            .select("booking.requested", None)
            .unwrap()
            .fast
            .as_ref()
            .unwrap();
        let fresh = BodyHint::default();
        let mut after_a_booking = BodyHint::default();
        after_a_booking.accepted(fast);
        // The type first: its schema. `data` first: the previous event's, if any.
        assert!(checked(&registry, &booking(true), &fresh));
        assert!(!checked(&registry, &booking(false), &fresh));
        assert!(checked(&registry, &booking(false), &after_a_booking));
        // A body that has had to read events again stops guessing, but for the type's
        // own schema.
        for _ in 0..BodyHint::MAX_MISSES {
            after_a_booking.missed();
        }
        assert!(!checked(&registry, &booking(false), &after_a_booking));
        assert!(checked(&registry, &booking(true), &after_a_booking));

        // A wrong guess costs a second read, not the event: an inventory event after a
        // booking, its `data` first, fails the booking schema in place and is accepted
        // when read again.
        let inventory = r#"{"data":{"capacity":100,"eventId":"concert-7","name":"Show","startsAt":"2026-12-01T20:00:00Z","venue":"Hall"},"id":"c1","source":"/shop","specversion":"1.0","type":"inventory.event.created"}"#;
        let mut hint = BodyHint::default();
        hint.accepted(fast);
        let (accepted, len) = registry.accept_fast_in_body(inventory, &mut hint).unwrap();
        assert_eq!(
            (&**accepted.event_type, &*accepted.key, len),
            ("inventory.event.created", "concert-7", inventory.len())
        );
        assert_eq!(hint.misses(), 1);
        // And the hint follows the body: the next inventory event's guess is right.
        let (accepted, _) = registry.accept_fast_in_body(inventory, &mut hint).unwrap();
        assert_eq!(&**accepted.event_type, "inventory.event.created");
        assert_eq!(hint.misses(), 1);
    }

    fn src(rel: &str, doc: Value) -> SchemaSource {
        SchemaSource {
            relative_path: rel.into(),
            origin: format!("test:{rel}"),
            text: doc.to_string(),
        }
    }

    #[test]
    fn builtin_registry_loads_every_domain_type() {
        let r = Registry::builtin().unwrap();
        let types: Vec<_> = r.types().collect();
        for t in [
            "booking.cancelled",
            "booking.requested",
            "checkin.scanned",
            "inventory.capacity.changed",
            "inventory.event.created",
            "payment.failed",
            "payment.succeeded",
        ] {
            assert!(types.contains(&t), "{t} missing");
            assert_eq!(
                r.latest(t).unwrap().partition_key.as_deref(),
                Some("/eventId")
            );
        }
    }

    #[test]
    fn invalid_schema_names_the_file() {
        let e = Registry::from_sources([src("x.y/v1.json", json!({"type": 12}))]).unwrap_err();
        assert_eq!(e.origin, "test:x.y/v1.json");
        assert!(e.to_string().contains("x.y/v1.json"), "{e}");
        let e = Registry::from_sources([src(
            "x.y/v1.json",
            json!({"type":"string","format":"no-such-format"}),
        )])
        .unwrap_err();
        assert!(e.message.contains("not a valid JSON Schema"), "{e}");
        let e = Registry::from_sources([src("x.y/one.json", json!({}))]).unwrap_err();
        assert!(e.message.contains("v<N>.json"), "{e}");
    }

    #[test]
    fn incompatible_versions_are_refused() {
        let v1 = json!({"type":"object","properties":{"a":{"type":"string"}},"required":["a"]});
        let v2_ok = json!({"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}},"required":["a"]});
        let v2_bad = json!({"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}},"required":["a","b"]});
        Registry::from_sources([src("t/v1.json", v1.clone()), src("t/v2.json", v2_ok)]).unwrap();
        let e =
            Registry::from_sources([src("t/v1.json", v1), src("t/v2.json", v2_bad)]).unwrap_err();
        assert_eq!(e.origin, "test:t/v2.json");
        assert!(e.message.contains("newly required"), "{e}");
    }

    #[test]
    fn dataschema_selects_a_version() {
        let v1 = json!({"$id":"urn:t:1","type":"object","properties":{"a":{"type":"string"}}});
        let v2 = json!({"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}},"additionalProperties":false});
        let r = Registry::from_sources([src("t/v1.json", v1), src("t/v2.json", v2)]).unwrap();
        let ev = |ds: Option<&str>| {
            let mut e = json!({"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":"x","zz":1}});
            if let Some(ds) = ds {
                e["dataschema"] = json!(ds);
            }
            e
        };
        // Latest (v2) forbids `zz`; v1 allows it.
        assert!(r.check(&ev(None)).is_err());
        let e = ev(Some("urn:t:1"));
        assert_eq!(r.check(&e).unwrap().schema.version, 1);
        let e = ev(Some("/schemas/t/v1.json"));
        assert_eq!(r.check(&e).unwrap().schema.version, 1);
        let e = ev(Some("t/v1"));
        assert_eq!(r.check(&e).unwrap().schema.version, 1);
        // An absolute URI selects only by exact `$id`: not a lookalike host.
        let e = ev(Some("https://example.com/schemas/t/v1.json"));
        assert_eq!(r.check(&e).unwrap_err()[0].pointer, "/dataschema");
        let e = ev(Some("schemas/t/v9.json"));
        assert_eq!(r.check(&e).unwrap_err()[0].pointer, "/dataschema");
        let e = ev(Some("schemas/other/v1.json"));
        assert_eq!(r.check(&e).unwrap_err()[0].pointer, "/dataschema");
    }

    /// Whichever source the key comes from, it is held to one rule (1 to 256 bytes of
    /// UTF-8, the log's), and an event breaking it is rejected with the pointer of that
    /// source, never checked valid and then refused by the stream.
    #[test]
    fn every_key_is_bounded_in_bytes_at_its_own_pointer() {
        let r = Registry::from_sources([
            src("free/v1.json", json!({"type":"object"})),
            src(
                "keyed/v1.json",
                json!({"type":"object","x-floodgate-partition-key":"/k"}),
            ),
        ])
        .unwrap();
        let event = |ty: &str, extra: Value| {
            let mut e = json!({"specversion":"1.0","id":"1","source":"s","type":ty,"data":{}});
            for (k, v) in extra.as_object().unwrap() {
                if k == "k" {
                    e["data"]["k"] = v.clone();
                } else {
                    e[k] = v.clone();
                }
            }
            e
        };
        let fits = "é".repeat(128);
        let long = "é".repeat(129);
        let fault = |e: &Value| {
            let errors = r.check(e).unwrap_err();
            assert_eq!(errors.len(), 1, "{errors:?}");
            (errors[0].pointer.clone(), errors[0].message.clone())
        };

        // The event id, when it is the key.
        assert_eq!(
            r.check(&event("free", json!({"id": fits}))).unwrap().key,
            fits
        );
        let (pointer, message) = fault(&event("free", json!({"id": long})));
        assert_eq!(pointer, "/id");
        assert!(message.contains("258 bytes (129 characters)"), "{message}");
        // The partitionkey attribute.
        let e = event("free", json!({"id": long, "partitionkey": fits}));
        assert_eq!(r.check(&e).unwrap().key, fits);
        let e = event("free", json!({"partitionkey": long}));
        assert_eq!(fault(&e).0, "/partitionkey");
        // The schema's key in data, however long the id or partitionkey that it overrides.
        let e = event("keyed", json!({"k": fits, "id": long}));
        assert_eq!(r.check(&e).unwrap().key, fits);
        let (pointer, message) = fault(&event("keyed", json!({"k": long})));
        assert_eq!(pointer, "/data/k");
        assert!(message.contains("keyed"), "{message}");
        assert_eq!(fault(&event("keyed", json!({"k": ""}))).0, "/data/k");
        // A number is its decimal text.
        let e = event("keyed", json!({"k": 12}));
        assert_eq!(r.check(&e).unwrap().key, "12");
    }

    #[test]
    fn key_comes_from_data_then_extension_then_id() {
        let r = Registry::builtin().unwrap();
        let e = json!({"specversion":"1.0","id":"1","source":"s","type":"booking.cancelled",
            "partitionkey":"ignored","data":{"bookingId":"b","eventId":"E"}});
        assert_eq!(r.check(&e).unwrap().key, "E");
        let nokey = Registry::from_sources([src("t/v1.json", json!({"type":"object"}))]).unwrap();
        let e = json!({"specversion":"1.0","id":"1","source":"s","type":"t","partitionkey":"P","data":{}});
        assert_eq!(nokey.check(&e).unwrap().key, "P");
        let e = json!({"specversion":"1.0","id":"7","source":"s","type":"t","data":{}});
        assert_eq!(nokey.check(&e).unwrap().key, "7");
    }
    /// A type's name is kept once however many registries load it, and its clones are
    /// static (no reference count).
    #[test]
    fn type_names_are_interned() {
        let a = Registry::builtin().unwrap();
        let b = Registry::builtin().unwrap();
        let name = |r: &Registry| r.latest("booking.requested").unwrap().event_type.clone();
        let (x, y) = (name(&a), name(&b));
        assert_eq!(x.as_ptr(), y.as_ptr());
        assert_eq!(interned("booking.requested").as_ptr(), x.as_ptr());
        assert_ne!(interned("a.new.type").as_ptr(), x.as_ptr());
    }
}
