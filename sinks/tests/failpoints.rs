//! The durability path under injected faults (feature `failpoints`, which this crate's
//! dev-dependency on itself turns on): failed fsyncs, failed and short writes, failed
//! undos, and a simulated power cut that drops everything no fsync covered.
//!
//! The crash tests kill with SIGKILL, which keeps the page cache: a writer that never
//! fsynced passes them. These tests catch that. For the log, the outbox and checkpoints:
//! - a failed write or fsync is never acknowledged, and a failed write is undone to the
//!   byte, so that what follows it starts on a frame (or line) boundary;
//! - a failed fsync (or a failed undo) stops the writer until it is opened again;
//! - after a power cut ([`Watch::lose_unsynced`]) and a reopen, everything that was
//!   acknowledged is there exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use floodgate_core::config::{Compression, EmbeddedStreamConfig};
use floodgate_core::state::{OutboxEntry, Publisher};
use floodgate_core::stream::{
    AppendError, Appended, CheckpointStore, Record, SequenceNumber, ShardId, StartPosition,
    StreamReader, StreamWriter,
};
use floodgate_sinks::failpoint::{self, Fault, Op, Watch};
use floodgate_sinks::outbox::{log_root, read_events};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog, EmbeddedOutbox};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One shard, so that every append of a test meets the fault armed for it; a short
/// group-commit delay, so that concurrent appends share a write and an fsync.
fn cfg() -> EmbeddedStreamConfig {
    EmbeddedStreamConfig {
        shards: 1,
        group_commit_max_delay_us: 2_000,
        ..EmbeddedStreamConfig::default()
    }
}

type Outcomes = Vec<(String, Result<Appended, AppendError>)>;

/// Appends records with payloads `{tag}-{task}-{i}` from `tasks` concurrent callers,
/// `per_task` records each; returns every payload with its outcome.
async fn append_concurrently(
    log: &Arc<EmbeddedLog>,
    tag: &str,
    tasks: usize,
    per_task: usize,
) -> Outcomes {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let log = log.clone();
            let payloads: Vec<String> = (0..per_task).map(|i| format!("{tag}-{t}-{i}")).collect();
            tokio::spawn(async move {
                let records = payloads
                    .iter()
                    .map(|p| Record {
                        key: (format!("key-{}", p.len() % 7)).into(),
                        payload: Bytes::from(p.clone()),
                    })
                    .collect();
                let results = log.append(records).await;
                payloads.into_iter().zip(results).collect::<Outcomes>()
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(h.await.unwrap());
    }
    out
}

fn acked(outcomes: &Outcomes) -> Vec<String> {
    outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(p, _)| p.clone())
        .collect()
}

fn assert_all_unavailable(outcomes: &Outcomes, what: &str) {
    for (payload, result) in outcomes {
        assert!(
            matches!(result, Err(AppendError::Unavailable(_))),
            "{what}: {payload} was answered {result:?}, not Unavailable"
        );
    }
}

/// How many times each payload is in the log at `root`, read through a fresh open (which
/// runs recovery, as a restart would).
async fn payload_counts(root: &Path) -> HashMap<String, usize> {
    let log = EmbeddedLog::open(root, &cfg()).expect("the log reopens");
    let counts = counts_in(&log).await;
    log.close().await.unwrap();
    counts
}

/// How many times each payload is in what `reader` reads, over every shard.
async fn counts_in(reader: &dyn StreamReader) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for shard in reader.shards().await.unwrap() {
        let mut pos = StartPosition::TrimHorizon;
        loop {
            let batch = reader.read(&shard.id, &pos, 1_000).await.unwrap();
            if batch.records.is_empty() {
                break;
            }
            for r in &batch.records {
                let payload = String::from_utf8(r.payload.to_vec()).unwrap();
                *counts.entry(payload).or_default() += 1;
            }
            pos = batch.next.unwrap();
        }
    }
    counts
}

fn assert_exactly_once(counts: &HashMap<String, usize>, acked: &[String]) {
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged: the test proves nothing"
    );
    for p in acked {
        assert_eq!(
            counts.get(p).copied().unwrap_or(0),
            1,
            "acknowledged record {p} is in the log {:?} times",
            counts.get(p)
        );
    }
}

/// The bytes of the shard's segment files.
fn segment_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root.join("shard-0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Simulates a power cut under `watch` and says how much it took.
fn power_cut(watch: &Watch) -> u64 {
    let lost = watch.lose_unsynced().expect("the power cut is simulated");
    eprintln!("power cut: {lost} unsynced bytes lost");
    lost
}

#[test]
fn a_failed_log_fsync_is_never_acknowledged_and_stops_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let watch = failpoint::watch(dir.path());
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        let before = append_concurrently(&log, "before", 4, 10).await;
        let mut acked = acked(&before);
        assert_eq!(acked.len(), 40, "{before:?}");

        let fsync = failpoint::arm(Op::Sync, &root, Fault::Eio);
        let failed = append_concurrently(&log, "during", 8, 5).await;
        assert!(fsync.hits() >= 1, "the fsync fault never fired");
        assert_all_unavailable(&failed, "appends whose fsync failed");
        let err = log.check_writable().await.unwrap_err();
        assert!(err.to_string().contains("fsync failed"), "{err}");

        // The disk is healthy again, but pages written before the failed fsync may be
        // gone: the shard refuses until it is reopened.
        drop(fsync);
        let after = append_concurrently(&log, "after", 2, 3).await;
        assert_all_unavailable(&after, "appends after a failed fsync");
        assert!(log.check_writable().await.is_err());

        // A power cut now loses what the failed fsync did not cover (the failed groups),
        // and whatever of the segments no checkpoint fsynced: the journal holds that.
        log.halt().await;
        power_cut(&watch);
        drop(log);
        let counts = payload_counts(&root).await;
        assert_exactly_once(&counts, &acked);
        for (p, _) in failed.iter().chain(&after) {
            assert!(!counts.contains_key(p), "{p} was refused but is in the log");
        }

        // Reopened, the shard takes appends again.
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        log.check_writable().await.unwrap();
        let again = append_concurrently(&log, "again", 2, 3).await;
        acked.extend(self::acked(&again));
        assert_eq!(acked.len(), 46, "{again:?}");
        log.close().await.unwrap();
        drop(log);
        assert_exactly_once(&payload_counts(&root).await, &acked);
    });
}

#[test]
fn a_failed_log_write_is_undone_to_the_frame_boundary_and_the_shard_goes_on() {
    let faults = [
        ("eio", Fault::Eio),
        ("enospc", Fault::Enospc),
        ("short-enospc", Fault::ShortWrite),
    ];
    for (name, fault) in faults {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stream");
        let watch = failpoint::watch(dir.path());
        rt().block_on(async {
            let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
            let mut acked = acked(&append_concurrently(&log, "before", 4, 10).await);
            assert_eq!(acked.len(), 40);
            let boundary = segment_bytes(&root);

            // Every write fails while armed: concurrent appends, in however many groups.
            let write = failpoint::arm(Op::Write, &root, fault);
            let failed = append_concurrently(&log, "during", 8, 5).await;
            assert!(write.hits() >= 1, "{name}: the write fault never fired");
            assert_all_unavailable(&failed, name);
            assert_eq!(
                segment_bytes(&root),
                boundary,
                "{name}: the failed write was not undone to the last frame boundary"
            );
            // Not ready while the last write failed (a full disk)...
            let err = log.check_writable().await.unwrap_err();
            assert!(
                err.to_string().contains("last write failed"),
                "{name}: {err}"
            );
            drop(write);

            // ...and ready again once a write succeeds: the shard was never stopped.
            let after = append_concurrently(&log, "after", 4, 5).await;
            assert_eq!(self::acked(&after).len(), 20, "{name}: {after:?}");
            acked.extend(self::acked(&after));
            log.check_writable().await.unwrap();

            // A power cut with the writer idle: the segments lose what no checkpoint
            // fsynced, and the journal gives it back.
            log.halt().await;
            power_cut(&watch);
            drop(log);
            let counts = payload_counts(&root).await;
            assert_exactly_once(&counts, &acked);
            for (p, _) in &failed {
                assert!(
                    !counts.contains_key(p),
                    "{name}: {p} was refused but is in the log"
                );
            }
        });
    }
}

#[test]
fn a_failed_log_write_whose_undo_fails_stops_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        let acked = acked(&append_concurrently(&log, "before", 2, 10).await);
        let write = failpoint::arm_times(Op::Write, &root, Fault::ShortWrite, 1);
        let undo = failpoint::arm_times(Op::SetLen, &root, Fault::Eio, 1);
        let failed = append_concurrently(&log, "during", 1, 5).await;
        assert_eq!((write.hits(), undo.hits()), (1, 1));
        assert_all_unavailable(&failed, "a write that could not be undone");
        // A torn frame now ends the segment: nothing may be appended after it.
        let after = append_concurrently(&log, "after", 1, 5).await;
        assert_all_unavailable(&after, "appends after a failed undo");
        let err = log.check_writable().await.unwrap_err();
        assert!(err.to_string().contains("could not be undone"), "{err}");
        let _ = log.close().await;
        drop(log);
        // Recovery cuts the torn frame: it lies past the published watermark.
        let counts = payload_counts(&root).await;
        assert_exactly_once(&counts, &acked);
        assert_eq!(counts.len(), acked.len(), "{counts:?}");
    });
}

#[test]
fn every_acknowledged_record_survives_a_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let watch = failpoint::watch(dir.path());
    // Small segments: the power cut also meets rolled ones.
    let cfg = EmbeddedStreamConfig {
        segment_bytes: 4096,
        ..cfg()
    };
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg).unwrap());
        let mut acked = Vec::new();
        for round in 0..10 {
            let outcomes = append_concurrently(&log, &format!("r{round}"), 4, 20).await;
            acked.extend(self::acked(&outcomes));
        }
        assert_eq!(acked.len(), 800);
        // A power cut with the writer idle: the segments lose what no checkpoint fsynced
        // (here, what was written since the last roll), and the journal gives it back.
        log.halt().await;
        assert!(
            power_cut(&watch) > 0,
            "the power cut took nothing: it tests nothing"
        );
        drop(log);
        assert_exactly_once(&payload_counts(&root).await, &acked);
    });
}

/// The writer starts each segment's writeback as the segment fills (every 256 KiB), in
/// every segment: after a roll too, where a writer that kept the old segment's mark would
/// start none, and the checkpoints would stall again on pages all dirty. The start is a
/// hint: when it fails, every record is still acknowledged, and still there, exactly
/// once, after a power cut.
#[test]
fn segments_are_written_back_as_they_fill_and_a_failed_start_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let watch = failpoint::watch(dir.path());
    // 1 MiB segments of uncompressed frames: 16 KiB records fill one in 64 appends.
    let cfg = EmbeddedStreamConfig {
        segment_bytes: 1 << 20,
        compression: Compression::None,
        ..cfg()
    };
    rt().block_on(async {
        let log = EmbeddedLog::open(&root, &cfg).unwrap();
        let starts = failpoint::arm(Op::Writeback, &root, Fault::Eio);
        let filler = "x".repeat(16 * 1024);
        let mut acked = Vec::new();
        for i in 0..256 {
            let payload = format!("{i}-{filler}");
            let record = Record {
                key: "one-key".into(),
                payload: Bytes::from(payload.clone()),
            };
            let results = log.append(vec![record]).await;
            results[0]
                .as_ref()
                .expect("a failed writeback start failed an append");
            acked.push(payload);
        }
        let segments = std::fs::read_dir(root.join("shard-0000"))
            .unwrap()
            .filter(|e| {
                let path = e.as_ref().unwrap().path();
                path.extension().is_some_and(|x| x == "seg")
            })
            .count() as u32;
        assert!(segments >= 4, "{segments} segments: the test meets no roll");
        // Three starts at least in every full segment (1 MiB in steps of 256 KiB, less the
        // tail that the roll's fsync writes).
        assert!(
            starts.hits() >= 3 * (segments - 1),
            "{} writeback starts in {segments} segments",
            starts.hits()
        );
        drop(starts);
        log.halt().await;
        power_cut(&watch);
        drop(log);
        assert_exactly_once(&payload_counts(&root).await, &acked);
    });
}

/// The length of the shard's newest segment, the one appends go to.
fn active_segment_len(root: &Path) -> u64 {
    let mut segments: Vec<_> = std::fs::read_dir(root.join("shard-0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    std::fs::metadata(segments.last().unwrap()).unwrap().len()
}

/// A checkpoint starts a new journal generation whose entries overwrite the old ones in
/// place. Here the journal's fsync fails from the checkpoint on, and a power cut then loses
/// pages by the seed's choice. The writer fsyncs the new header before writing any entry
/// of its generation, so that fsync is the one that fails: no new entry is written, and
/// the disk holds either header over the old entries. A writer that wrote the big record's
/// entry (several pages) before the header was durable would leave mixes of old and new
/// pages under the old header, whose generation then reads only in part: open refuses the
/// log, its entries ending below the acknowledged watermark.
#[test]
fn a_power_cut_during_a_new_journal_generation_loses_nothing_acknowledged() {
    let segment_bytes = 16 * 1024;
    for seed in 0..16u64 {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stream");
        let watch = failpoint::watch(dir.path());
        let cfg = EmbeddedStreamConfig {
            segment_bytes,
            group_commit_max_delay_us: 0,
            ..cfg()
        };
        rt().block_on(async {
            let log = Arc::new(EmbeddedLog::open(&root, &cfg).unwrap());
            // One record a group, so that the journal's generation holds many small
            // entries, until the next group rolls the segment (and checkpoints first).
            let mut acked = Vec::new();
            let mut i = 0;
            while active_segment_len(&root) < segment_bytes {
                let outcomes = append_concurrently(&log, &format!("s{seed}-{i}"), 1, 1).await;
                acked.extend(self::acked(&outcomes));
                i += 1;
            }
            assert!(acked.len() > 50, "too few entries: {}", acked.len());
            // A record of several pages, so that its entry would span them.
            let mut x = seed.wrapping_add(1);
            let big: String = (0..40_000)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    format!("{:x}", x >> 60)
                })
                .collect();
            let fsync = failpoint::arm(Op::Sync, &root.join("journal"), Fault::Eio);
            let refused = log
                .append(vec![Record {
                    key: "big".into(),
                    payload: Bytes::from(big),
                }])
                .await;
            assert!(fsync.hits() >= 1, "the fsync fault never fired");
            assert!(refused[0].is_err(), "{refused:?}");
            drop(fsync);
            log.halt().await;
            drop(log);
            watch.lose_unsynced_pages(seed).unwrap();
            assert_exactly_once(&payload_counts(&root).await, &acked);
        });
    }
}

fn entry(seq: u64) -> OutboxEntry {
    OutboxEntry {
        partition: String::new(),
        seq,
        events: vec![
            format!(r#"{{"id":"e-{seq}-a","time":"2026-01-01T00:00:00Z"}}"#),
            format!(r#"{{"id":"e-{seq}-b","time":"2026-01-01T00:00:00Z"}}"#),
        ],
    }
}

fn entries(seqs: std::ops::RangeInclusive<u64>) -> Vec<OutboxEntry> {
    seqs.map(entry).collect()
}

/// Asserts that the outbox at `dir` holds the events of entries `1..=last`, each once, in order.
fn assert_outbox_holds(dir: &Path, last: u64) {
    let want: Vec<String> = entries(1..=last)
        .into_iter()
        .flat_map(|e| e.events)
        .collect();
    assert_eq!(read_events(dir).unwrap(), want);
}

#[test]
fn a_failed_outbox_write_is_undone_and_the_retry_repeats_nothing() {
    let faults = [
        ("write eio", Fault::Eio),
        ("short write at enospc", Fault::ShortWrite),
    ];
    for (name, fault) in faults {
        let dir = tempfile::tempdir().unwrap();
        let outbox_dir = dir.path().join("outbox");
        let watch = failpoint::watch(dir.path());
        rt().block_on(async {
            let outbox = EmbeddedOutbox::open(&outbox_dir).unwrap();
            outbox.publish(&entries(1..=3)).await.unwrap();

            let armed = failpoint::arm_times(Op::Write, &log_root(&outbox_dir), fault, 1);
            let err = outbox.publish(&entries(4..=6)).await.unwrap_err();
            assert_eq!(armed.hits(), 1, "{name}: the fault never fired");
            assert!(err.to_string().contains("append failed"), "{name}: {err}");
            drop(armed);

            // The log undid the write; the relay's retry appends what it does not hold.
            outbox.publish(&entries(4..=6)).await.unwrap();
            assert_eq!(
                outbox.last_published().await.unwrap().get(""),
                Some(&6),
                "{name}"
            );
            drop(outbox);
            assert_eq!(
                power_cut(&watch),
                0,
                "{name}: a published event was not fsynced"
            );

            let reopened = EmbeddedOutbox::open(&outbox_dir).unwrap();
            assert_eq!(
                reopened.last_published().await.unwrap().get(""),
                Some(&6),
                "{name}"
            );
            assert_outbox_holds(&outbox_dir, 6);
        });
    }
}

#[test]
fn a_failed_outbox_fsync_refuses_until_restarted_and_loses_nothing_published() {
    let dir = tempfile::tempdir().unwrap();
    let outbox_dir = dir.path().join("outbox");
    let watch = failpoint::watch(dir.path());
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&outbox_dir).unwrap();
        outbox.publish(&entries(1..=2)).await.unwrap();
        outbox.publish(&entries(3..=4)).await.unwrap();

        let fsync = failpoint::arm_times(Op::Sync, &log_root(&outbox_dir), Fault::Eio, 1);
        let err = outbox.publish(&entries(5..=6)).await.unwrap_err();
        assert_eq!(fsync.hits(), 1, "the fsync fault never fired");
        drop(fsync);
        // The disk works again, but what the failed fsync covered is unknown: this
        // process publishes nothing more.
        let err2 = outbox.publish(&entries(5..=6)).await.unwrap_err();
        assert!(
            err2.to_string()
                .contains("refuses to publish until the process restarts"),
            "{err} / {err2}"
        );
        drop(outbox);
        power_cut(&watch);

        // A new process: what the power cut left, each entry once, then the rest.
        let reopened = EmbeddedOutbox::open(&outbox_dir).unwrap();
        assert_eq!(reopened.last_published().await.unwrap().get(""), Some(&4));
        reopened.publish(&entries(5..=6)).await.unwrap();
        // Dropped, the log checkpoints: its segments hold everything, fsynced.
        drop(reopened);
        assert_eq!(
            power_cut(&watch),
            0,
            "a clean close left a published event unsynced"
        );
        let reopened = EmbeddedOutbox::open(&outbox_dir).unwrap();
        assert_eq!(reopened.last_published().await.unwrap().get(""), Some(&6));
        assert_outbox_holds(&outbox_dir, 6);
    });
}

#[test]
fn a_checkpoint_is_committed_only_once_fsynced() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let watch = failpoint::watch(dir.path());
    let shard = ShardId("0".into());
    let seq = SequenceNumber::from_u64;
    rt().block_on(async {
        let store = EmbeddedCheckpoints::open(&root).unwrap();
        assert!(store.acquire_lease("lake", &shard, "w").await.unwrap());
        store.commit("lake", &shard, &seq(5)).await.unwrap();
        for op in [Op::Write, Op::Sync] {
            let fault = failpoint::arm(op, &root, Fault::Eio);
            let err = store.commit("lake", &shard, &seq(9)).await.unwrap_err();
            assert!(fault.hits() >= 1, "{op:?}: the fault never fired ({err})");
            assert_eq!(
                store.checkpoint("lake", &shard).await.unwrap(),
                Some(seq(5)),
                "{op:?}: a commit that failed replaced the checkpoint"
            );
        }
        store.commit("lake", &shard, &seq(7)).await.unwrap();
        power_cut(&watch);
        drop(store);
        let reopened = EmbeddedCheckpoints::open(&root).unwrap();
        assert_eq!(
            reopened.checkpoint("lake", &shard).await.unwrap(),
            Some(seq(7)),
            "a committed checkpoint did not survive a power cut"
        );
    });
}

/// Four shards, one durable group: the journal's one fsync makes every shard's part of it
/// durable, where each shard's segment used to take its own.
#[test]
fn one_fsync_makes_a_group_durable_on_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let cfg = EmbeddedStreamConfig { shards: 4, ..cfg() };
    rt().block_on(async {
        let log = EmbeddedLog::open(&root, &cfg).unwrap();
        let records: Vec<Record> = (0..200)
            .map(|i| Record {
                key: format!("key-{i}").into(),
                payload: Bytes::from(format!("p-{i}")),
            })
            .collect();
        let syncs = failpoint::arm(Op::Sync, &root, Fault::Count);
        let results = log.append(records).await;
        let shards: std::collections::HashSet<String> = results
            .iter()
            .map(|r| r.as_ref().expect("appended").shard.0.clone())
            .collect();
        assert_eq!(shards.len(), 4, "the records did not reach every shard");
        assert_eq!(
            syncs.hits(),
            1,
            "a group across four shards took {} fsyncs",
            syncs.hits()
        );
        drop(syncs);
        log.close().await.unwrap();
    });
}

/// A group whose journal write failed halfway, and whose undo failed too, left its frames
/// whole in the segment and a torn entry in the journal. It was never acknowledged, and
/// the reopened log does not hold it, even where the watermark is lost and recovery has
/// only the frames to go by.
#[test]
fn a_group_whose_journal_entry_is_torn_is_not_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        let acked = acked(&append_concurrently(&log, "before", 2, 10).await);
        assert_eq!(acked.len(), 20);
        let journal = root.join("journal");
        let write = failpoint::arm_times(Op::Write, &journal, Fault::ShortWrite, 1);
        let undo = failpoint::arm_times(Op::SetLen, &root, Fault::Eio, 2);
        let failed = append_concurrently(&log, "torn", 1, 5).await;
        assert_eq!(
            (write.hits(), undo.hits()),
            (1, 2),
            "the faults did not fire"
        );
        assert_all_unavailable(&failed, "a group whose journal write failed");
        log.halt().await;
        drop(log);

        let contents = floodgate_sinks::log_journal::read(&journal).unwrap();
        assert!(contents.torn_bytes > 0, "the journal has no torn entry");
        let report = floodgate_sinks::log_verify::check(&root).unwrap();
        assert!(
            report.notes.iter().any(|n| n.contains("the journal holds")),
            "verify does not mention the journal: {:?}",
            report.notes
        );
        // Without a watermark, recovery keeps whole frames at a segment's end.
        std::fs::remove_file(root.join("shard-0000").join("durable")).unwrap();
        let counts = payload_counts(&root).await;
        assert_exactly_once(&counts, &acked);
        assert_eq!(counts.len(), acked.len(), "{counts:?}");
        let contents = floodgate_sinks::log_journal::read(&journal).unwrap();
        assert!(
            contents.entries.is_empty() && contents.torn_bytes == 0,
            "open left the journal full"
        );
    });
}

/// After a power cut the segments may lack what the journal holds. A reader in another
/// process that opens the log before any writer has (a `lake rebuild`, `stream read`)
/// gets every acknowledged record all the same.
#[test]
fn a_reader_after_a_power_cut_reads_what_only_the_journal_held() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    let watch = failpoint::watch(dir.path());
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        let acked = acked(&append_concurrently(&log, "r", 4, 10).await);
        assert_eq!(acked.len(), 40);
        log.halt().await;
        assert!(power_cut(&watch) > 0, "the power cut took nothing");
        drop(log);

        let reader = floodgate_sinks::EmbeddedLogReader::open(&root).unwrap();
        let want: HashMap<String, usize> = acked.iter().map(|p| (p.clone(), 1)).collect();
        assert_eq!(
            counts_in(&reader).await,
            want,
            "the reader did not see every acknowledged record exactly once"
        );
    });
}

/// A journal damaged in its middle cannot say what came after the damage. When its
/// readable entries end below what a shard acknowledged, open refuses and changes
/// nothing: cutting the segments back to those entries would destroy acknowledged records
/// that a crash (which keeps the page cache) left whole.
#[test]
fn a_journal_damaged_in_the_middle_is_refused_and_nothing_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stream");
    rt().block_on(async {
        let log = Arc::new(EmbeddedLog::open(&root, &cfg()).unwrap());
        for round in 0..3 {
            let outcomes = append_concurrently(&log, &format!("g{round}"), 1, 10).await;
            assert_eq!(acked(&outcomes).len(), 10);
        }
        log.halt().await;
        drop(log);
        let journal = root.join("journal");
        let contents = floodgate_sinks::log_journal::read(&journal).unwrap();
        assert_eq!(contents.entries.len(), 3, "one entry per group");
        // Flip a byte of the second entry's frames: the first still reads.
        let mut bytes = std::fs::read(&journal).unwrap();
        let header = floodgate_sinks::log_journal::HEADER_LEN as usize;
        let entry_header = floodgate_sinks::log_journal::ENTRY_HEADER;
        let second = header + entry_header + contents.entries[0].frames.len();
        bytes[second + entry_header + 5] ^= 0xff;
        std::fs::write(&journal, &bytes).unwrap();
        let before = segment_bytes(&root);

        let err = EmbeddedLog::open(&root, &cfg()).unwrap_err();
        assert!(
            err.to_string().contains("journal") && err.to_string().contains("acknowledged"),
            "{err}"
        );
        assert_eq!(
            segment_bytes(&root),
            before,
            "the refused open cut a segment"
        );
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            bytes,
            "the journal was changed"
        );
    });
}
