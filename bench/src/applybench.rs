//! `floodgate-applybench`: events/s the bookings processor applies from the embedded log
//! into SQLite. Fills a fresh log with N booking requests over K events (after their
//! creates), then starts the consumers and times how long they take to catch up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::state::StateStore;
use floodgate_core::stream::{CheckpointStore, Record, ShardId, StreamWriter};
use floodgate_processors::bookings::BookingsProcessor;
use floodgate_processors::runtime::{RuntimeConfig, spawn_consumers};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog, SqliteStateStore};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Booking requests to apply
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Distinct events on sale (keys)
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Records per consumer batch
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = EmbeddedStreamConfig {
        shards: args.shards,
        ..Default::default()
    };
    let log = Arc::new(EmbeddedLog::open(&dir.path().join("stream"), &cfg)?);
    let creates: Vec<Record> = (0..args.keys)
        .map(|k| {
            let e = json!({"specversion":"1.0","id":format!("c{k}"),"source":"/b","type":"inventory.event.created",
                "data":{"eventId":format!("ev-{k}"),"name":"n","venue":"v","startsAt":"2026-12-01T20:00:00Z","capacity":1_000_000}});
            Record { key: format!("ev-{k}").into(), payload: Bytes::from(e.to_string()) }
        })
        .collect();
    log.append(creates).await;
    let fill = Instant::now();
    for chunk in 0..args.events.div_ceil(10_000) {
        let records: Vec<Record> = (chunk * 10_000..((chunk + 1) * 10_000).min(args.events))
            .map(|i| {
                let k = i % args.keys;
                let e = floodgate_bench::sample_batch(1, i as u64).remove(0);
                let mut e = e;
                e["data"]["eventId"] = json!(format!("ev-{k}"));
                Record {
                    key: (format!("ev-{k}")).into(),
                    payload: Bytes::from(e.to_string()),
                }
            })
            .collect();
        log.append(records).await;
    }
    eprintln!("filled {} events in {:?}", args.events, fill.elapsed());
    let state = Arc::new(SqliteStateStore::open(&dir.path().join("state.db"))?);
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(EmbeddedCheckpoints::open(&dir.path().join("stream"))?);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let config = RuntimeConfig {
        max_batch_records: args.batch,
        ..Default::default()
    };
    let tasks = spawn_consumers(
        log.clone(),
        checkpoints,
        Arc::new(BookingsProcessor::new(state.clone())),
        config,
        stop_rx,
    )
    .await?;
    let total = (args.events + args.keys) as u64;
    loop {
        let mut done = 0u64;
        for s in 0..args.shards {
            if let Some(p) = state.position(&ShardId(s.to_string())).await? {
                done += p.as_u64().unwrap_or(0) + 1;
            }
        }
        if done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    for t in tasks {
        t.await?;
    }
    println!(
        "{}",
        json!({"shards": args.shards, "events": total, "seconds": secs, "events_per_sec": (total as f64 / secs).round(), "batch": args.batch})
    );
    Ok(())
}
