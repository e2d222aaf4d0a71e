//! Segment files of one shard: listing, scanning frames, recovery of a torn tail.
//!
//! A shard is a directory of segment files named by the sequence of their first record
//! (`00000000000000000000.seg`), so the segment holding a sequence is found from file
//! names alone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::frame::{self, DecodedRecord, HEADER_LEN, Header};

pub const SEGMENT_SUFFIX: &str = ".seg";

/// A segment file and the sequence of its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub path: PathBuf,
}

pub fn segment_path(shard_dir: &Path, base: u64) -> PathBuf {
    shard_dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

/// The segments of a shard directory, oldest first. Foreign files are ignored.
pub fn list(shard_dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(shard_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push(Segment {
            base,
            path: entry.path(),
        });
    }
    out.sort_by_key(|s| s.base);
    Ok(out)
}

/// Outcome of reading one frame at an offset.
#[derive(Debug)]
pub enum FrameAt {
    /// A whole, CRC-valid frame.
    Frame { header: Header, body: Vec<u8> },
    /// Clean end of file.
    End,
    /// Bytes that are not a whole valid frame: a torn or corrupt tail.
    Invalid(&'static str),
}

/// Reads the frame starting at the reader's position.
pub fn read_frame(file: &mut impl Read, with_body: bool) -> io::Result<FrameAt> {
    let mut hb = [0u8; HEADER_LEN];
    let n = read_full(file, &mut hb)?;
    if n == 0 {
        return Ok(FrameAt::End);
    }
    if n < HEADER_LEN {
        return Ok(FrameAt::Invalid("short frame header"));
    }
    let Some(header) = Header::parse(&hb) else {
        return Ok(FrameAt::Invalid("malformed frame header"));
    };
    let mut body = vec![0u8; header.body_len as usize];
    if read_full(file, &mut body)? < body.len() {
        return Ok(FrameAt::Invalid("short frame body"));
    }
    if !frame::crc_ok(&hb, &header, &body) {
        return Ok(FrameAt::Invalid("frame CRC mismatch"));
    }
    if !with_body {
        body = Vec::new();
    }
    Ok(FrameAt::Frame { header, body })
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

/// What recovery found in a segment.
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

/// Scans a segment from its start, verifying every frame (CRC, decodability, contiguous
/// sequences from `seg.base`), and truncates whatever follows the last valid frame.
/// Every fsynced frame is whole and valid, so only unacknowledged bytes are cut.
pub fn recover(seg: &Segment) -> io::Result<Recovered> {
    let mut file = OpenOptions::new().read(true).write(true).open(&seg.path)?;
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
    let mut offset = 0u64;
    let mut next = seg.base;
    let mut reason = None;
    loop {
        match read_frame(&mut reader, true)? {
            FrameAt::End => break,
            FrameAt::Invalid(why) => {
                reason = Some(why);
                break;
            }
            FrameAt::Frame { header, body } => {
                if header.base_sequence != next {
                    reason = Some("frame sequence does not follow the previous frame");
                    break;
                }
                if frame::decode_body(&header, body).is_err() {
                    reason = Some("frame body does not decode");
                    break;
                }
                offset += header.frame_len();
                next = header.next_sequence();
            }
        }
    }
    drop(reader);
    let truncated_bytes = file_len - offset;
    if truncated_bytes > 0 {
        file.set_len(offset)?;
        file.sync_all()?;
    }
    Ok(Recovered {
        valid_len: offset,
        next_sequence: next,
        truncated_bytes,
        reason,
    })
}

/// Records of one segment with sequence in `[from, bound)`, at most `max`, starting the
/// scan at byte `offset` (a frame boundary). Returns the records and, when stopped early
/// by `max`, the offset of the frame to resume from. Stops quietly at a torn tail: that is
/// a frame still being written.
pub fn read_records(
    seg: &Segment,
    offset: u64,
    from: u64,
    bound: u64,
    max: usize,
    out: &mut Vec<DecodedRecord>,
) -> io::Result<ScanEnd> {
    let mut file = File::open(&seg.path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let mut pos = offset;
    loop {
        if out.len() >= max {
            return Ok(ScanEnd::Full { resume_offset: pos });
        }
        // Peek at the header first: whole frames before `from` are skipped unread.
        let mut hb = [0u8; HEADER_LEN];
        let n = read_full(&mut reader, &mut hb)?;
        if n < HEADER_LEN {
            return Ok(ScanEnd::EndOfData { offset: pos });
        }
        let Some(header) = Header::parse(&hb) else {
            return Ok(ScanEnd::EndOfData { offset: pos });
        };
        if header.base_sequence >= bound {
            return Ok(ScanEnd::EndOfData { offset: pos });
        }
        if header.next_sequence() <= from {
            reader.seek_relative(i64::from(header.body_len))?;
            pos += header.frame_len();
            continue;
        }
        let mut body = vec![0u8; header.body_len as usize];
        if read_full(&mut reader, &mut body)? < body.len() || !frame::crc_ok(&hb, &header, &body) {
            return Ok(ScanEnd::EndOfData { offset: pos });
        }
        let records = frame::decode_body(&header, body)?;
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
            return Ok(ScanEnd::Full { resume_offset: pos });
        }
        pos += header.frame_len();
    }
}

/// Why a segment scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// `max` records collected; resume at this frame offset.
    Full { resume_offset: u64 },
    /// The segment (or its durable part) is exhausted at this frame offset.
    EndOfData { offset: u64 },
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
