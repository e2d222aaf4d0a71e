//! The embedded log against its contract: durability across reopen, torn-tail recovery,
//! per-key order, shard stability, damage that is reported rather than skipped. The
//! reader and writer contracts every backend shares are in `stream_conformance.rs`;
//! retention is in `retention.rs`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use floodgate_core::config::{Compression, EmbeddedStreamConfig};
use floodgate_core::partition::shard_for_key;
use floodgate_core::stream::{
    CheckpointStore, Record, SequenceNumber, ShardId, StartPosition, StreamReader, StreamWriter,
};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog, EmbeddedLogReader};
use proptest::prelude::*;

fn cfg() -> EmbeddedStreamConfig {
    EmbeddedStreamConfig::default()
}

fn rec(key: &str, payload: &str) -> Record {
    Record {
        key: key.into(),
        payload: Bytes::from(payload.to_owned()),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every record of every shard, as (shard, sequence, key, payload), via the read API.
async fn read_all(reader: &dyn StreamReader) -> Vec<(String, u64, String, String)> {
    let mut out = Vec::new();
    for shard in reader.shards().await.unwrap() {
        let mut pos = StartPosition::TrimHorizon;
        loop {
            let batch = reader.read(&shard.id, &pos, 7).await.unwrap();
            if batch.records.is_empty() {
                break;
            }
            for r in &batch.records {
                out.push((
                    shard.id.0.clone(),
                    r.sequence.as_u64().unwrap(),
                    r.key.clone(),
                    String::from_utf8(r.payload.to_vec()).unwrap(),
                ));
            }
            pos = batch.next.unwrap();
        }
    }
    out
}

#[test]
fn records_survive_reopen_and_sequences_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        let r = log.append(vec![rec("a", "1"), rec("a", "2")]).await;
        assert!(r.iter().all(Result::is_ok));
        log.close().await.unwrap();
        drop(log);
        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        let r = log.append(vec![rec("a", "3")]).await;
        assert_eq!(r[0].as_ref().unwrap().sequence.as_u64(), Some(2));
        let all = read_all(&log).await;
        assert_eq!(
            all.iter().map(|r| r.3.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3"]
        );
        log.close().await.unwrap();
    });
}

#[test]
fn a_second_writer_is_refused_and_shard_count_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
    let err = EmbeddedLog::open(dir.path(), &cfg()).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    drop(log);
    let err =
        EmbeddedLog::open(dir.path(), &EmbeddedStreamConfig { shards: 8, ..cfg() }).unwrap_err();
    assert!(err.to_string().contains("4 shards"), "{err}");
}

/// `stream verify --repair` writes a journal of this format, so it marks a log of an
/// older format as of this one, which an older floodgate then refuses by name.
#[test]
fn a_repair_marks_a_log_of_an_older_format_as_of_this_one() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        assert!(log.append(vec![rec("a", "1")]).await[0].is_ok());
        log.close().await.unwrap();
    });
    let meta = dir.path().join("meta.json");
    std::fs::write(&meta, r#"{"format":2,"shards":4}"#).unwrap();
    floodgate_sinks::log_verify::repair(dir.path()).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["format"], 3, "{meta}");
}

/// A log written before the journal (format 1: no `journal` file) opens, keeps its
/// records, and is marked format 3, which a floodgate that does not replay the journal's
/// generations refuses; so does one of format 2 (a journal cut back at each checkpoint,
/// read as it was). A format from the future is refused here.
#[test]
fn a_log_from_before_the_journal_is_upgraded_and_a_later_format_refused() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta.json");
    let format = || -> u64 {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("meta.json")).unwrap()).unwrap();
        meta["format"].as_u64().unwrap()
    };
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        assert!(log.append(vec![rec("a", "1")]).await[0].is_ok());
        log.close().await.unwrap();
        drop(log);
        assert_eq!(format(), 3);
        std::fs::remove_file(dir.path().join("journal")).unwrap();
        std::fs::write(&meta, r#"{"format":1,"shards":4}"#).unwrap();

        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        assert_eq!(format(), 3, "the log was not upgraded");
        assert!(dir.path().join("journal").is_file());
        assert!(log.append(vec![rec("a", "2")]).await[0].is_ok());
        let all = read_all(&log).await;
        assert_eq!(
            all.iter().map(|r| r.3.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        log.close().await.unwrap();
        drop(log);
        std::fs::write(&meta, r#"{"format":2,"shards":4}"#).unwrap();
        let log = EmbeddedLog::open(dir.path(), &cfg()).unwrap();
        assert_eq!(format(), 3, "the log of format 2 was not upgraded");
        assert_eq!(read_all(&log).await.len(), 2);
        log.close().await.unwrap();
    });
    std::fs::write(&meta, r#"{"format":4,"shards":4}"#).unwrap();
    let err = EmbeddedLog::open(dir.path(), &cfg()).unwrap_err();
    assert!(
        err.to_string().contains("log format 4 is not supported"),
        "{err}"
    );
}

/// The byte offsets of the frames of a segment, from their headers (`body_len` is the
/// first four bytes, little-endian; the header is 32 bytes).
fn frame_offsets(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 32 <= bytes.len() {
        out.push(pos as u64);
        let body_len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 32 + body_len;
    }
    out
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn active_segment(root: &Path, shard: u32) -> std::path::PathBuf {
    let dir = root.join(format!("shard-{shard:04}"));
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn torn_tail_is_truncated_and_complete_records_are_kept() {
    // Kinds of tail a crash leaves past the durable watermark: garbage, zeros, a header
    // copied and cut short, a frame cut short.
    for damage in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedStreamConfig { shards: 1, ..cfg() };
        rt().block_on(async {
            let log = EmbeddedLog::open(dir.path(), &config).unwrap();
            for i in 0..10 {
                let r = log
                    .append(vec![rec("k", &format!("{i}")), rec("k", &format!("{i}b"))])
                    .await;
                assert!(r.iter().all(Result::is_ok));
            }
            log.close().await.unwrap();
        });
        let seg = active_segment(dir.path(), 0);
        let bytes = std::fs::read(&seg).unwrap();
        let frames = frame_offsets(&bytes);
        let tail: Vec<u8> = match damage {
            0 => b"garbage\xff\x00 bytes".to_vec(),
            1 => vec![0u8; 5],
            // The first frame's header (a wrong sequence) and a little of its body.
            2 => bytes[..40].to_vec(),
            // A frame being written when the process died: the last frame again, cut
            // three bytes short.
            _ => bytes[frames[9] as usize..bytes.len() - 3].to_vec(),
        };
        append_bytes(&seg, &tail);
        rt().block_on(async {
            let log = EmbeddedLog::open(dir.path(), &config).unwrap();
            let all = read_all(&log).await;
            assert_eq!(all.len(), 20, "damage {damage}");
            for (i, r) in all.iter().enumerate() {
                assert_eq!(r.1, i as u64);
            }
            let r = log.append(vec![rec("k", "after")]).await;
            assert_eq!(r[0].as_ref().unwrap().sequence.as_u64(), Some(20));
            let all = read_all(&log).await;
            assert_eq!(all.last().unwrap().3, "after");
            log.close().await.unwrap();
        });
    }
}

#[test]
fn concurrent_appends_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedStreamConfig {
        group_commit_max_delay_us: 500,
        ..cfg()
    };
    rt().block_on(async {
        let log = std::sync::Arc::new(EmbeddedLog::open(dir.path(), &config).unwrap());
        let mut tasks = Vec::new();
        for t in 0..16 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let r = log
                        .append(vec![rec(&format!("c{t}"), &format!("{t}-{i}"))])
                        .await;
                    assert!(r[0].is_ok());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let all = read_all(&*log).await;
        assert_eq!(all.len(), 800);
        for t in 0..16 {
            let key = format!("c{t}");
            let got: Vec<_> = all
                .iter()
                .filter(|r| r.2 == key)
                .map(|r| r.3.clone())
                .collect();
            let want: Vec<_> = (0..50).map(|i| format!("{t}-{i}")).collect();
            assert_eq!(got, want, "order of {key}");
        }
        log.close().await.unwrap();
    });
}

/// The group-commit linger waits only while the edge is busy (the count of requests in
/// progress it keeps through `StreamWriter::incoming`), never longer than
/// `group_commit_linger_us`, and stops soon after the edge quietens: a few producers'
/// appends are written at once whatever the linger.
#[test]
fn the_linger_waits_only_while_the_edge_is_busy() {
    const BUSY: usize = floodgate_sinks::LINGER_MIN_IN_PROGRESS;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let long = EmbeddedStreamConfig {
        group_commit_linger_us: 60_000_000,
        ..cfg()
    };
    // A quiet edge (one fewer request in progress than busy): answered at once under a
    // one-minute linger.
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &long).unwrap();
        log.incoming()
            .unwrap()
            .fetch_add(BUSY - 1, Ordering::AcqRel);
        for i in 0..3 {
            let lone = tokio::time::timeout(
                Duration::from_secs(20),
                log.append(vec![rec("a", &format!("lone-{i}"))]),
            )
            .await
            .expect("a lone append is not held by the linger");
            assert!(lone[0].is_ok());
        }
        log.close().await.unwrap();
    });

    // A busy edge: the group waits for more, up to the linger.
    let dir = tempfile::tempdir().unwrap();
    let short = EmbeddedStreamConfig {
        group_commit_linger_us: 400_000,
        ..cfg()
    };
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &short).unwrap();
        let incoming = log.incoming().expect("the embedded log counts requests");
        incoming.fetch_add(BUSY, Ordering::AcqRel);
        let started = Instant::now();
        assert!(log.append(vec![rec("a", "x")]).await[0].is_ok());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(350),
            "the group did not linger while the edge was busy: {took:?}"
        );
        incoming.fetch_sub(BUSY, Ordering::AcqRel);
        log.close().await.unwrap();
    });

    // Under a one-minute linger, the group stops waiting once the edge quietens.
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let log = std::sync::Arc::new(EmbeddedLog::open(dir.path(), &long).unwrap());
        let incoming = log.incoming().unwrap();
        incoming.fetch_add(BUSY, Ordering::AcqRel);
        let waiting = {
            let log = log.clone();
            tokio::spawn(async move { log.append(vec![rec("a", "y")]).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        incoming.fetch_sub(BUSY, Ordering::AcqRel);
        let appended = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the group stopped lingering once the edge quietened")
            .unwrap();
        assert!(appended[0].is_ok());
        log.close().await.unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Batching never reorders the events of one key, whatever the mix of keys and batch
    /// sizes, and each key's events all sit in the shard its hash names.
    #[test]
    fn batching_keeps_per_key_order(
        batches in proptest::collection::vec(
            proptest::collection::vec(0u8..6, 1..40), 1..12),
        shards in 1u32..6,
        compression in prop_oneof![
            Just(Compression::None),
            Just(Compression::Zstd),
            Just(Compression::Lz4)
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedStreamConfig { shards, compression, ..cfg() };
        let (all, sent) = rt().block_on(async {
            let log = EmbeddedLog::open(dir.path(), &config).unwrap();
            let mut sent: HashMap<String, Vec<String>> = HashMap::new();
            let mut n = 0;
            for batch in &batches {
                let records: Vec<Record> = batch.iter().map(|k| {
                    n += 1;
                    let key = format!("key-{k}");
                    sent.entry(key.clone()).or_default().push(n.to_string());
                    rec(&key, &n.to_string())
                }).collect();
                let results = log.append(records).await;
                assert!(results.iter().all(Result::is_ok));
            }
            let all = read_all(&log).await;
            log.close().await.unwrap();
            (all, sent)
        });
        for (key, want) in sent {
            let expected_shard = shard_for_key(&key, shards).to_string();
            let got: Vec<String> = all.iter().filter(|r| r.2 == key).map(|r| {
                assert_eq!(r.0, expected_shard);
                r.3.clone()
            }).collect();
            prop_assert_eq!(got, want);
        }
    }
}

#[test]
fn leases_are_exclusive_and_freed_when_the_holder_goes() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let shard = ShardId("0".into());
        let a = EmbeddedCheckpoints::open(dir.path()).unwrap();
        assert!(
            a.acquire_lease("bookings", &shard, "worker-a")
                .await
                .unwrap()
        );
        // Idempotent for the holder; refused to anyone else, in or out of this store.
        assert!(
            a.acquire_lease("bookings", &shard, "worker-a")
                .await
                .unwrap()
        );
        assert!(
            !a.acquire_lease("bookings", &shard, "worker-b")
                .await
                .unwrap()
        );
        let b = EmbeddedCheckpoints::open(dir.path()).unwrap();
        assert!(
            !b.acquire_lease("bookings", &shard, "worker-b")
                .await
                .unwrap()
        );
        assert!(!b.renew_lease("bookings", &shard, "worker-b").await.unwrap());
        assert!(a.renew_lease("bookings", &shard, "worker-a").await.unwrap());
        // Another consumer or shard is a different lease.
        assert!(b.acquire_lease("lake", &shard, "worker-b").await.unwrap());
        assert!(
            b.acquire_lease("bookings", &ShardId("1".into()), "worker-b")
                .await
                .unwrap()
        );
        // When the holder goes (here: releases; a dead process's flock goes with it),
        // the other worker can take over.
        a.release_lease("bookings", &shard, "worker-a")
            .await
            .unwrap();
        assert!(!a.renew_lease("bookings", &shard, "worker-a").await.unwrap());
        assert!(
            b.acquire_lease("bookings", &shard, "worker-b")
                .await
                .unwrap()
        );
        drop(b);
        let c = EmbeddedCheckpoints::open(dir.path()).unwrap();
        assert!(
            c.acquire_lease("bookings", &shard, "worker-c")
                .await
                .unwrap()
        );
    });
}

#[test]
fn reads_can_start_at_a_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedStreamConfig {
        shards: 1,
        segment_bytes: 4096,
        compression: Compression::None,
        ..cfg()
    };
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        let payload = "y".repeat(500);
        for i in 0..20 {
            assert!(
                log.append(vec![rec("k", &format!("old-{i}-{payload}"))])
                    .await[0]
                    .is_ok()
            );
        }
        // Distinct append times: the clock has to move past the old records.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        std::thread::sleep(std::time::Duration::from_millis(5));
        for i in 0..5 {
            assert!(log.append(vec![rec("k", &format!("new-{i}"))]).await[0].is_ok());
        }
        let shard = ShardId("0".into());
        let b = log
            .read(&shard, &StartPosition::AtTimestamp(t), 100)
            .await
            .unwrap();
        let got: Vec<String> = b
            .records
            .iter()
            .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(got, ["new-0", "new-1", "new-2", "new-3", "new-4"]);
        // A time after everything: nothing, and the position is the end.
        let b = log
            .read(&shard, &StartPosition::AtTimestamp(t + 3_600_000), 100)
            .await
            .unwrap();
        assert!(b.records.is_empty());
        let b = log.read(&shard, &b.next.unwrap(), 100).await.unwrap();
        assert!(b.records.is_empty());
        log.close().await.unwrap();
    });
}

fn sequences(all: &[(String, u64, String, String)]) -> Vec<u64> {
    all.iter().map(|r| r.1).collect()
}

/// A one-shard, uncompressed log holding records 0..n, one frame each, closed.
fn log_of(dir: &Path, n: usize, config: &EmbeddedStreamConfig) {
    rt().block_on(async {
        let log = EmbeddedLog::open(dir, config).unwrap();
        for i in 0..n {
            assert!(log.append(vec![rec("k", &format!("record-{i}"))]).await[0].is_ok());
        }
        log.close().await.unwrap();
    });
}

fn one_shard_plain() -> EmbeddedStreamConfig {
    EmbeddedStreamConfig {
        shards: 1,
        compression: Compression::None,
        ..cfg()
    }
}

#[test]
fn a_reader_in_another_process_never_reads_past_the_durable_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let config = one_shard_plain();
    let watermark = dir.path().join("shard-0000").join("durable");
    let published_at_5 = rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        for i in 0..5 {
            assert!(log.append(vec![rec("k", &format!("{i}"))]).await[0].is_ok());
        }
        let published = std::fs::read(&watermark).expect("the writer publishes its watermark");
        for i in 5..10 {
            assert!(log.append(vec![rec("k", &format!("{i}"))]).await[0].is_ok());
        }
        log.close().await.unwrap();
        published
    });
    // Frames 5..9 are whole and CRC-valid on disk, but the published watermark covers only
    // 0..4: what a reader meets while the writer is between its write and its fsync. A short
    // write at a full disk could still cut those frames off and give their sequences to
    // other records, which a reader that had applied them would then skip.
    std::fs::write(&watermark, &published_at_5).unwrap();
    let reader = EmbeddedLogReader::open(dir.path()).unwrap();
    assert_eq!(
        sequences(&rt().block_on(read_all(&reader))),
        [0, 1, 2, 3, 4]
    );
    // records_behind counts the durable records not read yet.
    let b = reader
        .read_blocking(0, &StartPosition::TrimHorizon, 2)
        .unwrap();
    assert_eq!((b.records.len(), b.records_behind), (2, 3));
    let b = reader
        .read_blocking(0, &StartPosition::AtTimestamp(i64::MAX), 10)
        .unwrap();
    assert!(b.records.is_empty());
    assert_eq!(
        b.next,
        Some(StartPosition::At(SequenceNumber::from_u64(5))),
        "a position at the end is the durable end"
    );

    // No watermark at all (a log an older floodgate wrote): nothing is known durable.
    std::fs::remove_file(&watermark).unwrap();
    let reader = EmbeddedLogReader::open(dir.path()).unwrap();
    assert!(rt().block_on(read_all(&reader)).is_empty());

    // The writer's next open keeps the whole frames, fsyncs them and publishes them.
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        let reader = EmbeddedLogReader::open(dir.path()).unwrap();
        assert_eq!(read_all(&reader).await.len(), 10);
        let r = log.append(vec![rec("k", "10")]).await;
        assert_eq!(r[0].as_ref().unwrap().sequence.as_u64(), Some(10));
        let b = reader
            .read_blocking(0, &StartPosition::At(SequenceNumber::from_u64(10)), 5)
            .unwrap();
        assert_eq!((b.records.len(), b.records_behind), (1, 0));
        log.close().await.unwrap();
    });
}

#[test]
fn damage_before_the_end_of_the_active_segment_refuses_open_and_fails_reads() {
    // A flipped byte in a frame's body, and one in its length (the next frame boundary is
    // then unknown and has to be searched for).
    for (what, delta) in [("body", 40u64), ("length", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let config = one_shard_plain();
        log_of(dir.path(), 20, &config);
        let seg = active_segment(dir.path(), 0);
        let frames = frame_offsets(&std::fs::read(&seg).unwrap());
        flip_byte(&seg, frames[3] + delta);
        let before = std::fs::read(&seg).unwrap();

        let err = EmbeddedLog::open(dir.path(), &config).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, floodgate_core::stream::StreamError::Corrupt(_)),
            "{what}: {msg}"
        );
        assert!(msg.contains(&seg.display().to_string()), "{what}: {msg}");
        assert!(
            msg.contains(&format!("byte offset {}", frames[3])),
            "{what}: {msg}"
        );
        assert!(msg.contains("stream verify"), "{what}: {msg}");
        assert_eq!(
            std::fs::read(&seg).unwrap(),
            before,
            "{what}: a refused open changes nothing"
        );

        // A reader in another process gets what precedes the damage, then fails at it; it
        // does not end quietly before it.
        let reader = EmbeddedLogReader::open(dir.path()).unwrap();
        let b = reader
            .read_blocking(0, &StartPosition::TrimHorizon, 100)
            .unwrap();
        assert_eq!(sequences_of(&b.records), [0, 1, 2], "{what}");
        let err = reader
            .read_blocking(0, &b.next.unwrap(), 100)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&seg.display().to_string())
                && err.contains(&format!("byte offset {}", frames[3])),
            "{what}: {err}"
        );

        let report = floodgate_sinks::log_verify::check(dir.path()).unwrap();
        assert_eq!(report.problems.len(), 1, "{what}: {report:?}");
        let p = &report.problems[0];
        assert_eq!(
            (&p.path, p.offset, p.first_sequence, p.end_sequence),
            (&seg, frames[3], Some(3), Some(4)),
            "{what}"
        );
    }
}

#[test]
fn a_damaged_tail_is_truncated_only_when_it_was_never_acknowledged() {
    let config = one_shard_plain();
    // The last frame of a cleanly closed log was acknowledged: cutting it is refused.
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 10, &config);
    let seg = active_segment(dir.path(), 0);
    let bytes = std::fs::read(&seg).unwrap();
    let last = *frame_offsets(&bytes).last().unwrap();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(bytes.len() as u64 - 3)
        .unwrap();
    let err = EmbeddedLog::open(dir.path(), &config)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("byte offset {last}")), "{err}");
    assert!(
        err.contains("records below sequence 10 were acknowledged"),
        "{err}"
    );

    // A log without a watermark (an older floodgate's): a bad last frame with nothing
    // valid after it is a torn tail and is cut; damage with valid frames after it is not.
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 10, &config);
    std::fs::remove_file(dir.path().join("shard-0000").join("durable")).unwrap();
    let seg = active_segment(dir.path(), 0);
    let frames = frame_offsets(&std::fs::read(&seg).unwrap());
    flip_byte(&seg, frames[9] + 40);
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        assert_eq!(read_all(&log).await.len(), 9);
        log.close().await.unwrap();
    });
    std::fs::remove_file(dir.path().join("shard-0000").join("durable")).unwrap();
    flip_byte(&seg, frames[2] + 40);
    let err = EmbeddedLog::open(dir.path(), &config)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("byte offset {}", frames[2])), "{err}");
    assert!(err.contains("a valid frame follows"), "{err}");
}

#[test]
fn damage_in_a_sealed_segment_fails_reads_and_a_repair_accepts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    // About four records per segment.
    let config = EmbeddedStreamConfig {
        segment_bytes: 4096,
        ..one_shard_plain()
    };
    let payload = "x".repeat(1000);
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        for i in 0..20 {
            assert!(log.append(vec![rec("k", &format!("{i}-{payload}"))]).await[0].is_ok());
        }
        log.close().await.unwrap();
    });
    let shard = dir.path().join("shard-0000");
    let first = shard.join(format!("{:020}.seg", 0));
    let frames = frame_offsets(&std::fs::read(&first).unwrap());
    assert!(frames.len() >= 3, "{frames:?}");
    flip_byte(&first, frames[1] + 100);

    rt().block_on(async {
        // Only the active segment is checked at open; the damage is found by the reader.
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        let shard_id = ShardId("0".into());
        let b = log
            .read(&shard_id, &StartPosition::TrimHorizon, 100)
            .await
            .unwrap();
        assert_eq!(sequences_of(&b.records), [0], "records before the damage");
        let err = log
            .read(&shard_id, &b.next.unwrap(), 100)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&first.display().to_string())
                && err.contains(&format!("byte offset {}", frames[1])),
            "the reader skipped the rest of a damaged segment: {err}"
        );
        let report = floodgate_sinks::log_verify::check(dir.path()).unwrap();
        assert_eq!(report.problems.len(), 1, "{report:?}");
        assert_eq!(report.problems[0].offset, frames[1]);
        assert_eq!(report.problems[0].first_sequence, Some(1));
        assert_eq!(report.problems[0].end_sequence, Some(2));
        // A repair needs the writer stopped.
        let err = floodgate_sinks::log_verify::repair(dir.path()).unwrap_err();
        assert!(err.to_string().contains("stop the server"), "{err}");
        log.close().await.unwrap();
    });

    let (actions, after) = floodgate_sinks::log_verify::repair(dir.path()).unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].offset, frames[1]);
    assert_eq!(
        actions[0].moved_to,
        shard.join(format!("{:020}.seg.damaged-{}", 0, frames[1]))
    );
    assert!(actions[0].new_segment.is_none());
    assert_eq!(std::fs::metadata(&first).unwrap().len(), frames[1]);
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        let all = read_all(&log).await;
        let seqs = sequences(&all);
        assert_eq!(seqs[0], 0);
        // The segment's records after the damage left the stream; the rest reads on.
        let next_segment = seqs[1];
        assert_eq!(seqs[1..], (next_segment..20).collect::<Vec<_>>()[..]);
        assert_eq!(
            log.append(vec![rec("k", "new")]).await[0]
                .as_ref()
                .unwrap()
                .sequence
                .as_u64(),
            Some(20)
        );
        log.close().await.unwrap();
    });
}

fn sequences_of(records: &[floodgate_core::stream::StoredRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r.sequence.as_u64().unwrap())
        .collect()
}

#[test]
fn a_repair_of_the_active_segment_never_reuses_acknowledged_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let config = one_shard_plain();
    log_of(dir.path(), 20, &config);
    let seg = active_segment(dir.path(), 0);
    let frames = frame_offsets(&std::fs::read(&seg).unwrap());
    flip_byte(&seg, frames[3] + 40);
    assert!(EmbeddedLog::open(dir.path(), &config).is_err());

    let (actions, after) = floodgate_sinks::log_verify::repair(dir.path()).unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert_eq!(actions.len(), 1);
    assert_eq!(
        actions[0].new_segment,
        Some(
            dir.path()
                .join("shard-0000")
                .join(format!("{:020}.seg", 20))
        )
    );
    rt().block_on(async {
        let log = EmbeddedLog::open(dir.path(), &config).unwrap();
        // A consumer may have read up to 19 before the damage: new records start at 20.
        let r = log.append(vec![rec("k", "after-repair")]).await;
        assert_eq!(r[0].as_ref().unwrap().sequence.as_u64(), Some(20));
        let all = read_all(&log).await;
        assert_eq!(sequences(&all), [0, 1, 2, 20]);
        let reader = EmbeddedLogReader::open(dir.path()).unwrap();
        assert_eq!(sequences(&read_all(&reader).await), [0, 1, 2, 20]);

        // Beside a live writer, bytes past the watermark are a write in progress, not damage.
        append_bytes(&active_segment(dir.path(), 0), b"half a frame");
        let report = floodgate_sinks::log_verify::check(dir.path()).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert!(
            report.notes.iter().any(|n| n.contains("in progress")),
            "{report:?}"
        );
        log.close().await.unwrap();
    });
}
