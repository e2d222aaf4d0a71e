//! Building AWS clients from `[aws]` and a service's own `endpoint_url`, and naming what
//! went wrong when a call fails.
//!
//! Every client has bounded timeouts (connect 3 s, each attempt 10 s), so an unreachable
//! endpoint fails at start with the service named, instead of hanging. The SDK's own
//! retries are limited to 3 attempts; the stream and lease code retries on top of that
//! with its own deadlines, and says so in its logs.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use floodgate_core::config::AwsConfig;

/// The shared SDK configuration: region, credentials chain, endpoint, timeouts, retries.
pub async fn sdk_config(aws: &AwsConfig) -> SdkConfig {
    let region = RegionProviderChain::first_try(aws.region.clone().map(Region::new))
        .or_default_provider()
        .or_else(Region::new("us-east-1"));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// A Kinesis client; `endpoint_url` (`[stream.kinesis].endpoint_url`) overrides `[aws]`'s.
pub fn kinesis(sdk: &SdkConfig, endpoint_url: Option<&str>) -> aws_sdk_kinesis::Client {
    let mut config = aws_sdk_kinesis::config::Builder::from(sdk);
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_kinesis::Client::from_conf(config.build())
}

/// A DynamoDB client; `endpoint_url` overrides `[aws]`'s.
pub fn dynamodb(sdk: &SdkConfig, endpoint_url: Option<&str>) -> aws_sdk_dynamodb::Client {
    let mut config = aws_sdk_dynamodb::config::Builder::from(sdk);
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::from_conf(config.build())
}

/// An EventBridge client; `endpoint_url` overrides `[aws]`'s.
pub fn eventbridge(sdk: &SdkConfig, endpoint_url: Option<&str>) -> aws_sdk_eventbridge::Client {
    let mut config = aws_sdk_eventbridge::config::Builder::from(sdk);
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_eventbridge::Client::from_conf(config.build())
}

/// A Firehose client; `endpoint_url` overrides `[aws]`'s.
pub fn firehose(sdk: &SdkConfig, endpoint_url: Option<&str>) -> aws_sdk_firehose::Client {
    let mut config = aws_sdk_firehose::config::Builder::from(sdk);
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    aws_sdk_firehose::Client::from_conf(config.build())
}

/// An S3 client; `endpoint_url` overrides `[aws]`'s. Whenever an endpoint is set (either
/// one), requests use path-style URLs (`http://host/bucket/key`): emulators and
/// S3-compatible stores at an address have no virtual-host names for buckets.
pub fn s3(sdk: &SdkConfig, endpoint_url: Option<&str>) -> aws_sdk_s3::Client {
    let mut config = aws_sdk_s3::config::Builder::from(sdk);
    if let Some(url) = endpoint_url {
        config = config.endpoint_url(url);
    }
    if endpoint_url.is_some() || sdk.endpoint_url().is_some() {
        config = config.force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

/// Fails, naming why, when the credentials chain finds nothing within 10 s (the instance
/// metadata lookup is the slow step off EC2).
pub async fn check_credentials(sdk: &SdkConfig) -> Result<(), String> {
    use aws_credential_types::provider::ProvideCredentials as _;
    let Some(provider) = sdk.credentials_provider() else {
        return Err("no AWS credentials provider is configured".to_owned());
    };
    match tokio::time::timeout(Duration::from_secs(10), provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "no AWS credentials (environment, profile, or instance/task role): {e}"
        )),
        Err(_) => Err("no AWS credentials: the credentials chain took over 10 s".to_owned()),
    }
}

/// One line naming an SDK failure: the service's error code and message, or the HTTP
/// status and the start of a body that is not the service's (an emulator's HTML 500),
/// or the transport failure (timeout, refused connection).
pub fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(e) => {
            let inner = e.err();
            match (inner.code(), inner.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_owned(),
                _ => format!("{inner}; raw response {:?}", e.raw()),
            }
        }
        SdkError::TimeoutError(_) => "timed out".to_owned(),
        SdkError::DispatchFailure(e) => {
            if e.is_timeout() {
                "timed out".to_owned()
            } else {
                match e.as_connector_error() {
                    Some(c) if e.is_io() => format!("cannot connect: {}", error_chain(c)),
                    Some(c) => error_chain(c),
                    None => format!("{e:?}"),
                }
            }
        }
        SdkError::ResponseError(e) => format!("unreadable response: {:?}", e.raw()),
        other => format!("{other:?}"),
    }
}

/// An error and its sources, joined with `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
