//! `factline bench outbox`: the relay draining a backlog into JetStream
//! against a plain `async-nats` JetStream publisher sending the same
//! messages in the same run, and the latency from an append to a
//! JetStream consumer under a steady load.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use clap::Args;
use factline::sqlite::{SqliteConfig, SqliteStore};
use factline::{EventData, EventStore, ExpectedVersion, Location, StreamId};
use factline_outbox::{
    Message, NatsSink, NatsSinkConfig, OutboxDb, PostgresOutbox, Publication, Relay, RelayConfig,
    SqliteOutbox, WAVES_IN_FLIGHT,
};
use factline_testkit::nats::LocalNatsServer;
use futures_util::StreamExt;

use crate::bench::{
    fresh_postgres_store, median, percentile_ms, postgres_url, round, thousandths, Backend,
    BENCH_SCHEMA,
};
use crate::usage;

#[derive(Args, Debug)]
pub struct OutboxBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Records the relay publishes per round.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Rounds of relay and baseline, alternating which goes first (an even
    /// number weighs both orders alike); the median of the rounds' ratios
    /// (and of their rates) is reported.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Events per second appended while the latency is measured.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// How long the latency load runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A NATS server with JetStream to use instead of starting one.
    #[arg(long)]
    nats: Option<String>,
}

/// The last line of `bench outbox`, a contract for scripts.
#[derive(serde::Serialize)]
struct OutboxReport {
    bench: &'static str,
    backend: &'static str,
    events: u64,
    /// The relay draining a backlog into JetStream.
    events_per_s: f64,
    /// A plain JetStream publisher sending the same messages.
    baseline_events_per_s: f64,
    /// The median of `round_ratios`.
    ratio: f64,
    /// Each round's relay rate ÷ the baseline rate measured next to it:
    /// the two share whatever else the machine is doing at that moment,
    /// which the medians of the rates taken apart do not.
    round_ratios: Vec<f64>,
    /// Append → JetStream consumer, at `rate` events/s.
    rate: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// The append's own share: append call → commit returned.
    append_p99_ms: f64,
    samples: usize,
    rounds: usize,
}

const SUBJECT: &str = "factline.bench";
const BASELINE_SUBJECT: &str = "factline.baseline";
/// Messages per window of the baseline: the relay's batch (and largest
/// wave). Both keep `WAVES_IN_FLIGHT` windows out at the broker.
const WINDOW: usize = 500;

pub async fn run(args: OutboxBench, location: &Location) -> anyhow::Result<()> {
    if args.events == 0 || args.rounds == 0 || args.rate == 0 || args.seconds == 0 {
        return Err(usage(
            "--events, --rounds, --rate and --seconds must be at least 1",
        ));
    }
    let local = match &args.nats {
        Some(_) => None,
        None => Some(LocalNatsServer::start()?),
    };
    let nats_url = match (&args.nats, &local) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => unreachable!("a server was started"),
    };
    let _dir;
    let mut sqlite_file = None;
    let (store, db): (Arc<dyn EventStore>, Arc<dyn OutboxDb>) = match args.backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("factline.db");
            let store = SqliteStore::open_with(SqliteConfig::new(&path))?;
            let db = SqliteOutbox::open(&path)?;
            sqlite_file = Some(path);
            _dir = dir;
            (Arc::new(store), Arc::new(db))
        }
        Backend::Postgres => {
            let url = postgres_url(location)?;
            let store = fresh_postgres_store(url).await?;
            let db = PostgresOutbox::connect(url, BENCH_SCHEMA).await?;
            (Arc::new(store), Arc::new(db))
        }
        Backend::Memory => {
            return Err(usage(
                "the outbox needs a database: --backend sqlite or postgres",
            ))
        }
    };
    db.add_publication(Publication::category("Bench").on_subject(SUBJECT))
        .await?;
    let client = async_nats::connect(nats_url.as_str()).await?;
    let js = jetstream::new(client);
    let sink = Arc::new(NatsSink::connect(NatsSinkConfig::new(nats_url.clone())).await?);
    println!(
        "factline bench outbox: {} into JetStream at {nats_url}",
        args.backend.name()
    );

    let mut relay_rates = Vec::new();
    let mut baseline_rates = Vec::new();
    let mut round_ratios = Vec::new();
    let mut appended = 0u64;
    for r in 0..args.rounds {
        appended = fill(&store, args.events, appended).await?;
        let relay = Relay::new(db.clone(), sink.clone(), bench_relay(r));
        relay.heartbeat().await?;
        // The same messages for the baseline, under fresh ids (a re-used id
        // would be dropped as a duplicate, which is cheaper).
        let copies: Vec<Message> = db
            .pending(&relay.config().relay_id, 0, args.events as usize)
            .await?
            .into_iter()
            .map(|record| Message {
                event_id: uuid::Uuid::now_v7(),
                subject: BASELINE_SUBJECT.to_owned(),
                ..record.message
            })
            .collect();
        settle(location, sqlite_file.as_deref()).await?;
        anyhow::ensure!(
            copies.len() as u64 == args.events,
            "the backlog holds {} records, not {}",
            copies.len(),
            args.events
        );
        let (relay_s, baseline_s) = if r % 2 == 0 {
            (
                drain(&relay, args.events).await?,
                publish_plainly(&js, &copies).await?,
            )
        } else {
            let baseline = publish_plainly(&js, &copies).await?;
            (drain(&relay, args.events).await?, baseline)
        };
        let (relay_rate, baseline_rate) = (
            args.events as f64 / relay_s,
            args.events as f64 / baseline_s,
        );
        println!(
            "  round {}: relay {relay_rate:>9.0} events/s   plain publisher {baseline_rate:>9.0} events/s   ratio {:.3}",
            r + 1,
            relay_rate / baseline_rate
        );
        relay_rates.push(relay_rate);
        round_ratios.push(relay_rate / baseline_rate);
        baseline_rates.push(baseline_rate);
        db.leave(&relay.config().relay_id).await?;
    }
    let (rate, base) = (median(&mut relay_rates), median(&mut baseline_rates));
    let ratio = median(&mut round_ratios.clone());

    settle(location, sqlite_file.as_deref()).await?;
    let (mut latencies, mut appends) = live_latency(&store, &db, sink, &js, &args).await?;
    latencies.sort_unstable();
    appends.sort_unstable();
    let append_p99 = percentile_ms(&appends, 0.99);
    let (p50, p99) = (
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99),
    );
    println!(
        "  median: relay {rate:.0} events/s, plain publisher {base:.0} events/s, ratio {ratio:.3} (per round, paired)"
    );
    println!(
        "  append -> JetStream consumer at {} events/s: p50 {p50:.3} ms   p99 {p99:.3} ms (append alone p99 {append_p99:.3} ms; {} samples)",
        args.rate,
        latencies.len()
    );
    if let (Backend::Postgres, Location::Postgres(url)) = (args.backend, location) {
        drop(db);
        drop(store);
        factline::postgres::baseline::drop_schema(url, BENCH_SCHEMA).await?;
    }
    let report = OutboxReport {
        bench: "outbox",
        backend: args.backend.name(),
        events: args.events,
        events_per_s: round(rate),
        baseline_events_per_s: round(base),
        ratio: thousandths(ratio),
        round_ratios: round_ratios.into_iter().map(thousandths).collect(),
        rate: args.rate,
        p50_ms: p50,
        p99_ms: p99,
        append_p99_ms: append_p99,
        samples: latencies.len(),
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// After a load, lets the database catch up before anything is timed: on
/// PostgreSQL the load sets off autovacuum and leaves dirty pages, on
/// SQLite it leaves a long WAL, and either would land on whichever of
/// relay and baseline runs first.
async fn settle(location: &Location, sqlite_file: Option<&Path>) -> anyhow::Result<()> {
    if let Some(path) = sqlite_file {
        let connection = rusqlite::Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    } else if let Location::Postgres(url) = location {
        factline::postgres::baseline::vacuum_schema(url, BENCH_SCHEMA).await?;
        factline::postgres::baseline::checkpoint(url).await?;
    }
    Ok(())
}

fn bench_relay(round: usize) -> RelayConfig {
    let mut config = RelayConfig::default();
    config.relay_id = format!("bench-{round}");
    config.batch = WINDOW;
    config.min_backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(200);
    config
}

/// Appends `events` more events, one per append as commands do, over
/// 1 000 streams in turn, from 32 writers.
async fn fill(store: &Arc<dyn EventStore>, events: u64, from: u64) -> anyhow::Result<u64> {
    const WRITERS: u64 = 32;
    let data = serde_json::json!({
        "order_id": "7f3a9c2e-4b1d-4e8a-9f6b-2c5d8e1a3b7f",
        "region": "eu-west",
        "amount_cents": 129_900,
        "lines": [{ "sku": "SKU-1001", "qty": 2 }, { "sku": "SKU-2002", "qty": 1 }]
    });
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (store, data) = (store.clone(), data.clone());
        writers.spawn(async move {
            let mut n = w;
            while n < events {
                let stream = StreamId::new(format!("Bench-{}", (from + n) % 1_000))?;
                let event = EventData::new("BenchEvent", data.clone());
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await?;
                n += WRITERS;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    Ok(from + events)
}

/// Seconds for the relay to publish its whole backlog.
async fn drain(relay: &Relay, events: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let published = relay.drain().await?;
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        published == events,
        "the relay published {published} of {events} records"
    );
    Ok(elapsed)
}

/// Seconds for a plain JetStream publisher to send `messages` (the same
/// headers and payloads) in windows of `WINDOW`, sending the next window
/// before waiting for the acknowledgements of the one `WAVES_IN_FLIGHT`
/// back, as the relay does.
async fn publish_plainly(js: &jetstream::Context, messages: &[Message]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut outstanding = VecDeque::new();
    for window in messages.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for m in window {
            let publish = jetstream::message::PublishMessage::build()
                .message_id(m.event_id.to_string())
                .header("Factline-Event-Type", m.event_type.as_str())
                .header("Factline-Stream-Id", m.stream_id.as_str())
                .header("Factline-Position", m.position.to_string().as_str())
                .header("Factline-Key", m.key.as_str())
                .payload(m.payload.clone());
            acks.push(js.send_publish(m.subject.clone(), publish).await?);
        }
        outstanding.push_back(acks);
        if outstanding.len() >= WAVES_IN_FLIGHT {
            for ack in outstanding.pop_front().unwrap_or_default() {
                ack.await?;
            }
        }
    }
    for acks in outstanding {
        for ack in acks {
            ack.await?;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Appends one event at a time at `rate` per second with the relay
/// running live, and times each from its append to a JetStream consumer;
/// also returns how long each append itself took.
async fn live_latency(
    store: &Arc<dyn EventStore>,
    db: &Arc<dyn OutboxDb>,
    sink: Arc<NatsSink>,
    js: &jetstream::Context,
    args: &OutboxBench,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let appended: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let sent: Arc<Mutex<HashMap<uuid::Uuid, Instant>>> = Arc::default();
    let stream = js.get_stream("factline").await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::None,
            filter_subject: SUBJECT.to_owned(),
            ..Default::default()
        })
        .await?;
    let total = args.rate * args.seconds;
    let receiving = {
        let sent = sent.clone();
        let mut messages = consumer.messages().await?;
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total as usize);
            while (latencies.len() as u64) < total {
                let Ok(Some(message)) =
                    tokio::time::timeout(Duration::from_secs(30), messages.next()).await
                else {
                    break;
                };
                let received = Instant::now();
                let Ok(message) = message else { continue };
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .and_then(|v| uuid::Uuid::parse_str(v.as_str()).ok());
                let at = id.and_then(|id| sent.lock().ok()?.remove(&id));
                if let Some(at) = at {
                    latencies.push(received - at);
                }
            }
            latencies
        })
    };
    let relay = Relay::new(db.clone(), sink, {
        let mut config = bench_relay(0);
        config.relay_id = "bench-live".into();
        config
    })
    .woken_by(store.watch_head());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(relay.run(stopped));
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = tokio::time::Instant::now();
    let mut appends = tokio::task::JoinSet::new();

    for n in 0..total {
        tokio::time::sleep_until(started + interval * n as u32).await;
        let (store, sent, appended) = (store.clone(), sent.clone(), appended.clone());
        appends.spawn(async move {
            let event = EventData::new("BenchEvent", serde_json::json!({ "n": n }));
            let stream = StreamId::new(format!("Bench-live-{}", n % 1_000))?;
            let at = Instant::now();
            if let Ok(mut sent) = sent.lock() {
                sent.insert(event.event_id, at);
            }
            store
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await?;
            if let Ok(mut appended) = appended.lock() {
                appended.push(at.elapsed());
            }
            anyhow::Ok(())
        });
        while let Some(done) = appends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = appends.join_next().await {
        done??;
    }
    let latencies = receiving.await?;
    stop.send_replace(true);
    running.await??;
    anyhow::ensure!(
        latencies.len() as u64 == total,
        "the consumer got {} of {total} events",
        latencies.len()
    );
    let appended = std::mem::take(
        &mut *appended
            .lock()
            .map_err(|_| anyhow::anyhow!("an append task panicked"))?,
    );
    Ok((latencies, appended))
}
