//! Bookings and seat capacity: the rules, once, for every backend.
//!
//! A shard's batch is decided in memory against the rows it touches, then written as one
//! [`StateChanges`]: each touched inventory row once per batch, however many requests hit
//! it (the hot-key case), plus the derived events. Rules (per event, in stream order):
//!
//! - `inventory.event.created`: creates the inventory (reserved 0); a repeat is ignored.
//! - `inventory.capacity.changed`: sets capacity; below the seats already reserved (or for
//!   an unknown event) it is refused with `capacity.change_rejected`.
//! - `booking.requested`: unknown event → rejected `unknown_event`; a bookingId seen
//!   before → nothing; seats ≤ remaining → confirmed; else rejected `insufficient_capacity`.
//! - `booking.cancelled`, `payment.failed`: a confirmed or paid booking of the same event
//!   becomes cancelled and its seats return; anything else → nothing.
//! - `payment.succeeded`: a confirmed booking becomes paid.
//! - `checkin.scanned`: nothing.
//!
//! `capacity.low` is derived on the first crossing below 10 % remaining (again after the
//! inventory recovers to 10 % or more), `capacity.sold_out` when remaining reaches 0 (once
//! per sell-out).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use floodgate_core::state::{
    Booking, BookingStatus, Inventory, StateChanges, StateError, StateStore,
};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use serde::{Deserialize, Serialize};

use crate::runtime::{ProcessError, ShardProcessor};

/// The consumer name of the bookings processor (checkpoints, metrics).
pub const CONSUMER: &str = "bookings";
/// The `source` of derived events.
pub const DERIVED_SOURCE: &str = "floodgate";

/// The fields of a domain event the rules read. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct DomainEvent<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Data<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Data<'a> {
    #[serde(default, borrow)]
    event_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    booking_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seats: Option<i64>,
    #[serde(default)]
    capacity: Option<i64>,
}

/// Parses the records of a batch once; `None` for a record that is not a domain event.
pub fn parse(records: &[StoredRecord]) -> Vec<Option<DomainEvent<'_>>> {
    records
        .iter()
        .map(|r| serde_json::from_slice::<DomainEvent<'_>>(&r.payload).ok())
        .collect()
}

/// The ids a batch touches, to load before deciding.
pub fn touched_ids(events: &[Option<DomainEvent<'_>>]) -> (Vec<String>, Vec<String>) {
    let mut event_ids = HashSet::new();
    let mut booking_ids = HashSet::new();
    for e in events.iter().flatten() {
        if let Some(id) = &e.data.event_id {
            event_ids.insert(id.as_ref());
        }
        if let Some(id) = &e.data.booking_id {
            booking_ids.insert(id.as_ref());
        }
    }
    let mut event_ids: Vec<String> = event_ids.into_iter().map(str::to_owned).collect();
    let mut booking_ids: Vec<String> = booking_ids.into_iter().map(str::to_owned).collect();
    event_ids.sort_unstable();
    booking_ids.sort_unstable();
    (event_ids, booking_ids)
}

struct Decider {
    shard: ShardId,
    inventories: HashMap<String, Inventory>,
    bookings: HashMap<String, Booking>,
    /// Touched rows, in first-touch order (kept with a set for O(1) membership).
    touched_inventories: Vec<String>,
    touched_inventory_set: HashSet<String>,
    touched_bookings: Vec<String>,
    touched_booking_set: HashSet<String>,
    derived: Vec<String>,
    /// The RFC 3339 rendering of the last append time seen.
    time_cache: (i64, String),
}

/// Every derived event type, for the lake's tables.
pub const DERIVED_TYPES: [&str; 6] = [
    "booking.confirmed",
    "booking.rejected",
    "booking.cancelled",
    "capacity.low",
    "capacity.sold_out",
    "capacity.change_rejected",
];

/// The JSON Schema of every derived event's `data` (each type fills the members that apply).
pub fn derived_data_schema() -> serde_json::Value {
    let id = serde_json::json!({"type": "string"});
    let count = serde_json::json!({"type": "integer", "minimum": 0, "maximum": 2_147_483_647});
    serde_json::json!({
        "type": "object",
        "required": ["eventId"],
        "additionalProperties": false,
        "properties": {
            "eventId": id, "bookingId": id,
            "seats": count, "capacity": count, "reserved": count, "remaining": count,
            "reason": {"type": "string"}, "cause": {"type": "string"},
        }
    })
}

/// A derived event, as published.
#[derive(Serialize)]
struct DerivedEvent<'a> {
    specversion: &'static str,
    id: String,
    source: &'static str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: &'a str,
    datacontenttype: &'static str,
    data: DerivedData<'a>,
}

/// The `data` of a derived event: `eventId` always, the rest where it applies.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DerivedData<'a> {
    event_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    booking_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seats: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// What cancelled a booking: `booking.cancelled` or `payment.failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'a str>,
}

impl<'a> DerivedData<'a> {
    fn new(event_id: &'a str) -> Self {
        Self {
            event_id,
            booking_id: None,
            seats: None,
            capacity: None,
            reserved: None,
            remaining: None,
            reason: None,
            cause: None,
        }
    }
}

impl Decider {
    fn touch_inventory(&mut self, id: &str) {
        if !self.touched_inventory_set.contains(id) {
            self.touched_inventory_set.insert(id.to_owned());
            self.touched_inventories.push(id.to_owned());
        }
    }

    fn touch_booking(&mut self, id: &str) {
        if !self.touched_booking_set.contains(id) {
            self.touched_booking_set.insert(id.to_owned());
            self.touched_bookings.push(id.to_owned());
        }
    }

    fn derive(
        &mut self,
        record: &StoredRecord,
        event_type: &str,
        subject: &str,
        data: DerivedData<'_>,
    ) {
        let n = self.derived.len();
        if self.time_cache.0 != record.appended_at_ms || self.time_cache.1.is_empty() {
            let time = time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(record.appended_at_ms) * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
            self.time_cache = (record.appended_at_ms, time);
        }
        let event = DerivedEvent {
            specversion: "1.0",
            // Deterministic: the same source record always derives the same ids.
            id: format!("{}-{}-{}-{n}", event_type, self.shard, record.sequence),
            source: DERIVED_SOURCE,
            event_type,
            subject,
            time: &self.time_cache.1,
            datacontenttype: "application/json",
            data,
        };
        self.derived
            .push(serde_json::to_string(&event).expect("derived events serialize"));
    }

    /// After reserved or capacity changed: derive low / sold-out crossings, reset flags on
    /// recovery.
    fn capacity_signals(&mut self, record: &StoredRecord, event_id: &str) {
        let Some(inv) = self.inventories.get_mut(event_id) else {
            return;
        };
        let remaining = inv.remaining();
        let mut out = Vec::new();
        if remaining * 10 < inv.capacity {
            if !inv.low_notified {
                inv.low_notified = true;
                out.push((
                    "capacity.low",
                    DerivedData {
                        capacity: Some(inv.capacity),
                        remaining: Some(remaining),
                        ..DerivedData::new(event_id)
                    },
                ));
            }
        } else {
            inv.low_notified = false;
        }
        if remaining == 0 && inv.capacity > 0 {
            if !inv.sold_out_notified {
                inv.sold_out_notified = true;
                out.push((
                    "capacity.sold_out",
                    DerivedData {
                        capacity: Some(inv.capacity),
                        ..DerivedData::new(event_id)
                    },
                ));
            }
        } else if remaining > 0 {
            inv.sold_out_notified = false;
        }
        for (ty, data) in out {
            self.derive(record, ty, event_id, data);
        }
    }

    fn apply(&mut self, record: &StoredRecord, event: Option<&DomainEvent<'_>>) {
        let Some(event) = event else {
            metrics::counter!("floodgate_processor_undecodable_records_total", "consumer" => CONSUMER).increment(1);
            tracing::warn!(shard = %self.shard, sequence = %record.sequence, "record is not a domain event; skipped");
            return;
        };
        let now = record.appended_at_ms;
        let data = &event.data;
        let event_id = data.event_id.as_deref().unwrap_or_default();
        match event.event_type.as_ref() {
            "inventory.event.created" => {
                if event_id.is_empty() || self.inventories.contains_key(event_id) {
                    return;
                }
                let capacity = data.capacity.unwrap_or(0).max(0);
                self.inventories.insert(
                    event_id.to_owned(),
                    Inventory {
                        event_id: event_id.to_owned(),
                        capacity,
                        reserved: 0,
                        low_notified: false,
                        sold_out_notified: false,
                        updated_at_ms: now,
                    },
                );
                self.touch_inventory(event_id);
            }
            "inventory.capacity.changed" => {
                let capacity = data.capacity.unwrap_or(0);
                let reserved = match self.inventories.get(event_id) {
                    None => {
                        self.derive(
                            record,
                            "capacity.change_rejected",
                            event_id,
                            DerivedData {
                                capacity: Some(capacity),
                                reason: Some("unknown_event"),
                                ..DerivedData::new(event_id)
                            },
                        );
                        return;
                    }
                    Some(inv) => inv.reserved,
                };
                if capacity < reserved {
                    self.derive(
                        record,
                        "capacity.change_rejected",
                        event_id,
                        DerivedData {
                            capacity: Some(capacity),
                            reserved: Some(reserved),
                            reason: Some("below_reserved"),
                            ..DerivedData::new(event_id)
                        },
                    );
                    return;
                }
                let inv = self.inventories.get_mut(event_id).expect("checked above");
                inv.capacity = capacity;
                inv.updated_at_ms = now;
                self.touch_inventory(event_id);
                self.capacity_signals(record, event_id);
            }
            "booking.requested" => {
                let Some(booking_id) = data.booking_id.as_deref() else {
                    return;
                };
                if self.bookings.contains_key(booking_id) {
                    return; // a bookingId seen before: no effect
                }
                let seats = data.seats.unwrap_or(0);
                let (status, reason, remaining) = match self.inventories.get_mut(event_id) {
                    None => (BookingStatus::Rejected, Some("unknown_event"), None),
                    Some(inv) if seats > 0 && seats <= inv.remaining() => {
                        inv.reserved += seats;
                        inv.updated_at_ms = now;
                        (BookingStatus::Confirmed, None, Some(inv.remaining()))
                    }
                    Some(inv) => (
                        BookingStatus::Rejected,
                        Some("insufficient_capacity"),
                        Some(inv.remaining()),
                    ),
                };
                self.bookings.insert(
                    booking_id.to_owned(),
                    Booking {
                        booking_id: booking_id.to_owned(),
                        event_id: event_id.to_owned(),
                        seats,
                        status,
                        reason: reason.map(str::to_owned),
                        updated_at_ms: now,
                    },
                );
                self.touch_booking(booking_id);
                let payload = DerivedData {
                    booking_id: Some(booking_id),
                    seats: Some(seats),
                    remaining,
                    reason,
                    ..DerivedData::new(event_id)
                };
                if status == BookingStatus::Confirmed {
                    self.touch_inventory(event_id);
                    self.derive(record, "booking.confirmed", booking_id, payload);
                    self.capacity_signals(record, event_id);
                } else {
                    self.derive(record, "booking.rejected", booking_id, payload);
                }
            }
            "booking.cancelled" | "payment.failed" => {
                let Some(booking_id) = data.booking_id.as_deref() else {
                    return;
                };
                let Some(b) = self.bookings.get_mut(booking_id) else {
                    return;
                };
                if b.event_id != event_id
                    || !matches!(b.status, BookingStatus::Confirmed | BookingStatus::Paid)
                {
                    return;
                }
                b.status = BookingStatus::Cancelled;
                b.updated_at_ms = now;
                let seats = b.seats;
                let remaining = self.inventories.get_mut(event_id).map(|inv| {
                    inv.reserved -= seats;
                    inv.updated_at_ms = now;
                    inv.remaining()
                });
                self.touch_booking(booking_id);
                self.touch_inventory(event_id);
                self.derive(
                    record,
                    "booking.cancelled",
                    booking_id,
                    DerivedData {
                        booking_id: Some(booking_id),
                        seats: Some(seats),
                        remaining,
                        cause: Some(event.event_type.as_ref()),
                        ..DerivedData::new(event_id)
                    },
                );
                self.capacity_signals(record, event_id);
            }
            "payment.succeeded" => {
                let Some(booking_id) = data.booking_id.as_deref() else {
                    return;
                };
                if let Some(b) = self.bookings.get_mut(booking_id)
                    && b.event_id == event_id
                    && b.status == BookingStatus::Confirmed
                {
                    b.status = BookingStatus::Paid;
                    b.updated_at_ms = now;
                    self.touch_booking(booking_id);
                }
            }
            _ => {} // checkin.scanned and types without state effects
        }
    }
}

/// Decides a batch of one shard against the current rows it touches. Pure: no I/O.
/// `events` is [`parse`] of `records`.
pub fn decide(
    shard: &ShardId,
    records: &[StoredRecord],
    events: &[Option<DomainEvent<'_>>],
    inventories: Vec<Inventory>,
    bookings: Vec<Booking>,
) -> StateChanges {
    let mut d = Decider {
        shard: shard.clone(),
        inventories: inventories
            .into_iter()
            .map(|i| (i.event_id.clone(), i))
            .collect(),
        bookings: bookings
            .into_iter()
            .map(|b| (b.booking_id.clone(), b))
            .collect(),
        touched_inventories: Vec::new(),
        touched_inventory_set: HashSet::new(),
        touched_bookings: Vec::new(),
        touched_booking_set: HashSet::new(),
        derived: Vec::new(),
        time_cache: (0, String::new()),
    };
    for (r, e) in records.iter().zip(events) {
        d.apply(r, e.as_ref());
    }
    let last_sequence = records
        .last()
        .map(|r| r.sequence.clone())
        .unwrap_or_default();
    let inventories = d
        .touched_inventories
        .iter()
        .filter_map(|id| d.inventories.remove(id))
        .collect();
    let bookings = d
        .touched_bookings
        .iter()
        .filter_map(|id| d.bookings.remove(id))
        .collect();
    StateChanges {
        shard: shard.clone(),
        last_sequence,
        inventories,
        bookings,
        derived: d.derived,
    }
}

/// The bookings processor: load, decide, apply — one state transaction per batch.
#[derive(Debug)]
pub struct BookingsProcessor {
    store: Arc<dyn StateStore>,
}

impl BookingsProcessor {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self { store }
    }

    /// Applies one batch; a batch at or below the stored position is skipped whole.
    pub async fn apply_batch(
        &self,
        shard: &ShardId,
        records: &[StoredRecord],
    ) -> Result<bool, StateError> {
        let Some(last) = records.last() else {
            return Ok(false);
        };
        let position = self.store.position(shard).await?;
        // Drop records the store already covers (a replay overlapping the position).
        let fresh: &[StoredRecord] = match &position {
            Some(p) if last.sequence <= *p => return Ok(false),
            Some(p) => {
                let start = records.partition_point(|r| r.sequence <= *p);
                &records[start..]
            }
            None => records,
        };
        let events = parse(fresh);
        let (event_ids, booking_ids) = touched_ids(&events);
        let (inventories, bookings) = self.store.load(event_ids, booking_ids).await?;
        let changes = decide(shard, fresh, &events, inventories, bookings);
        let inventory_writes = changes.inventories.len() as u64;
        let applied = self.store.apply(changes).await?;
        if applied {
            metrics::counter!("floodgate_processor_inventory_writes_total", "consumer" => CONSUMER)
                .increment(inventory_writes);
            metrics::counter!("floodgate_processor_events_applied_total", "consumer" => CONSUMER)
                .increment(fresh.len() as u64);
        }
        Ok(applied)
    }
}

#[async_trait]
impl ShardProcessor for BookingsProcessor {
    fn consumer(&self) -> &str {
        CONSUMER
    }

    async fn start_position(
        &self,
        shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, ProcessError> {
        Ok(self.store.position(shard).await?)
    }

    async fn process(&self, shard: &ShardId, records: &[StoredRecord]) -> Result<(), ProcessError> {
        self.apply_batch(shard, records).await?;
        Ok(())
    }
}
