//! `factline demo`: appends a small sample of the orders domain and shows
//! what was stored. It grows into the full demo (projections, dashboard) as
//! those parts land.

use std::collections::BTreeMap;

use clap::Args;
use factline::{EventData, ExpectedVersion, Location, Metadata, StreamId};
use serde_json::json;
use uuid::Uuid;

use crate::usage;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 12)]
    orders: u32,
}

const CUSTOMERS: [(&str, &str); 6] = [
    ("ada", "eu-west"),
    ("grace", "us-east"),
    ("alan", "eu-west"),
    ("edsger", "eu-central"),
    ("barbara", "us-west"),
    ("linus", "eu-central"),
];

const PRODUCTS: [(&str, u64); 4] = [
    ("SKU-KEYBOARD", 8_900),
    ("SKU-MONITOR", 24_900),
    ("SKU-CABLE", 1_200),
    ("SKU-DOCK", 15_500),
];

pub async fn run(location: &Location, args: DemoArgs) -> anyhow::Result<()> {
    if args.orders == 0 || args.orders > 10_000 {
        return Err(usage("--orders must be between 1 and 10000"));
    }
    let store = location.open().await?;
    let start = store.head_position().await? + 1;
    let mut revenue: BTreeMap<&str, u64> = BTreeMap::new();
    let mut statuses: BTreeMap<&str, u32> = BTreeMap::new();

    for n in 0..args.orders {
        let (customer, region) = CUSTOMERS[n as usize % CUSTOMERS.len()];
        let order = StreamId::new(format!("Order-{}", Uuid::new_v4()))?;
        // One correlation id ties an order's whole life together.
        let metadata = Metadata {
            correlation_id: Some(Uuid::new_v4().to_string()),
            ..Metadata::default()
        };
        let lines: Vec<_> = (0..=(n % 3))
            .map(|i| {
                let (sku, price) = PRODUCTS[((n + i) as usize) % PRODUCTS.len()];
                json!({ "sku": sku, "quantity": 1 + (n + i) % 2, "unit_price_cents": price })
            })
            .collect();
        let total: u64 = lines
            .iter()
            .map(|l| {
                l["quantity"].as_u64().unwrap_or(0) * l["unit_price_cents"].as_u64().unwrap_or(0)
            })
            .sum();
        let placed = EventData::new(
            "OrderPlaced",
            json!({ "customer_id": customer, "region": region, "lines": lines, "total_cents": total, "currency": "EUR" }),
        )
        .with_metadata(metadata.clone());
        store
            .append(&order, ExpectedVersion::NoStream, vec![placed])
            .await?;

        // Most orders are paid and many shipped; every fifth is cancelled.
        let (follow_ups, status) = match n % 5 {
            4 => (
                vec![("OrderCancelled", json!({ "reason": "customer request" }))],
                "cancelled",
            ),
            3 => (
                vec![("OrderPaid", json!({ "amount_cents": total }))],
                "paid",
            ),
            _ => (
                vec![
                    ("OrderPaid", json!({ "amount_cents": total })),
                    ("OrderShipped", json!({ "carrier": "factline-post" })),
                ],
                "shipped",
            ),
        };
        let events = follow_ups
            .into_iter()
            .map(|(t, d)| EventData::new(t, d).with_metadata(metadata.clone()))
            .collect();
        store
            .append(&order, ExpectedVersion::Exact(1), events)
            .await?;
        if status != "cancelled" {
            *revenue.entry(region).or_default() += total;
        }
        *statuses.entry(status).or_default() += 1;
    }

    let stored = store.read_all(start, usize::MAX).await?;
    println!(
        "Appended {} events for {} orders to {}:",
        stored.len(),
        args.orders,
        location.describe()
    );
    println!(
        "  {:>8}  {:<14}  {:<45} {:>3}",
        "position", "type", "stream", "ver"
    );
    for e in &stored {
        println!(
            "  {:>8}  {:<14}  {:<45} {:>3}",
            e.position, e.event_type, e.stream_id, e.version
        );
    }
    println!("\nOrders by status:");
    for (status, count) in &statuses {
        println!("  {status:<10} {count:>4}");
    }
    println!("\nRevenue by region (paid orders):");
    for (region, cents) in &revenue {
        println!("  {region:<12} {:>10.2} EUR", *cents as f64 / 100.0);
    }
    println!("\nTry: factline read-category Order --limit 5   |   factline tail --all");
    Ok(())
}
