//! The conformance suite of the stream roles, written once and run against every backend.
//!
//! A test binary declares `mod conformance;` and hands the suite a [`StreamFixture`] for
//! its backend: something that appends records with keys, and the [`StreamReader`] under
//! test. `stream_conformance.rs` runs it over the embedded log (read in-process and from
//! another process's view) and the outbox; a later backend (Kinesis) runs the same checks
//! over its own fixture, so "passes the suite" means the same thing for every reader.
//!
//! - [`stream_reader`]: the reader contract of `floodgate_core::stream`, on a fresh stream:
//!   order within a shard and per key, every [`StartPosition`] (including positions before
//!   the first and after the last record), `max_records`, `next` resuming with no gap and no
//!   duplicate, an empty read meaning "nothing new yet", `records_behind`, unknown shards,
//!   and (where the backend can show the state) that a record the writer has not made
//!   durable is never read.
//! - [`read_while_writing`]: one task appends random batches while another polls every
//!   shard; the reader sees each record exactly once, with no gap, in per-key order.
//! - [`stream_writer`]: the writer contract, for backends that write through
//!   [`StreamWriter`].
//!
//! The suite assumes nothing about a backend beyond the traits: sequence numbers are only
//! compared, never computed, unless the fixture says its reader takes any decimal position
//! ([`Capabilities::any_sequence_position`]). Every check starts from a fresh, empty
//! stream. (A binary that runs only part of the suite puts `#[allow(dead_code)]` on its
//! `mod conformance;`.)

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::stream::{
    AppendError, Appended, ReadBatch, Record, SequenceNumber, ShardId, StartPosition, StoredRecord,
    StreamError, StreamReader, StreamWriter,
};

/// The keys the suite appends with: more keys than the embedded log has shards, so that
/// shards hold several keys each.
const KEYS: [&str; 6] = ["k0", "k1", "k2", "k3", "k4", "k5"];
/// How long a reader may take to deliver records that are already durable.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// What a backend's reader does beyond the bare contract, so the suite checks it.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Records come back with the key they were appended with. (The outbox keys its records
    /// by outbox entry instead.)
    pub keeps_keys: bool,
    /// `records_behind` is the exact count of durable records after the batch. (Kinesis
    /// only knows time lag.)
    pub exact_records_behind: bool,
    /// `At`/`After` take any decimal sequence number, including ones the stream never
    /// assigned: before the first record, between two records, past the last. (Kinesis
    /// takes only sequence numbers it assigned.)
    pub any_sequence_position: bool,
}

/// A backend under test.
#[async_trait]
pub trait StreamFixture: Send + Sync + 'static {
    /// Names the backend in failure messages.
    fn name(&self) -> String;

    fn capabilities(&self) -> Capabilities;

    /// The reader under test. Asked for again before every read, and never kept across
    /// another fixture call, so a fixture may reopen its backend (see
    /// [`StreamFixture::make_durable`]).
    fn reader(&self) -> Arc<dyn StreamReader>;

    /// Appends `records` in one call of the backend's writer, durably, and returns where
    /// each landed, in input order. Panics if any record is not appended.
    async fn append(&self, records: Vec<Record>) -> Vec<Appended>;

    /// Leaves `records` where the backend keeps what its writer has written but not yet
    /// made durable (in a file past the durable watermark, a line still being written).
    /// Returns `false` when the backend has no such state to show; the suite then skips
    /// the durability checks. Nothing else is appended until [`StreamFixture::make_durable`].
    async fn write_without_durability(&self, _records: Vec<Record>) -> bool {
        false
    }

    /// Makes what [`StreamFixture::write_without_durability`] left durable, as the writer
    /// would have once its fsync returned.
    async fn make_durable(&self) {}

    /// Whether a read from a time at or after which no record was appended (an empty
    /// shard, a time past the last record) can be asked for. `false` skips those reads:
    /// kinesalite never answers GetShardIterator `AT_TIMESTAMP` then
    /// (<https://github.com/mhart/kinesalite/issues/84>), where Kinesis answers an iterator
    /// at the shard's end.
    fn reads_from_a_time_past_the_end(&self) -> bool {
        true
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("a time in range")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formats every time in range")
}

/// A record the suite appended (or will): what was sent, and where it landed.
#[derive(Debug, Clone)]
struct Sent {
    n: u64,
    key: String,
    payload: Bytes,
    shard: ShardId,
    sequence: SequenceNumber,
}

/// What the suite has appended, in append order.
#[derive(Debug, Default)]
struct Model {
    name: String,
    sent: Vec<Sent>,
    by_payload: HashMap<Bytes, usize>,
    shard_of_key: HashMap<String, ShardId>,
    last_in_shard: HashMap<ShardId, SequenceNumber>,
    next_n: u64,
}

impl Model {
    fn new(name: String) -> Model {
        Model {
            name,
            ..Model::default()
        }
    }

    /// Fresh records for `keys`, each with a payload no other record has. The payload is a
    /// JSON event whose `time` is now, so a backend that takes an event's time as its
    /// append time (the outbox) can be read by timestamp too.
    fn records<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) -> Vec<Record> {
        let time = rfc3339_ms(now_ms());
        keys.into_iter()
            .map(|key| {
                let n = self.next_n;
                self.next_n += 1;
                Record {
                    key: key.into(),
                    payload: Bytes::from(format!(
                        r#"{{"n":{n},"key":"{key}","time":"{time}","pad":"{}"}}"#,
                        "p".repeat(100)
                    )),
                }
            })
            .collect()
    }

    /// `count` fresh records over [`KEYS`], round robin.
    fn records_over_keys(&mut self, count: usize) -> Vec<Record> {
        self.records((0..count).map(|i| KEYS[i % KEYS.len()]))
    }

    /// Appends through the fixture and checks the writer's answers: one per record, in
    /// shards the reader lists, every key in one shard, sequences growing in append order.
    async fn append<F: StreamFixture + ?Sized>(
        &mut self,
        fx: &F,
        shards: &[ShardId],
        records: Vec<Record>,
    ) -> Vec<Sent> {
        let name = &self.name;
        let appended = fx.append(records.clone()).await;
        assert_eq!(
            appended.len(),
            records.len(),
            "{name}: append answered {} outcomes for {} records",
            appended.len(),
            records.len()
        );
        let mut out = Vec::new();
        for (record, at) in records.into_iter().zip(appended) {
            assert!(
                shards.contains(&at.shard),
                "{name}: a record landed in shard {} that the reader does not list ({shards:?})",
                at.shard
            );
            let shard = self
                .shard_of_key
                .entry(record.key.to_string())
                .or_insert_with(|| at.shard.clone());
            assert_eq!(
                *shard, at.shard,
                "{name}: key {} landed in two shards",
                record.key
            );
            if let Some(last) = self.last_in_shard.get(&at.shard) {
                assert!(
                    at.sequence > *last,
                    "{name}: shard {}: sequence {} appended after {last}",
                    at.shard,
                    at.sequence
                );
            }
            self.last_in_shard
                .insert(at.shard.clone(), at.sequence.clone());
            let n = serde_json::from_slice::<serde_json::Value>(&record.payload)
                .ok()
                .and_then(|v| v["n"].as_u64())
                .expect("the suite's payloads carry their number");
            let sent = Sent {
                n,
                key: record.key.to_string(),
                payload: record.payload,
                shard: at.shard,
                sequence: at.sequence,
            };
            self.by_payload
                .insert(sent.payload.clone(), self.sent.len());
            self.sent.push(sent.clone());
            out.push(sent);
        }
        out
    }

    /// The records of `shard` appended since the `since`-th record, in shard order.
    fn in_shard_since(&self, shard: &ShardId, since: usize) -> Vec<Sent> {
        self.sent[since..]
            .iter()
            .filter(|s| s.shard == *shard)
            .cloned()
            .collect()
    }

    fn in_shard(&self, shard: &ShardId) -> Vec<Sent> {
        self.in_shard_since(shard, 0)
    }
}

fn describe(r: &StoredRecord) -> String {
    format!(
        "{} (key {}, {})",
        r.sequence,
        r.key,
        String::from_utf8_lossy(&r.payload[..r.payload.len().min(40)])
    )
}

/// Checks that `got` is the record `want`.
fn assert_is(name: &str, caps: &Capabilities, context: &str, got: &StoredRecord, want: &Sent) {
    assert!(
        got.payload == want.payload && got.sequence == want.sequence,
        "{name}: {context}: got record {}, expected record n={} at sequence {}",
        describe(got),
        want.n,
        want.sequence
    );
    if caps.keeps_keys {
        assert_eq!(got.key, want.key, "{name}: {context}: the key changed");
    }
}

/// One read, with the checks every answer must pass whatever it was asked: at most
/// `max` records, in sequence order, at or after the position asked for, and a `next`
/// (the suite's shards are open).
async fn read<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
    max: usize,
) -> Result<ReadBatch, StreamError> {
    let reader = fx.reader();
    let batch = reader.read(shard, from, max).await?;
    drop(reader);
    let name = fx.name();
    let asked = format!("read({shard}, {from:?}, max {max})");
    assert!(
        batch.records.len() <= max,
        "{name}: {asked} returned {} records",
        batch.records.len()
    );
    assert!(
        batch.next.is_some(),
        "{name}: {asked} on an open shard gave no position to continue from"
    );
    for pair in batch.records.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "{name}: {asked} returned {} before {}",
            describe(&pair[0]),
            describe(&pair[1])
        );
    }
    if let (Some(first), StartPosition::At(s) | StartPosition::After(s)) =
        (batch.records.first(), from)
    {
        let ok = match from {
            StartPosition::At(_) => first.sequence >= *s,
            _ => first.sequence > *s,
        };
        assert!(ok, "{name}: {asked} returned {} first", describe(first));
    }
    Ok(batch)
}

async fn read_ok<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
    max: usize,
) -> ReadBatch {
    read(fx, shard, from, max).await.unwrap_or_else(|e| {
        panic!(
            "{}: read({shard}, {from:?}, max {max}) failed: {e}",
            fx.name()
        )
    })
}

/// Reads `shard` from `from` in batches of `max` until a read is empty, checking on the
/// way that the records are exactly `want`, in order: each batch continues where the
/// previous one's `next` said, with no gap and no duplicate, and (when exact)
/// `records_behind` counts what is left. An empty read before the end of `want` is a
/// failure: records that are durable are not "nothing new". Returns the records read and
/// the final `next`.
async fn read_expecting<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
    max: usize,
    want: &[Sent],
) -> (Vec<StoredRecord>, StartPosition) {
    let name = fx.name();
    let caps = fx.capabilities();
    let mut got: Vec<StoredRecord> = Vec::new();
    let mut pos = from.clone();
    // Enough reads for every record one at a time, and the final empty one.
    for _ in 0..=want.len() + 1 {
        let batch = read_ok(fx, shard, &pos, max).await;
        let context = format!("shard {shard} read from {from:?} in batches of {max}");
        for r in &batch.records {
            if let Some(last) = got.last() {
                assert!(
                    r.sequence > last.sequence,
                    "{name}: {context}: {} came after {} (a duplicate or a step back)",
                    describe(r),
                    describe(last)
                );
            }
            let Some(w) = want.get(got.len()) else {
                panic!(
                    "{name}: {context}: read {} past the {} records expected",
                    describe(r),
                    want.len()
                );
            };
            assert_is(&name, &caps, &context, r, w);
            got.push(r.clone());
        }
        let next = batch.next.expect("read() checked it");
        if batch.records.is_empty() {
            assert_eq!(
                got.len(),
                want.len(),
                "{name}: {context}: an empty read at {pos:?} after {} of {} durable records \
                 (the next expected is n={} at sequence {})",
                got.len(),
                want.len(),
                want.get(got.len()).map_or(0, |w| w.n),
                want.get(got.len())
                    .map_or_else(String::new, |w| w.sequence.to_string()),
            );
            assert_eq!(
                batch.records_behind, 0,
                "{name}: {context}: nothing left to read, yet records_behind is {}",
                batch.records_behind
            );
            return (got, next);
        }
        if caps.exact_records_behind {
            assert_eq!(
                batch.records_behind,
                (want.len() - got.len()) as u64,
                "{name}: {context}: records_behind after {} of {} records",
                got.len(),
                want.len()
            );
        }
        pos = next;
    }
    panic!(
        "{name}: shard {shard}: reading from {from:?} never came to an end after {} records",
        got.len()
    );
}

/// The first record a read from `from` returns; `None` when the read is empty.
async fn first_at<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
) -> Option<StoredRecord> {
    let batch = read_ok(fx, shard, from, 1).await;
    batch.records.into_iter().next()
}

async fn expect_first<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
    want: &Sent,
) {
    let name = fx.name();
    let caps = fx.capabilities();
    match first_at(fx, shard, from).await {
        Some(got) => assert_is(
            &name,
            &caps,
            &format!("shard {shard}, {from:?}"),
            &got,
            want,
        ),
        None => panic!(
            "{name}: shard {shard}: a read from {from:?} was empty; expected n={} at sequence {}",
            want.n, want.sequence
        ),
    }
}

/// Reads from `from`, which is at or past the end of `shard`: nothing, with a position to
/// continue from, and nothing behind. Returns that position.
async fn expect_end<F: StreamFixture + ?Sized>(
    fx: &F,
    shard: &ShardId,
    from: &StartPosition,
) -> StartPosition {
    let name = fx.name();
    let batch = read_ok(fx, shard, from, 10).await;
    assert!(
        batch.records.is_empty(),
        "{name}: shard {shard}: a read from {from:?}, past the last record, returned {}",
        describe(&batch.records[0])
    );
    assert_eq!(
        batch.records_behind, 0,
        "{name}: shard {shard}: a read from {from:?}, past the last record, has records_behind {}",
        batch.records_behind
    );
    batch.next.expect("read() checked it")
}

async fn shards_of<F: StreamFixture + ?Sized>(fx: &F) -> Vec<ShardId> {
    let name = fx.name();
    let shards = fx
        .reader()
        .shards()
        .await
        .unwrap_or_else(|e| panic!("{name}: shards() failed: {e}"));
    assert!(!shards.is_empty(), "{name}: a stream without shards");
    for (i, s) in shards.iter().enumerate() {
        assert!(
            !shards[..i].iter().any(|o| o.id == s.id),
            "{name}: shard {} listed twice",
            s.id
        );
        // A parent past the stream's retention is no longer listed; one that is listed
        // comes first.
        for parent in &s.parents {
            assert!(
                !shards[i..].iter().any(|o| o.id == *parent),
                "{name}: shard {} is listed before its parent {parent}",
                s.id
            );
        }
    }
    shards.into_iter().map(|s| s.id).collect()
}

/// The decimal after `s` (`s` + 1), for backends that take any decimal position.
fn decimal_after(s: &SequenceNumber) -> SequenceNumber {
    let mut digits: Vec<u8> = s.as_str().bytes().collect();
    let mut i = digits.len();
    loop {
        if i == 0 {
            digits.insert(0, b'1');
            break;
        }
        i -= 1;
        if digits[i] == b'9' {
            digits[i] = b'0';
        } else {
            digits[i] += 1;
            break;
        }
    }
    SequenceNumber::new(String::from_utf8(digits).expect("decimal digits"))
}

/// Waits until the wall clock reads at least `ms`, so that what is appended next has a
/// later append time than `ms`.
async fn wait_for_clock(ms: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while now_ms() < ms {
        assert!(
            Instant::now() < deadline,
            "the clock did not reach {ms} (now {})",
            now_ms()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Checks that the records of every key came back in the order they were appended.
fn assert_key_order(name: &str, model: &Model, read: &[StoredRecord]) {
    let mut last_n: HashMap<&str, u64> = HashMap::new();
    for r in read {
        let Some(&i) = model.by_payload.get(&r.payload) else {
            panic!("{name}: read {} that was never appended", describe(r));
        };
        let sent = &model.sent[i];
        if let Some(prev) = last_n.insert(&sent.key, sent.n) {
            assert!(
                prev < sent.n,
                "{name}: key {}: record n={} came back after n={prev}",
                sent.key,
                sent.n
            );
        }
    }
}

/// The reader contract, on a fresh, empty stream of the fixture's backend.
pub async fn stream_reader<F: StreamFixture>(fx: &F) {
    let name = fx.name();
    let test_started = now_ms();
    let shards = shards_of(fx).await;

    // An unknown shard is an error (not an empty shard, not a panic).
    let unknown = ShardId("no-such-shard".into());
    match read(fx, &unknown, &StartPosition::TrimHorizon, 10).await {
        Err(StreamError::UnknownShard(id)) => assert_eq!(id, unknown, "{name}"),
        Err(e) => panic!("{name}: reading an unknown shard failed, but not as UnknownShard: {e}"),
        Ok(b) => panic!(
            "{name}: reading an unknown shard succeeded with {} records",
            b.records.len()
        ),
    }

    // An empty stream: "nothing yet" from every start, with a position to poll from.
    let mut from_empty = HashMap::new();
    for shard in &shards {
        let mut starts = Vec::new();
        if fx.reads_from_a_time_past_the_end() {
            starts.extend([
                StartPosition::AtTimestamp(0),
                StartPosition::AtTimestamp(now_ms()),
            ]);
        }
        starts.push(StartPosition::TrimHorizon);
        for from in starts {
            let next = expect_end(fx, shard, &from).await;
            from_empty.insert(shard.clone(), next);
        }
    }

    // Records of several keys, appended by calls of several sizes.
    let mut model = Model::new(name.clone());
    for size in [25, 1, 34] {
        let records = model.records_over_keys(size);
        model.append(fx, &shards, records).await;
    }
    let mut ends = HashMap::new();
    let mut everything = Vec::new();
    for shard in &shards {
        let want = model.in_shard(shard);
        let (got, end) = read_expecting(fx, shard, &StartPosition::TrimHorizon, 7, &want).await;
        // Where the read of the empty stream said to continue: from the first record.
        read_expecting(fx, shard, &from_empty[shard], 3, &want).await;
        ends.insert(shard.clone(), end);
        everything.extend(got);
    }
    assert_eq!(everything.len(), model.sent.len(), "{name}");
    assert_key_order(&name, &model, &everything);
    for r in &everything {
        assert!(
            r.appended_at_ms >= test_started - 60_000 && r.appended_at_ms <= now_ms() + 60_000,
            "{name}: record {} has append time {}, the test started at {test_started}",
            describe(r),
            r.appended_at_ms
        );
    }

    for shard in &shards {
        let want = model.in_shard(shard);
        max_records(fx, shard, &want).await;
        start_positions(fx, shard, &want).await;
    }
    let after_all = everything
        .iter()
        .map(|r| r.appended_at_ms)
        .max()
        .unwrap_or(0)
        + 1;
    let ends = resume_at_the_end(fx, &mut model, &shards, &ends, after_all).await;
    durability(fx, &mut model, &shards, &ends, after_all).await;
}

/// `max_records` bounds every read (`read()` checks every batch); 0 reads nothing and
/// moves nowhere. `want` is everything `shard` holds.
async fn max_records<F: StreamFixture>(fx: &F, shard: &ShardId, want: &[Sent]) {
    let name = fx.name();
    let caps = fx.capabilities();
    let Some(first) = want.first() else { return };
    let batch = read_ok(fx, shard, &StartPosition::TrimHorizon, 0).await;
    assert!(
        batch.records.is_empty(),
        "{name}: shard {shard}: max_records 0 returned records"
    );
    expect_first(fx, shard, &batch.next.expect("read() checked it"), first).await;
    let batch = read_ok(fx, shard, &StartPosition::TrimHorizon, 1).await;
    assert_eq!(
        batch.records.len(),
        1,
        "{name}: shard {shard}: max_records 1"
    );
    assert_is(&name, &caps, "max_records 1", &batch.records[0], first);
    if caps.exact_records_behind {
        assert_eq!(
            batch.records_behind,
            want.len() as u64 - 1,
            "{name}: shard {shard}: records_behind after the first record"
        );
    }
}

/// Every start position, at, between, before and after the records; `want` is everything
/// `shard` holds.
async fn start_positions<F: StreamFixture>(fx: &F, shard: &ShardId, want: &[Sent]) {
    let caps = fx.capabilities();
    let (Some(first), Some(last)) = (want.first(), want.last()) else {
        return;
    };
    expect_first(fx, shard, &StartPosition::TrimHorizon, first).await;
    expect_first(fx, shard, &StartPosition::AtTimestamp(0), first).await;
    let mut picks = vec![0, 1, want.len() / 2, want.len() - 1];
    picks.retain(|&i| i < want.len());
    picks.dedup();
    for i in picks {
        let at = StartPosition::At(want[i].sequence.clone());
        expect_first(fx, shard, &at, &want[i]).await;
        let after = StartPosition::After(want[i].sequence.clone());
        match want.get(i + 1) {
            Some(next) => expect_first(fx, shard, &after, next).await,
            None => {
                expect_end(fx, shard, &after).await;
            }
        }
    }
    // Resuming from the middle reads the rest, exactly.
    let mid = want.len() / 2;
    read_expecting(
        fx,
        shard,
        &StartPosition::After(want[mid].sequence.clone()),
        4,
        &want[mid + 1..],
    )
    .await;
    if caps.any_sequence_position {
        expect_first(
            fx,
            shard,
            &StartPosition::At(SequenceNumber::new("0")),
            first,
        )
        .await;
        // A position between two records (where the numbering leaves room) reads from
        // the later one.
        if let Some(pair) = want
            .windows(2)
            .find(|p| decimal_after(&p[0].sequence) < p[1].sequence)
        {
            let between = decimal_after(&pair[0].sequence);
            expect_first(fx, shard, &StartPosition::At(between.clone()), &pair[1]).await;
            expect_first(fx, shard, &StartPosition::After(between), &pair[1]).await;
        }
        let past = decimal_after(&last.sequence);
        for s in [
            past,
            SequenceNumber::from_u64(u64::MAX - 1),
            SequenceNumber::from_u64(u64::MAX),
            SequenceNumber::new(format!("1{}", "0".repeat(40))),
        ] {
            expect_end(fx, shard, &StartPosition::At(s.clone())).await;
            expect_end(fx, shard, &StartPosition::After(s)).await;
        }
    }
}

/// The positions a reader is given at the end of what is there (`ends`: the `next` of a
/// full read of each shard; all records so far were appended before `after_all`): each
/// resumes at exactly the records appended later, however it was reached. Returns the
/// new ends.
async fn resume_at_the_end<F: StreamFixture>(
    fx: &F,
    model: &mut Model,
    shards: &[ShardId],
    ends: &HashMap<ShardId, StartPosition>,
    after_all: i64,
) -> HashMap<ShardId, StartPosition> {
    let caps = fx.capabilities();
    wait_for_clock(after_all).await;
    let mut waiting: Vec<(ShardId, StartPosition)> = Vec::new();
    for shard in shards {
        let want = model.in_shard(shard);
        // The end of a full read, and the answers to reads from past the last record.
        waiting.push((shard.clone(), ends[shard].clone()));
        let mut past_the_end = Vec::new();
        if fx.reads_from_a_time_past_the_end() {
            past_the_end.push(StartPosition::AtTimestamp(after_all));
        }
        if let Some(last) = want.last() {
            past_the_end.push(StartPosition::After(last.sequence.clone()));
            if caps.any_sequence_position {
                past_the_end.push(StartPosition::At(decimal_after(&last.sequence)));
            }
        }
        for from in past_the_end {
            let next = expect_end(fx, shard, &from).await;
            waiting.push((shard.clone(), next));
        }
    }
    let since = model.sent.len();
    let records = model.records(KEYS.iter().copied().chain(["k6"]).cycle().take(30));
    model.append(fx, shards, records).await;
    let mut new_ends = HashMap::new();
    for (shard, pos) in &waiting {
        let want = model.in_shard_since(shard, since);
        let (_, end) = read_expecting(fx, shard, pos, 4, &want).await;
        new_ends.insert(shard.clone(), end);
    }
    // A timestamp between the two appends: the second one's records, from the first.
    for shard in shards {
        let want = model.in_shard_since(shard, since);
        read_expecting(fx, shard, &StartPosition::AtTimestamp(after_all), 5, &want).await;
    }
    new_ends
}

/// A record its writer has not made durable is never read, from any position (`ends`:
/// the end of each shard; `after_all`: a time after every durable record but the last
/// append's); once durable, it is read where it belongs.
async fn durability<F: StreamFixture>(
    fx: &F,
    model: &mut Model,
    shards: &[ShardId],
    ends: &HashMap<ShardId, StartPosition>,
    after_all: i64,
) {
    let name = fx.name();
    let records = model.records_over_keys(12);
    let pending: HashSet<Bytes> = records.iter().map(|r| r.payload.clone()).collect();
    let keys_of: HashMap<Bytes, (String, usize)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.payload.clone(), (r.key.to_string(), i)))
        .collect();
    if !fx.write_without_durability(records).await {
        return;
    }
    for shard in shards {
        for from in [ends[shard].clone(), StartPosition::AtTimestamp(after_all)] {
            let batch = read_ok(fx, shard, &from, 100).await;
            if let Some(r) = batch.records.iter().find(|r| pending.contains(&r.payload)) {
                panic!(
                    "{name}: shard {shard}: a read from {from:?} returned {}, which its writer \
                     has not made durable",
                    describe(r)
                );
            }
        }
        read_expecting(fx, shard, &ends[shard], 100, &[]).await;
        read_expecting(
            fx,
            shard,
            &StartPosition::TrimHorizon,
            50,
            &model.in_shard(shard),
        )
        .await;
    }
    fx.make_durable().await;
    let mut seen = Vec::new();
    for shard in shards {
        let mut pos = ends[shard].clone();
        loop {
            let batch = read_ok(fx, shard, &pos, 5).await;
            if batch.records.is_empty() {
                break;
            }
            seen.extend(batch.records);
            pos = batch.next.expect("read() checked it");
        }
    }
    let mut report = String::new();
    for r in &seen {
        if !pending.contains(&r.payload) {
            let _ = writeln!(report, "unexpected {}", describe(r));
        }
    }
    let seen_payloads: HashSet<Bytes> = seen.iter().map(|r| r.payload.clone()).collect();
    assert!(
        report.is_empty() && seen.len() == pending.len() && seen_payloads == pending,
        "{name}: after they were made durable, {} of {} records were read: {report}",
        seen.len(),
        pending.len()
    );
    let mut last_of_key: HashMap<&str, usize> = HashMap::new();
    for r in &seen {
        let (key, i) = &keys_of[&r.payload];
        if let Some(prev) = last_of_key.insert(key, *i) {
            assert!(prev < *i, "{name}: key {key}: records out of order");
        }
    }
}

/// Reads every shard while another task appends `batches` (each a list of key numbers):
/// the reader sees every record exactly once, with no gap, in per-key order, and reads of
/// up to `read_sizes` records (cycled) never return more.
pub async fn read_while_writing<F: StreamFixture>(
    fx: Arc<F>,
    batches: Vec<Vec<u8>>,
    read_sizes: Vec<usize>,
) {
    let name = fx.name();
    let shards = shards_of(&*fx).await;
    let total: usize = batches.iter().map(Vec::len).sum();
    let writer = {
        let fx = fx.clone();
        let shards = shards.clone();
        tokio::spawn(async move {
            let mut model = Model::new(fx.name());
            for batch in batches {
                let keys: Vec<String> = batch.iter().map(|k| format!("key-{k}")).collect();
                let records = model.records(keys.iter().map(String::as_str));
                model.append(&*fx, &shards, records).await;
                tokio::task::yield_now().await;
            }
            model
        })
    };
    let mut pos: HashMap<ShardId, StartPosition> = shards
        .iter()
        .map(|s| (s.clone(), StartPosition::TrimHorizon))
        .collect();
    let mut seen: HashMap<ShardId, Vec<StoredRecord>> = HashMap::new();
    let mut count = 0;
    let mut sizes = read_sizes.iter().copied().cycle();
    let deadline = Instant::now() + READ_DEADLINE;
    while count < total {
        assert!(
            Instant::now() < deadline,
            "{name}: the reader saw {count} of {total} records"
        );
        // Once every append has returned, every record is durable: a round of reads in
        // which no shard has anything new means records are missing, not late.
        let writer_done = writer.is_finished();
        let mut progressed = false;
        for shard in &shards {
            let max = sizes.next().unwrap_or(10);
            let batch = read_ok(&*fx, shard, &pos[shard], max).await;
            let got = seen.entry(shard.clone()).or_default();
            for r in batch.records {
                if let Some(last) = got.last() {
                    assert!(
                        r.sequence > last.sequence,
                        "{name}: shard {shard}: {} came after {} (a duplicate or a step back)",
                        describe(&r),
                        describe(last)
                    );
                }
                got.push(r);
                count += 1;
                progressed = true;
            }
            pos.insert(shard.clone(), batch.next.expect("read() checked it"));
        }
        if !progressed && count < total {
            assert!(
                !writer_done,
                "{name}: every append returned and every shard reads empty, yet the reader \
                 saw only {count} of {total} records"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let model = writer.await.expect("the writer task");
    let caps = fx.capabilities();
    let mut everything = Vec::new();
    for shard in &shards {
        // Nothing more, and nothing the writer did not append.
        expect_end(&*fx, shard, &pos[shard]).await;
        let want = model.in_shard(shard);
        let got = seen.remove(shard).unwrap_or_default();
        assert_eq!(
            got.len(),
            want.len(),
            "{name}: shard {shard}: read {} records, {} were appended",
            got.len(),
            want.len()
        );
        for (g, w) in got.iter().zip(&want) {
            assert_is(&name, &caps, &format!("shard {shard}"), g, w);
        }
        everything.extend(got);
    }
    assert_key_order(&name, &model, &everything);
}

/// The writer contract, for a backend that writes through [`StreamWriter`]; `reader`
/// reads what `writer` appends. Closes the writer.
pub async fn stream_writer(name: &str, writer: &dyn StreamWriter, reader: &dyn StreamReader) {
    writer
        .check_writable()
        .await
        .unwrap_or_else(|e| panic!("{name}: a fresh stream is not writable: {e}"));
    assert!(
        writer.append(Vec::new()).await.is_empty(),
        "{name}: appending nothing"
    );

    // One outcome per record, in input order; a refused record fails alone.
    let record = |key: &str, payload: Vec<u8>| Record {
        key: key.into(),
        payload: Bytes::from(payload),
    };
    let batch = vec![
        record("k0", b"ok-0".to_vec()),
        record(&"k".repeat(257), b"key too long".to_vec()),
        record("k1", b"ok-1".to_vec()),
        record("k1", vec![b'x'; 1024 * 1024 + 1]),
        record("k2", b"ok-2".to_vec()),
    ];
    let outcomes = writer.append(batch).await;
    assert_eq!(outcomes.len(), 5, "{name}: one outcome per record");
    for i in [0, 2, 4] {
        assert!(
            outcomes[i].is_ok(),
            "{name}: record {i} failed beside refused ones: {:?}",
            outcomes[i]
        );
    }
    for i in [1, 3] {
        assert!(
            matches!(outcomes[i], Err(AppendError::Refused(_))),
            "{name}: record {i} is over a record limit, yet: {:?}",
            outcomes[i]
        );
    }

    // `append_acked` is the same append, answering only whether each record was taken.
    let acked = writer
        .append_acked(vec![
            record("k3", b"acked-0".to_vec()),
            record(&"k".repeat(257), b"key too long".to_vec()),
            record("k4", b"acked-1".to_vec()),
        ])
        .await;
    assert!(
        matches!(acked[..], [Ok(()), Err(AppendError::Refused(_)), Ok(())]),
        "{name}: append_acked: {acked:?}"
    );

    // Successive calls for one key: the second lands after the first, in the same shard.
    let a = writer.append(vec![record("same", b"first".to_vec())]).await;
    let b = writer
        .append(vec![record("same", b"second".to_vec())])
        .await;
    let (a, b) = (
        a[0].clone().expect("append first"),
        b[0].clone().expect("append second"),
    );
    assert_eq!(a.shard, b.shard, "{name}: one key, two shards");
    assert!(
        b.sequence > a.sequence,
        "{name}: the second call's record has sequence {} before the first's {}",
        b.sequence,
        a.sequence
    );

    let want: HashSet<&[u8]> = [
        &b"ok-0"[..],
        b"ok-1",
        b"ok-2",
        b"acked-0",
        b"acked-1",
        b"first",
        b"second",
    ]
    .into_iter()
    .collect();
    let got = read_back(name, reader).await;
    let got_set: HashSet<&[u8]> = got.iter().map(Vec::as_slice).collect();
    assert!(
        got.len() == want.len() && got_set == want,
        "{name}: read back {} records: {:?}",
        got.len(),
        got.iter()
            .map(|p| String::from_utf8_lossy(&p[..p.len().min(20)]).into_owned())
            .collect::<Vec<_>>()
    );

    // Close: idempotent; nothing is accepted after it; what was appended stays readable.
    writer
        .close()
        .await
        .unwrap_or_else(|e| panic!("{name}: close: {e}"));
    writer
        .close()
        .await
        .unwrap_or_else(|e| panic!("{name}: a second close: {e}"));
    assert!(
        writer.check_writable().await.is_err(),
        "{name}: writable after close"
    );
    let after = writer.append(vec![record("k0", b"late".to_vec())]).await;
    assert!(
        after.len() == 1 && after[0].is_err(),
        "{name}: an append after close: {after:?}"
    );
    let after = writer
        .append_acked(vec![record("k0", b"late".to_vec())])
        .await;
    assert!(
        after.len() == 1 && after[0].is_err(),
        "{name}: append_acked after close: {after:?}"
    );
    assert_eq!(
        read_back(name, reader).await.len(),
        want.len(),
        "{name}: after close"
    );
}

/// Every payload in every shard of `reader`, from the oldest record.
async fn read_back(name: &str, reader: &dyn StreamReader) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let shards = reader
        .shards()
        .await
        .unwrap_or_else(|e| panic!("{name}: shards: {e}"));
    for shard in shards {
        let mut pos = StartPosition::TrimHorizon;
        loop {
            let batch = reader
                .read(&shard.id, &pos, 3)
                .await
                .unwrap_or_else(|e| panic!("{name}: read: {e}"));
            if batch.records.is_empty() {
                break;
            }
            got.extend(batch.records.into_iter().map(|r| r.payload.to_vec()));
            pos = batch.next.expect("an open shard gives a next");
        }
    }
    got
}
