//! `factline demo`: runs the orders domain's load generator through the
//! command handler (customers register, orders are placed, paid, shipped,
//! cancelled, with the mistakes clients make) while the orders read models
//! follow live, and shows what happened from both.

use std::time::Duration;

use clap::Args;
use factline::Location;
use factline_orders::load::{self, LoadConfig};
use factline_orders::read_models::{self, Summary};
use factline_outbox::Publication;
use factline_read_models::Definitions;
use tokio::sync::watch;

use crate::catalog::{ReadModelDb, READ_SCHEMA};
use crate::outbox_cli;
use crate::serve::{self, OnAddressInUse, ServeArgs};
use crate::usage;

/// The demo's read models, declared in `examples/orders/read_models.toml`
/// (what `demo`, `serve --projections` and `projections …` without a file
/// run).
pub fn declared_read_models() -> anyhow::Result<Definitions> {
    Definitions::parse(factline_orders::READ_MODELS, "the demo's read models")
        .map_err(|e| anyhow::anyhow!("the demo's read models do not check: {e}"))
}

/// Where the read models live: beside the events (the SQLite file or the
/// PostgreSQL database's `orders_read` schema), or in a temporary file for
/// `memory:`.
struct ReadModels {
    db: ReadModelDb,
    /// Keeps the temporary directory of `memory:` alive.
    _temp: Option<tempfile::TempDir>,
}

impl ReadModels {
    fn for_location(location: &Location) -> anyhow::Result<Self> {
        if *location == Location::Memory {
            let dir = tempfile::tempdir()?;
            return Ok(ReadModels {
                db: ReadModelDb::Sqlite(dir.path().join("read-models.db")),
                _temp: Some(dir),
            });
        }
        Ok(ReadModels {
            db: ReadModelDb::for_location(location, READ_SCHEMA)?,
            _temp: None,
        })
    }

    async fn summary(&self) -> anyhow::Result<Summary> {
        Ok(match &self.db {
            ReadModelDb::Sqlite(path) => read_models::summary_sqlite(path)?,
            ReadModelDb::Postgres { url, schema } => {
                read_models::summary_postgres(url, schema).await?
            }
        })
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop the load after this many orders (default: run until Ctrl-C or
    /// --duration).
    #[arg(long)]
    orders: Option<u32>,
    /// Customers to register first.
    #[arg(long, default_value_t = 12)]
    customers: u32,
    /// Orders started per second (default: 20 when running until stopped,
    /// as fast as they go with --orders).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Seeds the mix of commands; the same seed makes the same mix.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// After --orders are placed, keep serving the dashboard and API until
    /// Ctrl-C or --duration.
    #[arg(long, requires = "orders")]
    keep_serving: bool,
    /// Address of the dashboard and API (a free port when it is taken).
    #[arg(long, default_value = serve::DEFAULT_LISTEN)]
    listen: String,
    /// Where the outbox relay publishes the events: file:///path, stdout,
    /// nats://…, http(s)://…, or none (default: outbox.jsonl beside a
    /// SQLite database, none on PostgreSQL).
    #[arg(long)]
    sink: Option<String>,
}

/// The orders per second of a demo that runs until stopped.
const DEFAULT_RATE: f64 = 20.0;

/// The sink of the demo's relay: a file beside the SQLite database.
fn default_sink(location: &Location) -> Option<String> {
    match location {
        Location::Sqlite(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let file = dir.map_or_else(|| "outbox.jsonl".into(), |d| d.join("outbox.jsonl"));
            let file = std::path::absolute(&file).unwrap_or(file);
            Some(format!("file://{}", file.display()))
        }
        // A shared database has no directory of its own to write to.
        _ => None,
    }
}

pub async fn run(location: &Location, args: DemoArgs) -> anyhow::Result<()> {
    if args.orders.is_some_and(|n| n == 0 || n > 1_000_000) {
        return Err(usage("--orders must be between 1 and 1000000"));
    }
    if args.customers == 0 || args.customers > 100_000 {
        return Err(usage("--customers must be between 1 and 100000"));
    }
    if args.concurrency == 0 || args.concurrency > 1024 {
        return Err(usage("--concurrency must be between 1 and 1024"));
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(usage(
            "--rate must be a positive number of orders per second",
        ));
    }
    // A year is longer than any demo; the bound keeps huge numbers a
    // usage error.
    let duration = args
        .duration
        .map(|d| crate::seconds("--duration", d, 0.001, 365.0 * 86_400.0))
        .transpose()?;
    let read_models = ReadModels::for_location(location)?;
    let sink = match args.sink.as_deref() {
        Some("none") => None,
        Some(sink) => Some(sink.to_owned()),
        None => default_sink(location),
    };
    if sink.is_some() {
        if *location == Location::Memory {
            return Err(usage(
                "an in-memory store has no outbox: leave --sink out or give --db a file",
            ));
        }
        // The demo publishes every event unless publications are set up.
        location.open().await?;
        let outbox = outbox_cli::open_db(location).await?;
        if outbox.publications().await?.is_empty() {
            outbox.add_publication(Publication::everything()).await?;
        }
    }
    let serve_args = ServeArgs {
        listen: args.listen.clone(),
        relay: sink.clone(),
        projections: true,
        ..ServeArgs::parse_defaults()
    };
    let stack = serve::start(
        location,
        &serve_args,
        OnAddressInUse::AnyPort,
        Some(read_models.db.clone()),
    )
    .await?;
    let store = stack.store.clone();
    let start = store.head_position().await? + 1;
    // Ctrl-C or --duration: the load stops, and so does --keep-serving.
    let (stop, mut stopped) = watch::channel(false);
    let rate = match (args.rate, args.orders) {
        (Some(rate), _) => Some(rate),
        (None, None) => Some(DEFAULT_RATE),
        (None, Some(_)) => None,
    };
    println!("Dashboard: {}/", stack.url);
    println!(
        "API: {}/openapi.json   events relayed to: {}",
        stack.url,
        sink.as_deref().unwrap_or("nowhere (no outbox)")
    );
    match (args.orders, args.duration) {
        (Some(n), _) => println!("Placing {n} orders; Ctrl-C stops early."),
        (None, Some(d)) => println!("Placing orders for {d} s; Ctrl-C stops early."),
        (None, None) => println!("Placing orders until Ctrl-C."),
    }
    let config = LoadConfig {
        customers: args.customers as usize,
        orders: args.orders.map_or(usize::MAX, |n| n as usize),
        orders_per_second: rate,
        concurrency: args.concurrency as usize,
        seed: args.seed,
        snapshot_every: Some(100),
        stop: Some(stopped.clone()),
    };
    let until = duration.map(|d| tokio::time::Instant::now() + d);
    let signalled = outbox_cli::shutdown_signal();
    let stopper = tokio::spawn(async move {
        match until {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = signalled => {}
                }
            }
            None => signalled.await,
        }
        stop.send_replace(true);
    });
    let report = load::run(store.clone(), &config).await?;
    if args.keep_serving {
        println!(
            "Placed {} orders; still serving {}/ until Ctrl-C{}.",
            report.orders,
            stack.url,
            if until.is_some() {
                " or --duration"
            } else {
                ""
            }
        );
        let _ = stopped.wait_for(|s| *s).await;
    }
    stopper.abort();
    // The read models follow live, here or (on PostgreSQL) in another
    // process holding their leases: wait until the database says they have
    // every event.
    let head = store.head_position().await?;
    let admin = read_models.db.admin().await?;
    let demo_models = declared_read_models()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let lags = loop {
        let infos = admin.projections().await?;
        let known: Vec<_> = demo_models
            .read_models()
            .iter()
            .filter_map(|m| infos.iter().find(|i| i.name == m.name()).cloned())
            .collect();
        let all_there = known.len() == demo_models.read_models().len()
            && known.iter().all(|i| i.checkpoint >= head);
        if all_there || tokio::time::Instant::now() >= deadline {
            break known;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stack.stop().await?;
    let summary = read_models.summary().await?;

    println!(
        "Ran {} commands for {} customers and {} orders in {:.2} s ({:.0} commands/s) on {}:",
        report.commands,
        report.customers,
        report.orders,
        report.elapsed.as_secs_f64(),
        report.commands_per_second(),
        location.describe()
    );
    println!(
        "  {} accepted, {} events appended; {} refused by the rules (on purpose); {} repeats answered from their idempotency key",
        report.accepted, report.events, report.rejected, report.replayed
    );
    let stored = store.read_all(start, usize::MAX).await?;
    let shown = stored.len().min(12);
    println!("\nThe last {shown} events:");
    println!(
        "  {:>8}  {:<18}  {:<28} {:>3}",
        "position", "type", "stream", "ver"
    );
    for e in &stored[stored.len() - shown..] {
        println!(
            "  {:>8}  {:<18}  {:<28} {:>3}",
            e.position,
            e.event_type,
            e.stream_id.as_str(),
            e.version
        );
    }
    println!("\nRead models, kept up to date while the commands ran:");
    for info in &lags {
        println!(
            "  {:<16} at position {:>8}, {} behind, {} parked",
            info.name,
            info.checkpoint,
            head.saturating_sub(info.checkpoint),
            info.parked
        );
    }
    println!("\nOrders by status (all runs):");
    for (status, count) in &summary.statuses {
        println!("  {status:<10} {count:>6}");
    }
    println!("\nRevenue by region (paid minus refunded, all runs):");
    for (region, cents) in &summary.net_revenue {
        println!("  {region:<12} {:>12.2} EUR", *cents as f64 / 100.0);
    }
    println!("\nTop customers:");
    for (customer, name, cents) in &summary.top_customers {
        println!(
            "  {customer:<16} {name:<10} {:>12.2} EUR",
            *cents as f64 / 100.0
        );
    }
    println!("\nTry: factline read-category Order --limit 5   |   factline tail --all");
    Ok(())
}
