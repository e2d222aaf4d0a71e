//! Parsing one event's JSON with unique member names (I-JSON, RFC 7493 §2.3).
//!
//! `serde_json` keeps the last of duplicate names; other parsers keep the first. Since the
//! edge stores the producer's bytes, an event like `{"seats": 1, "seats": 9999}` would be
//! validated as one thing and read downstream as another. So a duplicate name rejects the
//! event, with the pointer of the duplicate.
//!
//! The happy path costs what `serde_json::Value`'s own visitor costs: the pointer is built
//! only while an error unwinds.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::escape_pointer_token;

/// Why an event could not be parsed.
#[derive(Debug)]
pub enum StrictError {
    /// Not JSON at all.
    Syntax(serde_json::Error),
    /// A member name appears twice in one object; the pointer names the second one.
    Duplicate { pointer: String },
}

/// Parses `text` as one JSON value whose objects have unique member names.
pub fn from_str(text: &str) -> Result<Value, StrictError> {
    let path = RefCell::new(None::<Vec<String>>);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Seed { path: &path }.deserialize(&mut de);
    match parsed.and_then(|v| de.end().map(|()| v)) {
        Ok(v) => Ok(v),
        Err(e) => match path.into_inner() {
            Some(mut segments) => {
                segments.reverse();
                let pointer = segments.iter().fold(String::new(), |mut p, s| {
                    p.push('/');
                    p.push_str(&escape_pointer_token(s));
                    p
                });
                Err(StrictError::Duplicate { pointer })
            }
            None => Err(StrictError::Syntax(e)),
        },
    }
}

/// A seed that reads one value as [`from_str`] does, failing on a duplicate name (without
/// recording where: for callers that only need to know).
pub(crate) struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let path = RefCell::new(None);
        Seed { path: &path }.deserialize(d)
    }
}

/// Carries where to record the duplicate's path (innermost segment first).
#[derive(Clone, Copy)]
struct Seed<'p> {
    path: &'p RefCell<Option<Vec<String>>>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Seed<'_> {
    /// While an error unwinds from a duplicate, adds this level's segment to its path.
    fn unwinding<E>(&self, segment: impl FnOnce() -> String, e: E) -> E {
        if let Some(p) = self.path.borrow_mut().as_mut() {
            p.push(segment());
        }
        e
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        loop {
            match seq.next_element_seed(self) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(Value::Array(out)),
                Err(e) => return Err(self.unwinding(|| out.len().to_string(), e)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = match map.next_value_seed(self) {
                Ok(v) => v,
                Err(e) => return Err(self.unwinding(|| key, e)),
            };
            if out.contains_key(&key) {
                *self.path.borrow_mut() = Some(vec![key.clone()]);
                return Err(de::Error::custom(format_args!(
                    "duplicate member name {key:?}"
                )));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(text: &str) -> String {
        match from_str(text) {
            Err(StrictError::Duplicate { pointer }) => pointer,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_values_as_serde_json() {
        for text in [
            r#"{"a":1,"b":[1,2.5,-3,"x",null,true,{"c":{}}],"d":18446744073709551615}"#,
            "[]",
            r#""\u00e9""#,
            "1e300",
        ] {
            assert_eq!(
                from_str(text).unwrap(),
                serde_json::from_str::<Value>(text).unwrap()
            );
        }
    }

    #[test]
    fn duplicates_are_named_by_pointer() {
        assert_eq!(dup(r#"{"a":1,"a":2}"#), "/a");
        assert_eq!(dup(r#"{"data":{"seats":1,"seats":9}}"#), "/data/seats");
        assert_eq!(dup(r#"{"x":[0,{"k/~":1,"k/~":1}]}"#), "/x/1/k~1~0");
        assert!(matches!(from_str("{"), Err(StrictError::Syntax(_))));
        assert!(matches!(from_str("{} x"), Err(StrictError::Syntax(_))));
    }
}
