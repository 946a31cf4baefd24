//! The orders read models (issue 5, item 11), written once as
//! [`SqlProjection`]s and run on SQLite or PostgreSQL through
//! [`Portable`](factline_projections::Portable):
//!
//! - [`OrderList`]: one row per order (customer, region, status, total),
//!   indexed for filtering by status and by customer;
//! - [`RevenueByRegionDay`]: paid and refunded cents per region and day;
//! - [`CustomerTotals`]: per customer, orders placed, paid and refunded.
//!
//! Each keeps the lookups it needs (which region an order is in, whose it
//! is) in tables of its own: a projection never reads another's tables,
//! since either may be rebuilt on its own.

use std::collections::{BTreeMap, HashMap};

use factline_aggregate::DomainEvent;
use factline_core::RecordedEvent;
use factline_projections::{ApplyError, Dialect, SqlProjection, SqlValue, Statement, Tables};

use crate::{CustomerEvent, OrderEvent};

/// The order id of an `Order-<id>` stream.
fn order_id(event: &RecordedEvent) -> String {
    order_id_of(event).to_owned()
}

fn order_id_of(event: &RecordedEvent) -> &str {
    event
        .stream_id
        .as_str()
        .split_once('-')
        .map_or("", |(_, id)| id)
}

fn order_event(event: &RecordedEvent) -> Result<Option<OrderEvent>, ApplyError> {
    if event.stream_id.category() != "Order" {
        return Ok(None);
    }
    OrderEvent::from_recorded(event)
        .map(Some)
        .map_err(|e| ApplyError::new(e.to_string()))
}

fn customer_event(event: &RecordedEvent) -> Result<Option<CustomerEvent>, ApplyError> {
    if event.stream_id.category() != "Customer" {
        return Ok(None);
    }
    CustomerEvent::from_recorded(event)
        .map(Some)
        .map_err(|e| ApplyError::new(e.to_string()))
}

/// The UTC day an event was recorded on, `YYYY-MM-DD`.
pub fn day_of(event: &RecordedEvent) -> String {
    format_day(event.recorded_at.date_naive())
}

fn format_day(day: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    format!("{:04}-{:02}-{:02}", day.year(), day.month(), day.day())
}

/// Orders, filterable by status and customer.
pub struct OrderList;

impl SqlProjection for OrderList {
    fn name(&self) -> &str {
        "order_list"
    }
    fn tables(&self) -> &[&str] {
        &["orders"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        let (orders, local) = (t.get("orders"), t.local("orders"));
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {orders} (
                     order_id      TEXT   PRIMARY KEY,
                     customer_id   TEXT   NOT NULL,
                     region        TEXT   NOT NULL,
                     status        TEXT   NOT NULL,
                     total_cents   BIGINT NOT NULL,
                     line_count    BIGINT NOT NULL,
                     placed_on     TEXT   NOT NULL,
                     last_position BIGINT NOT NULL
                 )"
            ),
            format!("CREATE INDEX IF NOT EXISTS {local}_status ON {orders} (status, order_id)"),
            format!(
                "CREATE INDEX IF NOT EXISTS {local}_customer ON {orders} (customer_id, order_id)"
            ),
        ]
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        let orders = t.get("orders");
        let id = order_id(event);
        let position = SqlValue::from(event.position);
        let status = |status: &str| {
            Statement::new(
                format!("UPDATE {orders} SET status = $2, last_position = $3 WHERE order_id = $1"),
                vec![id.clone().into(), status.into(), position.clone()],
            )
        };
        Ok(match order_event(event)? {
            Some(OrderEvent::OrderPlaced {
                customer_id,
                region,
                lines,
                total_cents,
                ..
            }) => vec![Statement::new(
                format!(
                    "INSERT INTO {orders} (order_id, customer_id, region, status, total_cents,
                                           line_count, placed_on, last_position)
                     VALUES ($1, $2, $3, 'placed', $4, $5, $6, $7)
                     ON CONFLICT (order_id) DO NOTHING"
                ),
                vec![
                    id.clone().into(),
                    customer_id.into(),
                    region.into(),
                    total_cents.into(),
                    (lines.len() as u64).into(),
                    day_of(event).into(),
                    position.clone(),
                ],
            )],
            Some(OrderEvent::OrderPaid { .. }) => vec![status("paid")],
            Some(OrderEvent::OrderShipped { .. }) => vec![status("shipped")],
            Some(OrderEvent::OrderCancelled { .. }) => vec![status("cancelled")],
            None => Vec::new(),
        })
    }
}

/// Paid and refunded cents per region and day.
#[derive(Default)]
pub struct RevenueByRegionDay {
    /// The regions of orders this instance has seen placed, so a batch's
    /// money is summed per region and day here and written in a few rows;
    /// money of other orders (placed before it started) is looked up in
    /// its table. Regions never change, so a rolled-back batch leaves
    /// nothing wrong here.
    regions: RegionCache,
}

/// Orders' regions, each region name stored once: there are few regions
/// and many orders.
#[derive(Default)]
struct RegionCache {
    names: Vec<String>,
    of_order: HashMap<Box<str>, u32>,
}

impl RegionCache {
    fn len(&self) -> usize {
        self.of_order.len()
    }
    fn clear(&mut self) {
        self.names.clear();
        self.of_order.clear();
    }
    /// Remembers the first region an order was placed in (the table keeps
    /// the first too).
    fn remember(&mut self, order: &str, region: &str) {
        if self.of_order.contains_key(order) {
            return;
        }
        let index = match self.names.iter().position(|name| name == region) {
            Some(index) => index,
            None => {
                self.names.push(region.to_owned());
                self.names.len() - 1
            }
        };
        self.of_order.insert(order.into(), index as u32);
    }
    fn region_of(&self, order: &str) -> Option<u32> {
        self.of_order.get(order).copied()
    }
}

impl RevenueByRegionDay {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Most order regions a revenue projection keeps in memory.
const MAX_CACHED_REGIONS: usize = 2_000_000;

impl SqlProjection for RevenueByRegionDay {
    fn name(&self) -> &str {
        "revenue"
    }
    fn tables(&self) -> &[&str] {
        &["revenue", "revenue_order_regions"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     region         TEXT   NOT NULL,
                     day            TEXT   NOT NULL,
                     paid_cents     BIGINT NOT NULL,
                     refunded_cents BIGINT NOT NULL,
                     paid_orders    BIGINT NOT NULL,
                     PRIMARY KEY (region, day)
                 )",
                t.get("revenue")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (order_id TEXT PRIMARY KEY, region TEXT NOT NULL)",
                t.get("revenue_order_regions")
            ),
        ]
    }
    /// On SQLite both tables are keyed by text: stored in their primary key
    /// (`WITHOUT ROWID`), a row is one B-tree insert instead of two.
    fn create_tables_for(&self, dialect: Dialect, t: &Tables) -> Vec<String> {
        let tables = self.create_tables(t);
        match dialect {
            Dialect::Sqlite => tables
                .into_iter()
                .map(|ddl| ddl + " WITHOUT ROWID")
                .collect(),
            Dialect::Postgres => tables,
        }
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        let (revenue, regions) = (t.get("revenue"), t.get("revenue_order_regions"));
        let id = order_id(event);
        // Money lands on the day it moved, in the order's region.
        let add = |paid: u64, refunded: u64, orders: u64| {
            Statement::new(
                format!(
                    "INSERT INTO {revenue} AS r (region, day, paid_cents, refunded_cents, paid_orders)
                     SELECT region, $2, $3, $4, $5 FROM {regions} WHERE order_id = $1
                     ON CONFLICT (region, day) DO UPDATE SET
                         paid_cents = r.paid_cents + excluded.paid_cents,
                         refunded_cents = r.refunded_cents + excluded.refunded_cents,
                         paid_orders = r.paid_orders + excluded.paid_orders"
                ),
                vec![
                    id.clone().into(),
                    day_of(event).into(),
                    paid.into(),
                    refunded.into(),
                    orders.into(),
                ],
            )
        };
        Ok(match order_event(event)? {
            Some(OrderEvent::OrderPlaced { region, .. }) => vec![Statement::new(
                format!(
                    "INSERT INTO {regions} (order_id, region) VALUES ($1, $2)
                     ON CONFLICT (order_id) DO NOTHING"
                ),
                vec![id.clone().into(), region.into()],
            )],
            Some(OrderEvent::OrderPaid { amount_cents, .. }) => vec![add(amount_cents, 0, 1)],
            Some(OrderEvent::OrderCancelled { refund_cents, .. }) if refund_cents > 0 => {
                vec![add(0, refund_cents, 0)]
            }
            _ => Vec::new(),
        })
    }

    /// A whole batch in two set-based statements: the batch's placements,
    /// then its money summed per region and day (with the orders' regions,
    /// those of this batch included). The events' values go in as one JSON
    /// array each.
    fn batch_statements(
        &mut self,
        dialect: Dialect,
        t: &Tables,
        events: &[RecordedEvent],
    ) -> Option<Result<Vec<Statement>, ApplyError>> {
        if self.regions.len() > MAX_CACHED_REGIONS {
            self.regions.clear();
        }
        Some(revenue_batch(&mut self.regions, dialect, t, events))
    }
}

fn revenue_batch(
    regions_seen: &mut RegionCache,
    dialect: Dialect,
    t: &Tables,
    events: &[RecordedEvent],
) -> Result<Vec<Statement>, ApplyError> {
    let mut placed: Vec<(&str, String)> = Vec::new();
    // (order, day, paid, refunded, paid orders)
    let mut moves: Vec<(&str, chrono::NaiveDate, u64, u64, u64)> = Vec::new();
    for event in events {
        // Only these move revenue, and only a field or two of each is
        // read (after upcasting), not the whole event.
        let day = || event.recorded_at.date_naive();
        match event.event_type.as_str() {
            "OrderPlaced" => {
                let region: String = field(event, "region")?;
                let order = order_id_of(event);
                regions_seen.remember(order, &region);
                placed.push((order, region));
            }
            "OrderPaid" => {
                let amount_cents: u64 = field(event, "amount_cents")?;
                moves.push((order_id_of(event), day(), amount_cents, 0, 1));
            }
            "OrderCancelled" => {
                let refund_cents: u64 = field(event, "refund_cents")?;
                if refund_cents > 0 {
                    moves.push((order_id_of(event), day(), 0, refund_cents, 0));
                }
            }
            _ => {}
        }
    }
    // Money of orders whose region is known, summed per (region, day); the
    // others' regions are looked up in the table.
    let mut summed: BTreeMap<(u32, chrono::NaiveDate), (u64, u64, u64)> = BTreeMap::new();
    let mut looked_up = Vec::new();
    for (order, day, paid, refunded, orders) in moves {
        match regions_seen.region_of(order) {
            Some(region) => {
                let sum = summed.entry((region, day)).or_default();
                (sum.0, sum.1, sum.2) = (sum.0 + paid, sum.1 + refunded, sum.2 + orders);
            }
            None => looked_up.push((order, format_day(day), paid, refunded, orders)),
        }
    }
    let (revenue, regions) = (t.get("revenue"), t.get("revenue_order_regions"));
    // Elements of the JSON array parameter, and field `i` of one of them.
    let (elements, as_number) = match dialect {
        Dialect::Sqlite => ("json_each($1) AS e", ""),
        Dialect::Postgres => (
            "json_array_elements($1::text::json) AS e(value)",
            "::bigint",
        ),
    };
    let field = |i: usize| format!("e.value ->> {i}");
    let number = |i: usize| format!("(e.value ->> {i}){as_number}");
    let add_up = "ON CONFLICT (region, day) DO UPDATE SET
                     paid_cents = r.paid_cents + excluded.paid_cents,
                     refunded_cents = r.refunded_cents + excluded.refunded_cents,
                     paid_orders = r.paid_orders + excluded.paid_orders";
    let mut statements = Vec::new();
    if !placed.is_empty() {
        statements.push(Statement::new(
            format!(
                "INSERT INTO {regions} (order_id, region)
                 SELECT {}, {} FROM {elements} WHERE true
                 ON CONFLICT (order_id) DO NOTHING",
                field(0),
                field(1)
            ),
            vec![to_json(&placed)?.into()],
        ));
    }
    if !summed.is_empty() {
        let rows: Vec<(&str, String, u64, u64, u64)> = summed
            .iter()
            .map(|((region, day), (p, r, o))| {
                let region = regions_seen.names[*region as usize].as_str();
                (region, format_day(*day), *p, *r, *o)
            })
            .collect();
        statements.push(Statement::new(
            format!(
                "INSERT INTO {revenue} AS r (region, day, paid_cents, refunded_cents, paid_orders)
                 SELECT {}, {}, {}, {}, {} FROM {elements} WHERE true
                 {add_up}",
                field(0),
                field(1),
                number(2),
                number(3),
                number(4),
            ),
            vec![to_json(&rows)?.into()],
        ));
    }
    if !looked_up.is_empty() {
        // The region is looked up per element (by the primary key), not
        // joined: a join would let PostgreSQL scan the whole regions table
        // for every batch.
        statements.push(Statement::new(
            format!(
                "INSERT INTO {revenue} AS r (region, day, paid_cents, refunded_cents, paid_orders)
                 SELECT region, day, sum(paid), sum(refunded), sum(orders)
                 FROM (SELECT (SELECT o.region FROM {regions} o WHERE o.order_id = {order}) AS region,
                              {day} AS day, {paid} AS paid, {refunded} AS refunded, {orders} AS orders
                       FROM {elements}) AS m
                 WHERE region IS NOT NULL
                 GROUP BY region, day
                 {add_up}",
                day = field(1),
                order = field(0),
                paid = number(2),
                refunded = number(3),
                orders = number(4),
            ),
            vec![to_json(&looked_up)?.into()],
        ));
    }
    Ok(statements)
}

/// One field of an order event's data as upcast to the current shape,
/// looked up by name rather than by decoding the whole event.
fn field<T: serde::de::DeserializeOwned>(
    event: &RecordedEvent,
    name: &str,
) -> Result<T, ApplyError> {
    let refused =
        |e: String| ApplyError::new(format!("{} at {}: {e}", event.event_type, event.position));
    let stored = event.data.to_value().map_err(|e| refused(e.to_string()))?;
    let data = crate::order::ORDER_UPCASTERS
        .upcast(&event.event_type, event.metadata.schema_version, &stored)
        .map_err(|e| refused(e.to_string()))?;
    let value = data
        .get(name)
        .ok_or_else(|| refused(format!("missing field `{name}`")))?;
    T::deserialize(value).map_err(|e| refused(format!("field `{name}`: {e}")))
}

fn to_json(value: &impl serde::Serialize) -> Result<String, ApplyError> {
    serde_json::to_string(value).map_err(|e| ApplyError::new(e.to_string()))
}

/// Per customer: name, region, orders placed, cents paid and refunded.
pub struct CustomerTotals;

impl SqlProjection for CustomerTotals {
    fn name(&self) -> &str {
        "customer_totals"
    }
    fn tables(&self) -> &[&str] {
        &["customer_totals", "customer_orders"]
    }
    fn create_tables(&self, t: &Tables) -> Vec<String> {
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     customer_id    TEXT   PRIMARY KEY,
                     name           TEXT   NOT NULL,
                     region         TEXT   NOT NULL,
                     orders         BIGINT NOT NULL,
                     paid_cents     BIGINT NOT NULL,
                     refunded_cents BIGINT NOT NULL
                 )",
                t.get("customer_totals")
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL)",
                t.get("customer_orders")
            ),
        ]
    }
    fn statements(
        &mut self,
        t: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        let (totals, owners) = (t.get("customer_totals"), t.get("customer_orders"));
        // A customer row may start from an order placed before (or without)
        // the registration: name and region fill in when it comes.
        let upsert = |customer: &str, name: &str, region: &str| {
            Statement::new(
                format!(
                    "INSERT INTO {totals} AS c (customer_id, name, region, orders, paid_cents, refunded_cents)
                     VALUES ($1, $2, $3, 0, 0, 0)
                     ON CONFLICT (customer_id) DO UPDATE SET
                         name = CASE WHEN excluded.name = '' THEN c.name ELSE excluded.name END,
                         region = CASE WHEN excluded.region = '' THEN c.region ELSE excluded.region END"
                ),
                vec![customer.into(), name.into(), region.into()],
            )
        };
        let owner_gets = |column: &str, cents: u64| {
            Statement::new(
                format!(
                    "UPDATE {totals} SET {column} = {column} + $2
                     WHERE customer_id = (SELECT customer_id FROM {owners} WHERE order_id = $1)"
                ),
                vec![order_id(event).into(), cents.into()],
            )
        };
        if let Some(customer) = customer_event(event)? {
            let id = order_id(event);
            return Ok(vec![match customer {
                CustomerEvent::CustomerRegistered { name, region } => upsert(&id, &name, &region),
                CustomerEvent::CustomerRelocated { to, .. } => upsert(&id, "", &to),
            }]);
        }
        Ok(match order_event(event)? {
            Some(OrderEvent::OrderPlaced { customer_id, .. }) => vec![
                Statement::new(
                    format!(
                        "INSERT INTO {owners} (order_id, customer_id) VALUES ($1, $2)
                         ON CONFLICT (order_id) DO NOTHING"
                    ),
                    vec![order_id(event).into(), customer_id.clone().into()],
                ),
                upsert(&customer_id, "", ""),
                Statement::new(
                    format!("UPDATE {totals} SET orders = orders + 1 WHERE customer_id = $1"),
                    vec![customer_id.into()],
                ),
            ],
            Some(OrderEvent::OrderPaid { amount_cents, .. }) => {
                vec![owner_gets("paid_cents", amount_cents)]
            }
            Some(OrderEvent::OrderCancelled { refund_cents, .. }) if refund_cents > 0 => {
                vec![owner_gets("refunded_cents", refund_cents)]
            }
            _ => Vec::new(),
        })
    }
}

/// What the demo shows from the read models.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Orders per status.
    pub statuses: Vec<(String, i64)>,
    /// Paid minus refunded cents per region.
    pub net_revenue: Vec<(String, i64)>,
    /// The customers who paid most: (customer, name, net cents).
    pub top_customers: Vec<(String, String, i64)>,
    /// Paid minus refunded cents per region and day, for the last
    /// [`CHART_DAYS`] days: (day, region, net cents), by day then region.
    pub revenue_by_day: Vec<(String, String, i64)>,
}

/// How many days the summary's revenue per day covers.
pub const CHART_DAYS: i64 = 14;

/// The first day of the summary's revenue per day, `YYYY-MM-DD`.
fn chart_start() -> String {
    format_day((chrono::Utc::now() - chrono::Duration::days(CHART_DAYS - 1)).date_naive())
}

/// The summary's queries, against the views in `prefix` (`""` or
/// `"schema."`); the last one takes the first day as its parameter.
fn summary_queries(prefix: &str) -> [String; 4] {
    [
        format!("SELECT status, count(*) FROM {prefix}orders GROUP BY status ORDER BY status"),
        format!(
            "SELECT region, sum(paid_cents - refunded_cents) FROM {prefix}revenue
             GROUP BY region ORDER BY region"
        ),
        format!(
            "SELECT customer_id, name, paid_cents - refunded_cents FROM {prefix}customer_totals
             ORDER BY paid_cents - refunded_cents DESC, customer_id LIMIT 3"
        ),
        format!(
            "SELECT day, region, paid_cents - refunded_cents FROM {prefix}revenue
             WHERE day >= $1 ORDER BY day, region"
        ),
    ]
}

/// The summary from read models in a SQLite file.
pub fn summary_sqlite(path: &std::path::Path) -> rusqlite::Result<Summary> {
    let conn = rusqlite::Connection::open(path)?;
    let [statuses, revenue, top, by_day] = summary_queries("");
    let pairs = |sql: &str| -> rusqlite::Result<Vec<(String, i64)>> {
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    let mut stmt = conn.prepare(&top)?;
    let top_customers = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(&by_day)?;
    let revenue_by_day = stmt
        .query_map([chart_start()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(Summary {
        statuses: pairs(&statuses)?,
        net_revenue: pairs(&revenue)?,
        top_customers,
        revenue_by_day,
    })
}

/// The summary from read models in a PostgreSQL schema.
pub async fn summary_postgres(url: &str, schema: &str) -> Result<Summary, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let [statuses, revenue, top, by_day] = summary_queries(&format!("{schema}."));
    let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64)> {
        rows.iter()
            .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0)))
            .collect()
    };
    // sum() of bigint is numeric in PostgreSQL: cast back for the client.
    let revenue = revenue.replace(
        "sum(paid_cents - refunded_cents)",
        "sum(paid_cents - refunded_cents)::bigint",
    );
    Ok(Summary {
        statuses: pairs(client.query(&statuses, &[]).await?),
        net_revenue: pairs(client.query(&revenue, &[]).await?),
        top_customers: client
            .query(&top, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
        revenue_by_day: client
            .query(&by_day, &[&chart_start()])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect(),
    })
}
