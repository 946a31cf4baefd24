//! `factline bench http`: the server under load on loopback. Concurrent
//! clients append over HTTP while Server-Sent Events subscribers follow
//! `$all`; afterwards every acknowledged event must be stored and every
//! subscriber must have seen every event once, in order, and no request
//! may have failed with a 5xx. It fails (exit 1) when any of that does not
//! hold, and reports requests/s and latency percentiles.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use factline::{EventStore, Location};
use factline_server::sse::SseParser;
use factline_server::{InstrumentedStore, Server, ServerConfig};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::bench::{percentile_ms, postgres_url, round, Backend, BENCH_SCHEMA};
use crate::usage;

#[derive(Args, Debug)]
pub struct HttpBench {
    /// The store measured: sqlite (a temporary file), memory, or postgres (needs --db postgres://…).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Concurrent HTTP clients appending.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Server-Sent Events subscribers following $all.
    #[arg(long, default_value_t = 8)]
    subscribers: usize,
    /// How long the clients append.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Appends in all at most, whatever the duration.
    #[arg(long, default_value_t = 500_000)]
    max_requests: u64,
}

/// The last line of `bench http`, a contract for scripts.
#[derive(serde::Serialize)]
struct HttpReport {
    bench: &'static str,
    backend: &'static str,
    clients: usize,
    subscribers: usize,
    seconds: f64,
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_errors: u64,
    events: u64,
    /// Every subscriber saw events 1..=events once, in order.
    subscribers_complete: bool,
}

/// What one client did: acknowledged (event id, position) pairs and the
/// latency of every request.
#[derive(Default)]
struct ClientLog {
    acknowledged: Vec<(uuid::Uuid, u64)>,
    latencies: Vec<Duration>,
    server_errors: u64,
}

pub async fn run(args: HttpBench, location: &Location) -> anyhow::Result<()> {
    if args.clients == 0 || args.seconds == 0 || args.max_requests == 0 {
        return Err(usage(
            "--clients, --seconds and --max-requests must be at least 1",
        ));
    }
    let dir = tempfile::tempdir()?;
    let store = crate::bench::fresh_store(args.backend, location, dir.path()).await?;
    let store: Arc<dyn EventStore> = Arc::new(InstrumentedStore::new(store));
    let (stop, stopped) = watch::channel(false);
    let router = Server::new(store.clone(), ServerConfig::default())
        .with_shutdown(stopped.clone())
        .router();
    // Loopback only: the load never leaves the machine.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(factline_server::serve(
        listener,
        router,
        factline_server::stopped_by(stopped.clone()),
    ));
    println!(
        "factline bench http: {}, {} clients appending for {} s, {} subscribers on $all, at {base}",
        args.backend.name(),
        args.clients,
        args.seconds,
        args.subscribers
    );

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;
    // The head the subscribers must reach; set once the clients are done.
    let (target_tx, target) = watch::channel(u64::MAX);
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        subscribers.push(tokio::spawn(follow_all(
            client.clone(),
            format!("{base}/subscribe/all?from=1"),
            target.clone(),
        )));
    }

    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut clients = Vec::new();
    for c in 0..args.clients {
        let (client, base, sent) = (client.clone(), base.clone(), sent.clone());
        let max = args.max_requests;
        clients.push(tokio::spawn(async move {
            let mut log = ClientLog::default();
            let mut k = 0u64;
            while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < max {
                let id = factline::new_event_id();
                let body = format!(
                    r#"{{"event_id":"{id}","type":"LoadTested","data":{{"client":{c},"n":{k}}}}}"#
                );
                let asked = Instant::now();
                let answer = client
                    .post(format!("{base}/streams/Load-c{c}s{}", k % 8))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                k += 1;
                match answer {
                    Ok(r) if r.status() == 201 => {
                        let result: serde_json::Value = r.json().await?;
                        log.latencies.push(asked.elapsed());
                        let position = result["last_position"].as_u64().unwrap_or(0);
                        log.acknowledged.push((id, position));
                    }
                    Ok(r) if r.status().is_server_error() => log.server_errors += 1,
                    Ok(r) => anyhow::bail!("an append was refused: {}", r.status()),
                    // A dropped connection counts against the server too.
                    Err(_) => log.server_errors += 1,
                }
            }
            anyhow::Ok(log)
        }));
    }
    let mut acknowledged = Vec::new();
    let mut latencies = Vec::new();
    let mut server_errors = 0;
    for c in clients {
        let log = c.await??;
        acknowledged.extend(log.acknowledged);
        latencies.extend(log.latencies);
        server_errors += log.server_errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let head = store.head_position().await?;
    target_tx.send_replace(head);

    // Every acknowledged event is stored where its answer said.
    let mut stored = HashSet::with_capacity(head as usize);
    let mut from = 1;
    loop {
        let page = store.read_all(from, 1000).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        stored.extend(page.iter().map(|e| (e.event_id, e.position)));
    }
    let missing = acknowledged.iter().filter(|a| !stored.contains(a)).count();

    // Every subscriber saw positions 1..=head, each once, in order.
    let mut problems = Vec::new();
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let positions = subscriber.await??;
        let in_order = positions.iter().zip(1..).all(|(p, want)| *p == want);
        if !in_order || positions.len() as u64 != head {
            problems.push(format!(
                "subscriber {i} saw {} events (of {head}){}",
                positions.len(),
                if in_order {
                    ""
                } else {
                    ", not each once in order"
                }
            ));
        }
    }
    stop.send_replace(true);
    server.await??;
    if let Backend::Postgres = args.backend {
        drop(store);
        factline::postgres::baseline::drop_schema(postgres_url(location)?, BENCH_SCHEMA).await?;
    }

    latencies.sort_unstable();
    let requests = acknowledged.len() as u64 + server_errors;
    let report = HttpReport {
        bench: "http",
        backend: args.backend.name(),
        clients: args.clients,
        subscribers: args.subscribers,
        seconds: round(elapsed),
        requests,
        requests_per_s: round(requests as f64 / elapsed),
        p50_ms: percentile_ms(&latencies, 0.5),
        p99_ms: percentile_ms(&latencies, 0.99),
        server_errors,
        events: head,
        subscribers_complete: problems.is_empty(),
    };
    println!(
        "  {} appends in {:.1} s: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms; {} server errors; {} events, {} subscribers complete",
        report.requests,
        elapsed,
        report.requests_per_s,
        report.p50_ms,
        report.p99_ms,
        server_errors,
        head,
        args.subscribers - problems.len()
    );
    println!("{}", serde_json::to_string(&report)?);
    if missing > 0 {
        problems.push(format!("{missing} acknowledged events are not stored"));
    }
    if server_errors > 0 {
        problems.push(format!(
            "{server_errors} requests failed with a server error"
        ));
    }
    anyhow::ensure!(
        problems.is_empty(),
        "the load test failed: {}",
        problems.join("; ")
    );
    Ok(())
}

/// Follows `$all` until it has seen the target position (or a minute has
/// passed without an event once the target is known); the positions seen.
async fn follow_all(
    client: reqwest::Client,
    url: String,
    target: watch::Receiver<u64>,
) -> anyhow::Result<Vec<u64>> {
    let response = client.get(&url).send().await?;
    anyhow::ensure!(
        response.status() == 200,
        "subscribing: {}",
        response.status()
    );
    let mut body = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut positions = Vec::new();
    loop {
        while let Some(message) = parser.next_message() {
            if message.event.is_some() {
                anyhow::bail!("the subscription failed: {}", message.data);
            }
            let position = message.id.as_deref().and_then(|id| id.parse().ok());
            positions.push(position.unwrap_or(0));
        }
        if positions
            .last()
            .is_some_and(|last| *last >= *target.borrow())
        {
            return Ok(positions);
        }
        let wait = if *target.borrow() == u64::MAX {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(60)
        };
        match tokio::time::timeout(wait, body.next()).await {
            Ok(Some(chunk)) => parser.push(&chunk?),
            // Ended or silent for a minute: what it saw is the answer.
            Ok(None) | Err(_) => return Ok(positions),
        }
    }
}
