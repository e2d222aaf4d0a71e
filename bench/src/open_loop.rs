//! The load generator's open loop: requests at a constant arrival rate, each timed from
//! when it was *due*, into an HDR histogram; a sweep of such steps over a list of offered
//! rates, printed as a table and written as `report.json` and an SVG of latency
//! percentiles against achieved throughput ([`sweep`], [`write_report`]).
//!
//! Open loop: request k of a step is due at `start + k × batch / rate`, whether or not
//! earlier ones were answered. Its latency runs from that intended time to the end of its
//! answer, so a server that stalls is charged for every request that fell due while it
//! stalled, including those that the generator could only send late: the measurement is
//! corrected for coordinated omission. Answers never hold sends back: every request gets a
//! connection of its own while `max_inflight` allows, and a send that starts more than
//! `late_after` behind its time (the generator saturated, or out of in-flight permits) is
//! counted as late, so that a report shows when the generator, not the server, was the
//! bound.
//!
//! What counts: a request answered 200 or 207 is ok (207: the events its body counts as
//! accepted); anything else is an error by its kind: the status (`503` is the edge shedding
//! load with `Retry-After`, counted as an error), `connect`, `io`, or `timeout`. Latency
//! percentiles are of ok requests; achieved throughput is of events accepted by answers
//! that arrived within the measured window.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::{HttpClient, UniqueBodies};

/// Histograms count microseconds, from 1 µs to an hour, to 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;
const HISTOGRAM_SIGFIG: u8 = 3;

/// Where the server's CPU time is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCpu {
    /// `process_cpu_seconds_total` of the server's `/metrics` at this base URL
    /// (`http://host:port`).
    Metrics { base: String },
    /// `/proc/<pid>/stat` of a process on this machine.
    Proc { pid: u32 },
    /// Not measured.
    Off,
}

impl ServerCpu {
    /// The CPU seconds used so far, or `None` when the source does not tell.
    async fn seconds(&self, client: &HttpClient, api_key: Option<&str>) -> Option<f64> {
        match self {
            ServerCpu::Metrics { base } => {
                let text = crate::scrape_metrics(client, base, api_key).await;
                crate::prometheus_metric(&text, "process_cpu_seconds_total").map(|(sum, _)| sum)
            }
            ServerCpu::Proc { pid } => crate::proc_cpu_seconds(*pid),
            ServerCpu::Off => None,
        }
    }

    fn describe(&self) -> Value {
        match self {
            ServerCpu::Metrics { base } => {
                json!(format!("{base}/metrics process_cpu_seconds_total"))
            }
            ServerCpu::Proc { pid } => json!(format!("/proc/{pid}/stat")),
            ServerCpu::Off => Value::Null,
        }
    }
}

/// One open-loop run: a step per offered rate.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// The edge's `POST /v1/events` URL.
    pub url: String,
    /// Offered rates in events per second, one step each, in this order.
    pub rates_events_per_sec: Vec<f64>,
    /// Events per request.
    pub batch: usize,
    /// Measured time of each step.
    pub step: Duration,
    /// Time at the start of each step, at the step's rate, that is not measured.
    pub warmup: Duration,
    /// Requests in flight at most (each holds a connection, so a file descriptor).
    pub max_inflight: usize,
    /// A request not answered within this (from its send) is an error, `timeout`.
    pub timeout: Duration,
    /// A send that starts this far behind its intended time counts as late.
    pub late_after: Duration,
    /// Sent as `X-Api-Key` (never written to the report).
    pub api_key: Option<String>,
    /// gzip every body (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// Bodies prepared before the run and cycled through; 0: fresh ids in every request.
    pub pool: usize,
    pub server_cpu: ServerCpu,
    /// Worker threads of the generator's runtime, for the report.
    pub threads: usize,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
        if h.is_empty() {
            return Self {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: (h.mean() / 10.0).round() / 100.0,
        }
    }
}

/// What one step measured.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub offered_events_per_sec: f64,
    pub batch: usize,
    /// The measured window, in seconds.
    pub seconds: f64,
    /// Requests whose intended time fell in the window.
    pub requests_due: u64,
    /// Of those, answered 200 or 207.
    pub requests_ok: u64,
    /// Events accepted by answers that arrived within the window, per second.
    pub achieved_events_per_sec: f64,
    /// Ok answers that arrived within the window, per second.
    pub achieved_requests_per_sec: f64,
    /// Requests due in the window that failed, by kind: a status, `connect`, `io`, `timeout`.
    pub errors: BTreeMap<String, u64>,
    /// Requests due in the window whose send started more than `late_after` behind time.
    pub late_sends: u64,
    /// Sends that found every in-flight permit taken and waited for one.
    pub inflight_limit_waits: u64,
    /// The most requests in flight at once.
    pub inflight_peak: u64,
    /// How far behind their intended times sends started.
    pub send_lag_ms: Percentiles,
    /// From intended send time to the end of the answer, of ok requests due in the window.
    pub latency_ms: Percentiles,
    /// The server's CPU use over the window, in cores (1.0: one core busy throughout).
    pub server_cpu_cores: Option<f64>,
}

impl StepReport {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Requests the edge shed with 503 (they are errors too).
    pub fn shed(&self) -> u64 {
        self.errors.get("503").copied().unwrap_or(0)
    }

    pub fn json(&self) -> Value {
        let pct = |p: &Percentiles| json!({"p50": p.p50, "p90": p.p90, "p99": p.p99, "p999": p.p999, "max": p.max, "mean": p.mean});
        json!({
            "offered_events_per_sec": self.offered_events_per_sec,
            "offered_requests_per_sec": self.offered_events_per_sec / self.batch as f64,
            "achieved_events_per_sec": self.achieved_events_per_sec.round(),
            "achieved_requests_per_sec": (self.achieved_requests_per_sec * 10.0).round() / 10.0,
            "seconds": self.seconds,
            "requests_due": self.requests_due,
            "requests_ok": self.requests_ok,
            "errors": self.errors,
            "errors_total": self.errors_total(),
            "shed_503": self.shed(),
            "late_sends": self.late_sends,
            "inflight_limit_waits": self.inflight_limit_waits,
            "inflight_peak": self.inflight_peak,
            "send_lag_ms": pct(&self.send_lag_ms),
            "latency_ms": pct(&self.latency_ms),
            "server_cpu_cores": self.server_cpu_cores.map(|c| (c * 100.0).round() / 100.0),
        })
    }
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: SweepConfig,
    pub started_at_unix_ms: u128,
    pub steps: Vec<StepReport>,
}

impl Report {
    pub fn json(&self) -> Value {
        let c = &self.config;
        json!({
            "tool": "floodgate-loadgen",
            "mode": "open-loop",
            "latency": "milliseconds from each request's intended send time to the end of its answer (corrected for coordinated omission), of requests answered 200 or 207; HDR histogram, 3 significant digits",
            "errors": "requests answered with any other status (503: shed by the edge, with Retry-After), or with none: connect, io, timeout",
            "started_at_unix_ms": self.started_at_unix_ms,
            "machine": {
                "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "os": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
            },
            "parameters": {
                "url": c.url,
                "rates_events_per_sec": c.rates_events_per_sec,
                "batch": c.batch,
                "step_seconds": c.step.as_secs_f64(),
                "warmup_seconds": c.warmup.as_secs_f64(),
                "max_inflight": c.max_inflight,
                "timeout_ms": c.timeout.as_millis(),
                "late_after_ms": c.late_after.as_millis(),
                "gzip": c.gzip,
                "pool": c.pool,
                "api_key": c.api_key.is_some(),
                "generator_threads": c.threads,
                "server_cpu": c.server_cpu.describe(),
            },
            "steps": self.steps.iter().map(StepReport::json).collect::<Vec<_>>(),
        })
    }
}

/// The table's header, two lines.
pub fn table_header() -> String {
    format!(
        "{:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>15} {:>7} {:>10}\n{:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>15} {:>7} {:>10}",
        "offered",
        "achieved",
        "p50",
        "p99",
        "p99.9",
        "max",
        "errors",
        "late",
        "server",
        "events/s",
        "events/s",
        "ms",
        "ms",
        "ms",
        "ms",
        "(503 shed)",
        "sends",
        "CPU cores"
    )
}

/// One row of the table.
pub fn table_row(s: &StepReport) -> String {
    format!(
        "{:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>15} {:>7} {:>10}",
        s.offered_events_per_sec,
        s.achieved_events_per_sec,
        s.latency_ms.p50,
        s.latency_ms.p99,
        s.latency_ms.p999,
        s.latency_ms.max,
        format!("{} ({})", s.errors_total(), s.shed()),
        s.late_sends,
        s.server_cpu_cores
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
    )
}

/// Request bodies: fresh ids in every request, or a pool prepared up front and cycled.
struct Bodies {
    fresh: UniqueBodies,
    pool: Vec<Bytes>,
    next: usize,
    gzip: bool,
}

impl Bodies {
    fn new(config: &SweepConfig, seed: u64) -> Self {
        let mut fresh = UniqueBodies::new(config.batch, seed);
        let pool = (0..config.pool)
            .map(|_| body(fresh.next_body(), config.gzip))
            .collect();
        Self {
            fresh,
            pool,
            next: 0,
            gzip: config.gzip,
        }
    }

    fn next_body(&mut self) -> Bytes {
        if self.pool.is_empty() {
            body(self.fresh.next_body(), self.gzip)
        } else {
            self.next = (self.next + 1) % self.pool.len();
            self.pool[self.next].clone()
        }
    }
}

fn body(raw: Vec<u8>, gzip: bool) -> Bytes {
    Bytes::from(if gzip { crate::gzip_fast(&raw) } else { raw })
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// 200 or 207, with the events the edge accepted.
    Ok { accepted_events: u64 },
    /// Anything else: a status, `connect`, `io`, `timeout`.
    Error(String),
}

/// The edge's answer as an outcome: 200 accepted every event of the batch, 207 the number
/// its body gives (`accepted`); every other status is an error.
fn classify(status: u16, body: &[u8], batch: usize) -> Outcome {
    match status {
        200 => Outcome::Ok {
            accepted_events: batch as u64,
        },
        207 => Outcome::Ok {
            accepted_events: serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["accepted"].as_u64())
                .unwrap_or(0),
        },
        s => Outcome::Error(s.to_string()),
    }
}

async fn send(
    client: &HttpClient,
    url: hyper::Uri,
    api_key: Option<&str>,
    gzip: bool,
    body: Bytes,
    batch: usize,
) -> Outcome {
    let mut req = Request::post(url).header("content-type", "application/cloudevents-batch+json");
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    if let Some(key) = api_key {
        req = req.header("x-api-key", key);
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(_) => return Outcome::Error("request".to_owned()),
    };
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(b) => classify(status, &b.to_bytes(), batch),
                Err(_) => Outcome::Error("io".to_owned()),
            }
        }
        Err(e) if e.is_connect() => Outcome::Error("connect".to_owned()),
        Err(_) => Outcome::Error("io".to_owned()),
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, HISTOGRAM_SIGFIG)
        .expect("constant bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What a step's requests reported, as they finished.
struct Tally {
    window: (Instant, Instant),
    late_after: Duration,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    due: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    late: u64,
    answered_ok: u64,
    answered_events: u64,
}

impl Tally {
    fn new(window: (Instant, Instant), late_after: Duration) -> Self {
        Self {
            window,
            late_after,
            latency: histogram(),
            send_lag: histogram(),
            due: 0,
            ok: 0,
            errors: BTreeMap::new(),
            late: 0,
            answered_ok: 0,
            answered_events: 0,
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    /// A finished request: due at `due`, sent at `sent`, answered (or failed) at `done`.
    fn record(&mut self, due: Instant, sent: Instant, done: Instant, outcome: &Outcome) {
        if self.in_window(due) {
            self.due += 1;
            let lag = sent.saturating_duration_since(due);
            self.send_lag.saturating_record(micros(lag));
            if lag > self.late_after {
                self.late += 1;
            }
            match outcome {
                Outcome::Ok { .. } => {
                    self.ok += 1;
                    // From when it was due, not from when it was sent: see the module docs.
                    self.latency
                        .saturating_record(micros(done.saturating_duration_since(due)));
                }
                Outcome::Error(kind) => *self.errors.entry(kind.clone()).or_insert(0) += 1,
            }
        }
        if self.in_window(done)
            && let Outcome::Ok { accepted_events } = outcome
        {
            self.answered_ok += 1;
            self.answered_events += accepted_events;
        }
    }
}

/// A client for open-loop runs: as many connections as requests in flight, idle ones
/// dropped well before the edge's idle timeout (60 s by default), since reusing one just as
/// the server closes it fails the request, a client-side race (RFC 9112 §9.3.1) that says
/// nothing about the server.
pub fn client(max_inflight: usize) -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(max_inflight)
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build_http()
}

/// Runs one step at `rate` events per second and reports it once every request of the
/// step has been answered or has timed out.
async fn run_step(
    client: &HttpClient,
    config: &SweepConfig,
    rate: f64,
    bodies: &mut Bodies,
) -> Result<StepReport> {
    let url: hyper::Uri = config.url.parse().context("--url")?;
    let per_request = Duration::from_secs_f64(config.batch as f64 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let window = (start + config.warmup, start + config.warmup + config.step);
    let tally = Arc::new(Mutex::new(Tally::new(window, config.late_after)));
    let permits = u32::try_from(config.max_inflight).context("--max-inflight")?;
    let slots = Arc::new(Semaphore::new(config.max_inflight));
    let api_key: Option<Arc<str>> = config.api_key.as_deref().map(Arc::from);

    // The server's CPU at both ends of the window, read beside the schedule.
    let cpu = {
        let (client, source, key) = (client.clone(), config.server_cpu.clone(), api_key.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(window.0).await;
            let (t0, c0) = (
                Instant::now(),
                source.seconds(&client, key.as_deref()).await,
            );
            tokio::time::sleep_until(window.1).await;
            let (t1, c1) = (
                Instant::now(),
                source.seconds(&client, key.as_deref()).await,
            );
            c0.zip(c1)
                .map(|(a, b)| (b - a).max(0.0) / t1.duration_since(t0).as_secs_f64().max(1e-3))
        })
    };

    let (mut limit_waits, mut peak) = (0u64, 0u64);
    let mut k: u32 = 0;
    loop {
        let due = start + per_request * k;
        if due >= window.1 {
            break;
        }
        // Behind schedule, the next request goes at once (the timer would round up to
        // its next millisecond tick), once the requests already started have had a turn:
        // a schedule that never yields would hold every send back until it caught up.
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        } else {
            tokio::task::yield_now().await;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                limit_waits += 1;
                slots.clone().acquire_owned().await?
            }
        };
        peak = peak.max((config.max_inflight - slots.available_permits()) as u64);
        let body = bodies.next_body();
        let (client, url, tally, api_key) =
            (client.clone(), url.clone(), tally.clone(), api_key.clone());
        let (gzip, batch, timeout) = (config.gzip, config.batch, config.timeout);
        tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = tokio::time::timeout(
                timeout,
                send(&client, url, api_key.as_deref(), gzip, body, batch),
            )
            .await
            .unwrap_or_else(|_| Outcome::Error("timeout".to_owned()));
            let done = Instant::now();
            drop(permit);
            tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(due, sent, done, &outcome);
        });
        k = k.checked_add(1).context("too many requests in one step")?;
    }
    // Every request of the step has finished (each within its timeout) before it is
    // reported and before the next step starts.
    drop(slots.acquire_many(permits).await?);
    let server_cpu_cores = cpu.await?;
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let seconds = config.step.as_secs_f64();
    Ok(StepReport {
        offered_events_per_sec: rate,
        batch: config.batch,
        seconds,
        requests_due: t.due,
        requests_ok: t.ok,
        achieved_events_per_sec: t.answered_events as f64 / seconds,
        achieved_requests_per_sec: t.answered_ok as f64 / seconds,
        errors: t.errors.clone(),
        late_sends: t.late,
        inflight_limit_waits: limit_waits,
        inflight_peak: peak,
        send_lag_ms: Percentiles::of(&t.send_lag),
        latency_ms: Percentiles::of(&t.latency),
        server_cpu_cores,
    })
}

/// Runs every step of `config` in turn, writing the table to `table` as it goes.
pub async fn sweep(config: &SweepConfig, table: &mut dyn Write) -> Result<Report> {
    if config.rates_events_per_sec.is_empty() {
        bail!("no rate to offer");
    }
    if config.batch == 0 || config.max_inflight == 0 {
        bail!("--batch and --max-inflight must be at least 1");
    }
    if let Some(r) = config
        .rates_events_per_sec
        .iter()
        .find(|r| !(r.is_finite() && **r > 0.0))
    {
        bail!("rates must be positive events per second, not {r}");
    }
    if config.step.is_zero() {
        bail!("steps must last longer than 0 s");
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Ids differ between runs (seconds of the clock) and between steps (the counter goes
    // on), so the edge's dedupe never short-cuts the work.
    let seed = (started.as_secs() % 1_000) * 1_000_000_000;
    let mut bodies = Bodies::new(config, seed);
    let client = client(config.max_inflight);
    writeln!(table, "{}", table_header())?;
    table.flush()?;
    let mut steps = Vec::new();
    for &rate in &config.rates_events_per_sec {
        let step = run_step(&client, config, rate, &mut bodies).await?;
        writeln!(table, "{}", table_row(&step))?;
        table.flush()?;
        steps.push(step);
    }
    Ok(Report {
        config: config.clone(),
        started_at_unix_ms: started.as_millis(),
        steps,
    })
}

/// Writes `report.json` and `latency.svg` into `dir` (created if missing); returns their
/// paths.
pub fn write_report(report: &Report, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json_path = dir.join("report.json");
    let svg_path = dir.join("latency.svg");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report.json())?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(&svg_path, latency_svg(&report.steps)?)
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    Ok((json_path, svg_path))
}

/// Picks one percentile.
type Pick = fn(&Percentiles) -> f64;

/// The series of the plot: name and the percentile it draws.
const SERIES: [(&str, Pick); 3] = [
    ("p50", |p| p.p50),
    ("p99", |p| p.p99),
    ("p99.9", |p| p.p999),
];

/// p50, p99 and p99.9 latency (ms, log scale) against achieved throughput (events/s), one
/// point per step, joined in the order the steps ran.
pub fn latency_svg(steps: &[StepReport]) -> Result<String> {
    use plotters::prelude::*;

    let values: Vec<f64> = steps
        .iter()
        .flat_map(|s| SERIES.iter().map(|(_, f)| f(&s.latency_ms)))
        .filter(|v| *v > 0.0)
        .collect();
    let y_min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let y_max = values.iter().copied().fold(0.0, f64::max);
    // Whole decades, so that the log axis is labelled at powers of ten.
    let (y_min, y_max) = if values.is_empty() {
        (0.1, 1000.0)
    } else {
        let decade_below = |v: f64| 10f64.powf(v.log10().floor());
        let low = decade_below(y_min).max(0.001);
        (low, (decade_below(y_max) * 10.0).max(low * 10.0))
    };
    let x_max = steps
        .iter()
        .map(|s| s.achieved_events_per_sec)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "floodgate-loadgen: latency against throughput (open loop)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("achieved throughput (events/s)")
            .y_desc("latency from intended send (ms, log)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(plot_error)?;
        for ((name, value), colour) in SERIES.iter().zip(colours) {
            chart
                .draw_series(
                    LineSeries::new(
                        steps
                            .iter()
                            .map(|s| (s.achieved_events_per_sec, value(&s.latency_ms).max(y_min))),
                        colour.stroke_width(2),
                    )
                    .point_size(3),
                )
                .map_err(plot_error)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(offered: f64, achieved: f64, p50: f64, p99: f64, p999: f64) -> StepReport {
        let p = |v: f64| Percentiles {
            p50: v,
            p90: v,
            p99: v,
            p999: v,
            max: v,
            mean: v,
        };
        StepReport {
            offered_events_per_sec: offered,
            batch: 100,
            seconds: 10.0,
            requests_due: 100,
            requests_ok: 99,
            achieved_events_per_sec: achieved,
            achieved_requests_per_sec: achieved / 100.0,
            errors: BTreeMap::from([("503".to_owned(), 1)]),
            late_sends: 0,
            inflight_limit_waits: 0,
            inflight_peak: 3,
            send_lag_ms: p(0.1),
            latency_ms: Percentiles {
                p50,
                p90: p99,
                p99,
                p999,
                max: p999,
                mean: p50,
            },
            server_cpu_cores: Some(0.5),
        }
    }

    #[test]
    fn answers_are_classified_by_status() {
        assert_eq!(
            classify(200, b"", 10),
            Outcome::Ok {
                accepted_events: 10
            }
        );
        assert_eq!(
            classify(
                207,
                br#"{"accepted":7,"rejected":3,"retry":0,"results":[]}"#,
                10
            ),
            Outcome::Ok { accepted_events: 7 }
        );
        assert_eq!(classify(503, b"", 10), Outcome::Error("503".to_owned()));
        assert_eq!(classify(422, b"", 10), Outcome::Error("422".to_owned()));
    }

    /// The correction itself: a request due at t, sent a second late and answered at once,
    /// waited a second.
    #[test]
    fn latency_runs_from_the_intended_time() {
        let t0 = Instant::now();
        let window = (t0, t0 + Duration::from_secs(10));
        let mut tally = Tally::new(window, Duration::from_millis(10));
        let due = t0 + Duration::from_millis(100);
        let sent = due + Duration::from_secs(1);
        let done = sent + Duration::from_millis(2);
        tally.record(due, sent, done, &Outcome::Ok { accepted_events: 5 });
        tally.record(
            due,
            due,
            due + Duration::from_millis(1),
            &Outcome::Error("503".to_owned()),
        );
        // Due before the window: not counted, but its answer in the window is throughput.
        tally.record(
            t0 - Duration::from_millis(1),
            t0,
            t0 + Duration::from_millis(1),
            &Outcome::Ok { accepted_events: 5 },
        );
        assert_eq!((tally.due, tally.ok, tally.late), (2, 1, 1));
        assert_eq!(tally.errors, BTreeMap::from([("503".to_owned(), 1)]));
        assert_eq!((tally.answered_ok, tally.answered_events), (2, 10));
        let latency = Percentiles::of(&tally.latency);
        assert!((1000.0..1005.0).contains(&latency.max), "{latency:?}");
    }

    #[test]
    fn table_report_and_plot() {
        let steps = vec![
            step(1000.0, 1000.0, 1.0, 5.0, 9.0),
            step(5000.0, 4900.0, 2.0, 50.0, 120.0),
        ];
        let header = table_header();
        let row = table_row(&steps[1]);
        assert_eq!(header.lines().count(), 2);
        assert!(row.contains("4900") && row.contains("1 (1)") && row.contains("0.50"));
        let j = steps[1].json();
        assert_eq!(j["shed_503"], 1);
        assert_eq!(j["offered_requests_per_sec"], 50.0);
        assert_eq!(j["latency_ms"]["p999"], 120.0);
        let svg = latency_svg(&steps).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
            .collect();
        for name in [
            "p50",
            "p99",
            "p99.9",
            "achieved throughput (events/s)",
            // The log axis is labelled at powers of ten.
            "10",
            "100",
        ] {
            assert!(texts.contains(&name), "{name} missing from {texts:?}");
        }
        // Nothing to draw is still a picture.
        assert!(latency_svg(&[]).unwrap().starts_with("<svg"));
    }
}
