//! `floodgate`: the command-line entry point. It parses the command line and dispatches
//! to a command module (`cmd/`); the commands get their backends from `backends`, the one
//! place that reads which backend fills each role, and hand them to the edge
//! (`floodgate-ingest`) and the processors through the role traits of `floodgate-core`.

mod backends;
mod cmd;
mod progress;
mod setup;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

// The edge allocates many small, short-lived values per event (parsed JSON) across the
// async workers and the blocking pool; glibc's allocator spent over a quarter of the
// edge's CPU on them under load (malloc_consolidate, arena contention). mimalloc's
// thread-local free lists make that cost small.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes mimalloc give freed memory back to the OS soon, so that the process's resident
/// memory follows what its buffers hold (the memory budget it prints) rather than the most
/// they held in the last second. By default, on Linux, mimalloc 3 commits its 1 GiB arenas
/// up front and returns freed pages 1 s later. Under a burst from 8,192 client connections
/// (2,000 served at once), `serve` then peaked at 0.95–1.0 GiB of RSS, where glibc's
/// malloc peaked at 0.55 GiB with the same build and load; with these defaults (arenas
/// committed on demand, freed pages returned after 1 ms), at 0.51–0.63 GiB, for 3–8 % of
/// closed-loop throughput.
///
/// These are defaults: `MIMALLOC_ARENA_EAGER_COMMIT=2 MIMALLOC_PURGE_DELAY=1000` in the
/// environment restores mimalloc's own, trading resident memory for that throughput.
///
/// It runs as an ELF constructor, before `main` and so before the first allocation, which
/// reserves the first arena: set in `main`, the options left the peak at 0.8 GiB.
// The one unsafe block of the workspace: a call into the allocator this binary links.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
extern "C" fn tune_allocator() {
    // The numbers of `mi_option_e` in `mimalloc.h` (the same in mimalloc 2.x and 3.x);
    // the crate's bindings do not name these two.
    const ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
    const PURGE_DELAY: std::ffi::c_int = 15;
    unsafe extern "C" {
        fn mi_option_set_default(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    // SAFETY: an option is a plain integer in a static table that mimalloc reads when it
    // commits and purges memory; setting its default needs no heap, and the environment
    // still overrides it when mimalloc first reads the option.
    unsafe {
        mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        mi_option_set_default(PURGE_DELAY, 1);
    }
}

#[cfg(target_os = "linux")]
#[used]
#[allow(unsafe_code)]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[derive(Parser, Debug)]
#[command(
    name = "floodgate",
    version,
    about = "Streaming event ingestion: HTTP edge, durable sharded stream, processors"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// The AWS deployment's resources.
    #[command(subcommand)]
    Aws(AwsCommand),
    /// GET a health route once; exit 0 on a 2xx answer, 1 otherwise (container health
    /// checks in images without an HTTP client).
    Healthcheck {
        /// The route to check (http only)
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Copy the embedded deployment's data directory (log, state, checkpoints, derived
    /// events, lake) into an empty directory, consistently, while `floodgate serve` runs.
    Backup {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// The backup's directory: empty or absent
        #[arg(long)]
        to: PathBuf,
        /// Hard-link the lake's files instead of copying them (same file system only)
        #[arg(long)]
        link_lake: bool,
    },
    /// Bring a backup back into an empty (or absent) data directory, checking every file
    /// against the backup's manifest.
    Restore {
        /// The backup's directory (holding manifest.json)
        #[arg(long)]
        from: PathBuf,
        #[arg(long, env = "FLOODGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AwsCommand {
    /// Create what the configuration names and is missing (the Kinesis streams, the lease
    /// and state tables, the lake bucket, the event bus), wait until each is ACTIVE, and
    /// print one line per resource: `created` or `exists`. Idempotent. With --check,
    /// change nothing: print `ok` or what differs per resource, and exit 1 on any drift.
    Init {
        /// TOML configuration file
        #[arg(long, env = "FLOODGATE_CONFIG")]
        config: PathBuf,
        /// Only check that every resource exists, is ACTIVE and has the key schema the code
        /// expects; create nothing
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum LakeCommand {
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
    /// runs for records the lake did not hold yet. Run it with the server (the workers)
    /// stopped. A local lake is swapped in place; a lake on S3 is written under a new
    /// prefix, and the old one is left as it was.
    Rebuild {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// TOML configuration file
        #[arg(long, env = "FLOODGATE_CONFIG")]
        config: Option<PathBuf>,
        /// S3 only: the (empty) prefix of the rebuilt lake [default: <prefix>-rebuilt-<unix seconds>/]
        #[arg(long)]
        to_prefix: Option<String>,
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
pub(crate) enum KeysCommand {
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

#[derive(Args, Debug, Default)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "FLOODGATE_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// Directory of the embedded backends' files [default: ./data]
    #[arg(long, env = "FLOODGATE_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "FLOODGATE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Directory of `<type>/v<N>.json` schemas replacing the built-in ones
    #[arg(long, env = "FLOODGATE_SCHEMAS")]
    pub(crate) schemas: Option<PathBuf>,
    /// Number of stream shards (fixed once the log exists) [default: 4]
    #[arg(long, env = "FLOODGATE_SHARDS")]
    pub(crate) shards: Option<u32>,
    /// Serve on a non-loopback address without requiring credentials
    #[arg(long)]
    pub(crate) insecure_no_auth: bool,
    /// A second listener for /metrics, /healthz and /readyz only, with connections of its
    /// own, so that scrapes and probes answer while --listen is at its connection limit
    /// [default: none]
    #[arg(long, env = "FLOODGATE_OPS_LISTEN")]
    pub(crate) ops_listen: Option<SocketAddr>,
}

#[derive(Args, Debug)]
pub(crate) struct ProcessArgs {
    /// Address of the operations endpoint: /metrics, /healthz, /readyz
    #[arg(
        long,
        env = "FLOODGATE_PROCESS_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub(crate) listen: SocketAddr,
    /// Directory of the embedded backends' files [default: ./data]
    #[arg(long, env = "FLOODGATE_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// TOML configuration file
    #[arg(long, env = "FLOODGATE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum OutboxCommand {
    /// Print derived events as NDJSON, one {"event":{…}} per line. Safe beside a running
    /// server.
    Read {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum DeadLettersCommand {
    /// Print dead letters as NDJSON, one
    /// {"shard","sequence","reason","detail","event"} per line. Safe beside a running server.
    Read {
        #[arg(long, env = "FLOODGATE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum StreamCommand {
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
pub(crate) enum SchemasCommand {
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
        Command::Serve(args) => cmd::serve::serve(args, true).map(|()| ExitCode::SUCCESS),
        Command::Ingest(args) => cmd::serve::serve(args, false).map(|()| ExitCode::SUCCESS),
        Command::Process(args) => cmd::serve::process(args).map(|()| ExitCode::SUCCESS),
        Command::Outbox(OutboxCommand::Read { data_dir }) => {
            cmd::inspect::outbox(&data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::DeadLetters(DeadLettersCommand::Read { data_dir }) => {
            cmd::inspect::dead_letters(&data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Stream(StreamCommand::Read {
            data_dir,
            shard,
            from,
            limit,
        }) => cmd::inspect::stream(&data_dir, shard, from, limit).map(|()| ExitCode::SUCCESS),
        Command::Stream(StreamCommand::Verify { data_dir, repair }) => {
            cmd::inspect::verify(&data_dir, repair)
        }
        Command::Schemas(SchemasCommand::List { schemas }) => {
            cmd::schemas::list(schemas.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        Command::Schemas(SchemasCommand::Check { file, schemas }) => {
            cmd::schemas::check(&file, schemas.as_deref())
        }
        Command::Keys(KeysCommand::New {
            name,
            types,
            rate_per_sec,
            burst,
        }) => cmd::keys::new(&name, &types, rate_per_sec, burst).map(|()| ExitCode::SUCCESS),
        Command::Lake(LakeCommand::Compact {
            data_dir,
            config,
            table,
            dt,
            small_bytes,
            schemas,
        }) => cmd::lake::compact(
            ServeArgs {
                data_dir,
                config,
                schemas,
                ..ServeArgs::default()
            },
            &table,
            dt.as_deref(),
            small_bytes,
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Lake(LakeCommand::Rebuild {
            data_dir,
            config,
            to_prefix,
        }) => cmd::lake::rebuild(data_dir, config, to_prefix).map(|()| ExitCode::SUCCESS),
        Command::Aws(AwsCommand::Init { config, check }) => {
            let args = ServeArgs {
                config: Some(config),
                ..ServeArgs::default()
            };
            if check {
                cmd::aws::check(args)
            } else {
                cmd::aws::init(args).map(|()| ExitCode::SUCCESS)
            }
        }
        Command::Healthcheck { url } => Ok(cmd::healthcheck::check(&url)),
        Command::Backup {
            data_dir,
            to,
            link_lake,
        } => cmd::backup::backup(&data_dir, &to, link_lake).map(|()| ExitCode::SUCCESS),
        Command::Restore { from, data_dir } => {
            cmd::backup::restore(&from, &data_dir).map(|()| ExitCode::SUCCESS)
        }
        Command::Lake(LakeCommand::Ddl { location, schemas }) => {
            cmd::lake::ddl(&location, schemas.as_deref()).map(|()| ExitCode::SUCCESS)
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
