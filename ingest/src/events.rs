//! `POST /v1/events`: body → events → checks → durable append → one result per event.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use floodgate_core::budget::{EVENT_STATE_BYTES, REQUEST_STATE_BYTES};
use floodgate_core::check::{Outcome, check_body_traced};
use floodgate_core::decode::{BodyFormat, DecodeError};
use floodgate_core::registry::Registry;
use floodgate_core::stream::{AppendError, ConsumerLag, Record, StreamWriter};
use floodgate_core::trace_context::{TRACEPARENT, TRACESTATE, TraceContext};
use floodgate_core::{ByteString, FieldError};
use http_body_util::BodyExt;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{Auth, Caller, Charge, Principal, RateState};
use crate::dedupe::{self, Claim, Deduper};
use crate::encoding::{self, BinaryModeError, DecompressError, Encoding};
use crate::error::EdgeError;
use crate::limits::Limits;
use crate::response::{self, Body};

/// Why a body could not be turned into events.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error(transparent)]
    Decompress(#[from] DecompressError),
    #[error(transparent)]
    Binary(#[from] BinaryModeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// An unreadable body is kept in the quarantine up to this many bytes.
const QUARANTINE_MAX_BODY: usize = 1 << 20;

/// A quarantine record, JSON-escaped raw text and reasons included, is at most this big:
/// within one Kinesis record (1 MiB with its partition key), so the quarantine stream
/// never refuses one. A record that would be bigger keeps a prefix of the raw text, and
/// says so in its reasons.
const QUARANTINE_MAX_RECORD: usize = (1 << 20) - 1024;

/// Bodies larger than this are decoded and validated on the blocking pool, so a big batch
/// never holds an async worker for more than a fraction of a millisecond.
const INLINE_CHECK_MAX_BYTES: usize = 64 * 1024;

/// One request's share of the budget for requests in memory (`max_inflight_body_bytes`,
/// as KiB permits of `Events::inflight`): its state from admission
/// ([`REQUEST_STATE_BYTES`]), then the memory its body actually takes as the frames arrive
/// and as a compressed body inflates (so a slow or chunked body costs what it has sent,
/// not the largest body it might become), and each event's state once decoded
/// ([`EVENT_STATE_BYTES`]). Once the request is answered only the answer's bytes stay
/// charged, until hyper has sent them.
#[derive(Debug)]
struct BodyCharge {
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    bytes: u64,
}

impl BodyCharge {
    fn new(budget: Arc<Semaphore>) -> Self {
        Self {
            budget,
            held: None,
            bytes: 0,
        }
    }

    /// Charges `n` more bytes; `false`, charging nothing, when the budget has no room.
    fn add(&mut self, n: u64) -> bool {
        let want = self.bytes.saturating_add(n).div_ceil(1024);
        let have = self.held.as_ref().map_or(0, |p| p.num_permits() as u64);
        if want > have {
            let Ok(more) = u32::try_from(want - have) else {
                return false;
            };
            match self.budget.clone().try_acquire_many_owned(more) {
                Ok(p) => match &mut self.held {
                    Some(held) => held.merge(p),
                    None => self.held = Some(p),
                },
                Err(_) => return false,
            }
        }
        self.bytes += n;
        true
    }

    /// Gives back all but `n` bytes (what is left of a request once it is answered).
    fn keep(&mut self, n: u64) {
        self.release(self.bytes.saturating_sub(n));
    }

    /// Gives `n` bytes back (a compressed body once it has been inflated and dropped).
    fn release(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_sub(n);
        let want = self.bytes.div_ceil(1024) as usize;
        if let Some(held) = &mut self.held {
            let extra = held.num_permits().saturating_sub(want);
            drop(held.split(extra));
        }
    }
}

/// Why a body could not be read.
enum ReadError {
    TooLarge,
    /// The budget for bodies in memory is used up.
    OverBudget,
    Failed(String),
}

/// Reads a whole body of at most `max` bytes (`declared` by its `Content-Length`, when it
/// is), charging `charge` for the memory it takes as the frames arrive.
///
/// Each frame is copied out and let go at once. A frame is a slice of hyper's read
/// buffer, and holding it would keep that whole buffer allocated (and make hyper allocate
/// another for the connection's next read) while the charge counted only the slice. The
/// body grows geometrically, never past its declared length, and is charged by its
/// capacity: what it holds in memory, its length when the length was declared, and at
/// most twice what it has sent when it was not.
async fn read_body<B>(
    body: B,
    max: u64,
    declared: Option<u64>,
    charge: &mut BodyCharge,
) -> Result<Bytes, ReadError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut buf: Vec<u8> = Vec::new();
    let ceiling = declared.unwrap_or(max).min(max) as usize;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|e| ReadError::Failed(e.into().to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let need = buf.len() + data.len();
        if need as u64 > max {
            return Err(ReadError::TooLarge);
        }
        if need > buf.capacity() {
            let grown = (2 * buf.capacity()).min(ceiling).max(need);
            if !charge.add((grown - buf.capacity()) as u64) {
                return Err(ReadError::OverBudget);
            }
            buf.reserve_exact(grown - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    // A body sent without a length keeps its spare capacity, charged: a shrink would move
    // nothing (allocators keep a block that shrinks by less than half).
    Ok(Bytes::from(buf))
}

/// A request's claims in the dedupe window, with the index of the record each claimed
/// event is appended as. Dropped unsettled (the append was cancelled, or panicked), it
/// releases them: otherwise every retry of those events would be answered `retry` for
/// as long as the process runs.
struct Claims {
    dedupe: Option<Arc<Deduper>>,
    keys: Vec<(dedupe::Key, usize)>,
}

impl Claims {
    /// Remembers the appended events as accepted and forgets the others.
    fn settle(mut self, appended: &[Result<(), AppendError>]) {
        if let Some(d) = self.dedupe.take() {
            let outcomes: Vec<(dedupe::Key, bool)> = self
                .keys
                .iter()
                .map(|&(k, r)| (k, appended.get(r).is_some_and(Result::is_ok)))
                .collect();
            d.settle(&outcomes, now_ms());
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if let Some(d) = self.dedupe.take()
            && !self.keys.is_empty()
        {
            // Whether the stream took these records is unknown: a retry appends them
            // again, which at worst stores a second copy (the stream is at-least-once).
            let keys: Vec<dedupe::Key> = self.keys.iter().map(|&(k, _)| k).collect();
            d.release(&keys);
            metrics::counter!("floodgate_ingest_dedupe_claims_released_total")
                .increment(keys.len() as u64);
        }
    }
}

/// A request in progress at the edge (see `StreamWriter::incoming`): counted from its
/// admission until it is answered, however it is (dropped with the request), so that a
/// log committing in groups can tell a busy edge from a quiet one.
struct InProgress(Option<Arc<AtomicUsize>>);

impl InProgress {
    fn new(count: Option<&Arc<AtomicUsize>>) -> Self {
        if let Some(c) = count {
            c.fetch_add(1, Ordering::AcqRel);
        }
        InProgress(count.cloned())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Appends a request's records, settles its dedupe claims and keeps its rejected events
/// in the quarantine. Run as a task of its own, so that it completes even when the
/// request is abandoned (the client hangs up, or `request_timeout` cuts it): the claims
/// then settle as the append went, and a retry is answered as a duplicate. The body's
/// charge is held until the records are out of memory, and handed back.
async fn append_and_settle(
    stream: Arc<dyn StreamWriter>,
    quarantine_to: Option<Arc<dyn StreamWriter>>,
    records: Vec<Record>,
    claims: Claims,
    held: Vec<Record>,
    charge: BodyCharge,
) -> (Vec<Result<(), AppendError>>, BodyCharge) {
    let appended = if records.is_empty() {
        Vec::new()
    } else {
        stream.append_acked(records).await
    };
    claims.settle(&appended);
    // Rejected events are kept for audit before the producer hears about them.
    if let Some(q) = quarantine_to
        && !held.is_empty()
    {
        quarantine(&*q, held).await;
    }
    (appended, charge)
}

/// The request's W3C trace context (`traceparent` and `tracestate` headers), which the
/// events that carry none of their own are stored with. As the W3C recommendation asks, an
/// invalid `traceparent` (or more than one) is ignored, never refused: the request is served
/// as if it had none. Several `tracestate` headers are one list (joined by commas); an
/// invalid list is dropped alone.
fn request_trace(headers: &HeaderMap) -> Option<TraceContext> {
    let mut parents = headers.get_all(TRACEPARENT).iter();
    let parent = parents.next()?;
    let state: Option<String> = headers
        .get_all(TRACESTATE)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<&str>>>()
        .filter(|states| !states.is_empty())
        .map(|states| states.join(","));
    let trace = match (parent.to_str(), parents.next()) {
        (Ok(parent), None) => TraceContext::from_headers(parent, state.as_deref()),
        _ => None,
    };
    if trace.is_none() {
        metrics::counter!("floodgate_ingest_traceparent_ignored_total").increment(1);
        tracing::debug!(traceparent = ?parent, "invalid traceparent header ignored");
    }
    trace
}

/// The body format a `Content-Type` names, or `None` for a type we do not take.
pub fn format_for(content_type: &str) -> Option<BodyFormat> {
    let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" => Some(BodyFormat::Single),
        "application/cloudevents-batch+json" => Some(BodyFormat::Batch),
        "application/json" => Some(BodyFormat::Auto),
        "application/x-ndjson" | "application/ndjson" => Some(BodyFormat::Ndjson),
        _ => None,
    }
}

#[derive(Serialize)]
struct BatchResponse {
    accepted: usize,
    rejected: usize,
    retry: usize,
    results: Vec<EventResult>,
}

impl BatchResponse {
    /// The answer's JSON: the bytes `serde_json::to_vec(self)` writes (a property test holds
    /// the two equal), written by hand because serde's escaping of every key and id was
    /// half of the answer's cost, about 5 % of `ingest`'s CPU at saturation.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.results.len() * 80);
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"{\"accepted\":");
        out.extend_from_slice(num.format(self.accepted).as_bytes());
        out.extend_from_slice(b",\"rejected\":");
        out.extend_from_slice(num.format(self.rejected).as_bytes());
        out.extend_from_slice(b",\"retry\":");
        out.extend_from_slice(num.format(self.retry).as_bytes());
        out.extend_from_slice(b",\"results\":[");
        for (i, r) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            out.extend_from_slice(num.format(r.index).as_bytes());
            out.extend_from_slice(b",\"id\":");
            match &r.id {
                Some(id) => json_str(&mut out, id),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(match r.status {
                EventStatus::Accepted => b",\"status\":\"accepted\"",
                EventStatus::Rejected => b",\"status\":\"rejected\"",
                EventStatus::Retry => b",\"status\":\"retry\"",
            });
            if let Some(duplicate) = r.duplicate {
                out.extend_from_slice(if duplicate {
                    b",\"duplicate\":true"
                } else {
                    b",\"duplicate\":false"
                });
            }
            if let Some(errors) = &r.errors {
                out.extend_from_slice(b",\"errors\":");
                // Rare, and its messages may need any escape: serde's writer.
                serde_json::to_writer(&mut out, errors).expect("writing to a Vec cannot fail");
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// `s` as a JSON string. Most ids need no escape and are copied as they are.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if may_need_escape(s.as_bytes()) {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether `s` holds a byte JSON escapes (a quote, a backslash or a control character):
/// the fast path's scan, eight bytes at a time (a byte by byte scan was 2.7 % of
/// `ingest`'s samples).
fn may_need_escape(s: &[u8]) -> bool {
    floodgate_core::fast::first_escaped(s, 0).is_some()
}

/// What the producer hears about one event of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Durable in the stream (or its first copy is: a duplicate).
    Accepted,
    /// Never to be taken: fix the event, do not retry it as is.
    Rejected,
    /// Not taken this time; send it again.
    Retry,
}

impl EventStatus {
    /// The `outcome` label of `floodgate_ingest_events_total`.
    fn label(self, duplicate: bool) -> &'static str {
        match self {
            EventStatus::Accepted if duplicate => "duplicate",
            EventStatus::Accepted => "accepted",
            EventStatus::Rejected => "rejected",
            EventStatus::Retry => "retry",
        }
    }
}

#[derive(Debug, Serialize)]
struct EventResult {
    index: usize,
    id: Option<ByteString>,
    status: EventStatus,
    /// `true` when the event was accepted before (same source and id) and not appended
    /// again.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<FieldError>>,
}

impl EventResult {
    fn new(index: usize, id: Option<ByteString>, status: EventStatus) -> Self {
        Self {
            index,
            id,
            status,
            duplicate: None,
            errors: None,
        }
    }

    fn because(mut self, message: impl Into<String>) -> Self {
        self.errors = Some(vec![FieldError::new("", message)]);
        self
    }
}

/// What the edge does with one valid event.
enum Plan {
    /// Append it as record `n` of the request's append.
    Append(usize),
    /// Accepted within the dedupe window: answer accepted, append nothing.
    Duplicate,
    /// Its first copy is being appended by another request: answer retry.
    InFlight,
    /// A second copy of event `n` of this request: answer as that one was answered.
    SameAs(usize),
}

/// The append a request makes: its records, and what each valid event becomes.
struct Planned {
    /// One per event of the request; `None` for a rejected one.
    plans: Vec<Option<Plan>>,
    records: Vec<Record>,
    /// Taken before the append; settled (or released) by the append task.
    claims: Claims,
}

/// A request's body as received, with what the check needs to read it.
struct Received {
    body: Bytes,
    encoding: Encoding,
    /// The request's headers, in CloudEvents binary mode.
    binary: Option<HeaderMap>,
    trace: Option<TraceContext>,
    format: BodyFormat,
    /// The body's share of the in-memory budget; held until the append is done.
    charge: BodyCharge,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The quarantine's record of a rejected event (or unreadable body): its bytes as sent
/// (lossy UTF-8) and why it was refused.
fn quarantine_record(raw: &[u8], reasons: &[FieldError]) -> Record {
    #[derive(Serialize)]
    struct Held<'a> {
        raw: &'a str,
        reasons: &'a [FieldError],
    }
    let text = String::from_utf8_lossy(raw);
    let mut payload = serde_json::to_vec(&Held {
        raw: &text,
        reasons,
    })
    .expect("serializable");
    if payload.len() > QUARANTINE_MAX_RECORD {
        // Escaping can grow text up to six times (`\u0000`): cut, and cut again, to fit.
        let mut keep = text.len() * QUARANTINE_MAX_RECORD / payload.len();
        let mut noted = reasons.to_vec();
        noted.push(FieldError::new(
            "",
            format!("raw cut to fit the quarantine: {} bytes sent", raw.len()),
        ));
        loop {
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
            payload = serde_json::to_vec(&Held {
                raw: &text[..keep],
                reasons: &noted,
            })
            .expect("serializable");
            if payload.len() <= QUARANTINE_MAX_RECORD || keep == 0 {
                break;
            }
            keep = keep * 9 / 10;
        }
    }
    Record {
        key: ByteString::from_static("quarantine"),
        payload: Bytes::from(payload),
    }
}

async fn quarantine(q: &dyn floodgate_core::stream::StreamWriter, records: Vec<Record>) {
    let n = records.len() as u64;
    let failed = q
        .append(records)
        .await
        .iter()
        .filter(|r| r.is_err())
        .count() as u64;
    metrics::counter!("floodgate_ingest_quarantined_total").increment(n - failed);
    if failed > 0 {
        metrics::counter!("floodgate_ingest_quarantine_failures_total").increment(failed);
        tracing::warn!(failed, "the quarantine did not take every rejected event");
    }
}

/// Rejects, with a `/type` pointer, the events `who` may not post; refuses the request
/// when none is allowed.
fn apply_type_filter(who: &Principal, outcomes: &mut [Outcome]) -> Result<(), EdgeError> {
    let mut allowed = 0;
    for o in outcomes.iter_mut() {
        let t = match o {
            Outcome::Valid { event_type, .. } => Some(&**event_type),
            Outcome::Rejected { event_type, .. } => event_type.as_deref(),
        };
        if who.allows(t) {
            allowed += 1;
            continue;
        }
        let error = FieldError::new(
            "/type",
            format!(
                "credential {:?} may not post events of type {:?}",
                who.name(),
                t.unwrap_or("")
            ),
        );
        *o = match std::mem::replace(
            o,
            Outcome::Rejected {
                id: None,
                event_type: None,
                errors: Vec::new(),
                raw: Bytes::new(),
            },
        ) {
            Outcome::Valid {
                id,
                event_type,
                payload,
                ..
            } => Outcome::Rejected {
                id: Some(id),
                event_type: Some(event_type),
                errors: vec![error],
                raw: payload,
            },
            Outcome::Rejected {
                id,
                event_type,
                raw,
                ..
            } => Outcome::Rejected {
                id,
                event_type,
                errors: vec![error],
                raw,
            },
        };
    }
    if allowed == 0 && !outcomes.is_empty() {
        return Err(EdgeError::ForbiddenTypes {
            credential: who.name().to_owned(),
        });
    }
    Ok(())
}

fn rate_headers(resp: &mut Response<Body>, s: RateState) {
    let h = resp.headers_mut();
    h.insert("ratelimit-limit", HeaderValue::from(s.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(s.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(s.reset_secs));
}

/// `POST /v1/events` and everything it needs. Built once by [`crate::app::AppBuilder`];
/// a request runs through its stages in order: [`admit`](Events::admit),
/// [`receive`](Events::receive), [`check`](Events::check), [`charge`](Events::charge),
/// [`plan`](Events::plan), [`append`](Events::append), [`answer`](Events::answer).
pub(crate) struct Events {
    registry: Arc<Registry>,
    stream: Arc<dyn StreamWriter>,
    dedupe: Option<Arc<Deduper>>,
    limits: Limits,
    auth: Arc<Auth>,
    /// The lag of this process's consumers, when it runs any.
    lag: Option<Arc<ConsumerLag>>,
    /// Where rejected events are kept for audit, if anywhere.
    quarantine: Option<Arc<dyn StreamWriter>>,
    /// Bytes of request bodies in memory, in KiB permits.
    inflight: Arc<Semaphore>,
    /// Requests in progress, when the stream counts them.
    incoming: Option<Arc<AtomicUsize>>,
}

impl Events {
    pub(crate) fn new(
        registry: Arc<Registry>,
        stream: Arc<dyn StreamWriter>,
        limits: Limits,
        auth: Arc<Auth>,
        lag: Option<Arc<ConsumerLag>>,
        quarantine: Option<Arc<dyn StreamWriter>>,
    ) -> Self {
        Self {
            dedupe: (limits.dedupe_window_ms > 0)
                .then(|| Arc::new(Deduper::new(limits.dedupe_window_ms, limits.dedupe_max_ids))),
            inflight: Arc::new(Semaphore::new(
                limits.max_inflight_body_bytes.div_ceil(1024) as usize,
            )),
            incoming: stream.incoming(),
            registry,
            stream,
            limits,
            auth,
            lag,
            quarantine,
        }
    }

    pub(crate) fn deduper(&self) -> Option<&Deduper> {
        self.dedupe.as_deref()
    }

    /// Answers one `POST /v1/events`: one result per event, or one error for the request.
    /// A credential with a rate gets its `RateLimit-*` headers either way.
    pub(crate) async fn post<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut rate = None;
        let mut resp = self
            .post_as(req, &mut rate)
            .await
            .unwrap_or_else(EdgeError::into_response);
        if let Some(state) = rate {
            rate_headers(&mut resp, state);
        }
        resp
    }

    async fn post_as<B>(
        &self,
        req: Request<B>,
        rate: &mut Option<RateState>,
    ) -> Result<Response<Body>, EdgeError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let caller = self.admit(req.headers(), rate)?;
        let _in_progress = InProgress::new(self.incoming.as_ref());
        let received = self.receive(req).await?;
        let (mut outcomes, mut charge) = self.check(received).await?;
        metrics::histogram!("floodgate_ingest_batch_size_events").record(outcomes.len() as f64);
        // Each event's outcome, record and result, besides its bytes in the body.
        if !charge.add(outcomes.len() as u64 * EVENT_STATE_BYTES) {
            return Err(self.over_budget());
        }
        if let Some(who) = caller.principal() {
            Self::charge(who, &mut outcomes, rate)?;
        }
        let planned = self.plan(&mut outcomes);
        let (appended, mut charge) = self
            .append(&outcomes, planned.records, planned.claims, charge)
            .await?;
        let mut response = self.answer(outcomes, planned.plans, &appended);
        // The outcomes' ids are slices of the body: it stays charged until they are gone.
        // Then only the answer is left, charged until hyper has sent it.
        charge.keep(
            hyper::body::Body::size_hint(response.body())
                .exact()
                .unwrap_or(0),
        );
        response.body_mut().hold(charge);
        Ok(response)
    }

    /// Before the body is read: the credential (401), the consumers' lag (503), and one
    /// event from the credential's bucket (429), so that an empty bucket costs no body.
    fn admit(
        &self,
        headers: &HeaderMap,
        rate: &mut Option<RateState>,
    ) -> Result<Caller, EdgeError> {
        let caller = self.auth.authenticate(headers)?;
        if let Some(lag) = &self.lag {
            let bound = self.limits.max_consumer_lag_records;
            let behind = lag.max_records();
            if bound > 0 && behind > bound {
                return Err(self.busy(
                    "consumer_lag",
                    format!("the processors are {behind} records behind (bound {bound}); retry"),
                ));
            }
            let bound_ms = self.limits.max_consumer_lag_ms;
            let behind_ms = lag.max_millis();
            if bound_ms > 0 && behind_ms > bound_ms {
                return Err(self.busy(
                    "consumer_lag",
                    format!(
                        "the processors are {behind_ms} ms behind (bound {bound_ms} ms); retry"
                    ),
                ));
            }
        }
        if let Some(who) = caller.principal() {
            match who.charge(1) {
                Charge::Limited(s) => {
                    *rate = Some(s);
                    return Err(EdgeError::rate_limited(who, s));
                }
                Charge::Allowed(s) => *rate = Some(s),
                Charge::Unlimited | Charge::TooMany { .. } => {}
            }
        }
        Ok(caller)
    }

    /// 503 with `Retry-After`: the edge cannot take more right now.
    fn busy(&self, reason: &'static str, message: impl Into<String>) -> EdgeError {
        EdgeError::Busy {
            reason,
            message: message.into(),
            retry_after_secs: self.limits.retry_after_secs,
        }
    }

    /// The headers (encoding, format, trace context, declared length), then the body,
    /// within its size limit, its time limit, and the edge's budget for bodies in memory.
    async fn receive<B>(&self, req: Request<B>) -> Result<Received, EdgeError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limits = &self.limits;
        let headers = req.headers();
        let encoding =
            encoding::content_encoding(headers).map_err(EdgeError::UnsupportedEncoding)?;
        // Binary mode: the event's attributes in `ce-*` headers, its data in the body.
        let binary = encoding::is_binary_mode(headers).then(|| headers.clone());
        let trace = request_trace(headers);
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let format = match (&binary, content_type.and_then(format_for)) {
            (Some(_), _) => BodyFormat::Single,
            (None, Some(format)) => format,
            (None, None) => {
                return Err(EdgeError::UnsupportedMediaType(
                    content_type.map(str::to_owned),
                ));
            }
        };
        let too_large = EdgeError::BodyTooLarge {
            limit: limits.max_body_bytes,
        };
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.max_body_bytes) {
            return Err(too_large);
        }
        // Bodies in memory are bounded across all requests, by the bytes each one holds.
        let mut charge = BodyCharge::new(self.inflight.clone());
        if !charge.add(REQUEST_STATE_BYTES) {
            return Err(self.over_budget());
        }
        let read = read_body(
            req.into_body(),
            limits.max_body_bytes,
            declared,
            &mut charge,
        );
        let body = match tokio::time::timeout(limits.body_timeout, read).await {
            Err(_) => return Err(EdgeError::BodyTimeout),
            Ok(Err(ReadError::TooLarge)) => return Err(too_large),
            Ok(Err(ReadError::OverBudget)) => return Err(self.over_budget()),
            Ok(Err(ReadError::Failed(e))) => return Err(EdgeError::BodyRead(e)),
            Ok(Ok(body)) => body,
        };
        Ok(Received {
            body,
            encoding,
            binary,
            trace,
            format,
            charge,
        })
    }

    fn over_budget(&self) -> EdgeError {
        self.busy(
            "inflight_bytes",
            "the edge holds as many request bodies as it may; retry",
        )
    }

    /// Inflates, decodes and checks every event: pure CPU. Small plain bodies are checked
    /// right here; big or compressed ones (whose size is unknown until inflated) on the
    /// blocking pool. An undecodable body is kept in the quarantine before it is refused.
    async fn check(&self, received: Received) -> Result<(Vec<Outcome>, BodyCharge), EdgeError> {
        let Received {
            body,
            encoding,
            binary,
            trace,
            format,
            mut charge,
        } = received;
        let body_len = body.len();
        let body_for_quarantine = (encoding == Encoding::Identity).then(|| body.clone());
        let max_events = self.limits.max_batch_events;
        let limit = self.limits.max_body_bytes;
        let work = move |registry: &Registry,
                         charge: &mut BodyCharge|
              -> Result<Vec<Outcome>, BodyError> {
            let body = if encoding == Encoding::Identity {
                body
            } else {
                // The inflated body is charged as it grows; the compressed one is given
                // back once it is dropped.
                let inflated =
                    encoding::decompress_charged(encoding, &body, limit, &mut |n| charge.add(n))?;
                let raw_len = body.len() as u64;
                drop(body);
                charge.release(raw_len);
                inflated
            };
            let body = match &binary {
                None => body,
                Some(headers) => encoding::binary_to_structured(headers, &body)?,
            };
            Ok(check_body_traced(
                registry,
                &body,
                format,
                max_events,
                trace.as_ref(),
            )?)
        };
        let (charge, checked) =
            if encoding == Encoding::Identity && body_len <= INLINE_CHECK_MAX_BYTES {
                let checked = work(&self.registry, &mut charge);
                (charge, checked)
            } else {
                let registry = self.registry.clone();
                tokio::task::spawn_blocking(move || {
                    let checked = work(&registry, &mut charge);
                    (charge, checked)
                })
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "event check task failed");
                    EdgeError::Internal("event check failed")
                })?
            };
        match checked {
            Ok(outcomes) => Ok((outcomes, charge)),
            Err(BodyError::Decode(e @ DecodeError::TooManyEvents { .. })) => {
                Err(EdgeError::Decode(e))
            }
            Err(BodyError::Decode(e)) => {
                if let (Some(q), Some(body)) = (&self.quarantine, &body_for_quarantine)
                    && !matches!(e, DecodeError::Empty)
                {
                    let reason = [FieldError::new("", e.to_string())];
                    let capped = &body[..body.len().min(QUARANTINE_MAX_BODY)];
                    quarantine(&**q, vec![quarantine_record(capped, &reason)]).await;
                }
                Err(EdgeError::Decode(e))
            }
            Err(BodyError::Decompress(DecompressError::TooLarge(limit))) => {
                Err(EdgeError::InflatedTooLarge { limit })
            }
            Err(BodyError::Decompress(DecompressError::OverBudget)) => Err(self.over_budget()),
            Err(BodyError::Decompress(e)) => Err(EdgeError::InvalidEncoding(e)),
            Err(BodyError::Binary(e)) => Err(EdgeError::Binary(e)),
        }
    }

    /// The credential's part, once the events are counted: types it may not post are
    /// rejected (403 when that is all of them), and the rest of the events are taken from
    /// its bucket (the first was paid for on admission).
    fn charge(
        who: &Principal,
        outcomes: &mut [Outcome],
        rate: &mut Option<RateState>,
    ) -> Result<(), EdgeError> {
        apply_type_filter(who, outcomes)?;
        let n = u32::try_from(outcomes.len()).unwrap_or(u32::MAX);
        match who.charge_rest_of(n) {
            Charge::Unlimited => Ok(()),
            Charge::Allowed(s) => {
                *rate = Some(s);
                Ok(())
            }
            Charge::Limited(s) => {
                *rate = Some(s);
                Err(EdgeError::rate_limited(who, s))
            }
            Charge::TooMany { burst } => Err(EdgeError::BatchExceedsBurst { events: n, burst }),
        }
    }

    /// Which valid events to append: not those accepted within the dedupe window, nor a
    /// second copy within this very request. The appended events' keys and payloads are
    /// moved into the records (the answer needs neither).
    fn plan(&self, outcomes: &mut [Outcome]) -> Planned {
        let now = now_ms();
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(outcomes.len());
        let mut records = Vec::with_capacity(outcomes.len());
        // Made before any claim is taken, so that no path leaves one unsettled.
        let mut claims = Claims {
            dedupe: self.dedupe.clone(),
            keys: Vec::new(),
        };
        let mut claim_of: HashMap<usize, (dedupe::Key, Claim)> = HashMap::new();
        plans.resize_with(outcomes.len(), || None);
        if let Some(d) = &self.dedupe {
            let mut first_in_batch: HashMap<dedupe::Key, usize> = HashMap::new();
            let mut keys = Vec::new();
            for (i, o) in outcomes.iter().enumerate() {
                let Outcome::Valid { id, source, .. } = o else {
                    continue;
                };
                let k = dedupe::key(source, id);
                if let Some(&j) = first_in_batch.get(&k) {
                    plans[i] = Some(Plan::SameAs(j));
                    continue;
                }
                first_in_batch.insert(k, i);
                keys.push((i, k));
            }
            let taken = d.claim(&keys.iter().map(|(_, k)| *k).collect::<Vec<_>>(), now);
            for ((i, k), c) in keys.into_iter().zip(taken) {
                claim_of.insert(i, (k, c));
            }
        }
        for (i, o) in outcomes.iter_mut().enumerate() {
            let Outcome::Valid { key, payload, .. } = o else {
                continue;
            };
            if plans[i].is_some() {
                continue;
            }
            plans[i] = Some(match claim_of.get(&i) {
                Some((_, Claim::Duplicate)) => Plan::Duplicate,
                Some((_, Claim::InFlight)) => Plan::InFlight,
                claim => {
                    if let Some((k, _)) = claim {
                        claims.keys.push((*k, records.len()));
                    }
                    records.push(Record {
                        key: std::mem::take(key),
                        payload: std::mem::take(payload),
                    });
                    Plan::Append(records.len() - 1)
                }
            });
        }
        Planned {
            plans,
            records,
            claims,
        }
    }

    /// Appends the records, and keeps the rejected events in the quarantine, on a task
    /// of its own (see [`append_and_settle`]); returns once the stream has answered for
    /// every record, with the body's charge, which the caller holds until it has answered.
    async fn append(
        &self,
        outcomes: &[Outcome],
        records: Vec<Record>,
        claims: Claims,
        charge: BodyCharge,
    ) -> Result<(Vec<Result<(), AppendError>>, BodyCharge), EdgeError> {
        let held: Vec<Record> = if self.quarantine.is_some() {
            outcomes
                .iter()
                .filter_map(|o| match o {
                    Outcome::Rejected { errors, raw, .. } => Some(quarantine_record(raw, errors)),
                    Outcome::Valid { .. } => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let task = tokio::spawn(append_and_settle(
            self.stream.clone(),
            self.quarantine.clone(),
            records,
            claims,
            held,
            charge,
        ));
        match task.await {
            Ok((appended, charge)) => Ok((appended, charge)),
            Err(e) => {
                // The claims were released as the task unwound; the records' fate is
                // unknown.
                tracing::error!(error = %e, "append task failed");
                Err(EdgeError::AppendFailed {
                    retry_after_secs: self.limits.retry_after_secs,
                })
            }
        }
    }

    /// One result per event, in the request's order; the request's status from them:
    /// 200 all accepted, 207 some, 503 none but some to retry, 422 all rejected.
    fn answer(
        &self,
        outcomes: Vec<Outcome>,
        mut plans: Vec<Option<Plan>>,
        appended: &[Result<(), AppendError>],
    ) -> Response<Body> {
        // Events per (type, outcome) for the counter: a batch holds few distinct pairs, and
        // usually one, so a short list searched from its latest entry beats hashing each
        // event's type.
        let mut counts: Vec<(ByteString, &'static str, u64)> = Vec::new();
        let mut retry_after_ms = 0u64;
        let mut results: Vec<EventResult> = Vec::with_capacity(outcomes.len());
        for (index, outcome) in outcomes.into_iter().enumerate() {
            let (result, event_type) = match outcome {
                Outcome::Valid { id, event_type, .. } => {
                    let plan = plans[index].take().expect("every valid event has a plan");
                    let result = match plan {
                        Plan::Duplicate => EventResult {
                            duplicate: Some(true),
                            ..EventResult::new(index, Some(id), EventStatus::Accepted)
                        },
                        Plan::SameAs(j) if results[j].status == EventStatus::Accepted => {
                            EventResult {
                                duplicate: Some(true),
                                ..EventResult::new(index, Some(id), EventStatus::Accepted)
                            }
                        }
                        Plan::InFlight | Plan::SameAs(_) => {
                            EventResult::new(index, Some(id), EventStatus::Retry).because(
                                "an event with this source and id is being appended; retry",
                            )
                        }
                        Plan::Append(r) => match &appended[r] {
                            Ok(_) => EventResult::new(index, Some(id), EventStatus::Accepted),
                            // The stream will never take this record: a permanent fault of
                            // the event.
                            Err(AppendError::Refused(message)) => {
                                EventResult::new(index, Some(id), EventStatus::Rejected)
                                    .because(message.clone())
                            }
                            Err(AppendError::Busy { retry_after_ms: ms }) => {
                                retry_after_ms = retry_after_ms.max(*ms);
                                EventResult::new(index, Some(id), EventStatus::Retry)
                                    .because(format!("the stream is busy; retry after {ms} ms"))
                            }
                            Err(e) => EventResult::new(index, Some(id), EventStatus::Retry)
                                .because(e.to_string()),
                        },
                    };
                    (result, event_type)
                }
                Outcome::Rejected {
                    id,
                    event_type,
                    errors,
                    ..
                } => (
                    EventResult {
                        errors: Some(errors),
                        ..EventResult::new(index, id, EventStatus::Rejected)
                    },
                    event_type.unwrap_or_else(|| ByteString::from_static("unknown")),
                ),
            };
            let label = result.status.label(result.duplicate.is_some());
            match counts
                .iter_mut()
                .rev()
                .find(|(t, l, _)| *l == label && *t == event_type)
            {
                Some((_, _, n)) => *n += 1,
                None => counts.push((event_type, label, 1)),
            }
            results.push(result);
        }
        for (event_type, outcome, n) in counts {
            metrics::counter!("floodgate_ingest_events_total", "type" => event_type.to_string(), "outcome" => outcome)
                .increment(n);
        }

        let count = |s| results.iter().filter(|r| r.status == s).count();
        let (accepted, rejected, retry) = (
            count(EventStatus::Accepted),
            count(EventStatus::Rejected),
            count(EventStatus::Retry),
        );
        let status = if accepted == results.len() {
            StatusCode::OK
        } else if accepted > 0 {
            StatusCode::MULTI_STATUS
        } else if retry > 0 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        let body = BatchResponse {
            accepted,
            rejected,
            retry,
            results,
        }
        .to_json();
        let mut resp = response::with_type(status, response::JSON, Bytes::from(body));
        if retry > 0 {
            let secs = self
                .limits
                .retry_after_secs
                .max(retry_after_ms.div_ceil(1000));
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A body that yields the given frames, as hyper yields slices of its read buffer.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    fn frames(sizes: &[usize]) -> (Frames, Vec<u8>) {
        let mut all = Vec::new();
        let frames = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let f = vec![b'a' + i as u8; n];
                all.extend_from_slice(&f);
                Bytes::from(f)
            })
            .collect();
        (Frames(frames), all)
    }

    /// A body is read into a buffer of its own, charged by what that buffer holds: its
    /// length when it was declared, its capacity when it was not.
    #[tokio::test]
    async fn a_body_is_charged_what_its_buffer_holds() {
        let budget = Arc::new(Semaphore::new(1024));
        for declared in [Some(35 * 1024), None] {
            let (body, all) = frames(&[8 * 1024, 16 * 1024, 11 * 1024]);
            let mut charge = BodyCharge::new(budget.clone());
            let read = read_body(body, 1 << 20, declared, &mut charge).await;
            let read = read.ok().expect("within its limits");
            assert_eq!(&read[..], &all[..]);
            // Declared, the buffer is the body's size; not, it doubled past it (8, 24, 48
            // KiB), and the spare capacity is memory too.
            let held = if declared.is_some() { 35 } else { 48 };
            assert_eq!(charge.bytes, held * 1024, "declared {declared:?}");
            assert_eq!(budget.available_permits(), 1024 - held as usize);
            drop(charge);
            assert_eq!(budget.available_permits(), 1024);
        }
        // Growing past the budget stops the read, whatever the frames already charged.
        let small = Arc::new(Semaphore::new(30));
        let (body, _) = frames(&[8 * 1024, 16 * 1024, 11 * 1024]);
        let mut charge = BodyCharge::new(small);
        let read = read_body(body, 1 << 20, None, &mut charge).await;
        assert!(matches!(read, Err(ReadError::OverBudget)));
        // A body past its limit is refused as it arrives.
        let (body, _) = frames(&[8 * 1024, 16 * 1024]);
        let mut charge = BodyCharge::new(budget.clone());
        let read = read_body(body, 20 * 1024, None, &mut charge).await;
        assert!(matches!(read, Err(ReadError::TooLarge)));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v.as_bytes()).unwrap());
        }
        h
    }

    #[test]
    fn request_trace_follows_the_w3c_reading() {
        assert_eq!(request_trace(&headers(&[])), None);
        assert_eq!(request_trace(&headers(&[("tracestate", "k=v")])), None);
        let t = request_trace(&headers(&[("traceparent", TP)])).unwrap();
        assert_eq!((t.traceparent.as_str(), t.tracestate), (TP, None));
        // Invalid, or twice: ignored.
        assert_eq!(
            request_trace(&headers(&[("traceparent", "00-abc-def-01")])),
            None
        );
        assert_eq!(
            request_trace(&headers(&[("traceparent", TP), ("traceparent", TP)])),
            None
        );
        // Several tracestate headers are one list; an invalid list is dropped alone.
        let t = request_trace(&headers(&[
            ("traceparent", TP),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]))
        .unwrap();
        assert_eq!(t.tracestate.as_deref(), Some("a=1,b=2"));
        let t = request_trace(&headers(&[
            ("traceparent", TP),
            ("tracestate", "a=1"),
            ("tracestate", "a=2"),
        ]))
        .unwrap();
        assert_eq!(t.tracestate, None);
        let t =
            request_trace(&headers(&[("traceparent", TP), ("tracestate", "a=\u{e9}")])).unwrap();
        assert_eq!(t.tracestate, None);
    }

    /// Found in review: a 1 MiB body of quotes or control characters grew past a Kinesis
    /// record when escaped, and the quarantine stream refused it: the rejected event was
    /// never kept. Now the record fits, with as much of the raw text as fits and a reason
    /// saying it was cut.
    #[test]
    fn a_quarantine_record_fits_one_kinesis_record_whatever_the_body() {
        for fill in [b'"', 0x01, b'a'] {
            let raw = vec![fill; QUARANTINE_MAX_BODY];
            let reasons = [FieldError::new("", "not JSON")];
            let record = quarantine_record(&raw, &reasons);
            assert!(
                record.payload.len() <= QUARANTINE_MAX_RECORD,
                "{fill}: {} bytes",
                record.payload.len()
            );
            let held: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
            let kept = held["raw"].as_str().unwrap();
            assert!(
                kept.len() > QUARANTINE_MAX_RECORD / 8,
                "{fill}: kept {}",
                kept.len()
            );
            assert!(
                raw.starts_with(kept.as_bytes()),
                "{fill}: a prefix of the body"
            );
            let notes = held["reasons"].as_array().unwrap();
            assert_eq!(notes[0]["message"], "not JSON");
            assert!(
                notes[1]["message"].as_str().unwrap().contains("raw cut"),
                "{held:?}"
            );
        }
        // A record that fits is kept whole, with its reasons as they were.
        let record = quarantine_record(b"{\"id\":1}", &[FieldError::new("/id", "not a string")]);
        let held: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
        assert_eq!(held["raw"], "{\"id\":1}");
        assert_eq!(held["reasons"].as_array().unwrap().len(), 1);
    }

    fn escapes(bytes: &[u8]) -> bool {
        bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
    }

    /// Every byte value at every place of a buffer of 17 (two words and a tail), among
    /// fillers that sit next to the escaped ranges.
    #[test]
    fn the_escape_scan_finds_every_byte_everywhere() {
        for filler in [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff] {
            let plain = [filler; 17];
            assert_eq!(may_need_escape(&plain), escapes(&plain), "{filler:#x}");
            for b in 0..=255u8 {
                for at in 0..plain.len() {
                    let mut bytes = plain;
                    bytes[at] = b;
                    assert_eq!(may_need_escape(&bytes), escapes(&bytes), "{b:#x} at {at}");
                }
            }
        }
    }

    /// Ids serde writes raw although they look unusual, and escapes past the first word.
    #[test]
    fn the_answer_copies_what_serde_copies() {
        for id in [
            "\u{7f}",
            "\u{2028}",
            "\0",
            "é",
            "0123456789\"x",
            "0123456789abcdefg\\h",
        ] {
            let answer = BatchResponse {
                accepted: 1,
                rejected: 0,
                retry: 0,
                results: vec![EventResult::new(0, Some(id.into()), EventStatus::Accepted)],
            };
            assert_eq!(
                String::from_utf8(answer.to_json()).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }

    fn an_event_result() -> impl proptest::strategy::Strategy<Value = EventResult> {
        use proptest::prelude::*;
        let status = prop_oneof![
            Just(EventStatus::Accepted),
            Just(EventStatus::Rejected),
            Just(EventStatus::Retry)
        ];
        // Ids of every kind: plain, with quotes, backslashes, controls and non-ASCII.
        let id = proptest::option::of(prop_oneof![
            "[a-z0-9-]{0,40}",
            "\\PC{0,12}",
            proptest::collection::vec(any::<char>(), 0..12)
                .prop_map(|c| c.into_iter().collect::<String>()),
        ]);
        let errors = proptest::option::of(proptest::collection::vec(
            ("\\PC{0,8}", any::<String>()).prop_map(|(p, m)| FieldError::new(p, m)),
            0..3,
        ));
        (
            any::<usize>(),
            id,
            status,
            proptest::option::of(any::<bool>()),
            errors,
        )
            .prop_map(|(index, id, status, duplicate, errors)| EventResult {
                index,
                id: id.map(ByteString::from),
                status,
                duplicate,
                errors,
            })
    }

    proptest::proptest! {
        /// The word-wise scan answers as a byte by byte one, for any bytes.
        #[test]
        fn the_escape_scan_is_exact(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            proptest::prop_assert_eq!(may_need_escape(&bytes), escapes(&bytes));
        }

        /// The hand-written answer is byte for byte what serde writes for the same value.
        #[test]
        fn the_answer_is_what_serde_writes(
            counts in proptest::array::uniform3(proptest::prelude::any::<usize>()),
            results in proptest::collection::vec(an_event_result(), 0..8),
        ) {
            let answer = BatchResponse {
                accepted: counts[0],
                rejected: counts[1],
                retry: counts[2],
                results,
            };
            proptest::prop_assert_eq!(
                String::from_utf8(answer.to_json()).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }
}
