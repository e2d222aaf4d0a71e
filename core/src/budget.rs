//! The memory budget: what every buffer of a running `floodgate` may hold at most, computed
//! from its [`Config`] alone, one named line per component and a total.
//!
//! The binary prints it at start beside the effective configuration, so an operator sees
//! what a setting costs before the process holds it, and the pieces that hold memory take
//! their limits from the same numbers: the lake rolls a shard's buffer when it reaches
//! [`MemoryBudget::lake_buffer_share`], the state store sizes its page cache and memory map
//! from `[state]`. Past a line's bound a component sheds (the edge answers 503) or flushes
//! early (the lake); none of them grows.
//!
//! Each line is a bound, not a forecast: under steady load most buffers sit far below it.
//! Two lines rest on a stated assumption rather than on a setting, because what they hold
//! depends on the events themselves: the processors' read batches (counted at
//! [`ASSUMED_RECORD_BYTES`] a record) and the baseline (code, runtime, schemas), measured.

use std::fmt;

use crate::config::Config;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Bytes one remembered id costs the edge's dedupe window: a 128-bit hash and its time
/// (24 B) in a hash map allocated at start with room for twice the cap (so that it never
/// grows under its lock; its bucket count rounds up to a power of two: 100–105 B an id),
/// plus a time-ordered queue entry (24 B).
pub const DEDUPE_BYTES_PER_ID: u64 = 130;

/// The largest read (and write) buffer of an HTTP/1 connection (hyper's `max_buf_size`):
/// a request's headers must fit in it, and a body arrives in reads of at most this size.
/// hyper's default (about 400 KiB) let every busy connection hold that much beside the
/// body it was reading.
pub const HTTP1_BUFFER_BYTES: u64 = 32 * KIB;

/// HTTP/2 flow control: the body bytes a client may have sent on one connection, and on
/// one stream, before the edge has read them. These are the protocol's initial windows
/// (RFC 9113 §6.9.2); hyper's defaults are 1 MiB each, which a client could fill on every
/// connection, unread and uncounted.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u64 = 64 * KIB;
/// See [`HTTP2_CONNECTION_WINDOW_BYTES`].
pub const HTTP2_STREAM_WINDOW_BYTES: u64 = 64 * KIB;
/// Answer bytes an HTTP/2 stream buffers before it waits for the client (hyper's default
/// is 400 KiB; an answer is a few KiB).
pub const HTTP2_SEND_BUFFER_BYTES: u64 = 16 * KIB;

/// A connection's own state, whatever its requests: hyper's connection and the task that
/// drives it, the socket's registration, HTTP/2's header tables.
pub const CONNECTION_STATE_BYTES: u64 = 16 * KIB;

/// The most one connection holds besides its requests: its state and its buffers, the
/// larger of HTTP/1's read and write buffers and HTTP/2's receive window and send buffer.
///
/// Measured with 3,000 HTTP/1 connections to `floodgate ingest`: about 37 KiB each once
/// idle after a 20 KiB request, and 32 KiB each with a request's head read and its body
/// still to come (that is, with [`REQUEST_STATE_BYTES`] in use too).
pub const CONNECTION_BYTES: u64 = CONNECTION_STATE_BYTES
    + if 2 * HTTP1_BUFFER_BYTES > HTTP2_CONNECTION_WINDOW_BYTES + HTTP2_SEND_BUFFER_BYTES {
        2 * HTTP1_BUFFER_BYTES
    } else {
        HTTP2_CONNECTION_WINDOW_BYTES + HTTP2_SEND_BUFFER_BYTES
    };

/// Connections the operations endpoint (`/metrics`, `/healthz`, `/readyz`) serves at once:
/// `floodgate process`'s listener, and the edge's `ingest.ops_listen`. Scrapers and probes
/// need one or two; more wait in its accept queue.
pub const OPS_CONNECTIONS: u64 = 32;

/// One request's state besides its body and its events: its head and the handler's
/// future. The edge charges it to `ingest.max_inflight_body_bytes` when it admits the
/// request, so that requests waiting for their bodies, and the streams of an HTTP/2
/// connection, are bounded with the bodies.
pub const REQUEST_STATE_BYTES: u64 = 16 * KIB;

/// One event's state besides its bytes in the body: its outcome, its record, its result
/// and its part of the answer (about 400 bytes; rounded up). The edge charges it to
/// `ingest.max_inflight_body_bytes` for every event of a batch once the batch is decoded;
/// once the batch is answered, only the answer's bytes stay charged, until they are sent.
pub const EVENT_STATE_BYTES: u64 = 512;

/// What one largest request is charged at most: its body, its state and its events'.
pub fn largest_request_bytes(ingest: &crate::config::IngestConfig) -> u64 {
    ingest
        .max_body_bytes
        .saturating_add(REQUEST_STATE_BYTES)
        .saturating_add((ingest.max_batch_events as u64).saturating_mul(EVENT_STATE_BYTES))
}

/// Records per read of a shard consumer (`RuntimeConfig::max_batch_records` in the
/// processors; a test there keeps the two equal).
pub const READ_BATCH_RECORDS: u64 = 10_000;

/// Bytes a record read from a stream is counted at, with its key, sequence and bookkeeping.
/// The sample `booking.requested` is about 440 bytes; an average of 1 KiB leaves room for
/// larger events.
pub const ASSUMED_RECORD_BYTES: u64 = KIB;

/// Outbox entries the relay reads and publishes per round (`floodgate_processors::relay`).
/// An entry holds the derived events of one bookings batch: after an outage, up to about
/// one per record of a full read batch.
pub const RELAY_BATCH_ENTRIES: u64 = 8;

/// Memory of the process before any buffer fills: code, the async runtime and its threads,
/// the compiled schemas, metrics (measured at start: about 35 MB; rounded up).
pub const BASELINE_BYTES: u64 = 48 * MIB;

/// Connections the SQLite state store opens: a writer, a loader and a reader.
pub const STATE_CONNECTIONS: u64 = 3;

/// Rows parsed at once while a lake file is encoded, and what they cost at most: a
/// `serde_json::Value` tree takes several times its text (measured: about 5×), so a chunk
/// of 2,048 rows of a few hundred bytes stays within a few MiB.
pub const LAKE_ENCODE_CHUNK_ROWS: u64 = 2_048;
const LAKE_ENCODE_CHUNK_BYTES: u64 = 8 * MIB;

/// A lake file is held encoded, before it is written, beside the buffer it came from; zstd
/// Parquet of these events is 5–10× smaller than the rows (bench: `floodgate-lakebench`),
/// so a quarter of the buffers bounds it.
pub const LAKE_ENCODED_FRACTION: u64 = 4;

/// Which parts of the pipeline a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `floodgate serve`: the edge and the processors.
    Serve,
    /// `floodgate ingest`: the edge alone (it still opens the state store for reads).
    Ingest,
    /// `floodgate process`: the processors alone.
    Process,
}

impl Role {
    fn edge(self) -> bool {
        matches!(self, Role::Serve | Role::Ingest)
    }

    fn processors(self) -> bool {
        matches!(self, Role::Serve | Role::Process)
    }

    fn name(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Ingest => "ingest",
            Role::Process => "process",
        }
    }
}

/// One component's bound: its name, its bytes, and the settings that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLine {
    pub name: &'static str,
    pub bytes: u64,
    /// How the configuration arrives at `bytes`, e.g. `ingest.dedupe_max_ids × 130 B`.
    pub from: String,
}

/// Every component's bound for one process; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    pub role: Role,
    /// Every component, in the order data moves through them (zero-byte lines are left out).
    pub lines: Vec<BudgetLine>,
    /// What one lake buffer (a consumer's shard) may hold before it rolls: the lake's total
    /// split evenly over every buffer, and never more than `lake.roll_bytes`. 0 when this
    /// process writes no lake.
    pub lake_buffer_share: u64,
    /// Page cache of each of the state store's connections.
    pub state_cache_bytes: u64,
    /// Memory map of each of the state store's connections.
    pub state_mmap_bytes: u64,
}

impl MemoryBudget {
    /// The budget of `floodgate serve` (the edge and the processors) under `config`.
    pub fn from_config(config: &Config) -> Self {
        Self::for_role(config, Role::Serve)
    }

    /// The budget of a process running `role` under `config`.
    pub fn for_role(config: &Config, role: Role) -> Self {
        let mut lines = Vec::new();
        let mut line = |name: &'static str, bytes: u64, from: String| {
            if bytes > 0 {
                lines.push(BudgetLine { name, bytes, from });
            }
        };
        line(
            "baseline",
            BASELINE_BYTES,
            "code, runtime, schemas (measured)".to_owned(),
        );
        let ingest = &config.ingest;
        let stream = &config.stream.embedded;
        if role.edge() {
            line(
                "connections",
                (ingest.max_connections as u64).saturating_mul(CONNECTION_BYTES),
                format!(
                    "ingest.max_connections × {} (state and HTTP buffers)",
                    Human(CONNECTION_BYTES)
                ),
            );
            line(
                "in-flight requests",
                ingest.max_inflight_body_bytes,
                format!(
                    "ingest.max_inflight_body_bytes: bodies as read, {} a request and {EVENT_STATE_BYTES} B an event of state, answers until sent",
                    Human(REQUEST_STATE_BYTES)
                ),
            );
            let ids = if ingest.dedupe_window_ms == 0 {
                0
            } else {
                ingest.dedupe_max_ids as u64
            };
            line(
                "dedupe window",
                ids.saturating_mul(DEDUPE_BYTES_PER_ID),
                format!(
                    "ingest.dedupe_max_ids × {DEDUPE_BYTES_PER_ID} B (0 when dedupe_window_ms = 0)"
                ),
            );
            // Events waiting for their fsync, in the stream and in the quarantine (a one-shard
            // log opened with the stream's settings). They are copies of the events of bodies
            // still in flight (a request's charge is held until its records are written), so
            // never more than those either.
            line(
                "append queues",
                (2 * stream.max_queued_bytes).min(ingest.max_inflight_body_bytes),
                "2 logs × stream.embedded.max_queued_bytes, at most ingest.max_inflight_body_bytes"
                    .to_owned(),
            );
        }
        if role == Role::Process || (role.edge() && ingest.ops_listen.is_some()) {
            line(
                "operations endpoint",
                OPS_CONNECTIONS * CONNECTION_BYTES,
                format!(
                    "{OPS_CONNECTIONS} connections × {} (/metrics, /healthz, /readyz{})",
                    Human(CONNECTION_BYTES),
                    if role == Role::Process {
                        ""
                    } else {
                        " on ingest.ops_listen"
                    }
                ),
            );
        }
        let shards = u64::from(stream.shards);
        let mut lake_buffer_share = 0;
        if role.processors() {
            // Bookings and lake per stream shard; the quarantine's and the derived events'
            // lake consumers, one shard each.
            let readers = 2 * shards + 2;
            line(
                "processor read batches",
                readers * READ_BATCH_RECORDS * ASSUMED_RECORD_BYTES,
                format!(
                    "(2 × stream.embedded.shards + 2) consumers × {READ_BATCH_RECORDS} records × {ASSUMED_RECORD_BYTES} B"
                ),
            );
            if config.archive.backend != crate::config::ArchiveBackend::None {
                // Per stream shard: its read batch, the batch packed into archive records,
                // and the call being sent as the SDK encodes it (a copy of at most a
                // batch's records, base64: a call is far smaller than a batch).
                line(
                    "archive consumers",
                    shards * 3 * READ_BATCH_RECORDS * ASSUMED_RECORD_BYTES,
                    format!(
                        "stream.embedded.shards × 3 copies of {READ_BATCH_RECORDS} records × {ASSUMED_RECORD_BYTES} B (read, packed, sent)"
                    ),
                );
            }
            line(
                "relay batch",
                RELAY_BATCH_ENTRIES * READ_BATCH_RECORDS * ASSUMED_RECORD_BYTES,
                format!(
                    "{RELAY_BATCH_ENTRIES} outbox entries × {READ_BATCH_RECORDS} derived events × {ASSUMED_RECORD_BYTES} B"
                ),
            );
            if config.lake.enabled {
                let buffers = shards + 2;
                lake_buffer_share =
                    (config.lake.max_buffer_bytes / buffers).min(config.lake.roll_bytes);
                let held = lake_buffer_share * buffers;
                line(
                    "lake buffers",
                    held,
                    format!(
                        "lake.max_buffer_bytes over (stream.embedded.shards + 2) buffers, each at most lake.roll_bytes: {buffers} × {}",
                        Human(lake_buffer_share)
                    ),
                );
                line(
                    "lake encoding",
                    held / LAKE_ENCODED_FRACTION + LAKE_ENCODE_CHUNK_BYTES,
                    format!(
                        "encoded files (1/{LAKE_ENCODED_FRACTION} of the buffers) + {LAKE_ENCODE_CHUNK_ROWS} rows parsed at a time"
                    ),
                );
            }
        }
        let state = &config.state;
        line(
            "state page cache",
            STATE_CONNECTIONS * state.cache_bytes,
            format!("{STATE_CONNECTIONS} connections × state.cache_bytes"),
        );
        line(
            "state memory map",
            STATE_CONNECTIONS * state.mmap_bytes,
            format!(
                "{STATE_CONNECTIONS} connections × state.mmap_bytes (file pages, counted in RSS)"
            ),
        );
        Self {
            role,
            lines,
            lake_buffer_share,
            state_cache_bytes: state.cache_bytes,
            state_mmap_bytes: state.mmap_bytes,
        }
    }

    /// The sum of every line.
    pub fn total(&self) -> u64 {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    /// The line named `name`, in bytes (0 when there is none).
    pub fn line(&self, name: &str) -> u64 {
        self.lines
            .iter()
            .find(|l| l.name == name)
            .map_or(0, |l| l.bytes)
    }
}

/// The first line starts `memory budget (<role>): <total>`; tools (the soak run) read it.
impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        writeln!(
            f,
            "memory budget ({}): {} ({total} bytes)",
            self.role.name(),
            Human(total)
        )?;
        for l in &self.lines {
            writeln!(
                f,
                "  {:<24} {:>10}  {}",
                l.name,
                Human(l.bytes).to_string(),
                l.from
            )?;
        }
        Ok(())
    }
}

/// Bytes in binary units with one decimal: `1.5 GiB`, `64.0 MiB`, `512 B`.
#[derive(Debug, Clone, Copy)]
pub struct Human(pub u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1024 * MIB {
            write!(f, "{:.1} GiB", b / (1024 * MIB) as f64)
        } else if self.0 >= MIB {
            write!(f, "{:.1} MiB", b / MIB as f64)
        } else if self.0 >= KIB {
            write!(f, "{:.1} KiB", b / KIB as f64)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_follows_its_settings() {
        let mut c = Config::default();
        c.ingest.max_connections = 10_000;
        c.stream.embedded.shards = 4;
        c.ingest.dedupe_max_ids = 1_000_000;
        c.ingest.max_inflight_body_bytes = 100 * MIB;
        c.stream.embedded.max_queued_bytes = 50 * MIB;
        c.lake.max_buffer_bytes = 60 * MIB;
        c.lake.roll_bytes = 128 * MIB;
        c.state.cache_bytes = 8 * MIB;
        c.state.mmap_bytes = 16 * MIB;
        let b = MemoryBudget::from_config(&c);
        assert_eq!(b.line("dedupe window"), 130_000_000);
        assert_eq!(b.line("in-flight requests"), 100 * MIB);
        assert_eq!(b.line("connections"), 10_000 * CONNECTION_BYTES);
        assert_eq!(b.line("append queues"), 100 * MIB);
        assert_eq!(b.line("processor read batches"), 10 * 10_000 * 1024);
        assert_eq!(b.line("relay batch"), 8 * 10_000 * 1024);
        // 6 buffers: 4 stream shards, the quarantine's, the derived events'.
        assert_eq!(b.lake_buffer_share, 10 * MIB);
        assert_eq!(b.line("lake buffers"), 60 * MIB);
        assert_eq!(b.line("lake encoding"), 15 * MIB + 8 * MIB);
        assert_eq!(b.line("state page cache"), 24 * MIB);
        assert_eq!(b.line("state memory map"), 48 * MIB);
        assert_eq!(b.state_cache_bytes, 8 * MIB);
        let sum = BASELINE_BYTES
            + 10_000 * CONNECTION_BYTES
            + 130_000_000
            + 100 * MIB
            + 100 * MIB
            + 10 * 10_000 * 1024
            + 8 * 10_000 * 1024
            + 60 * MIB
            + 23 * MIB
            + 72 * MIB;
        assert_eq!(b.total(), sum);
        // Each setting moves its line and the total by what it adds.
        let mut more = c.clone();
        more.ingest.dedupe_max_ids = 2_000_000;
        assert_eq!(MemoryBudget::from_config(&more).total(), sum + 130_000_000);
        let mut more = c.clone();
        more.ingest.max_connections = 20_000;
        assert_eq!(
            MemoryBudget::from_config(&more).total(),
            sum + 10_000 * CONNECTION_BYTES
        );
        // Queued events are copies of in-flight ones: the smaller bound holds.
        let mut less = c.clone();
        less.ingest.max_inflight_body_bytes = 60 * MIB;
        assert_eq!(
            MemoryBudget::from_config(&less).line("append queues"),
            60 * MIB
        );
        let mut more = c.clone();
        more.stream.embedded.shards = 8;
        let b8 = MemoryBudget::from_config(&more);
        assert_eq!(b8.line("processor read batches"), 18 * 10_000 * 1024);
        assert_eq!(b8.lake_buffer_share, 6 * MIB);
        assert_eq!(b8.line("lake buffers"), 60 * MIB);
    }

    #[test]
    fn roll_bytes_caps_a_share_and_what_is_off_costs_nothing() {
        let mut c = Config::default();
        c.stream.embedded.shards = 2;
        c.lake.max_buffer_bytes = 400 * MIB;
        c.lake.roll_bytes = 10 * MIB;
        let b = MemoryBudget::from_config(&c);
        assert_eq!(b.lake_buffer_share, 10 * MIB);
        assert_eq!(b.line("lake buffers"), 40 * MIB, "4 buffers of 10 MiB");
        c.lake.enabled = false;
        c.ingest.dedupe_window_ms = 0;
        c.state.mmap_bytes = 0;
        let b = MemoryBudget::from_config(&c);
        assert_eq!(b.lake_buffer_share, 0);
        for gone in [
            "lake buffers",
            "lake encoding",
            "dedupe window",
            "state memory map",
        ] {
            assert!(b.lines.iter().all(|l| l.name != gone), "{gone}: {b}");
        }
    }

    #[test]
    fn the_archive_consumer_counts_only_when_configured() {
        let mut c = Config::default();
        c.stream.embedded.shards = 4;
        let off = MemoryBudget::from_config(&c);
        assert_eq!(off.line("archive consumers"), 0);
        c.archive.backend = crate::config::ArchiveBackend::Firehose;
        let on = MemoryBudget::from_config(&c);
        assert_eq!(on.line("archive consumers"), 4 * 3 * 10_000 * 1024);
        assert_eq!(on.total(), off.total() + 4 * 3 * 10_000 * 1024);
        let ingest = MemoryBudget::for_role(&c, Role::Ingest);
        assert_eq!(
            ingest.line("archive consumers"),
            0,
            "the edge does not archive"
        );
    }

    #[test]
    fn each_role_counts_only_what_it_runs() {
        let c = Config::default();
        let serve = MemoryBudget::for_role(&c, Role::Serve);
        let ingest = MemoryBudget::for_role(&c, Role::Ingest);
        let process = MemoryBudget::for_role(&c, Role::Process);
        assert_eq!(ingest.line("lake buffers"), 0);
        assert_eq!(ingest.line("processor read batches"), 0);
        assert_eq!(process.line("dedupe window"), 0);
        assert_eq!(process.line("in-flight requests"), 0);
        assert_eq!(process.line("connections"), 0);
        // Baseline and state are in all three; the operations endpoint is process's own
        // unless the edge is given one; everything else in exactly one of the two.
        assert_eq!(process.line("operations endpoint"), 32 * CONNECTION_BYTES);
        assert_eq!(serve.line("operations endpoint"), 0);
        let shared =
            BASELINE_BYTES + serve.line("state page cache") + serve.line("state memory map");
        assert_eq!(
            ingest.total() + process.total(),
            serve.total() + shared + process.line("operations endpoint")
        );
        let mut ops = c.clone();
        ops.ingest.ops_listen = Some(([127, 0, 0, 1], 9092).into());
        for role in [Role::Serve, Role::Ingest] {
            let with = MemoryBudget::for_role(&ops, role);
            assert_eq!(with.line("operations endpoint"), 32 * CONNECTION_BYTES);
            assert_eq!(
                with.total(),
                MemoryBudget::for_role(&c, role).total() + 32 * CONNECTION_BYTES
            );
        }
        assert_eq!(process.lake_buffer_share, serve.lake_buffer_share);
    }

    #[test]
    fn the_printed_budget_names_its_total_and_every_line() {
        let b = MemoryBudget::from_config(&Config::default());
        let text = b.to_string();
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("memory budget (serve): "), "{first}");
        assert!(
            first.ends_with(&format!("({} bytes)", b.total())),
            "{first}"
        );
        assert_eq!(text.lines().count(), 1 + b.lines.len());
        assert_eq!(Human(512).to_string(), "512 B");
        assert_eq!(Human(1536).to_string(), "1.5 KiB");
        assert_eq!(Human(64 * MIB).to_string(), "64.0 MiB");
        assert_eq!(Human(3 * 512 * MIB).to_string(), "1.5 GiB");
    }
}
