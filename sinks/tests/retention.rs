//! The embedded log's retention against the contract of `CheckpointStore`: "the stream's
//! retention never deletes a record that some consumer has not checkpointed past".
//!
//! Retention runs when a shard rolls to a new segment: while the shard is over
//! `retention_bytes` it deletes the oldest sealed segments, but only those every consumer
//! has checkpointed past. A consumer exists once it has a checkpoint file or a lease file;
//! one that has no checkpoint for the shard yet needs all of it, and with no consumer at
//! all nothing is deleted.

use std::path::Path;

use bytes::Bytes;
use floodgate_core::config::{Compression, EmbeddedStreamConfig};
use floodgate_core::partition::shard_for_key;
use floodgate_core::stream::{
    CheckpointStore, Record, SequenceNumber, ShardId, StartPosition, StreamReader, StreamWriter,
};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog};

const SHARDS: u32 = 2;

/// Two shards of segments of about four records each (1000-byte payloads, uncompressed so
/// that sizes follow records), kept down to about two segments where retention may delete.
fn config() -> EmbeddedStreamConfig {
    EmbeddedStreamConfig {
        shards: SHARDS,
        segment_bytes: 4096,
        retention_bytes: 8192,
        compression: Compression::None,
        ..EmbeddedStreamConfig::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A key the log puts in `shard`.
fn key_in(shard: u32) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| shard_for_key(k, SHARDS) == shard)
        .unwrap()
}

/// Appends `n` records to `shard`, one append (so one frame) each. Retention runs inside
/// the append that rolls a segment, so it is done when the append returns.
async fn append(log: &EmbeddedLog, shard: u32, n: usize) {
    let key = key_in(shard);
    let payload = Bytes::from("x".repeat(1000));
    for _ in 0..n {
        let outcome = log
            .append(vec![Record {
                key: key.clone().into(),
                payload: payload.clone(),
            }])
            .await;
        assert!(outcome[0].is_ok(), "{outcome:?}");
    }
}

/// The base sequences of `shard`'s segment files, oldest first.
fn segment_bases(root: &Path, shard: u32) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(root.join(format!("shard-{shard:04}")))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg").map(|b| b.parse().unwrap())
        })
        .collect();
    bases.sort_unstable();
    bases
}

/// Takes the lease on (`consumer`, `shard`) and commits `seq` under it.
async fn commit(store: &EmbeddedCheckpoints, consumer: &str, shard: u32, seq: u64) {
    let shard = ShardId(shard.to_string());
    assert!(
        store
            .acquire_lease(consumer, &shard, "worker")
            .await
            .unwrap()
    );
    store
        .commit(consumer, &shard, &SequenceNumber::from_u64(seq))
        .await
        .unwrap();
}

/// The oldest record `shard` still holds.
async fn oldest(log: &EmbeddedLog, shard: u32) -> u64 {
    let batch = log
        .read(&ShardId(shard.to_string()), &StartPosition::TrimHorizon, 1)
        .await
        .unwrap();
    batch.records[0].sequence.as_u64().unwrap()
}

/// Checks that `shard` kept exactly the segments from the one holding `checkpoint + 1` on:
/// every older segment was deleted (the shard is far over its retention bytes), none
/// that holds a record after the checkpoint was. `before` lists the segments as they were
/// before the last retention ran.
async fn assert_trimmed_to(log: &EmbeddedLog, before: &[u64], shard: u32, checkpoint: u64) {
    let root = log.root();
    let keep_from = *before
        .iter()
        .filter(|b| **b <= checkpoint + 1)
        .max()
        .unwrap_or_else(|| {
            panic!(
                "shard {shard}: the segment holding {} was deleted already: {before:?}",
                checkpoint + 1
            )
        });
    let bases = segment_bases(root, shard);
    assert_eq!(
        bases.first(),
        Some(&keep_from),
        "shard {shard} with every consumer past {checkpoint}: segments were {before:?}, are {bases:?}"
    );
    assert!(oldest(log, shard).await <= checkpoint + 1);
    let next = log
        .read(
            &ShardId(shard.to_string()),
            &StartPosition::After(SequenceNumber::from_u64(checkpoint)),
            1,
        )
        .await
        .unwrap();
    assert_eq!(
        next.records[0].sequence.as_u64(),
        Some(checkpoint + 1),
        "the first record after the checkpoint is gone"
    );
}

#[test]
fn with_no_consumer_nothing_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config()).unwrap();
        append(&log, 0, 60).await;
        let bases = segment_bases(dir.path(), 0);
        assert_eq!(
            bases[0], 0,
            "retention deleted without any consumer: {bases:?}"
        );
        assert!(
            bases.len() > 10,
            "the shard is many times its retention bytes: {bases:?}"
        );
        assert_eq!(oldest(&log, 0).await, 0);
        log.close().await.unwrap();
    });
}

#[test]
fn two_consumers_hold_the_shard_at_the_lower_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config()).unwrap();
        let store = EmbeddedCheckpoints::open(dir.path()).unwrap();
        append(&log, 0, 40).await;
        commit(&store, "lake", 0, 9).await;
        commit(&store, "bookings", 0, 30).await;
        let before = segment_bases(dir.path(), 0);
        append(&log, 0, 8).await;
        assert_trimmed_to(&log, &before, 0, 9).await;

        // The lake moves past the bookings consumer: now the bookings one holds the shard.
        commit(&store, "lake", 0, 45).await;
        let before = segment_bases(dir.path(), 0);
        append(&log, 0, 8).await;
        assert_trimmed_to(&log, &before, 0, 30).await;

        // A commit of an older sequence does not move a checkpoint back, and the retention
        // that follows goes by the real ones.
        commit(&store, "bookings", 0, 50).await;
        commit(&store, "bookings", 0, 3).await;
        let before = segment_bases(dir.path(), 0);
        append(&log, 0, 8).await;
        assert_trimmed_to(&log, &before, 0, 45).await;
        log.close().await.unwrap();
    });
}

#[test]
fn a_consumer_with_a_lease_but_no_checkpoint_holds_the_whole_shard() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config()).unwrap();
        let store = EmbeddedCheckpoints::open(dir.path()).unwrap();
        append(&log, 0, 40).await;
        commit(&store, "lake", 0, 30).await;
        // The bookings consumer has started on shard 0 (took its lease) and commits nothing
        // yet, like the lake while it buffers its first file.
        assert!(
            store
                .acquire_lease("bookings", &ShardId("0".into()), "worker")
                .await
                .unwrap()
        );
        append(&log, 0, 8).await;
        let bases = segment_bases(dir.path(), 0);
        assert_eq!(
            bases[0], 0,
            "retention deleted records a consumer without a checkpoint still needs: {bases:?}"
        );
        assert_eq!(oldest(&log, 0).await, 0);

        // Once it commits, the shard is trimmed to the lower checkpoint.
        commit(&store, "bookings", 0, 20).await;
        append(&log, 0, 8).await;
        assert_trimmed_to(&log, &bases, 0, 20).await;
        log.close().await.unwrap();
    });
}

#[test]
fn a_consumer_with_checkpoints_of_other_shards_only_holds_the_whole_shard() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config()).unwrap();
        let store = EmbeddedCheckpoints::open(dir.path()).unwrap();
        append(&log, 0, 40).await;
        append(&log, 1, 40).await;
        commit(&store, "lake", 0, 30).await;
        commit(&store, "lake", 1, 30).await;
        // The bookings consumer has a checkpoint file, but only shard 1 in it (and no lease
        // on shard 0): it has not started on shard 0, which it still has to read whole.
        commit(&store, "bookings", 1, 25).await;
        append(&log, 0, 8).await;
        append(&log, 1, 8).await;
        let bases = segment_bases(dir.path(), 0);
        assert_eq!(
            bases[0], 0,
            "retention deleted records of a shard a consumer has not started: {bases:?}"
        );
        assert_eq!(oldest(&log, 0).await, 0);
        // Shard 1, which both consumers are past, is trimmed to the lower checkpoint.
        let before = segment_bases(dir.path(), 1);
        append(&log, 1, 8).await;
        assert_trimmed_to(&log, &before, 1, 25).await;

        commit(&store, "bookings", 0, 20).await;
        append(&log, 0, 8).await;
        assert_trimmed_to(&log, &bases, 0, 20).await;
        log.close().await.unwrap();
    });
}
