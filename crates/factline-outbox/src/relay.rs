//! The relay (O2, O4, O6): publishes pending records of the lanes it
//! holds, in per-stream order, and marks them published once the sink
//! acknowledged them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Message, OutboxDb, OutboxError, Sink};

/// How a relay works; the defaults suit most deployments.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Names this relay in the lanes table; unique per process.
    pub relay_id: String,
    /// Records fetched per round.
    pub batch: usize,
    /// How often an idle relay looks for records when no append woke it
    /// (appends of other processes on SQLite, a lost notification).
    pub fallback_poll: Duration,
    /// How long a lane stays leased without a renewal; a dead relay's
    /// lanes move to the others after this.
    pub lease_ttl: Duration,
    /// How often leases are renewed and the lanes rebalanced.
    pub heartbeat: Duration,
    /// Backoff after a failed round: doubles from `min_backoff` up to
    /// `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Published records are deleted after this long (O6).
    pub retention: Duration,
    /// How often retention runs, and how many records one delete removes.
    pub purge_every: Duration,
    pub purge_batch: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        RelayConfig {
            relay_id: format!("relay-{}-{}", std::process::id(), &id[..8]),
            batch: 500,
            fallback_poll: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            purge_every: Duration::from_secs(60),
            purge_batch: 1_000,
        }
    }
}

/// Counters of one relay, for metrics and the admin API.
#[derive(Default)]
pub struct RelayStats {
    published: AtomicU64,
    failed: AtomicU64,
    purged: AtomicU64,
    lanes: AtomicU64,
    consecutive_failures: AtomicU64,
    /// Records per second since the previous heartbeat (f64 bits).
    rate: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of [`RelayStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RelayStatsSnapshot {
    /// Records published and marked.
    pub published: u64,
    /// Publish attempts that failed.
    pub failed: u64,
    /// Published records deleted by retention.
    pub purged: u64,
    /// Lanes held at the last heartbeat.
    pub lanes: u64,
    /// Rounds in a row that failed (0 while healthy).
    pub consecutive_failures: u64,
    /// Records published per second between the last two heartbeats.
    pub publish_rate_per_s: f64,
    pub last_error: Option<String>,
}

impl RelayStats {
    pub fn snapshot(&self) -> RelayStatsSnapshot {
        RelayStatsSnapshot {
            published: self.published.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            purged: self.purged.load(Ordering::Relaxed),
            lanes: self.lanes.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            publish_rate_per_s: f64::from_bits(self.rate.load(Ordering::Relaxed)),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn failed_with(&self, attempts: u64, error: &str) {
        self.failed.fetch_add(attempts, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_owned());
        }
    }
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Records fetched.
    pub pending: usize,
    pub published: u64,
    pub failed: u64,
}

type Task<T> = tokio::task::JoinHandle<Result<T, OutboxError>>;

async fn joined<T>(task: Task<T>) -> Result<T, OutboxError> {
    task.await
        .map_err(|e| OutboxError::Database(format!("an outbox task failed: {e}")))?
}

/// What a relay has in flight between rounds.
#[derive(Default)]
struct Flow {
    /// The last position fetched: the next fetch starts after it.
    after: u64,
    prefetch: Option<Task<Vec<Message>>>,
    /// Marks in flight, oldest first.
    marking: VecDeque<Task<u64>>,
}

/// Marks in flight at most: a mark costs the database about as long as
/// publishing a wave costs the broker, so waiting for each one before
/// the next wave would halve the rate.
const MARKS_IN_FLIGHT: usize = 4;

/// Publishes the outbox of one database to one sink.
pub struct Relay {
    db: Arc<dyn OutboxDb>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    wake: Option<watch::Receiver<u64>>,
    stats: Arc<RelayStats>,
}

impl Relay {
    pub fn new(db: Arc<dyn OutboxDb>, sink: Arc<dyn Sink>, config: RelayConfig) -> Self {
        Relay {
            db,
            sink,
            config,
            wake: None,
            stats: Arc::default(),
        }
    }

    /// Wakes the relay whenever this watch changes: a store's head
    /// position (`EventStore::watch_head`), so an append is relayed at once.
    pub fn woken_by(mut self, head: watch::Receiver<u64>) -> Self {
        self.wake = Some(head);
        self
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Renews leases and rebalances lanes now; returns the lanes held.
    pub async fn heartbeat(&self) -> Result<Vec<i64>, OutboxError> {
        let lanes = self
            .db
            .heartbeat(&self.config.relay_id, self.config.lease_ttl)
            .await?;
        self.stats
            .lanes
            .store(lanes.len() as u64, Ordering::Relaxed);
        Ok(lanes)
    }

    /// One round, complete before it returns: fetch the oldest pending
    /// records of the held lanes and publish them in waves of at most one
    /// record per stream. A stream whose record fails publishes nothing
    /// more this round, so its order holds; the others go on.
    pub async fn round(&self) -> Result<Round, OutboxError> {
        let mut flow = Flow::default();
        let round = self.flowing_round(&mut flow, false).await;
        let settled = self.settle(&mut flow).await;
        let mut round = round?;
        round.published += settled?;
        Ok(round)
    }

    /// Publishes until nothing is pending, fetching the next batch and
    /// marking the last wave while a wave is out, and renewing the leases
    /// every heartbeat. Returns the records published.
    pub async fn drain(&self) -> Result<u64, OutboxError> {
        let mut flow = Flow::default();
        let (mut published, mut stuck) = (0, 0);
        let mut next_heartbeat = Instant::now();
        loop {
            if Instant::now() >= next_heartbeat {
                published += self.settle(&mut flow).await?;
                self.heartbeat().await?;
                next_heartbeat = Instant::now() + self.config.heartbeat;
            }
            let round = match self.flowing_round(&mut flow, true).await {
                Ok(round) => round,
                Err(e) => {
                    let _ = self.settle(&mut flow).await;
                    return Err(e);
                }
            };
            published += round.published;
            stuck = if round.failed > 0 && round.published == 0 {
                stuck + 1
            } else {
                0
            };
            if stuck >= 100 {
                self.settle(&mut flow).await?;
                return Err(OutboxError::Sink(crate::SinkError(format!(
                    "the sink refused 100 rounds in a row: {}",
                    self.stats.snapshot().last_error.unwrap_or_default()
                ))));
            }
            if round.pending == 0 {
                return Ok(published + self.settle(&mut flow).await?);
            }
        }
    }

    /// Waits for the mark in flight and drops a prefetched batch, so the
    /// next fetch starts from the oldest pending record. Returns how many
    /// the mark marked.
    async fn settle(&self, flow: &mut Flow) -> Result<u64, OutboxError> {
        if let Some(prefetch) = flow.prefetch.take() {
            prefetch.abort();
        }
        flow.after = 0;
        let mut marked = 0;
        let mut first_error = None;
        // Every mark is waited for, even after one failed.
        while let Some(marking) = flow.marking.pop_front() {
            match self.marked(marking).await {
                Ok(n) => marked += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(marked),
        }
    }

    async fn marked(&self, marking: Task<u64>) -> Result<u64, OutboxError> {
        let marked = joined(marking).await?;
        self.stats.published.fetch_add(marked, Ordering::Relaxed);
        Ok(marked)
    }

    /// A round that may leave work in flight in `flow`: the next batch
    /// (fetched after this one's last position while this one is
    /// published) and the mark of its last wave.
    async fn flowing_round(&self, flow: &mut Flow, prefetch: bool) -> Result<Round, OutboxError> {
        let relay = &self.config.relay_id;
        let pending = match flow.prefetch.take() {
            Some(prefetched) => joined(prefetched).await?,
            None => {
                self.db
                    .pending(relay, flow.after, self.config.batch)
                    .await?
            }
        };
        let mut round = Round {
            pending: pending.len(),
            ..Round::default()
        };
        let Some(last) = pending.last().map(|m| m.position) else {
            // From the start next time, once nothing is being marked (a
            // record being marked is still pending in the table).
            round.published += self.settle(flow).await?;
            return Ok(round);
        };
        flow.after = last;
        if prefetch && pending.len() == self.config.batch {
            let (db, relay, batch) = (self.db.clone(), relay.clone(), self.config.batch);
            flow.prefetch = Some(tokio::spawn(async move {
                db.pending(&relay, last, batch).await
            }));
        }
        let mut blocked: HashSet<String> = HashSet::new();
        for wave in waves(pending) {
            let wave: Vec<Message> = wave
                .into_iter()
                .filter(|m| !blocked.contains(&m.stream_id))
                .collect();
            if wave.is_empty() {
                continue;
            }
            let results = self.sink.publish(&wave).await;
            let mut acked = Vec::with_capacity(wave.len());
            let mut failed = Vec::new();
            let mut error = None;
            for (message, result) in wave.iter().zip(results) {
                match result {
                    Ok(()) => acked.push(message.position),
                    Err(e) => {
                        blocked.insert(message.stream_id.clone());
                        failed.push(message.position);
                        error.get_or_insert(e.0);
                    }
                }
            }
            if !acked.is_empty() {
                // Marks touch disjoint records, so their order does not
                // matter; a few run beside the next waves.
                if flow.marking.len() >= MARKS_IN_FLIGHT {
                    if let Some(oldest) = flow.marking.pop_front() {
                        round.published += self.marked(oldest).await?;
                    }
                }
                let (db, relay) = (self.db.clone(), relay.clone());
                flow.marking.push_back(tokio::spawn(async move {
                    db.mark_published(&relay, &acked).await
                }));
            }
            if let Some(error) = error {
                round.failed += failed.len() as u64;
                self.stats.failed_with(failed.len() as u64, &error);
                self.db.record_failure(&failed, &error).await?;
            }
        }
        if round.failed > 0 {
            // A prefetched batch may hold later records of a stream that
            // failed: start again from the oldest pending record.
            round.published += self.settle(flow).await?;
        }
        Ok(round)
    }

    /// Deletes published records older than the retention, in small
    /// batches with a pause between them so the relay and appends go on.
    pub async fn purge(&self) -> Result<u64, OutboxError> {
        let cutoff = Utc::now()
            - chrono::Duration::from_std(self.config.retention).unwrap_or(chrono::Duration::MAX);
        let mut total = 0;
        loop {
            let deleted = self.db.purge(cutoff, self.config.purge_batch).await?;
            total += deleted;
            self.stats.purged.fetch_add(deleted, Ordering::Relaxed);
            if deleted < self.config.purge_batch as u64 {
                return Ok(total);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs until `stop` turns true, then gives its lanes back. Failures
    /// of the sink or the database are retried with capped exponential
    /// backoff; nothing pending is dropped.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), OutboxError> {
        let config = self.config.clone();
        tracing::info!(relay = %config.relay_id, sink = %self.sink.describe(), "outbox relay started");
        let mut lanes: Vec<i64> = Vec::new();
        let mut next_heartbeat = Instant::now();
        let mut next_purge = Instant::now();
        let mut backoff: Option<Duration> = None;
        let mut wake = self.wake.take();
        let mut rate_since = (Instant::now(), 0u64);
        let mut flow = Flow::default();
        while !*stop.borrow() {
            if Instant::now() >= next_heartbeat {
                // Nothing in flight while lanes may move to another relay.
                if let Err(e) = self.settle(&mut flow).await {
                    tracing::warn!(relay = %config.relay_id, error = %e, "marking published records failed");
                }
                match self.heartbeat().await {
                    Ok(held) => {
                        if held != lanes {
                            tracing::info!(relay = %config.relay_id, lanes = held.len(), "outbox lanes changed");
                        }
                        lanes = held;
                    }
                    Err(e) => {
                        tracing::warn!(relay = %config.relay_id, error = %e, "outbox heartbeat failed")
                    }
                }
                next_heartbeat = Instant::now() + config.heartbeat;
                let published = self.stats.published.load(Ordering::Relaxed);
                let seconds = rate_since.0.elapsed().as_secs_f64();
                if seconds > 0.0 {
                    let rate = (published - rate_since.1) as f64 / seconds;
                    self.stats.rate.store(rate.to_bits(), Ordering::Relaxed);
                }
                rate_since = (Instant::now(), published);
            }
            if Instant::now() >= next_purge {
                if let Err(e) = self.purge().await {
                    tracing::warn!(error = %e, "outbox retention failed");
                }
                next_purge = Instant::now() + config.purge_every;
            }
            let idle_until = if lanes.is_empty() {
                next_heartbeat
            } else {
                match self.flowing_round(&mut flow, true).await {
                    Ok(round) if round.failed > 0 => {
                        let delay = next_backoff(backoff, &config);
                        backoff = Some(delay);
                        self.stats
                            .consecutive_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(relay = %config.relay_id, failed = round.failed, retry_in_ms = delay.as_millis() as u64, "outbox publish failed");
                        Instant::now() + delay
                    }
                    Ok(round) => {
                        backoff = None;
                        self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                        if round.pending > 0 {
                            // More may be waiting: no pause until a round
                            // finds nothing.
                            continue;
                        }
                        (Instant::now() + config.fallback_poll).min(next_heartbeat)
                    }
                    Err(e) => {
                        let _ = self.settle(&mut flow).await;
                        let delay = next_backoff(backoff, &config);
                        backoff = Some(delay);
                        self.stats
                            .consecutive_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.stats.failed_with(0, &e.to_string());
                        tracing::warn!(relay = %config.relay_id, error = %e, retry_in_ms = delay.as_millis() as u64, "outbox round failed");
                        Instant::now() + delay
                    }
                }
            };
            let backing_off = backoff.is_some();
            tokio::select! {
                _ = tokio::time::sleep_until(idle_until) => {}
                _ = stop.changed() => {}
                // A new append ends an idle wait, not a backoff.
                _ = async {
                    match wake.as_mut() {
                        Some(wake) if !backing_off => { let _ = wake.changed().await; }
                        _ => std::future::pending::<()>().await,
                    }
                } => {}
            }
        }
        if let Err(e) = self.settle(&mut flow).await {
            tracing::warn!(relay = %config.relay_id, error = %e, "marking published records failed");
        }
        if let Err(e) = self.db.leave(&config.relay_id).await {
            tracing::warn!(relay = %config.relay_id, error = %e, "the relay could not give its lanes back; they expire");
        }
        tracing::info!(relay = %config.relay_id, "outbox relay stopped");
        Ok(())
    }
}

fn next_backoff(current: Option<Duration>, config: &RelayConfig) -> Duration {
    match current {
        None => config.min_backoff,
        Some(d) => (d * 2).min(config.max_backoff),
    }
}

/// Splits records (in position order) into waves: wave k holds the k-th
/// record of every stream, so no wave has two records of one stream and
/// each stream's records come in order across waves.
fn waves(records: Vec<Message>) -> Vec<Vec<Message>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut waves: Vec<Vec<Message>> = Vec::new();
    for record in records {
        let k = seen.entry(record.stream_id.clone()).or_insert(0);
        if waves.len() <= *k {
            waves.push(Vec::new());
        }
        waves[*k].push(record);
        *k += 1;
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(position: u64, stream: &str) -> Message {
        Message {
            position,
            event_id: uuid::Uuid::now_v7(),
            stream_id: stream.to_owned(),
            version: 1,
            event_type: "T".into(),
            subject: "s".into(),
            key: stream.into(),
            correlation_id: None,
            causation_id: None,
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn waves_hold_one_record_per_stream_in_order() {
        let records = vec![
            message(1, "A"),
            message(2, "B"),
            message(3, "A"),
            message(4, "A"),
            message(5, "C"),
            message(6, "B"),
        ];
        let positions: Vec<Vec<u64>> = waves(records)
            .iter()
            .map(|w| w.iter().map(|m| m.position).collect())
            .collect();
        assert_eq!(positions, vec![vec![1, 2, 5], vec![3, 6], vec![4]]);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let config = RelayConfig {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..RelayConfig::default()
        };
        let mut delay = None;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let next = next_backoff(delay, &config);
            seen.push(next.as_millis());
            delay = Some(next);
        }
        assert_eq!(seen, vec![100, 200, 350, 350]);
    }
}
