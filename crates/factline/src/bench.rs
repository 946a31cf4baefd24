//! `factline bench`: measurements reported against a baseline measured in
//! the same run, so figures from a shared, noisy machine stay comparable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use factline::sqlite::{baseline, SqliteConfig, SqliteStore, Synchronous};
use factline::{EventData, EventStore, ExpectedVersion, InMemoryStore, StreamId};
use serde_json::json;

use crate::usage;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Append throughput and latency against plain rusqlite inserts.
    Append(AppendBench),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Backend {
    Sqlite,
    Memory,
}

#[derive(Args, Debug)]
pub struct AppendBench {
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
    /// SQLite synchronous mode for both factline and the baseline: full, normal or off.
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// Longest the baseline may run per round; it stops early and reports its rate.
    #[arg(long, default_value_t = 10)]
    baseline_seconds: u64,
    /// Rounds of factline and baseline, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Append(args) => append(args).await,
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

async fn append(args: AppendBench) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch == 0 || args.events == 0 || args.rounds == 0 {
        return Err(usage(
            "--writers, --batch, --events and --rounds must be at least 1",
        ));
    }
    let synchronous: Synchronous = args.synchronous.parse().map_err(usage)?;
    let data = payload();
    let data_text = serde_json::to_string(&data)?;
    // Rounds alternate factline and the baseline, each on a fresh database,
    // and the medians are reported: a noisy neighbour then skews one round
    // of one side, not the comparison.
    let mut runs = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..args.rounds {
        let dir = tempfile::tempdir()?;
        runs.push(run_factline(&args, synchronous, &data, dir.path()).await?);
        let baseline_path = dir.path().join("baseline.db");
        let budget = Duration::from_secs(args.baseline_seconds.max(1));
        let (events, batch, text) = (args.events, args.batch as u64, data_text.clone());
        bases.push(
            tokio::task::spawn_blocking(move || {
                baseline::insert_rows(&baseline_path, synchronous, &text, events, batch, budget)
            })
            .await??,
        );
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
    let backend = match args.backend {
        Backend::Sqlite => "sqlite",
        Backend::Memory => "memory",
    };
    println!(
        "factline bench append: {backend}, synchronous={}, {} rounds",
        args.synchronous, args.rounds
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
        "  median: factline {rate:.0} events/s, baseline (raw rusqlite) {base_rate:.0} events/s"
    );
    println!(
        "  ratio {:.3}   append latency p50 {p50:.3} ms   p99 {p99:.3} ms",
        rate / base_rate
    );
    let report = AppendReport {
        bench: "append",
        events_per_s: round(rate),
        baseline_events_per_s: round(base_rate),
        ratio: (rate / base_rate * 1000.0).round() / 1000.0,
        p50_ms: p50,
        p99_ms: p99,
        backend,
        writers: args.writers,
        batch: args.batch,
        events: args.events,
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
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
}

async fn run_factline(
    args: &AppendBench,
    synchronous: Synchronous,
    data: &serde_json::Value,
    dir: &std::path::Path,
) -> anyhow::Result<FactlineRun> {
    let mut sqlite = None;
    let store: Arc<dyn EventStore> = match args.backend {
        Backend::Memory => Arc::new(InMemoryStore::new()),
        Backend::Sqlite => {
            let mut config = SqliteConfig::new(dir.join("factline.db"));
            config.synchronous = synchronous;
            let store = SqliteStore::open_with(config)?;
            sqlite = Some(store.clone());
            Arc::new(store)
        }
    };
    let appends = args.events.div_ceil(args.batch as u64);
    let (batch, writers) = (args.batch as u64, args.writers as u64);
    // Each writer takes every `writers`-th append; a stream gets ten appends,
    // with exact expected versions, before the next one. The payloads are
    // built before the clock starts: making them is the caller's work.
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
        transactions: sqlite.map(|s| {
            let stats = s.stats();
            (stats.appends, stats.transactions)
        }),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[index].as_secs_f64() * 1_000_000.0).round() / 1000.0
}
