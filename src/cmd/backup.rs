//! `floodgate backup` and `floodgate restore` of the embedded deployment; the copy itself
//! (and why its order makes it consistent) is `floodgate_sinks::backup`.

use std::path::Path;

use anyhow::{Context, Result};
use floodgate_sinks::backup::{self, BackupOptions, Manifest};

use crate::progress::TerminalProgress;

/// One line per log shard, the state's positions and the totals: what the copy holds.
fn summary(m: &Manifest) -> Vec<String> {
    let mut lines = Vec::new();
    for log in &m.logs {
        for s in &log.shards {
            lines.push(format!(
                "{} shard {}: sequences {}..{} ({} segments, {} bytes)",
                log.path, s.shard, s.first_sequence, s.durable, s.segments, s.bytes
            ));
        }
    }
    if let Some(state) = &m.state {
        let positions: Vec<String> = state
            .positions
            .iter()
            .map(|(shard, seq)| format!("{shard}:{seq}"))
            .collect();
        lines.push(format!(
            "{}: applied through {} (shard:sequence), outbox entries through {}",
            state.path,
            if positions.is_empty() {
                "nothing".to_owned()
            } else {
                positions.join(" ")
            },
            state.outbox_last_seq
        ));
    }
    if let Some(lake) = &m.lake {
        lines.push(format!(
            "{}: {} files, {} bytes{}",
            lake.path,
            lake.files,
            lake.bytes,
            if lake.linked { " (hard links)" } else { "" }
        ));
    }
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    lines.push(format!("{} files, {bytes} bytes", m.files.len()));
    lines
}

pub(crate) fn backup(data_dir: &Path, to: &Path, link_lake: bool) -> Result<()> {
    let progress = TerminalProgress::new();
    let manifest = backup::backup(data_dir, to, BackupOptions { link_lake }, &progress)
        .with_context(|| {
            format!(
                "backup of {} into {} failed",
                data_dir.display(),
                to.display()
            )
        })?;
    drop(progress);
    for line in summary(&manifest) {
        println!("{line}");
    }
    println!("backup complete: {}", to.join(backup::MANIFEST).display());
    Ok(())
}

pub(crate) fn restore(from: &Path, data_dir: &Path) -> Result<()> {
    let progress = TerminalProgress::new();
    let manifest = backup::restore(from, data_dir, &progress).with_context(|| {
        format!(
            "restore of {} into {} failed",
            from.display(),
            data_dir.display()
        )
    })?;
    drop(progress);
    for line in summary(&manifest) {
        println!("{line}");
    }
    println!(
        "restored the backup of {} (taken {}) into {}; start it with `floodgate serve --data-dir {}`",
        manifest.source,
        manifest.started_at,
        data_dir.display(),
        data_dir.display()
    );
    Ok(())
}
