//! `factline bench dashboard` (D2): the dashboard's question "revenue per
//! region for the last 7 days", answered (a) by aggregating the event
//! table live with SQL and (b) by reading the revenue projection, with a
//! long history stored and a steady write load running, in the same run.
//! With `--declared`, (b) is the demo's declared revenue read model asked
//! over HTTP through the query API, as a client in any language asks it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use factline::{EventStore, ExpectedVersion, Location, StreamId};
use factline_orders::history;
use factline_orders::read_models::RevenueByRegionDay;
use factline_orders::OrderEvent;
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqlProjection, SqliteSink};
use factline_read_models::Definitions;
use tokio::sync::watch;

use crate::admin_api::{CatalogAdmin, DeclaredReadModels};
use crate::bench::{percentile_ms, postgres_url, round, Backend, BENCH_SCHEMA};
use crate::catalog::{Catalog, ReadModelDb};
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
    /// Answer (b) from the demo's declared revenue read model, asked over
    /// HTTP (`GET /read-models/revenue/queries/net_revenue_by_region_since`),
    /// instead of the Rust one read with SQL.
    #[arg(long)]
    declared: bool,
}

/// The declared read model and the query (b) asks with `--declared`.
const DECLARED: (&str, &str) = ("revenue", "net_revenue_by_region_since");

/// The last line of `bench dashboard`, a contract for scripts.
#[derive(serde::Serialize)]
struct DashboardReport {
    bench: &'static str,
    backend: &'static str,
    events: u64,
    /// (a) aggregating the event table live with SQL.
    live_sql_p50_ms: f64,
    live_sql_p99_ms: f64,
    /// (b) reading the projection: with SQL, or (declared) over HTTP.
    projection_p50_ms: f64,
    projection_p99_ms: f64,
    /// p99 of (a) ÷ p99 of (b).
    ratio: f64,
    /// Orders per second written meanwhile, and how many were.
    write_rate: u64,
    orders_written: u64,
    samples: usize,
    /// Whether (b) is the declared read model asked over HTTP.
    declared: bool,
    /// The net cents of the last answer each way (the writes go on
    /// between them, so they differ by a few orders).
    live_sql_total_cents: i64,
    projection_total_cents: i64,
}

/// The two answers: per database, and (b) over HTTP when declared.
struct Queries {
    db: Db,
    /// The client and URL of the declared read model's query.
    http: Option<(reqwest::Client, String)>,
}

enum Db {
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
        if let (false, Some((client, url))) = (live, &self.http) {
            let answer = ask_http(client, url).await?;
            return Ok((started.elapsed(), answer));
        }
        let answer = match &mut self.db {
            Db::Sqlite(conn) => {
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
            Db::Postgres(client) => {
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

/// (b) over HTTP: the query's rows, `region` and `net_cents` each.
async fn ask_http(client: &reqwest::Client, url: &str) -> anyhow::Result<Answer> {
    let response = client
        .get(url)
        .query(&[("from", first_day())])
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {body}");
    }
    let rows = body["rows"].as_array().cloned().unwrap_or_default();
    Ok(rows
        .iter()
        .map(|row| {
            let region = row["region"].as_str().map(str::to_owned);
            (region, row["net_cents"].as_i64().unwrap_or(0))
        })
        .collect())
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
    let (projection, db, read_model_db) = match args.backend {
        Backend::Postgres => {
            let url = postgres_url(location)?;
            let sink =
                PostgresSink::connect(url, BENCH_SCHEMA, Portable::new(revenue(args.declared)?))
                    .await?;
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let read_model_db = ReadModelDb::Postgres {
                url: url.to_owned(),
                schema: BENCH_SCHEMA.to_owned(),
            };
            (
                follow(&store, sink, stopped.clone()).await?,
                Db::Postgres(client),
                read_model_db,
            )
        }
        _ => {
            let sink = SqliteSink::open(&path, Portable::new(revenue(args.declared)?))?;
            let projection = follow(&store, sink, stopped.clone()).await?;
            (
                projection,
                Db::Sqlite(rusqlite::Connection::open(&path)?),
                ReadModelDb::Sqlite(path.clone()),
            )
        }
    };
    let (http, server) = match args.declared {
        true => {
            let (client, url, server) =
                serve_declared(&store, read_model_db, stopped.clone()).await?;
            (Some((client, url)), Some(server))
        }
        false => (None, None),
    };
    let mut queries = Queries { db, http };
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
    if let Some(server) = server {
        server.await??;
    }
    live.sort_unstable();
    read.sort_unstable();
    let region_total = |a: &Answer| a.iter().map(|(_, c)| c).sum::<i64>();
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
        declared: args.declared,
        live_sql_total_cents: region_total(&answers.0),
        projection_total_cents: region_total(&answers.1),
    };
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

/// The demo's revenue read model: declared, or written in Rust.
fn revenue(declared: bool) -> anyhow::Result<Box<dyn SqlProjection>> {
    Ok(match declared {
        true => declared_revenue()?.find(DECLARED.0)?,
        false => Box::new(RevenueByRegionDay::new()),
    })
}

/// The catalog of the demo's declared revenue read model alone.
fn declared_revenue() -> anyhow::Result<Catalog> {
    let demo = crate::demo::declared_read_models()?;
    let revenue: Vec<_> = demo
        .read_models()
        .iter()
        .filter(|m| m.name() == DECLARED.0)
        .cloned()
        .collect();
    Catalog::load(None, Definitions::from_read_models(revenue))
}

/// Serves the declared revenue read model's query API on a free port
/// until `stop`: the client and the URL of (b)'s query.
async fn serve_declared(
    store: &Arc<dyn EventStore>,
    db: ReadModelDb,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(
    reqwest::Client,
    String,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let catalog = declared_revenue()?;
    let admin = Arc::new(CatalogAdmin::new(
        catalog.clone(),
        db.clone(),
        store.clone(),
    ));
    let read_models = Arc::new(DeclaredReadModels::new(&catalog, &db, admin)?);
    let server = factline_server::Server::new(store.clone(), Default::default())
        .with_shutdown(stop.clone())
        .with_read_models(read_models);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}/read-models/{}/queries/{}",
        listener.local_addr()?,
        DECLARED.0,
        DECLARED.1
    );
    let served = tokio::spawn(server.serve(listener, factline_server::stopped_by(stop)));
    Ok((reqwest::Client::new(), url, served))
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
