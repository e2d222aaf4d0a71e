//! What every command shares: the configuration (file, environment, flags), the schema
//! registry, the edge's auth posture, the async runtime and the shutdown signal.

use std::path::Path;

use anyhow::{Context, Result, bail};
use floodgate_core::config::Config;
use floodgate_core::registry::{Registry, SchemaSource};

use crate::ServeArgs;

/// The built-in registry, or the schemas under `dir`.
pub(crate) fn load_registry(dir: Option<&Path>) -> Result<Registry> {
    let Some(dir) = dir else {
        return Ok(Registry::builtin()?);
    };
    let mut sources = Vec::new();
    let types = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read schema directory {}", dir.display()))?;
    for ty in types {
        let ty = ty?;
        if !ty.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(ty.path())? {
            let file = file?;
            let name = file.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                continue;
            }
            let path = file.path();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read schema {}", path.display()))?;
            sources.push(SchemaSource {
                relative_path: format!("{}/{name}", ty.file_name().to_string_lossy()),
                origin: path.display().to_string(),
                text,
            });
        }
    }
    if sources.is_empty() {
        bail!("no schemas (<type>/v<N>.json) under {}", dir.display());
    }
    Ok(Registry::from_sources(sources)?)
}

/// Whether requests need credentials; refuses an edge open to the network without them.
pub(crate) fn check_auth_posture(config: &Config, insecure_no_auth: bool) -> Result<bool> {
    let listen = config.ingest.listen;
    let auth = &config.ingest.auth;
    let required = auth.is_required(&listen);
    if required && !auth.has_credentials() {
        if insecure_no_auth {
            tracing::warn!(%listen, "--insecure-no-auth: anyone who can reach this address may post events");
            return Ok(false);
        }
        bail!(
            "refusing to serve on {listen}: auth is required on a non-loopback address (or with [ingest.auth] required = true), but no API key or JWT issuer is configured. Add one (`floodgate keys new --name NAME` prints a stanza), listen on 127.0.0.1, or pass --insecure-no-auth"
        );
    }
    if !required && !listen.ip().is_loopback() {
        if !insecure_no_auth {
            bail!(
                "refusing to serve on {listen} with [ingest.auth] required = false: anyone who can reach it could post. Require auth, listen on 127.0.0.1, or pass --insecure-no-auth"
            );
        }
        tracing::warn!(%listen, "--insecure-no-auth: requests without a credential are accepted");
    }
    Ok(required)
}

/// File, then environment and flags (clap folds the environment into the flags).
pub(crate) fn effective_config(args: &ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.ingest.listen = listen;
    }
    if let Some(ops) = args.ops_listen {
        config.ingest.ops_listen = Some(ops);
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    if let Some(dir) = &args.schemas {
        config.schemas_dir = Some(dir.clone());
    }
    if let Some(shards) = args.shards {
        config.stream.embedded.shards = shards;
    }
    config.validate()?;
    Ok(config)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fg-worker")
        .build()?)
}

/// The consumers' runtime in `serve`: threads of their own, at a lower priority than the
/// edge's (`nice`), so that when both want the two cores the edge's requests run first.
/// Its blocking pool (log reads, SQLite, lake encoding) starts its threads the same way.
/// The priority is set, not added to: a thread the pool starts from one of its own threads
/// inherits that one's.
pub(crate) fn consumer_runtime(nice: u8) -> Result<tokio::runtime::Runtime> {
    let edge = this_thread_nice().unwrap_or(0);
    let target = (edge + i32::from(nice)).min(19);
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fg-consumer")
        .on_thread_start(move || set_thread_nice(target))
        .build()?)
}

#[cfg(target_os = "linux")]
fn this_thread_nice() -> Option<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
}

/// Sets this thread's nice value (on Linux a thread id in `PRIO_PROCESS` names that one
/// thread). A thread left at the edge's priority only shares the cores equally.
#[cfg(target_os = "linux")]
fn set_thread_nice(nice: i32) {
    if this_thread_nice() != Some(nice)
        && let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
    {
        tracing::warn!(nice, error = %e, "cannot lower a processor thread's priority");
    }
}

/// Elsewhere a process-wide nice value cannot name one thread: the processors share the
/// cores equally.
#[cfg(not(target_os = "linux"))]
fn this_thread_nice() -> Option<i32> {
    None
}

#[cfg(not(target_os = "linux"))]
fn set_thread_nice(_nice: i32) {}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (not
/// when first polled), so a signal that arrives right after start-up is not lost.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                }
            }
            (int, term) => {
                let e = int.err().or(term.err()).expect("one handler failed");
                tracing::warn!(error = %e, "cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
