//! Consumers' leases and checkpoints for the embedded log, beside it under
//! `<stream root>/checkpoints/`: one small JSON file per consumer, replaced atomically on
//! every commit, and one lock file per (consumer, shard) lease. A lease is an exclusive
//! `flock` on its file, so it is held exactly as long as the holding process lives: a
//! worker that dies (even by SIGKILL) releases its leases at once, and another process
//! can take them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use floodgate_core::stream::{CheckpointStore, SequenceNumber, ShardId, StreamError};
use serde::{Deserialize, Serialize};

use crate::embedded_log::write_atomically;

pub(crate) const DIR: &str = "checkpoints";

#[derive(Debug, Default, Serialize, Deserialize)]
struct ConsumerFile {
    /// shard id → last committed sequence
    shards: BTreeMap<String, SequenceNumber>,
}

fn read_file(path: &Path) -> io::Result<ConsumerFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ConsumerFile::default()),
        Err(e) => Err(e),
    }
}

/// The lowest checkpoint of `shard` over every consumer that has a checkpoint file.
/// `None` when no consumer exists: then nothing may be deleted.
pub(crate) fn min_checkpoint(stream_root: &Path, shard: u32) -> io::Result<Option<u64>> {
    let dir = stream_root.join(DIR);
    let mut min: Option<u64> = None;
    let mut any_consumer = false;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        any_consumer = true;
        let file = read_file(&path)?;
        // A consumer that has not committed this shard yet needs all of it.
        let Some(seq) = file
            .shards
            .get(&shard.to_string())
            .and_then(SequenceNumber::as_u64)
        else {
            return Ok(None);
        };
        min = Some(min.map_or(seq, |m| m.min(seq)));
    }
    Ok(if any_consumer { min } else { None })
}

/// Checkpoints of the embedded log's consumers.
/// Leases this store holds: (consumer, shard) → (owner, the locked file).
type HeldLeases = HashMap<(String, String), (String, File)>;

#[derive(Debug, Clone)]
pub struct EmbeddedCheckpoints {
    dir: PathBuf,
    commit_lock: Arc<tokio::sync::Mutex<()>>,
    leases: Arc<std::sync::Mutex<HeldLeases>>,
}

impl EmbeddedCheckpoints {
    /// Checkpoints kept beside the log at `stream_root`.
    pub fn open(stream_root: &Path) -> io::Result<Self> {
        let dir = stream_root.join(DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            commit_lock: Arc::new(tokio::sync::Mutex::new(())),
            leases: Arc::default(),
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
            .map_err(|_| StreamError::Unavailable("poisoned".into()))?;
        if let Some((holder, _)) = leases.get(&key) {
            return Ok(holder == owner);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {
                leases.insert(key, (owner.to_owned(), file));
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
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
            .map_err(|_| StreamError::Unavailable("poisoned".into()))?;
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
            .map_err(|_| StreamError::Unavailable("poisoned".into()))?;
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
        let _guard = self.commit_lock.lock().await;
        let shard = shard.0.clone();
        let sequence = sequence.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut file = read_file(&path)?;
            match file.shards.get(&shard) {
                Some(old) if *old >= sequence => return Ok(()),
                _ => {}
            }
            file.shards.insert(shard, sequence);
            write_atomically(
                &path,
                &serde_json::to_vec_pretty(&file).expect("serializable"),
            )
        })
        .await
        .map_err(|e| StreamError::Unavailable(e.to_string()))??;
        Ok(())
    }
}
