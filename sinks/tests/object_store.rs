//! The object store conformance suite (`object_store_conformance/`) over the local
//! directory store, [`LocalDirStore`]: one fresh directory per store.

#[path = "object_store_conformance/mod.rs"]
mod object_store_conformance;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use floodgate_core::object_store::ObjectStore;
use floodgate_sinks::LocalDirStore;
use object_store_conformance::StoreFixture;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Local stores over fresh directories, kept until the fixture is dropped.
#[derive(Default)]
struct Local {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

#[async_trait]
impl StoreFixture for Local {
    fn name(&self) -> String {
        "LocalDirStore".into()
    }

    async fn store(&self) -> Arc<dyn ObjectStore> {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(&dir.path().join("lake")).unwrap();
        self.dirs.lock().unwrap().push(dir);
        Arc::new(store)
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                rt().block_on(object_store_conformance::$test(&Local::default()));
            }
        )*
    };
}

conformance!(
    put_then_get_answers_the_bytes_and_put_replaces,
    a_missing_key_reads_as_none,
    put_new_creates_once_and_never_changes_what_exists,
    racing_put_news_create_once,
    list_answers_the_prefix_sorted_and_nothing_else,
    list_answers_every_object_of_a_large_prefix,
    delete_is_idempotent,
    hive_partition_keys_round_trip,
    keys_that_escape_or_are_empty_are_refused,
    a_20_mib_object_round_trips,
);
