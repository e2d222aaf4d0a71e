//! The edge's answers when the stream cannot take a batch: 503 with `Retry-After`, every
//! valid event marked `retry`, and `/readyz` 503 while the stream is not writable. Driven
//! through `App::handle` with a stream that refuses appends (our own role trait, not an
//! SDK mock).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::config::IngestConfig;
use floodgate_core::registry::Registry;
use floodgate_core::stream::{
    AppendError, Appended, ConsumerLag, Record, SequenceNumber, ShardId, StreamError, StreamWriter,
};
use floodgate_ingest::App;
use floodgate_ingest::app::Limits;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// A stream that is full (or healthy, when `full` is false).
#[derive(Debug, Default)]
struct FullStream {
    full: AtomicBool,
}

#[async_trait]
impl StreamWriter for FullStream {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        records
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if self.full.load(Ordering::Relaxed) {
                    Err(AppendError::Busy {
                        retry_after_ms: 2500,
                    })
                } else {
                    Ok(Appended {
                        shard: ShardId("0".into()),
                        sequence: SequenceNumber::from_u64(i as u64),
                    })
                }
            })
            .collect()
    }
    async fn check_writable(&self) -> Result<(), StreamError> {
        if self.full.load(Ordering::Relaxed) {
            Err(StreamError::Unavailable("append queue is full".into()))
        } else {
            Ok(())
        }
    }
    async fn close(&self) -> Result<(), StreamError> {
        Ok(())
    }
}

fn event(id: &str, seats: i64) -> Value {
    json!({"specversion":"1.0","id":id,"source":"/t","type":"booking.requested",
           "data":{"bookingId":id,"eventId":"E","customerId":"c","seats":seats,"requestedAt":"2026-11-22T10:00:00Z"}})
}

async fn post(app: &App, events: &[Value]) -> (u16, Option<String>, Value) {
    let req = hyper::Request::post("/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(Full::new(Bytes::from(serde_json::to_vec(events).unwrap())))
        .unwrap();
    let resp = app.handle(req).await;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, retry_after, serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_gets_503_with_retry_after_and_readyz_fails() {
    let stream = Arc::new(FullStream::default());
    let metrics = floodgate_ingest::telemetry::install();
    let app = App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream.clone(),
        metrics,
    )
    .limits(Limits::from_config(&IngestConfig::default()))
    .build();
    let (status, retry_after, _) = post(&app, &[event("a", 1)]).await;
    assert_eq!((status, retry_after), (200, None));

    stream.full.store(true, Ordering::Relaxed);
    // Every valid event is "retry", the request 503, Retry-After in whole seconds (ceil).
    let (status, retry_after, body) = post(&app, &[event("b", 1), event("c", 2)]).await;
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("3"));
    assert_eq!(body["retry"], 2);
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "retry")
    );
    assert!(
        body["results"][0]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("busy")
    );
    // Invalid events are still rejected with their pointers; the rest retry.
    let (status, retry_after, body) = post(&app, &[event("d", 0), event("e", 1)]).await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    assert_eq!(body["results"][0]["status"], "rejected");
    assert_eq!(body["results"][0]["errors"][0]["pointer"], "/data/seats");
    assert_eq!(body["results"][1]["status"], "retry");

    let req = hyper::Request::get("/readyz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(app.handle(req).await.status(), 503);

    // A retried event is appended once the stream has room (it was never remembered as
    // accepted by the dedupe window).
    stream.full.store(false, Ordering::Relaxed);
    let (status, _, body) = post(&app, &[event("b", 1)]).await;
    assert_eq!(status, 200);
    assert!(body["results"][0].get("duplicate").is_none());
    let req = hyper::Request::get("/readyz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(app.handle(req).await.status(), 200);
}

fn app_with(stream: Arc<FullStream>, cfg: IngestConfig) -> floodgate_ingest::app::AppBuilder {
    App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream,
        floodgate_ingest::telemetry::install(),
    )
    .limits(Limits::from_config(&cfg))
}

/// Processors too far behind: new events get 503 with `Retry-After` before their body is
/// read, and are taken again once the consumers catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_past_its_bound_gets_503() {
    let lag = Arc::new(ConsumerLag::default());
    let cfg = IngestConfig {
        max_consumer_lag_records: 1000,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg)
        .consumer_lag(lag.clone())
        .build();
    lag.set("bookings", &ShardId("shard-0".into()), 1000);
    assert_eq!(post(&app, &[event("l1", 1)]).await.0, 200, "at the bound");
    lag.set("bookings", &ShardId("shard-1".into()), 1001);
    let (status, retry_after, body) = post(&app, &[event("l2", 1)]).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")));
    assert_eq!(body["error"]["code"], "consumer_lag");
    lag.set("bookings", &ShardId("shard-1".into()), 0);
    assert_eq!(post(&app, &[event("l3", 1)]).await.0, 200, "caught up");
}

/// On a stream that reports lag in time (Kinesis' `MillisBehindLatest`), the edge bounds
/// that too, whatever the record count says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_in_time_past_its_bound_gets_503() {
    let lag = Arc::new(ConsumerLag::default());
    let cfg = IngestConfig {
        max_consumer_lag_ms: 60_000,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg)
        .consumer_lag(lag.clone())
        .build();
    let shard = ShardId("shardId-000000000000".into());
    lag.set_both("lake", &shard, 0, 60_000);
    assert_eq!(post(&app, &[event("t1", 1)]).await.0, 200, "at the bound");
    lag.set_both("lake", &shard, 0, 60_001);
    let (status, retry_after, body) = post(&app, &[event("t2", 1)]).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")));
    assert_eq!(body["error"]["code"], "consumer_lag");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60001 ms"),
        "{body}"
    );
    lag.set_both("lake", &shard, 0, 0);
    assert_eq!(post(&app, &[event("t3", 1)]).await.0, 200, "caught up");
}

/// Bodies held in memory are bounded across requests: while one request holds the whole
/// budget with the bytes it has sent, the next is answered 503 with `Retry-After` instead
/// of being read.
// One thread: a request has charged a chunk by the time the test sees it taken.
#[tokio::test]
async fn inflight_body_bytes_are_bounded() {
    let cfg = IngestConfig {
        max_body_bytes: 64 * 1024,
        // One largest body, its request's state, and room for its events' state.
        max_inflight_body_bytes: 64 * 1024 + floodgate_core::budget::REQUEST_STATE_BYTES + 1024,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    // A body of unknown length that sends 63 KiB (JSON whitespace) and then waits.
    let (tx, holder) = start_chunked(&app);
    let mut head = b"[".to_vec();
    head.resize(63 * 1024 + 1, b' ');
    send_taken(&tx, Bytes::from(head)).await;
    let (status, retry_after, body) = post(&app, &[event("i1", 1)]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "inflight_bytes");
    // The first body ends; its bytes return to the budget.
    let mut rest = serde_json::to_vec(&event("i0", 1)).unwrap();
    rest.push(b']');
    tx.send(Bytes::from(rest)).await.unwrap();
    drop(tx);
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(post(&app, &[event("i2", 1)]).await.0, 200);
}

/// A slow body is charged the bytes it has sent, not the largest body it might become:
/// a hundred chunked POSTs that have sent a byte or two do not keep a small POST out,
/// although together they could grow past the budget.
// One thread: a request has charged a chunk by the time the test sees it taken.
#[tokio::test]
async fn slow_bodies_are_charged_what_they_sent() {
    let cfg = IngestConfig {
        max_inflight_body_bytes: 16 * 1024 * 1024,
        ..IngestConfig::default()
    };
    assert_eq!(cfg.max_body_bytes, 5 * 1024 * 1024);
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    let slow = start_slow(&app, 100).await;
    let (status, _, body) = post(&app, &[event("s0", 1)]).await;
    assert_eq!(status, 200, "a small POST behind 100 slow ones: {body}");
    finish_slow(slow, "s").await;
}

/// A request is charged its own state besides its body from the moment it is admitted,
/// so that requests waiting for their bodies (or the streams of one HTTP/2 connection)
/// are bounded with the bodies: four that have sent a byte each leave no room for a
/// fifth, however small its body.
// One thread: a request has charged a chunk by the time the test sees it taken.
#[tokio::test]
async fn waiting_requests_are_charged_their_state() {
    use floodgate_core::budget::REQUEST_STATE_BYTES;
    let cfg = IngestConfig {
        max_body_bytes: 64 * 1024,
        max_inflight_body_bytes: 5 * REQUEST_STATE_BYTES,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    let waiting = start_slow(&app, 4).await;
    let (status, retry_after, body) = post(&app, &[event("w0", 1)]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "inflight_bytes");
    finish_slow(waiting, "w").await;
    assert_eq!(
        post(&app, &[event("w5", 1)]).await.0,
        200,
        "their state is given back"
    );
}

/// Each event of a batch is charged its state (outcome, record, result) once the batch is
/// decoded, beyond its bytes in the body: a batch of many small events can be refused
/// where one of few, or the same bytes in fewer events, fits.
// One thread: nothing else holds the budget.
#[tokio::test]
async fn a_batch_is_charged_its_events_state() {
    use floodgate_core::budget::{EVENT_STATE_BYTES, REQUEST_STATE_BYTES};
    let cfg = IngestConfig {
        max_inflight_body_bytes: REQUEST_STATE_BYTES + 4 * 1024,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    let batch = |prefix: &str, n: usize| -> Vec<Value> {
        (0..n).map(|i| event(&format!("{prefix}{i}"), 1)).collect()
    };
    let ten = batch("e", 10);
    let body_len = serde_json::to_vec(&ten).unwrap().len() as u64;
    assert!(
        body_len < 4 * 1024 && body_len + 10 * EVENT_STATE_BYTES > 4 * 1024,
        "the body fits, its events' state does not: {body_len}"
    );
    let (status, retry_after, body) = post(&app, &ten).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "inflight_bytes");
    let (status, _, body) = post(&app, &batch("f", 2)).await;
    assert_eq!(status, 200, "{body}");
}

/// An answer stays charged until it is sent: answers a client has not read (HTTP/1
/// clients that stopped reading, the streams of an HTTP/2 connection) fill the budget
/// like bodies do, and their bytes come back once hyper drops them.
// One thread: the answers are held by the test, not by a connection.
#[tokio::test]
async fn unsent_answers_stay_charged() {
    use floodgate_core::budget::REQUEST_STATE_BYTES;
    // One request of one event: its state, its body and its event's state, about 17 KiB;
    // room for one more KiB.
    let cfg = IngestConfig {
        max_inflight_body_bytes: REQUEST_STATE_BYTES + 2 * 1024,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    let one = |id: &str| {
        hyper::Request::post("/v1/events")
            .header("content-type", "application/cloudevents-batch+json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&[event(id, 1)]).unwrap(),
            )))
            .unwrap()
    };
    let first = app.handle(one("u1")).await;
    assert_eq!(first.status(), 200);
    let second = app.handle(one("u2")).await;
    assert_eq!(second.status(), 200, "one unsent answer leaves room");
    let third = app.handle(one("u3")).await;
    assert_eq!(third.status(), 503, "two unsent answers do not");
    drop((first, second, third));
    let (status, _, body) = post(&app, &[event("u4", 1)]).await;
    assert_eq!(status, 200, "sent answers give their bytes back: {body}");
}

/// A compressed body is charged what it inflates to as it inflates, not the body limit
/// up front: it fits beside a request holding most of the budget while it is small, and
/// is answered 503 when its inflated size does not fit.
// One thread: a request has charged a chunk by the time the test sees it taken.
#[tokio::test]
async fn compressed_bodies_are_charged_as_they_inflate() {
    let cfg = IngestConfig {
        max_body_bytes: 1024 * 1024,
        max_inflight_body_bytes: 1536 * 1024,
        ..IngestConfig::default()
    };
    let app = app_with(Arc::new(FullStream::default()), cfg).build();
    // Another request holds 960 KiB of the 1.5 MiB.
    let (tx, holder) = start_chunked(&app);
    let mut head = b"[".to_vec();
    head.resize(960 * 1024, b' ');
    send_taken(&tx, Bytes::from(head)).await;

    let gzip = |plain: &[u8]| {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(plain).unwrap();
        Bytes::from(gz.finish().unwrap())
    };
    let post_gzip = |body: Bytes| {
        let app = app.clone();
        async move {
            let req = hyper::Request::post("/v1/events")
                .header("content-type", "application/cloudevents-batch+json")
                .header("content-encoding", "gzip")
                .body(Full::new(body))
                .unwrap();
            let resp = app.handle(req).await;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    // Small once inflated: it fits in the 576 KiB left.
    let small = gzip(&serde_json::to_vec(&[event("z1", 1)]).unwrap());
    let (status, body) = post_gzip(small).await;
    assert_eq!(status, 200, "{body}");
    // 900 KiB once inflated (within the body limit), a few bytes on the wire: no room.
    let mut big = serde_json::to_vec(&[event("z2", 1)]).unwrap();
    big.pop();
    big.resize(900 * 1024, b' ');
    big.push(b']');
    let (status, body) = post_gzip(gzip(&big)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "inflight_bytes");

    let mut rest = serde_json::to_vec(&event("z0", 1)).unwrap();
    rest.push(b']');
    tx.send(Bytes::from(rest)).await.unwrap();
    drop(tx);
    assert_eq!(holder.await.unwrap(), 200);
    // With the budget free again, the same big body is taken.
    let (status, body) = post_gzip(gzip(&big)).await;
    assert_eq!(status, 200, "{body}");
}

/// Starts a POST whose chunked body the test feeds through the returned sender.
fn start_chunked(
    app: &App,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<u16>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let req = hyper::Request::post("/v1/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(ChannelBody(rx))
        .unwrap();
    let holder = tokio::spawn({
        let app = app.clone();
        async move { app.handle(req).await.status().as_u16() }
    });
    (tx, holder)
}

type Slow = (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<u16>,
);

/// Starts `n` chunked POSTs that have sent one byte (`[`) each and wait.
async fn start_slow(app: &App, n: usize) -> Vec<Slow> {
    let mut slow = Vec::new();
    for _ in 0..n {
        let (tx, holder) = start_chunked(app);
        send_taken(&tx, Bytes::from_static(b"[")).await;
        slow.push((tx, holder));
    }
    slow
}

/// Ends each of `slow` with one event (ids `<prefix>1`, `<prefix>2`, …); each is accepted.
async fn finish_slow(slow: Vec<Slow>, prefix: &str) {
    for (i, (tx, holder)) in slow.into_iter().enumerate() {
        let mut rest = serde_json::to_vec(&event(&format!("{prefix}{}", i + 1), 1)).unwrap();
        rest.push(b']');
        tx.send(Bytes::from(rest)).await.unwrap();
        drop(tx);
        assert_eq!(holder.await.unwrap(), 200);
    }
}

/// Sends `chunk` and returns once the request has taken it from the channel. On a
/// current-thread runtime the request has then also charged it: both happen in one poll
/// of its task, which ends before the test's task runs again.
async fn send_taken(tx: &tokio::sync::mpsc::Sender<Bytes>, chunk: Bytes) {
    tx.send(chunk)
        .await
        .expect("the request is still reading its body");
    // The channel holds one chunk: there is room again once the request took it.
    let permit = tokio::time::timeout(std::time::Duration::from_secs(10), tx.reserve())
        .await
        .expect("the request took its chunk within 10 s")
        .expect("the request is still reading its body");
    drop(permit);
}

/// A request body fed chunk by chunk from a channel; it ends when the sender is dropped.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Counts requests in progress at the edge, as the embedded log does, and remembers how
/// many were counted when each append came.
#[derive(Debug, Default)]
struct CountingStream {
    incoming: Arc<std::sync::atomic::AtomicUsize>,
    seen_at_append: std::sync::Mutex<Vec<usize>>,
}

#[async_trait]
impl StreamWriter for CountingStream {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        self.seen_at_append
            .lock()
            .unwrap()
            .push(self.incoming.load(Ordering::Acquire));
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
    fn incoming(&self) -> Option<Arc<std::sync::atomic::AtomicUsize>> {
        Some(self.incoming.clone())
    }
}

/// The edge counts a request as in progress (the log lingers a group commit while enough
/// are) from its admission until it is answered, whatever the answer: a count left behind
/// would make the edge look busy for ever, and every later group wait out the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_in_progress_until_it_is_answered_whatever_the_answer() {
    let stream = Arc::new(CountingStream::default());
    let app = App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream.clone(),
        floodgate_ingest::telemetry::install(),
    )
    .build();
    let raw = |content_type: &'static str, body: &'static [u8]| {
        hyper::Request::post("/v1/events")
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    let answers = [
        post(&app, &[event("w1", 1), event("w2", 2)]).await.0,
        post(&app, &[json!({"id": "not an event"})]).await.0,
        app.handle(raw("application/cloudevents-batch+json", b"[{oops"))
            .await
            .status()
            .as_u16(),
        app.handle(raw("text/plain", b"[]")).await.status().as_u16(),
    ];
    assert_eq!(answers, [200, 422, 400, 415]);
    assert_eq!(
        stream.incoming.load(Ordering::Acquire),
        0,
        "a count left behind"
    );
    // The request that appended was counted while it did.
    assert_eq!(*stream.seen_at_append.lock().unwrap(), [1]);
}
