//! `floodgate-sinks`: the backends behind the role traits of `floodgate-core`.
//!
//! - [`EmbeddedLog`] — the default stream: a sharded, append-only, CRC-checked on-disk log
//!   with group commit. It is both the edge's [`StreamWriter`] and the processors'
//!   [`StreamReader`].
//! - [`EmbeddedCheckpoints`] — consumers' checkpoints, in files beside the log; the log's
//!   retention reads them so that it never deletes what a consumer still needs.
//!
//! - [`SqliteStateStore`] — bookings and capacity state, one transaction per batch with
//!   the shard position and the transactional outbox.
//! - [`EmbeddedOutbox`] — the embedded publisher of derived events: a one-shard log in the
//!   stream's format, with retention bounded by its consumers' checkpoints.
//! - [`LocalDirStore`] — the lake's object store on a local directory.
//! - [`backup`] — `floodgate backup` and `restore`: a consistent copy of the embedded
//!   deployment's data directory beside a running server, and its checked restore.
//! - [`failpoint`] — test-only fault injection on the durability path (feature `failpoints`).
//!
//! Later backends (Kinesis, DynamoDB, SQLite, S3, …) sit beside these and pass the same
//! conformance suites.
//!
//! [`StreamWriter`]: floodgate_core::stream::StreamWriter
//! [`StreamReader`]: floodgate_core::stream::StreamReader

pub mod backup;
mod checkpoint;
mod embedded_log;
pub mod failpoint;
mod local_store;
pub mod outbox;
mod sqlite_state;

pub use checkpoint::EmbeddedCheckpoints;
pub use embedded_log::frame as log_frame;
pub use embedded_log::journal as log_journal;
pub use embedded_log::verify as log_verify;
pub use embedded_log::{EmbeddedLog, EmbeddedLogReader, LINGER_MIN_IN_PROGRESS, LogMeta};
pub use local_store::LocalDirStore;
pub use outbox::EmbeddedOutbox;
pub use sqlite_state::SqliteStateStore;
