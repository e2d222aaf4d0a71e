//! The end-to-end property behind every other guarantee: **every event the edge answers
//! `accepted` ends in exactly one outcome downstream, for every consumer**: applied by the
//! bookings processor (or kept as a dead letter with its reason), and in exactly one lake
//! table (typed or `quarantine`), in a partition Athena's projection can see.
//!
//! The events are generated from the shipped schemas themselves, at the edges of every
//! keyword: integers at their bounds and written as `2`, `2.0`, `2e0` and `20E-1`,
//! integers past 64 bits where a schema leaves them unbounded, every RFC 3339 spelling the
//! `date-time` format allows (leap seconds, lowercase, long fractions, offsets, years 0001
//! and 9999), strings at their minimum and maximum lengths in multi-byte characters, and
//! bookingIds reused across events. They are posted through `floodgate serve`, which is
//! killed with SIGKILL at random points and restarted; the producer retries what was not
//! answered, as a real one would.
//!
//! Bounded by default (a few thousand events, 3 kills); a longer run on request:
//! `FG_PROPERTY_EVENTS=50000 FG_PROPERTY_KILLS=20 FG_PROPERTY_SEED=7 cargo test --test accepted_outcome`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, outbox_read, try_request, wait_for};
use serde_json::{Value, json};

/// A small, seedable generator (xorshift64*): the run is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every spelling of RFC 3339 `date-time` that JSON Schema's format allows, at its edges.
const DATE_TIMES: &[&str] = &[
    "2026-11-22T10:00:00Z",
    "2026-03-15T23:59:60Z",
    "2016-12-31T23:59:60.5Z",
    "2026-03-15T15:59:60-08:00",
    "2026-11-22t10:00:00z",
    "2026-11-22T10:00:00.1Z",
    "2026-11-22T10:00:00.123456789Z",
    "2026-11-22T10:00:00.123456789012Z",
    "2026-11-22T10:00:00+14:00",
    "2026-11-22T10:00:00-12:00",
    "2026-11-22T10:00:00-00:00",
    "2026-11-22T00:30:00+23:59",
    "1985-04-12T23:20:50.52Z",
    "1996-12-19T16:39:57-08:00",
    "0001-01-01T00:00:00Z",
    "0061-04-27T12:00:00Z",
    "1900-01-01T00:00:00Z",
    "1969-12-31T23:59:59.999999Z",
    "2999-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "2024-02-29T12:00:00Z",
];

/// Characters for free-text strings: ASCII, two- to four-byte UTF-8, and JSON escapes.
const CHARS: &[&str] = &[
    "a", "Z", "0", " ", "é", "ß", "日", "本", "😀", "🎟", "\\\"", "\\\\", "\\n", "\\t", "\\u0000",
    "\\u001f", "/",
];

const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// The events on sale: ids at the pattern's bounds (1 and 64 characters).
fn event_ids() -> Vec<String> {
    let mut ids: Vec<String> = (0..6).map(|i| format!("prop-ev-{i}")).collect();
    ids.push("E".to_owned());
    ids.push(format!("{:-<64}", "prop-long-"));
    ids
}

/// A JSON number text for integer `n`, in one of the spellings JSON Schema counts as that
/// integer.
fn integer_text(rng: &mut Rng, n: i64) -> String {
    match rng.below(6) {
        0 | 1 => n.to_string(),
        2 => format!("{n}.0"),
        3 => format!("{n}e0"),
        4 => format!("{}E-1", i128::from(n) * 10),
        _ if n == 0 => "-0".to_owned(),
        _ => format!("{n}.000"),
    }
}

/// Generates `data` for a schema node, as JSON text, so that number spellings survive.
struct Gen<'a> {
    rng: &'a mut Rng,
    events: &'a [String],
    serial: u64,
    booking_ids: &'a mut Vec<String>,
}

impl Gen<'_> {
    fn id_string(&mut self, min: usize, max: usize, unique: bool) -> String {
        let len = match self.rng.below(3) {
            0 => min,
            1 => max,
            _ => min + self.rng.below((max - min + 1) as u64) as usize,
        };
        let mut s = String::new();
        if unique {
            self.serial += 1;
            s = format!("p{}-", self.serial);
        }
        while s.len() < len {
            s.push(*self.rng.pick(ID_CHARS) as char);
        }
        if !unique {
            s.truncate(len);
        }
        s
    }

    fn text(&mut self, min: usize, max: usize) -> String {
        let len = match self.rng.below(3) {
            0 => min,
            1 => max,
            _ => min + self.rng.below((max.min(300) - min + 1) as u64) as usize,
        };
        (0..len).map(|_| *self.rng.pick(CHARS)).collect()
    }

    fn value(&mut self, name: &str, schema: &Value) -> String {
        let ty = schema["type"].as_str().unwrap_or_default();
        match ty {
            "string" => {
                let s = if name == "eventId" {
                    self.rng.pick(self.events).clone()
                } else if name == "bookingId" {
                    // Mostly fresh; sometimes one used before (possibly on another event).
                    if !self.booking_ids.is_empty() && self.rng.chance(15) {
                        self.rng.pick(self.booking_ids).clone()
                    } else {
                        let unique = !self.rng.chance(5);
                        let id = self.id_string(1, 64, unique);
                        self.booking_ids.push(id.clone());
                        id
                    }
                } else if schema["format"] == "date-time" {
                    (*self.rng.pick(DATE_TIMES)).to_owned()
                } else if let Some(p) = schema["pattern"].as_str() {
                    match p {
                        "^[A-Za-z0-9_-]{1,64}$" => {
                            let unique = self.rng.chance(50);
                            self.id_string(1, 64, unique)
                        }
                        "^[A-Z]{3}$" => (0..3)
                            .map(|_| (b'A' + self.rng.below(26) as u8) as char)
                            .collect(),
                        other => panic!(
                            "the generator does not know pattern {other:?}: teach it, so that every schema stays covered"
                        ),
                    }
                } else {
                    let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
                    let max = schema["maxLength"].as_u64().unwrap_or(64) as usize;
                    return format!("\"{}\"", self.text(min, max));
                };
                serde_json::to_string(&s).unwrap()
            }
            "integer" => {
                let min = schema["minimum"].as_i64();
                let max = schema["maximum"].as_i64();
                if name == "seats" && self.rng.chance(70) {
                    // Small requests, so that events fill up but not at once.
                    let n = 1 + self.rng.below(4) as i64;
                    return integer_text(self.rng, n);
                }
                if max.is_none() && self.rng.chance(40) {
                    // Valid integers the lake's int64 cannot hold (or only just).
                    return (*self.rng.pick(&[
                        "9223372036854775807",
                        "9223372036854775808",
                        "18446744073709551616",
                        "1e30",
                        "1.5e300",
                        "123456789012345678901234567890",
                    ]))
                    .to_owned();
                }
                let lo = min.unwrap_or(i64::MIN / 2);
                let hi = max.unwrap_or(lo.saturating_add(1_000_000_000));
                let n = match self.rng.below(5) {
                    0 => lo,
                    1 => hi,
                    2 => (lo + 1).min(hi),
                    3 => (hi - 1).max(lo),
                    _ => lo + (self.rng.below((hi - lo) as u64 + 1) as i64),
                };
                integer_text(self.rng, n)
            }
            "object" => {
                let props = schema["properties"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                let required: HashSet<&str> = schema["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut members = Vec::new();
                for (k, v) in &props {
                    if required.contains(k.as_str()) || self.rng.chance(50) {
                        members.push(format!("{}:{}", json!(k), self.value(k, v)));
                    }
                }
                format!("{{{}}}", members.join(","))
            }
            other => panic!("the generator does not know type {other:?} ({name}): teach it"),
        }
    }
}

/// The shipped schemas, by type (latest version).
fn schemas() -> BTreeMap<String, Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut out = BTreeMap::new();
    for ty in std::fs::read_dir(&root).unwrap() {
        let ty = ty.unwrap();
        if !ty.file_type().unwrap().is_dir() {
            continue;
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir(ty.path())
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        versions.sort();
        let latest = versions.last().unwrap();
        let schema: Value = serde_json::from_slice(&std::fs::read(latest).unwrap()).unwrap();
        out.insert(ty.file_name().to_string_lossy().into_owned(), schema);
    }
    out
}

/// One generated event: its CloudEvents JSON text and what the checks need of it.
#[derive(Clone, Debug)]
struct Generated {
    id: String,
    event_type: String,
    text: String,
}

fn generate(rng: &mut Rng, n: usize) -> Vec<Generated> {
    let schemas = schemas();
    let events = event_ids();
    let mut booking_ids = Vec::new();
    let mut out = Vec::new();
    let gen_data = |rng: &mut Rng, ty: &str, serial: u64, booking_ids: &mut Vec<String>| {
        let mut g = Gen {
            rng,
            events: &events,
            serial,
            booking_ids,
        };
        g.value("data", &schemas[ty])
    };
    // Every event goes on sale first (with room for most requests), then anything goes.
    let types: Vec<&String> = schemas.keys().collect();
    for i in 0..n {
        let ty: &str = if i < events.len() {
            "inventory.event.created"
        } else if rng.chance(50) {
            "booking.requested"
        } else {
            rng.pick(&types).as_str()
        };
        let mut data = gen_data(rng, ty, (i as u64) << 20, &mut booking_ids);
        if i < events.len() {
            let v = json!({"eventId": events[i], "name": "Prop", "venue": "Hall",
                "startsAt": "2026-12-01T20:00:00Z", "capacity": 400 + i});
            data = v.to_string();
        }
        let id = format!("prop-{i}");
        let mut attrs = vec![
            format!("\"specversion\":\"1.0\""),
            format!("\"id\":{}", json!(id)),
            format!("\"source\":\"/property\""),
            format!("\"type\":{}", json!(ty)),
        ];
        if rng.chance(70) {
            attrs.push(format!("\"time\":{}", json!(rng.pick(DATE_TIMES))));
        }
        if rng.chance(20) {
            attrs.push("\"datacontenttype\":\"application/json\"".to_owned());
        }
        if rng.chance(10) {
            attrs.push(format!("\"subject\":{}", json!(format!("s-{i}"))));
        }
        let text = format!("{{{},\"data\":{data}}}", attrs.join(","));
        out.push(Generated {
            id,
            event_type: ty.to_owned(),
            text,
        });
    }
    out
}

/// Posts every batch until each event is answered `accepted`, following the server across
/// restarts. An event answered `rejected` fails the test: the generator makes only valid
/// events, so a rejection is the edge refusing what its own schemas allow.
fn post_all(
    batches: Vec<Vec<Generated>>,
    addr: Arc<Mutex<SocketAddr>>,
    progress: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut posted = 0;
        for batch in batches {
            let body = format!(
                "[{}]",
                batch
                    .iter()
                    .map(|g| g.text.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let mut pending: HashSet<usize> = (0..batch.len()).collect();
            let mut attempts = 0;
            while !pending.is_empty() {
                attempts += 1;
                assert!(attempts < 2000, "a batch never got accepted");
                let to = *addr.lock().unwrap();
                let resp = try_request(
                    to,
                    "POST",
                    "/v1/events",
                    &[("content-type", "application/cloudevents-batch+json")],
                    Some(body.as_bytes()),
                );
                let Ok(resp) = resp else {
                    // The server is being killed or restarted: retry the same batch.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                if resp.status == 503 || resp.status == 429 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let Ok(v) = serde_json::from_slice::<Value>(&resp.body) else {
                    continue;
                };
                let Some(results) = v["results"].as_array() else {
                    assert!(resp.status == 503, "unexpected answer {}: {v}", resp.status);
                    continue;
                };
                for r in results {
                    let i = r["index"].as_u64().unwrap() as usize;
                    match r["status"].as_str() {
                        Some("accepted") => {
                            pending.remove(&i);
                        }
                        Some("retry") => {}
                        other => panic!(
                            "a schema-valid event was answered {other:?}: {r}\nevent: {}",
                            batch[i].text
                        ),
                    }
                }
            }
            posted += batch.len();
            progress.fetch_add(1, Ordering::AcqRel);
        }
        posted
    })
}

fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Every row of every lake table: (table, source, event_id, dt).
fn lake_rows(lake: &Path) -> Vec<(String, String, String, String)> {
    let script = r#"
import json, pathlib, sys
import duckdb
lake = pathlib.Path(sys.argv[1])
con = duckdb.connect()
out = []
for table in sorted(p.name for p in lake.iterdir() if p.is_dir() and not p.name.startswith('.')):
    if not list((lake / table).rglob('*.parquet')):
        continue
    rows = con.execute(
        f"select coalesce(source, ''), coalesce(event_id, ''), cast(dt as varchar) from read_parquet('{lake}/{table}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    ).fetchall()
    out.extend([table, s, i, d] for (s, i, d) in rows)
print(json.dumps(out))
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .arg(lake)
        .output()
        .expect("the venv's python runs (scripts/test makes .venv)");
    assert!(
        out.status.success(),
        "reading the lake failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, String, String, String)> = serde_json::from_slice(&out.stdout).unwrap();
    rows
}

fn dead_letters(data_dir: &Path) -> Vec<Value> {
    let out = common::floodgate()
        .args(["dead-letters", "read", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn every_accepted_event_ends_in_exactly_one_outcome_across_kill_9() {
    let seed = env_u64("FG_PROPERTY_SEED", 20_261_201);
    let total = env_u64("FG_PROPERTY_EVENTS", 3000) as usize;
    let kills = env_u64("FG_PROPERTY_KILLS", 3);
    eprintln!("seed {seed}, {total} events, {kills} kill -9 rounds");
    let mut rng = Rng(seed.max(1));
    let generated = generate(&mut rng, total);
    // Random batch sizes, including single events and the edge's limit.
    let mut batches = Vec::new();
    let mut rest = generated.as_slice();
    // The events on sale go first, alone, so that requests find them.
    let (on_sale, others) = rest.split_at(event_ids().len());
    batches.push(on_sale.to_vec());
    rest = others;
    while !rest.is_empty() {
        let n = (1 + rng.below(120) as usize).min(rest.len());
        let (b, r) = rest.split_at(n);
        batches.push(b.to_vec());
        rest = r;
    }

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("floodgate.toml");
    // Short lake rolls so that kills land between flushes too.
    std::fs::write(&config, "[lake]\nroll_age_ms = 500\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Server::start(&data, &args);
    let addr = Arc::new(Mutex::new(server.addr));
    let progress = Arc::new(AtomicUsize::new(0));
    let n_batches = batches.len();
    // Where the SIGKILLs land: after random batches, a random few ms into the next one.
    let mut kill_points: Vec<usize> = (0..kills)
        .map(|_| 1 + rng.below(n_batches.saturating_sub(1).max(1) as u64) as usize)
        .collect();
    kill_points.sort_unstable();
    let poster = post_all(batches, addr.clone(), progress.clone());
    for (round, point) in kill_points.iter().enumerate() {
        wait_for(300, "the producer to reach the kill point", || {
            (progress.load(Ordering::Acquire) >= *point).then_some(())
        });
        std::thread::sleep(Duration::from_millis(rng.below(25)));
        server.kill9();
        eprintln!("kill -9 round {round} after batch {point} of {n_batches}");
        server = Server::start(&data, &args);
        *addr.lock().unwrap() = server.addr;
    }
    let posted = poster.join().expect("the producer finished");
    assert_eq!(posted, total);

    // Bookings: every accepted request is decided (its bookingId has a booking), every
    // event on sale exists, and reserved is exactly its confirmed and paid seats.
    let mut requested: HashSet<String> = HashSet::new();
    for g in &generated {
        if g.event_type == "booking.requested" {
            let v: Value = serde_json::from_str(&g.text).unwrap();
            requested.insert(v["data"]["bookingId"].as_str().unwrap().to_owned());
        }
    }
    let bookings = common::bookings_decided(&server, &requested, 180);
    let mut reserved: HashMap<String, i64> = HashMap::new();
    for b in bookings.values() {
        if matches!(b["status"].as_str(), Some("confirmed" | "paid")) {
            *reserved
                .entry(b["eventId"].as_str().unwrap().to_owned())
                .or_default() += b["seats"].as_i64().unwrap();
        }
    }
    for e in event_ids() {
        let inv = server.get(&format!("/v1/inventory/{e}")).json();
        let (cap, res) = (
            inv["capacity"].as_i64().unwrap(),
            inv["reserved"].as_i64().unwrap(),
        );
        assert!(res <= cap, "{e} oversold: {inv}");
        assert_eq!(
            res,
            reserved.get(&e).copied().unwrap_or(0),
            "{e}: reserved is not the seats of its confirmed bookings"
        );
    }
    assert_eq!(server.terminate(), Some(0), "a clean stop");

    // The stream holds every accepted event exactly once.
    let in_stream = common::stream_id_counts(&data);
    for g in &generated {
        assert_eq!(
            in_stream.get(&g.id),
            Some(&1),
            "{} in the stream (duplicates or losses)",
            g.id
        );
    }
    // Nothing was skipped by the bookings processor: the shipped schemas bound every
    // member it reads, so nothing may be a dead letter either.
    let dead = dead_letters(&data);
    assert!(dead.is_empty(), "dead letters: {dead:?}");

    // Derived events: one decision per request that was applied, each published once.
    let outbox = outbox_read(&data);
    let mut derived_ids = HashSet::new();
    let mut confirmed: HashMap<String, usize> = HashMap::new();
    for e in &outbox {
        assert!(
            derived_ids.insert(e["id"].as_str().unwrap().to_owned()),
            "a derived event published twice: {e}"
        );
        if e["type"] == "booking.confirmed" {
            *confirmed
                .entry(e["data"]["bookingId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    for (id, b) in &bookings {
        let expected = usize::from(b["status"] != "rejected");
        assert_eq!(
            confirmed.get(id).copied().unwrap_or(0),
            expected,
            "booking.confirmed events for {id} ({b})"
        );
    }

    // The lake: every accepted event in exactly one table, in a partition between the
    // projection's start (2020-01-01) and today.
    let rows = lake_rows(&data.join("lake"));
    let today = today();
    let mut in_lake: HashMap<&str, Vec<&str>> = HashMap::new();
    for (table, source, id, dt) in &rows {
        if source != "/property" {
            continue; // derived events (source floodgate) have tables of their own
        }
        in_lake.entry(id.as_str()).or_default().push(table.as_str());
        assert!(
            dt.as_str() >= "2020-01-01" && dt.as_str() <= today.as_str(),
            "{id} in {table} partition dt={dt}: outside Athena's projection"
        );
    }
    let mut quarantined = 0;
    for g in &generated {
        let tables = in_lake.get(g.id.as_str()).cloned().unwrap_or_default();
        assert_eq!(tables.len(), 1, "{} is in lake tables {tables:?}", g.id);
        if tables[0] == "quarantine" {
            quarantined += 1;
        } else {
            assert_eq!(
                tables[0],
                g.event_type.replace('.', "_"),
                "{} in the wrong table",
                g.id
            );
        }
    }
    eprintln!(
        "{total} events accepted, {kills} kill -9 rounds, {} bookings, {quarantined} rows in quarantine (values the lake's columns cannot hold)",
        bookings.len()
    );
}
