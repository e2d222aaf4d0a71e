//! `floodgate-core`: the vocabulary every other Floodgate crate shares.
//!
//! Data moves through these types in this order:
//!
//! 1. [`decode`] turns a request body (one event, a JSON batch, NDJSON) into [`decode::Item`]s,
//!    each a raw JSON slice plus its parsed `serde_json::Value`.
//! 2. [`registry::Registry`] checks each item: the CloudEvents 1.0 envelope
//!    ([`envelope`]), then `data` against the versioned JSON Schema of its `type`, and picks
//!    the partition key. The outcome is a [`registry::CheckedEvent`] or a list of
//!    [`FieldError`]s, each naming the JSON pointer of the fault.
//! 3. [`partition`] maps a key to a shard the way Kinesis does (MD5 of the key, split evenly),
//!    so a key lands on the same shard after every restart and on every backend.
//! 4. [`stream`] holds the role traits the edge appends through and the processors read
//!    through ([`stream::StreamWriter`], [`stream::StreamReader`],
//!    [`stream::CheckpointStore`]); `floodgate-sinks` implements them.
//!
//! [`check::check_body`] runs steps 1–2 over a whole body; [`check::check_body_traced`]
//! also gives the events without a trace context of their own the request's
//! ([`trace_context`]: W3C Trace Context, the CloudEvents Distributed Tracing extension).
//! The stream's consumers write their effects through the other roles: [`state`] (the
//! bookings state and the publisher of derived events), [`object_store`] (the lake's files)
//! and [`archive`] (a raw copy of every accepted event).
//! [`config`] holds the typed configuration of the whole binary; [`budget`] the memory it
//! allows each buffer; [`progress`] the role through which long operations report how far
//! they got.
//!
//! Invariants: this crate does no I/O (schemas arrive as strings, files are read by the
//! caller), knows no backend and no HTTP stack, and never panics on input.

pub mod archive;
pub mod budget;
pub mod check;
pub mod config;
pub mod decode;
pub mod envelope;
pub mod fast;
pub mod lake;
pub mod object_store;
pub mod partition;
pub mod progress;
pub mod registry;
pub mod rfc3339;
pub mod state;
pub mod stream;
pub mod strict;
pub mod trace_context;

/// A UTF-8 string held in [`bytes::Bytes`]: a slice of a request body shares its buffer.
/// Events' attributes and partition keys travel as these from the edge to the stream.
pub use bytestring::ByteString;

use serde::Serialize;

/// One fault in one event: where (a JSON pointer into the event) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// RFC 6901 pointer into the event, e.g. `/data/seats`; `""` is the whole event.
    pub pointer: String,
    pub message: String,
}

/// The longest message a [`FieldError`] carries. Validation messages can quote the
/// offending value, and a hostile producer must not be able to make us echo megabytes.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 300;

impl FieldError {
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.chars().count() > MAX_ERROR_MESSAGE_CHARS {
            message = message
                .chars()
                .take(MAX_ERROR_MESSAGE_CHARS)
                .collect::<String>()
                + "…";
        }
        Self {
            pointer: pointer.into(),
            message,
        }
    }
}

/// Escapes one reference token of a JSON pointer (RFC 6901 §3): `~` → `~0`, `/` → `~1`.
pub fn escape_pointer_token(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains(['~', '/']) {
        token.replace('~', "~0").replace('/', "~1").into()
    } else {
        token.into()
    }
}
