//! `factline demo`: runs the orders domain's load generator through the
//! command handler (customers register, orders are placed, paid, shipped,
//! cancelled, with the mistakes clients make) and shows what happened. It
//! grows into the full demo (projections, dashboard) as those parts land.

use std::sync::Arc;

use clap::Args;
use factline::{EventStore, Location};
use factline_orders::load::{self, LoadConfig};

use crate::usage;

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
    let config = LoadConfig {
        customers: args.customers as usize,
        orders: args.orders as usize,
        orders_per_second: args.rate,
        concurrency: args.concurrency as usize,
        seed: args.seed,
        snapshot_every: Some(100),
    };
    let report = load::run(store.clone(), &config).await?;

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
    println!("\nOrders by status:");
    for (status, count) in &report.statuses {
        println!("  {status:<10} {count:>6}");
    }
    println!("\nRevenue by region (paid, not refunded):");
    for (region, cents) in &report.revenue_cents {
        println!("  {region:<12} {:>12.2} EUR", *cents as f64 / 100.0);
    }
    println!("\nTry: factline read-category Order --limit 5   |   factline tail --all");
    Ok(())
}
