//! Consumers' leases and checkpoints for the embedded log, beside it under
//! `<stream root>/checkpoints/`:
//!
//! ```text
//! <consumer>.json                 the consumer's checkpoints: {"shards": {"<shard>": "<seq>"}}
//! <consumer>.<shard>.lease        the lease on one shard: an exclusive flock on this file
//! <consumer>.lock                 serialises commits to <consumer>.json across processes
//! <consumer>.json.<pid>.<n>.tmp   a commit in flight (or left by a writer that died)
//! ```
//!
//! A lease is an exclusive `flock` on its file, so it is held exactly as long as the
//! holding process lives: a worker that dies (even by SIGKILL) releases its leases at once,
//! and another process can take them.
//!
//! Several processes may split one consumer's shards, and so share its checkpoint file.
//! A commit is therefore (1) fenced: refused unless this store holds the lease on that
//! (consumer, shard), so a worker that gave a shard up cannot move its checkpoint; and
//! (2) a read-modify-write of the consumer's file under an exclusive flock on
//! `<consumer>.lock`, written through a temporary file whose name no other writer uses,
//! fsynced and renamed over the old one. No update of another shard is lost, and readers
//! (`checkpoint`, the log's retention) always see a whole file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId, StreamError};
use serde::{Deserialize, Serialize};

use crate::embedded_log::fsync_dir;
use crate::failpoint;

pub(crate) const DIR: &str = "checkpoints";

#[derive(Debug, Default, Serialize, Deserialize)]
struct ConsumerFile {
    /// shard id → last committed sequence
    shards: BTreeMap<String, SequenceNumber>,
}

/// `err` with the path it happened on in its message.
fn at(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

fn read_file(path: &Path) -> io::Result<ConsumerFile> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: checkpoint file does not parse: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ConsumerFile::default()),
        Err(e) => Err(at(path, e)),
    }
}

/// Creates `dir` and any missing parents, fsyncing the parent of each directory created,
/// so that a directory (and so the files in it) survives a crash right after.
pub(crate) fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    create_dir_durably(parent)?;
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another process made it first; it fsyncs the parent too.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(at(dir, e)),
    }
    fsync_dir(parent).map_err(|e| at(parent, e))
}

/// Opens (creating if needed) the lock file `path` and takes an exclusive flock on it,
/// waiting for another holder; released when the returned file is dropped (or its
/// process dies).
pub(crate) fn lock_exclusive(path: &Path) -> io::Result<File> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| at(path, e))?;
    lock.lock().map_err(|e| at(path, e))?;
    Ok(lock)
}

/// Takes an exclusive flock on the existing lock file `path`, waiting for its holder (a
/// commit in progress); `None` when there is no such file (no commit ever took it).
pub(crate) fn lock_existing(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new().write(true).open(path) {
        Ok(lock) => {
            lock.lock().map_err(|e| at(path, e))?;
            Ok(Some(lock))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path, e)),
    }
}

/// The checkpoints a consumer's file holds (`bytes`, read from `path`): shard → sequence.
pub(crate) fn shards_of(path: &Path, bytes: &[u8]) -> io::Result<BTreeMap<String, String>> {
    let file: ConsumerFile = serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: checkpoint file does not parse: {e}", path.display()),
        )
    })?;
    Ok(file
        .shards
        .into_iter()
        .map(|(shard, seq)| (shard, seq.as_str().to_owned()))
        .collect())
}

/// Replaces `path` with `bytes` atomically (temporary file, fsync, rename, fsync of the
/// directory). The temporary file's name is unique to this process and call, so that two
/// writers never share one, and starts with `<file name>.` and ends with `.tmp` so that a
/// sweep can find the leftovers of writers that died.
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(
        "{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| at(&tmp, e))?;
        failpoint::write_all(&mut f, bytes, &tmp).map_err(|e| at(&tmp, e))?;
        failpoint::sync_all(&f, &tmp).map_err(|e| at(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| at(path, e))?;
        fsync_dir(dir).map_err(|e| at(dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The lowest checkpoint of `shard` over every consumer of the log. `None` when nothing
/// may be deleted: no consumer exists, or one of them has no checkpoint for the shard yet
/// and so needs all of it.
///
/// A consumer exists once it has a checkpoint file or has taken the lease on `shard` (a
/// consumer that has started on a shard but not yet committed, such as the lake while
/// it buffers its first file, holds the whole shard). A checkpoint file that does not
/// parse is an error naming it: retention then deletes nothing and says why.
pub(crate) fn min_checkpoint(stream_root: &Path, shard: u32) -> io::Result<Option<u64>> {
    let dir = stream_root.join(DIR);
    let shard_key = shard.to_string();
    let mut min: Option<u64> = None;
    let mut with_file = HashSet::new();
    let mut with_lease = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| at(&dir, e))? {
        let entry = entry.map_err(|e| at(&dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(consumer) = name.strip_suffix(".json") {
            let path = entry.path();
            let file = read_file(&path)?;
            // A consumer that has not committed this shard yet needs all of it.
            let Some(seq) = file.shards.get(&shard_key) else {
                return Ok(None);
            };
            let Some(seq) = seq.as_u64() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: checkpoint of shard {shard} is not a sequence number of this log: {:?}",
                        path.display(),
                        seq.as_str()
                    ),
                ));
            };
            min = Some(min.map_or(seq, |m| m.min(seq)));
            with_file.insert(consumer.to_owned());
        } else if let Some((consumer, leased)) = name
            .strip_suffix(".lease")
            .and_then(|rest| rest.split_once('.'))
            && leased == shard_key
        {
            with_lease.push(consumer.to_owned());
        }
    }
    // A consumer that took this shard's lease but has no checkpoint file yet.
    if with_lease.iter().any(|c| !with_file.contains(c)) {
        return Ok(None);
    }
    Ok(min)
}

/// Leases this store holds: (consumer, shard) → (owner, the locked file).
type HeldLeases = HashMap<(String, String), (String, File)>;

/// Checkpoints and leases of the embedded log's consumers (see the module docs).
#[derive(Debug, Clone)]
pub struct EmbeddedCheckpoints {
    dir: PathBuf,
    leases: Arc<std::sync::Mutex<HeldLeases>>,
    /// Consumers whose leftover temporary files this store has already removed.
    swept: Arc<std::sync::Mutex<HashSet<String>>>,
}

impl EmbeddedCheckpoints {
    /// Checkpoints kept beside the log at `stream_root`.
    pub fn open(stream_root: &Path) -> io::Result<Self> {
        let dir = stream_root.join(DIR);
        create_dir_durably(&dir)?;
        Ok(Self {
            dir,
            leases: Arc::default(),
            swept: Arc::default(),
        })
    }

    fn lease_path(&self, consumer: &str, shard: &ShardId) -> Result<PathBuf, StreamError> {
        self.path(consumer)?;
        if shard.0.is_empty()
            || !shard
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(StreamError::Unavailable(format!(
                "bad shard id {:?}",
                shard.0
            )));
        }
        Ok(self.dir.join(format!("{consumer}.{}.lease", shard.0)))
    }

    fn path(&self, consumer: &str) -> Result<PathBuf, StreamError> {
        let ok = !consumer.is_empty()
            && consumer.len() <= 64
            && consumer
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(StreamError::Unavailable(format!(
                "consumer names are 1-64 of [a-z0-9_-], not {consumer:?}"
            )));
        }
        Ok(self.dir.join(format!("{consumer}.json")))
    }

    fn holds(&self, consumer: &str, shard: &ShardId) -> Result<bool, StreamError> {
        let leases = self
            .leases
            .lock()
            .map_err(|_| StreamError::Unavailable("checkpoint lease table poisoned".into()))?;
        Ok(leases.contains_key(&(consumer.to_owned(), shard.0.clone())))
    }
}

/// Removes the temporary files that writers of `consumer`'s checkpoint file left when
/// they died. Only called under the consumer's commit lock, when no live writer has one.
fn sweep_temporaries(dir: &Path, consumer: &str) -> io::Result<()> {
    let prefix = format!("{consumer}.json.");
    // `<consumer>.tmp` is the fixed name earlier versions wrote through.
    let legacy = format!("{consumer}.tmp");
    for entry in fs::read_dir(dir).map_err(|e| at(dir, e))? {
        let entry = entry.map_err(|e| at(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if (name.starts_with(&prefix) && name.ends_with(".tmp")) || name == legacy {
            match fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(&entry.path(), e)),
            }
        }
    }
    Ok(())
}

#[async_trait]
impl CheckpointStore for EmbeddedCheckpoints {
    async fn acquire_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError> {
        let path = self.lease_path(consumer, shard)?;
        let key = (consumer.to_owned(), shard.0.clone());
        let mut leases = self
            .leases
            .lock()
            .map_err(|_| StreamError::Unavailable("checkpoint lease table poisoned".into()))?;
        if let Some((holder, _)) = leases.get(&key) {
            return Ok(holder == owner);
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| at(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                leases.insert(key, (owner.to_owned(), file));
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(at(&path, e).into()),
        }
    }

    async fn renew_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<bool, StreamError> {
        // A flock cannot expire while the process lives; holding it is renewing it.
        let leases = self
            .leases
            .lock()
            .map_err(|_| StreamError::Unavailable("checkpoint lease table poisoned".into()))?;
        Ok(leases
            .get(&(consumer.to_owned(), shard.0.clone()))
            .is_some_and(|(holder, _)| holder == owner))
    }

    async fn release_lease(
        &self,
        consumer: &str,
        shard: &ShardId,
        owner: &str,
    ) -> Result<(), StreamError> {
        let mut leases = self
            .leases
            .lock()
            .map_err(|_| StreamError::Unavailable("checkpoint lease table poisoned".into()))?;
        let key = (consumer.to_owned(), shard.0.clone());
        if leases.get(&key).is_some_and(|(holder, _)| holder == owner) {
            leases.remove(&key); // dropping the file releases the flock
        }
        Ok(())
    }

    async fn checkpoint(
        &self,
        consumer: &str,
        shard: &ShardId,
    ) -> Result<Option<SequenceNumber>, StreamError> {
        let path = self.path(consumer)?;
        let file = tokio::task::spawn_blocking(move || read_file(&path))
            .await
            .map_err(|e| StreamError::Unavailable(e.to_string()))??;
        Ok(file.shards.get(&shard.0).cloned())
    }

    async fn commit(
        &self,
        consumer: &str,
        shard: &ShardId,
        sequence: &SequenceNumber,
    ) -> Result<(), StreamError> {
        let path = self.path(consumer)?;
        self.lease_path(consumer, shard)?;
        // Fenced: only the holder of the shard's lease moves its checkpoint. (A flock
        // lease is lost only by releasing it, so holding it now means holding it for the
        // whole of this commit unless this same worker releases it meanwhile.)
        if !self.holds(consumer, shard)? {
            return Err(StreamError::Unavailable(format!(
                "checkpoint of consumer {consumer:?} on shard {shard} refused: this worker \
                 does not hold the lease on it"
            )));
        }
        let lock_path = self.dir.join(format!("{consumer}.lock"));
        let dir = self.dir.clone();
        let consumer = consumer.to_owned();
        let swept = self.swept.clone();
        let shard = shard.0.clone();
        let sequence = sequence.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Other processes commit other shards of this consumer to the same file: the
            // read-modify-write happens under an exclusive flock, released when `lock`
            // is dropped (or its process dies).
            let lock = lock_exclusive(&lock_path)?;
            let swept_before = swept.lock().map_or(true, |s| s.contains(&consumer));
            if !swept_before {
                sweep_temporaries(&dir, &consumer)?;
                if let Ok(mut s) = swept.lock() {
                    s.insert(consumer.clone());
                }
            }
            let mut file = read_file(&path)?;
            match file.shards.get(&shard) {
                Some(old) if *old >= sequence => return Ok(()),
                _ => {}
            }
            file.shards.insert(shard, sequence);
            let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
            replace_file(&path, &bytes)?;
            drop(lock);
            Ok(())
        })
        .await
        .map_err(|e| StreamError::Unavailable(e.to_string()))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn commit_under_lease(
        store: &EmbeddedCheckpoints,
        consumer: &str,
        shard: &str,
        seq: u64,
    ) {
        let shard = ShardId(shard.into());
        assert!(store.acquire_lease(consumer, &shard, "w").await.unwrap());
        store
            .commit(consumer, &shard, &SequenceNumber::from_u64(seq))
            .await
            .unwrap();
    }

    #[test]
    fn retention_keeps_what_the_slowest_consumer_needs() {
        let root = tempfile::tempdir().unwrap();
        let store = EmbeddedCheckpoints::open(root.path()).unwrap();
        // No consumer at all: nothing may go.
        assert_eq!(min_checkpoint(root.path(), 0).unwrap(), None);
        rt().block_on(async {
            commit_under_lease(&store, "bookings", "0", 50).await;
            commit_under_lease(&store, "bookings", "1", 70).await;
            commit_under_lease(&store, "lake", "0", 30).await;
        });
        // Two consumers: the lower checkpoint bounds the shard.
        assert_eq!(min_checkpoint(root.path(), 0).unwrap(), Some(30));
        // The lake has a checkpoint file but none for shard 1: it needs all of shard 1.
        assert_eq!(min_checkpoint(root.path(), 1).unwrap(), None);
    }

    #[test]
    fn a_consumer_that_has_not_committed_yet_holds_the_whole_shard() {
        let root = tempfile::tempdir().unwrap();
        let store = EmbeddedCheckpoints::open(root.path()).unwrap();
        rt().block_on(async {
            commit_under_lease(&store, "bookings", "0", 50).await;
            assert_eq!(min_checkpoint(root.path(), 0).unwrap(), Some(50));
            // The lake starts on shard 0 (takes its lease) and buffers: no checkpoint file
            // yet, but everything after its start position is still to be read.
            assert!(
                store
                    .acquire_lease("lake", &ShardId("0".into()), "w")
                    .await
                    .unwrap()
            );
        });
        assert_eq!(min_checkpoint(root.path(), 0).unwrap(), None);
        // Another consumer's lease on another shard, or the relay's, holds nothing here.
        rt().block_on(async {
            commit_under_lease(&store, "lake", "0", 40).await;
            assert!(
                store
                    .acquire_lease("relay", &ShardId("outbox".into()), "w")
                    .await
                    .unwrap()
            );
        });
        assert_eq!(min_checkpoint(root.path(), 0).unwrap(), Some(40));
    }

    #[test]
    fn a_checkpoint_file_that_does_not_parse_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let store = EmbeddedCheckpoints::open(root.path()).unwrap();
        rt().block_on(commit_under_lease(&store, "bookings", "0", 50));
        let bad = root.path().join(DIR).join("lake.json");
        fs::write(&bad, b"{\"shards\": {\"0\": ").unwrap();
        let err = min_checkpoint(root.path(), 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
        // A sequence that is not one of this log's is not silently read as "absent".
        fs::write(&bad, br#"{"shards": {"0": "x"}}"#).unwrap();
        let err = min_checkpoint(root.path(), 0).unwrap_err();
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn leftover_temporary_files_are_swept_and_ignored() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(DIR);
        let store = EmbeddedCheckpoints::open(root.path()).unwrap();
        // What a writer that died mid-commit leaves: a half-written temporary file.
        fs::write(dir.join("lake.json.999.0.tmp"), b"{\"sha").unwrap();
        fs::write(dir.join("lake.tmp"), b"{\"sha").unwrap();
        rt().block_on(commit_under_lease(&store, "lake", "0", 5));
        assert_eq!(min_checkpoint(root.path(), 0).unwrap(), Some(5));
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn creating_the_directory_creates_its_parents() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durably(&deep).unwrap();
    }
}
