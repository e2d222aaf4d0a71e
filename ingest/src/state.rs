//! The read API over the bookings state. Answers are eventually consistent with
//! ingestion: an accepted event appears here once a processor has applied it (normally
//! within milliseconds; see the processor lag metrics).

use std::sync::Arc;

use floodgate_core::state::{StateError, StateStore};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::error::EdgeError;
use crate::response::{self, Body};

/// The read routes over the bookings state; `None` when this process serves none.
pub(crate) struct Reads {
    state: Option<Arc<dyn StateStore>>,
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn unavailable(e: StateError) -> EdgeError {
    EdgeError::StateUnavailable(Some(e.to_string()))
}

const NO_INVENTORY: EdgeError = EdgeError::NotFound {
    code: "inventory_not_found",
    message: "no inventory for this eventId",
};

const NO_BOOKING: EdgeError = EdgeError::NotFound {
    code: "booking_not_found",
    message: "no booking with this bookingId",
};

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Reads {
    pub(crate) fn new(state: Option<Arc<dyn StateStore>>) -> Self {
        Self { state }
    }

    pub(crate) async fn inventory(&self, event_id: &str) -> Response<Body> {
        self.inventory_of(event_id)
            .await
            .unwrap_or_else(EdgeError::into_response)
    }

    pub(crate) async fn booking(&self, booking_id: &str) -> Response<Body> {
        self.booking_of(booking_id)
            .await
            .unwrap_or_else(EdgeError::into_response)
    }

    fn state(&self) -> Result<&dyn StateStore, EdgeError> {
        self.state
            .as_deref()
            .ok_or(EdgeError::StateUnavailable(None))
    }

    async fn inventory_of(&self, event_id: &str) -> Result<Response<Body>, EdgeError> {
        let state = self.state()?;
        if !valid_id(event_id) {
            return Err(NO_INVENTORY);
        }
        let i = state
            .inventory(event_id)
            .await
            .map_err(unavailable)?
            .ok_or(NO_INVENTORY)?;
        Ok(response::json(
            StatusCode::OK,
            &json!({"eventId": i.event_id, "capacity": i.capacity, "reserved": i.reserved,
                    "remaining": i.remaining(), "updatedAt": rfc3339(i.updated_at_ms)}),
        ))
    }

    async fn booking_of(&self, booking_id: &str) -> Result<Response<Body>, EdgeError> {
        let state = self.state()?;
        if !valid_id(booking_id) {
            return Err(NO_BOOKING);
        }
        let b = state
            .booking(booking_id)
            .await
            .map_err(unavailable)?
            .ok_or(NO_BOOKING)?;
        let mut body = json!({"bookingId": b.booking_id, "eventId": b.event_id, "seats": b.seats,
                              "status": b.status.as_str(), "updatedAt": rfc3339(b.updated_at_ms)});
        if let Some(reason) = b.reason {
            body["reason"] = json!(reason);
        }
        Ok(response::json(StatusCode::OK, &body))
    }
}
