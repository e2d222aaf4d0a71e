//! `floodgate stream verify`: checks every frame of every segment of a log, and repairs
//! damage with the operator's consent.
//!
//! [`check`] reads only, so it is safe beside a running writer (with none running, it first
//! lets [`super::journal::settle`] write back what the journal holds, as the writer's next
//! open would, since a power cut may have taken it from the segments): per shard it reads the
//! published durable watermark first, then lists the segments, and does not look past the
//! watermark in the last one (that is a write in progress, not damage). It checks each
//! frame's header, length, CRC and decodability, that sequences run on without a gap inside
//! a segment and from one segment to the next, and that the last segment reaches the
//! watermark.
//!
//! [`repair`] takes the log's `LOCK`, so it runs only while no writer does. For each damaged
//! segment it moves the bytes from the first damage on into `<segment>.damaged-<offset>` and
//! truncates the segment there; the records in those bytes leave the stream. When the
//! shard's last segment loses records, it also starts a new, empty segment at the old
//! watermark, so that new records never take sequence numbers that consumers may already
//! have read past.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use floodgate_core::progress::{Progress, Quiet, Unit};
use floodgate_core::stream::StreamError;

use super::segment::{self, Segment, SegmentCheck, Watermark};
use super::{LogMeta, fsync_dir, journal, shard_dir};

/// One damaged place in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub shard: u32,
    /// The segment file (or the shard directory, when that is what is missing).
    pub path: PathBuf,
    /// Where the damage starts: a repair moves the bytes from here on aside.
    pub offset: u64,
    pub reason: String,
    /// The first sequence affected.
    pub first_sequence: Option<u64>,
    /// The sequence after the last one affected, when known.
    pub end_sequence: Option<u64>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "damaged: {} at byte offset {}: {}",
            self.path.display(),
            self.offset,
            self.reason
        )?;
        match (self.first_sequence, self.end_sequence) {
            (Some(a), Some(b)) if b > a => write!(
                f,
                "; sequences {a}..{} ({} records) cannot be read",
                b - 1,
                b - a
            ),
            (Some(a), _) => write!(f, "; records from sequence {a} on cannot be read"),
            (None, _) => Ok(()),
        }
    }
}

/// What [`check`] found in one log.
#[derive(Debug, Clone, Default)]
pub struct LogReport {
    pub root: PathBuf,
    pub shards: u32,
    pub segments: u64,
    pub frames: u64,
    pub records: u64,
    /// Damage, in shard and file order.
    pub problems: Vec<Problem>,
    /// What is worth knowing but is not damage: writes in progress, tails the next start
    /// truncates, gaps a repair accepted, a watermark the next start rewrites.
    pub notes: Vec<String>,
}

impl LogReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// One line: what was checked and what was found.
    pub fn summary(&self) -> String {
        let verdict = if self.is_clean() {
            "clean".to_owned()
        } else {
            format!("{} damaged", self.problems.len())
        };
        format!(
            "{}: {} shards, {} segments, {} frames, {} records checked: {verdict}",
            self.root.display(),
            self.shards,
            self.segments,
            self.frames,
            self.records
        )
    }
}

/// What [`repair`] did to one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairAction {
    pub segment: PathBuf,
    pub offset: u64,
    /// Where the bytes from `offset` on went (an empty file when there were none: it marks
    /// the sequence gap after the segment as accepted).
    pub moved_to: PathBuf,
    pub moved_bytes: u64,
    /// A new, empty segment started so that new records skip the lost sequences.
    pub new_segment: Option<PathBuf>,
}

impl fmt::Display for RepairAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "repaired: {} truncated at byte offset {}; {} bytes moved to {}",
            self.segment.display(),
            self.offset,
            self.moved_bytes,
            self.moved_to.display()
        )?;
        if let Some(s) = &self.new_segment {
            write!(
                f,
                "; new records continue in {} so that no sequence is reused",
                s.display()
            )?;
        }
        Ok(())
    }
}

/// What was found in one shard, kept for a repair.
struct ShardFindings {
    dir: PathBuf,
    watermark: Watermark,
    /// The last segment and its check, when the shard has one.
    last: Option<(Segment, SegmentCheck)>,
    /// Indexes into the report's problems.
    problems: std::ops::Range<usize>,
}

/// Checks every segment of every shard of the log at `root`. Reads only; safe beside a
/// running writer. `Err` when the log cannot be read at all (no `meta.json`, I/O errors).
pub fn check(root: &Path) -> Result<LogReport, StreamError> {
    check_with(root, &Quiet)
}

/// [`check`], reporting the bytes of segments checked to `progress`.
pub fn check_with(root: &Path, progress: &dyn Progress) -> Result<LogReport, StreamError> {
    verify_shards(root, progress).map(|(report, _)| report)
}

fn verify_shards(
    root: &Path,
    progress: &dyn Progress,
) -> Result<(LogReport, Vec<ShardFindings>), StreamError> {
    let meta = LogMeta::read(root)?.ok_or_else(|| {
        StreamError::Unavailable(format!(
            "no log at {} (meta.json is missing)",
            root.display()
        ))
    })?;
    // With no writer running, what the journal holds goes back into the segments first, as
    // the writer's next open would do: a power cut may have taken it from them.
    journal::settle(root, meta.shards)?;
    // The total is what the segments hold when the check begins (a live writer adds to it).
    let total = (0..meta.shards)
        .filter_map(|shard| segment::list(&shard_dir(root, shard)).ok())
        .flatten()
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    progress.stage(
        &format!("checking {}", root.display()),
        Some(total),
        Unit::Bytes,
    );
    let mut report = LogReport {
        root: root.to_owned(),
        shards: meta.shards,
        ..LogReport::default()
    };
    let mut findings = Vec::new();
    for shard in 0..meta.shards {
        let first_problem = report.problems.len();
        let f = verify_shard(root, shard, &mut report, progress)
            .map_err(|e| io_error(&shard_dir(root, shard), e))?;
        findings.push(ShardFindings {
            problems: first_problem..report.problems.len(),
            ..f
        });
    }
    match journal::pending_entries(root) {
        Ok(0) => {}
        Ok(n) => report.notes.push(format!(
            "the journal holds {n} entries not yet checkpointed into the segments: a running \
             writer's latest appends, or, after a crash, acknowledged frames that the next open \
             (or --repair) writes back into their segments before anything else; damage at the \
             end of a shard's last segment may be one of them"
        )),
        Err(e) => report
            .notes
            .push(format!("the journal cannot be read: {e}")),
    }
    Ok((report, findings))
}

fn io_error(path: &Path, e: io::Error) -> StreamError {
    StreamError::Io(io::Error::new(
        e.kind(),
        format!("cannot check {}: {e}", path.display()),
    ))
}

fn verify_shard(
    root: &Path,
    shard: u32,
    report: &mut LogReport,
    progress: &dyn Progress,
) -> io::Result<ShardFindings> {
    let dir = shard_dir(root, shard);
    let mut findings = ShardFindings {
        dir: dir.clone(),
        watermark: Watermark::Missing,
        last: None,
        problems: 0..0,
    };
    // The watermark before the listing: every record below it is in a listed segment.
    let watermark = match segment::read_watermark(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Watermark::Missing,
        other => other?,
    };
    findings.watermark = watermark;
    let durable = watermark.known();
    match watermark {
        Watermark::Missing => report.notes.push(format!(
            "shard {shard}: no durable watermark ({}); readers in other processes see nothing \
             of this shard until a writer (floodgate serve or ingest) opens the log",
            dir.join(segment::WATERMARK_FILE).display()
        )),
        Watermark::Damaged => report.notes.push(format!(
            "shard {shard}: the durable watermark {} is damaged; the next start rewrites it",
            dir.join(segment::WATERMARK_FILE).display()
        )),
        Watermark::At(_) => {}
    }
    let segments = match segment::list(&dir) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            report.problems.push(Problem {
                shard,
                path: dir.clone(),
                offset: 0,
                reason: "the shard directory is missing".into(),
                first_sequence: None,
                end_sequence: durable,
            });
            return Ok(findings);
        }
        Err(e) => return Err(e),
    };
    if segments.is_empty() && durable.is_some_and(|w| w > 0) {
        report.problems.push(Problem {
            shard,
            path: dir.clone(),
            offset: 0,
            reason: "the shard has no segment".into(),
            first_sequence: None,
            end_sequence: durable,
        });
    }
    let mut previous: Option<(Segment, SegmentCheck)> = None;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        let next_base = segments.get(i + 1).map(|s| s.base);
        let check = match segment::check_segment(seg, if is_last { durable } else { None }) {
            Ok(c) => c,
            // Retention deleted it since the listing: it held nothing any consumer needs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                previous = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        progress.advance(check.file_len);
        report.segments += 1;
        report.frames += check.frames;
        report.records += check.records;
        if let Some((prev, prev_check)) = &previous {
            check_continuity(shard, prev, prev_check, seg, report)?;
        }
        for (k, d) in check.damage.iter().enumerate() {
            let end_sequence = d
                .resumes_at
                .map(|r| r.sequence)
                .or(next_base)
                .or(durable.filter(|_| is_last));
            let torn_tail = is_last && durable.is_none() && d.resumes_at.is_none();
            if torn_tail && k + 1 == check.damage.len() {
                report.notes.push(format!(
                    "shard {shard}: {} has a torn tail at byte offset {} ({}): bytes never \
                     acknowledged, which the next start truncates",
                    seg.path.display(),
                    d.offset,
                    d.reason
                ));
                continue;
            }
            report.problems.push(Problem {
                shard,
                path: seg.path.clone(),
                offset: d.offset,
                reason: d.reason.to_owned(),
                first_sequence: Some(d.first_sequence),
                end_sequence,
            });
        }
        if is_last {
            if let Some(from) = check.in_progress_from {
                report.notes.push(format!(
                    "shard {shard}: {} from byte offset {from} on is past the durable watermark \
                     ({}): a write in progress, or a tail the next start recovers; not checked",
                    seg.path.display(),
                    durable.unwrap_or(0)
                ));
            }
            if let Some(w) = durable
                && check.damage.is_empty()
                && check.end.sequence < w
            {
                report.problems.push(Problem {
                    shard,
                    path: seg.path.clone(),
                    offset: check.end.offset,
                    reason: format!(
                        "the shard ends at sequence {} but records up to {} were acknowledged",
                        check.end.sequence,
                        w - 1
                    ),
                    first_sequence: Some(check.end.sequence),
                    end_sequence: Some(w),
                });
            }
        }
        previous = Some((seg.clone(), check));
    }
    findings.last = previous.filter(|(seg, _)| segments.last() == Some(seg));
    Ok(findings)
}

/// A sealed segment must end where the next one begins, unless a repair accepted the gap.
fn check_continuity(
    shard: u32,
    prev: &Segment,
    prev_check: &SegmentCheck,
    seg: &Segment,
    report: &mut LogReport,
) -> io::Result<()> {
    let end = prev_check.end.sequence;
    if seg.base == end {
        return Ok(());
    }
    // Damage that runs to the end of `prev` is reported already, gap included.
    let damaged_to_end = prev_check
        .damage
        .last()
        .is_some_and(|d| d.resumes_at.is_none());
    if seg.base > end && damaged_to_end {
        return Ok(());
    }
    if seg.base > end && prev.repaired {
        report.notes.push(format!(
            "shard {shard}: sequences {end}..{} were moved aside by a repair ({}.damaged-*)",
            seg.base - 1,
            prev.path.display()
        ));
        return Ok(());
    }
    // With damage inside `prev` the check resynchronised past it, and the damage itself is
    // reported; the continuity of what follows is still checked here.
    if seg.base > end {
        report.problems.push(Problem {
            shard,
            path: prev.path.clone(),
            offset: prev_check.end.offset,
            reason: format!(
                "the segment ends at sequence {end} but the next one ({}) starts at {}",
                seg.path.display(),
                seg.base
            ),
            first_sequence: Some(end),
            end_sequence: Some(seg.base),
        });
    } else {
        // Overlap: cut `prev` at the first frame that reaches into the next segment.
        let cut = first_frame_reaching(prev, seg.base)?.unwrap_or(prev_check.end);
        report.problems.push(Problem {
            shard,
            path: prev.path.clone(),
            offset: cut.offset,
            reason: format!(
                "the segment holds records up to sequence {} but the next one ({}) starts at {}",
                end - 1,
                seg.path.display(),
                seg.base
            ),
            first_sequence: Some(cut.sequence),
            end_sequence: Some(end),
        });
    }
    Ok(())
}

/// The first frame of a segment whose records reach `sequence` or beyond, by headers alone
/// (the segment was checked before).
fn first_frame_reaching(seg: &Segment, sequence: u64) -> io::Result<Option<segment::Position>> {
    let mut reader = io::BufReader::new(File::open(&seg.path)?);
    let mut offset = 0u64;
    loop {
        let mut hb = [0u8; super::frame::HEADER_LEN];
        if reader.read_exact(&mut hb).is_err() {
            return Ok(None);
        }
        let Some(h) = super::frame::Header::parse(&hb) else {
            return Ok(None);
        };
        if h.next_sequence() > sequence {
            return Ok(Some(segment::Position {
                offset,
                sequence: h.base_sequence,
            }));
        }
        reader.seek_relative(i64::from(h.body_len))?;
        offset += h.frame_len();
    }
}

/// Repairs the log at `root`: takes its `LOCK` (so no writer may be running), moves each
/// damaged segment's bytes from the first damage on into `<segment>.damaged-<offset>`,
/// truncates the segment there, and, when the last segment of a shard lost records, starts
/// a new segment at the old durable watermark so that no sequence number is reused. Returns
/// what it did and a fresh check of the repaired log. The records in the moved bytes leave
/// the stream for good (the `.damaged-*` files keep the raw bytes).
pub fn repair(root: &Path) -> Result<(Vec<RepairAction>, LogReport), StreamError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join("LOCK"))?;
    if lock.try_lock().is_err() {
        return Err(StreamError::Unavailable(format!(
            "the log at {} is in use (another process holds its LOCK): stop the server before \
             repairing",
            root.display()
        )));
    }
    // What the journal holds goes back into the segments first, as an open would do:
    // damage it repairs is not damage. Its new journal is of this format, and so the log.
    if let Some(meta) = LogMeta::read(root)? {
        journal::replay(root, meta.shards)?;
        journal::reset(root)?;
        meta.upgrade(root)?;
    }
    let (report, findings) = verify_shards(root, &Quiet)?;
    let mut actions = Vec::new();
    for shard in &findings {
        let problems = &report.problems[shard.problems.clone()];
        repair_shard(shard, problems, &mut actions).map_err(|e| io_error(&shard.dir, e))?;
    }
    let (after, _) = verify_shards(root, &Quiet)?;
    drop(lock);
    Ok((actions, after))
}

fn repair_shard(
    shard: &ShardFindings,
    problems: &[Problem],
    actions: &mut Vec<RepairAction>,
) -> io::Result<()> {
    // The first damaged offset of each segment: everything from there on goes.
    let mut cuts: Vec<(PathBuf, u64)> = Vec::new();
    for p in problems.iter().filter(|p| p.path.is_file()) {
        match cuts.iter_mut().find(|(path, _)| *path == p.path) {
            Some((_, offset)) => *offset = (*offset).min(p.offset),
            None => cuts.push((p.path.clone(), p.offset)),
        }
    }
    for (path, offset) in cuts {
        let moved_to = segment::damaged_path(&path, offset);
        let moved_bytes = move_tail_aside(&path, offset, &moved_to)?;
        let mut action = RepairAction {
            segment: path.clone(),
            offset,
            moved_to,
            moved_bytes,
            new_segment: None,
        };
        if let Some((last, check)) = &shard.last
            && last.path == path
        {
            // Consumers may have read up to the watermark, and the lost frames may reach
            // beyond what the check could see: new records start after all of it.
            let lost_end = problems
                .iter()
                .filter_map(|p| p.end_sequence)
                .chain(shard.watermark.known())
                .chain([check.end.sequence])
                .max()
                .unwrap_or(check.end.sequence);
            let cut_sequence = problems
                .iter()
                .filter(|p| p.path == path && p.offset == offset)
                .find_map(|p| p.first_sequence)
                .unwrap_or(lost_end);
            if lost_end > cut_sequence {
                let new = segment::segment_path(&shard.dir, lost_end);
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&new)?
                    .sync_all()?;
                action.new_segment = Some(new);
            }
            fsync_dir(&shard.dir)?;
            drop(segment::open_watermark(
                &shard.dir,
                lost_end.max(cut_sequence),
            )?);
        }
        fsync_dir(&shard.dir)?;
        tracing::warn!(
            segment = %action.segment.display(),
            offset = action.offset,
            moved_to = %action.moved_to.display(),
            "repaired a damaged segment; the records in the moved bytes left the stream"
        );
        actions.push(action);
    }
    Ok(())
}

/// Copies `path` from `offset` on into a new file `to`, makes the copy durable, then
/// truncates `path` at `offset`. Returns how many bytes moved.
fn move_tail_aside(path: &Path, offset: u64, to: &Path) -> io::Result<u64> {
    let mut src = File::open(path)?;
    let len = src.metadata()?.len();
    let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    src.seek(SeekFrom::Start(offset))?;
    let moved = io::copy(&mut (&mut src).take(len.saturating_sub(offset)), &mut dst)?;
    dst.sync_all()?;
    // The copy's name must be durable before the bytes leave the segment.
    if let Some(dir) = to.parent() {
        fsync_dir(dir)?;
    }
    let seg = OpenOptions::new().write(true).open(path)?;
    seg.set_len(offset.min(len))?;
    seg.sync_all()?;
    Ok(moved)
}
