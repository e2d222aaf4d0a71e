//! The state conformance suite (`state_conformance/`) over SQLite: each worker is a
//! [`SqliteStateStore`] opened on one shared database file.

#[path = "state_conformance/mod.rs"]
mod state_conformance;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use floodgate_core::state::StateStore;
use floodgate_sinks::SqliteStateStore;
use state_conformance::StateFixture;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// SQLite databases in fresh directories, kept until the fixture is dropped.
#[derive(Default)]
struct Sqlite {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

#[async_trait]
impl StateFixture for Sqlite {
    fn name(&self) -> String {
        "SqliteStateStore".into()
    }

    async fn stores(&self, n: usize) -> Vec<Arc<dyn StateStore>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        self.dirs.lock().unwrap().push(dir);
        (0..n)
            .map(|_| Arc::new(SqliteStateStore::open(&path).unwrap()) as Arc<dyn StateStore>)
            .collect()
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {$(
        #[test]
        fn $test() {
            rt().block_on(state_conformance::$test(&Sqlite::default()));
        }
    )*};
}

conformance!(
    an_apply_is_read_back,
    a_replay_changes_nothing,
    an_apply_from_another_position_is_refused_whole,
    a_booking_id_is_claimed_once_across_shards,
    inventories_are_written_only_over_what_was_decided_from,
    sequence_numbers_compare_as_numbers,
    each_outbox_partition_counts_on_and_forgets_what_is_published,
    dead_letters_are_kept_once,
    an_apply_as_large_as_the_limits_goes_through,
);
