//! `factline serve`: the HTTP server over a store, with the admin API on
//! its read models and outbox, and optionally the outbox relay and the
//! orders projections in the same process. `factline demo` starts the same
//! stack.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use factline::{EventStore, Location};
use factline_server::{
    BrowserPolicy, ConnectionLimits, InstrumentedStore, Server, ServerConfig, Tokens,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin_api::{CatalogAdmin, DeclaredReadModels};
use crate::catalog::{Catalog, ReadModelDb, READ_SCHEMA};
use crate::outbox_cli::{self, RelayOptions, RunningRelay};
use crate::{seconds, usage};

/// Where `serve` listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address and port to listen on. Anything but a loopback address
    /// needs --tokens (or --allow-anonymous).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// JSON file of bearer tokens and their read/write/admin scopes per
    /// category; without it every request is allowed.
    #[arg(long, env = "FACTLINE_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Serve a non-loopback address without tokens: everyone who can reach
    /// it may read, write and administer.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Also run the outbox relay in this process, publishing to this sink:
    /// nats://host:port, http(s)://…, file:///path or stdout.
    #[arg(long, value_name = "SINK")]
    pub relay: Option<String>,
    #[command(flatten)]
    pub relay_options: RelayOptions,
    /// Also run the orders demo's read models (order_list, revenue,
    /// customer_totals; declared in examples/orders/read_models.toml) live
    /// in this process.
    #[arg(long)]
    pub projections: bool,
    /// Run the read models declared in this file (TOML; see
    /// docs/read-models.md) live in this process; the admin API rebuilds
    /// and retries them too.
    #[arg(long, env = "FACTLINE_READ_MODELS", value_name = "FILE")]
    pub read_models: Option<PathBuf>,
    /// Keep the read models in this database (a SQLite file or a
    /// postgres:// URL) instead of the events' own.
    #[arg(long, env = "FACTLINE_READ_MODELS_DB", value_name = "DB")]
    pub read_models_db: Option<String>,
    /// The PostgreSQL schema of the read models.
    #[arg(long, default_value = READ_SCHEMA)]
    pub schema: String,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub body_limit: usize,
    /// Seconds a request (other than a subscription) may take.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
    /// Seconds between heartbeats on idle subscriptions.
    #[arg(long, default_value_t = 15.0)]
    pub heartbeat: f64,
    /// Seconds a client may take to send a request's headers before its
    /// connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Connections open at once; more are answered 503.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Server-Sent Events subscriptions open at once, in all.
    #[arg(long, default_value_t = 2048)]
    pub max_subscriptions: usize,
    /// Server-Sent Events subscriptions open at once per token.
    #[arg(long, default_value_t = 256)]
    pub max_subscriptions_per_token: usize,
    /// A page of events ends at the event that brings it to this many
    /// bytes (clients go on from its last position).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_page_bytes: usize,
    /// Reads that run at once; more wait their turn.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_reads: usize,
    /// A host name the server answers to besides its addresses and
    /// localhost (repeatable): the name clients and proxies use for it.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// An origin whose web pages may call the server besides its own
    /// dashboard, e.g. https://ops.example.com (repeatable).
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
}

impl ServeArgs {
    /// The arguments of a bare `factline serve`.
    pub fn parse_defaults() -> Self {
        #[derive(clap::Parser)]
        struct Bare {
            #[command(flatten)]
            args: ServeArgs,
        }
        <Bare as clap::Parser>::parse_from(["serve"]).args
    }
}

/// Everything `serve` or `demo` runs, until [`Stack::stop`].
pub struct Stack {
    pub url: String,
    pub store: Arc<dyn EventStore>,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    relay: Option<RunningRelay>,
    projections: Vec<JoinHandle<()>>,
}

/// How [`start`] binds when the address is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnAddressInUse {
    Fail,
    /// Take any free port (the demo, which should just work).
    AnyPort,
}

/// The longest request timeout accepted: a day.
const MAX_REQUEST_TIMEOUT: f64 = 86_400.0;
/// Heartbeats from a second (more often only loads the server and its
/// clients) to an hour (proxies close idle connections long before).
const HEARTBEAT_RANGE: (f64, f64) = (1.0, 3600.0);

fn browser_policy(args: &ServeArgs) -> anyhow::Result<BrowserPolicy> {
    let mut policy = BrowserPolicy::default();
    for name in &args.allowed_hosts {
        if name.is_empty() || name.contains(['/', ':', ' ']) {
            return Err(usage(format!(
                "--allowed-host {name:?} must be a host name without scheme or port"
            )));
        }
        policy = policy.allow_host(name);
    }
    for origin in &args.allowed_origins {
        if !(origin.starts_with("http://") || origin.starts_with("https://")) {
            return Err(usage(format!(
                "--allowed-origin {origin:?} must be an origin like https://ops.example.com"
            )));
        }
        policy = policy.allow_origin(origin);
    }
    Ok(policy)
}

fn at_least_one(flag: &str, value: usize) -> anyhow::Result<usize> {
    if value == 0 {
        return Err(usage(format!("{flag} must be at least 1")));
    }
    Ok(value)
}

/// Raises the soft limit on open files to the hard one: each connection
/// and subscription holds a socket, and distributions start processes at
/// 1024. Warns when even the hard limit is below the connection cap.
fn raise_open_files_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + 64 => tracing::warn!(
            limit,
            max_connections,
            "the open-files limit is below --max-connections; raise the hard limit (ulimit -Hn)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// Starts the stack. The read models are beside the events unless
/// `read_models` names another database (the demo's for `memory:`).
pub async fn start(
    location: &Location,
    args: &ServeArgs,
    on_in_use: OnAddressInUse,
    read_models: Option<ReadModelDb>,
) -> anyhow::Result<Stack> {
    let addr: SocketAddr = args.listen.parse().map_err(|_| {
        usage(format!(
            "--listen {:?} is not an address and port like 127.0.0.1:7480",
            args.listen
        ))
    })?;
    let tokens = match &args.tokens {
        Some(path) => Some(Tokens::load(path).map_err(|e| usage(e.to_string()))?),
        None => None,
    };
    if tokens.is_none() && !addr.ip().is_loopback() && !args.allow_anonymous {
        return Err(usage(format!(
            "refusing to serve {addr} without access control: give --tokens FILE, or --allow-anonymous to let everyone who can reach it read, write and administer"
        )));
    }
    if args.body_limit < 1024 {
        return Err(usage("--body-limit must be at least 1024 bytes"));
    }
    let config = {
        let mut config = ServerConfig::default();
        config.tokens = tokens;
        config.body_limit = args.body_limit;
        config.request_timeout = seconds(
            "--request-timeout",
            args.request_timeout,
            0.001,
            MAX_REQUEST_TIMEOUT,
        )?;
        config.heartbeat = seconds(
            "--heartbeat",
            args.heartbeat,
            HEARTBEAT_RANGE.0,
            HEARTBEAT_RANGE.1,
        )?;
        config.connections = ConnectionLimits::default()
            .with_header_read_timeout(seconds(
                "--header-timeout",
                args.header_timeout,
                0.1,
                3600.0,
            )?)
            .with_max_connections(at_least_one("--max-connections", args.max_connections)?);
        config.max_subscriptions = at_least_one("--max-subscriptions", args.max_subscriptions)?;
        config.max_subscriptions_per_token = at_least_one(
            "--max-subscriptions-per-token",
            args.max_subscriptions_per_token,
        )?;
        config.browsers = browser_policy(args)?;
        config.max_page_bytes = at_least_one("--max-page-bytes", args.max_page_bytes)?;
        config.max_concurrent_reads =
            at_least_one("--max-concurrent-reads", args.max_concurrent_reads)?;
        config
    };
    // A definitions file with mistakes stops here, before anything
    // listens or writes.
    let besides = match args.projections {
        true => crate::demo::declared_read_models()?,
        false => Default::default(),
    };
    let catalog = Catalog::load(args.read_models.as_deref(), besides)?;
    raise_open_files_limit(config.connections.max_connections);

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && on_in_use == OnAddressInUse::AnyPort =>
        {
            eprintln!("note: {addr} is in use; taking a free port instead");
            tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?
        }
        Err(e) => return Err(anyhow::anyhow!("cannot listen on {addr}: {e}")),
    };
    let url = format!("http://{}", listener.local_addr()?);

    let store: Arc<dyn EventStore> = Arc::new(InstrumentedStore::new(location.open().await?));
    let metrics = factline_server::install_recorder().map_err(|e| anyhow::anyhow!(e))?;
    let (stop, stopped) = watch::channel(false);
    let mut server = Server::new(store.clone(), config)
        .with_shutdown(stopped.clone())
        .with_metrics(metrics);

    // The read models and the outbox live in the store's database; an
    // in-memory store has neither.
    let mut projections = Vec::new();
    let mut relay = None;
    let read_models = match (read_models, &args.read_models_db) {
        (Some(db), _) => Some(db),
        (None, Some(other)) => Some(ReadModelDb::for_location(
            &Location::parse(other).map_err(|e| usage(format!("--read-models-db: {e}")))?,
            &args.schema,
        )?),
        (None, None) if *location == Location::Memory => None,
        (None, None) => Some(ReadModelDb::for_location(location, &args.schema)?),
    };
    if let Some(db) = read_models {
        let live = catalog.declared();
        let declared = !catalog.declared().is_empty();
        let admin = Arc::new(CatalogAdmin::new(
            catalog.clone(),
            db.clone(),
            store.clone(),
        ));
        projections = admin.start_live(&live, &stopped)?;
        if declared {
            let read_models = Arc::new(DeclaredReadModels::new(&catalog, &db, admin.clone())?);
            server = server
                .with_read_models(read_models.clone())
                .with_dashboard(read_models);
        }
        server = server.with_projections(admin);
    } else if args.projections || args.read_models.is_some() {
        return Err(usage(
            "an in-memory store keeps no read models: give --db a SQLite file or a postgres:// URL for --projections or --read-models",
        ));
    }
    if *location != Location::Memory {
        let outbox = outbox_cli::open_db(location).await?;
        server = server.with_outbox(outbox.clone());
        if let Some(sink) = &args.relay {
            relay = Some(
                outbox_cli::start_relay(
                    location,
                    &store,
                    outbox,
                    sink,
                    &args.relay_options,
                    stopped.clone(),
                )
                .await?,
            );
        }
    } else if args.relay.is_some() {
        return Err(usage(
            "an in-memory store has no outbox: give --db a SQLite file or a postgres:// URL for --relay",
        ));
    }

    let server = tokio::spawn(server.serve(listener, factline_server::stopped_by(stopped)));
    tracing::info!(url = %url, db = %location.describe(), "serving");
    Ok(Stack {
        url,
        store,
        stop,
        server,
        relay,
        projections,
    })
}

impl Stack {
    /// Stops taking requests, ends subscriptions, lets the relay give its
    /// lanes back and the projections commit, and waits for all of it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        let served = self.server.await?;
        if let Some(relay) = self.relay {
            relay.await??;
        }
        for task in self.projections {
            task.await?;
        }
        served?;
        Ok(())
    }
}

pub async fn run(location: &Location, args: ServeArgs) -> anyhow::Result<()> {
    // Installed before the "serving" line, so a SIGTERM right after it
    // drains cleanly; a signal while starting (an unreachable database)
    // ends the start.
    let mut signalled = std::pin::pin!(outbox_cli::shutdown_signal());
    let stack = tokio::select! {
        stack = start(location, &args, OnAddressInUse::Fail, None) => stack?,
        () = &mut signalled => return Ok(()),
    };
    eprintln!(
        "factline is serving {} on {} (dashboard: {}/ , API: {}/openapi.json); Ctrl-C stops it",
        location.describe(),
        stack.url,
        stack.url,
        stack.url
    );
    signalled.await;
    eprintln!("stopping");
    stack.stop().await
}
