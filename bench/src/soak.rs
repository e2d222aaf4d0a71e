//! `floodgate-soak`: holds a `floodgate serve` at a fixed, open-loop rate for minutes or
//! hours and reports, per interval (a minute by default), what a pipeline that runs for
//! months must keep flat: events/s achieved, p50/p99/max latency, errors by status, the
//! server's RSS, and disk use per data directory.
//!
//! Open loop: request k is due at `start + k × batch / rate`, whether or not earlier ones
//! were answered, and its latency runs from when it was due, not from when it was sent; a
//! server that stalls is charged for every request it held up (no coordinated omission).
//!
//! It starts the server itself (from `--bin`, beside this executable by default, on an
//! ephemeral loopback port, with a fresh data directory under `--out`) and stops it at the
//! end, or targets one already running (`--url`, with `--pid` and `--data-dir` for its RSS
//! and disk). First it puts `--event-ids` events on sale with the largest capacity the
//! schema allows; then it posts batches of `booking.requested`, each with fresh event and
//! booking ids, one seat each. Only ever 127.0.0.1.
//!
//! Output: one JSON row per interval on stdout (and as CSV, `--csv`), a summary row
//! against the issue's criteria, and an SVG of RSS and p99 over time (`--svg`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use floodgate_bench::HttpClient;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// Events per second to offer, whatever the answers (open loop)
    #[arg(long, default_value_t = 12_500)]
    rate: u64,
    /// Events per request
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// How long to run
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds per reported row
    #[arg(long, default_value_t = 60)]
    interval_secs: u64,
    /// Target a running server instead of starting one (http://127.0.0.1:PORT)
    #[arg(long)]
    url: Option<String>,
    /// The running server's pid, for its RSS (with --url)
    #[arg(long)]
    pid: Option<u32>,
    /// The server's data directory, for disk use (a fresh one under --out when started here)
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The `floodgate` binary to start (default: beside this executable)
    #[arg(long)]
    bin: Option<PathBuf>,
    /// A configuration file for the started server
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the started server's data and log, and the CSV and SVG by default, go
    #[arg(long, default_value = "soak-out")]
    out: PathBuf,
    /// Per-interval rows as CSV (default: <out>/soak.csv)
    #[arg(long)]
    csv: Option<PathBuf>,
    /// RSS and p99 over time as SVG (default: <out>/soak.svg)
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Events on sale that the bookings spread over
    #[arg(long, default_value_t = 64)]
    event_ids: usize,
    /// Requests in flight at most; past it a due request waits (and its wait counts)
    #[arg(long, default_value_t = 20_000)]
    max_inflight: usize,
    /// Worker threads of the generator's runtime
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Send this API key (`X-Api-Key`)
    #[arg(long, env = "FLOODGATE_API_KEY")]
    api_key: Option<String>,
}

/// The largest capacity `inventory.event.created` allows.
const MAX_CAPACITY: u64 = 1_000_000;

/// The data directories whose disk use each row reports.
const DATA_DIRS: [&str; 5] = ["stream", "state", "outbox", "lake", "quarantine"];

/// One answered (or failed) request.
struct Sample {
    /// From when it was due to when its answer was read.
    latency: Duration,
    /// `"200"`, another status, or `"io"` when there was no answer.
    outcome: String,
}

/// One reported interval.
#[derive(Debug, Clone)]
struct Row {
    minute: f64,
    events_per_sec: f64,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: BTreeMap<String, u64>,
    rss_bytes: Option<u64>,
    hwm_bytes: Option<u64>,
    anon_bytes: Option<u64>,
    disk: Vec<(&'static str, u64)>,
    /// From the server's `/metrics`: what its lake buffers hold (summed over consumers) and
    /// the largest lag of any consumer, in records.
    lake_buffered_bytes: Option<u64>,
    lag_records: Option<u64>,
}

impl Row {
    fn json(&self) -> Value {
        let mb = |b: Option<u64>| b.map(|b| (b as f64 / 1e6 * 10.0).round() / 10.0);
        let disk: serde_json::Map<String, Value> = self
            .disk
            .iter()
            .map(|(d, b)| {
                (
                    (*d).to_owned(),
                    json!((*b as f64 / 1e6 * 10.0).round() / 10.0),
                )
            })
            .collect();
        json!({
            "minute": self.minute,
            "events_per_sec": self.events_per_sec.round(),
            "requests": self.requests,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
            "errors": self.errors,
            "rss_mb": mb(self.rss_bytes), "hwm_mb": mb(self.hwm_bytes), "anon_mb": mb(self.anon_bytes),
            "lake_buffered_mb": mb(self.lake_buffered_bytes),
            "lag_records": self.lag_records,
            "disk_mb": disk,
        })
    }

    fn csv_header() -> String {
        let mut h =
            "minute,events_per_sec,requests,p50_ms,p99_ms,max_ms,errors,rss_mb,hwm_mb,anon_mb,lake_buffered_mb,lag_records"
                .to_owned();
        for d in DATA_DIRS {
            h.push_str(&format!(",disk_{d}_mb"));
        }
        h
    }

    fn csv(&self) -> String {
        let mb = |b: Option<u64>| b.map_or(String::new(), |b| format!("{:.1}", b as f64 / 1e6));
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let mut line = format!(
            "{:.2},{:.0},{},{:.2},{:.2},{:.2},{},{},{},{}",
            self.minute,
            self.events_per_sec,
            self.requests,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            errors.join(" "),
            mb(self.rss_bytes),
            mb(self.hwm_bytes),
            mb(self.anon_bytes)
        );
        line.push_str(&format!(
            ",{},{}",
            mb(self.lake_buffered_bytes),
            self.lag_records.map_or(String::new(), |l| l.to_string())
        ));
        for d in DATA_DIRS {
            match self.disk.iter().find(|(name, _)| *name == d) {
                Some((_, b)) => line.push_str(&format!(",{:.1}", *b as f64 / 1e6)),
                None => line.push(','),
            }
        }
        line
    }
}

/// Bytes on disk under `dir` (allocated blocks, not apparent sizes); 0 when it is missing.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// The `q` quantile (0..=1) of sorted `values`, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    (sorted[i].as_secs_f64() * 1e5).round() / 100.0
}

/// A server this run started: stopped (SIGTERM, then SIGKILL after a deadline) when dropped.
struct Started {
    child: Child,
}

impl Drop for Started {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `floodgate serve` on an ephemeral loopback port; returns it, its base URL and the
/// budget total it printed (if it printed one).
fn start_server(args: &Args, data_dir: &Path) -> Result<(Started, String, Option<u64>)> {
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this executable has no directory")?
            .join("floodgate"),
    };
    let log_path = args.out.join("server.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let started = Started { child };
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .context("the server exited before it listened")??;
    let addr = first
        .rsplit("http://")
        .next()
        .map(str::trim)
        .with_context(|| format!("unexpected first line {first:?}"))?
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    // The budget is printed before the server listens.
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let budget = text.lines().find_map(|l| {
        let rest = l.strip_prefix("memory budget")?;
        rest.rsplit_once('(')?
            .1
            .strip_suffix(" bytes)")?
            .parse()
            .ok()
    });
    Ok((started, format!("http://{addr}"), budget))
}

async fn post(
    client: &HttpClient,
    url: &hyper::Uri,
    api_key: Option<&str>,
    body: Bytes,
) -> Result<(u16, Bytes)> {
    let mut req =
        Request::post(url.clone()).header("content-type", "application/cloudevents-batch+json");
    if let Some(key) = api_key {
        req = req.header("x-api-key", key);
    }
    let resp = client.request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Puts every event on sale and waits (with a deadline) until the processors applied them.
async fn create_inventory(
    client: &HttpClient,
    base: &str,
    api_key: Option<&str>,
    event_ids: &[String],
) -> Result<()> {
    let events = floodgate_bench::inventory_batch(event_ids, MAX_CAPACITY);
    let url: hyper::Uri = format!("{base}/v1/events").parse()?;
    let (status, body) = post(
        client,
        &url,
        api_key,
        Bytes::from(serde_json::to_vec(&events)?),
    )
    .await?;
    if status != 200 {
        bail!(
            "creating the inventory: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in event_ids {
        let url: hyper::Uri = format!("{base}/v1/inventory/{id}").parse()?;
        loop {
            let mut req = Request::get(url.clone());
            if let Some(key) = api_key {
                req = req.header("x-api-key", key);
            }
            let resp = client.request(req.body(Full::new(Bytes::new()))?).await?;
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("event {id} was not on sale within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.url
        && !url.starts_with("http://127.")
        && !url.starts_with("http://localhost")
    {
        bail!("soak runs only ever target loopback");
    }
    if args.rate == 0 || args.batch == 0 || args.interval_secs == 0 {
        bail!("--rate, --batch and --interval-secs must be at least 1");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let (server, base, pid, data_dir, budget) = match &args.url {
        Some(url) => (
            None,
            url.trim_end_matches('/')
                .trim_end_matches("/v1/events")
                .to_owned(),
            args.pid,
            args.data_dir.clone(),
            None,
        ),
        None => {
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| args.out.join("data"));
            let (server, base, budget) = start_server(&args, &data_dir)?;
            let pid = server.child.id();
            (Some(server), base, Some(pid), Some(data_dir), budget)
        }
    };
    // Idle connections are dropped well before the server's idle timeout (60 s by
    // default): reusing one at the moment the server closes it fails the request, a
    // client-side race (RFC 9112 §9.3.1) that says nothing about the server.
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build_http();
    let event_ids: Vec<String> = (0..args.event_ids).map(|i| format!("soak-{i}")).collect();
    create_inventory(&client, &base, args.api_key.as_deref(), &event_ids).await?;

    let csv_path = args
        .csv
        .clone()
        .unwrap_or_else(|| args.out.join("soak.csv"));
    let svg_path = args
        .svg
        .clone()
        .unwrap_or_else(|| args.out.join("soak.svg"));
    let mut csv = std::fs::File::create(&csv_path)
        .with_context(|| format!("cannot create {}", csv_path.display()))?;
    writeln!(csv, "{}", Row::csv_header())?;
    eprintln!(
        "soak: {} events/s in batches of {} for {} min against {base}; rows every {} s",
        args.rate, args.batch, args.minutes, args.interval_secs
    );

    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let period = Duration::from_secs_f64(args.batch as f64 / args.rate as f64);
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = start + total;
    let url: hyper::Uri = format!("{base}/v1/events").parse()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(args.max_inflight));
    let mut sender = Some({
        let (samples, client, slots) = (samples.clone(), client.clone(), slots.clone());
        let api_key = args.api_key.clone();
        let run_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() % 100_000)
            * 10_000_000;
        let mut bodies =
            floodgate_bench::BookingBodies::new(args.batch as usize, &event_ids, run_seed);
        tokio::spawn(async move {
            let mut k: u32 = 0;
            loop {
                let due = start + period * k;
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let body = Bytes::from(bodies.next_body());
                let (samples, client, url, api_key) = (
                    samples.clone(),
                    client.clone(),
                    url.clone(),
                    api_key.clone(),
                );
                tokio::spawn(async move {
                    let outcome = match post(&client, &url, api_key.as_deref(), body).await {
                        Ok((status, _)) => status.to_string(),
                        Err(_) => "io".to_owned(),
                    };
                    let latency = due.elapsed();
                    drop(permit);
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Sample { latency, outcome });
                });
                k += 1;
            }
        })
    });

    let interval = Duration::from_secs(args.interval_secs);
    let mut rows: Vec<Row> = Vec::new();
    let mut at = start;
    loop {
        let finishing = at + interval >= end;
        let next = if finishing { end } else { at + interval };
        tokio::time::sleep_until(next).await;
        if finishing {
            // Every request sent gets its answer (or its failure) into the last row.
            if let Some(sender) = sender.take() {
                let _ = sender.await;
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while slots.available_permits() < args.max_inflight && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let secs = next.duration_since(at).as_secs_f64().max(1e-3);
        let taken = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
        let mut latencies: Vec<Duration> = taken.iter().map(|s| s.latency).collect();
        latencies.sort_unstable();
        let mut errors = BTreeMap::new();
        let mut ok = 0u64;
        for s in &taken {
            if s.outcome == "200" {
                ok += 1;
            } else {
                *errors.entry(s.outcome.clone()).or_insert(0) += 1;
            }
        }
        let status = |f: &str| pid.and_then(|p| floodgate_bench::proc_status_bytes(p, f));
        let metrics =
            floodgate_bench::scrape_metrics(&client, &base, args.api_key.as_deref()).await;
        let row = Row {
            minute: (next.duration_since(start).as_secs_f64() / 60.0 * 100.0).round() / 100.0,
            events_per_sec: (ok * args.batch) as f64 / secs,
            requests: taken.len(),
            p50_ms: quantile_ms(&latencies, 0.50),
            p99_ms: quantile_ms(&latencies, 0.99),
            max_ms: quantile_ms(&latencies, 1.0),
            errors,
            rss_bytes: status("VmRSS"),
            hwm_bytes: status("VmHWM"),
            anon_bytes: status("RssAnon"),
            disk: data_dir.as_deref().map_or_else(Vec::new, |d| {
                DATA_DIRS
                    .iter()
                    .map(|n| (*n, disk_use(&d.join(n))))
                    .collect()
            }),
            lake_buffered_bytes: floodgate_bench::prometheus_metric(
                &metrics,
                "floodgate_lake_buffered_bytes",
            )
            .map(|(sum, _)| sum as u64),
            lag_records: floodgate_bench::prometheus_metric(
                &metrics,
                "floodgate_processor_lag_records",
            )
            .map(|(_, max)| max as u64),
        };
        println!("{}", row.json());
        writeln!(csv, "{}", row.csv())?;
        csv.flush()?;
        rows.push(row);
        at = next;
        if finishing {
            break;
        }
    }
    std::fs::write(&svg_path, svg(&rows, budget))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    println!("{}", summary(&rows, budget));
    eprintln!(
        "soak: rows in {}, chart in {}",
        csv_path.display(),
        svg_path.display()
    );
    drop(server);
    Ok(())
}

/// The run against the issue's criteria: RSS within the budget, p99 of the last 5 rows
/// within 1.5× of rows 2–6, no errors, the derived-event log smaller than the stream.
fn summary(rows: &[Row], budget: Option<u64>) -> Value {
    let p99 = |rs: &[Row]| rs.iter().map(|r| r.p99_ms).fold(0.0, f64::max);
    let early = rows.get(1..rows.len().min(6)).map(p99);
    let late = (rows.len() >= 7).then(|| p99(&rows[rows.len() - 5..]));
    let errors: u64 = rows.iter().flat_map(|r| r.errors.values()).sum();
    let max_rss = rows.iter().filter_map(|r| r.rss_bytes).max();
    let last_disk = rows.last().map(|r| r.disk.clone()).unwrap_or_default();
    let disk = |name: &str| last_disk.iter().find(|(d, _)| *d == name).map(|(_, b)| *b);
    // Flat after the warm-up: RSS at the end of minute 2 against the most it reached later.
    let warm = rows.iter().find(|r| r.minute >= 2.0 - 1e-6);
    let rss_at_2 = warm.and_then(|r| r.rss_bytes);
    let rss_after_2 = warm.and_then(|w| {
        rows.iter()
            .filter(|r| r.minute > w.minute)
            .filter_map(|r| r.rss_bytes)
            .max()
    });
    let disk_growth: serde_json::Map<String, Value> = match (rows.first(), rows.last()) {
        (Some(first), Some(last)) => last
            .disk
            .iter()
            .map(|(d, b)| {
                let before = first
                    .disk
                    .iter()
                    .find(|(n, _)| n == d)
                    .map_or(0, |(_, b)| *b);
                (
                    (*d).to_owned(),
                    json!(((*b as f64 - before as f64) / 1e6).round()),
                )
            })
            .collect(),
        _ => serde_json::Map::new(),
    };
    json!({
        "summary": true,
        "rows": rows.len(),
        "errors": errors,
        "max_rss_mb": max_rss.map(|b| b / 1_000_000),
        "budget_mb": budget.map(|b| b / 1_000_000),
        "rss_within_budget": max_rss.zip(budget).map(|(r, b)| r <= b),
        "rss_mb_at_minute_2": rss_at_2.map(|b| b / 1_000_000),
        "max_rss_mb_after_minute_2": rss_after_2.map(|b| b / 1_000_000),
        "disk_growth_mb_since_first_row": disk_growth,
        "p99_ms_rows_2_to_6": early,
        "p99_ms_last_5_rows": late,
        "p99_ratio": early.zip(late).map(|(e, l)| (l / e.max(1e-3) * 100.0).round() / 100.0),
        "derived_log_smaller_than_stream": disk("outbox").zip(disk("stream")).map(|(o, s)| o < s),
    })
}

/// A small chart: RSS (MB, left axis) and p99 (ms, right axis) per row, with the budget as
/// a dashed line when known.
fn svg(rows: &[Row], budget: Option<u64>) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 320.0, 60.0, 60.0, 30.0, 40.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max_min = rows.last().map_or(1.0, |r| r.minute).max(1e-3);
    let rss: Vec<f64> = rows
        .iter()
        .map(|r| r.rss_bytes.unwrap_or(0) as f64 / 1e6)
        .collect();
    let budget_mb = budget.map(|b| b as f64 / 1e6);
    let rss_top = nice(rss.iter().copied().fold(budget_mb.unwrap_or(0.0), f64::max));
    let p99_top = nice(rows.iter().map(|r| r.p99_ms).fold(0.0, f64::max));
    let x = |m: f64| left + m / max_min * plot_w;
    let y = |v: f64, top_v: f64| top + plot_h - v / top_v * plot_h;
    let line = |values: &[f64], top_v: f64| -> String {
        rows.iter()
            .zip(values)
            .map(|(r, v)| format!("{:.1},{:.1}", x(r.minute), y(*v, top_v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let p99: Vec<f64> = rows.iter().map(|r| r.p99_ms).collect();
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{left}" y="18" font-size="13">floodgate soak: RSS and p99 over time</text>
<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="#1f77b4"/>
<line x1="{r}" y1="{top}" x2="{r}" y2="{b}" stroke="#d62728"/>
<text x="{left}" y="{bl}" text-anchor="middle">0</text>
<text x="{r}" y="{bl}" text-anchor="middle">{max_min:.1} min</text>
<text x="{lx}" y="{top}" text-anchor="end" fill="#1f77b4">{rss_top:.0} MB</text>
<text x="{lx}" y="{b}" text-anchor="end" fill="#1f77b4">0</text>
<text x="{rx}" y="{top}" fill="#d62728">{p99_top:.0} ms</text>
<text x="{rx}" y="{b}" fill="#d62728">0</text>
"##,
        b = top + plot_h,
        r = left + plot_w,
        bl = top + plot_h + 16.0,
        lx = left - 4.0,
        rx = left + plot_w + 4.0,
    );
    if let Some(bm) = budget_mb {
        let by = y(bm, rss_top);
        out.push_str(&format!(
            r##"<line x1="{left}" y1="{by:.1}" x2="{r}" y2="{by:.1}" stroke="#1f77b4" stroke-dasharray="4 3"/>
<text x="{tx}" y="{ty:.1}" fill="#1f77b4">budget {bm:.0} MB</text>
"##,
            r = left + plot_w,
            tx = left + 4.0,
            ty = by - 3.0,
        ));
    }
    out.push_str(&format!(
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>
<polyline fill="none" stroke="#d62728" stroke-width="2" points="{}"/>
<text x="{left}" y="{ly}" fill="#1f77b4">RSS (MB)</text>
<text x="{px}" y="{ly}" fill="#d62728">p99 latency (ms)</text>
</svg>
"##,
        line(&rss, rss_top),
        line(&p99, p99_top),
        ly = h - 8.0,
        px = left + 90.0,
    ));
    out
}

/// A round axis top at or above `v`: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|t| *t >= v)
        .unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(minute: f64, p99: f64, rss: u64) -> Row {
        Row {
            minute,
            events_per_sec: 1000.0,
            requests: 10,
            p50_ms: 1.0,
            p99_ms: p99,
            max_ms: p99,
            errors: BTreeMap::new(),
            rss_bytes: Some(rss),
            hwm_bytes: Some(rss),
            anon_bytes: None,
            disk: vec![("stream", 10), ("outbox", 5)],
            lake_buffered_bytes: None,
            lag_records: None,
        }
    }

    #[test]
    fn quantiles_axes_and_the_summary() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&d, 0.5), 50.0);
        assert_eq!(quantile_ms(&d, 0.99), 99.0);
        assert_eq!(quantile_ms(&d, 1.0), 100.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(120.0), 200.0);
        assert_eq!(nice(4.2), 5.0);
        let rows: Vec<Row> = (1..=12)
            .map(|m| row(f64::from(m), if m > 7 { 30.0 } else { 20.0 }, 100_000_000))
            .collect();
        let s = summary(&rows, Some(200_000_000));
        assert_eq!(s["p99_ratio"], 1.5);
        assert_eq!(s["rss_within_budget"], true);
        assert_eq!(s["derived_log_smaller_than_stream"], true);
        let chart = svg(&rows, Some(200_000_000));
        assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
        assert_eq!(chart.matches("<polyline").count(), 2);
        assert!(chart.contains("budget 200 MB"));
        assert_eq!(
            rows[0].csv().split(',').count(),
            Row::csv_header().split(',').count()
        );
    }
}
