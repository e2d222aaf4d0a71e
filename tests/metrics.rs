//! The metric catalogue (`docs/metrics.md`) against the code and against `/metrics`, both
//! ways; the workers' operations endpoint (`floodgate process --listen`); and
//! `floodgate healthcheck`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};

use common::{Server, booking, envelope, floodgate, metric, request, wait_for};
use floodgate_ingest::telemetry::{CatalogueEntry, catalogue};
use serde_json::json;

/// Every `counter!`/`gauge!`/`histogram!` with a literal `floodgate_…` name in the
/// product's sources (not its tests), as `(name, kind)`.
fn recorded_in_sources() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = BTreeSet::new();
    let mut dirs: Vec<_> = [
        "core/src",
        "ingest/src",
        "processors/src",
        "sinks/src",
        "aws/src",
        "src",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for kind in ["counter", "gauge", "histogram"] {
                let opening = format!("{kind}!(");
                for (at, _) in text.match_indices(&opening) {
                    let rest = text[at + opening.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix("\"floodgate_") else {
                        continue;
                    };
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    found.insert((format!("floodgate_{name}"), kind.to_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn the_catalogue_lists_every_metric_the_code_records_and_no_other() {
    let rows = catalogue();
    assert!(rows.len() > 50, "the catalogue's table was not parsed");
    let mut names = BTreeSet::new();
    for row in &rows {
        assert!(names.insert(row.name), "{} is listed twice", row.name);
        assert!(
            ["counter", "gauge", "histogram"].contains(&row.kind),
            "{}: type {:?}",
            row.name,
            row.kind
        );
        assert!(!row.help.is_empty() && !row.seen.is_empty(), "{row:?}");
        assert_eq!(
            row.kind == "counter",
            row.name.ends_with("_total"),
            "{}: counters, and only counters, end in _total",
            row.name
        );
    }
    let listed: BTreeSet<(String, String)> = rows
        .iter()
        .filter(|r| r.name.starts_with("floodgate_"))
        .map(|r| (r.name.to_owned(), r.kind.to_owned()))
        .collect();
    let recorded = recorded_in_sources();
    let missing: Vec<_> = recorded.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "recorded by the code but not in docs/metrics.md (or with another type): {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "in docs/metrics.md but recorded nowhere in the code (or with another type): {stale:?}"
    );
}

/// One family of a `/metrics` page.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: Option<String>,
    labels: BTreeSet<String>,
}

/// The families of a Prometheus text page, by name.
fn families(page: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().help = Some(help.to_owned());
        } else if !line.is_empty() && !line.starts_with('#') {
            let series = line.split(' ').next().unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (families.get(base).is_some_and(|f| f.kind == "histogram")).then_some(base)
                })
                .unwrap_or(name);
            let entry = families.entry(family.to_owned()).or_default();
            for pair in labels.trim_end_matches('}').split("\",") {
                if let Some((key, _)) = pair.split_once("=\"") {
                    entry.labels.insert(key.trim_start_matches(',').to_owned());
                }
            }
        }
    }
    families
}

fn check_page_against_catalogue(page: &str, rows: &[CatalogueEntry<'_>], required: &[&str]) {
    let by_name: BTreeMap<&str, &CatalogueEntry<'_>> = rows.iter().map(|r| (r.name, r)).collect();
    let families = families(page);
    for (name, family) in &families {
        let Some(row) = by_name.get(name.as_str()) else {
            panic!("/metrics has {name}, which docs/metrics.md does not list");
        };
        assert_eq!(family.kind, row.kind, "{name}: type on /metrics");
        let help = family
            .help
            .as_deref()
            .unwrap_or_else(|| panic!("{name} has no # HELP"));
        if name.starts_with("floodgate_") {
            assert_eq!(help, row.help, "{name}: # HELP is the catalogue's meaning");
        } else {
            assert!(!help.is_empty(), "{name}: empty # HELP");
        }
        let allowed: BTreeSet<&str> = row.labels.iter().copied().chain(["le"]).collect();
        for label in &family.labels {
            assert!(
                allowed.contains(label.as_str()),
                "{name} has label {label}, which docs/metrics.md does not list"
            );
        }
    }
    for name in required {
        assert!(
            families.contains_key(*name),
            "{name} is catalogued as seen always but is not on /metrics"
        );
    }
}

#[test]
fn after_a_short_run_metrics_shows_every_always_family_with_its_catalogued_help() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    // Files are rolled quickly, so that the lake's families appear.
    std::fs::write(&config, "[lake]\nroll_age_ms = 200\n").unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut batch = vec![envelope(
        "m-c",
        "inventory.event.created",
        json!({"eventId":"M","name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":3}),
    )];
    for i in 0..5 {
        batch.push(booking(&format!("m-b{i}"), &format!("m-bk{i}"), "M", 1));
    }
    // One event that fails its schema: rejected, and quarantined.
    batch.push(envelope(
        "m-bad",
        "booking.requested",
        json!({"seats": "two"}),
    ));
    let r = server.post_batch(&batch);
    assert_eq!(r.status, 207, "{}", String::from_utf8_lossy(&r.body));
    wait_for(60, "the bookings and the lake to finish", || {
        let sold_out = metric(&server, "floodgate_bookings_sold_out_total", &[]);
        let rejected = metric(
            &server,
            "floodgate_bookings_decisions_total",
            &["insufficient_capacity"],
        );
        let files = metric(&server, "floodgate_lake_files_total", &[]);
        let disk = metric(&server, "floodgate_stream_disk_total_bytes", &[]);
        (sold_out == 1.0 && rejected == 2.0 && files > 0.0 && disk > 0.0).then_some(())
    });
    assert_eq!(
        metric(
            &server,
            "floodgate_bookings_decisions_total",
            &["decision=\"confirmed\""]
        ),
        3.0
    );
    let page = String::from_utf8(server.get("/metrics").body).unwrap();
    let rows = catalogue();
    let always: Vec<&str> = rows
        .iter()
        .filter(|r| r.seen == "always")
        .map(|r| r.name)
        .collect();
    check_page_against_catalogue(&page, &rows, &always);
}

/// A child process, killed when the test ends however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `floodgate process` on `data_dir`, and the address of its operations endpoint.
fn start_process(data_dir: &Path) -> (Running, SocketAddr) {
    let mut child = floodgate()
        .args(["process", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    (Running(child), addr)
}

#[test]
fn a_worker_serves_metrics_health_and_readiness_on_its_own_address() {
    let help = floodgate().args(["process", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--listen"), "{help}");
    assert!(
        help.contains("127.0.0.1:9091"),
        "the default address: {help}"
    );

    let dir = tempfile::tempdir().unwrap();
    let edge = Server::start_as("ingest", dir.path(), &[], None, &[]);
    let (mut worker, ops) = start_process(dir.path());
    let r = edge.post_batch(&[envelope(
        "w-c",
        "inventory.event.created",
        json!({"eventId":"W","name":"Show","venue":"Hall","startsAt":"2026-12-01T20:00:00Z","capacity":3}),
    )]);
    assert_eq!(r.status, 200);

    assert_eq!(request(ops, "GET", "/healthz", &[], None).status, 200);
    let ready = request(ops, "GET", "/readyz", &[], None);
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    assert_eq!(ready.json()["status"], "ready");
    let page = wait_for(30, "the worker to report its consumers", || {
        let r = request(ops, "GET", "/metrics", &[], None);
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{:?}",
            r.header("content-type")
        );
        let page = String::from_utf8(r.body).unwrap();
        (page.contains("floodgate_processor_records_total{consumer=\"bookings\"")
            && page.contains("floodgate_processor_lag_records"))
        .then_some(page)
    });
    let rows = catalogue();
    check_page_against_catalogue(
        &page,
        &rows,
        &[
            "floodgate_processor_lag_records",
            "floodgate_processor_records_total",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ],
    );
    // Only its three routes, read-only.
    assert_eq!(request(ops, "POST", "/metrics", &[], None).status, 405);
    assert_eq!(request(ops, "GET", "/v1/events", &[], None).status, 404);
    // The container health check uses the same routes.
    let check = |url: String| {
        floodgate()
            .args(["healthcheck", "--url", &url])
            .status()
            .unwrap()
            .success()
    };
    assert!(check(format!("http://{ops}/readyz")));
    assert!(check(format!("http://{}/healthz", edge.addr)));
    assert!(!check(format!("http://{ops}/nope")), "a 404 is not healthy");

    // SIGTERM: the worker stops cleanly, and its endpoint with it.
    let pid = worker.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = worker.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !check(format!("http://{ops}/healthz")),
        "nothing listens any more"
    );
}
