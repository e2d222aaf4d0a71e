//! `floodgate lake …`: compaction, rebuild from the stream, Athena DDL.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use floodgate_core::config::{Config, CoordinationBackend, LakeStore, PublishBackend};
use floodgate_sinks::{EmbeddedLogReader, LocalDirStore};

use crate::ServeArgs;
use crate::backends::{
    Coordination, Quarantine, Stream, lake_store, lake_store_at, runtime_config,
};
use crate::progress::TerminalProgress;
use crate::setup::{effective_config, load_registry, runtime};

/// `floodgate lake compact`: with the schemas and data directory the configuration (and
/// flags) give, as the server that wrote the lake used them; a compaction under other
/// schemas would drop the columns they lack.
pub(crate) fn compact(
    args: ServeArgs,
    table: &str,
    dt: Option<&str>,
    small_bytes: u64,
) -> Result<()> {
    let config = effective_config(&args)?;
    let registry = load_registry(config.schemas_dir.as_deref())?;
    let tables = floodgate_core::lake::tables(&registry)?;
    let Some(t) = tables.iter().find(|t| t.name == table) else {
        bail!(
            "no lake table {table:?}; tables: {}",
            tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let (parts, files) = runtime()?.block_on(async {
        let store = lake_store(&config).await?;
        let progress = TerminalProgress::new();
        floodgate_processors::compact::compact_table_with(
            &*store,
            table,
            dt,
            &t.schema,
            small_bytes,
            &progress,
        )
        .await
        .map_err(anyhow::Error::from)
    })?;
    eprintln!("compacted {files} files in {parts} partitions of {table}");
    Ok(())
}

/// `floodgate lake rebuild`: replay every shard into a new lake beside the old one, with
/// the old lake's run boundaries, then swap the directories.
///
/// Retention may have deleted the start of a source: a run that begins before the oldest
/// record still held (whole, or cut by retention) cannot be re-derived, so its file is kept
/// as it is and the replay of that shard starts after the run's end. Every other run is
/// written again from the log, with the same name and rows.
pub(crate) fn rebuild(
    data_dir: PathBuf,
    config_path: Option<PathBuf>,
    to_prefix: Option<String>,
) -> Result<()> {
    let config = effective_config(&ServeArgs {
        data_dir: Some(data_dir),
        config: config_path,
        ..ServeArgs::default()
    })?;
    let registry = load_registry(config.schemas_dir.as_deref())?;
    let tables = floodgate_core::lake::tables(&registry)?;
    match (config.lake.store, to_prefix) {
        (LakeStore::S3, to_prefix) => return rebuild_on_s3(&config, &tables, to_prefix),
        (LakeStore::Local, Some(_)) => {
            bail!("--to-prefix is for a lake on S3; a local lake is rebuilt in place")
        }
        (LakeStore::Local, None) => {}
    }
    runtime()?.block_on(async move {
        // The embedded log is opened for writing, which takes its lock: a running server
        // makes this fail.
        let stream = Stream::for_edge(&config)
            .await
            .context("cannot open the stream (stop the server first)")?;
        let log = stream.reader();
        let quarantine = Quarantine::for_edge(&config).await?;
        let quarantine_log = quarantine
            .reader()
            .context("the quarantine has no log to read")?;
        let outbox_dir = config.data_dir.join("outbox");
        floodgate_sinks::outbox::ensure_log(&outbox_dir, &config.publish.outbox).await?;
        let outbox = EmbeddedLogReader::open(&floodgate_sinks::outbox::log_root(&outbox_dir))?;
        let lake_dir = config.data_dir.join("lake");
        let old = LocalDirStore::open(&lake_dir)?;
        let fresh_dir = config
            .data_dir
            .join(format!(".lake.rebuild-{}", std::process::id()));
        if fresh_dir.exists() {
            std::fs::remove_dir_all(&fresh_dir)?;
        }
        let fresh = Arc::new(LocalDirStore::open(&fresh_dir)?);
        let progress = TerminalProgress::new();
        let sources = floodgate_processors::rebuild::Sources {
            stream: &*log,
            quarantine: &*quarantine_log,
            derived: Some(&outbox),
            repeats: runtime_config(&config).repeats,
            progress: &progress,
        };
        let rebuilt = floodgate_processors::rebuild::rebuild(
            sources,
            &old,
            fresh,
            &tables,
            config.lake.roll_bytes,
        )
        .await?;
        drop(progress);
        stream.close().await?;
        quarantine.close().await?;
        if rebuilt.kept > 0 {
            eprintln!(
                "kept {} files whose runs start before what their source still holds",
                rebuilt.kept
            );
        }
        if rebuilt.compactions > 0 {
            eprintln!("re-applied {} compactions", rebuilt.compactions);
        }
        // Swap: the old lake steps aside, the new one takes its name, the old one goes.
        let aside = config
            .data_dir
            .join(format!(".lake.old-{}", std::process::id()));
        if lake_dir.exists() {
            std::fs::rename(&lake_dir, &aside)?;
        }
        std::fs::rename(&fresh_dir, &lake_dir)?;
        std::fs::File::open(&config.data_dir)?.sync_all()?;
        if aside.exists() {
            std::fs::remove_dir_all(&aside)?;
        }
        eprintln!(
            "rebuilt {} from {} records in {} shards",
            lake_dir.display(),
            rebuilt.records,
            rebuilt.stream_shards
        );
        Ok(())
    })
}

/// `floodgate lake rebuild` of a lake on S3: S3 has no rename, and readers (Athena,
/// DuckDB) list a prefix as they find it, so the rebuilt lake is written under a prefix of
/// its own (`to_prefix`, which must be empty; default `<prefix>-rebuilt-<unix seconds>/`)
/// and the lake at `[lake] prefix` is left as it is. Switching is the operator's: stop the
/// workers, set `[lake] prefix` to the new one, point the tables at it, start the workers.
/// The sources are the configured stream and quarantine (Kinesis: what the streams still
/// retain; older runs are copied as they are), and the derived-event log where there is
/// one (published to EventBridge, derived events have no lake tables of their own).
fn rebuild_on_s3(
    config: &Config,
    tables: &[floodgate_core::lake::Table],
    to_prefix: Option<String>,
) -> Result<()> {
    let l = &config.lake;
    let old_prefix = l.prefix.trim_matches('/').to_owned();
    let to = match to_prefix {
        Some(p) => p.trim_matches('/').to_owned(),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("{old_prefix}-rebuilt-{now}")
        }
    };
    if to.is_empty() || to == old_prefix {
        bail!(
            "rebuild into a prefix of its own: {to:?} is the lake's ([lake] prefix = {:?})",
            l.prefix
        );
    }
    let to = format!("{to}/");
    let (bucket, shown) = (l.bucket.clone(), l.prefix.clone());
    runtime()?.block_on(async move {
        let old = lake_store(config).await?;
        let fresh = lake_store_at(config, Some(&to)).await?;
        // Nested prefixes would make each lake list the other's files.
        let nested = to.starts_with(&format!("{old_prefix}/"))
            || (!old_prefix.is_empty() && old_prefix.starts_with(to.trim_end_matches('/')));
        if nested || old_prefix.is_empty() {
            bail!(
                "s3://{bucket}/{to} and the lake's prefix {shown:?} must not contain one \
                 another; choose a sibling prefix"
            );
        }
        if !fresh.list("").await?.is_empty() {
            bail!("s3://{bucket}/{to} holds objects already; rebuild into an empty prefix");
        }
        refuse_while_lake_workers_run(config).await?;
        let stream = Stream::for_workers(config).await?;
        let log = stream.reader();
        let quarantine = Quarantine::for_workers(config).await?;
        let quarantine_log = quarantine
            .reader()
            .context("the quarantine has no log to read")?;
        let outbox = match config.publish.backend {
            PublishBackend::Outbox => {
                let dir = config.data_dir.join("outbox");
                Some(EmbeddedLogReader::open(
                    &floodgate_sinks::outbox::log_root(&dir),
                )?)
            }
            PublishBackend::Eventbridge => None,
        };
        let progress = TerminalProgress::new();
        let sources = floodgate_processors::rebuild::Sources {
            stream: &*log,
            quarantine: &*quarantine_log,
            derived: outbox
                .as_ref()
                .map(|o| o as &dyn floodgate_core::stream::StreamReader),
            repeats: runtime_config(config).repeats,
            progress: &progress,
        };
        let rebuilt = floodgate_processors::rebuild::rebuild(
            sources,
            &*old,
            fresh,
            tables,
            config.lake.roll_bytes,
        )
        .await?;
        drop(progress);
        if rebuilt.kept > 0 {
            eprintln!(
                "kept {} files whose runs start before what their source still holds",
                rebuilt.kept
            );
        }
        if rebuilt.compactions > 0 {
            eprintln!("re-applied {} compactions", rebuilt.compactions);
        }
        eprintln!(
            "rebuilt s3://{bucket}/{to} from {} records in {} shards; the lake at \
             s3://{bucket}/{shown} is unchanged. To switch: stop the workers, set [lake] \
             prefix = \"{to}\", point the tables at it (floodgate lake ddl --location \
             s3://{bucket}/{to}), start the workers, then delete the old prefix.",
            rebuilt.records, rebuilt.stream_shards
        );
        Ok(())
    })
}

/// A rebuild reads the streams while no worker writes the lake: rows written after the
/// replay reached a stream's end would be in the old lake only. With shared leases, a
/// lease that names an owner is watched for one lease duration; a worker renewing it
/// refuses the rebuild.
async fn refuse_while_lake_workers_run(config: &Config) -> Result<()> {
    if config.coordination.backend != CoordinationBackend::Dynamodb {
        return Ok(());
    }
    let store = Coordination::open(config).await?.store();
    let consumers = ["lake", "lake-quarantine"];
    let mut owned = 0;
    for c in consumers {
        owned += store
            .leases(c)
            .await?
            .iter()
            .filter(|l| l.owner.is_some())
            .count();
    }
    if owned == 0 {
        return Ok(());
    }
    let wait = std::time::Duration::from_millis(config.coordination.lease_duration_ms + 1000);
    eprintln!(
        "{owned} lake leases name an owner; watching them for {} s to see whether a worker \
         still renews them",
        wait.as_secs()
    );
    tokio::time::sleep(wait).await;
    for c in consumers {
        if let Some(l) = store.leases(c).await?.into_iter().find(|l| l.live) {
            bail!(
                "a worker ({}) holds the lease of {c} on shard {}: stop the workers before \
                 rebuilding the lake",
                l.owner.as_deref().unwrap_or("?"),
                l.shard
            );
        }
    }
    Ok(())
}

/// `floodgate lake ddl`: one statement per table, in table-name order.
pub(crate) fn ddl(location: &str, schemas: Option<&Path>) -> Result<()> {
    let registry = load_registry(schemas)?;
    let mut tables = floodgate_core::lake::tables(&registry)?;
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut derived = floodgate_core::lake::derived_tables(
        &floodgate_processors::bookings::DERIVED_TYPES,
        &floodgate_processors::bookings::derived_data_schema(),
        &tables,
    )?;
    derived.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "-- Athena DDL for the Floodgate lake at {location}; generated by `floodgate lake ddl`."
    )?;
    for t in tables {
        writeln!(out, "\n-- {} events", t.event_type)?;
        write!(
            out,
            "{}",
            floodgate_core::lake::athena_ddl(&t.name, &t.schema, location)
        )?;
    }
    for t in derived {
        writeln!(
            out,
            "\n-- {} events, derived by the processors",
            t.event_type
        )?;
        write!(
            out,
            "{}",
            floodgate_core::lake::athena_ddl(&t.name, &t.schema, location)
        )?;
    }
    writeln!(
        out,
        "\n-- every event the edge rejected: its raw bytes, the reasons, when it arrived"
    )?;
    write!(
        out,
        "{}",
        floodgate_core::lake::athena_ddl(
            floodgate_core::lake::QUARANTINE_TABLE,
            &floodgate_core::lake::quarantine_schema(),
            location
        )
    )?;
    Ok(())
}
