//! `floodgate aws init`: creates the AWS resources the configuration names and that are
//! missing, and waits until each is ACTIVE. Idempotent: a second run reports `exists`.
//! The Firehose delivery stream of `[archive]` is only reported (`exists` or `missing`):
//! it needs a destination the deployment makes. While it waits for a resource to become
//! ACTIVE, a spinner says so on standard error when that is a terminal.
//!
//! `floodgate aws init --check` changes nothing: it checks that each resource exists, is
//! ACTIVE and has the key schema the code expects, prints `ok` or what differs per
//! resource, and exits 1 on any drift (a deployment made by CloudFormation is checked
//! against what the code needs).

use std::process::ExitCode;

use anyhow::{Context, Result};
use floodgate_aws::check::Check;
use floodgate_core::config::{
    ArchiveBackend, CoordinationBackend, LakeStore, PublishBackend, StateBackend, StreamBackend,
};

use crate::ServeArgs;
use crate::backends::aws_sdk;
use crate::progress::waiting;
use crate::setup::{effective_config, runtime};

pub(crate) fn init(args: ServeArgs) -> Result<()> {
    let config = effective_config(&args)?;
    runtime()?.block_on(async {
        let mut any = false;
        if config.stream.backend == StreamBackend::Kinesis {
            any = true;
            let k = &config.stream.kinesis;
            let sdk = aws_sdk(&config, "kinesis").await?;
            let client = floodgate_aws::client::kinesis(&sdk, k.endpoint_url.as_deref());
            let wait = waiting(format!("kinesis stream {}: until ACTIVE", k.stream_name));
            let done = floodgate_aws::kinesis::ensure_stream(&client, &k.stream_name, k.shards)
                .await
                .with_context(|| format!("kinesis stream {:?}", k.stream_name))?;
            wait.finish_and_clear();
            println!("kinesis stream {}: {done}", k.stream_name);
            // The rejected events' stream: one shard takes 1,000 records a second, far
            // more than producers are ever refused at.
            let q = k.quarantine_stream();
            let wait = waiting(format!("kinesis stream {q}: until ACTIVE"));
            let done = floodgate_aws::kinesis::ensure_stream(&client, &q, 1)
                .await
                .with_context(|| format!("kinesis stream {q:?}"))?;
            wait.finish_and_clear();
            println!("kinesis stream {q}: {done}");
        }
        if config.coordination.backend == CoordinationBackend::Dynamodb {
            any = true;
            let c = &config.coordination;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, c.endpoint_url.as_deref());
            let wait = waiting(format!("dynamodb table {}: until ACTIVE", c.table_name));
            let done = floodgate_aws::leases::ensure_table(&client, &c.table_name)
                .await
                .with_context(|| format!("dynamodb lease table {:?}", c.table_name))?;
            wait.finish_and_clear();
            println!("dynamodb table {}: {}", c.table_name, done.as_str());
        }
        if config.state.backend == StateBackend::Dynamodb {
            any = true;
            let st = &config.state;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, st.endpoint_url.as_deref());
            let wait = waiting(format!("dynamodb table {}: until ACTIVE", st.table_name));
            let done = floodgate_aws::state::ensure_table(&client, &st.table_name)
                .await
                .with_context(|| format!("dynamodb state table {:?}", st.table_name))?;
            wait.finish_and_clear();
            println!("dynamodb table {}: {}", st.table_name, done.as_str());
        }
        if config.publish.backend == PublishBackend::Eventbridge {
            any = true;
            let p = &config.publish;
            let sdk = aws_sdk(&config, "eventbridge").await?;
            let client = floodgate_aws::client::eventbridge(&sdk, p.endpoint_url.as_deref());
            let done = floodgate_aws::eventbridge::ensure_bus(&client, &p.event_bus_name)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("eventbridge bus {}: {}", p.event_bus_name, done.as_str());
        }
        if config.lake.enabled && config.lake.store == LakeStore::S3 {
            any = true;
            let l = &config.lake;
            let sdk = aws_sdk(&config, "s3").await?;
            let client = floodgate_aws::client::s3(&sdk, l.endpoint_url.as_deref());
            let done = floodgate_aws::s3::ensure_bucket(&client, &l.bucket)
                .await
                .map_err(anyhow::Error::msg)?;
            println!("s3 bucket {}: {}", l.bucket, done.as_str());
        }
        if config.archive.backend == ArchiveBackend::Firehose {
            // Not created here: a delivery stream needs its destination (a bucket, a role
            // Firehose assumes), which the deployment makes (deploy/firehose.yaml). Reported
            // so that a missing one is seen before `serve` or `process` refuses to start.
            any = true;
            let a = &config.archive;
            let sdk = aws_sdk(&config, "firehose").await?;
            let client = floodgate_aws::client::firehose(&sdk, a.endpoint_url.as_deref());
            let state =
                floodgate_aws::firehose::describe_delivery_stream(&client, &a.delivery_stream_name)
                    .await
                    .map_err(anyhow::Error::msg)?;
            let name = &a.delivery_stream_name;
            match state {
                floodgate_aws::firehose::DeliveryStreamState::Exists(status) => {
                    println!("firehose delivery stream {name}: exists ({status})");
                }
                floodgate_aws::firehose::DeliveryStreamState::Missing => println!(
                    "firehose delivery stream {name}: missing (not created by aws init: deploy it \
                     with its S3 destination, deploy/firehose.yaml)"
                ),
            }
        }
        if !any {
            println!("nothing to create: the configuration names no AWS backend");
        }
        Ok(())
    })
}

/// `aws init --check`: one line per resource the configuration names, `ok (…)`, `missing`
/// or `drift: …`; exit status 1 when any is not ok.
pub(crate) fn check(args: ServeArgs) -> Result<ExitCode> {
    let config = effective_config(&args)?;
    runtime()?.block_on(async {
        let mut lines: Vec<(String, Check)> = Vec::new();
        if config.stream.backend == StreamBackend::Kinesis {
            let k = &config.stream.kinesis;
            let sdk = aws_sdk(&config, "kinesis").await?;
            let client = floodgate_aws::client::kinesis(&sdk, k.endpoint_url.as_deref());
            for name in [k.stream_name.clone(), k.quarantine_stream()] {
                let found = floodgate_aws::check::kinesis_stream(&client, &name)
                    .await
                    .map_err(anyhow::Error::msg)?;
                lines.push((format!("kinesis stream {name}"), found));
            }
        }
        if config.coordination.backend == CoordinationBackend::Dynamodb {
            let c = &config.coordination;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, c.endpoint_url.as_deref());
            let found = floodgate_aws::check::lease_table(&client, &c.table_name)
                .await
                .map_err(anyhow::Error::msg)?;
            lines.push((format!("dynamodb table {}", c.table_name), found));
        }
        if config.state.backend == StateBackend::Dynamodb {
            let st = &config.state;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, st.endpoint_url.as_deref());
            let found = floodgate_aws::check::state_table(&client, &st.table_name)
                .await
                .map_err(anyhow::Error::msg)?;
            lines.push((format!("dynamodb table {}", st.table_name), found));
        }
        if config.publish.backend == PublishBackend::Eventbridge {
            let p = &config.publish;
            let sdk = aws_sdk(&config, "eventbridge").await?;
            let client = floodgate_aws::client::eventbridge(&sdk, p.endpoint_url.as_deref());
            let found = floodgate_aws::check::event_bus(&client, &p.event_bus_name)
                .await
                .map_err(anyhow::Error::msg)?;
            lines.push((format!("eventbridge bus {}", p.event_bus_name), found));
        }
        if config.lake.enabled && config.lake.store == LakeStore::S3 {
            let l = &config.lake;
            let sdk = aws_sdk(&config, "s3").await?;
            let client = floodgate_aws::client::s3(&sdk, l.endpoint_url.as_deref());
            let found = floodgate_aws::check::s3_bucket(&client, &l.bucket)
                .await
                .map_err(anyhow::Error::msg)?;
            lines.push((format!("s3 bucket {}", l.bucket), found));
        }
        if config.archive.backend == ArchiveBackend::Firehose {
            let a = &config.archive;
            let sdk = aws_sdk(&config, "firehose").await?;
            let client = floodgate_aws::client::firehose(&sdk, a.endpoint_url.as_deref());
            let found = floodgate_aws::check::delivery_stream(&client, &a.delivery_stream_name)
                .await
                .map_err(anyhow::Error::msg)?;
            lines.push((
                format!("firehose delivery stream {}", a.delivery_stream_name),
                found,
            ));
        }
        if lines.is_empty() {
            println!("nothing to check: the configuration names no AWS backend");
        }
        for (resource, found) in &lines {
            println!("{resource}: {found}");
        }
        let drifted = lines.iter().filter(|(_, found)| !found.is_ok()).count();
        if drifted > 0 {
            eprintln!(
                "floodgate aws init --check: {drifted} of {} resources missing or not as expected",
                lines.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}
