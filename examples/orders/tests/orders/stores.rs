//! The orders domain on every backend: legacy v1 events load as v2, and
//! the load generator's report agrees with what the store holds.

use std::sync::Arc;

use factline_aggregate::{CommandContext, CommandHandler};
use factline_core::{EventStore, ExpectedVersion, StreamFilter};
use factline_orders::load::{self, LoadConfig};
use factline_orders::order::{legacy_order_placed, UNKNOWN_REGION};
use factline_orders::{Order, OrderCommand, OrderEvent, OrderStatus};

async fn legacy_orders_load_as_v2_and_go_on(store: Arc<dyn EventStore>) {
    let orders = CommandHandler::<Order>::new(store.clone());
    let stream = CommandHandler::<Order>::stream_id("legacy-1").unwrap();
    let v1 = legacy_order_placed("c1", &[("SKU-DOCK", 1, 155.0)]);
    store
        .append(&stream, ExpectedVersion::NoStream, vec![v1])
        .await
        .unwrap();
    let loaded = orders.load("legacy-1").await.unwrap();
    assert_eq!(loaded.state.status, OrderStatus::Placed);
    assert_eq!(loaded.state.region, UNKNOWN_REGION);
    assert_eq!(loaded.state.total_cents, 15_500);
    // The old order is paid by today's code, against its upcast total.
    let pay = OrderCommand::Pay {
        amount_cents: 15_500,
        method: "card".into(),
    };
    orders
        .handle("legacy-1", &pay, &CommandContext::new())
        .await
        .unwrap();
    let mut typed = store.subscribe(StreamFilter::Stream(stream), 1);
    let (first, event) = typed.next_typed::<OrderEvent>().await.unwrap();
    assert_eq!(first.metadata.schema_version, 1);
    assert!(matches!(
        event,
        OrderEvent::OrderPlaced {
            total_cents: 15_500,
            ..
        }
    ));
}

async fn load_generator_report_matches_the_store(store: Arc<dyn EventStore>) {
    let config = LoadConfig {
        customers: 5,
        orders: 40,
        concurrency: 4,
        seed: 7,
        snapshot_every: Some(3),
        ..LoadConfig::default()
    };
    let report = load::run(store.clone(), &config).await.unwrap();
    assert_eq!(report.customers, 5);
    assert_eq!(report.statuses.values().sum::<u64>(), 40);
    assert_eq!(
        report.commands,
        report.accepted + report.rejected + report.replayed
    );
    let stored = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(stored.len() as u64, report.events);
    let count = |t: &str| stored.iter().filter(|e| e.event_type == t).count() as u64;
    assert_eq!(count("CustomerRegistered"), 5);
    assert_eq!(count("OrderPlaced"), 40);
    assert_eq!(count("OrderShipped"), report.statuses["shipped"]);
    assert_eq!(
        count("OrderCancelled"),
        report.statuses.get("cancelled").copied().unwrap_or(0)
    );
    // Every event of an order carries that order's correlation id.
    for event in stored.iter().filter(|e| e.stream_id.category() == "Order") {
        let order_number = event.stream_id.as_str().rsplit("-o").next().unwrap();
        assert_eq!(
            event.metadata.correlation_id.as_deref(),
            Some(format!("{}-order-{order_number}", report.run_id).as_str())
        );
    }
    // The same seed makes the same mix.
    let again = load::run(store.clone(), &config).await.unwrap();
    assert_eq!(
        (again.statuses, again.rejected, again.replayed),
        (report.statuses, report.rejected, report.replayed)
    );
}

factline_conformance::on_every_backend!(
    legacy_orders_load_as_v2_and_go_on,
    load_generator_report_matches_the_store,
);
