//! `floodgate aws init --check`: whether each AWS resource the configuration names exists,
//! is usable and has the shape the code expects (a table's key schema), without changing
//! anything. A deployment made some other way (CloudFormation, `deploy/`) is checked
//! against the same expectations `aws init` creates to.
//!
//! Each check answers a [`Check`]; `Err` only when the service cannot be asked (no
//! endpoint, no credentials, an error that says nothing about the resource).

use std::fmt;

use aws_sdk_dynamodb::types::{KeyType, ScalarAttributeType, TableStatus};
use aws_sdk_kinesis::types::StreamStatus;

use crate::client::describe;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Present and as expected; what was seen (a status, a shard count).
    Ok(String),
    Missing,
    /// Present but not as the code expects.
    Drift(String),
}

impl Check {
    pub fn is_ok(&self) -> bool {
        matches!(self, Check::Ok(_))
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Ok(seen) => write!(f, "ok ({seen})"),
            Check::Missing => f.write_str("missing"),
            Check::Drift(what) => write!(f, "drift: {what}"),
        }
    }
}

/// A Kinesis stream: present and ACTIVE (or UPDATING, while it reshards).
pub async fn kinesis_stream(client: &aws_sdk_kinesis::Client, name: &str) -> Result<Check, String> {
    use aws_sdk_kinesis::error::ProvideErrorMetadata as _;
    let out = match client
        .describe_stream_summary()
        .stream_name(name)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(Check::Missing),
        Err(e) => {
            return Err(format!(
                "Kinesis DescribeStreamSummary {name}: {}",
                describe(&e)
            ));
        }
    };
    let Some(summary) = out.stream_description_summary() else {
        return Err(format!(
            "Kinesis DescribeStreamSummary {name}: an empty answer"
        ));
    };
    let status = summary.stream_status();
    let mode = summary
        .stream_mode_details()
        .map_or("PROVISIONED", |m| m.stream_mode().as_str());
    let seen = format!(
        "{}, {mode}, {} open shards",
        status.as_str(),
        summary.open_shard_count()
    );
    Ok(match status {
        StreamStatus::Active | StreamStatus::Updating => Check::Ok(seen),
        _ => Check::Drift(format!("status {seen}")),
    })
}

/// The lease table: keyed by `leaseKey` (S, hash), as KCL and [`crate::leases`] expect.
pub async fn lease_table(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<Check, String> {
    dynamodb_table(client, name, &[(crate::leases::LEASE_KEY, KeyType::Hash)]).await
}

/// The state table: `pk` (S, hash) and `sk` (S, range), as [`crate::state`] expects.
pub async fn state_table(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<Check, String> {
    dynamodb_table(
        client,
        name,
        &[
            (crate::state::PK, KeyType::Hash),
            (crate::state::SK, KeyType::Range),
        ],
    )
    .await
}

/// A DynamoDB table: present, ACTIVE, and keyed exactly by `keys` (`(attribute, type)`,
/// hash key first), each a string attribute.
pub async fn dynamodb_table(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
    keys: &[(&str, KeyType)],
) -> Result<Check, String> {
    use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
    let out = match client.describe_table().table_name(name).send().await {
        Ok(out) => out,
        Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(Check::Missing),
        Err(e) => return Err(format!("DynamoDB DescribeTable {name}: {}", describe(&e))),
    };
    let Some(table) = out.table() else {
        return Err(format!("DynamoDB DescribeTable {name}: an empty answer"));
    };
    let attribute_type = |attribute: &str| {
        table
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == attribute)
            .map(|d| d.attribute_type().clone())
    };
    let found: Vec<(String, KeyType, Option<ScalarAttributeType>)> = table
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_owned(),
                k.key_type().clone(),
                attribute_type(k.attribute_name()),
            )
        })
        .collect();
    let wanted: Vec<(String, KeyType, Option<ScalarAttributeType>)> = keys
        .iter()
        .map(|(a, t)| ((*a).to_owned(), t.clone(), Some(ScalarAttributeType::S)))
        .collect();
    let show = |keys: &[(String, KeyType, Option<ScalarAttributeType>)]| {
        keys.iter()
            .map(|(a, t, ty)| {
                let ty = ty.as_ref().map_or("?", ScalarAttributeType::as_str);
                format!("{a} ({} {ty})", t.as_str())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if found != wanted {
        return Ok(Check::Drift(format!(
            "key schema is [{}], expected [{}]",
            show(&found),
            show(&wanted)
        )));
    }
    let status = table.table_status().cloned();
    let seen = format!(
        "{}, key [{}]",
        status.as_ref().map_or("no status", TableStatus::as_str),
        show(&found)
    );
    Ok(match status {
        Some(TableStatus::Active | TableStatus::Updating) => Check::Ok(seen),
        _ => Check::Drift(format!("status {seen}")),
    })
}

/// An S3 bucket this identity can reach.
pub async fn s3_bucket(client: &aws_sdk_s3::Client, name: &str) -> Result<Check, String> {
    match client.head_bucket().bucket(name).send().await {
        Ok(_) => Ok(Check::Ok("reachable".to_owned())),
        Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(404) => Ok(Check::Missing),
            Some(403) => Ok(Check::Drift(
                "exists, but this identity may not use it (403)".to_owned(),
            )),
            _ => Err(format!("S3 HeadBucket {name}: {}", describe(&e))),
        },
    }
}

/// An EventBridge bus.
pub async fn event_bus(client: &aws_sdk_eventbridge::Client, name: &str) -> Result<Check, String> {
    use aws_sdk_eventbridge::error::ProvideErrorMetadata as _;
    match client.describe_event_bus().name(name).send().await {
        Ok(out) => Ok(Check::Ok(out.arn().unwrap_or("no ARN").to_owned())),
        Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(Check::Missing),
        Err(e) => Err(format!(
            "EventBridge DescribeEventBus {name}: {}",
            describe(&e)
        )),
    }
}

/// A Firehose delivery stream, ACTIVE.
pub async fn delivery_stream(
    client: &aws_sdk_firehose::Client,
    name: &str,
) -> Result<Check, String> {
    use crate::firehose::DeliveryStreamState;
    Ok(
        match crate::firehose::describe_delivery_stream(client, name).await? {
            DeliveryStreamState::Exists(status) if status == "ACTIVE" => Check::Ok(status),
            DeliveryStreamState::Exists(status) => Check::Drift(format!("status {status}")),
            DeliveryStreamState::Missing => Check::Missing,
        },
    )
}
