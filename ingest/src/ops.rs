//! The operations endpoint: `GET /metrics` for Prometheus, `GET /healthz` (the process
//! answers) and `GET /readyz`, on a listener of its own. `floodgate process`, which runs no
//! edge, is scraped and probed here, so that workers, and all of their lag, are watched like
//! the edge. The edge serves these routes on its own listener too, and here as well when
//! `ingest.ops_listen` is set: there a scrape or a probe does not wait behind clients for
//! one of `ingest.max_connections`. HTTP/1.1 only, a few connections at a time
//! ([`OPS_CONNECTIONS`]), no credentials: it serves nothing but these three routes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;

use floodgate_core::budget::{HTTP1_BUFFER_BYTES, OPS_CONNECTIONS};

use crate::App;
use crate::response::{self, Body};
/// A scraper sends its headers at once; a connection that does not is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A flag for `/readyz`: set once what it stands for runs, cleared when it stops.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What `/readyz` answers from.
#[derive(Clone, Debug)]
pub enum Probe {
    /// `floodgate process`: its processors run.
    Processors(Arc<Readiness>),
    /// The edge's `ingest.ops_listen`: the edge serves (it is not starting or draining),
    /// and its stream takes appends, as the edge's own `/readyz` says.
    Edge { app: App, serving: Arc<Readiness> },
}

impl Probe {
    async fn ready(&self) -> Response<Body> {
        match self {
            Probe::Processors(running) if running.get() => ready(),
            Probe::Processors(_) => response::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the processors are not running (starting or stopping)",
            ),
            Probe::Edge { app, serving } if serving.get() => app.ready().await,
            Probe::Edge { .. } => response::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the edge is not serving (starting or draining)",
            ),
        }
    }
}

fn ready() -> Response<Body> {
    response::json(StatusCode::OK, &json!({"status": "ready"}))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    probe: Probe,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(OPS_CONNECTIONS as usize));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "operations endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let (metrics, probe) = (metrics.clone(), probe.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (metrics, probe) = (metrics.clone(), probe.clone());
                async move { Ok::<_, Infallible>(route(&req, &metrics, &probe).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(HTTP1_BUFFER_BYTES as usize)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "operations endpoint: connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn route<B>(req: &Request<B>, metrics: &PrometheusHandle, probe: &Probe) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this endpoint serves /metrics, /healthz and /readyz",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = response::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "allowed: GET, HEAD",
        );
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return resp;
    }
    match path {
        "/metrics" => response::with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(crate::telemetry::render(metrics)),
        ),
        "/healthz" => response::json(StatusCode::OK, &json!({"status": "ok"})),
        _ => probe.ready().await,
    }
}
