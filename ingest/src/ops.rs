//! The operations endpoint of a process that runs no edge (`floodgate process`):
//! `GET /metrics` for Prometheus, `GET /healthz` (the process answers) and `GET /readyz`
//! (its processors are running), so that workers, and all of their lag, are scraped and
//! probed like the edge. HTTP/1.1 only, a few connections at a time, no credentials: it
//! serves nothing but these three routes.

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

use crate::response::{self, Body};

/// Connections served at once; scrapers and probes need one or two.
const MAX_CONNECTIONS: usize = 32;
/// A scraper sends its headers at once; a connection that does not is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the processors run: set once they have started, cleared when they stop.
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

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&req, &metrics, &ready);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "operations endpoint: connection ended with an error");
            }
            drop(permit);
        });
    }
}

fn route<B>(req: &Request<B>, metrics: &PrometheusHandle, ready: &Readiness) -> Response<Body> {
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
        _ if ready.get() => response::json(StatusCode::OK, &json!({"status": "ready"})),
        _ => response::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the processors are not running (starting or stopping)",
        ),
    }
}
