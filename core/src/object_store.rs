//! The object store role: where the lake's files live. A local directory in the embedded
//! deployment, S3 in AWS; the lake writes through this trait only.

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

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, replacing any object there. Atomic and durable: once
    /// it returns, readers see all of the new object; before, all of the old one or none.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError>;
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError>;
    /// Removes `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
}
