//! A worker that lost its shard must not apply over the worker that took it on.
//!
//! The stale worker reads the shard's position, then (while it loads and decides) the new
//! owner applies the same records; the stale worker's apply must change nothing. The
//! store's compare-and-set on the expected position is what stops it: without it, the
//! stale batch would book the same seats a second time.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::state::{
    Booking, DeadLetter, Inventory, OutboxCursor, OutboxEntry, StateChanges, StateError, StateStore,
};
use floodgate_core::stream::{SequenceNumber, ShardId, StoredRecord};
use floodgate_processors::bookings::BookingsProcessor;
use floodgate_sinks::SqliteStateStore;

type Hook =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// The real SQLite store, with a hook run once at the start of the first `apply`: the
/// moment between a worker deciding a batch (from the position and rows it read) and
/// applying it.
struct Interleaved {
    inner: Arc<SqliteStateStore>,
    hook: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Interleaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interleaved")
    }
}

#[async_trait]
impl StateStore for Interleaved {
    async fn position(&self, shard: &ShardId) -> Result<Option<SequenceNumber>, StateError> {
        self.inner.position(shard).await
    }
    async fn load(
        &self,
        event_ids: Vec<String>,
        booking_ids: Vec<String>,
    ) -> Result<(Vec<Inventory>, Vec<Booking>), StateError> {
        self.inner.load(event_ids, booking_ids).await
    }
    async fn apply(&self, changes: StateChanges) -> Result<bool, StateError> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        self.inner.apply(changes).await
    }
    async fn inventory(&self, event_id: &str) -> Result<Option<Inventory>, StateError> {
        self.inner.inventory(event_id).await
    }
    async fn booking(&self, booking_id: &str) -> Result<Option<Booking>, StateError> {
        self.inner.booking(booking_id).await
    }
    async fn outbox_after(
        &self,
        cursor: &OutboxCursor,
        max: usize,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        self.inner.outbox_after(cursor, max).await
    }
    async fn outbox_published(&self, upto: &OutboxCursor) -> Result<(), StateError> {
        self.inner.outbox_published(upto).await
    }
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, StateError> {
        self.inner.dead_letters(max).await
    }
}

/// Event E (capacity 100) with one booking of 3 seats, then nine capacity changes to 1,
/// each refused (below the 3 seats reserved) with a derived `capacity.change_rejected`.
fn records() -> Vec<StoredRecord> {
    let mut raw = vec![
        r#"{"source":"s","id":"create","type":"inventory.event.created","data":{"eventId":"E","name":"n","venue":"v","startsAt":"2026-12-01T20:00:00Z","capacity":100}}"#.to_owned(),
        r#"{"source":"s","id":"b0","type":"booking.requested","data":{"bookingId":"b0","eventId":"E","customerId":"c","seats":3,"requestedAt":"2026-11-22T10:00:00Z"}}"#.to_owned(),
    ];
    for i in 0..9 {
        raw.push(format!(
            r#"{{"source":"s","id":"c{i}","type":"inventory.capacity.changed","data":{{"eventId":"E","capacity":1}}}}"#
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, p)| StoredRecord {
            sequence: SequenceNumber::from_u64(i as u64),
            key: "E".into(),
            payload: Bytes::from(p),
            appended_at_ms: 1_700_000_000_000,
        })
        .collect()
}

#[test]
fn a_worker_that_lost_the_shard_cannot_apply_over_its_new_owner() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sqlite = Arc::new(SqliteStateStore::open(&dir.path().join("state.db")).unwrap());
        let shard = ShardId("shardId-000000000000".into());
        let all = records();
        let owner = Arc::new(BookingsProcessor::new(sqlite.clone()));
        assert!(owner.apply_batch(&shard, &all[..2]).await.unwrap());
        // The stale worker decides records 2..=10 from position 1; before it applies, the
        // new owner applies 2..=6.
        let (shard2, batch, owner2) = (shard.clone(), all[2..7].to_vec(), owner.clone());
        let hook: Hook = Box::new(move || {
            Box::pin(async move {
                assert!(owner2.apply_batch(&shard2, &batch).await.unwrap());
            })
        });
        let stale = BookingsProcessor::new(Arc::new(Interleaved {
            inner: sqlite.clone(),
            hook: Mutex::new(Some(hook)),
        }));
        // Refused, it decides again from position 6 and applies 7..=10 only.
        assert!(stale.apply_batch(&shard, &all[2..]).await.unwrap());
        assert!(
            !owner.apply_batch(&shard, &all).await.unwrap(),
            "all applied already"
        );
        let rejected: usize = sqlite
            .outbox_after(&Default::default(), 1000)
            .await
            .unwrap()
            .iter()
            .flat_map(|e| e.events.iter())
            .filter(|e| e.contains("capacity.change_rejected"))
            .count();
        assert_eq!(rejected, 9, "each refused change derived once, not twice");
        let inventory = sqlite.inventory("E").await.unwrap().unwrap();
        assert_eq!((inventory.capacity, inventory.reserved), (100, 3));
    });
}
