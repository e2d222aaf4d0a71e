//! A [`Publisher`] that appends derived events to a stream (a one-shard log beside the
//! main stream, in the embedded deployment), so that the lake can consume them like
//! accepted events. Each record's key is the outbox seq it came from: after a restart the
//! publisher finds its position by reading the log's last record, and skips what it holds.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::state::{OutboxEntry, PublishError, Publisher};
use floodgate_core::stream::{Record, StartPosition, StreamReader, StreamWriter};
use tokio::sync::Mutex;

#[derive(Debug)]
pub struct LogPublisher {
    writer: Arc<dyn StreamWriter>,
    reader: Arc<dyn StreamReader>,
    last: Mutex<Option<Option<u64>>>,
}

impl LogPublisher {
    pub fn new(writer: Arc<dyn StreamWriter>, reader: Arc<dyn StreamReader>) -> Self {
        Self {
            writer,
            reader,
            last: Mutex::new(None),
        }
    }

    /// The outbox seq of the log's last record.
    async fn scan(&self) -> Result<Option<u64>, PublishError> {
        let err = |e: floodgate_core::stream::StreamError| PublishError(e.to_string());
        let mut last = None;
        for shard in self.reader.shards().await.map_err(err)? {
            let mut position = StartPosition::TrimHorizon;
            loop {
                let batch = self
                    .reader
                    .read(&shard.id, &position, 10_000)
                    .await
                    .map_err(err)?;
                let Some(r) = batch.records.last() else { break };
                if let Ok(seq) = r.key.parse::<u64>() {
                    last = last.max(Some(seq));
                }
                position = batch
                    .next
                    .unwrap_or(StartPosition::After(r.sequence.clone()));
            }
        }
        Ok(last)
    }
}

#[async_trait]
impl Publisher for LogPublisher {
    async fn last_published(&self) -> Result<Option<u64>, PublishError> {
        let mut last = self.last.lock().await;
        if last.is_none() {
            *last = Some(self.scan().await?);
        }
        Ok(last.expect("set above"))
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        let done = self.last_published().await?;
        let records: Vec<Record> = entries
            .iter()
            .filter(|e| done.is_none_or(|d| e.seq > d))
            .flat_map(|e| {
                e.events.iter().map(move |ev| Record {
                    key: e.seq.to_string(),
                    payload: Bytes::from(ev.clone().into_bytes()),
                })
            })
            .collect();
        let Some(top) = entries.iter().map(|e| e.seq).max() else {
            return Ok(());
        };
        if !records.is_empty() {
            for r in self.writer.append(records).await {
                r.map_err(|e| PublishError(e.to_string()))?;
            }
        }
        let mut last = self.last.lock().await;
        *last = Some(done.max(Some(top)));
        Ok(())
    }
}

/// Publishes to several publishers; each skips what it already holds, so the slowest one
/// sets the position.
#[derive(Debug)]
pub struct FanOut(pub Vec<Arc<dyn Publisher>>);

#[async_trait]
impl Publisher for FanOut {
    async fn last_published(&self) -> Result<Option<u64>, PublishError> {
        let mut min: Option<Option<u64>> = None;
        for p in &self.0 {
            let l = p.last_published().await?;
            min = Some(match min {
                None => l,
                Some(m) => m.min(l),
            });
        }
        Ok(min.flatten())
    }

    async fn publish(&self, entries: &[OutboxEntry]) -> Result<(), PublishError> {
        for p in &self.0 {
            p.publish(entries).await?;
        }
        Ok(())
    }
}
