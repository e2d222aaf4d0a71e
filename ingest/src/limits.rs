//! [`Limits`]: the edge's bounds on requests, from `[ingest]`.

use std::time::Duration;

use floodgate_core::config::IngestConfig;

/// Limits of the edge, from `[ingest]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_batch_events: usize,
    pub retry_after_secs: u64,
    /// Longest time a request may take to send its body.
    pub body_timeout: Duration,
    /// Longest time from a request's headers to its answer.
    pub request_timeout: Duration,
    /// Producer retries of an event accepted this recently are answered as duplicates;
    /// 0 turns dedupe off.
    pub dedupe_window_ms: u64,
    /// At most this many ids are remembered for dedupe.
    pub dedupe_max_ids: usize,
    /// Request bodies held in memory at once, in bytes.
    pub max_inflight_body_bytes: u64,
    /// Consumers this many records behind on a shard make the edge answer 503; 0: no bound.
    pub max_consumer_lag_records: u64,
    pub max_consumer_lag_ms: u64,
}

impl Limits {
    pub fn from_config(cfg: &IngestConfig) -> Self {
        Self {
            max_body_bytes: cfg.max_body_bytes,
            max_batch_events: cfg.max_batch_events,
            retry_after_secs: cfg.retry_after_secs.max(1),
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            dedupe_window_ms: cfg.dedupe_window_ms,
            dedupe_max_ids: cfg.dedupe_max_ids,
            max_inflight_body_bytes: cfg.max_inflight_body_bytes,
            max_consumer_lag_records: cfg.max_consumer_lag_records,
            max_consumer_lag_ms: cfg.max_consumer_lag_ms,
        }
    }
}
