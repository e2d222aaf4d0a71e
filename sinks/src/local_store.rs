//! [`ObjectStore`] on a local directory: the embedded deployment's lake.
//!
//! `put` writes `<dir>/.<name>.<pid>-<n>.tmp`, fsyncs it, renames it over the final name and
//! fsyncs the directory: a reader sees the whole old object or the whole new one. A
//! directory `put` creates is made durable too: each new directory's parent is fsynced, so
//! a crash cannot lose a partition directory with the files renamed into it. A failed `put`
//! removes its temporary file; a crash leaves at most a hidden one (never listed), which
//! [`LocalDirStore::open`] removes once it is provably abandoned: its writer's process (the
//! pid in its name) is gone.
//!
//! `put_new` writes and fsyncs the same temporary, then hard-links it to the final name:
//! the link fails, atomically, when the name exists (`Exists`, and nothing changed), so of
//! two writers of one name exactly one creates it. The directory must be on a file system
//! with hard links (every Linux one a lake would use). A live server's temporaries are never touched, so tools
//! (`floodgate lake compact`) can open the store beside it. Query engines skip names
//! starting with `.` or `_`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore, PutOutcome};

#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// Opens (creating) the store at `root` and removes the temporaries of writers that are
    /// gone (a crash's leftovers); a live process's are left alone.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        create_dirs_durably(root)?;
        let store = Self {
            root: root.to_owned(),
        };
        store.sweep_temporaries(root)?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sweep_temporaries(&self, dir: &Path) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.file_type()?.is_dir() {
                self.sweep_temporaries(&entry.path())?;
            } else if abandoned_temporary(&name) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => {}
                    // Its writer finished or cleaned up meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        let rel = Path::new(key);
        if key.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(ObjectError::InvalidKey(key.to_owned()));
        }
        Ok(self.root.join(rel))
    }
}

fn io(key: &str, e: impl std::fmt::Display) -> ObjectError {
    ObjectError::Io {
        key: key.to_owned(),
        message: e.to_string(),
    }
}

/// Distinguishes temporaries of concurrent `put`s in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether `name` is a `put`'s temporary file (`.<name>.<pid>-<n>.tmp`, or `.<name>.<pid>.tmp`
/// from older versions) whose writer is provably gone: its pid names no live process. Our
/// own pid counts as live (another handle on this store may be writing it); so does every
/// pid when the system cannot say (no `/proc`).
fn abandoned_temporary(name: &str) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    let Some((_, tag)) = stem.rsplit_once('.') else {
        return false;
    };
    let pid = tag.split_once('-').map_or(tag, |(pid, _)| pid);
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    pid != std::process::id() && !process_alive(pid)
}

/// Whether process `pid` exists (Linux: `/proc/<pid>`). Where that cannot be told, yes.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// Fsyncs directory `dir`. Every directory fsync of this module goes through here.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    tests::SYNCED_DIRS.with(|s| s.borrow_mut().push(dir.to_owned()));
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each directory it
/// creates (the new entry is only durable once its parent is). A directory another writer
/// creates at the same moment is synced all the same.
fn create_dirs_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.is_dir() {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
        // A relative path's first component lives in the working directory.
        match d.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            Some(_) => sync_dir(Path::new("."))?,
            None => {}
        }
    }
    Ok(())
}

/// Writes `bytes` to a fresh temporary file beside `path` (creating its directories
/// durably) and fsyncs it. Returns the directory and the temporary's path; on failure
/// no temporary is left.
fn write_temporary(path: &Path, bytes: &[u8]) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = path.parent().expect("a key has a parent directory");
    create_dirs_durably(dir)?;
    let name = path
        .file_name()
        .expect("a key has a name")
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // Leave the directory as it was: no temporary behind a failed put.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((dir.to_owned(), tmp))
}

fn put_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (dir, tmp) = write_temporary(path, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&dir)
}

/// `put_new`: the temporary is hard-linked to the final name, which the kernel refuses
/// atomically when the name exists (`renameat2(RENAME_NOREPLACE)` would do the same, but
/// needs `unsafe` or a new dependency). Either way the temporary is removed and the
/// directory fsynced, so `Exists` too means the object there is durable.
fn put_new_sync(path: &Path, bytes: &[u8]) -> std::io::Result<PutOutcome> {
    let (dir, tmp) = write_temporary(path, bytes)?;
    let linked = fs::hard_link(&tmp, path);
    // The final name, if linked, holds the bytes now; a temporary that cannot be removed
    // is hidden, and swept by the next `open` after this process is gone.
    let _ = fs::remove_file(&tmp);
    let outcome = match linked {
        Ok(()) => PutOutcome::Created,
        // A directory of that name is no object: an error, as `put` would answer.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !path.is_dir() => {
            PutOutcome::Exists
        }
        Err(e) => return Err(e),
    };
    sync_dir(&dir)?;
    Ok(outcome)
}

fn list_sync(
    root: &Path,
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ObjectMeta>,
) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let key = path
            .strip_prefix(root)
            .expect("listed under the root")
            .to_string_lossy()
            .replace(std::path::MAIN_SEPARATOR, "/");
        if entry.file_type()?.is_dir() {
            // Descend only where the prefix can still match.
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                list_sync(root, &path, prefix, out)?;
            }
        } else if key.starts_with(prefix) {
            out.push(ObjectMeta {
                key,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || put_sync(&path, &bytes))
            .await
            .map_err(|e| io(key, e))?
            .map_err(|e| io(key, e))
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || put_new_sync(&path, &bytes))
            .await
            .map_err(|e| io(key, e))?
            .map_err(|e| io(key, e))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        let path = self.path(key)?;
        match tokio::task::spawn_blocking(move || fs::read(path))
            .await
            .map_err(|e| io(key, e))?
        {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let root = self.root.clone();
        let p = prefix.to_owned();
        let mut out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            list_sync(&root, &root, &p, &mut out).map(|()| out)
        })
        .await
        .map_err(|e| io(prefix, e))?
        .map_err(|e| io(prefix, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        match tokio::task::spawn_blocking(move || fs::remove_file(path))
            .await
            .map_err(|e| io(key, e))?
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        /// Every directory `sync_dir` fsynced on this thread.
        pub(super) static SYNCED_DIRS: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    /// A pid that names no process: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid), "pid {pid} was reused at once");
        pid
    }

    /// `floodgate lake compact` opens the store beside a live server: the server's
    /// in-progress temporary files must survive that, and only a dead writer's go.
    #[test]
    fn open_removes_only_temporaries_whose_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("t/dt=2026-11-22/hour=10");
        fs::create_dir_all(&part).unwrap();
        // A live writer: a child process that waits on its stdin until we close it.
        let mut live = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let dead = dead_pid();
        let own = std::process::id();
        let names = [
            format!(".a.parquet.{}-0.tmp", live.id()),
            format!(".b.parquet.{own}-7.tmp"),
            format!(".c.parquet.{dead}-3.tmp"),
            format!(".d.parquet.{dead}.tmp"),
            ".e.parquet.tmp".to_owned(),
        ];
        for n in &names {
            fs::write(part.join(n), b"partial").unwrap();
        }
        LocalDirStore::open(dir.path()).unwrap();
        let left: Vec<bool> = names.iter().map(|n| part.join(n).exists()).collect();
        drop(live.stdin.take());
        live.wait().unwrap();
        assert_eq!(
            left,
            [true, true, false, false, true],
            "live, own, dead, dead (old name), no pid"
        );
    }

    /// Item 11 of issue 9: a new partition directory is durable only once its parent is
    /// fsynced, and so on up to the first directory that existed.
    #[test]
    fn a_put_fsyncs_the_parent_of_every_directory_it_creates() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lake");
        SYNCED_DIRS.with(|s| s.borrow_mut().clear());
        put_sync(&root.join("t/dt=2026-11-22/hour=10/a.parquet"), b"x").unwrap();
        let synced = SYNCED_DIRS.with(|s| s.borrow().clone());
        for d in [
            dir.path().to_owned(),
            root.clone(),
            root.join("t"),
            root.join("t/dt=2026-11-22"),
            root.join("t/dt=2026-11-22/hour=10"),
        ] {
            assert!(
                synced.contains(&d),
                "{} not fsynced: {synced:?}",
                d.display()
            );
        }
        // A put into directories that exist syncs only the file's own directory.
        SYNCED_DIRS.with(|s| s.borrow_mut().clear());
        put_sync(&root.join("t/dt=2026-11-22/hour=10/b.parquet"), b"y").unwrap();
        let synced = SYNCED_DIRS.with(|s| s.borrow().clone());
        assert_eq!(synced, [root.join("t/dt=2026-11-22/hour=10")]);
    }

    /// A put that fails leaves no temporary file behind.
    #[tokio::test]
    async fn a_failed_put_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalDirStore::open(dir.path()).unwrap();
        // The key's name is taken by a non-empty directory: the rename fails.
        fs::create_dir_all(dir.path().join("t/x.parquet/inner")).unwrap();
        assert!(
            s.put("t/x.parquet", Bytes::from_static(b"one"))
                .await
                .is_err()
        );
        let left: Vec<String> = fs::read_dir(dir.path().join("t"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["x.parquet"]);
    }

    /// `put_new` leaves no temporary behind, whether it creates the name or finds it, and
    /// a name taken by a directory is an error, not `Exists`.
    #[tokio::test]
    async fn put_new_leaves_only_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalDirStore::open(dir.path()).unwrap();
        let key = "t/dt=2026-11-22/hour=10/a.parquet";
        let created = s.put_new(key, Bytes::from_static(b"one")).await.unwrap();
        let found = s.put_new(key, Bytes::from_static(b"two")).await.unwrap();
        assert_eq!((created, found), (PutOutcome::Created, PutOutcome::Exists));
        let left: Vec<String> = fs::read_dir(dir.path().join("t/dt=2026-11-22/hour=10"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["a.parquet"]);
        assert_eq!(fs::read(dir.path().join(key)).unwrap(), b"one");
        fs::create_dir_all(dir.path().join("t/d.parquet")).unwrap();
        assert!(s.put_new("t/d.parquet", Bytes::new()).await.is_err());
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalDirStore::open(dir.path()).unwrap();
        s.put(
            "t/dt=2026-11-22/hour=10/a.parquet",
            Bytes::from_static(b"one"),
        )
        .await
        .unwrap();
        s.put(
            "t/dt=2026-11-22/hour=11/b.parquet",
            Bytes::from_static(b"two!"),
        )
        .await
        .unwrap();
        s.put("u/c.parquet", Bytes::from_static(b"x"))
            .await
            .unwrap();
        // A crash's leftover is invisible and swept at open.
        let junk = format!("t/.junk.parquet.{}-0.tmp", dead_pid());
        fs::write(dir.path().join(&junk), b"partial").unwrap();
        let keys: Vec<String> = s
            .list("t/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(
            keys,
            [
                "t/dt=2026-11-22/hour=10/a.parquet",
                "t/dt=2026-11-22/hour=11/b.parquet"
            ]
        );
        assert_eq!(
            s.get("t/dt=2026-11-22/hour=11/b.parquet")
                .await
                .unwrap()
                .unwrap(),
            Bytes::from_static(b"two!")
        );
        s.delete("u/c.parquet").await.unwrap();
        s.delete("u/c.parquet").await.unwrap();
        assert!(s.get("u/c.parquet").await.unwrap().is_none());
        assert!(s.put("../escape", Bytes::new()).await.is_err());
        LocalDirStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(&junk).exists());
    }
}
