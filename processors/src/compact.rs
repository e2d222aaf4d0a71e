//! Compaction: the small files of one lake partition merged into one, through the
//! `ObjectStore` role.
//!
//! Each partition keeps a manifest, `_compaction.json` (query engines skip `_` names):
//! for every compacted file, the files it replaced, and whether the replacement finished.
//! The steps, each atomic:
//! 1. record the plan (`pending`) in the manifest;
//! 2. write the compacted file (create-only: one that exists already is kept);
//! 3. delete the inputs;
//! 4. mark the plan `done`.
//!
//! [`recover`] finishes an interrupted plan (its compacted file exists: delete the inputs)
//! or forgets it (it does not: the inputs are intact), so after any interruption the next
//! run leaves each row exactly once. The lake writer consults the manifest and never
//! writes again a run that a compacted file holds, so a replay cannot duplicate rows, and
//! `lake rebuild` re-applies the recorded plans to the replayed runs.

use std::collections::BTreeMap;

use arrow_array::{RecordBatch, new_null_array};
use arrow_schema::SchemaRef;
use bytes::Bytes;
use floodgate_core::object_store::ObjectStore;
use floodgate_core::progress::{Progress, Quiet, Unit};
use floodgate_core::stream::SequenceNumber;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::parquet::writer_properties;
use crate::runtime::ProcessError;

/// The manifest's name inside a partition.
pub const MANIFEST: &str = "_compaction.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Compacted file name → its plan.
    pub compacted: BTreeMap<String, Plan>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Plan {
    /// The names (within the partition) of the files merged, in merge order.
    pub inputs: Vec<String>,
    pub done: bool,
}

impl Manifest {
    /// Whether `name` is held by a finished compaction.
    pub fn covers(&self, name: &str) -> bool {
        self.compacted
            .values()
            .any(|p| p.done && p.inputs.iter().any(|i| i == name))
    }
}

fn err(e: impl std::fmt::Display) -> ProcessError {
    ProcessError::Other(e.to_string())
}

/// The manifest of `partition` (`table/dt=…/hour=…`), empty when there is none.
pub async fn manifest(store: &dyn ObjectStore, partition: &str) -> Result<Manifest, ProcessError> {
    match store
        .get(&format!("{partition}/{MANIFEST}"))
        .await
        .map_err(err)?
    {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(err),
        None => Ok(Manifest::default()),
    }
}

async fn save(store: &dyn ObjectStore, partition: &str, m: &Manifest) -> Result<(), ProcessError> {
    let bytes = serde_json::to_vec_pretty(m).map_err(err)?;
    store
        .put(&format!("{partition}/{MANIFEST}"), Bytes::from(bytes))
        .await
        .map_err(err)
}

/// Finishes or forgets interrupted plans of `partition`.
pub async fn recover(store: &dyn ObjectStore, partition: &str) -> Result<(), ProcessError> {
    let mut m = manifest(store, partition).await?;
    let pending: Vec<(String, Plan)> = m
        .compacted
        .iter()
        .filter(|(_, p)| !p.done)
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    for (name, plan) in pending {
        let exists = store
            .get(&format!("{partition}/{name}"))
            .await
            .map_err(err)?
            .is_some();
        if exists {
            for input in &plan.inputs {
                store
                    .delete(&format!("{partition}/{input}"))
                    .await
                    .map_err(err)?;
            }
            if let Some(p) = m.compacted.get_mut(&name) {
                p.done = true;
            }
        } else {
            m.compacted.remove(&name);
        }
    }
    save(store, partition, &m).await
}

/// Merges `inputs` (file names within `partition`, in this order) into one file under
/// `schema`, filling columns an older file lacks with nulls. Returns the bytes.
pub async fn merge(
    store: &dyn ObjectStore,
    partition: &str,
    inputs: &[String],
    schema: &SchemaRef,
) -> Result<Bytes, ProcessError> {
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, schema.clone(), Some(writer_properties())).map_err(err)?;
    for name in inputs {
        let Some(bytes) = store
            .get(&format!("{partition}/{name}"))
            .await
            .map_err(err)?
        else {
            return Err(err(format!(
                "{partition}/{name} vanished during compaction"
            )));
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(err)?
            .build()
            .map_err(err)?;
        for batch in reader {
            let batch = batch.map_err(err)?;
            let columns = schema
                .fields()
                .iter()
                .map(|f| match batch.column_by_name(f.name()) {
                    Some(c) if c.data_type() == f.data_type() => c.clone(),
                    _ => new_null_array(f.data_type(), batch.num_rows()),
                })
                .collect();
            writer
                .write(&RecordBatch::try_new(schema.clone(), columns).map_err(err)?)
                .map_err(err)?;
        }
    }
    writer.close().map_err(err)?;
    Ok(Bytes::from(out))
}

/// The run a lake file holds: `(stem, first, last)` of `<stem>-<first>-<last>.parquet`
/// (the stem is the shard, or `<consumer>.<shard>` for rows a consumer diverted to the
/// quarantine), and of a compacted `c-<stem>-<lo>-<hi>-<n>.parquet`. `None` for a name of
/// neither form (a compacted file of an older version, `c-<lo>-<hi>-<n>`, has no stem).
///
/// `first` and `last` are the stream's sequence numbers, opaque decimals of any length
/// (Kinesis': about 56 digits, and 62 with the subsequence Floodgate appends), compared
/// as [`SequenceNumber`]s: never parsed into a fixed-width integer.
pub fn run_of(name: &str) -> Option<(&str, SequenceNumber, SequenceNumber)> {
    let stem = name.strip_suffix(".parquet")?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| SequenceNumber::new(s))
    };
    if let Some(compacted) = stem.strip_prefix("c-") {
        let mut parts = compacted.rsplitn(4, '-');
        let (_n, hi, lo, stem) = (
            number(parts.next()?)?,
            number(parts.next()?)?,
            number(parts.next()?)?,
            parts.next()?,
        );
        return Some((stem, lo, hi));
    }
    let mut parts = stem.rsplitn(3, '-');
    let (last, first, stem) = (
        number(parts.next()?)?,
        number(parts.next()?)?,
        parts.next()?,
    );
    (!stem.is_empty()).then_some((stem, first, last))
}

/// The name of the file replacing `inputs`: `c-<stem>-<lo>-<hi>-<n>.parquet`, their
/// shard's (stem's) smallest start, largest end, and how many there were. Deterministic, so
/// a rebuild names it the same; and it names the shard, so two shards' compactions in one
/// partition never take the same name. (Inputs of several stems, as plans recorded by an
/// older version may hold, join theirs with `+`.)
pub fn compacted_name(inputs: &[String]) -> String {
    let mut stems: Vec<&str> = Vec::new();
    let mut lo: Option<SequenceNumber> = None;
    let mut hi: Option<SequenceNumber> = None;
    for name in inputs {
        if let Some((stem, f, l)) = run_of(name) {
            if !stems.contains(&stem) {
                stems.push(stem);
            }
            lo = Some(lo.map_or_else(|| f.clone(), |x| x.min(f.clone())));
            hi = Some(hi.map_or_else(|| l.clone(), |x| x.max(l.clone())));
        }
    }
    stems.sort_unstable();
    let zero = SequenceNumber::from_u64(0);
    format!(
        "c-{}-{}-{}-{}.parquet",
        stems.join("+"),
        lo.as_ref().unwrap_or(&zero),
        hi.as_ref().unwrap_or(&zero),
        inputs.len()
    )
}

/// Carries out one plan: the four steps of the module docs.
pub async fn apply(
    store: &dyn ObjectStore,
    partition: &str,
    inputs: Vec<String>,
    schema: &SchemaRef,
) -> Result<String, ProcessError> {
    let name = compacted_name(&inputs);
    let bytes = merge(store, partition, &inputs, schema).await?;
    let mut m = manifest(store, partition).await?;
    m.compacted.insert(
        name.clone(),
        Plan {
            inputs: inputs.clone(),
            done: false,
        },
    );
    save(store, partition, &m).await?;
    // Create-only, like the lake's own files: a compacted file of this name holds these
    // inputs' rows (a write whose answer was lost, or a pending plan `recover` finished),
    // so the one there is kept and the plan goes on.
    store
        .put_new(&format!("{partition}/{name}"), bytes)
        .await
        .map_err(err)?;
    for input in &inputs {
        store
            .delete(&format!("{partition}/{input}"))
            .await
            .map_err(err)?;
    }
    if let Some(p) = m.compacted.get_mut(&name) {
        p.done = true;
    }
    save(store, partition, &m).await?;
    Ok(name)
}

/// Every partition (`table/dt=…/hour=…`) of `table`, optionally of one day.
pub async fn partitions(
    store: &dyn ObjectStore,
    table: &str,
    dt: Option<&str>,
) -> Result<Vec<String>, ProcessError> {
    let prefix = match dt {
        Some(d) => format!("{table}/dt={d}/"),
        None => format!("{table}/"),
    };
    let mut out: Vec<String> = store
        .list(&prefix)
        .await
        .map_err(err)?
        .into_iter()
        .filter_map(|o| o.key.rsplit_once('/').map(|(dir, _)| dir.to_owned()))
        .collect();
    out.dedup();
    Ok(out)
}

/// Compacts each partition of `table` (of day `dt`, if given): per shard, the files
/// smaller than `small_bytes`, when there are at least two. Returns (partitions compacted,
/// files merged).
pub async fn compact_table(
    store: &dyn ObjectStore,
    table: &str,
    dt: Option<&str>,
    schema: &SchemaRef,
    small_bytes: u64,
) -> Result<(usize, usize), ProcessError> {
    compact_table_with(store, table, dt, schema, small_bytes, &Quiet).await
}

/// [`compact_table`], reporting the partitions done to `progress`.
pub async fn compact_table_with(
    store: &dyn ObjectStore,
    table: &str,
    dt: Option<&str>,
    schema: &SchemaRef,
    small_bytes: u64,
    progress: &dyn Progress,
) -> Result<(usize, usize), ProcessError> {
    let (mut parts, mut files) = (0, 0);
    let all = partitions(store, table, dt).await?;
    progress.stage(
        &format!("compacting {table}"),
        Some(all.len() as u64),
        Unit::Partitions,
    );
    for partition in all {
        recover(store, &partition).await?;
        // One plan per shard: a compacted file holds one shard's runs and is named by them.
        let mut by_stem: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in store.list(&format!("{partition}/")).await.map_err(err)? {
            if !o.key.ends_with(".parquet") || o.size >= small_bytes {
                continue;
            }
            let Some(name) = o.key.rsplit('/').next() else {
                continue;
            };
            if let Some((stem, _, _)) = run_of(name) {
                by_stem
                    .entry(stem.to_owned())
                    .or_default()
                    .push(name.to_owned());
            }
        }
        let mut merged = false;
        for (_, inputs) in by_stem {
            if inputs.len() < 2 {
                continue;
            }
            files += inputs.len();
            merged = true;
            apply(store, &partition, inputs, schema).await?;
        }
        parts += usize::from(merged);
        progress.advance(1);
    }
    Ok((parts, files))
}
