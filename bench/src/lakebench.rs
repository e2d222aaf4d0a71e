//! `floodgate-lakebench`: events/s (and MB/s of events) the lake consumer turns from the
//! embedded log into Parquet files on local disk, and the files it makes. Fills a fresh
//! log with N booking requests spread over a few hours, then starts the lake consumers
//! and times how long they take to catch up, including the final flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use floodgate_core::config::EmbeddedStreamConfig;
use floodgate_core::registry::Registry;
use floodgate_core::stream::{CheckpointStore, Record, StreamWriter};
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{RuntimeConfig, spawn_consumers};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog, LocalDirStore};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Booking requests to write to the lake
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Hours the events' times spread over (partitions per table)
    #[arg(long, default_value_t = 4)]
    hours: usize,
    /// A shard's buffer becomes files at this many bytes
    #[arg(long, default_value_t = 128 << 20)]
    roll_bytes: u64,
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
    let mut input_bytes = 0u64;
    // The events' times: the past few hours, so that each is partitioned by its time (the
    // lake's late window); one partition per hour and shard.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    for chunk in 0..args.events.div_ceil(10_000) {
        let records: Vec<Record> = (chunk * 10_000..((chunk + 1) * 10_000).min(args.events))
            .map(|i| {
                let mut e = floodgate_bench::sample_batch(1, i as u64).remove(0);
                let k = i % 1000;
                e["data"]["eventId"] = json!(format!("ev-{k}"));
                e["time"] = json!(hours_ago(now, i % args.hours));
                let payload = Bytes::from(e.to_string());
                input_bytes += payload.len() as u64;
                Record {
                    key: (format!("ev-{k}")).into(),
                    payload,
                }
            })
            .collect();
        log.append(records).await;
    }
    let me = std::process::id();
    // The peak from here on only (Linux: "5" resets VmHWM to the current RSS), so the
    // log's writes above do not count as the lake's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = floodgate_bench::proc_status_bytes(me, "VmRSS").unwrap_or(0);
    let registry = Registry::builtin()?;
    let tables = floodgate_core::lake::tables(&registry)?;
    let lake_dir = dir.path().join("lake");
    let store = Arc::new(LocalDirStore::open(&lake_dir)?);
    let lake = Arc::new(LakeProcessor::new(
        store,
        tables,
        LakeConfig {
            roll_bytes: args.roll_bytes,
            roll_age: Duration::from_secs(3600),
        },
    ));
    let checkpoints: Arc<dyn CheckpointStore> =
        Arc::new(EmbeddedCheckpoints::open(&dir.path().join("stream"))?);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    // Stop at once (below): consumers drain everything in the log before stopping, then
    // flush.
    let tasks = spawn_consumers(
        log.clone(),
        checkpoints,
        lake.clone(),
        RuntimeConfig {
            drain_limit: Duration::from_secs(3600),
            ..RuntimeConfig::default()
        },
        stop_rx,
    )
    .await?;
    // Stopped before the coordinator has started the shards' tasks, the consumers would
    // end with nothing read; once one row is buffered, every shard's task is running.
    while lake.peak_buffer_bytes() == 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the lake read nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    // What the lake added to the process at its peak: its buffers and their encoding (the
    // log's writes before are behind `rss_before`; the peak cannot be below it).
    let peak = floodgate_bench::proc_status_bytes(me, "VmHWM").unwrap_or(0);
    let mut files = Vec::new();
    let mut stack = vec![lake_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".parquet") {
                files.push(e.metadata()?.len());
            }
        }
    }
    files.sort_unstable();
    let out_bytes: u64 = files.iter().sum();
    println!(
        "{}",
        json!({
            "events": args.events, "shards": args.shards, "seconds": secs,
            "events_per_sec": (args.events as f64 / secs).round(),
            "input_mb_per_sec": (input_bytes as f64 / secs / 1e6 * 10.0).round() / 10.0,
            "files": files.len(),
            "file_bytes_median": files.get(files.len() / 2).copied().unwrap_or(0),
            "file_bytes_max": files.last().copied().unwrap_or(0),
            "parquet_bytes_total": out_bytes,
            "input_bytes_total": input_bytes,
            "compression_ratio": (input_bytes as f64 / out_bytes.max(1) as f64 * 10.0).round() / 10.0,
            "rss_mb_before_lake": rss_before / 1_000_000,
            "peak_rss_mb": peak / 1_000_000,
            "lake_peak_buffer_mb": lake.peak_buffer_bytes() / 1_000_000,
            "peak_over_input": ((peak.saturating_sub(rss_before)) as f64 / input_bytes.max(1) as f64 * 100.0).round() / 100.0,
        })
    );
    Ok(())
}

/// `hours` hours before `now` (Unix seconds), at 17 minutes past, as an RFC 3339 UTC time.
fn hours_ago(now: i64, hours: usize) -> String {
    let t = now - hours as i64 * 3600;
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:17:00Z", secs / 3600)
}
