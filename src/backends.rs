//! The one place that turns the configuration into backends. Each role is a closed enum
//! of the backends that can fill it; commands ask for a role and get its trait object, so
//! no command names a concrete backend.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use floodgate_aws::eventbridge::EventBridgePublisher;
use floodgate_aws::firehose::FirehoseArchive;
use floodgate_aws::kinesis::{
    KinesisReader, KinesisReaderConfig, KinesisWriter, KinesisWriterConfig,
};
use floodgate_aws::leases::DynamoDbLeases;
use floodgate_aws::s3::S3Store;
use floodgate_aws::state::DynamoDbStateStore;
use floodgate_core::config::{
    ArchiveBackend, Config, CoordinationBackend, LakeStore, PublishBackend, StateBackend,
    StreamBackend,
};
use floodgate_core::object_store::ObjectStore;
use floodgate_core::state::{Publisher, StateStore};
use floodgate_core::stream::{CheckpointStore, StreamReader, StreamWriter};
use floodgate_processors::runtime::RuntimeConfig;
use floodgate_sinks::{
    EmbeddedCheckpoints, EmbeddedLog, EmbeddedLogReader, EmbeddedOutbox, LocalDirStore,
    SqliteStateStore,
};

/// The stream role: the sharded, durable log between the edge and the processors.
#[derive(Debug)]
pub(crate) enum Stream {
    /// The on-disk log, written (and read) by this process: `serve`, `ingest`.
    Embedded(Arc<EmbeddedLog>),
    /// The on-disk log another process writes, read by this one: `process`.
    EmbeddedView(Arc<EmbeddedLogReader>),
    /// Kinesis Data Streams; workers (`process`) open it without a writer.
    Kinesis {
        writer: Option<Arc<KinesisWriter>>,
        reader: Arc<KinesisReader>,
    },
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
            StreamBackend::Kinesis => kinesis(config, true).await,
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
            StreamBackend::Kinesis => kinesis(config, false).await,
        }
    }

    /// The edge's side; `None` for a read-only view.
    pub(crate) fn writer(&self) -> Option<Arc<dyn StreamWriter>> {
        match self {
            Stream::Embedded(log) => Some(log.clone()),
            Stream::EmbeddedView(_) => None,
            Stream::Kinesis { writer, .. } => writer.clone().map(|w| w as Arc<dyn StreamWriter>),
        }
    }

    /// The processors' side.
    pub(crate) fn reader(&self) -> Arc<dyn StreamReader> {
        match self {
            Stream::Embedded(log) => log.clone(),
            Stream::EmbeddedView(view) => view.clone(),
            Stream::Kinesis { reader, .. } => reader.clone(),
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

/// The shared AWS configuration, with the credentials checked: a config naming AWS with
/// no credentials fails at start, saying so, instead of failing every call later.
pub(crate) async fn aws_sdk(config: &Config, service: &str) -> Result<aws_config::SdkConfig> {
    let sdk = floodgate_aws::client::sdk_config(&config.aws).await;
    floodgate_aws::client::check_credentials(&sdk)
        .await
        .map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
    Ok(sdk)
}

/// The Kinesis stream of `[stream.kinesis]`, checked to exist and be readable: an
/// unreachable endpoint or a missing stream fails here, naming the service and why.
async fn kinesis(config: &Config, with_writer: bool) -> Result<Stream> {
    let k = &config.stream.kinesis;
    let (writer, reader) = open_kinesis(config, &k.stream_name, with_writer).await?;
    Ok(Stream::Kinesis { writer, reader })
}

/// The Kinesis stream `name` (the events', or the quarantine's), once it is usable.
async fn open_kinesis(
    config: &Config,
    name: &str,
    with_writer: bool,
) -> Result<(Option<Arc<KinesisWriter>>, Arc<KinesisReader>)> {
    let k = &config.stream.kinesis;
    let sdk = aws_sdk(config, "kinesis").await?;
    let client = floodgate_aws::client::kinesis(&sdk, k.endpoint_url.as_deref());
    // ACTIVE or UPDATING (a reshard in progress) are both usable; a stream still being
    // created is waited for; anything else (missing, being deleted) is an error.
    let started = std::time::Instant::now();
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "kinesis stream {name:?} is not usable (create it with `floodgate aws init`): {}",
                    floodgate_aws::client::describe(&e)
                )
            })?;
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_owned())
            .unwrap_or_default();
        match status.as_str() {
            "ACTIVE" | "UPDATING" => break,
            "CREATING" if started.elapsed() < std::time::Duration::from_secs(300) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => anyhow::bail!("kinesis stream {name:?} is not usable: its status is {other}"),
        }
    }
    let writer = with_writer.then(|| {
        Arc::new(KinesisWriter::new(
            client.clone(),
            KinesisWriterConfig::new(name.to_owned(), k.aggregation),
        ))
    });
    let reader = Arc::new(KinesisReader::new(
        client,
        KinesisReaderConfig::new(name.to_owned()),
    ));
    Ok((writer, reader))
}

/// The quarantine role: where the edge keeps every event it rejects (and every unreadable
/// body) before it answers, and where the lake's `quarantine` consumer reads them. It
/// follows the stream: beside the embedded log, a one-shard log on the same disk; beside
/// Kinesis, a one-shard Kinesis stream of its own, since an edge there has no durable disk
/// and its workers no shared one.
#[derive(Debug)]
pub(crate) enum Quarantine {
    /// The local log, written (and read) by this process: `serve`, `ingest`.
    Embedded(Arc<EmbeddedLog>),
    /// The local log another process writes (`process`); `None` before it exists.
    EmbeddedView(Option<Arc<EmbeddedLogReader>>),
    /// `[stream.kinesis] quarantine_stream_name`; workers open it without a writer.
    Kinesis {
        writer: Option<Arc<KinesisWriter>>,
        reader: Arc<KinesisReader>,
    },
}

impl Quarantine {
    /// The quarantine as the edge opens it: for appending (and, in `serve`, reading).
    pub(crate) async fn for_edge(config: &Config) -> Result<Self> {
        match config.stream.backend {
            StreamBackend::Embedded => {
                let root = config.data_dir.join("quarantine");
                let mut c = config.stream.embedded.clone();
                c.shards = 1;
                let log = EmbeddedLog::open(&root, &c)
                    .with_context(|| format!("cannot open the quarantine at {}", root.display()))?;
                Ok(Quarantine::Embedded(Arc::new(log)))
            }
            StreamBackend::Kinesis => {
                let name = config.stream.kinesis.quarantine_stream();
                let (writer, reader) = open_kinesis(config, &name, true).await?;
                Ok(Quarantine::Kinesis { writer, reader })
            }
        }
    }

    /// The quarantine as workers that do not write it open it (`process`).
    pub(crate) async fn for_workers(config: &Config) -> Result<Self> {
        match config.stream.backend {
            StreamBackend::Embedded => {
                let root = config.data_dir.join("quarantine");
                Ok(Quarantine::EmbeddedView(
                    match EmbeddedLogReader::open(&root) {
                        Ok(r) => Some(Arc::new(r)),
                        Err(e) => {
                            tracing::warn!(error = %e, "no quarantine log to read (yet); the quarantine table is not written");
                            None
                        }
                    },
                ))
            }
            StreamBackend::Kinesis => {
                let name = config.stream.kinesis.quarantine_stream();
                let (_, reader) = open_kinesis(config, &name, false).await?;
                Ok(Quarantine::Kinesis {
                    writer: None,
                    reader,
                })
            }
        }
    }

    /// The edge's side; `None` for a read-only view.
    pub(crate) fn writer(&self) -> Option<Arc<dyn StreamWriter>> {
        match self {
            Quarantine::Embedded(log) => Some(log.clone()),
            Quarantine::EmbeddedView(_) => None,
            Quarantine::Kinesis { writer, .. } => {
                writer.clone().map(|w| w as Arc<dyn StreamWriter>)
            }
        }
    }

    /// The lake's side; `None` while there is nothing to read.
    pub(crate) fn reader(&self) -> Option<Arc<dyn StreamReader>> {
        match self {
            Quarantine::Embedded(log) => Some(log.clone()),
            Quarantine::EmbeddedView(view) => view.clone().map(|v| v as Arc<dyn StreamReader>),
            Quarantine::Kinesis { reader, .. } => Some(reader.clone()),
        }
    }

    /// Where the lake's `quarantine` consumer keeps its leases and checkpoints: files
    /// beside the local log (only this machine has it), or, for the Kinesis stream, the
    /// store every worker shares: `shared`, the stream consumers' own (one store per lease
    /// table and process, so a lease is only ever written through one).
    pub(crate) fn checkpoints(
        &self,
        config: &Config,
        shared: &Arc<dyn CheckpointStore>,
    ) -> Result<Arc<dyn CheckpointStore>> {
        match self {
            Quarantine::Embedded(_) | Quarantine::EmbeddedView(_) => {
                local_checkpoints(&config.data_dir.join("quarantine"))
            }
            Quarantine::Kinesis { .. } => Ok(shared.clone()),
        }
    }

    /// Makes everything appended durable and stops appends.
    pub(crate) async fn close(&self) -> Result<()> {
        if let Some(writer) = self.writer() {
            writer
                .close()
                .await
                .context("cannot make the quarantine durable at shutdown")?;
        }
        Ok(())
    }
}

/// The consumer runtime's timing for the configured backends: the embedded log is polled
/// closely and its leases are flocks; a shared stream is paced and its leases expire.
pub(crate) fn runtime_config(config: &Config) -> RuntimeConfig {
    if config.stream.backend == StreamBackend::Embedded
        && config.coordination.backend == CoordinationBackend::Embedded
    {
        RuntimeConfig::default()
    } else {
        let ingest = &config.ingest;
        RuntimeConfig {
            // Many edges write a shared stream, and a Kinesis put whose answer was lost may
            // be written twice: the consumers drop repeats per shard within the edge's
            // dedupe window, up to an eighth of its id budget per shard and consumer.
            repeats: (ingest.dedupe_window_ms > 0).then(|| {
                (
                    std::time::Duration::from_millis(ingest.dedupe_window_ms),
                    (ingest.dedupe_max_ids / 8).max(10_000),
                )
            }),
            ..RuntimeConfig::for_shared_stream(std::time::Duration::from_millis(
                config.coordination.lease_duration_ms,
            ))
        }
    }
}

/// The coordination role: the stream consumers' leases and checkpoints.
#[derive(Debug)]
pub(crate) enum Coordination {
    /// Files with flock beside the embedded log.
    Embedded(Arc<EmbeddedCheckpoints>),
    /// A DynamoDB lease table with KCL's attribute names.
    Dynamodb(Arc<DynamoDbLeases>),
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
                let c = &config.coordination;
                let sdk = aws_sdk(config, "dynamodb").await?;
                let client = floodgate_aws::client::dynamodb(&sdk, c.endpoint_url.as_deref());
                client
                    .describe_table()
                    .table_name(&c.table_name)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "dynamodb lease table {:?} is not usable (create it with `floodgate aws init`): {}",
                            c.table_name,
                            floodgate_aws::client::describe(&e)
                        )
                    })?;
                Ok(Coordination::Dynamodb(Arc::new(DynamoDbLeases::new(
                    client,
                    c.table_name.clone(),
                    std::time::Duration::from_millis(c.lease_duration_ms),
                ))))
            }
        }
    }

    pub(crate) fn store(&self) -> Arc<dyn CheckpointStore> {
        match self {
            Coordination::Embedded(c) => c.clone(),
            Coordination::Dynamodb(c) => c.clone(),
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

/// The lake's object store of `[lake]`: `<data_dir>/lake`, or the S3 bucket (checked
/// to exist: an unreachable endpoint or a missing bucket fails here, naming S3 and why).
pub(crate) async fn lake_store(config: &Config) -> Result<Arc<dyn ObjectStore>> {
    lake_store_at(config, None).await
}

/// [`lake_store`], on S3 under `prefix` instead of `[lake] prefix` when one is given (a
/// rebuild's fresh lake).
pub(crate) async fn lake_store_at(
    config: &Config,
    prefix: Option<&str>,
) -> Result<Arc<dyn ObjectStore>> {
    match config.lake.store {
        LakeStore::Local => {
            let dir = config.data_dir.join("lake");
            Ok(Arc::new(LocalDirStore::open(&dir).with_context(|| {
                format!("cannot open the lake at {}", dir.display())
            })?))
        }
        LakeStore::S3 => {
            let l = &config.lake;
            let sdk = aws_sdk(config, "s3").await?;
            let client = floodgate_aws::client::s3(&sdk, l.endpoint_url.as_deref());
            client
                .head_bucket()
                .bucket(&l.bucket)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "s3 bucket {:?} is not usable (create it with `floodgate aws init`): {}",
                        l.bucket,
                        floodgate_aws::client::describe(&e)
                    )
                })?;
            Ok(Arc::new(S3Store::new(
                client,
                l.bucket.clone(),
                prefix.unwrap_or(&l.prefix),
            )))
        }
    }
}

/// The SQLite state store under `data_dir`, its page cache and memory map sized by
/// `memory` (the memory budget's).
pub(crate) fn open_sqlite_state(
    data_dir: &Path,
    memory: &floodgate_core::config::StateConfig,
) -> Result<Arc<dyn StateStore>> {
    let path = data_dir.join("state").join("state.db");
    Ok(Arc::new(
        SqliteStateStore::open_with(&path, memory)
            .with_context(|| format!("cannot open the state store at {}", path.display()))?,
    ))
}

/// The state role of `[state]`: SQLite in the data directory, or the DynamoDB table
/// (checked to exist: an unreachable endpoint or a missing table fails here, naming
/// DynamoDB and why).
pub(crate) async fn open_state(config: &Config) -> Result<Arc<dyn StateStore>> {
    match config.state.backend {
        StateBackend::Sqlite => open_sqlite_state(&config.data_dir, &config.state),
        StateBackend::Dynamodb => {
            let st = &config.state;
            let sdk = aws_sdk(config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, st.endpoint_url.as_deref());
            client
                .describe_table()
                .table_name(&st.table_name)
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "dynamodb state table {:?} is not usable (create it with `floodgate aws init`): {}",
                        st.table_name,
                        floodgate_aws::client::describe(&e)
                    )
                })?;
            Ok(Arc::new(DynamoDbStateStore::new(
                client,
                st.table_name.clone(),
            )))
        }
    }
}

/// The publish role: where the relay sends derived events.
#[derive(Debug)]
pub(crate) enum Publish {
    /// The derived-event log under `<data_dir>/outbox/`, which the derived events' lake
    /// tables consume.
    Outbox {
        publisher: Arc<EmbeddedOutbox>,
        log: std::path::PathBuf,
    },
    /// An EventBridge bus.
    EventBridge(Arc<EventBridgePublisher>),
}

impl Publish {
    pub(crate) async fn open(config: &Config) -> Result<Self> {
        match config.publish.backend {
            PublishBackend::Outbox => {
                let dir = config.data_dir.join("outbox");
                // The log exists (created, or migrated from an older outbox) before anyone
                // reads it; the relay opens it for writing only once it holds the lease.
                floodgate_sinks::outbox::ensure_log(&dir, &config.publish.outbox).await?;
                Ok(Publish::Outbox {
                    publisher: Arc::new(EmbeddedOutbox::open_with(&dir, &config.publish.outbox)?),
                    log: floodgate_sinks::outbox::log_root(&dir),
                })
            }
            PublishBackend::Eventbridge => {
                let p = &config.publish;
                let sdk = aws_sdk(config, "eventbridge").await?;
                let client = floodgate_aws::client::eventbridge(&sdk, p.endpoint_url.as_deref());
                client
                    .describe_event_bus()
                    .name(&p.event_bus_name)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "eventbridge bus {:?} is not usable (create it with `floodgate aws init`): {}",
                            p.event_bus_name,
                            floodgate_aws::client::describe(&e)
                        )
                    })?;
                Ok(Publish::EventBridge(Arc::new(EventBridgePublisher::new(
                    client,
                    p.event_bus_name.clone(),
                ))))
            }
        }
    }

    pub(crate) fn publisher(&self) -> Arc<dyn Publisher> {
        match self {
            Publish::Outbox { publisher, .. } => publisher.clone(),
            Publish::EventBridge(p) => p.clone(),
        }
    }

    /// The log the derived events' lake tables consume, where there is one.
    pub(crate) fn derived_log(&self) -> Option<&Path> {
        match self {
            Publish::Outbox { log, .. } => Some(log),
            Publish::EventBridge(_) => None,
        }
    }
}

/// The archive role of `[archive]`: where the archive consumer copies accepted events.
#[derive(Debug)]
pub(crate) enum Archive {
    /// No archive (the default).
    None,
    /// A Firehose delivery stream (created by the deployment, not by `aws init`).
    Firehose(Arc<FirehoseArchive>),
}

impl Archive {
    /// The archive of `[archive]`; a Firehose delivery stream is checked to be ACTIVE (one
    /// being created is waited for): an unreachable endpoint or a missing delivery stream
    /// fails here, naming Firehose and why.
    pub(crate) async fn open(config: &Config) -> Result<Self> {
        match config.archive.backend {
            ArchiveBackend::None => Ok(Archive::None),
            ArchiveBackend::Firehose => {
                let a = &config.archive;
                let sdk = aws_sdk(config, "firehose").await?;
                let client = floodgate_aws::client::firehose(&sdk, a.endpoint_url.as_deref());
                floodgate_aws::firehose::wait_active(&client, &a.delivery_stream_name)
                    .await
                    .map_err(|e| anyhow::anyhow!("the archive is not usable: {e}"))?;
                Ok(Archive::Firehose(Arc::new(FirehoseArchive::new(
                    client,
                    a.delivery_stream_name.clone(),
                ))))
            }
        }
    }

    /// The role's trait object; `None` when no archive is configured.
    pub(crate) fn archive(&self) -> Option<Arc<dyn floodgate_core::archive::Archive>> {
        match self {
            Archive::None => None,
            Archive::Firehose(a) => Some(a.clone()),
        }
    }
}
