//! `factline outbox …` (what is published and how far the relay is) and
//! `factline relay` (the relay on its own).

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use factline::{EventStore, Location};
use factline_outbox::{
    FileSink, NatsSink, NatsSinkConfig, OutboxDb, PostgresOutbox, Publication, Relay, RelayConfig,
    Sink, SqliteOutbox, StdoutSink, WebhookSink, DEFAULT_KEY, DEFAULT_SUBJECT,
};

use crate::usage;

/// The PostgreSQL schema of the store (and so of its outbox).
const STORE_SCHEMA: &str = "factline";

#[derive(Args, Debug)]
pub struct OutboxArgs {
    #[command(subcommand)]
    command: OutboxCommand,
}

#[derive(Subcommand, Debug)]
pub enum OutboxCommand {
    /// Backlog, age of the oldest unpublished record, publications and
    /// relays, as JSON.
    Status,
    /// The publications, as JSON lines.
    Publications,
    /// Publish the events of a category and/or type from now on. Every
    /// process appending to the store writes their outbox records.
    Publish(PublishArgs),
    /// Stop publishing by a publication's id (records already written
    /// still go out).
    Unpublish {
        /// The publication's id (`factline outbox publications` lists them).
        id: i64,
    },
    /// Records a sink refused for good (a webhook's 4xx), newest first, as
    /// JSON lines: position, stream, type, the sink's answer, when.
    Parked {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Stream category (`Order` for `Order-…` streams); every category
    /// when left out.
    #[arg(long)]
    category: Option<String>,
    /// Event type; every type when left out.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Every event (neither --category nor --type).
    #[arg(long, conflicts_with_all = ["category", "event_type"])]
    all: bool,
    /// Subject template: {category}, {event_type}, {stream_id}.
    #[arg(long, default_value = DEFAULT_SUBJECT)]
    subject: String,
    /// Key template (a partitioning hint for brokers that use one).
    #[arg(long, default_value = DEFAULT_KEY)]
    key: String,
}

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Where to publish: nats://host:port (JetStream), http(s)://… (a
    /// webhook), file:///path (JSON lines) or stdout.
    #[arg(long)]
    sink: String,
    #[command(flatten)]
    options: RelayOptions,
}

/// How a relay runs, in `factline relay` and inside `factline serve`.
#[derive(Args, Debug, Clone)]
pub struct RelayOptions {
    /// This relay's name in the lanes table (default: unique per process).
    #[arg(long)]
    relay_id: Option<String>,
    /// Records per round.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// JetStream stream created over --nats-subjects when missing; `none`
    /// to require an existing one.
    #[arg(long, default_value = "factline")]
    nats_stream: String,
    /// Subjects of that stream, comma-separated.
    #[arg(long, default_value = "factline.>")]
    nats_subjects: String,
    /// Seconds a webhook call may take.
    #[arg(long, default_value_t = 10.0)]
    webhook_timeout: f64,
    /// Hours published records are kept before retention deletes them.
    #[arg(long, default_value_t = 24.0)]
    retention_hours: f64,
}

/// The store (for its head, which wakes the relay) and its outbox.
pub async fn open(location: &Location) -> anyhow::Result<(Arc<dyn EventStore>, Arc<dyn OutboxDb>)> {
    let store = location.open().await?;
    Ok((store, open_db(location).await?))
}

/// The outbox tables of the store at `location` (which must exist).
pub async fn open_db(location: &Location) -> anyhow::Result<Arc<dyn OutboxDb>> {
    let db: Arc<dyn OutboxDb> =
        match location {
            Location::Sqlite(path) => Arc::new(SqliteOutbox::open(path)?),
            Location::Postgres(url) => Arc::new(PostgresOutbox::connect(url, STORE_SCHEMA).await?),
            _ => return Err(usage(
                "the outbox lives in the store's database: use a SQLite file or a postgres:// URL",
            )),
        };
    Ok(db)
}

pub async fn run(args: OutboxArgs, location: &Location) -> anyhow::Result<()> {
    let (_store, db) = open(location).await?;
    match args.command {
        OutboxCommand::Status => {
            println!("{}", serde_json::to_string(&db.status().await?)?);
        }
        OutboxCommand::Parked { limit } => {
            for parked in db.parked(limit).await? {
                println!("{}", serde_json::to_string(&parked)?);
            }
        }
        OutboxCommand::Publications => {
            for publication in db.publications().await? {
                println!("{}", serde_json::to_string(&publication)?);
            }
        }
        OutboxCommand::Publish(p) => {
            if p.category.is_none() && p.event_type.is_none() && !p.all {
                return Err(usage(
                    "say what to publish: --category, --type, or --all for every event",
                ));
            }
            let publication = Publication {
                id: 0,
                category: p.category,
                event_type: p.event_type,
                subject: p.subject,
                key: p.key,
            };
            let stored = db.add_publication(publication).await.map_err(invalid)?;
            println!("{}", serde_json::to_string(&stored)?);
        }
        OutboxCommand::Unpublish { id } => {
            if !db.remove_publication(id).await? {
                return Err(usage(format!("there is no publication {id}")));
            }
        }
    }
    Ok(())
}

/// A refused publication is the user's input: exit code 2.
fn invalid(e: factline_outbox::OutboxError) -> anyhow::Error {
    match e {
        factline_outbox::OutboxError::InvalidInput(message) => usage(message),
        other => other.into(),
    }
}

/// The sink a `--sink` address names.
pub async fn sink(spec: &str, args: &RelayOptions) -> anyhow::Result<Arc<dyn Sink>> {
    let spec = spec.trim();
    let lower = spec.to_ascii_lowercase();
    Ok(if spec == "stdout" {
        Arc::new(StdoutSink)
    } else if let Some(path) = spec.strip_prefix("file://") {
        Arc::new(FileSink::open(path).await?)
    } else if lower.starts_with("nats://") {
        let mut config = NatsSinkConfig::new(spec);
        config.stream = (args.nats_stream != "none").then(|| args.nats_stream.clone());
        config.subjects = args
            .nats_subjects
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        Arc::new(NatsSink::connect(config).await?)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        if !(args.webhook_timeout > 0.0 && args.webhook_timeout.is_finite()) {
            return Err(usage(
                "--webhook-timeout must be a positive number of seconds",
            ));
        }
        Arc::new(
            WebhookSink::new(spec, Duration::from_secs_f64(args.webhook_timeout))
                .map_err(|e| usage(e.message().to_owned()))?,
        )
    } else {
        return Err(usage(format!(
            "--sink {spec:?}: give nats://host:port, http(s)://…, file:///path or stdout"
        )));
    })
}

pub fn relay_config(args: &RelayOptions) -> anyhow::Result<RelayConfig> {
    if args.batch == 0 {
        return Err(usage("--batch must be at least 1"));
    }
    if !(args.retention_hours >= 0.0 && args.retention_hours.is_finite()) {
        return Err(usage("--retention-hours must be 0 or more"));
    }
    let mut config = {
        let mut config = RelayConfig::default();
        config.batch = args.batch;
        config.retention = Duration::from_secs_f64(args.retention_hours * 3600.0);
        config
    };
    if let Some(id) = &args.relay_id {
        if id.trim().is_empty() {
            return Err(usage("--relay-id is empty"));
        }
        config.relay_id = id.clone();
    }
    Ok(config)
}

/// `factline relay`: runs until Ctrl-C (or SIGTERM), then gives its lanes
/// back.
pub async fn relay(args: RelayArgs, location: &Location) -> anyhow::Result<()> {
    let mut signalled = std::pin::pin!(shutdown_signal());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::select! {
        running = async {
            let (store, db) = open(location).await?;
            start_relay(location, &store, db, &args.sink, &args.options, stopped).await
        } => running?,
        () = &mut signalled => return Ok(()),
    };
    signalled.await;
    stop.send_replace(true);
    running.await??;
    Ok(())
}

/// A running relay: it gives its lanes back and ends when `stop` turns true.
pub type RunningRelay = tokio::task::JoinHandle<Result<(), factline_outbox::OutboxError>>;

/// Starts a relay of `db` to the sink `spec`, woken by `store`'s appends.
pub async fn start_relay(
    location: &Location,
    store: &Arc<dyn EventStore>,
    db: Arc<dyn OutboxDb>,
    spec: &str,
    options: &RelayOptions,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<RunningRelay> {
    let mut config = relay_config(options)?;
    if matches!(location, Location::Sqlite(_)) {
        // Appends of other processes to a SQLite file wake no watch here.
        config.fallback_poll = Duration::from_millis(100);
    }
    let sink = sink(spec, options).await?;
    if db.publications().await?.is_empty() {
        eprintln!(
            "note: nothing is published yet; add a publication with `factline outbox publish`"
        );
    }
    eprintln!(
        "relaying the outbox of {} to {} as {}",
        location.describe(),
        sink.describe(),
        config.relay_id
    );
    let relay = Relay::new(db, sink, config).woken_by(store.watch_head());
    Ok(tokio::spawn(relay.run(stop)))
}

/// Ctrl-C, or SIGTERM where there is one. The handlers are installed when
/// this is called, not when the future is first awaited: a signal sent as
/// soon as the process says it is up then stops it cleanly instead of
/// killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        let fallback = interrupt.is_none();
        async move {
            tokio::select! {
                _ = received(term) => {}
                _ = received(interrupt) => {}
                _ = tokio::signal::ctrl_c(), if fallback => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
