//! Who is posting: API keys (by the SHA-256 of their secret) and bearer JWTs (RS256,
//! ES256, checked against a JWKS), each with the event types it may post and a token
//! bucket that counts events.
//!
//! Credentials arrive as `Authorization: Bearer <key or JWT>` or `X-Api-Key: <key>`.
//! A bearer value with two dots is a JWT; anything else is an API key. Secrets and tokens
//! are never logged and never become metric labels: a credential is known by its
//! configured name (API keys) or as `jwt`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use floodgate_core::config::{ApiKeyConfig, AuthConfig, JwtConfig};
use globset::{Glob, GlobSet, GlobSetBuilder};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why auth could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("ingest.auth.api_keys[name = {name:?}].allowed_types: {message}")]
    Glob { name: String, message: String },
    #[error("cannot load the JWKS from {source_name}: {message}")]
    Jwks {
        source_name: String,
        message: String,
    },
}

/// Why a request's credential was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    UnknownKey,
    InvalidToken,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Missing => "missing_credential",
            Refusal::UnknownKey | Refusal::InvalidToken => "invalid_credential",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "this route needs a credential: Authorization: Bearer <key or JWT>, or X-Api-Key"
            }
            Refusal::UnknownKey => "the API key is not known",
            Refusal::InvalidToken => {
                "the token is not valid (signature, issuer, audience, expiry or not-before)"
            }
        }
    }
}

/// A token bucket over whichever clock it was built with: the real one in production, a
/// fake one in tests, so that refill is checked without waiting for it.
trait Bucket: Send + Sync {
    /// Takes `n` events, all or none.
    fn take(&self, n: NonZeroU32) -> Take;
}

enum Take {
    /// Taken; `remaining` events may still be taken right now.
    Taken { remaining: u32 },
    /// Not taken: `n` events fit in `wait` from now.
    NotYet { wait: Duration },
    /// Not taken: `n` is more than the bucket ever holds.
    Never,
}

impl<C> Bucket for RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn take(&self, n: NonZeroU32) -> Take {
        match self.check_n(n) {
            Ok(Ok(snapshot)) => Take::Taken {
                remaining: snapshot.remaining_burst_capacity(),
            },
            Ok(Err(not_until)) => Take::NotYet {
                wait: not_until.wait_time_from(self.clock().now()),
            },
            Err(_) => Take::Never,
        }
    }
}

/// The event types a credential may post.
#[derive(Debug)]
struct TypeFilter {
    any: bool,
    globs: GlobSet,
}

impl TypeFilter {
    fn new(patterns: &[String]) -> Result<Self, String> {
        let any = patterns.iter().any(|p| p == "*");
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p).map_err(|e| format!("{p:?}: {e}"))?);
        }
        Ok(Self {
            any,
            globs: b.build().map_err(|e| e.to_string())?,
        })
    }

    fn allows(&self, event_type: Option<&str>) -> bool {
        self.any || event_type.is_some_and(|t| self.globs.is_match(t))
    }
}

/// One authenticated caller: an API key, or one JWT subject.
pub struct Principal {
    /// The configured key name, or `jwt`; safe for logs and metric labels.
    name: Arc<str>,
    types: Arc<TypeFilter>,
    limiter: Option<Box<dyn Bucket>>,
    /// Sustained events per second, for `RateLimit-Limit`.
    rate_per_sec: u32,
    burst: u32,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The rate-limit state to report in `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Events the bucket holds when full.
    pub limit: u32,
    /// Events that may be sent right now.
    pub remaining: u32,
    /// Seconds until the bucket is full again, rounded up; when limited, also the
    /// `Retry-After` (see [`Principal::charge`]).
    pub reset_secs: u64,
}

/// The outcome of charging a request's events to a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// No limit applies.
    Unlimited,
    Allowed(RateState),
    /// Over the limit: answer 429; retry after `reset_secs`.
    Limited(RateState),
    /// More events than the bucket can ever hold: the batch must be split.
    TooMany {
        burst: u32,
    },
}

impl Principal {
    fn new(name: Arc<str>, types: Arc<TypeFilter>, rate: Option<u32>, burst: Option<u32>) -> Self {
        Self::with_clock(name, types, rate, burst, DefaultClock::default())
    }

    /// As [`Principal::new`], with the bucket on `clock`.
    fn with_clock<C>(
        name: Arc<str>,
        types: Arc<TypeFilter>,
        rate: Option<u32>,
        burst: Option<u32>,
        clock: C,
    ) -> Self
    where
        C: Clock + Send + Sync + 'static,
        C::Instant: Send + Sync,
    {
        let (limiter, rate_per_sec, burst) = match rate.and_then(NonZeroU32::new) {
            None => (None, 0, 0),
            Some(r) => {
                // Default burst: two seconds' worth.
                let b = burst
                    .and_then(NonZeroU32::new)
                    .unwrap_or_else(|| r.saturating_add(r.get()));
                let quota = Quota::per_second(r).allow_burst(b);
                let bucket: Box<dyn Bucket> = Box::new(
                    RateLimiter::direct_with_clock(quota, clock)
                        .with_middleware::<StateInformationMiddleware>(),
                );
                (Some(bucket), r.get(), b.get())
            }
        };
        Self {
            name,
            types,
            limiter,
            rate_per_sec,
            burst,
        }
    }

    /// The name to use in logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this credential may post events of `event_type`.
    pub fn allows(&self, event_type: Option<&str>) -> bool {
        self.types.allows(event_type)
    }

    /// Takes `n` events from the bucket, all or none.
    ///
    /// When they do not fit, the answer's `reset_secs` (sent as `Retry-After`) is the time
    /// until the bucket is full again, not until `n` events fit: the edge charges a
    /// request's first event before it knows how many the request holds, so only a wait
    /// for the full bucket lets the same request (at most `burst` events) pass when it is
    /// retried then. A shorter answer has a client that follows it pay one event per
    /// retry and be refused again, for ever when its batch is near the burst.
    pub fn charge(&self, n: u32) -> Charge {
        let Some(limiter) = &self.limiter else {
            return Charge::Unlimited;
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Charge::Unlimited;
        };
        let per_event = Duration::from_secs(1) / self.rate_per_sec;
        match limiter.take(n) {
            Take::Taken { remaining } => {
                let missing = self.burst.saturating_sub(remaining);
                Charge::Allowed(RateState {
                    limit: self.burst,
                    remaining,
                    reset_secs: whole_secs(per_event * missing),
                })
            }
            Take::NotYet { wait } => {
                // `n` events fit after `wait`; the other `burst - n` refill one by one.
                let until_full = wait + per_event * self.burst.saturating_sub(n.get());
                Charge::Limited(RateState {
                    limit: self.burst,
                    remaining: 0,
                    reset_secs: whole_secs(until_full).max(1),
                })
            }
            Take::Never => Charge::TooMany { burst: self.burst },
        }
    }

    /// Charges the rest of an `n`-event request whose first event was charged before its
    /// body was read. A request larger than the burst can never pass, however long it waits.
    pub fn charge_rest_of(&self, n: u32) -> Charge {
        if self.limiter.is_some() && n > self.burst {
            return Charge::TooMany { burst: self.burst };
        }
        self.charge(n.saturating_sub(1))
    }

    /// The sustained rate, events per second; 0 when unlimited.
    pub fn rate_per_sec(&self) -> u32 {
        self.rate_per_sec
    }
}

/// The edge's authenticator, built once from `[ingest.auth]`.
#[derive(Debug)]
pub struct Auth {
    required: bool,
    keys: HashMap<[u8; 32], Arc<Principal>>,
    jwt: Option<Jwt>,
}

/// The caller of one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No credential, and none is required.
    Anonymous,
    Known(Arc<Principal>),
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Anonymous => None,
            Caller::Known(p) => Some(p),
        }
    }
}

impl Auth {
    /// No credentials and none required: every caller is anonymous.
    pub fn open() -> Self {
        Self {
            required: false,
            keys: HashMap::new(),
            jwt: None,
        }
    }

    /// Builds the authenticator; reads the JWKS file (or fetches the JWKS address) once.
    pub async fn from_config(cfg: &AuthConfig, required: bool) -> Result<Self, AuthSetupError> {
        let mut keys = HashMap::new();
        for k in &cfg.api_keys {
            keys.insert(hash_from_hex(k), Arc::new(api_key_principal(k)?));
        }
        let jwt = match &cfg.jwt {
            None => None,
            Some(j) => Some(Jwt::new(j).await?),
        };
        Ok(Self {
            required,
            keys,
            jwt,
        })
    }

    /// Whether requests to protected routes must carry a credential.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Who sent these headers. A credential that is present but wrong is refused even when
    /// none is required.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let caller = match (bearer, api_key) {
            (Some(token), _) if token.bytes().filter(|&b| b == b'.').count() == 2 => {
                let Some(jwt) = &self.jwt else {
                    return Err(Refusal::InvalidToken);
                };
                Caller::Known(jwt.verify(token).ok_or(Refusal::InvalidToken)?)
            }
            (Some(key), _) | (None, Some(key)) => {
                let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
                Caller::Known(self.keys.get(&digest).cloned().ok_or(Refusal::UnknownKey)?)
            }
            (None, None) if headers.contains_key(AUTHORIZATION) => {
                return Err(Refusal::InvalidToken);
            }
            (None, None) if self.required => return Err(Refusal::Missing),
            (None, None) => Caller::Anonymous,
        };
        Ok(caller)
    }

    /// Re-reads the JWKS (file or address) now and, when it parses, verifies tokens with
    /// its keys alone from then on: a key dropped from the set stops working. When it
    /// cannot be read or parsed, the keys in use stay, and the error says why. `Ok` without
    /// doing anything when no JWT is configured.
    pub async fn refresh_jwks(&self) -> Result<(), AuthSetupError> {
        let Some(jwt) = &self.jwt else { return Ok(()) };
        let keys = load_jwks(&jwt.config).await?;
        *jwt.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// Re-reads the JWKS every `jwks_refresh_secs`, until the process ends.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let Some(jwt) = &self.jwt else { return };
        let every = Duration::from_secs(jwt.config.jwks_refresh_secs.max(1));
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(auth) = this.upgrade() else { return };
                if let Err(e) = auth.refresh_jwks().await {
                    tracing::warn!(error = %e, "cannot refresh the JWKS; keeping the old keys");
                }
            }
        });
    }
}

fn hash_from_hex(k: &ApiKeyConfig) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        // Config::validate checked 64 hex digits.
        *byte = u8::from_str_radix(&k.key_sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}

fn api_key_principal(k: &ApiKeyConfig) -> Result<Principal, AuthSetupError> {
    let types = TypeFilter::new(&k.allowed_types).map_err(|message| AuthSetupError::Glob {
        name: k.name.clone(),
        message,
    })?;
    Ok(Principal::new(
        Arc::from(k.name.as_str()),
        Arc::new(types),
        k.rate_per_sec,
        k.burst,
    ))
}

/// The lowercase hex SHA-256 of a secret: what `key_sha256` holds.
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A duration in whole seconds, rounded up: what `Retry-After` and `RateLimit-Reset` carry.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Subjects whose buckets are remembered; past this the memory starts over.
const MAX_JWT_SUBJECTS: usize = 100_000;

struct Jwt {
    config: JwtConfig,
    keys: RwLock<Arc<Keys>>,
    types: Arc<TypeFilter>,
    name: Arc<str>,
    subjects: Mutex<HashMap<String, Arc<Principal>>>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// Verification keys by `kid`; keys without a `kid` are tried in order.
#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, (Algorithm, DecodingKey)>,
    unnamed: Vec<(Algorithm, DecodingKey)>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
}

impl Jwt {
    async fn new(config: &JwtConfig) -> Result<Self, AuthSetupError> {
        let types =
            TypeFilter::new(&config.allowed_types).map_err(|message| AuthSetupError::Glob {
                name: "jwt".to_owned(),
                message,
            })?;
        let keys = load_jwks(config).await?;
        Ok(Self {
            config: config.clone(),
            keys: RwLock::new(Arc::new(keys)),
            types: Arc::new(types),
            name: Arc::from("jwt"),
            subjects: Mutex::new(HashMap::new()),
        })
    }

    fn verify(&self, token: &str) -> Option<Arc<Principal>> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return None;
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let candidates: Vec<&(Algorithm, DecodingKey)> = match &header.kid {
            Some(kid) => keys.by_kid.get(kid).into_iter().collect(),
            None => keys.unnamed.iter().collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = candidates
            .into_iter()
            .filter(|(alg, _)| *alg == header.alg)
            .find_map(|(_, key)| jsonwebtoken::decode::<Claims>(token, key, &validation).ok())?
            .claims;
        let sub = claims.sub.unwrap_or_default();
        let mut subjects = self.subjects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = subjects.get(&sub) {
            return Some(p.clone());
        }
        if subjects.len() >= MAX_JWT_SUBJECTS {
            subjects.clear();
        }
        let p = Arc::new(Principal::new(
            self.name.clone(),
            self.types.clone(),
            self.config.rate_per_sec,
            self.config.burst,
        ));
        subjects.insert(sub, p.clone());
        Some(p)
    }
}

async fn load_jwks(config: &JwtConfig) -> Result<Keys, AuthSetupError> {
    let (source_name, text) = match (&config.jwks_file, &config.jwks_url) {
        (Some(path), _) => (
            path.display().to_string(),
            read_file(path.clone())
                .await
                .map_err(|e| AuthSetupError::Jwks {
                    source_name: path.display().to_string(),
                    message: e.to_string(),
                })?,
        ),
        (None, Some(url)) => (
            url.clone(),
            fetch(url).await.map_err(|message| AuthSetupError::Jwks {
                source_name: url.clone(),
                message,
            })?,
        ),
        (None, None) => {
            return Err(AuthSetupError::Jwks {
                source_name: "(nothing)".to_owned(),
                message: "set jwks_file or jwks_url".to_owned(),
            });
        }
    };
    parse_jwks(&text).map_err(|message| AuthSetupError::Jwks {
        source_name,
        message,
    })
}

async fn read_file(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .map_err(std::io::Error::other)?
}

async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let client =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body.to_bytes().to_vec())
}

/// Parses a JWKS, keeping the RSA and P-256 keys meant for signatures.
fn parse_jwks(text: &[u8]) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let mut keys = Keys::default();
    for jwk in &set.keys {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => continue,
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
        {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), (alg, key));
            }
            None => keys.unnamed.push((alg, key)),
        }
    }
    if keys.by_kid.is_empty() && keys.unnamed.is_empty() {
        return Err("no RS256 or ES256 signing key in the set".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn principal(rate: u32, burst: u32) -> Principal {
        Principal::new(
            Arc::from("t"),
            Arc::new(TypeFilter::new(&["booking.*".to_owned()]).unwrap()),
            Some(rate),
            Some(burst),
        )
    }

    #[test]
    fn globs_pick_types() {
        let p = principal(1, 1);
        assert!(p.allows(Some("booking.requested")));
        assert!(!p.allows(Some("checkin.scanned")));
        assert!(!p.allows(None));
        let any = TypeFilter::new(&["*".to_owned()]).unwrap();
        assert!(any.allows(None));
    }

    #[test]
    fn buckets_count_events() {
        let p = principal(10, 20);
        match p.charge(15) {
            Charge::Allowed(s) => {
                assert_eq!(s.limit, 20);
                assert_eq!(s.remaining, 5);
                assert!(s.reset_secs >= 1 && s.reset_secs <= 2, "{s:?}");
            }
            other => panic!("{other:?}"),
        }
        match p.charge(10) {
            Charge::Limited(s) => {
                assert_eq!(s.remaining, 0);
                assert!(s.reset_secs >= 1, "{s:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.charge(21), Charge::TooMany { burst: 20 });
    }

    fn on_fake_clock(rate: u32, burst: u32) -> (Principal, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let p = Principal::with_clock(
            Arc::from("t"),
            Arc::new(TypeFilter::new(&["*".to_owned()]).unwrap()),
            Some(rate),
            Some(burst),
            clock.clone(),
        );
        (p, clock)
    }

    fn state(remaining: u32, reset_secs: u64) -> RateState {
        RateState {
            limit: 10,
            remaining,
            reset_secs,
        }
    }

    #[test]
    fn buckets_refill_at_their_rate_and_no_faster() {
        // 5 events/s, burst 10: one event comes back every 200 ms.
        let (p, clock) = on_fake_clock(5, 10);
        assert_eq!(p.charge(10), Charge::Allowed(state(0, 2)));
        assert_eq!(p.charge(1), Charge::Limited(state(0, 2)));

        clock.advance(Duration::from_secs(1));
        // One second brings back five events, not six (full again in one more second); a
        // refused charge takes none…
        assert_eq!(p.charge(6), Charge::Limited(state(0, 1)));
        // …so five pass, and leave none.
        assert_eq!(p.charge(5), Charge::Allowed(state(0, 2)));
        assert_eq!(p.charge(1), Charge::Limited(state(0, 2)));

        clock.advance(Duration::from_millis(199));
        assert!(matches!(p.charge(1), Charge::Limited(_)));
        clock.advance(Duration::from_millis(1));
        assert_eq!(p.charge(1), Charge::Allowed(state(0, 2)));

        // An idle bucket fills up to its burst and no further.
        clock.advance(Duration::from_secs(60));
        assert_eq!(p.charge(4), Charge::Allowed(state(6, 1)));
        assert_eq!(p.charge(6), Charge::Allowed(state(0, 2)));
        assert!(matches!(p.charge(1), Charge::Limited(_)));
    }

    /// One request of `n` events as the edge charges it (`events.rs`): its first event
    /// before the body is read, the rest once they are counted. `Err` holds `Retry-After`.
    fn post(p: &Principal, n: u32) -> Result<(), u64> {
        for charge in [p.charge(1), p.charge_rest_of(n)] {
            match charge {
                Charge::Limited(s) => return Err(s.reset_secs),
                Charge::TooMany { burst } => panic!("{n} events fit a burst of {burst}"),
                Charge::Allowed(_) | Charge::Unlimited => {}
            }
        }
        Ok(())
    }

    #[test]
    fn a_request_retried_after_retry_after_passes() {
        for (rate, burst) in [(1, 1), (1, 2), (1, 10), (3, 7), (5, 10), (50, 120)] {
            let per_event = Duration::from_secs(1) / rate;
            for n in 1..=burst {
                for refilled in 0..=burst {
                    for extra in [Duration::ZERO, per_event / 2] {
                        let (p, clock) = on_fake_clock(rate, burst);
                        assert!(matches!(p.charge(burst), Charge::Allowed(_)));
                        clock.advance(per_event * refilled + extra);
                        let Err(retry_after) = post(&p, n) else {
                            continue;
                        };
                        let case = format!(
                            "{rate}/s, burst {burst}, {n} events, {refilled} refilled + {extra:?}"
                        );
                        assert!(
                            (1..=whole_secs(per_event * burst)).contains(&retry_after),
                            "{case}: Retry-After {retry_after}"
                        );
                        clock.advance(Duration::from_secs(retry_after));
                        assert_eq!(
                            post(&p, n),
                            Ok(()),
                            "{case}: refused again after Retry-After {retry_after} s"
                        );
                    }
                }
            }
        }
    }

    fn jwks(kids: &[&str]) -> String {
        // One P-256 public key (tests/fixtures/jwt) under each `kid`.
        let keys: Vec<serde_json::Value> = kids
            .iter()
            .map(|kid| {
                serde_json::json!({
                    "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
                    "x": "JqrUfh_YRwXlkVxtQAxT9cuEwpJBCO-GsSytxaX0Uhs",
                    "y": "eNryAEyPSEkFcz34M8c7JSXiDXKL5875AqDD2Z-Nsww"
                })
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    fn kids(auth: &Auth) -> Vec<String> {
        let jwt = auth.jwt.as_ref().unwrap();
        let keys = jwt.keys.read().unwrap().clone();
        let mut kids: Vec<String> = keys.by_kid.keys().cloned().collect();
        kids.sort();
        kids
    }

    #[test]
    fn a_jwks_refresh_swaps_the_keys_and_a_bad_one_keeps_them() {
        let dir = std::env::temp_dir().join(format!("fg-jwks-refresh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks(&["old-1", "old-2"])).unwrap();
        let cfg = AuthConfig {
            required: Some(true),
            api_keys: vec![],
            jwt: Some(JwtConfig {
                jwks_file: Some(path.clone()),
                jwks_url: None,
                jwks_refresh_secs: 300,
                issuer: "https://issuer.test".into(),
                audience: "floodgate".into(),
                leeway_secs: 0,
                allowed_types: vec!["*".into()],
                rate_per_sec: None,
                burst: None,
            }),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let auth = rt.block_on(Auth::from_config(&cfg, true)).unwrap();
        assert_eq!(kids(&auth), ["old-1", "old-2"]);

        // The new set replaces the old one: a key dropped from it stops working.
        std::fs::write(&path, jwks(&["new", "old-2"])).unwrap();
        rt.block_on(auth.refresh_jwks()).unwrap();
        assert_eq!(kids(&auth), ["new", "old-2"]);

        for bad in ["{\"keys\": [", "{\"keys\": []}", "", "[]"] {
            std::fs::write(&path, bad).unwrap();
            let e = rt.block_on(auth.refresh_jwks()).unwrap_err();
            assert!(e.to_string().contains("jwks.json"), "{bad:?}: {e}");
            assert_eq!(kids(&auth), ["new", "old-2"], "{bad:?} kept the keys");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(rt.block_on(auth.refresh_jwks()).is_err());
        assert_eq!(
            kids(&auth),
            ["new", "old-2"],
            "a missing file kept the keys"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_are_found_by_hash() {
        let secret = "fg_test_secret";
        let cfg = AuthConfig {
            required: Some(true),
            api_keys: vec![ApiKeyConfig {
                name: "web".into(),
                key_sha256: sha256_hex(secret),
                allowed_types: vec!["*".into()],
                rate_per_sec: None,
                burst: None,
            }],
            jwt: None,
        };
        let auth = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(Auth::from_config(&cfg, true))
            .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(auth.authenticate(&h).unwrap_err(), Refusal::Missing);
        h.insert("x-api-key", secret.parse().unwrap());
        assert_eq!(
            auth.authenticate(&h).unwrap().principal().unwrap().name(),
            "web"
        );
        h.insert(AUTHORIZATION, format!("Bearer {secret}").parse().unwrap());
        assert!(auth.authenticate(&h).is_ok());
        h.insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(auth.authenticate(&h).unwrap_err(), Refusal::UnknownKey);
        h.insert(AUTHORIZATION, "Bearer a.b.c".parse().unwrap());
        assert_eq!(auth.authenticate(&h).unwrap_err(), Refusal::InvalidToken);
        h.insert(AUTHORIZATION, "Basic Zm9vOmJhcg==".parse().unwrap());
        h.remove("x-api-key");
        assert_eq!(auth.authenticate(&h).unwrap_err(), Refusal::InvalidToken);
    }
}
