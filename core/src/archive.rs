//! The archive role: a raw copy of every accepted event, kept outside the stream (whose
//! retention is a day or a week) and outside the lake (which keeps typed rows, not the
//! producer's bytes). Firehose delivering to S3 fills it on AWS
//! (`floodgate_aws::firehose::FirehoseArchive`); the archive consumer
//! (`floodgate_processors::archive`) feeds it from the stream.
//!
//! The consumer packs events into NDJSON records and hands the archive one call's worth of
//! records at a time, within the [`ArchiveLimits`] the archive states. A put is one call to
//! the destination: records it failed on their own are a value ([`RecordFailure`]), not an
//! error, so that only they are sent again; an [`ArchiveError`] is the whole call's failure.
//! Retrying is the caller's business, never the archive's: the caller knows when to stop
//! (shutdown) and what it may checkpoint.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

/// What one [`Archive::put`] may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Records in one put.
    pub max_records: usize,
    /// Bytes of all records of one put, as the records' own lengths.
    pub max_bytes: usize,
    /// Bytes of one record.
    pub max_record_bytes: usize,
}

/// Why one record of a put was not stored. Always "not stored, send it again".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFailure {
    /// The destination's code (Firehose: `ServiceUnavailableException`, `InternalFailure`).
    pub code: String,
    pub message: String,
}

impl fmt::Display for RecordFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A whole put failed. Whether any of its records were stored is unknown for
/// [`ArchiveError::Unavailable`] (an answer lost after the destination took the call):
/// sending them again may store them twice, which the archive's readers allow for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// The destination's rate limit: nothing was stored; send again after a back-off.
    #[error("archive throttled: {0}")]
    Throttled(String),
    /// No answer, a 5xx, a reset or a timeout: the call may or may not have been stored.
    #[error("archive unavailable: {0}")]
    Unavailable(String),
    /// The destination refused the call as sent (missing, no access, a record over its
    /// limit). Nothing was stored; sending the same again fails the same way until an
    /// operator fixes the destination.
    #[error("archive refused the call: {0}")]
    Refused(String),
}

impl ArchiveError {
    /// `throttled`, `unavailable` or `refused`, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ArchiveError::Throttled(_) => "throttled",
            ArchiveError::Unavailable(_) => "unavailable",
            ArchiveError::Refused(_) => "refused",
        }
    }
}

/// One put's answer: per record, in the order given, stored (`Ok`) or failed on its own.
pub type PutResults = Vec<Result<(), RecordFailure>>;

/// Where raw events are archived (Firehose to S3).
#[async_trait]
pub trait Archive: Send + Sync + fmt::Debug {
    /// What one [`Archive::put`] may carry; constant for the archive's life.
    fn limits(&self) -> ArchiveLimits;

    /// Stores `records` in one call to the destination and answers per record.
    ///
    /// Contract:
    /// - `records` are within [`Archive::limits`]; a put beyond them is
    ///   [`ArchiveError::Refused`] without a call.
    /// - `Ok(results)` holds exactly one result per record, in input order. An `Ok` record
    ///   is durably stored by the destination (Firehose: accepted, it delivers it). A
    ///   failed record was not stored; the others of the call were.
    /// - `Err` is the whole call's failure (see [`ArchiveError`] for what was stored).
    /// - No retries beyond the client's own for one call: a failure is returned, and
    ///   the caller decides when to send again. Records are never reordered or merged.
    /// - Cancelling the future leaves the records' fate unknown, as a lost answer does.
    async fn put(&self, records: &[Bytes]) -> Result<PutResults, ArchiveError>;
}
