//! Auth and rate limits at the real binary: API keys made by `floodgate keys new`, JWTs
//! (RS256, ES256) against a JWKS file, allowed types, token buckets with `RateLimit-*`
//! headers, and the refusal to serve an open edge on a non-loopback address.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Resp, Server, booking, envelope, floodgate, request};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://issuer.test/pool";
const AUDIENCE: &str = "floodgate-test";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt")
}

/// Runs `floodgate keys new`; returns (secret, TOML stanza).
fn keys_new(args: &[&str]) -> (String, String) {
    let out = floodgate()
        .args(["keys", "new"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("# fg_").map(|s| format!("fg_{s}")))
        .expect("the secret is printed");
    let stanza: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!stanza.contains(&secret), "the stanza holds only the hash");
    (secret, stanza)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(alg: Algorithm, kid: &str, pem: &str, claims: &Value) -> String {
    let key_pem = std::fs::read(fixtures().join(pem)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&key_pem).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&key_pem).unwrap(),
        _ => unreachable!(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now() + 600, "nbf": now() - 5})
}

fn post_with(server: &Server, headers: &[(&str, &str)], events: &[Value]) -> Resp {
    let body = serde_json::to_vec(events).unwrap();
    common::post(
        server.addr,
        "/v1/events",
        Some("application/cloudevents-batch+json"),
        &body,
        headers,
    )
}

fn checkin(id: &str) -> Value {
    envelope(
        id,
        "checkin.scanned",
        json!({"bookingId": format!("B-{id}"), "eventId": "E1", "gate": "A", "scannedAt": "2026-11-22T10:00:00Z"}),
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    server: Server,
    log: PathBuf,
    web: String,
    ops: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (web, web_stanza) = keys_new(&[
        "--name",
        "web",
        "--types",
        "booking.*",
        "--rate-per-sec",
        "5",
        "--burst",
        "10",
    ]);
    let (ops, ops_stanza) = keys_new(&["--name", "ops"]);
    let config = format!(
        "[ingest.auth]\nrequired = true\n{web_stanza}{ops_stanza}\n[ingest.auth.jwt]\njwks_file = {:?}\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\nleeway_secs = 30\n",
        fixtures().join("jwks.json").display().to_string()
    );
    let config_path = dir.path().join("floodgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("server.log");
    let server = Server::start_logged(
        &dir.path().join("data"),
        &["--config", config_path.to_str().unwrap()],
        Some(&log),
    );
    Setup {
        _dir: dir,
        server,
        log,
        web,
        ops,
    }
}

#[test]
fn credentials_are_required_and_checked() {
    let s = setup();
    let ev = [booking("a1", "B-a1", "E1", 1)];

    let r = post_with(&s.server, &[], &ev);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "missing_credential");
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));

    for bad in [
        ("x-api-key", "fg_nope".to_owned()),
        ("authorization", "Bearer fg_nope".to_owned()),
        ("authorization", format!("Basic {}", s.ops)),
        ("authorization", "Bearer a.b.c".to_owned()),
    ] {
        let r = post_with(&s.server, &[(bad.0, &bad.1)], &ev);
        assert_eq!(r.status, 401, "{bad:?}: {r:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_credential");
    }

    let bearer = format!("Bearer {}", s.ops);
    for h in [("x-api-key", s.ops.as_str()), ("authorization", &bearer)] {
        let r = post_with(
            &s.server,
            &[h],
            &[booking(&format!("ok-{}", h.0), "B-ok", "E1", 1)],
        );
        assert_eq!(r.status, 200, "{h:?}: {r:?}");
    }

    // The state read API is protected too; health, metrics and schemas are not.
    let r = request(s.server.addr, "GET", "/v1/inventory/E1", &[], None);
    assert_eq!(r.status, 401);
    // With the key, the exact answer: 404 until the processors apply the booking, then 200
    // with it (anything else, a 500 included, fails).
    let booking_ok = common::wait_for(30, "B-ok to be applied", || {
        let r = request(
            s.server.addr,
            "GET",
            "/v1/bookings/B-ok",
            &[("x-api-key", &s.ops)],
            None,
        );
        match r.status {
            200 => Some(r.json()),
            404 => {
                assert_eq!(r.json()["error"]["code"], "booking_not_found", "{r:?}");
                None
            }
            _ => panic!("GET /v1/bookings/B-ok with a valid key: {r:?}"),
        }
    });
    assert_eq!(booking_ok["bookingId"], "B-ok", "{booking_ok}");
    assert_eq!(booking_ok["eventId"], "E1", "{booking_ok}");
    for open in ["/healthz", "/metrics", "/v1/schemas"] {
        assert_eq!(s.server.get(open).status, 200, "{open}");
    }
}

#[test]
fn allowed_types_give_403_or_per_event_rejections() {
    let s = setup();
    let key = [("x-api-key", s.web.as_str())];
    let r = post_with(&s.server, &key, &[checkin("c1"), checkin("c2")]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "forbidden_type");

    let r = post_with(
        &s.server,
        &key,
        &[booking("m1", "B-m1", "E1", 1), checkin("m2")],
    );
    assert_eq!(r.status, 207, "{r:?}");
    let body = r.json();
    assert_eq!(body["results"][0]["status"], "accepted");
    assert_eq!(body["results"][1]["status"], "rejected");
    assert_eq!(body["results"][1]["errors"][0]["pointer"], "/type");

    let appended = common::stream_read(&s.server.data_dir, &[]);
    let ids: Vec<&str> = appended
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m1"], "only the allowed event is appended");
}

#[test]
fn rate_limits_count_events_and_answer_429_with_headers() {
    let s = setup();
    let key = [("x-api-key", s.web.as_str())];
    let batch = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| booking(&format!("r{i}"), &format!("B-r{i}"), "E1", 1))
            .collect()
    };
    // Burst 10 at 5 events/s: ten events pass at once and empty the bucket. (It gets one
    // back every 200 ms; only a request that took longer than that may see it.)
    let sent = Instant::now();
    let r = post_with(&s.server, &key, &batch(0, 10));
    let took = sent.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("ratelimit-limit"), Some("10"));
    let remaining: u32 = r.header("ratelimit-remaining").unwrap().parse().unwrap();
    let refilled = (took.as_secs_f64() * 5.0) as u32;
    assert!(
        remaining <= refilled,
        "{remaining} left after 10 of 10 in {took:?}"
    );
    // Full again once the missing events are back, in whole seconds.
    let reset = (10 - remaining).div_ceil(5).to_string();
    assert_eq!(r.header("ratelimit-reset"), Some(reset.as_str()), "{r:?}");

    // The next ten do not pass…
    let r = post_with(&s.server, &key, &batch(10, 10));
    let refused = Instant::now();
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("ratelimit-limit"), Some("10"));
    assert_eq!(
        r.header("ratelimit-reset"),
        Some(retry_after.to_string().as_str())
    );

    // …until `Retry-After` has passed: then the same request does, the first time. (The
    // wait is the one the server asked for, which is the contract under test.)
    std::thread::sleep(Duration::from_secs(retry_after).saturating_sub(refused.elapsed()));
    let r = post_with(&s.server, &key, &batch(10, 10));
    assert_eq!(
        r.status, 200,
        "refused after Retry-After {retry_after} s: {r:?}"
    );
    let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
    let emptied = Instant::now();

    // A batch larger than the burst can never pass: 413 (split it), not 429, even from a
    // full bucket. Wait until `RateLimit-Reset` says it is full again.
    std::thread::sleep(Duration::from_secs(reset).saturating_sub(emptied.elapsed()));
    let big: Vec<Value> = (0..11)
        .map(|i| booking(&format!("big{i}"), &format!("B-big{i}"), "E1", 1))
        .collect();
    let r = post_with(&s.server, &key, &big);
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "batch_exceeds_burst");

    // Another key has its own bucket (and no limit).
    let r = post_with(&s.server, &[("x-api-key", &s.ops)], &big);
    assert_eq!(r.status, 200, "{r:?}");

    let limited = common::metric(
        &s.server,
        "floodgate_ingest_rate_limited_total",
        &["credential=\"web\""],
    );
    assert_eq!(limited, 1.0);
    let appended: Vec<String> = common::stream_read(&s.server.data_dir, &[])
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap().to_owned())
        .filter(|id| id.starts_with('r'))
        .collect();
    assert_eq!(
        appended.len(),
        20,
        "every event answered 200 is appended once"
    );
}

#[test]
fn jwts_are_verified() {
    let s = setup();
    let ev = |id: &str| [booking(id, &format!("B-{id}"), "E1", 1)];
    let good = [
        token(Algorithm::RS256, "test-rsa", "rs256.pem", &claims("alice")),
        token(Algorithm::ES256, "test-ec", "es256.pem", &claims("bob")),
        // Expired 10 s ago, within the 30 s leeway.
        token(
            Algorithm::RS256,
            "test-rsa",
            "rs256.pem",
            &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "exp": now() - 10}),
        ),
    ];
    for (i, t) in good.iter().enumerate() {
        let auth = format!("Bearer {t}");
        let r = post_with(
            &s.server,
            &[("authorization", &auth)],
            &ev(&format!("j{i}")),
        );
        assert_eq!(r.status, 200, "token {i}: {r:?}");
    }

    let mut bad = vec![
        (
            "expired",
            token(
                Algorithm::RS256,
                "test-rsa",
                "rs256.pem",
                &json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() - 120}),
            ),
        ),
        (
            "not yet valid",
            token(
                Algorithm::RS256,
                "test-rsa",
                "rs256.pem",
                &json!({"iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "nbf": now() + 300}),
            ),
        ),
        (
            "wrong issuer",
            token(
                Algorithm::RS256,
                "test-rsa",
                "rs256.pem",
                &json!({"iss": "https://evil.test", "aud": AUDIENCE, "exp": now() + 600}),
            ),
        ),
        (
            "wrong audience",
            token(
                Algorithm::ES256,
                "test-ec",
                "es256.pem",
                &json!({"iss": ISSUER, "aud": "someone-else", "exp": now() + 600}),
            ),
        ),
        (
            "no exp",
            token(
                Algorithm::RS256,
                "test-rsa",
                "rs256.pem",
                &json!({"iss": ISSUER, "aud": AUDIENCE}),
            ),
        ),
        (
            "untrusted key under a trusted kid",
            token(
                Algorithm::RS256,
                "test-rsa",
                "untrusted-rs256.pem",
                &claims("mallory"),
            ),
        ),
        (
            "unknown kid",
            token(Algorithm::RS256, "other", "rs256.pem", &claims("mallory")),
        ),
        (
            "ES256 header on the RSA key",
            token(
                Algorithm::ES256,
                "test-rsa",
                "es256.pem",
                &claims("mallory"),
            ),
        ),
    ];
    // alg=none and HS256 signed with the RSA key's public text: classic confusions.
    let b64 = |v: &Value| {
        use std::fmt::Write;
        let raw = serde_json::to_vec(v).unwrap();
        let mut s = String::new();
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for chunk in raw.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                s.write_char(T[((n >> (18 - 6 * i)) & 63) as usize] as char)
                    .unwrap();
            }
        }
        s
    };
    bad.push((
        "alg none",
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims("mallory"))
        ),
    ));
    bad.push((
        "HS256",
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims("mallory"),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap(),
    ));
    for (why, t) in &bad {
        let auth = format!("Bearer {t}");
        let r = post_with(&s.server, &[("authorization", &auth)], &ev("bad"));
        assert_eq!(r.status, 401, "{why}: {r:?}");
    }

    // No secret and no token reaches the logs or the metrics.
    let metrics = String::from_utf8(s.server.get("/metrics").body).unwrap();
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.len() > 100, "the server logged at debug level");
    for secret in good
        .iter()
        .chain(bad.iter().map(|(_, t)| t))
        .map(String::as_str)
        .chain([s.web.as_str(), s.ops.as_str()])
    {
        // A token's signature is its secret part.
        let tail = secret.rsplit('.').next().unwrap();
        if tail.len() < 16 {
            continue;
        }
        assert!(!metrics.contains(tail), "a credential is in /metrics");
        assert!(!log.contains(tail), "a credential is in the log");
    }
}

/// Writes `text` to `path` as a key rotation should: whole, by a rename, so that the server
/// never reads half a file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The fixture JWKS with its two keys under other `kid`s.
fn jwks_with_kids(rsa: &str, ec: &str) -> String {
    let mut set: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("jwks.json")).unwrap()).unwrap();
    set["keys"][0]["kid"] = json!(rsa);
    set["keys"][1]["kid"] = json!(ec);
    set.to_string()
}

#[test]
fn a_jwks_refresh_swaps_the_keys_and_a_corrupt_jwks_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    replace_file(&jwks, &jwks_with_kids("test-rsa", "test-ec"));
    let config = dir.path().join("floodgate.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest.auth]\nrequired = true\n[ingest.auth.jwt]\njwks_file = {:?}\njwks_refresh_secs = 1\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\n",
            jwks.display().to_string()
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let server = Server::start_logged(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        Some(&log),
    );
    // The status of a one-event post with a token signed by the fixture EC key under `kid`.
    let mut sent = 0;
    let mut post = |kid: &str| -> u16 {
        sent += 1;
        let auth = format!(
            "Bearer {}",
            token(Algorithm::ES256, kid, "es256.pem", &claims("rotor"))
        );
        let ev = booking(&format!("k{sent}"), &format!("B-k{sent}"), "E1", 1);
        post_with(&server, &[("authorization", &auth)], &[ev]).status
    };
    assert_eq!(post("test-ec"), 200);
    assert_eq!(post("rotated-ec"), 401, "an unknown kid");

    // Rotation: the new set holds the key as `rotated-ec`, and `test-ec` no longer.
    replace_file(&jwks, &jwks_with_kids("rotated-rsa", "rotated-ec"));
    common::wait_for(60, "the new kid to be accepted", || {
        match post("rotated-ec") {
            200 => Some(()),
            401 => None,
            other => panic!("a token under the new kid: {other}"),
        }
    });
    assert_eq!(
        post("test-ec"),
        401,
        "a kid dropped from the set is refused"
    );

    // A corrupt set, then one without a usable key: the refresh fails (and says so), and
    // the keys in use stay.
    let failed_refreshes = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("cannot refresh the JWKS")
            .count()
    };
    for bad in ["{\"keys\": [{\"kty\": \"EC\"", "{\"keys\": []}"] {
        let before = failed_refreshes();
        replace_file(&jwks, bad);
        common::wait_for(60, "a refresh of the bad JWKS", || {
            (failed_refreshes() > before).then_some(())
        });
        assert_eq!(post("rotated-ec"), 200, "after {bad:?}");
        assert_eq!(post("test-ec"), 401, "after {bad:?}");
    }
}

#[test]
fn an_open_edge_on_a_public_address_needs_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = floodgate()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve") && err.contains("--insecure-no-auth"),
        "{err}"
    );

    // With the flag it serves (here on loopback, which every test uses, but with auth
    // explicitly off it still needs no credential).
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[ingest.auth]\nrequired = false\n").unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap(), "--insecure-no-auth"],
    );
    let r = server.post_batch(&[booking("x1", "B-x1", "E1", 1)]);
    assert_eq!(r.status, 200, "{r:?}");
}
