//! How a SQLite store is configured.

use std::path::PathBuf;
use std::time::Duration;

use factline_core::Limits;

/// SQLite's `synchronous` setting: how hard a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// No fsync: fast, and a power loss may lose recent commits or worse.
    Off,
    /// In WAL mode a power loss may lose the latest commits, never corrupts.
    Normal,
    /// Every commit is fsynced before it is acknowledged.
    #[default]
    Full,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl std::str::FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Synchronous::Off),
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            _ => Err(format!(
                "invalid synchronous mode {s:?}: use off, normal or full"
            )),
        }
    }
}

/// Where the SQLite store lives and how its writer works.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteConfig {
    /// The database file, created if missing.
    pub path: PathBuf,
    /// How durable a commit is before the append returns.
    pub synchronous: Synchronous,
    /// What appends may hold.
    pub limits: Limits,
    /// Most events the writer puts in one group-commit transaction.
    pub max_batch_events: usize,
    /// Appends that may wait for the writer before callers are held back.
    pub queue_capacity: usize,
    /// How often the store reads its head, to see commits made by other
    /// processes (commits of this process wake subscriptions at once). One
    /// read per interval serves every subscription.
    pub fallback_poll: Duration,
    /// How long a connection waits for another process's write lock.
    pub busy_timeout: Duration,
    /// Idle read connections kept open.
    pub max_idle_readers: usize,
}

impl SqliteConfig {
    /// The defaults for the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            synchronous: Synchronous::Full,
            limits: Limits::default(),
            max_batch_events: 20_000,
            queue_capacity: 4_096,
            fallback_poll: Duration::from_millis(200),
            busy_timeout: Duration::from_secs(10),
            max_idle_readers: 8,
        }
    }
}
