//! What the orders read-model tests share: the read models folded from the
//! typed history without SQL (the reference), and readers of the models
//! from SQLite and PostgreSQL, all as rows of text keyed by primary key.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;

use factline_aggregate::DomainEvent;
use factline_core::RecordedEvent;
use factline_orders::read_models::day_of;
use factline_orders::{CustomerEvent, OrderEvent};

pub type Rows = BTreeMap<String, Vec<String>>;

/// The three read models as rows keyed by their primary key, every value
/// as text.
#[derive(Debug, Default, PartialEq)]
pub struct ReadModels {
    pub orders: Rows,
    pub revenue: Rows,
    pub customers: Rows,
}

/// The read models folded from the typed history, without SQL.
pub fn reference(history: &[RecordedEvent]) -> ReadModels {
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

/// The read models as the SQLite file at `path` shows them.
pub fn read_sqlite(path: &std::path::Path) -> ReadModels {
    let conn = rusqlite::Connection::open(path).unwrap();
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
    ReadModels {
        orders: read(&orders),
        revenue: read(&revenue),
        customers: read(&customers),
    }
}

/// The read models as PostgreSQL's `schema` at `url` shows them.
pub async fn read_postgres(url: &str, schema: &str) -> ReadModels {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let [orders, revenue, customers] = queries(&format!("{schema}."), |c| format!("{c}::text"));
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
    models
}
