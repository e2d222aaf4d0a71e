//! [`ObjectStore`] on a local directory: the embedded deployment's lake.
//!
//! `put` writes `<dir>/.<name>.<pid>.tmp`, fsyncs it, renames it over the final name and
//! fsyncs the directory: a reader sees the whole old object or the whole new one, and a
//! crash leaves at most a hidden temporary file (never listed, removed by
//! [`LocalDirStore::open`]). Query engines skip names starting with `.` or `_`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore};

#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// Opens (creating) the store at `root` and removes temporaries a crash left behind.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(root)?;
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
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(entry.path())?;
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

fn put_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a key has a parent directory");
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .expect("a key has a name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
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
        fs::write(dir.path().join("t/.junk.parquet.1.tmp"), b"partial").unwrap();
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
        assert!(!dir.path().join("t/.junk.parquet.1.tmp").exists());
    }
}
