//! Damage to the stream's files is never mistaken for a torn tail: a flipped byte early in
//! a shard's active segment makes `floodgate serve` refuse to start, naming the file and
//! offset (it used to truncate there and silently drop every later acknowledged record),
//! `floodgate stream verify` reports it, and `--repair` is the operator's way back. A real
//! torn tail (a frame cut short past the durable end, as a crash mid-write leaves it) still
//! recovers silently.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, booking, stream_read};

/// Posts `batches` batches of 50 bookings spread over many keys (so over every shard), each
/// in its own request (so each request is its own frame in each shard); returns the ids,
/// all acknowledged.
fn post_acked(server: &Server, tag: &str, batches: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for b in 0..batches {
        let events: Vec<_> = (0..50)
            .map(|i| {
                let id = format!("{tag}-{b}-{i}");
                booking(&id, &format!("bk-{id}"), &format!("E{}", i % 16), 1)
            })
            .collect();
        let resp = server.post_batch(&events);
        assert_eq!(
            resp.status,
            200,
            "batch {b}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        ids.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
    }
    ids
}

fn stop(mut server: Server) {
    assert_eq!(server.terminate(), Some(0), "a clean stop exits 0");
}

/// The frame offsets of a segment, from the headers (`body_len`: the first four bytes,
/// little-endian; the header is 32 bytes).
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

/// The active (newest) segment of every shard of the stream.
fn active_segments(data_dir: &Path) -> Vec<PathBuf> {
    let stream = data_dir.join("stream");
    let mut shards: Vec<PathBuf> = std::fs::read_dir(&stream)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("shard-")
        })
        .collect();
    shards.sort();
    shards
        .iter()
        .map(|dir| {
            let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "seg"))
                .collect();
            segs.sort();
            segs.pop().unwrap()
        })
        .collect()
}

/// The active segment with the most frames, and its frame offsets.
fn busiest_active_segment(data_dir: &Path) -> (PathBuf, Vec<u64>) {
    active_segments(data_dir)
        .into_iter()
        .map(|seg| {
            let frames = frame_offsets(&std::fs::read(&seg).unwrap());
            (seg, frames)
        })
        .max_by_key(|(_, frames)| frames.len())
        .unwrap()
}

/// Starts `floodgate serve` on a data directory expected to be refused, and returns its
/// output once it exits. Fails the test if it starts listening instead.
fn serve_expecting_refusal(data_dir: &Path) -> Output {
    let mut child = common::floodgate()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("FLOODGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = Arc::new(AtomicBool::new(false));
    let stdout = child.stdout.take().unwrap();
    let flag = listening.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening") {
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if listening.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("floodgate serve started on a log damaged before its durable end");
        }
        assert!(
            Instant::now() < deadline,
            "floodgate serve neither started nor exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: Vec::new(),
        stderr: err_reader.join().unwrap(),
    }
}

fn run(args: &[&str], data_dir: &Path) -> Output {
    common::floodgate()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn stream_ids(data_dir: &Path) -> HashSet<String> {
    stream_read(data_dir, &[])
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_flipped_byte_early_in_the_active_segment_stops_the_start_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let acked = post_acked(&server, "a", 12);
    stop(server);
    let in_stream = stream_ids(dir.path());
    assert!(acked.iter().all(|id| in_stream.contains(id)));

    let (seg, frames) = busiest_active_segment(dir.path());
    assert!(
        frames.len() >= 4,
        "{} has too few frames: {frames:?}",
        seg.display()
    );
    let damaged_at = frames[1];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[damaged_at as usize + 40] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    // The start refuses, naming the file and the offset, and leaves the file as it was.
    let out = serve_expecting_refusal(dir.path());
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&seg.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&format!("byte offset {damaged_at}")),
        "{stderr}"
    );
    assert!(stderr.contains("stream verify"), "{stderr}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);

    // `stream verify` reports it: exit 1, one line naming file and offset.
    let out = run(&["stream", "verify"], dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let damaged: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("damaged:"))
        .collect();
    assert_eq!(damaged.len(), 1, "{stdout}");
    assert!(
        damaged[0].contains(&format!("{} at byte offset {damaged_at}", seg.display())),
        "{stdout}"
    );

    // A reader does not quietly stop before the damage either: it fails, naming it.
    let out = run(&["stream", "read"], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("byte offset {damaged_at}")),
        "{}",
        text(&out.stderr)
    );

    // The operator's way back (README, "Damaged log"): repair with the server stopped,
    // then start. Only the damaged shard's records from the damage on are gone.
    let out = run(&["stream", "verify", "--repair"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        seg.with_file_name(format!(
            "{}.damaged-{damaged_at}",
            seg.file_name().unwrap().to_string_lossy()
        ))
        .is_file()
    );
    let server = Server::start(dir.path(), &[]);
    let more = post_acked(&server, "b", 2);
    stop(server);
    let after = stream_ids(dir.path());
    assert!(more.iter().all(|id| after.contains(id)));
    let lost = acked.iter().filter(|id| !after.contains(*id)).count();
    assert!(lost > 0 && lost < acked.len() / 2, "lost {lost}");
    assert_eq!(
        run(&["stream", "verify"], dir.path()).status.code(),
        Some(0)
    );
}

#[test]
fn a_torn_tail_still_recovers_silently_but_a_cut_acknowledged_frame_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let acked = post_acked(&server, "t", 12);
    stop(server);

    // A frame being written when the process died: past the durable end, cut short.
    let (seg, frames) = busiest_active_segment(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    let last = *frames.last().unwrap() as usize;
    let torn = &bytes[last..bytes.len() - 7];
    let mut with_tail = bytes.clone();
    with_tail.extend_from_slice(torn);
    std::fs::write(&seg, &with_tail).unwrap();
    let out = run(&["stream", "verify"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(0),
        "a tail past the durable end is not damage: {}",
        text(&out.stdout)
    );

    let server = Server::start(dir.path(), &[]);
    let more = post_acked(&server, "u", 1);
    stop(server);
    let ids = stream_ids(dir.path());
    assert!(acked.iter().chain(&more).all(|id| ids.contains(id)));
    assert_eq!(
        run(&["stream", "verify"], dir.path()).status.code(),
        Some(0)
    );

    // Cutting the last frame of a cleanly stopped log loses acknowledged records: that is
    // damage, not a torn tail, and the start refuses.
    let (seg, frames) = busiest_active_segment(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let out = serve_expecting_refusal(dir.path());
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "{} at byte offset {}",
            seg.display(),
            frames.last().unwrap()
        )),
        "{stderr}"
    );
}

#[test]
fn verify_of_a_directory_without_a_log_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["stream", "verify"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("meta.json"),
        "{}",
        text(&out.stderr)
    );
}
