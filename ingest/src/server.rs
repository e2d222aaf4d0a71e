//! Serving an [`App`] on a TCP listener: HTTP/1.1 with keep-alive and cleartext HTTP/2
//! (h2c, prior knowledge) on one port, a header-read timeout against slow clients, and
//! graceful shutdown: stop accepting, let in-flight requests finish, give up after a
//! deadline.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::App;

/// Connection-level settings, from `[ingest]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    pub fn from_config(cfg: &floodgate_core::config::IngestConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            max_connections: cfg.max_connections,
            shutdown_grace: Duration::from_millis(cfg.shutdown_grace_ms),
        }
    }
}

/// Serves until `shutdown` resolves, then drains connections for at most the grace period.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    config: ServerConfig,
) {
    let grace = config.shutdown_grace;
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // At the connection limit, stop accepting until a connection ends.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                metrics::gauge!("floodgate_ingest_open_connections").increment(1.0);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    metrics::gauge!("floodgate_ingest_open_connections").decrement(1.0);
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("stopped accepting; draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; dropping remaining connections"),
    }
}
