//! The Parquet lake, read the way analysts read it: events of every type posted to the
//! real binary, a clean shutdown (which flushes), then DuckDB, pyarrow and sqlglot (from
//! the test venv that `scripts/test` makes) check rows, types, partitions and the DDL.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, one_of_each};
use serde_json::{Value, json};

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "the test venv is missing: run scripts/venv (scripts/test does) to install duckdb, pyarrow and sqlglot"
    );
    p
}

/// The UTC date `days_ago` days before today, `YYYY-MM-DD`: event times inside the lake's
/// 7-day window (an event's own `time` picks its partition only within it).
fn day(days_ago: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Howard Hinnant's civil_from_days.
    let z = now.div_euclid(86_400) - days_ago + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
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
                "{}T{:02}:{:02}:00Z",
                day(1 + (round % 3) as i64),
                (round + i) % 24,
                i
            ));
        }
        // Events without `time` fall in the hour they were received.
        if round % 10 == 0 {
            batch[0].as_object_mut().unwrap().remove("time");
        }
        // So do events whose producer's clock is far off (item 12 of issue 9): their own
        // time would put them where Athena's projection never reads.
        let far = match round % 10 {
            1 => Some("1900-01-01T00:00:00Z"),
            2 => Some("0061-04-27T00:00:00Z"),
            3 => Some("2999-01-01T00:00:00Z"),
            _ => None,
        };
        if let Some(t) = far {
            batch[1]["time"] = json!(t);
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
    let out = common::floodgate()
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
    let out = common::floodgate()
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
                    e["time"] = json!(format!("{}T{:02}:00:00Z", day(1), (n + i) % 24));
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
        common::floodgate()
            .args(["lake", "ddl", "--location", "s3://b/p"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    run_check(&data.join("lake"), &expected, &ddl);

    let before = dump(&data.join("lake"));
    let out = common::floodgate()
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

/// 200+ small files of one partition become one per shard, with the same multiset of rows; a replay
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
    let yesterday = day(1);
    let partition = lake.join(format!("booking_requested/dt={yesterday}/hour=10"));
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
                e["time"] = json!(format!("{yesterday}T10:30:00Z"));
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
    // Compaction merges each shard's files on its own: one file per shard remains.
    let shards: std::collections::BTreeSet<String> = std::fs::read_dir(&partition)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .map(|n| n.split('-').next().unwrap().to_owned())
        .collect();
    assert!(shards.len() > 1, "several shards' files in one partition");
    let before = dump(&lake);
    // A live server's in-progress temporary file (its writer, this test process, is alive)
    // must survive a compaction; a dead writer's goes.
    let live_tmp = partition.join(format!(".x.parquet.{}-0.tmp", std::process::id()));
    let dead_pid = {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let dead_tmp = partition.join(format!(".y.parquet.{dead_pid}-0.tmp"));
    std::fs::write(&live_tmp, b"being written").unwrap();
    std::fs::write(&dead_tmp, b"abandoned").unwrap();

    let out = common::floodgate()
        .args([
            "lake",
            "compact",
            "--table",
            "booking_requested",
            "--dt",
            &yesterday,
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
    assert!(
        live_tmp.exists(),
        "compaction removed a live writer's temporary file"
    );
    assert!(
        !dead_tmp.exists(),
        "compaction kept an abandoned temporary file"
    );
    std::fs::remove_file(&live_tmp).unwrap();
    let after = dump(&lake);
    assert_eq!(
        count_files(),
        shards.len(),
        "{small} files became one per shard"
    );
    assert_eq!(before["rows"], after["rows"]);
    assert_eq!(
        before["digest"], after["digest"],
        "compaction changed the rows"
    );

    // Replay the whole stream into the lake: the lake consumer forgets its checkpoint.
    // Checked only once the replay has read every record from the start of the stream and
    // its checkpoint has reached the end of every shard: a replay cut short (or one that
    // never ran) rewrites nothing, and would leave the lake looking untouched.
    let stream = common::stream_read(&data, &[]);
    std::fs::remove_file(data.join("stream/checkpoints/lake.json")).unwrap();
    let mut server = Server::start(&data, &args);
    wait_for_lake_to_reach_the_end(&server, &stream);
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
    assert_eq!(count_files(), shards.len());

    // A rebuild re-derives the runs and re-applies the compaction.
    let out = common::floodgate()
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
    eprintln!(
        "{small} small files compacted to {}; {} rows",
        shards.len(),
        after["rows"]
    );
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
    let ddl = common::floodgate()
        .args(["lake", "ddl", "--location", "s3://b/p", "--schemas"])
        .arg(&schemas)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ddl.stdout).contains("`note` string"));
}

/// Item 2 and item 12 of issue 9, through the binary: values the edge's validator accepts
/// but the lake once could not store (a leap second, lowercase `t`/`z`, long fractions,
/// `2.0`-style integers, integers past i64) and producer clocks far off (1900, 0061, 2999).
/// The lake used to wedge on the first of them and retry forever; now each accepted event
/// is in exactly one table, typed or `quarantine` (with the JSON pointer and why), and
/// every partition lies within the range Athena's projection reads (2020-01-01..today).
#[test]
fn awkward_values_land_in_exactly_one_table_and_inside_the_projected_range() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    // Files every 100 ms: the lake's checkpoint shows it moving on while the server runs.
    std::fs::write(&config, "[lake]\nroll_age_ms = 100\n").unwrap();
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let yesterday = day(1);
    let booking = |id: &str, seats: &str, requested_at: &str, time: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/tests","type":"booking.requested","time":"{time}","data":{{"bookingId":"bk_{id}","eventId":"E9","customerId":"c1","seats":{seats},"requestedAt":"{requested_at}"}}}}"#
        )
    };
    let payment = |id: &str, amount: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/tests","type":"payment.succeeded","time":"{yesterday}T10:00:00Z","data":{{"paymentId":"p_{id}","bookingId":"bk","eventId":"E9","amountMinor":{amount},"currency":"EUR"}}}}"#
        )
    };
    let recent = format!("{yesterday}T10:00:00Z");
    let typed_bookings = [
        booking("aw-leap", "2", "2026-03-15T23:59:60Z", &recent),
        booking("aw-lower", "2", "2026-03-15t10:00:00z", &recent),
        booking(
            "aw-fraction",
            "2",
            "2026-03-15T10:00:00.123456789123456789Z",
            &recent,
        ),
        booking("aw-offset", "2", "0000-01-01T00:00:00+23:59", &recent),
        booking(
            "aw-unknown-offset",
            "2",
            "2026-03-15T10:00:00-00:00",
            &recent,
        ),
        booking("aw-seats-2-0", "2.0", "2026-03-15T10:00:00Z", &recent),
        booking("aw-seats-1e0", "1e0", "2026-03-15T10:00:00Z", &recent),
        booking(
            "aw-t1900",
            "1",
            "2026-03-15T10:00:00Z",
            "1900-01-01T00:00:00Z",
        ),
        booking(
            "aw-t0061",
            "1",
            "2026-03-15T10:00:00Z",
            "0061-04-27T00:00:00Z",
        ),
        booking(
            "aw-t2999",
            "1",
            "2026-03-15T10:00:00Z",
            "2999-01-01T00:00:00Z",
        ),
        booking(
            "aw-tlower",
            "1",
            "2026-03-15T10:00:00Z",
            &format!("{yesterday}t10:00:00.5z"),
        ),
    ];
    let typed_payments = [
        payment("aw-max", "9223372036854775807"),
        payment("aw-1500-0", "1500.0"),
    ];
    let diverted = [
        payment("aw-1e30", "1e30"),
        payment("aw-2e64", "18446744073709551616"),
        payment("aw-2e63", "9223372036854775808"),
    ];
    let all: Vec<&String> = typed_bookings
        .iter()
        .chain(&typed_payments)
        .chain(&diverted)
        .collect();
    let body = format!(
        "[{}]",
        all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
    );
    let r = server.post(Some("application/cloudevents-batch+json"), body.as_bytes());
    assert_eq!(r.status, 200, "the edge accepts every one: {r:?}");
    // The lake moves past them: its checkpoint reaches the last record of every shard that
    // holds one, without a restart.
    let mut server = server;
    common::wait_for(60, "the lake's checkpoint passes every record", || {
        let stream = common::stream_read(&data, &[]);
        let checkpoint: Value =
            serde_json::from_slice(&std::fs::read(data.join("stream/checkpoints/lake.json")).ok()?)
                .ok()?;
        stream
            .iter()
            .all(|r| {
                checkpoint_past(
                    &checkpoint,
                    &r["shard"].to_string(),
                    r["sequence"].as_str().unwrap(),
                )
            })
            .then_some(())
    });
    assert_eq!(server.terminate(), Some(0));

    let ids = |events: &[String]| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let expected = BTreeMap::from([
        ("booking_requested".to_owned(), ids(&typed_bookings)),
        ("payment_succeeded".to_owned(), ids(&typed_payments)),
        ("quarantine".to_owned(), ids(&diverted)),
    ]);
    let ddl = dir.path().join("lake.sql");
    std::fs::write(
        &ddl,
        common::floodgate()
            .args(["lake", "ddl", "--location", "s3://b/p"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    run_check(&data.join("lake"), &expected, &ddl);

    // `lake rebuild` attributes the diverted rows' runs to the lake consumer and its shard
    // (not to the quarantine log's consumer, whose one shard is also `0`): the same files.
    let before = dump(&data.join("lake"));
    assert!(
        before["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("/lake.")),
        "{before}"
    );
    let out = common::floodgate()
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
    assert_eq!(
        before["digest"], after["digest"],
        "rebuild wrote other rows"
    );

    // What the quarantine says about them, and the values as typed.
    let script = r#"
import duckdb, sys
lake = sys.argv[1]
con = duckdb.connect()
con.execute("set TimeZone = 'UTC'")
q = f"read_parquet('{lake}/quarantine/**/*.parquet', hive_partitioning = true)"
rows = con.execute(f"select event_id, reasons[1].pointer, reasons[1].message, shard from {q} order by event_id").fetchall()
assert [r[0] for r in rows] == ["aw-1e30", "aw-2e63", "aw-2e64"], rows
for r in rows:
    assert r[1] == "/data/amountMinor", r
    assert r[2].endswith("does not fit the lake's int64 column"), r
    assert r[3].startswith("lake."), r
b = f"read_parquet('{lake}/booking_requested/**/*.parquet', hive_partitioning = true)"
got = dict(con.execute(f"select event_id, strftime(requested_at, '%Y-%m-%d %H:%M:%S.%f') from {b}").fetchall())
assert got["aw-leap"] == "2026-03-15 23:59:59.999999", got["aw-leap"]
assert got["aw-fraction"] == "2026-03-15 10:00:00.123456", got["aw-fraction"]
seats = dict(con.execute(f"select event_id, seats from {b}").fetchall())
assert (seats["aw-seats-2-0"], seats["aw-seats-1e0"]) == (2, 1), seats
times = dict(con.execute(f"select event_id, cast(time as varchar) from {b}").fetchall())
assert times["aw-t1900"].startswith("1900-01-01"), times["aw-t1900"]
p = f"read_parquet('{lake}/payment_succeeded/**/*.parquet', hive_partitioning = true)"
amounts = dict(con.execute(f"select event_id, amount_minor from {p}").fetchall())
assert amounts == {"aw-max": 9223372036854775807, "aw-1500-0": 1500}, amounts
print("ok")
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(data.join("lake"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the lake consumer of `server` (started with no checkpoint: on a new data
/// directory, or after its checkpoint was deleted to replay) has gone through `stream`
/// (every record of the stream, as `floodgate stream read` printed them) to its end: in
/// this process it has processed at least as many records as the stream holds (so it read
/// from the start, not from a checkpoint kept elsewhere), and its checkpoint has reached
/// the last record of every shard (so every run it wrote or reproduced is durable).
fn wait_for_lake_to_reach_the_end(server: &Server, stream: &[Value]) {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for r in stream {
        let seq: u64 = r["sequence"].as_str().unwrap().parse().unwrap();
        let at = last.entry(r["shard"].to_string()).or_default();
        *at = (*at).max(seq);
    }
    let checkpoint_file = server.data_dir.join("stream/checkpoints/lake.json");
    common::wait_for(
        120,
        "the lake consumer to reach the end of the stream",
        || {
            let processed = common::metric(
                server,
                "floodgate_processor_records_total",
                &["consumer=\"lake\""],
            );
            if processed < stream.len() as f64 {
                return None;
            }
            let checkpoint: Value =
                serde_json::from_slice(&std::fs::read(&checkpoint_file).ok()?).ok()?;
            last.iter()
                .all(|(shard, seq)| checkpoint_past(&checkpoint, shard, &seq.to_string()))
                .then_some(())
        },
    );
}

/// Whether `checkpoint` (the lake consumer's checkpoint file) holds shard `shard` at or
/// past `seq`, whatever its layout: any number under the shard's key.
fn checkpoint_past(checkpoint: &Value, shard: &str, seq: &str) -> bool {
    let shard = shard.trim_matches('"');
    let seq: u64 = seq.parse().unwrap();
    let mut found = false;
    let mut stack = vec![checkpoint];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == shard {
                        let n = x
                            .as_str()
                            .and_then(|s| s.parse::<u64>().ok())
                            .or_else(|| x.as_u64())
                            .or_else(|| {
                                x.get("sequence")
                                    .or_else(|| x.get("checkpoint"))
                                    .and_then(|s| s.as_str().and_then(|s| s.parse().ok()))
                            });
                        found |= n.is_some_and(|n| n >= seq);
                    }
                    stack.push(x);
                }
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    found
}

/// Item 9 of issue 9: `floodgate lake compact` ignored `--config`, so it compacted with
/// the built-in schemas rather than the server's: a column the server's v2 schema adds was
/// dropped from the compacted file. Now it takes the server's configuration (data_dir and
/// schemas_dir) and every value survives.
#[test]
fn lake_compact_uses_the_servers_configuration() {
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
    let config = dir.path().join("floodgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nschemas_dir = {:?}\n[lake]\nroll_age_ms = 10\nroll_bytes = 2048\n",
            data.to_str().unwrap(),
            schemas.to_str().unwrap()
        ),
    )
    .unwrap();
    let yesterday = day(1);
    let mut server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    for i in 0..20 {
        let mut e = common::booking(&format!("cfg{i}"), &format!("B{i}"), "E1", 1);
        e["time"] = json!(format!("{yesterday}T10:30:00Z"));
        e["data"]["note"] = json!(format!("note {i}"));
        let r = server.post_batch(&[e]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(server.terminate(), Some(0));
    let partition = data.join(format!("booking_requested/dt={yesterday}/hour=10"));
    let lake_partition = data
        .join("lake")
        .join(partition.strip_prefix(&data).unwrap());
    let files = || {
        std::fs::read_dir(&lake_partition)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".parquet")
            })
            .count()
    };
    assert!(files() > 1, "several small files to compact");
    // No --data-dir, no --schemas: both come from the configuration.
    let out = common::floodgate()
        .args([
            "lake",
            "compact",
            "--table",
            "booking_requested",
            "--config",
        ])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files(), 1);
    let script = r#"
import duckdb, sys
lake = sys.argv[1]
con = duckdb.connect()
q = f"from read_parquet('{lake}/booking_requested/**/*.parquet', hive_partitioning = true, union_by_name = true)"
total, with_note = con.execute(f"select count(*), count(note) {q}").fetchone()
assert (total, with_note) == (20, 20), (total, with_note)
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
}

/// The first segment's base sequence of a one-log shard directory (0 while retention has
/// deleted nothing).
fn first_segment_base(shard_dir: &Path) -> u64 {
    std::fs::read_dir(shard_dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_suffix(".seg")?.parse::<u64>().ok()
        })
        .min()
        .unwrap_or(0)
}

/// `lake rebuild` re-derives what the logs still hold and keeps the runs whose records
/// retention already deleted — in every table: the typed ones, and `quarantine`, which
/// holds both the edge's rejections (from the quarantine log) and the rows the lake
/// diverted (from the stream). Before, only typed tables' old runs were kept, so a rebuild
/// after retention silently dropped quarantine rows.
#[test]
fn rebuild_keeps_every_tables_runs_that_retention_took_from_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    std::fs::write(
        &config,
        "[lake]\nroll_age_ms = 50\n[stream.embedded]\nsegment_bytes = 16384\nretention_bytes = 16384\nshards = 1\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    let when = format!("{}T10:00:00Z", day(1));
    let mut n = 0;
    common::wait_for(
        180,
        "retention to delete from the stream and the quarantine",
        || {
            let mut batch = Vec::new();
            for i in 0..20 {
                let id = format!("ok-{n}-{i}");
                let mut e = common::booking(&id, &id, "E1", 1);
                e["time"] = json!(when);
                batch.push(e);
            }
            for i in 0..5 {
                // seats 0: rejected at the edge, kept by the quarantine log.
                batch.push(common::booking(&format!("bad-{n}-{i}"), "b", "E1", 0));
            }
            // A valid amount that no int64 column holds: diverted to quarantine by the lake.
            batch.push(common::envelope(
            &format!("big-{n}"),
            "payment.succeeded",
            json!({"paymentId":"p","bookingId":"b","eventId":"E1","amountMinor":1e30,"currency":"EUR"}),
        ));
            n += 1;
            assert_eq!(server.post_batch(&batch).status, 207);
            (first_segment_base(&data.join("stream/shard-0000")) > 0
                && first_segment_base(&data.join("quarantine/shard-0000")) > 0)
                .then_some(())
        },
    );
    assert_eq!(server.terminate(), Some(0));
    let before = dump(&data.join("lake"));
    assert!(
        before["rows"]["quarantine"].as_u64().unwrap() > 0,
        "{before}"
    );
    let out = common::floodgate()
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
    assert_eq!(before["rows"], after["rows"], "rebuild lost or added rows");
    assert_eq!(before["tables"], after["tables"], "rebuild changed rows");
    assert_eq!(before["files"], after["files"], "rebuild wrote other files");
}

/// Every file of the lake directory `lake` that is neither a Parquet file nor a manifest:
/// a temporary file left behind, or anything else a reader would trip on.
fn stray_files(lake: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![lake.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if name.starts_with('.')
                || !(name.ends_with(".parquet") || name == "_compaction.json")
            {
                out.push(e.path());
            }
        }
    }
    out
}

/// `floodgate lake compact` of one table, as an operator runs it; returns how many files
/// it merged (from its last line, `compacted N files in P partitions of T`).
fn lake_compact(data: &Path, config: &Path, table: &str) -> u64 {
    let out = common::floodgate()
        .args(["lake", "compact", "--table", table, "--data-dir"])
        .arg(data)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lake compact failed: {stderr}");
    stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("compacted ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .next_back()
        .unwrap_or_else(|| panic!("lake compact says nothing of what it merged: {stderr}"))
}

/// Issue 15, hole 7: `lake compact` in a loop beside a running `serve` under load. The
/// server keeps writing small files (a run every 50 ms) into the very partition being
/// compacted, while the compactions merge what they find (and, from the second on, the
/// compacted file of the one before). Afterwards every record of the stream, so every acked
/// event, is in the table exactly once; no file is a leftover or unreadable; every plan is
/// finished; and `lake rebuild` re-derives the same files with the same rows.
#[test]
fn lake_compact_in_a_loop_beside_a_live_server_keeps_every_row_once() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lake = data.join("lake");
    let config = dir.path().join("floodgate.toml");
    std::fs::write(&config, "[lake]\nroll_age_ms = 50\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    // Every event in one partition: the one the compactions work on.
    let yesterday = day(1);
    let partition = lake.join(format!("booking_requested/dt={yesterday}/hour=10"));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let time = format!("{yesterday}T10:30:00Z");
    let posters = common::Posters::start(server.addr, 2, acked.clone(), move |c, n| {
        (0..5)
            .map(|i| {
                let id = format!("live-c{c}-n{n}-{i}");
                let mut e = common::booking(&id, &id.replace('-', "_"), &format!("E{}", i % 3), 1);
                e["time"] = json!(time);
                e
            })
            .collect()
    });
    // The shards of the files the server wrote there and has not had compacted, by file.
    let uncompacted = || -> Vec<String> {
        std::fs::read_dir(&partition)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".parquet") && !n.starts_with("c-"))
                    .filter_map(|n| n.split('-').next().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut merged = Vec::new();
    for round in 0..10 {
        // New runs to merge: some shard has written two since the last compaction.
        common::wait_for(60, "the server to write new small files", || {
            let shards = uncompacted();
            shards
                .iter()
                .any(|s| shards.iter().filter(|t| *t == s).count() >= 2)
                .then_some(())
        });
        let files = lake_compact(&data, &config, "booking_requested");
        assert!(files >= 2, "round {round}: merged {files} files");
        merged.push(files);
    }
    // And the server goes on writing beside what the compactions left.
    common::wait_for(60, "the server to write after the compactions", || {
        (!uncompacted().is_empty()).then_some(())
    });
    posters.stop();
    let stream = common::stream_read(&data, &[]);
    wait_for_lake_to_reach_the_end(&server, &stream);
    assert_eq!(server.terminate(), Some(0));
    lake_compact(&data, &config, "booking_requested");

    // Every record once, read file by file.
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lake_check.py"))
        .args(["ids"])
        .arg(&lake)
        .arg("booking_requested")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for id in got["ids"].as_array().unwrap() {
        *count.entry(id.as_str().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "rows held twice: {twice:?}");
    let records: std::collections::BTreeSet<&str> = stream
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap())
        .collect();
    let missing: Vec<_> = records
        .iter()
        .filter(|id| !count.contains_key(**id))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "records the lake lost: {missing:?}");
    let extra: Vec<_> = count
        .keys()
        .filter(|id| !records.contains(**id))
        .take(5)
        .collect();
    assert!(extra.is_empty(), "rows of no record: {extra:?}");
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.iter().all(|id| records.contains(id.as_str())),
        "an acked event is not in the stream"
    );
    assert_eq!(
        stray_files(&lake),
        Vec::<PathBuf>::new(),
        "files left behind"
    );
    let manifest_path = partition.join("_compaction.json");
    let manifest = std::fs::read(&manifest_path);
    // A rebuild re-derives the runs and re-applies every plan: the same files, the same rows.
    let before = dump(&lake);
    let out = common::floodgate()
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
    let after = dump(&lake);
    assert_eq!(before["files"], after["files"], "rebuild wrote other files");
    assert_eq!(before["rows"], after["rows"], "rebuild lost or added rows");
    assert_eq!(
        before["digest"], after["digest"],
        "rebuild wrote other rows"
    );
    // Every plan finished, none of its inputs left (the rebuild re-applied the same ones);
    // and a compaction merged an earlier one's file.
    let manifest =
        manifest.unwrap_or_else(|e| panic!("no manifest in {}: {e}", partition.display()));
    let rebuilt: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest, rebuilt, "rebuild recorded other plans");
    let mut remerged = false;
    for (name, plan) in manifest["compacted"].as_object().unwrap() {
        assert_eq!(plan["done"], true, "plan {name} is unfinished");
        for input in plan["inputs"].as_array().unwrap() {
            let input = input.as_str().unwrap();
            assert!(
                !partition.join(input).exists(),
                "{input} is still there beside {name}"
            );
            remerged |= input.starts_with("c-");
        }
    }
    assert!(remerged, "no compaction merged an earlier one's file");
    eprintln!(
        "{} records, {} acked; files merged per round: {merged:?}",
        records.len(),
        acked.len()
    );
}
