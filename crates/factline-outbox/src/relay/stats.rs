//! How a relay is configured, and what it counts while it runs.

use super::*;

/// How a relay works; the defaults suit most deployments.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// The longest backoff.
    pub max_backoff: Duration,
    /// Published records are deleted after this long (O6).
    pub retention: Duration,
    /// How often retention runs, and how many records one delete removes.
    pub purge_every: Duration,
    /// Most records one retention delete removes.
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
    pub(super) published: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) parked: AtomicU64,
    pub(super) purged: AtomicU64,
    pub(super) lanes: AtomicU64,
    pub(super) consecutive_failures: AtomicU64,
    /// Records per second since the previous heartbeat (f64 bits).
    pub(super) rate: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
}

/// A copy of [`RelayStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RelayStatsSnapshot {
    /// Records published and marked.
    pub published: u64,
    /// Publish attempts that failed.
    pub failed: u64,
    /// Records the sink refused for good, parked.
    pub parked: u64,
    /// Published records deleted by retention.
    pub purged: u64,
    /// Lanes held at the last heartbeat.
    pub lanes: u64,
    /// Rounds in a row that failed (0 while healthy).
    pub consecutive_failures: u64,
    /// Records published per second between the last two heartbeats.
    pub publish_rate_per_s: f64,
    /// The latest failure, if any.
    pub last_error: Option<String>,
}

impl RelayStats {
    /// The counts as they are now.
    pub fn snapshot(&self) -> RelayStatsSnapshot {
        RelayStatsSnapshot {
            published: self.published.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            purged: self.purged.load(Ordering::Relaxed),
            lanes: self.lanes.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            publish_rate_per_s: f64::from_bits(self.rate.load(Ordering::Relaxed)),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    pub(super) fn failed_with(&self, attempts: u64, error: &str) {
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
    /// Records the sink acknowledged.
    pub published: u64,
    /// Records the sink did not take this time; they stay pending.
    pub failed: u64,
    /// Records the sink refused for good, parked.
    pub parked: u64,
}
