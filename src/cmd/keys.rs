//! `floodgate keys new`.

use std::io::{self, Write};

use anyhow::Result;
use floodgate_core::config::Config;

/// `floodgate keys new`: a 256-bit random secret, shown once, and the stanza holding its
/// hash.
pub(crate) fn new(
    name: &str,
    types: &[String],
    rate: Option<u32>,
    burst: Option<u32>,
) -> Result<()> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret = format!(
        "fg_{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let entry = floodgate_core::config::ApiKeyConfig {
        name: name.to_owned(),
        key_sha256: floodgate_ingest::auth::sha256_hex(&secret),
        allowed_types: if types.is_empty() {
            vec!["*".to_owned()]
        } else {
            types.to_vec()
        },
        rate_per_sec: rate,
        burst: burst.or(rate.map(|r| r.saturating_mul(2))),
    };
    let mut check = Config::default();
    check.ingest.auth.api_keys.push(entry.clone());
    check.validate()?;
    #[derive(serde::Serialize)]
    struct Stanza {
        api_keys: Vec<floodgate_core::config::ApiKeyConfig>,
    }
    let toml = toml::to_string(&Stanza {
        api_keys: vec![entry],
    })?;
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "# Secret for {name:?}; shown only now. Send it as `Authorization: Bearer <secret>` or `X-Api-Key: <secret>`:"
    )?;
    writeln!(out, "# {secret}")?;
    writeln!(
        out,
        "# Add this to [ingest.auth] in the config file (it holds only the hash):"
    )?;
    // `[[api_keys]]` belongs under `[ingest.auth]`.
    write!(
        out,
        "{}",
        toml.replace("[[api_keys]]", "[[ingest.auth.api_keys]]")
    )?;
    Ok(())
}
