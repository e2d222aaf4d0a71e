//! Parse + validate cost of the edge's per-event path, in events/s on one core:
//! one event, a 100-event batch, and the batch split into its parts (parse only,
//! check only) to show where the time goes.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use floodgate_bench::sample_batch;
use floodgate_core::check::check_body;
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::Registry;

// Measure with the allocator the binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let registry = Registry::builtin().unwrap();
    let batch = sample_batch(100, 0);
    let batch_bytes = Bytes::from(serde_json::to_vec(&batch).unwrap());
    let one = Bytes::from(serde_json::to_vec(&batch[0]).unwrap());
    eprintln!(
        "one event: {} bytes; batch of 100: {} bytes",
        one.len(),
        batch_bytes.len()
    );

    let mut g = c.benchmark_group("edge_check");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_validate_1", |b| {
        b.iter(|| check_body(&registry, &one, BodyFormat::Single, 500).unwrap())
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_validate_batch_100", |b| {
        b.iter(|| check_body(&registry, &batch_bytes, BodyFormat::Batch, 500).unwrap())
    });
    // The same body with the fast path off: every event parsed, then checked.
    let reference = Registry::builtin().unwrap().without_fast_path();
    g.bench_function("reference_parse_validate_batch_100", |b| {
        b.iter(|| check_body(&reference, &batch_bytes, BodyFormat::Batch, 500).unwrap())
    });
    g.bench_function("parse_only_batch_100", |b| {
        b.iter(|| floodgate_core::decode::decode(&batch_bytes, BodyFormat::Batch, 500).unwrap())
    });
    // Alternatives to the raw-slice decode, for comparison: one parse into values, and the
    // compact serialisation that storing re-serialised events would add.
    g.bench_function("serde_value_vec_batch_100", |b| {
        b.iter(|| serde_json::from_slice::<Vec<serde_json::Value>>(&batch_bytes).unwrap())
    });
    g.bench_function("serialize_values_100", |b| {
        b.iter(|| {
            batch
                .iter()
                .map(|v| serde_json::to_vec(v).unwrap().len())
                .sum::<usize>()
        })
    });
    let values: Vec<serde_json::Value> = batch.clone();
    g.bench_function("check_only_batch_100", |b| {
        b.iter(|| {
            for v in &values {
                registry.check(v).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
