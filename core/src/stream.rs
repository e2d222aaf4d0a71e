//! The stream roles: appending events, reading them back per shard, and the consumers'
//! checkpoints.
//!
//! The traits are shaped so that both the embedded log and Kinesis Data Streams fit:
//! sequence numbers are opaque, ordered strings (Kinesis' are up to 128-bit decimals);
//! an append can fail per record (PutRecords does) and a failure is a value, not an
//! error; shards can close and split, so a shard knows its parent and whether it is
//! closed.

use std::cmp::Ordering;
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ByteString;

/// A shard's identity: `"0"`, `"1"`, … in the embedded log, `shardId-000000000001` in Kinesis.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(pub String);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A position within one shard. Opaque to callers, but totally ordered: a decimal string
/// without leading zeros, compared numerically (by length, then bytes), which is how both
/// the embedded log (u64) and Kinesis (up to 128-bit) number records.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SequenceNumber(String);

impl SequenceNumber {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn from_u64(n: u64) -> Self {
        Self(n.to_string())
    }
    /// The number as a u64, when it fits (always, for the embedded log).
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SequenceNumber {
    fn default() -> Self {
        SequenceNumber::from_u64(0)
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.cmp(&other.0))
    }
}
impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One event to append: its partition key and its bytes (the event's JSON).
#[derive(Debug, Clone)]
pub struct Record {
    /// Usually a slice of the request body the event came in (see [`crate::ByteString`]).
    pub key: ByteString,
    pub payload: Bytes,
}

/// Where an appended record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub shard: ShardId,
    pub sequence: SequenceNumber,
}

/// Why one record was not appended. Every variant means "not durable": the producer
/// may send it again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The stream is over its capacity right now (queue full, throughput exceeded).
    #[error("stream is busy; retry after {retry_after_ms} ms")]
    Busy { retry_after_ms: u64 },
    /// The stream could not make the record durable (I/O error, service unavailable).
    #[error("stream unavailable: {0}")]
    Unavailable(String),
    /// The record can never be appended (e.g. larger than the stream's record limit).
    #[error("record refused: {0}")]
    Refused(String),
}

/// Errors of whole stream operations.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("unknown shard {0}")]
    UnknownShard(ShardId),
    #[error("stream unavailable: {0}")]
    Unavailable(String),
    #[error("stream data is corrupt: {0}")]
    Corrupt(String),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The edge's side of the stream.
#[async_trait]
pub trait StreamWriter: Send + Sync + fmt::Debug {
    /// Appends `records`, returning one outcome per record in input order.
    ///
    /// Contract:
    /// - `Ok` means durable: fsynced by the embedded log, acknowledged by Kinesis. An `Ok`
    ///   record is never lost.
    /// - Records of one key keep their relative order in the shard, and records of one key
    ///   appended by successive calls are ordered by call (the second call's records come
    ///   after the first's once the first has returned).
    /// - A failure is per record and means "not appended, safe to retry"; other records of
    ///   the same call may still succeed.
    /// - Cancelling the future does not undo records already handed to the stream; their
    ///   fate is then unknown to the caller, as with any lost response.
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>>;

    /// [`StreamWriter::append`], answering only whether each record was appended, for a
    /// caller with no use for where (the edge). The same contract, record for record. A
    /// writer that can answer this for less overrides it: the embedded log would otherwise
    /// build a shard id and a sequence number, two allocations, for every record.
    async fn append_acked(&self, records: Vec<Record>) -> Vec<Result<(), AppendError>> {
        self.append(records)
            .await
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect()
    }

    /// Ok when an append issued now could succeed (the stream is open and healthy).
    async fn check_writable(&self) -> Result<(), StreamError>;

    /// Makes everything appended so far durable and stops accepting appends. Idempotent.
    async fn close(&self) -> Result<(), StreamError>;

    /// A count of the caller's requests in progress (admitted and not yet answered), which
    /// the caller raises and lowers. A writer that commits in groups may wait for more
    /// appends while the caller is busy; `None` (the default) when this writer does not.
    fn incoming(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
        None
    }
}

/// A shard as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardInfo {
    pub id: ShardId,
    /// The shards this one was split (one parent) or merged (two) from; each is read to
    /// its end before this one starts, so a key's records stay in order across a reshard.
    pub parents: Vec<ShardId>,
    /// No more records will be appended; once read to its end the shard is done.
    pub closed: bool,
}

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record still retained.
    TrimHorizon,
    /// The record with this sequence number (or the first after it, if it was trimmed).
    At(SequenceNumber),
    /// The first record after this sequence number (resuming from a checkpoint).
    After(SequenceNumber),
    /// The first record appended at or after this time (ms since the Unix epoch), like
    /// Kinesis' `AT_TIMESTAMP`.
    AtTimestamp(i64),
}

/// A record read back from a shard.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub sequence: SequenceNumber,
    pub key: String,
    pub payload: Bytes,
    /// When the stream appended it (milliseconds since the Unix epoch).
    pub appended_at_ms: i64,
}

/// The answer to one read.
#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub records: Vec<StoredRecord>,
    /// Where the next read continues; `None` when the shard is closed and fully read.
    pub next: Option<StartPosition>,
    /// Durable records in the shard after this batch (an estimate where the backend only
    /// knows time lag).
    pub records_behind: u64,
    /// How far the batch's end is behind the shard's head in time, where the backend
    /// reports it (Kinesis' `MillisBehindLatest`); `None` for the embedded log.
    pub millis_behind: Option<u64>,
}

/// The processors' side of the stream.
#[async_trait]
pub trait StreamReader: Send + Sync + fmt::Debug {
    /// The shards of the stream, parents before children.
    async fn shards(&self) -> Result<Vec<ShardInfo>, StreamError>;

    /// Reads up to `max_records` durable records of `shard` from `from`, in sequence order.
    /// Never returns a record that a crash could still take away. An empty batch with a
    /// `next` means "nothing new yet".
    async fn read(
        &self,
        shard: &ShardId,
        from: &StartPosition,
        max_records: usize,
    ) -> Result<ReadBatch, StreamError>;
}

/// Consumers' leases and checkpoints.
///
/// A lease gives one worker (`owner`) the right to consume one shard for one consumer;
/// a worker that dies loses its leases (the embedded store: when its process exits; a
/// DynamoDB store: when the lease is not renewed within its time-to-live), and another
/// worker may then take them. A checkpoint is the last sequence number whose effects are
/// committed, per consumer and shard. The stream's retention never deletes a record that
/// some consumer has not checkpointed past.
#[async_trait]
pub trait CheckpointStore: Send + Sync + fmt::Debug {
    /// Takes the lease on (`consumer`, `shard`) for `owner` if it is free or already
    /// `owner`'s. Returns `false` when another live worker holds it.
    async fn acquire_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError>;

    /// Keeps a held lease alive. Returns `false` when the lease was lost: the caller must
    /// stop consuming the shard before committing anything more.
    async fn renew_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError>;

    /// Gives a held lease up (on clean shutdown). Ok if it was not held.
    async fn release_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<(), StreamError>;

    /// The last committed sequence of `consumer` on `shard`; `None` if it never committed.
    async fn checkpoint(
        &self,
        consumer: &str,
        shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, StreamError>;

    /// Durably records that `consumer` has committed the effects of every record of `shard`
    /// up to and including `sequence`. Checkpoints never move backwards: committing an
    /// older sequence than the stored one is a no-op.
    ///
    /// Fenced by the lease: fails, changing nothing, unless this store holds the lease on
    /// (`consumer`, `shard`), so a worker that lost or gave up a shard cannot move its
    /// checkpoint. Workers in other processes that hold other shards of the same consumer
    /// commit concurrently without losing each other's checkpoints.
    async fn commit(
        &self,
        consumer: &str,
        shard: &ShardId,
        sequence: &SequenceNumber,
    ) -> Result<(), StreamError>;

    /// Every lease of `consumer` this store knows, for balancing shards across workers.
    /// A store that cannot see other workers' leases (the embedded one: a flock is only
    /// visible by trying it) answers an empty list, and workers then take what is free.
    async fn leases(&self, _consumer: &str) -> Result<Vec<LeaseInfo>, StreamError> {
        Ok(Vec::new())
    }

    /// Asks the live worker holding a lease to hand it to `owner`, to balance the load:
    /// the holder sees the request in [`LeaseInfo::handoff_to`] at its next listing,
    /// finishes the shard (flushes, checkpoints) and hands the lease over
    /// ([`CheckpointStore::hand_over_lease`]), and `owner` takes it up with
    /// `acquire_lease`. The lease never changes hands while its holder
    /// still writes: a worker whose lease was taken outright would go on writing the
    /// lake's runs until its next renewal, beside the new owner's replay of the same
    /// records. The request moves no fencing token (the holder's writes go on succeeding)
    /// and does not count as a renewal. Returns `false` when the lease has no owner or
    /// changed hands meanwhile. Stores that cannot see other workers answer `false`.
    async fn request_lease(
        &self,
        _consumer: &str,
        _shard: &ShardId,
        _owner: &str,
    ) -> Result<bool, StreamError> {
        Ok(false)
    }

    /// Gives a held lease to `to` (the worker that asked for it) rather than freeing it, so
    /// that neither this worker nor a third takes it back before `to` does; fenced like
    /// `commit`. `to` takes it up with `acquire_lease`, and if it never does, the lease
    /// expires as any other. Stores that cannot name another owner release it.
    async fn hand_over_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
        _to: &str,
    ) -> Result<(), StreamError> {
        self.release_lease(consumer, shard, owner).await
    }

    /// Records that `consumer` has processed `shard` to its end (a closed shard: split or
    /// merged away), so its children may start. Fenced by the lease, like `commit`.
    /// Stores whose shards never close (the embedded log) refuse it.
    async fn finish_shard(&self, _consumer: &str, shard: &ShardId) -> Result<(), StreamError> {
        Err(StreamError::Unavailable(format!(
            "shard {shard} cannot end: this checkpoint store has no SHARD_END"
        )))
    }

    /// Makes sure a lease exists for each of `shards` (recording its parents, as KCL's
    /// `parentShardId`), so that `leases` lists shards no worker has taken yet. Stores
    /// whose leases exist implicitly (the embedded one) need do nothing.
    async fn ensure_leases(
        &self,
        _consumer: &str,
        _shards: &[ShardInfo],
    ) -> Result<(), StreamError> {
        Ok(())
    }

    /// Whether `finish_shard` was recorded for (`consumer`, `shard`).
    async fn shard_finished(&self, _consumer: &str, _shard: &ShardId) -> Result<bool, StreamError> {
        Ok(false)
    }
}

/// One lease as [`CheckpointStore::leases`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub shard: ShardId,
    /// The worker holding it, if any.
    pub owner: Option<String>,
    /// Renewed within the lease duration, as far as this store has observed; a lease
    /// that is not live may be taken with `acquire_lease`.
    pub live: bool,
    /// The consumer finished the (closed) shard.
    pub finished: bool,
    /// The worker that asked the holder to hand the lease over
    /// ([`CheckpointStore::request_lease`]), if one did since the lease was taken.
    pub handoff_to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_numerically() {
        let s = |x: &str| SequenceNumber::new(x);
        assert!(s("9") < s("10"));
        assert!(s("49590338271490256608559692538361571095921575989136588898") > s("9"));
        assert_eq!(SequenceNumber::from_u64(42).as_u64(), Some(42));
    }
}

/// How far this process's consumers are behind the stream's head, per shard, so the edge
/// can refuse new events before the backlog grows without bound. Consumers write it, the
/// edge reads [`ConsumerLag::max_records`] and [`ConsumerLag::max_millis`] on every
/// request: two atomic loads. The embedded log reports records; Kinesis reports time
/// (`MillisBehindLatest`), so the edge bounds both.
#[derive(Debug, Default)]
pub struct ConsumerLag {
    per_shard: std::sync::Mutex<std::collections::HashMap<(String, ShardId), (u64, u64)>>,
    max: std::sync::atomic::AtomicU64,
    max_ms: std::sync::atomic::AtomicU64,
}

impl ConsumerLag {
    /// Records `consumer` as `records` behind the head of `shard` (and no time behind).
    pub fn set(&self, consumer: &str, shard: &ShardId, records: u64) {
        self.set_both(consumer, shard, records, 0);
    }

    /// Records `consumer` as `records` and `millis` behind the head of `shard`.
    pub fn set_both(&self, consumer: &str, shard: &ShardId, records: u64, millis: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut map = self.per_shard.lock().unwrap_or_else(|e| e.into_inner());
        let key = (consumer.to_owned(), shard.clone());
        match map.get_mut(&key) {
            Some(v) if *v == (records, millis) => return,
            Some(v) => *v = (records, millis),
            None => {
                map.insert(key, (records, millis));
            }
        }
        self.max
            .store(map.values().map(|v| v.0).max().unwrap_or(0), Relaxed);
        self.max_ms
            .store(map.values().map(|v| v.1).max().unwrap_or(0), Relaxed);
    }

    /// The largest lag over all consumers and shards, in records.
    pub fn max_records(&self) -> u64 {
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The largest lag over all consumers and shards, in milliseconds (0 where the
    /// backend reports no time lag).
    pub fn max_millis(&self) -> u64 {
        self.max_ms.load(std::sync::atomic::Ordering::Relaxed)
    }
}
