//! `floodgate-ingest`: the HTTP edge.
//!
//! A request flows: [`server::serve`] accepts connections (HTTP/1.1 and cleartext HTTP/2)
//! → [`app::App::handle`] routes it → for `POST /v1/events`, [`events`] picks the body
//! format from `Content-Type`, reads the body within its limit, decodes and checks every
//! event against the schema registry (off the async workers when the batch is large),
//! appends the valid ones through the [`StreamWriter`] role, and answers one result per
//! event only after the stream has made them durable.
//!
//! `GET /v1/inventory/{eventId}` and `GET /v1/bookings/{bookingId}` read the bookings
//! state through the [`StateStore`] role ([`state`]); they are eventually consistent with
//! ingestion: an accepted event shows there once a processor has applied it.
//!
//! [`App`] is built by [`App::builder`] apart from any socket, so tests drive it directly.
//! Every whole-request refusal is one `EdgeError` (`error`), which knows its status, code
//! and headers.
//! [`telemetry`] installs the Prometheus recorder behind `GET /metrics`; [`ops`] serves
//! `/metrics`, `/healthz` and `/readyz` for a process that runs no edge (`floodgate process`).
//!
//! Invariants: no request, however malformed, panics a task or blocks the runtime for
//! long; every whole-request error is a JSON `{"error":{"code","message"}}`.
//!
//! [`StreamWriter`]: floodgate_core::stream::StreamWriter
//! [`StateStore`]: floodgate_core::state::StateStore

pub mod app;
pub mod auth;
pub mod dedupe;
pub mod encoding;
mod error;
pub mod events;
mod limits;
pub mod openapi;
pub mod ops;
mod response;
pub mod server;
mod state;
pub mod telemetry;

pub use app::{App, AppBuilder};
