//! Files written into a backup (or a restore): created new (never over an existing file),
//! hashed with SHA-256 as they are written, fsynced before they count as copied.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use floodgate_core::progress::Progress;
use sha2::{Digest, Sha256};

/// Bytes read and written at once.
const CHUNK_BYTES: usize = 1 << 20;

/// A file written: where, how long, and the hex SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// `err` with the path it happened on in its message (the kind is kept).
pub(crate) fn at(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

pub(crate) fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| at(path, e))
}

/// Copies the first `len` bytes of `src` into a new file `dst`. Fails when `src` is shorter
/// (`UnexpectedEof`) and keeps the `NotFound` of a missing `src`, so that a caller can tell
/// a file that went away (retention, compaction) from other failures. A failed copy
/// leaves no `dst` behind.
pub(crate) fn copy_prefix(
    src: &Path,
    dst: &Path,
    len: u64,
    progress: &dyn Progress,
) -> io::Result<Copied> {
    let input = File::open(src).map_err(|e| at(src, e))?;
    let mut out = create_new(dst)?;
    // From here on `dst` is this call's own: a failure removes it.
    let result = (|| {
        let mut input = input.take(len);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut copied = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(at(src, e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| at(dst, e))?;
            copied += n as u64;
            progress.advance(n as u64);
        }
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {copied} bytes where {len} were expected",
                    src.display()
                ),
            ));
        }
        out.sync_all().map_err(|e| at(dst, e))?;
        Ok(Copied {
            path: dst.to_owned(),
            bytes: len,
            sha256: hex(&hasher.finalize()),
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

/// Copies the whole of `src` (as long as it is when opened) into a new file `dst`.
pub(crate) fn copy_file(src: &Path, dst: &Path, progress: &dyn Progress) -> io::Result<Copied> {
    let len = fs::metadata(src).map_err(|e| at(src, e))?.len();
    copy_prefix(src, dst, len, progress)
}

/// Writes `bytes` into a new file `dst`, fsynced.
pub(crate) fn write_new(dst: &Path, bytes: &[u8]) -> io::Result<Copied> {
    let mut out = create_new(dst)?;
    let result = out
        .write_all(bytes)
        .and_then(|()| out.sync_all())
        .map_err(|e| at(dst, e));
    if let Err(e) = result {
        let _ = fs::remove_file(dst);
        return Err(e);
    }
    Ok(Copied {
        path: dst.to_owned(),
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(bytes)),
    })
}

/// The length and hex SHA-256 of the file at `path`, reading it whole.
pub(crate) fn hash_file(path: &Path, progress: &dyn Progress) -> io::Result<(u64, String)> {
    let mut input = File::open(path).map_err(|e| at(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut len = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(at(path, e)),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
        progress.advance(n as u64);
    }
    Ok((len, hex(&hasher.finalize())))
}

/// Fsyncs every directory under `root` (and `root`), deepest first, so that every file
/// written below it is reachable after a crash.
pub(crate) fn fsync_tree(root: &Path) -> io::Result<()> {
    for entry in fs::read_dir(root).map_err(|e| at(root, e))? {
        let entry = entry.map_err(|e| at(root, e))?;
        if entry
            .file_type()
            .map_err(|e| at(&entry.path(), e))?
            .is_dir()
        {
            fsync_tree(&entry.path())?;
        }
    }
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(root, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use floodgate_core::progress::Quiet;

    #[test]
    fn a_prefix_copy_hashes_what_it_wrote_and_refuses_a_short_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::write(&src, b"hello world").unwrap();
        let c = copy_prefix(&src, &dir.path().join("a"), 5, &Quiet).unwrap();
        assert_eq!(fs::read(&c.path).unwrap(), b"hello");
        // sha256("hello")
        assert_eq!(
            c.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(hash_file(&c.path, &Quiet).unwrap(), (5, c.sha256.clone()));
        let short = copy_prefix(&src, &dir.path().join("b"), 50, &Quiet).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            !dir.path().join("b").exists(),
            "a failed copy leaves nothing"
        );
        // Never over an existing file.
        let exists = copy_prefix(&src, &c.path, 1, &Quiet).unwrap_err();
        assert_eq!(exists.kind(), io::ErrorKind::AlreadyExists);
        let gone = copy_file(&dir.path().join("gone"), &dir.path().join("c"), &Quiet);
        assert_eq!(gone.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
