//! Building responses: JSON bodies and the whole-request error shape.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// A response body: its bytes, and whatever must stay charged while they are in memory.
/// An answer to a batch keeps its share of the in-flight budget (`max_inflight_body_bytes`)
/// until hyper has sent it or dropped it: a client that does not read its answers, or an
/// HTTP/2 client with many streams, holds them charged rather than free.
pub struct Body {
    bytes: Full<Bytes>,
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Body {
    fn new(bytes: Bytes) -> Self {
        Self {
            bytes: Full::new(bytes),
            held: None,
        }
    }

    /// Keeps `held` until the body has been sent or dropped.
    pub fn hold(&mut self, held: impl std::any::Any + Send + Sync) {
        self.held = Some(Box::new(held));
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("bytes", &self.bytes)
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().bytes).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.bytes.size_hint()
    }
}

pub const JSON: &str = "application/json";

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    with_type(status, JSON, Bytes::from(bytes))
}

pub fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// `{"error":{"code":…,"message":…}}` — every error that concerns the whole request.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail { code, message },
        },
    )
}
