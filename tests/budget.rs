//! The memory budget is printed at start, beside the effective configuration: `serve` and
//! `ingest` name their total and every line, computed from the configuration they run.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use floodgate_core::budget::{MemoryBudget, Role};
use floodgate_core::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_floodgate");

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `floodgate <command>` with `config` and returns the budget it prints on stderr
/// (its first line and the lines under it), waiting for it up to a deadline.
fn printed_budget(command: &str, config: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg(command).args(["--listen", "127.0.0.1:0"]);
    let mut child = Running(
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&path)
            // Info: the first log line after the budget ends it.
            .env("FLOODGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("floodgate starts"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut budget: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => panic!("no memory budget printed; got {budget:?}"),
        };
        if line.starts_with("memory budget") {
            budget.push(line);
        } else if !budget.is_empty() {
            // The lines under it are indented; the first that is not ends it.
            if !line.starts_with("  ") {
                return budget;
            }
            budget.push(line);
        }
    }
}

/// The total as the first line gives it: `memory budget (<role>): <human> (<n> bytes)`.
fn total_of(first: &str) -> u64 {
    first
        .rsplit_once('(')
        .and_then(|(_, n)| n.strip_suffix(" bytes)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in {first:?}"))
}

#[test]
fn serve_and_ingest_print_their_budget_at_start() {
    let config = "[ingest]\ndedupe_max_ids = 300000\n[lake]\nmax_buffer_bytes = 12582912\n[state]\ncache_bytes = 4194304\nmmap_bytes = 0\n";
    let expected = Config::from_toml(config).unwrap();

    let serve = printed_budget("serve", config);
    let want = MemoryBudget::for_role(&expected, Role::Serve);
    assert!(serve[0].starts_with("memory budget (serve): "), "{serve:?}");
    assert_eq!(total_of(&serve[0]), want.total(), "{serve:?}");
    assert_eq!(serve.len(), 1 + want.lines.len(), "{serve:?}");
    for line in &want.lines {
        assert!(
            serve.iter().any(|l| l.trim_start().starts_with(line.name)),
            "no {:?} line in {serve:?}",
            line.name
        );
    }
    // 12 MiB over 4 stream shards and 2 more buffers: 2 MiB each.
    let lake = serve.iter().find(|l| l.contains("lake buffers")).unwrap();
    assert!(lake.contains("6 × 2.0 MiB"), "{lake}");

    let ingest = printed_budget("ingest", config);
    assert!(
        ingest[0].starts_with("memory budget (ingest): "),
        "{ingest:?}"
    );
    assert_eq!(
        total_of(&ingest[0]),
        MemoryBudget::for_role(&expected, Role::Ingest).total()
    );
    assert!(ingest.iter().all(|l| !l.contains("lake")), "{ingest:?}");
}
