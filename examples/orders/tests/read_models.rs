//! The orders read models on SQLite and PostgreSQL (read models in the
//! events' own database): after a load-generator run and a legacy v1 order,
//! each read model equals a fold of the full history computed here,
//! independently, from the typed events.

use std::collections::BTreeMap;
use std::sync::Arc;

use factline_aggregate::DomainEvent;
use factline_core::{EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_orders::load::{self, LoadConfig};
use factline_orders::order::legacy_order_placed;
use factline_orders::read_models::{day_of, CustomerTotals, OrderList, RevenueByRegionDay};
use factline_orders::{CustomerEvent, OrderEvent};
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqliteSink};

type Rows = BTreeMap<String, Vec<String>>;

/// The three read models as rows keyed by their primary key, every value
/// as text.
#[derive(Debug, Default, PartialEq)]
struct ReadModels {
    orders: Rows,
    revenue: Rows,
    customers: Rows,
}

/// The read models folded from the typed history, without SQL.
fn reference(history: &[RecordedEvent]) -> ReadModels {
    let mut models = ReadModels::default();
    let mut region_of: BTreeMap<String, String> = BTreeMap::new();
    let mut owner_of: BTreeMap<String, String> = BTreeMap::new();
    let mut customers: BTreeMap<String, (String, String, i64, i64, i64)> = BTreeMap::new();
    let mut revenue: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for event in history {
        let id = event
            .stream_id
            .as_str()
            .split_once('-')
            .unwrap()
            .1
            .to_owned();
        match event.stream_id.category() {
            "Customer" => match CustomerEvent::from_recorded(event).unwrap() {
                CustomerEvent::CustomerRegistered { name, region } => {
                    let c = customers.entry(id).or_default();
                    (c.0, c.1) = (name, region);
                }
                CustomerEvent::CustomerRelocated { to, .. } => {
                    customers.entry(id).or_default().1 = to
                }
            },
            "Order" => {
                let mut money = |region: &str, paid: i64, refunded: i64, orders: i64| {
                    let r = revenue
                        .entry(format!("{region}|{}", day_of(event)))
                        .or_default();
                    (r.0, r.1, r.2) = (r.0 + paid, r.1 + refunded, r.2 + orders);
                };
                match OrderEvent::from_recorded(event).unwrap() {
                    OrderEvent::OrderPlaced {
                        customer_id,
                        region,
                        total_cents,
                        ..
                    } => {
                        let row = vec![
                            customer_id.clone(),
                            region.clone(),
                            "placed".into(),
                            total_cents.to_string(),
                        ];
                        models.orders.insert(id.clone(), row);
                        region_of.insert(id.clone(), region);
                        owner_of.insert(id, customer_id.clone());
                        customers.entry(customer_id).or_default().2 += 1;
                    }
                    OrderEvent::OrderPaid { amount_cents, .. } => {
                        models.orders.get_mut(&id).unwrap()[2] = "paid".into();
                        money(&region_of[&id], amount_cents as i64, 0, 1);
                        customers.get_mut(&owner_of[&id]).unwrap().3 += amount_cents as i64;
                    }
                    OrderEvent::OrderShipped { .. } => {
                        models.orders.get_mut(&id).unwrap()[2] = "shipped".into();
                    }
                    OrderEvent::OrderCancelled { refund_cents, .. } => {
                        models.orders.get_mut(&id).unwrap()[2] = "cancelled".into();
                        if refund_cents > 0 {
                            money(&region_of[&id], 0, refund_cents as i64, 0);
                            customers.get_mut(&owner_of[&id]).unwrap().4 += refund_cents as i64;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    models.revenue = revenue
        .into_iter()
        .map(|(k, (p, r, o))| (k, vec![p.to_string(), r.to_string(), o.to_string()]))
        .collect();
    models.customers = customers
        .into_iter()
        .map(|(k, (n, r, o, p, f))| (k, vec![n, r, o.to_string(), p.to_string(), f.to_string()]))
        .collect();
    models
}

/// The queries that read the models back through their views; `text`
/// casts a column to text in the database's dialect.
fn queries(prefix: &str, text: fn(&str) -> String) -> [String; 3] {
    let t = text;
    [
        format!(
            "SELECT order_id, customer_id, region, status, {} FROM {prefix}orders",
            t("total_cents")
        ),
        format!(
            "SELECT region || '|' || day, {}, {}, {} FROM {prefix}revenue",
            t("paid_cents"),
            t("refunded_cents"),
            t("paid_orders")
        ),
        format!(
            "SELECT customer_id, name, region, {}, {}, {} FROM {prefix}customer_totals",
            t("orders"),
            t("paid_cents"),
            t("refunded_cents")
        ),
    ]
}

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
    let conn = rusqlite::Connection::open(&path).unwrap();
    let read = |sql: &str| -> Rows {
        let mut stmt = conn.prepare(sql).unwrap();
        let width = stmt.column_count();
        stmt.query_map([], |r| {
            let values: Vec<String> = (0..width).map(|i| r.get(i)).collect::<Result<_, _>>()?;
            Ok((values[0].clone(), values[1..].to_vec()))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    };
    let [orders, revenue, customers] = queries("", |c| format!("CAST({c} AS TEXT)"));
    let models = ReadModels {
        orders: read(&orders),
        revenue: read(&revenue),
        customers: read(&customers),
    };
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
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let [orders, revenue, customers] = queries("orders_read.", |c| format!("{c}::text"));
    let mut models = ReadModels::default();
    for (sql, rows) in [
        (orders, &mut models.orders),
        (revenue, &mut models.revenue),
        (customers, &mut models.customers),
    ] {
        for row in client.query(&sql, &[]).await.unwrap() {
            let values: Vec<String> = (0..row.len()).map(|i| row.get(i)).collect();
            rows.insert(values[0].clone(), values[1..].to_vec());
        }
    }
    assert_eq!(models, reference(&history));
}
