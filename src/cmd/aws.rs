//! `floodgate aws init`: creates the AWS resources the configuration names and that are
//! missing, and waits until each is ACTIVE. Idempotent: a second run reports `exists`.
//! The Firehose delivery stream of `[archive]` is only reported (`exists` or `missing`):
//! it needs a destination the deployment makes.

use anyhow::{Context, Result};
use floodgate_core::config::{
    ArchiveBackend, CoordinationBackend, LakeStore, PublishBackend, StateBackend, StreamBackend,
};

use crate::ServeArgs;
use crate::backends::aws_sdk;
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
            let done = floodgate_aws::kinesis::ensure_stream(&client, &k.stream_name, k.shards)
                .await
                .with_context(|| format!("kinesis stream {:?}", k.stream_name))?;
            println!("kinesis stream {}: {done}", k.stream_name);
            // The rejected events' stream: one shard takes 1,000 records a second, far
            // more than producers are ever refused at.
            let q = k.quarantine_stream();
            let done = floodgate_aws::kinesis::ensure_stream(&client, &q, 1)
                .await
                .with_context(|| format!("kinesis stream {q:?}"))?;
            println!("kinesis stream {q}: {done}");
        }
        if config.coordination.backend == CoordinationBackend::Dynamodb {
            any = true;
            let c = &config.coordination;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, c.endpoint_url.as_deref());
            let done = floodgate_aws::leases::ensure_table(&client, &c.table_name)
                .await
                .with_context(|| format!("dynamodb lease table {:?}", c.table_name))?;
            println!("dynamodb table {}: {}", c.table_name, done.as_str());
        }
        if config.state.backend == StateBackend::Dynamodb {
            any = true;
            let st = &config.state;
            let sdk = aws_sdk(&config, "dynamodb").await?;
            let client = floodgate_aws::client::dynamodb(&sdk, st.endpoint_url.as_deref());
            let done = floodgate_aws::state::ensure_table(&client, &st.table_name)
                .await
                .with_context(|| format!("dynamodb state table {:?}", st.table_name))?;
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
