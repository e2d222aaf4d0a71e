//! The embedded outbox against its contract: a failed write (a full disk) never damages
//! what was published before; only a torn tail is ever cut, damage in the middle is an
//! error naming the file and offset; a standby that takes the relay over continues from
//! what the file holds, not from what it saw when it opened.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use floodgate_core::state::{OutboxEntry, Publisher};
use floodgate_core::stream::{ShardId, StartPosition, StreamReader};
use floodgate_sinks::outbox::{FILE_NAME, read_events};
use floodgate_sinks::{EmbeddedOutbox, OutboxReader};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The derived events of outbox entry `seq`: two events, `pad` bytes of padding each.
fn events_of(seq: u64, pad: usize) -> Vec<String> {
    (0..2)
        .map(|i| {
            format!(
                r#"{{"id":"e-{seq}-{i}","type":"booking.confirmed","time":"2026-01-01T00:00:00Z","pad":"{}"}}"#,
                "p".repeat(pad)
            )
        })
        .collect()
}

fn entries(seqs: std::ops::RangeInclusive<u64>, pad: usize) -> Vec<OutboxEntry> {
    seqs.map(|seq| OutboxEntry {
        seq,
        events: events_of(seq, pad),
    })
    .collect()
}

fn all_events(seqs: std::ops::RangeInclusive<u64>, pad: usize) -> Vec<String> {
    seqs.flat_map(|seq| events_of(seq, pad)).collect()
}

/// The seq of every line of the outbox file, in file order.
fn seqs_in_file(dir: &Path) -> Vec<u64> {
    let bytes = std::fs::read(dir.join(FILE_NAME)).unwrap();
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn append_raw(dir: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(FILE_NAME))
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Every event the outbox reader returns, read from the start in small batches.
async fn read_all(reader: &OutboxReader) -> Result<Vec<String>, String> {
    let shard = ShardId("outbox".into());
    let mut from = StartPosition::TrimHorizon;
    let mut out = Vec::new();
    loop {
        let batch = reader
            .read(&shard, &from, 3)
            .await
            .map_err(|e| e.to_string())?;
        if batch.records.is_empty() {
            return Ok(out);
        }
        out.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8(r.payload.to_vec()).unwrap()),
        );
        from = batch.next.unwrap();
    }
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
fn a_failed_write_on_a_full_disk_never_damages_earlier_lines() {
    let fs = Tmpfs::mount("1M");
    let dir = fs.path().join("outbox");
    let pad = 500; // about 1 KiB a line
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(&dir).unwrap();
        outbox.publish(&entries(1..=40, pad)).await.unwrap();
        let before = std::fs::metadata(dir.join(FILE_NAME)).unwrap().len();

        // Room for about 12 of the next 40 lines: the write is cut short, then fails.
        fill_leaving(&fs.path(), 12 * 1024);
        let err = outbox
            .publish(&entries(41..=80, pad))
            .await
            .expect_err("a publish larger than the free space must fail");
        assert!(
            err.to_string()
                .contains(&dir.join(FILE_NAME).display().to_string()),
            "{err}"
        );
        // The undo cut exactly the failed write: every earlier line is whole and there.
        assert_eq!(
            std::fs::metadata(dir.join(FILE_NAME)).unwrap().len(),
            before,
            "the undo did not restore the length before the write"
        );
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=40, pad));

        // Room again: the relay's retry publishes the rest, each entry once.
        fs.resize("8M");
        outbox.publish(&entries(41..=80, pad)).await.unwrap();
        outbox.publish(&entries(1..=80, pad)).await.unwrap();
        assert_eq!(outbox.last_published().await.unwrap(), Some(80));
        assert_eq!(seqs_in_file(&dir), (1..=80).collect::<Vec<_>>());
        assert_eq!(read_events(&dir).unwrap(), all_events(1..=80, pad));
        assert_eq!(
            read_all(&OutboxReader::new(&dir)).await.unwrap(),
            all_events(1..=80, pad)
        );
        drop(outbox);

        let reopened = EmbeddedOutbox::open(&dir).unwrap();
        assert_eq!(reopened.last_published().await.unwrap(), Some(80));
    });
}

#[test]
fn damage_in_the_middle_refuses_to_open_and_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(dir).unwrap();
        outbox.publish(&entries(1..=5, 10)).await.unwrap();
        drop(outbox);
        // Flip the first byte of the second line.
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
        bytes[second] = b'#';
        std::fs::write(&path, &bytes).unwrap();

        let expect_named = |msg: String| {
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("byte offset {second}")), "{msg}");
        };
        expect_named(EmbeddedOutbox::open(dir).unwrap_err().to_string());
        expect_named(read_events(dir).unwrap_err().to_string());
        expect_named(read_all(&OutboxReader::new(dir)).await.unwrap_err());
        // Nothing was cut.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    });
}

#[test]
fn damage_after_what_a_reader_has_seen_is_an_error_not_a_skip() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    rt().block_on(async {
        let outbox = EmbeddedOutbox::open(dir).unwrap();
        outbox.publish(&entries(1..=3, 10)).await.unwrap();
        let reader = OutboxReader::new(dir);
        assert_eq!(read_all(&reader).await.unwrap(), all_events(1..=3, 10));
        // A bad line, then valid ones: the reader must not step over it.
        append_raw(dir, b"{\"seq\":4,\"events\":[{\"x\"\n");
        append_raw(dir, b"{\"seq\":5,\"events\":[{\"id\":\"e-5\"}]}\n");
        let shard = ShardId("outbox".into());
        let from = StartPosition::After(floodgate_core::stream::SequenceNumber::from_u64(
            3 * floodgate_sinks::outbox::EVENTS_PER_ENTRY + 1,
        ));
        let err = reader.read(&shard, &from, 10).await.unwrap_err();
        assert!(err.to_string().contains("damaged outbox line"), "{err}");
    });
}

#[test]
fn a_torn_tail_is_cut_silently_and_never_read() {
    for tail in [
        &b"{\"seq\":4,\"events\":[{\"id\""[..],
        &b"{\"seq\":4,\"ev\n"[..],
        &b"garbage\n{\"seq\":4,\"ev"[..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        rt().block_on(async {
            let outbox = EmbeddedOutbox::open(dir).unwrap();
            outbox.publish(&entries(1..=3, 10)).await.unwrap();
            drop(outbox);
            append_raw(dir, tail);

            assert_eq!(read_events(dir).unwrap(), all_events(1..=3, 10));
            assert_eq!(
                read_all(&OutboxReader::new(dir)).await.unwrap(),
                all_events(1..=3, 10)
            );
            let outbox = EmbeddedOutbox::open(dir).unwrap();
            assert_eq!(outbox.last_published().await.unwrap(), Some(3));
            outbox.publish(&entries(1..=5, 10)).await.unwrap();
            assert_eq!(seqs_in_file(dir), vec![1, 2, 3, 4, 5]);
            assert_eq!(read_events(dir).unwrap(), all_events(1..=5, 10));
        });
    }
}

#[test]
fn a_standby_that_takes_the_relay_over_does_not_republish() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    rt().block_on(async {
        // Two processes open the outbox at start; only the relay-lease holder publishes.
        let standby = EmbeddedOutbox::open(dir).unwrap();
        let active = EmbeddedOutbox::open(dir).unwrap();
        active.publish(&entries(1..=5, 10)).await.unwrap();
        // The active relay dies (kill -9) before the state store forgets entries 1..=5,
        // and in the middle of writing entry 6.
        drop(active);
        append_raw(dir, b"{\"seq\":6,\"events\":[");

        // The standby takes the lease: its position comes from the file as it is now.
        assert_eq!(standby.last_published().await.unwrap(), Some(5));
        standby.publish(&entries(1..=7, 10)).await.unwrap();
        assert_eq!(seqs_in_file(dir), (1..=7).collect::<Vec<_>>());
        assert_eq!(read_events(dir).unwrap(), all_events(1..=7, 10));
    });
}

#[test]
fn publish_resyncs_even_without_asking_for_the_position_first() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    rt().block_on(async {
        let standby = EmbeddedOutbox::open(dir).unwrap();
        let active = EmbeddedOutbox::open(dir).unwrap();
        active.publish(&entries(1..=5, 10)).await.unwrap();
        drop(active);
        standby.publish(&entries(3..=6, 10)).await.unwrap();
        assert_eq!(seqs_in_file(dir), (1..=6).collect::<Vec<_>>());
    });
}

#[test]
fn the_outbox_directory_and_file_are_created_on_open() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data/outbox");
    let outbox = EmbeddedOutbox::open(&dir).unwrap();
    assert!(dir.join(FILE_NAME).is_file());
    assert_eq!(rt().block_on(outbox.last_published()).unwrap(), None);
    assert!(read_events(&dir).unwrap().is_empty());
}
