//! Typed configuration of the `floodgate` binary: one TOML file, typed sections,
//! `deny_unknown_fields`, unit suffixes in names. The CLI layers flags and `FLOODGATE_*`
//! environment variables over it (flag > environment > file > default).
//!
//! ```toml
//! data_dir = "./data"
//! [ingest]
//! listen = "127.0.0.1:8080"
//! max_body_bytes = 5242880
//! [stream]
//! backend = "embedded"
//! [stream.embedded]
//! shards = 4
//! group_commit_max_delay_us = 0
//! group_commit_linger_us = 0
//! compression = "zstd"      # or "lz4" (less CPU, 2.4x the bytes), or "none"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded backends keep their files (`stream/`, …).
    pub data_dir: PathBuf,
    /// A directory of `<type>/v<N>.json` schemas replacing the built-in ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schemas_dir: Option<PathBuf>,
    pub ingest: IngestConfig,
    pub stream: StreamConfig,
    pub lake: LakeConfig,
    pub state: StateConfig,
    pub publish: PublishConfig,
    /// `[archive]`: a raw copy of every accepted event (none by default).
    pub archive: ArchiveConfig,
    /// `[aws]`: shared by every AWS client; only read when a section names an AWS backend.
    pub aws: AwsConfig,
    /// `[coordination]`: where consumers keep their leases and checkpoints.
    pub coordination: CoordinationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            schemas_dir: None,
            ingest: IngestConfig::default(),
            stream: StreamConfig::default(),
            lake: LakeConfig::default(),
            state: StateConfig::default(),
            publish: PublishConfig::default(),
            archive: ArchiveConfig::default(),
            aws: AwsConfig::default(),
            coordination: CoordinationConfig::default(),
        }
    }
}

/// `[aws]`: the region and (for emulators) the endpoint of every AWS client. Credentials
/// come from the standard chain (environment, profile, instance or task role).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// `None`: the standard chain's region (`AWS_REGION`, the profile), else `us-east-1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Every AWS client's endpoint (an emulator); `None` is real AWS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinationBackend {
    /// Lease and checkpoint files (with flock) beside the embedded log.
    #[default]
    Embedded,
    /// A DynamoDB lease table with KCL 2.x attribute names.
    Dynamodb,
}

/// `[coordination]`: consumers' leases and checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinationConfig {
    pub backend: CoordinationBackend,
    /// The DynamoDB lease table (one per application; consumers share it by key prefix).
    pub table_name: String,
    /// Overrides `[aws].endpoint_url` for DynamoDB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// A lease not renewed for this long is taken by another worker; held leases are
    /// renewed every third of it.
    pub lease_duration_ms: u64,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        Self {
            backend: CoordinationBackend::Embedded,
            table_name: "floodgate-leases".to_owned(),
            endpoint_url: None,
            lease_duration_ms: 10_000,
        }
    }
}

/// `[publish]`: where the relay publishes derived events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    pub backend: PublishBackend,
    /// The EventBridge bus (`backend = "eventbridge"`).
    pub event_bus_name: String,
    /// Overrides `[aws].endpoint_url` for EventBridge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    pub outbox: OutboxConfig,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            backend: PublishBackend::Outbox,
            event_bus_name: "floodgate".to_owned(),
            endpoint_url: None,
            outbox: OutboxConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishBackend {
    /// The derived-event log under `<data_dir>/outbox/` (`[publish.outbox]`).
    #[default]
    Outbox,
    /// PutEvents to an EventBridge bus.
    Eventbridge,
}

/// `[archive]`: where the archive consumer puts a raw copy of every accepted event, as
/// NDJSON (the producers' CloudEvents, one a line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    pub backend: ArchiveBackend,
    /// The Firehose delivery stream (`backend = "firehose"`). Floodgate does not create
    /// it: it needs a destination (an S3 bucket and a role), which the deployment makes.
    pub delivery_stream_name: String,
    /// Overrides `[aws].endpoint_url` for Firehose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            backend: ArchiveBackend::None,
            delivery_stream_name: "floodgate-raw".to_owned(),
            endpoint_url: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveBackend {
    /// No archive: the stream's retention and the lake are the only copies.
    #[default]
    None,
    /// `PutRecordBatch` to a Firehose delivery stream (which delivers to S3).
    Firehose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LakeStore {
    /// `<data_dir>/lake`.
    #[default]
    Local,
    /// An S3 bucket, under `[lake].prefix`.
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    /// SQLite under `<data_dir>/state/`.
    #[default]
    Sqlite,
    /// One DynamoDB table (see `floodgate_aws::state`).
    Dynamodb,
}

/// `[publish.outbox]`: the embedded derived-event log under `<data_dir>/outbox/log/`, a
/// one-shard log like the stream (segmented, zstd-compressed, fsynced before the relay
/// moves on).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The active segment rolls to a new file past this size.
    pub segment_bytes: u64,
    /// Size above which the oldest segments are deleted, but only segments every consumer
    /// of the log (the derived events' lake tables) has checkpointed past. With no
    /// consumer (the lake off) nothing is deleted. 0 keeps everything.
    pub retention_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 8 * MIB,
            retention_bytes: 64 * MIB,
        }
    }
}

/// `[state]`: the bookings state store (SQLite under `<data_dir>/state/`). Its memory is
/// part of the budget ([`crate::budget`]); each of its connections gets these.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackend,
    /// The DynamoDB state table (`backend = "dynamodb"`).
    pub table_name: String,
    /// Overrides `[aws].endpoint_url` for the state table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Page cache of each connection (SQLite `cache_size`), in bytes.
    pub cache_bytes: u64,
    /// Memory map of each connection (SQLite `mmap_size`), in bytes: pages of the database
    /// file read without a copy, counted in the process's RSS. 0: no map.
    pub mmap_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: StateBackend::Sqlite,
            table_name: "floodgate-state".to_owned(),
            endpoint_url: None,
            cache_bytes: 32 * MIB,
            mmap_bytes: 64 * MIB,
        }
    }
}

/// `[lake]`: the Parquet lake under `<data_dir>/lake/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// Whether the processors write the lake.
    pub enabled: bool,
    /// Where the lake's files go.
    pub store: LakeStore,
    /// The S3 bucket (`store = "s3"`).
    pub bucket: String,
    /// The key prefix of the lake in the bucket (`lake/`).
    pub prefix: String,
    /// Overrides `[aws].endpoint_url` for S3; with an endpoint, requests use path-style
    /// URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// A shard's buffer becomes files once it holds this many bytes (the events' text
    /// and the lake's bookkeeping, as held in memory)…
    pub roll_bytes: u64,
    /// …or is this old.
    pub roll_age_ms: u64,
    /// Memory all lake buffers may hold together, split evenly over the buffers (one per
    /// stream shard, one for the quarantine, one for derived events): a buffer rolls early
    /// when it reaches its share. See [`crate::budget`].
    pub max_buffer_bytes: u64,
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: LakeStore::Local,
            bucket: "floodgate-lake".to_owned(),
            prefix: "lake/".to_owned(),
            endpoint_url: None,
            roll_bytes: 128 * MIB,
            roll_age_ms: 60_000,
            max_buffer_bytes: 128 * MIB,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// A second listener for operations only: `/metrics`, `/healthz` and `/readyz`, a few
    /// connections of its own (`budget::OPS_CONNECTIONS`), no credentials. Scrapes and
    /// probes then answer while `listen` is at `max_connections` and its accept queue is
    /// full. The edge's own listener serves those routes too. Unset: no second listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_listen: Option<SocketAddr>,
    /// Largest request body, after decompression.
    pub max_body_bytes: u64,
    /// Largest number of events in one request.
    pub max_batch_events: usize,
    /// How long a graceful shutdown waits for in-flight requests before it gives up.
    pub shutdown_grace_ms: u64,
    /// How long a client may take to send a request's headers (against slowloris).
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body.
    pub body_timeout_ms: u64,
    /// How long one request may take from its headers to its answer.
    pub request_timeout_ms: u64,
    /// Connections served at once; more wait in the kernel's accept queue. Each costs the
    /// memory budget `budget::CONNECTION_BYTES`.
    pub max_connections: usize,
    /// A connection with no request in flight and no bytes moving for this long is closed
    /// (HTTP/1 keep-alive, HTTP/2, and a connection that never sends a request), so idle
    /// connections cannot hold every one of `max_connections`.
    pub idle_timeout_ms: u64,
    /// An event whose (source, id) was accepted this recently is answered as a duplicate
    /// and not appended again. 0 turns dedupe off.
    pub dedupe_window_ms: u64,
    /// Ids remembered for dedupe at most (~130 MB per million, allocated at start).
    pub dedupe_max_ids: usize,
    /// `Retry-After` sent with 503 when the stream cannot take a batch.
    pub retry_after_secs: u64,
    /// Requests held in memory at once, in bytes, across all connections: each body charged
    /// by the memory it takes as it arrives (a compressed body also as it inflates), each
    /// request's and each event's state (`budget::REQUEST_STATE_BYTES`,
    /// `budget::EVENT_STATE_BYTES`), and each answer until it is sent. A request that would
    /// pass it is answered 503 with `Retry-After`.
    pub max_inflight_body_bytes: u64,
    /// When the processors in this process are more than this many records behind the
    /// stream's head on any shard, new events are answered 503 with `Retry-After`.
    /// 0: no bound.
    pub max_consumer_lag_records: u64,
    /// The same in time, for streams that report their consumers' lag in time (Kinesis'
    /// `MillisBehindLatest`): more than this behind, new events are answered 503. 0: no
    /// bound.
    pub max_consumer_lag_ms: u64,
    /// In `serve`, the processors run on threads of their own, this much nicer (lower
    /// priority, 0-19; the sum capped at 19) than the edge's (Linux): when both want the
    /// cores, the edge's requests run first, and the processors take what the edge leaves.
    /// 0: equal shares.
    pub consumer_nice: u8,
    pub auth: AuthConfig,
}

/// `[ingest.auth]`: who may post, which types, how fast.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether every request to a protected route needs a credential. Unset: required
    /// unless the edge listens on a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// API keys, by the SHA-256 of their secret (`floodgate keys new` makes one).
    pub api_keys: Vec<ApiKeyConfig>,
    /// Bearer JWTs (Cognito-style), checked against a JWKS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
}

impl AuthConfig {
    /// Whether credentials are required when listening on `listen`.
    pub fn is_required(&self, listen: &SocketAddr) -> bool {
        self.required.unwrap_or(!listen.ip().is_loopback())
    }

    /// Whether any credential is configured at all.
    pub fn has_credentials(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt.is_some()
    }
}

/// One `[[ingest.auth.api_keys]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in metrics and logs instead of the key.
    pub name: String,
    /// Lowercase hex of SHA-256(secret). The secret itself is never stored.
    pub key_sha256: String,
    /// Event types this key may post, as globs (`booking.*`). Default: every type.
    #[serde(default = "all_types")]
    pub allowed_types: Vec<String>,
    /// Events per second, sustained. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<u32>,
    /// Events that may arrive at once above the sustained rate. Default: 2 s worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// `[ingest.auth.jwt]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS document (`{"keys":[…]}`), re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// An `http://` JWKS address, fetched at start and refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// How often the JWKS is re-read.
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of, when the token carries several).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Event types any token may post, as globs. Default: every type.
    #[serde(default = "all_types")]
    pub allowed_types: Vec<String>,
    /// Events per second per subject (`sub`), sustained. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<u32>,
    /// Burst per subject. Default: 2 s worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

fn all_types() -> Vec<String> {
    vec!["*".to_owned()]
}

fn default_jwks_refresh_secs() -> u64 {
    300
}

fn default_leeway_secs() -> u64 {
    60
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            max_body_bytes: 5 * MIB,
            max_batch_events: 500,
            shutdown_grace_ms: 30_000,
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            request_timeout_ms: 60_000,
            max_connections: 10_000,
            idle_timeout_ms: 60_000,
            dedupe_window_ms: 600_000,
            dedupe_max_ids: 2_000_000,
            retry_after_secs: 1,
            max_inflight_body_bytes: 512 * MIB,
            max_consumer_lag_records: 2_000_000,
            max_consumer_lag_ms: 300_000,
            consumer_nice: 10,
            auth: AuthConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamBackend {
    /// The on-disk sharded log under `<data_dir>/stream/`.
    #[default]
    Embedded,
    /// Kinesis Data Streams (`[stream.kinesis]`).
    Kinesis,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub backend: StreamBackend,
    pub embedded: EmbeddedStreamConfig,
    pub kinesis: KinesisStreamConfig,
}

/// `[stream.kinesis]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisStreamConfig {
    pub stream_name: String,
    /// Overrides `[aws].endpoint_url` for Kinesis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Shards of the stream `floodgate aws init` creates (an existing stream keeps its own).
    pub shards: u32,
    /// KPL-format aggregation of many events into one Kinesis record.
    pub aggregation: bool,
    /// The one-shard stream of the events the edge rejects (and of unreadable bodies),
    /// which the workers write to the lake's `quarantine` table: an edge on Kinesis has no
    /// durable disk of its own. Default: `<stream_name>-quarantine`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_stream_name: Option<String>,
}

impl KinesisStreamConfig {
    /// The quarantine stream's name (see [`KinesisStreamConfig::quarantine_stream_name`]).
    pub fn quarantine_stream(&self) -> String {
        self.quarantine_stream_name
            .clone()
            .unwrap_or_else(|| format!("{}-quarantine", self.stream_name))
    }
}

impl Default for KinesisStreamConfig {
    fn default() -> Self {
        Self {
            stream_name: "floodgate-events".to_owned(),
            endpoint_url: None,
            shards: 4,
            aggregation: true,
            quarantine_stream_name: None,
        }
    }
}

/// Compression of the log's record batches. A group commit's frame holds a shard's part of
/// one group, about 25 records at 200,000 events/s on 4 shards; on frames that small zstd
/// (level 1) costs 0.43 µs an event to compress and 0.23 to decompress (for each
/// consumer), lz4 0.16 and 0.05 (bench: `codec/*_25`), but zstd leaves 2.4 times fewer
/// bytes (27 against 65 an event, from ~400). zstd is the default: with lz4 `ingest` spends
/// 4.5 % less CPU an event, but `serve` at saturation took 5 % fewer events a second
/// (bench/results/performance-2026-12-03-pass7.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    #[default]
    Zstd,
    Lz4,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedStreamConfig {
    /// Number of shards. Fixed when the log is created; a different value on restart is
    /// refused, because it would move keys to other shards.
    pub shards: u32,
    /// A shard's active segment rolls to a new file past this size.
    pub segment_bytes: u64,
    /// Per-shard size above which the oldest segments are deleted, but only segments every
    /// consumer has checkpointed past. 0 keeps everything.
    pub retention_bytes: u64,
    /// After the first waiting append, wait up to this long for more before writing and
    /// fsyncing the group, whether or not any other append is in progress. 0: write at
    /// once (but see `group_commit_linger_us`); appends that arrive during an fsync still
    /// share the next one.
    pub group_commit_max_delay_us: u64,
    /// While the edge is busy (at least 16 requests in progress), wait up to this long for
    /// more appends before writing and fsyncing a group: fewer, larger fsyncs under load,
    /// and the CPU each fsync costs goes to the edge instead. A group stops waiting soon
    /// after the edge quietens, so a few producers' appends are never held. 0 (the
    /// default): never; the appends that arrive during one group's fsync make the next.
    /// Lingering pays only where the edge is short of CPU: with the edge's check at
    /// 1.4 µs an event, 2 ms of it halved `ingest`'s closed-loop throughput (32 producers)
    /// and saved `serve` nothing measurable.
    pub group_commit_linger_us: u64,
    /// Upper bound on the bytes written per fsync group.
    pub group_commit_max_bytes: u64,
    /// Compression of record batches on disk.
    pub compression: Compression,
    /// Appends waiting for their fsync, in bytes, above which new appends are refused
    /// (and the edge answers 503) instead of growing memory.
    pub max_queued_bytes: u64,
}

impl Default for EmbeddedStreamConfig {
    fn default() -> Self {
        Self {
            shards: 4,
            segment_bytes: 128 * MIB,
            retention_bytes: 0,
            group_commit_max_delay_us: 0,
            group_commit_linger_us: 0,
            group_commit_max_bytes: 16 * MIB,
            compression: Compression::Zstd,
            max_queued_bytes: 256 * MIB,
        }
    }
}

/// A configuration value that makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Parses a TOML document; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml_de(text)
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = |m: &str| Err(ConfigError(m.to_owned()));
        let s = &self.stream.embedded;
        if !(1..=1024).contains(&s.shards) {
            return e("stream.embedded.shards must be between 1 and 1024");
        }
        if self.ingest.consumer_nice > 19 {
            return e("ingest.consumer_nice must be between 0 and 19");
        }
        if self.stream.backend == StreamBackend::Kinesis {
            let k = &self.stream.kinesis;
            if k.stream_name.is_empty() {
                return e("stream.kinesis.stream_name must not be empty");
            }
            if !(1..=10_000).contains(&k.shards) {
                return e("stream.kinesis.shards must be between 1 and 10000");
            }
            let q = k.quarantine_stream();
            if q.is_empty() || q == k.stream_name {
                return e(
                    "stream.kinesis.quarantine_stream_name must name a stream of its own, not \
                     stream_name",
                );
            }
        }
        if self.coordination.backend == CoordinationBackend::Dynamodb {
            if self.coordination.table_name.is_empty() {
                return e("coordination.table_name must not be empty");
            }
            if self.coordination.lease_duration_ms < 1000 {
                return e("coordination.lease_duration_ms must be at least 1000");
            }
        }
        if self.state.backend == StateBackend::Dynamodb {
            if self.state.table_name.is_empty() {
                return e("state.table_name must not be empty");
            }
            if self.publish.backend == PublishBackend::Outbox {
                // The outbox log publishes one outbox partition; DynamoDB keeps one per
                // shard (floodgate_core::state::StateStore::outbox_after).
                return e(
                    "state.backend = \"dynamodb\" needs publish.backend = \"eventbridge\": \
                     the local outbox log publishes only SQLite's outbox",
                );
            }
        }
        if self.lake.store == LakeStore::S3 && self.lake.bucket.is_empty() {
            return e("lake.bucket must not be empty");
        }
        if self.publish.backend == PublishBackend::Eventbridge
            && self.publish.event_bus_name.is_empty()
        {
            return e("publish.event_bus_name must not be empty");
        }
        if self.archive.backend == ArchiveBackend::Firehose
            && self.archive.delivery_stream_name.is_empty()
        {
            return e("archive.delivery_stream_name must not be empty");
        }
        if s.segment_bytes < 4096 {
            return e("stream.embedded.segment_bytes must be at least 4096");
        }
        if self.publish.outbox.segment_bytes < 4096 {
            return e("publish.outbox.segment_bytes must be at least 4096");
        }
        if s.group_commit_max_bytes < 64 * 1024 {
            return e("stream.embedded.group_commit_max_bytes must be at least 65536");
        }
        if s.max_queued_bytes < self.ingest.max_body_bytes {
            return e("stream.embedded.max_queued_bytes must be at least ingest.max_body_bytes");
        }
        if self.ingest.dedupe_max_ids > 1_000_000_000 {
            // Its map is allocated for the cap at start (~130 B an id).
            return e("ingest.dedupe_max_ids must be at most 1000000000");
        }
        if self.ingest.max_body_bytes < 1024 {
            return e("ingest.max_body_bytes must be at least 1024");
        }
        if self.ingest.max_connections == 0 {
            return e("ingest.max_connections must be at least 1");
        }
        if let Some(ops) = self.ingest.ops_listen
            && ops.port() != 0
            && ops == self.ingest.listen
        {
            return e("ingest.ops_listen must differ from ingest.listen");
        }
        if self.ingest.header_read_timeout_ms == 0
            || self.ingest.body_timeout_ms == 0
            || self.ingest.request_timeout_ms == 0
        {
            return e("ingest timeouts must be at least 1 ms");
        }
        if self.ingest.idle_timeout_ms == 0 {
            return e("ingest.idle_timeout_ms must be at least 1");
        }
        if self.ingest.max_batch_events == 0 {
            return e("ingest.max_batch_events must be at least 1");
        }
        if self.lake.max_buffer_bytes < MIB {
            return e("lake.max_buffer_bytes must be at least 1048576");
        }
        // One largest request must fit, or it would be answered 503 forever.
        let largest = crate::budget::largest_request_bytes(&self.ingest);
        if self.ingest.max_inflight_body_bytes < largest {
            return e(&format!(
                "ingest.max_inflight_body_bytes must be at least {largest}: one largest request \
                 (ingest.max_body_bytes, {} of its state and {} B for each of \
                 ingest.max_batch_events)",
                crate::budget::REQUEST_STATE_BYTES,
                crate::budget::EVENT_STATE_BYTES
            ));
        }
        let auth = &self.ingest.auth;
        let mut names = std::collections::HashSet::new();
        for k in &auth.api_keys {
            let where_ = format!("ingest.auth.api_keys[name = {:?}]", k.name);
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return Err(ConfigError(format!(
                    "{where_}: every API key needs a distinct, non-empty name"
                )));
            }
            if k.key_sha256.len() != 64 || !k.key_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError(format!(
                    "{where_}.key_sha256 must be 64 hex digits (the SHA-256 of the secret, not the secret)"
                )));
            }
            check_rate(&where_, k.rate_per_sec, k.burst)?;
            check_globs(&where_, &k.allowed_types)?;
        }
        if let Some(j) = &auth.jwt {
            if j.jwks_file.is_some() == j.jwks_url.is_some() {
                return e("ingest.auth.jwt needs exactly one of jwks_file and jwks_url");
            }
            if j.jwks_url
                .as_deref()
                .is_some_and(|u| !u.starts_with("http://"))
            {
                return e(
                    "ingest.auth.jwt.jwks_url must be an http:// address (https is not built in; use jwks_file with a fetched copy)",
                );
            }
            if j.issuer.is_empty() || j.audience.is_empty() {
                return e("ingest.auth.jwt needs a non-empty issuer and audience");
            }
            check_rate("ingest.auth.jwt", j.rate_per_sec, j.burst)?;
            check_globs("ingest.auth.jwt", &j.allowed_types)?;
        }
        Ok(())
    }
}

fn check_rate(where_: &str, rate: Option<u32>, burst: Option<u32>) -> Result<(), ConfigError> {
    if rate == Some(0) {
        return Err(ConfigError(format!(
            "{where_}.rate_per_sec must be at least 1 (leave it out for no limit)"
        )));
    }
    if burst == Some(0) || (burst.is_some() && rate.is_none()) {
        return Err(ConfigError(format!(
            "{where_}.burst must be at least 1, and needs rate_per_sec"
        )));
    }
    Ok(())
}

fn check_globs(where_: &str, globs: &[String]) -> Result<(), ConfigError> {
    if globs.is_empty() {
        return Err(ConfigError(format!(
            "{where_}.allowed_types is empty: such a credential could post nothing"
        )));
    }
    Ok(())
}

// Parsing text is not I/O; keeping the format beside the types keeps them honest.
fn toml_de(text: &str) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.stream.embedded.shards, 4);
        assert_eq!(c.ingest.max_body_bytes, 5 * MIB);
        c.validate().unwrap();
        let c = Config::from_toml("[stream.embedded]\nshards = 8\ncompression = \"none\"").unwrap();
        assert_eq!(c.stream.embedded.shards, 8);
        assert_eq!(c.stream.embedded.compression, Compression::None);
    }

    #[test]
    fn idle_timeout_is_read_and_checked() {
        assert_eq!(Config::default().ingest.idle_timeout_ms, 60_000);
        let c = Config::from_toml("[ingest]\nidle_timeout_ms = 1500").unwrap();
        assert_eq!(c.ingest.idle_timeout_ms, 1500);
        c.validate().unwrap();
        let c = Config::from_toml("[ingest]\nidle_timeout_ms = 0").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("idle_timeout_ms"), "{e}");
    }

    #[test]
    fn ops_listen_is_optional_and_apart_from_listen() {
        assert_eq!(Config::default().ingest.ops_listen, None);
        let c = Config::from_toml("[ingest]\nops_listen = \"127.0.0.1:9092\"").unwrap();
        assert_eq!(c.ingest.ops_listen, Some("127.0.0.1:9092".parse().unwrap()));
        c.validate().unwrap();
        assert!(
            toml::to_string(&c)
                .unwrap()
                .contains("ops_listen = \"127.0.0.1:9092\"")
        );
        let c = Config::from_toml("[ingest]\nops_listen = \"127.0.0.1:8080\"").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("ops_listen"), "{e}");
        // Two ephemeral ports are two ports.
        let c =
            Config::from_toml("[ingest]\nlisten = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"")
                .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn consumer_nice_is_read_and_checked() {
        assert_eq!(Config::default().ingest.consumer_nice, 10);
        let c = Config::from_toml("[ingest]\nconsumer_nice = 19").unwrap();
        assert_eq!(c.ingest.consumer_nice, 19);
        c.validate().unwrap();
        let c = Config::from_toml("[ingest]\nconsumer_nice = 20").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("consumer_nice"), "{e}");
    }

    #[test]
    fn the_example_file_is_every_default() {
        let example = include_str!("../../deploy/floodgate.example.toml");
        let parsed = Config::from_toml(example).unwrap();
        assert_eq!(
            toml::to_string(&parsed).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
    }

    #[test]
    fn the_quarantine_stream_is_named_after_the_events_and_never_is_them() {
        let kinesis = "[stream]\nbackend = \"kinesis\"\n[stream.kinesis]\nstream_name = \"ev\"\n";
        let c = Config::from_toml(kinesis).unwrap();
        assert_eq!(c.stream.kinesis.quarantine_stream(), "ev-quarantine");
        c.validate().unwrap();
        let c = Config::from_toml(&format!("{kinesis}quarantine_stream_name = \"held\"")).unwrap();
        assert_eq!(c.stream.kinesis.quarantine_stream(), "held");
        let c = Config::from_toml(&format!("{kinesis}quarantine_stream_name = \"ev\"")).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("quarantine_stream_name"), "{e}");
    }

    #[test]
    fn archive_is_off_unless_named_and_needs_a_stream_name() {
        let c = Config::default();
        assert_eq!(c.archive.backend, ArchiveBackend::None);
        let c = Config::from_toml(
            "[archive]\nbackend = \"firehose\"\ndelivery_stream_name = \"raw\"\n\
             endpoint_url = \"http://127.0.0.1:4566\"",
        )
        .unwrap();
        assert_eq!(c.archive.backend, ArchiveBackend::Firehose);
        assert_eq!(c.archive.delivery_stream_name, "raw");
        assert_eq!(
            c.archive.endpoint_url.as_deref(),
            Some("http://127.0.0.1:4566")
        );
        c.validate().unwrap();
        let c = Config::from_toml("[archive]\nbackend = \"firehose\"").unwrap();
        assert_eq!(c.archive.delivery_stream_name, "floodgate-raw");
        c.validate().unwrap();
        let c = Config::from_toml("[archive]\nbackend = \"firehose\"\ndelivery_stream_name = \"\"")
            .unwrap();
        let e = c.validate().unwrap_err();
        assert!(
            e.to_string().contains("archive.delivery_stream_name"),
            "{e}"
        );
        // The name alone is not checked while no archive is configured.
        let c = Config::from_toml("[archive]\ndelivery_stream_name = \"\"").unwrap();
        c.validate().unwrap();
        assert!(Config::from_toml("[archive]\nbackend = \"kinesis\"").is_err());
        assert!(Config::from_toml("[archive]\nstream = \"x\"").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::from_toml("[ingest]\nlisten_addr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        assert!(Config::from_toml("[stream]\nbackend = \"nope\"").is_err());
    }
}
