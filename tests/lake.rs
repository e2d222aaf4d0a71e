//! The Parquet lake, read the way analysts read it: events of every type posted to the
//! real binary, a clean shutdown (which flushes), then DuckDB, pyarrow and sqlglot (from
//! the test venv that `scripts/test` makes) check rows, types, partitions and the DDL.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{BIN, Server, one_of_each};
use serde_json::{Value, json};

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "the test venv is missing: run scripts/venv (scripts/test does) to install duckdb, pyarrow and sqlglot"
    );
    p
}

fn table(event_type: &str) -> String {
    event_type.replace('.', "_")
}

fn run_check(lake: &Path, expected: &BTreeMap<String, Vec<String>>, ddl: &Path) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(expected).unwrap()).unwrap();
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .arg(lake)
        .arg(&expected_path)
        .arg(ddl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_accepted_event_is_in_its_typed_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // 40 rounds of one event of every type, across several hours and keys.
    for round in 0..40 {
        let mut batch = one_of_each(&format!("lk{round}"), &format!("E{}", round % 7));
        for (i, e) in batch.iter_mut().enumerate() {
            e["time"] = json!(format!(
                "2026-11-{:02}T{:02}:{:02}:00Z",
                20 + round % 3,
                (round + i) % 24,
                i
            ));
        }
        // Events without `time` fall in the hour they were received.
        if round % 10 == 0 {
            batch[0].as_object_mut().unwrap().remove("time");
        }
        // And one invalid event, which must not reach the lake.
        let mut bad = batch[2].clone();
        bad["id"] = json!(format!("bad{round}"));
        bad["data"]["seats"] = json!(0);
        batch.push(bad);
        let r = server.post_batch(&batch);
        assert_eq!(r.status, 207, "{r:?}");
        expected
            .entry("quarantine".to_owned())
            .or_default()
            .push(format!("bad{round}"));
        for e in &batch[..batch.len() - 1] {
            expected
                .entry(table(e["type"].as_str().unwrap()))
                .or_default()
                .push(e["id"].as_str().unwrap().to_owned());
        }
    }
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    // Derived events, as the outbox published them, each in its type's table.
    let mut derived = 0;
    for e in common::outbox_read(&data) {
        let t = table(e["type"].as_str().unwrap());
        let t = if t == "booking_cancelled" {
            "derived_booking_cancelled".to_owned()
        } else {
            t
        };
        expected
            .entry(t)
            .or_default()
            .push(e["id"].as_str().unwrap().to_owned());
        derived += 1;
    }
    assert!(derived > 0, "no derived events");

    let ddl = dir.path().join("lake.sql");
    let out = Command::new(BIN)
        .args(["lake", "ddl", "--location", "s3://bucket/prefix"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&ddl, &out.stdout).unwrap();
    let figures = run_check(&data.join("lake"), &expected, &ddl);
    eprintln!("{figures}");
    assert_eq!(figures["rows"]["booking_requested"], 40);
    assert_eq!(figures["rows"]["quarantine"], 40);

    // No temporary or partial file is left under a final name.
    let mut stack = vec![data.join("lake")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                assert!(name.ends_with(".parquet"), "unexpected file {name}");
            }
        }
    }
}

#[test]
fn the_shipped_athena_ddl_is_current() {
    let out = Command::new(BIN)
        .args(["lake", "ddl", "--location", "s3://YOUR-BUCKET/floodgate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/athena/lake.sql"),
    )
    .unwrap();
    assert!(
        String::from_utf8(out.stdout).unwrap() == shipped,
        "deploy/athena/lake.sql is stale: regenerate it with \
         `floodgate lake ddl --location s3://YOUR-BUCKET/floodgate > deploy/athena/lake.sql`"
    );
}

fn dump(lake: &Path) -> Value {
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .arg("dump")
        .arg(lake)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SIGKILL while files are being written, several times: afterwards every record of the
/// stream is in the lake exactly once, and no partial file is visible. Then `lake
/// rebuild` re-derives the same files with the same rows.
#[test]
fn crashes_leave_a_complete_lake_and_rebuild_reproduces_it() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    // Small runs, so files are being written whenever the kill comes.
    std::fs::write(&config, "[lake]\nroll_age_ms = 50\nroll_bytes = 32768\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..3 {
        let mut server = Server::start(&data, &args);
        let posters = common::Posters::start(server.addr, 3, acked.clone(), move |c, n| {
            (0..20)
                .map(|i| {
                    let id = format!("r{round}-c{c}-n{n}-{i}");
                    let mut e =
                        common::booking(&id, &id.replace('-', "_"), &format!("E{}", i % 5), 1);
                    e["time"] = json!(format!("2026-11-22T{:02}:00:00Z", (n + i) % 24));
                    e
                })
                .collect()
        });
        let target = posters.acked() + 2_000;
        common::wait_for(60, "events are acked", || {
            (posters.acked() >= target).then_some(())
        });
        server.kill9();
        posters.stop();
    }
    // Nothing hidden is left under a final name: every *.parquet reads (the check below
    // reads them all).
    let log = dir.path().join("final.log");
    let mut server = Server::start_logged(&data, &args, Some(&log));
    let code = server.terminate();
    assert_eq!(
        code,
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let records: Vec<String> = common::stream_read(&data, &[])
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.iter().all(|id| records.contains(id)),
        "an acked event is not in the stream"
    );
    let expected = BTreeMap::from([("booking_requested".to_owned(), records.clone())]);
    let ddl = dir.path().join("lake.sql");
    std::fs::write(
        &ddl,
        Command::new(BIN)
            .args(["lake", "ddl", "--location", "s3://b/p"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    run_check(&data.join("lake"), &expected, &ddl);

    let before = dump(&data.join("lake"));
    let out = Command::new(BIN)
        .args(["lake", "rebuild", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = dump(&data.join("lake"));
    assert_eq!(before["files"], after["files"], "rebuild wrote other files");
    assert_eq!(before["rows"], after["rows"]);
    assert_eq!(
        before["digest"], after["digest"],
        "rebuild wrote other rows"
    );
    eprintln!(
        "{} records; {} files; rebuild identical",
        records.len(),
        after["files"].as_array().unwrap().len()
    );
}

/// 200+ small files of one partition become one, with the same multiset of rows; a replay
/// from the start of the stream and a rebuild then leave the rows exactly as they were.
#[test]
fn compaction_keeps_every_row_once_through_replay_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    // A run per ~20 ms: many small files.
    std::fs::write(&config, "[lake]\nroll_age_ms = 10\nroll_bytes = 2048\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    let lake = data.join("lake");
    let partition = lake.join("booking_requested/dt=2026-11-22/hour=10");
    let count_files = || {
        std::fs::read_dir(&partition)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".parquet")
                })
                .count()
            })
            .unwrap_or(0)
    };
    let mut n = 0;
    while count_files() < 200 {
        let batch: Vec<Value> = (0..3)
            .map(|i| {
                let id = format!("cp{n}-{i}");
                let mut e = common::booking(&id, &id.replace('-', "_"), &format!("E{}", n % 4), 1);
                e["time"] = json!("2026-11-22T10:30:00Z");
                e
            })
            .collect();
        assert_eq!(server.post_batch(&batch).status, 200);
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(n < 20_000, "files are not being written");
    }
    assert_eq!(server.terminate(), Some(0));
    let small = count_files();
    let before = dump(&lake);

    let out = Command::new(BIN)
        .args([
            "lake",
            "compact",
            "--table",
            "booking_requested",
            "--dt",
            "2026-11-22",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = dump(&lake);
    assert_eq!(count_files(), 1, "{small} files became one");
    assert_eq!(before["rows"], after["rows"]);
    assert_eq!(
        before["digest"], after["digest"],
        "compaction changed the rows"
    );

    // Replay the whole stream into the lake: the lake consumer forgets its checkpoint.
    std::fs::remove_file(data.join("stream/checkpoints/lake.json")).unwrap();
    let mut server = Server::start(&data, &args);
    common::wait_for(30, "the lake consumer replays", || {
        std::fs::metadata(data.join("stream/checkpoints/lake.json")).ok()
    });
    assert_eq!(server.terminate(), Some(0));
    let replayed = dump(&lake);
    assert_eq!(
        replayed["rows"], after["rows"],
        "a replay changed the row counts"
    );
    assert_eq!(replayed["tables"], after["tables"], "a replay changed rows");
    assert_eq!(
        replayed["digest"], after["digest"],
        "a replay duplicated rows"
    );
    assert_eq!(count_files(), 1);

    // A rebuild re-derives the runs and re-applies the compaction.
    let out = Command::new(BIN)
        .args(["lake", "rebuild", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt = dump(&lake);
    assert_eq!(rebuilt["files"], replayed["files"]);
    assert_eq!(
        rebuilt["digest"], after["digest"],
        "rebuild changed the rows"
    );
    eprintln!("{small} small files compacted to 1; {} rows", after["rows"]);
}

/// A v2 that adds an optional field writes to the same table with the new column; older
/// files lack it, and DuckDB reads both (nulls for the old rows).
#[test]
fn a_new_optional_field_becomes_a_column_old_files_lack() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let schemas = dir.path().join("schemas");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    for ty in std::fs::read_dir(&shipped).unwrap() {
        let ty = ty.unwrap();
        if ty.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(schemas.join(ty.file_name())).unwrap();
            for f in std::fs::read_dir(ty.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), schemas.join(ty.file_name()).join(f.file_name())).unwrap();
            }
        }
    }
    let post = |server: &Server, from: usize, note: bool| {
        let batch: Vec<Value> = (from..from + 10)
            .map(|i| {
                let mut e = common::booking(&format!("ev{i}"), &format!("B{i}"), "E1", 1);
                if note {
                    e["data"]["note"] = json!(format!("note {i}"));
                }
                e
            })
            .collect();
        let r = server.post_batch(&batch);
        assert_eq!(r.status, 200, "{r:?}");
    };
    let args = ["--schemas", schemas.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    post(&server, 0, false);
    assert_eq!(server.terminate(), Some(0));

    let v1: Value =
        serde_json::from_slice(&std::fs::read(schemas.join("booking.requested/v1.json")).unwrap())
            .unwrap();
    let mut v2 = v1.clone();
    v2["$id"] = json!("https://schemas.floodgate.dev/booking.requested/v2.json");
    v2["title"] = json!("booking.requested v2");
    v2["properties"]["note"] = json!({"type": "string", "maxLength": 200});
    std::fs::write(
        schemas.join("booking.requested/v2.json"),
        serde_json::to_vec_pretty(&v2).unwrap(),
    )
    .unwrap();
    let mut server = Server::start(&data, &args);
    post(&server, 10, true);
    assert_eq!(server.terminate(), Some(0));

    let script = r#"
import duckdb, sys
lake = sys.argv[1]
con = duckdb.connect()
q = f"from read_parquet('{lake}/booking_requested/**/*.parquet', hive_partitioning = true, union_by_name = true)"
total, with_note = con.execute(f"select count(*), count(note) {q}").fetchone()
assert (total, with_note) == (20, 10), (total, with_note)
typ = dict(con.execute(f"select column_name, column_type from (describe select * {q})").fetchall())["note"]
assert typ == "VARCHAR", typ
old = con.execute(f"select count(*) {q} where note is null and cast(substr(event_id, 3) as integer) < 10").fetchone()[0]
assert old == 10, old
print("ok")
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(data.join("lake"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The DDL names the new column too.
    let ddl = Command::new(BIN)
        .args(["lake", "ddl", "--location", "s3://b/p", "--schemas"])
        .arg(&schemas)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ddl.stdout).contains("`note` string"));
}
