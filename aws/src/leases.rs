//! Consumers' leases and checkpoints in a DynamoDB table that KCL 2.x tooling reads:
//! [`DynamoDbLeases`] implements [`CheckpointStore`], and [`ensure_table`] creates the table.
//!
//! # The table
//!
//! One table per application; its consumers (bookings, lake, relay, …) share it, each
//! lease keyed by `<consumer>:<shardId>`. One item per lease, with KCL 2.x's attribute names:
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `leaseKey` | S (hash key) | `<consumer>:<shardId>` |
//! | `leaseOwner` | S | the worker holding the lease; absent when the lease is free |
//! | `leaseCounter` | N | incremented by every write: the fencing token and the heartbeat |
//! | `checkpoint` | S | `TRIM_HORIZON` (nothing committed), a Kinesis sequence number, or `SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | the event within a KPL-aggregated record |
//! | `ownerSwitchesSinceCheckpoint` | N | owner changes since the last commit |
//! | `parentShardId` | SS | the shards this one was split or merged from; only when there are any (DynamoDB rejects empty sets) |
//! | `floodgateSequence` | S | Floodgate's own: the whole sequence number last committed (see below) |
//! | `floodgateHandoffTo` | S | Floodgate's own: the worker that asked the owner to hand the lease over; removed when the lease is taken or released |
//!
//! Floodgate's sequence numbers on Kinesis are composites ([`crate::seq`]): the Kinesis part
//! goes to `checkpoint` and the subsequence to `checkpointSubSequenceNumber`, as KCL writes
//! them. A sequence number that is not a composite (the embedded log's are plain u64s, which
//! may be too short to split) is stored whole in `checkpoint` with subsequence 0. Every
//! commit also writes the whole sequence to `floodgateSequence`, which a read prefers when it
//! agrees with `checkpoint` and `checkpointSubSequenceNumber` (so a checkpoint written by
//! other tooling, which leaves `floodgateSequence` stale, wins). That makes every sequence
//! round trip exactly, and keeps the last real checkpoint of a finished shard: after
//! [`CheckpointStore::finish_shard`], `checkpoint` is `SHARD_END` and
//! [`CheckpointStore::checkpoint`] answers the last sequence committed before it (`None` if
//! none was). The sentinels `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP` and `SHARD_END`
//! themselves cannot be committed as sequence numbers.
//!
//! # Liveness, as KCL decides it
//!
//! Workers' clocks are never compared. A store remembers, per lease, the `leaseCounter` it
//! last read and when it first saw that value; a lease whose counter has not moved for the
//! store's `lease_duration` since then is expired, and may be taken. A lease seen for the
//! first time therefore counts as just renewed. A lease without an owner is free.
//!
//! # Fencing
//!
//! Every write but the creation of an item is conditional on the `leaseCounter` (and the
//! owner) this store last saw, and increments the counter; so a write succeeds only if
//! nothing else wrote the lease since. A store serialises its own writes to one lease (one
//! async mutex per lease), so that its renewals and commits never race on the counter. A
//! condition that fails is an answer (`false`, or a refused commit), never retried; only
//! throttling and service or transport failures are errors
//! ([`StreamError::Unavailable`], naming DynamoDB, the table and the lease). A write whose
//! answer was lost (a timeout) may still have happened; the store's next write to that
//! lease then fails its condition and reports the lease lost, and `acquire_lease` takes it
//! back at once (the item names this owner).
//!
//! # Balancing: hand-over, not theft
//!
//! A worker below its share asks a busier one for a lease
//! ([`CheckpointStore::request_lease`]): it writes its name to `floodgateHandoffTo`,
//! conditional on the owner only, and moves no counter, so the owner's renewals and
//! commits go on succeeding. The owner sees the request when it next lists the leases,
//! finishes the shard (flush, checkpoint) and writes the asker as the owner
//! ([`CheckpointStore::hand_over_lease`]); the asker takes it up. KCL
//! 2.x steals outright instead, and its old owner keeps processing until its next
//! renewal; for the lake that would be a run written by the old owner beside the new
//! owner's replay of the same records.
//!
//! # Creating items
//!
//! [`CheckpointStore::ensure_leases`] (shard sync) creates the items of new shards, free, at
//! `TRIM_HORIZON`, with their parents; `acquire_lease` creates an item it finds missing,
//! owned, without parents. Neither ever writes an item that exists: a write by a worker
//! that does not hold a lease would move its counter and cost its holder the lease.
//! `ownerSwitchesSinceCheckpoint` counts as KCL counts it: 0 on creation, +1 when the lease
//! passes from one owner to another (not when a free lease is taken), 0 again at a commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use floodgate_core::stream::{
    CheckpointStore, LeaseInfo, SequenceNumber, ShardId, ShardInfo, StreamError,
};

use crate::client::describe;
use crate::seq;

/// The hash key: `<consumer>:<shardId>`.
pub const LEASE_KEY: &str = "leaseKey";
/// The worker holding the lease; absent when it is free.
pub const LEASE_OWNER: &str = "leaseOwner";
/// Incremented by every write to the lease.
pub const LEASE_COUNTER: &str = "leaseCounter";
/// The Kinesis part of the last committed sequence, or a sentinel.
pub const CHECKPOINT: &str = "checkpoint";
/// The subsequence part of the last committed sequence.
pub const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
/// Owner changes since the last commit.
pub const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
/// The shard's parents (a string set; absent when it has none).
pub const PARENT_SHARD_ID: &str = "parentShardId";
/// Floodgate's own: the whole sequence number last committed.
pub const FLOODGATE_SEQUENCE: &str = "floodgateSequence";
/// Floodgate's own: the worker that asked the owner to hand the lease over.
pub const HANDOFF_TO: &str = "floodgateHandoffTo";

/// `checkpoint` of a lease nothing has been committed to: read from the shard's start.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// `checkpoint` of a shard its consumer has read to its end.
pub const SHARD_END: &str = "SHARD_END";
/// Sentinels KCL may write in `checkpoint`; none is a committed position.
const SENTINELS: [&str; 4] = [TRIM_HORIZON, "LATEST", "AT_TIMESTAMP", SHARD_END];

/// How many times in a row a lease write whose condition failed may adopt the counter
/// its own lost answers moved (see `fenced_write`).
const MAX_ADOPTIONS: u32 = 8;

/// How long [`ensure_table`] waits for a new table to become ACTIVE (AWS takes seconds to
/// a minute; emulators are ACTIVE at once).
pub const TABLE_ACTIVE_DEADLINE: Duration = Duration::from_secs(300);

/// What [`ensure_table`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOutcome {
    Created,
    Exists,
}

impl TableOutcome {
    /// `created` or `exists`, as `floodgate aws init` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            TableOutcome::Created => "created",
            TableOutcome::Exists => "exists",
        }
    }
}

/// Creates the lease table `name` if it is missing (hash key `leaseKey` of type S,
/// on-demand billing), then waits until it is ACTIVE, for up to
/// [`TABLE_ACTIVE_DEADLINE`]. Idempotent: a table that exists (or that another process
/// creates meanwhile) is `Exists`. A table of that name whose key is not `leaseKey` is an
/// error, not a lease table.
pub async fn ensure_table(client: &Client, name: &str) -> Result<TableOutcome, StreamError> {
    let outcome = match client.describe_table().table_name(name).send().await {
        Ok(out) => {
            let keys = out.table().map(|t| t.key_schema()).unwrap_or_default();
            let is_lease_table = keys.len() == 1
                && keys[0].attribute_name() == LEASE_KEY
                && keys[0].key_type() == &KeyType::Hash;
            if !is_lease_table {
                let found: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{} ({})", k.attribute_name(), k.key_type().as_str()))
                    .collect();
                return Err(StreamError::Unavailable(format!(
                    "DynamoDB table {name} exists but is not a lease table: its key is [{}], \
                     not {LEASE_KEY} (HASH)",
                    found.join(", ")
                )));
            }
            TableOutcome::Exists
        }
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            let attr = AttributeDefinition::builder()
                .attribute_name(LEASE_KEY)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| StreamError::Unavailable(format!("lease table definition: {e}")))?;
            let key = KeySchemaElement::builder()
                .attribute_name(LEASE_KEY)
                .key_type(KeyType::Hash)
                .build()
                .map_err(|e| StreamError::Unavailable(format!("lease table definition: {e}")))?;
            match client
                .create_table()
                .table_name(name)
                .attribute_definitions(attr)
                .key_schema(key)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await
            {
                Ok(_) => TableOutcome::Created,
                // Another process created it between our DescribeTable and CreateTable.
                Err(e) if e.code() == Some("ResourceInUseException") => TableOutcome::Exists,
                Err(e) => {
                    return Err(StreamError::Unavailable(format!(
                        "DynamoDB CreateTable {name}: {}",
                        describe(&e)
                    )));
                }
            }
        }
        Err(e) => {
            return Err(StreamError::Unavailable(format!(
                "DynamoDB DescribeTable {name}: {}",
                describe(&e)
            )));
        }
    };
    wait_active(client, name, TABLE_ACTIVE_DEADLINE).await?;
    Ok(outcome)
}

/// Polls DescribeTable until `name` is ACTIVE, or fails naming its status at `deadline`.
pub(crate) async fn wait_active(
    client: &Client,
    name: &str,
    deadline: Duration,
) -> Result<(), StreamError> {
    let give_up = Instant::now() + deadline;
    let mut pause = Duration::from_millis(100);
    loop {
        let status = match client.describe_table().table_name(name).send().await {
            Ok(out) => out.table().and_then(|t| t.table_status()).cloned(),
            // Just created: DescribeTable may not see it for a moment.
            Err(e) if e.code() == Some("ResourceNotFoundException") => None,
            Err(e) => {
                return Err(StreamError::Unavailable(format!(
                    "DynamoDB DescribeTable {name}: {}",
                    describe(&e)
                )));
            }
        };
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        if Instant::now() >= give_up {
            let status = status.map_or_else(|| "not found".to_owned(), |s| s.as_str().to_owned());
            return Err(StreamError::Unavailable(format!(
                "DynamoDB table {name} is not ACTIVE after {} s (status {status})",
                deadline.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Leases and checkpoints in a DynamoDB table (see the module docs).
///
/// Each worker process opens its own; the table is what they share. Everything this
/// store remembers (what it holds, what it observed) is a cache that a conditional write
/// checks, never a source of truth.
#[derive(Debug)]
pub struct DynamoDbLeases {
    client: Client,
    table: String,
    lease_duration: Duration,
    /// Items per Scan page (`None`: DynamoDB's 1 MB pages).
    scan_page_size: Option<i32>,
    /// Per lease key: the lock that serialises this store's writes to it, guarding what
    /// this store holds of it.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Held>>>>>,
    /// Per lease key: the counter last read, and when this store first saw that value.
    observed: Mutex<HashMap<String, Observation>>,
}

/// A lease this store holds, as of its last successful write.
#[derive(Debug, Clone)]
struct Held {
    owner: String,
    counter: u64,
    checkpoint: Checkpoint,
}

#[derive(Debug, Clone, Copy)]
struct Observation {
    counter: u64,
    since: Instant,
}

/// A lease's `checkpoint`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Checkpoint {
    /// `TRIM_HORIZON` (or another sentinel that is no position): nothing committed.
    Nothing,
    At(SequenceNumber),
    /// `SHARD_END`, with the last sequence committed before it, where known.
    ShardEnd(Option<SequenceNumber>),
}

impl Checkpoint {
    fn last(&self) -> Option<&SequenceNumber> {
        match self {
            Checkpoint::Nothing => None,
            Checkpoint::At(s) => Some(s),
            Checkpoint::ShardEnd(last) => last.as_ref(),
        }
    }
}

/// A lease item, decoded.
#[derive(Debug, Clone)]
struct Lease {
    owner: Option<String>,
    counter: u64,
    checkpoint: Checkpoint,
    handoff_to: Option<String>,
}

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// True when `err` is DynamoDB refusing a write because its condition did not hold.
fn condition_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::ServiceError(e) if e.err().code() == Some("ConditionalCheckFailedException"))
}

/// The Kinesis part and the subsequence to store for `sequence` (see the module docs).
fn stored_parts(sequence: &SequenceNumber) -> (String, u64) {
    match seq::split(sequence) {
        Some((kinesis, sub)) => (kinesis.to_owned(), sub),
        None => (sequence.as_str().to_owned(), 0),
    }
}

impl DynamoDbLeases {
    /// Leases in `table` (see [`ensure_table`]), which this store deems expired when their
    /// counter has not moved for `lease_duration`.
    pub fn new(client: Client, table: impl Into<String>, lease_duration: Duration) -> Self {
        Self {
            client,
            table: table.into(),
            lease_duration,
            scan_page_size: None,
            slots: Mutex::default(),
            observed: Mutex::default(),
        }
    }

    /// Reads listings in Scan pages of at most `items` items instead of DynamoDB's 1 MB
    /// pages (tests use it to cross page boundaries).
    pub fn with_scan_page_size(mut self, items: i32) -> Self {
        self.scan_page_size = Some(items.max(1));
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// `<consumer>:`, the start of every lease key of `consumer`.
    fn prefix(consumer: &str) -> Result<String, StreamError> {
        if consumer.is_empty() || consumer.contains(':') {
            return Err(StreamError::Unavailable(format!(
                "consumer names are non-empty and without ':' (the lease key separator), not \
                 {consumer:?}"
            )));
        }
        Ok(format!("{consumer}:"))
    }

    fn key(consumer: &str, shard: &ShardId) -> Result<String, StreamError> {
        let prefix = Self::prefix(consumer)?;
        if shard.0.is_empty() {
            return Err(StreamError::Unavailable("empty shard id".to_owned()));
        }
        Ok(format!("{prefix}{}", shard.0))
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<Option<Held>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key.to_owned()).or_default().clone()
    }

    /// Records that `key`'s counter was read (or written) as `counter` now; returns
    /// whether the lease is live by this store's observation, given `owner`.
    fn observe(&self, key: &str, counter: u64, has_owner: bool) -> bool {
        let now = Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let seen = observed
            .entry(key.to_owned())
            .and_modify(|o| {
                if o.counter != counter {
                    *o = Observation {
                        counter,
                        since: now,
                    };
                }
            })
            .or_insert(Observation {
                counter,
                since: now,
            });
        has_owner && now.duration_since(seen.since) < self.lease_duration
    }

    fn unavailable<E, R>(&self, op: &str, key: &str, err: &SdkError<E, R>) -> StreamError
    where
        E: ProvideErrorMetadata + std::error::Error,
        R: std::fmt::Debug,
    {
        StreamError::Unavailable(format!(
            "DynamoDB {op} of lease {key} in table {}: {}",
            self.table,
            describe(err)
        ))
    }

    fn corrupt(&self, key: &str, what: impl std::fmt::Display) -> StreamError {
        StreamError::Corrupt(format!(
            "DynamoDB lease {key} in table {}: {what}",
            self.table
        ))
    }

    /// Decodes a lease item.
    fn decode(&self, key: &str, item: &Item) -> Result<Lease, StreamError> {
        let string = |name: &str| -> Result<Option<&String>, StreamError> {
            match item.get(name) {
                None => Ok(None),
                Some(AttributeValue::S(v)) => Ok(Some(v)),
                Some(other) => Err(self.corrupt(key, format!("{name} is not a string: {other:?}"))),
            }
        };
        let number = |name: &str| -> Result<Option<u64>, StreamError> {
            match item.get(name) {
                None => Ok(None),
                Some(AttributeValue::N(v)) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| self.corrupt(key, format!("{name} is not a whole number: {v:?}"))),
                Some(other) => Err(self.corrupt(key, format!("{name} is not a number: {other:?}"))),
            }
        };
        let owner = string(LEASE_OWNER)?.cloned();
        let counter = number(LEASE_COUNTER)?.unwrap_or(0);
        let sub = number(CHECKPOINT_SUB)?.unwrap_or(0);
        let whole = string(FLOODGATE_SEQUENCE)?;
        let checkpoint = match string(CHECKPOINT)?.map(String::as_str) {
            None => Checkpoint::Nothing,
            Some(SHARD_END) => Checkpoint::ShardEnd(whole.map(|w| SequenceNumber::new(w.clone()))),
            Some(sentinel) if SENTINELS.contains(&sentinel) => Checkpoint::Nothing,
            Some(cp) => {
                // The whole sequence, where it agrees with what KCL's attributes say.
                let agreeing = whole.map(|w| SequenceNumber::new(w.clone())).filter(|w| {
                    let (k, sb) = stored_parts(w);
                    k == cp && sb == sub
                });
                match agreeing {
                    Some(w) => Checkpoint::At(w),
                    None => Checkpoint::At(seq::compose(cp, sub).ok_or_else(|| {
                        self.corrupt(
                            key,
                            format!("{CHECKPOINT} {cp:?} with {CHECKPOINT_SUB} {sub} is no sequence number"),
                        )
                    })?),
                }
            }
        };
        let handoff_to = string(HANDOFF_TO)?.cloned();
        Ok(Lease {
            owner,
            counter,
            checkpoint,
            handoff_to,
        })
    }

    /// Reads a lease, strongly consistent (it decides what to write); `None` when absent.
    async fn read(&self, key: &str) -> Result<Option<Lease>, StreamError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.unavailable("GetItem", key, &e))?;
        match out.item() {
            None => Ok(None),
            Some(item) => {
                let lease = self.decode(key, item)?;
                self.observe(key, lease.counter, lease.owner.is_some());
                Ok(Some(lease))
            }
        }
    }

    /// Every lease of `consumer`: (shard id, lease), read with consistent Scans page by page.
    async fn scan(&self, consumer: &str) -> Result<Vec<(ShardId, Lease)>, StreamError> {
        let prefix = Self::prefix(consumer)?;
        let prefix = prefix.as_str();
        let mut leases = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("begins_with(#k, :prefix)")
                .expression_attribute_names("#k", LEASE_KEY)
                .expression_attribute_values(":prefix", s(prefix))
                .consistent_read(true)
                .set_limit(self.scan_page_size)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.unavailable("Scan", &format!("{prefix}*"), &e))?;
            for item in out.items() {
                let Some(AttributeValue::S(key)) = item.get(LEASE_KEY) else {
                    continue;
                };
                let Some(shard) = key.strip_prefix(prefix) else {
                    continue;
                };
                let lease = self.decode(key, item)?;
                leases.push((ShardId(shard.to_owned()), lease));
            }
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => break,
            }
        }
        Ok(leases)
    }

    /// Takes `key` for `owner` from `lease` as read, conditional on its counter and owner
    /// being unchanged since. On success `slot` holds it.
    async fn take(
        &self,
        key: &str,
        slot: &mut Option<Held>,
        lease: &Lease,
        owner: &str,
    ) -> Result<bool, StreamError> {
        let next = lease.counter + 1;
        let mut update = "SET #owner = :owner, #counter = :next".to_owned();
        // As KCL counts them: a change from another owner, not a take of a free lease.
        let switch = lease.owner.as_deref().is_some_and(|o| o != owner);
        if switch {
            update.push_str(" ADD #switches :one");
        }
        // A request to hand the lease over was made to its last owner.
        update.push_str(" REMOVE #handoff");
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(key))
            .update_expression(update)
            .expression_attribute_names("#owner", LEASE_OWNER)
            .expression_attribute_names("#counter", LEASE_COUNTER)
            .expression_attribute_names("#handoff", HANDOFF_TO)
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":expected", n(lease.counter));
        if switch {
            req = req
                .expression_attribute_names("#switches", OWNER_SWITCHES)
                .expression_attribute_values(":one", n(1));
        }
        req = match &lease.owner {
            Some(old) => req
                .condition_expression("#counter = :expected AND #owner = :old")
                .expression_attribute_values(":old", s(old.clone())),
            None => {
                req.condition_expression("#counter = :expected AND attribute_not_exists(#owner)")
            }
        };
        match req.send().await {
            Ok(_) => {
                self.observe(key, next, true);
                if switch {
                    tracing::info!(
                        table = %self.table,
                        lease = key,
                        from = lease.owner.as_deref().unwrap_or(""),
                        to = owner,
                        "lease taken from another worker"
                    );
                }
                *slot = Some(Held {
                    owner: owner.to_owned(),
                    counter: next,
                    checkpoint: lease.checkpoint.clone(),
                });
                Ok(true)
            }
            Err(e) if condition_failed(&e) => {
                *slot = None;
                Ok(false)
            }
            Err(e) => Err(self.unavailable("UpdateItem (take)", key, &e)),
        }
    }

    /// Writes `set` (and `remove`) to a lease `held` in `slot`, conditional on its counter
    /// and owner, incrementing the counter. `Ok(false)` when the condition failed: the lease
    /// is no longer this store's, and `slot` is emptied.
    async fn fenced_write(
        &self,
        op: &str,
        key: &str,
        slot: &mut Option<Held>,
        set: &[(&str, AttributeValue)],
        remove: &[&str],
    ) -> Result<bool, StreamError> {
        self.fenced_write_adding(op, key, slot, set, remove, &[])
            .await
    }

    /// [`Self::fenced_write`] that also adds one to each of `add_one`.
    async fn fenced_write_adding(
        &self,
        op: &str,
        key: &str,
        slot: &mut Option<Held>,
        set: &[(&str, AttributeValue)],
        remove: &[&str],
        add_one: &[&str],
    ) -> Result<bool, StreamError> {
        // A write whose answer was lost (a timeout, a reset) may have been applied: the
        // counter then moved by this worker's own hand. So a failed condition is checked
        // against the item: still this worker's, the counter is adopted and the write made
        // again; anyone else's, the lease is lost. Owner names are unique per process run,
        // and every write of this lease here (takes included) holds `slot`'s lock, so an
        // item that names this owner was moved only by this store's own writes since it
        // last knew the counter. The adopted write may lose its answer too (the faults
        // that lose one tend to come in runs), so adoption repeats, a bounded number of
        // times. Without this, every lost answer cost a lease, and the shard's tenure.
        let mut adopted = 0;
        loop {
            let Some(owner) = slot.as_ref().map(|h| h.owner.clone()) else {
                return Ok(false);
            };
            match self
                .fenced_write_once(op, key, slot, set, remove, add_one)
                .await?
            {
                Some(done) => return Ok(done),
                None if adopted >= MAX_ADOPTIONS => {}
                None => {
                    if let Some(lease) = self.read(key).await?
                        && lease.owner.as_deref() == Some(owner.as_str())
                    {
                        tracing::info!(
                            table = %self.table,
                            lease = key,
                            op,
                            counter = lease.counter,
                            "the lease moved by this worker's own write whose answer was lost; adopting it"
                        );
                        self.observe(key, lease.counter, true);
                        *slot = Some(Held {
                            owner,
                            counter: lease.counter,
                            checkpoint: lease.checkpoint,
                        });
                        adopted += 1;
                        continue;
                    }
                }
            }
            tracing::info!(
                table = %self.table,
                lease = key,
                op,
                "lease lost: another worker wrote it since this one did"
            );
            *slot = None;
            return Ok(false);
        }
    }

    /// One conditional write: `Some(true)` done, `None` the condition failed (the caller
    /// decides), errors for anything else.
    async fn fenced_write_once(
        &self,
        op: &str,
        key: &str,
        slot: &mut Option<Held>,
        set: &[(&str, AttributeValue)],
        remove: &[&str],
        add_one: &[&str],
    ) -> Result<Option<bool>, StreamError> {
        let Some(held) = slot.as_ref() else {
            return Ok(Some(false));
        };
        let next = held.counter + 1;
        let mut update = "SET #counter = :next".to_owned();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(key))
            .condition_expression("#counter = :expected AND #owner = :owner")
            .expression_attribute_names("#counter", LEASE_COUNTER)
            .expression_attribute_names("#owner", LEASE_OWNER)
            .expression_attribute_values(":next", n(next))
            .expression_attribute_values(":expected", n(held.counter))
            .expression_attribute_values(":owner", s(held.owner.clone()));
        for (i, (name, value)) in set.iter().enumerate() {
            let _ = write!(update, ", #s{i} = :s{i}");
            req = req
                .expression_attribute_names(format!("#s{i}"), *name)
                .expression_attribute_values(format!(":s{i}"), value.clone());
        }
        for (i, name) in remove.iter().enumerate() {
            update.push_str(if i == 0 { " REMOVE " } else { ", " });
            let _ = write!(update, "#r{i}");
            req = req.expression_attribute_names(format!("#r{i}"), *name);
        }
        for (i, name) in add_one.iter().enumerate() {
            update.push_str(if i == 0 { " ADD " } else { ", " });
            let _ = write!(update, "#a{i} :one");
            req = req.expression_attribute_names(format!("#a{i}"), *name);
        }
        if !add_one.is_empty() {
            req = req.expression_attribute_values(":one", n(1));
        }
        match req.update_expression(update).send().await {
            Ok(_) => {
                let released = remove.contains(&LEASE_OWNER);
                self.observe(key, next, !released);
                if let Some(held) = slot.as_mut() {
                    held.counter = next;
                }
                Ok(Some(true))
            }
            Err(e) if condition_failed(&e) => Ok(None),
            Err(e) => Err(self.unavailable(op, key, &e)),
        }
    }

    /// Lets a held lease go: released (no owner), or handed over to `to`; a request to
    /// hand it over is answered either way. This store stops holding it whatever the
    /// write's outcome.
    async fn let_go(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
        to: Option<&str>,
    ) -> Result<(), StreamError> {
        let key = Self::key(consumer, shard)?;
        let slot = self.slot(&key);
        let mut slot = slot.lock().await;
        if slot.as_ref().is_none_or(|h| h.owner != owner) {
            return Ok(());
        }
        let result = match to {
            None => {
                self.fenced_write(
                    "UpdateItem (release)",
                    &key,
                    &mut slot,
                    &[],
                    &[LEASE_OWNER, HANDOFF_TO],
                )
                .await
            }
            Some(to) => {
                self.fenced_write_adding(
                    "UpdateItem (hand over)",
                    &key,
                    &mut slot,
                    &[(LEASE_OWNER, s(to))],
                    &[HANDOFF_TO],
                    &[OWNER_SWITCHES],
                )
                .await
            }
        };
        *slot = None;
        if let (Ok(true), Some(to)) = (&result, to) {
            tracing::info!(table = %self.table, lease = key, from = owner, to, "lease handed over");
        }
        result.map(|_| ())
    }

    /// The error of a commit or finish this store may not make.
    fn refused(&self, what: &str, consumer: &str, shard: &ShardId, why: &str) -> StreamError {
        StreamError::Unavailable(format!(
            "{what} of consumer {consumer:?} on shard {shard} refused: this worker {why} \
             (DynamoDB table {})",
            self.table
        ))
    }

    /// Creates the item of a lease nobody has, with `owner` (or free), unless it exists.
    /// `Ok(false)` when it exists.
    async fn create(
        &self,
        key: &str,
        owner: Option<&str>,
        parents: &[ShardId],
    ) -> Result<bool, StreamError> {
        let mut item: Item = HashMap::from([
            (LEASE_KEY.to_owned(), s(key)),
            (LEASE_COUNTER.to_owned(), n(u64::from(owner.is_some()))),
            (CHECKPOINT.to_owned(), s(TRIM_HORIZON)),
            (CHECKPOINT_SUB.to_owned(), n(0)),
            (OWNER_SWITCHES.to_owned(), n(0)),
        ]);
        if let Some(owner) = owner {
            item.insert(LEASE_OWNER.to_owned(), s(owner));
        }
        if !parents.is_empty() {
            let set: Vec<String> = parents
                .iter()
                .map(|p| p.0.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            item.insert(PARENT_SHARD_ID.to_owned(), AttributeValue::Ss(set));
        }
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", LEASE_KEY)
            .send()
            .await
        {
            Ok(_) => {
                self.observe(key, u64::from(owner.is_some()), owner.is_some());
                Ok(true)
            }
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.unavailable("PutItem", key, &e)),
        }
    }
}

#[async_trait]
impl CheckpointStore for DynamoDbLeases {
    /// Creates the lease if it is absent; takes it if it is free, expired by this store's
    /// observation, or already `owner`'s; conditional on the counter read.
    async fn acquire_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError> {
        let key = Self::key(consumer, shard)?;
        let slot = self.slot(&key);
        let mut slot = slot.lock().await;
        let Some(lease) = self.read(&key).await? else {
            let created = self.create(&key, Some(owner), &[]).await?;
            if created {
                *slot = Some(Held {
                    owner: owner.to_owned(),
                    counter: 1,
                    checkpoint: Checkpoint::Nothing,
                });
            }
            // Otherwise another worker created it just now: it is theirs, or free for
            // the next attempt.
            return Ok(created);
        };
        let live = self.observe(&key, lease.counter, lease.owner.is_some());
        let ours = lease.owner.as_deref() == Some(owner);
        if live && !ours {
            // If this store held it (for another owner name), it still does only if
            // nothing wrote the lease since.
            if slot.as_ref().is_some_and(|h| {
                h.counter != lease.counter || lease.owner.as_ref() != Some(&h.owner)
            }) {
                *slot = None;
            }
            return Ok(false);
        }
        self.take(&key, &mut slot, &lease, owner).await
    }

    async fn renew_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError> {
        let key = Self::key(consumer, shard)?;
        let slot = self.slot(&key);
        let mut slot = slot.lock().await;
        if slot.as_ref().is_none_or(|h| h.owner != owner) {
            return Ok(false);
        }
        self.fenced_write("UpdateItem (renew)", &key, &mut slot, &[], &[])
            .await
    }

    /// Removes the owner, keeping the checkpoint. If the write fails for another reason
    /// than the lease being gone, this store stops holding it all the same, and the lease
    /// lapses after the lease duration.
    async fn release_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<(), StreamError> {
        self.let_go(consumer, shard, owner, None).await
    }

    /// Writes `to` as the owner (an owner switch, as KCL counts them) and removes the
    /// request, fenced like every write of the holder's; on failure, as `release_lease`.
    async fn hand_over_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
        to: &str,
    ) -> Result<(), StreamError> {
        self.let_go(consumer, shard, owner, Some(to)).await
    }

    /// The last committed sequence; of a finished shard, the last one committed before
    /// `SHARD_END` (see the module docs).
    async fn checkpoint(
        &self,
        consumer: &str,
        shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, StreamError> {
        let key = Self::key(consumer, shard)?;
        Ok(self
            .read(&key)
            .await?
            .and_then(|lease| lease.checkpoint.last().cloned()))
    }

    async fn commit(
        &self,
        consumer: &str,
        shard: &ShardId,
        sequence: &SequenceNumber,
    ) -> Result<(), StreamError> {
        let key = Self::key(consumer, shard)?;
        if SENTINELS.contains(&sequence.as_str()) {
            return Err(StreamError::Unavailable(format!(
                "checkpoint of consumer {consumer:?} on shard {shard} refused: {sequence} is a \
                 lease table sentinel, not a sequence number"
            )));
        }
        let slot = self.slot(&key);
        let mut slot = slot.lock().await;
        let Some(held) = slot.as_ref() else {
            return Err(self.refused("checkpoint", consumer, shard, "does not hold the lease"));
        };
        // Never backwards. What this store holds is exact: every write since it took the
        // lease was its own (each was conditional on the counter before it).
        match &held.checkpoint {
            Checkpoint::ShardEnd(_) => return Ok(()),
            Checkpoint::At(old) if sequence <= old => return Ok(()),
            _ => {}
        }
        let (checkpoint, sub) = stored_parts(sequence);
        let set = [
            (CHECKPOINT, s(checkpoint)),
            (CHECKPOINT_SUB, n(sub)),
            (FLOODGATE_SEQUENCE, s(sequence.as_str())),
            (OWNER_SWITCHES, n(0)),
        ];
        if !self
            .fenced_write("UpdateItem (checkpoint)", &key, &mut slot, &set, &[])
            .await?
        {
            return Err(self.refused(
                "checkpoint",
                consumer,
                shard,
                "no longer holds the lease (taken or expired)",
            ));
        }
        if let Some(held) = slot.as_mut() {
            held.checkpoint = Checkpoint::At(sequence.clone());
        }
        Ok(())
    }

    async fn leases(&self, consumer: &str) -> Result<Vec<LeaseInfo>, StreamError> {
        let mut out: Vec<LeaseInfo> = self
            .scan(consumer)
            .await?
            .into_iter()
            .map(|(shard, lease)| {
                let key = format!("{consumer}:{}", shard.0);
                let live = self.observe(&key, lease.counter, lease.owner.is_some());
                LeaseInfo {
                    shard,
                    owner: lease.owner,
                    live,
                    finished: matches!(lease.checkpoint, Checkpoint::ShardEnd(_)),
                    handoff_to: lease.handoff_to,
                }
            })
            .collect();
        out.sort_by(|a, b| a.shard.cmp(&b.shard));
        Ok(out)
    }

    /// Writes `owner` to `floodgateHandoffTo`, conditional on the owner read just before
    /// (strongly consistent) and leaving the counter alone. `false` when the lease is
    /// absent, free, already `owner`'s, or changed hands between the read and the write.
    async fn request_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError> {
        let key = Self::key(consumer, shard)?;
        let Some(lease) = self.read(&key).await? else {
            return Ok(false);
        };
        let Some(holder) = lease.owner.filter(|h| h != owner) else {
            return Ok(false);
        };
        if lease.handoff_to.as_deref() == Some(owner) {
            return Ok(true);
        }
        match self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(key.as_str()))
            .update_expression("SET #handoff = :to")
            .condition_expression("#owner = :holder")
            .expression_attribute_names("#handoff", HANDOFF_TO)
            .expression_attribute_names("#owner", LEASE_OWNER)
            .expression_attribute_values(":to", s(owner))
            .expression_attribute_values(":holder", s(holder.clone()))
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(
                    table = %self.table,
                    lease = key,
                    from = holder,
                    to = owner,
                    "asked the lease's owner to hand it over"
                );
                Ok(true)
            }
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.unavailable("UpdateItem (request)", &key, &e)),
        }
    }

    /// Writes `checkpoint = SHARD_END`, keeping the last real checkpoint in
    /// `floodgateSequence`; fenced like `commit`. Idempotent.
    async fn finish_shard(&self, consumer: &str, shard: &ShardId) -> Result<(), StreamError> {
        let key = Self::key(consumer, shard)?;
        let slot = self.slot(&key);
        let mut slot = slot.lock().await;
        let Some(held) = slot.as_ref() else {
            return Err(self.refused("SHARD_END", consumer, shard, "does not hold the lease"));
        };
        let last = match &held.checkpoint {
            Checkpoint::ShardEnd(_) => return Ok(()),
            Checkpoint::At(s) => Some(s.clone()),
            Checkpoint::Nothing => None,
        };
        let mut set = vec![(CHECKPOINT, s(SHARD_END)), (CHECKPOINT_SUB, n(0))];
        let mut remove = Vec::new();
        match &last {
            Some(last) => set.push((FLOODGATE_SEQUENCE, s(last.as_str()))),
            None => remove.push(FLOODGATE_SEQUENCE),
        }
        if !self
            .fenced_write("UpdateItem (SHARD_END)", &key, &mut slot, &set, &remove)
            .await?
        {
            return Err(self.refused(
                "SHARD_END",
                consumer,
                shard,
                "no longer holds the lease (taken or expired)",
            ));
        }
        if let Some(held) = slot.as_mut() {
            held.checkpoint = Checkpoint::ShardEnd(last);
        }
        Ok(())
    }

    /// Creates the items of `shards` that have none (free, at `TRIM_HORIZON`, with their
    /// parents); never writes an existing item.
    async fn ensure_leases(&self, consumer: &str, shards: &[ShardInfo]) -> Result<(), StreamError> {
        let existing: HashSet<ShardId> = self
            .scan(consumer)
            .await?
            .into_iter()
            .map(|(shard, _)| shard)
            .collect();
        for info in shards.iter().filter(|i| !existing.contains(&i.id)) {
            let key = Self::key(consumer, &info.id)?;
            // Absent at the scan; if another worker created it since, it stays theirs.
            self.create(&key, None, &info.parents).await?;
        }
        Ok(())
    }

    async fn shard_finished(&self, consumer: &str, shard: &ShardId) -> Result<bool, StreamError> {
        let key = Self::key(consumer, shard)?;
        Ok(self
            .read(&key)
            .await?
            .is_some_and(|l| matches!(l.checkpoint, Checkpoint::ShardEnd(_))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_stored_as_kcl_parts_or_whole() {
        const K: &str = "49590338271490256608559692538361571095921575989136588898";
        let composite = seq::compose(K, 17).unwrap();
        assert_eq!(stored_parts(&composite), (K.to_owned(), 17));
        // Too short to be a composite: whole, subsequence 0.
        assert_eq!(
            stored_parts(&SequenceNumber::from_u64(42)),
            ("42".to_owned(), 0)
        );
    }

    #[test]
    fn lease_keys_carry_the_consumer_and_refuse_the_separator() {
        let shard = ShardId("shardId-000000000001".into());
        assert_eq!(
            DynamoDbLeases::key("lake", &shard).unwrap(),
            "lake:shardId-000000000001"
        );
        assert!(DynamoDbLeases::key("la:ke", &shard).is_err());
        assert!(DynamoDbLeases::key("", &shard).is_err());
        assert!(DynamoDbLeases::key("lake", &ShardId(String::new())).is_err());
    }
}
