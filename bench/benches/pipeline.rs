//! One bench per hot step of an event's way through Floodgate, in events/s on one core, so
//! that `scripts/bench-compare` can say which step got slower:
//!
//! - `decode/*`: a body into raw event slices and their parse (the edge);
//! - `validate/<type>`: one parsed event of each shipped type against its schema (the
//!   edge's reference path), and `accept_fast/<type>`: the same event accepted from its
//!   text by the fast path (`floodgate_core::fast`), parse included;
//! - `frame_encode/*`: records into one log frame, as the shard writer does before its
//!   write and fsync (uncompressed, zstd), and the frame read back;
//! - `codec/*`: zstd against lz4 on the same frame body, both ways, to choose the log's
//!   codec by CPU per event against bytes on disk (the sizes are printed);
//! - `bookings/*`: a batch's parse, decide (pure), and the whole apply into SQLite;
//! - `lake/*`: a typed file's rows parsed, checked and encoded as Parquet.
//!
//! The fsynced append itself is `benches/log.rs`; the edge's whole check is
//! `benches/validate.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use floodgate_bench::{one_of_each_type, sample_batch};
use floodgate_core::config::Compression;
use floodgate_core::decode::{BodyFormat, decode};
use floodgate_core::registry::Registry;
use floodgate_core::state::StateStore;
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::bookings::{self, BookingsProcessor};
use floodgate_sinks::SqliteStateStore;
use floodgate_sinks::log_frame;
use serde_json::{Value, json};

// Measure with the allocator the binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn decode_bench(c: &mut Criterion) {
    let batch = sample_batch(100, 0);
    let body = serde_json::to_vec(&batch).unwrap();
    let ndjson: Vec<u8> = batch
        .iter()
        .flat_map(|e| {
            let mut line = serde_json::to_vec(e).unwrap();
            line.push(b'\n');
            line
        })
        .collect();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_100", |b| {
        b.iter(|| decode(&body, BodyFormat::Batch, 500).unwrap())
    });
    g.bench_function("ndjson_100", |b| {
        b.iter(|| decode(&ndjson, BodyFormat::Ndjson, 500).unwrap())
    });
    g.finish();
}

fn validate_bench(c: &mut Criterion) {
    let registry = Registry::builtin().unwrap();
    let mut g = c.benchmark_group("validate");
    g.throughput(Throughput::Elements(1));
    for (event_type, event) in one_of_each_type() {
        registry
            .check(&event)
            .unwrap_or_else(|e| panic!("the sample {event_type} is invalid: {e:?}"));
        g.bench_function(event_type, |b| b.iter(|| registry.check(&event).unwrap()));
    }
    g.finish();
    // The fast path: the same decision from the event's text, with no parse before it.
    let mut g = c.benchmark_group("accept_fast");
    g.throughput(Throughput::Elements(1));
    for (event_type, event) in one_of_each_type() {
        let raw = event.to_string();
        registry
            .accept_fast(&raw)
            .unwrap_or_else(|| panic!("the fast path declines the sample {event_type}"));
        g.bench_function(event_type, |b| {
            b.iter(|| registry.accept_fast(&raw).unwrap())
        });
    }
    g.finish();
}

/// `n` records as the edge appends them: the producer's bytes, keyed by `eventId`.
fn records(n: usize) -> Vec<(String, Vec<u8>)> {
    sample_batch(n, 7)
        .iter()
        .map(|e| {
            (
                e["data"]["eventId"].as_str().unwrap().to_owned(),
                serde_json::to_vec(e).unwrap(),
            )
        })
        .collect()
}

fn frame_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    for n in [100usize, 1000] {
        let owned = records(n);
        let recs: Vec<(&str, &[u8])> = owned
            .iter()
            .map(|(k, p)| (k.as_str(), p.as_slice()))
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        for (name, compression) in [
            ("none", Compression::None),
            ("zstd", Compression::Zstd),
            ("lz4", Compression::Lz4),
        ] {
            let mut out = Vec::new();
            g.bench_function(format!("{name}_{n}"), |b| {
                b.iter(|| {
                    out.clear();
                    log_frame::encode(&mut out, 1, 0, compression, &recs).unwrap();
                    out.len()
                })
            });
            // And back, as a consumer reads it (CRC check included).
            let mut frame = Vec::new();
            log_frame::encode(&mut frame, 1, 0, compression, &recs).unwrap();
            let header_bytes: [u8; log_frame::HEADER_LEN] =
                frame[..log_frame::HEADER_LEN].try_into().unwrap();
            let header = log_frame::Header::parse(&header_bytes).unwrap();
            let body = frame[log_frame::HEADER_LEN..].to_vec();
            g.bench_function(format!("{name}_{n}_read"), |b| {
                b.iter_batched(
                    || body.clone(),
                    |body| {
                        assert!(log_frame::crc_ok(&header_bytes, &header, &body));
                        log_frame::decode_body(&header, body).unwrap().len()
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

/// zstd (level 1, the log's) against lz4 (lz4_flex's block format) on the body of a
/// 1,000-record frame: CPU per event both ways, and the bytes each leaves on disk.
fn codec_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    // 1,000 records: a frame of a large group. 25: what a shard's frame holds at
    // 200,000 events/s on 4 shards, where the log commits about 2,000 groups a second.
    for n in [1000usize, 25] {
        let owned = records(n);
        let mut body = Vec::new();
        for (k, p) in &owned {
            body.extend_from_slice(&(k.len() as u16).to_le_bytes());
            body.extend_from_slice(&(p.len() as u32).to_le_bytes());
            body.extend_from_slice(k.as_bytes());
            body.extend_from_slice(p);
        }
        let zstd_packed = zstd::bulk::compress(&body, 1).unwrap();
        let lz4_packed = lz4_flex::block::compress_prepend_size(&body);
        eprintln!(
            "frame body of {n} records: {} bytes; zstd-1 {} bytes ({:.2}x); lz4 {} bytes ({:.2}x)",
            body.len(),
            zstd_packed.len(),
            body.len() as f64 / zstd_packed.len() as f64,
            lz4_packed.len(),
            body.len() as f64 / lz4_packed.len() as f64,
        );
        g.throughput(Throughput::Elements(n as u64));
        // Level 1 is the log's; the negative ("fast") levels skip entropy-coding the
        // literals, trading bytes for CPU toward lz4.
        for level in [1, -1, -3] {
            let name = if level < 0 {
                format!("zstd_fast{}", -level)
            } else {
                format!("zstd{level}")
            };
            let mut zc = zstd::bulk::Compressor::new(level).unwrap();
            let packed = zc.compress(&body).unwrap();
            eprintln!("  zstd level {level}: {} bytes", packed.len());
            g.bench_function(format!("{name}_compress_{n}"), |b| {
                b.iter(|| zc.compress(&body).unwrap().len())
            });
            let mut zd = zstd::bulk::Decompressor::new().unwrap();
            g.bench_function(format!("{name}_decompress_{n}"), |b| {
                b.iter(|| zd.decompress(&packed, body.len()).unwrap().len())
            });
        }
        g.bench_function(format!("lz4_compress_{n}"), |b| {
            b.iter(|| lz4_flex::block::compress_prepend_size(&body).len())
        });
        g.bench_function(format!("lz4_decompress_{n}"), |b| {
            b.iter(|| {
                lz4_flex::block::decompress_size_prepended(&lz4_packed)
                    .unwrap()
                    .len()
            })
        });
    }
    g.finish();
}

/// `n` booking requests over 100 events on sale, as stored records from sequence `base`.
fn booking_records(n: usize, base: u64) -> Vec<StoredRecord> {
    sample_batch(n, base)
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            let k = (base as usize + i) % 100;
            e["data"]["eventId"] = json!(format!("concert-{k}"));
            StoredRecord {
                sequence: SequenceNumber::from_u64(base + i as u64),
                key: format!("concert-{k}"),
                payload: Bytes::from(serde_json::to_vec(&e).unwrap()),
                appended_at_ms: 1_764_000_000_000,
            }
        })
        .collect()
}

/// The creates of the 100 events on sale, with room for every bench iteration.
fn creates() -> Vec<StoredRecord> {
    (0..100)
        .map(|k| {
            let e: Value = json!({"specversion":"1.0","id":format!("c{k}"),"source":"/b",
                "type":"inventory.event.created",
                "data":{"eventId":format!("concert-{k}"),"name":"n","venue":"v",
                        "startsAt":"2026-12-01T20:00:00Z","capacity":1_000_000_000}});
            StoredRecord {
                sequence: SequenceNumber::from_u64(1 + k),
                key: format!("concert-{k}"),
                payload: Bytes::from(e.to_string()),
                appended_at_ms: 1_764_000_000_000,
            }
        })
        .collect()
}

fn bookings_bench(c: &mut Criterion) {
    let shard = ShardId("shard-0000".into());
    let batch = booking_records(100, 1000);
    let mut g = c.benchmark_group("bookings");
    g.throughput(Throughput::Elements(100));
    g.bench_function("parse_100", |b| b.iter(|| bookings::parse(&batch).len()));
    // Decide against the rows as the apply would load them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStateStore::open(&dir.path().join("state.db")).unwrap());
    let processor = BookingsProcessor::new(store.clone());
    rt.block_on(processor.apply_batch(&shard, &creates()))
        .unwrap();
    let events = bookings::parse(&batch);
    let (event_ids, booking_ids) = bookings::touched_ids(&events);
    let (inventories, loaded) = rt.block_on(store.load(event_ids, booking_ids)).unwrap();
    g.bench_function("decide_100", |b| {
        b.iter(|| bookings::decide(&shard, &batch, &events, inventories.clone(), loaded.clone()))
    });
    // The whole apply: position, parse, load, decide, one SQLite transaction (fsync as
    // configured by default). Each iteration is a new batch after the last.
    let mut next = 1_000_000u64;
    g.sample_size(20);
    g.bench_function("apply_100", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let batch = booking_records(100, next);
                next += 100;
                let started = Instant::now();
                assert!(rt.block_on(processor.apply_batch(&shard, &batch)).unwrap());
                spent += started.elapsed();
            }
            spent
        })
    });
    g.finish();
}

/// `event`'s text with its envelope attributes first and `data` last.
fn data_last(event: &serde_json::Value) -> Vec<u8> {
    let object = event.as_object().expect("an event object");
    let mut members: Vec<String> = object
        .iter()
        .filter(|(k, _)| *k != "data")
        .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), v))
        .collect();
    if let Some(data) = object.get("data") {
        members.push(format!("\"data\":{data}"));
    }
    format!("{{{}}}", members.join(",")).into_bytes()
}

fn lake_bench(c: &mut Criterion) {
    let registry = Registry::builtin().unwrap();
    let tables = floodgate_core::lake::tables(&registry).unwrap();
    let table = tables
        .iter()
        .find(|t| t.event_type == "booking.requested")
        .expect("a booking_requested table");
    // As CloudEvents SDKs write an event: the envelope first, `data` last (the lake reads
    // `data` in the same pass then); `data_first` as serde_json writes a `Value` (keys
    // sorted, `data` before `type`: read in a second pass).
    let payloads: Vec<Vec<u8>> = sample_batch(1000, 3).iter().map(data_last).collect();
    let data_first: Vec<Vec<u8>> = sample_batch(1000, 3)
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap())
        .collect();
    let sequences: Vec<String> = (0..1000u64)
        .map(|i| SequenceNumber::from_u64(1 << 40 | i).as_str().to_owned())
        .collect();
    fn rows<'a>(payloads: &'a [Vec<u8>], sequences: &'a [String]) -> Vec<(&'a [u8], i64, &'a str)> {
        payloads
            .iter()
            .zip(sequences)
            .map(|(p, s)| (p.as_slice(), 1_764_000_000_000_000, s.as_str()))
            .collect()
    }
    let (events, events_data_first) = (rows(&payloads, &sequences), rows(&data_first, &sequences));
    let file = floodgate_processors::lake::encode_events(table, "shard-0000", &events).unwrap();
    eprintln!(
        "lake: 1000 booking_requested rows ({} bytes of events) -> {} bytes of Parquet",
        payloads.iter().map(Vec::len).sum::<usize>(),
        file.len()
    );
    let mut g = c.benchmark_group("lake");
    g.throughput(Throughput::Elements(1000));
    for (name, events) in [
        ("encode_1000", &events),
        ("encode_1000_data_first", &events_data_first),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                floodgate_processors::lake::encode_events(table, "shard-0000", events)
                    .unwrap()
                    .len()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    decode_bench,
    validate_bench,
    frame_bench,
    codec_bench,
    bookings_bench,
    lake_bench
);
criterion_main!(benches);
