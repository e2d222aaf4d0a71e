//! `floodgate-loadgen`: an HTTP load generator for the edge, closed or open loop.
//!
//! Closed loop (the default): C connections each POST pre-built batches of N events back
//! to back for D seconds and record each request's latency from its send; prints events/s
//! and p50/p90/p99/max ack latency as one JSON line (`bench/scripts/throughput.sh` reads
//! it). It finds the saturation throughput; its latencies hide a server's stalls, since a
//! stalled connection sends nothing (coordinated omission).
//!
//! Open loop (`--rate-events R`, or `--sweep-events R1,R2,…` for a step per rate): batches
//! at a constant arrival rate whatever the answers, each request's latency measured from
//! its *intended* send time into an HDR histogram (see `floodgate_bench::open_loop`). Prints
//! a table row per step (offered and achieved events/s, p50/p99/p99.9/max, errors with the
//! 503s the edge shed, late sends, the server's CPU) and writes `report.json` and
//! `latency.svg` (latency percentiles against achieved throughput) into `--out`.
//!
//! Only ever point it at 127.0.0.1.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use floodgate_bench::open_loop::{ServerCpu, SweepConfig};
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
    /// Seconds to run (open loop: of each step, unless --step-seconds)
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of warm-up not counted (open loop: at the start of every step)
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Open loop: offer this many events per second (in requests of --batch events),
    /// whatever the answers; latency from each request's intended send time
    #[arg(long, conflicts_with = "sweep_events")]
    rate_events: Option<f64>,
    /// Open loop, one step per rate: offered events per second, comma-separated
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    sweep_events: Vec<f64>,
    /// Open loop: measured seconds of each step (default: --duration)
    #[arg(long)]
    step_seconds: Option<f64>,
    /// Open loop: requests in flight at most, each on its own connection; past it a due
    /// request waits for one to finish (counted, and its wait is in its latency)
    #[arg(long, default_value_t = 8192)]
    max_inflight: usize,
    /// Open loop: a request not answered within this many ms of its send is an error
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Open loop: a send starting more than this many ms after its intended time is late
    #[arg(long, default_value_t = 10)]
    late_ms: u64,
    /// Open loop: read the server's CPU from /proc/PID/stat (default: its /metrics,
    /// process_cpu_seconds_total, at the --url's host and port)
    #[arg(long)]
    server_pid: Option<u32>,
    /// Open loop: where report.json and latency.svg go
    #[arg(long, default_value = "loadgen-report")]
    out: PathBuf,
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

use floodgate_bench::gzip_fast;

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.url.starts_with("http://127.") && !args.url.starts_with("http://localhost") {
        bail!("load tests only ever target loopback");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    if args.rate_events.is_some() || !args.sweep_events.is_empty() {
        let out = args.out.clone();
        let report = rt.block_on(open_loop(args))?;
        // Connections of sends that timed out, and connects still under way, belong to
        // the runtime's tasks: under overload they can hold every file this process may
        // open. Shutting the runtime down closes them before the report is written.
        drop(rt);
        let (json_path, svg_path) = floodgate_bench::open_loop::write_report(&report, &out)?;
        eprintln!(
            "loadgen: report in {}, plot in {}",
            json_path.display(),
            svg_path.display()
        );
        return Ok(());
    }
    rt.block_on(run(args))
}

/// The soft limit on this process's open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn open_loop(args: Args) -> Result<floodgate_bench::open_loop::Report> {
    // Each request in flight holds a connection: past the open-files limit, sends would
    // fail as connection errors that say nothing about the server.
    if let Some(limit) = open_files_limit()
        && args.max_inflight as u64 + 64 > limit
    {
        bail!(
            "--max-inflight {} needs more open files than this process may have ({limit}): \
             raise `ulimit -n` or lower --max-inflight",
            args.max_inflight
        );
    }
    let uri: hyper::Uri = args.url.parse().context("--url")?;
    let base = format!(
        "http://{}",
        uri.authority().context("--url has no host")?.as_str()
    );
    let config = SweepConfig {
        url: args.url.clone(),
        rates_events_per_sec: match args.rate_events {
            Some(r) => vec![r],
            None => args.sweep_events.clone(),
        },
        batch: args.batch,
        step: Duration::try_from_secs_f64(args.step_seconds.unwrap_or(args.duration as f64))
            .context("--step-seconds")?,
        warmup: Duration::from_secs(args.warmup),
        max_inflight: args.max_inflight,
        timeout: Duration::from_millis(args.timeout_ms),
        late_after: Duration::from_millis(args.late_ms),
        api_key: args.api_key.clone(),
        gzip: args.gzip,
        pool: args.pool,
        server_cpu: match args.server_pid {
            Some(pid) => ServerCpu::Proc { pid },
            None => ServerCpu::Metrics { base },
        },
        threads: args.threads,
    };
    floodgate_bench::open_loop::sweep(&config, &mut std::io::stdout()).await
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
