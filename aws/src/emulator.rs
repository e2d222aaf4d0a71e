//! Local AWS emulators for tests: kinesalite (Kinesis, which reshards as Kinesis does) and
//! moto server (DynamoDB and the rest), each started on a port of 127.0.0.1 that it picks
//! itself (and announces), and stopped when dropped. `scripts/emulators` (run by `scripts/test`) installs the pinned
//! versions; a test that finds them missing fails and says how to install them.
//!
//! Emulators accept any credentials; [`Emulator::env`] gives a client dummy ones.

use std::io;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running emulator; killed on drop.
#[derive(Debug)]
pub struct Emulator {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    pub addr: SocketAddr,
}

impl Emulator {
    /// Environment variables that give an AWS client dummy credentials and a region.
    pub fn env() -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Emulator {
    /// A DynamoDB client of this emulator, with dummy credentials of its own (the test
    /// process's environment is left alone).
    pub fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "emulator"))
            .build();
        aws_sdk_dynamodb::Client::from_conf(config)
    }

    /// An S3 client of this emulator, with dummy credentials of its own and path-style
    /// URLs (`http://127.0.0.1:<port>/<bucket>/<key>`: an address has no bucket
    /// subdomains).
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new("test", "test", None, None, "emulator"))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// A Firehose client of this emulator, with dummy credentials of its own.
    pub fn firehose_client(&self) -> aws_sdk_firehose::Client {
        use aws_sdk_firehose::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_firehose::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "emulator"))
            .build();
        aws_sdk_firehose::Client::from_conf(config)
    }

    /// Creates `bucket` and a Firehose delivery stream `name` delivering to it under
    /// `prefix` (moto server: an ExtendedS3 destination, which moto writes synchronously,
    /// one object per PutRecordBatch call, the call's records concatenated).
    pub async fn firehose_to_bucket(
        &self,
        name: &str,
        bucket: &str,
        prefix: &str,
    ) -> Result<(), String> {
        use aws_sdk_firehose::types::{
            BufferingHints, CompressionFormat, DeliveryStreamType,
            ExtendedS3DestinationConfiguration,
        };
        self.s3_client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| format!("create bucket {bucket}: {e:?}"))?;
        let destination = ExtendedS3DestinationConfiguration::builder()
            .role_arn("arn:aws:iam::123456789012:role/firehose-delivery")
            .bucket_arn(format!("arn:aws:s3:::{bucket}"))
            .prefix(prefix)
            // moto answers DescribeDeliveryStream with the configuration it was given, and
            // the SDK refuses a description without a compression format.
            .compression_format(CompressionFormat::Uncompressed)
            .buffering_hints(
                BufferingHints::builder()
                    .size_in_mbs(128)
                    .interval_in_seconds(300)
                    .build(),
            )
            .build()
            .map_err(|e| e.to_string())?;
        self.firehose_client()
            .create_delivery_stream()
            .delivery_stream_name(name)
            .delivery_stream_type(DeliveryStreamType::DirectPut)
            .extended_s3_destination_configuration(destination)
            .send()
            .await
            .map_err(|e| format!("create delivery stream {name}: {e:?}"))?;
        Ok(())
    }

    /// Every object of `bucket` under `prefix`, by key, with its bytes.
    pub async fn s3_objects(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, bytes::Bytes)>, String> {
        let s3 = self.s3_client();
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| format!("list {bucket}/{prefix}: {e:?}"))?;
            for object in page.contents() {
                let key = object.key().unwrap_or_default().to_owned();
                let body = s3
                    .get_object()
                    .bucket(bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| format!("get {key}: {e:?}"))?
                    .body
                    .collect()
                    .await
                    .map_err(|e| format!("read {key}: {e}"))?
                    .into_bytes();
                out.push((key, body));
            }
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// A Kinesis client of this emulator, with dummy credentials of its own.
    pub fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "emulator"))
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace root (this crate's parent directory).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn installed(path: PathBuf) -> io::Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not installed; run scripts/emulators (scripts/test does)",
                path.display()
            ),
        ))
    }
}

/// Which of a child's outputs prints the address it listens on.
#[derive(Clone, Copy)]
enum Announces {
    Stdout,
    Stderr,
}

/// Starts `command`, which binds a port of 127.0.0.1 the kernel picks and prints a line
/// holding `marker` followed by `http://127.0.0.1:<port>` once it listens; waits for that
/// line. The emulator picks its own port: a port chosen here and handed over could be taken
/// by another process in between, and a readiness probe of a port nobody listens on yet can
/// connect to itself (the kernel may pick the probe's own source port).
fn start(
    mut command: Command,
    announces: Announces,
    marker: &str,
    what: &str,
) -> io::Result<Emulator> {
    let (stdout, stderr) = match announces {
        Announces::Stdout => (Stdio::piped(), Stdio::null()),
        Announces::Stderr => (Stdio::null(), Stdio::piped()),
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {what}: {e}")))?;
    let output: Box<dyn Read + Send> = match announces {
        Announces::Stdout => Box::new(child.stdout.take().expect("piped")),
        Announces::Stderr => Box::new(child.stderr.take().expect("piped")),
    };
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_owned();
    // Reads until the address line, then drains the rest (request logs) so that the child
    // never blocks on a full pipe; ends when the child does.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = announced_port(&line, &marker)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(port);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(port) => {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                return Ok(Emulator {
                    child,
                    endpoint: format!("http://{addr}"),
                    addr,
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its output ended without the address: it exited, or is about to.
                let _ = child.kill();
                let status = child.wait()?;
                return Err(io::Error::other(format!(
                    "{what} exited before listening: {status}"
                )));
            }
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!(
                "{what} exited before listening: {status}"
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "{what} did not say where it listens within 60 s"
            )));
        }
    }
}

/// The port of `...<marker>...http://127.0.0.1:<port>...` (colour codes and all after the
/// digits ignored).
fn announced_port(line: &str, marker: &str) -> Option<u16> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = &rest[rest.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok().filter(|&port| port != 0)
}

/// Starts kinesalite in memory. Streams become ACTIVE (and reshards finish) after
/// `transition_ms`, so code that must wait for ACTIVE is exercised.
pub fn kinesalite(transition_ms: u64) -> io::Result<Emulator> {
    installed(workspace().join("tools/emulators/node_modules/.bin/kinesalite"))?;
    let script = workspace().join("tools/emulators/kinesalite.js");
    let options = format!(
        r#"{{"createStreamMs":{transition_ms},"deleteStreamMs":{transition_ms},"updateStreamMs":{transition_ms},"shardLimit":200}}"#
    );
    let mut command = Command::new("node");
    command.arg(script).arg(options);
    start(command, Announces::Stdout, "Listening at", "kinesalite")
}

/// Starts moto server (DynamoDB, S3, EventBridge, SQS, Firehose, CloudFormation).
pub fn moto() -> io::Result<Emulator> {
    let bin = installed(workspace().join(".venv/bin/moto_server"))?;
    let mut command = Command::new(bin);
    command.args(["-H", "127.0.0.1", "-p", "0"]);
    // werkzeug logs ` * Running on http://127.0.0.1:<port>` to stderr once it listens.
    start(command, Announces::Stderr, "Running on", "moto server")
}

#[cfg(test)]
mod tests {
    use super::announced_port;

    #[test]
    fn the_announced_port_is_read_from_either_emulator() {
        let moto = " * Running on http://127.0.0.1:45663";
        assert_eq!(announced_port(moto, "Running on"), Some(45663));
        let coloured = "\x1b[1m * Running on http://127.0.0.1:8080\x1b[0m";
        assert_eq!(announced_port(coloured, "Running on"), Some(8080));
        let kinesalite = "Listening at http://127.0.0.1:32943";
        assert_eq!(announced_port(kinesalite, "Listening at"), Some(32943));
        assert_eq!(announced_port("Press CTRL+C to quit", "Running on"), None);
        assert_eq!(
            announced_port(" * Running on http://127.0.0.1:0", "Running on"),
            None
        );
        assert_eq!(
            announced_port(" * Running on all addresses", "Running on"),
            None
        );
    }
}
