//! Fault injection on the durability path, for tests only (cargo feature `failpoints`).
//!
//! Every write, fsync and undo (`set_len`) that an acknowledgement stands on — the log's
//! segment writes and fsyncs, the outbox's lines, checkpoint files — goes through the
//! functions here, and so does the hint that starts a segment's writeback early, whose
//! failure must cost nothing. Without the feature they are the plain calls, inlined:
//! nothing is checked and nothing is recorded. With it, a test can:
//!
//! - `arm` a `Fault` (EIO, ENOSPC, or a short write that then fails with ENOSPC) for one
//!   kind of `Op` on the files under one path. Faults are scoped by path so that tests
//!   running in parallel in one process each fault only their own directory.
//! - `watch` a directory and later call `Watch::lose_unsynced`: every file written under
//!   it is cut back to the length it had at its last successful fsync, and every range
//!   overwritten in place since then gets its old bytes back, which is what a power cut
//!   may leave of it. An acknowledgement that no fsync covered then shows up as a lost
//!   record, which a crash by SIGKILL (the page cache survives it) never shows.
//!   `Watch::lose_unsynced_pages` loses only some of those pages, chosen by a seed, as a
//!   disk that writes back pages in any order may: it finds writes whose order matters.
//!
//! The functions take the file and a path naming where it is (the file itself, or its
//! shard directory): the path is what `arm` matches, so call sites need no extra state.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A kind of operation a fault can be armed for.
#[cfg(feature = "failpoints")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `write_all` of bytes that an acknowledgement will cover.
    Write,
    /// `sync_data` or `sync_all` of such a file.
    Sync,
    /// `set_len`: the undo of a failed write, or the cut of a torn tail.
    SetLen,
    /// The hint that starts a segment range's writeback (`sync_file_range`), which makes
    /// nothing durable: its failure must cost nothing.
    Writeback,
}

/// What an armed operation does instead of its work.
#[cfg(feature = "failpoints")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails with EIO, changing nothing.
    Eio,
    /// Fails with ENOSPC, changing nothing.
    Enospc,
    /// A write puts the first half of its buffer (at least one byte) in the file and then
    /// fails with ENOSPC, as a write that fills the disk does. Other operations: `Enospc`.
    ShortWrite,
    /// Nothing: the operation does its work. Armed only to count calls (`Armed::hits`).
    Count,
}

#[cfg(not(feature = "failpoints"))]
mod off {
    use super::*;

    #[inline(always)]
    pub(crate) fn write_all(file: &mut File, buf: &[u8], _at: &Path) -> io::Result<()> {
        file.write_all(buf)
    }

    #[inline(always)]
    pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64, _at: &Path) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    #[inline(always)]
    pub(crate) fn sync_data(file: &File, _at: &Path) -> io::Result<()> {
        file.sync_data()
    }

    #[inline(always)]
    pub(crate) fn sync_all(file: &File, _at: &Path) -> io::Result<()> {
        file.sync_all()
    }

    #[inline(always)]
    pub(crate) fn set_len(file: &File, len: u64, _at: &Path) -> io::Result<()> {
        file.set_len(len)
    }

    #[inline(always)]
    pub(crate) fn start_writeback(
        file: &File,
        offset: u64,
        len: u64,
        _at: &Path,
    ) -> io::Result<()> {
        crate::embedded_log::start_writeback(file, offset, len)
    }
}

#[cfg(not(feature = "failpoints"))]
pub(crate) use off::{set_len, start_writeback, sync_all, sync_data, write_all, write_all_at};

#[cfg(feature = "failpoints")]
pub use on::{Armed, Watch, arm, arm_times, watch};

#[cfg(feature = "failpoints")]
pub(crate) use on::{set_len, start_writeback, sync_all, sync_data, write_all, write_all_at};

#[cfg(feature = "failpoints")]
mod on {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::*;

    // The errno values are the same on Linux and the BSDs.
    const EIO: i32 = 5;
    const ENOSPC: i32 = 28;

    #[derive(Debug)]
    struct Rule {
        id: u64,
        op: Op,
        under: PathBuf,
        fault: Fault,
        /// Calls still to fail; `None`: every call until disarmed.
        remaining: Option<u32>,
        hits: Arc<AtomicU32>,
    }

    /// A file, by device and inode.
    type Inode = (u64, u64);
    /// Ranges of a file overwritten in place since its last fsync: offset, old bytes.
    type PreImages = Vec<(u64, Vec<u8>)>;

    /// A watched directory: the length of each file (by device and inode) that its last
    /// successful fsync made durable, and the old bytes of each range overwritten in place
    /// since then (oldest first).
    #[derive(Debug)]
    struct Watched {
        id: u64,
        dir: PathBuf,
        durable: HashMap<Inode, u64>,
        overwritten: HashMap<Inode, PreImages>,
    }

    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    /// Rules and watches in force; lets the common case (none) skip the locks.
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    static RULES: Mutex<Vec<Rule>> = Mutex::new(Vec::new());
    static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

    fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
        // A test that panicked while holding the lock left consistent data behind.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fault in force until this is dropped.
    #[derive(Debug)]
    #[must_use = "the fault is disarmed when this is dropped"]
    pub struct Armed {
        id: u64,
        hits: Arc<AtomicU32>,
    }

    impl Armed {
        /// How many calls this fault has failed so far.
        pub fn hits(&self) -> u32 {
            self.hits.load(Ordering::Acquire)
        }
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            let mut rules = lock(&RULES);
            let before = rules.len();
            rules.retain(|r| r.id != self.id);
            ACTIVE.fetch_sub(before - rules.len(), Ordering::AcqRel);
        }
    }

    /// Makes every `op` on a file at or under `under` fail with `fault`, until the returned
    /// guard is dropped.
    pub fn arm(op: Op, under: &Path, fault: Fault) -> Armed {
        add_rule(op, under, fault, None)
    }

    /// As [`arm`], for the next `times` matching calls only.
    pub fn arm_times(op: Op, under: &Path, fault: Fault, times: u32) -> Armed {
        add_rule(op, under, fault, Some(times))
    }

    fn add_rule(op: Op, under: &Path, fault: Fault, remaining: Option<u32>) -> Armed {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let hits = Arc::new(AtomicU32::new(0));
        lock(&RULES).push(Rule {
            id,
            op,
            under: under.to_owned(),
            fault,
            remaining,
            hits: hits.clone(),
        });
        ACTIVE.fetch_add(1, Ordering::AcqRel);
        Armed { id, hits }
    }

    /// The fault armed for this call, if any (and counts it).
    fn fault_for(op: Op, at: &Path) -> Option<Fault> {
        let mut rules = lock(&RULES);
        let rule = rules
            .iter_mut()
            .find(|r| r.op == op && at.starts_with(&r.under) && r.remaining != Some(0))?;
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        rule.hits.fetch_add(1, Ordering::AcqRel);
        (rule.fault != Fault::Count).then_some(rule.fault)
    }

    fn error(fault: Fault) -> io::Error {
        let errno = match fault {
            Fault::Eio => EIO,
            Fault::Enospc | Fault::ShortWrite => ENOSPC,
            Fault::Count => unreachable!("a counting rule injects nothing"),
        };
        let os = io::Error::from_raw_os_error(errno);
        io::Error::new(os.kind(), format!("{os} (injected by a failpoint)"))
    }

    /// Tracks the files written under `dir` until the returned guard is dropped (see
    /// [`Watch::lose_unsynced`]).
    pub fn watch(dir: &Path) -> Watch {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock(&WATCHED).push(Watched {
            id,
            dir: dir.to_owned(),
            durable: HashMap::new(),
            overwritten: HashMap::new(),
        });
        ACTIVE.fetch_add(1, Ordering::AcqRel);
        Watch {
            id,
            dir: dir.to_owned(),
        }
    }

    /// A watched directory (see [`watch`]).
    #[derive(Debug)]
    #[must_use = "the directory is no longer watched when this is dropped"]
    pub struct Watch {
        id: u64,
        dir: PathBuf,
    }

    impl Watch {
        /// Simulates a power cut: every file written through this module under the watched
        /// directory gets back the old bytes of what was overwritten in place since its last
        /// successful fsync, and is cut back to its length at that fsync (a file never
        /// fsynced here keeps the length it had when first written here). Call it with the
        /// writers stopped. Returns how many bytes were lost.
        pub fn lose_unsynced(&self) -> io::Result<u64> {
            self.lose(&mut |_| true)
        }

        /// As [`Watch::lose_unsynced`], but each 4 KiB page overwritten since the last
        /// fsync loses its new bytes or keeps them as `seed` decides, as a disk that writes
        /// back dirty pages in any order may leave them. The length is cut as there.
        pub fn lose_unsynced_pages(&self, seed: u64) -> io::Result<u64> {
            // xorshift64*: enough to pick pages, and the same pages for the same seed.
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            self.lose(&mut |_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 63 == 1
            })
        }

        /// Reverts the overwritten pages `revert` picks (by offset), newest write first so
        /// that a page overwritten twice gets its durable bytes back, then cuts lengths.
        fn lose(&self, revert: &mut dyn FnMut(u64) -> bool) -> io::Result<u64> {
            const PAGE: u64 = 4096;
            let (durable, overwritten) = {
                let watched = lock(&WATCHED);
                let w = watched
                    .iter()
                    .find(|w| w.id == self.id)
                    .expect("a live watch is registered");
                (w.durable.clone(), w.overwritten.clone())
            };
            let mut lost = 0;
            let mut dirs = vec![self.dir.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        dirs.push(entry.path());
                        continue;
                    }
                    let inode = (meta.dev(), meta.ino());
                    let Some(&len) = durable.get(&inode) else {
                        continue;
                    };
                    let file = std::fs::OpenOptions::new().write(true).open(entry.path())?;
                    // Decide page by page, once per page, and apply to every write of it.
                    let mut decided: HashMap<u64, bool> = HashMap::new();
                    for (offset, old) in overwritten.get(&inode).into_iter().flatten().rev() {
                        let end = offset + old.len() as u64;
                        let mut at = *offset;
                        while at < end {
                            let page_end = ((at / PAGE) + 1) * PAGE;
                            let until = page_end.min(end);
                            if *decided.entry(at / PAGE).or_insert_with(|| revert(at)) {
                                let from = (at - offset) as usize;
                                let to = (until - offset) as usize;
                                file.write_all_at(&old[from..to], at)?;
                                lost += until - at;
                            }
                            at = until;
                        }
                    }
                    let now = file.metadata()?.len();
                    if now > len {
                        lost += now - len;
                        file.set_len(len)?;
                    }
                }
            }
            // What was lost is gone: a second power cut does not lose it again.
            if let Some(w) = lock(&WATCHED).iter_mut().find(|w| w.id == self.id) {
                w.overwritten.clear();
            }
            Ok(lost)
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let mut watched = lock(&WATCHED);
            let before = watched.len();
            watched.retain(|w| w.id != self.id);
            ACTIVE.fetch_sub(before - watched.len(), Ordering::AcqRel);
        }
    }

    /// Updates the durable length of `file` in the watches covering `at`: with `f` of
    /// (what is recorded, the file's length now). The first sight of a file records its
    /// length then as durable: it was written before the watch could see it.
    fn record(file: &File, at: &Path, f: impl Fn(u64, u64) -> u64) {
        let mut watched = lock(&WATCHED);
        if !watched.iter().any(|w| at.starts_with(&w.dir)) {
            return;
        }
        let Ok(meta) = file.metadata() else { return };
        for w in watched.iter_mut().filter(|w| at.starts_with(&w.dir)) {
            let slot = w
                .durable
                .entry((meta.dev(), meta.ino()))
                .or_insert(meta.len());
            *slot = f(*slot, meta.len());
        }
    }

    pub(crate) fn write_all(file: &mut File, buf: &[u8], at: &Path) -> io::Result<()> {
        if ACTIVE.load(Ordering::Acquire) == 0 {
            return file.write_all(buf);
        }
        record(file, at, |durable, _| durable);
        match fault_for(Op::Write, at) {
            None => file.write_all(buf),
            Some(Fault::ShortWrite) => {
                let part = (buf.len() / 2).max(1).min(buf.len());
                file.write_all(&buf[..part])?;
                Err(error(Fault::ShortWrite))
            }
            Some(fault) => Err(error(fault)),
        }
    }

    fn sync(file: &File, at: &Path, call: impl Fn(&File) -> io::Result<()>) -> io::Result<()> {
        if ACTIVE.load(Ordering::Acquire) == 0 {
            return call(file);
        }
        if let Some(fault) = fault_for(Op::Sync, at) {
            return Err(error(fault));
        }
        call(file)?;
        record(file, at, |_, now| now);
        forget_overwrites(file, at);
        Ok(())
    }

    /// Keeps, in every watch covering `at`, the bytes that writing `len` bytes at `offset`
    /// overwrites in `file` (which must be open for reading too).
    fn keep_overwritten(file: &File, at: &Path, offset: u64, len: usize) {
        let mut watched = lock(&WATCHED);
        if !watched.iter().any(|w| at.starts_with(&w.dir)) {
            return;
        }
        let Ok(meta) = file.metadata() else { return };
        let end = (offset + len as u64).min(meta.len());
        if end <= offset {
            return;
        }
        let mut old = vec![0; (end - offset) as usize];
        file.read_exact_at(&mut old, offset)
            .expect("a watched file written in place is open for reading too");
        for w in watched.iter_mut().filter(|w| at.starts_with(&w.dir)) {
            w.overwritten
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push((offset, old.clone()));
        }
    }

    /// After a successful fsync of `file`: what it overwrote is durable.
    fn forget_overwrites(file: &File, at: &Path) {
        let mut watched = lock(&WATCHED);
        let Ok(meta) = file.metadata() else { return };
        for w in watched.iter_mut().filter(|w| at.starts_with(&w.dir)) {
            w.overwritten.remove(&(meta.dev(), meta.ino()));
        }
    }

    pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64, at: &Path) -> io::Result<()> {
        if ACTIVE.load(Ordering::Acquire) == 0 {
            return file.write_all_at(buf, offset);
        }
        record(file, at, |durable, _| durable);
        let write = |buf: &[u8]| {
            keep_overwritten(file, at, offset, buf.len());
            file.write_all_at(buf, offset)
        };
        match fault_for(Op::Write, at) {
            None => write(buf),
            Some(Fault::ShortWrite) => {
                let part = (buf.len() / 2).max(1).min(buf.len());
                write(&buf[..part])?;
                Err(error(Fault::ShortWrite))
            }
            Some(fault) => Err(error(fault)),
        }
    }

    pub(crate) fn sync_data(file: &File, at: &Path) -> io::Result<()> {
        sync(file, at, File::sync_data)
    }

    pub(crate) fn sync_all(file: &File, at: &Path) -> io::Result<()> {
        sync(file, at, File::sync_all)
    }

    pub(crate) fn set_len(file: &File, len: u64, at: &Path) -> io::Result<()> {
        if ACTIVE.load(Ordering::Acquire) == 0 {
            return file.set_len(len);
        }
        record(file, at, |durable, _| durable);
        if let Some(fault) = fault_for(Op::SetLen, at) {
            return Err(error(fault));
        }
        file.set_len(len)?;
        // What an undo cut is gone whether or not it was durable.
        record(file, at, |durable, _| durable.min(len));
        Ok(())
    }

    pub(crate) fn start_writeback(file: &File, offset: u64, len: u64, at: &Path) -> io::Result<()> {
        if ACTIVE.load(Ordering::Acquire) == 0 {
            return crate::embedded_log::start_writeback(file, offset, len);
        }
        // Recorded nowhere: the watch's power cut loses what it hinted at as before.
        if let Some(fault) = fault_for(Op::Writeback, at) {
            return Err(error(fault));
        }
        crate::embedded_log::start_writeback(file, offset, len)
    }
}
