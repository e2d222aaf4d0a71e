//! The `Progress` role: how far a long operation (a backup, a restore, a lake rebuild or
//! compaction, a log check) has got. Libraries only count through it; the binary decides
//! whether and how to show it (a bar on a terminal, nothing otherwise), so no library
//! writes to a terminal and a command's output stays what it was.

use std::fmt;

/// What a stage counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Records,
    Files,
    Partitions,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Records => "records",
            Unit::Files => "files",
            Unit::Partitions => "partitions",
        }
    }
}

/// Receives progress reports. Every method is a report and cannot fail: an implementation
/// that cannot show something drops it. Calls come from any thread (a copy on the blocking
/// pool, a replay on the async runtime), one operation at a time.
pub trait Progress: Send + Sync + fmt::Debug {
    /// A stage begins, ending the one before: what it does, and the `total` of `unit`s it
    /// will count when that is known in advance.
    fn stage(&self, _name: &str, _total: Option<u64>, _unit: Unit) {}

    /// The current stage's total, learnt (or corrected) while it runs.
    fn total(&self, _total: u64) {}

    /// `n` more units of the current stage are done.
    fn advance(&self, _n: u64) {}
}

/// Reports nowhere: for callers that show no progress (tests, non-interactive runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {}
