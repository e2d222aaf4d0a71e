//! The Prometheus recorder behind `GET /metrics`.
//!
//! Metric names follow `floodgate_<subsystem>_<name>_<unit>[_total]`; labels come from
//! small fixed sets only (route, status, registered event type, outcome). Every metric is
//! catalogued in `docs/metrics.md`, whose table is compiled in: each row's meaning is the
//! metric's `# HELP` text ([`CATALOGUE`]), so the document and `/metrics` cannot disagree.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// The metric catalogue, `docs/metrics.md`.
pub const CATALOGUE: &str = include_str!("../../docs/metrics.md");

/// One row of the catalogue's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueEntry<'a> {
    pub name: &'a str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'a str,
    pub labels: Vec<&'a str>,
    /// `always`, or when the metric appears.
    pub seen: &'a str,
    pub help: &'a str,
}

/// The rows of the catalogue's table: lines of the form
/// `` | `name` | kind | labels | seen | meaning | ``.
pub fn catalogue() -> Vec<CatalogueEntry<'static>> {
    CATALOGUE
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .strip_prefix("| `")?
                .strip_suffix(" |")?
                .split(" | ")
                .map(str::trim)
                .collect();
            let [name, kind, labels, seen, help] = cells[..] else {
                return None;
            };
            Some(CatalogueEntry {
                name: name.strip_suffix('`')?,
                kind,
                labels: labels
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect(),
                seen,
                help,
            })
        })
        .collect()
}

/// Gives the recorder every catalogued metric's help text.
fn describe_catalogue() {
    for entry in catalogue() {
        // The process metrics' collector describes its own.
        if !entry.name.starts_with("floodgate_") {
            continue;
        }
        match entry.kind {
            "counter" => metrics::describe_counter!(entry.name, entry.help),
            "gauge" => metrics::describe_gauge!(entry.name, entry.help),
            _ => metrics::describe_histogram!(entry.name, entry.help),
        }
    }
}

/// The text of `GET /metrics`: the process metrics (CPU, memory, file descriptors) are
/// read at each scrape, then everything is rendered.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.render()
}

/// Samples the size and free space of the filesystem holding `dir` (the data directory)
/// every few seconds, for the disk-full alert. Call once from inside the runtime.
pub fn spawn_disk_gauges(dir: PathBuf) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let path = dir.clone();
            let stat = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&path)).await;
            match stat {
                Ok(Ok(st)) => {
                    let block = st.f_frsize as f64;
                    metrics::gauge!("floodgate_stream_disk_available_bytes")
                        .set(st.f_bavail as f64 * block);
                    metrics::gauge!("floodgate_stream_disk_total_bytes")
                        .set(st.f_blocks as f64 * block);
                }
                Ok(Err(e)) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "statvfs failed");
                }
                Err(_) => return,
            }
        }
    });
}

/// Latency buckets, in seconds: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];
/// Count buckets (events per request, records per fsync group).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Byte buckets: 1 KiB to 16 MiB.
const BYTES_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Installs the process-wide recorder once and returns its handle. Later calls return the
/// same handle; if another recorder was installed first, a private one is used so that
/// `/metrics` still answers.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_events".into()), COUNT_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_records".into()), COUNT_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows a private one"
                );
            }
            describe_catalogue();
            let process = PROCESS.get_or_init(metrics_process::Collector::default);
            process.describe();
            handle
        })
        .clone()
}

/// Runs the recorder's periodic upkeep (draining histogram buffers) until the runtime
/// stops. Call once from inside the runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}
