//! Serving an [`App`] on a TCP listener: HTTP/1.1 with keep-alive and cleartext HTTP/2
//! (h2c, prior knowledge) on one port, a header-read timeout against slow clients, an
//! idle timeout for connections of either version, and graceful shutdown: stop
//! accepting, let in-flight requests finish, give up after a deadline.
//!
//! The idle timeout is ours, not hyper's: hyper's HTTP/1 header-read timeout only runs
//! once a connection is known to be HTTP/1, hyper-util's version sniffing waits for the
//! first bytes without a bound, and HTTP/2 has no idle timeout at all (keep-alive pings
//! detect dead peers, not idle live ones). So each connection's IO records when bytes
//! last moved ([`TrackedIo`]), the service counts requests in flight, and the
//! connection's task closes a connection that has neither for `idle_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use floodgate_core::budget::{
    HTTP1_BUFFER_BYTES, HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_SEND_BUFFER_BYTES,
    HTTP2_STREAM_WINDOW_BYTES,
};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::App;

/// How long an idle connection told to close (an HTTP/2 GOAWAY, which waits for the
/// peer's acknowledgement) may take before it is dropped.
const IDLE_CLOSE_BOUND: Duration = Duration::from_secs(1);

/// Connection-level settings, from `[ingest]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is
    /// closed: HTTP/1 keep-alive, HTTP/2, and a connection that never sends a request.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    pub fn from_config(cfg: &floodgate_core::config::IngestConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms.max(1)),
            max_connections: cfg.max_connections,
            shutdown_grace: Duration::from_millis(cfg.shutdown_grace_ms),
        }
    }
}

/// What a connection is doing, shared by its IO, its service and its task.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// When bytes last moved (or a request last ended), in ms since `opened`.
    last_ms: AtomicU64,
    /// Requests whose answer is still being worked out.
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Since when the connection has been idle; `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Counts a request in flight until the returned guard is dropped (the answer is
    /// ready, or hyper dropped the request).
    fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle clock starts when the last request ends, not when its bytes last moved.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that records in [`Activity`] when bytes last moved either way.
#[derive(Debug)]
struct TrackedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
    let idle_timeout = config.idle_timeout;
    let permits = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Each connection's buffers are bounded by the memory budget's numbers (hyper's
    // defaults let a busy HTTP/1 connection read ahead 400 KiB, and an HTTP/2 client send
    // 1 MiB, that nothing counted).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(HTTP1_BUFFER_BYTES as usize)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES as u32)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES as u32)
        .max_send_buf_size(HTTP2_SEND_BUFFER_BYTES as usize)
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    // Tells every connection to finish gracefully; each holds a receiver until it ends,
    // so `closed()` resolves once all are gone.
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
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
                let activity = Activity::new();
                let io = TokioIo::new(TrackedIo { inner: stream, activity: activity.clone() });
                let service = {
                    let (app, activity) = (app.clone(), activity.clone());
                    service_fn(move |req| {
                        let app = app.clone();
                        let in_flight = activity.request();
                        async move {
                            let resp = app.handle(req).await;
                            drop(in_flight);
                            Ok::<_, Infallible>(resp)
                        }
                    })
                };
                let builder = builder.clone();
                let drain = drain_rx.clone();
                metrics::gauge!("floodgate_ingest_open_connections").increment(1.0);
                tokio::spawn(async move {
                    let conn = builder.serve_connection(io, service);
                    if let Err(e) = drive(conn, &activity, idle_timeout, drain).await {
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
    drop(drain_rx);
    tracing::info!("stopped accepting; draining connections");
    let _ = drain_tx.send(true);
    tokio::select! {
        () = drain_tx.closed() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; dropping remaining connections"),
    }
}

/// Why [`drive`] closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Idle,
    Drain,
}

/// Runs one connection to its end: closes it gracefully once it has been idle for
/// `idle_timeout` (and drops it if that takes longer than [`IDLE_CLOSE_BOUND`]), or when
/// the server drains.
async fn drive<C>(
    conn: auto::Connection<'_, TokioIo<TrackedIo>, C, TokioExecutor>,
    activity: &Activity,
    idle_timeout: Duration,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<crate::response::Body>,
            Error = Infallible,
        >,
    C::Future: Send + 'static,
{
    tokio::pin!(conn);
    let mut check_at = Instant::now() + idle_timeout;
    let closing = loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            () = tokio::time::sleep_until(check_at) => match activity.idle_since() {
                // A request is being answered: look again a whole timeout from now, or
                // sooner through the idle clock its end restarts.
                None => check_at = Instant::now() + idle_timeout,
                Some(since) if since + idle_timeout <= Instant::now() => break Closing::Idle,
                Some(since) => check_at = since + idle_timeout,
            },
            changed = drain.changed() => {
                if changed.is_err() || *drain.borrow() {
                    break Closing::Drain;
                }
            }
        }
    };
    // GOAWAY for HTTP/2, a close after the current exchange for HTTP/1, and an end to
    // the wait for a first request.
    conn.as_mut().graceful_shutdown();
    match closing {
        Closing::Drain => conn.await,
        Closing::Idle => {
            metrics::counter!("floodgate_ingest_idle_connections_closed_total").increment(1);
            match tokio::time::timeout(IDLE_CLOSE_BOUND, conn).await {
                Ok(ended) => ended,
                // The peer did not answer the GOAWAY: drop the connection.
                Err(_) => Ok(()),
            }
        }
    }
}
