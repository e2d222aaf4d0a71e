//! The idle timeout counts requests in flight: a connection whose request takes longer
//! than `idle_timeout` to answer, with no byte moving meanwhile, is not cut, and once
//! answered and idle it is closed. Driven through `server::serve` on a loopback socket,
//! with a stream whose append waits at a gate the test opens.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use floodgate_core::config::IngestConfig;
use floodgate_core::registry::Registry;
use floodgate_core::stream::{
    AppendError, Appended, Record, SequenceNumber, ShardId, StreamError, StreamWriter,
};
use floodgate_ingest::App;
use floodgate_ingest::app::Limits;
use floodgate_ingest::server::{ServerConfig, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stream whose appends wait until the test opens the gate.
#[derive(Debug)]
struct GatedStream {
    started: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl StreamWriter for GatedStream {
    async fn append(&self, records: Vec<Record>) -> Vec<Result<Appended, AppendError>> {
        self.started.notify_one();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_not_idle_and_an_idle_connection_closes() {
    let stream = Arc::new(GatedStream {
        started: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let cfg = IngestConfig {
        idle_timeout_ms: 200,
        ..IngestConfig::default()
    };
    let app = App::builder(
        Arc::new(Registry::builtin().unwrap()),
        stream.clone(),
        floodgate_ingest::telemetry::install(),
    )
    .limits(Limits::from_config(&cfg))
    .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        async {
            let _ = stop_rx.await;
        },
        ServerConfig::from_config(&cfg),
    ));

    let body = serde_json::to_vec(&serde_json::json!([{"specversion":"1.0","id":"slow-1",
        "source":"/t","type":"booking.requested","data":{"bookingId":"b","eventId":"E",
        "customerId":"c","seats":1,"requestedAt":"2026-11-22T10:00:00Z"}}]))
    .unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents-batch+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let started = stream.started.notified();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the append started");
    // Nothing moves on the connection for several idle timeouts (and longer than a
    // closing connection is given) while the request is being answered: time itself is
    // what is under test here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.gate.add_permits(1 << 20);

    // The answer arrives on the same connection, which stays open for more.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the answer arrives")
            .unwrap();
        assert!(
            n > 0,
            "the connection was closed while its request was answered"
        );
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close"),
        "the connection was being closed while its request was in flight: {head}"
    );

    // Idle now: the server closes it.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stayed open");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap();
}
