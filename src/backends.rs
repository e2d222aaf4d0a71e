//! The one place that turns the configuration into backends. Each role is a closed enum
//! of the backends that can fill it; commands ask for a role and get its trait object, so
//! no command names a concrete backend.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use floodgate_core::config::{Config, CoordinationBackend, StreamBackend};
use floodgate_core::state::StateStore;
use floodgate_core::stream::{CheckpointStore, StreamReader, StreamWriter};
use floodgate_sinks::{
    EmbeddedCheckpoints, EmbeddedLog, EmbeddedLogReader, LocalDirStore, SqliteStateStore,
};

/// The stream role: the sharded, durable log between the edge and the processors.
#[derive(Debug)]
pub(crate) enum Stream {
    /// The on-disk log, written (and read) by this process: `serve`, `ingest`.
    Embedded(Arc<EmbeddedLog>),
    /// The on-disk log another process writes, read by this one: `process`.
    EmbeddedView(Arc<EmbeddedLogReader>),
}

impl Stream {
    /// The stream as the edge opens it: for appending (and, in `serve`, reading).
    pub(crate) async fn for_edge(config: &Config) -> Result<Self> {
        match config.stream.backend {
            StreamBackend::Embedded => {
                let root = config.data_dir.join("stream");
                let log = EmbeddedLog::open(&root, &config.stream.embedded)
                    .with_context(|| format!("cannot open the stream at {}", root.display()))?;
                Ok(Stream::Embedded(Arc::new(log)))
            }
            StreamBackend::Kinesis => anyhow::bail!("the kinesis stream backend is not built yet"),
        }
    }

    /// The stream as workers that do not write it open it (`process`).
    pub(crate) async fn for_workers(config: &Config) -> Result<Self> {
        match config.stream.backend {
            StreamBackend::Embedded => {
                let root = config.data_dir.join("stream");
                let reader = EmbeddedLogReader::open(&root)
                    .with_context(|| format!("cannot open the stream at {}", root.display()))?;
                Ok(Stream::EmbeddedView(Arc::new(reader)))
            }
            StreamBackend::Kinesis => anyhow::bail!("the kinesis stream backend is not built yet"),
        }
    }

    /// The edge's side; `None` for a read-only view.
    pub(crate) fn writer(&self) -> Option<Arc<dyn StreamWriter>> {
        match self {
            Stream::Embedded(log) => Some(log.clone()),
            Stream::EmbeddedView(_) => None,
        }
    }

    /// The processors' side.
    pub(crate) fn reader(&self) -> Arc<dyn StreamReader> {
        match self {
            Stream::Embedded(log) => log.clone(),
            Stream::EmbeddedView(view) => view.clone(),
        }
    }

    /// Whether the edge refills its dedupe window from this stream at start: the embedded
    /// log is local and quick to scan. (On a shared stream with many edges, the consumers
    /// drop repeats per shard instead.)
    pub(crate) fn refills_dedupe(&self) -> bool {
        matches!(self, Stream::Embedded(_))
    }

    /// Makes everything appended durable and stops appends.
    pub(crate) async fn close(&self) -> Result<()> {
        if let Some(writer) = self.writer() {
            writer
                .close()
                .await
                .context("cannot make the stream durable at shutdown")?;
        }
        Ok(())
    }
}

/// The coordination role: the stream consumers' leases and checkpoints.
#[derive(Debug)]
pub(crate) enum Coordination {
    /// Files with flock beside the embedded log.
    Embedded(Arc<EmbeddedCheckpoints>),
}

impl Coordination {
    pub(crate) async fn open(config: &Config) -> Result<Self> {
        match config.coordination.backend {
            CoordinationBackend::Embedded => {
                let root = config.data_dir.join("stream");
                Ok(Coordination::Embedded(Arc::new(
                    EmbeddedCheckpoints::open(&root).with_context(|| {
                        format!("cannot open the checkpoints under {}", root.display())
                    })?,
                )))
            }
            CoordinationBackend::Dynamodb => {
                anyhow::bail!("the dynamodb coordination backend is not built yet")
            }
        }
    }

    pub(crate) fn store(&self) -> Arc<dyn CheckpointStore> {
        match self {
            Coordination::Embedded(c) => c.clone(),
        }
    }
}

/// Leases and checkpoints of a local one-shard log (the quarantine, the derived events):
/// always files beside it, whatever `[coordination]` says, since only this machine has it.
pub(crate) fn local_checkpoints(root: &Path) -> Result<Arc<dyn CheckpointStore>> {
    Ok(Arc::new(EmbeddedCheckpoints::open(root).with_context(
        || format!("cannot open the checkpoints under {}", root.display()),
    )?))
}

/// The lake's object store: `<data_dir>/lake`.
pub(crate) fn lake_store(config: &Config) -> Result<Arc<LocalDirStore>> {
    let dir = config.data_dir.join("lake");
    Ok(Arc::new(LocalDirStore::open(&dir).with_context(|| {
        format!("cannot open the lake at {}", dir.display())
    })?))
}

/// The quarantine: a one-shard log of every event the edge rejected, beside the stream.
pub(crate) fn open_quarantine(config: &Config) -> Result<EmbeddedLog> {
    let root = config.data_dir.join("quarantine");
    let mut c = config.stream.embedded.clone();
    c.shards = 1;
    EmbeddedLog::open(&root, &c)
        .with_context(|| format!("cannot open the quarantine at {}", root.display()))
}

/// The state store, its page cache and memory map sized by `[state]` (the memory budget's).
pub(crate) fn open_state(
    data_dir: &Path,
    memory: &floodgate_core::config::StateConfig,
) -> Result<Arc<dyn StateStore>> {
    let path = data_dir.join("state").join("state.db");
    Ok(Arc::new(
        SqliteStateStore::open_with(&path, memory)
            .with_context(|| format!("cannot open the state store at {}", path.display()))?,
    ))
}
