//! A copy of a log that a live writer may be appending to, for `floodgate backup`
//! (`crate::backup` decides when each log is copied; this module copies one).
//!
//! Two passes, so that the copy can end at a watermark read as late as the caller needs:
//!
//! 1. [`LogCopy::sealed`] copies `meta.json` and every sealed segment (all but each shard's
//!    last). A sealed segment never changes again: it was fsynced whole before the writer
//!    rolled to the next. Retention may delete the oldest ones meanwhile; a segment that
//!    went away, and every earlier copy of its shard, is dropped from the copy: retention
//!    deleted it because every consumer had checkpointed past it, and checkpoints copied
//!    later are further still.
//! 2. [`LogCopy::finish`] reads each shard's durable watermark (`shard-NNNN/durable`, the
//!    sequence after the last fsynced record), then lists the segments and copies what the
//!    first pass did not, each cut at the end of the last whole frame below the watermark.
//!    Bytes past it (a write in progress, or a torn tail) are never copied: every frame
//!    copied is whole and CRC-valid, and sequences run on without a gap (but where a repair
//!    accepted one) from the copy's first segment to the watermark, which is written as the
//!    copy's own `durable` file. A restored log therefore opens without truncating
//!    anything, and holds exactly the records below the watermark.
//!
//! With a `stop` predicate (the derived-event log, see `crate::backup`), pass two also ends
//! before the first frame holding a record whose key it matches.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use floodgate_core::progress::{Progress, Unit};

use super::frame::{self, HEADER_LEN, Header};
use super::segment::{self, DAMAGED_MARK, Segment, Watermark};
use super::{LogMeta, journal, shard_dir};
use crate::backup::copy::{self, Copied, at};
use crate::checkpoint::create_dir_durably;

/// What the copy of one shard holds: sequences `first_sequence..durable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardCopy {
    pub shard: u32,
    pub first_sequence: u64,
    /// The copy's durable watermark: the sequence after its last record.
    pub durable: u64,
    /// The source's durable watermark when it was read (≥ `durable`; more only when a
    /// `stop` ended the copy early).
    pub source_durable: u64,
    pub segments: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
struct CopiedSegment {
    base: u64,
    /// The sequence after its last record.
    end: u64,
    repaired: bool,
    /// The files written for it: the segment, and the bytes a repair moved aside.
    files: Vec<Copied>,
}

/// A log being copied (see the module docs).
#[derive(Debug)]
pub struct LogCopy {
    /// The log's name in progress reports.
    name: String,
    src: PathBuf,
    dst: PathBuf,
    meta: LogMeta,
    meta_file: Copied,
    /// Per shard, the segments copied so far.
    shards: Vec<Vec<CopiedSegment>>,
}

/// An `InvalidData` error naming the segment and offset: damage below the watermark.
fn damaged(seg: &Segment, offset: u64, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} at byte offset {offset}: {what} (`floodgate stream verify` lists the damage)",
            seg.path.display()
        ),
    )
}

/// The whole frames at the start of `seg` that hold only sequences below `bound` and, with
/// `stop`, no record whose key `stop` matches: their length in bytes, the sequence after
/// them, and whether `stop` ended them. Every frame in that length is checked (header,
/// length, CRC, sequence); a bad one is an `InvalidData` error. The scan never reads a
/// byte at or past the frame that reaches `bound`, so it is safe on a segment a writer is
/// appending to, given the watermark it published.
fn durable_prefix(
    seg: &Segment,
    bound: u64,
    stop: Option<&dyn Fn(&str) -> bool>,
) -> io::Result<(u64, u64, bool)> {
    let file = fs::File::open(&seg.path).map_err(|e| at(&seg.path, e))?;
    let file_len = file.metadata().map_err(|e| at(&seg.path, e))?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut expect = seg.base;
    loop {
        if expect >= bound {
            return Ok((pos, expect, false));
        }
        let mut hb = [0u8; HEADER_LEN];
        let n = read_full(&mut reader, &mut hb).map_err(|e| at(&seg.path, e))?;
        if n == 0 {
            return Ok((pos, expect, false));
        }
        if n < HEADER_LEN {
            return Err(damaged(seg, pos, "short frame header"));
        }
        let Some(header) = Header::parse(&hb) else {
            return Err(damaged(seg, pos, "malformed frame header"));
        };
        if header.base_sequence != expect {
            return Err(damaged(
                seg,
                pos,
                &format!(
                    "the frame here starts at sequence {} where {expect} was expected",
                    header.base_sequence
                ),
            ));
        }
        if header.next_sequence() > bound {
            // Watermarks are published only at frame boundaries.
            return Err(damaged(
                seg,
                pos,
                &format!("the frame here runs past the durable watermark {bound}"),
            ));
        }
        if pos + header.frame_len() > file_len {
            return Err(damaged(seg, pos, "frame runs past the end of the file"));
        }
        let mut body = vec![0u8; header.body_len as usize];
        if read_full(&mut reader, &mut body).map_err(|e| at(&seg.path, e))? < body.len() {
            return Err(damaged(seg, pos, "short frame body"));
        }
        if !frame::crc_ok(&hb, &header, &body) {
            return Err(damaged(seg, pos, "frame CRC mismatch"));
        }
        if let Some(stop) = stop {
            let records = frame::decode_body(&header, body)
                .map_err(|e| damaged(seg, pos, &format!("frame body does not decode: {e}")))?;
            if records.iter().any(|r| stop(&r.key)) {
                return Ok((pos, expect, true));
            }
        }
        pos += header.frame_len();
        expect = header.next_sequence();
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The sum of the sizes of `segments` (those that still exist).
fn total_len(segments: &[Segment]) -> u64 {
    segments
        .iter()
        .filter_map(|s| fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum()
}

impl LogCopy {
    /// Pass one (see the module docs): `meta.json` and the sealed segments of the log at
    /// `src`, into `dst` (which must not hold a log). `name` names the log in progress
    /// reports.
    pub fn sealed(
        name: &str,
        src: &Path,
        dst: &Path,
        progress: &dyn Progress,
    ) -> io::Result<LogCopy> {
        let meta = LogMeta::read(src)
            .map_err(|e| io::Error::other(e.to_string()))?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no log at {} (meta.json is missing)", src.display()),
                )
            })?;
        // A log whose writer stopped without closing it: the journal's frames go back into
        // their segments before any is copied.
        journal::settle(src, meta.shards).map_err(|e| io::Error::other(e.to_string()))?;
        create_dir_durably(dst)?;
        let meta_file = copy::copy_file(&src.join("meta.json"), &dst.join("meta.json"), progress)?;
        let listed: Vec<Vec<Segment>> = (0..meta.shards)
            .map(|shard| segment::list(&shard_dir(src, shard)).map_err(|e| at(src, e)))
            .collect::<io::Result<_>>()?;
        let sealed = |segments: &[Segment]| segments.len().saturating_sub(1);
        let total = listed.iter().map(|s| total_len(&s[..sealed(s)])).sum();
        progress.stage(
            &format!("{name}: sealed segments"),
            Some(total),
            Unit::Bytes,
        );
        let mut log = LogCopy {
            name: name.to_owned(),
            src: src.to_owned(),
            dst: dst.to_owned(),
            meta,
            meta_file,
            shards: vec![Vec::new(); meta.shards as usize],
        };
        for (shard, segments) in listed.iter().enumerate() {
            create_dir_durably(&shard_dir(dst, shard as u32))?;
            for seg in &segments[..sealed(segments)] {
                match log.copy_segment(shard as u32, seg, u64::MAX, None, progress) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Retention took it (oldest first): what was copied before it is
                        // older still, and no consumer needs any of it.
                        for dropped in log.shards[shard].drain(..) {
                            for f in dropped.files {
                                fs::remove_file(&f.path).map_err(|e| at(&f.path, e))?;
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(log)
    }

    /// Copies the frames of `seg` below `bound` (and before `stop`), with the bytes a repair
    /// moved aside from it; returns whether `stop` ended it.
    fn copy_segment(
        &mut self,
        shard: u32,
        seg: &Segment,
        bound: u64,
        stop: Option<&dyn Fn(&str) -> bool>,
        progress: &dyn Progress,
    ) -> io::Result<bool> {
        let (len, end, stopped) = durable_prefix(seg, bound, stop)?;
        let dst_dir = shard_dir(&self.dst, shard);
        let name = seg.path.file_name().unwrap_or_default();
        let mut files = vec![copy::copy_prefix(
            &seg.path,
            &dst_dir.join(name),
            len,
            progress,
        )?];
        if seg.repaired {
            // `<segment>.damaged-<offset>`: it marks the gap after this segment as a loss
            // an operator accepted; without it, readers of the copy would fail there.
            let prefix = format!("{}{DAMAGED_MARK}", name.to_string_lossy());
            let src_dir = shard_dir(&self.src, shard);
            for entry in fs::read_dir(&src_dir).map_err(|e| at(&src_dir, e))? {
                let entry = entry.map_err(|e| at(&src_dir, e))?;
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    files.push(copy::copy_file(
                        &entry.path(),
                        &dst_dir.join(entry.file_name()),
                        progress,
                    )?);
                }
            }
        }
        self.shards[shard as usize].push(CopiedSegment {
            base: seg.base,
            end,
            repaired: seg.repaired,
            files,
        });
        Ok(stopped)
    }

    /// Pass two (see the module docs): each shard up to the durable watermark read now (or
    /// before the first frame `stop` matches), its `durable` file, and a check that the copy
    /// runs without a gap up to it. Returns what each shard holds and every file written.
    pub fn finish(
        mut self,
        stop: Option<&dyn Fn(&str) -> bool>,
        progress: &dyn Progress,
    ) -> io::Result<(Vec<ShardCopy>, Vec<Copied>)> {
        // Per shard: the watermark first, then the listing, so every record below the
        // watermark is in a listed segment.
        let mut plans = Vec::new();
        for shard in 0..self.meta.shards {
            let dir = shard_dir(&self.src, shard);
            let watermark = match segment::read_watermark(&dir).map_err(|e| at(&dir, e))? {
                Watermark::At(w) => w,
                Watermark::Missing | Watermark::Damaged => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: no readable durable watermark, so what is durable is not \
                             known; start `floodgate serve` on this data directory once \
                             (it rewrites the watermark), then back up again",
                            dir.join(segment::WATERMARK_FILE).display()
                        ),
                    ));
                }
            };
            let copied = &self.shards[shard as usize];
            let todo: Vec<Segment> = segment::list(&dir)
                .map_err(|e| at(&dir, e))?
                .into_iter()
                .filter(|s| s.base <= watermark && !copied.iter().any(|c| c.base == s.base))
                .collect();
            plans.push((shard, watermark, todo));
        }
        let total = plans.iter().map(|(_, _, todo)| total_len(todo)).sum();
        progress.stage(
            &format!("{}: up to the durable watermark", self.name),
            Some(total),
            Unit::Bytes,
        );
        let mut shards = Vec::new();
        for (shard, watermark, todo) in plans {
            let mut end = watermark;
            for seg in &todo {
                let stopped = match self.copy_segment(shard, seg, watermark, stop, progress) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(io::Error::other(format!(
                            "{} went away during the backup (retention deleted it while \
                             the copy still needed it)",
                            seg.path.display()
                        )));
                    }
                    other => other?,
                };
                if stopped {
                    end = self.shards[shard as usize].last().map_or(end, |c| c.end);
                    break;
                }
            }
            shards.push(self.summarise(shard, end, watermark)?);
        }
        let mut files = vec![self.meta_file];
        for segments in self.shards {
            files.extend(segments.into_iter().flat_map(|s| s.files));
        }
        for s in &shards {
            let path = shard_dir(&self.dst, s.shard).join(segment::WATERMARK_FILE);
            files.push(copy::write_new(
                &path,
                &segment::encode_watermark(s.durable),
            )?);
        }
        Ok((shards, files))
    }

    /// Checks that the copy of `shard` runs without a gap from its first segment to `end`.
    fn summarise(&mut self, shard: u32, end: u64, watermark: u64) -> io::Result<ShardCopy> {
        let copied = &mut self.shards[shard as usize];
        copied.sort_by_key(|c| c.base);
        let dir = shard_dir(&self.src, shard);
        let gap = |what: String| {
            io::Error::other(format!(
                "shard {shard} of {}: {what}; the copy would miss records",
                self.src.display()
            ))
        };
        if let Some(c) = copied.iter().find(|c| c.base > end) {
            return Err(gap(format!(
                "a segment starting at {} lies past the copy's end {end}",
                c.base
            )));
        }
        for pair in copied.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let accepted_gap = a.repaired && b.base > a.end;
            if a.end != b.base && !accepted_gap {
                return Err(gap(format!(
                    "the segment at {} ends at sequence {} but the next copied one starts at {}",
                    a.base, a.end, b.base
                )));
            }
        }
        let last_end = copied.last().map_or(0, |c| c.end);
        if last_end != end {
            return Err(gap(format!(
                "the copy ends at sequence {last_end}, not at {end} ({})",
                dir.display()
            )));
        }
        Ok(ShardCopy {
            shard,
            first_sequence: copied.first().map_or(0, |c| c.base),
            durable: end,
            source_durable: watermark,
            segments: copied.len(),
            bytes: copied.iter().flat_map(|c| &c.files).map(|f| f.bytes).sum(),
        })
    }
}

/// The first sequence of each frame of a segment, from the frame headers.
#[cfg(test)]
fn frame_bases(seg: &Path) -> Vec<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::open(seg).unwrap();
    let mut out = Vec::new();
    loop {
        let mut hb = [0u8; HEADER_LEN];
        if read_full(&mut f, &mut hb).unwrap() < HEADER_LEN {
            return out;
        }
        let h = Header::parse(&hb).unwrap();
        out.push(h.base_sequence);
        f.seek(SeekFrom::Current(i64::from(h.body_len))).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded_log::EmbeddedLog;
    use bytes::Bytes;
    use floodgate_core::config::EmbeddedStreamConfig;
    use floodgate_core::progress::Quiet;
    use floodgate_core::stream::{Record, ShardId, StartPosition, StreamReader, StreamWriter};
    use std::io::{Seek, SeekFrom, Write};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn cfg(segment_bytes: u64) -> EmbeddedStreamConfig {
        // Uncompressed, so that a few records fill a segment.
        EmbeddedStreamConfig {
            shards: 1,
            segment_bytes,
            compression: floodgate_core::config::Compression::None,
            ..EmbeddedStreamConfig::default()
        }
    }

    async fn append(log: &EmbeddedLog, from: usize, n: usize) {
        for i in from..from + n {
            let r = log
                .append(vec![Record {
                    key: (format!("{i}:0/1")).into(),
                    payload: Bytes::from(format!("record-{i}-{}", "x".repeat(200))),
                }])
                .await;
            r[0].as_ref().unwrap();
        }
    }

    async fn keys(root: &Path) -> Vec<String> {
        let log = EmbeddedLog::open(root, &cfg(4096)).unwrap();
        let batch = log
            .read(&ShardId("0".into()), &StartPosition::TrimHorizon, 100_000)
            .await
            .unwrap();
        log.close().await.unwrap();
        batch.records.into_iter().map(|r| r.key).collect()
    }

    /// Sealed segments first, more records, then the rest: the copy holds exactly the
    /// records below the watermark read in pass two, in several segments, and a torn tail
    /// past the watermark is not copied.
    #[test]
    fn a_copy_ends_at_the_watermark_and_never_copies_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        rt().block_on(async {
            let log = EmbeddedLog::open(&src, &cfg(4096)).unwrap();
            append(&log, 0, 60).await;
            let copy = LogCopy::sealed("test", &src, &dst, &Quiet).unwrap();
            assert!(copy.shards[0].len() >= 2, "several sealed segments");
            append(&log, 60, 15).await;
            // A write in progress: whole-looking bytes past the watermark.
            let active = segment::list(&shard_dir(&src, 0)).unwrap().pop().unwrap();
            fs::OpenOptions::new()
                .append(true)
                .open(&active.path)
                .unwrap()
                .write_all(&[7u8; 100])
                .unwrap();
            let (shards, files) = copy.finish(None, &Quiet).unwrap();
            assert_eq!(shards[0].durable, 75);
            assert_eq!(shards[0].first_sequence, 0);
            assert!(files.iter().all(|f| f.path.starts_with(&dst)));
            drop(log);
        });
        let copied_active = segment::list(&shard_dir(&dst, 0)).unwrap().pop().unwrap();
        assert!(
            !fs::read(&copied_active.path)
                .unwrap()
                .ends_with(&[7u8; 100]),
            "the torn tail was copied"
        );
        let keys = rt().block_on(keys(&dst));
        let expected: Vec<String> = (0..75).map(|i| format!("{i}:0/1")).collect();
        assert_eq!(keys, expected);
    }

    /// A `stop` ends the copy before the first frame holding a matching key.
    #[test]
    fn a_stop_ends_the_copy_at_a_frame_boundary_before_the_match() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        rt().block_on(async {
            let log = EmbeddedLog::open(&src, &cfg(1 << 20)).unwrap();
            append(&log, 0, 30).await;
            let copy = LogCopy::sealed("test", &src, &dst, &Quiet).unwrap();
            let stop = |key: &str| key.split(':').next().unwrap().parse::<u64>().unwrap() > 20;
            let (shards, _) = copy
                .finish(Some(&stop as &dyn Fn(&str) -> bool), &Quiet)
                .unwrap();
            assert_eq!((shards[0].durable, shards[0].source_durable), (21, 30));
            drop(log);
        });
        let seg = segment::list(&shard_dir(&dst, 0)).unwrap().pop().unwrap();
        assert_eq!(frame_bases(&seg.path).last(), Some(&20));
        assert_eq!(rt().block_on(keys(&dst)).len(), 21);
    }

    /// A log whose oldest segments retention deleted: the copy starts at the oldest one left
    /// and joins up to the watermark.
    #[test]
    fn a_log_whose_oldest_segments_retention_took_is_copied_from_the_oldest_left() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        rt().block_on(async {
            let log = EmbeddedLog::open(&src, &cfg(4096)).unwrap();
            append(&log, 0, 60).await;
            drop(log);
        });
        let segments = segment::list(&shard_dir(&src, 0)).unwrap();
        assert!(segments.len() >= 3);
        fs::remove_file(&segments[1].path).unwrap();
        fs::remove_file(&segments[0].path).unwrap();
        let copy = LogCopy::sealed("test", &src, &dst, &Quiet).unwrap();
        let (shards, _) = copy.finish(None, &Quiet).unwrap();
        assert_eq!(shards[0].first_sequence, segments[2].base);
        assert_eq!(shards[0].durable, 60);
    }

    /// Damage below the watermark fails the copy, naming the file and offset.
    #[test]
    fn damage_below_the_watermark_fails_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        rt().block_on(async {
            let log = EmbeddedLog::open(&src, &cfg(1 << 20)).unwrap();
            append(&log, 0, 10).await;
            drop(log);
        });
        let seg = segment::list(&shard_dir(&src, 0)).unwrap().pop().unwrap();
        let mut f = fs::OpenOptions::new().write(true).open(&seg.path).unwrap();
        f.seek(SeekFrom::Start(40)).unwrap();
        f.write_all(b"\xff\xff").unwrap();
        let copy = LogCopy::sealed("test", &src, &dst, &Quiet).unwrap();
        let err = copy.finish(None, &Quiet).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains(&seg.path.display().to_string()),
            "{err}"
        );
    }
}
