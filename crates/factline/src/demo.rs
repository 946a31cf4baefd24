//! `factline demo`: runs the orders domain's load generator through the
//! command handler (customers register, orders are placed, paid, shipped,
//! cancelled, with the mistakes clients make) while the orders read models
//! follow live, and shows what happened from both.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use factline::{EventStore, Location};
use factline_orders::load::{self, LoadConfig};
use factline_orders::read_models::{self, Summary};
use tokio::sync::watch;

use crate::catalog::{self, ReadModelDb, Running, READ_SCHEMA};

use crate::usage;

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

    /// Starts the orders projections, following the log live.
    fn start(
        &self,
        store: &Arc<dyn EventStore>,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<Running>> {
        catalog::known()
            .iter()
            .map(|p| catalog::spawn_live(&self.db, store, p.name(), stop))
            .collect()
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
    /// Orders to place.
    #[arg(long, default_value_t = 12)]
    orders: u32,
    /// Customers to register first.
    #[arg(long, default_value_t = 6)]
    customers: u32,
    /// Orders started per second (default: as fast as they go).
    #[arg(long)]
    rate: Option<f64>,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Seeds the mix of commands; the same seed makes the same mix.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub async fn run(location: &Location, args: DemoArgs) -> anyhow::Result<()> {
    if args.orders == 0 || args.orders > 100_000 {
        return Err(usage("--orders must be between 1 and 100000"));
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
    let store: Arc<dyn EventStore> = location.open().await?;
    let start = store.head_position().await? + 1;
    let read_models = ReadModels::for_location(location)?;
    let (stop, stopped) = watch::channel(false);
    let running = read_models.start(&store, &stopped)?;
    let config = LoadConfig {
        customers: args.customers as usize,
        orders: args.orders as usize,
        orders_per_second: args.rate,
        concurrency: args.concurrency as usize,
        seed: args.seed,
        snapshot_every: Some(100),
    };
    let report = load::run(store.clone(), &config).await?;
    // The read models follow live; wait for them to have every event.
    let head = store.head_position().await?;
    // The read models follow live, here or (on PostgreSQL) in another
    // process holding their leases: wait until the database says they have
    // every event.
    let admin = read_models.db.admin().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let lags = loop {
        let infos = admin.projections().await?;
        let known: Vec<_> = catalog::known()
            .iter()
            .filter_map(|p| infos.iter().find(|i| i.name == p.name()).cloned())
            .collect();
        let all_there = known.len() == running.len() && known.iter().all(|i| i.checkpoint >= head);
        if all_there || tokio::time::Instant::now() >= deadline {
            break known;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.send_replace(true);
    for (_, task) in running {
        task.await??;
    }
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
