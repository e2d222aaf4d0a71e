//! Progress bars for long commands (`backup`, `restore`, `lake rebuild`, `lake compact`,
//! `stream verify`): drawn on standard error when it is a terminal, not at all otherwise,
//! so scripts, logs and the tests (which read standard output) see exactly what they did
//! before. Standard output is never drawn on.

use std::io::IsTerminal;
use std::sync::Mutex;

use floodgate_core::progress::{Progress, Unit};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A [`Progress`] that draws one bar per stage on standard error, when it is a terminal.
#[derive(Debug)]
pub(crate) struct TerminalProgress {
    draw: bool,
    /// The current stage's bar and what it counts.
    bar: Mutex<Option<(ProgressBar, Unit)>>,
}

impl TerminalProgress {
    pub(crate) fn new() -> Self {
        TerminalProgress {
            draw: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.draw {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        }
    }

    fn with_bar(&self, f: impl FnOnce(&ProgressBar, Unit)) {
        if let Ok(bar) = self.bar.lock()
            && let Some((bar, unit)) = bar.as_ref()
        {
            f(bar, *unit);
        }
    }

    /// Ends the current stage's bar, leaving its last state on the terminal.
    fn finish(&self) {
        if let Ok(mut bar) = self.bar.lock()
            && let Some((bar, _)) = bar.take()
        {
            bar.finish();
        }
    }
}

fn style(unit: Unit, known_total: bool) -> ProgressStyle {
    let template = match (unit, known_total) {
        (Unit::Bytes, true) => {
            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}"
        }
        (Unit::Bytes, false) => "{spinner} {msg:40!} {bytes} {binary_bytes_per_sec}",
        (_, true) => "{msg:40!} [{bar:30}] {human_pos}/{human_len} {prefix} eta {eta}",
        (_, false) => "{spinner} {msg:40!} {human_pos} {prefix}",
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for TerminalProgress {
    fn stage(&self, name: &str, total: Option<u64>, unit: Unit) {
        self.finish();
        let bar = match total {
            Some(t) => ProgressBar::with_draw_target(Some(t), self.target()),
            None => ProgressBar::with_draw_target(None, self.target()),
        };
        bar.set_style(style(unit, total.is_some()));
        bar.set_prefix(unit.as_str());
        bar.set_message(name.to_owned());
        if let Ok(mut slot) = self.bar.lock() {
            *slot = Some((bar, unit));
        }
    }

    fn total(&self, total: u64) {
        self.with_bar(|bar, unit| {
            if bar.length().is_none() {
                // A spinner becomes a bar once the total is known; its style says so.
                bar.set_style(style(unit, true));
            }
            bar.set_length(total);
        });
    }

    fn advance(&self, n: u64) {
        self.with_bar(|bar, _| bar.inc(n));
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A spinner saying what a command waits for (`aws init` while a resource becomes
/// ACTIVE), on standard error when it is a terminal; hidden otherwise. Clear it with
/// `finish_and_clear` once the wait is over.
pub(crate) fn waiting(what: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(what);
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner
}
