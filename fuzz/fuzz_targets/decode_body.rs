//! Body decoding, every content type and encoding, as the edge runs it: decompress (capped),
//! binary mode, then decode and check every event.
//!
//! Properties: nothing panics; decompression never yields more than the limit; and every
//! event the edge would accept is accepted again, unchanged, when its stored bytes are sent
//! alone (what a replay or a consumer re-validating the stream does).

#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use floodgate_core::check::{Outcome, check_body};
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::Registry;
use floodgate_ingest::encoding::{self, Encoding};
use libfuzzer_sys::fuzz_target;

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry::builtin().unwrap());

const LIMIT: u64 = 1 << 20;
const MAX_EVENTS: usize = 64;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    let format = match selector & 3 {
        0 => BodyFormat::Single,
        1 => BodyFormat::Batch,
        2 => BodyFormat::Auto,
        _ => BodyFormat::Ndjson,
    };
    let encoding = match (selector >> 2) & 3 {
        1 => Encoding::Gzip,
        2 => Encoding::Zstd,
        _ => Encoding::Identity,
    };
    let binary = selector & 0x10 != 0;
    let body = Bytes::copy_from_slice(body);
    let Ok(body) = encoding::decompress(encoding, &body, LIMIT) else {
        return;
    };
    assert!(body.len() as u64 <= LIMIT, "decompression passed its cap");
    let (body, format) = if binary {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("ce-specversion", "1.0".parse().unwrap());
        headers.insert("ce-id", "fuzz".parse().unwrap());
        headers.insert("ce-source", "/fuzz".parse().unwrap());
        headers.insert("ce-type", "booking.requested".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        match encoding::binary_to_structured(&headers, &body) {
            Ok(b) => (b, BodyFormat::Single),
            Err(_) => return,
        }
    } else {
        (body, format)
    };
    let Ok(outcomes) = check_body(&REGISTRY, &body, format, MAX_EVENTS) else {
        return;
    };
    assert!(outcomes.len() <= MAX_EVENTS);
    for outcome in outcomes {
        let Outcome::Valid {
            id,
            source,
            event_type,
            key,
            payload,
        } = outcome
        else {
            continue;
        };
        let again = check_body(&REGISTRY, &payload, BodyFormat::Single, 1)
            .expect("an accepted event's bytes decode alone");
        match again.as_slice() {
            [Outcome::Valid {
                id: id2,
                source: source2,
                event_type: type2,
                key: key2,
                payload: payload2,
            }] => {
                assert_eq!((&id, &source, &event_type, &key), (id2, source2, type2, key2));
                assert_eq!(&payload, payload2, "stored bytes are stable");
            }
            other => panic!("an accepted event was rejected when replayed: {other:?}"),
        }
    }
});
