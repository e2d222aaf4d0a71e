//! The log's journal: one file that makes a group commit durable for every shard at once.
//!
//! A group commit writes each shard's new frames to the end of its active segment, then the
//! same frames, each shard's tagged with where they went, to the journal, and fsyncs only
//! the journal. One fdatasync then covers every shard of the group; before, each shard's
//! segment took its own, and on this kind of disk an fdatasync costs about the same CPU
//! however much it writes (measured: four files cost 3.6 times one).
//!
//! The segments are fsynced at a checkpoint: when the journal passes
//! [`CHECKPOINT_BYTES`], before a shard rolls to a new segment, and at close. Only then does
//! the journal start a new generation. So at any moment the journal's current generation
//! holds every acknowledged frame that a segment may not yet hold durably, and [`replay`],
//! at open, writes them back where they belong: after a power cut that dropped unsynced
//! segment pages, the segments are whole again before recovery looks at them. A kill
//! leaves the page cache, and replay then writes bytes that are already there.
//!
//! ```text
//! journal file: "FGJRNL02", generation (u64 LE, random), then entries, each:
//! offset size  field
//!   0     4    frames_len      u32 LE
//!   4     4    crc32           IEEE CRC-32 of bytes 0..4 and 8..36+frames_len
//!   8     8    generation      u64 LE, the header's when the entry was written
//!  16     4    shard           u32 LE
//!  20     8    segment_base    u64 LE, the segment file the frames belong to
//!  28     8    offset          u64 LE, where in that file they start
//!  36     …    frames          the frames, byte for byte as in the segment
//! ```
//!
//! A new generation rewrites the header in place and writes its entries over the old
//! ones, so the file keeps its size: an fdatasync of bytes written within a file's size
//! writes only data, not the inode and the filesystem's journal besides (measured here:
//! half the latency and about 60 % of the CPU of an fdatasync after an append). The
//! entries of a generation are read from the header on, up to the first that is torn,
//! fails its CRC or belongs to another generation: what lies beyond is an older
//! generation's, already checkpointed. A generation is a random number, not a count: the
//! reader may land inside an older generation's frames, whose payloads producers chose,
//! and a payload that spelled out an entry would also have to guess the generation.
//! The new header is fsynced before any entry of its
//! generation is written, so a power cut never leaves the old header over a mix of old and
//! new entries (the old generation's entries would then read only partly, and replay
//! would take back records that the checkpoint had made durable).
//!
//! The journal is fsynced before any record of an entry is acknowledged, so a torn entry
//! can only end the generation; replay stops there, and the segment bytes it would have
//! covered were never acknowledged. A journal of format 1 (`FGJRNL01`: no generation in
//! its header or entries, cut back at each checkpoint) is still read and replayed; the
//! writer's open replaces it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use floodgate_core::stream::StreamError;

use super::{frame, segment, shard_dir, write_atomically};
use crate::failpoint;

/// The journal's file name under the stream root.
pub const FILE: &str = "journal";
const MAGIC: &[u8; 8] = b"FGJRNL02";
/// Format 1: no generations; cut back to its magic at each checkpoint.
const MAGIC_V1: &[u8; 8] = b"FGJRNL01";
/// The header: the magic and the generation. Entries start here.
pub const HEADER_LEN: u64 = MAGIC.len() as u64 + 8;
/// An entry's header, before its frames.
pub const ENTRY_HEADER: usize = 36;
const ENTRY_HEADER_V1: usize = 28;
/// The journal is checkpointed (segments fsynced, a new journal generation started) once
/// it holds this much.
/// Fsyncing a segment costs about 0.4 ms per dirty MiB here, so a checkpoint stalls the
/// writer a few milliseconds, a few times a second at full load.
pub const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;

/// The journal's path under the stream root.
pub fn path(root: &Path) -> PathBuf {
    root.join(FILE)
}

/// A new generation: random, never 0 (format 1's) and never `previous`.
pub fn next_generation(previous: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded from the system's randomness; the clock only varies the input.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u64(previous);
    match hasher.finish() {
        0 => 1 + (previous == 1) as u64,
        g if g == previous => g ^ 1,
        g => g,
    }
}

/// The journal's header for `generation`.
pub fn header(generation: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0; HEADER_LEN as usize];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()..].copy_from_slice(&generation.to_le_bytes());
    h
}

/// Appends to `buf` an entry of `generation` saying that `frames` were written to shard
/// `shard`'s segment `segment_base` at `offset`.
pub fn push_entry(
    buf: &mut Vec<u8>,
    generation: u64,
    shard: u32,
    segment_base: u64,
    offset: u64,
    frames: &[u8],
) {
    let start = buf.len();
    buf.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&generation.to_le_bytes());
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

/// The entries of a journal file's current generation, in order, and how their end was
/// reached.
#[derive(Debug, Default)]
pub struct Contents {
    /// The header's generation (0 for a missing journal or one of format 1).
    pub generation: u64,
    pub entries: Vec<Entry>,
    /// Where the last whole entry ends.
    pub valid_len: u64,
    /// Bytes of an entry of this generation after the last whole one (a torn write that
    /// was never acknowledged), to the end of the file.
    pub torn_bytes: u64,
    /// Bytes after the last whole entry that belong to older generations (already
    /// checkpointed).
    pub stale_bytes: u64,
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
    let (generation, entry_header, mut at) = if bytes.starts_with(MAGIC_V1) {
        (None, ENTRY_HEADER_V1, MAGIC_V1.len())
    } else if bytes.len() >= HEADER_LEN as usize && bytes.starts_with(MAGIC) {
        let generation =
            u64::from_le_bytes(bytes[MAGIC.len()..HEADER_LEN as usize].try_into().unwrap());
        (Some(generation), ENTRY_HEADER, HEADER_LEN as usize)
    } else if bytes.len() < HEADER_LEN as usize
        && (MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())])
            || MAGIC_V1.starts_with(&bytes))
    {
        // Created but its header never made it to disk whole (a new journal is written
        // in one step, by rename, so only an old one's can be short): nothing was ever
        // journaled in it.
        return Ok(Contents::default());
    } else {
        return Err(not_a_journal(path));
    };
    let mut contents = Contents {
        generation: generation.unwrap_or(0),
        ..Contents::default()
    };
    // The fields after the CRC: format 1 has no generation.
    let shift = if generation.is_some() { 8 } else { 0 };
    while bytes.len() - at >= entry_header {
        let field = |from: usize, len: usize| &bytes[at + from..at + from + len];
        let frames_len = u32::from_le_bytes(field(0, 4).try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(field(4, 4).try_into().unwrap());
        if let Some(generation) = generation
            && u64::from_le_bytes(field(8, 8).try_into().unwrap()) != generation
        {
            break;
        }
        if bytes.len() - at - entry_header < frames_len {
            break;
        }
        let end = at + entry_header + frames_len;
        let mut h = crc32fast::Hasher::new();
        h.update(&bytes[at..at + 4]);
        h.update(&bytes[at + 8..end]);
        if h.finalize() != crc {
            break;
        }
        contents.entries.push(Entry {
            shard: u32::from_le_bytes(field(8 + shift, 4).try_into().unwrap()),
            segment_base: u64::from_le_bytes(field(12 + shift, 8).try_into().unwrap()),
            offset: u64::from_le_bytes(field(20 + shift, 8).try_into().unwrap()),
            frames: bytes[at + entry_header..end].to_vec(),
        });
        at = end;
    }
    contents.valid_len = at as u64;
    let rest = (bytes.len() - at) as u64;
    // What follows is this generation's torn entry, unless it names another generation.
    let stale = match generation {
        Some(generation) if bytes.len() - at >= 16 => {
            u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap()) != generation
        }
        _ => false,
    };
    if stale {
        contents.stale_bytes = rest;
    } else {
        contents.torn_bytes = rest;
    }
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
/// may run any number of times before the journal starts a new generation. Runs with the
/// log's `LOCK` held: at open, before any shard's recovery; in `verify --repair`; and
/// before an offline reader reads ([`settle`]).
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

/// Starts a new generation of the journal of the log at `root` (creating it if there is
/// none, replacing one of format 1), once every shard's segments hold what it held,
/// durably; returns the generation. The file keeps its size. The writer's open calls it
/// after recovery has accepted every shard, `verify --repair` after its replay.
pub fn reset(root: &Path) -> io::Result<u64> {
    let path = path(root);
    let current = match read(&path) {
        Ok(contents) if contents.generation > 0 => Some(contents.generation),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => None,
        Err(e) => return Err(e),
    };
    match current {
        Some(current) => {
            let generation = next_generation(current);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            start_generation(&file, &path, generation)?;
            Ok(generation)
        }
        // Missing, never whole, or format 1: write a new one in one step, so that no
        // journal is ever without its header.
        None => {
            let generation = next_generation(0);
            write_atomically(&path, &header(generation))?;
            Ok(generation)
        }
    }
}

/// Writes the header of `generation` over the journal `file`'s and makes it durable: the
/// entries after it are from then on an older generation's. Call it only once the segments
/// hold, durably, every frame the journal's entries hold.
pub fn start_generation(file: &File, path: &Path, generation: u64) -> io::Result<()> {
    failpoint::write_all_at(file, &header(generation), 0, path)?;
    failpoint::sync_data(file, path)
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write(path: &Path, parts: &[&[u8]]) {
        std::fs::write(path, parts.concat()).unwrap();
    }

    fn entry(generation: u64, offset: u64, frames: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        push_entry(&mut buf, generation, 0, 0, offset, frames);
        buf
    }

    #[test]
    fn an_older_generations_entries_after_the_current_ones_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let current = entry(7, 0, b"new");
        // Whole and CRC-valid, where the next entry of generation 7 would start.
        let stale = entry(6, 3, b"old frames, longer");
        write(&path, &[&header(7), &current, &stale]);
        let contents = read(&path).unwrap();
        assert_eq!(contents.generation, 7);
        assert_eq!(contents.entries.len(), 1, "{:?}", contents.entries);
        assert_eq!(contents.entries[0].frames, b"new");
        assert_eq!(
            (
                contents.valid_len,
                contents.stale_bytes,
                contents.torn_bytes
            ),
            (HEADER_LEN + current.len() as u64, stale.len() as u64, 0)
        );
        // The same bytes under an older header are that generation's from the start.
        write(&path, &[&header(6), &current, &stale]);
        assert!(read(&path).unwrap().entries.is_empty());
    }

    #[test]
    fn a_torn_entry_of_the_current_generation_is_torn_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let whole = entry(3, 0, b"whole");
        let torn = entry(3, 5, b"torn frames");
        write(&path, &[&header(3), &whole, &torn[..torn.len() - 2]]);
        let contents = read(&path).unwrap();
        assert_eq!(contents.entries.len(), 1);
        assert_eq!(
            (contents.torn_bytes, contents.stale_bytes),
            (torn.len() as u64 - 2, 0)
        );
    }

    /// A log written before generations: its journal (after a crash) still replays, and
    /// `reset` replaces it with one of this format.
    #[test]
    fn a_journal_of_format_1_is_read_and_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut v1 = MAGIC_V1.to_vec();
        for (offset, frames) in [(0u64, &b"one"[..]), (3, &b"two"[..])] {
            let start = v1.len();
            v1.extend_from_slice(&(frames.len() as u32).to_le_bytes());
            v1.extend_from_slice(&[0; 4]);
            v1.extend_from_slice(&1u32.to_le_bytes());
            v1.extend_from_slice(&0u64.to_le_bytes());
            v1.extend_from_slice(&offset.to_le_bytes());
            v1.extend_from_slice(frames);
            let mut h = crc32fast::Hasher::new();
            h.update(&v1[start..start + 4]);
            h.update(&v1[start + 8..]);
            let crc = h.finalize().to_le_bytes();
            v1[start + 4..start + 8].copy_from_slice(&crc);
        }
        write(&path, &[&v1]);
        let contents = read(&path).unwrap();
        let got: Vec<(u32, u64, &[u8])> = contents
            .entries
            .iter()
            .map(|e| (e.shard, e.offset, &e.frames[..]))
            .collect();
        assert_eq!(got, vec![(1, 0, &b"one"[..]), (1, 3, &b"two"[..])]);
        assert_eq!(contents.generation, 0);

        let first = reset(dir.path()).unwrap();
        assert_ne!(first, 0);
        assert_eq!(std::fs::read(&path).unwrap(), header(first));
        // Each reset after that starts the next generation and keeps the file's size.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&entry(first, 0, b"x"))
            .unwrap();
        assert_eq!(read(&path).unwrap().entries.len(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        let second = reset(dir.path()).unwrap();
        assert!(second != first && second != 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert!(read(&path).unwrap().entries.is_empty());
    }
}
