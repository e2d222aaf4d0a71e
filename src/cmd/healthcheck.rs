//! `floodgate healthcheck`: one GET of a health route, for container health checks in
//! images that have no HTTP client (the Dockerfile's `HEALTHCHECK`). Exit status 0 when the
//! answer is 2xx, 1 otherwise; why, on stderr.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// The whole check may take this long (connect, send, answer).
const TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) fn check(url: &str) -> ExitCode {
    match status(url) {
        Ok(code) if (200..300).contains(&code) => ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("floodgate healthcheck: {url} answered {code}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("floodgate healthcheck: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status code of `GET url`; `url` is `http://host:port/path` (no TLS: the check runs
/// beside the server).
fn status(url: &str) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: floodgate-healthcheck\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line is all we need: `HTTP/1.1 200 OK`.
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match conn.read(&mut head[got..]).map_err(|e| e.to_string())? {
            0 => break,
            n => got += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..got]);
    line.strip_prefix("HTTP/1.")
        .and_then(|l| l.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_cannot_check() {
        assert!(status("https://127.0.0.1:1/healthz").is_err());
        // Nothing listens on port 1.
        assert!(status("http://127.0.0.1:1/healthz").is_err());
        assert_eq!(check("http://127.0.0.1:1/healthz"), ExitCode::FAILURE);
    }
}
