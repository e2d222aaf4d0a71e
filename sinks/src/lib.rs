//! `floodgate-sinks`: the backends behind the role traits of `floodgate-core`.
//!
//! - [`EmbeddedLog`] — the default stream: a sharded, append-only, CRC-checked on-disk log
//!   with group commit. It is both the edge's [`StreamWriter`] and the processors'
//!   [`StreamReader`].
//! - [`EmbeddedCheckpoints`] — consumers' checkpoints, in files beside the log; the log's
//!   retention reads them so that it never deletes what a consumer still needs.
//!
//! Later backends (Kinesis, DynamoDB, SQLite, S3, …) sit beside these and pass the same
//! conformance suites.
//!
//! [`StreamWriter`]: floodgate_core::stream::StreamWriter
//! [`StreamReader`]: floodgate_core::stream::StreamReader

mod checkpoint;
mod embedded_log;

pub use checkpoint::EmbeddedCheckpoints;
pub use embedded_log::{EmbeddedLog, EmbeddedLogReader, LogMeta};
