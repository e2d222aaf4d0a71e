//! `floodgate serve`, `ingest` and `process`: the edge and the processors, over the
//! backends the configuration names (`crate::backends`).

use std::io::{self, Write};
use std::sync::Arc;

use anyhow::{Context, Result};
use floodgate_core::config::Config;
use floodgate_core::registry::Registry;
use floodgate_core::state::StateStore;
use floodgate_core::stream::{ConsumerLag, StreamReader};
use floodgate_ingest::App;
use floodgate_ingest::app::Limits;
use floodgate_ingest::auth::Auth;
use floodgate_processors::archive::{ArchiveConfig, ArchiveProcessor};
use floodgate_processors::bookings::BookingsProcessor;
use floodgate_processors::lake::{LakeConfig, LakeProcessor};
use floodgate_processors::runtime::{RuntimeConfig, spawn_consumers};
use floodgate_sinks::EmbeddedLogReader;
use tokio::sync::watch;

use crate::backends::{
    Archive, Coordination, Publish, Quarantine, Stream, lake_store, local_checkpoints, open_state,
    runtime_config,
};
use crate::setup::{
    check_auth_posture, consumer_runtime, effective_config, load_registry, runtime, shutdown_signal,
};
use crate::{ProcessArgs, ServeArgs};

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
    /// Starts the bookings consumers, the lake's and the archive's (when configured), and
    /// the outbox relay over `reader`. Each shard, and the relay, is taken under a lease, so a second process (`floodgate process`) waits
    /// and takes over the moment this one dies.
    async fn start(
        config_all: &Config,
        registry: &Registry,
        reader: Arc<dyn StreamReader>,
        quarantine: &Quarantine,
        state: Arc<dyn StateStore>,
    ) -> Result<Processors> {
        let checkpoints = Coordination::open(config_all).await?.store();
        let publish = Publish::open(config_all).await?;
        let archive = Archive::open(config_all).await?;
        let (stop, stop_rx) = watch::channel(false);
        let (stop_late, stop_late_rx) = watch::channel(false);
        let mut late_tasks = Vec::new();
        let processor = Arc::new(BookingsProcessor::new(state.clone()));
        let lag = Arc::new(ConsumerLag::default());
        let config = RuntimeConfig {
            lag: Some(lag.clone()),
            ..runtime_config(config_all)
        };
        let owner = config.owner.clone();
        let renew_interval = config.renew_interval;
        let mut tasks = spawn_consumers(
            reader.clone(),
            checkpoints.clone(),
            processor,
            config.clone(),
            stop_rx.clone(),
        )
        .await?;
        // The raw archive: a consumer of its own over the stream (never the edge's request
        // path), checkpointed only once the archive holds a batch's every event.
        if let Some(archive) = archive.archive() {
            let processor = Arc::new(ArchiveProcessor::new(
                archive,
                ArchiveConfig::default(),
                stop_rx.clone(),
            ));
            tasks.extend(
                spawn_consumers(
                    reader.clone(),
                    checkpoints.clone(),
                    processor,
                    config.clone(),
                    stop_rx.clone(),
                )
                .await?,
            );
        }
        if config_all.lake.enabled {
            let tables = floodgate_core::lake::tables(registry)?;
            let store = lake_store(config_all).await?;
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
            // The derived events' lake tables read the derived-event log; published to
            // EventBridge, they have no log to read here (the README says where they go).
            if let Some(outbox_log) = publish.derived_log() {
                let outbox_reader: Arc<dyn StreamReader> =
                    Arc::new(EmbeddedLogReader::open(outbox_log)?);
                let d_checkpoints = local_checkpoints(outbox_log)?;
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
            }
            if let Some(q) = quarantine.reader() {
                let q_checkpoints = quarantine.checkpoints(config_all, &checkpoints)?;
                let held = Arc::new(LakeProcessor::quarantine(store, lake_config));
                tasks.extend(
                    spawn_consumers(q, q_checkpoints, held, config, stop_rx.clone()).await?,
                );
            }
        }
        let (stop_relay, stop_relay_rx) = watch::channel(false);
        let relay = tokio::spawn(floodgate_processors::relay::run_with(
            state,
            publish.publisher(),
            checkpoints,
            owner,
            renew_interval,
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

pub(crate) fn serve(args: ServeArgs, with_processors: bool) -> Result<()> {
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
    // The processors' own runtime (threads at `consumer_nice`); the edge keeps this one's.
    let consumers_rt = if with_processors {
        Some(consumer_runtime(config.ingest.consumer_nice)?)
    } else {
        None
    };
    let consumers = &consumers_rt;
    let result = runtime()?.block_on(async move {
        let metrics = floodgate_ingest::telemetry::install();
        floodgate_ingest::telemetry::spawn_upkeep(metrics.clone());
        floodgate_ingest::telemetry::spawn_disk_gauges(config.data_dir.clone());
        // Bound before anything starts, so that a taken port stops the start-up cleanly.
        let ops_listener = match config.ingest.ops_listen {
            Some(ops_addr) => Some(
                tokio::net::TcpListener::bind(ops_addr)
                    .await
                    .with_context(|| format!("cannot listen on {ops_addr} (ops_listen)"))?,
            ),
            None => None,
        };
        let stream = Stream::for_edge(&config).await?;
        let quarantine = Quarantine::for_edge(&config).await?;
        let state = open_state(&config).await?;
        let processors = if with_processors {
            // Everything the processors spawn (consumers, relay, blocking encodes) lands on
            // their runtime. This future is polled on this thread only (block_on), so the
            // guard scopes exactly the start-up.
            let _in = consumers.as_ref().map(|rt| rt.enter());
            Some(
                Processors::start(
                    &config,
                    &registry,
                    stream.reader(),
                    &quarantine,
                    state.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let writer = stream
            .writer()
            .context("the edge's stream has no writer")?;
        let auth = Arc::new(
            Auth::from_config(&config.ingest.auth, auth_required)
                .await
                .context("cannot set up [ingest.auth]")?,
        );
        auth.spawn_refresh();
        let mut app = App::builder(registry, writer, metrics.clone())
            .limits(Limits::from_config(&config.ingest))
            .state(state)
            .auth(auth);
        if let Some(q) = quarantine.writer() {
            app = app.quarantine(q);
        }
        if let Some(p) = &processors {
            app = app.consumer_lag(p.lag.clone());
        }
        let app = app.build();
        if let Some(deduper) = app.deduper()
            && stream.refills_dedupe()
        {
            floodgate_ingest::dedupe::rebuild_from_stream(&*stream.reader(), deduper).await?;
        }
        let listener = tokio::net::TcpListener::bind(config.ingest.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.ingest.listen))?;
        let addr = listener.local_addr()?;
        // The operations listener answers from the edge's start to the end of its drain
        // (/readyz 503 once draining), and stops after the processors.
        let serving = Arc::new(floodgate_ingest::ops::Readiness::default());
        let ops = match ops_listener {
            Some(ops_listener) => {
                let ops_addr = ops_listener.local_addr()?;
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(floodgate_ingest::ops::serve(
                    ops_listener,
                    metrics.clone(),
                    floodgate_ingest::ops::Probe::Edge {
                        app: app.clone(),
                        serving: serving.clone(),
                    },
                    async move {
                        let _ = stopped.await;
                    },
                ));
                Some((ops_addr, stop, task))
            }
            None => None,
        };
        let shutdown = {
            // Made now: the signals are caught from here on.
            let signal = shutdown_signal();
            let serving = serving.clone();
            async move {
                signal.await;
                serving.set(false);
            }
        };
        serving.set(true);
        println!("floodgate listening on http://{addr}");
        if let Some((ops_addr, _, _)) = &ops {
            println!("floodgate operations on http://{ops_addr} (/metrics, /healthz, /readyz)");
        }
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
        if let Some((_, stop, task)) = ops {
            let _ = stop.send(());
            let _ = task.await;
        }
        stream.close().await?;
        quarantine.close().await?;
        tracing::info!("log closed; every acknowledged event is on disk");
        Ok(())
    });
    if let Some(rt) = consumers_rt {
        rt.shutdown_background();
    }
    result
}

pub(crate) fn process(args: ProcessArgs) -> Result<()> {
    let config_args = ServeArgs {
        data_dir: args.data_dir,
        config: args.config,
        ..ServeArgs::default()
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
    let listen = args.listen;
    runtime()?.block_on(async move {
        let metrics = floodgate_ingest::telemetry::install();
        floodgate_ingest::telemetry::spawn_upkeep(metrics.clone());
        floodgate_ingest::telemetry::spawn_disk_gauges(config.data_dir.clone());
        // Bound first: a worker that cannot be scraped or probed refuses to start, and
        // /healthz answers while the processors start (/readyz once they run).
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (--listen)"))?;
        let listening = listener.local_addr()?;
        let ready = Arc::new(floodgate_ingest::ops::Readiness::default());
        let (stop_ops, ops_stopped) = tokio::sync::oneshot::channel::<()>();
        let ops = tokio::spawn(floodgate_ingest::ops::serve(
            listener,
            metrics,
            floodgate_ingest::ops::Probe::Processors(ready.clone()),
            async move {
                let _ = ops_stopped.await;
            },
        ));
        let stream = Stream::for_workers(&config).await?;
        let quarantine = Quarantine::for_workers(&config).await?;
        let state = open_state(&config).await?;
        let registry = load_registry(config.schemas_dir.as_deref())?;
        let processors =
            Processors::start(&config, &registry, stream.reader(), &quarantine, state).await?;
        ready.set(true);
        let shutdown = shutdown_signal();
        println!(
            "floodgate processing {} (metrics on http://{listening}/metrics)",
            config.data_dir.display()
        );
        io::stdout().flush()?;
        shutdown.await;
        ready.set(false);
        processors.stop().await;
        let _ = stop_ops.send(());
        let _ = ops.await;
        Ok(())
    })
}
