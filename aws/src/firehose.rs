//! [`FirehoseArchive`]: the [`Archive`] role on a Firehose delivery stream, one
//! `PutRecordBatch` call per [`Archive::put`]. Firehose delivers the records to its
//! destination (S3, in Floodgate's deployment) concatenated, so records made of whole
//! NDJSON lines become objects with one event per line.
//!
//! A call carries at most [`MAX_RECORDS_PER_CALL`] records and [`MAX_CALL_BYTES`] bytes,
//! each record at most [`MAX_RECORD_BYTES`] (the records' own bytes, before the base64 of
//! the JSON request). A put beyond them is refused here without a call. Records Firehose
//! failed on their own (`FailedPutCount`, an `ErrorCode` in their `RequestResponses`
//! entry) are answered as failed, the others as stored; the whole call's failures are
//! classified (throttled, unavailable, refused). The SDK retries a call up to its
//! configured attempts; everything beyond that is the caller's (the archive consumer
//! retries until the call succeeds or the process stops).
//!
//! Floodgate does not create the delivery stream: it needs a destination (a bucket, a
//! role Firehose assumes, buffering hints), which `deploy/firehose.yaml` describes.
//! [`describe_delivery_stream`] checks it at start and for `floodgate aws init`.
//!
//! Limits: <https://docs.aws.amazon.com/firehose/latest/APIReference/API_PutRecordBatch.html>

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_firehose::Client;
use aws_sdk_firehose::config::http::HttpResponse;
use aws_sdk_firehose::error::{ProvideErrorMetadata as _, SdkError};
use aws_sdk_firehose::operation::put_record_batch::PutRecordBatchError;
use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::Record;
use bytes::Bytes;
use floodgate_core::archive::{Archive, ArchiveError, ArchiveLimits, PutResults, RecordFailure};

use crate::client::describe;

/// Records in one `PutRecordBatch` call.
pub const MAX_RECORDS_PER_CALL: usize = 500;
/// Bytes of the records of one call (4 MiB), counted before base64.
pub const MAX_CALL_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of one record (1,000 KiB), before base64.
pub const MAX_RECORD_BYTES: usize = 1000 * 1024;
/// Firehose bills each record rounded up to a multiple of this (5 KB), so one small
/// event per record costs many times its size: the archive consumer packs many into one.
/// <https://aws.amazon.com/firehose/pricing/>
pub const BILLING_INCREMENT_BYTES: usize = 5 * 1024;

/// The bytes Firehose bills for a record of `len` bytes.
pub fn billed_bytes(len: usize) -> usize {
    len.div_ceil(BILLING_INCREMENT_BYTES).max(1) * BILLING_INCREMENT_BYTES
}

/// Raw events to a Firehose delivery stream (see the module docs).
#[derive(Debug, Clone)]
pub struct FirehoseArchive {
    client: Client,
    delivery_stream: String,
}

impl FirehoseArchive {
    pub fn new(client: Client, delivery_stream: impl Into<String>) -> Self {
        Self {
            client,
            delivery_stream: delivery_stream.into(),
        }
    }

    fn what(&self, detail: impl std::fmt::Display) -> String {
        format!(
            "firehose PutRecordBatch to {}: {detail}",
            self.delivery_stream
        )
    }

    /// Why a put cannot be sent as it is, if it cannot.
    fn beyond_limits(records: &[Bytes]) -> Option<String> {
        if records.len() > MAX_RECORDS_PER_CALL {
            return Some(format!(
                "{} records; a call carries at most {MAX_RECORDS_PER_CALL}",
                records.len()
            ));
        }
        if let Some(r) = records.iter().find(|r| r.len() > MAX_RECORD_BYTES) {
            return Some(format!(
                "a record of {} bytes; a record is at most {MAX_RECORD_BYTES}",
                r.len()
            ));
        }
        let total: usize = records.iter().map(Bytes::len).sum();
        (total > MAX_CALL_BYTES)
            .then(|| format!("{total} bytes; a call carries at most {MAX_CALL_BYTES}"))
    }
}

/// What kind of failure a failed call is.
fn classify(what: String, err: &SdkError<PutRecordBatchError, HttpResponse>) -> ArchiveError {
    match err {
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            match e.err().code() {
                // Firehose answers its own rate limits with ServiceUnavailableException
                // ("Slow down."); the others are what any AWS endpoint may answer.
                Some(
                    "ServiceUnavailableException"
                    | "ThrottlingException"
                    | "LimitExceededException"
                    | "RequestLimitExceeded",
                ) => ArchiveError::Throttled(what),
                _ if status >= 500 => ArchiveError::Unavailable(what),
                Some("InternalFailure" | "InternalFailureException" | "ServiceUnavailable") => {
                    ArchiveError::Unavailable(what)
                }
                _ => ArchiveError::Refused(what),
            }
        }
        // Timeouts, refused or reset connections, unreadable answers: the call may or may
        // not have been stored.
        SdkError::ConstructionFailure(_) => ArchiveError::Refused(what),
        _ => ArchiveError::Unavailable(what),
    }
}

#[async_trait]
impl Archive for FirehoseArchive {
    fn limits(&self) -> ArchiveLimits {
        ArchiveLimits {
            max_records: MAX_RECORDS_PER_CALL,
            max_bytes: MAX_CALL_BYTES,
            max_record_bytes: MAX_RECORD_BYTES,
        }
    }

    async fn put(&self, records: &[Bytes]) -> Result<PutResults, ArchiveError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(why) = Self::beyond_limits(records) {
            return Err(ArchiveError::Refused(self.what(why)));
        }
        let entries = records
            .iter()
            .map(|r| {
                Record::builder()
                    .data(Blob::new(r.to_vec()))
                    .build()
                    .map_err(|e| ArchiveError::Refused(self.what(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .put_record_batch()
            .delivery_stream_name(&self.delivery_stream)
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|e| classify(self.what(describe(&e)), &e))?;
        let answers = out.request_responses();
        // One result per record sent, in order. A record without an answer (an answer
        // shorter than the call) or without a RecordId was not shown to be stored: it is
        // sent again, at worst stored twice.
        Ok((0..records.len())
            .map(|i| match answers.get(i) {
                Some(a) if a.error_code().is_none() && a.record_id().is_some() => Ok(()),
                Some(a) => Err(RecordFailure {
                    code: a.error_code().unwrap_or("NoRecordId").to_owned(),
                    message: a.error_message().unwrap_or_default().to_owned(),
                }),
                None => Err(RecordFailure {
                    code: "NoAnswer".to_owned(),
                    message: format!(
                        "Firehose answered {} entries for {} records",
                        answers.len(),
                        records.len()
                    ),
                }),
            })
            .collect())
    }
}

/// What `DescribeDeliveryStream` says of a delivery stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStreamState {
    /// It exists; its status (`ACTIVE`, `CREATING`, `CREATING_FAILED`, `DELETING`, …).
    Exists(String),
    Missing,
}

/// Looks the delivery stream `name` up. `Err` names why it cannot be told (no endpoint,
/// no access).
pub async fn describe_delivery_stream(
    client: &Client,
    name: &str,
) -> Result<DeliveryStreamState, String> {
    match client
        .describe_delivery_stream()
        .delivery_stream_name(name)
        .send()
        .await
    {
        Ok(out) => Ok(DeliveryStreamState::Exists(
            out.delivery_stream_description()
                .map(|d| d.delivery_stream_status().as_str().to_owned())
                .unwrap_or_default(),
        )),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(DeliveryStreamState::Missing),
        Err(e) => Err(format!(
            "firehose DescribeDeliveryStream {name}: {}",
            describe(&e)
        )),
    }
}

/// How long [`wait_active`] waits for a delivery stream being created.
pub const ACTIVE_DEADLINE: Duration = Duration::from_secs(300);

/// Waits until the delivery stream `name` is `ACTIVE` (a stream being created is waited
/// for, up to [`ACTIVE_DEADLINE`]); fails naming why it is not usable: missing, failed,
/// being deleted, or not reachable.
pub async fn wait_active(client: &Client, name: &str) -> Result<(), String> {
    let started = std::time::Instant::now();
    loop {
        match describe_delivery_stream(client, name).await? {
            DeliveryStreamState::Exists(s) if s == "ACTIVE" => return Ok(()),
            DeliveryStreamState::Exists(s)
                if s == "CREATING" && started.elapsed() < ACTIVE_DEADLINE =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            DeliveryStreamState::Exists(s) => {
                return Err(format!(
                    "firehose delivery stream {name:?}: its status is {s}"
                ));
            }
            DeliveryStreamState::Missing => {
                return Err(format!(
                    "firehose delivery stream {name:?} does not exist (floodgate does not create \
                     it: deploy it with its S3 destination, e.g. deploy/firehose.yaml)"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_rounds_each_record_up_to_5_kb() {
        assert_eq!(billed_bytes(0), 5120);
        assert_eq!(billed_bytes(350), 5120);
        assert_eq!(billed_bytes(5120), 5120);
        assert_eq!(billed_bytes(5121), 10240);
    }

    #[test]
    fn puts_beyond_the_limits_are_named() {
        let small = Bytes::from_static(b"{}\n");
        assert!(FirehoseArchive::beyond_limits(&vec![small.clone(); 500]).is_none());
        let why = FirehoseArchive::beyond_limits(&vec![small; 501]).unwrap();
        assert!(why.contains("501 records"), "{why}");
        let max = Bytes::from(vec![b'x'; MAX_RECORD_BYTES]);
        assert!(FirehoseArchive::beyond_limits(std::slice::from_ref(&max)).is_none());
        let why = FirehoseArchive::beyond_limits(&[Bytes::from(vec![b'x'; MAX_RECORD_BYTES + 1])])
            .unwrap();
        assert!(why.contains("a record of"), "{why}");
        // Four records at the limit fit a call (4,096,000 bytes); a fifth does not.
        assert!(FirehoseArchive::beyond_limits(&vec![max.clone(); 4]).is_none());
        let why = FirehoseArchive::beyond_limits(&vec![max; 5]).unwrap();
        assert!(why.contains("bytes; a call carries"), "{why}");
    }
}
