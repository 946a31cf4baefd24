//! The loop every projection runs: follow `$all` from the checkpoint, cut
//! the stream into batches, hand each batch to the sink, which commits it
//! with its checkpoint.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use std::collections::VecDeque;

use factline_core::{
    EventStore, RecordedEvent, StorageError, StoreError, StreamFilter, Subscription,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{PoisonPolicy, ProjectionError, ProjectionStatus, RetryPolicy};

/// When a batch is committed: at `max_events`, or `max_wait` after its
/// first event, whichever comes first — or at once when the log has no
/// further event yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most events per batch.
    pub max_events: usize,
    /// Longest a batch waits for more events after its first.
    pub max_wait: Duration,
}

impl BatchPolicy {
    /// For rebuilds: a version being built serves no reads, so its batches
    /// may be large — 20 000 events or a second. Fewer, larger commits (and
    /// set-based statements over more events) replay history several
    /// times faster on PostgreSQL and save a fifth on SQLite.
    pub fn rebuild() -> Self {
        BatchPolicy {
            max_events: 20_000,
            max_wait: Duration::from_secs(1),
        }
    }
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_events: 500,
            max_wait: Duration::from_millis(100),
        }
    }
}

/// Where a projection's batches go: one transaction per batch holding the
/// read model's changes and the new checkpoint.
#[async_trait]
pub trait Sink: Send {
    /// The projection's name.
    fn name(&self) -> &str;
    /// The last position applied (0 before the first batch).
    async fn checkpoint(&mut self) -> Result<u64, ProjectionError>;
    /// Applies `events` (in global order, all after the checkpoint) and
    /// moves the checkpoint to the last one, atomically: all or nothing.
    /// Events of a stream with a parked event are parked behind it; returns
    /// how many were.
    /// (Shared, not owned: the runner keeps the batch to split it if an
    /// event fails.)
    async fn apply_batch(&mut self, events: Arc<[RecordedEvent]>) -> Result<u64, ProjectionError>;

    /// Parks `event` with its error and moves the checkpoint to it, in one
    /// transaction (P8).
    async fn park(
        &mut self,
        event: RecordedEvent,
        error: &str,
        attempts: u32,
    ) -> Result<(), ProjectionError>;

    /// How many events are parked and how many were skipped.
    async fn parked_counts(&mut self) -> Result<(u64, u64), ProjectionError>;
}

/// A sink whose projection has versions (blue/green, P4): it builds a
/// version beside the active one and swaps it in.
#[async_trait]
pub trait VersionedSink: Sink {
    /// Makes this sink's version the active one in one transaction: the
    /// views point at its tables and the registry names it. Unless
    /// `keep_old`, the previous version's tables and checkpoint are then
    /// dropped in the same transaction. Returns the previous version.
    async fn swap(&mut self, keep_old: bool) -> Result<Option<u32>, ProjectionError>;

    /// Drops this (not active) version's tables and checkpoint.
    async fn discard(&mut self) -> Result<(), ProjectionError>;

    /// How this version's tables differ from the active version's, with up
    /// to `samples` rows of each kind per table: the review before a swap.
    async fn diff(&mut self, samples: usize) -> Result<crate::DiffReport, ProjectionError>;
}

/// Events read ahead of the sink: a task reads the log in chunks while
/// the sink applies the previous ones, so reading and writing overlap.
/// It lives for one `run` or `catch_up`; what it read past the batch
/// handed on is read again from the checkpoint next time.
struct Feed {
    chunks: tokio::sync::mpsc::Receiver<Result<Chunk, StoreError>>,
    buffer: VecDeque<RecordedEvent>,
    /// The reader had delivered everything committed when it sent the
    /// last chunk received.
    reader_caught_up: bool,
    reader: tokio::task::JoinHandle<()>,
}

struct Chunk {
    events: Vec<RecordedEvent>,
    caught_up: bool,
}

/// Events per chunk.
const CHUNK: usize = 512;

impl Feed {
    /// Reads up to about `ahead` events ahead of the consumer.
    fn start(mut subscription: Subscription, ahead: usize) -> Feed {
        let (send, chunks) = tokio::sync::mpsc::channel(ahead.div_ceil(CHUNK).max(2));
        let reader = tokio::spawn(async move {
            loop {
                let mut events = Vec::with_capacity(CHUNK);
                let chunk = async {
                    events.push(subscription.next().await?);
                    while events.len() < CHUNK && !subscription.caught_up() {
                        events.push(subscription.next().await?);
                    }
                    Ok(())
                }
                .await;
                let caught_up = subscription.caught_up();
                let failed = chunk.err();
                if !events.is_empty() && send.send(Ok(Chunk { events, caught_up })).await.is_err() {
                    return;
                }
                if let Some(e) = failed {
                    let _ = send.send(Err(e)).await;
                    return;
                }
            }
        });
        Feed {
            chunks,
            buffer: VecDeque::new(),
            reader_caught_up: false,
            reader,
        }
    }

    /// The next event; cancel-safe (nothing is lost when the wait is
    /// dropped).
    async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Ok(event);
            }
            match self.chunks.recv().await {
                Some(Ok(chunk)) => {
                    self.reader_caught_up = chunk.caught_up;
                    self.buffer.extend(chunk.events);
                }
                Some(Err(e)) => return Err(e),
                None => return Err(StorageError::new("the log reader stopped").into()),
            }
        }
    }

    /// Whether everything committed (as far as the reader knew) is handed
    /// out: a batch commits then instead of waiting for more.
    fn caught_up(&self) -> bool {
        self.buffer.is_empty() && self.reader_caught_up && self.chunks.is_empty()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Frees a large committed batch on a blocking thread: freeing thousands
/// of decoded events takes long enough to hold up the next batch.
fn drop_aside(batch: Arc<[RecordedEvent]>) {
    if batch.len() >= 256 {
        tokio::task::spawn_blocking(move || drop(batch));
    }
}

/// Counts of a runner's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunnerStats {
    /// Batches committed.
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// The checkpoint after the last committed batch.
    pub checkpoint: u64,
    /// The most events one batch held.
    pub largest_batch: usize,
}

/// Runs one projection: catch up from its checkpoint, then follow live.
pub struct Runner<S> {
    store: Arc<dyn EventStore>,
    sink: S,
    policy: BatchPolicy,
    stats: RunnerStats,
    status: ProjectionStatus,
    /// Most events applied per second (rebuilds share the database).
    rate_limit: Option<u64>,
    retries: RetryPolicy,
    poison: PoisonPolicy,
    /// `run`'s stop signal, so a paused runner still stops when told.
    stop: Option<watch::Receiver<bool>>,
}

/// How often a paused runner looks whether it was resumed.
const PAUSE_POLL: Duration = Duration::from_millis(200);

impl<S: Sink> Runner<S> {
    /// A runner applying the events of `store` to `sink`, with the default
    /// batch, retry and poison policies.
    pub fn new(store: Arc<dyn EventStore>, sink: S) -> Self {
        let status = ProjectionStatus::new(sink.name());
        Runner {
            store,
            sink,
            policy: BatchPolicy::default(),
            stats: RunnerStats::default(),
            status,
            rate_limit: None,
            retries: RetryPolicy::default(),
            poison: PoisonPolicy::default(),
            stop: None,
        }
    }

    /// Sets how events are grouped into transactions.
    pub fn with_policy(mut self, policy: BatchPolicy) -> Self {
        self.policy = BatchPolicy {
            max_events: policy.max_events.max(1),
            ..policy
        };
        self
    }

    /// Reports through `status` instead of a status of its own: a
    /// supervisor that restarts runners (after a swap, say) keeps one status
    /// for its readers.
    pub fn with_status(mut self, status: ProjectionStatus) -> Self {
        self.status = status;
        self
    }

    /// Applies at most `events_per_second` on average (P5): batches shrink
    /// to a tenth of a second's worth and the runner waits between them.
    pub fn with_rate_limit(mut self, events_per_second: u64) -> Self {
        self.rate_limit = Some(events_per_second.max(1));
        self
    }

    /// How a failing event is retried before the poison policy decides.
    pub fn with_retries(mut self, retries: RetryPolicy) -> Self {
        self.retries = RetryPolicy {
            attempts: retries.attempts.max(1),
            ..retries
        };
        self
    }

    /// What happens to an event that still fails after its retries (P8):
    /// stop (the default) or park it and go on.
    pub fn with_poison_policy(mut self, poison: PoisonPolicy) -> Self {
        self.poison = poison;
        self
    }

    /// Its counts so far.
    pub fn stats(&self) -> RunnerStats {
        self.stats
    }

    /// A receiver of the checkpoint after every committed batch.
    pub fn watch_checkpoint(&self) -> watch::Receiver<u64> {
        self.status.watch()
    }

    /// The projection's checkpoint and lag, shared with readers (P9, P11).
    pub fn status(&self) -> ProjectionStatus {
        self.status.clone()
    }

    /// The sink it applies to.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink it applies to, to change.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The sink, after the runner is done with it.
    pub fn into_sink(self) -> S {
        self.sink
    }

    /// Follows the log until `stop` turns true (or its sender is dropped),
    /// committing the batch in hand before returning. A batch whose
    /// database fails in a way that may pass is written again after a
    /// backoff (the retry policy's attempts); one that still fails stops
    /// the runner with nothing of that batch committed.
    pub async fn run(
        &mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RunnerStats, ProjectionError> {
        // Subscribing may wait (a standby waits for its lease): stop ends
        // that wait too.
        let mut subscription = tokio::select! {
            subscription = self.subscribe() => subscription?,
            _ = stop.wait_for(|s| *s) => return Ok(self.stats),
        };
        self.stop = Some(stop.clone());
        let result = loop {
            if *stop.borrow_and_update() {
                break Ok(self.stats);
            }
            let first = tokio::select! {
                event = subscription.next() => event?,
                _ = stop.changed() => continue,
            };
            let batch = Self::fill_batch(self.policy(), &mut subscription, first, u64::MAX).await?;
            match self.commit(batch).await {
                Ok(()) => {}
                // Stopped while paused: the batch in hand was not committed
                // and is read again from the checkpoint next time.
                Err(ProjectionError::Paused { .. }) if *stop.borrow() => break Ok(self.stats),
                // Stopped while a failure that may pass was being retried:
                // likewise nothing of the batch was committed.
                Err(e) if e.is_retryable() && *stop.borrow() => break Ok(self.stats),
                Err(e) => break Err(e),
            }
        };
        self.stop = None;
        result
    }

    /// The batch policy, with batches cut to the rate limit.
    fn policy(&self) -> BatchPolicy {
        match self.rate_limit {
            Some(rate) => BatchPolicy {
                max_events: self.policy.max_events.min((rate / 10).max(1) as usize),
                ..self.policy
            },
            None => self.policy,
        }
    }

    /// Applies every event up to global position `to` (or the head when it
    /// is lower) and returns; for rebuilds, tests and tools.
    pub async fn catch_up(&mut self, to: u64) -> Result<RunnerStats, ProjectionError> {
        let to = to.min(self.store.head_position().await?);
        let mut subscription = self.subscribe().await?;
        let (from, started) = (self.stats.checkpoint, Instant::now());
        self.status.catching_up(from, to);
        while self.stats.checkpoint < to {
            let first = subscription.next().await?;
            if first.position > to {
                break;
            }
            let batch = Self::fill_batch(self.policy(), &mut subscription, first, to).await?;
            self.commit(batch).await?;
            if let Some(rate) = self.rate_limit {
                // Where the applied events say the clock may be by now.
                let done = self.stats.checkpoint - from;
                let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
            }
        }
        Ok(self.stats)
    }

    async fn subscribe(&mut self) -> Result<Feed, ProjectionError> {
        crate::validate_name(self.sink.name())?;
        let checkpoint = self.sink.checkpoint().await?;
        self.stats.checkpoint = checkpoint;
        let (parked, skipped) = self.sink.parked_counts().await?;
        self.status.parked_counts(parked, skipped);
        // The lag in seconds is measured from the last applied event's time.
        let last_applied = match checkpoint {
            0 => None,
            at => self
                .store
                .read_all(at, 1)
                .await?
                .first()
                .map(|e| e.recorded_at),
        };
        self.status.committed(checkpoint, last_applied);
        let subscription = self.store.subscribe(StreamFilter::All, checkpoint + 1);
        // Two batches ahead: the next one is read while this one is applied.
        Ok(Feed::start(subscription, 2 * self.policy().max_events))
    }

    /// `first` and what follows it, up to the policy's size, its time limit
    /// and position `to`.
    /// (Takes the policy, not `&self`: the runner stays `Send` without its
    /// sink having to be `Sync`.)
    async fn fill_batch(
        policy: BatchPolicy,
        subscription: &mut Feed,
        first: RecordedEvent,
        to: u64,
    ) -> Result<Vec<RecordedEvent>, ProjectionError> {
        let deadline = Instant::now() + policy.max_wait;
        let mut batch = vec![first];
        // Stop early once the log has nothing more: a batch waits for more
        // events only while they keep coming, so a quiet log sees each
        // event at once and a busy one gets full batches.
        while batch.len() < policy.max_events
            && batch[batch.len() - 1].position < to
            && !subscription.caught_up()
        {
            // `Feed::next` loses nothing when cancelled: it moves
            // its position only together with the events it keeps.
            match tokio::time::timeout_at(deadline, subscription.next()).await {
                Ok(event) => batch.push(event?),
                Err(_) => break,
            }
        }
        // Catching up to `to`, an event past it waits for the next call.
        if batch[batch.len() - 1].position > to {
            batch.pop();
        }
        Ok(batch)
    }

    /// Commits a batch. When an event of it fails, the events before it are
    /// committed, the event is tried alone with backoff, and if it still
    /// fails the poison policy stops the run or parks it; the rest of the
    /// batch follows.
    async fn commit(&mut self, batch: Vec<RecordedEvent>) -> Result<(), ProjectionError> {
        let mut batch: Arc<[RecordedEvent]> = batch.into();
        while !batch.is_empty() {
            let failed_at = match self.apply(batch.clone()).await {
                Ok(held_back) => {
                    self.status.add_parked(held_back);
                    let committed = self.committed(&batch);
                    drop_aside(batch);
                    return committed;
                }
                Err(ProjectionError::Apply { position, .. }) => position,
                Err(other) => return Err(other),
            };
            let index = batch
                .iter()
                .position(|e| e.position == failed_at)
                .unwrap_or(0);
            let (before, rest) = batch.split_at(index);
            let (poison, rest) = (rest[0].clone(), Arc::<[RecordedEvent]>::from(&rest[1..]));
            if !before.is_empty() {
                let before: Arc<[RecordedEvent]> = before.into();
                let held_back = self.apply(before.clone()).await?;
                self.status.add_parked(held_back);
                self.committed(&before)?;
            }
            self.retry_or_give_up(poison).await?;
            batch = rest;
        }
        Ok(())
    }

    /// Tries an event that failed once more up to the retry policy's
    /// attempts, then applies the poison policy.
    async fn retry_or_give_up(&mut self, event: RecordedEvent) -> Result<(), ProjectionError> {
        let mut backoff = self.retries.first_backoff;
        let mut attempts = 1;
        let message = loop {
            let message = match self.apply(Arc::from([event.clone()])).await {
                Ok(held_back) => {
                    self.status.add_parked(held_back);
                    return self.committed(std::slice::from_ref(&event));
                }
                Err(ProjectionError::Apply { message, .. }) => message,
                Err(other) => return Err(other),
            };
            attempts += 1;
            if attempts > self.retries.attempts {
                break message;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.retries.max_backoff);
        };
        let attempts = self.retries.attempts;
        match self.poison {
            PoisonPolicy::Stop => {
                tracing::error!(projection = self.sink.name(), position = event.position, error = %message, "projection stopped on a poison event");
                Err(ProjectionError::Apply {
                    projection: self.sink.name().to_owned(),
                    position: event.position,
                    message: format!("{message} (after {attempts} attempts)"),
                })
            }
            PoisonPolicy::Park => {
                tracing::warn!(projection = self.sink.name(), position = event.position, error = %message, "parked a poison event");
                self.while_paused(|runner| {
                    let event = event.clone();
                    let message = message.clone();
                    Box::pin(async move { runner.sink.park(event, &message, attempts).await })
                })
                .await?;
                let (parked, skipped) = self.sink.parked_counts().await?;
                self.status.parked_counts(parked, skipped);
                self.committed(std::slice::from_ref(&event))
            }
        }
    }

    /// Applies a batch, waiting while the projection is paused (P12's
    /// operators pause from another process: the batch itself sees it).
    /// A failure that may pass (a busy or unreachable database) is tried
    /// again with the retry policy's backoff: nothing of a failed batch was
    /// committed, so the same batch is simply written again.
    async fn apply(&mut self, batch: Arc<[RecordedEvent]>) -> Result<u64, ProjectionError> {
        let mut backoff = self.retries.first_backoff;
        let mut attempts = 1;
        loop {
            let written = self
                .while_paused(|runner| {
                    let batch = batch.clone();
                    Box::pin(async move { runner.sink.apply_batch(batch).await })
                })
                .await;
            match written {
                Err(e) if e.is_retryable() && attempts < self.retries.attempts => {
                    tracing::warn!(projection = self.sink.name(), error = %e, attempt = attempts, "a batch failed and is tried again");
                    attempts += 1;
                    if self.sleep_unless_stopped(backoff).await {
                        return Err(e);
                    }
                    backoff = (backoff * 2).min(self.retries.max_backoff);
                }
                other => return other,
            }
        }
    }

    /// Runs `write` until it is not refused as paused, looking again every
    /// [`PAUSE_POLL`]; gives up with `Paused` when `run` is told to stop.
    async fn while_paused<T>(
        &mut self,
        mut write: impl for<'a> FnMut(
            &'a mut Self,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, ProjectionError>> + Send + 'a>,
        >,
    ) -> Result<T, ProjectionError> {
        loop {
            match write(self).await {
                Err(ProjectionError::Paused { projection }) => {
                    if !self.status.is_paused() {
                        tracing::info!(projection = %projection, "projection paused");
                    }
                    self.status.set_paused(true);
                    if self.sleep_unless_stopped(PAUSE_POLL).await {
                        return Err(ProjectionError::Paused { projection });
                    }
                }
                other => {
                    if self.status.is_paused() && other.is_ok() {
                        tracing::info!(projection = self.sink.name(), "projection resumed");
                        self.status.set_paused(false);
                    }
                    return other;
                }
            }
        }
    }

    /// Sleeps for `wait`, or less when `run` is told to stop meanwhile;
    /// says whether it was.
    async fn sleep_unless_stopped(&mut self, wait: Duration) -> bool {
        match &mut self.stop {
            Some(stop) => tokio::select! {
                _ = tokio::time::sleep(wait) => *stop.borrow(),
                _ = stop.changed() => true,
            },
            None => {
                tokio::time::sleep(wait).await;
                false
            }
        }
    }

    /// Records a committed batch in the stats and the status.
    fn committed(&mut self, batch: &[RecordedEvent]) -> Result<(), ProjectionError> {
        let Some((last, recorded_at)) = batch.last().map(|e| (e.position, e.recorded_at)) else {
            return Ok(());
        };
        let size = batch.len();
        self.stats.batches += 1;
        self.stats.events += size as u64;
        self.stats.largest_batch = self.stats.largest_batch.max(size);
        self.stats.checkpoint = last;
        self.status.committed(last, Some(recorded_at));
        Ok(())
    }
}
