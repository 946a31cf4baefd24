//! Running a projection as several partitions at once (P10) behind one
//! status: its checkpoint is the lowest of the partitions', the position
//! up to which every event is applied, so lag and read-your-writes work as
//! for one runner.

use std::sync::Arc;

use factline_core::EventStore;
use tokio::sync::watch;

use crate::{ProjectionError, ProjectionStatus, Runner, RunnerStats, Sink};

/// The runners of every partition of one projection version.
pub struct Partitioned<S> {
    runners: Vec<Runner<S>>,
    status: ProjectionStatus,
}

impl<S: Sink + 'static> Partitioned<S> {
    /// One runner per sink; each sink is opened as its partition
    /// (`with_partition`). `configure` sets each runner's policies.
    pub fn new(
        store: Arc<dyn EventStore>,
        sinks: Vec<S>,
        configure: impl Fn(Runner<S>) -> Runner<S>,
    ) -> Self {
        let name = sinks.first().map_or("", |s| s.name()).to_owned();
        Partitioned {
            runners: sinks
                .into_iter()
                .map(|sink| configure(Runner::new(store.clone(), sink)))
                .collect(),
            status: ProjectionStatus::new(&name),
        }
    }

    /// Reports through `status` (see [`Runner::with_status`]).
    pub fn with_status(mut self, status: ProjectionStatus) -> Self {
        self.status = status;
        self
    }

    /// The projection's status: the lowest checkpoint of its partitions.
    pub fn status(&self) -> ProjectionStatus {
        self.status.clone()
    }

    /// Runs every partition until `stop`; when one fails, the others are
    /// stopped too and its error returned.
    pub async fn run(
        self,
        stop: watch::Receiver<bool>,
    ) -> Result<Vec<RunnerStats>, ProjectionError> {
        if self.runners.is_empty() {
            return Ok(Vec::new());
        }
        let (stop_all, stopped) = watch::channel(false);
        let statuses: Vec<ProjectionStatus> = self.runners.iter().map(|r| r.status()).collect();
        let merging = tokio::spawn(merge(statuses, self.status.clone()));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, mut runner) in self.runners.into_iter().enumerate() {
            let stopped = stopped.clone();
            tasks.spawn(async move { (index, runner.run(stopped).await) });
        }
        let mut outer = stop;
        let forward = tokio::spawn({
            let stop_all = stop_all.clone();
            async move {
                // Either the caller says stop or the sender is dropped.
                let _ = outer.wait_for(|s| *s).await;
                stop_all.send_replace(true);
            }
        });
        let mut stats = vec![RunnerStats::default(); tasks.len()];
        let mut failure = None;
        while let Some(done) = tasks.join_next().await {
            let (index, result) = done.map_err(|e| {
                ProjectionError::read_model(
                    self.status.name(),
                    factline_core::StorageError::with_source("a partition's runner panicked", e),
                )
            })?;
            match result {
                Ok(s) => stats[index] = s,
                Err(e) => {
                    stop_all.send_replace(true);
                    failure.get_or_insert(e);
                }
            }
        }
        forward.abort();
        merging.abort();
        match failure {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }
}

/// Keeps `into` at the lowest checkpoint of `partitions`, with that
/// partition's lag in seconds and the parked events of all.
async fn merge(partitions: Vec<ProjectionStatus>, into: ProjectionStatus) {
    let mut watches: Vec<watch::Receiver<u64>> = partitions.iter().map(|s| s.watch()).collect();
    loop {
        let lowest = partitions
            .iter()
            .min_by_key(|s| s.checkpoint())
            .map(|s| (s.checkpoint(), s.last_recorded_at()));
        if let Some((checkpoint, recorded_at)) = lowest {
            into.committed(checkpoint, recorded_at);
        }
        let (parked, skipped) = partitions.iter().fold((0, 0), |(p, s), status| {
            let lag = status.lag(0);
            (p + lag.parked, s + lag.skipped)
        });
        into.parked_counts(parked, skipped);
        into.set_paused(partitions.iter().any(|s| s.is_paused()));
        let changes = watches.iter_mut().map(|w| Box::pin(w.changed()));
        // Woken by any partition's commit (a sender dropping means its
        // runner stopped: the merge ends), and now and then for pauses,
        // which commit nothing.
        tokio::select! {
            (changed, _, _) = futures_util::future::select_all(changes) => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}
