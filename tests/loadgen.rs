//! `floodgate-loadgen`'s open-loop sweep against a real `floodgate serve`: two short steps
//! at low rates, then the table, `report.json` (every step, the run's parameters, the
//! machine's cores, the server's CPU from its `/metrics`) and the SVG plot (well-formed,
//! with a p50, p99 and p99.9 series of a point per step). Nothing here asserts a
//! throughput or a latency figure: only the shape of what a sweep writes.
//! The correction for coordinated omission is tested in `bench/tests/`.

mod common;

use std::time::Duration;

use common::Server;
use floodgate_bench::open_loop::{ServerCpu, SweepConfig, sweep, write_report};
use serde_json::Value;

/// Element names, `<text>` contents and the number of `<circle>`s of a well-formed SVG
/// document; panics on anything that is not.
fn read_svg(svg: &str) -> (String, Vec<String>, usize) {
    let mut stack: Vec<String> = Vec::new();
    let mut root = None;
    let (mut texts, mut circles) = (Vec::new(), 0);
    for token in xmlparser::Tokenizer::from(svg) {
        match token.unwrap_or_else(|e| panic!("the SVG is not well-formed XML: {e}")) {
            xmlparser::Token::ElementStart { local, .. } => {
                root.get_or_insert_with(|| local.as_str().to_owned());
                if local.as_str() == "circle" {
                    circles += 1;
                }
                stack.push(local.as_str().to_owned());
            }
            xmlparser::Token::ElementEnd { end, .. } => match end {
                xmlparser::ElementEnd::Open => {}
                xmlparser::ElementEnd::Empty => {
                    stack.pop();
                }
                xmlparser::ElementEnd::Close(_, local) => {
                    assert_eq!(
                        stack.pop().as_deref(),
                        Some(local.as_str()),
                        "mismatched </{}>",
                        local.as_str()
                    );
                }
            },
            xmlparser::Token::Text { text } if stack.last().is_some_and(|e| e == "text") => {
                texts.push(text.as_str().trim().to_owned());
            }
            _ => {}
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    (root.expect("an element"), texts, circles)
}

#[test]
fn a_sweep_against_serve_writes_its_table_report_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let config = SweepConfig {
        url: format!("http://{}/v1/events", server.addr),
        rates_events_per_sec: vec![100.0, 200.0],
        batch: 10,
        step: Duration::from_secs(2),
        warmup: Duration::ZERO,
        max_inflight: 256,
        timeout: Duration::from_secs(10),
        late_after: Duration::from_millis(10),
        api_key: None,
        gzip: false,
        pool: 0,
        server_cpu: ServerCpu::Metrics {
            base: format!("http://{}", server.addr),
        },
        threads: 1,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut table = Vec::new();
    let report = rt.block_on(sweep(&config, &mut table)).unwrap();
    let out = dir.path().join("report");
    let (json_path, svg_path) = write_report(&report, &out).unwrap();
    assert_eq!(json_path, out.join("report.json"));
    assert_eq!(svg_path, out.join("latency.svg"));

    // The table: a two-line header, then a row per step starting with its offered rate.
    let table = String::from_utf8(table).unwrap();
    eprintln!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for column in [
        "offered", "achieved", "p50", "p99", "p99.9", "max", "errors", "late",
    ] {
        assert!(lines[0].contains(column), "{column} missing: {table}");
    }
    assert!(lines[1].contains("CPU cores") && lines[1].contains("(503 shed)"));
    assert_eq!(lines[2].split_whitespace().next(), Some("100"));
    assert_eq!(lines[3].split_whitespace().next(), Some("200"));

    // report.json: the parameters, the machine, a step per rate.
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(report["mode"], "open-loop");
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    let params = &report["parameters"];
    assert_eq!(params["batch"], 10);
    assert_eq!(params["step_seconds"], 2.0);
    assert_eq!(
        params["rates_events_per_sec"],
        serde_json::json!([100.0, 200.0])
    );
    assert_eq!(params["url"], config.url.as_str());
    assert_eq!(params["api_key"], false);
    assert!(
        params["server_cpu"]
            .as_str()
            .unwrap()
            .ends_with("/metrics process_cpu_seconds_total")
    );
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for (step, offered) in steps.iter().zip([100.0, 200.0]) {
        assert_eq!(step["offered_events_per_sec"], offered, "{step}");
        // 2 s at offered / 10 requests a second: the schedule is exact.
        let due = (offered / 10.0 * 2.0) as u64;
        assert_eq!(step["requests_due"], due, "{step}");
        assert_eq!(step["requests_ok"], due, "every request accepted: {step}");
        assert_eq!(step["errors_total"], 0, "{step}");
        assert_eq!(step["errors"], serde_json::json!({}), "{step}");
        assert_eq!(step["shed_503"], 0, "{step}");
        assert!(
            step["achieved_events_per_sec"].as_f64().unwrap() > 0.0,
            "{step}"
        );
        assert!(step["late_sends"].is_u64() && step["inflight_peak"].as_u64().unwrap() >= 1);
        let l = &step["latency_ms"];
        let v = |k: &str| {
            l[k].as_f64()
                .unwrap_or_else(|| panic!("latency_ms.{k}: {step}"))
        };
        assert!(v("p50") > 0.0, "{step}");
        assert!(v("p50") <= v("p90") && v("p90") <= v("p99"), "{step}");
        assert!(v("p99") <= v("p999") && v("p999") <= v("max"), "{step}");
        // Read from the server's /metrics (whole seconds there, so possibly 0 on a short step).
        assert!(step["server_cpu_cores"].as_f64().unwrap() >= 0.0, "{step}");
        assert!(step["send_lag_ms"]["max"].is_number(), "{step}");
    }

    // The plot: well-formed SVG, a point per step on each of the three series, labelled.
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let (root, texts, circles) = read_svg(&svg);
    assert_eq!(root, "svg");
    assert_eq!(circles, 3 * steps.len(), "a point per step and series");
    for label in [
        "p50",
        "p99",
        "p99.9",
        "achieved throughput (events/s)",
        "latency from intended send (ms, log)",
    ] {
        assert!(
            texts.iter().any(|t| t == label),
            "{label} missing from {texts:?}"
        );
    }
    drop(server);
}
