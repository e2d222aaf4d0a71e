//! The outbox relay across processes: a standby `floodgate process` opens the outbox at
//! start, waits for the relay lease, and must continue from what the file holds when it
//! takes the lease over, not from what it saw when it opened it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate_core::state::{Publisher, StateChanges, StateStore};
use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId};
use floodgate_processors::relay;
use floodgate_sinks::outbox::read_events;
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedOutbox, SqliteStateStore};

fn event(n: u64) -> String {
    format!(r#"{{"id":"derived-{n}","type":"booking.confirmed"}}"#)
}

/// Applies one batch of shard 0 that derives event `n`: outbox entry `n`.
async fn derive(store: &dyn StateStore, n: u64) {
    let applied = store
        .apply(StateChanges {
            shard: ShardId("0".into()),
            last_sequence: SequenceNumber::from_u64(n),
            derived: vec![event(n)],
            ..StateChanges::default()
        })
        .await
        .unwrap();
    assert!(applied);
}

#[test]
fn a_standby_that_takes_the_relay_lease_over_publishes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Process A (active) and process B (standby) each open the state store, the
        // outbox and the lease store at start.
        let store_a = SqliteStateStore::open(&data.join("state.db")).unwrap();
        let leases_a = EmbeddedCheckpoints::open(&data.join("stream")).unwrap();
        let outbox_b = Arc::new(EmbeddedOutbox::open(&data.join("outbox")).unwrap());
        let store_b: Arc<dyn StateStore> =
            Arc::new(SqliteStateStore::open(&data.join("state.db")).unwrap());
        let leases_b: Arc<dyn CheckpointStore> =
            Arc::new(EmbeddedCheckpoints::open(&data.join("stream")).unwrap());
        let outbox_a = EmbeddedOutbox::open(&data.join("outbox")).unwrap();
        let shard = ShardId(relay::LEASE_SHARD.into());
        assert!(
            leases_a
                .acquire_lease(relay::LEASE_CONSUMER, &shard, "a")
                .await
                .unwrap()
        );

        // B waits for the relay lease.
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let standby = tokio::spawn(relay::run(
            store_b.clone(),
            outbox_b.clone() as Arc<dyn Publisher>,
            leases_b,
            "b".into(),
            stop_rx,
        ));

        // A publishes entries 1..=5 and dies (kill -9) before the store forgets them.
        for n in 1..=5 {
            derive(&store_a, n).await;
        }
        let pending = store_a
            .outbox_after(&Default::default(), 256)
            .await
            .unwrap();
        assert_eq!(pending.len(), 5);
        outbox_a.publish(&pending).await.unwrap();
        derive(&store_a, 6).await;
        drop(outbox_a);
        drop(leases_a); // a dead process's flocks go with it

        // B takes the lease and relays what is left: entry 6 only.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let events = read_events(&data.join("outbox")).unwrap();
            if events.contains(&event(6)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby relay did not publish entry 6: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        standby.await.unwrap();

        let events = read_events(&data.join("outbox")).unwrap();
        assert_eq!(events, (1..=6).map(event).collect::<Vec<_>>());
        assert!(
            store_b
                .outbox_after(&Default::default(), 256)
                .await
                .unwrap()
                .is_empty()
        );
    });
}
