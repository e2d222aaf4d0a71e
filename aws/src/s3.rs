//! The lake's object store on Amazon S3: [`S3Store`] implements [`ObjectStore`] on one
//! bucket, under one key prefix.
//!
//! # Keys
//!
//! A store key `booking_requested/dt=2026-12-01/hour=05/0-1-9.parquet` is the S3 key
//! `<prefix>booking_requested/dt=…` (the prefix is [`DEFAULT_PREFIX`] unless configured; one
//! that does not end in `/` is given one). Keys are checked: not empty, and no empty, `.` or
//! `..` segment (`InvalidKey`, as the local store answers keys that would leave its
//! directory), so a key names the same object on both backends. `list` answers keys
//! relative to the prefix, sorted; "folder" markers (keys ending in `/`, which consoles
//! create) are not objects of the lake and are skipped.
//!
//! # Semantics of each call
//!
//! - `put` replaces: one PutObject, or a multipart upload above [`MULTIPART_THRESHOLD_BYTES`].
//!   S3 makes either visible whole, at once, once it answers.
//! - `put_new` creates only: the same requests with `If-None-Match: *` (on the
//!   CompleteMultipartUpload for a multipart upload), which S3 checks atomically. HTTP 412
//!   `PreconditionFailed` means an object has the key: [`PutOutcome::Exists`], nothing
//!   changed. HTTP 409 `ConditionalRequestConflict` (a concurrent write of the key was in
//!   flight) is retried, the whole upload again, up to [`CONFLICT_ATTEMPTS`] times. An
//!   answer lost after S3 stored the object (a timeout, a reset) is safe: the SDK's retry,
//!   or the caller's, then gets 412, hence `Exists`.
//! - `get` reads the whole object, `None` for `NoSuchKey`; a missing bucket is an error.
//!   It asks for the stored checksum (`x-amz-checksum-mode: ENABLED`), which the SDK then
//!   checks against the bytes received.
//! - `list` pages through ListObjectsV2 (1,000 keys a request); callers list by table
//!   prefix (`<table>/`), never the whole lake, on their hot paths.
//! - `delete` is DeleteObject, which S3 answers the same for a missing key: idempotent.
//!
//! # Integrity
//!
//! Every PutObject and UploadPart carries a CRC32C of its body (`x-amz-checksum-crc32c`),
//! which S3 recomputes and refuses the request on a mismatch, so a body corrupted between
//! memory and S3 is never stored. moto server (the tests' emulator) stores the checksum
//! without verifying it; the tests show that it is sent and stored, not that it is checked.
//!
//! # Failures
//!
//! Every error is [`ObjectError::Io`] naming the operation, the bucket and S3 key, and
//! the service's error code and message (see [`crate::client::describe`]). A failed
//! multipart upload is aborted; a process that dies mid-upload leaves its parts behind, so
//! the bucket should have a lifecycle rule `AbortIncompleteMultipartUpload` (a day is
//! plenty). Timeouts and transient-error retries are the client's
//! ([`crate::client::sdk_config`]: each attempt 10 s, 3 attempts); a 16 MiB part within one
//! attempt needs 1.6 MB/s.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use floodgate_core::object_store::{ObjectError, ObjectMeta, ObjectStore, PutOutcome};

use crate::client::describe;

/// Objects larger than this are uploaded in parts. S3 takes up to 5 GiB in one PutObject,
/// but a 16 MiB request stays within one attempt's timeout on a slow link, and a failed
/// part is retried alone.
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/mpuoverview.html>
pub const MULTIPART_THRESHOLD_BYTES: usize = 16 << 20;

/// The size of each part but the last. S3 wants at least 5 MiB (the last part excepted)
/// and at most 10,000 parts, so objects up to 156 GiB fit.
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html>
pub const PART_BYTES: usize = 16 << 20;

/// Keys per ListObjectsV2 page: S3's maximum.
/// <https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html>
pub const LIST_PAGE_KEYS: i32 = 1000;

/// Attempts of a `put_new` that S3 answers 409 `ConditionalRequestConflict`, with
/// [`CONFLICT_BACKOFF`] doubling between them.
/// <https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html>
pub const CONFLICT_ATTEMPTS: u32 = 4;
pub const CONFLICT_BACKOFF: Duration = Duration::from_millis(100);

/// The prefix for the lake's objects when the configuration names none.
pub const DEFAULT_PREFIX: &str = "lake/";

/// [`ObjectStore`] on an S3 bucket; see the module docs.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ends in `/`.
    prefix: String,
    list_page_keys: i32,
}

impl S3Store {
    /// The store on `bucket` under `prefix` (`lake/`; `""` for the bucket's root).
    pub fn new(client: Client, bucket: impl Into<String>, prefix: &str) -> Self {
        let prefix = prefix.trim_start_matches('/');
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_owned()
        } else {
            format!("{prefix}/")
        };
        Self {
            client,
            bucket: bucket.into(),
            prefix,
            list_page_keys: LIST_PAGE_KEYS,
        }
    }

    /// The store on `bucket` under `prefix`, with a client built by [`crate::client::s3`]
    /// (path-style URLs whenever an endpoint is set).
    pub fn from_sdk(
        sdk: &SdkConfig,
        endpoint_url: Option<&str>,
        bucket: impl Into<String>,
        prefix: &str,
    ) -> Self {
        Self::new(crate::client::s3(sdk, endpoint_url), bucket, prefix)
    }

    /// Lists `keys` keys per request instead of [`LIST_PAGE_KEYS`] (1 to 1,000), so tests
    /// page through a few objects.
    pub fn with_list_page_keys(mut self, keys: i32) -> Self {
        self.list_page_keys = keys.clamp(1, LIST_PAGE_KEYS);
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Empty, or ends in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The S3 key of store key `key`, once checked.
    fn s3_key(&self, key: &str) -> Result<String, ObjectError> {
        let valid = !key.is_empty() && key.split('/').all(|s| !matches!(s, "" | "." | ".."));
        if !valid {
            return Err(ObjectError::InvalidKey(key.to_owned()));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    fn error<E, R>(&self, op: &str, key: &str, s3_key: &str, err: &SdkError<E, R>) -> ObjectError
    where
        E: ProvideErrorMetadata + std::error::Error,
        R: std::fmt::Debug,
    {
        ObjectError::Io {
            key: key.to_owned(),
            message: format!("s3 {op} s3://{}/{s3_key}: {}", self.bucket, describe(err)),
        }
    }

    /// Stores `bytes` at `s3_key`, under `If-None-Match: *` when `create_only`. One
    /// attempt as far as conflicts go: 409 is the caller's to retry.
    async fn upload(
        &self,
        key: &str,
        s3_key: &str,
        bytes: Bytes,
        create_only: bool,
    ) -> Result<Written, ObjectError> {
        if bytes.len() > MULTIPART_THRESHOLD_BYTES {
            return self.upload_parts(key, s3_key, bytes, create_only).await;
        }
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(s3_key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .set_if_none_match(create_only.then(|| "*".to_owned()))
            .body(ByteStream::from(bytes))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Written::Stored),
            Err(e) => Err(self.classify("PutObject", key, s3_key, &e)),
        }
        .or_else(Written::from_refusal)
    }

    /// A multipart upload of `bytes` in parts of [`PART_BYTES`], one after another; aborted
    /// on any failure.
    async fn upload_parts(
        &self,
        key: &str,
        s3_key: &str,
        bytes: Bytes,
        create_only: bool,
    ) -> Result<Written, ObjectError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(s3_key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .send()
            .await
            .map_err(|e| self.error("CreateMultipartUpload", key, s3_key, &e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(ObjectError::Io {
                key: key.to_owned(),
                message: format!(
                    "s3 CreateMultipartUpload s3://{}/{s3_key}: the answer has no upload id",
                    self.bucket
                ),
            });
        };
        let outcome = self
            .send_parts(key, s3_key, upload_id, bytes, create_only)
            .await;
        if !matches!(outcome, Ok(Written::Stored)) {
            // Parts of an upload that is neither completed nor aborted are kept, and
            // billed, until a lifecycle rule removes them.
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(s3_key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(
                    bucket = %self.bucket,
                    key = s3_key,
                    error = %describe(&e),
                    "cannot abort a failed multipart upload; its parts stay until the bucket's lifecycle rule removes them"
                );
            }
        }
        outcome
    }

    async fn send_parts(
        &self,
        key: &str,
        s3_key: &str,
        upload_id: &str,
        bytes: Bytes,
        create_only: bool,
    ) -> Result<Written, ObjectError> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number = 1;
        while start < bytes.len() {
            let end = (start + PART_BYTES).min(bytes.len());
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(s3_key)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .body(ByteStream::from(bytes.slice(start..end)))
                .send()
                .await
                .map_err(|e| self.error("UploadPart", key, s3_key, &e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .set_checksum_crc32_c(part.checksum_crc32_c().map(str::to_owned))
                    .build(),
            );
            start = end;
            number += 1;
        }
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(s3_key)
            .upload_id(upload_id)
            .set_if_none_match(create_only.then(|| "*".to_owned()))
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(Written::Stored),
            Err(e) => Err(self.classify("CompleteMultipartUpload", key, s3_key, &e)),
        }
        .or_else(Written::from_refusal)
    }

    /// A failed write: a refusal of its condition (412, 409) or an error.
    fn classify<E>(
        &self,
        op: &str,
        key: &str,
        s3_key: &str,
        err: &SdkError<E, HttpResponse>,
    ) -> Refused
    where
        E: ProvideErrorMetadata + std::error::Error,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code();
        if status == Some(412) || code == Some("PreconditionFailed") {
            Refused::Exists
        } else if status == Some(409) || code == Some("ConditionalRequestConflict") {
            Refused::Conflict(self.error(op, key, s3_key, err))
        } else {
            Refused::Error(self.error(op, key, s3_key, err))
        }
    }

    /// `put` and `put_new`: uploads, retrying what S3 answers 409.
    async fn write(
        &self,
        key: &str,
        bytes: Bytes,
        create_only: bool,
    ) -> Result<PutOutcome, ObjectError> {
        let s3_key = self.s3_key(key)?;
        let mut backoff = CONFLICT_BACKOFF;
        let mut attempt = 1;
        loop {
            match self
                .upload(key, &s3_key, bytes.clone(), create_only)
                .await?
            {
                Written::Stored => return Ok(PutOutcome::Created),
                Written::Exists => return Ok(PutOutcome::Exists),
                Written::Conflict(e) if attempt >= CONFLICT_ATTEMPTS => return Err(e),
                Written::Conflict(e) => {
                    tracing::debug!(bucket = %self.bucket, key = %s3_key, attempt, error = %e, "s3 conditional write conflict; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
            }
        }
    }
}

/// How an upload ended, conditions included.
enum Written {
    Stored,
    /// 412: `If-None-Match: *` found an object.
    Exists,
    /// 409: a concurrent conditional write of the key; S3 says to retry.
    Conflict(ObjectError),
}

/// Why a write did not store its object.
enum Refused {
    Exists,
    Conflict(ObjectError),
    Error(ObjectError),
}

impl Written {
    fn from_refusal(refused: Refused) -> Result<Written, ObjectError> {
        match refused {
            Refused::Exists => Ok(Written::Exists),
            Refused::Conflict(e) => Ok(Written::Conflict(e)),
            Refused::Error(e) => Err(e),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        self.write(key, bytes, false).await.map(|_| ())
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, ObjectError> {
        self.write(key, bytes, true).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        let s3_key = self.s3_key(key)?;
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await;
        let object = match result {
            Ok(o) => o,
            Err(e) => {
                let missing = match &e {
                    SdkError::ServiceError(s) => {
                        matches!(s.err(), GetObjectError::NoSuchKey(_))
                            // A 404 without a body names no bucket; NoSuchBucket is an error.
                            || (s.raw().status().as_u16() == 404
                                && s.err().code() != Some("NoSuchBucket"))
                    }
                    _ => false,
                };
                if missing {
                    return Ok(None);
                }
                return Err(self.error("GetObject", key, &s3_key, &e));
            }
        };
        let body = object.body.collect().await.map_err(|e| ObjectError::Io {
            key: key.to_owned(),
            message: format!(
                "s3 GetObject s3://{}/{s3_key}: reading the body: {}",
                self.bucket,
                crate::client::error_chain(&e)
            ),
        })?;
        Ok(Some(body.into_bytes()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let s3_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&s3_prefix)
                .max_keys(self.list_page_keys)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("ListObjectsV2", prefix, &s3_prefix, &e))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if key.is_empty() || key.ends_with('/') {
                    continue;
                }
                out.push(ObjectMeta {
                    key: key.to_owned(),
                    size: object.size().map_or(0, |s| u64::try_from(s).unwrap_or(0)),
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let s3_key = self.s3_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&s3_key)
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", key, &s3_key, &e))?;
        Ok(())
    }
}

/// Creates the bucket `name` if it is missing (in the client's region), and reports which.
/// Idempotent: a bucket this account owns already is `Exists`; one another account owns
/// is an error.
pub async fn ensure_bucket(
    client: &Client,
    name: &str,
) -> Result<crate::leases::TableOutcome, String> {
    use crate::leases::TableOutcome;
    use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
    match client.head_bucket().bucket(name).send().await {
        Ok(_) => return Ok(TableOutcome::Exists),
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {}
        Err(e) => return Err(format!("S3 HeadBucket {name}: {}", describe(&e))),
    }
    let region = client
        .config()
        .region()
        .map(|r| r.as_ref().to_owned())
        .unwrap_or_default();
    let mut create = client.create_bucket().bucket(name);
    // us-east-1 takes no location constraint; every other region needs its own.
    if !region.is_empty() && region != "us-east-1" {
        create = create.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region.as_str()))
                .build(),
        );
    }
    match create.send().await {
        Ok(_) => Ok(TableOutcome::Created),
        Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(TableOutcome::Exists),
        Err(e) => Err(format!("S3 CreateBucket {name}: {}", describe(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(prefix: &str) -> S3Store {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .build();
        S3Store::new(Client::from_conf(config), "b", prefix)
    }

    #[test]
    fn the_prefix_is_a_directory() {
        assert_eq!(store("lake/").prefix(), "lake/");
        assert_eq!(store("lake").prefix(), "lake/");
        assert_eq!(store("/lake").prefix(), "lake/");
        assert_eq!(store("").prefix(), "");
        assert_eq!(store("a/b/").prefix(), "a/b/");
    }

    #[test]
    fn keys_are_checked_as_the_local_store_checks_them() {
        let s = store("lake/");
        assert_eq!(
            s.s3_key("t/dt=2026-12-01/hour=05/x.parquet").unwrap(),
            "lake/t/dt=2026-12-01/hour=05/x.parquet"
        );
        for bad in ["", "/t", "t/", "t//x", "../x", "t/./x", "t/../x"] {
            assert!(
                matches!(s.s3_key(bad), Err(ObjectError::InvalidKey(_))),
                "{bad:?} accepted"
            );
        }
    }
}
