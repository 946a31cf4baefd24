//! `factline bench dashboard` (D2): the dashboard's question "revenue per
//! region for the last 7 days", answered (a) by aggregating the event
//! table live with SQL and (b) by reading the revenue projection, with a
//! long history stored and a steady write load running, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use factline::{EventStore, ExpectedVersion, Location, StreamId};
use factline_orders::history;
use factline_orders::read_models::RevenueByRegionDay;
use factline_orders::OrderEvent;
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqliteSink};
use tokio::sync::watch;

use crate::bench::{percentile_ms, postgres_url, round, Backend, BENCH_SCHEMA};
use crate::usage;

#[derive(Args, Debug)]
pub struct DashboardBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Events stored before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Times each way of answering is asked (alternating).
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Orders per second written while the questions are asked (each is
    /// two appends: placed, then paid).
    #[arg(long, default_value_t = 100)]
    rate: u64,
}

/// The last line of `bench dashboard`, a contract for scripts.
#[derive(serde::Serialize)]
struct DashboardReport {
    bench: &'static str,
    backend: &'static str,
    events: u64,
    /// (a) aggregating the event table live with SQL.
    live_sql_p50_ms: f64,
    live_sql_p99_ms: f64,
    /// (b) reading the projection.
    projection_p50_ms: f64,
    projection_p99_ms: f64,
    /// p99 of (a) ÷ p99 of (b).
    ratio: f64,
    /// Orders per second written meanwhile, and how many were.
    write_rate: u64,
    orders_written: u64,
    samples: usize,
}

/// The two answers, per database.
enum Queries {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

/// Revenue per region over the last 7 days from the events: each payment
/// or refund joined to its order's placement for the region. Orders
/// written in `OrderPlaced`'s v1 shape carry no region and count under
/// none, as a query on raw events does.
const LIVE_SQLITE: &str = "
    SELECT json_extract(p.data, '$.region') AS region,
           sum(CASE e.event_type WHEN 'OrderPaid' THEN json_extract(e.data, '$.amount_cents')
                                 ELSE -json_extract(e.data, '$.refund_cents') END)
    FROM events e JOIN events p ON p.stream_no = e.stream_no AND p.version = 1
    WHERE e.category = 'Order' AND e.event_type IN ('OrderPaid', 'OrderCancelled')
      AND e.recorded_at >= ?1
    GROUP BY region ORDER BY region";

const PROJECTION_SQLITE: &str = "
    SELECT region, sum(paid_cents - refunded_cents) FROM revenue
    WHERE day >= ?1 GROUP BY region ORDER BY region";

fn live_postgres() -> String {
    format!(
        "SELECT p.data->>'region' AS region,
                sum(CASE e.event_type WHEN 'OrderPaid' THEN (e.data->>'amount_cents')::bigint
                                      ELSE -(e.data->>'refund_cents')::bigint END)::bigint
         FROM {s}.events e JOIN {s}.events p ON p.stream_no = e.stream_no AND p.version = 1
         WHERE e.category = 'Order' AND e.event_type IN ('OrderPaid', 'OrderCancelled')
           AND e.recorded_at >= now() - interval '7 days'
         GROUP BY region ORDER BY region",
        s = BENCH_SCHEMA
    )
}

fn projection_postgres() -> String {
    format!(
        "SELECT region, sum(paid_cents - refunded_cents)::bigint FROM {}.revenue
         WHERE day >= $1 GROUP BY region ORDER BY region",
        BENCH_SCHEMA
    )
}

fn week_ago() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::days(7)
}

fn first_day() -> String {
    (week_ago() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string()
}

type Answer = Vec<(Option<String>, i64)>;

impl Queries {
    /// Times one answer; `live` picks (a), else (b).
    async fn ask(&mut self, live: bool) -> anyhow::Result<(Duration, Answer)> {
        let started = Instant::now();
        let answer = match self {
            Queries::Sqlite(conn) => {
                let (sql, param): (&str, rusqlite::types::Value) = if live {
                    (LIVE_SQLITE, week_ago().timestamp_micros().into())
                } else {
                    (PROJECTION_SQLITE, first_day().into())
                };
                // The connection is this bench's alone; blocking in place
                // keeps the timing free of a thread hand-over.
                let mut stmt = conn.prepare_cached(sql)?;
                let rows = stmt.query_map([param], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<Answer, _>>()?
            }
            Queries::Postgres(client) => {
                let rows = if live {
                    client.query(&live_postgres(), &[]).await?
                } else {
                    client
                        .query(&projection_postgres(), &[&first_day()])
                        .await?
                };
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            }
        };
        Ok((started.elapsed(), answer))
    }
}

pub async fn run(args: DashboardBench, location: &Location) -> anyhow::Result<()> {
    if args.events == 0 || args.samples == 0 || args.rate == 0 {
        return Err(usage("--events, --samples and --rate must be at least 1"));
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("factline.db");
    if args.backend == Backend::Memory {
        return Err(usage(
            "bench dashboard compares SQL queries: --backend sqlite or postgres",
        ));
    }
    let store = crate::bench::fresh_store(args.backend, location, dir.path()).await?;
    let head = crate::bench::fill_history(&store, args.events, "dashboard", args.backend).await?;

    let (stop, stopped) = watch::channel(false);
    let (projection, mut queries) = match args.backend {
        Backend::Postgres => {
            let url = postgres_url(location)?;
            let sink =
                PostgresSink::connect(url, BENCH_SCHEMA, Portable::new(RevenueByRegionDay::new()))
                    .await?;
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            (
                follow(&store, sink, stopped.clone()).await?,
                Queries::Postgres(client),
            )
        }
        _ => {
            let sink = SqliteSink::open(&path, Portable::new(RevenueByRegionDay::new()))?;
            let projection = follow(&store, sink, stopped.clone()).await?;
            (
                projection,
                Queries::Sqlite(rusqlite::Connection::open(&path)?),
            )
        }
    };
    println!(
        "  the revenue projection caught up; writing {} orders/s while asking",
        args.rate
    );
    let writer = tokio::spawn(write_load(store.clone(), args.rate, stopped.clone()));

    // The same question both ways, alternating, so both share the load
    // and the machine's noise.
    let (mut live, mut read) = (Vec::new(), Vec::new());
    let mut answers = (Answer::new(), Answer::new());
    for _ in 0..args.samples {
        let (took, answer) = queries.ask(true).await?;
        live.push(took);
        answers.0 = answer;
        let (took, answer) = queries.ask(false).await?;
        read.push(took);
        answers.1 = answer;
    }
    stop.send_replace(true);
    let orders_written = writer.await??;
    projection.await??;
    live.sort_unstable();
    read.sort_unstable();
    let report = DashboardReport {
        bench: "dashboard",
        backend: args.backend.name(),
        events: head,
        live_sql_p50_ms: percentile_ms(&live, 0.5),
        live_sql_p99_ms: percentile_ms(&live, 0.99),
        projection_p50_ms: percentile_ms(&read, 0.5),
        projection_p99_ms: percentile_ms(&read, 0.99),
        ratio: round(percentile_ms(&live, 0.99) / percentile_ms(&read, 0.99).max(0.001)),
        write_rate: args.rate,
        orders_written,
        samples: args.samples,
    };
    let region_total = |a: &Answer| a.iter().map(|(_, c)| c).sum::<i64>();
    println!(
        "  live SQL: p50 {:.2} ms  p99 {:.2} ms (total {} cents)   projection: p50 {:.3} ms  p99 {:.3} ms (total {} cents)   ratio {:.0}",
        report.live_sql_p50_ms,
        report.live_sql_p99_ms,
        region_total(&answers.0),
        report.projection_p50_ms,
        report.projection_p99_ms,
        region_total(&answers.1),
        report.ratio
    );
    if let Backend::Postgres = args.backend {
        drop(queries);
        drop(store);
        factline::postgres::baseline::drop_schema(postgres_url(location)?, BENCH_SCHEMA).await?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Catches the projection up on the history, then keeps it following
/// live until `stop`.
async fn follow<S: Sink + 'static>(
    store: &Arc<dyn EventStore>,
    sink: S,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut runner =
        Runner::new(store.clone(), sink).with_policy(factline_projections::BatchPolicy::rebuild());
    runner.catch_up(u64::MAX).await?;
    let mut runner = runner.with_policy(factline_projections::BatchPolicy::default());
    Ok(tokio::spawn(async move {
        runner.run(stop).await?;
        Ok(())
    }))
}

/// Places and pays `rate` orders per second until `stop`.
async fn write_load(
    store: Arc<dyn EventStore>,
    rate: u64,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut n = 0u64;
    while !*stop.borrow() {
        tokio::time::sleep_until(started + interval * n as u32).await;
        let stream = StreamId::new(format!("Order-load-{n}"))?;
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![history::placed(n, 5_000)?],
            )
            .await?;
        let paid = factline_aggregate::DomainEvent::to_event_data(
            &OrderEvent::OrderPaid {
                amount_cents: 2_500,
                method: "card".into(),
            },
            factline::Metadata::default(),
        )?;
        store
            .append(&stream, ExpectedVersion::Exact(1), vec![paid])
            .await?;
        n += 1;
    }
    Ok(n)
}
