//! The bookings state in one DynamoDB table: [`DynamoDbStateStore`] implements
//! [`StateStore`], and [`ensure_table`] creates the table.
//!
//! # The table (single-table design; keys `pk` (S, hash) and `sk` (S, range))
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | inventory | `EVENT#<eventId>` | `INVENTORY` | `capacity`, `reserved` (N), `lowNotified`, `soldOutNotified` (BOOL), `updatedAtMs` (N) |
//! | booking | `BOOKING#<bookingId>` | `BOOKING` | `eventId` (S), `seats` (N), `status` (S), `reason` (S, optional), `updatedAtMs` (N) |
//! | shard position | `SHARD#<shardId>` | `POSITION` | `sequence` (S: the last stream sequence applied), `outboxSeq` (N: the shard's last outbox entry) |
//! | outbox entry | `OUTBOX#<shardId>` | the entry's seq, 20 digits | `seq` (N), `events` (S: NDJSON, one derived CloudEvent a line) |
//! | dead letter | `DEAD#<shardId>` | the record's sequence, 64 digits | `sequence`, `reason`, `detail`, `payload` (S), `payloadBytes` (N) |
//! | shard registry | `SHARDS` | `SHARDS` | `shards` (SS): every shard with a position, for the relay; each store checks its shards are listed every 5 s |
//!
//! A `bookingId` is global: its item is keyed by the id alone and created with
//! `attribute_not_exists`, so two shards cannot both create it.
//!
//! # One apply, one transaction
//!
//! An apply is one `TransactWriteItems` call (at most [`MAX_TRANSACTION_ITEMS`] items;
//! [`StateStore::limits`] tells the bookings processor to slice batches to fit, each slice
//! with its own position). Every transaction is conditional on:
//! - the shard's position item holding exactly the position the batch was decided from
//!   (fencing: a worker that lost its lease decided from an older one and cannot apply),
//!   and the outbox seq this store read with it;
//! - each inventory still holding the `capacity` and `reserved` the batch was decided
//!   from (or not existing, for one the batch creates). With the final `reserved` checked
//!   to lie within `0..=capacity` before sending, that is `reserved + seats <= capacity`
//!   evaluated against the stored row: never oversold, whatever else writes the table.
//!   A hot event gets one inventory write per transaction however many bookings it takes;
//! - each booking the batch creates not existing yet.
//!
//! The shard's derived events are one outbox item in the same transaction, numbered by the
//! shard's own `outboxSeq` (in its position item, which every transaction of the shard
//! writes anyway): no counter is shared between shards, so shards never contend.
//!
//! A transaction is sent with a client request token made of the table, shard, and the
//! positions it moves between: the SDK's retry of a call whose answer was lost is then
//! idempotent on DynamoDB's side for ten minutes. A refused condition is told apart by the
//! cancellation reasons: the position already at or past the apply's end is a replay
//! (`Ok(false)`); anything else is [`StateError::Conflict`]. Throttling and transaction
//! conflicts are [`StateError::Throttled`] (the processor backs off and sends the same
//! apply again), other failures [`StateError::Unavailable`].
//!
//! Reads (`position`, `load`, `inventory`, `booking`, the outbox) are strongly consistent.
//!
//! Items are at most 400 KB: a dead letter keeps the first [`DEAD_LETTER_PAYLOAD_BYTES`] of
//! its record (`payloadBytes` is the whole size; the record itself is in the stream and
//! the lake), and the limits keep an outbox item well below the item size.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    Put, ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TransactWriteItem, Update,
    WriteRequest,
};
use floodgate_core::state::{
    ApplyLimits, Booking, BookingStatus, DeadLetter, Inventory, OutboxCursor, OutboxEntry,
    StateChanges, StateError, StateStore, check_inventory,
};
use floodgate_core::stream::{SequenceNumber, ShardId};
use md5::{Digest, Md5};

use crate::client::describe;
use crate::leases::{TableOutcome, wait_active};

/// The hash key.
pub const PK: &str = "pk";
/// The range key.
pub const SK: &str = "sk";
/// Items in one `TransactWriteItems` call.
pub const MAX_TRANSACTION_ITEMS: usize = 100;
/// Bytes of items in one apply: a transaction holds 4 MB, an item 400 KB; the outbox item
/// holds a slice's derived events, so a slice stays below one item's size.
pub const MAX_APPLY_BYTES: usize = 350 * 1024;
/// The part of a dead-lettered record a dead-letter item keeps.
pub const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;
/// Keys per `BatchGetItem` call.
const MAX_BATCH_GET: usize = 100;
/// Requests per `BatchWriteItem` call.
const MAX_BATCH_WRITE: usize = 25;

const INVENTORY_SK: &str = "INVENTORY";
const BOOKING_SK: &str = "BOOKING";
const POSITION_SK: &str = "POSITION";
const SHARDS_KEY: &str = "SHARDS";
/// How often a store checks that a shard it applies to is still in the registry item: the
/// bound on how long a lost entry keeps an active shard's outbox from the relay, for one
/// read of the item per shard and interval.
const REGISTRY_REFRESH: Duration = Duration::from_secs(5);
/// Writes of one shard into the registry item, each read back, before an apply goes on
/// without it listed (the next apply tries again).
const REGISTER_ATTEMPTS: usize = 3;

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn event_pk(event_id: &str) -> String {
    format!("EVENT#{event_id}")
}
fn booking_pk(booking_id: &str) -> String {
    format!("BOOKING#{booking_id}")
}
fn shard_pk(shard: &str) -> String {
    format!("SHARD#{shard}")
}
fn outbox_pk(shard: &str) -> String {
    format!("OUTBOX#{shard}")
}
fn dead_pk(shard: &str) -> String {
    format!("DEAD#{shard}")
}
/// Outbox seqs sort as numbers.
fn outbox_sk(seq: u64) -> String {
    format!("{seq:020}")
}
/// Sequence numbers (decimal strings of up to 56 digits on Kinesis, composites a few more)
/// sort as numbers.
fn dead_sk(sequence: &SequenceNumber) -> String {
    format!("{:0>64}", sequence.as_str())
}

/// Creates the state table `name` if it is missing (`pk` S hash, `sk` S range, on-demand),
/// then waits until it is ACTIVE. Idempotent; a table of that name with other keys is an
/// error.
pub async fn ensure_table(client: &Client, name: &str) -> Result<TableOutcome, StateError> {
    let unavailable = |what: String| StateError::Unavailable(what);
    let outcome = match client.describe_table().table_name(name).send().await {
        Ok(out) => {
            let keys: Vec<(String, String)> = out
                .table()
                .map(|t| t.key_schema())
                .unwrap_or_default()
                .iter()
                .map(|k| {
                    (
                        k.attribute_name().to_owned(),
                        k.key_type().as_str().to_owned(),
                    )
                })
                .collect();
            let want = [
                (PK.to_owned(), "HASH".to_owned()),
                (SK.to_owned(), "RANGE".to_owned()),
            ];
            if keys != want {
                return Err(unavailable(format!(
                    "DynamoDB table {name} exists but is not a state table: its key is \
                     {keys:?}, not pk (HASH), sk (RANGE)"
                )));
            }
            TableOutcome::Exists
        }
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            let def = |a: &str| {
                AttributeDefinition::builder()
                    .attribute_name(a)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
            };
            let key = |a: &str, t: KeyType| {
                KeySchemaElement::builder()
                    .attribute_name(a)
                    .key_type(t)
                    .build()
            };
            let bad = |e: aws_sdk_dynamodb::error::BuildError| {
                unavailable(format!("state table definition: {e}"))
            };
            match client
                .create_table()
                .table_name(name)
                .attribute_definitions(def(PK).map_err(bad)?)
                .attribute_definitions(def(SK).map_err(bad)?)
                .key_schema(key(PK, KeyType::Hash).map_err(bad)?)
                .key_schema(key(SK, KeyType::Range).map_err(bad)?)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await
            {
                Ok(_) => TableOutcome::Created,
                Err(e) if e.code() == Some("ResourceInUseException") => TableOutcome::Exists,
                Err(e) => {
                    return Err(unavailable(format!(
                        "DynamoDB CreateTable {name}: {}",
                        describe(&e)
                    )));
                }
            }
        }
        Err(e) => {
            return Err(unavailable(format!(
                "DynamoDB DescribeTable {name}: {}",
                describe(&e)
            )));
        }
    };
    wait_active(client, name, crate::leases::TABLE_ACTIVE_DEADLINE)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(outcome)
}

/// A shard's position item, as this store last read or wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    sequence: Option<SequenceNumber>,
    outbox_seq: u64,
}

/// The bookings state in DynamoDB (see the module docs).
#[derive(Debug)]
pub struct DynamoDbStateStore {
    client: Client,
    table: String,
    limits: ApplyLimits,
    /// Per shard: its position item as last read or written. A cache the transaction's
    /// condition checks, never trusted on its own.
    positions: Mutex<HashMap<String, Position>>,
    /// Shards this store found in the registry item, and when. An entry older than
    /// `registry_refresh` is checked again (see [`Self::register`]).
    registered: Mutex<HashMap<String, Instant>>,
    registry_refresh: Duration,
    /// Write units and transactions of the applies this store made (see [`Self::usage`]).
    units: std::sync::atomic::AtomicU64,
    transactions: std::sync::atomic::AtomicU64,
    /// Rounds of `outbox_after`: where the next starts among the shards.
    outbox_round: std::sync::atomic::AtomicUsize,
}

/// What kind of failure an SDK error is.
fn classify<E, R>(op: &str, table: &str, err: &SdkError<E, R>) -> StateError
where
    E: ProvideErrorMetadata + std::error::Error,
    R: std::fmt::Debug,
{
    let what = format!("DynamoDB {op} on {table}: {}", describe(err));
    match err.code() {
        Some(
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TransactionInProgressException",
        ) => StateError::Throttled(what),
        _ => StateError::Unavailable(what),
    }
}

impl DynamoDbStateStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            limits: ApplyLimits {
                max_items: MAX_TRANSACTION_ITEMS,
                max_bytes: MAX_APPLY_BYTES,
            },
            positions: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            registry_refresh: REGISTRY_REFRESH,
            units: Default::default(),
            transactions: Default::default(),
            outbox_round: Default::default(),
        }
    }

    /// The write units (as DynamoDB bills transactional writes: two per KB per item) and
    /// the `TransactWriteItems` calls of every apply this store made.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.units.load(std::sync::atomic::Ordering::Relaxed),
            self.transactions.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// With another interval for checking a shard is still in the registry (tests: short).
    pub fn with_registry_refresh(mut self, every: Duration) -> Self {
        self.registry_refresh = every;
        self
    }

    /// With smaller apply limits (tests: to slice batches often).
    pub fn with_limits(mut self, limits: ApplyLimits) -> Self {
        self.limits = ApplyLimits {
            max_items: limits.max_items.min(MAX_TRANSACTION_ITEMS),
            max_bytes: limits.max_bytes.min(MAX_APPLY_BYTES),
        };
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn key(pk: String, sk: &str) -> Item {
        HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
    }

    fn corrupt(&self, pk: &str, what: impl std::fmt::Display) -> StateError {
        StateError::Corrupt(format!("DynamoDB table {} item {pk}: {what}", self.table))
    }

    async fn get(&self, pk: String, sk: &str) -> Result<Option<Item>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("GetItem", &self.table, &e))?;
        Ok(out.item)
    }

    async fn read_position(&self, shard: &str) -> Result<Position, StateError> {
        let pk = shard_pk(shard);
        let position = match self.get(pk.clone(), POSITION_SK).await? {
            None => Position {
                sequence: None,
                outbox_seq: 0,
            },
            Some(item) => Position {
                sequence: Some(SequenceNumber::new(
                    str_attr(&item, "sequence").ok_or_else(|| self.corrupt(&pk, "no sequence"))?,
                )),
                outbox_seq: num_attr(&item, "outboxSeq")
                    .ok_or_else(|| self.corrupt(&pk, "no outboxSeq"))?,
            },
        };
        self.remember(shard, position.clone());
        Ok(position)
    }

    fn remember(&self, shard: &str, position: Position) {
        if let Ok(mut p) = self.positions.lock() {
            p.insert(shard.to_owned(), position);
        }
    }

    fn forget(&self, shard: &str) {
        if let Ok(mut p) = self.positions.lock() {
            p.remove(shard);
        }
    }

    fn cached(&self, shard: &str) -> Option<Position> {
        self.positions.lock().ok()?.get(shard).cloned()
    }

    /// Makes sure `shard` is in the registry item the relay reads: when this store first
    /// applies to it, and again every `registry_refresh` while it does.
    ///
    /// The check reads the item and writes (`ADD`, idempotent) only when the shard is
    /// missing, then reads it back. A write can go missing: moto's `UpdateItem` is not
    /// atomic, so two first `ADD`s on the missing item can both read nothing, and the
    /// second write drops the first's shard. Read back, such a loss is seen and written
    /// again at once; one that lands after the read back is found at the next refresh.
    /// Real DynamoDB's `ADD` is atomic; there the refresh costs one read of the item.
    async fn register(&self, shard: &str) -> Result<(), StateError> {
        let fresh = |r: &HashMap<String, Instant>| {
            r.get(shard)
                .is_some_and(|at| at.elapsed() < self.registry_refresh)
        };
        if self.registered.lock().map(|r| fresh(&r)).unwrap_or(false) {
            return Ok(());
        }
        for _ in 0..REGISTER_ATTEMPTS {
            if self.shards().await?.contains(shard) {
                if let Ok(mut r) = self.registered.lock() {
                    r.insert(shard.to_owned(), Instant::now());
                }
                return Ok(());
            }
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(Self::key(SHARDS_KEY.to_owned(), SHARDS_KEY)))
                .update_expression("ADD shards :s")
                .expression_attribute_values(":s", AttributeValue::Ss(vec![shard.to_owned()]))
                .send()
                .await
                .map_err(|e| classify("UpdateItem", &self.table, &e))?;
        }
        // Still missing: not cached, so the next apply checks again.
        tracing::warn!(table = %self.table, shard, "the shard registry keeps losing this shard");
        Ok(())
    }

    async fn shards(&self) -> Result<BTreeSet<String>, StateError> {
        Ok(self
            .get(SHARDS_KEY.to_owned(), SHARDS_KEY)
            .await?
            .and_then(|i| match i.get("shards") {
                Some(AttributeValue::Ss(v)) => Some(v.iter().cloned().collect()),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// `BatchGetItem` of `keys` (consistent), following unprocessed keys.
    async fn batch_get(&self, keys: Vec<Item>) -> Result<Vec<Item>, StateError> {
        let mut out = Vec::new();
        for chunk in keys.chunks(MAX_BATCH_GET) {
            let mut pending = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StateError::Unavailable(format!("BatchGetItem: {e}")))?,
            );
            let mut pause = Duration::from_millis(10);
            while let Some(request) = pending.take() {
                let resp = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| classify("BatchGetItem", &self.table, &e))?;
                if let Some(items) = resp.responses.and_then(|mut r| r.remove(&self.table)) {
                    out.extend(items);
                }
                pending = resp
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .filter(|k| !k.keys().is_empty());
                if pending.is_some() {
                    // Unprocessed keys are DynamoDB's throttling of a batch: back off.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(out)
    }

    fn decode_inventory(&self, item: &Item) -> Result<Inventory, StateError> {
        let pk = str_attr(item, PK).unwrap_or_default();
        let event_id = pk
            .strip_prefix("EVENT#")
            .ok_or_else(|| self.corrupt(&pk, "not an inventory"))?
            .to_owned();
        let int = |name: &str| {
            num_attr_i64(item, name).ok_or_else(|| self.corrupt(&pk, format!("no {name}")))
        };
        Ok(Inventory {
            event_id,
            capacity: int("capacity")?,
            reserved: int("reserved")?,
            low_notified: bool_attr(item, "lowNotified"),
            sold_out_notified: bool_attr(item, "soldOutNotified"),
            updated_at_ms: int("updatedAtMs")?,
        })
    }

    fn decode_booking(&self, item: &Item) -> Result<Booking, StateError> {
        let pk = str_attr(item, PK).unwrap_or_default();
        let booking_id = pk
            .strip_prefix("BOOKING#")
            .ok_or_else(|| self.corrupt(&pk, "not a booking"))?
            .to_owned();
        let status = str_attr(item, "status").unwrap_or_default();
        Ok(Booking {
            booking_id,
            event_id: str_attr(item, "eventId").ok_or_else(|| self.corrupt(&pk, "no eventId"))?,
            seats: num_attr_i64(item, "seats").ok_or_else(|| self.corrupt(&pk, "no seats"))?,
            status: BookingStatus::parse(&status)
                .ok_or_else(|| self.corrupt(&pk, format!("status {status:?}")))?,
            reason: str_attr(item, "reason"),
            updated_at_ms: num_attr_i64(item, "updatedAtMs")
                .ok_or_else(|| self.corrupt(&pk, "no updatedAtMs"))?,
        })
    }

    fn put(&self, item: Item, condition: Option<&str>) -> Result<TransactWriteItem, StateError> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .set_condition_expression(condition.map(str::to_owned))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| StateError::Unavailable(format!("TransactWriteItems put: {e}")))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The transaction of `changes` from `from` (the shard's position as cached), and the
    /// position it leaves.
    fn transaction(
        &self,
        changes: &StateChanges,
        from: &Position,
    ) -> Result<(Vec<TransactWriteItem>, Position, u64), StateError> {
        let shard = &changes.shard.0;
        let mut items = Vec::with_capacity(changes.items());
        // Write units, as DynamoDB bills the transaction (the position item: ~100 bytes).
        let mut units = transactional_write_units(128);
        // The position, first: its cancellation reason tells a replay from a conflict.
        let outbox_seq = from.outbox_seq + u64::from(!changes.derived.is_empty());
        let mut update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(shard_pk(shard), POSITION_SK)))
            .update_expression("SET #seq = :new, outboxSeq = :outbox")
            .expression_attribute_names("#seq", "sequence")
            .expression_attribute_values(":new", s(changes.last_sequence.as_str()))
            .expression_attribute_values(":outbox", n(outbox_seq))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        update = match &from.sequence {
            None => update.condition_expression("attribute_not_exists(pk)"),
            Some(p) => update
                .condition_expression("#seq = :expected AND outboxSeq = :outbox_before")
                .expression_attribute_values(":expected", s(p.as_str()))
                .expression_attribute_values(":outbox_before", n(from.outbox_seq)),
        };
        let update = update
            .build()
            .map_err(|e| StateError::Unavailable(format!("TransactWriteItems update: {e}")))?;
        items.push(TransactWriteItem::builder().update(update).build());

        let conditioned = changes.inventories_before.len() == changes.inventories.len();
        for (k, i) in changes.inventories.iter().enumerate() {
            check_inventory(i)?;
            let mut item = Self::key(event_pk(&i.event_id), INVENTORY_SK);
            item.insert("capacity".into(), n(i.capacity));
            item.insert("reserved".into(), n(i.reserved));
            item.insert("lowNotified".into(), AttributeValue::Bool(i.low_notified));
            item.insert(
                "soldOutNotified".into(),
                AttributeValue::Bool(i.sold_out_notified),
            );
            item.insert("updatedAtMs".into(), n(i.updated_at_ms));
            units += transactional_write_units(item_bytes(&item));
            let entry = match changes.inventories_before.get(k) {
                Some(Some(b)) if conditioned => {
                    let put = Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("#cap = :cap AND #res = :res")
                        // Both are DynamoDB reserved words.
                        .expression_attribute_names("#cap", "capacity")
                        .expression_attribute_names("#res", "reserved")
                        .expression_attribute_values(":cap", n(b.capacity))
                        .expression_attribute_values(":res", n(b.reserved))
                        .return_values_on_condition_check_failure(
                            ReturnValuesOnConditionCheckFailure::AllOld,
                        )
                        .build()
                        .map_err(|e| StateError::Unavailable(format!("put: {e}")))?;
                    TransactWriteItem::builder().put(put).build()
                }
                Some(None) if conditioned => self.put(item, Some("attribute_not_exists(pk)"))?,
                _ => self.put(item, None)?,
            };
            items.push(entry);
        }

        let created: HashSet<&str> = changes
            .created_bookings
            .iter()
            .map(String::as_str)
            .collect();
        for b in &changes.bookings {
            let mut item = Self::key(booking_pk(&b.booking_id), BOOKING_SK);
            item.insert("eventId".into(), s(&b.event_id));
            item.insert("seats".into(), n(b.seats));
            item.insert("status".into(), s(b.status.as_str()));
            if let Some(r) = &b.reason {
                item.insert("reason".into(), s(r));
            }
            item.insert("updatedAtMs".into(), n(b.updated_at_ms));
            units += transactional_write_units(item_bytes(&item));
            let condition = created
                .contains(b.booking_id.as_str())
                .then_some("attribute_not_exists(pk)");
            items.push(self.put(item, condition)?);
        }

        for d in &changes.dead_letters {
            let mut item = Self::key(dead_pk(&d.shard.0), &dead_sk(&d.sequence));
            item.insert("sequence".into(), s(d.sequence.as_str()));
            item.insert("reason".into(), s(&d.reason));
            item.insert("detail".into(), s(truncate(&d.detail, 4096)));
            item.insert(
                "payload".into(),
                s(truncate(&d.payload, DEAD_LETTER_PAYLOAD_BYTES)),
            );
            item.insert("payloadBytes".into(), n(d.payload.len()));
            units += transactional_write_units(item_bytes(&item));
            items.push(self.put(item, None)?);
        }

        if !changes.derived.is_empty() {
            let mut item = Self::key(outbox_pk(shard), &outbox_sk(outbox_seq));
            item.insert("seq".into(), n(outbox_seq));
            item.insert("events".into(), s(changes.derived.join("\n")));
            units += transactional_write_units(item_bytes(&item));
            items.push(self.put(item, Some("attribute_not_exists(pk)"))?);
        }
        if items.len() > MAX_TRANSACTION_ITEMS {
            return Err(StateError::Unavailable(format!(
                "an apply of {} items is more than a DynamoDB transaction holds \
                 ({MAX_TRANSACTION_ITEMS}); the processor slices batches by the store's limits",
                items.len()
            )));
        }
        Ok((
            items,
            Position {
                sequence: Some(changes.last_sequence.clone()),
                outbox_seq,
            },
            units,
        ))
    }

    /// Why a transaction was cancelled: `Ok(false)` for a replay (the position is at or
    /// past the apply's end), else the error to answer.
    fn cancelled(
        &self,
        changes: &StateChanges,
        err: &SdkError<TransactWriteItemsError, HttpResponse>,
    ) -> Result<bool, StateError> {
        let SdkError::ServiceError(service) = err else {
            return Err(classify("TransactWriteItems", &self.table, err));
        };
        let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err() else {
            return Err(classify("TransactWriteItems", &self.table, err));
        };
        let reasons = cancel.cancellation_reasons();
        let code = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
        let what = format!(
            "DynamoDB TransactWriteItems on {}: cancelled, reasons [{}]",
            self.table,
            (0..reasons.len()).map(code).collect::<Vec<_>>().join(", ")
        );
        if (0..reasons.len()).any(|i| {
            matches!(
                code(i),
                "ThrottlingError" | "ProvisionedThroughputExceeded" | "TransactionConflict"
            )
        }) {
            return Err(StateError::Throttled(what));
        }
        if code(0) == "ConditionalCheckFailed" {
            // The position moved. At or past this apply's end: a replay.
            let stored = reasons
                .first()
                .and_then(|r| r.item())
                .and_then(|i| str_attr(i, "sequence"))
                .map(SequenceNumber::new);
            if stored.as_ref().is_some_and(|p| changes.last_sequence <= *p) {
                return Ok(false);
            }
            return Err(StateError::Conflict(format!(
                "shard {} is at {} now, not where the batch was decided: another worker applied it",
                changes.shard,
                stored.as_ref().map_or("the start", |p| p.as_str()),
            )));
        }
        if (0..reasons.len()).any(|i| code(i) == "ConditionalCheckFailed") {
            return Err(StateError::Conflict(format!(
                "{what}: a booking id exists or an inventory changed since the batch was decided"
            )));
        }
        if (0..reasons.len()).any(|i| code(i) == "ValidationError") {
            return Err(StateError::Corrupt(what));
        }
        Err(StateError::Unavailable(what))
    }

    /// Deletes `keys`, following unprocessed requests.
    async fn batch_delete(&self, keys: Vec<Item>) -> Result<(), StateError> {
        for chunk in keys.chunks(MAX_BATCH_WRITE) {
            let mut pending: Vec<WriteRequest> = chunk
                .iter()
                .map(|k| {
                    let d = aws_sdk_dynamodb::types::DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .map_err(|e| StateError::Unavailable(format!("delete request: {e}")))?;
                    Ok(WriteRequest::builder().delete_request(d).build())
                })
                .collect::<Result<_, StateError>>()?;
            let mut pause = Duration::from_millis(10);
            while !pending.is_empty() {
                let resp = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| classify("BatchWriteItem", &self.table, &e))?;
                pending = resp
                    .unprocessed_items
                    .and_then(|mut u| u.remove(&self.table))
                    .unwrap_or_default();
                if !pending.is_empty() {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(())
    }
}

/// An item's size as DynamoDB bills it: each attribute's name plus its value (strings
/// and sets by their bytes, numbers at most 21 bytes, booleans 1), from above.
pub fn item_bytes(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(v) => v.len(),
                    AttributeValue::N(v) => v.len().div_ceil(2) + 1,
                    AttributeValue::Bool(_) => 1,
                    AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
                    _ => 32,
                }
        })
        .sum()
}

/// Write capacity units of one item written in a transaction: two per started KB.
pub fn transactional_write_units(item_bytes: usize) -> u64 {
    2 * item_bytes.div_ceil(1024).max(1) as u64
}

/// `text`, cut to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn str_attr(item: &Item, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}
fn num_attr(item: &Item, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}
fn num_attr_i64(item: &Item, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}
fn bool_attr(item: &Item, name: &str) -> bool {
    matches!(item.get(name), Some(AttributeValue::Bool(true)))
}

/// The request token of a transaction (at most 36 characters): a digest of everything it
/// writes and the position it starts from. The SDK's retry of the same call is then the
/// same request to DynamoDB; an apply decided again differently is a different one.
fn request_token(table: &str, changes: &StateChanges, from: &Position) -> String {
    let mut h = Md5::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(table.as_bytes());
    part(changes.shard.0.as_bytes());
    part(from.sequence.as_ref().map_or("", |p| p.as_str()).as_bytes());
    part(&from.outbox_seq.to_be_bytes());
    part(changes.last_sequence.as_str().as_bytes());
    for b in &changes.inventories_before {
        match b {
            None => part(b"-"),
            Some(b) => {
                part(&b.capacity.to_be_bytes());
                part(&b.reserved.to_be_bytes());
            }
        }
    }
    for i in &changes.inventories {
        part(i.event_id.as_bytes());
        part(&i.capacity.to_be_bytes());
        part(&i.reserved.to_be_bytes());
        part(&[u8::from(i.low_notified), u8::from(i.sold_out_notified)]);
        part(&i.updated_at_ms.to_be_bytes());
    }
    for b in &changes.bookings {
        part(b.booking_id.as_bytes());
        part(b.event_id.as_bytes());
        part(&b.seats.to_be_bytes());
        part(b.status.as_str().as_bytes());
        part(b.reason.as_deref().unwrap_or("").as_bytes());
        part(&b.updated_at_ms.to_be_bytes());
    }
    for c in &changes.created_bookings {
        part(c.as_bytes());
    }
    for d in &changes.dead_letters {
        part(d.sequence.as_str().as_bytes());
        part(d.reason.as_bytes());
        part(d.detail.as_bytes());
        part(d.payload.as_bytes());
    }
    for e in &changes.derived {
        part(e.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl StateStore for DynamoDbStateStore {
    fn limits(&self) -> ApplyLimits {
        self.limits
    }

    async fn position(&self, shard: &ShardId) -> Result<Option<SequenceNumber>, StateError> {
        Ok(self.read_position(&shard.0).await?.sequence)
    }

    async fn load(
        &self,
        event_ids: Vec<String>,
        booking_ids: Vec<String>,
    ) -> Result<(Vec<Inventory>, Vec<Booking>), StateError> {
        let keys = event_ids
            .iter()
            .map(|id| Self::key(event_pk(id), INVENTORY_SK))
            .chain(
                booking_ids
                    .iter()
                    .map(|id| Self::key(booking_pk(id), BOOKING_SK)),
            )
            .collect();
        let mut inventories = Vec::new();
        let mut bookings = Vec::new();
        for item in self.batch_get(keys).await? {
            match str_attr(&item, SK).as_deref() {
                Some(INVENTORY_SK) => inventories.push(self.decode_inventory(&item)?),
                Some(BOOKING_SK) => bookings.push(self.decode_booking(&item)?),
                _ => {}
            }
        }
        Ok((inventories, bookings))
    }

    async fn apply(&self, changes: StateChanges) -> Result<bool, StateError> {
        let shard = changes.shard.0.clone();
        let from = match self.cached(&shard) {
            Some(p) => p,
            None => self.read_position(&shard).await?,
        };
        if let Some(p) = &from.sequence
            && changes.last_sequence <= *p
        {
            return Ok(false);
        }
        if let Some(expected) = &changes.expected_position
            && *expected != from.sequence
        {
            // The cache may be stale (another worker applied): read the item, then answer.
            let now = self.read_position(&shard).await?;
            if let Some(p) = &now.sequence
                && changes.last_sequence <= *p
            {
                return Ok(false);
            }
            if *expected != now.sequence {
                return Err(StateError::Conflict(format!(
                    "shard {} is at {} now, not {} as the batch was decided: another worker applied it",
                    changes.shard,
                    now.sequence.as_ref().map_or("the start", |p| p.as_str()),
                    expected.as_ref().map_or("the start", |p| p.as_str()),
                )));
            }
            return self.apply_from(changes, now).await;
        }
        self.apply_from(changes, from).await
    }

    async fn inventory(&self, event_id: &str) -> Result<Option<Inventory>, StateError> {
        self.get(event_pk(event_id), INVENTORY_SK)
            .await?
            .map(|i| self.decode_inventory(&i))
            .transpose()
    }

    async fn booking(&self, booking_id: &str) -> Result<Option<Booking>, StateError> {
        self.get(booking_pk(booking_id), BOOKING_SK)
            .await?
            .map(|i| self.decode_booking(&i))
            .transpose()
    }

    async fn outbox_after(
        &self,
        cursor: &OutboxCursor,
        max: usize,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        let mut out = Vec::new();
        // Each round starts at the next shard, so a shard with a long backlog (an on-sale
        // rush) cannot hold back the others' entries round after round.
        let shards: Vec<String> = self.shards().await?.into_iter().collect();
        let start = self
            .outbox_round
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % shards.len().max(1);
        for shard in shards[start..].iter().chain(&shards[..start]) {
            if out.len() >= max {
                break;
            }
            let after = cursor.get(shard).copied().unwrap_or(0);
            let pk = outbox_pk(shard);
            let resp = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk > :after")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":after", s(outbox_sk(after)))
                .consistent_read(true)
                .limit(i32::try_from(max - out.len()).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(|e| classify("Query", &self.table, &e))?;
            for item in resp.items() {
                let seq = num_attr(item, "seq").ok_or_else(|| self.corrupt(&pk, "no seq"))?;
                let events = str_attr(item, "events").unwrap_or_default();
                out.push(OutboxEntry {
                    partition: shard.clone(),
                    seq,
                    events: events.split('\n').map(str::to_owned).collect(),
                });
            }
        }
        Ok(out)
    }

    async fn outbox_published(&self, upto: &OutboxCursor) -> Result<(), StateError> {
        for (shard, seq) in upto {
            let pk = outbox_pk(shard);
            let mut start: Option<Item> = None;
            loop {
                let resp = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .key_condition_expression("pk = :pk AND sk <= :upto")
                    .expression_attribute_values(":pk", s(&pk))
                    .expression_attribute_values(":upto", s(outbox_sk(*seq)))
                    .projection_expression("pk, sk")
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify("Query", &self.table, &e))?;
                self.batch_delete(resp.items().to_vec()).await?;
                match resp.last_evaluated_key {
                    Some(k) if !k.is_empty() => start = Some(k),
                    _ => break,
                }
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, StateError> {
        let mut out = Vec::new();
        for shard in self.shards().await? {
            let pk = dead_pk(&shard);
            let mut start: Option<Item> = None;
            while out.len() < max {
                let resp = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", s(&pk))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify("Query", &self.table, &e))?;
                for item in resp.items() {
                    out.push(DeadLetter {
                        shard: ShardId(shard.clone()),
                        sequence: SequenceNumber::new(
                            str_attr(item, "sequence")
                                .ok_or_else(|| self.corrupt(&pk, "no sequence"))?,
                        ),
                        reason: str_attr(item, "reason").unwrap_or_default(),
                        detail: str_attr(item, "detail").unwrap_or_default(),
                        payload: str_attr(item, "payload").unwrap_or_default(),
                    });
                }
                match resp.last_evaluated_key {
                    Some(k) if !k.is_empty() => start = Some(k),
                    _ => break,
                }
            }
        }
        out.truncate(max);
        Ok(out)
    }
}

impl DynamoDbStateStore {
    async fn apply_from(&self, changes: StateChanges, from: Position) -> Result<bool, StateError> {
        let shard = changes.shard.0.clone();
        self.register(&shard).await?;
        let (items, after, units) = self.transaction(&changes, &from)?;
        let token = request_token(&self.table, &changes, &from);
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(token)
            .send()
            .await
        {
            Ok(_) => {
                self.remember(&shard, after);
                metrics::counter!("floodgate_state_write_units_total", "backend" => "dynamodb")
                    .increment(units);
                metrics::counter!("floodgate_state_transactions_total", "backend" => "dynamodb")
                    .increment(1);
                self.units
                    .fetch_add(units, std::sync::atomic::Ordering::Relaxed);
                self.transactions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                // Whatever happened, the cached position may be wrong now.
                self.forget(&shard);
                if e.code() == Some("IdempotentParameterMismatchException") {
                    return Err(StateError::Conflict(format!(
                        "DynamoDB TransactWriteItems on {}: {}",
                        self.table,
                        describe(&e)
                    )));
                }
                self.cancelled(&changes, &e)
            }
        }
    }
}
