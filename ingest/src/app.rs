//! The edge as a plain async function from request to response: routing, the small
//! routes, and request metrics. [`App::new`] needs no socket, so tests call
//! [`App::handle`] directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use floodgate_core::config::IngestConfig;
use floodgate_core::registry::Registry;
use floodgate_core::state::StateStore;
use floodgate_core::stream::{ConsumerLag, StreamWriter};
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::auth::{Auth, Refusal};
use crate::dedupe::Deduper;
use crate::events;
use crate::response::{self, Body};

/// Limits of the edge, from `[ingest]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_batch_events: usize,
    pub retry_after_secs: u64,
    /// Longest time a request may take to send its body.
    pub body_timeout: Duration,
    /// Longest time from a request's headers to its answer.
    pub request_timeout: Duration,
    /// Producer retries of an event accepted this recently are answered as duplicates;
    /// 0 turns dedupe off.
    pub dedupe_window_ms: u64,
    /// At most this many ids are remembered for dedupe.
    pub dedupe_max_ids: usize,
    /// Request bodies held in memory at once, in bytes.
    pub max_inflight_body_bytes: u64,
    /// Consumers this many records behind on a shard make the edge answer 503; 0: no bound.
    pub max_consumer_lag_records: u64,
    pub max_consumer_lag_ms: u64,
}

impl Limits {
    pub fn from_config(cfg: &IngestConfig) -> Self {
        Self {
            max_body_bytes: cfg.max_body_bytes,
            max_batch_events: cfg.max_batch_events,
            retry_after_secs: cfg.retry_after_secs.max(1),
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            dedupe_window_ms: cfg.dedupe_window_ms,
            dedupe_max_ids: cfg.dedupe_max_ids,
            max_inflight_body_bytes: cfg.max_inflight_body_bytes,
            max_consumer_lag_records: cfg.max_consumer_lag_records,
            max_consumer_lag_ms: cfg.max_consumer_lag_ms,
        }
    }
}

pub(crate) struct Inner {
    pub registry: Arc<Registry>,
    pub stream: Arc<dyn StreamWriter>,
    /// Bookings state for the read API; `None` when this process serves no state.
    pub state: Option<Arc<dyn StateStore>>,
    pub dedupe: Option<Arc<Deduper>>,
    pub limits: Limits,
    pub auth: Arc<Auth>,
    /// The lag of this process's consumers, when it runs any.
    pub lag: Option<Arc<ConsumerLag>>,
    /// Where rejected events are kept for audit, if anywhere.
    pub quarantine: Option<Arc<dyn StreamWriter>>,
    /// Bytes of request bodies in memory, in KiB permits.
    pub inflight: Arc<tokio::sync::Semaphore>,
    metrics: PrometheusHandle,
    schema_list: Bytes,
    openapi: Bytes,
}

/// The edge application. Cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// Routes, as metric labels: a small fixed set.
const ROUTE_EVENTS: &str = "/v1/events";
const ROUTE_SCHEMA: &str = "/v1/schemas/{type}/{version}";

impl App {
    pub fn new(
        registry: Arc<Registry>,
        stream: Arc<dyn StreamWriter>,
        state: Option<Arc<dyn StateStore>>,
        limits: Limits,
        metrics: PrometheusHandle,
    ) -> App {
        let schema_list = Bytes::from(
            serde_json::to_vec(&json!({ "schemas": registry.summaries() })).expect("serializable"),
        );
        let openapi = Bytes::from(
            serde_json::to_vec(&crate::openapi::document(&registry)).expect("serializable"),
        );
        App {
            inner: Arc::new(Inner {
                openapi,
                registry,
                stream,
                state,
                dedupe: (limits.dedupe_window_ms > 0).then(|| {
                    Arc::new(Deduper::new(limits.dedupe_window_ms, limits.dedupe_max_ids))
                }),
                inflight: Arc::new(tokio::sync::Semaphore::new(
                    limits.max_inflight_body_bytes.div_ceil(1024) as usize,
                )),
                limits,
                auth: Arc::new(Auth::open()),
                lag: None,
                quarantine: None,
                metrics,
                schema_list,
            }),
        }
    }

    /// Puts `auth` in front of the protected routes. Call before the app is cloned.
    pub fn with_auth(mut self, auth: Arc<Auth>) -> App {
        Arc::get_mut(&mut self.inner)
            .expect("with_auth is called before the app is shared")
            .auth = auth;
        self
    }

    /// Keeps every rejected event (and unreadable body) in `quarantine` before answering.
    /// Call before the app is cloned.
    pub fn with_quarantine(mut self, quarantine: Arc<dyn StreamWriter>) -> App {
        Arc::get_mut(&mut self.inner)
            .expect("with_quarantine is called before the app is shared")
            .quarantine = Some(quarantine);
        self
    }

    /// Lets the edge refuse new events while these consumers are too far behind
    /// (`max_consumer_lag_records`). Call before the app is cloned.
    pub fn with_consumer_lag(mut self, lag: Arc<ConsumerLag>) -> App {
        Arc::get_mut(&mut self.inner)
            .expect("with_consumer_lag is called before the app is shared")
            .lag = Some(lag);
        self
    }

    /// The dedupe memory, to rebuild from the log at start-up; `None` when dedupe is off.
    pub fn deduper(&self) -> Option<&Deduper> {
        self.inner.dedupe.as_deref()
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
        let (route, resp) = match tokio::time::timeout(
            self.inner.limits.request_timeout,
            self.route(&method, &path, req),
        )
        .await
        {
            Ok(answer) => answer,
            // An event whose append was still in flight may yet be durable: the producer
            // retries, as after any lost response.
            Err(_) => (
                "timeout",
                response::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "request_timeout",
                    "the request took too long; retry",
                ),
            ),
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
            "/v1/events" if method == Method::POST => {
                (ROUTE_EVENTS, events::post(inner, req).await)
            }
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
                    return ("/v1/inventory/{eventId}", unauthorized(r));
                }
                (
                    "/v1/inventory/{eventId}",
                    crate::state::inventory(inner, &p["/v1/inventory/".len()..]).await,
                )
            }
            p if p.starts_with("/v1/bookings/") => {
                if !get {
                    return ("/v1/bookings/{bookingId}", not_allowed("GET, HEAD"));
                }
                if let Err(r) = inner.auth.authenticate(req.headers()) {
                    return ("/v1/bookings/{bookingId}", unauthorized(r));
                }
                (
                    "/v1/bookings/{bookingId}",
                    crate::state::booking(inner, &p["/v1/bookings/".len()..]).await,
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
                response::error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route; see /openapi.json",
                ),
            ),
        }
    }

    async fn ready(&self) -> Response<Body> {
        match self.inner.stream.check_writable().await {
            Ok(()) => response::json(StatusCode::OK, &json!({"status": "ready"})),
            Err(e) => response::error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &e.to_string()),
        }
    }

    fn schema(&self, rest: &str) -> Response<Body> {
        let not_found = || {
            response::error(
                StatusCode::NOT_FOUND,
                "schema_not_found",
                "no such schema; GET /v1/schemas lists them",
            )
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

/// 401 with a `WWW-Authenticate` challenge; counted by reason, never by credential.
pub(crate) fn unauthorized(r: Refusal) -> Response<Body> {
    metrics::counter!("floodgate_ingest_auth_failures_total", "reason" => r.code()).increment(1);
    let mut resp = response::error(StatusCode::UNAUTHORIZED, r.code(), r.message());
    resp.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"floodgate\""),
    );
    resp
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = response::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this route allows {allow}"),
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}
