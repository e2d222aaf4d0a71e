//! Request bodies as they arrive: `Content-Encoding` (gzip, zstd, identity) and the
//! CloudEvents HTTP binary mode (`ce-*` headers, the data in the body).
//!
//! Decompression never holds more than the body limit: the decoder's output is read
//! through a cap of `limit + 1` bytes, so a compression bomb of any size costs a few MiB
//! and gets 413. zstd frames that ask for a window above 8 MiB are refused rather than
//! allocated.

use std::io::Read;

use bytes::Bytes;
use floodgate_core::strict::StrictError;
use hyper::HeaderMap;
use serde_json::{Map, Value};

/// The largest zstd window (log2) a request may make us allocate: 8 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// The body's `Content-Encoding`; `Err` names an encoding we do not take.
pub fn content_encoding(headers: &HeaderMap) -> Result<Encoding, String> {
    let Some(value) = headers.get(hyper::header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let Ok(value) = value.to_str() else {
        return Err("Content-Encoding is not ASCII; send gzip, zstd or identity".to_owned());
    };
    let value = value.trim().to_ascii_lowercase();
    match value.as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "zstd" => Ok(Encoding::Zstd),
        other => Err(format!(
            "Content-Encoding {other:?} is not accepted; send gzip, zstd or identity"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("the decompressed body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the body is not valid {0}: {1}")]
    Corrupt(&'static str, String),
    /// The caller's budget for bodies in memory has no room for more inflated bytes.
    #[error("no room in memory to decompress the body")]
    OverBudget,
}

/// Inflated bytes are produced (and charged) in steps of this many.
const INFLATE_STEP: u64 = 64 * 1024;

/// Decompresses `body`, refusing output above `limit` bytes.
pub fn decompress(encoding: Encoding, body: &Bytes, limit: u64) -> Result<Bytes, DecompressError> {
    decompress_charged(encoding, body, limit, &mut |_| true)
}

/// As [`decompress`], calling `charge` with what each step of output took in memory (the
/// growth of the output's capacity) before going on, so that memory is paid for as it is
/// taken; a `false` from `charge` stops
/// with [`DecompressError::OverBudget`]. An identity body charges nothing (it is in
/// memory already).
pub fn decompress_charged(
    encoding: Encoding,
    body: &Bytes,
    limit: u64,
    charge: &mut dyn FnMut(u64) -> bool,
) -> Result<Bytes, DecompressError> {
    let zstd_error = |e: std::io::Error| DecompressError::Corrupt("zstd", e.to_string());
    let (name, decoder): (&'static str, Box<dyn Read + '_>) = match encoding {
        Encoding::Identity => return Ok(body.clone()),
        Encoding::Gzip => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ),
        Encoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(&body[..]).map_err(zstd_error)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(zstd_error)?;
            ("zstd", Box::new(decoder))
        }
    };
    let corrupt = |e: std::io::Error| DecompressError::Corrupt(name, e.to_string());
    let mut capped = decoder.take(limit + 1);
    let mut out = Vec::new();
    // Charged by what the output takes in memory, its capacity, which grows ahead of it.
    let mut charged = 0u64;
    loop {
        let n = (&mut capped)
            .take(INFLATE_STEP)
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        if n == 0 {
            break;
        }
        let grown = out.capacity() as u64 - charged;
        if grown > 0 && !charge(grown) {
            return Err(DecompressError::OverBudget);
        }
        charged += grown;
    }
    if out.len() as u64 > limit {
        return Err(DecompressError::TooLarge(limit));
    }
    Ok(Bytes::from(out))
}

/// Whether a request is a binary-mode CloudEvent: it carries `ce-specversion` and its
/// `Content-Type` is not a structured CloudEvents type (structured mode wins).
pub fn is_binary_mode(headers: &HeaderMap) -> bool {
    let structured = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/cloudevents")
        });
    headers.contains_key("ce-specversion") && !structured
}

/// Why a binary-mode request could not become an event.
#[derive(Debug, thiserror::Error)]
pub enum BinaryModeError {
    #[error("header {0} is not valid percent-encoded UTF-8")]
    Header(String),
    #[error("invalid JSON data at line {line}, column {column}: {message}")]
    Data {
        line: usize,
        column: usize,
        message: String,
    },
}

/// Builds the structured (JSON format) event of a binary-mode request: every `ce-*`
/// header becomes the attribute it names, `Content-Type` becomes `datacontenttype`, and
/// a JSON body becomes `data`. A body of another media type is kept out: the registry
/// then rejects the event for lacking JSON data, naming `/datacontenttype`.
pub fn binary_to_structured(headers: &HeaderMap, body: &[u8]) -> Result<Bytes, BinaryModeError> {
    let mut event = Map::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let raw = value
            .to_str()
            .map_err(|_| BinaryModeError::Header(name.to_string()))?;
        let decoded =
            percent_decode(raw).ok_or_else(|| BinaryModeError::Header(name.to_string()))?;
        event.insert(attr.to_owned(), Value::String(decoded));
    }
    let content_type = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json_data = content_type
        .as_deref()
        .is_none_or(floodgate_core::envelope::is_json_content_type);
    if let Some(ct) = content_type {
        event.insert("datacontenttype".into(), Value::String(ct));
    }
    let mut text = serde_json::to_vec(&Value::Object(event)).expect("a JSON value serializes");
    let data = body.trim_ascii();
    if json_data && !data.is_empty() {
        let data_text = std::str::from_utf8(data).map_err(|_| BinaryModeError::Data {
            line: 1,
            column: 1,
            message: "the data is not valid UTF-8".to_owned(),
        })?;
        // The data must be JSON; a duplicate member name is judged with the event (422
        // with its pointer), like in structured mode.
        if let Err(StrictError::Syntax(e)) = floodgate_core::strict::from_str(data_text) {
            return Err(BinaryModeError::Data {
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            });
        }
        // The producer's data bytes, as sent, become the event's `data`.
        text.pop(); // the closing brace
        if text.len() > 1 {
            text.push(b',');
        }
        text.extend_from_slice(b"\"data\":");
        text.extend_from_slice(data);
        text.push(b'}');
    }
    Ok(Bytes::from(text))
}

/// RFC 3986 percent-decoding into UTF-8, as the HTTP binding asks for header values.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn decompression_is_capped() {
        let plain = vec![b'a'; 10_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(
            decompress(Encoding::Gzip, &gz, 10_000).unwrap().len(),
            10_000
        );
        assert!(matches!(
            decompress(Encoding::Gzip, &gz, 9_999),
            Err(DecompressError::TooLarge(_))
        ));
        let zs = Bytes::from(zstd::bulk::compress(&plain, 1).unwrap());
        assert_eq!(
            decompress(Encoding::Zstd, &zs, 10_000).unwrap().len(),
            10_000
        );
        assert!(matches!(
            decompress(Encoding::Zstd, &zs, 100),
            Err(DecompressError::TooLarge(_))
        ));
        assert!(matches!(
            decompress(Encoding::Gzip, &Bytes::from_static(b"not gzip"), 100),
            Err(DecompressError::Corrupt(..))
        ));
    }

    #[test]
    fn decompression_is_charged_as_it_inflates() {
        let plain = vec![b'a'; 300_000];
        let zs = Bytes::from(zstd::bulk::compress(&plain, 1).unwrap());
        let mut charged = 0;
        let out = decompress_charged(Encoding::Zstd, &zs, 1 << 20, &mut |n| {
            charged += n;
            true
        })
        .unwrap();
        // Charged by the output's capacity, which grows by doubling ahead of what it holds
        // (so past 300,000 here), and never more than twice what it holds.
        assert_eq!(out.len(), 300_000);
        assert!((300_001..=600_000).contains(&charged), "{charged}");
        // A budget with room for two charges stops at the third.
        let mut steps = 0;
        let refused = decompress_charged(Encoding::Zstd, &zs, 1 << 20, &mut |_| {
            steps += 1;
            steps <= 2
        });
        assert!(
            matches!(refused, Err(DecompressError::OverBudget)),
            "{refused:?}"
        );
        assert_eq!(steps, 3);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%C3%A9").as_deref(), Some("a bé"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%C3"), None);
    }
}
