//! The orders read models on SQLite and PostgreSQL (read models in the
//! events' own database): after a load-generator run and a legacy v1 order,
//! each read model equals a fold of the full history computed here,
//! independently, from the typed events.

mod common;

use std::sync::Arc;

use common::{read_postgres, read_sqlite, reference};
use factline_core::{EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_orders::load::{self, LoadConfig};
use factline_orders::order::legacy_order_placed;
use factline_orders::read_models::{CustomerTotals, OrderList, RevenueByRegionDay};
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqliteSink};

async fn produce_history(store: &Arc<dyn EventStore>) -> Vec<RecordedEvent> {
    let config = LoadConfig {
        customers: 8,
        orders: 60,
        seed: 5,
        ..LoadConfig::default()
    };
    load::run(store.clone(), &config).await.unwrap();
    // An order an earlier release wrote, in OrderPlaced's v1 shape.
    let legacy = StreamId::new("Order-legacy-1").unwrap();
    let v1 = legacy_order_placed("legacy-customer", &[("SKU-DOCK", 2, 155.0)]);
    store
        .append(&legacy, ExpectedVersion::NoStream, vec![v1])
        .await
        .unwrap();
    store.read_all(1, usize::MAX).await.unwrap()
}

async fn catch_up<S: Sink + 'static>(store: &Arc<dyn EventStore>, sink: S) {
    Runner::new(store.clone(), sink)
        .catch_up(u64::MAX)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_read_models_equal_a_fold_of_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store: Arc<dyn EventStore> = Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
    let history = produce_history(&store).await;
    catch_up(
        &store,
        SqliteSink::open(&path, Portable::new(OrderList)).unwrap(),
    )
    .await;
    catch_up(
        &store,
        SqliteSink::open(&path, Portable::new(RevenueByRegionDay)).unwrap(),
    )
    .await;
    catch_up(
        &store,
        SqliteSink::open(&path, Portable::new(CustomerTotals)).unwrap(),
    )
    .await;
    let models = read_sqlite(&path);
    let expected = reference(&history);
    assert_eq!(models, expected);
    assert_eq!(
        expected.orders["legacy-1"][1], "unknown",
        "the v1 order was upcast"
    );
    assert_eq!(expected.orders.len(), 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_read_models_equal_a_fold_of_the_history() {
    let db = factline_testpg::database().await;
    let store: Arc<dyn EventStore> = Arc::new(
        factline_postgres::PostgresStore::connect(&db.url)
            .await
            .unwrap(),
    );
    let history = produce_history(&store).await;
    let schema = "orders_read";
    let url = &db.url;
    catch_up(
        &store,
        PostgresSink::connect(url, schema, Portable::new(OrderList))
            .await
            .unwrap(),
    )
    .await;
    catch_up(
        &store,
        PostgresSink::connect(url, schema, Portable::new(RevenueByRegionDay))
            .await
            .unwrap(),
    )
    .await;
    catch_up(
        &store,
        PostgresSink::connect(url, schema, Portable::new(CustomerTotals))
            .await
            .unwrap(),
    )
    .await;
    let models = read_postgres(&db.url, schema).await;
    assert_eq!(models, reference(&history));
}
