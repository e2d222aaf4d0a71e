//! The edge as a plain async function from request to response: routing, the small
//! routes, and request metrics. An [`App`] needs no socket, so tests call
//! [`App::handle`] directly; [`App::builder`] makes one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use floodgate_core::config::IngestConfig;
use floodgate_core::registry::Registry;
use floodgate_core::state::StateStore;
use floodgate_core::stream::{ConsumerLag, StreamWriter};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::auth::Auth;
use crate::dedupe::Deduper;
use crate::error::EdgeError;
use crate::events::Events;
use crate::response::{self, Body};
use crate::state::Reads;

pub use crate::limits::Limits;

/// What the routes share; built once by [`AppBuilder::build`], then read-only.
struct Inner {
    events: Events,
    reads: Reads,
    registry: Arc<Registry>,
    /// Asked whether it can take writes, for `/readyz`.
    stream: Arc<dyn StreamWriter>,
    auth: Arc<Auth>,
    request_timeout: Duration,
    metrics: PrometheusHandle,
    schema_list: Bytes,
    openapi: Bytes,
}

/// Builds an [`App`]: the required parts up front, the optional ones by name.
///
/// ```text
/// let app = App::builder(registry, stream, metrics)
///     .limits(Limits::from_config(&config.ingest))
///     .state(state)
///     .auth(auth)
///     .build();
/// ```
#[must_use = "an AppBuilder does nothing until built"]
pub struct AppBuilder {
    registry: Arc<Registry>,
    stream: Arc<dyn StreamWriter>,
    metrics: PrometheusHandle,
    limits: Limits,
    state: Option<Arc<dyn StateStore>>,
    auth: Arc<Auth>,
    lag: Option<Arc<ConsumerLag>>,
    quarantine: Option<Arc<dyn StreamWriter>>,
}

impl std::fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppBuilder")
            .field("limits", &self.limits)
            .field("state", &self.state.is_some())
            .field("quarantine", &self.quarantine.is_some())
            .field("consumer_lag", &self.lag.is_some())
            .finish_non_exhaustive()
    }
}

impl AppBuilder {
    /// The edge's limits (default: those of a default `[ingest]`).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves the read API (`/v1/inventory`, `/v1/bookings`) from `state`; without it,
    /// those routes answer 503.
    pub fn state(mut self, state: Arc<dyn StateStore>) -> Self {
        self.state = Some(state);
        self
    }

    /// Puts `auth` in front of the protected routes (default: open).
    pub fn auth(mut self, auth: Arc<Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// Keeps every rejected event (and unreadable body) in `quarantine` before answering.
    pub fn quarantine(mut self, quarantine: Arc<dyn StreamWriter>) -> Self {
        self.quarantine = Some(quarantine);
        self
    }

    /// Lets the edge refuse new events while these consumers are too far behind
    /// (`max_consumer_lag_records`, `max_consumer_lag_ms`).
    pub fn consumer_lag(mut self, lag: Arc<ConsumerLag>) -> Self {
        self.lag = Some(lag);
        self
    }

    pub fn build(self) -> App {
        let registry = self.registry;
        let schema_list = Bytes::from(
            serde_json::to_vec(&json!({ "schemas": registry.summaries() })).expect("serializable"),
        );
        let openapi = Bytes::from(
            serde_json::to_vec(&crate::openapi::document(&registry)).expect("serializable"),
        );
        App {
            inner: Arc::new(Inner {
                request_timeout: self.limits.request_timeout,
                events: Events::new(
                    registry.clone(),
                    self.stream.clone(),
                    self.limits,
                    self.auth.clone(),
                    self.lag,
                    self.quarantine,
                ),
                reads: Reads::new(self.state),
                registry,
                stream: self.stream,
                auth: self.auth,
                metrics: self.metrics,
                schema_list,
                openapi,
            }),
        }
    }
}

/// The edge application. Cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Routes, as metric labels: a small fixed set.
const ROUTE_EVENTS: &str = "/v1/events";
const ROUTE_SCHEMA: &str = "/v1/schemas/{type}/{version}";

impl App {
    /// An app over `stream`, open to all, with default limits and no read API; see
    /// [`AppBuilder`] for the rest.
    pub fn builder(
        registry: Arc<Registry>,
        stream: Arc<dyn StreamWriter>,
        metrics: PrometheusHandle,
    ) -> AppBuilder {
        AppBuilder {
            registry,
            stream,
            metrics,
            limits: Limits::from_config(&IngestConfig::default()),
            state: None,
            auth: Arc::new(Auth::open()),
            lag: None,
            quarantine: None,
        }
    }

    /// The dedupe memory, to rebuild from the log at start-up; `None` when dedupe is off.
    pub fn deduper(&self) -> Option<&Deduper> {
        self.inner.events.deduper()
    }

    /// Answers one request. Never panics on input; every error is a JSON body.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let (route, resp) =
            match tokio::time::timeout(self.inner.request_timeout, self.route(&method, &path, req))
                .await
            {
                Ok(answer) => answer,
                // An event whose append was still in flight may yet be durable: the producer
                // retries, as after any lost response.
                Err(_) => ("timeout", EdgeError::RequestTimeout.into_response()),
            };
        let status = resp.status().as_u16().to_string();
        metrics::counter!("floodgate_ingest_requests_total", "route" => route, "status" => status)
            .increment(1);
        metrics::histogram!("floodgate_ingest_request_duration_seconds", "route" => route)
            .record(started.elapsed().as_secs_f64());
        resp
    }

    async fn route<B>(
        &self,
        method: &Method,
        path: &str,
        req: Request<B>,
    ) -> (&'static str, Response<Body>)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        let get = method == Method::GET || method == Method::HEAD;
        match path {
            "/v1/events" if method == Method::POST => (ROUTE_EVENTS, inner.events.post(req).await),
            "/v1/events" => (ROUTE_EVENTS, not_allowed("POST")),
            "/healthz" if get => (
                "/healthz",
                response::json(StatusCode::OK, &json!({"status": "ok"})),
            ),
            "/readyz" if get => ("/readyz", self.ready().await),
            "/metrics" if get => (
                "/metrics",
                response::with_type(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    Bytes::from(crate::telemetry::render(&inner.metrics)),
                ),
            ),
            "/v1/schemas" if get => (
                "/v1/schemas",
                response::with_type(StatusCode::OK, response::JSON, inner.schema_list.clone()),
            ),
            "/openapi.json" if get => (
                "/openapi.json",
                response::with_type(StatusCode::OK, response::JSON, inner.openapi.clone()),
            ),
            "/healthz" | "/readyz" | "/metrics" | "/v1/schemas" | "/openapi.json" => {
                ("unmatched", not_allowed("GET, HEAD"))
            }
            p if p.starts_with("/v1/inventory/") => {
                if !get {
                    return ("/v1/inventory/{eventId}", not_allowed("GET, HEAD"));
                }
                if let Err(r) = inner.auth.authenticate(req.headers()) {
                    return (
                        "/v1/inventory/{eventId}",
                        EdgeError::from(r).into_response(),
                    );
                }
                (
                    "/v1/inventory/{eventId}",
                    inner.reads.inventory(&p["/v1/inventory/".len()..]).await,
                )
            }
            p if p.starts_with("/v1/bookings/") => {
                if !get {
                    return ("/v1/bookings/{bookingId}", not_allowed("GET, HEAD"));
                }
                if let Err(r) = inner.auth.authenticate(req.headers()) {
                    return (
                        "/v1/bookings/{bookingId}",
                        EdgeError::from(r).into_response(),
                    );
                }
                (
                    "/v1/bookings/{bookingId}",
                    inner.reads.booking(&p["/v1/bookings/".len()..]).await,
                )
            }
            p if p.starts_with("/v1/schemas/") => {
                if !get {
                    return (ROUTE_SCHEMA, not_allowed("GET, HEAD"));
                }
                (ROUTE_SCHEMA, self.schema(&p["/v1/schemas/".len()..]))
            }
            _ => (
                "unmatched",
                EdgeError::NotFound {
                    code: "not_found",
                    message: "no such route; see /openapi.json",
                }
                .into_response(),
            ),
        }
    }

    /// The answer to `/readyz`: 200 while the stream takes appends.
    pub(crate) async fn ready(&self) -> Response<Body> {
        match self.inner.stream.check_writable().await {
            Ok(()) => response::json(StatusCode::OK, &json!({"status": "ready"})),
            Err(e) => EdgeError::NotReady(e.to_string()).into_response(),
        }
    }

    fn schema(&self, rest: &str) -> Response<Body> {
        let not_found = || {
            EdgeError::NotFound {
                code: "schema_not_found",
                message: "no such schema; GET /v1/schemas lists them",
            }
            .into_response()
        };
        let Some((event_type, version)) = rest.split_once('/') else {
            return not_found();
        };
        let version = version.strip_suffix(".json").unwrap_or(version);
        let Some(version) = version
            .strip_prefix('v')
            .unwrap_or(version)
            .parse::<u32>()
            .ok()
        else {
            return not_found();
        };
        match self.inner.registry.get(event_type, version) {
            Some(entry) => response::with_type(
                StatusCode::OK,
                "application/schema+json",
                Bytes::from(serde_json::to_vec_pretty(&entry.document).expect("serializable")),
            ),
            None => not_found(),
        }
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    EdgeError::MethodNotAllowed(allow).into_response()
}
