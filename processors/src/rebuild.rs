//! The replay behind `floodgate lake rebuild`, over any stream readers and object stores:
//! every source (the stream, the quarantine log, the derived-event log) is replayed into a
//! fresh lake with the old lake's run boundaries, so that files come out with the same
//! names and rows. Swapping the fresh lake in is the caller's (a directory rename for the
//! local lake; on S3, pointing `[lake] prefix` at the fresh prefix).
//!
//! Retention may have deleted the start of a source: a run that begins before the oldest
//! record still held (whole, or cut by retention) cannot be re-derived, so its file is kept
//! as it is and the replay of that shard starts after the run's end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use floodgate_core::lake::{QUARANTINE_TABLE, Table};
use floodgate_core::object_store::ObjectStore;
use floodgate_core::progress::{Progress, Unit};
use floodgate_core::stream::{SequenceNumber, ShardId, StartPosition, StreamReader};

use crate::compact;
use crate::lake::{LakeConfig, LakeProcessor, parse_file_name, runs_in, runs_of_consumer};
use crate::runtime::{ProcessError, ShardProcessor};

fn store_err(e: impl std::fmt::Display) -> ProcessError {
    ProcessError::Other(e.to_string())
}

/// The logs a lake is derived from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    pub stream: &'a dyn StreamReader,
    pub quarantine: &'a dyn StreamReader,
    /// The derived-event log; `None` where derived events go to EventBridge, which cannot
    /// be read back (the lake then has no derived tables of its own to rebuild).
    pub derived: Option<&'a dyn StreamReader>,
    /// The live consumers' repeat dropping (span, ids per shard) where the stream is shared
    /// (Kinesis): the replay drops the same repeats, or it would write them, and a run
    /// starting at a dropped repeat under another name.
    pub repeats: Option<(std::time::Duration, usize)>,
    /// Told of each shard replayed and the records replayed.
    pub progress: &'a dyn Progress,
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Records of the stream replayed.
    pub records: u64,
    pub stream_shards: usize,
    /// Files kept as they were (their runs start before what their source still holds).
    pub kept: usize,
    /// The old lake's compactions applied again.
    pub compactions: usize,
}

/// The lake consumer of derived events: one table per derived type.
pub fn derived_processor(
    store: Arc<dyn ObjectStore>,
    ingested: &[Table],
    config: LakeConfig,
) -> Result<LakeProcessor, ProcessError> {
    let tables = floodgate_core::lake::derived_tables(
        &crate::bookings::DERIVED_TYPES,
        &crate::bookings::derived_data_schema(),
        ingested,
    )
    .map_err(store_err)?;
    Ok(LakeProcessor::new(store, tables, config).named("lake-derived"))
}

/// Replays `sources` into `fresh` (empty), keeping the runs of `old` that cannot be
/// re-derived, and re-applies `old`'s compactions. `tables` are the typed tables;
/// `roll_bytes` bounds a buffer, as the server's `lake.roll_bytes` did.
pub async fn rebuild(
    sources: Sources<'_>,
    old: &dyn ObjectStore,
    fresh: Arc<dyn ObjectStore>,
    tables: &[Table],
    roll_bytes: u64,
) -> Result<Rebuilt, ProcessError> {
    let replay_config = LakeConfig {
        roll_bytes,
        roll_age: std::time::Duration::MAX,
    };
    let lake = LakeProcessor::new(fresh.clone(), tables.to_vec(), replay_config.clone());
    let held = LakeProcessor::quarantine(fresh.clone(), replay_config.clone());
    let derived = derived_processor(fresh.clone(), tables, replay_config)?;
    let table_names = lake.table_names();
    let derived_names = derived.table_names();
    let q_table = vec![QUARANTINE_TABLE.to_owned()];
    let readers: [Option<&dyn StreamReader>; 3] = [
        Some(sources.stream),
        Some(sources.quarantine),
        sources.derived,
    ];
    let mut shards: [Vec<ShardId>; 3] = Default::default();
    for (i, reader) in readers.iter().enumerate() {
        if let Some(reader) = reader {
            shards[i] = reader.shards().await?.into_iter().map(|s| s.id).collect();
        }
    }
    // Each table directory holds the runs of known sources, told apart by the file
    // name's prefix: the stream's shards in the typed tables, the outbox's in the
    // derived tables; in `quarantine`, the quarantine log's shards and the rows the
    // stream's and the outbox's consumers diverted there (`<consumer>.<shard>-…`).
    let mut runs_of = Vec::new();
    for shard in &shards[0] {
        runs_of.push(RunSource {
            tables: &table_names,
            prefix: shard.0.clone(),
            log: 0,
            shard: shard.clone(),
        });
        runs_of.push(RunSource {
            tables: &q_table,
            prefix: format!("lake.{}", shard.0),
            log: 0,
            shard: shard.clone(),
        });
    }
    for shard in &shards[1] {
        runs_of.push(RunSource {
            tables: &q_table,
            prefix: shard.0.clone(),
            log: 1,
            shard: shard.clone(),
        });
    }
    for shard in &shards[2] {
        runs_of.push(RunSource {
            tables: &derived_names,
            prefix: shard.0.clone(),
            log: 2,
            shard: shard.clone(),
        });
        runs_of.push(RunSource {
            tables: &q_table,
            prefix: format!("lake-derived.{}", shard.0),
            log: 2,
            shard: shard.clone(),
        });
    }
    // Runs an older floodgate wrote from its NDJSON outbox (shard `outbox`, sequences
    // seq × 1,000,000 + i) have no source any more: their events were migrated into
    // the derived-event log under new sequence numbers. They are kept as they are.
    let legacy = [
        (&derived_names, "outbox".to_owned()),
        (&q_table, "lake-derived.outbox".to_owned()),
    ];
    let mut heads: HashMap<(usize, ShardId), Option<SequenceNumber>> = HashMap::new();
    for (i, reader) in readers.iter().enumerate() {
        let Some(reader) = reader else { continue };
        for shard in &shards[i] {
            heads.insert((i, shard.clone()), head_of(*reader, shard).await?);
        }
    }
    // Keep the runs that start before their source's head; replay after their end.
    let mut skip: [HashMap<ShardId, SequenceNumber>; 3] = Default::default();
    let mut kept = 0;
    // Only the directories of the tables the sources write are listed, each by its prefix
    // (on S3 the rest of the bucket may be large, and nothing there is a run).
    let mut listed: Vec<&String> = table_names
        .iter()
        .chain(&derived_names)
        .chain(&q_table)
        .collect();
    listed.sort_unstable();
    listed.dedup();
    let mut objects = Vec::new();
    for table in listed {
        objects.extend(old.list(&format!("{table}/")).await.map_err(store_err)?);
    }
    for object in objects {
        let Some((table, _)) = object.key.split_once('/') else {
            continue;
        };
        let name = object.key.rsplit('/').next().unwrap_or("");
        let is_legacy = legacy.iter().any(|(tables, prefix)| {
            tables.iter().any(|t| t == table) && parse_file_name(name, prefix).is_some()
        });
        if is_legacy {
            if let Some(bytes) = old.get(&object.key).await.map_err(store_err)? {
                fresh.put(&object.key, bytes).await.map_err(store_err)?;
                kept += 1;
            }
            continue;
        }
        let mut attributed = false;
        for src in &runs_of {
            if !src.tables.iter().any(|t| t == table) {
                continue;
            }
            let Some((first, last)) = parse_file_name(name, &src.prefix) else {
                continue;
            };
            attributed = true;
            let head = heads.get(&(src.log, src.shard.clone())).cloned().flatten();
            if head.is_some_and(|h| SequenceNumber::new(first) >= h) {
                continue; // the log still holds the whole run: it is written again
            }
            if let Some(bytes) = old.get(&object.key).await.map_err(store_err)? {
                fresh.put(&object.key, bytes).await.map_err(store_err)?;
                kept += 1;
            }
            let last = SequenceNumber::new(last);
            let s = skip[src.log]
                .entry(src.shard.clone())
                .or_insert_with(|| last.clone());
            if *s < last {
                *s = last;
            }
        }
        // A run of no source listed now (a parent shard past retention that the stream no
        // longer lists, an older layout's quarantine log): nothing replays it, so it is
        // kept as it is. Never dropped: the operator deletes the old lake afterwards.
        // (Compacted files and manifests are made again by the compactions re-applied.)
        if !attributed
            && name != compact::MANIFEST
            && !name.starts_with("c-")
            && let Some(bytes) = old.get(&object.key).await.map_err(store_err)?
        {
            fresh.put(&object.key, bytes).await.map_err(store_err)?;
            kept += 1;
            tracing::info!(key = %object.key, "kept a lake file of no source the replay reads");
        }
    }
    // Replay each source into the fresh lake, ending runs where the old lake's did.
    // (The stream's and the derived-event log's shards are both named `0`: each
    // consumer's runs are told apart by the tables and by its name on diverted rows.)
    let name = lake.consumer_name();
    let lake = lake.with_runs(runs_of_consumer(old, &shards[0], &table_names, name).await?);
    let held = held.with_runs(runs_in(old, &shards[1], &q_table).await?);
    let name = derived.consumer_name();
    let derived = derived.with_runs(runs_of_consumer(old, &shards[2], &derived_names, name).await?);
    let progress = sources.progress;
    let records = replay_all(
        ("stream", sources.stream),
        &shards[0],
        &skip[0],
        &lake,
        sources.repeats,
        progress,
    )
    .await?;
    replay_all(
        ("quarantine", sources.quarantine),
        &shards[1],
        &skip[1],
        &held,
        None,
        progress,
    )
    .await?;
    if let Some(reader) = sources.derived {
        replay_all(
            ("derived events", reader),
            &shards[2],
            &skip[2],
            &derived,
            None,
            progress,
        )
        .await?;
    }
    let compactions = reapply_compactions(old, &*fresh, tables).await?;
    Ok(Rebuilt {
        records,
        stream_shards: shards[0].len(),
        kept,
        compactions,
    })
}

/// Re-applies the old lake's finished compactions to the rebuilt one, in an order where
/// every plan's inputs exist (a compacted file may itself have been compacted later).
async fn reapply_compactions(
    old: &dyn ObjectStore,
    fresh: &dyn ObjectStore,
    tables: &[Table],
) -> Result<usize, ProcessError> {
    let mut applied = 0;
    for t in tables {
        for partition in compact::partitions(old, &t.name, None).await? {
            let mut plans: Vec<compact::Plan> = compact::manifest(old, &partition)
                .await?
                .compacted
                .into_values()
                .filter(|p| p.done)
                .collect();
            while !plans.is_empty() {
                let present: HashSet<String> = fresh
                    .list(&format!("{partition}/"))
                    .await
                    .map_err(store_err)?
                    .into_iter()
                    .filter_map(|o| o.key.rsplit('/').next().map(str::to_owned))
                    .collect();
                let Some(i) = plans
                    .iter()
                    .position(|p| p.inputs.iter().all(|n| present.contains(n)))
                else {
                    return Err(ProcessError::Other(format!(
                        "{partition}: a recorded compaction's inputs were not rebuilt"
                    )));
                };
                let plan = plans.swap_remove(i);
                compact::apply(fresh, &partition, plan.inputs, &t.schema).await?;
                applied += 1;
            }
        }
    }
    Ok(applied)
}

/// Whether an empty read means there is nothing more to read: a local log is read to its
/// end at once, but Kinesis answers empty reads over stretches of a shard that hold no
/// records (retention, quiet hours) until it says it is at the tip (`MillisBehindLatest`
/// 0) or the shard is closed and read to its end (no next position).
fn read_to_the_end(batch: &floodgate_core::stream::ReadBatch) -> bool {
    batch.records.is_empty() && (batch.next.is_none() || batch.millis_behind.unwrap_or(0) == 0)
}

/// The sequence of the oldest record `reader` still holds in `shard`, if any.
async fn head_of(
    reader: &dyn StreamReader,
    shard: &ShardId,
) -> Result<Option<SequenceNumber>, ProcessError> {
    let mut position = StartPosition::TrimHorizon;
    loop {
        let batch = reader.read(shard, &position, 1).await?;
        if let Some(first) = batch.records.first() {
            return Ok(Some(first.sequence.clone()));
        }
        if read_to_the_end(&batch) {
            return Ok(None);
        }
        position = batch.next.unwrap_or(position);
    }
}

/// Feeds every record of `shards` after `skip` (per shard) to `processor` from the oldest,
/// then flushes. Returns the records fed.
async fn replay_all(
    (name, reader): (&str, &dyn StreamReader),
    shards: &[ShardId],
    skip: &HashMap<ShardId, SequenceNumber>,
    processor: &LakeProcessor,
    repeats: Option<(std::time::Duration, usize)>,
    progress: &dyn Progress,
) -> Result<u64, ProcessError> {
    let mut records = 0u64;
    for shard in shards {
        progress.stage(
            &format!("replaying {name} shard {shard}"),
            None,
            Unit::Records,
        );
        let mut replayed = 0u64;
        let mut position = match skip.get(shard) {
            Some(s) => StartPosition::After(s.clone()),
            None => StartPosition::TrimHorizon,
        };
        let mut repeats = repeats.map(|(span, ids)| crate::repeats::Repeats::new(span, ids));
        if let (Some(r), StartPosition::After(from)) = (repeats.as_mut(), &position) {
            r.seed(reader, shard, from).await?;
        }
        loop {
            let batch = reader.read(shard, &position, 10_000).await?;
            let Some(last) = batch.records.last() else {
                if read_to_the_end(&batch) {
                    break;
                }
                position = batch.next.unwrap_or(position);
                continue;
            };
            records += batch.records.len() as u64;
            replayed += batch.records.len() as u64;
            progress.total(replayed + batch.records_behind);
            progress.advance(batch.records.len() as u64);
            match repeats.as_mut() {
                Some(r) => {
                    let kept = r.filter(&batch.records);
                    if !kept.is_empty() {
                        processor.process(shard, &kept).await?;
                    }
                }
                None => processor.process(shard, &batch.records).await?,
            }
            position = batch
                .next
                .unwrap_or(StartPosition::After(last.sequence.clone()));
        }
        processor.tick(shard, true).await?;
    }
    Ok(records)
}

/// Where the runs of one source (a shard of the stream, the quarantine log or the outbox)
/// live in the lake: the tables, and the file-name prefix of its runs there.
struct RunSource<'a> {
    tables: &'a [String],
    prefix: String,
    /// Which replay the shard belongs to (0 stream, 1 quarantine, 2 outbox) and the shard.
    log: usize,
    shard: ShardId,
}
