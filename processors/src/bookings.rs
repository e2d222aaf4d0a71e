//! Bookings and seat capacity: the rules, once, for every backend.
//!
//! A shard's batch is decided in memory against the rows it touches, then written as one
//! [`StateChanges`]: each touched inventory row once per batch, however many requests hit
//! it (the hot-key case), plus the derived events. Rules (per event, in stream order):
//!
//! - `inventory.event.created`: creates the inventory (reserved 0); a repeat is ignored.
//! - `inventory.capacity.changed`: sets capacity; below the seats already reserved (or for
//!   an unknown event) it is refused with `capacity.change_rejected`.
//! - `booking.requested`: a bookingId held by a booking of another event → rejected
//!   `duplicate_booking_id` (bookingIds are global: the store creates a booking only if its
//!   id is free, across shards); held by this event's booking → nothing (a retry); unknown
//!   event → rejected `unknown_event`; seats ≤ remaining → confirmed; else rejected
//!   `insufficient_capacity`.
//! - `booking.cancelled`, `payment.failed`: a confirmed or paid booking of the same event
//!   becomes cancelled and its seats return; anything else → nothing.
//! - `payment.succeeded`: a confirmed booking becomes paid.
//! - `checkin.scanned`: nothing.
//!
//! Integers are read as JSON Schema defines them (`2`, `2.0` and `2e0` are the same
//! integer), so whatever the edge accepts is applied; a record the rules cannot read is
//! kept as a dead letter with its reason, in the batch's transaction, never skipped.
//!
//! `capacity.low` is derived on the first crossing below 10 % remaining (again after the
//! inventory recovers to 10 % or more), `capacity.sold_out` when remaining reaches 0 (once
//! per sell-out).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use floodgate_core::state::{
    ApplyLimits, Booking, BookingStatus, DeadLetter, Inventory, ROW_BYTES, StateChanges,
    StateError, StateStore,
};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_core::trace_context::{self, TraceContext};
use serde::{Deserialize, Serialize};

use crate::runtime::{ProcessError, ShardProcessor};

/// The consumer name of the bookings processor (checkpoints, metrics).
pub const CONSUMER: &str = "bookings";
/// The `source` of derived events.
pub const DERIVED_SOURCE: &str = "floodgate";
/// `booking.rejected` reason for a request whose `bookingId` another event's booking holds.
pub const DUPLICATE_BOOKING_ID: &str = "duplicate_booking_id";

/// The fields of a domain event the rules read. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct DomainEvent<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Data<'a>,
    /// The Distributed Tracing extension, carried into the derived events. Read leniently
    /// (a record stored before the edge checked these attributes may hold anything there):
    /// a value that is no valid trace context is no context, never a dead letter.
    #[serde(default, borrow, deserialize_with = "trace_context::lenient_str")]
    traceparent: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "trace_context::lenient_str")]
    tracestate: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Data<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    event_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    booking_id: Option<Cow<'a, str>>,
    /// Numbers as JSON wrote them: JSON Schema's `integer` is a mathematical integer, so
    /// the edge accepts `2`, `2.0` and `2e0` alike, and so must the rules ([`integer`]).
    #[serde(default)]
    seats: Option<serde_json::Number>,
    #[serde(default)]
    capacity: Option<serde_json::Number>,
}

/// For `#[serde(deserialize_with)]`: an optional string, borrowed from the record when it
/// has no escapes. (serde's derive borrows a bare `Cow<str>` field but reads one inside an
/// `Option` into an owned `String`: an allocation a member an event.) `null` is `None`;
/// any other non-string is the same error as before.
fn borrowed_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    Ok(Option::<crate::lake_rows::Text<'de>>::deserialize(d)?.map(|t| t.0))
}

/// The value of a JSON number that JSON Schema calls an integer, as an `i64`: `2`, `2.0`
/// and `2e0` are all 2. `Err` names a number that is no integer or does not fit 64 bits;
/// the shipped schemas bound every member the rules read well inside that range, so only
/// a schema that lost its bounds can get there, and then the record is dead-lettered.
pub fn integer(n: &serde_json::Number) -> Result<i64, String> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        // 2^63 is exactly representable; everything below it converts without rounding
        // surprises once it is known to be integral.
        Some(f)
            if f.fract() == 0.0
                && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f) =>
        {
            Ok(f as i64)
        }
        _ => Err(format!("{n} is not an integer that fits 64 bits")),
    }
}

/// Parses the records of a batch once; `Err` (why) for a record that is not a domain
/// event.
pub fn parse(records: &[StoredRecord]) -> Vec<Result<DomainEvent<'_>, String>> {
    records
        .iter()
        .map(|r| {
            // One UTF-8 check of the whole text instead of one per string; text that is not
            // UTF-8 throughout gets the same answer as ever.
            match std::str::from_utf8(&r.payload) {
                Ok(text) => serde_json::from_str::<DomainEvent<'_>>(text),
                Err(_) => serde_json::from_slice::<DomainEvent<'_>>(&r.payload),
            }
            .map_err(|e| e.to_string())
        })
        .collect()
}

/// The ids a batch touches, to load before deciding.
pub fn touched_ids(events: &[Result<DomainEvent<'_>, String>]) -> (Vec<String>, Vec<String>) {
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
    /// Bookings this batch creates (claims), in creation order.
    created_bookings: Vec<String>,
    derived: Vec<String>,
    dead_letters: Vec<DeadLetter>,
    /// The RFC 3339 rendering of the last append time seen.
    time_cache: (i64, String),
    /// The inventories as the current slice starts from (as loaded, then as the previous
    /// slice left them): the store's condition on each row a slice writes.
    baseline: HashMap<String, Inventory>,
    /// `derived.len()` when the current record's decision began: a derived event's id
    /// counts from it, so that the id depends on the record alone, not on the batch.
    record_start: usize,
    /// The current slice's decisions, counted once the slice is applied.
    tally: Tally,
    /// The current record's trace context, which every event it derives carries.
    trace: Option<TraceContext>,
}

/// How many bookings one slice confirmed and rejected (by reason), and how many events it
/// sold out. Counted into metrics only when the slice is applied, so that a batch decided
/// again after a conflict is not counted twice.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub confirmed: u64,
    /// `(reason, count)`, in first-seen order; the reasons are a small fixed set.
    pub rejected: Vec<(&'static str, u64)>,
    pub sold_out: u64,
}

impl Tally {
    fn reject(&mut self, reason: &'static str) {
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((reason, 1)),
        }
    }

    fn record(&self) {
        if self.confirmed > 0 {
            metrics::counter!("floodgate_bookings_decisions_total", "decision" => "confirmed")
                .increment(self.confirmed);
        }
        for &(reason, n) in &self.rejected {
            metrics::counter!("floodgate_bookings_decisions_total", "decision" => "rejected", "reason" => reason)
                .increment(n);
        }
        if self.sold_out > 0 {
            metrics::counter!("floodgate_bookings_sold_out_total").increment(self.sold_out);
        }
    }
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
    /// The source event's trace context (CloudEvents Distributed Tracing extension): the
    /// same trace-id and parent-id, so a derived event joins the producer's trace as a
    /// sibling of the source event. Floodgate records no spans of its own, so a parent-id of
    /// its minting would point at a span no tracing backend holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
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
        let n = self.derived.len() - self.record_start;
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
            traceparent: self.trace.as_ref().map(|t| t.traceparent.as_str()),
            tracestate: self.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
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
                self.tally.sold_out += 1;
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

    /// Keeps a record the rules cannot apply, with its reason, in the batch's changes.
    fn dead_letter(&mut self, record: &StoredRecord, reason: &str, detail: String) {
        metrics::counter!("floodgate_processor_dead_letters_total", "consumer" => CONSUMER, "reason" => reason.to_owned()).increment(1);
        tracing::warn!(shard = %self.shard, sequence = %record.sequence, reason, %detail, "record dead-lettered");
        self.dead_letters.push(DeadLetter {
            shard: self.shard.clone(),
            sequence: record.sequence.clone(),
            reason: reason.to_owned(),
            detail,
            payload: String::from_utf8_lossy(&record.payload).into_owned(),
        });
    }

    /// An integer member the rules read: absent → `Ok(None)`; a number that is not a
    /// 64-bit integer dead-letters the record (`Err`).
    fn int_member(
        &mut self,
        record: &StoredRecord,
        name: &str,
        n: Option<&serde_json::Number>,
    ) -> Result<Option<i64>, ()> {
        match n.map(integer).transpose() {
            Ok(v) => Ok(v),
            Err(e) => {
                self.dead_letter(record, "invalid_value", format!("/data/{name}: {e}"));
                Err(())
            }
        }
    }

    fn apply(&mut self, record: &StoredRecord, event: Result<&DomainEvent<'_>, &String>) {
        self.record_start = self.derived.len();
        let event = match event {
            Ok(e) => e,
            Err(why) => {
                self.dead_letter(record, "undecodable", why.clone());
                return;
            }
        };
        self.trace =
            TraceContext::of_event(event.traceparent.as_deref(), event.tracestate.as_deref());
        let now = record.appended_at_ms;
        let data = &event.data;
        let event_id = data.event_id.as_deref().unwrap_or_default();
        // One dead letter per record at most (the first member that fails): a store keys
        // dead letters by record, and DynamoDB refuses two writes of one item in a
        // transaction.
        let Ok(seats) = self.int_member(record, "seats", data.seats.as_ref()) else {
            return;
        };
        let Ok(capacity) = self.int_member(record, "capacity", data.capacity.as_ref()) else {
            return;
        };
        match event.event_type.as_ref() {
            "inventory.event.created" => {
                if event_id.is_empty() || self.inventories.contains_key(event_id) {
                    return;
                }
                let capacity = capacity.unwrap_or(0).max(0);
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
                let capacity = capacity.unwrap_or(0);
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
                let seats = seats.unwrap_or(0);
                if let Some(first) = self.bookings.get(booking_id) {
                    // A bookingId is global. The same booking asked again for the same
                    // event is a producer's retry: no effect. For another event it is a
                    // different booking reusing a claimed id: refused, and announced.
                    if first.event_id != event_id {
                        self.tally.reject(DUPLICATE_BOOKING_ID);
                        self.derive(
                            record,
                            "booking.rejected",
                            booking_id,
                            DerivedData {
                                booking_id: Some(booking_id),
                                seats: Some(seats),
                                reason: Some(DUPLICATE_BOOKING_ID),
                                ..DerivedData::new(event_id)
                            },
                        );
                    }
                    return;
                }
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
                self.created_bookings.push(booking_id.to_owned());
                let payload = DerivedData {
                    booking_id: Some(booking_id),
                    seats: Some(seats),
                    remaining,
                    reason,
                    ..DerivedData::new(event_id)
                };
                match reason {
                    None => self.tally.confirmed += 1,
                    Some(reason) => self.tally.reject(reason),
                }
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
    events: &[Result<DomainEvent<'_>, String>],
    inventories: Vec<Inventory>,
    bookings: Vec<Booking>,
) -> StateChanges {
    decide_within(
        shard,
        records,
        events,
        inventories,
        bookings,
        ApplyLimits::UNBOUNDED,
    )
    .pop()
    .map_or_else(
        || StateChanges {
            shard: shard.clone(),
            ..StateChanges::default()
        },
        |(changes, _)| changes,
    )
}

/// The most one record's decision adds to an apply: an inventory, a booking and a dead
/// letter (items), and a few derived events (at most three: a confirmation, `capacity.low`
/// and `capacity.sold_out`), each with the record's trace context.
const ITEMS_PER_RECORD: usize = 3;
const DERIVED_BYTES_PER_RECORD: usize = 3 * 1024 + 3 * TRACE_BYTES;
/// A derived event's trace attributes at their longest: names, quotes, the `traceparent`
/// in version `00` form and a `tracestate` at its bound, every character escaped.
const TRACE_BYTES: usize =
    32 + trace_context::TRACEPARENT_V00_LEN + 2 * trace_context::MAX_TRACESTATE_BYTES;

/// [`decide`], cut into consecutive slices of `records` whose changes each fit `limits`
/// (one slice when the whole batch fits). Decisions run on through the slices in memory,
/// so the slices applied in order change exactly what the whole batch would; each slice's
/// `last_sequence` is its own last record, and a hot inventory is written once per slice.
pub fn decide_within(
    shard: &ShardId,
    records: &[StoredRecord],
    events: &[Result<DomainEvent<'_>, String>],
    inventories: Vec<Inventory>,
    bookings: Vec<Booking>,
    limits: ApplyLimits,
) -> Vec<(StateChanges, Tally)> {
    let inventories: HashMap<String, Inventory> = inventories
        .into_iter()
        .map(|i| (i.event_id.clone(), i))
        .collect();
    let mut d = Decider {
        shard: shard.clone(),
        baseline: inventories.clone(),
        inventories,
        bookings: bookings
            .into_iter()
            .map(|b| (b.booking_id.clone(), b))
            .collect(),
        touched_inventories: Vec::new(),
        touched_inventory_set: HashSet::new(),
        touched_bookings: Vec::new(),
        touched_booking_set: HashSet::new(),
        created_bookings: Vec::new(),
        derived: Vec::new(),
        dead_letters: Vec::new(),
        time_cache: (0, String::new()),
        record_start: 0,
        tally: Tally::default(),
        trace: None,
    };
    let mut slices = Vec::new();
    // Bytes of the current slice so far, beyond its rows (derived events, dead letters).
    let mut bytes = 0usize;
    let mut derived_counted = 0usize;
    // The record before this one (the current slice's last).
    let mut last: Option<&StoredRecord> = None;
    for (r, e) in records.iter().zip(events) {
        let items = d.touched_inventories.len()
            + d.touched_bookings.len()
            + d.dead_letters.len()
            + ApplyLimits::FIXED_ITEMS;
        let rows_bytes = (d.touched_inventories.len() + d.touched_bookings.len() + 2) * ROW_BYTES;
        let next_bytes = ITEMS_PER_RECORD * ROW_BYTES + DERIVED_BYTES_PER_RECORD + r.payload.len();
        if let Some(prev) = last
            && (items + ITEMS_PER_RECORD > limits.max_items
                || (bytes + rows_bytes).saturating_add(next_bytes) > limits.max_bytes)
        {
            slices.push(d.cut(prev));
            bytes = 0;
            derived_counted = 0;
        }
        let dead_before = d.dead_letters.len();
        d.apply(r, e.as_ref());
        bytes += d.derived[derived_counted..]
            .iter()
            .map(|e| e.len() + 1)
            .sum::<usize>();
        derived_counted = d.derived.len();
        bytes += d.dead_letters[dead_before..]
            .iter()
            .map(|x| x.payload.len() + x.detail.len() + x.reason.len() + ROW_BYTES)
            .sum::<usize>();
        last = Some(r);
    }
    if let Some(prev) = last {
        slices.push(d.cut(prev));
    }
    slices
}

impl Decider {
    /// The changes decided since the last cut, ending at `last`; the rows stay in memory
    /// for the decisions after it.
    fn cut(&mut self, last: &StoredRecord) -> (StateChanges, Tally) {
        self.touched_inventory_set.clear();
        self.touched_booking_set.clear();
        let mut inventories = Vec::new();
        let mut inventories_before = Vec::new();
        for id in std::mem::take(&mut self.touched_inventories) {
            let Some(now) = self.inventories.get(&id) else {
                continue;
            };
            inventories_before.push(self.baseline.insert(id, now.clone()));
            inventories.push(now.clone());
        }
        let bookings = std::mem::take(&mut self.touched_bookings)
            .iter()
            .filter_map(|id| self.bookings.get(id).cloned())
            .collect();
        let changes = StateChanges {
            shard: self.shard.clone(),
            last_sequence: last.sequence.clone(),
            expected_position: None,
            inventories,
            inventories_before,
            bookings,
            created_bookings: std::mem::take(&mut self.created_bookings),
            derived: std::mem::take(&mut self.derived),
            dead_letters: std::mem::take(&mut self.dead_letters),
        };
        (changes, std::mem::take(&mut self.tally))
    }
}

/// Decisions of one batch retried after conflicts before the batch fails (and the runtime
/// retries it later).
const MAX_CONFLICT_RETRIES: u32 = 64;

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
        // Optimistic: decide against the position and rows as loaded. The store applies
        // only from that same position (fencing a worker that lost the shard), and creates
        // this batch's bookings only if no other shard did meanwhile. On either conflict
        // the batch is decided again from what is stored now. Each conflict means another
        // worker or shard made progress, so this ends.
        let mut conflicts = 0u32;
        let mut throttles = 0u32;
        let (mut applied, mut inventory_writes, mut applied_records) = (false, 0u64, 0usize);
        'decide: loop {
            let position = self.store.position(shard).await?;
            // Drop records the store already covers (a replay overlapping the position, or
            // the slices of this batch applied before a conflict).
            let fresh: &[StoredRecord] = match &position {
                Some(p) if last.sequence <= *p => break,
                Some(p) => {
                    let start = records.partition_point(|r| r.sequence <= *p);
                    &records[start..]
                }
                None => records,
            };
            let events = parse(fresh);
            let (event_ids, booking_ids) = touched_ids(&events);
            let (inventories, bookings) = self.store.load(event_ids, booking_ids).await?;
            let slices = decide_within(
                shard,
                fresh,
                &events,
                inventories,
                bookings,
                self.store.limits(),
            );
            let mut expected = position;
            let mut start = 0;
            for (mut changes, tally) in slices {
                let next = Some(changes.last_sequence.clone());
                changes.expected_position = Some(expected);
                let writes = changes.inventories.len() as u64;
                let end = fresh.partition_point(|r| r.sequence <= changes.last_sequence);
                loop {
                    match self.store.apply(changes.clone()).await {
                        Ok(true) => {
                            tally.record();
                            applied = true;
                            inventory_writes += writes;
                            applied_records += end - start;
                        }
                        // Another worker applied this slice (from the same position): the
                        // slices after it were decided from rows it may have decided
                        // differently, so decide them again from what is stored.
                        Ok(false) => continue 'decide,
                        Err(StateError::Conflict(what)) if conflicts < MAX_CONFLICT_RETRIES => {
                            conflicts += 1;
                            metrics::counter!("floodgate_processor_conflicts_total", "consumer" => CONSUMER).increment(1);
                            tracing::debug!(%shard, %what, "the batch met a conflict; deciding again");
                            continue 'decide;
                        }
                        Err(StateError::Throttled(what)) => {
                            // Never dropped: the same slice again, after a back-off that
                            // grows to a second.
                            throttles += 1;
                            metrics::counter!("floodgate_processor_throttled_total", "consumer" => CONSUMER).increment(1);
                            tracing::debug!(%shard, %what, "the state store throttled; retrying");
                            let ms = (10u64 << throttles.min(7)).min(1000);
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    break;
                }
                start = end;
                expected = next;
            }
            break;
        }
        if applied {
            metrics::counter!("floodgate_processor_inventory_writes_total", "consumer" => CONSUMER)
                .increment(inventory_writes);
            metrics::counter!("floodgate_processor_events_applied_total", "consumer" => CONSUMER)
                .increment(applied_records as u64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::{Value, json};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// The members the rules read borrow from the record (no allocation an event); one
    /// spelled with escapes is decoded; `null` is none; a number is still refused.
    #[test]
    fn data_members_borrow_from_the_record() {
        let text = br#"{"type":"booking.requested","data":{"eventId":"concert-1","bookingId":"b\u0031","seats":2}}"#;
        let e: DomainEvent<'_> = serde_json::from_slice(text).unwrap();
        assert!(matches!(e.data.event_id, Some(Cow::Borrowed("concert-1"))));
        assert_eq!(e.data.booking_id.as_deref(), Some("b1"));
        assert!(matches!(e.data.booking_id, Some(Cow::Owned(_))));
        let null: DomainEvent<'_> =
            serde_json::from_slice(br#"{"type":"t","data":{"eventId":null}}"#).unwrap();
        assert!(null.data.event_id.is_none());
        let err =
            serde_json::from_slice::<DomainEvent<'_>>(br#"{"type":"t","data":{"eventId":5}}"#)
                .unwrap_err();
        assert!(err.to_string().contains("expected a string"), "{err}");
    }

    /// A record is read as text after one UTF-8 check of the whole; the answers are those
    /// of reading its bytes, for text that is not UTF-8 throughout too (in a member the
    /// rules skip, or in one they read).
    #[test]
    fn records_are_parsed_as_their_bytes_would_be() {
        let texts: [&'static [u8]; 7] = [
            br#"{"type":"booking.requested","data":{"eventId":"concert-1","seats":2}}"#,
            "{\"type\":\"booking.requested\",\"data\":{\"eventId\":\"café-\\u00e9\\n\",\"seats\":2}}"
                .as_bytes(),
            "{\"type\":\"booking.requested\",\"data\":{\"eventId\":\"a\u{1}b\"}}".as_bytes(),
            br#"{"type":"booking.requested","data":{"seats":2}} x"#,
            b"{\"note\":\"\xc3\",\"type\":\"booking.requested\",\"data\":{\"seats\":1}}",
            b"{\"type\":\"booking.requested\",\"data\":{\"eventId\":\"\xff\"}}",
            br#"{"type":"t","data":{"eventId":5}}"#,
        ];
        for text in texts {
            let record = StoredRecord {
                sequence: SequenceNumber::from_u64(1),
                key: "E1".into(),
                payload: Bytes::from_static(text),
                appended_at_ms: 1_700_000_000_000,
            };
            let got = parse(std::slice::from_ref(&record)).pop().unwrap();
            let want = serde_json::from_slice::<DomainEvent<'_>>(text).map_err(|e| e.to_string());
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    fn records(events: &[Value]) -> Vec<StoredRecord> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| StoredRecord {
                sequence: SequenceNumber::from_u64(i as u64),
                key: "E1".into(),
                payload: Bytes::from(e.to_string()),
                appended_at_ms: 1_700_000_000_000,
            })
            .collect()
    }

    fn request(booking_id: &str, seats: i64, trace: &[(&str, Value)]) -> Value {
        let mut e = json!({"specversion":"1.0","id":booking_id,"source":"/s","type":"booking.requested",
            "data":{"bookingId":booking_id,"eventId":"E1","seats":seats}});
        for (k, v) in trace {
            e[*k] = v.clone();
        }
        e
    }

    fn derived(events: &[Value]) -> (Vec<Value>, usize) {
        let records = records(events);
        let parsed = parse(&records);
        let inventory = Inventory {
            event_id: "E1".into(),
            capacity: 10,
            reserved: 0,
            low_notified: false,
            sold_out_notified: false,
            updated_at_ms: 0,
        };
        let changes = decide(
            &ShardId("shard-0".into()),
            &records,
            &parsed,
            vec![inventory],
            Vec::new(),
        );
        let derived = changes
            .derived
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        (derived, changes.dead_letters.len())
    }

    /// Every event a record derives carries its trace context, and only its own.
    #[test]
    fn derived_events_carry_the_source_events_trace_context() {
        let (out, dead) = derived(&[
            // Confirmed, then capacity.low and capacity.sold_out: all three traced.
            request(
                "b1",
                10,
                &[("traceparent", json!(TP)), ("tracestate", json!("congo=x"))],
            ),
            // No context: none on its rejection.
            request("b2", 1, &[]),
        ]);
        assert_eq!(dead, 0);
        let types: Vec<&str> = out.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "booking.confirmed",
                "capacity.low",
                "capacity.sold_out",
                "booking.rejected"
            ]
        );
        for e in &out[..3] {
            assert_eq!(e["traceparent"], TP, "{e}");
            assert_eq!(e["tracestate"], "congo=x", "{e}");
        }
        let rejected = out[3].as_object().unwrap();
        assert!(!rejected.contains_key("traceparent") && !rejected.contains_key("tracestate"));
    }

    /// A record stored before the edge checked trace attributes may hold anything there: it
    /// is applied as ever, its derived events without a context (and a later version's
    /// traceparent is carried in version 00 form).
    #[test]
    fn stored_trace_attributes_never_fail_a_record() {
        let later = format!("01-{}-later", &TP[3..]);
        let (out, dead) = derived(&[
            request("b1", 1, &[("traceparent", json!("00-abc-def-01"))]),
            request(
                "b2",
                1,
                &[("traceparent", json!(7)), ("tracestate", json!({"a": [1]}))],
            ),
            request(
                "b3",
                1,
                &[
                    ("traceparent", json!(TP)),
                    ("tracestate", json!("Bad=state")),
                ],
            ),
            request("b4", 1, &[("traceparent", json!(later))]),
        ]);
        assert_eq!(dead, 0);
        assert_eq!(out.len(), 4);
        assert!(out[0].get("traceparent").is_none());
        assert!(out[1].get("traceparent").is_none());
        assert_eq!(out[2]["traceparent"], TP);
        assert!(
            out[2].get("tracestate").is_none(),
            "an invalid tracestate is dropped alone"
        );
        assert_eq!(out[3]["traceparent"], TP);
    }
}
