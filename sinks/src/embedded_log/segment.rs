//! Segment files of one shard: listing, reading and checking frames, the shard's published
//! durable watermark, and recovery of a torn tail.
//!
//! A shard is a directory of segment files named by the sequence of their first record
//! (`00000000000000000000.seg`), so the segment holding a sequence is found from file
//! names alone. Beside them:
//!
//! - `durable`: the shard's durable watermark, the sequence after the last fsynced record
//!   (see [`write_watermark`]). Readers in other processes never read past it.
//! - `<segment>.damaged-<offset>`: the bytes `floodgate stream verify --repair` moved out of
//!   a segment, from a damaged frame on. It tells readers that the sequence gap after that
//!   segment is a loss an operator accepted, not a missing file.
//!
//! Damage is never mistaken for a torn tail: a reader that meets a bad frame below the
//! durable watermark fails with the file and byte offset instead of skipping ahead, and
//! recovery truncates only what was never acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::frame::{self, DecodedRecord, HEADER_LEN, Header};
use super::frame_cache::FrameCache;

pub const SEGMENT_SUFFIX: &str = ".seg";
/// Between a segment's file name and the byte offset in the name of its moved-aside tail.
pub const DAMAGED_MARK: &str = ".damaged-";
/// The shard's durable watermark file.
pub const WATERMARK_FILE: &str = "durable";

/// A segment file and the sequence of its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub path: PathBuf,
    /// A repair moved this segment's damaged tail aside (`<segment>.damaged-<offset>`), so a
    /// gap between its last record and the next segment's first is an accepted loss.
    pub repaired: bool,
}

pub fn segment_path(shard_dir: &Path, base: u64) -> PathBuf {
    shard_dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// Where a repair puts the bytes of `segment` from `offset` on.
pub fn damaged_path(segment: &Path, offset: u64) -> PathBuf {
    let mut name = segment.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{DAMAGED_MARK}{offset}"));
    segment.with_file_name(name)
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(SEGMENT_SUFFIX)
        .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok())
}

/// The segments of a shard directory, oldest first. Foreign files are ignored.
pub fn list(shard_dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    let mut repaired = Vec::new();
    for entry in fs::read_dir(shard_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((segment_name, _)) = name.split_once(DAMAGED_MARK) {
            repaired.extend(parse_segment_name(segment_name));
            continue;
        }
        let Some(base) = parse_segment_name(name) else {
            continue;
        };
        out.push(Segment {
            base,
            path: entry.path(),
            repaired: false,
        });
    }
    out.sort_by_key(|s| s.base);
    for s in &mut out {
        s.repaired = repaired.contains(&s.base);
    }
    Ok(out)
}

// The durable watermark file, 16 bytes:
//   0  8  next_sequence   u64 LE, the sequence after the last fsynced record
//   8  4  crc32           IEEE CRC-32 of bytes 0..8
//  12  4  magic           "FGDW"
// The writer overwrites it in place after every fsync, without a lock and without fsyncing
// it, so a reader can catch a write half done; the CRC tells, and a second read a moment
// later sees a whole value. No fsync is needed because the value is written only after the
// records it covers are durable: whatever a crash leaves in the file is a value that was
// durable (or a damaged file, which the check rejects), never one ahead of the data.
const WATERMARK_LEN: usize = 16;
const WATERMARK_MAGIC: [u8; 4] = *b"FGDW";
/// Reads of a watermark that fails its check before it is called damaged.
const WATERMARK_READ_ATTEMPTS: usize = 8;

/// What a shard's `durable` file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// No file: a log last written by a floodgate older than the watermark, or a shard
    /// whose writer has not opened it yet. Nothing is known to be durable.
    Missing,
    /// The file fails its check on every read (e.g. left half-written by a power failure).
    /// The writer rewrites it when it next opens the log.
    Damaged,
    /// Every record below this sequence is durable.
    At(u64),
}

impl Watermark {
    pub fn known(self) -> Option<u64> {
        match self {
            Watermark::At(w) => Some(w),
            Watermark::Missing | Watermark::Damaged => None,
        }
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` back to the disk,
/// and returns without waiting for it (`sync_file_range(2)`, `SYNC_FILE_RANGE_WRITE`). It
/// makes nothing durable (no metadata, no flush of the disk's cache): it only spreads the
/// writing that a later fsync would otherwise do all at once. Elsewhere than Linux, nothing.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // WRITE only, never a WAIT flag: waiting would block the writer, and it would take
    // (and clear) a writeback error that the checkpoint's fdatasync must see and fail on.
    // SAFETY: the call reads and writes no memory of this process; the descriptor is
    // borrowed from `file`, open for the whole call.
    let done = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere than Linux the kernel writes back on its own schedule.
#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

pub fn encode_watermark(next: u64) -> [u8; WATERMARK_LEN] {
    let mut out = [0u8; WATERMARK_LEN];
    let value = next.to_le_bytes();
    out[0..8].copy_from_slice(&value);
    out[8..12].copy_from_slice(&crc32fast::hash(&value).to_le_bytes());
    out[12..16].copy_from_slice(&WATERMARK_MAGIC);
    out
}

pub fn decode_watermark(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != WATERMARK_LEN || bytes[12..16] != WATERMARK_MAGIC {
        return None;
    }
    let value: [u8; 8] = bytes[0..8].try_into().ok()?;
    let crc = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    (crc32fast::hash(&value) == crc).then_some(u64::from_le_bytes(value))
}

/// Reads a shard's published durable watermark.
pub fn read_watermark(shard_dir: &Path) -> io::Result<Watermark> {
    let path = shard_dir.join(WATERMARK_FILE);
    for _ in 0..WATERMARK_READ_ATTEMPTS {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Watermark::Missing),
            Err(e) => return Err(e),
        };
        if let Some(w) = decode_watermark(&bytes) {
            return Ok(Watermark::At(w));
        }
        // A torn read of a concurrent overwrite: the writer finishes within microseconds.
        std::thread::yield_now();
    }
    Ok(Watermark::Damaged)
}

/// Opens (creating if needed) a shard's watermark file for [`write_watermark`] and publishes
/// `next` in it.
pub fn open_watermark(shard_dir: &Path, next: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(shard_dir.join(WATERMARK_FILE))?;
    write_watermark(&mut file, next)?;
    // A longer file (damaged, or from elsewhere) would never pass the check.
    file.set_len(WATERMARK_LEN as u64)?;
    Ok(file)
}

/// Publishes `next` as the shard's durable watermark: one in-place write, no fsync (see the
/// format note above). Call it only once every record below `next` is fsynced.
pub fn write_watermark(file: &mut File, next: u64) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&encode_watermark(next))
}

fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A place in a segment: a frame boundary and the sequence a frame there starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub sequence: u64,
}

/// What checking the frame at a position found.
enum FrameCheck {
    /// A whole, CRC-valid, decodable frame that starts at the expected sequence.
    Valid { header: Header, records: u64 },
    /// A whole, CRC-valid frame that starts later than expected: records are missing.
    Later { header: Header },
    /// Clean end of file.
    End,
    /// Bytes that are not a whole valid frame in sequence.
    Bad(&'static str),
}

/// Checks the frame at the reader's position (`pos`, expected to start at `expect`).
fn check_frame(
    reader: &mut impl Read,
    file_len: u64,
    pos: u64,
    expect: u64,
) -> io::Result<FrameCheck> {
    let mut hb = [0u8; HEADER_LEN];
    let n = read_full(reader, &mut hb)?;
    if n == 0 {
        return Ok(FrameCheck::End);
    }
    if n < HEADER_LEN {
        return Ok(FrameCheck::Bad("short frame header"));
    }
    let Some(header) = Header::parse(&hb) else {
        return Ok(FrameCheck::Bad("malformed frame header"));
    };
    if pos + header.frame_len() > file_len {
        return Ok(FrameCheck::Bad("frame runs past the end of the file"));
    }
    let mut body = vec![0u8; header.body_len as usize];
    if read_full(reader, &mut body)? < body.len() {
        return Ok(FrameCheck::Bad("short frame body"));
    }
    if !frame::crc_ok(&hb, &header, &body) {
        return Ok(FrameCheck::Bad("frame CRC mismatch"));
    }
    if header.base_sequence > expect {
        return Ok(FrameCheck::Later { header });
    }
    if header.base_sequence < expect {
        return Ok(FrameCheck::Bad(
            "frame sequence does not follow the previous frame",
        ));
    }
    if frame::decode_body(&header, body).is_err() {
        return Ok(FrameCheck::Bad("frame body does not decode"));
    }
    Ok(FrameCheck::Valid {
        header,
        records: u64::from(header.record_count),
    })
}

/// The first offset in `[start, file_len)` where a whole, CRC-valid frame starting at
/// sequence `min_sequence` or later begins. The bytes after damage may hold no frame
/// boundary we know of (a damaged header loses the length), so every offset is a candidate;
/// the header's sanity checks reject nearly all of them before any body is read.
fn find_frame_after(
    file: &File,
    start: u64,
    file_len: u64,
    min_sequence: u64,
) -> io::Result<Option<(u64, Header)>> {
    const WINDOW: usize = 1 << 20;
    let mut f = file;
    let mut buf = vec![0u8; WINDOW + HEADER_LEN];
    let mut off = start;
    while off + HEADER_LEN as u64 <= file_len {
        let want = usize::try_from(file_len - off).map_or(buf.len(), |r| r.min(buf.len()));
        f.seek(SeekFrom::Start(off))?;
        let n = read_full(&mut f, &mut buf[..want])?;
        if n < HEADER_LEN {
            break;
        }
        let candidates = (n - HEADER_LEN + 1).min(WINDOW);
        for i in 0..candidates {
            let Ok(hb) = <&[u8; HEADER_LEN]>::try_from(&buf[i..i + HEADER_LEN]) else {
                continue;
            };
            let Some(header) = Header::parse(hb) else {
                continue;
            };
            let at = off + i as u64;
            if header.base_sequence < min_sequence || at + header.frame_len() > file_len {
                continue;
            }
            let mut body = vec![0u8; header.body_len as usize];
            f.seek(SeekFrom::Start(at + HEADER_LEN as u64))?;
            if read_full(&mut f, &mut body)? == body.len() && frame::crc_ok(hb, &header, &body) {
                return Ok(Some((at, header)));
            }
        }
        off += candidates as u64;
    }
    Ok(None)
}

/// One stretch of damage in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The first damaged byte: where the last valid frame before it ends.
    pub offset: u64,
    pub reason: &'static str,
    /// The sequence a valid frame at `offset` would start at.
    pub first_sequence: u64,
    /// The first whole, CRC-valid frame with a later sequence after the damage: its offset
    /// and first sequence. `None`: nothing valid follows (a damaged tail).
    pub resumes_at: Option<Position>,
}

/// What a check of every frame of one segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentCheck {
    pub file_len: u64,
    /// In file order. After each one the check went on from `resumes_at`.
    pub damage: Vec<Damage>,
    /// Where the last valid frame ends, and the sequence after it.
    pub end: Position,
    pub frames: u64,
    pub records: u64,
    /// The check stopped at the durable watermark here, before the end of the file: what
    /// follows is a write in progress (or never acknowledged), not damage.
    pub in_progress_from: Option<u64>,
}

impl SegmentCheck {
    /// The end of the segment's intact prefix: before the first damage, else the end.
    pub fn intact_end(&self) -> Position {
        self.damage.first().map_or(self.end, |d| Position {
            offset: d.offset,
            sequence: d.first_sequence,
        })
    }
}

/// Checks every frame of a segment: header, length, CRC, decodability and contiguous
/// sequences from `seg.base`. After damage it searches on for the next valid frame and goes
/// on from there, so that every damaged stretch is found. With `stop_at` (the durable
/// watermark of a segment a live writer may be appending to) it stops where sequences reach
/// it. Reads only.
pub fn check_segment(seg: &Segment, stop_at: Option<u64>) -> io::Result<SegmentCheck> {
    let file = File::open(&seg.path)?;
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, &file);
    let mut pos = 0u64;
    let mut expect = seg.base;
    let mut check = SegmentCheck {
        file_len,
        damage: Vec::new(),
        end: Position {
            offset: 0,
            sequence: seg.base,
        },
        frames: 0,
        records: 0,
        in_progress_from: None,
    };
    loop {
        if stop_at.is_some_and(|w| expect >= w) {
            if pos < file_len {
                check.in_progress_from = Some(pos);
            }
            break;
        }
        let reason = match check_frame(&mut reader, file_len, pos, expect)? {
            FrameCheck::End => break,
            FrameCheck::Valid { header, records } => {
                pos += header.frame_len();
                expect = header.next_sequence();
                check.frames += 1;
                check.records += records;
                check.end = Position {
                    offset: pos,
                    sequence: expect,
                };
                continue;
            }
            FrameCheck::Later { header } => {
                // A valid frame, but records before it are missing: damage that ends here.
                let resume = Position {
                    offset: pos,
                    sequence: header.base_sequence,
                };
                check.damage.push(Damage {
                    offset: pos,
                    reason: "records are missing before this frame (its sequence skips ahead)",
                    first_sequence: expect,
                    resumes_at: Some(resume),
                });
                expect = header.base_sequence;
                reader.seek(SeekFrom::Start(pos))?;
                continue;
            }
            FrameCheck::Bad(reason) => reason,
        };
        let found = find_frame_after(&file, pos + 1, file_len, expect)?;
        let resumes_at = found.map(|(offset, h)| Position {
            offset,
            sequence: h.base_sequence,
        });
        check.damage.push(Damage {
            offset: pos,
            reason,
            first_sequence: expect,
            resumes_at,
        });
        let Some(resume) = resumes_at else { break };
        pos = resume.offset;
        expect = resume.sequence;
        reader.seek(SeekFrom::Start(pos))?;
    }
    Ok(check)
}

/// What recovery did to the active segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// Sequence after the last valid record.
    pub next_sequence: u64,
    /// Bytes cut off the end (0 when the tail was clean).
    pub truncated_bytes: u64,
    pub reason: Option<&'static str>,
}

/// Why recovery refused to truncate: doing so would drop records that were acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub path: PathBuf,
    /// Where the intact prefix ends (the first damaged byte, or the end of the file).
    pub offset: u64,
    pub reason: &'static str,
    /// The sequence after the intact prefix.
    pub first_sequence: u64,
    /// The published durable watermark, when there is one.
    pub durable: Option<u64>,
    /// A valid frame after the damage, when one was found.
    pub resumes_at: Option<Position>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte offset {}: {}; records from sequence {} on would be lost",
            self.path.display(),
            self.offset,
            self.reason,
            self.first_sequence
        )?;
        if let Some(w) = self.durable {
            write!(f, "; records below sequence {w} were acknowledged")?;
        }
        if let Some(r) = self.resumes_at {
            write!(
                f,
                "; a valid frame follows at byte offset {} (sequence {})",
                r.offset, r.sequence
            )?;
        }
        Ok(())
    }
}

/// Recovers the active segment of a shard at open: checks every frame and truncates a torn
/// tail, then fsyncs the segment, so that everything it holds afterwards is durable.
///
/// Only bytes that were never acknowledged are cut. With a published watermark `durable`,
/// that is anything from sequence `durable` on: a write in progress when the process died
/// (even where power loss left a later frame of that write whole). Without one (a log from
/// an older floodgate) a damaged tail is cut only when no valid frame with a later sequence
/// follows it. Anything else is damage to acknowledged records, and recovery refuses.
pub fn recover(seg: &Segment, durable: Option<u64>) -> io::Result<Result<Recovered, Refusal>> {
    let check = check_segment(seg, None)?;
    let intact = check.intact_end();
    let first = check.damage.first();
    let loses_acknowledged = match (durable, first) {
        (Some(w), _) => intact.sequence < w,
        (None, Some(d)) => d.resumes_at.is_some(),
        (None, None) => false,
    };
    if loses_acknowledged {
        return Ok(Err(Refusal {
            path: seg.path.clone(),
            offset: intact.offset,
            reason: first.map_or("the segment ends before the durable watermark", |d| {
                d.reason
            }),
            first_sequence: intact.sequence,
            durable,
            resumes_at: first.and_then(|d| d.resumes_at),
        }));
    }
    let file = OpenOptions::new().write(true).open(&seg.path)?;
    let truncated_bytes = check.file_len - intact.offset;
    if truncated_bytes > 0 {
        file.set_len(intact.offset)?;
    }
    // What a killed writer wrote but never fsynced is whole and valid, and is kept: make it
    // durable before the watermark that covers it is published.
    file.sync_all()?;
    Ok(Ok(Recovered {
        valid_len: intact.offset,
        next_sequence: intact.sequence,
        truncated_bytes,
        reason: first.map(|d| d.reason),
    }))
}

/// An `InvalidData` error naming a damaged frame that a reader cannot get past.
fn damaged(seg: &Segment, pos: u64, sequence: u64, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} at byte offset {pos}: {reason}; records from sequence {sequence} on cannot be read \
             (`floodgate stream verify` lists the damage)",
            seg.path.display()
        ),
    )
}

/// Records of one segment with sequence in `wanted` (`from..bound`), at most `max`,
/// starting the scan at `start` (a frame boundary). `bound` is the shard's durable
/// watermark; `sealed` says a later segment exists, so this one is complete. A frame
/// `cache` holds is not read from the file again (see [`FrameCache`]). Stops quietly at `bound` (what
/// follows is a write in progress) and at the end of a sealed segment. Anything else that
/// stops the scan below `bound` (a bad frame, a frame out of sequence, the file ending
/// early) is damage, reported as an `InvalidData` error naming the file and offset: records
/// are never skipped.
pub fn read_records(
    seg: &Segment,
    sealed: bool,
    start: Position,
    wanted: std::ops::Range<u64>,
    max: usize,
    out: &mut Vec<DecodedRecord>,
    cache: Option<&FrameCache>,
) -> io::Result<ScanEnd> {
    let (from, bound) = (wanted.start, wanted.end);
    let file = File::open(&seg.path)?;
    // Frames below `bound` were whole before this open: the bound was read first.
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    reader.seek(SeekFrom::Start(start.offset))?;
    let mut pos = start.offset;
    let mut expect = start.sequence;
    loop {
        let here = Position {
            offset: pos,
            sequence: expect,
        };
        if expect >= bound {
            return Ok(ScanEnd::EndOfData { at: here });
        }
        if out.len() >= max {
            return Ok(ScanEnd::Full { resume: here });
        }
        // Peek at the header first: whole frames before `from` are skipped unread.
        let mut hb = [0u8; HEADER_LEN];
        let n = read_full(&mut reader, &mut hb)?;
        if n == 0 && sealed {
            return Ok(ScanEnd::EndOfData { at: here });
        }
        let header = match (n, Header::parse(&hb)) {
            (0, _) => {
                return Err(damaged(
                    seg,
                    pos,
                    expect,
                    &format!("the segment ends before the durable watermark ({bound})"),
                ));
            }
            (n, _) if n < HEADER_LEN => {
                return Err(damaged(seg, pos, expect, "short frame header"));
            }
            (_, None) => return Err(damaged(seg, pos, expect, "malformed frame header")),
            (_, Some(h)) => h,
        };
        if header.base_sequence != expect {
            return Err(damaged(
                seg,
                pos,
                expect,
                &format!(
                    "the frame here starts at sequence {} where {expect} was expected",
                    header.base_sequence
                ),
            ));
        }
        if pos + header.frame_len() > file_len {
            return Err(damaged(
                seg,
                pos,
                expect,
                "frame runs past the end of the file",
            ));
        }
        if header.next_sequence() <= from {
            reader.seek_relative(i64::from(header.body_len))?;
            pos += header.frame_len();
            expect = header.next_sequence();
            continue;
        }
        let undecodable = |e: io::Error| {
            damaged(
                seg,
                pos,
                expect,
                &format!("frame body does not decode: {e}"),
            )
        };
        let (body, cached) = match cache.and_then(|c| c.get(seg.base, pos, &hb)) {
            // Another consumer read this frame a moment ago.
            Some(body) => {
                reader.seek_relative(i64::from(header.body_len))?;
                (body, true)
            }
            None => {
                let mut body = vec![0u8; header.body_len as usize];
                if read_full(&mut reader, &mut body)? < body.len() {
                    return Err(damaged(seg, pos, expect, "short frame body"));
                }
                if !frame::crc_ok(&hb, &header, &body) {
                    return Err(damaged(seg, pos, expect, "frame CRC mismatch"));
                }
                (
                    frame::decompress(&header, body).map_err(undecodable)?,
                    false,
                )
            }
        };
        let records = frame::records(&header, body.clone()).map_err(undecodable)?;
        if let Some(c) = cache.filter(|_| !cached) {
            c.put(seg.base, pos, hb, body);
        }
        let mut stopped_inside = false;
        for r in records {
            if r.sequence < from || r.sequence >= bound {
                continue;
            }
            if out.len() >= max {
                stopped_inside = true;
                break;
            }
            out.push(r);
        }
        if stopped_inside {
            return Ok(ScanEnd::Full { resume: here });
        }
        pos += header.frame_len();
        expect = header.next_sequence();
    }
}

/// Why a segment scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// `max` records collected; resume at this frame.
    Full { resume: Position },
    /// The segment (or its durable part) is exhausted here.
    EndOfData { at: Position },
}

/// The sequence of the first record appended at or after `ts_ms`, found by reading frame
/// headers only: the newest segment that starts before `ts_ms`, then its frames in order.
/// `None` when every record is older (the caller then starts at the end).
pub fn first_sequence_at_or_after(segments: &[Segment], ts_ms: i64) -> io::Result<Option<u64>> {
    let first_ts = |seg: &Segment| -> io::Result<Option<Header>> {
        let mut f = File::open(&seg.path)?;
        let mut hb = [0u8; HEADER_LEN];
        Ok(if read_full(&mut f, &mut hb)? == HEADER_LEN {
            Header::parse(&hb)
        } else {
            None
        })
    };
    // Newest segment whose first frame is older than ts_ms; earlier ones hold nothing newer.
    let mut start = 0;
    for (i, seg) in segments.iter().enumerate().rev() {
        if let Some(h) = first_ts(seg)?
            && h.appended_at_ms < ts_ms
        {
            start = i;
            break;
        }
    }
    for seg in &segments[start..] {
        let mut reader = io::BufReader::new(File::open(&seg.path)?);
        loop {
            let mut hb = [0u8; HEADER_LEN];
            if read_full(&mut reader, &mut hb)? < HEADER_LEN {
                break;
            }
            let Some(h) = Header::parse(&hb) else { break };
            if h.appended_at_ms >= ts_ms {
                return Ok(Some(h.base_sequence));
            }
            reader.seek_relative(i64::from(h.body_len))?;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_torn_or_flipped_anywhere_is_rejected() {
        let a = encode_watermark(1_000);
        let b = encode_watermark(1_000_000_007);
        assert_eq!(decode_watermark(&a), Some(1_000));
        assert_eq!(decode_watermark(&b), Some(1_000_000_007));
        // Part of one write and the rest of the next, split at every byte: either rejected
        // or one of the two whole values (when the split leaves one side's bytes intact).
        for cut in 1..a.len() {
            let mut torn = a;
            torn[cut..].copy_from_slice(&b[cut..]);
            let read = decode_watermark(&torn);
            assert!(
                matches!(read, None | Some(1_000) | Some(1_000_000_007)),
                "torn at {cut}: {read:?}"
            );
            assert_eq!(read.is_none(), cut < 12, "torn at {cut}: {read:?}");
        }
        for i in 0..a.len() {
            let mut bad = a;
            bad[i] ^= 0x01;
            assert_eq!(decode_watermark(&bad), None, "flip at {i}");
        }
        assert_eq!(decode_watermark(&[0; 16]), None);
        assert_eq!(decode_watermark(&a[..15]), None);
    }

    /// A segment of `n` one-record frames; returns it and the frame offsets.
    fn segment_of(dir: &Path, n: u64) -> (Segment, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut offsets = Vec::new();
        for seq in 0..n {
            offsets.push(bytes.len() as u64);
            let payload = format!("payload-{seq}");
            frame::encode(
                &mut bytes,
                seq,
                7,
                floodgate_core::config::Compression::None,
                &[("k", payload.as_bytes())],
            )
            .unwrap();
        }
        let path = segment_path(dir, 0);
        fs::write(&path, &bytes).unwrap();
        let seg = Segment {
            base: 0,
            path,
            repaired: false,
        };
        (seg, offsets)
    }

    #[test]
    fn the_check_finds_the_next_frame_after_a_damaged_length() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, offsets) = segment_of(dir.path(), 6);
        let mut bytes = fs::read(&seg.path).unwrap();
        // The length of frame 2 now points nowhere useful.
        bytes[offsets[2] as usize] ^= 0x07;
        fs::write(&seg.path, &bytes).unwrap();
        let check = check_segment(&seg, None).unwrap();
        assert_eq!(check.damage.len(), 1, "{check:?}");
        let d = &check.damage[0];
        assert_eq!((d.offset, d.first_sequence), (offsets[2], 2));
        assert_eq!(
            d.resumes_at,
            Some(Position {
                offset: offsets[3],
                sequence: 3
            })
        );
        assert_eq!(check.end.sequence, 6, "the check goes on after the damage");
        assert_eq!(check.records, 5);
        // Not a tail, with or without a watermark: recovery refuses and changes nothing.
        for durable in [None, Some(6)] {
            let refusal = recover(&seg, durable).unwrap().unwrap_err();
            assert_eq!(refusal.offset, offsets[2]);
        }
        assert_eq!(fs::read(&seg.path).unwrap(), bytes);
        // Past the published watermark the same bytes were never acknowledged: cut.
        let recovered = recover(&seg, Some(2)).unwrap().unwrap();
        assert_eq!(
            (recovered.valid_len, recovered.next_sequence),
            (offsets[2], 2)
        );
        assert_eq!(fs::metadata(&seg.path).unwrap().len(), offsets[2]);
    }

    #[test]
    fn a_check_beside_a_live_writer_stops_at_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, offsets) = segment_of(dir.path(), 4);
        let mut f = OpenOptions::new().append(true).open(&seg.path).unwrap();
        f.write_all(b"a frame being written").unwrap();
        let check = check_segment(&seg, Some(4)).unwrap();
        assert!(check.damage.is_empty(), "{check:?}");
        assert_eq!(
            check.in_progress_from,
            Some(offsets[3] + (offsets[3] - offsets[2]))
        );
    }
}
