//! `factline bench`: measurements reported against a baseline measured in
//! the same run, so figures from a shared, noisy machine stay comparable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use factline::postgres::{baseline as pg_baseline, PostgresConfig, PostgresStore};
use factline::sqlite::{baseline, SqliteConfig, SqliteStore, Synchronous};
use factline::{
    EventData, EventStore, ExpectedVersion, InMemoryStore, JsonText, Location, StreamId,
};
use serde_json::json;

use crate::usage;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Append throughput and latency against plain inserts on the same database.
    Append(AppendBench),
    /// Latency from append to a live subscriber under a steady load.
    Latency(LatencyBench),
    /// Loading a long-lived aggregate with and without snapshots.
    Load(crate::load_bench::LoadBench),
    /// Rebuilding a read model against a plain read; append-to-visible latency.
    Projections(crate::projection_bench::ProjectionsBench),
    /// The outbox relay into JetStream against a plain JetStream publisher;
    /// append-to-consumer latency.
    Outbox(crate::outbox_bench::OutboxBench),
    /// "Revenue per region for the last 7 days" by a live GROUP BY on the
    /// event table against reading the projection, under write load.
    Dashboard(crate::dashboard_bench::DashboardBench),
    /// The HTTP server under load: concurrent appending clients and SSE
    /// subscribers on $all, on loopback.
    Http(crate::http_bench::HttpBench),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Sqlite,
    Memory,
    /// The server `--db postgres://…` names; the bench works in schemas of its own.
    Postgres,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Memory => "memory",
            Backend::Postgres => "postgres",
        }
    }
}

/// The schemas the PostgreSQL benches create and drop again.
pub(crate) const BENCH_SCHEMA: &str = "factline_bench";
const BASELINE_SCHEMA: &str = "factline_bench_baseline";

/// A fresh store of `backend` for a bench: a SQLite file in `dir`, a new
/// in-memory store, or the bench schema (emptied) of the PostgreSQL
/// server at `location`.
pub(crate) async fn fresh_store(
    backend: Backend,
    location: &Location,
    dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn EventStore>> {
    Ok(match backend {
        Backend::Sqlite => Arc::new(SqliteStore::open_with(SqliteConfig::new(
            dir.join("factline.db"),
        ))?),
        Backend::Memory => Arc::new(InMemoryStore::new()),
        Backend::Postgres => Arc::new(fresh_postgres_store(postgres_url(location)?).await?),
    })
}

/// Fills `store` with an orders history of at least `events` events (32
/// writers), says so under the bench's name, and returns the head.
pub(crate) async fn fill_history(
    store: &Arc<dyn EventStore>,
    events: u64,
    bench: &str,
    backend: Backend,
) -> anyhow::Result<u64> {
    let built = std::time::Instant::now();
    factline_orders::history::fill(
        store.clone(),
        factline_orders::history::HistoryConfig {
            events,
            writers: 32,
        },
    )
    .await?;
    let head = store.head_position().await?;
    println!(
        "factline bench {bench}: {}, history of {head} events built in {:.1} s",
        backend.name(),
        built.elapsed().as_secs_f64()
    );
    Ok(head)
}

/// The PostgreSQL URL a bench runs against.
pub(crate) fn postgres_url(location: &Location) -> anyhow::Result<&str> {
    match location {
        Location::Postgres(url) => Ok(url),
        _ => Err(usage(
            "--backend postgres needs --db postgres://… naming a server to measure",
        )),
    }
}

#[derive(Args, Debug)]
pub struct AppendBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Events per append.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Events in total.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// SQLite synchronous mode for both factline and the baseline: full, normal
    /// or off. (PostgreSQL's durability is the server's own setting.)
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// Longest the baseline may run per round; it stops early and reports its rate.
    #[arg(long, default_value_t = 10)]
    baseline_seconds: u64,
    /// Rounds of factline and baseline, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(bench: Bench, location: &Location) -> anyhow::Result<()> {
    match bench {
        Bench::Append(args) => append(args, location).await,
        Bench::Latency(args) => latency(args, location).await,
        Bench::Load(args) => crate::load_bench::run(args, location).await,
        Bench::Projections(args) => crate::projection_bench::run(args, location).await,
        Bench::Outbox(args) => crate::outbox_bench::run(args, location).await,
        Bench::Dashboard(args) => crate::dashboard_bench::run(args, location).await,
        Bench::Http(args) => crate::http_bench::run(args, location).await,
    }
}

/// About 200 bytes of JSON, like a typical small domain event.
fn payload() -> serde_json::Value {
    json!({
        "order_id": "7f3a9c2e-4b1d-4e8a-9f6b-2c5d8e1a3b7f",
        "customer_id": "c-0042",
        "region": "eu-west",
        "amount_cents": 129_900,
        "currency": "EUR",
        "lines": [{ "sku": "SKU-1001", "qty": 2 }, { "sku": "SKU-2002", "qty": 1 }],
        "note": "deliver to the back door"
    })
}

/// One measured run of factline's appends.
struct FactlineRun {
    elapsed: Duration,
    latencies: Vec<Duration>,
    transactions: Option<(u64, u64)>,
}

async fn append(args: AppendBench, location: &Location) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch == 0 || args.events == 0 || args.rounds == 0 {
        return Err(usage(
            "--writers, --batch, --events and --rounds must be at least 1",
        ));
    }
    let synchronous: Synchronous = args.synchronous.parse().map_err(usage)?;
    let pg_url = match args.backend {
        Backend::Postgres => Some(postgres_url(location)?),
        _ => None,
    };
    let data = payload();
    let data_text = serde_json::to_string(&data)?;
    let budget = Duration::from_secs(args.baseline_seconds.max(1));
    // Rounds alternate factline and the baseline, each on a fresh database
    // (or schema), and the medians are reported: a noisy neighbour then
    // skews one round of one side, not the comparison.
    let mut runs = Vec::new();
    let mut bases = Vec::new();
    let mut baseline_name = "rusqlite, same rows and batches";
    for _ in 0..args.rounds {
        match pg_url {
            Some(url) => {
                runs.push(run_factline_postgres(&args, &data, url).await?);
                // The plain way to write these rows with the same number of
                // connections: a row per transaction for single appends, a
                // multi-row INSERT or a COPY per batch otherwise; whichever
                // of the two is faster is the baseline.
                let (events, writers, batch) = (args.events, args.writers, args.batch as u64);
                let run = |method| {
                    pg_baseline::insert_rows(
                        url,
                        BASELINE_SCHEMA,
                        method,
                        writers,
                        batch,
                        events,
                        &data_text,
                        budget,
                    )
                };
                let best = if batch == 1 {
                    baseline_name = "one-row INSERT per transaction";
                    run(pg_baseline::Method::RowPerTransaction).await?
                } else {
                    let insert = run(pg_baseline::Method::MultiRowInsert).await?;
                    let copy = run(pg_baseline::Method::Copy).await?;
                    if rate_of(&copy) > rate_of(&insert) {
                        baseline_name = "COPY per batch";
                        copy
                    } else {
                        baseline_name = "multi-row INSERT per batch";
                        insert
                    }
                };
                bases.push(best);
            }
            None => {
                let dir = tempfile::tempdir()?;
                runs.push(run_factline(&args, synchronous, &data, dir.path()).await?);
                let baseline_path = dir.path().join("baseline.db");
                let (events, batch, text) = (args.events, args.batch as u64, data_text.clone());
                let run = tokio::task::spawn_blocking(move || {
                    baseline::insert_rows(&baseline_path, synchronous, &text, events, batch, budget)
                })
                .await??;
                bases.push(pg_baseline::BaselineRun {
                    events: run.events,
                    elapsed: run.elapsed,
                });
            }
        }
    }
    let mut rates: Vec<f64> = runs
        .iter()
        .map(|r| args.events as f64 / r.elapsed.as_secs_f64())
        .collect();
    let mut base_rates: Vec<f64> = bases
        .iter()
        .map(|b| b.events as f64 / b.elapsed.as_secs_f64())
        .collect();
    let rate = median(&mut rates);
    let base_rate = median(&mut base_rates);
    let mut latencies: Vec<Duration> = runs
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let p50 = percentile_ms(&latencies, 0.50);
    let p99 = percentile_ms(&latencies, 0.99);
    let backend = args.backend.name();
    let durability = match args.backend {
        Backend::Postgres => "the server's durability settings".to_string(),
        _ => format!("synchronous={}", args.synchronous),
    };
    println!(
        "factline bench append: {backend}, {durability}, {} rounds",
        args.rounds
    );
    println!(
        "  writers {:>6}   batch {:>6}   events {:>9}",
        args.writers, args.batch, args.events
    );
    for (i, (run, base)) in runs.iter().zip(&bases).enumerate() {
        let group = run
            .transactions
            .map_or(String::new(), |(appends, transactions)| {
                format!(
                    "   {:.1} appends per transaction",
                    appends as f64 / transactions.max(1) as f64
                )
            });
        println!(
            "  round {}: factline {:>9.0} events/s   baseline {:>9.0} events/s ({} events){group}",
            i + 1,
            args.events as f64 / run.elapsed.as_secs_f64(),
            base.events as f64 / base.elapsed.as_secs_f64(),
            base.events,
        );
    }
    println!(
        "  median: factline {rate:.0} events/s, baseline ({baseline_name}) {base_rate:.0} events/s"
    );
    println!(
        "  ratio {:.3}   append latency p50 {p50:.3} ms   p99 {p99:.3} ms",
        rate / base_rate
    );
    let report = AppendReport {
        bench: "append",
        events_per_s: round(rate),
        baseline_events_per_s: round(base_rate),
        ratio: thousandths(rate / base_rate),
        p50_ms: p50,
        p99_ms: p99,
        backend,
        writers: args.writers,
        batch: args.batch,
        events: args.events,
        rounds: args.rounds,
        baseline: baseline_name,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn rate_of(run: &pg_baseline::BaselineRun) -> f64 {
    run.events as f64 / run.elapsed.as_secs_f64()
}

/// The last line of `bench append`, a contract for scripts.
#[derive(serde::Serialize)]
struct AppendReport {
    bench: &'static str,
    events_per_s: f64,
    baseline_events_per_s: f64,
    ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    backend: &'static str,
    writers: usize,
    batch: usize,
    events: u64,
    rounds: usize,
    /// How the baseline wrote its rows.
    baseline: &'static str,
}

async fn run_factline(
    args: &AppendBench,
    synchronous: Synchronous,
    data: &serde_json::Value,
    dir: &std::path::Path,
) -> anyhow::Result<FactlineRun> {
    match args.backend {
        Backend::Sqlite => {
            let mut config = SqliteConfig::new(dir.join("factline.db"));
            config.synchronous = synchronous;
            let store = SqliteStore::open_with(config)?;
            let mut run = drive_appends(args, data, Arc::new(store.clone())).await?;
            let stats = store.stats();
            run.transactions = Some((stats.appends, stats.transactions));
            Ok(run)
        }
        _ => drive_appends(args, data, Arc::new(InMemoryStore::new())).await,
    }
}

/// factline on PostgreSQL, in a schema of its own made afresh.
async fn run_factline_postgres(
    args: &AppendBench,
    data: &serde_json::Value,
    url: &str,
) -> anyhow::Result<FactlineRun> {
    let store = fresh_postgres_store(url).await?;
    // Both sides start from a checkpoint (the baseline does the same).
    pg_baseline::checkpoint(url).await?;
    let mut run = drive_appends(args, data, Arc::new(store.clone())).await?;
    let stats = store.stats();
    run.transactions = Some((stats.appends, stats.transactions));
    drop(store);
    pg_baseline::drop_schema(url, BENCH_SCHEMA).await?;
    Ok(run)
}

pub(crate) async fn fresh_postgres_store(url: &str) -> anyhow::Result<PostgresStore> {
    pg_baseline::drop_schema(url, BENCH_SCHEMA).await?;
    let mut config = PostgresConfig::new(url);
    config.schema = BENCH_SCHEMA.to_string();
    Ok(PostgresStore::connect_with(config).await?)
}

/// Runs the appends of one round and times them.
async fn drive_appends(
    args: &AppendBench,
    data: &serde_json::Value,
    store: Arc<dyn EventStore>,
) -> anyhow::Result<FactlineRun> {
    let appends = args.events.div_ceil(args.batch as u64);
    let (batch, writers) = (args.batch as u64, args.writers as u64);
    // Each writer takes every `writers`-th append; a stream gets ten appends,
    // with exact expected versions, before the next one. The payloads are
    // built before the clock starts: making them is the caller's work.
    let data = JsonText::from(data);
    let mut plans = Vec::new();
    for writer in 0..writers {
        let mut plan = Vec::new();
        let mut version = 0u64;
        for (nth, k) in (writer..appends).step_by(writers as usize).enumerate() {
            if nth % 10 == 0 {
                version = 0;
            }
            let stream = StreamId::new(format!("Bench-{writer}-{}", nth / 10))?;
            let n = batch.min(args.events - k * batch);
            let events: Vec<EventData> = (0..n)
                .map(|_| EventData::new("BenchEvent", data.clone()))
                .collect();
            plan.push((stream, ExpectedVersion::Exact(version), events));
            version += n;
        }
        plans.push(plan);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for plan in plans {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(plan.len());
            for (stream, expected, mut events) in plan {
                // Ids are made at append time, as a client would: v7 ids
                // then arrive in time order, like in production.
                for event in &mut events {
                    event.event_id = factline::new_event_id();
                }
                let t = Instant::now();
                store.append(&stream, expected, events).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(appends as usize);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let appended = store.head_position().await?;
    anyhow::ensure!(
        appended == args.events,
        "the store holds {appended} events, expected {}",
        args.events
    );
    Ok(FactlineRun {
        elapsed,
        latencies,
        transactions: None,
    })
}

/// The middle value, or the mean of the two middle ones (an even count of
/// rounds that alternate their order would otherwise favour one order).
pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 0 && middle > 0 {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

pub(crate) fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn thousandths(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[index].as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[derive(Args, Debug)]
pub struct LatencyBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Events per second the load generator appends, one event per append.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// How long the load runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Most appends in flight at once; the load generator waits beyond it.
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
}

/// The last line of `bench latency`, a contract for scripts.
#[derive(serde::Serialize)]
struct LatencyReport {
    bench: &'static str,
    backend: &'static str,
    rate: u64,
    seconds: u64,
    events: u64,
    achieved_events_per_s: f64,
    /// From calling append to the subscriber receiving the event.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    append_p50_ms: f64,
    append_p99_ms: f64,
    /// How the subscriber learns of commits.
    subscriber: &'static str,
}

/// An open-loop load (appends are started on a clock, not when the previous
/// one returns) and one subscriber following `$all`. Each event carries the
/// time its append started; the subscriber measures how long it took to
/// arrive.
async fn latency(args: LatencyBench, location: &Location) -> anyhow::Result<()> {
    if args.rate == 0 || args.seconds == 0 || args.max_in_flight == 0 {
        return Err(usage(
            "--rate, --seconds and --max-in-flight must be at least 1",
        ));
    }
    let dir = tempfile::tempdir()?;
    let (store, follower, subscriber): (Arc<dyn EventStore>, Arc<dyn EventStore>, &str) =
        match args.backend {
            Backend::Postgres => {
                let url = postgres_url(location)?;
                let store = fresh_postgres_store(url).await?;
                let mut config = PostgresConfig::new(url);
                config.schema = BENCH_SCHEMA.to_string();
                // A second store, as another process would have: its
                // subscriber is woken by LISTEN/NOTIFY alone.
                let follower = PostgresStore::connect_with(config).await?;
                (
                    Arc::new(store),
                    Arc::new(follower),
                    "another store (LISTEN/NOTIFY)",
                )
            }
            Backend::Sqlite => {
                let store: Arc<dyn EventStore> =
                    Arc::new(SqliteStore::open(dir.path().join("factline.db"))?);
                (store.clone(), store, "the same store (in-process wake-up)")
            }
            Backend::Memory => {
                let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
                (store.clone(), store, "the same store (in-process wake-up)")
            }
        };
    let total = args.rate * args.seconds;
    let start_position = store.head_position().await? + 1;
    let mut sub = follower.subscribe(factline::StreamFilter::All, start_position);
    let clock = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut delays = Vec::with_capacity(total as usize);
        while (delays.len() as u64) < total {
            let event = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .map_err(|_| anyhow::anyhow!("the subscriber received nothing for 30 s"))??;
            let sent =
                Duration::from_nanos(event.data.to_value()?["sent_ns"].as_u64().unwrap_or(0));
            delays.push(clock.elapsed().saturating_sub(sent));
        }
        anyhow::Ok(delays)
    });

    let slots = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight));
    let mut appends = Vec::with_capacity(total as usize);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    for n in 0..total {
        tokio::time::sleep_until((clock + interval.mul_f64(n as f64)).into()).await;
        let permit = slots.clone().acquire_owned().await?;
        let store = store.clone();
        appends.push(tokio::spawn(async move {
            let sent = clock.elapsed();
            let event = EventData::new(
                "LatencyProbe",
                json!({ "sent_ns": sent.as_nanos() as u64, "n": n }),
            );
            let stream = StreamId::new(format!("Latency-{}", n % 64))?;
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await?;
            drop(permit);
            anyhow::Ok(clock.elapsed() - sent)
        }));
    }
    let mut append_latencies = Vec::with_capacity(appends.len());
    for append in appends {
        append_latencies.push(append.await??);
    }
    let load_elapsed = clock.elapsed();
    let mut delays = receiving.await??;
    delays.sort_unstable();
    append_latencies.sort_unstable();
    if args.backend == Backend::Postgres {
        drop((store, follower));
        pg_baseline::drop_schema(postgres_url(location)?, BENCH_SCHEMA).await?;
    }
    let report = LatencyReport {
        bench: "latency",
        backend: args.backend.name(),
        rate: args.rate,
        seconds: args.seconds,
        events: total,
        achieved_events_per_s: round(total as f64 / load_elapsed.as_secs_f64()),
        p50_ms: percentile_ms(&delays, 0.50),
        p99_ms: percentile_ms(&delays, 0.99),
        max_ms: percentile_ms(&delays, 1.0),
        append_p50_ms: percentile_ms(&append_latencies, 0.50),
        append_p99_ms: percentile_ms(&append_latencies, 0.99),
        subscriber,
    };
    println!(
        "factline bench latency: {}, {} events/s for {} s, subscriber on {subscriber}",
        report.backend, args.rate, args.seconds
    );
    println!(
        "  achieved {:.0} events/s   append -> subscriber p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        report.achieved_events_per_s, report.p50_ms, report.p99_ms, report.max_ms
    );
    println!(
        "  append p50 {:.3} ms   p99 {:.3} ms",
        report.append_p50_ms, report.append_p99_ms
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [5.0]), 5.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
