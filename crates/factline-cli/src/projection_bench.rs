//! `factline bench projections`: rebuilding the revenue read model (the
//! Rust one, or a declared one: `--read-models FILE --read-model NAME`)
//! over a long history, against a plain sequential read of the same events
//! from the same store in the same run; and the latency from an append to
//! the order-list read model (or the declared one) under a steady load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use factline::sqlite::{SqliteConfig, SqliteStore};
use factline::{EventStore, ExpectedVersion, Location, StreamId};
use factline_orders::history;
use factline_orders::read_models::{OrderList, RevenueByRegionDay};
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqlProjection, SqliteSink};
use factline_read_models::DeclaredProjection;

use crate::bench::{
    fresh_postgres_store, median, percentile_ms, postgres_url, round, thousandths, Backend,
    BENCH_SCHEMA,
};
use crate::usage;

#[derive(Args, Debug)]
pub struct ProjectionsBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Events in the history the rebuild replays.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Rebuilds (and baseline reads), alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Orders per second appended while the latency is measured.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long the latency load runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A definitions file: measure its --read-model instead of the Rust
    /// revenue and order-list read models.
    #[arg(long, value_name = "FILE", requires = "read_model")]
    read_models: Option<std::path::PathBuf>,
    /// The declared read model measured (with --read-models).
    #[arg(long, value_name = "NAME", requires = "read_models")]
    read_model: Option<String>,
}

/// The read models measured: the Rust ones, or one declared in a file.
enum Measured {
    Rust,
    Declared(Box<factline_read_models::ReadModel>),
}

impl Measured {
    fn load(args: &ProjectionsBench) -> anyhow::Result<Self> {
        let (Some(path), Some(name)) = (&args.read_models, &args.read_model) else {
            return Ok(Measured::Rust);
        };
        let catalog = crate::catalog::Catalog::load(Some(path), Default::default())?;
        let model = catalog.definitions().get(name).cloned().ok_or_else(|| {
            usage(format!(
                "{} declares no read model {name:?}",
                path.display()
            ))
        })?;
        Ok(Measured::Declared(Box::new(model)))
    }

    fn name(&self) -> &str {
        match self {
            Measured::Rust => "revenue",
            Measured::Declared(model) => model.name(),
        }
    }

    /// What a rebuild builds.
    fn rebuilt(&self) -> Box<dyn SqlProjection> {
        match self {
            Measured::Rust => Box::new(RevenueByRegionDay::new()),
            Measured::Declared(model) => {
                Box::new(DeclaredProjection::new(Arc::new((**model).clone())))
            }
        }
    }

    /// What follows the live load.
    fn live(&self) -> Box<dyn SqlProjection> {
        match self {
            Measured::Rust => Box::new(OrderList),
            Measured::Declared(_) => self.rebuilt(),
        }
    }
}

/// The last line of `bench projections`, a contract for scripts.
#[derive(serde::Serialize)]
struct ProjectionsReport {
    bench: &'static str,
    backend: &'static str,
    events: u64,
    /// The read model rebuilt.
    read_model: String,
    /// Whether it is declared in a file (else written in Rust).
    declared: bool,
    /// Its rebuild rate.
    events_per_s: f64,
    /// A plain sequential read of the same events from the same store.
    baseline_events_per_s: f64,
    ratio: f64,
    /// Append → visible in the order-list read model, under load.
    p50_ms: f64,
    p99_ms: f64,
    rounds: usize,
}

/// The store, and how to open a sink on its read-model database.
enum Target {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Target {
    fn path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("factline.db")
    }
}

pub async fn run(args: ProjectionsBench, location: &Location) -> anyhow::Result<()> {
    if args.events == 0 || args.rounds == 0 || args.rate == 0 || args.seconds == 0 {
        return Err(usage(
            "--events, --rounds, --rate and --seconds must be at least 1",
        ));
    }
    let (store, target): (Arc<dyn EventStore>, Target) = match args.backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let store = SqliteStore::open_with(SqliteConfig::new(Target::path(&dir)))?;
            (Arc::new(store), Target::Sqlite(dir))
        }
        Backend::Postgres => {
            let url = postgres_url(location)?.to_owned();
            let store = fresh_postgres_store(&url).await?;
            (Arc::new(store), Target::Postgres(url))
        }
        Backend::Memory => return Err(usage(
            "bench projections needs a database for its read models: --backend sqlite or postgres",
        )),
    };
    let measured = Measured::load(&args)?;
    let head = crate::bench::fill_history(&store, args.events, "projections", args.backend).await?;

    let mut rebuild_rates = Vec::new();
    let mut read_rates = Vec::new();
    for round in 0..args.rounds {
        let read = sequential_read(&store).await?;
        // Each round builds a version of its own.
        let projection = measured.rebuilt();
        let version = projection.version() + round as u32;
        let projection = Portable::new(projection).at_version(version);
        let rebuilt = match &target {
            Target::Sqlite(dir) => {
                let sink = SqliteSink::open_rebuild(Target::path(dir), projection)?;
                time_rebuild(&store, sink).await?
            }
            Target::Postgres(url) => {
                let sink = PostgresSink::connect_rebuild(url, BENCH_SCHEMA, projection).await?;
                time_rebuild(&store, sink).await?
            }
        };
        let (rebuild_rate, read_rate) = (head as f64 / rebuilt, head as f64 / read);
        println!(
            "  round {}: rebuild {rebuild_rate:>9.0} events/s   sequential read {read_rate:>9.0} events/s",
            round + 1
        );
        rebuild_rates.push(rebuild_rate);
        read_rates.push(read_rate);
    }
    let (rate, base) = (median(&mut rebuild_rates), median(&mut read_rates));

    let mut latencies = match &target {
        Target::Sqlite(dir) => {
            let sink = SqliteSink::open(Target::path(dir), Portable::new(measured.live()))?;
            visible_latency(&store, sink, &args).await?
        }
        Target::Postgres(url) => {
            let projection = Portable::new(measured.live());
            let sink = PostgresSink::connect(url, BENCH_SCHEMA, projection).await?;
            visible_latency(&store, sink, &args).await?
        }
    };
    latencies.sort_unstable();
    let (p50, p99) = (
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99),
    );
    println!(
        "  median: rebuild {rate:.0} events/s, sequential read {base:.0} events/s, ratio {:.3}",
        rate / base
    );
    let live = match &measured {
        Measured::Rust => "the order list".to_owned(),
        Measured::Declared(model) => model.name().to_owned(),
    };
    println!(
        "  append -> visible in {live} at {} orders/s: p50 {p50:.3} ms   p99 {p99:.3} ms ({} samples)",
        args.rate,
        latencies.len()
    );
    if let Target::Postgres(url) = &target {
        drop(store);
        factline::postgres::baseline::drop_schema(url, BENCH_SCHEMA).await?;
    }
    let report = ProjectionsReport {
        bench: "projections",
        backend: args.backend.name(),
        events: head,
        read_model: measured.name().to_owned(),
        declared: matches!(measured, Measured::Declared(_)),
        events_per_s: round(rate),
        baseline_events_per_s: round(base),
        ratio: thousandths(rate / base),
        p50_ms: p50,
        p99_ms: p99,
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Seconds to read every event in pages, as a projection's runner does.
async fn sequential_read(store: &Arc<dyn EventStore>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut from = 1;
    let mut count = 0u64;
    loop {
        let page = store.read_all(from, 512).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        count += page.len() as u64;
    }
    anyhow::ensure!(count > 0, "the history is empty");
    Ok(started.elapsed().as_secs_f64())
}

async fn time_rebuild<S: Sink + 'static>(
    store: &Arc<dyn EventStore>,
    sink: S,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let stats = Runner::new(store.clone(), sink)
        .with_policy(factline_projections::BatchPolicy::rebuild())
        .catch_up(u64::MAX)
        .await?;
    anyhow::ensure!(stats.events > 0, "the rebuild applied nothing");
    Ok(started.elapsed().as_secs_f64())
}

/// Appends single placed orders at `rate` per second while the order list
/// follows live, and times each from its append to its visibility.
async fn visible_latency<S: Sink + 'static>(
    store: &Arc<dyn EventStore>,
    sink: S,
    args: &ProjectionsBench,
) -> anyhow::Result<Vec<Duration>> {
    let mut runner = Runner::new(store.clone(), sink);
    let status = runner.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Catch up on the history first, so only live events are timed.
    runner.catch_up(u64::MAX).await?;
    let running = tokio::spawn(async move { runner.run(stopped).await });
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = tokio::time::Instant::now();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut waiting = tokio::task::JoinSet::new();
    for n in 0..total {
        tokio::time::sleep_until(started + interval * n as u32).await;
        let (store, status) = (store.clone(), status.clone());
        waiting.spawn(async move {
            let stream = StreamId::new(format!("Order-live-{n}"))?;
            let placed = history::placed(n, 5_000)?;
            let sent = Instant::now();
            let appended = store
                .append(&stream, ExpectedVersion::NoStream, vec![placed])
                .await?;
            status
                .wait_for(appended.last_position, Duration::from_secs(30))
                .await?;
            anyhow::Ok(sent.elapsed())
        });
        while let Some(done) = waiting.try_join_next() {
            latencies.push(done??);
        }
    }
    while let Some(done) = waiting.join_next().await {
        latencies.push(done??);
    }
    stop.send_replace(true);
    running.await??;
    Ok(latencies)
}
