//! A fault-injecting HTTP proxy between the AWS SDK and an emulator (kinesalite for
//! Kinesis, moto server for DynamoDB). The emulators never fail, throttle or time out on
//! their own, so without this proxy no test could show that nothing acknowledged is lost
//! when AWS does.
//!
//! # How tests use it
//!
//! Start the emulator, start a [`FaultProxy`] in front of it, and give the SDK client the
//! proxy's [`endpoint`](FaultProxy::endpoint). Everything passes through unchanged until a
//! [`FaultPlan`] says otherwise; the plan can be replaced at any time with
//! [`set`](FaultProxy::set), and [`injected`](FaultProxy::injected) says what was done.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use floodgate_aws::fault_proxy::{Fault, FaultPlan, FaultProxy, RecordError, Rule};
//!
//! let kinesalite = floodgate_aws::emulator::kinesalite(0)?;
//! let proxy = FaultProxy::start(kinesalite.addr).await?;
//! // ... build the Kinesis client with endpoint_url = proxy.endpoint() ...
//! proxy.set(
//!     FaultPlan::seeded(7)
//!         // The next 3 PutRecords calls are throttled as a whole, then calls behave.
//!         .rule(Rule::new("PutRecords", Fault::throughput_exceeded()).times(3))
//!         // Of the records in the calls that get through, every 4th fails on its own.
//!         .rule(
//!             Rule::new("PutRecords", Fault::FailRecords(RecordError::ThroughputExceeded))
//!                 .every(4),
//!         ),
//! );
//! // ... write ...
//! let injected = proxy.injected();
//! assert_eq!(injected.by_rule[0], 3);
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - A [`Rule`] matches a call by its `X-Amz-Target` header: the whole value
//!   (`Kinesis_20131202.PutRecords`), the operation alone (`PutRecords`), or `*` for any.
//!   S3's REST calls carry no such header: the proxy names them `S3.<Operation>` from the
//!   method, the path (path-style: `/bucket/key`) and the query (`S3.PutObject`,
//!   `S3.UploadPart`, `S3.ListObjectsV2`, …; see [`s3_operation`]), and answers their
//!   faults as S3 does, in XML (`<Error><Code>SlowDown</Code>…`).
//! - Rules are tried in order and the first that fires decides the call; a call that one
//!   rule faulted is not counted by the rules after it. A rule fires on every n-th call it
//!   sees ([`Rule::every`]) or with a probability drawn from the plan's seeded generator
//!   ([`Rule::probability`]; the same seed and the same order of calls give the same
//!   faults), and at most [`Rule::times`] times.
//! - [`Fault::FailRecords`] rules work per record of a forwarded batch call instead —
//!   Kinesis `PutRecords`, Firehose `PutRecordBatch` and EventBridge `PutEvents`: each
//!   record (entry) is one candidate, and a record that fires is *removed* from the
//!   request's `Records` (`Entries`) so the emulator never stores it, then a failed entry
//!   is spliced back into the answer at its index
//!   (`Records` for Kinesis, `RequestResponses` for Firehose, `Entries` for EventBridge,
//!   each with `ErrorCode` and `ErrorMessage`) and the failed count (`FailedRecordCount`,
//!   `FailedPutCount`, `FailedEntryCount`) is raised.
//!   If every record is removed, the proxy answers without forwarding. The Rust SDK sends
//!   all three as AWS JSON 1.1 (`application/x-amz-json-1.1`, not CBOR); a body that is not JSON
//!   is refused with a 400 `FaultProxyUnsupportedBody` instead of passing through silently
//!   unfaulted.
//! - Requests are forwarded as they came, SigV4 headers and `Host` (the proxy's address)
//!   included: kinesalite and moto check that a request is signed but not the signature,
//!   so neither that `Host` nor a PutRecords body with records removed is refused.
//! - A forwarded call runs to its end upstream even if the client hangs up, so whether a
//!   call was applied depends on the plan only, never on a client's timeout.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// When a fault strikes a call that is otherwise forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The emulator never sees the call: it was not applied.
    BeforeForwarding,
    /// The emulator applied the call, but its answer is withheld: the client cannot tell
    /// whether it was applied, and a retry writes it twice.
    AfterForwarding,
}

/// The per-record failure a [`Fault::FailRecords`] rule puts into a batch call's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// The write limit: Kinesis' `ProvisionedThroughputExceededException` (the shard's),
    /// Firehose's `ServiceUnavailableException` (the delivery stream's, "Slow down.").
    ThroughputExceeded,
    /// `InternalFailure`.
    InternalFailure,
}

/// What a rule does to a call (or, for `FailRecords`, to a record).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Kinesis PutRecords, Firehose PutRecordBatch and EventBridge PutEvents only: the
    /// record (entry) is removed before forwarding and answered as failed with this error.
    FailRecords(RecordError),
    /// An AWS JSON error answered without forwarding: this status and
    /// `{"__type": code, "message": …}`.
    Error { status: u16, code: String },
    /// The HTML 500 page moto's web framework answers when moto itself has a bug.
    Html500,
    /// The call is held for `hold` (longer than the client's timeout), then its connection
    /// is reset without an answer. Before forwarding it is never applied; after, it is.
    Hold { phase: Phase, hold: Duration },
    /// The connection is reset (TCP RST) without an answer.
    Reset(Phase),
}

impl Fault {
    /// A 400 `ProvisionedThroughputExceededException` (Kinesis and DynamoDB both use it).
    pub fn throughput_exceeded() -> Fault {
        Fault::error(400, "ProvisionedThroughputExceededException")
    }

    /// A 400 `ThrottlingException` (any AWS service's request-rate limit).
    pub fn throttling() -> Fault {
        Fault::error(400, "ThrottlingException")
    }

    /// A 500 `InternalFailure` (Kinesis; DynamoDB calls it `InternalServerError`).
    pub fn internal_failure() -> Fault {
        Fault::error(500, "InternalFailure")
    }

    /// A 503 `ServiceUnavailable`.
    pub fn service_unavailable() -> Fault {
        Fault::error(503, "ServiceUnavailable")
    }

    /// S3's 503 `SlowDown`: the request rate of a prefix is too high.
    pub fn slow_down() -> Fault {
        Fault::error(503, "SlowDown")
    }

    /// Any AWS error: JSON for the JSON protocols, XML for S3.
    pub fn error(status: u16, code: &str) -> Fault {
        Fault::Error {
            status,
            code: code.to_owned(),
        }
    }
}

/// When a rule fires among the candidates it sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// On the n-th, 2n-th, … candidate (`Every(1)`: every one).
    Every(u64),
    /// Each candidate with this probability, from the plan's seeded generator.
    Probability(f64),
}

/// One fault, the calls it matches, and when it fires.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    target: String,
    fault: Fault,
    trigger: Trigger,
    max: Option<u64>,
}

impl Rule {
    /// `fault` on every call whose `X-Amz-Target` matches `target` (see the module docs).
    pub fn new(target: &str, fault: Fault) -> Rule {
        Rule {
            target: target.to_owned(),
            fault,
            trigger: Trigger::Every(1),
            max: None,
        }
    }

    /// Fires on every n-th candidate only.
    pub fn every(mut self, n: u64) -> Rule {
        self.trigger = Trigger::Every(n.max(1));
        self
    }

    /// Fires on each candidate with probability `p`.
    pub fn probability(mut self, p: f64) -> Rule {
        self.trigger = Trigger::Probability(p);
        self
    }

    /// Fires at most `max` times, then lets everything through.
    pub fn times(mut self, max: u64) -> Rule {
        self.max = Some(max);
        self
    }

    fn matches(&self, target: &str) -> bool {
        self.target == "*"
            || self.target == target
            || target
                .rsplit_once('.')
                .is_some_and(|(_, op)| op == self.target)
    }
}

/// The rules in force and the seed of their random draws. The default plan injects nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    seed: u64,
    rules: Vec<Rule>,
}

impl FaultPlan {
    /// An empty plan whose probabilities are drawn from `seed`.
    pub fn seeded(seed: u64) -> FaultPlan {
        FaultPlan {
            seed,
            rules: Vec::new(),
        }
    }

    /// Adds a rule after the existing ones.
    pub fn rule(mut self, rule: Rule) -> FaultPlan {
        self.rules.push(rule);
        self
    }
}

/// What the proxy saw and did since the plan was last set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injected {
    /// Per rule of the plan, in order: how often it fired (records, for `FailRecords`).
    pub by_rule: Vec<u64>,
    /// Calls seen, by `X-Amz-Target`.
    pub calls: BTreeMap<String, u64>,
    /// Calls forwarded to the emulator (whole, or with records removed).
    pub forwarded: u64,
}

impl Injected {
    /// All faults injected, over every rule.
    pub fn total(&self) -> u64 {
        self.by_rule.iter().sum()
    }
}

/// The plan in force and its counters, shared by every connection.
#[derive(Debug)]
struct State {
    plan: FaultPlan,
    rng: u64,
    /// Per rule: candidates seen (for `Every`) while it could still fire.
    seen: Vec<u64>,
    injected: Injected,
}

impl State {
    fn new(plan: FaultPlan) -> State {
        let n = plan.rules.len();
        State {
            rng: plan.seed,
            seen: vec![0; n],
            injected: Injected {
                by_rule: vec![0; n],
                ..Injected::default()
            },
            plan,
        }
    }

    /// Counts one candidate for rule `i` and says whether the rule fires on it.
    fn fires(&mut self, i: usize) -> bool {
        let rule = &self.plan.rules[i];
        if rule.max.is_some_and(|max| self.injected.by_rule[i] >= max) {
            return false;
        }
        self.seen[i] += 1;
        let fire = match rule.trigger {
            Trigger::Every(n) => self.seen[i].is_multiple_of(n),
            Trigger::Probability(p) => self.next_unit() < p,
        };
        if fire {
            self.injected.by_rule[i] += 1;
        }
        fire
    }

    /// The call-level fault for a call to `target`, if a rule fires on it.
    fn call_fault(&mut self, target: &str) -> Option<Fault> {
        *self.injected.calls.entry(target.to_owned()).or_default() += 1;
        for i in 0..self.plan.rules.len() {
            let rule = &self.plan.rules[i];
            if !matches!(rule.fault, Fault::FailRecords(_)) && rule.matches(target) && self.fires(i)
            {
                return Some(self.plan.rules[i].fault.clone());
            }
        }
        None
    }

    fn has_record_rules(&self, target: &str) -> bool {
        self.plan
            .rules
            .iter()
            .any(|r| matches!(r.fault, Fault::FailRecords(_)) && r.matches(target))
    }

    /// The failure, if any, for each of a batch call's `count` records.
    fn record_faults(&mut self, target: &str, count: usize) -> Vec<Option<RecordError>> {
        (0..count)
            .map(|_| {
                for i in 0..self.plan.rules.len() {
                    let rule = &self.plan.rules[i];
                    if let Fault::FailRecords(error) = rule.fault
                        && rule.matches(target)
                        && self.fires(i)
                    {
                        return Some(error);
                    }
                }
                None
            })
            .collect()
    }

    /// SplitMix64: small, seedable and good enough to pick which calls fail.
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    state: Mutex<State>,
}

impl Shared {
    /// The state, even if a handler panicked while holding it (its counters stay usable).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running proxy on `127.0.0.1`; stops (resetting its connections) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`, injecting nothing
    /// until [`set`](Self::set) is called. Must be called within a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let shared = Arc::new(Shared {
            upstream,
            client: Client::builder(TokioExecutor::new()).build(connector),
            state: Mutex::new(State::new(FaultPlan::default())),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// `http://127.0.0.1:<port>`, for the SDK's `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the plan; its counters (and random draws) start again from zero.
    pub fn set(&self, plan: FaultPlan) {
        *self.shared.state() = State::new(plan);
    }

    /// What was seen and injected since the plan was last set.
    pub fn injected(&self) -> Injected {
        self.shared.state().injected.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every connection.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Serves one client connection until it closes, or until a handler asks for it to be
/// reset: then the socket is closed with a zero linger, which sends a TCP RST.
async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = Arc::clone(&reset);
        service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&reset), req))
    };
    let killed = {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(&mut stream), service);
        tokio::select! {
            _ = conn => false,
            () = reset.notified() => true,
        }
    };
    if killed {
        let _ = stream.set_zero_linger();
    }
}

/// A whole answer, before it becomes a response (batch calls' answers are rewritten).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(status: StatusCode, content_type: &str, body: String) -> Answer {
        // Answer in the protocol the client spoke (DynamoDB JSON 1.0, Kinesis JSON 1.1).
        let content_type = if content_type.is_empty() {
            "application/x-amz-json-1.1"
        } else {
            content_type
        };
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            headers.insert(CONTENT_TYPE, value);
        }
        Answer {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    /// An AWS JSON error, as the SDK parses it: `__type` is the error code.
    fn aws_error(status: StatusCode, code: &str, message: &str, content_type: &str) -> Answer {
        let body = json!({ "__type": code, "message": message }).to_string();
        Answer::json(status, content_type, body)
    }

    /// An S3 error, as the SDK parses it: `<Error><Code>…` in XML (a HEAD answer has no
    /// body; the SDK goes by the status).
    fn s3_error(status: StatusCode, code: &str, message: &str, head: bool) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
        let body = if head {
            Bytes::new()
        } else {
            Bytes::from(format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
            ))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The page Flask (moto server's web framework) answers when moto itself fails.
    fn html_500() -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers,
            body: Bytes::from_static(
                b"<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n\
                  <h1>Internal Server Error</h1>\n<p>The server encountered an internal error \
                  and was unable to complete your request. Either the server is overloaded or \
                  there is an error in the application.</p>\n",
            ),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

async fn handle(
    shared: Arc<Shared>,
    reset: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        // The client went away mid-request; there is no one to answer.
        return reset_connection(&reset).await;
    };
    let amz_target = header(&parts.headers, "x-amz-target");
    let s3 = amz_target.is_empty();
    let target = if s3 {
        format!(
            "S3.{}",
            s3_operation(&parts.method, &parts.uri, &parts.headers)
        )
    } else {
        amz_target.to_owned()
    };
    let content_type = header(&parts.headers, CONTENT_TYPE.as_str()).to_owned();

    let fault = shared.state().call_fault(&target);
    if let Some(fault) = &fault {
        tracing::debug!(%target, ?fault, "fault proxy: injecting");
    }
    match fault {
        Some(Fault::Error { status, code }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = format!("{code} (injected by the fault proxy)");
            let answer = if s3 {
                Answer::s3_error(status, &code, &message, parts.method == Method::HEAD)
            } else {
                Answer::aws_error(status, &code, &message, &content_type)
            };
            return Ok(answer.into_response());
        }
        Some(Fault::Html500) => return Ok(Answer::html_500().into_response()),
        Some(Fault::Hold {
            phase: Phase::BeforeForwarding,
            hold,
        }) => {
            tokio::time::sleep(hold).await;
            return reset_connection(&reset).await;
        }
        Some(Fault::Reset(Phase::BeforeForwarding)) => return reset_connection(&reset).await,
        _ => {}
    }

    let answer = match record_faults(&shared, &target, &content_type, body) {
        Ok(RecordFaults::None(body)) => forward(&shared, &parts, body).await,
        Ok(RecordFaults::Some {
            call,
            body,
            failed,
            stream,
        }) => {
            let upstream = if failed.iter().all(Option::is_some) {
                // Nothing is left to write: answer as the service would, without forwarding.
                Ok(Answer::json(
                    StatusCode::OK,
                    &content_type,
                    call.empty_answer(),
                ))
            } else {
                forward(&shared, &parts, body).await
            };
            upstream.and_then(|a| splice(call, a, &failed, &stream))
        }
        Err(why) => Ok(Answer::aws_error(
            StatusCode::BAD_REQUEST,
            "FaultProxyUnsupportedBody",
            &why,
            &content_type,
        )),
    };
    let answer = answer.unwrap_or_else(|message| {
        Answer::aws_error(
            StatusCode::BAD_GATEWAY,
            "FaultProxyError",
            &message,
            &content_type,
        )
    });

    match fault {
        Some(Fault::Hold {
            phase: Phase::AfterForwarding,
            hold,
        }) => {
            tokio::time::sleep(hold).await;
            reset_connection(&reset).await
        }
        Some(Fault::Reset(Phase::AfterForwarding)) => reset_connection(&reset).await,
        _ => Ok(answer.into_response()),
    }
}

/// The S3 operation of a path-style REST call, by method, path and query: what the
/// proxy's rules match S3 calls by (`S3.<Operation>`).
pub fn s3_operation(method: &Method, uri: &hyper::Uri, headers: &HeaderMap) -> &'static str {
    let query = uri.query().unwrap_or("");
    let has = |param: &str| {
        query
            .split('&')
            .any(|kv| kv.split('=').next() == Some(param))
    };
    // `/bucket` or `/bucket/`: a call on the bucket; `/bucket/key…`: on an object.
    let path = uri.path().trim_start_matches('/');
    let bucket_only = path.split_once('/').is_none_or(|(_, key)| key.is_empty());
    match *method {
        Method::PUT if bucket_only => "CreateBucket",
        Method::PUT if has("uploadId") => "UploadPart",
        Method::PUT if headers.contains_key("x-amz-copy-source") => "CopyObject",
        Method::PUT => "PutObject",
        Method::POST if has("uploads") => "CreateMultipartUpload",
        Method::POST if has("uploadId") => "CompleteMultipartUpload",
        Method::POST if has("delete") => "DeleteObjects",
        Method::POST => "PostObject",
        Method::GET if bucket_only && has("list-type") => "ListObjectsV2",
        Method::GET if bucket_only => "ListObjects",
        Method::GET => "GetObject",
        Method::HEAD if bucket_only => "HeadBucket",
        Method::HEAD => "HeadObject",
        Method::DELETE if has("uploadId") => "AbortMultipartUpload",
        Method::DELETE if bucket_only => "DeleteBucket",
        Method::DELETE => "DeleteObject",
        _ => "Unknown",
    }
}

/// Asks [`serve`] to reset this connection, and never answers.
async fn reset_connection(reset: &Notify) -> Result<Response<Full<Bytes>>, Infallible> {
    reset.notify_one();
    std::future::pending().await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A call whose records [`Fault::FailRecords`] fails one by one, and where its request
/// and answer keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchCall {
    /// Kinesis `PutRecords`: answer `Records`, count `FailedRecordCount`.
    KinesisPutRecords,
    /// Firehose `PutRecordBatch`: answer `RequestResponses`, count `FailedPutCount`.
    FirehosePutRecordBatch,
    /// EventBridge `PutEvents`: request and answer `Entries`, count `FailedEntryCount`.
    EventBridgePutEvents,
}

impl BatchCall {
    fn of(target: &str) -> Option<BatchCall> {
        match target.rsplit_once('.') {
            Some((service, "PutRecords")) if service.starts_with("Kinesis_") => {
                Some(BatchCall::KinesisPutRecords)
            }
            Some((service, "PutRecordBatch")) if service.starts_with("Firehose_") => {
                Some(BatchCall::FirehosePutRecordBatch)
            }
            Some(("AWSEvents", "PutEvents")) => Some(BatchCall::EventBridgePutEvents),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BatchCall::KinesisPutRecords => "PutRecords",
            BatchCall::FirehosePutRecordBatch => "PutRecordBatch",
            BatchCall::EventBridgePutEvents => "PutEvents",
        }
    }

    /// The request's list of records.
    fn request_field(self) -> &'static str {
        match self {
            BatchCall::KinesisPutRecords | BatchCall::FirehosePutRecordBatch => "Records",
            BatchCall::EventBridgePutEvents => "Entries",
        }
    }

    /// The answer's per-record list.
    fn results_field(self) -> &'static str {
        match self {
            BatchCall::KinesisPutRecords => "Records",
            BatchCall::FirehosePutRecordBatch => "RequestResponses",
            BatchCall::EventBridgePutEvents => "Entries",
        }
    }

    /// The answer's count of failed records.
    fn failed_field(self) -> &'static str {
        match self {
            BatchCall::KinesisPutRecords => "FailedRecordCount",
            BatchCall::FirehosePutRecordBatch => "FailedPutCount",
            BatchCall::EventBridgePutEvents => "FailedEntryCount",
        }
    }

    /// The request's name of the stream written, for error messages.
    fn stream_fields(self) -> [&'static str; 2] {
        match self {
            BatchCall::KinesisPutRecords => ["StreamName", "StreamARN"],
            BatchCall::FirehosePutRecordBatch => ["DeliveryStreamName", "DeliveryStreamName"],
            // Each entry names its bus; the call has none of its own.
            BatchCall::EventBridgePutEvents => ["EndpointId", "EndpointId"],
        }
    }

    /// The service's answer to a call with no records left in it.
    fn empty_answer(self) -> String {
        match self {
            BatchCall::KinesisPutRecords => r#"{"FailedRecordCount":0,"Records":[]}"#.to_owned(),
            BatchCall::FirehosePutRecordBatch => {
                r#"{"FailedPutCount":0,"Encrypted":false,"RequestResponses":[]}"#.to_owned()
            }
            BatchCall::EventBridgePutEvents => r#"{"FailedEntryCount":0,"Entries":[]}"#.to_owned(),
        }
    }

    /// A failed entry as the service writes it.
    fn failed_entry(self, error: RecordError, stream: &str) -> Value {
        match (self, error) {
            (BatchCall::KinesisPutRecords, RecordError::ThroughputExceeded) => json!({
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": format!(
                    "Rate exceeded for shard in stream {stream} under account \
                     000000000000 (injected by the fault proxy)."
                ),
            }),
            (BatchCall::FirehosePutRecordBatch, RecordError::ThroughputExceeded) => json!({
                "ErrorCode": "ServiceUnavailableException",
                "ErrorMessage": format!(
                    "Slow down. Delivery stream {stream} is over its limits \
                     (injected by the fault proxy)."
                ),
            }),
            (BatchCall::EventBridgePutEvents, RecordError::ThroughputExceeded) => json!({
                "ErrorCode": "ThrottlingException",
                "ErrorMessage": "Rate exceeded (injected by the fault proxy).",
            }),
            (_, RecordError::InternalFailure) => json!({
                "ErrorCode": "InternalFailure",
                "ErrorMessage": "Internal service failure (injected by the fault proxy).",
            }),
        }
    }
}

enum RecordFaults {
    /// Forward the body as it came.
    None(Bytes),
    /// Forward `body` (the request less the failed records); `failed` has one entry per
    /// original record.
    Some {
        call: BatchCall,
        body: Bytes,
        failed: Vec<Option<RecordError>>,
        stream: String,
    },
}

/// Picks the records of a batch call to fail and removes them from the request; `Err`
/// says why the proxy cannot rewrite this body.
fn record_faults(
    shared: &Shared,
    target: &str,
    content_type: &str,
    body: Bytes,
) -> Result<RecordFaults, String> {
    let Some(call) = BatchCall::of(target) else {
        return Ok(RecordFaults::None(body));
    };
    if !shared.state().has_record_rules(target) {
        return Ok(RecordFaults::None(body));
    }
    let refuse = |why: &str| {
        format!(
            "fault proxy cannot fail records of this {} body ({content_type}): {why}",
            call.name()
        )
    };
    if !content_type.starts_with("application/x-amz-json") {
        return Err(refuse("not AWS JSON"));
    }
    let mut request: Value = serde_json::from_slice(&body).map_err(|e| refuse(&e.to_string()))?;
    let Some(records) = request
        .get_mut(call.request_field())
        .and_then(Value::as_array_mut)
    else {
        return Err(refuse(&format!("no {} array", call.request_field())));
    };
    let failed = shared.state().record_faults(target, records.len());
    if failed.iter().all(Option::is_none) {
        return Ok(RecordFaults::None(body));
    }
    let mut index = 0;
    records.retain(|_| {
        index += 1;
        failed[index - 1].is_none()
    });
    let stream = call
        .stream_fields()
        .iter()
        .find_map(|f| request.get(*f).and_then(Value::as_str))
        .unwrap_or("?")
        .to_owned();
    Ok(RecordFaults::Some {
        call,
        body: Bytes::from(request.to_string()),
        failed,
        stream,
    })
}

/// Puts a failed entry back at each failed record's index of a batch call's answer. An
/// answer that is not a success passes through: the whole call failed anyway.
fn splice(
    call: BatchCall,
    mut answer: Answer,
    failed: &[Option<RecordError>],
    stream: &str,
) -> Result<Answer, String> {
    if answer.status != StatusCode::OK {
        return Ok(answer);
    }
    let (name, field) = (call.name(), call.results_field());
    let mut json: Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("unreadable {name} answer from the emulator: {e}"))?;
    let mut upstream = match json.get_mut(field).map(Value::take) {
        Some(Value::Array(records)) => records.into_iter(),
        _ => return Err(format!("{name} answer from the emulator has no {field}")),
    };
    let mut records = Vec::with_capacity(failed.len());
    for error in failed {
        records.push(match error {
            Some(error) => call.failed_entry(*error, stream),
            None => upstream
                .next()
                .ok_or("the emulator answered fewer records than it was sent")?,
        });
    }
    let failed_count = records
        .iter()
        .filter(|r| r.get("ErrorCode").is_some())
        .count();
    json[field] = Value::Array(records);
    json[call.failed_field()] = json!(failed_count);
    answer.body = Bytes::from(json.to_string());
    Ok(answer)
}

/// Sends the request upstream with its headers as they came (SigV4 included), and returns
/// the whole answer. It runs in its own task, so a client that hangs up mid-call does not
/// cancel it: whether a call is applied depends on the plan alone.
async fn forward(
    shared: &Arc<Shared>,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Result<Answer, String> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{}{path}", shared.upstream))
        .body(Full::new(body))
        .map_err(|e| format!("fault proxy cannot build the upstream request: {e}"))?;
    // hyper sets Content-Length from the (possibly rewritten) body.
    *request.headers_mut() = without_hop_headers(&parts.headers);
    shared.state().injected.forwarded += 1;

    let client = shared.client.clone();
    let upstream = shared.upstream;
    let call = tokio::spawn(async move {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("emulator at {upstream} unreachable: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("emulator at {upstream} answer cut short: {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: without_hop_headers(&parts.headers),
            body,
        })
    });
    call.await
        .map_err(|e| format!("fault proxy forwarding task failed: {e}"))?
}

/// Headers that describe one hop's connection (or a body length that rewriting changes)
/// are not passed on; hyper sets the length of what is sent.
fn without_hop_headers(headers: &HeaderMap) -> HeaderMap {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    let mut out = headers.clone();
    for name in HOP {
        out.remove(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, uri: &str, headers: &[(&'static str, &str)]) -> &'static str {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        s3_operation(&method, &uri.parse().unwrap(), &map)
    }

    #[test]
    fn s3_calls_are_named_by_method_path_and_query() {
        assert_eq!(op(Method::PUT, "/b", &[]), "CreateBucket");
        assert_eq!(op(Method::PUT, "/b/", &[]), "CreateBucket");
        assert_eq!(op(Method::PUT, "/b/t/dt=1/x.parquet", &[]), "PutObject");
        assert_eq!(op(Method::PUT, "/b/k?x-id=PutObject", &[]), "PutObject");
        assert_eq!(
            op(Method::PUT, "/b/k?partNumber=1&uploadId=u", &[]),
            "UploadPart"
        );
        assert_eq!(
            op(Method::PUT, "/b/k", &[("x-amz-copy-source", "/b/j")]),
            "CopyObject"
        );
        assert_eq!(
            op(Method::POST, "/b/k?uploads", &[]),
            "CreateMultipartUpload"
        );
        assert_eq!(
            op(Method::POST, "/b/k?uploadId=u", &[]),
            "CompleteMultipartUpload"
        );
        assert_eq!(op(Method::POST, "/b?delete", &[]), "DeleteObjects");
        assert_eq!(
            op(Method::GET, "/b?list-type=2&prefix=t%2F", &[]),
            "ListObjectsV2"
        );
        assert_eq!(op(Method::GET, "/b", &[]), "ListObjects");
        assert_eq!(op(Method::GET, "/b/k", &[]), "GetObject");
        assert_eq!(op(Method::HEAD, "/b", &[]), "HeadBucket");
        assert_eq!(op(Method::HEAD, "/b/k", &[]), "HeadObject");
        assert_eq!(
            op(Method::DELETE, "/b/k?uploadId=u", &[]),
            "AbortMultipartUpload"
        );
        assert_eq!(op(Method::DELETE, "/b/k", &[]), "DeleteObject");
    }
}
