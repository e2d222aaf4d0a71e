//! The read API over the bookings state. Answers are eventually consistent with
//! ingestion: an accepted event appears here once a processor has applied it (normally
//! within milliseconds; see the processor lag metrics).

use floodgate_core::state::StateError;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::app::Inner;
use crate::response::{self, Body};

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn unavailable(e: Option<StateError>) -> Response<Body> {
    let message = e.map_or_else(
        || "this process serves no bookings state".to_owned(),
        |e| e.to_string(),
    );
    response::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "state_unavailable",
        &message,
    )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(crate) async fn inventory(app: &Inner, event_id: &str) -> Response<Body> {
    let Some(state) = &app.state else {
        return unavailable(None);
    };
    if !valid_id(event_id) {
        return response::error(
            StatusCode::NOT_FOUND,
            "inventory_not_found",
            "no inventory for this eventId",
        );
    }
    match state.inventory(event_id).await {
        Ok(Some(i)) => response::json(
            StatusCode::OK,
            &json!({"eventId": i.event_id, "capacity": i.capacity, "reserved": i.reserved,
                    "remaining": i.remaining(), "updatedAt": rfc3339(i.updated_at_ms)}),
        ),
        Ok(None) => response::error(
            StatusCode::NOT_FOUND,
            "inventory_not_found",
            "no inventory for this eventId",
        ),
        Err(e) => unavailable(Some(e)),
    }
}

pub(crate) async fn booking(app: &Inner, booking_id: &str) -> Response<Body> {
    let Some(state) = &app.state else {
        return unavailable(None);
    };
    if !valid_id(booking_id) {
        return response::error(
            StatusCode::NOT_FOUND,
            "booking_not_found",
            "no booking with this bookingId",
        );
    }
    match state.booking(booking_id).await {
        Ok(Some(b)) => {
            let mut body = json!({"bookingId": b.booking_id, "eventId": b.event_id, "seats": b.seats,
                                  "status": b.status.as_str(), "updatedAt": rfc3339(b.updated_at_ms)});
            if let Some(reason) = b.reason {
                body["reason"] = json!(reason);
            }
            response::json(StatusCode::OK, &body)
        }
        Ok(None) => response::error(
            StatusCode::NOT_FOUND,
            "booking_not_found",
            "no booking with this bookingId",
        ),
        Err(e) => unavailable(Some(e)),
    }
}
