//! A request abandoned while its events are being appended (the client hung up, or
//! `request_timeout` cut it) must not leave those events "being appended" in the dedupe
//! window: the append finishes on its own and settles them, so a retry is answered as a
//! duplicate; an append that panics or is cancelled releases them, so a retry appends
//! again. Driven through `App::handle` with a stream whose appends wait at a gate the
//! test opens (our own role trait, not an SDK mock).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::IngestConfig;
use floodgate_core::registry::Registry;
use floodgate_core::stream::{
    AppendError, Appended, Record, SequenceNumber, ShardId, StreamError, StreamWriter,
};
use floodgate_ingest::App;
use floodgate_ingest::app::Limits;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// A stream whose appends wait until the test opens the gate.
#[derive(Debug)]
struct GatedStream {
    /// The number of records of each append call, in call order.
    calls: Mutex<Vec<usize>>,
    /// Signalled when an append has started.
    started: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
    /// The next append panics (a bug in a backend, say).
    panic_next: AtomicBool,
}

impl GatedStream {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            started: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
            panic_next: AtomicBool::new(false),
        })
    }

    fn open(&self) {
        self.gate.add_permits(1 << 20);
    }

    fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl StreamWriter for GatedStream {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        self.calls.lock().unwrap().push(records.len());
        self.started.notify_one();
        assert!(
            !self.panic_next.swap(false, Ordering::SeqCst),
            "the stream backend failed (injected)"
        );
        let _open = self.gate.acquire().await.expect("the gate is never closed");
        (0..records.len())
            .map(|i| {
                Ok(Appended {
                    shard: ShardId("0".into()),
                    sequence: SequenceNumber::from_u64(i as u64),
                })
            })
            .collect()
    }
    async fn check_writable(&self) -> Result<(), StreamError> {
        Ok(())
    }
    async fn close(&self) -> Result<(), StreamError> {
        Ok(())
    }
}

fn app(stream: Arc<GatedStream>) -> App {
    App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream,
        floodgate_ingest::telemetry::install(),
    )
    .limits(Limits::from_config(&IngestConfig::default()))
    .build()
}

fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            json!({"specversion":"1.0","id":id,"source":"/t","type":"booking.requested",
                   "data":{"bookingId":id,"eventId":"E","customerId":"c","seats":1,
                           "requestedAt":"2026-11-22T10:00:00Z"}})
        })
        .collect()
}

fn request(events: &[Value]) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(Full::new(Bytes::from(serde_json::to_vec(events).unwrap())))
        .unwrap()
}

async fn post(app: &App, events: &[Value]) -> (u16, Value) {
    let resp = app.handle(request(events)).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Retries `events` until they are answered 200, failing after a deadline.
async fn retry_until_accepted(app: &App, events: &[Value]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = post(app, events).await;
        match status {
            200 => return body,
            503 => assert!(
                Instant::now() < deadline,
                "retries are still answered 503 after 10 s: {body}"
            ),
            other => panic!("unexpected status {other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a request in a task of its own and waits until its append has started.
async fn start_request(
    app: &App,
    stream: &GatedStream,
    events: &[Value],
) -> tokio::task::JoinHandle<u16> {
    let started = stream.started.notified();
    let req = request(events);
    let handle = tokio::spawn({
        let app = app.clone();
        async move { app.handle(req).await.status().as_u16() }
    });
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the request's append started");
    handle
}

/// The client hangs up while its events are being appended: a retry meanwhile is told to
/// retry, and once the first append is done, a retry is accepted as a duplicate and
/// appended no second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_mid_append_settles_its_claims() {
    let stream = GatedStream::new();
    let app = app(stream.clone());
    let batch = events("hang-", 3);
    let request = start_request(&app, &stream, &batch).await;
    // What hyper does when the client disconnects: the request's future is dropped.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    let (status, body) = post(&app, &batch).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "retry"),
        "{body}"
    );

    stream.open();
    let body = retry_until_accepted(&app, &batch).await;
    assert_eq!(body["accepted"], 3, "{body}");
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["duplicate"] == true),
        "the first append landed, so the retry is a duplicate: {body}"
    );
    assert_eq!(stream.calls(), [3], "appended exactly once");
}

/// A request cut by `request_timeout` while appending is the same case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timed_out_mid_append_settles_its_claims() {
    let stream = GatedStream::new();
    let cfg = IngestConfig {
        request_timeout_ms: 100,
        ..IngestConfig::default()
    };
    let app = App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream.clone(),
        floodgate_ingest::telemetry::install(),
    )
    .limits(Limits::from_config(&cfg))
    .build();
    let batch = events("late-", 2);
    let (status, body) = post(&app, &batch).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("request_timeout"))
    );
    stream.open();
    let body = retry_until_accepted(&app, &batch).await;
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["duplicate"] == true),
        "{body}"
    );
    assert_eq!(stream.calls(), [2]);
}

/// An append that panics leaves nothing claimed: the producer is told to retry, and the
/// retry is appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_panics_releases_its_claims() {
    let stream = GatedStream::new();
    let app = app(stream.clone());
    stream.open();
    stream.panic_next.store(true, Ordering::SeqCst);
    let batch = events("boom-", 2);
    let (status, body) = post(&app, &batch).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "append_failed");
    let (status, body) = post(&app, &batch).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0].get("duplicate").is_none(), "{body}");
    assert_eq!(stream.calls(), [2, 2]);
}

/// An append cancelled with its runtime (a shutdown) releases its claims too.
#[test]
fn an_append_cancelled_with_its_runtime_releases_its_claims() {
    let stream = GatedStream::new();
    let app = app(stream.clone());
    let batch = events("gone-", 2);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    first.block_on(async {
        drop(start_request(&app, &stream, &batch).await);
    });
    // Every task of the runtime, the append among them, is dropped unfinished.
    drop(first);
    stream.open();
    let (status, body) = runtime().block_on(post(&app, &batch));
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0].get("duplicate").is_none(), "{body}");
    assert_eq!(stream.calls(), [2, 2]);
}
