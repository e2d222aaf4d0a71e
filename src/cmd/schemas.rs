//! `floodgate schemas …`: the registry, offline.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bytes::Bytes;
use floodgate_core::check::{Outcome, check_body};
use floodgate_core::decode::BodyFormat;
use serde_json::json;

use crate::setup::load_registry;

pub(crate) fn list(dir: Option<&Path>) -> Result<()> {
    let registry = load_registry(dir)?;
    println!(
        "{:<32} {:>7}  {:<8} {:<14} $id",
        "TYPE", "VERSION", "LATEST", "PARTITION KEY"
    );
    for s in registry.summaries() {
        println!(
            "{:<32} {:>7}  {:<8} {:<14} {}",
            s.event_type,
            format!("v{}", s.version),
            if s.latest { "yes" } else { "" },
            s.partition_key.as_deref().unwrap_or("-"),
            s.id.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

pub(crate) fn check(file: &Path, dir: Option<&Path>) -> Result<ExitCode> {
    let registry = load_registry(dir)?;
    let bytes = if file == Path::new("-") {
        let mut buf = Vec::new();
        io::Read::read_to_end(&mut io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let ndjson = matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("ndjson" | "jsonl")
    );
    let format = if ndjson {
        BodyFormat::Ndjson
    } else {
        BodyFormat::Auto
    };
    let outcomes = check_body(&registry, &Bytes::from(bytes), format, usize::MAX)
        .with_context(|| format!("cannot decode {}", file.display()))?;
    let mut invalid = 0;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (index, o) in outcomes.iter().enumerate() {
        let line = match o {
            Outcome::Valid {
                id,
                event_type,
                key,
                ..
            } => {
                json!({"index": index, "id": id, "status": "valid", "type": event_type, "partitionKey": key})
            }
            Outcome::Rejected { id, errors, .. } => {
                invalid += 1;
                json!({"index": index, "id": id, "status": "invalid", "errors": errors})
            }
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!("{} valid, {} invalid", outcomes.len() - invalid, invalid);
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
