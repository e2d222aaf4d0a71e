//! [`EdgeError`]: every way the edge refuses a whole request, each knowing its HTTP
//! status, its error code, its headers (`Retry-After`, `WWW-Authenticate`, `Allow`) and the
//! metric it counts. Handlers return `Result<_, EdgeError>`; the answer is built in one
//! place, so that a status and its code cannot drift apart between call sites.

use floodgate_core::decode::DecodeError;
use hyper::header::{ALLOW, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::auth::{Principal, RateState, Refusal};
use crate::encoding::{BinaryModeError, DecompressError};
use crate::response::{self, Body};

/// Why the edge refuses a whole request. Rendered as `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EdgeError {
    /// 401: no credential, or one the edge does not know.
    #[error("{}", .0.message())]
    Unauthorized(Refusal),
    /// 403: the credential may post none of the request's event types.
    #[error("credential {credential:?} may post none of the event types in this request")]
    ForbiddenTypes { credential: String },
    /// 429: the credential's bucket is empty.
    #[error(
        "over this credential's rate of {per_sec} events/s (burst {}); retry after {} s",
        .state.limit, .state.reset_secs
    )]
    RateLimited {
        credential: String,
        per_sec: u32,
        state: RateState,
    },
    /// 413: more events in one request than the credential's burst could ever allow.
    #[error(
        "{events} events in one request, but this credential's burst is {burst}; send smaller batches"
    )]
    BatchExceedsBurst { events: u32, burst: u32 },
    /// 503 with `Retry-After`: the edge cannot take more right now (`reason` is the code,
    /// and the backpressure metric's label).
    #[error("{message}")]
    Busy {
        reason: &'static str,
        message: String,
        retry_after_secs: u64,
    },
    /// 415: a `Content-Encoding` the edge does not inflate.
    #[error("{0}")]
    UnsupportedEncoding(String),
    /// 415: a `Content-Type` that names no body format (`None`: no header).
    #[error(
        "Content-Type {} is not accepted; use application/cloudevents+json, application/cloudevents-batch+json, application/json or application/x-ndjson (or CloudEvents binary mode with ce-* headers)",
        .0.as_ref().map_or_else(|| "(missing)".to_owned(), |c| format!("{c:?}"))
    )]
    UnsupportedMediaType(Option<String>),
    /// 413: the body, as sent, is over `max_body_bytes`.
    #[error("the body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// 413: a compressed body inflates past `max_body_bytes`.
    #[error("the decompressed body is larger than {limit} bytes")]
    InflatedTooLarge { limit: u64 },
    /// 408: the body did not arrive within `body_timeout`.
    #[error("the body did not arrive in time")]
    BodyTimeout,
    /// 400: the connection failed while the body was read.
    #[error("the body could not be read: {0}")]
    BodyRead(String),
    /// 400 (413 for too many events): the body is not events in its format.
    #[error(transparent)]
    Decode(DecodeError),
    /// 400: a compressed body that does not inflate.
    #[error("{0}")]
    InvalidEncoding(DecompressError),
    /// 400: a binary-mode request whose headers or data are invalid.
    #[error(transparent)]
    Binary(BinaryModeError),
    /// 503 with `Retry-After`: the append task failed; the records' fate is unknown.
    #[error("the append failed unexpectedly; retry")]
    AppendFailed { retry_after_secs: u64 },
    /// 503: the request took longer than `request_timeout`.
    #[error("the request took too long; retry")]
    RequestTimeout,
    /// 503: the stream cannot take writes (`/readyz`).
    #[error("{0}")]
    NotReady(String),
    /// 500: a task of the edge failed (a bug; logged where it happened).
    #[error("{0}")]
    Internal(&'static str),
    /// 503: the bookings state cannot be read (`None`: this process serves none).
    #[error("{}", .0.as_deref().unwrap_or("this process serves no bookings state"))]
    StateUnavailable(Option<String>),
    /// 404 with a route's own code.
    #[error("{message}")]
    NotFound {
        code: &'static str,
        message: &'static str,
    },
    /// 405 with `Allow`.
    #[error("this route allows {0}")]
    MethodNotAllowed(&'static str),
}

impl EdgeError {
    /// 429 for `who`, whose bucket is in `state`.
    pub(crate) fn rate_limited(who: &Principal, state: RateState) -> Self {
        EdgeError::RateLimited {
            credential: who.name().to_owned(),
            per_sec: who.rate_per_sec(),
            state,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            EdgeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            EdgeError::ForbiddenTypes { .. } => StatusCode::FORBIDDEN,
            EdgeError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            EdgeError::BatchExceedsBurst { .. }
            | EdgeError::BodyTooLarge { .. }
            | EdgeError::InflatedTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EdgeError::Decode(DecodeError::TooManyEvents { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            EdgeError::Busy { .. }
            | EdgeError::AppendFailed { .. }
            | EdgeError::RequestTimeout
            | EdgeError::NotReady(_)
            | EdgeError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EdgeError::UnsupportedEncoding(_) | EdgeError::UnsupportedMediaType(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            EdgeError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            EdgeError::BodyRead(_)
            | EdgeError::Decode(_)
            | EdgeError::InvalidEncoding(_)
            | EdgeError::Binary(_) => StatusCode::BAD_REQUEST,
            EdgeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            EdgeError::NotFound { .. } => StatusCode::NOT_FOUND,
            EdgeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The `code` of the error body: stable, for programs to match on.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            EdgeError::Unauthorized(r) => r.code(),
            EdgeError::ForbiddenTypes { .. } => "forbidden_type",
            EdgeError::RateLimited { .. } => "rate_limited",
            EdgeError::BatchExceedsBurst { .. } => "batch_exceeds_burst",
            EdgeError::Busy { reason, .. } => reason,
            EdgeError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            EdgeError::UnsupportedMediaType(_) => "unsupported_media_type",
            EdgeError::BodyTooLarge { .. } | EdgeError::InflatedTooLarge { .. } => "body_too_large",
            EdgeError::BodyTimeout => "body_timeout",
            EdgeError::BodyRead(_) => "body_read_failed",
            EdgeError::Decode(e) => e.code(),
            EdgeError::InvalidEncoding(_) => "invalid_content_encoding",
            EdgeError::Binary(BinaryModeError::Header(_)) => "invalid_header",
            EdgeError::Binary(BinaryModeError::Data { .. }) => "invalid_json",
            EdgeError::AppendFailed { .. } => "append_failed",
            EdgeError::RequestTimeout => "request_timeout",
            EdgeError::NotReady(_) => "not_ready",
            EdgeError::Internal(_) => "internal",
            EdgeError::StateUnavailable(_) => "state_unavailable",
            EdgeError::NotFound { code, .. } => code,
            EdgeError::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    /// Counts the refusal where it has a metric of its own.
    fn count(&self) {
        match self {
            EdgeError::Unauthorized(r) => {
                metrics::counter!("floodgate_ingest_auth_failures_total", "reason" => r.code())
                    .increment(1);
            }
            EdgeError::ForbiddenTypes { credential } => {
                metrics::counter!("floodgate_ingest_forbidden_total", "credential" => credential.clone())
                    .increment(1);
            }
            EdgeError::RateLimited { credential, .. } => {
                metrics::counter!("floodgate_ingest_rate_limited_total", "credential" => credential.clone())
                    .increment(1);
            }
            EdgeError::Busy { reason, .. } => {
                metrics::counter!("floodgate_ingest_backpressure_total", "reason" => *reason)
                    .increment(1);
            }
            _ => {}
        }
    }

    /// The answer: the JSON error body, with the headers this refusal carries.
    pub(crate) fn into_response(self) -> Response<Body> {
        self.count();
        let mut resp = response::error(self.status(), self.code(), &self.to_string());
        let headers = resp.headers_mut();
        match &self {
            EdgeError::Unauthorized(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"floodgate\""),
                );
            }
            EdgeError::RateLimited { state, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(state.reset_secs));
            }
            EdgeError::Busy {
                retry_after_secs, ..
            }
            | EdgeError::AppendFailed { retry_after_secs } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            EdgeError::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        resp
    }
}

impl From<Refusal> for EdgeError {
    fn from(r: Refusal) -> Self {
        EdgeError::Unauthorized(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal, and the status, code and header it must be answered with.
    type Case = (
        EdgeError,
        u16,
        &'static str,
        Option<(&'static str, &'static str)>,
    );

    /// Each refusal's status, code and headers, as the edge answered them before the
    /// codes were gathered here (the OpenAPI document and producers rely on them).
    #[test]
    fn each_refusal_keeps_its_status_code_and_headers() {
        let cases: Vec<Case> = vec![
            (
                EdgeError::Unauthorized(Refusal::Missing),
                401,
                "missing_credential",
                Some(("www-authenticate", "Bearer realm=\"floodgate\"")),
            ),
            (
                EdgeError::Busy {
                    reason: "consumer_lag",
                    message: "behind".into(),
                    retry_after_secs: 3,
                },
                503,
                "consumer_lag",
                Some(("retry-after", "3")),
            ),
            (
                EdgeError::BodyTooLarge { limit: 10 },
                413,
                "body_too_large",
                None,
            ),
            (
                EdgeError::Decode(DecodeError::TooManyEvents { max: 5 }),
                413,
                "too_many_events",
                None,
            ),
            (
                EdgeError::Decode(DecodeError::Empty),
                400,
                "empty_body",
                None,
            ),
            (
                EdgeError::InflatedTooLarge { limit: 10 },
                413,
                "body_too_large",
                None,
            ),
            (
                EdgeError::InvalidEncoding(DecompressError::Corrupt("gzip", "bad".into())),
                400,
                "invalid_content_encoding",
                None,
            ),
            (
                EdgeError::UnsupportedMediaType(None),
                415,
                "unsupported_media_type",
                None,
            ),
            (
                EdgeError::MethodNotAllowed("POST"),
                405,
                "method_not_allowed",
                Some(("allow", "POST")),
            ),
            (
                EdgeError::AppendFailed {
                    retry_after_secs: 1,
                },
                503,
                "append_failed",
                Some(("retry-after", "1")),
            ),
        ];
        for (error, status, code, header) in cases {
            let message = error.to_string();
            let resp = error.into_response();
            assert_eq!(resp.status().as_u16(), status, "{code}");
            if let Some((name, value)) = header {
                assert_eq!(resp.headers()[name], value, "{code}");
            }
            let body = resp.into_body();
            let bytes = futures_lite_body(body);
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["message"], message.as_str());
        }
    }

    fn futures_lite_body(body: Body) -> bytes::Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(body.collect()).unwrap().to_bytes()
    }
}
