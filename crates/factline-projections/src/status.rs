//! What a running projection shares with the rest of the process: its
//! checkpoint, its lag behind the head (P9), and waiting for a position
//! before reading its read model (P11).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where a projection stands, shared between its runner and readers.
#[derive(Clone)]
pub struct ProjectionStatus {
    name: Arc<str>,
    checkpoint: watch::Sender<u64>,
    details: Arc<Mutex<Details>>,
}

#[derive(Clone, Debug, Default)]
struct Details {
    last_recorded_at: Option<DateTime<Utc>>,
    skipped: u64,
    parked: u64,
    paused: bool,
    catching_up: Option<CatchUp>,
}

/// A catch-up (or rebuild) in progress.
#[derive(Clone, Copy, Debug)]
struct CatchUp {
    started: Instant,
    from: u64,
    to: u64,
}

/// How far a catch-up (a rebuild) has come.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Events applied since the catch-up started.
    pub done: u64,
    /// Events it has to apply in all.
    pub total: u64,
    /// Events applied per second so far.
    pub events_per_second: f64,
    /// Time left at the rate so far; `None` before the rate is known.
    pub eta: Option<Duration>,
}

/// How far a projection is behind the head of the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// The position of the last applied event.
    pub checkpoint: u64,
    /// Events committed to the log and not yet applied.
    pub events_behind: u64,
    /// Now minus the recorded-at time of the last applied event; 0 when
    /// caught up.
    pub seconds_behind: f64,
    /// Events the projection skipped or parked instead of applying.
    pub skipped: u64,
    /// Events parked in the dead-letter table.
    pub parked: u64,
}

/// What a read waiting for a position does when the wait times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// Fail with [`NotYet`].
    Fail,
    /// Answer anyway, flagged as stale.
    AnswerStale,
}

/// How long a read waits for the projection to reach a position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// How long to wait.
    pub timeout: Duration,
    /// What to do when the wait is over.
    pub on_timeout: OnTimeout,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            timeout: Duration::from_secs(5),
            on_timeout: OnTimeout::Fail,
        }
    }
}

/// A read-model answer, and whether it may predate the position asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    /// The answer.
    pub value: T,
    /// True when the projection had not reached the position asked for.
    pub stale: bool,
}

/// The projection did not reach the position in time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("projection {projection} reached position {reached}, not {wanted}, within {timeout:?}")]
pub struct NotYet {
    /// The projection's name.
    pub projection: String,
    /// The position waited for.
    pub wanted: u64,
    /// The position it had reached.
    pub reached: u64,
    /// How long it waited.
    pub timeout: Duration,
}

impl ProjectionStatus {
    /// A status for a projection named `name`; a runner gets one of its
    /// own, or shares this one ([`Runner::with_status`](crate::Runner::with_status))
    /// so that readers keep it across restarts of the runner.
    pub fn new(name: &str) -> Self {
        ProjectionStatus {
            name: name.into(),
            checkpoint: watch::channel(0).0,
            details: Arc::default(),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last position applied.
    pub fn checkpoint(&self) -> u64 {
        *self.checkpoint.borrow()
    }

    /// A receiver that changes with every committed batch.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.checkpoint.subscribe()
    }

    pub(crate) fn committed(&self, checkpoint: u64, last_recorded_at: Option<DateTime<Utc>>) {
        if let Ok(mut details) = self.details.lock() {
            if last_recorded_at.is_some() {
                details.last_recorded_at = last_recorded_at;
            }
        }
        self.checkpoint.send_replace(checkpoint);
    }

    pub(crate) fn parked_counts(&self, parked: u64, skipped: u64) {
        if let Ok(mut details) = self.details.lock() {
            details.parked = parked;
            details.skipped = skipped;
        }
    }

    pub(crate) fn last_recorded_at(&self) -> Option<DateTime<Utc>> {
        self.details.lock().ok()?.last_recorded_at
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        if let Ok(mut details) = self.details.lock() {
            details.paused = paused;
        }
    }

    /// Whether the runner is waiting because an operator paused it.
    pub fn is_paused(&self) -> bool {
        self.details.lock().is_ok_and(|d| d.paused)
    }

    pub(crate) fn add_parked(&self, parked: u64) {
        if let Ok(mut details) = self.details.lock() {
            details.parked += parked;
        }
    }

    pub(crate) fn catching_up(&self, from: u64, to: u64) {
        if let Ok(mut details) = self.details.lock() {
            details.catching_up = Some(CatchUp {
                started: Instant::now(),
                from,
                to,
            });
        }
    }

    /// The progress of the catch-up (or rebuild) under way, if any.
    pub fn progress(&self) -> Option<Progress> {
        let catch_up = self.details.lock().ok()?.catching_up?;
        let done = self.checkpoint().saturating_sub(catch_up.from);
        let total = catch_up.to.saturating_sub(catch_up.from);
        let seconds = catch_up.started.elapsed().as_secs_f64();
        let events_per_second = if seconds > 0.0 {
            done as f64 / seconds
        } else {
            0.0
        };
        let eta = (events_per_second > 0.0).then(|| {
            Duration::from_secs_f64(total.saturating_sub(done) as f64 / events_per_second)
        });
        Some(Progress {
            done,
            total,
            events_per_second,
            eta,
        })
    }

    /// The lag against `head`, the log's last position.
    pub fn lag(&self, head: u64) -> Lag {
        let checkpoint = self.checkpoint();
        let details = self.details.lock().map(|d| d.clone()).unwrap_or_default();
        let caught_up = checkpoint >= head;
        let seconds_behind = match details.last_recorded_at {
            Some(at) if !caught_up => {
                (Utc::now() - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
            }
            _ => 0.0,
        };
        Lag {
            checkpoint,
            events_behind: head.saturating_sub(checkpoint),
            seconds_behind: seconds_behind.max(0.0),
            skipped: details.skipped,
            parked: details.parked,
        }
    }

    /// Waits until the projection has applied `position` (P11).
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> Result<(), NotYet> {
        let mut watch = self.watch();
        let reached = tokio::time::timeout(timeout, watch.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|r| r.is_ok());
        match reached {
            true => Ok(()),
            // The runner is gone, or time is up: either way not there.
            false => Err(NotYet {
                projection: self.name.to_string(),
                wanted: position,
                reached: self.checkpoint(),
                timeout,
            }),
        }
    }

    /// Read-your-writes: runs `query` once the projection has applied
    /// `position` (the position an append returned), or when the wait
    /// times out, as `freshness` says.
    pub async fn read_at<T, F, Fut>(
        &self,
        position: u64,
        freshness: Freshness,
        query: F,
    ) -> Result<Answer<T>, NotYet>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let stale = match self.wait_for(position, freshness.timeout).await {
            Ok(()) => false,
            Err(not_yet) if freshness.on_timeout == OnTimeout::Fail => return Err(not_yet),
            Err(_) => true,
        };
        Ok(Answer {
            value: query().await,
            stale,
        })
    }
}
