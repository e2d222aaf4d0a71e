//! `floodgate backup` and `floodgate restore`: a consistent copy of the embedded
//! deployment's data directory, taken while `floodgate serve` runs on it, and brought back
//! into an empty directory.
//!
//! # What is copied, and in which order
//!
//! Each part of the data directory moves on its own while the server runs, so no part can
//! be copied "at one instant". Instead each is copied at a moment that keeps the one
//! invariant a restore needs: **whatever a copied effect depends on is in the copy too,
//! and nothing in the copy is ahead of what produced it**. Concretely, after a restore,
//! each consumer resumes from its copied position and re-applies what follows; that is
//! exactly once as long as every position lies inside the copied log, and the log holds
//! no effect that its position does not cover. So, in this order:
//!
//! 1. **Sealed segments** of the stream, the quarantine log and the derived-event log:
//!    they never change again, so when they are copied does not matter. (Only the bulk
//!    of the bytes; the logs' ends come last.)
//! 2. **Consumers' checkpoints** (`<log>/checkpoints/<consumer>.json`, each read under the
//!    consumer's commit lock). A checkpoint moves only after its consumer's effects are
//!    durable, so everything copied after this is at least as far along.
//! 3. **The lake** (`lake/`). Every run up to the lake's checkpoints is on disk by now;
//!    files written since are runs past the checkpoint, which the restored lake consumer
//!    writes again under the same names (create-only: it keeps the copied one). A
//!    partition is copied only while its `_compaction.json` stays the same and no file of
//!    it goes away, so a compaction in progress is never copied half done.
//! 4. **The state** (`state/state.db`), through SQLite's online backup API: one snapshot,
//!    with each shard's applied position and the outbox's last entry number `N`.
//! 5. **The derived-event log** (`outbox/log/`), up to its durable watermark but before
//!    the first frame holding an entry past `N`. The relay finds its place from this log's
//!    last record and publishes the state's outbox entries after it, and the state deletes
//!    entries once published: copied before the state, the log could lack entries the
//!    state had already deleted; copied after it without the cut, it could hold entries
//!    that the restored bookings processor numbers differently when it re-applies the
//!    records past its position. Any frame holding an entry past `N` was written after the
//!    state was copied, so none of that frame's entries had been deleted from the copy.
//! 6. **The stream and the quarantine log**, each shard up to the durable watermark read
//!    now, never a byte past it. They come last so that they hold every record the state
//!    and every checkpoint and lake file covers: a log copied earlier than the state would
//!    let the restored stream hand out again sequence numbers the state has applied, and
//!    the bookings processor would skip those new events as already seen.
//!
//! Then the copy is checked against itself (every state position and checkpoint lies
//! inside its log), every directory is fsynced, and `manifest.json` is written last: a
//! backup without it is incomplete, and `restore` refuses it.
//!
//! # Restore
//!
//! [`restore`] reads the manifest, copies every file it names into a staging directory
//! inside the (empty or absent) data directory, checking each one's size and SHA-256,
//! checks every restored log frame by frame and the database with SQLite's `quick_check`,
//! then moves the staged parts into place. `floodgate serve` started on it recovers as after
//! a clean stop: the consumers resume from the copied positions.

pub(crate) mod copy;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use floodgate_core::progress::{Progress, Unit};
use serde::{Deserialize, Serialize};

use crate::checkpoint::create_dir_durably;
use crate::embedded_log::snapshot::{LogCopy, ShardCopy};
use crate::sqlite_state::SqliteStateStore;
pub use copy::Copied;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's format; `restore` refuses others.
pub const FORMAT: u32 = 1;

/// The order the parts are copied in (see the module docs), as the manifest records it.
const ORDER: [&str; 6] = [
    "sealed segments of every log",
    "consumers' checkpoints",
    "lake",
    "state (SQLite online backup)",
    "derived-event log, up to the state's last outbox entry",
    "stream and quarantine logs, up to their durable watermarks",
];

/// A partition whose files or compaction manifest changed while it was copied is copied
/// again, this many times at most.
const LAKE_ATTEMPTS: usize = 40;
const LAKE_RETRY: Duration = Duration::from_millis(250);

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Not carried out as asked: a destination that is not empty, no embedded deployment at
    /// the source, a manifest of another format. Nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The data directory changed under the copy in a way it could not settle (a
    /// compaction running throughout, retention deleting a segment the copy still needed).
    /// Running the backup again normally succeeds.
    #[error("{0}; run the backup again")]
    Changed(String),
    /// What was read is damaged: a log frame, a file whose checksum does not match.
    #[error("{0}")]
    Damaged(String),
    #[error("{0}")]
    Io(String),
}

impl From<io::Error> for BackupError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::InvalidData => BackupError::Damaged(e.to_string()),
            _ => BackupError::Io(e.to_string()),
        }
    }
}

/// `manifest.json`: what a backup holds, and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// The floodgate that wrote it.
    pub floodgate_version: String,
    /// RFC 3339, UTC: when the backup began.
    pub started_at: String,
    /// The data directory copied.
    pub source: String,
    pub order: Vec<String>,
    /// Each log, where it lies in the backup (and in the data directory), and per shard the
    /// sequences it holds.
    pub logs: Vec<LogEntry>,
    pub state: Option<StateEntry>,
    /// Each checkpoint file copied → shard → the last sequence its consumer committed.
    pub checkpoints: BTreeMap<String, BTreeMap<String, String>>,
    pub lake: Option<LakeEntry>,
    /// Every file of the backup but this manifest, with its size and SHA-256.
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// Relative to the backup (and to the data directory), e.g. `stream`, `outbox/log`.
    pub path: String,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard: u32,
    /// The first sequence the copy holds (earlier ones retention had deleted).
    pub first_sequence: u64,
    /// The copy's durable watermark: the sequence after its last record.
    pub durable: u64,
    /// The source's durable watermark when the copy ended.
    pub source_durable: u64,
    pub segments: usize,
    pub bytes: u64,
}

impl From<&ShardCopy> for ShardEntry {
    fn from(s: &ShardCopy) -> Self {
        ShardEntry {
            shard: s.shard,
            first_sequence: s.first_sequence,
            durable: s.durable,
            source_durable: s.source_durable,
            segments: s.segments,
            bytes: s.bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    pub path: String,
    /// Shard → the sequence of the last record the bookings processor applied.
    pub positions: BTreeMap<String, String>,
    /// The last outbox entry the state holds; the derived-event log is cut after it.
    pub outbox_last_seq: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeEntry {
    pub path: String,
    pub files: u64,
    pub bytes: u64,
    /// Files hard-linked to the data directory's rather than copied (`--link-lake`).
    pub linked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the backup, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// How to take a backup.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupOptions {
    /// Hard-link the lake's files instead of copying them, where the backup is on the data
    /// directory's file system (a copy elsewhere). Lake files are written once under their
    /// final name and never changed in place, so a link is as good a snapshot as a copy
    /// and costs no space; but it shares the disk (and its failures) with the data.
    pub link_lake: bool,
}

/// The logs of an embedded data directory, by their path in it.
const STREAM: &str = "stream";
const QUARANTINE: &str = "quarantine";
const OUTBOX_LOG: &str = "outbox/log";
const STATE_DB: &str = "state/state.db";
const LAKE: &str = "lake";

fn refuse_unless_empty(dir: &Path, what: &str) -> Result<(), BackupError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(BackupError::Refused(format!(
                "{} is not empty; {what} goes only into an empty (or absent) directory",
                dir.display()
            ))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(copy::at(dir, e).into()),
    }
}

/// `path` relative to `root`, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Takes a backup of the embedded deployment in `data_dir` into `to` (empty or absent),
/// beside a running server (see the module docs). Returns the manifest it wrote. A backup
/// that fails removes what it wrote (`to` was empty).
pub fn backup(
    data_dir: &Path,
    to: &Path,
    options: BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest, BackupError> {
    refuse_unless_empty(to, "a backup")?;
    if resolved(to)?.starts_with(resolved(data_dir)?) {
        return Err(BackupError::Refused(format!(
            "{} is inside the data directory {}: the backup would copy itself",
            to.display(),
            data_dir.display()
        )));
    }
    let result = backup_into(data_dir, to, options, progress);
    if result.is_err() {
        empty_out(to);
    }
    result
}

/// `path` made absolute, with symbolic links resolved as far as it exists, and `.` and
/// `..` followed (in order, so `..` after a link goes up from where the link leads).
fn resolved(path: &Path) -> io::Result<PathBuf> {
    let absolute = std::path::absolute(path).map_err(|e| copy::at(path, e))?;
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => {
                out.push(other);
                if let Ok(real) = out.canonicalize() {
                    out = real;
                }
            }
        }
    }
    Ok(out)
}

/// Removes everything in `dir`: what a failed backup or restore wrote into the directory
/// it found empty. Best effort (the error being reported is the one that matters).
fn empty_out(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

fn backup_into(
    data_dir: &Path,
    to: &Path,
    options: BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest, BackupError> {
    if !data_dir.join(STREAM).join("meta.json").is_file() {
        return Err(BackupError::Refused(format!(
            "no embedded deployment at {} ({}/meta.json is missing): backup copies the \
             embedded log, state and lake of `floodgate serve`",
            data_dir.display(),
            data_dir.join(STREAM).display()
        )));
    }
    if data_dir
        .join("outbox")
        .join(crate::outbox::FILE_NAME)
        .exists()
    {
        return Err(BackupError::Refused(format!(
            "{} holds an older floodgate's outbox file: start `floodgate serve` once to \
             migrate it, then back up",
            data_dir.join("outbox").display()
        )));
    }
    create_dir_durably(to)?;
    let started_at = now_rfc3339();
    let mut files: Vec<Copied> = Vec::new();

    // 1. Sealed segments.
    let logs: Vec<&str> = [STREAM, QUARANTINE, OUTBOX_LOG]
        .into_iter()
        .filter(|l| data_dir.join(l).join("meta.json").is_file())
        .collect();
    let mut copies = Vec::new();
    for log in &logs {
        copies.push((
            *log,
            LogCopy::sealed(log, &data_dir.join(log), &to.join(log), progress)?,
        ));
    }

    // 2. Checkpoints.
    let mut checkpoints = BTreeMap::new();
    progress.stage("consumers' checkpoints", None, Unit::Files);
    for log in &logs {
        for c in copy_checkpoints(&data_dir.join(log), &to.join(log), progress)? {
            checkpoints.insert(format!("{log}/checkpoints/{}", c.name), c.shards);
            files.push(c.copied);
        }
    }

    // 3. The lake.
    let lake_dir = data_dir.join(LAKE);
    let lake = if lake_dir.is_dir() {
        progress.stage("lake", Some(tree_bytes(&lake_dir)), Unit::Bytes);
        let before = files.len();
        copy_lake_dir(
            &lake_dir,
            &to.join(LAKE),
            options.link_lake,
            progress,
            &mut files,
        )?;
        Some(LakeEntry {
            path: LAKE.into(),
            files: (files.len() - before) as u64,
            bytes: files[before..].iter().map(|f| f.bytes).sum(),
            linked: options.link_lake,
        })
    } else {
        None
    };

    // 4. The state.
    let state_src = data_dir.join(STATE_DB);
    let state = if state_src.is_file() {
        let size = fs::metadata(&state_src).map_or(0, |m| m.len());
        progress.stage("state (SQLite online backup)", Some(size), Unit::Bytes);
        let dst = to.join(STATE_DB);
        create_dir_durably(dst.parent().expect("a file in a directory"))?;
        let snapshot = SqliteStateStore::snapshot(&state_src, &dst)
            .map_err(|e| BackupError::Io(e.to_string()))?;
        let (bytes, sha256) = copy::hash_file(&dst, progress)?;
        files.push(Copied {
            path: dst,
            bytes,
            sha256,
        });
        Some(StateEntry {
            path: STATE_DB.into(),
            positions: snapshot.positions,
            outbox_last_seq: snapshot.outbox_last_seq,
            bytes,
        })
    } else {
        None
    };

    // 5. and 6. The ends of the logs: the derived-event log first (cut after the state's
    // last outbox entry), then the stream and the quarantine.
    let outbox_last = state.as_ref().map_or(0, |s| s.outbox_last_seq);
    let past_state =
        move |key: &str| crate::outbox::entry_of(key).is_none_or(|seq| seq > outbox_last);
    copies.sort_by_key(|(log, _)| *log != OUTBOX_LOG);
    let mut log_entries = Vec::new();
    for (log, log_copy) in copies {
        let stop: Option<&dyn Fn(&str) -> bool> = if log == OUTBOX_LOG {
            Some(&past_state)
        } else {
            None
        };
        let (shards, copied) = log_copy.finish(stop, progress).map_err(|e| {
            if e.kind() == io::ErrorKind::Other {
                BackupError::Changed(e.to_string())
            } else {
                e.into()
            }
        })?;
        files.extend(copied);
        log_entries.push(LogEntry {
            path: log.to_owned(),
            shards: shards.iter().map(ShardEntry::from).collect(),
        });
    }
    log_entries.sort_by_key(|l| {
        [STREAM, QUARANTINE, OUTBOX_LOG]
            .iter()
            .position(|p| *p == l.path)
    });

    let manifest = Manifest {
        format: FORMAT,
        floodgate_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        source: data_dir.display().to_string(),
        order: ORDER.iter().map(|s| (*s).to_owned()).collect(),
        logs: log_entries,
        state,
        checkpoints,
        lake,
        files: files
            .iter()
            .map(|f| FileEntry {
                path: relative(to, &f.path),
                bytes: f.bytes,
                sha256: f.sha256.clone(),
            })
            .collect(),
    };
    check_consistent(&manifest).map_err(BackupError::Changed)?;
    copy::fsync_tree(to)?;
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    copy::write_new(&to.join(MANIFEST), &bytes)?;
    crate::embedded_log::fsync_dir(to).map_err(|e| copy::at(to, e))?;
    Ok(manifest)
}

/// The copy's own consistency: every position the state holds and every checkpoint lies
/// inside its log's copy (below its durable watermark). The order of the copy guarantees
/// it; this is the check that it did.
pub fn check_consistent(m: &Manifest) -> Result<(), String> {
    let durable = |log: &str, shard: &str| -> Option<u64> {
        let shard: u32 = shard.parse().ok()?;
        m.logs
            .iter()
            .find(|l| l.path == log)?
            .shards
            .iter()
            .find(|s| s.shard == shard)
            .map(|s| s.durable)
    };
    // Positions that are not this log's plain sequence numbers (none are written today)
    // are not compared.
    let inside = |what: &str, log: &str, shard: &str, seq: &str| -> Result<(), String> {
        let (Ok(seq), Ok(_)) = (seq.parse::<u64>(), shard.parse::<u32>()) else {
            return Ok(());
        };
        match durable(log, shard) {
            Some(w) if seq < w => Ok(()),
            Some(w) => Err(format!(
                "{what} is at sequence {seq} of {log} shard {shard}, but the copy of that \
                 shard ends before {w}: the copy is not consistent"
            )),
            None => Err(format!(
                "{what} names shard {shard} of {log}, which the copy lacks"
            )),
        }
    };
    if let Some(state) = &m.state {
        for (shard, seq) in &state.positions {
            inside("the state's position", STREAM, shard, seq)?;
        }
    }
    for (file, shards) in &m.checkpoints {
        let log = file
            .rsplit_once("/checkpoints/")
            .map_or(file.as_str(), |(log, _)| log);
        for (shard, seq) in shards {
            inside(&format!("the checkpoint {file}"), log, shard, seq)?;
        }
    }
    Ok(())
}

/// One consumer's checkpoint file copied: its name, shard → sequence, the copy.
struct CopiedCheckpoint {
    name: String,
    shards: BTreeMap<String, String>,
    copied: Copied,
}

/// Copies the checkpoint files of the log at `src` into the copy at `dst`, each read under
/// its consumer's commit lock (the lock a commit holds for its read-modify-write), so the
/// copy is a file some commit wrote whole.
fn copy_checkpoints(
    src: &Path,
    dst: &Path,
    progress: &dyn Progress,
) -> io::Result<Vec<CopiedCheckpoint>> {
    let dir = src.join(crate::checkpoint::DIR);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(copy::at(&dir, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let dst_dir = dst.join(crate::checkpoint::DIR);
    create_dir_durably(&dst_dir)?;
    for name in names {
        let consumer = name.trim_end_matches(".json");
        let _lock = crate::checkpoint::lock_existing(&dir.join(format!("{consumer}.lock")))?;
        let path = dir.join(&name);
        let bytes = fs::read(&path).map_err(|e| copy::at(&path, e))?;
        let shards = crate::checkpoint::shards_of(&path, &bytes)?;
        let copied = copy::write_new(&dst_dir.join(&name), &bytes)?;
        progress.advance(1);
        out.push(CopiedCheckpoint {
            name,
            shards,
            copied,
        });
    }
    Ok(out)
}

/// The total size of the files under `dir` (for progress; what cannot be read counts 0).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The compaction manifest's name in a lake partition (`floodgate_processors::compact`).
const COMPACTION_MANIFEST: &str = "_compaction.json";

/// Whether a compaction manifest records a plan still in progress (`"done": false`).
fn has_pending_plan(manifest: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|v| {
            v.get("compacted")?.as_object().map(|plans| {
                plans
                    .values()
                    .any(|p| p.get("done").and_then(serde_json::Value::as_bool) != Some(true))
            })
        })
        .unwrap_or(true)
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(copy::at(path, e)),
    }
}

/// Copies one lake directory (then its subdirectories): its files while its compaction
/// manifest stays the same, records no plan in progress, and none of its files goes away;
/// otherwise the directory's copies are removed and it is copied again. New files appearing
/// meanwhile are runs past the lake's checkpoint, which a restore writes again anyway.
/// Hidden names (`.…`, a writer's temporaries) are skipped.
fn copy_lake_dir(
    src: &Path,
    dst: &Path,
    link: bool,
    progress: &dyn Progress,
    files: &mut Vec<Copied>,
) -> Result<(), BackupError> {
    create_dir_durably(dst)?;
    let manifest_path = src.join(COMPACTION_MANIFEST);
    let mut subdirs = Vec::new();
    let mut settled = false;
    for _ in 0..LAKE_ATTEMPTS {
        let before = read_optional(&manifest_path)?;
        if before.as_deref().is_some_and(has_pending_plan) {
            std::thread::sleep(LAKE_RETRY);
            continue;
        }
        let mut names = Vec::new();
        subdirs.clear();
        for entry in fs::read_dir(src).map_err(|e| copy::at(src, e))? {
            let entry = entry.map_err(|e| copy::at(src, e))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => subdirs.push(name),
                Ok(_) if name == COMPACTION_MANIFEST => {}
                Ok(_) => names.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(copy::at(&entry.path(), e).into()),
            }
        }
        names.sort();
        let mut copied = Vec::new();
        let mut vanished = false;
        for name in &names {
            match copy_lake_file(&src.join(name), &dst.join(name), link, progress) {
                Ok(c) => copied.push(c),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    vanished = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let after = read_optional(&manifest_path)?;
        if vanished || before != after {
            for c in copied {
                fs::remove_file(&c.path).map_err(|e| copy::at(&c.path, e))?;
            }
            std::thread::sleep(LAKE_RETRY);
            continue;
        }
        if let Some(bytes) = before {
            copied.push(copy::write_new(&dst.join(COMPACTION_MANIFEST), &bytes)?);
        }
        files.extend(copied);
        settled = true;
        break;
    }
    if !settled {
        return Err(BackupError::Changed(format!(
            "the lake directory {} kept changing while it was copied (a `floodgate lake \
             compact` running on it?)",
            src.display()
        )));
    }
    subdirs.sort();
    for name in subdirs {
        copy_lake_dir(&src.join(&name), &dst.join(&name), link, progress, files)?;
    }
    Ok(())
}

fn copy_lake_file(
    src: &Path,
    dst: &Path,
    link: bool,
    progress: &dyn Progress,
) -> io::Result<Copied> {
    if link {
        match fs::hard_link(src, dst) {
            Ok(()) => {
                let (bytes, sha256) = copy::hash_file(dst, progress)?;
                return Ok(Copied {
                    path: dst.to_owned(),
                    bytes,
                    sha256,
                });
            }
            // Another file system: copy.
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
            Err(e) => return Err(copy::at(src, e)),
        }
    }
    copy::copy_file(src, dst, progress)
}

/// A path of the manifest, checked to stay inside the directory it is relative to.
fn inside(root: &Path, rel: &str) -> Result<PathBuf, BackupError> {
    let path = Path::new(rel);
    let plain = !rel.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(BackupError::Damaged(format!(
            "the manifest names {rel:?}, not a plain relative path"
        )));
    }
    Ok(root.join(path))
}

/// Reads and checks the manifest of the backup in `from`.
pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BackupError::Refused(format!(
                "{} is missing: {} holds no complete backup",
                path.display(),
                from.display()
            )));
        }
        Err(e) => return Err(copy::at(&path, e).into()),
    };
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Damaged(format!("{}: {e}", path.display())))?;
    if manifest.format != FORMAT {
        return Err(BackupError::Refused(format!(
            "{}: backup format {} is not supported (expected {FORMAT})",
            path.display(),
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Restores the backup in `from` into `data_dir` (empty or absent), checking every file
/// against the manifest and every log frame by frame (see the module docs). Returns the
/// manifest. A restore that fails removes what it wrote.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    progress: &dyn Progress,
) -> Result<Manifest, BackupError> {
    let manifest = read_manifest(from)?;
    refuse_unless_empty(data_dir, "a restore")?;
    create_dir_durably(data_dir)?;
    let result = restore_into(from, &manifest, data_dir, progress);
    if result.is_err() {
        empty_out(data_dir);
    }
    result.map(|()| manifest)
}

fn restore_into(
    from: &Path,
    manifest: &Manifest,
    data_dir: &Path,
    progress: &dyn Progress,
) -> Result<(), BackupError> {
    // Staged inside the data directory (so on its file system, for the renames), under a
    // hidden name: a restore killed midway leaves the directory non-empty, and one run
    // again refuses it rather than mixing two.
    let stage = data_dir.join(format!(".restore-{}", std::process::id()));
    fs::create_dir(&stage).map_err(|e| copy::at(&stage, e))?;
    let total = manifest.files.iter().map(|f| f.bytes).sum();
    progress.stage(
        "restoring (checking every checksum)",
        Some(total),
        Unit::Bytes,
    );
    for f in &manifest.files {
        let src = inside(from, &f.path)?;
        let dst = inside(&stage, &f.path)?;
        create_dir_durably(dst.parent().expect("a file in a directory"))?;
        let copied = match copy::copy_file(&src, &dst, progress) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BackupError::Damaged(format!(
                    "{} is missing from the backup",
                    src.display()
                )));
            }
            other => other?,
        };
        if copied.bytes != f.bytes || copied.sha256 != f.sha256 {
            return Err(BackupError::Damaged(format!(
                "{}: {} bytes with SHA-256 {}, but the manifest says {} bytes with SHA-256 {}",
                src.display(),
                copied.bytes,
                copied.sha256,
                f.bytes,
                f.sha256
            )));
        }
    }
    for log in &manifest.logs {
        let root = inside(&stage, &log.path)?;
        let report = crate::embedded_log::verify::check_with(&root, progress)
            .map_err(|e| BackupError::Damaged(e.to_string()))?;
        if !report.is_clean() {
            let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
            return Err(BackupError::Damaged(format!(
                "the restored log {} is damaged: {}",
                log.path,
                problems.join("; ")
            )));
        }
    }
    if let Some(state) = &manifest.state {
        SqliteStateStore::quick_check(&inside(&stage, &state.path)?)
            .map_err(|e| BackupError::Damaged(e.to_string()))?;
    }
    copy::fsync_tree(&stage)?;
    for entry in fs::read_dir(&stage).map_err(|e| copy::at(&stage, e))? {
        let entry = entry.map_err(|e| copy::at(&stage, e))?;
        let to = data_dir.join(entry.file_name());
        fs::rename(entry.path(), &to).map_err(|e| copy::at(&to, e))?;
    }
    fs::remove_dir(&stage).map_err(|e| copy::at(&stage, e))?;
    crate::embedded_log::fsync_dir(data_dir).map_err(|e| copy::at(data_dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodgate_core::progress::Quiet;

    fn manifest_with(positions: &[(&str, &str)], durable: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            floodgate_version: "test".into(),
            started_at: String::new(),
            source: String::new(),
            order: Vec::new(),
            logs: vec![LogEntry {
                path: STREAM.into(),
                shards: vec![ShardEntry {
                    shard: 0,
                    first_sequence: 0,
                    durable,
                    source_durable: durable,
                    segments: 1,
                    bytes: 0,
                }],
            }],
            state: Some(StateEntry {
                path: STATE_DB.into(),
                positions: positions
                    .iter()
                    .map(|(s, q)| ((*s).to_owned(), (*q).to_owned()))
                    .collect(),
                outbox_last_seq: 0,
                bytes: 0,
            }),
            checkpoints: BTreeMap::from([(
                "stream/checkpoints/lake.json".to_owned(),
                BTreeMap::from([("0".to_owned(), "3".to_owned())]),
            )]),
            lake: None,
            files: Vec::new(),
        }
    }

    /// A state that applied a record the copied log lacks is what copying the log before
    /// the state could produce: the check refuses it.
    #[test]
    fn positions_past_the_copied_log_are_refused() {
        assert_eq!(check_consistent(&manifest_with(&[("0", "9")], 10)), Ok(()));
        let err = check_consistent(&manifest_with(&[("0", "10")], 10)).unwrap_err();
        assert!(err.contains("state's position"), "{err}");
        let err = check_consistent(&manifest_with(&[("0", "1")], 3)).unwrap_err();
        assert!(err.contains("lake.json"), "{err}");
    }

    #[test]
    fn a_backup_inside_the_data_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(data.join("stream")).unwrap();
        fs::write(data.join("stream/meta.json"), br#"{"format":1,"shards":1}"#).unwrap();
        let err = backup(
            &data,
            &data.join("lake/../bk/x"),
            BackupOptions::default(),
            &Quiet,
        )
        .unwrap_err();
        assert!(matches!(err, BackupError::Refused(_)), "{err}");
        assert!(!data.join("bk").exists(), "nothing created");
        // Beside it is fine (`..` is followed, not taken as a name).
        let beside = backup(
            &data,
            &data.join("lake/../../bk"),
            BackupOptions::default(),
            &Quiet,
        );
        assert!(
            !matches!(beside, Err(BackupError::Refused(_))),
            "{beside:?}"
        );
    }

    #[test]
    fn a_compaction_plan_not_done_is_pending() {
        assert!(!has_pending_plan(br#"{"compacted":{}}"#));
        assert!(!has_pending_plan(
            br#"{"compacted":{"c-0-1-9-2.parquet":{"inputs":["0-1-4.parquet"],"done":true}}}"#
        ));
        assert!(has_pending_plan(
            br#"{"compacted":{"c-0-1-9-2.parquet":{"inputs":["0-1-4.parquet"],"done":false}}}"#
        ));
        assert!(
            has_pending_plan(b"{not json"),
            "unreadable counts as in progress"
        );
    }

    /// Lake files and manifests are copied, a writer's hidden temporaries are not.
    #[test]
    fn the_lake_copy_skips_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("lake"), dir.path().join("copy"));
        let part = src.join("t/dt=2026-12-02/hour=10");
        fs::create_dir_all(&part).unwrap();
        fs::write(part.join("0-1-5.parquet"), b"rows").unwrap();
        fs::write(part.join(".0-6-9.parquet.77-0.tmp"), b"half").unwrap();
        fs::write(part.join(COMPACTION_MANIFEST), br#"{"compacted":{}}"#).unwrap();
        let mut files = Vec::new();
        copy_lake_dir(&src, &dst, false, &Quiet, &mut files).unwrap();
        let mut names: Vec<String> = files.iter().map(|f| relative(&dst, &f.path)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "t/dt=2026-12-02/hour=10/0-1-5.parquet",
                "t/dt=2026-12-02/hour=10/_compaction.json"
            ]
        );
    }
}
