//! `factline bench load`: how long loading an aggregate with a long history
//! takes with snapshots (every N events) and without, on the same stream in
//! the same run; the ratio is the time without ÷ the time with.

use std::time::Instant;

use clap::Args;
use factline::aggregate::{tagged_events, Aggregate, CommandContext, CommandHandler};
use factline::Location;
use serde::{Deserialize, Serialize};

use crate::bench::{median, postgres_url, round, thousandths, Backend, BENCH_SCHEMA};
use crate::usage;

#[derive(Args, Debug)]
pub struct LoadBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Events in the aggregate's stream.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// The snapshot policy of the measured side: a snapshot every N events.
    #[arg(long, default_value_t = 100)]
    snapshot_every: u64,
    /// Events each command appends while the stream is built.
    #[arg(long, default_value_t = 64)]
    events_per_command: u64,
    /// Loads of each kind, alternating; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// A ledger with a long history: every posting changes it.
#[derive(Default, Serialize, Deserialize)]
struct Ledger {
    postings: u64,
    balance: i64,
    last_reference: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum LedgerEvent {
    Posted {
        amount: i64,
        reference: String,
        account: String,
    },
}

tagged_events!(LedgerEvent);

#[derive(Serialize)]
struct Post {
    postings: u64,
    from: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Ledger {
    const CATEGORY: &'static str = "Ledger";
    type Event = LedgerEvent;
    type Command = Post;
    type Error = Never;

    fn apply(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Posted {
            amount, reference, ..
        } = event;
        self.postings += 1;
        self.balance += amount;
        self.last_reference.clone_from(reference);
    }

    fn decide(&self, command: &Post) -> Result<Vec<LedgerEvent>, Never> {
        Ok((command.from..command.from + command.postings)
            .map(|n| LedgerEvent::Posted {
                amount: if n % 3 == 0 { -4_250 } else { 12_900 },
                reference: format!("INV-{n:08}"),
                account: format!("acct-{:04}", n % 977),
            })
            .collect())
    }
}

/// The last line of `bench load`, a contract for scripts.
#[derive(Serialize)]
struct LoadReport {
    bench: &'static str,
    backend: &'static str,
    events: u64,
    snapshot_every: u64,
    /// Events read after the snapshot by a load with snapshots.
    events_after_snapshot: u64,
    without_snapshots_ms: f64,
    with_snapshots_ms: f64,
    /// Time without snapshots ÷ time with.
    ratio: f64,
    rounds: usize,
}

pub async fn run(args: LoadBench, location: &Location) -> anyhow::Result<()> {
    if args.events == 0
        || args.snapshot_every == 0
        || args.rounds == 0
        || args.events_per_command == 0
    {
        return Err(usage(
            "--events, --snapshot-every, --events-per-command and --rounds must be at least 1",
        ));
    }
    let dir = tempfile::tempdir()?;
    let store = crate::bench::fresh_store(args.backend, location, dir.path()).await?;
    let plain = CommandHandler::<Ledger>::new(store.clone());
    let snapshotting =
        CommandHandler::<Ledger>::new(store.clone()).with_snapshots(args.snapshot_every);
    // The stream is built through the snapshotting handler, as an
    // application with that policy would have built it.
    let built = Instant::now();
    let mut written = 0;
    while written < args.events {
        let post = Post {
            postings: args.events_per_command.min(args.events - written),
            from: written,
        };
        snapshotting
            .handle("bench", &post, &CommandContext::new())
            .await?;
        written += post.postings;
    }
    let build_time = built.elapsed();

    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut after_snapshot = 0;
    for _ in 0..args.rounds {
        let t = Instant::now();
        let full = plain.load("bench").await?;
        without.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let quick = snapshotting.load("bench").await?;
        with.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            full.version == args.events && quick.version == args.events,
            "loaded versions {} and {}, expected {}",
            full.version,
            quick.version,
            args.events
        );
        anyhow::ensure!(
            (full.state.postings, full.state.balance)
                == (quick.state.postings, quick.state.balance),
            "the snapshot led to another state than the events"
        );
        after_snapshot = quick.events_applied;
    }
    let (without_ms, with_ms) = (median(&mut without), median(&mut with));
    let backend = args.backend.name();
    println!("factline bench load: {backend}, {} rounds", args.rounds);
    println!(
        "  stream of {} events built in {:.1} s ({} per command, a snapshot every {})",
        args.events,
        build_time.as_secs_f64(),
        args.events_per_command,
        args.snapshot_every
    );
    for (i, (w, s)) in without.iter().zip(&with).enumerate() {
        println!(
            "  round {}: without snapshots {w:>9.2} ms   with {s:>7.3} ms",
            i + 1
        );
    }
    println!(
        "  median: without {without_ms:.2} ms, with {with_ms:.3} ms ({after_snapshot} events after the snapshot)   ratio {:.1}",
        without_ms / with_ms
    );
    if let Backend::Postgres = args.backend {
        drop(plain);
        drop(snapshotting);
        drop(store);
        factline::postgres::baseline::drop_schema(postgres_url(location)?, BENCH_SCHEMA).await?;
    }
    let report = LoadReport {
        bench: "load",
        backend,
        events: args.events,
        snapshot_every: args.snapshot_every,
        events_after_snapshot: after_snapshot,
        without_snapshots_ms: thousandths(without_ms),
        with_snapshots_ms: thousandths(with_ms),
        ratio: round(without_ms / with_ms),
        rounds: args.rounds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
