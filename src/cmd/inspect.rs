//! Read-only views of what a (possibly running) server keeps: the stream, the derived
//! events, the dead letters; and `stream verify`.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use floodgate_core::stream::{SequenceNumber, StartPosition};
use floodgate_sinks::EmbeddedLogReader;
use serde_json::json;
use serde_json::value::RawValue;

use crate::backends::open_sqlite_state;
use crate::progress::TerminalProgress;
use crate::setup::runtime;

pub(crate) fn dead_letters(data_dir: &Path) -> Result<()> {
    let state = open_sqlite_state(data_dir, &floodgate_core::config::StateConfig::default())?;
    let letters = runtime()?.block_on(state.dead_letters(usize::MAX))?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = (|| -> io::Result<()> {
        for d in letters {
            // The payload is the producer's JSON as stored; print it as is when it parses.
            let event = serde_json::from_str::<Box<RawValue>>(&d.payload)
                .map(|v| v.get().to_owned())
                .unwrap_or_else(|_| json!(d.payload).to_string());
            writeln!(
                out,
                r#"{{"shard":{},"sequence":"{}","reason":{},"detail":{},"event":{event}}}"#,
                json!(d.shard.0),
                d.sequence,
                json!(d.reason),
                json!(d.detail)
            )?;
        }
        out.flush()
    })();
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

pub(crate) fn outbox(data_dir: &Path) -> Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = floodgate_sinks::outbox::for_each_event(&data_dir.join("outbox"), |e| {
        out.write_all(b"{\"event\":")?;
        out.write_all(e)?;
        out.write_all(b"}\n")
    })
    .and_then(|()| out.flush());
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `floodgate stream verify`: checks (or repairs) the stream and the quarantine log.
pub(crate) fn verify(data_dir: &Path, repair: bool) -> Result<ExitCode> {
    let mut clean = true;
    for (name, required) in [("stream", true), ("quarantine", false)] {
        let root = data_dir.join(name);
        if !required && !root.join("meta.json").exists() {
            println!("{}: no log to check", root.display());
            continue;
        }
        let report = if repair {
            let (actions, report) = floodgate_sinks::log_verify::repair(&root)
                .with_context(|| format!("cannot repair the log at {}", root.display()))?;
            for action in &actions {
                println!("{action}");
            }
            report
        } else {
            let progress = TerminalProgress::new();
            floodgate_sinks::log_verify::check_with(&root, &progress)
                .with_context(|| format!("cannot check the log at {}", root.display()))?
        };
        for problem in &report.problems {
            println!("{problem}");
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        println!("{}", report.summary());
        clean &= report.is_clean();
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn stream(
    data_dir: &Path,
    shard: Option<u32>,
    from: Option<u64>,
    limit: Option<u64>,
) -> Result<()> {
    let reader = EmbeddedLogReader::open(&data_dir.join("stream"))?;
    let shards: Vec<u32> = match shard {
        Some(s) if s >= reader.meta().shards => bail!(
            "shard {s} does not exist; the log has {}",
            reader.meta().shards
        ),
        Some(s) => vec![s],
        None => (0..reader.meta().shards).collect(),
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut remaining = limit.unwrap_or(u64::MAX);
    let result = (|| -> Result<()> {
        for shard in shards {
            let mut pos = from.map_or(StartPosition::TrimHorizon, |f| {
                StartPosition::At(SequenceNumber::from_u64(f))
            });
            while remaining > 0 {
                let batch = reader.read_blocking(shard, &pos, remaining.min(1000) as usize)?;
                if batch.records.is_empty() {
                    break;
                }
                for r in &batch.records {
                    // The payload is the producer's JSON as stored; print it as is.
                    let event: Box<RawValue> =
                        serde_json::from_slice(&r.payload).unwrap_or_else(|_| {
                            RawValue::from_string(
                                json!(String::from_utf8_lossy(&r.payload)).to_string(),
                            )
                            .expect("a JSON string is JSON")
                        });
                    writeln!(
                        out,
                        r#"{{"shard":{shard},"sequence":"{}","event":{},"key":{}}}"#,
                        r.sequence,
                        event.get(),
                        serde_json::to_string(&r.key)?
                    )?;
                }
                remaining -= batch.records.len() as u64;
                pos = batch.next.unwrap_or(pos);
            }
        }
        out.flush()?;
        Ok(())
    })();
    match result {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}
