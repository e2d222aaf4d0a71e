//! The outbox relay: moves derived events from the state store's transactional outbox to
//! the publisher. The publisher skips entries it already holds, so a crash anywhere in
//! the loop can neither lose nor duplicate an event.
//!
//! One worker relays at a time, under the relay lease. A standby process opened the
//! publisher long before it takes the lease over, so the relay asks the publisher for its
//! position only after taking the lease (the first round of [`relay_once`] with no known
//! position), and the publisher answers from the destination as it is then.

use std::sync::Arc;
use std::time::Duration;

use floodgate_core::state::{OutboxCursor, Publisher, StateStore};
use floodgate_core::stream::{CheckpointStore, ShardId};
use tokio::sync::watch;

/// The lease that makes one worker the relay: (consumer, shard) in the lease store.
pub const LEASE_CONSUMER: &str = "relay";
pub const LEASE_SHARD: &str = "outbox";

/// How often the relay renews its lease (a third of the shortest lease time-to-live).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Takes the relay lease (waiting while another worker holds it), then relays until
/// shutdown, draining what is left once. The lease is renewed on a timer; if it is lost
/// (another worker took it after this one stalled), the relay stops publishing at once
/// and goes back to waiting for the lease.
pub async fn run(
    store: Arc<dyn StateStore>,
    publisher: Arc<dyn Publisher>,
    leases: Arc<dyn CheckpointStore>,
    owner: String,
    shutdown: watch::Receiver<bool>,
) {
    run_with(store, publisher, leases, owner, RENEW_EVERY, shutdown).await;
}

/// [`run`], renewing the lease every `renew_every`.
pub async fn run_with(
    store: Arc<dyn StateStore>,
    publisher: Arc<dyn Publisher>,
    leases: Arc<dyn CheckpointStore>,
    owner: String,
    renew_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let shard = ShardId(LEASE_SHARD.to_owned());
    loop {
        loop {
            // Checked first: relay_loop may have seen the shutdown already.
            if *shutdown.borrow() {
                return;
            }
            match leases.acquire_lease(LEASE_CONSUMER, &shard, &owner).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the relay lease; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
        let (lost_tx, mut lost) = watch::channel(false);
        let renewer = {
            let (leases, shard, owner) = (leases.clone(), shard.clone(), owner.clone());
            tokio::spawn(async move {
                // As a shard's renewer: unable to renew for two and a half periods, the
                // relay stops before the lease may pass to another worker.
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(renew_every).await;
                    match leases.renew_lease(LEASE_CONSUMER, &shard, &owner).await {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) => {
                            tracing::warn!("relay lease lost; the relay stops publishing");
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(e) if renewed.elapsed() >= renew_every * 5 / 2 => {
                            tracing::warn!(error = %e, "cannot renew the relay lease in time; the relay stops publishing");
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot renew the relay lease; retrying")
                        }
                    }
                }
            })
        };
        let lease_lost = relay_loop(&*store, &*publisher, &mut shutdown, &mut lost).await;
        renewer.abort();
        if !lease_lost {
            let _ = leases.release_lease(LEASE_CONSUMER, &shard, &owner).await;
            return;
        }
    }
}

/// Relays until shutdown (then drains) or until `lost` turns true; returns whether the
/// lease was lost.
async fn relay_loop(
    store: &dyn StateStore,
    publisher: &dyn Publisher,
    shutdown: &mut watch::Receiver<bool>,
    lost: &mut watch::Receiver<bool>,
) -> bool {
    let mut idle = Duration::from_millis(1);
    let mut last: Option<OutboxCursor> = None;
    // A shutdown signal whose sender is gone can never say "go on": it means stop.
    let mut orphaned = false;
    loop {
        if *lost.borrow() {
            return true;
        }
        let stopping = orphaned || *shutdown.borrow();
        match relay_once(store, publisher, &mut last).await {
            Ok(0) if stopping => break,
            Ok(0) => {
                tokio::select! {
                    () = tokio::time::sleep(idle) => {}
                    r = shutdown.changed() => orphaned |= r.is_err(),
                    _ = lost.changed() => {}
                }
                idle = (idle * 2).min(Duration::from_millis(50));
            }
            Ok(_) => idle = Duration::from_millis(1),
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay failed; retrying");
                if stopping {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    false
}

/// One round: publish what the outbox holds beyond the publisher's position. Returns how
/// many entries were published.
pub async fn relay_once(
    store: &dyn StateStore,
    publisher: &dyn Publisher,
    last: &mut Option<OutboxCursor>,
) -> Result<usize, String> {
    // `last` is `None` on the first round after the lease was taken: ask the publisher,
    // which reads it from the destination (what a relay before us published counts).
    let mut cursor = match last.take() {
        Some(c) => c,
        None => publisher
            .last_published()
            .await
            .map_err(|e| e.to_string())?,
    };
    let entries = store
        // A few entries a round: one can hold the derived events of a whole read batch,
        // and the round's entries are all in memory at once (the memory budget's line).
        .outbox_after(
            &cursor,
            floodgate_core::budget::RELAY_BATCH_ENTRIES as usize,
        )
        .await
        .map_err(|e| e.to_string());
    let entries = match entries {
        Ok(e) => e,
        Err(e) => {
            *last = Some(cursor);
            return Err(e);
        }
    };
    if entries.is_empty() {
        *last = Some(cursor);
        return Ok(0);
    }
    // A failed publish leaves `last` unknown: the next round asks the publisher again.
    publisher
        .publish(&entries)
        .await
        .map_err(|e| e.to_string())?;
    let events: usize = entries.iter().map(|e| e.events.len()).sum();
    metrics::counter!("floodgate_processor_derived_events_published_total")
        .increment(events as u64);
    let mut done = OutboxCursor::new();
    for e in &entries {
        let top = done.entry(e.partition.clone()).or_insert(e.seq);
        *top = (*top).max(e.seq);
    }
    for (partition, seq) in &done {
        let at = cursor.entry(partition.clone()).or_insert(*seq);
        *at = (*at).max(*seq);
    }
    *last = Some(cursor);
    store
        .outbox_published(&done)
        .await
        .map_err(|e| e.to_string())?;
    Ok(entries.len())
}
