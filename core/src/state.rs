//! The bookings domain's state and the roles that keep and publish it.
//!
//! [`StateStore`] is at the level of the domain: load the rows a batch touches, apply a
//! batch's decided changes atomically together with the shard position reached and the
//! batch's derived events (a transactional outbox), and answer point reads. Because the
//! position is written in the same transaction as the effects, replaying a batch after a
//! crash changes nothing. [`Publisher`] moves the outbox to its destination (a local log,
//! EventBridge) idempotently by outbox sequence, so a derived event is published once.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::stream::{SequenceNumber, ShardId};

/// Seats of one event on sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub event_id: String,
    pub capacity: i64,
    pub reserved: i64,
    /// `capacity.low` was published for the current dip below 10 % remaining.
    pub low_notified: bool,
    /// `capacity.sold_out` was published for the current sell-out.
    pub sold_out_notified: bool,
    pub updated_at_ms: i64,
}

impl Inventory {
    pub fn remaining(&self) -> i64 {
        self.capacity - self.reserved
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookingStatus {
    Confirmed,
    Rejected,
    Cancelled,
    Paid,
}

impl BookingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BookingStatus::Confirmed => "confirmed",
            BookingStatus::Rejected => "rejected",
            BookingStatus::Cancelled => "cancelled",
            BookingStatus::Paid => "paid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "confirmed" => BookingStatus::Confirmed,
            "rejected" => BookingStatus::Rejected,
            "cancelled" => BookingStatus::Cancelled,
            "paid" => BookingStatus::Paid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booking {
    pub booking_id: String,
    pub event_id: String,
    pub seats: i64,
    pub status: BookingStatus,
    pub reason: Option<String>,
    pub updated_at_ms: i64,
}

/// Everything one batch of one shard changes, decided in memory.
#[derive(Debug, Clone, Default)]
pub struct StateChanges {
    pub shard: ShardId,
    /// The last stream record the batch covers.
    pub last_sequence: SequenceNumber,
    /// Fencing: `Some(p)` applies only if the shard's stored position is exactly `p`
    /// (`Some(None)`: the shard has no position yet), the one the batch was decided from;
    /// otherwise the store changes nothing and answers [`StateError::Conflict`], or `false`
    /// when the position already covers `last_sequence`. A worker that lost its lease and
    /// decided from an old position thus cannot apply over the worker that took the shard
    /// on. `None`: no condition (tests, tools).
    pub expected_position: Option<Option<SequenceNumber>>,
    /// Each touched inventory once, in its final state for the batch.
    pub inventories: Vec<Inventory>,
    /// Per entry of `inventories`, the row as the batch was decided from: `None` for an
    /// inventory the batch creates. The store writes an inventory only if its stored
    /// `capacity` and `reserved` are still these (or, for `None`, only if it has no row),
    /// and refuses a final state with `reserved` outside `0..=capacity`; either refusal
    /// fails the whole apply ([`StateError::Conflict`], [`StateError::Corrupt`]). Empty
    /// (tests, tools): no condition on the rows.
    pub inventories_before: Vec<Option<Inventory>>,
    /// Each touched booking once, in its final state for the batch.
    pub bookings: Vec<Booking>,
    /// The ids of the bookings in `bookings` that this batch creates. A `bookingId` is
    /// global across shards: the store creates each only if no booking with that id exists,
    /// and otherwise fails the whole apply with [`StateError::Conflict`], so that the
    /// processor decides the batch again against the booking that got there first.
    pub created_bookings: Vec<String>,
    /// The batch's derived events (CloudEvents JSON), in decision order.
    pub derived: Vec<String>,
    /// Records of the batch the rules could not apply, each with its reason. They are kept
    /// (not skipped with a log line) in the same transaction as the batch's effects.
    pub dead_letters: Vec<DeadLetter>,
}

impl StateChanges {
    /// Items the apply writes, as [`ApplyLimits::max_items`] counts them.
    pub fn items(&self) -> usize {
        self.inventories.len()
            + self.bookings.len()
            + self.dead_letters.len()
            + ApplyLimits::FIXED_ITEMS
    }

    /// Bytes the apply writes, roughly and from above: the derived events and dead letters
    /// as they are, and [`ROW_BYTES`] for every other item.
    pub fn approx_bytes(&self) -> usize {
        let derived: usize = self.derived.iter().map(|e| e.len() + 1).sum();
        let dead: usize = self
            .dead_letters
            .iter()
            .map(|d| d.payload.len() + d.detail.len() + d.reason.len() + ROW_BYTES)
            .sum();
        derived + dead + (self.inventories.len() + self.bookings.len() + 2) * ROW_BYTES
    }
}

/// What [`StateChanges::approx_bytes`] counts for one inventory, booking or position item:
/// its ids are bounded by the schemas (at most 200 characters), its other attributes are
/// numbers and short strings.
pub const ROW_BYTES: usize = 512;

/// Never oversell: a final state with `reserved` outside `0..=capacity` is a broken rule,
/// refused whole rather than stored.
pub fn check_inventory(i: &Inventory) -> Result<(), StateError> {
    if i.reserved < 0 || i.reserved > i.capacity {
        return Err(StateError::Corrupt(format!(
            "inventory {:?} would hold {} reserved of {} seats: refused",
            i.event_id, i.reserved, i.capacity
        )));
    }
    Ok(())
}

/// A stream record the bookings rules could not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub shard: ShardId,
    pub sequence: SequenceNumber,
    /// Machine-readable: `undecodable`, `invalid_value`, …
    pub reason: String,
    /// Human-readable detail: which member, what value.
    pub detail: String,
    /// The record as stored (the producer's JSON).
    pub payload: String,
}

/// One outbox entry: the derived events of one applied batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The outbox partition the entry belongs to. Each partition numbers its entries on
    /// its own; the store chooses the partitioning (see [`StateStore::outbox_after`]).
    pub partition: String,
    /// Grows by one per applied batch of the partition that derived anything.
    pub seq: u64,
    /// CloudEvents JSON, one per event.
    pub events: Vec<String>,
}

/// How far an outbox is published: the last seq per partition. A partition absent is
/// published up to nothing.
pub type OutboxCursor = BTreeMap<String, u64>;

/// The largest single apply a store takes. A batch whose changes would exceed it is
/// applied as several consecutive slices of its records, each with its own position, so
/// a crash between two of them resumes exactly at the next slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyLimits {
    /// Items written: touched inventories + touched bookings + dead letters, plus
    /// [`ApplyLimits::FIXED_ITEMS`] for the position and the outbox entry.
    pub max_items: usize,
    /// Bytes of the apply's items, as [`StateChanges::approx_bytes`] counts them.
    pub max_bytes: usize,
}

impl ApplyLimits {
    /// The shard position and the outbox entry, in every apply.
    pub const FIXED_ITEMS: usize = 2;
    pub const UNBOUNDED: ApplyLimits = ApplyLimits {
        max_items: usize::MAX,
        max_bytes: usize::MAX,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
    /// A conditional write lost: e.g. a booking id another shard created first. Nothing of
    /// the apply was written; decide again against fresh rows.
    #[error("conflicting write: {0}")]
    Conflict(String),
    /// The store refused for capacity (DynamoDB throttling). Nothing was written; the
    /// same apply may be retried after a back-off.
    #[error("state store throttled: {0}")]
    Throttled(String),
}

/// Where bookings and capacity live (SQLite embedded, DynamoDB on AWS).
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug {
    /// The largest apply this store takes at once; the bookings processor slices batches
    /// to fit.
    fn limits(&self) -> ApplyLimits {
        ApplyLimits::UNBOUNDED
    }

    /// The last stream sequence of `shard` whose effects are applied; `None` if none are.
    async fn position(&self, shard: &ShardId) -> Result<Option<SequenceNumber>, StateError>;

    /// The current rows of these inventories and bookings; ids without a row are absent.
    async fn load(
        &self,
        event_ids: Vec<String>,
        booking_ids: Vec<String>,
    ) -> Result<(Vec<Inventory>, Vec<Booking>), StateError>;

    /// Applies `changes` atomically: rows, the shard position, one outbox entry for the
    /// derived events, and the dead letters. Returns `false`, changing nothing, when the
    /// shard position already covers `changes.last_sequence` (a replay). Fails with
    /// [`StateError::Conflict`], changing nothing, when a booking of
    /// `changes.created_bookings` already exists.
    async fn apply(&self, changes: StateChanges) -> Result<bool, StateError>;

    async fn inventory(&self, event_id: &str) -> Result<Option<Inventory>, StateError>;

    async fn booking(&self, booking_id: &str) -> Result<Option<Booking>, StateError>;

    /// Outbox entries beyond `cursor` (in each partition, `seq` greater than the cursor's),
    /// each partition's in seq order, at most `max` in all.
    ///
    /// A store that serialises every apply anyway (SQLite, one writer) keeps one partition,
    /// `""`, and so one total order. A store whose shards apply in parallel (DynamoDB) keeps
    /// one partition per shard, numbered in the shard's own transactions: a counter shared
    /// by every shard would serialise them all.
    async fn outbox_after(
        &self,
        cursor: &OutboxCursor,
        max: usize,
    ) -> Result<Vec<OutboxEntry>, StateError>;

    /// Forgets the outbox entries at or below `upto` in each of its partitions: they are
    /// published.
    async fn outbox_published(&self, upto: &OutboxCursor) -> Result<(), StateError>;

    /// Dead letters in (shard, sequence) order, at most `max`.
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, StateError>;
}

#[derive(Debug, thiserror::Error)]
#[error("publish failed: {0}")]
pub struct PublishError(pub String);

/// Where derived events go (a local outbox log, EventBridge).
#[async_trait]
pub trait Publisher: Send + Sync + fmt::Debug {
    /// The highest outbox seq of each partition published durably. Read from the
    /// destination (or where the publisher keeps its position) on each call, not
    /// remembered from start-up: a standby relay asks after it takes the relay lease, and
    /// must see what the relay before it published.
    async fn last_published(&self) -> Result<OutboxCursor, PublishError>;

    /// Publishes entries in each partition's order, durably. Entries at or below
    /// `last_published` are skipped, so publishing after a crash or a takeover does not
    /// repeat what the publisher knows it published (a destination that cannot be read
    /// back may repeat the entries of a publish cut short: see the implementation). A
    /// failed publish leaves what was published before intact; the caller retries the same
    /// entries. Only the relay-lease holder calls it.
    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError>;
}
