//! [`EventBridgePublisher`]: the relay's [`Publisher`] on AWS, one `PutEvents` entry per
//! derived event, on one event bus.
//!
//! Each entry's `Source` is `floodgate`, its `DetailType` the derived event's CloudEvents
//! `type` (`booking.confirmed`, …), its `Detail` the whole CloudEvent as JSON, and, when
//! the event carries a `traceparent`, its `TraceHeader` that trace in X-Ray form. Rules on the
//! bus route by them, e.g. `{"source": ["floodgate"], "detail-type": ["booking.confirmed"]}`
//! to an SQS queue or an SNS topic.
//!
//! # Delivery: at least once
//!
//! A call carries at most [`MAX_ENTRIES_PER_CALL`] entries and [`MAX_CALL_BYTES`] bytes (as
//! EventBridge counts them). Entries EventBridge failed on their own (`FailedEntryCount`:
//! throttling, internal failures) are sent again, alone, with jittered exponential
//! back-off, until [`PUBLISH_DEADLINE`]; the whole call's throttling and 5xx are retried by
//! the SDK. `publish` returns only once every entry was accepted, else fails and the relay
//! sends the same outbox entries again.
//!
//! EventBridge cannot be read back, so [`Publisher::last_published`] knows nothing: the
//! relay's position is the state store's outbox itself, whose entries are forgotten once
//! published (`StateStore::outbox_published`). A relay that dies between a publish and
//! that forgetting, or a publish cut short, leaves entries that the next relay sends
//! again: subscribers see an event more than once, rarely, as EventBridge itself may
//! deliver. Every derived event has a deterministic `id` (`<type>-<shard>-<sequence>-<n>`,
//! a function of the stream record it came from), so a subscriber drops repeats by it.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_eventbridge::Client;
use aws_sdk_eventbridge::error::ProvideErrorMetadata as _;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use floodgate_core::state::{OutboxCursor, OutboxEntry, PublishError, Publisher};
use floodgate_core::trace_context::{self, TraceParent};
use serde::Deserialize;

use crate::client::describe;

/// Entries in one `PutEvents` call.
pub const MAX_ENTRIES_PER_CALL: usize = 10;
/// Bytes of entries in one `PutEvents` call (256 KB), as EventBridge counts an entry.
pub const MAX_CALL_BYTES: usize = 256 * 1024;
/// The `Source` of every entry.
pub const SOURCE: &str = "floodgate";
/// How long one `publish` keeps retrying failed entries before it gives up (the relay
/// then tries the same outbox entries again).
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// An entry's size as EventBridge counts it: `Source`, `DetailType`, `Detail`, and 14
/// bytes for `Time` (sent or not; counted from above).
pub fn entry_bytes(detail_type: &str, detail: &str) -> usize {
    14 + SOURCE.len() + detail_type.len() + detail.len()
}

#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "trace_context::lenient_str")]
    traceparent: Option<std::borrow::Cow<'a, str>>,
}

/// An entry's `TraceHeader`: the derived event's `traceparent` as an X-Ray trace header
/// (same trace and parent), so that EventBridge hands the trace on to its targets. The
/// CloudEvent in `Detail` keeps the W3C attributes themselves. `None` without a valid one.
pub fn trace_header(traceparent: Option<&str>) -> Option<String> {
    TraceParent::parse(traceparent?)
        .ok()
        .map(|p| p.xray_header())
}

/// Derived events to an EventBridge bus (see the module docs).
#[derive(Debug, Clone)]
pub struct EventBridgePublisher {
    client: Client,
    bus: String,
}

impl EventBridgePublisher {
    pub fn new(client: Client, bus: impl Into<String>) -> Self {
        Self {
            client,
            bus: bus.into(),
        }
    }

    fn error(&self, what: impl std::fmt::Display) -> PublishError {
        PublishError(format!("EventBridge bus {}: {what}", self.bus))
    }

    fn entry(&self, event: &str) -> Result<(PutEventsRequestEntry, usize), PublishError> {
        let typed: Typed<'_> = serde_json::from_str(event)
            .map_err(|e| self.error(format_args!("a derived event has no type: {e}")))?;
        let size = entry_bytes(&typed.event_type, event);
        if size > MAX_CALL_BYTES {
            return Err(self.error(format_args!(
                "a derived event of {size} bytes is larger than an entry may be ({MAX_CALL_BYTES})"
            )));
        }
        Ok((
            PutEventsRequestEntry::builder()
                .event_bus_name(&self.bus)
                .source(SOURCE)
                .detail_type(typed.event_type.as_ref())
                .detail(event)
                .set_trace_header(trace_header(typed.traceparent.as_deref()))
                .build(),
            size,
        ))
    }

    /// Sends `entries` (one call's worth), again and again for those that fail, until all
    /// are accepted or the deadline passes.
    async fn put(
        &self,
        mut entries: Vec<PutEventsRequestEntry>,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let mut attempt = 0u32;
        loop {
            let out = self
                .client
                .put_events()
                .set_entries(Some(entries.clone()))
                .send()
                .await
                .map_err(|e| self.error(format_args!("PutEvents: {}", describe(&e))))?;
            if out.failed_entry_count() == 0 {
                metrics::counter!("floodgate_eventbridge_entries_total", "outcome" => "accepted")
                    .increment(entries.len() as u64);
                return Ok(());
            }
            let results = out.entries();
            let mut failed = Vec::new();
            let mut why = String::new();
            for (i, e) in entries.into_iter().enumerate() {
                match results.get(i) {
                    Some(r) if r.error_code().is_none() && r.event_id().is_some() => {
                        metrics::counter!("floodgate_eventbridge_entries_total", "outcome" => "accepted").increment(1);
                    }
                    r => {
                        if why.is_empty() {
                            why = r
                                .map(|r| {
                                    format!(
                                        "{}: {}",
                                        r.error_code().unwrap_or("no code"),
                                        r.error_message().unwrap_or("")
                                    )
                                })
                                .unwrap_or_else(|| "no result for the entry".to_owned());
                        }
                        failed.push(e);
                    }
                }
            }
            metrics::counter!("floodgate_eventbridge_entries_total", "outcome" => "retried")
                .increment(failed.len() as u64);
            attempt += 1;
            let pause = backoff(attempt);
            if Instant::now() + pause > deadline {
                return Err(self.error(format_args!(
                    "{} entries still failing after {attempt} attempts ({why})",
                    failed.len()
                )));
            }
            tracing::debug!(failed = failed.len(), %why, "PutEvents failed entries; retrying them");
            tokio::time::sleep(pause).await;
            entries = failed;
        }
    }
}

/// Full-jitter exponential back-off: up to 50 ms × 2^attempt, at most 2 s.
fn backoff(attempt: u32) -> Duration {
    let cap = (50u64 << attempt.min(6)).min(2000);
    let mut b = [0u8; 8];
    let r = getrandom::fill(&mut b).map_or(cap / 2, |()| u64::from_le_bytes(b));
    Duration::from_millis(r % (cap + 1))
}

#[async_trait]
impl Publisher for EventBridgePublisher {
    async fn last_published(&self) -> Result<OutboxCursor, PublishError> {
        Ok(OutboxCursor::new())
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let mut call = Vec::new();
        let mut bytes = 0;
        for event in entries.iter().flat_map(|e| e.events.iter()) {
            let (entry, size) = self.entry(event)?;
            if call.len() == MAX_ENTRIES_PER_CALL || bytes + size > MAX_CALL_BYTES {
                self.put(std::mem::take(&mut call), deadline).await?;
                bytes = 0;
            }
            call.push(entry);
            bytes += size;
        }
        if !call.is_empty() {
            self.put(call, deadline).await?;
        }
        Ok(())
    }
}

/// Creates the event bus `name` if it is missing. Idempotent.
pub async fn ensure_bus(
    client: &Client,
    name: &str,
) -> Result<crate::leases::TableOutcome, String> {
    use crate::leases::TableOutcome;
    match client.describe_event_bus().name(name).send().await {
        Ok(_) => return Ok(TableOutcome::Exists),
        Err(e) if e.code() == Some("ResourceNotFoundException") => {}
        Err(e) => {
            return Err(format!(
                "EventBridge DescribeEventBus {name}: {}",
                describe(&e)
            ));
        }
    }
    match client.create_event_bus().name(name).send().await {
        Ok(_) => Ok(TableOutcome::Created),
        Err(e) if e.code() == Some("ResourceAlreadyExistsException") => Ok(TableOutcome::Exists),
        Err(e) => Err(format!(
            "EventBridge CreateEventBus {name}: {}",
            describe(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_header_is_the_traceparent_in_xray_form() {
        assert_eq!(
            trace_header(Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ))
            .as_deref(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        assert_eq!(trace_header(Some("00-abc-def-01")), None);
        assert_eq!(trace_header(None), None);
    }

    #[test]
    fn an_entry_carries_the_trace_header() {
        let config = aws_sdk_eventbridge::Config::builder()
            .behavior_version(aws_sdk_eventbridge::config::BehaviorVersion::latest())
            .build();
        let publisher = EventBridgePublisher::new(Client::from_conf(config), "bus");
        let traced = r#"{"type":"booking.confirmed","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00","data":{}}"#;
        let (entry, _) = publisher.entry(traced).unwrap();
        assert_eq!(
            entry.trace_header(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=0")
        );
        let (entry, _) = publisher
            .entry(r#"{"type":"booking.confirmed","traceparent":5,"data":{}}"#)
            .unwrap();
        assert_eq!(entry.trace_header(), None);
    }
}
