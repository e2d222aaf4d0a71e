//! Envelope + schema validation of one event.
//!
//! Properties: nothing panics; an accepted event, serialised again (as `serde_json` writes
//! it, not as the producer did), still validates with the same schema version and the same
//! partition key; and a rejected event always names at least one pointer.

#![no_main]

use std::sync::LazyLock;

use floodgate_core::registry::Registry;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry::builtin().unwrap());

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(event) = floodgate_core::strict::from_str(text) else {
        return;
    };
    match REGISTRY.check(&event) {
        Ok(checked) => {
            let reserialised = serde_json::to_string(&event).unwrap();
            let again: Value = floodgate_core::strict::from_str(&reserialised)
                .expect("serde_json writes unique member names");
            let rechecked = REGISTRY
                .check(&again)
                .unwrap_or_else(|e| panic!("accepted, then rejected once re-serialised: {e:?}"));
            assert_eq!(checked.schema.version, rechecked.schema.version);
            assert_eq!(checked.schema.event_type, rechecked.schema.event_type);
            assert_eq!(checked.key, rechecked.key);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a rejection names its faults");
            for e in &errors {
                assert!(e.pointer.is_empty() || e.pointer.starts_with('/'), "{e:?}");
            }
        }
    }
});
