//! `floodgate lake …`: compaction, rebuild from the stream, Athena DDL.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use floodgate_sinks::{EmbeddedLogReader, LocalDirStore};

use crate::ServeArgs;
use crate::backends::{Quarantine, Stream, lake_store};
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
        floodgate_processors::compact::compact_table(&*store, table, dt, &t.schema, small_bytes)
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
pub(crate) fn rebuild(data_dir: PathBuf, config_path: Option<PathBuf>) -> Result<()> {
    let config = effective_config(&ServeArgs {
        listen: None,
        data_dir: Some(data_dir),
        config: config_path,
        schemas: None,
        shards: None,
        insecure_no_auth: false,
    })?;
    if config.lake.store != floodgate_core::config::LakeStore::Local {
        bail!(
            "lake rebuild replays the embedded log into <data_dir>/lake and swaps the \
             directories; it does not rebuild a lake on S3 ([lake] store = \"s3\")"
        );
    }
    let registry = load_registry(config.schemas_dir.as_deref())?;
    let tables = floodgate_core::lake::tables(&registry)?;
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
        let sources = floodgate_processors::rebuild::Sources {
            stream: &*log,
            quarantine: &*quarantine_log,
            derived: &outbox,
        };
        let rebuilt = floodgate_processors::rebuild::rebuild(
            sources,
            &old,
            fresh,
            &tables,
            config.lake.roll_bytes,
        )
        .await?;
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
