//! `floodgate-loadgen`: a small closed-loop HTTP load generator for the edge.
//!
//! C connections each POST pre-built batches of N events back to back for D seconds and
//! record each request's latency; prints events/s and p50/p90/p99/max ack latency as JSON.
//! Only ever point it at 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    /// Edge URL
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/events")]
    url: String,
    /// Concurrent connections (closed loop: one request in flight each)
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Events per request
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Seconds to run
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of warm-up not counted
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Worker threads of the generator's runtime
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Send this API key (`X-Api-Key`)
    #[arg(long, env = "FLOODGATE_API_KEY")]
    api_key: Option<String>,
    /// gzip every body (`Content-Encoding: gzip`, fast level), as producers on slow links do
    #[arg(long)]
    gzip: bool,
    /// Prepare this many bodies before the run and cycle through them, so that the
    /// generator's own work (gzip) does not take CPU from the edge. Repeated ids: run the
    /// edge with dedupe off (`dedupe_window_ms = 0`). 0: a fresh body per request.
    #[arg(long, default_value_t = 0)]
    pool: usize,
}

fn gzip_fast(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, body).expect("writing to a Vec");
    e.finish().expect("writing to a Vec")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.url.starts_with("http://127.") && !args.url.starts_with("http://localhost") {
        bail!("load tests only ever target loopback");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    // Every request carries fresh event ids, so the edge's dedupe never skips the work.
    let run_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 1_000)
        * 1_000_000_000;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let pool: Arc<Vec<Bytes>> = Arc::new({
        let mut bodies = floodgate_bench::UniqueBodies::new(args.batch, run_seed + 999_000_000);
        (0..args.pool)
            .map(|_| {
                let b = bodies.next_body();
                Bytes::from(if args.gzip { gzip_fast(&b) } else { b })
            })
            .collect()
    });
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let (client, stop, measuring) = (client.clone(), stop.clone(), measuring.clone());
        let mut bodies =
            floodgate_bench::UniqueBodies::new(args.batch, run_seed + c as u64 * 10_000_000);
        let url: hyper::Uri = args.url.parse()?;
        let (api_key, gzip, pool) = (args.api_key.clone(), args.gzip, pool.clone());
        let mut next = c * 7919;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let body = if pool.is_empty() {
                    let b = bodies.next_body();
                    Bytes::from(if gzip { gzip_fast(&b) } else { b })
                } else {
                    next = (next + 1) % pool.len();
                    pool[next].clone()
                };
                let mut req = Request::post(url.clone())
                    .header("content-type", "application/cloudevents-batch+json");
                if gzip {
                    req = req.header("content-encoding", "gzip");
                }
                if let Some(key) = &api_key {
                    req = req.header("x-api-key", key.as_str());
                }
                let req = req.body(Full::new(body)).unwrap();
                let started = Instant::now();
                let res = client.request(req).await;
                let good = match res {
                    Ok(resp) => {
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        status == 200
                    }
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    lat.push(started.elapsed());
                    if good { ok += 1 } else { failed += 1 }
                }
            }
            (lat, ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut ok, mut failed) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, o, f) = t.await?;
        lat.extend(l);
        ok += o;
        failed += f;
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let summary = json!({
        "concurrency": args.concurrency,
        "batch": args.batch,
        "seconds": elapsed,
        "requests_ok": ok,
        "requests_failed": failed,
        "events_per_sec": (ok as f64 * args.batch as f64 / elapsed).round(),
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    });
    println!("{summary}");
    Ok(())
}
