//! The lease and checkpoint conformance suite (`lease_conformance/`) over the embedded
//! store: each worker is an [`EmbeddedCheckpoints`] opened on one shared directory, as
//! `floodgate process` instances on one machine open it. Its leases are flocks, so a
//! worker loses them when its store is dropped (its process exits), and never otherwise;
//! it cannot list, hand over or end shards.

// The embedded store never expires a lease (`LeaseLoss::Expires` is DynamoDB's).
#[allow(dead_code)]
#[path = "lease_conformance/mod.rs"]
mod lease_conformance;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use floodgate_core::stream::CheckpointStore;
use floodgate_sinks::EmbeddedCheckpoints;
use lease_conformance::{Capabilities, LeaseFixture, LeaseLoss};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Embedded stores over fresh directories, kept until the fixture is dropped.
#[derive(Default)]
struct Embedded {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

#[async_trait]
impl LeaseFixture for Embedded {
    fn name(&self) -> String {
        "EmbeddedCheckpoints".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            lists_leases: false,
            hands_over: false,
            shard_end: false,
            loss: LeaseLoss::WhenDropped,
        }
    }

    async fn workers(&self, n: usize) -> Vec<Arc<dyn CheckpointStore>> {
        let dir = tempfile::tempdir().unwrap();
        let stores = (0..n)
            .map(|_| {
                Arc::new(EmbeddedCheckpoints::open(dir.path()).unwrap()) as Arc<dyn CheckpointStore>
            })
            .collect();
        self.dirs.lock().unwrap().push(dir);
        stores
    }
}

#[test]
fn a_lease_is_exclusive() {
    rt().block_on(lease_conformance::a_lease_is_exclusive(&Embedded::default()));
}

#[test]
fn a_commit_without_the_lease_is_refused() {
    rt().block_on(lease_conformance::a_commit_without_the_lease_is_refused(
        &Embedded::default(),
    ));
}

#[test]
fn checkpoints_never_regress() {
    rt().block_on(lease_conformance::checkpoints_never_regress(
        &Embedded::default(),
    ));
}

#[test]
fn workers_committing_different_shards_lose_nothing() {
    rt().block_on(
        lease_conformance::workers_committing_different_shards_lose_nothing(&Embedded::default()),
    );
}

#[test]
fn releasing_keeps_the_checkpoint() {
    rt().block_on(lease_conformance::releasing_keeps_the_checkpoint(
        &Embedded::default(),
    ));
}

#[test]
fn sequence_numbers_round_trip_exactly() {
    rt().block_on(lease_conformance::sequence_numbers_round_trip_exactly(
        &Embedded::default(),
    ));
}

#[test]
fn a_dead_workers_lease_is_taken() {
    rt().block_on(lease_conformance::a_dead_workers_lease_is_taken(
        &Embedded::default(),
    ));
}

#[test]
fn listing_handing_over_and_shard_end_are_not_offered() {
    rt().block_on(lease_conformance::listing_handing_over_and_shard_end(
        &Embedded::default(),
    ));
}
