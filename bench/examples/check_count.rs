//! The edge's whole check of the load generator's bodies, in a loop, for counting
//! instructions with `valgrind --tool=callgrind`: unlike wall-clock time on a shared VM,
//! the count is the same run after run, so a change to the check shows even when it is
//! a few percent.
//!
//! ```text
//! cargo build --release --offline -p floodgate-bench --example check_count
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/check_count 200 [data-last]
//! callgrind_annotate /tmp/cg.out | head -40
//! ```
//!
//! It prints the bodies' size; the instructions per event are the run's total less a run
//! of 0 bodies (the registry's compile), divided by 100 × the bodies.

use bytes::Bytes;
use floodgate_bench::UniqueBodies;
use floodgate_core::check::{Outcome, check_body};
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::Registry;
use serde_json::Value;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `body` (a JSON array of events) with each event's `data` member written last, as the
/// CloudEvents SDKs write it (`serde_json` sorts an object's members, so the load
/// generator's events carry `data` first).
fn data_last(body: &[u8]) -> Vec<u8> {
    let events: Vec<serde_json::Map<String, Value>> =
        serde_json::from_slice(body).expect("a batch");
    let texts: Vec<String> = events
        .iter()
        .map(|e| {
            let mut members: Vec<String> = e
                .iter()
                .filter(|(k, _)| *k != "data")
                .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
                .collect();
            members.extend(e.get("data").map(|d| format!("\"data\":{d}")));
            format!("{{{}}}", members.join(","))
        })
        .collect();
    format!("[{}]", texts.join(",")).into_bytes()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let bodies: usize = args.next().map_or(100, |n| n.parse().expect("a count"));
    let last = args.next().as_deref() == Some("data-last");
    let registry = Registry::builtin().expect("the shipped schemas");
    let mut bodies_gen = UniqueBodies::new(100, 1);
    let mut valid = 0usize;
    let mut bytes = 0usize;
    for _ in 0..bodies {
        let mut body = bodies_gen.next_body();
        if last {
            body = data_last(&body);
        }
        bytes += body.len();
        let outcomes =
            check_body(&registry, &Bytes::from(body), BodyFormat::Batch, 500).expect("a batch");
        valid += outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Valid { .. }))
            .count();
    }
    println!("{bodies} bodies, {bytes} bytes, {valid} valid events");
}
