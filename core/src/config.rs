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
//! compression = "zstd"      # or "none"
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            schemas_dir: None,
            ingest: IngestConfig::default(),
            stream: StreamConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
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
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// An event whose (source, id) was accepted this recently is answered as a duplicate
    /// and not appended again. 0 turns dedupe off.
    pub dedupe_window_ms: u64,
    /// Ids remembered for dedupe at most (~105 MB per million).
    pub dedupe_max_ids: usize,
    /// `Retry-After` sent with 503 when the stream cannot take a batch.
    pub retry_after_secs: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 5 * MIB,
            max_batch_events: 500,
            shutdown_grace_ms: 30_000,
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            request_timeout_ms: 60_000,
            max_connections: 10_000,
            dedupe_window_ms: 600_000,
            dedupe_max_ids: 2_000_000,
            retry_after_secs: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamBackend {
    /// The on-disk sharded log under `<data_dir>/stream/`.
    #[default]
    Embedded,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub backend: StreamBackend,
    pub embedded: EmbeddedStreamConfig,
}

/// Compression of the log's record batches. zstd is the default: at the edge's load it
/// costs less CPU than the write and fsync work it saves (bench: `log`, loadgen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    #[default]
    Zstd,
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
    /// fsyncing the group. 0: write at once; appends that arrive during an fsync still
    /// share the next one.
    pub group_commit_max_delay_us: u64,
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
        if s.segment_bytes < 4096 {
            return e("stream.embedded.segment_bytes must be at least 4096");
        }
        if s.group_commit_max_bytes < 64 * 1024 {
            return e("stream.embedded.group_commit_max_bytes must be at least 65536");
        }
        if s.max_queued_bytes < self.ingest.max_body_bytes {
            return e("stream.embedded.max_queued_bytes must be at least ingest.max_body_bytes");
        }
        if self.ingest.max_body_bytes < 1024 {
            return e("ingest.max_body_bytes must be at least 1024");
        }
        if self.ingest.max_connections == 0 {
            return e("ingest.max_connections must be at least 1");
        }
        if self.ingest.header_read_timeout_ms == 0
            || self.ingest.body_timeout_ms == 0
            || self.ingest.request_timeout_ms == 0
        {
            return e("ingest timeouts must be at least 1 ms");
        }
        if self.ingest.max_batch_events == 0 {
            return e("ingest.max_batch_events must be at least 1");
        }
        Ok(())
    }
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
    fn the_example_file_is_every_default() {
        let example = include_str!("../../deploy/floodgate.example.toml");
        let parsed = Config::from_toml(example).unwrap();
        assert_eq!(
            toml::to_string(&parsed).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::from_toml("[ingest]\nlisten_addr = \"x\"").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        assert!(Config::from_toml("[stream]\nbackend = \"nope\"").is_err());
    }
}
