//! The embedded checkpoint store across processes: workers that split one consumer's
//! shards commit to one file without losing each other's updates or tearing it; a commit
//! is fenced by the lease; a checkpoint file that does not parse is an error naming it.

use std::sync::{Arc, Barrier};

use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId};
use floodgate_sinks::EmbeddedCheckpoints;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn workers_splitting_a_consumers_shards_lose_no_update() {
    let root = tempfile::tempdir().unwrap();
    const COMMITS: u64 = 300;
    let start = Arc::new(Barrier::new(2));
    // Two stores on one directory, each on its own thread and runtime, as two
    // `floodgate process` instances would be.
    let workers: Vec<_> = ["0", "1"]
        .into_iter()
        .map(|shard| {
            let root = root.path().to_owned();
            let start = start.clone();
            std::thread::spawn(move || {
                let shard = ShardId(shard.into());
                let store = EmbeddedCheckpoints::open(&root).unwrap();
                rt().block_on(async {
                    assert!(
                        store
                            .acquire_lease("lake", &shard, &format!("worker-{shard}"))
                            .await
                            .unwrap()
                    );
                    start.wait();
                    for seq in 1..=COMMITS {
                        store
                            .commit("lake", &shard, &SequenceNumber::from_u64(seq))
                            .await
                            .unwrap();
                        // The file always parses, and holds this worker's last commit:
                        // the other worker's writes never put an older one back.
                        let got = store.checkpoint("lake", &shard).await.unwrap();
                        assert_eq!(
                            got,
                            Some(SequenceNumber::from_u64(seq)),
                            "shard {shard}: commit {seq} was lost"
                        );
                    }
                });
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let store = EmbeddedCheckpoints::open(root.path()).unwrap();
    rt().block_on(async {
        for shard in ["0", "1"] {
            assert_eq!(
                store
                    .checkpoint("lake", &ShardId(shard.into()))
                    .await
                    .unwrap(),
                Some(SequenceNumber::from_u64(COMMITS))
            );
        }
    });
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(root.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_commit_without_the_lease_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let shard = ShardId("0".into());
    let a = EmbeddedCheckpoints::open(root.path()).unwrap();
    let b = EmbeddedCheckpoints::open(root.path()).unwrap();
    rt().block_on(async {
        // Never took it.
        let err = a
            .commit("lake", &shard, &SequenceNumber::from_u64(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("lease"), "{err}");
        assert_eq!(a.checkpoint("lake", &shard).await.unwrap(), None);

        // Another worker holds it.
        assert!(b.acquire_lease("lake", &shard, "worker-b").await.unwrap());
        assert!(
            a.commit("lake", &shard, &SequenceNumber::from_u64(5))
                .await
                .is_err()
        );
        b.commit("lake", &shard, &SequenceNumber::from_u64(7))
            .await
            .unwrap();

        // Gave it up: a worker that no longer owns the shard cannot move its checkpoint.
        b.release_lease("lake", &shard, "worker-b").await.unwrap();
        assert!(
            b.commit("lake", &shard, &SequenceNumber::from_u64(9))
                .await
                .is_err()
        );
        assert!(a.acquire_lease("lake", &shard, "worker-a").await.unwrap());
        a.commit("lake", &shard, &SequenceNumber::from_u64(8))
            .await
            .unwrap();
        assert_eq!(
            b.checkpoint("lake", &shard).await.unwrap(),
            Some(SequenceNumber::from_u64(8))
        );
    });
}

#[test]
fn a_checkpoint_file_that_does_not_parse_is_an_error_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let shard = ShardId("0".into());
    let store = EmbeddedCheckpoints::open(root.path()).unwrap();
    let path = root.path().join("checkpoints/lake.json");
    rt().block_on(async {
        assert!(store.acquire_lease("lake", &shard, "w").await.unwrap());
        store
            .commit("lake", &shard, &SequenceNumber::from_u64(5))
            .await
            .unwrap();
        std::fs::write(&path, b"{\"shards\":{\"0\":\"5\"").unwrap();
        let err = store.checkpoint("lake", &shard).await.unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        // A commit does not paper over it (it would lose the other shards' positions).
        let err = store
            .commit("lake", &shard, &SequenceNumber::from_u64(6))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"shards\":{\"0\":\"5\"".to_vec()
        );
    });
}

#[test]
fn checkpoints_written_by_earlier_versions_are_kept() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("checkpoints");
    std::fs::create_dir_all(&dir).unwrap();
    // The layout data directories already hold: one pretty JSON file per consumer.
    std::fs::write(
        dir.join("bookings.json"),
        br#"{
  "shards": {
    "0": "41",
    "1": "17"
  }
}"#,
    )
    .unwrap();
    let store = EmbeddedCheckpoints::open(root.path()).unwrap();
    rt().block_on(async {
        let s0 = ShardId("0".into());
        let s1 = ShardId("1".into());
        assert_eq!(
            store.checkpoint("bookings", &s0).await.unwrap(),
            Some(SequenceNumber::from_u64(41))
        );
        assert!(store.acquire_lease("bookings", &s1, "w").await.unwrap());
        store
            .commit("bookings", &s1, &SequenceNumber::from_u64(20))
            .await
            .unwrap();
        assert_eq!(
            store.checkpoint("bookings", &s0).await.unwrap(),
            Some(SequenceNumber::from_u64(41))
        );
        assert_eq!(
            store.checkpoint("bookings", &s1).await.unwrap(),
            Some(SequenceNumber::from_u64(20))
        );
    });
}
