//! `floodgate`: the command-line entry point. Wiring only: it parses flags, loads the
//! configuration, builds the backends from `floodgate-sinks` and hands them to the edge
//! (`floodgate-ingest`) through the role traits of `floodgate-core`.

use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use floodgate_core::check::{Outcome, check_body};
use floodgate_core::config::Config;
use floodgate_core::decode::BodyFormat;
use floodgate_core::registry::{Registry, SchemaSource};
use floodgate_core::state::StateStore;
use floodgate_core::stream::{
    CheckpointStore, ConsumerLag, SequenceNumber, StartPosition, StreamReader, StreamWriter,
};
use floodgate_ingest::App;
use floodgate_ingest::app::Limits;
use floodgate_ingest::auth::Auth;
use floodgate_processors::bookings::BookingsProcessor;
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{RuntimeConfig, spawn_consumers};
use floodgate_sinks::{
    EmbeddedCheckpoints, EmbeddedLog, EmbeddedLogReader, EmbeddedOutbox, LocalDirStore,
    SqliteStateStore,
};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::watch;

// The edge allocates many small, short-lived values per event (parsed JSON) across the
// async workers and the blocking pool; glibc's allocator spent over a quarter of the
// edge's CPU on them under load (malloc_consolidate, arena contention). mimalloc's
// thread-local free lists make that cost small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "floodgate",
    version,
    about = "Streaming event ingestion: HTTP edge, durable sharded stream, processors"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the HTTP edge and the processors on the embedded durable stream.
    Serve(ServeArgs),
    /// Run only the HTTP edge (processors run elsewhere, e.g. `floodgate process`).
    Ingest(ServeArgs),
    /// Run only the processors, reading the stream another process writes.
    Process(ProcessArgs),
    /// Inspect the derived events the processors published.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Inspect the records the bookings processor could not apply (with their reasons).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Inspect the stream.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Inspect and use the schema registry offline.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The Parquet lake.
    #[command(subcommand)]
    Lake(LakeCommand),
}

#[derive(Subcommand, Debug)]
enum LakeCommand {
    /// Merge the small files of each partition of a table into one; interrupted runs are
    /// finished (or undone) by the next one, and a later rebuild or replay never duplicates
    /// their rows.
    Compact {
        /// Directory of the embedded backends' files [default: the config's, else ./data]
        #[arg(long, env = "FLOODGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// TOML configuration file (its data_dir and schemas_dir, as the server uses them)
        #[arg(long, env = "FLOODGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The table, e.g. booking_requested
        #[arg(long)]
        table: String,
        /// Only this day's partitions (YYYY-MM-DD)
        #[arg(long)]
        dt: Option<String>,
        /// Files smaller than this are merged [default: 64 MiB]
        #[arg(long, default_value_t = 64 << 20)]
        small_bytes: u64,
        #[arg(long, env = "FLOODGATE_SCHEMAS")]
        schemas: Option<PathBuf>,
    },
    /// Re-derive the lake from the stream: the same files (runs) with the same rows, plus
    /// runs for records the lake did not hold yet. Run it with the server stopped.
    Rebuild {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// TOML configuration file
        #[arg(long, env = "FLOODGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print an Athena `CREATE EXTERNAL TABLE` (Parquet, partition projection on dt and
    /// hour) for every lake table.
    Ddl {
        /// Where the lake lives, e.g. s3://bucket/prefix
        #[arg(long)]
        location: String,
        #[arg(long, env = "FLOODGATE_SCHEMAS")]
        schemas: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a fresh API key: prints the secret once, and the TOML stanza that holds only its
    /// SHA-256 (paste it into the config file).
    New {
        /// The key's name in logs and metrics
        #[arg(long)]
        name: String,
        /// Event types the key may post, as globs (repeatable) [default: every type]
        #[arg(long = "types", num_args = 1..)]
        types: Vec<String>,
        /// Events per second, sustained [default: no limit]
        #[arg(long)]
        rate_per_sec: Option<u32>,
        /// Events above the sustained rate at once [default: 2 s worth]
        #[arg(long, requires = "rate_per_sec")]
        burst: Option<u32>,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "FLOODGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the embedded backends' files [default: ./data]
    #[arg(long, env = "FLOODGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "FLOODGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of `<type>/v<N>.json` schemas replacing the built-in ones
    #[arg(long, env = "FLOODGATE_SCHEMAS")]
    schemas: Option<PathBuf>,
    /// Number of stream shards (fixed once the log exists) [default: 4]
    #[arg(long, env = "FLOODGATE_SHARDS")]
    shards: Option<u32>,
    /// Serve on a non-loopback address without requiring credentials
    #[arg(long)]
    insecure_no_auth: bool,
}

#[derive(Args, Debug)]
struct ProcessArgs {
    /// Directory of the embedded backends' files [default: ./data]
    #[arg(long, env = "FLOODGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "FLOODGATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Print derived events as NDJSON, one {"event":{…}} per line. Safe beside a running
    /// server.
    Read {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLettersCommand {
    /// Print dead letters as NDJSON, one
    /// {"shard","sequence","reason","detail","event"} per line. Safe beside a running server.
    Read {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCommand {
    /// Print records as NDJSON: {"shard":N,"sequence":"…","key":"…","event":{…}}. Safe
    /// beside a running server.
    Read {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// Only this shard [default: every shard, in order]
        #[arg(long)]
        shard: Option<u32>,
        /// First sequence number to print (per shard)
        #[arg(long)]
        from: Option<u64>,
        /// Print at most this many records in all
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Check every frame of the stream and of the quarantine log (CRC, decoding, contiguous
    /// sequences, segment bases); prints one line per damaged frame, then a summary. Exit
    /// status 0: clean, 1: damage found, 2: unreadable. Safe beside a running server.
    Verify {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// With the server stopped: move each damaged segment's bytes from the damage on
        /// into `<segment>.damaged-<offset>` and truncate it there. The records in those
        /// bytes leave the stream.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SchemasCommand {
    /// List the registered schema versions.
    List {
        #[arg(long, env = "FLOODGATE_SCHEMAS")]
        schemas: Option<PathBuf>,
    },
    /// Check a file of events (one event, a JSON array, or NDJSON) offline; prints one
    /// NDJSON outcome per event. Exit status 0: all valid, 1: some invalid, 2: unreadable.
    Check {
        /// The events file; `-` reads standard input
        file: PathBuf,
        #[arg(long, env = "FLOODGATE_SCHEMAS")]
        schemas: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Serve(args) => serve(args, true).map(|()| ExitCode::SUCCESS),
        Command::Ingest(args) => serve(args, false).map(|()| ExitCode::SUCCESS),
        Command::Process(args) => process(args).map(|()| ExitCode::SUCCESS),
        Command::Outbox(OutboxCommand::Read { data_dir }) => {
            outbox_read(&data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::DeadLetters(DeadLettersCommand::Read { data_dir }) => {
            dead_letters_read(&data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Stream(StreamCommand::Read {
            data_dir,
            shard,
            from,
            limit,
        }) => stream_read(&data_dir, shard, from, limit).map(|()| ExitCode::SUCCESS),
        Command::Stream(StreamCommand::Verify { data_dir, repair }) => {
            stream_verify(&data_dir, repair)
        }
        Command::Schemas(SchemasCommand::List { schemas }) => {
            schemas_list(schemas.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        Command::Schemas(SchemasCommand::Check { file, schemas }) => {
            schemas_check(&file, schemas.as_deref())
        }
        Command::Keys(KeysCommand::New {
            name,
            types,
            rate_per_sec,
            burst,
        }) => keys_new(&name, &types, rate_per_sec, burst).map(|()| ExitCode::SUCCESS),
        Command::Lake(LakeCommand::Compact {
            data_dir,
            config,
            table,
            dt,
            small_bytes,
            schemas,
        }) => lake_compact(
            ServeArgs {
                listen: None,
                data_dir,
                config,
                schemas,
                shards: None,
                insecure_no_auth: false,
            },
            &table,
            dt.as_deref(),
            small_bytes,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Lake(LakeCommand::Rebuild { data_dir, config }) => {
            lake_rebuild(data_dir, config).map(|()| ExitCode::SUCCESS)
        }
        Command::Lake(LakeCommand::Ddl { location, schemas }) => {
            lake_ddl(&location, schemas.as_deref()).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("floodgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOODGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false)
        .init();
}

/// The built-in registry, or the schemas under `dir`.
fn load_registry(dir: Option<&Path>) -> Result<Registry> {
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

/// File, then environment and flags (clap folds the environment into the flags).
/// Whether requests need credentials; refuses an edge open to the network without them.
fn check_auth_posture(config: &Config, insecure_no_auth: bool) -> Result<bool> {
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

fn effective_config(args: &ServeArgs) -> Result<Config> {
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

/// `floodgate lake compact`: with the schemas and data directory the configuration (and
/// flags) give, as the server that wrote the lake used them; a compaction under other
/// schemas would drop the columns they lack.
fn lake_compact(args: ServeArgs, table: &str, dt: Option<&str>, small_bytes: u64) -> Result<()> {
    let config = effective_config(&args)?;
    let data_dir = config.data_dir.as_path();
    let registry = load_registry(config.schemas_dir.as_deref())?;
    let tables = floodgate_core::lake::tables(&registry)?;
    let Some(t) = tables.iter().find(|t| t.name == table) else {
        bail!(
            "no lake table {table:?}; tables: {}",
            tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let store = LocalDirStore::open(&data_dir.join("lake"))?;
    let (parts, files) = runtime()?.block_on(floodgate_processors::compact::compact_table(
        &store,
        table,
        dt,
        &t.schema,
        small_bytes,
    ))?;
    eprintln!("compacted {files} files in {parts} partitions of {table}");
    Ok(())
}

/// `floodgate lake rebuild`: replay every shard into a new lake beside the old one, with
/// the old lake's run boundaries, then swap the directories.
///
/// Retention may have deleted the start of a source: a run that begins before the oldest
/// record still held (whole, or cut by retention) cannot be re-derived, so its file is kept
/// as it is and the replay of that shard starts after the run's end. Every other run is
/// written again from the log, with the same name and rows.
fn lake_rebuild(data_dir: PathBuf, config_path: Option<PathBuf>) -> Result<()> {
    let config = effective_config(&ServeArgs {
        listen: None,
        data_dir: Some(data_dir),
        config: config_path,
        schemas: None,
        shards: None,
        insecure_no_auth: false,
    })?;
    let registry = load_registry(config.schemas_dir.as_deref())?;
    let tables = floodgate_core::lake::tables(&registry)?;
    runtime()?.block_on(async move {
        let stream_root = config.data_dir.join("stream");
        // Opening the log for writing takes its lock: a running server makes this fail.
        let log = EmbeddedLog::open(&stream_root, &config.stream.embedded).with_context(|| {
            format!(
                "cannot open the stream at {} (stop the server first)",
                stream_root.display()
            )
        })?;
        let quarantine = open_quarantine(&config)?;
        let outbox_dir = config.data_dir.join("outbox");
        floodgate_sinks::outbox::ensure_log(&outbox_dir, &config.publish.outbox).await?;
        let outbox = EmbeddedLogReader::open(&floodgate_sinks::outbox::log_root(&outbox_dir))?;
        let lake_dir = config.data_dir.join("lake");
        let old = LocalDirStore::open(&lake_dir)?;
        let fresh_dir = config
            .data_dir
            .join(format!(".lake.rebuild-{}", std::process::id()));
        if fresh_dir.exists() {
            std::fs::remove_dir_all(&fresh_dir)?;
        }
        let fresh = Arc::new(LocalDirStore::open(&fresh_dir)?);
        let sources = floodgate_processors::rebuild::Sources {
            stream: &log,
            quarantine: &quarantine,
            derived: &outbox,
        };
        let rebuilt = floodgate_processors::rebuild::rebuild(
            sources,
            &old,
            fresh,
            &tables,
            config.lake.roll_bytes,
        )
        .await?;
        log.close().await?;
        quarantine.close().await?;
        if rebuilt.kept > 0 {
            eprintln!(
                "kept {} files whose runs start before what their source still holds",
                rebuilt.kept
            );
        }
        if rebuilt.compactions > 0 {
            eprintln!("re-applied {} compactions", rebuilt.compactions);
        }
        // Swap: the old lake steps aside, the new one takes its name, the old one goes.
        let aside = config
            .data_dir
            .join(format!(".lake.old-{}", std::process::id()));
        if lake_dir.exists() {
            std::fs::rename(&lake_dir, &aside)?;
        }
        std::fs::rename(&fresh_dir, &lake_dir)?;
        std::fs::File::open(&config.data_dir)?.sync_all()?;
        if aside.exists() {
            std::fs::remove_dir_all(&aside)?;
        }
        eprintln!(
            "rebuilt {} from {} records in {} shards",
            lake_dir.display(),
            rebuilt.records,
            rebuilt.stream_shards
        );
        Ok(())
    })
}

/// `floodgate lake ddl`: one statement per table, in table-name order.
fn lake_ddl(location: &str, schemas: Option<&Path>) -> Result<()> {
    let registry = load_registry(schemas)?;
    let mut tables = floodgate_core::lake::tables(&registry)?;
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut derived = floodgate_core::lake::derived_tables(
        &floodgate_processors::bookings::DERIVED_TYPES,
        &floodgate_processors::bookings::derived_data_schema(),
        &tables,
    )?;
    derived.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "-- Athena DDL for the Floodgate lake at {location}; generated by `floodgate lake ddl`."
    )?;
    for t in tables {
        writeln!(out, "\n-- {} events", t.event_type)?;
        write!(
            out,
            "{}",
            floodgate_core::lake::athena_ddl(&t.name, &t.schema, location)
        )?;
    }
    for t in derived {
        writeln!(
            out,
            "\n-- {} events, derived by the processors",
            t.event_type
        )?;
        write!(
            out,
            "{}",
            floodgate_core::lake::athena_ddl(&t.name, &t.schema, location)
        )?;
    }
    writeln!(
        out,
        "\n-- every event the edge rejected: its raw bytes, the reasons, when it arrived"
    )?;
    write!(
        out,
        "{}",
        floodgate_core::lake::athena_ddl(
            floodgate_core::lake::QUARANTINE_TABLE,
            &floodgate_core::lake::quarantine_schema(),
            location
        )
    )?;
    Ok(())
}

/// `floodgate keys new`: a 256-bit random secret, shown once, and the stanza holding its
/// hash.
fn keys_new(name: &str, types: &[String], rate: Option<u32>, burst: Option<u32>) -> Result<()> {
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

/// The processors' side: bookings state, outbox and their consumer tasks.
struct Processors {
    /// The consumers' lag, for the edge's backpressure.
    lag: Arc<ConsumerLag>,
    /// Stopped in order, each after the one before has drained: the stream's consumers
    /// (which may add to the outbox), the relay (which publishes it), and the consumers of
    /// what it published (the derived events' lake tables).
    stages: Vec<(watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)>,
}

impl Processors {
    /// Starts the bookings consumers and the outbox relay over `reader`. Each shard, and
    /// the relay, is taken under a lease, so a second process (`floodgate process`) waits
    /// and takes over the moment this one dies.
    async fn start(
        config_all: &Config,
        registry: &Registry,
        reader: Arc<dyn StreamReader>,
        quarantine: Option<Arc<dyn StreamReader>>,
        state: Arc<dyn StateStore>,
    ) -> Result<Processors> {
        let data_dir = config_all.data_dir.as_path();
        let checkpoints: Arc<dyn CheckpointStore> =
            Arc::new(EmbeddedCheckpoints::open(&data_dir.join("stream"))?);
        let outbox_dir = data_dir.join("outbox");
        // The log exists (created, or migrated from an older outbox) before anyone reads it;
        // the relay opens it for writing only once it holds the relay lease.
        floodgate_sinks::outbox::ensure_log(&outbox_dir, &config_all.publish.outbox).await?;
        let outbox = Arc::new(EmbeddedOutbox::open_with(
            &outbox_dir,
            &config_all.publish.outbox,
        )?);
        let outbox_log = floodgate_sinks::outbox::log_root(&outbox_dir);
        let (stop, stop_rx) = watch::channel(false);
        let (stop_late, stop_late_rx) = watch::channel(false);
        let mut late_tasks = Vec::new();
        let processor = Arc::new(BookingsProcessor::new(state.clone()));
        let lag = Arc::new(ConsumerLag::default());
        let config = RuntimeConfig {
            lag: Some(lag.clone()),
            ..RuntimeConfig::default()
        };
        let owner = config.owner.clone();
        let mut tasks = spawn_consumers(
            reader.clone(),
            checkpoints.clone(),
            processor,
            config.clone(),
            stop_rx.clone(),
        )
        .await?;
        if config_all.lake.enabled {
            let tables = floodgate_core::lake::tables(registry)?;
            let store = Arc::new(LocalDirStore::open(&data_dir.join("lake"))?);
            // Each buffer rolls at its share of the memory budget (never past roll_bytes).
            let share =
                floodgate_core::budget::MemoryBudget::from_config(config_all).lake_buffer_share;
            let lake_config = LakeConfig {
                roll_bytes: share,
                roll_age: std::time::Duration::from_millis(config_all.lake.roll_age_ms),
            };
            let derived = Arc::new(floodgate_processors::rebuild::derived_processor(
                store.clone(),
                &tables,
                lake_config.clone(),
            )?);
            let lake = Arc::new(LakeProcessor::new(
                store.clone(),
                tables,
                lake_config.clone(),
            ));
            tasks.extend(
                spawn_consumers(
                    reader,
                    checkpoints.clone(),
                    lake,
                    config.clone(),
                    stop_rx.clone(),
                )
                .await?,
            );
            let outbox_reader: Arc<dyn StreamReader> =
                Arc::new(EmbeddedLogReader::open(&outbox_log)?);
            let d_checkpoints: Arc<dyn CheckpointStore> =
                Arc::new(EmbeddedCheckpoints::open(&outbox_log)?);
            late_tasks.extend(
                spawn_consumers(
                    outbox_reader,
                    d_checkpoints,
                    derived,
                    config.clone(),
                    stop_late_rx.clone(),
                )
                .await?,
            );
            if let Some(q) = quarantine {
                let q_checkpoints: Arc<dyn CheckpointStore> =
                    Arc::new(EmbeddedCheckpoints::open(&data_dir.join("quarantine"))?);
                let held = Arc::new(LakeProcessor::quarantine(store, lake_config));
                tasks.extend(
                    spawn_consumers(q, q_checkpoints, held, config, stop_rx.clone()).await?,
                );
            }
        }
        let (stop_relay, stop_relay_rx) = watch::channel(false);
        let relay = tokio::spawn(floodgate_processors::relay::run(
            state,
            outbox,
            checkpoints,
            owner,
            stop_relay_rx,
        ));
        Ok(Processors {
            lag,
            stages: vec![
                (stop, tasks),
                (stop_relay, vec![relay]),
                (stop_late, late_tasks),
            ],
        })
    }

    /// Lets every consumer finish its batch and the relay drain, then returns.
    async fn stop(self) {
        for (stop, tasks) in self.stages {
            let _ = stop.send(true);
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

/// The quarantine: a one-shard log of every event the edge rejected, beside the stream.
fn open_quarantine(config: &Config) -> Result<EmbeddedLog> {
    let root = config.data_dir.join("quarantine");
    let mut c = config.stream.embedded.clone();
    c.shards = 1;
    EmbeddedLog::open(&root, &c)
        .with_context(|| format!("cannot open the quarantine at {}", root.display()))
}

/// The state store, its page cache and memory map sized by `[state]` (the memory budget's).
fn open_state(
    data_dir: &Path,
    memory: &floodgate_core::config::StateConfig,
) -> Result<Arc<dyn StateStore>> {
    let path = data_dir.join("state").join("state.db");
    Ok(Arc::new(
        SqliteStateStore::open_with(&path, memory)
            .with_context(|| format!("cannot open the state store at {}", path.display()))?,
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fg-worker")
        .build()?)
}

fn serve(args: ServeArgs, with_processors: bool) -> Result<()> {
    let config = effective_config(&args)?;
    eprintln!(
        "floodgate {}: effective configuration\n{}",
        env!("CARGO_PKG_VERSION"),
        toml::to_string(&config).unwrap_or_default()
    );
    let role = if with_processors {
        floodgate_core::budget::Role::Serve
    } else {
        floodgate_core::budget::Role::Ingest
    };
    eprint!(
        "{}",
        floodgate_core::budget::MemoryBudget::for_role(&config, role)
    );
    let auth_required = check_auth_posture(&config, args.insecure_no_auth)?;
    let registry = Arc::new(load_registry(config.schemas_dir.as_deref())?);
    runtime()?.block_on(async move {
        let metrics = floodgate_ingest::telemetry::install();
        floodgate_ingest::telemetry::spawn_upkeep(metrics.clone());
        let stream_root = config.data_dir.join("stream");
        let log = Arc::new(
            EmbeddedLog::open(&stream_root, &config.stream.embedded)
                .with_context(|| format!("cannot open the stream at {}", stream_root.display()))?,
        );
        let quarantine = Arc::new(open_quarantine(&config)?);
        let state = open_state(&config.data_dir, &config.state)?;
        let processors = if with_processors {
            Some(
                Processors::start(
                    &config,
                    &registry,
                    log.clone(),
                    Some(quarantine.clone()),
                    state.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let writer: Arc<dyn StreamWriter> = log.clone();
        let auth = Arc::new(
            Auth::from_config(&config.ingest.auth, auth_required)
                .await
                .context("cannot set up [ingest.auth]")?,
        );
        auth.spawn_refresh();
        let mut app = App::new(registry, writer, Some(state), Limits::from_config(&config.ingest), metrics)
            .with_auth(auth)
            .with_quarantine(quarantine.clone());
        if let Some(p) = &processors {
            app = app.with_consumer_lag(p.lag.clone());
        }
        if let Some(deduper) = app.deduper() {
            rebuild_dedupe(&*log, deduper).await?;
        }
        let listener = tokio::net::TcpListener::bind(config.ingest.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.ingest.listen))?;
        let addr = listener.local_addr()?;
        let shutdown = shutdown_signal();
        println!("floodgate listening on http://{addr}");
        io::stdout().flush()?;
        tracing::info!(%addr, data_dir = %config.data_dir.display(), processors = with_processors, "serving");
        floodgate_ingest::server::serve(
            listener,
            app,
            shutdown,
            floodgate_ingest::server::ServerConfig::from_config(&config.ingest),
        )
        .await;
        if let Some(p) = processors {
            p.stop().await;
            tracing::info!("processors stopped");
        }
        log.close().await.context("cannot make the log durable at shutdown")?;
        quarantine
            .close()
            .await
            .context("cannot make the quarantine durable at shutdown")?;
        tracing::info!("log closed; every acknowledged event is on disk");
        Ok(())
    })
}

/// Refills the dedupe memory with the events the log accepted within the window, so that
/// a producer's retry after a restart is still recognised.
async fn rebuild_dedupe(
    reader: &dyn StreamReader,
    deduper: &floodgate_ingest::dedupe::Deduper,
) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow)]
        source: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let started = std::time::Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut seen = Vec::new();
    for shard in reader.shards().await? {
        let mut pos = StartPosition::AtTimestamp(now - deduper.window_ms());
        loop {
            let batch = reader.read(&shard.id, &pos, 10_000).await?;
            if batch.records.is_empty() {
                break;
            }
            for r in &batch.records {
                if let Ok(ids) = serde_json::from_slice::<Ids<'_>>(&r.payload) {
                    seen.push((
                        r.appended_at_ms,
                        floodgate_ingest::dedupe::key(&ids.source, &ids.id),
                    ));
                }
            }
            match batch.next {
                Some(next) => pos = next,
                None => break,
            }
        }
    }
    // Oldest first, so the memory's expiry order holds across shards.
    seen.sort_unstable_by_key(|(at, _)| *at);
    let n = seen.len();
    for (at, key) in seen {
        deduper.remember(key, at);
    }
    tracing::info!(
        events = n,
        ms = started.elapsed().as_millis() as u64,
        "dedupe window rebuilt from the log"
    );
    Ok(())
}

fn process(args: ProcessArgs) -> Result<()> {
    let config_args = ServeArgs {
        listen: None,
        data_dir: args.data_dir,
        config: args.config,
        schemas: None,
        shards: None,
        insecure_no_auth: false,
    };
    let config = effective_config(&config_args)?;
    eprintln!(
        "floodgate {}: effective configuration\n{}",
        env!("CARGO_PKG_VERSION"),
        toml::to_string(&config).unwrap_or_default()
    );
    eprint!(
        "{}",
        floodgate_core::budget::MemoryBudget::for_role(
            &config,
            floodgate_core::budget::Role::Process
        )
    );
    runtime()?.block_on(async move {
        let metrics = floodgate_ingest::telemetry::install();
        floodgate_ingest::telemetry::spawn_upkeep(metrics);
        let reader = Arc::new(EmbeddedLogReader::open(&config.data_dir.join("stream"))?);
        let quarantine: Option<Arc<dyn StreamReader>> =
            match EmbeddedLogReader::open(&config.data_dir.join("quarantine")) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "no quarantine log to read (yet); the quarantine table is not written");
                    None
                }
            };
        let state = open_state(&config.data_dir, &config.state)?;
        let registry = load_registry(config.schemas_dir.as_deref())?;
        let processors = Processors::start(&config, &registry, reader, quarantine, state).await?;
        let shutdown = shutdown_signal();
        println!("floodgate processing {}", config.data_dir.display());
        io::stdout().flush()?;
        shutdown.await;
        processors.stop().await;
        Ok(())
    })
}

fn dead_letters_read(data_dir: &Path) -> Result<()> {
    let state = open_state(data_dir, &floodgate_core::config::StateConfig::default())?;
    let letters = runtime()?.block_on(state.dead_letters(usize::MAX))?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = (|| -> io::Result<()> {
        for d in letters {
            // The payload is the producer's JSON as stored; print it as is when it parses.
            let event = serde_json::from_str::<Box<RawValue>>(&d.payload)
                .map(|v| v.get().to_owned())
                .unwrap_or_else(|_| json!(d.payload).to_string());
            writeln!(
                out,
                r#"{{"shard":{},"sequence":"{}","reason":{},"detail":{},"event":{event}}}"#,
                json!(d.shard.0),
                d.sequence,
                json!(d.reason),
                json!(d.detail)
            )?;
        }
        out.flush()
    })();
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn outbox_read(data_dir: &Path) -> Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = floodgate_sinks::outbox::for_each_event(&data_dir.join("outbox"), |e| {
        out.write_all(b"{\"event\":")?;
        out.write_all(e)?;
        out.write_all(b"}\n")
    })
    .and_then(|()| out.flush());
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (not
/// when first polled), so a signal that arrives right after start-up is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
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

/// `floodgate stream verify`: checks (or repairs) the stream and the quarantine log.
fn stream_verify(data_dir: &Path, repair: bool) -> Result<ExitCode> {
    let mut clean = true;
    for (name, required) in [("stream", true), ("quarantine", false)] {
        let root = data_dir.join(name);
        if !required && !root.join("meta.json").exists() {
            println!("{}: no log to check", root.display());
            continue;
        }
        let report = if repair {
            let (actions, report) = floodgate_sinks::log_verify::repair(&root)
                .with_context(|| format!("cannot repair the log at {}", root.display()))?;
            for action in &actions {
                println!("{action}");
            }
            report
        } else {
            floodgate_sinks::log_verify::check(&root)
                .with_context(|| format!("cannot check the log at {}", root.display()))?
        };
        for problem in &report.problems {
            println!("{problem}");
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        println!("{}", report.summary());
        clean &= report.is_clean();
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn stream_read(
    data_dir: &Path,
    shard: Option<u32>,
    from: Option<u64>,
    limit: Option<u64>,
) -> Result<()> {
    let reader = EmbeddedLogReader::open(&data_dir.join("stream"))?;
    let shards: Vec<u32> = match shard {
        Some(s) if s >= reader.meta().shards => bail!(
            "shard {s} does not exist; the log has {}",
            reader.meta().shards
        ),
        Some(s) => vec![s],
        None => (0..reader.meta().shards).collect(),
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut remaining = limit.unwrap_or(u64::MAX);
    let result = (|| -> Result<()> {
        for shard in shards {
            let mut pos = from.map_or(StartPosition::TrimHorizon, |f| {
                StartPosition::At(SequenceNumber::from_u64(f))
            });
            while remaining > 0 {
                let batch = reader.read_blocking(shard, &pos, remaining.min(1000) as usize)?;
                if batch.records.is_empty() {
                    break;
                }
                for r in &batch.records {
                    // The payload is the producer's JSON as stored; print it as is.
                    let event: Box<RawValue> =
                        serde_json::from_slice(&r.payload).unwrap_or_else(|_| {
                            RawValue::from_string(
                                json!(String::from_utf8_lossy(&r.payload)).to_string(),
                            )
                            .expect("a JSON string is JSON")
                        });
                    writeln!(
                        out,
                        r#"{{"shard":{shard},"sequence":"{}","event":{},"key":{}}}"#,
                        r.sequence,
                        event.get(),
                        serde_json::to_string(&r.key)?
                    )?;
                }
                remaining -= batch.records.len() as u64;
                pos = batch.next.unwrap_or(pos);
            }
        }
        out.flush()?;
        Ok(())
    })();
    match result {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn schemas_list(dir: Option<&Path>) -> Result<()> {
    let registry = load_registry(dir)?;
    println!(
        "{:<32} {:>7}  {:<8} {:<14} $id",
        "TYPE", "VERSION", "LATEST", "PARTITION KEY"
    );
    for s in registry.summaries() {
        println!(
            "{:<32} {:>7}  {:<8} {:<14} {}",
            s.event_type,
            format!("v{}", s.version),
            if s.latest { "yes" } else { "" },
            s.partition_key.as_deref().unwrap_or("-"),
            s.id.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

fn schemas_check(file: &Path, dir: Option<&Path>) -> Result<ExitCode> {
    let registry = load_registry(dir)?;
    let bytes = if file == Path::new("-") {
        let mut buf = Vec::new();
        io::Read::read_to_end(&mut io::stdin(), &mut buf)?;
        buf
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let ndjson = matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("ndjson" | "jsonl")
    );
    let format = if ndjson {
        BodyFormat::Ndjson
    } else {
        BodyFormat::Auto
    };
    let outcomes = check_body(&registry, &Bytes::from(bytes), format, usize::MAX)
        .with_context(|| format!("cannot decode {}", file.display()))?;
    let mut invalid = 0;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (index, o) in outcomes.iter().enumerate() {
        let line = match o {
            Outcome::Valid {
                id,
                event_type,
                key,
                ..
            } => {
                json!({"index": index, "id": id, "status": "valid", "type": event_type, "partitionKey": key})
            }
            Outcome::Rejected { id, errors, .. } => {
                invalid += 1;
                json!({"index": index, "id": id, "status": "invalid", "errors": errors})
            }
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!("{} valid, {} invalid", outcomes.len() - invalid, invalid);
    Ok(if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
