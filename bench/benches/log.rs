//! Durable appends to the embedded log: records/s and MB/s for fsync groups of 100 and
//! 1,000 records of ~440 bytes, uncompressed, zstd and lz4. Each iteration is one append call
//! that returns only after its fsync, as the edge's acks do.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use floodgate_core::config::{Compression, EmbeddedStreamConfig};
use floodgate_core::stream::{Record, StreamWriter};
use floodgate_sinks::EmbeddedLog;

// Measure with the allocator the binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let events = floodgate_bench::sample_batch(1000, 7);
    let records: Vec<Record> = events
        .iter()
        .map(|e| Record {
            key: "E1".into(), // one shard: one fsync per append
            payload: Bytes::from(serde_json::to_vec(e).unwrap()),
        })
        .collect();
    let bytes_per_record = records.iter().map(|r| r.payload.len()).sum::<usize>() / records.len();
    eprintln!("record size: {bytes_per_record} bytes");
    for group in [100usize, 1000] {
        let plain: Vec<u8> = records[..group]
            .iter()
            .flat_map(|r| r.payload.to_vec())
            .collect();
        let packed = zstd::bulk::compress(&plain, 1).unwrap();
        eprintln!(
            "zstd level 1 on a {group}-record frame: {} -> {} bytes ({:.1}x)",
            plain.len(),
            packed.len(),
            plain.len() as f64 / packed.len() as f64
        );
    }
    let mut g = c.benchmark_group("log_append_fsync");
    g.sample_size(20);
    for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
        for group in [100usize, 1000] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = EmbeddedStreamConfig {
                shards: 1,
                compression,
                ..Default::default()
            };
            let log = Arc::new(EmbeddedLog::open(dir.path(), &cfg).unwrap());
            let batch: Vec<Record> = records[..group].to_vec();
            g.throughput(Throughput::Elements(group as u64));
            g.bench_function(format!("{compression:?}_{group}"), |b| {
                b.to_async(&rt).iter(|| {
                    let log = log.clone();
                    let batch = batch.clone();
                    async move {
                        let r = log.append(batch).await;
                        assert!(r.iter().all(Result::is_ok));
                    }
                })
            });
            rt.block_on(log.close()).unwrap();
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
