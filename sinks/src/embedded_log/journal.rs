//! The log's journal: one file that makes a group commit durable for every shard at once.
//!
//! A group commit writes each shard's new frames to the end of its active segment, then the
//! same frames, each shard's tagged with where they went, to the journal, and fsyncs only
//! the journal. One fdatasync then covers every shard of the group; before, each shard's
//! segment took its own, and on this kind of disk an fdatasync costs about the same CPU
//! however much it writes (measured: four files cost 3.6 times one).
//!
//! The segments are fsynced at a checkpoint: when the journal passes
//! [`CHECKPOINT_BYTES`], before a shard rolls to a new segment, and at close. Only then is
//! the journal cut back to its header. So at any moment the journal holds every
//! acknowledged frame that a segment may not yet hold durably, and [`replay`], at open,
//! writes them back where they belong: after a power cut that dropped unsynced segment
//! pages, the segments are whole again before recovery looks at them. A kill leaves the
//! page cache, and replay then writes bytes that are already there.
//!
//! ```text
//! journal file: "FGJRNL01", then entries, each:
//! offset size  field
//!   0     4    frames_len      u32 LE
//!   4     4    crc32           IEEE CRC-32 of bytes 0..4 and 8..28+frames_len
//!   8     4    shard           u32 LE
//!  12     8    segment_base    u64 LE, the segment file the frames belong to
//!  20     8    offset          u64 LE, where in that file they start
//!  28     …    frames          the frames, byte for byte as in the segment
//! ```
//!
//! The journal is fsynced before any record of an entry is acknowledged, so a torn entry
//! (short, or failing its CRC) can only end the journal; replay stops there, and the
//! segment bytes it would have covered were never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use floodgate_core::stream::StreamError;

use super::{frame, segment, shard_dir, write_atomically};
use crate::failpoint;

/// The journal's file name under the stream root.
pub const FILE: &str = "journal";
const MAGIC: &[u8; 8] = b"FGJRNL01";
/// The length of an empty journal: its header.
pub const EMPTY_LEN: u64 = MAGIC.len() as u64;
const ENTRY_HEADER: usize = 28;
/// The journal is checkpointed (segments fsynced, journal emptied) once it holds this much.
/// Fsyncing a segment costs about 0.4 ms per dirty MiB here, so a checkpoint stalls the
/// writer a few milliseconds, a few times a second at full load.
pub const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;

/// The journal's path under the stream root.
pub fn path(root: &Path) -> PathBuf {
    root.join(FILE)
}

/// Appends to `buf` an entry saying that `frames` were written to shard `shard`'s segment
/// `segment_base` at `offset`.
pub fn push_entry(buf: &mut Vec<u8>, shard: u32, segment_base: u64, offset: u64, frames: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&shard.to_le_bytes());
    buf.extend_from_slice(&segment_base.to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(frames);
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[start..start + 4]);
    h.update(&buf[start + 8..]);
    let crc = h.finalize();
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub shard: u32,
    pub segment_base: u64,
    pub offset: u64,
    pub frames: Vec<u8>,
}

/// The entries of a journal file, in order, and how its end was reached.
#[derive(Debug, Default)]
pub struct Contents {
    pub entries: Vec<Entry>,
    /// Where the last whole entry ends.
    pub valid_len: u64,
    /// Bytes after the last whole entry (a torn write that was never acknowledged).
    pub torn_bytes: u64,
}

/// Reads the journal at `path`. A missing file is an empty journal; a file that is not a
/// journal is an error.
pub fn read(path: &Path) -> io::Result<Contents> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Contents::default()),
        Err(e) => return Err(e),
    }
    if bytes.len() < MAGIC.len() {
        // Created but its header never made it to disk: nothing was ever journaled in it.
        if MAGIC.starts_with(&bytes) {
            return Ok(Contents::default());
        }
        return Err(not_a_journal(path));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(not_a_journal(path));
    }
    let mut contents = Contents::default();
    let mut at = MAGIC.len();
    while bytes.len() - at >= ENTRY_HEADER {
        let field = |from: usize, len: usize| &bytes[at + from..at + from + len];
        let frames_len = u32::from_le_bytes(field(0, 4).try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(field(4, 4).try_into().unwrap());
        if bytes.len() - at - ENTRY_HEADER < frames_len {
            break;
        }
        let end = at + ENTRY_HEADER + frames_len;
        let mut h = crc32fast::Hasher::new();
        h.update(&bytes[at..at + 4]);
        h.update(&bytes[at + 8..end]);
        if h.finalize() != crc {
            break;
        }
        contents.entries.push(Entry {
            shard: u32::from_le_bytes(field(8, 4).try_into().unwrap()),
            segment_base: u64::from_le_bytes(field(12, 8).try_into().unwrap()),
            offset: u64::from_le_bytes(field(20, 8).try_into().unwrap()),
            frames: bytes[at + ENTRY_HEADER..end].to_vec(),
        });
        at = end;
    }
    contents.valid_len = at as u64;
    contents.torn_bytes = (bytes.len() - at) as u64;
    Ok(contents)
}

fn not_a_journal(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is not a floodgate log journal", path.display()),
    )
}

/// What [`replay`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub entries: usize,
    /// Frame bytes written back into segments (most were usually there already).
    pub bytes: u64,
    /// Bytes cut off the ends of segments: written after the last durable entry, so never
    /// acknowledged.
    pub cut_bytes: u64,
    pub torn_bytes: u64,
}

/// The sequence after the last record of the frames in `frames` (one entry's bytes).
fn frames_end(frames: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    let mut end = None;
    while at < frames.len() {
        let header: &[u8; frame::HEADER_LEN] =
            frames.get(at..at + frame::HEADER_LEN)?.try_into().ok()?;
        let h = frame::Header::parse(header)?;
        end = Some(h.next_sequence());
        at = at.checked_add(usize::try_from(h.frame_len()).ok()?)?;
    }
    (at == frames.len()).then_some(end).flatten()
}

/// Replays the journal of the log at `root` into its segments and fsyncs them; the journal
/// itself is left as it is (see [`reset`]). Writing an entry back is idempotent, so this
/// may run any number of times before the journal is emptied. Runs with the log's `LOCK`
/// held: at open, before any shard's recovery; in `verify --repair`; and before an offline
/// reader reads ([`settle`]).
///
/// Refuses, changing nothing, a journal that would take acknowledged records away: one
/// whose entries for a shard end below the watermark that shard published (a journal
/// damaged in the middle, whose later entries cannot be read), or that names a segment that
/// does not exist.
pub fn replay(root: &Path, shards: u32) -> Result<Replayed, StreamError> {
    let path = path(root);
    let corrupt = |what: String| {
        StreamError::Corrupt(format!(
            "{}: {what}; nothing was changed (`floodgate stream verify` checks the segments)",
            path.display()
        ))
    };
    let contents = read(&path).map_err(|e| corrupt(e.to_string()))?;
    let mut replayed = Replayed {
        entries: contents.entries.len(),
        torn_bytes: contents.torn_bytes,
        ..Replayed::default()
    };
    if contents.entries.is_empty() {
        return Ok(replayed);
    }
    // Per shard: the segment its last entry went to, where that entry ends, and the
    // sequence after its last record.
    let mut last: Vec<Option<(u64, u64, u64)>> = vec![None; shards as usize];
    for e in &contents.entries {
        if e.shard >= shards {
            return Err(corrupt(format!(
                "an entry names shard {}, but the log has {shards}",
                e.shard
            )));
        }
        let seg = segment::segment_path(&shard_dir(root, e.shard), e.segment_base);
        if !seg.is_file() {
            return Err(corrupt(format!(
                "an entry names segment {}, which does not exist",
                seg.display()
            )));
        }
        let end_sequence = frames_end(&e.frames).ok_or_else(|| {
            corrupt(format!(
                "an entry for {} holds no whole frames",
                seg.display()
            ))
        })?;
        last[e.shard as usize] = Some((
            e.segment_base,
            e.offset.saturating_add(e.frames.len() as u64),
            end_sequence,
        ));
    }
    for (shard, end) in last.iter().enumerate() {
        let Some((_, _, end_sequence)) = *end else {
            continue;
        };
        let dir = shard_dir(root, shard as u32);
        if let Some(w) = segment::read_watermark(&dir)?.known()
            && end_sequence < w
        {
            return Err(corrupt(format!(
                "its entries for shard {shard} end at sequence {end_sequence}, but records up \
                 to {w} were acknowledged: the journal is damaged after its last whole entry \
                 (byte {})",
                contents.valid_len
            )));
        }
    }

    let mut touched: Vec<(PathBuf, File)> = Vec::new();
    for e in &contents.entries {
        let dir = shard_dir(root, e.shard);
        let seg = segment::segment_path(&dir, e.segment_base);
        let file = match touched.iter().position(|(p, _)| *p == seg) {
            Some(i) => &mut touched[i].1,
            None => {
                let file = OpenOptions::new().write(true).open(&seg)?;
                touched.push((seg, file));
                &mut touched.last_mut().expect("pushed").1
            }
        };
        file.seek(SeekFrom::Start(e.offset))?;
        failpoint::write_all(file, &e.frames, &dir)?;
        replayed.bytes += e.frames.len() as u64;
    }
    // What a segment holds past its shard's last entry was written by a group whose entry
    // never became durable: it was never acknowledged. Cut it, unless the segment is no
    // longer the shard's last (then it was sealed, and fsynced, after the entry).
    for (shard, end) in last.iter().enumerate() {
        let Some((base, end, _)) = *end else { continue };
        let dir = shard_dir(root, shard as u32);
        if segment::list(&dir)?.last().map(|s| s.base) != Some(base) {
            continue;
        }
        let seg = segment::segment_path(&dir, base);
        let (_, file) = touched
            .iter()
            .find(|(p, _)| *p == seg)
            .expect("an entry's segment was opened");
        let len = file.metadata()?.len();
        if len > end {
            failpoint::set_len(file, end, &dir)?;
            replayed.cut_bytes += len - end;
        }
    }
    for (seg, file) in &touched {
        failpoint::sync_all(file, seg.parent().unwrap_or(root))?;
    }
    Ok(replayed)
}

/// Empties the journal of the log at `root` (creating it if there is none): once every
/// shard's segments hold what it held, durably. The writer's open calls it after recovery
/// has accepted every shard, `verify --repair` after its replay.
pub fn reset(root: &Path) -> io::Result<()> {
    let path = path(root);
    match OpenOptions::new().write(true).open(&path) {
        Ok(file) if file.metadata()?.len() >= EMPTY_LEN && read(&path).is_ok() => {
            if file.metadata()?.len() > EMPTY_LEN {
                failpoint::set_len(&file, EMPTY_LEN, &path)?;
                failpoint::sync_all(&file, &path)?;
            }
            Ok(())
        }
        // Missing, or never whole: write a new one in one step, so that no journal is ever
        // without its header.
        Ok(_) => write_atomically(&path, MAGIC),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomically(&path, MAGIC),
        Err(e) => Err(e),
    }
}

/// Makes the segments of the log at `root` hold everything its journal holds, for a reader
/// in another process: when no writer holds the log's `LOCK` and the journal has entries
/// (the writer was stopped by a crash or a power cut and has not opened the log since),
/// replays it with the `LOCK` held. With a writer running there is nothing to do: it
/// replayed the journal when it opened the log, and its segments' pages are in the cache.
pub fn settle(root: &Path, shards: u32) -> Result<(), StreamError> {
    if pending_entries(root).map_err(|e| StreamError::Corrupt(e.to_string()))? == 0 {
        return Ok(());
    }
    let lock = match OpenOptions::new().write(true).open(root.join("LOCK")) {
        Ok(lock) => lock,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if lock.try_lock().is_err() {
        return Ok(());
    }
    let replayed = replay(root, shards)?;
    tracing::info!(
        root = %root.display(),
        entries = replayed.entries,
        cut_bytes = replayed.cut_bytes,
        "replayed the journal of a log whose writer stopped without closing it"
    );
    Ok(())
}

/// How many entries the journal at `root` holds: a running writer's latest groups, or, in a
/// log that was not closed cleanly and not opened since, frames to write back.
pub fn pending_entries(root: &Path) -> io::Result<usize> {
    Ok(read(&path(root))?.entries.len())
}
