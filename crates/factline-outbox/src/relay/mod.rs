//! The relay (O2, O4, O6): publishes pending records of the lanes it
//! holds, in per-stream order, and marks them published once the sink
//! acknowledged them.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Mark, Message, OutboxDb, OutboxError, PendingRecord, Sink, SinkError, LANES};

mod stats;

pub use stats::*;

type Task<T> = tokio::task::JoinHandle<Result<T, OutboxError>>;

async fn joined<T>(task: Task<T>) -> Result<T, OutboxError> {
    task.await.map_err(|e| task_failed("an outbox", e))?
}

fn task_failed(what: &str, e: tokio::task::JoinError) -> OutboxError {
    OutboxError::internal(format!("{what} task failed: {e}"))
}

/// A wave out at the sink: its records, then the sink's answers for them.
type Wave = tokio::task::JoinHandle<(Vec<Message>, Vec<Result<(), SinkError>>)>;

/// Waves out at the sink at once. Their streams are disjoint, so per-stream
/// order holds, and the relay prepares the next wave while the sink
/// acknowledges the last instead of each waiting for the other.
pub const WAVES_IN_FLIGHT: usize = 2;

/// Marks in flight at most: marks touch disjoint records, so a few run
/// beside the waves instead of holding them up.
const MARKS_IN_FLIGHT: usize = 4;

/// What a relay has in flight while it pumps records to the sink.
#[derive(Default)]
struct Flow {
    /// The last position fetched: the next fetch starts after it.
    after: u64,
    fetching: Option<Task<Vec<PendingRecord>>>,
    /// Fetched and not yet sent, in position order.
    queued: VecDeque<Message>,
    waves: VecDeque<Wave>,
    /// Streams with a record in a wave.
    busy: HashSet<String>,
    /// Streams whose record failed: nothing more of theirs goes out until
    /// the next pump starts again from the oldest pending record.
    blocked: HashSet<String>,
    /// Fetched and not acknowledged (queued, out, failed), with its lane:
    /// the lowest of a lane bounds the lane's checkpoint.
    outstanding: BTreeMap<u64, u32>,
    /// Acknowledged, not yet being marked, with their lanes.
    acked: Vec<(u64, u32)>,
    /// Marks in flight, oldest first.
    marking: VecDeque<Task<u64>>,
}

impl Flow {
    /// What marking `acked` tells the database: per lane, the position up
    /// to which every record of the lane is acknowledged. The fetches of a
    /// pump cover every pending record of its lanes up to `after`, so
    /// that is the checkpoint of a lane with nothing outstanding.
    fn mark(&self, acked: Vec<(u64, u32)>) -> Mark {
        let lanes = LANES as usize;
        let mut upto = vec![self.after; lanes];
        let mut bounded = vec![false; lanes];
        let mut left = lanes;
        for (&position, &lane) in &self.outstanding {
            if let Some(seen) = bounded.get_mut(lane as usize).filter(|seen| !**seen) {
                *seen = true;
                upto[lane as usize] = self.after.min(position.saturating_sub(1));
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
        let (positions, lanes) = acked.into_iter().unzip();
        Mark {
            positions,
            lanes,
            upto,
        }
    }

    /// The next wave: the oldest queued record of each stream that has
    /// nothing out, at most `limit` of them.
    fn next_wave(&mut self, limit: usize) -> Vec<Message> {
        // Chosen first over borrowed ids, so only the records sent have
        // their stream id copied (into `busy`).
        let chosen: Vec<bool> = {
            let mut passed: HashSet<&str> = HashSet::with_capacity(self.queued.len());
            let mut taken = 0;
            self.queued
                .iter()
                .map(|record| {
                    let first_of_stream = passed.insert(&record.stream_id);
                    let take =
                        first_of_stream && taken < limit && !self.busy.contains(&record.stream_id);
                    taken += usize::from(take);
                    take
                })
                .collect()
        };
        let mut wave = Vec::new();
        let mut rest = VecDeque::with_capacity(self.queued.len());
        for (record, take) in self.queued.drain(..).zip(chosen) {
            if take {
                self.busy.insert(record.stream_id.clone());
                wave.push(record);
            } else {
                rest.push_back(record);
            }
        }
        self.queued = rest;
        wave
    }
}

/// When a pump stops taking new work.
struct PumpUntil<'a> {
    deadline: Instant,
    stop: Option<&'a watch::Receiver<bool>>,
    /// Fetch once only (a [`Relay::round`]).
    once: bool,
}

impl PumpUntil<'_> {
    fn reached(&self) -> bool {
        Instant::now() >= self.deadline || self.stop.is_some_and(|stop| *stop.borrow())
    }
}

/// Publishes the outbox of one database to one sink.
pub struct Relay {
    db: Arc<dyn OutboxDb>,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    wake: Option<watch::Receiver<u64>>,
    stats: Arc<RelayStats>,
}

impl Relay {
    /// A relay of the records in `db` to `sink`.
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

    /// Its counts, shared: they keep changing while it runs.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Its configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Records per fetch, and per mark (at least one).
    fn batch(&self) -> usize {
        self.config.batch.max(1)
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
    /// records of the held lanes (one batch) and publish them in waves of
    /// at most one record per stream. A stream whose record fails
    /// publishes nothing more this round, so its order holds; the others
    /// go on.
    pub async fn round(&self) -> Result<Round, OutboxError> {
        let until = PumpUntil {
            deadline: far_future(),
            stop: None,
            once: true,
        };
        self.pump(&until).await
    }

    /// Publishes until nothing is pending, renewing the leases every
    /// heartbeat. Returns the records published.
    pub async fn drain(&self) -> Result<u64, OutboxError> {
        let (mut published, mut stuck) = (0, 0);
        loop {
            self.heartbeat().await?;
            let until = PumpUntil {
                deadline: Instant::now() + self.config.heartbeat,
                stop: None,
                once: false,
            };
            let round = self.pump(&until).await?;
            published += round.published;
            stuck = if round.failed > 0 && round.published == 0 {
                stuck + 1
            } else {
                0
            };
            if stuck >= 100 {
                return Err(OutboxError::Sink(SinkError::retryable(format!(
                    "the sink refused 100 rounds in a row: {}",
                    self.stats.snapshot().last_error.unwrap_or_default()
                ))));
            }
            if round.pending == 0 {
                return Ok(published);
            }
        }
    }

    /// Publishes pending records until nothing is left, a record failed,
    /// or `until` is reached, keeping the next batch fetched and
    /// [`WAVES_IN_FLIGHT`] waves out; then waits for what is out and for
    /// the marks. Leaves nothing in flight.
    async fn pump(&self, until: &PumpUntil<'_>) -> Result<Round, OutboxError> {
        let mut flow = Flow::default();
        let pumped = self.pumping(&mut flow, until).await;
        let settled = self.settle(&mut flow).await;
        let mut round = pumped?;
        let marked = round.published + settled?;
        // Parked records are marked done like acknowledged ones, within
        // this pump: they were not published.
        round.published = marked.saturating_sub(round.parked);
        self.stats
            .published
            .fetch_sub(marked - round.published, Ordering::Relaxed);
        Ok(round)
    }

    async fn pumping(&self, flow: &mut Flow, until: &PumpUntil<'_>) -> Result<Round, OutboxError> {
        let batch = self.batch();
        let mut round = Round::default();
        // No more fetches: the outbox is empty, a record failed, or `once`.
        let mut done_fetching = false;
        // The last fetch was short: fetch again only once all is out, so
        // an outbox being filled is not polled in a tight loop.
        let mut short = false;
        loop {
            let taking = !until.reached();
            while taking && flow.waves.len() < WAVES_IN_FLIGHT {
                let wave = flow.next_wave(batch);
                if wave.is_empty() {
                    break;
                }
                let sink = self.sink.clone();
                flow.waves.push_back(tokio::spawn(async move {
                    let results = sink.publish(&wave).await;
                    (wave, results)
                }));
            }
            // After the waves went out: the next batch is fetched while
            // they are at the sink, and one more is kept ready, so the
            // database and the sink both always have work.
            if taking
                && !done_fetching
                && flow.fetching.is_none()
                && flow.queued.len() < 2 * batch
                && (!short || (flow.waves.is_empty() && flow.queued.is_empty()))
            {
                if short && !flow.acked.is_empty() {
                    // Caught up: what went out is marked now, not once a
                    // batch has gathered.
                    let acked = std::mem::take(&mut flow.acked);
                    self.start_mark(flow, acked, &mut round).await?;
                }
                let (db, relay, after) =
                    (self.db.clone(), self.config.relay_id.clone(), flow.after);
                flow.fetching = Some(tokio::spawn(async move {
                    db.pending(&relay, after, batch).await
                }));
            }
            if flow.waves.is_empty() && (flow.fetching.is_none() || !taking) {
                break;
            }
            tokio::select! {
                biased;
                fetched = async { flow.fetching.as_mut().expect("checked").await },
                    if flow.fetching.is_some() => {
                    flow.fetching = None;
                    let fetched = fetched.map_err(|e| task_failed("an outbox", e))??;
                    round.pending += fetched.len();
                    short = fetched.len() < batch;
                    done_fetching = fetched.is_empty() || until.once;
                    if let Some(last) = fetched.last() {
                        flow.after = last.message.position;
                    }
                    // A blocked stream's records stay outstanding behind
                    // the one that failed.
                    for record in fetched {
                        if !flow.blocked.contains(&record.message.stream_id) {
                            flow.outstanding.insert(record.message.position, record.lane);
                            flow.queued.push_back(record.message);
                        }
                    }
                }
                answered = async { flow.waves.front_mut().expect("checked").await },
                    if !flow.waves.is_empty() => {
                    flow.waves.pop_front();
                    let (wave, results) = answered.map_err(|e| task_failed("a sink", e))?;
                    if self.answered(flow, wave, results, &mut round).await? {
                        done_fetching = true;
                    }
                }
            }
        }
        Ok(round)
    }

    /// Takes a wave's answers: marks what was acknowledged (in batches),
    /// blocks the streams that failed. Returns whether any failed.
    async fn answered(
        &self,
        flow: &mut Flow,
        wave: Vec<Message>,
        results: Vec<Result<(), SinkError>>,
        round: &mut Round,
    ) -> Result<bool, OutboxError> {
        let mut failed = Vec::new();
        let mut error = None;
        let mut refused = Vec::new();
        for (message, result) in wave.into_iter().zip(results) {
            flow.busy.remove(&message.stream_id);
            match result {
                Ok(()) => {
                    if let Some(lane) = flow.outstanding.remove(&message.position) {
                        flow.acked.push((message.position, lane));
                    }
                }
                // Refused for good: parked, then done like an acknowledged
                // one, so its stream goes on.
                Err(e) if !e.is_retryable() => refused.push((message, e)),
                Err(e) => {
                    failed.push(message.position);
                    error.get_or_insert(e.message().to_owned());
                    flow.blocked.insert(message.stream_id);
                }
            }
        }
        for (message, refusal) in refused {
            tracing::warn!(position = message.position, stream = %message.stream_id, error = %refusal, "the sink refused a message for good; parked");
            // Parked before it is marked: a crash in between sends it
            // again, which parks it again.
            self.db.park(&[message.position], refusal.message()).await?;
            self.stats.parked.fetch_add(1, Ordering::Relaxed);
            round.parked += 1;
            if let Some(lane) = flow.outstanding.remove(&message.position) {
                flow.acked.push((message.position, lane));
            }
        }
        if flow.acked.len() >= self.batch() {
            let acked = std::mem::take(&mut flow.acked);
            self.start_mark(flow, acked, round).await?;
        }
        let Some(error) = error else {
            return Ok(false);
        };
        let blocked = &flow.blocked;
        flow.queued.retain(|m| !blocked.contains(&m.stream_id));
        round.failed += failed.len() as u64;
        self.stats.failed_with(failed.len() as u64, &error);
        self.db.record_failure(&failed, &error).await?;
        Ok(true)
    }

    async fn start_mark(
        &self,
        flow: &mut Flow,
        acked: Vec<(u64, u32)>,
        round: &mut Round,
    ) -> Result<(), OutboxError> {
        if flow.marking.len() >= MARKS_IN_FLIGHT {
            if let Some(oldest) = flow.marking.pop_front() {
                round.published += self.marked(oldest).await?;
            }
        }
        let (db, relay, mark) = (
            self.db.clone(),
            self.config.relay_id.clone(),
            flow.mark(acked),
        );
        flow.marking.push_back(tokio::spawn(async move {
            db.mark_published(&relay, &mark).await
        }));
        Ok(())
    }

    /// Waits for the waves and marks in flight and drops what was fetched
    /// and not sent (it is still pending). Returns how many records the
    /// marks marked.
    async fn settle(&self, flow: &mut Flow) -> Result<u64, OutboxError> {
        if let Some(fetching) = flow.fetching.take() {
            fetching.abort();
        }
        let mut first_error = None;
        // What the sink took after a failure is still marked.
        let mut round = Round::default();
        while let Some(wave) = flow.waves.pop_front() {
            match wave.await {
                Ok((wave, results)) => {
                    if let Err(e) = self.answered(flow, wave, results, &mut round).await {
                        first_error.get_or_insert(e);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(task_failed("a sink", e));
                }
            }
        }
        if !flow.acked.is_empty() {
            let acked = std::mem::take(&mut flow.acked);
            if let Err(e) = self.start_mark(flow, acked, &mut round).await {
                first_error.get_or_insert(e);
            }
        }
        let mut marked = round.published;
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
        while !*stop.borrow() {
            if Instant::now() >= next_heartbeat {
                // Nothing is in flight between pumps, while lanes may move
                // to another relay.
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
                let until = PumpUntil {
                    deadline: next_heartbeat,
                    stop: Some(&stop),
                    once: false,
                };
                match self.pump(&until).await {
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

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
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
    fn a_wave_holds_the_oldest_record_of_each_idle_stream() {
        let mut flow = Flow {
            queued: [
                (1, "A"),
                (2, "B"),
                (3, "A"),
                (4, "A"),
                (5, "C"),
                (6, "B"),
                (7, "D"),
            ]
            .into_iter()
            .map(|(p, s)| message(p, s))
            .collect(),
            ..Flow::default()
        };
        flow.busy.insert("C".to_owned());
        let positions = |flow: &mut Flow, limit| -> Vec<u64> {
            flow.next_wave(limit).iter().map(|m| m.position).collect()
        };
        assert_eq!(positions(&mut flow, 10), vec![1, 2, 7]);
        assert_eq!(
            positions(&mut flow, 10),
            Vec::<u64>::new(),
            "A, B, C and D are out"
        );
        flow.busy.clear();
        assert_eq!(positions(&mut flow, 1), vec![3]);
        flow.busy.clear();
        assert_eq!(positions(&mut flow, 10), vec![4, 5, 6]);
        assert!(flow.queued.is_empty());
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
