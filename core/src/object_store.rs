//! The object store role: where the lake's files live. A local directory in the embedded
//! deployment, S3 in AWS; the lake writes through this trait only.
//!
//! Keys are `/`-separated paths relative to the store's root, such as
//! `booking_requested/dt=2026-12-01/hour=05/0-10-19.parquet`; `=` is an ordinary character.
//! Two ways to write: [`ObjectStore::put`] replaces (the lake's manifests), and
//! [`ObjectStore::put_new`] only ever creates (data files, whose name fixes their rows, so
//! a name that exists already holds them). Every implementation passes the conformance
//! suite in `sinks/tests/object_store_conformance/`.

use async_trait::async_trait;
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object store I/O on {key}: {message}")]
    Io { key: String, message: String },
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `/`-separated, relative to the store's root (`booking_requested/dt=…/x.parquet`).
    pub key: String,
    pub size: u64,
}

/// What a [`ObjectStore::put_new`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// No object had the key; the bytes given are stored under it now.
    Created,
    /// An object had the key already; it was left as it was, and the bytes given dropped.
    Exists,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, replacing any object there. Atomic and durable: once
    /// it returns, readers see all of the new object; before, all of the old one or none.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError>;
    /// Stores `bytes` under `key` only if no object has that key: [`PutOutcome::Created`].
    /// If one has, nothing changes and the answer is [`PutOutcome::Exists`]. The check and
    /// the write are one atomic step, so of two concurrent calls for one key exactly one
    /// creates it; the stored object is atomic and durable as with [`ObjectStore::put`].
    ///
    /// Idempotent for a caller whose name fixes the content (a lake file's run): an error
    /// may hide a write that took effect (an answer lost on the way), and calling again
    /// then answers `Exists`.
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError>;
    /// The object under `key`, whole; `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError>;
    /// Every object whose key starts with `prefix` (plain string comparison: `t/` lists
    /// table `t`, not `tt`), sorted by key. `""` lists the whole store, which on S3 is
    /// one request per 1,000 objects: list the narrowest prefix that will do.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
}
