//! The embedded outbox (the derived-event log) against its contract: every entry's events
//! in publish order, each once, across a full disk, a crash that left part of an entry, a
//! standby taking the relay over, segment rolls and retention; `read_events` works across
//! segments and after retention, and an older floodgate's `outbox.ndjson` is migrated with
//! its consumers' checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use floodgate_core::config::OutboxConfig;
use floodgate_core::state::{OutboxEntry, Publisher};
use floodgate_core::stream::{
    CheckpointStore, Record, SequenceNumber, ShardId, StartPosition, StreamReader, StreamWriter,
};
use floodgate_sinks::outbox::{FILE_NAME, ensure_log, log_config, log_root, read_events};
use floodgate_sinks::{EmbeddedCheckpoints, EmbeddedLog, EmbeddedLogReader, EmbeddedOutbox};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `len` bytes that zstd cannot shrink much (so that sizes on disk mean something).
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The derived events of outbox entry `seq`: two events, `pad` bytes of padding each.
fn events_of(seq: u64, pad: usize) -> Vec<String> {
    (0..2)
        .map(|i| {
            format!(
                r#"{{"id":"e-{seq}-{i}","type":"booking.confirmed","time":"2026-01-01T00:00:00Z","pad":"{}"}}"#,
                noise(seq * 2 + i, pad)
            )
        })
        .collect()
}

fn entries(seqs: std::ops::RangeInclusive<u64>, pad: usize) -> Vec<OutboxEntry> {
    seqs.map(|seq| OutboxEntry {
        partition: String::new(),
        seq,
        events: events_of(seq, pad),
    })
    .collect()
}

fn all_events(seqs: std::ops::RangeInclusive<u64>, pad: usize) -> Vec<String> {
    seqs.flat_map(|seq| events_of(seq, pad)).collect()
}

/// Bytes of the log's segments.
fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(log_root(dir).join("shard-0000"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// A small tmpfs mounted for one test, unmounted when dropped (we run as root).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem holding `dir` to the last byte, then frees `free` bytes of it.
fn fill_leaving(dir: &Path, free: u64) {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xAB_u8; 16 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    assert!(written > free, "the filesystem was too small to fill");
    f.set_len(written - free).unwrap();
}

#[test]
fn a_failed_write_on_a_full_disk_loses_and_repeats_nothing() {
    let fs = Tmpfs::mount("1M");
    let dir = fs.path().join("outbox");
    let pad = 500; // about 1 KiB an event
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&dir).unwrap();
        outbox.publish(&entries(1..=40, pad)).await.unwrap();

        // Room for about 12 of the next 80 events: the write is cut short, then fails.
        fill_leaving(&fs.path(), 12 * 1024);
        let err = outbox
            .publish(&entries(41..=80, pad))
            .await
            .expect_err("a publish larger than the free space must fail");
        assert!(
            err.to_string()
                .contains(&log_root(&dir).display().to_string()),
            "{err}"
        );
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=40, pad));

        // Room again: the relay's retry publishes the rest, each entry once, however much
        // of the failed write the log kept.
        fs.resize("8M");
        outbox.publish(&entries(41..=80, pad)).await.unwrap();
        outbox.publish(&entries(1..=80, pad)).await.unwrap();
        assert_eq!(outbox.last_published().await.unwrap().get(""), Some(&80));
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=80, pad));
        drop(outbox);

        let reopened = EmbeddedOutbox::open(&dir).unwrap();
        assert_eq!(reopened.last_published().await.unwrap().get(""), Some(&80));
    });
}

#[test]
fn an_entry_left_half_written_is_finished_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    let pad = 20;
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&dir).unwrap();
        outbox.publish(&entries(1..=3, pad)).await.unwrap();
        drop(outbox);
        // A relay died after the first of entry 4's two events reached the log.
        {
            let log =
                EmbeddedLog::open(&log_root(&dir), &log_config(&OutboxConfig::default())).unwrap();
            let first = events_of(4, pad).remove(0);
            let appended = log
                .append(vec![Record {
                    key: "4:0/2".into(),
                    payload: first.into_bytes().into(),
                }])
                .await;
            appended[0].as_ref().unwrap();
            log.close().await.unwrap();
        }
        let standby = EmbeddedOutbox::open(&dir).unwrap();
        // Entry 4 is not published yet: the relay must send it again.
        assert_eq!(standby.last_published().await.unwrap().get(""), Some(&3));
        standby.publish(&entries(4..=6, pad)).await.unwrap();
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=6, pad));
    });
}

#[test]
fn a_standby_that_takes_the_relay_over_continues_where_the_log_ends() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    rt().block_on(async {
        // Both open at start; only the one holding the relay lease publishes.
        let standby = EmbeddedOutbox::open(&dir).unwrap();
        let active = EmbeddedOutbox::open(&dir).unwrap();
        active.publish(&entries(1..=5, 10)).await.unwrap();
        // One writer at a time: the log is the active relay's while it lives.
        let err = standby.last_published().await.unwrap_err();
        assert!(err.to_string().contains("another process holds"), "{err}");
        drop(active);
        assert_eq!(standby.last_published().await.unwrap().get(""), Some(&5));
        standby.publish(&entries(1..=7, 10)).await.unwrap();
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=7, 10));
    });
}

#[test]
fn the_log_rolls_and_retention_keeps_what_a_consumer_has_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    let cfg = OutboxConfig {
        segment_bytes: 8 * 1024,
        retention_bytes: 32 * 1024,
    };
    let pad = 400;
    rt().block_on(async {
        ensure_log(&dir, &cfg).await.unwrap();
        // The derived events' lake: a consumer of the log that has read nothing yet.
        let checkpoints = EmbeddedCheckpoints::open(&log_root(&dir)).unwrap();
        let shard = ShardId("0".into());
        assert!(
            checkpoints
                .acquire_lease("lake-derived", &shard, "me")
                .await
                .unwrap()
        );
        let outbox = EmbeddedOutbox::open_with(&dir, &cfg).unwrap();
        for k in 0..20 {
            outbox
                .publish(&entries(k * 10 + 1..=k * 10 + 10, pad))
                .await
                .unwrap();
        }
        // Nothing read, nothing deleted: about 160 KiB of events, all there.
        assert!(log_bytes(&dir) > 100 * 1024, "{}", log_bytes(&dir));
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=200, pad));

        // The consumer reads up to entry 150; later rolls delete what it has read, down to
        // the retention size, and never past its checkpoint.
        let reader = EmbeddedLogReader::open(&log_root(&dir)).unwrap();
        let batch = reader
            .read(&shard, &StartPosition::TrimHorizon, 300)
            .await
            .unwrap();
        let last = batch.records.last().unwrap().sequence.clone();
        assert_eq!(last, SequenceNumber::from_u64(299));
        checkpoints
            .commit("lake-derived", &shard, &last)
            .await
            .unwrap();
        for k in 20..30 {
            outbox
                .publish(&entries(k * 10 + 1..=k * 10 + 10, pad))
                .await
                .unwrap();
        }
        let kept = read_events(&dir).unwrap();
        let all = all_events(1..=300, pad);
        assert!(
            kept.len() < all.len(),
            "retention deleted nothing: {} bytes",
            log_bytes(&dir)
        );
        // What is kept is a suffix of what was published, and holds all the consumer
        // has not read (events 300 on, entries 151 on).
        assert_eq!(kept[..], all[all.len() - kept.len()..]);
        assert!(kept.len() >= all.len() - 300, "{} kept", kept.len());

        // Once the consumer has read everything, the log shrinks to the retention size
        // (plus the active segment and the one being filled when it rolls).
        let batch = reader
            .read(&shard, &StartPosition::After(last), 10_000)
            .await
            .unwrap();
        let last = batch.records.last().unwrap().sequence.clone();
        checkpoints
            .commit("lake-derived", &shard, &last)
            .await
            .unwrap();
        outbox.publish(&entries(301..=320, pad)).await.unwrap();
        assert!(
            log_bytes(&dir) <= cfg.retention_bytes + 2 * cfg.segment_bytes,
            "{} bytes kept",
            log_bytes(&dir)
        );
        let kept = read_events(&dir).unwrap();
        let all = all_events(1..=320, pad);
        assert_eq!(kept[..], all[all.len() - kept.len()..]);
        // The position survives retention: a restarted relay goes on after entry 300.
        drop(outbox);
        let reopened = EmbeddedOutbox::open_with(&dir, &cfg).unwrap();
        assert_eq!(reopened.last_published().await.unwrap().get(""), Some(&320));
    });
}

#[test]
fn an_older_ndjson_outbox_is_migrated_with_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    let pad = 30;
    let mut ndjson = String::new();
    for seq in [1, 2, 5] {
        let events = events_of(seq, pad).join(",");
        ndjson.push_str(&format!("{{\"seq\":{seq},\"events\":[{events}]}}\n"));
    }
    // A torn tail: never published, so never migrated (the relay sends it again).
    ndjson.push_str("{\"seq\":6,\"events\":[{\"id\"");
    std::fs::write(dir.join(FILE_NAME), &ndjson).unwrap();
    // The derived lake had committed event 0 of entry 2 (seq × 1,000,000 + index).
    std::fs::write(
        dir.join("checkpoints/lake-derived.json"),
        r#"{"shards":{"outbox":"2000000"}}"#,
    )
    .unwrap();
    // A migration that died half way left its staging directory.
    std::fs::create_dir_all(dir.join("log.migrating/shard-0000")).unwrap();
    std::fs::write(dir.join("log.migrating/meta.json"), "{").unwrap();

    let before = read_events(&dir).unwrap();
    let mut expected = all_events(1..=2, pad);
    expected.extend(events_of(5, pad));
    assert_eq!(before, expected, "an unmigrated outbox reads as before");

    rt().block_on(ensure_log(&dir, &OutboxConfig::default()))
        .unwrap();
    assert!(!dir.join(FILE_NAME).exists());
    assert!(!dir.join("log.migrating").exists());
    assert_eq!(read_events(&dir).unwrap(), expected);
    // Event 0 of entry 2 is the log's third record (sequence 2).
    let cp: serde_json::Value = serde_json::from_slice(
        &std::fs::read(log_root(&dir).join("checkpoints/lake-derived.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cp["shards"]["0"], "2", "{cp}");
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&dir).unwrap();
        assert_eq!(outbox.last_published().await.unwrap().get(""), Some(&5));
        outbox.publish(&entries(5..=6, pad)).await.unwrap();
    });
    expected.extend(events_of(6, pad));
    assert_eq!(read_events(&dir).unwrap(), expected);
    // Once is enough: a second call changes nothing.
    rt().block_on(ensure_log(&dir, &OutboxConfig::default()))
        .unwrap();
    assert_eq!(read_events(&dir).unwrap(), expected);
}

#[test]
fn damage_in_an_older_outbox_stops_the_migration_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    std::fs::create_dir_all(&dir).unwrap();
    let good = |seq: u64| format!("{{\"seq\":{seq},\"events\":[{{\"id\":\"{seq}\"}}]}}\n");
    let text = format!("{}not json\n{}", good(1), good(2));
    std::fs::write(dir.join(FILE_NAME), &text).unwrap();
    let err = rt()
        .block_on(ensure_log(&dir, &OutboxConfig::default()))
        .unwrap_err();
    assert!(err.to_string().contains("byte offset"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join(FILE_NAME)).unwrap(), text);
    assert!(!log_root(&dir).exists());
    let _ = std::io::stdout().flush();
}

#[test]
fn a_backlog_larger_than_the_logs_append_queue_is_published_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("outbox");
    // A relay catching up: 14 entries of 10,000 events (a full bookings batch each),
    // about 70 MB together, past the log's 64 MiB append queue.
    let entries: Vec<OutboxEntry> = (1..=14)
        .map(|seq| OutboxEntry {
            partition: String::new(),
            seq,
            events: (0..10_000)
                .map(|i| {
                    format!(
                        r#"{{"id":"e-{seq}-{i}","pad":"{}"}}"#,
                        noise(seq * 10_000 + i, 480)
                    )
                })
                .collect(),
        })
        .collect();
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&dir).unwrap();
        outbox.publish(&entries).await.unwrap();
        assert_eq!(outbox.last_published().await.unwrap().get(""), Some(&14));
    });
    let events = read_events(&dir).unwrap();
    assert_eq!(events.len(), 140_000);
    assert!(
        events
            .iter()
            .zip(entries.iter().flat_map(|e| &e.events))
            .all(|(a, b)| a == b),
        "events out of order or changed"
    );
}
