//! The edge's fast path against the reference, for one event's text.
//!
//! Property: whatever the fast path accepts (`Registry::accept_fast`), the reference accepts
//! too (strict parse, envelope check, `jsonschema`), with the same id, source, type and
//! partition key; and a whole body holding the text gets the same outcomes, pointers and
//! messages included, with the fast path on as with it off.

#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use floodgate_core::check::check_body;
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::Registry;
use libfuzzer_sys::fuzz_target;

static FAST: LazyLock<Registry> = LazyLock::new(|| Registry::builtin().unwrap());
static REFERENCE: LazyLock<Registry> =
    LazyLock::new(|| Registry::builtin().unwrap().without_fast_path());

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Some(accepted) = FAST.accept_fast(text) {
        let event = floodgate_core::strict::from_str(text)
            .unwrap_or_else(|e| panic!("taken fast, yet it does not parse: {e:?}"));
        let checked = REFERENCE
            .check(&event)
            .unwrap_or_else(|e| panic!("taken fast, refused by the reference: {e:?}"));
        assert_eq!(accepted.id, checked.envelope.id);
        assert_eq!(accepted.source, checked.envelope.source);
        assert_eq!(*accepted.event_type, checked.schema.event_type);
        assert_eq!(accepted.key, checked.key);
    }
    let body = Bytes::copy_from_slice(input);
    for format in [BodyFormat::Single, BodyFormat::Ndjson] {
        let fast = format!("{:?}", check_body(&FAST, &body, format, 100));
        let reference = format!("{:?}", check_body(&REFERENCE, &body, format, 100));
        assert_eq!(fast, reference, "{format:?}");
    }
});
